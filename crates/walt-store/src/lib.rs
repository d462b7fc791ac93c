//! walt's internal image store: content-addressed blobs, layers unpacked
//! once (overlay-ready), and the SQLite metadata that ties them to image
//! names.
//!
//! ```text
//! <data_dir>/blobs/sha256/<hex>        blobs exactly as pulled or built
//! <data_dir>/layers/<diffid-hex>/diff  each layer unpacked once
//! <data_dir>/layers/<diffid-hex>/blob-from-tree
//!                                      a layer walt committed: its blob is
//!                                      this tree as a tar (see `blobs`)
//! <data_dir>/tmp/                      staging; emptied at open()
//! <data_dir>/walt.db                   SQLite (WAL)
//! ```
//!
//! Nothing is ever half-visible: blobs and layers are staged in `tmp/` and
//! renamed into place when complete and verified, always through the
//! `staging` module (one way in); an image record is
//! committed only once everything it references is on disk. Blobs and
//! layers that no image and no build cache entry references are collected
//! by [`Store::gc`], which waits while an [`ImportGuard`] lives.
//!
//! Every method is synchronous (call them from `spawn_blocking`).

mod blobs;
mod build_cache;
mod commit;
mod db;
mod direct;
mod error;
mod flush;
mod gc;
mod gzip;
mod hasher;
mod import;
mod inflate;
mod nodes;
mod squash;
mod staging;
mod unpack;
mod util;

use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use rusqlite::Connection;
use walt_core::config::Limits;
use walt_core::oci::Compression;
use walt_core::{Digest, ImageName};

pub use blobs::BlobReader;
pub use build_cache::CacheEntry;
pub use commit::{CommitOutcome, SessionDir};
pub use db::{ImageRecord, LayerRef, NewImage, PutOutcome};
pub use error::{Result, StoreError};
pub use flush::EarlyFlush;
pub use gc::{GcReport, ImportGuard};
pub use import::{ImportOptions, LayerImport};
pub use nodes::{Device, DeviceKind, Lease, Vnode, VnodeConf};
pub use squash::SquashOutcome;
pub use util::{now_secs, rfc3339};
/// Removes a tree however deep (no recursion, one descriptor), never
/// through a symlink nor into a mount: for the server's session directories.
pub use walt_tar::{RemoveError, remove_tree};

use error::IoContext;
use util::remove_any;

/// The image store. `Send + Sync`; share it as `Arc<Store>`.
pub struct Store {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    data_dir: PathBuf,
    db: Mutex<Connection>,
    /// Serialises gc with imports starting and images being recorded.
    gc: Mutex<gc::GcState>,
    /// The bounds in force (the server's `limits:`), read at each import.
    limits: Mutex<Limits>,
}

impl Inner {
    pub(crate) fn blobs_dir(&self) -> PathBuf {
        self.data_dir.join("blobs").join("sha256")
    }

    pub(crate) fn layers_dir(&self) -> PathBuf {
        self.data_dir.join("layers")
    }

    pub(crate) fn tmp_dir(&self) -> PathBuf {
        self.data_dir.join("tmp")
    }

    pub(crate) fn conn(&self) -> MutexGuard<'_, Connection> {
        self.db.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn limits(&self) -> Limits {
        *self.limits.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("data_dir", &self.inner.data_dir)
            .finish()
    }
}

impl Store {
    /// Opens the store in `data_dir` (created if needed): migrates the
    /// database, empties `tmp/` and collects unreferenced blobs and layers.
    pub fn open(data_dir: &Path) -> Result<Store> {
        for d in [
            data_dir.to_path_buf(),
            data_dir.join("blobs").join("sha256"),
            data_dir.join("layers"),
            data_dir.join("tmp"),
        ] {
            fs::create_dir_all(&d).ctx("creating store directory", &d)?;
        }
        for d in [
            data_dir.to_path_buf(),
            data_dir.join("blobs"),
            data_dir.join("blobs").join("sha256"),
            data_dir.join("layers"),
            data_dir.join("tmp"),
        ] {
            restrict_to_owner(&d)?;
        }
        let tmp = data_dir.join("tmp");
        commit::detach_mounts_below(&tmp);
        let leftovers = fs::read_dir(&tmp)
            .and_then(|it| it.collect::<io::Result<Vec<_>>>())
            .ctx("listing", &tmp)?;
        for e in leftovers {
            let p = e.path();
            // A leftover that cannot go (a mount that could not be
            // detached, an immutable file) must not keep the server from
            // starting: it is in tmp/, where nothing reads it.
            match remove_any(&p) {
                Ok(()) => {
                    tracing::info!(path = %p.display(), "removed leftover from an interrupted operation")
                }
                Err(e) => {
                    tracing::warn!(path = %p.display(), error = %e, "cannot remove a leftover from an interrupted operation: left in tmp/")
                }
            }
        }
        let conn = db::open(&data_dir.join("walt.db"))?;
        let store = Store {
            inner: Arc::new(Inner {
                data_dir: data_dir.to_path_buf(),
                db: Mutex::new(conn),
                gc: Mutex::new(gc::GcState::default()),
                limits: Mutex::new(Limits::default()),
            }),
        };
        store.gc()?;
        tracing::debug!(data_dir = %data_dir.display(), "image store open");
        Ok(store)
    }

    pub fn data_dir(&self) -> &Path {
        &self.inner.data_dir
    }

    /// Sets the bounds applied from now on (imports, commits): the
    /// unpacked size of a layer and the free space kept on the store's
    /// filesystem. Running operations keep the ones they started with.
    pub fn set_limits(&self, limits: Limits) {
        *self.inner.limits.lock().unwrap_or_else(|p| p.into_inner()) = limits;
    }

    /// The bounds in force.
    pub fn limits(&self) -> Limits {
        self.inner.limits()
    }

    /// Checks that writing `needed` more bytes would leave the configured
    /// reserve free on the store's filesystem ([`StoreError::NoSpace`]).
    pub fn check_space(&self, needed: u64) -> Result<()> {
        staging::check_free_space(
            &self.inner.data_dir,
            self.inner.limits().free_space_reserve,
            needed,
        )
    }

    /// True when the blob is in the store.
    pub fn has_blob(&self, digest: &Digest) -> bool {
        self.inner.has_blob(digest)
    }

    /// Where the blob is (or would be) stored.
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.inner.blob_path(digest)
    }

    pub fn read_blob(&self, digest: &Digest) -> Result<Vec<u8>> {
        self.inner.read_blob(digest)
    }

    /// The bytes of a blob as a stream: its file, or a tree-backed blob
    /// (a layer walt committed, kept as its files only) produced again
    /// from its layer and verified as it streams: a mismatch with the
    /// digest is an error at the end, never a different blob.
    pub fn open_blob(&self, digest: &Digest) -> Result<BlobReader> {
        self.inner.open_blob(digest)
    }

    /// True when the blob has no file in `blobs/` but is produced from its
    /// layer's files when read ([`Store::open_blob`]).
    pub fn is_tree_backed(&self, digest: &Digest) -> bool {
        self.inner.is_tree_backed(digest)
    }

    /// Makes sure the blob is a file at [`Store::blob_path`] (a
    /// tree-backed blob is written out once, verified); returns the path.
    /// Keep the images using it from being collected meanwhile (hold an
    /// [`ImportGuard`]).
    pub fn materialize_blob(&self, digest: &Digest) -> Result<PathBuf> {
        self.inner.materialize_blob(digest)
    }

    /// Stores `bytes` (verified against `expected_digest` when given);
    /// returns their digest. Storing a blob already present is a no-op.
    pub fn put_blob(&self, expected_digest: Option<&Digest>, bytes: &[u8]) -> Result<Digest> {
        self.inner.put_blob(expected_digest, bytes)
    }

    /// True when the layer is unpacked in the store.
    pub fn has_layer(&self, diff_id: &Digest) -> bool {
        self.inner.has_layer(diff_id)
    }

    /// `layers/<hex>/diff`.
    pub fn layer_path(&self, diff_id: &Digest) -> PathBuf {
        self.inner.layer_path(diff_id)
    }

    /// Imports one layer blob in one pass over `input` (the compressed bytes
    /// as they come): hashes it, optionally keeps it (`opts.store_blob`),
    /// decompresses it, hashes the tar stream (diff_id) and optionally
    /// unpacks it (`opts.unpack`). Digest, size and diff_id are verified
    /// before anything is published; on error nothing is. The input is read
    /// to its end on success.
    ///
    /// When the blob (or the layer, with `expected_diff_id`) is already in
    /// the store, it is verified but not written again.
    pub fn import_layer(
        &self,
        input: &mut dyn Read,
        compression: Compression,
        expected_digest: &Digest,
        opts: &ImportOptions,
    ) -> Result<LayerImport> {
        self.inner
            .import_layer(input, compression, Some(expected_digest), opts)
    }

    /// Like [`Store::import_layer`] for a layer whose digest is not known
    /// beforehand (a `docker save` archive): the blob is published under
    /// the digest computed from `input` (a no-op when already stored).
    /// `opts.expected_size` and `opts.expected_diff_id` are still checked.
    pub fn import_layer_unverified(
        &self,
        input: &mut dyn Read,
        compression: Compression,
        opts: &ImportOptions,
    ) -> Result<LayerImport> {
        self.inner.import_layer(input, compression, None, opts)
    }

    /// Unpacks a layer whose blob is already in the store.
    pub fn unpack_stored_blob(
        &self,
        digest: &Digest,
        compression: Compression,
        expected_diff_id: &Digest,
    ) -> Result<LayerImport> {
        let path = self.blob_path(digest);
        let mut f = File::open(&path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => StoreError::BlobNotFound(digest.clone()),
            _ => StoreError::io_path(&format!("opening blob {digest} at"), &path, e),
        })?;
        let opts = ImportOptions {
            store_blob: false,
            unpack: true,
            expected_size: None,
            expected_diff_id: Some(expected_diff_id.clone()),
            ..Default::default()
        };
        self.inner
            .import_layer(&mut f, compression, Some(digest), &opts)
    }

    /// Records an image. Every blob (manifest, config, layers) and layer it
    /// references must be in the store. An existing name is refused unless
    /// `replace` (the record keeps its id, so nodes follow the name).
    pub fn put_image(&self, rec: &NewImage, replace: bool) -> Result<PutOutcome> {
        let image = rec.name.to_string();
        let missing = |what: &'static str, digest: &Digest| StoreError::MissingContent {
            image: image.clone(),
            what,
            digest: digest.clone(),
        };
        // Hold the gc lock from the check to the commit, so that nothing
        // checked here can be collected before it is referenced.
        let outcome = {
            let _gc = self.inner.gc_state();
            if !self.has_blob(&rec.manifest_digest) {
                return Err(missing("manifest", &rec.manifest_digest));
            }
            if !self.has_blob(&rec.config_digest) {
                return Err(missing("config", &rec.config_digest));
            }
            for l in &rec.layers {
                if !self.has_blob(&l.blob_digest) {
                    return Err(missing("layer blob", &l.blob_digest));
                }
                if !self.has_layer(&l.diff_id) {
                    return Err(missing("unpacked layer", &l.diff_id));
                }
            }
            db::put_image(&mut self.inner.conn(), rec, replace)?
        };
        tracing::info!(image = %rec.name, ?outcome, "image recorded");
        if outcome == PutOutcome::Replaced {
            self.gc_after_change();
        }
        Ok(outcome)
    }

    pub fn get_image(&self, name: &ImageName) -> Result<Option<ImageRecord>> {
        db::get_image(&self.inner.conn(), name)
    }

    /// Images of `owner` (all owners for `None`), sorted by owner, name, tag.
    pub fn list_images(&self, owner: Option<&str>) -> Result<Vec<ImageRecord>> {
        db::list_images(&self.inner.conn(), owner)
    }

    /// Removes an image record, then collects what it alone used (deferred
    /// while imports are in flight). Whether nodes use it is the caller's
    /// business ([`Store::image_in_use`]).
    pub fn remove_image(&self, name: &ImageName) -> Result<()> {
        db::remove_image(&mut self.inner.conn(), name)?;
        tracing::info!(image = %name, "image removed");
        self.gc_after_change();
        Ok(())
    }

    /// Renames an image; `to` must not exist.
    pub fn rename_image(&self, from: &ImageName, to: &ImageName) -> Result<()> {
        db::rename_image(&mut self.inner.conn(), from, to)?;
        tracing::info!(from = %from, to = %to, "image renamed");
        Ok(())
    }

    /// Records `to` as a copy of `from` (sharing blobs and layers); `to`
    /// must not exist.
    pub fn duplicate_image(&self, from: &ImageName, to: &ImageName) -> Result<()> {
        self.copy_image(from, to, false).map(|_| ())
    }

    /// Like [`Store::duplicate_image`], but may replace an existing `to`.
    pub fn copy_image(
        &self,
        from: &ImageName,
        to: &ImageName,
        replace: bool,
    ) -> Result<PutOutcome> {
        let src = self
            .get_image(from)?
            .ok_or_else(|| StoreError::ImageNotFound(from.to_string()))?;
        let rec = NewImage {
            name: to.clone(),
            manifest_digest: src.manifest_digest,
            manifest_media_type: src.manifest_media_type,
            config_digest: src.config_digest,
            layers: src.layers,
            node_models: src.node_models,
            created: src.created,
        };
        self.put_image(&rec, replace)
    }

    /// True when a node boots this image.
    pub fn image_in_use(&self, name: &ImageName) -> Result<bool> {
        db::image_in_use(&self.inner.conn(), name)
    }

    /// Defers gc until the returned guard (and every other) is dropped.
    /// Take one before writing the first blob of an import and keep it
    /// until `put_image` returns.
    pub fn begin_import(&self) -> ImportGuard {
        self.inner.begin_import()
    }

    /// A gc after an image was removed or replaced: the change itself
    /// succeeded, so a failure here is only logged (the next gc retries).
    fn gc_after_change(&self) {
        if let Err(e) = self.gc() {
            tracing::warn!(error = %e, "store gc failed");
        }
    }

    /// Removes blobs and layers no image and no build cache entry
    /// references (and layer dirs without a complete `diff`). Deferred,
    /// deleting nothing, while imports are in flight.
    pub fn gc(&self) -> Result<GcReport> {
        self.inner.gc()
    }
}

#[cfg(test)]
mod bounds_tests;
#[cfg(test)]
mod build_cache_tests;
#[cfg(test)]
mod nodes_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tree_blob_tests;

/// Mode of the store's directories: images keep setuid files and device
/// nodes exactly as they are, so no local account may reach them.
pub const STORE_DIR_MODE: u32 = 0o700;

/// Makes `dir` accessible to its owner only, saying so when it was not.
fn restrict_to_owner(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = fs::metadata(dir)
        .ctx("inspecting", dir)?
        .permissions()
        .mode()
        & 0o7777;
    if mode != STORE_DIR_MODE {
        fs::set_permissions(dir, fs::Permissions::from_mode(STORE_DIR_MODE))
            .ctx("restricting the mode of", dir)?;
        tracing::warn!(
            path = %dir.display(),
            was = format!("{mode:04o}"),
            now = format!("{STORE_DIR_MODE:04o}"),
            "store directory was reachable by other accounts: mode tightened"
        );
    }
    Ok(())
}
