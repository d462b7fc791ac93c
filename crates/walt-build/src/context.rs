//! The build context, confined.
//!
//! Client side: [`context_matcher`] and [`write_context`] turn a directory
//! into the tar stream sent to the server (`--from-dir`), honouring
//! `.dockerignore`, never following symlinks, never opening a FIFO or a
//! device.
//!
//! Server side: [`git_clone`] fetches a repository (`--from-url`),
//! [`open_sub_dir`] checks `--sub-dir`, [`read_dockerfile`] finds the
//! Dockerfile, [`resolve_sources`] resolves COPY/ADD sources inside the
//! unpacked context (or a stage's root) without ever leaving it.
//!
//! Error messages name paths relative to the context (or as the user wrote
//! them), never host paths of the server.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags, Stat};
use thiserror::Error;
use walt_core::text::one_line;
use walt_tar::{Builder, HeaderSpec, Kind};

use crate::ignore::{IgnoreError, Matcher, Pattern};

/// Deepest directory nesting walked.
pub const MAX_DEPTH: usize = 1024;
/// Largest Dockerfile read.
pub const MAX_DOCKERFILE: u64 = 4 << 20;
/// Most sources a glob may match.
pub const MAX_GLOB_MATCHES: usize = 100_000;
/// The names looked for in the context, in this order (as podman, which
/// WalT runs, does).
pub const DOCKERFILE_NAMES: [&str; 2] = ["Containerfile", "Dockerfile"];

#[derive(Debug, Error)]
pub enum ContextError {
    #[error(transparent)]
    Ignore(#[from] IgnoreError),
    #[error("cannot read '{path}' in the build context: {source}")]
    Read { path: String, source: io::Error },
    #[error("cannot write the build context stream: {0}")]
    Write(io::Error),
    #[error("'{path}' in the build context is nested too deeply (more than {MAX_DEPTH} levels)")]
    TooDeep { path: String },
    #[error("sub-directory '{sub}' is refused: {why}")]
    SubDirRefused { sub: String, why: &'static str },
    #[error("sub-directory '{sub}' not found in the repository")]
    SubDirMissing { sub: String },
    #[error("no Dockerfile or Containerfile in {place}")]
    NoDockerfile { place: String },
    #[error("{name} in {place} is not a regular file inside the context")]
    BadDockerfile { name: &'static str, place: String },
    #[error("{name} in {place} is too large (more than {MAX_DOCKERFILE} bytes)")]
    DockerfileTooLarge { name: &'static str, place: String },
    #[error("source '{src}': no such file or directory in the build context")]
    NoSource { src: String },
    #[error("source '{src}': no file in the build context matches it")]
    NoMatch { src: String },
    #[error("source '{src}': more than {MAX_GLOB_MATCHES} files match it")]
    TooManyMatches { src: String },
    #[error("source '{src}': {why}")]
    BadSource { src: String, why: String },
    #[error("cannot clone {url}: {why}")]
    Git { url: String, why: String },
}

fn rel_str(rel: &[u8]) -> String {
    if rel.is_empty() {
        ".".to_string()
    } else {
        one_line(&String::from_utf8_lossy(rel)).into_owned()
    }
}

fn read_err(rel: &[u8], source: io::Error) -> ContextError {
    ContextError::Read {
        path: rel_str(rel),
        source,
    }
}

/// The type of an entry from its mode.
pub(crate) fn file_type(st: &Stat) -> FileType {
    FileType::from_raw_mode(st.st_mode)
}

/// One entry met by [`walk`].
pub(crate) struct Walked<'a> {
    /// Path relative to the walk's root (no leading `./`).
    pub rel: &'a [u8],
    pub dir: BorrowedFd<'a>,
    pub name: &'a [u8],
    pub st: &'a Stat,
}

struct Frame {
    fd: OwnedFd,
    names: Vec<Vec<u8>>,
    next: usize,
    rel_len: usize,
}

/// The names in a directory, in byte order.
fn list_dir(fd: BorrowedFd<'_>) -> io::Result<Vec<Vec<u8>>> {
    let mut names = Vec::new();
    for e in rustix::fs::Dir::read_from(fd)? {
        let e = e?;
        let n = e.file_name().to_bytes();
        if n != b"." && n != b".." {
            names.push(n.to_vec());
        }
    }
    names.sort_unstable();
    Ok(names)
}

fn open_dir_at(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<OwnedFd> {
    Ok(rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// Walks the directory `root` (depth first, names in byte order, symlinks
/// never followed); `visit` says for each directory whether to go in.
/// Entries that vanish during the walk are passed over.
pub(crate) fn walk(
    root: OwnedFd,
    visit: &mut dyn FnMut(&Walked<'_>) -> Result<bool, ContextError>,
) -> Result<(), ContextError> {
    let names = list_dir(root.as_fd()).map_err(|e| read_err(b"", e))?;
    let mut stack = vec![Frame {
        fd: root,
        names,
        next: 0,
        rel_len: 0,
    }];
    let mut rel: Vec<u8> = Vec::new();
    loop {
        let depth = stack.len();
        let Some(frame) = stack.last_mut() else {
            break;
        };
        if frame.next == frame.names.len() {
            stack.pop();
            continue;
        }
        let name = std::mem::take(&mut frame.names[frame.next]);
        frame.next += 1;
        rel.truncate(frame.rel_len);
        if !rel.is_empty() {
            rel.push(b'/');
        }
        rel.extend_from_slice(&name);
        let st = match rustix::fs::statat(frame.fd.as_fd(), &name[..], AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(rustix::io::Errno::NOENT) => continue,
            Err(e) => return Err(read_err(&rel, e.into())),
        };
        let w = Walked {
            rel: &rel,
            dir: frame.fd.as_fd(),
            name: &name,
            st: &st,
        };
        if !visit(&w)? || file_type(&st) != FileType::Directory {
            continue;
        }
        if depth >= MAX_DEPTH {
            return Err(ContextError::TooDeep {
                path: rel_str(&rel),
            });
        }
        let fd = match open_dir_at(frame.fd.as_fd(), &name) {
            Ok(fd) => fd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(read_err(&rel, e)),
        };
        let names = list_dir(fd.as_fd()).map_err(|e| read_err(&rel, e))?;
        stack.push(Frame {
            fd,
            names,
            next: 0,
            rel_len: rel.len(),
        });
    }
    Ok(())
}

/// A digest of the listing of the context directory `root`: for every
/// entry below it (excluded ones too), its path, type, mode, owner, size,
/// device and inode, and its modification and change times to the
/// nanosecond; no content is read. Any write to a file changes its change
/// time, which no one can set back: two equal digests mean the same
/// context, so a server holding the context of the first need not receive
/// it again. Costs one `stat` per entry.
pub fn context_digest(root: &Path) -> Result<String, ContextError> {
    use sha2::{Digest as _, Sha256};
    let root_fd = rustix::fs::open(
        root,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| read_err(b"", e.into()))?;
    let st = rustix::fs::fstat(&root_fd).map_err(|e| read_err(b"", e.into()))?;
    let mut h = Sha256::new();
    let mut entry = |rel: &[u8], st: &Stat| {
        h.update((rel.len() as u64).to_le_bytes());
        h.update(rel);
        for n in [
            u64::from(st.st_mode),
            u64::from(st.st_uid),
            u64::from(st.st_gid),
            st.st_size as u64,
            st.st_dev,
            st.st_ino,
            st.st_rdev,
            st.st_mtime as u64,
            st.st_mtime_nsec,
            st.st_ctime as u64,
            st.st_ctime_nsec,
        ] {
            h.update(n.to_le_bytes());
        }
    };
    entry(b"", &st);
    walk(root_fd, &mut |w| {
        entry(w.rel, w.st);
        Ok(true)
    })?;
    Ok(crate::cache::CacheKey(h.finalize().into()).digest())
}

/// Opens a regular file of a walk for reading: never a FIFO or device
/// (checked on the open file), never through a symlink. None when it is no
/// longer a regular file.
pub(crate) fn open_regular(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<Option<(File, Stat)>> {
    let fd = rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let st = rustix::fs::fstat(&fd)?;
    if file_type(&st) != FileType::RegularFile {
        return Ok(None);
    }
    Ok(Some((File::from(fd), st)))
}

/// What [`write_context`] sent and left out.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ContextStats {
    /// Entries written.
    pub entries: u64,
    /// File content bytes written.
    pub bytes: u64,
    /// Entries left out because a tar stream for a build cannot carry them
    /// (FIFOs, sockets, devices): (path, what it is).
    pub skipped: Vec<(String, &'static str)>,
    /// Files whose size changed while they were read (sent padded or cut
    /// to the size first seen).
    pub changed: Vec<String>,
}

/// Reads `.dockerignore` at the top of the context `root` (none: nothing
/// is left out) and keeps the Dockerfile names and `.dockerignore` itself
/// in the context whatever it says, as docker does.
pub fn context_matcher(root: &Path) -> Result<Matcher, ContextError> {
    let mut m = match File::open(root.join(".dockerignore")) {
        Ok(f) => {
            let mut buf = Vec::new();
            f.take(crate::ignore::MAX_IGNORE_SIZE as u64 + 1)
                .read_to_end(&mut buf)
                .map_err(|e| read_err(b".dockerignore", e))?;
            Matcher::parse(&String::from_utf8_lossy(&buf))?
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Matcher::default(),
        Err(e) => return Err(read_err(b".dockerignore", e)),
    };
    for n in DOCKERFILE_NAMES {
        m.keep(n);
    }
    m.keep(".dockerignore");
    Ok(m)
}

fn is_ancestor(dir: &[u8], path: &[u8]) -> bool {
    path.len() > dir.len() && path.starts_with(dir) && path[dir.len()] == b'/'
}

struct Pending {
    rel: Vec<u8>,
    st: Stat,
    written: bool,
}

fn spec_of<'a>(rel: &'a [u8], kind: Kind, st: &Stat) -> HeaderSpec<'a> {
    let mut h = HeaderSpec::new(rel, kind);
    h.mode = st.st_mode & 0o7777;
    h.mtime = st.st_mtime;
    h.mtime_nsec = st.st_mtime_nsec as u32;
    h
}

/// Writes the context directory `root` as a tar stream to `out` (then the
/// end-of-archive marker), leaving out what `ignore` excludes. Entries are
/// owned by 0:0 as the docker CLI sends them; symlinks are sent as
/// symlinks, further names of a file already sent as hard links; FIFOs, sockets and devices are left out and listed in the
/// stats (never opened). A directory excluded with an exception below it
/// is walked and written only when something below it is.
pub fn write_context<W: Write>(
    out: W,
    root: &Path,
    ignore: &Matcher,
) -> Result<(W, ContextStats), ContextError> {
    let root_fd = rustix::fs::open(
        root,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| read_err(b"", e.into()))?;
    let mut b = Builder::new(out);
    let mut stats = ContextStats::default();
    let mut dirs: Vec<Pending> = Vec::new();
    let mut link = Vec::new();
    // Files with several links already sent: (dev, ino) -> name.
    let mut linked: std::collections::HashMap<(u64, u64), Vec<u8>> =
        std::collections::HashMap::new();
    walk(root_fd, &mut |w| {
        while dirs.last().is_some_and(|d| !is_ancestor(&d.rel, w.rel)) {
            dirs.pop();
        }
        let ft = file_type(w.st);
        let excluded = ignore.excludes(w.rel);
        if ft == FileType::Directory {
            if excluded && !ignore.walk_excluded_dir(w.rel) {
                return Ok(false);
            }
            dirs.push(Pending {
                rel: w.rel.to_vec(),
                st: *w.st,
                written: false,
            });
            if !excluded {
                write_pending(&mut b, &mut dirs, &mut stats)?;
            }
            return Ok(true);
        }
        if excluded {
            return Ok(false);
        }
        let skip = match ft {
            FileType::Fifo => Some("a FIFO"),
            FileType::Socket => Some("a socket"),
            FileType::CharacterDevice => Some("a character device"),
            FileType::BlockDevice => Some("a block device"),
            _ => None,
        };
        if let Some(what) = skip {
            stats.skipped.push((rel_str(w.rel), what));
            return Ok(false);
        }
        write_pending(&mut b, &mut dirs, &mut stats)?;
        if ft == FileType::Symlink {
            link = rustix::fs::readlinkat(w.dir, w.name, std::mem::take(&mut link))
                .map_err(|e| read_err(w.rel, e.into()))?
                .into_bytes();
            let mut h = spec_of(w.rel, Kind::Symlink, w.st);
            h.link = &link;
            b.append(&h, &mut io::empty())
                .map_err(ContextError::Write)?;
            stats.entries += 1;
            return Ok(false);
        }
        if w.st.st_nlink > 1 {
            let id = (w.st.st_dev, w.st.st_ino);
            if let Some(first) = linked.get(&id) {
                let mut h = spec_of(w.rel, Kind::HardLink, w.st);
                h.link = first;
                b.append(&h, &mut io::empty())
                    .map_err(ContextError::Write)?;
                stats.entries += 1;
                return Ok(false);
            }
            linked.insert(id, w.rel.to_vec());
        }
        let Some((f, st)) = open_regular(w.dir, w.name).map_err(|e| read_err(w.rel, e))? else {
            stats.skipped.push((rel_str(w.rel), "not a regular file"));
            return Ok(false);
        };
        let mut h = spec_of(w.rel, Kind::File, &st);
        h.size = st.st_size as u64;
        let mut data = ReadErr {
            inner: f.take(h.size),
            err: None,
        };
        let whole = b.append(&h, &mut data).map_err(ContextError::Write)?;
        if let Some(e) = data.err {
            return Err(read_err(w.rel, e));
        }
        if !whole
            || data
                .inner
                .into_inner()
                .read(&mut [0u8; 1])
                .is_ok_and(|n| n > 0)
        {
            stats.changed.push(rel_str(w.rel));
        }
        stats.entries += 1;
        stats.bytes += h.size;
        Ok(false)
    })?;
    let out = b.finish().map_err(ContextError::Write)?;
    Ok((out, stats))
}

/// A reader that keeps its error apart, so that a read error on a context
/// file (or a COPY source) is told from a write error on the stream.
pub(crate) struct ReadErr<R> {
    pub(crate) inner: R,
    pub(crate) err: Option<io::Error>,
}

impl<R: Read> Read for ReadErr<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.inner.read(buf) {
            Ok(n) => Ok(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Err(e),
            Err(e) => {
                self.err = Some(e);
                // Ends the data: the writer pads, the caller reports.
                Ok(0)
            }
        }
    }
}

fn write_pending<W: Write>(
    b: &mut Builder<W>,
    dirs: &mut [Pending],
    stats: &mut ContextStats,
) -> Result<(), ContextError> {
    for d in dirs.iter_mut().filter(|d| !d.written) {
        let h = spec_of(&d.rel, Kind::Directory, &d.st);
        b.append(&h, &mut io::empty())
            .map_err(ContextError::Write)?;
        d.written = true;
        stats.entries += 1;
    }
    Ok(())
}

/// Opens `rel` below `dir` with openat2 and `how`.
fn open2(dir: BorrowedFd<'_>, rel: &[u8], flags: OFlags, how: ResolveFlags) -> io::Result<OwnedFd> {
    let rel: &[u8] = if rel.is_empty() { b"." } else { rel };
    Ok(rustix::fs::openat2(
        dir,
        rel,
        flags | OFlags::CLOEXEC,
        Mode::empty(),
        how | ResolveFlags::NO_MAGICLINKS,
    )?)
}

/// The path an open file descriptor stands for.
fn fd_path(fd: BorrowedFd<'_>) -> io::Result<PathBuf> {
    use std::os::fd::AsRawFd;
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// A checked `--sub-dir`: the directory, open, and its path.
#[derive(Debug)]
pub struct SubDir {
    pub fd: OwnedFd,
    pub path: PathBuf,
}

/// Opens `--sub-dir SUB` of the repository checked out at `repo`: refused
/// when absolute, when it goes up (`..`) or when a symlink on the way
/// leads out of the repository; it must be a directory. An empty SUB or
/// `.` is the repository itself.
pub fn open_sub_dir(repo: &Path, sub: &str) -> Result<SubDir, ContextError> {
    let refused = |why| ContextError::SubDirRefused {
        sub: one_line(sub).into_owned(),
        why,
    };
    if sub.starts_with('/') {
        return Err(refused("it must be relative to the repository"));
    }
    if sub.split('/').any(|c| c == "..") {
        return Err(refused("it leaves the repository"));
    }
    if sub.as_bytes().contains(&0) {
        return Err(refused("it contains a NUL byte"));
    }
    let repo_fd = rustix::fs::open(
        repo,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| read_err(b"", e.into()))?;
    let fd = match open2(
        repo_fd.as_fd(),
        sub.as_bytes(),
        OFlags::RDONLY | OFlags::DIRECTORY,
        ResolveFlags::BENEATH,
    ) {
        Ok(fd) => fd,
        Err(e) => {
            return Err(match e.raw_os_error() {
                Some(n) if n == rustix::io::Errno::XDEV.raw_os_error() => {
                    refused("a symlink in it leads out of the repository")
                }
                Some(n) if n == rustix::io::Errno::NOENT.raw_os_error() => {
                    ContextError::SubDirMissing {
                        sub: one_line(sub).into_owned(),
                    }
                }
                Some(n) if n == rustix::io::Errno::NOTDIR.raw_os_error() => {
                    refused("it is not a directory")
                }
                Some(n) if n == rustix::io::Errno::LOOP.raw_os_error() => {
                    refused("too many levels of symlinks")
                }
                _ => read_err(sub.as_bytes(), e),
            });
        }
    };
    let path = fd_path(fd.as_fd()).map_err(|e| read_err(sub.as_bytes(), e))?;
    Ok(SubDir { fd, path })
}

/// The Dockerfile of a context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dockerfile {
    /// `Containerfile` or `Dockerfile`.
    pub name: &'static str,
    pub text: Vec<u8>,
}

/// Reads the Containerfile or the Dockerfile (in that order) of the
/// context `ctx`; `place` names the context in errors ("the directory
/// given", "sub-directory 'x' of URL"). A symlink may point to a file
/// inside the context only.
pub fn read_dockerfile(ctx: BorrowedFd<'_>, place: &str) -> Result<Dockerfile, ContextError> {
    for name in DOCKERFILE_NAMES {
        let bad = || ContextError::BadDockerfile {
            name,
            place: place.to_string(),
        };
        let fd = match open2(
            ctx,
            name.as_bytes(),
            OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY,
            ResolveFlags::BENEATH,
        ) {
            Ok(fd) => fd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::XDEV.raw_os_error()) => {
                return Err(bad());
            }
            Err(e) => return Err(read_err(name.as_bytes(), e)),
        };
        let st = rustix::fs::fstat(&fd).map_err(|e| read_err(name.as_bytes(), e.into()))?;
        if file_type(&st) != FileType::RegularFile {
            return Err(bad());
        }
        let mut text = Vec::new();
        File::from(fd)
            .take(MAX_DOCKERFILE + 1)
            .read_to_end(&mut text)
            .map_err(|e| read_err(name.as_bytes(), e))?;
        if text.len() as u64 > MAX_DOCKERFILE {
            return Err(ContextError::DockerfileTooLarge {
                name,
                place: place.to_string(),
            });
        }
        return Ok(Dockerfile { name, text });
    }
    Err(ContextError::NoDockerfile {
        place: place.to_string(),
    })
}

/// On the server, once the Dockerfile is read: removes `.dockerignore`
/// and the Dockerfile (`dockerfile`: its name in the context) from the
/// unpacked context `ctx` when `.dockerignore` excludes them, as the
/// docker daemon does. The client sends them whatever `.dockerignore`
/// says ([`context_matcher`]); COPY and ADD must not see them then.
pub fn trim_build_files(ctx: BorrowedFd<'_>, dockerfile: &str) -> Result<(), ContextError> {
    let fd = match open2(
        ctx,
        b".dockerignore",
        OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY,
        ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS,
    ) {
        Ok(fd) => fd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(read_err(b".dockerignore", e)),
    };
    let st = rustix::fs::fstat(&fd).map_err(|e| read_err(b".dockerignore", e.into()))?;
    if file_type(&st) != FileType::RegularFile {
        return Ok(());
    }
    let mut buf = Vec::new();
    File::from(fd)
        .take(crate::ignore::MAX_IGNORE_SIZE as u64 + 1)
        .read_to_end(&mut buf)
        .map_err(|e| read_err(b".dockerignore", e))?;
    let m = Matcher::parse(&String::from_utf8_lossy(&buf))?;
    for name in [".dockerignore", dockerfile] {
        let clean = crate::ignore::clean(name);
        if clean.contains('/') || clean == "." || clean == ".." {
            continue;
        }
        if m.excludes(clean.as_bytes()) {
            match rustix::fs::unlinkat(ctx, clean.as_str(), AtFlags::empty()) {
                Ok(()) | Err(rustix::io::Errno::NOENT) => {}
                Err(e) => return Err(read_err(clean.as_bytes(), e.into())),
            }
        }
    }
    Ok(())
}

/// What a resolved COPY/ADD source is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    /// A regular file: copied as itself, under its own name.
    File,
    /// A directory (`.` included): its content is copied, not itself.
    Dir,
    /// Something else (FIFO, device, socket): the engine refuses it.
    Other,
}

/// One COPY/ADD source resolved inside a root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// As the user wrote it (for messages).
    pub src: String,
    /// Its real path relative to the root (symlinks on the way and at the
    /// end resolved inside the root; empty for the root itself): opening it
    /// with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS` reaches it.
    pub rel: PathBuf,
    pub kind: SourceKind,
    /// The last component of the path as matched, before symlinks are
    /// resolved: a file source lands under this name (`link.txt`, not
    /// the name of the file it points to), as with docker.
    pub name: std::ffi::OsString,
}

impl Source {
    /// The name under which a file source lands in a destination directory.
    pub fn file_name(&self) -> &OsStr {
        if self.name.is_empty() {
            self.rel.file_name().unwrap_or(OsStr::new(""))
        } else {
            &self.name
        }
    }
}

/// A source path cleaned as Docker does: relative to the root, `..` never
/// above it.
pub fn clean_source(src: &str) -> String {
    crate::ignore::clean(&format!("/{src}"))
        .trim_start_matches('/')
        .to_string()
}

/// Resolves a literal path inside `root`: symlinks (also `/`-absolute
/// ones) are resolved as if `root` were `/` (`RESOLVE_IN_ROOT`), so a
/// context symlink to `/etc/passwd` names the context's own `etc/passwd`.
fn resolve_one(
    root: BorrowedFd<'_>,
    root_path: &Path,
    src: &str,
    rel: &str,
) -> Result<Option<Source>, ContextError> {
    let matched = rel;
    let fd = match open2(root, rel.as_bytes(), OFlags::PATH, ResolveFlags::IN_ROOT) {
        Ok(fd) => fd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::NOTDIR.raw_os_error()) => {
            return Ok(None);
        }
        Err(e) => {
            return Err(ContextError::BadSource {
                src: one_line(src).into_owned(),
                why: e.to_string(),
            });
        }
    };
    let st = rustix::fs::fstat(&fd).map_err(|e| read_err(rel.as_bytes(), e.into()))?;
    let real = fd_path(fd.as_fd()).map_err(|e| read_err(rel.as_bytes(), e))?;
    let rel = real
        .strip_prefix(root_path)
        .map_err(|_| ContextError::BadSource {
            src: one_line(src).into_owned(),
            why: "it resolves outside the context".to_string(),
        })?
        .to_path_buf();
    let kind = match file_type(&st) {
        FileType::RegularFile => SourceKind::File,
        FileType::Directory => SourceKind::Dir,
        _ => SourceKind::Other,
    };
    let name = Path::new(matched)
        .file_name()
        .map(OsStr::to_os_string)
        .unwrap_or_default();
    Ok(Some(Source {
        src: src.to_string(),
        rel,
        kind,
        name,
    }))
}

/// Resolves the sources of a COPY or ADD inside `root` (the unpacked
/// context, or a stage's root for `--from`): each is cleaned
/// ([`clean_source`]); a source with wildcards is matched component by
/// component as Go's `filepath.Match` (sorted, a glob matching nothing is
/// an error); symlinks are resolved inside `root`, never out of it.
pub fn resolve_sources(root: &Path, srcs: &[String]) -> Result<Vec<Source>, ContextError> {
    let root_fd = rustix::fs::open(
        root,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| read_err(b"", e.into()))?;
    let root_path = fd_path(root_fd.as_fd()).map_err(|e| read_err(b"", e))?;
    let mut out = Vec::new();
    for src in srcs {
        let cleaned = clean_source(src);
        if !Pattern::has_meta(&cleaned) {
            match resolve_one(root_fd.as_fd(), &root_path, src, &cleaned)? {
                Some(s) => out.push(s),
                None => {
                    return Err(ContextError::NoSource {
                        src: one_line(src).into_owned(),
                    });
                }
            }
            continue;
        }
        let before = out.len();
        let mut cands: Vec<String> = vec![String::new()];
        for comp in cleaned.split('/') {
            let mut next = Vec::new();
            if !Pattern::has_meta(comp) {
                for c in cands {
                    let p = if c.is_empty() {
                        comp.to_string()
                    } else {
                        format!("{c}/{comp}")
                    };
                    // Only paths that exist go on (`*/x` where a match has
                    // no `x`).
                    if open2(
                        root_fd.as_fd(),
                        p.as_bytes(),
                        OFlags::PATH,
                        ResolveFlags::IN_ROOT,
                    )
                    .is_ok()
                    {
                        next.push(p);
                    }
                }
            } else {
                let pat = Pattern::component(comp).map_err(|e| ContextError::BadSource {
                    src: one_line(src).into_owned(),
                    why: e.to_string(),
                })?;
                for c in cands {
                    let Ok(fd) = open2(
                        root_fd.as_fd(),
                        c.as_bytes(),
                        OFlags::RDONLY | OFlags::DIRECTORY,
                        ResolveFlags::IN_ROOT,
                    ) else {
                        continue;
                    };
                    let names = list_dir(fd.as_fd()).map_err(|e| read_err(c.as_bytes(), e))?;
                    for n in names.into_iter().filter(|n| pat.matches(n)) {
                        let n = String::from_utf8_lossy(&n);
                        next.push(if c.is_empty() {
                            n.into_owned()
                        } else {
                            format!("{c}/{n}")
                        });
                        if next.len() > MAX_GLOB_MATCHES {
                            return Err(ContextError::TooManyMatches {
                                src: one_line(src).into_owned(),
                            });
                        }
                    }
                }
            }
            cands = next;
        }
        for c in cands {
            // As docker: a match that does not resolve (a symlink to
            // nothing inside the root) fails the step.
            match resolve_one(root_fd.as_fd(), &root_path, src, &c)? {
                Some(s) => out.push(s),
                None => {
                    return Err(ContextError::NoSource {
                        src: one_line(&c).into_owned(),
                    });
                }
            }
        }
        if out.len() == before {
            return Err(ContextError::NoMatch {
                src: one_line(src).into_owned(),
            });
        }
    }
    Ok(out)
}

/// Protocols git may use for a build (never `ext::`, which runs commands).
pub const GIT_PROTOCOLS: &str = "file:git:http:https:ssh";
/// Most bytes of git's stderr kept for the error line.
const GIT_STDERR_MAX: usize = 64 * 1024;

/// The URL with any password left out (for messages and logs).
pub fn redact_url(url: &str) -> String {
    if let Some(scheme_end) = url.find("://") {
        let rest = &url[scheme_end + 3..];
        let host_end = rest.find('/').unwrap_or(rest.len());
        if let Some(at) = rest[..host_end].rfind('@') {
            let user = &rest[..at];
            if let Some(colon) = user.find(':') {
                return format!(
                    "{}{}:***{}",
                    &url[..scheme_end + 3],
                    &user[..colon],
                    &rest[at..]
                );
            }
        }
    }
    url.to_string()
}

/// The line of git's stderr to show: its first `fatal:`/`error:` line, or
/// its last line.
fn git_why(stderr: &[u8], url: &str) -> String {
    let text = String::from_utf8_lossy(stderr);
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let line = lines
        .iter()
        .find(|l| l.starts_with("fatal:") || l.starts_with("error:"))
        .or(lines.last())
        .copied()
        .unwrap_or("git exited with an error");
    let mut line = line.to_string();
    if url.contains('@') {
        let red = redact_url(url);
        line = line.replace(url, &red);
    }
    let mut s = one_line(&line).into_owned();
    if s.len() > 400 {
        let mut cut = 400;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}

/// Clones `url` into the new directory `dir` with the system git
/// (`--depth 1 --single-branch`, any URL git takes, `file://` included,
/// never prompting). After `timeout` git and what it started are killed.
/// Errors are one line: the URL (password left out) and git's reason.
pub fn git_clone(url: &str, dir: &Path, timeout: Duration) -> Result<(), ContextError> {
    let fail = |why: String| ContextError::Git {
        url: one_line(&redact_url(url)).into_owned(),
        why,
    };
    if url.starts_with('-') || url.is_empty() {
        return Err(fail("not a repository URL".to_string()));
    }
    use std::os::unix::process::CommandExt;
    let mut child = Command::new("git")
        .args(["clone", "--depth", "1", "--single-branch", "--quiet", "--"])
        .arg(url)
        .arg(dir)
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_ALLOW_PROTOCOL", GIT_PROTOCOLS)
        .env("GIT_SSH_COMMAND", "ssh -o BatchMode=yes")
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|e| fail(format!("cannot run git: {e}")))?;
    let pid = rustix::process::Pid::from_child(&child);
    let mut stderr = child.stderr.take().expect("piped stderr");
    let reader = std::thread::spawn(move || {
        let mut kept = Vec::new();
        let _ = (&mut stderr)
            .take(GIT_STDERR_MAX as u64)
            .read_to_end(&mut kept);
        let _ = io::copy(&mut stderr, &mut io::sink());
        kept
    });
    let exited = wait_exit(&child, timeout);
    // The group is still ours while its leader is not reaped: kill what is
    // left of it (remote helpers, upload-pack) so that the pipe closes.
    let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
    let status = child.wait();
    let err = reader.join().unwrap_or_default();
    match exited {
        Ok(true) => {}
        Ok(false) => {
            let t = if timeout.as_secs() > 0 {
                format!("{} seconds", timeout.as_secs())
            } else {
                format!("{} ms", timeout.as_millis())
            };
            return Err(fail(format!("git did not finish within {t}")));
        }
        Err(e) => return Err(fail(format!("cannot wait for git: {e}"))),
    }
    match status {
        Ok(s) if s.success() => Ok(()),
        Ok(_) => Err(fail(git_why(&err, url))),
        Err(e) => Err(fail(format!("cannot wait for git: {e}"))),
    }
}

/// Waits until `child` exits (true) or `timeout` passes (false), without
/// reaping it.
fn wait_exit(child: &std::process::Child, timeout: Duration) -> io::Result<bool> {
    use nix::poll::{PollFd, PollFlags, PollTimeout};
    let pidfd = rustix::process::pidfd_open(
        rustix::process::Pid::from_child(child),
        rustix::process::PidfdFlags::empty(),
    )?;
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        // Rounded up to a millisecond so that the loop does not spin.
        let ms = left.as_millis().min(3_600_000) as u32
            + u32::from(!left.subsec_nanos().is_multiple_of(1_000_000));
        let t = PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(pidfd.as_fd(), PollFlags::POLLIN)];
        match nix::poll::poll(&mut fds, t) {
            Ok(0) if left.is_zero() => return Ok(false),
            Ok(0) => continue,
            Ok(_) => return Ok(true),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// A source path as bytes (for digests).
pub(crate) fn path_bytes(p: &Path) -> &[u8] {
    p.as_os_str().as_bytes()
}
