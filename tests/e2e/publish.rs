//! `walt image publish`: to a plain registry (through the counting proxy)
//! and to the TLS + basic auth one; checked with skopeo and by a clone.

use std::process::Command;

use serde_json::Value;

use crate::common::*;
use walt_e2e::image::MODELS_LABEL;
use walt_e2e::*;

/// `skopeo inspect` of `docker://127.0.0.1:PORT/<repo>`, as JSON.
fn skopeo_inspect(port: u16, repo: &str, creds: Option<&str>) -> Value {
    let mut cmd = Command::new("skopeo");
    cmd.args(["--insecure-policy", "inspect", "--tls-verify=false"]);
    if let Some(c) = creds {
        cmd.args(["--creds", c]);
    }
    cmd.arg(format!("docker://127.0.0.1:{port}/{repo}"));
    let out = cmd.output().expect("skopeo");
    assert!(
        out.status.success(),
        "skopeo inspect {repo}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Blob writes (upload starts, chunks, monolithic PUTs) the proxy saw.
fn blob_writes(requests: &[String]) -> Vec<String> {
    requests
        .iter()
        .filter(|r| {
            (r.starts_with("PUT ") || r.starts_with("PATCH ") || r.starts_with("POST "))
                && r.contains("/blobs/")
        })
        .cloned()
        .collect()
}

/// local, secure and flaky (the proxy in front of local); alice holds
/// `busybox`, cloned from local.
fn publish_env() -> (Env, BuiltImage) {
    let env = Env::start_with(EnvOpts {
        secure: true,
        proxy: true,
        ..Default::default()
    });
    let img = push_busybox(&env, "walt-test/busybox", "latest");
    assert_cloned(&env.alice.clone_ok(&["local:walt-test/busybox"]), "busybox");
    (env, img)
}

#[track_caller]
fn publish_ok(walt: &Walt, args: &[&str]) -> CmdOutput {
    let mut a = vec!["image", "publish"];
    a.extend_from_slice(args);
    let out = walt.run(&a);
    out.assert_success();
    out
}

#[test]
fn publish_to_a_plain_registry_then_clone_it_back() {
    let (env, img) = publish_env();
    let proxy = env.proxy.as_ref().unwrap();

    let out = publish_ok(&env.alice, &["--registry", "flaky", "busybox"]);
    assert_eq!(
        out.last_stdout_line(),
        "Image busybox published: flaky:alice/busybox",
        "{out}"
    );
    let first = blob_writes(&proxy.stats().requests);
    assert!(!first.is_empty(), "{:?}", proxy.stats().requests);

    // An independent client sees a walt image, byte for byte the same.
    let v = skopeo_inspect(env.local.port(), "alice/busybox", None);
    assert_eq!(v["Labels"][MODELS_LABEL], "pc-x86-64", "{v}");
    assert_eq!(v["Digest"], img.manifest_digest.as_str(), "{v}");

    // Again: every blob is there already, only the manifest is sent.
    let before = proxy.stats().requests.len();
    let out = publish_ok(&env.alice, &["--registry", "flaky", "busybox"]);
    assert_eq!(
        out.last_stdout_line(),
        "Image busybox published: flaky:alice/busybox",
        "{out}"
    );
    let again: Vec<String> = proxy.stats().requests[before..].to_vec();
    assert!(blob_writes(&again).is_empty(), "{again:?}");
    assert!(
        again
            .iter()
            .any(|r| r.starts_with("PUT ") && r.contains("/manifests/latest")),
        "{again:?}"
    );

    // Bob clones what alice published.
    let out = env.bob.clone_ok(&["flaky:alice/busybox", "from-alice"]);
    assert_cloned(&out, "from-alice");
    assert!(
        env.bob
            .show_row("from-alice")
            .unwrap()
            .contains("pc-x86-64")
    );
}

#[test]
fn publish_a_tagged_image_to_the_tls_basic_auth_registry() {
    let (env, img) = publish_env();
    env.alice
        .run(&["image", "rename", "busybox", "bb:v2"])
        .assert_success();
    let out = publish_ok(&env.alice, &["--registry", "secure", "bb:v2"]);
    // The registry username names the repository.
    assert_eq!(
        out.last_stdout_line(),
        format!("Image bb:v2 published: secure:{SECURE_USER}/bb:v2"),
        "{out}"
    );
    let port = env.secure.as_ref().unwrap().port();
    let creds = format!("{SECURE_USER}:{SECURE_PASS}");
    let v = skopeo_inspect(port, &format!("{SECURE_USER}/bb:v2"), Some(&creds));
    assert_eq!(v["Labels"][MODELS_LABEL], "pc-x86-64", "{v}");
    assert_eq!(v["Digest"], img.manifest_digest.as_str(), "{v}");
    let out = env
        .bob
        .clone_ok(&[&format!("secure:{SECURE_USER}/bb:v2"), "bb"]);
    assert_cloned(&out, "bb");
}

#[test]
fn publish_refusals() {
    let (env, _) = publish_env();
    // Three registries: auto cannot choose, and says which there are.
    let out = env.alice.run(&["image", "publish", "busybox"]);
    out.assert_failure("--registry");
    for label in ["local", "secure", "flaky"] {
        assert!(out.stderr.contains(label), "{out}");
    }
    // The hint is a command to run as it is.
    assert!(
        out.stderr
            .contains("(walt image publish --registry local busybox)"),
        "{out}"
    );
    env.alice
        .run(&["image", "publish", "--registry", "walt", "busybox"])
        .assert_failure("not a registry");
    env.alice
        .run(&["image", "publish", "--registry", "docker", "busybox"])
        .assert_failure("not a registry");
    env.alice
        .run(&["image", "publish", "--registry", "hub", "busybox"])
        .assert_failure("hub is not enabled");
    env.alice
        .run(&["image", "publish", "--registry", "nowhere", "busybox"])
        .assert_failure("unknown registry");
    env.alice
        .run(&["image", "publish", "--registry", "local", "missing"])
        .assert_failure("not found");
    // Wrong credentials, then none at all.
    env.bob
        .set_credentials(&[("secure", SECURE_USER, "not-the-password")])
        .unwrap();
    env.bob.clone_ok(&["local:walt-test/busybox"]);
    env.bob
        .run(&["image", "publish", "--registry", "secure", "busybox"])
        .assert_failure("authentication failed");
    env.bob.set_credentials(&[]).unwrap();
    env.bob
        .run(&["image", "publish", "--registry", "secure", "busybox"])
        .assert_failure("requires credentials");
}

#[test]
fn publish_auto_with_a_single_registry() {
    let env = Env::start();
    push_busybox(&env, "walt-test/busybox", "latest");
    env.alice.clone_ok(&["local:walt-test/busybox", "mine"]);
    let out = publish_ok(&env.alice, &["mine"]);
    assert_eq!(
        out.last_stdout_line(),
        "Image mine published: local:alice/mine",
        "{out}"
    );
    let v = skopeo_inspect(env.local.port(), "alice/mine", None);
    assert_eq!(v["Labels"][MODELS_LABEL], "pc-x86-64", "{v}");
}

#[test]
fn publish_mounts_blobs_the_registry_already_has_elsewhere() {
    let env = Env::start_with(EnvOpts {
        proxy: true,
        ..Default::default()
    });
    push_busybox(&env, "walt-test/busybox", "latest");
    // Cloned from the registry it is published to: the server knows which
    // repository holds the blobs.
    assert_cloned(
        &env.alice.clone_ok(&["flaky:walt-test/busybox", "mine"]),
        "mine",
    );
    let proxy = env.proxy.as_ref().unwrap();
    let before = proxy.stats().requests.len();
    let out = publish_ok(&env.alice, &["--registry", "flaky", "mine"]);
    assert_eq!(
        out.last_stdout_line(),
        "Image mine published: flaky:alice/mine",
        "{out}"
    );
    let reqs: Vec<String> = proxy.stats().requests[before..].to_vec();
    let mounts: Vec<&String> = reqs
        .iter()
        .filter(|r| r.starts_with("POST ") && r.contains("mount=") && r.ends_with("-> 201"))
        .collect();
    assert!(!mounts.is_empty(), "{reqs:?}");
    assert!(
        !reqs
            .iter()
            .any(|r| (r.starts_with("PUT ") || r.starts_with("PATCH ")) && r.contains("/blobs/")),
        "{reqs:?}"
    );
    let v = skopeo_inspect(env.local.port(), "alice/mine", None);
    assert_eq!(v["Labels"][MODELS_LABEL], "pc-x86-64", "{v}");
}

#[test]
fn publish_a_docker_image_with_a_layer_sent_in_chunks() {
    let env = Env::start_with(EnvOpts {
        proxy: true,
        ..Default::default()
    });
    let base = env
        .images
        .busybox_layer(Format::Docker, Compression::Gzip, "chunks")
        .unwrap();
    // more than one 32 MiB chunk
    let big = env
        .images
        .big_random_layer(Format::Docker, Compression::None, 40 << 20, 11)
        .unwrap();
    let img = env
        .images
        .image(
            Format::Docker,
            ImageConfig::amd64("pc-x86-64"),
            &[base, big],
        )
        .unwrap();
    env.push_local("walt-test/big", "v1", &img);
    assert_cloned(&env.alice.clone_ok(&["local:walt-test/big:v1"]), "big:v1");

    let proxy = env.proxy.as_ref().unwrap();
    let out = publish_ok(&env.alice, &["--registry", "flaky", "big:v1"]);
    assert_eq!(
        out.last_stdout_line(),
        "Image big:v1 published: flaky:alice/big:v1",
        "{out}"
    );
    let reqs = proxy.stats().requests;
    let patches = reqs
        .iter()
        .filter(|r| r.starts_with("PATCH ") && r.ends_with("-> 202"))
        .count();
    assert_eq!(patches, 2, "{reqs:?}");
    let v = skopeo_inspect(env.local.port(), "alice/big:v1", None);
    assert_eq!(v["Digest"], img.manifest_digest.as_str(), "{v}");
    assert_eq!(v["Labels"][MODELS_LABEL], "pc-x86-64", "{v}");
    assert_cloned(&env.bob.clone_ok(&["flaky:alice/big:v1"]), "big:v1");
}

/// The real Docker daemon pulls what walt published and sees its label.
#[test]
fn docker_pulls_a_published_image() {
    let env = Env::start();
    push_busybox(&env, "walt-test/busybox", "latest");
    assert_cloned(&env.alice.clone_ok(&["local:walt-test/busybox"]), "busybox");
    env.alice
        .run(&["image", "duplicate", "busybox", "pub-bb"])
        .assert_success();
    let out = publish_ok(&env.alice, &["--registry", "local", "pub-bb"]);
    assert!(
        out.last_stdout_line().contains("local:alice/pub-bb"),
        "{out}"
    );

    let dockerd = walt_e2e::docker::Dockerd::start().unwrap();
    let reference = format!("{}/alice/pub-bb:latest", env.local.host_port());
    // 127.0.0.0/8 registries are plain HTTP for Docker without configuration.
    dockerd
        .docker(&["pull", &reference])
        .unwrap_or_else(|e| panic!("docker pull {reference}: {e}\n{}", dockerd.log()));
    let inspect = dockerd
        .docker(&[
            "image",
            "inspect",
            "--format",
            "{{json .Config.Labels}}",
            &reference,
        ])
        .unwrap();
    let labels: Value = serde_json::from_slice(&inspect.stdout).unwrap();
    assert_eq!(labels[MODELS_LABEL], "pc-x86-64", "{labels}");
    let run = dockerd
        .docker(&[
            "run",
            "--rm",
            "--pull=never",
            "--network=none",
            &reference,
            "/bin/cat",
            "/etc/walt-test-marker",
        ])
        .unwrap_or_else(|e| panic!("docker run: {e}\n{}", dockerd.log()));
    assert!(!String::from_utf8_lossy(&run.stdout).trim().is_empty());
}
