//! `walt image build` with `FROM --platform=`: a scratch stage gets that
//! platform in its image config, a multi-platform base is resolved to it,
//! and a base of another platform is refused (the default images of arm
//! models are built on an amd64 server this way: images/build.sh).
//! A real registry, the real binaries.

use walt_e2e::*;

/// `walt image build --from-dir <context of dockerfile> name`.
fn build(w: &Walt, dockerfile: &str, name: &str) -> CmdOutput {
    let ctx = tempfile::tempdir().unwrap();
    std::fs::write(ctx.path().join("Dockerfile"), dockerfile).unwrap();
    std::fs::write(ctx.path().join("hello"), "hello\n").unwrap();
    w.run(&[
        "image",
        "build",
        "--from-dir",
        ctx.path().to_str().unwrap(),
        name,
    ])
}

/// `architecture` and `variant` of alice's image `name`, as its config says.
fn platform_of(env: &Env, name: &str) -> (String, Option<String>) {
    let c = walt_e2e::tree::image_config(&env.server.data_dir(), "alice", name).unwrap();
    (
        c["architecture"].as_str().unwrap_or_default().to_string(),
        c["variant"].as_str().map(str::to_string),
    )
}

/// The base's marker file in alice's image `image`.
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

fn plat(arch: &str, variant: Option<&str>) -> (String, Option<String>) {
    (arch.to_string(), variant.map(str::to_string))
}

#[test]
fn scratch_stage_takes_the_from_platform() {
    let env = Env::start();
    let cases = [
        ("linux/arm64", "rpi-4-b", plat("arm64", None)),
        ("linux/arm/v7", "rpi-2-b", plat("arm", Some("v7"))),
        // Docker's normalisation: arm alone is v7
        ("linux/arm", "rpi-3-b", plat("arm", Some("v7"))),
        ("linux/386", "pc-x86-32", plat("386", None)),
    ];
    for (i, (platform, model, want)) in cases.iter().enumerate() {
        let name = format!("p{i}");
        let out = build(
            &env.alice,
            &format!(
                "FROM --platform={platform} scratch\nCOPY hello /hello\nLABEL walt.node.models={model}\n"
            ),
            &name,
        );
        out.assert_success();
        assert!(
            format!("{}{}", out.stdout, out.stderr)
                .contains(&format!("STEP 1/3: FROM --platform={platform} scratch")),
            "{out}"
        );
        assert_eq!(&platform_of(&env, &name), want, "{platform}");
    }
    // Without --platform: the server's own platform, as before.
    build(
        &env.alice,
        "FROM scratch\nCOPY hello /hello\nLABEL walt.node.models=pc-x86-64\n",
        "host",
    )
    .assert_success();
    let (arch, _) = walt_core::oci::oci_arch(std::env::consts::ARCH);
    assert_eq!(platform_of(&env, "host").0, arch);

    // A platform walt cannot name is refused before anything is built.
    for bad in ["windows/amd64", "linux/x86_64", "linux/arm/v9"] {
        let out = build(
            &env.alice,
            &format!("FROM --platform={bad} scratch\nLABEL walt.node.models=pc-x86-64\n"),
            "bad",
        );
        out.assert_failure(&format!("unsupported platform '{bad}'"));
    }
    let mut names = env.alice.image_names();
    names.sort();
    assert_eq!(names, ["host", "p0", "p1", "p2", "p3"]);
}

#[test]
fn base_is_resolved_to_the_from_platform_or_refused() {
    let env = Env::start();
    let layer = |marker: &str| {
        env.images
            .busybox_layer(Format::Oci, Compression::Gzip, marker)
            .unwrap()
    };
    let amd64 = env
        .images
        .image(
            Format::Oci,
            ImageConfig::amd64_unlabelled(),
            &[layer("amd64 base")],
        )
        .unwrap();
    let arm64 = env
        .images
        .image(
            Format::Oci,
            ImageConfig {
                labels: vec![],
                ..ImageConfig::arm64("")
            },
            &[layer("arm64 base")],
        )
        .unwrap();
    let index = env
        .images
        .index(Format::Oci, &[amd64.clone(), arm64])
        .unwrap();
    env.push_local_index("library/multi", "latest", &index);
    env.push_local("library/single", "latest", &amd64);
    let labelled = "LABEL walt.node.models=rpi-4-b\n";

    // The index entry of the FROM's platform, not the server's.
    build(
        &env.alice,
        &format!("FROM --platform=linux/arm64 multi\n{labelled}"),
        "on-arm64",
    )
    .assert_success();
    assert_eq!(platform_of(&env, "on-arm64").0, "arm64");
    assert_eq!(marker(&env.alice, "on-arm64"), "arm64 base\n");
    // The same base without --platform is the server's entry (another cache entry).
    build(
        &env.alice,
        "FROM multi\nLABEL walt.node.models=pc-x86-64\n",
        "on-host",
    )
    .assert_success();
    assert_eq!(marker(&env.alice, "on-host"), "amd64 base\n");
    // and with it again, from the build cache: still the arm64 one
    build(
        &env.alice,
        &format!("FROM --platform=linux/arm64 multi\n{labelled}"),
        "on-arm64-again",
    )
    .assert_success();
    assert_eq!(marker(&env.alice, "on-arm64-again"), "arm64 base\n");

    // An index without that platform, a single image of another one, and an
    // image of the store of another one: refused, naming what they have.
    let out = build(
        &env.alice,
        &format!("FROM --platform=linux/arm/v7 multi\n{labelled}"),
        "img",
    );
    out.assert_failure("has no image for linux/arm/v7 (it has: linux/amd64, linux/arm64/v8)");
    let out = build(
        &env.alice,
        &format!("FROM --platform=linux/arm64 single\n{labelled}"),
        "img",
    );
    out.assert_failure("base image 'single' has no image for linux/arm64 (it has: linux/amd64)");
    let out = build(
        &env.alice,
        &format!("FROM --platform=linux/arm64 on-host\n{labelled}"),
        "img",
    );
    out.assert_failure("base image 'on-host' has no image for linux/arm64 (it has: linux/amd64)");
    // an image of the store of that platform is a fine base
    build(
        &env.alice,
        &format!("FROM --platform=linux/arm64 on-arm64\n{labelled}"),
        "img",
    )
    .assert_success();
    assert_eq!(marker(&env.alice, "img"), "arm64 base\n");
}

/// Layer digests of alice's image `name`, from its config.
fn diff_ids(env: &Env, name: &str) -> Vec<String> {
    let c = walt_e2e::tree::image_config(&env.server.data_dir(), "alice", name).unwrap();
    c["rootfs"]["diff_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn same_steps_on_the_same_inputs_give_the_same_layers() {
    // As images/build.sh builds a default image: ADD of a root filesystem
    // tar (here without a `./` entry), then COPY of a directory into one the
    // tar made. Every step runs twice (--no-cache): the layers must not
    // record when (the session's root directory, changed by the step).
    let env = Env::start();
    let ctx = tempfile::tempdir().unwrap();
    let mut tar = tar::Builder::new(Vec::new());
    for (path, data) in [
        ("boot/", None),
        ("boot/m/", None),
        ("boot/m/kernel", Some("k")),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_mtime(1_600_000_000);
        match data {
            None => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_size(0);
                tar.append_data(&mut h, path, std::io::empty()).unwrap();
            }
            Some(d) => {
                h.set_mode(0o644);
                h.set_size(d.len() as u64);
                tar.append_data(&mut h, path, d.as_bytes()).unwrap();
            }
        }
    }
    std::fs::write(ctx.path().join("rootfs.tar"), tar.into_inner().unwrap()).unwrap();
    std::fs::create_dir_all(ctx.path().join("boot/m")).unwrap();
    std::fs::write(ctx.path().join("boot/m/start.ipxe"), "#!ipxe\n").unwrap();
    std::fs::write(
        ctx.path().join("Dockerfile"),
        "FROM --platform=linux/arm64 scratch\nADD rootfs.tar /\nCOPY boot /boot\nLABEL walt.node.models=rpi-4-b\n",
    )
    .unwrap();
    let t = filetime::FileTime::from_unix_time(1_500_000_000, 0);
    for p in [
        "boot/m/start.ipxe",
        "boot/m",
        "boot",
        "Dockerfile",
        "rootfs.tar",
    ] {
        filetime::set_file_mtime(ctx.path().join(p), t).unwrap();
    }
    for name in ["one", "two"] {
        env.alice
            .run(&[
                "image",
                "build",
                "--no-cache",
                "--from-dir",
                ctx.path().to_str().unwrap(),
                name,
            ])
            .assert_success();
    }
    let (one, two) = (diff_ids(&env, "one"), diff_ids(&env, "two"));
    assert_eq!(one.len(), 2, "{one:?}");
    assert_eq!(one, two);
}
