//! The build cache of `walt image build`: what a build step (or a base
//! image) produced, found again by a key the build engine computes (the
//! parent, the expanded instruction, the inputs' content).
//!
//! An entry is a row of `build_cache` naming layers (and, for a base image,
//! its config blob). Like an image, it keeps what it names from gc (see
//! `db::references`); unlike an image, it may go at any time: an entry
//! whose content is missing is a miss (and is deleted), and
//! [`Store::prune_build_cache`] drops the least recently used entries.

use std::collections::{HashMap, HashSet};

use rusqlite::{Connection, OptionalExtension, params};
use walt_core::Digest;

use crate::Store;
use crate::db::LayerRef;
use crate::error::{DbContext, Result, StoreError};

/// What a cached build step or base image produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheEntry {
    /// The layers the step (0 or 1 layer) or base image (all its layers) produced.
    pub layers: Vec<LayerRef>,
    /// For base-image entries: the config blob (kept by gc too). None for steps.
    pub config_digest: Option<Digest>,
    /// Unix seconds when the entry was first made (kept on later hits).
    pub created: i64,
}

/// Layers per entry at most (an image has fewer: overlay cannot mount
/// more); an entry naming more is treated as corrupt.
const MAX_ENTRY_LAYERS: usize = 4096;

/// The blobs an entry alone keeps (digest, size), none twice; None for a
/// corrupt entry.
type EntryBlobs = Option<Vec<(String, u64)>>;

/// A `build_cache` row as read.
struct RawEntry {
    layers: String,
    config_digest: Option<String>,
    created: i64,
}

/// A row of `SELECT key, layers, config_digest, created FROM build_cache`.
fn read_row(r: &rusqlite::Row<'_>, ctx: &str) -> Result<(String, RawEntry)> {
    let key: String = r.get(0).db(ctx)?;
    let raw = RawEntry {
        layers: r.get(1).db(ctx)?,
        config_digest: r.get(2).db(ctx)?,
        created: r.get(3).db(ctx)?,
    };
    Ok((key, raw))
}

/// The row's entry, or why it is corrupt.
fn parse_entry(raw: &RawEntry) -> std::result::Result<CacheEntry, String> {
    Ok(CacheEntry {
        layers: layers_from_json(&raw.layers)?,
        config_digest: raw
            .config_digest
            .as_deref()
            .map(|d| Digest::parse(d).map_err(|e| format!("config digest: {e}")))
            .transpose()?,
        created: raw.created,
    })
}

fn layers_to_json(layers: &[LayerRef]) -> String {
    let v: Vec<serde_json::Value> = layers
        .iter()
        .map(|l| {
            serde_json::json!({
                "diff_id": l.diff_id.as_str(),
                "blob_digest": l.blob_digest.as_str(),
                "blob_size": l.blob_size,
                "media_type": l.media_type,
            })
        })
        .collect();
    serde_json::Value::Array(v).to_string()
}

fn layers_from_json(text: &str) -> std::result::Result<Vec<LayerRef>, String> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| format!("layers: {e}"))?;
    let items = v.as_array().ok_or("layers: not an array")?;
    if items.len() > MAX_ENTRY_LAYERS {
        return Err(format!("layers: {} of them", items.len()));
    }
    items
        .iter()
        .map(|item| {
            let field = |k: &str| {
                item.get(k)
                    .and_then(|v| v.as_str())
                    .ok_or_else(|| format!("layer: no {k}"))
            };
            let digest = |k: &str| {
                field(k).and_then(|s| Digest::parse(s).map_err(|e| format!("layer {k}: {e}")))
            };
            Ok(LayerRef {
                diff_id: digest("diff_id")?,
                blob_digest: digest("blob_digest")?,
                blob_size: item
                    .get("blob_size")
                    .and_then(|v| v.as_u64())
                    .ok_or("layer: no blob_size")?,
                media_type: field("media_type")?.to_string(),
            })
        })
        .collect()
}

fn read_entry(conn: &Connection, key: &str) -> Result<Option<RawEntry>> {
    conn.query_row(
        "SELECT layers, config_digest, created FROM build_cache WHERE key = ?1",
        [key],
        |r| {
            Ok(RawEntry {
                layers: r.get(0)?,
                config_digest: r.get(1)?,
                created: r.get(2)?,
            })
        },
    )
    .optional()
    .db("reading a build cache entry")
}

fn delete_entry(conn: &Connection, key: &str) -> Result<()> {
    conn.execute("DELETE FROM build_cache WHERE key = ?1", [key])
        .db("removing a build cache entry")
        .map(|_| ())
}

/// The next `used` stamp: Unix milliseconds, made strictly greater than
/// every stamp given so far, so that the least recently used entry is
/// always well defined (two uses in one millisecond keep their order).
fn next_used(conn: &Connection) -> Result<i64> {
    let last: Option<i64> = conn
        .query_row("SELECT MAX(used) FROM build_cache", [], |r| r.get(0))
        .db("reading the build cache")?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    Ok(last.map_or(now, |l| now.max(l.saturating_add(1))))
}

/// Adds the blobs and layers named by build cache entries to the sets of
/// referenced ones (for gc). A corrupt entry references nothing (it is
/// reported, and dropped at its next lookup).
pub(crate) fn references(
    conn: &Connection,
    blobs: &mut HashSet<String>,
    layers: &mut HashSet<String>,
) -> Result<()> {
    let ctx = "listing the blobs and layers of the build cache";
    let mut stmt = conn
        .prepare("SELECT key, layers, config_digest, created FROM build_cache")
        .db(ctx)?;
    let mut rows = stmt.query([]).db(ctx)?;
    while let Some(r) = rows.next().db(ctx)? {
        let (key, raw) = read_row(r, ctx)?;
        match parse_entry(&raw) {
            Ok(e) => {
                for l in e.layers {
                    layers.insert(l.diff_id.to_string());
                    blobs.insert(l.blob_digest.to_string());
                }
                if let Some(c) = e.config_digest {
                    blobs.insert(c.to_string());
                }
            }
            Err(reason) => {
                tracing::warn!(%key, %reason, "corrupt build cache entry: it keeps nothing")
            }
        }
    }
    Ok(())
}

impl Store {
    /// The first of the entry's blobs or layers missing from the store.
    fn cache_missing(&self, entry: &CacheEntry) -> Option<StoreError> {
        for l in &entry.layers {
            if !self.has_blob(&l.blob_digest) {
                return Some(StoreError::BlobNotFound(l.blob_digest.clone()));
            }
            if !self.has_layer(&l.diff_id) {
                return Some(StoreError::LayerNotFound(l.diff_id.clone()));
            }
        }
        match &entry.config_digest {
            Some(c) if !self.has_blob(c) => Some(StoreError::BlobNotFound(c.clone())),
            _ => None,
        }
    }

    /// Looks up a build cache entry; None when absent or when any of its
    /// blobs/layers is missing on disk (the entry is then deleted; a
    /// corrupt entry too). A hit updates the entry's `used` time.
    ///
    /// What a hit names stays in the store only while it is referenced or
    /// an [`crate::ImportGuard`] lives: hold one for the whole build.
    pub fn cache_get(&self, key: &str) -> Result<Option<CacheEntry>> {
        // The gc lock: nothing is collected between the check and the use
        // of the entry's content by a caller holding an import guard.
        let _gc = self.inner.gc_state();
        let conn = self.inner.conn();
        let Some(raw) = read_entry(&conn, key)? else {
            return Ok(None);
        };
        let entry = match parse_entry(&raw) {
            Ok(e) => e,
            Err(reason) => {
                tracing::warn!(%key, %reason, "corrupt build cache entry removed");
                delete_entry(&conn, key)?;
                return Ok(None);
            }
        };
        if let Some(missing) = self.cache_missing(&entry) {
            tracing::info!(%key, %missing, "build cache entry dropped: its content is gone");
            delete_entry(&conn, key)?;
            return Ok(None);
        }
        let used = next_used(&conn)?;
        conn.execute(
            "UPDATE build_cache SET used = ?2 WHERE key = ?1",
            params![key, used],
        )
        .db("recording the use of a build cache entry")?;
        Ok(Some(entry))
    }

    /// Inserts or replaces an entry (its `used` time is now). Every blob
    /// and layer it names must be in the store ([`StoreError::BlobNotFound`],
    /// [`StoreError::LayerNotFound`]): checked under the gc lock, as
    /// [`Store::put_image`] does, so nothing checked is collected before the
    /// entry references it.
    pub fn cache_put(&self, key: &str, entry: &CacheEntry) -> Result<()> {
        if entry.layers.len() > MAX_ENTRY_LAYERS {
            return Err(StoreError::BadLayer {
                layer: format!("build cache entry {key}"),
                reason: format!(
                    "{} layers, more than {MAX_ENTRY_LAYERS}",
                    entry.layers.len()
                ),
            });
        }
        let layers = layers_to_json(&entry.layers);
        let _gc = self.inner.gc_state();
        if let Some(missing) = self.cache_missing(entry) {
            return Err(missing);
        }
        let conn = self.inner.conn();
        let used = next_used(&conn)?;
        conn.execute(
            "INSERT INTO build_cache (key, layers, config_digest, created, used)
             VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (key) DO UPDATE SET layers = excluded.layers,
               config_digest = excluded.config_digest, created = excluded.created,
               used = excluded.used",
            params![
                key,
                layers,
                entry.config_digest.as_ref().map(Digest::as_str),
                entry.created,
                used
            ],
        )
        .db("recording a build cache entry")?;
        tracing::debug!(%key, layers = entry.layers.len(), "build cache entry recorded");
        Ok(())
    }

    /// Removes least-recently-used entries until the blobs that only the
    /// cache keeps (no image references them) add up to at most
    /// `max_bytes`, then collects garbage. Returns how many entries were
    /// removed. Blobs are counted once however many entries name them;
    /// unpacked layer directories are not measured. Corrupt entries are
    /// removed too.
    pub fn prune_build_cache(&self, max_bytes: u64) -> Result<usize> {
        let removed = {
            let _gc = self.inner.gc_state();
            let mut conn = self.inner.conn();
            let ctx = "pruning the build cache";
            let tx = conn.transaction().db(ctx)?;
            let (image_blobs, _) = crate::db::image_references(&tx)?;
            let mut entries: Vec<(String, EntryBlobs)> = Vec::new();
            {
                let mut stmt = tx
                    .prepare(
                        "SELECT key, layers, config_digest, created FROM build_cache
                         ORDER BY used, key",
                    )
                    .db(ctx)?;
                let mut rows = stmt.query([]).db(ctx)?;
                while let Some(r) = rows.next().db(ctx)? {
                    let (key, raw) = read_row(r, ctx)?;
                    let blobs = parse_entry(&raw).ok().map(|e| {
                        let mut v: Vec<(String, u64)> = e
                            .layers
                            .into_iter()
                            .map(|l| (l.blob_digest.to_string(), l.blob_size))
                            .collect();
                        if let Some(c) = e.config_digest {
                            let size = std::fs::metadata(self.blob_path(&c))
                                .map(|m| m.len())
                                .unwrap_or(0);
                            v.push((c.to_string(), size));
                        }
                        v.retain(|(d, _)| !image_blobs.contains(d));
                        v.sort_unstable();
                        v.dedup_by(|a, b| a.0 == b.0);
                        v
                    });
                    entries.push((key, blobs));
                }
            }
            // Blob -> (entries naming it, size).
            let mut kept: HashMap<&str, (usize, u64)> = HashMap::new();
            for (_, blobs) in &entries {
                for (d, size) in blobs.iter().flatten() {
                    kept.entry(d).or_insert((0, *size)).0 += 1;
                }
            }
            let mut total: u64 = kept.values().map(|(_, s)| s).sum();
            let mut removed = 0usize;
            for (key, blobs) in &entries {
                if blobs.is_some() && total <= max_bytes {
                    continue;
                }
                tx.execute("DELETE FROM build_cache WHERE key = ?1", [key])
                    .db(ctx)?;
                removed += 1;
                for (d, _) in blobs.iter().flatten() {
                    if let Some(k) = kept.get_mut(d.as_str()) {
                        k.0 -= 1;
                        if k.0 == 0 {
                            total -= k.1;
                        }
                    }
                }
            }
            tx.commit().db(ctx)?;
            if removed > 0 {
                tracing::info!(removed, kept_bytes = total, max_bytes, "build cache pruned");
            }
            removed
        };
        self.gc()?;
        Ok(removed)
    }

    /// Drops every entry (then collects garbage). Returns how many there
    /// were.
    pub fn clear_build_cache(&self) -> Result<usize> {
        let removed = self
            .inner
            .conn()
            .execute("DELETE FROM build_cache", [])
            .db("clearing the build cache")?;
        tracing::info!(removed, "build cache cleared");
        self.gc()?;
        Ok(removed)
    }
}
