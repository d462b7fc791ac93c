//! Property test of the extractor: random archives (files, directories,
//! symlinks and hard links with absolute or `..` targets, names with `..`,
//! absolute or `//`, whiteouts, devices, fifos, PAX long names, xattrs,
//! sparse files) extracted under every policy never create, change or link
//! anything outside the root: a sentinel tree beside the root keeps the same
//! listing and contents, and nothing else appears beside it. Errors are
//! errors (one line), never panics. `PROPTEST_CASES` overrides the number of
//! cases (see docs/testing.md).

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use proptest::prelude::*;
use walt_tar::{
    Builder, Devices, ExtractOptions, Extractor, HeaderSpec, Kind, Owners, PlainWriter, Reader,
    Whiteouts, cp_landing,
};

fn config(default_cases: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default_cases);
    ProptestConfig::with_cases(cases)
}

/// Placeholders replaced by the absolute paths of the test's directories.
const ABS_SENTINEL: &str = "@SENTINEL@";
const ABS_ROOT: &str = "@ROOT@";

/// Name parts: ordinary, hostile, whiteouts, a long one (PAX path).
fn component() -> impl Strategy<Value = String> {
    prop_oneof![
        24 => prop::sample::select(vec!["a", "b", "c", "d"]).prop_map(str::to_string),
        1 => Just("..".to_string()),
        2 => Just(".".to_string()),
        2 => Just(String::new()),
        2 => Just("sentinel".to_string()),
        1 => Just(".wh.a".to_string()),
        1 => Just(".wh.sentinel".to_string()),
        1 => Just(".wh..wh..opq".to_string()),
        1 => Just("l".repeat(150)),
    ]
}

fn path() -> impl Strategy<Value = String> {
    (
        prop_oneof![
            40 => Just(""),
            1 => Just("/"),
            1 => Just("//"),
            3 => Just("./"),
            1 => Just("../"),
            1 => Just("../sentinel/"),
            1 => Just("@SENTINEL@/"),
            1 => Just("@ROOT@/../sentinel/"),
        ],
        prop::collection::vec(component(), 1..4),
        prop_oneof![4 => Just(""), 1 => Just("/")],
    )
        .prop_map(|(pre, comps, post)| format!("{pre}{}{post}", comps.join("/")))
}

fn link_target() -> impl Strategy<Value = String> {
    prop_oneof![
        10 => path(),
        1 => Just("../sentinel/f".to_string()),
        1 => Just("../../sentinel".to_string()),
        1 => Just("@SENTINEL@".to_string()),
        1 => Just("@SENTINEL@/f".to_string()),
        1 => Just("@SENTINEL@/d/g".to_string()),
        1 => Just("/".to_string()),
        1 => Just("..".to_string()),
    ]
}

#[derive(Debug, Clone)]
enum What {
    File { data: Vec<u8>, sparse: bool },
    Dir,
    Symlink(String),
    HardLink(String),
    CharDevice,
    BlockDevice,
    Fifo,
    Other(u8),
}

#[derive(Debug, Clone)]
struct Spec {
    path: String,
    what: What,
    mode: u32,
    xattr: bool,
}

fn spec() -> impl Strategy<Value = Spec> {
    let what = prop_oneof![
        4 => (prop::collection::vec(any::<u8>(), 0..600), any::<bool>())
            .prop_map(|(data, sparse)| What::File { data, sparse }),
        3 => Just(What::Dir),
        3 => link_target().prop_map(What::Symlink),
        2 => link_target().prop_map(What::HardLink),
        1 => Just(What::CharDevice),
        1 => Just(What::BlockDevice),
        1 => Just(What::Fifo),
        1 => prop::sample::select(vec![b'V', b'M', b'x' - 1, b'9']).prop_map(What::Other),
    ];
    (
        path(),
        what,
        prop::sample::select(vec![0o755, 0o644, 0o000, 0o4755, 0o1777, 0o2711]),
        any::<bool>(),
    )
        .prop_map(|(path, what, mode, xattr)| Spec {
            path,
            what,
            mode,
            xattr,
        })
}

fn expand(s: &str, base: &Path) -> String {
    s.replace(ABS_SENTINEL, base.join("sentinel").to_str().unwrap())
        .replace(ABS_ROOT, base.join("root").to_str().unwrap())
}

/// The archive of `specs`, under `top` (the `cp` rule wants one top entry)
/// when given.
fn archive(specs: &[Spec], base: &Path, top: Option<&str>) -> Vec<u8> {
    let mut b = Builder::new(Vec::new());
    if let Some(t) = top {
        let mut h = HeaderSpec::new(t.as_bytes(), Kind::Directory);
        h.mode = 0o755;
        b.append(&h, &mut std::io::empty()).unwrap();
    }
    let xattrs = vec![
        (b"user.walt".to_vec(), b"v".to_vec()),
        (b"trusted.overlay.opaque".to_vec(), b"y".to_vec()),
    ];
    for s in specs {
        let path = expand(&s.path, base);
        let path = match top {
            Some(t) => format!("{t}/{path}"),
            None => path,
        };
        let link;
        let kind = match &s.what {
            What::File { .. } => Kind::File,
            What::Dir => Kind::Directory,
            What::Symlink(_) => Kind::Symlink,
            What::HardLink(_) => Kind::HardLink,
            What::CharDevice => Kind::CharDevice,
            What::BlockDevice => Kind::BlockDevice,
            What::Fifo => Kind::Fifo,
            What::Other(f) => Kind::Other(*f),
        };
        let mut h = HeaderSpec::new(path.as_bytes(), kind);
        h.mode = s.mode;
        h.mtime = 1_600_000_000;
        if s.xattr {
            h.xattrs = &xattrs;
        }
        let segments;
        let mut data: &[u8] = &[];
        match &s.what {
            What::File { data: d, sparse } => {
                h.size = d.len() as u64;
                data = d;
                if *sparse && d.len() >= 2 {
                    // Two segments with a hole before each.
                    let half = d.len() as u64 / 2;
                    segments = [(4096, half), (3 * 4096, d.len() as u64 - half)];
                    h.sparse = Some(&segments);
                    h.size = 3 * 4096 + d.len() as u64 - half;
                }
            }
            What::Symlink(t) | What::HardLink(t) => {
                link = expand(t, base);
                h.link = link.as_bytes();
            }
            What::CharDevice => (h.dev_major, h.dev_minor) = (1, 3),
            What::BlockDevice => (h.dev_major, h.dev_minor) = (7, 200),
            _ => {}
        }
        b.append(&h, &mut &data[..]).unwrap();
    }
    b.finish().unwrap()
}

/// One of the ways the extractor is used.
#[derive(Debug, Clone, Copy)]
struct Policy {
    whiteouts: Whiteouts,
    owners: Owners,
    devices: Devices,
    xattrs: bool,
    cp: bool,
    limit: Option<u64>,
    skip_unknown: bool,
    replace_dirs: bool,
}

/// The store's layers, `cp` into an image, `cp` out of one, the defaults.
const POLICIES: [Policy; 4] = [
    Policy {
        whiteouts: Whiteouts::Overlay,
        owners: Owners::Keep,
        devices: Devices::Create,
        xattrs: true,
        cp: false,
        limit: None,
        skip_unknown: true,
        replace_dirs: true,
    },
    Policy {
        whiteouts: Whiteouts::Keep,
        owners: Owners::Fixed { uid: 0, gid: 0 },
        devices: Devices::Refuse,
        xattrs: false,
        cp: true,
        limit: Some(4000),
        skip_unknown: false,
        replace_dirs: false,
    },
    Policy {
        whiteouts: Whiteouts::Keep,
        owners: Owners::Ignore,
        devices: Devices::Skip,
        xattrs: false,
        cp: true,
        limit: None,
        skip_unknown: false,
        replace_dirs: false,
    },
    Policy {
        whiteouts: Whiteouts::Keep,
        owners: Owners::Keep,
        devices: Devices::Create,
        xattrs: true,
        cp: false,
        limit: None,
        skip_unknown: false,
        replace_dirs: true,
    },
];

fn any_policy() -> impl Strategy<Value = Policy> {
    (
        prop::sample::select(vec![Whiteouts::Overlay, Whiteouts::Keep]),
        prop::sample::select(vec![
            Owners::Keep,
            Owners::Ignore,
            Owners::Fixed {
                uid: 1000,
                gid: 1000,
            },
        ]),
        prop::sample::select(vec![Devices::Create, Devices::Refuse, Devices::Skip]),
        any::<bool>(),
        any::<bool>(),
        prop::option::of(0u64..3000),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            |(whiteouts, owners, devices, xattrs, cp, limit, skip_unknown, replace_dirs)| Policy {
                whiteouts,
                owners,
                devices,
                xattrs,
                cp,
                limit,
                skip_unknown,
                replace_dirs,
            },
        )
}

/// Everything observable about a tree, by relative path.
fn listing(dir: &Path) -> BTreeMap<PathBuf, String> {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, String>) {
        let entries = match fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) => {
                out.insert(
                    dir.strip_prefix(base).unwrap().join("(error)"),
                    e.to_string(),
                );
                return;
            }
        };
        let mut names: Vec<_> = entries.map(|e| e.unwrap().file_name()).collect();
        names.sort();
        for n in names {
            let p = dir.join(&n);
            let m = fs::symlink_metadata(&p).unwrap();
            let ft = m.file_type();
            let what = if ft.is_symlink() {
                format!("link {:?}", fs::read_link(&p).unwrap())
            } else if ft.is_dir() {
                "dir".to_string()
            } else if ft.is_file() {
                format!("file {:?}", fs::read(&p).unwrap())
            } else if ft.is_char_device() || ft.is_block_device() {
                format!("dev {}", m.rdev())
            } else {
                "other".to_string()
            };
            let xattrs: Vec<_> = xattr::list(&p).map(|l| l.collect()).unwrap_or_default();
            out.insert(
                p.strip_prefix(base).unwrap().to_path_buf(),
                format!(
                    "{what} mode {:o} uid {} gid {} nlink {} mtime {}.{} ino {} xattrs {xattrs:?}",
                    m.mode(),
                    m.uid(),
                    m.gid(),
                    m.nlink(),
                    m.mtime(),
                    m.mtime_nsec(),
                    m.ino(),
                ),
            );
            if ft.is_dir() {
                walk(base, &p, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    let top = match fs::symlink_metadata(dir) {
        Ok(m) => format!(
            "{:?} mode {:o} mtime {}.{}",
            m.file_type(),
            m.mode(),
            m.mtime(),
            m.mtime_nsec()
        ),
        Err(e) => e.to_string(),
    };
    out.insert(PathBuf::from("."), top);
    walk(dir, dir, &mut out);
    out
}

fn make_sentinel(dir: &Path) {
    fs::create_dir(dir).unwrap();
    fs::write(dir.join("f"), b"secret").unwrap();
    fs::create_dir(dir.join("d")).unwrap();
    fs::write(dir.join("d/g"), b"secret too").unwrap();
    std::os::unix::fs::symlink("f", dir.join("l")).unwrap();
    std::os::unix::fs::symlink("/nonexistent-walt-prop", dir.join("dangling")).unwrap();
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn extract(base: &Path, specs: &[Spec], p: Policy) -> Result<(), String> {
    let root = base.join("root");
    let tar = archive(specs, base, p.cp.then_some("top"));
    let landing_root = root.clone();
    let opts = ExtractOptions {
        whiteouts: p.whiteouts,
        owners: p.owners,
        devices: p.devices,
        xattrs: p.xattrs,
        cp_top: p.cp.then(|| -> walt_tar::CpTop<'_> {
            Box::new(move |top, is_dir| {
                cp_landing(landing_root.to_str().unwrap(), &landing_root, top, is_dir)
            })
        }),
        limit: p.limit,
        skip_unknown: p.skip_unknown,
        area: "layer",
        replace_dirs: p.replace_dirs,
    };
    let mut w = PlainWriter;
    let mut r = Reader::new(&tar[..]);
    let x = Extractor::new((!p.cp).then_some(root.as_path()), opts, &mut w)
        .map_err(|e| e.to_string())?;
    x.extract(&mut r).map(drop).map_err(|e| e.to_string())
}

fn check(specs: &[Spec], policy: Policy) -> Result<(), TestCaseError> {
    let base = tempfile::tempdir().unwrap();
    let base = base.path();
    make_sentinel(&base.join("sentinel"));
    fs::create_dir(base.join("root")).unwrap();
    let before = listing(&base.join("sentinel"));
    let r = extract(base, specs, policy);
    if let Err(e) = &r {
        prop_assert!(
            !e.is_empty() && !e.contains('\n'),
            "error not one line: {:?}",
            e
        );
    }
    prop_assert_eq!(
        names(base),
        vec!["root".to_string(), "sentinel".to_string()],
        "something was created beside the root ({:?})",
        r
    );
    let after = listing(&base.join("sentinel"));
    prop_assert!(
        before == after,
        "the sentinel tree changed ({:?}): before {:#?} after {:#?}",
        r,
        before,
        after
    );
    Ok(())
}

proptest! {
    #![proptest_config(config(150))]

    #[test]
    fn prop_tar_random_archives_stay_under_the_root(
        specs in prop::collection::vec(spec(), 1..14),
        extra in any_policy(),
    ) {
        for p in POLICIES.into_iter().chain([extra]) {
            check(&specs, p)?;
        }
    }
}
