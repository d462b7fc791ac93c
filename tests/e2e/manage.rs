//! remove, rename, duplicate.

use crate::common::*;
use walt_e2e::*;

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

#[test]
fn duplicate_rename_remove() {
    let env = Env::start();
    push_busybox(&env, "walt-test/busybox", "latest");
    env.alice.clone_ok(&["local:walt-test/busybox"]);

    env.alice
        .run(&["image", "duplicate", "busybox", "copy"])
        .assert_success();
    assert_eq!(sorted(env.alice.image_names()), ["busybox", "copy"]);
    assert!(env.alice.show_row("copy").unwrap().contains("pc-x86-64"));

    env.alice
        .run(&["image", "rename", "copy", "moved:v1"])
        .assert_success();
    assert_eq!(sorted(env.alice.image_names()), ["busybox", "moved:v1"]);

    env.alice
        .run(&["image", "remove", "busybox"])
        .assert_success();
    assert_eq!(env.alice.image_names(), ["moved:v1"]);
    // The removed image's layers are still used by the other one.
    env.alice
        .run(&["image", "duplicate", "moved:v1", "again"])
        .assert_success();

    env.alice
        .run(&["image", "remove", "moved:v1"])
        .assert_success();
    env.alice
        .run(&["image", "remove", "again"])
        .assert_success();
    let out = env.alice.run(&["image", "show"]);
    out.assert_success();
    assert!(out.stdout.contains("Your working set is empty."), "{out}");
    assert_tmp_empty(&env.server.data_dir());
}

#[test]
fn remove_rename_duplicate_refusals() {
    let env = Env::start();
    push_busybox(&env, "walt-test/busybox", "latest");
    env.alice.clone_ok(&["local:walt-test/busybox"]);
    env.alice.clone_ok(&["local:walt-test/busybox", "other"]);
    let before = env.snapshot();

    let cases: &[(&[&str], &[&str])] = &[
        (&["image", "remove", "missing"], &["not found"]),
        (&["image", "rename", "missing", "new"], &["not found"]),
        (&["image", "duplicate", "missing", "new"], &["not found"]),
        (
            &["image", "rename", "busybox", "other"],
            &["already exists"],
        ),
        (
            &["image", "duplicate", "busybox", "other"],
            &["already exists"],
        ),
        (
            &["image", "rename", "busybox", "Bad_Name"],
            &["invalid", "name"],
        ),
        (
            &["image", "duplicate", "busybox", "Bad_Name"],
            &["invalid", "name"],
        ),
        (
            &["image", "duplicate", "busybox", "default"],
            &["reserved", "invalid"],
        ),
        (
            &["image", "clone", "local:walt-test/busybox", "Bad_Name"],
            &["invalid", "name"],
        ),
        (&["image", "remove", "Bad_Name"], &["invalid", "not found"]),
    ];
    for (args, needles) in cases {
        env.alice.run(args).assert_failure_any(needles);
        env.assert_unchanged(&before);
    }
    // bob cannot touch alice's images by name: they are not in his working set.
    env.bob
        .run(&["image", "remove", "busybox"])
        .assert_failure("not found");
    env.assert_unchanged(&before);
}
