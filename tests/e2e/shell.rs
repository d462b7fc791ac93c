//! `walt image shell` and `walt image cp`: the sandbox, the save dialogue,
//! copies both ways, locking, leaks, foreign architectures.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::common::*;
use walt_e2e::tmux::Tmux;
use walt_e2e::util::wait_for;
use walt_e2e::*;

/// Clones the standard busybox image as alice's `img`.
fn env_with_image() -> Env {
    let env = Env::start();
    push_busybox(&env, "walt-test/busybox", "latest");
    env.alice.clone_ok(&["local:walt-test/busybox", "img"]);
    env
}

fn exit_status(exit: &Path, tmux: &Tmux) -> i32 {
    tmux.exit_status(exit, Duration::from_secs(60))
}

/// The shell prompt of busybox sh as root.
fn wait_shell_prompt(t: &Tmux) {
    t.wait_line("the shell prompt", |l| l.ends_with('#'))
        .unwrap();
}

/// Number of layers of alice's image `name`, from the store's database.
fn layer_count(env: &Env, name: &str) -> usize {
    let db = env.server.data_dir().join("walt.db");
    let q = format!(
        "SELECT COUNT(*) FROM image_layers il JOIN images i ON i.id = il.image_id \
         WHERE i.owner = 'alice' AND i.name = '{name}'"
    );
    sqlite_count(&db, &q)
}

fn sqlite_count(db: &Path, query: &str) -> usize {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    conn.query_row(query, [], |r| r.get::<_, i64>(0)).unwrap() as usize
}

#[test]
fn scripted_shell_session_saves_and_cp_reads_back() {
    let env = env_with_image();
    let layers_before = layer_count(&env, "img");
    let (t, exit) = env.alice.in_terminal("image shell img");
    wait_shell_prompt(&t);
    t.enter("hostname; pwd").unwrap();
    t.wait_line("hostname", |l| l == "image-shell").unwrap();
    t.wait_line("cwd", |l| l == "/root").unwrap();
    // Keys reach the shell: Ctrl-C interrupts a running command.
    t.enter("sleep 4141").unwrap();
    wait_for("the sleep to run", Duration::from_secs(10), || {
        (processes_with("sleep 4141").len() == 1).then_some(())
    })
    .unwrap();
    t.keys(&["C-c"]).unwrap();
    wait_for("Ctrl-C to end the sleep", Duration::from_secs(10), || {
        processes_with("sleep 4141").is_empty().then_some(())
    })
    .unwrap();
    t.enter("echo after-$((6*7))").unwrap();
    t.wait_line("the shell after Ctrl-C", |l| l == "after-42")
        .unwrap();
    // The terminal size follows the client's.
    t.enter("busybox stty size").unwrap();
    t.wait_line("the initial size", |l| l == "50 200").unwrap();
    t.resize(120, 40).unwrap();
    // The new size goes through the client (SIGWINCH) and the server: ask
    // again, each answer waited for, until it shows.
    let mut asked = 0;
    wait_for("the new size in the shell", Duration::from_secs(20), || {
        asked += 1;
        let tag = format!("size-{asked}:");
        t.enter(&format!("echo {tag} $(busybox stty size)"))
            .unwrap();
        t.wait_line(&format!("answer {asked}"), |l| l.starts_with(&tag))
            .unwrap();
        let want = format!("{tag} 40 120");
        t.screen()
            .lines()
            .any(|l| l.trim_end() == want)
            .then_some(())
    })
    .unwrap();
    t.enter("echo ok > /root/test").unwrap();
    t.enter("exit").unwrap();
    t.wait_line("the save prompt", |l| {
        l.starts_with("Name of the image to save") && l.ends_with(':')
    })
    .unwrap();
    t.keys(&["Enter"]).unwrap();
    t.wait_line("the overwrite question", |l| {
        l.contains("img already exists") && l.contains("(y/n)")
    })
    .unwrap();
    t.enter("y").unwrap();
    t.wait_line("the result", |l| l.ends_with("updated."))
        .unwrap();
    assert_eq!(exit_status(&exit, &t), 0, "{}", t.screen());
    assert_eq!(layer_count(&env, "img"), layers_before + 1);

    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("local-file");
    env.alice
        .run(&["image", "cp", "img:/root/test", local.to_str().unwrap()])
        .assert_success();
    assert_eq!(fs::read_to_string(&local).unwrap(), "ok\n");
    assert_tmp_empty(&env.server.data_dir());
}

#[test]
fn shell_saves_under_a_new_name_and_keeps_the_exit_status() {
    let env = env_with_image();
    let (t, exit) = env.alice.in_terminal("image shell img");
    wait_shell_prompt(&t);
    t.enter("rm /etc/walt-test-marker; mkdir /root/d; echo x > /root/d/f; exit 3")
        .unwrap();
    t.wait_line("the save prompt", |l| {
        l.starts_with("Name of the image to save")
    })
    .unwrap();
    t.enter("BAD NAME").unwrap();
    t.wait_line("the name rule", |l| l.to_lowercase().contains("invalid"))
        .unwrap();
    t.enter("img2").unwrap();
    t.wait_line("the result", |l| {
        l.contains("img2") && l.ends_with("saved.")
    })
    .unwrap();
    assert_eq!(exit_status(&exit, &t), 3, "{}", t.screen());
    let names = env.alice.image_names();
    assert!(
        names.contains(&"img".to_string()) && names.contains(&"img2".to_string()),
        "{names:?}"
    );

    // The deletion is saved (a whiteout), the original is intact.
    let dir = tempfile::tempdir().unwrap();
    let out = env.alice.run(&[
        "image",
        "cp",
        "img2:/etc/walt-test-marker",
        dir.path().to_str().unwrap(),
    ]);
    out.assert_failure("No such file or directory");
    env.alice
        .run(&[
            "image",
            "cp",
            "img:/etc/walt-test-marker",
            dir.path().to_str().unwrap(),
        ])
        .assert_success();
    env.alice
        .run(&["image", "cp", "img2:d", dir.path().to_str().unwrap()])
        .assert_success();
    assert_eq!(fs::read_to_string(dir.path().join("d/f")).unwrap(), "x\n");
}

#[test]
fn shell_without_changes_saves_nothing_and_ctrl_c_at_the_prompt_discards() {
    let env = env_with_image();
    let before = env.snapshot();
    // Piped input (no terminal): the shell runs the commands.
    let out = env
        .alice
        .run_with_input(&["image", "shell", "img"], "echo hello-$((40+2))\nexit\n");
    out.assert_success();
    assert!(out.stdout.contains("hello-42"), "{out}");
    assert!(out.stderr.contains("No changes"), "{out}");
    assert_eq!(env.snapshot(), before);

    let (t, exit) = env.alice.in_terminal("image shell img");
    wait_shell_prompt(&t);
    t.enter("touch /root/new; exit").unwrap();
    t.wait_line("the save prompt", |l| {
        l.starts_with("Name of the image to save")
    })
    .unwrap();
    t.keys(&["C-c"]).unwrap();
    t.wait_line("the discard message", |l| l.contains("discarded"))
        .unwrap();
    assert_ne!(exit_status(&exit, &t), 0);
    assert_eq!(env.snapshot(), before);
    wait_for("the session to end", Duration::from_secs(10), || {
        fs::read_dir(env.server.data_dir().join("tmp"))
            .ok()
            .and_then(|mut d| d.next().is_none().then_some(()))
    })
    .unwrap();
}

#[test]
fn second_session_on_an_image_is_refused() {
    let env = env_with_image();
    let (t, _exit) = env.alice.in_terminal("image shell img");
    wait_shell_prompt(&t);
    let out = env
        .alice
        .run_with_input(&["image", "shell", "img"], "exit\n");
    out.assert_failure("is being modified by a shell of alice");
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("f"), "x").unwrap();
    env.alice
        .run(&[
            "image",
            "cp",
            dir.path().join("f").to_str().unwrap(),
            "img:/root/",
        ])
        .assert_failure("is being modified");
    env.alice
        .run(&["image", "remove", "img"])
        .assert_failure("is being modified");
    // Reading is allowed.
    env.alice
        .run(&[
            "image",
            "cp",
            "img:/etc/passwd",
            dir.path().to_str().unwrap(),
        ])
        .assert_success();
    t.enter("exit").unwrap();
    wait_for("the lock to go", Duration::from_secs(10), || {
        let o = env
            .alice
            .run_with_input(&["image", "shell", "img"], "exit\n");
        o.success.then_some(())
    })
    .unwrap();
}

/// Processes whose command line contains `needle`.
fn processes_with(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let name = e.file_name();
        if !name.to_string_lossy().chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        if let Ok(cmd) = fs::read(e.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(needle) {
                found.push(format!("{}: {cmd}", name.to_string_lossy()));
            }
        }
    }
    found
}

#[test]
fn client_killed_mid_shell_leaks_no_mount_or_process() {
    let env = env_with_image();
    let (t, _exit) = env.alice.in_terminal("image shell img");
    wait_shell_prompt(&t);
    t.enter("sleep 4242 & sleep 4343").unwrap();
    wait_for("the sleeps to run", Duration::from_secs(10), || {
        (processes_with("sleep 4242").len() == 1 && processes_with("sleep 4343").len() == 1)
            .then_some(())
    })
    .unwrap();
    let data = env.server.data_dir();
    let data_s = data.to_string_lossy().into_owned();
    assert!(
        !mounts_with(&data_s).is_empty(),
        "the session's mounts should be visible in its namespace"
    );
    // Kill the client (the terminal goes with it).
    drop(t);
    wait_for(
        "the session to be torn down",
        Duration::from_secs(15),
        || {
            (processes_with("sleep 4242").is_empty()
                && processes_with("sleep 4343").is_empty()
                && processes_with("__walt-sandbox").is_empty()
                && mounts_with(&data_s).is_empty())
            .then_some(())
        },
    )
    .unwrap_or_else(|e| {
        panic!(
            "{e}: processes {:?} {:?}, mounts {:?}",
            processes_with("sleep 4"),
            processes_with("__walt-sandbox"),
            mounts_with(&data_s)
        )
    });
    wait_for("tmp/ to be emptied", Duration::from_secs(10), || {
        fs::read_dir(data.join("tmp"))
            .ok()
            .and_then(|mut d| d.next().is_none().then_some(()))
    })
    .unwrap();
    // The image is free again.
    let out = env
        .alice
        .run_with_input(&["image", "shell", "img"], "exit\n");
    out.assert_success();
}

fn sample_tree(dir: &Path) -> PathBuf {
    let src = dir.join("tree");
    fs::create_dir_all(src.join("sub/deeper")).unwrap();
    fs::write(src.join("a.txt"), "alpha\n").unwrap();
    fs::write(src.join("sub/run.sh"), "#!/bin/sh\necho run\n").unwrap();
    fs::set_permissions(src.join("sub/run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(src.join("sub/deeper/secret"), "s").unwrap();
    fs::set_permissions(
        src.join("sub/deeper/secret"),
        fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    std::os::unix::fs::symlink("../a.txt", src.join("sub/link")).unwrap();
    fs::hard_link(src.join("a.txt"), src.join("a-hard")).unwrap();
    let t = filetime::FileTime::from_unix_time(1_600_000_000, 0);
    for p in ["a.txt", "sub/run.sh", "sub/deeper/secret"] {
        filetime::set_file_mtime(src.join(p), t).unwrap();
    }
    for p in ["sub/deeper", "sub", ""] {
        filetime::set_file_mtime(src.join(p), t).unwrap();
    }
    src
}

/// The server's log lines that say how a copy's archive went.
fn pipe_lines(env: &Env) -> Vec<String> {
    env.server
        .log()
        .lines()
        .filter(|l| l.contains("client's pipe"))
        .map(|l| l.split_once(": ").map_or(l, |(_, m)| m).to_string())
        .collect()
}

/// Asserts the server's log says every one of `said`, and nothing with
/// `unsaid`, about the copies' pipes.
#[track_caller]
fn assert_pipe_log(env: &Env, said: &[&str], unsaid: &str) {
    let lines = pipe_lines(env);
    for s in said {
        assert!(
            lines.iter().any(|l| l.contains(s)),
            "no '{s}' in {lines:#?}"
        );
    }
    assert!(!lines.iter().any(|l| l.contains(unsaid)), "{lines:#?}");
}

#[test]
fn cp_round_trips_through_the_clients_fifo_on_the_servers_machine() {
    let env = env_with_image();
    cp_round_trip(&env);
    // Every copy that reached its sandbox went through the client's FIFO.
    assert_pipe_log(
        &env,
        &[
            "copy in through the client's pipe",
            "copy out through the client's pipe",
        ],
        "refused",
    );
}

#[test]
fn cp_round_trips_in_the_api_stream() {
    let mut env = env_with_image();
    env.alice.env.push(("WALT_CP_STREAM".into(), "1".into()));
    cp_round_trip(&env);
    assert_eq!(pipe_lines(&env), Vec::<String>::new());
}

/// A client whose FIFO the server cannot see (another mount namespace, as
/// a server with a private /tmp) copies through the stream instead.
#[test]
fn cp_falls_back_to_the_stream_when_the_server_cannot_open_the_fifo() {
    let env = env_with_image();
    let dir = tempfile::tempdir().unwrap();
    let src = sample_tree(dir.path());
    let runtime = dir.path().join("runtime");
    fs::create_dir(&runtime).unwrap();
    let back = dir.path().join("back");
    fs::create_dir(&back).unwrap();
    // The CLI in a mount namespace of its own, where its runtime directory
    // (where it makes its FIFO) is a tmpfs the server does not see.
    let hidden = |args: &[&str]| {
        let walt = env.alice.command(args);
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(r#"mount -t tmpfs tmpfs "$XDG_RUNTIME_DIR" && exec "$0" "$@""#)
            .arg(walt.get_program())
            .args(walt.get_args())
            .env("XDG_RUNTIME_DIR", &runtime);
        for (k, v) in walt.get_envs() {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "walt {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    hidden(&["image", "cp", src.to_str().unwrap(), "img:"]);
    hidden(&["image", "cp", "img:/root/tree", back.to_str().unwrap()]);
    assert_eq!(listing(&src, true), listing(&back.join("tree"), true));
    assert_pipe_log(
        &env,
        &[
            "copy in: the client's pipe is refused",
            "copy out: the client's pipe is refused",
        ],
        "through the client's pipe",
    );
    assert_tmp_empty(&env.server.data_dir());
}

fn cp_round_trip(env: &Env) {
    let dir = tempfile::tempdir().unwrap();
    let src = sample_tree(dir.path());
    let layers_before = layer_count(env, "img");

    // Into an existing directory (relative = under /root), then back.
    env.alice
        .run(&["image", "cp", src.to_str().unwrap(), "img:"])
        .assert_success();
    assert_eq!(layer_count(env, "img"), layers_before + 1);
    let back = dir.path().join("back");
    fs::create_dir(&back).unwrap();
    env.alice
        .run(&["image", "cp", "img:/root/tree", back.to_str().unwrap()])
        .assert_success();
    assert_eq!(listing(&src, true), listing(&back.join("tree"), true));
    let diff = Command::new("diff")
        .args(["-r", "--no-dereference"])
        .arg(&src)
        .arg(back.join("tree"))
        .output()
        .unwrap();
    assert!(
        diff.status.success(),
        "{}",
        String::from_utf8_lossy(&diff.stdout)
    );
    assert_eq!(
        fs::metadata(back.join("tree/a.txt")).unwrap().ino(),
        fs::metadata(back.join("tree/a-hard")).unwrap().ino(),
        "hard links kept"
    );

    // A file to a new name; a directory to a new name; a file into a directory.
    env.alice
        .run(&[
            "image",
            "cp",
            src.join("a.txt").to_str().unwrap(),
            "img:/etc/renamed",
        ])
        .assert_success();
    env.alice
        .run(&["image", "cp", src.to_str().unwrap(), "img:/opt-copy"])
        .assert_success();
    let out = dir.path().join("out");
    fs::create_dir(&out).unwrap();
    env.alice
        .run(&[
            "image",
            "cp",
            "img:/etc/renamed",
            out.join("r").to_str().unwrap(),
        ])
        .assert_success();
    assert_eq!(fs::read_to_string(out.join("r")).unwrap(), "alpha\n");
    env.alice
        .run(&[
            "image",
            "cp",
            "img:/opt-copy",
            out.join("o").to_str().unwrap(),
        ])
        .assert_success();
    assert_eq!(listing(&src, true), listing(&out.join("o"), true));
    // Missing parents are refused on both sides, and a refused copy into
    // the image changes nothing.
    let before = env.snapshot();
    env.alice
        .run(&[
            "image",
            "cp",
            src.join("a.txt").to_str().unwrap(),
            "img:/no/such/dir/x",
        ])
        .assert_failure("No such file or directory");
    env.alice
        .run(&[
            "image",
            "cp",
            "img:/etc/passwd",
            out.join("no/such/x").to_str().unwrap(),
        ])
        .assert_failure("No such file or directory");
    env.alice
        .run(&["image", "cp", "img:/nonexistent", out.to_str().unwrap()])
        .assert_failure("No such file or directory");
    env.alice
        .run(&["image", "cp", "nope:/etc/passwd", out.to_str().unwrap()])
        .assert_failure("not found");
    env.alice
        .run(&["image", "cp", src.to_str().unwrap(), "img:/etc/passwd"])
        .assert_failure("cannot overwrite non-directory");
    assert_eq!(env.snapshot(), before);
    assert_tmp_empty(&env.server.data_dir());
}

#[test]
fn cp_paths_and_links_stay_inside_the_image() {
    let env = Env::start();
    let b = &env.images;
    let mut entries = walt_e2e::image::busybox_rootfs_entries("escape").unwrap();
    entries.extend([
        RawEntry::symlink("root/evil", "/"),
        RawEntry::symlink("root/up", "../../../../.."),
        RawEntry::symlink("root/passwd-link", "/etc/passwd"),
    ]);
    let layer = b.layer(Format::Oci, Compression::Gzip, &entries).unwrap();
    let img = b
        .image(Format::Oci, ImageConfig::amd64("pc-x86-64"), &[layer])
        .unwrap();
    env.push_local("walt-test/escape", "latest", &img);
    env.alice.clone_ok(&["local:walt-test/escape", "esc"]);
    let dir = tempfile::tempdir().unwrap();
    let image_passwd = "root:x:0:0:root:/root:/bin/sh\n";

    for path in [
        "evil/etc/passwd",
        "up/etc/passwd",
        "../../../../etc/passwd",
        "/../../etc/passwd",
        "passwd-link",
    ] {
        let local = dir.path().join("p");
        let _ = fs::remove_file(&local);
        env.alice
            .run(&[
                "image",
                "cp",
                &format!("esc:{path}"),
                local.to_str().unwrap(),
            ])
            .assert_success();
        assert_eq!(
            fs::read_to_string(&local).unwrap(),
            image_passwd,
            "via {path}"
        );
    }
    // The host's shadow file is not reachable (the image has none).
    env.alice
        .run(&[
            "image",
            "cp",
            "esc:../../etc/shadow",
            dir.path().to_str().unwrap(),
        ])
        .assert_failure("No such file or directory");

    // Writes through the links land in the image, never on the host.
    let marker = format!("walt-e2e-escape-{}", std::process::id());
    let f = dir.path().join(&marker);
    fs::write(&f, "x").unwrap();
    for dest in ["evil/tmp/", "up/tmp/", "../../../tmp/"] {
        env.alice
            .run(&["image", "cp", f.to_str().unwrap(), &format!("esc:{dest}")])
            .assert_success();
        assert!(
            !Path::new("/tmp").join(&marker).exists(),
            "written on the host via {dest}"
        );
    }
    let back = dir.path().join("back");
    env.alice
        .run(&[
            "image",
            "cp",
            &format!("esc:/tmp/{marker}"),
            back.to_str().unwrap(),
        ])
        .assert_success();
    assert_eq!(fs::read_to_string(&back).unwrap(), "x");
}

#[test]
fn squash_then_shell_sees_the_same_content() {
    let env = env_with_image();
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("f"), "before-squash\n").unwrap();
    env.alice
        .run(&[
            "image",
            "cp",
            dir.path().join("f").to_str().unwrap(),
            "img:",
        ])
        .assert_success();
    let script = "cat /root/f; ls /bin | wc -l; cat /etc/walt-test-marker\nexit\n";
    let before = env.alice.run_with_input(&["image", "shell", "img"], script);
    before.assert_success();
    env.alice.run(&["image", "squash", "img"]).assert_success();
    assert_eq!(layer_count(&env, "img"), 1);
    let after = env.alice.run_with_input(&["image", "shell", "img"], script);
    after.assert_success();
    let lines = |s: &str| -> Vec<String> {
        s.lines()
            .map(|l| l.trim().to_string())
            // The terminal may echo the piped commands, or not, depending
            // on when they arrive: keep the commands' output only.
            .filter(|l| {
                !l.is_empty()
                    && !l.contains('#')
                    && !script.lines().any(|c| c == l)
                    && !l.starts_with("BusyBox")
                    && !l.starts_with("Enter 'help'")
            })
            .collect()
    };
    assert!(before.stdout.contains("before-squash"), "{before}");
    assert_eq!(lines(&before.stdout), lines(&after.stdout));
}

#[test]
fn foreign_architecture_images_run_through_qemu() {
    // binfmt registration is system-wide; the install step enables it and
    // so does this test (idempotent).
    for a in ["aarch64", "arm"] {
        if !Path::new("/proc/sys/fs/binfmt_misc")
            .join(format!("qemu-{a}"))
            .exists()
        {
            let st = Command::new("update-binfmts")
                .args(["--enable", &format!("qemu-{a}")])
                .status()
                .expect("update-binfmts (binfmt-support) missing: scripts/install-deps.sh");
            assert!(st.success());
        }
    }
    let env = Env::start();
    for (arch, want) in [("arm64", "aarch64"), ("armhf", "armv7l")] {
        let img = arm_busybox_image(&env, arch);
        env.push_local(&format!("walt-test/{arch}"), "latest", &img);
        env.alice
            .clone_ok(&[&format!("local:walt-test/{arch}"), arch]);
        let out = env
            .alice
            .run_with_input(&["image", "shell", arch], "uname -m\nexit\n");
        out.assert_success();
        assert!(
            out.stdout.lines().any(|l| l.trim() == want),
            "{arch}: expected {want}\n{out}"
        );
    }
}

#[test]
fn server_killed_mid_shell_leaves_nothing_after_restart() {
    let mut env = env_with_image();
    let (t, _exit) = env.alice.in_terminal("image shell img");
    wait_shell_prompt(&t);
    t.enter("echo lost > /root/lost; sleep 4545").unwrap();
    wait_for("the sleep to run", Duration::from_secs(10), || {
        (processes_with("sleep 4545").len() == 1).then_some(())
    })
    .unwrap();
    env.server.kill9();
    let data = env.server.data_dir();
    let data_s = data.to_string_lossy().into_owned();
    // The sandbox dies with the server (parent-death signal, pid namespace).
    wait_for(
        "the sandbox to die with the server",
        Duration::from_secs(10),
        || {
            (processes_with("sleep 4545").is_empty()
                && processes_with("__walt-sandbox").is_empty()
                && mounts_with(&data_s).is_empty())
            .then_some(())
        },
    )
    .unwrap();
    drop(t);
    env.server.restart().unwrap();
    assert_tmp_empty(&data);
    // The image is as before, and free.
    let dir = tempfile::tempdir().unwrap();
    env.alice
        .run(&[
            "image",
            "cp",
            "img:/root/lost",
            dir.path().to_str().unwrap(),
        ])
        .assert_failure("No such file or directory");
    env.alice
        .run_with_input(&["image", "shell", "img"], "exit\n")
        .assert_success();
}

/// A device node from the client would reach the host's hardware from any
/// image that keeps it: `walt image cp` into an image refuses it with one
/// clear line, and the image and the store are as before.
#[test]
fn cp_into_an_image_refuses_device_nodes() {
    let env = env_with_image();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("withdev");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("plain"), "x").unwrap();
    let status = Command::new("mknod")
        .arg(src.join("null"))
        .args(["c", "1", "3"])
        .status()
        .unwrap();
    assert!(status.success(), "mknod (the tests run as root)");
    let layers_before = layer_count(&env, "img");
    let before = store_snapshot(&env.server.data_dir(), &env.alice);

    let out = env
        .alice
        .run(&["image", "cp", src.to_str().unwrap(), "img:"]);
    assert!(!out.success, "{out}");
    assert!(out.stdout.is_empty(), "{out}");
    let err = out.stderr.trim();
    assert_eq!(err.lines().count(), 1, "{out}");
    assert!(err.contains("device node") && err.contains("null"), "{out}");
    assert_eq!(layer_count(&env, "img"), layers_before);
    assert_eq!(store_snapshot(&env.server.data_dir(), &env.alice), before);
    assert_tmp_empty(&env.server.data_dir());
}
