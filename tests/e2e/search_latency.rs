//! The test proxy's latency mode, and `walt image search` through it: the
//! search keeps its connections to a distant registry open and bounded.

use std::process::Command;
use std::time::Duration;

use walt_e2e::*;

/// Round trip added by the proxy in these tests.
const RTT: Duration = Duration::from_millis(20);
/// Requests in flight per registry during a search (the server's
/// `REGISTRY_CONCURRENCY`, crates/walt-server/src/search.rs).
const SEARCH_CONCURRENCY: u64 = 32;

#[test]
fn latency_proxy_relays_a_whole_image_unchanged() {
    let reg = Registry::start(RegistryOpts::plain()).unwrap();
    let images = ImageBuilder::new().unwrap();
    let img = images
        .busybox_image(Format::Oci, Compression::Gzip, "pc-x86-64")
        .unwrap();
    reg.client()
        .push_image("alice/busybox", "latest", &img)
        .unwrap();
    let proxy = LatencyProxy::start(reg.port(), RTT).unwrap();
    let dir = tempfile::tempdir().unwrap();
    // skopeo checks every digest of what it reads.
    let out = Command::new("skopeo")
        .args(["--insecure-policy", "copy", "--src-tls-verify=false"])
        .arg(format!(
            "docker://127.0.0.1:{}/alice/busybox:latest",
            proxy.port()
        ))
        .arg(format!("oci:{}:x", dir.path().display()))
        .output()
        .expect("skopeo");
    assert!(
        out.status.success(),
        "skopeo copy through the proxy: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stats = proxy.stats();
    assert!(stats.connections >= 1, "{stats:?}");
    let layer = img.layers[0].size;
    assert!(
        stats.bytes_down > layer,
        "{stats:?}, layer of {layer} bytes"
    );
    assert!(stats.bytes_up > 0, "{stats:?}");
}

#[test]
fn search_through_a_distant_registry_reuses_a_bounded_set_of_connections() {
    let env = Env::start();
    let layer = env
        .images
        .layer(
            Format::Oci,
            Compression::Gzip,
            &[RawEntry::file("marker", b"far")],
        )
        .unwrap();
    let img = env
        .images
        .image(Format::Oci, ImageConfig::amd64("pc-x86-64"), &[layer])
        .unwrap();
    let client = env.local.client();
    let first = "far/img-000";
    client.push_image(first, "v1", &img).unwrap();
    // The other repositories mount the blobs of the first one.
    const REPOS: usize = 60;
    let names: Vec<String> = (1..REPOS).map(|i| format!("far/img-{i:03}")).collect();
    client.copy_to_repos(&img, first, &names, "v1", 4).unwrap();
    for i in 0..REPOS {
        client
            .put_manifest(
                &format!("far/img-{i:03}"),
                "v2",
                &img.manifest_media_type,
                &img.manifest,
            )
            .unwrap();
    }
    let proxy = LatencyProxy::start(env.local.port(), RTT).unwrap();
    let server = WaltServer::start(&[proxy.server_entry("far")]).unwrap();
    let alice = server.cli("alice", &[]);
    let out = alice.run(&["image", "search", "far/"]);
    out.assert_success();
    let found = out
        .stdout
        .lines()
        .filter(|l| l.contains("far:far/img-"))
        .count();
    assert_eq!(found, 2 * REPOS, "{out}");
    // catalog + tags of each repository + a manifest per tag, at least
    let requests = (1 + 3 * REPOS) as u64;
    // Kept-alive connections are reused: at most one per request in flight,
    // plus the few opened when a request starts just before the connection of
    // one that ended is back in the client's pool.
    let stats = proxy.stats();
    assert!(
        stats.connections <= 2 * SEARCH_CONCURRENCY,
        "{} connections for {requests}+ requests: the search should keep at most \
         {SEARCH_CONCURRENCY} requests in flight, on kept-alive connections",
        stats.connections
    );
    assert!(stats.bytes_down > 0 && stats.bytes_up > 0, "{stats:?}");
    eprintln!("search of {found} images through the latency proxy: {stats:?}");
}
