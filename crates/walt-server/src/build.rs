//! `Images.Build`: `walt image build`, natively (the engine is being
//! written: see issue 12).

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tonic::{Status, Streaming};
use walt_proto::v1 as pb;

use crate::State;
use crate::error::ServiceError;

pub type BuildStream = Pin<Box<dyn Stream<Item = Result<pb::BuildEvent, Status>> + Send>>;

pub async fn start(
    _state: Arc<State>,
    _user: String,
    _input: Streaming<pb::BuildRequest>,
) -> Result<BuildStream, ServiceError> {
    Err(ServiceError::FailedPrecondition(
        "walt image build is not available on this server yet".into(),
    ))
}
