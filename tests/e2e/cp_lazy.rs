//! The layer `walt image cp` commits is tree-backed: its tar is hashed,
//! not written (`layers/<hex>/blob-from-tree`, no `blobs/sha256/<hex>`).
//! Publish produces it again from the layer's files: a client that checks
//! every digest gets the same content; a layer whose files changed under
//! the server fails the publish, naming the image; a crash during the copy
//! or its commit leaves a consistent store; removing the image collects it.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::common::*;
use walt_e2e::util::{dir_size, list_dir, wait_for};
use walt_e2e::walt::wait_output;
use walt_e2e::*;

const MARKER: &str = "blob-from-tree";

/// Clones the standard busybox image as alice's `img`.
fn env_with_image() -> Env {
    let env = Env::start();
    push_busybox(&env, "walt-test/busybox", "latest");
    env.alice.clone_ok(&["local:walt-test/busybox", "img"]);
    env
}

/// A directory `tree` with a few files (one of 3 MB) under `dir`.
fn source_tree(dir: &Path) -> PathBuf {
    let src = dir.join("tree");
    fs::create_dir_all(src.join("sub/deeper")).unwrap();
    fs::write(src.join("hello"), b"hello from the client\n").unwrap();
    fs::write(src.join("sub/deeper/note"), b"deep\n").unwrap();
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 253) as u8).collect();
    fs::write(src.join("sub/big"), big).unwrap();
    std::os::unix::fs::symlink("hello", src.join("link")).unwrap();
    src
}

/// Hex digests of the layers of the store that have the tree-blob marker.
fn tree_backed_layers(data: &Path) -> Vec<String> {
    list_dir(&data.join("layers"))
        .into_iter()
        .filter(|h| data.join("layers").join(h).join(MARKER).is_file())
        .collect()
}

fn sha256_hex(r: &mut dyn Read) -> String {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = r.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    hex::encode(h.finalize())
}

#[track_caller]
fn cp_in(env: &Env, src: &Path, dest: &str) {
    env.alice
        .run(&["image", "cp", src.to_str().unwrap(), dest])
        .assert_success();
}

#[test]
fn cp_then_publish_gives_a_blob_a_checking_client_accepts() {
    let env = env_with_image();
    let data = env.server.data_dir();
    let before = tree_backed_layers(&data);
    let dir = tempfile::tempdir().unwrap();
    let src = source_tree(dir.path());
    cp_in(&env, &src, "img:/root/");

    // The new layer: its files and the marker, no tar file.
    let new: Vec<String> = tree_backed_layers(&data)
        .into_iter()
        .filter(|h| !before.contains(h))
        .collect();
    assert_eq!(new.len(), 1, "{new:?}");
    let hex = &new[0];
    assert!(
        !data.join("blobs/sha256").join(hex).exists(),
        "the layer's tar was written"
    );
    let size: u64 = fs::read_to_string(data.join("layers").join(hex).join(MARKER))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(size > 3_000_000, "{size}");

    let out = env
        .alice
        .run(&["image", "publish", "--registry", "local", "img"]);
    out.assert_success();

    // skopeo copies it to an OCI layout, checking every blob's digest.
    let oci = dir.path().join("oci");
    let st = Command::new("skopeo")
        .args(["--insecure-policy", "copy", "--src-tls-verify=false"])
        .arg(format!("docker://127.0.0.1:{}/alice/img", env.local.port()))
        .arg(format!("oci:{}:img", oci.display()))
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "skopeo copy: {}",
        String::from_utf8_lossy(&st.stderr)
    );
    let blob = |digest: &str| {
        oci.join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"))
    };
    let index: Value = serde_json::from_slice(&fs::read(oci.join("index.json")).unwrap()).unwrap();
    let manifest: Value = serde_json::from_slice(
        &fs::read(blob(index["manifests"][0]["digest"].as_str().unwrap())).unwrap(),
    )
    .unwrap();
    let config: Value = serde_json::from_slice(
        &fs::read(blob(manifest["config"]["digest"].as_str().unwrap())).unwrap(),
    )
    .unwrap();
    let layers = manifest["layers"].as_array().unwrap();
    let diff_ids = config["rootfs"]["diff_ids"].as_array().unwrap();
    assert_eq!(layers.len(), diff_ids.len());
    let top = layers.last().unwrap();
    assert_eq!(diff_ids.last().unwrap(), &format!("sha256:{hex}"));
    // The published layer is that tar, gzipped.
    let gz = fs::File::open(blob(top["digest"].as_str().unwrap())).unwrap();
    assert_eq!(
        sha256_hex(&mut flate2::read::GzDecoder::new(gz)),
        *hex,
        "{top}"
    );
    // And holds the files.
    let gz = fs::File::open(blob(top["digest"].as_str().unwrap())).unwrap();
    let mut a = tar::Archive::new(flate2::read::GzDecoder::new(gz));
    let mut seen = Vec::new();
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        let path = String::from_utf8_lossy(&e.path_bytes()).into_owned();
        if path == "root/tree/hello" {
            let mut s = String::new();
            e.read_to_string(&mut s).unwrap();
            assert_eq!(s, "hello from the client\n");
        }
        seen.push(path);
    }
    for p in ["root/tree/hello", "root/tree/sub/big", "root/tree/link"] {
        assert!(seen.iter().any(|s| s == p), "{p} not in {seen:?}");
    }

    // Bob clones it back and reads the copy out.
    assert_cloned(&env.bob.clone_ok(&["local:alice/img", "back"]), "back");
    let out_dir = dir.path().join("out");
    fs::create_dir(&out_dir).unwrap();
    env.bob
        .run(&["image", "cp", "back:/root/tree", out_dir.to_str().unwrap()])
        .assert_success();
    assert_eq!(listing(&out_dir.join("tree"), true), listing(&src, true));
    assert_eq!(
        fs::read(out_dir.join("tree/sub/big")).unwrap(),
        fs::read(src.join("sub/big")).unwrap()
    );

    // Alice removes her image: its layer goes, marker and all (bob's
    // clone keeps the same diff_id through its own, gzip, blob).
    env.bob.run(&["image", "remove", "back"]).assert_success();
    env.alice.run(&["image", "remove", "img"]).assert_success();
    assert!(
        !data.join("layers").join(hex).exists(),
        "the layer outlived its images"
    );
    assert!(!data.join("blobs/sha256").join(hex).exists());
    assert_tmp_empty(&data);
}

#[test]
fn publish_of_a_layer_whose_files_changed_fails_naming_the_image() {
    let env = env_with_image();
    let data = env.server.data_dir();
    let before = tree_backed_layers(&data);
    let dir = tempfile::tempdir().unwrap();
    let src = source_tree(dir.path());
    cp_in(&env, &src, "img:/root/");
    let hex = tree_backed_layers(&data)
        .into_iter()
        .find(|h| !before.contains(h))
        .unwrap();
    // Same size and mtime, other bytes: only the digest can tell.
    let f = data.join("layers").join(&hex).join("diff/root/tree/hello");
    let m = fs::metadata(&f).unwrap();
    fs::write(&f, b"HELLO FROM THE CLIENT\n").unwrap();
    let t = filetime::FileTime::from_last_modification_time(&m);
    filetime::set_file_mtime(&f, t).unwrap();

    let out = env
        .alice
        .run(&["image", "publish", "--registry", "local", "img"]);
    out.assert_failure("'img'");
    assert!(out.stderr.contains(&hex), "{out}");
    assert!(
        out.stderr.contains("changed after the layer was saved"),
        "{out}"
    );
    // Nothing reached the registry under that name.
    let st = Command::new("skopeo")
        .args(["--insecure-policy", "inspect", "--tls-verify=false"])
        .arg(format!("docker://127.0.0.1:{}/alice/img", env.local.port()))
        .output()
        .unwrap();
    assert!(!st.status.success(), "a manifest was pushed");
    assert_tmp_empty(&data);
}

/// `__walt-sandbox` processes (a copy's tar runs in one).
fn sandboxes() -> usize {
    let mut n = 0;
    for e in fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(c) = fs::read(e.path().join("cmdline"))
            && String::from_utf8_lossy(&c).contains("__walt-sandbox")
        {
            n += 1;
        }
    }
    n
}

#[test]
fn server_killed_while_a_copy_is_saved_leaves_a_consistent_store() {
    let mut env = env_with_image();
    let data = env.server.data_dir();
    let dir = tempfile::tempdir().unwrap();
    // Many files: the commit (sanitize, hash, adopt) takes a while.
    let src = dir.path().join("many");
    for d in 0..40 {
        let sub = src.join(format!("d{d:02}"));
        fs::create_dir_all(&sub).unwrap();
        for f in 0..100 {
            fs::write(sub.join(format!("f{f:03}")), vec![(d + f) as u8; 20_000]).unwrap();
        }
    }
    let child = env
        .alice
        .spawn(&["image", "cp", src.to_str().unwrap(), "img:/root/"]);
    // Killed once the sandbox extracted most of it and is gone: the
    // server is then saving the layer (or has just done so).
    let waited = wait_for("the copy to be extracted", Duration::from_secs(120), || {
        (dir_size(&data.join("tmp")) > 60_000_000 && sandboxes() == 0).then_some(())
    });
    env.server.kill9();
    let out = wait_output(child, "walt image cp", Duration::from_secs(60));
    waited.unwrap_or_else(|e| panic!("{e}\n{out}"));

    env.server.restart().unwrap();
    assert_tmp_empty(&data);
    // Either the image is as before or it has the whole copy; every layer
    // left is one an image uses, every tree-backed one complete.
    let probe = tempfile::tempdir().unwrap();
    let saved = env
        .alice
        .run(&[
            "image",
            "cp",
            "img:/root/many/d39/f099",
            probe.path().to_str().unwrap(),
        ])
        .success;
    eprintln!("copy saved before the kill: {saved} (client: {out})");
    if saved {
        assert_eq!(
            fs::read(probe.path().join("f099")).unwrap(),
            vec![(39 + 99) as u8; 20_000]
        );
    }
    let layers = list_dir(&data.join("layers"));
    for h in &layers {
        assert!(
            data.join("layers").join(h).join("diff").is_dir(),
            "partial layer {h}"
        );
    }
    // The store works: the copy again, then a publish of the result.
    cp_in(&env, &src, "img:/root/");
    env.alice
        .run(&["image", "publish", "--registry", "local", "img"])
        .assert_success();
    // Removing the image leaves only the base image's layers.
    env.alice.run(&["image", "remove", "img"]).assert_success();
    assert!(
        tree_backed_layers(&data).is_empty(),
        "{:?}",
        list_dir(&data.join("layers"))
    );
}
