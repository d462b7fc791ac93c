//! `walt image clone`: from another user's image (`walt:`) or from a
//! configured docker-registry-v2 registry or the Docker hub (`hub:`),
//! streaming layers into the store.

use std::io::{self, Read};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes};
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use walt_core::config::Registry;
use walt_core::oci::{self, Compression, ImageConfig, Manifest, ManifestDoc};
use walt_core::{CloneUrl, ImageName, LABEL_NODE_MODELS, Location, models::parse_models};
use walt_proto::v1::{self as pb, clone_event::Event};
use walt_registry::{Credentials, RegistryClient};
use walt_store::{ImportOptions, LayerRef, NewImage, PutOutcome, Store};

use crate::State;
use crate::error::ServiceError;
use crate::images::blocking;

/// Layers downloaded at once.
const LAYER_CONCURRENCY: usize = 4;
/// Largest image config accepted.
const MAX_CONFIG_SIZE: u64 = 16 << 20;
/// Times a blob download resumes after its connection broke.
const RESUME_ATTEMPTS: u32 = 5;

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

type Events = mpsc::Sender<Result<pb::CloneEvent, tonic::Status>>;

async fn say(events: &Events, text: String) {
    let _ = events
        .send(Ok(pb::CloneEvent {
            event: Some(Event::Message(text)),
        }))
        .await;
}

/// Checks the request and resolves its source; fails before anything is fetched.
pub async fn plan(
    state: &Arc<State>,
    user: &str,
    req: &pb::CloneRequest,
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
                return Err(ServiceError::FailedPrecondition(format!(
                    "{url} is already in your working set (use walt image duplicate to copy it)"
                )));
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
                return Err(ServiceError::NotFound(format!(
                    "image {url} not found on this server"
                )));
            }
            Source::Walt(src)
        }
        Location::Hub => {
            let config = state.config();
            let hub = crate::hub::configured(&config)?;
            let creds = req
                .credentials
                .as_ref()
                .filter(|c| !c.username.is_empty() || !c.password.is_empty())
                .map(|c| Credentials {
                    username: c.username.clone(),
                    password: c.password.clone(),
                });
            Source::Registry(RegistryClient::for_hub(hub, creds)?)
        }
        Location::Docker => Source::Docker(crate::docker::check(&state.config(), &url).await?),
        Location::Registry(label) => {
            let config = state.config();
            match config.registry(label) {
                Some(Registry::V2(reg)) => {
                    let creds = req.credentials.as_ref().map(|c| Credentials {
                        username: c.username.clone(),
                        password: c.password.clone(),
                    });
                    Source::Registry(RegistryClient::for_v2(reg, creds)?)
                }
                _ => {
                    let known: Vec<&str> = ["walt", "docker"]
                        .into_iter()
                        .chain(config.registries.iter().map(|r| r.label()))
                        .collect();
                    return Err(ServiceError::NotFound(format!(
                        "unknown registry '{label}' in {url} (known locations: {})",
                        known.join(", ")
                    )));
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
            return Err(ServiceError::AlreadyExists(format!(
                "image '{}' already exists in your working set; rerun with --force to overwrite it, or give another name: walt image clone {url} <name>",
                target.short()
            )));
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
) -> Result<pb::CloneResult, ServiceError> {
    if let Some(n) = &plan.notice {
        say(&events, n.clone()).await;
    }
    match &plan.source {
        Source::Docker(client) => {
            let (url, target) = (&plan.url, &plan.target);
            crate::docker::clone(&state.store, client, url, target, plan.force, &events).await
        }
        Source::Walt(src) => {
            let store = state.store.clone();
            let (src, target, force) = (src.clone(), plan.target.clone(), plan.force);
            let (outcome, rec) = blocking(move || {
                let outcome = store.copy_image(&src, &target, force)?;
                let rec = store.get_image(&target)?;
                Ok((outcome, rec))
            })
            .await?;
            tracing::info!(from = %plan.url, to = %plan.target, "image copied");
            Ok(pb::CloneResult {
                name: plan.target.short(),
                manifest_digest: rec.map(|r| r.manifest_digest).unwrap_or_default(),
                layers: 0,
                downloaded_bytes: 0,
                replaced: matches!(outcome, PutOutcome::Replaced),
            })
        }
        Source::Registry(client) => {
            let store = state.store.clone();
            let result = pull(&store, client, &plan, &events).await;
            if result.is_ok() {
                // Later publishes to this registry may mount these blobs.
                let (s, t) = (store.clone(), plan.target.clone());
                if let Ok(Some(rec)) = blocking(move || Ok(s.get_image(&t)?)).await {
                    state.blob_sources.record(
                        client.label(),
                        &plan.url.path(),
                        rec.layers
                            .iter()
                            .map(|l| l.blob_digest.as_str())
                            .chain([rec.config_digest.as_str()]),
                    );
                }
            }
            if result.is_err() {
                // Leave the store as it was: drop what this clone added.
                let s = store.clone();
                if let Err(e) = blocking(move || Ok(s.gc()?)).await {
                    tracing::warn!(error = %e, "cleanup after a failed clone failed");
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
) -> Result<(Manifest, Vec<u8>, String, String), ServiceError> {
    let fetched = client.get_manifest(&url.path(), &url.tag).await?;
    let r = resolve_fetched(client, url, fetched).await?;
    if r.from_index {
        let (arch, _) = oci::oci_arch(std::env::consts::ARCH);
        say(
            events,
            format!("multi-platform image: using the linux/{arch} variant"),
        )
        .await;
    }
    Ok((r.manifest, r.bytes, r.digest, r.media_type))
}

/// An image manifest, after resolving an index.
pub(crate) struct Resolved {
    pub manifest: Manifest,
    pub bytes: Vec<u8>,
    pub digest: String,
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
    let bad = |e: oci::DocError| {
        ServiceError::FailedPrecondition(format!("registry '{}': {url}: {e}", client.label()))
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
                    return Err(ServiceError::NotFound(format!(
                        "{url} has no image for linux/{arch} (it has: {})",
                        platforms.join(", ")
                    )));
                };
                from_index = true;
                let inner = client.get_manifest(&url.path(), &desc.digest).await?;
                media_type = inner.media_type.clone().or(Some(desc.media_type.clone()));
                match ManifestDoc::parse(&inner.bytes, media_type.as_deref()).map_err(bad)? {
                    ManifestDoc::Image(m) => (*m, inner.bytes, inner.digest),
                    ManifestDoc::Index(_) => {
                        return Err(ServiceError::FailedPrecondition(format!(
                            "registry '{}': {url}: nested image indexes are not supported",
                            client.label()
                        )));
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
) -> Result<pb::CloneResult, ServiceError> {
    let url = &plan.url;
    let path = url.path();
    let (manifest, manifest_bytes, manifest_digest, manifest_media_type) =
        resolve_manifest(client, url, events).await?;
    let config_bytes = client
        .get_blob_bytes(&path, &manifest.config.digest, MAX_CONFIG_SIZE)
        .await?;
    let config: ImageConfig = serde_json::from_slice(&config_bytes).map_err(|e| {
        ServiceError::FailedPrecondition(format!(
            "{url}: the image configuration is not valid: {e}"
        ))
    })?;
    let Some(models) = config
        .label(LABEL_NODE_MODELS)
        .map(parse_models)
        .filter(|m| !m.is_empty())
    else {
        return Err(ServiceError::FailedPrecondition(format!(
            "{url} is not a walt image: it has no {LABEL_NODE_MODELS} label"
        )));
    };
    if config.rootfs.diff_ids.len() != manifest.layers.len() {
        return Err(ServiceError::FailedPrecondition(format!(
            "{url}: the manifest lists {} layers but the configuration {}",
            manifest.layers.len(),
            config.rootfs.diff_ids.len()
        )));
    }
    let mut layers = Vec::with_capacity(manifest.layers.len());
    for (desc, diff_id) in manifest.layers.iter().zip(&config.rootfs.diff_ids) {
        let compression = Compression::from_media_type(&desc.media_type).ok_or_else(|| {
            ServiceError::FailedPrecondition(format!(
                "{url}: layer {} has the unsupported media type '{}'",
                desc.digest, desc.media_type
            ))
        })?;
        if oci::digest_hex(&desc.digest).is_none() || oci::digest_hex(diff_id).is_none() {
            return Err(ServiceError::FailedPrecondition(format!(
                "{url}: layer digest '{}' is not a sha256 digest",
                desc.digest
            )));
        }
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
        let _ = events
            .send(Ok(progress(&l.digest, 0, l.size, false, false)))
            .await;
    }
    // Held until the image row is committed, so that no collection runs
    // between the layers landing and the row referencing them. Dropped on a
    // blocking thread: the last guard runs any deferred collection.
    let guard = store.begin_import();
    let downloaded = match fetch_layers(store, client, &path, &layers, events).await {
        Ok(n) => n,
        Err(e) => {
            let _ = tokio::task::spawn_blocking(move || drop(guard)).await;
            return Err(e);
        }
    };

    let store2 = store.clone();
    let new = NewImage {
        name: plan.target.clone(),
        manifest_digest: manifest_digest.clone(),
        manifest_media_type,
        config_digest: manifest.config.digest.clone(),
        layers: layers
            .iter()
            .map(|l| LayerRef {
                diff_id: l.diff_id.clone(),
                blob_digest: l.digest.clone(),
                blob_size: l.size,
                media_type: l.media_type.clone(),
            })
            .collect(),
        node_models: models,
        created: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0),
    };
    let force = plan.force;
    let config_digest = manifest.config.digest.clone();
    let outcome = blocking(move || {
        let _guard = guard;
        store2.put_blob(Some(&config_digest), &config_bytes)?;
        store2.put_blob(Some(&new.manifest_digest), &manifest_bytes)?;
        Ok(store2.put_image(&new, force)?)
    })
    .await?;
    tracing::info!(url = %url, image = %plan.target, downloaded, "image cloned");
    Ok(pb::CloneResult {
        name: plan.target.short(),
        manifest_digest,
        layers: layers.len() as u64,
        downloaded_bytes: downloaded,
        replaced: matches!(outcome, PutOutcome::Replaced),
    })
}

#[derive(Clone)]
struct LayerJob {
    digest: String,
    size: u64,
    diff_id: String,
    compression: Compression,
    media_type: String,
}

fn progress(digest: &str, done: u64, total: u64, complete: bool, cached: bool) -> pb::CloneEvent {
    pb::CloneEvent {
        event: Some(Event::Progress(pb::LayerProgress {
            digest: digest.to_string(),
            done,
            total,
            complete,
            cached,
        })),
    }
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
                _ = cancel.cancelled() => return Ok(0),
            };
            fetch_layer(&store, &client, &path, &job, background, &events, &cancel).await
        });
    }
    let mut total = 0;
    let mut first_error = None;
    while let Some(joined) = set.join_next().await {
        match joined.map_err(ServiceError::from).and_then(|r| r) {
            Ok(n) => total += n,
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

/// Brings one layer into the store; returns the bytes downloaded.
async fn fetch_layer(
    store: &Arc<Store>,
    client: &RegistryClient,
    path: &str,
    job: &LayerJob,
    background: bool,
    events: &Events,
    cancel: &CancellationToken,
) -> Result<u64, ServiceError> {
    let has_blob = store.has_blob(&job.digest);
    let has_layer = store.has_layer(&job.diff_id);
    if has_blob && has_layer {
        let _ = events
            .send(Ok(progress(&job.digest, job.size, job.size, true, true)))
            .await;
        return Ok(0);
    }
    if has_blob {
        let (s, j) = (store.clone(), job.clone());
        blocking(move || {
            let _guard = s.begin_import();
            Ok(s.unpack_stored_blob(&j.digest, j.compression, &j.diff_id)?)
        })
        .await?;
        let _ = events
            .send(Ok(progress(&job.digest, job.size, job.size, true, true)))
            .await;
        return Ok(0);
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
            let _ = ptx.try_send(Ok(progress(&digest, done, total, false, false)));
        })),
        background,
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
    imported?;
    let _ = events
        .send(Ok(progress(&job.digest, job.size, job.size, true, false)))
        .await;
    Ok(job.size)
}

/// Streams a blob into `tx`, resuming with a range request when the
/// connection breaks or the body is cut short.
async fn pump_blob(
    client: &RegistryClient,
    path: &str,
    job: &LayerJob,
    tx: mpsc::Sender<io::Result<Bytes>>,
) -> Result<(), ServiceError> {
    let mut sent: u64 = 0;
    let mut attempt = 0;
    loop {
        let mut resp = client.get_blob(path, &job.digest, sent).await?;
        // A registry that ignores ranges restarts at 0: skip what we have.
        let mut skip = sent.saturating_sub(resp.offset);
        let mut failure = None;
        while let Some(chunk) = resp.stream.next().await {
            match chunk {
                Ok(mut b) => {
                    if skip > 0 {
                        let n = skip.min(b.len() as u64);
                        b.advance(n as usize);
                        skip -= n;
                        if b.is_empty() {
                            continue;
                        }
                    }
                    sent += b.len() as u64;
                    if tx.send(Ok(b)).await.is_err() {
                        // The importer stopped; its error tells why.
                        return Ok(());
                    }
                    if sent > job.size {
                        // Longer than announced: the importer's size check reports it.
                        return Ok(());
                    }
                }
                Err(e) if e.is_transient() => {
                    failure = Some(e.to_string());
                    break;
                }
                Err(e) => return Err(e.into()),
            }
        }
        if failure.is_none() && sent >= job.size {
            return Ok(());
        }
        attempt += 1;
        let why = failure.unwrap_or_else(|| "connection closed early".to_string());
        if attempt > RESUME_ATTEMPTS {
            return Err(ServiceError::FailedPrecondition(format!(
                "registry '{}': blob {} is truncated: received {sent} of {} bytes ({why})",
                client.label(),
                job.digest,
                job.size
            )));
        }
        tracing::warn!(digest = %job.digest, sent, attempt, reason = %why, "blob download interrupted, resuming");
        tokio::time::sleep(Duration::from_millis(200 << attempt.min(4))).await;
    }
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
