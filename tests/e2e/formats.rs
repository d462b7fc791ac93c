//! Manifest formats, compressions and multi-arch indexes.

use std::path::Path;

use crate::common::*;
use walt_e2e::*;

/// The file at `path` in alice's image `image`, read back with `walt image cp`.
fn read_back(env: &Env, image: &str, path: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    env.alice
        .run(&[
            "image",
            "cp",
            &format!("{image}:{path}"),
            dir.path().to_str().unwrap(),
        ])
        .assert_success();
    let name = Path::new(path).file_name().unwrap();
    std::fs::read(dir.path().join(name))
        .unwrap_or_else(|e| panic!("{image}:{path} copied out, but not readable: {e}"))
}

fn clone_format(format: Format, layers: &[Compression]) {
    let env = Env::start();
    let mut built = Vec::new();
    let base = env.images.busybox_layer(format, layers[0], "base").unwrap();
    built.push(base);
    for (i, c) in layers.iter().enumerate().skip(1) {
        let l = env
            .images
            .layer(
                format,
                *c,
                &[
                    RawEntry::dir("root/"),
                    RawEntry::file(
                        &format!("root/layer-{i}"),
                        format!("data of layer {i} ({c:?})\n").as_bytes(),
                    ),
                ],
            )
            .unwrap();
        built.push(l);
    }
    let img = env
        .images
        .image(format, ImageConfig::amd64("pc-x86-64"), &built)
        .unwrap();
    env.push_local("walt-test/fmt", "latest", &img);
    let out = env.alice.clone_ok(&["local:walt-test/fmt"]);
    assert_cloned(&out, "fmt");
    let row = env.alice.show_row("fmt").expect("fmt not shown");
    assert!(row.contains("pc-x86-64"), "{row:?}");
    for i in 0..img.layers.len() {
        assert!(
            store_has_layer(&env, &img, i),
            "layer {i} missing from the store"
        );
    }
    // What each layer holds, read back from the cloned image.
    assert_eq!(read_back(&env, "fmt", "/etc/walt-test-marker"), b"base\n");
    assert!(
        read_back(&env, "fmt", "/bin/busybox") == std::fs::read("/bin/busybox").unwrap(),
        "/bin/busybox differs from the one in the layer"
    );
    for (i, c) in layers.iter().enumerate().skip(1) {
        assert_eq!(
            String::from_utf8(read_back(&env, "fmt", &format!("/root/layer-{i}"))).unwrap(),
            format!("data of layer {i} ({c:?})\n")
        );
    }
    assert_tmp_empty(&env.server.data_dir());
}

#[test]
fn oci_gzip() {
    clone_format(Format::Oci, &[Compression::Gzip]);
}

#[test]
fn oci_zstd() {
    clone_format(Format::Oci, &[Compression::Zstd]);
}

#[test]
fn oci_uncompressed() {
    clone_format(Format::Oci, &[Compression::None]);
}

#[test]
fn oci_mixed_gzip_zstd_plain_layers() {
    clone_format(
        Format::Oci,
        &[Compression::Gzip, Compression::Zstd, Compression::None],
    );
}

#[test]
fn docker_schema2_gzip() {
    clone_format(Format::Docker, &[Compression::Gzip]);
}

#[test]
fn docker_schema2_two_layers() {
    clone_format(Format::Docker, &[Compression::Gzip, Compression::Gzip]);
}

fn multi_arch(format: Format) {
    let env = Env::start();
    let amd = env
        .images
        .busybox_image(format, Compression::Gzip, "pc-x86-64")
        .unwrap();
    let arm_layer = env
        .images
        .layer(
            format,
            Compression::Gzip,
            &[
                RawEntry::dir("etc/"),
                RawEntry::file("etc/walt-test-marker", b"arm64\n"),
            ],
        )
        .unwrap();
    let arm = env
        .images
        .image(format, ImageConfig::arm64("rpi-3-b-plus"), &[arm_layer])
        .unwrap();
    // arm64 first: picking the first entry would be wrong.
    let idx = env
        .images
        .index(format, &[arm.clone(), amd.clone()])
        .unwrap();
    env.push_local_index("walt-test/multi", "latest", &idx);
    let out = env.alice.clone_ok(&["local:walt-test/multi"]);
    assert_cloned(&out, "multi");
    let row = env.alice.show_row("multi").expect("multi not shown");
    assert!(
        row.contains("pc-x86-64") && !row.contains("rpi"),
        "the amd64 image was not picked: {row:?}"
    );
    assert!(
        store_has_layer(&env, &amd, 0),
        "amd64 layer not in the store"
    );
    assert!(!store_has_layer(&env, &arm, 0), "arm64 layer in the store");
    assert_eq!(
        read_back(&env, "multi", "/etc/walt-test-marker"),
        b"busybox pc-x86-64\n"
    );
    assert_tmp_empty(&env.server.data_dir());
}

#[test]
fn oci_index_picks_amd64() {
    multi_arch(Format::Oci);
}

#[test]
fn docker_manifest_list_picks_amd64() {
    multi_arch(Format::Docker);
}
