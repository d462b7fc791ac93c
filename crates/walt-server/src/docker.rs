//! The server's Docker daemon as an image source (`docker:` URLs): search
//! lists its images carrying `walt.node.models`; clone streams a `docker
//! save` archive straight into the store (no temporary copy of it).

use std::collections::HashMap;
use std::io::{self, Read};
use std::sync::Arc;

use bytes::Bytes;
use serde::Deserialize;
use tokio::sync::mpsc;

use walt_core::config::ServerConfig;
use walt_core::models::parse_models;
use walt_core::oci::{self, Compression, ImageConfig, Manifest};
use walt_core::{
    CloneUrl, Digest, ImageName, LABEL_NODE_MODELS, LABEL_SERVER_MINVERSION, Location,
};
use walt_registry::{DEFAULT_DOCKER_SOCKET, DockerClient, DockerError};
use walt_store::{ImportGuard, ImportOptions, LayerImport, LayerRef, PutOutcome, Store};

use crate::accept::{self, Accepted};
use crate::clone::{CloneResult, Events as CloneEvents};
use crate::error::ServiceError;
use crate::progress::LayerProgress;
use crate::search::{Events as SearchEvents, SearchEvent, SearchHit};

/// Longest wait for the daemon's image list or an image's details: a hung
/// daemon must not hold a search or a clone forever.
const API_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Largest JSON document (config, manifest) read from the archive.
const MAX_JSON: u64 = 16 << 20;

/// The daemon of this configuration: `docker: { socket: PATH }` in
/// server.conf, else the default socket.
pub(crate) fn client(config: &ServerConfig) -> DockerClient {
    let socket = config
        .file
        .other
        .get("docker")
        .and_then(|d| d.get("socket"))
        .and_then(|s| s.as_str())
        .filter(|s| !s.trim().is_empty())
        .unwrap_or(DEFAULT_DOCKER_SOCKET);
    DockerClient::new(socket.trim())
}

/// `<user>/<name>:<tag>` of a `docker:` URL.
fn reference(url: &CloneUrl) -> String {
    format!("{}:{}", url.path(), url.tag)
}

/// Search: the daemon's images labelled `walt.node.models`. A daemon that
/// is not there is silently skipped.
pub(crate) async fn search(client: DockerClient, keyword: String, events: SearchEvents) {
    let listed = tokio::time::timeout(API_TIMEOUT, client.images_with_label(LABEL_NODE_MODELS))
        .await
        .unwrap_or_else(|_| {
            Err(DockerError::Protocol {
                socket: client.socket().display().to_string(),
                reason: format!("no answer after {}s", API_TIMEOUT.as_secs()),
            })
        });
    let images = match listed {
        Ok(i) => i,
        Err(e) if e.is_not_running() => {
            tracing::debug!(error = %e, "search: no Docker daemon");
            return;
        }
        Err(e) => {
            let msg = format!("docker skipped: {e}");
            tracing::info!("search: {msg}");
            events.send(SearchEvent::Warning(msg)).await;
            return;
        }
    };
    for img in images {
        let labels = img.labels.unwrap_or_default();
        let models = labels
            .get(LABEL_NODE_MODELS)
            .map(|m| parse_models(m))
            .unwrap_or_default();
        if models.is_empty() {
            continue;
        }
        let minversion = labels
            .get(LABEL_SERVER_MINVERSION)
            .and_then(|v| v.trim().parse().ok());
        for tag in img.repo_tags.unwrap_or_default() {
            // `<user>/<name>:<tag>` only (not `busybox:latest`, not `<none>`).
            let Ok(url) = CloneUrl::parse(&format!("docker:{tag}")) else {
                continue;
            };
            if url.location != Location::Docker || !url.to_string().contains(&keyword) {
                continue;
            }
            let hit = SearchHit::new(&url, models.clone(), minversion);
            events.send(SearchEvent::Found(hit)).await;
        }
    }
}

/// Clone planning: the image must exist on the daemon and be a walt image.
pub(crate) async fn check(
    config: &ServerConfig,
    url: &CloneUrl,
) -> Result<DockerClient, ServiceError> {
    let client = client(config);
    let info = tokio::time::timeout(API_TIMEOUT, client.inspect(&reference(url)))
        .await
        .map_err(|_| ServiceError::DockerTimeout {
            socket: client.socket().display().to_string(),
            secs: API_TIMEOUT.as_secs(),
        })??;
    accept::node_models(info.label(LABEL_NODE_MODELS), url)?;
    Ok(client)
}

/// A build's base image on the daemon: its client and its layer count
/// when the daemon has `image`, else why it cannot be used (`not found`,
/// `not configured`: no `docker` section and no daemon at the default
/// socket, `not running`, or the daemon's error).
pub(crate) async fn find_base(
    config: &ServerConfig,
    image: &str,
) -> Result<(DockerClient, usize), String> {
    let client = client(config);
    let info = match tokio::time::timeout(API_TIMEOUT, client.inspect(image)).await {
        Err(_) => return Err(format!("no answer within {}s", API_TIMEOUT.as_secs())),
        Ok(Ok(info)) => info,
        Ok(Err(DockerError::ImageNotFound { .. })) => return Err("not found".into()),
        Ok(Err(e)) if e.is_not_running() => {
            let configured = config.file.other.contains_key("docker");
            return Err(if configured {
                "not running"
            } else {
                "not configured"
            }
            .into());
        }
        Ok(Err(e)) => return Err(e.to_string()),
    };
    let layers = info.root_fs.map(|r| r.layers.len()).unwrap_or(0);
    Ok((client, layers))
}

/// What the archive held: its small JSON files, and the layers imported.
#[derive(Default)]
struct Archive {
    files: HashMap<String, Vec<u8>>,
    layers: HashMap<String, (LayerImport, Compression)>,
}

fn read_head(r: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

fn sniff(head: &[u8]) -> Compression {
    if head.starts_with(&[0x1f, 0x8b]) {
        Compression::Gzip
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Compression::Zstd
    } else {
        Compression::None
    }
}

/// Reads a `docker save` archive in one pass, in whatever order its entries
/// come: layers go to the store as they pass, JSON documents stay in memory.
fn read_archive(
    store: &Store,
    input: &mut dyn Read,
    image: &str,
    events: Option<&CloneEvents>,
) -> Result<Archive, ServiceError> {
    let bad = |e: &dyn std::fmt::Display| ServiceError::DockerArchive {
        image: image.to_string(),
        reason: e.to_string(),
    };
    let mut out = Archive::default();
    let mut ar = tar::Archive::new(input);
    for entry in ar.entries().map_err(|e| bad(&e))? {
        let mut entry = entry.map_err(|e| bad(&e))?;
        if !entry.header().entry_type().is_file() {
            // Directories, and the symlinks newer daemons add for the legacy layout.
            continue;
        }
        let path = entry.path().map_err(|e| bad(&e))?;
        let path = path.to_string_lossy().trim_start_matches("./").to_string();
        let size = entry.size();
        let legacy_layer = path.ends_with("/layer.tar");
        let blob = path.starts_with("blobs/sha256/");
        if legacy_layer || blob {
            let mut head = [0u8; 4];
            let n = read_head(&mut entry, &mut head).map_err(|e| bad(&e))?;
            let head = &head[..n];
            if blob && head.first() == Some(&b'{') && size <= MAX_JSON {
                // An OCI-layout config, manifest or index.
                let mut data = head.to_vec();
                entry.read_to_end(&mut data).map_err(|e| bad(&e))?;
                out.files.insert(path, data);
                continue;
            }
            let compression = sniff(head);
            // The progress bar's key: the digest when the name gives it,
            // else the legacy layer id.
            let key = match path.strip_prefix("blobs/sha256/") {
                Some(hex) => format!("sha256:{hex}"),
                None => path.trim_end_matches("/layer.tar").to_string(),
            };
            let progress = events.map(|ev| {
                let (ev, key) = (ev.clone(), key.clone());
                Box::new(move |done| {
                    ev.try_layer(LayerProgress::running(&key, done, size));
                }) as Box<dyn Fn(u64) + Send>
            });
            let opts = ImportOptions {
                expected_size: Some(size),
                progress,
                ..Default::default()
            };
            let mut input = Read::chain(head, &mut entry);
            let imported = store.import_layer_unverified(&mut input, compression, &opts)?;
            if let Some(ev) = events {
                ev.blocking_send(crate::progress::Event::Layer(LayerProgress::finished(
                    &key, size, false,
                )));
            }
            tracing::debug!(image, path = %path, digest = %imported.digest, "docker layer imported");
            out.layers.insert(path, (imported, compression));
        } else if (path.ends_with(".json") || path == "json") && size <= MAX_JSON {
            let mut data = Vec::with_capacity(size as usize);
            entry.read_to_end(&mut data).map_err(|e| bad(&e))?;
            out.files.insert(path, data);
        }
    }
    Ok(out)
}

/// One entry of a legacy `manifest.json`.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct SaveManifest {
    config: String,
    #[serde(default)]
    layers: Vec<String>,
}

/// The path of a blob in an OCI-layout archive.
fn blob_path(digest: &Digest) -> String {
    format!("blobs/sha256/{}", digest.hex())
}

/// (config path, layer paths) of the (single) image in the archive.
fn image_paths(archive: &Archive, image: &str) -> Result<(String, Vec<String>), ServiceError> {
    let bad = |reason: String| ServiceError::DockerUnusable {
        image: image.to_string(),
        reason,
    };
    if let Some(m) = archive.files.get("manifest.json") {
        let list: Vec<SaveManifest> =
            serde_json::from_slice(m).map_err(|e| bad(format!("manifest.json: {e}")))?;
        let first = list
            .into_iter()
            .next()
            .ok_or_else(|| bad("manifest.json lists no image".into()))?;
        return Ok((first.config, first.layers));
    }
    let index = archive
        .files
        .get("index.json")
        .ok_or_else(|| bad("neither manifest.json nor index.json".into()))?;
    let index: oci::Index =
        serde_json::from_slice(index).map_err(|e| bad(format!("index.json: {e}")))?;
    let desc = index
        .manifests
        .first()
        .ok_or_else(|| bad("index.json lists no image".into()))?;
    let manifest = archive
        .files
        .get(&blob_path(&desc.digest))
        .ok_or_else(|| bad(format!("manifest {} missing", desc.digest)))?;
    let manifest: Manifest =
        serde_json::from_slice(manifest).map_err(|e| bad(format!("manifest: {e}")))?;
    let config = blob_path(&manifest.config.digest);
    let layers = manifest
        .layers
        .iter()
        .map(|l| blob_path(&l.digest))
        .collect();
    Ok((config, layers))
}

fn layer_media_type(c: Compression) -> &'static str {
    match c {
        Compression::None => oci::OCI_LAYER_TAR,
        Compression::Gzip => oci::OCI_LAYER_GZIP,
        Compression::Zstd => oci::OCI_LAYER_ZSTD,
    }
}

/// An image read from the daemon: its layers are in the store (kept from
/// the collector by `guard`), its config in memory.
pub(crate) struct Saved {
    pub config: Vec<u8>,
    pub parsed: ImageConfig,
    pub layers: Vec<LayerRef>,
    /// Bytes of the archive received.
    pub received: u64,
    pub guard: ImportGuard,
}

/// Streams the `docker save` archive of `image` (a name the daemon knows)
/// into the store, layer by layer as they pass. The caller collects what a
/// failed read added to the store.
pub(crate) async fn save(
    store: &Arc<Store>,
    client: &DockerClient,
    image: &str,
    events: &CloneEvents,
) -> Result<Saved, ServiceError> {
    let mut save = client.save(image).await?;
    let guard = store.begin_import();
    let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(16);
    let (s, name, ev) = (store.clone(), image.to_string(), events.clone());
    let reader = tokio::task::spawn_blocking(move || {
        let mut input = crate::clone::ChannelReader::new(rx);
        let archive = read_archive(&s, &mut input, &name, Some(&ev));
        (archive, guard)
    });
    let mut received: u64 = 0;
    let mut stream_error = None;
    while let Some(chunk) = save.next_chunk().await {
        match chunk {
            Ok(b) => {
                received += b.len() as u64;
                if tx.send(Ok(b)).await.is_err() {
                    // The reader stopped; its error says why.
                    break;
                }
            }
            Err(e) => {
                let _ = tx.send(Err(io::Error::other(e.to_string()))).await;
                stream_error = Some(e);
                break;
            }
        }
    }
    drop(tx);
    let (archive, guard) = reader.await?;
    let assembled = match (stream_error, archive) {
        (Some(e), _) => Err(e.into()),
        (None, Err(e)) => Err(e),
        (None, Ok(archive)) => assemble(&archive, image),
    };
    match assembled {
        Ok((config, parsed, layers)) => Ok(Saved {
            config,
            parsed,
            layers,
            received,
            guard,
        }),
        Err(e) => {
            accept::release(guard).await;
            Err(e)
        }
    }
}

/// Clones `url` from the daemon into `target` (the caller collects what a
/// failed clone added to the store).
pub(crate) async fn clone(
    store: &Arc<Store>,
    client: &DockerClient,
    url: &CloneUrl,
    target: &ImageName,
    force: bool,
    check_models: impl FnOnce(&[String]) -> Result<(), ServiceError>,
    events: &CloneEvents,
) -> Result<CloneResult, ServiceError> {
    events
        .say(format!("reading {url} from the Docker daemon"))
        .await;
    let saved = save(store, client, &reference(url), events).await?;
    let image = match accepted(saved.config, &saved.parsed, saved.layers, url)
        .and_then(|i| check_models(&i.models).map(|()| i))
    {
        Ok(i) => i,
        Err(e) => {
            accept::release(saved.guard).await;
            return Err(e);
        }
    };
    let n_layers = image.layers.len();
    let (outcome, manifest_digest) =
        accept::record(store, saved.guard, target, force, image).await?;
    let received = saved.received;
    tracing::info!(url = %url, image = %target, received, "image cloned from the Docker daemon");
    Ok(CloneResult {
        name: target.short(),
        manifest_digest,
        layers: n_layers as u64,
        downloaded_bytes: received,
        replaced: matches!(outcome, PutOutcome::Replaced),
    })
}

/// A saved image as a walt image of `url`: refused without its node models.
fn accepted(
    config: Vec<u8>,
    parsed: &ImageConfig,
    layers: Vec<LayerRef>,
    url: &CloneUrl,
) -> Result<Accepted, ServiceError> {
    let models = accept::node_models(parsed.label(LABEL_NODE_MODELS), url)?;
    Ok(Accepted {
        config,
        config_digest: None,
        manifest: accept::Manifest::Written,
        layers,
        models,
    })
}

/// The image the archive of `image` holds: its config (as read and
/// parsed) and its layers in order (all in the store by now).
fn assemble(
    archive: &Archive,
    image: &str,
) -> Result<(Vec<u8>, ImageConfig, Vec<LayerRef>), ServiceError> {
    let bad = |reason: String| ServiceError::DockerUnusable {
        image: image.to_string(),
        reason,
    };
    let (config_path, layer_paths) = image_paths(archive, image)?;
    let config_bytes = archive
        .files
        .get(&config_path)
        .ok_or_else(|| bad(format!("its configuration '{config_path}' is missing")))?
        .clone();
    let config: ImageConfig = serde_json::from_slice(&config_bytes)
        .map_err(|e| bad(format!("the image configuration is not valid: {e}")))?;
    let layers: Vec<&(LayerImport, Compression)> = layer_paths
        .iter()
        .map(|p| {
            archive
                .layers
                .get(p)
                .ok_or_else(|| bad(format!("layer '{p}' is missing")))
        })
        .collect::<Result<_, _>>()?;
    let diff_ids: Vec<&Digest> = layers.iter().map(|(l, _)| &l.diff_id).collect();
    if diff_ids != config.rootfs.diff_ids.iter().collect::<Vec<_>>() {
        let list = |d: &[&Digest]| d.iter().map(|d| d.as_str()).collect::<Vec<_>>().join(", ");
        return Err(bad(format!(
            "its layers ({}) do not match its configuration ({})",
            list(&diff_ids),
            list(&config.rootfs.diff_ids.iter().collect::<Vec<_>>())
        )));
    }
    let layers = layers
        .iter()
        .map(|(l, c)| LayerRef {
            diff_id: l.diff_id.clone(),
            blob_digest: l.digest.clone(),
            blob_size: l.size,
            media_type: layer_media_type(*c).to_string(),
        })
        .collect();
    Ok((config_bytes, config, layers))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::Sha256;

    fn digest(b: &[u8]) -> Digest {
        Digest::from_sha256(<Sha256 as sha2::Digest>::digest(b).into())
    }

    fn layer_tar(marker: &str) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(marker.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, "marker", marker.as_bytes()).unwrap();
        b.into_inner().unwrap()
    }

    fn gzip(b: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut e, b).unwrap();
        e.finish().unwrap()
    }

    fn archive(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_entry_type(tar::EntryType::Regular);
            b.append_data(&mut h, path, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn config(diff_ids: &[Digest], labelled: bool) -> Vec<u8> {
        let labels = if labelled {
            serde_json::json!({ LABEL_NODE_MODELS: "pc-x86-64" })
        } else {
            serde_json::json!({})
        };
        serde_json::to_vec(&serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "config": { "Labels": labels },
            "rootfs": { "type": "layers", "diff_ids": diff_ids },
        }))
        .unwrap()
    }

    fn url() -> CloneUrl {
        CloneUrl::parse("docker:u/n:t").unwrap()
    }

    #[test]
    fn legacy_layout_any_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (l1, l2) = (layer_tar("one"), layer_tar("two"));
        let cfg = config(&[digest(&l1), digest(&l2)], true);
        let manifest = serde_json::to_vec(&serde_json::json!([{
            "Config": "cfg.json",
            "RepoTags": ["u/n:t"],
            "Layers": ["a/layer.tar", "b/layer.tar"],
        }]))
        .unwrap();
        // manifest.json first, layers out of order, config last.
        let tar = archive(&[
            ("manifest.json", &manifest),
            ("b/layer.tar", &l2),
            ("b/json", b"{}"),
            ("a/layer.tar", &l1),
            ("cfg.json", &cfg),
        ]);
        let a = read_archive(&store, &mut &tar[..], "u/n:t", None).unwrap();
        let (config, parsed, layers) = assemble(&a, "u/n:t").unwrap();
        let image = accepted(config, &parsed, layers, &url()).unwrap();
        assert_eq!(image.config, cfg);
        assert_eq!(image.models, ["pc-x86-64"]);
        assert_eq!(image.layers[0].blob_digest, digest(&l1));
        assert_eq!(image.layers[1].diff_id, digest(&l2));
        assert_eq!(image.layers[1].media_type, oci::OCI_LAYER_TAR);
        assert!(store.has_blob(&digest(&l1)) && store.has_layer(&digest(&l2)));
    }

    #[test]
    fn oci_layout_gzip_layer() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let l = layer_tar("oci");
        let gz = gzip(&l);
        let cfg = config(&[digest(&l)], true);
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": oci::OCI_MANIFEST,
            "config": {"mediaType": oci::OCI_CONFIG, "digest": digest(&cfg), "size": cfg.len()},
            "layers": [{"mediaType": oci::OCI_LAYER_GZIP, "digest": digest(&gz), "size": gz.len()}],
        }))
        .unwrap();
        let index = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{"mediaType": oci::OCI_MANIFEST, "digest": digest(&manifest), "size": manifest.len()}],
        }))
        .unwrap();
        let p = |b: &[u8]| format!("blobs/sha256/{}", digest(b).hex());
        let tar = archive(&[
            (&p(&gz), &gz),
            ("index.json", &index),
            (&p(&manifest), &manifest),
            (&p(&cfg), &cfg),
        ]);
        let a = read_archive(&store, &mut &tar[..], "u/n:t", None).unwrap();
        let (_, _, layers) = assemble(&a, "u/n:t").unwrap();
        assert_eq!(layers[0].blob_digest, digest(&gz));
        assert_eq!(layers[0].diff_id, digest(&l));
        assert_eq!(layers[0].media_type, oci::OCI_LAYER_GZIP);

        // Without the label: refused.
        let cfg = config(&[digest(&l)], false);
        let manifest = serde_json::to_vec(&serde_json::json!([{
            "Config": "c.json", "Layers": ["x/layer.tar"],
        }]))
        .unwrap();
        let tar = archive(&[
            ("x/layer.tar", &l),
            ("c.json", &cfg),
            ("manifest.json", &manifest),
        ]);
        let a = read_archive(&store, &mut &tar[..], "u/n:t", None).unwrap();
        let (config, parsed, layers) = assemble(&a, "u/n:t").unwrap();
        let e = accepted(config, &parsed, layers, &url()).err().unwrap();
        assert!(e.to_string().contains("not a walt image"), "{e}");
    }
}
