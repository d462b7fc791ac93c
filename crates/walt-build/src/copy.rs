//! The tar stream of a COPY or ADD: what the build engine sends to the
//! sandbox job that places it in the image (`Job::Place`).
//!
//! Sources come from [`crate::context::resolve_sources`]; they are walked
//! with the context's own walker (never following a symlink, names in
//! byte order) into one stream, so that hard links between sources stay
//! links. [`open_archive`] tells whether an ADD of a local file unpacks it.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::Path;

use rustix::fs::{FileType, Mode, OFlags, ResolveFlags, Stat};
use walt_core::text::one_line;
use walt_tar::{Builder, HeaderSpec, Kind};

use crate::context::{ContextError, Source, SourceKind, Walked, file_type, open_regular, walk};

/// What a special file is, for the message refusing it; None for what a
/// COPY carries.
fn special(ft: FileType) -> Option<&'static str> {
    match ft {
        FileType::Fifo => Some("a FIFO"),
        FileType::Socket => Some("a socket"),
        FileType::CharacterDevice => Some("a character device"),
        FileType::BlockDevice => Some("a block device"),
        _ => None,
    }
}

fn refused(src: &Source, rel: &[u8], what: &str) -> ContextError {
    let shown = if rel.is_empty() {
        one_line(&src.src).into_owned()
    } else {
        let mut p = src.rel.as_os_str().as_bytes().to_vec();
        if !p.is_empty() {
            p.push(b'/');
        }
        p.extend_from_slice(rel);
        one_line(&String::from_utf8_lossy(&p)).into_owned()
    };
    ContextError::BadSource {
        src: one_line(&src.src).into_owned(),
        why: format!("'{shown}' is {what}, which COPY and ADD cannot copy"),
    }
}

fn read_err(src: &Source, rel: &[u8], source: io::Error) -> ContextError {
    let mut p = src.rel.as_os_str().as_bytes().to_vec();
    if !rel.is_empty() {
        if !p.is_empty() {
            p.push(b'/');
        }
        p.extend_from_slice(rel);
    }
    let path = if p.is_empty() {
        ".".to_string()
    } else {
        one_line(&String::from_utf8_lossy(&p)).into_owned()
    };
    ContextError::Read { path, source }
}

/// The stream being written, with what it needs across sources.
struct CopyTar<W: Write> {
    b: Builder<W>,
    chmod: Option<u32>,
    /// Files with several links already written: (dev, ino) -> name.
    linked: HashMap<(u64, u64), Vec<u8>>,
    link: Vec<u8>,
    /// The xattrs of the current file, and a buffer for reading them.
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    xbuf: Vec<u8>,
    keep_owners: bool,
}

impl<W: Write> CopyTar<W> {
    fn spec<'a>(&self, path: &'a [u8], kind: Kind, st: &Stat) -> HeaderSpec<'a> {
        let mut h = HeaderSpec::new(path, kind);
        h.mode = self.chmod.unwrap_or(st.st_mode & 0o7777);
        if self.keep_owners {
            h.uid = u64::from(st.st_uid);
            h.gid = u64::from(st.st_gid);
        }
        h.mtime = st.st_mtime;
        h.mtime_nsec = st.st_mtime_nsec as u32;
        h
    }

    /// Reads the xattrs of a file to copy (file capabilities...), never
    /// overlay's own.
    fn read_xattrs(&mut self, f: &File) -> io::Result<()> {
        use rustix::io::Errno;
        self.xattrs.clear();
        if self.xbuf.is_empty() {
            // XATTR_LIST_MAX and XATTR_SIZE_MAX: no ERANGE below.
            self.xbuf = vec![0u8; 64 * 1024];
        }
        let n = match rustix::fs::flistxattr(f, &mut self.xbuf[..]) {
            Ok(n) => n,
            Err(Errno::OPNOTSUPP) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        if n == 0 {
            return Ok(());
        }
        let names = self.xbuf[..n].to_vec();
        for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
            if name.starts_with(walt_tar::OVERLAY_XATTR_PREFIX) {
                continue;
            }
            let c = std::ffi::CString::new(name).map_err(io::Error::other)?;
            let m = match rustix::fs::fgetxattr(f, c.as_c_str(), &mut self.xbuf[..]) {
                Ok(m) => m,
                Err(Errno::NODATA) => continue,
                Err(e) => return Err(e.into()),
            };
            self.xattrs.push((name.to_vec(), self.xbuf[..m].to_vec()));
        }
        self.xattrs.sort();
        Ok(())
    }

    /// One walked entry (`name` in `dir`), written as `path`; true when it
    /// is a directory to go into.
    fn entry(
        &mut self,
        src: &Source,
        rel: &[u8],
        path: &[u8],
        w: &Walked<'_>,
    ) -> Result<bool, ContextError> {
        let ft = file_type(w.st);
        if let Some(what) = special(ft) {
            return Err(refused(src, rel, what));
        }
        match ft {
            FileType::Directory => {
                let h = self.spec(path, Kind::Directory, w.st);
                self.b
                    .append(&h, &mut io::empty())
                    .map_err(ContextError::Write)?;
                Ok(true)
            }
            FileType::Symlink => {
                let link = std::mem::take(&mut self.link);
                self.link = rustix::fs::readlinkat(w.dir, w.name, link)
                    .map_err(|e| read_err(src, rel, e.into()))?
                    .into_bytes();
                let mut h = self.spec(path, Kind::Symlink, w.st);
                h.link = &self.link;
                self.b
                    .append(&h, &mut io::empty())
                    .map_err(ContextError::Write)?;
                Ok(false)
            }
            _ => {
                if w.st.st_nlink > 1 {
                    let id = (w.st.st_dev, w.st.st_ino);
                    if let Some(first) = self.linked.get(&id) {
                        let mut h = self.spec(path, Kind::HardLink, w.st);
                        h.link = first;
                        self.b
                            .append(&h, &mut io::empty())
                            .map_err(ContextError::Write)?;
                        return Ok(false);
                    }
                    self.linked.insert(id, path.to_vec());
                }
                let Some((f, st)) =
                    open_regular(w.dir, w.name).map_err(|e| read_err(src, rel, e))?
                else {
                    return Err(refused(src, rel, "no longer a regular file"));
                };
                self.read_xattrs(&f).map_err(|e| read_err(src, rel, e))?;
                let mut h = self.spec(path, Kind::File, &st);
                h.size = st.st_size as u64;
                h.xattrs = &self.xattrs;
                let mut data = crate::context::ReadErr {
                    inner: f.take(h.size),
                    err: None,
                };
                self.b.append(&h, &mut data).map_err(ContextError::Write)?;
                if let Some(e) = data.err {
                    return Err(read_err(src, rel, e));
                }
                Ok(false)
            }
        }
    }
}

/// Opens a resolved source below `root` (never through a symlink).
fn open_source(root: &OwnedFd, src: &Source, flags: OFlags) -> Result<OwnedFd, ContextError> {
    let rel = src.rel.as_os_str().as_bytes();
    let rel: &[u8] = if rel.is_empty() { b"." } else { rel };
    rustix::fs::openat2(
        root,
        rel,
        flags | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
    )
    .map_err(|e| read_err(src, b"", e.into()))
}

/// Writes the tar a COPY/ADD of `sources` (resolved by
/// [`crate::context::resolve_sources`] on `root`) sends to the sandbox: a
/// directory source contributes its content (entries relative to it,
/// walked without following symlinks, names in byte order), a file source
/// one entry under its own name. Entries are owned by 0:0 (no user or
/// group names), modes as on disk or `chmod` (every entry, files and
/// directories, as buildkit does), mtimes kept, symlinks as symlinks,
/// further names of a file as hard links, the xattrs of regular files kept
/// (not overlay's); FIFOs, sockets and devices are refused. Later sources are written after earlier ones (extraction makes
/// the later win).
pub fn write_copy_tar<W: Write>(
    out: W,
    root: &Path,
    sources: &[Source],
    chmod: Option<u32>,
) -> Result<W, ContextError> {
    write_tar(out, root, sources, chmod, false)
}

/// [`write_copy_tar`] keeping the owners (uid and gid) the files have:
/// `COPY --from` another stage or image keeps them, as docker does.
pub fn write_copy_tar_keeping_owners<W: Write>(
    out: W,
    root: &Path,
    sources: &[Source],
    chmod: Option<u32>,
) -> Result<W, ContextError> {
    write_tar(out, root, sources, chmod, true)
}

fn write_tar<W: Write>(
    out: W,
    root: &Path,
    sources: &[Source],
    chmod: Option<u32>,
    keep_owners: bool,
) -> Result<W, ContextError> {
    let root_fd = rustix::fs::open(
        root,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| ContextError::Read {
        path: ".".into(),
        source: e.into(),
    })?;
    let mut t = CopyTar {
        b: Builder::new(out),
        chmod,
        linked: HashMap::new(),
        link: Vec::new(),
        xattrs: Vec::new(),
        xbuf: Vec::new(),
        keep_owners,
    };
    for src in sources {
        match src.kind {
            SourceKind::Dir => {
                let dir = open_source(&root_fd, src, OFlags::RDONLY | OFlags::DIRECTORY)?;
                walk(dir, &mut |w| t.entry(src, w.rel, w.rel, w))?;
            }
            SourceKind::File | SourceKind::Other => {
                // Through its parent, as a walk would meet it.
                let rel = src.rel.as_os_str().as_bytes();
                let (parent, name) = match rel.iter().rposition(|&b| b == b'/') {
                    Some(i) => (&rel[..i], &rel[i + 1..]),
                    None => (&b""[..], rel),
                };
                let parent_src = Source {
                    src: src.src.clone(),
                    rel: Path::new(std::ffi::OsStr::from_bytes(parent)).to_path_buf(),
                    kind: SourceKind::Dir,
                    name: Default::default(),
                };
                let dir = open_source(&root_fd, &parent_src, OFlags::RDONLY | OFlags::DIRECTORY)?;
                let st = rustix::fs::statat(&dir, name, rustix::fs::AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(|e| read_err(src, b"", e.into()))?;
                let w = Walked {
                    rel: name,
                    dir: dir.as_fd(),
                    name,
                    st: &st,
                };
                // Under the name it was matched by (a symlink's own name).
                t.entry(src, b"", src.file_name().as_bytes(), &w)?;
            }
        }
    }
    t.b.finish().map_err(ContextError::Write)
}

/// A `--chmod` value: octal digits (`755`, `0644`), at most `07777`;
/// anything else (symbolic modes) is refused naming it.
pub fn parse_chmod(s: &str) -> Result<u32, ContextError> {
    let bad = || ContextError::BadSource {
        src: format!("--chmod={}", one_line(s)),
        why: "only octal modes are supported (such as 755 or 0644)".to_string(),
    };
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
        return Err(bad());
    }
    let m = u32::from_str_radix(s, 8).map_err(|_| bad())?;
    if m > 0o7777 {
        return Err(bad());
    }
    Ok(m)
}

const TAR_BLOCK: usize = 512;

/// Does this block start a tar archive (a header whose checksum holds, as
/// Go's archive/tar checks it: unsigned or signed sum)?
fn is_tar_header(b: &[u8; TAR_BLOCK]) -> bool {
    if b.iter().all(|&x| x == 0) {
        return false;
    }
    let field = &b[148..156];
    let digits: Vec<u8> = field
        .iter()
        .copied()
        .skip_while(|&c| c == b' ' || c == 0)
        .take_while(|&c| (b'0'..=b'7').contains(&c))
        .collect();
    if digits.is_empty() {
        return false;
    }
    let Ok(want) = i64::from_str_radix(std::str::from_utf8(&digits).unwrap_or(""), 8) else {
        return false;
    };
    let (mut unsigned, mut signed) = (0i64, 0i64);
    for (i, &c) in b.iter().enumerate() {
        let c = if (148..156).contains(&i) { b' ' } else { c };
        unsigned += i64::from(c);
        signed += i64::from(c as i8);
    }
    want == unsigned || want == signed
}

/// Reads `buf.len()` bytes, fewer only at the end of the stream.
fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// ADD of a local file: when it is a tar archive, plain or compressed with
/// gzip, bzip2, xz or zstd (told by content, as docker does: the magic
/// bytes, then a valid first tar header), a reader of the uncompressed
/// tar; else None (the file is copied as it is).
pub fn open_archive(file: File) -> io::Result<Option<Box<dyn Read + Send>>> {
    let mut magic = [0u8; 6];
    let mut n = 0;
    while n < magic.len() {
        match file.read_at(&mut magic[n..], n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let magic = &magic[..n];
    let mut file = file;
    io::Seek::seek(&mut file, io::SeekFrom::Start(0))?;
    let buffered = io::BufReader::with_capacity(256 * 1024, file);
    let mut stream: Box<dyn Read + Send> = if magic.starts_with(&[0x1f, 0x8b, 0x08]) {
        Box::new(flate2::read::MultiGzDecoder::new(buffered))
    } else if magic.starts_with(b"BZh") {
        Box::new(bzip2::read::MultiBzDecoder::new(buffered))
    } else if magic.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0x00]) {
        Box::new(xz2::read::XzDecoder::new_multi_decoder(buffered))
    } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Box::new(zstd::stream::read::Decoder::with_buffer(buffered)?)
    } else {
        Box::new(buffered)
    };
    let mut head = [0u8; TAR_BLOCK];
    // A stream that does not decompress is not an archive: copied as is.
    match read_full(&mut stream, &mut head) {
        Ok(TAR_BLOCK) if is_tar_header(&head) => {}
        _ => return Ok(None),
    }
    Ok(Some(Box::new(io::Cursor::new(head).chain(stream))))
}
