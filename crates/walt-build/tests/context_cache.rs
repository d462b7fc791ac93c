//! Layer cache keys: what changes them and what does not.

use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;
use std::time::{Duration, SystemTime};

use walt_build::cache::{CacheKey, InputMeta, digest_inputs, hash_reader, step_key};
use walt_build::context::resolve_sources;

fn write(dir: &Path, rel: &str, data: &[u8]) {
    let p = dir.join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, data).unwrap();
}

fn key(ctx: &Path, srcs: &[&str], meta: InputMeta) -> CacheKey {
    let srcs: Vec<String> = srcs.iter().map(|s| s.to_string()).collect();
    let s = resolve_sources(ctx, &srcs).unwrap();
    digest_inputs(ctx, &s, meta).unwrap()
}

fn sample(c: &Path) {
    write(c, "app/main.c", b"int main(){}");
    write(c, "app/lib/x.h", b"#define X 1");
    write(c, "data.bin", &vec![7u8; 1 << 20]);
    symlink("main.c", c.join("app/link")).unwrap();
}

#[test]
fn content_and_mode_change_the_key_mtime_does_not() {
    let t = tempfile::tempdir().unwrap();
    let c = t.path();
    sample(c);
    let m = InputMeta::default();
    let k0 = key(c, &["."], m);
    assert_eq!(k0, key(c, &["."], m), "stable");

    // mtime (and atime) only: same key.
    let f = fs::File::options()
        .write(true)
        .open(c.join("app/main.c"))
        .unwrap();
    f.set_modified(SystemTime::now() + Duration::from_secs(3600))
        .unwrap();
    drop(f);
    assert_eq!(k0, key(c, &["."], m), "mtime must not change the key");

    // One byte of content.
    write(c, "app/main.c", b"int main(){ }");
    let k1 = key(c, &["."], m);
    assert_ne!(k0, k1);
    write(c, "app/main.c", b"int main(){}");
    assert_eq!(k0, key(c, &["."], m), "back to the same content");

    // Mode.
    fs::set_permissions(c.join("app/main.c"), fs::Permissions::from_mode(0o755)).unwrap();
    let k2 = key(c, &["."], m);
    assert_ne!(k0, k2);
    fs::set_permissions(c.join("app/main.c"), fs::Permissions::from_mode(0o644)).unwrap();
    assert_eq!(k0, key(c, &["."], m));

    // Owner, and link target.
    std::os::unix::fs::chown(c.join("app/lib/x.h"), Some(1000), None).unwrap();
    let k3 = key(c, &["."], m);
    assert_ne!(k0, k3);
    std::os::unix::fs::chown(c.join("app/lib/x.h"), Some(0), None).unwrap();
    assert_eq!(k0, key(c, &["."], m));
    fs::remove_file(c.join("app/link")).unwrap();
    symlink("lib", c.join("app/link")).unwrap();
    assert_ne!(k0, key(c, &["."], m));

    // A renamed file.
    let t2 = tempfile::tempdir().unwrap();
    sample(t2.path());
    fs::rename(t2.path().join("app/lib/x.h"), t2.path().join("app/lib/y.h")).unwrap();
    let before = key(c, &["app/lib"], m);
    assert_ne!(before, key(t2.path(), &["app/lib"], m));
}

#[test]
fn chown_and_chmod_replace_the_metadata() {
    let t = tempfile::tempdir().unwrap();
    let c = t.path();
    sample(c);
    let plain = key(c, &["app"], InputMeta::default());
    let chown = InputMeta {
        chown: Some((1000, 1000)),
        chmod: None,
    };
    let kc = key(c, &["app"], chown);
    assert_ne!(plain, kc);
    // With --chown the files' own owner no longer matters.
    std::os::unix::fs::chown(c.join("app/main.c"), Some(55), Some(55)).unwrap();
    assert_eq!(kc, key(c, &["app"], chown));
    assert_ne!(plain, key(c, &["app"], InputMeta::default()));
    // With --chmod their mode no longer matters.
    let chmod = InputMeta {
        chown: None,
        chmod: Some(0o600),
    };
    let km = key(c, &["app"], chmod);
    fs::set_permissions(c.join("app/main.c"), fs::Permissions::from_mode(0o700)).unwrap();
    assert_eq!(km, key(c, &["app"], chmod));
}

#[test]
fn independent_of_creation_and_listing_order() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let names: Vec<String> = (0..200).map(|i| format!("d{}/f{i}", i % 7)).collect();
    for n in &names {
        write(a.path(), n, n.as_bytes());
    }
    for n in names.iter().rev() {
        write(b.path(), n, n.as_bytes());
    }
    let m = InputMeta::default();
    assert_eq!(key(a.path(), &["."], m), key(b.path(), &["."], m));
    // Glob sources are matched in sorted order too.
    assert_eq!(key(a.path(), &["d*"], m), key(b.path(), &["d*"], m));
}

#[test]
fn step_keys() {
    let inputs = CacheKey([1; 32]);
    let k = step_key("sha256:aa", "COPY . /ctx", Some(&inputs));
    assert_eq!(k, step_key("sha256:aa", "COPY . /ctx", Some(&inputs)));
    assert_ne!(k, step_key("sha256:ab", "COPY . /ctx", Some(&inputs)));
    assert_ne!(k, step_key("sha256:aa", "COPY . /ctx2", Some(&inputs)));
    assert_ne!(
        k,
        step_key("sha256:aa", "COPY . /ctx", Some(&CacheKey([2; 32])))
    );
    assert_ne!(k, step_key("sha256:aa", "COPY . /ctx", None));
    // Fields are framed: moving text from one to the other changes the key.
    assert_ne!(step_key("ab", "c", None), step_key("a", "bc", None));
    assert_eq!(k.digest().len(), "sha256:".len() + 64);
}

#[test]
fn streaming_hash_matches_sha256() {
    // sha256("abc")
    let mut buf = [0u8; 2];
    let (d, n) = hash_reader(&mut &b"abc"[..], &mut buf).unwrap();
    assert_eq!(n, 3);
    assert_eq!(
        CacheKey(d).to_string(),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
}

#[test]
fn fifos_in_inputs_are_hashed_not_opened() {
    let t = tempfile::tempdir().unwrap();
    let c = t.path();
    write(c, "d/f", b"x");
    let st = std::process::Command::new("mkfifo")
        .arg(c.join("d/pipe"))
        .status()
        .unwrap();
    assert!(st.success());
    // Opening the FIFO would block: finishing proves it is not read.
    let with = key(c, &["d"], InputMeta::default());
    fs::remove_file(c.join("d/pipe")).unwrap();
    assert_ne!(with, key(c, &["d"], InputMeta::default()));
}
