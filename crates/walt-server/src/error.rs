//! Errors of the server: what failed, and for which image, registry or
//! request. Each message is the one line the CLI shows to the user after
//! `error: `. The engines (clone, publish, search, the Docker import) know
//! nothing of gRPC: the service layer turns these errors into status codes
//! in one place, [`ServiceError::kind`] (see `grpc.rs`).

use walt_registry::{DockerError, RegistryError};
use walt_store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    // ----- generic, for the sessions (shell, cp) and the working set -----
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Unimplemented(String),

    // ----- the working set -----
    /// `image` (short form) is not in the caller's working set.
    #[error("image '{image}' not found in your working set (see walt image show)")]
    NoSuchImage { image: String },

    // ----- clone -----
    /// A `walt:` URL of the caller's own image.
    #[error(
        "{url} is already in your working set (to copy it: walt image duplicate {image} <new name>)"
    )]
    AlreadyYours { url: String, image: String },
    /// A `walt:` URL naming no image of this server.
    #[error("image {url} not found on this server")]
    NotOnThisServer { url: String },
    /// The URL's location is neither `walt`, `docker` nor a configured registry.
    #[error("unknown registry '{label}' in {url} (known locations: {known})")]
    UnknownLocation {
        label: String,
        url: String,
        known: String,
    },
    /// The clone would overwrite `image` without `--force`.
    #[error(
        "image '{image}' already exists in your working set (use walt image clone --force {url} {image} to overwrite it)"
    )]
    WouldOverwrite { image: String, url: String },
    /// The image at `url` has no (or an empty) `walt.node.models` label.
    #[error(
        "{url} is not a walt image: it has no {} label",
        walt_core::LABEL_NODE_MODELS
    )]
    NotWaltImage { url: String },
    /// The image at `url` cannot be used as it is (its configuration,
    /// layers or manifest); `reason` says what.
    #[error("{url}: {reason}")]
    InvalidImage { url: String, reason: String },
    /// Registry `registry` answered a document for `url` that is not usable.
    #[error("registry '{registry}': {url}: {reason}")]
    InvalidManifest {
        registry: String,
        url: String,
        reason: String,
    },
    /// A multi-platform image without this server's platform.
    #[error("{url} has no image for linux/{arch} (it has: {available})")]
    NoPlatform {
        url: String,
        arch: String,
        available: String,
    },

    // ----- the Docker daemon -----
    #[error(transparent)]
    Docker(#[from] DockerError),
    /// The daemon at `socket` did not answer in time.
    #[error("the Docker daemon (socket {socket}) did not answer within {secs}s")]
    DockerTimeout { socket: String, secs: u64 },
    /// The `docker save` archive of `image` cannot be read.
    #[error("docker: cannot read the archive of image '{image}': {reason}")]
    DockerArchive { image: String, reason: String },
    /// The `docker save` archive of `image` was read but does not describe a usable image.
    #[error("docker: the archive of {image} is not usable: {reason}")]
    DockerUnusable { image: String, reason: String },

    // ----- registries, publish -----
    /// The hub is not among the configured registries.
    #[error("the Docker hub is not enabled on this server (see walt-server-setup --edit-conf)")]
    HubNotEnabled,
    /// No registry to publish to.
    #[error(
        "no registry is configured on this server, nowhere to publish (see walt-server-setup --edit-conf)"
    )]
    NoRegistry,
    /// `auto` with several registries to publish to.
    #[error(
        "several registries are configured ({registries}): choose one (walt image publish --registry {first} {image})"
    )]
    SeveralRegistries {
        registries: String,
        first: String,
        image: String,
    },
    /// `walt` or `docker` named as a publish target.
    #[error("'{label}' is not a registry one can publish to (registries: {registries})")]
    NotATarget { label: String, registries: String },
    /// An unknown publish target.
    #[error("unknown registry '{label}' (registries: {registries})")]
    UnknownRegistry { label: String, registries: String },
    /// The repository `<owner>/<name>` is not a valid name `where` (on registry '...', on the Docker hub).
    #[error(
        "cannot publish as '{owner}/{name}' {place}: '{owner}' is not usable as a repository name"
    )]
    BadOwner {
        owner: String,
        name: String,
        place: String,
    },

    /// An operation on an image nodes use that the user did not confirm
    /// (squash, cp into it): `nodes` would reboot.
    #[error("{message}")]
    NeedsConfirmation { message: String, nodes: usize },
    /// The FIFO a local client offered for a copy cannot be used (not on
    /// this machine, not its own...): the client sends the archive in the
    /// stream instead.
    #[error("the client's pipe cannot be used: {0}")]
    LocalPipe(String),

    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("operation cancelled: the server is shutting down")]
    ShuttingDown,
    #[error("internal error: {0}")]
    Internal(String),
    /// The error of a download or request shared by several clones
    /// (`inflight.rs`): each of them reports it as it is.
    #[error(transparent)]
    Shared(std::sync::Arc<ServiceError>),
}

/// The class of a failure, which the service layer maps to a status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    InvalidArgument,
    NotFound,
    AlreadyExists,
    FailedPrecondition,
    Unimplemented,
    /// Credentials are missing or refused by the registry the error names.
    Unauthenticated,
    Unavailable,
    Internal,
}

impl ServiceError {
    /// The class of this failure: the one place that decides it.
    pub fn kind(&self) -> Kind {
        use ServiceError as E;
        match self {
            E::InvalidArgument(_)
            | E::SeveralRegistries { .. }
            | E::NotATarget { .. }
            | E::BadOwner { .. } => Kind::InvalidArgument,
            E::NotFound(_)
            | E::NoSuchImage { .. }
            | E::NotOnThisServer { .. }
            | E::UnknownLocation { .. }
            | E::NoPlatform { .. }
            | E::UnknownRegistry { .. } => Kind::NotFound,
            E::AlreadyExists(_) | E::WouldOverwrite { .. } => Kind::AlreadyExists,
            E::FailedPrecondition(_)
            | E::AlreadyYours { .. }
            | E::NotWaltImage { .. }
            | E::InvalidImage { .. }
            | E::InvalidManifest { .. }
            | E::DockerTimeout { .. }
            | E::DockerArchive { .. }
            | E::DockerUnusable { .. }
            | E::HubNotEnabled
            | E::NeedsConfirmation { .. }
            | E::LocalPipe(_)
            | E::NoRegistry => Kind::FailedPrecondition,
            E::Unimplemented(_) => Kind::Unimplemented,
            E::Docker(d) => match d {
                DockerError::ImageNotFound { .. } => Kind::NotFound,
                _ => Kind::FailedPrecondition,
            },
            E::Registry(r) => match r {
                RegistryError::Unauthorized { .. } | RegistryError::CredentialsRequired { .. } => {
                    Kind::Unauthenticated
                }
                RegistryError::NotFound { .. } => Kind::NotFound,
                RegistryError::Truncated { .. } => Kind::FailedPrecondition,
                _ => Kind::Unavailable,
            },
            E::Store(s) => match s {
                StoreError::ImageNotFound(_) => Kind::NotFound,
                StoreError::ImageExists(_) => Kind::AlreadyExists,
                StoreError::NoSpace { .. } | StoreError::TooLarge { .. } => {
                    Kind::FailedPrecondition
                }
                _ => Kind::Internal,
            },
            E::ShuttingDown => Kind::Unavailable,
            E::Internal(_) => Kind::Internal,
            E::Shared(e) => e.kind(),
        }
    }

    /// The label of the registry that wants credentials, for an
    /// [`Kind::Unauthenticated`] error: the client asks its user for them.
    pub fn registry_wanting_credentials(&self) -> Option<&str> {
        match self {
            ServiceError::Registry(r) if self.kind() == Kind::Unauthenticated => Some(r.label()),
            ServiceError::Shared(e) => e.registry_wanting_credentials(),
            _ => None,
        }
    }
}

/// Directories of this server whose paths never reach a user (the data dir).
static HIDDEN_ROOTS: std::sync::RwLock<Vec<std::path::PathBuf>> =
    std::sync::RwLock::new(Vec::new());

/// Keeps the paths under `dir` (as given and canonical) out of the messages
/// that [`ServiceError::user_message`] makes.
pub fn hide_paths_under(dir: &std::path::Path) {
    let mut roots = HIDDEN_ROOTS.write().unwrap_or_else(|e| e.into_inner());
    let canonical = std::fs::canonicalize(dir).ok();
    for d in std::iter::once(dir.to_path_buf()).chain(canonical) {
        if d.is_absolute() && d.parent().is_some() && !roots.contains(&d) {
            roots.push(d);
        }
    }
    // Longest first: a root inside another is replaced whole.
    roots.sort_by_key(|d| std::cmp::Reverse(d.as_os_str().len()));
}

impl ServiceError {
    /// The one line the user sees: this error's message with the server's
    /// paths replaced (the full message goes to the server log) and the
    /// control characters of the text it quotes (registry bodies, sandbox
    /// output) escaped.
    pub fn user_message(&self) -> String {
        let full = self.to_string();
        let roots = HIDDEN_ROOTS.read().unwrap_or_else(|e| e.into_inner());
        let mut msg = std::borrow::Cow::Borrowed(full.as_str());
        for root in roots.iter() {
            let hidden = match walt_core::text::hide_paths(&msg, root) {
                std::borrow::Cow::Owned(m) => Some(m),
                std::borrow::Cow::Borrowed(_) => None,
            };
            if let Some(m) = hidden {
                msg = std::borrow::Cow::Owned(m);
            }
        }
        if matches!(msg, std::borrow::Cow::Owned(_)) {
            tracing::warn!(error = %full, "error reported without its server paths");
        }
        walt_core::text::one_line(&msg).into_owned()
    }
}

impl From<walt_core::UrlError> for ServiceError {
    fn from(e: walt_core::UrlError) -> Self {
        ServiceError::InvalidArgument(e.to_string())
    }
}

impl From<walt_core::NameError> for ServiceError {
    fn from(e: walt_core::NameError) -> Self {
        ServiceError::InvalidArgument(e.to_string())
    }
}

impl From<tokio::task::JoinError> for ServiceError {
    fn from(e: tokio::task::JoinError) -> Self {
        ServiceError::Internal(format!("worker task failed: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_messages_hide_the_data_dir_and_escape_controls() {
        let dir = std::path::Path::new("/srv/walt-error-test-data");
        hide_paths_under(dir);
        let e = ServiceError::from(StoreError::Io {
            context: format!("opening '{}/layers/ab/diff'", dir.display()),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        });
        assert!(
            e.to_string()
                .contains("/srv/walt-error-test-data/layers/ab")
        );
        assert_eq!(e.user_message(), "opening <server path>: entity not found");
        let e = ServiceError::InvalidImage {
            url: "lab:a/b".into(),
            reason: "registry said \u{1b}[2J\nbye\u{202e}".into(),
        };
        assert_eq!(
            e.user_message(),
            "lab:a/b: registry said \\x1b[2J bye\\u{202e}"
        );
    }
}
