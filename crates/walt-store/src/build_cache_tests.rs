//! Tests of the build engine's store support: `commit_upper`, the build
//! cache and `record_built_image` (real filesystem; run as root for the
//! overlay xattrs).

use std::fs;

use walt_core::ImageName;

use crate::tests::{new_store, upper_with};
use crate::*;

fn name(owner: &str, n: &str) -> ImageName {
    ImageName {
        owner: owner.into(),
        name: n.into(),
        tag: "latest".into(),
    }
}

/// A new layer holding `files`, committed as a build step.
fn step_layer(store: &Store, files: &[(&str, &[u8])]) -> LayerRef {
    let s = upper_with(store, files);
    store
        .commit_upper(&s.upper(), "the build of 'alice/img:latest', step 1")
        .unwrap()
}

fn step_entry(layer: &LayerRef) -> CacheEntry {
    CacheEntry {
        layers: vec![layer.clone()],
        config_digest: None,
        created: 1_700_000_000,
    }
}

fn blob_count(store: &Store) -> usize {
    fs::read_dir(store.data_dir().join("blobs/sha256"))
        .unwrap()
        .count()
}

fn cache_rows(store: &Store) -> Vec<String> {
    let conn = store.inner.conn();
    let mut stmt = conn
        .prepare("SELECT key FROM build_cache ORDER BY key")
        .unwrap();
    stmt.query_map([], |r| r.get(0))
        .unwrap()
        .collect::<rusqlite::Result<Vec<String>>>()
        .unwrap()
}

fn config_for(layers: &[LayerRef]) -> serde_json::Map<String, serde_json::Value> {
    let diff_ids: Vec<String> = layers.iter().map(|l| l.diff_id.to_string()).collect();
    let v = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "created": "2026-12-01T00:00:00Z",
        "config": { "Env": ["PATH=/bin"], "Labels": { "walt.node.models": "pc-x86-64" } },
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
        "history": [{ "created_by": "RUN echo OK > /root/test-result" }],
    });
    match v {
        serde_json::Value::Object(o) => o,
        _ => unreachable!(),
    }
}

fn tar_paths(bytes: &[u8]) -> Vec<String> {
    let mut a = tar::Archive::new(bytes);
    a.entries()
        .unwrap()
        .map(|e| String::from_utf8_lossy(&e.unwrap().path_bytes()).into_owned())
        .collect()
}

#[test]
fn commit_upper_makes_an_uncompressed_layer_the_cache_keeps() {
    let (dir, store) = new_store();
    let guard = store.begin_import();
    let s = upper_with(&store, &[("root/test-result", b"OK\n")]);
    let upper = s.upper();
    let layer = store
        .commit_upper(&upper, "the build of 'alice/img:latest', step 3")
        .unwrap();
    assert_eq!(layer.blob_digest, layer.diff_id);
    assert_eq!(layer.media_type, walt_core::oci::OCI_LAYER_TAR);
    assert!(
        !upper.exists(),
        "the upper directory is adopted as the layer"
    );
    let diff = store.layer_path(&layer.diff_id);
    assert_eq!(fs::read(diff.join("root/test-result")).unwrap(), b"OK\n");
    // The blob is tree-backed: no file, its bytes produced from the layer.
    let blob = store.blob_path(&layer.blob_digest);
    assert!(!blob.exists(), "the layer's tar is not written");
    assert!(store.is_tree_backed(&layer.blob_digest));
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(
        &mut store.open_blob(&layer.blob_digest).unwrap(),
        &mut bytes,
    )
    .unwrap();
    assert_eq!(bytes.len() as u64, layer.blob_size);
    assert_eq!(crate::util::sha256_digest(&bytes), layer.blob_digest);
    assert_eq!(tar_paths(&bytes), [".", "root", "root/test-result"]);

    store.cache_put("k1", &step_entry(&layer)).unwrap();
    drop(guard);
    // No image references the layer: the cache entry alone keeps it.
    let r = store.gc().unwrap();
    assert_eq!((r.blobs_removed, r.layers_removed), (0, 0), "{r:?}");
    assert!(store.has_blob(&layer.blob_digest));
    assert!(store.has_layer(&layer.diff_id));

    // And so does the collection of Store::open.
    drop(store);
    let store = Store::open(&dir.path().join("data")).unwrap();
    assert!(store.has_blob(&layer.blob_digest));
    assert!(store.has_layer(&layer.diff_id));
    assert_eq!(store.cache_get("k1").unwrap(), Some(step_entry(&layer)));
    assert_eq!(store.cache_get("absent").unwrap(), None);

    // Without the entry, gc collects them.
    assert_eq!(store.clear_build_cache().unwrap(), 1);
    assert!(!store.has_blob(&layer.blob_digest));
    assert!(!store.has_layer(&layer.diff_id));
    assert_eq!(store.cache_get("k1").unwrap(), None);
}

#[test]
fn commit_upper_of_an_existing_layer_leaves_the_upper_and_reuses_the_layer() {
    let (_d, store) = new_store();
    let _guard = store.begin_import();
    let a = step_layer(&store, &[("etc/a", b"a")]);
    let blobs = blob_count(&store);
    let s = upper_with(&store, &[("etc/a", b"a")]);
    // Same mtimes give the same tar: set them as the first one had them.
    let first = store.layer_path(&a.diff_id);
    for p in ["etc/a", "etc", ""] {
        let m = fs::symlink_metadata(first.join(p)).unwrap();
        let t = filetime::FileTime::from_last_modification_time(&m);
        filetime::set_symlink_file_times(s.upper().join(p), t, t).unwrap();
    }
    let b = store.commit_upper(&s.upper(), "step 2").unwrap();
    assert_eq!(a, b);
    assert_eq!(blob_count(&store), blobs, "no new blob");
    assert!(s.upper().join("etc/a").exists(), "the upper is left as is");
}

#[test]
fn commit_upper_refusals_name_the_build() {
    let (_d, store) = new_store();
    let _guard = store.begin_import();
    let s = upper_with(&store, &[("d/f", b"x")]);
    xattr::set(s.upper().join("d"), "trusted.overlay.redirect", b"/x").unwrap();
    let e = store
        .commit_upper(&s.upper(), "the build of 'alice/img:latest', step 3")
        .unwrap_err();
    assert!(matches!(e, StoreError::SaveLayerFailed { .. }), "{e:?}");
    assert!(
        e.to_string().starts_with(
            "the build of 'alice/img:latest', step 3: cannot save the layer: '/d' carries the overlay xattr trusted.overlay.redirect"
        ),
        "{e}"
    );
    assert!(s.upper().join("d/f").exists(), "nothing consumed");
    assert!(
        fs::read_dir(store.data_dir().join("layers"))
            .unwrap()
            .next()
            .is_none()
    );
    assert_eq!(blob_count(&store), 0);

    // Past limits.layer-unpacked-size: refused, named.
    let s = upper_with(&store, &[("big", &[7u8; 64 * 1024])]);
    let mut limits = store.limits();
    limits.layer_unpacked_size = 16 * 1024;
    store.set_limits(limits);
    let e = store
        .commit_upper(&s.upper(), "the build of 'alice/img:latest', step 4")
        .unwrap_err();
    assert!(matches!(e, StoreError::TooLarge { .. }), "{e:?}");
    assert!(
        e.to_string()
            .contains("the build of 'alice/img:latest', step 4"),
        "{e}"
    );
    assert_eq!(blob_count(&store), 0);

    // A missing directory.
    let e = store
        .commit_upper(&store.data_dir().join("tmp/absent"), "step 5")
        .unwrap_err();
    assert!(
        e.to_string().starts_with("step 5: cannot save the layer: "),
        "{e}"
    );
}

#[test]
fn cache_entry_with_missing_content_is_a_miss_and_is_deleted() {
    let (_d, store) = new_store();
    let _guard = store.begin_import();
    let a = step_layer(&store, &[("a", b"a")]);
    let b = step_layer(&store, &[("b", b"bb")]);
    store.cache_put("a", &step_entry(&a)).unwrap();
    store.cache_put("b", &step_entry(&b)).unwrap();
    assert_eq!(cache_rows(&store), vec!["a", "b"]);

    // The layer directory of `a` goes.
    remove_tree(store.layer_path(&a.diff_id).parent().unwrap()).unwrap();
    assert_eq!(store.cache_get("a").unwrap(), None);
    assert_eq!(cache_rows(&store), vec!["b"], "the entry is deleted");

    // The blob of `b` goes (tree-backed: its marker).
    fs::remove_file(store.inner.tree_blob_marker(&b.blob_digest)).unwrap();
    assert_eq!(store.cache_get("b").unwrap(), None);
    assert!(cache_rows(&store).is_empty());

    // A base-image entry whose config blob is gone.
    let c = step_layer(&store, &[("c", b"c")]);
    let config = store.put_blob(None, b"{\"config\":{}}").unwrap();
    let entry = CacheEntry {
        layers: vec![c.clone()],
        config_digest: Some(config.clone()),
        created: 1,
    };
    store.cache_put("base", &entry).unwrap();
    assert_eq!(store.cache_get("base").unwrap(), Some(entry));
    fs::remove_file(store.blob_path(&config)).unwrap();
    assert_eq!(store.cache_get("base").unwrap(), None);
    assert!(cache_rows(&store).is_empty());

    // A corrupt row is a miss too, and keeps nothing.
    store
        .inner
        .conn()
        .execute(
            "INSERT INTO build_cache VALUES ('bad', 'not json', NULL, 1, 1)",
            [],
        )
        .unwrap();
    assert_eq!(store.cache_get("bad").unwrap(), None);
    assert!(cache_rows(&store).is_empty());
}

#[test]
fn cache_put_refuses_missing_content_and_replaces_entries() {
    let (_d, store) = new_store();
    let _guard = store.begin_import();
    let a = step_layer(&store, &[("a", b"a")]);
    let mut ghost = a.clone();
    ghost.blob_digest = crate::util::sha256_digest(b"absent");
    let e = store.cache_put("k", &step_entry(&ghost)).unwrap_err();
    assert!(matches!(e, StoreError::BlobNotFound(_)), "{e:?}");
    let mut ghost = a.clone();
    ghost.diff_id = crate::util::sha256_digest(b"absent");
    let e = store.cache_put("k", &step_entry(&ghost)).unwrap_err();
    assert!(matches!(e, StoreError::LayerNotFound(_)), "{e:?}");
    let e = store
        .cache_put(
            "k",
            &CacheEntry {
                layers: vec![],
                config_digest: Some(crate::util::sha256_digest(b"absent")),
                created: 1,
            },
        )
        .unwrap_err();
    assert!(matches!(e, StoreError::BlobNotFound(_)), "{e:?}");
    assert!(cache_rows(&store).is_empty());

    // A step that changed nothing: no layer.
    let empty = CacheEntry {
        layers: vec![],
        config_digest: None,
        created: 5,
    };
    store.cache_put("k", &empty).unwrap();
    assert_eq!(store.cache_get("k").unwrap(), Some(empty));
    let b = step_entry(&a);
    store.cache_put("k", &b).unwrap();
    assert_eq!(store.cache_get("k").unwrap(), Some(b));
    assert_eq!(cache_rows(&store), vec!["k"]);
}

#[test]
fn prune_keeps_the_most_recently_used() {
    let (_d, store) = new_store();
    let guard = store.begin_import();
    let a = step_layer(&store, &[("a", &[1u8; 20_000])]);
    let b = step_layer(&store, &[("b", &[2u8; 30_000])]);
    let c = step_layer(&store, &[("c", &[3u8; 40_000])]);
    for (k, l) in [("a", &a), ("b", &b), ("c", &c)] {
        store.cache_put(k, &step_entry(l)).unwrap();
    }
    // `a` becomes the most recently used, `b` the least.
    assert!(store.cache_get("a").unwrap().is_some());
    drop(guard);

    // Everything fits: nothing goes.
    let total = a.blob_size + b.blob_size + c.blob_size;
    assert_eq!(store.prune_build_cache(total).unwrap(), 0);
    assert_eq!(cache_rows(&store), vec!["a", "b", "c"]);

    // One byte less: the least recently used goes, and its layer with it.
    assert_eq!(store.prune_build_cache(total - 1).unwrap(), 1);
    assert_eq!(cache_rows(&store), vec!["a", "c"]);
    assert!(!store.has_blob(&b.blob_digest));
    assert!(!store.has_layer(&b.diff_id));

    // Room for `a` only: `c` goes next, `a` stays.
    assert_eq!(store.prune_build_cache(a.blob_size).unwrap(), 1);
    assert_eq!(cache_rows(&store), vec!["a"]);
    assert!(!store.has_layer(&c.diff_id));
    assert!(store.has_blob(&a.blob_digest));
    assert!(store.has_layer(&a.diff_id));
    assert!(store.cache_get("a").unwrap().is_some());

    // What an image also references does not count: `a` stays at 0.
    let img = name("alice", "built");
    store
        .record_built_image(
            &img,
            config_for(std::slice::from_ref(&a)),
            vec![a.clone()],
            vec!["pc-x86-64".into()],
            false,
            1_700_000_000,
        )
        .unwrap();
    assert_eq!(store.prune_build_cache(0).unwrap(), 0);
    assert_eq!(cache_rows(&store), vec!["a"]);

    // Without the image, it goes; the layer goes with it.
    store.remove_image(&img).unwrap();
    assert_eq!(store.prune_build_cache(0).unwrap(), 1);
    assert!(cache_rows(&store).is_empty());
    assert!(!store.has_layer(&a.diff_id));
    assert_eq!(blob_count(&store), 0);
}

#[test]
fn prune_counts_a_shared_blob_once() {
    let (_d, store) = new_store();
    let guard = store.begin_import();
    let a = step_layer(&store, &[("a", &[1u8; 20_000])]);
    store.cache_put("old", &step_entry(&a)).unwrap();
    store.cache_put("new", &step_entry(&a)).unwrap();
    drop(guard);
    // Both name the same blob: its size once, within the bound.
    assert_eq!(store.prune_build_cache(a.blob_size).unwrap(), 0);
    // Below it: dropping `old` alone frees nothing, so both go.
    assert_eq!(store.prune_build_cache(a.blob_size - 1).unwrap(), 2);
    assert!(!store.has_layer(&a.diff_id));
}

#[test]
fn record_built_image_is_deterministic_and_creates_no_blob_twice() {
    let (_d, store) = new_store();
    let guard = store.begin_import();
    let a = step_layer(&store, &[("root/test-result", b"OK\n")]);
    let b = step_layer(&store, &[("etc/motd", b"hello\n")]);
    let layers = vec![a.clone(), b.clone()];
    let img = name("alice", "img");
    let (m1, o1) = store
        .record_built_image(
            &img,
            config_for(&layers),
            layers.clone(),
            vec!["pc-x86-64".into()],
            false,
            1_700_000_000,
        )
        .unwrap();
    assert_eq!(o1, PutOutcome::Created);
    drop(guard);
    let blobs = blob_count(&store);
    assert_eq!(blobs, 2, "config, manifest (the layers are tree-backed)");

    // The same input again: refused without replace, same digests with it,
    // and not one new blob.
    let e = store
        .record_built_image(
            &img,
            config_for(&layers),
            layers.clone(),
            vec!["pc-x86-64".into()],
            false,
            1_700_000_000,
        )
        .unwrap_err();
    assert!(matches!(e, StoreError::ImageExists(_)), "{e:?}");
    let mut other = config_for(&layers);
    other.insert("author".into(), "bob".into());
    let e = store
        .record_built_image(&img, other, layers.clone(), vec![], false, 1)
        .unwrap_err();
    assert!(matches!(e, StoreError::ImageExists(_)), "{e:?}");
    assert_eq!(blob_count(&store), blobs, "a refusal writes no blob");
    let (m2, o2) = store
        .record_built_image(
            &img,
            config_for(&layers),
            layers.clone(),
            vec!["pc-x86-64".into()],
            true,
            1_700_000_000,
        )
        .unwrap();
    assert_eq!((m2.clone(), o2), (m1.clone(), PutOutcome::Replaced));
    assert_eq!(blob_count(&store), blobs, "no new blob");

    // The record and the manifest.
    let rec = store.get_image(&img).unwrap().unwrap();
    assert_eq!(rec.manifest_digest, m1);
    assert_eq!(rec.layers, layers);
    assert_eq!(rec.node_models, vec!["pc-x86-64".to_string()]);
    assert_eq!(rec.created, 1_700_000_000);
    assert_eq!(rec.manifest_media_type, walt_core::oci::OCI_MANIFEST);
    let manifest: serde_json::Value =
        serde_json::from_slice(&store.read_blob(&m1).unwrap()).unwrap();
    assert_eq!(
        manifest["annotations"][walt_core::oci::ANNOTATION_WALT_BUILT],
        "true"
    );
    assert_eq!(manifest["config"]["digest"], rec.config_digest.as_str());
    assert_eq!(manifest["layers"][1]["digest"], b.blob_digest.as_str());
    assert_eq!(
        manifest["layers"][0]["mediaType"],
        walt_core::oci::OCI_LAYER_TAR
    );
    let config: serde_json::Value =
        serde_json::from_slice(&store.read_blob(&rec.config_digest).unwrap()).unwrap();
    assert_eq!(serde_json::Value::Object(config_for(&layers)), config);

    // Another name over the same content: no new blob either.
    let (m3, _) = store
        .record_built_image(
            &name("alice", "other"),
            config_for(&layers),
            layers.clone(),
            vec!["pc-x86-64".into()],
            false,
            1_700_000_001,
        )
        .unwrap();
    assert_eq!(m3, m1);
    assert_eq!(blob_count(&store), blobs);

    // A layer missing from the store is refused, nothing recorded.
    let mut ghost = a.clone();
    ghost.diff_id = crate::util::sha256_digest(b"absent");
    let e = store
        .record_built_image(
            &name("alice", "ghost"),
            config_for(std::slice::from_ref(&ghost)),
            vec![ghost],
            vec![],
            false,
            1,
        )
        .unwrap_err();
    assert!(matches!(e, StoreError::MissingContent { .. }), "{e:?}");
    assert!(store.get_image(&name("alice", "ghost")).unwrap().is_none());
}

#[test]
fn a_version_1_database_is_migrated() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    drop(Store::open(&data).unwrap());
    {
        let conn = rusqlite::Connection::open(data.join("walt.db")).unwrap();
        // Back to version 1's schema: no build cache, its empty `nodes`.
        conn.execute_batch(
            "DROP TABLE vnodes; DROP TABLE build_cache; DROP TABLE nodes; DROP TABLE default_copies;
             DROP TABLE devices;
             CREATE TABLE nodes (mac TEXT PRIMARY KEY, model TEXT, image_id INTEGER);
             PRAGMA user_version = 1;",
        )
        .unwrap();
    }
    let store = Store::open(&data).unwrap();
    let _guard = store.begin_import();
    let a = step_layer(&store, &[("a", b"a")]);
    store.cache_put("k", &step_entry(&a)).unwrap();
    assert_eq!(store.cache_get("k").unwrap(), Some(step_entry(&a)));
    // Version 3's device records work too.
    let lease = Lease {
        mac: "52:54:00:00:00:01".into(),
        ip: "10.0.0.1".into(),
        hostname: String::new(),
        model: None,
        now: 1,
    };
    assert!(store.record_lease(&lease).unwrap().1);
}
