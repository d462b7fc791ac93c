//! Registries with `auth: token` (Bearer tokens from a token server the
//! harness runs): Basic credentials go to the token server only over
//! verified https, or to the `http` registry's own host; never to a plain
//! http realm elsewhere, nor to another host under `https-no-verify`; and a
//! call sends only the credentials of the registry it uses.

use crate::common::*;
use walt_e2e::registry::registry_entry;
use walt_e2e::*;

const TOKEN_USER: &str = "walter";
const TOKEN_PASS: &str = "t0ken-Pass-tok";
const OTHER_USER: &str = "oscar";
const OTHER_PASS: &str = "0ther-Pass-tok2";

/// Where the realm is, as the registry announces it.
struct Setup {
    /// The issuer serves HTTPS (the test certificate).
    issuer_tls: bool,
    /// Host the realm URL names: `127.0.0.1` (the registry's) or `localhost`.
    realm_host: &'static str,
    /// The registries serve HTTPS (the test certificate).
    registry_tls: bool,
    /// `protocol:` of their entries (`https` comes with the test CA as `ca-file`).
    protocol: &'static str,
}

struct TokenEnv {
    issuer: TokenIssuer,
    _local: Registry,
    _tok: Registry,
    _tok2: Registry,
    server: WaltServer,
    alice: Walt,
    bob: Walt,
}

/// `local` (plain, holding walter/busybox), and two token registries `tok`
/// and `tok2` sharing one issuer; alice and bob have credentials for both
/// (their own account on each); alice has busybox in her working set.
fn token_env(s: Setup) -> TokenEnv {
    let issuer = TokenIssuer::start(
        s.issuer_tls,
        &[(TOKEN_USER, TOKEN_PASS), (OTHER_USER, OTHER_PASS)],
    )
    .unwrap();
    let local = Registry::start(RegistryOpts::plain()).unwrap();
    let images = ImageBuilder::new().unwrap();
    let img = images
        .busybox_image(Format::Oci, Compression::Gzip, "pc-x86-64")
        .unwrap();
    local
        .client()
        .push_image("walter/busybox", "latest", &img)
        .unwrap();
    let start = |service: &str| {
        Registry::start(RegistryOpts::token(
            s.registry_tls,
            issuer.token_auth(s.realm_host, service),
        ))
        .unwrap()
    };
    let (tok, tok2) = (start("tok-service"), start("tok2-service"));
    let entry = |r: &Registry, label: &str| match s.protocol {
        "https-no-verify" => r.server_entry_no_verify(label),
        "https" => r.server_entry(label),
        p => registry_entry(label, r.port(), p, true),
    };
    let server = WaltServer::start(&[
        local.server_entry("local"),
        entry(&tok, "tok"),
        entry(&tok2, "tok2"),
    ])
    .unwrap();
    let creds = [
        ("tok", TOKEN_USER, TOKEN_PASS),
        ("tok2", OTHER_USER, OTHER_PASS),
    ];
    let alice = server.cli("alice", &creds);
    let bob = server.cli("bob", &creds);
    assert_cloned(&alice.clone_ok(&["local:walter/busybox"]), "busybox");
    TokenEnv {
        issuer,
        _local: local,
        _tok: tok,
        _tok2: tok2,
        server,
        alice,
        bob,
    }
}

fn publish(walt: &Walt, registry: &str) -> CmdOutput {
    walt.run(&["image", "publish", "--registry", registry, "busybox"])
}

#[test]
fn verified_https_realm_gets_the_credentials_of_the_registry_used_only() {
    let env = token_env(Setup {
        issuer_tls: true,
        realm_host: "localhost",
        registry_tls: true,
        protocol: "https",
    });
    let out = publish(&env.alice, "tok");
    out.assert_success();
    assert!(
        out.stdout.contains("published: tok:walter/busybox"),
        "{out}"
    );
    let seen = env.issuer.requests();
    assert!(!seen.is_empty(), "the publish asked for no token");
    for r in &seen {
        // Only tok's token server exchange, with tok's credentials.
        assert_eq!(r.service, "tok-service", "{r:?}");
        assert_eq!(
            r.basic,
            Some((TOKEN_USER.to_string(), TOKEN_PASS.to_string())),
            "{r:?}"
        );
    }
    // The registry names the actions in either order.
    assert!(
        seen.iter().any(|r| r.scopes.iter().any(|s| {
            s.contains("walter/busybox:pull,push") || s.contains("walter/busybox:push,pull")
        })),
        "{seen:?}"
    );

    // Cloning it back from tok: tok2's password goes nowhere.
    let before = env.issuer.requests().len();
    assert_cloned(&env.bob.clone_ok(&["tok:walter/busybox", "mine"]), "mine");
    let clone_requests = &env.issuer.requests()[before..];
    assert!(!clone_requests.is_empty());
    assert!(
        clone_requests.iter().all(|r| r.service == "tok-service"
            && r.basic.as_ref().map(|b| b.1.as_str()) == Some(TOKEN_PASS)),
        "{clone_requests:?}"
    );

    // A search queries both token registries, each with its own account.
    let before = env.issuer.requests().len();
    let out = env.alice.run(&["image", "search", "busybox"]);
    out.assert_success();
    assert!(out.stdout.contains("tok:walter/busybox"), "{out}");
    for r in &env.issuer.requests()[before..] {
        let expected = match r.service.as_str() {
            "tok-service" => TOKEN_PASS,
            "tok2-service" => OTHER_PASS,
            s => panic!("unexpected service {s}"),
        };
        assert_eq!(r.basic.as_ref().map(|b| b.1.as_str()), Some(expected));
    }
    assert!(!env.server.log().contains(TOKEN_PASS));
}

#[test]
fn plain_http_realm_on_another_host_gets_no_credentials() {
    let env = token_env(Setup {
        issuer_tls: false,
        realm_host: "localhost",
        registry_tls: false,
        protocol: "http",
    });
    let out = env.bob.clone(&["tok:walter/busybox"]);
    out.assert_failure("not trusted with credentials");
    assert!(out.stderr.contains("plain http"), "{out}");
    let out = publish(&env.alice, "tok");
    out.assert_failure("not trusted with credentials");
    // It was asked (anonymously, in case that is enough), never with a password.
    assert!(!env.issuer.requests().is_empty());
    assert_eq!(env.issuer.passwords_seen(), Vec::<String>::new());
}

#[test]
fn https_no_verify_does_not_extend_to_a_realm_on_another_host() {
    // The registry is not verified (as configured); the realm, on another
    // host, presents a certificate the system does not trust: refused,
    // and it gets no credentials.
    let env = token_env(Setup {
        issuer_tls: true,
        realm_host: "localhost",
        registry_tls: true,
        protocol: "https-no-verify",
    });
    let out = env.bob.clone(&["tok:walter/busybox"]);
    out.assert_failure("not trusted with credentials");
    assert!(out.stderr.contains("cannot be verified"), "{out}");
    assert_eq!(env.issuer.passwords_seen(), Vec::<String>::new());
}

#[test]
fn http_registry_sends_credentials_to_a_realm_on_its_own_host() {
    let env = token_env(Setup {
        issuer_tls: false,
        realm_host: "127.0.0.1",
        registry_tls: false,
        protocol: "http",
    });
    publish(&env.alice, "tok").assert_success();
    assert_cloned(&env.bob.clone_ok(&["tok:walter/busybox", "mine"]), "mine");
    let seen = env.issuer.passwords_seen();
    assert!(!seen.is_empty());
    assert!(seen.iter().all(|p| p == TOKEN_PASS), "{seen:?}");
}

#[test]
fn https_no_verify_registry_sends_credentials_to_a_realm_on_its_own_host() {
    // The admin chose not to verify this host: its own token server is
    // trusted as the registry is (reached unverified, with credentials).
    let env = token_env(Setup {
        issuer_tls: true,
        realm_host: "127.0.0.1",
        registry_tls: true,
        protocol: "https-no-verify",
    });
    publish(&env.alice, "tok").assert_success();
    let seen = env.issuer.passwords_seen();
    assert!(!seen.is_empty());
    assert!(seen.iter().all(|p| p == TOKEN_PASS), "{seen:?}");
}
