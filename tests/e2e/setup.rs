//! `walt-server-setup` on the configuration of a running server, and reloads.

use crate::common::*;
use walt_e2e::*;

/// The `local` registry again, under another label (host `localhost`, so
/// host:port differs from `local`'s `127.0.0.1`).
fn add_newlabel(env: &Env, extra: &[&str]) -> CmdOutput {
    let port = env.local.port().to_string();
    let mut args = vec![
        "registry",
        "add",
        "--label",
        "newlabel",
        "--host",
        "localhost",
        "--port",
        &port,
        "--protocol",
        "http",
        "--auth",
        "none",
        "--description",
        "Local registry again",
    ];
    args.extend_from_slice(extra);
    env.server.setup(&args)
}

#[test]
fn registry_add_is_used_without_restart_via_reload_call() {
    let env = Env::start();
    push_busybox(&env, "walter/busybox", "latest");
    // Unknown label before.
    env.alice
        .clone(&["newlabel:walter/busybox"])
        .assert_failure("newlabel");
    let out = add_newlabel(&env, &[]);
    out.assert_success();
    assert!(
        out.stdout.contains("reloaded") && out.stdout.contains("newlabel"),
        "{out}"
    );
    let text = std::fs::read_to_string(env.server.config_path()).unwrap();
    assert!(
        text.starts_with(
            "# WalT server configuration file.\n# Run 'walt-server-setup --edit-conf' to update.\n"
        ),
        "{text}"
    );
    assert!(
        text.contains("label: local") && text.contains("label: newlabel"),
        "{text}"
    );
    let bak = env.server.config_path().with_extension("conf.bak");
    assert!(!std::fs::read_to_string(bak).unwrap().contains("newlabel"));
    let out = env.alice.clone_ok(&["newlabel:walter/busybox"]);
    assert_cloned(&out, "busybox");

    // list shows it; remove + reload makes it unknown again.
    let out = env.server.setup(&["registry", "list"]);
    out.assert_success();
    assert!(out.stdout.contains("newlabel"), "{out}");
    env.server
        .setup(&["registry", "remove", "newlabel"])
        .assert_success();
    env.alice
        .clone(&["newlabel:walter/busybox", "other"])
        .assert_failure("newlabel");
}

#[test]
fn registry_add_then_sighup() {
    let env = Env::start();
    push_busybox(&env, "walter/busybox", "v1");
    // The server is not told (wrong address): the file is still written.
    let out = add_newlabel(&env, &["--server", "127.0.0.1:1"]);
    out.assert_success();
    assert!(out.stdout.contains("next start"), "{out}");
    env.alice
        .clone(&["newlabel:walter/busybox:v1"])
        .assert_failure("newlabel");
    env.server.sighup();
    env.server.wait_log("configuration reloaded", 1).unwrap();
    let out = env.alice.clone_ok(&["newlabel:walter/busybox:v1"]);
    assert_cloned(&out, "busybox:v1");
}

#[test]
fn registry_add_refuses_bad_input() {
    let env = Env::start();
    let before = std::fs::read_to_string(env.server.config_path()).unwrap();
    let port = env.local.port().to_string();
    for (args, needle) in [
        (
            vec!["--label", "local", "--host", "localhost"],
            "already used",
        ),
        (
            vec!["--label", "Bad_Label", "--host", "localhost"],
            "lowercase",
        ),
        (vec!["--label", "walt", "--host", "localhost"], "reserved"),
        (
            vec!["--label", "x", "--host", "nowhere.invalid"],
            "does not resolve",
        ),
        (
            vec!["--label", "x", "--host", "127.0.0.1", "--port", &port],
            "already uses",
        ),
        (
            vec![
                "--label",
                "x",
                "--host",
                "localhost",
                "--description",
                "a description that is far too long to fit",
            ],
            "too long",
        ),
        (
            vec!["--label", "x", "--host", "localhost", "--protocol", "ftp"],
            "not one of",
        ),
    ] {
        let mut a = vec!["registry", "add"];
        a.extend(args);
        env.server.setup(&a).assert_failure(needle);
    }
    env.server
        .setup(&["registry", "remove", "nothere"])
        .assert_failure("no registry");
    assert_eq!(
        std::fs::read_to_string(env.server.config_path()).unwrap(),
        before
    );
}

#[test]
fn broken_file_on_reload_keeps_the_old_config() {
    let mut env = Env::start();
    push_busybox(&env, "walter/busybox", "latest");
    std::fs::write(
        env.server.config_path(),
        "registries:\n- {label: Bad, api: docker-registry-v2, host: h}\n",
    )
    .unwrap();
    // The reload call says why, naming the file and the key.
    let out = env.server.setup(&["reload"]);
    out.assert_failure("registries[0].label");
    assert!(out.stderr.contains("server.conf"), "{out}");
    // SIGHUP: refused and logged too.
    env.server.sighup();
    env.server
        .wait_log("configuration not reloaded", 2)
        .unwrap();
    assert!(env.server.is_running());
    // `local` still works.
    let out = env.alice.clone_ok(&["local:walter/busybox"]);
    assert_cloned(&out, "busybox");
    // Not even YAML.
    std::fs::write(env.server.config_path(), "registries: [\n").unwrap();
    env.server
        .setup(&["reload"])
        .assert_failure("not valid YAML");
    let out = env.alice.clone_ok(&["local:walter/busybox", "again"]);
    assert_cloned(&out, "again");
}

#[test]
fn edit_conf_refuses_without_a_terminal() {
    let env = Env::start();
    let before = std::fs::read_to_string(env.server.config_path()).unwrap();
    env.server
        .setup(&["--edit-conf"])
        .assert_failure("needs a terminal");
    assert_eq!(
        std::fs::read_to_string(env.server.config_path()).unwrap(),
        before
    );
}

#[test]
fn edit_conf_in_tmux_adds_a_registry() {
    let env = Env::start();
    push_busybox(&env, "walter/busybox", "latest");
    let cmd = format!(
        "'{}' --edit-conf --config '{}' --server {}; echo EXIT=$?; sleep 600",
        walt_e2e::util::workspace_bin("walt-server-setup").display(),
        env.server.config_path().display(),
        env.server.addr()
    );
    let t = walt_e2e::tmux::Tmux::start(&cmd).unwrap();
    // Network settings: keep them.
    t.wait_prompt("walt-net raw device").unwrap();
    t.keys(&["Enter"]).unwrap();
    t.wait_prompt("walt-net IP address").unwrap();
    t.keys(&["Enter"]).unwrap();
    // Registries: the table and the status line.
    t.wait_prompt("What do you want to do?").unwrap();
    let screen = t.screen();
    assert!(screen.contains("Status: OK"), "{screen}");
    assert!(
        screen
            .lines()
            .any(|l| l.starts_with("local ") && l.contains("docker-registry-v2")),
        "{screen}"
    );
    // Help, then Esc aborts a prompt and brings the menu back.
    t.select("Help").unwrap();
    t.wait_line("help text", |l| l.contains("one registry per host:port"))
        .unwrap();
    t.wait_prompt("What do you want to do?").unwrap();
    t.select("Connect a new registry").unwrap();
    t.wait_prompt("Label:").unwrap();
    t.text("aborted").unwrap();
    t.keys(&["Escape"]).unwrap();
    t.wait_prompt("What do you want to do?").unwrap();
    t.select("Connect a new registry").unwrap();
    t.wait_prompt("Label:").unwrap();
    // A reserved label is refused at the prompt; erase it and fix it.
    t.text("walt").unwrap();
    t.keys(&["Enter"]).unwrap();
    t.wait_line("label error", |l| l.contains("reserved"))
        .unwrap();
    t.keys(&["BSpace", "BSpace", "BSpace", "BSpace"]).unwrap();
    t.text("newlabel").unwrap();
    t.keys(&["Enter"]).unwrap();
    t.wait_prompt("Description:").unwrap();
    t.text("Added in tmux").unwrap();
    t.keys(&["Enter"]).unwrap();
    t.wait_prompt("Host:").unwrap();
    t.text("localhost").unwrap();
    t.keys(&["Enter"]).unwrap();
    t.wait_prompt("Port: 443").unwrap();
    t.keys(&["BSpace", "BSpace", "BSpace"]).unwrap();
    t.text(&env.local.port().to_string()).unwrap();
    t.keys(&["Enter"]).unwrap();
    t.wait_prompt("Protocol:").unwrap();
    t.select("http").unwrap();
    t.wait_prompt("Authentication:").unwrap();
    t.select("none").unwrap();
    t.wait_prompt("What do you want to do?").unwrap();
    t.wait_line("new registry row", |l| {
        l.starts_with("newlabel ") && l.contains("Added in tmux")
    })
    .unwrap();
    t.select("Validate and quit").unwrap();
    t.wait_line("exit", |l| l.starts_with("EXIT=")).unwrap();
    let screen = t.screen();
    assert!(screen.contains("EXIT=0"), "{screen}");
    assert!(screen.contains("reloaded"), "{screen}");

    let text = std::fs::read_to_string(env.server.config_path()).unwrap();
    let port = env.local.port();
    assert!(
        text.starts_with("# WalT server configuration file.\n"),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "- label: newlabel\n  api: docker-registry-v2\n  description: Added in tmux\n  host: localhost\n  port: {port}\n  protocol: http\n  auth: none\n"
        )),
        "{text}"
    );
    let out = env.alice.clone_ok(&["newlabel:walter/busybox"]);
    assert_cloned(&out, "busybox");
}
