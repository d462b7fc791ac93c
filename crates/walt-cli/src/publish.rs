//! `walt image publish [--registry LABEL] <image>`.

use std::collections::HashMap;
use std::io::IsTerminal;

use anyhow::anyhow;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use walt_proto::v1::{self as pb, publish_event::Event};

use super::{Client, human, status_error};
use crate::config::Settings;

/// The credentials to send: those of `registry`, or with `auto` every
/// registry's (the server picks the one it publishes to).
fn credentials(settings: &Settings, registry: &str) -> HashMap<String, pb::Credentials> {
    settings
        .config
        .registries
        .iter()
        .filter(|(label, _)| registry == "auto" || label.as_str() == registry)
        .filter(|(_, c)| !c.username.is_empty() || !c.password.is_empty())
        .map(|(label, c)| {
            (
                label.clone(),
                pb::Credentials {
                    username: c.username.clone(),
                    password: c.password.clone(),
                },
            )
        })
        .collect()
}

pub async fn publish(
    client: &mut Client,
    settings: &Settings,
    image: &str,
    registry: &str,
) -> anyhow::Result<()> {
    let registry = registry.trim();
    let mut stream = client
        .publish(pb::PublishRequest {
            image: image.to_string(),
            registry: registry.to_string(),
            credentials: credentials(settings, registry),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let mut bars = std::io::stderr().is_terminal().then(|| {
        let mp = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
        (mp, HashMap::<String, ProgressBar>::new())
    });
    let style =
        ProgressStyle::with_template("{prefix:>12} [{bar:30}] {bytes:>10}/{total_bytes:<10} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
    loop {
        let event = match stream.message().await {
            Ok(Some(ev)) => ev,
            Ok(None) => return Err(anyhow!("the server closed the publish without a result")),
            Err(s) => {
                if let Some((mp, _)) = &bars {
                    let _ = mp.clear();
                }
                return Err(status_error(s));
            }
        };
        match event.event {
            Some(Event::Message(text)) => match &bars {
                Some((mp, _)) => {
                    let _ = mp.println(&text);
                }
                None => eprintln!("{text}"),
            },
            Some(Event::Progress(p)) => {
                if let Some((mp, map)) = &mut bars {
                    let bar = map.entry(p.digest.clone()).or_insert_with(|| {
                        let b = mp.add(ProgressBar::new(p.total));
                        b.set_style(style.clone());
                        let hex = p.digest.strip_prefix("sha256:").unwrap_or(&p.digest);
                        b.set_prefix(hex.chars().take(12).collect::<String>());
                        b
                    });
                    bar.set_position(p.done);
                    if p.complete {
                        bar.finish_with_message(if p.cached {
                            "already in the registry"
                        } else {
                            "pushed"
                        });
                    }
                }
            }
            Some(Event::Result(r)) => {
                if let Some((mp, _)) = &bars {
                    let _ = mp.clear();
                }
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
