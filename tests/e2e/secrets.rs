//! Registry credentials stay with the client: the server neither logs nor
//! stores them, whether they are right or wrong.

use base64::Engine as _;

use crate::common::*;
use walt_e2e::*;

fn files_contain(dir: &std::path::Path, needle: &[u8]) -> Vec<String> {
    let mut hits = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            let Ok(meta) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            if meta.is_dir() {
                stack.push(p);
            } else if meta.is_file() {
                let data = std::fs::read(&p).unwrap_or_default();
                if data.windows(needle.len()).any(|w| w == needle) {
                    hits.push(p.display().to_string());
                }
            }
        }
    }
    hits
}

#[test]
fn credentials_never_reach_server_logs_or_disk() {
    let (env, _) = crate::registries::secure_env(EnvOpts::default());

    // A wrong password first (its error path logs), then the right one.
    let wrong = "wr0ng-Secret-xyz";
    env.alice
        .set_credentials(&[("secure", SECURE_USER, wrong)])
        .unwrap();
    env.alice
        .clone(&["secure:walter/busybox"])
        .assert_failure("authentication failed");
    env.alice
        .set_credentials(&[("secure", SECURE_USER, SECURE_PASS)])
        .unwrap();
    assert_cloned(&env.alice.clone_ok(&["secure:walter/busybox"]), "busybox");

    let log = env.server.log();
    assert!(
        log.contains("secure"),
        "the server log should mention the clone:\n{log}"
    );
    let b64 =
        |p: &str| base64::engine::general_purpose::STANDARD.encode(format!("{SECURE_USER}:{p}"));
    for secret in [
        wrong.to_string(),
        SECURE_PASS.to_string(),
        b64(wrong),
        b64(SECURE_PASS),
    ] {
        assert!(
            !log.contains(&secret),
            "secret `{secret}` in the server log"
        );
        let hits = files_contain(&env.server.data_dir(), secret.as_bytes());
        assert!(hits.is_empty(), "secret `{secret}` stored in {hits:?}");
    }
}
