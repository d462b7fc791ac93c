//! `walt advanced ...` commands that talk to the server.

use anyhow::anyhow;
use walt_proto::v1::{self as pb, nodes_client::NodesClient};

use crate::config;
use crate::image::{connect_channel, status_error};

/// `walt advanced update-default-images`: the server looks for newer
/// default images on its sources and fetches them; its lines are shown as
/// they come (what was updated or not on stdout; progress and warnings on
/// stderr).
pub async fn update_default_images() -> anyhow::Result<()> {
    let settings = config::load()?;
    let (channel, user) = connect_channel(&settings).await?;
    let mut client = NodesClient::with_interceptor(channel, user);
    let mut stream = client
        .update_default_images(pb::UpdateDefaultImagesRequest {})
        .await
        .map_err(|s| match s.code() {
            tonic::Code::Unimplemented => anyhow!(
                "the walt server does not know walt advanced update-default-images (it is older than this client)"
            ),
            _ => status_error(s),
        })?
        .into_inner();
    loop {
        match stream.message().await {
            Ok(Some(ev)) => {
                let line = walt_core::text::one_line(&ev.message);
                if line.starts_with("warning: ") || line.ends_with("...") {
                    eprintln!("{line}");
                } else {
                    println!("{line}");
                }
            }
            Ok(None) => return Ok(()),
            Err(s) => return Err(status_error(s)),
        }
    }
}

// ----- issue 15 item 9: update-hub-meta (rescan-hub-account), fix-image-owner -----

type ImagesClient = pb::images_client::ImagesClient<
    tonic::service::interceptor::InterceptedService<
        tonic::transport::Channel,
        crate::image::UserInterceptor,
    >,
>;

async fn images_client(settings: &config::Settings) -> anyhow::Result<ImagesClient> {
    let (channel, user) = connect_channel(settings).await?;
    Ok(pb::images_client::ImagesClient::with_interceptor(
        channel, user,
    ))
}

/// `img` for `img:latest`.
fn short(name_tag: &str) -> &str {
    name_tag.strip_suffix(":latest").unwrap_or(name_tag)
}

/// `walt advanced update-hub-meta` (and its alias `rescan-hub-account`):
/// the server rebuilds the `walt_metadata` image of the user's hub account
/// from its repositories, with the user's hub credentials (asked for on a
/// terminal when missing or refused, then saved).
pub async fn update_hub_meta(waltplatform_user: bool) -> anyhow::Result<()> {
    let mut settings = config::load()?;
    let mut client = images_client(&settings).await?;
    let call = |client: &mut ImagesClient, settings: &config::Settings| {
        let credentials = settings
            .config
            .registries
            .get("hub")
            .filter(|c| !c.username.is_empty())
            .map(|c| pb::Credentials {
                username: c.username.clone(),
                password: c.password.clone(),
            });
        let mut client = Clone::clone(client);
        async move {
            client
                .update_hub_meta(pb::UpdateHubMetaRequest {
                    credentials,
                    waltplatform_user,
                })
                .await
                .map(tonic::Response::into_inner)
                .map_err(|s| match s.code() {
                    tonic::Code::Unimplemented => anyhow!(
                        "the walt server does not know walt advanced update-hub-meta (it is older than this client)"
                    ),
                    _ => status_error(s),
                })
        }
    };
    let first = call(&mut client, &settings).await;
    let reply = match first {
        Err(e)
            if crate::prompt::interactive()
                && e.downcast_ref::<crate::image::CredentialsNeeded>()
                    .is_some() =>
        {
            let (label, message): (String, String) = e
                .downcast_ref::<crate::image::CredentialsNeeded>()
                .map(|n| (n.label.clone(), n.message.clone()))
                .unwrap_or_default();
            eprintln!("{message}");
            let creds = crate::prompt::ask_credentials(&label)?;
            settings
                .config
                .registries
                .insert(label.clone(), creds.clone());
            let reply = call(&mut client, &settings).await?;
            let path = config::save_credentials(&label, &creds)?;
            eprintln!(
                "Credentials for registry '{label}' saved in {}.",
                path.display()
            );
            reply
        }
        other => other?,
    };
    for w in &reply.warnings {
        eprintln!("warning: {}", walt_core::text::one_line(w));
    }
    let user = walt_core::text::one_line(&reply.hub_user).into_owned();
    let names: Vec<String> = reply
        .images
        .iter()
        .map(|i| walt_core::text::one_line(short(i)).into_owned())
        .collect();
    match names.len() {
        0 => println!("Hub metadata of {user} updated: no walt image found in its repositories."),
        1 => println!(
            "Hub metadata of {user} updated: 1 walt image listed ({}).",
            names[0]
        ),
        n => println!(
            "Hub metadata of {user} updated: {n} walt images listed ({}).",
            names.join(", ")
        ),
    }
    Ok(())
}

/// `walt advanced fix-image-owner [--yes-i-know-do-it-please] <other-user>`:
/// every image of `other_user` becomes the caller's. Without the option,
/// nothing is done and the refusal says what the command is for.
pub async fn fix_image_owner(other_user: &str, confirmed: bool) -> anyhow::Result<()> {
    let other = walt_core::text::one_line(other_user.trim()).into_owned();
    if !confirmed {
        return Err(anyhow!(
            "this makes you the owner of every image of user '{other}'; it is meant for maintenance, \
             when {other} no longer works with walt (use walt advanced fix-image-owner \
             --yes-i-know-do-it-please {other} to do it)"
        ));
    }
    let settings = config::load()?;
    let mut client = images_client(&settings).await?;
    let reply = client
        .fix_image_owner(pb::FixImageOwnerRequest {
            other_user: other_user.trim().to_string(),
        })
        .await
        .map_err(|s| match s.code() {
            tonic::Code::Unimplemented => anyhow!(
                "the walt server does not know walt advanced fix-image-owner (it is older than this client)"
            ),
            _ => status_error(s),
        })?
        .into_inner();
    for image in &reply.images {
        println!(
            "Image {} now belongs to you.",
            walt_core::text::one_line(image)
        );
    }
    Ok(())
}
