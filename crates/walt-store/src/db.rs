//! The SQLite metadata: images, their layers, nodes.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, Transaction, params};
use walt_core::{Digest, ImageName};

use crate::error::{DbContext, Result, StoreError};

/// A layer of an image, as listed by its manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerRef {
    pub diff_id: Digest,
    pub blob_digest: Digest,
    pub blob_size: u64,
    pub media_type: String,
}

/// An image to record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewImage {
    pub name: ImageName,
    pub manifest_digest: Digest,
    pub manifest_media_type: String,
    pub config_digest: Digest,
    pub layers: Vec<LayerRef>,
    pub node_models: Vec<String>,
    /// Unix seconds.
    pub created: i64,
}

/// An image as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRecord {
    pub id: i64,
    pub name: ImageName,
    pub manifest_digest: Digest,
    pub manifest_media_type: String,
    pub config_digest: Digest,
    pub layers: Vec<LayerRef>,
    pub node_models: Vec<String>,
    pub created: i64,
    /// Sum of the layer blob sizes.
    pub size: u64,
}

/// Whether `put_image` created a new record or replaced one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    Created,
    Replaced,
}

const MIGRATIONS: &[&str] = &[
    // 1: initial schema.
    "CREATE TABLE images (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        owner TEXT NOT NULL,
        name TEXT NOT NULL,
        tag TEXT NOT NULL,
        manifest_digest TEXT NOT NULL,
        manifest_media_type TEXT NOT NULL,
        config_digest TEXT NOT NULL,
        node_models TEXT NOT NULL,
        created INTEGER NOT NULL,
        size INTEGER NOT NULL,
        UNIQUE (owner, name, tag)
    );
    CREATE TABLE image_layers (
        image_id INTEGER NOT NULL REFERENCES images(id) ON DELETE CASCADE,
        position INTEGER NOT NULL,
        diff_id TEXT NOT NULL,
        blob_digest TEXT NOT NULL,
        blob_size INTEGER NOT NULL,
        media_type TEXT NOT NULL,
        PRIMARY KEY (image_id, position)
    );
    CREATE INDEX image_layers_diff_id ON image_layers(diff_id);
    CREATE INDEX image_layers_blob ON image_layers(blob_digest);
    CREATE TABLE nodes (
        mac TEXT PRIMARY KEY,
        model TEXT,
        image_id INTEGER
    );",
    // 2: the build cache (`walt image build`): layers as a JSON array of
    // {diff_id, blob_digest, blob_size, media_type}; `used` in Unix
    // milliseconds, strictly increasing.
    "CREATE TABLE build_cache (
        key TEXT PRIMARY KEY,
        layers TEXT NOT NULL,
        config_digest TEXT,
        created INTEGER NOT NULL,
        used INTEGER NOT NULL
    );
    CREATE INDEX build_cache_used ON build_cache(used);",
    // 3: devices seen on the walt network (DHCP leases) and the nodes among
    // them; the default images each user was given a copy of. The `nodes`
    // table of version 1 was never written.
    "DROP TABLE nodes;
    CREATE TABLE devices (
        mac TEXT PRIMARY KEY,
        ip TEXT,
        name TEXT NOT NULL UNIQUE,
        type TEXT NOT NULL,
        model TEXT,
        reason TEXT,
        first_seen INTEGER NOT NULL,
        last_seen INTEGER NOT NULL
    );
    CREATE INDEX devices_ip ON devices(ip);
    CREATE TABLE nodes (
        mac TEXT PRIMARY KEY REFERENCES devices(mac) ON DELETE CASCADE,
        model TEXT NOT NULL,
        image_id INTEGER NOT NULL REFERENCES images(id)
    );
    CREATE INDEX nodes_image ON nodes(image_id);
    CREATE TABLE default_copies (
        user TEXT NOT NULL,
        image TEXT NOT NULL,
        PRIMARY KEY (user, image)
    );",
    // 4: virtual nodes (issue 17): the qemu settings of the nodes the
    // server runs itself (`walt node create`); gone with their device.
    "CREATE TABLE vnodes (
        mac TEXT PRIMARY KEY REFERENCES devices(mac) ON DELETE CASCADE,
        cpu_cores INTEGER NOT NULL,
        ram_mb INTEGER NOT NULL,
        disks TEXT NOT NULL
    );",
];

/// Opens (creating if needed) and migrates the database.
pub(crate) fn open(path: &Path) -> Result<Connection> {
    let mut conn = Connection::open(path).db(&format!("opening {}", path.display()))?;
    conn.busy_timeout(Duration::from_secs(10))
        .db("setting busy timeout")?;
    conn.pragma_update(None, "journal_mode", "WAL")
        .db("enabling WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")
        .db("setting synchronous mode")?;
    conn.pragma_update(None, "foreign_keys", "ON")
        .db("enabling foreign keys")?;
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .db("reading schema version")?;
    let target = MIGRATIONS.len() as i64;
    if version > target {
        return Err(StoreError::Db {
            context: format!(
                "{} has schema version {version}, newer than this walt ({target})",
                path.display()
            ),
            source: rusqlite::Error::InvalidQuery,
        });
    }
    if version < target {
        let tx = conn.transaction().db("starting migration")?;
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            tx.execute_batch(sql)
                .db(&format!("migrating to schema version {}", i + 1))?;
        }
        tx.pragma_update(None, "user_version", target)
            .db("recording schema version")?;
        tx.commit().db("committing migration")?;
        tracing::info!(from = version, to = target, "store database migrated");
    }
    Ok(conn)
}

const IMAGE_COLUMNS: &str = "id, owner, name, tag, manifest_digest, manifest_media_type, config_digest, node_models, created, size";

/// An `images` row as read, digests not yet validated.
struct RawImage {
    id: i64,
    name: ImageName,
    manifest_digest: String,
    manifest_media_type: String,
    config_digest: String,
    node_models: String,
    created: i64,
    size: u64,
}

fn row_to_record(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawImage> {
    Ok(RawImage {
        id: r.get(0)?,
        name: ImageName {
            owner: r.get(1)?,
            name: r.get(2)?,
            tag: r.get(3)?,
        },
        manifest_digest: r.get(4)?,
        manifest_media_type: r.get(5)?,
        config_digest: r.get(6)?,
        node_models: r.get(7)?,
        created: r.get(8)?,
        size: r.get::<_, i64>(9)? as u64,
    })
}

/// Parses a digest read from the database; a bad one is a corrupt record.
fn stored_digest(image: &ImageName, what: &str, s: &str) -> Result<Digest> {
    Digest::parse(s).map_err(|e| StoreError::Corrupt {
        image: image.to_string(),
        reason: format!("{what}: {e}"),
    })
}

fn complete(conn: &Connection, raw: RawImage) -> Result<ImageRecord> {
    let name = raw.name;
    let node_models = serde_json::from_str(&raw.node_models).map_err(|e| StoreError::Corrupt {
        image: name.to_string(),
        reason: format!("node models: {e}"),
    })?;
    let manifest_digest = stored_digest(&name, "manifest digest", &raw.manifest_digest)?;
    let config_digest = stored_digest(&name, "config digest", &raw.config_digest)?;
    let mut stmt = conn
        .prepare_cached(
            "SELECT diff_id, blob_digest, blob_size, media_type FROM image_layers
             WHERE image_id = ?1 ORDER BY position",
        )
        .db("reading image layers")?;
    let rows = stmt
        .query_map([raw.id], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)? as u64,
                r.get::<_, String>(3)?,
            ))
        })
        .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
        .db("reading image layers")?;
    let layers = rows
        .into_iter()
        .map(|(diff_id, blob_digest, blob_size, media_type)| {
            Ok(LayerRef {
                diff_id: stored_digest(&name, "layer diff_id", &diff_id)?,
                blob_digest: stored_digest(&name, "layer blob digest", &blob_digest)?,
                blob_size,
                media_type,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(ImageRecord {
        id: raw.id,
        name,
        manifest_digest,
        manifest_media_type: raw.manifest_media_type,
        config_digest,
        layers,
        node_models,
        created: raw.created,
        size: raw.size,
    })
}

pub(crate) fn get_image(conn: &Connection, name: &ImageName) -> Result<Option<ImageRecord>> {
    let row = conn
        .query_row(
            &format!(
                "SELECT {IMAGE_COLUMNS} FROM images WHERE owner = ?1 AND name = ?2 AND tag = ?3"
            ),
            params![name.owner, name.name, name.tag],
            row_to_record,
        )
        .optional()
        .db(&format!("reading image '{name}'"))?;
    row.map(|r| complete(conn, r)).transpose()
}

pub(crate) fn list_images(conn: &Connection, owner: Option<&str>) -> Result<Vec<ImageRecord>> {
    let mut stmt = conn
        .prepare(&format!(
            "SELECT {IMAGE_COLUMNS} FROM images WHERE ?1 IS NULL OR owner = ?1 ORDER BY owner, name, tag"
        ))
        .db("listing images")?;
    let rows = stmt
        .query_map([owner], row_to_record)
        .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
        .db("listing images")?;
    rows.into_iter().map(|r| complete(conn, r)).collect()
}

pub(crate) fn image_id(tx: &Transaction<'_>, name: &ImageName) -> Result<Option<i64>> {
    tx.query_row(
        "SELECT id FROM images WHERE owner = ?1 AND name = ?2 AND tag = ?3",
        params![name.owner, name.name, name.tag],
        |r| r.get(0),
    )
    .optional()
    .db(&format!("looking up image '{name}'"))
}

/// Records an image in one transaction.
pub(crate) fn put_image(
    conn: &mut Connection,
    rec: &NewImage,
    replace: bool,
) -> Result<PutOutcome> {
    let ctx = format!("recording image '{}'", rec.name);
    let models = serde_json::to_string(&rec.node_models).expect("strings serialise");
    let size: u64 = rec.layers.iter().map(|l| l.blob_size).sum();
    let tx = conn.transaction().db(&ctx)?;
    let outcome = match image_id(&tx, &rec.name)? {
        Some(_) if !replace => return Err(StoreError::ImageExists(rec.name.to_string())),
        Some(id) => {
            tx.execute(
                "UPDATE images SET manifest_digest = ?2, manifest_media_type = ?3, config_digest = ?4,
                 node_models = ?5, created = ?6, size = ?7 WHERE id = ?1",
                params![
                    id,
                    rec.manifest_digest.as_str(),
                    rec.manifest_media_type,
                    rec.config_digest.as_str(),
                    models,
                    rec.created,
                    size as i64
                ],
            )
            .db(&ctx)?;
            tx.execute("DELETE FROM image_layers WHERE image_id = ?1", [id])
                .db(&ctx)?;
            (id, PutOutcome::Replaced)
        }
        None => {
            tx.execute(
                "INSERT INTO images (owner, name, tag, manifest_digest, manifest_media_type, config_digest,
                 node_models, created, size) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![
                    rec.name.owner,
                    rec.name.name,
                    rec.name.tag,
                    rec.manifest_digest.as_str(),
                    rec.manifest_media_type,
                    rec.config_digest.as_str(),
                    models,
                    rec.created,
                    size as i64
                ],
            )
            .db(&ctx)?;
            (tx.last_insert_rowid(), PutOutcome::Created)
        }
    };
    {
        let mut stmt = tx
            .prepare_cached(
                "INSERT INTO image_layers (image_id, position, diff_id, blob_digest, blob_size, media_type)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )
            .db(&ctx)?;
        for (i, l) in rec.layers.iter().enumerate() {
            stmt.execute(params![
                outcome.0,
                i as i64,
                l.diff_id.as_str(),
                l.blob_digest.as_str(),
                l.blob_size as i64,
                l.media_type
            ])
            .db(&ctx)?;
        }
    }
    tx.commit().db(&ctx)?;
    Ok(outcome.1)
}

pub(crate) fn remove_image(conn: &mut Connection, name: &ImageName) -> Result<()> {
    let ctx = format!("removing image '{name}'");
    let tx = conn.transaction().db(&ctx)?;
    let id = image_id(&tx, name)?.ok_or_else(|| StoreError::ImageNotFound(name.to_string()))?;
    tx.execute("DELETE FROM image_layers WHERE image_id = ?1", [id])
        .db(&ctx)?;
    tx.execute("DELETE FROM images WHERE id = ?1", [id])
        .db(&ctx)?;
    tx.commit().db(&ctx)
}

pub(crate) fn rename_image(conn: &mut Connection, from: &ImageName, to: &ImageName) -> Result<()> {
    let ctx = format!("renaming image '{from}' to '{to}'");
    let tx = conn.transaction().db(&ctx)?;
    let id = image_id(&tx, from)?.ok_or_else(|| StoreError::ImageNotFound(from.to_string()))?;
    if image_id(&tx, to)?.is_some() {
        return Err(StoreError::ImageExists(to.to_string()));
    }
    tx.execute(
        "UPDATE images SET owner = ?2, name = ?3, tag = ?4 WHERE id = ?1",
        params![id, to.owner, to.name, to.tag],
    )
    .db(&ctx)?;
    tx.commit().db(&ctx)
}

pub(crate) fn image_in_use(conn: &Connection, name: &ImageName) -> Result<bool> {
    let ctx = format!("checking whether image '{name}' is in use");
    let id: Option<i64> = conn
        .query_row(
            "SELECT id FROM images WHERE owner = ?1 AND name = ?2 AND tag = ?3",
            params![name.owner, name.name, name.tag],
            |r| r.get(0),
        )
        .optional()
        .db(&ctx)?;
    let id = id.ok_or_else(|| StoreError::ImageNotFound(name.to_string()))?;
    conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM nodes WHERE image_id = ?1)",
        [id],
        |r| r.get(0),
    )
    .db(&ctx)
}

/// Every blob digest and diff_id referenced by an image or a build cache
/// entry: what gc keeps.
pub(crate) fn references(conn: &Connection) -> Result<(HashSet<String>, HashSet<String>)> {
    let (mut blobs, mut layers) = image_references(conn)?;
    crate::build_cache::references(conn, &mut blobs, &mut layers)?;
    Ok((blobs, layers))
}

/// Every blob digest and diff_id referenced by an image.
pub(crate) fn image_references(conn: &Connection) -> Result<(HashSet<String>, HashSet<String>)> {
    let ctx = "listing referenced blobs and layers";
    let mut blobs = HashSet::new();
    let mut layers = HashSet::new();
    let mut stmt = conn
        .prepare("SELECT manifest_digest, config_digest FROM images")
        .db(ctx)?;
    let mut rows = stmt.query([]).db(ctx)?;
    while let Some(r) = rows.next().db(ctx)? {
        blobs.insert(r.get::<_, String>(0).db(ctx)?);
        blobs.insert(r.get::<_, String>(1).db(ctx)?);
    }
    let mut stmt = conn
        .prepare("SELECT DISTINCT diff_id, blob_digest FROM image_layers")
        .db(ctx)?;
    let mut rows = stmt.query([]).db(ctx)?;
    while let Some(r) = rows.next().db(ctx)? {
        layers.insert(r.get::<_, String>(0).db(ctx)?);
        blobs.insert(r.get::<_, String>(1).db(ctx)?);
    }
    Ok((blobs, layers))
}
