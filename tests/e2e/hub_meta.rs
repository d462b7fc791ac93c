//! Issue 15 items 7, 8, 9: what WalT users do around the hub metadata and
//! images in use. `hub:` clones of images their owner's `walt_metadata`
//! does not list are refused (unless `--force`); `walt advanced
//! update-hub-meta` / `rescan-hub-account` rebuild `walt_metadata` from the
//! hub account's repositories (the hub's registry is a real
//! `docker-registry`, its API the `HubFixture`); `walt advanced
//! fix-image-owner`; squash and cp into an image nodes use ask first
//! (stdin read as WalT does); images of 128 layers or more refused by
//! shell, cp and build with the squash command as hint.

use std::time::Duration;

use base64::Engine;
use serde_json::Value;

use crate::common::*;
use walt_e2e::util::wait_for;
use walt_e2e::*;

// ----- the hub -----

struct HubEnv {
    images: ImageBuilder,
    hub: Registry,
    _api: HubFixture,
    server: WaltServer,
}

fn hub_env() -> HubEnv {
    let hub = Registry::start(RegistryOpts::plain()).unwrap();
    // Two results a page: the server follows `next` in every listing.
    let api = HubFixture::start(hub.client(), 2).unwrap();
    let entry = format!(
        "-   label: hub\n    api: docker-hub\n    description: Test hub\n\
         \x20   registry-url: http://127.0.0.1:{}\n    search-url: {}\n",
        hub.port(),
        api.url()
    );
    let server = WaltServer::start(&[entry]).unwrap();
    HubEnv {
        images: ImageBuilder::new().unwrap(),
        hub,
        _api: api,
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

/// The `walt_metadata` of `user` on the hub's registry, decoded: the
/// manifest's media type and the JSON document.
fn hub_metadata(env: &HubEnv, user: &str) -> (String, Value) {
    let client = env.hub.client();
    let repo = format!("{user}/walt_metadata");
    let (media_type, manifest) = client.get_manifest(&repo, "latest").unwrap();
    let manifest: Value = serde_json::from_slice(&manifest).unwrap();
    let digest = manifest["config"]["digest"].as_str().unwrap();
    let config: Value = serde_json::from_slice(&client.get_blob(&repo, digest).unwrap()).unwrap();
    let label = config["config"]["Labels"]["metadata"]
        .as_str()
        .unwrap_or_else(|| panic!("no metadata label: {config}"));
    let json = base64::engine::general_purpose::STANDARD
        .decode(label)
        .expect("metadata is base64");
    (media_type, serde_json::from_slice(&json).unwrap())
}

fn listed(meta: &Value) -> Vec<String> {
    meta["walt.user.images"]
        .as_object()
        .unwrap_or_else(|| panic!("no walt.user.images: {meta}"))
        .keys()
        .cloned()
        .collect()
}

#[test]
fn hub_clone_refuses_unlisted_images_and_update_hub_meta_lists_them() {
    let env = hub_env();
    let push = |repo: &str, tag: &str, img: &BuiltImage| {
        env.hub.client().push_image(repo, tag, img).unwrap();
    };
    push(
        "alice/listed",
        "latest",
        &tiny(&env.images, ImageConfig::amd64("pc-x86-64"), "listed"),
    );
    push(
        "alice/unlisted",
        "v1",
        &tiny(
            &env.images,
            ImageConfig::amd64("rpi-4-b,pc-x86-64"),
            "unlisted",
        ),
    );
    push(
        "alice/plain",
        "latest",
        &tiny(&env.images, ImageConfig::amd64_unlabelled(), "plain"),
    );
    // Another user's image: never in alice's metadata.
    push(
        "carol/other",
        "latest",
        &tiny(&env.images, ImageConfig::amd64("pc-x86-64"), "carol"),
    );
    // alice's walt_metadata as WalT writes it: only `listed`.
    let meta = serde_json::json!({"walt.user.images": {"alice/listed:latest": {"labels": {
        "walt.node.models": "pc-x86-64"
    }}}});
    let b64 = base64::engine::general_purpose::STANDARD.encode(meta.to_string());
    push(
        "alice/walt_metadata",
        "latest",
        &tiny(
            &env.images,
            ImageConfig::amd64_unlabelled().label("metadata", &b64),
            "meta",
        ),
    );
    let alice = env.server.cli("alice", &[("hub", "alice", "alice-pass")]);
    let bob = env.server.cli("bob", &[]);

    // Item 7: an image alice's walt_metadata does not list is refused, the
    // hint being the exact command with --force; nothing is cloned.
    let out = bob.clone(&["hub:alice/unlisted:v1"]);
    out.assert_failure("(see walt image search alice, or use walt image clone --force hub:alice/unlisted:v1 to clone it anyway)");
    assert!(out.stdout.is_empty(), "{out}");
    let out = bob.clone(&["hub:alice/unlisted:v1", "mine"]);
    out.assert_failure("use walt image clone --force hub:alice/unlisted:v1 mine to clone");
    assert!(out.stdout.is_empty(), "{out}");
    // Without any walt_metadata: refused too.
    bob.clone(&["hub:carol/other"])
        .assert_failure("walt image clone --force hub:carol/other to clone");
    assert!(bob.image_names().is_empty(), "{:?}", bob.image_names());
    // A listed image clones; --force clones an unlisted one.
    assert_cloned(&bob.clone_ok(&["hub:alice/listed"]), "listed");
    assert_cloned(
        &bob.clone_ok(&["--force", "hub:alice/unlisted:v1", "forced"]),
        "forced",
    );

    // Item 9: update-hub-meta rebuilds alice's walt_metadata from her
    // repositories: the walt images, not the plain one nor the metadata.
    let out = alice.run(&["advanced", "update-hub-meta"]);
    out.assert_success();
    assert_eq!(
        out.stdout.trim_end(),
        "Hub metadata of alice updated: 2 walt images listed (listed, unlisted:v1).",
        "{out}"
    );
    let (media_type, meta) = hub_metadata(&env, "alice");
    assert_eq!(
        media_type, "application/vnd.docker.distribution.manifest.v2+json",
        "WalT writes (and its older readers parse) Docker schema 2"
    );
    assert_eq!(
        listed(&meta),
        ["alice/listed:latest", "alice/unlisted:v1"],
        "{meta}"
    );
    assert_eq!(
        meta["walt.user.images"]["alice/unlisted:v1"]["labels"]["walt.node.models"],
        "rpi-4-b,pc-x86-64",
        "{meta}"
    );
    // Now listed: cloned without --force, and found by search.
    assert_cloned(&bob.clone_ok(&["hub:alice/unlisted:v1", "again"]), "again");
    let out = bob.run(&["image", "search", "hub:alice"]);
    out.assert_success();
    assert!(out.stdout.contains("hub:alice/unlisted:v1"), "{out}");

    // rescan-hub-account is the same command: a new repository is listed.
    push(
        "alice/fresh",
        "v3",
        &tiny(&env.images, ImageConfig::amd64("pc-x86-32"), "fresh"),
    );
    let out = alice.run(&["advanced", "rescan-hub-account"]);
    out.assert_success();
    assert!(out.stdout.contains("3 walt images listed"), "{out}");
    let (_, meta) = hub_metadata(&env, "alice");
    assert_eq!(
        listed(&meta),
        ["alice/fresh:v3", "alice/listed:latest", "alice/unlisted:v1"],
        "{meta}"
    );

    // Without hub credentials (and no terminal to ask them): refused,
    // nothing pushed for bob.
    bob.run(&["advanced", "update-hub-meta"])
        .assert_failure("credentials");
    assert!(
        env.hub
            .client()
            .get_manifest("bob/walt_metadata", "latest")
            .is_err()
    );
}

// ----- fix-image-owner -----

#[test]
fn fix_image_owner_moves_every_image_with_walt_s_rules() {
    let env = Env::start();
    push_busybox(&env, "walt-test/busybox", "latest");
    env.alice.clone_ok(&["local:walt-test/busybox", "a"]);
    env.alice.clone_ok(&["local:walt-test/busybox", "b:v2"]);
    env.bob.clone_ok(&["local:walt-test/busybox", "b:v2"]);

    // Without the option: nothing done, the refusal names the command.
    let before = env.snapshot();
    let out = env.bob.run(&["advanced", "fix-image-owner", "alice"]);
    out.assert_failure(
        "(use walt advanced fix-image-owner --yes-i-know-do-it-please alice to do it)",
    );
    assert!(out.stdout.is_empty(), "{out}");
    // One of alice's images would replace one of bob's: refused, naming it.
    let out = env.bob.run(&[
        "advanced",
        "fix-image-owner",
        "--yes-i-know-do-it-please",
        "alice",
    ]);
    out.assert_failure(
        "cannot take the images of alice: b:v2 would replace images of your working set",
    );
    assert!(out.stdout.is_empty(), "{out}");
    env.assert_unchanged(&before);
    // Oneself, or a user without images: refused.
    env.bob
        .run(&[
            "advanced",
            "fix-image-owner",
            "--yes-i-know-do-it-please",
            "bob",
        ])
        .assert_failure("'bob' is you");
    env.bob
        .run(&[
            "advanced",
            "fix-image-owner",
            "--yes-i-know-do-it-please",
            "nobody",
        ])
        .assert_failure("no image belongs to a user named 'nobody'");

    env.bob.run(&["image", "remove", "b:v2"]).assert_success();
    let out = env.bob.run(&[
        "advanced",
        "fix-image-owner",
        "--yes-i-know-do-it-please",
        "alice",
    ]);
    out.assert_success();
    assert_eq!(
        out.stdout.lines().collect::<Vec<_>>(),
        [
            "Image a now belongs to you.",
            "Image b:v2 now belongs to you."
        ],
        "{out}"
    );
    let mut names = env.bob.image_names();
    names.sort();
    assert_eq!(names, ["a", "b:v2"]);
    assert!(
        env.alice.image_names().is_empty(),
        "{:?}",
        env.alice.image_names()
    );
}

// ----- images in use: confirmation -----

const MODEL: &str = "pc-x86-64";

/// One pc-x86-64 node, `node-000001`, booting the default image.
fn node_env() -> Env {
    let env = Env::start();
    let layer = env
        .images
        .busybox_layer(Format::Oci, Compression::Gzip, "default image")
        .unwrap();
    let default = env
        .images
        .image(Format::Oci, ImageConfig::amd64(MODEL), &[layer])
        .unwrap();
    env.push_local(&format!("waltplatform/{MODEL}-default"), "latest", &default);
    env.server
        .dhcp_event(&[
            "commit",
            &format!("walt.node.{MODEL}"),
            "",
            "192.168.152.11",
            "52:54:00:00:00:01",
            "node",
            "0",
            "unknown",
        ])
        .assert_success();
    let watcher = env.server.cli("carol", &[]);
    wait_for("the node", Duration::from_secs(60), || {
        let out = watcher.run(&["node", "show", "--all"]);
        (out.success && out.stdout.contains("node-000001")).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\nserver log:\n{}", env.server.log()));
    env
}

const WOULD_REBOOT: &str = "This operation would reboot 1 node(s) currently using the image.";

/// The content of `/root/<name>` in alice's image `image`.
fn image_file(env: &Env, image: &str, name: &str) -> Option<String> {
    let dir = tempfile::tempdir().unwrap();
    let out = env.alice.run(&[
        "image",
        "cp",
        &format!("{image}:/root/{name}"),
        dir.path().to_str().unwrap(),
    ]);
    out.success
        .then(|| std::fs::read_to_string(dir.path().join(name)).unwrap())
}

#[test]
fn squash_and_cp_into_an_image_in_use_ask_first() {
    let env = node_env();
    push_busybox(&env, "walt-test/busybox", "latest");
    env.alice.clone_ok(&["local:walt-test/busybox", "mine"]);
    env.alice
        .run(&["node", "boot", "node-000001", "mine"])
        .assert_success();
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), b"copied").unwrap();
    let src = file.path().to_str().unwrap();
    let fname = file.path().file_name().unwrap().to_str().unwrap();
    let cp = ["image", "cp", src, "mine:/root/"];

    // No answer (stdin at its end, as WalT's input() would find it):
    // refused, the hint giving --yes; nothing changed.
    let before = env.snapshot();
    let out = env.alice.run(&cp);
    out.assert_failure(&format!(
        "(use walt image cp --yes {src} mine:/root/ to confirm)"
    ));
    assert!(out.stderr.contains(WOULD_REBOOT), "{out}");
    assert!(out.stdout.is_empty(), "{out}");
    // "n": aborted, unchanged.
    let out = env.alice.run_with_input(&cp, "n\n");
    assert!(!out.success, "{out}");
    assert!(out.stderr.contains("Aborted."), "{out}");
    assert!(out.stdout.is_empty(), "{out}");
    env.assert_unchanged(&before);
    assert_eq!(image_file(&env, "mine", fname), None);
    // Something else, then "y" (WalT asks again): copied.
    let out = env.alice.run_with_input(&cp, "maybe\ny\n");
    out.assert_success();
    assert!(out.stderr.contains("Invalid response."), "{out}");
    assert!(out.stderr.contains(WOULD_REBOOT), "{out}");
    assert_eq!(image_file(&env, "mine", fname).as_deref(), Some("copied"));

    // squash (two layers now): the same rules.
    let before = env.snapshot();
    let out = env.alice.run(&["image", "squash", "mine"]);
    out.assert_failure("(use walt image squash --yes mine to confirm)");
    assert!(out.stdout.is_empty(), "{out}");
    let out = env
        .alice
        .run_with_input(&["image", "squash", "mine"], "n\n");
    assert!(!out.success && out.stderr.contains("Aborted."), "{out}");
    env.assert_unchanged(&before);
    let out = env
        .alice
        .run_with_input(&["image", "squash", "mine"], "y\n");
    out.assert_success();
    assert!(
        out.stdout
            .contains("Image mine squashed: 2 layers merged into 1."),
        "{out}"
    );
    assert_eq!(image_file(&env, "mine", fname).as_deref(), Some("copied"));

    // --yes does not ask.
    std::fs::write(file.path(), b"again").unwrap();
    env.alice
        .run(&["image", "cp", "--yes", src, "mine:/root/"])
        .assert_success();
    let out = env.alice.run(&["image", "squash", "--yes", "mine"]);
    out.assert_success();
    assert!(!out.stderr.contains(WOULD_REBOOT), "{out}");

    // On a terminal: the question, answered no.
    let before = env.snapshot();
    let (t, exit) = env
        .alice
        .in_terminal(&format!("image cp {src} mine:/root/"));
    t.wait_line("the question", |l| l.starts_with("Are you sure? (y/n):"))
        .unwrap();
    t.enter("n").unwrap();
    t.wait_line("aborted", |l| l == "Aborted.").unwrap();
    assert_ne!(
        t.exit_status(&exit, Duration::from_secs(60)),
        0,
        "{}",
        t.screen()
    );
    env.assert_unchanged(&before);

    // fix-image-owner refuses while some of the images are in use.
    env.bob
        .run(&[
            "advanced",
            "fix-image-owner",
            "--yes-i-know-do-it-please",
            "alice",
        ])
        .assert_failure("cannot take the images of alice: nodes use mine");
    assert!(env.alice.image_names().contains(&"mine".to_string()));
    assert!(!env.bob.image_names().contains(&"mine".to_string()));
}

// ----- 128 layers -----

#[test]
fn images_of_128_layers_are_refused_with_the_squash_hint() {
    let env = Env::start();
    let mut layers = vec![
        env.images
            .busybox_layer(Format::Oci, Compression::Gzip, "base")
            .unwrap(),
    ];
    for i in 1..128 {
        layers.push(
            env.images
                .layer(
                    Format::Oci,
                    Compression::Gzip,
                    &[RawEntry::file(
                        &format!("root/f{i}"),
                        i.to_string().as_bytes(),
                    )],
                )
                .unwrap(),
        );
    }
    let big = env
        .images
        .image(Format::Oci, ImageConfig::amd64(MODEL), &layers)
        .unwrap();
    env.push_local("walt-test/big", "latest", &big);
    // 127 layers: still opened.
    let fine = env
        .images
        .image(Format::Oci, ImageConfig::amd64(MODEL), &layers[..127])
        .unwrap();
    env.push_local("walt-test/fine", "latest", &fine);
    env.alice.clone_ok(&["local:walt-test/big", "big"]);
    env.alice.clone_ok(&["local:walt-test/fine", "fine"]);

    let hint = "(run walt image squash big first)";
    let file = tempfile::NamedTempFile::new().unwrap();
    let src = file.path().to_str().unwrap();
    let before = env.snapshot();
    let out = env.alice.run(&["image", "cp", src, "big:/root/"]);
    out.assert_failure(hint);
    assert!(out.stderr.contains("image 'big' has 128 layers"), "{out}");
    let dir = tempfile::tempdir().unwrap();
    env.alice
        .run(&["image", "cp", "big:/root/f1", dir.path().to_str().unwrap()])
        .assert_failure(hint);
    env.alice
        .run(&["image", "shell", "big"])
        .assert_failure(hint);
    let ctx = tempfile::tempdir().unwrap();
    std::fs::write(ctx.path().join("Dockerfile"), "FROM big\nRUN true\n").unwrap();
    env.alice
        .run(&[
            "image",
            "build",
            "--from-dir",
            ctx.path().to_str().unwrap(),
            "built",
        ])
        .assert_failure(hint);
    env.assert_unchanged(&before);
    // 127 layers: cp works; the result (128) then needs the squash.
    env.alice
        .run(&["image", "cp", src, "fine:/root/"])
        .assert_success();
    env.alice
        .run(&["image", "cp", src, "fine:/root/"])
        .assert_failure("(run walt image squash fine first)");
    // Squashed: opened again.
    env.alice.run(&["image", "squash", "big"]).assert_success();
    env.alice
        .run(&["image", "cp", src, "big:/root/"])
        .assert_success();
}
