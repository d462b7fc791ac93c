//! The one tree writer: a directory tree as a tar stream.
//!
//! Entries come depth-first, names in byte order; a file whose inode was
//! already written becomes a hard link to its first name; what a header
//! cannot hold goes in PAX records. The walk is iterative and holds one
//! directory descriptor (down by name with `O_NOFOLLOW`, back up with
//! ".."), so that the depth of a tree costs neither stack nor descriptors.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{OFlag, openat};
use nix::sys::stat::{FileStat, Mode, SFlag};

use crate::error::{Error, Result, lossy};
use crate::fsops::{self, DIR_FLAGS};
use crate::read::Kind;
use crate::write::{Builder, HeaderSpec};
use crate::{OPAQUE_MARKER, OPAQUE_XATTR, OVERLAY_XATTR_PREFIX};

/// Whiteouts in the tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TreeWhiteouts {
    /// Written as they are.
    Keep,
    /// The tree is an overlay layer: a whiteout (char device 0:0) `a/b`
    /// becomes an empty file `a/.wh.b`, an opaque directory `d` is followed
    /// by an empty file `d/.wh..wh..opq`.
    OverlayToOci,
}

/// Owners written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TreeOwners {
    Keep,
    /// Every entry owned by uid/gid, with these user and group names.
    Fixed {
        uid: u32,
        gid: u32,
        uname: String,
        gname: String,
    },
}

/// What differs between the tree writer's users.
#[derive(Debug, Clone)]
pub struct TreeOptions {
    pub whiteouts: TreeWhiteouts,
    /// The name of the root entry, its content below it (`cp`); None: the
    /// root is `.` and the content at the top level (a layer).
    pub top: Option<OsString>,
    /// Follow the root when it is a symlink (`cp` of a symlink operand).
    pub follow_top: bool,
    pub owners: TreeOwners,
    /// Write xattrs as `SCHILY.xattr.*` records (`trusted.overlay.*`
    /// never).
    pub xattrs: bool,
    /// Write files with holes as PAX sparse entries.
    pub sparse: bool,
}

impl Default for TreeOptions {
    fn default() -> Self {
        TreeOptions {
            whiteouts: TreeWhiteouts::Keep,
            top: None,
            follow_top: false,
            owners: TreeOwners::Keep,
            xattrs: true,
            sparse: true,
        }
    }
}

/// What the writer skipped.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TreeStats {
    pub entries: u64,
    /// Sockets (a tar cannot hold them), as paths below the root.
    pub skipped_sockets: Vec<String>,
    /// Files whose size changed while they were read (written padded or
    /// cut to the size first seen).
    pub changed_files: Vec<String>,
}

struct Frame {
    names: Vec<Vec<u8>>,
    next: usize,
    /// Length of the archive name prefix of this directory.
    rel_len: usize,
    /// Device and inode of the directory, checked when the walk comes
    /// back up to it with "..".
    id: (u64, u64),
}

/// `rel` shortened for a message: its first components.
fn shorten(rel: &[u8]) -> String {
    const SHOWN: usize = 120;
    if rel.len() <= SHOWN {
        return lossy(rel);
    }
    let cut = rel[..SHOWN]
        .iter()
        .rposition(|&b| b == b'/')
        .unwrap_or(SHOWN);
    format!("{}/...", lossy(&rel[..cut]))
}

struct Walker<'o, W: Write> {
    b: Builder<W>,
    opts: &'o TreeOptions,
    root_path: PathBuf,
    links: HashMap<(u64, u64), Vec<u8>>,
    stats: TreeStats,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Writes the tree at `root` to `out` (then the end-of-archive marker);
/// returns the output and what was skipped.
pub fn write_tree<W: Write>(out: W, root: &Path, opts: &TreeOptions) -> Result<(W, TreeStats)> {
    let mut w = Walker {
        b: Builder::new(out),
        opts,
        root_path: root.to_path_buf(),
        links: HashMap::new(),
        stats: TreeStats::default(),
        xattrs: Vec::new(),
    };
    let tree = |what: &str, path: &Path, e: io::Error| Error::Tree {
        what: what.into(),
        path: path.display().to_string(),
        source: e,
    };
    let st = if opts.follow_top {
        nix::sys::stat::stat(root)
    } else {
        nix::sys::stat::lstat(root)
    }
    .map_err(|e| tree("inspecting", root, e.into()))?;
    let mut rel: Vec<u8> = match &opts.top {
        Some(t) => t.as_bytes().to_vec(),
        None => b".".to_vec(),
    };
    let top_is_dir = fsops::is_dir(&st);
    if !top_is_dir {
        // One entry: open it by path (following when asked).
        let parent_path = root.parent().filter(|p| !p.as_os_str().is_empty());
        let parent = nix::fcntl::open(
            parent_path.unwrap_or(Path::new(".")),
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| tree("opening", root, e.into()))?;
        let name = root.file_name().map(|n| n.as_bytes()).unwrap_or(b".");
        w.entry(parent.as_fd(), name, &st, &rel, opts.follow_top)?;
        let out = w.b.finish().map_err(Error::Write)?;
        return Ok((out, w.stats));
    }
    let dir = nix::fcntl::open(
        root,
        OFlag::O_RDONLY
            | OFlag::O_DIRECTORY
            | OFlag::O_CLOEXEC
            | if opts.follow_top {
                OFlag::empty()
            } else {
                OFlag::O_NOFOLLOW
            },
        Mode::empty(),
    )
    .map_err(|e| tree("opening", root, e.into()))?;
    let mut cur = File::from(dir);
    w.dir_entry(&cur, &st, &rel)?;
    let mut stack = vec![Frame {
        names: list(&cur).map_err(|e| tree("listing", root, e))?,
        next: 0,
        rel_len: rel.len(),
        id: (st.st_dev, st.st_ino),
    }];
    if opts.top.is_none() {
        // Top-level names are written without "./".
        rel.clear();
        stack[0].rel_len = 0;
    }
    while let Some(frame) = stack.last_mut() {
        if frame.next == frame.names.len() {
            stack.pop();
            if let Some(up) = stack.last() {
                let parent = openat(&cur, "..", DIR_FLAGS, Mode::empty())
                    .map_err(|e| w.tree_err("going back up from", &rel, e.into()))?;
                let got = fsops::fstat_path_fd(parent.as_fd())
                    .map_err(|e| w.tree_err("going back up from", &rel, e))?;
                if (got.st_dev, got.st_ino) != up.id {
                    return Err(w.tree_err(
                        "going back up from",
                        &rel,
                        io::Error::other("the tree was moved while it was read"),
                    ));
                }
                cur = File::from(parent);
                rel.truncate(up.rel_len);
            }
            continue;
        }
        let name = std::mem::take(&mut frame.names[frame.next]);
        frame.next += 1;
        let base = frame.rel_len;
        rel.truncate(base);
        if !rel.is_empty() {
            rel.push(b'/');
        }
        rel.extend_from_slice(&name);
        if rel.len() > crate::MAX_PATH {
            return Err(Error::PathTooLong {
                path: shorten(&rel),
                depth: stack.len(),
                limit: crate::MAX_PATH,
            });
        }
        let st = match fsops::lstat_at(cur.as_fd(), &name) {
            Ok(st) => st,
            // Gone since the listing.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(w.tree_err("inspecting", &rel, e)),
        };
        if fsops::is_dir(&st) {
            let fd = match openat(&cur, name.as_slice(), DIR_FLAGS, Mode::empty()) {
                Ok(fd) => File::from(fd),
                Err(Errno::ENOENT) => continue,
                Err(e) => return Err(w.tree_err("opening", &rel, e.into())),
            };
            w.dir_entry(&fd, &st, &rel)?;
            let names = list(&fd).map_err(|e| w.tree_err("listing", &rel, e))?;
            cur = fd;
            stack.push(Frame {
                names,
                next: 0,
                rel_len: rel.len(),
                id: (st.st_dev, st.st_ino),
            });
        } else {
            w.entry(cur.as_fd(), &name, &st, &rel, false)?;
        }
    }
    let out = w.b.finish().map_err(Error::Write)?;
    Ok((out, w.stats))
}

/// The names in a directory, in byte order.
fn list(dir: &File) -> io::Result<Vec<Vec<u8>>> {
    let mut d = nix::dir::Dir::from_fd(dir.as_fd().try_clone_to_owned()?)?;
    let mut names = Vec::new();
    for ent in d.iter() {
        let ent = ent?;
        let n = ent.file_name().to_bytes();
        if n != b"." && n != b".." {
            names.push(n.to_vec());
        }
    }
    names.sort_unstable();
    Ok(names)
}

fn file_kind(st: &FileStat) -> SFlag {
    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT
}

impl<W: Write> Walker<'_, W> {
    fn tree_err(&self, what: &str, rel: &[u8], e: io::Error) -> Error {
        Error::Tree {
            what: what.into(),
            path: lossy(rel),
            source: e,
        }
    }

    fn spec<'s>(&self, path: &'s [u8], kind: Kind, st: &FileStat) -> HeaderSpec<'s> {
        let mut h = HeaderSpec::new(path, kind);
        h.mode = st.st_mode & 0o7777;
        match &self.opts.owners {
            TreeOwners::Keep => {
                h.uid = u64::from(st.st_uid);
                h.gid = u64::from(st.st_gid);
            }
            TreeOwners::Fixed { uid, gid, .. } => {
                h.uid = u64::from(*uid);
                h.gid = u64::from(*gid);
            }
        }
        h.mtime = st.st_mtime;
        h.mtime_nsec = st.st_mtime_nsec as u32;
        h
    }

    fn names(&self) -> (&[u8], &[u8]) {
        match &self.opts.owners {
            TreeOwners::Keep => (b"", b""),
            TreeOwners::Fixed { uname, gname, .. } => (uname.as_bytes(), gname.as_bytes()),
        }
    }

    /// Reads the xattrs to write (sorted, `trusted.overlay.*` left out).
    fn read_xattrs(
        &mut self,
        f: Option<&File>,
        path: impl FnOnce() -> PathBuf,
        follow: bool,
    ) -> io::Result<()> {
        self.xattrs.clear();
        if !self.opts.xattrs {
            return Ok(());
        }
        let (names, p) = match f {
            Some(f) => (xattr::FileExt::list_xattr(f), None),
            None => {
                let p = path();
                let l = if follow {
                    xattr::list_deref(&p)
                } else {
                    xattr::list(&p)
                };
                (l, Some(p))
            }
        };
        let names: Vec<OsString> = match names {
            Ok(n) => n.collect(),
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => return Ok(()),
            Err(e) => return Err(e),
        };
        for n in names {
            if n.as_bytes().starts_with(OVERLAY_XATTR_PREFIX) {
                continue;
            }
            let v = match (f, &p) {
                (Some(f), _) => xattr::FileExt::get_xattr(f, &n)?,
                (None, Some(p)) if follow => xattr::get_deref(p, &n)?,
                (None, Some(p)) => xattr::get(p, &n)?,
                (None, None) => None,
            };
            if let Some(v) = v {
                self.xattrs.push((n.as_bytes().to_vec(), v));
            }
        }
        self.xattrs.sort();
        Ok(())
    }

    fn dir_entry(&mut self, dir: &File, st: &FileStat, rel: &[u8]) -> Result<()> {
        self.read_xattrs(Some(dir), PathBuf::new, false)
            .map_err(|e| self.tree_err("reading the xattrs of", rel, e))?;
        let xattrs = std::mem::take(&mut self.xattrs);
        let (un, gn) = self.names();
        let (un, gn) = (un.to_vec(), gn.to_vec());
        let mut h = self.spec(rel, Kind::Directory, st);
        h.uname = &un;
        h.gname = &gn;
        h.xattrs = &xattrs;
        self.b.append(&h, &mut io::empty()).map_err(Error::Write)?;
        self.stats.entries += 1;
        if self.opts.whiteouts == TreeWhiteouts::OverlayToOci {
            let opaque = xattr::FileExt::get_xattr(dir, OPAQUE_XATTR)
                .map_err(|e| self.tree_err("reading the xattrs of", rel, e))?
                .is_some_and(|v| v == b"y");
            if opaque {
                let mut marker = Vec::with_capacity(rel.len() + 13);
                if rel != b"." {
                    marker.extend_from_slice(rel);
                    marker.push(b'/');
                }
                marker.extend_from_slice(OPAQUE_MARKER);
                self.marker(&marker, st)?;
            }
        }
        self.xattrs = xattrs;
        Ok(())
    }

    /// An empty regular file (whiteout or opaque marker) with the owner and
    /// mtime of `st`.
    fn marker(&mut self, path: &[u8], st: &FileStat) -> Result<()> {
        let (un, gn) = self.names();
        let (un, gn) = (un.to_vec(), gn.to_vec());
        let mut h = self.spec(path, Kind::File, st);
        h.mode = 0o600;
        h.uname = &un;
        h.gname = &gn;
        self.b.append(&h, &mut io::empty()).map_err(Error::Write)?;
        self.stats.entries += 1;
        Ok(())
    }

    /// A non-directory entry `name` of `dir` (archive name `rel`).
    fn entry(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &[u8],
        st: &FileStat,
        rel: &[u8],
        follow: bool,
    ) -> Result<()> {
        let kind = file_kind(st);
        // The full path, for path-only calls where /proc is missing.
        let full = || {
            let below: &[u8] = match &self.opts.top {
                Some(_) => rel.splitn(2, |&b| b == b'/').nth(1).unwrap_or(b""),
                None if rel == b"." => b"",
                None => rel,
            };
            let mut p = self.root_path.clone();
            if !below.is_empty() {
                p.push(OsStr::from_bytes(below));
            }
            p
        };
        if self.opts.whiteouts == TreeWhiteouts::OverlayToOci
            && kind == SFlag::S_IFCHR
            && st.st_rdev == 0
        {
            let mut marker = Vec::with_capacity(rel.len() + 4);
            let (parent, base) = match rel.iter().rposition(|&b| b == b'/') {
                Some(i) => (&rel[..=i], &rel[i + 1..]),
                None => (&b""[..], rel),
            };
            marker.extend_from_slice(parent);
            marker.extend_from_slice(crate::WHITEOUT_PREFIX);
            marker.extend_from_slice(base);
            return self.marker(&marker, st);
        }
        let (un, gn) = self.names();
        let (un, gn) = (un.to_vec(), gn.to_vec());
        match kind {
            SFlag::S_IFREG => {
                let flags = OFlag::O_RDONLY
                    | OFlag::O_CLOEXEC
                    | if follow {
                        OFlag::empty()
                    } else {
                        OFlag::O_NOFOLLOW
                    };
                let fd = match openat(dir, name, flags, Mode::empty()) {
                    Ok(fd) => fd,
                    Err(Errno::ENOENT) => return Ok(()),
                    Err(e) => return Err(self.tree_err("opening", rel, e.into())),
                };
                let file = File::from(fd);
                self.read_xattrs(Some(&file), PathBuf::new, false)
                    .map_err(|e| self.tree_err("reading the xattrs of", rel, e))?;
                let xattrs = std::mem::take(&mut self.xattrs);
                let mut h = self.spec(rel, Kind::File, st);
                h.uname = &un;
                h.gname = &gn;
                h.xattrs = &xattrs;
                let key = (st.st_dev, st.st_ino);
                if st.st_nlink > 1 {
                    if let Some(first) = self.links.get(&key) {
                        let first = first.clone();
                        h.kind = Kind::HardLink;
                        h.link = &first;
                        h.xattrs = &[];
                        self.b.append(&h, &mut io::empty()).map_err(Error::Write)?;
                        self.stats.entries += 1;
                        self.xattrs = xattrs;
                        return Ok(());
                    }
                    self.links.insert(key, rel.to_vec());
                }
                let size = st.st_size as u64;
                h.size = size;
                let map = if self.opts.sparse && (st.st_blocks as u64) * 512 < size {
                    holes(&file, size).map_err(|e| self.tree_err("reading", rel, e))?
                } else {
                    None
                };
                let complete = match &map {
                    Some(m) => {
                        h.sparse = Some(m);
                        let mut r = Segments {
                            file: &file,
                            map: m,
                            i: 0,
                            done: 0,
                        };
                        self.b.append(&h, &mut r)
                    }
                    None => {
                        let mut f = &file;
                        self.b.append(&h, &mut f)
                    }
                }
                .map_err(|e| self.tree_err("reading", rel, e))?;
                if !complete {
                    self.stats.changed_files.push(lossy(rel));
                }
                self.xattrs = xattrs;
            }
            SFlag::S_IFLNK => {
                let target = nix::fcntl::readlinkat(dir, name)
                    .map_err(|e| self.tree_err("reading symlink", rel, e.into()))?;
                let path = fsops::at_path(dir, name, full);
                self.read_xattrs(None, || path, false)
                    .map_err(|e| self.tree_err("reading the xattrs of", rel, e))?;
                let xattrs = std::mem::take(&mut self.xattrs);
                let mut h = self.spec(rel, Kind::Symlink, st);
                h.uname = &un;
                h.gname = &gn;
                h.link = target.as_bytes();
                h.xattrs = &xattrs;
                self.b.append(&h, &mut io::empty()).map_err(Error::Write)?;
                self.xattrs = xattrs;
            }
            SFlag::S_IFCHR | SFlag::S_IFBLK | SFlag::S_IFIFO => {
                let k = match kind {
                    SFlag::S_IFCHR => Kind::CharDevice,
                    SFlag::S_IFBLK => Kind::BlockDevice,
                    _ => Kind::Fifo,
                };
                let path = fsops::at_path(dir, name, full);
                self.read_xattrs(None, || path, follow)
                    .map_err(|e| self.tree_err("reading the xattrs of", rel, e))?;
                let xattrs = std::mem::take(&mut self.xattrs);
                let mut h = self.spec(rel, k, st);
                h.uname = &un;
                h.gname = &gn;
                h.xattrs = &xattrs;
                h.dev_major = nix::sys::stat::major(st.st_rdev) as u32;
                h.dev_minor = nix::sys::stat::minor(st.st_rdev) as u32;
                self.b.append(&h, &mut io::empty()).map_err(Error::Write)?;
                self.xattrs = xattrs;
            }
            SFlag::S_IFSOCK => {
                self.stats.skipped_sockets.push(lossy(rel));
                return Ok(());
            }
            _ => return Ok(()),
        }
        self.stats.entries += 1;
        Ok(())
    }
}

/// The data segments of a file with holes (None when it has none).
fn holes(file: &File, size: u64) -> io::Result<Option<Vec<(u64, u64)>>> {
    let mut map = Vec::new();
    let mut f = file;
    let mut pos = 0u64;
    while pos < size {
        let data = match seek_data(file, pos) {
            Ok(Some(d)) => d,
            Ok(None) => break,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(None),
            Err(e) => return Err(e),
        };
        if data >= size {
            break;
        }
        let hole = seek_hole(file, data)?.min(size);
        map.push((data, hole - data));
        pos = hole;
    }
    f.seek(SeekFrom::Start(0))?;
    if map.len() == 1 && map[0] == (0, size) {
        return Ok(None);
    }
    // A file ending in a hole: a last empty segment marks the size.
    if map.last().is_none_or(|&(o, l)| o + l < size) {
        map.push((size, 0));
    }
    Ok(Some(map))
}

fn seek_data(file: &File, from: u64) -> io::Result<Option<u64>> {
    match nix::unistd::lseek(file, from as i64, nix::unistd::Whence::SeekData) {
        Ok(o) => Ok(Some(o as u64)),
        Err(Errno::ENXIO) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn seek_hole(file: &File, from: u64) -> io::Result<u64> {
    nix::unistd::lseek(file, from as i64, nix::unistd::Whence::SeekHole)
        .map(|o| o as u64)
        .map_err(io::Error::from)
}

/// Reads the data segments of a sparse file one after the other.
struct Segments<'f> {
    file: &'f File,
    map: &'f [(u64, u64)],
    i: usize,
    done: u64,
}

impl Read for Segments<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while let Some(&(off, len)) = self.map.get(self.i) {
            if self.done == len {
                self.i += 1;
                self.done = 0;
                continue;
            }
            let want = buf
                .len()
                .min(usize::try_from(len - self.done).unwrap_or(usize::MAX));
            let n = self.file.read_at(&mut buf[..want], off + self.done)?;
            if n == 0 {
                return Ok(0);
            }
            self.done += n as u64;
            return Ok(n);
        }
        Ok(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::stat::mkdirat;
    use std::os::fd::OwnedFd;

    /// `levels` nested directories `d` in `root` (on tmpfs: see remove.rs).
    fn chain(root: &Path, levels: usize) {
        let mut cur: OwnedFd = nix::fcntl::open(root, DIR_FLAGS, Mode::empty()).unwrap();
        for _ in 0..levels {
            mkdirat(cur.as_fd(), "d", Mode::from_bits_truncate(0o755)).unwrap();
            cur = openat(cur.as_fd(), "d", DIR_FLAGS, Mode::empty()).unwrap();
        }
        let f = openat(
            cur.as_fd(),
            "bottom",
            OFlag::O_CREAT | OFlag::O_WRONLY | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o644),
        )
        .unwrap();
        drop(f);
    }

    /// On a thread with a small stack: recursion would overflow it.
    fn on_small_stack<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(f)
            .unwrap()
            .join()
            .unwrap()
    }

    #[test]
    fn deepest_tree_that_fits_is_written_and_read_back() {
        let tmp = tempfile::tempdir_in("/dev/shm").unwrap();
        // "d/" per level, "bottom" at the end: the longest path that fits.
        let levels = (crate::MAX_PATH - "bottom".len()) / 2;
        chain(tmp.path(), levels);
        let root = tmp.path().to_path_buf();
        let (tar, stats) =
            on_small_stack(move || write_tree(Vec::new(), &root, &TreeOptions::default()).unwrap());
        assert_eq!(stats.entries as usize, levels + 2);
        let mut r = crate::Reader::new(tar.as_slice());
        let mut n = 0;
        let mut longest = 0;
        while r.next_entry().unwrap() {
            longest = longest.max(r.entry().path.len());
            n += 1;
        }
        assert_eq!(n, levels + 2);
        assert_eq!(longest, levels * 2 + "bottom".len());
        assert!(longest <= crate::MAX_PATH);
        // TempDir's own (recursive) removal would overflow the stack.
        crate::remove_tree(&tmp.path().join("d")).unwrap();
    }

    #[test]
    fn deeper_tree_is_refused_with_its_depth() {
        let tmp = tempfile::tempdir_in("/dev/shm").unwrap();
        chain(tmp.path(), crate::MAX_PATH / 2 + 10);
        let root = tmp.path().to_path_buf();
        let e = on_small_stack(move || {
            write_tree(io::sink(), &root, &TreeOptions::default()).unwrap_err()
        });
        match &e {
            Error::PathTooLong { path, depth, limit } => {
                assert_eq!(*limit, crate::MAX_PATH);
                assert_eq!(*depth, crate::MAX_PATH / 2 + 1);
                assert!(path.starts_with("d/d/d/") && path.len() < 200, "{path}");
            }
            other => panic!("unexpected error: {other}"),
        }
        let msg = e.to_string();
        assert!(msg.contains("16385 levels deep"), "{msg}");
        crate::remove_tree(&tmp.path().join("d")).unwrap();
    }
}
