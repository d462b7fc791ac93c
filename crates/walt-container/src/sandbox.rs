//! The re-exec'd side: `<exe> __walt-sandbox <spec-json>`.
//!
//! This process is single-threaded (it is a fresh exec), so fork is safe here.
//! System calls go through `nix` and `rustix` (the new mount API, capabilities, pty,
//! wait statuses); `unsafe` is left where no safe wrapper exists: fork, a signal handler,
//! SIG_DFL, close_range and _exit.

use std::ffi::{CStr, CString, OsStr};
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, IntoRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};

use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;
use nix::sys::signal::{SigHandler, SigSet, SigmaskHow, Signal, sigprocmask};
use nix::sys::stat::Mode;
use rustix::io::Errno;
use rustix::thread::CapabilitySet;

use crate::{ContainerError, Job, MAX_LAYERS, MOUNT_POINTS, Spec, WINSIZE_ENV};

const HOSTNAME: &str = "image-shell";
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Capabilities kept in the bounding set: podman's current defaults (containers.conf
/// `default_capabilities`), which no longer include NET_RAW and AUDIT_WRITE.
const KEEP_CAPS: CapabilitySet = CapabilitySet::CHOWN
    .union(CapabilitySet::DAC_OVERRIDE)
    .union(CapabilitySet::FOWNER)
    .union(CapabilitySet::FSETID)
    .union(CapabilitySet::KILL)
    .union(CapabilitySet::SETGID)
    .union(CapabilitySet::SETUID)
    .union(CapabilitySet::SETPCAP)
    .union(CapabilitySet::NET_BIND_SERVICE)
    .union(CapabilitySet::SYS_CHROOT)
    .union(CapabilitySet::SETFCAP);

type Result<T> = std::result::Result<T, ContainerError>;

/// `ContainerError::Sys` naming what failed, for the errors of std, nix and rustix.
trait OrSys<T> {
    fn or_sys(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: Into<io::Error>> OrSys<T> for std::result::Result<T, E> {
    fn or_sys(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| ContainerError::sys(what(), e.into()))
    }
}

/// Entry point of the sandbox process; never returns. Errors go to stderr as one line,
/// exit status 1; otherwise the exit status is the job's (128+signal when killed).
pub fn sandbox_main() -> ! {
    let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
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

/// `_exit(2)`: leaves at once, without exit handlers or flushing stdio buffers (which a
/// forked copy of this process must not flush twice).
fn exit_now(code: i32) -> ! {
    // SAFETY: _exit takes a plain integer, touches no memory of ours and never returns;
    // neither nix nor rustix wrap it.
    unsafe { libc::_exit(code) }
}

fn cstr(p: impl AsRef<OsStr>) -> Result<CString> {
    CString::new(p.as_ref().as_bytes())
        .map_err(|_| ContainerError::Job(format!("path with a NUL byte: {:?}", p.as_ref())))
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

    nix::sched::unshare(
        CloneFlags::CLONE_NEWNS
            | CloneFlags::CLONE_NEWPID
            | CloneFlags::CLONE_NEWUTS
            | CloneFlags::CLONE_NEWIPC,
    )
    .or_sys(|| "unshare(mount, pid, uts, ipc namespaces)".into())?;
    nix::mount::mount(
        Some("none"),
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .or_sys(|| "making / private in the sandbox".into())?;
    mount_overlay(&spec, &session)?;

    match &spec.job {
        Job::TarOut { path } => {
            enter_chroot(&spec.merged)?;
            drop_caps_here()?;
            crate::tario::tar_out(path).map_err(ContainerError::Job)?;
            Ok(0)
        }
        Job::TarIn { dest, limit } => {
            enter_chroot(&spec.merged)?;
            drop_caps_here()?;
            crate::tario::tar_in(dest, *limit).map_err(ContainerError::Job)?;
            Ok(0)
        }
        Job::Place {
            dest,
            file_name,
            owner,
            limit,
        } => {
            enter_chroot(&spec.merged)?;
            drop_caps_here()?;
            crate::tario::place(dest, file_name.as_deref(), owner.as_deref(), *limit)
                .map_err(ContainerError::Job)?;
            Ok(0)
        }
        Job::CopySources { sources, chmod } => {
            // Resolving reads /proc (the host's, here), which the image does not have.
            let found =
                crate::tario::resolve_from(&spec.merged, sources).map_err(ContainerError::Job)?;
            enter_chroot(&spec.merged)?;
            drop_caps_here()?;
            crate::tario::copy_sources(&found, *chmod).map_err(ContainerError::Job)?;
            Ok(0)
        }
        Job::Shell { .. } | Job::Exec { .. } => run_container(&spec, &session),
    }
}

fn enter_chroot(merged: &Path) -> Result<()> {
    let m = cstr(merged)?;
    nix::unistd::chroot(m.as_c_str()).or_sys(|| format!("chroot {}", merged.display()))?;
    nix::unistd::chdir("/").or_sys(|| "chdir /".into())?;
    nix::sys::stat::umask(Mode::from_bits_truncate(0o022));
    Ok(())
}

// ---------------------------------------------------------------------------------------
// overlay

const OVERLAY_OPTS: &[(&str, &str)] = &[
    ("redirect_dir", "off"),
    ("metacopy", "off"),
    ("index", "off"),
    ("xino", "off"),
];

fn mount_overlay(spec: &Spec, session: &Path) -> Result<()> {
    // The mark a `volatile` mount leaves in its work dir refuses any later
    // mount of the same dirs (a build's COPY places each source with a
    // sandbox of its own on one session). The previous sandbox is gone and
    // its writes are in this boot's page cache: the next mount sees them.
    let mark = spec.work.join("work/incompat/volatile");
    if std::fs::symlink_metadata(&mark).is_ok() {
        walt_tar::remove_tree(&mark).map_err(|e| {
            let source = io::Error::new(e.io_error().kind(), e.to_string());
            ContainerError::sys("removing the mark of the session's previous mount", source)
        })?;
    }
    crate::overlay::mount(&crate::overlay::Overlay {
        layers: &spec.layers,
        empty_lower: &session.join("empty-lower"),
        upper: &spec.upper,
        work: &spec.work,
        target: &spec.merged,
        options: OVERLAY_OPTS,
        nosuid: false,
        volatile: true,
        classic: crate::overlay::ClassicLower::RelativeChdir,
        // Test knob: exercise the mount(2) fallback on kernels that have the new API.
        force_classic: std::env::var_os("WALT_SANDBOX_CLASSIC_MOUNT").is_some(),
    })
}

// ---------------------------------------------------------------------------------------
// Shell / Exec: a pid namespace with a tiny init

/// The exit status of a job: its code, or 128+signal when a signal killed it.
fn decode_status(status: rustix::process::WaitStatus) -> i32 {
    if let Some(code) = status.exit_status() {
        code
    } else if let Some(sig) = status.terminating_signal() {
        128 + sig
    } else {
        1
    }
}

/// Waits for child `pid` to end; Err on a wait error other than EINTR.
fn wait_child(pid: i32) -> std::result::Result<i32, Errno> {
    use rustix::process::{Pid, WaitOptions, waitpid};
    let Some(want) = Pid::from_raw(pid) else {
        return Err(Errno::CHILD);
    };
    loop {
        match waitpid(Some(want), WaitOptions::empty()) {
            Ok(Some((p, status))) if p == want => return Ok(decode_status(status)),
            Ok(_) | Err(Errno::INTR) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// pid 1 of the sandbox's pid namespace, for the SIGTERM handler.
static CHILD: AtomicI32 = AtomicI32::new(0);

/// SIGTERM in the outer sandbox process: SIGKILL the namespace's pid 1 (which takes every
/// process of the namespace with it); the parent then reaps it and exits, so that when the
/// server's wait() returns, nothing of the sandbox is left. Async-signal-safe only.
extern "C" fn on_sigterm(_: libc::c_int) {
    let pid = CHILD.load(Ordering::SeqCst);
    if pid > 0 {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
    }
}

fn run_container(spec: &Spec, session: &Path) -> Result<i32> {
    use nix::fcntl::OFlag;
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use nix::sys::signal::{SaFlags, SigAction, sigaction};
    use nix::unistd::{ForkResult, fork};

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
    let (alive_r, alive_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).or_sys(|| "pipe".into())?;
    // SIGTERM (the server stopping the session) is blocked across the fork: the parent
    // handles it once it knows the child's pid, the child gets the default back.
    let mut old_mask = SigSet::empty();
    sigprocmask(
        SigmaskHow::SIG_BLOCK,
        Some(&SigSet::from(Signal::SIGTERM)),
        Some(&mut old_mask),
    )
    .or_sys(|| "blocking SIGTERM".into())?;
    // SAFETY: this process is single-threaded (a fresh exec that started no thread), so
    // the child may run any code, allocation included.
    let forked = unsafe { fork() }.or_sys(|| "fork".into())?;
    if let ForkResult::Parent { child } = forked {
        drop(alive_r);
        CHILD.store(child.as_raw(), Ordering::SeqCst);
        // No SA_RESTART: waitpid returns EINTR and is simply retried.
        let on_term = SigAction::new(
            SigHandler::Handler(on_sigterm),
            SaFlags::empty(),
            SigSet::empty(),
        );
        // SAFETY: on_sigterm is async-signal-safe: it loads an atomic and calls kill(2).
        let _ = unsafe { sigaction(Signal::SIGTERM, &on_term) };
        let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&old_mask), None);
        let status = wait_child(child.as_raw()).unwrap_or(1);
        drop(alive_w);
        return Ok(status);
    }
    // pid 1 of the new pid namespace.
    drop(alive_w);
    let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
    // The parent may have died between fork and prctl: then no signal would come.
    let mut alive = [PollFd::new(alive_r.as_fd(), PollFlags::POLLIN)];
    if !matches!(poll(&mut alive, PollTimeout::ZERO), Ok(0)) {
        exit_now(1);
    }
    let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&old_mask), None);
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
    flags: MsFlags,
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
    nix::mount::mount(
        Some(c_src.as_c_str()),
        c_target.as_c_str(),
        c_type.as_deref(),
        flags,
        c_data.as_deref(),
    )
    .map_err(|e| err(e.into()))
}

/// Parts of /proc that reach the host kernel: the sandbox runs as real root (no user
/// namespace), so like podman/runc they are read-only...
const PROC_READONLY: &[&str] = &["sys", "sysrq-trigger", "irq", "bus"];
/// ...or masked (/dev/null over files, an empty read-only tmpfs over directories).
const PROC_MASKED: &[&str] = &["kcore", "keys", "timer_list", "sched_debug", "acpi", "scsi"];

/// Make the host-wide parts of a freshly mounted procfs read-only or masked; what this
/// kernel does not have is skipped.
fn harden_proc(proc: &Path) -> Result<()> {
    let common = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    for name in PROC_READONLY {
        let p = proc.join(name);
        if std::fs::symlink_metadata(&p).is_err() {
            continue;
        }
        let s = p.to_string_lossy();
        mount(&s, &p, None, MsFlags::MS_BIND | MsFlags::MS_REC, None)?;
        mount(
            &s,
            &p,
            None,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | common,
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
                MsFlags::MS_RDONLY | common,
                Some("size=0,mode=555"),
            )?,
            Ok(_) => {
                // Still the host's /dev/null: this runs before pivot_root.
                mount("/dev/null", &p, None, MsFlags::MS_BIND, None)?;
                mount(
                    "/dev/null",
                    &p,
                    None,
                    MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | common,
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
    let nosuid_noexec = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC;
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
        use nix::sys::stat::{SFlag, makedev, mknod};
        use std::os::unix::fs::PermissionsExt;
        let p = dev.join(name);
        let c = cstr(&p)?;
        let rw = Mode::from_bits_truncate(0o666);
        mknod(c.as_c_str(), SFlag::S_IFCHR, rw, makedev(major, minor))
            .or_sys(|| format!("mknod {}", p.display()))?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o666))
            .or_sys(|| format!("chmod {}", p.display()))?;
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
        nosuid_noexec | MsFlags::MS_NODEV,
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
    use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    let Ok(target) = openat2(&root, c"etc/resolv.conf", how) else {
        return Ok(());
    };
    match nix::sys::stat::fstat(&target) {
        Ok(st) if st.st_mode & libc::S_IFMT == libc::S_IFREG => {}
        _ => return Ok(()),
    }
    let src = resolv.to_string_lossy();
    mount(
        &src,
        Path::new(&format!("/proc/self/fd/{}", target.as_raw_fd())),
        None,
        MsFlags::MS_BIND,
        None,
    )
}

fn pivot(merged: &Path) -> Result<()> {
    use nix::unistd::chdir;
    let m = cstr(merged)?;
    chdir(m.as_c_str()).or_sys(|| format!("chdir {}", merged.display()))?;
    // pivot_root(".", ".") stacks the old root on top of the new one; detaching it leaves
    // the image as the root, without a put_old dir in the image.
    nix::unistd::pivot_root(".", ".").or_sys(|| format!("pivot_root {}", merged.display()))?;
    nix::mount::umount2(".", MntFlags::MNT_DETACH).or_sys(|| "detaching the old root".into())?;
    chdir("/").or_sys(|| "chdir /".into())?;
    Ok(())
}

/// For the jobs that run in this process (no exec follows): the shell's
/// capabilities, in the effective and permitted sets as well as in the
/// bounding set.
fn drop_caps_here() -> Result<()> {
    use rustix::thread::{capabilities, set_capabilities};
    drop_caps()?;
    let mut sets = capabilities(None).or_sys(|| "capget".into())?;
    sets.effective &= KEEP_CAPS;
    sets.permitted &= KEEP_CAPS;
    set_capabilities(None, sets).or_sys(|| "capset".into())
}

fn drop_caps() -> Result<()> {
    use rustix::thread::{
        capabilities, clear_ambient_capability_set, remove_capability_from_bounding_set,
        set_capabilities,
    };
    let last: u32 = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(63);
    // Capabilities past 63 do not exist (a capability set has 64 bits).
    for cap in 0..=last.min(63) {
        let one = CapabilitySet::from_bits_retain(1 << cap);
        if KEEP_CAPS.contains(one) {
            continue;
        }
        match remove_capability_from_bounding_set(one) {
            // EINVAL: not a capability of this kernel.
            Ok(()) | Err(Errno::INVAL) => {}
            Err(e) => {
                return Err(ContainerError::sys(
                    format!("dropping capability {cap}"),
                    e.into(),
                ));
            }
        }
    }
    let _ = clear_ambient_capability_set();
    // The inheritable set also feeds root's caps at exec: keep only the allowed ones.
    if let Ok(mut sets) = capabilities(None) {
        sets.inheritable &= KEEP_CAPS;
        set_capabilities(None, sets).or_sys(|| "capset".into())?;
    }
    Ok(())
}

/// pid 1: set up the container, start the job, reap zombies, exit with the job's status.
fn init(spec: &Spec, resolv: Option<&Path>) -> Result<i32> {
    nix::sys::stat::umask(Mode::empty());
    nix::unistd::sethostname(HOSTNAME).or_sys(|| "sethostname".into())?;
    let merged = &spec.merged;
    for name in MOUNT_POINTS {
        // /tmp is only a convenience of shells (nothing is mounted there):
        // a build step sees the image as it is, as with docker.
        if *name == "tmp" && matches!(spec.job, Job::Exec { .. }) {
            continue;
        }
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
    let common = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount("proc", &merged.join("proc"), Some("proc"), common, None)?;
    harden_proc(&merged.join("proc"))?;
    mount(
        "sysfs",
        &merged.join("sys"),
        Some("sysfs"),
        common | MsFlags::MS_RDONLY,
        None,
    )?;
    setup_dev(&merged.join("dev"))?;
    if let Some(r) = resolv {
        bind_resolv(merged, r)?;
    }
    pivot(merged)?;
    nix::sys::stat::umask(Mode::from_bits_truncate(0o022));

    let mut ids = None;
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
        Job::Exec {
            argv,
            env,
            cwd,
            user,
        } => {
            let first = argv
                .first()
                .ok_or_else(|| ContainerError::Job("empty command".into()))?;
            let dbs = crate::users::Dbs::read().map_err(ContainerError::Job)?;
            let who = crate::users::exec_user(user, &dbs).map_err(ContainerError::Job)?;
            let mut env = env.clone();
            if !env.iter().any(|e| e.starts_with("HOME=")) {
                let home = who.home.as_deref().filter(|h| !h.is_empty()).unwrap_or("/");
                env.push(format!("HOME={home}"));
            }
            let path = env
                .iter()
                .find_map(|e| e.strip_prefix("PATH="))
                .unwrap_or(DEFAULT_PATH);
            let prog = find_program(first, path)
                .ok_or_else(|| ContainerError::Job(format!("{first}: command not found")))?;
            let cwd = if cwd.is_empty() { "/" } else { cwd.as_str() };
            make_workdir(cwd)?;
            ids = Some(who);
            (prog, argv.clone(), env, cwd.to_string(), None)
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

    // SAFETY: this process is single-threaded (the outer sandbox process forked it, and it
    // started no thread), so the child may run any code, allocation included.
    let forked = unsafe { nix::unistd::fork() }.or_sys(|| "fork".into())?;
    let nix::unistd::ForkResult::Parent { child } = forked else {
        exec_job(
            &c_prog,
            &c_argv,
            &c_env,
            &c_cwd,
            slave_name.as_deref(),
            ids.as_ref(),
        );
    };
    if let Some((master, _)) = pty {
        send_master(&master)?;
        drop(master);
    }
    // Reap everything; leave when the job exits (the kernel then kills the rest).
    use rustix::process::{Pid, WaitOptions, wait};
    let job = Pid::from_raw(child.as_raw());
    loop {
        // wait(): any child (rustix's waitpid(None) is only those of our process group).
        match wait(WaitOptions::empty()) {
            Ok(Some((p, status))) if Some(p) == job => return Ok(decode_status(status)),
            Err(Errno::CHILD) => return Ok(1),
            _ => {}
        }
    }
}

/// RUN's workdir: created with its missing parents (0755, root) as docker does.
fn make_workdir(cwd: &str) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if std::fs::metadata(cwd).is_ok() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(cwd)
        .map_err(|e| ContainerError::sys(format!("creating the working directory {cwd}"), e))
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
    use rustix::pty::{OpenptFlags, grantpt, openpt, ptsname, unlockpt};
    let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)
        .or_sys(|| "open /dev/ptmx".into())?;
    grantpt(&master).or_sys(|| "grantpt".into())?;
    unlockpt(&master).or_sys(|| "unlockpt".into())?;
    let name = ptsname(&master, Vec::new())
        .or_sys(|| "ptsname".into())?
        .to_string_lossy()
        .into_owned();
    let (rows, cols) = std::env::var(WINSIZE_ENV)
        .ok()
        .and_then(|s| {
            let (r, c) = s.split_once(',')?;
            Some((r.parse().ok()?, c.parse().ok()?))
        })
        .unwrap_or((24u16, 80u16));
    let ws = rustix::termios::Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    rustix::termios::tcsetwinsize(&master, ws).or_sys(|| "TIOCSWINSZ".into())?;
    Ok((master, name))
}

/// The server's end of the socketpair it gives a Shell job as fd 3 (see `spawn_shell`).
const SERVER_SOCKET: i32 = 3;

fn send_master(master: &OwnedFd) -> Result<()> {
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    let fds = [master.as_raw_fd()];
    let iov = [io::IoSlice::new(b"m")];
    let r = sendmsg::<()>(
        SERVER_SOCKET,
        &iov,
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    );
    // Done with the socket (nothing in this process owns it as an OwnedFd).
    let _ = nix::unistd::close(SERVER_SOCKET);
    r.map_err(|e| ContainerError::sys("passing the pty master to the server (fd 3)", e.into()))?;
    Ok(())
}

/// In the forked job process: never returns.
fn exec_job(
    prog: &CStr,
    argv: &[CString],
    env: &[CString],
    cwd: &CStr,
    slave: Option<&CStr>,
    ids: Option<&crate::users::ExecUser>,
) -> ! {
    let fail = |what: &str, e: io::Error| -> ! {
        let msg = format!("{what}: {e}\n");
        let _ = io::stderr().write_all(msg.as_bytes());
        exit_now(127)
    };
    // Rust ignores SIGPIPE; the job must get the default.
    // SAFETY: SIG_DFL installs no handler: no code of ours runs on a signal.
    let _ = unsafe { nix::sys::signal::signal(Signal::SIGPIPE, SigHandler::SigDfl) };
    let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
    if let Some(slave) = slave {
        // fd 3 is the server socket: the shell must not keep it.
        let _ = nix::unistd::close(SERVER_SOCKET);
        if let Err(e) = nix::unistd::setsid() {
            fail("setsid", e.into());
        }
        let fd = match nix::fcntl::open(slave, nix::fcntl::OFlag::O_RDWR, Mode::empty()) {
            Ok(fd) => fd,
            Err(e) => fail("open pty slave", e.into()),
        };
        if let Err(e) = rustix::process::ioctl_tiocsctty(&fd) {
            fail("TIOCSCTTY", e.into());
        }
        let _ = nix::unistd::dup2_stdin(&fd);
        let _ = nix::unistd::dup2_stdout(&fd);
        let _ = nix::unistd::dup2_stderr(&fd);
        if fd.as_raw_fd() <= 2 {
            // It is one of the job's stdio now: keep it open.
            let _ = fd.into_raw_fd();
        }
    }
    // Nothing else leaks into the job.
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only marks descriptors (no wrapper in nix
    // or rustix); it reads no memory of ours, and nothing here uses those fds after exec.
    unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        );
    }
    if let Err(e) = nix::unistd::chdir(cwd) {
        fail(&format!("chdir {}", cwd.to_string_lossy()), e.into());
    }
    if let Some(ids) = ids {
        use nix::unistd::{Gid, Uid, setgid, setgroups, setuid};
        let groups: Vec<Gid> = ids.groups.iter().map(|g| Gid::from_raw(*g)).collect();
        if let Err(e) = setgroups(&groups) {
            fail("setgroups", e.into());
        }
        if let Err(e) = setgid(Gid::from_raw(ids.gid)) {
            fail("setgid", e.into());
        }
        if let Err(e) = setuid(Uid::from_raw(ids.uid)) {
            fail("setuid", e.into());
        }
    }
    let Err(e) = nix::unistd::execve(prog, argv, env);
    fail(&prog.to_string_lossy(), e.into())
}
