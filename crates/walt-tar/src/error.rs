//! The crate's error type.

use std::io;

/// What went wrong reading, extracting or writing an archive. Messages name
/// the entry (or, when the entry's own header is the problem, the header's
/// offset and the entry before it).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The underlying reader failed.
    #[error("cannot read the archive: {0}")]
    Read(#[source] io::Error),
    /// The archive is malformed (truncated, bad checksum, bad number,
    /// oversized metadata...). `at` says where.
    #[error("{at}: {reason}")]
    Format { at: String, reason: String },
    /// An entry that would be unsafe or impossible to extract.
    #[error("entry '{entry}' {reason}")]
    Entry { entry: String, reason: String },
    /// A filesystem operation failed for an entry.
    #[error("{what} '{entry}': {source}")]
    Fs {
        what: String,
        entry: String,
        #[source]
        source: io::Error,
    },
    /// The caller's limit on bytes written would be exceeded.
    #[error("entry '{entry}' goes over the limit of {limit} bytes written")]
    Limit { entry: String, limit: u64 },
    /// The destination of a `cp -r` archive is not usable (the message is
    /// complete: "<dest>: No such file or directory").
    #[error("{0}")]
    Landing(String),
    /// The archive holds no entry (`cp`: nothing to copy).
    #[error("the archive is empty")]
    Empty,
    /// Reading the tree to archive failed.
    #[error("{what} '{path}': {source}")]
    Tree {
        what: String,
        path: String,
        #[source]
        source: io::Error,
    },
    /// The tree holds a path longer than [`crate::MAX_PATH`]: it cannot
    /// become an archive that a reader bounded like ours accepts. `path`
    /// is shortened to its first components.
    #[error(
        "'{path}' is {depth} levels deep: its path is longer than the {limit} bytes an archive may hold"
    )]
    PathTooLong {
        path: String,
        depth: usize,
        limit: usize,
    },
    /// Writing the archive failed.
    #[error("writing the archive: {0}")]
    Write(#[source] io::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

impl Error {
    pub(crate) fn entry(entry: &[u8], reason: impl Into<String>) -> Self {
        Error::Entry {
            entry: lossy(entry),
            reason: reason.into(),
        }
    }

    pub(crate) fn fs(what: impl Into<String>, entry: &[u8], source: io::Error) -> Self {
        Error::Fs {
            what: what.into(),
            entry: lossy(entry),
            source,
        }
    }
}

impl From<Error> for io::Error {
    /// For callers whose errors carry an `io::Error`.
    fn from(e: Error) -> io::Error {
        match e {
            Error::Read(e) | Error::Write(e) => e,
            Error::Fs {
                source,
                what,
                entry,
            }
            | Error::Tree {
                source,
                what,
                path: entry,
            } => io::Error::new(source.kind(), format!("{what} '{entry}': {source}")),
            other => io::Error::new(io::ErrorKind::InvalidData, other.to_string()),
        }
    }
}
