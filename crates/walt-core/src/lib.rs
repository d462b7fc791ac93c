//! Pure types shared by every walt crate: image names, clone URLs, node
//! models, labels, OCI documents and the server configuration model.
//! Nothing here performs I/O.

pub mod arch;
pub mod autoglob;
pub mod civil;
pub mod config;
pub mod digest;
pub mod models;
pub mod name;
pub mod oci;
pub mod text;
pub mod url;

pub use autoglob::autoglob;
pub use digest::{Digest, DigestError};
pub use models::compact_models;
pub use name::{ImageName, NameError};
pub use url::{CloneUrl, Location, UrlError};

/// Label listing the node models an image boots on (comma-separated).
pub const LABEL_NODE_MODELS: &str = "walt.node.models";
/// Label with the minimal walt server version an image needs (integer).
pub const LABEL_SERVER_MINVERSION: &str = "walt.server.minversion";
/// Label giving the name used when a default image is copied to a user.
pub const LABEL_PREFERRED_NAME: &str = "walt.image.preferred-name";
/// Owner of the default images.
pub const DEFAULT_IMAGES_OWNER: &str = "waltplatform";
/// This server's version, compared with `walt.server.minversion` labels.
pub const SERVER_VERSION: u32 = 10;
