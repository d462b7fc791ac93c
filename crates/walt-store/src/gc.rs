//! Garbage collection of blobs and layers no image and no build cache
//! entry references (`db::references`: the one place that lists them),
//! and the import guards that defer it.

use std::fs;
use std::io;
use std::path::Path;
use std::sync::{Arc, MutexGuard};

use crate::Inner;
use crate::error::{IoContext, Result};
use crate::util::{remove_any, unique_name};

/// What a gc run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Imports were in flight: nothing was deleted, the collection runs
    /// when the last [`ImportGuard`] drops.
    pub deferred: bool,
    pub blobs_removed: usize,
    pub layers_removed: usize,
    /// Bytes of blobs removed (unpacked layers are not measured).
    pub blob_bytes_freed: u64,
}

#[derive(Debug, Default)]
pub(crate) struct GcState {
    /// Live import guards.
    pub imports: usize,
    /// A gc was requested while imports were in flight.
    pub pending: bool,
}

/// While any guard lives, gc deletes nothing (it runs when the last one
/// drops). Hold one from the first blob written by an import until the
/// image is recorded with `put_image`.
#[must_use = "the guard protects the import only while it lives"]
pub struct ImportGuard {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for ImportGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ImportGuard")
    }
}

impl Drop for ImportGuard {
    fn drop(&mut self) {
        let mut state = self.inner.gc_state();
        state.imports -= 1;
        if state.imports == 0 && state.pending {
            state.pending = false;
            match self.inner.gc_locked(&mut state) {
                Ok(r) => tracing::debug!(?r, "deferred gc done"),
                Err(e) => tracing::warn!(error = %e, "deferred gc failed"),
            }
        }
    }
}

impl Inner {
    pub(crate) fn gc_state(&self) -> MutexGuard<'_, GcState> {
        self.gc.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn begin_import(self: &Arc<Self>) -> ImportGuard {
        self.gc_state().imports += 1;
        ImportGuard {
            inner: Arc::clone(self),
        }
    }

    pub(crate) fn gc(&self) -> Result<GcReport> {
        let mut state = self.gc_state();
        if state.imports > 0 {
            state.pending = true;
            tracing::debug!(imports = state.imports, "gc deferred");
            return Ok(GcReport {
                deferred: true,
                ..GcReport::default()
            });
        }
        self.gc_locked(&mut state)
    }

    /// The collection itself; the caller holds the gc lock.
    pub(crate) fn gc_locked(&self, _state: &mut GcState) -> Result<GcReport> {
        let (blobs, layers) = crate::db::references(&self.conn())?;
        let mut report = GcReport::default();

        let blobs_dir = self.blobs_dir();
        for entry in read_dir(&blobs_dir)? {
            let name = entry.file_name();
            let digest = format!("sha256:{}", name.to_string_lossy());
            let valid = walt_core::Digest::parse(&digest).is_ok();
            if valid && blobs.contains(&digest) {
                continue;
            }
            let path = entry.path();
            let size = fs::symlink_metadata(&path).map(|m| m.len()).unwrap_or(0);
            remove_any(&path).ctx("removing unreferenced blob", &path)?;
            tracing::info!(%digest, "unreferenced blob removed");
            report.blobs_removed += 1;
            report.blob_bytes_freed += size;
        }

        let layers_dir = self.layers_dir();
        for entry in read_dir(&layers_dir)? {
            let name = entry.file_name();
            let diff_id = format!("sha256:{}", name.to_string_lossy());
            let path = entry.path();
            let keep = walt_core::Digest::parse(&diff_id).is_ok()
                && layers.contains(&diff_id)
                && fs::symlink_metadata(path.join("diff")).is_ok_and(|m| m.is_dir());
            if keep {
                continue;
            }
            // Move it out of layers/ first so that a crash half-way never
            // leaves a partial layer that looks complete.
            let doomed = self.tmp_dir().join(unique_name("gc"));
            fs::rename(&path, &doomed).ctx("moving away unreferenced layer", &path)?;
            remove_any(&doomed).ctx("removing unreferenced layer", &doomed)?;
            tracing::info!(%diff_id, "unreferenced layer removed");
            report.layers_removed += 1;
        }
        if report.blobs_removed + report.layers_removed > 0 {
            tracing::info!(?report, "store gc done");
        }
        Ok(report)
    }
}

fn read_dir(dir: &Path) -> Result<Vec<fs::DirEntry>> {
    fs::read_dir(dir)
        .and_then(|it| it.collect::<io::Result<Vec<_>>>())
        .ctx("listing", dir)
}
