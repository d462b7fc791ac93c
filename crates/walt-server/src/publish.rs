//! `walt image publish`: pushes an image of the caller's working set to a
//! configured docker-registry-v2 registry or the Docker hub, as `<user>/<name>:<tag>` where
//! `<user>` is the caller's registry username (else their walt username).
//! Blobs the registry already holds are not sent again; the manifest goes
//! last, so the tag only appears once everything it references is there.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::task::JoinSet;

use walt_core::config::{Auth, Registry, V2Registry};
use walt_core::{CloneUrl, Digest, ImageName};
use walt_registry::{Credentials, Progress, RegistryClient, RegistryError};
use walt_store::ImageRecord;

use crate::State;
use crate::error::ServiceError;
use crate::images::blocking;
use crate::progress::{Event, LayerProgress, Reporter};

/// Blobs uploaded at once.
const UPLOAD_CONCURRENCY: usize = 3;
/// Least time between two progress events of one blob.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(200);

/// Most blobs remembered per registry.
const MAX_SOURCES: usize = 100_000;

/// What the caller asks for.
#[derive(Debug, Clone, Default)]
pub struct PublishRequest {
    /// An image of the caller's working set.
    pub image: String,
    /// The target's label; empty or `auto`: the only one there is.
    pub registry: String,
    /// By registry label.
    pub credentials: HashMap<String, Credentials>,
}

/// What a publish did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishResult {
    /// Where others clone it from.
    pub clone_url: String,
    /// The label of the registry it went to.
    pub registry: String,
    pub manifest_digest: Digest,
    pub uploaded_blobs: u64,
    pub uploaded_bytes: u64,
    pub skipped_blobs: u64,
}

/// The events of a publish.
pub type Events = Reporter<Event<PublishResult>>;

/// For each registry label, a repository known to hold each blob, learnt
/// from clones and publishes: the source of cross-repository mounts. In
/// memory only (a restart forgets it; publishing then uploads).
#[derive(Default)]
pub struct BlobSources(Mutex<HashMap<String, HashMap<Digest, String>>>);

impl BlobSources {
    /// Records that `repo` of registry `label` holds these blobs.
    pub fn record<'a>(
        &self,
        label: &str,
        repo: &str,
        digests: impl IntoIterator<Item = &'a Digest>,
    ) {
        let mut all = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let known = all.entry(label.to_string()).or_default();
        for d in digests {
            if known.len() >= MAX_SOURCES {
                known.clear();
            }
            known.insert(d.clone(), repo.to_string());
        }
    }

    /// A repository of `label` known to hold `digest`.
    pub fn find(&self, label: &str, digest: &Digest) -> Option<String> {
        let all = self.0.lock().unwrap_or_else(|e| e.into_inner());
        all.get(label)?.get(digest).cloned()
    }
}

/// A validated publish request.
pub struct Plan {
    image: ImageRecord,
    client: RegistryClient,
    /// `<user>/<name>` in the registry.
    repo: String,
    url: CloneUrl,
    /// Publishing to the hub as this user: its walt_metadata is updated.
    hub_user: Option<String>,
}

/// Publishing to the Docker hub: as `<hub user>/<name>:<tag>`, hub
/// credentials required.
async fn plan_hub(
    config: &walt_core::config::ServerConfig,
    req: &PublishRequest,
    image: ImageRecord,
) -> Result<Plan, ServiceError> {
    let hub = crate::hub::configured(config)?;
    // The repository is named after the hub user, and the hub takes no
    // anonymous push: both fields are needed.
    let creds = req
        .credentials
        .get("hub")
        .filter(|c| !c.username.is_empty() && !c.password.is_empty())
        .cloned()
        .ok_or_else(|| RegistryError::CredentialsRequired {
            label: "hub".into(),
        })?;
    let owner = creds.username.to_lowercase();
    let text = format!("hub:{owner}/{}:{}", image.name.name, image.name.tag);
    let url = CloneUrl::parse(&text).map_err(|_| ServiceError::BadOwner {
        owner: owner.clone(),
        name: image.name.name.clone(),
        place: "on the Docker hub".into(),
    })?;
    let client = RegistryClient::for_hub(hub, Some(creds))?;
    Ok(Plan {
        repo: url.path(),
        image,
        client,
        url,
        hub_user: Some(owner),
    })
}

/// The labels of the registries one can publish to, for messages.
fn targets(regs: &[&V2Registry]) -> String {
    if regs.is_empty() {
        "none is configured".to_string()
    } else {
        regs.iter()
            .map(|r| r.label.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Checks the request: the image exists, the registry is one to publish
/// to, the target name is valid. Nothing is sent yet.
pub async fn plan(
    state: &Arc<State>,
    user: &str,
    req: &PublishRequest,
) -> Result<Plan, ServiceError> {
    let name = ImageName::parse_user(user, req.image.trim())?;
    let store = state.store.clone();
    let image = {
        let name = name.clone();
        blocking(move || Ok(store.get_image(&name)?)).await?
    }
    .ok_or_else(|| ServiceError::NoSuchImage {
        image: name.short(),
    })?;

    let config = state.config();
    let v2: Vec<&V2Registry> = config
        .registries
        .iter()
        .filter_map(|r| match r {
            Registry::V2(v) => Some(v),
            Registry::Hub(_) => None,
        })
        .collect();
    let wanted = req.registry.trim();
    let reg: &V2Registry = match wanted {
        "" | "auto" => match (v2.as_slice(), crate::hub::configured(&config).is_ok()) {
            ([only], false) => only,
            ([], true) => return plan_hub(&config, req, image).await,
            ([], false) => return Err(ServiceError::NoRegistry),
            (_, hub) => {
                return Err(ServiceError::SeveralRegistries {
                    registries: format!("{}{}", if hub { "hub, " } else { "" }, targets(&v2)),
                    first: if hub {
                        "hub".into()
                    } else {
                        v2[0].label.clone()
                    },
                    image: name.short(),
                });
            }
        },
        "walt" | "docker" => {
            return Err(ServiceError::NotATarget {
                label: wanted.to_string(),
                registries: targets(&v2),
            });
        }
        "hub" => return plan_hub(&config, req, image).await,
        label => match config.registry(label) {
            Some(Registry::V2(r)) => r,
            Some(Registry::Hub(_)) | None => {
                return Err(ServiceError::UnknownRegistry {
                    label: label.to_string(),
                    registries: targets(&v2),
                });
            }
        },
    };

    let creds = req.credentials.get(&reg.label).cloned();
    if reg.auth == Auth::Basic && creds.is_none() {
        return Err(RegistryError::CredentialsRequired {
            label: reg.label.clone(),
        }
        .into());
    }
    // A JFrog registry keeps every image under its repository (as WalT).
    let owner = match &reg.repository {
        Some(r) => r.clone(),
        None => creds
            .as_ref()
            .map(|c| c.username.to_lowercase())
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| user.to_string()),
    };
    let text = format!(
        "{}:{owner}/{}:{}",
        reg.label, image.name.name, image.name.tag
    );
    let url = CloneUrl::parse(&text).map_err(|_| ServiceError::BadOwner {
        owner: owner.clone(),
        name: image.name.name.clone(),
        place: format!("on registry '{}'", reg.label),
    })?;
    let client = RegistryClient::for_v2(reg, creds)?;
    Ok(Plan {
        repo: url.path(),
        image,
        client,
        url,
        hub_user: None,
    })
}

/// One blob to make present in the registry.
#[derive(Clone)]
struct BlobJob {
    digest: Digest,
    size: u64,
    path: std::path::PathBuf,
    /// Another repository of the registry known to hold it.
    mount_from: Option<String>,
}

/// What happened to one blob.
enum Sent {
    Present,
    Uploaded(u64),
}

/// Gzip level for layers that were never compressed: fast, most of the gain.
const PUBLISH_GZIP_LEVEL: u32 = 3;

/// Layers stored uncompressed in images walt built itself (`docker:`
/// imports; see `oci::ANNOTATION_WALT_BUILT`) are compressed before they
/// leave the server, all at once on the blocking pool, and the image record
/// is updated to the compressed blobs (same diff_ids, same config, a new
/// manifest). Images pulled from registries keep their layers and digest.
/// Returns the new record, or `None` when nothing changed.
async fn compress_layers(
    state: &Arc<State>,
    rec: &ImageRecord,
    events: &Events,
) -> Result<Option<ImageRecord>, ServiceError> {
    use walt_core::oci::{self, Compression};
    let todo: Vec<usize> = (0..rec.layers.len())
        .filter(|&i| {
            Compression::from_media_type(&rec.layers[i].media_type) == Some(Compression::None)
        })
        .collect();
    if todo.is_empty() {
        return Ok(None);
    }
    let built_by_walt = {
        let (store, digest) = (state.store.clone(), rec.manifest_digest.clone());
        let bytes = blocking(move || Ok(store.read_blob(&digest)?)).await?;
        serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|m| {
                m["annotations"][oci::ANNOTATION_WALT_BUILT]
                    .as_str()
                    .map(|v| v == "true")
            })
            .unwrap_or(false)
    };
    if !built_by_walt {
        return Ok(None);
    }
    events
        .say(format!(
            "compressing {} layer{} stored uncompressed",
            todo.len(),
            if todo.len() == 1 { "" } else { "s" }
        ))
        .await;
    let mut tasks = JoinSet::new();
    for i in todo {
        let (store, layer) = (state.store.clone(), rec.layers[i].clone());
        let image = rec.name.short();
        tasks.spawn_blocking(move || -> Result<_, ServiceError> {
            // The stored tar, or the tar of a layer walt committed produced
            // again from its files (tree-backed), verified as it streams.
            let source = Checked {
                inner: store.open_blob(&layer.blob_digest)?,
                failure: None,
            };
            let mut gz = flate2::read::GzEncoder::new(
                std::io::BufReader::with_capacity(1 << 20, source),
                flate2::Compression::new(PUBLISH_GZIP_LEVEL),
            );
            // Stored as a blob under its computed digest, its diff_id checked.
            let imported = store.import_layer_unverified(
                &mut gz,
                Compression::Gzip,
                &walt_store::ImportOptions {
                    store_blob: true,
                    unpack: false,
                    expected_size: None,
                    expected_diff_id: Some(layer.diff_id.clone()),
                    progress: None,
                    background: false,
                    unpacked_limit: None,
                },
            );
            let imported = match (imported, gz.into_inner().into_inner().failure) {
                (Ok(imported), _) => imported,
                // The layer's own bytes could not be read, or did not
                // match its digest: say so, naming the image.
                (Err(_), Some(reason)) => {
                    return Err(walt_store::StoreError::Corrupt { image, reason }.into());
                }
                (Err(e), None) => return Err(e.into()),
            };
            Ok((i, imported))
        });
    }
    let mut rec = rec.clone();
    while let Some(joined) = tasks.join_next().await {
        let (i, imported) = joined??;
        let l = &mut rec.layers[i];
        l.blob_digest = imported.digest;
        l.blob_size = imported.size;
        l.media_type = if l.media_type == oci::DOCKER_LAYER_TAR {
            oci::DOCKER_LAYER_GZIP.to_string()
        } else {
            oci::OCI_LAYER_GZIP.to_string()
        };
    }
    let store = state.store.clone();
    blocking(move || {
        let bytes = store.read_blob(&rec.manifest_digest)?;
        let doc = oci::ManifestDoc::parse(&bytes, Some(&rec.manifest_media_type))
            .map_err(|e| ServiceError::Internal(format!("stored manifest of {}: {e}", rec.name)))?;
        let oci::ManifestDoc::Image(mut manifest) = doc else {
            return Err(ServiceError::Internal(format!(
                "stored manifest of {} is an index",
                rec.name
            )));
        };
        for (desc, layer) in manifest.layers.iter_mut().zip(&rec.layers) {
            desc.media_type = layer.media_type.clone();
            desc.digest = layer.blob_digest.clone();
            desc.size = layer.blob_size;
        }
        let bytes = serde_json::to_vec(&manifest)
            .map_err(|e| ServiceError::Internal(format!("manifest of {}: {e}", rec.name)))?;
        let manifest_digest = store.put_blob(None, &bytes)?;
        store.put_image(
            &walt_store::NewImage {
                name: rec.name.clone(),
                manifest_digest,
                manifest_media_type: rec.manifest_media_type.clone(),
                config_digest: rec.config_digest.clone(),
                layers: rec.layers.clone(),
                node_models: rec.node_models.clone(),
                created: rec.created,
            },
            true,
        )?;
        Ok(store.get_image(&rec.name)?)
    })
    .await
}

/// A reader that keeps the text of its first error.
struct Checked<R> {
    inner: R,
    failure: Option<String>,
}

impl<R: std::io::Read> std::io::Read for Checked<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.inner.read(buf).inspect_err(|e| {
            self.failure.get_or_insert_with(|| e.to_string());
        })
    }
}

/// Performs a planned publish, sending progress on `events`.
pub async fn run(
    state: Arc<State>,
    mut plan: Plan,
    events: Events,
) -> Result<PublishResult, ServiceError> {
    let started = Instant::now();
    let store = state.store.clone();
    // Keeps a concurrent removal from collecting the blobs being sent.
    let guard = store.begin_import();
    let mut result = match compress_layers(&state, &plan.image, &events).await {
        Ok(Some(rec)) => {
            plan.image = rec;
            publish(&state, &plan, &events).await
        }
        Ok(None) => publish(&state, &plan, &events).await,
        Err(e) => Err(e),
    };
    if let (Ok(_), Some(hub_user)) = (&result, &plan.hub_user) {
        // Makes the image findable by WalT searches of the hub.
        if let Err(e) = publish_hub_metadata(&state, &plan, hub_user).await {
            result = Err(e);
        }
    }
    let _ = tokio::task::spawn_blocking(move || drop(guard)).await;
    let result = result?;
    let rec = &plan.image;
    state.blob_sources.record(
        plan.client.label(),
        &plan.repo,
        rec.layers
            .iter()
            .map(|l| &l.blob_digest)
            .chain([&rec.config_digest]),
    );
    tracing::info!(
        image = %plan.image.name,
        url = %plan.url,
        uploaded_blobs = result.uploaded_blobs,
        uploaded_bytes = result.uploaded_bytes,
        skipped_blobs = result.skipped_blobs,
        elapsed_ms = started.elapsed().as_secs_f64() * 1000.0,
        "image published"
    );
    Ok(result)
}

async fn publish(
    state: &Arc<State>,
    plan: &Plan,
    events: &Events,
) -> Result<PublishResult, ServiceError> {
    let store = &state.store;
    let rec = &plan.image;
    let (layers, config, manifest) = {
        let store = store.clone();
        let rec = rec.clone();
        blocking(move || {
            let mut layers = Vec::new();
            for l in &rec.layers {
                // A tree-backed layer blob still there (an image not built
                // by walt reusing one) is written out once for the upload.
                let path = store
                    .materialize_blob(&l.blob_digest)
                    .map_err(|e| match e {
                        walt_store::StoreError::BlobFromTree { .. } => {
                            walt_store::StoreError::Corrupt {
                                image: rec.name.to_string(),
                                reason: e.to_string(),
                            }
                        }
                        e => e,
                    })?;
                layers.push(BlobJob {
                    digest: l.blob_digest.clone(),
                    size: l.blob_size,
                    path,
                    mount_from: None,
                });
            }
            let path = store.blob_path(&rec.config_digest);
            let size = std::fs::metadata(&path)
                .map_err(|e| {
                    ServiceError::Internal(format!("cannot read {}: {e}", path.display()))
                })?
                .len();
            let config = BlobJob {
                digest: rec.config_digest.clone(),
                size,
                path,
                mount_from: None,
            };
            let manifest = store.read_blob(&rec.manifest_digest)?;
            Ok((layers, config, manifest))
        })
        .await?
    };
    let label = plan.client.label();
    let source = |digest: &Digest| {
        state
            .blob_sources
            .find(label, digest)
            .filter(|r| *r != plan.repo)
    };
    let layers: Vec<BlobJob> = layers
        .into_iter()
        .map(|mut l| {
            l.mount_from = source(&l.digest);
            l
        })
        .collect();
    let mut config = config;
    config.mount_from = source(&config.digest);
    for l in &layers {
        events
            .layer(LayerProgress::running(l.digest.as_str(), 0, l.size))
            .await;
    }
    let mut uploaded_blobs = 0;
    let mut uploaded_bytes = 0;
    let mut skipped_blobs = 0;
    let mut count = |s: Sent| match s {
        Sent::Present => skipped_blobs += 1,
        Sent::Uploaded(n) => {
            uploaded_blobs += 1;
            uploaded_bytes += n;
        }
    };

    // Layers a few at a time; the first failure stops the others.
    let limit = Arc::new(tokio::sync::Semaphore::new(UPLOAD_CONCURRENCY));
    let mut set = JoinSet::new();
    for job in layers {
        let (client, repo, events, limit) = (
            plan.client.clone(),
            plan.repo.clone(),
            events.clone(),
            limit.clone(),
        );
        set.spawn(async move {
            let _permit = limit
                .acquire_owned()
                .await
                .map_err(|_| ServiceError::ShuttingDown)?;
            send_blob(&client, &repo, &job, Some(&events)).await
        });
    }
    while let Some(joined) = set.join_next().await {
        match joined.map_err(ServiceError::from).and_then(|r| r) {
            Ok(s) => count(s),
            Err(e) => {
                set.abort_all();
                while set.join_next().await.is_some() {}
                return Err(e);
            }
        }
    }
    count(send_blob(&plan.client, &plan.repo, &config, None).await?);

    let media_type = if rec.manifest_media_type.is_empty() {
        walt_core::oci::OCI_MANIFEST
    } else {
        rec.manifest_media_type.as_str()
    };
    plan.client
        .put_manifest(&plan.repo, &plan.url.tag, media_type, &manifest)
        .await?;
    Ok(PublishResult {
        clone_url: plan.url.to_string(),
        registry: plan.client.label().to_string(),
        manifest_digest: rec.manifest_digest.clone(),
        uploaded_blobs,
        uploaded_bytes,
        skipped_blobs,
    })
}

/// Lists the published image, with its labels, in the walt_metadata
/// image of `hub_user`.
async fn publish_hub_metadata(
    state: &Arc<State>,
    plan: &Plan,
    hub_user: &str,
) -> Result<(), ServiceError> {
    let store = state.store.clone();
    let digest = plan.image.config_digest.clone();
    let labels = blocking(move || {
        let bytes = store.read_blob(&digest)?;
        let config: walt_core::oci::ImageConfig = serde_json::from_slice(&bytes)
            .map_err(|e| ServiceError::Internal(format!("bad image config {digest}: {e}")))?;
        Ok(config.config.and_then(|c| c.labels).unwrap_or_default())
    })
    .await?;
    crate::hub::record_image(
        &plan.client,
        hub_user,
        &plan.image.name.name,
        &plan.image.name.tag,
        labels,
    )
    .await
}

/// Makes one blob present in the repository: nothing to do when the
/// registry has it, else an upload (with progress events when `events`).
async fn send_blob(
    client: &RegistryClient,
    repo: &str,
    job: &BlobJob,
    events: Option<&Events>,
) -> Result<Sent, ServiceError> {
    if client.blob_exists(repo, &job.digest).await? {
        if let Some(ev) = events {
            ev.layer(LayerProgress::finished(job.digest.as_str(), job.size, true))
                .await;
        }
        return Ok(Sent::Present);
    }
    if let Some(from) = &job.mount_from {
        match client.mount_blob(repo, &job.digest, from).await {
            Ok(true) => {
                tracing::debug!(digest = %job.digest, from = %from, "blob mounted");
                if let Some(ev) = events {
                    ev.layer(LayerProgress::finished(job.digest.as_str(), job.size, true))
                        .await;
                }
                return Ok(Sent::Present);
            }
            Ok(false) => {}
            // An upload still works: only note why the shortcut failed.
            Err(e) => tracing::info!(digest = %job.digest, from = %from, "cannot mount: {e}"),
        }
    }
    let reporter: Option<Progress> = events.map(|ev| {
        let ev = ev.clone();
        let digest = job.digest.clone();
        let total = job.size;
        let last = std::sync::Mutex::new(None::<Instant>);
        let p: Progress = Arc::new(move |done: u64| {
            let mut last = last.lock().unwrap_or_else(|e| e.into_inner());
            if last.is_some_and(|t| t.elapsed() < PROGRESS_INTERVAL) {
                return;
            }
            *last = Some(Instant::now());
            // Progress is best effort: never wait for a slow client here.
            ev.try_layer(LayerProgress::running(digest.as_str(), done, total));
        });
        p
    });
    client
        .push_blob(repo, &job.digest, job.size, &job.path, reporter)
        .await?;
    if let Some(ev) = events {
        ev.layer(LayerProgress::finished(
            job.digest.as_str(),
            job.size,
            false,
        ))
        .await;
    }
    Ok(Sent::Uploaded(job.size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blob_sources_per_registry() {
        let s = BlobSources::default();
        let a = Digest::from_sha256([0xa; 32]);
        let b = Digest::from_sha256([0xb; 32]);
        assert_eq!(s.find("local", &a), None);
        s.record("local", "eve/base", [&a, &b]);
        s.record("other", "x/y", [&a]);
        assert_eq!(s.find("local", &a).as_deref(), Some("eve/base"));
        assert_eq!(s.find("other", &a).as_deref(), Some("x/y"));
        assert_eq!(s.find("other", &b), None);
        // the latest holder wins
        s.record("local", "alice/base", [&b]);
        assert_eq!(s.find("local", &b).as_deref(), Some("alice/base"));
    }
}
