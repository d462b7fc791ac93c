//! The walt server: configuration, the gRPC services and the clone engine.

mod accept;
mod admin;
mod build;
mod clone;
mod config;
mod cp;
mod docker;
mod editable;
mod error;
mod grpc;
mod hub;
mod images;
mod inflight;
mod localpipe;
pub mod nodes;
mod owner;
mod progress;
mod publish;
mod search;
mod session;
mod shell;

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;

use walt_core::config::ServerConfig;
use walt_proto::v1::admin_server::AdminServer;
use walt_proto::v1::images_server::ImagesServer;
use walt_proto::v1::nodes_server::NodesServer;
use walt_proto::v1::server_server::ServerServer;
use walt_store::Store;

pub use error::ServiceError;

pub struct ServerOptions {
    pub config_path: PathBuf,
    pub data_dir: PathBuf,
    /// The socket `walt-dhcp-event` connects to; None: no node detection.
    pub event_socket: Option<PathBuf>,
    /// The NFS exports file walt writes.
    pub exports_file: PathBuf,
    /// The TFTP remap file walt writes.
    pub tftp_map_file: PathBuf,
}

/// State shared by every request.
pub struct State {
    pub store: Arc<Store>,
    config: RwLock<Arc<ServerConfig>>,
    pub config_path: PathBuf,
    /// Cancelled at shutdown: long operations stop and clean up.
    pub shutdown: CancellationToken,
    /// Registry repositories known to hold blobs (cross-repository mounts).
    pub blob_sources: publish::BlobSources,
    /// Images being modified (shell, cp): one session per image.
    pub locks: Arc<session::Locks>,
    /// What searches remember between calls (configs, tags).
    pub search_caches: Arc<search::Caches>,
    /// The last build contexts received, reused by unchanged rebuilds.
    pub build_contexts: build::Contexts,
    /// The node side: detection, default images, serving.
    pub nodes: nodes::Nodes,
    /// Downloads shared by concurrent clones (issue 16).
    pub(crate) inflight: Arc<inflight::Inflight>,
}

impl State {
    /// The configuration in force now (a reload affects later calls only).
    pub fn config(&self) -> Arc<ServerConfig> {
        self.config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Re-reads the configuration file. On success the new configuration
    /// replaces the old one for later calls (running operations keep the one
    /// they started with); on error the old one stays in force and the
    /// reason (file, key, what) is logged and returned.
    pub fn reload(&self) -> Result<Arc<ServerConfig>, String> {
        match config::load(&self.config_path) {
            Ok(new) => {
                self.store.set_limits(new.limits);
                let new = Arc::new(new);
                *self.config.write().unwrap_or_else(|e| e.into_inner()) = new.clone();
                tracing::info!(
                    path = %self.config_path.display(),
                    registries = ?registry_labels(&new),
                    "configuration reloaded"
                );
                Ok(new)
            }
            Err(e) => {
                let reason = format!("{e:#}");
                tracing::error!(
                    path = %self.config_path.display(),
                    "configuration not reloaded, keeping the previous one: {reason}"
                );
                Err(reason)
            }
        }
    }
}

/// Labels of the configured registries, in order.
pub fn registry_labels(config: &ServerConfig) -> Vec<String> {
    config
        .registries
        .iter()
        .map(|r| r.label().to_string())
        .collect()
}

pub struct Server {
    state: Arc<State>,
    /// The key and certificate the API is served with; None: in clear.
    tls: Option<walt_tls::Identity>,
    /// [`Server::start_nodes`] was called.
    nodes_started: bool,
}

/// Accepted connections, with Nagle's algorithm off: interactive streams
/// (a shell's keystrokes and echoes) and small replies must not wait for
/// the peer's delayed ACK (40 ms).
fn incoming(
    listener: TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use tokio_stream::StreamExt;
    TcpListenerStream::new(listener).map(|s| {
        let s = s?;
        if let Err(e) = s.set_nodelay(true) {
            tracing::debug!("cannot set TCP_NODELAY: {e}");
        }
        Ok(s)
    })
}

impl Server {
    pub async fn open(opts: ServerOptions) -> anyhow::Result<Self> {
        let config = config::load(&opts.config_path)?;
        let data_dir = opts.data_dir.clone();
        let store = tokio::task::spawn_blocking(move || Store::open(&data_dir))
            .await
            .context("store task failed")?
            .with_context(|| {
                format!("cannot open the image store in {}", opts.data_dir.display())
            })?;
        error::hide_paths_under(&opts.data_dir);
        tracing::info!(
            data_dir = %opts.data_dir.display(),
            registries = ?registry_labels(&config),
            "store open"
        );
        store.set_limits(config.limits);
        Ok(Self {
            state: Arc::new(State {
                store: Arc::new(store),
                config: RwLock::new(Arc::new(config)),
                config_path: opts.config_path,
                shutdown: CancellationToken::new(),
                blob_sources: publish::BlobSources::default(),
                locks: Arc::default(),
                build_contexts: build::Contexts::default(),
                search_caches: Arc::default(),
                nodes: nodes::Nodes::new(nodes::NodePaths {
                    data_dir: opts.data_dir.clone(),
                    event_socket: opts.event_socket,
                    exports_file: opts.exports_file,
                    tftp_map_file: opts.tftp_map_file,
                }),
                inflight: Arc::default(),
            }),
            tls: None,
            nodes_started: false,
        })
    }

    /// Serves the API over TLS with this key and certificate (the default
    /// is in clear, for `--plaintext`).
    pub fn with_tls(mut self, identity: walt_tls::Identity) -> Self {
        self.tls = Some(identity);
        self
    }

    pub fn state(&self) -> Arc<State> {
        self.state.clone()
    }

    /// Starts the node side (mounts restored, the DHCP event socket bound)
    /// before the API port is opened, so that a client or DHCP hook that
    /// sees the port open finds the socket too. `serve` does it otherwise.
    pub async fn start_nodes(&mut self) -> anyhow::Result<()> {
        nodes::start(self.state.clone()).await?;
        self.nodes_started = true;
        Ok(())
    }

    /// Serves the gRPC API until `signal` completes, then cancels in-flight
    /// work and waits for it to clean up.
    pub async fn serve(
        self,
        listener: TcpListener,
        signal: impl Future<Output = ()>,
    ) -> anyhow::Result<()> {
        let addr = listener.local_addr()?;
        let mut builder = tonic::transport::Server::builder()
            .initial_stream_window_size(walt_tls::STREAM_WINDOW)
            .initial_connection_window_size(walt_tls::CONNECTION_WINDOW)
            .max_frame_size(walt_tls::MAX_FRAME);
        match &self.tls {
            Some(id) => {
                tracing::info!(%addr, fingerprint = %id.fingerprint, "walt-server listening (TLS)");
                // Handshakes run in their own tasks; one that stalls is
                // dropped after this delay, never holding the others.
                let config = tonic::transport::ServerTlsConfig::new()
                    .identity(tonic::transport::Identity::from_pem(
                        &id.cert_pem,
                        &id.key_pem,
                    ))
                    .timeout(std::time::Duration::from_secs(10));
                builder = builder
                    .tls_config(config)
                    .context("cannot use the TLS key and certificate")?;
            }
            None => tracing::warn!(
                %addr,
                "walt-server listening IN CLEAR (--plaintext): registry passwords cross the network unencrypted"
            ),
        }
        let state = self.state.clone();
        let shutdown = state.shutdown.clone();
        // Fixed for the life of the process (a reload does not change them).
        let limits = state.config().limits;
        let (receive, send) = (
            usize::try_from(limits.grpc_receive_size).unwrap_or(usize::MAX),
            usize::try_from(limits.grpc_send_size).unwrap_or(usize::MAX),
        );
        if !self.nodes_started {
            nodes::start(state.clone()).await?;
        }
        let stop = async move {
            signal.await;
            shutdown.cancel();
        };
        builder
            .add_service(
                ImagesServer::new(images::ImagesService::new(state.clone()))
                    .max_decoding_message_size(receive)
                    .max_encoding_message_size(send),
            )
            .add_service(
                ServerServer::new(images::ServerService::new(state.clone()))
                    .max_decoding_message_size(receive)
                    .max_encoding_message_size(send),
            )
            .add_service(
                AdminServer::new(admin::AdminService::new(state.clone()))
                    .max_decoding_message_size(receive)
                    .max_encoding_message_size(send),
            )
            .add_service(
                NodesServer::new(nodes::service::NodesService::new(state.clone()))
                    .max_decoding_message_size(receive)
                    .max_encoding_message_size(send),
            )
            .serve_with_incoming_shutdown(incoming(listener), stop)
            .await
            .context("gRPC server failed")?;
        // The node mounts are released and the exports removed.
        state.nodes.serving.stopped().await;
        // Cancelled clones remove their staging files from their blocking
        // threads; the runtime waits for those before the process exits.
        tracing::info!("walt-server stopped");
        Ok(())
    }
}
