//! The OCI / Docker schema-2 documents walt reads and writes. Unknown
//! fields are kept so that a document can be re-serialised faithfully, but
//! stored manifests and configs are always kept as the original bytes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{Digest, DigestError};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
pub const DOCKER_LAYER_TAR: &str = "application/vnd.docker.image.rootfs.diff.tar";

/// Annotation on the manifests walt writes itself (images imported from a
/// Docker daemon, commits): their uncompressed layers may be compressed when
/// published. Layers of images pulled from registries are published as they
/// are, so that their digests stay the same.
pub const ANNOTATION_WALT_BUILT: &str = "org.walt.built";

/// Every manifest type walt accepts, for the `Accept` header.
pub const MANIFEST_ACCEPT: [&str; 4] = [OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST];

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// From a layer media type; `None` when the type is not a layer walt knows.
    pub fn from_media_type(mt: &str) -> Option<Self> {
        match mt {
            OCI_LAYER_GZIP | DOCKER_LAYER_GZIP => Some(Self::Gzip),
            OCI_LAYER_ZSTD => Some(Self::Zstd),
            OCI_LAYER_TAR | DOCKER_LAYER_TAR => Some(Self::None),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct Platform {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

/// A single-image manifest (OCI or Docker schema 2).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

/// A multi-platform index (OCI index or Docker manifest list).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    pub manifests: Vec<Descriptor>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

/// Either kind of manifest document.
#[derive(Debug, Clone)]
pub enum ManifestDoc {
    Image(Box<Manifest>),
    Index(Index),
}

/// Why a manifest document could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DocError {
    #[error("manifest is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error(
        "unsupported manifest type '{0}' (walt accepts OCI and Docker schema 2 manifests and indexes)"
    )]
    Unsupported(String),
    /// A descriptor's digest is malformed, or not sha256.
    #[error("{what}: {source}")]
    Digest {
        /// Which descriptor: `manifest config`, `manifest layer 2`, `index entry 1`.
        what: String,
        source: DigestError,
    },
}

/// Checks the descriptor digests of a manifest or index document before it
/// is read into its types, so that a bad one is reported with its place.
fn check_digests(v: &Value) -> Result<(), DocError> {
    let check = |what: String, d: &Value| match d.get("digest").and_then(Value::as_str) {
        Some(s) => Digest::parse(s)
            .map(drop)
            .map_err(|source| DocError::Digest { what, source }),
        None => Ok(()),
    };
    if let Some(c) = v.get("config") {
        check("manifest config".into(), c)?;
    }
    for (key, what) in [("layers", "manifest layer"), ("manifests", "index entry")] {
        for (i, d) in v
            .get(key)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            check(format!("{what} {}", i + 1), d)?;
        }
    }
    Ok(())
}

impl ManifestDoc {
    /// Parses a manifest from its bytes, using the content type the
    /// registry sent when the document itself has no `mediaType`.
    pub fn parse(bytes: &[u8], content_type: Option<&str>) -> Result<Self, DocError> {
        let v: Value = serde_json::from_slice(bytes)?;
        let mt = v
            .get("mediaType")
            .and_then(Value::as_str)
            .map(str::to_string)
            .or_else(|| content_type.map(|c| c.split(';').next().unwrap_or(c).trim().to_string()));
        let is_index = match mt.as_deref() {
            Some(OCI_INDEX | DOCKER_LIST) => true,
            Some(OCI_MANIFEST | DOCKER_MANIFEST) => false,
            // No (usable) type: decide by shape, as the OCI spec allows.
            _ if v.get("manifests").is_some() => true,
            _ if v.get("config").is_some() && v.get("layers").is_some() => false,
            Some(other) => return Err(DocError::Unsupported(other.to_string())),
            None => return Err(DocError::Unsupported("(none)".to_string())),
        };
        if v.get("schemaVersion").and_then(Value::as_u64) == Some(1) {
            return Err(DocError::Unsupported("Docker schema 1".to_string()));
        }
        check_digests(&v)?;
        Ok(if is_index {
            ManifestDoc::Index(serde_json::from_value(v)?)
        } else {
            ManifestDoc::Image(Box::new(serde_json::from_value(v)?))
        })
    }
}

/// The image configuration (only what walt reads; the rest is kept).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct ImageConfig {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<RuntimeConfig>,
    pub rootfs: RootFs,
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct RuntimeConfig {
    #[serde(rename = "Labels", default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct RootFs {
    #[serde(rename = "type", default)]
    pub kind: String,
    #[serde(default)]
    pub diff_ids: Vec<Digest>,
}

impl ImageConfig {
    pub fn label(&self, key: &str) -> Option<&str> {
        self.config
            .as_ref()?
            .labels
            .as_ref()?
            .get(key)
            .map(String::as_str)
    }
}

/// Maps a Rust/Linux machine name to the OCI architecture and variant
/// ([`Arch`](crate::arch::Arch) table); `unknown` for a machine walt does not know.
pub fn oci_arch(machine: &str) -> (&'static str, Option<&'static str>) {
    crate::arch::Arch::from_machine(machine).map_or(("unknown", None), |a| (a.oci, a.variant))
}

/// Picks the manifest of an index to use: an exact architecture (and
/// variant, when given) match first, then the architecture alone.
/// Attestation manifests (`unknown/unknown`) are never picked.
pub fn pick_platform<'a>(
    index: &'a Index,
    arch: &str,
    variant: Option<&str>,
) -> Option<&'a Descriptor> {
    let candidates: Vec<&Descriptor> = index
        .manifests
        .iter()
        .filter(|d| {
            d.platform
                .as_ref()
                .is_some_and(|p| p.os == "linux" && p.architecture != "unknown")
        })
        .collect();
    let same_arch = |d: &&&Descriptor| d.platform.as_ref().is_some_and(|p| p.architecture == arch);
    if let Some(v) = variant
        && let Some(d) = candidates
            .iter()
            .filter(same_arch)
            .find(|d| d.platform.as_ref().and_then(|p| p.variant.as_deref()) == Some(v))
    {
        return Some(d);
    }
    candidates.iter().find(same_arch).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_docs() {
        let m = br#"{"schemaVersion":2,"config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa","size":3},"layers":[]}"#;
        assert!(matches!(
            ManifestDoc::parse(m, None).unwrap(),
            ManifestDoc::Image(_)
        ));
        let i = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":"x","digest":"sha256:1111111111111111111111111111111111111111111111111111111111111111","size":1,"platform":{"architecture":"arm64","os":"linux","variant":"v8"}},{"mediaType":"x","digest":"sha256:2222222222222222222222222222222222222222222222222222222222222222","size":1,"platform":{"architecture":"amd64","os":"linux"}}]}"#;
        let ManifestDoc::Index(idx) = ManifestDoc::parse(i, None).unwrap() else {
            panic!()
        };
        assert_eq!(
            pick_platform(&idx, "amd64", None).unwrap().digest.hex(),
            "2".repeat(64)
        );
        assert_eq!(
            pick_platform(&idx, "arm64", Some("v8"))
                .unwrap()
                .digest
                .hex(),
            "1".repeat(64)
        );
        assert!(pick_platform(&idx, "riscv64", None).is_none());
        assert!(ManifestDoc::parse(br#"{"schemaVersion":1,"fsLayers":[]}"#, None).is_err());
    }

    #[test]
    fn machine_to_platform() {
        assert_eq!(oci_arch("x86_64"), ("amd64", None));
        assert_eq!(oci_arch("aarch64"), ("arm64", Some("v8")));
        assert_eq!(oci_arch("armv7l"), ("arm", Some("v7")));
        assert_eq!(oci_arch("i686"), ("386", None));
        assert_eq!(oci_arch("riscv64"), ("riscv64", None));
        assert_eq!(oci_arch("loongarch64"), ("unknown", None));
    }

    #[test]
    fn malformed_descriptor_digest_is_refused_at_parse() {
        let m = br#"{"schemaVersion":2,"config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:../../etc","size":3},"layers":[]}"#;
        let e = ManifestDoc::parse(m, None).unwrap_err().to_string();
        assert_eq!(
            e,
            "manifest config: 'sha256:../../etc' is not a digest (expected sha256:<64 hex digits>)"
        );
        let i = br#"{"schemaVersion":2,"manifests":[{"mediaType":"x","digest":"sha384:abc","size":1}]}"#;
        let e = ManifestDoc::parse(i, None).unwrap_err().to_string();
        assert!(
            e.starts_with("index entry 1: digest 'sha384:abc' uses an algorithm"),
            "{e}"
        );
        let c = br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":["md5:aa"]}}"#;
        assert!(serde_json::from_slice::<ImageConfig>(c).is_err());
    }
}
