//! The store's error type.

use std::io;
use std::path::Path;

use walt_core::Digest;

/// Everything that can go wrong in the store. Messages name the image,
/// digest or path concerned.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("blob {0} is not in the store")]
    BlobNotFound(Digest),
    #[error("layer {0} is not in the store")]
    LayerNotFound(Digest),
    /// A tree-backed blob (a layer walt committed, stored as its files)
    /// could not be produced again, or did not match its digest.
    #[error("blob {digest}, produced again from its layer's files: {reason}")]
    BlobFromTree { digest: Digest, reason: String },
    #[error("blob {digest}: content does not match its digest (got {actual})")]
    DigestMismatch { digest: Digest, actual: Digest },
    /// `digest` names the blob: its expected digest, or what the caller
    /// knows it as when the digest is not known beforehand.
    #[error("blob {digest}: size does not match (expected {expected} bytes, got {actual})")]
    SizeMismatch {
        digest: String,
        expected: u64,
        actual: u64,
    },
    #[error(
        "layer {digest}: uncompressed content does not match its diff_id {expected} (got {actual})"
    )]
    DiffIdMismatch {
        /// The layer's label (its blob digest when known).
        digest: String,
        expected: Digest,
        actual: Digest,
    },
    /// A tar entry that would be unsafe or impossible to unpack.
    #[error("layer {layer}: entry '{entry}' {reason}")]
    BadEntry {
        layer: String,
        entry: String,
        reason: String,
    },
    /// The layer stream could not be read, decompressed or parsed.
    #[error("layer {layer}: {reason}")]
    BadLayer { layer: String, reason: String },
    #[error("image '{0}' already exists")]
    ImageExists(String),
    #[error("image '{0}' not found")]
    ImageNotFound(String),
    #[error("node or device '{0}' not found")]
    DeviceNotFound(String),
    #[error("a node or device is already named '{0}'")]
    DeviceExists(String),
    #[error("image '{image}': {what} {digest} is missing from the store")]
    MissingContent {
        image: String,
        what: &'static str,
        digest: Digest,
    },
    /// A session's changes could not be saved as a new layer.
    #[error("image '{image}': cannot save the session: {reason}")]
    CommitFailed { image: String, reason: String },
    /// A build step's changes could not be saved as a layer (`what` names
    /// the step, e.g. "the build of 'alice/img:latest', step 3").
    #[error("{what}: cannot save the layer: {reason}")]
    SaveLayerFailed { what: String, reason: String },
    #[error("image '{image}': stored record is corrupt: {reason}")]
    Corrupt { image: String, reason: String },
    /// Writing more would leave less than the configured reserve free on
    /// the store's filesystem (sizes as `64G`, `512M`).
    #[error(
        "not enough free space on the server: {available} left, {reserve} must stay free \
         (limits.free-space-reserve in the server configuration)"
    )]
    NoSpace { available: String, reserve: String },
    /// Unpacked content past a configured limit (`key` of `limits:`).
    #[error("{what}: more than {limit} unpacked (limits.{key} in the server configuration)")]
    TooLarge {
        what: String,
        limit: String,
        key: &'static str,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("store database: {context}: {source}")]
    Db {
        context: String,
        #[source]
        source: rusqlite::Error,
    },
}

pub type Result<T> = std::result::Result<T, StoreError>;

impl StoreError {
    pub(crate) fn io_path(what: &str, path: &Path, source: io::Error) -> Self {
        StoreError::Io {
            context: format!("{what} '{}'", path.display()),
            source,
        }
    }
}

/// Adds context to I/O results.
pub(crate) trait IoContext<T> {
    fn ctx(self, what: &str, path: &Path) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, what: &str, path: &Path) -> Result<T> {
        self.map_err(|e| StoreError::io_path(what, path, e))
    }
}

/// Adds context to database results.
pub(crate) trait DbContext<T> {
    fn db(self, context: &str) -> Result<T>;
}

impl<T> DbContext<T> for rusqlite::Result<T> {
    fn db(self, context: &str) -> Result<T> {
        self.map_err(|source| StoreError::Db {
            context: context.to_string(),
            source,
        })
    }
}
