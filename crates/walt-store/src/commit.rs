//! `commit_layer`: saves the changes of a modifying session (`walt image
//! shell`, `walt image cp`) as one new layer on top of the image.
//!
//! The session runs on an overlayfs mount whose lower directories are the
//! image's unpacked layers and whose upper directory is in a
//! [`SessionDir`] (under `tmp/`, mounted with
//! `redirect_dir=off,metacopy=off,index=off,xino=off`, so that the upper
//! directory is in plain overlay form, and `volatile`: its unmount flushes
//! nothing, the save makes the layer durable). Once it is unmounted, the upper
//! directory is cleaned of overlay bookkeeping xattrs, hashed as the
//! uncompressed tar it makes (OCI form: blob digest == diff_id) without
//! writing that tar, and then itself renamed to `layers/<diff_id>/diff`
//! with the marker of its tree-backed blob (see `blobs`: the tar is
//! produced again, verified, when publish needs it). The lower layers are
//! never read.

use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use walt_core::oci;
use walt_core::{Digest, ImageName, oci::ANNOTATION_WALT_BUILT};

use crate::db::{ImageRecord, LayerRef, NewImage, PutOutcome};
use crate::error::{IoContext, Result, StoreError};
use crate::squash::{
    OPAQUE_XATTR, OVERLAY_XATTR_PREFIX, layer_tree_options, read_config, store_config_and_manifest,
};
use crate::staging::{BlobWriter, Durability, Expected, StagedLayer, make_durable};
use crate::util::{now_secs, remove_any, rfc3339, unique_name};
use crate::{Inner, Store};

/// Overlay xattrs that mean the upper directory depends on features walt
/// does not mount with (its content would not stand on its own).
const REFUSED_XATTRS: [&str; 2] = ["trusted.overlay.redirect", "trusted.overlay.metacopy"];

/// A staging directory for a modifying session, under the store's `tmp/`
/// (same filesystem as `layers/`, emptied when the store opens, so a crash
/// leaves nothing). It holds `upper/`, `work/` and `merged/` (the mount
/// point). Removed on drop (a mount left on `merged/` is detached first).
#[derive(Debug)]
pub struct SessionDir {
    path: PathBuf,
}

impl SessionDir {
    /// The session directory itself.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `<path>/upper` (mode 0755): the overlay upper directory, later
    /// given to [`Store::commit_layer`].
    pub fn upper(&self) -> PathBuf {
        self.path.join("upper")
    }

    /// `<path>/work`: the overlay work directory.
    pub fn work(&self) -> PathBuf {
        self.path.join("work")
    }

    /// `<path>/merged`: the mount point.
    pub fn merged(&self) -> PathBuf {
        self.path.join("merged")
    }
}

impl Drop for SessionDir {
    fn drop(&mut self) {
        let merged = self.merged();
        if is_mount_point(&merged) {
            tracing::warn!(path = %merged.display(), "session still mounted: detaching it");
            if let Err(e) = nix::mount::umount2(&merged, nix::mount::MntFlags::MNT_DETACH) {
                tracing::warn!(path = %merged.display(), error = %e, "cannot detach the session mount: leaving the session directory");
                return;
            }
        }
        if let Err(e) = remove_any(&self.path) {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot remove session directory");
        }
    }
}

/// True when `path` is a directory on another filesystem than its parent.
fn is_mount_point(path: &Path) -> bool {
    let (Ok(m), Some(Ok(p))) = (
        fs::symlink_metadata(path),
        path.parent().map(fs::symlink_metadata),
    ) else {
        return false;
    };
    m.is_dir() && m.dev() != p.dev()
}

/// What [`Store::commit_layer`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitOutcome {
    /// The digest of the new image's manifest.
    pub manifest_digest: Digest,
    /// The diff_id of the new layer (also its blob digest: uncompressed).
    pub diff_id: Digest,
    /// The size of the new layer's tar.
    pub layer_size: u64,
    /// True when `target` existed and was replaced.
    pub replaced: bool,
}

impl Store {
    /// Creates a [`SessionDir`] under `tmp/` (`what` only names it, for
    /// debugging), with `upper/` (0755), `work/` and `merged/`.
    pub fn session_dir(&self, what: &str) -> Result<SessionDir> {
        let tag: String = what
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .take(32)
            .collect();
        let path = self
            .inner
            .tmp_dir()
            .join(unique_name(&format!("session-{tag}")));
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .ctx("creating session directory", &path)?;
        let s = SessionDir { path };
        for (p, mode) in [(s.upper(), 0o755), (s.work(), 0o700), (s.merged(), 0o755)] {
            fs::DirBuilder::new()
                .mode(mode)
                .create(&p)
                .ctx("creating session directory", &p)?;
            // The umask may have cut the mode.
            fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(mode))
                .ctx("setting the mode of", &p)?;
        }
        Ok(s)
    }

    /// The unpacked directories (`layers/<hex>/diff`) of the image's
    /// layers, lowest first. Overlay's `lowerdir=` lists them the other way
    /// round (top first).
    pub fn layer_dirs(&self, rec: &ImageRecord) -> Result<Vec<PathBuf>> {
        rec.layers
            .iter()
            .map(|l| {
                let p = self.layer_path(&l.diff_id);
                if p.is_dir() {
                    Ok(p)
                } else {
                    Err(StoreError::LayerNotFound(l.diff_id.clone()))
                }
            })
            .collect()
    }

    /// True when `upper` (a session's upper directory) holds no change at
    /// all: it is empty.
    pub fn upper_is_empty(upper: &Path) -> Result<bool> {
        let mut it = fs::read_dir(upper).ctx("listing", upper)?;
        Ok(it.next().is_none())
    }

    /// Saves the changes in `upper` (the overlay upper directory of a
    /// finished, unmounted session on `base`; it must be in the store's
    /// `tmp/`, e.g. [`SessionDir::upper`]) as one new uncompressed layer on
    /// top of `base`, recorded as image `target`. An existing `target` is
    /// refused ([`StoreError::ImageExists`]) unless `replace`. `created_by`
    /// goes in the config history (e.g. `walt image shell`).
    ///
    /// `upper` is consumed on success: it becomes the unpacked layer. The
    /// lower layers are not read, so the time depends on the size of the
    /// change only.
    pub fn commit_layer(
        &self,
        base: &ImageRecord,
        upper: &Path,
        target: &ImageName,
        replace: bool,
        created_by: &str,
    ) -> Result<CommitOutcome> {
        let start = Instant::now();
        let _guard = self.begin_import();
        let inner = &self.inner;
        let fail = |reason: String| StoreError::CommitFailed {
            image: target.to_string(),
            reason,
        };
        if !replace && self.get_image(target)?.is_some() {
            return Err(StoreError::ImageExists(target.to_string()));
        }
        self.layer_dirs(base)?;

        let blob_label = format!("of the new layer of '{}'", target.short());
        let layer = self.save_upper(upper, &blob_label, &fail)?;
        let recorded = self.record_saved_layer(base, target, replace, created_by, layer);
        if recorded.is_err() {
            // The layer is published but nothing references it: collected
            // as soon as the last running import ends (this one's guard).
            let _ = inner.gc();
        }
        let out = recorded?;
        tracing::info!(image = %target, base = %base.name, diff_id = %out.diff_id,
            layer_size = out.layer_size, elapsed_ms = start.elapsed().as_millis() as u64,
            "session saved as a new layer");
        Ok(out)
    }

    /// The image `target`: `base` with the saved `layer` on top.
    fn record_saved_layer(
        &self,
        base: &ImageRecord,
        target: &ImageName,
        replace: bool,
        created_by: &str,
        layer: LayerRef,
    ) -> Result<CommitOutcome> {
        let inner = &self.inner;
        let diff_id = layer.diff_id.clone();
        let layer_size = layer.blob_size;

        // 4. Config and manifest.
        let mut config = read_config(inner, &base.name, &base.config_digest)?;
        let now = now_secs();
        let rootfs = config
            .entry("rootfs")
            .or_insert_with(|| serde_json::json!({ "type": "layers" }));
        if !rootfs.is_object() {
            *rootfs = serde_json::json!({ "type": "layers" });
        }
        if let Some(rootfs) = rootfs.as_object_mut() {
            push_to_array(rootfs, "diff_ids", diff_id.to_string().into());
        }
        let entry = serde_json::json!({ "created": rfc3339(now), "created_by": created_by });
        push_to_array(&mut config, "history", entry);
        config.insert("created".into(), rfc3339(now).into());
        let mut layers = base.layers.clone();
        layers.push(layer);
        let (manifest_digest, outcome) = self.record_built_image(
            target,
            config,
            layers,
            base.node_models.clone(),
            replace,
            now,
        )?;
        Ok(CommitOutcome {
            manifest_digest,
            diff_id,
            layer_size,
            replaced: outcome == PutOutcome::Replaced,
        })
    }

    /// Saves `upper` as one new uncompressed layer, for a build step:
    /// removes the overlay bookkeeping xattrs (refusing redirects,
    /// metacopy and paths too long for a layer), hashes it as an OCI tar
    /// (blob digest == diff_id; bounded by `limits.layer-unpacked-size`),
    /// makes it durable and adopts `upper` as `layers/<diff_id>/diff`, its
    /// blob tree-backed (not written: see [`Store::open_blob`]). `label` names what is built, for messages
    /// (e.g. "the build of 'alice/img:latest', step 3"). Returns the layer
    /// (blob_digest == diff_id, media type [`oci::OCI_LAYER_TAR`]).
    ///
    /// `upper` must be an unmounted directory in the store's `tmp/` (e.g.
    /// [`SessionDir::upper`]); it is consumed when the layer is new, left
    /// in place when the same layer is already stored.
    ///
    /// Nothing references the layer yet: hold an [`crate::ImportGuard`]
    /// ([`Store::begin_import`]) from before this call until the layer is
    /// referenced by [`Store::cache_put`] or [`Store::record_built_image`],
    /// or a gc may collect it in between.
    pub fn commit_upper(&self, upper: &Path, label: &str) -> Result<LayerRef> {
        let start = Instant::now();
        let _guard = self.begin_import();
        let fail = |reason: String| StoreError::SaveLayerFailed {
            what: label.to_string(),
            reason,
        };
        let layer = self.save_upper(upper, &format!("of the layer of {label}"), &fail)?;
        tracing::info!(what = label, diff_id = %layer.diff_id, layer_size = layer.blob_size,
            elapsed_ms = start.elapsed().as_millis() as u64, "build step saved as a layer");
        Ok(layer)
    }

    /// Records a built image: stores `config` (the complete OCI config
    /// object: rootfs, history, created, config... as the caller made
    /// them) as a blob, writes an OCI manifest over `layers` (annotated
    /// [`ANNOTATION_WALT_BUILT`]) and records the image `target` with
    /// `node_models` and `created` (Unix seconds). An existing `target` is
    /// refused ([`StoreError::ImageExists`]) unless `replace`. Every layer
    /// must be in the store (blob and unpacked directory).
    ///
    /// Deterministic: the same config and layers give the same config and
    /// manifest digests, and a blob already stored is not written again
    /// (a rebuild with everything cached creates no blob). Returns the
    /// manifest digest.
    pub fn record_built_image(
        &self,
        target: &ImageName,
        config: serde_json::Map<String, serde_json::Value>,
        layers: Vec<LayerRef>,
        node_models: Vec<String>,
        replace: bool,
        created: i64,
    ) -> Result<(Digest, PutOutcome)> {
        let _guard = self.begin_import();
        // Refused before any blob is written (put_image checks again).
        if !replace && self.get_image(target)?.is_some() {
            return Err(StoreError::ImageExists(target.to_string()));
        }
        let annotations = serde_json::json!({ ANNOTATION_WALT_BUILT: "true" });
        let (config_digest, manifest_digest) =
            store_config_and_manifest(&self.inner, target, config, &layers, Some(annotations))?;
        let outcome = self.put_image(
            &NewImage {
                name: target.clone(),
                manifest_digest: manifest_digest.clone(),
                manifest_media_type: oci::OCI_MANIFEST.to_string(),
                config_digest,
                layers,
                node_models,
                created,
            },
            replace,
        )?;
        Ok((manifest_digest, outcome))
    }

    /// Steps 1-3 of a commit, shared by [`Store::commit_layer`] and
    /// [`Store::commit_upper`]: sanitizes `upper`, hashes it as an
    /// uncompressed OCI tar (bounded by `limits.layer-unpacked-size`),
    /// makes it durable and adopts `upper` as the layer with the marker of
    /// its tree-backed blob.
    /// `blob_label` names the blob in size errors; `fail` makes the error
    /// of every other failure from its reason. The caller holds an
    /// [`crate::ImportGuard`].
    fn save_upper(
        &self,
        upper: &Path,
        blob_label: &str,
        fail: &dyn Fn(String) -> StoreError,
    ) -> Result<LayerRef> {
        let inner = &self.inner;
        // 1. Clean overlay xattrs, refuse what we cannot represent, make
        //    the upper contents durable.
        if !fs::symlink_metadata(upper).is_ok_and(|m| m.is_dir()) {
            return Err(fail(format!(
                "the session directory '{}' is missing",
                upper.display()
            )));
        }
        if upper
            .parent()
            .is_some_and(|p| is_mount_point(&p.join("merged")))
        {
            return Err(fail("the session is still mounted".into()));
        }
        let t0 = std::time::Instant::now();
        // On a thread of its own, while the layer is hashed: the tree
        // writer leaves every `trusted.overlay.*` xattr out and reads
        // `opaque`, which is never removed, so what the walk removes does
        // not change the layer's bytes. Then the session's changes are
        // made durable (most of them are already written: the early
        // writeback of cp and clone).
        let sanitized = {
            let upper = upper.to_path_buf();
            std::thread::Builder::new()
                .name("walt-sanitize".into())
                .spawn(move || {
                    let to_sync = sanitize_tree(&upper).map_err(Err)?;
                    let walked = t0.elapsed();
                    match to_sync {
                        ToSync::Each(paths) => make_durable(&upper, &paths),
                        ToSync::Filesystem => fs::File::open(&upper)
                            .and_then(|f| nix::unistd::syncfs(&f).map_err(io::Error::from)),
                    }
                    .map_err(Ok)?;
                    Ok::<_, std::result::Result<io::Error, Sanitize>>(walked)
                })
                .map_err(|e| fail(format!("cannot start the sanitize thread: {e}")))?
        };

        // 2. The layer tar, hashed as it is produced but not written: its
        //    blob is tree-backed (see `blobs`), produced again from the
        //    layer when someone needs its bytes. Bounded by the layer
        //    limit; it takes no space.
        let hashed = BlobWriter::<fs::File>::verify_only(Expected::default()).and_then(|w| {
            let w = w
                .hash_on_thread()
                .label(blob_label)
                .limit(inner.limits().layer_unpacked_size, "layer-unpacked-size");
            let (w, _) =
                walt_tar::write_tree(w, upper, &layer_tree_options(true)).map_err(|e| {
                    crate::unpack::store_error_in_tar(e)
                        .unwrap_or_else(|e| fail(format!("writing the layer: {e}")))
                })?;
            w.finish()
        });
        let hashed_at = t0.elapsed();
        // The walk's refusals come first: they explain a failed hash too.
        let walked = sanitized
            .join()
            .map_err(|_| fail("the sanitize thread panicked".into()))?
            .map_err(|e| match e {
                Err(Sanitize::Refused(rel, xattr)) => fail(format!(
                    "'/{}' carries the overlay xattr {xattr} (redirect_dir/metacopy must be off)",
                    rel.display()
                )),
                Err(Sanitize::TooDeep(rel, depth)) => fail(format!(
                    "'/{rel}' is {depth} levels deep: a layer's paths are at most {} bytes (remove it, then save again)",
                    walt_tar::MAX_PATH
                )),
                Err(Sanitize::Io(rel, e)) => fail(format!("reading '/{}': {e}", rel.display())),
                Ok(e) => fail(format!("making the changes durable: {e}")),
            })?;
        let hashed = hashed?;
        let layer_size = hashed.size();
        let diff_id = hashed.digest().clone();
        drop(hashed);
        tracing::debug!(
            sanitize_ms = walked.as_secs_f64() * 1000.0,
            hash_ms = hashed_at.as_secs_f64() * 1000.0,
            sync_wait_ms = t0.elapsed().saturating_sub(hashed_at).as_secs_f64() * 1000.0,
            size = layer_size,
            "layer saved from the session's changes"
        );

        // 3. The upper directory becomes the layer, published with the
        //    marker of its blob (one rename: both or neither).
        if !inner.has_layer(&diff_id) {
            let staging = StagedLayer::adopt(inner, "commit", upper, |e| {
                fail(format!(
                    "moving '{}' into the store: {e} (it must be in the store's tmp/)",
                    upper.display()
                ))
            })?;
            Inner::write_tree_blob_marker(staging.dir(), layer_size)?;
            staging.publish(inner, &diff_id, Durability::AlreadyDurable)?;
        }
        if !inner.has_blob(&diff_id) {
            // The same layer was stored already, unpacked from a registry's
            // tar (no marker; the same bytes, since the digest is the same):
            // its blob is written out once, from the session's tree while
            // it is there, else from the stored layer (verified).
            let tree = if fs::symlink_metadata(upper).is_ok_and(|m| m.is_dir()) {
                upper.to_path_buf()
            } else {
                inner.layer_path(&diff_id)
            };
            inner.write_blob_from_tree(&tree, &diff_id, layer_size)?;
        }

        Ok(LayerRef {
            diff_id: diff_id.clone(),
            blob_digest: diff_id,
            blob_size: layer_size,
            media_type: oci::OCI_LAYER_TAR.to_string(),
        })
    }
}

/// Appends `value` to the array `obj[key]` (created, or replaced when it is
/// not an array).
fn push_to_array(
    obj: &mut serde_json::Map<String, serde_json::Value>,
    key: &str,
    value: serde_json::Value,
) {
    let slot = obj
        .entry(key)
        .or_insert_with(|| serde_json::Value::Array(Vec::new()));
    match slot {
        serde_json::Value::Array(a) => a.push(value),
        other => *other = serde_json::Value::Array(vec![value]),
    }
}

enum Sanitize {
    Refused(PathBuf, String),
    /// A path longer than [`walt_tar::MAX_PATH`] (shortened) and its depth.
    TooDeep(String, usize),
    Io(PathBuf, io::Error),
}

/// What to make durable once the upper directory is sanitized.
enum ToSync {
    /// These files and directories, one by one.
    Each(Vec<PathBuf>),
    /// Too many, or paths too long to open: the whole filesystem.
    Filesystem,
}

/// Paths from this length on are not opened by path to be synced.
const SYNC_PATH_MAX: usize = 3072;

struct Frame {
    names: Vec<Vec<u8>>,
    next: usize,
    rel_len: usize,
    id: (u64, u64),
}

fn rel_path(rel: &[u8]) -> PathBuf {
    use std::os::unix::ffi::OsStrExt;
    PathBuf::from(std::ffi::OsStr::from_bytes(rel))
}

/// `rel` shortened for a message: its first components.
fn shorten(rel: &[u8]) -> String {
    const SHOWN: usize = 60;
    if rel.len() <= SHOWN {
        return String::from_utf8_lossy(rel).into_owned();
    }
    let cut = rel[..SHOWN]
        .iter()
        .rposition(|&b| b == b'/')
        .unwrap_or(SHOWN);
    format!("{}/...", String::from_utf8_lossy(&rel[..cut]))
}

/// Walks an upper directory: removes every `trusted.overlay.*` xattr but
/// `opaque=y`, refuses redirects and metacopy, refuses a path longer than
/// a layer may hold ([`walt_tar::MAX_PATH`]) before anything is written,
/// and lists the files and directories to make durable (only what the
/// session wrote). Iterative, one directory descriptor (down by name with
/// `O_NOFOLLOW`, up with ".." checked by device and inode): a tree of any
/// depth costs neither stack nor descriptors.
fn sanitize_tree(upper: &Path) -> std::result::Result<ToSync, Sanitize> {
    use nix::fcntl::{OFlag, openat};
    use nix::sys::stat::{Mode, SFlag, fstat, fstatat};
    use std::os::fd::{AsFd, AsRawFd};
    use std::os::unix::ffi::OsStrExt;

    const DIR: OFlag = OFlag::O_RDONLY
        .union(OFlag::O_DIRECTORY)
        .union(OFlag::O_NOFOLLOW)
        .union(OFlag::O_CLOEXEC);
    let io_at = |rel: &[u8], e: io::Error| Sanitize::Io(rel_path(rel), e);
    let list = |dir: &fs::File, rel: &[u8]| -> std::result::Result<Vec<Vec<u8>>, Sanitize> {
        let fd = dir
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| io_at(rel, e))?;
        let mut d = nix::dir::Dir::from_fd(fd).map_err(|e| io_at(rel, e.into()))?;
        let mut names = Vec::new();
        for ent in d.iter() {
            let ent = ent.map_err(|e| io_at(rel, e.into()))?;
            let n = ent.file_name().to_bytes();
            if n != b"." && n != b".." {
                names.push(n.to_vec());
            }
        }
        names.sort_unstable();
        Ok(names)
    };
    let mut to_sync: Vec<PathBuf> = Vec::new();
    let mut whole_fs = false;
    let mut note = |rel: &[u8], whole_fs: &mut bool| {
        if *whole_fs {
            return;
        }
        let p = upper.join(rel_path(rel));
        if to_sync.len() >= crate::staging::SYNC_EACH_MAX || p.as_os_str().len() >= SYNC_PATH_MAX {
            *whole_fs = true;
            to_sync = Vec::new();
        } else {
            to_sync.push(p);
        }
    };

    let mut cur = nix::fcntl::open(upper, DIR, Mode::empty())
        .map(fs::File::from)
        .map_err(|e| io_at(b"", e.into()))?;
    let st = fstat(&cur).map_err(|e| io_at(b"", e.into()))?;
    sanitize_entry(&XattrTarget::Dir(&cur), b"")?;
    let mut rel: Vec<u8> = Vec::new();
    let mut stack = vec![Frame {
        names: list(&cur, b"")?,
        next: 0,
        rel_len: 0,
        id: (st.st_dev, st.st_ino),
    }];
    while let Some(frame) = stack.last_mut() {
        if frame.next == frame.names.len() {
            rel.truncate(frame.rel_len);
            note(&rel, &mut whole_fs);
            stack.pop();
            if let Some(up) = stack.last() {
                let parent = openat(&cur, "..", DIR, Mode::empty())
                    .map(fs::File::from)
                    .map_err(|e| io_at(&rel, e.into()))?;
                let got = fstat(&parent).map_err(|e| io_at(&rel, e.into()))?;
                if (got.st_dev, got.st_ino) != up.id {
                    return Err(io_at(
                        &rel,
                        io::Error::other("the directory was moved while it was read"),
                    ));
                }
                cur = parent;
            }
            continue;
        }
        let name = std::mem::take(&mut frame.names[frame.next]);
        frame.next += 1;
        rel.truncate(frame.rel_len);
        if !rel.is_empty() {
            rel.push(b'/');
        }
        rel.extend_from_slice(&name);
        if rel.len() > walt_tar::MAX_PATH {
            return Err(Sanitize::TooDeep(shorten(&rel), stack.len()));
        }
        let st = match fstatat(
            &cur,
            name.as_slice(),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        ) {
            Ok(st) => st,
            Err(nix::errno::Errno::ENOENT) => continue,
            Err(e) => return Err(io_at(&rel, e.into())),
        };
        let kind = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
        if kind == SFlag::S_IFDIR {
            let fd = openat(&cur, name.as_slice(), DIR, Mode::empty())
                .map(fs::File::from)
                .map_err(|e| io_at(&rel, e.into()))?;
            sanitize_entry(&XattrTarget::Dir(&fd), &rel)?;
            let names = list(&fd, &rel)?;
            cur = fd;
            stack.push(Frame {
                names,
                next: 0,
                rel_len: rel.len(),
                id: (st.st_dev, st.st_ino),
            });
        } else {
            // By the descriptor's /proc link: l*xattr calls do not follow
            // the last component (a symlink stays itself).
            let mut at = format!("/proc/self/fd/{}/", cur.as_raw_fd()).into_bytes();
            at.extend_from_slice(&name);
            let at = PathBuf::from(std::ffi::OsStr::from_bytes(&at));
            sanitize_entry(&XattrTarget::Path(&at), &rel)?;
            if kind == SFlag::S_IFREG {
                note(&rel, &mut whole_fs);
            } else {
                // A symlink, whiteout, fifo or device node cannot be
                // fsynced by itself, and a directory's fsync does not write
                // the new inode on every filesystem (ext4 without a
                // journal): the whole filesystem is flushed instead. The
                // sandbox's mount is volatile, so nothing else flushes it.
                whole_fs = true;
            }
        }
    }
    Ok(if whole_fs {
        ToSync::Filesystem
    } else {
        ToSync::Each(to_sync)
    })
}

/// Where the xattrs of an entry are read and removed.
enum XattrTarget<'a> {
    Dir(&'a fs::File),
    /// A path whose last component is not followed.
    Path(&'a Path),
}

impl XattrTarget<'_> {
    fn list(&self) -> io::Result<Vec<OsString>> {
        match self {
            XattrTarget::Dir(f) => xattr::FileExt::list_xattr(*f).map(|l| l.collect()),
            XattrTarget::Path(p) => xattr::list(p).map(|l| l.collect()),
        }
    }

    fn get(&self, name: &OsString) -> io::Result<Option<Vec<u8>>> {
        match self {
            XattrTarget::Dir(f) => xattr::FileExt::get_xattr(*f, name),
            XattrTarget::Path(p) => xattr::get(p, name),
        }
    }

    fn remove(&self, name: &OsString) -> io::Result<()> {
        match self {
            XattrTarget::Dir(f) => xattr::FileExt::remove_xattr(*f, name),
            XattrTarget::Path(p) => xattr::remove(p, name),
        }
    }
}

fn sanitize_entry(target: &XattrTarget<'_>, rel: &[u8]) -> std::result::Result<(), Sanitize> {
    let io = |e: io::Error| Sanitize::Io(rel_path(rel), e);
    let names = match target.list() {
        Ok(n) => n,
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => return Ok(()),
        Err(e) => return Err(io(e)),
    };
    for name in names {
        let s = name.to_string_lossy();
        if !s.starts_with(OVERLAY_XATTR_PREFIX) {
            continue;
        }
        if REFUSED_XATTRS.contains(&s.as_ref()) {
            return Err(Sanitize::Refused(rel_path(rel), s.into_owned()));
        }
        if s == OPAQUE_XATTR && target.get(&name).map_err(io)?.as_deref() == Some(b"y") {
            continue;
        }
        tracing::debug!(path = %String::from_utf8_lossy(rel), xattr = %s, "removing overlay xattr");
        match target.remove(&name) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENODATA) => {}
            Err(e) => return Err(io(e)),
        }
    }
    Ok(())
}

/// Detaches mounts left below `tmp` (sessions of a server that died),
/// deepest first, so that emptying `tmp/` never descends into an image.
pub(crate) fn detach_mounts_below(tmp: &Path) {
    let points = walt_tar::mounts_below(tmp);
    for p in points {
        match nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH) {
            Ok(()) => tracing::info!(path = %p.display(), "detached a leftover session mount"),
            Err(e) => {
                tracing::warn!(path = %p.display(), error = %e, "cannot detach a leftover mount")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Files and directories are made durable one by one; anything else
    /// (here a symlink) cannot be fsynced, so the whole filesystem is.
    #[test]
    fn what_a_save_flushes() {
        let t = tempfile::tempdir().unwrap();
        let upper = t.path().join("upper");
        fs::create_dir_all(upper.join("d")).unwrap();
        fs::write(upper.join("d/f"), "x").unwrap();
        match sanitize_tree(&upper).unwrap_or_else(|_| panic!("sanitize")) {
            ToSync::Each(mut paths) => {
                paths.sort();
                assert_eq!(paths, [upper.clone(), upper.join("d"), upper.join("d/f")]);
            }
            ToSync::Filesystem => panic!("two entries: one by one"),
        }
        std::os::unix::fs::symlink("f", upper.join("d/l")).unwrap();
        assert!(matches!(
            sanitize_tree(&upper).unwrap_or_else(|_| panic!("sanitize")),
            ToSync::Filesystem
        ));
    }
}
