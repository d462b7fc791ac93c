//! `docker:` images: search and clone from a real Docker daemon on its own
//! socket, and what happens when the daemon is not there.

use walt_e2e::docker::Dockerd;
use walt_e2e::store::table_cells;
use walt_e2e::*;

/// A walt server whose config names `socket` as the Docker daemon, with the
/// plain `local` registry too.
fn server_with_docker(local: &Registry, socket: &std::path::Path) -> WaltServer {
    let yaml = format!(
        "registries:\n{}docker:\n    socket: {}\n",
        local.server_entry("local"),
        socket.display()
    );
    WaltServer::start_with_config(&yaml).unwrap()
}

/// Clone URLs of a search table.
fn search_urls(out: &CmdOutput) -> Vec<String> {
    out.stdout
        .lines()
        // The header and WalT's rule of dashes.
        .skip(2)
        .filter(|l| !l.trim().is_empty())
        .filter_map(|l| table_cells(l).last().cloned())
        .collect()
}

#[test]
fn docker_search_and_clone() {
    let dockerd = Dockerd::start().unwrap();
    dockerd
        .import_busybox("walt-test/dimg:latest", Some("pc-x86-64"), "from docker")
        .unwrap();
    dockerd
        .import_busybox("walt-test/plain:latest", None, "not walt")
        .unwrap();
    dockerd
        .import_busybox("walt-test/dimg:v2", Some("rpi-3-b,pc-x86-64"), "v2")
        .unwrap();
    let local = Registry::start(RegistryOpts::plain()).unwrap();
    let images = ImageBuilder::new().unwrap();
    let img = images
        .busybox_image(Format::Oci, Compression::Gzip, "pc-x86-64")
        .unwrap();
    local
        .client()
        .push_image("bob/regimg", "latest", &img)
        .unwrap();
    let mut server = server_with_docker(&local, &dockerd.socket());
    let alice = server.cli("alice", &[]);

    // Search: the labelled images only, with their docker: URLs.
    let out = alice.run(&["image", "search"]);
    out.assert_success();
    let urls = search_urls(&out);
    assert!(urls.contains(&"docker:walt-test/dimg".to_string()), "{out}");
    assert!(
        urls.contains(&"docker:walt-test/dimg:v2".to_string()),
        "{out}"
    );
    assert!(urls.contains(&"local:bob/regimg".to_string()), "{out}");
    assert!(!out.stdout.contains("plain"), "{out}");
    let row = out
        .stdout
        .lines()
        .find(|l| l.contains("docker:walt-test/dimg:v2"))
        .unwrap();
    assert!(
        table_cells(row).iter().any(|c| c == "docker daemon"),
        "{out}"
    );
    // Keyword.
    let out = alice.run(&["image", "search", "dimg:v2"]);
    out.assert_success();
    assert_eq!(search_urls(&out), ["docker:walt-test/dimg:v2"], "{out}");

    // Clone, then the content is docker's.
    let out = alice.clone_ok(&["docker:walt-test/dimg"]);
    assert!(out.last_stdout_line().contains("dimg"), "{out}");
    assert!(
        alice.show_row("dimg").is_some(),
        "{}",
        alice.run(&["image", "show"])
    );
    let diff_ids = dockerd.diff_ids("walt-test/dimg:latest").unwrap();
    assert_eq!(diff_ids.len(), 1);
    let data = server.data_dir();
    let layer = data
        .join("layers")
        .join(walt_e2e::util::digest_hex(&diff_ids[0]))
        .join("diff");
    assert_eq!(
        std::fs::read_to_string(layer.join("etc/walt-test-marker"))
            .unwrap()
            .trim(),
        "from docker"
    );
    assert!(layer.join("bin/busybox").is_file());
    assert_tmp_empty(&data);
    // The stored manifest and config are proper OCI documents.
    let manifests: Vec<serde_json::Value> = std::fs::read_dir(data.join("blobs/sha256"))
        .unwrap()
        .filter_map(|e| std::fs::read(e.unwrap().path()).ok())
        .filter(|b| b.first() == Some(&b'{'))
        .filter_map(|b| serde_json::from_slice(&b).ok())
        .filter(|v: &serde_json::Value| v.get("layers").is_some())
        .collect();
    assert_eq!(manifests.len(), 1);
    assert_eq!(
        manifests[0]["layers"][0]["mediaType"],
        "application/vnd.oci.image.layer.v1.tar"
    );

    // A tag, under another name; then again (refused without --force).
    alice.clone_ok(&["docker:walt-test/dimg:v2", "second"]);
    assert!(alice.show_row("second").is_some());
    alice
        .clone(&["docker:walt-test/dimg:v2", "second"])
        .assert_failure("--force");
    alice.clone_ok(&["--force", "docker:walt-test/dimg:v2", "second"]);

    // Missing, or not a walt image: clear errors, nothing changes.
    let before = store_snapshot(&data, &alice);
    alice
        .clone(&["docker:walt-test/nope"])
        .assert_failure("docker: image 'walt-test/nope:latest' not found");
    alice
        .clone(&["docker:walt-test/plain"])
        .assert_failure("walt.node.models");
    assert_store_unchanged(&before, &data, &alice);

    // The daemon stops: clone says so, search still answers for the others.
    drop(dockerd);
    let out = alice.clone(&["docker:walt-test/dimg", "third"]);
    out.assert_failure("the Docker daemon is not running");
    let out = alice.run(&["image", "search"]);
    out.assert_success();
    assert_eq!(search_urls(&out), ["local:bob/regimg"], "{out}");
    assert!(!out.stderr.to_lowercase().contains("docker"), "{out}");
    assert!(server.is_running());
}

#[test]
fn docker_absent_is_silent() {
    let local = Registry::start(RegistryOpts::plain()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server = server_with_docker(&local, &dir.path().join("docker.sock"));
    let alice = server.cli("alice", &[]);
    let out = alice.run(&["image", "search"]);
    assert!(!out.stderr.to_lowercase().contains("docker"), "{out}");
    let out = alice.clone(&["docker:walt-test/dimg"]);
    out.assert_failure("the Docker daemon is not running");
    assert!(out.stderr.contains("docker.sock"), "{out}");
}

/// A `docker:` clone stores its layers uncompressed; publishing compresses
/// them (gzip) and the published image clones back to the same content.
#[test]
fn publishing_a_docker_image_compresses_its_layers() {
    let dockerd = Dockerd::start().unwrap();
    dockerd
        .import_busybox("walt-test/dimg:latest", Some("pc-x86-64"), "from docker")
        .unwrap();
    let local = Registry::start(RegistryOpts::plain()).unwrap();
    let server = server_with_docker(&local, &dockerd.socket());
    let alice = server.cli("alice", &[]);
    alice.clone_ok(&["docker:walt-test/dimg"]);
    let out = alice.run(&["image", "publish", "--registry", "local", "dimg"]);
    out.assert_success();
    assert!(out.stderr.contains("compressing 1 layer"), "{out}");
    assert!(out.last_stdout_line().contains("local:alice/dimg"), "{out}");

    let (_, manifest) = local.client().get_manifest("alice/dimg", "latest").unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1, "{manifest}");
    assert!(
        layers[0]["mediaType"].as_str().unwrap().ends_with("gzip"),
        "layer not compressed: {manifest}"
    );
    // Same file system: the diff_ids Docker reports are those of the published config.
    let bob = server.cli("bob", &[]);
    bob.clone_ok(&["local:alice/dimg", "again"]);
    let diff_ids = dockerd.diff_ids("walt-test/dimg:latest").unwrap();
    let data = server.data_dir();
    for d in &diff_ids {
        let hex = d.strip_prefix("sha256:").unwrap();
        assert!(
            data.join("layers").join(hex).join("diff").is_dir(),
            "layer {d} missing"
        );
    }
    // Publishing again sends nothing new.
    let out = alice.run(&["image", "publish", "--registry", "local", "dimg"]);
    out.assert_success();
    assert!(!out.stderr.contains("compressing"), "{out}");
}
