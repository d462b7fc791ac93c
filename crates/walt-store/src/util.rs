//! Small helpers shared by the blob, layer and gc code: hashing, names,
//! removal, thread priority, dates.

use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest as _, Sha256};
use walt_core::Digest;

/// Size of the buffers used on the data path.
pub(crate) const BUF_SIZE: usize = 1 << 20;

/// The digest of a finished hasher.
pub(crate) fn finish_digest(hasher: Sha256) -> Digest {
    Digest::from_sha256(hasher.finalize().into())
}

/// The digest of some bytes.
pub(crate) fn sha256_digest(bytes: &[u8]) -> Digest {
    Digest::from_sha256(Sha256::digest(bytes).into())
}

/// A unique name for a staging file or directory in `tmp/`.
pub(crate) fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{prefix}-{}-{n}-{nanos:08x}", std::process::id())
}

/// Removes whatever is at `path` (file, symlink or directory tree),
/// without following symlinks nor crossing mounts, however deep the tree
/// (walt-tar's [`walt_tar::remove_tree`]: no recursion, one descriptor).
/// Missing is fine.
pub(crate) fn remove_any(path: &Path) -> io::Result<()> {
    walt_tar::remove_tree(path).map_err(io::Error::from)
}

/// Reads `r` to its end, discarding the data; returns the byte count.
pub(crate) fn drain(r: &mut dyn Read, buf: &mut [u8]) -> io::Result<u64> {
    let mut total = 0u64;
    loop {
        match r.read(buf) {
            Ok(0) => return Ok(total),
            Ok(k) => total += k as u64,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Hashes and counts what goes through.
pub(crate) struct HashWriter<W> {
    pub(crate) inner: W,
    pub(crate) hasher: Sha256,
    pub(crate) count: u64,
}

impl<W> HashWriter<W> {
    pub(crate) fn new(inner: W) -> Self {
        HashWriter {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }
}

impl<W: Write> Write for HashWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Lowers the scheduling priority of the calling thread (on Linux the nice
/// value is per thread). Best effort: failing only costs speed.
pub(crate) fn lower_thread_priority() {
    const BACKGROUND_NICE: libc::c_int = 10;
    // SAFETY: setpriority takes plain integers and touches no memory of ours.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, BACKGROUND_NICE) };
    if r != 0 {
        tracing::debug!(error = %io::Error::last_os_error(), "cannot lower a thread's priority");
    }
}

/// Now, in unix seconds.
pub fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// `YYYY-MM-DDTHH:MM:SSZ` of unix seconds.
pub fn rfc3339(secs: i64) -> String {
    let ((y, mo, d), h, mi, s) = walt_core::civil::split_secs(secs);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z")
}
