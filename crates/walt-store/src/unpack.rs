//! Unpacking a layer tar stream into an overlay-ready directory.
//!
//! Entries are walked one by one (tar's own `unpack` is not used): paths
//! are normalised and confined to the layer root, nothing is ever written
//! through a symlink, OCI whiteouts become overlayfs whiteouts, and
//! ownership, modes, xattrs and mtimes are restored.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use filetime::FileTime;
use nix::sys::stat::{Mode, SFlag};
use tar::EntryType;

use crate::direct::{self, DIRECT_MIN_SIZE, DirectWriter, O_DIRECT};
use crate::error::{Result, StoreError};
use crate::util::BUF_SIZE;

const WHITEOUT_PREFIX: &[u8] = b".wh.";
const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";
const WHITEOUT_META_PREFIX: &[u8] = b".wh..wh.";
const XATTR_PAX_PREFIX: &str = "SCHILY.xattr.";
const OPAQUE_XATTR: &str = "trusted.overlay.opaque";

/// What unpacking produced.
#[derive(Debug, Default)]
pub(crate) struct UnpackStats {
    pub entries: u64,
}

/// Splits a raw tar path into safe components. An empty result means the
/// layer root itself (`./`).
fn normalize(raw: &[u8]) -> std::result::Result<Vec<&[u8]>, &'static str> {
    if raw.is_empty() {
        return Err("has an empty name");
    }
    if raw.contains(&0) {
        return Err("contains a NUL byte");
    }
    if raw[0] == b'/' {
        return Err("is an absolute path: it escapes the layer root");
    }
    let mut out = Vec::new();
    for c in raw.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err("escapes the layer root"),
            c => out.push(c),
        }
    }
    Ok(out)
}

fn rel_path(comps: &[&[u8]]) -> PathBuf {
    let mut p = PathBuf::new();
    for c in comps {
        p.push(OsStr::from_bytes(c));
    }
    p
}

/// Metadata of one entry, read from its header and PAX records.
struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: FileTime,
    xattrs: Vec<(String, Vec<u8>)>,
}

struct Unpacker<'a> {
    root: &'a Path,
    layer: &'a str,
    /// Directory mtimes, applied at the end, deepest first.
    dir_times: HashMap<PathBuf, FileTime>,
    /// The last parent directory verified to be a real directory chain.
    known_dir: Option<PathBuf>,
    buf: Vec<u8>,
    /// The aligned buffer of direct writes, kept from one file to the next.
    direct_buf: Vec<u8>,
}

/// Unpacks the tar stream `reader` into `root` (an existing, empty
/// directory). `layer` names the layer in error messages. The reader is
/// left just after the end-of-archive marker.
pub(crate) fn unpack<R: Read>(reader: R, root: &Path, layer: &str) -> Result<UnpackStats> {
    let mut archive = tar::Archive::new(reader);
    let mut u = Unpacker {
        root,
        layer,
        dir_times: HashMap::new(),
        known_dir: None,
        buf: vec![0u8; BUF_SIZE],
        direct_buf: Vec::new(),
    };
    let mut stats = UnpackStats::default();
    let entries = archive.entries().map_err(|e| u.stream_err(e))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| u.stream_err(e))?;
        u.entry(&mut entry)?;
        stats.entries += 1;
    }
    u.finish()?;
    Ok(stats)
}

impl Unpacker<'_> {
    fn stream_err(&self, e: io::Error) -> StoreError {
        StoreError::BadLayer {
            layer: self.layer.to_string(),
            reason: format!("cannot read the layer stream: {e}"),
        }
    }

    fn bad(&self, entry: &[u8], reason: impl Into<String>) -> StoreError {
        StoreError::BadEntry {
            layer: self.layer.to_string(),
            entry: String::from_utf8_lossy(entry).into_owned(),
            reason: reason.into(),
        }
    }

    fn fs_err(&self, what: &str, entry: &[u8], e: io::Error) -> StoreError {
        StoreError::Io {
            context: format!(
                "layer {}: {what} '{}'",
                self.layer,
                String::from_utf8_lossy(entry)
            ),
            source: e,
        }
    }

    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<()> {
        let raw = entry.path_bytes().into_owned();
        let comps = normalize(&raw).map_err(|r| self.bad(&raw, r))?;
        let header = entry.header();
        let mut kind = header.entry_type();
        let dev_major = header.device_major().ok().flatten().unwrap_or(0);
        let dev_minor = header.device_minor().ok().flatten().unwrap_or(0);
        if matches!(
            kind,
            EntryType::XGlobalHeader
                | EntryType::XHeader
                | EntryType::GNULongName
                | EntryType::GNULongLink
        ) {
            return Ok(());
        }
        if kind == EntryType::Regular && raw.ends_with(b"/") {
            // Old tars mark directories with a trailing slash only.
            kind = EntryType::Directory;
        }
        let meta = self.meta(entry, &raw)?;

        let Some((&last, parents)) = comps.split_last() else {
            // The layer root itself ("./").
            if kind == EntryType::Directory {
                let root = self.root.to_path_buf();
                self.apply_path_meta(&root, &meta, &raw)?;
                self.dir_times.insert(PathBuf::new(), meta.mtime);
                return Ok(());
            }
            return Err(self.bad(&raw, "does not name anything inside the layer"));
        };

        // Whiteouts.
        if last.starts_with(WHITEOUT_PREFIX) {
            let parent = self.ensure_parents(parents, &raw, true)?;
            if last == OPAQUE_MARKER {
                xattr::set(&parent, OPAQUE_XATTR, b"y")
                    .map_err(|e| self.fs_err("marking opaque the directory of", &raw, e))?;
            } else if last.starts_with(WHITEOUT_META_PREFIX) {
                tracing::debug!(layer = self.layer, entry = %String::from_utf8_lossy(&raw), "ignoring whiteout metadata entry");
            } else {
                let name = &last[WHITEOUT_PREFIX.len()..];
                if name.is_empty() || name == b"." || name == b".." {
                    return Err(self.bad(&raw, "is not a valid whiteout"));
                }
                let rel = rel_path(parents).join(OsStr::from_bytes(name));
                let path = self.root.join(&rel);
                self.remove_existing(&rel, &path)
                    .map_err(|e| self.fs_err("replacing", &raw, e))?;
                nix::sys::stat::mknod(&path, SFlag::S_IFCHR, Mode::empty(), 0)
                    .map_err(|e| self.fs_err("creating the whiteout for", &raw, e.into()))?;
                std::os::unix::fs::lchown(&path, Some(meta.uid), Some(meta.gid))
                    .map_err(|e| self.fs_err("setting the owner of", &raw, e))?;
            }
            self.drain_entry(entry, &raw)?;
            return Ok(());
        }

        let parent = self.ensure_parents(parents, &raw, true)?;
        let rel = rel_path(&comps);
        let path = parent.join(OsStr::from_bytes(last));

        match kind {
            EntryType::Directory => {
                match fs::symlink_metadata(&path) {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => {
                        self.remove_existing(&rel, &path)
                            .map_err(|e| self.fs_err("replacing", &raw, e))?;
                        fs::create_dir(&path)
                            .map_err(|e| self.fs_err("creating directory", &raw, e))?;
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        fs::create_dir(&path)
                            .map_err(|e| self.fs_err("creating directory", &raw, e))?;
                    }
                    Err(e) => return Err(self.fs_err("inspecting", &raw, e)),
                }
                self.apply_path_meta(&path, &meta, &raw)?;
                self.dir_times.insert(rel, meta.mtime);
            }
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                self.remove_existing(&rel, &path)
                    .map_err(|e| self.fs_err("replacing", &raw, e))?;
                let open = |extra: i32| {
                    OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | extra)
                        .open(&path)
                };
                let file = if entry.size() >= DIRECT_MIN_SIZE {
                    // Large files go around the page cache.
                    let (file, direct) = match open(O_DIRECT) {
                        Ok(f) => (f, true),
                        Err(e) if direct::unsupported(&e) => (
                            open(0).map_err(|e| self.fs_err("creating file", &raw, e))?,
                            false,
                        ),
                        Err(e) => return Err(self.fs_err("creating file", &raw, e)),
                    };
                    let buf = std::mem::take(&mut self.direct_buf);
                    let mut w = DirectWriter::with_buffer(file, direct, buf);
                    loop {
                        match w.fill_from(entry) {
                            Ok(0) => break,
                            Ok(_) => w
                                .write_full()
                                .map_err(|e| self.fs_err("writing", &raw, e))?,
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                            Err(e) => return Err(self.stream_err(e)),
                        }
                    }
                    let (file, buf) = w
                        .finish_reuse()
                        .map_err(|e| self.fs_err("writing", &raw, e))?;
                    self.direct_buf = buf;
                    file
                } else {
                    let mut file = open(0).map_err(|e| self.fs_err("creating file", &raw, e))?;
                    self.copy_data(entry, &mut file, &raw)?;
                    file
                };
                self.apply_file_meta(&file, &meta, &raw)?;
            }
            EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .map(|t| t.into_owned())
                    .filter(|t| !t.is_empty())
                    .ok_or_else(|| self.bad(&raw, "is a symlink without a target"))?;
                if target.contains(&0) {
                    return Err(self.bad(&raw, "has a symlink target containing a NUL byte"));
                }
                self.remove_existing(&rel, &path)
                    .map_err(|e| self.fs_err("replacing", &raw, e))?;
                std::os::unix::fs::symlink(OsStr::from_bytes(&target), &path)
                    .map_err(|e| self.fs_err("creating symlink", &raw, e))?;
                std::os::unix::fs::lchown(&path, Some(meta.uid), Some(meta.gid))
                    .map_err(|e| self.fs_err("setting the owner of", &raw, e))?;
                self.set_xattrs_path(&path, &meta, &raw)?;
                filetime::set_symlink_file_times(&path, meta.mtime, meta.mtime)
                    .map_err(|e| self.fs_err("setting the times of", &raw, e))?;
            }
            EntryType::Link => {
                let target_raw = entry
                    .link_name_bytes()
                    .map(|t| t.into_owned())
                    .unwrap_or_default();
                let tcomps = normalize(&target_raw).map_err(|r| {
                    self.bad(
                        &raw,
                        format!(
                            "is a hard link to '{}' which {r}",
                            String::from_utf8_lossy(&target_raw)
                        ),
                    )
                })?;
                let Some((&tlast, tparents)) = tcomps.split_last() else {
                    return Err(self.bad(&raw, "is a hard link to the layer root"));
                };
                if tcomps == comps {
                    // A link to itself: nothing to do.
                    return Ok(());
                }
                let tparent = self.ensure_parents(tparents, &raw, false)?;
                let tpath = tparent.join(OsStr::from_bytes(tlast));
                match fs::symlink_metadata(&tpath) {
                    Ok(m) if m.is_dir() => {
                        return Err(self.bad(
                            &raw,
                            format!(
                                "is a hard link to directory '{}'",
                                String::from_utf8_lossy(&target_raw)
                            ),
                        ));
                    }
                    Ok(_) => {}
                    Err(_) => {
                        return Err(self.bad(
                            &raw,
                            format!(
                                "is a hard link to '{}' which is not in the layer",
                                String::from_utf8_lossy(&target_raw)
                            ),
                        ));
                    }
                }
                self.remove_existing(&rel, &path)
                    .map_err(|e| self.fs_err("replacing", &raw, e))?;
                fs::hard_link(&tpath, &path)
                    .map_err(|e| self.fs_err("creating hard link", &raw, e))?;
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                let (sflag, dev) = match kind {
                    EntryType::Fifo => (SFlag::S_IFIFO, 0),
                    _ => {
                        let f = if kind == EntryType::Char {
                            SFlag::S_IFCHR
                        } else {
                            SFlag::S_IFBLK
                        };
                        (
                            f,
                            nix::sys::stat::makedev(dev_major.into(), dev_minor.into()),
                        )
                    }
                };
                self.remove_existing(&rel, &path)
                    .map_err(|e| self.fs_err("replacing", &raw, e))?;
                nix::sys::stat::mknod(&path, sflag, Mode::from_bits_truncate(0o600), dev)
                    .map_err(|e| self.fs_err("creating device node", &raw, e.into()))?;
                self.apply_path_meta(&path, &meta, &raw)?;
                filetime::set_symlink_file_times(&path, meta.mtime, meta.mtime)
                    .map_err(|e| self.fs_err("setting the times of", &raw, e))?;
            }
            other => {
                tracing::warn!(layer = self.layer, entry = %String::from_utf8_lossy(&raw), kind = ?other, "skipping tar entry of unsupported type");
            }
        }
        Ok(())
    }

    fn meta<R: Read>(&self, entry: &mut tar::Entry<'_, R>, raw: &[u8]) -> Result<Meta> {
        let h = entry.header();
        // Like other tar readers, take a blank numeric field as 0.
        let field = |what: &str, v: io::Result<u64>, bytes: &[u8]| match v {
            Ok(v) => Ok(v),
            Err(_) if bytes.iter().all(|&b| b == 0 || b == b' ') => Ok(0),
            Err(e) => Err(self.bad(raw, format!("has an invalid {what}: {e}"))),
        };
        let old = h.as_old();
        let mode = field("mode", h.mode().map(u64::from), &old.mode)? as u32 & 0o7777;
        let uid = field("uid", h.uid(), &old.uid)?;
        let gid = field("gid", h.gid(), &old.gid)?;
        let mtime_secs = h.mtime().unwrap_or(0);
        let (uid, gid) = (
            u32::try_from(uid).map_err(|_| self.bad(raw, "has a uid out of range"))?,
            u32::try_from(gid).map_err(|_| self.bad(raw, "has a gid out of range"))?,
        );
        let mut mtime = FileTime::from_unix_time(mtime_secs as i64, 0);
        let mut xattrs = Vec::new();
        if let Some(exts) = entry.pax_extensions().map_err(|e| self.stream_err(e))? {
            for ext in exts {
                let ext = ext.map_err(|e| self.stream_err(e))?;
                let Ok(key) = ext.key() else { continue };
                if let Some(name) = key.strip_prefix(XATTR_PAX_PREFIX) {
                    if name.starts_with("trusted.overlay.") {
                        tracing::debug!(
                            layer = self.layer,
                            xattr = name,
                            "ignoring overlay xattr from layer"
                        );
                        continue;
                    }
                    xattrs.push((name.to_string(), ext.value_bytes().to_vec()));
                } else if key == "mtime"
                    && let Some(t) = ext.value().ok().and_then(parse_pax_time)
                {
                    mtime = t;
                }
            }
        }
        Ok(Meta {
            mode,
            uid,
            gid,
            mtime,
            xattrs,
        })
    }

    /// Makes sure every parent component is a real directory (creating
    /// missing ones when `create`), never a symlink; returns the absolute
    /// parent path.
    fn ensure_parents(&mut self, parents: &[&[u8]], raw: &[u8], create: bool) -> Result<PathBuf> {
        let rel = rel_path(parents);
        if self.known_dir.as_deref() == Some(rel.as_path()) {
            return Ok(self.root.join(&rel));
        }
        let mut cur = self.root.to_path_buf();
        let mut sofar = PathBuf::new();
        for c in parents {
            cur.push(OsStr::from_bytes(c));
            sofar.push(OsStr::from_bytes(c));
            match fs::symlink_metadata(&cur) {
                Ok(m) if m.is_dir() => {}
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(
                        self.bad(raw, format!("goes through symlink '{}'", sofar.display()))
                    );
                }
                Ok(_) => {
                    return Err(self.bad(
                        raw,
                        format!(
                            "goes through '{}' which is not a directory",
                            sofar.display()
                        ),
                    ));
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
                    fs::create_dir(&cur)
                        .and_then(|()| fs::set_permissions(&cur, Permissions::from_mode(0o755)))
                        .map_err(|e| self.fs_err("creating the parent directories of", raw, e))?;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Err(self.bad(
                        raw,
                        format!("refers to '{}' which is not in the layer", sofar.display()),
                    ));
                }
                Err(e) => return Err(self.fs_err("inspecting the parents of", raw, e)),
            }
        }
        self.known_dir = Some(rel);
        Ok(cur)
    }

    /// Removes what is at `path` before it gets replaced, and forgets
    /// cached knowledge about it.
    fn remove_existing(&mut self, rel: &Path, path: &Path) -> io::Result<()> {
        match fs::symlink_metadata(path) {
            Ok(m) if m.is_dir() => {
                fs::remove_dir_all(path)?;
                self.dir_times.retain(|k, _| !k.starts_with(rel));
            }
            Ok(_) => fs::remove_file(path)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        }
        if self.known_dir.as_ref().is_some_and(|k| k.starts_with(rel)) {
            self.known_dir = None;
        }
        Ok(())
    }

    fn copy_data<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        file: &mut File,
        raw: &[u8],
    ) -> Result<()> {
        loop {
            let n = match entry.read(&mut self.buf) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.stream_err(e)),
            };
            file.write_all(&self.buf[..n])
                .map_err(|e| self.fs_err("writing", raw, e))?;
        }
    }

    fn drain_entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>, _raw: &[u8]) -> Result<()> {
        crate::util::drain(entry, &mut self.buf).map_err(|e| self.stream_err(e))?;
        Ok(())
    }

    /// Owner, mode and xattrs of a regular file, through its descriptor.
    fn apply_file_meta(&self, file: &File, meta: &Meta, raw: &[u8]) -> Result<()> {
        std::os::unix::fs::fchown(file, Some(meta.uid), Some(meta.gid))
            .map_err(|e| self.fs_err("setting the owner of", raw, e))?;
        file.set_permissions(Permissions::from_mode(meta.mode))
            .map_err(|e| self.fs_err("setting the mode of", raw, e))?;
        for (name, value) in &meta.xattrs {
            let r = xattr::FileExt::set_xattr(file, name, value);
            self.xattr_result(r, name, raw)?;
        }
        filetime::set_file_handle_times(file, Some(meta.mtime), Some(meta.mtime))
            .map_err(|e| self.fs_err("setting the times of", raw, e))?;
        Ok(())
    }

    /// Owner, mode and xattrs of a directory or device node (not symlinks).
    fn apply_path_meta(&self, path: &Path, meta: &Meta, raw: &[u8]) -> Result<()> {
        std::os::unix::fs::lchown(path, Some(meta.uid), Some(meta.gid))
            .map_err(|e| self.fs_err("setting the owner of", raw, e))?;
        fs::set_permissions(path, Permissions::from_mode(meta.mode))
            .map_err(|e| self.fs_err("setting the mode of", raw, e))?;
        self.set_xattrs_path(path, meta, raw)
    }

    fn set_xattrs_path(&self, path: &Path, meta: &Meta, raw: &[u8]) -> Result<()> {
        for (name, value) in &meta.xattrs {
            let r = xattr::set(path, name, value);
            self.xattr_result(r, name, raw)?;
        }
        Ok(())
    }

    fn xattr_result(&self, r: io::Result<()>, name: &str, raw: &[u8]) -> Result<()> {
        match r {
            Ok(()) => Ok(()),
            Err(e)
                if e.raw_os_error() == Some(libc::EOPNOTSUPP)
                    || (e.raw_os_error() == Some(libc::EPERM) && name.starts_with("user.")) =>
            {
                tracing::warn!(layer = self.layer, entry = %String::from_utf8_lossy(raw), xattr = name, error = %e, "xattr not supported here, skipped");
                Ok(())
            }
            Err(e) => Err(self.fs_err(&format!("setting xattr {name} on"), raw, e)),
        }
    }

    /// Directory mtimes, deepest first (writing children changed them).
    fn finish(&mut self) -> Result<()> {
        let mut dirs: Vec<(PathBuf, FileTime)> = self.dir_times.drain().collect();
        dirs.sort_by_key(|(p, _)| std::cmp::Reverse(p.components().count()));
        for (rel, t) in dirs {
            let path = self.root.join(&rel);
            filetime::set_symlink_file_times(&path, t, t).map_err(|e| StoreError::Io {
                context: format!(
                    "layer {}: setting the times of '{}'",
                    self.layer,
                    rel.display()
                ),
                source: e,
            })?;
        }
        Ok(())
    }
}

/// Parses a PAX time (`<secs>[.<fraction>]`).
fn parse_pax_time(s: &str) -> Option<FileTime> {
    let (secs, frac) = match s.split_once('.') {
        Some((a, b)) => (a, b),
        None => (s, ""),
    };
    let secs: i64 = secs.parse().ok()?;
    let mut nanos: u32 = 0;
    for (i, d) in frac.bytes().take(9).enumerate() {
        if !d.is_ascii_digit() {
            return None;
        }
        nanos += u32::from(d - b'0') * 10u32.pow(8 - i as u32);
    }
    if secs < 0 && nanos > 0 {
        // "-1.5" means 1.5 s before the epoch.
        return Some(FileTime::from_unix_time(secs - 1, 1_000_000_000 - nanos));
    }
    Some(FileTime::from_unix_time(secs, nanos))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_paths() {
        assert_eq!(normalize(b"./a/b").unwrap(), vec![&b"a"[..], b"b"]);
        assert_eq!(normalize(b"a//./b/").unwrap(), vec![&b"a"[..], b"b"]);
        assert!(normalize(b"./").unwrap().is_empty());
        assert_eq!(normalize(b"../x"), Err("escapes the layer root"));
        assert_eq!(normalize(b"a/../../x"), Err("escapes the layer root"));
        assert_eq!(
            normalize(b"/etc"),
            Err("is an absolute path: it escapes the layer root")
        );
        assert_eq!(normalize(b""), Err("has an empty name"));
        assert_eq!(normalize(b"a\0b"), Err("contains a NUL byte"));
    }

    #[test]
    fn pax_times() {
        assert_eq!(parse_pax_time("12"), Some(FileTime::from_unix_time(12, 0)));
        assert_eq!(
            parse_pax_time("12.5"),
            Some(FileTime::from_unix_time(12, 500_000_000))
        );
        assert_eq!(parse_pax_time("x"), None);
    }
}
