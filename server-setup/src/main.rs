//! `walt-server-setup`: installs the walt server (`install`, the default),
//! checks and edits its configuration.

mod editor;
mod install;
mod model;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use walt_core::config::{Registry, ServerConfig};

use model::{Config, NewRegistry, entry_label, system_resolver};

/// Set up and configure the walt server.
#[derive(Parser, Debug)]
#[command(name = "walt-server-setup", version, about)]
struct Args {
    /// Validate the configuration file and report what it configures.
    #[arg(long)]
    check: bool,
    /// Interactive configuration editor (network, then image registries).
    #[arg(long)]
    edit_conf: bool,
    /// Configuration file [default: /etc/walt/server.conf].
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// walt-server to tell about a new configuration (loopback only).
    #[arg(long, global = true, default_value = "127.0.0.1:12345")]
    server: String,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Install the server (the default): data directories, configuration,
    /// systemd unit, qemu-user binfmt; reports what else is missing.
    Install {
        /// Only say what would be done.
        #[arg(long)]
        dry_run: bool,
        /// Write every file under DIR instead of / (binfmt and systemctl are
        /// then only checked).
        #[arg(long, value_name = "DIR")]
        root: Option<PathBuf>,
    },
    /// List, add or remove image registries (scriptable).
    #[command(subcommand)]
    Registry(RegistryCmd),
    /// Tell the running walt-server to reload the configuration file.
    Reload,
}

#[derive(Subcommand, Debug)]
enum RegistryCmd {
    /// List the configured registries.
    List,
    /// Add a docker-registry-v2 registry (with --repository: a JFrog
    /// Artifactory repository, api jfrog-artifactory).
    Add {
        /// Label used in clone URLs (`LABEL:user/image`).
        #[arg(long)]
        label: String,
        /// Host name or address of the registry.
        #[arg(long)]
        host: String,
        #[arg(long, default_value_t = model::DEFAULT_PORT)]
        port: u16,
        /// https, http or https-no-verify.
        #[arg(long, default_value = model::DEFAULT_PROTOCOL)]
        protocol: String,
        /// basic or none.
        #[arg(long, default_value = model::DEFAULT_AUTH)]
        auth: String,
        /// Short description (at most 35 characters); default "Registry at HOST".
        #[arg(long)]
        description: Option<String>,
        /// The JFrog Artifactory repository the images live under.
        #[arg(long)]
        repository: Option<String>,
    },
    /// Remove the registry with this label.
    Remove { label: String },
}

impl Args {
    fn config(&self) -> PathBuf {
        self.config
            .clone()
            .unwrap_or_else(|| PathBuf::from(install::CONF_FILE))
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let result = match &args.command {
        Some(Cmd::Install { dry_run, root }) => run_install(&args, *dry_run, root.clone()),
        Some(Cmd::Registry(cmd)) => registry(&args, cmd),
        Some(Cmd::Reload) => reload(&args.server, &tls_dir(&args)),
        None if args.edit_conf => edit_conf(&args),
        // `--config FILE` alone: check it, as before `install` was the default.
        None if args.check || args.config.is_some() => check(&args.config()),
        None => run_install(&args, false, None),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_install(args: &Args, dry_run: bool, root: Option<PathBuf>) -> anyhow::Result<()> {
    if args.config.is_some() {
        bail!(
            "install writes {} (under --root DIR when given); --config is for --check, --edit-conf, registry and reload",
            install::CONF_FILE
        );
    }
    let opts = install::Options {
        root,
        dry_run,
        server_bin: install::default_server_bin(),
    };
    let ok = install::run(&opts, &install::RealHost, &mut std::io::stdout().lock())
        .context("cannot write to stdout")?;
    if !ok {
        bail!("some install steps failed (the lines starting with 'error:')");
    }
    Ok(())
}

fn check(path: &Path) -> anyhow::Result<()> {
    let config = match std::fs::read_to_string(path) {
        Ok(text) => ServerConfig::parse(&path.display().to_string(), &text)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!(
                "{} does not exist: the server uses the defaults (Docker Hub only)",
                path.display()
            );
            ServerConfig::default_config()
        }
        Err(e) => return Err(anyhow::anyhow!("cannot read {}: {e}", path.display())),
    };
    println!("{}: OK", path.display());
    for r in &config.registries {
        match r {
            Registry::Hub(_) => println!("  hub: docker-hub"),
            Registry::V2(v) if v.repository.is_some() => println!(
                "  {}: jfrog-artifactory {} repository {} (auth {:?})",
                v.label,
                v.base_url(),
                v.repository.as_deref().unwrap_or_default(),
                v.auth
            ),
            Registry::V2(v) => println!(
                "  {}: docker-registry-v2 {} (auth {:?})",
                v.label,
                v.base_url(),
                v.auth
            ),
        }
    }
    for s in &config.skipped {
        eprintln!("warning: {}", s.warning());
    }
    Ok(())
}

/// Reads the file (a missing file is an empty configuration: hub only).
fn load(path: &Path) -> anyhow::Result<Config> {
    match std::fs::read_to_string(path) {
        Ok(text) => Config::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Config::default()),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// Writes the file atomically (temp file + rename, mode 0644), keeping the
/// previous version as `<file>.bak`.
fn save(path: &Path, config: &Config) -> anyhow::Result<()> {
    let text = config.to_yaml().map_err(anyhow::Error::msg)?;
    // Never write a file the server would refuse.
    ServerConfig::parse(&path.display().to_string(), &text)?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "server.conf".into());
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.set_permissions(std::fs::Permissions::from_mode(0o644))?;
        f.sync_all()
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("cannot write {}", tmp.display()));
    }
    if path.exists() {
        let bak = dir.join(format!("{name}.bak"));
        if let Err(e) = std::fs::copy(path, &bak) {
            let _ = std::fs::remove_file(&tmp);
            return Err(e).with_context(|| format!("cannot write {}", bak.display()));
        }
    }
    std::fs::rename(&tmp, path).with_context(|| {
        let _ = std::fs::remove_file(&tmp);
        format!("cannot replace {}", path.display())
    })?;
    Ok(())
}

/// Calls Admin.ReloadConfig; Err is the reason the server could not be
/// reached. Over TLS when the server's certificate is in `tls_dir` (pinned:
/// exactly that one), else in clear (a `--plaintext` server); the call
/// carries no secret.
fn call_reload(server: &str, tls_dir: &Path) -> Result<walt_proto::v1::ReloadConfigReply, String> {
    use walt_proto::v1::ReloadConfigRequest;
    use walt_proto::v1::admin_client::AdminClient;
    use walt_tls::{ConnectError, Fingerprint, Transport};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    let url = if server.contains("://") {
        server.to_string()
    } else {
        format!("http://{server}")
    };
    let transport = match Fingerprint::of_dir(tls_dir)? {
        Some(fp) => Transport::Tls(Some(fp)),
        None => Transport::Plaintext,
    };
    rt.block_on(async {
        let timeout = Duration::from_secs(3);
        let channel = match walt_tls::connect(&url, transport, timeout).await {
            Ok(c) => c.channel,
            // A server started with --plaintext despite its certificate.
            Err(ConnectError::Handshake(_)) => {
                walt_tls::connect(&url, Transport::Plaintext, timeout)
                    .await
                    .map_err(|e| e.to_string())?
                    .channel
            }
            Err(e) => return Err(e.to_string()),
        };
        tokio::time::timeout(
            Duration::from_secs(30),
            AdminClient::new(channel).reload_config(ReloadConfigRequest {}),
        )
        .await
        .map_err(|_| "no answer within 30 s".to_string())?
        .map(|r| r.into_inner())
        .map_err(|s| s.message().to_string())
    })
}

/// Where the server keeps its certificate: `tls/` next to the configuration.
fn tls_dir(args: &Args) -> PathBuf {
    match args.config().parent() {
        Some(d) if !d.as_os_str().is_empty() => d.join("tls"),
        _ => PathBuf::from("tls"),
    }
}

/// After a change: asks the running server to reload and says what happened.
fn notify_server(server: &str, tls_dir: &Path) -> anyhow::Result<()> {
    match call_reload(server, tls_dir) {
        Ok(r) if r.ok => {
            println!(
                "walt-server reloaded its configuration (registries: {})",
                r.registries.join(", ")
            );
            Ok(())
        }
        Ok(r) => bail!("walt-server refused the new configuration: {}", r.message),
        Err(reason) => {
            println!(
                "walt-server at {server} could not be told ({reason}): it will use the new configuration at its next start"
            );
            Ok(())
        }
    }
}

/// `reload`: like `notify_server`, but an unreachable server is an error.
fn reload(server: &str, tls_dir: &Path) -> anyhow::Result<()> {
    match call_reload(server, tls_dir) {
        Ok(r) if r.ok => {
            println!(
                "walt-server reloaded its configuration (registries: {})",
                r.registries.join(", ")
            );
            Ok(())
        }
        Ok(r) => bail!("walt-server refused the new configuration: {}", r.message),
        Err(reason) => bail!("cannot reach walt-server at {server}: {reason}"),
    }
}

fn registry(args: &Args, cmd: &RegistryCmd) -> anyhow::Result<()> {
    let path = args.config();
    let mut config = load(&path)?;
    match cmd {
        RegistryCmd::List => {
            println!(
                "{:<12} {:<20} {:<36} CONFIGURATION",
                "LABEL", "API", "DESCRIPTION"
            );
            for e in config.registries() {
                let (api, desc, conf) = model::describe(&e);
                println!("{:<12} {api:<20} {desc:<36} {conf}", entry_label(&e));
            }
            return Ok(());
        }
        RegistryCmd::Add {
            label,
            host,
            port,
            protocol,
            auth,
            description,
            repository,
        } => {
            let r = NewRegistry {
                label: label.clone(),
                description: description
                    .clone()
                    .unwrap_or_else(|| format!("Registry at {host}")),
                host: host.clone(),
                port: *port,
                protocol: protocol.clone(),
                auth: auth.clone(),
                repository: repository.clone(),
            };
            config
                .add(&r, &system_resolver)
                .map_err(anyhow::Error::msg)?;
            save(&path, &config)?;
            println!("registry '{label}' added to {}", path.display());
        }
        RegistryCmd::Remove { label } => {
            config.remove(label).map_err(anyhow::Error::msg)?;
            save(&path, &config)?;
            println!("registry '{label}' removed from {}", path.display());
        }
    }
    notify_server(&args.server, &tls_dir(args))
}

fn edit_conf(args: &Args) -> anyhow::Result<()> {
    let path = args.config();
    let config = load(&path)?;
    match editor::run(config)? {
        editor::Outcome::Discard => {
            println!("Changes discarded: {} is unchanged.", path.display());
            Ok(())
        }
        editor::Outcome::Save(config) => {
            save(&path, &config)?;
            println!("Configuration written to {}.", path.display());
            notify_server(&args.server, &tls_dir(args))
        }
    }
}
