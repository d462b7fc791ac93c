//! Docker Hub specifics: the Hub's search API (which lists repositories,
//! something the registry protocol of the Hub does not do), and the
//! `<user>/walt_metadata` image through which WalT users make their images
//! findable (its config label `metadata` holds base64 JSON listing the
//! user's walt images and their labels; format in `docs/hub.md`).

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use base64::Engine;
use reqwest::{StatusCode, Url};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest as _, Sha256};
use walt_core::Digest;
use walt_core::oci::{self, ImageConfig, ManifestDoc};

use crate::{RegistryClient, RegistryError};

/// Default registry endpoint of the Docker Hub.
pub const DEFAULT_REGISTRY_URL: &str = "https://registry-1.docker.io";
/// Default endpoint of the Hub's search/listing API.
pub const DEFAULT_SEARCH_URL: &str = "https://hub.docker.com";
/// Repository name of the metadata image of each user.
pub const METADATA_REPO: &str = "walt_metadata";
/// Config label of the metadata image holding the base64 JSON.
pub const METADATA_LABEL: &str = "metadata";
/// Key of the image map in WalT's metadata document.
pub const WALT_IMAGES_KEY: &str = "walt.user.images";

/// Results asked for per search page.
const PAGE_SIZE: u32 = 100;
/// Pages followed at most (a loop of `next` links must end).
const MAX_PAGES: usize = 1000;
const SEARCH_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_PAGE_BYTES: usize = 8 << 20;
/// Largest error body read (to summarise it).
const MAX_ERROR_BODY: u64 = 64 << 10;
/// Largest metadata config accepted.
const MAX_CONFIG_SIZE: u64 = 16 << 20;

/// A client for the Hub's search API (`GET /v2/search/repositories/`).
#[derive(Clone, Debug)]
pub struct HubSearch {
    http: reqwest::Client,
    base: Url,
}

#[derive(Deserialize)]
struct SearchPage {
    #[serde(default)]
    next: Option<String>,
    #[serde(default)]
    results: Vec<SearchItem>,
}

#[derive(Deserialize)]
struct SearchItem {
    #[serde(default)]
    repo_name: Option<String>,
    /// Some versions split the name.
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    name: Option<String>,
}

impl SearchItem {
    fn full_name(&self) -> Option<String> {
        if let Some(r) = &self.repo_name {
            return Some(r.clone());
        }
        Some(format!(
            "{}/{}",
            self.namespace.as_ref()?,
            self.name.as_ref()?
        ))
    }
}

fn config_err(reason: String) -> RegistryError {
    RegistryError::Config {
        label: "hub".into(),
        reason,
    }
}

impl HubSearch {
    /// `search_url`: `http(s)://host[:port]` of the search API.
    pub fn new(search_url: &str) -> Result<Self, RegistryError> {
        Self::with_ca(search_url, None)
    }

    /// Same, trusting the extra CA certificates `ca_pem` too.
    pub fn with_ca(search_url: &str, ca_pem: Option<Vec<u8>>) -> Result<Self, RegistryError> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let base = Url::parse(search_url.trim_end_matches('/'))
            .map_err(|e| config_err(format!("invalid search-url '{search_url}': {e}")))?;
        if base.scheme() != "http" && base.scheme() != "https" {
            return Err(config_err(format!(
                "invalid search-url '{search_url}': not http or https"
            )));
        }
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(SEARCH_TIMEOUT)
            .user_agent(concat!("walt/", env!("CARGO_PKG_VERSION")));
        if let Some(pem) = ca_pem {
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| config_err(format!("invalid CA certificates: {e}")))?;
            builder = builder.tls_certs_merge(certs);
        }
        let http = builder
            .build()
            .map_err(|e| config_err(format!("cannot create the HTTP client: {e}")))?;
        Ok(Self { http, base })
    }

    /// Names (`user/repo`) of the repositories matching `query`, every
    /// page followed.
    pub async fn repositories(&self, query: &str) -> Result<Vec<String>, RegistryError> {
        let mut url = self.endpoint("/v2/search/repositories/")?;
        url.query_pairs_mut()
            .append_pair("query", query)
            .append_pair("page_size", &PAGE_SIZE.to_string());
        let mut out: Vec<String> = self
            .all_pages(url)
            .await?
            .iter()
            .filter_map(SearchItem::full_name)
            .collect();
        out.sort();
        out.dedup();
        Ok(out)
    }

    /// The repositories of hub user `user` (names below the user), every
    /// page followed (`GET /v2/repositories/<user>/`, as WalT lists them).
    pub async fn user_repositories(&self, user: &str) -> Result<Vec<String>, RegistryError> {
        let mut url = self.endpoint(&format!("/v2/repositories/{user}/"))?;
        url.query_pairs_mut()
            .append_pair("page_size", &PAGE_SIZE.to_string());
        Ok(Self::short_names(self.all_pages(url).await?))
    }

    /// The tags of `<user>/<repo>` (`GET /v2/repositories/<user>/<repo>/tags`).
    pub async fn repository_tags(
        &self,
        user: &str,
        repo: &str,
    ) -> Result<Vec<String>, RegistryError> {
        let mut url = self.endpoint(&format!("/v2/repositories/{user}/{repo}/tags"))?;
        url.query_pairs_mut()
            .append_pair("page_size", &PAGE_SIZE.to_string());
        Ok(Self::short_names(self.all_pages(url).await?))
    }

    fn short_names(items: Vec<SearchItem>) -> Vec<String> {
        let mut out: Vec<String> = items.into_iter().filter_map(|i| i.name).collect();
        out.sort();
        out.dedup();
        out
    }

    fn endpoint(&self, path: &str) -> Result<Url, RegistryError> {
        self.base.join(path).map_err(|e| config_err(e.to_string()))
    }

    /// The results of every page from `url` on, following `next`.
    async fn all_pages(&self, url: Url) -> Result<Vec<SearchItem>, RegistryError> {
        let mut out = Vec::new();
        let mut next = Some(url);
        let mut pages = 0;
        while let Some(url) = next.take() {
            pages += 1;
            if pages > MAX_PAGES {
                break;
            }
            let page = self.page(&url).await?;
            out.extend(page.results);
            if let Some(n) = page.next.filter(|n| !n.is_empty()) {
                next = Some(url.join(&n).map_err(|e| RegistryError::Protocol {
                    label: "hub".into(),
                    what: "hub listing".into(),
                    reason: format!("bad next link '{n}': {e}"),
                })?);
            }
        }
        Ok(out)
    }

    async fn page(&self, url: &Url) -> Result<SearchPage, RegistryError> {
        let shown = format!("{}://{}", url.scheme(), url.authority());
        let resp = self.http.get(url.clone()).send().await.map_err(|e| {
            if e.is_timeout() {
                RegistryError::Timeout {
                    label: "hub".into(),
                    url: shown.clone(),
                    reason: e.to_string(),
                }
            } else {
                RegistryError::Unreachable {
                    label: "hub".into(),
                    url: shown.clone(),
                    reason: crate::error::one_line(&root_cause(&e), 200),
                }
            }
        })?;
        let status = resp.status();
        if status != StatusCode::OK {
            let path = url.path().to_string();
            // An error body is only summarised: 64 KiB is plenty.
            let body = crate::client::read_limited(resp, MAX_ERROR_BODY)
                .await
                .unwrap_or_default();
            let message = crate::error::summarize_error_body(&body);
            let err = if status.is_server_error() {
                RegistryError::Server {
                    label: "hub".into(),
                    status: status.as_u16(),
                    method: "GET".into(),
                    path,
                    message: message.clone(),
                }
            } else {
                RegistryError::Http {
                    label: "hub".into(),
                    status: status.as_u16(),
                    method: "GET".into(),
                    path,
                    message: message.clone(),
                }
            };
            return Err(err);
        }
        let body = crate::client::read_limited(resp, MAX_PAGE_BYTES as u64)
            .await
            .map_err(|e| match e {
                crate::client::ReadError::TooLarge => RegistryError::TooLarge {
                    label: "hub".into(),
                    what: "search results page".into(),
                    max: MAX_PAGE_BYTES as u64,
                },
                crate::client::ReadError::Transport(e) => RegistryError::Interrupted {
                    label: "hub".into(),
                    what: "search results".into(),
                    reason: e.to_string(),
                },
            })?;
        serde_json::from_slice(&body).map_err(|e| RegistryError::Protocol {
            label: "hub".into(),
            what: "search results".into(),
            reason: e.to_string(),
        })
    }
}

fn root_cause(e: &dyn std::error::Error) -> String {
    let mut cur: &dyn std::error::Error = e;
    while let Some(s) = cur.source() {
        cur = s;
    }
    cur.to_string()
}

/// One image listed in a user's metadata.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MetadataEntry {
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Fields written by other tools, kept.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

/// The content of a user's `walt_metadata` image.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WaltMetadata {
    /// By `<name>:<tag>`.
    pub images: BTreeMap<String, MetadataEntry>,
    /// Other top-level keys, kept.
    pub other: BTreeMap<String, Value>,
}

impl WaltMetadata {
    /// Parses the decoded JSON. Accepts WalT's `{"walt.user.images":
    /// {...}}`, `{"images": {...}}` (written by earlier versions of this
    /// project) and the image map alone; keys may be `name`, `name:tag` or
    /// `user/name:tag` (normalised to `name:tag`).
    pub fn from_json(bytes: &[u8]) -> Option<Self> {
        let value: Value = serde_json::from_slice(bytes).ok()?;
        let Value::Object(mut top) = value else {
            return None;
        };
        let found = top
            .remove(WALT_IMAGES_KEY)
            .map(|v| (v, top.remove("images")))
            .or_else(|| top.remove("images").map(|v| (v, None)));
        let (images, other) = match found {
            Some((Value::Object(images), older)) => {
                // Both keys (a document rewritten by WalT after us): WalT's wins.
                let mut all = match older {
                    Some(Value::Object(o)) => o,
                    _ => serde_json::Map::new(),
                };
                all.extend(images);
                (all, top.into_iter().collect())
            }
            Some(_) => return None,
            None => (top, BTreeMap::new()),
        };
        let mut out = BTreeMap::new();
        for (key, v) in images {
            let Value::Object(mut obj) = v else { continue };
            let labels = match obj.remove("labels") {
                Some(Value::Object(l)) => l
                    .into_iter()
                    .map(|(k, v)| match v {
                        Value::String(s) => (k, s),
                        v => (k, v.to_string()),
                    })
                    .collect(),
                _ => BTreeMap::new(),
            };
            let name = key.rsplit_once('/').map_or(key.as_str(), |(_, n)| n);
            let name = if name.contains(':') {
                name.to_string()
            } else {
                format!("{name}:latest")
            };
            out.insert(
                name,
                MetadataEntry {
                    labels,
                    extra: obj.into_iter().collect(),
                },
            );
        }
        Some(Self { images: out, other })
    }

    /// The JSON document as WalT writes it for hub user `user`:
    /// `{"walt.user.images": {"<user>/<name>:<tag>": {"labels": {...}}}}`,
    /// other top-level keys kept.
    pub fn to_json(&self, user: &str) -> Vec<u8> {
        let mut top: serde_json::Map<String, Value> = self
            .other
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let images: serde_json::Map<String, Value> = self
            .images
            .iter()
            .map(|(k, v)| {
                (
                    format!("{user}/{k}"),
                    serde_json::to_value(v).unwrap_or(Value::Null),
                )
            })
            .collect();
        top.insert(WALT_IMAGES_KEY.into(), Value::Object(images));
        serde_json::to_vec(&Value::Object(top)).unwrap_or_default()
    }

    /// The value of the `metadata` label of hub user `user`: base64 of
    /// the JSON.
    pub fn encode(&self, user: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.to_json(user))
    }

    /// Parses a `metadata` label value (base64, padded or not, standard or
    /// URL-safe alphabet).
    pub fn decode(label: &str) -> Option<Self> {
        use base64::engine::general_purpose::{
            STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD,
        };
        let text: String = label.chars().filter(|c| !c.is_whitespace()).collect();
        let bytes = [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD]
            .iter()
            .find_map(|e| e.decode(&text).ok())?;
        Self::from_json(&bytes)
    }
}

fn sha256(data: &[u8]) -> Digest {
    Digest::from_sha256(Sha256::digest(data).into())
}

/// A tiny image whose config carries `metadata` as label `metadata`: one
/// empty (gzipped) tar layer, since some registries refuse images without
/// layers. Docker schema 2, as WalT writes it (WalT's older readers parse
/// only that format).
pub struct MetadataImage {
    pub layer: Vec<u8>,
    pub layer_digest: Digest,
    pub config: Vec<u8>,
    pub config_digest: Digest,
    pub manifest: Vec<u8>,
}

impl MetadataImage {
    pub fn build(user: &str, metadata: &WaltMetadata) -> Self {
        // An empty tar archive: two zero blocks.
        let tar = vec![0u8; 1024];
        let diff_id = sha256(&tar);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        let _ = gz.write_all(&tar);
        let layer = gz.finish().unwrap_or_default();
        let layer_digest = sha256(&layer);
        let (arch, variant) = oci::oci_arch(std::env::consts::ARCH);
        let mut config = serde_json::json!({
            "architecture": arch,
            "os": "linux",
            "config": { "Labels": { METADATA_LABEL: metadata.encode(user) } },
            "rootfs": { "type": "layers", "diff_ids": [diff_id] },
        });
        if let Some(v) = variant {
            config["variant"] = Value::String(v.into());
        }
        let config = serde_json::to_vec(&config).unwrap_or_default();
        let config_digest = sha256(&config);
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": oci::DOCKER_MANIFEST,
            "config": { "mediaType": oci::DOCKER_CONFIG, "digest": config_digest, "size": config.len() },
            "layers": [{ "mediaType": oci::DOCKER_LAYER_GZIP, "digest": layer_digest, "size": layer.len() }],
        }))
        .unwrap_or_default();
        Self {
            layer,
            layer_digest,
            config,
            config_digest,
            manifest,
        }
    }
}

impl RegistryClient {
    /// The configuration of `repo:reference` (for an index, this
    /// platform's image, else the first); `None` when the tag does not
    /// exist.
    pub async fn image_config(
        &self,
        repo: &str,
        reference: &str,
    ) -> Result<Option<ImageConfig>, RegistryError> {
        let bad = |reason: String| RegistryError::Protocol {
            label: self.label().to_string(),
            what: format!("{repo}:{reference}"),
            reason,
        };
        let fetched = match self.get_manifest(repo, reference).await {
            Ok(f) => f,
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) => return Err(e),
        };
        let manifest = match ManifestDoc::parse(&fetched.bytes, fetched.media_type.as_deref())
            .map_err(|e| bad(e.to_string()))?
        {
            ManifestDoc::Image(m) => *m,
            ManifestDoc::Index(index) => {
                let (arch, variant) = oci::oci_arch(std::env::consts::ARCH);
                // Labels are the same for every platform: any will do.
                let desc = oci::pick_platform(&index, arch, variant)
                    .or_else(|| index.manifests.first())
                    .ok_or_else(|| bad("empty index".into()))?;
                let f = self.get_manifest(repo, desc.digest.as_str()).await?;
                match ManifestDoc::parse(&f.bytes, f.media_type.as_deref())
                    .map_err(|e| bad(e.to_string()))?
                {
                    ManifestDoc::Image(m) => *m,
                    ManifestDoc::Index(_) => return Err(bad("nested index".into())),
                }
            }
        };
        let bytes = self
            .get_blob_bytes(repo, &manifest.config.digest, MAX_CONFIG_SIZE)
            .await?;
        let config: ImageConfig =
            serde_json::from_slice(&bytes).map_err(|e| bad(format!("bad config: {e}")))?;
        Ok(Some(config))
    }

    /// The metadata of `user` (`<user>/walt_metadata:latest`); `None` when
    /// the image does not exist.
    pub async fn read_walt_metadata(
        &self,
        user: &str,
    ) -> Result<Option<WaltMetadata>, RegistryError> {
        let repo = format!("{user}/{METADATA_REPO}");
        let Some(config) = self.image_config(&repo, "latest").await? else {
            return Ok(None);
        };
        let Some(label) = config.label(METADATA_LABEL) else {
            return Ok(Some(WaltMetadata::default()));
        };
        WaltMetadata::decode(label)
            .map(Some)
            .ok_or_else(|| RegistryError::Protocol {
                label: self.label().to_string(),
                what: format!("{repo}:latest"),
                reason: "label 'metadata' is not base64 JSON".into(),
            })
    }

    /// Pushes `metadata` as `<user>/walt_metadata:latest`.
    pub async fn write_walt_metadata(
        &self,
        user: &str,
        metadata: &WaltMetadata,
    ) -> Result<(), RegistryError> {
        let repo = format!("{user}/{METADATA_REPO}");
        let img = MetadataImage::build(user, metadata);
        self.push_blob_bytes(&repo, &img.layer_digest, &img.layer)
            .await?;
        self.push_blob_bytes(&repo, &img.config_digest, &img.config)
            .await?;
        self.put_manifest(&repo, "latest", oci::DOCKER_MANIFEST, &img.manifest)
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_round_trip_and_tolerance() {
        let mut m = WaltMetadata::default();
        m.images.insert(
            "img:v1".into(),
            MetadataEntry {
                labels: [("walt.node.models".to_string(), "rpi-3-b".to_string())].into(),
                extra: BTreeMap::new(),
            },
        );
        let back = WaltMetadata::decode(&m.encode("alice")).unwrap();
        assert_eq!(back, m);
        // WalT's shape, as its update_user_metadata_for_image writes it.
        let doc: Value = serde_json::from_slice(&m.to_json("alice")).unwrap();
        assert_eq!(
            doc[WALT_IMAGES_KEY]["alice/img:v1"]["labels"]["walt.node.models"],
            "rpi-3-b"
        );
        assert_eq!(doc.as_object().unwrap().len(), 1, "{doc}");
        let walt = br#"{"walt.user.images": {"bob/x:latest": {"labels": {"walt.node.models": "rpi-4-b"}}}, "k": 1}"#;
        let m = WaltMetadata::from_json(walt).unwrap();
        assert_eq!(m.images["x:latest"].labels["walt.node.models"], "rpi-4-b");
        assert_eq!(m.other["k"], 1);
        let doc: Value = serde_json::from_slice(&m.to_json("bob")).unwrap();
        assert_eq!(doc["k"], 1);
        assert!(doc[WALT_IMAGES_KEY]["bob/x:latest"].is_object(), "{doc}");
        // older shapes: the map alone, user-prefixed keys, no tag, extra fields
        let raw = br#"{"alice/foo": {"labels": {"walt.node.models": "pc-x86-64", "n": 3}, "created_at": "x"}, "bar:v2": {}}"#;
        let m = WaltMetadata::from_json(raw).unwrap();
        assert_eq!(
            m.images["foo:latest"].labels["walt.node.models"],
            "pc-x86-64"
        );
        assert_eq!(m.images["foo:latest"].labels["n"], "3");
        assert!(m.images["foo:latest"].extra.contains_key("created_at"));
        assert!(m.images["bar:v2"].labels.is_empty());
        assert!(WaltMetadata::decode("!!!").is_none());
        let unpadded = base64::engine::general_purpose::STANDARD_NO_PAD.encode(br#"{"images":{}}"#);
        assert!(WaltMetadata::decode(&unpadded).unwrap().images.is_empty());
    }

    #[test]
    fn metadata_image_is_consistent() {
        let img = MetadataImage::build("u", &WaltMetadata::default());
        assert_eq!(sha256(&img.layer), img.layer_digest);
        let m: oci::Manifest = serde_json::from_slice(&img.manifest).unwrap();
        assert_eq!(m.config.digest, img.config_digest);
        assert_eq!(m.layers[0].size, img.layer.len() as u64);
        let c: ImageConfig = serde_json::from_slice(&img.config).unwrap();
        assert!(WaltMetadata::decode(c.label(METADATA_LABEL).unwrap()).is_some());
    }
}

/// The endpoints of a configured hub (keys `registry-url` and `search-url`
/// of its entry; the Docker Hub's by default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubEndpoints {
    pub registry_url: String,
    pub search_url: String,
}

impl HubEndpoints {
    pub fn of(hub: &walt_core::config::HubRegistry) -> Self {
        let get = |k: &str, d: &str| {
            hub.other
                .get(k)
                .map(|s| s.trim().trim_end_matches('/').to_string())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| d.to_string())
        };
        Self {
            registry_url: get("registry-url", DEFAULT_REGISTRY_URL),
            search_url: get("search-url", DEFAULT_SEARCH_URL),
        }
    }
}

/// The PEM certificates of the hub entry's `ca-file`, when set.
fn extra_ca(hub: &walt_core::config::HubRegistry) -> Result<Option<Vec<u8>>, RegistryError> {
    let Some(file) = hub.other.get("ca-file").filter(|f| !f.trim().is_empty()) else {
        return Ok(None);
    };
    let pem =
        std::fs::read(file).map_err(|e| config_err(format!("cannot read CA file {file}: {e}")))?;
    if reqwest::Certificate::from_pem_bundle(&pem)
        .map(|c| c.is_empty())
        .unwrap_or(true)
    {
        return Err(config_err(format!(
            "CA file {file} holds no valid PEM certificate"
        )));
    }
    Ok(Some(pem))
}

impl HubSearch {
    /// The search API client of the configured hub.
    pub fn for_hub(hub: &walt_core::config::HubRegistry) -> Result<Self, RegistryError> {
        Self::with_ca(&HubEndpoints::of(hub).search_url, extra_ca(hub)?)
    }
}

impl RegistryClient {
    /// A client for the registry of the configured hub (label `hub`).
    pub fn for_hub(
        hub: &walt_core::config::HubRegistry,
        credentials: Option<crate::Credentials>,
    ) -> Result<Self, RegistryError> {
        let mut opts = crate::ClientOptions::new("hub", HubEndpoints::of(hub).registry_url);
        opts.credentials = credentials;
        opts.extra_ca_pem = extra_ca(hub)?;
        Self::new(opts)
    }
}

#[cfg(test)]
mod endpoint_tests {
    use super::*;

    #[test]
    fn endpoints_default_and_override() {
        let mut hub = walt_core::config::HubRegistry {
            description: "hub".into(),
            other: BTreeMap::new(),
        };
        let e = HubEndpoints::of(&hub);
        assert_eq!(e.registry_url, DEFAULT_REGISTRY_URL);
        assert_eq!(e.search_url, DEFAULT_SEARCH_URL);
        hub.other
            .insert("registry-url".into(), "http://127.0.0.1:5000/".into());
        hub.other
            .insert("search-url".into(), " http://127.0.0.1:8080 ".into());
        let e = HubEndpoints::of(&hub);
        assert_eq!(e.registry_url, "http://127.0.0.1:5000");
        assert_eq!(e.search_url, "http://127.0.0.1:8080");
        let c = RegistryClient::for_hub(&hub, None).unwrap();
        assert_eq!(c.label(), "hub");
        assert_eq!(c.base_url(), "http://127.0.0.1:5000");
        assert!(HubSearch::new("ftp://x").is_err());
    }
}
