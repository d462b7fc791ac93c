//! `walt image cp` inside the image: tar out of / into a chroot of the merged root.
//! Errors are returned as one line (the sandbox prints it on stderr).

use std::collections::HashMap;
use std::ffi::{CString, OsStr, OsString};
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use filetime::FileTime;
use tar::{EntryType, Header, HeaderMode};

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

fn skip_xattr(name: &OsStr) -> bool {
    name.as_bytes().starts_with(b"trusted.overlay.")
}

// ---------------------------------------------------------------------------------------
// TarOut

pub(crate) fn tar_out(path: &str) -> Result<(), String> {
    let p = in_image(path);
    let meta = fs::metadata(&p).map_err(|e| format!("{path}: {}", errstr(&e)))?;
    let name = top_name(&p);
    let out = BufWriter::with_capacity(256 * 1024, io::stdout().lock());
    let mut b = tar::Builder::new(out);
    let mut links = HashMap::new();
    let mut w = Walker {
        b: &mut b,
        links: &mut links,
    };
    w.entry(&p, &meta, Path::new(&name), true)
        .map_err(|e| format!("{path}: {e}"))?;
    if meta.is_dir() {
        w.walk(&p, Path::new(&name)).map_err(|e| e.to_string())?;
    }
    let mut out = b
        .into_inner()
        .map_err(|e| format!("writing the archive: {}", errstr(&e)))?;
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

struct Walker<'a, W: Write> {
    b: &'a mut tar::Builder<W>,
    links: &'a mut HashMap<(u64, u64), PathBuf>,
}

impl<W: Write> Walker<'_, W> {
    fn walk(&mut self, dir: &Path, tar_dir: &Path) -> Result<(), String> {
        let rd = fs::read_dir(dir).map_err(|e| format!("{}: {}", dir.display(), errstr(&e)))?;
        let mut names: Vec<OsString> = rd.filter_map(|e| e.ok().map(|e| e.file_name())).collect();
        names.sort();
        for n in names {
            let p = dir.join(&n);
            let t = tar_dir.join(&n);
            let meta = match fs::symlink_metadata(&p) {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(format!("{}: {}", p.display(), errstr(&e))),
            };
            self.entry(&p, &meta, &t, false)
                .map_err(|e| format!("{}: {e}", p.display()))?;
            if meta.is_dir() {
                self.walk(&p, &t)?;
            }
        }
        Ok(())
    }

    fn entry(
        &mut self,
        p: &Path,
        meta: &fs::Metadata,
        t: &Path,
        follow: bool,
    ) -> Result<(), String> {
        use std::os::unix::fs::FileTypeExt;
        let ft = meta.file_type();
        if ft.is_socket() {
            return Ok(());
        }
        let io = |e: io::Error| errstr(&e);
        let mut h = Header::new_gnu();
        h.set_metadata_in_mode(meta, HeaderMode::Complete);
        h.set_size(0);
        // xattrs, as PAX SCHILY.xattr records
        let names = if follow {
            xattr::list_deref(p)
        } else {
            xattr::list(p)
        };
        let mut pax: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        if let Ok(names) = names {
            for n in names {
                if skip_xattr(&n) {
                    continue;
                }
                let v = if follow {
                    xattr::get_deref(p, &n)
                } else {
                    xattr::get(p, &n)
                };
                if let Ok(Some(v)) = v {
                    let mut k = b"SCHILY.xattr.".to_vec();
                    k.extend_from_slice(n.as_bytes());
                    pax.push((k, v));
                }
            }
        }
        if !pax.is_empty() {
            let data = pax_records(&pax);
            let mut ph = Header::new_ustar();
            ph.set_entry_type(EntryType::XHeader);
            ph.set_path("././@PaxHeader").map_err(io)?;
            ph.set_mode(0o644);
            ph.set_size(data.len() as u64);
            ph.set_cksum();
            self.b.append(&ph, data.as_slice()).map_err(io)?;
        }
        if ft.is_file() {
            if meta.nlink() > 1 {
                let key = (meta.dev(), meta.ino());
                if let Some(first) = self.links.get(&key) {
                    h.set_entry_type(EntryType::Link);
                    return self.b.append_link(&mut h, t, first).map_err(io);
                }
                self.links.insert(key, t.to_path_buf());
            }
            let f = File::open(p).map_err(io)?;
            h.set_size(meta.len());
            // A file that shrinks while we read must not corrupt the archive.
            let r = f.take(meta.len()).chain(io::repeat(0).take(meta.len()));
            self.b
                .append_data(&mut h, t, r.take(meta.len()))
                .map_err(io)
        } else if ft.is_dir() {
            self.b.append_data(&mut h, t, io::empty()).map_err(io)
        } else if ft.is_symlink() {
            let target = fs::read_link(p).map_err(io)?;
            self.b.append_link(&mut h, t, target).map_err(io)
        } else {
            // char / block devices, fifos
            let rdev = meta.rdev();
            h.set_device_major(libc::major(rdev)).map_err(io)?;
            h.set_device_minor(libc::minor(rdev)).map_err(io)?;
            self.b.append_data(&mut h, t, io::empty()).map_err(io)
        }
    }
}

fn pax_records(recs: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in recs {
        let base = k.len() + v.len() + 3; // ' ', '=', '\n'
        let mut len = base + 1;
        while len != base + len.to_string().len() {
            len = base + len.to_string().len();
        }
        out.extend_from_slice(len.to_string().as_bytes());
        out.push(b' ');
        out.extend_from_slice(k);
        out.push(b'=');
        out.extend_from_slice(v);
        out.push(b'\n');
    }
    out
}

// ---------------------------------------------------------------------------------------
// TarIn

/// Components of an archive path, refusing `..`, absolute paths and empty ones.
fn components(p: &Path) -> Result<Vec<OsString>, String> {
    let mut v = Vec::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => v.push(n.to_os_string()),
            Component::CurDir => {}
            Component::ParentDir => {
                return Err(format!(
                    "refusing archive entry '{}': path contains '..'",
                    p.display()
                ));
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(format!(
                    "refusing archive entry '{}': absolute path",
                    p.display()
                ));
            }
        }
    }
    if v.is_empty() {
        return Err(format!(
            "refusing archive entry '{}': empty path",
            p.display()
        ));
    }
    Ok(v)
}

/// Reads the archive from stdin and extracts it in one pass (no copy of
/// it): each entry is checked before it is written. A refused archive may
/// leave the entries before the bad one in the session's upper directory,
/// which the caller discards when the job fails.
pub(crate) fn tar_in(dest: &str) -> Result<(), String> {
    // SAFETY: plain syscall.
    unsafe {
        libc::umask(0);
    }
    let stdin = io::stdin().lock();
    let mut ar = tar::Archive::new(io::BufReader::with_capacity(1 << 20, stdin));
    let mut top: Option<OsString> = None;
    let mut source_is_dir = false;
    let mut target = PathBuf::new();
    let mut dirs: Vec<(PathBuf, u32, i64, Xattrs)> = Vec::new();
    for entry in ar
        .entries()
        .map_err(|e| format!("bad archive: {}", errstr(&e)))?
    {
        let mut entry = entry.map_err(|e| format!("bad archive: {}", errstr(&e)))?;
        // A pax global header (`git archive` starts with one) is not a file: skip it before
        // it can be taken as the top entry.
        if entry.header().entry_type() == EntryType::XGlobalHeader {
            continue;
        }
        let path = entry
            .path()
            .map_err(|e| format!("bad archive: {}", errstr(&e)))?
            .into_owned();
        let comps = components(&path)?;
        let kind = entry.header().entry_type();
        match &top {
            None => {
                top = Some(comps[0].clone());
                source_is_dir = kind.is_dir() || comps.len() > 1;
                target = destination(dest, &comps[0], source_is_dir)?;
            }
            Some(t) if *t != comps[0] => {
                return Err(format!(
                    "refusing archive: more than one top-level entry ('{}' and '{}')",
                    Path::new(t).display(),
                    Path::new(&comps[0]).display()
                ));
            }
            Some(t) if !source_is_dir => {
                return Err(format!(
                    "refusing archive: '{}' follows the non-directory '{}'",
                    path.display(),
                    Path::new(t).display()
                ));
            }
            Some(_) => {}
        }
        if comps.len() == 1 && source_is_dir && !kind.is_dir() {
            return Err(format!(
                "refusing archive: top-level entry '{}' is not a directory",
                path.display()
            ));
        }
        match kind {
            EntryType::Regular
            | EntryType::Continuous
            | EntryType::GNUSparse
            | EntryType::Directory
            | EntryType::Symlink
            | EntryType::Char
            | EntryType::Block
            | EntryType::Fifo => {}
            EntryType::Link => {
                let t = entry
                    .link_name()
                    .map_err(|e| format!("bad archive: {}", errstr(&e)))?
                    .ok_or_else(|| format!("hard link '{}' without a target", path.display()))?;
                let tc = components(&t)?;
                if Some(&tc[0]) != top.as_ref() || tc.len() < 2 && source_is_dir {
                    return Err(format!(
                        "refusing hard link '{}' -> '{}': target outside the copied tree",
                        path.display(),
                        t.display()
                    ));
                }
            }
            other => {
                return Err(format!(
                    "refusing archive entry '{}': unsupported type {other:?}",
                    path.display()
                ));
            }
        }
        let map = |c: &[OsString]| -> PathBuf {
            let mut out = target.clone();
            for x in &c[1..] {
                out.push(x);
            }
            out
        };
        let dst = map(&comps);
        let h = entry.header().clone();
        let mode = h.mode().unwrap_or(0o644) & 0o7777;
        let uid = h.uid().unwrap_or(0) as u32;
        let gid = h.gid().unwrap_or(0) as u32;
        let mtime = h.mtime().unwrap_or(0) as i64;
        let mut xattrs: Vec<(OsString, Vec<u8>)> = Vec::new();
        if let Ok(Some(exts)) = entry.pax_extensions() {
            for ext in exts.flatten() {
                if let Some(name) = ext.key_bytes().strip_prefix(b"SCHILY.xattr.") {
                    let name = OsStr::from_bytes(name);
                    if !skip_xattr(name) {
                        xattrs.push((name.to_os_string(), ext.value_bytes().to_vec()));
                    }
                }
            }
        }
        let fail = |what: &str, e: io::Error| format!("{}: {what}: {}", dst.display(), errstr(&e));
        let existing = fs::symlink_metadata(&dst).ok();
        if kind.is_dir() {
            match existing {
                Some(m) if m.is_dir() => {}
                Some(_) => {
                    fs::remove_file(&dst).map_err(|e| fail("remove", e))?;
                    fs::create_dir(&dst).map_err(|e| fail("mkdir", e))?;
                }
                None => fs::create_dir(&dst).map_err(|e| fail("mkdir", e))?,
            }
            lchown(&dst, uid, gid).map_err(|e| fail("chown", e))?;
            dirs.push((dst, mode, mtime, xattrs));
            continue;
        }
        if let Some(m) = existing {
            if m.is_dir() {
                return Err(format!(
                    "cannot overwrite directory '{}' with non-directory",
                    dst.display()
                ));
            }
            fs::remove_file(&dst).map_err(|e| fail("remove", e))?;
        }
        match kind {
            EntryType::Symlink => {
                let t = entry
                    .link_name()
                    .map_err(|e| errstr(&e))?
                    .ok_or_else(|| format!("symlink '{}' without a target", path.display()))?;
                std::os::unix::fs::symlink(&t, &dst).map_err(|e| fail("symlink", e))?;
                lchown(&dst, uid, gid).map_err(|e| fail("chown", e))?;
                set_xattrs(&dst, &xattrs)?;
                let ft = FileTime::from_unix_time(mtime, 0);
                filetime::set_symlink_file_times(&dst, ft, ft).map_err(|e| fail("utimes", e))?;
            }
            EntryType::Link => {
                let t = entry
                    .link_name()
                    .map_err(|e| errstr(&e))?
                    .ok_or_else(|| format!("hard link '{}' without a target", path.display()))?;
                let src = map(&components(&t)?);
                fs::hard_link(&src, &dst).map_err(|e| fail("link", e))?;
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                let ty = match kind {
                    EntryType::Char => libc::S_IFCHR,
                    EntryType::Block => libc::S_IFBLK,
                    _ => libc::S_IFIFO,
                };
                let dev = libc::makedev(
                    h.device_major().ok().flatten().unwrap_or(0),
                    h.device_minor().ok().flatten().unwrap_or(0),
                );
                let c = CString::new(dst.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
                // SAFETY: valid path.
                if unsafe { libc::mknod(c.as_ptr(), ty | (mode & 0o777), dev) } < 0 {
                    return Err(fail("mknod", io::Error::last_os_error()));
                }
                lchown(&dst, uid, gid).map_err(|e| fail("chown", e))?;
                fs::set_permissions(&dst, fs::Permissions::from_mode(mode))
                    .map_err(|e| fail("chmod", e))?;
                set_xattrs(&dst, &xattrs)?;
                let ft = FileTime::from_unix_time(mtime, 0);
                filetime::set_symlink_file_times(&dst, ft, ft).map_err(|e| fail("utimes", e))?;
            }
            _ => {
                use std::os::unix::fs::OpenOptionsExt;
                let mut f = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&dst)
                    .map_err(|e| fail("create", e))?;
                io::copy(&mut entry, &mut f).map_err(|e| fail("write", e))?;
                std::os::unix::fs::fchown(&f, Some(uid), Some(gid))
                    .map_err(|e| fail("chown", e))?;
                f.set_permissions(fs::Permissions::from_mode(mode))
                    .map_err(|e| fail("chmod", e))?;
                set_xattrs(&dst, &xattrs)?;
                let ft = FileTime::from_unix_time(mtime, 0);
                filetime::set_file_handle_times(&f, Some(ft), Some(ft))
                    .map_err(|e| fail("utimes", e))?;
            }
        }
    }
    if top.is_none() {
        return Err("empty archive".into());
    }
    // Directories last: their children changed their mtime, and a read-only mode must
    // not get in the way of filling them.
    for (dst, mode, mtime, xattrs) in dirs.into_iter().rev() {
        let fail = |what: &str, e: io::Error| format!("{}: {what}: {}", dst.display(), errstr(&e));
        fs::set_permissions(&dst, fs::Permissions::from_mode(mode))
            .map_err(|e| fail("chmod", e))?;
        set_xattrs(&dst, &xattrs)?;
        let ft = FileTime::from_unix_time(mtime, 0);
        filetime::set_symlink_file_times(&dst, ft, ft).map_err(|e| fail("utimes", e))?;
    }
    Ok(())
}

type Xattrs = Vec<(OsString, Vec<u8>)>;

/// Where the top entry `top` lands for destination `dest`, like `cp -r` /
/// `scp`: inside `dest` when it is a directory, else `dest` itself (its
/// parent must exist).
fn destination(dest: &str, top: &OsStr, source_is_dir: bool) -> Result<PathBuf, String> {
    let d = in_image(dest);
    let target = match fs::metadata(&d) {
        Ok(m) if m.is_dir() => d.join(top),
        Ok(_) if dest.ends_with('/') => return Err(format!("{dest}: Not a directory")),
        Ok(_) => d.clone(),
        Err(_) if dest.ends_with('/') => return Err(format!("{dest}: Not a directory")),
        Err(_) => match d.parent().map(fs::metadata) {
            Some(Ok(pm)) if pm.is_dir() => d.clone(),
            _ => return Err(format!("{dest}: No such file or directory")),
        },
    };
    match fs::metadata(&target) {
        Ok(m) if source_is_dir && !m.is_dir() => Err(format!(
            "cannot overwrite non-directory '{}' with directory '{}'",
            target.display(),
            Path::new(top).display()
        )),
        Ok(m) if !source_is_dir && m.is_dir() => Err(format!(
            "cannot overwrite directory '{}' with non-directory '{}'",
            target.display(),
            Path::new(top).display()
        )),
        _ => Ok(target),
    }
}

fn lchown(p: &Path, uid: u32, gid: u32) -> io::Result<()> {
    std::os::unix::fs::lchown(p, Some(uid), Some(gid))
}

fn set_xattrs(p: &Path, xattrs: &[(OsString, Vec<u8>)]) -> Result<(), String> {
    for (k, v) in xattrs {
        xattr::set(p, k, v).map_err(|e| {
            format!(
                "{}: setting xattr {}: {}",
                p.display(),
                k.to_string_lossy(),
                errstr(&e)
            )
        })?;
    }
    Ok(())
}
