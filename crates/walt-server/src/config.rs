//! Loading the server configuration file.

use std::path::Path;

use anyhow::Context;
use walt_core::config::ServerConfig;

/// Reads `path`; a missing file means the defaults (the hub only).
pub fn load(path: &Path) -> anyhow::Result<ServerConfig> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(ServerConfig::parse(&path.display().to_string(), &text)?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tracing::info!(path = %path.display(), "no configuration file, using defaults (hub only)");
            Ok(ServerConfig::default_config())
        }
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}
