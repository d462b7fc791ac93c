//! The crate's own tests: reading what other writers produce, the
//! extractor against the hostile table under every policy, and round trips
//! through the tree writer.

use std::fs;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::testing::{Policy, run_hostile_table};
use crate::*;

fn extract_with(tar: &[u8], root: &Path, opts: ExtractOptions<'_>) -> Result<ExtractStats> {
    let mut w = PlainWriter;
    let mut r = Reader::new(tar);
    Extractor::new(Some(root), opts, &mut w)?.extract(&mut r)
}

fn layer_opts<'a>() -> ExtractOptions<'a> {
    ExtractOptions {
        whiteouts: Whiteouts::Overlay,
        area: "layer",
        skip_unknown: true,
        ..Default::default()
    }
}

#[test]
fn hostile_table_every_policy() {
    for (overlay, devices, limit) in [
        (true, Devices::Create, None),
        (false, Devices::Refuse, None),
        (true, Devices::Skip, Some(1_000_000)),
        (false, Devices::Create, Some(u64::MAX)),
    ] {
        let policy = Policy {
            overlay_whiteouts: overlay,
            devices_refused: devices == Devices::Refuse,
            limit,
        };
        run_hostile_table(policy, |_case, tar| {
            let dest = tempfile::tempdir().unwrap().keep();
            let opts = ExtractOptions {
                whiteouts: if overlay {
                    Whiteouts::Overlay
                } else {
                    Whiteouts::Keep
                },
                devices,
                limit,
                ..Default::default()
            };
            extract_with(tar, &dest, opts)
                .map(|_| dest.clone())
                .map_err(|e| e.to_string())
        });
    }
}

#[test]
fn hostile_table_without_openat2() {
    // The component-by-component rule alone (kernels before 5.6).
    crate::fsops::disable_openat2();
    let policy = Policy {
        overlay_whiteouts: true,
        devices_refused: false,
        limit: None,
    };
    run_hostile_table(policy, |_case, tar| {
        let dest = tempfile::tempdir().unwrap().keep();
        extract_with(tar, &dest, layer_opts())
            .map(|_| dest.clone())
            .map_err(|e| e.to_string())
    });
    let src = tempfile::tempdir().unwrap();
    make_tree(&src.path().join("tree"));
    let (tar, _) = write_tree(
        Vec::new(),
        &src.path().join("tree"),
        &TreeOptions::default(),
    )
    .unwrap();
    let dest = tempfile::tempdir().unwrap();
    extract_with(&tar, dest.path(), ExtractOptions::default()).unwrap();
    assert_eq!(snapshot(&src.path().join("tree")), snapshot(dest.path()));
}

#[test]
fn hostile_table_cp_rule() {
    let policy = Policy {
        overlay_whiteouts: false,
        devices_refused: false,
        limit: None,
    };
    run_hostile_table(policy, |_case, tar| {
        let dest = tempfile::tempdir().unwrap().keep();
        let d2 = dest.clone();
        let opts = ExtractOptions {
            cp_top: Some(Box::new(move |top, is_dir| {
                cp_landing(d2.to_str().unwrap(), &d2, top, is_dir)
            })),
            ..Default::default()
        };
        let mut w = PlainWriter;
        let mut r = Reader::new(tar);
        Extractor::new(None, opts, &mut w)
            .and_then(|x| x.extract(&mut r))
            .map(|_| dest.clone())
            .map_err(|e| e.to_string())
    });
}

#[test]
fn huge_headers_are_refused_naming_the_entry_before() {
    let mut b = Builder::new(Vec::new());
    let mut h = HeaderSpec::new(b"first/file", Kind::File);
    h.size = 1;
    b.append(&h, &mut &b"x"[..]).unwrap();
    let mut tar = b.finish().unwrap();
    tar.truncate(1024);
    let mut hdr = [0u8; 512];
    hdr[..3].copy_from_slice(b"pax");
    write::put_number(&mut hdr[124..136], 100 << 30);
    hdr[156] = b'x';
    hdr[257..263].copy_from_slice(b"ustar\0");
    write::set_checksum(&mut hdr);
    tar.extend_from_slice(&hdr);
    tar.extend_from_slice(&[b'1'; 10_000]);
    let dest = tempfile::tempdir().unwrap();
    let err = extract_with(&tar, dest.path(), ExtractOptions::default()).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, Error::Format { .. }), "{text}");
    assert!(text.contains("after entry 'first/file'"), "{text}");
    assert!(text.contains("byte 1024"), "{text}");
    assert!(text.contains("107374182400 bytes"), "{text}");
    assert_eq!(fs::read(dest.path().join("first/file")).unwrap(), b"x");
}

#[test]
fn byte_limit_names_the_entry() {
    let mut b = Builder::new(Vec::new());
    for name in ["a", "b"] {
        let mut h = HeaderSpec::new(name.as_bytes(), Kind::File);
        h.size = 600;
        b.append(&h, &mut &[0u8; 600][..]).unwrap();
    }
    let tar = b.finish().unwrap();
    let dest = tempfile::tempdir().unwrap();
    let opts = ExtractOptions {
        limit: Some(1000),
        ..Default::default()
    };
    let err = extract_with(&tar, dest.path(), opts).unwrap_err();
    assert_eq!(
        err.to_string(),
        "entry 'b' goes over the limit of 1000 bytes written"
    );
    assert!(!dest.path().join("b").exists());
}

#[test]
fn devices_refused_or_skipped() {
    let mut b = Builder::new(Vec::new());
    let mut h = HeaderSpec::new(b"null", Kind::CharDevice);
    h.dev_major = 1;
    h.dev_minor = 3;
    b.append(&h, &mut std::io::empty()).unwrap();
    b.append(&HeaderSpec::new(b"fifo", Kind::Fifo), &mut std::io::empty())
        .unwrap();
    let tar = b.finish().unwrap();
    let dest = tempfile::tempdir().unwrap();
    let opts = ExtractOptions {
        devices: Devices::Refuse,
        ..Default::default()
    };
    let err = extract_with(&tar, dest.path(), opts).unwrap_err();
    assert_eq!(
        err.to_string(),
        "entry 'null' is a device node: refused here"
    );
    let opts = ExtractOptions {
        devices: Devices::Skip,
        ..Default::default()
    };
    let dest = tempfile::tempdir().unwrap();
    let stats = extract_with(&tar, dest.path(), opts).unwrap();
    assert_eq!(stats.skipped_devices, 1);
    assert!(!dest.path().join("null").exists());
    assert!(
        fs::symlink_metadata(dest.path().join("fifo"))
            .unwrap()
            .file_type()
            .is_fifo()
    );
    let dest = tempfile::tempdir().unwrap();
    extract_with(&tar, dest.path(), ExtractOptions::default()).unwrap();
    let m = fs::symlink_metadata(dest.path().join("null")).unwrap();
    assert!(m.file_type().is_char_device());
    assert_eq!(m.rdev(), nix::sys::stat::makedev(1, 3));
}

#[test]
fn whiteouts_overlay_or_kept() {
    let mut b = Builder::new(Vec::new());
    for (p, k) in [
        (&b"d"[..], Kind::Directory),
        (b"d/.wh..wh..opq", Kind::File),
        (b"d/.wh.gone", Kind::File),
        (b"e/.wh..wh.plnk", Kind::File),
    ] {
        b.append(&HeaderSpec::new(p, k), &mut std::io::empty())
            .unwrap();
    }
    let tar = b.finish().unwrap();
    let dest = tempfile::tempdir().unwrap();
    extract_with(&tar, dest.path(), layer_opts()).unwrap();
    let d = dest.path().join("d");
    assert_eq!(
        xattr::get(&d, OPAQUE_XATTR).unwrap().as_deref(),
        Some(&b"y"[..])
    );
    let m = fs::symlink_metadata(d.join("gone")).unwrap();
    assert!(m.file_type().is_char_device() && m.rdev() == 0);
    assert!(!d.join(".wh.gone").exists());
    assert_eq!(fs::read_dir(dest.path().join("e")).unwrap().count(), 0);

    let dest = tempfile::tempdir().unwrap();
    extract_with(&tar, dest.path(), ExtractOptions::default()).unwrap();
    assert!(dest.path().join("d/.wh.gone").is_file());
    assert!(dest.path().join("d/.wh..wh..opq").is_file());
    assert_eq!(
        xattr::get(dest.path().join("d"), OPAQUE_XATTR).unwrap(),
        None
    );
}

#[test]
fn overlay_xattrs_never_taken_from_an_archive() {
    let xattrs = vec![
        (b"trusted.overlay.redirect".to_vec(), b"/x".to_vec()),
        (b"user.ok".to_vec(), b"1".to_vec()),
    ];
    let mut b = Builder::new(Vec::new());
    let mut h = HeaderSpec::new(b"f", Kind::File);
    h.xattrs = &xattrs;
    b.append(&h, &mut std::io::empty()).unwrap();
    let tar = b.finish().unwrap();
    let dest = tempfile::tempdir().unwrap();
    extract_with(&tar, dest.path(), ExtractOptions::default()).unwrap();
    let f = dest.path().join("f");
    assert_eq!(xattr::get(&f, "trusted.overlay.redirect").unwrap(), None);
    assert_eq!(
        xattr::get(&f, "user.ok").unwrap().as_deref(),
        Some(&b"1"[..])
    );
}

#[test]
fn owners_kept_mapped_or_ignored() {
    let mut b = Builder::new(Vec::new());
    let mut h = HeaderSpec::new(b"f", Kind::File);
    h.uid = 1234;
    h.gid = 5678;
    b.append(&h, &mut std::io::empty()).unwrap();
    let tar = b.finish().unwrap();
    for (owners, want) in [
        (Owners::Keep, (1234, 5678)),
        (Owners::Fixed { uid: 7, gid: 8 }, (7, 8)),
        (
            Owners::Ignore,
            (
                nix::unistd::geteuid().as_raw(),
                nix::unistd::getegid().as_raw(),
            ),
        ),
    ] {
        let dest = tempfile::tempdir().unwrap();
        let opts = ExtractOptions {
            owners,
            ..Default::default()
        };
        extract_with(&tar, dest.path(), opts).unwrap();
        let m = fs::metadata(dest.path().join("f")).unwrap();
        assert_eq!((m.uid(), m.gid()), want, "{owners:?}");
    }
}

#[test]
fn cp_rule_renames_the_top_entry_and_refuses_a_second() {
    let mut b = Builder::new(Vec::new());
    for (p, k) in [(&b"src"[..], Kind::Directory), (b"src/f", Kind::File)] {
        b.append(&HeaderSpec::new(p, k), &mut std::io::empty())
            .unwrap();
    }
    let one = b.finish().unwrap();
    let dest = tempfile::tempdir().unwrap();
    let target = dest.path().join("copy");
    let cp = |tar: &[u8], to: &Path| {
        let to = to.to_path_buf();
        let opts = ExtractOptions {
            cp_top: Some(Box::new(move |top, is_dir| {
                cp_landing(to.to_str().unwrap(), &to, top, is_dir)
            })),
            ..Default::default()
        };
        let mut w = PlainWriter;
        Extractor::new(None, opts, &mut w)?.extract(&mut Reader::new(tar))
    };
    cp(&one, &target).unwrap();
    assert!(target.join("f").is_file());
    // Into an existing directory: lands inside.
    cp(&one, &target).unwrap();
    assert!(target.join("src/f").is_file());
    // A fifo (or a device, like a client's /dev/null) is never replaced.
    let mut b = Builder::new(Vec::new());
    b.append(&HeaderSpec::new(b"file", Kind::File), &mut std::io::empty())
        .unwrap();
    let file = b.finish().unwrap();
    let fifo = dest.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let err = cp(&file, &fifo).unwrap_err();
    assert!(err.to_string().contains("is not a regular file"), "{err}");
    assert!(fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo());
    let err = cp(&one, &dest.path().join("no/such")).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "{}/no/such: No such file or directory",
            dest.path().display()
        )
    );
    let mut b = Builder::new(Vec::new());
    for (p, k) in [(&b"a"[..], Kind::Directory), (b"b/x", Kind::File)] {
        b.append(&HeaderSpec::new(p, k), &mut std::io::empty())
            .unwrap();
    }
    let two = b.finish().unwrap();
    let err = cp(&two, &dest.path().join("two")).unwrap_err();
    assert!(
        err.to_string().contains("more than one top-level entry"),
        "{err}"
    );
    assert!(!dest.path().join("b").exists() && !dest.path().join("two/x").exists());
}

/// A tree with every kind of entry.
fn make_tree(d: &Path) {
    fs::create_dir_all(d.join("sub/deeper")).unwrap();
    fs::write(d.join("a"), "file a").unwrap();
    fs::write(d.join("sub/b"), vec![7u8; 100_000]).unwrap();
    fs::write(d.join(format!("sub/{}", "long".repeat(60))), "long name").unwrap();
    fs::hard_link(d.join("a"), d.join("sub/hard")).unwrap();
    std::os::unix::fs::symlink("../a", d.join("sub/link")).unwrap();
    std::os::unix::fs::symlink("x".repeat(200), d.join("longlink")).unwrap();
    nix::unistd::mkfifo(
        &d.join("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o640),
    )
    .unwrap();
    nix::sys::stat::mknod(
        &d.join("null"),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o600),
        nix::sys::stat::makedev(1, 3),
    )
    .unwrap();
    // Sparse: 4 MiB with data at 1 MiB and at the end.
    let f = fs::File::create(d.join("sparse")).unwrap();
    f.set_len(4 << 20).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[1u8; 8192], 1 << 20).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[2u8; 100], (4 << 20) - 100).unwrap();
    let f = fs::File::create(d.join("all-hole")).unwrap();
    f.set_len(3 << 20).unwrap();
    fs::set_permissions(d.join("a"), fs::Permissions::from_mode(0o4751)).unwrap();
    std::os::unix::fs::lchown(d.join("sub/b"), Some(1234), Some(5678)).unwrap();
    std::os::unix::fs::lchown(d.join("sub/link"), Some(42), Some(43)).unwrap();
    xattr::set(d.join("sub/b"), "user.walt", b"value\0bin").unwrap();
    xattr::set(d.join("sub"), "user.dir", b"d").unwrap();
    xattr::set(d.join("sub"), "trusted.overlay.opaque", b"y").unwrap();
    xattr::set(d.join("sub/link"), "trusted.walt", b"on a symlink").unwrap();
    fs::set_permissions(d.join("sub/deeper"), fs::Permissions::from_mode(0o500)).unwrap();
    let t = filetime::FileTime::from_unix_time(1_500_000_000, 123_456_789);
    for p in ["a", "sub/b", "fifo", "sub/deeper", "sub", ""] {
        filetime::set_symlink_file_times(d.join(p), t, t).unwrap();
    }
    let t2 = filetime::FileTime::from_unix_time(1_400_000_000, 0);
    filetime::set_symlink_file_times(d.join("sub/link"), t2, t2).unwrap();
}

/// (path, type, mode, uid, gid, mtime, size, content hash or target, xattrs, inode group)
fn snapshot(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut inodes: Vec<u64> = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let p = root.join(&rel);
        let m = fs::symlink_metadata(&p).unwrap();
        let ft = m.file_type();
        let what = if ft.is_dir() {
            let mut names: Vec<_> = fs::read_dir(&p)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            names.sort();
            for n in names.into_iter().rev() {
                stack.push(rel.join(n));
            }
            "dir".to_string()
        } else if ft.is_symlink() {
            format!("link {}", fs::read_link(&p).unwrap().display())
        } else if ft.is_file() {
            let data = fs::read(&p).unwrap();
            let sum: u64 = data
                .iter()
                .enumerate()
                .map(|(i, &b)| (i as u64 + 1) * b as u64)
                .sum();
            let group = match inodes.iter().position(|&i| i == m.ino()) {
                Some(g) => g,
                None => {
                    inodes.push(m.ino());
                    inodes.len() - 1
                }
            };
            let sparse = m.blocks() * 512 < m.len();
            format!("file {} {sum} inode#{group} sparse={sparse}", data.len())
        } else if ft.is_fifo() {
            "fifo".into()
        } else {
            format!("dev {}", m.rdev())
        };
        let mut xs: Vec<String> = xattr::list(&p)
            .unwrap()
            .filter(|n| !n.to_string_lossy().starts_with("trusted.overlay."))
            .map(|n| {
                let v = xattr::get(&p, &n).unwrap().unwrap_or_default();
                format!("{}={:?}", n.to_string_lossy(), v)
            })
            .collect();
        xs.sort();
        let mtime = if ft.is_symlink() || !ft.is_dir() || !rel.as_os_str().is_empty() {
            format!("{}.{}", m.mtime(), m.mtime_nsec())
        } else {
            String::new()
        };
        out.push(format!(
            "{} {what} {:o} {}:{} {mtime} {xs:?}",
            rel.display(),
            m.mode() & 0o7777,
            m.uid(),
            m.gid()
        ));
    }
    out
}

#[test]
fn tree_roundtrip_keeps_everything() {
    let src = tempfile::tempdir().unwrap();
    let tree = src.path().join("tree");
    make_tree(&tree);
    for top in [None, Some("tree")] {
        let opts = TreeOptions {
            top: top.map(Into::into),
            ..Default::default()
        };
        let (tar, stats) = write_tree(Vec::new(), &tree, &opts).unwrap();
        assert!(stats.skipped_sockets.is_empty());
        // Other readers agree on the names and the hard link.
        let mut ar = tar::Archive::new(&tar[..]);
        let mut names = Vec::new();
        for e in ar.entries().unwrap() {
            let e = e.unwrap();
            names.push((
                e.path().unwrap().to_string_lossy().into_owned(),
                e.header().entry_type(),
            ));
        }
        let hard = names
            .iter()
            .find(|(n, _)| n.ends_with("sub/hard"))
            .unwrap_or_else(|| panic!("{names:?}"));
        assert_eq!(hard.1, tar::EntryType::Link);
        let dest = tempfile::tempdir().unwrap();
        let (root, got) = match top {
            None => {
                extract_with(&tar, dest.path(), ExtractOptions::default()).unwrap();
                (dest.path().to_path_buf(), dest.path().to_path_buf())
            }
            Some(t) => {
                extract_with(&tar, dest.path(), ExtractOptions::default()).unwrap();
                (dest.path().to_path_buf(), dest.path().join(t))
            }
        };
        let _ = root;
        assert_eq!(snapshot(&tree), snapshot(&got), "top {top:?}");
        // Names in byte order, depth first.
        let (tar2, _) = write_tree(Vec::new(), &tree, &opts).unwrap();
        assert_eq!(tar, tar2, "not deterministic");
    }
}

#[test]
fn tree_overlay_to_oci_and_back() {
    let src = tempfile::tempdir().unwrap();
    let up = src.path().join("upper");
    fs::create_dir_all(up.join("etc/opaque")).unwrap();
    fs::write(up.join("etc/opaque/new"), "n").unwrap();
    xattr::set(up.join("etc/opaque"), OPAQUE_XATTR, b"y").unwrap();
    xattr::set(up.join("etc/opaque"), "trusted.overlay.origin", b"o").unwrap();
    nix::sys::stat::mknod(
        &up.join("etc/gone"),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::empty(),
        0,
    )
    .unwrap();
    let opts = TreeOptions {
        whiteouts: TreeWhiteouts::OverlayToOci,
        ..Default::default()
    };
    let (tar, _) = write_tree(Vec::new(), &up, &opts).unwrap();
    let mut r = Reader::new(&tar[..]);
    let mut names = Vec::new();
    while r.next_entry().unwrap() {
        let e = r.entry();
        assert!(
            !e.xattrs
                .iter()
                .any(|(k, _)| k.starts_with(b"trusted.overlay.")),
            "{:?}",
            e.xattrs
        );
        names.push(String::from_utf8(e.path.clone()).unwrap());
    }
    assert_eq!(
        names,
        [
            ".",
            "etc",
            "etc/.wh.gone",
            "etc/opaque",
            "etc/opaque/.wh..wh..opq",
            "etc/opaque/new"
        ]
    );
    let dest = tempfile::tempdir().unwrap();
    extract_with(&tar, dest.path(), layer_opts()).unwrap();
    assert_eq!(snapshot(&up), snapshot(dest.path()));
    assert_eq!(
        xattr::get(dest.path().join("etc/opaque"), OPAQUE_XATTR)
            .unwrap()
            .as_deref(),
        Some(&b"y"[..])
    );
}

#[test]
fn deep_tree_written_without_recursion() {
    let src = tempfile::tempdir().unwrap();
    // Deeper than PATH_MAX, built by descriptor.
    let mut cur = fs::File::open(src.path()).unwrap();
    for _ in 0..2500 {
        nix::sys::stat::mkdirat(&cur, "dd", nix::sys::stat::Mode::from_bits_truncate(0o755))
            .unwrap();
        let fd = nix::fcntl::openat(
            &cur,
            "dd",
            nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_DIRECTORY,
            nix::sys::stat::Mode::empty(),
        )
        .unwrap();
        cur = fs::File::from(fd);
    }
    let (tar, stats) = write_tree(Vec::new(), src.path(), &TreeOptions::default()).unwrap();
    assert_eq!(stats.entries, 2501);
    let dest = tempfile::tempdir().unwrap();
    let s = extract_with(&tar, dest.path(), ExtractOptions::default()).unwrap();
    assert_eq!(s.entries, 2501);
    let (tar2, _) = write_tree(Vec::new(), dest.path(), &TreeOptions::default()).unwrap();
    assert_eq!(tar, tar2);
    // Removal of a deep tree (a directory replaced by a file) takes no stack.
    let mut b = Builder::new(Vec::new());
    b.append(&HeaderSpec::new(b"dd", Kind::File), &mut std::io::empty())
        .unwrap();
    let tar3 = b.finish().unwrap();
    extract_with(&tar3, dest.path(), ExtractOptions::default()).unwrap();
    assert!(dest.path().join("dd").is_file());
}

fn gnu_tar(args: &[&str], dir: &Path) -> Vec<u8> {
    let out = Command::new("tar")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

#[test]
fn reads_what_gnu_tar_writes() {
    let src = tempfile::tempdir().unwrap();
    let tree = src.path().join("tree");
    make_tree(&tree);
    fs::write(tree.join("x".repeat(150)), "long").unwrap();
    for (format, sparse) in [
        ("gnu", ""),
        ("pax", "1.0"),
        ("pax", "0.1"),
        ("pax", "0.0"),
        ("posix", "1.0"),
        ("oldgnu", ""),
    ] {
        let fmt = format!("--format={format}");
        let sv = format!("--sparse-version={sparse}");
        let mut args = vec!["-c", "--sparse", &fmt, "-f", "-", "tree"];
        if format == "pax" || format == "posix" {
            args.extend(["--xattrs", "--xattrs-include=*", &sv]);
        }
        let tar = gnu_tar(&args, src.path());
        let dest = tempfile::tempdir().unwrap();
        extract_with(&tar, dest.path(), ExtractOptions::default())
            .unwrap_or_else(|e| panic!("{format}: {e}"));
        let a = snapshot(&tree);
        let b = snapshot(&dest.path().join("tree"));
        // GNU and old GNU formats keep whole seconds and no xattrs.
        if format == "pax" || format == "posix" {
            assert_eq!(a, b, "{format}");
        } else {
            let strip = |v: Vec<String>| -> Vec<String> {
                v.into_iter()
                    .map(|l| l.split(' ').take(3).collect::<Vec<_>>().join(" "))
                    .collect()
            };
            assert_eq!(strip(a), strip(b), "{format}");
        }
        let m = fs::metadata(dest.path().join("tree/sparse")).unwrap();
        assert!(
            m.blocks() * 512 < 1 << 20,
            "{format} {sparse}: holes were written"
        );
        assert_eq!(m.len(), 4 << 20);
        assert_eq!(
            fs::read(dest.path().join("tree/sparse")).unwrap(),
            fs::read(tree.join("sparse")).unwrap(),
            "{format} {sparse}"
        );
    }
}

#[test]
fn gnu_tar_reads_what_we_write() {
    let src = tempfile::tempdir().unwrap();
    let tree = src.path().join("tree");
    make_tree(&tree);
    let (tar, _) = write_tree(
        Vec::new(),
        &tree,
        &TreeOptions {
            top: Some("tree".into()),
            ..Default::default()
        },
    )
    .unwrap();
    let dest = tempfile::tempdir().unwrap();
    let mut child = Command::new("tar")
        .args(["-x", "--xattrs", "--xattrs-include=*", "-f", "-"])
        .current_dir(dest.path())
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), &tar).unwrap();
    drop(child.stdin.take());
    assert!(child.wait().unwrap().success());
    let got = dest.path().join("tree");
    assert_eq!(
        fs::read(got.join("sparse")).unwrap(),
        fs::read(tree.join("sparse")).unwrap()
    );
    assert_eq!(
        fs::read_link(got.join("longlink")).unwrap(),
        fs::read_link(tree.join("longlink")).unwrap()
    );
    assert_eq!(
        fs::metadata(got.join("sub/hard")).unwrap().ino(),
        fs::metadata(got.join("a")).unwrap().ino()
    );
}

#[test]
fn reads_what_the_tar_crate_writes() {
    // GNU long names and links, old GNU sparse ('S' headers).
    let src = tempfile::tempdir().unwrap();
    let tree = src.path().join("tree");
    make_tree(&tree);
    let mut b = tar::Builder::new(Vec::new());
    b.sparse(true);
    b.follow_symlinks(false);
    b.append_dir_all("tree", &tree).unwrap();
    let tar = b.into_inner().unwrap();
    let dest = tempfile::tempdir().unwrap();
    extract_with(&tar, dest.path(), ExtractOptions::default()).unwrap();
    let got = dest.path().join("tree");
    for f in ["a", "sub/b", "sparse", "all-hole"] {
        assert_eq!(
            fs::read(got.join(f)).unwrap(),
            fs::read(tree.join(f)).unwrap(),
            "{f}"
        );
    }
    assert_eq!(
        fs::read(got.join(format!("sub/{}", "long".repeat(60)))).unwrap(),
        b"long name"
    );
    let m = fs::metadata(got.join("sparse")).unwrap();
    assert!(m.blocks() * 512 < 1 << 20, "holes were written");
}

#[test]
fn reader_reads_data_in_any_piece_size() {
    let mut b = Builder::new(Vec::new());
    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let mut h = HeaderSpec::new(b"f", Kind::File);
    h.size = data.len() as u64;
    b.append(&h, &mut &data[..]).unwrap();
    let tar = b.finish().unwrap();
    // A reader giving 3 bytes at a time.
    struct Slow<'a>(&'a [u8]);
    impl Read for Slow<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = buf.len().min(3).min(self.0.len());
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }
    let mut r = Reader::new(Slow(&tar));
    assert!(r.next_entry().unwrap());
    let mut got = Vec::new();
    r.read_to_end(&mut got).unwrap();
    assert_eq!(got, data);
    assert!(!r.next_entry().unwrap());
}

/// A chain of directory entries, one level deeper each, generated while
/// it is read (the archive is larger than the memory it may take).
struct DeepDirChain {
    builder: Option<Builder<Vec<u8>>>,
    level: usize,
    levels: usize,
    pos: usize,
    chunk: Vec<u8>,
}

impl Read for DeepDirChain {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.chunk.len() {
            let Some(b) = self.builder.as_mut() else {
                return Ok(0);
            };
            if self.level < self.levels {
                self.level += 1;
                let path = vec!["ab"; self.level].join("/");
                let h = HeaderSpec::new(path.as_bytes(), Kind::Directory);
                b.append(&h, &mut std::io::empty())?;
                self.chunk = std::mem::take(b.get_mut());
            } else {
                self.chunk = self.builder.take().expect("builder").finish()?;
            }
            self.pos = 0;
        }
        let n = buf.len().min(self.chunk.len() - self.pos);
        buf[..n].copy_from_slice(&self.chunk[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[test]
fn directory_paths_kept_for_the_end_are_bounded() {
    // 1.5 × levels² bytes of paths: 10 000 levels cross the bound.
    let levels = 10_000;
    let dest = tempfile::tempdir().unwrap();
    let mut chain = DeepDirChain {
        builder: Some(Builder::new(Vec::new())),
        level: 0,
        levels,
        pos: 0,
        chunk: Vec::new(),
    };
    let mut w = PlainWriter;
    let mut r = Reader::new(&mut chain);
    let err = Extractor::new(Some(dest.path()), layer_opts(), &mut w)
        .unwrap()
        .extract(&mut r)
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("directory paths add up to more than 128 MiB"),
        "{msg}"
    );
    assert!(
        chain.level < levels,
        "refused before the end: {}",
        chain.level
    );

    // Below the bound, the same chain extracts and gets its modes.
    let dest = tempfile::tempdir().unwrap();
    let mut chain = DeepDirChain {
        builder: Some(Builder::new(Vec::new())),
        level: 0,
        levels: 1_000,
        pos: 0,
        chunk: Vec::new(),
    };
    let mut r = Reader::new(&mut chain);
    Extractor::new(Some(dest.path()), layer_opts(), &mut w)
        .unwrap()
        .extract(&mut r)
        .unwrap();
    let bottom = dest.path().join(vec!["ab"; 1_000].join("/"));
    let mode = fs::metadata(bottom).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o644);
}
