//! The node side: devices detected through the DHCP server's hook, the
//! default image of each model fetched once, and the images nodes use
//! mounted and served over TFTP and NFS.
//!
//! - [`event`]: the local socket `walt-dhcp-event` talks to, and that client.
//! - [`register`]: what a lease commit does to the device records.
//! - [`defaults`]: default images, fetched once per model (single flight);
//!   `walt advanced update-default-images`.
//! - [`serve`]: mounts, the per-node trees, the NFS exports and TFTP map.
//! - [`service`]: the `Nodes` gRPC service.
//! - [`vnode`]: virtual nodes, qemu PCs the server runs on the walt network
//!   ([`vnode_service`]: their commands).

pub mod defaults;
pub mod event;
pub mod register;
pub mod serve;
pub mod service;
pub mod vnode;
pub mod vnode_service;

use std::path::PathBuf;
use std::sync::Arc;

use crate::State;

/// Where the node side keeps and writes things (fixed for the life of the
/// process).
#[derive(Debug, Clone)]
pub struct NodePaths {
    /// The store's data dir: `images/<id>/fs` and `nodes/<mac>/` live there.
    pub data_dir: PathBuf,
    /// The socket `walt-dhcp-event` connects to; None: no detection.
    pub event_socket: Option<PathBuf>,
    /// The NFS exports file walt writes.
    pub exports_file: PathBuf,
    /// The TFTP remap file walt writes (for tftpd-hpa's `-m`).
    pub tftp_map_file: PathBuf,
}

/// The node side's shared state (in [`State::nodes`]).
pub struct Nodes {
    pub paths: NodePaths,
    pub(crate) serving: serve::Serving,
    pub(crate) defaults: defaults::Defaults,
    pub(crate) welcome: service::WelcomeCache,
    pub(crate) vnodes: vnode::Vnodes,
}

impl Nodes {
    pub fn new(paths: NodePaths) -> Self {
        Self {
            serving: serve::Serving::new(&paths),
            defaults: defaults::Defaults::default(),
            welcome: service::WelcomeCache::default(),
            vnodes: vnode::Vnodes::new(),
            paths,
        }
    }

    /// What nodes boot changed (a node's image, or an image nodes use got
    /// new content): serving catches up in the background. Never blocks.
    pub fn changed(&self) {
        self.welcome.invalidate();
        self.serving.request_reconcile();
    }
}

/// Starts the node side's background work: restores the mounts nodes
/// use, then serves (reconciling on each change), and listens for DHCP
/// events. Returns once started; the tasks stop at shutdown.
pub async fn start(state: Arc<State>) -> anyhow::Result<()> {
    serve::start(state.clone()).await?;
    vnode::start_all(&state).await;
    if let Some(path) = state.nodes.paths.event_socket.clone() {
        event::listen(state.clone(), path).await?;
    }
    Ok(())
}
