//! The one way to the server: TLS with the certificate pinned at the first
//! connection, or in clear when the config opts in (`walt.plaintext`).

use std::time::Duration;

use anyhow::{anyhow, bail};
use tonic::transport::Channel;
use walt_tls::{ConnectError, Fingerprint, Transport};

use crate::config::{self, Settings};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects to the configured server. At the first TLS connection to it,
/// pins the certificate it presents in the client config (one line on
/// stderr says so); afterwards refuses any other certificate.
pub async fn connect(settings: &Settings) -> anyhow::Result<Channel> {
    let endpoint = config::endpoint(&settings.server)?;
    let server = settings.server.trim();
    let path = config::path()?;
    let transport = if settings.config.walt.plaintext == Some(true) {
        Transport::Plaintext
    } else {
        match settings.config.walt.server_fingerprints.get(server) {
            Some(fp) => Transport::Tls(Some(fp.parse::<Fingerprint>().map_err(|e| {
                anyhow!(
                    "{}: walt.server-fingerprints entry for '{server}': {e}",
                    path.display()
                )
            })?)),
            None => Transport::Tls(None),
        }
    };
    let connected = match walt_tls::connect(&endpoint, transport, CONNECT_TIMEOUT).await {
        Ok(c) => c,
        Err(ConnectError::Address(_)) => {
            bail!("walt.server '{}' is not usable", settings.server)
        }
        Err(ConnectError::Mismatch { pinned, presented }) => bail!(
            "the walt server at {server} presents certificate {presented}, not {pinned} pinned in {}: refusing to talk to it (it may be an impostor; if the server really has a new certificate, accept it with walt advanced forget-server)",
            path.display()
        ),
        Err(ConnectError::Handshake(cause)) => bail!(
            "cannot reach the walt server at {server} over TLS: {cause} (if it is a walt-server started with --plaintext, add 'plaintext: true' under 'walt:' in {})",
            path.display()
        ),
        Err(ConnectError::Unreachable(cause)) => {
            bail!("cannot reach the walt server at {server}: {cause}")
        }
    };
    if let (Transport::Tls(None), Some(fp)) = (transport, connected.presented) {
        match config::save_fingerprint(server, Some(&fp.to_string())) {
            Ok(path) => eprintln!(
                "The walt server at {server} presents certificate {fp}: pinned in {}.",
                path.display()
            ),
            Err(e) => eprintln!(
                "warning: the certificate {fp} of the walt server at {server} could not be pinned: {e:#}"
            ),
        }
    }
    Ok(connected.channel)
}

/// `walt advanced forget-server`: forgets the certificate pinned for the
/// configured server; the next connection pins the one it presents then.
pub fn forget_server() -> anyhow::Result<()> {
    let settings = config::load()?;
    let server = settings.server.trim();
    if !settings
        .config
        .walt
        .server_fingerprints
        .contains_key(server)
    {
        eprintln!("No certificate pinned for the walt server at {server}.");
        return Ok(());
    }
    let path = config::save_fingerprint(server, None)?;
    eprintln!(
        "Certificate of the walt server at {server} forgotten from {}: the next command pins the one it presents.",
        path.display()
    );
    Ok(())
}
