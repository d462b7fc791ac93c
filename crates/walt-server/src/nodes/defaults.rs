//! Default images (`waltplatform/<model>-default:latest`): fetched once per
//! model however many nodes ask at once, and updated on request.

use std::sync::Arc;

use walt_core::ImageName;

use crate::State;
use crate::error::ServiceError;

/// Fetches in flight, by model.
#[derive(Default)]
pub struct Defaults {}

/// Makes sure the default image of `model` is in the store, fetching it
/// if needed (one fetch per model at a time; concurrent callers wait for
/// it). Err: one line naming every source tried and why it failed.
pub async fn ensure(state: &Arc<State>, model: &str) -> Result<ImageName, String> {
    let _ = state;
    Err(format!(
        "fetching the default image of {model} is not implemented yet"
    ))
}

/// `walt advanced update-default-images`: `say` gets the lines for the user.
pub async fn update_all(
    state: &Arc<State>,
    say: &(dyn Fn(String) + Send + Sync),
) -> Result<(), ServiceError> {
    let _ = state;
    say("not implemented yet".into());
    Ok(())
}
