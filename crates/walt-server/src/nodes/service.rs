//! The `Nodes` gRPC service.

/// Users whose default images were already checked since the last change
/// of the models present.
#[derive(Default)]
pub struct WelcomeCache {}
