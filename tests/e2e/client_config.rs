//! The client side of the user's settings: the config file asked for on
//! first use, and registry credentials asked for when a registry wants them.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::*;
use walt_e2e::tmux::Tmux;
use walt_e2e::util::{wait_for, workspace_bin};
use walt_e2e::*;

/// Runs `walt ARGS` in a terminal with this client config; the exit status
/// lands in `<dir>/exit` when it ends.
fn walt_in_terminal(config: &Path, dir: &Path, args: &str) -> Tmux {
    let command = format!(
        "env WALT_CONFIG={} HOME={} {} {args}; echo $? > {}/exit; sleep 60",
        config.display(),
        dir.display(),
        workspace_bin("walt").display(),
        dir.display()
    );
    Tmux::start(&command).unwrap()
}

fn exit_status(dir: &Path, tmux: &Tmux) -> i32 {
    tmux.exit_status(&dir.join("exit"), Duration::from_secs(60))
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn first_use_on_a_terminal_asks_and_saves_the_config() {
    let env = Env::start();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("sub").join("config");
    let tmux = walt_in_terminal(&config, dir.path(), "image show");
    tmux.wait_line("the server question", |l| l.contains("walt server:"))
        .unwrap();
    tmux.text(&env.server.addr()).unwrap();
    tmux.keys(&["Enter"]).unwrap();
    tmux.wait_line("the username question", |l| l.contains("username:"))
        .unwrap();
    tmux.text("Not Valid").unwrap();
    tmux.keys(&["Enter"]).unwrap();
    tmux.wait_line("the username rule", |l| l.contains("lowercase"))
        .unwrap();
    tmux.text("carol").unwrap();
    tmux.keys(&["Enter"]).unwrap();
    assert_eq!(
        exit_status(dir.path(), &tmux),
        0,
        "screen:\n{}",
        tmux.screen()
    );
    assert!(
        tmux.screen().contains("Your working set is empty."),
        "screen:\n{}",
        tmux.screen()
    );
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(
        text.contains(&format!("server: {}", env.server.addr())),
        "{text}"
    );
    assert!(text.contains("username: carol"), "{text}");
    assert_eq!(mode(&config), 0o600, "the client config may hold passwords");
}

#[test]
fn without_a_terminal_a_missing_config_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config");
    show_without_terminal(&config).assert_failure("missing walt.server and walt.username");
    assert!(
        !config.exists(),
        "nothing must be written without a terminal"
    );

    std::fs::write(&config, "walt:\n    server: 127.0.0.1:1\n").unwrap();
    show_without_terminal(&config).assert_failure("walt.username");
}

fn show_without_terminal(config: &Path) -> CmdOutput {
    let out = Command::new(workspace_bin("walt"))
        .args(["image", "show"])
        .env("WALT_CONFIG", config)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    CmdOutput {
        cmdline: "walt image show".into(),
        code: out.status.code(),
        success: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// carol has no credentials for `secure`: the clone asks for them (the
/// password not echoed), retries, and saves them once they worked.
#[test]
fn missing_credentials_are_asked_for_checked_and_saved() {
    let (env, _) = crate::registries::secure_env(EnvOpts::default());
    let carol = env.server.cli("carol", &[]);
    let dir = tempfile::tempdir().unwrap();
    let tmux = walt_in_terminal(
        &carol.config_path(),
        dir.path(),
        "image clone secure:walter/busybox",
    );
    answer_username(&tmux);
    tmux.secret(SECURE_PASS).unwrap();
    tmux.keys(&["Enter"]).unwrap();
    assert_eq!(
        exit_status(dir.path(), &tmux),
        0,
        "screen:\n{}",
        tmux.screen()
    );
    let screen = tmux.screen();
    assert!(
        !screen.contains(SECURE_PASS),
        "the password was echoed:\n{screen}"
    );
    assert!(screen.contains("saved"), "screen:\n{screen}");
    assert!(carol.show_row("busybox").is_some());
    // Saved as WalT saves it: encoded (hex of the password XORed with
    // WalT's key), never in clear.
    let text = std::fs::read_to_string(carol.config_path()).unwrap();
    assert!(
        text.contains("# (password value is encoded.)\n        password: 21722d3655390d2335213a\n")
            && !text.contains(SECURE_PASS)
            && text.contains(SECURE_USER),
        "{text}"
    );
    assert_eq!(mode(&carol.config_path()), 0o600);
    // Saved: the next call needs no question (and works without a terminal).
    assert_cloned(
        &carol.clone_ok(&["--force", "secure:walter/busybox"]),
        "busybox",
    );
}

/// A wrong password: one clear error, nothing saved, nothing cloned.
#[test]
fn rejected_credentials_are_not_saved() {
    let (env, _) = crate::registries::secure_env(EnvOpts::default());
    let carol = env.server.cli("carol", &[]);
    let before = std::fs::read_to_string(carol.config_path()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let tmux = walt_in_terminal(
        &carol.config_path(),
        dir.path(),
        "image clone secure:walter/busybox",
    );
    answer_username(&tmux);
    tmux.secret("not-the-password").unwrap();
    tmux.keys(&["Enter"]).unwrap();
    assert_ne!(exit_status(dir.path(), &tmux), 0);
    let screen = tmux.screen();
    assert!(
        screen.contains("error: ") && screen.contains("authentication failed"),
        "{screen}"
    );
    assert_eq!(
        std::fs::read_to_string(carol.config_path()).unwrap(),
        before
    );
    assert!(carol.show_row("busybox").is_none());
}

/// Ctrl-C at the hidden password prompt: walt ends as killed by SIGINT, as
/// before, and leaves the terminal exactly as it found it (echo and
/// canonical mode back on), not without echo.
#[test]
fn ctrl_c_at_the_password_prompt_restores_the_terminal() {
    let (env, _) = crate::registries::secure_env(EnvOpts::default());
    let carol = env.server.cli("carol", &[]);
    let config_before = std::fs::read_to_string(carol.config_path()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    // The trap keeps `sh` (in walt's process group, which gets the SIGINT)
    // alive to report; it is reset to the default in walt at exec.
    let command = format!(
        "trap : INT; stty -a > {d}/before; env WALT_CONFIG={} HOME={d} {} image clone secure:walter/busybox; echo $? > {d}/exit; stty -a > {d}/after.tmp; mv {d}/after.tmp {d}/after; sleep 60",
        carol.config_path().display(),
        workspace_bin("walt").display(),
    );
    let tmux = Tmux::start(&command).unwrap();
    answer_username(&tmux);
    tmux.secret("half-typed").unwrap();
    tmux.keys(&["C-c"]).unwrap();
    assert_eq!(
        exit_status(dir.path(), &tmux),
        130,
        "killed by SIGINT; screen:\n{}",
        tmux.screen()
    );
    let after = wait_for("stty -a after walt", Duration::from_secs(20), || {
        std::fs::read_to_string(dir.path().join("after")).ok()
    })
    .unwrap();
    let settings: Vec<&str> = after.split_whitespace().collect();
    for on in ["echo", "icanon", "isig"] {
        assert!(
            settings.contains(&on) && !settings.contains(&format!("-{on}").as_str()),
            "{on} is off after Ctrl-C:\n{after}"
        );
    }
    let before = std::fs::read_to_string(dir.path().join("before")).unwrap();
    assert_eq!(after, before, "the terminal settings changed");
    let screen = tmux.screen();
    assert!(
        !screen.contains("half-typed"),
        "the password was echoed:\n{screen}"
    );
    assert_eq!(
        std::fs::read_to_string(carol.config_path()).unwrap(),
        config_before,
        "nothing saved"
    );
}

/// Answers walt's username question for registry `secure` and waits for
/// the (hidden) password question.
fn answer_username(tmux: &Tmux) {
    tmux.wait_line("the username question", |l| {
        l.contains("Username for registry 'secure'")
    })
    .unwrap();
    tmux.text(SECURE_USER).unwrap();
    tmux.keys(&["Enter"]).unwrap();
    tmux.wait_line("the password question", |l| l.contains("Password for"))
        .unwrap();
}
