//! A server killed with SIGKILL in the middle of a clone leaves nothing
//! behind once restarted, and the same clone then succeeds.

use std::time::Duration;

use crate::common::*;
use walt_e2e::util::{dir_size, list_tree, wait_for};
use walt_e2e::walt::wait_output;
use walt_e2e::*;

const BIG: u64 = 300 << 20;

#[test]
fn kill9_during_clone_then_restart_leaves_a_clean_store() {
    let mut env = Env::start_with(EnvOpts {
        proxy: true,
        ..Default::default()
    });
    let base = env
        .images
        .busybox_layer(Format::Oci, Compression::Gzip, "big")
        .unwrap();
    let big = env
        .images
        .big_random_layer(Format::Oci, Compression::None, BIG, 42)
        .unwrap();
    let img = env
        .images
        .image(Format::Oci, ImageConfig::amd64("pc-x86-64"), &[base, big])
        .unwrap();
    env.push_local("walt-test/big", "latest", &img);
    let data = env.server.data_dir();
    assert!(
        list_tree(&data.join("blobs"))
            .iter()
            .all(|p| !p.contains(img.layers[1].hex()))
    );

    // ~50 MB/s: the clone takes several seconds.
    env.proxy.as_ref().unwrap().rate_limit(Some(50_000_000));
    let child = env.alice.spawn(&["image", "clone", "flaky:walt-test/big"]);
    let waited = wait_for(
        "tmp/ to hold more than 20 MB",
        Duration::from_secs(90),
        || (dir_size(&data.join("tmp")) > 20_000_000).then_some(()),
    );
    if let Err(e) = waited {
        let out = wait_output(
            child,
            "walt image clone flaky:walt-test/big",
            Duration::from_secs(120),
        );
        panic!("{e}\n{out}\ntmp/: {:?}", list_tree(&data.join("tmp")));
    }
    env.server.kill9();
    let out = wait_output(
        child,
        "walt image clone flaky:walt-test/big",
        Duration::from_secs(60),
    );
    out.assert_failure_any(&["error"]);

    env.server.restart().unwrap();
    assert!(
        !env.alice.image_names().iter().any(|n| n.starts_with("big")),
        "half-cloned image listed"
    );
    assert_tmp_empty(&data);
    assert_eq!(
        list_tree(&data.join("blobs"))
            .iter()
            .filter(|p| p.len() > 64)
            .count(),
        0,
        "blobs left: {:?}",
        list_tree(&data.join("blobs"))
    );
    assert_eq!(
        walt_e2e::util::list_dir(&data.join("layers")),
        Vec::<String>::new(),
        "layers left"
    );

    env.proxy.as_ref().unwrap().rate_limit(None);
    let out = env.alice.clone_ok(&["flaky:walt-test/big"]);
    assert_cloned(&out, "big");
    assert!(env.alice.show_row("big").is_some());
    assert!(store_has_layer(&env, &img, 1));
    assert_tmp_empty(&data);
}

/// SIGTERM in the middle of a clone: the server stops promptly and cleanly
/// (exit 0), the client gets one error line, and the staging area is
/// already empty before any restart.
#[test]
fn sigterm_during_clone_cancels_it_cleanly() {
    let mut env = Env::start_with(EnvOpts {
        proxy: true,
        ..Default::default()
    });
    let big = env
        .images
        .big_random_layer(Format::Oci, Compression::None, BIG, 7)
        .unwrap();
    let img = env
        .images
        .image(Format::Oci, ImageConfig::amd64("pc-x86-64"), &[big])
        .unwrap();
    env.push_local("walt-test/big", "latest", &img);
    let data = env.server.data_dir();

    env.proxy.as_ref().unwrap().rate_limit(Some(50_000_000));
    let child = env.alice.spawn(&["image", "clone", "flaky:walt-test/big"]);
    wait_for(
        "tmp/ to hold more than 20 MB",
        Duration::from_secs(90),
        || (dir_size(&data.join("tmp")) > 20_000_000).then_some(()),
    )
    .unwrap();
    let started = std::time::Instant::now();
    let status = env.server.stop().expect("server was running");
    assert!(
        status.success(),
        "walt-server exited with {status} on SIGTERM"
    );
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "SIGTERM took {:?}",
        started.elapsed()
    );
    let out = wait_output(
        child,
        "walt image clone flaky:walt-test/big",
        Duration::from_secs(60),
    );
    out.assert_failure_any(&["shutting down", "unavailable", "error"]);
    // Cleaned on the way out, not only at the next start.
    assert_eq!(
        list_tree(&data.join("tmp")),
        Vec::<String>::new(),
        "staging files left after SIGTERM"
    );

    env.server.restart().unwrap();
    assert!(env.alice.image_names().is_empty());
    env.proxy.as_ref().unwrap().rate_limit(None);
    let out = env.alice.clone_ok(&["flaky:walt-test/big"]);
    assert_cloned(&out, "big");
}
