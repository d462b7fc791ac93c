//! `walt image publish [--registry LABEL] <image>`.

use anyhow::anyhow;

use walt_proto::v1::{self as pb, publish_event::Event};

use super::{Client, human, status_error};
use crate::config::Settings;
use crate::progress::Bars;

pub async fn publish(
    client: &mut Client,
    settings: &Settings,
    image: &str,
    registry: &str,
) -> anyhow::Result<()> {
    let registry = registry.trim();
    // The credentials of the target only; with `auto`, the server says
    // which registry that is.
    let target = if registry.is_empty() || registry == "auto" {
        client
            .registries(pb::RegistriesRequest {})
            .await
            .map_err(status_error)?
            .into_inner()
            .publish_auto
    } else {
        registry.to_string()
    };
    let credentials =
        super::search::credentials_for(settings, |label| !target.is_empty() && label == target);
    let mut stream = client
        .publish(pb::PublishRequest {
            image: image.to_string(),
            registry: registry.to_string(),
            credentials,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let mut bars = Bars::new("already in the registry", "pushed");
    loop {
        let event = match stream.message().await {
            Ok(Some(ev)) => ev,
            Ok(None) => return Err(anyhow!("the server closed the publish without a result")),
            Err(s) => {
                bars.clear();
                return Err(status_error(s));
            }
        };
        match event.event {
            Some(Event::Message(text)) => bars.message(&text),
            Some(Event::Progress(p)) => bars.update(&p),
            Some(Event::Result(r)) => {
                bars.clear();
                let plural = |n: u64| if n == 1 { "" } else { "s" };
                if r.uploaded_blobs == 0 {
                    eprintln!(
                        "Every blob was already in registry '{}': only the manifest was sent.",
                        r.registry
                    );
                } else if r.skipped_blobs == 0 {
                    eprintln!(
                        "{} blob{} pushed to registry '{}' ({}).",
                        r.uploaded_blobs,
                        plural(r.uploaded_blobs),
                        r.registry,
                        human(r.uploaded_bytes)
                    );
                } else {
                    eprintln!(
                        "{} blob{} pushed to registry '{}' ({}), {} already there.",
                        r.uploaded_blobs,
                        plural(r.uploaded_blobs),
                        r.registry,
                        human(r.uploaded_bytes),
                        r.skipped_blobs
                    );
                }
                println!("Image {} published: {}", image.trim(), r.clone_url);
                return Ok(());
            }
            None => {}
        }
    }
}
