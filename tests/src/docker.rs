//! A real Docker daemon on its own data root and socket (no bridge, no
//! iptables changes), stopped on drop.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tempfile::TempDir;

use crate::image::{append_raw, busybox_rootfs_entries};
use crate::util::{run_cmd, wait_for};

pub struct Dockerd {
    dir: TempDir,
    child: Option<Child>,
}

/// True when `GET /_ping` on `socket` answers 200.
pub fn ping(socket: &Path) -> bool {
    let Ok(mut s) = UnixStream::connect(socket) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /_ping HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut buf = [0u8; 64];
    let mut got = Vec::new();
    while got.len() < 12 {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    got.starts_with(b"HTTP/1.1 200") || got.starts_with(b"HTTP/1.0 200")
}

impl Dockerd {
    /// Starts `dockerd` in a fresh temporary directory and waits for `/_ping`.
    pub fn start() -> Result<Self> {
        // Short path: the socket path must fit in sun_path.
        let dir = tempfile::Builder::new().prefix("wd-").tempdir_in("/tmp")?;
        let w = dir.path();
        let log = std::fs::File::create(w.join("dockerd.log"))?;
        let child = Command::new("dockerd")
            .arg("--data-root")
            .arg(w.join("d"))
            .arg("--exec-root")
            .arg(w.join("e"))
            .arg("--pidfile")
            .arg(w.join("dockerd.pid"))
            .arg("-H")
            .arg(format!("unix://{}", w.join("docker.sock").display()))
            .args(["--iptables=false", "--ip6tables=false", "--bridge=none"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start dockerd (install docker.io: scripts/install-deps.sh)")?;
        let mut d = Dockerd {
            dir,
            child: Some(child),
        };
        let sock = d.socket();
        let res = wait_for("dockerd to answer /_ping", Duration::from_secs(60), || {
            if let Some(Ok(Some(st))) = d.child.as_mut().map(|c| c.try_wait()) {
                return Some(Err(anyhow::anyhow!("dockerd exited: {st}")));
            }
            ping(&sock).then_some(Ok(()))
        });
        match res {
            Ok(Ok(())) => Ok(d),
            Ok(Err(e)) | Err(e) => {
                let log = d.log();
                d.stop();
                bail!("{e}\ndockerd log:\n{log}")
            }
        }
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("docker.sock")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dockerd.log")).unwrap_or_default()
    }

    /// `docker -H unix://<socket> ARGS`; fails on a non-zero exit.
    pub fn docker(&self, args: &[&str]) -> Result<Output> {
        let mut cmd = Command::new("docker");
        cmd.arg("-H")
            .arg(format!("unix://{}", self.socket().display()))
            .args(args)
            .env("DOCKER_CONFIG", self.dir.path().join("client"));
        run_cmd(&mut cmd)
    }

    /// Imports a busybox rootfs (with `/etc/walt-test-marker` = `marker`)
    /// as `name`, labelled `walt.node.models=models` when given.
    pub fn import_busybox(&self, name: &str, models: Option<&str>, marker: &str) -> Result<()> {
        let tar_path = self
            .dir
            .path()
            .join(format!("rootfs-{}.tar", name.replace(['/', ':'], "_")));
        {
            let f = std::fs::File::create(&tar_path)?;
            let mut b = tar::Builder::new(f);
            for e in busybox_rootfs_entries(marker)? {
                append_raw(&mut b, &e)?;
            }
            b.finish()?;
        }
        let tar_str = tar_path.display().to_string();
        let change = models.map(|m| format!("LABEL walt.node.models={m}"));
        let mut args = vec!["import"];
        if let Some(c) = &change {
            args.extend(["--change", c]);
        }
        args.extend([tar_str.as_str(), name]);
        self.docker(&args)?;
        Ok(())
    }

    /// The diff_ids of `name` (`docker image inspect` RootFS.Layers).
    pub fn diff_ids(&self, name: &str) -> Result<Vec<String>> {
        let out = self.docker(&[
            "image",
            "inspect",
            "--format",
            "{{json .RootFS.Layers}}",
            name,
        ])?;
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// SIGTERM, then SIGKILL after 20 s.
    pub fn stop(&mut self) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe {
            libc::kill(c.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = c.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            eprintln!(
                "--- dockerd log (last lines) ---\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        self.stop();
    }
}
