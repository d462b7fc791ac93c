//! `walt image build`, the client's side: what it refuses before sending
//! anything (options, name, context directory, an existing image without
//! confirmation). Successful builds are tested with the engine.

use std::ffi::CString;
use std::fs::{self, File};
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::Duration;

use crate::common::*;
use walt_e2e::util::free_port;
use walt_e2e::*;

/// A client whose server address has nothing listening: a command that
/// tried to reach the server would fail with a connection error instead
/// of its own.
fn offline_client() -> Walt {
    Walt::new(&format!("127.0.0.1:{}", free_port()), "alice", &[]).unwrap()
}

/// A context directory with a Dockerfile and `0payload`, the first entry
/// a client streaming the context opens (names are sent in byte order).
fn context() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    fs::write(d.path().join("Dockerfile"), "FROM busybox\nRUN true\n").unwrap();
    fs::write(d.path().join("0payload"), vec![b'x'; 256 * 1024]).unwrap();
    d
}

/// The names of the entries of a directory opened since the watch began
/// (inotify `IN_OPEN`; the directory's own opens are not listed).
struct OpenWatch {
    fd: File,
}

impl OpenWatch {
    fn new(dir: &Path) -> Self {
        // SAFETY: inotify_init1 takes flags only; the result is checked.
        let raw = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        assert!(
            raw >= 0,
            "inotify_init1: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: `raw` is a new descriptor that nothing else owns.
        let fd = unsafe { File::from_raw_fd(raw) };
        let path = CString::new(dir.as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid inotify descriptor and a NUL-terminated path that
        // outlives the call.
        let wd = unsafe { libc::inotify_add_watch(fd.as_raw_fd(), path.as_ptr(), libc::IN_OPEN) };
        assert!(
            wd >= 0,
            "inotify_add_watch: {}",
            std::io::Error::last_os_error()
        );
        Self { fd }
    }

    /// Everything queued so far (events are queued when the open happens:
    /// once the command has exited, all of its opens are there).
    fn opened(&mut self) -> Vec<String> {
        let mut names = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match self.fd.read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("reading inotify events: {e}"),
            };
            let mut at = 0;
            // struct inotify_event: wd, mask, cookie, len (4 bytes each), name.
            while at + 16 <= n {
                let len = u32::from_ne_bytes(buf[at + 12..at + 16].try_into().unwrap()) as usize;
                let name = &buf[at + 16..at + 16 + len];
                let name = name.split(|&b| b == 0).next().unwrap_or_default();
                if !name.is_empty() {
                    names.push(String::from_utf8_lossy(name).into_owned());
                }
                at += 16 + len;
            }
        }
        names
    }
}

/// A usage error: exit status 2, one `error:` line, nothing on stdout.
#[track_caller]
fn assert_usage_error(out: &CmdOutput, needle: &str) {
    out.assert_failure(needle);
    assert_eq!(out.code, Some(2), "usage errors exit with 2:\n{out}");
    assert!(out.stdout.is_empty(), "nothing on stdout:\n{out}");
    assert_eq!(out.stderr.lines().count(), 1, "one line:\n{out}");
}

#[test]
fn option_errors_are_one_line_before_any_connection() {
    let w = offline_client();
    let ctx = context();
    let dir = ctx.path().to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["image", "build", "img"], "--from-dir"),
        (
            &[
                "image",
                "build",
                "--from-dir",
                dir,
                "--from-url",
                "file:///r",
                "img",
            ],
            "cannot be used together",
        ),
        (
            &["image", "build", "--from-dir", dir, "--sub-dir", "x", "img"],
            "--sub-dir is only supported with --from-url",
        ),
        (&["image", "build", "--sub-dir", "x", "img"], "--from-dir"),
        (
            &[
                "image",
                "build",
                "--from-dir",
                dir,
                "--build-arg",
                "=v",
                "img",
            ],
            "--build-arg",
        ),
    ];
    for (args, needle) in cases {
        assert_usage_error(&w.run(args), needle);
    }
    // clap's own: no image name.
    let out = w.run(&["image", "build", "--from-dir", dir]);
    assert_eq!(out.code, Some(2), "{out}");
    assert!(out.stdout.is_empty(), "{out}");
}

#[test]
fn context_directory_and_name_are_checked_first() {
    let w = offline_client();
    let ctx = context();
    let dir = ctx.path().to_str().unwrap();

    // No Dockerfile: the line names what is missing and where.
    let empty = tempfile::tempdir().unwrap();
    let out = w.run(&[
        "image",
        "build",
        "--from-dir",
        empty.path().to_str().unwrap(),
        "img",
    ]);
    out.assert_failure("no Dockerfile or Containerfile in directory");
    assert!(out.stderr.contains(empty.path().to_str().unwrap()), "{out}");

    // A Dockerfile pointing outside the directory is not one.
    let linked = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink("/etc/passwd", linked.path().join("Dockerfile")).unwrap();
    w.run(&[
        "image",
        "build",
        "--from-dir",
        linked.path().to_str().unwrap(),
        "img",
    ])
    .assert_failure("not a regular file");

    // Not a directory, or none.
    let file = ctx.path().join("0payload");
    w.run(&[
        "image",
        "build",
        "--from-dir",
        file.to_str().unwrap(),
        "img",
    ])
    .assert_failure("not a directory");
    let missing = ctx.path().join("missing");
    w.run(&[
        "image",
        "build",
        "--from-dir",
        missing.to_str().unwrap(),
        "img",
    ])
    .assert_failure("not found");

    // Invalid names, whatever the source.
    for (name, needle) in [
        ("Bad_Name", "invalid image name"),
        ("default", "reserved"),
        ("a/b", "invalid image name"),
    ] {
        let out = w.run(&["image", "build", "--from-dir", dir, name]);
        out.assert_failure(needle);
        assert!(out.stdout.is_empty(), "{out}");
        w.run(&["image", "build", "--from-url", "file:///r", name])
            .assert_failure(needle);
    }
}

/// WalT's confirmation question, waiting for an answer.
fn wait_question(t: &walt_e2e::tmux::Tmux) {
    t.wait_line("the question", |l| l == "Are you sure? (y/n):")
        .unwrap();
}

/// `walt image build --from-dir <ctx> img` when alice already has `img`.
#[test]
fn replacing_an_image_needs_confirmation() {
    let env = Env::start();
    push_busybox(&env, "walt-test/busybox", "latest");
    env.alice.clone_ok(&["local:walt-test/busybox", "img"]);
    let before = env.snapshot();
    let ctx = context();
    let dir = ctx.path().to_str().unwrap().to_string();
    let mut watch = OpenWatch::new(ctx.path());

    // No terminal, no --yes: refused, the context never read.
    let out = env
        .alice
        .run(&["image", "build", "--from-dir", &dir, "img"]);
    let opened = watch.opened();
    assert!(
        !opened.iter().any(|n| n == "0payload"),
        "context read: {opened:?}\n{out}"
    );
    out.assert_failure("already exists");
    assert!(
        out.stderr.contains("--yes"),
        "the refusal names --yes:\n{out}"
    );
    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.stdout.is_empty(), "{out}");
    env.assert_unchanged(&before);

    // On a terminal: WalT's question; `n` aborts, nothing sent.
    let mut watch = OpenWatch::new(ctx.path());
    let (t, exit) = env
        .alice
        .in_terminal(&format!("image build --from-dir {dir} img"));
    t.wait_line("the overwrite warning", |l| {
        l == "An image has the same name in your working set."
    })
    .unwrap();
    wait_question(&t);
    t.enter("maybe").unwrap();
    t.wait_line("the answer refused", |l| l == "Invalid response.")
        .unwrap();
    // Typed before the question is asked again, the answer could be lost.
    wait_question(&t);
    t.enter("n").unwrap();
    t.wait_line("the abort", |l| l == "Aborted.").unwrap();
    assert_eq!(
        t.exit_status(&exit, Duration::from_secs(60)),
        1,
        "{}",
        t.screen()
    );
    let opened = watch.opened();
    assert!(
        !opened.iter().any(|n| n == "0payload"),
        "context read: {opened:?}"
    );
    env.assert_unchanged(&before);

    // Ctrl-C at the question: aborted too, status 130.
    let (t, exit) = env
        .alice
        .in_terminal(&format!("image build --from-dir {dir} img"));
    wait_question(&t);
    t.keys(&["C-c"]).unwrap();
    assert_eq!(
        t.exit_status(&exit, Duration::from_secs(60)),
        130,
        "{}",
        t.screen()
    );
    let opened = watch.opened();
    assert!(
        !opened.iter().any(|n| n == "0payload"),
        "context read: {opened:?}"
    );
    env.assert_unchanged(&before);
}
