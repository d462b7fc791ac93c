//! The client configuration: `~/.walt/config` (or `$WALT_CONFIG`), the file
//! WalT's client reads and writes (`client/walt/client/config.py`).
//!
//! Registry passwords are stored as WalT stores them: the hex of the
//! password XORed with WalT's fixed key, under a `(password value is
//! encoded.)` comment. Reading tells the two forms apart by that comment:
//! WalT has written it above every password since 2016 and walt writes it
//! too, so a file holding it has its passwords encoded (one that does not
//! decode is an error naming it); a file without it (written by walt before
//! it wrote WalT's form, or by hand) has them in clear. A file of WalT's
//! older flat layout (`server`, `username`, `password`, `hub` at the top)
//! is always WalT's, so encoded; it is rewritten in the current layout, and
//! `~/.waltrc` is moved to `~/.walt/config` (mode 0600), as WalT does.

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

/// The file's path. Without `$WALT_CONFIG`, a legacy `~/.waltrc` is first
/// moved to `~/.walt/config` (mode 0600) when that does not exist, as WalT
/// does.
pub fn path() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("WALT_CONFIG") {
        return Ok(PathBuf::from(p));
    }
    let home = std::env::var_os("HOME")
        .context("HOME is not set; set WALT_CONFIG to the walt client config file")?;
    let home = PathBuf::from(home);
    let path = home.join(".walt").join("config");
    move_legacy(&home.join(".waltrc"), &path)?;
    Ok(path)
}

/// Moves `legacy` to `path` when only `legacy` exists, then makes it 0600
/// (the file only, never a symlink's target).
fn move_legacy(legacy: &std::path::Path, path: &std::path::Path) -> anyhow::Result<()> {
    if std::fs::symlink_metadata(path).is_ok() || std::fs::symlink_metadata(legacy).is_err() {
        return Ok(());
    }
    let failed = |e: std::io::Error| {
        anyhow::anyhow!(
            "cannot move {} to {}: {e}",
            legacy.display(),
            path.display()
        )
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(failed)?;
    }
    std::fs::rename(legacy, path).map_err(failed)?;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(failed)?;
    use std::os::unix::fs::PermissionsExt;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(failed)?;
    eprintln!("moved {} to {}", legacy.display(), path.display());
    Ok(())
}

/// WalT's key for registry passwords (`client/walt/client/config.py`): not
/// a secret, it only keeps them unreadable at a glance; the file's mode
/// (0600) protects them.
const WALT_KEY: &[u8] = b"RAND0M STRING T0 HIDE A PASSW0RD";

/// The comment WalT writes above each encoded password.
const ENCODED_MARK: &str = "(password value is encoded.)";

fn xor(data: &[u8]) -> Vec<u8> {
    data.iter()
        .zip(WALT_KEY.iter().cycle())
        .map(|(a, b)| a ^ b)
        .collect()
}

/// A password as WalT stores it: hex of the password XORed with its key.
pub fn encode_password(password: &str) -> String {
    xor(password.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The password WalT stored as `coded` (None: not WalT's encoding).
pub fn decode_password(coded: &str) -> Option<String> {
    let coded = coded.trim().as_bytes();
    if !coded.len().is_multiple_of(2) {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let bytes = coded
        .chunks(2)
        .map(|p| Some(digit(p[0])? << 4 | digit(p[1])?))
        .collect::<Option<Vec<u8>>>()?;
    String::from_utf8(xor(&bytes)).ok()
}

/// Moves WalT's legacy top-level keys where WalT puts them now
/// (`get_config_from_file`): `hub` -> `registries.hub`, `server` and
/// `username` -> `walt.*` (the username is also the hub's), `password` ->
/// `registries.hub.password`. True when something moved.
fn migrate_flat_keys(top: &mut serde_json::Map<String, serde_json::Value>) -> bool {
    use serde_json::Value;
    let group = |top: &mut serde_json::Map<String, Value>, name: &str| {
        if !top.get(name).is_some_and(Value::is_object) {
            top.insert(name.to_string(), Value::Object(Default::default()));
        }
    };
    group(top, "walt");
    group(top, "registries");
    let mut updated = false;
    if let Some(hub) = top.remove("hub") {
        top["registries"]["hub"] = hub;
        updated = true;
    }
    if let Some(regs) = top.get_mut("registries").and_then(Value::as_object_mut)
        && !regs.get("hub").is_some_and(Value::is_object)
    {
        regs.insert("hub".into(), Value::Object(Default::default()));
    }
    if let Some(server) = top.remove("server") {
        top["walt"]["server"] = server;
        updated = true;
    }
    if let Some(username) = top.remove("username") {
        top["registries"]["hub"]["username"] = username.clone();
        top["walt"]["username"] = username;
        updated = true;
    }
    if let Some(password) = top.remove("password") {
        top["registries"]["hub"]["password"] = password;
        updated = true;
    }
    // Empty groups go (innermost first), as WalT's cleanup does.
    if let Some(regs) = top.get_mut("registries").and_then(Value::as_object_mut) {
        regs.retain(|_, v| !v.as_object().is_some_and(|o| o.is_empty()));
    }
    top.retain(|_, v| !v.as_object().is_some_and(|o| o.is_empty()));
    updated
}

/// The credentials of a file as their text: YAML (1.2) would read an
/// unquoted `1234` or `3e303031` as a number, PyYAML (YAML 1.1, WalT)
/// writes and reads hex `3e303031` as a string.
#[derive(Deserialize, Default)]
struct CredentialsText {
    #[serde(default)]
    server: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    hub: Option<UserText>,
    #[serde(default)]
    walt: Option<UserText>,
    #[serde(default)]
    registries: Option<BTreeMap<String, UserText>>,
}

#[derive(Deserialize, Default)]
struct UserText {
    #[serde(default)]
    server: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

/// Puts the text of the credentials (and server) keys in `value` (where
/// they may have been read as numbers).
fn keep_credentials_as_written(text: &str, value: &mut serde_json::Value) {
    use serde_json::Value;
    // Unusual layouts simply keep what `value` holds.
    let Ok(t) = serde_saphyr::from_str::<CredentialsText>(text) else {
        return;
    };
    let set = |v: &mut Value, key: &str, text: &Option<String>| {
        if let (Some(m), Some(t)) = (v.as_object_mut(), text)
            && m.get(key).is_some_and(|old| !old.is_object())
        {
            m.insert(key.to_string(), Value::String(t.clone()));
        }
    };
    let set_user = |v: Option<&mut Value>, u: &Option<UserText>| {
        if let (Some(v), Some(u)) = (v, u) {
            set(v, "server", &u.server);
            set(v, "username", &u.username);
            set(v, "password", &u.password);
        }
    };
    set(value, "server", &t.server);
    set(value, "username", &t.username);
    set(value, "password", &t.password);
    set_user(value.get_mut("hub"), &t.hub);
    set_user(value.get_mut("walt"), &t.walt);
    if let Some(regs) = &t.registries {
        for (label, u) in regs {
            set_user(
                value.get_mut("registries").and_then(|r| r.get_mut(label)),
                &Some(UserText {
                    server: None,
                    username: u.username.clone(),
                    password: u.password.clone(),
                }),
            );
        }
    }
}

/// Decodes every `password` leaf (at any depth, as WalT does).
fn decode_passwords(
    value: &mut serde_json::Value,
    at: &str,
    file: &std::path::Path,
) -> anyhow::Result<()> {
    use serde_json::Value;
    if let Value::Object(map) = value {
        for (k, v) in map.iter_mut() {
            let here = if at.is_empty() {
                k.clone()
            } else {
                format!("{at}.{k}")
            };
            if k == "password" && !v.is_object() {
                let coded = match &*v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                let plain = decode_password(&coded).with_context(|| {
                    format!(
                        "{}: {here} is not a password as WalT encodes it (the file says its passwords are encoded); remove the line to be asked again",
                        file.display()
                    )
                })?;
                *v = Value::String(plain);
            } else {
                decode_passwords(v, &here, file)?;
            }
        }
    }
    Ok(())
}

/// Reads the file (missing or empty: an empty configuration). True when the
/// legacy layout was found and converted (the caller writes it back).
fn read(path: &PathBuf) -> anyhow::Result<(ClientConfig, bool)> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) if text.trim().is_empty() => return Ok((ClientConfig::default(), false)),
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok((ClientConfig::default(), false));
        }
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let invalid = |e: &dyn std::fmt::Display| {
        anyhow::anyhow!(
            "{}: not a valid walt client config: {}",
            path.display(),
            e.to_string().lines().next().unwrap_or_default()
        )
    };
    // Overflowing numbers (`3e303031`, an encoded password PyYAML leaves
    // unquoted) must not stop the parse; their text is taken below.
    let opts = serde_saphyr::options! {
        non_finite_float_policy: serde_saphyr::NonFiniteFloatPolicy::AsString,
    };
    let mut value: serde_json::Value =
        serde_saphyr::from_str_with_options(&text, opts).map_err(|e| invalid(&e))?;
    keep_credentials_as_written(&text, &mut value);
    let updated = match &mut value {
        serde_json::Value::Object(top) => migrate_flat_keys(top),
        serde_json::Value::Null => return Ok((ClientConfig::default(), false)),
        _ => return Err(invalid(&"not a map of keys")),
    };
    if updated || text.contains(ENCODED_MARK) {
        decode_passwords(&mut value, "", path)?;
    }
    let config = serde_json::from_value(value).map_err(|e| invalid(&e))?;
    Ok((config, updated))
}

/// Reads the file; a legacy layout is written back in the current one.
fn read_migrated(path: &PathBuf) -> anyhow::Result<ClientConfig> {
    let (config, updated) = read(path)?;
    if updated {
        write(path, &config)?;
        eprintln!("{} converted to the current layout", path.display());
    }
    Ok(config)
}

/// WalT's header (`CONFIG_FILE_TOP_COMMENT`).
const TOP_COMMENT: &str = "WalT configuration file
***********************
This file was automatically generated.
You are allowed to edit the configuration values if needed.
However, instead of changing a value, you should consider removing the
related line instead. This would cause the walt client to prompt for this value
again, your new entry would pass an appropriate validity check, and this file
would be generated again accordingly.";

/// The file text, as WalT's `ConfigFileSaver` prints it: header, one
/// commented group per section, 4-space indentation, passwords encoded
/// under their comment.
fn printed(config: &ClientConfig) -> anyhow::Result<String> {
    use serde_json::Value;
    let value = serde_json::to_value(config).context("cannot serialise the client config")?;
    let mut lines: Vec<String> = vec![String::new()];
    lines.extend(TOP_COMMENT.lines().map(|l| format!("# {l}")));
    lines.push(String::new());
    let Value::Object(top) = value else {
        bail!("cannot serialise the client config: not a map");
    };
    let mut path = Vec::new();
    print_group(&mut lines, &mut path, &top)?;
    Ok(lines.join("\n") + "\n\n")
}

/// The keys of a group in WalT's order (those it knows first), then sorted.
fn ordered<'a>(
    path: &[&str],
    map: &'a serde_json::Map<String, serde_json::Value>,
) -> Vec<(&'a String, &'a serde_json::Value)> {
    let first: &[&str] = match path {
        [] => &["walt", "registries"],
        ["walt"] => &["server", "username"],
        ["registries"] => &["hub"],
        ["registries", _] => &["username", "password"],
        _ => &[],
    };
    let mut out: Vec<_> = first.iter().filter_map(|k| map.get_key_value(*k)).collect();
    out.extend(map.iter().filter(|(k, _)| !first.contains(&k.as_str())));
    out
}

/// WalT's comment for an item (`ConfigFileSaver.get_comment`).
fn comment(path: &[&str]) -> Option<String> {
    Some(match path {
        ["walt"] => "WalT platform".into(),
        ["walt", "server"] => "IP or hostname of WalT server".into(),
        ["walt", "username"] => "WalT user name used to identify your work".into(),
        ["registries"] => "Credentials for container registries".into(),
        ["registries", "hub"] => "Docker Hub credentials".into(),
        ["registries", r] => format!("Credentials for registry \"{r}\""),
        _ => return None,
    })
}

fn print_group<'a>(
    lines: &mut Vec<String>,
    path: &mut Vec<&'a str>,
    map: &'a serde_json::Map<String, serde_json::Value>,
) -> anyhow::Result<()> {
    use serde_json::Value;
    let indent = " ".repeat(path.len() * 4);
    for (k, v) in ordered(path, map) {
        path.push(k);
        let mut note = comment(path);
        match v {
            Value::Object(m) => {
                if let Some(c) = note {
                    if path.len() == 1 {
                        lines.push(String::new());
                        lines.push(format!("{indent}# {c}"));
                        lines.push(format!("{indent}# {}", "-".repeat(c.chars().count())));
                    } else {
                        lines.push(format!("{indent}# {c}"));
                    }
                }
                lines.push(format!("{indent}{}:", yaml_key(k)?));
                print_group(lines, path, m)?;
            }
            v => {
                let mut v = v.clone();
                if k == "password"
                    && let Value::String(p) = &v
                {
                    v = Value::String(encode_password(p));
                    note = Some(match note {
                        Some(c) => format!("{c} {ENCODED_MARK}"),
                        None => ENCODED_MARK.to_string(),
                    });
                }
                if let Some(c) = note {
                    lines.push(format!("{indent}# {c}"));
                }
                let one: BTreeMap<&str, &Value> = [(k.as_str(), &v)].into();
                // One line per value, as PyYAML writes them (no folding).
                let opts = serde_saphyr::ser_options! { prefer_block_scalars: false };
                let item = serde_saphyr::to_string_with_options(&one, opts)
                    .context("cannot serialise the client config")?;
                for l in item.trim_end().lines() {
                    lines.push(format!("{indent}{l}"));
                }
            }
        }
        path.pop();
    }
    Ok(())
}

/// `key` as a YAML mapping key (quoted when YAML needs it).
fn yaml_key(key: &str) -> anyhow::Result<String> {
    let item = serde_saphyr::to_string(&key).context("cannot serialise the client config")?;
    Ok(item.trim_end().to_string())
}

/// Writes the file with mode 0600 (it may hold registry passwords),
/// through a temporary file of a fresh name in the same directory, created
/// with `O_EXCL | O_NOFOLLOW`: a file or symlink planted there is never
/// followed nor overwritten.
fn write(path: &PathBuf, config: &ClientConfig) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let text = printed(config)?;
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
    let mut config = read_migrated(&path)?;
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
    let mut config = read_migrated(&path)?;
    config.registries.insert(label.to_string(), creds.clone());
    write(&path, &config)?;
    Ok(path)
}

/// Pins `fingerprint` for `server` (None: forgets its pin) in the client
/// config (0600). Returns the file's path.
pub fn save_fingerprint(server: &str, fingerprint: Option<&str>) -> anyhow::Result<PathBuf> {
    let path = path()?;
    let mut config = read_migrated(&path)?;
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
    use super::{
        ClientConfig, RegistryCredentials, decode_password, encode_password, endpoint, move_legacy,
        read, read_migrated, write,
    };
    use std::os::unix::fs::PermissionsExt;

    /// A file as WalT's `ConfigFileSaver` writes it (passwords "s3cret-pass"
    /// for the hub and a long non-ASCII one for "lab").
    const WALT_WRITTEN: &str = "
# WalT configuration file
# ***********************
# This file was automatically generated.
# You are allowed to edit the configuration values if needed.
# However, instead of changing a value, you should consider removing the
# related line instead. This would cause the walt client to prompt for this value
# again, your new entry would pass an appropriate validity check, and this file
# would be generated again accordingly.


# WalT platform
# -------------
walt:
    # IP or hostname of WalT server
    server: walt.example.org
    # WalT user name used to identify your work
    username: alice

# Credentials for container registries
# ------------------------------------
registries:
    # Docker Hub credentials
    hub:
        username: alicehub
        # (password value is encoded.)
        password: 21722d3655390d2335213a
    # Credentials for registry \"lab\"
    lab:
        username: alice
        # (password value is encoded.)
        password: 91e8acc69c6d4c3c3a35693e265327474f3a2d6431482054702820733b5f3c2337336e30582c4e73203a2c6e2c452d1c007c796f

";

    const LONG: &str = "é€ long password that is longer than the key, 40+";

    fn file(text: &str) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    #[test]
    fn walt_encoding() {
        assert_eq!(encode_password("s3cret-pass"), "21722d3655390d2335213a");
        assert_eq!(
            decode_password("21722d3655390d2335213a").unwrap(),
            "s3cret-pass"
        );
        assert_eq!(decode_password(&encode_password(LONG)).unwrap(), LONG);
        assert_eq!(decode_password("21722D36").unwrap(), "s3cr");
        assert!(decode_password("217").is_none());
        assert!(decode_password("zz").is_none());
        // Not UTF-8 once decoded.
        assert!(decode_password("c8cf").is_none());
    }

    #[test]
    fn reads_a_walt_written_file() {
        let (_d, path) = file(WALT_WRITTEN);
        let (c, updated) = read(&path).unwrap();
        assert!(!updated);
        assert_eq!(c.walt.server.as_deref(), Some("walt.example.org"));
        assert_eq!(c.walt.username.as_deref(), Some("alice"));
        assert_eq!(c.registries["hub"].username, "alicehub");
        assert_eq!(c.registries["hub"].password, "s3cret-pass");
        assert_eq!(c.registries["lab"].password, LONG);
        // Written back: the same text WalT writes.
        write(&path, &c).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), WALT_WRITTEN);
    }

    #[test]
    fn plain_passwords_of_earlier_files_still_read() {
        // As walt wrote it before: no comment, password in clear (even one
        // that looks like hex).
        let (_d, path) = file(
            "walt:\n  server: w\n  username: bob\nregistries:\n  lab:\n    username: bob\n    password: 21722d3655390d2335213a\n",
        );
        let (c, _) = read(&path).unwrap();
        assert_eq!(c.registries["lab"].password, "21722d3655390d2335213a");
        // Saved again: WalT's form.
        write(&path, &c).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.contains("# (password value is encoded.)\n        password: "),
            "{text}"
        );
        let (c, _) = read(&path).unwrap();
        assert_eq!(c.registries["lab"].password, "21722d3655390d2335213a");
    }

    /// PyYAML leaves `3e303031` unquoted (a string in YAML 1.1, a number
    /// in YAML 1.2): it is still the password's hex (here of "lq~u"), as are
    /// digits-only values a hand edit left unquoted.
    #[test]
    fn encoded_passwords_that_look_like_numbers() {
        let (_d, path) = file(
            "# (password value is encoded.)\nregistries:\n  a:\n    username: u\n    password: 3e303031\n  b:\n    username: u\n    password: 3e303031\n",
        );
        let (c, _) = read(&path).unwrap();
        assert_eq!(c.registries["a"].password, "lq~u");
        assert_eq!(c.registries["b"].password, "lq~u");
    }

    #[test]
    fn marked_file_with_a_clear_password_is_refused() {
        let (_d, path) = file(
            "# (password value is encoded.)\nregistries:\n  lab:\n    username: u\n    password: not-hex\n",
        );
        let e = read(&path).unwrap_err().to_string();
        assert!(
            e.contains("registries.lab.password is not a password as WalT encodes it"),
            "{e}"
        );
        assert!(!e.contains("not-hex"), "{e}");
    }

    #[test]
    fn flat_layout_is_migrated_as_walt_does() {
        let (_d, path) =
            file("server: walt.example.org\nusername: alice\npassword: 21722d3655390d2335213a\n");
        let (c, updated) = read(&path).unwrap();
        assert!(updated);
        assert_eq!(c.walt.server.as_deref(), Some("walt.example.org"));
        assert_eq!(c.walt.username.as_deref(), Some("alice"));
        assert_eq!(c.registries["hub"].username, "alice");
        assert_eq!(c.registries["hub"].password, "s3cret-pass");
        assert!(c.other.is_empty(), "{:?}", c.other);
        // read_migrated rewrites it in the current layout.
        let c = read_migrated(&path).unwrap();
        assert_eq!(c.registries["hub"].password, "s3cret-pass");
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.contains(
                "\nwalt:\n    # IP or hostname of WalT server\n    server: walt.example.org\n"
            ),
            "{text}"
        );
        assert!(text.contains("password: 21722d3655390d2335213a"), "{text}");
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let (_, updated) = read(&path).unwrap();
        assert!(!updated);
        // A `hub` group at the top moves under registries.
        let (_d, path) =
            file("hub:\n  username: h\n  password: 21722d3655390d2335213a\nwalt:\n  server: s\n");
        let (c, updated) = read(&path).unwrap();
        assert!(updated);
        assert_eq!(c.registries["hub"].username, "h");
        assert_eq!(c.registries["hub"].password, "s3cret-pass");
        assert_eq!(c.walt.server.as_deref(), Some("s"));
    }

    #[test]
    fn legacy_waltrc_is_moved() {
        let dir = tempfile::tempdir().unwrap();
        let legacy = dir.path().join(".waltrc");
        let path = dir.path().join(".walt/config");
        std::fs::write(&legacy, "server: s\n").unwrap();
        std::fs::set_permissions(&legacy, std::fs::Permissions::from_mode(0o644)).unwrap();
        move_legacy(&legacy, &path).unwrap();
        assert!(!legacy.exists());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "server: s\n");
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // An existing config wins: the legacy file stays where it is.
        std::fs::write(&legacy, "server: other\n").unwrap();
        move_legacy(&legacy, &path).unwrap();
        assert!(legacy.exists());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "server: s\n");
    }

    /// WalT's own decoder (client/walt/client/config.py, same logic) reads
    /// what walt writes.
    #[test]
    fn walt_decodes_what_walt_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config");
        let mut c = ClientConfig::default();
        c.walt.server = Some("w".into());
        c.walt.username = Some("alice".into());
        for (label, pw) in [
            ("hub", "s3cret-pass"),
            ("lab", LONG),
            ("num", "1234"),
            ("e", "12e4"),
        ] {
            c.registries.insert(
                label.into(),
                RegistryCredentials {
                    username: "alice".into(),
                    password: pw.into(),
                },
            );
        }
        write(&path, &c).unwrap();
        let out = std::process::Command::new("python3")
            .arg("-c")
            .arg(WALT_DECODE_PY)
            .arg(&path)
            .output()
            .expect("python3 (with PyYAML) is needed to run WalT's decoder");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let got = String::from_utf8(out.stdout).unwrap();
        assert_eq!(
            got,
            format!("e 12e4\nhub s3cret-pass\nlab {LONG}\nnum 1234\n")
        );
        // And walt reads it back.
        let (back, _) = read(&path).unwrap();
        assert_eq!(back.registries["e"].password, "12e4");
        assert_eq!(back.registries["lab"].password, LONG);
    }

    /// WalT's `decode` and its YAML loading, printing `label password`.
    const WALT_DECODE_PY: &str = r#"
import sys, yaml
KEY = b"RAND0M STRING T0 HIDE A PASSW0RD"
def xor(password):
    key = (len(password) // len(KEY) + 1) * KEY
    return bytes(a ^ b for a, b in zip(key, password))
def decode(coded_value):
    return xor(bytes.fromhex(coded_value)).decode("UTF-8")
conf = yaml.safe_load(open(sys.argv[1]).read())
for label in sorted(conf["registries"]):
    print(label, decode(conf["registries"][label]["password"]))
"#;

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
