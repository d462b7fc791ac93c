//! `walt-server-setup` on the configuration of a running server, and reloads.

use std::time::Duration;

use crate::common::*;
use walt_e2e::tmux::Tmux;
use walt_e2e::util::wait_for;
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
    t.erase(4).unwrap();
    t.text("newlabel").unwrap();
    t.keys(&["Enter"]).unwrap();
    t.wait_prompt("Description:").unwrap();
    t.text("Added in tmux").unwrap();
    t.keys(&["Enter"]).unwrap();
    t.wait_prompt("Host:").unwrap();
    t.text("localhost").unwrap();
    t.keys(&["Enter"]).unwrap();
    t.wait_prompt("Port: 443").unwrap();
    t.erase(3).unwrap();
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

// ---- `--edit-conf` driven in tmux -------------------------------------------

/// `walt-server-setup --edit-conf` on `config` in a tmux pane, telling the
/// server at `server`; the pane prints `EXIT=<code>` when it ends.
fn editor_on(config: &std::path::Path, server: &str) -> Tmux {
    let cmd = format!(
        "'{}' --edit-conf --config '{}' --server {server}; echo EXIT=$?; sleep 600",
        walt_e2e::util::workspace_bin("walt-server-setup").display(),
        config.display(),
    );
    Tmux::start(&cmd).unwrap()
}

/// The editor on `env`'s server configuration, network settings kept, at
/// the registry menu.
fn editor(env: &Env) -> Tmux {
    let t = editor_on(&env.server.config_path(), &env.server.addr());
    keep_network(&t);
    t
}

/// Accepts both network prompts as they are and waits for the menu.
fn keep_network(t: &Tmux) {
    t.wait_prompt("walt-net raw device").unwrap();
    t.keys(&["Enter"]).unwrap();
    t.wait_prompt("walt-net IP address").unwrap();
    t.keys(&["Enter"]).unwrap();
    t.wait_prompt("What do you want to do?").unwrap();
}

/// The rows of the last registry table printed (up to its blank line).
fn last_table(screen: &str) -> Vec<String> {
    let lines: Vec<&str> = screen.lines().collect();
    let Some(start) = lines.iter().rposition(|l| l.starts_with("LABEL ")) else {
        return vec![];
    };
    lines[start + 1..]
        .iter()
        .take_while(|l| !l.trim().is_empty())
        .map(|l| l.trim_end().to_string())
        .collect()
}

/// Waits until the last registry table satisfies `f` and the menu below it
/// is shown.
fn wait_table(t: &Tmux, what: &str, f: impl Fn(&[String]) -> bool) {
    wait_for(what, Duration::from_secs(20), || {
        let screen = t.screen();
        let menu = screen
            .rsplit("\nLABEL ")
            .next()
            .is_some_and(|s| s.contains("\n? What do you want to do?"));
        (menu && f(&last_table(&screen))).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\nscreen:\n{}", t.screen()));
}

fn has_row(rows: &[String], label: &str) -> bool {
    rows.iter().any(|r| r.starts_with(&format!("{label} ")))
}

/// Waits for the editor to end and checks its exit code; returns the screen.
fn wait_exit(t: &Tmux, code: i32) -> String {
    t.wait_line("editor exit", |l| l.starts_with("EXIT="))
        .unwrap();
    let screen = t.screen();
    assert!(
        screen
            .lines()
            .any(|l| l.trim_end() == format!("EXIT={code}")),
        "{screen}"
    );
    screen
}

/// Types `value` + Enter at the active prompt `prompt`, waits for `message`,
/// checks the prompt still asks (with `value` in it), then erases `value`.
#[track_caller]
fn refused(t: &Tmux, prompt: &str, value: &str, message: &str) {
    t.enter(value).unwrap();
    t.wait_line(&format!("`{message}` for `{value}`"), |l| {
        l.contains(message)
    })
    .unwrap();
    let asking = format!("? {prompt} {value}");
    let screen = t.screen();
    assert!(
        screen.lines().any(|l| l.trim_end() == asking.trim_end()),
        "the editor should still ask `{prompt}` after `{value}`:\n{screen}"
    );
    t.erase(value.chars().count()).unwrap();
}

fn file_text(env: &Env) -> String {
    std::fs::read_to_string(env.server.config_path()).unwrap()
}

fn bak_path(env: &Env) -> std::path::PathBuf {
    env.server.config_path().with_extension("conf.bak")
}

#[test]
fn edit_conf_refuses_each_bad_value_with_its_message() {
    let env = Env::start();
    let port = env.local.port();
    let t = editor(&env);
    t.select("Connect a new registry").unwrap();
    t.wait_prompt("Label:").unwrap();
    for (bad, message) in [
        (
            "Extra",
            "label 'Extra': use only lowercase letters, digits and '-'",
        ),
        (
            "my_reg",
            "label 'my_reg': use only lowercase letters, digits and '-'",
        ),
        ("hub", "label 'hub' is reserved (hub, walt, docker)"),
        ("docker", "label 'docker' is reserved (hub, walt, docker)"),
        ("local", "label 'local' is already used by another registry"),
    ] {
        refused(&t, "Label:", bad, message);
    }
    t.enter("").unwrap();
    t.wait_line("empty label", |l| l.contains("the label must not be empty"))
        .unwrap();
    t.enter("extra").unwrap();

    t.wait_prompt("Description:").unwrap();
    let long = "A description of thirty-six chars!!!";
    assert_eq!(long.chars().count(), 36);
    refused(
        &t,
        "Description:",
        long,
        "the description is too long (36 characters, at most 35)",
    );
    t.enter("   ").unwrap();
    t.wait_line("empty description", |l| {
        l.contains("the description must not be empty")
    })
    .unwrap();
    t.erase(3).unwrap();
    // 35 characters: accepted.
    t.enter("Exactly thirty-five characters long").unwrap();

    t.wait_prompt("Host:").unwrap();
    refused(
        &t,
        "Host:",
        "nowhere.invalid",
        "host 'nowhere.invalid' does not resolve",
    );
    t.enter("127.0.0.1").unwrap();

    t.wait_prompt("Port: 443").unwrap();
    t.erase(3).unwrap();
    for (bad, message) in [
        (
            "80a".to_string(),
            "port '80a' is not an integer between 1 and 65535".to_string(),
        ),
        (
            "5000.5".to_string(),
            "port '5000.5' is not an integer between 1 and 65535".to_string(),
        ),
        (
            "70000".to_string(),
            "port '70000' is not an integer between 1 and 65535".to_string(),
        ),
        (
            port.to_string(),
            format!("registry 'local' already uses 127.0.0.1:{port}"),
        ),
    ] {
        refused(&t, "Port:", &bad, &message);
    }
    let new_port = if port == 5999 { 5998 } else { 5999 };
    t.enter(&new_port.to_string()).unwrap();
    t.wait_prompt("Protocol:").unwrap();
    t.select("https-no-verify").unwrap();
    t.wait_prompt("Authentication:").unwrap();
    t.select("basic").unwrap();

    wait_table(&t, "the new registry row", |rows| has_row(rows, "extra"));
    let screen = t.screen();
    let rows = last_table(&screen);
    let row = rows.iter().find(|r| r.starts_with("extra ")).unwrap();
    assert!(
        row.contains("docker-registry-v2")
            && row.contains("Exactly thirty-five characters long")
            && row.ends_with(&format!(
                "host=127.0.0.1 port={new_port} protocol=https-no-verify auth=basic"
            )),
        "{screen}"
    );
    t.wait_line("status OK", |l| l == "Status: OK").unwrap();
    t.select("Validate and quit").unwrap();
    let screen = wait_exit(&t, 0);
    assert!(screen.contains("registries: local, extra"), "{screen}");
    let text = file_text(&env);
    assert!(
        text.contains(&format!(
            "- label: extra\n  api: docker-registry-v2\n  description: Exactly thirty-five characters long\n  host: \"127.0.0.1\"\n  port: {new_port}\n  protocol: https-no-verify\n  auth: basic\n"
        )),
        "{text}"
    );
    let out = env.server.setup(&["--check"]);
    out.assert_success();
    assert!(out.stdout.contains("extra: docker-registry-v2"), "{out}");
}

#[test]
fn edit_conf_disables_and_reenables_the_hub() {
    let env = Env::start();
    // The environment's file has no hub entry: the hub is disabled.
    assert!(!file_text(&env).contains("docker-hub"));
    let t = editor(&env);
    wait_table(&t, "table without the hub", |rows| {
        has_row(rows, "local") && !has_row(rows, "hub")
    });
    t.select("Enable the Docker Hub").unwrap();
    wait_table(&t, "hub row", |rows| {
        rows.first()
            .is_some_and(|r| r.starts_with("hub ") && r.contains("docker-hub"))
    });
    t.select("Disable the Docker Hub").unwrap();
    wait_table(&t, "hub row gone", |rows| {
        !has_row(rows, "hub") && has_row(rows, "local")
    });
    t.select("Enable the Docker Hub").unwrap();
    wait_table(&t, "hub row again", |rows| has_row(rows, "hub"));
    t.select("Validate and quit").unwrap();
    let screen = wait_exit(&t, 0);
    assert!(screen.contains("(registries: hub, local)"), "{screen}");
    // Enabled: the hub entry, first.
    let text = file_text(&env);
    let hub = "registries:\n- label: hub\n  api: docker-hub\n  description: Public registry at hub.docker.com\n- label: local\n";
    assert!(text.contains(hub), "{text}");
    let out = env.server.setup(&["--check"]);
    out.assert_success();
    assert!(out.stdout.contains("hub: docker-hub"), "{out}");
    drop(t);

    // Disabled: no docker-hub entry left, the rest unchanged.
    let t = editor(&env);
    wait_table(&t, "table with the hub", |rows| has_row(rows, "hub"));
    t.select("Disable the Docker Hub").unwrap();
    wait_table(&t, "hub row gone", |rows| !has_row(rows, "hub"));
    t.select("Validate and quit").unwrap();
    let screen = wait_exit(&t, 0);
    assert!(screen.contains("(registries: local)"), "{screen}");
    let after = file_text(&env);
    assert!(!after.contains("docker-hub"), "{after}");
    assert_eq!(text.replace(hub, "registries:\n- label: local\n"), after);
    let out = env.server.setup(&["--check"]);
    out.assert_success();
    assert!(!out.stdout.contains("hub"), "{out}");
}

#[test]
fn edit_conf_discard_and_interrupt_leave_the_file_untouched() {
    let env = Env::start();
    let before = std::fs::read(env.server.config_path()).unwrap();
    assert!(!bak_path(&env).exists());

    let t = editor_on(&env.server.config_path(), &env.server.addr());
    // Changes everywhere: network, hub, a registry removed.
    t.wait_prompt("walt-net raw device").unwrap();
    t.enter("eth9").unwrap();
    t.wait_prompt("walt-net IP address").unwrap();
    t.enter("10.9.0.1/24").unwrap();
    t.wait_prompt("What do you want to do?").unwrap();
    t.select("Enable the Docker Hub").unwrap();
    wait_table(&t, "hub row", |rows| has_row(rows, "hub"));
    t.select("Remove a registry").unwrap();
    t.wait_prompt("Registry to remove:").unwrap();
    t.select("local").unwrap();
    wait_table(&t, "local row gone", |rows| !has_row(rows, "local"));
    // Discard asks first; `no` goes back to the menu.
    t.select("Discard changes and quit").unwrap();
    t.wait_prompt("Discard your changes?").unwrap();
    t.enter("n").unwrap();
    t.wait_line("discard declined", |l| {
        l.ends_with("Discard your changes? No")
    })
    .unwrap();
    wait_for("the menu again", Duration::from_secs(20), || {
        let s = t.screen();
        let after = s.rsplit("Discard your changes? No").next().unwrap_or("");
        after.contains("? What do you want to do?").then_some(())
    })
    .unwrap();
    t.select("Discard changes and quit").unwrap();
    t.wait_line("discard confirm again", |l| {
        l.starts_with("? Discard your changes?") && !l.contains("No")
    })
    .unwrap();
    t.enter("y").unwrap();
    let screen = wait_exit(&t, 0);
    assert!(
        screen.contains(&format!(
            "Changes discarded: {} is unchanged.",
            env.server.config_path().display()
        )),
        "{screen}"
    );
    assert_eq!(std::fs::read(env.server.config_path()).unwrap(), before);
    assert!(!bak_path(&env).exists());
    drop(t);

    // Ctrl-C at a prompt: nothing written either.
    let t = editor(&env);
    t.select("Connect a new registry").unwrap();
    t.wait_prompt("Label:").unwrap();
    t.text("half").unwrap();
    t.keys(&["C-c"]).unwrap();
    let screen = wait_exit(&t, 1);
    assert!(
        screen.contains("error: interrupted: nothing was written"),
        "{screen}"
    );
    assert_eq!(std::fs::read(env.server.config_path()).unwrap(), before);
    assert!(!bak_path(&env).exists());
    assert!(!env.server.log().contains("configuration reloaded"));
}

#[test]
fn edit_conf_new_registry_is_searched_by_the_running_server() {
    let mut env = Env::start();
    let pid = env.server.pid();
    // A registry the server does not know yet, with a walt image.
    let extra = Registry::start(RegistryOpts::plain()).unwrap();
    let layer = env
        .images
        .layer(
            Format::Oci,
            Compression::Gzip,
            &[RawEntry::file("marker", b"edited")],
        )
        .unwrap();
    let img = env
        .images
        .image(Format::Oci, ImageConfig::amd64("pc-x86-64"), &[layer])
        .unwrap();
    extra
        .client()
        .push_image("eve/edited", "latest", &img)
        .unwrap();
    let out = env.alice.run(&["image", "search"]);
    out.assert_success();
    assert!(!out.stdout.contains("eve/edited"), "{out}");

    let t = editor(&env);
    t.select("Connect a new registry").unwrap();
    t.wait_prompt("Label:").unwrap();
    t.enter("extra").unwrap();
    t.wait_prompt("Description:").unwrap();
    t.enter("Added while running").unwrap();
    t.wait_prompt("Host:").unwrap();
    t.enter("127.0.0.1").unwrap();
    t.wait_prompt("Port: 443").unwrap();
    t.erase(3).unwrap();
    t.enter(&extra.port().to_string()).unwrap();
    t.wait_prompt("Protocol:").unwrap();
    t.select("http").unwrap();
    t.wait_prompt("Authentication:").unwrap();
    t.select("none").unwrap();
    wait_table(&t, "extra row", |rows| has_row(rows, "extra"));
    t.wait_line("status OK", |l| l == "Status: OK").unwrap();
    t.select("Validate and quit").unwrap();
    let screen = wait_exit(&t, 0);
    assert!(
        screen.contains("walt-server reloaded its configuration (registries: local, extra)"),
        "{screen}"
    );

    // Same server process, new registry searched.
    let out = env.alice.run(&["image", "search"]);
    out.assert_success();
    let row = out
        .stdout
        .lines()
        .find(|l| l.contains("extra:eve/edited"))
        .unwrap_or_else(|| panic!("no extra:eve/edited in the search:\n{out}"));
    let cells = walt_e2e::store::table_cells(row);
    assert_eq!(
        cells,
        [
            "eve",
            "edited",
            "custom registry",
            "pc-x86-64",
            "extra:eve/edited"
        ],
        "{out}"
    );
    assert_eq!(env.server.pid(), pid);
    assert!(env.server.is_running());
}

/// A file as WalT writes it (PyYAML, 4-space indent), with the sections
/// walt does not use (walt-adm, vpn) and an unknown registry key.
fn walt_written_file(local_port: u16) -> String {
    format!(
        "# WalT server configuration file.
# Run 'walt-server-setup --edit-conf' to update.

# network configuration
# ---------------------
network:
    # platform network
    walt-net: {{ raw-device: null, ip: 192.168.152.1/22 }}
    # walt server external access
    walt-adm:
        raw-device: eth0
        ip: dhcp

# image registries
# ----------------
registries:
-   label: hub
    api: docker-hub
    description: Public registry at hub.docker.com
-   label: local
    api: docker-registry-v2
    description: Local registry
    host: 127.0.0.1
    port: {local_port}
    protocol: http          # https | http | https-no-verify
    auth: none              # basic | none
    mirror: false

# vpn
# ---
vpn:
    enabled: false
    ssh-entrypoint: null
    http-entrypoint: null
    boot-mode: tftp
"
    )
}

#[test]
fn edit_conf_loads_a_walt_written_file_and_saves_it_equal() {
    let local = Registry::start(RegistryOpts::plain()).unwrap();
    let original = walt_written_file(local.port());
    // The server loads it as it is.
    let server = WaltServer::start_with_config(&original).unwrap();
    let path = server.config_path();
    let check = server.setup(&["--check"]);
    check.assert_success();
    assert!(
        check.stdout.contains(&format!("{}: OK", path.display()))
            && check.stdout.contains("hub: docker-hub")
            && check.stdout.contains(&format!(
                "local: docker-registry-v2 http://127.0.0.1:{}",
                local.port()
            )),
        "{check}"
    );
    let list = server.setup(&["registry", "list"]);
    list.assert_success();

    // Open, change nothing, validate.
    let t = editor_on(&path, &server.addr());
    t.wait_prompt("walt-net raw device").unwrap();
    t.keys(&["Enter"]).unwrap();
    t.wait_prompt("walt-net IP address (CIDR, e.g. 192.168.212.1/24): 192.168.152.1/22")
        .unwrap();
    t.keys(&["Enter"]).unwrap();
    t.wait_prompt("What do you want to do?").unwrap();
    wait_table(&t, "hub and local", |rows| {
        rows.len() == 2 && rows[0].starts_with("hub ") && rows[1].starts_with("local ")
    });
    t.wait_line("status OK", |l| l == "Status: OK").unwrap();
    t.select("Validate and quit").unwrap();
    let screen = wait_exit(&t, 0);
    assert!(screen.contains("(registries: hub, local)"), "{screen}");
    drop(t);

    // The previous version is the backup, byte for byte.
    let bak = path.with_extension("conf.bak");
    assert_eq!(std::fs::read_to_string(&bak).unwrap(), original);
    // Everything is still there (comments aside), the sections walt does
    // not use included.
    let saved = std::fs::read_to_string(&path).unwrap();
    assert_eq!(
        saved,
        SAVED.replace("LOCAL_PORT", &local.port().to_string())
    );
    // Loaded again: the same configuration.
    let check2 = server.setup(&["--check"]);
    check2.assert_success();
    assert_eq!(check2.stdout, check.stdout);
    assert_eq!(server.setup(&["registry", "list"]).stdout, list.stdout);

    // load → save → load: a second round leaves the file as it is.
    let t = editor_on(&path, &server.addr());
    keep_network(&t);
    t.wait_line("status OK", |l| l == "Status: OK").unwrap();
    t.select("Validate and quit").unwrap();
    wait_exit(&t, 0);
    assert_eq!(std::fs::read_to_string(&path).unwrap(), saved);
    assert_eq!(std::fs::read_to_string(&bak).unwrap(), saved);

    // And the server still serves `local`.
    let images = ImageBuilder::new().unwrap();
    let img = images
        .busybox_image(Format::Oci, Compression::Gzip, "pc-x86-64")
        .unwrap();
    local
        .client()
        .push_image("walter/busybox", "latest", &img)
        .unwrap();
    let alice = server.cli("alice", &[]);
    let out = alice.clone_ok(&["local:walter/busybox"]);
    assert_cloned(&out, "busybox");
}

/// What the editor writes back for `walt_written_file`: the same values
/// (comments aside, keys in the order they were read).
const SAVED: &str = "# WalT server configuration file.
# Run 'walt-server-setup --edit-conf' to update.

network:
  walt-net:
    raw-device: null
    ip: 192.168.152.1/22
  walt-adm:
    raw-device: eth0
    ip: dhcp
registries:
- label: hub
  api: docker-hub
  description: Public registry at hub.docker.com
- label: local
  api: docker-registry-v2
  description: Local registry
  host: \"127.0.0.1\"
  port: LOCAL_PORT
  protocol: http
  auth: none
  mirror: false
vpn:
  enabled: false
  ssh-entrypoint: null
  http-entrypoint: null
  boot-mode: tftp
";
