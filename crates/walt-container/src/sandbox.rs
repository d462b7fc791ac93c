//! The re-exec'd side: `<exe> __walt-sandbox <spec-json>`.
//!
//! This process is single-threaded (it is a fresh exec), so fork is safe here.

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::{ContainerError, Job, MAX_LAYERS, MOUNT_POINTS, Spec, WINSIZE_ENV};

const HOSTNAME: &str = "image-shell";
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Capabilities kept in the bounding set: podman's current defaults (containers.conf
/// `default_capabilities`), which no longer include NET_RAW and AUDIT_WRITE.
const KEEP_CAPS: &[u32] = &[
    0,  // CHOWN
    1,  // DAC_OVERRIDE
    3,  // FOWNER
    4,  // FSETID
    5,  // KILL
    6,  // SETGID
    7,  // SETUID
    8,  // SETPCAP
    10, // NET_BIND_SERVICE
    18, // SYS_CHROOT
    31, // SETFCAP
];

type Result<T> = std::result::Result<T, ContainerError>;

/// Entry point of the sandbox process; never returns. Errors go to stderr as one line,
/// exit status 1; otherwise the exit status is the job's (128+signal when killed).
pub fn sandbox_main() -> ! {
    // SAFETY: plain prctl.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
    }
    let code = match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("{}", one_line(&e.to_string()));
            1
        }
    };
    std::process::exit(code)
}

fn one_line(s: &str) -> String {
    s.replace('\n', " ")
}

fn last_err() -> io::Error {
    io::Error::last_os_error()
}

fn cstr(p: impl AsRef<OsStr>) -> Result<CString> {
    CString::new(p.as_ref().as_bytes())
        .map_err(|_| ContainerError::Job(format!("path with a NUL byte: {:?}", p.as_ref())))
}

fn check(r: libc::c_int, what: impl FnOnce() -> String) -> Result<libc::c_int> {
    if r < 0 {
        Err(ContainerError::sys(what(), last_err()))
    } else {
        Ok(r)
    }
}

fn run() -> Result<i32> {
    let json = std::env::args_os()
        .nth(2)
        .ok_or_else(|| ContainerError::Job("sandbox: missing spec argument".into()))?;
    let spec: Spec = serde_json::from_slice(json.as_bytes())
        .map_err(|e| ContainerError::Job(format!("sandbox: bad spec: {e}")))?;
    if spec.layers.len() > MAX_LAYERS {
        return Err(ContainerError::TooManyLayers(spec.layers.len()));
    }
    let session = spec
        .upper
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("/"));

    // SAFETY: plain syscalls on our own process.
    unsafe {
        check(
            libc::unshare(
                libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC,
            ),
            || "unshare(mount, pid, uts, ipc namespaces)".into(),
        )?;
        check(
            libc::mount(
                c"none".as_ptr(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ),
            || "making / private in the sandbox".into(),
        )?;
    }
    mount_overlay(&spec, &session)?;

    match &spec.job {
        Job::TarOut { path } => {
            enter_chroot(&spec.merged)?;
            crate::tario::tar_out(path).map_err(ContainerError::Job)?;
            Ok(0)
        }
        Job::TarIn { dest } => {
            enter_chroot(&spec.merged)?;
            crate::tario::tar_in(dest).map_err(ContainerError::Job)?;
            Ok(0)
        }
        Job::Shell { .. } | Job::Exec { .. } => run_container(&spec, &session),
    }
}

fn enter_chroot(merged: &Path) -> Result<()> {
    let m = cstr(merged)?;
    // SAFETY: plain syscalls.
    unsafe {
        check(libc::chroot(m.as_ptr()), || {
            format!("chroot {}", merged.display())
        })?;
        check(libc::chdir(c"/".as_ptr()), || "chdir /".into())?;
        libc::umask(0o022);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// overlay

const FSOPEN_CLOEXEC: libc::c_uint = 1;
const FSCONFIG_SET_STRING: libc::c_uint = 1;
const FSCONFIG_CMD_CREATE: libc::c_uint = 6;
const FSMOUNT_CLOEXEC: libc::c_uint = 1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 4;
/// fsmount attr flag: device nodes of the image (layers, or created by a TarIn job from a
/// client's archive) must not give access to host devices.
const MOUNT_ATTR_NODEV: libc::c_uint = 0x4;

const OVERLAY_OPTS: &[(&str, &str)] = &[
    ("redirect_dir", "off"),
    ("metacopy", "off"),
    ("index", "off"),
    ("xino", "off"),
];

fn mount_overlay(spec: &Spec, session: &Path) -> Result<()> {
    let mut layers = spec.layers.clone();
    if layers.is_empty() {
        // overlayfs needs a lower layer: an empty image gets an empty one.
        let empty = session.join("empty-lower");
        std::fs::create_dir_all(&empty)
            .map_err(|e| ContainerError::sys(format!("creating {}", empty.display()), e))?;
        layers.push(empty);
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
    // Test knob: exercise the mount(2) fallback on kernels that have the new API.
    if std::env::var_os("WALT_SANDBOX_CLASSIC_MOUNT").is_some() {
        return overlay_classic(spec, &layers);
    }
    match overlay_new_api(spec, &layers)? {
        true => Ok(()),
        false => overlay_classic(spec, &layers),
    }
}

fn overlay_err(spec: &Spec, msg: String) -> ContainerError {
    ContainerError::Overlay {
        merged: spec.merged.clone(),
        msg,
    }
}

/// Messages the kernel logged on an fs context ("e overlayfs: ...").
fn fs_log(fd: RawFd) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        // SAFETY: reading into a local buffer.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            break;
        }
        out.push(
            String::from_utf8_lossy(&buf[..n as usize])
                .trim()
                .to_string(),
        );
    }
    out.join("; ")
}

/// New mount API; Ok(false) when it is not available (fall back to mount(2)).
fn overlay_new_api(spec: &Spec, layers: &[PathBuf]) -> Result<bool> {
    // SAFETY: raw syscalls with valid NUL-terminated strings; fds are wrapped at once.
    unsafe {
        let fd = libc::syscall(libc::SYS_fsopen, c"overlay".as_ptr(), FSOPEN_CLOEXEC);
        if fd < 0 {
            let e = last_err();
            if e.raw_os_error() == Some(libc::ENOSYS) {
                return Ok(false);
            }
            return Err(overlay_err(spec, format!("fsopen(overlay): {e}")));
        }
        let fs = OwnedFd::from_raw_fd(fd as RawFd);
        let set = |key: &str, val: &OsStr| -> std::result::Result<(), io::Error> {
            let k = CString::new(key).map_err(io::Error::other)?;
            let v = CString::new(val.as_bytes()).map_err(io::Error::other)?;
            let r = libc::syscall(
                libc::SYS_fsconfig,
                fs.as_raw_fd(),
                FSCONFIG_SET_STRING,
                k.as_ptr(),
                v.as_ptr(),
                0,
            );
            if r < 0 { Err(last_err()) } else { Ok(()) }
        };
        // lowerdir+ appends below the previous ones: top layer first.
        for (i, l) in layers.iter().rev().enumerate() {
            if let Err(e) = set("lowerdir+", l.as_os_str()) {
                if i == 0 && e.raw_os_error() == Some(libc::EINVAL) {
                    // kernel < 6.8: no lowerdir+
                    let _ = fs_log(fs.as_raw_fd());
                    return Ok(false);
                }
                return Err(ContainerError::Layer {
                    layer: l.clone(),
                    msg: format!("overlay lowerdir: {e} {}", fs_log(fs.as_raw_fd())),
                });
            }
        }
        let mut opts: Vec<(&str, &OsStr)> = vec![
            ("upperdir", spec.upper.as_os_str()),
            ("workdir", spec.work.as_os_str()),
        ];
        opts.extend(OVERLAY_OPTS.iter().map(|(k, v)| (*k, OsStr::new(v))));
        for (k, v) in opts {
            set(k, v).map_err(|e| {
                overlay_err(
                    spec,
                    format!(
                        "{k}={}: {e} {}",
                        Path::new(v).display(),
                        fs_log(fs.as_raw_fd())
                    ),
                )
            })?;
        }
        let r = libc::syscall(
            libc::SYS_fsconfig,
            fs.as_raw_fd(),
            FSCONFIG_CMD_CREATE,
            std::ptr::null::<libc::c_char>(),
            std::ptr::null::<libc::c_char>(),
            0,
        );
        if r < 0 {
            let e = last_err();
            return Err(overlay_err(
                spec,
                format!("{e} {}", fs_log(fs.as_raw_fd())).trim().to_string(),
            ));
        }
        let m = libc::syscall(
            libc::SYS_fsmount,
            fs.as_raw_fd(),
            FSMOUNT_CLOEXEC,
            MOUNT_ATTR_NODEV,
        );
        if m < 0 {
            return Err(overlay_err(spec, format!("fsmount: {}", last_err())));
        }
        let mnt = OwnedFd::from_raw_fd(m as RawFd);
        let target = cstr(&spec.merged)?;
        let r = libc::syscall(
            libc::SYS_move_mount,
            mnt.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            target.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        );
        if r < 0 {
            return Err(overlay_err(spec, format!("move_mount: {}", last_err())));
        }
    }
    Ok(true)
}

/// Classic mount(2): lowerdirs relative to their common parent (chdir there first) so
/// that hundreds of layers fit in one page of options.
fn overlay_classic(spec: &Spec, layers: &[PathBuf]) -> Result<()> {
    let mut common: PathBuf = layers[0].parent().unwrap_or(Path::new("/")).to_path_buf();
    for l in layers {
        while !l.starts_with(&common) {
            if !common.pop() {
                break;
            }
        }
    }
    let mut lower = Vec::new();
    for l in layers.iter().rev() {
        let rel = l.strip_prefix(&common).unwrap_or(l);
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
        spec.upper.display(),
        spec.work.display()
    );
    for (k, v) in OVERLAY_OPTS {
        data.push_str(&format!(",{k}={v}"));
    }
    if data.len() >= 4096 {
        return Err(overlay_err(
            spec,
            format!(
                "{} layers do not fit in the mount options (kernel without fsopen/lowerdir+): run `walt image squash`",
                layers.len()
            ),
        ));
    }
    let c_common = cstr(&common)?;
    let target = cstr(&spec.merged)?;
    let c_data = CString::new(data).map_err(|e| overlay_err(spec, e.to_string()))?;
    // SAFETY: plain syscalls with valid strings.
    unsafe {
        check(libc::chdir(c_common.as_ptr()), || {
            format!("chdir {}", common.display())
        })?;
        let r = libc::mount(
            c"overlay".as_ptr(),
            target.as_ptr(),
            c"overlay".as_ptr(),
            libc::MS_NODEV,
            c_data.as_ptr().cast(),
        );
        let e = last_err();
        libc::chdir(c"/".as_ptr());
        if r < 0 {
            return Err(overlay_err(spec, e.to_string()));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Shell / Exec: a pid namespace with a tiny init

fn wait_status(pid: libc::pid_t) -> i32 {
    let mut status = 0;
    loop {
        // SAFETY: waiting for our own child.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            return decode_status(status);
        }
        if r < 0 && last_err().raw_os_error() != Some(libc::EINTR) {
            return 1;
        }
    }
}

fn decode_status(status: libc::c_int) -> i32 {
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        1
    }
}

/// pid 1 of the sandbox's pid namespace, for the SIGTERM handler.
static CHILD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// SIGTERM in the outer sandbox process: SIGKILL the namespace's pid 1 (which takes every
/// process of the namespace with it); the parent then reaps it and exits, so that when the
/// server's wait() returns, nothing of the sandbox is left. Async-signal-safe only.
extern "C" fn on_sigterm(_: libc::c_int) {
    let pid = CHILD.load(std::sync::atomic::Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill is async-signal-safe.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
}

fn run_container(spec: &Spec, session: &Path) -> Result<i32> {
    // DNS: a copy of the host's resolv.conf in the session dir, bind-mounted later.
    let resolv = match std::fs::read("/etc/resolv.conf") {
        Ok(content) => {
            let p = session.join("resolv.conf");
            std::fs::write(&p, content)
                .map_err(|e| ContainerError::sys(format!("writing {}", p.display()), e))?;
            Some(p)
        }
        Err(_) => None,
    };
    // A pipe whose write end only this process holds: the child sees EOF on it once we are
    // gone. (The child is pid 1 of a new pid namespace, where getppid() is always 0, so it
    // cannot compare its parent's pid.)
    let mut alive = [0 as RawFd; 2];
    // SAFETY: pipe2 into a local array; the fds are wrapped at once.
    let (alive_r, alive_w) = unsafe {
        check(libc::pipe2(alive.as_mut_ptr(), libc::O_CLOEXEC), || {
            "pipe".into()
        })?;
        (
            OwnedFd::from_raw_fd(alive[0]),
            OwnedFd::from_raw_fd(alive[1]),
        )
    };
    // SIGTERM (the server stopping the session) is blocked across the fork: the parent
    // handles it once it knows the child's pid, the child gets the default back.
    // SAFETY: sigset manipulation on local structs.
    let old_mask = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigprocmask(libc::SIG_BLOCK, &set, &mut old);
        old
    };
    // SAFETY: this process is single-threaded.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(ContainerError::sys("fork", last_err()));
    }
    if pid > 0 {
        drop(alive_r);
        // SAFETY: installing an async-signal-safe handler, then restoring the mask.
        unsafe {
            CHILD.store(pid, std::sync::atomic::Ordering::SeqCst);
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_sigterm as *const () as libc::sighandler_t;
            libc::sigemptyset(&mut sa.sa_mask);
            // No SA_RESTART: waitpid returns EINTR and is simply retried.
            sa.sa_flags = 0;
            libc::sigaction(libc::SIGTERM, &sa, std::ptr::null_mut());
            libc::sigprocmask(libc::SIG_SETMASK, &old_mask, std::ptr::null_mut());
        }
        let status = wait_status(pid);
        drop(alive_w);
        return Ok(status);
    }
    // pid 1 of the new pid namespace.
    drop(alive_w);
    // SAFETY: plain prctl, poll and sigprocmask on our own fds / process.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
        // The parent may have died between fork and prctl: then no signal would come.
        let mut pfd = libc::pollfd {
            fd: alive_r.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        if libc::poll(&mut pfd, 1, 0) != 0 {
            libc::_exit(1);
        }
        libc::sigprocmask(libc::SIG_SETMASK, &old_mask, std::ptr::null_mut());
    }
    drop(alive_r);
    let code = match init(spec, resolv.as_deref()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("{}", one_line(&e.to_string()));
            1
        }
    };
    std::process::exit(code)
}

fn mount(
    src: &str,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<()> {
    let err = |source: io::Error| ContainerError::Mount {
        what: fstype.unwrap_or(src).to_string(),
        target: target.to_path_buf(),
        source,
    };
    let c_src = CString::new(src).map_err(|e| err(io::Error::other(e)))?;
    let c_target = cstr(target)?;
    let c_type = fstype
        .map(CString::new)
        .transpose()
        .map_err(|e| err(io::Error::other(e)))?;
    let c_data = data
        .map(CString::new)
        .transpose()
        .map_err(|e| err(io::Error::other(e)))?;
    // SAFETY: valid NUL-terminated strings or NULL.
    let r = unsafe {
        libc::mount(
            c_src.as_ptr(),
            c_target.as_ptr(),
            c_type.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
            flags,
            c_data
                .as_ref()
                .map_or(std::ptr::null(), |c| c.as_ptr().cast()),
        )
    };
    if r < 0 { Err(err(last_err())) } else { Ok(()) }
}

/// Parts of /proc that reach the host kernel: the sandbox runs as real root (no user
/// namespace), so like podman/runc they are read-only...
const PROC_READONLY: &[&str] = &["sys", "sysrq-trigger", "irq", "bus"];
/// ...or masked (/dev/null over files, an empty read-only tmpfs over directories).
const PROC_MASKED: &[&str] = &["kcore", "keys", "timer_list", "sched_debug", "acpi", "scsi"];

/// Make the host-wide parts of a freshly mounted procfs read-only or masked; what this
/// kernel does not have is skipped.
fn harden_proc(proc: &Path) -> Result<()> {
    let common = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    for name in PROC_READONLY {
        let p = proc.join(name);
        if std::fs::symlink_metadata(&p).is_err() {
            continue;
        }
        let s = p.to_string_lossy();
        mount(&s, &p, None, libc::MS_BIND | libc::MS_REC, None)?;
        mount(
            &s,
            &p,
            None,
            libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | common,
            None,
        )?;
    }
    for name in PROC_MASKED {
        let p = proc.join(name);
        match std::fs::symlink_metadata(&p) {
            Err(_) => continue,
            Ok(m) if m.is_dir() => mount(
                "tmpfs",
                &p,
                Some("tmpfs"),
                libc::MS_RDONLY | common,
                Some("size=0,mode=555"),
            )?,
            Ok(_) => {
                // Still the host's /dev/null: this runs before pivot_root.
                mount("/dev/null", &p, None, libc::MS_BIND, None)?;
                mount(
                    "/dev/null",
                    &p,
                    None,
                    libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | common,
                    None,
                )?;
            }
        }
    }
    Ok(())
}

fn mkdir(p: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .mode(mode)
        .create(p)
        .map_err(|e| ContainerError::sys(format!("mkdir {}", p.display()), e))
}

fn symlink(target: &str, link: &Path) -> Result<()> {
    std::os::unix::fs::symlink(target, link)
        .map_err(|e| ContainerError::sys(format!("symlink {}", link.display()), e))
}

fn setup_dev(dev: &Path) -> Result<()> {
    let nosuid_noexec = libc::MS_NOSUID | libc::MS_NOEXEC;
    mount(
        "tmpfs",
        dev,
        Some("tmpfs"),
        nosuid_noexec,
        Some("mode=755,size=65536k"),
    )?;
    for (name, major, minor) in [
        ("null", 1, 3),
        ("zero", 1, 5),
        ("full", 1, 7),
        ("random", 1, 8),
        ("urandom", 1, 9),
        ("tty", 5, 0),
    ] {
        let p = dev.join(name);
        let c = cstr(&p)?;
        // SAFETY: plain syscalls.
        unsafe {
            check(
                libc::mknod(
                    c.as_ptr(),
                    libc::S_IFCHR | 0o666,
                    libc::makedev(major, minor),
                ),
                || format!("mknod {}", p.display()),
            )?;
            check(libc::chmod(c.as_ptr(), 0o666), || {
                format!("chmod {}", p.display())
            })?;
        }
    }
    let pts = dev.join("pts");
    mkdir(&pts, 0o755)?;
    mount(
        "devpts",
        &pts,
        Some("devpts"),
        nosuid_noexec,
        Some("newinstance,ptmxmode=0666,mode=620"),
    )?;
    symlink("pts/ptmx", &dev.join("ptmx"))?;
    let shm = dev.join("shm");
    mkdir(&shm, 0o1777)?;
    mount(
        "shm",
        &shm,
        Some("tmpfs"),
        nosuid_noexec | libc::MS_NODEV,
        Some("mode=1777,size=65536k"),
    )?;
    symlink("/proc/self/fd", &dev.join("fd"))?;
    symlink("/proc/self/fd/0", &dev.join("stdin"))?;
    symlink("/proc/self/fd/1", &dev.join("stdout"))?;
    symlink("/proc/self/fd/2", &dev.join("stderr"))?;
    Ok(())
}

/// Bind the session's resolv.conf over the image's /etc/resolv.conf, resolved inside the
/// image root (RESOLVE_IN_ROOT: a symlink cannot lead out of it). Absent or dangling: skip.
fn bind_resolv(merged: &Path, resolv: &Path) -> Result<()> {
    let root = std::fs::File::open(merged)
        .map_err(|e| ContainerError::sys(format!("open {}", merged.display()), e))?;
    // SAFETY: open_how is plain data; zeroed is valid.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_PATH | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: valid pointers and size.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            c"etc/resolv.conf".as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Ok(());
    }
    // SAFETY: the kernel just gave us this fd.
    let target = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat into a local struct.
    if unsafe { libc::fstat(target.as_raw_fd(), &mut st) } < 0
        || st.st_mode & libc::S_IFMT != libc::S_IFREG
    {
        return Ok(());
    }
    let src = resolv.to_string_lossy();
    mount(
        &src,
        Path::new(&format!("/proc/self/fd/{}", target.as_raw_fd())),
        None,
        libc::MS_BIND,
        None,
    )
}

fn pivot(merged: &Path) -> Result<()> {
    let m = cstr(merged)?;
    // SAFETY: plain syscalls. pivot_root(".", ".") stacks the old root on top of the new
    // one; detaching it leaves the image as the root, without a put_old dir in the image.
    unsafe {
        check(libc::chdir(m.as_ptr()), || {
            format!("chdir {}", merged.display())
        })?;
        let r = libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr());
        if r < 0 {
            return Err(ContainerError::sys(
                format!("pivot_root {}", merged.display()),
                last_err(),
            ));
        }
        check(libc::umount2(c".".as_ptr(), libc::MNT_DETACH), || {
            "detaching the old root".into()
        })?;
        check(libc::chdir(c"/".as_ptr()), || "chdir /".into())?;
    }
    Ok(())
}

fn drop_caps() -> Result<()> {
    let last: u32 = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(63);
    for cap in 0..=last {
        if KEEP_CAPS.contains(&cap) {
            continue;
        }
        // SAFETY: plain prctl.
        let r = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        if r < 0 && last_err().raw_os_error() != Some(libc::EINVAL) {
            return Err(ContainerError::sys(
                format!("dropping capability {cap}"),
                last_err(),
            ));
        }
    }
    // SAFETY: plain prctl.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        );
    }
    // The inheritable set also feeds root's caps at exec: keep only the allowed ones.
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let mut hdr = Header {
        version: 0x2008_0522,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    let mut keep = [0u32; 2];
    for c in KEEP_CAPS {
        keep[(c / 32) as usize] |= 1 << (c % 32);
    }
    // SAFETY: capget/capset with v3 header and two data structs.
    unsafe {
        if libc::syscall(libc::SYS_capget, &mut hdr as *mut Header, data.as_mut_ptr()) == 0 {
            for i in 0..2 {
                data[i].inheritable &= keep[i];
            }
            if libc::syscall(libc::SYS_capset, &mut hdr as *mut Header, data.as_ptr()) < 0 {
                return Err(ContainerError::sys("capset", last_err()));
            }
        }
    }
    Ok(())
}

/// pid 1: set up the container, start the job, reap zombies, exit with the job's status.
fn init(spec: &Spec, resolv: Option<&Path>) -> Result<i32> {
    // SAFETY: plain syscalls.
    unsafe {
        libc::umask(0);
        check(
            libc::sethostname(HOSTNAME.as_ptr().cast(), HOSTNAME.len()),
            || "sethostname".into(),
        )?;
    }
    let merged = &spec.merged;
    for name in MOUNT_POINTS {
        let p = merged.join(name);
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.is_dir() => {}
            Ok(_) if *name == "tmp" => {}
            Ok(_) => {
                return Err(ContainerError::Job(format!(
                    "the image's /{name} is not a directory"
                )));
            }
            Err(_) => mkdir(&p, if *name == "tmp" { 0o1777 } else { 0o755 })?,
        }
    }
    let common = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    mount("proc", &merged.join("proc"), Some("proc"), common, None)?;
    harden_proc(&merged.join("proc"))?;
    mount(
        "sysfs",
        &merged.join("sys"),
        Some("sysfs"),
        common | libc::MS_RDONLY,
        None,
    )?;
    setup_dev(&merged.join("dev"))?;
    if let Some(r) = resolv {
        bind_resolv(merged, r)?;
    }
    pivot(merged)?;
    // SAFETY: plain syscall.
    unsafe {
        libc::umask(0o022);
    }

    let (prog, argv, env, cwd, pty) = match &spec.job {
        Job::Shell { term } => {
            let shell = if Path::new("/bin/bash").exists() {
                "/bin/bash"
            } else {
                "/bin/sh"
            };
            let name = shell.rsplit('/').next().unwrap_or(shell).to_string();
            let cwd = if Path::new("/root").is_dir() {
                "/root"
            } else {
                "/"
            };
            let env = vec![
                "HOME=/root".to_string(),
                format!("TERM={term}"),
                format!("PATH={DEFAULT_PATH}"),
            ];
            let pty = open_pty()?;
            (
                shell.to_string(),
                vec![name],
                env,
                cwd.to_string(),
                Some(pty),
            )
        }
        Job::Exec { argv, env, cwd } => {
            let first = argv
                .first()
                .ok_or_else(|| ContainerError::Job("empty command".into()))?;
            let path = env
                .iter()
                .find_map(|e| e.strip_prefix("PATH="))
                .unwrap_or(DEFAULT_PATH);
            let prog = find_program(first, path)
                .ok_or_else(|| ContainerError::Job(format!("{first}: command not found")))?;
            let cwd = if cwd.is_empty() { "/" } else { cwd.as_str() };
            (prog, argv.clone(), env.clone(), cwd.to_string(), None)
        }
        _ => unreachable!("tar jobs do not run an init"),
    };
    let c_prog = cstr(&prog)?;
    let c_argv: Vec<CString> = argv.iter().map(cstr).collect::<Result<_>>()?;
    let c_env: Vec<CString> = env.iter().map(cstr).collect::<Result<_>>()?;
    let c_cwd = cstr(&cwd)?;
    let slave_name = match &pty {
        Some((_, name)) => Some(cstr(name)?),
        None => None,
    };
    drop_caps()?;

    // SAFETY: single-threaded process.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(ContainerError::sys("fork", last_err()));
    }
    if pid == 0 {
        exec_job(&c_prog, &c_argv, &c_env, &c_cwd, slave_name.as_deref());
    }
    if let Some((master, _)) = pty {
        send_master(&master)?;
        drop(master);
    }
    // Reap everything; leave when the job exits (the kernel then kills the rest).
    loop {
        let mut status = 0;
        // SAFETY: waiting for children.
        let r = unsafe { libc::waitpid(-1, &mut status, 0) };
        if r == pid {
            return Ok(decode_status(status));
        }
        if r < 0 && last_err().raw_os_error() == Some(libc::ECHILD) {
            return Ok(1);
        }
    }
}

fn find_program(name: &str, path: &str) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    if name.contains('/') {
        return Some(name.to_string());
    }
    path.split(':').filter(|d| !d.is_empty()).find_map(|d| {
        let p = format!("{d}/{name}");
        match std::fs::metadata(&p) {
            Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => Some(p),
            _ => None,
        }
    })
}

fn open_pty() -> Result<(OwnedFd, String)> {
    // SAFETY: plain syscalls on fds we own.
    unsafe {
        let fd = check(
            libc::open(
                c"/dev/ptmx".as_ptr(),
                libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
            ),
            || "open /dev/ptmx".into(),
        )?;
        let master = OwnedFd::from_raw_fd(fd);
        check(libc::grantpt(fd), || "grantpt".into())?;
        check(libc::unlockpt(fd), || "unlockpt".into())?;
        let mut buf = [0 as libc::c_char; 128];
        if libc::ptsname_r(fd, buf.as_mut_ptr(), buf.len()) != 0 {
            return Err(ContainerError::sys("ptsname", last_err()));
        }
        let name = std::ffi::CStr::from_ptr(buf.as_ptr())
            .to_string_lossy()
            .into_owned();
        let (rows, cols) = std::env::var(WINSIZE_ENV)
            .ok()
            .and_then(|s| {
                let (r, c) = s.split_once(',')?;
                Some((r.parse().ok()?, c.parse().ok()?))
            })
            .unwrap_or((24u16, 80u16));
        let ws = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        check(libc::ioctl(fd, libc::TIOCSWINSZ, &ws), || {
            "TIOCSWINSZ".into()
        })?;
        Ok((master, name))
    }
}

fn send_master(master: &OwnedFd) -> Result<()> {
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    let fds = [master.as_raw_fd()];
    let iov = [io::IoSlice::new(b"m")];
    let r = sendmsg::<()>(
        3,
        &iov,
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    );
    // SAFETY: fd 3 is the socket the server passed us; done with it.
    unsafe {
        libc::close(3);
    }
    r.map_err(|e| ContainerError::sys("passing the pty master to the server (fd 3)", e.into()))?;
    Ok(())
}

/// In the forked job process: never returns.
fn exec_job(
    prog: &CString,
    argv: &[CString],
    env: &[CString],
    cwd: &CString,
    slave: Option<&std::ffi::CStr>,
) -> ! {
    // SAFETY: single-threaded child; plain syscalls, then exec or _exit.
    unsafe {
        let fail = |what: &str| -> ! {
            let msg = format!("{what}: {}\n", last_err());
            libc::write(2, msg.as_ptr().cast(), msg.len());
            libc::_exit(127)
        };
        // Rust ignores SIGPIPE; the job must get the default.
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
        if slave.is_some() {
            // fd 3 is the server socket: the shell must not keep it.
            libc::close(3);
        }
        if let Some(slave) = slave {
            if libc::setsid() < 0 {
                fail("setsid");
            }
            let fd = libc::open(slave.as_ptr(), libc::O_RDWR);
            if fd < 0 {
                fail("open pty slave");
            }
            if libc::ioctl(fd, libc::TIOCSCTTY, 0) < 0 {
                fail("TIOCSCTTY");
            }
            for target in 0..3 {
                libc::dup2(fd, target);
            }
            if fd > 2 {
                libc::close(fd);
            }
        }
        // Nothing else leaks into the job.
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            4u32, /* CLOEXEC */
        );
        if libc::chdir(cwd.as_ptr()) < 0 {
            fail(&format!("chdir {}", cwd.to_string_lossy()));
        }
        let mut a: Vec<*const libc::c_char> = argv.iter().map(|s| s.as_ptr()).collect();
        a.push(std::ptr::null());
        let mut e: Vec<*const libc::c_char> = env.iter().map(|s| s.as_ptr()).collect();
        e.push(std::ptr::null());
        libc::execve(prog.as_ptr(), a.as_ptr(), e.as_ptr());
        fail(&prog.to_string_lossy())
    }
}
