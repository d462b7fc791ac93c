//! Directory resolution confined to a root: `openat2` with
//! `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS` where the kernel has it, else
//! (and to explain a refusal) a walk one component at a time with
//! `O_NOFOLLOW | O_DIRECTORY`.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};

use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat, openat2};
use nix::sys::stat::{FileStat, Mode, SFlag, fstatat, mkdirat};

/// 0: unknown, 1: openat2 works, 2: it does not (ENOSYS).
static OPENAT2: AtomicU8 = AtomicU8::new(0);

/// Tests: behave as on a kernel without `openat2` (this process only).
#[cfg(test)]
pub(crate) fn disable_openat2() {
    OPENAT2.store(2, Ordering::Relaxed);
}

pub(crate) const DIR_FLAGS: OFlag = OFlag::O_RDONLY
    .union(OFlag::O_DIRECTORY)
    .union(OFlag::O_NOFOLLOW)
    .union(OFlag::O_CLOEXEC);

/// Why a path could not be resolved as a chain of real directories.
pub(crate) enum ResolveError {
    /// `prefix` (relative, the components up to and including the bad
    /// one) is a symlink.
    Symlink(Vec<u8>),
    /// `prefix` is not a directory.
    NotDir(Vec<u8>),
    /// `prefix` does not exist (and was not to be created).
    Missing(Vec<u8>),
    /// The prefix could not be created or opened.
    Io(Vec<u8>, io::Error),
}

/// Opens the directory `comps` (components, no `.`/`..`/empty ones) below
/// `base`, never leaving it nor following a symlink; creates missing
/// directories (mode 0755) when `create`. `shown` is the part of the path
/// that leads to `base` (for messages).
pub(crate) fn open_dir_beneath(
    base: BorrowedFd<'_>,
    shown: &[u8],
    comps: &[&[u8]],
    create: bool,
    path_buf: &mut Vec<u8>,
) -> Result<OwnedFd, ResolveError> {
    if comps.is_empty() {
        return dup(base).map_err(|e| ResolveError::Io(shown.to_vec(), e));
    }
    if OPENAT2.load(Ordering::Relaxed) != 2 {
        path_buf.clear();
        for (i, c) in comps.iter().enumerate() {
            if i > 0 {
                path_buf.push(b'/');
            }
            path_buf.extend_from_slice(c);
        }
        let how = OpenHow::new().flags(DIR_FLAGS).resolve(
            ResolveFlag::RESOLVE_BENEATH
                | ResolveFlag::RESOLVE_NO_SYMLINKS
                | ResolveFlag::RESOLVE_NO_MAGICLINKS,
        );
        match openat2(base, path_buf.as_slice(), how) {
            Ok(fd) => {
                OPENAT2.store(1, Ordering::Relaxed);
                return Ok(fd);
            }
            Err(Errno::ENOSYS) => OPENAT2.store(2, Ordering::Relaxed),
            // Anything else (missing, symlink, not a directory, too
            // long, EAGAIN...): the walk below explains or creates.
            Err(_) => {}
        }
    }
    walk(base, shown, comps, create)
}

fn dup(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    fd.try_clone_to_owned()
}

fn prefix_of(shown: &[u8], comps: &[&[u8]], upto: usize) -> Vec<u8> {
    let mut p = shown.to_vec();
    for c in &comps[..=upto] {
        if !p.is_empty() {
            p.push(b'/');
        }
        p.extend_from_slice(c);
    }
    p
}

/// The component-by-component rule.
fn walk(
    base: BorrowedFd<'_>,
    shown: &[u8],
    comps: &[&[u8]],
    create: bool,
) -> Result<OwnedFd, ResolveError> {
    let mut cur: Option<OwnedFd> = None;
    for (i, c) in comps.iter().enumerate() {
        let dir = cur.as_ref().map(|f| f.as_fd()).unwrap_or(base);
        let next = match openat(dir, *c, DIR_FLAGS, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) if create => {
                match mkdirat(dir, *c, Mode::from_bits_truncate(0o755)) {
                    Ok(()) | Err(Errno::EEXIST) => {}
                    Err(e) => {
                        return Err(ResolveError::Io(prefix_of(shown, comps, i), e.into()));
                    }
                }
                openat(dir, *c, DIR_FLAGS, Mode::empty())
                    .map_err(|e| classify(dir, shown, comps, i, e))?
            }
            Err(e) => return Err(classify(dir, shown, comps, i, e)),
        };
        cur = Some(next);
    }
    Ok(cur.expect("at least one component"))
}

fn classify(
    dir: BorrowedFd<'_>,
    shown: &[u8],
    comps: &[&[u8]],
    i: usize,
    e: Errno,
) -> ResolveError {
    let prefix = prefix_of(shown, comps, i);
    match e {
        Errno::ENOENT => ResolveError::Missing(prefix),
        Errno::ELOOP | Errno::ENOTDIR => match lstat_at(dir, comps[i]) {
            Ok(st) if is_symlink(&st) => ResolveError::Symlink(prefix),
            Ok(_) => ResolveError::NotDir(prefix),
            Err(e) => ResolveError::Io(prefix, e),
        },
        e => ResolveError::Io(prefix, e.into()),
    }
}

pub(crate) fn lstat_at(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<FileStat> {
    fstatat(dir, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW).map_err(io::Error::from)
}

pub(crate) fn is_symlink(st: &FileStat) -> bool {
    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFLNK
}

pub(crate) fn is_dir(st: &FileStat) -> bool {
    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR
}

/// Removes `name` in `dir` whatever it is (a directory with its whole
/// content), never following a symlink nor crossing a mount; missing is
/// fine. See [`crate::remove`]: no recursion, one descriptor.
pub(crate) fn remove_at(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<()> {
    crate::remove::remove_tree_at(dir, name).map_err(io::Error::from)
}

/// A path naming `name` in the directory `dir`, for the few calls that
/// only take paths (xattrs of symlinks and device nodes):
/// `/proc/self/fd/<dir>/<name>` where /proc is mounted, else
/// `fallback` (the full path, resolved with the root's own path).
pub(crate) fn at_path(
    dir: BorrowedFd<'_>,
    name: &[u8],
    fallback: impl FnOnce() -> PathBuf,
) -> PathBuf {
    static PROC: AtomicU8 = AtomicU8::new(0);
    let have = match PROC.load(Ordering::Relaxed) {
        0 => {
            let ok = Path::new("/proc/self/fd").is_dir();
            PROC.store(if ok { 1 } else { 2 }, Ordering::Relaxed);
            ok
        }
        v => v == 1,
    };
    if have {
        let mut p = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
        p.push(OsStr::from_bytes(name));
        p
    } else {
        fallback()
    }
}

/// `fstat` of a descriptor (`O_PATH` ones included).
pub(crate) fn fstat_path_fd(fd: BorrowedFd<'_>) -> io::Result<FileStat> {
    nix::sys::stat::fstat(fd).map_err(io::Error::from)
}

/// Changes the mode of the inode an `O_PATH` descriptor names (through its
/// `/proc/self/fd` link, which `fchmod` cannot take).
pub(crate) fn chmod_path_fd(fd: BorrowedFd<'_>, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let p = format!("/proc/self/fd/{}", fd.as_raw_fd());
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
}
