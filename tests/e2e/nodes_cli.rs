//! `walt node show/boot/rename`, `walt device show`, the welcome copies of
//! the default images, and images in use: nodes made through the real
//! DHCP hook (`walt-dhcp-event`), their default image fetched from the
//! local registry.

use std::time::Duration;

use crate::common::*;
use walt_e2e::util::wait_for;
use walt_e2e::*;

const MODEL: &str = "pc-x86-64";
/// The `walt.image.preferred-name` of the default image.
const PREFERRED: &str = "pc-default";

/// Three nodes of pc-x86-64 (`node-000001..3`) booting the default image
/// fetched from `local`, and one device without model (`unknown-000009`).
fn nodes_env() -> Env {
    let env = Env::start();
    let layer = env
        .images
        .busybox_layer(Format::Oci, Compression::Gzip, "default image")
        .unwrap();
    let default = env
        .images
        .image(
            Format::Oci,
            ImageConfig::amd64(MODEL).label("walt.image.preferred-name", PREFERRED),
            &[layer],
        )
        .unwrap();
    env.push_local(&format!("waltplatform/{MODEL}-default"), "latest", &default);
    for i in 1..=3 {
        lease(&env, &format!("walt.node.{MODEL}"), i, "node");
    }
    lease(&env, "udhcp 1.36.1", 9, "");
    // A user who only watches: their own welcome does not matter here.
    let watcher = env.server.cli("carol", &[]);
    // The devices are listed from their first lease on; they are nodes
    // once the default image is there (free: they boot waltplatform's).
    wait_for("three nodes and a device", Duration::from_secs(60), || {
        let nodes = watcher.run(&["node", "show", "--all"]);
        let free = names(&section(&nodes.stdout, FREE));
        let out = watcher.run(&["device", "show"]);
        (out.success
            && (1..=3).all(|i| free.contains(&format!("node-00000{i}")))
            && out.stdout.contains("unknown-000009")
            && out.stdout.contains("walt.node.<model>"))
        .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\nserver log:\n{}", env.server.log()));
    env
}

/// A lease commit of `52:54:00:00:00:0<i>` at 192.168.152.1<i>, as
/// isc-dhcp-server reports it.
fn lease(env: &Env, vci: &str, i: u32, hostname: &str) {
    env.server
        .dhcp_event(&[
            "commit",
            vci,
            "",
            &format!("192.168.152.1{i}"),
            &format!("52:54:00:00:00:0{i}"),
            hostname,
            "0",
            "unknown",
        ])
        .assert_success();
}

/// The rows of the table under `title` (header skipped), up to the next
/// blank line.
fn section(stdout: &str, title: &str) -> Vec<Vec<String>> {
    let mut lines = stdout.lines().skip_while(|l| *l != title);
    if lines.next().is_none() {
        return Vec::new();
    }
    lines
        .skip_while(|l| l.trim().is_empty())
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .map(walt_e2e::store::table_cells)
        .collect()
}

fn names(rows: &[Vec<String>]) -> Vec<String> {
    rows.iter().map(|r| r[0].clone()).collect()
}

const MINE: &str = "You currently own the following nodes:";
const FREE: &str = "The following nodes are currently free:";
const OTHERS: &str = "The following nodes currently belong to other users:";
const NOT_NODES: &str = "The following devices were detected but are not nodes:";

#[test]
fn welcome_show_and_devices() {
    let env = nodes_env();
    // The first command of a user copies the default image, once, under
    // its preferred name.
    let out = env.alice.run(&["image", "show"]);
    out.assert_success();
    let said = format!("Cloned {PREFERRED}, a default image for {MODEL}.");
    assert_eq!(out.stderr.matches(&said).count(), 1, "{out}");
    assert!(env.alice.image_names().contains(&PREFERRED.to_string()));
    let out = env.alice.run(&["image", "show"]);
    out.assert_success();
    assert!(!out.stderr.contains("Cloned"), "said twice:\n{out}");
    // Given once: removed, it does not come back.
    env.alice
        .run(&["image", "remove", PREFERRED])
        .assert_success();
    let out = env.alice.run(&["node", "show"]);
    out.assert_success();
    assert!(!out.stderr.contains("Cloned"), "{out}");
    assert!(!env.alice.image_names().contains(&PREFERRED.to_string()));
    // Every command says it to a new user (here bob's first, a node command).
    let out = env.bob.run(&["node", "show", "--all"]);
    out.assert_success();
    assert_eq!(out.stderr.matches(&said).count(), 1, "{out}");

    // Free nodes are nobody's.
    assert!(section(&out.stdout, MINE).is_empty(), "{out}");
    let free = section(&out.stdout, FREE);
    assert_eq!(
        names(&free),
        ["node-000001", "node-000002", "node-000003"],
        "{out}"
    );
    assert_eq!(free[0][1], MODEL, "{out}");
    assert!(free[0].contains(&"192.168.152.11".to_string()), "{out}");
    assert!(free[0].contains(&"52:54:00:00:00:01".to_string()), "{out}");
    // --all also lists the devices that are not nodes, with why.
    let unknown = section(&out.stdout, NOT_NODES);
    assert_eq!(names(&unknown), ["unknown-000009"], "{out}");
    assert!(
        unknown[0]
            .join(" ")
            .contains("announces no walt.node.<model> class"),
        "{out}"
    );
    // Without --all: only the caller's nodes.
    let out = env.bob.run(&["node", "show"]);
    out.assert_success();
    assert!(
        out.stdout.contains("You currently do not own any nodes."),
        "{out}"
    );
    assert!(out.stdout.contains("Re-run with --all"), "{out}");
    assert!(!out.stdout.contains("node-000001"), "{out}");
    let out = env.bob.run(&["node", "show", "--all", "--names-only"]);
    out.assert_success();
    assert_eq!(
        out.stdout.lines().collect::<Vec<_>>(),
        ["node-000001", "node-000002", "node-000003"],
        "{out}"
    );

    // walt device show: nodes, then the others with why.
    let out = env.bob.run(&["device", "show"]);
    out.assert_success();
    let nodes = section(
        &out.stdout,
        "The walt network contains the following nodes:",
    );
    assert_eq!(names(&nodes).len(), 3, "{out}");
    let unknown = section(&out.stdout, NOT_NODES);
    assert_eq!(names(&unknown), ["unknown-000009"], "{out}");
    assert!(
        unknown[0].contains(&"52:54:00:00:00:09".to_string()),
        "{out}"
    );
}

#[test]
fn rename_nodes() {
    let env = nodes_env();
    let out = env.alice.run(&["node", "rename", "node-000001", "alpha"]);
    out.assert_success();
    assert_eq!(out.last_stdout_line(), "Node node-000001 renamed to alpha.");
    let out = env.alice.run(&["node", "show", "--all", "--names-only"]);
    assert_eq!(
        out.stdout.lines().collect::<Vec<_>>(),
        ["alpha", "node-000002", "node-000003"],
        "{out}"
    );
    env.alice
        .run(&["node", "rename", "node-000002", "alpha"])
        .assert_failure("a device named 'alpha' already exists");
    env.alice
        .run(&["node", "rename", "node-000002", "Bad_Name"])
        .assert_failure("invalid node name 'Bad_Name'");
    env.alice
        .run(&["node", "rename", "node-000002", "all"])
        .assert_failure("invalid node name 'all'");
    env.alice
        .run(&["node", "rename", "nosuch", "beta"])
        .assert_failure("no device named 'nosuch'");
    // Nothing changed by the refusals.
    let out = env.alice.run(&["node", "show", "--all", "--names-only"]);
    assert_eq!(
        out.stdout.lines().collect::<Vec<_>>(),
        ["alpha", "node-000002", "node-000003"],
        "{out}"
    );
    // Devices that are not nodes too.
    env.alice
        .run(&["node", "rename", "unknown-000009", "printer"])
        .assert_success();
    let out = env.alice.run(&["device", "show"]);
    assert!(
        names(&section(&out.stdout, NOT_NODES)) == ["printer"],
        "{out}"
    );
}

/// `local:walt-test/rpi`: a busybox image for `models` only.
fn push_rpi(env: &Env, models: &str) {
    let rpi = env
        .images
        .busybox_image(Format::Oci, Compression::Gzip, models)
        .unwrap();
    env.push_local("walt-test/rpi", "latest", &rpi);
}

#[test]
fn boot_node_sets_and_ownership() {
    let env = nodes_env();
    push_busybox(&env, "walt-test/busybox", "latest");
    push_rpi(&env, "rpi-4-b,rpi-3-b");
    env.alice.clone_ok(&["local:walt-test/busybox", "mine"]);
    env.alice.clone_ok(&["local:walt-test/rpi", "rpi"]);
    env.bob.clone_ok(&["local:walt-test/busybox", "bobimg"]);

    // One node.
    let out = env.alice.run(&["node", "boot", "node-000001", "mine"]);
    out.assert_success();
    assert_eq!(out.stdout.trim(), "Node node-000001 will now boot mine.");
    let out = env.alice.run(&["node", "show"]);
    let mine = section(&out.stdout, MINE);
    assert_eq!(names(&mine), ["node-000001"], "{out}");
    assert_eq!(mine[0][2], "mine", "{out}");
    // Again: nothing to do, said.
    let out = env.alice.run(&["node", "boot", "node-000001", "mine"]);
    out.assert_success();
    assert!(
        out.stdout
            .contains("Node node-000001: ignored, it is already using this image."),
        "{out}"
    );
    // A comma list.
    let out = env
        .alice
        .run(&["node", "boot", "node-000002,node-000003", "mine"]);
    out.assert_success();
    assert_eq!(
        out.stdout.trim(),
        "Nodes node-000002 and node-000003 will now boot mine."
    );

    // Refusals change nothing.
    let before = env.alice.run(&["node", "show", "--all"]).stdout;
    env.alice
        .run(&["node", "boot", "node-000001", "rpi"])
        .assert_failure(
            "image 'rpi' is not compatible with node model pc-x86-64 (node node-000001): it supports rpi-[4-b,3-b]",
        );
    env.alice
        .run(&["node", "boot", "nosuch", "mine"])
        .assert_failure("no node named 'nosuch'");
    env.alice
        .run(&["node", "boot", "node-000001,nosuch", "mine"])
        .assert_failure("no node named 'nosuch'");
    env.alice
        .run(&["node", "boot", "unknown-000009", "mine"])
        .assert_failure("device 'unknown-000009' is not a node");
    env.alice
        .run(&["node", "boot", "node-000001", "missing"])
        .assert_failure("image 'missing' not found");
    assert_eq!(env.alice.run(&["node", "show", "--all"]).stdout, before);

    // Another user's node: refused without a terminal unless --yes.
    let out = env.bob.run(&["node", "boot", "node-000001", "bobimg"]);
    out.assert_failure("node node-000001 boots images of other users");
    assert!(out.stderr.contains("--yes"), "{out}");
    assert_eq!(env.alice.run(&["node", "show", "--all"]).stdout, before);
    let out = env
        .bob
        .run(&["node", "boot", "--yes", "node-000001", "bobimg"]);
    out.assert_success();
    assert_eq!(out.stdout.trim(), "Node node-000001 will now boot bobimg.");
    let out = env.alice.run(&["node", "show", "--all"]);
    assert_eq!(
        names(&section(&out.stdout, MINE)),
        ["node-000002", "node-000003"],
        "{out}"
    );
    let others = section(&out.stdout, OTHERS);
    assert_eq!(names(&others), ["node-000001"], "{out}");
    assert!(others[0].contains(&"bob".to_string()), "{out}");
    assert!(others[0].contains(&"walt:bob/bobimg".to_string()), "{out}");

    // my-nodes: the caller's only; `default` frees them.
    let out = env.alice.run(&["node", "boot", "my-nodes", "default"]);
    out.assert_success();
    assert!(
        out.stdout
            .contains("Nodes node-000002 and node-000003 will now boot their default image"),
        "{out}"
    );
    let out = env.alice.run(&["node", "show", "--all"]);
    assert!(section(&out.stdout, MINE).is_empty(), "{out}");
    assert_eq!(
        names(&section(&out.stdout, FREE)),
        ["node-000002", "node-000003"],
        "{out}"
    );
    env.alice
        .run(&["node", "boot", "my-nodes", "mine"])
        .assert_failure("no node matches 'my-nodes'");

    // all: bob's node among them needs confirmation.
    env.alice
        .run(&["node", "boot", "all", "mine"])
        .assert_failure("node node-000001 boots images of other users");
    let out = env.alice.run(&["node", "boot", "--yes", "all", "mine"]);
    out.assert_success();
    assert_eq!(
        out.stdout.trim(),
        "Nodes node-000001, node-000002 and node-000003 will now boot mine."
    );
    let out = env.bob.run(&["node", "show"]);
    assert!(
        out.stdout.contains("You currently do not own any nodes."),
        "{out}"
    );
}

#[test]
fn images_in_use() {
    let env = nodes_env();
    push_busybox(&env, "walt-test/busybox", "latest");
    push_rpi(&env, "rpi-4-b");
    env.alice.clone_ok(&["local:walt-test/busybox", "mine"]);
    env.alice.clone_ok(&["local:walt-test/busybox", "spare"]);
    assert!(
        env.alice.show_row("mine").unwrap().contains("False"),
        "not in use yet"
    );
    env.alice
        .run(&["node", "boot", "node-000001,node-000002", "mine"])
        .assert_success();
    // The in-use column.
    let (header, rows) = table(&env.alice.run(&["image", "show"]).stdout);
    let col = header.iter().position(|h| h == "in-use").unwrap();
    let row = |n: &str| rows.iter().find(|r| r[0] == n).unwrap().clone();
    assert_eq!(row("mine")[col], "True");
    assert_eq!(row("spare")[col], "False");

    // Remove and rename refused, naming the nodes.
    let before = env.snapshot();
    env.alice
        .run(&["image", "remove", "mine"])
        .assert_failure("cannot remove image 'mine': nodes node-000001 and node-000002 boot it");
    env.alice
        .run(&["image", "rename", "mine", "other"])
        .assert_failure("cannot rename image 'mine': nodes node-000001 and node-000002 boot it");
    env.assert_unchanged(&before);

    let notice = "Image mine is in use: its 2 nodes will reboot and remount it.";
    // cp into it (confirmed, as WalT asks: see hub_meta.rs): done, said.
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), b"new content").unwrap();
    let out = env.alice.run(&[
        "image",
        "cp",
        "--yes",
        file.path().to_str().unwrap(),
        "mine:/root/",
    ]);
    out.assert_success();
    assert!(out.stderr.contains(notice), "{out}");
    // squash: two layers now, merged; said.
    let out = env.alice.run(&["image", "squash", "--yes", "mine"]);
    out.assert_success();
    assert!(out.stdout.contains("squashed"), "{out}");
    assert!(out.stdout.contains(notice), "{out}");
    // clone --force over it: said; an image without the nodes' model refused.
    let out = env.alice.run(&[
        "image",
        "clone",
        "--force",
        "local:walt-test/busybox",
        "mine",
    ]);
    out.assert_success();
    assert!(out.stderr.contains(notice), "{out}");
    env.alice
        .run(&["image", "clone", "--force", "local:walt-test/rpi", "mine"])
        .assert_failure("it does not support the model of nodes node-000001 (pc-x86-64)");
    // build over it: said; a build without the nodes' model refused.
    let ctx = tempfile::tempdir().unwrap();
    let dockerfile = ctx.path().join("Dockerfile");
    std::fs::write(&dockerfile, "FROM spare\nLABEL built=yes\n").unwrap();
    let dir = ctx.path().to_str().unwrap();
    let out = env
        .alice
        .run(&["image", "build", "--from-dir", dir, "--yes", "mine"]);
    out.assert_success();
    assert!(out.stderr.contains(notice), "{out}");
    std::fs::write(&dockerfile, "FROM spare\nLABEL walt.node.models=rpi-4-b\n").unwrap();
    env.alice
        .run(&["image", "build", "--from-dir", dir, "--yes", "mine"])
        .assert_failure("does not support the model of nodes node-000001 (pc-x86-64)");
    // The nodes still boot it, and the image is still there.
    let out = env.alice.run(&["node", "show"]);
    let mine = section(&out.stdout, MINE);
    assert_eq!(names(&mine), ["node-000001", "node-000002"], "{out}");
    assert!(mine.iter().all(|r| r[2] == "mine"), "{out}");
    // Once no node boots it, remove works.
    env.alice
        .run(&["node", "boot", "node-000001,node-000002", "spare"])
        .assert_success();
    assert!(env.alice.show_row("mine").unwrap().contains("False"));
    env.alice.run(&["image", "remove", "mine"]).assert_success();
}

#[test]
fn on_a_terminal_shell_save_warns_and_boot_asks() {
    let env = nodes_env();
    push_busybox(&env, "walt-test/busybox", "latest");
    env.alice.clone_ok(&["local:walt-test/busybox", "mine"]);
    env.bob.clone_ok(&["local:walt-test/busybox", "bobimg"]);
    env.alice
        .run(&["node", "boot", "node-000001", "mine"])
        .assert_success();

    // A shell saved over an image a node boots: said, then saved.
    let (t, exit) = env.alice.in_terminal("image shell mine");
    t.wait_line("the shell prompt", |l| l.ends_with('#'))
        .unwrap();
    t.enter("echo changed > /root/f; exit").unwrap();
    t.wait_line("the save prompt", |l| {
        l.starts_with("Name of the image to save")
    })
    .unwrap();
    t.enter("").unwrap();
    t.wait_line("the overwrite question", |l| l.contains("Overwrite it?"))
        .unwrap();
    t.enter("y").unwrap();
    t.wait_line("the in-use notice", |l| {
        l == "Image mine is in use: its node will reboot and remount it."
    })
    .unwrap();
    t.wait_line("the result", |l| l == "Image mine updated.")
        .unwrap();
    assert_eq!(
        t.exit_status(&exit, Duration::from_secs(60)),
        0,
        "{}",
        t.screen()
    );

    // Taking another user's node asks; "n" changes nothing.
    let (t, exit) = env.bob.in_terminal("node boot node-000001 bobimg");
    t.wait_line("the warning", |l| {
        l == "warning: node node-000001 boots images of other users."
    })
    .unwrap();
    t.wait_line("the question", |l| {
        l.starts_with("Boot your image on them anyway? (y/n):")
    })
    .unwrap();
    t.enter("n").unwrap();
    assert_ne!(
        t.exit_status(&exit, Duration::from_secs(60)),
        0,
        "{}",
        t.screen()
    );
    let out = env.alice.run(&["node", "show"]);
    assert_eq!(names(&section(&out.stdout, MINE)), ["node-000001"], "{out}");
    // yes: taken.
    let (t, exit) = env.bob.in_terminal("node boot node-000001 bobimg");
    t.wait_line("the question", |l| {
        l.starts_with("Boot your image on them anyway? (y/n):")
    })
    .unwrap();
    t.enter("y").unwrap();
    t.wait_line("the result", |l| {
        l == "Node node-000001 will now boot bobimg."
    })
    .unwrap();
    assert_eq!(
        t.exit_status(&exit, Duration::from_secs(60)),
        0,
        "{}",
        t.screen()
    );
    let out = env.bob.run(&["node", "show"]);
    assert_eq!(names(&section(&out.stdout, MINE)), ["node-000001"], "{out}");
}
