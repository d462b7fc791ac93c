//! Small helpers shared by the blob, layer and gc code: hashing, fsync,
//! staging paths that clean up after themselves.

use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};

use crate::error::{IoContext, Result, StoreError};

/// Size of the buffers used on the data path.
pub(crate) const BUF_SIZE: usize = 1 << 20;

/// `sha256:<hex>` of a finished hasher.
pub(crate) fn finish_digest(hasher: Sha256) -> String {
    format!("sha256:{}", hex::encode(hasher.finalize()))
}

/// `sha256:<hex>` of some bytes.
pub(crate) fn sha256_digest(bytes: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(bytes);
    finish_digest(h)
}

/// Validates a digest and returns its hex part.
pub(crate) fn check_digest(digest: &str) -> Result<&str> {
    walt_core::oci::digest_hex(digest).ok_or_else(|| StoreError::InvalidDigest(digest.to_string()))
}

/// fsyncs a directory (after a rename into it).
pub(crate) fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .ctx("syncing directory", dir)
}

/// Flushes the whole filesystem holding `path` (cheaper than fsyncing
/// every file of an unpacked layer one by one).
pub(crate) fn syncfs(path: &Path) -> Result<()> {
    let f = File::open(path).ctx("opening", path)?;
    nix::unistd::syncfs(&f)
        .map_err(io::Error::from)
        .ctx("syncing the filesystem of", path)
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
/// without following symlinks. Missing is fine.
pub(crate) fn remove_any(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// A staging path that is removed on drop unless `keep()` was called.
pub(crate) struct TmpPath {
    path: Option<PathBuf>,
}

impl TmpPath {
    pub(crate) fn new(path: PathBuf) -> Self {
        TmpPath { path: Some(path) }
    }

    pub(crate) fn path(&self) -> &Path {
        self.path.as_deref().expect("TmpPath used after keep()")
    }

    /// The path was published (renamed away): nothing left to clean.
    pub(crate) fn keep(mut self) {
        self.path = None;
    }
}

impl Drop for TmpPath {
    fn drop(&mut self) {
        if let Some(p) = self.path.take()
            && let Err(e) = remove_any(&p)
        {
            tracing::warn!(path = %p.display(), error = %e, "cannot remove staging path");
        }
    }
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
