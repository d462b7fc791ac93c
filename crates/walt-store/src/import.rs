//! The one-pass layer import, in four stages with clear hand-offs:
//!
//! 1. raw ([`raw_stage`], the calling thread): the compressed bytes as they
//!    come, through a [`BlobWriter`] (blob digest and size, staged in
//!    `tmp/` around the page cache) → a [`StagedBlob`];
//! 2. decode ([`decode_stage`], `walt-decode`): decompression and the
//!    diff_id → [`Decoded`];
//! 3. unpack ([`unpack_stage`], `walt-unpack`): the tar stream into a
//!    [`StagedLayer`];
//! 4. finish ([`Streamed::verify`], then publication): every check, most
//!    telling first, then the blob and the layer renamed into place.
//!
//! Stages 1–3 ([`Pipeline`]) run at once, linked by bounded channels of
//! reused 256 KiB chunks.

use std::io::{self, BufRead, Read};
use std::path::Path;
use std::sync::mpsc;
use std::time::Instant;

use walt_core::oci::Compression;

use crate::Inner;
use crate::direct::DirectWriter;
use crate::error::{Result, StoreError};
use crate::gzip::GzipReader;
use crate::staging::{BlobWriter, Durability, Expected, SpaceWatch, StagedBlob, StagedLayer};
use crate::unpack::{UnpackLimit, UnpackStats, store_error_in};
use crate::util::{drain, lower_thread_priority};
use walt_core::Digest;

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
    pub expected_diff_id: Option<Digest>,
    /// Called with the cumulative number of raw bytes read, at most every
    /// 256 KiB, and once at the end.
    pub progress: Option<Box<dyn Fn(u64) + Send>>,
    /// Run the decompressing and unpacking threads at a lower scheduling
    /// priority, so that the layer on the critical path of a clone (the
    /// largest) gets the CPU first when several are imported at once.
    pub background: bool,
    /// A bound on the layer's unpacked bytes tighter than the store's
    /// `layer-unpacked-size` (what is left of an image's), with the
    /// `limits:` key that sets it.
    pub unpacked_limit: Option<(u64, &'static str)>,
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
            unpacked_limit: None,
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
            .field("unpacked_limit", &self.unpacked_limit)
            .finish()
    }
}

/// The result of importing one layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerImport {
    /// Digest of the compressed blob.
    pub digest: Digest,
    /// Digest of the uncompressed tar stream.
    pub diff_id: Digest,
    /// Size of the compressed blob.
    pub size: u64,
    /// Size of the uncompressed tar stream.
    pub unpacked_size: u64,
    /// Bytes of file data unpacked (apparent sizes: holes count); 0 when
    /// the layer was not unpacked (already stored, or not asked for).
    pub unpacked_bytes: u64,
}

/// The decompression stage.
enum Decoder<R: BufRead> {
    Plain(R),
    Gzip(Box<GzipReader<R>>),
    Zstd(zstd::stream::read::Decoder<'static, R>),
}

impl<R: BufRead> Decoder<R> {
    /// A decoder of `compression` over `input`; `check_crc`: whether the
    /// gzip CRC is checked (the blob digest covers what it would).
    fn new(input: R, compression: Compression, check_crc: bool) -> io::Result<Self> {
        Ok(match compression {
            Compression::None => Decoder::Plain(input),
            Compression::Gzip => Decoder::Gzip(Box::new(GzipReader::new(input, check_crc))),
            Compression::Zstd => Decoder::Zstd(
                zstd::stream::read::Decoder::with_buffer(input).map_err(|e| {
                    io::Error::other(format!("cannot start zstd decompression: {e}"))
                })?,
            ),
        })
    }

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

/// What went wrong on the raw stage.
enum RawError {
    /// Reading the input failed.
    Read(io::Error),
    /// Staging the blob failed, or it is not what was expected.
    Blob(StoreError),
}

/// What the decode stage computed: the diff_id and size of the tar stream.
struct Decoded {
    diff_id: Digest,
    size: u64,
}

/// Stage 1, on the calling thread: reads the raw (compressed) bytes and
/// stages them through `blob` (hashed, counted, written to `tmp/` unless
/// only verified, refused past the expected size), reports progress and
/// passes them on. It always reads to the end of the input (unless it
/// fails), so that a corrupt blob is reported as such even when
/// decompression fails first. Hands off the staged blob, verified against
/// the expected size and digest.
fn raw_stage(
    input: &mut dyn Read,
    mut blob: BlobWriter<DirectWriter>,
    progress: Option<&(dyn Fn(u64) + Send)>,
    mut out: ChunkSender,
) -> std::result::Result<StagedBlob, RawError> {
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
        blob.write_chunk(&chunk).map_err(RawError::Blob)?;
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
    blob.finish().map_err(RawError::Blob)
}

/// Stage 2: decompresses, hashes the tar stream (diff_id) to its very end
/// (padding after the end-of-archive marker included) and passes it on to
/// the unpacker while it lives.
fn decode_stage(
    input: ChunkReader,
    compression: Compression,
    check_crc: bool,
    cap: StreamCap,
    mut out: ChunkSender,
) -> io::Result<Decoded> {
    let mut decoder = Decoder::new(input, compression, check_crc)?;
    // Inflating and hashing on one thread made this stage the pace of a
    // one-layer clone: the hash gets a thread of its own (a copy of each
    // chunk into its batch costs ~1/20 of hashing it).
    let mut hasher = crate::hasher::StreamHasher::on_thread();
    let mut size = 0u64;
    loop {
        let mut chunk = out.take();
        let n = read_full(&mut decoder, &mut chunk)?;
        if n == 0 {
            break;
        }
        chunk.truncate(n);
        hasher.update(&chunk);
        size += n as u64;
        if size > cap.bytes {
            return Err(io::Error::other(cap.error()));
        }
        out.send(chunk);
    }
    // Whatever follows the compressed stream is part of the blob: let the
    // raw stage finish without blocking on a full channel.
    let mut buf = out.take();
    drop(out);
    drain(decoder.get_mut(), &mut buf)?;
    Ok(Decoded {
        diff_id: hasher.finish(),
        size,
    })
}

/// The bound on the uncompressed stream of a layer: twice its unpacked
/// bound (tar headers and padding), plus 1 MiB. It stops a bomb whose
/// files stay small (zeros after the end of the archive, endless headers).
#[derive(Debug)]
struct StreamCap {
    bytes: u64,
    limit: UnpackLimit,
    label: String,
}

impl StreamCap {
    fn new(limit: UnpackLimit, label: &str) -> Self {
        StreamCap {
            bytes: limit.bytes.saturating_mul(2).saturating_add(1 << 20),
            limit,
            label: label.to_string(),
        }
    }

    fn error(&self) -> StoreError {
        StoreError::TooLarge {
            what: format!("layer {}: its uncompressed stream", self.label),
            limit: walt_core::config::format_size(self.bytes),
            key: self.limit.key,
        }
    }
}

/// Stage 3: unpacks the tar stream into `dir` (a staged layer's `diff`).
fn unpack_stage(
    mut input: ChunkReader,
    dir: &Path,
    label: &str,
    limit: UnpackLimit,
    space: SpaceWatch,
) -> Result<UnpackStats> {
    crate::unpack::unpack(&mut input, dir, label, limit, space)
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

/// The three stages of one import, linked by bounded chunk channels: raw
/// bytes (calling thread) → decompression and diff_id (`walt-decode`) →
/// unpacking (`walt-unpack`, when a layer directory is staged).
struct Pipeline<'a> {
    compression: Compression,
    /// Check the gzip CRC (only when the blob digest is not: it covers it).
    check_crc: bool,
    /// Run the decode and unpack threads at a lower priority.
    background: bool,
    progress: Option<&'a (dyn Fn(u64) + Send)>,
    /// Names the layer in errors and traces.
    label: &'a str,
    started: Instant,
    /// The bound on the unpacked bytes.
    limit: UnpackLimit,
    /// Free-space checks of the unpacking.
    space: SpaceWatch,
}

/// What came out of the pipeline, each stage's result as it ended.
struct Streamed {
    raw: std::result::Result<StagedBlob, RawError>,
    decoded: io::Result<Decoded>,
    unpacked: Option<Result<UnpackStats>>,
}

/// When a stage ended, for `RUST_LOG=walt_store=trace`.
fn trace_stage(label: &str, started: Instant, what: &str) {
    tracing::trace!(
        layer = label,
        ms = started.elapsed().as_millis() as u64,
        "{what}"
    );
}

impl Pipeline<'_> {
    /// Runs the stages to their end (each one's result is kept, none is
    /// checked here).
    fn run(
        self,
        input: &mut dyn Read,
        blob: BlobWriter<DirectWriter>,
        layer_dir: Option<&Path>,
    ) -> Streamed {
        // What the other threads need (the progress callback stays here).
        let Pipeline {
            compression,
            check_crc,
            background,
            label,
            started,
            limit,
            space,
            progress,
        } = self;
        let cap = StreamCap::new(limit, label);
        let (raw_out, decode_in) = chunk_channel();
        std::thread::scope(|scope| {
            let (unpack_out, unpacker) = match layer_dir {
                Some(dir) => {
                    let (tx, rx) = chunk_channel();
                    let handle = std::thread::Builder::new()
                        .name("walt-unpack".into())
                        .spawn_scoped(scope, move || {
                            if background {
                                lower_thread_priority();
                            }
                            let r = unpack_stage(rx, dir, label, limit, space);
                            trace_stage(label, started, "unpacked");
                            r
                        })
                        // As `scope.spawn` does.
                        .expect("cannot start the unpacking thread");
                    (tx, Some(handle))
                }
                None => (ChunkSender::detached(), None),
            };
            let decoder = std::thread::Builder::new()
                .name("walt-decode".into())
                .spawn_scoped(scope, move || {
                    if background {
                        lower_thread_priority();
                    }
                    let r = decode_stage(decode_in, compression, check_crc, cap, unpack_out);
                    trace_stage(label, started, "decoded");
                    r
                })
                .expect("cannot start the decompressing thread");
            let raw = raw_stage(input, blob, progress, raw_out);
            trace_stage(label, started, "downloaded");
            let decoded = decoder
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("the decompressing thread panicked")));
            let unpacked = unpacker.map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(StoreError::BadLayer {
                        layer: label.to_string(),
                        reason: "cannot unpack: the unpacking thread panicked".to_string(),
                    })
                })
            });
            Streamed {
                raw,
                decoded,
                unpacked,
            }
        })
    }
}

impl Streamed {
    /// Checks the stages' results, most telling first (a corrupt blob
    /// usually shows first as a decompression or tar error): the raw
    /// stream and the blob's size and digest, then decompression, then
    /// unpacking, then the diff_id.
    fn verify(
        self,
        label: &str,
        expected_diff_id: Option<&Digest>,
    ) -> Result<(StagedBlob, Decoded, Option<UnpackStats>)> {
        let layer_err = |reason: String| StoreError::BadLayer {
            layer: label.to_string(),
            reason,
        };
        let blob = match self.raw {
            Ok(b) => b,
            Err(RawError::Read(e)) => {
                return Err(layer_err(format!("cannot read the layer stream: {e}")));
            }
            Err(RawError::Blob(e)) => return Err(e),
        };
        let decoded = match self.decoded {
            Ok(d) => d,
            Err(e) => {
                return Err(match store_error_in(e) {
                    // Past the stream's cap: the unpacker, when it stopped
                    // first (a file past the limit), says more.
                    Ok(cap) => match self.unpacked {
                        Some(Err(e)) => e,
                        _ => cap,
                    },
                    Err(e) => layer_err(format!("cannot read the layer stream: {e}")),
                });
            }
        };
        let stats = self.unpacked.transpose()?;
        if let Some(expected) = expected_diff_id
            && *expected != decoded.diff_id
        {
            return Err(StoreError::DiffIdMismatch {
                digest: label.to_string(),
                expected: expected.clone(),
                actual: decoded.diff_id,
            });
        }
        Ok((blob, decoded, stats))
    }
}

impl Inner {
    pub(crate) fn import_layer(
        &self,
        input: &mut dyn Read,
        compression: Compression,
        expected_digest: Option<&Digest>,
        opts: &ImportOptions,
    ) -> Result<LayerImport> {
        // What to stage: the blob unless it is stored (or not wanted: then
        // it is only verified), the layer directory unless it is stored.
        // Names the layer in errors.
        let label = expected_digest.map_or("(layer without a known digest)", Digest::as_str);
        let expected_diff_id = opts.expected_diff_id.as_ref();
        let expected = Expected {
            digest: expected_digest,
            size: opts.expected_size,
        };
        let blob = if opts.store_blob {
            BlobWriter::direct(self, expected)?
        } else {
            BlobWriter::verify_only(expected)?
        }
        .label(label)
        .io_context(format!(
            "layer {label}: writing the blob to the staging area"
        ));
        let layer = if opts.unpack && !expected_diff_id.is_some_and(|d| self.has_layer(d)) {
            Some(StagedLayer::create(self, "layer")?)
        } else {
            None
        };

        // Streaming, then verification.
        let started = Instant::now();
        let layer_limit = self.limits().layer_unpacked_size;
        let limit = match opts.unpacked_limit {
            Some((bytes, key)) if bytes < layer_limit => UnpackLimit { bytes, key },
            _ => UnpackLimit {
                bytes: layer_limit,
                key: "layer-unpacked-size",
            },
        };
        let pipeline = Pipeline {
            compression,
            check_crc: expected_digest.is_none(),
            background: opts.background,
            progress: opts.progress.as_deref(),
            label,
            started,
            limit,
            space: SpaceWatch::new(self),
        };
        let layer_dir = layer.as_ref().map(StagedLayer::diff);
        let streamed = pipeline.run(input, blob, layer_dir.as_deref());
        let (blob, decoded, stats) = streamed.verify(label, expected_diff_id)?;

        // Publication: the blob, then the layer directory.
        let streamed = started.elapsed();
        let size = blob.size();
        let digest = blob.publish(self)?;
        if let Some(layer) = layer {
            layer.publish(self, &decoded.diff_id, Durability::SyncFs)?;
        }
        tracing::debug!(digest = %digest, diff_id = %decoded.diff_id, size,
            unpacked_size = decoded.size,
            stream_ms = streamed.as_millis() as u64,
            sync_ms = (started.elapsed() - streamed).as_millis() as u64, "layer imported");
        Ok(LayerImport {
            digest,
            diff_id: decoded.diff_id,
            size,
            unpacked_size: decoded.size,
            unpacked_bytes: stats.map_or(0, |s| s.bytes),
        })
    }
}
