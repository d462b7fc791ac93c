//! `install`: the steps that make a machine a walt server. Each step is
//! checked first (`Step::check`, which only reads); what a step would change
//! is a `Plan` of plain `Action`s, printed as "would: …" in a dry run or
//! carried out by `apply`. Facts about the running system (binfmt, systemd,
//! Docker, NFS) come through `Host`, so the checks are unit-tested with a fake
//! one and a temporary root.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use walt_core::config::{Registry, ServerConfig};

use crate::model::Config;

pub const DATA_DIR: &str = "/var/lib/walt";
pub const CONF_DIR: &str = "/etc/walt";
pub const CONF_FILE: &str = "/etc/walt/server.conf";
/// The server's TLS key and certificate (walt-server's default `--tls-dir`:
/// `tls/` next to its configuration file).
pub const TLS_DIR: &str = "/etc/walt/tls";
pub const UNIT_FILE: &str = "/etc/systemd/system/walt-server.service";
pub const DEFAULT_SERVER_BIN: &str = "/usr/local/bin/walt-server";
pub const DEFAULT_WALT_NET_IP: &str = "192.168.212.1/24";
pub const DOCKER_SOCKET: &str = "/var/run/docker.sock";
/// Where the walt CLI's completion scripts and man pages go (issue 15 item 11).
pub const BASH_COMPLETION: &str = "/usr/share/bash-completion/completions/walt";
/// Where WalT's server setup put its bash completion. bash-completion loads
/// that directory first, so a WalT script left there (which asks WalT's
/// client for its completions) would hide ours: when the file exists, it
/// gets ours too.
pub const WALT_BASH_COMPLETION: &str = "/etc/bash_completion.d/walt";
pub const ZSH_COMPLETION: &str = "/usr/local/share/zsh/site-functions/_walt";
pub const MAN_DIR: &str = "/usr/share/man/man1";
/// binfmt_misc entries needed to run arm images (arm64, then 32-bit arm).
pub const BINFMTS: [&str; 2] = ["qemu-aarch64", "qemu-arm"];

/// What the steps need to know about the running system.
pub trait Host {
    /// Whether `path` (on the real system, never under `--root`) exists.
    fn exists(&self, path: &Path) -> bool;
    /// Whether `path` is a Unix socket.
    fn is_socket(&self, path: &Path) -> bool;
    /// The text of a system file (binfmt_misc entries).
    fn read(&self, path: &Path) -> io::Result<String>;
    /// A program on PATH (or in /usr/sbin, /sbin).
    fn which(&self, program: &str) -> Option<PathBuf>;
    /// Whether a command runs and exits with 0 (its output is discarded).
    fn succeeds(&self, cmd: &[String]) -> bool;
    /// Runs a command; Err is why it failed (its last stderr line).
    fn run(&self, cmd: &[String]) -> Result<(), String>;
    /// Runs a command and returns its stdout; Err as for `run`.
    fn output(&self, cmd: &[String]) -> Result<Vec<u8>, String>;
}

/// The machine this program runs on.
pub struct RealHost;

impl Host for RealHost {
    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }

    fn is_socket(&self, path: &Path) -> bool {
        fs::metadata(path).is_ok_and(|m| m.file_type().is_socket())
    }

    fn read(&self, path: &Path) -> io::Result<String> {
        fs::read_to_string(path)
    }

    fn which(&self, program: &str) -> Option<PathBuf> {
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
            .map(|d| d.join(program))
            .find(|p| {
                fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            })
    }

    fn succeeds(&self, cmd: &[String]) -> bool {
        let Some((prog, args)) = cmd.split_first() else {
            return false;
        };
        Command::new(prog)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    fn run(&self, cmd: &[String]) -> Result<(), String> {
        self.output(cmd).map(drop)
    }

    fn output(&self, cmd: &[String]) -> Result<Vec<u8>, String> {
        let Some((prog, args)) = cmd.split_first() else {
            return Ok(Vec::new());
        };
        let out = Command::new(prog)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {prog}: {e}"))?;
        if out.status.success() {
            return Ok(out.stdout);
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        let last = stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("no message");
        Err(format!(
            "{} ({}): {}",
            cmd.join(" "),
            out.status,
            last.trim()
        ))
    }
}

/// How `install` runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// Prefix of every path written (`--root`); the binfmt and systemctl
    /// steps are then only checked.
    pub root: Option<PathBuf>,
    /// Change nothing (`--dry-run`).
    pub dry_run: bool,
    /// The walt-server binary the systemd unit starts.
    pub server_bin: PathBuf,
}

impl Options {
    /// Where a system path is written: under `root` when there is one.
    pub fn path(&self, system_path: &str) -> PathBuf {
        match &self.root {
            Some(root) => root.join(system_path.trim_start_matches('/')),
            None => PathBuf::from(system_path),
        }
    }
}

/// The walt-server next to this binary, or the default install location.
pub fn default_server_bin() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("walt-server")))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SERVER_BIN))
}

/// One change to the machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Creates a directory (and its parents) with this mode.
    CreateDir { path: PathBuf, mode: u32 },
    /// Writes a file atomically (temporary file, then rename).
    WriteFile {
        path: PathBuf,
        text: String,
        mode: u32,
    },
    /// Runs a command.
    Run(Vec<String>),
}

/// What a step would do: the actions, and how to say it before ("create …")
/// and after ("created …").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub actions: Vec<Action>,
    pub todo: String,
    pub done: String,
}

/// What a check finds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// Nothing to do.
    Ok(String),
    /// Something to do.
    Todo(Plan),
    /// Something this program does not do (reported only).
    Missing(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    DataDirs,
    Config,
    Unit,
    Binfmt,
    Docker,
    Nfs,
    Tls,
    Tftp,
    DhcpHook,
    Completion,
}

pub const STEPS: [Step; 10] = [
    Step::DataDirs,
    Step::Config,
    Step::Unit,
    Step::Binfmt,
    Step::Docker,
    Step::Nfs,
    Step::Tls,
    Step::Tftp,
    Step::DhcpHook,
    Step::Completion,
];

impl Step {
    /// Looks at the machine (reads only). Err: the step cannot proceed.
    pub fn check(self, opts: &Options, host: &dyn Host) -> Result<Check, String> {
        match self {
            Step::DataDirs => check_dirs(opts),
            Step::Config => check_config(opts),
            Step::Unit => check_unit(opts, host),
            Step::Binfmt => Ok(check_binfmt(opts, host)),
            Step::Docker => Ok(check_docker(host)),
            Step::Nfs => Ok(check_nfs(host)),
            Step::Tls => check_tls(opts),
            Step::Tftp => Ok(check_tftp(host)),
            Step::DhcpHook => Ok(check_dhcp_hook(opts, host)),
            Step::Completion => Ok(check_completion(opts, host)),
        }
    }

    /// Whether a failure of this step is an error (or only something missing).
    fn failure_is_error(self) -> bool {
        !matches!(
            self,
            Step::Binfmt
                | Step::Docker
                | Step::Nfs
                | Step::Tftp
                | Step::DhcpHook
                | Step::Completion
        )
    }
}

fn check_dirs(opts: &Options) -> Result<Check, String> {
    let mut todo = Vec::new();
    let mut actions = Vec::new();
    // The store holds images as they are (setuid files, device nodes): only
    // root may enter it. The server tightens a looser data dir at start too.
    for (dir, mode) in [(DATA_DIR, 0o700), (CONF_DIR, 0o755)] {
        let path = opts.path(dir);
        match fs::metadata(&path) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(format!("{} exists and is not a directory", path.display())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                todo.push(format!("{} (mode {mode:04o})", path.display()));
                actions.push(Action::CreateDir { path, mode });
            }
            Err(e) => return Err(format!("cannot access {}: {e}", path.display())),
        }
    }
    if actions.is_empty() {
        return Ok(Check::Ok(format!(
            "data directories {} and {} exist",
            opts.path(DATA_DIR).display(),
            opts.path(CONF_DIR).display()
        )));
    }
    let list = todo.join(", ");
    Ok(Check::Todo(Plan {
        actions,
        todo: format!("create {list}"),
        done: format!("created {list}"),
    }))
}

/// The key and self-signed certificate the server presents to clients:
/// created when there is no certificate (the key 0600 first, the
/// certificate 0644 last, each written atomically).
fn check_tls(opts: &Options) -> Result<Check, String> {
    let dir = opts.path(TLS_DIR);
    let key = dir.join(walt_tls::KEY_FILE);
    let cert = dir.join(walt_tls::CERT_FILE);
    match walt_tls::Fingerprint::of_dir(&dir)? {
        Some(fp) if key.exists() => {
            return Ok(Check::Ok(format!(
                "TLS certificate {} exists (fingerprint {fp})",
                cert.display()
            )));
        }
        Some(_) => {
            return Err(format!(
                "{} has no key {}: remove the certificate to have both created",
                cert.display(),
                key.display()
            ));
        }
        None => {}
    }
    let id = walt_tls::create().map_err(|e| e.to_string())?;
    let what = format!(
        "a TLS key and self-signed certificate in {} (fingerprint {})",
        dir.display(),
        id.fingerprint
    );
    Ok(Check::Todo(Plan {
        actions: vec![
            Action::CreateDir {
                path: dir,
                mode: 0o755,
            },
            Action::WriteFile {
                path: key,
                text: id.key_pem,
                mode: 0o600,
            },
            Action::WriteFile {
                path: cert,
                text: id.cert_pem,
                mode: 0o644,
            },
        ],
        todo: format!("create {what}"),
        done: format!("created {what}"),
    }))
}

/// The configuration written when there is none: the Docker Hub, and WalT's
/// network section (a virtual walt-net).
pub fn default_config_text() -> String {
    let mut config = Config::default();
    config.set_walt_net(None, Some(DEFAULT_WALT_NET_IP.into()));
    config.set_hub(true);
    config
        .to_yaml()
        .expect("the default configuration serialises")
}

fn registry_labels(config: &ServerConfig) -> String {
    let labels: Vec<&str> = config.registries.iter().map(Registry::label).collect();
    if labels.is_empty() {
        "none".into()
    } else {
        labels.join(", ")
    }
}

fn check_config(opts: &Options) -> Result<Check, String> {
    let path = opts.path(CONF_FILE);
    match fs::read_to_string(&path) {
        Ok(text) => match ServerConfig::parse(&path.display().to_string(), &text) {
            Ok(c) => Ok(Check::Ok(format!(
                "{} is valid (registries: {}{}); left as is",
                path.display(),
                registry_labels(&c),
                c.skipped
                    .iter()
                    .map(|s| format!("; {}", s.warning()))
                    .collect::<String>()
            ))),
            Err(e) => Err(format!(
                "{e}; the file is left as is: fix it (walt-server-setup --edit-conf), then run install again"
            )),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Check::Todo(Plan {
            actions: vec![Action::WriteFile {
                path: path.clone(),
                text: default_config_text(),
                mode: 0o644,
            }],
            todo: format!(
                "write {} (defaults: Docker Hub, walt-net {DEFAULT_WALT_NET_IP})",
                path.display()
            ),
            done: format!(
                "wrote {} (defaults: Docker Hub, walt-net {DEFAULT_WALT_NET_IP})",
                path.display()
            ),
        })),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

/// The systemd unit starting `server_bin`.
pub fn unit_text(server_bin: &Path) -> String {
    let bin = server_bin.display().to_string();
    let bin = if bin.chars().any(char::is_whitespace) {
        format!("\"{bin}\"")
    } else {
        bin
    };
    format!(
        "# Written by walt-server-setup install.
[Unit]
Description=WalT image server (walt-server)
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
ExecStart={bin} --config {CONF_FILE} --data-dir {DATA_DIR}
ExecReload=/bin/kill -HUP $MAINPID
Restart=on-failure
KillSignal=SIGTERM
TimeoutStopSec=30

[Install]
WantedBy=multi-user.target
"
    )
}

fn cmd(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

fn check_unit(opts: &Options, host: &dyn Host) -> Result<Check, String> {
    let path = opts.path(UNIT_FILE);
    let want = unit_text(&opts.server_bin);
    let current = match fs::read_to_string(&path) {
        Ok(t) => Some(t),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let mut actions = Vec::new();
    let mut todo = Vec::new();
    let mut done = Vec::new();
    let stale = current.as_deref() != Some(want.as_str());
    if stale {
        actions.push(Action::WriteFile {
            path: path.clone(),
            text: want,
            mode: 0o644,
        });
        let (t, d) = if current.is_some() {
            ("update", "updated")
        } else {
            ("write", "wrote")
        };
        todo.push(format!("{t} {}", path.display()));
        done.push(format!("{d} {}", path.display()));
    }
    let note = if opts.root.is_some() {
        "--root: systemctl not run"
    } else if !host.exists(Path::new("/run/systemd/system")) {
        "systemd is not running: not enabled"
    } else {
        if stale {
            actions.push(Action::Run(cmd(&["systemctl", "daemon-reload"])));
        }
        if stale || !host.succeeds(&cmd(&["systemctl", "is-enabled", "--quiet", "walt-server"])) {
            actions.push(Action::Run(cmd(&["systemctl", "enable", "walt-server"])));
            todo.push("enable walt-server".into());
            done.push("enabled walt-server".into());
        }
        "enabled"
    };
    if actions.is_empty() {
        return Ok(Check::Ok(format!(
            "{} is up to date ({note})",
            path.display()
        )));
    }
    let note = if note == "enabled" {
        String::new()
    } else {
        format!(" ({note})")
    };
    Ok(Check::Todo(Plan {
        actions,
        todo: format!("{}{note}", todo.join(", ")),
        done: format!("{}{note}", done.join(", ")),
    }))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Binfmt {
    Enabled,
    Disabled,
    Absent,
}

impl Binfmt {
    fn word(self) -> &'static str {
        match self {
            Binfmt::Enabled => "enabled",
            Binfmt::Disabled => "disabled",
            Binfmt::Absent => "not registered",
        }
    }
}

/// The state of a binfmt_misc entry (`/proc/sys/fs/binfmt_misc/NAME`).
pub fn binfmt_state(host: &dyn Host, name: &str) -> Binfmt {
    match host.read(&Path::new("/proc/sys/fs/binfmt_misc").join(name)) {
        Ok(text) => match text.lines().next().map(str::trim) {
            Some("enabled") => Binfmt::Enabled,
            _ => Binfmt::Disabled,
        },
        Err(_) => Binfmt::Absent,
    }
}

fn check_binfmt(opts: &Options, host: &dyn Host) -> Check {
    let states: Vec<(&str, Binfmt)> = BINFMTS
        .iter()
        .map(|n| (*n, binfmt_state(host, n)))
        .collect();
    let names = BINFMTS.join(", ");
    if states.iter().all(|(_, s)| *s == Binfmt::Enabled) {
        return Check::Ok(format!(
            "qemu-user binfmt for arm images ({names}) registered and enabled"
        ));
    }
    let installed = host.which("update-binfmts").is_some()
        && BINFMTS.iter().all(|n| {
            host.exists(&Path::new("/usr/share/binfmts").join(n))
                || host.which(&format!("{n}-static")).is_some()
        });
    if !installed {
        return Check::Missing(
            "qemu-user-static and binfmt-support (apt-get install qemu-user-static binfmt-support): arm images cannot run here"
                .into(),
        );
    }
    let todo: Vec<&str> = states
        .iter()
        .filter(|(_, s)| *s != Binfmt::Enabled)
        .map(|(n, _)| *n)
        .collect();
    let state = states
        .iter()
        .map(|(n, s)| format!("{n} {}", s.word()))
        .collect::<Vec<_>>()
        .join(", ");
    let commands = todo
        .iter()
        .map(|n| format!("update-binfmts --enable {n}"))
        .collect::<Vec<_>>()
        .join("; ");
    if opts.root.is_some() {
        return Check::Missing(format!(
            "qemu-user binfmt for arm images ({state}); --root: not changed (run: {commands})"
        ));
    }
    Check::Todo(Plan {
        actions: todo
            .iter()
            .map(|n| Action::Run(cmd(&["update-binfmts", "--enable", n])))
            .collect(),
        todo: format!("register qemu-user binfmt for arm images ({state}): {commands}"),
        done: format!("registered qemu-user binfmt for arm images: {commands}"),
    })
}

fn check_docker(host: &dyn Host) -> Check {
    if host.is_socket(Path::new(DOCKER_SOCKET)) {
        Check::Ok(format!("Docker daemon socket {DOCKER_SOCKET}"))
    } else {
        Check::Missing(format!(
            "docker: images cannot be cloned from docker: until a Docker daemon runs (no {DOCKER_SOCKET})"
        ))
    }
}

fn check_nfs(host: &dyn Host) -> Check {
    if let Some(p) = host.which("exportfs") {
        Check::Ok(format!("NFS server ({})", p.display()))
    } else if host.exists(Path::new("/proc/fs/nfsd")) {
        Check::Ok("NFS server (/proc/fs/nfsd)".into())
    } else if let Some(p) = host.which("ganesha.nfsd") {
        Check::Ok(format!(
            "NFS server ({}; give it walt's exports, see docs/configuration.md)",
            p.display()
        ))
    } else {
        Check::Missing(
            "NFS server: nodes cannot boot walt images until one is installed (apt-get install nfs-kernel-server, or nfs-ganesha nfs-ganesha-vfs)"
                .into(),
        )
    }
}

/// The TFTP server nodes fetch their boot files from (tftpd-hpa, run
/// chrooted in the data dir's TFTP root with walt's map).
fn check_tftp(host: &dyn Host) -> Check {
    let command = format!("in.tftpd -L -s -u root -m {DATA_DIR}/tftp.map {DATA_DIR}/tftp-root");
    match host.which("in.tftpd") {
        Some(p) => Check::Ok(format!(
            "TFTP server ({}); run it as: {command}",
            p.display()
        )),
        None => Check::Missing(format!(
            "TFTP server: nodes cannot fetch their boot files until one runs (apt-get install tftpd-hpa; then: {command})"
        )),
    }
}

/// The DHCP hook, next to walt-server or on the PATH (the shipped DHCP
/// configurations call /usr/local/bin/walt-dhcp-event).
fn check_dhcp_hook(opts: &Options, host: &dyn Host) -> Check {
    let beside = opts
        .server_bin
        .parent()
        .map(|d| d.join("walt-dhcp-event"))
        .filter(|p| host.exists(p));
    match beside.or_else(|| host.which("walt-dhcp-event")) {
        Some(p) => Check::Ok(format!(
            "DHCP hook {} (configurations in contrib/dhcp/, see docs/nodes.md)",
            p.display()
        )),
        None => Check::Missing(
            "walt-dhcp-event: new nodes cannot be detected until the DHCP server runs it (install it next to walt-server, see docs/nodes.md)"
                .into(),
        ),
    }
}

/// The walt CLI, next to walt-server or on the PATH.
fn walt_cli(opts: &Options, host: &dyn Host) -> Option<PathBuf> {
    let beside = opts
        .server_bin
        .parent()
        .map(|d| d.join("walt"))
        .filter(|p| host.exists(p));
    beside.or_else(|| host.which("walt"))
}

/// What `walt` generates from its command definitions: (system path, text).
fn completion_files(walt: &Path, host: &dyn Host) -> Result<Vec<(String, String)>, String> {
    let bin = walt.display().to_string();
    let dump = |what: &str| -> Result<String, String> {
        let out = host.output(&cmd(&[&bin, "advanced", what]))?;
        String::from_utf8(out).map_err(|_| format!("{bin} advanced {what}: not UTF-8"))
    };
    let mut files = vec![
        (BASH_COMPLETION.to_string(), dump("dump-bash-autocomplete")?),
        (ZSH_COMPLETION.to_string(), dump("dump-zsh-autocomplete")?),
    ];
    // The man pages are files: written into a private temporary directory,
    // read, and the directory removed.
    let tmp = std::env::temp_dir().join(format!(
        "walt-server-setup-man-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ));
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&tmp)
        .map_err(|e| format!("cannot create {}: {e}", tmp.display()))?;
    let pages = host
        .run(&cmd(&[
            &bin,
            "advanced",
            "dump-man-pages",
            &tmp.display().to_string(),
        ]))
        .and_then(|()| {
            let mut pages = Vec::new();
            for entry in
                fs::read_dir(&tmp).map_err(|e| format!("cannot read {}: {e}", tmp.display()))?
            {
                let path = entry.map_err(|e| e.to_string())?.path();
                let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
                if let Some(name) = name.filter(|n| n.starts_with("walt") && n.ends_with(".1")) {
                    let text = fs::read_to_string(&path)
                        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
                    pages.push((format!("{MAN_DIR}/{name}"), text));
                }
            }
            Ok(pages)
        });
    let _ = fs::remove_dir_all(&tmp);
    let mut pages = pages?;
    if pages.is_empty() {
        return Err(format!("{bin} advanced dump-man-pages wrote no page"));
    }
    pages.sort();
    files.extend(pages);
    Ok(files)
}

/// Bash and zsh completion of `walt` and its man pages, generated by the
/// walt CLI installed with the server (WalT sets up completion on the
/// server too).
fn check_completion(opts: &Options, host: &dyn Host) -> Check {
    let Some(walt) = walt_cli(opts, host) else {
        return Check::Missing(
            "walt: no shell completion or man pages until the walt CLI is installed (next to walt-server, or on the PATH)"
                .into(),
        );
    };
    let mut files = match completion_files(&walt, host) {
        Ok(f) => f,
        Err(e) => return Check::Missing(format!("shell completion and man pages of walt: {e}")),
    };
    let pages = files.len() - 2;
    if opts.path(WALT_BASH_COMPLETION).exists() {
        let bash = files[0].1.clone();
        files.push((WALT_BASH_COMPLETION.to_string(), bash));
    }
    let mut actions = Vec::new();
    let mut names = Vec::new();
    let mut stale_pages = 0;
    for (system_path, text) in files {
        let path = opts.path(&system_path);
        if fs::read_to_string(&path).ok().as_deref() == Some(text.as_str()) {
            continue;
        }
        if system_path.starts_with(MAN_DIR) {
            stale_pages += 1;
        } else {
            names.push(path.display().to_string());
        }
        actions.push(Action::WriteFile {
            path,
            text,
            mode: 0o644,
        });
    }
    let man_dir = opts.path(MAN_DIR);
    if actions.is_empty() {
        return Check::Ok(format!(
            "shell completion (bash, zsh) and {pages} man pages of walt ({}) are up to date",
            man_dir.display()
        ));
    }
    if stale_pages > 0 {
        let s = if stale_pages == 1 { "" } else { "s" };
        names.push(format!(
            "{stale_pages} man page{s} in {}",
            man_dir.display()
        ));
    }
    let list = names.join(", ");
    Check::Todo(Plan {
        actions,
        todo: format!("write {list}"),
        done: format!("wrote {list}"),
    })
}

/// Writes `text` to `path` through a temporary file in the same directory.
fn write_atomic(path: &Path, text: &str, mode: u32) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let write = || -> io::Result<()> {
        // Created with its final mode: a key is never readable by others,
        // even for a moment.
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    };
    write().inspect_err(|_| {
        let _ = fs::remove_file(&tmp);
    })
}

/// "cannot VERB PATH: ERROR", with a hint when permission was denied.
fn io_error(verb: &str, path: &Path, e: &io::Error) -> String {
    let hint = if e.kind() == io::ErrorKind::PermissionDenied {
        " (run as root, or use --root DIR)"
    } else {
        ""
    };
    format!("cannot {verb} {}: {e}{hint}", path.display())
}

/// Carries out a plan.
pub fn apply(plan: &Plan, host: &dyn Host) -> Result<(), String> {
    for action in &plan.actions {
        match action {
            Action::CreateDir { path, mode } => {
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode(*mode)
                    .create(path)
                    .and_then(|()| fs::set_permissions(path, fs::Permissions::from_mode(*mode)))
                    .map_err(|e| io_error("create", path, &e))?;
            }
            Action::WriteFile { path, text, mode } => {
                write_atomic(path, text, *mode).map_err(|e| io_error("write", path, &e))?
            }
            Action::Run(cmd) => host.run(cmd)?,
        }
    }
    Ok(())
}

/// Runs every step, printing one line each to `out`. Returns false when a
/// step failed ("error: …" printed).
pub fn run(opts: &Options, host: &dyn Host, out: &mut dyn Write) -> io::Result<bool> {
    let mut all_ok = true;
    for step in STEPS {
        let line = match step.check(opts, host) {
            Err(e) => {
                all_ok = false;
                format!("error: {e}")
            }
            Ok(Check::Ok(m)) => format!("ok: {m}"),
            Ok(Check::Missing(m)) => format!("missing: {m}"),
            Ok(Check::Todo(plan)) if opts.dry_run => format!("would: {}", plan.todo),
            Ok(Check::Todo(plan)) => {
                let result = apply(&plan, host).and_then(|()| match step.check(opts, host) {
                    Ok(Check::Ok(_)) => Ok(()),
                    Ok(Check::Todo(p)) => {
                        Err(format!("still to do after {}: {}", plan.todo, p.todo))
                    }
                    Ok(Check::Missing(m)) => Err(m),
                    Err(e) => Err(e),
                });
                match result {
                    Ok(()) => format!("done: {}", plan.done),
                    Err(e) if step.failure_is_error() => {
                        all_ok = false;
                        format!("error: {e}")
                    }
                    Err(e) => format!("missing: {e}"),
                }
            }
        };
        writeln!(out, "{line}")?;
    }
    Ok(all_ok)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::{BTreeMap, BTreeSet};

    /// A system described by a few facts.
    #[derive(Default)]
    struct Fake {
        paths: BTreeSet<PathBuf>,
        sockets: BTreeSet<PathBuf>,
        files: BTreeMap<PathBuf, String>,
        programs: BTreeSet<String>,
        succeeding: BTreeSet<Vec<String>>,
        ran: RefCell<Vec<Vec<String>>>,
        outputs: BTreeMap<Vec<String>, Vec<u8>>,
        man_pages: Vec<(String, String)>,
    }

    impl Host for Fake {
        fn exists(&self, path: &Path) -> bool {
            self.paths.contains(path)
        }
        fn is_socket(&self, path: &Path) -> bool {
            self.sockets.contains(path)
        }
        fn read(&self, path: &Path) -> io::Result<String> {
            self.files
                .get(path)
                .cloned()
                .ok_or_else(|| io::ErrorKind::NotFound.into())
        }
        fn which(&self, program: &str) -> Option<PathBuf> {
            self.programs
                .contains(program)
                .then(|| Path::new("/usr/sbin").join(program))
        }
        fn succeeds(&self, cmd: &[String]) -> bool {
            self.succeeding.contains(cmd)
        }
        fn run(&self, cmd: &[String]) -> Result<(), String> {
            self.ran.borrow_mut().push(cmd.to_vec());
            // A fake walt: its man pages are `man_pages`.
            if let [_, a, d, dir] = cmd
                && a == "advanced"
                && d == "dump-man-pages"
            {
                for (name, text) in &self.man_pages {
                    fs::write(Path::new(dir).join(name), text).unwrap();
                }
            }
            Ok(())
        }
        fn output(&self, cmd: &[String]) -> Result<Vec<u8>, String> {
            self.ran.borrow_mut().push(cmd.to_vec());
            self.outputs
                .get(cmd)
                .cloned()
                .ok_or_else(|| format!("{} failed", cmd.join(" ")))
        }
    }

    fn opts(root: &Path, dry_run: bool) -> Options {
        Options {
            root: Some(root.to_path_buf()),
            dry_run,
            server_bin: PathBuf::from("/opt/walt/walt-server"),
        }
    }

    fn lines(opts: &Options, host: &dyn Host) -> (bool, Vec<String>) {
        let mut out = Vec::new();
        let ok = run(opts, host, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        (ok, text.lines().map(String::from).collect())
    }

    fn files_under(root: &Path) -> Vec<PathBuf> {
        let mut found = Vec::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p.clone());
                }
                found.push(p);
            }
        }
        found.sort();
        found
    }

    #[test]
    fn default_config_is_accepted_by_the_server() {
        let text = default_config_text();
        assert!(text.starts_with(crate::model::HEADER), "{text}");
        let c = ServerConfig::parse("server.conf", &text).unwrap();
        assert_eq!(registry_labels(&c), "hub");
        let m = Config::parse(&text).unwrap();
        assert_eq!(m.walt_net(), (None, Some(DEFAULT_WALT_NET_IP.to_string())));
        assert!(text.contains("raw-device: null"), "{text}");
    }

    #[test]
    fn unit_has_the_required_settings() {
        let t = unit_text(Path::new("/usr/local/bin/walt-server"));
        for l in [
            "Type=simple",
            "ExecStart=/usr/local/bin/walt-server --config /etc/walt/server.conf --data-dir /var/lib/walt",
            "ExecReload=/bin/kill -HUP $MAINPID",
            "Restart=on-failure",
            "KillSignal=SIGTERM",
            "TimeoutStopSec=30",
            "WantedBy=multi-user.target",
        ] {
            assert!(t.lines().any(|x| x == l), "{l} missing in\n{t}");
        }
        assert!(
            unit_text(Path::new("/my dir/walt-server"))
                .contains("ExecStart=\"/my dir/walt-server\" ")
        );
    }

    #[test]
    fn dry_run_changes_nothing_then_install_then_nothing_to_do() {
        let root = tempfile::tempdir().unwrap();
        let host = Fake::default();
        let (ok, l) = lines(&opts(root.path(), true), &host);
        assert!(ok, "{l:?}");
        assert_eq!(l.len(), STEPS.len(), "{l:?}");
        assert!(
            l[0].starts_with("would: create ") && l[0].contains("var/lib/walt"),
            "{l:?}"
        );
        assert!(
            l[1].starts_with("would: write ") && l[1].contains("server.conf"),
            "{l:?}"
        );
        assert!(
            l[2].starts_with("would: write ") && l[2].contains("--root: systemctl not run"),
            "{l:?}"
        );
        assert!(
            l[3].starts_with("missing: qemu-user-static and binfmt-support"),
            "{l:?}"
        );
        assert!(
            l[4].starts_with("missing: docker: images cannot be cloned"),
            "{l:?}"
        );
        assert!(l[5].starts_with("missing: NFS server"), "{l:?}");
        assert!(
            l[6].starts_with("would: create a TLS key and self-signed certificate"),
            "{l:?}"
        );
        assert!(files_under(root.path()).is_empty());

        let (ok, l) = lines(&opts(root.path(), false), &host);
        assert!(ok, "{l:?}");
        assert!(l[0].starts_with("done: created "), "{l:?}");
        assert!(l[1].starts_with("done: wrote "), "{l:?}");
        assert!(
            l[2].starts_with("done: wrote ") && l[2].ends_with("(--root: systemctl not run)"),
            "{l:?}"
        );
        let data = root.path().join("var/lib/walt");
        assert_eq!(
            fs::metadata(&data).unwrap().permissions().mode() & 0o7777,
            0o700
        );
        assert_eq!(
            fs::metadata(root.path().join("etc/walt"))
                .unwrap()
                .permissions()
                .mode()
                & 0o7777,
            0o755
        );
        assert!(root.path().join("etc/walt").is_dir());
        assert!(l[6].starts_with("done: created a TLS key"), "{l:?}");
        let tls = root.path().join("etc/walt/tls");
        let mode = |p: PathBuf| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(tls.join("key.pem")), 0o600);
        assert_eq!(mode(tls.join("cert.pem")), 0o644);
        let fp = walt_tls::Fingerprint::of_dir(&tls).unwrap().unwrap();
        assert!(l[6].contains(&fp.to_string()), "{l:?}");
        let conf = fs::read_to_string(root.path().join("etc/walt/server.conf")).unwrap();
        assert_eq!(conf, default_config_text());
        let unit =
            fs::read_to_string(root.path().join("etc/systemd/system/walt-server.service")).unwrap();
        assert_eq!(unit, unit_text(Path::new("/opt/walt/walt-server")));
        assert!(host.ran.borrow().is_empty());

        let before = files_under(root.path());
        let (ok, l) = lines(&opts(root.path(), false), &host);
        assert!(ok, "{l:?}");
        for line in &l[..3] {
            assert!(line.starts_with("ok: "), "{l:?}");
        }
        assert!(l[1].contains("registries: hub"), "{l:?}");
        assert!(
            l[6].starts_with("ok: TLS certificate") && l[6].contains(&fp.to_string()),
            "{l:?}"
        );
        assert_eq!(files_under(root.path()), before);
    }

    #[test]
    fn existing_config_is_kept_and_checked() {
        let root = tempfile::tempdir().unwrap();
        let conf = root.path().join("etc/walt/server.conf");
        fs::create_dir_all(conf.parent().unwrap()).unwrap();
        fs::write(&conf, "registries: []\nvpn: {enabled: false}\n").unwrap();
        let (ok, l) = lines(&opts(root.path(), false), &Fake::default());
        assert!(ok, "{l:?}");
        assert!(
            l[1].starts_with("ok: ") && l[1].contains("registries: none"),
            "{l:?}"
        );
        assert_eq!(
            fs::read_to_string(&conf).unwrap(),
            "registries: []\nvpn: {enabled: false}\n"
        );
        // An entry of an api walt does not know (WalT's files may hold
        // one) is kept and reported.
        fs::write(&conf, "registries: [{label: x, api: nope}]\n").unwrap();
        let (ok, l) = lines(&opts(root.path(), false), &Fake::default());
        assert!(ok, "{l:?}");
        assert!(
            l[1].contains("registry 'x' skipped: api 'nope' is not supported"),
            "{l:?}"
        );
        // An invalid file is an error, and is kept too.
        fs::write(
            &conf,
            "registries: [{api: docker-registry-v2, label: Bad}]\n",
        )
        .unwrap();
        let (ok, l) = lines(&opts(root.path(), false), &Fake::default());
        assert!(!ok);
        assert!(
            l[1].starts_with("error: ") && l[1].contains("left as is"),
            "{l:?}"
        );
        assert_eq!(
            fs::read_to_string(&conf).unwrap(),
            "registries: [{api: docker-registry-v2, label: Bad}]\n"
        );
    }

    #[test]
    fn a_changed_unit_is_rewritten_and_a_file_in_place_of_a_dir_is_an_error() {
        let root = tempfile::tempdir().unwrap();
        let host = Fake::default();
        lines(&opts(root.path(), false), &host);
        let mut o = opts(root.path(), false);
        o.server_bin = PathBuf::from("/usr/local/bin/walt-server");
        let (ok, l) = lines(&o, &host);
        assert!(ok);
        assert!(l[2].starts_with("done: updated "), "{l:?}");
        let unit =
            fs::read_to_string(root.path().join("etc/systemd/system/walt-server.service")).unwrap();
        assert!(unit.contains("ExecStart=/usr/local/bin/walt-server "));

        let root = tempfile::tempdir().unwrap();
        fs::create_dir_all(root.path().join("var/lib")).unwrap();
        fs::write(root.path().join("var/lib/walt"), "").unwrap();
        let (ok, l) = lines(&opts(root.path(), false), &host);
        assert!(!ok);
        assert!(
            l[0].starts_with("error: ") && l[0].contains("not a directory"),
            "{l:?}"
        );
    }

    fn systemd_host() -> Fake {
        let mut h = Fake::default();
        h.paths.insert("/run/systemd/system".into());
        h
    }

    #[test]
    fn systemd_steps_without_root() {
        // No --root: check only (the unit path is the real one; it is not
        // written by this test).
        let o = Options {
            root: None,
            dry_run: true,
            server_bin: PathBuf::from("/opt/walt/walt-server"),
        };
        let host = systemd_host();
        let Check::Todo(p) = Step::Unit.check(&o, &host).unwrap() else {
            // The machine running the tests has a walt unit already: nothing to say.
            return;
        };
        assert!(
            p.actions
                .contains(&Action::Run(cmd(&["systemctl", "daemon-reload"])))
        );
        assert!(
            p.actions
                .contains(&Action::Run(cmd(&["systemctl", "enable", "walt-server"])))
        );
        assert!(p.todo.contains("enable walt-server"), "{p:?}");
        // No systemd: written, not enabled.
        let Check::Todo(p) = Step::Unit.check(&o, &Fake::default()).unwrap() else {
            return;
        };
        assert!(p.actions.iter().all(|a| !matches!(a, Action::Run(_))));
        assert!(
            p.todo.ends_with("(systemd is not running: not enabled)"),
            "{p:?}"
        );
    }

    #[test]
    fn binfmt_states() {
        let root = tempfile::tempdir().unwrap();
        let mut host = Fake::default();
        // Not installed.
        assert!(matches!(
            Step::Binfmt.check(&opts(root.path(), false), &host).unwrap(),
            Check::Missing(m) if m.starts_with("qemu-user-static and binfmt-support (apt-get install qemu-user-static binfmt-support)")
        ));
        // Installed, one registered but disabled, the other absent.
        host.programs.insert("update-binfmts".into());
        for n in BINFMTS {
            host.paths.insert(Path::new("/usr/share/binfmts").join(n));
        }
        host.files.insert(
            "/proc/sys/fs/binfmt_misc/qemu-aarch64".into(),
            "disabled\ninterpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P\n".into(),
        );
        assert_eq!(binfmt_state(&host, "qemu-aarch64"), Binfmt::Disabled);
        assert_eq!(binfmt_state(&host, "qemu-arm"), Binfmt::Absent);
        // --root: reported, never changed.
        assert!(matches!(
            Step::Binfmt.check(&opts(root.path(), false), &host).unwrap(),
            Check::Missing(m) if m.contains("--root: not changed") && m.contains("qemu-arm not registered")
        ));
        let real = Options {
            root: None,
            dry_run: false,
            server_bin: PathBuf::from(DEFAULT_SERVER_BIN),
        };
        let Check::Todo(plan) = Step::Binfmt.check(&real, &host).unwrap() else {
            panic!("expected a plan");
        };
        assert_eq!(
            plan.actions,
            vec![
                Action::Run(cmd(&["update-binfmts", "--enable", "qemu-aarch64"])),
                Action::Run(cmd(&["update-binfmts", "--enable", "qemu-arm"])),
            ]
        );
        apply(&plan, &host).unwrap();
        assert_eq!(host.ran.borrow().len(), 2);
        // Both enabled: ok.
        for n in BINFMTS {
            host.files.insert(
                Path::new("/proc/sys/fs/binfmt_misc").join(n),
                "enabled\n".into(),
            );
        }
        assert!(matches!(
            Step::Binfmt.check(&real, &host).unwrap(),
            Check::Ok(m) if m.contains("registered and enabled")
        ));
    }

    #[test]
    fn tftp_and_the_dhcp_hook_are_reported() {
        let mut host = Fake::default();
        assert!(
            matches!(check_tftp(&host), Check::Missing(m) if m.contains("tftpd-hpa") && m.contains("-s -u root"))
        );
        host.programs.insert("in.tftpd".into());
        assert!(matches!(check_tftp(&host), Check::Ok(m) if m.contains("tftp-root")));
        let root = tempfile::tempdir().unwrap();
        let o = opts(root.path(), true);
        assert!(
            matches!(check_dhcp_hook(&o, &host), Check::Missing(m) if m.contains("walt-dhcp-event"))
        );
        host.paths
            .insert(o.server_bin.parent().unwrap().join("walt-dhcp-event"));
        assert!(matches!(check_dhcp_hook(&o, &host), Check::Ok(m) if m.contains("DHCP hook")));
    }

    #[test]
    fn docker_and_nfs_are_reported() {
        let mut host = Fake::default();
        assert!(matches!(
            check_docker(&host),
            Check::Missing(m) if m.starts_with("docker: images cannot be cloned from docker: until a Docker daemon runs")
        ));
        host.sockets.insert(DOCKER_SOCKET.into());
        assert!(matches!(check_docker(&host), Check::Ok(_)));
        assert!(matches!(check_nfs(&host), Check::Missing(m) if m.contains("NFS server")));
        host.paths.insert("/proc/fs/nfsd".into());
        assert!(matches!(check_nfs(&host), Check::Ok(_)));
        let mut host = Fake::default();
        host.programs.insert("exportfs".into());
        assert!(matches!(check_nfs(&host), Check::Ok(m) if m.contains("exportfs")));
    }

    #[test]
    fn completion_and_man_pages_from_the_walt_beside_the_server() {
        let root = tempfile::tempdir().unwrap();
        let o = opts(root.path(), false);
        let mut host = Fake::default();
        // No walt: reported, nothing written.
        match check_completion(&o, &host) {
            Check::Missing(m) => assert!(m.contains("walt CLI"), "{m}"),
            c => panic!("{c:?}"),
        }
        let walt = "/opt/walt/walt".to_string();
        host.paths.insert(PathBuf::from(&walt));
        for (what, text) in [
            ("dump-bash-autocomplete", "_walt() { :; }\n"),
            ("dump-zsh-autocomplete", "#compdef walt\n"),
        ] {
            host.outputs.insert(
                vec![walt.clone(), "advanced".into(), what.into()],
                text.as_bytes().to_vec(),
            );
        }
        host.man_pages = vec![
            ("walt.1".into(), ".TH walt 1\n".into()),
            ("walt-image.1".into(), ".TH walt-image 1\n".into()),
        ];
        let Check::Todo(plan) = check_completion(&o, &host) else {
            panic!("a fresh root needs the files");
        };
        assert!(
            plan.done.contains("completions/walt")
                && plan.done.contains("site-functions/_walt")
                && plan.done.contains("2 man pages"),
            "{plan:?}"
        );
        apply(&plan, &host).unwrap();
        let read = |p: &str| fs::read_to_string(o.path(p)).unwrap();
        assert_eq!(read(BASH_COMPLETION), "_walt() { :; }\n");
        assert_eq!(read(ZSH_COMPLETION), "#compdef walt\n");
        assert_eq!(
            read("/usr/share/man/man1/walt-image.1"),
            ".TH walt-image 1\n"
        );
        assert!(matches!(check_completion(&o, &host), Check::Ok(_)));
        // A page that changed is rewritten, alone.
        host.man_pages[1].1 = ".TH walt-image 1 new\n".into();
        let Check::Todo(plan) = check_completion(&o, &host) else {
            panic!("a changed page is rewritten");
        };
        assert_eq!(plan.actions.len(), 1, "{plan:?}");
        assert_eq!(
            plan.done,
            format!("wrote 1 man page in {}", o.path(MAN_DIR).display())
        );
        apply(&plan, &host).unwrap();
        // WalT's own script, left by a WalT install, is replaced by ours.
        let old = o.path(WALT_BASH_COMPLETION);
        fs::create_dir_all(old.parent().unwrap()).unwrap();
        fs::write(&old, "_walt_complete() { walt advanced complete; }\n").unwrap();
        let Check::Todo(plan) = check_completion(&o, &host) else {
            panic!("WalT's completion is replaced");
        };
        assert_eq!(plan.done, format!("wrote {}", old.display()));
        apply(&plan, &host).unwrap();
        assert_eq!(read(WALT_BASH_COMPLETION), "_walt() { :; }\n");
        assert!(matches!(check_completion(&o, &host), Check::Ok(_)));
    }
}
