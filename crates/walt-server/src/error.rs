//! Errors of the services, and their mapping to gRPC status codes. The
//! status message is the one line the CLI shows to the user.

use tonic::{Code, Status};
use walt_registry::RegistryError;
use walt_store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
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
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("operation cancelled: the server is shutting down")]
    ShuttingDown,
    #[error("internal error: {0}")]
    Internal(String),
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

impl From<ServiceError> for Status {
    fn from(e: ServiceError) -> Self {
        let code = match &e {
            ServiceError::InvalidArgument(_) => Code::InvalidArgument,
            ServiceError::NotFound(_) => Code::NotFound,
            ServiceError::AlreadyExists(_) => Code::AlreadyExists,
            ServiceError::FailedPrecondition(_) => Code::FailedPrecondition,
            ServiceError::Unimplemented(_) => Code::Unimplemented,
            ServiceError::Registry(r) => match r {
                RegistryError::Unauthorized { .. } | RegistryError::CredentialsRequired { .. } => {
                    Code::Unauthenticated
                }
                RegistryError::NotFound { .. } => Code::NotFound,
                _ => Code::Unavailable,
            },
            ServiceError::Store(s) => match s {
                StoreError::ImageNotFound(_) => Code::NotFound,
                StoreError::ImageExists(_) => Code::AlreadyExists,
                _ => Code::Internal,
            },
            ServiceError::ShuttingDown => Code::Unavailable,
            ServiceError::Internal(_) => Code::Internal,
        };
        // One line, whatever the source said.
        let msg = e.to_string().replace('\n', " ");
        let mut status = Status::new(code, msg);
        // Tell the client which registry wants credentials, so that it can
        // ask its user for them and retry.
        if let (Code::Unauthenticated, ServiceError::Registry(r)) = (code, &e)
            && let Ok(v) = r.label().parse()
        {
            status
                .metadata_mut()
                .insert(walt_proto::REGISTRY_METADATA_KEY, v);
        }
        status
    }
}
