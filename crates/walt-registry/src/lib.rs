//! OCI distribution (docker-registry-v2) client: manifests, blobs,
//! authentication (basic and bearer-token challenges), retries.
//!
//! ```no_run
//! # async fn f(reg: &walt_core::config::V2Registry) -> Result<(), walt_registry::RegistryError> {
//! let client = walt_registry::RegistryClient::for_v2(reg, None)?;
//! let m = client.get_manifest("alice/foo", "latest").await?;
//! println!("{} {:?}", m.digest, m.media_type);
//! # Ok(()) }
//! ```

mod auth;
mod client;
pub mod docker;
mod error;
pub mod hub;

pub use auth::{Challenge, Credentials, parse_www_authenticate};
pub use client::{
    BlobResponse, ClientOptions, DEFAULT_UPLOAD_CHUNK_SIZE, FetchedManifest, ManifestCheck,
    Progress, RegistryClient, RetryPolicy,
};
pub use docker::{DEFAULT_DOCKER_SOCKET, DockerClient, DockerError};
pub use error::{
    ApiError, RegistryError, innermost_reason, parse_error_body, summarize_error_body,
};
