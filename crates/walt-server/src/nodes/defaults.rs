//! Default images (`waltplatform/<model>-default:latest`): fetched once per
//! model however many nodes ask at once, and updated on request.
//!
//! Sources, in clone order: the hub when enabled, each docker-registry-v2
//! registry of server.conf in order, then the Docker daemon; always
//! anonymously (a registry that wants credentials is skipped, and the log
//! says so). From a multi-platform index the model's platform is taken
//! (`walt_core::models::model_platforms`; a model walt does not know gets
//! this server's platform). The layers go through clone's pipeline (same
//! import, bounds and verification); the image must list the model in its
//! `walt.node.models` label.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::watch;

use walt_core::models::{Platform, default_image_name, model_platforms, parse_models};
use walt_core::name::is_valid_component;
use walt_core::{DEFAULT_IMAGES_OWNER, ImageName, LABEL_NODE_MODELS};
use walt_registry::RegistryClient;

use crate::State;
use crate::accept::{self, Accepted};
use crate::clone::{self, BaseSource, Candidate, Remote};
use crate::error::ServiceError;
use crate::images::blocking;

/// Models whose default image may be in flight at once (models come from
/// DHCP requests: bounded).
const MAX_IN_FLIGHT: usize = 32;

/// Longest wait for the Docker daemon's details of an image.
const DOCKER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// What a fetch ended with: the image, or the line saying why not.
type Outcome = Result<ImageName, String>;

/// Fetches in flight, by model, and the one update running.
#[derive(Default)]
pub struct Defaults {
    /// The outcome of each model's running fetch; callers arriving while it
    /// runs wait for it. Removed when the fetch ends, so that the next call
    /// after a failure tries again.
    in_flight: Mutex<HashMap<String, watch::Receiver<Option<Outcome>>>>,
    /// `update-default-images` runs one at a time.
    updating: tokio::sync::Mutex<()>,
}

/// Makes sure the default image of `model` is in the store, fetching it
/// if needed (one fetch per model at a time; concurrent callers wait for
/// it). Err: one line naming every source tried and why it failed.
pub async fn ensure(state: &Arc<State>, model: &str) -> Result<ImageName, String> {
    let target = default_image_name(model);
    if !is_valid_component(&target.name) {
        return Err(format!(
            "model '{model}' cannot have a default image: its name is not a valid image name"
        ));
    }
    // A fetch in flight is joined without reading the store (which the
    // other leases of a burst keep busy); the fetch checks it first.
    let running = state
        .nodes
        .defaults
        .in_flight
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(model)
        .cloned();
    if running.is_none() && stored(state, &target).await? {
        return Ok(target);
    }
    let mut rx = if let Some(rx) = running {
        rx
    } else {
        let mut map = state
            .nodes
            .defaults
            .in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match map.get(model) {
            Some(rx) => rx.clone(),
            None => {
                if map.len() >= MAX_IN_FLIGHT {
                    return Err(format!(
                        "cannot download the default image of {model} now: {MAX_IN_FLIGHT} default images are being downloaded already; the next lease retries"
                    ));
                }
                let (tx, rx) = watch::channel(None);
                map.insert(model.to_string(), rx.clone());
                // Its own task: the fetch goes on for the others when the
                // caller that started it goes away.
                let (state, model, target) = (state.clone(), model.to_string(), target.clone());
                tokio::spawn(async move {
                    // The entry goes however the task ends (even by a
                    // panic), before the outcome is sent: a later call
                    // finds the image stored, or starts a new fetch.
                    let entry = InFlight {
                        state: state.clone(),
                        model: model.clone(),
                    };
                    let outcome = tokio::select! {
                        o = fetch(&state, &model, &target) => o,
                        _ = state.shutdown.cancelled() => {
                            Err(format!("download of the default image of {model} stopped: the server is shutting down"))
                        }
                    };
                    if let Ok(image) = &outcome {
                        adopt_waiting(&state, &model, image).await;
                    }
                    drop(entry);
                    let _ = tx.send(Some(outcome));
                });
                rx
            }
        }
    };
    match rx.wait_for(Option::is_some).await {
        Ok(outcome) => outcome
            .clone()
            .unwrap_or_else(|| Err(format!("download of the default image of {model} lost"))),
        Err(_) => Err(format!(
            "download of the default image of {model} stopped before it ended"
        )),
    }
}

/// A model's entry in [`Defaults::in_flight`], removed when dropped.
struct InFlight {
    state: Arc<State>,
    model: String,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.state
            .nodes
            .defaults
            .in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.model);
    }
}

/// Whether `name` is in the store.
/// The devices of `model` that waited for its default image become nodes
/// booting it, in one store transaction (a burst of fifty new nodes costs
/// one write, not fifty), and serving catches up once.
async fn adopt_waiting(state: &Arc<State>, model: &str, image: &ImageName) {
    let (store, m, img) = (state.store.clone(), model.to_string(), image.clone());
    match blocking(move || Ok(store.make_nodes_of_model(&m, &img)?)).await {
        Ok(names) if names.is_empty() => {}
        Ok(names) => {
            for n in &names {
                tracing::info!(name = %n, "node {n} registered, booting {image}");
            }
            state.nodes.changed();
        }
        Err(e) => tracing::error!(model, "cannot record the nodes of {model}: {e}"),
    }
}

async fn stored(state: &Arc<State>, name: &ImageName) -> Result<bool, String> {
    let (store, n) = (state.store.clone(), name.clone());
    blocking(move || Ok(store.get_image(&n)?.is_some()))
        .await
        .map_err(|e| format!("cannot read the image store: {e}"))
}

/// The models `config`'s `walt.node.models` label lists, if `model` is
/// among them; else why the image cannot be `model`'s default.
fn models_for(label: Option<&str>, model: &str) -> Result<Vec<String>, String> {
    let models = label.map(parse_models).unwrap_or_default();
    if models.is_empty() {
        return Err("not a walt image (no walt.node.models label)".into());
    }
    if !models.iter().any(|m| m == model) {
        return Err(format!(
            "its walt.node.models label ({}) does not list {model}",
            models.join(",")
        ));
    }
    Ok(models)
}

/// The default image's path and tag on the sources.
fn remote_path(target: &ImageName) -> String {
    format!("{DEFAULT_IMAGES_OWNER}/{}", target.name)
}

/// Why a source was passed over, and whether it asked for credentials.
struct Skip {
    reason: String,
    credentials: bool,
}

impl From<String> for Skip {
    fn from(reason: String) -> Self {
        Self {
            reason,
            credentials: false,
        }
    }
}

/// A registry client for `source` (anonymous); None for the Docker daemon.
fn registry_client(source: BaseSource<'_>) -> Result<Option<RegistryClient>, Skip> {
    match source {
        BaseSource::Hub(None) => Err("not enabled".to_string().into()),
        BaseSource::Hub(Some(hub)) => RegistryClient::for_hub(hub, None)
            .map(Some)
            .map_err(|e| e.to_string().into()),
        BaseSource::Registry(reg) => RegistryClient::for_v2(reg, None)
            .map(Some)
            .map_err(|e| e.to_string().into()),
        BaseSource::Docker => Ok(None),
    }
}

/// The default image of `model` on a registry: manifest (index resolved
/// to the model's platform) and config, checked for the model.
async fn find_on_registry(
    client: RegistryClient,
    label: &str,
    hub: bool,
    target: &ImageName,
    model: &str,
    wanted: Option<&[Platform]>,
) -> Result<(Candidate, Vec<String>), Skip> {
    let remote = Remote::at(label, &remote_path(target), &target.tag);
    let fetched = match client.get_manifest(&remote.path, &remote.reference).await {
        Ok(f) => f,
        Err(e) => {
            use walt_registry::RegistryError as E;
            let credentials = !hub
                && matches!(
                    e,
                    E::CredentialsRequired { .. } | E::Unauthorized { .. } | E::Denied { .. }
                );
            return Err(Skip {
                reason: clone::skip_reason_for(&e, hub, "default images"),
                credentials,
            });
        }
    };
    let candidate = clone::open_candidate(client, remote, fetched, wanted)
        .await
        .map_err(|e| e.to_string())?;
    let models = models_for(candidate.config().label(LABEL_NODE_MODELS), model)?;
    Ok((candidate, models))
}

/// What a successful fetch reports.
struct Fetched {
    url: String,
    size: u64,
}

/// Tries one source; the image is recorded when it succeeds.
async fn try_source(
    state: &Arc<State>,
    label: &str,
    source: BaseSource<'_>,
    target: &ImageName,
    model: &str,
    wanted: Option<&[Platform]>,
) -> Result<Fetched, Skip> {
    let hub = matches!(source, BaseSource::Hub(_));
    let Some(client) = registry_client(source)? else {
        return from_docker(state, target, model).await.map_err(Skip::from);
    };
    let (candidate, models) = find_on_registry(client, label, hub, target, model, wanted).await?;
    let (url, size) = (candidate.url().to_string(), candidate.size());
    clone::record_candidate(state, candidate, target, models)
        .await
        .map_err(|e| e.to_string())?;
    Ok(Fetched { url, size })
}

/// The default image from the Docker daemon (as `docker save` streams it).
async fn from_docker(
    state: &Arc<State>,
    target: &ImageName,
    model: &str,
) -> Result<Fetched, String> {
    let config = state.config();
    let name = format!("{}:{}", remote_path(target), target.tag);
    let (client, _) = crate::docker::find_base(&config, &name).await?;
    // Refused before anything is read when the label says so already.
    if let Ok(Ok(info)) = tokio::time::timeout(DOCKER_TIMEOUT, client.inspect(&name)).await {
        models_for(info.label(LABEL_NODE_MODELS), model)?;
    }
    let url = format!("docker:{name}");
    let store = &state.store;
    let (events, _) = clone::Events::channel(1);
    let recorded = accept::or_collect(store, async {
        let saved = crate::docker::save(store, &client, &name, &events).await?;
        let models = match models_for(saved.parsed.label(LABEL_NODE_MODELS), model) {
            Ok(m) => m,
            Err(reason) => {
                accept::release(saved.guard).await;
                return Err(ServiceError::InvalidImage {
                    url: url.clone(),
                    reason,
                });
            }
        };
        let image = Accepted {
            config: saved.config,
            config_digest: None,
            manifest: accept::Manifest::Written,
            layers: saved.layers,
            models,
        };
        accept::record(store, saved.guard, target, true, image).await?;
        Ok(saved.received)
    })
    .await;
    match recorded {
        Ok(size) => Ok(Fetched { url, size }),
        // The label refusal already says what is wrong with which image.
        Err(ServiceError::InvalidImage { reason, .. }) => Err(reason),
        Err(e) => Err(e.to_string()),
    }
}

/// One fetch of `model`'s default image: each source in turn until one
/// has it. Logs what it does; Err is the line saying why no source would do.
async fn fetch(state: &Arc<State>, model: &str, target: &ImageName) -> Outcome {
    // The last fetch may have ended between the caller's check and this one.
    if stored(state, target).await? {
        return Ok(target.clone());
    }
    let started = Instant::now();
    tracing::info!(model, image = %target, "trying to download the default image of {model}");
    let wanted = model_platforms(model);
    let config = state.config();
    let mut failed: Vec<String> = Vec::new();
    for (label, source) in clone::base_sources(&config) {
        match try_source(state, &label, source, target, model, wanted).await {
            Ok(done) => {
                let secs = started.elapsed().as_secs_f64();
                tracing::info!(
                    model,
                    image = %target,
                    source = %done.url,
                    size = done.size,
                    "default image of {model} downloaded from {} ({}, {secs:.1}s)",
                    done.url,
                    clone::human_size(done.size)
                );
                return Ok(target.clone());
            }
            Err(skip) => {
                if skip.credentials {
                    tracing::warn!(
                        model,
                        registry = %label,
                        "registry '{label}' skipped for the default image of {model}: {}",
                        skip.reason
                    );
                } else {
                    tracing::info!(model, source = %label, "default image of {model} not taken from {label}: {}", skip.reason);
                }
                failed.push(format!("{label}: {}", skip.reason));
            }
        }
    }
    let line = format!(
        "cannot download the default image of {model} ({target}): {}; new {model} nodes stay unknown until this is solved",
        failed.join("; ")
    );
    tracing::error!(model, "{line}");
    Err(line)
}

// ----- walt advanced update-default-images -----

/// An RFC 3339 time (`2024-05-01T10:20:30.123456789Z`, or with an offset)
/// as (seconds, nanoseconds) since the epoch; None if it is not one.
pub(crate) fn parse_time(text: &str) -> Option<(i64, u32)> {
    let t = text.trim().as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let s = t.get(r)?;
        if s.is_empty() || !s.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(s).ok()?.parse().ok()
    };
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, min, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if t.get(4) != Some(&b'-')
        || t.get(7) != Some(&b'-')
        || !matches!(t.get(10), Some(b'T' | b't' | b' '))
        || t.get(13) != Some(&b':')
        || t.get(16) != Some(&b':')
        || !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || min > 59
        || sec > 60
    {
        return None;
    }
    let mut i = 19;
    let mut nanos: u32 = 0;
    if t.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while t.get(i).is_some_and(u8::is_ascii_digit) {
            if i - start < 9 {
                nanos = nanos * 10 + u32::from(t[i] - b'0');
            }
            i += 1;
        }
        if i == start {
            return None;
        }
        for _ in (i - start)..9 {
            nanos *= 10;
        }
    }
    let offset = match t.get(i..)? {
        b"Z" | b"z" => 0,
        [sign @ (b'+' | b'-'), ..] if t.len() == i + 6 && t[i + 3] == b':' => {
            let (h, m) = (num(i + 1..i + 3)?, num(i + 4..i + 6)?);
            let off = h * 3600 + m * 60;
            if *sign == b'+' { off } else { -off }
        }
        _ => return None,
    };
    let days = walt_core::civil::days_from_civil(year, month, day);
    Some((days * 86_400 + hour * 3600 + min * 60 + sec - offset, nanos))
}

/// A newer default image found on a source.
enum Newer {
    Registry(Box<Candidate>, Vec<String>),
    Docker,
}

/// `update-default-images`: `say` gets the lines for the user.
pub async fn update_all(
    state: &Arc<State>,
    say: &(dyn Fn(String) + Send + Sync),
) -> Result<(), ServiceError> {
    let _one = state.nodes.defaults.updating.lock().await;
    let store = state.store.clone();
    let defaults: Vec<(ImageName, Vec<u8>)> = blocking(move || {
        let mut out = Vec::new();
        for rec in store.list_images(Some(DEFAULT_IMAGES_OWNER))? {
            if rec.name.tag == "latest" && rec.name.name.ends_with("-default") {
                let config = store.read_blob(&rec.config_digest)?;
                out.push((rec.name, config));
            }
        }
        Ok(out)
    })
    .await?;
    if defaults.is_empty() {
        say("No default image is stored: nothing to update.".into());
        return Ok(());
    }
    let mut updated = false;
    for (target, config) in defaults {
        let Some(model) = target.name.strip_suffix("-default") else {
            continue;
        };
        let created = serde_json::from_slice::<walt_core::oci::ImageConfig>(&config)
            .ok()
            .and_then(|c| c.created)
            .and_then(|c| parse_time(&c));
        if update_one(state, &target, model, created, say).await? {
            updated = true;
        }
    }
    if updated {
        // Nodes booting the updated images remount them.
        state.nodes.changed();
    }
    Ok(())
}

/// Looks on every source for a default image of `model` created strictly
/// after `created` (any, when the stored one says nothing), and fetches the
/// newest. Whether it was updated.
async fn update_one(
    state: &Arc<State>,
    target: &ImageName,
    model: &str,
    created: Option<(i64, u32)>,
    say: &(dyn Fn(String) + Send + Sync),
) -> Result<bool, ServiceError> {
    let wanted = model_platforms(model);
    let config = state.config();
    let mut best: Option<((i64, u32), String, Newer)> = None;
    let newer = |t: Option<(i64, u32)>, best: &Option<((i64, u32), String, Newer)>| {
        t.filter(|t| created.is_none_or(|c| *t > c))
            .filter(|t| best.as_ref().is_none_or(|(b, _, _)| t > b))
    };
    for (label, source) in clone::base_sources(&config) {
        let client = match registry_client(source) {
            Ok(c) => c,
            Err(_) => continue,
        };
        let Some(client) = client else {
            let name = format!("{}:{}", remote_path(target), target.tag);
            if let Some(t) = newer(docker_created(&config, &name, model).await, &best) {
                best = Some((t, format!("docker:{name}"), Newer::Docker));
            }
            continue;
        };
        let hub = matches!(source, BaseSource::Hub(_));
        match find_on_registry(client, &label, hub, target, model, wanted).await {
            Ok((candidate, models)) => {
                let t = candidate.config().created.as_deref().and_then(parse_time);
                if let Some(t) = newer(t, &best) {
                    let url = candidate.url().to_string();
                    best = Some((t, url, Newer::Registry(Box::new(candidate), models)));
                }
            }
            Err(skip) => {
                if !skip.reason.starts_with("not found") && skip.reason != "not enabled" {
                    say(format!("warning: {label} skipped: {}", skip.reason));
                }
            }
        }
    }
    let shown = format!("{target}");
    let Some((_, url, found)) = best else {
        say(format!("No update available for {shown}."));
        return Ok(false);
    };
    say(format!("Updating {shown} from {url}..."));
    match found {
        Newer::Registry(candidate, models) => {
            clone::record_candidate(state, *candidate, target, models).await?;
        }
        Newer::Docker => {
            from_docker(state, target, model).await.map_err(|reason| {
                ServiceError::InvalidImage {
                    url: url.clone(),
                    reason,
                }
            })?;
        }
    }
    tracing::info!(image = %target, source = %url, "default image updated");
    say(format!("Image {shown} updated from {url}."));
    Ok(true)
}

/// When the Docker daemon's `name` was created, if it has it and it is a
/// default image of `model`.
async fn docker_created(
    config: &walt_core::config::ServerConfig,
    name: &str,
    model: &str,
) -> Option<(i64, u32)> {
    let client = crate::docker::client(config);
    let info = tokio::time::timeout(DOCKER_TIMEOUT, client.inspect(name))
        .await
        .ok()?
        .ok()?;
    models_for(info.label(LABEL_NODE_MODELS), model).ok()?;
    info.created.as_ref()?.as_str().and_then(parse_time)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_times() {
        assert_eq!(parse_time("1970-01-01T00:00:00Z"), Some((0, 0)));
        assert_eq!(parse_time("2024-05-01T10:20:30Z"), Some((1_714_558_830, 0)));
        assert_eq!(
            parse_time("2024-05-01T12:20:30.5+02:00"),
            Some((1_714_558_830, 500_000_000))
        );
        assert_eq!(
            parse_time("2024-05-01T10:20:30.123456789123Z"),
            Some((1_714_558_830, 123_456_789))
        );
        assert!(parse_time("2024-05-01T10:20:31Z") > parse_time("2024-05-01T10:20:30.999Z"));
        for bad in [
            "",
            "2024-05-01",
            "2024-13-01T00:00:00Z",
            "2024-05-01T10:20:30",
            "2024-05-01T10:20:30.Z",
            "2024-05-01T10:20:30+0200",
            "x024-05-01T10:20:30Z",
        ] {
            assert_eq!(parse_time(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_label_must_list_the_model() {
        assert_eq!(
            models_for(Some("rpi-3-b,rpi-4-b"), "rpi-4-b").unwrap(),
            ["rpi-3-b", "rpi-4-b"]
        );
        assert_eq!(
            models_for(Some("pc-x86-64"), "rpi-b").unwrap_err(),
            "its walt.node.models label (pc-x86-64) does not list rpi-b"
        );
        assert!(
            models_for(None, "rpi-b")
                .unwrap_err()
                .contains("no walt.node.models")
        );
    }
}
