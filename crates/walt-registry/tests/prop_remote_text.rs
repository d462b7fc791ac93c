//! Property tests of the parsers of what registries answer besides
//! manifests: error bodies, `WWW-Authenticate` challenges, the hub's
//! `walt_metadata` document. Never a panic; summaries are one bounded line;
//! challenges round trip. `PROPTEST_CASES` overrides the number of cases.

use proptest::prelude::*;
use walt_registry::hub::WaltMetadata;
use walt_registry::{parse_error_body, parse_www_authenticate, summarize_error_body};

fn config(default_cases: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default_cases);
    ProptestConfig::with_cases(cases)
}

fn error_body() -> impl Strategy<Value = Vec<u8>> {
    let text = prop_oneof![any::<String>(), "[a-z \\n\\t\\x1b\\[0-9;m\\u{202e}]{0,80}"];
    let entry = (
        prop::option::of(text.clone()),
        prop::option::of(text.clone()),
    )
        .prop_map(|(code, message)| {
            let mut e = serde_json::Map::new();
            if let Some(c) = code {
                e.insert("code".into(), c.into());
            }
            if let Some(m) = message {
                e.insert("message".into(), m.into());
            }
            e.insert("detail".into(), serde_json::json!({"x": [1, 2]}));
            serde_json::Value::Object(e)
        });
    prop_oneof![
        prop::collection::vec(entry, 0..5)
            .prop_map(|v| serde_json::to_vec(&serde_json::json!({ "errors": v })).unwrap()),
        prop::collection::vec(any::<u8>(), 0..2000),
        text.prop_map(String::into_bytes),
        "\\{\"errors\": ?[\\[\\{\"a-z:, ]{0,40}".prop_map(String::into_bytes),
    ]
}

fn challenge_text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[A-Za-z]{1,8}( [a-z_]{1,6}=(\"[^\"\\\\]{0,20}\"|[a-z0-9:/.]{0,20})(, ?[a-z_]{1,6}=(\"[^\"\\\\]{0,20}\"|[a-z0-9:/.]{0,20})){0,3})?(, [A-Za-z]{1,8} [a-z]=\"x\"){0,2}",
        "[A-Za-z ,=\"\\\\\t]{0,60}",
    ]
}

proptest! {
    #![proptest_config(config(1000))]

    #[test]
    fn prop_error_bodies_never_panic_and_summarise_to_one_bounded_line(body in error_body()) {
        let _ = parse_error_body(&body);
        if let Some(s) = summarize_error_body(&body) {
            prop_assert!(!s.is_empty());
            prop_assert!(!s.contains(['\n', '\r', '\t']), "{:?}", s);
            prop_assert!(s.chars().count() <= 303, "{} chars", s.chars().count());
        }
    }

    #[test]
    fn prop_challenges_never_panic_and_are_well_formed(h in challenge_text()) {
        for c in parse_www_authenticate(&h) {
            prop_assert!(!c.scheme.is_empty());
            prop_assert_eq!(c.scheme.to_lowercase(), c.scheme.clone());
            for (k, _) in &c.params {
                prop_assert!(!k.is_empty());
                prop_assert_eq!(k.to_lowercase(), k.clone());
            }
        }
    }

    #[test]
    fn prop_challenges_print_back(
        scheme in "[A-Za-z][A-Za-z0-9]{0,7}",
        params in prop::collection::vec(("[a-z][a-z_]{0,6}", "[ -~]{0,30}"), 1..5),
    ) {
        let quoted: Vec<String> = params
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"")))
            .collect();
        let header = format!("{scheme} {}", quoted.join(", "));
        let parsed = parse_www_authenticate(&header);
        prop_assert_eq!(parsed.len(), 1, "{}", header);
        prop_assert_eq!(&parsed[0].scheme, &scheme.to_lowercase());
        prop_assert_eq!(&parsed[0].params, &params);
    }

    #[test]
    fn prop_walt_metadata_never_panics(bytes in prop_oneof![
        prop::collection::vec(any::<u8>(), 0..500),
        "\\{\"images\": ?\\{(\"[a-z/:]{0,12}\": ?\\{\"labels\": ?\\{(\"[a-z.]{1,8}\": ?(\"[^\"\\\\]{0,10}\"|[0-9]{1,3}|null|\\[\\]),? ?){0,3}\\}\\},? ?){0,3}\\}\\}"
            .prop_map(String::into_bytes),
    ]) {
        if let Some(m) = WaltMetadata::from_json(&bytes) {
            for k in m.images.keys() {
                prop_assert!(!k.contains('/'), "key not normalised: {}", k);
            }
        }
    }
}
