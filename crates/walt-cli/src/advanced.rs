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
