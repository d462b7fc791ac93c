//! Builds test images (layers, configs, manifests, indexes) as files, in
//! OCI or Docker schema 2 form, from busybox-static or hand-made tar entries
//! (including hostile ones that a careful unpacker must refuse).

use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use tempfile::TempDir;

use crate::util::{HashWriter, RandomReader, digest_hex, sha256_digest};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";

/// The label that makes an image a walt image.
pub const MODELS_LABEL: &str = "walt.node.models";

/// Manifest flavour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// OCI media types; manifests without a top-level `mediaType` (as umoci writes).
    Oci,
    /// Docker schema 2 media types.
    Docker,
}

/// Layer compression.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    /// gzip level 1 (fast, for big layers).
    GzipFast,
    Zstd,
}

impl Compression {
    pub fn layer_media_type(self, format: Format) -> &'static str {
        match (format, self) {
            (Format::Oci, Compression::None) => "application/vnd.oci.image.layer.v1.tar",
            (Format::Oci, Compression::Gzip | Compression::GzipFast) => {
                "application/vnd.oci.image.layer.v1.tar+gzip"
            }
            (Format::Oci, Compression::Zstd) => "application/vnd.oci.image.layer.v1.tar+zstd",
            (Format::Docker, Compression::None) => "application/vnd.docker.image.rootfs.diff.tar",
            (Format::Docker, Compression::Gzip | Compression::GzipFast) => {
                "application/vnd.docker.image.rootfs.diff.tar.gzip"
            }
            (Format::Docker, Compression::Zstd) => {
                "application/vnd.docker.image.rootfs.diff.tar.zstd"
            }
        }
    }
}

/// A blob stored as a file.
#[derive(Debug, Clone)]
pub struct Blob {
    pub path: PathBuf,
    pub digest: String,
    pub size: u64,
    pub media_type: String,
}

impl Blob {
    pub fn hex(&self) -> &str {
        digest_hex(&self.digest)
    }
    pub fn descriptor(&self) -> Value {
        json!({"mediaType": self.media_type, "digest": self.digest, "size": self.size})
    }
}

/// A layer blob and the digest of its uncompressed tar.
#[derive(Debug, Clone)]
pub struct Layer {
    pub blob: Blob,
    pub diff_id: String,
}

/// A tar entry written byte for byte (paths are not checked, so hostile
/// entries such as `../x` or `/abs` can be made).
#[derive(Debug, Clone)]
pub enum RawEntry {
    Dir {
        path: String,
        mode: u32,
    },
    File {
        path: String,
        data: Vec<u8>,
        mode: u32,
    },
    Symlink {
        path: String,
        target: String,
    },
    Hardlink {
        path: String,
        target: String,
    },
}

impl RawEntry {
    pub fn dir(path: &str) -> Self {
        Self::Dir {
            path: path.into(),
            mode: 0o755,
        }
    }
    pub fn file(path: &str, data: &[u8]) -> Self {
        Self::File {
            path: path.into(),
            data: data.to_vec(),
            mode: 0o644,
        }
    }
    pub fn exec(path: &str, data: &[u8]) -> Self {
        Self::File {
            path: path.into(),
            data: data.to_vec(),
            mode: 0o755,
        }
    }
    pub fn symlink(path: &str, target: &str) -> Self {
        Self::Symlink {
            path: path.into(),
            target: target.into(),
        }
    }
    pub fn hardlink(path: &str, target: &str) -> Self {
        Self::Hardlink {
            path: path.into(),
            target: target.into(),
        }
    }
}

fn set_raw_name(field: &mut [u8], value: &str) -> io::Result<()> {
    let b = value.as_bytes();
    if b.len() >= field.len() {
        return Err(io::Error::other(format!("tar name too long: {value}")));
    }
    field.fill(0);
    field[..b.len()].copy_from_slice(b);
    Ok(())
}

/// Appends an entry with its path written verbatim in the header.
pub fn append_raw<W: Write>(b: &mut tar::Builder<W>, e: &RawEntry) -> io::Result<()> {
    let mut h = tar::Header::new_ustar();
    h.set_mtime(1_700_000_000);
    h.set_uid(0);
    h.set_gid(0);
    let (path, data): (&str, &[u8]) = match e {
        RawEntry::Dir { path, mode } => {
            h.set_entry_type(tar::EntryType::Directory);
            h.set_mode(*mode);
            h.set_size(0);
            (path, &[])
        }
        RawEntry::File { path, data, mode } => {
            h.set_entry_type(tar::EntryType::Regular);
            h.set_mode(*mode);
            h.set_size(data.len() as u64);
            (path, data)
        }
        RawEntry::Symlink { path, target } | RawEntry::Hardlink { path, target } => {
            h.set_entry_type(if matches!(e, RawEntry::Symlink { .. }) {
                tar::EntryType::Symlink
            } else {
                tar::EntryType::Link
            });
            h.set_mode(0o777);
            h.set_size(0);
            set_raw_name(&mut h.as_old_mut().linkname, target)?;
            (path, &[])
        }
    };
    set_raw_name(&mut h.as_old_mut().name, path)?;
    h.set_cksum();
    b.append(&h, data)
}

/// Busybox applets linked in the test rootfs.
pub const BUSYBOX_APPLETS: &[&str] = &[
    "sh", "ash", "ls", "cat", "echo", "uname", "mkdir", "rm", "sleep", "mount", "umount", "true",
    "false", "cp", "mv", "ln", "chmod", "grep", "sed", "test", "env", "id", "hostname", "ps",
    "touch", "sync", "vi", "wc", "head", "tail", "find",
];

/// Entries of a minimal busybox-static rootfs, with `/etc/walt-test-marker`
/// holding `marker` (tests tell images apart with it).
pub fn busybox_rootfs_entries(marker: &str) -> Result<Vec<RawEntry>> {
    let busybox = std::fs::read("/bin/busybox")
        .context("/bin/busybox missing (install busybox-static: scripts/install-deps.sh)")?;
    let mut v = vec![
        RawEntry::dir("bin/"),
        RawEntry::exec("bin/busybox", &busybox),
    ];
    for a in BUSYBOX_APPLETS {
        v.push(RawEntry::symlink(&format!("bin/{a}"), "busybox"));
    }
    v.extend([
        RawEntry::dir("etc/"),
        RawEntry::file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"),
        RawEntry::file("etc/group", b"root:x:0:\n"),
        RawEntry::file("etc/walt-test-marker", format!("{marker}\n").as_bytes()),
        RawEntry::Dir {
            path: "root/".into(),
            mode: 0o700,
        },
        RawEntry::Dir {
            path: "tmp/".into(),
            mode: 0o1777,
        },
        RawEntry::dir("proc/"),
        RawEntry::dir("sys/"),
        RawEntry::dir("dev/"),
    ]);
    Ok(v)
}

/// Image configuration fields the tests vary.
#[derive(Debug, Clone)]
pub struct ImageConfig {
    pub architecture: String,
    pub variant: Option<String>,
    pub os: String,
    pub labels: Vec<(String, String)>,
}

impl ImageConfig {
    /// amd64 linux with `walt.node.models=<models>`.
    pub fn amd64(models: &str) -> Self {
        Self {
            architecture: "amd64".into(),
            variant: None,
            os: "linux".into(),
            labels: vec![(MODELS_LABEL.into(), models.into())],
        }
    }
    /// amd64 linux without any label (not a walt image).
    pub fn amd64_unlabelled() -> Self {
        Self {
            labels: vec![],
            ..Self::amd64("")
        }
    }
    pub fn arm64(models: &str) -> Self {
        Self {
            architecture: "arm64".into(),
            variant: Some("v8".into()),
            ..Self::amd64(models)
        }
    }
    pub fn armv7(models: &str) -> Self {
        Self {
            architecture: "arm".into(),
            variant: Some("v7".into()),
            ..Self::amd64(models)
        }
    }
    pub fn label(mut self, k: &str, v: &str) -> Self {
        self.labels.push((k.into(), v.into()));
        self
    }
}

/// A built single-platform image.
#[derive(Debug, Clone)]
pub struct BuiltImage {
    pub format: Format,
    pub config: Blob,
    pub layers: Vec<Blob>,
    pub diff_ids: Vec<String>,
    pub manifest: Vec<u8>,
    pub manifest_media_type: String,
    pub manifest_digest: String,
    pub platform: ImageConfig,
}

/// A built multi-platform index (OCI index or Docker manifest list).
#[derive(Debug, Clone)]
pub struct BuiltIndex {
    pub images: Vec<(BuiltImage, ImageConfig)>,
    pub bytes: Vec<u8>,
    pub media_type: String,
    pub digest: String,
}

/// A directory where blobs are built; removed on drop.
pub struct ImageBuilder {
    dir: TempDir,
}

impl ImageBuilder {
    pub fn new() -> Result<Self> {
        Ok(Self {
            dir: tempfile::Builder::new()
                .prefix("walt-e2e-images-")
                .tempdir()?,
        })
    }

    fn store_bytes(&self, bytes: &[u8], media_type: &str) -> Result<Blob> {
        let digest = sha256_digest(bytes);
        let path = self.dir.path().join(digest_hex(&digest));
        std::fs::write(&path, bytes)?;
        Ok(Blob {
            path,
            digest,
            size: bytes.len() as u64,
            media_type: media_type.into(),
        })
    }

    /// A layer whose tar stream is written by `fill`, compressed on the fly.
    pub fn layer_with(
        &self,
        format: Format,
        compression: Compression,
        fill: impl FnOnce(&mut tar::Builder<&mut dyn Write>) -> io::Result<()>,
    ) -> Result<Layer> {
        let tmp_path = self
            .dir
            .path()
            .join(format!("layer-{}.tmp", crate::util::unique_seed()));
        let mut outer =
            HashWriter::new(BufWriter::with_capacity(1 << 20, File::create(&tmp_path)?));
        let run = |w: &mut dyn Write| -> io::Result<String> {
            let mut inner = HashWriter::new(w);
            {
                let mut b = tar::Builder::new(&mut inner as &mut dyn Write);
                fill(&mut b)?;
                b.finish()?;
            }
            Ok(inner.finish().0)
        };
        let diff_id = match compression {
            Compression::None => run(&mut outer)?,
            Compression::Gzip | Compression::GzipFast => {
                let level = if compression == Compression::Gzip {
                    6
                } else {
                    1
                };
                let mut enc =
                    flate2::write::GzEncoder::new(&mut outer, flate2::Compression::new(level));
                let d = run(&mut enc)?;
                enc.finish()?;
                d
            }
            Compression::Zstd => {
                let mut enc = zstd::Encoder::new(&mut outer, 3)?;
                let d = run(&mut enc)?;
                enc.finish()?;
                d
            }
        };
        let (digest, size, mut w) = outer.finish();
        w.flush()?;
        drop(w);
        let path = self.dir.path().join(digest_hex(&digest));
        std::fs::rename(&tmp_path, &path)?;
        Ok(Layer {
            blob: Blob {
                path,
                digest,
                size,
                media_type: compression.layer_media_type(format).into(),
            },
            diff_id,
        })
    }

    /// A layer made of raw entries.
    pub fn layer(
        &self,
        format: Format,
        compression: Compression,
        entries: &[RawEntry],
    ) -> Result<Layer> {
        self.layer_with(format, compression, |b| {
            for e in entries {
                append_raw(b, e)?;
            }
            Ok(())
        })
    }

    /// The busybox rootfs layer with a marker.
    pub fn busybox_layer(
        &self,
        format: Format,
        compression: Compression,
        marker: &str,
    ) -> Result<Layer> {
        self.layer(format, compression, &busybox_rootfs_entries(marker)?)
    }

    /// A layer holding one incompressible file `/data/random.bin` of `size` bytes.
    pub fn big_random_layer(
        &self,
        format: Format,
        compression: Compression,
        size: u64,
        seed: u64,
    ) -> Result<Layer> {
        self.layer_with(format, compression, |b| {
            append_raw(b, &RawEntry::dir("data/"))?;
            let mut h = tar::Header::new_ustar();
            h.set_path("data/random.bin")?;
            h.set_entry_type(tar::EntryType::Regular);
            h.set_mode(0o644);
            h.set_mtime(1_700_000_000);
            h.set_size(size);
            h.set_cksum();
            b.append(&h, RandomReader::new(seed, size))
        })
    }

    /// An image from layers and a config.
    pub fn image(
        &self,
        format: Format,
        config: ImageConfig,
        layers: &[Layer],
    ) -> Result<BuiltImage> {
        if format == Format::Docker && layers.iter().any(|l| l.blob.media_type.contains("zstd")) {
            bail!("Docker schema 2 has no zstd layers");
        }
        let labels: serde_json::Map<String, Value> = config
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        let diff_ids: Vec<String> = layers.iter().map(|l| l.diff_id.clone()).collect();
        let mut cfg = json!({
            "architecture": config.architecture,
            "os": config.os,
            "created": "2024-05-01T12:00:00Z",
            "config": {
                "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                "Cmd": ["/bin/sh"],
                "WorkingDir": "/root",
                "Labels": labels,
            },
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": layers.iter().map(|_| json!({"created": "2024-05-01T12:00:00Z", "created_by": "walt-e2e"})).collect::<Vec<_>>(),
        });
        if let Some(v) = &config.variant {
            cfg["variant"] = json!(v);
        }
        let (config_mt, manifest_mt) = match format {
            Format::Oci => (OCI_CONFIG, OCI_MANIFEST),
            Format::Docker => (DOCKER_CONFIG, DOCKER_MANIFEST),
        };
        let config_blob = self.store_bytes(&serde_json::to_vec(&cfg)?, config_mt)?;
        let mut manifest = json!({
            "schemaVersion": 2,
            "config": config_blob.descriptor(),
            "layers": layers.iter().map(|l| l.blob.descriptor()).collect::<Vec<_>>(),
        });
        if format == Format::Docker {
            manifest["mediaType"] = json!(DOCKER_MANIFEST);
        }
        let manifest = serde_json::to_vec(&manifest)?;
        Ok(BuiltImage {
            format,
            manifest_digest: sha256_digest(&manifest),
            manifest,
            manifest_media_type: manifest_mt.into(),
            config: config_blob,
            layers: layers.iter().map(|l| l.blob.clone()).collect(),
            diff_ids,
            platform: config,
        })
    }

    /// The standard test image: busybox rootfs, one layer, given models label.
    pub fn busybox_image(
        &self,
        format: Format,
        compression: Compression,
        models: &str,
    ) -> Result<BuiltImage> {
        let layer = self.busybox_layer(format, compression, &format!("busybox {models}"))?;
        self.image(format, ImageConfig::amd64(models), &[layer])
    }

    /// A multi-platform index of images (each image's platform from its config).
    pub fn index(&self, format: Format, images: &[BuiltImage]) -> Result<BuiltIndex> {
        let media_type = match format {
            Format::Oci => OCI_INDEX,
            Format::Docker => DOCKER_LIST,
        };
        let manifests: Vec<Value> = images
            .iter()
            .map(|img| {
                let mut platform =
                    json!({"architecture": img.platform.architecture, "os": img.platform.os});
                if let Some(v) = &img.platform.variant {
                    platform["variant"] = json!(v);
                }
                json!({
                    "mediaType": img.manifest_media_type,
                    "digest": img.manifest_digest,
                    "size": img.manifest.len(),
                    "platform": platform,
                })
            })
            .collect();
        let bytes = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": media_type,
            "manifests": manifests,
        }))?;
        Ok(BuiltIndex {
            images: images
                .iter()
                .map(|i| (i.clone(), i.platform.clone()))
                .collect(),
            digest: sha256_digest(&bytes),
            bytes,
            media_type: media_type.into(),
        })
    }
}

/// Lists the entry paths of an uncompressed or gzip/zstd tar blob (for self-tests).
pub fn tar_entry_paths(blob: &Blob) -> Result<Vec<String>> {
    let f = File::open(&blob.path)?;
    let r: Box<dyn Read> = if blob.media_type.ends_with("gzip") {
        Box::new(flate2::read::GzDecoder::new(f))
    } else if blob.media_type.ends_with("zstd") {
        Box::new(zstd::Decoder::new(f)?)
    } else {
        Box::new(f)
    };
    let mut a = tar::Archive::new(r);
    let mut out = Vec::new();
    for e in a.entries()? {
        let e = e?;
        out.push(String::from_utf8_lossy(&e.path_bytes()).into_owned());
    }
    Ok(out)
}
