//! Content-addressed blobs: `blobs/sha256/<hex>`, and tree-backed blobs.
//!
//! A layer walt commits itself (`walt image cp`, `walt image shell`, a
//! build step) is an uncompressed tar whose digest is its diff_id. Its
//! bytes are not written at commit time: they are hashed while they are
//! produced from the session's tree, the tree becomes
//! `layers/<hex>/diff`, and the file `layers/<hex>/`[`TREE_BLOB`] (its
//! size) says that the blob `sha256:<hex>` is that tree written as a tar
//! (`squash::layer_tree_options(true)`: deterministic, the same bytes
//! every time). The marker lives and dies with the layer directory (the
//! two are published by one rename and collected together), so a blob is
//! "in the store" ([`Inner::has_blob`]) when its file or its marker is.
//! Whoever needs the bytes reads them through [`Inner::open_blob`]
//! (produced again, verified against the digest as they stream) or
//! writes them once as a file ([`Inner::materialize_blob`]).

use std::fs;
use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};

use crate::Inner;
use crate::error::{Result, StoreError};
use crate::squash::layer_tree_options;
use crate::staging::{BlobWriter, Expected, fsync_dir};
use crate::util::sha256_digest;
use walt_core::Digest;

/// The marker of a tree-backed blob, in `layers/<hex>/`: the tar's size.
pub(crate) const TREE_BLOB: &str = "blob-from-tree";

/// Bytes per chunk of a blob produced from its tree.
const TREE_CHUNK: usize = 1 << 20;

impl Inner {
    pub(crate) fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.blobs_dir().join(digest.hex())
    }

    /// True when the blob is stored as a file or can be produced from
    /// its layer's tree.
    pub(crate) fn has_blob(&self, digest: &Digest) -> bool {
        self.blob_path(digest).is_file() || self.tree_blob_size(digest).is_some()
    }

    /// `layers/<hex>/blob-from-tree`.
    pub(crate) fn tree_blob_marker(&self, digest: &Digest) -> PathBuf {
        self.layers_dir().join(digest.hex()).join(TREE_BLOB)
    }

    /// The size of the tree-backed blob `digest`, when the layer of the
    /// same digest is stored with its marker.
    pub(crate) fn tree_blob_size(&self, digest: &Digest) -> Option<u64> {
        let text = fs::read_to_string(self.tree_blob_marker(digest)).ok()?;
        let size = text.trim().parse().ok()?;
        self.has_layer(digest).then_some(size)
    }

    /// True when the blob has no file but can be produced from its tree.
    pub(crate) fn is_tree_backed(&self, digest: &Digest) -> bool {
        !self.blob_path(digest).is_file() && self.tree_blob_size(digest).is_some()
    }

    /// Writes the marker of a tree-backed blob of `size` bytes in
    /// `layer_dir` (a staged `tmp/<name>/`, holding `diff`), durably.
    pub(crate) fn write_tree_blob_marker(layer_dir: &std::path::Path, size: u64) -> Result<()> {
        let path = layer_dir.join(TREE_BLOB);
        let write = || -> io::Result<()> {
            let mut f = fs::File::create(&path)?;
            f.write_all(format!("{size}\n").as_bytes())?;
            f.sync_all()
        };
        write().map_err(|e| StoreError::io_path("writing", &path, e))?;
        fsync_dir(layer_dir)
    }

    pub(crate) fn read_blob(&self, digest: &Digest) -> Result<Vec<u8>> {
        let path = self.blob_path(digest);
        match fs::read(&path) {
            Ok(b) => Ok(b),
            Err(e) if e.kind() == io::ErrorKind::NotFound && self.is_tree_backed(digest) => {
                let mut bytes = Vec::new();
                self.open_blob(digest)?
                    .read_to_end(&mut bytes)
                    .map_err(|e| StoreError::BlobFromTree {
                        digest: digest.clone(),
                        reason: e.to_string(),
                    })?;
                Ok(bytes)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                Err(StoreError::BlobNotFound(digest.clone()))
            }
            Err(e) => Err(StoreError::io_path(
                &format!("reading blob {digest} from"),
                &path,
                e,
            )),
        }
    }

    /// The bytes of a blob: its file, or for a tree-backed blob the tar
    /// produced again from its layer on a thread, verified as it streams
    /// (digest and size: a mismatch is an error at the end of the stream,
    /// never a short or different blob read to its end).
    pub(crate) fn open_blob(&self, digest: &Digest) -> Result<BlobReader> {
        let path = self.blob_path(digest);
        match fs::File::open(&path) {
            Ok(f) => return Ok(BlobReader(Source::File(f))),
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(StoreError::io_path(
                    &format!("opening blob {digest} at"),
                    &path,
                    e,
                ));
            }
            Err(_) => {}
        }
        let size = self
            .tree_blob_size(digest)
            .ok_or_else(|| StoreError::BlobNotFound(digest.clone()))?;
        let (tx, rx) = sync_channel(4);
        let tree = self.layer_path(digest);
        let d = digest.clone();
        std::thread::Builder::new()
            .name("blob-from-tree".into())
            .spawn(move || {
                let verify = BlobWriter::verify_only(Expected {
                    digest: Some(&d),
                    size: Some(size),
                });
                let result = verify.and_then(|verify| {
                    let w = ChunkSender {
                        tx: tx.clone(),
                        buf: Vec::with_capacity(TREE_CHUNK),
                        verify,
                    };
                    let (mut w, _) = walt_tar::write_tree(w, &tree, &layer_tree_options(true))
                        .map_err(|e| StoreError::BlobFromTree {
                            digest: d.clone(),
                            reason: e.to_string(),
                        })?;
                    w.send()?;
                    w.verify.finish().map(drop)
                });
                let _ = tx.send(match result {
                    Ok(()) => Chunk::Done,
                    Err(StoreError::BlobFromTree { reason, .. }) => Chunk::Failed(reason),
                    Err(e) => Chunk::Failed(mismatch_reason(e)),
                });
            })
            .map_err(|e| StoreError::Io {
                context: "starting a thread".into(),
                source: e,
            })?;
        Ok(BlobReader(Source::Tree {
            rx,
            cur: Vec::new(),
            pos: 0,
            done: false,
            digest: digest.clone(),
        }))
    }

    /// Writes `tree` (overlay form) as the tar blob `digest` of `size`
    /// bytes into `blobs/`, verified.
    pub(crate) fn write_blob_from_tree(
        &self,
        tree: &std::path::Path,
        digest: &Digest,
        size: u64,
    ) -> Result<()> {
        let from_tree = |reason: String| StoreError::BlobFromTree {
            digest: digest.clone(),
            reason,
        };
        let w = BlobWriter::buffered(
            self,
            Expected {
                digest: Some(digest),
                size: Some(size),
            },
        )?;
        let (w, _) = walt_tar::write_tree(w, tree, &layer_tree_options(true)).map_err(|e| {
            crate::unpack::store_error_in_tar(e).unwrap_or_else(|e| from_tree(e.to_string()))
        })?;
        w.finish()
            .map_err(|e| from_tree(mismatch_reason(e)))?
            .publish(self)?;
        Ok(())
    }

    /// Makes sure the blob is a file in `blobs/` (writing a tree-backed
    /// blob out once, verified against its digest); returns its path.
    pub(crate) fn materialize_blob(&self, digest: &Digest) -> Result<PathBuf> {
        let path = self.blob_path(digest);
        if path.is_file() {
            return Ok(path);
        }
        let size = self
            .tree_blob_size(digest)
            .ok_or_else(|| StoreError::BlobNotFound(digest.clone()))?;
        self.write_blob_from_tree(&self.layer_path(digest), digest, size)?;
        tracing::info!(%digest, size, "tree-backed blob written out");
        Ok(path)
    }

    pub(crate) fn put_blob(
        &self,
        expected_digest: Option<&Digest>,
        bytes: &[u8],
    ) -> Result<Digest> {
        // Without an expected digest, whether the blob is stored is only
        // known once it is hashed: then nothing is staged.
        let computed;
        let expected = match expected_digest {
            Some(d) => d,
            None => {
                computed = sha256_digest(bytes);
                if self.has_blob(&computed) {
                    return Ok(computed);
                }
                &computed
            }
        };
        let mut w = BlobWriter::plain(
            self,
            Expected {
                digest: Some(expected),
                size: None,
            },
        )?;
        w.write_chunk(bytes)?;
        w.finish()?.publish(self)
    }

    pub(crate) fn layer_path(&self, diff_id: &Digest) -> PathBuf {
        self.layers_dir().join(diff_id.hex()).join("diff")
    }

    pub(crate) fn has_layer(&self, diff_id: &Digest) -> bool {
        self.layer_path(diff_id).is_dir()
    }
}

/// Why a blob produced from its tree was refused, for
/// [`StoreError::BlobFromTree`]: the files no longer make the tar that was
/// hashed when the layer was saved.
fn mismatch_reason(e: StoreError) -> String {
    match e {
        StoreError::DigestMismatch { actual, .. } => format!(
            "its files now make a tar of digest {actual}: they changed after the layer was saved"
        ),
        StoreError::SizeMismatch {
            expected, actual, ..
        } => format!(
            "its files now make a tar of {actual} bytes, not {expected}: they changed after the layer was saved"
        ),
        e => e.to_string(),
    }
}

enum Chunk {
    Data(Vec<u8>),
    Done,
    Failed(String),
}

/// The writing end of a blob produced from its tree: hashes and counts
/// (the verifier), sends 1 MiB chunks.
struct ChunkSender {
    tx: SyncSender<Chunk>,
    buf: Vec<u8>,
    verify: BlobWriter<fs::File>,
}

impl ChunkSender {
    fn send(&mut self) -> Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(TREE_CHUNK));
        self.tx
            .send(Chunk::Data(chunk))
            .map_err(|_| StoreError::Io {
                context: "sending a blob produced from its tree".into(),
                source: io::ErrorKind::BrokenPipe.into(),
            })
    }
}

impl Write for ChunkSender {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.verify.write_all(buf)?;
        self.buf.extend_from_slice(buf);
        if self.buf.len() >= TREE_CHUNK {
            self.send().map_err(io::Error::other)?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A blob's bytes: its file, or a tree-backed blob as it is produced
/// (see [`Inner::open_blob`]).
pub struct BlobReader(Source);

enum Source {
    File(fs::File),
    Tree {
        rx: Receiver<Chunk>,
        cur: Vec<u8>,
        pos: usize,
        done: bool,
        digest: Digest,
    },
}

impl std::fmt::Debug for BlobReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Source::File(_) => f.write_str("BlobReader::File"),
            Source::Tree { digest, .. } => write!(f, "BlobReader::Tree({digest})"),
        }
    }
}

impl Read for BlobReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let (rx, cur, pos, done, digest) = match &mut self.0 {
            Source::File(f) => return f.read(out),
            Source::Tree {
                rx,
                cur,
                pos,
                done,
                digest,
            } => (rx, cur, pos, done, digest),
        };
        while *pos == cur.len() {
            if *done || out.is_empty() {
                return Ok(0);
            }
            match rx.recv() {
                Ok(Chunk::Data(c)) => {
                    *cur = c;
                    *pos = 0;
                }
                Ok(Chunk::Done) => *done = true,
                Ok(Chunk::Failed(reason)) => {
                    return Err(io::Error::other(
                        StoreError::BlobFromTree {
                            digest: digest.clone(),
                            reason,
                        }
                        .to_string(),
                    ));
                }
                Err(_) => {
                    return Err(io::Error::other(
                        StoreError::BlobFromTree {
                            digest: digest.clone(),
                            reason: "the thread producing it stopped".into(),
                        }
                        .to_string(),
                    ));
                }
            }
        }
        let n = out.len().min(cur.len() - *pos);
        out[..n].copy_from_slice(&cur[*pos..*pos + n]);
        *pos += n;
        Ok(n)
    }
}
