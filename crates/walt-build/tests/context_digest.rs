//! `context_digest`: equal for an unchanged context, different after any
//! change a build could see.

use std::fs;
use std::os::unix::fs::PermissionsExt;

use walt_build::context::context_digest;

fn tree() -> tempfile::TempDir {
    let t = tempfile::tempdir().unwrap();
    fs::create_dir_all(t.path().join("d/e")).unwrap();
    fs::write(t.path().join("d/e/f"), b"one").unwrap();
    fs::write(t.path().join("g"), b"two").unwrap();
    std::os::unix::fs::symlink("g", t.path().join("l")).unwrap();
    t
}

#[test]
fn unchanged_context_gives_the_same_digest() {
    let t = tree();
    let a = context_digest(t.path()).unwrap();
    assert!(a.starts_with("sha256:") && a.len() == 71, "{a}");
    assert_eq!(a, context_digest(t.path()).unwrap());
}

#[test]
fn every_kind_of_change_changes_the_digest() {
    let t = tree();
    let mut seen = vec![context_digest(t.path()).unwrap()];
    let mut check = |what: &str| {
        let d = context_digest(t.path()).unwrap();
        assert!(!seen.contains(&d), "{what}: digest unchanged");
        seen.push(d);
    };
    // Same size, content rewritten in place, mtime put back: the change
    // time still moves.
    let f = t.path().join("d/e/f");
    let mtime = fs::metadata(&f).unwrap().modified().unwrap();
    fs::write(&f, b"ONE").unwrap();
    fs::File::options()
        .write(true)
        .open(&f)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    check("content rewritten, mtime restored");
    fs::set_permissions(t.path().join("g"), fs::Permissions::from_mode(0o600)).unwrap();
    check("mode");
    fs::write(t.path().join("d/new"), b"").unwrap();
    check("new file");
    fs::remove_file(t.path().join("l")).unwrap();
    std::os::unix::fs::symlink("d", t.path().join("l")).unwrap();
    check("symlink retargeted");
    fs::rename(t.path().join("d/new"), t.path().join("d/renamed")).unwrap();
    check("rename");
}
