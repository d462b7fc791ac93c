//! WalT's limit on the layers of an image a session opens: an image with
//! 128 layers or more is refused by shell, cp and build (its base), with
//! the squash command as hint. WalT's `MAX_IMAGE_LAYERS`: each save adds a
//! layer, and overlay mounts of that many lower layers are slow or fail.

use walt_store::ImageRecord;

use crate::error::ServiceError;

/// Images with this many layers or more cannot be opened (WalT: 128).
pub const MAX_IMAGE_LAYERS: usize = 128;

/// Refuses `rec` when it has too many layers; `user` is the caller (the
/// hint names the exact squash command for the caller's own images).
pub fn ensure_editable(rec: &ImageRecord, user: &str) -> Result<(), ServiceError> {
    let n = rec.layers.len();
    if n < MAX_IMAGE_LAYERS {
        return Ok(());
    }
    let hint = if rec.name.owner == user {
        format!("run walt image squash {} first", rec.name.short())
    } else {
        format!("its owner {} can squash it", rec.name.owner)
    };
    let shown = if rec.name.owner == user {
        rec.name.short()
    } else {
        format!("{}/{}", rec.name.owner, rec.name.short())
    };
    Err(ServiceError::FailedPrecondition(format!(
        "image '{shown}' has {n} layers, the most walt opens is {} ({hint})",
        MAX_IMAGE_LAYERS - 1
    )))
}

/// The check of a session that modifies an image (`walt image cp` into
/// it): not too many layers, and, when nodes use the image, the user's
/// confirmation (WalT asks it: those nodes reboot).
pub async fn check_modifying(
    session: &crate::session::Session,
    user: &str,
    confirmed: bool,
) -> Result<(), ServiceError> {
    ensure_editable(&session.rec, user)?;
    if confirmed {
        return Ok(());
    }
    let (state, name) = (session.state.clone(), session.rec.name.clone());
    let n = crate::images::blocking(move || Ok(state.store.nodes_using(&name)?.len())).await?;
    match n {
        0 => Ok(()),
        n => Err(needs_confirmation(&session.rec.name, n, "copying into it")),
    }
}

/// The refusal of `doing` (e.g. "squashing it") on `image`, which `n`
/// nodes use, until the user confirms.
pub fn needs_confirmation(image: &walt_core::ImageName, n: usize, doing: &str) -> ServiceError {
    ServiceError::NeedsConfirmation {
        message: format!(
            "image '{}' is used by {}: {doing} reboots {} (confirm with --yes)",
            image.short(),
            if n == 1 {
                "1 node".to_string()
            } else {
                format!("{n} nodes")
            },
            if n == 1 { "it" } else { "them" }
        ),
        nodes: n,
    }
}
