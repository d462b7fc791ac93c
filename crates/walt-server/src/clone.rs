//! `walt image clone`: from another user's image (`walt:`) or from a
//! configured docker-registry-v2 registry or the Docker hub (`hub:`),
//! streaming layers into the store.

use std::io::{self, Read};
use std::sync::Arc;

use bytes::{Buf, Bytes};
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use walt_core::config::Registry;
use walt_core::oci::{self, Compression, ImageConfig, Manifest, ManifestDoc};
use walt_core::{CloneUrl, Digest, ImageName, LABEL_NODE_MODELS, Location};
use walt_registry::{Credentials, RegistryClient};
use walt_store::{ImportOptions, LayerRef, PutOutcome, Store};

use crate::State;
use crate::accept::{self, Accepted};
use crate::error::ServiceError;
use crate::images::blocking;
use crate::progress::{Event, LayerProgress, Reporter};

/// Layers downloaded at once.
const LAYER_CONCURRENCY: usize = 4;
/// Largest image config accepted.
const MAX_CONFIG_SIZE: u64 = 16 << 20;

/// What the caller asks for.
#[derive(Debug, Clone, Default)]
pub struct CloneRequest {
    /// `<location>:<user>/<name>[:<tag>]`.
    pub url: String,
    /// Name in the caller's working set; empty: derived from the URL.
    pub name: String,
    /// Overwrite an image of that name.
    pub force: bool,
    /// For the registry the URL points at.
    pub credentials: Option<Credentials>,
}

/// What a clone did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloneResult {
    /// The new image's short name.
    pub name: String,
    pub manifest_digest: Digest,
    pub layers: u64,
    pub downloaded_bytes: u64,
    /// An image of that name was replaced (`--force`).
    pub replaced: bool,
}

/// The events of a clone.
pub type Events = Reporter<Event<CloneResult>>;

enum Source {
    Walt(ImageName),
    Registry(RegistryClient),
    Docker(walt_registry::DockerClient),
}

/// A validated clone request.
pub struct Plan {
    _lock: crate::session::LockGuard,
    url: CloneUrl,
    target: ImageName,
    notice: Option<String>,
    force: bool,
    source: Source,
}

/// Checks the request and resolves its source; fails before anything is fetched.
pub async fn plan(
    state: &Arc<State>,
    user: &str,
    req: &CloneRequest,
) -> Result<Plan, ServiceError> {
    let url = CloneUrl::parse(req.url.trim())?;
    let (target, notice) = if req.name.trim().is_empty() {
        let (name, changed) = ImageName::normalized(user, url.image_name(), &url.tag)?;
        let notice = changed.then(|| {
            format!(
                "'{}:{}' is not a valid walt image name; normalised to '{}'",
                url.image_name(),
                url.tag,
                name.short()
            )
        });
        (name, notice)
    } else {
        (ImageName::parse_user(user, &req.name)?, None)
    };
    let source = match &url.location {
        Location::Walt => {
            if url.user == user {
                return Err(ServiceError::AlreadyYours {
                    url: url.to_string(),
                });
            }
            let src = ImageName {
                owner: url.user.clone(),
                name: url.repository.clone(),
                tag: url.tag.clone(),
            };
            let store = state.store.clone();
            let exists = {
                let src = src.clone();
                blocking(move || Ok(store.get_image(&src)?.is_some())).await?
            };
            if !exists {
                return Err(ServiceError::NotOnThisServer {
                    url: url.to_string(),
                });
            }
            Source::Walt(src)
        }
        Location::Hub => {
            let config = state.config();
            let hub = crate::hub::configured(&config)?;
            Source::Registry(RegistryClient::for_hub(hub, req.credentials.clone())?)
        }
        Location::Docker => Source::Docker(crate::docker::check(&state.config(), &url).await?),
        Location::Registry(label) => {
            let config = state.config();
            match config.registry(label) {
                Some(Registry::V2(reg)) => {
                    Source::Registry(RegistryClient::for_v2(reg, req.credentials.clone())?)
                }
                _ => {
                    let known: Vec<&str> = ["walt", "docker"]
                        .into_iter()
                        .chain(config.registries.iter().map(|r| r.label()))
                        .collect();
                    return Err(ServiceError::UnknownLocation {
                        label: label.clone(),
                        url: url.to_string(),
                        known: known.join(", "),
                    });
                }
            }
        }
    };
    // Held until the clone ends: no session opens the image meanwhile.
    let lock = state
        .locks
        .acquire(&target, "walt image clone".to_string())?;
    if !req.force {
        let store = state.store.clone();
        let t = target.clone();
        if blocking(move || Ok(store.get_image(&t)?.is_some())).await? {
            return Err(ServiceError::WouldOverwrite {
                image: target.short(),
                url: url.to_string(),
            });
        }
    }
    Ok(Plan {
        _lock: lock,
        url,
        target,
        notice,
        force: req.force,
        source,
    })
}

/// Performs a planned clone, sending progress on `events`.
pub async fn run(
    state: Arc<State>,
    plan: Plan,
    events: Events,
) -> Result<CloneResult, ServiceError> {
    if let Some(n) = &plan.notice {
        events.say(n.clone()).await;
    }
    match &plan.source {
        Source::Docker(client) => {
            let (url, target) = (&plan.url, &plan.target);
            accept::or_collect(
                &state.store,
                crate::docker::clone(&state.store, client, url, target, plan.force, &events),
            )
            .await
        }
        Source::Walt(src) => {
            let store = state.store.clone();
            let (src, target, force) = (src.clone(), plan.target.clone(), plan.force);
            let (outcome, rec) = blocking(move || {
                let outcome = store.copy_image(&src, &target, force)?;
                // Removed again in the meantime: as if the copy never was.
                let rec = store
                    .get_image(&target)?
                    .ok_or_else(|| walt_store::StoreError::ImageNotFound(target.to_string()))?;
                Ok((outcome, rec))
            })
            .await?;
            tracing::info!(from = %plan.url, to = %plan.target, "image copied");
            Ok(CloneResult {
                name: plan.target.short(),
                manifest_digest: rec.manifest_digest,
                layers: 0,
                downloaded_bytes: 0,
                replaced: matches!(outcome, PutOutcome::Replaced),
            })
        }
        Source::Registry(client) => {
            let store = state.store.clone();
            let result = accept::or_collect(&store, pull(&store, client, &plan, &events)).await;
            if result.is_ok() {
                // Later publishes to this registry may mount these blobs.
                let (s, t) = (store.clone(), plan.target.clone());
                if let Ok(Some(rec)) = blocking(move || Ok(s.get_image(&t)?)).await {
                    state.blob_sources.record(
                        client.label(),
                        &plan.url.path(),
                        rec.layers
                            .iter()
                            .map(|l| &l.blob_digest)
                            .chain([&rec.config_digest]),
                    );
                }
            }
            result
        }
    }
}

/// Fetches the manifest of `url`, resolving an index to this server's
/// platform: (manifest, its bytes, digest, media type).
pub(crate) async fn resolve_manifest(
    client: &RegistryClient,
    url: &CloneUrl,
    events: &Events,
) -> Result<(Manifest, Vec<u8>, Digest, String), ServiceError> {
    let fetched = client.get_manifest(&url.path(), &url.tag).await?;
    let r = resolve_fetched(client, url, fetched).await?;
    if r.from_index {
        let (arch, _) = oci::oci_arch(std::env::consts::ARCH);
        events
            .say(format!(
                "multi-platform image: using the linux/{arch} variant"
            ))
            .await;
    }
    Ok((r.manifest, r.bytes, r.digest, r.media_type))
}

/// An image manifest, after resolving an index.
pub(crate) struct Resolved {
    pub manifest: Manifest,
    pub bytes: Vec<u8>,
    pub digest: Digest,
    pub media_type: String,
    /// It came from an index (one more request was made).
    pub from_index: bool,
}

/// Parses a fetched manifest of `url`; an index is resolved to this
/// server's platform (one more request).
pub(crate) async fn resolve_fetched(
    client: &RegistryClient,
    url: &CloneUrl,
    fetched: walt_registry::FetchedManifest,
) -> Result<Resolved, ServiceError> {
    let bad = |e: oci::DocError| ServiceError::InvalidManifest {
        registry: client.label().to_string(),
        url: url.to_string(),
        reason: e.to_string(),
    };
    let mut media_type = fetched.media_type.clone();
    let mut from_index = false;
    let (manifest, bytes, digest) =
        match ManifestDoc::parse(&fetched.bytes, media_type.as_deref()).map_err(bad)? {
            ManifestDoc::Image(m) => (*m, fetched.bytes, fetched.digest),
            ManifestDoc::Index(index) => {
                let (arch, variant) = oci::oci_arch(std::env::consts::ARCH);
                let Some(desc) = oci::pick_platform(&index, arch, variant) else {
                    let platforms: Vec<String> = index
                        .manifests
                        .iter()
                        .filter_map(|d| d.platform.as_ref())
                        .map(|p| format!("{}/{}", p.os, p.architecture))
                        .collect();
                    return Err(ServiceError::NoPlatform {
                        url: url.to_string(),
                        arch: arch.to_string(),
                        available: platforms.join(", "),
                    });
                };
                from_index = true;
                let inner = client
                    .get_manifest(&url.path(), desc.digest.as_str())
                    .await?;
                media_type = inner.media_type.clone().or(Some(desc.media_type.clone()));
                match ManifestDoc::parse(&inner.bytes, media_type.as_deref()).map_err(bad)? {
                    ManifestDoc::Image(m) => (*m, inner.bytes, inner.digest),
                    ManifestDoc::Index(_) => {
                        return Err(ServiceError::InvalidManifest {
                            registry: client.label().to_string(),
                            url: url.to_string(),
                            reason: "nested image indexes are not supported".into(),
                        });
                    }
                }
            }
        };
    let media_type = manifest
        .media_type
        .clone()
        .or(media_type)
        .unwrap_or_else(|| oci::OCI_MANIFEST.to_string());
    Ok(Resolved {
        manifest,
        bytes,
        digest,
        media_type,
        from_index,
    })
}

async fn pull(
    store: &Arc<Store>,
    client: &RegistryClient,
    plan: &Plan,
    events: &Events,
) -> Result<CloneResult, ServiceError> {
    let url = &plan.url;
    let path = url.path();
    let (manifest, manifest_bytes, manifest_digest, manifest_media_type) =
        resolve_manifest(client, url, events).await?;
    let config_bytes = client
        .get_blob_bytes(&path, &manifest.config.digest, MAX_CONFIG_SIZE)
        .await?;
    let invalid = |reason: String| ServiceError::InvalidImage {
        url: url.to_string(),
        reason,
    };
    let config: ImageConfig = serde_json::from_slice(&config_bytes)
        .map_err(|e| invalid(format!("the image configuration is not valid: {e}")))?;
    let models = accept::node_models(config.label(LABEL_NODE_MODELS), url)?;
    if config.rootfs.diff_ids.len() != manifest.layers.len() {
        return Err(invalid(format!(
            "the manifest lists {} layers but the configuration {}",
            manifest.layers.len(),
            config.rootfs.diff_ids.len()
        )));
    }
    let mut layers = Vec::with_capacity(manifest.layers.len());
    for (desc, diff_id) in manifest.layers.iter().zip(&config.rootfs.diff_ids) {
        let compression = Compression::from_media_type(&desc.media_type).ok_or_else(|| {
            invalid(format!(
                "layer {} has the unsupported media type '{}'",
                desc.digest, desc.media_type
            ))
        })?;
        layers.push(LayerJob {
            digest: desc.digest.clone(),
            size: desc.size,
            diff_id: diff_id.clone(),
            compression,
            media_type: desc.media_type.clone(),
        });
    }

    // Announce every layer, so the client can draw its bars at once.
    for l in &layers {
        events
            .layer(LayerProgress::running(l.digest.as_str(), 0, l.size))
            .await;
    }
    // The blobs to download must fit above the free-space reserve (what
    // they unpack to is checked as it is written).
    let to_download: u64 = layers
        .iter()
        .filter(|l| !store.has_blob(&l.digest))
        .map(|l| l.size)
        .sum();
    {
        let s = store.clone();
        blocking(move || Ok(s.check_space(to_download)?)).await?;
    }
    // Held until the image row is committed, so that no collection runs
    // between the layers landing and the row referencing them.
    let guard = store.begin_import();
    let downloaded = match fetch_layers(store, client, &path, &layers, events).await {
        Ok(n) => n,
        Err(e) => {
            accept::release(guard).await;
            return Err(e);
        }
    };

    let image = Accepted {
        config: config_bytes,
        config_digest: Some(manifest.config.digest.clone()),
        manifest: accept::Manifest::Fetched {
            bytes: manifest_bytes,
            digest: manifest_digest,
            media_type: manifest_media_type,
        },
        layers: layers
            .iter()
            .map(|l| LayerRef {
                diff_id: l.diff_id.clone(),
                blob_digest: l.digest.clone(),
                blob_size: l.size,
                media_type: l.media_type.clone(),
            })
            .collect(),
        models,
    };
    let (outcome, manifest_digest) =
        accept::record(store, guard, &plan.target, plan.force, image).await?;
    tracing::info!(url = %url, image = %plan.target, downloaded, "image cloned");
    Ok(CloneResult {
        name: plan.target.short(),
        manifest_digest,
        layers: layers.len() as u64,
        downloaded_bytes: downloaded,
        replaced: matches!(outcome, PutOutcome::Replaced),
    })
}

#[derive(Clone)]
struct LayerJob {
    digest: Digest,
    size: u64,
    diff_id: Digest,
    compression: Compression,
    media_type: String,
}

/// Fetches every missing layer, a few at a time. On the first failure the
/// others are stopped, and this returns only once all of them have cleaned up.
async fn fetch_layers(
    store: &Arc<Store>,
    client: &RegistryClient,
    path: &str,
    layers: &[LayerJob],
    events: &Events,
) -> Result<u64, ServiceError> {
    let cancel = CancellationToken::new();
    let _cancel_on_drop = cancel.clone().drop_guard();
    let limit = Arc::new(tokio::sync::Semaphore::new(LAYER_CONCURRENCY));
    let mut set = JoinSet::new();
    // Largest first: it is the critical path. The others run in the
    // background (lower CPU priority), filling the gaps it leaves.
    let mut order: Vec<&LayerJob> = layers.iter().collect();
    order.sort_by_key(|j| std::cmp::Reverse(j.size));
    for (i, job) in order.into_iter().enumerate() {
        let (job, background) = (job.clone(), i > 0);
        let (store, client, path, events, cancel, limit) = (
            store.clone(),
            client.clone(),
            path.to_string(),
            events.clone(),
            cancel.clone(),
            limit.clone(),
        );
        set.spawn(async move {
            let _permit = tokio::select! {
                p = limit.acquire_owned() => p.map_err(|_| ServiceError::ShuttingDown)?,
                _ = cancel.cancelled() => return Ok((0, 0)),
            };
            fetch_layer(&store, &client, &path, &job, background, &events, &cancel).await
        });
    }
    let mut total = 0;
    // What the layers unpacked here add up to, bounded as an image.
    let image_limit = store.limits().image_unpacked_size;
    let mut unpacked = 0u64;
    let mut first_error = None;
    while let Some(joined) = set.join_next().await {
        match joined.map_err(ServiceError::from).and_then(|r| r) {
            Ok((n, bytes)) => {
                total += n;
                unpacked = unpacked.saturating_add(bytes);
                if unpacked > image_limit && first_error.is_none() {
                    cancel.cancel();
                    first_error = Some(ServiceError::Store(walt_store::StoreError::TooLarge {
                        what: "the image".into(),
                        limit: walt_core::config::format_size(image_limit),
                        key: "image-unpacked-size",
                    }));
                }
            }
            Err(e) => {
                cancel.cancel();
                first_error.get_or_insert(e);
            }
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(total),
    }
}

/// Brings one layer into the store; returns the bytes downloaded and the
/// bytes of file data unpacked.
async fn fetch_layer(
    store: &Arc<Store>,
    client: &RegistryClient,
    path: &str,
    job: &LayerJob,
    background: bool,
    events: &Events,
    cancel: &CancellationToken,
) -> Result<(u64, u64), ServiceError> {
    let has_blob = store.has_blob(&job.digest);
    let has_layer = store.has_layer(&job.diff_id);
    if has_blob && has_layer {
        events
            .layer(LayerProgress::finished(job.digest.as_str(), job.size, true))
            .await;
        return Ok((0, 0));
    }
    if has_blob {
        let (s, j) = (store.clone(), job.clone());
        let imported = blocking(move || {
            let _guard = s.begin_import();
            Ok(s.unpack_stored_blob(&j.digest, j.compression, &j.diff_id)?)
        })
        .await?;
        events
            .layer(LayerProgress::finished(job.digest.as_str(), job.size, true))
            .await;
        return Ok((0, imported.unpacked_bytes));
    }

    let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(16);
    let ptx = events.clone();
    let (digest, total) = (job.digest.clone(), job.size);
    let opts = ImportOptions {
        store_blob: true,
        unpack: !has_layer,
        expected_size: Some(job.size),
        expected_diff_id: Some(job.diff_id.clone()),
        progress: Some(Box::new(move |done| {
            ptx.try_layer(LayerProgress::running(digest.as_str(), done, total));
        })),
        background,
        // One layer cannot be larger than the image either.
        unpacked_limit: Some((store.limits().image_unpacked_size, "image-unpacked-size")),
    };
    let (s, j) = (store.clone(), job.clone());
    let import = tokio::task::spawn_blocking(move || {
        let _guard = s.begin_import();
        let mut reader = ChannelReader::new(rx);
        s.import_layer(&mut reader, j.compression, &j.digest, &opts)
    });
    let pumped = tokio::select! {
        r = pump_blob(client, path, job, tx) => r,
        _ = cancel.cancelled() => Err(ServiceError::Internal("cancelled".into())),
    };
    // The importer sees the end of its input once `tx` is gone; wait for it
    // so that its staging files are removed before we report anything.
    let imported = import.await?;
    pumped?;
    let imported = imported?;
    events
        .layer(LayerProgress::finished(
            job.digest.as_str(),
            job.size,
            false,
        ))
        .await;
    Ok((job.size, imported.unpacked_bytes))
}

/// Streams a blob into `tx`; the registry client resumes it where the
/// connection breaks.
async fn pump_blob(
    client: &RegistryClient,
    path: &str,
    job: &LayerJob,
    tx: mpsc::Sender<io::Result<Bytes>>,
) -> Result<(), ServiceError> {
    let mut blob = client.blob_stream(path, &job.digest, job.size);
    while let Some(chunk) = blob.next().await {
        if tx.send(Ok(chunk?)).await.is_err() {
            // The importer stopped; its error tells why.
            return Ok(());
        }
    }
    Ok(())
}

/// A blocking reader over the chunks an async task sends.
pub(crate) struct ChannelReader {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    current: Bytes,
}

impl ChannelReader {
    pub(crate) fn new(rx: mpsc::Receiver<io::Result<Bytes>>) -> Self {
        Self {
            rx,
            current: Bytes::new(),
        }
    }
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(b)) => self.current = b,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        self.current.advance(n);
        Ok(n)
    }
}
