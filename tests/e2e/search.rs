//! `walt image search`: registries and other users' images, keyword,
//! unreachable registries, pagination, `--json`.

use std::time::Instant;

use crate::common::*;
use walt_e2e::registry::registry_entry;
use walt_e2e::store::table_cells;
use walt_e2e::util::free_port;
use walt_e2e::*;

/// A tiny image (one small layer) with `config`.
fn tiny(env_images: &ImageBuilder, config: ImageConfig, marker: &str) -> BuiltImage {
    let layer = env_images
        .layer(
            Format::Oci,
            Compression::Gzip,
            &[RawEntry::file("marker", marker.as_bytes())],
        )
        .unwrap();
    env_images.image(Format::Oci, config, &[layer]).unwrap()
}

/// `walt image search [args]`, asserted to succeed.
#[track_caller]
fn search_ok(walt: &Walt, args: &[&str]) -> CmdOutput {
    let mut a = vec!["image", "search"];
    a.extend_from_slice(args);
    let out = walt.run(&a);
    out.assert_success();
    out
}

/// The rows of the search table: cells under User, Image name, Location,
/// Compatibility, Clonable link (WalT's rule of dashes skipped).
#[track_caller]
fn rows(out: &CmdOutput) -> Vec<Vec<String>> {
    let mut lines = out.stdout.lines().filter(|l| !l.trim().is_empty());
    let header = lines.next().map(table_cells).unwrap_or_default();
    assert_eq!(
        header,
        [
            "User",
            "Image name",
            "Location",
            "Compatibility",
            "Clonable link"
        ],
        "{out}"
    );
    lines
        .skip_while(|l| l.starts_with('-'))
        .map(table_cells)
        .collect()
}

fn urls(rows: &[Vec<String>]) -> Vec<String> {
    rows.iter()
        .map(|r| r.last().cloned().unwrap_or_default())
        .collect()
}

#[test]
fn search_lists_registry_and_other_users_images() {
    let env = Env::start();
    push_busybox(&env, "walt-test/busybox", "latest");
    let future = tiny(
        &env.images,
        ImageConfig::amd64("rpi-3-b,rpi-4-b,pc-x86-64").label("walt.server.minversion", "11"),
        "future",
    );
    env.push_local("eve/future", "v2", &future);
    let old = tiny(
        &env.images,
        ImageConfig::amd64("pc-x86-32").label("walt.server.minversion", "3"),
        "old",
    );
    env.push_local("eve/team/old", "latest", &old);
    // Not walt images, or not <user>/<name>: never listed.
    let plain = tiny(&env.images, ImageConfig::amd64_unlabelled(), "plain");
    env.push_local("eve/plain", "latest", &plain);
    env.push_local("solo", "latest", &future);

    env.alice.clone_ok(&["local:walt-test/busybox", "shared"]);
    env.bob.clone_ok(&["local:eve/future:v2", "bobs"]);

    let out = search_ok(&env.alice, &[]);
    let r = rows(&out);
    let mut got = urls(&r);
    got.sort();
    // Images needing a newer server show WalT's note in place of their link.
    assert_eq!(
        got,
        [
            "[Need server upgrade, version>=11]",
            "[Need server upgrade, version>=11]",
            "local:eve/team/old",
            "local:walt-test/busybox",
        ],
        "{out}"
    );
    // The table is sorted (user, then name).
    assert_eq!(r[0][0], "bob", "{out}");
    let row = |user: &str, name: &str| {
        r.iter()
            .find(|c| c[0] == user && c[1] == name)
            .unwrap_or_else(|| panic!("no row {user} {name}:\n{out}"))
            .clone()
    };
    assert_eq!(
        row("eve", "future:v2"),
        [
            "eve",
            "future:v2",
            "custom registry",
            "rpi-[3-b|4-b],pc-x86-64",
            "[Need server upgrade, version>=11]"
        ]
    );
    assert_eq!(
        row("eve", "team/old"),
        [
            "eve",
            "team/old",
            "custom registry",
            "pc-x86-32",
            "local:eve/team/old"
        ]
    );
    assert_eq!(
        row("bob", "bobs"),
        [
            "bob",
            "bobs",
            "walt (other user)",
            "rpi-[3-b|4-b],pc-x86-64",
            "[Need server upgrade, version>=11]"
        ]
    );
    // --json keeps the clone URLs.
    let out_json = search_ok(&env.alice, &["--json"]);
    let j: serde_json::Value = serde_json::from_str(&out_json.stdout).unwrap();
    let mut json_urls: Vec<&str> = j
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["clone_url"].as_str().unwrap())
        .collect();
    json_urls.sort();
    assert_eq!(
        json_urls,
        [
            "local:eve/future:v2",
            "local:eve/team/old",
            "local:walt-test/busybox",
            "walt:bob/bobs"
        ],
        "{out_json}"
    );
    assert!(out.stderr.trim().is_empty(), "{out}");

    // Bob sees alice's image, not his own.
    let out = search_ok(&env.bob, &[]);
    let got = urls(&rows(&out));
    assert!(got.contains(&"walt:alice/shared".to_string()), "{out}");
    assert!(!got.iter().any(|u| u.starts_with("walt:bob/")), "{out}");

    // A second search (configs cached) gives the same answer.
    let again = search_ok(&env.alice, &[]);
    assert_eq!(again.stdout, search_ok(&env.alice, &[]).stdout);
}

#[test]
fn search_keyword_and_no_match() {
    let env = Env::start();
    push_busybox(&env, "walt-test/busybox", "latest");
    let img = tiny(&env.images, ImageConfig::amd64("rpi-b"), "kw");
    env.push_local("eve/rpi-stuff", "v1", &img);
    env.alice.clone_ok(&["local:eve/rpi-stuff:v1", "mine"]);

    let out = search_ok(&env.bob, &["rpi"]);
    let mut got = urls(&rows(&out));
    got.sort();
    assert_eq!(got, ["local:eve/rpi-stuff:v1"], "{out}");
    // The keyword applies to the whole clone URL, location included.
    let out = search_ok(&env.bob, &["walt:"]);
    assert_eq!(urls(&rows(&out)), ["walt:alice/mine"], "{out}");
    let out = search_ok(&env.bob, &["busybox"]);
    assert_eq!(urls(&rows(&out)), ["local:walt-test/busybox"], "{out}");

    let out = search_ok(&env.bob, &["no-such-thing"]);
    assert!(out.stdout.trim().is_empty(), "{out}");
    assert!(
        out.stderr.to_lowercase().contains("no image matches"),
        "{out}"
    );
    // Alice's own image is not a match for her.
    let out = search_ok(&env.alice, &["mine"]);
    assert!(out.stdout.trim().is_empty(), "{out}");
}

#[test]
fn search_skips_an_unreachable_registry() {
    let local = Registry::start(RegistryOpts::plain()).unwrap();
    let images = ImageBuilder::new().unwrap();
    let img = tiny(&images, ImageConfig::amd64("pc-x86-64"), "up");
    local.client().push_image("eve/up", "latest", &img).unwrap();
    let server = WaltServer::start(&[
        registry_entry("down", free_port(), "http", false),
        local.server_entry("local"),
    ])
    .unwrap();
    let alice = server.cli("alice", &[]);
    let out = search_ok(&alice, &[]);
    assert_eq!(urls(&rows(&out)), ["local:eve/up"], "{out}");
    let warnings: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert_eq!(warnings.len(), 1, "{out}");
    assert!(warnings[0].contains("registry 'down' skipped"), "{out}");

    // Nothing reachable but the store: the search still answers.
    let out = search_ok(&alice, &["nothing"]);
    assert!(out.stderr.contains("registry 'down' skipped"), "{out}");
    assert!(
        out.stderr.to_lowercase().contains("no image matches"),
        "{out}"
    );
}

#[test]
fn search_uses_the_clients_registry_credentials() {
    let env = Env::start_with(EnvOpts {
        secure: true,
        ..Default::default()
    });
    let img = tiny(&env.images, ImageConfig::amd64("pc-x86-64"), "sec");
    env.secure
        .as_ref()
        .unwrap()
        .client()
        .push_image("walter/private", "latest", &img)
        .unwrap();
    let out = search_ok(&env.alice, &[]);
    assert_eq!(urls(&rows(&out)), ["secure:walter/private"], "{out}");
    env.alice.set_credentials(&[]).unwrap();
    let out = search_ok(&env.alice, &[]);
    assert!(out.stdout.trim().is_empty(), "{out}");
    assert!(out.stderr.contains("registry 'secure' skipped"), "{out}");
    assert!(out.stderr.contains("credentials"), "{out}");
}

#[test]
fn search_paginates_over_many_repositories() {
    let env = Env::start();
    let img = tiny(&env.images, ImageConfig::amd64("pc-x86-64"), "many");
    let client = env.local.client();
    let first = "many/img-000";
    client.push_image(first, "latest", &img).unwrap();
    // The other repositories mount the blobs of the first one: only the
    // manifest is uploaded.
    let names: Vec<String> = (1..105).map(|i| format!("many/img-{i:03}")).collect();
    client
        .copy_to_repos(&img, first, &names, "latest", 8)
        .unwrap();
    let started = Instant::now();
    let out = search_ok(&env.alice, &["many/"]);
    let cold = started.elapsed();
    let r = rows(&out);
    assert_eq!(r.len(), 105, "{out}");
    assert_eq!(r[0][4], "local:many/img-000");
    assert_eq!(r[104][4], "local:many/img-104");
    let started = Instant::now();
    let out = search_ok(&env.alice, &["many/"]);
    let warm = started.elapsed();
    assert_eq!(rows(&out).len(), 105, "{out}");
    eprintln!("search over 105 repositories: {cold:?} (configs cached: {warm:?})");
}

#[test]
fn search_json_output() {
    let env = Env::start();
    let img = tiny(
        &env.images,
        ImageConfig::amd64("rpi-4-b").label("walt.server.minversion", "12"),
        "json",
    );
    env.push_local("eve/j", "v1", &img);
    push_busybox(&env, "walt-test/busybox", "latest");
    let out = search_ok(&env.alice, &["--json"]);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).expect("stdout is JSON");
    let items = v.as_array().expect("a JSON array");
    assert_eq!(items.len(), 2, "{out}");
    let j = items
        .iter()
        .find(|i| i["clone_url"] == "local:eve/j:v1")
        .expect("eve/j listed");
    assert_eq!(j["user"], "eve");
    assert_eq!(j["name"], "j");
    assert_eq!(j["tag"], "v1");
    assert_eq!(j["location"], "local");
    assert_eq!(j["node_models"], serde_json::json!(["rpi-4-b"]));
    assert_eq!(j["server_minversion"], 12);

    // No match: an empty array, and the line on stderr.
    let out = search_ok(&env.alice, &["--json", "nothing-here"]);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).expect("stdout is JSON");
    assert_eq!(v, serde_json::json!([]));
    assert!(
        out.stderr.to_lowercase().contains("no image matches"),
        "{out}"
    );
}
