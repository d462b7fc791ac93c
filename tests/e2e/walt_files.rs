//! Files shared with WalT: a client config WalT wrote (encoded passwords,
//! legacy `~/.waltrc` flat layout) and a server.conf WalT's editor wrote
//! (jfrog-artifactory entry, an api walt does not know, sections walt does
//! not interpret), loaded, used and written back.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::common::*;
use crate::registries::secure_env;
use walt_e2e::util::workspace_bin;
use walt_e2e::*;

/// WalT's header of `~/.walt/config` (`CONFIG_FILE_TOP_COMMENT`).
const WALT_TOP: &str = "
# WalT configuration file
# ***********************
# This file was automatically generated.
# You are allowed to edit the configuration values if needed.
# However, instead of changing a value, you should consider removing the
# related line instead. This would cause the walt client to prompt for this value
# again, your new entry would pass an appropriate validity check, and this file
# would be generated again accordingly.

";

/// `SECURE_PASS` ("s3cret-pass") as WalT's `encode()` stores it: hex of the
/// password XORed with "RAND0M STRING T0 HIDE A PASSW0RD".
const SECURE_PASS_ENCODED: &str = "21722d3655390d2335213a";

/// WalT's `decode()` and YAML loading (client/walt/client/config.py), on the
/// file `argv[1]`: prints `label password` per registry.
const WALT_DECODE_PY: &str = r#"
import sys, yaml
KEY = b"RAND0M STRING T0 HIDE A PASSW0RD"
def xor(password):
    key = (len(password) // len(KEY) + 1) * KEY
    return bytes(a ^ b for a, b in zip(key, password))
def decode(coded_value):
    return xor(bytes.fromhex(coded_value)).decode("UTF-8")
conf = yaml.safe_load(open(sys.argv[1]).read())
for label in sorted(conf["registries"]):
    print(label, decode(conf["registries"][label]["password"]))
"#;

/// What WalT's decoder reads from the client config at `path`.
fn walt_decodes(path: &Path) -> String {
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(WALT_DECODE_PY)
        .arg(path)
        .output()
        .expect("python3 with PyYAML is needed to run WalT's decoder");
    assert!(
        out.status.success(),
        "WalT's decoder failed on {}:\n{}\n{}",
        path.display(),
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(path).unwrap_or_default()
    );
    String::from_utf8(out.stdout).unwrap()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn walt_written_client_config_with_an_encoded_password_clones_and_searches() {
    let (env, _img) = secure_env(EnvOpts {
        alice_without_credentials: true,
        ..Default::default()
    });
    // The walt: group as the harness writes it (the server and its pin),
    // then registries as WalT writes them.
    env.alice.set_credentials(&[]).unwrap();
    let path = env.alice.config_path();
    let walt_group = std::fs::read_to_string(&path).unwrap();
    let text = format!(
        "{WALT_TOP}\n# WalT platform\n# -------------\n{walt_group}\n\
         # Credentials for container registries\n\
         # ------------------------------------\n\
         registries:\n    # Credentials for registry \"secure\"\n    secure:\n        \
         username: {SECURE_USER}\n        # (password value is encoded.)\n        \
         password: {SECURE_PASS_ENCODED}\n\n"
    );
    std::fs::write(&path, &text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(walt_decodes(&path), format!("secure {SECURE_PASS}\n"));

    // Used: the decoded password opens the basic-auth registry.
    let out = env.alice.clone_ok(&["secure:walter/busybox"]);
    assert_cloned(&out, "busybox");
    let out = env.alice.run(&["image", "search", "busybox"]);
    out.assert_success();
    assert!(out.stdout.contains("walter/busybox"), "{out}");
    assert!(!out.stderr.contains("secure"), "{out}");

    // Written back by walt (forget and re-pin the server's certificate):
    // still WalT's form, which WalT's decoder reads, and walt again.
    env.alice
        .run(&["advanced", "forget-server"])
        .assert_success();
    env.alice.run(&["image", "show"]).assert_success();
    let again = std::fs::read_to_string(&path).unwrap();
    assert_ne!(again, text, "the file was not written back");
    assert!(
        again.contains(&format!(
            "# (password value is encoded.)\n        password: {SECURE_PASS_ENCODED}\n"
        )),
        "{again}"
    );
    assert!(!again.contains(SECURE_PASS), "{again}");
    assert_eq!(walt_decodes(&path), format!("secure {SECURE_PASS}\n"));
    assert_eq!(mode(&path), 0o600);
    env.alice.clone_ok(&["--force", "secure:walter/busybox"]);
}

#[test]
fn legacy_waltrc_is_moved_and_rewritten_as_walt_does() {
    let env = Env::start();
    let home = tempfile::tempdir().unwrap();
    let legacy = home.path().join(".waltrc");
    // WalT's flat layout: server, username, and the (encoded) hub password.
    std::fs::write(
        &legacy,
        format!(
            "server: {}\nusername: alice\npassword: {SECURE_PASS_ENCODED}\n",
            env.server.addr()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&legacy, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = std::process::Command::new(workspace_bin("walt"))
        .args(["image", "show"])
        .env_remove("WALT_CONFIG")
        .env("HOME", home.path())
        .env("NO_COLOR", "1")
        .env_remove("TERM")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let path = home.path().join(".walt/config");
    assert!(!legacy.exists());
    assert_eq!(mode(&path), 0o600);
    let text = std::fs::read_to_string(&path).unwrap();
    // Groups rewritten: walt.server, walt.username, registries.hub (the
    // username is also the hub's, as WalT migrates it).
    assert!(
        text.contains(&format!(
            "\nwalt:\n    # IP or hostname of WalT server\n    server: {}\n    # WalT user name used to identify your work\n    username: alice\n",
            env.server.addr()
        )),
        "{text}"
    );
    assert!(
        text.contains(
            "\nregistries:\n    # Docker Hub credentials\n    hub:\n        username: alice\n"
        ),
        "{text}"
    );
    assert!(!text.starts_with("server:"), "{text}");
    assert_eq!(walt_decodes(&path), format!("hub {SECURE_PASS}\n"));
}

/// A server.conf as WalT's `walt-server-setup --edit-conf` writes it.
fn walt_server_conf(env: &Env) -> String {
    format!(
        "
# WalT server configuration file.
# Run 'walt-server-setup --edit-conf' to update.

# network configuration
# ---------------------
network:
    walt-net:
        raw-device: null
        ip: 192.168.212.1/24

# image registries
# ----------------
registries:
-   label: local
    api: docker-registry-v2
    description: Local registry
    host: 127.0.0.1
    port: {port}
    protocol: http
    auth: none
-   label: art
    api: jfrog-artifactory
    description: Local registry
    host: 127.0.0.1
    port: {port}
    protocol: http
    auth: none
    repository: walt-images
-   label: gl
    api: gitlab-container-registry
    description: Not known to walt
    host: gitlab.example.org
    port: 443
    protocol: https
    auth: basic

# VPN configuration
# -----------------
vpn:
    enabled: true
    ssh-entrypoint: vpn.example.org
    http-entrypoint: http://vpn.example.org
    boot-mode: nbfs
",
        port = env.local.port()
    )
}

#[test]
fn walt_written_server_conf_with_jfrog_and_unknown_api() {
    let env = Env::start();
    let img = env.busybox();
    // The JFrog repository's images, at <repository>/<name>.
    env.push_local("walt-images/busybox", "latest", &img);
    let conf = walt_server_conf(&env);
    let server = WaltServer::start_with_config(&conf).expect("walt-server refused WalT's file");
    server
        .wait_log(
            "registry 'gl' skipped: api 'gitlab-container-registry' is not supported",
            1,
        )
        .unwrap();
    let alice = server.cli("alice", &[]);

    // Clone through the jfrog entry: its repository is the user part.
    let out = alice.clone_ok(&["art:walt-images/busybox"]);
    assert_cloned(&out, "busybox");
    // Publish to it: under the repository, whatever the user (as WalT).
    alice
        .run(&["image", "duplicate", "busybox", "mine"])
        .assert_success();
    let out = alice.run(&["image", "publish", "--registry", "art", "mine"]);
    out.assert_success();
    assert!(
        out.last_stdout_line().contains("art:walt-images/mine"),
        "{out}"
    );
    env.local
        .client()
        .get_manifest("walt-images/mine", "latest")
        .expect("published under the JFrog repository");
    // The skipped entry: refused with its reason, nothing on stdout.
    let out = alice.clone(&["gl:alice/x"]);
    out.assert_failure("registry 'gl' skipped: api 'gitlab-container-registry' is not supported");
    assert!(out.stdout.is_empty(), "{out}");
    // Search: one warning line for it.
    let out = alice.run(&["image", "search", "nothing-matches-this"]);
    assert_eq!(
        out.stderr.matches("registry 'gl' skipped").count(),
        1,
        "{out}"
    );

    // walt-server-setup accepts it and writes it back: every entry kept,
    // the vpn section in its own key order.
    let check = server.setup(&["--check"]);
    check.assert_success();
    assert!(check.stdout.contains("art: jfrog-artifactory"), "{check}");
    server
        .setup(&["registry", "remove", "local"])
        .assert_success();
    let saved = std::fs::read_to_string(server.config_path()).unwrap();
    assert!(!saved.contains("label: local"), "{saved}");
    assert!(
        saved.contains("api: jfrog-artifactory") && saved.contains("repository: walt-images"),
        "{saved}"
    );
    assert!(saved.contains("api: gitlab-container-registry"), "{saved}");
    let vpn = saved.split("vpn:\n").nth(1).expect("vpn section kept");
    let keys: Vec<&str> = vpn
        .lines()
        .take(4)
        .map(|l| l.trim().split(':').next().unwrap())
        .collect();
    assert_eq!(
        keys,
        ["enabled", "ssh-entrypoint", "http-entrypoint", "boot-mode"],
        "{saved}"
    );
}
