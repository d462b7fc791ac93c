//! `squash`: merges every layer of an image into one.
//!
//! The layers (in overlay form, lowest first) are merged into a staging
//! directory applying overlay semantics (whiteouts remove, opaque
//! directories hide what is below); the merged tree is then written as one
//! tar stream (deterministic order), gzipped, hashed (blob digest and
//! diff_id in one pass), and the merged directory itself becomes the
//! unpacked layer: nothing is unpacked a second time.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::fs::{self, Permissions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use filetime::FileTime;
use nix::sys::stat::{Mode, SFlag};
use walt_core::oci;
use walt_core::{Digest, ImageName};

use crate::db::{LayerRef, NewImage, PutOutcome};
use crate::error::{IoContext, Result, StoreError};
use crate::staging::{BlobWriter, Durability, Expected, StagedLayer};
use crate::util::{HashWriter, finish_digest, now_secs, remove_any, rfc3339};
use crate::{Inner, Store};

pub(crate) const OVERLAY_XATTR_PREFIX: &str = "trusted.overlay.";
pub(crate) const OPAQUE_XATTR: &str = "trusted.overlay.opaque";

/// What `squash_image` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SquashOutcome {
    /// Number of layers the image had.
    pub layers_before: usize,
    /// False when there was nothing to do (one layer or none).
    pub squashed: bool,
    /// The new manifest digest (the old one when nothing was done).
    pub manifest_digest: Digest,
    /// The diff_id of the single layer (None for an image without layers).
    pub diff_id: Option<Digest>,
}

impl Store {
    /// Replaces `name` by an image with the same file-system content and
    /// configuration but one layer. An image with at most one layer is left
    /// as it is (`squashed: false`).
    pub fn squash_image(&self, name: &ImageName) -> Result<SquashOutcome> {
        let rec = self
            .get_image(name)?
            .ok_or_else(|| StoreError::ImageNotFound(name.to_string()))?;
        let layers_before = rec.layers.len();
        if layers_before <= 1 {
            return Ok(SquashOutcome {
                layers_before,
                squashed: false,
                manifest_digest: rec.manifest_digest,
                diff_id: rec.layers.first().map(|l| l.diff_id.clone()),
            });
        }
        let _guard = self.begin_import();
        let inner = &self.inner;

        // 1. Merge the layers into tmp/<staging>/diff.
        let staging = StagedLayer::create(inner, "squash")?;
        let merged = staging.diff();
        let mut m = Merger {
            dst_root: &merged,
            image: name.to_string(),
            dir_times: BTreeMap::new(),
            links: HashMap::new(),
        };
        for l in &rec.layers {
            let src = inner.layer_path(&l.diff_id);
            if !src.is_dir() {
                return Err(StoreError::LayerNotFound(l.diff_id.clone()));
            }
            m.links.clear();
            m.apply_meta(&src, &merged, true)?;
            m.dir_times.insert(
                PathBuf::new(),
                mtime_of(&fs::symlink_metadata(&src).ctx("inspecting", &src)?),
            );
            m.merge_dir(&src, Path::new(""))?;
        }
        m.finish()?;

        // 2. Tar + gzip it into a staging blob, hashing both streams.
        let blob_w = BlobWriter::buffered(inner, Expected::default())?;
        let gz = flate2::write::GzEncoder::new(blob_w, flate2::Compression::default());
        let diff_w = HashWriter::new(gz);
        let (diff_w, _) = walt_tar::write_tree(diff_w, &merged, &layer_tree_options(false))
            .map_err(|e| StoreError::Io {
                context: format!("image '{name}': writing the squashed layer"),
                source: e.into(),
            })?;
        let io_err = |e: io::Error| StoreError::Io {
            context: format!("image '{name}': writing the squashed layer"),
            source: e,
        };
        let diff_id = finish_digest(diff_w.hasher);
        let blob = diff_w.inner.finish().map_err(io_err)?.finish()?;
        let size = blob.size();

        // 3. Publish the blob, then the layer directory.
        let digest = blob.publish(inner)?;
        staging.publish(inner, &diff_id, Durability::SyncFs)?;

        // 4. Config and manifest.
        let mut obj = read_config(inner, name, &rec.config_digest)?;
        obj.insert(
            "rootfs".into(),
            serde_json::json!({ "type": "layers", "diff_ids": [diff_id] }),
        );
        let now = now_secs();
        let mut history = match obj.remove("history") {
            Some(serde_json::Value::Array(h)) => h,
            _ => Vec::new(),
        };
        // The old entries no longer have a layer of their own.
        for h in &mut history {
            if let Some(o) = h.as_object_mut() {
                o.insert("empty_layer".into(), serde_json::Value::Bool(true));
            }
        }
        history.push(serde_json::json!({
            "created": rfc3339(now),
            "created_by": "walt image squash",
            "comment": format!("{layers_before} layers merged into 1"),
        }));
        obj.insert("history".into(), serde_json::Value::Array(history));
        let layers = vec![LayerRef {
            diff_id: diff_id.clone(),
            blob_digest: digest,
            blob_size: size,
            media_type: oci::OCI_LAYER_GZIP.to_string(),
        }];
        let (config_digest, manifest_digest) =
            store_config_and_manifest(inner, name, obj, &layers, None)?;
        let new = NewImage {
            name: name.clone(),
            manifest_digest: manifest_digest.clone(),
            manifest_media_type: oci::OCI_MANIFEST.to_string(),
            config_digest,
            layers,
            node_models: rec.node_models,
            created: now,
        };
        if self.put_image(&new, true)? == PutOutcome::Created {
            tracing::warn!(image = %name, "image was removed while being squashed: recorded again");
        }
        tracing::info!(image = %name, layers_before, %diff_id, "image squashed");
        Ok(SquashOutcome {
            layers_before,
            squashed: true,
            manifest_digest,
            diff_id: Some(diff_id),
        })
    }
}

/// How a layer directory is written as a tar stream: the root as `.`, then
/// every entry depth-first in byte order of names, owners, modes, times and
/// xattrs kept (`trusted.overlay.*` never written), files sharing an inode
/// as hard links; an overlay-form tree (`overlay`: a session's upper
/// directory) gets its whiteouts and opaque directories in OCI form.
pub(crate) fn layer_tree_options(overlay: bool) -> walt_tar::TreeOptions {
    walt_tar::TreeOptions {
        whiteouts: if overlay {
            walt_tar::TreeWhiteouts::OverlayToOci
        } else {
            walt_tar::TreeWhiteouts::Keep
        },
        top: None,
        follow_top: false,
        owners: walt_tar::TreeOwners::Keep,
        xattrs: true,
        sparse: true,
    }
}

/// The image config of `image` as a JSON object (unknown keys kept).
pub(crate) fn read_config(
    inner: &Inner,
    image: &ImageName,
    config_digest: &Digest,
) -> Result<serde_json::Map<String, serde_json::Value>> {
    let corrupt = |reason: String| StoreError::Corrupt {
        image: image.to_string(),
        reason,
    };
    let bytes = inner.read_blob(config_digest)?;
    match serde_json::from_slice(&bytes) {
        Ok(serde_json::Value::Object(o)) => Ok(o),
        Ok(_) => Err(corrupt("the image config is not a JSON object".into())),
        Err(e) => Err(corrupt(format!("cannot parse the image config: {e}"))),
    }
}

/// Stores `config` and an OCI manifest referencing it and `layers` (with
/// `annotations` when given); returns the config and manifest digests.
pub(crate) fn store_config_and_manifest(
    inner: &Inner,
    image: &ImageName,
    config: serde_json::Map<String, serde_json::Value>,
    layers: &[LayerRef],
    annotations: Option<serde_json::Value>,
) -> Result<(Digest, Digest)> {
    let corrupt = |reason: String| StoreError::Corrupt {
        image: image.to_string(),
        reason,
    };
    let config_bytes = serde_json::to_vec(&config)
        .map_err(|e| corrupt(format!("cannot write the image config: {e}")))?;
    let config_digest = inner.put_blob(None, &config_bytes)?;
    let layers: Vec<serde_json::Value> = layers
        .iter()
        .map(|l| {
            serde_json::json!({
                "mediaType": l.media_type,
                "digest": l.blob_digest,
                "size": l.blob_size,
            })
        })
        .collect();
    let mut manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": oci::OCI_MANIFEST,
        "config": {
            "mediaType": oci::OCI_CONFIG,
            "digest": config_digest,
            "size": config_bytes.len(),
        },
        "layers": layers,
    });
    if let Some(a) = annotations {
        manifest["annotations"] = a;
    }
    let manifest_bytes = serde_json::to_vec(&manifest)
        .map_err(|e| corrupt(format!("cannot write the manifest: {e}")))?;
    let manifest_digest = inner.put_blob(None, &manifest_bytes)?;
    Ok((config_digest, manifest_digest))
}

fn mtime_of(m: &fs::Metadata) -> FileTime {
    FileTime::from_last_modification_time(m)
}

pub(crate) fn is_whiteout(m: &fs::Metadata) -> bool {
    m.file_type().is_char_device() && m.rdev() == 0
}

/// Longest absolute path the squash merge works on: the kernel's
/// `PATH_MAX` (4096 bytes, with its NUL). A layer path that would be longer
/// below the layer's or the merged tree's directory is refused with the
/// image name, the depth and the limit, before the merged tree gets it
/// (the staging directory in `tmp/` is removed, the image is unchanged).
pub(crate) const SQUASH_PATH_MAX: usize = 4095;

/// Merges layer trees into `dst_root`.
struct Merger<'a> {
    dst_root: &'a Path,
    /// The image squashed (for messages).
    image: String,
    /// Directory mtimes (relative paths), applied at the end, deepest first.
    dir_times: BTreeMap<PathBuf, FileTime>,
    /// Source (dev, ino) of multiply-linked files of the current layer ->
    /// where it was copied and the inode of the copy.
    links: HashMap<(u64, u64), (PathBuf, u64)>,
}

impl Merger<'_> {
    fn io(&self, what: &str, rel: &Path, e: io::Error) -> StoreError {
        StoreError::Io {
            context: format!("squashing: {what} '{}'", rel.display()),
            source: e,
        }
    }

    /// Removes whatever is at `rel` in the merged tree.
    fn remove(&mut self, rel: &Path) -> Result<()> {
        let path = self.dst_root.join(rel);
        remove_any(&path).map_err(|e| self.io("removing", rel, e))?;
        let gone: Vec<PathBuf> = self
            .dir_times
            .range(rel.to_path_buf()..)
            .take_while(|(k, _)| k.starts_with(rel))
            .map(|(k, _)| k.clone())
            .collect();
        for k in gone {
            self.dir_times.remove(&k);
        }
        Ok(())
    }

    fn list(&self, src_dir: &Path, rel_dir: &Path) -> Result<Vec<OsString>> {
        let mut names: Vec<OsString> = fs::read_dir(src_dir)
            .and_then(|it| it.map(|e| e.map(|e| e.file_name())).collect())
            .map_err(|e| self.io("listing", rel_dir, e))?;
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        Ok(names)
    }

    /// Merges the layer tree `src_root` into the merged tree. Iterative
    /// (an explicit stack of directory listings, no descriptor held): the
    /// depth costs no stack. The merge works on paths, so a path longer
    /// than the kernel's `PATH_MAX` (4096 bytes) once joined to the layer's
    /// or the merged tree's directory is refused before it is touched
    /// (see [`SQUASH_PATH_MAX`]).
    fn merge_dir(&mut self, src_root: &Path, rel_root: &Path) -> Result<()> {
        let root_len = src_root
            .as_os_str()
            .len()
            .max(self.dst_root.as_os_str().len());
        let limit = SQUASH_PATH_MAX.saturating_sub(root_len + 1);
        let mut stack: Vec<(PathBuf, PathBuf, Vec<OsString>, usize)> = vec![(
            src_root.to_path_buf(),
            rel_root.to_path_buf(),
            self.list(src_root, rel_root)?,
            0,
        )];
        while let Some((src_dir, rel_dir, names, next)) = stack.last_mut() {
            if *next == names.len() {
                stack.pop();
                continue;
            }
            let n = std::mem::take(&mut names[*next]);
            *next += 1;
            let src = src_dir.join(&n);
            let rel = rel_dir.join(&n);
            if rel.as_os_str().len() > limit {
                let shown: String = rel.to_string_lossy().chars().take(60).collect();
                return Err(StoreError::Io {
                    context: format!("image '{}' cannot be squashed", self.image),
                    source: io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!(
                            "'/{shown}...' is {} levels deep: squash handles paths of at most {limit} bytes",
                            rel.components().count()
                        ),
                    ),
                });
            }
            let dst = self.dst_root.join(&rel);
            let meta = fs::symlink_metadata(&src).map_err(|e| self.io("inspecting", &rel, e))?;
            if is_whiteout(&meta) {
                self.remove(&rel)?;
                continue;
            }
            if meta.is_dir() {
                let opaque = xattr::get(&src, OPAQUE_XATTR)
                    .ok()
                    .flatten()
                    .is_some_and(|v| v == b"y");
                let keep = !opaque && fs::symlink_metadata(&dst).is_ok_and(|m| m.is_dir());
                if !keep {
                    self.remove(&rel)?;
                    fs::create_dir(&dst).map_err(|e| self.io("creating directory", &rel, e))?;
                }
                self.apply_meta(&src, &dst, true)?;
                self.dir_times.insert(rel.clone(), mtime_of(&meta));
                let names = self.list(&src, &rel)?;
                stack.push((src, rel, names, 0));
                continue;
            }
            self.remove(&rel)?;
            let ft = meta.file_type();
            if ft.is_file() {
                if meta.nlink() > 1
                    && let Some((first, ino)) = self.links.get(&(meta.dev(), meta.ino()))
                    && fs::symlink_metadata(self.dst_root.join(first))
                        .is_ok_and(|m| m.ino() == *ino)
                {
                    let first = self.dst_root.join(first);
                    fs::hard_link(&first, &dst)
                        .map_err(|e| self.io("creating hard link", &rel, e))?;
                    continue;
                }
                fs::copy(&src, &dst).map_err(|e| self.io("copying", &rel, e))?;
                self.apply_meta(&src, &dst, false)?;
                if meta.nlink() > 1 {
                    let ino = fs::symlink_metadata(&dst)
                        .map_err(|e| self.io("inspecting", &rel, e))?
                        .ino();
                    self.links
                        .insert((meta.dev(), meta.ino()), (rel.clone(), ino));
                }
            } else if ft.is_symlink() {
                let target =
                    fs::read_link(&src).map_err(|e| self.io("reading symlink", &rel, e))?;
                std::os::unix::fs::symlink(&target, &dst)
                    .map_err(|e| self.io("creating symlink", &rel, e))?;
                std::os::unix::fs::lchown(&dst, Some(meta.uid()), Some(meta.gid()))
                    .map_err(|e| self.io("setting the owner of", &rel, e))?;
                self.copy_xattrs(&src, &dst, &rel)?;
            } else {
                let kind = if ft.is_char_device() {
                    SFlag::S_IFCHR
                } else if ft.is_block_device() {
                    SFlag::S_IFBLK
                } else if ft.is_fifo() {
                    SFlag::S_IFIFO
                } else {
                    tracing::warn!(path = %rel.display(), "squash: skipping a socket or unknown file type");
                    continue;
                };
                nix::sys::stat::mknod(
                    &dst,
                    kind,
                    Mode::from_bits_truncate(0o600),
                    meta.rdev() as _,
                )
                .map_err(|e| self.io("creating device node", &rel, e.into()))?;
                self.apply_meta(&src, &dst, false)?;
            }
            filetime::set_symlink_file_times(&dst, mtime_of(&meta), mtime_of(&meta))
                .map_err(|e| self.io("setting the times of", &rel, e))?;
        }
        Ok(())
    }

    /// Owner, mode and xattrs (not for symlinks). For directories, the
    /// xattrs of a kept lower directory are replaced by the upper ones.
    fn apply_meta(&self, src: &Path, dst: &Path, is_dir: bool) -> Result<()> {
        let rel = dst.strip_prefix(self.dst_root).unwrap_or(dst).to_path_buf();
        let meta = fs::symlink_metadata(src).map_err(|e| self.io("inspecting", &rel, e))?;
        std::os::unix::fs::lchown(dst, Some(meta.uid()), Some(meta.gid()))
            .map_err(|e| self.io("setting the owner of", &rel, e))?;
        fs::set_permissions(dst, Permissions::from_mode(meta.mode() & 0o7777))
            .map_err(|e| self.io("setting the mode of", &rel, e))?;
        if is_dir {
            for name in xattr::list(dst).map_err(|e| self.io("listing xattrs of", &rel, e))? {
                let _ = xattr::remove(dst, &name);
            }
        }
        self.copy_xattrs(src, dst, &rel)
    }

    fn copy_xattrs(&self, src: &Path, dst: &Path, rel: &Path) -> Result<()> {
        let names = match xattr::list(src) {
            Ok(n) => n,
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => return Ok(()),
            Err(e) => return Err(self.io("listing xattrs of", rel, e)),
        };
        for name in names {
            if name.to_string_lossy().starts_with(OVERLAY_XATTR_PREFIX) {
                continue;
            }
            let Some(value) =
                xattr::get(src, &name).map_err(|e| self.io("reading xattrs of", rel, e))?
            else {
                continue;
            };
            match xattr::set(dst, &name, &value) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                    tracing::warn!(path = %rel.display(), xattr = ?name, "xattr not supported here, skipped");
                }
                Err(e) => return Err(self.io("setting xattrs of", rel, e)),
            }
        }
        Ok(())
    }

    /// Directory mtimes, deepest first.
    fn finish(&mut self) -> Result<()> {
        let mut dirs: Vec<(PathBuf, FileTime)> =
            std::mem::take(&mut self.dir_times).into_iter().collect();
        dirs.sort_by_key(|(p, _)| std::cmp::Reverse(p.components().count()));
        for (rel, t) in dirs {
            let path = self.dst_root.join(&rel);
            filetime::set_symlink_file_times(&path, t, t)
                .map_err(|e| self.io("setting the times of", &rel, e))?;
        }
        Ok(())
    }
}
