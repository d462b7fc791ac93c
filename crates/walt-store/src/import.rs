//! The one-pass layer import: hash the raw blob, tee it to a staging file,
//! decompress, hash the tar stream, unpack it, then publish atomically.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::sync::mpsc;

use sha2::{Digest, Sha256};
use walt_core::oci::Compression;

use crate::Inner;
use crate::error::{IoContext, Result, StoreError};
use crate::util::{
    BUF_SIZE, TmpPath, check_digest, drain, finish_digest, fsync_dir, syncfs, unique_name,
};

/// How often (in raw bytes) the progress callback is called at most.
const PROGRESS_STEP: u64 = 256 * 1024;

/// What `import_layer` should do with the stream.
pub struct ImportOptions {
    /// Keep the compressed blob in `blobs/`.
    pub store_blob: bool,
    /// Unpack the layer into `layers/<diff_id>/diff`.
    pub unpack: bool,
    /// The blob size announced by the manifest, checked at the end (and
    /// used to stop reading a stream that goes beyond it).
    pub expected_size: Option<u64>,
    /// The diff_id announced by the image config, checked at the end.
    pub expected_diff_id: Option<String>,
    /// Called with the cumulative number of raw bytes read, at most every
    /// 256 KiB, and once at the end.
    pub progress: Option<Box<dyn Fn(u64) + Send>>,
}

impl Default for ImportOptions {
    fn default() -> Self {
        ImportOptions {
            store_blob: true,
            unpack: true,
            expected_size: None,
            expected_diff_id: None,
            progress: None,
        }
    }
}

impl std::fmt::Debug for ImportOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImportOptions")
            .field("store_blob", &self.store_blob)
            .field("unpack", &self.unpack)
            .field("expected_size", &self.expected_size)
            .field("expected_diff_id", &self.expected_diff_id)
            .field("progress", &self.progress.is_some())
            .finish()
    }
}

/// The result of importing one layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerImport {
    /// Digest of the compressed blob.
    pub digest: String,
    /// Digest of the uncompressed tar stream.
    pub diff_id: String,
    /// Size of the compressed blob.
    pub size: u64,
    /// Size of the uncompressed tar stream.
    pub unpacked_size: u64,
}

/// Reads the raw (compressed) bytes: hashes, counts, tees them to the
/// staging blob file, reports progress, refuses to go past the expected size.
struct RawReader<'a> {
    input: &'a mut dyn Read,
    hasher: Sha256,
    count: u64,
    file: Option<File>,
    limit: Option<u64>,
    progress: Option<&'a (dyn Fn(u64) + Send)>,
    last_progress: u64,
}

impl Read for RawReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.input.read(buf)?;
        if n == 0 {
            return Ok(0);
        }
        self.count += n as u64;
        if let Some(limit) = self.limit
            && self.count > limit
        {
            return Err(io::Error::other(format!(
                "the blob is larger than the expected {limit} bytes"
            )));
        }
        self.hasher.update(&buf[..n]);
        if let Some(f) = &mut self.file {
            f.write_all(&buf[..n]).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("writing the blob to the staging area: {e}"),
                )
            })?;
        }
        if let Some(p) = self.progress
            && self.count - self.last_progress >= PROGRESS_STEP
        {
            self.last_progress = self.count;
            p(self.count);
        }
        Ok(n)
    }
}

/// The decompression stage.
enum Decoder<R: BufRead> {
    Plain(R),
    Gzip(Box<flate2::bufread::MultiGzDecoder<R>>),
    Zstd(zstd::stream::read::Decoder<'static, R>),
}

impl<R: BufRead> Decoder<R> {
    fn get_mut(&mut self) -> &mut R {
        match self {
            Decoder::Plain(r) => r,
            Decoder::Gzip(d) => d.get_mut(),
            Decoder::Zstd(d) => d.get_mut(),
        }
    }

    fn into_inner(self) -> R {
        match self {
            Decoder::Plain(r) => r,
            Decoder::Gzip(d) => d.into_inner(),
            Decoder::Zstd(d) => d.finish(),
        }
    }
}

impl<R: BufRead> Read for Decoder<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Decoder::Plain(r) => r.read(buf),
            Decoder::Gzip(d) => d.read(buf),
            Decoder::Zstd(d) => d.read(buf),
        }
    }
}

/// Hashes and counts the uncompressed tar stream.
struct DiffReader<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
}

impl<R: Read> Read for DiffReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

/// Size of the decompressed chunks handed to the unpacking thread.
const CHUNK: usize = 256 * 1024;
/// Chunks in flight between the two threads.
const CHUNKS_IN_FLIGHT: usize = 8;

/// A `Read` over the chunks the decompressing thread sends; empty buffers
/// go back to it for reuse.
struct ChunkReader {
    rx: mpsc::Receiver<Vec<u8>>,
    recycle: mpsc::SyncSender<Vec<u8>>,
    current: Vec<u8>,
    pos: usize,
}

impl Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.current.len() {
            let Ok(next) = self.rx.recv() else {
                return Ok(0);
            };
            let done = std::mem::replace(&mut self.current, next);
            let _ = self.recycle.try_send(done);
            self.pos = 0;
        }
        let n = buf.len().min(self.current.len() - self.pos);
        buf[..n].copy_from_slice(&self.current[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Hashes the whole decompressed stream and, when `layer_dir` is given,
/// unpacks it there. Decompression and hashing run on this thread while a
/// second thread unpacks, so the two overlap.
fn run_pipeline<R: BufRead>(
    diff: &mut DiffReader<Decoder<R>>,
    layer_dir: Option<&std::path::Path>,
    digest: &str,
    buf: &mut [u8],
) -> Result<()> {
    let layer_err = |e: io::Error| StoreError::BadLayer {
        layer: digest.to_string(),
        reason: format!("cannot read the layer stream: {e}"),
    };
    let Some(dir) = layer_dir else {
        drain(diff, buf).map_err(layer_err)?;
        // Whatever follows the compressed stream is part of the blob too.
        drain(diff.inner.get_mut(), buf).map_err(layer_err)?;
        return Ok(());
    };
    std::thread::scope(|scope| {
        let (tx, rx) = mpsc::sync_channel::<Vec<u8>>(CHUNKS_IN_FLIGHT);
        let (recycle_tx, recycle_rx) = mpsc::sync_channel::<Vec<u8>>(CHUNKS_IN_FLIGHT + 2);
        let unpacker = scope.spawn(move || {
            let mut reader = ChunkReader {
                rx,
                recycle: recycle_tx,
                current: Vec::new(),
                pos: 0,
            };
            let result = crate::unpack::unpack(&mut reader, dir, digest).map(drop);
            // Returning drops the receiver: the sender then only hashes.
            result
        });
        // Feed the unpacker while it lives; hash to the end regardless
        // (padding after the end-of-archive marker included).
        let mut feeding = true;
        let read_result = loop {
            let mut chunk = recycle_rx
                .try_recv()
                .unwrap_or_else(|_| Vec::with_capacity(CHUNK));
            chunk.resize(CHUNK, 0);
            let n = match read_full(diff, &mut chunk) {
                Ok(n) => n,
                Err(e) => break Err(layer_err(e)),
            };
            if n == 0 {
                break Ok(());
            }
            chunk.truncate(n);
            if feeding && tx.send(chunk).is_err() {
                feeding = false;
            }
        };
        drop(tx);
        let unpacked = unpacker
            .join()
            .unwrap_or_else(|_| Err(layer_err(io::Error::other("the unpacking thread panicked"))));
        read_result?;
        unpacked?;
        drain(diff.inner.get_mut(), buf).map_err(layer_err)?;
        Ok(())
    })
}

/// Reads until `buf` is full or the stream ends.
fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(k) => filled += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

impl Inner {
    pub(crate) fn import_layer(
        &self,
        input: &mut dyn Read,
        compression: Compression,
        expected_digest: Option<&str>,
        opts: &ImportOptions,
    ) -> Result<LayerImport> {
        let blob_hex = match expected_digest {
            Some(d) => Some(check_digest(d)?.to_string()),
            None => None,
        };
        // Names the layer in errors.
        let label = expected_digest.unwrap_or("(layer without a known digest)");
        let expected_diff_hex = match &opts.expected_diff_id {
            Some(d) => Some(check_digest(d)?.to_string()),
            None => None,
        };
        let blob_dest = blob_hex.as_ref().map(|h| self.blobs_dir().join(h));
        // Without an expected digest, whether the blob is there is only
        // known at the end: stage it anyway.
        let store_blob = opts.store_blob && !blob_dest.as_ref().is_some_and(|d| d.is_file());
        let unpack = opts.unpack
            && !expected_diff_hex
                .as_deref()
                .is_some_and(|h| self.layers_dir().join(h).join("diff").is_dir());
        let layer_err = |reason: String| StoreError::BadLayer {
            layer: label.to_string(),
            reason,
        };

        // Staging.
        let tmp = self.tmp_dir();
        let blob_tmp = store_blob.then(|| TmpPath::new(tmp.join(unique_name("blob"))));
        let blob_file = match &blob_tmp {
            Some(t) => Some(
                OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o644)
                    .open(t.path())
                    .ctx("creating staging file", t.path())?,
            ),
            None => None,
        };
        let layer_tmp = unpack.then(|| TmpPath::new(tmp.join(unique_name("layer"))));
        if let Some(t) = &layer_tmp {
            fs::create_dir(t.path()).ctx("creating staging directory", t.path())?;
            let diff = t.path().join("diff");
            fs::create_dir(&diff)
                .and_then(|()| fs::set_permissions(&diff, fs::Permissions::from_mode(0o755)))
                .ctx("creating staging directory", &diff)?;
        }

        // The pipeline.
        let raw = RawReader {
            input,
            hasher: Sha256::new(),
            count: 0,
            file: blob_file,
            limit: opts.expected_size,
            progress: opts.progress.as_deref(),
            last_progress: 0,
        };
        let buffered = BufReader::with_capacity(BUF_SIZE, raw);
        let decoder = match compression {
            Compression::None => Decoder::Plain(buffered),
            Compression::Gzip => {
                Decoder::Gzip(Box::new(flate2::bufread::MultiGzDecoder::new(buffered)))
            }
            Compression::Zstd => Decoder::Zstd(
                zstd::stream::read::Decoder::with_buffer(buffered)
                    .map_err(|e| layer_err(format!("cannot start zstd decompression: {e}")))?,
            ),
        };
        let mut diff = DiffReader {
            inner: decoder,
            hasher: Sha256::new(),
            count: 0,
        };
        let mut buf = vec![0u8; BUF_SIZE];
        let layer_dir = layer_tmp.as_ref().map(|t| t.path().join("diff"));
        if let Err(e) = run_pipeline(&mut diff, layer_dir.as_deref(), label, &mut buf) {
            // A corrupt blob usually shows first as a decompression or tar
            // error: read the rest and say what is really wrong when the
            // content does not match its digest.
            let mut raw = diff.inner.into_inner().into_inner();
            let _ = drain(&mut raw, &mut buf);
            let actual = finish_digest(raw.hasher);
            if let Some(expected) = opts.expected_size
                && expected != raw.count
            {
                return Err(StoreError::SizeMismatch {
                    digest: label.to_string(),
                    expected,
                    actual: raw.count,
                });
            }
            if let Some(expected_digest) = expected_digest
                && actual != expected_digest
            {
                return Err(StoreError::DigestMismatch {
                    digest: expected_digest.to_string(),
                    actual,
                });
            }
            return Err(e);
        }
        let DiffReader {
            inner,
            hasher: diff_hasher,
            count: unpacked_size,
        } = diff;
        let mut raw = inner.into_inner().into_inner();
        if let Some(p) = raw.progress {
            p(raw.count);
        }
        let size = raw.count;
        let digest = finish_digest(raw.hasher);
        let diff_id = finish_digest(diff_hasher);

        // Verification.
        if let Some(expected) = opts.expected_size
            && expected != size
        {
            return Err(StoreError::SizeMismatch {
                digest: label.to_string(),
                expected,
                actual: size,
            });
        }
        if let Some(expected_digest) = expected_digest
            && digest != expected_digest
        {
            return Err(StoreError::DigestMismatch {
                digest: expected_digest.to_string(),
                actual: digest,
            });
        }
        if let Some(expected) = &opts.expected_diff_id
            && *expected != diff_id
        {
            return Err(StoreError::DiffIdMismatch {
                digest: label.to_string(),
                expected: expected.clone(),
                actual: diff_id,
            });
        }

        // Publication.
        let blob_dest = match blob_dest {
            Some(d) => d,
            None => self
                .blobs_dir()
                .join(digest.strip_prefix("sha256:").unwrap_or(&digest)),
        };
        if let (Some(t), Some(f)) = (blob_tmp, raw.file.take()) {
            f.sync_all().ctx("syncing staging file", t.path())?;
            drop(f);
            // Already there is only possible without an expected digest
            // (the staging file then goes away with `t`).
            if !blob_dest.is_file() {
                fs::rename(t.path(), &blob_dest).ctx("publishing blob", &blob_dest)?;
                t.keep();
                fsync_dir(&self.blobs_dir())?;
            }
        }
        if let Some(t) = layer_tmp {
            let diff_hex = diff_id.strip_prefix("sha256:").unwrap_or(&diff_id);
            let dest = self.layers_dir().join(diff_hex);
            syncfs(t.path())?;
            match fs::rename(t.path(), &dest) {
                Ok(()) => {
                    t.keep();
                    fsync_dir(&self.layers_dir())?;
                }
                // Someone else published the same layer meanwhile.
                Err(_) if dest.join("diff").is_dir() => {}
                Err(e) => return Err(StoreError::io_path("publishing layer", &dest, e)),
            }
        }
        tracing::debug!(digest = %digest, diff_id = %diff_id, size, unpacked_size, "layer imported");
        Ok(LayerImport {
            digest,
            diff_id,
            size,
            unpacked_size,
        })
    }
}
