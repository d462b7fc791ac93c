//! Self-tests of the harness: they use only the registry, skopeo, curl and
//! the proxy, never the walt binaries.

use std::process::Command;

use serde_json::Value;
use walt_e2e::image::{MODELS_LABEL, tar_entry_paths};
use walt_e2e::util::{port_open, sha256_digest};
use walt_e2e::*;

fn skopeo(args: &[&str]) -> std::process::Output {
    Command::new("skopeo")
        .arg("--insecure-policy")
        .args(args)
        .output()
        .expect("skopeo")
}

fn skopeo_json(args: &[&str]) -> Value {
    let out = skopeo(args);
    assert!(
        out.status.success(),
        "skopeo {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Copies to an OCI layout with skopeo, which checks every digest.
fn skopeo_copy_ok(src: &str, extra: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let dest = format!("oci:{}:x", dir.path().display());
    let mut args = vec!["copy"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&[src, &dest]);
    let out = skopeo(&args);
    assert!(
        out.status.success(),
        "skopeo {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn plain_registry_push_oci_gzip_then_skopeo_reads_it() {
    let reg = Registry::start(RegistryOpts::plain()).unwrap();
    let b = ImageBuilder::new().unwrap();
    let img = b
        .busybox_image(Format::Oci, Compression::Gzip, "pc-x86-64")
        .unwrap();
    reg.client()
        .push_image("alice/busybox", "latest", &img)
        .unwrap();
    // The manifest is stored byte for byte, without a top-level mediaType.
    let (ct, bytes) = reg
        .client()
        .get_manifest("alice/busybox", "latest")
        .unwrap();
    assert_eq!(ct, image::OCI_MANIFEST);
    assert_eq!(sha256_digest(&bytes), img.manifest_digest);
    assert!(
        serde_json::from_slice::<Value>(&bytes)
            .unwrap()
            .get("mediaType")
            .is_none()
    );
    let src = format!("docker://{}/alice/busybox:latest", reg.host_port());
    let v = skopeo_json(&["inspect", "--tls-verify=false", &src]);
    assert_eq!(v["Labels"][MODELS_LABEL], "pc-x86-64");
    assert_eq!(v["Architecture"], "amd64");
    assert_eq!(v["Layers"][0], img.layers[0].digest);
    skopeo_copy_ok(&src, &["--src-tls-verify=false"]);
    // The layer is a busybox rootfs.
    let paths = tar_entry_paths(&img.layers[0]).unwrap();
    for p in [
        "bin/busybox",
        "bin/sh",
        "etc/passwd",
        "root/",
        "tmp/",
        "proc/",
        "sys/",
        "dev/",
    ] {
        assert!(paths.iter().any(|x| x == p), "{p} missing from {paths:?}");
    }
    // The blob file in the registry storage is where the harness says.
    let data = std::fs::read(reg.blob_data_path(&img.layers[0].digest)).unwrap();
    assert_eq!(sha256_digest(&data), img.layers[0].digest);
}

#[test]
fn docker_schema2_and_zstd_and_uncompressed_images_are_valid() {
    let reg = Registry::start(RegistryOpts::plain()).unwrap();
    let b = ImageBuilder::new().unwrap();
    let cases = [
        (
            "docker",
            Format::Docker,
            Compression::Gzip,
            image::DOCKER_MANIFEST,
        ),
        ("zstd", Format::Oci, Compression::Zstd, image::OCI_MANIFEST),
        ("plain", Format::Oci, Compression::None, image::OCI_MANIFEST),
    ];
    for (name, format, comp, mt) in cases {
        let img = b.busybox_image(format, comp, "pc-x86-64").unwrap();
        reg.client()
            .push_image(&format!("t/{name}"), "v1", &img)
            .unwrap();
        let (ct, _) = reg
            .client()
            .get_manifest(&format!("t/{name}"), "v1")
            .unwrap();
        assert_eq!(ct, mt);
        let src = format!("docker://{}/t/{name}:v1", reg.host_port());
        let v = skopeo_json(&["inspect", "--tls-verify=false", &src]);
        assert_eq!(v["Labels"][MODELS_LABEL], "pc-x86-64", "{name}");
        skopeo_copy_ok(&src, &["--src-tls-verify=false"]);
        assert!(
            tar_entry_paths(&img.layers[0])
                .unwrap()
                .contains(&"bin/busybox".to_string())
        );
    }
}

#[test]
fn multi_arch_indexes_are_valid() {
    let reg = Registry::start(RegistryOpts::plain()).unwrap();
    let b = ImageBuilder::new().unwrap();
    for (name, format, mt) in [
        ("oci", Format::Oci, image::OCI_INDEX),
        ("docker", Format::Docker, image::DOCKER_LIST),
    ] {
        let amd = b
            .busybox_image(format, Compression::Gzip, "pc-x86-64")
            .unwrap();
        let arm_layer = b
            .layer(
                format,
                Compression::Gzip,
                &[
                    RawEntry::dir("etc/"),
                    RawEntry::file("etc/walt-test-marker", b"arm64\n"),
                ],
            )
            .unwrap();
        let arm = b
            .image(format, ImageConfig::arm64("rpi-3-b-plus"), &[arm_layer])
            .unwrap();
        let idx = b.index(format, &[arm.clone(), amd.clone()]).unwrap();
        reg.client()
            .push_index(&format!("t/{name}"), "latest", &idx)
            .unwrap();
        let (ct, bytes) = reg
            .client()
            .get_manifest(&format!("t/{name}"), "latest")
            .unwrap();
        assert_eq!(ct, mt);
        assert_eq!(sha256_digest(&bytes), idx.digest);
        let src = format!("docker://{}/t/{name}", reg.host_port());
        let v = skopeo_json(&[
            "--override-arch",
            "amd64",
            "inspect",
            "--tls-verify=false",
            &src,
        ]);
        assert_eq!(v["Labels"][MODELS_LABEL], "pc-x86-64");
        let v = skopeo_json(&[
            "--override-arch",
            "arm64",
            "inspect",
            "--tls-verify=false",
            &src,
        ]);
        assert_eq!(v["Labels"][MODELS_LABEL], "rpi-3-b-plus");
        assert_eq!(v["Layers"][0], arm.layers[0].digest);
    }
}

#[test]
fn tls_basic_auth_registry_requires_credentials_and_verifies_with_the_ca() {
    let reg = Registry::start(RegistryOpts::tls_basic("u1", "p1")).unwrap();
    let b = ImageBuilder::new().unwrap();
    let img = b
        .busybox_image(Format::Oci, Compression::Gzip, "pc-x86-64")
        .unwrap();
    reg.client().push_image("u1/img", "latest", &img).unwrap();
    // No credentials: 401. Wrong ones: 401.
    let mut anon = reg.client();
    anon.auth = None;
    assert_eq!(anon.request("GET", "/v2/", &[], None).unwrap().status, 401);
    anon.auth = Some(("u1".into(), "nope".into()));
    assert_eq!(anon.request("GET", "/v2/", &[], None).unwrap().status, 401);
    // Without the CA, TLS verification fails.
    let mut unverified = reg.client();
    unverified.ca_cert = None;
    assert!(unverified.request("GET", "/v2/", &[], None).is_err());
    // skopeo, verifying with the CA.
    let certs = tempfile::tempdir().unwrap();
    std::fs::copy(reg.ca_cert().unwrap(), certs.path().join("ca.crt")).unwrap();
    let src = format!("docker://{}/u1/img", reg.host_port());
    let cert_dir = certs.path().to_str().unwrap();
    let v = skopeo_json(&["inspect", "--cert-dir", cert_dir, "--creds", "u1:p1", &src]);
    assert_eq!(v["Labels"][MODELS_LABEL], "pc-x86-64");
    assert!(
        !skopeo(&["inspect", "--cert-dir", cert_dir, "--creds", "u1:bad", &src])
            .status
            .success()
    );
    assert!(
        !skopeo(&["inspect", "--creds", "u1:p1", &src])
            .status
            .success(),
        "verifies without CA?"
    );
}

#[test]
fn registry_stop_and_restart_keep_the_storage() {
    let mut reg = Registry::start(RegistryOpts::plain()).unwrap();
    let b = ImageBuilder::new().unwrap();
    let img = b
        .busybox_image(Format::Oci, Compression::Gzip, "pc-x86-64")
        .unwrap();
    reg.client().push_image("a/b", "latest", &img).unwrap();
    reg.stop();
    assert!(!port_open(reg.port()));
    assert!(reg.client().request("GET", "/v2/", &[], None).is_err());
    reg.restart().unwrap();
    assert_eq!(
        reg.client().get_manifest("a/b", "latest").unwrap().1,
        img.manifest
    );
}

#[test]
fn hostile_layers_hold_the_raw_entries() {
    let b = ImageBuilder::new().unwrap();
    let l = b
        .layer(
            Format::Oci,
            Compression::Gzip,
            &[
                RawEntry::file("../x", b"x"),
                RawEntry::file("/abs/file", b"y"),
                RawEntry::symlink("etc", "/etc"),
                RawEntry::file("etc/walt-pwned", b"z"),
            ],
        )
        .unwrap();
    assert_eq!(
        tar_entry_paths(&l.blob).unwrap(),
        ["../x", "/abs/file", "etc", "etc/walt-pwned"]
    );
}

#[test]
fn proxy_fault_modes() {
    let reg = Registry::start(RegistryOpts::plain()).unwrap();
    let b = ImageBuilder::new().unwrap();
    // A 2 MiB incompressible layer.
    let layer = b
        .big_random_layer(Format::Oci, Compression::None, 2 << 20, 7)
        .unwrap();
    let img = b
        .image(
            Format::Oci,
            ImageConfig::amd64("pc-x86-64"),
            std::slice::from_ref(&layer),
        )
        .unwrap();
    reg.client().push_image("p/big", "latest", &img).unwrap();
    let proxy = Proxy::start(reg.port()).unwrap();
    let client = reg.client().with_base_url(proxy.base_url());
    let path = format!("/v2/p/big/blobs/{}", layer.blob.digest);

    // Plain forwarding (manifests too).
    assert_eq!(
        client.get_manifest("p/big", "latest").unwrap().1,
        img.manifest
    );
    let r = client.request("GET", &path, &[], None).unwrap();
    assert_eq!(
        (r.status, sha256_digest(&r.body)),
        (200, layer.blob.digest.clone())
    );
    assert_eq!(r.header("connection"), Some("close"));

    // 500 twice, then recovery.
    proxy.fail_first_n_blob_gets(2);
    assert_eq!(client.request("GET", &path, &[], None).unwrap().status, 500);
    assert_eq!(client.request("GET", &path, &[], None).unwrap().status, 500);
    let r = client.request("GET", &path, &[], None).unwrap();
    assert_eq!(
        (r.status, sha256_digest(&r.body)),
        (200, layer.blob.digest.clone())
    );
    assert_eq!(proxy.stats().injected_failures, 2);

    // Truncation: full Content-Length announced, connection closed early.
    proxy.truncate_blob_after(Some(100_000));
    let err = client
        .request("GET", &path, &[], None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("curl"), "{err}");
    let raw = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{size_download}",
            &format!("{}{path}", proxy.base_url()),
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&raw.stdout), "100000");
    assert_eq!(raw.status.code(), Some(18), "curl: partial file");
    proxy.truncate_blob_after(None);

    // Rate limit: the whole blob arrives, paced: at 1 MiB/s the proxy holds
    // back most of the 32 chunks of 64 KiB of a 2 MiB blob until they are due
    // (the first is sent at once; loopback is far faster than the rate).
    proxy.rate_limit(Some(1 << 20));
    let paced_before = proxy.stats().paced_chunks;
    let r = client.request("GET", &path, &[], None).unwrap();
    assert_eq!(
        (r.status, sha256_digest(&r.body)),
        (200, layer.blob.digest.clone())
    );
    let paced = proxy.stats().paced_chunks - paced_before;
    assert!(
        paced >= 16,
        "rate limit not applied: {paced} of 32 chunks held back"
    );

    // Faults cleared: the blob is forwarded whole, once, with no fault.
    proxy.clear_faults();
    let before = proxy.stats();
    let r = client.request("GET", &path, &[], None).unwrap();
    assert_eq!(
        (r.status, sha256_digest(&r.body)),
        (200, layer.blob.digest.clone())
    );
    let after = proxy.stats();
    assert_eq!(after.blob_gets, before.blob_gets + 1);
    assert_eq!(
        (after.injected_failures, after.truncated),
        (before.injected_failures, before.truncated)
    );
    assert_eq!(
        after.requests[before.requests.len()..],
        [format!("GET {path} -> 200")]
    );
}
