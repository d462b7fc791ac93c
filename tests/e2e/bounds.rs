//! Bounds of `server.conf`'s `limits:` section: unpacked sizes (gzip, zstd
//! and sparse bombs, a 100 GiB long-name header), the free-space reserve
//! (a small tmpfs data dir), shells per user and the save prompt timeout.
//! Each refusal leaves the store as it was, `tmp/` empty, the server up.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use walt_e2e::util::wait_for;
use walt_e2e::*;

/// An environment (registry `local`, alice, bob) whose server config ends
/// with `limits` (a `limits:` section); `prepare` gets the data dir before
/// the server starts.
fn env_with(limits: &str, prepare: impl FnOnce(&Path) -> anyhow::Result<()>) -> Env {
    let local = Registry::start(RegistryOpts::plain()).unwrap();
    let config = format!("registries:\n{}{limits}", local.server_entry("local"));
    let server = WaltServer::start_with_data_dir(&config, prepare).unwrap();
    let alice = server.cli("alice", &[]);
    let bob = server.cli("bob", &[]);
    Env {
        images: ImageBuilder::new().unwrap(),
        local,
        secure: None,
        noverify: None,
        proxy: None,
        server,
        alice,
        bob,
    }
}

/// A clone refused with one of `needles`, the store unchanged.
fn refused(env: &Env, url: &str, needles: &[&str]) -> CmdOutput {
    let before = env.snapshot();
    let out = env.alice.clone(&[url]);
    out.assert_failure_any(needles);
    env.assert_unchanged(&before);
    out
}

/// Pushes an image of `layers` (with the walt node models label) as `repo`.
fn push(env: &Env, repo: &str, layers: &[Layer]) {
    let img = env
        .images
        .image(Format::Oci, ImageConfig::amd64("pc-x86-64"), layers)
        .unwrap();
    env.push_local(repo, "latest", &img);
}

/// A layer with `files` files of `size` zero bytes each (`zeros-<i>`).
fn zeros_layer(env: &Env, compression: Compression, files: usize, size: u64) -> Layer {
    env.images
        .layer_with(Format::Oci, compression, |b| {
            for i in 0..files {
                let mut h = tar::Header::new_ustar();
                h.set_path(format!("zeros-{i}"))?;
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(0o644);
                h.set_mtime(1_700_000_000);
                h.set_size(size);
                h.set_cksum();
                b.append(&h, io::repeat(0).take(size))?;
            }
            Ok(())
        })
        .unwrap()
}

/// A layer whose tar stream is `bytes` as they are.
fn raw_layer(env: &Env, compression: Compression, bytes: &[u8]) -> Layer {
    env.images
        .layer_with(Format::Oci, compression, |b| b.get_mut().write_all(bytes))
        .unwrap()
}

/// The archive named `name` of walt-tar's hostile table.
fn hostile(name: &str) -> Vec<u8> {
    let outside = tempfile::tempdir().unwrap();
    walt_tar::testing::hostile_archives(outside.path())
        .into_iter()
        .find(|h| h.name == name)
        .unwrap_or_else(|| panic!("no hostile archive named {name:?}"))
        .tar
}

/// The server still answers, and clones what fits.
fn server_still_works(env: &mut Env, repo: &str) {
    assert!(env.server.is_running(), "walt-server died");
    let img = env.busybox();
    env.push_local(repo, "latest", &img);
    env.alice
        .clone_ok(&[&format!("local:{repo}"), "still-works"]);
    assert_tmp_empty(&env.server.data_dir());
}

const SMALL: &str = "limits:\n  layer-unpacked-size: 16M\n  image-unpacked-size: 40M\n";

#[test]
fn bombs_and_oversized_layers_are_refused() {
    let mut env = env_with(SMALL, |_| Ok(()));
    let too_large = ["more than 16M unpacked (limits.layer-unpacked-size"];

    // 256 MiB of zeros in a few hundred KiB, gzip and zstd.
    let gzip = zeros_layer(&env, Compression::Gzip, 1, 256 << 20);
    assert!(gzip.blob.size < 1 << 20, "not a bomb: {}", gzip.blob.size);
    push(&env, "walt-test/gzip-bomb", &[gzip]);
    refused(&env, "local:walt-test/gzip-bomb", &too_large);

    let zstd = zeros_layer(&env, Compression::Zstd, 1, 256 << 20);
    assert!(zstd.blob.size < 1 << 20, "not a bomb: {}", zstd.blob.size);
    push(&env, "walt-test/zstd-bomb", &[zstd]);
    refused(&env, "local:walt-test/zstd-bomb", &too_large);

    // Small files, then 256 MiB of zeros after the end of the archive: the
    // uncompressed stream itself is bounded.
    let mut tail = Vec::new();
    {
        let mut b = tar::Builder::new(&mut tail);
        walt_e2e::image::append_raw(&mut b, &RawEntry::file("small", b"hello\n")).unwrap();
        b.finish().unwrap();
    }
    let stream = env
        .images
        .layer_with(Format::Oci, Compression::Zstd, |b| {
            b.get_mut().write_all(&tail)?;
            io::copy(&mut io::repeat(0).take(256 << 20), b.get_mut()).map(drop)
        })
        .unwrap();
    push(&env, "walt-test/zstd-tail-bomb", &[stream]);
    refused(
        &env,
        "local:walt-test/zstd-tail-bomb",
        &["its uncompressed stream: more than 33M unpacked (limits.layer-unpacked-size"],
    );

    // 1 TiB of holes: holes count.
    let sparse = raw_layer(
        &env,
        Compression::Gzip,
        &hostile("sparse bomb (1 TiB of holes)"),
    );
    push(&env, "walt-test/sparse-bomb", &[sparse]);
    refused(&env, "local:walt-test/sparse-bomb", &too_large);

    // A long-name header claiming 100 GiB: refused before anything is read.
    let long = raw_layer(
        &env,
        Compression::Gzip,
        &hostile("GNU long name claiming 100 GiB"),
    );
    push(&env, "walt-test/long-name", &[long]);
    refused(&env, "local:walt-test/long-name", &["long name"]);

    // Layers that fit one by one but not together.
    let layers: Vec<Layer> = (0..3)
        .map(|i| {
            env.images
                .big_random_layer(Format::Oci, Compression::None, 15 << 20, i)
                .unwrap()
        })
        .collect();
    push(&env, "walt-test/too-big-image", &layers);
    refused(
        &env,
        "local:walt-test/too-big-image",
        &["the image: more than 40M unpacked (limits.image-unpacked-size"],
    );

    server_still_works(&mut env, "walt-test/busybox");
}

/// A tmpfs mounted on a data dir, unmounted (and its directory removed)
/// when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> anyhow::Result<Self> {
        let st = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .status()?;
        anyhow::ensure!(st.success(), "cannot mount a tmpfs on {}", dir.display());
        Ok(Tmpfs(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        if let Some(p) = self.0.parent() {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

/// `n` bytes that do not compress.
fn random_bytes(n: usize, mut seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        out.extend_from_slice(&seed.to_le_bytes());
    }
    out.truncate(n);
    out
}

#[test]
fn free_space_reserve_is_kept() {
    let mut tmpfs = None;
    let mut env = env_with("limits:\n  free-space-reserve: 64M\n", |dir| {
        tmpfs = Some(Tmpfs::mount(dir, "160m")?);
        Ok(())
    });
    // Unmounted after the server stops.
    let _tmpfs = tmpfs;
    let no_space = ["not enough free space on the server"];

    // Known beforehand: a 120 MiB blob does not fit above the reserve.
    let big = env
        .images
        .big_random_layer(Format::Oci, Compression::None, 120 << 20, 7)
        .unwrap();
    push(&env, "walt-test/big", &[big]);
    let out = refused(&env, "local:walt-test/big", &no_space);
    assert!(
        out.stderr
            .contains("64M must stay free (limits.free-space-reserve"),
        "{out}"
    );

    // Known only while unpacking: 5 × 20 MiB of zeros in a tiny blob,
    // stopped when the reserve is reached.
    let zeros = zeros_layer(&env, Compression::GzipFast, 5, 20 << 20);
    push(&env, "walt-test/zeros", &[zeros]);
    refused(&env, "local:walt-test/zeros", &no_space);

    // What fits is still cloned.
    server_still_works(&mut env, "walt-test/busybox");

    // walt image cp: the archive's size is not known beforehand; stopped
    // while it comes, nothing saved.
    let local = tempfile::tempdir().unwrap();
    let file = local.path().join("big.bin");
    std::fs::write(&file, random_bytes(110 << 20, 42)).unwrap();
    let before = env.snapshot();
    env.alice
        .run(&["image", "cp", file.to_str().unwrap(), "still-works:/root/"])
        .assert_failure_any(&no_space);
    env.assert_unchanged(&before);
    assert!(env.server.is_running(), "walt-server died");

    // Saving a shell whose changes fit: saved, since the layer is the
    // changes themselves (its tar is not written: tree-backed).
    let (t, _exit) = env.alice.in_terminal("image shell still-works");
    t.wait_line("the shell prompt", |l| l.ends_with('#'))
        .unwrap();
    t.enter("head -c 83886080 /dev/urandom > /root/big; exit")
        .unwrap();
    t.wait_line("the save prompt", |l| {
        l.starts_with("Name of the image to save")
    })
    .unwrap();
    t.keys(&["Enter"]).unwrap();
    t.wait_line("the overwrite question", |l| l.contains("(y/n)"))
        .unwrap();
    t.enter("y").unwrap();
    t.wait_line("the save", |l| l.contains("Image still-works updated."))
        .unwrap();
    assert!(env.server.is_running(), "walt-server died");
}

#[test]
fn shells_per_user_are_bounded() {
    let env = env_with("limits:\n  shells-per-user: 1\n", |_| Ok(()));
    let img = env.busybox();
    env.push_local("walt-test/busybox", "latest", &img);
    env.alice.clone_ok(&["local:walt-test/busybox", "one"]);
    env.alice.clone_ok(&["local:walt-test/busybox", "two"]);
    env.bob.clone_ok(&["local:walt-test/busybox", "one"]);

    let (t, _exit) = env.alice.in_terminal("image shell one");
    t.wait_line("the shell prompt", |l| l.ends_with('#'))
        .unwrap();
    // A second shell of alice's, on another image, is refused.
    let out = env
        .alice
        .run_with_input(&["image", "shell", "two"], "exit\n");
    out.assert_failure("limits.shells-per-user");
    assert!(
        out.stderr.contains("alice already has 1 shells open"),
        "{out}"
    );
    // bob's are counted apart.
    let (tb, exit_b) = env.bob.in_terminal("image shell one");
    tb.wait_line("bob's shell prompt", |l| l.ends_with('#'))
        .unwrap();
    tb.enter("exit").unwrap();
    wait_for("bob's shell to end", Duration::from_secs(30), || {
        std::fs::read_to_string(&exit_b)
            .ok()
            .filter(|s| !s.trim().is_empty())
    })
    .unwrap();
    // Once alice's first shell has ended, she may open another.
    t.enter("exit").unwrap();
    env.server.wait_log("shell exited", 2).unwrap();
    let (t2, _exit2) = env.alice.in_terminal("image shell two");
    t2.wait_line("the second shell prompt", |l| l.ends_with('#'))
        .unwrap();
    env.alice
        .run_with_input(&["image", "shell", "one"], "exit\n")
        .assert_failure("limits.shells-per-user");

    // A reload raises the limit for the shells opened after it.
    let conf = env.server.config_path();
    let text = std::fs::read_to_string(&conf).unwrap();
    std::fs::write(
        &conf,
        text.replace("shells-per-user: 1", "shells-per-user: 2"),
    )
    .unwrap();
    env.server.sighup();
    env.server.wait_log("configuration reloaded", 1).unwrap();
    let (t3, _exit3) = env.alice.in_terminal("image shell one");
    t3.wait_line("a second shell of alice after the reload", |l| {
        l.ends_with('#')
    })
    .unwrap();
    t3.enter("exit").unwrap();
    t2.enter("exit").unwrap();
}

#[test]
fn unanswered_save_prompt_discards_and_releases_everything() {
    let env = env_with("limits:\n  save-prompt-timeout: 2s\n", |_| Ok(()));
    let img = env.busybox();
    env.push_local("walt-test/busybox", "latest", &img);
    env.alice.clone_ok(&["local:walt-test/busybox", "img"]);
    let before = env.snapshot();

    let (t, _exit) = env.alice.in_terminal("image shell img");
    t.wait_line("the shell prompt", |l| l.ends_with('#'))
        .unwrap();
    t.enter("echo changed > /root/file; exit").unwrap();
    t.wait_line("the save prompt", |l| {
        l.starts_with("Name of the image to save")
    })
    .unwrap();
    // Nobody answers.
    env.server
        .wait_log("save prompt not answered in time", 1)
        .unwrap();
    // Everything is released: the session's files, the image lock, and
    // the gc guard (a removal collects the image's content at once).
    env.assert_unchanged(&before);
    env.alice
        .run(&["image", "cp", "/etc/hostname", "img:/root/"])
        .assert_success();
    env.alice.run(&["image", "remove", "img"]).assert_success();
    assert!(
        !crate::common::store_has_layer(&env, &img, 0),
        "the image's layer was not collected: a gc guard is still held"
    );
    // The late answer gets the reason.
    t.keys(&["Enter"]).unwrap();
    t.wait_line("the error", |l| {
        l.starts_with("error: ") && l.contains("limits.save-prompt-timeout")
    })
    .unwrap();
}

/// Resident memory of process `pid`, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb * 1024
}

/// Pids of processes whose command line is `cmdline` (NUL-separated).
fn pids_running(cmdline: &[u8]) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c == cmdline))
        .collect()
}

#[test]
fn keystrokes_to_a_shell_that_does_not_read_are_held_back() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    let mut env = env_with("", |_| Ok(()));
    let img = env.busybox();
    env.push_local("walt-test/busybox", "latest", &img);
    env.alice.clone_ok(&["local:walt-test/busybox", "img"]);
    let mut cli = env
        .alice
        .command(&["image", "shell", "img"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = cli.stdin.take().unwrap();
    // The shell becomes a process that never reads its terminal, left in
    // raw mode (in canonical mode the kernel drops what does not fit in a
    // line, so the terminal itself would never be full).
    stdin
        .write_all(b"busybox stty raw -echo; exec sleep 4242\n")
        .unwrap();
    wait_for("the shell to exec sleep", Duration::from_secs(30), || {
        (!pids_running(b"sleep\x004242\x00").is_empty()).then_some(())
    })
    .unwrap();
    let server = env.server.pid().unwrap();
    let rss_before = rss(server);

    // Up to 256 MiB of keystrokes, as fast as the client takes them.
    const TOTAL: u64 = 256 << 20;
    let written = Arc::new(AtomicU64::new(0));
    let writer = {
        let written = written.clone();
        std::thread::spawn(move || {
            let chunk = vec![b'x'; 1 << 20];
            while written.load(Ordering::Relaxed) < TOTAL {
                if stdin.write_all(&chunk).is_err() {
                    return;
                }
                written.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            }
        })
    };
    // Until everything went through, or the client is held back (no
    // progress over 40 looks in a row).
    let (mut last, mut still) = (u64::MAX, 0);
    wait_for(
        "the keystrokes to go or stall",
        Duration::from_secs(120),
        || {
            let now = written.load(Ordering::Relaxed);
            still = if now == last && now > 0 { still + 1 } else { 0 };
            last = now;
            (now >= TOTAL || still >= 40).then_some(())
        },
    )
    .unwrap();
    let sent = written.load(Ordering::Relaxed);
    let grown = rss(server).saturating_sub(rss_before);
    assert!(
        sent < TOTAL,
        "the client could send all {TOTAL} bytes to a shell that reads nothing"
    );
    assert!(
        grown < 64 << 20,
        "walt-server grew by {grown} bytes holding keystrokes ({sent} sent)"
    );

    // The client going away ends the session, the server stays up.
    let _ = cli.kill();
    let _ = cli.wait();
    drop(writer);
    wait_for("the sandbox to go", Duration::from_secs(30), || {
        pids_running(b"sleep\x004242\x00").is_empty().then_some(())
    })
    .unwrap();
    assert_tmp_empty(&env.server.data_dir());
    assert!(env.server.is_running(), "walt-server died");
}

/// The status of an `Images.Remove` call whose image name is `size` bytes
/// long, made with the walt API directly (the CLI never sends such a
/// message: a command-line argument is at most 128 KiB).
fn remove_with_a_name_of(server: &WaltServer, size: usize) -> tonic::Status {
    let pin: walt_tls::Fingerprint = server.fingerprint().expect("a TLS server").parse().unwrap();
    let uri = format!("http://{}", server.addr());
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let conn = walt_tls::connect(
            &uri,
            walt_tls::Transport::Tls(Some(pin)),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        let mut client = walt_proto::v1::images_client::ImagesClient::new(conn.channel);
        let mut req = tonic::Request::new(walt_proto::v1::RemoveRequest {
            image: "a".repeat(size),
        });
        req.metadata_mut()
            .insert(walt_proto::USER_METADATA_KEY, "alice".parse().unwrap());
        client.remove(req).await.expect_err("no such image")
    })
}

#[test]
fn grpc_message_sizes_are_bounded() {
    // A 2 MiB message: over a 1M receive limit, refused by gRPC before the
    // service sees it; under the default (4M), it reaches the service,
    // which refuses the name.
    let mut small = env_with("limits:\n  grpc-receive-size: 1M\n", |_| Ok(()));
    let status = remove_with_a_name_of(&small.server, 2 << 20);
    assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");
    assert!(small.server.is_running(), "walt-server died");
    server_still_works(&mut small, "walt-test/busybox");

    let default = env_with("", |_| Ok(()));
    let status = remove_with_a_name_of(&default.server, 2 << 20);
    assert_ne!(status.code(), tonic::Code::OutOfRange, "{status:?}");
}
