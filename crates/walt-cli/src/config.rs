//! The client configuration: `~/.walt/config` (or `$WALT_CONFIG`).

use std::collections::BTreeMap;
use std::io::{BufRead, IsTerminal, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct WaltSection {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// `true`: talk to the server in clear (a walt-server started with
    /// `--plaintext`); otherwise TLS, always.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plaintext: Option<bool>,
    /// The certificate fingerprint pinned for each server address (as
    /// `server` spells it), `SHA256:<hex>`: written at the first connection,
    /// then required (ssh's known_hosts).
    #[serde(
        default,
        rename = "server-fingerprints",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub server_fingerprints: BTreeMap<String, String>,
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct RegistryCredentials {
    #[serde(default)]
    pub username: String,
    #[serde(default)]
    pub password: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct ClientConfig {
    #[serde(default)]
    pub walt: WaltSection,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub registries: BTreeMap<String, RegistryCredentials>,
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

/// A complete configuration: where the server is and who we are.
pub struct Settings {
    pub server: String,
    pub username: String,
    pub config: ClientConfig,
}

pub fn path() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("WALT_CONFIG") {
        return Ok(PathBuf::from(p));
    }
    let home = std::env::var_os("HOME")
        .context("HOME is not set; set WALT_CONFIG to the walt client config file")?;
    Ok(PathBuf::from(home).join(".walt").join("config"))
}

fn read(path: &PathBuf) -> anyhow::Result<ClientConfig> {
    match std::fs::read_to_string(path) {
        Ok(text) if text.trim().is_empty() => Ok(ClientConfig::default()),
        Ok(text) => serde_saphyr::from_str(&text).map_err(|e| {
            anyhow::anyhow!(
                "{}: not a valid walt client config: {}",
                path.display(),
                e.to_string().lines().next().unwrap_or_default()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ClientConfig::default()),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// Writes the file with mode 0600 (it may hold registry passwords),
/// through a temporary file of a fresh name in the same directory, created
/// with `O_EXCL | O_NOFOLLOW`: a file or symlink planted there is never
/// followed nor overwritten.
fn write(path: &PathBuf, config: &ClientConfig) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let text = serde_saphyr::to_string(config).context("cannot serialise the client config")?;
    let (tmp, mut f) = create_temp(path)?;
    let written = f
        .write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .with_context(|| format!("cannot write {}", tmp.display()))
        .and_then(|()| {
            std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
        });
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Creates `<path>.<pid>-<n>.tmp` (mode 0600) exclusively, never through a
/// symlink; another name is tried when one is taken.
fn create_temp(path: &std::path::Path) -> anyhow::Result<(PathBuf, std::fs::File)> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let mut last = None;
    for _ in 0..100 {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let tmp = path.with_file_name(format!(
            ".{name}.{}-{nanos:08x}-{n}.tmp",
            std::process::id()
        ));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
        {
            Ok(f) => return Ok((tmp, f)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e).with_context(|| format!("cannot write {}", tmp.display())),
        }
    }
    Err(last.expect("tried at least once")).with_context(|| {
        format!(
            "cannot write {}: no free temporary name next to it",
            path.display()
        )
    })
}

fn ask(prompt: &str) -> anyhow::Result<String> {
    let mut out = std::io::stderr();
    loop {
        write!(out, "{prompt}: ")?;
        out.flush()?;
        let mut line = String::new();
        if std::io::stdin().lock().read_line(&mut line)? == 0 {
            bail!("no answer given (end of input)");
        }
        let v = line.trim();
        if !v.is_empty() {
            return Ok(v.to_string());
        }
    }
}

/// Loads the configuration; on a terminal, asks for what is missing and saves it.
pub fn load() -> anyhow::Result<Settings> {
    let path = path()?;
    let mut config = read(&path)?;
    let missing: Vec<&str> = [
        config.walt.server.is_none().then_some("walt.server"),
        config.walt.username.is_none().then_some("walt.username"),
    ]
    .into_iter()
    .flatten()
    .collect();
    if !missing.is_empty() {
        if !(std::io::stdin().is_terminal() && std::io::stderr().is_terminal()) {
            bail!(
                "{} is missing {} (the walt server's host[:port] and your walt username); create it or run walt on a terminal to be asked",
                path.display(),
                missing.join(" and ")
            );
        }
        eprintln!("walt client configuration ({}):", path.display());
        if config.walt.server.is_none() {
            config.walt.server = Some(ask("IP or hostname of the walt server")?);
        }
        if config.walt.username.is_none() {
            loop {
                let u = ask("your walt username")?;
                if walt_core::name::is_valid_user(&u) {
                    config.walt.username = Some(u);
                    break;
                }
                eprintln!("a username uses lowercase letters, digits, '-', '_' and '.'");
            }
        }
        write(&path, &config)?;
        eprintln!("saved in {}", path.display());
    }
    let server = config.walt.server.clone().unwrap_or_default();
    let username = config.walt.username.clone().unwrap_or_default();
    if !walt_core::name::is_valid_user(&username) {
        bail!(
            "{}: walt.username '{username}' is not a valid username",
            path.display()
        );
    }
    Ok(Settings {
        server,
        username,
        config,
    })
}

/// Stores the credentials of registry `label` in the client config (0600).
pub fn save_credentials(label: &str, creds: &RegistryCredentials) -> anyhow::Result<PathBuf> {
    let path = path()?;
    let mut config = read(&path)?;
    config.registries.insert(label.to_string(), creds.clone());
    write(&path, &config)?;
    Ok(path)
}

/// Pins `fingerprint` for `server` (None: forgets its pin) in the client
/// config (0600). Returns the file's path.
pub fn save_fingerprint(server: &str, fingerprint: Option<&str>) -> anyhow::Result<PathBuf> {
    let path = path()?;
    let mut config = read(&path)?;
    match fingerprint {
        Some(fp) => {
            config
                .walt
                .server_fingerprints
                .insert(server.to_string(), fp.to_string());
        }
        None => {
            config.walt.server_fingerprints.remove(server);
        }
    }
    write(&path, &config)?;
    Ok(path)
}

/// `http://host:port` for `host`, `host:port`, `[v6]` or `[v6]:port`.
pub fn endpoint(server: &str) -> anyhow::Result<String> {
    let s = server.trim();
    let port = walt_proto::DEFAULT_PORT;
    let has_port = if let Some(rest) = s.strip_prefix('[') {
        rest.split_once(']')
            .is_some_and(|(_, p)| p.starts_with(':'))
    } else {
        s.matches(':').count() == 1
    };
    if s.is_empty() || s.contains('/') {
        bail!("walt.server '{server}' is not a host or host:port");
    }
    if s.matches(':').count() > 1 && !s.starts_with('[') {
        // A bare IPv6 address.
        return Ok(format!("http://[{s}]:{port}"));
    }
    Ok(if has_port {
        format!("http://{s}")
    } else {
        format!("http://{s}:{port}")
    })
}

#[cfg(test)]
mod tests {
    use super::{ClientConfig, endpoint, write};

    #[test]
    fn endpoints() {
        assert_eq!(endpoint("walt").unwrap(), "http://walt:12345");
        assert_eq!(endpoint("10.0.0.1:999").unwrap(), "http://10.0.0.1:999");
        assert_eq!(endpoint("::1").unwrap(), "http://[::1]:12345");
        assert_eq!(endpoint("[::1]:5").unwrap(), "http://[::1]:5");
        assert!(endpoint("http://x/").is_err());
    }

    #[test]
    fn write_never_follows_a_planted_temp_symlink() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config");
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "untouched").unwrap();
        // The name the old code used, and names of this pid's scheme.
        std::os::unix::fs::symlink(&victim, path.with_extension("tmp")).unwrap();
        for n in 0..4 {
            let _ = std::os::unix::fs::symlink(
                &victim,
                dir.path()
                    .join(format!(".config.{}-x-{n}.tmp", std::process::id())),
            );
        }
        let mut config = ClientConfig::default();
        config.walt.server = Some("walt".into());
        write(&path, &config).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "untouched");
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("server: walt"), "{text}");
        assert!(!std::fs::symlink_metadata(&path).unwrap().is_symlink());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // No temporary file is left behind (the planted symlinks stay).
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap())
            .filter(|e| e.file_type().unwrap().is_file())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }
}
