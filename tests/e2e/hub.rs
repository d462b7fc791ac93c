//! The Docker hub source: a real `docker-registry` plays the hub's
//! registry, `HubFixture` its search API. Publish (with the walt_metadata
//! update), search through walt_metadata, clone; a walt_metadata written by
//! another tool; a server without the hub.

use std::process::Command;

use base64::Engine;
use serde_json::Value;

use crate::common::*;
use walt_e2e::*;

/// The hub's registry, its search API, a `local` registry and a walt
/// server configured with both.
struct HubEnv {
    images: ImageBuilder,
    local: Registry,
    hub: Registry,
    _search: HubFixture,
    server: WaltServer,
}

fn hub_env() -> HubEnv {
    let local = Registry::start(RegistryOpts::plain()).unwrap();
    let hub = Registry::start(RegistryOpts::plain()).unwrap();
    // One result a page: the server must follow `next`.
    let search = HubFixture::start(hub.client(), 1).unwrap();
    let entry = format!(
        "-   label: hub\n    api: docker-hub\n    description: Test hub\n\
         \x20   registry-url: http://127.0.0.1:{}\n    search-url: {}\n",
        hub.port(),
        search.url()
    );
    let server = WaltServer::start(&[entry, local.server_entry("local")]).unwrap();
    HubEnv {
        images: ImageBuilder::new().unwrap(),
        local,
        hub,
        _search: search,
        server,
    }
}

fn tiny(images: &ImageBuilder, config: ImageConfig, marker: &str) -> BuiltImage {
    let layer = images
        .layer(
            Format::Oci,
            Compression::Gzip,
            &[RawEntry::file("marker", marker.as_bytes())],
        )
        .unwrap();
    images.image(Format::Oci, config, &[layer]).unwrap()
}

/// The config of an image of the hub's registry, by `skopeo inspect --config`.
fn skopeo_config(port: u16, repo: &str) -> Value {
    skopeo_config_as(port, repo, None)
}

fn skopeo_config_as(port: u16, repo: &str, creds: Option<&str>) -> Value {
    let mut cmd = Command::new("skopeo");
    cmd.args([
        "--insecure-policy",
        "inspect",
        "--config",
        "--tls-verify=false",
    ]);
    if let Some(c) = creds {
        cmd.args(["--creds", c]);
    }
    let out = cmd
        .arg(format!("docker://127.0.0.1:{port}/{repo}"))
        .output()
        .expect("skopeo");
    assert!(
        out.status.success(),
        "skopeo inspect --config {repo}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn decode_metadata(config: &Value) -> Value {
    let label = config["config"]["Labels"]["metadata"]
        .as_str()
        .unwrap_or_else(|| panic!("no metadata label: {config}"));
    let json = base64::engine::general_purpose::STANDARD
        .decode(label)
        .expect("metadata is base64");
    serde_json::from_slice(&json).expect("metadata is JSON")
}

#[test]
fn hub_publish_search_clone_round_trip() {
    let env = hub_env();
    let busybox = env
        .images
        .busybox_image(Format::Oci, Compression::Gzip, "pc-x86-64")
        .unwrap();
    env.local
        .client()
        .push_image("walt-test/busybox", "latest", &busybox)
        .unwrap();
    // Carol used today's WalT: her image and her walt_metadata are on the hub.
    let tool = tiny(&env.images, ImageConfig::amd64("rpi-4-b,pc-x86-64"), "tool");
    env.hub
        .client()
        .push_image("carol/tool", "v2", &tool)
        .unwrap();
    let meta = serde_json::json!({"walt.user.images": {"carol/tool:v2": {"labels": {
        "walt.node.models": "rpi-4-b,pc-x86-64",
        "walt.server.minversion": "4"
    }}}});
    let b64 = base64::engine::general_purpose::STANDARD.encode(meta.to_string());
    let carol_meta = tiny(
        &env.images,
        ImageConfig::amd64_unlabelled().label("metadata", &b64),
        "meta",
    );
    env.hub
        .client()
        .push_image("carol/walt_metadata", "latest", &carol_meta)
        .unwrap();
    // Not a metadata image, though the search API matches it.
    env.hub
        .client()
        .push_image("dave/walt_metadata_old", "latest", &carol_meta)
        .unwrap();

    let alice = env.server.cli("alice", &[("hub", "alice", "alice-pass")]);
    let bob = env.server.cli("bob", &[]);

    // Before alice publishes: carol's image only.
    let out = bob.run(&["image", "search", "hub:"]);
    out.assert_success();
    assert!(out.stdout.contains("hub:carol/tool:v2"), "{out}");
    assert!(!out.stdout.contains("walt_metadata"), "{out}");
    assert!(!out.stdout.contains("dave"), "{out}");

    // alice publishes to the hub.
    assert_cloned(&alice.clone_ok(&["local:walt-test/busybox", "bb"]), "bb");
    let out = alice.run(&["image", "publish", "--registry", "hub", "bb"]);
    out.assert_success();
    assert!(
        out.last_stdout_line().contains("hub:alice/bb"),
        "publish should print the hub clone URL:\n{out}"
    );
    // The image and alice's walt_metadata, seen by an independent client.
    let config = skopeo_config(env.hub.port(), "alice/bb");
    assert_eq!(config["config"]["Labels"]["walt.node.models"], "pc-x86-64");
    let meta = decode_metadata(&skopeo_config(env.hub.port(), "alice/walt_metadata"));
    assert_eq!(
        meta["walt.user.images"]["alice/bb:latest"]["labels"]["walt.node.models"], "pc-x86-64",
        "{meta}"
    );

    // A second image: the metadata keeps the first.
    assert_cloned(
        &alice.clone_ok(&["local:walt-test/busybox", "bb:v2"]),
        "bb:v2",
    );
    alice
        .run(&["image", "publish", "--registry", "hub", "bb:v2"])
        .assert_success();
    let meta = decode_metadata(&skopeo_config(env.hub.port(), "alice/walt_metadata"));
    let listed: Vec<&String> = meta["walt.user.images"]
        .as_object()
        .unwrap()
        .keys()
        .collect();
    assert_eq!(listed, ["alice/bb:latest", "alice/bb:v2"], "{meta}");

    // bob finds both users' images, and filters by keyword.
    let out = bob.run(&["image", "search"]);
    out.assert_success();
    for url in ["hub:alice/bb", "hub:alice/bb:v2", "hub:carol/tool:v2"] {
        assert!(
            out.stdout
                .lines()
                .any(|l| l.trim_end().ends_with(&format!(" {url}"))),
            "{url} missing:\n{out}"
        );
    }
    assert!(out.stdout.contains("rpi-4-b"), "{out}");
    let out = bob.run(&["image", "search", "carol"]);
    out.assert_success();
    assert!(out.stdout.contains("hub:carol/tool:v2"), "{out}");
    assert!(!out.stdout.contains("hub:alice"), "{out}");

    // bob clones alice's image (anonymously) and carol's.
    assert_cloned(&bob.clone_ok(&["hub:alice/bb"]), "bb");
    assert_cloned(&bob.clone_ok(&["hub:carol/tool:v2"]), "tool:v2");
    assert!(bob.show_row("tool:v2").is_some());

    // Publishing to the hub needs hub credentials.
    bob.run(&["image", "publish", "--registry", "hub", "bb"])
        .assert_failure("credentials");
}

#[test]
fn hub_not_configured() {
    let local = Registry::start(RegistryOpts::plain()).unwrap();
    let server = WaltServer::start(&[local.server_entry("local")]).unwrap();
    let bob = server.cli("bob", &[]);
    bob.clone(&["hub:alice/bb"])
        .assert_failure("hub is not enabled");
    // Search does not try the hub.
    let out = bob.run(&["image", "search"]);
    assert!(!out.stderr.contains("hub"), "{out}");
}

#[test]
fn hub_search_api_down() {
    let hub = Registry::start(RegistryOpts::plain()).unwrap();
    let dead = walt_e2e::util::free_port();
    let entry = format!(
        "-   label: hub\n    api: docker-hub\n    description: Test hub\n\
         \x20   registry-url: http://127.0.0.1:{}\n    search-url: http://127.0.0.1:{dead}\n",
        hub.port(),
    );
    let server = WaltServer::start(&[entry]).unwrap();
    let bob = server.cli("bob", &[]);
    let out = bob.run(&["image", "search"]);
    assert!(
        out.stderr.contains("hub"),
        "a warning should name the hub:\n{out}"
    );
}

/// A hub behind TLS (verified with the entry's `ca-file`) and basic auth:
/// publish and clone with the user's hub credentials, wrong ones refused.
#[test]
fn hub_with_tls_and_credentials() {
    let local = Registry::start(RegistryOpts::plain()).unwrap();
    let hub = Registry::start(RegistryOpts::tls_basic(SECURE_USER, SECURE_PASS)).unwrap();
    let search = HubFixture::start(hub.client(), 100).unwrap();
    let entry = format!(
        "-   label: hub\n    api: docker-hub\n    description: Test hub\n\
         \x20   registry-url: https://127.0.0.1:{}\n    search-url: {}\n    ca-file: {}\n",
        hub.port(),
        search.url(),
        hub.ca_cert().unwrap().display()
    );
    let server = WaltServer::start(&[entry, local.server_entry("local")]).unwrap();
    let images = ImageBuilder::new().unwrap();
    let busybox = images
        .busybox_image(Format::Oci, Compression::Gzip, "pc-x86-64")
        .unwrap();
    local
        .client()
        .push_image("walt-test/busybox", "latest", &busybox)
        .unwrap();
    let alice = server.cli("alice", &[("hub", SECURE_USER, SECURE_PASS)]);
    let bob = server.cli("bob", &[("hub", SECURE_USER, SECURE_PASS)]);
    let eve = server.cli("eve", &[("hub", SECURE_USER, "wrong")]);

    assert_cloned(&alice.clone_ok(&["local:walt-test/busybox", "bb"]), "bb");
    let out = alice.run(&["image", "publish", "--registry", "hub", "bb"]);
    out.assert_success();
    let url = format!("hub:{SECURE_USER}/bb");
    assert!(out.last_stdout_line().contains(&url), "{out}");
    let creds = format!("{SECURE_USER}:{SECURE_PASS}");
    let meta = decode_metadata(&skopeo_config_as(
        hub.port(),
        &format!("{SECURE_USER}/walt_metadata"),
        Some(&creds),
    ));
    assert_eq!(
        meta["walt.user.images"][format!("{SECURE_USER}/bb:latest")]["labels"]["walt.node.models"],
        "pc-x86-64",
        "{meta}"
    );

    let out = bob.run(&["image", "search", "hub:"]);
    out.assert_success();
    assert!(out.stdout.contains(&url), "{out}");
    assert_cloned(&bob.clone_ok(&[&url]), "bb");

    assert_cloned(&eve.clone_ok(&["local:walt-test/busybox", "bb"]), "bb");
    eve.run(&["image", "publish", "--registry", "hub", "bb"])
        .assert_failure("authentication failed");
}
