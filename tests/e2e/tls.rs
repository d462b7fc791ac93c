//! The API channel is encrypted: the server's certificate is created at
//! its first start (and by install), pinned by the CLI on first use and
//! required afterwards; plaintext needs both sides to opt in; credentials
//! never cross the network in clear (checked on a capture of the traffic).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::common::*;
use walt_e2e::image::{Compression, Format, ImageBuilder};
use walt_e2e::util::{free_port, port_open, wait_for, workspace_bin};
use walt_e2e::walt::{Pin, pem_fingerprint, wait_output};
use walt_e2e::*;

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

fn config_text(w: &Walt) -> String {
    std::fs::read_to_string(w.config_path()).unwrap()
}

/// A client whose config names the server and the user only (no pin).
fn unpinned(server: &WaltServer, user: &str) -> Walt {
    Walt::new(&server.addr(), user, &[]).unwrap()
}

#[test]
fn first_use_pins_the_certificate_and_says_so_once() {
    let server = WaltServer::start(&[]).unwrap();
    let fp = server
        .fingerprint()
        .expect("a TLS server has a certificate");
    assert_eq!(mode(&server.tls_dir().join("key.pem")), 0o600);
    assert_eq!(mode(&server.tls_dir().join("cert.pem")), 0o644);
    assert!(
        server.log().contains(&fp),
        "the server log names its fingerprint:\n{}",
        server.log()
    );
    let carol = unpinned(&server, "carol");
    let out = carol.run(&["image", "show"]);
    out.assert_success();
    let notices: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.contains("pinned in"))
        .collect();
    assert_eq!(notices.len(), 1, "{out}");
    assert!(
        notices[0].contains(&server.addr()) && notices[0].contains(&fp),
        "{out}"
    );
    let text = config_text(&carol);
    assert!(text.contains(&fp), "the fingerprint is pinned:\n{text}");
    assert!(text.contains("server-fingerprints"), "{text}");
    assert_eq!(mode(&carol.config_path()), 0o600);
    // Pinned: no notice any more, and the file is left as it is.
    let out = carol.run(&["image", "show"]);
    out.assert_success();
    assert!(!out.stderr.contains("pinned"), "{out}");
    assert_eq!(config_text(&carol), text);
}

#[test]
fn a_changed_certificate_is_refused_until_accepted() {
    let env = Env::start();
    push_busybox(&env, "walt-test/busybox", "latest");
    assert_cloned(&env.alice.clone_ok(&["local:walt-test/busybox"]), "busybox");
    let old = env.server.fingerprint().unwrap();
    let mut server = env.server;
    // A new key and certificate: the server creates them at its next start.
    server.stop();
    std::fs::remove_dir_all(server.tls_dir()).unwrap();
    server.restart().unwrap();
    let new = server.fingerprint().unwrap();
    assert_ne!(old, new);

    let config_before = config_text(&env.alice);
    let out = env.alice.run(&["image", "remove", "busybox"]);
    out.assert_failure("walt advanced forget-server");
    let line = out.error_lines()[0];
    assert!(
        line.contains(&new) && line.contains(&old) && line.contains("refusing"),
        "{out}"
    );
    assert!(out.stdout.is_empty(), "{out}");
    assert_eq!(config_text(&env.alice), config_before, "nothing pinned");

    // Accepting: forget the pin, the next command pins the new certificate.
    let out = env.alice.run(&["advanced", "forget-server"]);
    out.assert_success();
    assert!(!config_text(&env.alice).contains(&old));
    let out = env.alice.run(&["image", "show", "--names-only"]);
    out.assert_success();
    assert!(
        out.stderr.contains("pinned in") && out.stderr.contains(&new),
        "{out}"
    );
    // The refused remove never reached the server.
    assert_eq!(out.stdout.trim(), "busybox", "{out}");
    assert!(config_text(&env.alice).contains(&new));
}

#[test]
fn plaintext_needs_both_sides_to_opt_in() {
    let server = WaltServer::start_plaintext(&[]).unwrap();
    assert!(!server.tls_dir().exists(), "no TLS files for --plaintext");
    assert!(server.log().contains("IN CLEAR"), "{}", server.log());
    let carol = unpinned(&server, "carol");
    let before = config_text(&carol);
    let out = carol.run(&["image", "show"]);
    out.assert_failure("over TLS");
    assert!(
        out.stderr.contains("--plaintext") && out.stderr.contains("plaintext: true"),
        "the error says how to opt in:\n{out}"
    );
    assert_eq!(config_text(&carol), before, "nothing pinned");
    // Opted in (the harness writes `plaintext: true`): it works.
    let alice = server.cli("alice", &[]);
    assert_eq!(alice.pin, Pin::Plaintext);
    assert!(config_text(&alice).contains("plaintext: true"));
    alice.run(&["image", "show"]).assert_success();

    // The other way round: a client opted in to plaintext does not get
    // through to a TLS server either.
    let tls_server = WaltServer::start(&[]).unwrap();
    let mut dave = unpinned(&tls_server, "dave");
    dave.pin = Pin::Plaintext;
    dave.set_credentials(&[]).unwrap();
    dave.run(&["image", "show"]).assert_failure("walt server");
}

/// tcpdump on the loopback, on the server's port only, writing packets as
/// they come.
struct Capture {
    child: Child,
    file: PathBuf,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Capture {
    fn start(port: u16) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("lo.pcap");
        let stderr = dir.path().join("tcpdump.err");
        let child = Command::new("tcpdump")
            .args(["-i", "lo", "--immediate-mode", "-U", "-s", "0", "-n", "-w"])
            .arg(&file)
            .arg(format!("tcp port {port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("cannot run tcpdump (scripts/install-deps.sh installs it)");
        let mut c = Self {
            child,
            file,
            port,
            _dir: dir,
        };
        // tcpdump says "listening on lo" once its filter is in place.
        let ready = wait_for("tcpdump to listen", Duration::from_secs(20), || {
            if let Ok(Some(st)) = c.child.try_wait() {
                panic!(
                    "tcpdump exited ({st}): {}",
                    std::fs::read_to_string(&stderr).unwrap_or_default()
                );
            }
            std::fs::read_to_string(&stderr)
                .ok()
                .filter(|s| s.contains("listening on"))
        });
        if let Err(e) = ready {
            let _ = c.child.kill();
            panic!("{e}");
        }
        c
    }

    /// Stops the capture and returns the captured bytes. First sends a
    /// marker to the port and waits for it in the file: packets are
    /// captured in order, so everything before it is in the file too.
    fn finish(mut self) -> Vec<u8> {
        use std::io::Write;
        let marker = format!("walt-capture-end-{}", std::process::id());
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.write_all(marker.as_bytes()).unwrap();
        let file = self.file.clone();
        let seen = wait_for(
            "the end marker in the capture",
            Duration::from_secs(20),
            || {
                std::fs::read(&file)
                    .ok()
                    .filter(|d| contains(d, marker.as_bytes()))
            },
        );
        drop(s);
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGINT);
        }
        let _ = self.child.wait();
        seen.unwrap()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        // A test that failed before finish() must not leave tcpdump running.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Clones from and publishes to the basic-auth registry `secure` (the CLI
/// sending its credentials to the server) while the loopback traffic on
/// the server's port is captured; returns the capture.
fn capture_clone_and_publish(plaintext: bool) -> Vec<u8> {
    let local = Registry::start(RegistryOpts::plain()).unwrap();
    let secure = Registry::start(RegistryOpts::tls_basic(SECURE_USER, SECURE_PASS)).unwrap();
    let entries = [local.server_entry("local"), secure.server_entry("secure")];
    let server = if plaintext {
        WaltServer::start_plaintext(&entries).unwrap()
    } else {
        WaltServer::start(&entries).unwrap()
    };
    let alice = server.cli("alice", &[("secure", SECURE_USER, SECURE_PASS)]);
    let images = ImageBuilder::new().unwrap();
    let img = images
        .busybox_image(Format::Oci, Compression::Gzip, "pc-x86-64")
        .unwrap();
    secure
        .client()
        .push_image("walter/busybox", "latest", &img)
        .unwrap();

    let capture = Capture::start(server.port());
    assert_cloned(&alice.clone_ok(&["secure:walter/busybox"]), "busybox");
    let out = alice.run(&["image", "publish", "--registry", "secure", "busybox"]);
    out.assert_success();
    assert!(
        out.last_stdout_line().contains("published"),
        "the publish went through:\n{out}"
    );
    capture.finish()
}

#[test]
fn credentials_never_cross_the_network_in_clear() {
    let password = SECURE_PASS.as_bytes();
    let clear = capture_clone_and_publish(true);
    assert!(
        contains(&clear, password),
        "with --plaintext the capture shows the password: the capture sees the traffic ({} bytes captured, user name in it: {})",
        clear.len(),
        contains(&clear, SECURE_USER.as_bytes())
    );
    let tls = capture_clone_and_publish(false);
    assert!(
        tls.len() > 4096,
        "the TLS capture holds the calls ({} bytes)",
        tls.len()
    );
    assert!(
        !contains(&tls, password),
        "the registry password crossed the loopback in clear over TLS"
    );
    assert!(!contains(&tls, b"s3cret"), "part of the password in clear");
}

#[test]
fn install_creates_the_key_and_certificate_the_server_then_uses() {
    let root = tempfile::tempdir().unwrap();
    let out = {
        let child = Command::new(workspace_bin("walt-server-setup"))
            .args(["install", "--root"])
            .arg(root.path())
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_output(child, "walt-server-setup install", Duration::from_secs(60))
    };
    out.assert_success();
    let tls = root.path().join("etc/walt/tls");
    assert_eq!(mode(&tls.join("key.pem")), 0o600);
    assert_eq!(mode(&tls.join("cert.pem")), 0o644);
    let fp = pem_fingerprint(&std::fs::read_to_string(tls.join("cert.pem")).unwrap());
    let line = out
        .stdout
        .lines()
        .find(|l| l.contains("TLS key"))
        .unwrap_or_else(|| panic!("no TLS step line:\n{out}"));
    assert!(
        line.starts_with("done: created") && line.contains(&fp),
        "{out}"
    );

    // The server started on that configuration presents that certificate
    // (its default TLS dir is tls/ next to the configuration file).
    let data = tempfile::tempdir().unwrap();
    std::fs::create_dir(data.path().join("data")).unwrap();
    let port = free_port();
    let log = data.path().join("server.log");
    let mut child = Command::new(workspace_bin("walt-server"))
        .arg("--config")
        .arg(root.path().join("etc/walt/server.conf"))
        .arg("--data-dir")
        .arg(data.path().join("data"))
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        // The node side's files in the test's directory, not the host's.
        .arg("--event-socket")
        .arg(data.path().join("dhcp-event.sock"))
        .arg("--exports-file")
        .arg(data.path().join("walt.exports"))
        .env("NO_COLOR", "1")
        .env_remove("WALT_TLS_DIR")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let up = wait_for("walt-server to listen", Duration::from_secs(30), || {
        port_open(port).then_some(())
    });
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = child.kill();
    let _ = child.wait();
    up.unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert!(
        text.contains("TLS certificate loaded") && text.contains(&fp),
        "{text}"
    );
    assert!(!text.contains("created a TLS key"), "{text}");

    // Install again: nothing to do for TLS, the same certificate.
    let child = Command::new(workspace_bin("walt-server-setup"))
        .args(["install", "--root"])
        .arg(root.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let again = wait_output(child, "walt-server-setup install", Duration::from_secs(60));
    again.assert_success();
    assert!(
        again
            .stdout
            .lines()
            .any(|l| l.starts_with("ok: TLS certificate") && l.contains(&fp)),
        "{again}"
    );
}
