//! `walt image build`: a FROM image that is not in the store is fetched
//! through the configured sources in clone order (the hub when enabled,
//! the docker-registry-v2 registries of server.conf in order, then the
//! Docker daemon), anonymously; a base needs no `walt.node.models` label,
//! the built image does. Real registries, a real dockerd, the real binaries.

use walt_e2e::docker::Dockerd;
use walt_e2e::*;

/// A build context holding `dockerfile` as its Dockerfile.
fn context(dockerfile: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("Dockerfile"), dockerfile).unwrap();
    dir
}

/// `walt image build --from-dir <context of dockerfile> name`.
fn build(w: &Walt, dockerfile: &str, name: &str) -> CmdOutput {
    let ctx = context(dockerfile);
    w.run(&[
        "image",
        "build",
        "--from-dir",
        ctx.path().to_str().unwrap(),
        name,
    ])
}

/// The base busybox image of these tests: no `walt.node.models` label,
/// `/etc/walt-test-marker` holding `marker`.
fn unlabelled(images: &ImageBuilder, marker: &str) -> BuiltImage {
    let layer = images
        .busybox_layer(Format::Oci, Compression::Gzip, marker)
        .unwrap();
    images
        .image(Format::Oci, ImageConfig::amd64_unlabelled(), &[layer])
        .unwrap()
}

/// The base's marker file in `w`'s image `image`, read back with `walt image cp`.
fn marker(w: &Walt, image: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    w.run(&[
        "image",
        "cp",
        &format!("{image}:/etc/walt-test-marker"),
        dir.path().to_str().unwrap(),
    ])
    .assert_success();
    std::fs::read_to_string(dir.path().join("walt-test-marker")).unwrap()
}

/// Everything the build printed.
fn said(out: &CmdOutput) -> String {
    format!("{}{}", out.stdout, out.stderr)
}

/// Asserts `w`'s working set is exactly `names`.
#[track_caller]
fn assert_images(w: &Walt, names: &[&str]) {
    let mut got = w.image_names();
    got.sort();
    let mut want: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(got, want);
}

#[test]
fn build_on_registry_bases_without_and_with_user() {
    let env = Env::start();
    // A bare name is `library/<name>` on every registry, as on the hub.
    env.push_local(
        "library/bbase",
        "latest",
        &unlabelled(&env.images, "bare base"),
    );
    env.push_local("team/bbase", "v1", &unlabelled(&env.images, "team base"));
    let labelled = "LABEL walt.node.models=pc-x86-64\n";

    let out = build(&env.alice, &format!("FROM bbase\n{labelled}"), "from-bare");
    out.assert_success();
    assert!(said(&out).contains("local:library/bbase:latest"), "{out}");
    assert_eq!(marker(&env.alice, "from-bare"), "bare base\n");
    let row = env.alice.show_row("from-bare").expect("from-bare listed");
    assert!(row.contains("pc-x86-64"), "{row}");

    let out = build(
        &env.alice,
        &format!("FROM team/bbase:v1\n{labelled}"),
        "from-team",
    );
    out.assert_success();
    assert!(said(&out).contains("local:team/bbase:v1"), "{out}");
    assert_eq!(marker(&env.alice, "from-team"), "team base\n");

    // The base needs no label; the result does.
    let out = build(&env.alice, "FROM team/bbase:v1\n", "no-label");
    out.assert_failure("walt.node.models");

    // Fetched bases are not images of the working set.
    assert_images(&env.alice, &["from-bare", "from-team"]);
    assert_tmp_empty(&env.server.data_dir());
}

#[test]
fn base_found_nowhere_or_behind_credentials() {
    let local = Registry::start(RegistryOpts::plain()).unwrap();
    let secure = Registry::start(RegistryOpts::tls_basic(SECURE_USER, SECURE_PASS)).unwrap();
    let images = ImageBuilder::new().unwrap();
    secure
        .client()
        .push_image("team/only-secure", "latest", &unlabelled(&images, "secret"))
        .unwrap();
    secure
        .client()
        .push_image("team/both", "latest", &unlabelled(&images, "secure copy"))
        .unwrap();
    local
        .client()
        .push_image("team/both", "latest", &unlabelled(&images, "local copy"))
        .unwrap();
    // `secure` first: it is tried before `local`. The Docker daemon's
    // socket is configured but nothing listens there.
    let none = tempfile::tempdir().unwrap();
    let yaml = format!(
        "registries:\n{}{}docker:\n    socket: {}\n",
        secure.server_entry("secure"),
        local.server_entry("local"),
        none.path().join("docker.sock").display()
    );
    let server = WaltServer::start_with_config(&yaml).unwrap();
    // Even a user with credentials for `secure`: bases are fetched anonymously.
    let alice = server.cli("alice", &[("secure", SECURE_USER, SECURE_PASS)]);
    let labelled = "LABEL walt.node.models=pc-x86-64\n";
    let auth = "secure: requires credentials (base images are fetched anonymously)";

    let out = build(&alice, &format!("FROM nothing-here:v1\n{labelled}"), "img");
    out.assert_failure(&format!(
        "base image 'nothing-here:v1' not found: hub: not enabled; {auth}; local: not found; docker: not running"
    ));

    let out = build(&alice, &format!("FROM team/only-secure\n{labelled}"), "img");
    out.assert_failure(&format!(
        "base image 'team/only-secure' not found: hub: not enabled; {auth}; local: not found; docker: not running"
    ));
    assert_images(&alice, &[]);
    assert_tmp_empty(&server.data_dir());

    // Passed over with its reason, then found in the next registry.
    let out = build(&alice, &format!("FROM team/both\n{labelled}"), "both");
    out.assert_success();
    let text = said(&out);
    assert!(text.contains("local:team/both:latest"), "{out}");
    assert!(
        text.contains(
            "warning: secure skipped: requires credentials (base images are fetched anonymously)"
        ),
        "{out}"
    );
    assert_eq!(marker(&alice, "both"), "local copy\n");
    assert_images(&alice, &["both"]);
}

#[test]
fn base_from_the_docker_daemon_after_the_registries() {
    let dockerd = Dockerd::start().unwrap();
    dockerd
        .import_busybox("dockbase:latest", None, "from dockerd")
        .unwrap();
    let local = Registry::start(RegistryOpts::plain()).unwrap();
    let yaml = format!(
        "registries:\n{}docker:\n    socket: {}\n",
        local.server_entry("local"),
        dockerd.socket().display()
    );
    let server = WaltServer::start_with_config(&yaml).unwrap();
    let alice = server.cli("alice", &[]);

    let out = build(
        &alice,
        "FROM dockbase\nLABEL walt.node.models=pc-x86-64\n",
        "from-docker",
    );
    out.assert_success();
    assert!(
        said(&out).contains("docker:library/dockbase:latest"),
        "{out}"
    );
    assert_eq!(marker(&alice, "from-docker"), "from dockerd\n");
    assert_images(&alice, &["from-docker"]);

    // The daemon answers, and has not got it either.
    let out = build(
        &alice,
        "FROM dockbase:v9\nLABEL walt.node.models=pc-x86-64\n",
        "nope",
    );
    out.assert_failure(
        "base image 'dockbase:v9' not found: hub: not enabled; local: not found; docker: not found",
    );
}

/// A name that gives a registry host is refused before anything is fetched.
#[test]
fn base_on_another_registry_host_is_refused() {
    let env = Env::start();
    let out = build(
        &env.alice,
        "FROM quay.io/team/x:1\nLABEL walt.node.models=pc-x86-64\n",
        "img",
    );
    out.assert_failure("'quay.io'");
    assert_images(&env.alice, &[]);
    assert_tmp_empty(&env.server.data_dir());
}
