//! Every way a clone can fail: exit != 0, one `error:` line, the expected
//! message, the store unchanged and tmp/ empty.

use std::fs::OpenOptions;
use std::io::{Seek, SeekFrom, Write};

use crate::common::*;
use walt_e2e::util::list_tree;
use walt_e2e::*;

/// Runs a failing clone and checks nothing changed.
#[track_caller]
fn refused(env: &Env, args: &[&str], needles: &[&str]) -> CmdOutput {
    let before = env.snapshot();
    let out = env.alice.clone(args);
    out.assert_failure_any(needles);
    env.assert_unchanged(&before);
    out
}

#[test]
fn malformed_url() {
    let env = Env::start();
    for url in ["not-a-url", "local:", "local:/", ":walt-test/busybox"] {
        refused(&env, &[url], &["malformed clone url"]);
    }
}

#[test]
fn unknown_registry_label() {
    let env = Env::start();
    refused(&env, &["nowhere:walt-test/busybox"], &["unknown registry"]);
}

#[test]
fn nonexistent_repository() {
    let env = Env::start();
    refused(&env, &["local:nobody/nothing"], &["not found"]);
}

#[test]
fn nonexistent_tag() {
    let env = Env::start();
    push_busybox(&env, "walt-test/busybox", "latest");
    refused(&env, &["local:walt-test/busybox:nope"], &["not found"]);
}

#[test]
fn image_without_walt_label() {
    let env = Env::start();
    let layer = env
        .images
        .busybox_layer(Format::Oci, Compression::Gzip, "plain")
        .unwrap();
    let img = env
        .images
        .image(Format::Oci, ImageConfig::amd64_unlabelled(), &[layer])
        .unwrap();
    env.push_local("walt-test/plain", "latest", &img);
    refused(&env, &["local:walt-test/plain"], &["walt.node.models"]);
}

#[test]
fn registry_down() {
    let mut env = Env::start();
    push_busybox(&env, "walt-test/busybox", "latest");
    env.local.stop();
    refused(&env, &["local:walt-test/busybox"], &["unreachable"]);
    // Back up: the same clone works.
    env.local.restart().unwrap();
    assert_cloned(&env.alice.clone_ok(&["local:walt-test/busybox"]), "busybox");
}

#[test]
fn registry_answers_500_twice_then_recovers() {
    let env = Env::start_with(EnvOpts {
        proxy: true,
        ..Default::default()
    });
    let img = push_busybox(&env, "walt-test/busybox", "latest");
    let proxy = env.proxy.as_ref().unwrap();
    proxy.fail_first_n_blob_gets(2);
    let out = env.alice.clone_ok(&["flaky:walt-test/busybox"]);
    assert_cloned(&out, "busybox");
    let stats = proxy.stats();
    assert_eq!(stats.injected_failures, 2, "{:#?}", stats.requests);
    assert!(store_has_layer(&env, &img, 0));
    assert_tmp_empty(&env.server.data_dir());
}

/// Pushes `base busybox layer + extra layer` after cloning the base image,
/// then overwrites 21 bytes in the middle of the extra layer's file in the
/// registry storage (same size, wrong content), and expects the clone of
/// the corrupt image to fail without touching the store.
fn corrupt_blob_refused(compression: Compression) {
    let env = Env::start();
    // A good image first: its layer is shared with the bad one and must survive.
    let good = push_busybox(&env, "walt-test/busybox", "latest");
    env.alice.clone_ok(&["local:walt-test/busybox"]);
    let base = Layer {
        blob: good.layers[0].clone(),
        diff_id: good.diff_ids[0].clone(),
    };
    let mut payload = vec![0u8; 200_000];
    walt_e2e::util::FastRng::new(3).fill(&mut payload);
    let extra = env
        .images
        .layer(
            Format::Oci,
            compression,
            &[
                RawEntry::dir("root/"),
                RawEntry::file("root/payload", &payload),
            ],
        )
        .unwrap();
    let bad = env
        .images
        .image(
            Format::Oci,
            ImageConfig::amd64("pc-x86-64"),
            &[base, extra.clone()],
        )
        .unwrap();
    env.push_local("walt-test/corrupt", "latest", &bad);
    // Same size, different bytes, inside the payload (the tar headers stay valid).
    let path = env.local.blob_data_path(&extra.blob.digest);
    let mut f = OpenOptions::new().write(true).open(&path).unwrap();
    f.seek(SeekFrom::Start(extra.blob.size / 2)).unwrap();
    f.write_all(b"CORRUPTED-BY-WALT-E2E").unwrap();
    drop(f);
    refused(&env, &["local:walt-test/corrupt"], &["does not match"]);
    assert_eq!(env.alice.image_names(), ["busybox"]);
}

#[test]
fn blob_content_not_matching_its_digest() {
    corrupt_blob_refused(Compression::None);
}

/// The corruption also breaks the gzip stream (CRC): the error must still
/// name the real cause, the digest mismatch.
#[test]
fn corrupt_gzip_blob_reports_the_digest_mismatch() {
    corrupt_blob_refused(Compression::Gzip);
}

#[test]
fn truncated_blob() {
    let env = Env::start_with(EnvOpts {
        proxy: true,
        ..Default::default()
    });
    let img = push_busybox(&env, "walt-test/busybox", "latest");
    assert!(img.layers[0].size > 200_000, "layer too small to truncate");
    env.proxy
        .as_ref()
        .unwrap()
        .truncate_blob_after(Some(100_000));
    refused(
        &env,
        &["flaky:walt-test/busybox"],
        &["truncated", "does not match"],
    );
}

fn hostile_image(env: &Env, repo: &str, entries: &[RawEntry]) {
    let base = env
        .images
        .busybox_layer(Format::Oci, Compression::Gzip, "base")
        .unwrap();
    let bad = env
        .images
        .layer(Format::Oci, Compression::Gzip, entries)
        .unwrap();
    let img = env
        .images
        .image(Format::Oci, ImageConfig::amd64("pc-x86-64"), &[base, bad])
        .unwrap();
    env.push_local(repo, "latest", &img);
}

/// No file named `marker` anywhere around the server's directories.
fn assert_no_file_named(env: &Env, marker: &str) {
    let root = env
        .server
        .data_dir()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    let server_dir = env.server.data_dir().parent().unwrap().to_path_buf();
    for p in list_tree(&server_dir) {
        assert!(
            !p.ends_with(marker),
            "{marker} written at {}",
            server_dir.join(&p).display()
        );
    }
    assert!(
        !root.join(marker).exists(),
        "{marker} written in {}",
        root.display()
    );
}

#[test]
fn layer_entry_with_dot_dot_escapes() {
    let env = Env::start();
    let marker = format!("walt-escape-{}", std::process::id());
    hostile_image(
        &env,
        "walt-test/dotdot",
        &[RawEntry::file(&format!("../{marker}"), b"pwned\n")],
    );
    refused(&env, &["local:walt-test/dotdot"], &["escapes"]);
    assert_no_file_named(&env, &marker);
    // Deeper: a/../../x.
    hostile_image(
        &env,
        "walt-test/dotdot2",
        &[
            RawEntry::dir("a/"),
            RawEntry::file(&format!("a/../../{marker}"), b"pwned\n"),
        ],
    );
    refused(&env, &["local:walt-test/dotdot2"], &["escapes"]);
    assert_no_file_named(&env, &marker);
}

#[test]
fn layer_entry_with_absolute_path_escapes() {
    let env = Env::start();
    let dir = format!("/tmp/walt-abs-{}", std::process::id());
    hostile_image(
        &env,
        "walt-test/abs",
        &[RawEntry::file(&format!("{dir}/file"), b"pwned\n")],
    );
    refused(&env, &["local:walt-test/abs"], &["escapes"]);
    assert!(!std::path::Path::new(&dir).exists(), "{dir} was written");
}

#[test]
fn layer_writing_through_a_symlink() {
    let env = Env::start();
    let _ = std::fs::remove_file("/etc/walt-pwned");
    hostile_image(
        &env,
        "walt-test/symlink",
        &[
            RawEntry::symlink("etc", "/etc"),
            RawEntry::file("etc/walt-pwned", b"pwned\n"),
        ],
    );
    refused(&env, &["local:walt-test/symlink"], &["through symlink"]);
    assert!(
        !std::path::Path::new("/etc/walt-pwned").exists(),
        "/etc/walt-pwned was written"
    );
    assert_no_file_named(&env, "walt-pwned");

    // The same with a relative symlink climbing out.
    hostile_image(
        &env,
        "walt-test/symlink2",
        &[
            RawEntry::symlink("up", "../../../../../../../../.."),
            RawEntry::file("up/etc/walt-pwned", b"pwned\n"),
        ],
    );
    refused(
        &env,
        &["local:walt-test/symlink2"],
        &["through symlink", "escapes"],
    );
    assert!(
        !std::path::Path::new("/etc/walt-pwned").exists(),
        "/etc/walt-pwned was written"
    );
}
