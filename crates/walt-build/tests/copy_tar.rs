//! The tar stream of a COPY/ADD, `--chmod` values and ADD's archive
//! detection.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::Path;

use walt_build::context::resolve_sources;
use walt_build::copy::{open_archive, parse_chmod, write_copy_tar};
use walt_tar::{Builder, HeaderSpec, Kind, Reader};

#[derive(Debug, PartialEq, Eq)]
struct E {
    name: String,
    kind: Kind,
    mode: u32,
    owner: (u64, u64),
    mtime: i64,
    data: Vec<u8>,
    link: String,
}

fn entries(tar: &[u8]) -> Vec<E> {
    let mut r = Reader::new(tar);
    let mut out = Vec::new();
    while r.next_entry().unwrap() {
        let e = r.entry();
        let mut x = E {
            name: String::from_utf8(e.path.clone())
                .unwrap()
                .trim_end_matches('/')
                .to_string(),
            kind: e.kind(),
            mode: e.mode,
            owner: (e.uid, e.gid),
            mtime: e.mtime,
            data: Vec::new(),
            link: String::from_utf8(e.link.clone()).unwrap(),
        };
        r.read_to_end(&mut x.data).unwrap();
        out.push(x);
    }
    out
}

fn copy_tar(root: &Path, srcs: &[&str], chmod: Option<u32>) -> Vec<E> {
    let srcs: Vec<String> = srcs.iter().map(|s| s.to_string()).collect();
    let sources = resolve_sources(root, &srcs).unwrap();
    entries(&write_copy_tar(Vec::new(), root, &sources, chmod).unwrap())
}

fn set_mtime(p: &Path, secs: i64) {
    let t = rustix::fs::Timestamps {
        last_access: rustix::fs::Timespec {
            tv_sec: secs,
            tv_nsec: 0,
        },
        last_modification: rustix::fs::Timespec {
            tv_sec: secs,
            tv_nsec: 0,
        },
    };
    rustix::fs::utimensat(
        rustix::fs::CWD,
        p,
        &t,
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .unwrap();
}

/// ctx/app/{a.txt (0640), bin/run (0755), link -> a.txt, hard (= a.txt),
/// empty/}, ctx/top.txt
fn tree() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    let app = d.path().join("app");
    fs::create_dir_all(app.join("bin")).unwrap();
    fs::create_dir_all(app.join("empty")).unwrap();
    fs::write(app.join("a.txt"), "alpha").unwrap();
    fs::set_permissions(app.join("a.txt"), fs::Permissions::from_mode(0o640)).unwrap();
    fs::write(app.join("bin/run"), "#!/bin/sh\n").unwrap();
    fs::set_permissions(app.join("bin/run"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(app.join("bin"), fs::Permissions::from_mode(0o750)).unwrap();
    symlink("a.txt", app.join("link")).unwrap();
    symlink("/etc/passwd", app.join("abs")).unwrap();
    fs::hard_link(app.join("a.txt"), app.join("hard")).unwrap();
    fs::write(d.path().join("top.txt"), "top").unwrap();
    set_mtime(&app.join("a.txt"), 1_000_000);
    set_mtime(&app.join("bin"), 2_000_000);
    d
}

#[test]
fn dir_source_is_its_content_and_file_source_its_name() {
    let d = tree();
    let got = copy_tar(d.path(), &["app", "top.txt"], None);
    let names: Vec<&str> = got.iter().map(|e| e.name.as_str()).collect();
    // The directory's content, in byte order, then the file under its name.
    assert_eq!(
        names,
        [
            "a.txt", "abs", "bin", "bin/run", "empty", "hard", "link", "top.txt"
        ]
    );
    let by = |n: &str| got.iter().find(|e| e.name == n).unwrap();
    let a = by("a.txt");
    assert_eq!(
        (a.kind, a.mode, a.owner, a.mtime, a.data.as_slice()),
        (Kind::File, 0o640, (0, 0), 1_000_000, &b"alpha"[..])
    );
    let bin = by("bin");
    assert_eq!(
        (bin.kind, bin.mode, bin.mtime),
        (Kind::Directory, 0o750, 2_000_000)
    );
    assert_eq!(
        (by("bin/run").mode, by("bin/run").kind),
        (0o755, Kind::File)
    );
    assert_eq!(by("empty").kind, Kind::Directory);
    // Symlinks as symlinks, targets as they are (an absolute one too).
    assert_eq!(
        (by("link").kind, by("link").link.as_str()),
        (Kind::Symlink, "a.txt")
    );
    assert_eq!(
        (by("abs").kind, by("abs").link.as_str()),
        (Kind::Symlink, "/etc/passwd")
    );
    // The second name of a file is a link to the first.
    assert_eq!(
        (by("hard").kind, by("hard").link.as_str()),
        (Kind::HardLink, "a.txt")
    );
    assert_eq!(by("top.txt").data, b"top");
    // Owners are 0:0 whoever owns the files.
    let uids: Vec<(u64, u64)> = got.iter().map(|e| e.owner).collect();
    assert!(uids.iter().all(|&o| o == (0, 0)), "{uids:?}");
}

#[test]
fn owners_are_zero_even_for_other_owners() {
    if !rustix::process::geteuid().is_root() {
        // chown needs root; the other tests check 0:0 for our own files.
        return;
    }
    let d = tree();
    std::os::unix::fs::chown(d.path().join("top.txt"), Some(1234), Some(5678)).unwrap();
    assert_eq!(fs::metadata(d.path().join("top.txt")).unwrap().uid(), 1234);
    let got = copy_tar(d.path(), &["top.txt"], None);
    assert_eq!(got[0].owner, (0, 0));
}

#[test]
fn glob_and_dot_sources() {
    let d = tree();
    let got = copy_tar(d.path(), &["app/*.txt", "app/bin"], None);
    let names: Vec<&str> = got.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["a.txt", "run"]);
    // `.`: the whole context, without a root entry.
    let got = copy_tar(d.path(), &["."], None);
    assert_eq!(got[0].name, "app");
    assert!(got.iter().any(|e| e.name == "app/bin/run"));
    assert!(got.iter().any(|e| e.name == "top.txt"));
    assert!(!got.iter().any(|e| e.name == "." || e.name.is_empty()));
}

#[test]
fn file_xattrs_are_kept() {
    let d = tree();
    let f = d.path().join("app/a.txt");
    rustix::fs::setxattr(&f, "user.walt", b"v\0bin", rustix::fs::XattrFlags::empty()).unwrap();
    let sources = resolve_sources(d.path(), &["app/a.txt".to_string()]).unwrap();
    let tar = write_copy_tar(Vec::new(), d.path(), &sources, None).unwrap();
    let mut r = Reader::new(&tar[..]);
    assert!(r.next_entry().unwrap());
    assert_eq!(
        r.entry().xattrs,
        [(b"user.walt".to_vec(), b"v\0bin".to_vec())]
    );
}

#[test]
fn chmod_applies_to_every_entry() {
    let d = tree();
    let got = copy_tar(d.path(), &["app", "top.txt"], Some(0o600));
    for e in &got {
        if matches!(e.kind, Kind::File | Kind::Directory) {
            assert_eq!(e.mode, 0o600, "{}", e.name);
        }
    }
    assert!(got.iter().any(|e| e.kind == Kind::Directory));
}

#[test]
fn hard_links_across_sources_stay_links() {
    let d = tree();
    fs::hard_link(d.path().join("top.txt"), d.path().join("app/bin/top2")).unwrap();
    let got = copy_tar(d.path(), &["top.txt", "app/bin"], None);
    let names: Vec<(&str, Kind, &str)> = got
        .iter()
        .map(|e| (e.name.as_str(), e.kind, e.link.as_str()))
        .collect();
    assert_eq!(
        names,
        [
            ("top.txt", Kind::File, ""),
            ("run", Kind::File, ""),
            ("top2", Kind::HardLink, "top.txt")
        ]
    );
}

#[test]
fn fifos_are_refused() {
    let d = tree();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        d.path().join("app/bin/pipe"),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o644),
        0,
    )
    .unwrap();
    let sources = resolve_sources(d.path(), &["app".to_string()]).unwrap();
    let e = write_copy_tar(Vec::new(), d.path(), &sources, None)
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "source 'app': 'app/bin/pipe' is a FIFO, which COPY and ADD cannot copy"
    );
    let sources = resolve_sources(d.path(), &["app/bin/pipe".to_string()]).unwrap();
    let e = write_copy_tar(Vec::new(), d.path(), &sources, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("'app/bin/pipe' is a FIFO"), "{e}");
}

#[test]
fn chmod_values() {
    assert_eq!(parse_chmod("755").unwrap(), 0o755);
    assert_eq!(parse_chmod("0644").unwrap(), 0o644);
    assert_eq!(parse_chmod("4755").unwrap(), 0o4755);
    for bad in ["u+x", "", "888", "a=rwx", "77777", "-1"] {
        let e = parse_chmod(bad).unwrap_err().to_string();
        assert!(e.contains(&format!("--chmod={bad}")), "{e}");
    }
}

fn sample_tar() -> Vec<u8> {
    let mut b = Builder::new(Vec::new());
    let mut h = HeaderSpec::new(b"dir", Kind::Directory);
    h.mode = 0o755;
    b.append(&h, &mut std::io::empty()).unwrap();
    let mut h = HeaderSpec::new(b"dir/f", Kind::File);
    h.size = 5;
    b.append(&h, &mut &b"hello"[..]).unwrap();
    b.finish().unwrap()
}

fn detect(content: &[u8]) -> Option<Vec<u8>> {
    let mut f = tempfile::tempfile().unwrap();
    f.write_all(content).unwrap();
    // Where the caller left the offset does not matter.
    let r = open_archive(f).unwrap();
    r.map(|mut r| {
        let mut out = Vec::new();
        r.read_to_end(&mut out).unwrap();
        out
    })
}

#[test]
fn archives_are_detected_by_content() {
    let tar = sample_tar();
    let gz = {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(&tar).unwrap();
        e.finish().unwrap()
    };
    let bz = {
        let mut e = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::fast());
        e.write_all(&tar).unwrap();
        e.finish().unwrap()
    };
    let xz = {
        let mut e = xz2::write::XzEncoder::new(Vec::new(), 1);
        e.write_all(&tar).unwrap();
        e.finish().unwrap()
    };
    let zst = zstd::encode_all(&tar[..], 1).unwrap();
    for (what, data) in [
        ("plain", &tar),
        ("gzip", &gz),
        ("bzip2", &bz),
        ("xz", &xz),
        ("zstd", &zst),
    ] {
        let got = detect(data).unwrap_or_else(|| panic!("{what} not detected"));
        assert_eq!(got, tar, "{what}");
        let names: Vec<String> = entries(&got).into_iter().map(|e| e.name).collect();
        assert_eq!(names, ["dir", "dir/f"], "{what}");
    }
    // Not archives: copied as files.
    let text = b"just some text, long enough to fill a block? no.".repeat(20);
    let gz_text = {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(&text).unwrap();
        e.finish().unwrap()
    };
    let mut broken = gz.clone();
    broken.truncate(12);
    for (what, data) in [
        ("text", &text[..]),
        ("empty", &b""[..]),
        ("short", &b"BZh"[..]),
        ("gzip of text", &gz_text[..]),
        ("broken gzip", &broken[..]),
        ("zero block", &[0u8; 1024][..]),
    ] {
        assert!(detect(data).is_none(), "{what} taken for an archive");
    }
}
