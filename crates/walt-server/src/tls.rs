//! The server's TLS key and certificate, created at the first start.

use std::path::{Path, PathBuf};

use anyhow::Context;

/// `tls/` next to the configuration file (`/etc/walt/tls`).
pub fn default_dir(config: &Path) -> PathBuf {
    match config.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.join("tls"),
        _ => PathBuf::from("tls"),
    }
}

/// The key and certificate in `dir`, created there when missing; the log
/// says which certificate clients will see.
pub async fn identity(dir: PathBuf) -> anyhow::Result<walt_tls::Identity> {
    // tonic's TLS acceptor takes the process' default provider: ring.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let d = dir.clone();
    let (id, created) = tokio::task::spawn_blocking(move || walt_tls::load_or_create(&d))
        .await
        .context("TLS setup task failed")??;
    if created {
        tracing::info!(
            dir = %dir.display(),
            fingerprint = %id.fingerprint,
            "created a TLS key and self-signed certificate"
        );
    } else {
        tracing::info!(
            dir = %dir.display(),
            fingerprint = %id.fingerprint,
            "TLS certificate loaded"
        );
    }
    Ok(id)
}
