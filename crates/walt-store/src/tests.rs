//! Store tests (run as root: mknod, chown and trusted.* xattrs).

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tar::{EntryType, Header};
use walt_core::ImageName;
use walt_core::oci::Compression;

use crate::util::sha256_digest;
use crate::*;

/// Builds tar streams, including hostile ones.
struct Tar {
    b: tar::Builder<Vec<u8>>,
}

impl Tar {
    fn new() -> Self {
        Tar {
            b: tar::Builder::new(Vec::new()),
        }
    }

    fn header(path: &str, kind: EntryType, mode: u32, size: u64) -> Header {
        let mut h = Header::new_gnu();
        let name = &mut h.as_old_mut().name;
        name[..path.len()].copy_from_slice(path.as_bytes());
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_600_000_000);
        h
    }

    fn push(&mut self, mut h: Header, data: &[u8]) -> &mut Self {
        h.set_cksum();
        self.b.append(&h, data).unwrap();
        self
    }

    fn dir(&mut self, path: &str, mode: u32) -> &mut Self {
        self.push(Self::header(path, EntryType::Directory, mode, 0), b"")
    }

    fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> &mut Self {
        self.push(
            Self::header(path, EntryType::Regular, mode, data.len() as u64),
            data,
        )
    }

    fn link(&mut self, kind: EntryType, path: &str, target: &str) -> &mut Self {
        let mut h = Self::header(path, kind, 0o777, 0);
        h.set_link_name_literal(target).unwrap();
        self.push(h, b"")
    }

    fn pax(&mut self, records: &[(&str, &[u8])]) -> &mut Self {
        let mut data = Vec::new();
        for (k, v) in records {
            let body_len = 1 + k.len() + 1 + v.len() + 1;
            let mut len = body_len + 1;
            while len != body_len + len.to_string().len() {
                len = body_len + len.to_string().len();
            }
            data.extend_from_slice(format!("{len} {k}=").as_bytes());
            data.extend_from_slice(v);
            data.push(b'\n');
        }
        let h = Self::header("PaxHeaders/x", EntryType::XHeader, 0o644, data.len() as u64);
        self.push(h, &data)
    }

    fn finish(&mut self) -> Vec<u8> {
        let b = std::mem::replace(&mut self.b, tar::Builder::new(Vec::new()));
        b.into_inner().unwrap()
    }
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn zstd(data: &[u8]) -> Vec<u8> {
    zstd::stream::encode_all(data, 3).unwrap()
}

/// A new store in a temporary directory (the other test modules use it too).
pub(crate) fn new_store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("data")).unwrap();
    (dir, store)
}

/// A session directory whose upper directory holds `files` (path, content).
pub(crate) fn upper_with(store: &Store, files: &[(&str, &[u8])]) -> SessionDir {
    let s = store.session_dir("test session").unwrap();
    for (p, content) in files {
        let path = s.upper().join(p);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, content).unwrap();
    }
    s
}

fn import(store: &Store, blob: &[u8], c: Compression) -> Result<LayerImport> {
    store.import_layer(
        &mut &blob[..],
        c,
        &sha256_digest(blob),
        &ImportOptions::default(),
    )
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn assert_nothing_published(store: &Store) {
    let d = store.data_dir();
    assert_eq!(
        entries(&d.join("tmp")),
        Vec::<String>::new(),
        "tmp/ not empty"
    );
    assert_eq!(
        entries(&d.join("layers")),
        Vec::<String>::new(),
        "layers/ not empty"
    );
    assert_eq!(
        entries(&d.join("blobs/sha256")),
        Vec::<String>::new(),
        "blobs/ not empty"
    );
}

fn name(owner: &str, n: &str) -> ImageName {
    ImageName {
        owner: owner.into(),
        name: n.into(),
        tag: "latest".into(),
    }
}

#[test]
fn unpacks_every_kind_of_entry() {
    let (_d, store) = new_store();
    let mut t = Tar::new();
    t.dir("./", 0o755);
    let mut h = Tar::header("etc/", EntryType::Directory, 0o750, 0);
    h.set_uid(1000);
    h.set_gid(1001);
    h.set_mtime(1_000_000);
    t.push(h, b"");
    let mut h = Tar::header("./etc/hosts", EntryType::Regular, 0o4755, 5);
    h.set_uid(12);
    h.set_gid(34);
    h.set_mtime(1_234_567);
    t.push(h, b"hello");
    t.link(EntryType::Symlink, "etc/abs-link", "/usr/bin/target");
    t.link(EntryType::Symlink, "etc/rel-link", "../nowhere");
    t.link(EntryType::Link, "etc/hard", "etc/hosts");
    t.dir("tmp", 0o1777);
    t.push(Tar::header("dev/fifo", EntryType::Fifo, 0o644, 0), b"");
    let mut h = Tar::header("dev/null", EntryType::Char, 0o666, 0);
    h.set_device_major(1).unwrap();
    h.set_device_minor(3).unwrap();
    t.push(h, b"");
    t.pax(&[
        ("SCHILY.xattr.user.walt", b"yes"),
        (
            "SCHILY.xattr.security.capability",
            b"\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00",
        ),
        ("SCHILY.xattr.trusted.overlay.redirect", b"/evil"),
        ("mtime", b"1700000000.25"),
    ]);
    t.file("usr/bin/ping", 0o755, b"#!ping");
    // A later entry replaces an earlier one; a dir replaced by a file.
    t.file("etc/motd", 0o644, b"old");
    t.file("etc/motd", 0o600, b"new");
    t.file("var/cache/x", 0o644, b"x");
    t.file("var/cache", 0o644, b"now a file");
    let long = format!("deep/{}/file", "d".repeat(150));
    let mut h = Tar::header("placeholder", EntryType::Regular, 0o644, 4);
    h.set_path(&long).unwrap_err(); // too long for a plain header
    let mut h = Header::new_gnu();
    h.set_size(4);
    h.set_mode(0o644);
    h.set_entry_type(EntryType::Regular);
    t.b.append_data(&mut h, &long, &b"long"[..]).unwrap();
    let tar_bytes = t.finish();

    let blob = gzip(&tar_bytes);
    let r = import(&store, &blob, Compression::Gzip).unwrap();
    assert_eq!(r.digest, sha256_digest(&blob));
    assert_eq!(r.diff_id, sha256_digest(&tar_bytes));
    assert_eq!(r.size, blob.len() as u64);
    assert_eq!(r.unpacked_size, tar_bytes.len() as u64);
    assert!(store.has_blob(&r.digest));
    assert_eq!(store.read_blob(&r.digest).unwrap(), blob);
    assert!(store.has_layer(&r.diff_id));
    let root = store.layer_path(&r.diff_id);
    assert_eq!(entries(&store.data_dir().join("tmp")), Vec::<String>::new());

    let m = fs::symlink_metadata(root.join("etc")).unwrap();
    assert!(m.is_dir());
    assert_eq!((m.mode() & 0o7777, m.uid(), m.gid()), (0o750, 1000, 1001));
    assert_eq!(
        m.mtime(),
        1_000_000,
        "directory mtime set after its children"
    );

    let m = fs::symlink_metadata(root.join("etc/hosts")).unwrap();
    assert!(m.is_file());
    assert_eq!((m.mode() & 0o7777, m.uid(), m.gid()), (0o4755, 12, 34));
    assert_eq!(m.mtime(), 1_234_567);
    assert_eq!(m.nlink(), 2);
    assert_eq!(fs::read(root.join("etc/hosts")).unwrap(), b"hello");
    let hard = fs::symlink_metadata(root.join("etc/hard")).unwrap();
    assert_eq!(hard.ino(), m.ino());

    assert_eq!(
        fs::read_link(root.join("etc/abs-link")).unwrap(),
        Path::new("/usr/bin/target")
    );
    assert_eq!(
        fs::read_link(root.join("etc/rel-link")).unwrap(),
        Path::new("../nowhere")
    );
    let m = fs::symlink_metadata(root.join("tmp")).unwrap();
    assert_eq!(m.mode() & 0o7777, 0o1777);
    let m = fs::symlink_metadata(root.join("dev/fifo")).unwrap();
    assert!(m.file_type().is_fifo());
    assert_eq!(m.mode() & 0o7777, 0o644);
    let m = fs::symlink_metadata(root.join("dev/null")).unwrap();
    assert!(m.file_type().is_char_device());
    assert_eq!(m.rdev(), nix::sys::stat::makedev(1, 3));
    assert_eq!(m.mode() & 0o7777, 0o666);
    // Implicit parents.
    let m = fs::symlink_metadata(root.join("usr/bin")).unwrap();
    assert!(m.is_dir());
    assert_eq!(m.mode() & 0o7777, 0o755);
    // PAX xattrs and sub-second mtime.
    let ping = root.join("usr/bin/ping");
    assert_eq!(
        xattr::get(&ping, "user.walt").unwrap().as_deref(),
        Some(&b"yes"[..])
    );
    assert!(xattr::get(&ping, "security.capability").unwrap().is_some());
    assert_eq!(xattr::get(&ping, "trusted.overlay.redirect").unwrap(), None);
    let m = fs::symlink_metadata(&ping).unwrap();
    assert_eq!((m.mtime(), m.mtime_nsec()), (1_700_000_000, 250_000_000));
    // Replacements.
    assert_eq!(fs::read(root.join("etc/motd")).unwrap(), b"new");
    let m = fs::symlink_metadata(root.join("etc/motd")).unwrap();
    assert_eq!(m.mode() & 0o7777, 0o600);
    assert_eq!(fs::read(root.join("var/cache")).unwrap(), b"now a file");
    // Long names.
    assert_eq!(fs::read(root.join(&long)).unwrap(), b"long");
}

#[test]
fn converts_whiteouts() {
    let (_d, store) = new_store();
    let mut t = Tar::new();
    t.dir("etc", 0o755)
        .file("etc/.wh.passwd", 0o644, b"")
        .dir("usr", 0o755)
        .file("usr/.wh..wh..opq", 0o644, b"")
        .file("usr/.wh..wh.plnk", 0o644, b"")
        .file("opt/sub/.wh..wh..opq", 0o644, b"")
        .file(".wh.toplevel", 0o644, b"");
    let tar_bytes = t.finish();
    let r = import(&store, &tar_bytes, Compression::None).unwrap();
    let root = store.layer_path(&r.diff_id);
    for p in ["etc/passwd", "toplevel"] {
        let m = fs::symlink_metadata(root.join(p)).unwrap();
        assert!(m.file_type().is_char_device(), "{p}");
        assert_eq!(m.rdev(), 0);
    }
    assert!(!root.join("etc/.wh.passwd").exists());
    for d in ["usr", "opt/sub"] {
        assert_eq!(
            xattr::get(root.join(d), "trusted.overlay.opaque")
                .unwrap()
                .as_deref(),
            Some(&b"y"[..]),
            "{d}"
        );
    }
    assert_eq!(entries(&root.join("usr")), Vec::<String>::new());
}

#[test]
fn refuses_hostile_entries() {
    let outside = tempfile::tempdir().unwrap();
    let out = outside.path().to_str().unwrap().to_string();
    let cases: Vec<(Vec<u8>, String)> = vec![
        (
            Tar::new()
                .file("ok", 0o644, b"")
                .file("../x", 0o644, b"evil")
                .finish(),
            "entry '../x' escapes the layer root".into(),
        ),
        (
            Tar::new().file("a/../../x", 0o644, b"evil").finish(),
            "entry 'a/../../x' escapes the layer root".into(),
        ),
        (
            Tar::new().file("/abs", 0o644, b"evil").finish(),
            "entry '/abs' is an absolute path".into(),
        ),
        (
            Tar::new()
                .link(EntryType::Symlink, "etc", &out)
                .file("etc/passwd", 0o644, b"evil")
                .finish(),
            "entry 'etc/passwd' goes through symlink 'etc'".into(),
        ),
        (
            Tar::new()
                .dir("a", 0o755)
                .link(EntryType::Symlink, "a/b", &out)
                .dir("a/b/c", 0o755)
                .finish(),
            "entry 'a/b/c' goes through symlink 'a/b'".into(),
        ),
        (
            Tar::new()
                .link(EntryType::Symlink, "etc", &out)
                .file("etc/.wh.passwd", 0o644, b"")
                .finish(),
            "goes through symlink 'etc'".into(),
        ),
        (
            Tar::new()
                .link(EntryType::Symlink, "etc", &out)
                .file("etc/.wh..wh..opq", 0o644, b"")
                .finish(),
            "goes through symlink 'etc'".into(),
        ),
        (
            Tar::new()
                .link(EntryType::Link, "h", "../../etc/shadow")
                .finish(),
            "entry 'h' is a hard link to '../../etc/shadow' which escapes the layer root".into(),
        ),
        (
            Tar::new()
                .link(EntryType::Link, "h", "/etc/shadow")
                .finish(),
            "is a hard link to '/etc/shadow' which is an absolute path".into(),
        ),
        (
            Tar::new()
                .link(EntryType::Symlink, "etc", "/etc")
                .link(EntryType::Link, "h", "etc/hostname")
                .finish(),
            "entry 'h' goes through symlink 'etc'".into(),
        ),
        (
            Tar::new().link(EntryType::Link, "h", "missing").finish(),
            "is a hard link to 'missing' which is not in the layer".into(),
        ),
        (
            Tar::new().file("", 0o644, b"").finish(),
            "has an empty name".into(),
        ),
    ];
    let (_d, store) = new_store();
    for (tar_bytes, msg) in cases {
        for (blob, c) in [
            (tar_bytes.clone(), Compression::None),
            (gzip(&tar_bytes), Compression::Gzip),
        ] {
            let err = import(&store, &blob, c).unwrap_err();
            let text = err.to_string();
            assert!(matches!(err, StoreError::BadEntry { .. }), "{text}");
            assert!(text.contains(&msg), "'{text}' does not contain '{msg}'");
            assert!(
                text.starts_with(&format!("layer {}: ", sha256_digest(&blob))),
                "{text}"
            );
            assert_nothing_published(&store);
            assert_eq!(entries(outside.path()), Vec::<String>::new());
            assert!(!store.data_dir().join("x").exists());
            assert!(!store.data_dir().join("../x").exists());
        }
    }
}

#[test]
fn hostile_archive_table() {
    // walt-tar's table, through the whole import pipeline (a store per
    // case, kept until the table checked it).
    let mut stores = Vec::new();
    let policy = walt_tar::testing::Policy {
        overlay_whiteouts: true,
        devices_refused: false,
        // The default `layer-unpacked-size`.
        limit: Some(walt_core::config::Limits::default().layer_unpacked_size),
    };
    walt_tar::testing::run_hostile_table(policy, |case, tar| {
        stores.push(new_store());
        let store = &stores.last().unwrap().1;
        match import(store, tar, Compression::None) {
            Ok(r) => Ok(store.layer_path(&r.diff_id)),
            Err(e) => {
                assert!(
                    matches!(
                        e,
                        StoreError::BadEntry { .. }
                            | StoreError::BadLayer { .. }
                            | StoreError::TooLarge { .. }
                    ),
                    "{}: {e}",
                    case.name
                );
                assert_nothing_published(store);
                Err(e.to_string())
            }
        }
    });
}

#[test]
fn symlink_to_etc_then_file_through_it_leaves_etc_alone() {
    let (_d, store) = new_store();
    let before = fs::read("/etc/passwd").unwrap();
    let tar_bytes = Tar::new()
        .link(EntryType::Symlink, "etc", "/etc")
        .file("etc/passwd", 0o644, b"root::0:0::/:/bin/sh\n")
        .finish();
    let err = import(&store, &tar_bytes, Compression::None).unwrap_err();
    assert!(
        err.to_string()
            .contains("entry 'etc/passwd' goes through symlink 'etc'"),
        "{err}"
    );
    assert_eq!(fs::read("/etc/passwd").unwrap(), before);
    assert_nothing_published(&store);
}

#[test]
fn wrong_digest_size_or_diff_id_publishes_nothing() {
    let (_d, store) = new_store();
    let tar_bytes = Tar::new().file("a", 0o644, b"aaa").finish();
    let blob = gzip(&tar_bytes);
    let wrong = sha256_digest(b"something else");
    let err = store
        .import_layer(
            &mut &blob[..],
            Compression::Gzip,
            &wrong,
            &ImportOptions::default(),
        )
        .unwrap_err();
    assert!(matches!(err, StoreError::DigestMismatch { .. }), "{err}");
    assert_eq!(
        err.to_string(),
        format!(
            "blob {wrong}: content does not match its digest (got {})",
            sha256_digest(&blob)
        )
    );
    assert_nothing_published(&store);

    let digest = sha256_digest(&blob);
    let opts = ImportOptions {
        expected_size: Some(blob.len() as u64 + 1),
        ..Default::default()
    };
    let err = store
        .import_layer(&mut &blob[..], Compression::Gzip, &digest, &opts)
        .unwrap_err();
    assert!(matches!(err, StoreError::SizeMismatch { .. }), "{err}");
    assert_nothing_published(&store);
    let opts = ImportOptions {
        expected_size: Some(blob.len() as u64 - 1),
        ..Default::default()
    };
    let err = store
        .import_layer(&mut &blob[..], Compression::Gzip, &digest, &opts)
        .unwrap_err();
    assert!(matches!(err, StoreError::SizeMismatch { .. }), "{err}");
    assert_nothing_published(&store);

    let opts = ImportOptions {
        expected_diff_id: Some(wrong.clone()),
        ..Default::default()
    };
    let err = store
        .import_layer(&mut &blob[..], Compression::Gzip, &digest, &opts)
        .unwrap_err();
    assert!(matches!(err, StoreError::DiffIdMismatch { .. }), "{err}");
    assert_nothing_published(&store);
}

#[test]
fn truncated_or_corrupt_input_fails() {
    let (_d, store) = new_store();
    let mut t = Tar::new();
    t.file("big", 0o644, &vec![7u8; 300_000]);
    let tar_bytes = t.finish();
    for (blob, c) in [
        (gzip(&tar_bytes), Compression::Gzip),
        (zstd(&tar_bytes), Compression::Zstd),
    ] {
        for cut in [blob.len() / 2, blob.len() - 4] {
            let part = &blob[..cut];
            let digest = sha256_digest(&blob);
            let err = store
                .import_layer(&mut &part[..], c, &digest, &ImportOptions::default())
                .unwrap_err();
            assert!(
                matches!(
                    err,
                    StoreError::BadLayer { .. } | StoreError::DigestMismatch { .. }
                ),
                "{c:?} cut {cut}: {err}"
            );
            assert_nothing_published(&store);
        }
    }
    // Not gzip at all.
    let err = import(&store, &tar_bytes, Compression::Gzip).unwrap_err();
    assert!(matches!(err, StoreError::BadLayer { .. }), "{err}");
    assert_nothing_published(&store);
    // A truncated plain tar inside a file's data.
    let part = &tar_bytes[..1000];
    let err = store
        .import_layer(
            &mut &part[..],
            Compression::None,
            &sha256_digest(part),
            &ImportOptions::default(),
        )
        .unwrap_err();
    assert!(matches!(err, StoreError::BadLayer { .. }), "{err}");
    assert_nothing_published(&store);
}

#[test]
fn gzip_zstd_and_plain_give_the_same_diff_id() {
    let (_d, store) = new_store();
    let mut t = Tar::new();
    t.dir("d", 0o755).file("d/f", 0o644, &vec![3u8; 2 << 20]);
    let mut tar_bytes = t.finish();
    // Extra padding after the end-of-archive marker is part of the diff_id.
    tar_bytes.extend_from_slice(&[0u8; 4096]);
    let expected = sha256_digest(&tar_bytes);
    let mut diff_ids = Vec::new();
    for (blob, c) in [
        (gzip(&tar_bytes), Compression::Gzip),
        (zstd(&tar_bytes), Compression::Zstd),
        (tar_bytes.clone(), Compression::None),
    ] {
        let calls = Arc::new(AtomicU64::new(0));
        let last = Arc::new(AtomicU64::new(0));
        let (c2, l2) = (calls.clone(), last.clone());
        let opts = ImportOptions {
            expected_size: Some(blob.len() as u64),
            expected_diff_id: Some(expected.clone()),
            progress: Some(Box::new(move |n| {
                c2.fetch_add(1, Ordering::Relaxed);
                l2.store(n, Ordering::Relaxed);
            })),
            ..Default::default()
        };
        let r = store
            .import_layer(&mut &blob[..], c, &sha256_digest(&blob), &opts)
            .unwrap();
        assert_eq!(last.load(Ordering::Relaxed), blob.len() as u64);
        assert!(calls.load(Ordering::Relaxed) <= blob.len() as u64 / (256 * 1024) + 2);
        assert_eq!(r.unpacked_size, tar_bytes.len() as u64);
        assert_eq!(store.read_blob(&r.digest).unwrap(), blob);
        diff_ids.push(r.diff_id);
    }
    assert!(diff_ids.iter().all(|d| *d == expected));
    let root = store.layer_path(&expected);
    assert_eq!(fs::read(root.join("d/f")).unwrap().len(), 2 << 20);
    // Importing again (layer present) is fine and idempotent.
    let blob = gzip(&tar_bytes);
    import(&store, &blob, Compression::Gzip).unwrap();
    assert_eq!(entries(&store.data_dir().join("tmp")), Vec::<String>::new());
}

#[test]
fn store_blob_and_unpack_options() {
    let (_d, store) = new_store();
    let tar_bytes = Tar::new().file("f", 0o644, b"x").finish();
    let blob = gzip(&tar_bytes);
    let digest = sha256_digest(&blob);
    let opts = ImportOptions {
        store_blob: false,
        ..Default::default()
    };
    let r = store
        .import_layer(&mut &blob[..], Compression::Gzip, &digest, &opts)
        .unwrap();
    assert!(!store.has_blob(&digest));
    assert!(store.has_layer(&r.diff_id));

    let (_d, store) = new_store();
    let opts = ImportOptions {
        unpack: false,
        ..Default::default()
    };
    let r = store
        .import_layer(&mut &blob[..], Compression::Gzip, &digest, &opts)
        .unwrap();
    assert!(store.has_blob(&digest));
    assert!(!store.has_layer(&r.diff_id));
    assert_eq!(r.diff_id, sha256_digest(&tar_bytes));
    // Later unpack from the stored blob.
    let _g = store.begin_import();
    let r2 = store
        .unpack_stored_blob(&digest, Compression::Gzip, &r.diff_id)
        .unwrap();
    assert_eq!(
        r2,
        LayerImport {
            unpacked_bytes: 1,
            ..r.clone()
        }
    );
    assert!(store.has_layer(&r.diff_id));
    let err = store
        .unpack_stored_blob(&digest, Compression::Gzip, &sha256_digest(b"no"))
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::LayerNotFound(_) | StoreError::DiffIdMismatch { .. }
        ),
        "{err}"
    );
    let err = store
        .unpack_stored_blob(&sha256_digest(b"none"), Compression::Gzip, &r.diff_id)
        .unwrap_err();
    assert!(matches!(err, StoreError::BlobNotFound(_)), "{err}");
}

#[test]
fn blobs() {
    let (_d, store) = new_store();
    let d = store.put_blob(None, b"{}").unwrap();
    assert_eq!(d, sha256_digest(b"{}"));
    assert_eq!(store.put_blob(Some(&d), b"{}").unwrap(), d);
    assert_eq!(store.read_blob(&d).unwrap(), b"{}");
    assert!(store.has_blob(&d));
    assert!(!store.has_blob(&sha256_digest(b"not stored")));
    assert_eq!(
        store.blob_path(&d),
        store.data_dir().join("blobs/sha256").join(d.hex())
    );
    let err = store.put_blob(Some(&d), b"[]").unwrap_err();
    assert!(
        err.to_string()
            .contains("content does not match its digest"),
        "{err}"
    );
    let missing = sha256_digest(b"missing");
    assert!(matches!(
        store.read_blob(&missing),
        Err(StoreError::BlobNotFound(_))
    ));
    assert_eq!(entries(&store.data_dir().join("tmp")), Vec::<String>::new());
}

/// Stores a small image's content; returns its record (not yet put).
fn make_image(store: &Store, n: &ImageName, content: &[u8]) -> NewImage {
    let tar_bytes = Tar::new().file("content", 0o644, content).finish();
    let blob = gzip(&tar_bytes);
    let l = import(store, &blob, Compression::Gzip).unwrap();
    let config = store
        .put_blob(None, format!("{{\"config\":\"{}\"}}", l.diff_id).as_bytes())
        .unwrap();
    let manifest = store
        .put_blob(None, format!("{{\"manifest\":\"{config}\"}}").as_bytes())
        .unwrap();
    NewImage {
        name: n.clone(),
        manifest_digest: manifest,
        manifest_media_type: walt_core::oci::OCI_MANIFEST.into(),
        config_digest: config,
        layers: vec![LayerRef {
            diff_id: l.diff_id,
            blob_digest: l.digest,
            blob_size: l.size,
            media_type: walt_core::oci::OCI_LAYER_GZIP.into(),
        }],
        node_models: vec!["rpi-b".into(), "pc-x86-64".into()],
        created: 1_700_000_000,
    }
}

#[test]
fn images() {
    let (d, store) = new_store();
    let foo = name("alice", "foo");
    let guard = store.begin_import();
    let rec = make_image(&store, &foo, b"foo");

    // Missing content is refused.
    let mut bad = rec.clone();
    bad.config_digest = sha256_digest(b"absent");
    let err = store.put_image(&bad, false).unwrap_err();
    assert!(
        matches!(err, StoreError::MissingContent { what: "config", .. }),
        "{err}"
    );
    let mut bad = rec.clone();
    bad.layers[0].diff_id = sha256_digest(b"absent");
    let err = store.put_image(&bad, false).unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::MissingContent {
                what: "unpacked layer",
                ..
            }
        ),
        "{err}"
    );
    let mut bad = rec.clone();
    bad.layers[0].blob_digest = sha256_digest(b"absent");
    assert!(store.put_image(&bad, false).is_err());
    let mut bad = rec.clone();
    bad.manifest_digest = sha256_digest(b"absent");
    assert!(store.put_image(&bad, false).is_err());
    assert!(store.get_image(&foo).unwrap().is_none());

    assert_eq!(store.put_image(&rec, false).unwrap(), PutOutcome::Created);
    drop(guard);
    let err = store.put_image(&rec, false).unwrap_err();
    assert_eq!(err.to_string(), "image 'alice/foo' already exists");
    let got = store.get_image(&foo).unwrap().unwrap();
    assert_eq!(got.name, foo);
    assert_eq!(got.layers, rec.layers);
    assert_eq!(got.node_models, rec.node_models);
    assert_eq!(got.size, rec.layers[0].blob_size);
    assert_eq!(got.created, rec.created);
    assert!(!store.image_in_use(&foo).unwrap());

    // Replace keeps the id; the old content is collected.
    let guard = store.begin_import();
    let rec2 = make_image(&store, &foo, b"foo v2");
    assert_eq!(store.put_image(&rec2, true).unwrap(), PutOutcome::Replaced);
    assert!(
        store.has_blob(&rec.manifest_digest),
        "gc deferred while importing"
    );
    drop(guard);
    assert!(!store.has_blob(&rec.manifest_digest));
    assert!(!store.has_layer(&rec.layers[0].diff_id));
    let got2 = store.get_image(&foo).unwrap().unwrap();
    assert_eq!(got2.id, got.id);
    assert_eq!(got2.manifest_digest, rec2.manifest_digest);

    // Duplicate, rename, copy, list.
    let bar = name("alice", "bar");
    let bob = name("bob", "foo");
    store.duplicate_image(&foo, &bar).unwrap();
    let err = store.duplicate_image(&foo, &bar).unwrap_err();
    assert!(matches!(err, StoreError::ImageExists(_)), "{err}");
    assert_eq!(
        store.copy_image(&foo, &bob, false).unwrap(),
        PutOutcome::Created
    );
    assert_eq!(
        store.copy_image(&foo, &bob, true).unwrap(),
        PutOutcome::Replaced
    );
    let baz = ImageName {
        owner: "alice".into(),
        name: "baz".into(),
        tag: "v1".into(),
    };
    let err = store.rename_image(&bar, &foo).unwrap_err();
    assert_eq!(err.to_string(), "image 'alice/foo' already exists");
    store.rename_image(&bar, &baz).unwrap();
    let err = store.rename_image(&bar, &baz).unwrap_err();
    assert_eq!(err.to_string(), "image 'alice/bar' not found");
    let all: Vec<String> = store
        .list_images(None)
        .unwrap()
        .iter()
        .map(|r| r.name.to_string())
        .collect();
    assert_eq!(all, ["alice/baz:v1", "alice/foo", "bob/foo"]);
    assert_eq!(store.list_images(Some("bob")).unwrap().len(), 1);
    assert_eq!(store.list_images(Some("carol")).unwrap().len(), 0);

    // Removing one copy keeps the shared content.
    store.remove_image(&foo).unwrap();
    assert!(store.has_blob(&rec2.manifest_digest));
    assert!(store.has_layer(&rec2.layers[0].diff_id));
    let err = store.remove_image(&foo).unwrap_err();
    assert_eq!(err.to_string(), "image 'alice/foo' not found");
    assert!(matches!(
        store.image_in_use(&foo),
        Err(StoreError::ImageNotFound(_))
    ));

    // Persistence across reopen.
    drop(store);
    let store = Store::open(&d.path().join("data")).unwrap();
    assert_eq!(store.list_images(None).unwrap().len(), 2);
    assert!(store.has_layer(&rec2.layers[0].diff_id));
    store.remove_image(&baz).unwrap();
    store.remove_image(&bob).unwrap();
    assert_nothing_published(&store);
}

#[test]
fn gc_is_deferred_while_importing() {
    let (_d, store) = new_store();
    let g1 = store.begin_import();
    let g2 = store.begin_import();
    let blob = store.put_blob(None, b"orphan").unwrap();
    let report = store.gc().unwrap();
    assert!(report.deferred);
    assert!(store.has_blob(&blob));
    drop(g1);
    assert!(store.has_blob(&blob), "still one import in flight");
    drop(g2);
    assert!(
        !store.has_blob(&blob),
        "deferred gc ran when the last guard dropped"
    );
    let report = store.gc().unwrap();
    assert_eq!(report, GcReport::default());

    // Without a guard, gc collects at once.
    let tar_bytes = Tar::new().file("f", 0o644, b"x").finish();
    let l = import(&store, &tar_bytes, Compression::None).unwrap();
    let report = store.gc().unwrap();
    assert_eq!((report.blobs_removed, report.layers_removed), (1, 1));
    assert!(!store.has_layer(&l.diff_id));
    assert_nothing_published(&store);
}

#[test]
fn open_cleans_up_after_a_crash() {
    let (d, store) = new_store();
    let foo = name("alice", "foo");
    let rec = make_image(&store, &foo, b"keep me");
    store.put_image(&rec, false).unwrap();
    let data = store.data_dir().to_path_buf();
    drop(store);
    // Leftovers of an interrupted import.
    fs::create_dir_all(data.join("tmp/layer-x/diff/etc")).unwrap();
    fs::write(data.join("tmp/layer-x/diff/etc/f"), b"half").unwrap();
    fs::write(data.join("tmp/blob-y"), b"half a blob").unwrap();
    let orphan = sha256_digest(b"orphan");
    fs::write(data.join("blobs/sha256").join(orphan.hex()), b"orphan").unwrap();
    let incomplete = sha256_digest(b"incomplete");
    fs::create_dir_all(data.join("layers").join(incomplete.hex())).unwrap();
    fs::create_dir_all(data.join("layers/not-a-digest/diff")).unwrap();
    let orphan_layer = sha256_digest(b"orphan layer");
    fs::create_dir_all(data.join("layers").join(orphan_layer.hex()).join("diff/x")).unwrap();

    let store = Store::open(&d.path().join("data")).unwrap();
    assert_eq!(entries(&data.join("tmp")), Vec::<String>::new());
    assert!(!store.has_blob(&orphan));
    assert_eq!(
        entries(&data.join("layers")),
        vec![rec.layers[0].diff_id.hex().to_string()]
    );
    let mut blobs = entries(&data.join("blobs/sha256"));
    let mut expected: Vec<String> = [
        &rec.manifest_digest,
        &rec.config_digest,
        &rec.layers[0].blob_digest,
    ]
    .iter()
    .map(|d| d.hex().to_string())
    .collect();
    blobs.sort();
    expected.sort();
    assert_eq!(blobs, expected);
    assert!(store.get_image(&foo).unwrap().is_some());
    let root = store.layer_path(&rec.layers[0].diff_id);
    assert_eq!(fs::read(root.join("content")).unwrap(), b"keep me");
}

#[test]
fn store_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Store>();
    check::<ImportGuard>();
}

#[test]
fn reads_input_to_its_end() {
    // A reader that hands out small chunks: everything must be consumed.
    struct Chunky<'a>(&'a [u8], usize);
    impl Read for Chunky<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = buf.len().min(777).min(self.0.len() - self.1);
            buf[..n].copy_from_slice(&self.0[self.1..self.1 + n]);
            self.1 += n;
            Ok(n)
        }
    }
    let (_d, store) = new_store();
    let tar_bytes = Tar::new().file("f", 0o644, &vec![1u8; 100_000]).finish();
    let blob = zstd(&tar_bytes);
    let mut r = Chunky(&blob, 0);
    let l = store
        .import_layer(
            &mut r,
            Compression::Zstd,
            &sha256_digest(&blob),
            &ImportOptions::default(),
        )
        .unwrap();
    assert_eq!(r.1, blob.len());
    assert_eq!(l.diff_id, sha256_digest(&tar_bytes));
}

#[test]
fn import_without_expected_digest() {
    let (_d, store) = new_store();
    let tar_bytes = Tar::new().file("f", 0o644, b"docker").finish();
    let opts = ImportOptions::default();
    let r = store
        .import_layer_unverified(&mut &tar_bytes[..], Compression::None, &opts)
        .unwrap();
    assert_eq!(r.digest, sha256_digest(&tar_bytes));
    assert_eq!(r.diff_id, r.digest);
    assert_eq!(store.read_blob(&r.digest).unwrap(), tar_bytes);
    assert!(store.has_layer(&r.diff_id));
    // Again: the blob is already there, nothing is left in tmp/.
    let r2 = store
        .import_layer_unverified(&mut &tar_bytes[..], Compression::None, &opts)
        .unwrap();
    assert_eq!(r2, r);
    assert_eq!(entries(&store.data_dir().join("tmp")), Vec::<String>::new());
    // The diff_id is still checked when given.
    let blob = gzip(&tar_bytes);
    let opts = ImportOptions {
        expected_diff_id: Some(sha256_digest(b"other")),
        ..Default::default()
    };
    let e = store
        .import_layer_unverified(&mut &blob[..], Compression::Gzip, &opts)
        .unwrap_err();
    assert!(matches!(e, StoreError::DiffIdMismatch { .. }), "{e}");
    assert!(!store.has_blob(&sha256_digest(&blob)));
    assert_eq!(entries(&store.data_dir().join("tmp")), Vec::<String>::new());
}

/// Records an image made of these layer tars (lowest first) with a real
/// config (labels, history).
fn make_layered_image(store: &Store, n: &ImageName, tars: &[Vec<u8>]) -> NewImage {
    let mut layers = Vec::new();
    for t in tars {
        let blob = gzip(t);
        let l = import(store, &blob, Compression::Gzip).unwrap();
        layers.push(LayerRef {
            diff_id: l.diff_id,
            blob_digest: l.digest,
            blob_size: l.size,
            media_type: walt_core::oci::OCI_LAYER_GZIP.into(),
        });
    }
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": { "Labels": { "walt.node.models": "pc-x86-64" }, "Env": ["A=1"], "Entrypoint": ["/bin/sh"] },
        "rootfs": { "type": "layers", "diff_ids": layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>() },
        "history": layers.iter().map(|_| serde_json::json!({ "created_by": "layer" })).collect::<Vec<_>>(),
    });
    let config = store
        .put_blob(None, &serde_json::to_vec(&config).unwrap())
        .unwrap();
    let manifest = store
        .put_blob(None, format!("{{\"manifest\":\"{config}\"}}").as_bytes())
        .unwrap();
    let rec = NewImage {
        name: n.clone(),
        manifest_digest: manifest,
        manifest_media_type: walt_core::oci::OCI_MANIFEST.into(),
        config_digest: config,
        layers,
        node_models: vec!["pc-x86-64".into()],
        created: 1_700_000_000,
    };
    store.put_image(&rec, false).unwrap();
    rec
}

/// One line per entry below `root`: path, type, mode, owner, content.
fn listing(root: &Path) -> Vec<String> {
    fn walk(root: &Path, rel: &Path, out: &mut Vec<String>) {
        let mut names: Vec<_> = fs::read_dir(root.join(rel))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        for n in names {
            let rel = rel.join(&n);
            let p = root.join(&rel);
            let m = fs::symlink_metadata(&p).unwrap();
            let ft = m.file_type();
            let what = if ft.is_dir() {
                "dir".to_string()
            } else if ft.is_symlink() {
                format!("link->{}", fs::read_link(&p).unwrap().display())
            } else if ft.is_file() {
                format!("file:{}", String::from_utf8_lossy(&fs::read(&p).unwrap()))
            } else if ft.is_char_device() {
                format!("char:{}", m.rdev())
            } else if ft.is_fifo() {
                "fifo".to_string()
            } else {
                "other".to_string()
            };
            let mode = if ft.is_symlink() {
                0
            } else {
                m.mode() & 0o7777
            };
            out.push(format!(
                "{} {what} {mode:o} {}:{}",
                rel.display(),
                m.uid(),
                m.gid()
            ));
            if ft.is_dir() {
                walk(root, &rel, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(root, Path::new(""), &mut out);
    out
}

fn owned(mut h: Header, uid: u64, gid: u64) -> Header {
    h.set_uid(uid);
    h.set_gid(gid);
    h
}

/// A layer with every kind of entry (hard links, devices, a fifo, an
/// owned setuid file, a symlink).
fn first_layer() -> Vec<u8> {
    let mut l1 = Tar::new();
    l1.dir("etc", 0o755)
        .file("etc/passwd", 0o644, b"root")
        .file("etc/gone", 0o644, b"gone")
        .dir("opq", 0o750)
        .file("opq/a", 0o644, b"a")
        .file("opq/b", 0o644, b"b")
        .dir("deldir", 0o755)
        .file("deldir/x", 0o644, b"x")
        .dir("bin", 0o755);
    l1.push(
        owned(
            Tar::header("bin/tool", EntryType::Regular, 0o4755, 4),
            1000,
            100,
        ),
        b"tool",
    );
    l1.link(EntryType::Link, "bin/tool2", "bin/tool")
        .link(EntryType::Symlink, "lnk", "etc/passwd")
        .dir("dev", 0o755);
    let mut h = Tar::header("dev/null", EntryType::Char, 0o666, 0);
    h.set_device_major(1).unwrap();
    h.set_device_minor(3).unwrap();
    l1.push(h, b"");
    l1.push(Tar::header("dev/fifo", EntryType::Fifo, 0o600, 0), b"");
    l1.finish()
}

#[test]
fn squash_merges_layers_with_overlay_semantics() {
    let (_d, store) = new_store();
    let img = name("alice", "layered");
    let l1 = first_layer();

    let l2 = Tar::new()
        .file("etc/.wh.gone", 0o644, b"")
        .dir("opq", 0o700)
        .file("opq/.wh..wh..opq", 0o644, b"")
        .file("opq/c", 0o600, b"c")
        .file("etc/new", 0o600, b"new")
        .finish();
    let mut l3 = Tar::new();
    l3.push(
        owned(
            Tar::header("etc/passwd", EntryType::Regular, 0o640, 5),
            0,
            42,
        ),
        b"root2",
    )
    .file(".wh.deldir", 0o644, b"")
    .pax(&[("SCHILY.xattr.trusted.walt-test", b"v")])
    .file("xattr-file", 0o644, b"x");
    let l3 = l3.finish();
    let rec = make_layered_image(&store, &img, &[l1, l2, l3]);

    let out = store.squash_image(&img).unwrap();
    assert!(out.squashed);
    assert_eq!(out.layers_before, 3);
    let after = store.get_image(&img).unwrap().unwrap();
    assert_eq!(after.layers.len(), 1);
    assert_eq!(Some(&after.layers[0].diff_id), out.diff_id.as_ref());
    assert_eq!(after.manifest_digest, out.manifest_digest);
    assert_eq!(after.node_models, rec.node_models);
    let layer = store.layer_path(&after.layers[0].diff_id);
    let null = format!("dev/null char:{} 666 0:0", nix::sys::stat::makedev(1, 3));
    let expected = vec![
        "bin dir 755 0:0",
        "bin/tool file:tool 4755 1000:100",
        "bin/tool2 file:tool 4755 1000:100",
        "dev dir 755 0:0",
        "dev/fifo fifo 600 0:0",
        null.as_str(),
        "etc dir 755 0:0",
        "etc/new file:new 600 0:0",
        "etc/passwd file:root2 640 0:42",
        "lnk link->etc/passwd 0 0:0",
        "opq dir 700 0:0",
        "opq/c file:c 600 0:0",
        "xattr-file file:x 644 0:0",
    ];
    assert_eq!(listing(&layer), expected);
    // Hard links stay hard links; xattrs are kept, overlay ones are not.
    let ino = |p: &str| fs::metadata(layer.join(p)).unwrap().ino();
    assert_eq!(ino("bin/tool"), ino("bin/tool2"));
    assert_eq!(
        xattr::get(layer.join("xattr-file"), "trusted.walt-test").unwrap(),
        Some(b"v".to_vec())
    );
    assert_eq!(
        xattr::get(layer.join("opq"), "trusted.overlay.opaque").unwrap(),
        None
    );
    // Mtimes are kept.
    assert_eq!(
        fs::metadata(layer.join("etc/passwd")).unwrap().mtime(),
        1_600_000_000
    );

    // The blob unpacks to the same tree, with the recorded diff_id.
    let blob = store.read_blob(&after.layers[0].blob_digest).unwrap();
    let (_d2, other) = new_store();
    let l = import(&other, &blob, Compression::Gzip).unwrap();
    assert_eq!(l.diff_id, after.layers[0].diff_id);
    let other_layer = other.layer_path(&l.diff_id);
    assert_eq!(listing(&other_layer), expected);
    assert_eq!(
        fs::metadata(other_layer.join("bin/tool")).unwrap().ino(),
        fs::metadata(other_layer.join("bin/tool2")).unwrap().ino()
    );
    assert_eq!(
        xattr::get(other_layer.join("xattr-file"), "trusted.walt-test").unwrap(),
        Some(b"v".to_vec())
    );

    // The config keeps everything but the layers.
    let config: serde_json::Value =
        serde_json::from_slice(&store.read_blob(&after.config_digest).unwrap()).unwrap();
    assert_eq!(config["rootfs"]["diff_ids"], serde_json::json!([l.diff_id]));
    assert_eq!(config["config"]["Labels"]["walt.node.models"], "pc-x86-64");
    assert_eq!(config["config"]["Env"], serde_json::json!(["A=1"]));
    let history = config["history"].as_array().unwrap();
    assert_eq!(history.len(), 4);
    assert_eq!(history[3]["created_by"], "walt image squash");
    assert_eq!(
        history.iter().filter(|h| h["empty_layer"] != true).count(),
        1
    );
    let manifest: serde_json::Value =
        serde_json::from_slice(&store.read_blob(&after.manifest_digest).unwrap()).unwrap();
    assert_eq!(
        manifest["layers"][0]["digest"],
        after.layers[0].blob_digest.as_str()
    );
    assert_eq!(manifest["config"]["digest"], after.config_digest.as_str());

    // The old layers are collected; nothing is left in tmp/.
    for l in &rec.layers {
        assert!(!store.has_layer(&l.diff_id));
        assert!(!store.has_blob(&l.blob_digest));
    }
    assert_eq!(entries(&store.data_dir().join("tmp")), Vec::<String>::new());

    // Squashing again: one layer, nothing to do.
    let again = store.squash_image(&img).unwrap();
    assert!(!again.squashed);
    assert_eq!(again.layers_before, 1);
    assert_eq!(again.manifest_digest, after.manifest_digest);
}

#[test]
fn squash_of_a_missing_image() {
    let (_d, store) = new_store();
    assert!(matches!(
        store.squash_image(&name("alice", "nope")),
        Err(StoreError::ImageNotFound(_))
    ));
}

// ---- commit_layer: a real overlay session saved as a new layer ----

/// A new session of `what`, mounted on `rec`.
fn mounted_session(store: &Store, rec: &ImageRecord, what: &str) -> SessionDir {
    let s = store.session_dir(what).unwrap();
    mount_session(store, rec, &s);
    s
}

/// Mounts `s` as an overlay on `rec`'s layers, with the options walt uses.
fn mount_session(store: &Store, rec: &ImageRecord, s: &SessionDir) {
    let mut dirs = store.layer_dirs(rec).unwrap();
    dirs.reverse(); // overlay lists the top layer first
    let lower: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
    let opts = format!(
        "lowerdir={},upperdir={},workdir={},redirect_dir=off,metacopy=off,index=off,xino=off",
        lower.join(":"),
        s.upper().display(),
        s.work().display()
    );
    nix::mount::mount(
        Some("overlay"),
        &s.merged(),
        Some("overlay"),
        nix::mount::MsFlags::empty(),
        Some(opts.as_str()),
    )
    .unwrap();
}

fn umount_session(s: &SessionDir) {
    nix::mount::umount2(&s.merged(), nix::mount::MntFlags::empty()).unwrap();
}

/// `path type mode` of every entry of an uncompressed tar, in order.
fn tar_entries(bytes: &[u8]) -> Vec<String> {
    let mut a = tar::Archive::new(bytes);
    a.entries()
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let h = e.header();
            let mut s = format!(
                "{} {:?} {:o} {}",
                String::from_utf8_lossy(&e.path_bytes()),
                h.entry_type(),
                h.mode().unwrap(),
                h.size().unwrap()
            );
            if let Some(l) = e.link_name_bytes() {
                s.push_str(&format!(" -> {}", String::from_utf8_lossy(&l)));
            }
            s
        })
        .collect()
}

fn base_image(store: &Store, n: &ImageName) -> ImageRecord {
    let l1 = first_layer();
    let l2 = Tar::new()
        .file("etc/extra", 0o644, b"extra")
        .file("etc/.wh.passwd", 0o644, b"")
        .file("etc/passwd", 0o600, b"root1")
        .finish();
    make_layered_image(store, n, &[l1, l2]);
    store.get_image(n).unwrap().unwrap()
}

#[test]
fn commit_layer_saves_an_overlay_session() {
    let (_d, store) = new_store();
    let img = name("alice", "base");
    let base = base_image(&store, &img);
    let s = store.session_dir("walt image shell").unwrap();
    assert!(s.path().starts_with(store.data_dir().join("tmp")));
    assert!(Store::upper_is_empty(&s.upper()).unwrap());
    assert_eq!(
        fs::metadata(s.upper()).unwrap().mode() & 0o7777,
        0o755,
        "upper mode"
    );
    mount_session(&store, &base, &s);
    let m = s.merged();
    assert_eq!(fs::read(m.join("etc/passwd")).unwrap(), b"root1");
    fs::write(m.join("etc/new"), b"new").unwrap();
    fs::write(m.join("etc/passwd"), b"root2").unwrap();
    fs::remove_file(m.join("etc/gone")).unwrap();
    fs::remove_dir_all(m.join("deldir")).unwrap();
    fs::remove_dir_all(m.join("opq")).unwrap();
    fs::create_dir(m.join("opq")).unwrap();
    fs::write(m.join("opq/c"), b"c").unwrap();
    std::os::unix::fs::symlink("etc/new", m.join("lnk2")).unwrap();
    fs::write(m.join("bin/h1"), b"hard").unwrap();
    fs::hard_link(m.join("bin/h1"), m.join("bin/h2")).unwrap();
    fs::set_permissions(
        m.join("bin/tool"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    xattr::set(m.join("etc/new"), "user.walt-test", b"v").unwrap();
    nix::unistd::mkfifo(
        &m.join("dev/fifo2"),
        nix::sys::stat::Mode::from_bits_truncate(0o640),
    )
    .unwrap();
    let merged_view = listing(&m);
    umount_session(&s);
    assert!(!Store::upper_is_empty(&s.upper()).unwrap());
    // What overlay left in the upper directory (reported, for the record).
    for (p, names) in overlay_xattrs(&s.upper()) {
        eprintln!("upper xattrs: {p}: {names:?}");
    }

    let t = std::time::Instant::now();
    let out = store
        .commit_layer(&base, &s.upper(), &img, true, "walt image shell")
        .unwrap();
    eprintln!("commit_layer: {:?}", t.elapsed());
    assert!(out.replaced);
    assert!(!s.upper().exists(), "the upper dir became the layer");

    // One more layer, uncompressed, blob digest == diff_id == sha256(blob).
    let after = store.get_image(&img).unwrap().unwrap();
    assert_eq!(after.layers.len(), base.layers.len() + 1);
    assert_eq!(after.layers[..2], base.layers[..]);
    let top = after.layers.last().unwrap();
    assert_eq!(top.diff_id, out.diff_id);
    assert_eq!(top.blob_digest, out.diff_id);
    assert_eq!(top.blob_size, out.layer_size);
    assert_eq!(top.media_type, walt_core::oci::OCI_LAYER_TAR);
    assert_eq!(after.manifest_digest, out.manifest_digest);
    assert_eq!(after.node_models, base.node_models);
    let blob = store.read_blob(&top.blob_digest).unwrap();
    assert_eq!(sha256_digest(&blob), out.diff_id);
    assert_eq!(blob.len() as u64, out.layer_size);

    // The tar holds exactly the changes, in OCI form.
    let got = tar_entries(&blob);
    let expected = vec![
        ". Directory 755 0",
        "bin Directory 755 0",
        "bin/h1 Regular 644 4",
        "bin/h2 Link 644 0 -> bin/h1",
        "bin/tool Regular 755 4",
        ".wh.deldir Regular 600 0",
        "dev Directory 755 0",
        "dev/fifo2 Fifo 640 0",
        "etc Directory 755 0",
        "etc/.wh.gone Regular 600 0",
        "etc/new Regular 644 3",
        "etc/passwd Regular 600 5",
        "lnk2 Symlink 777 0 -> etc/new",
        "opq Directory 755 0",
        "opq/.wh..wh..opq Regular 600 0",
        "opq/c Regular 644 1",
    ];
    assert_eq!(got, expected);
    // No overlay xattr in the tar; others kept.
    let mut a = tar::Archive::new(&blob[..]);
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        let path = e.path().unwrap().display().to_string();
        if let Some(exts) = e.pax_extensions().unwrap() {
            for x in exts {
                let x = x.unwrap();
                let k = x.key().unwrap();
                assert!(!k.contains("trusted.overlay"), "{path}: {k}");
                if k.starts_with("SCHILY.xattr.") {
                    assert_eq!(
                        (path.as_str(), k),
                        ("etc/new", "SCHILY.xattr.user.walt-test")
                    );
                }
            }
        }
    }

    // The upper dir is the unpacked layer: overlay form, only opaque kept.
    let layer = store.layer_path(&out.diff_id);
    assert_eq!(
        overlay_xattrs(&layer),
        vec![(
            "opq".to_string(),
            vec!["trusted.overlay.opaque".to_string()]
        )]
    );
    let ino = |p: &str| fs::metadata(layer.join(p)).unwrap().ino();
    assert_eq!(ino("bin/h1"), ino("bin/h2"));
    // Unpacking the blob elsewhere gives the same layer directory.
    let (_d2, other) = new_store();
    let l = import(&other, &blob, Compression::None).unwrap();
    assert_eq!(l.diff_id, out.diff_id);
    assert_eq!(listing(&other.layer_path(&l.diff_id)), listing(&layer));

    // Config: one more diff_id and history entry, the rest untouched.
    let config: serde_json::Value =
        serde_json::from_slice(&store.read_blob(&after.config_digest).unwrap()).unwrap();
    let diff_ids: Vec<&str> = config["rootfs"]["diff_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let want: Vec<&str> = after.layers.iter().map(|l| l.diff_id.as_str()).collect();
    assert_eq!(diff_ids, want);
    let history = config["history"].as_array().unwrap();
    assert_eq!(history.len(), 3);
    assert_eq!(history[2]["created_by"], "walt image shell");
    assert!(config["created"].is_string());
    assert_eq!(config["config"]["Labels"]["walt.node.models"], "pc-x86-64");
    assert_eq!(config["config"]["Env"], serde_json::json!(["A=1"]));
    assert_eq!(
        config["config"]["Entrypoint"],
        serde_json::json!(["/bin/sh"])
    );
    let manifest: serde_json::Value =
        serde_json::from_slice(&store.read_blob(&after.manifest_digest).unwrap()).unwrap();
    assert_eq!(manifest["mediaType"], walt_core::oci::OCI_MANIFEST);
    assert_eq!(manifest["annotations"]["org.walt.built"], "true");
    assert_eq!(manifest["config"]["digest"], after.config_digest.as_str());
    let ml = manifest["layers"].as_array().unwrap();
    assert_eq!(ml.len(), 3);
    for (m, l) in ml.iter().zip(&after.layers) {
        assert_eq!(m["digest"], l.blob_digest.as_str());
        assert_eq!(m["mediaType"], l.media_type.as_str());
        assert_eq!(m["size"], l.blob_size);
    }

    // Squashing a copy gives what the session saw.
    let copy = name("alice", "copy");
    store.duplicate_image(&img, &copy).unwrap();
    let sq = store.squash_image(&copy).unwrap();
    let squashed = store.layer_path(&sq.diff_id.unwrap());
    assert_eq!(listing(&squashed), merged_view);
    assert!(merged_view.contains(&"bin/tool file:tool 755 1000:100".to_string()));
    assert!(merged_view.contains(&"bin/tool2 file:tool 4755 1000:100".to_string()));
    assert!(merged_view.contains(&"dev/fifo2 fifo 640 0:0".to_string()));

    drop(s);
    assert_eq!(entries(&store.data_dir().join("tmp")), Vec::<String>::new());
}

/// `trusted.overlay.*` xattrs below `root` (relative path, names).
fn overlay_xattrs(root: &Path) -> Vec<(String, Vec<String>)> {
    fn walk(root: &Path, rel: &Path, out: &mut Vec<(String, Vec<String>)>) {
        let p = root.join(rel);
        let mut names: Vec<String> = xattr::list(&p)
            .unwrap()
            .map(|n| n.to_string_lossy().into_owned())
            .filter(|n| n.starts_with("trusted.overlay."))
            .collect();
        names.sort();
        if !names.is_empty() {
            let shown = if rel.as_os_str().is_empty() {
                ".".to_string()
            } else {
                rel.display().to_string()
            };
            out.push((shown, names));
        }
        if fs::symlink_metadata(&p).unwrap().is_dir() {
            let mut kids: Vec<_> = fs::read_dir(&p)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            kids.sort();
            for k in kids {
                walk(root, &rel.join(k), out);
            }
        }
    }
    let mut out = Vec::new();
    walk(root, Path::new(""), &mut out);
    out
}

#[test]
fn commit_layer_to_a_new_name_and_refusals() {
    let (_d, store) = new_store();
    let img = name("alice", "base");
    let base = base_image(&store, &img);

    // A one-file change saved under a new name keeps the base.
    let s = mounted_session(&store, &base, "cp");
    fs::write(s.merged().join("etc/hello"), b"hello").unwrap();
    umount_session(&s);
    let new = name("alice", "derived");
    let t = std::time::Instant::now();
    let out = store
        .commit_layer(&base, &s.upper(), &new, false, "walt image cp /etc/hello")
        .unwrap();
    eprintln!("commit_layer of a 1-file change: {:?}", t.elapsed());
    assert!(!out.replaced);
    assert_eq!(store.get_image(&img).unwrap().unwrap(), base);
    let derived = store.get_image(&new).unwrap().unwrap();
    assert_eq!(derived.layers.len(), 3);
    assert_eq!(
        tar_entries(&store.read_blob(&out.diff_id).unwrap()),
        vec![
            ". Directory 755 0",
            "etc Directory 755 0",
            "etc/hello Regular 644 5"
        ]
    );
    drop(s);

    // The target exists and no replace: refused, nothing changes.
    let s = store.session_dir("cp").unwrap();
    fs::write(s.upper().join("x"), b"x").unwrap();
    let blobs_before = entries(&store.data_dir().join("blobs/sha256"));
    let layers_before = entries(&store.data_dir().join("layers"));
    let images_before = store.list_images(None).unwrap();
    let e = store
        .commit_layer(&base, &s.upper(), &new, false, "walt image cp")
        .unwrap_err();
    assert!(
        matches!(e, StoreError::ImageExists(ref n) if *n == new.to_string()),
        "{e}"
    );
    assert_eq!(store.list_images(None).unwrap(), images_before);
    assert_eq!(
        entries(&store.data_dir().join("blobs/sha256")),
        blobs_before
    );
    assert_eq!(entries(&store.data_dir().join("layers")), layers_before);
    assert!(s.upper().join("x").is_file(), "the session is kept");

    // A redirect (not possible with walt's options) is refused.
    fs::create_dir(s.upper().join("d")).unwrap();
    xattr::set(s.upper().join("d"), "trusted.overlay.redirect", b"/x").unwrap();
    let e = store
        .commit_layer(&base, &s.upper(), &new, true, "walt image cp")
        .unwrap_err();
    assert!(matches!(e, StoreError::CommitFailed { .. }), "{e}");
    assert!(e.to_string().starts_with("image 'alice/derived': cannot save the session: '/d' carries the overlay xattr trusted.overlay.redirect"), "{e}");
    assert_eq!(store.list_images(None).unwrap(), images_before);
    drop(s);
    assert_eq!(entries(&store.data_dir().join("tmp")), Vec::<String>::new());
}

#[test]
fn a_save_that_fails_after_its_layer_is_published_leaves_no_layer() {
    let (_d, store) = new_store();
    let img = name("alice", "base");
    let base = base_image(&store, &img);
    let layers_before = entries(&store.data_dir().join("layers"));
    // The base's config is gone: the layer is saved, then the image
    // cannot be recorded.
    let config = store.blob_path(&base.config_digest);
    let kept = fs::read(&config).unwrap();
    fs::remove_file(&config).unwrap();
    let s = store.session_dir("cp").unwrap();
    fs::write(s.upper().join("new-file"), b"new").unwrap();
    store
        .commit_layer(&base, &s.upper(), &img, true, "walt image cp")
        .unwrap_err();
    assert_eq!(entries(&store.data_dir().join("layers")), layers_before);
    assert_eq!(store.get_image(&img).unwrap().unwrap(), base);
    fs::write(&config, kept).unwrap();
}

#[test]
fn session_dir_left_mounted_is_detached() {
    let (_d, store) = new_store();
    let img = name("alice", "base");
    let base = base_image(&store, &img);
    let s = mounted_session(&store, &base, "shell");
    let e = store
        .commit_layer(&base, &s.upper(), &img, true, "walt image shell")
        .unwrap_err();
    assert!(
        e.to_string().ends_with("the session is still mounted"),
        "{e}"
    );
    let path = s.path().to_path_buf();
    drop(s);
    assert!(!path.exists());
    // Layers untouched.
    assert_eq!(
        fs::read(store.layer_dirs(&base).unwrap()[1].join("etc/passwd")).unwrap(),
        b"root1"
    );
    // A mount left by a crash is detached when the store opens.
    let s = mounted_session(&store, &base, "shell");
    let data = store.data_dir().to_path_buf();
    std::mem::forget(s);
    drop(store);
    let store = Store::open(&data).unwrap();
    assert_eq!(entries(&data.join("tmp")), Vec::<String>::new());
    assert_eq!(
        fs::read(store.layer_dirs(&base).unwrap()[1].join("etc/passwd")).unwrap(),
        b"root1"
    );
}

#[test]
fn large_files_and_blobs_are_written_exactly() {
    // Files of 1 MiB and more (and every blob) are written around the page
    // cache in aligned blocks; the sizes here end mid-block.
    let (_d, store) = new_store();
    let big: Vec<u8> = (0..9 * 1024 * 1024 + 1234u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let mut t = Tar::new();
    t.file("big.bin", 0o640, &big);
    t.file("exact.bin", 0o600, &big[..4 * 1024 * 1024]);
    t.file("medium.bin", 0o600, &big[..1024 * 1024 + 1]);
    t.file("small", 0o644, b"small");
    let tar_bytes = t.finish();
    for (c, blob) in [
        (Compression::None, tar_bytes.clone()),
        (Compression::Gzip, gzip(&tar_bytes)),
    ] {
        let r = import(&store, &blob, c).unwrap();
        assert_eq!(store.read_blob(&r.digest).unwrap(), blob);
        let root = store.layer_path(&r.diff_id);
        assert_eq!(fs::read(root.join("big.bin")).unwrap(), big);
        assert_eq!(
            fs::read(root.join("exact.bin")).unwrap(),
            &big[..4 * 1024 * 1024]
        );
        assert_eq!(
            fs::read(root.join("medium.bin")).unwrap(),
            &big[..1024 * 1024 + 1]
        );
        assert_eq!(fs::read(root.join("small")).unwrap(), b"small");
        let m = fs::metadata(root.join("big.bin")).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o7777,
            0o640
        );
    }
}

#[test]
fn corrupt_stored_digest_is_reported_with_the_image() {
    let (_d, store) = new_store();
    let foo = name("alice", "foo");
    let rec = make_image(&store, &foo, b"content");
    store.put_image(&rec, false).unwrap();
    store
        .inner
        .conn()
        .execute("UPDATE image_layers SET diff_id = 'sha256:../../etc'", [])
        .unwrap();
    let e = store.get_image(&foo).unwrap_err();
    assert!(
        matches!(&e, StoreError::Corrupt { image, reason }
            if image == "alice/foo" && reason.contains("sha256:../../etc")),
        "{e}"
    );
    assert!(store.list_images(None).is_err());
}

#[test]
fn open_closes_a_store_found_open_to_other_accounts() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    for d in ["", "blobs", "blobs/sha256", "layers", "tmp"] {
        fs::create_dir_all(data.join(d)).unwrap();
        fs::set_permissions(data.join(d), fs::Permissions::from_mode(0o755)).unwrap();
    }
    drop(Store::open(&data).unwrap());
    for d in ["", "blobs", "blobs/sha256", "layers", "tmp"] {
        let mode = fs::metadata(data.join(d)).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, STORE_DIR_MODE, "{d}: {mode:o}");
    }
    // A new store is created closed too.
    let fresh = dir.path().join("fresh");
    drop(Store::open(&fresh).unwrap());
    let mode = fs::metadata(&fresh).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o700);
}
