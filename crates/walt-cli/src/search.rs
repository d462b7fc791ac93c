//! `walt image search [keyword] [--json]`.

use std::collections::HashMap;

use anyhow::anyhow;
use serde::Serialize;

use walt_core::{SERVER_VERSION, compact_models};
use walt_proto::v1::{self as pb, search_event::Event};

use super::{Client, status_error};
use crate::config::Settings;
use crate::table;

/// One result as printed by `--json`.
#[derive(Debug, Serialize)]
struct Found {
    user: String,
    name: String,
    tag: String,
    location: String,
    node_models: Vec<String>,
    compatibility: String,
    clone_url: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    server_minversion: Option<u32>,
}

impl Found {
    fn from_result(r: pb::SearchResult) -> Self {
        let mut compatibility = compact_models(&r.node_models);
        if let Some(v) = r.server_minversion
            && v > SERVER_VERSION
        {
            compatibility.push_str(&format!(" (needs server >= {v})"));
        }
        Self {
            user: r.user,
            name: r.name,
            tag: r.tag,
            location: r.location,
            node_models: r.node_models,
            compatibility,
            clone_url: r.clone_url,
            server_minversion: r.server_minversion,
        }
    }

    /// WalT's Location column: where the image is, in words.
    fn location_words(&self) -> &str {
        match self.location.as_str() {
            "walt" => "walt (other user)",
            "hub" => "docker hub",
            "docker" => "docker daemon",
            _ => "custom registry",
        }
    }

    /// WalT's Clonable link column: the clone URL, or WalT's note when the
    /// image needs a newer server.
    fn link(&self) -> String {
        match self.server_minversion {
            Some(v) if v > SERVER_VERSION => format!("[Need server upgrade, version>={v}]"),
            _ => self.clone_url.clone(),
        }
    }

    /// `name` or `name:tag` (never `:latest`).
    fn image_name(&self) -> String {
        if self.tag == "latest" {
            self.name.clone()
        } else {
            format!("{}:{}", self.name, self.tag)
        }
    }
}

/// The stored credentials of the registries `wanted` names (non-empty
/// ones only), by label: what a call sends, and nothing more.
pub(super) fn credentials_for(
    settings: &Settings,
    wanted: impl Fn(&str) -> bool,
) -> HashMap<String, pb::Credentials> {
    settings
        .config
        .registries
        .iter()
        .filter(|(label, _)| wanted(label))
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

/// What a search sends: the credentials of the registries it queries
/// that take credentials.
fn search_credentials(
    settings: &Settings,
    registries: &pb::RegistriesReply,
) -> HashMap<String, pb::Credentials> {
    credentials_for(settings, |label| {
        registries
            .registries
            .iter()
            .any(|r| r.uses_credentials && r.label == label)
    })
}

pub async fn search(
    client: &mut Client,
    settings: &Settings,
    keyword: Option<String>,
    json: bool,
) -> anyhow::Result<()> {
    let keyword = keyword.unwrap_or_default();
    // Only the credentials of the registries this search queries and that
    // take credentials: the server says which.
    let registries = client
        .registries(pb::RegistriesRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    let credentials = search_credentials(settings, &registries);
    let mut stream = client
        .search(pb::SearchRequest {
            keyword: keyword.clone(),
            credentials,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let mut found = Vec::new();
    loop {
        match stream.message().await {
            Ok(Some(pb::SearchEvent { event: Some(ev) })) => match ev {
                Event::Result(r) => found.push(Found::from_result(r)),
                Event::Warning(w) => eprintln!("warning: {}", walt_core::text::one_line(&w)),
            },
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(s) => return Err(status_error(s)),
        }
    }
    found.sort_by(|a, b| {
        (&a.user, &a.name, &a.tag, &a.location, &a.clone_url).cmp(&(
            &b.user,
            &b.name,
            &b.tag,
            &b.location,
            &b.clone_url,
        ))
    });
    found.dedup_by(|a, b| a.clone_url == b.clone_url);
    if json {
        let text = serde_json::to_string_pretty(&found)
            .map_err(|e| anyhow!("cannot print the results: {e}"))?;
        println!("{text}");
    }
    if found.is_empty() {
        if keyword.trim().is_empty() {
            eprintln!("No image found.");
        } else {
            eprintln!(
                "No image matches '{}'.",
                walt_core::text::one_line(keyword.trim())
            );
        }
        return Ok(());
    }
    if !json {
        let rows: Vec<Vec<String>> = found
            .iter()
            .map(|f| {
                vec![
                    f.user.clone(),
                    f.image_name(),
                    f.location_words().to_string(),
                    walt_core::autoglob(&f.node_models),
                    f.link(),
                ]
            })
            .collect();
        println!(
            "{}",
            table::columnate(
                &[
                    "User",
                    "Image name",
                    "Location",
                    "Compatibility",
                    "Clonable link"
                ],
                &rows
            )
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ClientConfig, RegistryCredentials};

    #[test]
    fn only_the_wanted_registries_credentials_are_selected() {
        let mut config = ClientConfig::default();
        for (label, user, pass) in [("a", "alice", "pa"), ("b", "bob", "pb"), ("empty", "", "")] {
            config.registries.insert(
                label.into(),
                RegistryCredentials {
                    username: user.into(),
                    password: pass.into(),
                },
            );
        }
        let settings = Settings {
            server: "walt".into(),
            username: "me".into(),
            config,
        };
        let got = credentials_for(&settings, |l| l == "a" || l == "empty");
        assert_eq!(got.len(), 1);
        assert_eq!(got["a"].password, "pa");
        assert!(credentials_for(&settings, |_| false).is_empty());
        let all = credentials_for(&settings, |_| true);
        assert_eq!(all.keys().collect::<Vec<_>>().len(), 2);

        // A search: only the registries the server queries and that take
        // credentials ("b" is configured `auth: none` there).
        let info = |label: &str, uses_credentials| pb::RegistryInfo {
            label: label.into(),
            uses_credentials,
        };
        let reply = pb::RegistriesReply {
            registries: vec![info("a", true), info("b", false), info("c", true)],
            publish_auto: String::new(),
        };
        let sent = search_credentials(&settings, &reply);
        assert_eq!(sent.keys().collect::<Vec<_>>(), vec!["a"]);
        let none = pb::RegistriesReply::default();
        assert!(search_credentials(&settings, &none).is_empty());
    }
}
