//! Trees 100 000 levels deep (issue 11, item 2): a shell session holding
//! one is discarded, or its server killed with SIGKILL, and the server
//! restarts on a clean store; saving it is refused with the depth and the
//! limit, the image unchanged; a layer with a ~32 000-level chain served by
//! the real registry is cloned, refused by squash (over its path limit),
//! removed and collected.
//!
//! The data dir is a tmpfs mounted for each test: on the ext4 of the test
//! machines (mounted with `discard`) every rmdir costs milliseconds, which
//! 100 000 levels turn into minutes whatever the removal does.

use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::common::*;
use walt_e2e::tmux::Tmux;
use walt_e2e::util::{digest_hex, list_dir, wait_for};
use walt_e2e::*;

const LEVELS: usize = 100_000;

/// A tmpfs mounted on the server's data dir, lazily unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path) -> Tmpfs {
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "mode=0700", "tmpfs"])
            .arg(dir)
            .status()
            .expect("running mount");
        assert!(st.success(), "mounting a tmpfs (this test needs root)");
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// The environment with alice's busybox image `img`, its store on a tmpfs.
fn env_on_tmpfs() -> (Env, Tmpfs) {
    let mut env = Env::start();
    env.server.stop();
    let data = env.server.data_dir();
    for e in list_dir(&data) {
        let p = data.join(e);
        if p.is_dir() {
            fs::remove_dir_all(&p).unwrap();
        } else {
            fs::remove_file(&p).unwrap();
        }
    }
    let m = Tmpfs::mount(&data);
    env.server.restart().unwrap();
    push_busybox(&env, "walt-test/busybox", "latest");
    env.alice.clone_ok(&["local:walt-test/busybox", "img"]);
    (env, m)
}

fn open_dir(p: &Path) -> File {
    fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(p)
        .unwrap_or_else(|e| panic!("opening {}: {e}", p.display()))
}

/// `levels` nested directories `d` in `dir`, built from the test process
/// one level at a time through a descriptor (no path gets long), with a
/// file at the bottom.
fn deep_chain(dir: &Path, levels: usize) {
    let mut cur = open_dir(dir);
    for _ in 0..levels {
        let next = format!("/proc/self/fd/{}/d", cur.as_raw_fd());
        fs::create_dir(&next).unwrap();
        cur = open_dir(Path::new(&next));
    }
    fs::write(format!("/proc/self/fd/{}/bottom", cur.as_raw_fd()), b"x").unwrap();
}

/// The one session directory of the store.
fn session_dir(data: &Path) -> PathBuf {
    let tmp = data.join("tmp");
    let name = wait_for("the session directory", Duration::from_secs(30), || {
        list_dir(&tmp)
            .into_iter()
            .find(|n| n.starts_with("session-"))
    })
    .unwrap();
    tmp.join(name)
}

/// A shell on `img` whose session upper directory holds a 100 000-level
/// tree in `/root/deep`.
fn shell_with_deep_tree(env: &Env) -> (Tmux, PathBuf) {
    let (t, exit) = env.alice.in_terminal("image shell img");
    t.wait_line("the shell prompt", |l| l.ends_with('#'))
        .unwrap();
    t.enter("mkdir /root/deep && echo made-$((6*7))").unwrap();
    t.wait_line("the directory made", |l| l == "made-42")
        .unwrap();
    let upper = session_dir(&env.server.data_dir()).join("upper");
    deep_chain(&upper.join("root/deep"), LEVELS);
    (t, exit)
}

/// tmp/ empty (only its top level is listed: a recursive listing of a deep
/// leftover would overflow the test's stack).
fn wait_tmp_empty(data: &Path) {
    let tmp = data.join("tmp");
    wait_for("tmp/ to be empty", Duration::from_secs(120), || {
        list_dir(&tmp).is_empty().then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}: {:?}", list_dir(&tmp)));
}

fn layer_count(env: &Env, name: &str) -> usize {
    let db = env.server.data_dir().join("walt.db");
    let conn =
        rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    let q = format!(
        "SELECT COUNT(*) FROM image_layers il JOIN images i ON i.id = il.image_id \
         WHERE i.owner = 'alice' AND i.name = '{name}'"
    );
    conn.query_row(&q, [], |r| r.get::<_, i64>(0)).unwrap() as usize
}

fn exit_status(exit: &Path, t: &Tmux) -> i32 {
    t.exit_status(exit, Duration::from_secs(120))
}

/// The server restarts on the store, whose tmp/ is then empty, with the
/// image still there and usable.
fn restart_and_check(env: &mut Env, layers: usize) {
    env.server.restart().unwrap();
    let data = env.server.data_dir();
    wait_tmp_empty(&data);
    assert!(
        env.alice.image_names().contains(&"img".to_string()),
        "img gone after the restart"
    );
    assert_eq!(layer_count(env, "img"), layers, "the image changed");
    let log = env.server.log();
    assert!(!log.contains("cannot remove a leftover"), "{log}");
    // The image is still readable.
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("marker");
    env.alice
        .run(&[
            "image",
            "cp",
            "img:/etc/walt-test-marker",
            local.to_str().unwrap(),
        ])
        .assert_success();
    assert!(local.is_file());
}

#[test]
fn discarded_deep_session_leaves_a_clean_store_and_the_server_restarts() {
    let (mut env, _m) = env_on_tmpfs();
    let layers = layer_count(&env, "img");
    let (t, exit) = shell_with_deep_tree(&env);
    t.enter("exit").unwrap();
    t.wait_line("the save prompt", |l| {
        l.starts_with("Name of the image to save")
    })
    .unwrap();
    // Ctrl-C at the prompt discards.
    t.keys(&["C-c"]).unwrap();
    let status = exit_status(&exit, &t);
    assert_ne!(status, 0, "{}", t.screen());
    wait_tmp_empty(&env.server.data_dir());
    assert_eq!(layer_count(&env, "img"), layers);
    restart_and_check(&mut env, layers);
}

#[test]
fn kill9_with_a_deep_session_open_then_restart_leaves_a_clean_store() {
    let (mut env, _m) = env_on_tmpfs();
    let layers = layer_count(&env, "img");
    let (t, exit) = shell_with_deep_tree(&env);
    let data = env.server.data_dir();
    env.server.kill9();
    let _ = exit_status(&exit, &t);
    // The deep session directory is left behind by the killed server...
    assert!(
        list_dir(&data.join("tmp"))
            .iter()
            .any(|n| n.starts_with("session-")),
        "{:?}",
        list_dir(&data.join("tmp"))
    );
    // ... and removed when the store opens.
    restart_and_check(&mut env, layers);
    let log = env.server.log();
    assert!(
        log.contains("removed leftover from an interrupted operation"),
        "{log}"
    );
}

#[test]
fn saving_a_deep_session_is_refused_with_the_limit_and_changes_nothing() {
    let (mut env, _m) = env_on_tmpfs();
    let layers = layer_count(&env, "img");
    let blobs_before = list_dir(&env.server.data_dir().join("blobs/sha256"));
    let layers_before = list_dir(&env.server.data_dir().join("layers"));
    let (t, exit) = shell_with_deep_tree(&env);
    t.enter("exit").unwrap();
    t.wait_line("the save prompt", |l| {
        l.starts_with("Name of the image to save")
    })
    .unwrap();
    t.keys(&["Enter"]).unwrap();
    t.wait_line("the overwrite question", |l| {
        l.contains("img already exists") && l.contains("(y/n)")
    })
    .unwrap();
    t.enter("y").unwrap();
    t.wait_line("the refusal", |l| {
        l.starts_with("error: ") && l.contains("levels deep") && l.contains("32768 bytes")
    })
    .unwrap();
    let screen = t.screen();
    assert!(screen.contains("'/root/deep/d/d/d"), "{screen}");
    assert!(
        !screen.contains("/tmp/"),
        "a server path in the message: {screen}"
    );
    assert_ne!(exit_status(&exit, &t), 0, "{screen}");
    let data = env.server.data_dir();
    wait_tmp_empty(&data);
    assert_eq!(layer_count(&env, "img"), layers, "the image changed");
    assert_eq!(list_dir(&data.join("blobs/sha256")), blobs_before);
    assert_eq!(list_dir(&data.join("layers")), layers_before);
    restart_and_check(&mut env, layers);
}

/// Levels of the deep layer's chain: a path of 64 000 bytes, just under
/// the 64 KiB a tar reader bounded like walt's accepts for a name.
const LAYER_LEVELS: usize = 32_000;

#[test]
fn layer_with_a_deep_chain_is_cloned_removed_and_collected() {
    let (env, _m) = env_on_tmpfs();
    let deep = "d/".repeat(LAYER_LEVELS);
    let layer = env
        .images
        .layer_with(Format::Oci, Compression::Gzip, |b| {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Directory);
            h.set_mode(0o755);
            h.set_size(0);
            h.set_mtime(1_700_000_000);
            b.append_data(&mut h, &deep, &[][..])?;
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Regular);
            h.set_mode(0o644);
            h.set_size(4);
            h.set_mtime(1_700_000_000);
            b.append_data(&mut h, format!("{deep}bottom"), &b"deep"[..])
        })
        .unwrap();
    let base = env
        .images
        .busybox_layer(Format::Oci, Compression::Gzip, "deep")
        .unwrap();
    let img = env
        .images
        .image(Format::Oci, ImageConfig::amd64("pc-x86-64"), &[base, layer])
        .unwrap();
    env.push_local("walt-test/deep", "latest", &img);
    let data = env.server.data_dir();
    let layers_before = list_dir(&data.join("layers"));
    env.alice.clone_ok(&["local:walt-test/deep", "deepimg"]);
    let diff_hex = digest_hex(&img.diff_ids[1]).to_string();
    assert!(
        list_dir(&data.join("layers")).contains(&diff_hex),
        "the deep layer is not in the store"
    );
    // The chain is there, all the way down (walked through a descriptor).
    let mut cur = open_dir(&data.join("layers").join(&diff_hex).join("diff"));
    for _ in 0..LAYER_LEVELS {
        cur = open_dir(Path::new(&format!("/proc/self/fd/{}/d", cur.as_raw_fd())));
    }
    assert_eq!(
        fs::read(format!("/proc/self/fd/{}/bottom", cur.as_raw_fd())).unwrap(),
        b"deep"
    );
    drop(cur);
    // Squash refuses it with the depth and the limit, changing nothing.
    let out = env.alice.run(&["image", "squash", "deepimg"]);
    out.assert_failure("levels deep");
    assert!(
        out.stderr.contains("deepimg") && out.stderr.contains("at most"),
        "{}",
        out.stderr
    );
    assert!(
        !out.stderr.contains("/tmp/"),
        "a server path: {}",
        out.stderr
    );
    assert_eq!(layer_count(&env, "deepimg"), 2, "the image changed");
    wait_tmp_empty(&data);
    env.alice
        .run(&["image", "remove", "deepimg"])
        .assert_success();
    // The image's removal collects the layer (gc).
    wait_for(
        "the deep layer to be collected",
        Duration::from_secs(120),
        || (list_dir(&data.join("layers")) == layers_before).then_some(()),
    )
    .unwrap_or_else(|e| panic!("{e}: {:?}", list_dir(&data.join("layers"))));
    wait_tmp_empty(&data);
    let log = env.server.log();
    assert!(!log.contains("cannot remove"), "{log}");
    assert!(!log.contains("gc failed"), "{log}");
}
