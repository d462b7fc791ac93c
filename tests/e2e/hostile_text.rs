//! Text from outside reaches the terminal with its control characters
//! escaped (labels in search results and tables, registry error bodies),
//! and errors name no path of the server's data dir (its log has them).

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;

use crate::common::*;
use walt_e2e::registry::registry_entry;
use walt_e2e::*;

/// Characters that a terminal acts on instead of showing.
const RAW: [char; 6] = ['\u{1b}', '\u{7}', '\u{9b}', '\u{202e}', '\u{2066}', '\r'];

/// A label value full of them: clear screen, set the window title, a C1
/// CSI, right-to-left override and isolate, carriage return.
const HOSTILE: &str =
    "rpi-3-b,pc-\u{1b}[2J\u{1b}]0;pwned\u{7}x,evil\u{202e}gnp.exe,\u{9b}31m\u{2066}red\r";

#[track_caller]
fn assert_no_raw(out: &CmdOutput) {
    for (name, text) in [("stdout", &out.stdout), ("stderr", &out.stderr)] {
        assert!(
            !text.contains(RAW),
            "raw control characters on {name}: {:?}\n{out}",
            text
        );
    }
}

#[test]
fn labels_from_a_registry_are_escaped_in_search_and_show() {
    let env = Env::start();
    let layer = env
        .images
        .layer(
            Format::Oci,
            Compression::Gzip,
            &[RawEntry::file("marker", b"evil")],
        )
        .unwrap();
    let img = env
        .images
        .image(Format::Oci, ImageConfig::amd64(HOSTILE), &[layer])
        .unwrap();
    env.push_local("eve/evil", "latest", &img);

    let out = env.alice.run(&["image", "search", "evil"]);
    out.assert_success();
    assert_no_raw(&out);
    let row = out
        .stdout
        .lines()
        .find(|l| l.contains("local:eve/evil"))
        .unwrap_or_else(|| panic!("no result for eve/evil:\n{out}"));
    // Shown escaped, on the one line of the result.
    for visible in [
        "\\x1b[2J",
        "\\x1b]0;pwned\\x07x",
        "\\u{202e}gnp.exe",
        "\\u{9b}31m",
        "\\u{2066}red",
    ] {
        assert!(row.contains(visible), "{visible} not in {row:?}\n{out}");
    }

    assert_cloned(&env.alice.clone(&["local:eve/evil", "evil"]), "evil");
    let out = env.alice.run(&["image", "show"]);
    out.assert_success();
    assert_no_raw(&out);
    assert!(out.stdout.contains("\\x1b[2J"), "{out}");
}

#[test]
fn labels_from_the_hub_are_escaped_in_search() {
    use base64::Engine;
    let images = ImageBuilder::new().unwrap();
    let hub = Registry::start(RegistryOpts::plain()).unwrap();
    let search = HubFixture::start(hub.client(), 10).unwrap();
    let entry = format!(
        "-   label: hub\n    api: docker-hub\n    description: Test hub\n\
         \x20   registry-url: http://127.0.0.1:{}\n    search-url: {}\n",
        hub.port(),
        search.url()
    );
    let server = WaltServer::start(&[entry]).unwrap();
    // Carol's walt_metadata on the hub lists an image with hostile labels.
    let layer = images
        .layer(
            Format::Oci,
            Compression::Gzip,
            &[RawEntry::file("marker", b"meta")],
        )
        .unwrap();
    let meta = serde_json::json!({"images": {"tool:v2": {"labels": {
        "walt.node.models": HOSTILE,
        "walt.server.minversion": "4\u{1b}[2J"
    }}}});
    let b64 = base64::engine::general_purpose::STANDARD.encode(meta.to_string());
    let meta_image = images
        .image(
            Format::Oci,
            ImageConfig::amd64_unlabelled().label("metadata", &b64),
            &[layer],
        )
        .unwrap();
    hub.client()
        .push_image("carol/walt_metadata", "latest", &meta_image)
        .unwrap();

    let out = server.cli("bob", &[]).run(&["image", "search", "hub:"]);
    out.assert_success();
    assert_no_raw(&out);
    let row = out
        .stdout
        .lines()
        .find(|l| l.contains("hub:carol/tool:v2"))
        .unwrap_or_else(|| panic!("no result for carol/tool:\n{out}"));
    for visible in ["\\x1b[2J", "\\u{202e}gnp.exe", "\\u{9b}31m"] {
        assert!(row.contains(visible), "{visible} not in {row:?}\n{out}");
    }
}

/// A registry that answers every request with `status` and a JSON error
/// body holding control characters; serves until the test ends.
fn hostile_registry(status: &'static str) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            std::thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
                        break;
                    }
                }
                let body = serde_json::json!({"errors": [{
                    "code": "DENIED",
                    "message": "denied \u{1b}[2J\u{1b}]0;pwned\u{7} by \u{202e}gnp.exe \u{9b}31m",
                }]})
                .to_string();
                let _ = write!(
                    conn,
                    "HTTP/1.1 {status}\r\nContent-Type: application/json\r\n\
                     Docker-Distribution-API-Version: registry/2.0\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            });
        }
    });
    port
}

#[test]
fn registry_error_bodies_are_escaped() {
    let port = hostile_registry("400 Bad Request");
    let server = WaltServer::start(&[registry_entry("evil", port, "http", false)]).unwrap();
    let alice = server.cli("alice", &[]);

    let out = alice.run(&["image", "clone", "evil:eve/img", "img"]);
    assert!(!out.success, "{out}");
    assert_no_raw(&out);
    let errors = out.error_lines();
    assert_eq!(errors.len(), 1, "{out}");
    assert!(
        errors[0].contains("denied \\x1b[2J\\x1b]0;pwned\\x07 by \\u{202e}gnp.exe \\u{9b}31m"),
        "the registry's message, escaped: {out}"
    );

    // Search: the same body in a warning.
    let out = alice.run(&["image", "search"]);
    assert_no_raw(&out);
    assert!(
        out.stderr.contains("\\x1b[2J"),
        "the registry's message in a warning, escaped: {out}"
    );
}

#[test]
fn store_errors_name_no_server_path() {
    let env = Env::start();
    push_busybox(&env, "walt-test/busybox", "latest");
    assert_cloned(&env.alice.clone(&["local:walt-test/busybox", "img"]), "img");
    // The stored blobs (manifest, config, layers) get broken under the
    // server: each file replaced by a directory.
    let data_dir = env.server.data_dir();
    let mut broken = 0;
    for e in fs::read_dir(data_dir.join("blobs/sha256")).unwrap() {
        let blob = e.unwrap().path();
        if blob.is_file() {
            fs::remove_file(&blob).unwrap();
            fs::create_dir(&blob).unwrap();
            broken += 1;
        }
    }
    assert!(broken > 0, "no blob in the store");
    let dest = tempfile::tempdir().unwrap();
    let out = env.alice.run(&[
        "image",
        "cp",
        "img:/bin/busybox",
        dest.path().to_str().unwrap(),
    ]);
    assert!(!out.success, "{out}");
    let errors = out.error_lines();
    assert_eq!(errors.len(), 1, "{out}");
    let data = data_dir.to_str().unwrap();
    assert!(
        !out.stderr.contains(data),
        "the data dir in a user message: {out}"
    );
    assert!(
        !out.stderr.contains("/layers/") && !out.stderr.contains("/tmp/"),
        "a store path in a user message: {out}"
    );
    assert!(errors[0].contains("<server path>"), "{out}");
    // The server log has the whole message.
    let log = env.server.log();
    assert!(
        log.lines()
            .any(|l| l.contains("without its server paths") && l.contains(data)),
        "the log should have the full error:\n{log}"
    );
}
