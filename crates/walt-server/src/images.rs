//! The `Images` and `Server` gRPC services.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};

use futures::{Stream, StreamExt};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use walt_core::name::is_valid_user;
use walt_core::{CloneUrl, ImageName};
use walt_proto::v1::{self as pb, images_server::Images, server_server};
use walt_store::ImageRecord;

use crate::error::ServiceError;
use crate::progress::{self, Event, Reporter};
use crate::{State, clone, cp, publish, shell};

/// The caller's walt username, from the request metadata.
pub fn caller<T>(req: &Request<T>) -> Result<String, Status> {
    let user = req
        .metadata()
        .get(walt_proto::USER_METADATA_KEY)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| Status::unauthenticated("the request names no walt user"))?;
    if !is_valid_user(user) {
        return Err(Status::invalid_argument(format!(
            "invalid walt username '{user}'"
        )));
    }
    Ok(user.to_string())
}

/// Runs store work off the async threads.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ServiceError> + Send + 'static,
) -> Result<T, ServiceError> {
    tokio::task::spawn_blocking(f).await?
}

fn info(state: &State, rec: &ImageRecord) -> Result<pb::ImageInfo, ServiceError> {
    let url = CloneUrl {
        location: walt_core::Location::Walt,
        user: rec.name.owner.clone(),
        repository: rec.name.name.clone(),
        tag: rec.name.tag.clone(),
    };
    Ok(pb::ImageInfo {
        owner: rec.name.owner.clone(),
        name: rec.name.name.clone(),
        tag: rec.name.tag.clone(),
        created: rec.created,
        in_use: state.store.image_in_use(&rec.name)?,
        node_models: rec.node_models.clone(),
        clone_url: url.to_string(),
        size: rec.size,
        manifest_digest: rec.manifest_digest.to_string(),
        image_created: image_created(state, rec),
    })
}

/// The `created` time of the image's config (what WalT shows), in seconds
/// since the epoch; None when the config is unreadable or has no valid time.
/// Configs never change (content-addressed): their times are remembered,
/// so that `walt image show` reads each config once per server process.
fn image_created(state: &State, rec: &ImageRecord) -> Option<i64> {
    type Times = Mutex<HashMap<walt_core::Digest, Option<i64>>>;
    static TIMES: OnceLock<Times> = OnceLock::new();
    /// Bound of the cache (entries are ~100 bytes).
    const MAX_TIMES: usize = 100_000;
    let times = TIMES.get_or_init(Default::default);
    let lock = || times.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(t) = lock().get(&rec.config_digest) {
        return *t;
    }
    let bytes = match state.store.read_blob(&rec.config_digest) {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(image = %rec.name, error = %e, "cannot read the image config");
            return None;
        }
    };
    let created = serde_json::from_slice::<walt_core::oci::ImageConfig>(&bytes)
        .ok()
        .and_then(|c| crate::nodes::defaults::parse_time(c.created.as_deref()?))
        .map(|(secs, _)| secs);
    let mut times = lock();
    if times.len() >= MAX_TIMES {
        times.clear();
    }
    times.insert(rec.config_digest.clone(), created);
    created
}

/// What of the image is not in the store (`walt image show --refresh`):
/// one line per missing blob or unpacked layer.
fn missing_content(state: &State, rec: &ImageRecord) -> Vec<String> {
    let store = &state.store;
    let name = &rec.name;
    let mut missing = Vec::new();
    for (what, digest) in [
        ("manifest", &rec.manifest_digest),
        ("config", &rec.config_digest),
    ] {
        if !store.has_blob(digest) {
            missing.push(format!("image '{name}': {what} {digest} is missing"));
        }
    }
    for layer in &rec.layers {
        if !store.has_blob(&layer.blob_digest) {
            missing.push(format!(
                "image '{name}': layer blob {} is missing",
                layer.blob_digest
            ));
        }
        if !store.has_layer(&layer.diff_id) {
            missing.push(format!(
                "image '{name}': unpacked layer {} is missing",
                layer.diff_id
            ));
        }
    }
    missing
}

pub struct ImagesService {
    state: Arc<State>,
}

impl ImagesService {
    pub fn new(state: Arc<State>) -> Self {
        Self { state }
    }
}

type CloneStream = Pin<Box<dyn Stream<Item = Result<pb::CloneEvent, Status>> + Send>>;
type SearchStream = Pin<Box<dyn Stream<Item = Result<pb::SearchEvent, Status>> + Send>>;
type PublishStream = Pin<Box<dyn Stream<Item = Result<pb::PublishEvent, Status>> + Send>>;

/// The gRPC stream of an operation's events and outcome.
fn stream<E, M>(rx: progress::Receiver<E>) -> Pin<Box<dyn Stream<Item = Result<M, Status>> + Send>>
where
    E: Send + 'static,
    M: From<E> + Send + 'static,
{
    Box::pin(ReceiverStream::new(rx).map(|item| item.map(M::from).map_err(Status::from)))
}

#[tonic::async_trait]
impl Images for ImagesService {
    async fn show(&self, req: Request<pb::ShowRequest>) -> Result<Response<pb::ShowReply>, Status> {
        let user = caller(&req)?;
        let pb::ShowRequest { all, refresh } = *req.get_ref();
        let state = self.state.clone();
        let reply = blocking(move || {
            let recs = state.store.list_images(None)?;
            let mut reply = pb::ShowReply::default();
            for rec in &recs {
                if refresh {
                    reply.missing.extend(missing_content(&state, rec));
                }
                if all || rec.name.owner == user {
                    reply.images.push(info(&state, rec)?);
                } else {
                    reply.others_exist = true;
                }
            }
            Ok(reply)
        })
        .await?;
        Ok(Response::new(reply))
    }

    type CloneStream = CloneStream;

    async fn clone(&self, req: Request<pb::CloneRequest>) -> Result<Response<CloneStream>, Status> {
        let started = std::time::Instant::now();
        let user = caller(&req)?;
        let req = clone::CloneRequest::from(req.into_inner());
        // Refuse bad input before starting the stream: a plain error status.
        let plan = clone::plan(&self.state, &user, &req).await?;
        let (events, rx) = Reporter::channel(64);
        let state = self.state.clone();
        tokio::spawn(async move {
            let outcome = tokio::select! {
                r = clone::run(state.clone(), plan, events.clone()) => r,
                _ = events.closed() => {
                    tracing::info!("client went away, clone cancelled");
                    return;
                }
                _ = state.shutdown.cancelled() => Err(ServiceError::ShuttingDown),
            };
            match &outcome {
                Ok(result) => {
                    let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
                    tracing::info!(image = %result.name, user = %user, elapsed_ms, "clone finished");
                    // Nodes booting the image replaced remount it.
                    if result.replaced {
                        state.nodes.changed();
                    }
                }
                Err(e) => tracing::warn!(error = %e, "clone failed"),
            }
            events.finish(outcome.map(Event::Done)).await;
        });
        Ok(Response::new(stream(rx)))
    }

    type SearchStream = SearchStream;

    async fn search(
        &self,
        req: Request<pb::SearchRequest>,
    ) -> Result<Response<SearchStream>, Status> {
        let user = caller(&req)?;
        let req = crate::search::SearchRequest::from(req.into_inner());
        let (events, rx) = Reporter::channel(64);
        let state = self.state.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = crate::search::run(state.clone(), user, req, events.clone()) => {}
                _ = events.closed() => tracing::debug!("client went away, search cancelled"),
                _ = state.shutdown.cancelled() => {
                    events.finish(Err(ServiceError::ShuttingDown)).await;
                }
            }
        });
        Ok(Response::new(stream(rx)))
    }

    type PublishStream = PublishStream;

    async fn publish(
        &self,
        req: Request<pb::PublishRequest>,
    ) -> Result<Response<PublishStream>, Status> {
        let user = caller(&req)?;
        let req = publish::PublishRequest::from(req.into_inner());
        // Refuse bad input before starting the stream: a plain error status.
        let plan = publish::plan(&self.state, &user, &req).await?;
        let (events, rx) = Reporter::channel(64);
        let state = self.state.clone();
        tokio::spawn(async move {
            let outcome = tokio::select! {
                r = publish::run(state.clone(), plan, events.clone()) => r,
                _ = events.closed() => {
                    tracing::info!("client went away, publish cancelled");
                    return;
                }
                _ = state.shutdown.cancelled() => Err(ServiceError::ShuttingDown),
            };
            if let Err(e) = &outcome {
                tracing::warn!(error = %e, "publish failed");
            }
            events.finish(outcome.map(Event::Done)).await;
        });
        Ok(Response::new(stream(rx)))
    }

    type ShellStream = shell::ShellStream;

    async fn shell(
        &self,
        req: Request<tonic::Streaming<pb::ShellInput>>,
    ) -> Result<Response<Self::ShellStream>, Status> {
        let user = caller(&req)?;
        let stream = shell::start(self.state.clone(), user, req.into_inner()).await?;
        Ok(Response::new(stream))
    }

    async fn copy_in(
        &self,
        req: Request<tonic::Streaming<pb::CopyInRequest>>,
    ) -> Result<Response<pb::CopyInReply>, Status> {
        let user = caller(&req)?;
        let peer = crate::localpipe::Peer::of(&req);
        let reply = cp::copy_in(self.state.clone(), user, peer, req.into_inner()).await?;
        Ok(Response::new(reply))
    }

    type BuildStream = crate::build::BuildStream;

    async fn build(
        &self,
        req: Request<tonic::Streaming<pb::BuildRequest>>,
    ) -> Result<Response<Self::BuildStream>, Status> {
        let user = caller(&req)?;
        let stream = crate::build::start(self.state.clone(), user, req.into_inner()).await?;
        Ok(Response::new(stream))
    }

    type CopyOutStream = cp::CopyOutStream;

    async fn copy_out(
        &self,
        req: Request<pb::CopyOutRequest>,
    ) -> Result<Response<Self::CopyOutStream>, Status> {
        let user = caller(&req)?;
        let peer = crate::localpipe::Peer::of(&req);
        let stream = cp::copy_out(self.state.clone(), user, peer, req.into_inner()).await?;
        Ok(Response::new(stream))
    }

    async fn remove(
        &self,
        req: Request<pb::RemoveRequest>,
    ) -> Result<Response<pb::RemoveReply>, Status> {
        let user = caller(&req)?;
        let name =
            ImageName::parse_user(&user, &req.get_ref().image).map_err(ServiceError::from)?;
        let state = self.state.clone();
        blocking(move || {
            ensure_exists(&state, &name)?;
            ensure_unused(&state, &name, "remove")?;
            let _lock = state.locks.acquire(&name, "walt image remove".into())?;
            state.store.remove_image(&name)?;
            tracing::info!(image = %name, "image removed");
            Ok(())
        })
        .await?;
        Ok(Response::new(pb::RemoveReply {}))
    }

    async fn rename(
        &self,
        req: Request<pb::RenameRequest>,
    ) -> Result<Response<pb::RenameReply>, Status> {
        let r = req.get_ref();
        let (from, to) = two_names(&req, &r.image, &r.new_name)?;
        let state = self.state.clone();
        blocking(move || {
            ensure_exists(&state, &from)?;
            ensure_unused(&state, &from, "rename")?;
            let _from = state.locks.acquire(&from, "walt image rename".into())?;
            let _to = (to != from)
                .then(|| state.locks.acquire(&to, "walt image rename".into()))
                .transpose()?;
            ensure_free(&state, &to)?;
            state.store.rename_image(&from, &to)?;
            tracing::info!(from = %from, to = %to, "image renamed");
            Ok(())
        })
        .await?;
        Ok(Response::new(pb::RenameReply {}))
    }

    async fn duplicate(
        &self,
        req: Request<pb::DuplicateRequest>,
    ) -> Result<Response<pb::DuplicateReply>, Status> {
        let r = req.get_ref();
        let (from, to) = two_names(&req, &r.image, &r.new_name)?;
        let state = self.state.clone();
        blocking(move || {
            ensure_exists(&state, &from)?;
            ensure_free(&state, &to)?;
            state.store.duplicate_image(&from, &to)?;
            tracing::info!(from = %from, to = %to, "image duplicated");
            Ok(())
        })
        .await?;
        Ok(Response::new(pb::DuplicateReply {}))
    }

    async fn squash(
        &self,
        req: Request<pb::SquashRequest>,
    ) -> Result<Response<pb::SquashReply>, Status> {
        let user = caller(&req)?;
        let name =
            ImageName::parse_user(&user, &req.get_ref().image).map_err(ServiceError::from)?;
        let confirmed = req.get_ref().confirmed;
        let state = self.state.clone();
        let reply = blocking(move || {
            ensure_exists(&state, &name)?;
            let _lock = state.locks.acquire(&name, "walt image squash".into())?;
            // Nodes booting it reboot: WalT asks first (nothing to squash,
            // nothing changes: no question).
            if !confirmed
                && state
                    .store
                    .get_image(&name)?
                    .is_some_and(|r| r.layers.len() > 1)
            {
                let n = state.store.nodes_using(&name)?.len();
                if n > 0 {
                    return Err(crate::editable::needs_confirmation(
                        &name,
                        n,
                        "squashing it",
                    ));
                }
            }
            let out = state.store.squash_image(&name)?;
            let short = name.short();
            let message = if out.squashed {
                tracing::info!(image = %name, layers = out.layers_before, "image squashed");
                let mut m = format!(
                    "Image {short} squashed: {} layers merged into 1.",
                    out.layers_before
                );
                // Nodes booting it remount the new content.
                if let Some(notice) = crate::nodes::service::in_use_notice(&state, &name)? {
                    m.push('\n');
                    m.push_str(&notice);
                    state.nodes.changed();
                }
                m
            } else {
                format!(
                    "Image {short} has {} layer{}: nothing to squash.",
                    out.layers_before,
                    if out.layers_before == 1 { "" } else { "s" }
                )
            };
            Ok(pb::SquashReply {
                layers_before: u32::try_from(out.layers_before).unwrap_or(u32::MAX),
                message,
            })
        })
        .await?;
        Ok(Response::new(reply))
    }

    async fn registries(
        &self,
        _req: Request<pb::RegistriesRequest>,
    ) -> Result<Response<pb::RegistriesReply>, Status> {
        Ok(Response::new(crate::grpc::registries(&self.state.config())))
    }

    // ----- issue 15 item 9: walt advanced update-hub-meta, fix-image-owner -----

    async fn update_hub_meta(
        &self,
        req: Request<pb::UpdateHubMetaRequest>,
    ) -> Result<Response<pb::UpdateHubMetaReply>, Status> {
        let _user = caller(&req)?;
        let req = req.into_inner();
        let (hub_user, rebuilt) = crate::hub::update_hub_meta(
            &self.state,
            req.credentials.as_ref().and_then(crate::grpc::credentials),
            req.waltplatform_user,
        )
        .await?;
        Ok(Response::new(pb::UpdateHubMetaReply {
            hub_user,
            images: rebuilt.images,
            warnings: rebuilt.warnings,
        }))
    }

    async fn fix_image_owner(
        &self,
        req: Request<pb::FixImageOwnerRequest>,
    ) -> Result<Response<pb::FixImageOwnerReply>, Status> {
        let user = caller(&req)?;
        let other = req.into_inner().other_user;
        let images = crate::owner::fix_image_owner(self.state.clone(), user, other).await?;
        Ok(Response::new(pb::FixImageOwnerReply { images }))
    }
}

/// The caller's image and the new name a rename or duplicate gives it.
fn two_names<T>(
    req: &Request<T>,
    image: &str,
    new_name: &str,
) -> Result<(ImageName, ImageName), Status> {
    let user = caller(req)?;
    let from = ImageName::parse_user(&user, image).map_err(ServiceError::from)?;
    let to = ImageName::parse_user(&user, new_name).map_err(ServiceError::from)?;
    Ok((from, to))
}

fn ensure_exists(state: &State, name: &ImageName) -> Result<(), ServiceError> {
    if state.store.get_image(name)?.is_none() {
        return Err(ServiceError::NoSuchImage {
            image: name.short(),
        });
    }
    Ok(())
}

fn ensure_free(state: &State, name: &ImageName) -> Result<(), ServiceError> {
    if state.store.get_image(name)?.is_some() {
        return Err(ServiceError::AlreadyExists(format!(
            "image '{}' already exists in your working set",
            name.short()
        )));
    }
    Ok(())
}

fn ensure_unused(state: &State, name: &ImageName, what: &str) -> Result<(), ServiceError> {
    match crate::nodes::service::refuse_in_use(state, name, what)? {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

pub struct ServerService {
    state: Arc<State>,
}

impl ServerService {
    pub fn new(state: Arc<State>) -> Self {
        Self { state }
    }
}

#[tonic::async_trait]
impl server_server::Server for ServerService {
    async fn info(
        &self,
        _req: Request<pb::InfoRequest>,
    ) -> Result<Response<pb::InfoReply>, Status> {
        let config = self.state.config();
        Ok(Response::new(pb::InfoReply {
            version: env!("CARGO_PKG_VERSION").to_string(),
            arch: walt_core::oci::oci_arch(std::env::consts::ARCH)
                .0
                .to_string(),
            registries: config
                .registries
                .iter()
                .map(|r| r.label().to_string())
                .collect(),
        }))
    }
}
