//! A multi-member gzip reader (RFC 1952) over raw deflate.
//!
//! Registry layers are verified by the sha256 of their compressed bytes,
//! which covers everything the gzip CRC-32 would: when the caller checks
//! that digest, the CRC is skipped (it costs ~6% of a clone's CPU). The
//! trailer's size field is always checked, and the CRC too when asked.

use std::io::{self, BufRead, Read};

use flate2::Crc;

use crate::inflate::Inflater;

const ID1: u8 = 0x1f;
const ID2: u8 = 0x8b;
const CM_DEFLATE: u8 = 8;
const FHCRC: u8 = 0x02;
const FEXTRA: u8 = 0x04;
const FNAME: u8 = 0x08;
const FCOMMENT: u8 = 0x10;
const FRESERVED: u8 = 0xe0;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before a member header (the first, or after a trailer).
    Header,
    Body,
    Done,
}

/// Decompresses a gzip stream of one or more members.
pub(crate) struct GzipReader<R> {
    inner: R,
    inflate: Inflater,
    state: State,
    members: u64,
    /// Bytes produced by the current member (ISIZE is this modulo 2^32).
    member_out: u64,
    crc: Option<Crc>,
}

fn bad(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("invalid gzip stream: {what}"),
    )
}

impl<R: BufRead> GzipReader<R> {
    /// `check_crc`: also verify each member's CRC-32 (when nothing else
    /// verifies the compressed bytes).
    pub(crate) fn new(inner: R, check_crc: bool) -> Self {
        Self::with_inflater(inner, check_crc, Inflater::new())
    }

    fn with_inflater(inner: R, check_crc: bool, inflate: Inflater) -> Self {
        GzipReader {
            inner,
            inflate,
            state: State::Header,
            members: 0,
            member_out: 0,
            crc: check_crc.then(Crc::new),
        }
    }

    pub(crate) fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    fn byte(&mut self) -> io::Result<Option<u8>> {
        let b = match self.inner.fill_buf()?.first() {
            Some(&b) => b,
            None => return Ok(None),
        };
        self.inner.consume(1);
        Ok(Some(b))
    }

    fn need(&mut self) -> io::Result<u8> {
        self.byte()?
            .ok_or_else(|| bad("the stream ends inside a member header or trailer"))
    }

    fn skip(&mut self, mut n: usize) -> io::Result<()> {
        while n > 0 {
            let avail = self.inner.fill_buf()?.len();
            if avail == 0 {
                return Err(bad("the stream ends inside a member header"));
            }
            let k = avail.min(n);
            self.inner.consume(k);
            n -= k;
        }
        Ok(())
    }

    fn skip_zero_terminated(&mut self) -> io::Result<()> {
        while self.need()? != 0 {}
        Ok(())
    }

    /// Reads a member header; `Ok(false)` at the clean end of the stream.
    fn header(&mut self) -> io::Result<bool> {
        let Some(id1) = self.byte()? else {
            if self.members == 0 {
                return Err(bad("it is empty"));
            }
            return Ok(false);
        };
        if id1 != ID1 || self.need()? != ID2 {
            return Err(bad(if self.members == 0 {
                "no gzip header (not gzip data)"
            } else {
                "unexpected data after the last member"
            }));
        }
        if self.need()? != CM_DEFLATE {
            return Err(bad("unknown compression method"));
        }
        let flags = self.need()?;
        if flags & FRESERVED != 0 {
            return Err(bad("reserved header flags are set"));
        }
        // MTIME (4), XFL, OS.
        self.skip(6)?;
        if flags & FEXTRA != 0 {
            let len = u16::from_le_bytes([self.need()?, self.need()?]);
            self.skip(len.into())?;
        }
        if flags & FNAME != 0 {
            self.skip_zero_terminated()?;
        }
        if flags & FCOMMENT != 0 {
            self.skip_zero_terminated()?;
        }
        if flags & FHCRC != 0 {
            self.skip(2)?;
        }
        self.inflate.reset();
        self.member_out = 0;
        if let Some(c) = &mut self.crc {
            c.reset();
        }
        Ok(true)
    }

    fn trailer(&mut self) -> io::Result<()> {
        let mut t = [0u8; 8];
        for b in &mut t {
            *b = self.need()?;
        }
        let crc = u32::from_le_bytes([t[0], t[1], t[2], t[3]]);
        let isize = u32::from_le_bytes([t[4], t[5], t[6], t[7]]);
        if isize != self.member_out as u32 {
            return Err(bad("the size in a member trailer does not match its data"));
        }
        if let Some(c) = &self.crc
            && c.sum() != crc
        {
            return Err(bad("CRC-32 mismatch"));
        }
        self.members += 1;
        Ok(())
    }
}

impl<R: BufRead> Read for GzipReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            match self.state {
                State::Done => return Ok(0),
                State::Header => {
                    self.state = if self.header()? {
                        State::Body
                    } else {
                        State::Done
                    };
                }
                State::Body => {
                    let input = self.inner.fill_buf()?;
                    let eof = input.is_empty();
                    let step = self
                        .inflate
                        .inflate(input, buf)
                        .map_err(|e| bad(&e.to_string()))?;
                    let produced = step.produced;
                    self.inner.consume(step.used);
                    self.member_out += produced as u64;
                    if let Some(c) = &mut self.crc {
                        c.update(&buf[..produced]);
                    }
                    if step.finished {
                        if self.inflate.reads_trailer() {
                            self.members += 1;
                        } else {
                            self.trailer()?;
                        }
                        self.state = State::Header;
                    } else if eof && produced == 0 {
                        return Err(bad("the stream ends inside compressed data"));
                    }
                    if produced > 0 {
                        return Ok(produced);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use flate2::write::GzEncoder;

    use super::*;

    fn gz(data: &[u8]) -> Vec<u8> {
        let mut e = GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn read_with(bytes: &[u8], crc: bool, cap: usize, inflater: Inflater) -> io::Result<Vec<u8>> {
        let r = io::BufReader::with_capacity(cap, bytes);
        let mut out = Vec::new();
        GzipReader::with_inflater(r, crc, inflater).read_to_end(&mut out)?;
        Ok(out)
    }

    /// Reads `bytes` with every inflater this build has and with several
    /// input buffer sizes (3 bytes: headers and trailers split across
    /// refills); they must all agree (on the data, or on failing).
    fn read_all(bytes: &[u8], crc: bool) -> io::Result<Vec<u8>> {
        let mut results = Vec::new();
        for cap in [3, 1000, 256 * 1024] {
            results.push(read_with(bytes, crc, cap, Inflater::zlib()));
            results.push(read_with(bytes, crc, cap, Inflater::new()));
        }
        let first = results.remove(0);
        for r in &results {
            match (&first, r) {
                (Ok(a), Ok(b)) => assert_eq!(a, b),
                (Err(a), Err(b)) => {
                    assert!(
                        b.to_string().starts_with("invalid gzip stream"),
                        "{a} / {b}"
                    )
                }
                (a, b) => panic!("inflaters disagree: {a:?} / {b:?}"),
            }
        }
        first
    }

    fn data() -> Vec<u8> {
        (0..200_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect()
    }

    #[test]
    fn single_and_multi_member() {
        let d = data();
        assert_eq!(read_all(&gz(&d), true).unwrap(), d);
        assert_eq!(read_all(&gz(&d), false).unwrap(), d);
        let mut two = gz(&d[..1000]);
        two.extend(gz(&d[1000..]));
        assert_eq!(read_all(&two, true).unwrap(), d);
        assert_eq!(read_all(&gz(b""), true).unwrap(), b"");
    }

    #[test]
    fn optional_header_fields() {
        let d = data();
        let mut e = flate2::GzBuilder::new()
            .filename("layer.tar")
            .comment("a comment")
            .extra(vec![1, 2, 3, 4, 5])
            .write(Vec::new(), flate2::Compression::fast());
        e.write_all(&d).unwrap();
        let bytes = e.finish().unwrap();
        assert_eq!(read_all(&bytes, true).unwrap(), d);
    }

    #[test]
    fn corruption_is_an_error() {
        let d = data();
        let good = gz(&d);
        let err = |b: &[u8], crc| read_all(b, crc).unwrap_err().to_string();
        assert!(err(b"", true).contains("empty"));
        assert!(err(b"hello world", true).contains("not gzip"));
        assert!(err(&good[..good.len() / 2], true).contains("ends inside"));
        assert!(err(&good[..good.len() - 3], true).contains("ends inside"));
        let mut garbage = good.clone();
        garbage.extend_from_slice(b"junk");
        assert!(err(&garbage, true).contains("after the last member"));
        // A flipped CRC byte: caught when asked to check it; otherwise only
        // by an inflater that reads the trailer itself (ISA-L: it is cheap).
        let mut crc = good.clone();
        let n = crc.len();
        crc[n - 8] ^= 0xff;
        assert!(err(&crc, true).contains("CRC-32"));
        assert_eq!(read_with(&crc, false, 3, Inflater::zlib()).unwrap(), d);
        let fast = Inflater::new();
        assert_eq!(fast.reads_trailer(), cfg!(feature = "isal"));
        if fast.reads_trailer() {
            let e = read_with(&crc, false, 1000, fast).unwrap_err().to_string();
            assert!(e.contains("CRC-32"), "{e}");
        }
        // A wrong size field is always caught.
        let mut size = good.clone();
        size[n - 1] ^= 0x01;
        assert!(err(&size, false).contains("size"));
    }
}

#[cfg(test)]
#[path = "gzip_prop.rs"]
mod prop;
