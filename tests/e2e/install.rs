//! `walt-server-setup install --root DIR`: the install steps, written under a
//! temporary root (binfmt and systemctl are then only checked).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use walt_e2e::CmdOutput;
use walt_e2e::util::workspace_bin;
use walt_e2e::walt::wait_output;

fn setup(args: &[&str]) -> CmdOutput {
    let child = Command::new(workspace_bin("walt-server-setup"))
        .args(args)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start walt-server-setup");
    wait_output(
        child,
        &format!("walt-server-setup {}", args.join(" ")),
        Duration::from_secs(60),
    )
}

fn install(root: &Path, extra: &[&str]) -> CmdOutput {
    let mut args = vec!["install", "--root", root.to_str().unwrap()];
    args.extend_from_slice(extra);
    let out = setup(&args);
    out.assert_success();
    out
}

/// Every file and directory under `dir`, with its content (None: a directory).
fn tree(dir: &Path) -> Vec<(PathBuf, Option<Vec<u8>>)> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p.clone());
                found.push((p, None));
            } else {
                let data = std::fs::read(&p).unwrap();
                found.push((p, Some(data)));
            }
        }
    }
    found.sort();
    found
}

/// The step lines: each starts with one of the four words.
fn steps(out: &CmdOutput) -> Vec<&str> {
    let lines: Vec<&str> = out.stdout.lines().filter(|l| !l.is_empty()).collect();
    for l in &lines {
        assert!(
            ["ok: ", "done: ", "would: ", "missing: "]
                .iter()
                .any(|p| l.starts_with(p)),
            "unexpected line {l:?}:\n{out}"
        );
    }
    assert_eq!(lines.len(), 10, "one line per step:\n{out}");
    lines
}

#[test]
fn install_dry_run_then_install_then_nothing_to_do() {
    let root = tempfile::tempdir().unwrap();
    let out = install(root.path(), &["--dry-run"]);
    let l = steps(&out);
    assert!(
        l[0].starts_with("would: create ") && l[0].contains("var/lib/walt"),
        "{out}"
    );
    assert!(
        l[1].starts_with("would: write ") && l[1].contains("server.conf"),
        "{out}"
    );
    assert!(
        l[2].starts_with("would: write ") && l[2].contains("walt-server.service"),
        "{out}"
    );
    assert!(l[3].contains("binfmt") || l[3].contains("qemu"), "{out}");
    assert!(
        l[4].contains("Docker daemon") || l[4].contains("docker:"),
        "{out}"
    );
    assert!(l[5].contains("NFS server"), "{out}");
    // The node side: tftpd-hpa is installed here (its command line is
    // given), and walt-dhcp-event is built next to walt-server.
    assert!(
        l[7].starts_with("ok: TFTP server") && l[7].contains("-s -u root"),
        "{out}"
    );
    assert!(l[8].starts_with("ok: DHCP hook"), "{out}");
    // walt is built next to walt-server: its completion and man pages.
    assert!(
        l[9].starts_with("would: write ")
            && l[9].contains("usr/share/bash-completion/completions/walt")
            && l[9].contains("usr/local/share/zsh/site-functions/_walt")
            && l[9].contains("man pages in"),
        "{out}"
    );
    assert!(
        tree(root.path()).is_empty(),
        "the dry run wrote something:\n{out}"
    );

    let out = install(root.path(), &[]);
    let l = steps(&out);
    assert!(l[0].starts_with("done: created "), "{out}");
    assert!(l[1].starts_with("done: wrote "), "{out}");
    assert!(l[2].starts_with("done: wrote "), "{out}");
    assert!(!out.stdout.contains("would: "), "{out}");
    assert!(root.path().join("var/lib/walt").is_dir());
    let conf = root.path().join("etc/walt/server.conf");
    let text = std::fs::read_to_string(&conf).unwrap();
    assert!(
        text.starts_with("# WalT server configuration file.\n")
            && text.contains("192.168.212.1/24"),
        "{text}"
    );
    let check = setup(&["--check", "--config", conf.to_str().unwrap()]);
    check.assert_success();
    assert!(
        check.stdout.contains("OK") && check.stdout.contains("hub"),
        "{check}"
    );
    let unit = std::fs::read_to_string(root.path().join("etc/systemd/system/walt-server.service"))
        .unwrap();
    let exec = format!(
        "ExecStart={} --config /etc/walt/server.conf --data-dir /var/lib/walt",
        workspace_bin("walt-server").display()
    );
    assert!(unit.lines().any(|l| l == exec), "{exec} not in\n{unit}");
    assert!(
        unit.contains("ExecReload=/bin/kill -HUP $MAINPID"),
        "{unit}"
    );

    assert!(l[9].starts_with("done: wrote "), "{out}");
    assert_completion_installed(root.path());

    // Again: nothing changes.
    let before = tree(root.path());
    let out = install(root.path(), &[]);
    let l = steps(&out);
    for line in l[..3].iter().chain(&l[9..]) {
        assert!(line.starts_with("ok: "), "{out}");
    }
    assert!(
        !out.stdout.contains("done: ") && !out.stdout.contains("would: "),
        "{out}"
    );
    assert_eq!(
        tree(root.path()),
        before,
        "the second install changed files"
    );
}

#[test]
fn install_keeps_an_existing_config() {
    let root = tempfile::tempdir().unwrap();
    let conf = root.path().join("etc/walt/server.conf");
    std::fs::create_dir_all(conf.parent().unwrap()).unwrap();
    let mine = "registries:\n-   label: hub\n    api: docker-hub\n    description: Mine\nvpn:\n    enabled: false\n";
    std::fs::write(&conf, mine).unwrap();
    let out = install(root.path(), &[]);
    let l = steps(&out);
    assert!(
        l[1].starts_with("ok: ") && l[1].contains("registries: hub"),
        "{out}"
    );
    assert_eq!(std::fs::read_to_string(&conf).unwrap(), mine);

    // An invalid one is reported, and kept.
    std::fs::write(&conf, "registries: 12\n").unwrap();
    let args = ["install", "--root", root.path().to_str().unwrap()];
    let out = setup(&args);
    out.assert_failure("install steps failed");
    assert!(
        out.stdout
            .lines()
            .any(|l| l.starts_with("error: ") && l.contains("server.conf")),
        "{out}"
    );
    assert_eq!(std::fs::read_to_string(&conf).unwrap(), "registries: 12\n");
}

/// What `install` wrote for the walt CLI: its completion scripts, as
/// `walt advanced dump-*-autocomplete` prints them, and man pages `man`
/// renders.
fn assert_completion_installed(root: &Path) {
    let walt = |args: &[&str]| {
        let out = Command::new(workspace_bin("walt"))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success(), "walt {args:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let read = |p: &str| std::fs::read_to_string(root.join(p)).unwrap();
    assert_eq!(
        read("usr/share/bash-completion/completions/walt"),
        walt(&["advanced", "dump-bash-autocomplete"])
    );
    assert_eq!(
        read("usr/local/share/zsh/site-functions/_walt"),
        walt(&["advanced", "dump-zsh-autocomplete"])
    );
    let man1 = root.join("usr/share/man/man1");
    for page in [
        "walt.1",
        "walt-image.1",
        "walt-image-clone.1",
        "walt-help-show.1",
    ] {
        let out = Command::new("man")
            .args(["-P", "cat", "-l"])
            .arg(man1.join(page))
            .env("MANWIDTH", "100")
            .stdin(Stdio::null())
            .output()
            .expect("man is needed (scripts/install-deps.sh installs it)");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success()
                && text.contains("NAME")
                && text.contains(page.trim_end_matches(".1")),
            "man -l {page}:\n{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
