//! Unpacking a layer tar stream into an overlay-ready directory, with
//! walt-tar's confining extractor: paths confined to the layer root,
//! nothing written through a symlink, OCI whiteouts turned into overlayfs
//! whiteouts, owners, modes, xattrs and mtimes restored. Large files are
//! written around the page cache (`direct.rs`).

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

use walt_tar::{Devices, ExtractOptions, Extractor, FileWriter, Owners, Reader, Whiteouts};

use crate::direct::{DIRECT_MIN_SIZE, DirectWriter, O_DIRECT};
use crate::error::{Result, StoreError};
use crate::staging::SpaceWatch;

/// What unpacking produced.
#[derive(Debug, Default)]
pub(crate) struct UnpackStats {
    #[allow(dead_code)]
    pub entries: u64,
    /// Bytes of file data (apparent sizes: holes count).
    pub bytes: u64,
}

/// The bound on a layer's unpacked bytes: (bytes, the `limits:` key that
/// sets it).
#[derive(Debug, Clone, Copy)]
pub(crate) struct UnpackLimit {
    pub bytes: u64,
    pub key: &'static str,
}

/// Files of at least `DIRECT_MIN_SIZE` go through a `DirectWriter` (with
/// `O_DIRECT` when the filesystem takes it), its aligned buffer kept from
/// one file to the next.
struct StoreWriter {
    direct_buf: Vec<u8>,
    /// Free-space checks as file data is written.
    space: SpaceWatch,
    /// Starts the writeback of what went through the page cache.
    writeback: crate::flush::EarlyFlush,
}

impl FileWriter for StoreWriter {
    fn open_flags(&mut self, size: u64) -> i32 {
        if size >= DIRECT_MIN_SIZE { O_DIRECT } else { 0 }
    }

    fn write(
        &mut self,
        file: File,
        flags: i32,
        size: u64,
        data: &mut dyn Read,
        buf: &mut [u8],
    ) -> io::Result<File> {
        self.space.will_write(size).map_err(io::Error::other)?;
        if size < DIRECT_MIN_SIZE {
            // Each file also writes a block for its inode and entry.
            self.writeback.wrote(size + 4096);
            return walt_tar::PlainWriter.write(file, flags, size, data, buf);
        }
        let mut w = DirectWriter::with_buffer(
            file,
            flags & O_DIRECT != 0,
            std::mem::take(&mut self.direct_buf),
        );
        loop {
            match w.fill_from(data) {
                Ok(0) => break,
                Ok(_) => w.write_full()?,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let (file, buf) = w.finish_reuse()?;
        self.direct_buf = buf;
        Ok(file)
    }
}

/// Unpacks the tar stream `reader` into `root` (an existing, empty
/// directory). `layer` names the layer in error messages.
pub(crate) fn unpack<R: Read>(
    reader: R,
    root: &Path,
    layer: &str,
    limit: UnpackLimit,
    space: SpaceWatch,
) -> Result<UnpackStats> {
    let mut writer = StoreWriter {
        direct_buf: Vec::new(),
        space,
        writeback: crate::flush::EarlyFlush::start(root),
    };
    let opts = ExtractOptions {
        whiteouts: Whiteouts::Overlay,
        owners: Owners::Keep,
        devices: Devices::Create,
        xattrs: true,
        cp_top: None,
        limit: Some(limit.bytes),
        skip_unknown: true,
        area: "layer",
        replace_dirs: true,
    };
    let mut reader = Reader::new(reader);
    let stats = Extractor::new(Some(root), opts, &mut writer)
        .and_then(|x| x.extract(&mut reader))
        .map_err(|e| layer_error(layer, limit, e));
    writer.writeback.finish();
    let stats = stats?;
    tracing::trace!(layer, entries = stats.entries, "layer unpacked");
    Ok(UnpackStats {
        entries: stats.entries,
        bytes: stats.bytes,
    })
}

/// The store's own error carried through an `io::Error` (a free-space
/// check in the writer), if that is what `e` is.
pub(crate) fn store_error_in(e: io::Error) -> std::result::Result<StoreError, io::Error> {
    if e.get_ref().is_some_and(|i| i.is::<StoreError>()) {
        let inner = e.into_inner().expect("checked above");
        return Ok(*inner.downcast::<StoreError>().expect("checked above"));
    }
    Err(e)
}

/// The store's own error carried through a walt-tar writing error, if that
/// is what `e` is.
pub(crate) fn store_error_in_tar(
    e: walt_tar::Error,
) -> std::result::Result<StoreError, walt_tar::Error> {
    match e {
        walt_tar::Error::Write(io) => store_error_in(io).map_err(walt_tar::Error::Write),
        walt_tar::Error::Tree { what, path, source } => {
            store_error_in(source).map_err(|source| walt_tar::Error::Tree { what, path, source })
        }
        e => Err(e),
    }
}

/// walt-tar's errors as the store's.
fn layer_error(layer: &str, limit: UnpackLimit, e: walt_tar::Error) -> StoreError {
    match e {
        walt_tar::Error::Limit { entry, .. } => StoreError::TooLarge {
            what: format!("layer {layer} (at entry '{entry}')"),
            limit: walt_core::config::format_size(limit.bytes),
            key: limit.key,
        },
        walt_tar::Error::Read(e) => StoreError::BadLayer {
            layer: layer.to_string(),
            reason: format!("cannot read the layer stream: {e}"),
        },
        walt_tar::Error::Entry { entry, reason } => StoreError::BadEntry {
            layer: layer.to_string(),
            entry,
            reason,
        },
        walt_tar::Error::Fs {
            what,
            entry,
            source,
        } => match store_error_in(source) {
            Ok(e) => e,
            Err(source) => StoreError::Io {
                context: format!("layer {layer}: {what} '{entry}'"),
                source,
            },
        },
        other => StoreError::BadLayer {
            layer: layer.to_string(),
            reason: other.to_string(),
        },
    }
}
