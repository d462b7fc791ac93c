//! `walt image cp` inside the image: tar out of / into a chroot of the merged root,
//! with walt-tar's tree writer and confining extractor.
//! Errors are returned as one line (the sandbox prints it on stderr).

use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::{self, BufWriter, Write};
use std::path::{Component, Path, PathBuf};

use walt_tar::{
    Devices, ExtractOptions, Extractor, Owners, PlainWriter, Reader, TreeOptions, TreeOwners,
    TreeWhiteouts, Whiteouts,
};

fn errstr(e: &io::Error) -> String {
    // "No such file or directory (os error 2)" -> "No such file or directory"
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// Paths inside the image: relative ones are relative to /root.
fn in_image(p: &str) -> PathBuf {
    if p.starts_with('/') {
        PathBuf::from(p)
    } else {
        Path::new("/root").join(p)
    }
}

// ---------------------------------------------------------------------------------------
// TarOut

pub(crate) fn tar_out(path: &str) -> Result<(), String> {
    let p = in_image(path);
    fs::metadata(&p).map_err(|e| format!("{path}: {}", errstr(&e)))?;
    let out = BufWriter::with_capacity(256 * 1024, io::stdout().lock());
    let opts = TreeOptions {
        whiteouts: TreeWhiteouts::Keep,
        top: Some(top_name(&p)),
        // The operand itself is followed when it is a symlink, as cp does.
        follow_top: true,
        owners: TreeOwners::Keep,
        xattrs: true,
        sparse: true,
    };
    let (mut out, _) = walt_tar::write_tree(out, &p, &opts).map_err(|e| match e {
        walt_tar::Error::Write(e) => format!("writing the archive: {}", errstr(&e)),
        e => format!("{path}: {e}"),
    })?;
    out.flush()
        .map_err(|e| format!("writing the archive: {}", errstr(&e)))?;
    Ok(())
}

/// Name of the single top component: the operand's own name, "rootfs" for "/".
fn top_name(p: &Path) -> OsString {
    let last = p.components().next_back();
    match last {
        Some(Component::Normal(n)) => n.to_os_string(),
        _ => match fs::canonicalize(p) {
            Ok(c) => c
                .file_name()
                .map(OsStr::to_os_string)
                .unwrap_or_else(|| "rootfs".into()),
            Err(_) => "rootfs".into(),
        },
    }
}

// ---------------------------------------------------------------------------------------
// TarIn

/// Reads the archive from stdin and extracts it in one pass (no copy of
/// it) with the `cp -r` destination rules: each entry is checked before it
/// is written. A refused archive may leave the entries before the bad one
/// in the session's upper directory, which the caller discards when the
/// job fails.
pub(crate) fn tar_in(dest: &str, limit: Option<u64>) -> Result<(), String> {
    // SAFETY: umask only changes this process's file mode creation mask.
    unsafe {
        libc::umask(0);
    }
    let stdin = io::stdin().lock();
    let mut reader = Reader::new(io::BufReader::with_capacity(1 << 20, stdin));
    let shown = dest.to_string();
    let opts = ExtractOptions {
        whiteouts: Whiteouts::Keep,
        owners: Owners::Keep,
        // A device node from a client would give every local account of the
        // server a way to the host's hardware once the image is used.
        devices: Devices::Refuse,
        xattrs: true,
        cp_top: Some(Box::new(move |top, is_dir| {
            walt_tar::cp_landing(&shown, &in_image(&shown), top, is_dir)
        })),
        limit,
        skip_unknown: false,
        area: "destination",
        replace_dirs: false,
    };
    let mut writer = PlainWriter;
    Extractor::new(None, opts, &mut writer)
        .and_then(|x| x.extract(&mut reader))
        .map(drop)
        .map_err(|e| match e {
            walt_tar::Error::Landing(m) => m,
            walt_tar::Error::Empty => "empty archive".into(),
            e @ walt_tar::Error::Entry { .. } => format!("refusing archive {e}"),
            walt_tar::Error::Read(e) => format!("bad archive: {}", errstr(&e)),
            e @ walt_tar::Error::Format { .. } => format!("bad archive: {e}"),
            e => e.to_string(),
        })
}
