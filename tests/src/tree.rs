//! File trees of images, to compare them: a walt image's (its layers in
//! the store, merged by a read-only overlay mount, as the sandbox sees
//! them) and any tar stream's (`docker export`), as one line of metadata
//! and content hash per path.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};
use tempfile::TempDir;

use crate::util::{digest_hex, run_cmd};

/// What a path is, without its mtime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// `dir`, `file <sha256> <size>`, `link <target>`, `char M:m`,
    /// `block M:m`, `fifo`.
    pub kind: String,
    /// Permission bits (0 for symlinks).
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
}

impl fmt::Display for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {:o} {}:{}", self.kind, self.mode, self.uid, self.gid)
    }
}

/// Paths relative to the root (`etc/passwd`), in order.
pub type Tree = BTreeMap<String, Entry>;

fn file_kind(r: &mut dyn Read) -> std::io::Result<String> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut n = 0u64;
    loop {
        let k = r.read(&mut buf)?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    Ok(format!("file {} {n}", hex::encode(h.finalize())))
}

fn major(dev: u64) -> u64 {
    ((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0xfff)
}

fn minor(dev: u64) -> u64 {
    ((dev >> 12) & 0xffff_ff00) | (dev & 0xff)
}

/// The entry at `p` (not following a final symlink).
pub fn entry_at(p: &Path) -> Result<Entry> {
    let m = fs::symlink_metadata(p)?;
    let ft = m.file_type();
    let kind = if ft.is_dir() {
        "dir".to_string()
    } else if ft.is_symlink() {
        format!("link {}", fs::read_link(p)?.display())
    } else if ft.is_file() {
        file_kind(&mut fs::File::open(p)?)?
    } else if ft.is_char_device() {
        format!("char {}:{}", major(m.rdev()), minor(m.rdev()))
    } else if ft.is_block_device() {
        format!("block {}:{}", major(m.rdev()), minor(m.rdev()))
    } else if ft.is_fifo() {
        "fifo".to_string()
    } else {
        "other".to_string()
    };
    Ok(Entry {
        kind,
        mode: if ft.is_symlink() {
            0
        } else {
            m.mode() & 0o7777
        },
        uid: m.uid().into(),
        gid: m.gid().into(),
    })
}

/// The tree below `root` (not following symlinks).
pub fn tree_of_dir(root: &Path) -> Result<Tree> {
    fn walk(root: &Path, rel: &str, out: &mut Tree) -> Result<()> {
        let dir = if rel.is_empty() {
            root.to_path_buf()
        } else {
            root.join(rel)
        };
        for e in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            let rel = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let entry = entry_at(&root.join(&rel))?;
            let is_dir = entry.kind == "dir";
            out.insert(rel.clone(), entry);
            if is_dir {
                walk(root, &rel, out)?;
            }
        }
        Ok(())
    }
    let mut out = Tree::new();
    walk(root, "", &mut out)?;
    Ok(out)
}

/// The tree a tar stream unpacks to (later entries replace earlier ones;
/// a hard link is what it links to). Whiteouts are not interpreted: this
/// is for flat archives such as `docker export`.
pub fn tree_of_tar(r: impl Read) -> Result<Tree> {
    let mut out = Tree::new();
    apply_tar(&mut out, r, false)?;
    Ok(out)
}

/// The tree of an image's layer tars (bottom first), whiteouts
/// (`.wh.<name>`, `.wh..wh..opq`) applied.
pub fn tree_of_layers<R: Read>(layers: impl IntoIterator<Item = R>) -> Result<Tree> {
    let mut out = Tree::new();
    for l in layers {
        apply_tar(&mut out, l, true)?;
    }
    Ok(out)
}

fn remove_subtree(t: &mut Tree, path: &str) {
    let prefix = format!("{path}/");
    t.retain(|k, _| k != path && !k.starts_with(&prefix));
}

/// Applies one tar to `out`, as a layer when `layer`.
pub fn apply_tar(out: &mut Tree, r: impl Read, layer: bool) -> Result<()> {
    let mut a = tar::Archive::new(r);
    // Paths this layer brought, which an opaque marker keeps.
    let mut this_layer: std::collections::BTreeSet<String> = Default::default();
    for e in a.entries()? {
        let mut e = e?;
        let path = e.path()?.to_string_lossy().into_owned();
        let path = path
            .trim_start_matches("./")
            .trim_start_matches('/')
            .trim_end_matches('/')
            .to_string();
        if path.is_empty() || path == "." {
            continue;
        }
        if layer {
            let (dir, base) = match path.rsplit_once('/') {
                Some((d, b)) => (d.to_string(), b),
                None => (String::new(), path.as_str()),
            };
            if base == ".wh..wh..opq" {
                let prefix = if dir.is_empty() {
                    String::new()
                } else {
                    format!("{dir}/")
                };
                out.retain(|k, _| !k.starts_with(&prefix) || this_layer.contains(k));
                continue;
            }
            if let Some(name) = base.strip_prefix(".wh.") {
                let victim = if dir.is_empty() {
                    name.to_string()
                } else {
                    format!("{dir}/{name}")
                };
                remove_subtree(out, &victim);
                continue;
            }
        }
        let h = e.header().clone();
        let mode = h.mode()? & 0o7777;
        let (uid, gid) = (h.uid()?, h.gid()?);
        let dev = || -> Result<String> {
            Ok(format!(
                "{}:{}",
                h.device_major()?.unwrap_or(0),
                h.device_minor()?.unwrap_or(0)
            ))
        };
        let entry = match h.entry_type() {
            tar::EntryType::Directory => Entry {
                kind: "dir".into(),
                mode,
                uid,
                gid,
            },
            tar::EntryType::Regular | tar::EntryType::Continuous => Entry {
                kind: file_kind(&mut e)?,
                mode,
                uid,
                gid,
            },
            tar::EntryType::Symlink => Entry {
                kind: format!(
                    "link {}",
                    e.link_name()?.unwrap_or_default().to_string_lossy()
                ),
                mode: 0,
                uid,
                gid,
            },
            tar::EntryType::Link => {
                let target = e.link_name()?.unwrap_or_default();
                let target = target
                    .to_string_lossy()
                    .trim_start_matches("./")
                    .trim_start_matches('/')
                    .to_string();
                match out.get(&target) {
                    Some(t) => t.clone(),
                    None => bail!("hard link {path} to {target}, not in the archive before it"),
                }
            }
            tar::EntryType::Char => Entry {
                kind: format!("char {}", dev()?),
                mode,
                uid,
                gid,
            },
            tar::EntryType::Block => Entry {
                kind: format!("block {}", dev()?),
                mode,
                uid,
                gid,
            },
            tar::EntryType::Fifo => Entry {
                kind: "fifo".into(),
                mode,
                uid,
                gid,
            },
            _ => continue,
        };
        // A non-directory replacing a directory takes its subtree away.
        if entry.kind != "dir" {
            remove_subtree(out, &path);
        }
        this_layer.insert(path.clone());
        out.insert(path, entry);
    }
    Ok(())
}

/// The tree of `image` in a docker daemon, from `docker save` (its
/// layers merged, nothing of a container added).
pub fn docker_image_tree(d: &crate::docker::Dockerd, image: &str) -> Result<Tree> {
    let dir = tempfile::Builder::new()
        .prefix("walt-e2e-save-")
        .tempdir()?;
    let tar_path = dir.path().join("image.tar");
    let tar_s = tar_path.display().to_string();
    d.docker(&["save", "-o", &tar_s, image])?;
    let unpacked = dir.path().join("x");
    tar::Archive::new(fs::File::open(&tar_path)?).unpack(&unpacked)?;
    let manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(unpacked.join("manifest.json"))?)?;
    let layers = manifest[0]["Layers"]
        .as_array()
        .context("docker save: no Layers in manifest.json")?;
    let files = layers
        .iter()
        .map(|l| {
            let rel = l.as_str().context("docker save: a layer is not a string")?;
            Ok(fs::File::open(unpacked.join(rel))?)
        })
        .collect::<Result<Vec<_>>>()?;
    tree_of_layers(files)
}

/// Lines naming every path whose entry differs between `a` and `b`
/// (missing on one side included), paths for which `ignore` is true left
/// out.
pub fn diff_trees(a: &Tree, b: &Tree, ignore: impl Fn(&str) -> bool) -> Vec<String> {
    let mut out = Vec::new();
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    for k in keys {
        if ignore(k) {
            continue;
        }
        match (a.get(k), b.get(k)) {
            (Some(x), Some(y)) if x == y => {}
            (x, y) => out.push(format!(
                "/{k}: {} vs {}",
                x.map_or("absent".to_string(), |e| e.to_string()),
                y.map_or("absent".to_string(), |e| e.to_string())
            )),
        }
    }
    out
}

fn split_name(name: &str) -> (&str, &str) {
    name.split_once(':').unwrap_or((name, "latest"))
}

fn open_db(data_dir: &Path) -> Result<rusqlite::Connection> {
    Ok(rusqlite::Connection::open_with_flags(
        data_dir.join("walt.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )?)
}

/// The unpacked layers (`layers/<diff_id>/diff`) of `owner`'s image
/// `name[:tag]`, bottom first.
pub fn image_layer_dirs(data_dir: &Path, owner: &str, name: &str) -> Result<Vec<PathBuf>> {
    let (name, tag) = split_name(name);
    let conn = open_db(data_dir)?;
    let mut st = conn.prepare(
        "SELECT il.diff_id FROM image_layers il JOIN images i ON i.id = il.image_id \
         WHERE i.owner = ?1 AND i.name = ?2 AND i.tag = ?3 ORDER BY il.position",
    )?;
    let ids: Vec<String> = st
        .query_map([owner, name, tag], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    Ok(ids
        .iter()
        .map(|d| data_dir.join("layers").join(digest_hex(d)).join("diff"))
        .collect())
}

/// The config blob of `owner`'s image `name[:tag]`, parsed.
pub fn image_config(data_dir: &Path, owner: &str, name: &str) -> Result<serde_json::Value> {
    let (name, tag) = split_name(name);
    let conn = open_db(data_dir)?;
    let digest: String = conn
        .query_row(
            "SELECT config_digest FROM images WHERE owner = ?1 AND name = ?2 AND tag = ?3",
            [owner, name, tag],
            |r| r.get(0),
        )
        .with_context(|| format!("image {owner}/{name}:{tag} not in the store"))?;
    let bytes = fs::read(data_dir.join("blobs/sha256").join(digest_hex(&digest)))?;
    Ok(serde_json::from_slice(&bytes)?)
}

/// An image's layers merged by a read-only overlay mount in a temporary
/// directory (unmounted on drop).
pub struct Merged {
    dir: TempDir,
    mounted: bool,
}

impl Merged {
    /// Mounts `layers` (bottom first).
    pub fn mount(layers: &[PathBuf]) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("walt-e2e-merged-")
            .tempdir()?;
        fs::create_dir(dir.path().join("empty"))?;
        fs::create_dir(dir.path().join("root"))?;
        // Top first; an empty bottom layer, since overlayfs wants two
        // lower directories when there is no upper one.
        let mut lower: Vec<String> = layers
            .iter()
            .rev()
            .map(|p| p.display().to_string())
            .collect();
        lower.push(dir.path().join("empty").display().to_string());
        if lower.iter().any(|l| l.contains([',', ':'])) {
            bail!("a layer path holds ',' or ':': {lower:?}");
        }
        run_cmd(
            Command::new("mount")
                .args(["-t", "overlay", "overlay", "-o"])
                .arg(format!("ro,lowerdir={}", lower.join(":")))
                .arg(dir.path().join("root")),
        )?;
        Ok(Self { dir, mounted: true })
    }

    /// `owner`'s image `name` of the store at `data_dir`.
    pub fn image(data_dir: &Path, owner: &str, name: &str) -> Result<Self> {
        Self::mount(&image_layer_dirs(data_dir, owner, name)?)
    }

    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    pub fn tree(&self) -> Result<Tree> {
        tree_of_dir(&self.root())
    }

    /// The entry at `path` (absolute in the image), not following a
    /// final symlink; None when absent.
    pub fn entry(&self, path: &str) -> Option<Entry> {
        entry_at(&self.root().join(path.trim_start_matches('/'))).ok()
    }

    /// The content of the regular file at `path` (absolute in the image).
    pub fn read(&self, path: &str) -> Option<Vec<u8>> {
        let p = self.root().join(path.trim_start_matches('/'));
        let m = fs::symlink_metadata(&p).ok()?;
        m.file_type().is_file().then(|| fs::read(&p).ok()).flatten()
    }
}

impl Drop for Merged {
    fn drop(&mut self) {
        if self.mounted {
            let _ = Command::new("umount")
                .arg(self.dir.path().join("root"))
                .status();
            self.mounted = false;
        }
    }
}

/// The `file <sha256> <size>` kind of these bytes, for comparing with an
/// [`Entry`].
pub fn file_kind_of(data: &[u8]) -> String {
    format!("file {} {}", hex::encode(Sha256::digest(data)), data.len())
}
