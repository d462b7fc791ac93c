//! The store's bounds: unpacked size of a layer (files, holes, the
//! uncompressed stream) and the free-space reserve. Nothing is left in
//! `tmp/` nor published when one stops an import.

use std::fs;
use std::io::Write;

use walt_core::config::{Limits, Reserve};
use walt_core::oci::Compression;

use crate::util::sha256_digest;
use crate::*;

fn store_with(limits: Limits) -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("data")).unwrap();
    store.set_limits(limits);
    (dir, store)
}

fn small_layers() -> Limits {
    Limits {
        layer_unpacked_size: 1 << 20,
        ..Limits::default()
    }
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// A tar of `files` (name, size of zeros), then `trailing` zero bytes.
fn tar_of(files: &[(&str, u64)], trailing: usize) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, size) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(*size);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, std::io::repeat(0).take_bytes(*size))
            .unwrap();
    }
    let mut out = b.into_inner().unwrap();
    out.resize(out.len() + trailing, 0);
    out
}

trait TakeBytes: std::io::Read + Sized {
    fn take_bytes(self, n: u64) -> std::io::Take<Self> {
        std::io::Read::take(self, n)
    }
}
impl<R: std::io::Read> TakeBytes for R {}

fn import(store: &Store, blob: &[u8], opts: &ImportOptions) -> Result<LayerImport> {
    store.import_layer(
        &mut &blob[..],
        Compression::Gzip,
        &sha256_digest(blob),
        opts,
    )
}

fn assert_clean(store: &Store) {
    let d = store.data_dir();
    for sub in ["tmp", "layers", "blobs/sha256"] {
        let left: Vec<_> = fs::read_dir(d.join(sub)).unwrap().collect();
        assert!(left.is_empty(), "{sub} not empty: {left:?}");
    }
}

#[track_caller]
fn assert_too_large(r: Result<LayerImport>, key: &str, what: &str) {
    match r {
        Err(e @ StoreError::TooLarge { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains(&format!("(limits.{key} ")), "{msg}");
            assert!(msg.contains(what), "{msg}");
        }
        other => panic!("expected a TooLarge error, got {other:?}"),
    }
}

#[test]
fn layer_limit_counts_file_bytes() {
    let (_d, store) = store_with(small_layers());
    // Fits: 1 MiB exactly, reported.
    let ok = gzip(&tar_of(&[("a", 512 << 10), ("b", 512 << 10)], 0));
    let imported = import(&store, &ok, &ImportOptions::default()).unwrap();
    assert_eq!(imported.unpacked_bytes, 1 << 20);

    let (_d, store) = store_with(small_layers());
    let bomb = gzip(&tar_of(&[("a", 512 << 10), ("big", 600 << 10)], 0));
    assert_too_large(
        import(&store, &bomb, &ImportOptions::default()),
        "layer-unpacked-size",
        "at entry 'big'",
    );
    assert_clean(&store);
}

#[test]
fn holes_count() {
    let (_d, store) = store_with(small_layers());
    let outside = tempfile::tempdir().unwrap();
    let sparse = walt_tar::testing::hostile_archives(outside.path())
        .into_iter()
        .find(|h| h.name.starts_with("sparse bomb"))
        .unwrap();
    assert_too_large(
        import(&store, &gzip(&sparse.tar), &ImportOptions::default()),
        "layer-unpacked-size",
        "more than 1M unpacked",
    );
    assert_clean(&store);
}

#[test]
fn uncompressed_stream_is_capped() {
    let (_d, store) = store_with(small_layers());
    // A small file, then 8 MiB of zeros after the end of the archive.
    let bomb = gzip(&tar_of(&[("small", 10)], 8 << 20));
    assert_too_large(
        import(&store, &bomb, &ImportOptions::default()),
        "layer-unpacked-size",
        "its uncompressed stream",
    );
    assert_clean(&store);
}

#[test]
fn a_tighter_limit_names_its_key() {
    let (_d, store) = store_with(Limits::default());
    let blob = gzip(&tar_of(&[("f", 4096)], 0));
    let opts = ImportOptions {
        unpacked_limit: Some((4000, "image-unpacked-size")),
        ..Default::default()
    };
    assert_too_large(import(&store, &blob, &opts), "image-unpacked-size", "'f'");
    assert_clean(&store);
    // A looser one leaves the store's.
    store.set_limits(Limits {
        layer_unpacked_size: 100,
        ..Limits::default()
    });
    let opts = ImportOptions {
        unpacked_limit: Some((1 << 30, "image-unpacked-size")),
        ..Default::default()
    };
    assert_too_large(import(&store, &blob, &opts), "layer-unpacked-size", "'f'");
    assert_clean(&store);
}

#[test]
fn free_space_reserve_stops_imports() {
    let (_d, store) = store_with(Limits {
        free_space_reserve: Reserve::Bytes(u64::MAX / 2),
        ..Limits::default()
    });
    let blob = gzip(&tar_of(&[("f", 10)], 0));
    match import(&store, &blob, &ImportOptions::default()) {
        Err(e @ StoreError::NoSpace { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("limits.free-space-reserve"), "{msg}");
            assert!(!msg.contains(&*store.data_dir().to_string_lossy()), "{msg}");
        }
        other => panic!("expected NoSpace, got {other:?}"),
    }
    assert!(matches!(
        store.check_space(0),
        Err(StoreError::NoSpace { .. })
    ));
    assert_clean(&store);

    store.set_limits(Limits {
        free_space_reserve: Reserve::Bytes(0),
        ..Limits::default()
    });
    store.check_space(0).unwrap();
    assert!(matches!(
        store.check_space(u64::MAX / 2),
        Err(StoreError::NoSpace { .. })
    ));
    import(&store, &blob, &ImportOptions::default()).unwrap();
}
