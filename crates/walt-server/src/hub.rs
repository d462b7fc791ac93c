//! The Docker Hub as a source (clone, search) and a target (publish):
//! the configured hub entry, and the `<user>/walt_metadata` image that
//! lists each user's walt images (see `docs/hub.md`).

use std::collections::BTreeMap;

use walt_core::config::{HubRegistry, Registry, ServerConfig};
use walt_registry::RegistryClient;
use walt_registry::hub::{MetadataEntry, WaltMetadata};

use crate::error::ServiceError;

/// The hub entry of the configuration; an error naming the cause when the
/// hub is not enabled on this server.
pub fn configured(config: &ServerConfig) -> Result<&HubRegistry, ServiceError> {
    config
        .registries
        .iter()
        .find_map(|r| match r {
            Registry::Hub(h) => Some(h),
            Registry::V2(_) => None,
        })
        .ok_or(ServiceError::HubNotEnabled)
}

/// Adds (or replaces) `<name>:<tag>` with `labels` in the metadata image
/// of `hub_user`, keeping the other entries.
pub async fn record_image(
    client: &RegistryClient,
    hub_user: &str,
    name: &str,
    tag: &str,
    labels: BTreeMap<String, String>,
) -> Result<(), ServiceError> {
    let mut metadata = client
        .read_walt_metadata(hub_user)
        .await?
        .unwrap_or_default();
    let key = format!("{name}:{tag}");
    let entry = metadata
        .images
        .entry(key)
        .or_insert_with(MetadataEntry::default);
    entry.labels = labels;
    client.write_walt_metadata(hub_user, &metadata).await?;
    tracing::info!(user = %hub_user, image = %format!("{name}:{tag}"), "hub walt_metadata updated");
    Ok(())
}

/// The images listed in a metadata document, as `(name, tag, labels)`.
pub fn listed(metadata: &WaltMetadata) -> impl Iterator<Item = (&str, &str, &MetadataEntry)> {
    metadata.images.iter().filter_map(|(key, entry)| {
        let (name, tag) = key.split_once(':')?;
        Some((name, tag, entry))
    })
}
