//! The real `walt-server` and `walt` CLI, run as child processes.

use std::fmt;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tempfile::TempDir;

use crate::util::{free_port, port_open, wait_for, workspace_bin};

/// A running walt server with its own data directory (kept until drop).
pub struct WaltServer {
    dir: TempDir,
    port: u16,
    child: Option<Child>,
    /// Started with `--plaintext` (no TLS).
    plaintext: bool,
}

impl WaltServer {
    /// Starts a server whose config `registries:` list holds `entries`
    /// (items made by `Registry::server_entry`, `Proxy::server_entry`...).
    pub fn start(entries: &[String]) -> Result<Self> {
        let yaml = if entries.is_empty() {
            "registries: []\n".to_string()
        } else {
            format!("registries:\n{}", entries.concat())
        };
        Self::start_with_config(&yaml)
    }

    /// Starts a server with a whole config file text.
    pub fn start_with_config(config_yaml: &str) -> Result<Self> {
        Self::start_with(config_yaml, false, |_| Ok(()))
    }

    /// Like [`WaltServer::start_with_config`], with `prepare` called on the
    /// (empty) data dir before the server starts (to mount something there).
    pub fn start_with_data_dir(
        config_yaml: &str,
        prepare: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<Self> {
        Self::start_with(config_yaml, false, prepare)
    }

    /// Starts a server serving the API in clear (`--plaintext`).
    pub fn start_plaintext(entries: &[String]) -> Result<Self> {
        let yaml = if entries.is_empty() {
            "registries: []\n".to_string()
        } else {
            format!("registries:\n{}", entries.concat())
        };
        Self::start_with(&yaml, true, |_| Ok(()))
    }

    fn start_with(
        config_yaml: &str,
        plaintext: bool,
        prepare: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("walt-e2e-server-")
            .tempdir()?;
        std::fs::write(dir.path().join("server.conf"), config_yaml)?;
        std::fs::create_dir_all(dir.path().join("data"))?;
        prepare(&dir.path().join("data"))?;
        let mut s = Self {
            dir,
            port: free_port(),
            child: None,
            plaintext,
        };
        // Retry on another port if the chosen one was taken meanwhile.
        let mut res = s.spawn();
        for _ in 0..2 {
            if res.is_ok() || !s.log().contains("cannot listen") {
                break;
            }
            s.port = free_port();
            res = s.spawn();
        }
        res?;
        Ok(s)
    }

    fn spawn(&mut self) -> Result<()> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let mut cmd = Command::new(workspace_bin("walt-server"));
        cmd.arg("--config")
            .arg(self.config_path())
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("--listen")
            .arg(self.addr())
            .arg("--event-socket")
            .arg(self.event_socket())
            .arg("--exports-file")
            .arg(self.exports_file())
            .env("NO_COLOR", "1")
            .env_remove("WALT_TLS_DIR")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if self.plaintext {
            cmd.arg("--plaintext");
        } else {
            cmd.arg("--tls-dir").arg(self.tls_dir());
        }
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env(
                "RUST_LOG",
                "info,walt=debug,walt_server=debug,walt_store=debug,walt_registry=debug",
            );
        }
        self.child = Some(cmd.spawn().context("cannot start walt-server")?);
        let res = wait_for("walt-server to listen", Duration::from_secs(30), || {
            if let Some(Ok(Some(st))) = self.child.as_mut().map(|c| c.try_wait()) {
                return Some(Err(anyhow::anyhow!("walt-server exited: {st}")));
            }
            port_open(self.port).then_some(Ok(()))
        });
        match res {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) | Err(e) => {
                self.child.take().map(|mut c| {
                    let _ = c.kill();
                    c.wait()
                });
                bail!("{e}\nserver log:\n{}", self.log())
            }
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The socket the DHCP hook (`walt-dhcp-event`) reports leases on.
    pub fn event_socket(&self) -> PathBuf {
        self.dir.path().join("dhcp-event.sock")
    }

    /// Runs the DHCP hook (`walt-dhcp-event <args>`) against this server.
    pub fn dhcp_event(&self, args: &[&str]) -> CmdOutput {
        let child = Command::new(workspace_bin("walt-dhcp-event"))
            .args(args)
            .env("WALT_DHCP_EVENT_SOCKET", self.event_socket())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot run walt-dhcp-event");
        wait_output(
            child,
            &format!("walt-dhcp-event {}", args.join(" ")),
            Duration::from_secs(30),
        )
    }

    /// The NFS exports file the server writes.
    pub fn exports_file(&self) -> PathBuf {
        self.dir.path().join("walt.exports")
    }

    /// The TFTP remap file the server writes (the default, in the data dir).
    pub fn tftp_map_file(&self) -> PathBuf {
        self.data_dir().join("tftp.map")
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("server.conf")
    }

    /// The server's TLS key and certificate (created at its first start):
    /// `tls/` next to its config file, where walt-server-setup looks too.
    pub fn tls_dir(&self) -> PathBuf {
        self.dir.path().join("tls")
    }

    /// `SHA256:<hex>` of the certificate the server presents (None when it
    /// runs in clear).
    pub fn fingerprint(&self) -> Option<String> {
        if self.plaintext {
            return None;
        }
        let pem = std::fs::read_to_string(self.tls_dir().join("cert.pem")).ok()?;
        Some(pem_fingerprint(&pem))
    }

    pub fn is_plaintext(&self) -> bool {
        self.plaintext
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// True while the process is alive.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// `kill -9` the server (no cleanup possible on its side).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then SIGKILL after 10 s. Returns the exit status when it stopped by itself.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe {
            libc::kill(c.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(st)) = c.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
        None
    }

    /// Starts the server again on the same data dir and port (after `kill9` or `stop`).
    pub fn restart(&mut self) -> Result<()> {
        if self.child.is_some() {
            self.stop();
        }
        self.spawn()
    }

    /// Sends SIGHUP to the server (configuration reload).
    pub fn sighup(&self) {
        if let Some(pid) = self.pid() {
            // SAFETY: plain kill(2) on our own child's pid.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGHUP);
            }
        }
    }

    /// Waits until the server log holds `needle` `count` times or more.
    pub fn wait_log(&self, needle: &str, count: usize) -> Result<()> {
        wait_for(
            &format!("`{needle}` in the walt-server log"),
            Duration::from_secs(20),
            || (self.log().matches(needle).count() >= count).then_some(()),
        )
        .with_context(|| {
            format!(
                "server log:
{}",
                self.log()
            )
        })
    }

    /// `walt-server-setup ARGS --config <this server's file> --server <its
    /// address>` (no `--server` added when `args` has one).
    pub fn setup(&self, args: &[&str]) -> CmdOutput {
        let mut cmd = Command::new(workspace_bin("walt-server-setup"));
        cmd.args(args).arg("--config").arg(self.config_path());
        if !args.contains(&"--server") {
            cmd.arg("--server").arg(self.addr());
        }
        cmd.env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = cmd.spawn().expect("cannot start walt-server-setup");
        wait_output(
            child,
            &format!("walt-server-setup {}", args.join(" ")),
            Duration::from_secs(60),
        )
    }

    /// A CLI for `user` with registry credentials `(label, user, password)`,
    /// its config pinning this server's certificate (or opting in to
    /// plaintext for a `--plaintext` server).
    pub fn cli(&self, user: &str, creds: &[(&str, &str, &str)]) -> Walt {
        let mut w = Walt::new(&self.addr(), user, &[]).expect("cannot create the walt client dir");
        w.pin = match self.fingerprint() {
            Some(fp) => Pin::Fingerprint(fp),
            None => Pin::Plaintext,
        };
        w.set_credentials(creds)
            .expect("cannot write the walt client config");
        w
    }
}

impl Drop for WaltServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(80).collect();
            eprintln!(
                "--- walt-server log (last {} lines, data dir {}) ---\n{}",
                tail.len(),
                self.data_dir().display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        self.stop();
    }
}

/// What a command printed, and how it ended.
#[derive(Debug, Clone)]
pub struct CmdOutput {
    pub cmdline: String,
    /// Exit code (None when killed by a signal).
    pub code: Option<i32>,
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

impl fmt::Display for CmdOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "$ {}\nexit: {:?}\n--- stdout ---\n{}--- stderr ---\n{}--------------",
            self.cmdline, self.code, self.stdout, self.stderr
        )
    }
}

impl CmdOutput {
    /// Lines of stderr starting with `error: `.
    pub fn error_lines(&self) -> Vec<&str> {
        self.stderr
            .lines()
            .filter(|l| l.starts_with("error: "))
            .collect()
    }

    /// Panics unless the command succeeded.
    #[track_caller]
    pub fn assert_success(&self) -> &Self {
        assert!(self.success, "command failed:\n{self}");
        assert!(
            self.error_lines().is_empty(),
            "command succeeded but printed an error line:\n{self}"
        );
        self
    }

    /// Panics unless the command failed (exit != 0) with exactly one
    /// `error: ` line, as the last non-empty line of stderr, and `needle`
    /// (case-insensitive) somewhere in stderr.
    #[track_caller]
    pub fn assert_failure(&self, needle: &str) -> &Self {
        self.assert_failure_any(&[needle])
    }

    /// Like `assert_failure`, with any of several substrings accepted.
    #[track_caller]
    pub fn assert_failure_any(&self, needles: &[&str]) -> &Self {
        assert!(!self.success, "command should have failed:\n{self}");
        assert!(
            self.code.is_some_and(|c| c != 0),
            "command should exit with a non-zero status:\n{self}"
        );
        let errors = self.error_lines();
        assert_eq!(
            errors.len(),
            1,
            "expected exactly one `error: ` line on stderr:\n{self}"
        );
        let last = self
            .stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        assert!(
            last.starts_with("error: "),
            "stderr must end with the `error: ` line:\n{self}"
        );
        let low = self.stderr.to_lowercase();
        assert!(
            needles.iter().any(|n| low.contains(&n.to_lowercase())),
            "stderr should contain one of {needles:?}:\n{self}"
        );
        self
    }

    /// Last non-empty stdout line.
    pub fn last_stdout_line(&self) -> &str {
        self.stdout
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("")
    }
}

/// `SHA256:<hex>` of the DER certificate in a PEM text.
pub fn pem_fingerprint(pem: &str) -> String {
    use base64::Engine;
    use sha2::Digest;
    let b64: String = pem
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN CERTIFICATE"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .expect("a PEM certificate");
    format!("SHA256:{}", hex::encode(sha2::Sha256::digest(&der)))
}

/// What a client config says about the server's transport.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pin {
    /// Nothing: the first connection pins the certificate.
    None,
    /// `walt.server-fingerprints` holds this one for the server.
    Fingerprint(String),
    /// `walt.plaintext: true`.
    Plaintext,
}

/// The `walt` CLI for one user, with its own client config and HOME.
pub struct Walt {
    dir: TempDir,
    pub user: String,
    server: String,
    /// Per-command timeout.
    pub timeout: Duration,
    /// Written into the config by `set_credentials`.
    pub pin: Pin,
    /// Extra environment of every command.
    pub env: Vec<(String, String)>,
}

impl Walt {
    pub fn new(server: &str, user: &str, creds: &[(&str, &str, &str)]) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("walt-e2e-cli-{user}-"))
            .tempdir()?;
        let w = Self {
            dir,
            user: user.into(),
            server: server.into(),
            timeout: Duration::from_secs(300),
            pin: Pin::None,
            env: Vec::new(),
        };
        w.set_credentials(creds)?;
        Ok(w)
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("walt-config.yml")
    }

    /// Rewrites the client config with these registry credentials.
    pub fn set_credentials(&self, creds: &[(&str, &str, &str)]) -> Result<()> {
        let mut s = format!(
            "walt:\n    server: {}\n    username: {}\n",
            self.server, self.user
        );
        match &self.pin {
            Pin::None => {}
            Pin::Fingerprint(fp) => {
                s += &format!(
                    "    server-fingerprints:\n        \"{}\": {fp}\n",
                    self.server
                )
            }
            Pin::Plaintext => s += "    plaintext: true\n",
        }
        if !creds.is_empty() {
            s += "registries:\n";
            for (label, u, p) in creds {
                s += &format!("    {label}: {{ username: {u}, password: {p} }}\n");
            }
        }
        let path = self.config_path();
        std::fs::write(&path, s)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        Ok(())
    }

    /// The command, ready to run (no terminal, NO_COLOR, own HOME).
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(workspace_bin("walt"));
        cmd.args(args)
            .env("WALT_CONFIG", self.config_path())
            .env("HOME", self.dir.path())
            .env("NO_COLOR", "1")
            .env_remove("TERM")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    /// Starts a command in the background (stdout/stderr piped).
    pub fn spawn(&self, args: &[&str]) -> Child {
        self.command(args).spawn().expect("cannot start walt")
    }

    /// Runs a command with `input` on its stdin (a pipe, not a terminal).
    pub fn run_with_input(&self, args: &[&str], input: &str) -> CmdOutput {
        let mut child = self
            .command(args)
            .stdin(Stdio::piped())
            .spawn()
            .expect("cannot start walt");
        let mut stdin = child.stdin.take().expect("piped stdin");
        let data = input.as_bytes().to_vec();
        std::thread::spawn(move || {
            use std::io::Write;
            let _ = stdin.write_all(&data);
        });
        wait_output(child, &format!("walt {}", args.join(" ")), self.timeout)
    }

    /// Runs `walt ARGS` (a shell-quoted string) in a tmux terminal; its exit
    /// status is written to the returned file when it ends.
    pub fn in_terminal(&self, args: &str) -> (crate::tmux::Tmux, PathBuf) {
        let exit = self.dir.path().join(format!(
            "exit-{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        let command = format!(
            "env WALT_CONFIG={} HOME={} TERM=xterm {} {args}; echo $? > {}; sleep 600",
            self.config_path().display(),
            self.dir.path().display(),
            workspace_bin("walt").display(),
            exit.display()
        );
        (
            crate::tmux::Tmux::start(&command).expect("cannot start tmux"),
            exit,
        )
    }

    /// Runs a command to completion (killed after `self.timeout`).
    pub fn run(&self, args: &[&str]) -> CmdOutput {
        let child = self.spawn(args);
        wait_output(child, &format!("walt {}", args.join(" ")), self.timeout)
    }

    /// `walt image show --names-only`, as a list (panics on failure).
    pub fn image_names(&self) -> Vec<String> {
        let out = self.run(&["image", "show", "--names-only"]);
        out.assert_success();
        out.stdout
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect()
    }

    /// The row of `walt image show` for `name` (a line starting with `name `).
    pub fn show_row(&self, name: &str) -> Option<String> {
        let out = self.run(&["image", "show"]);
        out.assert_success();
        out.stdout
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .map(String::from)
    }

    /// `walt image clone [args...]`, asserted to succeed.
    #[track_caller]
    pub fn clone_ok(&self, args: &[&str]) -> CmdOutput {
        let mut a = vec!["image", "clone"];
        a.extend_from_slice(args);
        let out = self.run(&a);
        out.assert_success();
        out
    }

    /// `walt image clone [args...]`, whatever happens.
    pub fn clone(&self, args: &[&str]) -> CmdOutput {
        let mut a = vec!["image", "clone"];
        a.extend_from_slice(args);
        self.run(&a)
    }

    pub fn home(&self) -> &Path {
        self.dir.path()
    }
}

/// Collects a child's output, killing it after `timeout`.
pub fn wait_output(mut child: Child, cmdline: &str, timeout: Duration) -> CmdOutput {
    let mut so = child.stdout.take();
    let mut se = child.stderr.take();
    let t1 = std::thread::spawn(move || {
        let mut s = Vec::new();
        if let Some(r) = so.as_mut() {
            let _ = r.read_to_end(&mut s);
        }
        s
    });
    let t2 = std::thread::spawn(move || {
        let mut s = Vec::new();
        if let Some(r) = se.as_mut() {
            let _ = r.read_to_end(&mut s);
        }
        s
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Ok(Some(st)) = child.try_wait() {
            break Some(st);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = String::from_utf8_lossy(&t1.join().unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&t2.join().unwrap_or_default()).into_owned();
    let Some(status) = status else {
        panic!("`{cmdline}` timed out after {timeout:?}\nstdout:\n{stdout}\nstderr:\n{stderr}");
    };
    CmdOutput {
        cmdline: cmdline.into(),
        code: status.code(),
        success: status.success(),
        stdout,
        stderr,
    }
}
