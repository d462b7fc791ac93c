//! The walt gRPC API, generated from `proto/walt/v1`.

#![allow(clippy::all, missing_docs)]

pub mod v1 {
    tonic::include_proto!("walt.v1");

    impl std::fmt::Debug for Credentials {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("Credentials")
                .field("username", &self.username)
                .field("password", &"<hidden>")
                .finish()
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn credentials_debug_hides_the_password() {
        let c = super::v1::Credentials {
            username: "alice".into(),
            password: "s3cret".into(),
        };
        let req = super::v1::CloneRequest {
            url: "lab:a/b".into(),
            credentials: Some(c),
            ..Default::default()
        };
        let text = format!("{req:?}");
        assert!(text.contains("alice") && !text.contains("s3cret"), "{text}");
    }
}

/// Request metadata key carrying the caller's walt username.
pub const USER_METADATA_KEY: &str = "walt-user";

/// Status metadata key naming the registry whose credentials are missing
/// or were refused (on `Unauthenticated` errors).
pub const REGISTRY_METADATA_KEY: &str = "walt-registry";

/// Status metadata key of a refusal that the user may confirm (squash or
/// cp into an image nodes use): the number of nodes that would reboot.
/// The client asks, then calls again with `confirmed`.
pub const CONFIRM_METADATA_KEY: &str = "walt-confirm";

/// Status metadata key of a refused local pipe (`walt image cp` from the
/// server's machine): the client copies through the stream instead.
pub const LOCAL_PIPE_METADATA_KEY: &str = "walt-local-pipe";

/// Default TCP port of walt-server.
pub const DEFAULT_PORT: u16 = 12345;
