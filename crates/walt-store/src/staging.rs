//! The one way into the store, like containerd's content writer.
//!
//! Everything that enters `blobs/` or `layers/` is first written in `tmp/`
//! (same filesystem), verified, made durable and renamed into place:
//!
//! - a blob through a [`BlobWriter`]: it owns the staging file's writer
//!   (plain, buffered or `O_DIRECT`), hashes and counts what goes through,
//!   refuses to go past the expected size, and [`BlobWriter::finish`]
//!   checks size and digest (when expected; otherwise it reports the
//!   computed ones) and gives a [`StagedBlob`], which
//!   [`StagedBlob::publish`] fsyncs and renames to `blobs/sha256/<hex>`;
//! - a layer directory through a [`StagedLayer`] (an unpacked layer, a
//!   merged squash tree, a session's upper directory), which
//!   [`StagedLayer::publish`] makes durable as its [`Durability`] says and
//!   renames to `layers/<hex>` (holding `diff/`).
//!
//! Publishing is idempotent (content-addressed: a target already there is
//! the same content, the staged copy is dropped), and whatever was staged
//! but not published is removed on drop: nothing is left in `tmp/`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::hasher::StreamHasher;

use crate::Inner;
use crate::direct::{self, DirectWriter, O_DIRECT};
use crate::error::{IoContext, Result, StoreError};
use crate::util::{BUF_SIZE, remove_any, unique_name};
use walt_core::Digest;
use walt_core::config::Reserve;

/// Bytes written into the store between two checks of its free space (one
/// `statvfs` per 16 MiB: what a writer may go past the reserve by).
pub(crate) const SPACE_CHECK_EVERY: u64 = 16 << 20;

/// Checks that `needed` more bytes leave `reserve` free on the filesystem
/// of `root`.
pub(crate) fn check_free_space(root: &Path, reserve: Reserve, needed: u64) -> Result<()> {
    let st = nix::sys::statvfs::statvfs(root)
        .map_err(io::Error::from)
        .ctx("checking the free space of", root)?;
    let frsize = st.fragment_size() as u64;
    let available = (st.blocks_available() as u64).saturating_mul(frsize);
    let total = (st.blocks() as u64).saturating_mul(frsize);
    let keep = reserve.bytes(total);
    if available < keep.saturating_add(needed) {
        tracing::warn!(path = %root.display(), available, needed, reserve = keep,
            "refused: the store's filesystem would go below its free-space reserve");
        return Err(StoreError::NoSpace {
            available: human_size(available),
            reserve: reserve.to_string(),
        });
    }
    Ok(())
}

/// `n` bytes for people (`1.5G`, `300M`, `12K`).
pub(crate) fn human_size(n: u64) -> String {
    for (shift, unit) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
        if n >= 1 << shift {
            let v = n as f64 / (1u64 << shift) as f64;
            return if v < 10.0 {
                format!("{v:.1}{unit}")
            } else {
                format!("{v:.0}{unit}")
            };
        }
    }
    format!("{n}B")
}

/// Counts what a writer puts in the store and checks the free space every
/// [`SPACE_CHECK_EVERY`] bytes (and before the first write).
pub(crate) struct SpaceWatch {
    root: PathBuf,
    reserve: Reserve,
    since_check: u64,
}

impl SpaceWatch {
    pub(crate) fn new(inner: &Inner) -> Self {
        SpaceWatch {
            root: inner.data_dir.clone(),
            reserve: inner.limits().free_space_reserve,
            since_check: SPACE_CHECK_EVERY,
        }
    }

    /// Called before `n` more bytes are written: a write of 16 MiB or
    /// more is checked as a whole before it starts.
    #[inline]
    pub(crate) fn will_write(&mut self, n: u64) -> Result<()> {
        if self.since_check >= SPACE_CHECK_EVERY || n >= SPACE_CHECK_EVERY {
            self.since_check = 0;
            check_free_space(&self.root, self.reserve, n)?;
        }
        self.since_check += n;
        Ok(())
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

/// Above this many files and directories, [`make_durable`] syncs the
/// filesystem once instead of each of them. Each `fsync` of a small new
/// file costs 0.13–0.20 ms on the project's disk (`bench/fsync.sh`: 32
/// files ~4.5 ms, 256 ~35–50 ms, where one `syncfs` takes 0.4 / 2 ms with
/// nothing else dirty; a `syncfs` also waits for unrelated dirty data).
pub(crate) const SYNC_EACH_MAX: usize = 32;

/// Makes `paths` (files and directories below `root`) durable: one by one
/// for a few (independent of unrelated dirty data), the whole filesystem
/// of `root` at once for many (one flush instead of many).
pub(crate) fn make_durable(root: &Path, paths: &[PathBuf]) -> io::Result<()> {
    if paths.len() > SYNC_EACH_MAX {
        let f = File::open(root)?;
        return nix::unistd::syncfs(&f).map_err(io::Error::from);
    }
    for p in paths {
        File::open(p)?.sync_all()?;
    }
    Ok(())
}

/// Renames the staged `tmp` to `dest` (in `parent`) unless `present` says
/// it is already there (content-addressed: then the staged copy is
/// dropped); a rename that fails because someone published the same
/// content meanwhile is fine too. fsyncs `parent` after a rename.
fn rename_into_place(
    tmp: TmpPath,
    dest: &Path,
    parent: &Path,
    present: impl Fn() -> bool,
    what: &str,
) -> Result<()> {
    if present() {
        return Ok(());
    }
    match fs::rename(tmp.path(), dest) {
        Ok(()) => {
            tmp.keep();
            fsync_dir(parent)
        }
        Err(_) if present() => Ok(()),
        Err(e) => Err(StoreError::io_path(&format!("publishing {what}"), dest, e)),
    }
}

/// What a staged blob must be; `None`: not known beforehand (then the
/// computed value is reported).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Expected<'a> {
    pub(crate) digest: Option<&'a Digest>,
    pub(crate) size: Option<u64>,
}

/// The staging file of a [`BlobWriter`]: a writer that can give its file
/// back once everything buffered is written.
pub(crate) trait StagingFile: Write {
    /// Writes out what is buffered and returns the file (not synced).
    fn into_file(self) -> io::Result<File>;
}

impl StagingFile for File {
    fn into_file(self) -> io::Result<File> {
        Ok(self)
    }
}

impl StagingFile for BufWriter<File> {
    fn into_file(self) -> io::Result<File> {
        self.into_inner().map_err(|e| e.into_error())
    }
}

impl StagingFile for DirectWriter {
    fn into_file(self) -> io::Result<File> {
        self.finish()
    }
}

/// Writes one blob into the store: hashes and counts every byte, writes it
/// to a staging file in `tmp/` (or only verifies it, when the blob is
/// already stored), refuses to go past the expected size. Dropped before
/// [`BlobWriter::finish`] and [`StagedBlob::publish`], it removes its
/// staging file.
pub(crate) struct BlobWriter<W> {
    /// None: verify only (the blob is already stored).
    file: Option<(TmpPath, W)>,
    hasher: StreamHasher,
    count: u64,
    expected_digest: Option<Digest>,
    expected_size: Option<u64>,
    /// Names the blob in size errors (the expected digest, or what the
    /// caller knows it as).
    label: String,
    /// Context of write errors.
    io_context: String,
    /// Free-space checks while a staging file is written.
    space: Option<SpaceWatch>,
    /// Largest size accepted when none is expected: (bytes, `limits:` key).
    limit: Option<(u64, &'static str)>,
}

impl BlobWriter<File> {
    /// A blob written with plain `write`s (small blobs written at once).
    pub(crate) fn plain(inner: &Inner, expected: Expected<'_>) -> Result<Self> {
        Self::create(inner, expected, |p| open_staging(p, 0))
    }
}

impl BlobWriter<BufWriter<File>> {
    /// A blob written through a 1 MiB buffer (many small writes).
    pub(crate) fn buffered(inner: &Inner, expected: Expected<'_>) -> Result<Self> {
        Self::create(inner, expected, |p| {
            Ok(BufWriter::with_capacity(BUF_SIZE, open_staging(p, 0)?))
        })
    }
}

impl BlobWriter<DirectWriter> {
    /// A large blob, written around the page cache when the filesystem
    /// allows it (see `direct.rs`).
    pub(crate) fn direct(inner: &Inner, expected: Expected<'_>) -> Result<Self> {
        Self::create(inner, expected, |p| match open_staging(p, O_DIRECT) {
            Ok(f) => Ok(DirectWriter::new(f, true)),
            Err(e) if direct::unsupported(&e) => Ok(DirectWriter::new(open_staging(p, 0)?, false)),
            Err(e) => Err(e),
        })
    }
}

/// Creates a staging file (0644, never an existing one).
fn open_staging(path: &Path, flags: i32) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(flags)
        .open(path)
}

impl<W: StagingFile> BlobWriter<W> {
    /// A writer for a blob expected to be `expected` (validated); only
    /// verifying when the expected digest is already stored, else writing
    /// to a new staging file opened by `open`.
    fn create(
        inner: &Inner,
        expected: Expected<'_>,
        open: impl FnOnce(&Path) -> io::Result<W>,
    ) -> Result<Self> {
        let mut w = Self::verify_only(expected)?;
        // A tree-backed blob is stored too, but not as a file: a writer
        // asked for is one that writes it out (`materialize_blob`).
        if expected
            .digest
            .is_some_and(|d| inner.blob_path(d).is_file())
        {
            return Ok(w);
        }
        let tmp = TmpPath::new(inner.tmp_dir().join(unique_name("blob")));
        let file = open(tmp.path()).ctx("creating staging file", tmp.path())?;
        w.io_context = format!("writing staging file '{}'", tmp.path().display());
        w.file = Some((tmp, file));
        w.space = Some(SpaceWatch::new(inner));
        Ok(w)
    }

    /// A writer that only verifies (hashes and counts, writes nothing):
    /// for a blob that is already stored.
    pub(crate) fn verify_only(expected: Expected<'_>) -> Result<Self> {
        let expected_digest = expected.digest.cloned();
        Ok(BlobWriter {
            file: None,
            hasher: StreamHasher::inline(),
            count: 0,
            label: expected_digest
                .as_ref()
                .map_or_else(|| "(new blob)".into(), Digest::to_string),
            expected_digest,
            expected_size: expected.size,
            io_context: "writing a staging file".into(),
            space: None,
            limit: None,
        })
    }

    /// Hashes on a thread of its own: for a producer that spends as much
    /// time making the bytes as the hash takes (a tar read from a tree).
    pub(crate) fn hash_on_thread(mut self) -> Self {
        self.hasher = StreamHasher::on_thread();
        self
    }

    /// Refuses to grow past `max` bytes ([`StoreError::TooLarge`] naming
    /// `key` of `limits:`).
    pub(crate) fn limit(mut self, max: u64, key: &'static str) -> Self {
        self.limit = Some((max, key));
        self
    }

    /// Checks a write taking the blob to `end` bytes: expected size,
    /// limit, free space.
    fn check_growth(&mut self, end: u64, n: u64) -> Result<()> {
        if self.expected_size.is_some_and(|max| end > max) {
            return Err(self.too_long(end));
        }
        if let Some((max, key)) = self.limit
            && end > max
        {
            return Err(StoreError::TooLarge {
                what: format!("blob {}", self.label),
                limit: walt_core::config::format_size(max),
                key,
            });
        }
        if let Some(s) = &mut self.space {
            s.will_write(n)?;
        }
        Ok(())
    }

    /// Names the blob in size errors when its digest is not known
    /// beforehand.
    pub(crate) fn label(mut self, label: &str) -> Self {
        if self.expected_digest.is_none() {
            self.label = label.to_string();
        }
        self
    }

    /// The context of the errors of [`BlobWriter::write_chunk`] and
    /// [`BlobWriter::finish`] writing the file (default: its path).
    pub(crate) fn io_context(mut self, context: String) -> Self {
        self.io_context = context;
        self
    }

    /// Whether the blob is written (false: only verified).
    #[cfg(test)]
    pub(crate) fn is_staged(&self) -> bool {
        self.file.is_some()
    }

    /// The error for a blob that would be `actual` bytes long, past its
    /// expected size.
    fn too_long(&self, actual: u64) -> StoreError {
        StoreError::SizeMismatch {
            digest: self.label.clone(),
            expected: self.expected_size.unwrap_or_default(),
            actual,
        }
    }

    /// Hashes, counts and writes all of `buf`; refused (nothing written)
    /// when it would take the blob past its expected size.
    pub(crate) fn write_chunk(&mut self, buf: &[u8]) -> Result<()> {
        let end = self.count + buf.len() as u64;
        self.check_growth(end, buf.len() as u64)?;
        self.count = end;
        self.hasher.update(buf);
        if let Some((_, f)) = &mut self.file {
            f.write_all(buf).map_err(|source| StoreError::Io {
                context: self.io_context.clone(),
                source,
            })?;
        }
        Ok(())
    }

    /// Writes out what is buffered, then checks the size and the digest
    /// against the expected ones (size first).
    pub(crate) fn finish(self) -> Result<StagedBlob> {
        let file = match self.file {
            Some((tmp, w)) => Some((
                tmp,
                w.into_file().map_err(|source| StoreError::Io {
                    context: self.io_context.clone(),
                    source,
                })?,
            )),
            None => None,
        };
        if let Some(expected) = self.expected_size
            && expected != self.count
        {
            return Err(StoreError::SizeMismatch {
                digest: self.label,
                expected,
                actual: self.count,
            });
        }
        let digest = self.hasher.finish();
        if let Some(expected) = self.expected_digest
            && expected != digest
        {
            return Err(StoreError::DigestMismatch {
                digest: expected,
                actual: digest,
            });
        }
        Ok(StagedBlob {
            file,
            digest,
            size: self.count,
        })
    }
}

/// For writers on top (tar, gzip): hashes and counts what the staging file
/// takes. Going past the expected size is an error.
impl<W: StagingFile> Write for BlobWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let end = self.count + buf.len() as u64;
        self.check_growth(end, buf.len() as u64)
            .map_err(io::Error::other)?;
        let n = match &mut self.file {
            Some((_, f)) => f.write(buf)?,
            None => buf.len(),
        };
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.file {
            Some((_, f)) => f.flush(),
            None => Ok(()),
        }
    }
}

/// A complete, verified blob in `tmp/` (or one already stored), not yet
/// durable nor visible. Removed on drop unless published.
pub(crate) struct StagedBlob {
    file: Option<(TmpPath, File)>,
    digest: Digest,
    size: u64,
}

impl StagedBlob {
    /// The blob's digest (verified when one was expected).
    pub(crate) fn digest(&self) -> &Digest {
        &self.digest
    }

    /// The blob's size (verified when one was expected).
    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    /// fsyncs the staging file and renames it to `blobs/sha256/<hex>`
    /// (dropping it when that blob is already stored); returns the digest.
    pub(crate) fn publish(self, inner: &Inner) -> Result<Digest> {
        let Some((tmp, file)) = self.file else {
            return Ok(self.digest);
        };
        let dest = inner.blob_path(&self.digest);
        if !dest.is_file() {
            file.sync_all().ctx("syncing staging file", tmp.path())?;
        }
        drop(file);
        rename_into_place(tmp, &dest, &inner.blobs_dir(), || dest.is_file(), "blob")?;
        tracing::debug!(digest = %self.digest, size = self.size, "blob stored");
        Ok(self.digest)
    }
}

/// How a [`StagedLayer`] is made durable before it is published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Durability {
    /// One `syncfs` of the store's filesystem: the tree's many files were
    /// written without fsyncs of their own.
    SyncFs,
    /// The caller made the tree durable already (see [`make_durable`]).
    AlreadyDurable,
}

/// A layer directory being staged: `tmp/<name>/diff`, published as
/// `layers/<diff_id hex>/diff`. Removed on drop unless published.
pub(crate) struct StagedLayer {
    tmp: TmpPath,
}

impl StagedLayer {
    /// `tmp/<prefix>-…/` with an empty `diff/` (0755) to fill.
    pub(crate) fn create(inner: &Inner, prefix: &str) -> Result<Self> {
        let s = Self::parent(inner, prefix)?;
        let diff = s.diff();
        fs::create_dir(&diff)
            .and_then(|()| fs::set_permissions(&diff, fs::Permissions::from_mode(0o755)))
            .ctx("creating staging directory", &diff)?;
        Ok(s)
    }

    /// `tmp/<prefix>-…/` whose `diff` is the existing directory `dir`
    /// (moved there: it must be on the store's filesystem, e.g. in `tmp/`).
    /// A failed move is reported through `moving`; `dir` is then left
    /// where it was.
    pub(crate) fn adopt(
        inner: &Inner,
        prefix: &str,
        dir: &Path,
        moving: impl FnOnce(io::Error) -> StoreError,
    ) -> Result<Self> {
        let s = Self::parent(inner, prefix)?;
        fs::rename(dir, s.diff()).map_err(moving)?;
        fsync_dir(s.tmp.path())?;
        Ok(s)
    }

    fn parent(inner: &Inner, prefix: &str) -> Result<Self> {
        let tmp = TmpPath::new(inner.tmp_dir().join(unique_name(prefix)));
        fs::create_dir(tmp.path()).ctx("creating staging directory", tmp.path())?;
        Ok(StagedLayer { tmp })
    }

    /// The staged layer directory, `tmp/<name>`.
    pub(crate) fn dir(&self) -> &Path {
        self.tmp.path()
    }

    /// The directory to fill: `tmp/<name>/diff`.
    pub(crate) fn diff(&self) -> PathBuf {
        self.tmp.path().join("diff")
    }

    /// Makes the tree durable (as `durability` says) and renames it to
    /// `layers/<hex of diff_id>`, unless that layer is already stored
    /// (then the staged tree is dropped).
    pub(crate) fn publish(
        self,
        inner: &Inner,
        diff_id: &Digest,
        durability: Durability,
    ) -> Result<()> {
        let dest = inner.layers_dir().join(diff_id.hex());
        let present = || dest.join("diff").is_dir();
        if present() {
            return Ok(());
        }
        if durability == Durability::SyncFs {
            syncfs(self.tmp.path())?;
        }
        rename_into_place(self.tmp, &dest, &inner.layers_dir(), present, "layer")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Store;
    use crate::util::sha256_digest;

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("data")).unwrap();
        (dir, store)
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    /// Nothing in `tmp/`, and in `blobs/` and `layers/` exactly `blobs`
    /// and `layers` (hex names).
    fn assert_store(store: &Store, blobs: &[&str], layers: &[&str]) {
        let inner = &store.inner;
        assert_eq!(names(&inner.tmp_dir()), Vec::<String>::new(), "tmp/");
        assert_eq!(names(&inner.blobs_dir()), blobs, "blobs/");
        assert_eq!(names(&inner.layers_dir()), layers, "layers/");
    }

    /// 3 MiB + a tail: direct writes and a buffered tail.
    fn big() -> Vec<u8> {
        (0..3 * (1 << 20) + 1234)
            .map(|i: usize| (i * 31 % 251) as u8)
            .collect()
    }

    #[test]
    fn digest_mismatch_leaves_nothing() {
        let (_d, store) = store();
        let inner = &store.inner;
        let data = big();
        let wrong = sha256_digest(b"other");
        let expected = Expected {
            digest: Some(&wrong),
            size: Some(data.len() as u64),
        };
        let mut w = BlobWriter::direct(inner, expected).unwrap();
        assert!(w.is_staged());
        assert_eq!(names(&inner.tmp_dir()).len(), 1, "staged in tmp/");
        for c in data.chunks(100_000) {
            w.write_chunk(c).unwrap();
        }
        let e = w.finish().err().expect("a wrong digest is refused");
        assert!(
            matches!(&e, StoreError::DigestMismatch { digest, actual }
                if *digest == wrong && *actual == sha256_digest(&data)),
            "{e}"
        );
        assert_store(&store, &[], &[]);

        // Same through the `Write` side (buffered).
        let mut w = BlobWriter::buffered(inner, expected).unwrap();
        w.write_all(&data).unwrap();
        assert!(matches!(w.finish(), Err(StoreError::DigestMismatch { .. })));
        assert_store(&store, &[], &[]);
    }

    #[test]
    fn size_mismatch_leaves_nothing() {
        let (_d, store) = store();
        let inner = &store.inner;
        let data = big();
        let digest = sha256_digest(&data);
        let len = data.len() as u64;

        // Shorter than expected: refused at the end.
        let mut w = BlobWriter::direct(
            inner,
            Expected {
                digest: Some(&digest),
                size: Some(len + 1),
            },
        )
        .unwrap();
        w.write_chunk(&data).unwrap();
        let e = w.finish().err().expect("a short blob is refused");
        assert!(
            matches!(e, StoreError::SizeMismatch { expected, actual, .. }
                if expected == len + 1 && actual == len),
            "{e}"
        );
        assert_store(&store, &[], &[]);

        // Longer than expected: refused at the write that goes past it.
        let mut w = BlobWriter::direct(
            inner,
            Expected {
                digest: None,
                size: Some(len - 1),
            },
        )
        .unwrap()
        .label("layer x");
        let (a, b) = data.split_at(data.len() / 2);
        w.write_chunk(a).unwrap();
        let e = w.write_chunk(b).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "blob layer x: size does not match (expected {} bytes, got {len})",
                len - 1
            )
        );
        drop(w);
        assert_store(&store, &[], &[]);

        // Same through the `Write` side: an error, nothing past the size.
        let mut w = BlobWriter::buffered(
            inner,
            Expected {
                digest: None,
                size: Some(10),
            },
        )
        .unwrap();
        w.write_all(b"0123456789").unwrap();
        let e = w.write_all(b"x").unwrap_err();
        assert!(e.to_string().contains("expected 10 bytes, got 11"), "{e}");
        assert!(matches!(w.finish(), Ok(b) if b.size() == 10));
        assert_store(&store, &[], &[]);
    }

    #[test]
    fn drop_without_publishing_cleans_up() {
        let (_d, store) = store();
        let inner = &store.inner;
        let data = big();

        // A writer dropped half-way.
        let mut w = BlobWriter::direct(inner, Expected::default()).unwrap();
        w.write_chunk(&data[..2_000_000]).unwrap();
        drop(w);
        assert_store(&store, &[], &[]);

        // A finished, verified blob never published.
        let mut w = BlobWriter::plain(inner, Expected::default()).unwrap();
        w.write_chunk(&data).unwrap();
        let staged = w.finish().unwrap();
        assert_eq!(*staged.digest(), sha256_digest(&data), "computed digest");
        assert_eq!(staged.size(), data.len() as u64, "computed size");
        assert_eq!(names(&inner.tmp_dir()).len(), 1);
        drop(staged);
        assert_store(&store, &[], &[]);

        // A staged layer (filled, and one adopted) never published.
        let layer = StagedLayer::create(inner, "layer").unwrap();
        fs::create_dir(layer.diff().join("etc")).unwrap();
        fs::write(layer.diff().join("etc/f"), b"f").unwrap();
        drop(layer);
        assert_store(&store, &[], &[]);
        let upper = inner.tmp_dir().join("upper");
        fs::create_dir(&upper).unwrap();
        fs::write(upper.join("f"), b"f").unwrap();
        let layer = StagedLayer::adopt(inner, "commit", &upper, |e| panic!("{e}")).unwrap();
        assert!(!upper.exists(), "moved into the staged layer");
        assert_eq!(fs::read(layer.diff().join("f")).unwrap(), b"f");
        drop(layer);
        assert_store(&store, &[], &[]);

        // A directory that cannot be moved is reported and left alone.
        let elsewhere = tempfile::tempdir().unwrap();
        let e = StagedLayer::adopt(inner, "commit", &elsewhere.path().join("nope"), |e| {
            StoreError::io_path("moving", Path::new("nope"), e)
        })
        .err()
        .expect("a missing directory cannot be adopted");
        assert!(e.to_string().starts_with("moving 'nope'"), "{e}");
        assert_store(&store, &[], &[]);
    }

    #[test]
    fn publishing_is_idempotent() {
        let (_d, store) = store();
        let inner = &store.inner;
        let data = big();
        let digest = sha256_digest(&data);

        // Two writers of the same content, the second finishing while the
        // first is published: both succeed, one blob.
        let stage = || {
            let mut w = BlobWriter::direct(inner, Expected::default()).unwrap();
            w.write_chunk(&data).unwrap();
            w.finish().unwrap()
        };
        let (a, b) = (stage(), stage());
        assert_eq!(a.publish(inner).unwrap(), digest);
        assert_eq!(b.publish(inner).unwrap(), digest);
        assert_store(&store, &[digest.hex()], &[]);
        assert_eq!(fs::read(inner.blob_path(&digest)).unwrap(), data);

        // Expected and already stored: only verified, nothing staged.
        let expected = Expected {
            digest: Some(&digest),
            size: Some(data.len() as u64),
        };
        let mut w = BlobWriter::direct(inner, expected).unwrap();
        assert!(!w.is_staged());
        assert_store(&store, &[digest.hex()], &[]);
        w.write_chunk(&data).unwrap();
        assert_eq!(w.finish().unwrap().publish(inner).unwrap(), digest);
        // ... and still verified.
        let mut w = BlobWriter::direct(inner, expected).unwrap();
        w.write_chunk(&data[1..]).unwrap();
        w.write_chunk(b"!").unwrap();
        assert!(matches!(w.finish(), Err(StoreError::DigestMismatch { .. })));
        assert_store(&store, &[digest.hex()], &[]);

        // Layers: the second of two identical trees is dropped.
        let diff_id = sha256_digest(b"a layer");
        let stage = |content: &[u8]| {
            let l = StagedLayer::create(inner, "layer").unwrap();
            fs::write(l.diff().join("f"), content).unwrap();
            l
        };
        let (a, b) = (stage(b"first"), stage(b"second"));
        a.publish(inner, &diff_id, Durability::SyncFs).unwrap();
        b.publish(inner, &diff_id, Durability::AlreadyDurable)
            .unwrap();
        assert_store(&store, &[digest.hex()], &[diff_id.hex()]);
        let f = inner.layer_path(&diff_id).join("f");
        assert_eq!(fs::read(f).unwrap(), b"first");
    }
}
