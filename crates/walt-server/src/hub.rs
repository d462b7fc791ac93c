//! The Docker Hub as a source (clone, search) and a target (publish):
//! the configured hub entry, and the `<user>/walt_metadata` image that
//! lists each user's walt images (see `docs/hub.md`).

use std::collections::BTreeMap;

use futures::StreamExt;
use walt_core::CloneUrl;
use walt_core::config::{HubRegistry, Registry, ServerConfig};
use walt_registry::hub::{HubSearch, METADATA_REPO, MetadataEntry, WaltMetadata};
use walt_registry::{RegistryClient, RegistryError};

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

/// Refuses a `hub:` clone of an image that its owner's `walt_metadata` does
/// not list, as WalT does (WalT only clones the hub images published with
/// walt, listed with their labels); `--force` clones it anyway. `name` is
/// the local name the user gave, for the hint.
pub async fn ensure_listed(
    client: &RegistryClient,
    url: &CloneUrl,
    name: &str,
    force: bool,
) -> Result<(), ServiceError> {
    if force {
        return Ok(());
    }
    let metadata = match client.read_walt_metadata(&url.user).await {
        Ok(m) => m,
        // Anonymously, the Docker Hub answers 401 for a repository that
        // does not exist: no metadata.
        Err(RegistryError::CredentialsRequired { .. } | RegistryError::Denied { .. })
            if !client.has_credentials() =>
        {
            None
        }
        Err(e) => return Err(e.into()),
    };
    let short = url.repository.rsplit('/').next().unwrap_or(&url.repository);
    let key = format!("{short}:{}", url.tag);
    if metadata.is_some_and(|m| m.images.contains_key(&key)) {
        return Ok(());
    }
    let mut hint = format!("walt image clone --force {url}");
    let name = name.trim();
    if !name.is_empty() {
        hint.push(' ');
        hint.push_str(name);
    }
    Err(ServiceError::NotFound(format!(
        "{url} is not a walt image of the hub: {}/{METADATA_REPO} does not list it \
         (see walt image search {}, or use {hint} to clone it anyway)",
        url.user, url.user
    )))
}

/// Repositories (and tags of one repository) looked at, at most, by
/// [`rebuild_metadata`].
const MAX_HUB_ITEMS: usize = 10_000;
/// Images inspected at once.
const INSPECT_CONCURRENCY: usize = 8;

/// A hub user or repository name as the hub allows them, so that it can
/// go into a URL path.
fn hub_name_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
        })
        && !s.starts_with('.')
}

fn tag_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && !s.starts_with(['.', '-'])
}

/// What [`rebuild_metadata`] pushed.
#[derive(Debug, Default)]
pub struct Rebuilt {
    /// `<name>:<tag>` of the walt images listed.
    pub images: Vec<String>,
    /// Repositories or tags skipped, one line each.
    pub warnings: Vec<String>,
}

/// `walt advanced update-hub-meta`: lists the repositories of hub user
/// `user` and their tags (through the hub's API), reads the labels of
/// each image, and pushes a new `<user>/walt_metadata:latest` listing those
/// with `walt.node.models` — as WalT's `update_hub_metadata` does (the
/// previous document is not kept: this is the repair for images pushed
/// without walt, or metadata lost).
pub async fn rebuild_metadata(
    client: &RegistryClient,
    search: &HubSearch,
    user: &str,
) -> Result<Rebuilt, ServiceError> {
    if !hub_name_ok(user) {
        return Err(ServiceError::InvalidArgument(format!(
            "'{user}' is not a valid Docker hub user name"
        )));
    }
    let mut out = Rebuilt::default();
    let mut repos = search.user_repositories(user).await?;
    repos.retain(|r| {
        let ok = hub_name_ok(r);
        if !ok {
            out.warnings.push(format!(
                "repository '{}' skipped: not a valid repository name",
                walt_core::text::one_line(r)
            ));
        }
        ok && r != METADATA_REPO
    });
    repos.truncate(MAX_HUB_ITEMS);
    // Every (repository, tag), then their labels, a few at a time.
    let mut wanted: Vec<(String, String)> = Vec::new();
    for repo in &repos {
        match search.repository_tags(user, repo).await {
            Ok(tags) => {
                for t in tags {
                    if !tag_ok(&t) {
                        out.warnings.push(format!(
                            "{user}/{repo}: tag '{}' skipped: not a valid tag",
                            walt_core::text::one_line(&t)
                        ));
                        continue;
                    }
                    if wanted.len() < MAX_HUB_ITEMS {
                        wanted.push((repo.clone(), t));
                    }
                }
            }
            Err(e) => out
                .warnings
                .push(format!("{user}/{repo} skipped: cannot list its tags: {e}")),
        }
    }
    let results: Vec<_> = futures::stream::iter(wanted.into_iter().map(|(repo, tag)| async move {
        let r = client.image_config(&format!("{user}/{repo}"), &tag).await;
        (repo, tag, r)
    }))
    .buffer_unordered(INSPECT_CONCURRENCY)
    .collect()
    .await;
    let mut metadata = WaltMetadata::default();
    for (repo, tag, r) in results {
        match r {
            Ok(Some(config)) => {
                let labels = config
                    .config
                    .as_ref()
                    .and_then(|c| c.labels.clone())
                    .unwrap_or_default();
                if labels.contains_key(walt_core::LABEL_NODE_MODELS) {
                    metadata.images.insert(
                        format!("{repo}:{tag}"),
                        MetadataEntry {
                            labels,
                            extra: BTreeMap::new(),
                        },
                    );
                }
            }
            Ok(None) => {}
            // Credentials refused: the whole operation fails (the client asks).
            Err(
                e
                @ (RegistryError::Unauthorized { .. } | RegistryError::CredentialsRequired { .. }),
            ) => return Err(e.into()),
            Err(e) => out
                .warnings
                .push(format!("{user}/{repo}:{tag} skipped: {e}")),
        }
    }
    client.write_walt_metadata(user, &metadata).await?;
    out.images = metadata.images.keys().cloned().collect();
    tracing::info!(user = %user, images = out.images.len(), "hub walt_metadata rebuilt");
    Ok(out)
}

/// `walt advanced update-hub-meta [--waltplatform-user]`: the metadata of
/// the hub user of `credentials` (or of `waltplatform`) rebuilt and pushed
/// with those credentials, which are required. Returns the hub user.
pub async fn update_hub_meta(
    state: &crate::State,
    credentials: Option<walt_registry::Credentials>,
    waltplatform_user: bool,
) -> Result<(String, Rebuilt), ServiceError> {
    let config = state.config();
    let hub = configured(&config)?;
    let Some(credentials) = credentials.filter(|c| !c.username.trim().is_empty()) else {
        return Err(RegistryError::CredentialsRequired {
            label: "hub".into(),
        }
        .into());
    };
    let user = if waltplatform_user {
        walt_core::DEFAULT_IMAGES_OWNER.to_string()
    } else {
        credentials.username.trim().to_ascii_lowercase()
    };
    let client = RegistryClient::for_hub(hub, Some(credentials))?;
    let search = HubSearch::for_hub(hub)?;
    let rebuilt = rebuild_metadata(&client, &search, &user).await?;
    Ok((user, rebuilt))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_names_and_tags_that_go_into_paths() {
        for ok in ["alice", "a.b_c-d", "x1"] {
            assert!(hub_name_ok(ok), "{ok}");
        }
        for bad in [
            "",
            "Alice",
            "a/b",
            "..",
            ".hidden",
            "a?b",
            "a%2fb",
            &"a".repeat(256),
        ] {
            assert!(!hub_name_ok(bad), "{bad}");
        }
        for ok in ["latest", "v1.2", "A_b-c"] {
            assert!(tag_ok(ok), "{ok}");
        }
        for bad in ["", "-x", ".x", "a/b", "a:b", &"t".repeat(129)] {
            assert!(!tag_ok(bad), "{bad}");
        }
    }
}
