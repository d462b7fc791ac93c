//! A class clones at once (issue 16): concurrent clones of one image, by
//! many users, download each blob once. The registry sits behind the fault
//! proxy (`flaky`), which sees every request; its rate limit keeps the
//! downloads long enough for the clones to overlap.

use std::fs;
use std::io::Read;
use std::process::Child;
use std::time::Duration;

use walt_e2e::dhcp::store_db;
use walt_e2e::util::{RandomReader, list_tree, sha256_digest, wait_for};
use walt_e2e::walt::wait_output;
use walt_e2e::*;

use crate::common::*;

const USERS: usize = 20;
const REPO: &str = "walt-test/class";
const URL: &str = "flaky:walt-test/class:latest";

/// The random layers of the class image: (size, seed).
const RANDOM_LAYERS: [(u64, u64); 3] = [(4 << 20, 161), (3 << 20, 162), (2 << 20, 163)];

/// An environment with the fault proxy in front of `local`.
fn env() -> Env {
    Env::start_with(EnvOpts {
        proxy: true,
        ..Default::default()
    })
}

fn proxy(env: &Env) -> &Proxy {
    env.proxy.as_ref().expect("the proxy was asked for")
}

/// Pushes a multi-layer image (busybox, then incompressible layers of
/// `layers` (size, seed)) as `REPO:latest`.
fn push_image(env: &Env, layers: &[(u64, u64)]) -> BuiltImage {
    let mut all = vec![
        env.images
            .busybox_layer(Format::Oci, Compression::Gzip, "class")
            .unwrap(),
    ];
    for (size, seed) in layers {
        all.push(
            env.images
                .big_random_layer(Format::Oci, Compression::Gzip, *size, *seed)
                .unwrap(),
        );
    }
    let img = env
        .images
        .image(Format::Oci, ImageConfig::amd64("pc-x86-64"), &all)
        .unwrap();
    env.push_local(REPO, "latest", &img);
    img
}

/// `n` users of their own: `student00`, `student01`, ...
fn students(env: &Env, n: usize) -> Vec<Walt> {
    (0..n)
        .map(|i| env.server.cli(&format!("student{i:02}"), &[]))
        .collect()
}

fn spawn_clone(user: &Walt) -> Child {
    user.spawn(&["image", "clone", URL, "class"])
}

fn wait_clone(child: Child, user: &Walt) -> CmdOutput {
    wait_output(
        child,
        &format!("walt image clone {URL} class (as {})", user.user),
        Duration::from_secs(300),
    )
}

/// (owner, manifest digest) of every image named `class`.
fn class_images(env: &Env) -> Vec<(String, String)> {
    let conn = store_db(&env.server.data_dir()).unwrap();
    let mut stmt = conn
        .prepare("SELECT owner, manifest_digest FROM images WHERE name = 'class' ORDER BY owner")
        .unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap()
}

/// The sha256 of what `RandomReader` gives for (size, seed).
fn random_digest(size: u64, seed: u64) -> String {
    let mut data = Vec::with_capacity(size as usize);
    RandomReader::new(seed, size)
        .read_to_end(&mut data)
        .unwrap();
    sha256_digest(&data)
}

/// Every blob of `img` was asked for at most `max` times (at least once),
/// and its manifest once.
#[track_caller]
fn assert_each_blob_requested(env: &Env, img: &BuiltImage, max: usize, exact: bool) {
    let stats = proxy(env).stats();
    let all = stats.requests.join("\n");
    for blob in img.layers.iter().chain([&img.config]) {
        let n = stats.gets(&format!("/blobs/{}", blob.digest));
        if exact {
            assert_eq!(n, max, "blob {} requested {n} times:\n{all}", blob.digest);
        } else {
            assert!(
                (1..=max).contains(&n),
                "blob {} requested {n} times (at most {max}):\n{all}",
                blob.digest
            );
        }
    }
    let n = stats.gets(&format!("/v2/{REPO}/manifests/latest"));
    assert_eq!(n, 1, "manifest requested {n} times:\n{all}");
}

/// Lines of the server log with all of `parts`.
fn log_lines_with(env: &Env, parts: &[&str]) -> usize {
    env.server
        .log()
        .lines()
        .filter(|l| parts.iter().all(|p| l.contains(p)))
        .count()
}

/// Waits until the proxy has started sending blob `digest` (its request
/// answered, the rate-limited body on its way).
fn wait_download_started(env: &Env, digest: &str) {
    wait_for(
        "the layer download to start",
        Duration::from_secs(60),
        || (proxy(env).stats().gets(digest) > 0).then_some(()),
    )
    .unwrap_or_else(|e| panic!("{e}:\n{}", proxy(env).stats().requests.join("\n")));
}

/// Waits until `n` clones joined the download of `digest` another started.
fn wait_joined(env: &Env, digest: &str, n: usize) {
    wait_for(
        "clones to join the download",
        Duration::from_secs(60),
        || (log_lines_with(env, &["joining the download of a layer", digest]) >= n).then_some(()),
    )
    .unwrap_or_else(|e| panic!("{e}\nserver log:\n{}", env.server.log()));
}

#[test]
fn twenty_clones_download_each_blob_once() {
    let env = env();
    let img = push_image(&env, &RANDOM_LAYERS);
    // About 2 s for the largest layer: the clones overlap.
    proxy(&env).rate_limit(Some(2 << 20));
    let users = students(&env, USERS);
    let children: Vec<Child> = users.iter().map(spawn_clone).collect();
    let outs: Vec<CmdOutput> = children
        .into_iter()
        .zip(&users)
        .map(|(c, u)| wait_clone(c, u))
        .collect();
    for out in &outs {
        assert_cloned(out, "class");
    }
    // One request per blob and one for the manifest, at the registry.
    assert_each_blob_requested(&env, &img, 1, true);
    // All twenty images, each the image pushed.
    let images = class_images(&env);
    let want: Vec<(String, String)> = users
        .iter()
        .map(|u| (u.user.clone(), img.manifest_digest.clone()))
        .collect();
    assert_eq!(images, want);
    // The layers are whole.
    let data = env.server.data_dir();
    for (i, (size, seed)) in RANDOM_LAYERS.iter().enumerate() {
        let diff_id = &img.diff_ids[i + 1];
        let file = data
            .join("layers")
            .join(diff_id.trim_start_matches("sha256:"))
            .join("diff/data/random.bin");
        let got = fs::read(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        assert_eq!(got.len() as u64, *size);
        assert_eq!(sha256_digest(&got), random_digest(*size, *seed));
    }
    // Each waiter saw the download as its own: the result counts it.
    for out in &outs {
        assert!(
            out.last_stdout_line().contains("downloaded"),
            "the result line should say what was downloaded:\n{out}"
        );
    }
    assert_tmp_empty(&data);
}

#[test]
fn a_registry_failing_mid_blob_fails_every_waiter_cleanly() {
    let env = env();
    let img = push_image(&env, &RANDOM_LAYERS);
    let before = env.snapshot();
    // Every blob body stops after 100 kB (configs are smaller): the
    // registry client resumes, runs out of tries, and the download fails.
    proxy(&env).truncate_blob_after(Some(100_000));
    let users = students(&env, USERS);
    let children: Vec<Child> = users.iter().map(spawn_clone).collect();
    for (child, user) in children.into_iter().zip(&users) {
        let out = wait_clone(child, user);
        out.assert_failure_any(&["truncated", "does not match"]);
        assert_eq!(
            out.error_lines().len(),
            1,
            "a failed clone says why in one line:\n{out}"
        );
    }
    // One download's requests per blob (the first, then the registry
    // client's resumes: 5 under its default policy), not one per clone.
    assert_each_blob_requested(&env, &img, 6, false);
    // Nothing stayed: no image, no blob, no layer, tmp/ empty.
    assert!(class_images(&env).is_empty());
    env.assert_unchanged(&before);
    // A failed download is not remembered: the next clone downloads.
    proxy(&env).clear_faults();
    assert_cloned(&users[0].clone_ok(&[URL, "class"]), "class");
    assert_eq!(
        class_images(&env),
        [(users[0].user.clone(), img.manifest_digest.clone())]
    );
}

#[test]
fn a_killed_clone_leaves_the_shared_download_to_the_others() {
    let env = env();
    let img = push_image(&env, &[(8 << 20, 171)]);
    let big = img.layers[1].digest.clone();
    // About 4 s for the big layer.
    proxy(&env).rate_limit(Some(2 << 20));
    let users = students(&env, 3);
    // The first clone starts the download; the others join it.
    let mut first = spawn_clone(&users[0]);
    wait_download_started(&env, &big);
    let others: Vec<Child> = users[1..].iter().map(spawn_clone).collect();
    wait_joined(&env, &big, 2);
    // The clone that started the download goes away.
    first.kill().unwrap();
    let out = wait_clone(first, &users[0]);
    assert_eq!(out.code, None, "killed before its end:\n{out}");
    for (child, user) in others.into_iter().zip(&users[1..]) {
        assert_cloned(&wait_clone(child, user), "class");
    }
    // The download went on, once.
    let stats = proxy(&env).stats();
    assert_eq!(stats.gets(&big), 1, "{}", stats.requests.join("\n"));
    assert_eq!(
        class_images(&env),
        users[1..]
            .iter()
            .map(|u| (u.user.clone(), img.manifest_digest.clone()))
            .collect::<Vec<_>>()
    );
    assert_tmp_empty(&env.server.data_dir());
}

#[test]
fn the_last_clone_gone_cancels_the_shared_download() {
    let env = env();
    let img = push_image(&env, &[(8 << 20, 181)]);
    let big = img.layers[1].digest.clone();
    let big_diff = img.diff_ids[1].clone();
    // Long enough to be stopped halfway.
    proxy(&env).rate_limit(Some(1 << 20));
    let users = students(&env, 2);
    let mut first = spawn_clone(&users[0]);
    wait_download_started(&env, &big);
    let mut second = spawn_clone(&users[1]);
    wait_joined(&env, &big, 1);
    let data = env.server.data_dir();
    for child in [&mut first, &mut second] {
        child.kill().unwrap();
        child.wait().unwrap();
    }
    // The download stops and its staging files go.
    wait_for(
        "the download to be cancelled",
        Duration::from_secs(30),
        || {
            (log_lines_with(&env, &["layer download cancelled", &big]) > 0
                && list_tree(&data.join("tmp")).is_empty())
            .then_some(())
        },
    )
    .unwrap_or_else(|e| {
        panic!(
            "{e}: tmp/ {:?}\nserver log:\n{}",
            list_tree(&data.join("tmp")),
            env.server.log()
        )
    });
    assert!(!store_mentions(&data, &big) && !store_mentions(&data, &big_diff));
    assert!(class_images(&env).is_empty());
    // Nothing is stuck on the cancelled download: a new clone fetches it.
    proxy(&env).clear_faults();
    assert_cloned(&users[1].clone_ok(&[URL, "class"]), "class");
    let stats = proxy(&env).stats();
    assert_eq!(stats.gets(&big), 2, "{}", stats.requests.join("\n"));
    assert_tmp_empty(&data);
}

/// `walt-dhcp-event commit` of a device announcing `model`, started.
fn spawn_lease(server: &WaltServer, model: &str, mac: &str, ip: &str) -> Child {
    std::process::Command::new(walt_e2e::util::workspace_bin("walt-dhcp-event"))
        .args([
            "commit",
            &format!("walt.node.{model}"),
            "",
            ip,
            mac,
            "",
            "0",
            "unknown",
        ])
        .env("WALT_DHCP_EVENT_SOCKET", server.event_socket())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("cannot run walt-dhcp-event")
}

#[test]
fn default_images_of_two_models_fetched_at_once_share_their_layers() {
    let registry = Registry::start(RegistryOpts::plain()).unwrap();
    let proxy = Proxy::start(registry.port()).unwrap();
    let images = ImageBuilder::new().unwrap();
    let layers = [
        images
            .busybox_layer(Format::Oci, Compression::Gzip, "defaults")
            .unwrap(),
        images
            .big_random_layer(Format::Oci, Compression::Gzip, 8 << 20, 191)
            .unwrap(),
    ];
    let models = ["pc-x86-64", "pc-x86-32"];
    // One image for both models, in each model's repository.
    let img = images
        .image(Format::Oci, ImageConfig::amd64(&models.join(",")), &layers)
        .unwrap();
    for m in models {
        registry
            .client()
            .push_image(&format!("waltplatform/{m}-default"), "latest", &img)
            .unwrap();
    }
    // About 4 s for the big layer: the two fetches overlap.
    proxy.rate_limit(Some(2 << 20));
    // The proxy is the only source (the Docker daemon's socket is nowhere).
    let docker = tempfile::tempdir().unwrap();
    let server = WaltServer::start_with_config(&format!(
        "registries:\n{}docker:\n    socket: {}\n",
        proxy.server_entry("local"),
        docker.path().join("docker.sock").display()
    ))
    .unwrap();
    let macs = ["52:54:00:00:16:01", "52:54:00:00:16:02"];
    let hooks: Vec<Child> = models
        .iter()
        .zip(macs)
        .enumerate()
        .map(|(i, (m, mac))| spawn_lease(&server, m, mac, &format!("192.168.152.{}", 30 + i)))
        .collect();
    for h in hooks {
        let out = h.wait_with_output().unwrap();
        assert!(out.status.success(), "walt-dhcp-event: {out:?}");
    }
    for (m, mac) in models.iter().zip(macs) {
        let dev = wait_for(
            &format!("{mac} to be a node"),
            Duration::from_secs(90),
            || {
                walt_e2e::dhcp::devices(&server.data_dir())
                    .ok()?
                    .into_iter()
                    .find(|d| d.mac == mac && d.kind == "node")
            },
        )
        .unwrap_or_else(|e| panic!("{e}\nserver log:\n{}", server.log()));
        assert_eq!(
            dev.image.as_deref(),
            Some(&*format!("waltplatform/{m}-default:latest"))
        );
    }
    // Each layer came once, from one of the two repositories.
    let stats = proxy.stats();
    for blob in &img.layers {
        assert_eq!(
            stats.gets(&blob.digest),
            1,
            "{}:\n{}",
            blob.digest,
            stats.requests.join("\n")
        );
    }
    assert_tmp_empty(&server.data_dir());
}
