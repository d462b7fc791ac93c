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
    fs::hard_link(d.join("a/b/c.txt"), d.join("hard")).unwrap();
    let (order, e, stats) = send(d);
    assert_eq!(
        order,
        [
            "Dockerfile",
            "a",
            "a/b",
            "a/b/c.txt",
            "dirlink",
            "hard",
            "passwd"
        ]
    );
    // A second name of a file is a hard link to the first one sent.
    assert_eq!(e["hard"].kind, Kind::HardLink);
    assert_eq!(e["hard"].link, b"a/b/c.txt");
    let c = &e["a/b/c.txt"];
    assert_eq!((c.kind, c.mode, c.uid), (Kind::File, 0o751, 0));
    assert_eq!(c.data, b"hello");
    assert_eq!(e["a"].kind, Kind::Directory);
    // Symlinks are sent as symlinks, never followed.
    assert_eq!(e["passwd"].kind, Kind::Symlink);
    assert_eq!(e["passwd"].link, b"/etc/passwd");
    assert!(e["passwd"].data.is_empty());
    assert_eq!(e["dirlink"].kind, Kind::Symlink);
    assert_eq!(stats.entries, 7, "{stats:?} {order:?}");
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

fn names(dir: &Path) -> Vec<String> {
    let (mut o, e, _) = send(dir);
    o.sort();
    o.into_iter()
        .map(|n| match e[&n].kind {
            Kind::Directory => format!("{n}/"),
            _ => n,
        })
        .collect()
}

/// The file lists below are what docker 20.10 (`docker build` with
/// `COPY . /ctx`, legacy builder and BuildKit alike, exported with
/// `docker export`) copied from these contexts, plus the Dockerfile and
/// `.dockerignore` that the client sends and the daemon then trims
/// (`trim_build_files`).
#[test]
fn same_files_as_docker_build() {
    let t = tempfile::tempdir().unwrap();
    let c = t.path();
    for f in [
        "README.md",
        "CHANGES.md",
        "docs/keep/sub/k.txt",
        "docs/other/z.txt",
        "docs/k.md",
        "node_modules/x/y.js",
        "src/main.c",
        "src/main.o",
        "src/a/b/c.o",
        "src/a/b/c.c",
        "build/out/x.o",
        "build/keep.txt",
        "lib/temp1",
        "lib/tempxx",
        "temp1",
        "tmpdir/x/f",
        ".hidden",
        "src/.env",
        "sp ace",
        "a[b]",
        "Dockerfile",
    ] {
        write(c, f, f);
    }
    symlink("/etc/passwd", c.join("passwd")).unwrap();
    symlink("src", c.join("srclink")).unwrap();
    write(
        c,
        ".dockerignore",
        "# comment\n  *.md  \n!README.md\nnode_modules\ndocs\n!docs/keep/**\n**/*.o\n/build/\n\
         !build/keep.txt\n*/temp?\n./tmpdir/../tmpdir/x\n.hidden\nsrc/.env\na\\[b]\nDockerfile\n\
         .dockerignore\n",
    );
    let docker = [
        ".dockerignore",
        "Dockerfile",
        "README.md",
        "build/",
        "build/keep.txt",
        "docs/",
        "docs/keep/",
        "docs/keep/sub/",
        "docs/keep/sub/k.txt",
        "lib/",
        "lib/tempxx",
        "passwd",
        "sp ace",
        "src/",
        "src/a/",
        "src/a/b/",
        "src/a/b/c.c",
        "src/main.c",
        "srclink",
        "temp1",
        "tmpdir/",
    ];
    assert_eq!(names(c), docker);

    // Exceptions reach into an excluded directory only when written
    // below it, as docker's walkers do.
    let t = tempfile::tempdir().unwrap();
    let c = t.path();
    for f in [
        "a/b/c/f.go",
        "a/b/g.go",
        "a/h.txt",
        "x/y/z/w.txt",
        "x/y/v.txt",
        "src/deep/er/m.rs",
        "src/deep/n.txt",
        "keep/me/k",
        "q/ab",
        "q/bb",
        "q/cb",
        "top.go",
        "abx",
    ] {
        write(c, f, f);
    }
    write(
        c,
        ".dockerignore",
        "*\n!src\nsrc/deep/er\n!**/*.rs\n!a/**/*.go\na/b/c\n!  x/y\nx/y/z/**\n!keep/me/\n\
         ![^a]b\n!q/[^a]b\n!abx\n",
    );
    let docker = [
        ".dockerignore",
        "abx",
        "keep/",
        "keep/me/",
        "keep/me/k",
        "q/",
        "q/bb",
        "q/cb",
        "src/",
        "src/deep/",
        "src/deep/n.txt",
        "x/",
        "x/y/",
        "x/y/v.txt",
        "x/y/z/",
    ];
    assert_eq!(names(c), docker);
}

#[test]
fn daemon_side_trim_of_build_files() {
    use std::os::fd::AsFd;
    use walt_build::context::trim_build_files;
    let t = tempfile::tempdir().unwrap();
    let c = t.path();
    write(c, "Dockerfile", "FROM scratch\n");
    write(c, "Containerfile", "FROM scratch\n");
    write(c, ".dockerignore", "Dockerfile\n.dockerignore\n");
    let fd = fs::File::open(c).unwrap();
    // The Containerfile is not the one used: left alone (not excluded).
    trim_build_files(fd.as_fd(), "Dockerfile").unwrap();
    assert!(!c.join("Dockerfile").exists());
    assert!(!c.join(".dockerignore").exists());
    assert!(c.join("Containerfile").exists());

    write(c, ".dockerignore", "*.md\n");
    write(c, "Dockerfile", "FROM scratch\n");
    trim_build_files(fd.as_fd(), "Dockerfile").unwrap();
    assert!(c.join("Dockerfile").exists());
    assert!(c.join(".dockerignore").exists());
}
