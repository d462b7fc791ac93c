//! Writing large files around the page cache.
//!
//! Blobs and the large files of a layer are written once, synced before the
//! image is recorded, and rarely read back soon: going through the page
//! cache would copy every byte into it, flush it again at the sync and
//! evict more useful data. With `O_DIRECT` the bytes go from an aligned
//! buffer straight to the disk. The tail (the last partial block) is written
//! normally; filesystems without `O_DIRECT` (tmpfs, some overlays) get
//! ordinary buffered writes.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;

use nix::fcntl::{FcntlArg, OFlag, fcntl};

/// Alignment of direct I/O buffers, offsets and lengths (the largest
/// logical block size in use).
const ALIGN: usize = 4096;
/// Size of one direct write.
pub(crate) const DIRECT_CHUNK: usize = 1 << 20;
/// Regular files of at least one direct write are written directly.
pub(crate) const DIRECT_MIN_SIZE: u64 = DIRECT_CHUNK as u64;

/// The `O_DIRECT` open flag, to add to `OpenOptions::custom_flags`.
pub(crate) const O_DIRECT: i32 = libc::O_DIRECT;

/// Whether opening with `O_DIRECT` failed because the filesystem does not
/// support it (retry without).
pub(crate) fn unsupported(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EINVAL)
}

/// A sequential writer to a file opened with `O_DIRECT` (or not: then it
/// is an ordinary buffered writer).
pub(crate) struct DirectWriter {
    file: File,
    /// `DIRECT_CHUNK` bytes starting at `start` are aligned to `ALIGN`.
    mem: Vec<u8>,
    start: usize,
    fill: usize,
    direct: bool,
}

impl DirectWriter {
    /// `direct`: whether `file` was opened with `O_DIRECT`.
    pub(crate) fn new(file: File, direct: bool) -> Self {
        Self::with_buffer(file, direct, Vec::new())
    }

    /// Like `new`, reusing the buffer a previous writer gave back from
    /// `finish_reuse` (allocates one if `mem` is too small).
    pub(crate) fn with_buffer(file: File, direct: bool, mut mem: Vec<u8>) -> Self {
        if mem.len() < DIRECT_CHUNK + ALIGN {
            mem = vec![0u8; DIRECT_CHUNK + ALIGN];
        }
        let start = mem.as_ptr().align_offset(ALIGN);
        DirectWriter {
            file,
            mem,
            start,
            fill: 0,
            direct,
        }
    }

    fn spare(&mut self) -> &mut [u8] {
        &mut self.mem[self.start + self.fill..self.start + DIRECT_CHUNK]
    }

    /// Writes the buffer out when it is full.
    pub(crate) fn write_full(&mut self) -> io::Result<()> {
        if self.fill < DIRECT_CHUNK {
            return Ok(());
        }
        self.write_head(DIRECT_CHUNK)?;
        self.fill = 0;
        Ok(())
    }

    /// Writes the first `len` bytes of the buffer (a multiple of `ALIGN`).
    fn write_head(&mut self, len: usize) -> io::Result<()> {
        let mut done = 0;
        while done < len {
            match self
                .file
                .write(&self.mem[self.start + done..self.start + len])
            {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // Alignment the device does not accept (or a short write
                // left us unaligned): go on buffered from where it stopped.
                Err(e) if self.direct && unsupported(&e) => self.clear_direct()?,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn clear_direct(&mut self) -> io::Result<()> {
        if self.direct {
            let flags = OFlag::from_bits_truncate(fcntl(self.file.as_fd(), FcntlArg::F_GETFL)?);
            fcntl(
                self.file.as_fd(),
                FcntlArg::F_SETFL(flags - OFlag::O_DIRECT),
            )?;
            self.direct = false;
        }
        Ok(())
    }

    /// Reads once from `r` straight into the buffer (no intermediate
    /// copy); returns what `read` returned. Call `write_full` next.
    pub(crate) fn fill_from(&mut self, r: &mut dyn Read) -> io::Result<usize> {
        let n = r.read(self.spare())?;
        self.fill += n;
        Ok(n)
    }

    /// Writes what is left and returns the file (not synced).
    pub(crate) fn finish(self) -> io::Result<File> {
        self.finish_reuse().map(|(f, _)| f)
    }

    /// Like `finish`, also giving the buffer back for the next writer.
    pub(crate) fn finish_reuse(mut self) -> io::Result<(File, Vec<u8>)> {
        if self.fill > 0 {
            let whole = self.fill / ALIGN * ALIGN;
            if whole > 0 {
                self.write_head(whole)?;
            }
            self.clear_direct()?;
            self.file
                .write_all(&self.mem[self.start + whole..self.start + self.fill])?;
            self.fill = 0;
        }
        Ok((self.file, self.mem))
    }
}

impl Write for DirectWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let spare = self.spare();
        let n = spare.len().min(buf.len());
        spare[..n].copy_from_slice(&buf[..n]);
        self.fill += n;
        self.write_full()?;
        Ok(n)
    }

    /// Data stays buffered until `finish` (a partial block cannot be
    /// written directly).
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::fs::OpenOptions;
    use std::os::unix::fs::OpenOptionsExt;

    use super::*;

    fn open(path: &std::path::Path) -> (File, bool) {
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(O_DIRECT)
            .open(path)
        {
            Ok(f) => (f, true),
            Err(e) if unsupported(&e) => (
                OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(path)
                    .unwrap(),
                false,
            ),
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn writes_every_size_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..3 * DIRECT_CHUNK + 12_345)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        for (i, len) in [
            0,
            1,
            4095,
            4096,
            4097,
            DIRECT_CHUNK,
            DIRECT_CHUNK + 1,
            data.len(),
        ]
        .into_iter()
        .enumerate()
        {
            let path = dir.path().join(format!("f{i}"));
            let (f, direct) = open(&path);
            let mut w = DirectWriter::new(f, direct);
            // Odd-sized writes, then reads from a reader.
            let (a, b) = data[..len].split_at(len / 2);
            for piece in a.chunks(1000) {
                w.write_all(piece).unwrap();
            }
            let mut r = b;
            while w.fill_from(&mut r).unwrap() > 0 {
                w.write_full().unwrap();
            }
            w.finish().unwrap().sync_all().unwrap();
            assert_eq!(std::fs::read(&path).unwrap(), &data[..len], "length {len}");
        }
    }

    #[test]
    fn refused_direct_writes_go_on_buffered() {
        // A buffer the device refuses for direct I/O (misaligned on
        // purpose): the writer falls back to buffered writes, data intact.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let (f, direct) = open(&path);
        let mut w = DirectWriter::new(f, direct);
        w.start += 1;
        let data: Vec<u8> = (0..DIRECT_CHUNK * 2 + 5000)
            .map(|i| (i % 253) as u8)
            .collect();
        w.write_all(&data).unwrap();
        if direct {
            assert!(!w.direct, "the misaligned direct write was not refused");
        }
        w.finish().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), data);
    }
}
