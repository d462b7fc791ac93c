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
    let shown = dest.to_string();
    let land: walt_tar::CpTop<'_> =
        Box::new(move |top, is_dir| walt_tar::cp_landing(&shown, &in_image(&shown), top, is_dir));
    extract_stdin(None, Owners::Keep, Some(land), limit)
}

// ---------------------------------------------------------------------------------------
// Place (COPY/ADD) and CopySources (COPY --from)

/// Longest destination accepted (bytes), as PATH_MAX.
const MAX_DEST: usize = 4096;

/// `dest` cleaned as Docker's path.Clean does: absolute, no `.` or `..`.
fn clean_dest(dest: &str) -> Result<PathBuf, String> {
    if !dest.starts_with('/') {
        return Err(format!("destination {dest} is not an absolute path"));
    }
    if dest.len() > MAX_DEST {
        let start: String = dest.chars().take(60).collect();
        return Err(format!(
            "destination {start}... is longer than {MAX_DEST} bytes"
        ));
    }
    let mut comps: Vec<&str> = Vec::new();
    for c in dest.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                comps.pop();
            }
            c => comps.push(c),
        }
    }
    let mut p = PathBuf::from("/");
    p.extend(comps);
    Ok(p)
}

/// Creates `dir` and its missing parents (0755, owned by `owner`, else
/// root), following the image's symlinks on the way (this runs chrooted in
/// the image: they cannot lead out of it).
fn make_dirs(shown: &str, dir: &Path, owner: Option<(u32, u32)>) -> Result<(), String> {
    use std::os::unix::fs::DirBuilderExt;
    let mut missing = Vec::new();
    let mut at = Some(dir);
    while let Some(p) = at {
        match fs::metadata(p) {
            Ok(m) if m.is_dir() => break,
            Ok(_) if p == dir => return Err(format!("destination {shown} is not a directory")),
            Ok(_) => {
                return Err(format!(
                    "cannot create destination {shown}: {} is not a directory",
                    p.display()
                ));
            }
            // ENOTDIR: an ancestor is not a directory, found further up.
            Err(e)
                if e.kind() == io::ErrorKind::NotFound
                    || e.raw_os_error() == Some(libc::ENOTDIR) =>
            {
                missing.push(p)
            }
            Err(e) => {
                return Err(format!(
                    "cannot create destination {shown}: {}: {}",
                    p.display(),
                    errstr(&e)
                ));
            }
        }
        at = p.parent();
    }
    for p in missing.into_iter().rev() {
        match fs::DirBuilder::new().mode(0o755).create(p) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && p.is_dir() => continue,
            Err(e) => {
                return Err(format!(
                    "cannot create destination {shown}: {}: {}",
                    p.display(),
                    errstr(&e)
                ));
            }
        }
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::lchown(p, Some(uid), Some(gid))
                .map_err(|e| format!("cannot set the owner of {}: {}", p.display(), errstr(&e)))?;
        }
    }
    Ok(())
}

/// Extracts the archive on stdin with the options every landing of the sandbox shares:
/// devices refused, xattrs applied, directories never replaced by a non-directory.
fn extract_stdin(
    root: Option<&Path>,
    owners: Owners,
    cp_top: Option<walt_tar::CpTop<'_>>,
    limit: Option<u64>,
) -> Result<(), String> {
    // SAFETY: umask only changes this process's file mode creation mask.
    unsafe {
        libc::umask(0);
    }
    let stdin = io::stdin().lock();
    let mut reader = Reader::new(io::BufReader::with_capacity(1 << 20, stdin));
    let opts = ExtractOptions {
        whiteouts: Whiteouts::Keep,
        owners,
        // A device node from a client would give every local account of the
        // server a way to the host's hardware once the image is used.
        devices: Devices::Refuse,
        xattrs: true,
        cp_top,
        limit,
        skip_unknown: false,
        area: "destination",
        replace_dirs: false,
    };
    // Plain writes: the session's mount is volatile (a `syncfs` through it
    // does nothing). For `walt image cp`, the server starts the writeback
    // of the store's filesystem while it relays the archive
    // (`walt-server/src/cp.rs`); for a build's COPY/ADD, the save's flush
    // does it all, while it hashes the layer.
    let mut writer = PlainWriter;
    Extractor::new(root, opts, &mut writer)
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

/// COPY/ADD: places the tar on stdin at `dest` with Docker's rules (see `Job::Place`).
pub(crate) fn place(
    dest: &str,
    file_name: Option<&str>,
    owner: Option<&str>,
    limit: Option<u64>,
) -> Result<(), String> {
    let path = clean_dest(dest)?;
    let ids = match owner {
        Some(spec) => {
            let dbs = crate::users::Dbs::read()?;
            Some(crate::users::chown(spec, &dbs)?)
        }
        None => None,
    };
    let owners = match ids {
        Some((uid, gid)) => Owners::Fixed { uid, gid },
        None => Owners::Keep,
    };
    let Some(name) = file_name else {
        make_dirs(dest, &path, ids)?;
        return extract_stdin(Some(&path), owners, None, limit);
    };
    let (dir, target) = match fs::metadata(&path) {
        Ok(m) if m.is_dir() => (path.clone(), OsString::from(name)),
        _ => match (path.parent(), path.file_name()) {
            (Some(parent), Some(base)) => {
                make_dirs(dest, parent, ids)?;
                (parent.to_path_buf(), base.to_os_string())
            }
            // "/" is always a directory.
            _ => (path.clone(), OsString::from(name)),
        },
    };
    let want = OsString::from(name);
    let land: walt_tar::CpTop<'_> = Box::new(move |top, is_dir| {
        if top != want.as_os_str() || is_dir {
            return Err(walt_tar::Error::Landing(format!(
                "refusing archive: it should hold the one file '{}'",
                want.to_string_lossy()
            )));
        }
        Ok((dir, target))
    });
    extract_stdin(None, owners, Some(land), limit)
}

/// COPY --from: writes the tar of `sources` (resolved in the image before the chroot,
/// `root` being the image's root as this process sees it) to stdout.
pub(crate) fn resolve_from(
    root: &Path,
    sources: &[String],
) -> Result<Vec<walt_build::context::Source>, String> {
    walt_build::context::resolve_sources(root, sources).map_err(|e| e.to_string())
}

pub(crate) fn copy_sources(
    sources: &[walt_build::context::Source],
    chmod: Option<u32>,
) -> Result<(), String> {
    let mut out = BufWriter::with_capacity(256 * 1024, io::stdout().lock());
    // A header line before the archive tells the engine how it lands:
    // `F<name>\0` for exactly one regular file (landing at the
    // destination's own name unless that is a directory), `D\0` for
    // directory content.
    let head = match sources {
        [s] if s.kind == walt_build::context::SourceKind::File => {
            let mut h = b"F".to_vec();
            h.extend_from_slice(s.file_name().as_encoded_bytes());
            h
        }
        _ => b"D".to_vec(),
    };
    out.write_all(&head)
        .and_then(|()| out.write_all(b"\0"))
        .map_err(|e| format!("writing the archive: {}", errstr(&e)))?;
    let mut out =
        walt_build::copy::write_copy_tar_keeping_owners(out, Path::new("/"), sources, chmod)
            .map_err(|e| e.to_string())?;
    out.flush()
        .map_err(|e| format!("writing the archive: {}", errstr(&e)))
}
