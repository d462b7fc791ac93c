//! Property tests of the parsers of outside input: clone URLs, image names,
//! digests, manifests and indexes, text neutralisation. `PROPTEST_CASES`
//! overrides the number of cases of each property (see docs/testing.md).

use proptest::prelude::*;
use serde_json::Value;

use walt_core::name::{ImageName, is_valid_component, normalize_component};
use walt_core::oci::{ImageConfig, ManifestDoc};
use walt_core::{CloneUrl, Digest, Location, text};

fn config(default_cases: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default_cases);
    ProptestConfig::with_cases(cases)
}

/// Strings mostly made of the characters the parsers care about.
fn url_like() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9:/._A-Z@ -]{0,40}",
        "[a-z]{1,6}:[a-z0-9._-]{0,8}/[a-z0-9./_:-]{0,24}",
        any::<String>(),
    ]
}

fn component() -> impl Strategy<Value = String> {
    "[a-z0-9]{1,5}((\\.|_|__|-{1,3})[a-z0-9]{1,5}){0,3}"
}

fn valid_url() -> impl Strategy<Value = CloneUrl> {
    let location = prop_oneof![
        Just(Location::Walt),
        Just(Location::Docker),
        Just(Location::Hub),
        "[a-z0-9-]{1,12}".prop_map(|l| match l.as_str() {
            "walt" => Location::Walt,
            "docker" => Location::Docker,
            "hub" => Location::Hub,
            _ => Location::Registry(l),
        }),
    ];
    (
        location,
        component(),
        prop::collection::vec(component(), 1..4),
        prop_oneof![Just("latest".to_string()), "[A-Za-z0-9_.-]{1,128}"],
    )
        .prop_map(|(location, user, repo, tag)| CloneUrl {
            location,
            user,
            repository: repo.join("/"),
            tag,
        })
}

/// What every accepted URL satisfies.
fn check_url_invariants(u: &CloneUrl) {
    assert!(!u.user.is_empty() && !u.user.contains(['/', ':']));
    assert!(!u.repository.is_empty());
    for part in std::iter::once(u.user.as_str()).chain(u.repository.split('/')) {
        assert!(!part.is_empty(), "empty path component in {u:?}");
        assert!(!part.contains(".."), "'..' in {u:?}");
        assert!(!part.starts_with('.'), "hidden component in {u:?}");
        assert!(
            part.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        );
    }
    assert!(!u.tag.is_empty() && u.tag.len() <= 128);
    assert!(
        u.tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    );
    let label = u.location.label();
    assert!(
        !label.is_empty()
            && label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    );
}

proptest! {
    #![proptest_config(config(1000))]

    #[test]
    fn prop_url_parse_never_panics_and_accepted_urls_are_safe(s in url_like()) {
        if let Ok(u) = CloneUrl::parse(&s) {
            check_url_invariants(&u);
            // What is accepted prints back to a URL that parses to the same value.
            prop_assert_eq!(CloneUrl::parse(&u.to_string()), Ok(u));
        }
    }

    #[test]
    fn prop_url_display_parses_back(u in valid_url()) {
        let printed = u.to_string();
        let parsed = CloneUrl::parse(&printed);
        prop_assert_eq!(parsed.as_ref(), Ok(&u), "{}", printed);
        check_url_invariants(&u);
    }

    #[test]
    fn prop_names_never_panic_and_parse_back(owner in "[a-z0-9][a-z0-9._-]{0,10}", s in url_like()) {
        if let Ok(n) = ImageName::parse_user(&owner, &s) {
            prop_assert!(is_valid_component(&n.name) && is_valid_component(&n.tag));
            prop_assert_ne!(n.name.as_str(), "default");
            prop_assert_eq!(&n.owner, &owner);
            prop_assert_eq!(ImageName::parse_user(&owner, &n.short()), Ok(n));
        }
    }

    #[test]
    fn prop_valid_names_parse_back(
        name in "[a-z0-9-]{1,30}",
        tag in prop_oneof![Just("latest".to_string()), "[a-z0-9-]{1,20}"],
    ) {
        prop_assume!(name != "default");
        let n = ImageName { owner: "u".into(), name, tag };
        prop_assert_eq!(ImageName::parse_user("u", &n.short()), Ok(n.clone()));
        prop_assert_eq!(n.to_string(), format!("u/{}", n.short()));
    }

    #[test]
    fn prop_normalised_names_are_valid_and_stable(name in any::<String>(), tag in url_like()) {
        let once = normalize_component(&name);
        prop_assert_eq!(normalize_component(&once), once.clone());
        prop_assert!(once.is_empty() || is_valid_component(&once));
        if let Ok((n, _)) = ImageName::normalized("u", &name, &tag) {
            prop_assert!(is_valid_component(&n.name) && is_valid_component(&n.tag));
            prop_assert_ne!(n.name.as_str(), "default");
            let (again, changed) = ImageName::normalized("u", &n.name, &n.tag).unwrap();
            prop_assert!(!changed);
            prop_assert_eq!(again, n.clone());
            prop_assert_eq!(ImageName::parse_user("u", &n.short()), Ok(n));
        }
    }

    #[test]
    fn prop_digests_never_panic_and_print_back(s in prop_oneof![
        "sha256:[0-9a-fA-F]{0,70}",
        "[a-z0-9]{0,8}:[0-9a-f]{60,68}",
        any::<String>(),
    ]) {
        if let Ok(d) = Digest::parse(&s) {
            prop_assert_eq!(d.as_str(), s.as_str());
            prop_assert_eq!(d.hex().len(), 64);
            prop_assert!(d.hex().bytes().all(|b| b.is_ascii_hexdigit()));
            let printed = d.to_string();
            prop_assert_eq!(Digest::parse(&printed).ok(), Some(d));
        }
    }

    #[test]
    fn prop_neutralized_text_has_no_terminal_controls(s in any::<String>()) {
        let n = text::neutralize(&s);
        prop_assert!(!n.contains(text::is_unsafe));
        let l = text::one_line(&s);
        prop_assert!(!l.contains(|c| text::is_unsafe(c) || c == '\n' || c == '\t'));
        // Printable text is kept as it is.
        if !s.contains(text::is_unsafe) {
            prop_assert_eq!(n.as_ref(), s.as_str());
        }
    }
}

// ----- manifests and indexes -----

const KEYS: &[&str] = &[
    "schemaVersion",
    "mediaType",
    "config",
    "layers",
    "manifests",
    "digest",
    "size",
    "platform",
    "architecture",
    "os",
    "variant",
    "annotations",
    "urls",
];

const STRINGS: &[&str] = &[
    walt_core::oci::OCI_MANIFEST,
    walt_core::oci::OCI_INDEX,
    walt_core::oci::DOCKER_MANIFEST,
    walt_core::oci::DOCKER_LIST,
    walt_core::oci::OCI_LAYER_GZIP,
    walt_core::oci::OCI_CONFIG,
    "sha256:0000000000000000000000000000000000000000000000000000000000000000",
    "sha256:ABCDEF0000000000000000000000000000000000000000000000000000000000",
    "sha256:../../etc/passwd",
    "sha512:00",
    "amd64",
    "linux",
    "",
];

fn json_leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        // Floats that print back exactly (serde_json's default parser may
        // change the last digit of others: not a walt matter).
        any::<i32>().prop_map(|i| Value::from(f64::from(i) / 4.0)),
        prop::sample::select(STRINGS).prop_map(Value::from),
        any::<String>().prop_map(Value::from),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    json_leaf().prop_recursive(5, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec(
                (
                    prop_oneof![
                        prop::sample::select(KEYS).prop_map(str::to_string),
                        any::<String>()
                    ],
                    inner
                ),
                0..8
            )
            .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

fn descriptor(mt: &'static str) -> impl Strategy<Value = Value> {
    ("[0-9a-f]{64}", any::<u64>(), prop::option::of(json_value())).prop_map(move |(hex, size, extra)| {
        let mut d = serde_json::json!({"mediaType": mt, "digest": format!("sha256:{hex}"), "size": size});
        if let Some(x) = extra {
            d["platform"] = x;
        }
        d
    })
}

/// Documents close to real manifests and indexes, with random parts.
fn manifest_like() -> impl Strategy<Value = Value> {
    let manifest = (
        prop::option::of(prop::sample::select(STRINGS)),
        descriptor(walt_core::oci::OCI_CONFIG),
        prop::collection::vec(descriptor(walt_core::oci::OCI_LAYER_GZIP), 0..5),
        prop::option::of(json_value()),
    )
        .prop_map(|(mt, config, layers, extra)| {
            let mut m = serde_json::json!({"schemaVersion": 2, "config": config, "layers": layers});
            if let Some(mt) = mt {
                m["mediaType"] = mt.into();
            }
            if let Some(x) = extra {
                m["annotations"] = x;
            }
            m
        });
    let index = (
        prop::option::of(prop::sample::select(STRINGS)),
        prop::collection::vec(descriptor(walt_core::oci::OCI_MANIFEST), 0..5),
    )
        .prop_map(|(mt, manifests)| {
            let mut m = serde_json::json!({"schemaVersion": 2, "manifests": manifests});
            if let Some(mt) = mt {
                m["mediaType"] = mt.into();
            }
            m
        });
    prop_oneof![manifest, index, json_value()]
}

/// What every accepted document satisfies: its descriptors name sha256
/// digests, and it prints back to a document that parses to the same value.
fn check_doc(doc: &ManifestDoc) {
    let (descriptors, printed): (Vec<_>, Vec<u8>) = match doc {
        ManifestDoc::Image(m) => (
            std::iter::once(&m.config).chain(&m.layers).collect(),
            serde_json::to_vec(m).unwrap(),
        ),
        ManifestDoc::Index(i) => (i.manifests.iter().collect(), serde_json::to_vec(i).unwrap()),
    };
    for d in descriptors {
        assert!(d.digest.as_str().starts_with("sha256:"));
        assert_eq!(d.digest.hex().len(), 64);
    }
    match (doc, ManifestDoc::parse(&printed, None)) {
        (ManifestDoc::Image(a), Ok(ManifestDoc::Image(b))) => assert_eq!(a, &b),
        (ManifestDoc::Index(a), Ok(ManifestDoc::Index(b))) => assert_eq!(a, &b),
        (_, other) => panic!("accepted document does not parse back: {other:?}"),
    }
}

proptest! {
    #![proptest_config(config(500))]

    #[test]
    fn prop_manifest_parse_never_panics_on_bytes(
        bytes in prop::collection::vec(any::<u8>(), 0..512),
        ct in prop::option::of(prop::sample::select(STRINGS)),
    ) {
        if let Ok(doc) = ManifestDoc::parse(&bytes, ct) {
            check_doc(&doc);
        }
    }

    #[test]
    fn prop_manifest_parse_never_panics_on_json(
        v in manifest_like(),
        ct in prop::option::of(prop::sample::select(STRINGS)),
    ) {
        let bytes = serde_json::to_vec(&v).unwrap();
        if let Ok(doc) = ManifestDoc::parse(&bytes, ct) {
            check_doc(&doc);
        }
        // Configs come from the same registries.
        if let Ok(c) = serde_json::from_value::<ImageConfig>(v) {
            let _ = c.label(walt_core::LABEL_NODE_MODELS);
        }
    }

    #[test]
    fn prop_deep_json_is_refused_without_overflow(depth in 100usize..5000, open in prop::sample::select(&["[", "{\"manifests\":"][..])) {
        let close = if open == "[" { "]" } else { "}" };
        let doc = format!("{}{}", open.repeat(depth), close.repeat(depth));
        // serde_json's recursion limit refuses it; no stack overflow.
        let r = ManifestDoc::parse(doc.as_bytes(), None);
        prop_assert!(r.is_err());
    }
}
