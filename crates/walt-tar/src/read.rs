//! A streaming tar reader in bounded memory.
//!
//! Headers are read one 512-byte block at a time; the data of an entry is
//! read by the caller through [`Reader`]'s `Read` implementation (straight
//! into the caller's buffer) or skipped. Metadata records (PAX extended
//! headers, GNU long names and links, sparse maps) are read whole, but only
//! after their claimed size was checked against [`MAX_META`].

use std::io::{self, Read};

use crate::MAX_META;
use crate::error::{Error, Result, lossy};

const BLOCK: usize = 512;
/// Most bytes of extended headers (PAX records, long name, long link)
/// accepted before one entry.
const MAX_META_TOTAL: u64 = 4 * MAX_META;
/// Most sparse segments accepted for one entry.
const MAX_SPARSE_SEGMENTS: usize = 65_536;

/// The type of an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A regular file (also contiguous files and GNU sparse files).
    File,
    /// A hard link to an earlier entry ([`Entry::link`]).
    HardLink,
    Symlink,
    CharDevice,
    BlockDevice,
    Directory,
    Fifo,
    /// Any other type flag (GNU volume labels, multi-volume parts...).
    Other(u8),
}

impl Kind {
    fn from_flag(f: u8) -> Kind {
        match f {
            b'0' | 0 | b'7' | b'S' => Kind::File,
            b'1' => Kind::HardLink,
            b'2' => Kind::Symlink,
            b'3' => Kind::CharDevice,
            b'4' => Kind::BlockDevice,
            b'5' | b'D' => Kind::Directory,
            b'6' => Kind::Fifo,
            other => Kind::Other(other),
        }
    }
}

/// One entry's metadata, with every extension (PAX records, GNU long
/// names) applied.
#[derive(Debug, Default, Clone)]
pub struct Entry {
    /// The name as in the archive (not normalised).
    pub path: Vec<u8>,
    /// Link target (hard and symbolic links).
    pub link: Vec<u8>,
    pub kind: Option<Kind>,
    /// Permission bits (`& 0o7777`).
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub mtime: i64,
    pub mtime_nsec: u32,
    /// Logical size of a regular file (of a sparse file: with its holes).
    pub size: u64,
    pub dev_major: u32,
    pub dev_minor: u32,
    /// `SCHILY.xattr.*` records: (name, value).
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// Sparse files: the (offset, length) of each data segment, in order;
    /// the data read from the entry is their concatenation.
    pub sparse: Option<Vec<(u64, u64)>>,
    /// Offset of the entry's (first) header in the archive.
    pub offset: u64,
}

impl Entry {
    /// The entry's kind (a returned entry always has one).
    pub fn kind(&self) -> Kind {
        self.kind.unwrap_or(Kind::Other(0))
    }
}

/// Extensions gathered from PAX and GNU headers before the entry they
/// apply to.
#[derive(Default)]
struct Pending {
    path: Option<Vec<u8>>,
    link: Option<Vec<u8>>,
    size: Option<u64>,
    uid: Option<u64>,
    gid: Option<u64>,
    mtime: Option<(i64, u32)>,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// PAX sparse: `GNU.sparse.major`/`minor`.
    sparse_major: Option<u64>,
    sparse_minor: Option<u64>,
    sparse_name: Option<Vec<u8>>,
    sparse_realsize: Option<u64>,
    /// PAX sparse 0.0 (`offset`/`numbytes` pairs) and 0.1 (`map`).
    sparse_map: Vec<u64>,
    any: bool,
}

/// Reads the entries of a tar stream one by one.
pub struct Reader<R> {
    inner: R,
    /// Bytes consumed from `inner`.
    pos: u64,
    /// Data bytes of the current entry not yet read.
    remaining: u64,
    /// Padding after the current entry's data.
    padding: u64,
    entry: Entry,
    /// Name of the previous entry (for errors about a header before the
    /// next name is known).
    prev: Vec<u8>,
    pending: Pending,
    meta_buf: Vec<u8>,
    done: bool,
}

impl<R: Read> Reader<R> {
    pub fn new(inner: R) -> Self {
        Reader {
            inner,
            pos: 0,
            remaining: 0,
            padding: 0,
            entry: Entry::default(),
            prev: Vec::new(),
            pending: Pending::default(),
            meta_buf: Vec::new(),
            done: false,
        }
    }

    /// The underlying reader.
    pub fn into_inner(self) -> R {
        self.inner
    }

    /// Bytes of the archive consumed so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// The current entry (after [`Reader::next_entry`] returned true).
    pub fn entry(&self) -> &Entry {
        &self.entry
    }

    pub(crate) fn entry_mut(&mut self) -> &mut Entry {
        &mut self.entry
    }

    /// Data bytes of the current entry left to read.
    pub fn remaining(&self) -> u64 {
        self.remaining
    }

    fn at_header(&self, offset: u64) -> String {
        if self.prev.is_empty() {
            format!("the header at byte {offset} (the first entry)")
        } else {
            format!(
                "the header at byte {offset} (after entry '{}')",
                lossy(&self.prev)
            )
        }
    }

    fn format(&self, offset: u64, reason: impl Into<String>) -> Error {
        Error::Format {
            at: self.at_header(offset),
            reason: reason.into(),
        }
    }

    fn read_exact_block(&mut self, buf: &mut [u8], offset: u64) -> Result<bool> {
        let mut got = 0;
        while got < buf.len() {
            match self.inner.read(&mut buf[got..]) {
                Ok(0) => {
                    if got == 0 {
                        return Ok(false);
                    }
                    return Err(self.format(offset, "the archive ends inside a header"));
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::Read(e)),
            }
        }
        self.pos += buf.len() as u64;
        Ok(true)
    }

    /// Reads and discards `n` bytes.
    fn skip(&mut self, mut n: u64, what: &[u8]) -> Result<()> {
        let mut scratch = [0u8; 8192];
        while n > 0 {
            let want = scratch.len().min(usize::try_from(n).unwrap_or(usize::MAX));
            match self.inner.read(&mut scratch[..want]) {
                Ok(0) => {
                    return Err(Error::Format {
                        at: format!("entry '{}'", lossy(what)),
                        reason: "the archive ends inside its data".into(),
                    });
                }
                Ok(k) => {
                    n -= k as u64;
                    self.pos += k as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::Read(e)),
            }
        }
        Ok(())
    }

    /// Reads a metadata record of `size` bytes (checked against
    /// `MAX_META` first) into `meta_buf`, and its padding.
    fn read_meta(&mut self, size: u64, offset: u64, what: &str) -> Result<()> {
        if size > MAX_META {
            return Err(self.format(
                offset,
                format!(
                    "its {what} claims {size} bytes, over the limit of {MAX_META} bytes: refused"
                ),
            ));
        }
        let n = size as usize;
        let mut buf = std::mem::take(&mut self.meta_buf);
        buf.clear();
        buf.resize(n, 0);
        let mut got = 0;
        while got < n {
            match self.inner.read(&mut buf[got..]) {
                Ok(0) => {
                    return Err(self.format(offset, format!("the archive ends inside its {what}")));
                }
                Ok(k) => got += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::Read(e)),
            }
        }
        self.pos += size;
        self.meta_buf = buf;
        let pad = pad_of(size);
        self.skip(pad, b"")?;
        Ok(())
    }

    /// Advances to the next entry (skipping what is left of the current
    /// one). False at the end of the archive.
    pub fn next_entry(&mut self) -> Result<bool> {
        if self.done {
            return Ok(false);
        }
        if self.remaining + self.padding > 0 {
            let n = self.remaining + self.padding;
            self.remaining = 0;
            self.padding = 0;
            let name = std::mem::take(&mut self.entry.path);
            let r = self.skip(n, &name);
            self.entry.path = name;
            r?;
        }
        std::mem::swap(&mut self.prev, &mut self.entry.path);
        self.pending = Pending::default();
        let mut first_offset = None;
        let mut meta_total: u64 = 0;
        loop {
            let offset = self.pos;
            let mut h = [0u8; BLOCK];
            if !self.read_exact_block(&mut h, offset)? {
                if self.pending.any {
                    return Err(self.format(offset, "the archive ends after an extended header"));
                }
                self.done = true;
                return Ok(false);
            }
            if h.iter().all(|&b| b == 0) {
                if self.pending.any {
                    return Err(
                        self.format(offset, "an extended header is not followed by an entry")
                    );
                }
                self.done = true;
                return Ok(false);
            }
            first_offset.get_or_insert(offset);
            self.check_sum(&h, offset)?;
            let flag = h[156];
            let size = self.number(&h[124..136], offset, "size")?;
            if matches!(flag, b'x' | b'X' | b'L' | b'K') && size <= MAX_META {
                // Extended headers add up before their entry: bounded too
                // (one over MAX_META is refused by `read_meta`).
                meta_total = meta_total.saturating_add(size);
                if meta_total > MAX_META_TOTAL {
                    return Err(self.format(
                        offset,
                        format!(
                            "the extended headers of one entry add up to more than {MAX_META_TOTAL} bytes: refused"
                        ),
                    ));
                }
            }
            match flag {
                b'x' | b'X' => {
                    self.read_meta(size, offset, "PAX extended header")?;
                    self.parse_pax(offset)?;
                    self.pending.any = true;
                }
                b'g' => {
                    // Global records: nothing walt uses; bounded all the same.
                    self.read_meta(size, offset, "PAX global header")?;
                }
                b'L' | b'K' => {
                    let what = if flag == b'L' {
                        "GNU long name"
                    } else {
                        "GNU long link"
                    };
                    self.read_meta(size, offset, what)?;
                    let mut v = std::mem::take(&mut self.meta_buf);
                    let end = v.iter().position(|&b| b == 0).unwrap_or(v.len());
                    let value = v[..end].to_vec();
                    v.clear();
                    self.meta_buf = v;
                    if flag == b'L' {
                        self.pending.path = Some(value);
                    } else {
                        self.pending.link = Some(value);
                    }
                    self.pending.any = true;
                }
                _ => {
                    self.build_entry(&h, size, first_offset.unwrap_or(offset), offset)?;
                    return Ok(true);
                }
            }
        }
    }

    fn check_sum(&self, h: &[u8; BLOCK], offset: u64) -> Result<()> {
        let stored = parse_octal(&h[148..156])
            .ok_or_else(|| self.format(offset, "has an invalid checksum field"))?;
        let mut unsigned: u64 = 0;
        let mut signed: i64 = 0;
        for (i, &b) in h.iter().enumerate() {
            let b = if (148..156).contains(&i) { b' ' } else { b };
            unsigned += u64::from(b);
            signed += i64::from(b as i8);
        }
        if stored != unsigned && stored as i64 != signed {
            return Err(self.format(
                offset,
                format!("bad header checksum (stored {stored}, computed {unsigned})"),
            ));
        }
        Ok(())
    }

    fn number(&self, field: &[u8], offset: u64, what: &str) -> Result<u64> {
        parse_number(field)
            .ok_or_else(|| self.format(offset, format!("has an invalid {what} field")))
    }

    fn parse_pax(&mut self, offset: u64) -> Result<()> {
        let buf = std::mem::take(&mut self.meta_buf);
        let r = self.parse_pax_records(&buf, offset);
        self.meta_buf = buf;
        r
    }

    fn parse_pax_records(&mut self, mut data: &[u8], offset: u64) -> Result<()> {
        let bad = |s: &Self, why: &str| s.format(offset, format!("bad PAX record: {why}"));
        while !data.is_empty() {
            if data.iter().all(|&b| b == 0) {
                break;
            }
            let sp = data
                .iter()
                .position(|&b| b == b' ')
                .ok_or_else(|| bad(self, "no length"))?;
            let len: usize = std::str::from_utf8(&data[..sp])
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| bad(self, "invalid length"))?;
            if len <= sp + 1 || len > data.len() || data[len - 1] != b'\n' {
                return Err(bad(self, "length out of range"));
            }
            let rec = &data[sp + 1..len - 1];
            data = &data[len..];
            let eq = rec
                .iter()
                .position(|&b| b == b'=')
                .ok_or_else(|| bad(self, "no '='"))?;
            let (key, value) = (&rec[..eq], &rec[eq + 1..]);
            self.pax_record(key, value, offset)?;
        }
        Ok(())
    }

    fn pax_record(&mut self, key: &[u8], value: &[u8], offset: u64) -> Result<()> {
        let num = || {
            std::str::from_utf8(value)
                .ok()
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or_else(|| format!("bad PAX record: invalid number for '{}'", lossy(key)))
        };
        let r: std::result::Result<(), String> = (|| {
            let p = &mut self.pending;
            match key {
                b"path" => p.path = Some(value.to_vec()),
                b"linkpath" => p.link = Some(value.to_vec()),
                b"size" => p.size = Some(num()?),
                b"uid" => p.uid = Some(num()?),
                b"gid" => p.gid = Some(num()?),
                b"mtime" => {
                    if let Some(t) = parse_pax_time(value) {
                        p.mtime = Some(t);
                    }
                }
                b"GNU.sparse.major" => p.sparse_major = Some(num()?),
                b"GNU.sparse.minor" => p.sparse_minor = Some(num()?),
                b"GNU.sparse.name" => p.sparse_name = Some(value.to_vec()),
                b"GNU.sparse.realsize" | b"GNU.sparse.size" => p.sparse_realsize = Some(num()?),
                b"GNU.sparse.offset" | b"GNU.sparse.numbytes" => {
                    if p.sparse_map.len() >= 2 * MAX_SPARSE_SEGMENTS {
                        return Err("too many sparse segments".into());
                    }
                    p.sparse_map.push(num()?);
                    p.sparse_major.get_or_insert(0);
                    p.sparse_minor.get_or_insert(0);
                }
                b"GNU.sparse.map" => {
                    p.sparse_map.clear();
                    for part in value.split(|&b| b == b',') {
                        if p.sparse_map.len() >= 2 * MAX_SPARSE_SEGMENTS {
                            return Err("too many sparse segments".into());
                        }
                        let v = std::str::from_utf8(part)
                            .ok()
                            .and_then(|v| v.parse::<u64>().ok())
                            .ok_or_else(|| "bad GNU.sparse.map record".to_string())?;
                        p.sparse_map.push(v);
                    }
                    p.sparse_major.get_or_insert(0);
                    p.sparse_minor.get_or_insert(1);
                }
                _ => {
                    if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                        p.xattrs.push((name.to_vec(), value.to_vec()));
                    }
                }
            }
            Ok(())
        })();
        r.map_err(|reason| self.format(offset, reason))
    }

    fn build_entry(
        &mut self,
        h: &[u8; BLOCK],
        size: u64,
        first_offset: u64,
        offset: u64,
    ) -> Result<()> {
        let pending = std::mem::take(&mut self.pending);
        let e = &mut self.entry;
        e.offset = first_offset;
        let ustar = &h[257..263] == b"ustar\0";
        let gnu = &h[257..263] == b"ustar ";
        e.path.clear();
        match pending.path {
            Some(p) => e.path.extend_from_slice(&p),
            None => {
                let name = cstr(&h[0..100]);
                if ustar {
                    let prefix = cstr(&h[345..500]);
                    if !prefix.is_empty() {
                        e.path.extend_from_slice(prefix);
                        e.path.push(b'/');
                    }
                }
                e.path.extend_from_slice(name);
            }
        }
        e.link.clear();
        match pending.link {
            Some(l) => e.link.extend_from_slice(&l),
            None => e.link.extend_from_slice(cstr(&h[157..257])),
        }
        let flag = h[156];
        let mut kind = Kind::from_flag(flag);
        if kind == Kind::File && flag != b'S' && e.path.ends_with(b"/") {
            // Old tars mark directories with a trailing slash only.
            kind = Kind::Directory;
        }
        e.kind = Some(kind);
        let field = |f: &[u8], what: &str| -> Result<u64> {
            parse_number(f).ok_or_else(|| Error::Format {
                at: format!("entry '{}' (header at byte {offset})", lossy(&e.path)),
                reason: format!("has an invalid {what} field"),
            })
        };
        e.mode = (field(&h[100..108], "mode")? & 0o7777) as u32;
        e.uid = match pending.uid {
            Some(v) => v,
            None => field(&h[108..116], "uid")?,
        };
        e.gid = match pending.gid {
            Some(v) => v,
            None => field(&h[116..124], "gid")?,
        };
        (e.mtime, e.mtime_nsec) = match pending.mtime {
            Some(t) => t,
            None => (parse_signed(&h[136..148]).unwrap_or(0), 0),
        };
        if ustar || gnu {
            e.dev_major = field(&h[329..337], "device major")? as u32;
            e.dev_minor = field(&h[337..345], "device minor")? as u32;
        } else {
            e.dev_major = 0;
            e.dev_minor = 0;
        }
        e.xattrs = pending.xattrs;
        let stored = pending.size.unwrap_or(size);
        e.size = stored;
        e.sparse = None;
        self.remaining = match kind {
            // Links and devices carry no data whatever the size says.
            Kind::HardLink | Kind::Symlink | Kind::CharDevice | Kind::BlockDevice | Kind::Fifo => 0,
            Kind::Directory if flag != b'D' => 0,
            _ => stored,
        };
        self.padding = pad_of(self.remaining);
        if flag == b'S' && gnu {
            self.gnu_sparse(h, offset)?;
        } else if let Some(major) = pending.sparse_major
            && kind == Kind::File
        {
            let minor = pending.sparse_minor.unwrap_or(0);
            if let Some(name) = &pending.sparse_name {
                self.entry.path.clear();
                self.entry.path.extend_from_slice(name);
            }
            let real = pending.sparse_realsize;
            match (major, minor) {
                (0, _) => {
                    let map: Vec<(u64, u64)> = pending
                        .sparse_map
                        .chunks(2)
                        .map(|c| (c[0], *c.get(1).unwrap_or(&0)))
                        .collect();
                    if !pending.sparse_map.len().is_multiple_of(2) {
                        return Err(self.entry_format("has an odd sparse map"));
                    }
                    self.set_sparse(map, real.unwrap_or(stored))?;
                }
                (1, 0) => {
                    let map = self.read_sparse_map_1_0()?;
                    self.set_sparse(map, real.unwrap_or(stored))?;
                }
                _ => {
                    return Err(self
                        .entry_format(&format!("uses an unknown sparse format {major}.{minor}")));
                }
            }
        }
        Ok(())
    }

    fn entry_format(&self, reason: &str) -> Error {
        Error::Format {
            at: format!(
                "entry '{}' (header at byte {})",
                lossy(&self.entry.path),
                self.entry.offset
            ),
            reason: reason.into(),
        }
    }

    /// Checks and installs a sparse map: segments in order, not
    /// overlapping, inside the logical size, adding up to the stored data.
    fn set_sparse(&mut self, map: Vec<(u64, u64)>, realsize: u64) -> Result<()> {
        if map.len() > MAX_SPARSE_SEGMENTS {
            return Err(self.entry_format("has too many sparse segments"));
        }
        let mut end = 0u64;
        let mut total = 0u64;
        for &(off, len) in &map {
            let seg_end = off.checked_add(len);
            match seg_end {
                Some(se) if off >= end && se <= realsize => end = se,
                _ => return Err(self.entry_format("has an invalid sparse map")),
            }
            total += len;
        }
        if total != self.remaining {
            return Err(self.entry_format(&format!(
                "has a sparse map of {total} data bytes but {} stored",
                self.remaining
            )));
        }
        self.entry.size = realsize;
        self.entry.sparse = Some(map);
        Ok(())
    }

    /// Old GNU sparse headers: 4 segments in the header, then extension
    /// blocks of 21 while `isextended`.
    fn gnu_sparse(&mut self, h: &[u8; BLOCK], offset: u64) -> Result<()> {
        let mut map = Vec::new();
        let push = |s: &Self, map: &mut Vec<(u64, u64)>, e: &[u8]| -> Result<()> {
            if e.iter().all(|&b| b == 0) {
                return Ok(());
            }
            let o = parse_number(&e[..12]);
            let n = parse_number(&e[12..24]);
            match (o, n) {
                (Some(o), Some(n)) => {
                    map.push((o, n));
                    Ok(())
                }
                _ => Err(s.entry_format("has an invalid sparse header")),
            }
        };
        for i in 0..4 {
            push(self, &mut map, &h[386 + i * 24..386 + (i + 1) * 24])?;
        }
        let realsize = parse_number(&h[483..495])
            .ok_or_else(|| self.format(offset, "has an invalid sparse real size"))?;
        let mut extended = h[482] != 0;
        while extended {
            if map.len() > MAX_SPARSE_SEGMENTS {
                return Err(self.entry_format("has too many sparse segments"));
            }
            let mut b = [0u8; BLOCK];
            let at = self.pos;
            if !self.read_exact_block(&mut b, at)? {
                return Err(self.entry_format("the archive ends inside its sparse headers"));
            }
            for i in 0..21 {
                push(self, &mut map, &b[i * 24..(i + 1) * 24])?;
            }
            extended = b[504] != 0;
        }
        self.set_sparse(map, realsize)
    }

    /// PAX sparse 1.0: the map is at the start of the data, in decimal
    /// lines (count, then offset and length of each segment), padded to a
    /// block.
    fn read_sparse_map_1_0(&mut self) -> Result<Vec<(u64, u64)>> {
        let mut lines_left: Option<u64> = None;
        let mut map = Vec::new();
        let mut cur: u64 = 0;
        let mut digits = 0usize;
        let mut pending_offset: Option<u64> = None;
        let mut consumed: u64 = 0;
        let mut block = [0u8; BLOCK];
        loop {
            if consumed >= MAX_META {
                return Err(self.entry_format("has a sparse map over the limit: refused"));
            }
            if self.remaining < BLOCK as u64 {
                return Err(self.entry_format("has a truncated sparse map"));
            }
            let at = self.pos;
            if !self.read_exact_block(&mut block, at)? {
                return Err(self.entry_format("the archive ends inside its sparse map"));
            }
            self.remaining -= BLOCK as u64;
            consumed += BLOCK as u64;
            for &b in block.iter() {
                if lines_left == Some(0) {
                    break;
                }
                match b {
                    b'0'..=b'9' => {
                        digits += 1;
                        if digits > 20 {
                            return Err(self.entry_format("has an invalid sparse map"));
                        }
                        cur = cur
                            .checked_mul(10)
                            .and_then(|c| c.checked_add(u64::from(b - b'0')))
                            .ok_or_else(|| self.entry_format("has an invalid sparse map"))?;
                    }
                    b'\n' if digits > 0 => {
                        match lines_left {
                            None => {
                                if cur > MAX_SPARSE_SEGMENTS as u64 {
                                    return Err(self.entry_format("has too many sparse segments"));
                                }
                                lines_left = Some(cur * 2);
                            }
                            Some(n) => {
                                match pending_offset.take() {
                                    None => pending_offset = Some(cur),
                                    Some(o) => map.push((o, cur)),
                                }
                                lines_left = Some(n - 1);
                            }
                        }
                        cur = 0;
                        digits = 0;
                    }
                    _ => return Err(self.entry_format("has an invalid sparse map")),
                }
            }
            if lines_left == Some(0) {
                break;
            }
        }
        self.padding = pad_of(self.remaining);
        // The padding was computed on the stored size including the map;
        // the map being whole blocks, it is unchanged.
        Ok(map)
    }
}

impl<R: Read> Read for Reader<R> {
    /// Reads the current entry's data (0 at its end).
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 || buf.is_empty() {
            return Ok(0);
        }
        let want = buf
            .len()
            .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        let n = loop {
            match self.inner.read(&mut buf[..want]) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        };
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "the archive ends inside the data of entry '{}'",
                    lossy(&self.entry.path)
                ),
            ));
        }
        self.remaining -= n as u64;
        self.pos += n as u64;
        Ok(n)
    }
}

fn pad_of(n: u64) -> u64 {
    (BLOCK as u64 - n % BLOCK as u64) % BLOCK as u64
}

/// The bytes of a NUL-terminated (or full) field.
fn cstr(f: &[u8]) -> &[u8] {
    let end = f.iter().position(|&b| b == 0).unwrap_or(f.len());
    &f[..end]
}

/// Octal digits surrounded by spaces or NULs; blank is 0.
fn parse_octal(f: &[u8]) -> Option<u64> {
    let s = f
        .iter()
        .position(|&b| b != b' ' && b != 0)
        .map(|i| &f[i..])
        .unwrap_or(&[]);
    let end = s
        .iter()
        .position(|&b| b == b' ' || b == 0)
        .unwrap_or(s.len());
    if s[end..].iter().any(|&b| b != b' ' && b != 0) {
        return None;
    }
    let mut v: u64 = 0;
    for &b in &s[..end] {
        if !(b'0'..=b'7').contains(&b) {
            return None;
        }
        v = v.checked_mul(8)?.checked_add(u64::from(b - b'0'))?;
    }
    Some(v)
}

/// A numeric field: octal, or GNU base-256 (high bit set; negative values
/// refused).
fn parse_number(f: &[u8]) -> Option<u64> {
    if f.first().is_some_and(|&b| b & 0x80 != 0) {
        if f[0] == 0xff {
            return None;
        }
        let mut v: u64 = u64::from(f[0] & 0x7f);
        for &b in &f[1..] {
            if v >> 56 != 0 {
                return None;
            }
            v = (v << 8) | u64::from(b);
        }
        return Some(v);
    }
    parse_octal(f)
}

/// A possibly negative (base-256) time field.
fn parse_signed(f: &[u8]) -> Option<i64> {
    if f.first() == Some(&0xff) {
        let mut v: i64 = -1;
        for &b in &f[1..] {
            v = (v << 8) | i64::from(b);
        }
        return Some(v);
    }
    parse_number(f).and_then(|v| i64::try_from(v).ok())
}

/// A PAX time: `<secs>[.<fraction>]`.
pub(crate) fn parse_pax_time(v: &[u8]) -> Option<(i64, u32)> {
    let s = std::str::from_utf8(v).ok()?;
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    let secs: i64 = secs.parse().ok()?;
    let mut nanos: u32 = 0;
    for (i, d) in frac.bytes().enumerate() {
        if !d.is_ascii_digit() {
            return None;
        }
        if i < 9 {
            nanos += u32::from(d - b'0') * 10u32.pow(8 - i as u32);
        }
    }
    if s.starts_with('-') && nanos > 0 {
        // "-1.5" is 1.5 s before the epoch.
        return Some((secs - 1, 1_000_000_000 - nanos));
    }
    Some((secs, nanos))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers() {
        assert_eq!(parse_octal(b"0000644\0"), Some(0o644));
        assert_eq!(parse_octal(b"  644 \0"), Some(0o644));
        assert_eq!(parse_octal(b"\0\0\0\0"), Some(0));
        assert_eq!(parse_octal(b"64x"), None);
        assert_eq!(parse_octal(b"6 4"), None);
        let mut f = [0u8; 12];
        f[0] = 0x80;
        f[11] = 1;
        f[10] = 2;
        assert_eq!(parse_number(&f), Some(0x201));
        f[0] = 0xff;
        assert_eq!(parse_number(&f), None);
        let neg = [0xffu8; 12];
        assert_eq!(parse_signed(&neg), Some(-1));
    }

    #[test]
    fn pax_times() {
        assert_eq!(parse_pax_time(b"12"), Some((12, 0)));
        assert_eq!(parse_pax_time(b"12.5"), Some((12, 500_000_000)));
        assert_eq!(parse_pax_time(b"-1.5"), Some((-2, 500_000_000)));
        assert_eq!(parse_pax_time(b"1.1234567891"), Some((1, 123_456_789)));
        assert_eq!(parse_pax_time(b"x"), None);
    }
}
