//! show and clone: the basic working-set flow.

use crate::common::*;
use walt_e2e::*;

#[test]
fn show_on_an_empty_working_set_says_no_images() {
    let env = Env::start();
    let out = env.alice.run(&["image", "show"]);
    out.assert_success();
    assert!(out.stdout.contains("Your working set is empty."), "{out}");
    let out = env.alice.run(&["image", "show", "--names-only"]);
    out.assert_success();
    assert!(
        !out.stdout.lines().any(|l| l.trim().starts_with("busybox")),
        "{out}"
    );
    assert_tmp_empty(&env.server.data_dir());
}

#[test]
fn clone_then_show_lists_it_with_compatibility() {
    let env = Env::start();
    let img = push_busybox(&env, "walt-test/busybox", "latest");
    let out = env.alice.clone_ok(&["local:walt-test/busybox"]);
    assert_cloned(&out, "busybox");

    let out = env.alice.run(&["image", "show"]);
    out.assert_success();
    let (header, _) = table(&out.stdout);
    for col in ["name", "in-use", "created", "compatibility"] {
        assert!(
            header.iter().any(|h| h == col),
            "header lacks {col}:\n{out}"
        );
    }
    assert_eq!(header.first().map(String::as_str), Some("name"), "{out}");
    let row = out
        .stdout
        .lines()
        .find(|l| l.starts_with("busybox "))
        .unwrap_or_else(|| panic!("no busybox row:\n{out}"));
    assert!(
        row.contains("pc-x86-64"),
        "compatibility missing from {row:?}"
    );
    assert!(!row.contains(":latest"), "{row:?}");
    assert_eq!(env.alice.image_names(), ["busybox"]);

    // The layer is in the store, tmp/ is clean.
    assert!(store_has_layer(&env, &img, 0), "layer not in the store");
    assert_tmp_empty(&env.server.data_dir());

    // bob: his own working set is empty; --all shows alice's image with its clone URL.
    let out = env.bob.run(&["image", "show"]);
    out.assert_success();
    assert!(out.stdout.contains("Your working set is empty."), "{out}");
    let out = env.bob.run(&["image", "show", "--all"]);
    out.assert_success();
    let (header, _) = table(&out.stdout);
    assert!(header.iter().any(|h| h == "user"), "{out}");
    assert!(header.iter().any(|h| h == "clonable-link"), "{out}");
    assert!(out.stdout.contains("walt:alice/busybox"), "{out}");
    assert!(!out.stdout.contains("walt:alice/busybox:latest"), "{out}");
}

#[test]
fn clone_onto_an_existing_name_needs_force() {
    let env = Env::start();
    push_busybox(&env, "walt-test/busybox", "latest");
    let two = env
        .images
        .busybox_image(Format::Oci, Compression::Gzip, "pc-x86-64,pc-x86-32")
        .unwrap();
    env.push_local("walt-test/busybox", "two", &two);
    env.alice.clone_ok(&["local:walt-test/busybox"]);

    let before = env.snapshot();
    let out = env.alice.clone(&["local:walt-test/busybox:two", "busybox"]);
    out.assert_failure("already exists");
    out.assert_failure("--force");
    env.assert_unchanged(&before);
    assert!(!env.alice.show_row("busybox").unwrap().contains("x86-32"));

    let out = env
        .alice
        .clone_ok(&["--force", "local:walt-test/busybox:two", "busybox"]);
    assert_cloned(&out, "busybox");
    assert_eq!(env.alice.image_names(), ["busybox"]);
    let row = env.alice.show_row("busybox").unwrap();
    assert!(
        row.contains("pc-x86-[64|32]"),
        "the image was not replaced: {row:?}"
    );
    assert_tmp_empty(&env.server.data_dir());
}

#[test]
fn clone_with_a_custom_name() {
    let env = Env::start();
    push_busybox(&env, "walt-test/busybox", "v1");
    let out = env.alice.clone_ok(&["local:walt-test/busybox:v1", "mybox"]);
    assert_cloned(&out, "mybox");
    let out = env
        .alice
        .clone_ok(&["local:walt-test/busybox:v1", "mybox:test"]);
    assert_cloned(&out, "mybox:test");
    let mut names = env.alice.image_names();
    names.sort();
    assert_eq!(names, ["mybox", "mybox:test"]);
    assert!(env.alice.show_row("mybox:test").is_some());
}

#[test]
fn default_name_is_remote_name_and_tag_normalised() {
    let env = Env::start();
    push_busybox(&env, "bob/my_img.x", "V1.0");
    let out = env.alice.clone_ok(&["local:bob/my_img.x:V1.0"]);
    assert_cloned(&out, "my-img-x:v1-0");
    assert!(
        out.stderr.to_lowercase().contains("normalised"),
        "no `normalised` notice:\n{out}"
    );
    assert_eq!(env.alice.image_names(), ["my-img-x:v1-0"]);

    // A tag that needs no change: kept, and no notice.
    push_busybox(&env, "walt-test/busybox", "v2");
    let out = env.alice.clone_ok(&["local:walt-test/busybox:v2"]);
    assert_cloned(&out, "busybox:v2");
    assert!(!out.stderr.to_lowercase().contains("normalised"), "{out}");
}

#[test]
fn reclone_under_a_new_name_reuses_present_layers() {
    let env = Env::start();
    let img = push_busybox(&env, "walt-test/busybox", "latest");
    env.alice.clone_ok(&["local:walt-test/busybox"]);
    let layers_before = walt_e2e::util::list_dir(&env.server.data_dir().join("layers"));
    assert!(
        !layers_before.is_empty(),
        "no layer in the store after a clone"
    );

    // Every layer already present: the clone still works, no new layer.
    let out = env.alice.clone_ok(&["local:walt-test/busybox", "again"]);
    assert_cloned(&out, "again");
    let layers_after = walt_e2e::util::list_dir(&env.server.data_dir().join("layers"));
    assert_eq!(layers_before, layers_after);

    // An image sharing the base layer plus one more: exactly one new layer.
    let base = Layer {
        blob: img.layers[0].clone(),
        diff_id: img.diff_ids[0].clone(),
    };
    let extra = env
        .images
        .layer(
            Format::Oci,
            Compression::Gzip,
            &[
                RawEntry::dir("root/"),
                RawEntry::file("root/hello", b"hi\n"),
            ],
        )
        .unwrap();
    let two = env
        .images
        .image(Format::Oci, ImageConfig::amd64("pc-x86-64"), &[base, extra])
        .unwrap();
    env.push_local("walt-test/two-layers", "latest", &two);
    env.alice.clone_ok(&["local:walt-test/two-layers"]);
    let layers_two = walt_e2e::util::list_dir(&env.server.data_dir().join("layers"));
    assert_eq!(
        layers_two.len(),
        layers_before.len() + 1,
        "{layers_before:?} -> {layers_two:?}"
    );
    let mut names = env.alice.image_names();
    names.sort();
    assert_eq!(names, ["again", "busybox", "two-layers"]);
    assert_tmp_empty(&env.server.data_dir());
}

#[test]
fn server_stops_on_sigterm_and_images_survive_a_restart() {
    let mut env = Env::start();
    push_busybox(&env, "walt-test/busybox", "latest");
    env.alice.clone_ok(&["local:walt-test/busybox"]);
    env.alice
        .clone_ok(&["local:walt-test/busybox", "second:v1"]);
    let before = env.snapshot();
    let status = env
        .server
        .stop()
        .expect("walt-server did not exit within 10 s of SIGTERM");
    assert!(
        status.success(),
        "walt-server exited with {status} on SIGTERM"
    );
    env.server.restart().unwrap();
    env.assert_unchanged(&before);
    let mut names = env.alice.image_names();
    names.sort();
    assert_eq!(names, ["busybox", "second:v1"]);
    env.alice
        .run(&["image", "duplicate", "second:v1", "third"])
        .assert_success();
}

/// The store keeps images as they are (setuid files, device nodes): no
/// local account but root may list or open anything in it, even when the
/// directory above it is open to everyone.
#[test]
fn the_store_is_closed_to_other_local_accounts() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::start();
    let img = push_busybox(&env, "walt-test/busybox", "latest");
    assert_cloned(&env.alice.clone_ok(&["local:walt-test/busybox"]), "busybox");
    let data = env.server.data_dir();
    let parent = data.parent().unwrap();
    std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o755)).unwrap();

    let hex = img.layers[0]
        .digest
        .trim_start_matches("sha256:")
        .to_string();
    let blob = data.join("blobs/sha256").join(&hex);
    assert!(blob.is_file(), "the layer blob should be stored");
    for dir in ["", "blobs", "blobs/sha256", "layers", "tmp"] {
        let mode = std::fs::metadata(data.join(dir))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777;
        assert_eq!(mode, 0o700, "{}/{dir} has mode {mode:o}", data.display());
    }
    let as_nobody = |args: &[&str]| {
        std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .args(args)
            .output()
            .expect("setpriv (util-linux) runs")
    };
    // The check itself works: nobody can read what is open to everyone.
    let probe = parent.join("probe");
    std::fs::write(&probe, "x").unwrap();
    std::fs::set_permissions(&probe, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert!(
        as_nobody(&["cat", probe.to_str().unwrap()])
            .status
            .success()
    );
    for args in [
        vec!["ls", data.to_str().unwrap()],
        vec!["cat", blob.to_str().unwrap()],
        vec!["ls", data.join("layers").to_str().unwrap()],
        vec!["cat", data.join("walt.db").to_str().unwrap()],
    ] {
        let out = as_nobody(&args);
        assert!(
            !out.status.success()
                && String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
            "{args:?} as nobody: {out:?}"
        );
    }
}
