//! TLS, basic auth and unverified HTTPS registries.

use crate::common::*;
use walt_e2e::registry::registry_entry;
use walt_e2e::*;

pub(crate) fn secure_env(opts: EnvOpts) -> (Env, BuiltImage) {
    let env = Env::start_with(EnvOpts {
        secure: true,
        ..opts
    });
    let img = env.busybox();
    env.secure
        .as_ref()
        .unwrap()
        .client()
        .push_image("walter/busybox", "latest", &img)
        .unwrap();
    (env, img)
}

#[test]
fn tls_basic_auth_registry_with_credentials() {
    let (env, img) = secure_env(EnvOpts::default());
    let out = env.alice.clone_ok(&["secure:walter/busybox"]);
    assert_cloned(&out, "busybox");
    assert!(env.alice.show_row("busybox").unwrap().contains("pc-x86-64"));
    assert!(store_has_layer(&env, &img, 0));
    assert_tmp_empty(&env.server.data_dir());
}

#[test]
fn tls_basic_auth_registry_wrong_credentials() {
    let (env, _) = secure_env(EnvOpts::default());
    env.alice
        .set_credentials(&[("secure", SECURE_USER, "not-the-password")])
        .unwrap();
    let before = env.snapshot();
    env.alice
        .clone(&["secure:walter/busybox"])
        .assert_failure("authentication failed");
    env.assert_unchanged(&before);
}

#[test]
fn tls_basic_auth_registry_missing_credentials() {
    let (env, _) = secure_env(EnvOpts {
        alice_without_credentials: true,
        ..Default::default()
    });
    let before = env.snapshot();
    env.alice
        .clone(&["secure:walter/busybox"])
        .assert_failure("requires credentials");
    env.assert_unchanged(&before);
}

#[test]
fn https_no_verify_registry() {
    let env = Env::start_with(EnvOpts {
        noverify: true,
        ..Default::default()
    });
    let img = env.busybox();
    env.noverify
        .as_ref()
        .unwrap()
        .client()
        .push_image("t/busybox", "v1", &img)
        .unwrap();
    let out = env.alice.clone_ok(&["noverify:t/busybox:v1"]);
    assert_cloned(&out, "busybox:v1");
    assert!(store_has_layer(&env, &img, 0));
    assert_tmp_empty(&env.server.data_dir());
}

#[test]
fn https_registry_with_an_unknown_ca_is_refused() {
    // protocol https and no ca-file: the test CA is not trusted.
    let reg = Registry::start(RegistryOpts::tls()).unwrap();
    let b = ImageBuilder::new().unwrap();
    let img = b
        .busybox_image(Format::Oci, Compression::Gzip, "pc-x86-64")
        .unwrap();
    reg.client()
        .push_image("t/busybox", "latest", &img)
        .unwrap();
    let server =
        WaltServer::start(&[registry_entry("strict", reg.port(), "https", false)]).unwrap();
    let alice = server.cli("alice", &[]);
    let before = store_snapshot(&server.data_dir(), &alice);
    alice
        .clone(&["strict:t/busybox"])
        .assert_failure_any(&["certificate", "tls", "unreachable"]);
    assert_tmp_empty(&server.data_dir());
    assert_store_unchanged(&before, &server.data_dir(), &alice);
}
