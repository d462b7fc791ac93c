//! `walt:` clones between users.

use crate::common::*;
use walt_e2e::*;

#[test]
fn bob_clones_alices_image_and_alice_cannot_clone_her_own() {
    let env = Env::start();
    push_busybox(&env, "walt-test/busybox", "latest");
    env.alice.clone_ok(&["local:walt-test/busybox", "shared"]);

    let out = env.bob.run(&["image", "show", "--all"]);
    out.assert_success();
    assert!(out.stdout.contains("walt:alice/shared"), "{out}");

    let out = env.bob.clone_ok(&["walt:alice/shared"]);
    assert_cloned(&out, "shared");
    let out = env.bob.clone_ok(&["walt:alice/shared", "mine"]);
    assert_cloned(&out, "mine");
    let mut names = env.bob.image_names();
    names.sort();
    assert_eq!(names, ["mine", "shared"]);
    assert_eq!(env.alice.image_names(), ["shared"]);

    // Tags are kept in walt: URLs too.
    env.alice
        .run(&["image", "duplicate", "shared", "shared:v2"])
        .assert_success();
    let out = env.bob.clone_ok(&["walt:alice/shared:v2"]);
    assert_cloned(&out, "shared:v2");

    let before = env.snapshot();
    env.alice
        .clone(&["walt:alice/shared"])
        .assert_failure("(to copy it: walt image duplicate shared <new name>)");
    env.assert_unchanged(&before);

    // Unknown user/image in walt: → not found.
    env.bob
        .clone(&["walt:alice/nothing"])
        .assert_failure("not found");
    env.assert_unchanged(&before);
}
