//! `walt-server`: the walt daemon.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

use walt_server::{Server, ServerOptions};

mod tls;

/// The walt server daemon: image store, registries and the gRPC API.
#[derive(Parser, Debug)]
#[command(name = "walt-server", version, about)]
struct Args {
    /// Server configuration file (WalT format YAML).
    #[arg(
        long,
        default_value = "/etc/walt/server.conf",
        env = "WALT_SERVER_CONF"
    )]
    config: PathBuf,
    /// Directory holding the image store.
    #[arg(long, default_value = "/var/lib/walt", env = "WALT_DATA_DIR")]
    data_dir: PathBuf,
    /// Address the gRPC API listens on.
    #[arg(long, default_value = "0.0.0.0:12345")]
    listen: SocketAddr,
    /// Directory of the server's TLS key and certificate (created at the
    /// first start) [default: tls/ next to the configuration file, i.e.
    /// /etc/walt/tls].
    #[arg(long, env = "WALT_TLS_DIR")]
    tls_dir: Option<PathBuf>,
    /// Serve the API in clear, without TLS: registry passwords then cross
    /// the network unencrypted (clients must opt in with `plaintext: true`
    /// under `walt:` in their config).
    #[arg(long, conflicts_with = "tls_dir")]
    plaintext: bool,
    /// Socket the DHCP server's hook (`walt-dhcp-event`) reports leases on
    /// (root only).
    #[arg(
        long,
        default_value = "/run/walt/dhcp-event.sock",
        env = "WALT_DHCP_EVENT_SOCKET"
    )]
    event_socket: PathBuf,
    /// NFS exports file listing the images nodes use.
    #[arg(
        long,
        default_value = "/etc/exports.d/walt.exports",
        env = "WALT_EXPORTS_FILE"
    )]
    exports_file: PathBuf,
    /// TFTP remap file (tftpd-hpa `-m`) mapping a node's requests to its
    /// tree [default: tftp.map in the data directory]; run `in.tftpd -L -s -u root -m <this file> <data-dir>/tftp-root`.
    #[arg(long, env = "WALT_TFTP_MAP_FILE")]
    tftp_map_file: Option<PathBuf>,
}

fn main() {
    if std::env::args_os().nth(1).as_deref()
        == Some(std::ffi::OsStr::new(walt_container::SANDBOX_ARG))
    {
        walt_container::sandbox_main()
    }
    // `walt-server dhcp-event <args>`: the DHCP hook, as walt-dhcp-event.
    if std::env::args_os().nth(1).as_deref() == Some(std::ffi::OsStr::new("dhcp-event")) {
        let args: Vec<String> = std::env::args().skip(2).collect();
        std::process::exit(walt_server::nodes::event::client_main(&args));
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,h2=warn,hyper=warn,tower=warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(
            std::io::IsTerminal::is_terminal(&std::io::stderr())
                && std::env::var_os("NO_COLOR").is_none(),
        )
        .init();
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("walt-server: error: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(run(args)) {
        eprintln!("walt-server: error: {e:#}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let tls_dir = args
        .tls_dir
        .clone()
        .unwrap_or_else(|| tls::default_dir(&args.config));
    let tftp_map_file = args
        .tftp_map_file
        .clone()
        .unwrap_or_else(|| args.data_dir.join("tftp.map"));
    let mut server = Server::open(ServerOptions {
        config_path: args.config,
        data_dir: args.data_dir,
        event_socket: Some(args.event_socket),
        exports_file: args.exports_file,
        tftp_map_file,
    })
    .await?;
    if !args.plaintext {
        server = server.with_tls(tls::identity(tls_dir).await?);
    }
    server.start_nodes().await?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    tokio::spawn(reload_on_sighup(server.state()));
    server.serve(listener, shutdown_signal()).await
}

/// Reloads the configuration file on each SIGHUP (an invalid file is
/// refused, logged, and the configuration in force is kept).
async fn reload_on_sighup(state: std::sync::Arc<walt_server::State>) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("cannot listen for SIGHUP, configuration reload disabled: {e}");
            return;
        }
    };
    while hup.recv().await.is_some() {
        tracing::info!("SIGHUP received, reloading the configuration");
        let st = state.clone();
        // The error, if any, is logged by reload().
        let _ = tokio::task::spawn_blocking(move || st.reload()).await;
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers, only the process' death stops us.
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received, shutting down"),
        _ = int.recv() => tracing::info!("SIGINT received, shutting down"),
    }
}
