//! The client side of the build context: the tar stream of a directory,
//! with `.dockerignore`, symlinks, FIFOs and devices.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;

use walt_build::context::{context_matcher, write_context};
use walt_tar::{Kind, Reader};

#[derive(Debug, PartialEq, Eq)]
struct E {
    kind: Kind,
    mode: u32,
    uid: u64,
    data: Vec<u8>,
    link: Vec<u8>,
}

/// The entries of a stream, by name.
fn entries(tar: &[u8]) -> (Vec<String>, BTreeMap<String, E>) {
    let mut r = Reader::new(tar);
    let mut order = Vec::new();
    let mut map = BTreeMap::new();
    while r.next_entry().unwrap() {
        let e = r.entry();
        let name = String::from_utf8(e.path.clone()).unwrap();
        let (kind, mode, uid, link) = (e.kind(), e.mode, e.uid, e.link.clone());
        let mut data = Vec::new();
        r.read_to_end(&mut data).unwrap();
        let name = name.trim_end_matches('/').to_string();
        order.push(name.clone());
        map.insert(
            name,
            E {
                kind,
                mode,
                uid,
                data,
                link,
            },
        );
    }
    (order, map)
}

fn send(
    dir: &Path,
) -> (
    Vec<String>,
    BTreeMap<String, E>,
    walt_build::context::ContextStats,
) {
    let m = context_matcher(dir).unwrap();
    let (out, stats) = write_context(Vec::new(), dir, &m).unwrap();
    let (o, e) = entries(&out);
    (o, e, stats)
}

fn write(dir: &Path, rel: &str, data: &str) {
    let p = dir.join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, data).unwrap();
}

#[test]
fn tree_with_symlinks_modes_and_owners() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    write(d, "Dockerfile", "FROM scratch\n");
    write(d, "a/b/c.txt", "hello");
    fs::set_permissions(d.join("a/b/c.txt"), fs::Permissions::from_mode(0o751)).unwrap();
    symlink("/etc/passwd", d.join("passwd")).unwrap();
    symlink("a", d.join("dirlink")).unwrap();
    std::os::unix::fs::chown(d.join("a/b/c.txt"), Some(1234), Some(1234)).unwrap();
    let (order, e, stats) = send(d);
    assert_eq!(
        order,
        ["Dockerfile", "a", "a/b", "a/b/c.txt", "dirlink", "passwd"]
    );
    let c = &e["a/b/c.txt"];
    assert_eq!((c.kind, c.mode, c.uid), (Kind::File, 0o751, 0));
    assert_eq!(c.data, b"hello");
    assert_eq!(e["a"].kind, Kind::Directory);
    // Symlinks are sent as symlinks, never followed.
    assert_eq!(e["passwd"].kind, Kind::Symlink);
    assert_eq!(e["passwd"].link, b"/etc/passwd");
    assert!(e["passwd"].data.is_empty());
    assert_eq!(e["dirlink"].kind, Kind::Symlink);
    assert_eq!(stats.entries, 6);
    assert_eq!(stats.bytes, 5 + 13);
    assert!(stats.skipped.is_empty());
}

#[test]
fn dockerignore_with_exceptions() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    write(
        d,
        ".dockerignore",
        "# build output\n*.md\n!README.md\nnode_modules\ndocs\n!docs/keep/**\n**/*.o\nDockerfile\n.dockerignore\n",
    );
    write(d, "Dockerfile", "FROM scratch\n");
    write(d, "README.md", "r");
    write(d, "CHANGES.md", "c");
    write(d, "node_modules/x/y.js", "y");
    write(d, "docs/other/z.txt", "z");
    write(d, "docs/keep/sub/k.txt", "k");
    write(d, "src/main.c", "m");
    write(d, "src/main.o", "o");
    let (order, _, _) = send(d);
    // docs is excluded but walked into for its exception; it is sent only
    // as the parent of what the exception brings back.
    assert_eq!(
        order,
        [
            ".dockerignore",
            "Dockerfile",
            "README.md",
            "docs",
            "docs/keep",
            "docs/keep/sub",
            "docs/keep/sub/k.txt",
            "src",
            "src/main.c",
        ]
    );
}

#[test]
fn excluded_dir_without_exceptions_is_not_read() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    write(d, ".dockerignore", "secret\n");
    write(d, "ok", "1");
    fs::create_dir(d.join("secret")).unwrap();
    // Had the walk gone into secret, this FIFO would be listed as skipped.
    fs::create_dir(d.join("secret/locked")).unwrap();
    nix_mkfifo(&d.join("secret/locked/fifo"));
    let (order, _, stats) = send(d);
    assert_eq!(order, [".dockerignore", "ok"]);
    assert!(stats.skipped.is_empty());
}

fn nix_mkfifo(p: &Path) {
    let st = std::process::Command::new("mkfifo")
        .arg(p)
        .status()
        .unwrap();
    assert!(st.success());
}

#[test]
fn fifos_and_devices_are_skipped_not_opened() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    write(d, "f", "data");
    // Opening this FIFO for reading would block forever (no writer).
    nix_mkfifo(&d.join("pipe"));
    let st = std::process::Command::new("mknod")
        .arg(d.join("null"))
        .args(["c", "1", "3"])
        .status()
        .unwrap();
    assert!(st.success(), "mknod needs root");
    let (order, _, stats) = send(d);
    assert_eq!(order, ["f"]);
    assert_eq!(
        stats.skipped,
        [
            ("null".to_string(), "a character device"),
            ("pipe".to_string(), "a FIFO")
        ]
    );
}

#[test]
fn unreadable_files_are_read_as_root_and_errors_name_the_file() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    write(d, "locked", "secret");
    fs::set_permissions(d.join("locked"), fs::Permissions::from_mode(0o000)).unwrap();
    let (_, e, _) = send(d);
    // We run as root: mode 000 does not stop us, and the mode is kept.
    assert_eq!(e["locked"].data, b"secret");
    assert_eq!(e["locked"].mode, 0);

    // A context directory that vanished: one error naming the context.
    let gone = d.join("gone");
    let m = walt_build::ignore::Matcher::default();
    let err = write_context(Vec::new(), &gone, &m).unwrap_err();
    assert!(err.to_string().contains("cannot read '.'"), "{err}");
}

#[test]
fn bad_dockerignore_is_an_error_naming_the_line() {
    let t = tempfile::tempdir().unwrap();
    write(t.path(), ".dockerignore", "ok\n[oops\n");
    let err = context_matcher(t.path()).unwrap_err();
    assert!(
        err.to_string()
            .starts_with(".dockerignore line 2: syntax error"),
        "{err}"
    );
}
