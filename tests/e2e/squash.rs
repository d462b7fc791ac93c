//! `walt image squash`: merging the layers of an image into one.

use std::fs;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::common::*;
use walt_e2e::*;

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// sha256 hex of the gunzipped blob, when it is gzip.
fn gunzip_digest(path: &Path) -> Option<String> {
    let mut d = flate2::read::GzDecoder::new(fs::File::open(path).ok()?);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = d.read(&mut buf).ok()?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Some(hex::encode(h.finalize()))
}

#[test]
fn squash_merges_layers() {
    let env = Env::start();
    let b = &env.images;
    let l1_entries = {
        let mut v = walt_e2e::image::busybox_rootfs_entries("squash").unwrap();
        v.extend([
            RawEntry::dir("data/"),
            RawEntry::file("data/keep", b"keep"),
            RawEntry::hardlink("data/keep-hard", "data/keep"),
            RawEntry::file("data/gone", b"gone"),
            RawEntry::dir("opq/"),
            RawEntry::file("opq/old", b"old"),
            RawEntry::dir("opq/sub/"),
            RawEntry::file("opq/sub/old", b"old"),
        ]);
        v
    };
    let l1 = b
        .layer(Format::Oci, Compression::Gzip, &l1_entries)
        .unwrap();
    let l2 = b
        .layer(
            Format::Oci,
            Compression::Gzip,
            &[
                RawEntry::file("data/added", b"added"),
                RawEntry::file("data/.wh.gone", b""),
                RawEntry::symlink("data/link", "keep"),
            ],
        )
        .unwrap();
    let l3 = b
        .layer(
            Format::Oci,
            Compression::Zstd,
            &[
                RawEntry::Dir {
                    path: "opq/".into(),
                    mode: 0o750,
                },
                RawEntry::file("opq/.wh..wh..opq", b""),
                RawEntry::file("opq/new", b"new"),
                RawEntry::File {
                    path: "data/added".into(),
                    data: b"added2".to_vec(),
                    mode: 0o600,
                },
            ],
        )
        .unwrap();
    let img = b
        .image(Format::Oci, ImageConfig::amd64("pc-x86-64"), &[l1, l2, l3])
        .unwrap();
    env.push_local("walt-test/layered", "latest", &img);
    env.alice.clone_ok(&["local:walt-test/layered"]);
    let data_dir = env.server.data_dir();
    assert_eq!(entries(&data_dir.join("layers")).len(), 3);

    let out = env.alice.run(&["image", "squash", "layered"]);
    out.assert_success();
    assert!(
        out.stdout
            .contains("Image layered squashed: 3 layers merged into 1."),
        "{out}"
    );
    assert!(env.alice.image_names().contains(&"layered".to_string()));
    assert!(env.alice.show_row("layered").unwrap().contains("pc-x86-64"));
    assert_tmp_empty(&data_dir);

    // One layer left in the store, and its blob is there.
    let layers = entries(&data_dir.join("layers"));
    assert_eq!(layers.len(), 1, "{layers:?}");
    let diff_hex = &layers[0];
    let blobs = data_dir.join("blobs/sha256");
    assert!(
        entries(&blobs)
            .iter()
            .any(|h| gunzip_digest(&blobs.join(h)).as_deref() == Some(diff_hex.as_str())),
        "no gzip blob has the squashed layer's diff_id"
    );

    // The merged tree.
    let root = data_dir.join("layers").join(diff_hex).join("diff");
    let all = listing(&root, false);
    let mine: Vec<&str> = all
        .iter()
        .map(String::as_str)
        .filter(|l| l.starts_with("data") || l.starts_with("opq"))
        .collect();
    assert_eq!(
        mine,
        [
            "data dir 755",
            "data/added file:added2 600",
            "data/keep file:keep 644",
            "data/keep-hard file:keep 644",
            "data/link link->keep 0",
            "opq dir 750",
            "opq/new file:new 644",
        ]
    );
    assert!(
        all.contains(&"etc/walt-test-marker file:squash\n 644".to_string()),
        "{all:?}"
    );
    assert!(
        all.contains(&"bin/sh link->busybox 0".to_string()),
        "{all:?}"
    );
    assert!(all.contains(&"tmp dir 1777".to_string()), "{all:?}");
    assert!(
        !all.iter().any(|l| l.contains(" char:")),
        "whiteouts left in the squashed layer: {all:?}"
    );
    let ino = |p: &str| fs::metadata(root.join(p)).unwrap().ino();
    assert_eq!(ino("data/keep"), ino("data/keep-hard"));

    // Squashing again: one layer, nothing to do, nothing changed.
    let before = env.snapshot();
    let out = env.alice.run(&["image", "squash", "layered"]);
    out.assert_success();
    assert!(out.stdout.contains("nothing to squash"), "{out}");
    env.assert_unchanged(&before);
}

#[test]
fn squash_refusals_and_one_layer_images() {
    let env = Env::start();
    push_busybox(&env, "walt-test/busybox", "latest");
    env.alice.clone_ok(&["local:walt-test/busybox"]);
    let before = env.snapshot();

    env.alice
        .run(&["image", "squash", "missing"])
        .assert_failure("not found");
    env.assert_unchanged(&before);
    env.bob
        .run(&["image", "squash", "busybox"])
        .assert_failure("not found");
    env.assert_unchanged(&before);

    let out = env.alice.run(&["image", "squash", "busybox"]);
    out.assert_success();
    assert!(
        out.stdout
            .contains("Image busybox has 1 layer: nothing to squash."),
        "{out}"
    );
    env.assert_unchanged(&before);
}
