//! walt's tar streams, with no I/O policy of its own (it knows nothing of
//! the store, gRPC or sandboxes):
//!
//! - [`Reader`]: a streaming reader of ustar, GNU and PAX archives (long
//!   names and links, PAX records and xattrs, GNU and PAX sparse files,
//!   base-256 numbers, checksums verified) in bounded memory: a PAX record
//!   set, GNU long name or long link over [`MAX_META`] bytes is refused
//!   before anything is allocated for it.
//! - [`Extractor`]: the one confining extractor. What differs between its
//!   users is in [`ExtractOptions`]; what must never differ is enforced in
//!   one place: nothing is written, linked or created outside the
//!   destination root, nor through a symlink (`openat2` with
//!   `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`, or an `O_NOFOLLOW` walk one
//!   component at a time where the kernel lacks it).
//! - [`write_tree`]: the one tree writer (names in byte order, hard links
//!   as links, PAX records for what a header cannot hold, whiteouts
//!   optionally converted from overlay to OCI form).
//! - [`remove_tree`]: the one tree removal (no recursion, one descriptor
//!   however deep the tree, never through a symlink nor into a mount).

mod cp;
mod error;
mod extract;
mod fsops;
mod mounts;
mod read;
mod remove;
mod tree;
mod write;

#[cfg(any(test, feature = "testing"))]
pub mod testing;
#[cfg(test)]
mod tests;

pub use cp::cp_landing;
pub use error::{Error, Result};
pub use extract::{
    CpTop, Devices, ExtractOptions, ExtractStats, Extractor, FileWriter, Owners, PlainWriter,
    Whiteouts,
};
pub use mounts::mounts_below;
pub use read::{Entry, Kind, Reader};
pub use remove::{RemoveError, remove_tree, remove_tree_at};
pub use tree::{TreeOptions, TreeOwners, TreeStats, TreeWhiteouts, write_tree};
pub use write::{Builder, HeaderSpec};

/// Largest PAX record set, GNU long name or long link accepted (bytes).
pub const MAX_META: u64 = 64 * 1024;

/// Longest path [`write_tree`] writes (bytes): a longer one is refused
/// with [`Error::PathTooLong`] before the walk goes any deeper. Half of
/// [`MAX_META`], so that an entry's path and its hard-link target fit in
/// the PAX records a reader bounded by [`MAX_META`] accepts; a chain of
/// one-byte directory names reaches it at 16 384 levels.
pub const MAX_PATH: usize = (MAX_META / 2) as usize;

/// The overlay xattr marking an opaque directory.
pub const OPAQUE_XATTR: &str = "trusted.overlay.opaque";
/// Prefix of overlay's own xattrs: never taken from an archive, never
/// written to one.
pub const OVERLAY_XATTR_PREFIX: &[u8] = b"trusted.overlay.";
/// OCI whiteout prefix.
pub const WHITEOUT_PREFIX: &[u8] = b".wh.";
/// OCI opaque directory marker.
pub const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";
