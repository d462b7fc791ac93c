//! Layer cache keys.
//!
//! The key of a step is a sha256 over: its parent (the chain id of the
//! layers below, or the base image digest, or `scratch`), its instruction
//! text after expansion, and for COPY/ADD the digest of its inputs
//! ([`digest_inputs`]): for every entry, its path relative to the source,
//! type, mode (after `--chmod`), owner (after `--chown`), link target,
//! device numbers and the sha256 of its content. Not the mtime, as docker.
//! Every field is length-prefixed, entries come in a fixed (sorted) order:
//! the key depends on the tree, not on how the directory lists it.

use std::fmt;
use std::io::{self, Read};
use std::os::fd::AsFd;
use std::path::Path;

use rustix::fs::{FileType, Mode, OFlags, ResolveFlags, Stat};
use sha2::{Digest, Sha256};

use crate::context::{self, ContextError, Source, SourceKind, Walked};

/// A sha256 key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CacheKey(pub [u8; 32]);

impl CacheKey {
    /// `sha256:<hex>`.
    pub fn digest(&self) -> String {
        format!("sha256:{self}")
    }
}

impl fmt::Display for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// What COPY/ADD change in the metadata of what they copy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InputMeta {
    /// `--chown`, resolved to numbers.
    pub chown: Option<(u32, u32)>,
    /// `--chmod`.
    pub chmod: Option<u32>,
}

fn field(h: &mut Sha256, b: &[u8]) {
    h.update((b.len() as u64).to_le_bytes());
    h.update(b);
}

/// The key of a step.
pub fn step_key(parent: &str, instruction: &str, inputs: Option<&CacheKey>) -> CacheKey {
    let mut h = Sha256::new();
    field(&mut h, b"walt-build cache key v1");
    field(&mut h, parent.as_bytes());
    field(&mut h, instruction.as_bytes());
    match inputs {
        Some(i) => field(&mut h, &i.0),
        None => field(&mut h, b""),
    }
    CacheKey(h.finalize().into())
}

/// Size of the buffer content is hashed through.
const HASH_BUF: usize = 256 * 1024;

/// The sha256 of a reader's content, streamed.
pub fn hash_reader(r: &mut dyn Read, buf: &mut [u8]) -> io::Result<([u8; 32], u64)> {
    let mut h = Sha256::new();
    let mut n = 0u64;
    loop {
        match r.read(buf) {
            Ok(0) => break,
            Ok(k) => {
                h.update(&buf[..k]);
                n += k as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok((h.finalize().into(), n))
}

struct Hasher {
    h: Sha256,
    buf: Vec<u8>,
    meta: InputMeta,
    link: Vec<u8>,
}

impl Hasher {
    /// One entry: path, type, mode, owner, then what the type has.
    fn entry(&mut self, rel: &[u8], w: &Walked<'_>) -> Result<(), ContextError> {
        let st: &Stat = w.st;
        let ft = context::file_type(st);
        let (tag, data): (u8, Option<[u8; 32]>) = match ft {
            FileType::RegularFile => {
                let Some((mut f, _)) =
                    context::open_regular(w.dir, w.name).map_err(|e| read_err(w.rel, e))?
                else {
                    return Ok(());
                };
                let (d, _) = hash_reader(&mut f, &mut self.buf).map_err(|e| read_err(w.rel, e))?;
                (b'f', Some(d))
            }
            FileType::Directory => (b'd', None),
            FileType::Symlink => {
                self.link = rustix::fs::readlinkat(w.dir, w.name, std::mem::take(&mut self.link))
                    .map_err(|e| read_err(w.rel, e.into()))?
                    .into_bytes();
                (b'l', None)
            }
            FileType::Fifo => (b'p', None),
            FileType::Socket => (b's', None),
            FileType::CharacterDevice => (b'c', None),
            FileType::BlockDevice => (b'b', None),
            FileType::Unknown => (b'?', None),
        };
        let h = &mut self.h;
        field(h, rel);
        h.update([tag]);
        let mode = match (self.meta.chmod, ft) {
            (_, FileType::Symlink) => 0o777,
            (Some(m), _) => m & 0o7777,
            (None, _) => st.st_mode & 0o7777,
        };
        h.update(mode.to_le_bytes());
        let (uid, gid) = self.meta.chown.unwrap_or((st.st_uid, st.st_gid));
        h.update(uid.to_le_bytes());
        h.update(gid.to_le_bytes());
        match ft {
            FileType::Symlink => field(h, &self.link),
            FileType::CharacterDevice | FileType::BlockDevice => {
                h.update(rustix::fs::major(st.st_rdev).to_le_bytes());
                h.update(rustix::fs::minor(st.st_rdev).to_le_bytes());
            }
            _ => {}
        }
        if let Some(d) = data {
            h.update(d);
        }
        Ok(())
    }
}

fn read_err(rel: &[u8], source: io::Error) -> ContextError {
    ContextError::Read {
        path: if rel.is_empty() {
            ".".into()
        } else {
            String::from_utf8_lossy(rel).into_owned()
        },
        source,
    }
}

/// The digest of the inputs of a COPY/ADD: the sources (from
/// [`context::resolve_sources`] on the same `root`), in order, each a
/// file (under its own name) or a directory (its content, walked without
/// following symlinks, in byte order), with the metadata as it will be
/// copied. File content is streamed through a fixed buffer.
pub fn digest_inputs(
    root: &Path,
    sources: &[Source],
    meta: InputMeta,
) -> Result<CacheKey, ContextError> {
    let root_fd = rustix::fs::open(
        root,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| read_err(b"", e.into()))?;
    let mut hs = Hasher {
        h: Sha256::new(),
        buf: vec![0; HASH_BUF],
        meta,
        link: Vec::new(),
    };
    field(&mut hs.h, b"walt-build inputs v1");
    for s in sources {
        let rel = context::path_bytes(&s.rel);
        let open_rel: &[u8] = if rel.is_empty() { b"." } else { rel };
        match s.kind {
            SourceKind::Dir => {
                field(&mut hs.h, b"dir");
                let fd = rustix::fs::openat2(
                    root_fd.as_fd(),
                    open_rel,
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                    Mode::empty(),
                    ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS,
                )
                .map_err(|e| read_err(rel, e.into()))?;
                let st = rustix::fs::fstat(&fd).map_err(|e| read_err(rel, e.into()))?;
                // The directory itself: its metadata lands on the destination.
                let top = Walked {
                    rel: b"",
                    dir: fd.as_fd(),
                    name: b".",
                    st: &st,
                };
                hs.entry(b"", &top)?;
                context::walk(fd, &mut |w| {
                    hs.entry(w.rel, w)?;
                    Ok(true)
                })?;
            }
            SourceKind::File | SourceKind::Other => {
                field(&mut hs.h, b"file");
                let (parent, name) = match rel.iter().rposition(|&c| c == b'/') {
                    Some(i) => (&rel[..i], &rel[i + 1..]),
                    None => (&b"."[..], rel),
                };
                let dir = rustix::fs::openat2(
                    root_fd.as_fd(),
                    parent,
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                    Mode::empty(),
                    ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS,
                )
                .map_err(|e| read_err(rel, e.into()))?;
                let st = rustix::fs::statat(&dir, name, rustix::fs::AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(|e| read_err(rel, e.into()))?;
                let w = Walked {
                    rel,
                    dir: dir.as_fd(),
                    name,
                    st: &st,
                };
                hs.entry(name, &w)?;
            }
        }
    }
    Ok(CacheKey(hs.h.finalize().into()))
}
