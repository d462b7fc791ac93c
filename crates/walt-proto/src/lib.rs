//! The walt gRPC API, generated from `proto/walt/v1`.

#![allow(clippy::all, missing_docs)]

pub mod v1 {
    tonic::include_proto!("walt.v1");
}

/// Request metadata key carrying the caller's walt username.
pub const USER_METADATA_KEY: &str = "walt-user";

/// Status metadata key naming the registry whose credentials are missing
/// or were refused (on `Unauthenticated` errors).
pub const REGISTRY_METADATA_KEY: &str = "walt-registry";

/// Default TCP port of walt-server.
pub const DEFAULT_PORT: u16 = 12345;
