//! Races around `walt image cp` into an image: a client killed in the
//! middle of the stream, and several clients modifying one image at once.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common::*;
use walt_e2e::util::{RandomReader, dir_size, list_tree, unique_seed, wait_for};
use walt_e2e::walt::wait_output;
use walt_e2e::*;

/// Clones the standard busybox image as alice's `img`.
fn env_with_image() -> Env {
    let env = Env::start();
    push_busybox(&env, "walt-test/busybox", "latest");
    env.alice.clone_ok(&["local:walt-test/busybox", "img"]);
    env
}

/// Writes `len` incompressible bytes to `path`.
fn write_random(path: &Path, len: u64) {
    let mut f = fs::File::create(path).unwrap();
    std::io::copy(&mut RandomReader::new(unique_seed(), len), &mut f).unwrap();
}

/// Copies `img:/root` out to a new directory under `dir` and returns the
/// relative path and size of every file (directories with size 0) in it.
fn root_of_image(env: &Env, dir: &Path) -> BTreeMap<String, u64> {
    let back = tempfile::tempdir_in(dir).unwrap().keep();
    let dest = back.join("root");
    env.alice
        .run(&["image", "cp", "img:/root", dest.to_str().unwrap()])
        .assert_success();
    let files = list_tree(&dest)
        .into_iter()
        .map(|p| {
            let m = fs::symlink_metadata(dest.join(&p)).unwrap();
            (p, if m.is_file() { m.len() } else { 0 })
        })
        .collect();
    fs::remove_dir_all(&back).unwrap();
    files
}

/// Waits until the server holds no mount of its data dir and its `tmp/`
/// is empty.
fn wait_server_clean(env: &Env) {
    let data = env.server.data_dir();
    let data_s = data.to_string_lossy().into_owned();
    wait_for(
        "the session to be torn down",
        Duration::from_secs(15),
        || {
            (mounts_with(&data_s).is_empty() && list_tree(&data.join("tmp")).is_empty())
                .then_some(())
        },
    )
    .unwrap_or_else(|e| {
        panic!(
            "{e}: mounts {:?}, tmp/ {:?}",
            mounts_with(&data_s),
            list_tree(&data.join("tmp"))
        )
    });
}

/// A small copy into `img:/root/` succeeds and reads back (the lock is free).
fn small_copy_works(env: &Env, dir: &Path, name: &str) {
    let small = dir.join(name);
    fs::write(&small, format!("{name}\n")).unwrap();
    env.alice
        .run(&["image", "cp", small.to_str().unwrap(), "img:/root/"])
        .assert_success();
    let back = dir.join(format!("{name}.back"));
    env.alice
        .run(&[
            "image",
            "cp",
            &format!("img:/root/{name}"),
            back.to_str().unwrap(),
        ])
        .assert_success();
    assert_eq!(fs::read_to_string(&back).unwrap(), format!("{name}\n"));
}

/// How many times `walt image show` (table and names only) lists `img`.
fn img_listed(env: &Env) -> (usize, usize) {
    let out = env.alice.run(&["image", "show"]);
    out.assert_success();
    let (header, rows) = table(&out.stdout);
    assert!(!header.is_empty(), "no table in `walt image show`:\n{out}");
    let in_table = rows
        .iter()
        .filter(|r| r.first().is_some_and(|c| c == "img"))
        .count();
    let in_names = env
        .alice
        .image_names()
        .iter()
        .filter(|n| *n == "img")
        .count();
    (in_table, in_names)
}

const BIG_FILE: u64 = 100 << 20;

#[test]
fn cp_into_image_killed_mid_stream_changes_nothing() {
    let env = env_with_image();
    let dir = tempfile::tempdir().unwrap();
    let payload = dir.path().join("payload");
    fs::create_dir(&payload).unwrap();
    for i in 0..3 {
        write_random(&payload.join(format!("big-{i}")), BIG_FILE);
    }
    let root_before = root_of_image(&env, dir.path());
    assert!(!root_before.keys().any(|p| p.starts_with("payload")));
    let before = env.snapshot();
    let data = env.server.data_dir();
    let data_s = data.to_string_lossy().into_owned();

    let cmdline = format!("walt image cp {} img:/root/", payload.display());
    let mut child = env
        .alice
        .spawn(&["image", "cp", payload.to_str().unwrap(), "img:/root/"]);
    // Streaming: the sandbox is mounted and the data lands in the session's
    // upper directory.
    let started = wait_for("the copy to stream", Duration::from_secs(30), || {
        if !matches!(child.try_wait(), Ok(None)) {
            return Some(false);
        }
        (dir_size(&data.join("tmp")) > 16 << 20 && !mounts_with(&data_s).is_empty()).then_some(true)
    });
    if !matches!(started, Ok(true)) {
        let out = wait_output(child, &cmdline, Duration::from_secs(60));
        panic!(
            "the copy did not stream long enough to be killed ({started:?}): \
             make the data bigger\n{out}"
        );
    }
    child.kill().unwrap();
    let out = wait_output(child, &cmdline, Duration::from_secs(10));
    assert_eq!(
        out.code, None,
        "the copy ended by itself before SIGKILL: make the data bigger\n{out}"
    );

    // (b) The server tears the session down: no mount, empty tmp/.
    wait_server_clean(&env);
    // (a) The image and the store are unchanged.
    env.assert_unchanged(&before);
    assert_eq!(img_listed(&env), (1, 1));
    assert_eq!(root_of_image(&env, dir.path()), root_before);
    // (c) The image is not left locked.
    small_copy_works(&env, dir.path(), "after-kill");
    let mut want = root_before;
    want.insert("after-kill".into(), "after-kill\n".len() as u64);
    assert_eq!(root_of_image(&env, dir.path()), want);
    wait_server_clean(&env);
}

const CONCURRENT: usize = 4;
const CONCURRENT_FILE: u64 = 80 << 20;

#[test]
fn concurrent_modifications_of_one_image_are_serialised_or_refused() {
    let env = env_with_image();
    let dir = tempfile::tempdir().unwrap();
    let srcs: Vec<(String, PathBuf, u64)> = (0..CONCURRENT)
        .map(|i| {
            let name = format!("part-{i}");
            let path = dir.path().join(&name);
            // Different sizes, so that the read-back tells them apart.
            let len = CONCURRENT_FILE + (i as u64) * (1 << 20) + i as u64;
            write_random(&path, len);
            (name, path, len)
        })
        .collect();
    let root_before = root_of_image(&env, dir.path());

    let children: Vec<_> = srcs
        .iter()
        .map(|(_, path, _)| {
            env.alice
                .spawn(&["image", "cp", path.to_str().unwrap(), "img:/root/"])
        })
        .collect();
    let outs: Vec<CmdOutput> = children
        .into_iter()
        .zip(&srcs)
        .map(|(child, (_, path, _))| {
            wait_output(
                child,
                &format!("walt image cp {} img:/root/", path.display()),
                Duration::from_secs(120),
            )
        })
        .collect();

    let mut want = root_before;
    let (mut ok, mut refused) = (0, 0);
    for (out, (name, _, len)) in outs.iter().zip(&srcs) {
        if out.success {
            out.assert_success();
            want.insert(name.clone(), *len);
            ok += 1;
        } else {
            out.assert_failure("is being modified");
            assert_eq!(
                out.stderr.lines().filter(|l| !l.trim().is_empty()).count(),
                1,
                "a refusal is one line:\n{out}"
            );
            refused += 1;
        }
    }
    let all = outs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n");
    assert!(ok >= 1, "no copy succeeded:\n{all}");
    assert!(
        refused >= 1,
        "no copy was refused (they did not overlap: make the files bigger):\n{all}"
    );

    // Exactly the successful copies are in the image.
    assert_eq!(root_of_image(&env, dir.path()), want, "\n{all}");
    assert_eq!(img_listed(&env), (1, 1));
    wait_server_clean(&env);
    // The lock is released.
    small_copy_works(&env, dir.path(), "after-race");
    want.insert("after-race".into(), "after-race\n".len() as u64);
    assert_eq!(root_of_image(&env, dir.path()), want);
    assert_eq!(img_listed(&env), (1, 1));
    wait_server_clean(&env);
}
