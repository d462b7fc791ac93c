//! Native namespace sandbox for `walt image shell`, build steps and `walt image cp`.
//!
//! The server is a multi-threaded tokio process, so it never forks without exec: the
//! sandbox is a re-exec of the server binary, `/proc/self/exe __walt-sandbox <spec-json>`,
//! dispatched at the top of `main` to [`sandbox_main`]. That process unshares the mount,
//! pid, uts and ipc namespaces, mounts the image layers with overlayfs on the session's
//! `merged` dir and runs the [`Job`]. The overlay only exists in the sandbox's private
//! mount namespace: it disappears with the sandbox, nothing is left mounted on the host.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use serde::{Deserialize, Serialize};
use walt_core::arch::Arch;

pub mod overlay;
mod sandbox;
mod tario;
mod users;

pub use sandbox::sandbox_main;

/// First argument of the re-exec'd binary that selects [`sandbox_main`].
pub const SANDBOX_ARG: &str = "__walt-sandbox";

/// Environment variable carrying the initial window size ("rows,cols") of a shell.
const WINSIZE_ENV: &str = "WALT_SANDBOX_WINSIZE";

/// overlayfs takes at most this many lower layers.
pub const MAX_LAYERS: usize = 500;

/// Mount points the sandbox creates at the image root when the image lacks them.
pub(crate) const MOUNT_POINTS: &[&str] = &["proc", "sys", "dev", "tmp"];

/// What to run, on which layers.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Spec {
    /// Unpacked layer dirs, LOWEST first.
    pub layers: Vec<PathBuf>,
    /// Session dirs, created by the caller, on the same filesystem.
    pub upper: PathBuf,
    pub work: PathBuf,
    pub merged: PathBuf,
    pub job: Job,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
pub enum Job {
    /// Interactive shell on a PTY owned by the container (see [`spawn_shell`]).
    Shell { term: String },
    /// Non-interactive command, stdio inherited.
    Exec {
        argv: Vec<String>,
        env: Vec<String>,
        /// Absolute; created (with its parents, 0755, root) when the image lacks it.
        cwd: String,
        /// Docker's USER (`name`, `uid`, `name:group`, `uid:gid`...; empty: root),
        /// resolved in the image's /etc/passwd and /etc/group. HOME is set from passwd
        /// when `env` has none.
        user: String,
    },
    /// Write a tar of `path` (relative paths are relative to /root) to stdout.
    TarOut { path: String },
    /// Read a tar from stdin into `dest` (`cp -r` rules), writing at most
    /// `limit` bytes of file data (apparent sizes: holes count).
    TarIn { dest: String, limit: Option<u64> },
    /// Read a tar from stdin and place its entries for COPY/ADD (Docker's rules).
    ///
    /// `dest` is absolute, resolved in the image (its symlinks followed, never out of
    /// it). `file_name: None`: dest is a directory (created with its missing parents),
    /// the entries land beneath it. `Some(n)`: the tar holds the one file `n`, which
    /// lands as dest/n when dest is a directory, else at dest (parents created).
    /// `owner: None` keeps the tar's owners (created directories are 0:0); `Some`
    /// is a `--chown` value, given to every entry and every directory created.
    /// Devices are refused; `limit` as for TarIn.
    Place {
        dest: String,
        file_name: Option<String>,
        owner: Option<String>,
        limit: Option<u64>,
    },
    /// Write to stdout the tar that `walt_build::copy::write_copy_tar_keeping_owners` makes of
    /// `sources` resolved in the image (COPY --from), after a header ended by a
    /// NUL byte: `F<name>` when it is exactly one regular file, `D` otherwise
    /// (directory content).
    CopySources {
        sources: Vec<String>,
        chmod: Option<u32>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("image has {0} layers, overlayfs takes at most 500: run `walt image squash` first")]
    TooManyLayers(usize),
    #[error("cannot mount the overlay on {merged}: {msg}")]
    Overlay { merged: PathBuf, msg: String },
    #[error("layer {layer}: {msg}")]
    Layer { layer: PathBuf, msg: String },
    #[error("cannot mount {what} on {target}: {source}")]
    Mount {
        what: String,
        target: PathBuf,
        source: io::Error,
    },
    #[error("{what}: {source}")]
    Sys { what: String, source: io::Error },
    #[error("cannot start the sandbox: {0}")]
    Spawn(io::Error),
    #[error("sandbox failed: {0}")]
    Sandbox(String),
    #[error("{0}")]
    Emulation(String),
    #[error("{0}")]
    Job(String),
}

impl ContainerError {
    pub(crate) fn sys(what: impl Into<String>, source: io::Error) -> Self {
        ContainerError::Sys {
            what: what.into(),
            source,
        }
    }
}

/// The command that runs `spec` in a sandbox: `/proc/self/exe __walt-sandbox <json>`,
/// killed when dropped, with an empty environment. The program is `$WALT_SANDBOX_EXE`
/// when set (tools). stdio is left to the caller.
///
/// The sandbox is tied to its spawner with `PR_SET_PDEATHSIG`, which fires when the
/// *thread* that forked it exits, not the process. Spawn it from a thread that lives as long
/// as the sandbox: a tokio worker (an `async` task), never `spawn_blocking` (its threads
/// are reaped when idle, which would SIGKILL a running sandbox).
pub fn command(spec: &Spec) -> io::Result<tokio::process::Command> {
    let json = serde_json::to_string(spec).map_err(io::Error::other)?;
    let exe = std::env::var_os("WALT_SANDBOX_EXE").unwrap_or_else(|| "/proc/self/exe".into());
    let mut cmd = tokio::process::Command::new(exe);
    // The server's environment (credentials...) has no business in the container.
    cmd.arg(SANDBOX_ARG)
        .arg(json)
        .env_clear()
        .kill_on_drop(true);
    let server = nix::unistd::getpid();
    // PDEATHSIG survives the exec (not setuid), so the sandbox dies with the server even if
    // the server dies before sandbox_main runs; if the server died between fork and prctl
    // (getppid changed), no signal will come: leave at once. (Not through an error: std
    // would report it on a pipe whose reader is gone, and abort.)
    let tie_to_server = move || {
        nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
        if nix::unistd::getppid() != server {
            // SAFETY: _exit takes a plain integer, touches no memory of ours and never
            // returns; neither nix nor rustix wrap it.
            unsafe { libc::_exit(1) }
        }
        Ok(())
    };
    // SAFETY: the hook runs between fork and exec in a copy of a multi-threaded process:
    // it only makes the prctl and getppid system calls (async-signal-safe), allocates
    // nothing (errors are raw errno values) and takes no lock.
    unsafe { cmd.pre_exec(tie_to_server) };
    Ok(cmd)
}

/// An interactive shell in a sandbox.
pub struct Shell {
    /// The sandbox process (stdin/stdout null, stderr piped: sandbox errors, one line).
    pub child: tokio::process::Child,
    /// The PTY master, for the caller to relay (its slave lives in the container's devpts).
    pub master: OwnedFd,
}

/// Start an interactive shell (`spec.job` must be [`Job::Shell`]); returns as soon as the
/// sandbox has passed the PTY master back (SCM_RIGHTS over a socketpair on fd 3).
pub async fn spawn_shell(spec: &Spec, rows: u16, cols: u16) -> Result<Shell, ContainerError> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
    if !matches!(spec.job, Job::Shell { .. }) {
        return Err(ContainerError::Job("spawn_shell needs a Shell job".into()));
    }
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| ContainerError::sys("socketpair", e.into()))?;
    let mut cmd = command(spec).map_err(ContainerError::Spawn)?;
    cmd.env(WINSIZE_ENV, format!("{rows},{cols}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let child_fd = theirs.as_raw_fd();
    // The socket becomes the sandbox's fd 3, without close-on-exec.
    let pass_socket = move || {
        // SAFETY: plain fcntl/dup2 on descriptor numbers (no safe API duplicates onto a
        // bare number): child_fd is `theirs`, open until spawn returns, so open in this
        // forked copy too; the fd 3 that dup2 replaces is the child's own, and nothing in
        // the child uses it before the exec.
        let r = unsafe {
            if child_fd == 3 {
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(child_fd, 3)
            }
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    };
    // SAFETY: the hook runs between fork and exec in a copy of a multi-threaded process: it
    // only makes the fcntl or dup2 system call (async-signal-safe, no allocation, no lock).
    unsafe { cmd.pre_exec(pass_socket) };
    let mut child = cmd.spawn().map_err(ContainerError::Spawn)?;
    drop(theirs);
    let std_sock = std::os::unix::net::UnixStream::from(ours);
    std_sock
        .set_nonblocking(true)
        .map_err(|e| ContainerError::sys("socket", e))?;
    let sock =
        tokio::net::UnixStream::from_std(std_sock).map_err(|e| ContainerError::sys("socket", e))?;
    let master = loop {
        sock.readable()
            .await
            .map_err(|e| ContainerError::sys("socket", e))?;
        match sock.try_io(tokio::io::Interest::READABLE, || recv_fd(&sock)) {
            Ok(fd) => break fd,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                // The sandbox failed before passing the master: report its error line.
                let mut msg = String::new();
                if let Some(mut err) = child.stderr.take() {
                    use tokio::io::AsyncReadExt;
                    let _ = tokio::time::timeout(
                        std::time::Duration::from_secs(5),
                        err.read_to_string(&mut msg),
                    )
                    .await;
                }
                let _ = child.kill().await;
                let msg = msg.trim();
                return Err(if msg.is_empty() {
                    ContainerError::Sandbox(format!("no pty from the sandbox: {e}"))
                } else {
                    ContainerError::Sandbox(msg.to_string())
                });
            }
        }
    };
    Ok(Shell { child, master })
}

fn recv_fd(sock: impl AsFd) -> io::Result<OwnedFd> {
    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, recvmsg};
    use std::mem::MaybeUninit;
    let mut buf = [0u8; 1];
    let mut iov = [io::IoSliceMut::new(&mut buf)];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut cmsg = RecvAncillaryBuffer::new(&mut space);
    let msg = recvmsg(sock, &mut iov, &mut cmsg, RecvFlags::CMSG_CLOEXEC)?;
    let mut got = None;
    for c in cmsg.drain() {
        if let RecvAncillaryMessage::ScmRights(fds) = c {
            for fd in fds {
                if got.is_none() {
                    got = Some(fd);
                }
            }
        }
    }
    match got {
        Some(fd) => Ok(fd),
        None if msg.bytes == 0 => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "sandbox exited",
        )),
        None => Err(io::Error::other("message without a file descriptor")),
    }
}

/// Remove from `upper` what the sandbox itself created there (missing mount points of the
/// image) when still empty, so that a session that changed nothing leaves an empty upper.
pub fn clean_session_artifacts(upper: &Path) {
    for name in MOUNT_POINTS {
        let p = upper.join(name);
        let Ok(meta) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if !meta.is_dir() {
            continue;
        }
        // An opaque dir is a user's `rm -rf x; mkdir x`: a real change, keep it.
        if matches!(xattr::get(&p, "trusted.overlay.opaque"), Ok(Some(_))) {
            continue;
        }
        // remove_dir fails on a non-empty dir: exactly what we want.
        let _ = std::fs::remove_dir(&p);
    }
}

/// Is `image_arch` (OCI `architecture`, `variant`) runnable here, natively or through a
/// qemu-user-static handler registered with binfmt_misc (F flag)?
pub fn check_emulation(
    image_arch: &str,
    image_variant: Option<&str>,
) -> Result<(), ContainerError> {
    check_emulation_in(
        image_arch,
        image_variant,
        std::env::consts::ARCH,
        Path::new("/proc/sys/fs/binfmt_misc"),
    )
}

pub(crate) fn check_emulation_in(
    image_arch: &str,
    image_variant: Option<&str>,
    host_arch: &str,
    binfmt_dir: &Path,
) -> Result<(), ContainerError> {
    match Arch::from_machine(host_arch) {
        // 64-bit hosts run their 32-bit siblings natively (see `Arch::also_runs`).
        Some(host) if host.runs_natively(image_arch) => return Ok(()),
        Some(_) => {}
        // A host walt has no name for runs what is named like it.
        None if image_arch == host_arch => return Ok(()),
        None => {}
    }
    let shown = match image_variant {
        Some(v) if !v.is_empty() => format!("{image_arch}/{v}"),
        _ => image_arch.to_string(),
    };
    let Some(image) = Arch::from_oci(image_arch) else {
        return Err(ContainerError::Emulation(format!(
            "image is {shown} but this server is {host_arch}, and there is no known qemu-user emulator for {image_arch}"
        )));
    };
    let handler = image.qemu_handler();
    let fix = format!(
        "install qemu-user-static and binfmt-support (apt-get install qemu-user-static binfmt-support), then run update-binfmts --enable {handler}"
    );
    let content = match std::fs::read_to_string(binfmt_dir.join(&handler)) {
        Ok(c) => c,
        Err(_) => {
            return Err(ContainerError::Emulation(format!(
                "image is {shown} but this server is {host_arch} and {handler} is not registered with binfmt_misc: {fix}"
            )));
        }
    };
    let enabled = content.lines().next().map(str::trim) == Some("enabled");
    if !enabled {
        return Err(ContainerError::Emulation(format!(
            "image is {shown} but this server is {host_arch} and the binfmt_misc handler {handler} is disabled: run update-binfmts --enable {handler}"
        )));
    }
    let fixed = content
        .lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .is_some_and(|f| f.contains('F'));
    if !fixed {
        return Err(ContainerError::Emulation(format!(
            "image is {shown} but this server is {host_arch} and the binfmt_misc handler {handler} lacks the F (fix binary) flag, so it cannot run inside the image: {fix} (the qemu-user-static package registers it with F)"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn native_is_ok() {
        let d = tempfile::tempdir().unwrap();
        assert!(check_emulation_in("amd64", None, "x86_64", d.path()).is_ok());
        assert!(check_emulation_in("arm64", Some("v8"), "aarch64", d.path()).is_ok());
    }

    #[test]
    fn missing_binfmt_says_what_to_do() {
        let d = tempfile::tempdir().unwrap();
        let e = check_emulation_in("arm64", None, "x86_64", d.path())
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "image is arm64 but this server is x86_64 and qemu-aarch64 is not registered with binfmt_misc: install qemu-user-static and binfmt-support (apt-get install qemu-user-static binfmt-support), then run update-binfmts --enable qemu-aarch64"
        );
        let e = check_emulation_in("arm", Some("v7"), "x86_64", d.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("image is arm/v7"), "{e}");
        assert!(e.contains("update-binfmts --enable qemu-arm"), "{e}");
    }

    #[test]
    fn native_siblings_and_unknown_arches() {
        let d = tempfile::tempdir().unwrap();
        assert!(check_emulation_in("386", None, "x86_64", d.path()).is_ok());
        let e = check_emulation_in("amd64", None, "x86", d.path()).unwrap_err();
        assert!(
            e.to_string().contains("qemu-x86_64 is not registered"),
            "{e}"
        );
        let e = check_emulation_in("arm", Some("v7"), "aarch64", d.path()).unwrap_err();
        assert!(e.to_string().contains("qemu-arm is not registered"), "{e}");
        // A host walt has no table entry for runs images of its own name.
        assert!(check_emulation_in("sparc64", None, "sparc64", d.path()).is_ok());
        let e = check_emulation_in("wasm", None, "x86_64", d.path()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "image is wasm but this server is x86_64, and there is no known qemu-user emulator for wasm"
        );
    }

    #[test]
    fn registered_binfmt() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("qemu-aarch64");
        std::fs::write(
            &f,
            "enabled\ninterpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P\nflags: POCF\noffset 0\n",
        )
        .unwrap();
        assert!(check_emulation_in("arm64", None, "x86_64", d.path()).is_ok());
        std::fs::write(&f, "disabled\nflags: POCF\n").unwrap();
        let e = check_emulation_in("arm64", None, "x86_64", d.path()).unwrap_err();
        assert!(e.to_string().contains("disabled"), "{e}");
        std::fs::write(&f, "enabled\nflags: P\n").unwrap();
        let e = check_emulation_in("arm64", None, "x86_64", d.path()).unwrap_err();
        assert!(e.to_string().contains("F (fix binary)"), "{e}");
    }

    #[test]
    fn clean_artifacts_keeps_changes() {
        let d = tempfile::tempdir().unwrap();
        let u = d.path();
        for n in ["proc", "sys", "dev", "tmp"] {
            std::fs::create_dir(u.join(n)).unwrap();
        }
        std::fs::write(u.join("tmp/x"), "x").unwrap();
        std::fs::create_dir(u.join("etc")).unwrap();
        clean_session_artifacts(u);
        let mut left: Vec<_> = std::fs::read_dir(u)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["etc", "tmp"]);
    }
}
