//! The one tree removal: whatever is at a name (a file, a symlink, or a
//! directory with its whole content), removed without recursion and with a
//! constant number of descriptors, however deep the tree.
//!
//! The walk holds one directory descriptor: it goes down by name
//! (`O_NOFOLLOW | O_DIRECTORY`, so never through a symlink) and back up
//! with `".."`, checking that the directory it reaches is the one it came
//! from (device and inode recorded on the way down, O(depth) memory), so a
//! tree moved while it is removed stops the removal instead of taking it
//! somewhere else. It never crosses into another mount (the mount id from
//! `statx`, or the device where the kernel lacks it): a mount found inside
//! is an error and stays untouched. Directories without write or search
//! permission are made accessible (0700) first; what cannot be removed
//! (an immutable or append-only attribute) is an error naming the entry.

use std::ffi::OsStr;
use std::fmt;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{OFlag, openat};
use nix::sys::stat::{Mode, fchmod};
use nix::unistd::UnlinkatFlags;
use rustix::fs::{AtFlags, StatxFlags};

use crate::fsops::{self, DIR_FLAGS};

/// Above this many components, a path in a [`RemoveError`] is shown by its
/// last few components and its depth.
const SHOWN_COMPONENTS: usize = 8;

/// Why a tree could not be removed, and where: the path of the entry (the
/// removed root's path, then the components below it, shortened for deep
/// trees) and the cause.
#[derive(Debug)]
pub struct RemoveError {
    root: String,
    below: Vec<Vec<u8>>,
    source: io::Error,
}

impl RemoveError {
    fn new(root: &[u8], below: &[Vec<u8>], source: io::Error) -> Self {
        // Only what is shown is kept: a deep tree's full path can be MiBs.
        let below = if below.len() > SHOWN_COMPONENTS {
            let mut v = Vec::with_capacity(4);
            v.push(format!("... {} levels down ...", below.len()).into_bytes());
            v.extend(below[below.len() - 3..].iter().cloned());
            v
        } else {
            below.to_vec()
        };
        RemoveError {
            root: String::from_utf8_lossy(root).into_owned(),
            below,
            source,
        }
    }

    /// The cause.
    pub fn io_error(&self) -> &io::Error {
        &self.source
    }
}

impl fmt::Display for RemoveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cannot remove '{}", self.root)?;
        for c in &self.below {
            write!(f, "/{}", String::from_utf8_lossy(c))?;
        }
        write!(f, "': {}", self.source)
    }
}

impl std::error::Error for RemoveError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

impl From<RemoveError> for io::Error {
    fn from(e: RemoveError) -> io::Error {
        io::Error::new(e.source.kind(), e)
    }
}

/// Removes whatever is at `path` (see the module doc); missing is fine.
/// The path's last component is not followed when it is a symlink (the
/// link is removed); the components before it are resolved as usual.
pub fn remove_tree(path: &Path) -> Result<(), RemoveError> {
    let shown = path.as_os_str().as_bytes();
    let name = match path.file_name() {
        Some(n) if !path.as_os_str().as_bytes().ends_with(b"/.") => n,
        _ => {
            return Err(RemoveError::new(
                shown,
                &[],
                io::Error::new(io::ErrorKind::InvalidInput, "not a removable name"),
            ));
        }
    };
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let pfd = match nix::fcntl::open(
        parent,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(Errno::ENOENT) => return Ok(()),
        Err(e) => {
            return Err(RemoveError::new(
                parent.as_os_str().as_bytes(),
                &[],
                e.into(),
            ));
        }
    };
    remove_at_shown(pfd.as_fd(), name, shown)
}

/// Removes `name` in the directory `parent` (see the module doc); missing
/// is fine. Messages show paths from `name` on.
pub fn remove_tree_at(parent: BorrowedFd<'_>, name: &[u8]) -> Result<(), RemoveError> {
    remove_at_shown(parent, OsStr::from_bytes(name), name)
}

/// The identity of a directory: its device, inode and mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Ident {
    dev: u64,
    ino: u64,
    /// None where `statx` cannot tell (kernel before 5.8).
    mnt: Option<u64>,
}

fn ident(fd: BorrowedFd<'_>) -> io::Result<Ident> {
    let st = rustix::fs::statx(
        fd,
        c"",
        AtFlags::EMPTY_PATH,
        StatxFlags::INO | StatxFlags::MNT_ID,
    )?;
    Ok(Ident {
        dev: nix::sys::stat::makedev(u64::from(st.stx_dev_major), u64::from(st.stx_dev_minor)),
        ino: st.stx_ino,
        mnt: StatxFlags::from_bits_retain(st.stx_mask)
            .contains(StatxFlags::MNT_ID)
            .then_some(st.stx_mnt_id),
    })
}

/// Same filesystem mount as `top`.
fn same_mount(top: &Ident, other: &Ident) -> bool {
    other.dev == top.dev && (top.mnt.is_none() || other.mnt.is_none() || top.mnt == other.mnt)
}

fn mount_error() -> io::Error {
    io::Error::new(
        io::ErrorKind::ResourceBusy,
        "it is a mount point: not removed (unmount it first)",
    )
}

/// Opens the directory `name` in `dir` without following a symlink, made
/// readable and searchable (0700) when it was not.
fn open_dir(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<OwnedFd> {
    match openat(dir, name, DIR_FLAGS, Mode::empty()) {
        Ok(fd) => Ok(fd),
        Err(Errno::EACCES) => {
            // O_PATH needs no permission on the directory itself.
            let p = openat(dir, name, DIR_FLAGS | OFlag::O_PATH, Mode::empty())?;
            let st = fsops::fstat_path_fd(p.as_fd())?;
            if !fsops::is_dir(&st) {
                return Err(Errno::ENOTDIR.into());
            }
            // The descriptor's magic link names exactly this inode: no
            // symlink swapped in between can redirect the chmod.
            fsops::chmod_path_fd(p.as_fd(), 0o700)?;
            Ok(openat(dir, name, DIR_FLAGS, Mode::empty())?)
        }
        Err(e) => Err(e.into()),
    }
}

fn unlink(dir: BorrowedFd<'_>, name: &[u8], flags: UnlinkatFlags) -> Result<(), Errno> {
    nix::unistd::unlinkat(dir, name, flags)
}

/// What removing one entry of a directory gave.
enum Step {
    Gone,
    /// A directory: to empty from inside, then remove.
    Dir,
}

/// Removes the entry `name` of `cur` unless it is a directory. A directory
/// is never `rmdir`ed before it is known to be empty: on a non-empty one,
/// `rmdir` walks every cached dentry below it before it fails, which makes
/// a deep tree quadratic.
fn remove_entry(cur: BorrowedFd<'_>, name: &[u8]) -> io::Result<Step> {
    let mut chmodded = false;
    loop {
        match unlink(cur, name, UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => return Ok(Step::Gone),
            // EISDIR on Linux; EPERM is also what POSIX allows, and what an
            // immutable file gives: lstat tells.
            Err(Errno::EISDIR) | Err(Errno::EPERM) => {
                return match fsops::lstat_at(cur, name) {
                    Ok(st) if fsops::is_dir(&st) => Ok(Step::Dir),
                    Ok(_) => Err(immutable(Errno::EPERM)),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Step::Gone),
                    Err(e) => Err(e),
                };
            }
            Err(Errno::EACCES) if !chmodded => {
                // `cur` is not writable (or searchable) for us.
                fchmod(cur, Mode::from_bits_truncate(0o700))?;
                chmodded = true;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Removes the directory `name` of `cur`, emptied; false when it is not
/// empty (filled again since).
fn rmdir(cur: BorrowedFd<'_>, name: &[u8]) -> io::Result<bool> {
    let mut chmodded = false;
    loop {
        match unlink(cur, name, UnlinkatFlags::RemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => return Ok(true),
            Err(Errno::ENOTEMPTY) | Err(Errno::EEXIST) => return Ok(false),
            Err(Errno::EBUSY) => return Err(mount_error()),
            Err(Errno::EPERM) => return Err(immutable(Errno::EPERM)),
            Err(Errno::EACCES) if !chmodded => {
                fchmod(cur, Mode::from_bits_truncate(0o700))?;
                chmodded = true;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

fn immutable(e: Errno) -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!(
            "{} (an immutable or append-only attribute? see lsattr)",
            io::Error::from(e)
        ),
    )
}

/// A directory emptied from inside found non-empty again this many times
/// in a row: something keeps filling it, the removal stops.
const MAX_REFILLS: u32 = 3;

fn refilled_error() -> io::Error {
    io::Error::other("entries keep appearing in it while it is removed")
}

fn remove_at_shown(parent: BorrowedFd<'_>, name: &OsStr, shown: &[u8]) -> Result<(), RemoveError> {
    let name = name.as_bytes();
    let err = |below: &[Vec<u8>], e: io::Error| RemoveError::new(shown, below, e);
    match remove_entry(parent, name) {
        Ok(Step::Gone) => return Ok(()),
        Ok(Step::Dir) => {}
        Err(e) => return Err(err(&[], e)),
    }
    let top_fd = open_dir(parent, name).map_err(|e| err(&[], e))?;
    let parent_id = ident(parent).map_err(|e| err(&[], e))?;
    let top = ident(top_fd.as_fd()).map_err(|e| err(&[], e))?;
    if !same_mount(&parent_id, &top) {
        return Err(err(&[], mount_error()));
    }
    // The directories from the top to `cur`, and their names below the top.
    let mut ids: Vec<Ident> = vec![top];
    let mut names: Vec<Vec<u8>> = Vec::new();
    let mut cur = nix::dir::Dir::from_fd(top_fd).map_err(|e| err(&[], e.into()))?;
    let mut refills = 0u32;
    loop {
        let mut child: Option<Vec<u8>> = None;
        {
            // The listing (rewound when its iterator drops) and the
            // directory's descriptor for the *at calls.
            let fd = cur
                .as_fd()
                .try_clone_to_owned()
                .map_err(|e| err(&names, e))?;
            for ent in cur.iter() {
                let ent = ent.map_err(|e| err(&names, e.into()))?;
                let n = ent.file_name().to_bytes();
                if n == b"." || n == b".." {
                    continue;
                }
                let step = if ent.file_type() == Some(nix::dir::Type::Directory) {
                    Ok(Step::Dir)
                } else {
                    remove_entry(fd.as_fd(), n)
                };
                match step {
                    Ok(Step::Gone) => {}
                    Ok(Step::Dir) => {
                        child = Some(n.to_vec());
                        break;
                    }
                    Err(e) => {
                        names.push(n.to_vec());
                        return Err(err(&names, e));
                    }
                }
            }
        }
        if let Some(c) = child {
            names.push(c);
            let fd =
                open_dir(cur.as_fd(), names.last().expect("pushed")).map_err(|e| err(&names, e))?;
            let id = ident(fd.as_fd()).map_err(|e| err(&names, e))?;
            if !same_mount(&top, &id) {
                return Err(err(&names, mount_error()));
            }
            ids.push(id);
            cur = nix::dir::Dir::from_fd(fd).map_err(|e| err(&names, e.into()))?;
            continue;
        }
        // `cur` is empty now.
        if names.is_empty() {
            match rmdir(parent, name) {
                Ok(true) => return Ok(()),
                Ok(false) if refills < MAX_REFILLS => refills += 1,
                Ok(false) => return Err(err(&[], refilled_error())),
                Err(e) => return Err(err(&[], e)),
            }
            continue;
        }
        let up = openat(cur.as_fd(), "..", DIR_FLAGS, Mode::empty())
            .map_err(|e| err(&names, e.into()))?;
        ids.pop();
        let expected = *ids.last().expect("the top stays");
        let got = ident(up.as_fd()).map_err(|e| err(&names, e))?;
        if got.dev != expected.dev || got.ino != expected.ino {
            return Err(err(
                &names,
                io::Error::other("the tree was moved while it was removed: stopped"),
            ));
        }
        cur = nix::dir::Dir::from_fd(up).map_err(|e| err(&names, e.into()))?;
        match rmdir(cur.as_fd(), names.last().expect("below the top")) {
            Ok(true) => refills = 0,
            Ok(false) if refills < MAX_REFILLS => refills += 1,
            Ok(false) => return Err(err(&names, refilled_error())),
            Err(e) => return Err(err(&names, e)),
        }
        names.pop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;
    use std::path::PathBuf;
    use std::process::Command;

    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    use nix::sys::stat::mkdirat;

    /// Builds `levels` nested directories `d` below `root/name` (walking
    /// down with one descriptor), with a file in every 1000th; returns the
    /// descriptor of the deepest.
    fn deep_chain(root: &Path, name: &str, levels: usize) -> OwnedFd {
        fs::create_dir(root.join(name)).unwrap();
        let mut cur = nix::fcntl::open(&root.join(name), DIR_FLAGS, Mode::empty()).unwrap();
        for i in 0..levels {
            if i % 1000 == 0 {
                let f = openat(
                    cur.as_fd(),
                    "f",
                    OFlag::O_CREAT | OFlag::O_WRONLY | OFlag::O_CLOEXEC,
                    Mode::from_bits_truncate(0o644),
                )
                .unwrap();
                drop(f);
            }
            mkdirat(cur.as_fd(), "d", Mode::from_bits_truncate(0o755)).unwrap();
            cur = openat(cur.as_fd(), "d", DIR_FLAGS, Mode::empty()).unwrap();
        }
        cur
    }

    /// A temporary directory on tmpfs: on the ext4 here (mounted with
    /// `discard`), every rmdir costs milliseconds, which a 100 000-level
    /// tree turns into minutes whatever the algorithm.
    fn shm_tempdir() -> tempfile::TempDir {
        tempfile::tempdir_in("/dev/shm").expect("a tempdir in /dev/shm (tmpfs)")
    }

    /// The highest descriptor number open now.
    fn highest_fd() -> u64 {
        fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u64>().ok())
            .max()
            .unwrap_or(2)
    }

    /// Runs `f` with `RLIMIT_NOFILE` at 32 above the descriptors open now
    /// (nextest runs each test in its own process).
    fn with_few_fds<T>(f: impl FnOnce() -> T) -> T {
        let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        setrlimit(Resource::RLIMIT_NOFILE, highest_fd() + 32, hard).unwrap();
        let r = f();
        setrlimit(Resource::RLIMIT_NOFILE, soft, hard).unwrap();
        r
    }

    #[test]
    fn removes_100000_levels_with_few_fds_and_no_recursion() {
        let tmp = shm_tempdir();
        let bottom = deep_chain(tmp.path(), "tree", 100_000);
        drop(bottom);
        // std's recursive removal needs a descriptor per level: it fails
        // under the same limit, which makes the limit meaningful.
        let std_result = with_few_fds(|| fs::remove_dir_all(tmp.path().join("tree")));
        assert!(
            std_result.is_err(),
            "the limit must bite a recursive removal"
        );
        // Run on a thread with a small stack: recursion would overflow it.
        let root = tmp.path().to_path_buf();
        let r = std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(move || with_few_fds(|| remove_tree(&root.join("tree"))))
            .unwrap()
            .join()
            .unwrap();
        r.unwrap();
        assert!(!tmp.path().join("tree").exists());
        assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 0);
    }

    #[test]
    fn symlinks_are_removed_never_followed() {
        let tmp = shm_tempdir();
        let outside = tmp.path().join("outside");
        fs::create_dir_all(outside.join("sub")).unwrap();
        fs::write(outside.join("sentinel"), b"keep").unwrap();
        fs::write(outside.join("sub/sentinel"), b"keep").unwrap();
        let bottom = deep_chain(tmp.path(), "tree", 3000);
        // Links to the outside, at the bottom and at the top.
        for (dir, name, target) in [
            (bottom.as_fd(), "to-dir", outside.clone()),
            (bottom.as_fd(), "to-file", outside.join("sentinel")),
            (bottom.as_fd(), "up", PathBuf::from("../../../../../../..")),
        ] {
            nix::unistd::symlinkat(&target, dir, name).unwrap();
        }
        drop(bottom);
        std::os::unix::fs::symlink(&outside, tmp.path().join("tree/d/out")).unwrap();
        // The root itself as a symlink: the link goes, the target stays.
        std::os::unix::fs::symlink(&outside, tmp.path().join("link")).unwrap();
        remove_tree(&tmp.path().join("link")).unwrap();
        assert!(fs::symlink_metadata(tmp.path().join("link")).is_err());
        remove_tree(&tmp.path().join("tree")).unwrap();
        assert!(!tmp.path().join("tree").exists());
        assert_eq!(fs::read(outside.join("sentinel")).unwrap(), b"keep");
        assert_eq!(fs::read(outside.join("sub/sentinel")).unwrap(), b"keep");
        // Missing is fine.
        remove_tree(&tmp.path().join("tree")).unwrap();
    }

    /// Mounts `what` on `target` (a tmpfs, or a bind mount of a directory),
    /// unmounted on drop.
    struct Mount(PathBuf);
    impl Mount {
        fn new(source: Option<&Path>, target: &Path) -> Mount {
            use nix::mount::{MsFlags, mount};
            match source {
                None => mount(
                    Some("tmpfs"),
                    target,
                    Some("tmpfs"),
                    MsFlags::empty(),
                    None::<&str>,
                ),
                Some(s) => mount(
                    Some(s),
                    target,
                    None::<&str>,
                    MsFlags::MS_BIND,
                    None::<&str>,
                ),
            }
            .expect("mounting (this test needs root)");
            Mount(target.to_path_buf())
        }
    }
    impl Drop for Mount {
        fn drop(&mut self) {
            let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        }
    }

    #[test]
    fn mounts_inside_are_never_crossed() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("sentinel"), b"keep").unwrap();
        // A bind mount of the same filesystem (same st_dev: only the mount
        // id tells), and a tmpfs, both deep inside.
        for source in [Some(outside.as_path()), None] {
            let tree = tmp.path().join("tree");
            fs::create_dir_all(tree.join("a/b/mnt")).unwrap();
            fs::write(tree.join("a/file"), b"x").unwrap();
            let m = Mount::new(source, &tree.join("a/b/mnt"));
            if source.is_none() {
                fs::write(tree.join("a/b/mnt/sentinel"), b"keep").unwrap();
            }
            let e = remove_tree(&tree).unwrap_err();
            assert_eq!(e.io_error().kind(), io::ErrorKind::ResourceBusy, "{e}");
            let msg = e.to_string();
            assert!(
                msg.contains("/a/b/mnt'") && msg.contains("mount point"),
                "{msg}"
            );
            assert_eq!(fs::read(tree.join("a/b/mnt/sentinel")).unwrap(), b"keep");
            // The mount point itself as the root: refused too.
            let e = remove_tree(&tree.join("a/b/mnt")).unwrap_err();
            assert!(e.to_string().contains("mount point"), "{e}");
            assert_eq!(fs::read(tree.join("a/b/mnt/sentinel")).unwrap(), b"keep");
            drop(m);
            remove_tree(&tree).unwrap();
            assert!(!tree.exists());
        }
        assert_eq!(fs::read(outside.join("sentinel")).unwrap(), b"keep");
    }

    #[test]
    fn directories_without_permissions_are_removed() {
        let tmp = shm_tempdir();
        let tree = tmp.path().join("tree");
        let bottom = deep_chain(tmp.path(), "tree", 2000);
        drop(bottom);
        fs::create_dir_all(tree.join("locked/inner")).unwrap();
        fs::write(tree.join("locked/inner/f"), b"x").unwrap();
        // Every level without permissions, from the bottom up.
        let mut p = tree.clone();
        let mut dirs = vec![tree.join("locked/inner"), tree.join("locked")];
        for _ in 0..50 {
            p.push("d");
            dirs.push(p.clone());
        }
        dirs.push(tree.clone());
        for d in &dirs {
            fs::set_permissions(d, fs::Permissions::from_mode(0o0)).unwrap();
        }
        // Without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH (capabilities
        // are per thread), as an owner without them would be.
        let r = std::thread::spawn(move || {
            use rustix::thread::{CapabilitySet, capabilities, set_capabilities};
            let mut caps = capabilities(None).unwrap();
            caps.effective
                .remove(CapabilitySet::DAC_OVERRIDE | CapabilitySet::DAC_READ_SEARCH);
            set_capabilities(None, caps).expect("dropping capabilities");
            // The permissions bite now.
            assert!(fs::read_dir(&tree).is_err(), "mode 0 must deny listing");
            remove_tree(&tree)
        })
        .join()
        .unwrap();
        r.unwrap();
        assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 0);
    }

    #[test]
    fn immutable_entries_are_named_in_the_error() {
        let tmp = tempfile::tempdir().unwrap();
        let tree = tmp.path().join("tree");
        fs::create_dir_all(tree.join("a/b")).unwrap();
        fs::write(tree.join("a/b/stuck"), b"x").unwrap();
        fs::write(tree.join("a/other"), b"x").unwrap();
        let stuck = tree.join("a/b/stuck");
        let st = Command::new("chattr")
            .arg("+i")
            .arg(&stuck)
            .status()
            .unwrap();
        assert!(
            st.success(),
            "chattr +i (this test needs root and ext4/xfs/tmpfs)"
        );
        let e = remove_tree(&tree).unwrap_err();
        let _ = Command::new("chattr").arg("-i").arg(&stuck).status();
        let msg = e.to_string();
        assert!(
            msg.contains("/a/b/stuck'") && msg.contains("immutable"),
            "{msg}"
        );
        assert_eq!(e.io_error().kind(), io::ErrorKind::PermissionDenied);
        // Now removable.
        remove_tree(&tree).unwrap();
        assert!(!tree.exists());
    }

    #[test]
    fn deep_errors_show_the_tail_and_the_depth() {
        let tmp = shm_tempdir();
        let bottom = deep_chain(tmp.path(), "tree", 500);
        mkdirat(bottom.as_fd(), "mnt", Mode::from_bits_truncate(0o755)).unwrap();
        // The path is too long for mount(2): mount through the descriptor.
        let mnt_fd = openat(bottom.as_fd(), "mnt", DIR_FLAGS, Mode::empty()).unwrap();
        let m = Mount::new(
            None,
            Path::new(&format!(
                "/proc/self/fd/{}",
                std::os::fd::AsRawFd::as_raw_fd(&mnt_fd)
            )),
        );
        let e = remove_tree(&tmp.path().join("tree")).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("501 levels down"), "{msg}");
        assert!(msg.contains("/d/d/mnt'"), "{msg}");
        assert!(msg.len() < 300, "{msg}");
        drop(m);
        drop(mnt_fd);
        drop(bottom);
        let _ = remove_tree(&tmp.path().join("tree"));
    }
}
