//! The one way walt mounts an image's layers with overlayfs: the sandbox's
//! private mount (a session upper dir, in its own mount namespace) and the
//! mounts that serve images to nodes, in the server's mount namespace
//! ([`mount_host`]).
//!
//! The new mount API (`fsopen`, `lowerdir+`, `fsmount`, `move_mount`) is
//! used where the kernel has it (6.8 and later for `lowerdir+`: hundreds
//! of layers, no option page limit); classic `mount(2)` otherwise.

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};
use rustix::io::Errno;

use crate::{ContainerError, MAX_LAYERS};

type Result<T> = std::result::Result<T, ContainerError>;

/// How the classic `mount(2)` fallback names the lower dirs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ClassicLower {
    /// Relative to their common parent, after a `chdir` there: hundreds of
    /// layers fit in one page of options. Only for a single-threaded
    /// process (the sandbox): the working directory is process-wide.
    RelativeChdir,
    /// Absolute paths (the multi-threaded server never changes its working
    /// directory); fewer layers fit.
    Absolute,
}

/// One overlay mount to make.
pub(crate) struct Overlay<'a> {
    /// Unpacked layer dirs, LOWEST first.
    pub layers: &'a [PathBuf],
    /// Created and used as the only lower layer when `layers` is empty
    /// (overlayfs needs one).
    pub empty_lower: &'a Path,
    pub upper: &'a Path,
    pub work: &'a Path,
    pub target: &'a Path,
    /// Options after lowerdir, upperdir and workdir.
    pub options: &'a [(&'a str, &'a str)],
    /// MS_NOSUID (MS_NODEV is always set).
    pub nosuid: bool,
    /// overlayfs' `volatile` (kernel 5.10+; left out where the kernel
    /// refuses it): no flush of the upper filesystem when the mount goes
    /// away, nor for `fsync`/`syncfs` through it. For sandbox sessions,
    /// whose changes are made durable when they are saved (the layer is
    /// synced then, while it is hashed) or thrown away; without it, the
    /// end of the sandbox waited for a flush of the whole store filesystem
    /// before the save could start.
    pub volatile: bool,
    pub classic: ClassicLower,
    /// Use mount(2) even when the new API is there (tests of the fallback).
    pub force_classic: bool,
}

impl Overlay<'_> {
    fn err(&self, msg: String) -> ContainerError {
        ContainerError::Overlay {
            merged: self.target.to_path_buf(),
            msg,
        }
    }
}

fn cstr(p: impl AsRef<OsStr>) -> Result<CString> {
    CString::new(p.as_ref().as_bytes())
        .map_err(|_| ContainerError::Job(format!("path with a NUL byte: {:?}", p.as_ref())))
}

/// Mounts `o` on `o.target`.
pub(crate) fn mount(o: &Overlay<'_>) -> Result<()> {
    if o.layers.len() > MAX_LAYERS {
        return Err(ContainerError::TooManyLayers(o.layers.len()));
    }
    let mut layers = o.layers.to_vec();
    if layers.is_empty() {
        // overlayfs needs a lower layer: an empty image gets an empty one.
        std::fs::create_dir_all(o.empty_lower)
            .map_err(|e| ContainerError::sys(format!("creating {}", o.empty_lower.display()), e))?;
        layers.push(o.empty_lower.to_path_buf());
    }
    for l in &layers {
        match std::fs::metadata(l) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(ContainerError::Layer {
                    layer: l.clone(),
                    msg: "not a directory".into(),
                });
            }
            Err(e) => {
                return Err(ContainerError::Layer {
                    layer: l.clone(),
                    msg: e.to_string(),
                });
            }
        }
    }
    if o.force_classic {
        return classic(o, &layers);
    }
    match new_api(o, &layers)? {
        true => Ok(()),
        false => classic(o, &layers),
    }
}

/// Messages the kernel logged on an fs context ("e overlayfs: ...").
fn fs_log(fs: &OwnedFd) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    while let Ok(n @ 1..) = rustix::io::read(fs, &mut buf) {
        out.push(String::from_utf8_lossy(&buf[..n]).trim().to_string());
    }
    out.join("; ")
}

/// New mount API; Ok(false) when it is not available (fall back to mount(2)).
fn new_api(o: &Overlay<'_>, layers: &[PathBuf]) -> Result<bool> {
    use rustix::mount::{
        FsMountFlags, FsOpenFlags, MountAttrFlags, MoveMountFlags, fsconfig_create,
        fsconfig_set_flag, fsconfig_set_string, fsmount, fsopen, move_mount,
    };
    let fs = match fsopen("overlay", FsOpenFlags::FSOPEN_CLOEXEC) {
        Ok(fs) => fs,
        Err(Errno::NOSYS) => return Ok(false),
        Err(e) => return Err(o.err(format!("fsopen(overlay): {}", io::Error::from(e)))),
    };
    let set = |key: &str, val: &OsStr| fsconfig_set_string(&fs, key, val);
    // lowerdir+ appends below the previous ones: top layer first.
    for (i, l) in layers.iter().rev().enumerate() {
        if let Err(e) = set("lowerdir+", l.as_os_str()) {
            if i == 0 && e == Errno::INVAL {
                // kernel < 6.8: no lowerdir+
                let _ = fs_log(&fs);
                return Ok(false);
            }
            return Err(ContainerError::Layer {
                layer: l.clone(),
                msg: format!("overlay lowerdir: {} {}", io::Error::from(e), fs_log(&fs)),
            });
        }
    }
    let mut opts: Vec<(&str, &OsStr)> = vec![
        ("upperdir", o.upper.as_os_str()),
        ("workdir", o.work.as_os_str()),
    ];
    opts.extend(o.options.iter().map(|(k, v)| (*k, OsStr::new(v))));
    for (k, v) in opts {
        set(k, v).map_err(|e| {
            o.err(format!(
                "{k}={}: {} {}",
                Path::new(v).display(),
                io::Error::from(e),
                fs_log(&fs)
            ))
        })?;
    }
    // Refused (EINVAL) by kernels before 5.10: the mount is then made without it.
    if o.volatile && fsconfig_set_flag(&fs, "volatile").is_err() {
        let _ = fs_log(&fs);
    }
    fsconfig_create(&fs).map_err(|e| {
        o.err(
            format!("{} {}", io::Error::from(e), fs_log(&fs))
                .trim()
                .to_string(),
        )
    })?;
    // MOUNT_ATTR_NODEV: device nodes of the image (layers, or created by a TarIn job from
    // a client's archive) must not give access to host devices.
    let mut attrs = MountAttrFlags::MOUNT_ATTR_NODEV;
    if o.nosuid {
        attrs |= MountAttrFlags::MOUNT_ATTR_NOSUID;
    }
    let mnt = fsmount(&fs, FsMountFlags::FSMOUNT_CLOEXEC, attrs)
        .map_err(|e| o.err(format!("fsmount: {}", io::Error::from(e))))?;
    let target = cstr(o.target)?;
    move_mount(
        &mnt,
        c"",
        rustix::fs::CWD,
        target.as_c_str(),
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
    )
    .map_err(|e| o.err(format!("move_mount: {}", io::Error::from(e))))?;
    Ok(true)
}

/// Classic mount(2).
fn classic(o: &Overlay<'_>, layers: &[PathBuf]) -> Result<()> {
    let mut common: PathBuf = layers[0].parent().unwrap_or(Path::new("/")).to_path_buf();
    if o.classic == ClassicLower::RelativeChdir {
        for l in layers {
            while !l.starts_with(&common) {
                if !common.pop() {
                    break;
                }
            }
        }
    }
    let mut lower = Vec::new();
    for l in layers.iter().rev() {
        let rel = match o.classic {
            ClassicLower::RelativeChdir => l.strip_prefix(&common).unwrap_or(l),
            ClassicLower::Absolute => l.as_path(),
        };
        let s = rel.as_os_str().as_bytes();
        if s.iter().any(|b| matches!(b, b':' | b',' | b'\\')) {
            return Err(ContainerError::Layer {
                layer: l.clone(),
                msg: "path contains ':', ',' or '\\', unusable as an overlay lowerdir".into(),
            });
        }
        lower.push(String::from_utf8_lossy(s).into_owned());
    }
    let mut data = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.join(":"),
        o.upper.display(),
        o.work.display()
    );
    for (k, v) in o.options {
        data.push_str(&format!(",{k}={v}"));
    }
    let plain_len = data.len();
    if o.volatile {
        data.push_str(",volatile");
    }
    if data.len() >= 4096 {
        return Err(o.err(format!(
            "{} layers do not fit in the mount options (kernel without fsopen/lowerdir+): run `walt image squash`",
            layers.len()
        )));
    }
    let target = cstr(o.target)?;
    let mut flags = MsFlags::MS_NODEV;
    if o.nosuid {
        flags |= MsFlags::MS_NOSUID;
    }
    let chdir = o.classic == ClassicLower::RelativeChdir;
    if chdir {
        let c_common = cstr(&common)?;
        nix::unistd::chdir(c_common.as_c_str())
            .map_err(|e| ContainerError::sys(format!("chdir {}", common.display()), e.into()))?;
    }
    let attempt = |data: &str| -> nix::Result<()> {
        let c_data = CString::new(data).map_err(|_| nix::errno::Errno::EINVAL)?;
        nix::mount::mount(
            Some(c"overlay"),
            target.as_c_str(),
            Some(c"overlay"),
            flags,
            Some(c_data.as_c_str()),
        )
    };
    let mut r = attempt(&data);
    if r == Err(nix::errno::Errno::EINVAL) && data.len() > plain_len {
        // A kernel before 5.10 does not know `volatile`.
        r = attempt(&data[..plain_len]);
    }
    if chdir {
        let _ = nix::unistd::chdir("/");
    }
    r.map_err(|e| o.err(io::Error::from(e).to_string()))
}

// ---------------------------------------------------------------------------------------
// mounts in the server's namespace, serving images to nodes

/// Options of a node mount that NFS can export (file handles that survive
/// a server restart need the index; `nfs_export` refuses redirect_dir and
/// metacopy).
const EXPORTABLE: &[(&str, &str)] = &[
    ("redirect_dir", "off"),
    ("metacopy", "off"),
    ("xino", "off"),
    ("index", "on"),
    ("nfs_export", "on"),
];

/// The same without the index, for kernels or filesystems that refuse it.
const PLAIN: &[(&str, &str)] = &[
    ("redirect_dir", "off"),
    ("metacopy", "off"),
    ("xino", "off"),
    ("index", "off"),
];

/// A node mount to make in the server's own mount namespace.
#[derive(Debug, Clone)]
pub struct HostOverlay {
    /// Unpacked layer dirs, LOWEST first (none: the mount is empty).
    pub layers: Vec<PathBuf>,
    /// Empty dirs of the caller, on one filesystem; the upper layer holds
    /// what is written through the mount before it is made read-only.
    pub upper: PathBuf,
    pub work: PathBuf,
    /// An empty dir used as the lower layer of an image without layers.
    pub empty_lower: PathBuf,
    /// The mount point (an existing dir).
    pub target: PathBuf,
}

/// What [`mount_host`] made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostMounted {
    /// Mounted with `index=on,nfs_export=on` (an NFS server can export it).
    pub nfs_export: bool,
}

/// Mounts the layers on `o.target` in the caller's mount namespace, writable
/// (for the caller's adaptations, which land in the upper dir), nodev and
/// nosuid: exportable over NFS where the kernel allows it, else a plain
/// overlay (`nfs_export: false`). Call [`make_read_only`] after writing.
pub fn mount_host(o: &HostOverlay) -> std::result::Result<HostMounted, ContainerError> {
    let overlay = |options| Overlay {
        layers: &o.layers,
        empty_lower: &o.empty_lower,
        upper: &o.upper,
        work: &o.work,
        target: &o.target,
        options,
        nosuid: true,
        volatile: false,
        classic: ClassicLower::Absolute,
        force_classic: false,
    };
    match mount(&overlay(EXPORTABLE)) {
        Ok(()) => Ok(HostMounted { nfs_export: true }),
        Err(ContainerError::Overlay { .. }) => {
            // The index may have been started in the work dir: start afresh.
            for d in [&o.upper, &o.work] {
                let _ = std::fs::remove_dir_all(d);
                std::fs::create_dir_all(d)
                    .map_err(|e| ContainerError::sys(format!("creating {}", d.display()), e))?;
            }
            mount(&overlay(PLAIN))?;
            Ok(HostMounted { nfs_export: false })
        }
        Err(e) => Err(e),
    }
}

/// Makes the mount on `target` read-only (also nodev, nosuid).
pub fn make_read_only(target: &Path) -> std::result::Result<(), ContainerError> {
    nix::mount::mount(
        None::<&str>,
        target,
        None::<&str>,
        MsFlags::MS_REMOUNT
            | MsFlags::MS_BIND
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NODEV
            | MsFlags::MS_NOSUID,
        None::<&str>,
    )
    .map_err(|e| ContainerError::Mount {
        what: "read-only remount".into(),
        target: target.to_path_buf(),
        source: e.into(),
    })
}

/// How [`unmount`] went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unmounted {
    /// Gone.
    Now,
    /// It was busy: detached from the tree, gone once no one uses it.
    Lazily,
    /// Nothing was mounted there.
    NotMounted,
}

/// Unmounts `target`, lazily (MNT_DETACH) when it is busy.
pub fn unmount(target: &Path) -> std::result::Result<Unmounted, ContainerError> {
    let err = |e: nix::Error| ContainerError::Mount {
        what: "unmount".into(),
        target: target.to_path_buf(),
        source: e.into(),
    };
    match nix::mount::umount2(target, MntFlags::empty()) {
        Ok(()) => Ok(Unmounted::Now),
        Err(nix::Error::EBUSY) => match nix::mount::umount2(target, MntFlags::MNT_DETACH) {
            Ok(()) => Ok(Unmounted::Lazily),
            Err(e) => Err(err(e)),
        },
        Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => Ok(Unmounted::NotMounted),
        Err(e) => Err(err(e)),
    }
}

pub use walt_tar::mounts_below;

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    #[test]
    fn host_mount_is_exportable_read_only_and_unmounts() {
        assert!(
            root(),
            "this test mounts overlays: run it as root (CI does)"
        );
        let t = tempfile::tempdir().unwrap();
        let d = t.path();
        let (l1, l2) = (d.join("l1"), d.join("l2"));
        for p in [&l1, &l2] {
            std::fs::create_dir_all(p).unwrap();
        }
        std::fs::write(l1.join("a"), "low").unwrap();
        std::fs::write(l2.join("a"), "high").unwrap();
        std::fs::write(l1.join("b"), "b").unwrap();
        let o = HostOverlay {
            layers: vec![l1, l2],
            upper: d.join("upper"),
            work: d.join("work"),
            empty_lower: d.join("empty"),
            target: d.join("fs"),
        };
        for p in [&o.upper, &o.work, &o.target] {
            std::fs::create_dir_all(p).unwrap();
        }
        let m = mount_host(&o).unwrap();
        assert!(
            m.nfs_export,
            "tmp is ext4 here: index=on,nfs_export=on must work"
        );
        assert_eq!(std::fs::read_to_string(o.target.join("a")).unwrap(), "high");
        std::fs::write(o.target.join("c"), "adapted").unwrap();
        make_read_only(&o.target).unwrap();
        assert!(std::fs::write(o.target.join("d"), "x").is_err());
        assert_eq!(
            std::fs::read_to_string(o.upper.join("c")).unwrap(),
            "adapted"
        );
        assert_eq!(mounts_below(d), vec![o.target.canonicalize().unwrap()]);
        let opts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let line = opts
            .lines()
            .find(|l| l.contains(o.target.to_str().unwrap()))
            .unwrap();
        assert!(line.contains("nfs_export=on"), "{line}");
        assert!(line.contains(" ro,"), "{line}");
        assert_eq!(unmount(&o.target).unwrap(), Unmounted::Now);
        assert_eq!(unmount(&o.target).unwrap(), Unmounted::NotMounted);
        assert!(mounts_below(d).is_empty());
    }

    /// Mounts `layers` on `d/fs` (upper `d/upper`, work `d/work`, made
    /// here) with absolute lowerdirs; returns the upper dir and the mount.
    fn test_mount(
        d: &Path,
        layers: &[PathBuf],
        options: &[(&str, &str)],
        volatile: bool,
        force_classic: bool,
    ) -> (PathBuf, PathBuf) {
        let (upper, work, fs) = (d.join("upper"), d.join("work"), d.join("fs"));
        for p in [&upper, &work, &fs] {
            std::fs::create_dir_all(p).unwrap();
        }
        mount(&Overlay {
            layers,
            empty_lower: &d.join("empty"),
            upper: &upper,
            work: &work,
            target: &fs,
            options,
            nosuid: true,
            volatile,
            classic: ClassicLower::Absolute,
            force_classic,
        })
        .unwrap();
        (upper, fs)
    }

    /// The line of `/proc/self/mountinfo` of the mount on `fs`.
    fn mount_line(fs: &Path) -> String {
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        info.lines()
            .find(|l| l.contains(fs.to_str().unwrap()))
            .unwrap()
            .to_string()
    }

    /// A sandbox's mount is `volatile` through either API: its end does
    /// not flush the whole upper filesystem (the session's save does it
    /// for the layer), and writes through it still land in the upper dir.
    #[test]
    fn a_volatile_mount_through_either_api() {
        assert!(
            root(),
            "this test mounts overlays: run it as root (CI does)"
        );
        for force_classic in [false, true] {
            let t = tempfile::tempdir().unwrap();
            let d = t.path();
            let layers = vec![d.join("l1")];
            std::fs::create_dir_all(&layers[0]).unwrap();
            std::fs::write(layers[0].join("a"), "low").unwrap();
            let (upper, fs) = test_mount(d, &layers, PLAIN, true, force_classic);
            let line = mount_line(&fs);
            std::fs::write(fs.join("b"), "new").unwrap();
            assert_eq!(unmount(&fs).unwrap(), Unmounted::Now);
            // Shown as `volatile`, or `fsync=volatile` by kernels 6.6+.
            assert!(line.contains("volatile"), "classic={force_classic}: {line}");
            assert_eq!(std::fs::read_to_string(upper.join("b")).unwrap(), "new");
        }
    }

    #[test]
    fn classic_fallback_with_absolute_lowerdirs() {
        assert!(
            root(),
            "this test mounts overlays: run it as root (CI does)"
        );
        let t = tempfile::tempdir().unwrap();
        let d = t.path();
        let layers: Vec<PathBuf> = (0..3).map(|i| d.join(format!("l{i}"))).collect();
        for (i, l) in layers.iter().enumerate() {
            std::fs::create_dir_all(l).unwrap();
            std::fs::write(l.join("f"), i.to_string()).unwrap();
        }
        let cwd = std::env::current_dir().unwrap();
        let (_, fs) = test_mount(d, &layers, EXPORTABLE, false, true);
        assert_eq!(std::env::current_dir().unwrap(), cwd, "no chdir");
        assert_eq!(std::fs::read_to_string(fs.join("f")).unwrap(), "2");
        let line = mount_line(&fs);
        assert!(
            line.contains(&format!("lowerdir={}", layers[2].display())),
            "{line}"
        );
        assert!(
            line.contains("nosuid") && line.contains("nfs_export=on"),
            "{line}"
        );
        assert_eq!(unmount(&fs).unwrap(), Unmounted::Now);
    }

    #[test]
    fn host_mount_of_an_image_without_layers() {
        assert!(
            root(),
            "this test mounts overlays: run it as root (CI does)"
        );
        let t = tempfile::tempdir().unwrap();
        let d = t.path();
        let o = HostOverlay {
            layers: vec![],
            upper: d.join("upper"),
            work: d.join("work"),
            empty_lower: d.join("empty"),
            target: d.join("fs"),
        };
        for p in [&o.upper, &o.work, &o.target] {
            std::fs::create_dir_all(p).unwrap();
        }
        mount_host(&o).unwrap();
        assert_eq!(std::fs::read_dir(&o.target).unwrap().count(), 0);
        assert_eq!(unmount(&o.target).unwrap(), Unmounted::Now);
    }
}
