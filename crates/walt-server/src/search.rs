//! `walt image search`: every source at once (other users' images in the
//! store, configured docker-registry-v2 registries, the Docker hub through
//! its users' `walt_metadata` images), results streamed as
//! they are found.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::sync::Semaphore;

use walt_core::config::{Auth, Registry, V2Registry};
use walt_core::models::parse_models;
use walt_core::oci::ImageConfig;
use walt_core::{CloneUrl, Digest, LABEL_NODE_MODELS, LABEL_SERVER_MINVERSION, Location};
use walt_registry::{Credentials, ManifestCheck, RegistryClient, RegistryError};

use crate::State;
use crate::error::ServiceError;
use crate::images::blocking;
use crate::progress::Reporter;

/// Requests in flight per registry (and so, about, connections kept open to
/// it). A cold search is ~2.5 requests per image, each a round trip: with 32,
/// 1 000 images from a registry 20 ms away need ≥ 1.6 s of round trips (3.1 s
/// with 16); on loopback the registry's CPU is the limit whatever the value
/// above 8 (docs/performance.md, "Search"; bench/search.md).
const REGISTRY_CONCURRENCY: usize = 32;
/// Longest wait for a registry's catalog (retries included): a registry
/// that does not answer must not hold the whole search.
const CATALOG_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// Largest image config accepted.
const MAX_CONFIG_SIZE: u64 = 16 << 20;
/// Configs remembered across searches (by digest; they never change).
const MAX_CACHED_CONFIGS: usize = 100_000;
/// Tags remembered across searches (revalidated by every search).
const MAX_CACHED_TAGS: usize = 100_000;

/// What the caller asks for.
#[derive(Debug, Clone, Default)]
pub struct SearchRequest {
    /// Kept when the clone URL contains it; empty: everything.
    pub keyword: String,
    /// By registry label.
    pub credentials: HashMap<String, Credentials>,
}

/// One image found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SearchHit {
    pub user: String,
    pub name: String,
    pub tag: String,
    /// The label of the location (`walt`, `docker`, a registry).
    pub location: String,
    pub node_models: Vec<String>,
    pub clone_url: String,
    /// `walt.server.minversion`, when the image has it.
    pub server_minversion: Option<u32>,
}

impl SearchHit {
    pub fn new(url: &CloneUrl, node_models: Vec<String>, server_minversion: Option<u32>) -> Self {
        Self {
            user: url.user.clone(),
            name: url.repository.clone(),
            tag: url.tag.clone(),
            location: url.location.label().to_string(),
            node_models,
            clone_url: url.to_string(),
            server_minversion,
        }
    }
}

/// What a search reports, as it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SearchEvent {
    Found(SearchHit),
    /// A source was skipped, or answered only in part.
    Warning(String),
}

pub(crate) type Events = Reporter<SearchEvent>;

/// What search needs of an image config.
#[derive(Debug, Clone)]
struct WaltLabels {
    models: Vec<String>,
    minversion: Option<u32>,
}

/// What a tag pointed to at the last search: (manifest digest, labels of
/// that image).
type TagEntry = (Digest, Option<Arc<WaltLabels>>);

/// What searches remember across calls, one per server: image configs by
/// digest (they never change), and what each tag pointed to, only a hint
/// for a conditional request (never answered without asking the registry).
#[derive(Default)]
pub struct Caches {
    /// Parsed configs by digest; `None`: not a walt image.
    configs: Mutex<HashMap<Digest, Option<Arc<WaltLabels>>>>,
    /// `<registry URL> <repo>:<tag>` -> what it pointed to.
    tags: Mutex<HashMap<String, TagEntry>>,
}

impl Caches {
    fn config(&self, digest: &Digest) -> Option<Option<Arc<WaltLabels>>> {
        self.configs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(digest)
            .cloned()
    }

    fn remember_config(&self, digest: &Digest, labels: Option<Arc<WaltLabels>>) {
        let mut c = self.configs.lock().unwrap_or_else(|e| e.into_inner());
        if c.len() >= MAX_CACHED_CONFIGS {
            c.clear();
        }
        c.insert(digest.clone(), labels);
    }

    fn tag(&self, key: &str) -> Option<TagEntry> {
        self.tags
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .cloned()
    }

    fn remember_tag(&self, key: String, manifest_digest: Digest, labels: Option<Arc<WaltLabels>>) {
        let mut c = self.tags.lock().unwrap_or_else(|e| e.into_inner());
        if c.len() >= MAX_CACHED_TAGS && !c.contains_key(&key) {
            c.clear();
        }
        c.insert(key, (manifest_digest, labels));
    }
}

/// The walt labels of a config document (`None`: not a walt image).
fn parse_labels(bytes: &[u8]) -> Option<Arc<WaltLabels>> {
    let config: ImageConfig = serde_json::from_slice(bytes).ok()?;
    let models = parse_models(config.label(LABEL_NODE_MODELS)?);
    if models.is_empty() {
        return None;
    }
    let minversion = config
        .label(LABEL_SERVER_MINVERSION)
        .and_then(|v| v.trim().parse().ok());
    Some(Arc::new(WaltLabels { models, minversion }))
}

async fn send(events: &Events, event: SearchEvent) {
    events.send(event).await
}

fn result(url: &CloneUrl, labels: &WaltLabels) -> SearchEvent {
    SearchEvent::Found(SearchHit::new(
        url,
        labels.models.clone(),
        labels.minversion,
    ))
}

/// Runs a search for `user`, sending results and warnings on `events`.
pub(crate) async fn run(state: Arc<State>, user: String, req: SearchRequest, events: Events) {
    let started = std::time::Instant::now();
    let keyword = req.keyword.trim().to_string();
    let config = state.config();
    // The request (and the credentials it holds) lives for this call only:
    // nothing below keeps it once the search ends.
    let mut sources = FuturesUnordered::new();
    sources.push(Box::pin(search_store(
        state.clone(),
        user.clone(),
        keyword.clone(),
        events.clone(),
    )) as std::pin::Pin<Box<dyn Future<Output = ()> + Send>>);
    sources.push(Box::pin(crate::docker::search(
        crate::docker::client(&config),
        keyword.clone(),
        events.clone(),
    )));
    for reg in &config.registries {
        let reg = match reg {
            Registry::V2(reg) => reg,
            Registry::Hub(hub) => {
                sources.push(Box::pin(search_hub(
                    hub.clone(),
                    req.credentials.get("hub").cloned(),
                    keyword.clone(),
                    events.clone(),
                )));
                continue;
            }
        };
        // Credentials only for a registry configured to take them.
        let creds = match reg.auth {
            Auth::Basic => req.credentials.get(&reg.label).cloned(),
            Auth::None => None,
        };
        sources.push(Box::pin(search_registry(
            state.search_caches.clone(),
            reg.clone(),
            creds,
            keyword.clone(),
            events.clone(),
        )));
    }
    for s in &config.skipped {
        send(&events, SearchEvent::Warning(s.warning())).await;
    }
    while sources.next().await.is_some() {}
    let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
    tracing::info!(user = %user, keyword = %keyword, elapsed_ms, "search finished");
}

/// Other users' images in the store.
async fn search_store(state: Arc<State>, user: String, keyword: String, events: Events) {
    let (store, caches) = (state.store.clone(), state.search_caches.clone());
    let found = blocking(move || {
        let mut out = Vec::new();
        for rec in store.list_images(None)? {
            if rec.name.owner == user {
                continue;
            }
            let url = CloneUrl {
                location: Location::Walt,
                user: rec.name.owner.clone(),
                repository: rec.name.name.clone(),
                tag: rec.name.tag.clone(),
            };
            if !url.to_string().contains(&keyword) {
                continue;
            }
            let labels = match caches.config(&rec.config_digest) {
                Some(l) => l,
                None => {
                    let l = store
                        .read_blob(&rec.config_digest)
                        .ok()
                        .and_then(|b| parse_labels(&b));
                    caches.remember_config(&rec.config_digest, l.clone());
                    l
                }
            };
            // The store keeps walt images only; trust its record for the models.
            let labels = WaltLabels {
                models: rec.node_models.clone(),
                minversion: labels.and_then(|l| l.minversion),
            };
            if labels.models.is_empty() {
                continue;
            }
            out.push(result(&url, &labels));
        }
        Ok(out)
    })
    .await;
    match found {
        Ok(results) => {
            for r in results {
                send(&events, r).await;
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "search: cannot list the store");
            send(
                &events,
                SearchEvent::Warning(format!("this server's images skipped: {e}")),
            )
            .await;
        }
    }
}

/// `reason` without a leading `registry '<label>'` (the warning names it).
fn reason(label: &str, e: &dyn std::fmt::Display) -> String {
    let msg = e.to_string().replace('\n', " ");
    let prefix = format!("registry '{label}'");
    let Some(rest) = msg.strip_prefix(&prefix) else {
        return msg;
    };
    // "registry 'x' (http://h:1) is unreachable: ..." -> "http://h:1 is unreachable: ..."
    if let Some(inner) = rest.trim_start().strip_prefix('(')
        && let Some((url, tail)) = inner.split_once(')')
    {
        return format!("{url}{tail}");
    }
    rest.trim_start_matches(':').trim().to_string()
}

/// Whether an error is about the registry itself (down, auth) rather than
/// about one image (missing, not for this platform, malformed).
fn registry_wide(e: &ServiceError) -> bool {
    matches!(
        e,
        ServiceError::Registry(
            RegistryError::Unreachable { .. }
                | RegistryError::Timeout { .. }
                | RegistryError::Tls { .. }
                | RegistryError::CredentialsRequired { .. }
                | RegistryError::Unauthorized { .. }
                | RegistryError::Server { .. }
                | RegistryError::Interrupted { .. }
                | RegistryError::Config { .. }
        )
    )
}

/// One docker-registry-v2 registry: catalog, tags of each `<user>/...`
/// repository, then the manifest and config of each tag.
async fn search_registry(
    caches: Arc<Caches>,
    reg: V2Registry,
    creds: Option<Credentials>,
    keyword: String,
    events: Events,
) {
    let label = reg.label.clone();
    let warn = |e: &dyn std::fmt::Display| {
        let msg = format!("registry '{label}' skipped: {}", reason(&label, e));
        tracing::info!("search: {msg}");
        msg
    };
    let client = match RegistryClient::for_v2(&reg, creds) {
        Ok(c) => c,
        Err(e) => return send(&events, SearchEvent::Warning(warn(&e))).await,
    };
    let repos = match tokio::time::timeout(CATALOG_TIMEOUT, client.catalog()).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return send(&events, SearchEvent::Warning(warn(&e))).await,
        Err(_) => {
            let e = format!("no catalog after {}s", CATALOG_TIMEOUT.as_secs());
            return send(&events, SearchEvent::Warning(warn(&e))).await;
        }
    };
    let pool = Arc::new(Semaphore::new(REGISTRY_CONCURRENCY));
    // First error that is about the registry rather than one image.
    let failure: Arc<Mutex<(usize, Option<String>)>> = Arc::default();
    let mut repo_tasks = FuturesUnordered::new();
    for repo in repos {
        let Some((user, name)) = repo.split_once('/') else {
            continue;
        };
        let (user, name) = (user.to_string(), name.to_string());
        let (client, pool, keyword, events, failure, caches) = (
            client.clone(),
            pool.clone(),
            keyword.clone(),
            events.clone(),
            failure.clone(),
            caches.clone(),
        );
        let label = label.clone();
        repo_tasks.push(async move {
            let tags = {
                let _permit = pool.acquire().await;
                client.tags(&repo).await
            };
            let tags = match tags {
                Ok(t) => t,
                Err(e) => {
                    let e = ServiceError::from(e);
                    note_failure(&failure, &label, &e);
                    return;
                }
            };
            let mut image_tasks = FuturesUnordered::new();
            for tag in tags {
                let Ok(url) = CloneUrl::parse(&format!("{label}:{user}/{name}:{tag}")) else {
                    tracing::debug!(registry = %label, repo = %repo, tag = %tag, "search: not a valid clone URL, skipped");
                    continue;
                };
                if !url.to_string().contains(&keyword) {
                    continue;
                }
                let (client, pool, events, failure, label, caches) = (
                    &client, &pool, &events, &failure, &label, &caches,
                );
                image_tasks.push(async move {
                    match inspect(caches, client, pool, &url).await {
                        Ok(Some(labels)) => send(events, result(&url, &labels)).await,
                        Ok(None) => {}
                        Err(e) => note_failure(failure, label, &e),
                    }
                });
            }
            while image_tasks.next().await.is_some() {}
        });
    }
    while repo_tasks.next().await.is_some() {}
    let (count, first) = std::mem::take(&mut *failure.lock().unwrap_or_else(|e| e.into_inner()));
    if let Some(first) = first {
        send(
            &events,
            SearchEvent::Warning(format!(
                "registry '{label}': {count} request(s) failed, results may be incomplete: {first}"
            )),
        )
        .await;
    }
}

fn note_failure(failure: &Mutex<(usize, Option<String>)>, label: &str, e: &ServiceError) {
    tracing::debug!(registry = %label, error = %e, "search: image skipped");
    if registry_wide(e) {
        let mut f = failure.lock().unwrap_or_else(|e| e.into_inner());
        f.0 += 1;
        if f.1.is_none() {
            f.1 = Some(reason(label, e));
        }
    }
}

/// The walt labels of the image at `url` (`None`: not a walt image).
///
/// A tag seen by an earlier search is revalidated with a conditional GET
/// (`If-None-Match: "<manifest digest>"`): an unchanged tag costs one
/// bodiless `304` and neither the manifest nor the config is fetched again;
/// a re-pushed tag gets its new manifest (and config) as usual.
async fn inspect(
    caches: &Caches,
    client: &RegistryClient,
    pool: &Semaphore,
    url: &CloneUrl,
) -> Result<Option<Arc<WaltLabels>>, ServiceError> {
    let path = url.path();
    let key = format!("{} {path}:{}", client.base_url(), url.tag);
    let known = caches.tag(&key);
    let (fetched, config_digest) = {
        let _permit = pool.acquire().await;
        let check = client
            .get_manifest_if_changed(&path, &url.tag, known.as_ref().map(|k| &k.0))
            .await?;
        let fetched = match (check, &known) {
            (ManifestCheck::Unchanged, Some((_, labels))) => return Ok(labels.clone()),
            (ManifestCheck::Unchanged, None) => {
                return Err(ServiceError::InvalidManifest {
                    registry: client.label().to_string(),
                    url: url.to_string(),
                    reason: "304 to an unconditional request".into(),
                });
            }
            (ManifestCheck::Changed(f), _) => f,
        };
        // A registry ignoring If-None-Match: same digest, same image.
        if let Some((digest, labels)) = &known
            && *digest == fetched.digest
        {
            return Ok(labels.clone());
        }
        let digest = fetched.digest.clone();
        let config = crate::clone::resolve_fetched(client, url, fetched)
            .await?
            .manifest
            .config
            .digest;
        (digest, config)
    };
    let labels = match caches.config(&config_digest) {
        Some(labels) => labels,
        None => {
            let bytes = {
                let _permit = pool.acquire().await;
                client
                    .get_blob_bytes(&path, &config_digest, MAX_CONFIG_SIZE)
                    .await?
            };
            let labels = parse_labels(&bytes);
            caches.remember_config(&config_digest, labels.clone());
            labels
        }
    };
    caches.remember_tag(key, fetched, labels.clone());
    Ok(labels)
}

/// The Docker hub: the users publishing a `walt_metadata` image (found
/// through the Hub's search API), then the images each one lists.
async fn search_hub(
    hub: walt_core::config::HubRegistry,
    creds: Option<Credentials>,
    keyword: String,
    events: Events,
) {
    use walt_registry::hub::{HubSearch, METADATA_REPO};
    let warn = |e: &dyn std::fmt::Display| {
        let msg = format!("registry 'hub' skipped: {}", reason("hub", e));
        tracing::info!("search: {msg}");
        msg
    };
    let (index, client) = match (
        HubSearch::for_hub(&hub),
        RegistryClient::for_hub(&hub, creds),
    ) {
        (Ok(i), Ok(c)) => (i, c),
        (Err(e), _) | (_, Err(e)) => return send(&events, SearchEvent::Warning(warn(&e))).await,
    };
    let repos = match tokio::time::timeout(CATALOG_TIMEOUT, index.repositories(METADATA_REPO)).await
    {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return send(&events, SearchEvent::Warning(warn(&e))).await,
        Err(_) => {
            let e = format!("no search results after {}s", CATALOG_TIMEOUT.as_secs());
            return send(&events, SearchEvent::Warning(warn(&e))).await;
        }
    };
    let pool = Arc::new(Semaphore::new(REGISTRY_CONCURRENCY));
    let failure: Arc<Mutex<(usize, Option<String>)>> = Arc::default();
    let mut tasks = FuturesUnordered::new();
    for repo in repos {
        let Some((user, name)) = repo.split_once('/') else {
            continue;
        };
        if name != METADATA_REPO {
            continue;
        }
        let user = user.to_string();
        let (client, pool, keyword, events, failure) =
            (&client, &pool, &keyword, &events, &failure);
        tasks.push(async move {
            let metadata = {
                let _permit = pool.acquire().await;
                client.read_walt_metadata(&user).await
            };
            let metadata = match metadata {
                Ok(Some(m)) => m,
                Ok(None) => return,
                Err(e) => return note_failure(failure, "hub", &ServiceError::from(e)),
            };
            for (name, tag, entry) in crate::hub::listed(&metadata) {
                let Ok(url) = CloneUrl::parse(&format!("hub:{user}/{name}:{tag}")) else {
                    continue;
                };
                if !url.to_string().contains(keyword.as_str()) {
                    continue;
                }
                let models = entry
                    .labels
                    .get(LABEL_NODE_MODELS)
                    .map(|m| parse_models(m))
                    .unwrap_or_default();
                if models.is_empty() {
                    continue;
                }
                let minversion = entry
                    .labels
                    .get(LABEL_SERVER_MINVERSION)
                    .and_then(|v| v.trim().parse().ok());
                send(events, result(&url, &WaltLabels { models, minversion })).await;
            }
        });
    }
    while tasks.next().await.is_some() {}
    let (count, first) = std::mem::take(&mut *failure.lock().unwrap_or_else(|e| e.into_inner()));
    if let Some(first) = first {
        send(
            &events,
            SearchEvent::Warning(format!(
                "registry 'hub': {count} request(s) failed, results may be incomplete: {first}"
            )),
        )
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels() {
        let l = parse_labels(
            br#"{"config":{"Labels":{"walt.node.models":"rpi-3-b, pc-x86-64","walt.server.minversion":"11"}},"rootfs":{"type":"layers","diff_ids":[]}}"#,
        )
        .unwrap();
        assert_eq!(l.models, ["rpi-3-b", "pc-x86-64"]);
        assert_eq!(l.minversion, Some(11));
        assert!(parse_labels(br#"{"config":{"Labels":{"other":"x"}},"rootfs":{}}"#).is_none());
        assert!(
            parse_labels(br#"{"config":{"Labels":{"walt.node.models":" "}},"rootfs":{}}"#)
                .is_none()
        );
        assert!(parse_labels(b"junk").is_none());
    }

    /// A one-repository registry whose `u/img:v1` can be re-pushed; counts
    /// the answers it sends by kind.
    struct FakeRegistry {
        base_url: String,
        /// (manifest, config) served for `u/img:v1`.
        image: Arc<Mutex<(Vec<u8>, Vec<u8>)>>,
        /// "manifest 200", "manifest 304", "blob 200"...
        answers: Arc<Mutex<Vec<&'static str>>>,
    }

    fn sha(data: &[u8]) -> String {
        use sha2::Digest;
        format!("sha256:{}", hex::encode(sha2::Sha256::digest(data)))
    }

    fn image(models: &str) -> (Vec<u8>, Vec<u8>) {
        let config = format!(
            r#"{{"architecture":"amd64","os":"linux","config":{{"Labels":{{"walt.node.models":"{models}"}}}},"rootfs":{{"type":"layers","diff_ids":[]}}}}"#
        )
        .into_bytes();
        let manifest = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":{}}},"layers":[]}}"#,
            sha(&config),
            config.len()
        )
        .into_bytes();
        (manifest, config)
    }

    async fn fake_registry(models: &str) -> FakeRegistry {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base_url = format!("http://{}", listener.local_addr().unwrap());
        let image = Arc::new(Mutex::new(image(models)));
        let answers: Arc<Mutex<Vec<&'static str>>> = Arc::default();
        let (img, ans) = (image.clone(), answers.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut conn, _)) = listener.accept().await else {
                    return;
                };
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&head).to_lowercase();
                let target = head.split(' ').nth(1).unwrap_or_default().to_string();
                let (manifest, config) = img.lock().unwrap().clone();
                let digest = sha(&manifest);
                let (status, kind, body, ctype) = if target == "/v2/u/img/manifests/v1" {
                    if head.contains(&format!("if-none-match: \"{digest}\"")) {
                        ("304 Not Modified", "manifest 304", Vec::new(), "")
                    } else {
                        let t = "application/vnd.oci.image.manifest.v1+json";
                        ("200 OK", "manifest 200", manifest, t)
                    }
                } else if target == format!("/v2/u/img/blobs/{}", sha(&config)) {
                    ("200 OK", "blob 200", config, "application/octet-stream")
                } else {
                    ("404 Not Found", "404", Vec::new(), "")
                };
                ans.lock().unwrap().push(kind);
                let mut out = format!(
                    "HTTP/1.1 {status}\r\nConnection: close\r\nDocker-Content-Digest: {digest}\r\nETag: \"{digest}\"\r\n"
                );
                if !ctype.is_empty() {
                    out.push_str(&format!("Content-Type: {ctype}\r\n"));
                }
                if !status.starts_with("304") {
                    out.push_str(&format!("Content-Length: {}\r\n", body.len()));
                }
                out.push_str("\r\n");
                let mut out = out.into_bytes();
                out.extend_from_slice(&body);
                let _ = conn.write_all(&out).await;
                let _ = conn.shutdown().await;
            }
        });
        FakeRegistry {
            base_url,
            image,
            answers,
        }
    }

    fn lab_client(reg: &FakeRegistry) -> RegistryClient {
        RegistryClient::new(walt_registry::ClientOptions::new(
            "lab",
            reg.base_url.clone(),
        ))
        .unwrap()
    }

    #[tokio::test]
    async fn a_retagged_image_shows_its_new_labels() {
        let reg = fake_registry("rpi-3-b").await;
        let client = lab_client(&reg);
        let pool = Semaphore::new(4);
        let caches = Caches::default();
        let url = CloneUrl::parse("lab:u/img:v1").unwrap();
        let models = |l: Option<Arc<WaltLabels>>| l.unwrap().models.clone();

        let first = inspect(&caches, &client, &pool, &url).await.unwrap();
        assert_eq!(models(first), ["rpi-3-b"]);
        assert_eq!(*reg.answers.lock().unwrap(), ["manifest 200", "blob 200"]);

        // unchanged: one conditional request, answered 304, nothing else
        let again = inspect(&caches, &client, &pool, &url).await.unwrap();
        assert_eq!(models(again), ["rpi-3-b"]);
        assert_eq!(reg.answers.lock().unwrap()[2..], ["manifest 304"]);

        // the tag is re-pushed with other labels: the next search sees them
        *reg.image.lock().unwrap() = image("pc-x86-64");
        let after = inspect(&caches, &client, &pool, &url).await.unwrap();
        assert_eq!(models(after), ["pc-x86-64"]);
        assert_eq!(
            reg.answers.lock().unwrap()[3..],
            ["manifest 200", "blob 200"]
        );
    }

    #[tokio::test]
    async fn two_servers_do_not_share_their_caches() {
        let reg = fake_registry("rpi-3-b").await;
        let client = lab_client(&reg);
        let pool = Semaphore::new(4);
        let url = CloneUrl::parse("lab:u/img:v1").unwrap();
        let (one, two) = (Caches::default(), Caches::default());
        inspect(&one, &client, &pool, &url).await.unwrap();
        // the second server has seen nothing: it asks unconditionally and
        // reads the config itself
        let labels = inspect(&two, &client, &pool, &url).await.unwrap();
        assert_eq!(labels.unwrap().models, ["rpi-3-b"]);
        assert_eq!(
            *reg.answers.lock().unwrap(),
            ["manifest 200", "blob 200", "manifest 200", "blob 200"]
        );
        // while the first one revalidates what it knows
        inspect(&one, &client, &pool, &url).await.unwrap();
        assert_eq!(reg.answers.lock().unwrap()[4..], ["manifest 304"]);
    }

    #[test]
    fn reasons() {
        let e = RegistryError::Unreachable {
            label: "lab".into(),
            url: "http://h:1".into(),
            reason: "refused".into(),
        };
        assert_eq!(reason("lab", &e), "http://h:1 is unreachable: refused");
        let e = RegistryError::CredentialsRequired {
            label: "lab".into(),
        };
        assert_eq!(reason("lab", &e), "requires credentials");
        assert_eq!(reason("lab", &"other"), "other");
    }
}
