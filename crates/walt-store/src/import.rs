//! The one-pass layer import: hash the raw blob, tee it to a staging file,
//! decompress, hash the tar stream, unpack it, then publish atomically.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::sync::mpsc;

use sha2::{Digest, Sha256};
use walt_core::oci::Compression;

use crate::Inner;
use crate::direct::{self, DirectWriter, O_DIRECT};
use crate::error::{IoContext, Result, StoreError};
use crate::gzip::GzipReader;
use crate::util::{
    TmpPath, check_digest, drain, finish_digest, fsync_dir, lower_thread_priority, syncfs,
    unique_name,
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
    /// Run the decompressing and unpacking threads at a lower scheduling
    /// priority, so that the layer on the critical path of a clone (the
    /// largest) gets the CPU first when several are imported at once.
    pub background: bool,
}

impl Default for ImportOptions {
    fn default() -> Self {
        ImportOptions {
            store_blob: true,
            unpack: true,
            expected_size: None,
            expected_diff_id: None,
            progress: None,
            background: false,
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
            .field("background", &self.background)
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

/// The decompression stage.
enum Decoder<R: BufRead> {
    Plain(R),
    Gzip(Box<GzipReader<R>>),
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

/// Size of the chunks handed from one stage to the next.
const CHUNK: usize = 256 * 1024;
/// Chunks in flight between two stages.
const CHUNKS_IN_FLIGHT: usize = 8;

/// A reader over the chunks the previous stage sends (`BufRead` without a
/// copy); empty buffers go back to it for reuse.
struct ChunkReader {
    rx: mpsc::Receiver<Vec<u8>>,
    recycle: mpsc::SyncSender<Vec<u8>>,
    current: Vec<u8>,
    pos: usize,
}

impl ChunkReader {
    fn new(rx: mpsc::Receiver<Vec<u8>>, recycle: mpsc::SyncSender<Vec<u8>>) -> Self {
        ChunkReader {
            rx,
            recycle,
            current: Vec::new(),
            pos: 0,
        }
    }
}

impl BufRead for ChunkReader {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        while self.pos == self.current.len() {
            let Ok(next) = self.rx.recv() else {
                return Ok(&[]);
            };
            let done = std::mem::replace(&mut self.current, next);
            let _ = self.recycle.try_send(done);
            self.pos = 0;
        }
        Ok(&self.current[self.pos..])
    }

    fn consume(&mut self, n: usize) {
        self.pos = (self.pos + n).min(self.current.len());
    }
}

impl Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let avail = self.fill_buf()?;
        let n = buf.len().min(avail.len());
        buf[..n].copy_from_slice(&avail[..n]);
        self.consume(n);
        Ok(n)
    }
}

/// The sending side of a stage: fills recycled chunks and sends them on
/// while the next stage lives.
struct ChunkSender {
    tx: Option<mpsc::SyncSender<Vec<u8>>>,
    recycled: Option<mpsc::Receiver<Vec<u8>>>,
    /// A chunk nobody took (no next stage, or it has gone), reused.
    spare: Option<Vec<u8>>,
}

/// A channel between two stages.
fn chunk_channel() -> (ChunkSender, ChunkReader) {
    let (tx, rx) = mpsc::sync_channel::<Vec<u8>>(CHUNKS_IN_FLIGHT);
    let (recycle_tx, recycle_rx) = mpsc::sync_channel::<Vec<u8>>(CHUNKS_IN_FLIGHT + 2);
    (
        ChunkSender {
            tx: Some(tx),
            recycled: Some(recycle_rx),
            spare: None,
        },
        ChunkReader::new(rx, recycle_tx),
    )
}

impl ChunkSender {
    /// A sender without a next stage: chunks are only reused.
    fn detached() -> Self {
        ChunkSender {
            tx: None,
            recycled: None,
            spare: None,
        }
    }

    /// An empty chunk of `CHUNK` bytes to fill.
    fn take(&mut self) -> Vec<u8> {
        let mut chunk = self
            .spare
            .take()
            .or_else(|| self.recycled.as_ref().and_then(|r| r.try_recv().ok()))
            .unwrap_or_else(|| Vec::with_capacity(CHUNK));
        chunk.resize(CHUNK, 0);
        chunk
    }

    /// Sends `chunk` on; once the next stage has gone (it failed or
    /// finished), chunks are kept for reuse instead.
    fn send(&mut self, chunk: Vec<u8>) {
        let Some(tx) = &self.tx else {
            self.spare = Some(chunk);
            return;
        };
        if let Err(mpsc::SendError(chunk)) = tx.send(chunk) {
            self.tx = None;
            self.spare = Some(chunk);
        }
    }
}

/// Creates a staging blob file, written around the page cache when the
/// filesystem allows it.
fn create_direct(path: &std::path::Path) -> io::Result<DirectWriter> {
    let open = |flags| {
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(flags)
            .open(path)
    };
    match open(O_DIRECT) {
        Ok(f) => Ok(DirectWriter::new(f, true)),
        Err(e) if direct::unsupported(&e) => Ok(DirectWriter::new(open(0)?, false)),
        Err(e) => Err(e),
    }
}

/// What the raw stage saw.
struct RawOutcome {
    hasher: Sha256,
    count: u64,
    file: Option<File>,
}

/// What went wrong on the raw stage.
enum RawError {
    /// Reading the input failed.
    Read(io::Error),
    /// More bytes than announced.
    TooLong(u64),
    /// Writing the staging blob failed.
    Write(io::Error),
}

/// The first stage, on the calling thread: reads the raw (compressed)
/// bytes, hashes and counts them, tees them to the staging blob file,
/// reports progress, refuses to go past the expected size, and passes them
/// on. It always reads to the end of the input (unless it fails), so that a
/// corrupt blob is reported as such even when decompression fails first.
fn raw_stage(
    input: &mut dyn Read,
    mut file: Option<DirectWriter>,
    limit: Option<u64>,
    progress: Option<&(dyn Fn(u64) + Send)>,
    mut out: ChunkSender,
) -> std::result::Result<RawOutcome, RawError> {
    let mut hasher = Sha256::new();
    let mut count = 0u64;
    let mut last_progress = 0u64;
    loop {
        let mut chunk = out.take();
        let n = read_full(input, &mut chunk).map_err(RawError::Read)?;
        if n == 0 {
            break;
        }
        chunk.truncate(n);
        count += n as u64;
        if let Some(limit) = limit
            && count > limit
        {
            return Err(RawError::TooLong(count));
        }
        hasher.update(&chunk);
        if let Some(f) = &mut file {
            f.write_all(&chunk).map_err(RawError::Write)?;
        }
        if let Some(p) = progress
            && count - last_progress >= PROGRESS_STEP
        {
            last_progress = count;
            p(count);
        }
        out.send(chunk);
    }
    if let Some(p) = progress {
        p(count);
    }
    let file = file
        .map(DirectWriter::finish)
        .transpose()
        .map_err(RawError::Write)?;
    Ok(RawOutcome {
        hasher,
        count,
        file,
    })
}

/// The second stage: decompresses, hashes the tar stream (diff_id) to its
/// very end (padding after the end-of-archive marker included) and passes
/// it on to the unpacker while it lives. Returns the diff_id and size.
fn decode_stage<R: BufRead>(
    decoder: &mut Decoder<R>,
    mut out: ChunkSender,
) -> io::Result<(String, u64)> {
    let mut hasher = Sha256::new();
    let mut count = 0u64;
    loop {
        let mut chunk = out.take();
        let n = read_full(decoder, &mut chunk)?;
        if n == 0 {
            break;
        }
        chunk.truncate(n);
        hasher.update(&chunk);
        count += n as u64;
        out.send(chunk);
    }
    // Whatever follows the compressed stream is part of the blob: let the
    // raw stage finish without blocking on a full channel.
    let mut buf = out.take();
    drop(out);
    drain(decoder.get_mut(), &mut buf)?;
    Ok((finish_digest(hasher), count))
}

/// Reads until `buf` is full or the stream ends.
fn read_full(r: &mut (impl Read + ?Sized), buf: &mut [u8]) -> io::Result<usize> {
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
            Some(t) => Some(create_direct(t.path()).ctx("creating staging file", t.path())?),
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

        // The pipeline: raw bytes (this thread) → decompression and
        // diff_id → unpacking, each stage on its own thread.
        let layer_dir = layer_tmp.as_ref().map(|t| t.path().join("diff"));
        let background = opts.background;
        let started = std::time::Instant::now();
        let (raw_out, decode_in) = chunk_channel();
        let (raw, decoded, unpacked) = std::thread::scope(|scope| {
            let (unpack_tx, unpacker) = match layer_dir.as_deref() {
                Some(dir) => {
                    let (tx, mut rx) = chunk_channel();
                    let handle = std::thread::Builder::new()
                        .name("walt-unpack".into())
                        .spawn_scoped(scope, move || {
                            if background {
                                lower_thread_priority();
                            }
                            let r = crate::unpack::unpack(&mut rx, dir, label).map(drop);
                            tracing::trace!(
                                layer = label,
                                ms = started.elapsed().as_millis() as u64,
                                "unpacked"
                            );
                            r
                        })
                        // As `scope.spawn` does.
                        .expect("cannot start the unpacking thread");
                    (Some(tx), Some(handle))
                }
                None => (None, None),
            };
            let decoding = move || -> io::Result<(String, u64)> {
                if background {
                    lower_thread_priority();
                }
                let mut decoder = match compression {
                    Compression::None => Decoder::Plain(decode_in),
                    // The blob digest covers what the CRC would.
                    Compression::Gzip => Decoder::Gzip(Box::new(GzipReader::new(
                        decode_in,
                        expected_digest.is_none(),
                    ))),
                    Compression::Zstd => {
                        Decoder::Zstd(zstd::stream::read::Decoder::with_buffer(decode_in).map_err(
                            |e| io::Error::other(format!("cannot start zstd decompression: {e}")),
                        )?)
                    }
                };
                let r = decode_stage(
                    &mut decoder,
                    unpack_tx.unwrap_or_else(ChunkSender::detached),
                );
                tracing::trace!(
                    layer = label,
                    ms = started.elapsed().as_millis() as u64,
                    "decoded"
                );
                r
            };
            let decoder = std::thread::Builder::new()
                .name("walt-decode".into())
                .spawn_scoped(scope, decoding)
                .expect("cannot start the decompressing thread");
            let raw = raw_stage(
                input,
                blob_file,
                opts.expected_size,
                opts.progress.as_deref(),
                raw_out,
            );
            tracing::trace!(
                layer = label,
                ms = started.elapsed().as_millis() as u64,
                "downloaded"
            );
            let decoded = decoder
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("the decompressing thread panicked")));
            let unpacked = unpacker.map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(layer_err(
                        "cannot unpack: the unpacking thread panicked".to_string(),
                    ))
                })
            });
            (raw, decoded, unpacked)
        });

        // Verification, most telling first: a corrupt blob usually shows
        // first as a decompression or tar error.
        let mut raw = match raw {
            Ok(r) => r,
            Err(RawError::Read(e)) => {
                return Err(layer_err(format!("cannot read the layer stream: {e}")));
            }
            Err(RawError::Write(e)) => {
                return Err(StoreError::Io {
                    context: format!("layer {label}: writing the blob to the staging area"),
                    source: e,
                });
            }
            Err(RawError::TooLong(actual)) => {
                return Err(StoreError::SizeMismatch {
                    digest: label.to_string(),
                    expected: opts.expected_size.unwrap_or_default(),
                    actual,
                });
            }
        };
        let size = raw.count;
        let digest = finish_digest(std::mem::take(&mut raw.hasher));
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
        let (diff_id, unpacked_size) =
            decoded.map_err(|e| layer_err(format!("cannot read the layer stream: {e}")))?;
        if let Some(r) = unpacked {
            r?;
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
        let streamed = started.elapsed();
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
        tracing::debug!(digest = %digest, diff_id = %diff_id, size, unpacked_size,
            stream_ms = streamed.as_millis() as u64,
            sync_ms = (started.elapsed() - streamed).as_millis() as u64, "layer imported");
        Ok(LayerImport {
            digest,
            diff_id,
            size,
            unpacked_size,
        })
    }
}
