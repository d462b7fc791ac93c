//! Tree-backed blobs: the layer a commit makes has no tar file; its bytes
//! are produced again from the layer, verified, when they are needed.

use std::fs;
use std::io::Read;

use crate::tests::{new_store, upper_with};
use crate::util::sha256_digest;
use crate::*;

fn committed(store: &Store, files: &[(&str, &[u8])]) -> LayerRef {
    let s = upper_with(store, files);
    store.commit_upper(&s.upper(), "step 1").unwrap()
}

fn read_all(store: &Store, digest: &walt_core::Digest) -> std::io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    store.open_blob(digest).unwrap().read_to_end(&mut bytes)?;
    Ok(bytes)
}

fn tmp_entries(store: &Store) -> Vec<String> {
    fs::read_dir(store.data_dir().join("tmp"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn a_tree_backed_blob_reads_as_its_digest_says_and_is_written_out_once() {
    let (_d, store) = new_store();
    let _guard = store.begin_import();
    // Big enough for several chunks of the producing thread.
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let l = committed(&store, &[("a/big", &big), ("a/small", b"s"), ("b", b"")]);
    assert!(store.has_blob(&l.blob_digest));
    assert!(store.is_tree_backed(&l.blob_digest));
    assert!(!store.blob_path(&l.blob_digest).exists());

    let bytes = read_all(&store, &l.blob_digest).unwrap();
    assert_eq!(bytes.len() as u64, l.blob_size);
    assert_eq!(sha256_digest(&bytes), l.blob_digest);
    // Twice the same bytes.
    assert_eq!(read_all(&store, &l.blob_digest).unwrap(), bytes);

    let path = store.materialize_blob(&l.blob_digest).unwrap();
    assert_eq!(path, store.blob_path(&l.blob_digest));
    assert_eq!(fs::read(&path).unwrap(), bytes);
    assert!(!store.is_tree_backed(&l.blob_digest));
    assert!(store.has_blob(&l.blob_digest));
    // Again: nothing to do.
    assert_eq!(store.materialize_blob(&l.blob_digest).unwrap(), path);
    assert!(tmp_entries(&store).is_empty(), "{:?}", tmp_entries(&store));
}

#[test]
fn a_changed_layer_tree_is_an_error_naming_the_blob_never_other_bytes() {
    let (_d, store) = new_store();
    let _guard = store.begin_import();
    let l = committed(&store, &[("etc/motd", b"hello\n")]);
    let motd = store.layer_path(&l.diff_id).join("etc/motd");
    // Same size, other content: only the digest can tell.
    let m = fs::metadata(&motd).unwrap();
    fs::write(&motd, b"HELLO\n").unwrap();
    let t = filetime::FileTime::from_last_modification_time(&m);
    filetime::set_file_mtime(&motd, t).unwrap();

    let e = read_all(&store, &l.blob_digest).unwrap_err();
    assert!(e.to_string().contains(l.blob_digest.as_str()), "{e}");
    assert!(
        e.to_string().contains("changed after the layer was saved"),
        "{e}"
    );
    let e = store.materialize_blob(&l.blob_digest).unwrap_err();
    assert!(
        matches!(&e, StoreError::BlobFromTree { digest, .. } if *digest == l.blob_digest),
        "{e:?}"
    );
    assert!(!store.blob_path(&l.blob_digest).exists(), "no wrong blob");
    assert!(tmp_entries(&store).is_empty(), "{:?}", tmp_entries(&store));

    // A file more: a longer stream, refused too.
    fs::write(&motd, b"hello\n").unwrap();
    filetime::set_file_mtime(&motd, t).unwrap();
    assert!(read_all(&store, &l.blob_digest).is_ok());
    fs::write(store.layer_path(&l.diff_id).join("etc/extra"), b"x").unwrap();
    let e = read_all(&store, &l.blob_digest).unwrap_err();
    assert!(e.to_string().contains(l.blob_digest.as_str()), "{e}");
}

#[test]
fn the_same_layer_stored_without_its_marker_gets_its_blob_written() {
    let (_d, store) = new_store();
    let _guard = store.begin_import();
    let a = committed(&store, &[("etc/a", b"a")]);
    // As if the layer had been unpacked from a registry's identical tar.
    fs::remove_file(store.inner.tree_blob_marker(&a.diff_id)).unwrap();
    assert!(!store.has_blob(&a.blob_digest));
    let s = upper_with(&store, &[("etc/a", b"a")]);
    let first = store.layer_path(&a.diff_id);
    for p in ["etc/a", "etc", ""] {
        let m = fs::symlink_metadata(first.join(p)).unwrap();
        let t = filetime::FileTime::from_last_modification_time(&m);
        filetime::set_symlink_file_times(s.upper().join(p), t, t).unwrap();
    }
    let b = store.commit_upper(&s.upper(), "step 2").unwrap();
    assert_eq!(a, b);
    assert!(store.has_blob(&b.blob_digest));
    assert!(!store.is_tree_backed(&b.blob_digest), "written as a file");
    let bytes = fs::read(store.blob_path(&b.blob_digest)).unwrap();
    assert_eq!(sha256_digest(&bytes), b.blob_digest);
}

#[test]
fn an_unreferenced_tree_backed_layer_goes_with_its_marker() {
    let (dir, store) = new_store();
    let guard = store.begin_import();
    let l = committed(&store, &[("x", b"x")]);
    let img = walt_core::ImageName {
        owner: "alice".into(),
        name: "img".into(),
        tag: "latest".into(),
    };
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": { "type": "layers", "diff_ids": [l.diff_id] },
    });
    let serde_json::Value::Object(config) = config else {
        unreachable!()
    };
    store
        .record_built_image(&img, config, vec![l.clone()], vec![], false, 1)
        .unwrap();
    drop(guard);
    // Referenced: kept, across a restart too.
    drop(store);
    let store = Store::open(&dir.path().join("data")).unwrap();
    assert!(store.is_tree_backed(&l.blob_digest));
    assert_eq!(
        sha256_digest(&read_all(&store, &l.blob_digest).unwrap()),
        l.blob_digest
    );
    store.remove_image(&img).unwrap();
    assert!(!store.has_layer(&l.diff_id));
    assert!(!store.has_blob(&l.blob_digest));
    assert!(!store.inner.tree_blob_marker(&l.diff_id).exists());

    // A commit no image came to reference (a crash before the record):
    // collected at the next open.
    let l2 = committed(&store, &[("y", b"y")]);
    drop(store);
    let store = Store::open(&dir.path().join("data")).unwrap();
    assert!(!store.has_layer(&l2.diff_id));
    assert!(!store.has_blob(&l2.blob_digest));
}
