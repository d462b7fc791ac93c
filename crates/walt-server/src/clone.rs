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
use walt_core::models::Platform;
use walt_core::oci::{self, Compression, ImageConfig, Manifest, ManifestDoc};
use walt_core::{CloneUrl, Digest, ImageName, LABEL_NODE_MODELS, Location};
use walt_registry::{Credentials, RegistryClient};
use walt_store::{ImportGuard, ImportOptions, LayerRef, PutOutcome, Store};

use crate::State;
use crate::accept::{self, Accepted};
use crate::error::ServiceError;
use crate::images::blocking;
use crate::inflight::{Inflight, Landed, LayerKey, Ticket};
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
    /// `--force` over an image nodes boot: those nodes (name, model).
    nodes: Vec<(String, String)>,
    /// Who asks the registry, for sharing its answers (issue 16).
    asker: Asker,
}

/// Who asks a registry, as far as sharing its answers between clones goes:
/// a digest of the credentials (never shown), or anonymous. Manifests and
/// configs are shared between clones of the same asker only, so that
/// nobody reads through someone else's access.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Asker(String);

impl Asker {
    pub(crate) fn anonymous() -> Self {
        Asker("-".into())
    }

    fn with(credentials: Option<&Credentials>) -> Self {
        use sha2::Digest as _;
        match credentials {
            None => Self::anonymous(),
            Some(c) => {
                let mut h = sha2::Sha256::new();
                h.update(c.username.as_bytes());
                h.update([0]);
                h.update(c.password.as_bytes());
                Asker(Digest::from_sha256(h.finalize().into()).hex().to_string())
            }
        }
    }
}

/// Where a clone shares its registry requests with the others running.
#[derive(Clone, Copy)]
pub(crate) struct Share<'a> {
    pub inflight: &'a Arc<Inflight>,
    pub asker: &'a Asker,
}

/// A manifest of `path` by tag or digest: through `share` when given (one
/// request for every clone asking within the window), else asked alone.
async fn get_manifest(
    share: Option<Share<'_>>,
    client: &RegistryClient,
    path: &str,
    reference: &str,
) -> Result<walt_registry::FetchedManifest, ServiceError> {
    let Some(share) = share else {
        return Ok(client.get_manifest(path, reference).await?);
    };
    let key = format!(
        "{}\n{}\n{path}\n{reference}\n{}",
        client.label(),
        client.base_url(),
        share.asker.0
    );
    let (c, p, r) = (client.clone(), path.to_string(), reference.to_string());
    share
        .inflight
        .manifest(key, async move { Ok(c.get_manifest(&p, &r).await?) })
        .await
}

/// A config blob, as [`get_manifest`].
async fn get_config(
    share: Option<Share<'_>>,
    client: &RegistryClient,
    path: &str,
    digest: &Digest,
) -> Result<Vec<u8>, ServiceError> {
    let Some(share) = share else {
        return Ok(client.get_blob_bytes(path, digest, MAX_CONFIG_SIZE).await?);
    };
    let key = format!(
        "{}\n{}\n{path}\n{digest}\n{}",
        client.label(),
        client.base_url(),
        share.asker.0
    );
    let (c, p, d) = (client.clone(), path.to_string(), digest.clone());
    share
        .inflight
        .config(key, async move {
            Ok(c.get_blob_bytes(&p, &d, MAX_CONFIG_SIZE).await?)
        })
        .await
}

/// A clone replacing an image nodes boot must support their models.
fn check_nodes_models(plan: &Plan, models: &[String]) -> Result<(), ServiceError> {
    let bad: Vec<String> = plan
        .nodes
        .iter()
        .filter(|(_, m)| !models.contains(m))
        .map(|(n, m)| format!("{n} ({m})"))
        .collect();
    if bad.is_empty() {
        return Ok(());
    }
    Err(ServiceError::FailedPrecondition(format!(
        "cannot replace image '{}' with {}: it does not support the model of node{} {} that boot{} it",
        plan.target.short(),
        plan.url,
        if bad.len() == 1 { "" } else { "s" },
        bad.join(", "),
        if bad.len() == 1 { "s" } else { "" },
    )))
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
                    image: ImageName {
                        owner: url.user.clone(),
                        name: url.repository.clone(),
                        tag: url.tag.clone(),
                    }
                    .short(),
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
            let client = RegistryClient::for_hub(hub, req.credentials.clone())?;
            crate::hub::ensure_listed(&client, &url, &req.name, req.force).await?;
            Source::Registry(client)
        }
        Location::Docker => Source::Docker(crate::docker::check(&state.config(), &url).await?),
        Location::Registry(label) => {
            let config = state.config();
            match config.registry(label) {
                Some(Registry::V2(reg)) => {
                    Source::Registry(RegistryClient::for_v2(reg, req.credentials.clone())?)
                }
                _ if let Some(s) = config.skipped.iter().find(|s| s.label == *label) => {
                    return Err(ServiceError::FailedPrecondition(s.warning()));
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
    let store = state.store.clone();
    let t = target.clone();
    let nodes = blocking(move || {
        Ok(match store.get_image(&t)? {
            Some(_) => Some(store.nodes_using(&t)?),
            None => None,
        })
    })
    .await?;
    let nodes = match nodes {
        Some(_) if !req.force => {
            return Err(ServiceError::WouldOverwrite {
                image: target.short(),
                url: url.to_string(),
            });
        }
        Some(nodes) => nodes,
        None => Vec::new(),
    };
    let notice = match (notice, nodes.len()) {
        (n, 0) => n,
        (n, count) => {
            let busy = crate::nodes::service::in_use_text(&target, count);
            Some(match n {
                Some(n) => format!("{n}\n{busy}"),
                None => busy,
            })
        }
    };
    Ok(Plan {
        _lock: lock,
        url,
        target,
        notice,
        force: req.force,
        source,
        nodes: nodes
            .into_iter()
            .map(|d| (d.name, d.model.unwrap_or_default()))
            .collect(),
        asker: Asker::with(req.credentials.as_ref()),
    })
}

/// Performs a planned clone, sending progress on `events`.
pub async fn run(
    state: Arc<State>,
    plan: Plan,
    events: Events,
) -> Result<CloneResult, ServiceError> {
    if let Some(n) = &plan.notice {
        for line in n.lines() {
            events.say(line.to_string()).await;
        }
    }
    match &plan.source {
        Source::Docker(client) => {
            let (url, target) = (&plan.url, &plan.target);
            accept::or_collect(
                &state.store,
                crate::docker::clone(
                    &state.store,
                    client,
                    url,
                    target,
                    plan.force,
                    |models| check_nodes_models(&plan, models),
                    &events,
                ),
            )
            .await
        }
        Source::Walt(src) => {
            let store = state.store.clone();
            let (src, target, force) = (src.clone(), plan.target.clone(), plan.force);
            if !plan.nodes.is_empty() {
                let (store, s) = (state.store.clone(), src.clone());
                let models = blocking(move || {
                    Ok(store
                        .get_image(&s)?
                        .map(|r| r.node_models)
                        .unwrap_or_default())
                })
                .await?;
                check_nodes_models(&plan, &models)?;
            }
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
            let result = accept::or_collect(&store, pull(&state, client, &plan, &events)).await;
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

/// An image of a registry: where to ask for it, and how messages name it.
pub(crate) struct Remote {
    /// `<user>/<repository>`.
    pub path: String,
    /// A tag or a digest.
    pub reference: String,
    /// A clone URL, for messages.
    pub shown: String,
}

impl Remote {
    /// `path:reference` at `location` (a registry label, `hub`).
    pub(crate) fn at(location: &str, path: &str, reference: &str) -> Self {
        Self {
            path: path.to_string(),
            reference: reference.to_string(),
            shown: format!("{location}:{path}:{reference}"),
        }
    }

    fn of(url: &CloneUrl) -> Self {
        Self {
            path: url.path(),
            reference: url.tag.clone(),
            shown: url.to_string(),
        }
    }
}

/// An image manifest, after resolving an index.
pub(crate) struct Resolved {
    pub manifest: Manifest,
    pub bytes: Vec<u8>,
    pub digest: Digest,
    pub media_type: String,
    /// It came from an index (one more request was made).
    pub from_index: bool,
    /// The platform picked from the index, for messages.
    pub picked: Option<String>,
}

/// Parses a fetched manifest of `url`; an index is resolved to this
/// server's platform (one more request).
pub(crate) async fn resolve_fetched(
    client: &RegistryClient,
    url: &CloneUrl,
    fetched: walt_registry::FetchedManifest,
) -> Result<Resolved, ServiceError> {
    resolve_remote(client, &Remote::of(url), fetched, None, None).await
}

/// `linux/<architecture>[/<variant>]` of an index entry.
fn platform_text(p: &oci::Platform) -> String {
    match &p.variant {
        Some(v) => format!("{}/{}/{v}", p.os, p.architecture),
        None => format!("{}/{}", p.os, p.architecture),
    }
}

/// The entry of `index` for the first of `wanted` (in order of
/// preference) it has; else the error naming what it has.
fn pick_wanted<'a>(
    index: &'a oci::Index,
    wanted: &[Platform],
    remote: &Remote,
) -> Result<(&'a oci::Descriptor, String), ServiceError> {
    for want in wanted {
        let found = index.manifests.iter().find(|d| {
            d.platform.as_ref().is_some_and(|p| {
                p.os == "linux" && want.matches(&p.architecture, p.variant.as_deref())
            })
        });
        if let Some(d) = found {
            return Ok((d, want.to_string()));
        }
    }
    let wanted: Vec<String> = wanted
        .iter()
        .map(|p| p.to_string().trim_start_matches("linux/").to_string())
        .collect();
    let available: Vec<String> = index
        .manifests
        .iter()
        .filter_map(|d| d.platform.as_ref())
        .filter(|p| p.architecture != "unknown")
        .map(platform_text)
        .collect();
    Err(ServiceError::NoPlatform {
        url: remote.shown.clone(),
        arch: wanted.join(" or linux/"),
        available: available.join(", "),
    })
}

/// The entry of `index` for this server's platform; else the error
/// naming what it has.
fn host_platform<'a>(
    index: &'a oci::Index,
    remote: &Remote,
) -> Result<&'a oci::Descriptor, ServiceError> {
    let (arch, variant) = oci::oci_arch(std::env::consts::ARCH);
    oci::pick_platform(index, arch, variant).ok_or_else(|| {
        let platforms: Vec<String> = index
            .manifests
            .iter()
            .filter_map(|d| d.platform.as_ref())
            .map(|p| format!("{}/{}", p.os, p.architecture))
            .collect();
        ServiceError::NoPlatform {
            url: remote.shown.clone(),
            arch: arch.to_string(),
            available: platforms.join(", "),
        }
    })
}

/// Parses a fetched manifest; an index is resolved (one more request) to
/// the first of `wanted` it has, or to this server's platform for `None`.
async fn resolve_remote(
    client: &RegistryClient,
    remote: &Remote,
    fetched: walt_registry::FetchedManifest,
    wanted: Option<&[Platform]>,
    share: Option<Share<'_>>,
) -> Result<Resolved, ServiceError> {
    let bad = |e: oci::DocError| ServiceError::InvalidManifest {
        registry: client.label().to_string(),
        url: remote.shown.clone(),
        reason: e.to_string(),
    };
    let mut media_type = fetched.media_type.clone();
    let mut from_index = false;
    let mut picked = None;
    let (manifest, bytes, digest) =
        match ManifestDoc::parse(&fetched.bytes, media_type.as_deref()).map_err(bad)? {
            ManifestDoc::Image(m) => (*m, fetched.bytes, fetched.digest),
            ManifestDoc::Index(index) => {
                let desc = match wanted {
                    Some(wanted) => {
                        let (desc, platform) = pick_wanted(&index, wanted, remote)?;
                        picked = Some(platform);
                        desc
                    }
                    None => host_platform(&index, remote)?,
                };
                from_index = true;
                let inner = get_manifest(share, client, &remote.path, desc.digest.as_str()).await?;
                media_type = inner.media_type.clone().or(Some(desc.media_type.clone()));
                image_of_index(client, remote, inner, media_type.as_deref())?
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
        picked,
    })
}

/// The image manifest an index entry points to (not another index).
fn image_of_index(
    client: &RegistryClient,
    remote: &Remote,
    inner: walt_registry::FetchedManifest,
    media_type: Option<&str>,
) -> Result<(Manifest, Vec<u8>, Digest), ServiceError> {
    let bad = |reason: String| ServiceError::InvalidManifest {
        registry: client.label().to_string(),
        url: remote.shown.clone(),
        reason,
    };
    match ManifestDoc::parse(&inner.bytes, media_type).map_err(|e| bad(e.to_string()))? {
        ManifestDoc::Image(m) => Ok((*m, inner.bytes, inner.digest)),
        ManifestDoc::Index(_) => Err(bad("nested image indexes are not supported".into())),
    }
}

/// An image of a registry whose manifest and config were read, before
/// any layer.
struct Opened {
    manifest: Resolved,
    config_bytes: Vec<u8>,
    config: ImageConfig,
}

/// Reads the image `fetched` is the manifest of: the manifest (an index
/// resolved to the first of `wanted` it has, or to this server's platform
/// for `None`, which `events` is told) and the config.
async fn open(
    client: &RegistryClient,
    remote: &Remote,
    fetched: walt_registry::FetchedManifest,
    wanted: Option<&[Platform]>,
    events: &Events,
    share: Option<Share<'_>>,
) -> Result<Opened, ServiceError> {
    let manifest = resolve_remote(client, remote, fetched, wanted, share).await?;
    if let Some(p) = &manifest.picked {
        events
            .say(format!("multi-platform image: using the {p} variant"))
            .await;
    } else if manifest.from_index {
        let (arch, _) = oci::oci_arch(std::env::consts::ARCH);
        events
            .say(format!(
                "multi-platform image: using the linux/{arch} variant"
            ))
            .await;
    }
    let config_bytes = get_config(
        share,
        client,
        &remote.path,
        &manifest.manifest.config.digest,
    )
    .await?;
    let config: ImageConfig =
        serde_json::from_slice(&config_bytes).map_err(|e| ServiceError::InvalidImage {
            url: remote.shown.clone(),
            reason: format!("the image configuration is not valid: {e}"),
        })?;
    Ok(Opened {
        manifest,
        config_bytes,
        config,
    })
}

impl Opened {
    /// The layers to fetch, checked against the config.
    fn layer_jobs(&self, remote: &Remote) -> Result<Vec<LayerJob>, ServiceError> {
        let invalid = |reason: String| ServiceError::InvalidImage {
            url: remote.shown.clone(),
            reason,
        };
        let manifest = &self.manifest.manifest;
        let diff_ids = &self.config.rootfs.diff_ids;
        if diff_ids.len() != manifest.layers.len() {
            return Err(invalid(format!(
                "the manifest lists {} layers but the configuration {}",
                manifest.layers.len(),
                diff_ids.len()
            )));
        }
        manifest
            .layers
            .iter()
            .zip(diff_ids)
            .map(|(desc, diff_id)| {
                let compression =
                    Compression::from_media_type(&desc.media_type).ok_or_else(|| {
                        invalid(format!(
                            "layer {} has the unsupported media type '{}'",
                            desc.digest, desc.media_type
                        ))
                    })?;
                Ok(LayerJob {
                    digest: desc.digest.clone(),
                    size: desc.size,
                    diff_id: diff_id.clone(),
                    compression,
                    media_type: desc.media_type.clone(),
                })
            })
            .collect()
    }

    /// The fetched manifest, to store as it is.
    fn manifest(self) -> (accept::Manifest, Vec<u8>, Digest) {
        let Resolved {
            manifest,
            bytes,
            digest,
            media_type,
            ..
        } = self.manifest;
        (
            accept::Manifest::Fetched {
                bytes,
                digest,
                media_type,
            },
            self.config_bytes,
            manifest.config.digest,
        )
    }
}

/// Brings the layers of `layers` that the store lacks into it: announces
/// them on `events`, checks the free space, fetches them. Returns the bytes
/// downloaded, and the import guard to hold until something references
/// the layers.
async fn fetch_into(
    state: &Arc<State>,
    client: &RegistryClient,
    path: &str,
    layers: &[LayerJob],
    events: &Events,
) -> Result<(ImportGuard, u64), ServiceError> {
    let store = &state.store;
    // Announce every layer, so the client can draw its bars at once.
    for l in layers {
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
    match fetch_layers(store, &state.inflight, client, path, layers, events).await {
        Ok(n) => Ok((guard, n)),
        Err(e) => {
            accept::release(guard).await;
            Err(e)
        }
    }
}

fn layer_refs(layers: &[LayerJob]) -> Vec<LayerRef> {
    layers
        .iter()
        .map(|l| LayerRef {
            diff_id: l.diff_id.clone(),
            blob_digest: l.digest.clone(),
            blob_size: l.size,
            media_type: l.media_type.clone(),
        })
        .collect()
}

async fn pull(
    state: &Arc<State>,
    client: &RegistryClient,
    plan: &Plan,
    events: &Events,
) -> Result<CloneResult, ServiceError> {
    let store = &state.store;
    let url = &plan.url;
    let remote = Remote::of(url);
    let share = Share {
        inflight: &state.inflight,
        asker: &plan.asker,
    };
    let fetched = get_manifest(Some(share), client, &remote.path, &remote.reference).await?;
    let opened = open(client, &remote, fetched, None, events, Some(share)).await?;
    let models = accept::node_models(opened.config.label(LABEL_NODE_MODELS), url)?;
    check_nodes_models(plan, &models)?;
    let layers = opened.layer_jobs(&remote)?;
    let (guard, downloaded) = fetch_into(state, client, &remote.path, &layers, events).await?;
    let (manifest, config, config_digest) = opened.manifest();
    let image = Accepted {
        config,
        config_digest: Some(config_digest),
        manifest,
        layers: layer_refs(&layers),
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

// ----- a build's base image -----

/// A base image fetched for a build: its blobs and layers are in the store, no image is recorded.
pub(crate) struct FetchedBase {
    /// Where it came from, as a clone URL (`hub:library/debian:bookworm`, `local:waltplatform/x:latest`, `docker:...`).
    pub url: String,
    pub manifest_digest: Digest,
    /// The config blob (stored in the store's blobs as well).
    pub config_digest: Digest,
    pub config: Vec<u8>,
    pub layers: Vec<walt_store::LayerRef>,
}

/// A build's base image as its sources name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BaseRef {
    /// `<user>/<name>`; `library/<name>` for a name without user, as on
    /// the Docker hub.
    pub path: String,
    /// A tag (`latest` when none is given), or a digest.
    pub reference: String,
}

impl BaseRef {
    /// Parses a FROM line's image: `name[:tag]`, `user/name[:tag]`, maybe
    /// `@sha256:...` (which then wins over the tag). A name on another
    /// registry host than the hub's is refused: bases come from this
    /// server's sources.
    pub(crate) fn parse(text: &str) -> Result<Self, ServiceError> {
        let invalid = |why: String| {
            ServiceError::InvalidArgument(format!("invalid base image '{text}': {why}"))
        };
        let (name, digest) = match text.split_once('@') {
            Some((n, d)) => (
                n,
                Some(Digest::parse(d).map_err(|e| invalid(e.to_string()))?),
            ),
            None => (text, None),
        };
        let (name, tag) = match name.rsplit_once(':') {
            Some((n, t)) if !t.contains('/') => (n, t),
            _ => (name, "latest"),
        };
        let name = ["docker.io/", "index.docker.io/"]
            .iter()
            .find_map(|p| name.strip_prefix(p))
            .unwrap_or(name);
        let path = match name.split_once('/') {
            None => format!("library/{name}"),
            Some((host, _)) if is_host(host) => {
                return Err(invalid(format!(
                    "it names the registry '{host}'; base images come from the registries of this server (see walt-server-setup --edit-conf)"
                )));
            }
            Some(_) => name.to_string(),
        };
        // Clone URLs have the same rules.
        let url = CloneUrl::parse(&format!("hub:{path}:{tag}"))
            .map_err(|_| invalid("expected [<user>/]<name>[:<tag>][@sha256:<digest>]".into()))?;
        Ok(Self {
            path: url.path(),
            reference: match digest {
                Some(d) => d.as_str().to_string(),
                None => url.tag,
            },
        })
    }

    fn is_digest(&self) -> bool {
        self.reference.starts_with("sha256:")
    }

    /// `<path>:<tag>` or `<path>@<digest>`, as the Docker daemon names it.
    pub(crate) fn name(&self) -> String {
        let sep = if self.is_digest() { '@' } else { ':' };
        format!("{}{sep}{}", self.path, self.reference)
    }

    /// Its clone URL at `location`.
    pub(crate) fn url(&self, location: &str) -> String {
        format!("{location}:{}", self.name())
    }

    fn remote(&self, location: &str) -> Remote {
        Remote {
            path: self.path.clone(),
            reference: self.reference.clone(),
            shown: self.url(location),
        }
    }
}

/// Whether the first component of an image name is a registry host, as
/// Docker decides it: `localhost`, or a `host[:port]` with a dot or a port.
fn is_host(c: &str) -> bool {
    c == "localhost"
        || (c.contains(['.', ':'])
            && c.split(['.', ':']).all(|p| {
                !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            }))
}

/// A place a base image is looked for.
#[derive(Clone, Copy)]
pub(crate) enum BaseSource<'a> {
    /// The hub, when enabled.
    Hub(Option<&'a walt_core::config::HubRegistry>),
    Registry(&'a walt_core::config::V2Registry),
    Docker,
}

/// The sources of base images, in clone order: the hub (even when not
/// enabled, to say so), the docker-registry-v2 registries in the order of
/// server.conf, the Docker daemon.
pub(crate) fn base_sources(
    config: &walt_core::config::ServerConfig,
) -> Vec<(String, BaseSource<'_>)> {
    let mut out = vec![(
        "hub".to_string(),
        BaseSource::Hub(crate::hub::configured(config).ok()),
    )];
    out.extend(config.registries.iter().filter_map(|r| match r {
        Registry::V2(reg) => Some((reg.label.clone(), BaseSource::Registry(reg))),
        Registry::Hub(_) => None,
    }));
    out.push(("docker".to_string(), BaseSource::Docker));
    out
}

/// Why a registry that answered `e` to the manifest request is passed
/// over. Anonymously, the hub answers 401 for a missing repository too.
fn skip_reason(e: &walt_registry::RegistryError, hub: bool) -> String {
    skip_reason_for(e, hub, "base images")
}

/// [`skip_reason`], for `what` (`base images`, `default images`) fetched
/// anonymously.
pub(crate) fn skip_reason_for(e: &walt_registry::RegistryError, hub: bool, what: &str) -> String {
    use walt_registry::RegistryError as E;
    match e {
        E::NotFound { .. } => "not found".into(),
        E::CredentialsRequired { .. } | E::Unauthorized { .. } | E::Denied { .. } if hub => {
            "not found (or private)".into()
        }
        E::CredentialsRequired { .. } | E::Unauthorized { .. } | E::Denied { .. } => {
            format!("requires credentials ({what} are fetched anonymously)")
        }
        other => other.to_string(),
    }
}

/// `n` bytes for people: `48.2 MB`.
pub(crate) fn human_size(n: u64) -> String {
    for (div, unit) in [(1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB")] {
        if n as f64 >= div {
            return format!("{:.1} {unit}", n as f64 / div);
        }
    }
    format!("{n} B")
}

fn layers_text(n: usize) -> String {
    if n == 1 {
        "1 layer".into()
    } else {
        format!("{n} layers")
    }
}

/// Fetches `reference` (a FROM line's image, already expanded: `name[:tag]`, `user/name[:tag]`, maybe
/// `@sha256:...`) for a build. Sources in clone order: the Docker hub when enabled (a name without user is
/// `library/<name>`), then each docker-registry-v2 registry of server.conf in order (same path), then the Docker
/// daemon; the first that has it wins; anonymous (a source answering 401/403 is skipped and named
/// in the error). An index resolves to `platform` (`FROM --platform`), else to this server's platform (as clone). No walt.node.models check (a base like
/// debian has none). Layers land in the store through the same import pipeline as clone. The caller holds an
/// ImportGuard across the call, and collects what a failed fetch left in the store.
/// `say` gets lines for the user, e.g. "fetching debian:bookworm from hub:library/debian:bookworm (3 layers, 48.2 MB)".
/// Not found anywhere: one error line naming the reference and, for every source, why it was not used
/// (e.g. `base image 'debian:bookworm' not found: hub: not found; local: not found; docker: not configured`).
pub(crate) async fn fetch_base(
    state: &Arc<State>,
    reference: &str,
    platform: Option<Platform>,
    say: &(dyn Fn(String) + Send + Sync),
) -> Result<FetchedBase, ServiceError> {
    // The fetch reports as a clone does; its lines go to `say`, its layer
    // progress nowhere.
    let (events, mut rx) = Events::channel(64);
    let work = find_base(state, reference, platform, events);
    tokio::pin!(work);
    let forward = |ev: Result<Event<CloneResult>, ServiceError>| {
        if let Ok(Event::Message(m)) = ev {
            say(m)
        }
    };
    let result = loop {
        tokio::select! {
            r = &mut work => break r,
            Some(ev) = rx.recv() => forward(ev),
        }
    };
    while let Ok(ev) = rx.try_recv() {
        forward(ev);
    }
    result
}

async fn find_base(
    state: &Arc<State>,
    reference: &str,
    platform: Option<Platform>,
    events: Events,
) -> Result<FetchedBase, ServiceError> {
    let base = BaseRef::parse(reference.trim())?;
    let config = state.config();
    let mut skipped: Vec<(String, String)> = Vec::new();
    for (label, source) in base_sources(&config) {
        let client = match source {
            BaseSource::Hub(None) => {
                skipped.push((label, "not enabled".into()));
                continue;
            }
            BaseSource::Hub(Some(hub)) => RegistryClient::for_hub(hub, None),
            BaseSource::Registry(reg) => RegistryClient::for_v2(reg, None),
            BaseSource::Docker => match crate::docker::find_base(&config, &base.name()).await {
                Ok((client, n)) => {
                    warn_skipped(&skipped, &events).await;
                    let url = base.url("docker");
                    events
                        .say(format!(
                            "fetching {reference} from {url} ({})",
                            layers_text(n)
                        ))
                        .await;
                    return base_from_docker(state, &client, &base, url, &events).await;
                }
                Err(reason) => {
                    skipped.push((label, reason));
                    continue;
                }
            },
        };
        let client = match client {
            Ok(c) => c,
            Err(e) => {
                skipped.push((label, e.to_string()));
                continue;
            }
        };
        let remote = base.remote(&label);
        match client.get_manifest(&remote.path, &remote.reference).await {
            Ok(fetched) => {
                warn_skipped(&skipped, &events).await;
                return base_from_registry(
                    state, &client, reference, &remote, fetched, platform, &events,
                )
                .await;
            }
            Err(e) => {
                tracing::debug!(base = %remote.shown, error = %e, "base image source passed over");
                let reason = skip_reason(&e, matches!(source, BaseSource::Hub(_)));
                skipped.push((label, reason));
            }
        }
    }
    let reasons: Vec<String> = skipped.iter().map(|(l, r)| format!("{l}: {r}")).collect();
    Err(ServiceError::NotFound(format!(
        "base image '{reference}' not found: {}",
        reasons.join("; ")
    )))
}

/// Tells the user about the sources passed over for another reason than
/// not having the image.
async fn warn_skipped(skipped: &[(String, String)], events: &Events) {
    for (label, reason) in skipped {
        if !matches!(
            reason.as_str(),
            "not found" | "not enabled" | "not configured"
        ) {
            events
                .say(format!("warning: {label} skipped: {reason}"))
                .await;
        }
    }
}

async fn base_from_registry(
    state: &Arc<State>,
    client: &RegistryClient,
    reference: &str,
    remote: &Remote,
    fetched: walt_registry::FetchedManifest,
    platform: Option<Platform>,
    events: &Events,
) -> Result<FetchedBase, ServiceError> {
    let wanted = platform.as_ref().map(std::slice::from_ref);
    let asker = Asker::anonymous();
    let share = Share {
        inflight: &state.inflight,
        asker: &asker,
    };
    let opened = open(client, remote, fetched, wanted, events, Some(share)).await?;
    let jobs = opened.layer_jobs(remote)?;
    let total = jobs.iter().map(|l| l.size).sum();
    events
        .say(format!(
            "fetching {reference} from {} ({}, {})",
            remote.shown,
            layers_text(jobs.len()),
            human_size(total)
        ))
        .await;
    let store = &state.store;
    let (guard, downloaded) = fetch_into(state, client, &remote.path, &jobs, events).await?;
    let (manifest, config, config_digest) = opened.manifest();
    let layers = layer_refs(&jobs);
    let s = store.clone();
    let (config, layers, config_digest, manifest_digest) = blocking(move || {
        let _guard = guard;
        let (config_digest, manifest_digest, _) =
            accept::store_documents(&s, &config, Some(&config_digest), manifest, &layers)?;
        Ok((config, layers, config_digest, manifest_digest))
    })
    .await?;
    // Later publishes to this registry may mount these blobs.
    state.blob_sources.record(
        client.label(),
        &remote.path,
        layers
            .iter()
            .map(|l| &l.blob_digest)
            .chain([&config_digest]),
    );
    tracing::info!(base = %remote.shown, downloaded, "base image fetched");
    Ok(FetchedBase {
        url: remote.shown.clone(),
        manifest_digest,
        config_digest,
        config,
        layers,
    })
}

async fn base_from_docker(
    state: &Arc<State>,
    client: &walt_registry::DockerClient,
    base: &BaseRef,
    url: String,
    events: &Events,
) -> Result<FetchedBase, ServiceError> {
    let saved = crate::docker::save(&state.store, client, &base.name(), events).await?;
    let s = state.store.clone();
    let received = saved.received;
    let (config, layers, config_digest, manifest_digest) = blocking(move || {
        let _guard = saved.guard;
        let (config_digest, manifest_digest, _) = accept::store_documents(
            &s,
            &saved.config,
            None,
            accept::Manifest::Written,
            &saved.layers,
        )?;
        Ok((saved.config, saved.layers, config_digest, manifest_digest))
    })
    .await?;
    tracing::info!(base = %url, received, "base image read from the Docker daemon");
    Ok(FetchedBase {
        url,
        manifest_digest,
        config_digest,
        config,
        layers,
    })
}

// ----- a node model's default image -----

/// An image found on a registry for a node model: its manifest (an index
/// resolved to the model's platform) and config read, no layer fetched.
pub(crate) struct Candidate {
    client: RegistryClient,
    remote: Remote,
    opened: Opened,
    jobs: Vec<LayerJob>,
}

impl Candidate {
    /// Where it is, as a clone URL (`local:waltplatform/x-default:latest`).
    pub(crate) fn url(&self) -> &str {
        &self.remote.shown
    }

    pub(crate) fn config(&self) -> &ImageConfig {
        &self.opened.config
    }

    /// What its layers weigh, compressed.
    pub(crate) fn size(&self) -> u64 {
        self.jobs.iter().map(|j| j.size).sum()
    }
}

/// Reads the image `fetched` is the manifest of on `client` (anonymous), an
/// index resolved to the first of `wanted` it has (`None`: this server's
/// platform): manifest and config, the layers checked against the config.
pub(crate) async fn open_candidate(
    client: RegistryClient,
    remote: Remote,
    fetched: walt_registry::FetchedManifest,
    wanted: Option<&[Platform]>,
) -> Result<Candidate, ServiceError> {
    // Nobody watches: the events go nowhere.
    let (events, _) = Events::channel(1);
    let opened = open(&client, &remote, fetched, wanted, &events, None).await?;
    let jobs = opened.layer_jobs(&remote)?;
    Ok(Candidate {
        client,
        remote,
        opened,
        jobs,
    })
}

/// Fetches the layers of `candidate` the store lacks, through clone's
/// pipeline, and records it as `target` with `models`, replacing an image
/// of that name (its record stays, so nodes follow). Returns the manifest
/// digest and the bytes downloaded. On failure what it added is collected.
pub(crate) async fn record_candidate(
    state: &Arc<State>,
    candidate: Candidate,
    target: &ImageName,
    models: Vec<String>,
) -> Result<(Digest, u64), ServiceError> {
    let store = &state.store;
    let Candidate {
        client,
        remote,
        opened,
        jobs,
    } = candidate;
    let config_digest = opened.manifest.manifest.config.digest.clone();
    let (events, _) = Events::channel(1);
    let result = accept::or_collect(store, async {
        let (guard, downloaded) = fetch_into(state, &client, &remote.path, &jobs, &events).await?;
        let (manifest, config, config_digest) = opened.manifest();
        let image = Accepted {
            config,
            config_digest: Some(config_digest),
            manifest,
            layers: layer_refs(&jobs),
            models,
        };
        let (_, digest) = accept::record(store, guard, target, true, image).await?;
        Ok((digest, downloaded))
    })
    .await;
    if result.is_ok() {
        // Later publishes to this registry may mount these blobs.
        state.blob_sources.record(
            client.label(),
            &remote.path,
            jobs.iter().map(|j| &j.digest).chain([&config_digest]),
        );
    }
    result
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
    inflight: &Arc<Inflight>,
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
        let (store, inflight, client, path, events, cancel, limit) = (
            store.clone(),
            inflight.clone(),
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
            let fetch = Fetch {
                store: &store,
                inflight: &inflight,
                client: &client,
                path: &path,
                background,
            };
            fetch.layer(&job, &events, &cancel).await
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

/// What one clone's layer fetches share.
struct Fetch<'a> {
    store: &'a Arc<Store>,
    inflight: &'a Arc<Inflight>,
    client: &'a RegistryClient,
    path: &'a str,
    /// Import at a lower CPU priority (not the critical path).
    background: bool,
}

/// How many failed downloads of other registries a clone waits for before
/// it reports the last one's error.
const FOREIGN_FAILURES: u32 = 2;

impl Fetch<'_> {
    /// Brings one layer into the store; returns the bytes downloaded and the
    /// bytes of file data unpacked. A layer another clone is bringing in
    /// is waited for (its progress reported as this clone's), not fetched
    /// again.
    async fn layer(
        &self,
        job: &LayerJob,
        events: &Events,
        cancel: &CancellationToken,
    ) -> Result<(u64, u64), ServiceError> {
        let store = self.store;
        if store.has_blob(&job.digest) && store.has_layer(&job.diff_id) {
            events
                .layer(LayerProgress::finished(job.digest.as_str(), job.size, true))
                .await;
            return Ok((0, 0));
        }
        let key = LayerKey {
            digest: job.digest.clone(),
            diff_id: job.diff_id.clone(),
            media_type: job.media_type.clone(),
        };
        let label = self.client.label();
        let mut foreign_failures = 0;
        loop {
            let (mut ticket, lead) = self.inflight.join(&key, label);
            if lead {
                self.start_flight(key.clone(), job, &ticket);
            }
            let (layer, total) = (job.digest.as_str(), job.size);
            if !lead {
                tracing::info!(
                    layer,
                    "joining the download of a layer another clone started"
                );
            }
            let outcome = tokio::select! {
                o = ticket.outcome(|done| events.try_layer(LayerProgress::running(layer, done, total))) => o,
                _ = cancel.cancelled() => {
                    // The last one out waits for the download's clean-up.
                    ticket.leave().await;
                    return Err(ServiceError::Internal("cancelled".into()));
                }
            };
            match outcome {
                Ok(Landed {
                    downloaded,
                    unpacked,
                }) => {
                    let cached = downloaded == 0;
                    events
                        .layer(LayerProgress::finished(layer, total, cached))
                        .await;
                    // Every clone that waited for the download counts it:
                    // its layer came over the network during its clone.
                    return Ok((if cached { 0 } else { total }, unpacked));
                }
                // Another registry failed: this clone's may not.
                Err(e) if e.registry != label && foreign_failures < FOREIGN_FAILURES => {
                    foreign_failures += 1;
                    tracing::info!(layer, failed = %e.registry, error = %e.error, "a shared download from another registry failed: trying again");
                }
                Err(e) => return Err(ServiceError::Shared(e.error)),
            }
        }
    }

    /// Starts the download `ticket` leads, as a task of its own: the
    /// clone that started it may go away while others wait.
    fn start_flight(&self, key: LayerKey, job: &LayerJob, ticket: &Ticket) {
        let flight = ticket.flight().clone();
        let (store, inflight, client, path, job, background) = (
            self.store.clone(),
            self.inflight.clone(),
            self.client.clone(),
            self.path.to_string(),
            job.clone(),
            self.background,
        );
        tokio::spawn(async move {
            let outcome = land_layer(&store, &client, &path, &job, background, &flight).await;
            if let Err(e) = &outcome {
                if flight.cancelled().is_cancelled() {
                    tracing::info!(layer = %job.digest, "layer download cancelled: no clone waits for it any more");
                } else {
                    tracing::debug!(layer = %job.digest, error = %e, "shared layer download failed");
                }
            }
            inflight.land(&key, &flight, outcome);
        });
    }
}

/// The work of a shared layer download: the blob fetched and imported
/// (or, when the store has the blob by now, only unpacked).
async fn land_layer(
    store: &Arc<Store>,
    client: &RegistryClient,
    path: &str,
    job: &LayerJob,
    background: bool,
    flight: &Arc<crate::inflight::Flight>,
) -> Result<Landed, ServiceError> {
    // Checked again: a download that ended since the caller's check has
    // published the layer before leaving the table.
    let has_blob = store.has_blob(&job.digest);
    let has_layer = store.has_layer(&job.diff_id);
    if has_blob && has_layer {
        return Ok(Landed {
            downloaded: 0,
            unpacked: 0,
        });
    }
    if has_blob {
        let (s, j) = (store.clone(), job.clone());
        let imported = blocking(move || {
            let _guard = s.begin_import();
            Ok(s.unpack_stored_blob(&j.digest, j.compression, &j.diff_id)?)
        })
        .await?;
        return Ok(Landed {
            downloaded: 0,
            unpacked: imported.unpacked_bytes,
        });
    }

    let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(16);
    let progress = flight.clone();
    let opts = ImportOptions {
        store_blob: true,
        unpack: !has_layer,
        expected_size: Some(job.size),
        expected_diff_id: Some(job.diff_id.clone()),
        progress: Some(Box::new(move |done| progress.progress(done))),
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
        _ = flight.cancelled().cancelled() => Err(ServiceError::Internal("cancelled".into())),
    };
    // The importer sees the end of its input once `tx` is gone; wait for it
    // so that its staging files are removed before we report anything.
    let imported = import.await?;
    pumped?;
    let imported = imported?;
    Ok(Landed {
        downloaded: job.size,
        unpacked: imported.unpacked_bytes,
    })
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

#[cfg(test)]
mod tests {
    use super::*;
    use walt_core::config::ServerConfig;

    fn base(text: &str) -> Result<(String, String), String> {
        BaseRef::parse(text)
            .map(|b| (b.path, b.reference))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn base_references_map_to_registry_paths() {
        let d = format!("sha256:{}", "ab".repeat(32));
        let ok = |p: &str, r: &str| Ok((p.to_string(), r.to_string()));
        assert_eq!(base("debian"), ok("library/debian", "latest"));
        assert_eq!(base("debian:bookworm"), ok("library/debian", "bookworm"));
        assert_eq!(
            base("waltplatform/pc-x86-64-default"),
            ok("waltplatform/pc-x86-64-default", "latest")
        );
        assert_eq!(base("u/team/img:v1.2"), ok("u/team/img", "v1.2"));
        assert_eq!(base(&format!("debian@{d}")), ok("library/debian", &d));
        // A digest wins over the tag, as in Docker.
        assert_eq!(base(&format!("debian:12@{d}")), ok("library/debian", &d));
        assert_eq!(
            base("docker.io/library/alpine:3"),
            ok("library/alpine", "3")
        );
        assert_eq!(base("index.docker.io/u/x"), ok("u/x", "latest"));

        let b = BaseRef::parse("debian:bookworm").unwrap();
        assert_eq!(b.name(), "library/debian:bookworm");
        assert_eq!(b.url("hub"), "hub:library/debian:bookworm");
        assert_eq!(b.remote("local").shown, "local:library/debian:bookworm");
        let b = BaseRef::parse(&format!("u/x@{d}")).unwrap();
        assert_eq!(b.name(), format!("u/x@{d}"));
        assert_eq!(b.url("docker"), format!("docker:u/x@{d}"));

        for (bad, says) in [
            ("quay.io/u/x", "names the registry 'quay.io'"),
            ("localhost:5000/x", "names the registry 'localhost:5000'"),
            ("localhost/x", "names the registry 'localhost'"),
            (
                "127.0.0.1:5000/u/x:1",
                "names the registry '127.0.0.1:5000'",
            ),
            ("Debian", "expected [<user>/]<name>"),
            ("debian:", "expected"),
            ("debian:a b", "expected"),
            ("../x", "expected"),
            ("u/../x", "expected"),
            ("", "expected"),
            ("debian@sha256:12", "not a digest"),
            ("debian@md5:12", "algorithm"),
        ] {
            let e = base(bad).unwrap_err();
            assert!(
                e.starts_with(&format!("invalid base image '{bad}': ")) && e.contains(says),
                "{bad}: {e}"
            );
        }
    }

    fn config(hub: bool, labels: &[&str]) -> ServerConfig {
        let mut text = String::from("registries:\n");
        for (i, l) in labels.iter().enumerate() {
            text.push_str(&format!(
                "-   label: {l}\n    api: docker-registry-v2\n    description: d\n    host: h{i}\n    port: 5000\n    protocol: http\n    auth: none\n"
            ));
        }
        if hub {
            // Listed last, tried first.
            text.push_str("-   api: docker-hub\n    description: d\n");
        }
        ServerConfig::parse("t", &text).unwrap()
    }

    fn base_source_names(config: &ServerConfig) -> Vec<String> {
        base_sources(config).into_iter().map(|(l, _)| l).collect()
    }

    #[test]
    fn base_sources_in_clone_order() {
        assert_eq!(
            base_source_names(&config(true, &["lab", "local"])),
            ["hub", "lab", "local", "docker"]
        );
        let c = config(false, &["local"]);
        assert_eq!(base_source_names(&c), ["hub", "local", "docker"]);
        assert!(matches!(base_sources(&c)[0].1, BaseSource::Hub(None)));
        assert!(matches!(
            base_sources(&config(true, &[]))[0].1,
            BaseSource::Hub(Some(_))
        ));
    }

    #[test]
    fn skipped_sources_say_why() {
        use walt_registry::RegistryError as E;
        let label = || "r".to_string();
        let not_found = E::NotFound {
            label: label(),
            what: "manifest".into(),
            message: None,
        };
        assert_eq!(skip_reason(&not_found, false), "not found");
        let auth = E::CredentialsRequired { label: label() };
        assert_eq!(
            skip_reason(&auth, false),
            "requires credentials (base images are fetched anonymously)"
        );
        assert_eq!(skip_reason(&auth, true), "not found (or private)");
        let down = E::Unreachable {
            label: label(),
            url: "http://h:5000".into(),
            reason: "connection refused".into(),
        };
        assert_eq!(skip_reason(&down, false), down.to_string());
    }

    #[test]
    fn a_model_picks_its_platform_from_an_index() {
        use walt_core::models::model_platforms;
        let entry = |n: u8, arch: &str, variant: Option<&str>| {
            let mut p = serde_json::json!({"architecture": arch, "os": "linux"});
            if let Some(v) = variant {
                p["variant"] = v.into();
            }
            serde_json::json!({
                "mediaType": oci::OCI_MANIFEST,
                "digest": format!("sha256:{}", format!("{n:02x}").repeat(32)),
                "size": 1,
                "platform": p,
            })
        };
        let index = |entries: Vec<serde_json::Value>| -> oci::Index {
            serde_json::from_value(serde_json::json!({"schemaVersion": 2, "manifests": entries}))
                .unwrap()
        };
        let remote = Remote::at("local", "waltplatform/x-default", "latest");
        let pick = |idx: &oci::Index, model: &str| {
            pick_wanted(idx, model_platforms(model).unwrap(), &remote)
                .map(|(d, p)| (d.digest.hex()[..2].to_string(), p))
                .map_err(|e| e.to_string())
        };
        let full = index(vec![
            entry(1, "amd64", None),
            entry(2, "arm", Some("v7")),
            entry(3, "arm64", Some("v8")),
            entry(4, "unknown", None),
        ]);
        assert_eq!(
            pick(&full, "rpi-3-b").unwrap(),
            ("03".into(), "linux/arm64".into())
        );
        assert_eq!(
            pick(&full, "rpi-2-b").unwrap(),
            ("02".into(), "linux/arm/v7".into())
        );
        assert_eq!(pick(&full, "pc-x86-64").unwrap().0, "01");
        assert_eq!(
            pick(&full, "rpi-b").unwrap_err(),
            "local:waltplatform/x-default:latest has no image for linux/arm/v6 (it has: linux/amd64, linux/arm/v7, linux/arm64/v8)"
        );
        // No arm64: a Raspberry Pi 4 takes arm/v7 (`arm` alone is v7).
        let armhf = index(vec![entry(5, "arm", None), entry(6, "arm", Some("v6"))]);
        assert_eq!(pick(&armhf, "rpi-4-b").unwrap().0, "05");
        assert_eq!(pick(&armhf, "rpi-b").unwrap().0, "06");
        assert_eq!(
            pick(&armhf, "pc-x86-32").unwrap_err(),
            "local:waltplatform/x-default:latest has no image for linux/386 (it has: linux/arm, linux/arm/v6)"
        );
        assert!(
            pick(&armhf, "qemu-arm-64")
                .unwrap_err()
                .contains("no image for linux/arm64 (")
        );
        let none = index(vec![entry(7, "amd64", None)]);
        assert!(
            pick(&none, "rpi-5-b")
                .unwrap_err()
                .contains("no image for linux/arm64 or linux/arm/v7 (it has: linux/amd64)")
        );
    }

    #[test]
    fn sizes_and_counts_for_people() {
        assert_eq!(human_size(48_213_000), "48.2 MB");
        assert_eq!(human_size(999), "999 B");
        assert_eq!(human_size(1_500), "1.5 kB");
        assert_eq!(human_size(3_000_000_000), "3.0 GB");
        assert_eq!(layers_text(1), "1 layer");
        assert_eq!(layers_text(3), "3 layers");
    }
}
