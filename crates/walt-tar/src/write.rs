//! Writing tar streams: ustar headers, with PAX records for what they
//! cannot hold (long names and links, large numbers, sub-second times,
//! xattrs, sparse maps).

use std::io::{self, Read, Write};

use crate::read::Kind;

const BLOCK: usize = 512;
const COPY_BUF: usize = 256 * 1024;

/// One entry to write.
#[derive(Debug, Clone, Copy)]
pub struct HeaderSpec<'a> {
    pub path: &'a [u8],
    pub kind: Kind,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub uname: &'a [u8],
    pub gname: &'a [u8],
    pub mtime: i64,
    pub mtime_nsec: u32,
    /// Regular files: the logical size (data follows).
    pub size: u64,
    /// Hard and symbolic links.
    pub link: &'a [u8],
    pub dev_major: u32,
    pub dev_minor: u32,
    /// (name, value) pairs written as `SCHILY.xattr.<name>`.
    pub xattrs: &'a [(Vec<u8>, Vec<u8>)],
    /// Regular files with holes: the data segments (offset, length); the
    /// data given is their concatenation. Written as PAX sparse 1.0.
    pub sparse: Option<&'a [(u64, u64)]>,
}

impl<'a> HeaderSpec<'a> {
    /// An entry with everything zero or empty but its name and kind.
    pub fn new(path: &'a [u8], kind: Kind) -> Self {
        HeaderSpec {
            path,
            kind,
            mode: 0o644,
            uid: 0,
            gid: 0,
            uname: b"",
            gname: b"",
            mtime: 0,
            mtime_nsec: 0,
            size: 0,
            link: b"",
            dev_major: 0,
            dev_minor: 0,
            xattrs: &[],
            sparse: None,
        }
    }
}

/// Writes entries to a tar stream.
pub struct Builder<W: Write> {
    out: W,
    pax: Vec<u8>,
    buf: Vec<u8>,
    name: Vec<u8>,
}

fn kind_flag(k: Kind) -> u8 {
    match k {
        Kind::File => b'0',
        Kind::HardLink => b'1',
        Kind::Symlink => b'2',
        Kind::CharDevice => b'3',
        Kind::BlockDevice => b'4',
        Kind::Directory => b'5',
        Kind::Fifo => b'6',
        Kind::Other(f) => f,
    }
}

/// Writes `v` in octal into `f` (digits, then NUL), or base-256 when it
/// does not fit; false when it fits neither.
pub(crate) fn put_number(f: &mut [u8], v: u64) -> bool {
    let digits = f.len() - 1;
    if digits < 22 && v >= 1u64 << (3 * digits) {
        if f.len() < 9 && v >> (8 * (f.len() - 1)) != 0 {
            return false;
        }
        f.fill(0);
        f[0] = 0x80;
        let mut x = v;
        for b in f[1..].iter_mut().rev() {
            *b = x as u8;
            x >>= 8;
        }
        return true;
    }
    let s = format!("{v:0digits$o}");
    f[..digits].copy_from_slice(s.as_bytes());
    f[digits] = 0;
    true
}

fn fits_octal(f_len: usize, v: u64) -> bool {
    let digits = f_len - 1;
    digits >= 22 || v < 1u64 << (3 * digits)
}

fn push_record(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    let body = key.len() + value.len() + 3; // ' ', '=', '\n'
    let mut len = body + 1;
    loop {
        let l = body + len.to_string().len();
        if l == len {
            break;
        }
        len = l;
    }
    out.extend_from_slice(len.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(key);
    out.push(b'=');
    out.extend_from_slice(value);
    out.push(b'\n');
}

/// Splits a name for a ustar header: (prefix, name), or None when it
/// needs a PAX record.
fn split_ustar(path: &[u8]) -> Option<(&[u8], &[u8])> {
    if path.len() <= 100 {
        return Some((b"", path));
    }
    if path.len() > 256 {
        return None;
    }
    // The last '/' leaving a name of at most 100 and a prefix of at most 155.
    let start = path.len().saturating_sub(101);
    for i in start..path.len().min(156) {
        if path[i] == b'/' && i > 0 && path.len() - i - 1 <= 100 && path.len() - i > 1 {
            return Some((&path[..i], &path[i + 1..]));
        }
    }
    None
}

fn basename(p: &[u8]) -> &[u8] {
    let p = p.strip_suffix(b"/").unwrap_or(p);
    match p.iter().rposition(|&b| b == b'/') {
        Some(i) => &p[i + 1..],
        None => p,
    }
}

fn dirname(p: &[u8]) -> &[u8] {
    let p = p.strip_suffix(b"/").unwrap_or(p);
    match p.iter().rposition(|&b| b == b'/') {
        Some(i) => &p[..i],
        None => b"",
    }
}

impl<W: Write> Builder<W> {
    pub fn new(out: W) -> Self {
        Builder {
            out,
            pax: Vec::new(),
            buf: Vec::new(),
            name: Vec::new(),
        }
    }

    /// The output, for callers that need to reach it between entries.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.out
    }

    /// Writes one entry; for a regular file, exactly `spec.size` bytes (or
    /// the sparse segments' total) of `data` follow (padded with zeros if
    /// `data` ends early: the stream stays well formed; returns false then).
    pub fn append(&mut self, spec: &HeaderSpec<'_>, data: &mut dyn Read) -> io::Result<bool> {
        let mut pax = std::mem::take(&mut self.pax);
        pax.clear();
        let mut name = std::mem::take(&mut self.name);
        name.clear();
        let r = self.append_inner(spec, data, &mut pax, &mut name);
        self.pax = pax;
        self.name = name;
        r
    }

    fn append_inner(
        &mut self,
        spec: &HeaderSpec<'_>,
        data: &mut dyn Read,
        pax: &mut Vec<u8>,
        name: &mut Vec<u8>,
    ) -> io::Result<bool> {
        let mut map_text: Vec<u8> = Vec::new();
        let data_len: u64 = match (spec.kind, spec.sparse) {
            (Kind::File, Some(map)) => {
                push_record(pax, b"GNU.sparse.major", b"1");
                push_record(pax, b"GNU.sparse.minor", b"0");
                push_record(pax, b"GNU.sparse.name", spec.path);
                push_record(
                    pax,
                    b"GNU.sparse.realsize",
                    spec.size.to_string().as_bytes(),
                );
                map_text.extend_from_slice(format!("{}\n", map.len()).as_bytes());
                for (o, l) in map {
                    map_text.extend_from_slice(format!("{o}\n{l}\n").as_bytes());
                }
                let padded = map_text.len().div_ceil(BLOCK) * BLOCK;
                map_text.resize(padded, 0);
                let dir = dirname(spec.path);
                if !dir.is_empty() {
                    name.extend_from_slice(dir);
                    name.push(b'/');
                }
                name.extend_from_slice(b"GNUSparseFile.0/");
                name.extend_from_slice(basename(spec.path));
                map.iter().map(|s| s.1).sum::<u64>()
            }
            (Kind::File, None) => {
                name.extend_from_slice(spec.path);
                spec.size
            }
            _ => {
                name.extend_from_slice(spec.path);
                0
            }
        };
        let stored = data_len + map_text.len() as u64;

        let mut h = [0u8; BLOCK];
        match split_ustar(name) {
            Some((prefix, n)) => {
                h[..n.len()].copy_from_slice(n);
                h[345..345 + prefix.len()].copy_from_slice(prefix);
            }
            None => {
                push_record(pax, b"path", name);
                let short = &name[..name.len().min(100)];
                h[..short.len()].copy_from_slice(short);
            }
        }
        if spec.link.len() > 100 {
            push_record(pax, b"linkpath", spec.link);
            h[157..257].copy_from_slice(&spec.link[..100]);
        } else {
            h[157..157 + spec.link.len()].copy_from_slice(spec.link);
        }
        put_number(&mut h[100..108], u64::from(spec.mode & 0o7777));
        for (range, v, key) in [
            (108..116, spec.uid, &b"uid"[..]),
            (116..124, spec.gid, &b"gid"[..]),
        ] {
            if !fits_octal(8, v) {
                push_record(pax, key, v.to_string().as_bytes());
                put_number(&mut h[range], 0);
            } else {
                put_number(&mut h[range], v);
            }
        }
        if !fits_octal(12, stored) {
            push_record(pax, b"size", stored.to_string().as_bytes());
        }
        put_number(&mut h[124..136], stored);
        if spec.mtime < 0 || !fits_octal(12, spec.mtime as u64) || spec.mtime_nsec != 0 {
            let v = if spec.mtime_nsec != 0 {
                if spec.mtime < 0 {
                    // -1.5 s is written "-1.5": secs + 1, 1e9 - nsec.
                    format!(
                        "-{}.{:09}",
                        -(spec.mtime + 1),
                        1_000_000_000 - spec.mtime_nsec
                    )
                } else {
                    format!("{}.{:09}", spec.mtime, spec.mtime_nsec)
                }
            } else {
                spec.mtime.to_string()
            };
            push_record(pax, b"mtime", v.as_bytes());
        }
        put_number(&mut h[136..148], spec.mtime.max(0) as u64 & 0o77777777777);
        h[156] = kind_flag(spec.kind);
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        let un = &spec.uname[..spec.uname.len().min(31)];
        h[265..265 + un.len()].copy_from_slice(un);
        let gn = &spec.gname[..spec.gname.len().min(31)];
        h[297..297 + gn.len()].copy_from_slice(gn);
        if matches!(spec.kind, Kind::CharDevice | Kind::BlockDevice) {
            put_number(&mut h[329..337], u64::from(spec.dev_major));
            put_number(&mut h[337..345], u64::from(spec.dev_minor));
        }
        for (k, v) in spec.xattrs {
            let mut key = b"SCHILY.xattr.".to_vec();
            key.extend_from_slice(k);
            push_record(pax, &key, v);
        }

        if !pax.is_empty() {
            let mut ph = [0u8; BLOCK];
            let mut pname = b"PaxHeaders.0/".to_vec();
            let base = basename(name);
            pname.extend_from_slice(&base[..base.len().min(80)]);
            ph[..pname.len()].copy_from_slice(&pname);
            put_number(&mut ph[100..108], 0o644);
            put_number(&mut ph[108..116], 0);
            put_number(&mut ph[116..124], 0);
            put_number(&mut ph[124..136], pax.len() as u64);
            put_number(&mut ph[136..148], spec.mtime.max(0) as u64 & 0o77777777777);
            ph[156] = b'x';
            ph[257..263].copy_from_slice(b"ustar\0");
            ph[263..265].copy_from_slice(b"00");
            set_checksum(&mut ph);
            self.out.write_all(&ph)?;
            self.out.write_all(pax)?;
            self.pad(pax.len() as u64)?;
        }
        set_checksum(&mut h);
        self.out.write_all(&h)?;
        if stored == 0 {
            return Ok(true);
        }
        self.out.write_all(&map_text)?;
        let complete = self.copy_exact(data, data_len)?;
        self.pad(stored)?;
        Ok(complete)
    }

    fn copy_exact(&mut self, data: &mut dyn Read, len: u64) -> io::Result<bool> {
        if self.buf.len() < COPY_BUF {
            self.buf = vec![0u8; COPY_BUF];
        }
        let mut left = len;
        let mut complete = true;
        while left > 0 {
            let want = self
                .buf
                .len()
                .min(usize::try_from(left).unwrap_or(usize::MAX));
            let n = if complete {
                match data.read(&mut self.buf[..want]) {
                    Ok(0) => {
                        complete = false;
                        continue;
                    }
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                }
            } else {
                self.buf[..want].fill(0);
                want
            };
            self.out.write_all(&self.buf[..n])?;
            left -= n as u64;
        }
        Ok(complete)
    }

    fn pad(&mut self, n: u64) -> io::Result<()> {
        let p = (BLOCK as u64 - n % BLOCK as u64) % BLOCK as u64;
        self.out.write_all(&[0u8; BLOCK][..p as usize])
    }

    /// Writes the end-of-archive marker (two zero blocks) and returns the
    /// output (not flushed).
    pub fn finish(mut self) -> io::Result<W> {
        self.out.write_all(&[0u8; 2 * BLOCK])?;
        Ok(self.out)
    }
}

pub(crate) fn set_checksum(h: &mut [u8; BLOCK]) {
    h[148..156].fill(b' ');
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    let s = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(s.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_have_their_own_length() {
        let mut out = Vec::new();
        push_record(&mut out, b"path", &[b'a'; 90]);
        let s = String::from_utf8(out.clone()).unwrap();
        let (len, _) = s.split_once(' ').unwrap();
        assert_eq!(len.parse::<usize>().unwrap(), out.len());
        for n in [0, 1, 5, 93, 94, 95, 994, 995, 996] {
            let mut out = Vec::new();
            push_record(&mut out, b"k", &vec![b'v'; n]);
            let s = String::from_utf8(out.clone()).unwrap();
            let (len, _) = s.split_once(' ').unwrap();
            assert_eq!(len.parse::<usize>().unwrap(), out.len(), "{n}");
        }
    }

    #[test]
    fn ustar_split() {
        assert_eq!(split_ustar(b"a/b"), Some((&b""[..], &b"a/b"[..])));
        let long = [vec![b'd'; 120], b"/f".to_vec()].concat();
        assert_eq!(split_ustar(&long), Some((&long[..120], &b"f"[..])));
        assert_eq!(split_ustar(&[b'x'; 150]), None);
    }

    #[test]
    fn numbers_fall_back_to_base_256() {
        let mut f = [0u8; 12];
        assert!(put_number(&mut f, 0o777));
        assert_eq!(&f, b"00000000777\0");
        assert!(put_number(&mut f, 1 << 40));
        assert_eq!(f[0], 0x80);
        let mut f = [0u8; 8];
        assert!(put_number(&mut f, 1 << 30));
        assert_eq!(f[0], 0x80);
    }
}
