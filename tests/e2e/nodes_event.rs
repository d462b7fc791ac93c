//! The DHCP hook (`walt-dhcp-event`) and the daemon's socket: leases are
//! recorded, bad input is refused with one line, only root may report.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use walt_e2e::WaltServer;
use walt_e2e::util::workspace_bin;

#[test]
fn the_hook_reports_leases_and_returns() {
    let server = WaltServer::start(&[]).unwrap();
    // The socket is root's only.
    let mode = std::fs::metadata(server.event_socket())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "socket mode {mode:o}");
    // A device without a model (isc-dhcp-server's arguments).
    server
        .dhcp_event(&[
            "commit",
            "udhcp 1.35.0",
            "",
            "192.168.152.51",
            "52:54:00:AB:CD:EF",
            "",
            "0",
            "unknown",
        ])
        .assert_success();
    server.wait_log("new device detected", 1).unwrap();
    server
        .wait_log("it announces no walt.node.<model> class", 1)
        .unwrap();
    // dnsmasq's form, for a Raspberry Pi without model: its own reason.
    let out = Command::new(workspace_bin("walt-dhcp-event"))
        .args(["add", "b8:27:eb:01:02:03", "192.168.152.52", "pi"])
        .env("WALT_DHCP_EVENT_SOCKET", server.event_socket())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    server.wait_log("Raspberry Pi of unknown model", 1).unwrap();
    // dnsmasq's other actions need nothing.
    server
        .dhcp_event(&["del", "b8:27:eb:01:02:03", "192.168.152.52"])
        .assert_success();
    // A malformed lease is refused by the daemon, which goes on.
    server
        .dhcp_event(&[
            "commit",
            "",
            "",
            "not-an-ip",
            "52:54:00:00:00:09",
            "",
            "0",
            "unknown",
        ])
        .assert_success();
    server
        .wait_log("invalid IPv4 address 'not-an-ip'", 1)
        .unwrap();
    // A model: the default image is looked for (here nowhere: the device
    // stays unknown, with the reason logged).
    server
        .dhcp_event(&[
            "commit",
            "walt.node.pc-x86-64",
            "",
            "192.168.152.53",
            "52:54:00:00:00:01",
            "nodeA",
            "0",
            "unknown",
        ])
        .assert_success();
    server
        .wait_log("device nodea-000001 is a node of type pc-x86-64", 1)
        .unwrap();
}

#[test]
fn the_hook_says_what_is_wrong() {
    let server = WaltServer::start(&[]).unwrap();
    let out = server.dhcp_event(&["commit", "x"]);
    assert_eq!(out.code, Some(2), "{out}");
    assert!(out.stderr.contains("usage: walt-dhcp-event"), "{out}");
    // No daemon at the socket: one line, exit 1.
    let out = Command::new(workspace_bin("walt-dhcp-event"))
        .args(["add", "52:54:00:00:00:01", "10.0.0.1"])
        .env("WALT_DHCP_EVENT_SOCKET", "/nonexistent/walt.sock")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("walt-dhcp-event: cannot reach walt-server at /nonexistent/walt.sock")
            && err.lines().count() == 1,
        "{err}"
    );
    // Not root: the socket refuses the connection.
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(workspace_bin("walt-dhcp-event"))
        .args(["add", "52:54:00:00:00:02", "10.0.0.2"])
        .env("WALT_DHCP_EVENT_SOCKET", server.event_socket())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
        "{out:?}"
    );
    assert!(!server.log().contains("52:54:00:00:00:02"));
}

#[test]
fn a_second_server_does_not_take_the_event_socket_over() {
    let server = WaltServer::start(&[]).unwrap();
    let data = tempfile::tempdir().unwrap();
    let out = Command::new(workspace_bin("walt-server"))
        .args(["--plaintext", "--listen", "127.0.0.1:0", "--config"])
        .arg(server.config_path())
        .arg("--data-dir")
        .arg(data.path())
        .arg("--event-socket")
        .arg(server.event_socket())
        .arg("--exports-file")
        .arg(data.path().join("walt.exports"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("another walt-server listens for DHCP events on"),
        "{err}"
    );
    // The first server still gets the leases.
    server
        .dhcp_event(&["add", "52:54:00:00:00:07", "10.0.0.7"])
        .assert_success();
    server.wait_log("new device detected", 1).unwrap();
}
