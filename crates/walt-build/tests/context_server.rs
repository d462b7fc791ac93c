//! The server side of the build context: `--sub-dir`, the Dockerfile,
//! COPY/ADD sources, git clone.

use std::fs;
use std::os::fd::AsFd;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use walt_build::context::{
    ContextError, SourceKind, clean_source, git_clone, open_sub_dir, read_dockerfile, redact_url,
    resolve_sources,
};

fn write(dir: &Path, rel: &str, data: &str) {
    let p = dir.join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, data).unwrap();
}

#[test]
fn sub_dir_confined_to_the_repository() {
    let t = tempfile::tempdir().unwrap();
    let repo = t.path().join("repo");
    write(&repo, "app/Dockerfile", "FROM scratch\n");
    write(t.path(), "outside/Dockerfile", "FROM scratch\n");
    symlink("../outside", repo.join("out")).unwrap();
    symlink("/etc", repo.join("abs")).unwrap();
    symlink("app", repo.join("inlink")).unwrap();
    write(&repo, "file", "x");

    let ok = open_sub_dir(&repo, "app").unwrap();
    assert_eq!(ok.path, repo.canonicalize().unwrap().join("app"));
    let ok = open_sub_dir(&repo, "inlink/").unwrap();
    assert_eq!(ok.path, repo.canonicalize().unwrap().join("app"));
    let ok = open_sub_dir(&repo, "").unwrap();
    assert_eq!(ok.path, repo.canonicalize().unwrap());

    let msg = |sub: &str| open_sub_dir(&repo, sub).unwrap_err().to_string();
    assert_eq!(
        msg("../outside"),
        "sub-directory '../outside' is refused: it leaves the repository"
    );
    assert_eq!(
        msg("app/../../outside"),
        "sub-directory 'app/../../outside' is refused: it leaves the repository"
    );
    assert_eq!(
        msg("/etc"),
        "sub-directory '/etc' is refused: it must be relative to the repository"
    );
    assert_eq!(
        msg("out"),
        "sub-directory 'out' is refused: a symlink in it leads out of the repository"
    );
    assert_eq!(
        msg("abs"),
        "sub-directory 'abs' is refused: a symlink in it leads out of the repository"
    );
    assert_eq!(
        msg("nope"),
        "sub-directory 'nope' not found in the repository"
    );
    assert_eq!(
        msg("file"),
        "sub-directory 'file' is refused: it is not a directory"
    );
}

#[test]
fn dockerfile_or_containerfile() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let open = |p: &Path| fs::File::open(p).unwrap();
    let err = read_dockerfile(open(d).as_fd(), "sub-directory 'app' of file:///r").unwrap_err();
    assert_eq!(
        err.to_string(),
        "no Dockerfile or Containerfile in sub-directory 'app' of file:///r"
    );
    write(d, "Dockerfile", "FROM d\n");
    let f = read_dockerfile(open(d).as_fd(), "x").unwrap();
    assert_eq!((f.name, &f.text[..]), ("Dockerfile", &b"FROM d\n"[..]));
    write(d, "Containerfile", "FROM c\n");
    let f = read_dockerfile(open(d).as_fd(), "x").unwrap();
    assert_eq!((f.name, &f.text[..]), ("Containerfile", &b"FROM c\n"[..]));

    // A symlink out of the context is refused, not read.
    let e = tempfile::tempdir().unwrap();
    symlink("/etc/passwd", e.path().join("Dockerfile")).unwrap();
    let err = read_dockerfile(open(e.path()).as_fd(), "the directory given").unwrap_err();
    assert_eq!(
        err.to_string(),
        "Dockerfile in the directory given is not a regular file inside the context"
    );
    // A directory named Dockerfile.
    let e = tempfile::tempdir().unwrap();
    fs::create_dir(e.path().join("Dockerfile")).unwrap();
    assert!(matches!(
        read_dockerfile(open(e.path()).as_fd(), "x"),
        Err(ContextError::BadDockerfile { .. })
    ));
}

fn srcs(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn resolved(ctx: &Path, v: &[&str]) -> Vec<(String, SourceKind)> {
    resolve_sources(ctx, &srcs(v))
        .unwrap()
        .into_iter()
        .map(|s| (s.rel.to_string_lossy().into_owned(), s.kind))
        .collect()
}

#[test]
fn clean_sources_as_docker() {
    for (i, o) in [
        (".", ""),
        ("./a", "a"),
        ("/a/b/", "a/b"),
        ("../../etc/passwd", "etc/passwd"),
        ("a/../../b", "b"),
    ] {
        assert_eq!(clean_source(i), o, "{i}");
    }
}

#[test]
fn sources_literal_glob_and_dirs() {
    let t = tempfile::tempdir().unwrap();
    let c = t.path();
    write(c, "a.txt", "a");
    write(c, "b.txt", "b");
    write(c, "c.md", "c");
    write(c, "dir/x.txt", "x");
    write(c, "dir/sub/y.txt", "y");
    write(c, "other/x.txt", "x2");
    use SourceKind::*;
    assert_eq!(resolved(c, &["."]), [(String::new(), Dir)]);
    assert_eq!(resolved(c, &["./dir/"]), [("dir".into(), Dir)]);
    assert_eq!(
        resolved(c, &["*.txt"]),
        [("a.txt".into(), File), ("b.txt".into(), File)]
    );
    assert_eq!(
        resolved(c, &["[ab].txt", "c.md"]),
        [
            ("a.txt".into(), File),
            ("b.txt".into(), File),
            ("c.md".into(), File)
        ]
    );
    assert_eq!(
        resolved(c, &["*/x.txt"]),
        [("dir/x.txt".into(), File), ("other/x.txt".into(), File)]
    );
    assert_eq!(resolved(c, &["d?r/s*"]), [("dir/sub".into(), Dir)]);
    // `*` does not cross directories (filepath.Match).
    assert_eq!(resolved(c, &["*.txt"]).len(), 2);
    // `..` never goes above the context.
    assert_eq!(resolved(c, &["../../a.txt"]), [("a.txt".into(), File)]);

    let err = |v: &[&str]| resolve_sources(c, &srcs(v)).unwrap_err().to_string();
    assert_eq!(
        err(&["*.rs"]),
        "source '*.rs': no file in the build context matches it"
    );
    assert_eq!(
        err(&["a.txt", "missing"]),
        "source 'missing': no such file or directory in the build context"
    );
    assert!(
        err(&["[a"]).starts_with("source '[a': "),
        "{}",
        err(&["[a"])
    );
}

#[test]
fn symlinks_never_lead_out_of_the_context() {
    let t = tempfile::tempdir().unwrap();
    let c = t.path().join("ctx");
    write(&c, "real/f", "inside");
    write(t.path(), "secret", "host file");
    symlink("/etc/passwd", c.join("passwd")).unwrap();
    symlink("../secret", c.join("up")).unwrap();
    symlink("real", c.join("rel")).unwrap();
    symlink("/real", c.join("absin")).unwrap();
    symlink("/etc", c.join("etcdir")).unwrap();

    // A context symlink to /etc/passwd names the context's etc/passwd,
    // which does not exist: the host file is never reached.
    let e = resolve_sources(&c, &srcs(&["passwd"])).unwrap_err();
    assert_eq!(
        e.to_string(),
        "source 'passwd': no such file or directory in the build context"
    );
    assert!(resolve_sources(&c, &srcs(&["etcdir/passwd"])).is_err());
    // `..` in a link target stops at the context's root: `up` is /secret
    // of the context.
    assert!(resolve_sources(&c, &srcs(&["up"])).is_err());
    write(&c, "secret", "the context's own");
    assert_eq!(resolved(&c, &["up"]), [("secret".into(), SourceKind::File)]);
    // Links inside are followed inside.
    assert_eq!(
        resolved(&c, &["rel/f"]),
        [("real/f".into(), SourceKind::File)]
    );
    assert_eq!(resolved(&c, &["absin"]), [("real".into(), SourceKind::Dir)]);
    // A glob matching a link out fails as docker does (the link names
    // the context's /etc/passwd, which does not exist).
    assert_eq!(
        resolve_sources(&c, &srcs(&["pass*"]))
            .unwrap_err()
            .to_string(),
        "source 'passwd': no such file or directory in the build context"
    );
    assert_eq!(
        resolved(&c, &["r*"]),
        [
            ("real".into(), SourceKind::Dir),
            ("real".into(), SourceKind::Dir)
        ]
    );
}

fn git(dir: &Path, args: &[&str]) {
    let st = Command::new("git")
        .current_dir(dir)
        .args(args)
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@t")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@t")
        .status()
        .unwrap();
    assert!(st.success(), "git {args:?}");
}

fn make_repo(root: &Path) -> PathBuf {
    let repo = root.join("src-repo");
    write(&repo, "app/Dockerfile", "FROM scratch\n");
    git(&repo, &["init", "-q", "-b", "main"]);
    git(&repo, &["add", "."]);
    git(&repo, &["commit", "-q", "-m", "one"]);
    write(&repo, "app/second", "2");
    git(&repo, &["add", "."]);
    git(&repo, &["commit", "-q", "-m", "two"]);
    repo
}

#[test]
fn git_clone_file_url_depth_one() {
    let t = tempfile::tempdir().unwrap();
    let repo = make_repo(t.path());
    let dst = t.path().join("clone");
    let url = format!("file://{}", repo.display());
    git_clone(&url, &dst, Duration::from_secs(60)).unwrap();
    assert_eq!(
        fs::read(dst.join("app/Dockerfile")).unwrap(),
        b"FROM scratch\n"
    );
    assert!(dst.join("app/second").exists());
    // --depth 1: one commit only.
    let out = Command::new("git")
        .current_dir(&dst)
        .args(["rev-list", "--count", "HEAD"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1");
    let sub = open_sub_dir(&dst, "app").unwrap();
    assert_eq!(
        read_dockerfile(sub.fd.as_fd(), "x").unwrap().name,
        "Dockerfile"
    );
}

#[test]
fn git_clone_errors_are_one_line() {
    let t = tempfile::tempdir().unwrap();
    let url = format!("file://{}/nothing-here", t.path().display());
    let err = git_clone(&url, &t.path().join("c"), Duration::from_secs(60))
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with(&format!("cannot clone {url}: fatal:")),
        "{err}"
    );
    assert!(!err.contains('\n'));

    // Options cannot be slipped in as the URL.
    let err = git_clone(
        "--upload-pack=touch /tmp/x",
        &t.path().join("d"),
        Duration::from_secs(5),
    )
    .unwrap_err()
    .to_string();
    assert!(err.ends_with(": not a repository URL"), "{err}");
    // ext:: runs commands: not an allowed protocol.
    let mark = t.path().join("ran");
    let url = format!("ext::sh -c touch% {}", mark.display());
    let err = git_clone(&url, &t.path().join("e"), Duration::from_secs(30)).unwrap_err();
    assert!(matches!(err, ContextError::Git { .. }));
    assert!(!mark.exists());
}

#[test]
fn git_clone_is_bounded_in_time() {
    // A "remote" that never answers: git waits on it until killed.
    let t = tempfile::tempdir().unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let url = format!("git://127.0.0.1:{port}/repo");
    let err = git_clone(&url, &t.path().join("c"), Duration::from_millis(500))
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        format!("cannot clone {url}: git did not finish within 500 ms")
    );
    drop(listener);
}

#[test]
fn passwords_are_left_out_of_urls() {
    assert_eq!(
        redact_url("https://bob:s3cret@example.org/r.git"),
        "https://bob:***@example.org/r.git"
    );
    assert_eq!(
        redact_url("https://example.org/a@b"),
        "https://example.org/a@b"
    );
    assert_eq!(redact_url("git@host:r.git"), "git@host:r.git");
}
