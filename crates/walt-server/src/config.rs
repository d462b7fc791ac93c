//! Loading the server configuration file.

use std::path::Path;

use anyhow::Context;
use walt_core::config::ServerConfig;

/// Reads `path`; a missing file means the defaults (the hub only). Each
/// registry entry walt skips (one WalT accepts but walt cannot use) is
/// logged as one warning.
pub fn load(path: &Path) -> anyhow::Result<ServerConfig> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let config = ServerConfig::parse(&path.display().to_string(), &text)?;
            for s in &config.skipped {
                tracing::warn!(path = %path.display(), "{}", s.warning());
            }
            Ok(config)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tracing::info!(path = %path.display(), "no configuration file, using defaults (hub only)");
            Ok(ServerConfig::default_config())
        }
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}
