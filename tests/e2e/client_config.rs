//! The client configuration: asked for on first use on a terminal, a clear
//! error without one.

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use walt_e2e::util::{wait_for, workspace_bin};
use walt_e2e::*;

/// A detached tmux session, killed on drop.
struct Tmux(String);

impl Tmux {
    fn start(name: &str, command: &str) -> Self {
        let status = Command::new("tmux")
            .args([
                "new-session",
                "-d",
                "-s",
                name,
                "-x",
                "150",
                "-y",
                "30",
                command,
            ])
            .status()
            .expect("tmux must be installed (scripts/install-deps.sh)");
        assert!(status.success(), "tmux new-session failed");
        Tmux(name.to_string())
    }

    fn screen(&self) -> String {
        let out = Command::new("tmux")
            .args(["capture-pane", "-p", "-t", &self.0])
            .output()
            .expect("tmux capture-pane");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn wait_for_text(&self, text: &str) {
        wait_for(
            &format!("`{text}` on the terminal"),
            Duration::from_secs(30),
            || self.screen().contains(text).then_some(()),
        )
        .unwrap_or_else(|e| panic!("{e}\nscreen:\n{}", self.screen()));
    }

    fn type_line(&self, line: &str) {
        let ok = Command::new("tmux")
            .args(["send-keys", "-t", &self.0, "-l", line])
            .status()
            .expect("tmux send-keys")
            .success()
            && Command::new("tmux")
                .args(["send-keys", "-t", &self.0, "Enter"])
                .status()
                .expect("tmux send-keys")
                .success();
        assert!(ok, "tmux send-keys failed");
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["kill-session", "-t", &self.0])
            .stderr(Stdio::null())
            .status();
    }
}

#[test]
fn first_use_on_a_terminal_asks_and_saves_the_config() {
    let env = Env::start();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("sub").join("config");
    let done = dir.path().join("done");
    let command = format!(
        "env WALT_CONFIG={} {} image show; echo \"exit=$?\" > {}; sleep 30",
        config.display(),
        workspace_bin("walt").display(),
        done.display()
    );
    let tmux = Tmux::start(&format!("walt-e2e-{}", std::process::id()), &command);
    tmux.wait_for_text("walt server:");
    tmux.type_line(&env.server.addr());
    tmux.wait_for_text("username:");
    tmux.type_line("Not Valid");
    tmux.wait_for_text("lowercase");
    tmux.type_line("carol");
    wait_for("the command to finish", Duration::from_secs(30), || {
        std::fs::read_to_string(&done).ok()
    })
    .unwrap();
    let screen = tmux.screen();
    assert_eq!(
        std::fs::read_to_string(&done).unwrap().trim(),
        "exit=0",
        "screen:\n{screen}"
    );
    assert!(screen.contains("no images"), "screen:\n{screen}");
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(
        text.contains(&format!("server: {}", env.server.addr())),
        "{text}"
    );
    assert!(text.contains("username: carol"), "{text}");
    let mode = std::fs::metadata(&config).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the client config may hold passwords");
}

#[test]
fn without_a_terminal_a_missing_config_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config");
    let out = show_without_terminal(&config);
    out.assert_failure("missing walt.server and walt.username");
    assert!(
        !config.exists(),
        "nothing must be written without a terminal"
    );

    std::fs::write(&config, "walt:\n    server: 127.0.0.1:1\n").unwrap();
    let out = show_without_terminal(&config);
    out.assert_failure("walt.username");
}

fn show_without_terminal(config: &std::path::Path) -> CmdOutput {
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
