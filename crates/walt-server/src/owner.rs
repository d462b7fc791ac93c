//! `walt advanced fix-image-owner <other-user>`: every image of another
//! user becomes the caller's (maintenance, when a user left), with WalT's
//! rules: not oneself, none of the images in use by nodes, none replacing
//! an image of the caller, at least one image.

use std::sync::Arc;

use walt_core::ImageName;
use walt_core::name::is_valid_user;

use crate::State;
use crate::error::ServiceError;
use crate::images::blocking;

/// Renames every image of `other` to `user`; the short names moved.
pub async fn fix_image_owner(
    state: Arc<State>,
    user: String,
    other: String,
) -> Result<Vec<String>, ServiceError> {
    let other = other.trim().to_string();
    if !is_valid_user(&other) {
        return Err(ServiceError::InvalidArgument(format!(
            "invalid walt username '{}'",
            walt_core::text::one_line(&other)
        )));
    }
    if other == user {
        return Err(ServiceError::InvalidArgument(format!(
            "'{other}' is you (the username of your walt client configuration): nothing to do"
        )));
    }
    blocking(move || {
        let images = state.store.list_images(Some(&other))?;
        if images.is_empty() {
            return Err(ServiceError::NotFound(format!(
                "no image belongs to a user named '{other}' (see walt image show --all)"
            )));
        }
        // Every image locked while checked and moved: no session, clone or
        // squash changes them meanwhile.
        let mut moves = Vec::with_capacity(images.len());
        let mut locks = Vec::with_capacity(images.len() * 2);
        for rec in &images {
            let to = ImageName {
                owner: user.clone(),
                name: rec.name.name.clone(),
                tag: rec.name.tag.clone(),
            };
            let holder = format!("walt advanced fix-image-owner of {user}");
            locks.push(state.locks.acquire(&rec.name, holder.clone())?);
            locks.push(state.locks.acquire(&to, holder)?);
            moves.push((rec.name.clone(), to));
        }
        let mut in_use = Vec::new();
        let mut taken = Vec::new();
        for (from, to) in &moves {
            if state.store.image_in_use(from)? {
                in_use.push(from.short());
            }
            if state.store.get_image(to)?.is_some() {
                taken.push(to.short());
            }
        }
        if !in_use.is_empty() {
            return Err(ServiceError::FailedPrecondition(format!(
                "cannot take the images of {other}: nodes use {} (see walt node show --all)",
                in_use.join(", ")
            )));
        }
        if !taken.is_empty() {
            return Err(ServiceError::AlreadyExists(format!(
                "cannot take the images of {other}: {} would replace images of your working set \
                 (rename or remove yours first, see walt image show)",
                taken.join(", ")
            )));
        }
        let mut moved = Vec::with_capacity(moves.len());
        for (from, to) in &moves {
            state.store.rename_image(from, to)?;
            tracing::info!(from = %from, to = %to, "image owner fixed");
            moved.push(to.short());
        }
        drop(locks);
        Ok(moved)
    })
    .await
}
