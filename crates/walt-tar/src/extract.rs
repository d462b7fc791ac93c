//! The one confining extractor.
//!
//! What differs between users is in [`ExtractOptions`]. What never
//! differs is enforced here, in one place:
//!
//! - entry names are split into components; absolute names, `..` and NUL
//!   bytes are refused;
//! - every directory is reached from a descriptor of the root with
//!   `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)` (or an `O_NOFOLLOW`
//!   walk one component at a time where the kernel lacks it), and every
//!   file, link, node or directory is created relative to such a
//!   descriptor with the `*at` calls: nothing is created outside the root
//!   nor through a symlink, whether the archive or the tree holds it;
//! - hard links only to files inside the root, not through symlinks;
//! - `trusted.overlay.*` xattrs from an archive are never applied;
//! - sparse files are written with their holes (never zeros);
//! - an optional limit on the bytes written.
//!
//! Directory modes and times are applied at the end (their content
//! changes their mtime, and a read-only mode must not stop their filling).

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat};
use nix::sys::stat::{FchmodatFlags, Mode, SFlag, UtimensatFlags, fchmodat, mkdirat, mknodat};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid, fchownat};

use crate::error::{Error, Result, lossy};
use crate::fsops::{self, DIR_FLAGS, ResolveError};
use crate::read::{Kind, Reader};
use crate::{OPAQUE_MARKER, OPAQUE_XATTR, OVERLAY_XATTR_PREFIX, WHITEOUT_PREFIX};

const WHITEOUT_META_PREFIX: &[u8] = b".wh..wh.";
const BUF_SIZE: usize = 1 << 20;

/// What to do with OCI whiteouts (`.wh.<name>`, `.wh..wh..opq`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Whiteouts {
    /// Converted to overlay form: a char device 0:0, the
    /// `trusted.overlay.opaque` xattr on the directory.
    Overlay,
    /// Kept as the plain files they are.
    Keep,
}

/// Owners of what is extracted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owners {
    /// The archive's uid/gid.
    Keep,
    /// Everything belongs to this uid/gid.
    Fixed { uid: u32, gid: u32 },
    /// No chown at all: files belong to whoever extracts.
    Ignore,
}

/// What to do with character and block device entries (fifos are always
/// created).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Devices {
    Create,
    /// Refused with an error naming the entry.
    Refuse,
    /// Skipped, counted in [`ExtractStats::skipped_devices`].
    Skip,
}

/// Where the top entry of a `cp -r` archive lands, given its name and
/// whether it is a directory: the directory to extract into, and the name
/// the top entry takes there. See [`crate::cp_landing`].
pub type CpTop<'a> = Box<dyn FnOnce(&OsStr, bool) -> Result<(PathBuf, OsString)> + 'a>;

/// Writes the data of regular files (the store plugs its `O_DIRECT`
/// writer in here).
pub trait FileWriter {
    /// Extra `open(2)` flags for a regular file of `size` bytes (such as
    /// `O_DIRECT`); when opening with them fails with `EINVAL`, the file is
    /// opened without them.
    fn open_flags(&mut self, _size: u64) -> i32 {
        0
    }

    /// Copies `data` (exactly `size` bytes, then end of data) into `file`,
    /// opened with `flags`; returns the file. `buf` is a reusable buffer.
    fn write(
        &mut self,
        file: File,
        flags: i32,
        size: u64,
        data: &mut dyn Read,
        buf: &mut [u8],
    ) -> io::Result<File>;
}

/// Plain buffered writes.
pub struct PlainWriter;

impl FileWriter for PlainWriter {
    fn write(
        &mut self,
        mut file: File,
        _flags: i32,
        _size: u64,
        data: &mut dyn Read,
        buf: &mut [u8],
    ) -> io::Result<File> {
        loop {
            let n = match data.read(buf) {
                Ok(0) => return Ok(file),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            file.write_all(&buf[..n])?;
        }
    }
}

/// What differs between the extractor's users.
pub struct ExtractOptions<'a> {
    pub whiteouts: Whiteouts,
    pub owners: Owners,
    pub devices: Devices,
    /// Apply `SCHILY.xattr.*` records (never `trusted.overlay.*`).
    pub xattrs: bool,
    /// `cp -r`: the archive holds one top entry, which lands where this
    /// says; every other entry must be below it.
    pub cp_top: Option<CpTop<'a>>,
    /// Limit on the bytes of file data written (logical sizes).
    pub limit: Option<u64>,
    /// Skip (with a warning) entries of unknown types instead of refusing
    /// them.
    pub skip_unknown: bool,
    /// How messages name the destination ("layer": "escapes the layer
    /// root", "is not in the layer").
    pub area: &'static str,
    /// A non-directory entry replaces a directory of the same name and a
    /// directory entry a non-directory (a layer), instead of being refused
    /// (`cp`, COPY/ADD).
    pub replace_dirs: bool,
}

impl Default for ExtractOptions<'_> {
    fn default() -> Self {
        ExtractOptions {
            whiteouts: Whiteouts::Keep,
            owners: Owners::Keep,
            devices: Devices::Create,
            xattrs: true,
            cp_top: None,
            limit: None,
            skip_unknown: false,
            area: "destination",
            replace_dirs: true,
        }
    }
}

/// What an extraction did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ExtractStats {
    /// Entries processed.
    pub entries: u64,
    /// Bytes of file data written (logical sizes).
    pub bytes: u64,
    /// Device entries skipped ([`Devices::Skip`]).
    pub skipped_devices: u64,
}

/// Most bytes of directory paths one extraction keeps for the end (the
/// directories' modes and times): a Debian root file system needs about
/// 2 MiB; a deep chain with an entry at every level would need gigabytes.
pub const MAX_DIR_NAMES: usize = 128 << 20;

/// A directory whose mode and mtime are applied at the end.
struct DirMeta {
    rel: Vec<u8>,
    mode: u32,
    mtime: TimeSpec,
}

/// State of the top entry under the `cp -r` rule.
struct CpState {
    top: Vec<u8>,
    top_is_dir: bool,
    name: Vec<u8>,
}

/// Extracts archives into a root directory.
pub struct Extractor<'a> {
    opts: ExtractOptions<'a>,
    writer: &'a mut dyn FileWriter,
    root: Option<(PathBuf, File)>,
    cp: Option<CpState>,
    /// The last parent directory resolved (relative path, '/'-joined).
    cache: Option<(Vec<u8>, File)>,
    dirs: Vec<DirMeta>,
    /// Bytes of path names held in `dirs` (bounded by [`MAX_DIR_NAMES`]).
    dir_bytes: usize,
    buf: Vec<u8>,
    /// Reused buffers for directory keys (no allocation per entry).
    scratch: Vec<u8>,
    resolved_key: Vec<u8>,
    stats: ExtractStats,
}

/// Splits a raw name into safe components (empty: the root itself).
fn normalize<'p>(
    raw: &'p [u8],
    area: &str,
    out: &mut Vec<&'p [u8]>,
) -> std::result::Result<(), String> {
    out.clear();
    if raw.is_empty() {
        return Err("has an empty name".into());
    }
    if raw.contains(&0) {
        return Err("contains a NUL byte".into());
    }
    if raw[0] == b'/' {
        return Err(format!("is an absolute path: it escapes the {area} root"));
    }
    for c in raw.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err(format!("escapes the {area} root")),
            c => out.push(c),
        }
    }
    Ok(())
}

fn join(comps: &[&[u8]], out: &mut Vec<u8>) {
    out.clear();
    for (i, c) in comps.iter().enumerate() {
        if i > 0 {
            out.push(b'/');
        }
        out.extend_from_slice(c);
    }
}

fn ts(secs: i64, nsec: u32) -> TimeSpec {
    TimeSpec::new(secs, i64::from(nsec))
}

fn is_prefix(prefix: &[u8], path: &[u8]) -> bool {
    path.starts_with(prefix)
        && (path.len() == prefix.len() || prefix.is_empty() || path[prefix.len()] == b'/')
}

impl<'a> Extractor<'a> {
    /// An extractor into `root` (an existing directory; with `cp_top`, the
    /// root comes from the landing rule and `root` is not used).
    pub fn new(
        root: Option<&Path>,
        opts: ExtractOptions<'a>,
        writer: &'a mut dyn FileWriter,
    ) -> Result<Self> {
        let root = match root {
            Some(r) => Some(open_root(r)?),
            None => None,
        };
        Ok(Extractor {
            opts,
            writer,
            root,
            cp: None,
            cache: None,
            dirs: Vec::new(),
            dir_bytes: 0,
            buf: vec![0u8; BUF_SIZE],
            scratch: Vec::new(),
            resolved_key: Vec::new(),
            stats: ExtractStats::default(),
        })
    }

    /// Extracts every entry of `reader`, then applies directory modes and
    /// times. Stops at the first error (entries before it stay).
    pub fn extract<R: Read>(mut self, reader: &mut Reader<R>) -> Result<ExtractStats> {
        while reader.next_entry()? {
            self.entry(reader)?;
            self.stats.entries += 1;
        }
        if self.root.is_none() {
            return Err(Error::Empty);
        }
        self.finish()?;
        Ok(self.stats)
    }

    fn root_fd(&self) -> BorrowedFd<'_> {
        self.root.as_ref().expect("root opened").1.as_fd()
    }

    fn entry<R: Read>(&mut self, reader: &mut Reader<R>) -> Result<()> {
        let e = reader.entry();
        let kind = e.kind();
        let raw = e.path.clone();
        let mut comps: Vec<&[u8]> = Vec::new();
        normalize(&raw, self.opts.area, &mut comps).map_err(|r| Error::entry(&raw, r))?;

        // The `cp -r` rule: one top entry, renamed where it lands.
        let mut renamed: Vec<u8>;
        if self.opts.cp_top.is_some() || self.cp.is_some() {
            if comps.is_empty() {
                return Err(Error::entry(&raw, "is not below a top-level entry"));
            }
            if self.cp.is_none() {
                let top_is_dir = kind == Kind::Directory || comps.len() > 1;
                let land = self.opts.cp_top.take().expect("cp landing");
                let (dir, name) = land(OsStr::from_bytes(comps[0]), top_is_dir)?;
                self.root = Some(open_root(&dir)?);
                self.cp = Some(CpState {
                    top: comps[0].to_vec(),
                    top_is_dir,
                    name: std::os::unix::ffi::OsStringExt::into_vec(name),
                });
            }
            let cp = self.cp.as_ref().expect("cp state");
            if comps[0] != cp.top.as_slice() {
                return Err(Error::entry(
                    &raw,
                    format!(
                        "is outside the copied tree: the archive has more than one top-level entry ('{}' and '{}')",
                        lossy(&cp.top),
                        lossy(comps[0])
                    ),
                ));
            }
            if comps.len() > 1 && !cp.top_is_dir {
                return Err(Error::entry(
                    &raw,
                    format!("follows the non-directory '{}'", lossy(&cp.top)),
                ));
            }
            if comps.len() == 1 && cp.top_is_dir && kind != Kind::Directory {
                return Err(Error::entry(
                    &raw,
                    "is the top-level entry of a tree but not a directory",
                ));
            }
            renamed = cp.name.clone();
            let _ = &mut renamed;
            comps[0] = renamed.as_slice();
        } else if self.root.is_none() {
            return Err(Error::Landing("no destination".into()));
        }

        let Some((&last, parents)) = comps.split_last() else {
            // The root itself ("./").
            if kind == Kind::Directory {
                let (mode, mtime) = (e.mode, ts(e.mtime, e.mtime_nsec));
                let (uid, gid) = self.owner(e.uid, e.gid, &raw)?;
                let xattrs = std::mem::take(&mut reader.entry_mut().xattrs);
                let root = self
                    .root
                    .as_ref()
                    .expect("root")
                    .1
                    .try_clone()
                    .map_err(|e| Error::fs("opening the destination for", &raw, e))?;
                self.chown_fd(&root, uid, gid, &raw)?;
                self.apply_xattrs_file(&root, &xattrs, &raw)?;
                self.dirs.push(DirMeta {
                    rel: Vec::new(),
                    mode,
                    mtime,
                });
                return Ok(());
            }
            return Err(Error::entry(
                &raw,
                format!("does not name anything inside the {}", self.opts.area),
            ));
        };

        // Whiteouts.
        if self.opts.whiteouts == Whiteouts::Overlay && last.starts_with(WHITEOUT_PREFIX) {
            let (uid, gid) = self.owner(e.uid, e.gid, &raw)?;
            let mtime = ts(e.mtime, e.mtime_nsec);
            let parent = self.parent(parents, &raw, true)?;
            if last == OPAQUE_MARKER {
                xattr::FileExt::set_xattr(&parent, OPAQUE_XATTR, b"y")
                    .map_err(|e| Error::fs("marking opaque the directory of", &raw, e))?;
            } else if last.starts_with(WHITEOUT_META_PREFIX) {
                tracing::debug!(entry = %lossy(&raw), "ignoring whiteout metadata entry");
            } else {
                let name = &last[WHITEOUT_PREFIX.len()..];
                if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') {
                    return Err(Error::entry(&raw, "is not a valid whiteout"));
                }
                let mut rel = Vec::new();
                join(parents, &mut rel);
                self.replace(&parent, name, &rel, &raw)?;
                mknodat(&parent, name, SFlag::S_IFCHR, Mode::empty(), 0)
                    .map_err(|e| Error::fs("creating the whiteout for", &raw, e.into()))?;
                self.chown_at(&parent, name, uid, gid, &raw)?;
                nix::sys::stat::utimensat(
                    &parent,
                    name,
                    &mtime,
                    &mtime,
                    UtimensatFlags::NoFollowSymlink,
                )
                .map_err(|e| Error::fs("setting the times of", &raw, e.into()))?;
            }
            self.put_cache(parent);
            return Ok(());
        }

        match kind {
            Kind::Directory => self.directory(reader, &raw, parents, last),
            Kind::File => self.file(reader, &raw, parents, last),
            Kind::Symlink => self.symlink(reader, &raw, parents, last),
            Kind::HardLink => self.hard_link(reader, &raw, &comps),
            Kind::CharDevice | Kind::BlockDevice | Kind::Fifo => {
                self.node(reader, &raw, parents, last, kind)
            }
            Kind::Other(flag) => {
                if self.opts.skip_unknown {
                    tracing::warn!(entry = %lossy(&raw), flag = %char::from(flag), "skipping tar entry of unsupported type");
                    Ok(())
                } else {
                    Err(Error::entry(
                        &raw,
                        format!(
                            "has an unsupported type '{}'",
                            char::from(flag).escape_default()
                        ),
                    ))
                }
            }
        }
    }

    /// Caches `f`, the directory the last `parent` call resolved.
    fn put_cache(&mut self, f: File) {
        let key = std::mem::take(&mut self.resolved_key);
        if let Some((old, _)) = self.cache.replace((key, f)) {
            self.scratch = old;
        }
    }

    /// The directory `parents` (created when missing if `create`), never
    /// through a symlink. Takes the cached descriptor when it is the same
    /// directory (or an ancestor: then only the rest is resolved). The
    /// caller puts it back with `put_cache`.
    fn parent(&mut self, parents: &[&[u8]], raw: &[u8], create: bool) -> Result<File> {
        let mut key = std::mem::take(&mut self.scratch);
        join(parents, &mut key);
        let r = match self.cache.take() {
            Some((ck, cf)) if ck == key => {
                self.scratch = ck;
                Ok(cf)
            }
            Some((ck, cf)) if !ck.is_empty() && is_prefix(&ck, &key) => {
                let skip = ck.split(|&b| b == b'/').count();
                let r = self.resolve(cf.as_fd(), &ck, &parents[skip..], raw, create);
                self.scratch = ck;
                r
            }
            other => {
                if let Some((ck, _)) = other {
                    self.scratch = ck;
                }
                self.resolve(self.root_fd(), b"", parents, raw, create)
            }
        };
        self.resolved_key = key;
        r
    }

    fn resolve(
        &self,
        base: BorrowedFd<'_>,
        shown: &[u8],
        comps: &[&[u8]],
        raw: &[u8],
        create: bool,
    ) -> Result<File> {
        let mut pb = Vec::new();
        match fsops::open_dir_beneath(base, shown, comps, create, &mut pb) {
            Ok(fd) => Ok(File::from(fd)),
            Err(ResolveError::Symlink(p)) => Err(Error::entry(
                raw,
                format!("goes through symlink '{}'", lossy(&p)),
            )),
            Err(ResolveError::NotDir(p)) => Err(Error::entry(
                raw,
                format!("goes through '{}' which is not a directory", lossy(&p)),
            )),
            Err(ResolveError::Missing(p)) => Err(Error::entry(
                raw,
                format!(
                    "refers to '{}' which is not in the {}",
                    lossy(&p),
                    self.opts.area
                ),
            )),
            Err(ResolveError::Io(p, e)) => Err(Error::fs(
                format!(
                    "creating or opening '{}', the parent directories of",
                    lossy(&p)
                ),
                raw,
                e,
            )),
        }
    }

    fn owner(&self, uid: u64, gid: u64, raw: &[u8]) -> Result<(Option<u32>, Option<u32>)> {
        match self.opts.owners {
            Owners::Keep => Ok((
                Some(u32::try_from(uid).map_err(|_| Error::entry(raw, "has a uid out of range"))?),
                Some(u32::try_from(gid).map_err(|_| Error::entry(raw, "has a gid out of range"))?),
            )),
            Owners::Fixed { uid, gid } => Ok((Some(uid), Some(gid))),
            Owners::Ignore => Ok((None, None)),
        }
    }

    fn chown_fd(&self, f: &File, uid: Option<u32>, gid: Option<u32>, raw: &[u8]) -> Result<()> {
        if uid.is_none() && gid.is_none() {
            return Ok(());
        }
        std::os::unix::fs::fchown(f, uid, gid)
            .map_err(|e| Error::fs("setting the owner of", raw, e))
    }

    fn chown_at(
        &self,
        dir: &File,
        name: &[u8],
        uid: Option<u32>,
        gid: Option<u32>,
        raw: &[u8],
    ) -> Result<()> {
        if uid.is_none() && gid.is_none() {
            return Ok(());
        }
        fchownat(
            dir,
            name,
            uid.map(Uid::from_raw),
            gid.map(Gid::from_raw),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(|e| Error::fs("setting the owner of", raw, e.into()))
    }

    /// Removes what is at `name` in `dir` (relative path of `dir`:
    /// `dir_rel`) before it is replaced, and forgets what was known below.
    fn replace(&mut self, dir: &File, name: &[u8], dir_rel: &[u8], raw: &[u8]) -> Result<()> {
        let st = match fsops::lstat_at(dir.as_fd(), name) {
            Ok(st) => st,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(Error::fs("replacing", raw, e)),
        };
        if fsops::is_dir(&st) {
            if !self.opts.replace_dirs {
                return Err(Error::entry(
                    raw,
                    "cannot overwrite a directory with a non-directory",
                ));
            }
            let mut rel = dir_rel.to_vec();
            if !rel.is_empty() {
                rel.push(b'/');
            }
            rel.extend_from_slice(name);
            fsops::remove_at(dir.as_fd(), name).map_err(|e| Error::fs("replacing", raw, e))?;
            self.dirs.retain(|d| !is_prefix(&rel, &d.rel));
            if self.cache.as_ref().is_some_and(|(k, _)| is_prefix(&rel, k)) {
                self.cache = None;
            }
        } else {
            nix::unistd::unlinkat(dir, name, nix::unistd::UnlinkatFlags::NoRemoveDir)
                .map_err(|e| Error::fs("replacing", raw, e.into()))?;
        }
        Ok(())
    }

    fn directory<R: Read>(
        &mut self,
        reader: &mut Reader<R>,
        raw: &[u8],
        parents: &[&[u8]],
        last: &[u8],
    ) -> Result<()> {
        let e = reader.entry();
        let (mode, mtime) = (e.mode, ts(e.mtime, e.mtime_nsec));
        let (uid, gid) = self.owner(e.uid, e.gid, raw)?;
        let xattrs = std::mem::take(&mut reader.entry_mut().xattrs);
        let parent = self.parent(parents, raw, true)?;
        let mut rel = Vec::new();
        join(parents, &mut rel);
        match mkdirat(&parent, last, Mode::from_bits_truncate(0o700)) {
            Ok(()) => {}
            Err(Errno::EEXIST) => match fsops::lstat_at(parent.as_fd(), last) {
                Ok(st) if fsops::is_dir(&st) => {}
                _ if !self.opts.replace_dirs => {
                    return Err(Error::entry(
                        raw,
                        "cannot overwrite a non-directory with a directory",
                    ));
                }
                _ => {
                    self.replace(&parent, last, &rel, raw)?;
                    mkdirat(&parent, last, Mode::from_bits_truncate(0o700))
                        .map_err(|e| Error::fs("creating directory", raw, e.into()))?;
                }
            },
            Err(e) => return Err(Error::fs("creating directory", raw, e.into())),
        }
        self.chown_at(&parent, last, uid, gid, raw)?;
        if self.opts.xattrs && !xattrs.is_empty() {
            let d = openat(&parent, last, DIR_FLAGS, Mode::empty())
                .map_err(|e| Error::fs("opening directory", raw, e.into()))?;
            self.apply_xattrs_file(&File::from(d), &xattrs, raw)?;
        }
        if !rel.is_empty() {
            rel.push(b'/');
        }
        rel.extend_from_slice(last);
        self.dir_bytes += rel.len();
        if self.dir_bytes > MAX_DIR_NAMES {
            return Err(Error::entry(
                raw,
                format!(
                    "is one directory too many: the archive's directory paths add up to more than {} MiB",
                    MAX_DIR_NAMES >> 20
                ),
            ));
        }
        self.dirs.push(DirMeta { rel, mode, mtime });
        self.put_cache(parent);
        Ok(())
    }

    fn file<R: Read>(
        &mut self,
        reader: &mut Reader<R>,
        raw: &[u8],
        parents: &[&[u8]],
        last: &[u8],
    ) -> Result<()> {
        let e = reader.entry();
        let (mode, mtime, size) = (e.mode, ts(e.mtime, e.mtime_nsec), e.size);
        let (uid, gid) = self.owner(e.uid, e.gid, raw)?;
        let sparse = reader.entry_mut().sparse.take();
        let xattrs = std::mem::take(&mut reader.entry_mut().xattrs);
        if let Some(limit) = self.opts.limit
            && self.stats.bytes.saturating_add(size) > limit
        {
            return Err(Error::Limit {
                entry: lossy(raw),
                limit,
            });
        }
        let parent = self.parent(parents, raw, true)?;
        let extra = if sparse.is_none() {
            self.writer.open_flags(size)
        } else {
            0
        };
        let open = |flags: i32| {
            openat(
                &parent,
                last,
                OFlag::O_WRONLY
                    | OFlag::O_CREAT
                    | OFlag::O_EXCL
                    | OFlag::O_NOFOLLOW
                    | OFlag::O_CLOEXEC
                    | OFlag::from_bits_retain(flags),
                Mode::from_bits_truncate(0o600),
            )
        };
        // Without the extra flags where the filesystem refuses them (EINVAL),
        // and once over what stands in the way (EEXIST).
        let create = |this: &mut Self, mut flags: i32| -> Result<(File, i32)> {
            let mut replaced = false;
            loop {
                match open(flags) {
                    Ok(fd) => return Ok((File::from(fd), flags)),
                    Err(Errno::EINVAL) if flags != 0 => flags = 0,
                    Err(Errno::EEXIST) if !replaced => {
                        let mut rel = Vec::new();
                        join(parents, &mut rel);
                        this.replace(&parent, last, &rel, raw)?;
                        replaced = true;
                    }
                    Err(e) => return Err(Error::fs("creating file", raw, e.into())),
                }
            }
        };
        let (file, flags) = create(self, extra)?;
        let file = match &sparse {
            Some(map) => self.write_sparse(file, map, size, reader, raw)?,
            None => {
                let mut data = DataReader {
                    inner: reader,
                    err: None,
                };
                let r = self
                    .writer
                    .write(file, flags, size, &mut data, &mut self.buf);
                if let Some(e) = data.err {
                    return Err(Error::Read(e));
                }
                r.map_err(|e| Error::fs("writing", raw, e))?
            }
        };
        self.stats.bytes += size;
        self.chown_fd(&file, uid, gid, raw)?;
        nix::sys::stat::fchmod(&file, Mode::from_bits_truncate(mode as libc::mode_t))
            .map_err(|e| Error::fs("setting the mode of", raw, e.into()))?;
        self.apply_xattrs_file(&file, &xattrs, raw)?;
        nix::sys::stat::futimens(&file, &mtime, &mtime)
            .map_err(|e| Error::fs("setting the times of", raw, e.into()))?;
        self.put_cache(parent);
        Ok(())
    }

    /// The data segments at their offsets; holes are left as holes.
    fn write_sparse<R: Read>(
        &mut self,
        file: File,
        map: &[(u64, u64)],
        size: u64,
        reader: &mut Reader<R>,
        raw: &[u8],
    ) -> Result<File> {
        file.set_len(size)
            .map_err(|e| Error::fs("sizing sparse file", raw, e))?;
        for &(offset, len) in map {
            let mut left = len;
            let mut at = offset;
            while left > 0 {
                let want = self
                    .buf
                    .len()
                    .min(usize::try_from(left).unwrap_or(usize::MAX));
                let n = match reader.read(&mut self.buf[..want]) {
                    Ok(0) => {
                        return Err(Error::Read(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!("the archive ends inside the data of entry '{}'", lossy(raw)),
                        )));
                    }
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(Error::Read(e)),
                };
                file.write_all_at(&self.buf[..n], at)
                    .map_err(|e| Error::fs("writing", raw, e))?;
                left -= n as u64;
                at += n as u64;
            }
        }
        Ok(file)
    }

    fn symlink<R: Read>(
        &mut self,
        reader: &mut Reader<R>,
        raw: &[u8],
        parents: &[&[u8]],
        last: &[u8],
    ) -> Result<()> {
        let e = reader.entry();
        let mtime = ts(e.mtime, e.mtime_nsec);
        let (uid, gid) = self.owner(e.uid, e.gid, raw)?;
        let target = e.link.clone();
        if target.is_empty() {
            return Err(Error::entry(raw, "is a symlink without a target"));
        }
        if target.contains(&0) {
            return Err(Error::entry(
                raw,
                "has a symlink target containing a NUL byte",
            ));
        }
        let xattrs = std::mem::take(&mut reader.entry_mut().xattrs);
        let parent = self.parent(parents, raw, true)?;
        let mut rel = Vec::new();
        join(parents, &mut rel);
        match nix::unistd::symlinkat(target.as_slice(), &parent, last) {
            Ok(()) => {}
            Err(Errno::EEXIST) => {
                self.replace(&parent, last, &rel, raw)?;
                nix::unistd::symlinkat(target.as_slice(), &parent, last)
                    .map_err(|e| Error::fs("creating symlink", raw, e.into()))?;
            }
            Err(e) => return Err(Error::fs("creating symlink", raw, e.into())),
        }
        self.chown_at(&parent, last, uid, gid, raw)?;
        self.apply_xattrs_at(&parent, last, &rel, &xattrs, raw)?;
        nix::sys::stat::utimensat(
            &parent,
            last,
            &mtime,
            &mtime,
            UtimensatFlags::NoFollowSymlink,
        )
        .map_err(|e| Error::fs("setting the times of", raw, e.into()))?;
        self.put_cache(parent);
        Ok(())
    }

    fn hard_link<R: Read>(
        &mut self,
        reader: &mut Reader<R>,
        raw: &[u8],
        comps: &[&[u8]],
    ) -> Result<()> {
        let area = self.opts.area;
        let target_raw = reader.entry().link.clone();
        let mut tcomps: Vec<&[u8]> = Vec::new();
        normalize(&target_raw, area, &mut tcomps).map_err(|r| {
            Error::entry(
                raw,
                format!("is a hard link to '{}' which {r}", lossy(&target_raw)),
            )
        })?;
        let renamed;
        if let Some(cp) = &self.cp {
            if tcomps.first() != Some(&cp.top.as_slice()) || (tcomps.len() < 2 && cp.top_is_dir) {
                return Err(Error::entry(
                    raw,
                    format!(
                        "is a hard link to '{}', outside the copied tree",
                        lossy(&target_raw)
                    ),
                ));
            }
            renamed = cp.name.clone();
            tcomps[0] = renamed.as_slice();
        }
        let Some((&tlast, tparents)) = tcomps.split_last() else {
            return Err(Error::entry(
                raw,
                format!("is a hard link to the {area} root"),
            ));
        };
        if tcomps == comps {
            // A link to itself: nothing to do.
            return Ok(());
        }
        let (&last, parents) = comps.split_last().expect("not the root");
        let parent = self.parent(parents, raw, true)?;
        let tparent = match self.resolve(self.root_fd(), b"", tparents, raw, false) {
            Ok(f) => f,
            Err(Error::Entry { reason, .. }) if reason.starts_with("refers to") => {
                return Err(Error::entry(
                    raw,
                    format!(
                        "is a hard link to '{}' which is not in the {area}",
                        lossy(&target_raw)
                    ),
                ));
            }
            Err(e) => return Err(e),
        };
        match fsops::lstat_at(tparent.as_fd(), tlast) {
            Ok(st) if fsops::is_dir(&st) => {
                return Err(Error::entry(
                    raw,
                    format!("is a hard link to directory '{}'", lossy(&target_raw)),
                ));
            }
            Ok(_) => {}
            Err(_) => {
                return Err(Error::entry(
                    raw,
                    format!(
                        "is a hard link to '{}' which is not in the {area}",
                        lossy(&target_raw)
                    ),
                ));
            }
        }
        let mut rel = Vec::new();
        join(parents, &mut rel);
        let link = || nix::unistd::linkat(&tparent, tlast, &parent, last, AtFlags::empty());
        match link() {
            Ok(()) => {}
            Err(Errno::EEXIST) => {
                self.replace(&parent, last, &rel, raw)?;
                link().map_err(|e| Error::fs("creating hard link", raw, e.into()))?;
            }
            Err(e) => return Err(Error::fs("creating hard link", raw, e.into())),
        }
        self.put_cache(parent);
        Ok(())
    }

    fn node<R: Read>(
        &mut self,
        reader: &mut Reader<R>,
        raw: &[u8],
        parents: &[&[u8]],
        last: &[u8],
        kind: Kind,
    ) -> Result<()> {
        if kind != Kind::Fifo {
            match self.opts.devices {
                Devices::Create => {}
                Devices::Skip => {
                    self.stats.skipped_devices += 1;
                    return Ok(());
                }
                Devices::Refuse => {
                    return Err(Error::entry(raw, "is a device node: refused here"));
                }
            }
        }
        let e = reader.entry();
        let (mode, mtime) = (e.mode, ts(e.mtime, e.mtime_nsec));
        let (uid, gid) = self.owner(e.uid, e.gid, raw)?;
        let (sflag, dev) = match kind {
            Kind::Fifo => (SFlag::S_IFIFO, 0),
            Kind::CharDevice => (
                SFlag::S_IFCHR,
                nix::sys::stat::makedev(e.dev_major.into(), e.dev_minor.into()),
            ),
            _ => (
                SFlag::S_IFBLK,
                nix::sys::stat::makedev(e.dev_major.into(), e.dev_minor.into()),
            ),
        };
        let xattrs = std::mem::take(&mut reader.entry_mut().xattrs);
        let parent = self.parent(parents, raw, true)?;
        let mut rel = Vec::new();
        join(parents, &mut rel);
        let make = || mknodat(&parent, last, sflag, Mode::from_bits_truncate(0o600), dev);
        match make() {
            Ok(()) => {}
            Err(Errno::EEXIST) => {
                self.replace(&parent, last, &rel, raw)?;
                make().map_err(|e| Error::fs("creating device node", raw, e.into()))?;
            }
            Err(e) => return Err(Error::fs("creating device node", raw, e.into())),
        }
        self.chown_at(&parent, last, uid, gid, raw)?;
        fchmodat(
            &parent,
            last,
            Mode::from_bits_truncate(mode as libc::mode_t),
            FchmodatFlags::FollowSymlink,
        )
        .map_err(|e| Error::fs("setting the mode of", raw, e.into()))?;
        self.apply_xattrs_at(&parent, last, &rel, &xattrs, raw)?;
        nix::sys::stat::utimensat(
            &parent,
            last,
            &mtime,
            &mtime,
            UtimensatFlags::NoFollowSymlink,
        )
        .map_err(|e| Error::fs("setting the times of", raw, e.into()))?;
        self.put_cache(parent);
        Ok(())
    }

    fn wanted_xattr(&self, name: &[u8], raw: &[u8]) -> bool {
        if name.starts_with(OVERLAY_XATTR_PREFIX) {
            tracing::debug!(entry = %lossy(raw), xattr = %lossy(name), "ignoring overlay xattr from archive");
            return false;
        }
        true
    }

    fn xattr_result(&self, r: io::Result<()>, name: &[u8], raw: &[u8]) -> Result<()> {
        match r {
            Ok(()) => Ok(()),
            Err(e)
                if e.raw_os_error() == Some(libc::EOPNOTSUPP)
                    || (e.raw_os_error() == Some(libc::EPERM) && name.starts_with(b"user.")) =>
            {
                tracing::warn!(entry = %lossy(raw), xattr = %lossy(name), error = %e, "xattr not supported here, skipped");
                Ok(())
            }
            Err(e) => Err(Error::fs(
                format!("setting xattr {} on", lossy(name)),
                raw,
                e,
            )),
        }
    }

    fn apply_xattrs_file(&self, f: &File, xattrs: &[(Vec<u8>, Vec<u8>)], raw: &[u8]) -> Result<()> {
        if !self.opts.xattrs {
            return Ok(());
        }
        for (name, value) in xattrs {
            if !self.wanted_xattr(name, raw) {
                continue;
            }
            let r = xattr::FileExt::set_xattr(f, OsStr::from_bytes(name), value);
            self.xattr_result(r, name, raw)?;
        }
        Ok(())
    }

    /// xattrs of a symlink or device node (no descriptor to set them on).
    fn apply_xattrs_at(
        &self,
        dir: &File,
        name: &[u8],
        dir_rel: &[u8],
        xattrs: &[(Vec<u8>, Vec<u8>)],
        raw: &[u8],
    ) -> Result<()> {
        if !self.opts.xattrs || xattrs.is_empty() {
            return Ok(());
        }
        let path = fsops::at_path(dir.as_fd(), name, || {
            let mut p = self.root.as_ref().expect("root").0.clone();
            if !dir_rel.is_empty() {
                p.push(OsStr::from_bytes(dir_rel));
            }
            p.push(OsStr::from_bytes(name));
            p
        });
        for (k, v) in xattrs {
            if !self.wanted_xattr(k, raw) {
                continue;
            }
            let r = xattr::set(&path, OsStr::from_bytes(k), v);
            self.xattr_result(r, k, raw)?;
        }
        Ok(())
    }

    /// Directory modes and times, children before parents, walking with
    /// one descriptor (down by name with `O_NOFOLLOW`, up with "..").
    fn finish(&mut self) -> Result<()> {
        self.cache = None;
        let mut dirs = std::mem::take(&mut self.dirs);
        // Children before parents: the reverse of the order of component
        // lists, which is the byte order of the paths with '/' below every
        // other byte (names hold neither '/' nor NUL). Same directory
        // twice: the later entry wins (applied last).
        let sep_low = |c: &u8| if *c == b'/' { 0 } else { *c };
        let mut order: Vec<usize> = (0..dirs.len()).collect();
        order.sort_by(|&a, &b| {
            let (ra, rb) = (&dirs[a].rel, &dirs[b].rel);
            rb.iter()
                .map(sep_low)
                .cmp(ra.iter().map(sep_low))
                .then(a.cmp(&b))
        });
        let root = self
            .root_fd()
            .try_clone_to_owned()
            .map_err(|e| Error::fs("opening the destination for", b"", e))?;
        let mut cur: OwnedFd = root;
        let mut cur_comps: Vec<Vec<u8>> = Vec::new();
        for i in order {
            let d = &mut dirs[i];
            let target: Vec<&[u8]> = if d.rel.is_empty() {
                Vec::new()
            } else {
                d.rel.split(|&c| c == b'/').collect()
            };
            let common = cur_comps
                .iter()
                .zip(&target)
                .take_while(|(a, b)| a.as_slice() == **b)
                .count();
            while cur_comps.len() > common {
                cur = openat(&cur, "..", DIR_FLAGS, Mode::empty())
                    .map_err(|e| Error::fs("setting the times of", &d.rel, e.into()))?;
                cur_comps.pop();
            }
            let mut ok = true;
            for c in &target[common..] {
                match openat(&cur, *c, DIR_FLAGS, Mode::empty()) {
                    Ok(fd) => {
                        cur = fd;
                        cur_comps.push(c.to_vec());
                    }
                    Err(e) => {
                        // Replaced by a non-directory since: nothing to do.
                        tracing::debug!(dir = %lossy(&d.rel), error = %e, "directory gone before its times were set");
                        ok = false;
                        break;
                    }
                }
            }
            if !ok {
                continue;
            }
            nix::sys::stat::fchmod(&cur, Mode::from_bits_truncate(d.mode as libc::mode_t))
                .map_err(|e| Error::fs("setting the mode of", &d.rel, e.into()))?;
            nix::sys::stat::futimens(&cur, &d.mtime, &d.mtime)
                .map_err(|e| Error::fs("setting the times of", &d.rel, e.into()))?;
        }
        Ok(())
    }
}

fn open_root(path: &Path) -> Result<(PathBuf, File)> {
    let fd = nix::fcntl::open(
        path,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| Error::Fs {
        what: "opening the destination".into(),
        entry: path.display().to_string(),
        source: e.into(),
    })?;
    // SAFETY: `fd` is an open descriptor we own; `File` takes it over.
    let f = unsafe { File::from_raw_fd(fd.into_raw_fd()) };
    Ok((path.to_path_buf(), f))
}

/// The entry's data as a reader, remembering a read error (so that it is
/// not taken for a write error).
struct DataReader<'r, R> {
    inner: &'r mut Reader<R>,
    err: Option<io::Error>,
}

impl<R: Read> Read for DataReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.inner.read(buf) {
            Ok(n) => Ok(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Err(e),
            Err(e) => {
                let kind = e.kind();
                let msg = e.to_string();
                self.err = Some(e);
                Err(io::Error::new(kind, msg))
            }
        }
    }
}
