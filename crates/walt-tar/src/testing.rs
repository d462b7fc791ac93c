//! The table of hostile archives every user of the crate runs its
//! extraction against (feature `testing`).
//!
//! Every archive keeps its content under one top directory `t` (so that
//! `cp`-like users, which take one top entry, refuse them for the reason
//! tested, not for having several top entries). Links point at an
//! `outside` directory the caller creates (holding one file, `secret`);
//! [`check_outside`] asserts that nothing there changed.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::read::Kind;
use crate::write::{Builder, HeaderSpec, put_number, set_checksum};

/// When an archive of the table must be refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum When {
    Always,
    /// When whiteouts are converted to overlay form (kept as files, the
    /// name is harmless).
    OverlayWhiteouts,
    /// When device nodes are refused.
    DevicesRefused,
    /// When a byte limit below this many bytes is set (else accepted).
    LimitBelow(u64),
    /// Never: the archive is odd but safe (accepted, checked by `check`).
    Never,
}

/// What a user of the extractor does, as far as the table cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub overlay_whiteouts: bool,
    pub devices_refused: bool,
    pub limit: Option<u64>,
}

/// One hostile archive.
pub struct Hostile {
    pub name: &'static str,
    pub tar: Vec<u8>,
    pub refused: When,
    /// For accepted archives: a check of the extracted `t` directory.
    pub check: Option<fn(&Path)>,
}

impl Hostile {
    /// Whether a user with `policy` must refuse this archive.
    pub fn must_refuse(&self, policy: &Policy) -> bool {
        match self.refused {
            When::Always => true,
            When::OverlayWhiteouts => policy.overlay_whiteouts,
            When::DevicesRefused => policy.devices_refused,
            When::LimitBelow(n) => policy.limit.is_some_and(|l| l < n),
            When::Never => false,
        }
    }
}

/// Creates the `outside` directory content the table expects.
pub fn make_outside(outside: &Path) {
    fs::write(outside.join("secret"), b"s").unwrap();
}

/// Asserts nothing was written, linked or created in `outside`.
pub fn check_outside(outside: &Path, case: &str) {
    let mut names: Vec<String> = fs::read_dir(outside)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["secret"], "{case}: something was created outside");
    assert_eq!(
        fs::read(outside.join("secret")).unwrap(),
        b"s",
        "{case}: the outside file was changed"
    );
    let m = fs::metadata(outside.join("secret")).unwrap();
    assert_eq!(
        std::os::unix::fs::MetadataExt::nlink(&m),
        1,
        "{case}: the outside file was hard linked"
    );
}

struct T {
    b: Builder<Vec<u8>>,
}

impl T {
    fn new() -> Self {
        let mut t = T {
            b: Builder::new(Vec::new()),
        };
        t.dir("t");
        t
    }

    fn spec(path: &[u8], kind: Kind) -> HeaderSpec<'_> {
        let mut h = HeaderSpec::new(path, kind);
        h.mode = if kind == Kind::Directory {
            0o755
        } else {
            0o644
        };
        h.mtime = 1_600_000_000;
        h
    }

    fn dir(&mut self, p: &str) -> &mut Self {
        self.b
            .append(
                &Self::spec(p.as_bytes(), Kind::Directory),
                &mut std::io::empty(),
            )
            .unwrap();
        self
    }

    fn file(&mut self, p: &str, data: &[u8]) -> &mut Self {
        let mut h = Self::spec(p.as_bytes(), Kind::File);
        h.size = data.len() as u64;
        self.b.append(&h, &mut &data[..]).unwrap();
        self
    }

    fn link(&mut self, kind: Kind, p: &str, target: &str) -> &mut Self {
        let mut h = Self::spec(p.as_bytes(), kind);
        h.link = target.as_bytes();
        self.b.append(&h, &mut std::io::empty()).unwrap();
        self
    }

    fn device(&mut self, p: &str) -> &mut Self {
        let mut h = Self::spec(p.as_bytes(), Kind::CharDevice);
        h.dev_major = 1;
        h.dev_minor = 3;
        self.b.append(&h, &mut std::io::empty()).unwrap();
        self
    }

    /// A raw header block: `flag`, `size` claimed, `name`.
    fn raw(&mut self, name: &[u8], flag: u8, size: u64) -> &mut Self {
        let mut h = [0u8; 512];
        h[..name.len()].copy_from_slice(name);
        put_number(&mut h[100..108], 0o644);
        put_number(&mut h[108..116], 0);
        put_number(&mut h[116..124], 0);
        put_number(&mut h[124..136], size);
        put_number(&mut h[136..148], 0);
        h[156] = flag;
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        set_checksum(&mut h);
        self.b.get_mut().write_all(&h).unwrap();
        self
    }

    fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.b.get_mut().write_all(b).unwrap();
        self
    }

    fn finish(&mut self) -> Vec<u8> {
        let b = std::mem::replace(&mut self.b, Builder::new(Vec::new()));
        b.finish().unwrap()
    }
}

/// A PAX record set with one record.
fn pax_record(key: &str, value: &[u8]) -> Vec<u8> {
    let body = key.len() + value.len() + 3;
    let mut len = body + 1;
    while body + len.to_string().len() != len {
        len = body + len.to_string().len();
    }
    let mut out = format!("{len} {key}=").into_bytes();
    out.extend_from_slice(value);
    out.push(b'\n');
    out
}

fn padded(mut v: Vec<u8>) -> Vec<u8> {
    v.resize(v.len().div_ceil(512) * 512, 0);
    v
}

const GIB: u64 = 1 << 30;

/// The table. `outside` is an absolute path to a directory made with
/// [`make_outside`].
pub fn hostile_archives(outside: &Path) -> Vec<Hostile> {
    let out = outside.to_str().expect("a UTF-8 path");
    let secret = format!("{out}/secret");
    let mut v = Vec::new();
    let mut add = |name, tar, refused, check| {
        v.push(Hostile {
            name,
            tar,
            refused,
            check,
        })
    };
    add(
        "dotdot",
        T::new().file("t/../../x", b"evil").finish(),
        When::Always,
        None,
    );
    add(
        "absolute path",
        T::new().file("/x-walt-hostile", b"evil").finish(),
        When::Always,
        None,
    );
    add(
        "symlink out, then a file through it",
        T::new()
            .link(Kind::Symlink, "t/l", out)
            .file("t/l/x", b"evil")
            .finish(),
        When::Always,
        None,
    );
    add(
        "symlink out, then a directory through it",
        T::new()
            .link(Kind::Symlink, "t/l", out)
            .dir("t/l/d")
            .finish(),
        When::Always,
        None,
    );
    add(
        "directory replaced by a symlink out, then a file in it",
        T::new()
            .dir("t/a")
            .link(Kind::Symlink, "t/a", out)
            .file("t/a/x", b"evil")
            .finish(),
        When::Always,
        None,
    );
    add(
        "relative symlink out, then a file through it",
        T::new()
            .link(Kind::Symlink, "t/up", "../../../../../../../../..")
            .file(&format!("t/up{out}/x"), b"evil")
            .finish(),
        When::Always,
        None,
    );
    add(
        "hard link out (relative)",
        T::new()
            .link(Kind::HardLink, "t/h", "t/../../../../../../../../..")
            .finish(),
        When::Always,
        None,
    );
    add(
        "hard link out (absolute)",
        T::new().link(Kind::HardLink, "t/h", &secret).finish(),
        When::Always,
        None,
    );
    add(
        "hard link through a symlink",
        T::new()
            .link(Kind::Symlink, "t/l", out)
            .link(Kind::HardLink, "t/h", "t/l/secret")
            .finish(),
        When::Always,
        None,
    );
    add(
        "hard link to a directory",
        T::new()
            .dir("t/d")
            .link(Kind::HardLink, "t/h", "t/d")
            .finish(),
        When::Always,
        None,
    );
    add(
        "hard link to a missing file",
        T::new().link(Kind::HardLink, "t/h", "t/missing").finish(),
        When::Always,
        None,
    );
    add(
        "whiteout of ..",
        T::new().file("t/.wh..", b"").finish(),
        When::OverlayWhiteouts,
        None,
    );
    add(
        ".wh. alone",
        T::new().file("t/.wh.", b"").finish(),
        When::OverlayWhiteouts,
        None,
    );
    add(
        "whiteout through a symlink",
        T::new()
            .link(Kind::Symlink, "t/l", out)
            .file("t/l/.wh.secret", b"")
            .finish(),
        When::Always,
        None,
    );
    add(
        "opaque marker through a symlink",
        T::new()
            .link(Kind::Symlink, "t/l", out)
            .file("t/l/.wh..wh..opq", b"")
            .finish(),
        When::Always,
        None,
    );
    add(
        "device node",
        T::new().device("t/null").finish(),
        When::DevicesRefused,
        None,
    );
    add(
        "PAX header claiming 100 GiB",
        T::new()
            .raw(b"PaxHeaders/x", b'x', 100 * GIB)
            .bytes(&[b'9'; 4096])
            .finish(),
        When::Always,
        None,
    );
    add(
        "GNU long name claiming 100 GiB",
        T::new()
            .raw(b"././@LongLink", b'L', 100 * GIB)
            .bytes(&[b'a'; 4096])
            .finish(),
        When::Always,
        None,
    );
    add(
        "GNU long link claiming 100 GiB",
        T::new()
            .raw(b"././@LongLink", b'K', 100 * GIB)
            .bytes(&[b'a'; 4096])
            .finish(),
        When::Always,
        None,
    );
    add(
        "PAX global header claiming 100 GiB",
        T::new().raw(b"pax_global_header", b'g', 100 * GIB).finish(),
        When::Always,
        None,
    );
    add(
        "PAX header just over 64 KiB",
        {
            let rec = pax_record("comment", &vec![b'c'; 64 * 1024]);
            let n = rec.len() as u64;
            T::new()
                .raw(b"PaxHeaders/x", b'x', n)
                .bytes(&padded(rec))
                .file("t/f", b"x")
                .finish()
        },
        When::Always,
        None,
    );
    add(
        "100 PAX headers of 60 KiB before one entry",
        {
            let rec = pax_record("SCHILY.xattr.user.x", &vec![b'x'; 60 * 1024]);
            let n = rec.len() as u64;
            let block = padded(rec);
            let mut t = T::new();
            for _ in 0..100 {
                t.raw(b"PaxHeaders/x", b'x', n).bytes(&block);
            }
            t.file("t/f", b"x").finish()
        },
        When::Always,
        None,
    );
    add(
        "PAX path with ..",
        {
            let rec = pax_record("path", b"t/../../x");
            let n = rec.len() as u64;
            T::new()
                .raw(b"PaxHeaders/x", b'x', n)
                .bytes(&padded(rec))
                .file("t/harmless", b"evil")
                .finish()
        },
        When::Always,
        None,
    );
    add(
        "GNU long name with ..",
        {
            let name = format!("t/{}/../../../x\0", "d".repeat(120)).into_bytes();
            let n = name.len() as u64;
            T::new()
                .raw(b"././@LongLink", b'L', n)
                .bytes(&padded(name))
                .file("t/harmless", b"evil")
                .finish()
        },
        When::Always,
        None,
    );
    add(
        "bad checksum",
        {
            let mut t = T::new().file("t/f", b"data").finish();
            t[512 + 148] ^= 1;
            t
        },
        When::Always,
        None,
    );
    add(
        "truncated in a file's data",
        {
            let mut t = T::new().file("t/f", &[1u8; 5000]).finish();
            t.truncate(512 + 512 + 1000);
            t
        },
        When::Always,
        None,
    );
    add(
        "sparse bomb (1 TiB of holes)",
        {
            // Old GNU sparse header: one 4 KiB segment at the end of 1 TiB.
            let tib: u64 = 1 << 40;
            let mut h = [0u8; 512];
            h[..6].copy_from_slice(b"t/bomb");
            put_number(&mut h[100..108], 0o644);
            put_number(&mut h[108..116], 0);
            put_number(&mut h[116..124], 0);
            put_number(&mut h[124..136], 4096);
            put_number(&mut h[136..148], 0);
            h[156] = b'S';
            h[257..263].copy_from_slice(b"ustar ");
            h[263..265].copy_from_slice(b" \0");
            put_number(&mut h[386..398], tib - 4096);
            put_number(&mut h[398..410], 4096);
            put_number(&mut h[483..495], tib);
            set_checksum(&mut h);
            T::new().bytes(&h).bytes(&[7u8; 4096]).finish()
        },
        When::LimitBelow(1 << 40),
        Some(|t: &Path| {
            let m = fs::metadata(t.join("bomb")).unwrap();
            assert_eq!(m.len(), 1 << 40, "sparse bomb: logical size");
            let blocks = std::os::unix::fs::MetadataExt::blocks(&m);
            assert!(
                blocks * 512 < 1 << 20,
                "sparse bomb: holes were written ({blocks} blocks)"
            );
        }),
    );
    add(
        "PAX sparse map claiming too many segments",
        {
            let mut recs = pax_record("GNU.sparse.major", b"1");
            recs.extend(pax_record("GNU.sparse.minor", b"0"));
            recs.extend(pax_record("GNU.sparse.name", b"t/s"));
            recs.extend(pax_record("GNU.sparse.realsize", b"1000000"));
            let n = recs.len() as u64;
            let map = padded(b"99999999999\n".to_vec());
            T::new()
                .raw(b"PaxHeaders/x", b'x', n)
                .bytes(&padded(recs))
                .raw(b"t/GNUSparseFile.0/s", b'0', map.len() as u64)
                .bytes(&map)
                .finish()
        },
        When::Always,
        None,
    );
    add(
        "deep nesting (3000 levels)",
        {
            let mut t = T::new();
            let mut p = String::from("t");
            for _ in 0..3000 {
                p.push_str("/d");
                t.dir(&p);
            }
            p.push_str("/f");
            t.file(&p, b"deep");
            t.finish()
        },
        When::Never,
        Some(|t: &Path| {
            // Walk down by name: the path is longer than PATH_MAX.
            let mut depth = 0;
            let mut cur = fs::File::open(t).unwrap();
            loop {
                let next = nix::fcntl::openat(
                    &cur,
                    "d",
                    nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_DIRECTORY,
                    nix::sys::stat::Mode::empty(),
                );
                match next {
                    Ok(fd) => {
                        cur = fs::File::from(fd);
                        depth += 1;
                    }
                    Err(_) => break,
                }
            }
            assert_eq!(depth, 3000, "deep nesting: depth");
            let f = nix::fcntl::openat(
                &cur,
                "f",
                nix::fcntl::OFlag::O_RDONLY,
                nix::sys::stat::Mode::empty(),
            )
            .expect("deep nesting: the deepest file");
            let mut s = String::new();
            std::io::Read::read_to_string(&mut fs::File::from(f), &mut s).unwrap();
            assert_eq!(s, "deep");
        }),
    );
    add(
        "over a byte limit (2 x 600 KiB)",
        T::new()
            .file("t/a", &vec![1u8; 600 * 1024])
            .file("t/b", &vec![2u8; 600 * 1024])
            .finish(),
        When::LimitBelow(1200 * 1024),
        None,
    );
    v
}

/// Runs the table: `extract(case, tar)` extracts into a fresh destination
/// and returns the directory where `t` landed (or the error text).
pub fn run_hostile_table(
    policy: Policy,
    mut extract: impl FnMut(&Hostile, &[u8]) -> Result<PathBuf, String>,
) {
    let outside = tempfile_dir();
    make_outside(&outside);
    for case in hostile_archives(&outside) {
        let r = extract(&case, &case.tar);
        let refused = case.must_refuse(&policy);
        match r {
            Err(e) if refused => {
                assert!(!e.is_empty(), "{}: empty error", case.name);
                assert!(
                    !e.contains('\n') || e.trim_end().lines().count() == 1,
                    "{}: error is not one line: {e}",
                    case.name
                );
            }
            Err(e) => panic!("{}: refused: {e}", case.name),
            Ok(_) if refused => panic!("{}: accepted", case.name),
            Ok(t) => {
                if let Some(check) = case.check {
                    check(&t.join("t"));
                }
            }
        }
        check_outside(&outside, case.name);
        assert!(
            !Path::new("/x-walt-hostile").exists(),
            "{}: wrote at the root",
            case.name
        );
    }
    let _ = fs::remove_dir_all(&outside);
}

fn tempfile_dir() -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let p = std::env::temp_dir().join(format!(
        "walt-tar-outside-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    fs::create_dir_all(&p).unwrap();
    p
}
