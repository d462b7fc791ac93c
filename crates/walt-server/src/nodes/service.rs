//! The `Nodes` gRPC service: `walt node show/boot/rename`, `walt device
//! show`, the welcome call that gives users the default images of the
//! models present, and `walt advanced update-default-images`.
//!
//! Ownership is WalT's: a node belongs to the owner of the image it boots;
//! a node booting an image of `waltplatform` (a default image) is free.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use futures::Stream;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status};

use walt_core::models::{default_image_name, is_valid_device_name};
use walt_core::oci::ImageConfig;
use walt_core::{DEFAULT_IMAGES_OWNER, ImageName, LABEL_PREFERRED_NAME, compact_models};
use walt_proto::v1::{self as pb, nodes_server};
use walt_store::{Device, DeviceKind, StoreError};

use crate::State;
use crate::error::ServiceError;
use crate::images::{blocking, caller};

/// Longest node set accepted (a comma list of names).
const MAX_NODE_SET_LEN: usize = 64 * 1024;

/// Users remembered by the welcome cache (names come from the requests:
/// past this many, it starts again empty).
const MAX_WELCOME_USERS: usize = 4096;

/// Users whose default images were already checked since the last change
/// of the models present: for them, a welcome call costs one hash lookup.
#[derive(Default)]
pub struct WelcomeCache {
    inner: Mutex<WelcomeState>,
    /// Serialises the (rare) slow path: two calls of one user never copy
    /// the same image twice.
    work: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct WelcomeState {
    /// The models present when last read.
    models: Vec<String>,
    /// False once nodes may have changed since: read them again.
    fresh: bool,
    /// Users already given every default image of `models`.
    users: HashSet<String>,
}

impl WelcomeCache {
    /// The nodes may have changed: the next welcome call of each user reads
    /// the models present again (and forgets the users checked if they
    /// changed).
    pub fn invalidate(&self) {
        self.lock().fresh = false;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, WelcomeState> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `user` was checked against the models present (as last read).
    fn done(&self, user: &str) -> bool {
        let s = self.lock();
        s.fresh && s.users.contains(user)
    }

    /// Records the models present now; forgets the users if they changed.
    fn set_models(&self, models: Vec<String>) {
        let mut s = self.lock();
        if s.models != models {
            s.users.clear();
            s.models = models;
        }
        s.fresh = true;
    }

    fn mark(&self, user: &str, models: &[String]) {
        let mut s = self.lock();
        // Only if nothing changed meanwhile.
        if s.fresh && s.models == models {
            if s.users.len() >= MAX_WELCOME_USERS {
                s.users.clear();
            }
            s.users.insert(user.to_string());
        }
    }
}

pub struct NodesService {
    state: Arc<State>,
}

impl NodesService {
    pub fn new(state: Arc<State>) -> Self {
        Self { state }
    }
}

/// `img` for `img:latest`, else `img:tag`.
fn short_image(name: &ImageName) -> String {
    name.short()
}

fn device_info(d: &Device) -> pb::DeviceInfo {
    let (image_owner, image, link) = match &d.image {
        Some(i) => (
            i.owner.clone(),
            short_image(i),
            format!("walt:{}/{}", i.owner, short_image(i)),
        ),
        None => Default::default(),
    };
    pb::DeviceInfo {
        name: d.name.clone(),
        r#type: d.kind.as_str().to_string(),
        model: d.model.clone().unwrap_or_default(),
        image_owner,
        image,
        ip: d.ip.clone().unwrap_or_default(),
        mac: d.mac.clone(),
        reason: d.reason.clone().unwrap_or_default(),
        clonable_image_link: link,
    }
}

/// Who a node belongs to, as WalT sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owner {
    Caller,
    Free,
    Other,
}

fn owner_of(d: &Device, user: &str) -> Owner {
    match d.image.as_ref().map(|i| i.owner.as_str()) {
        Some(o) if o == user => Owner::Caller,
        Some(DEFAULT_IMAGES_OWNER) | None => Owner::Free,
        Some(_) => Owner::Other,
    }
}

/// `a`, `a and b`, `a, b and c`.
pub(crate) fn list_names<S: AsRef<str>>(names: &[S]) -> String {
    match names {
        [] => String::new(),
        [one] => one.as_ref().to_string(),
        [init @ .., last] => format!(
            "{} and {}",
            init.iter()
                .map(AsRef::as_ref)
                .collect::<Vec<_>>()
                .join(", "),
            last.as_ref()
        ),
    }
}

/// `Node a` / `Nodes a and b`.
pub(crate) fn nodes_phrase<S: AsRef<str>>(names: &[S]) -> String {
    format!(
        "{} {}",
        if names.len() == 1 { "Node" } else { "Nodes" },
        list_names(names)
    )
}

/// The nodes of a node set: names (or MACs, addresses), `all` (or
/// `all-nodes`), `my-nodes` (booting the caller's images) and
/// `free-nodes` (booting a default image), comma-separated; each node once,
/// by name.
pub(crate) fn resolve_node_set(
    state: &State,
    user: &str,
    node_set: &str,
) -> Result<Vec<Device>, ServiceError> {
    let node_set = node_set.trim();
    if node_set.is_empty() {
        return Err(ServiceError::InvalidArgument(
            "no node given (a node name, a comma-separated list, my-nodes or all)".into(),
        ));
    }
    if node_set.len() > MAX_NODE_SET_LEN {
        return Err(ServiceError::InvalidArgument(format!(
            "node set too long ({} bytes, at most {MAX_NODE_SET_LEN})",
            node_set.len()
        )));
    }
    let devices = state.store.list_devices()?;
    let nodes = || devices.iter().filter(|d| d.kind == DeviceKind::Node);
    let mut by_key: HashMap<&str, &Device> = HashMap::with_capacity(devices.len() * 3);
    // Addresses and MACs first: a name wins over them.
    for d in &devices {
        if let Some(ip) = &d.ip {
            by_key.insert(ip, d);
        }
        by_key.insert(&d.mac, d);
    }
    for d in &devices {
        by_key.insert(&d.name, d);
    }
    let mut chosen: BTreeMap<String, Device> = BTreeMap::new();
    for part in node_set.split(',').map(str::trim) {
        let found: Vec<&Device> = match part {
            "" => continue,
            "all" | "all-nodes" => nodes().collect(),
            "my-nodes" => nodes()
                .filter(|d| owner_of(d, user) == Owner::Caller)
                .collect(),
            "free-nodes" => nodes()
                .filter(|d| owner_of(d, user) == Owner::Free)
                .collect(),
            name => {
                let d = by_key.get(name).copied().or_else(|| {
                    let mac = walt_core::models::normalize_mac(name)?;
                    by_key.get(mac.as_str()).copied()
                });
                match d {
                    None => {
                        return Err(ServiceError::NotFound(format!(
                            "no node named '{name}' (see walt node show --all)"
                        )));
                    }
                    Some(d) if d.kind != DeviceKind::Node => {
                        return Err(ServiceError::FailedPrecondition(format!(
                            "device '{}' is not a node{} (see walt device show)",
                            d.name,
                            d.reason
                                .as_deref()
                                .map(|r| format!(": {r}"))
                                .unwrap_or_default()
                        )));
                    }
                    Some(d) => vec![d],
                }
            }
        };
        for d in found {
            chosen.insert(d.name.clone(), d.clone());
        }
    }
    if chosen.is_empty() {
        return Err(ServiceError::NotFound(format!(
            "no node matches '{node_set}' (see walt node show --all)"
        )));
    }
    Ok(chosen.into_values().collect())
}

/// `walt node boot`: what to do, decided before anything changes.
fn boot(
    state: &State,
    user: &str,
    req: &pb::NodeBootRequest,
) -> Result<pb::NodeBootReply, ServiceError> {
    let nodes = resolve_node_set(state, user, &req.node_set)?;
    let image = req.image.trim();
    let is_default = image == "default";
    let mut shown = image.to_string();
    // The image each node will boot.
    let mut targets: Vec<(Device, ImageName)> = Vec::with_capacity(nodes.len());
    if is_default {
        for n in nodes {
            let model = n.model.clone().unwrap_or_default();
            let default = default_image_name(&model);
            if state.store.get_image(&default)?.is_none() {
                return Err(ServiceError::FailedPrecondition(format!(
                    "the default image of model {model} (node {}) is not on this server",
                    n.name
                )));
            }
            targets.push((n, default));
        }
    } else {
        let name = ImageName::parse_user(user, image)?;
        let rec = state
            .store
            .get_image(&name)?
            .ok_or_else(|| ServiceError::NoSuchImage {
                image: name.short(),
            })?;
        // Incompatible models, with their nodes.
        let mut bad: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for n in &nodes {
            let model = n.model.clone().unwrap_or_default();
            if !rec.node_models.contains(&model) {
                bad.entry(model).or_default().push(n.name.clone());
            }
        }
        if !bad.is_empty() {
            let what: Vec<String> = bad
                .iter()
                .map(|(model, names)| {
                    format!(
                        "{model} ({} {})",
                        if names.len() == 1 { "node" } else { "nodes" },
                        list_names(names)
                    )
                })
                .collect();
            return Err(ServiceError::FailedPrecondition(format!(
                "image '{}' is not compatible with node model{} {}: it supports {}",
                name.short(),
                if bad.len() == 1 { "" } else { "s" },
                what.join(", "),
                compact_models(&rec.node_models)
            )));
        }
        shown = name.short();
        targets.extend(nodes.into_iter().map(|n| (n, name.clone())));
    }
    // Nodes of other users are taken only once the caller confirmed.
    let others: Vec<String> = targets
        .iter()
        .filter(|(n, t)| owner_of(n, user) == Owner::Other && n.image.as_ref() != Some(t))
        .map(|(n, _)| n.name.clone())
        .collect();
    if !others.is_empty() && !req.confirmed {
        return Ok(pb::NodeBootReply {
            message: String::new(),
            owned_by_others: others,
        });
    }
    let (already, change): (Vec<_>, Vec<_>) = targets
        .into_iter()
        .partition(|(n, t)| n.image.as_ref() == Some(t));
    let mut by_image: BTreeMap<ImageName, Vec<String>> = BTreeMap::new();
    for (n, t) in &change {
        by_image.entry(t.clone()).or_default().push(n.mac.clone());
    }
    for (image, macs) in &by_image {
        state.store.set_nodes_image(macs, image)?;
    }
    let mut lines = Vec::new();
    if !change.is_empty() {
        let names: Vec<&str> = change.iter().map(|(n, _)| n.name.as_str()).collect();
        tracing::info!(user, nodes = ?names, image = %shown, "nodes boot another image");
        lines.push(if is_default {
            format!(
                "{} will now boot {} default image (other users will see {} as free).",
                nodes_phrase(&names),
                if names.len() == 1 { "its" } else { "their" },
                if names.len() == 1 { "it" } else { "them" }
            )
        } else {
            format!("{} will now boot {shown}.", nodes_phrase(&names))
        });
    }
    if !already.is_empty() {
        let names: Vec<&str> = already.iter().map(|(n, _)| n.name.as_str()).collect();
        lines.push(format!(
            "{}: ignored, {} already using this image.",
            nodes_phrase(&names),
            if names.len() == 1 {
                "it is"
            } else {
                "they are"
            }
        ));
    }
    if !change.is_empty() {
        state.nodes.changed();
    }
    Ok(pb::NodeBootReply {
        message: lines.join("\n"),
        owned_by_others: Vec::new(),
    })
}

fn rename(state: &State, from: &str, to: &str) -> Result<(), ServiceError> {
    let to = to.trim();
    let dev = state
        .store
        .list_devices()?
        .into_iter()
        .find(|d| d.name == from)
        .ok_or_else(|| {
            ServiceError::NotFound(format!("no device named '{from}' (see walt device show)"))
        })?;
    if !is_valid_device_name(to) {
        return Err(ServiceError::InvalidArgument(format!(
            "invalid node name '{to}': a name is 1 to {} lower-case letters, digits or '-', \
             not starting with '-', and not all, my-nodes, server or walt-server",
            walt_core::models::MAX_DEVICE_NAME_LEN
        )));
    }
    if to == dev.name {
        return Ok(());
    }
    match state.store.rename_device(&dev.name, to) {
        Ok(()) => {}
        Err(StoreError::DeviceExists(_)) => {
            return Err(ServiceError::AlreadyExists(format!(
                "a device named '{to}' already exists (see walt device show)"
            )));
        }
        Err(StoreError::DeviceNotFound(_)) => {
            return Err(ServiceError::NotFound(format!(
                "no device named '{from}' (see walt device show)"
            )));
        }
        Err(e) => return Err(e.into()),
    }
    tracing::info!(from, to, mac = %dev.mac, "device renamed");
    state.nodes.changed();
    Ok(())
}

/// The name a default image gets in `user`'s working set: its
/// `walt.image.preferred-name` label if usable, else `<model>-default`.
fn copy_name(state: &State, user: &str, default: &ImageName) -> Result<ImageName, ServiceError> {
    let rec = state
        .store
        .get_image(default)?
        .ok_or_else(|| ServiceError::NotFound(format!("default image {default} not found")))?;
    let preferred = state
        .store
        .read_blob(&rec.config_digest)
        .ok()
        .and_then(|b| serde_json::from_slice::<ImageConfig>(&b).ok())
        .and_then(|c| c.label(LABEL_PREFERRED_NAME).map(str::to_string))
        .and_then(|p| ImageName::parse_user(user, p.trim()).ok());
    Ok(match preferred {
        Some(p) => p,
        None => ImageName {
            owner: user.to_string(),
            name: default.name.clone(),
            tag: default.tag.clone(),
        },
    })
}

/// Gives `user` a copy of the default image of each model present not
/// given yet; one line per copy, and whether every image was looked at
/// (an image name busy with a session is tried again at the next call).
/// Models covered by an image already considered (its `walt.node.models`
/// lists them) are not looked at again.
fn welcome(
    state: &State,
    user: &str,
    models: &[String],
) -> Result<(Vec<String>, bool), ServiceError> {
    let mut lines = Vec::new();
    let mut complete = true;
    let mut covered: BTreeSet<String> = BTreeSet::new();
    for model in models {
        if covered.contains(model) {
            continue;
        }
        let default = default_image_name(model);
        let Some(rec) = state.store.get_image(&default)? else {
            // A node of this model exists, so its default did; removed
            // since by an administrator: nothing to give.
            continue;
        };
        covered.extend(rec.node_models.iter().cloned());
        covered.insert(model.clone());
        if state.store.default_copy_given(user, &default)? {
            continue;
        }
        let target = copy_name(state, user, &default)?;
        // A session writing that name: try again at the next call.
        let Ok(_lock) = state
            .locks
            .acquire(&target, "a copy of a default image".to_string())
        else {
            complete = false;
            continue;
        };
        if state.store.get_image(&target)?.is_none() {
            match state.store.duplicate_image(&default, &target) {
                Ok(()) | Err(StoreError::ImageExists(_)) => {}
                Err(e) => return Err(e.into()),
            }
            tracing::info!(user, image = %target, default = %default, "default image given");
            lines.push(format!(
                "Cloned {}, a default image for {}.",
                target.short(),
                compact_models(&rec.node_models)
            ));
        }
        state.store.record_default_copy(user, &default)?;
    }
    Ok((lines, complete))
}

/// For an image about to get new content: None if no node boots it, else
/// the notice that its nodes will reboot and remount it (blocking).
pub(crate) fn in_use_notice(
    state: &State,
    image: &ImageName,
) -> Result<Option<String>, ServiceError> {
    let n = state.store.nodes_using(image)?.len();
    Ok((n > 0).then(|| in_use_text(image, n)))
}

/// The notice that the `n` nodes booting `image` will reboot and remount it.
pub(crate) fn in_use_text(image: &ImageName, n: usize) -> String {
    format!(
        "Image {} is in use: its {} will reboot and remount it.",
        image.short(),
        if n == 1 {
            "node".to_string()
        } else {
            format!("{n} nodes")
        }
    )
}

/// The error for removing or renaming (`what`) an image nodes boot, naming
/// them; None if no node boots it (blocking).
pub(crate) fn refuse_in_use(
    state: &State,
    image: &ImageName,
    what: &str,
) -> Result<Option<ServiceError>, ServiceError> {
    let nodes = state.store.nodes_using(image)?;
    if nodes.is_empty() {
        return Ok(None);
    }
    let names: Vec<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
    Ok(Some(ServiceError::FailedPrecondition(format!(
        "cannot {what} image '{}': {} {} it (make {} boot another image first: walt node boot {} <image>)",
        image.short(),
        if names.len() == 1 { "node" } else { "nodes" },
        if names.len() == 1 {
            format!("{} boots", names[0])
        } else {
            format!("{} boot", list_names(&names))
        },
        if names.len() == 1 { "it" } else { "them" },
        names.join(",")
    ))))
}

type UpdateStream =
    Pin<Box<dyn Stream<Item = Result<pb::UpdateDefaultImagesEvent, Status>> + Send>>;

#[tonic::async_trait]
impl nodes_server::Nodes for NodesService {
    async fn show(
        &self,
        req: Request<pb::NodeShowRequest>,
    ) -> Result<Response<pb::NodeShowReply>, Status> {
        let user = caller(&req)?;
        let r = req.into_inner();
        let state = self.state.clone();
        let reply = blocking(move || {
            let devices = state.store.list_devices()?;
            let mut reply = pb::NodeShowReply::default();
            for d in &devices {
                match d.kind {
                    DeviceKind::Node if r.all || owner_of(d, &user) == Owner::Caller => {
                        reply.nodes.push(device_info(d))
                    }
                    DeviceKind::Unknown if r.devices => reply.devices.push(device_info(d)),
                    _ => {}
                }
            }
            Ok(reply)
        })
        .await?;
        Ok(Response::new(reply))
    }

    async fn boot(
        &self,
        req: Request<pb::NodeBootRequest>,
    ) -> Result<Response<pb::NodeBootReply>, Status> {
        let user = caller(&req)?;
        let r = req.into_inner();
        let state = self.state.clone();
        let reply = blocking(move || boot(&state, &user, &r)).await?;
        Ok(Response::new(reply))
    }

    async fn rename(
        &self,
        req: Request<pb::NodeRenameRequest>,
    ) -> Result<Response<pb::NodeRenameReply>, Status> {
        caller(&req)?;
        let r = req.into_inner();
        let state = self.state.clone();
        blocking(move || rename(&state, &r.name, &r.new_name)).await?;
        Ok(Response::new(pb::NodeRenameReply {}))
    }

    async fn welcome(
        &self,
        req: Request<pb::WelcomeRequest>,
    ) -> Result<Response<pb::WelcomeReply>, Status> {
        let user = caller(&req)?;
        let cache = &self.state.nodes.welcome;
        if cache.done(&user) {
            return Ok(Response::new(pb::WelcomeReply::default()));
        }
        let _work = cache.work.lock().await;
        let state = self.state.clone();
        let messages = blocking(move || {
            let cache = &state.nodes.welcome;
            let models = state.store.node_models()?;
            cache.set_models(models.clone());
            if cache.done(&user) {
                return Ok(Vec::new());
            }
            let (lines, complete) = welcome(&state, &user, &models)?;
            if complete {
                cache.mark(&user, &models);
            }
            Ok(lines)
        })
        .await?;
        Ok(Response::new(pb::WelcomeReply { messages }))
    }

    // ----- virtual nodes (issue 17): nodes/vnode_service.rs -----

    async fn create_vnode(
        &self,
        req: Request<pb::VnodeCreateRequest>,
    ) -> Result<Response<pb::VnodeCreateReply>, Status> {
        let user = caller(&req)?;
        let r = req.into_inner();
        let message = super::vnode_service::create(&self.state, &user, &r.name).await?;
        Ok(Response::new(pb::VnodeCreateReply { message }))
    }

    async fn remove_vnode(
        &self,
        req: Request<pb::VnodeRemoveRequest>,
    ) -> Result<Response<pb::VnodeRemoveReply>, Status> {
        let user = caller(&req)?;
        let r = req.into_inner();
        super::vnode_service::remove(&self.state, &user, &r.name).await?;
        Ok(Response::new(pb::VnodeRemoveReply {}))
    }

    async fn reboot(
        &self,
        req: Request<pb::NodeRebootRequest>,
    ) -> Result<Response<pb::NodeRebootReply>, Status> {
        let user = caller(&req)?;
        let r = req.into_inner();
        let message = super::vnode_service::reboot(&self.state, &user, &r.node_set).await?;
        Ok(Response::new(pb::NodeRebootReply { message }))
    }

    async fn config(
        &self,
        req: Request<pb::NodeConfigRequest>,
    ) -> Result<Response<pb::NodeConfigReply>, Status> {
        let user = caller(&req)?;
        let r = req.into_inner();
        let message =
            super::vnode_service::config(&self.state, &user, &r.node_set, &r.settings).await?;
        Ok(Response::new(pb::NodeConfigReply { message }))
    }

    type ConsoleStream = super::vnode_service::ConsoleStream;

    async fn console(
        &self,
        req: Request<tonic::Streaming<pb::ConsoleInput>>,
    ) -> Result<Response<Self::ConsoleStream>, Status> {
        let user = caller(&req)?;
        let stream = super::vnode_service::console(&self.state, &user, req.into_inner()).await?;
        Ok(Response::new(stream))
    }

    type UpdateDefaultImagesStream = UpdateStream;

    async fn update_default_images(
        &self,
        req: Request<pb::UpdateDefaultImagesRequest>,
    ) -> Result<Response<UpdateStream>, Status> {
        let user = caller(&req)?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let state = self.state.clone();
        tokio::spawn(async move {
            tracing::info!(user, "updating the default images");
            let say_tx = tx.clone();
            let say = move |message: String| {
                let _ = say_tx.send(Ok(pb::UpdateDefaultImagesEvent { message }));
            };
            let r = tokio::select! {
                r = super::defaults::update_all(&state, &say) => r,
                _ = state.shutdown.cancelled() => Err(ServiceError::ShuttingDown),
            };
            if let Err(e) = r {
                tracing::warn!(error = %e, "updating the default images failed");
                let _ = tx.send(Err(Status::from(e)));
            }
        });
        Ok(Response::new(Box::pin(UnboundedReceiverStream::new(rx))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_lists() {
        assert_eq!(list_names(&["a"]), "a");
        assert_eq!(list_names(&["a", "b"]), "a and b");
        assert_eq!(list_names(&["a", "b", "c"]), "a, b and c");
        assert_eq!(nodes_phrase(&["a"]), "Node a");
        assert_eq!(nodes_phrase(&["a", "b"]), "Nodes a and b");
    }

    #[test]
    fn welcome_cache_forgets_users_when_models_change() {
        let c = WelcomeCache::default();
        assert!(!c.done("alice"));
        let m = vec!["pc-x86-64".to_string()];
        c.set_models(m.clone());
        c.mark("alice", &m);
        assert!(c.done("alice"));
        c.invalidate();
        assert!(!c.done("alice"));
        c.set_models(m.clone());
        assert!(c.done("alice"), "same models: alice stays checked");
        c.set_models(vec!["pc-x86-64".into(), "rpi-4-b".into()]);
        assert!(!c.done("alice"), "new model: alice is checked again");
        c.mark("alice", &m);
        assert!(!c.done("alice"), "a mark for older models is ignored");
    }
}
