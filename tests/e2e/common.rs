//! Helpers shared by the test modules.

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use walt_e2e::store::table_cells;
use walt_e2e::*;

/// Pushes the standard busybox image (OCI, gzip, `pc-x86-64`) to `local`
/// as `repo:tag` and returns it.
pub fn push_busybox(env: &Env, repo: &str, tag: &str) -> BuiltImage {
    let img = env.busybox();
    env.push_local(repo, tag, &img);
    img
}

/// True when the store holds this layer (by blob digest or diff_id).
pub fn store_has_layer(env: &Env, img: &BuiltImage, i: usize) -> bool {
    let d = env.server.data_dir();
    store_mentions(&d, &img.layers[i].digest) || store_mentions(&d, &img.diff_ids[i])
}

/// Asserts a successful clone printed `cloned` and the local name on its last stdout line.
#[track_caller]
pub fn assert_cloned(out: &CmdOutput, local_name: &str) {
    out.assert_success();
    let last = out.last_stdout_line();
    assert!(
        last.to_lowercase().contains("cloned") && last.contains(local_name),
        "last stdout line should say `cloned` and `{local_name}`:\n{out}"
    );
}

/// The first table of a `walt image show` output whose header has a
/// `name` cell: (header cells, row cells), rows up to the next blank line.
pub fn table(stdout: &str) -> (Vec<String>, Vec<Vec<String>>) {
    let mut lines = stdout
        .lines()
        .skip_while(|l| !table_cells(l).iter().any(|c| c == "name"));
    let header = lines.next().map(table_cells).unwrap_or_default();
    (
        header,
        lines
            // WalT's rule of dashes under the header.
            .skip_while(|l| l.starts_with('-'))
            .take_while(|l| !l.trim().is_empty())
            .map(table_cells)
            .collect(),
    )
}

/// One line per entry below `root`: path, type, mode, content (and the
/// mtime with `mtimes`), in name order.
pub fn listing(root: &Path, mtimes: bool) -> Vec<String> {
    fn walk(root: &Path, rel: &Path, mtimes: bool, out: &mut Vec<String>) {
        let mut names: Vec<_> = fs::read_dir(root.join(rel))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        for n in names {
            let rel = rel.join(&n);
            let p = root.join(&rel);
            let m = fs::symlink_metadata(&p).unwrap();
            let ft = m.file_type();
            let what = if ft.is_dir() {
                "dir".to_string()
            } else if ft.is_symlink() {
                format!("link->{}", fs::read_link(&p).unwrap().display())
            } else if ft.is_file() {
                let data = fs::read(&p).unwrap();
                if data.len() > 64 {
                    format!("file:{} bytes", data.len())
                } else {
                    format!("file:{}", String::from_utf8_lossy(&data))
                }
            } else if ft.is_char_device() {
                format!("char:{}", m.rdev())
            } else {
                "other".to_string()
            };
            let mode = if ft.is_symlink() {
                0
            } else {
                m.mode() & 0o7777
            };
            if mtimes && !ft.is_symlink() {
                out.push(format!("{} {what} {mode:o} {}", rel.display(), m.mtime()));
            } else {
                out.push(format!("{} {what} {mode:o}", rel.display()));
            }
            if ft.is_dir() {
                walk(root, &rel, mtimes, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(root, Path::new(""), mtimes, &mut out);
    out
}

/// Mount entries of every process that mention `needle`.
pub fn mounts_with(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(m) = std::fs::read_to_string(e.path().join("mountinfo")) {
            found.extend(m.lines().filter(|l| l.contains(needle)).map(String::from));
        }
    }
    found
}

/// A busybox image of `arch` (`arm64`: rpi-3-b; else armhf v7: rpi-2-b), its
/// binary the Debian busybox-static of that architecture that
/// scripts/install-deps.sh fetches into /var/cache/walt-e2e.
pub fn arm_busybox_image(env: &Env, arch: &str) -> BuiltImage {
    let cache = std::env::var("WALT_ARM_CACHE").unwrap_or_else(|_| "/var/cache/walt-e2e".into());
    let name = if arch == "arm64" {
        "busybox-arm64"
    } else {
        "busybox-armhf"
    };
    let busybox = fs::read(Path::new(&cache).join(name))
        .unwrap_or_else(|e| panic!("{cache}/{name}: {e} (scripts/install-deps.sh fetches it)"));
    let mut entries = walt_e2e::image::busybox_rootfs_entries(arch).unwrap();
    for e in &mut entries {
        if let RawEntry::File { path, data, .. } = e
            && path == "bin/busybox"
        {
            *data = busybox.clone();
        }
    }
    let layer = env
        .images
        .layer(Format::Oci, Compression::Gzip, &entries)
        .unwrap();
    let config = if arch == "arm64" {
        ImageConfig::arm64("rpi-3-b")
    } else {
        ImageConfig::armv7("rpi-2-b")
    };
    env.images.image(Format::Oci, config, &[layer]).unwrap()
}
