//! Accepting a cloned image, the step every clone from outside the server
//! (a registry, the Docker daemon) ends with: the image must be a walt image
//! (`walt.node.models`), it becomes a new image record of the working set,
//! and when anything failed, what the clone added to the store is collected
//! again so that the store is as before.

use std::future::Future;
use std::sync::Arc;

use walt_core::models::parse_models;
use walt_core::oci;
use walt_core::{CloneUrl, Digest, ImageName};
use walt_store::{ImportGuard, LayerRef, NewImage, PutOutcome, Store};

use crate::error::ServiceError;
use crate::images::blocking;

/// The node models the `walt.node.models` label value `label` lists;
/// refuses an image without the label, or with an empty one.
pub(crate) fn node_models(
    label: Option<&str>,
    url: &CloneUrl,
) -> Result<Vec<String>, ServiceError> {
    label
        .map(parse_models)
        .filter(|m| !m.is_empty())
        .ok_or_else(|| ServiceError::NotWaltImage {
            url: url.to_string(),
        })
}

/// The manifest of an accepted image.
pub(crate) enum Manifest {
    /// As the registry served it (its digest and media type stay).
    Fetched {
        bytes: Vec<u8>,
        digest: Digest,
        media_type: String,
    },
    /// None to keep (a Docker archive): walt writes an OCI manifest for
    /// the config and the layers, marked as built by walt.
    Written,
}

/// A walt image whose layers are in the store, ready to be recorded.
pub(crate) struct Accepted {
    pub config: Vec<u8>,
    /// The config's digest when known (it is then checked); else computed.
    pub config_digest: Option<Digest>,
    pub manifest: Manifest,
    pub layers: Vec<LayerRef>,
    pub models: Vec<String>,
}

/// Records `image` as `target` (replacing it when `force`): stores its
/// config and manifest, then commits the image row. `guard`, held since the
/// layers started landing, keeps the collector away until the row
/// references them. Returns what happened to the name, and the manifest
/// digest.
pub(crate) async fn record(
    store: &Arc<Store>,
    guard: ImportGuard,
    target: &ImageName,
    force: bool,
    image: Accepted,
) -> Result<(PutOutcome, Digest), ServiceError> {
    let (store, target) = (store.clone(), target.clone());
    blocking(move || {
        let _guard = guard;
        let (config_digest, manifest_digest, manifest_media_type) = store_documents(
            &store,
            &image.config,
            image.config_digest.as_ref(),
            image.manifest,
            &image.layers,
        )?;
        let new = NewImage {
            name: target,
            manifest_digest: manifest_digest.clone(),
            manifest_media_type,
            config_digest,
            layers: image.layers,
            node_models: image.models,
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0),
        };
        Ok((store.put_image(&new, force)?, manifest_digest))
    })
    .await
}

/// Stores the config (checked against `config_digest` when given) and the
/// manifest of an image whose layers are in the store, as blobs: returns
/// the config digest, the manifest digest and its media type. Blocking.
pub(crate) fn store_documents(
    store: &Store,
    config: &[u8],
    config_digest: Option<&Digest>,
    manifest: Manifest,
    layers: &[LayerRef],
) -> Result<(Digest, Digest, String), ServiceError> {
    let config_digest = store.put_blob(config_digest, config)?;
    let (manifest_digest, media_type) = match manifest {
        Manifest::Fetched {
            bytes,
            digest,
            media_type,
        } => {
            store.put_blob(Some(&digest), &bytes)?;
            (digest, media_type)
        }
        Manifest::Written => {
            let bytes = write_manifest(&config_digest, config.len(), layers)?;
            (store.put_blob(None, &bytes)?, oci::OCI_MANIFEST.to_string())
        }
    };
    Ok((config_digest, manifest_digest, media_type))
}

/// An OCI manifest for a config and layers walt assembled itself.
fn write_manifest(
    config_digest: &Digest,
    config_size: usize,
    layers: &[LayerRef],
) -> Result<Vec<u8>, ServiceError> {
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": oci::OCI_MANIFEST,
        "config": {
            "mediaType": oci::OCI_CONFIG,
            "digest": config_digest,
            "size": config_size,
        },
        "layers": layers.iter().map(|l| serde_json::json!({
            "mediaType": l.media_type,
            "digest": l.blob_digest,
            "size": l.blob_size,
        })).collect::<Vec<_>>(),
        "annotations": { oci::ANNOTATION_WALT_BUILT: "true" },
    });
    serde_json::to_vec(&manifest)
        .map_err(|e| ServiceError::Internal(format!("cannot write the manifest: {e}")))
}

/// Gives up an import guard on a blocking thread: the last guard runs any
/// deferred collection.
pub(crate) async fn release(guard: ImportGuard) {
    let _ = tokio::task::spawn_blocking(move || drop(guard)).await;
}

/// Runs a clone; when it fails, collects what it added to the store.
pub(crate) async fn or_collect<T>(
    store: &Arc<Store>,
    clone: impl Future<Output = Result<T, ServiceError>>,
) -> Result<T, ServiceError> {
    let result = clone.await;
    if result.is_err() {
        let s = store.clone();
        if let Err(e) = blocking(move || Ok(s.gc()?)).await {
            tracing::warn!(error = %e, "cleanup after a failed clone failed");
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_walt_image_needs_its_models() {
        let url = CloneUrl::parse("docker:u/n:t").unwrap();
        assert_eq!(
            node_models(Some("rpi-3-b, pc-x86-64"), &url).unwrap(),
            ["rpi-3-b", "pc-x86-64"]
        );
        for label in [None, Some(""), Some(" , ")] {
            let e = node_models(label, &url).unwrap_err();
            assert_eq!(
                e.to_string(),
                "docker:u/n:t is not a walt image: it has no walt.node.models label"
            );
        }
    }

    #[test]
    fn written_manifest_lists_config_and_layers() {
        let d = |s: &[u8]| Digest::from_sha256(<sha2::Sha256 as sha2::Digest>::digest(s).into());
        let layers = [LayerRef {
            diff_id: d(b"d"),
            blob_digest: d(b"b"),
            blob_size: 3,
            media_type: oci::OCI_LAYER_TAR.into(),
        }];
        let bytes = write_manifest(&d(b"c"), 7, &layers).unwrap();
        let m: oci::Manifest = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(m.config.digest, d(b"c"));
        assert_eq!(m.config.size, 7);
        assert_eq!(m.layers[0].digest, d(b"b"));
        assert_eq!(m.layers[0].media_type, oci::OCI_LAYER_TAR);
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["annotations"][oci::ANNOTATION_WALT_BUILT], "true");
    }
}
