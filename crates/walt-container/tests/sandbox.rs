//! Integration tests of the real re-exec path. `harness = false`: this binary is also the
//! sandbox (`/proc/self/exe __walt-sandbox <json>`), so `main` dispatches first. It speaks
//! enough of the libtest CLI for `cargo test` and `cargo nextest run`
//! (`--list --format terse`, `--ignored`, `--exact NAME`). Needs root: without it each test
//! fails, or is reported as ignored when `WALT_SKIP_ROOT_TESTS=1`.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::unix::AsyncFd;
use walt_container::{Job, Spec, clean_session_artifacts, command, spawn_shell};

type TestFn = fn() -> futures_like::BoxFut;

mod futures_like {
    pub type BoxFut = std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>;
}

macro_rules! tests {
    ($($name:ident),* $(,)?) => {
        &[$((stringify!($name), (|| Box::pin($name())) as TestFn)),*]
    };
}

const TESTS: &[(&str, TestFn)] = tests![
    exec_basics,
    exec_user_and_workdir,
    caps_dropped,
    untouched_session_leaves_empty_upper,
    shell_pty,
    killing_sandbox_kills_shell,
    tar_roundtrip,
    place_directory_mode,
    place_file_mode,
    place_refusals,
    copy_sources_into_place,
    tar_in_refuses_bad_archives,
    tar_in_is_bounded_by_its_limit,
    tar_paths_stay_in_image,
    too_many_layers,
    many_layers,
    proc_is_hardened,
    image_devices_unusable,
    tar_in_skips_global_header,
    tar_in_hostile_table,
    tar_jobs_run_with_the_shells_capabilities,
    sigterm_tears_down_namespace,
    a_session_mounts_again_after_its_sandbox_ended,
];

/// Set to `1` to run these tests without root: they are then reported as ignored (never as
/// passed). Without it, a run that is not root fails each test it selects.
const SKIP_VAR: &str = "WALT_SKIP_ROOT_TESTS";

fn main() {
    if std::env::args_os().nth(1).as_deref() == Some(OsStr::new(walt_container::SANDBOX_ARG)) {
        walt_container::sandbox_main()
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let only_ignored = args.iter().any(|a| a == "--ignored");
    let include_ignored = args.iter().any(|a| a == "--include-ignored");
    let root = nix::unistd::geteuid().is_root();
    // Without root, and only when asked, every test counts as ignored.
    let skip = !root && std::env::var_os(SKIP_VAR).is_some_and(|v| v == "1");
    if args.iter().any(|a| a == "--list") {
        if !only_ignored || skip {
            for (name, _) in TESTS {
                println!("{name}: test");
            }
        }
        return;
    }
    let exact = args.iter().any(|a| a == "--exact");
    let filter: Option<&String> = args.iter().find(|a| !a.starts_with("--"));
    let selected: Vec<&(&str, TestFn)> = TESTS
        .iter()
        .filter(|(name, _)| match filter {
            Some(flt) if exact => name == flt,
            Some(flt) => name.contains(flt.as_str()),
            None => true,
        })
        .collect();
    let (run, ignored): (Vec<_>, Vec<_>) = if only_ignored {
        (if skip { selected } else { Vec::new() }, Vec::new())
    } else if skip && !include_ignored {
        (Vec::new(), selected)
    } else {
        (selected, Vec::new())
    };
    for (name, _) in &ignored {
        println!("test {name} ... ignored, needs root ({SKIP_VAR}=1)");
    }
    let mut failed = Vec::new();
    let mut ran = 0;
    for (name, f) in run {
        ran += 1;
        if !root {
            println!(
                "test {name} ... FAILED: needs root (run as root, or set {SKIP_VAR}=1 to report the sandbox tests as ignored)"
            );
            failed.push(*name);
            continue;
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            rt.block_on(async { tokio::time::timeout(Duration::from_secs(60), f()).await })
                .expect("test timed out")
        }));
        drop(rt);
        match r {
            Ok(()) => println!("test {name} ... ok"),
            Err(_) => {
                println!("test {name} ... FAILED");
                failed.push(*name);
            }
        }
    }
    println!(
        "\ntest result: {}. {} passed; {} failed; {} ignored",
        if failed.is_empty() { "ok" } else { "FAILED" },
        ran - failed.len(),
        failed.len(),
        ignored.len()
    );
    if !failed.is_empty() {
        std::process::exit(101);
    }
}

// ---------------------------------------------------------------------------------------
// fixture

const APPLETS: &[&str] = &[
    "sh", "ls", "cat", "echo", "uname", "sleep", "hostname", "id", "mount", "mknod", "stty",
    "grep", "true", "false", "mkdir", "touch", "ps", "readlink", "stat",
];
const PASSWD: &str = "root:x:0:0:walt-test-image:/root:/bin/sh\n";

/// A two-layer busybox image and a session, removed on drop after checking that no
/// mount and no sandbox process of it remains.
struct Fx {
    dir: tempfile::TempDir,
    layers: Vec<PathBuf>,
    n: std::cell::Cell<u32>,
}

impl Fx {
    fn new() -> Fx {
        let dir = tempfile::Builder::new()
            .prefix("walt-container-test")
            .tempdir()
            .unwrap();
        let l1 = dir.path().join("layers/aaaa/diff");
        let l2 = dir.path().join("layers/bbbb/diff");
        for d in ["bin", "etc", "root", "mnt"] {
            std::fs::create_dir_all(l1.join(d)).unwrap();
        }
        std::fs::copy("/bin/busybox", l1.join("bin/busybox")).unwrap();
        for a in APPLETS {
            std::os::unix::fs::symlink("busybox", l1.join("bin").join(a)).unwrap();
        }
        std::fs::write(l1.join("etc/passwd"), PASSWD).unwrap();
        std::fs::write(l1.join("etc/resolv.conf"), "nameserver 192.0.2.1\n").unwrap();
        std::fs::write(l1.join("etc/hidden"), "lower").unwrap();
        std::os::unix::fs::symlink("/", l1.join("root/evil")).unwrap();
        std::os::unix::fs::symlink("../../..", l1.join("root/evil2")).unwrap();
        std::fs::create_dir_all(l2.join("etc")).unwrap();
        std::fs::write(l2.join("etc/added"), "added").unwrap();
        mknod(&l2.join("etc/hidden"), libc::S_IFCHR | 0o600, 0, 0);
        Fx {
            dir,
            layers: vec![l1, l2],
            n: 0.into(),
        }
    }

    fn l1(&self) -> &Path {
        &self.layers[0]
    }

    /// A fresh session (upper/work/merged) for `job`.
    fn spec(&self, job: Job) -> Spec {
        let n = self.n.get() + 1;
        self.n.set(n);
        let s = self.dir.path().join(format!("sessions/{n}"));
        for d in ["upper", "work", "merged"] {
            std::fs::create_dir_all(s.join(d)).unwrap();
        }
        Spec {
            layers: self.layers.clone(),
            upper: s.join("upper"),
            work: s.join("work"),
            merged: s.join("merged"),
            job,
        }
    }
}

impl Drop for Fx {
    fn drop(&mut self) {
        let root = self.dir.path().to_string_lossy().into_owned();
        // Give the kernel a moment to tear down killed namespaces.
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
            let left_mounts = mounts.contains(&root);
            let left_procs = processes_with(&root);
            if !left_mounts && left_procs.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                if !std::thread::panicking() {
                    panic!("left behind: mounts={left_mounts} processes={left_procs:?}");
                }
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn mknod(p: &Path, mode: u32, major: u32, minor: u32) {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: valid path.
    let r = unsafe { libc::mknod(c.as_ptr(), mode, libc::makedev(major, minor)) };
    assert_eq!(r, 0, "mknod {}", p.display());
}

/// pids whose command line contains `needle`.
fn processes_with(needle: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Ok(c) = std::fs::read(e.path().join("cmdline")) {
            let c = String::from_utf8_lossy(&c).replace('\0', " ");
            if c.contains(needle) {
                out.push(pid);
            }
        }
    }
    out
}

struct Out {
    code: i32,
    stdout: Vec<u8>,
    stderr: String,
}

impl Out {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

async fn run(spec: &Spec, stdin: Option<Vec<u8>>) -> Out {
    let mut cmd = command(spec).unwrap();
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    if let Some(data) = stdin {
        use tokio::io::AsyncWriteExt;
        let mut w = child.stdin.take().unwrap();
        tokio::spawn(async move {
            let _ = w.write_all(&data).await;
        });
    }
    let o = child.wait_with_output().await.unwrap();
    Out {
        code: o.status.code().unwrap_or(-1),
        stdout: o.stdout,
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

async fn sh(fx: &Fx, script: &str) -> (Out, Spec) {
    let spec = fx.spec(Job::Exec {
        argv: vec!["sh".into(), "-c".into(), script.into()],
        env: vec!["PATH=/bin".into(), "HOME=/root".into()],
        cwd: "/root".into(),
        user: String::new(),
    });
    (run(&spec, None).await, spec)
}

// ---------------------------------------------------------------------------------------
// tests

async fn exec_basics() {
    let fx = Fx::new();
    let (o, _) = sh(&fx, "hostname").await;
    assert_eq!(
        (o.code, o.text().trim()),
        (0, "image-shell"),
        "{}",
        o.stderr
    );

    let (o, _) = sh(&fx, "cat /proc/1/cmdline").await;
    assert!(
        o.text().contains(walt_container::SANDBOX_ARG),
        "{:?}",
        o.text()
    );

    let (o, _) = sh(&fx, "echo $$; ps -o pid,comm | grep -c .").await;
    assert_eq!(
        o.text().lines().next(),
        Some("2"),
        "job is pid 2: {}",
        o.text()
    );

    let (o, _) = sh(&fx, "cat /etc/hidden; echo; ls /etc; cat /etc/added").await;
    assert!(!o.text().contains("lower"), "whiteout: {}", o.text());
    assert!(!o.text().contains("hidden"), "whiteout: {}", o.text());
    assert!(o.text().contains("added"), "{}", o.text());

    let (o, spec) = sh(&fx, "echo data > /root/new").await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(
        std::fs::read_to_string(spec.upper.join("root/new")).unwrap(),
        "data\n"
    );
    // The lower layer is untouched.
    assert!(!fx.l1().join("root/new").exists());

    let (o, _) = sh(&fx, "ls /dev; ls /dev/pts; stat -c '%a %t,%T' /dev/null").await;
    let t = o.text();
    for n in [
        "null", "zero", "full", "random", "urandom", "tty", "pts", "ptmx", "shm", "fd", "stdin",
        "stdout", "stderr", "666 1,3",
    ] {
        assert!(
            t.split_whitespace().any(|w| w == n) || t.contains(n),
            "/dev lacks {n}: {t}"
        );
    }
    let (o, _) = sh(
        &fx,
        "echo x > /dev/null && cat /dev/zero | head -c 3 | wc -c",
    )
    .await;
    assert_eq!(o.code, 0, "{}", o.stderr);

    let host_resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let (o, spec) = sh(&fx, "cat /etc/resolv.conf").await;
    if !host_resolv.is_empty() {
        assert_eq!(o.text(), host_resolv);
    }
    // the bind mount did not copy the file up
    assert!(!spec.upper.join("etc/resolv.conf").exists());

    let (o, _) = sh(&fx, "exit 7").await;
    assert_eq!(o.code, 7);
    let (o, _) = sh(&fx, "kill -9 $$").await;
    assert_eq!(o.code, 128 + 9);
    let (o, _) = sh(&fx, "sleep 0.1 & sleep 0.1 & exit 0").await;
    assert_eq!(o.code, 0);

    // Exec errors: one line on stderr.
    let spec = fx.spec(Job::Exec {
        argv: vec!["nosuchcmd".into()],
        env: vec![],
        cwd: "/".into(),
        user: String::new(),
    });
    let o = run(&spec, None).await;
    assert_eq!(o.code, 1);
    assert_eq!(o.stderr, "nosuchcmd: command not found\n");
}

/// `sh -c script` as `user` in `cwd`, with no HOME in the environment.
async fn sh_as(fx: &Fx, user: &str, cwd: &str, script: &str) -> (Out, Spec) {
    let spec = fx.spec(Job::Exec {
        argv: vec!["sh".into(), "-c".into(), script.into()],
        env: vec!["PATH=/bin".into()],
        cwd: cwd.into(),
        user: user.into(),
    });
    (run(&spec, None).await, spec)
}

async fn exec_user_and_workdir() {
    let fx = Fx::new();
    std::fs::write(
        fx.l1().join("etc/passwd"),
        format!("{PASSWD}bob:x:1000:1001:Bob:/home/bob:/bin/sh\n"),
    )
    .unwrap();
    std::fs::write(
        fx.l1().join("etc/group"),
        "root:x:0:\nbob:x:1001:\nstaff:x:50:alice,bob\nwheel:x:10:root\n",
    )
    .unwrap();
    let ids = "id -u; id -g; id -G; echo $HOME";
    let cases = [
        ("", "0\n0\n0 10\n/root\n"),
        ("bob", "1000\n1001\n1001 50\n/home/bob\n"),
        ("1000", "1000\n1001\n1001 50\n/home/bob\n"),
        ("1000:50", "1000\n50\n50\n/home/bob\n"),
        ("bob:staff", "1000\n50\n50\n/home/bob\n"),
        ("4321", "4321\n0\n0\n/\n"),
        ("4321:77", "4321\n77\n77\n/\n"),
    ];
    for (user, want) in cases {
        let (o, _) = sh_as(&fx, user, "/", ids).await;
        assert_eq!(
            (o.code, o.text().as_str()),
            (0, want),
            "USER {user:?}: {}",
            o.stderr
        );
    }
    // HOME from the caller's env wins.
    let spec = fx.spec(Job::Exec {
        argv: vec!["sh".into(), "-c".into(), "echo $HOME".into()],
        env: vec!["PATH=/bin".into(), "HOME=/elsewhere".into()],
        cwd: "/".into(),
        user: "bob".into(),
    });
    assert_eq!(run(&spec, None).await.text(), "/elsewhere\n");
    // Not root any more: no writing to root's files.
    let (o, _) = sh_as(&fx, "bob", "/", "touch /etc/passwd").await;
    assert_ne!(o.code, 0, "bob wrote /etc/passwd");

    for (user, line) in [
        (
            "alice",
            "unable to find user alice: no matching entries in passwd file\n",
        ),
        (
            "bob:nogroup",
            "unable to find group nogroup: no matching entries in group file\n",
        ),
    ] {
        let (o, _) = sh_as(&fx, user, "/", "echo ran").await;
        assert_ne!(o.code, 0);
        assert_eq!((o.text().as_str(), o.stderr.as_str()), ("", line));
    }

    // A missing workdir is created (root-owned, 0755) before the chdir.
    let (o, spec) = sh_as(&fx, "bob", "/srv/app/data", "pwd").await;
    assert_eq!(
        (o.code, o.text().as_str()),
        (0, "/srv/app/data\n"),
        "{}",
        o.stderr
    );
    for d in ["srv", "srv/app", "srv/app/data"] {
        let m = std::fs::metadata(spec.upper.join(d)).unwrap();
        assert!(m.is_dir(), "{d}");
        assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (0, 0, 0o755), "{d}");
    }
    // An image without passwd: numeric users only.
    std::fs::remove_file(fx.l1().join("etc/passwd")).unwrap();
    let (o, _) = sh_as(&fx, "12:34", "/", "id -u; id -g").await;
    assert_eq!((o.code, o.text().as_str()), (0, "12\n34\n"), "{}", o.stderr);
    let (o, _) = sh_as(&fx, "bob", "/", "true").await;
    assert_ne!(o.code, 0);
}

async fn caps_dropped() {
    let fx = Fx::new();
    let (o, _) = sh(&fx, "mount -t tmpfs x /mnt").await;
    assert_ne!(o.code, 0, "mount succeeded inside the sandbox");
    let (o, _) = sh(&fx, "mknod /root/n c 1 3").await;
    assert_ne!(o.code, 0, "mknod succeeded inside the sandbox");
    let (o, _) = sh(&fx, "grep CapBnd /proc/self/status").await;
    // podman's defaults without NET_RAW (13) and AUDIT_WRITE (29)
    assert!(o.text().contains("00000000800405fb"), "{}", o.text());
    let (o, _) = sh(
        &fx,
        "id -u; touch /root/f && chown 12:34 /root/f 2>&1 || echo nochown",
    )
    .await;
    assert!(o.text().starts_with("0\n"), "{}", o.text());
}

async fn untouched_session_leaves_empty_upper() {
    let fx = Fx::new();
    let (o, spec) = sh(&fx, "ls / > /dev/null").await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    clean_session_artifacts(&spec.upper);
    let left: Vec<_> = std::fs::read_dir(&spec.upper)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "upper not empty: {left:?}");
    // A real change survives the cleanup.
    // (A command, unlike a shell, sees no /tmp the image lacks.)
    let (_, spec) = sh(&fx, "mkdir -p /tmp && echo x > /tmp/kept").await;
    clean_session_artifacts(&spec.upper);
    assert!(spec.upper.join("tmp/kept").exists());
}

fn set_nonblocking(fd: &OwnedFd) {
    // SAFETY: fcntl on our fd.
    unsafe {
        let fl = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
    }
}

fn async_fd(fd: OwnedFd) -> AsyncFd<OwnedFd> {
    // SAFETY: an OwnedFd stays open and the same for the AsyncFd's lifetime.
    unsafe { AsyncFd::register(fd) }
        .map_err(|e| e.to_string())
        .unwrap()
}

async fn read_until(afd: &AsyncFd<OwnedFd>, buf: &mut Vec<u8>, needle: &str) {
    while !String::from_utf8_lossy(buf).contains(needle) {
        let mut g = afd.readable().await.unwrap();
        let mut tmp = [0u8; 4096];
        // SAFETY: reading into a local buffer.
        let n = unsafe { libc::read(afd.as_raw_fd(), tmp.as_mut_ptr().cast(), tmp.len()) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::WouldBlock {
                g.clear_ready();
                continue;
            }
            panic!("read pty: {e} (so far: {:?})", String::from_utf8_lossy(buf));
        }
        assert!(
            n > 0,
            "pty EOF before {needle:?}: {:?}",
            String::from_utf8_lossy(buf)
        );
        buf.extend_from_slice(&tmp[..n as usize]);
    }
}

fn write_all(fd: &OwnedFd, data: &[u8]) {
    let mut f = std::fs::File::from(fd.try_clone().unwrap());
    f.write_all(data).unwrap();
}

async fn shell_pty() {
    let fx = Fx::new();
    let spec = fx.spec(Job::Shell {
        term: "xterm".into(),
    });
    let t0 = Instant::now();
    let shell = spawn_shell(&spec, 30, 100).await.unwrap();
    let t_fd = t0.elapsed();
    let mut child = shell.child;
    set_nonblocking(&shell.master);
    let afd = async_fd(shell.master);
    let mut buf = Vec::new();
    read_until(&afd, &mut buf, "#").await;
    let t_prompt = t0.elapsed();
    eprintln!("spawn_shell: master fd after {t_fd:?}, first prompt after {t_prompt:?}");
    write_all(
        afd.get_ref(),
        b"stty size; echo $TERM:$HOME:$(pwd); echo hi-$((1+1))\n",
    );
    read_until(&afd, &mut buf, "hi-2\r\n").await;
    let s = String::from_utf8_lossy(&buf).into_owned();
    assert!(s.contains("30 100"), "{s}");
    assert!(s.contains("xterm:/root:/root"), "{s}");
    write_all(afd.get_ref(), b"exit 3\n");
    let st = child.wait().await.unwrap();
    assert_eq!(st.code(), Some(3));
    assert!(
        t_prompt < Duration::from_secs(2),
        "slow prompt: {t_prompt:?}"
    );

    // A sandbox that fails before passing the pty: its one-line error.
    let mut spec = fx.spec(Job::Shell {
        term: "xterm".into(),
    });
    spec.layers.push(fx.dir.path().join("layers/missing/diff"));
    let e = match spawn_shell(&spec, 24, 80).await {
        Ok(_) => panic!("shell on a missing layer"),
        Err(e) => e.to_string(),
    };
    assert!(
        e.contains("layers/missing/diff") && e.contains("No such file"),
        "{e}"
    );
}

async fn killing_sandbox_kills_shell() {
    let fx = Fx::new();
    let spec = fx.spec(Job::Shell {
        term: "dumb".into(),
    });
    let shell = spawn_shell(&spec, 24, 80).await.unwrap();
    let mut child = shell.child;
    set_nonblocking(&shell.master);
    let afd = async_fd(shell.master);
    let mut buf = Vec::new();
    read_until(&afd, &mut buf, "#").await;
    write_all(afd.get_ref(), b"sleep 987654\n");
    let deadline = Instant::now() + Duration::from_secs(5);
    let pids = loop {
        let p = processes_with("sleep 987654");
        if !p.is_empty() {
            break p;
        }
        assert!(Instant::now() < deadline, "sleep never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    while pids
        .iter()
        .any(|p| Path::new(&format!("/proc/{p}")).exists())
    {
        assert!(
            Instant::now() < deadline,
            "sleep survived the sandbox: {pids:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[derive(Debug, PartialEq)]
struct Node {
    kind: String,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    content: Vec<u8>,
    xattrs: Vec<(String, Vec<u8>)>,
    ino_group: Option<String>,
}

/// Everything we preserve, per relative path.
fn snapshot(root: &Path) -> BTreeMap<String, Node> {
    let mut out = BTreeMap::new();
    let mut inodes: BTreeMap<u64, String> = BTreeMap::new();
    fn walk(
        root: &Path,
        rel: &Path,
        out: &mut BTreeMap<String, Node>,
        inodes: &mut BTreeMap<u64, String>,
    ) {
        let p = root.join(rel);
        let m = std::fs::symlink_metadata(&p).unwrap();
        let ft = m.file_type();
        use std::os::unix::fs::FileTypeExt;
        let (kind, content) = if ft.is_dir() {
            ("dir".to_string(), vec![])
        } else if ft.is_symlink() {
            (
                "link".into(),
                std::fs::read_link(&p)
                    .unwrap()
                    .into_os_string()
                    .into_encoded_bytes(),
            )
        } else if ft.is_file() {
            ("file".into(), std::fs::read(&p).unwrap())
        } else if ft.is_fifo() {
            ("fifo".into(), vec![])
        } else {
            (format!("dev {}", m.rdev()), vec![])
        };
        let ino_group = (ft.is_file() && m.nlink() > 1).then(|| {
            inodes
                .entry(m.ino())
                .or_insert_with(|| rel.to_string_lossy().into_owned())
                .clone()
        });
        let mut xattrs: Vec<_> = xattr::list(&p)
            .unwrap()
            .filter(|n| n.to_string_lossy().starts_with("user."))
            .map(|n| {
                (
                    n.to_string_lossy().into_owned(),
                    xattr::get(&p, &n).unwrap().unwrap(),
                )
            })
            .collect();
        xattrs.sort();
        out.insert(
            rel.to_string_lossy().into_owned(),
            Node {
                kind,
                mode: m.mode() & 0o7777,
                uid: m.uid(),
                gid: m.gid(),
                mtime: if ft.is_symlink() { 0 } else { m.mtime() },
                content,
                xattrs,
                ino_group,
            },
        );
        if ft.is_dir() {
            let mut names: Vec<_> = std::fs::read_dir(&p)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            names.sort();
            for n in names {
                walk(root, &rel.join(n), out, inodes);
            }
        }
    }
    walk(root, Path::new(""), &mut out, &mut inodes);
    out
}

fn make_tree(d: &Path) {
    std::fs::create_dir_all(d.join("sub/deeper")).unwrap();
    std::fs::write(d.join("a"), "file a").unwrap();
    std::fs::write(d.join("sub/b"), vec![7u8; 100_000]).unwrap();
    std::fs::write(d.join(format!("sub/{}", "long".repeat(40))), "long name").unwrap();
    std::fs::hard_link(d.join("a"), d.join("sub/hard")).unwrap();
    std::os::unix::fs::symlink("../a", d.join("sub/link")).unwrap();
    std::os::unix::fs::symlink("/nowhere/dangling", d.join("dangling")).unwrap();
    mknod(&d.join("fifo"), libc::S_IFIFO | 0o640, 0, 0);
    mknod(&d.join("null"), libc::S_IFCHR | 0o600, 1, 3);
    std::fs::set_permissions(d.join("a"), std::fs::Permissions::from_mode(0o4751)).unwrap();
    std::os::unix::fs::lchown(d.join("sub/b"), Some(1234), Some(5678)).unwrap();
    std::os::unix::fs::lchown(d.join("sub/link"), Some(42), Some(43)).unwrap();
    xattr::set(d.join("sub/b"), "user.walt", b"value\0bin").unwrap();
    xattr::set(d.join("sub"), "user.dir", b"d").unwrap();
    std::fs::set_permissions(d.join("sub/deeper"), std::fs::Permissions::from_mode(0o500)).unwrap();
    let t = filetime::FileTime::from_unix_time(1_500_000_000, 0);
    for p in ["a", "sub/b", "fifo", "sub/deeper", "sub", ""] {
        filetime::set_symlink_file_times(d.join(p), t, t).unwrap();
    }
}

async fn tar_out(fx: &Fx, path: &str) -> Out {
    let spec = fx.spec(Job::TarOut { path: path.into() });
    run(&spec, None).await
}

async fn tar_in(fx: &Fx, dest: &str, data: Vec<u8>) -> (Out, Spec) {
    let spec = fx.spec(Job::TarIn {
        dest: dest.into(),
        limit: None,
    });
    (run(&spec, Some(data)).await, spec)
}

fn entry_names(tar: &[u8]) -> Vec<String> {
    let mut ar = tar::Archive::new(tar);
    ar.entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
        .collect()
}

async fn tar_roundtrip() {
    let fx = Fx::new();
    make_tree(&fx.l1().join("root/d"));
    let o = tar_out(&fx, "d").await;
    assert_eq!((o.code, o.stderr.as_str()), (0, ""));
    let names = entry_names(&o.stdout);
    assert!(
        names.iter().all(|n| n == "d" || n.starts_with("d/")),
        "{names:?}"
    );
    // Out of an image, device nodes come along (the image's content); into
    // one they are refused (tested below), so the round trip goes without it.
    assert!(names.iter().any(|n| n == "d/null"), "{names:?}");
    std::fs::remove_file(fx.l1().join("root/d/null")).unwrap();
    let o = tar_out(&fx, "d").await;
    assert_eq!((o.code, o.stderr.as_str()), (0, ""));

    // New name: dest missing, parent exists.
    let (i, spec) = tar_in(&fx, "/root/copy", o.stdout.clone()).await;
    assert_eq!((i.code, i.stderr.as_str()), (0, ""));
    assert_eq!(
        snapshot(&fx.l1().join("root/d")),
        snapshot(&spec.upper.join("root/copy"))
    );
    // Into an existing dir.
    let (i, spec) = tar_in(&fx, "/etc", o.stdout.clone()).await;
    assert_eq!((i.code, i.stderr.as_str()), (0, ""));
    assert_eq!(
        snapshot(&fx.l1().join("root/d")),
        snapshot(&spec.upper.join("etc/d"))
    );
    // A single file, followed symlink at the top, replaced file.
    let o = tar_out(&fx, "/etc/added").await;
    assert_eq!(entry_names(&o.stdout), ["added"]);
    let (i, spec) = tar_in(&fx, "/etc/hostname-new", o.stdout.clone()).await;
    assert_eq!(i.code, 0, "{}", i.stderr);
    assert_eq!(
        std::fs::read(spec.upper.join("etc/hostname-new")).unwrap(),
        b"added"
    );
    let (i, spec) = tar_in(&fx, "/etc/passwd", o.stdout.clone()).await;
    assert_eq!(i.code, 0, "{}", i.stderr);
    assert_eq!(
        std::fs::read(spec.upper.join("etc/passwd")).unwrap(),
        b"added"
    );
    std::os::unix::fs::symlink("d/a", fx.l1().join("root/to-a")).unwrap();
    let o = tar_out(&fx, "to-a").await;
    let mut ar = tar::Archive::new(o.stdout.as_slice());
    let mut e = ar.entries().unwrap().next().unwrap().unwrap();
    assert_eq!(e.path().unwrap().to_str(), Some("to-a"));
    assert_eq!(e.header().entry_type(), tar::EntryType::Regular);
    let mut s = String::new();
    std::io::Read::read_to_string(&mut e, &mut s).unwrap();
    assert_eq!(s, "file a");

    // Whole root.
    let o = tar_out(&fx, "/").await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    let names = entry_names(&o.stdout);
    assert!(names.iter().all(|n| n.starts_with("rootfs")), "{names:?}");
    assert!(names.iter().any(|n| n == "rootfs/etc/added"));
    assert!(!names.iter().any(|n| n == "rootfs/etc/hidden"));

    // Errors: one line, status 1.
    let o = tar_out(&fx, "nope").await;
    assert_eq!(
        (o.code, o.stderr.as_str()),
        (1, "nope: No such file or directory\n")
    );
    let d = tar_out(&fx, "d").await.stdout;
    let (i, _) = tar_in(&fx, "/no/such/dir", d.clone()).await;
    assert_eq!(
        (i.code, i.stderr.as_str()),
        (1, "/no/such/dir: No such file or directory\n")
    );
    let (i, _) = tar_in(&fx, "/root/missing/", d.clone()).await;
    assert_eq!(
        (i.code, i.stderr.as_str()),
        (1, "/root/missing/: Not a directory\n")
    );
    let (i, _) = tar_in(&fx, "/etc/passwd", d.clone()).await;
    assert_eq!(i.code, 1);
    assert!(
        i.stderr.contains("cannot overwrite non-directory"),
        "{}",
        i.stderr
    );
    assert_eq!(i.stderr.lines().count(), 1);
}

/// A tar with raw (unchecked) names: (name, type, link target).
fn raw_tar(entries: &[(&str, tar::EntryType, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, kind, link) in entries {
        let mut h = tar::Header::new_old();
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
        h.set_entry_type(*kind);
        h.set_mode(0o644);
        let data: &[u8] = if *kind == tar::EntryType::Regular {
            b"evil"
        } else {
            b""
        };
        h.set_size(data.len() as u64);
        h.set_cksum();
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.resize(out.len() + 1024, 0);
    out
}

/// Sandboxes mount their session `volatile` (no flush of the store's
/// filesystem when they end), whose mark refuses a second mount of the same
/// dirs; a build's COPY runs one sandbox per source on one session: the
/// second sandbox mounts it all the same and sees what the first wrote.
async fn a_session_mounts_again_after_its_sandbox_ended() {
    let fx = Fx::new();
    let first = fx.spec(Job::TarIn {
        dest: "/root".into(),
        limit: None,
    });
    let o = run(&first, Some(raw_tar(&[("a", tar::EntryType::Regular, "")]))).await;
    assert_eq!((o.code, o.stderr.as_str()), (0, ""));
    assert!(
        first.work.join("work/incompat/volatile").exists(),
        "the session was not mounted volatile"
    );
    let second = Spec {
        job: Job::TarIn {
            dest: "/root".into(),
            limit: None,
        },
        ..first.clone()
    };
    let o = run(
        &second,
        Some(raw_tar(&[("b", tar::EntryType::Regular, "")])),
    )
    .await;
    assert_eq!((o.code, o.stderr.as_str()), (0, ""));
    for f in ["a", "b"] {
        assert_eq!(
            std::fs::read(first.upper.join("root").join(f)).unwrap(),
            b"evil"
        );
    }
}

async fn tar_in_refuses_bad_archives() {
    use tar::EntryType::{Directory as D, Link as L, Regular as F};
    let fx = Fx::new();
    let cases: &[&[(&str, tar::EntryType, &str)]] = &[
        &[("s/", D, ""), ("s/ok", F, ""), ("../x", F, "")],
        &[("s/", D, ""), ("s/../../x", F, "")],
        &[("/x", F, "")],
        &[("a/", D, ""), ("a/x", F, ""), ("b/x", F, "")],
        &[("s/", D, ""), ("s/x", L, "../../etc/passwd")],
        &[("s/", D, ""), ("s/x", L, "other/passwd")],
        &[("s/", D, ""), ("s/x", L, "/etc/passwd")],
        &[("f", F, ""), ("f/x", F, "")],
    ];
    for case in cases {
        let (o, spec) = tar_in(&fx, "/root", raw_tar(case)).await;
        assert_eq!(o.code, 1, "{case:?} accepted");
        assert_eq!(o.stderr.lines().count(), 1, "{case:?}: {}", o.stderr);
        // Entries before the bad one may be in the upper dir (the server
        // discards it when the job fails); nothing is written elsewhere.
        for p in [
            "x",
            "root/x",
            "root/b",
            "etc/passwd",
            "root/f/x",
            "root/s/x",
        ] {
            assert!(
                !spec.upper.join(p).exists(),
                "{case:?} wrote the refused entry {p}"
            );
        }
        let session = spec.upper.parent().unwrap();
        assert!(!session.join("x").exists() && !fx.dir.path().join("x").exists());
    }
    // A good one is accepted.
    let (o, spec) = tar_in(
        &fx,
        "/root",
        raw_tar(&[("s/", D, ""), ("s/ok", F, ""), ("s/h", L, "s/ok")]),
    )
    .await;
    assert_eq!((o.code, o.stderr.as_str()), (0, ""));
    assert_eq!(std::fs::read(spec.upper.join("root/s/h")).unwrap(), b"evil");
}

/// The TarIn job writes at most its limit of file data, counting holes: a
/// sparse file of 1 GiB made of 4 KiB of data is refused under 1 MiB.
async fn tar_in_is_bounded_by_its_limit() {
    use walt_tar::{Builder, HeaderSpec, Kind};
    let fx = Fx::new();
    let mut b = Builder::new(Vec::new());
    let mut h = HeaderSpec::new(b"holes", Kind::File);
    h.size = 1 << 30;
    let segments = [(0u64, 4096u64)];
    h.sparse = Some(&segments);
    b.append(&h, &mut &[7u8; 4096][..]).unwrap();
    let tar = b.finish().unwrap();

    let spec = fx.spec(Job::TarIn {
        dest: "/root".into(),
        limit: Some(1 << 20),
    });
    let o = run(&spec, Some(tar.clone())).await;
    assert_eq!(o.code, 1, "accepted: {}", o.stderr);
    assert!(
        o.stderr.contains("goes over the limit of 1048576 bytes"),
        "{}",
        o.stderr
    );
    assert!(!spec.upper.join("root/holes").exists());

    // Without a limit the same archive lands, holes kept.
    let (o, spec) = tar_in(&fx, "/root", tar).await;
    assert_eq!((o.code, o.stderr.as_str()), (0, ""));
    let m = std::fs::metadata(spec.upper.join("root/holes")).unwrap();
    assert_eq!(m.len(), 1 << 30);
}

/// walt-tar's table of hostile archives, through the real TarIn job: each is refused (or
/// safely extracted) and nothing reaches the "outside" directory of the image's lower
/// layer, nor the host.
async fn tar_in_hostile_table() {
    use walt_tar::testing::{Policy, check_outside, hostile_archives, make_outside};
    let fx = Fx::new();
    let outside = fx.l1().join("walt-outside");
    std::fs::create_dir(&outside).unwrap();
    make_outside(&outside);
    let policy = Policy {
        overlay_whiteouts: false,
        devices_refused: true,
        limit: None,
    };
    for case in hostile_archives(Path::new("/walt-outside")) {
        let (o, spec) = tar_in(&fx, "/root", case.tar.clone()).await;
        if case.must_refuse(&policy) {
            assert_eq!(o.code, 1, "{}: accepted", case.name);
            assert_eq!(o.stderr.lines().count(), 1, "{}: {}", case.name, o.stderr);
        } else {
            assert_eq!((o.code, o.stderr.as_str()), (0, ""), "{}", case.name);
            if let Some(check) = case.check {
                check(&spec.upper.join("root/t"));
            }
        }
        check_outside(&outside, case.name);
        assert!(
            !spec.upper.join("walt-outside").exists(),
            "{}: wrote into the outside directory",
            case.name
        );
        assert!(!Path::new("/x-walt-hostile").exists(), "{}", case.name);
        assert!(!spec.upper.join("x-walt-hostile").exists(), "{}", case.name);
    }
}

async fn tar_paths_stay_in_image() {
    let fx = Fx::new();
    for p in [
        "evil/etc/passwd",
        "evil2/etc/passwd",
        "/root/evil2/etc/passwd",
    ] {
        let o = tar_out(&fx, p).await;
        assert_eq!(o.code, 0, "{p}: {}", o.stderr);
        let mut ar = tar::Archive::new(o.stdout.as_slice());
        let mut e = ar.entries().unwrap().next().unwrap().unwrap();
        let mut s = String::new();
        std::io::Read::read_to_string(&mut e, &mut s).unwrap();
        assert_eq!(s, PASSWD, "{p} read outside the image");
    }
    let data = raw_tar(&[("walt-escape-test", tar::EntryType::Regular, "")]);
    for dest in ["evil", "evil2", "evil/", "/root/evil/tmp-walt-escape"] {
        let (o, spec) = tar_in(&fx, dest, data.clone()).await;
        assert_eq!(o.code, 0, "{dest}: {}", o.stderr);
        let inside = if dest.ends_with("tmp-walt-escape") {
            spec.upper.join("tmp-walt-escape")
        } else {
            spec.upper.join("walt-escape-test")
        };
        assert!(inside.exists(), "{dest}: not written in the image");
        assert!(!Path::new("/walt-escape-test").exists());
        assert!(!Path::new("/tmp-walt-escape").exists());
    }
}

async fn too_many_layers() {
    let fx = Fx::new();
    let mut spec = fx.spec(Job::TarOut { path: "/".into() });
    spec.layers = (0..501).map(|_| fx.layers[0].clone()).collect();
    let o = run(&spec, None).await;
    assert_eq!(o.code, 1);
    assert!(o.stderr.contains("walt image squash"), "{}", o.stderr);
    assert_eq!(o.stderr.lines().count(), 1);
}

async fn many_layers() {
    many_layers_with(300, false).await;
    // mount(2) fallback: relative lowerdirs (64-hex names: ~58 fit in one page)
    many_layers_with(50, true).await;
    // too many for one page of options: a clear error
    let fx = Fx::new();
    let mut spec = fx.spec(Job::TarOut { path: "/".into() });
    spec.layers = (0..100)
        .map(|i| {
            let l = fx.dir.path().join(format!("layers/{i:064x}/diff"));
            std::fs::create_dir_all(&l).unwrap();
            l
        })
        .collect();
    let mut cmd = command(&spec).unwrap();
    cmd.env("WALT_SANDBOX_CLASSIC_MOUNT", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let o = cmd.output().await.unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1));
    assert!(err.contains("walt image squash"), "{err}");
}

async fn many_layers_with(n: usize, classic: bool) {
    let fx = Fx::new();
    let mut layers = vec![fx.layers[0].clone()];
    for i in 0..n {
        let l = fx.dir.path().join(format!("layers/{i:064x}/diff"));
        std::fs::create_dir_all(l.join("etc")).unwrap();
        std::fs::write(l.join("etc/layer"), format!("{i}")).unwrap();
        layers.push(l);
    }
    layers.push(fx.layers[1].clone());
    let mut spec = fx.spec(Job::Exec {
        argv: vec!["cat".into(), "/etc/layer".into(), "/etc/added".into()],
        env: vec![],
        cwd: "/".into(),
        user: String::new(),
    });
    spec.layers = layers;
    let mut cmd = command(&spec).unwrap();
    if classic {
        cmd.env("WALT_SANDBOX_CLASSIC_MOUNT", "1");
    }
    let o = cmd.output().await.unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        format!("{}added", n - 1)
    );
}

async fn proc_is_hardened() {
    let fx = Fx::new();
    // (uts namespace: even without the fix this does not touch the host's hostname)
    let (o, _) = sh(
        &fx,
        "echo walt-x > /proc/sys/kernel/hostname && echo WROTE; hostname",
    )
    .await;
    assert!(
        !o.text().contains("WROTE"),
        "/proc/sys writable: {}",
        o.text()
    );
    assert!(o.text().contains("image-shell"), "{}", o.text());
    let (o, _) = sh(&fx, "echo x > /proc/sysrq-trigger && echo WROTE").await;
    assert!(!o.text().contains("WROTE"), "/proc/sysrq-trigger writable");
    let (o, _) = sh(
        &fx,
        "cat /proc/kcore | grep -c . ; cat /proc/keys; ls /proc/acpi 2>/dev/null",
    )
    .await;
    assert!(
        o.text().trim().is_empty() || o.text().trim() == "0",
        "masked /proc entries readable: {:?}",
        o.text()
    );
    let (o, _) = sh(&fx, "cat /proc/timer_list | grep -c .").await;
    assert_eq!(o.text().trim(), "0", "timer_list not masked");
    // Still usable.
    let (o, _) = sh(
        &fx,
        "grep -c ^Name: /proc/self/status; cat /proc/sys/kernel/hostname",
    )
    .await;
    assert_eq!(
        (o.code, o.text().as_str()),
        (0, "1\nimage-shell\n"),
        "{}",
        o.stderr
    );
}

async fn image_devices_unusable() {
    let fx = Fx::new();
    mknod(&fx.l1().join("root/mem"), libc::S_IFCHR | 0o666, 1, 1);
    mknod(&fx.l1().join("root/null"), libc::S_IFCHR | 0o666, 1, 3);
    let (o, _) = sh(
        &fx,
        "cat /root/mem >/dev/null 2>&1 && echo MEM; cat /root/null && echo NULL; \
         echo x > /root/null && echo WNULL; \
         echo x > /dev/null && cat /dev/null && echo DEVOK",
    )
    .await;
    let t = o.text();
    for bad in ["MEM", "NULL\n", "WNULL"] {
        assert!(
            !t.contains(bad),
            "image device node usable ({bad}): {t} {}",
            o.stderr
        );
    }
    assert!(t.contains("DEVOK"), "/dev/null broken: {t} {}", o.stderr);
    assert!(o.stderr.contains("Permission denied"), "{}", o.stderr);
    // Same with the mount(2) fallback.
    let spec = fx.spec(Job::Exec {
        argv: vec![
            "sh".into(),
            "-c".into(),
            "cat /root/null && echo NULL".into(),
        ],
        env: vec!["PATH=/bin".into()],
        cwd: "/".into(),
        user: String::new(),
    });
    let mut cmd = command(&spec).unwrap();
    cmd.env("WALT_SANDBOX_CLASSIC_MOUNT", "1");
    let o = cmd.output().await.unwrap();
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(!out.contains("NULL"), "classic mount: {out} {err}");
    assert!(err.contains("Permission denied"), "classic mount: {err}");

    // TarIn refuses device nodes from the client: the job fails naming the
    // entry and the node is not created (the server then saves nothing).
    let mut b = tar::Builder::new(Vec::new());
    let mut d = tar::Header::new_gnu();
    d.set_entry_type(tar::EntryType::Directory);
    d.set_mode(0o755);
    d.set_size(0);
    b.append_data(&mut d, "d/", std::io::empty()).unwrap();
    let mut f = tar::Header::new_gnu();
    f.set_mode(0o644);
    f.set_size(2);
    b.append_data(&mut f, "d/before", &b"ok"[..]).unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Char);
    h.set_mode(0o666);
    h.set_size(0);
    h.set_device_major(1).unwrap();
    h.set_device_minor(3).unwrap();
    b.append_data(&mut h, "d/devnode", std::io::empty())
        .unwrap();
    let data = b.into_inner().unwrap();
    let (i, spec) = tar_in(&fx, "/root", data).await;
    assert_ne!(i.code, 0, "a device node was accepted: {}", i.stderr);
    assert!(
        i.stderr.contains("devnode") && i.stderr.contains("device node"),
        "{}",
        i.stderr
    );
    assert!(
        std::fs::symlink_metadata(spec.upper.join("root/d/devnode")).is_err(),
        "the device node was created"
    );
}

async fn tar_in_skips_global_header() {
    let fx = Fx::new();
    // Like `git archive`: a pax global header first, then the tree.
    let mut b = tar::Builder::new(Vec::new());
    let rec = b"52 comment=0123456789abcdef0123456789abcdef01234567\n";
    let mut g = tar::Header::new_ustar();
    g.set_entry_type(tar::EntryType::XGlobalHeader);
    g.set_path("pax_global_header").unwrap();
    g.set_mode(0o666);
    g.set_size(rec.len() as u64);
    g.set_cksum();
    b.append(&g, &rec[..]).unwrap();
    let mut d = tar::Header::new_ustar();
    d.set_entry_type(tar::EntryType::Directory);
    d.set_mode(0o755);
    d.set_size(0);
    b.append_data(&mut d, "proj/", std::io::empty()).unwrap();
    let mut f = tar::Header::new_ustar();
    f.set_mode(0o644);
    f.set_size(5);
    b.append_data(&mut f, "proj/README", &b"hello"[..]).unwrap();
    let data = b.into_inner().unwrap();
    let (o, spec) = tar_in(&fx, "/root", data).await;
    assert_eq!((o.code, o.stderr.as_str()), (0, ""));
    assert_eq!(
        std::fs::read(spec.upper.join("root/proj/README")).unwrap(),
        b"hello"
    );
    assert!(!spec.upper.join("root/pax_global_header").exists());
}

/// pids (in our namespace) whose mountinfo mentions `needle`.
fn mounts_with(needle: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Ok(m) = std::fs::read_to_string(e.path().join("mountinfo"))
            && m.contains(needle)
        {
            out.push(pid);
        }
    }
    out
}

async fn sigterm_tears_down_namespace() {
    for _ in 0..3 {
        let fx = Fx::new();
        let spec = fx.spec(Job::Exec {
            argv: vec!["sleep".into(), "98765".into()],
            env: vec![],
            cwd: "/".into(),
            user: String::new(),
        });
        let session = spec.upper.parent().unwrap().to_string_lossy().into_owned();
        let mut cmd = command(&spec).unwrap();
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let pids = loop {
            let p = processes_with("sleep 98765");
            if !p.is_empty() {
                break p;
            }
            assert!(Instant::now() < deadline, "sleep never started");
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        // SAFETY: signalling our own child.
        unsafe {
            libc::kill(child.id().unwrap() as i32, libc::SIGTERM);
        }
        child.wait().await.unwrap();
        let left: Vec<_> = pids
            .iter()
            .filter(|p| Path::new(&format!("/proc/{p}")).exists())
            .collect();
        assert!(left.is_empty(), "sleep still there after wait: {left:?}");
        let m = mounts_with(&session);
        assert!(m.is_empty(), "session mounts still there after wait: {m:?}");
    }
}

/// The tar jobs of `walt image cp` run with the shell's capabilities, not the
/// server's: setting a `trusted.*` xattr needs CAP_SYS_ADMIN, which a shell
/// does not have, so one coming from a client never reaches the image.
async fn tar_jobs_run_with_the_shells_capabilities() {
    let fx = Fx::new();
    let mut b = tar::Builder::new(Vec::new());
    let mut pax = tar::Header::new_ustar();
    let rec = b"31 SCHILY.xattr.trusted.walt=1\n";
    pax.set_entry_type(tar::EntryType::XHeader);
    pax.set_path("PaxHeaders/f").unwrap();
    pax.set_mode(0o644);
    pax.set_size(rec.len() as u64);
    pax.set_cksum();
    b.append(&pax, &rec[..]).unwrap();
    let mut f = tar::Header::new_ustar();
    f.set_mode(0o644);
    f.set_size(2);
    b.append_data(&mut f, "f", &b"ok"[..]).unwrap();
    let (o, spec) = tar_in(&fx, "/root", b.into_inner().unwrap()).await;
    let path = spec.upper.join("root/f");
    let got = xattr_of(&path, "trusted.walt");
    assert!(
        got.is_none(),
        "a trusted.* xattr was set by the tar job (code {}, stderr {}): {got:?}",
        o.code,
        o.stderr
    );
    // The same xattr can be set by this (root) test process: the check is real.
    if path.exists() {
        std::fs::remove_file(&path).unwrap();
    }
    std::fs::write(&path, "x").unwrap();
    set_xattr(&path, "trusted.walt", b"1");
    assert_eq!(xattr_of(&path, "trusted.walt").as_deref(), Some(&b"1"[..]));
}

fn xattr_of(path: &Path, name: &str) -> Option<Vec<u8>> {
    xattr::get(path, name).ok().flatten()
}

fn set_xattr(path: &Path, name: &str, value: &[u8]) {
    xattr::set(path, name, value).unwrap();
}

// ---------------------------------------------------------------------------------------
// Place (COPY/ADD) and CopySources (COPY --from)

/// One entry of a tar built for a test: (name, kind, mode, uid:gid, data or link target).
type T<'a> = (&'a str, tar::EntryType, u32, (u64, u64), &'a str);

fn mk_tar(entries: &[T<'_>]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, kind, mode, (uid, gid), data) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(*kind);
        h.set_mode(*mode);
        h.set_uid(*uid);
        h.set_gid(*gid);
        h.set_mtime(1_600_000_000);
        match kind {
            tar::EntryType::Regular => {
                h.set_size(data.len() as u64);
                b.append_data(&mut h, name, data.as_bytes()).unwrap();
            }
            tar::EntryType::Symlink | tar::EntryType::Link => {
                h.set_size(0);
                b.append_link(&mut h, name, data).unwrap();
            }
            _ => {
                h.set_size(0);
                b.append_data(&mut h, name, &[][..]).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

async fn place(
    fx: &Fx,
    dest: &str,
    file_name: Option<&str>,
    owner: Option<&str>,
    data: Vec<u8>,
) -> (Out, Spec) {
    let spec = fx.spec(Job::Place {
        dest: dest.into(),
        file_name: file_name.map(Into::into),
        owner: owner.map(Into::into),
        limit: None,
    });
    (run(&spec, Some(data)).await, spec)
}

/// (kind, mode, uid, gid) of a path.
fn meta(p: &Path) -> (&'static str, u32, u32, u32) {
    let m = std::fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let kind = if m.is_dir() {
        "dir"
    } else if m.file_type().is_symlink() {
        "link"
    } else {
        "file"
    };
    (kind, m.mode() & 0o7777, m.uid(), m.gid())
}

/// Users for --chown, a merged-usr style /lib -> usr/lib.
fn place_fixture() -> Fx {
    let fx = Fx::new();
    std::fs::write(
        fx.l1().join("etc/passwd"),
        format!("{PASSWD}bob:x:1000:1001:Bob:/home/bob:/bin/sh\n"),
    )
    .unwrap();
    std::fs::write(
        fx.l1().join("etc/group"),
        "root:x:0:\nbob:x:1001:\nstaff:x:50:bob\n",
    )
    .unwrap();
    std::fs::create_dir_all(fx.l1().join("usr/lib")).unwrap();
    std::os::unix::fs::symlink("usr/lib", fx.l1().join("lib")).unwrap();
    std::fs::create_dir_all(fx.l1().join("srv/keep")).unwrap();
    std::fs::write(fx.l1().join("srv/keep/old"), "old").unwrap();
    std::fs::write(fx.l1().join("srv/keep/replaced"), "old").unwrap();
    fx
}

fn sample() -> Vec<u8> {
    use tar::EntryType::{Directory as D, Link as L, Regular as F, Symlink as S};
    mk_tar(&[
        ("sub", D, 0o750, (0, 0), ""),
        ("sub/f", F, 0o640, (5, 6), "sub file"),
        ("top", F, 0o644, (0, 0), "top file"),
        ("ln", S, 0o777, (0, 0), "top"),
        ("hl", L, 0o644, (0, 0), "top"),
    ])
}

async fn place_directory_mode() {
    let fx = place_fixture();
    // A missing destination: created with its parents, 0755 root; the tar's owners kept.
    let (o, spec) = place(&fx, "/opt/app/", None, None, sample()).await;
    assert_eq!((o.code, o.stderr.as_str()), (0, ""));
    let up = &spec.upper;
    for d in ["opt", "opt/app"] {
        assert_eq!(meta(&up.join(d)), ("dir", 0o755, 0, 0), "{d}");
    }
    assert_eq!(meta(&up.join("opt/app/sub")), ("dir", 0o750, 0, 0));
    assert_eq!(meta(&up.join("opt/app/sub/f")), ("file", 0o640, 5, 6));
    assert_eq!(
        std::fs::read(up.join("opt/app/sub/f")).unwrap(),
        b"sub file"
    );
    assert_eq!(
        std::fs::read_link(up.join("opt/app/ln")).unwrap(),
        Path::new("top")
    );
    let (a, b) = (
        std::fs::metadata(up.join("opt/app/top")).unwrap(),
        std::fs::metadata(up.join("opt/app/hl")).unwrap(),
    );
    assert_eq!((a.ino(), a.nlink()), (b.ino(), 2), "hard link");

    // The image's symlinks are followed to the destination (/lib -> usr/lib).
    let (o, spec) = place(&fx, "/lib/x", None, None, sample()).await;
    assert_eq!((o.code, o.stderr.as_str()), (0, ""));
    assert_eq!(
        std::fs::read(spec.upper.join("usr/lib/x/top")).unwrap(),
        b"top file"
    );
    assert!(std::fs::symlink_metadata(spec.upper.join("lib")).is_err());

    // Files replaced, directories merged.
    use tar::EntryType::{Directory as D, Regular as F};
    let t = mk_tar(&[
        ("keep", D, 0o755, (0, 0), ""),
        ("keep/replaced", F, 0o600, (0, 0), "new"),
        ("keep/added", F, 0o600, (0, 0), "added"),
    ]);
    let (o, spec) = place(&fx, "/srv", None, None, t).await;
    assert_eq!((o.code, o.stderr.as_str()), (0, ""));
    let merged_view = |p: &str| {
        std::fs::read(spec.upper.join(p))
            .unwrap_or_else(|_| std::fs::read(fx.l1().join(p)).unwrap())
    };
    assert_eq!(merged_view("srv/keep/replaced"), b"new");
    assert_eq!(merged_view("srv/keep/added"), b"added");
    assert_eq!(merged_view("srv/keep/old"), b"old");
    assert!(
        !spec.upper.join("srv/keep/old").exists(),
        "untouched file copied up"
    );

    // --chown: every entry and every created directory; an existing one is left alone.
    let (o, spec) = place(&fx, "/home/bob/app", None, Some("bob"), sample()).await;
    assert_eq!((o.code, o.stderr.as_str()), (0, ""));
    for p in ["home", "home/bob", "home/bob/app"] {
        assert_eq!(meta(&spec.upper.join(p)), ("dir", 0o755, 1000, 1000), "{p}");
    }
    assert_eq!(
        meta(&spec.upper.join("home/bob/app/sub")),
        ("dir", 0o750, 1000, 1000)
    );
    assert_eq!(
        meta(&spec.upper.join("home/bob/app/sub/f")),
        ("file", 0o640, 1000, 1000)
    );
    assert_eq!(meta(&spec.upper.join("home/bob/app/ln")).2, 1000);
    let (o, spec) = place(&fx, "/srv", None, Some("7:staff"), sample()).await;
    assert_eq!((o.code, o.stderr.as_str()), (0, ""));
    assert_eq!(meta(&spec.upper.join("srv/top")), ("file", 0o644, 7, 50));
    assert_ne!(meta(&spec.upper.join("srv")).2, 7, "existing dir chowned");
    let (o, spec) = place(&fx, "/srv", None, Some("1234"), sample()).await;
    assert_eq!((o.code, o.stderr.as_str()), (0, ""));
    assert_eq!(
        meta(&spec.upper.join("srv/top")),
        ("file", 0o644, 1234, 1234)
    );
}

async fn place_file_mode() {
    let fx = place_fixture();
    use tar::EntryType::Regular as F;
    let one = || mk_tar(&[("f.txt", F, 0o640, (3, 4), "content")]);
    // Into an existing directory: dest/name.
    let (o, spec) = place(&fx, "/etc", Some("f.txt"), None, one()).await;
    assert_eq!((o.code, o.stderr.as_str()), (0, ""));
    assert_eq!(meta(&spec.upper.join("etc/f.txt")), ("file", 0o640, 3, 4));
    // Through a symlinked directory.
    let (o, spec) = place(&fx, "/lib", Some("f.txt"), None, one()).await;
    assert_eq!((o.code, o.stderr.as_str()), (0, ""));
    assert_eq!(
        std::fs::read(spec.upper.join("usr/lib/f.txt")).unwrap(),
        b"content"
    );
    // At a missing path: parents created, the file takes the destination's name.
    let (o, spec) = place(&fx, "/new/dir/name.conf", Some("f.txt"), Some("bob"), one()).await;
    assert_eq!((o.code, o.stderr.as_str()), (0, ""));
    assert_eq!(meta(&spec.upper.join("new")), ("dir", 0o755, 1000, 1000));
    assert_eq!(
        meta(&spec.upper.join("new/dir")),
        ("dir", 0o755, 1000, 1000)
    );
    assert_eq!(
        meta(&spec.upper.join("new/dir/name.conf")),
        ("file", 0o640, 1000, 1000)
    );
    assert!(!spec.upper.join("new/dir/f.txt").exists());
    // Over an existing file: replaced.
    let (o, spec) = place(&fx, "/srv/keep/replaced", Some("f.txt"), None, one()).await;
    assert_eq!((o.code, o.stderr.as_str()), (0, ""));
    assert_eq!(
        std::fs::read(spec.upper.join("srv/keep/replaced")).unwrap(),
        b"content"
    );
    // Never over a directory.
    let t = mk_tar(&[("keep", F, 0o640, (0, 0), "x")]);
    let (o, _) = place(&fx, "/srv", Some("keep"), None, t).await;
    assert_ne!(o.code, 0);
    assert!(
        o.stderr.contains("cannot overwrite a directory"),
        "{}",
        o.stderr
    );
    assert!(fx.l1().join("srv/keep").is_dir());
    // A directory entry never replaces a file, nor a symlink of the image.
    use tar::EntryType::Directory as D;
    let t = mk_tar(&[("replaced", D, 0o755, (0, 0), "")]);
    let (o, _) = place(&fx, "/srv/keep", None, None, t).await;
    assert_ne!(o.code, 0);
    assert!(
        o.stderr
            .contains("cannot overwrite a non-directory with a directory"),
        "{}",
        o.stderr
    );
    let t = mk_tar(&[
        ("lib", D, 0o755, (0, 0), ""),
        ("lib/x", F, 0o644, (0, 0), "x"),
    ]);
    let (o, spec) = place(&fx, "/", None, None, t).await;
    assert_ne!(o.code, 0);
    assert!(
        std::fs::symlink_metadata(spec.upper.join("lib")).is_err(),
        "/lib replaced"
    );
    // The tar must hold the announced file.
    let (o, _) = place(&fx, "/etc", Some("other"), None, one()).await;
    assert_ne!(o.code, 0);
    assert_eq!(
        o.stderr,
        "refusing archive: it should hold the one file 'other'\n"
    );
}

async fn place_refusals() {
    let fx = place_fixture();
    use tar::EntryType::{Char as C, Directory as D, Regular as F};
    let (o, _) = place(&fx, "/etc/passwd", None, None, sample()).await;
    assert_ne!(o.code, 0);
    assert_eq!(o.stderr, "destination /etc/passwd is not a directory\n");
    let (o, _) = place(&fx, "/etc/passwd/x", None, None, sample()).await;
    assert_ne!(o.code, 0);
    assert_eq!(
        o.stderr,
        "cannot create destination /etc/passwd/x: /etc/passwd is not a directory\n"
    );
    let (o, _) = place(&fx, "/srv", None, Some("alice"), sample()).await;
    assert_ne!(o.code, 0);
    assert_eq!(
        o.stderr,
        "unable to find user alice: no matching entries in passwd file\n"
    );
    // Device nodes are refused, paths never escape.
    let t = mk_tar(&[
        ("d", D, 0o755, (0, 0), ""),
        ("d/null", C, 0o666, (0, 0), ""),
    ]);
    let (o, spec) = place(&fx, "/srv", None, None, t).await;
    assert_ne!(o.code, 0);
    assert!(
        o.stderr.contains("d/null") && o.stderr.contains("device node"),
        "{}",
        o.stderr
    );
    assert!(!spec.upper.join("srv/d/null").exists());
    let evil = raw_tar(&[("../../escaped", F, "")]);
    let (o, spec) = place(&fx, "/srv/keep", None, None, evil).await;
    assert_ne!(o.code, 0);
    assert!(o.stderr.contains("escapes"), "{}", o.stderr);
    assert!(!spec.upper.join("escaped").exists());
    assert!(!spec.upper.parent().unwrap().join("escaped").exists());
    // A symlink of the archive is never followed by later entries.
    use tar::EntryType::Symlink as S;
    let t = mk_tar(&[
        ("out", S, 0o777, (0, 0), "/"),
        ("out/etc/pwned", F, 0o644, (0, 0), "x"),
    ]);
    let (o, spec) = place(&fx, "/srv", None, None, t).await;
    assert_ne!(o.code, 0);
    assert!(!spec.upper.join("etc/pwned").exists());
    // The limit holds.
    let spec = fx.spec(Job::Place {
        dest: "/srv".into(),
        file_name: None,
        owner: None,
        limit: Some(3),
    });
    let o = run(&spec, Some(sample())).await;
    assert_ne!(o.code, 0, "limit not enforced");
}

/// Runs `from | to`, the first's stdout piped into the second's stdin.
async fn pipe_jobs(from: &Spec, to: &Spec) -> (Out, Out) {
    let mut c1 = command(from).unwrap();
    c1.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let oa = c1.spawn().unwrap().wait_with_output().await.unwrap();
    // The header the engine reads: `D\0` (directory content) here.
    let tar = match oa.stdout.iter().position(|&b| b == 0) {
        Some(i) => {
            assert_eq!(&oa.stdout[..i], b"D", "CopySources header");
            oa.stdout[i + 1..].to_vec()
        }
        None => Vec::new(),
    };
    let mut c2 = command(to).unwrap();
    c2.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut b = c2.spawn().unwrap();
    let mut stdin = b.stdin.take().unwrap();
    let feed = async move {
        use tokio::io::AsyncWriteExt;
        let _ = stdin.write_all(&tar).await;
    };
    let ((), ob) = tokio::join!(feed, b.wait_with_output());
    let conv = |o: std::process::Output| Out {
        code: o.status.code().unwrap_or(-1),
        stdout: o.stdout,
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    };
    (conv(oa), conv(ob.unwrap()))
}

async fn copy_sources_into_place() {
    let fx = place_fixture();
    let src = fx.l1().join("src");
    std::fs::create_dir_all(src.join("app")).unwrap();
    std::fs::create_dir_all(src.join("data/x")).unwrap();
    for (p, c) in [
        ("app/a.txt", "a"),
        ("app/b.txt", "b"),
        ("app/c.md", "c"),
        ("data/x/y", "y"),
    ] {
        std::fs::write(src.join(p), c).unwrap();
    }
    // A symlink of the source image pointing out is resolved inside it.
    std::os::unix::fs::symlink("/etc/group", src.join("data/grp")).unwrap();
    std::os::unix::fs::symlink("/etc", src.join("etclink")).unwrap();
    let from = fx.spec(Job::CopySources {
        sources: vec![
            "/src/app/*.txt".into(),
            "/src/data".into(),
            "src/etclink/group".into(),
        ],
        chmod: Some(0o600),
    });
    let to = fx.spec(Job::Place {
        dest: "/dst/".into(),
        file_name: None,
        owner: None,
        limit: None,
    });
    let (a, b) = pipe_jobs(&from, &to).await;
    assert_eq!((a.code, a.stderr.as_str()), (0, ""));
    assert_eq!((b.code, b.stderr.as_str()), (0, ""));
    let dst = to.upper.join("dst");
    assert_eq!(std::fs::read(dst.join("a.txt")).unwrap(), b"a");
    assert_eq!(std::fs::read(dst.join("b.txt")).unwrap(), b"b");
    assert!(!dst.join("c.md").exists());
    assert!(!dst.join("app").exists() && !dst.join("data").exists());
    assert_eq!(meta(&dst.join("x")), ("dir", 0o600, 0, 0));
    assert_eq!(meta(&dst.join("x/y")), ("file", 0o600, 0, 0));
    assert_eq!(std::fs::read(dst.join("x/y")).unwrap(), b"y");
    // The symlink is copied as a symlink; the followed one is the image's file.
    assert_eq!(
        std::fs::read_link(dst.join("grp")).unwrap(),
        Path::new("/etc/group")
    );
    assert_eq!(
        std::fs::read_to_string(dst.join("group")).unwrap(),
        std::fs::read_to_string(fx.l1().join("etc/group")).unwrap()
    );
    // The source stage is untouched.
    assert_eq!(std::fs::read_dir(&from.upper).unwrap().count(), 0);

    // A glob matching nothing, a missing path: one line, nothing placed.
    for (srcs, line) in [
        (
            vec!["/src/*.none".to_string()],
            "source '/src/*.none': no file in the build context matches it\n",
        ),
        (
            vec!["/src/app/a.txt".to_string(), "/nothing".to_string()],
            "source '/nothing': no such file or directory in the build context\n",
        ),
    ] {
        let from = fx.spec(Job::CopySources {
            sources: srcs,
            chmod: None,
        });
        let o = run(&from, None).await;
        assert_ne!(o.code, 0);
        assert_eq!((o.stdout.len(), o.stderr.as_str()), (0, line));
    }
}
