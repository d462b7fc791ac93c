//! Default images of node models: fetched once per model however many
//! nodes report at once, from the sources in order (hub, registries,
//! Docker daemon), anonymously, for the model's platform; and
//! `walt advanced update-default-images`. Real registries, the real
//! `walt-dhcp-event` hook against the real server; the store database is
//! read (read-only) to see what the devices became.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use walt_e2e::dhcp::{DeviceRow, devices, store_db};
use walt_e2e::util::{sha256_digest, wait_for, workspace_bin};
use walt_e2e::*;

/// The device `mac` as the server recorded it.
fn device(server: &WaltServer, mac: &str) -> Option<DeviceRow> {
    devices(&server.data_dir())
        .ok()?
        .into_iter()
        .find(|d| d.mac == mac)
}

/// The manifest digest of the stored image `owner/name:latest`.
fn stored_manifest(server: &WaltServer, owner: &str, name: &str) -> Option<String> {
    store_db(&server.data_dir())
        .unwrap()
        .query_row(
            "SELECT manifest_digest FROM images WHERE owner = ?1 AND name = ?2 AND tag = 'latest'",
            [owner, name],
            |r| r.get(0),
        )
        .ok()
}

/// `walt-dhcp-event commit` of a device announcing `model` (WalT's
/// arguments), started, not waited for.
fn spawn_lease(server: &WaltServer, model: &str, mac: &str, ip: &str) -> Child {
    Command::new(workspace_bin("walt-dhcp-event"))
        .args([
            "commit",
            &format!("walt.node.{model}"),
            "",
            ip,
            mac,
            "",
            "0",
            "unknown",
        ])
        .env("WALT_DHCP_EVENT_SOCKET", server.event_socket())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot run walt-dhcp-event")
}

/// One lease commit, waited for (the hook returns at once).
fn lease(server: &WaltServer, model: &str, mac: &str, ip: &str) {
    let out = spawn_lease(server, model, mac, ip)
        .wait_with_output()
        .unwrap();
    assert!(out.status.success(), "walt-dhcp-event: {out:?}");
}

/// Waits until `mac` is a node, and returns it.
#[track_caller]
fn wait_node(server: &WaltServer, mac: &str) -> DeviceRow {
    wait_for(
        &format!("{mac} to be a node"),
        Duration::from_secs(90),
        || device(server, mac).filter(|d| d.kind == "node"),
    )
    .unwrap_or_else(|e| {
        panic!(
            "{e}\n{:?}\nserver log:\n{}",
            device(server, mac),
            server.log()
        )
    })
}

/// Waits until `mac` is an unknown device whose reason holds `needle`.
#[track_caller]
fn wait_unknown(server: &WaltServer, mac: &str, needle: &str) -> DeviceRow {
    wait_for(
        &format!("{mac} to be unknown because of `{needle}`"),
        Duration::from_secs(90),
        || {
            device(server, mac).filter(|d| {
                d.kind == "unknown" && d.reason.as_deref().is_some_and(|r| r.contains(needle))
            })
        },
    )
    .unwrap_or_else(|e| {
        panic!(
            "{e}\n{:?}\nserver log:\n{}",
            device(server, mac),
            server.log()
        )
    })
}

/// A server whose sources are `entries` (a `registries:` list) and a
/// Docker daemon socket where nothing listens.
fn server_with(entries: &[String], docker: &tempfile::TempDir) -> WaltServer {
    let yaml = format!(
        "registries:\n{}docker:\n    socket: {}\n",
        entries.concat(),
        docker.path().join("docker.sock").display()
    );
    WaltServer::start_with_config(&yaml).unwrap()
}

/// A hub entry whose registry is at `port`.
fn hub_entry(port: u16) -> String {
    format!(
        "-   label: hub\n    api: docker-hub\n    description: Test hub\n\
         \x20   registry-url: http://127.0.0.1:{port}\n    search-url: http://127.0.0.1:{port}\n"
    )
}

/// `image` with its config's `created` set to `created` (a new config
/// blob and manifest, same layers).
fn with_created(dir: &tempfile::TempDir, image: &BuiltImage, created: &str) -> BuiltImage {
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&image.config.path).unwrap()).unwrap();
    config["created"] = created.into();
    let bytes = serde_json::to_vec(&config).unwrap();
    let digest = sha256_digest(&bytes);
    let path = dir.path().join(&digest[7..]);
    std::fs::write(&path, &bytes).unwrap();
    let mut out = image.clone();
    out.config = walt_e2e::image::Blob {
        path,
        digest,
        size: bytes.len() as u64,
        media_type: image.config.media_type.clone(),
    };
    let mut manifest: serde_json::Value = serde_json::from_slice(&image.manifest).unwrap();
    manifest["config"] = out.config.descriptor();
    out.manifest = serde_json::to_vec(&manifest).unwrap();
    out.manifest_digest = sha256_digest(&out.manifest);
    out
}

#[test]
fn fifty_nodes_of_a_new_model_fetch_its_default_image_once() {
    let registry = Registry::start(RegistryOpts::plain()).unwrap();
    // The proxy counts every request the server makes to the registry.
    let proxy = Proxy::start(registry.port()).unwrap();
    let images = ImageBuilder::new().unwrap();
    let layers = [
        images
            .busybox_layer(Format::Oci, Compression::Gzip, "first")
            .unwrap(),
        images
            .layer(
                Format::Oci,
                Compression::Gzip,
                &[RawEntry::file("etc/second", b"second layer\n")],
            )
            .unwrap(),
    ];
    let img = images
        .image(Format::Oci, ImageConfig::amd64("pc-x86-64"), &layers)
        .unwrap();
    let repo = "waltplatform/pc-x86-64-default";
    registry.client().push_image(repo, "latest", &img).unwrap();
    let docker = tempfile::tempdir().unwrap();
    let server = server_with(&[proxy.server_entry("local")], &docker);

    // Fifty nodes of the model report at once.
    let macs: Vec<String> = (0..50).map(|i| format!("52:54:00:00:10:{i:02x}")).collect();
    let hooks: Vec<Child> = macs
        .iter()
        .enumerate()
        .map(|(i, mac)| {
            spawn_lease(
                &server,
                "pc-x86-64",
                mac,
                &format!("192.168.152.{}", 100 + i),
            )
        })
        .collect();
    for h in hooks {
        let out = h.wait_with_output().unwrap();
        assert!(out.status.success(), "walt-dhcp-event: {out:?}");
    }
    for mac in &macs {
        let dev = wait_node(&server, mac);
        assert_eq!(dev.image.as_deref(), Some(&*format!("{repo}:latest")));
        assert_eq!(dev.manifest.as_deref(), Some(&*img.manifest_digest));
    }

    // One manifest fetch, one download of each blob.
    let requests = proxy.stats().requests;
    let count = |prefix: &str| requests.iter().filter(|r| r.starts_with(prefix)).count();
    assert_eq!(
        count(&format!("GET /v2/{repo}/manifests/")),
        1,
        "{requests:#?}"
    );
    for blob in [&img.config].into_iter().chain(&img.layers) {
        assert_eq!(
            count(&format!("GET /v2/{repo}/blobs/{}", blob.digest)),
            1,
            "{}: {requests:#?}",
            blob.digest
        );
    }
    assert_eq!(
        count(&format!("GET /v2/{repo}/blobs/")),
        1 + img.layers.len(),
        "{requests:#?}"
    );
    let log = server.log();
    assert_eq!(
        log.matches("trying to download the default image of pc-x86-64")
            .count(),
        1,
        "{log}"
    );
    assert!(
        log.contains(
            "default image of pc-x86-64 downloaded from local:waltplatform/pc-x86-64-default:latest"
        ),
        "{log}"
    );
    assert_tmp_empty(&server.data_dir());
}

#[test]
fn hub_down_then_every_source_down_then_a_source_back() {
    // The hub's registry: stopped, it refuses connections.
    let mut hub = Registry::start(RegistryOpts::plain()).unwrap();
    let mut local = Registry::start(RegistryOpts::plain()).unwrap();
    let images = ImageBuilder::new().unwrap();
    let pc64 = images
        .busybox_image(Format::Oci, Compression::Gzip, "pc-x86-64")
        .unwrap();
    let pc32 = images
        .busybox_image(Format::Docker, Compression::Gzip, "pc-x86-32")
        .unwrap();
    local
        .client()
        .push_image("waltplatform/pc-x86-64-default", "latest", &pc64)
        .unwrap();
    local
        .client()
        .push_image("waltplatform/pc-x86-32-default", "latest", &pc32)
        .unwrap();
    let docker = tempfile::tempdir().unwrap();
    let server = server_with(
        &[hub_entry(hub.port()), local.server_entry("local")],
        &docker,
    );
    hub.stop();

    // The hub is down: the local registry serves it.
    lease(&server, "pc-x86-64", "52:54:00:00:20:01", "192.168.152.21");
    let node = wait_node(&server, "52:54:00:00:20:01");
    assert_eq!(node.manifest.as_deref(), Some(&*pc64.manifest_digest));
    let log = server.log();
    assert!(
        log.contains("default image of pc-x86-64 not taken from hub"),
        "{log}"
    );
    assert!(
        log.contains(
            "default image of pc-x86-64 downloaded from local:waltplatform/pc-x86-64-default:latest"
        ),
        "{log}"
    );

    // Every source down: the device stays unknown, and why is said for
    // each source, in order.
    local.stop();
    lease(&server, "pc-x86-32", "52:54:00:00:20:02", "192.168.152.22");
    let dev = wait_unknown(
        &server,
        "52:54:00:00:20:02",
        "new pc-x86-32 nodes stay unknown until this is solved",
    );
    let reason = dev.reason.unwrap();
    let (hub_at, local_at, docker_at) = (
        reason.find("hub: ").expect(&reason),
        reason.find("local: ").expect(&reason),
        reason.find("docker: not running").expect(&reason),
    );
    assert!(hub_at < local_at && local_at < docker_at, "{reason}");
    // Each registry's reason names what failed.
    for port in [hub.port(), local.port()] {
        assert!(reason.contains(&format!("127.0.0.1:{port}")), "{reason}");
    }
    let log = server.log();
    assert!(
        log.contains("cannot download the default image of pc-x86-32")
            && log.contains("docker: not running; new pc-x86-32 nodes stay unknown"),
        "{log}"
    );
    assert!(stored_manifest(&server, "waltplatform", "pc-x86-32-default").is_none());
    assert_tmp_empty(&server.data_dir());

    // A source is back: the next lease succeeds.
    local.restart().unwrap();
    lease(&server, "pc-x86-32", "52:54:00:00:20:02", "192.168.152.22");
    let node = wait_node(&server, "52:54:00:00:20:02");
    assert_eq!(node.manifest.as_deref(), Some(&*pc32.manifest_digest));
    assert_eq!(
        node.image.as_deref(),
        Some("waltplatform/pc-x86-32-default:latest")
    );
}

#[test]
fn a_registry_wanting_credentials_is_skipped_and_labels_are_checked() {
    let secure = Registry::start(RegistryOpts::tls_basic(SECURE_USER, SECURE_PASS)).unwrap();
    let local = Registry::start(RegistryOpts::plain()).unwrap();
    let images = ImageBuilder::new().unwrap();
    let on_secure = images
        .image(
            Format::Oci,
            ImageConfig::amd64("pc-x86-64"),
            &[images
                .busybox_layer(Format::Oci, Compression::Gzip, "secure copy")
                .unwrap()],
        )
        .unwrap();
    let on_local = images
        .image(
            Format::Oci,
            ImageConfig::amd64("pc-x86-64"),
            &[images
                .busybox_layer(Format::Oci, Compression::Gzip, "local copy")
                .unwrap()],
        )
        .unwrap();
    secure
        .client()
        .push_image("waltplatform/pc-x86-64-default", "latest", &on_secure)
        .unwrap();
    local
        .client()
        .push_image("waltplatform/pc-x86-64-default", "latest", &on_local)
        .unwrap();
    // A default image whose label does not list the model it is named for.
    let wrong = images
        .busybox_image(Format::Oci, Compression::Gzip, "pc-x86-64")
        .unwrap();
    local
        .client()
        .push_image("waltplatform/rpi-4-b-default", "latest", &wrong)
        .unwrap();
    let docker = tempfile::tempdir().unwrap();
    // `secure` first: tried before `local`.
    let server = server_with(
        &[secure.server_entry("secure"), local.server_entry("local")],
        &docker,
    );

    lease(&server, "pc-x86-64", "52:54:00:00:30:01", "192.168.152.31");
    let node = wait_node(&server, "52:54:00:00:30:01");
    assert_eq!(node.manifest.as_deref(), Some(&*on_local.manifest_digest));
    let log = server.log();
    assert!(
        log.contains("registry 'secure' skipped for the default image of pc-x86-64: requires credentials (default images are fetched anonymously)"),
        "{log}"
    );

    lease(&server, "rpi-4-b", "dc:a6:32:00:30:02", "192.168.152.32");
    let dev = wait_unknown(
        &server,
        "dc:a6:32:00:30:02",
        "local: its walt.node.models label (pc-x86-64) does not list rpi-4-b",
    );
    assert!(
        dev.reason
            .as_deref()
            .unwrap()
            .contains("secure: requires credentials"),
        "{dev:?}"
    );
    assert!(stored_manifest(&server, "waltplatform", "rpi-4-b-default").is_none());
    assert_tmp_empty(&server.data_dir());
}

#[test]
fn arm_models_take_their_platform_from_an_index() {
    let local = Registry::start(RegistryOpts::plain()).unwrap();
    let images = ImageBuilder::new().unwrap();
    let models = "rpi-b,rpi-2-b,rpi-3-b,pc-x86-64,toaster";
    let of = |config: ImageConfig, marker: &str| {
        let layer = images
            .busybox_layer(Format::Oci, Compression::Gzip, marker)
            .unwrap();
        images.image(Format::Oci, config, &[layer]).unwrap()
    };
    let amd64 = of(ImageConfig::amd64(models), "amd64");
    let arm64 = of(ImageConfig::arm64(models), "arm64");
    let armv7 = of(ImageConfig::armv7(models), "armv7");
    let index = images
        .index(Format::Oci, &[amd64.clone(), arm64.clone(), armv7.clone()])
        .unwrap();
    for model in ["rpi-b", "rpi-2-b", "rpi-3-b", "toaster"] {
        local
            .client()
            .push_index(&format!("waltplatform/{model}-default"), "latest", &index)
            .unwrap();
    }
    let docker = tempfile::tempdir().unwrap();
    let server = server_with(&[local.server_entry("local")], &docker);

    // arm64 first for a Raspberry Pi 3.
    lease(&server, "rpi-3-b", "b8:27:eb:00:40:03", "192.168.152.43");
    let node = wait_node(&server, "b8:27:eb:00:40:03");
    assert_eq!(node.manifest.as_deref(), Some(&*arm64.manifest_digest));
    // arm/v7 for a Raspberry Pi 2.
    lease(&server, "rpi-2-b", "b8:27:eb:00:40:02", "192.168.152.42");
    let node = wait_node(&server, "b8:27:eb:00:40:02");
    assert_eq!(node.manifest.as_deref(), Some(&*armv7.manifest_digest));
    // arm/v6 only for a Raspberry Pi B: this index has none.
    lease(&server, "rpi-b", "b8:27:eb:00:40:01", "192.168.152.41");
    let dev = wait_unknown(
        &server,
        "b8:27:eb:00:40:01",
        "local:waltplatform/rpi-b-default:latest has no image for linux/arm/v6 (it has: linux/amd64, linux/arm64/v8, linux/arm/v7)",
    );
    assert!(dev.image.is_none());
    assert!(stored_manifest(&server, "waltplatform", "rpi-b-default").is_none());
    // A model walt does not know: the server's own platform.
    let own = match std::env::consts::ARCH {
        "x86_64" => &amd64,
        "aarch64" => &arm64,
        _ => return,
    };
    lease(&server, "toaster", "52:54:00:00:40:04", "192.168.152.44");
    let node = wait_node(&server, "52:54:00:00:40:04");
    assert_eq!(node.manifest.as_deref(), Some(&*own.manifest_digest));
}

#[test]
fn the_docker_daemon_serves_and_updates_default_images() {
    let dockerd = walt_e2e::docker::Dockerd::start().unwrap();
    let local = Registry::start(RegistryOpts::plain()).unwrap();
    let images = ImageBuilder::new().unwrap();
    // On the registry, created 2024-05-01: what the daemon has is newer.
    let old = images
        .busybox_image(Format::Oci, Compression::Gzip, "pc-x86-64")
        .unwrap();
    local
        .client()
        .push_image("waltplatform/pc-x86-64-default", "latest", &old)
        .unwrap();
    dockerd
        .import_busybox(
            "waltplatform/pc-x86-32-default:latest",
            Some("pc-x86-32"),
            "from dockerd",
        )
        .unwrap();
    dockerd
        .import_busybox(
            "waltplatform/rpi-4-b-default:latest",
            Some("pc-x86-64"),
            "wrong models",
        )
        .unwrap();
    let yaml = format!(
        "registries:\n{}docker:\n    socket: {}\n",
        local.server_entry("local"),
        dockerd.socket().display()
    );
    let server = WaltServer::start_with_config(&yaml).unwrap();

    // Nowhere but on the daemon.
    lease(&server, "pc-x86-32", "52:54:00:00:60:01", "192.168.152.61");
    let node = wait_node(&server, "52:54:00:00:60:01");
    assert_eq!(
        node.image.as_deref(),
        Some("waltplatform/pc-x86-32-default:latest")
    );
    let log = server.log();
    assert!(
        log.contains(
            "default image of pc-x86-32 downloaded from docker:waltplatform/pc-x86-32-default:latest"
        ),
        "{log}"
    );
    // The daemon's image must list the model too.
    lease(&server, "rpi-4-b", "dc:a6:32:00:60:02", "192.168.152.62");
    wait_unknown(
        &server,
        "dc:a6:32:00:60:02",
        "local: not found; docker: its walt.node.models label (pc-x86-64) does not list rpi-4-b",
    );
    assert!(stored_manifest(&server, "waltplatform", "rpi-4-b-default").is_none());

    // From the registry; then the daemon gets a newer one.
    lease(&server, "pc-x86-64", "52:54:00:00:60:03", "192.168.152.63");
    let node = wait_node(&server, "52:54:00:00:60:03");
    assert_eq!(node.manifest.as_deref(), Some(&*old.manifest_digest));
    dockerd
        .import_busybox(
            "waltplatform/pc-x86-64-default:latest",
            Some("pc-x86-64"),
            "newer, from dockerd",
        )
        .unwrap();
    let alice = server.cli("alice", &[]);
    let out = alice.run(&["advanced", "update-default-images"]);
    out.assert_success();
    let url = "docker:waltplatform/pc-x86-64-default:latest";
    assert!(
        out.stderr.contains(&format!(
            "Updating waltplatform/pc-x86-64-default from {url}..."
        )),
        "{out}"
    );
    assert!(
        out.stdout
            .contains("No update available for waltplatform/pc-x86-32-default."),
        "{out}"
    );
    let updated = stored_manifest(&server, "waltplatform", "pc-x86-64-default").unwrap();
    assert_ne!(updated, old.manifest_digest);
    let node = device(&server, "52:54:00:00:60:03").unwrap();
    assert_eq!(node.manifest.as_deref(), Some(&*updated));

    // `clone --force` from the daemon over an image a node boots: refused
    // when the new image drops the node's model, as from other sources.
    alice.clone_ok(&["docker:waltplatform/pc-x86-32-default:latest", "mine"]);
    alice
        .run(&["node", "boot", "52:54:00:00:60:01", "mine"])
        .assert_success();
    let before = stored_manifest(&server, "alice", "mine").unwrap();
    let out = alice.clone(&[
        "--force",
        "docker:waltplatform/rpi-4-b-default:latest",
        "mine",
    ]);
    out.assert_failure("does not support the model of node");
    assert!(out.stderr.contains("(pc-x86-32)"), "{out}");
    assert_eq!(stored_manifest(&server, "alice", "mine").unwrap(), before);
    assert_tmp_empty(&server.data_dir());
}

#[test]
fn update_default_images_fetches_what_is_newer() {
    let local = Registry::start(RegistryOpts::plain()).unwrap();
    let images = ImageBuilder::new().unwrap();
    let configs = tempfile::tempdir().unwrap();
    let repo = "waltplatform/pc-x86-64-default";
    let v1 = images
        .busybox_image(Format::Oci, Compression::Gzip, "pc-x86-64")
        .unwrap();
    local.client().push_image(repo, "latest", &v1).unwrap();
    let docker = tempfile::tempdir().unwrap();
    let server = server_with(&[local.server_entry("local")], &docker);
    let alice = server.cli("alice", &[]);

    // Nothing stored yet.
    let out = alice.run(&["advanced", "update-default-images"]);
    out.assert_success();
    assert!(
        out.stdout
            .contains("No default image is stored: nothing to update."),
        "{out}"
    );

    lease(&server, "pc-x86-64", "52:54:00:00:50:01", "192.168.152.51");
    assert_eq!(
        wait_node(&server, "52:54:00:00:50:01").manifest.as_deref(),
        Some(&*v1.manifest_digest)
    );

    // The same image on the registry: nothing newer.
    let out = alice.run(&["advanced", "update-default-images"]);
    out.assert_success();
    assert!(
        out.stdout
            .contains("No update available for waltplatform/pc-x86-64-default."),
        "{out}"
    );
    // An older one is not newer either.
    let older = with_created(&configs, &v1, "2023-01-01T00:00:00Z");
    local.client().push_image(repo, "latest", &older).unwrap();
    let out = alice.run(&["advanced", "update-default-images"]);
    out.assert_success();
    assert!(out.stdout.contains("No update available"), "{out}");
    assert_eq!(
        stored_manifest(&server, "waltplatform", "pc-x86-64-default").as_deref(),
        Some(&*v1.manifest_digest)
    );

    // A newer one is fetched, said, and the node follows it.
    let newer = with_created(&configs, &v1, "2025-06-01T08:00:00.5+02:00");
    local.client().push_image(repo, "latest", &newer).unwrap();
    let out = alice.run(&["advanced", "update-default-images"]);
    out.assert_success();
    let url = "local:waltplatform/pc-x86-64-default:latest";
    assert!(
        out.stderr.contains(&format!(
            "Updating waltplatform/pc-x86-64-default from {url}..."
        )),
        "{out}"
    );
    assert!(
        out.stdout.contains(&format!(
            "Image waltplatform/pc-x86-64-default updated from {url}."
        )),
        "{out}"
    );
    assert_eq!(
        stored_manifest(&server, "waltplatform", "pc-x86-64-default").as_deref(),
        Some(&*newer.manifest_digest)
    );
    let node = device(&server, "52:54:00:00:50:01").unwrap();
    assert_eq!(node.manifest.as_deref(), Some(&*newer.manifest_digest));

    // And then it is the newest.
    let out = alice.run(&["advanced", "update-default-images"]);
    out.assert_success();
    assert!(out.stdout.contains("No update available"), "{out}");
}
