//! The service layer's conversions between the gRPC messages and the
//! engines' own types: requests in, events, results and errors out.

use std::collections::HashMap;

use tonic::{Code, Status};
use walt_core::config::{Auth, Registry, ServerConfig};
use walt_proto::v1 as pb;
use walt_registry::Credentials;

use crate::clone::{CloneRequest, CloneResult};
use crate::error::{Kind, ServiceError};
use crate::progress::{Event, LayerProgress};
use crate::publish::{PublishRequest, PublishResult};
use crate::search::{SearchEvent, SearchHit, SearchRequest};

/// The registry credentials a request carries, by one rule for every call:
/// an empty username *and* an empty password mean no credentials (`None`);
/// anything else is passed on as given, an empty field included (the
/// registry, or the operation, then says what is missing).
pub fn credentials(c: &pb::Credentials) -> Option<Credentials> {
    if c.username.is_empty() && c.password.is_empty() {
        return None;
    }
    Some(Credentials::new(c.username.clone(), c.password.clone()))
}

/// [`credentials`] of every registry of a request, by label.
fn credentials_by_label(map: &HashMap<String, pb::Credentials>) -> HashMap<String, Credentials> {
    map.iter()
        .filter_map(|(label, c)| Some((label.clone(), credentials(c)?)))
        .collect()
}

/// The registries a search queries, which of them use the caller's
/// credentials, and where `publish --registry auto` goes (the rule of
/// [`crate::publish::plan`]: the only docker-registry-v2 registry, or the
/// hub when it is the only registry).
pub fn registries(config: &ServerConfig) -> pb::RegistriesReply {
    let registries = config
        .registries
        .iter()
        .map(|r| pb::RegistryInfo {
            label: r.label().to_string(),
            uses_credentials: match r {
                Registry::V2(v) => v.auth == Auth::Basic,
                Registry::Hub(_) => true,
            },
        })
        .collect();
    let v2: Vec<&str> = config
        .registries
        .iter()
        .filter_map(|r| match r {
            Registry::V2(v) => Some(v.label.as_str()),
            Registry::Hub(_) => None,
        })
        .collect();
    let hub = crate::hub::configured(config).is_ok();
    let publish_auto = match (v2.as_slice(), hub) {
        ([only], false) => only.to_string(),
        ([], true) => "hub".to_string(),
        _ => String::new(),
    };
    pb::RegistriesReply {
        registries,
        publish_auto,
    }
}

impl From<pb::CloneRequest> for CloneRequest {
    fn from(r: pb::CloneRequest) -> Self {
        Self {
            credentials: r.credentials.as_ref().and_then(credentials),
            url: r.url,
            name: r.name,
            force: r.force,
        }
    }
}

impl From<pb::PublishRequest> for PublishRequest {
    fn from(r: pb::PublishRequest) -> Self {
        Self {
            credentials: credentials_by_label(&r.credentials),
            image: r.image,
            registry: r.registry,
        }
    }
}

impl From<pb::SearchRequest> for SearchRequest {
    fn from(r: pb::SearchRequest) -> Self {
        Self {
            credentials: credentials_by_label(&r.credentials),
            keyword: r.keyword,
        }
    }
}

impl From<LayerProgress> for pb::LayerProgress {
    fn from(p: LayerProgress) -> Self {
        Self {
            digest: p.key,
            done: p.done,
            total: p.total,
            complete: p.complete,
            cached: p.cached,
        }
    }
}

impl From<CloneResult> for pb::CloneResult {
    fn from(r: CloneResult) -> Self {
        Self {
            name: r.name,
            manifest_digest: r.manifest_digest.into(),
            layers: r.layers,
            downloaded_bytes: r.downloaded_bytes,
            replaced: r.replaced,
        }
    }
}

impl From<Event<CloneResult>> for pb::CloneEvent {
    fn from(e: Event<CloneResult>) -> Self {
        use pb::clone_event::Event as E;
        let event = match e {
            Event::Message(m) => E::Message(m),
            Event::Layer(p) => E::Progress(p.into()),
            Event::Done(r) => E::Result(r.into()),
        };
        Self { event: Some(event) }
    }
}

impl From<PublishResult> for pb::PublishResult {
    fn from(r: PublishResult) -> Self {
        Self {
            clone_url: r.clone_url,
            registry: r.registry,
            manifest_digest: r.manifest_digest.into(),
            uploaded_blobs: r.uploaded_blobs,
            uploaded_bytes: r.uploaded_bytes,
            skipped_blobs: r.skipped_blobs,
        }
    }
}

impl From<Event<PublishResult>> for pb::PublishEvent {
    fn from(e: Event<PublishResult>) -> Self {
        use pb::publish_event::Event as E;
        let event = match e {
            Event::Message(m) => E::Message(m),
            Event::Layer(p) => E::Progress(p.into()),
            Event::Done(r) => E::Result(r.into()),
        };
        Self { event: Some(event) }
    }
}

impl From<SearchHit> for pb::SearchResult {
    fn from(h: SearchHit) -> Self {
        Self {
            user: h.user,
            name: h.name,
            tag: h.tag,
            location: h.location,
            node_models: h.node_models,
            clone_url: h.clone_url,
            server_minversion: h.server_minversion,
        }
    }
}

impl From<SearchEvent> for pb::SearchEvent {
    fn from(e: SearchEvent) -> Self {
        use pb::search_event::Event as E;
        let event = match e {
            SearchEvent::Found(h) => E::Result(h.into()),
            SearchEvent::Warning(w) => E::Warning(w),
        };
        Self { event: Some(event) }
    }
}

fn code(kind: Kind) -> Code {
    match kind {
        Kind::InvalidArgument => Code::InvalidArgument,
        Kind::NotFound => Code::NotFound,
        Kind::AlreadyExists => Code::AlreadyExists,
        Kind::FailedPrecondition => Code::FailedPrecondition,
        Kind::Unimplemented => Code::Unimplemented,
        Kind::Unauthenticated => Code::Unauthenticated,
        Kind::Unavailable => Code::Unavailable,
        Kind::Internal => Code::Internal,
    }
}

impl From<ServiceError> for Status {
    fn from(e: ServiceError) -> Self {
        // One line, whatever the source said, without server paths.
        let msg = e.user_message();
        let mut status = Status::new(code(e.kind()), msg);
        // Tell the client which registry wants credentials, so that it can
        // ask its user for them and retry.
        if let Some(label) = e.registry_wanting_credentials()
            && let Ok(v) = label.parse()
        {
            status
                .metadata_mut()
                .insert(walt_proto::REGISTRY_METADATA_KEY, v);
        }
        // A refusal the user may confirm: the client asks, then retries.
        if let ServiceError::NeedsConfirmation { nodes, .. } = &e
            && let Ok(v) = nodes.to_string().parse()
        {
            status
                .metadata_mut()
                .insert(walt_proto::CONFIRM_METADATA_KEY, v);
        }
        // The client falls back to sending the archive in the stream.
        if matches!(e, ServiceError::LocalPipe(_)) {
            status.metadata_mut().insert(
                walt_proto::LOCAL_PIPE_METADATA_KEY,
                "refused".parse().unwrap(),
            );
        }
        status
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use walt_registry::RegistryError;

    fn pb_creds(u: &str, p: &str) -> pb::Credentials {
        pb::Credentials {
            username: u.into(),
            password: p.into(),
        }
    }

    #[test]
    fn empty_credentials_are_none_and_partial_ones_pass() {
        assert_eq!(credentials(&pb_creds("", "")), None);
        assert_eq!(
            credentials(&pb_creds("alice", "")),
            Some(Credentials::new("alice", ""))
        );
        assert_eq!(
            credentials(&pb_creds("", "secret")),
            Some(Credentials::new("", "secret"))
        );
        let req = pb::SearchRequest {
            keyword: "k".into(),
            credentials: [
                ("lab".to_string(), pb_creds("", "")),
                ("hub".to_string(), pb_creds("bob", "pw")),
            ]
            .into(),
        };
        let req = SearchRequest::from(req);
        assert_eq!(req.credentials.len(), 1);
        assert_eq!(req.credentials["hub"], Credentials::new("bob", "pw"));
        let req = CloneRequest::from(pb::CloneRequest {
            url: "lab:a/b".into(),
            name: String::new(),
            force: false,
            credentials: Some(pb_creds("", "")),
        });
        assert!(req.credentials.is_none());
    }

    #[test]
    fn registries_say_which_take_credentials_and_where_auto_goes() {
        let entry = |label: &str, auth: &str| {
            format!(
                "-   label: {label}\n    api: docker-registry-v2\n    description: d\n    host: h\n    port: 5000\n    protocol: http\n    auth: {auth}\n"
            )
        };
        let parse = |entries: &[String]| {
            ServerConfig::parse("t", &format!("registries:\n{}", entries.concat())).unwrap()
        };
        let reply = registries(&parse(&[entry("open", "none"), entry("lab", "basic")]));
        let got: Vec<(&str, bool)> = reply
            .registries
            .iter()
            .map(|r| (r.label.as_str(), r.uses_credentials))
            .collect();
        assert_eq!(got, vec![("open", false), ("lab", true)]);
        assert_eq!(reply.publish_auto, "");
        let reply = registries(&parse(&[entry("lab", "basic")]));
        assert_eq!(reply.publish_auto, "lab");
        let reply = registries(&ServerConfig::default_config());
        assert_eq!(reply.publish_auto, "hub");
        assert!(reply.registries.iter().all(|r| r.uses_credentials));
    }

    #[test]
    fn statuses_keep_their_codes_and_the_registry_label() {
        let s = Status::from(ServiceError::from(RegistryError::CredentialsRequired {
            label: "secure".into(),
        }));
        assert_eq!(s.code(), Code::Unauthenticated);
        assert_eq!(s.message(), "registry 'secure' requires credentials");
        assert_eq!(
            s.metadata()
                .get(walt_proto::REGISTRY_METADATA_KEY)
                .and_then(|v| v.to_str().ok()),
            Some("secure")
        );
        let s = Status::from(ServiceError::from(RegistryError::Truncated {
            label: "flaky".into(),
            digest: walt_core::Digest::from_sha256([0xab; 32]),
            received: 1,
            expected: 2,
            reason: "connection closed early".into(),
        }));
        assert_eq!(s.code(), Code::FailedPrecondition);
        assert!(
            s.metadata()
                .get(walt_proto::REGISTRY_METADATA_KEY)
                .is_none()
        );
        let s = Status::from(ServiceError::NotWaltImage {
            url: "lab:a/b:latest".into(),
        });
        assert_eq!(s.code(), Code::FailedPrecondition);
        assert_eq!(
            s.message(),
            "lab:a/b:latest is not a walt image: it has no walt.node.models label"
        );
        let s = Status::from(ServiceError::WouldOverwrite {
            image: "b".into(),
            url: "lab:a/b:latest".into(),
        });
        assert_eq!(s.code(), Code::AlreadyExists);
        // The hint is the exact command to run next.
        assert_eq!(
            s.message(),
            "image 'b' already exists in your working set (use walt image clone --force lab:a/b:latest b to overwrite it)"
        );
        let s = Status::from(ServiceError::Internal("x\ny".into()));
        assert_eq!(
            (s.code(), s.message()),
            (Code::Internal, "internal error: x y")
        );
    }
}
