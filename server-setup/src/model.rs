//! The configuration being edited: the file as written (unknown sections and
//! keys kept) plus the validation rules of the editor and of the `registry`
//! subcommands. Pure: host resolution is passed in by the caller.

use std::collections::BTreeMap;

use serde_json::Value;
use walt_core::config::{RESERVED_LABELS, RegistryEntry, ServerConfig, ServerConfigFile};

/// Header written at the top of the file.
pub const HEADER: &str =
    "# WalT server configuration file.\n# Run 'walt-server-setup --edit-conf' to update.\n";

pub const HUB_DESCRIPTION: &str = "Public registry at hub.docker.com";
pub const MAX_DESCRIPTION: usize = 35;
pub const DEFAULT_PORT: u16 = 443;
pub const DEFAULT_PROTOCOL: &str = "https";
pub const DEFAULT_AUTH: &str = "basic";
pub const PROTOCOLS: [&str; 3] = ["https", "http", "https-no-verify"];
pub const AUTHS: [&str; 2] = ["basic", "none"];

/// Says whether `host` resolves (for `port`).
pub type Resolver<'a> = &'a dyn Fn(&str, u16) -> bool;

/// The resolver used outside tests (`std::net::ToSocketAddrs`).
pub fn system_resolver(host: &str, port: u16) -> bool {
    use std::net::ToSocketAddrs;
    (host, port)
        .to_socket_addrs()
        .is_ok_and(|mut a| a.next().is_some())
}

/// A docker-registry-v2 registry as given to `registry add` or the editor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRegistry {
    pub label: String,
    pub description: String,
    pub host: String,
    pub port: u16,
    pub protocol: String,
    pub auth: String,
    /// Some: a `jfrog-artifactory` registry, its images under this repository.
    pub repository: Option<String>,
}

impl NewRegistry {
    pub fn to_entry(&self) -> RegistryEntry {
        RegistryEntry {
            label: Some(self.label.clone()),
            api: Some(
                if self.repository.is_some() {
                    "jfrog-artifactory"
                } else {
                    "docker-registry-v2"
                }
                .into(),
            ),
            description: Some(self.description.clone()),
            host: Some(self.host.clone()),
            port: Some(Value::from(self.port)),
            protocol: Some(self.protocol.clone()),
            auth: Some(self.auth.clone()),
            repository: self.repository.clone(),
            ca_file: None,
            other: BTreeMap::new(),
        }
    }
}

/// Where the configuration stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    Ok,
    Incomplete(String),
    Invalid(String),
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Status::Ok => write!(f, "OK"),
            Status::Incomplete(r) => write!(f, "incomplete: {r}"),
            Status::Invalid(r) => write!(f, "invalid: {r}"),
        }
    }
}

/// The configuration file being edited.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Config {
    pub file: ServerConfigFile,
}

impl Config {
    /// Parses a file text (unknown sections and keys kept, in their order).
    pub fn parse(text: &str) -> Result<Self, String> {
        let file = ServerConfigFile::from_yaml(text).map_err(|e| {
            format!(
                "not valid YAML: {}",
                e.to_string().lines().next().unwrap_or_default()
            )
        })?;
        Ok(Self { file })
    }

    /// The file text: the header, then the YAML.
    pub fn to_yaml(&self) -> Result<String, String> {
        let body = serde_saphyr::to_string(&self.file)
            .map_err(|e| format!("cannot serialise the configuration: {e}"))?;
        let body = if body.trim() == "{}" {
            String::new()
        } else {
            body
        };
        Ok(format!("{HEADER}\n{body}"))
    }

    /// The registry entries; a file without `registries:` means the hub only.
    pub fn registries(&self) -> Vec<RegistryEntry> {
        match &self.file.registries {
            Some(r) => r.clone(),
            None => vec![hub_entry()],
        }
    }

    fn registries_mut(&mut self) -> &mut Vec<RegistryEntry> {
        self.file
            .registries
            .get_or_insert_with(|| vec![hub_entry()])
    }

    pub fn hub_enabled(&self) -> bool {
        self.registries().iter().any(is_hub)
    }

    /// Enables (first in the list) or disables the Docker Hub.
    pub fn set_hub(&mut self, enabled: bool) {
        let regs = self.registries_mut();
        regs.retain(|e| !is_hub(e));
        if enabled {
            regs.insert(0, hub_entry());
        }
    }

    /// Adds a registry after checking every rule.
    pub fn add(&mut self, r: &NewRegistry, resolve: Resolver) -> Result<(), String> {
        let regs = self.registries();
        check_label(&r.label, &regs, None)?;
        check_description(&r.description)?;
        check_protocol(&r.protocol)?;
        check_auth(&r.auth)?;
        check_host(&r.host, r.port, resolve)?;
        let entry = r.to_entry();
        check_repository(&entry)?;
        let mut with = regs.clone();
        with.push(entry.clone());
        check_host_port_unique(&r.host, r.port, &with, Some(regs.len()))?;
        self.registries_mut().push(entry);
        Ok(())
    }

    /// Removes the registry labelled `label`.
    pub fn remove(&mut self, label: &str) -> Result<(), String> {
        let regs = self.registries_mut();
        let before = regs.len();
        regs.retain(|e| entry_label(e) != label);
        if regs.len() == before {
            return Err(format!("there is no registry labelled '{label}'"));
        }
        Ok(())
    }

    /// Replaces entry `index`.
    pub fn replace(&mut self, index: usize, entry: RegistryEntry) {
        let regs = self.registries_mut();
        if index < regs.len() {
            regs[index] = entry;
        }
    }

    /// walt-net's `raw-device` and `ip`, as written (None when absent).
    pub fn walt_net(&self) -> (Option<String>, Option<String>) {
        let net = self.file.network.as_ref().and_then(|n| n.get("walt-net"));
        let get = |k: &str| {
            net.and_then(|n| n.get(k)).and_then(|v| match v {
                Value::Null => None,
                Value::String(s) => Some(s.clone()),
                v => Some(v.to_string()),
            })
        };
        (get("raw-device"), get("ip"))
    }

    /// Sets walt-net's `raw-device` (None: null) and `ip`, keeping other keys.
    pub fn set_walt_net(&mut self, raw_device: Option<String>, ip: Option<String>) {
        let net = self
            .file
            .network
            .get_or_insert_with(|| Value::Object(Default::default()));
        if !net.is_object() {
            *net = Value::Object(Default::default());
        }
        let Some(obj) = net.as_object_mut() else {
            return;
        };
        let wn = obj
            .entry("walt-net")
            .or_insert_with(|| Value::Object(Default::default()));
        if !wn.is_object() {
            *wn = Value::Object(Default::default());
        }
        if let Some(wn) = wn.as_object_mut() {
            wn.insert(
                "raw-device".into(),
                raw_device.map(Value::String).unwrap_or(Value::Null),
            );
            match ip {
                Some(ip) => wn.insert("ip".into(), Value::String(ip)),
                None => wn.remove("ip"),
            };
        }
    }

    /// OK, incomplete (a required property is missing) or invalid (a rule is broken).
    pub fn status(&self, resolve: Resolver) -> Status {
        let regs = self.registries();
        for (i, e) in regs.iter().enumerate() {
            if is_hub(e) || !is_used(e) {
                continue;
            }
            let name = entry_label(e);
            let name = if name.is_empty() {
                format!("registry #{}", i + 1)
            } else {
                format!("registry '{name}'")
            };
            for (key, v) in [
                ("label", &e.label),
                ("description", &e.description),
                ("host", &e.host),
            ] {
                if v.as_deref().is_none_or(str::is_empty) {
                    return Status::Incomplete(format!("{name}: {key} is missing"));
                }
            }
            if is_jfrog(e) && e.repository.as_deref().is_none_or(str::is_empty) {
                return Status::Incomplete(format!("{name}: repository is missing"));
            }
        }
        for (i, e) in regs.iter().enumerate() {
            if is_hub(e) {
                continue;
            }
            if let Err(r) = check_entry(e, &regs, Some(i), resolve) {
                return Status::Invalid(format!("registry '{}': {r}", entry_label(e)));
            }
        }
        // Whatever the rules above miss, the server must accept the file.
        match self
            .to_yaml()
            .and_then(|t| ServerConfig::parse("server.conf", &t).map_err(|e| e.to_string()))
        {
            Ok(_) => Status::Ok,
            Err(e) => Status::Invalid(e),
        }
    }
}

/// Every rule on one docker-registry-v2 or jfrog-artifactory entry
/// (`index`: its place in `all`). Entries of another api are kept as they
/// are (the server skips them with a warning).
pub fn check_entry(
    e: &RegistryEntry,
    all: &[RegistryEntry],
    index: Option<usize>,
    resolve: Resolver,
) -> Result<(), String> {
    match e.api.as_deref() {
        Some("docker-registry-v2") => {}
        Some("jfrog-artifactory") => check_repository(e)?,
        Some(_) => return Ok(()),
        None => return Err("api is missing".into()),
    }
    check_label(&entry_label(e), all, index)?;
    check_description(e.description.as_deref().unwrap_or(""))?;
    let port = entry_port(e)?;
    check_protocol(e.protocol.as_deref().unwrap_or(DEFAULT_PROTOCOL))?;
    check_auth(e.auth.as_deref().unwrap_or(DEFAULT_AUTH))?;
    let host = e.host.as_deref().unwrap_or("");
    check_host(host, port, resolve)?;
    check_host_port_unique(host, port, all, index)
}

pub fn hub_entry() -> RegistryEntry {
    RegistryEntry {
        label: Some("hub".into()),
        api: Some("docker-hub".into()),
        description: Some(HUB_DESCRIPTION.into()),
        ..Default::default()
    }
}

pub fn is_hub(e: &RegistryEntry) -> bool {
    e.api.as_deref() == Some("docker-hub")
}

pub fn is_jfrog(e: &RegistryEntry) -> bool {
    e.api.as_deref() == Some("jfrog-artifactory")
}

/// Whether the server uses this entry (an api it knows); the others are
/// kept as they are and neither shown for editing nor checked.
pub fn is_used(e: &RegistryEntry) -> bool {
    matches!(
        e.api.as_deref(),
        Some("docker-hub" | "docker-registry-v2" | "jfrog-artifactory")
    )
}

pub fn entry_label(e: &RegistryEntry) -> String {
    if is_hub(e) {
        return "hub".into();
    }
    e.label.clone().unwrap_or_default()
}

/// The port of an entry (443 when absent).
pub fn entry_port(e: &RegistryEntry) -> Result<u16, String> {
    match &e.port {
        None => Ok(DEFAULT_PORT),
        Some(Value::Number(n)) => parse_port(&n.to_string()),
        Some(Value::String(s)) => parse_port(s),
        Some(v) => Err(format!("port {v} is not an integer")),
    }
}

/// Label rules: `[a-z0-9-]+`, not reserved, not used by another registry
/// (`except`: the index of the entry being edited).
pub fn check_label(
    label: &str,
    all: &[RegistryEntry],
    except: Option<usize>,
) -> Result<(), String> {
    if label.is_empty() {
        return Err("the label must not be empty".into());
    }
    if !label
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(format!(
            "label '{label}': use only lowercase letters, digits and '-'"
        ));
    }
    if RESERVED_LABELS.contains(&label) {
        return Err(format!("label '{label}' is reserved (hub, walt, docker)"));
    }
    if all
        .iter()
        .enumerate()
        .any(|(i, e)| Some(i) != except && entry_label(e) == label)
    {
        return Err(format!(
            "label '{label}' is already used by another registry"
        ));
    }
    Ok(())
}

/// A jfrog-artifactory entry names its repository (lowercase letters,
/// digits, '.', '_', '-'); other entries have none to check.
pub fn check_repository(e: &RegistryEntry) -> Result<(), String> {
    if !is_jfrog(e) {
        return Ok(());
    }
    check_repository_name(e.repository.as_deref().unwrap_or(""))
}

/// A JFrog repository name (one component of a v2 repository name).
pub fn check_repository_name(r: &str) -> Result<(), String> {
    if r.is_empty() {
        return Err("the repository must not be empty".into());
    }
    let ok = r.len() <= 128
        && r.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'_' || b == b'-'
        })
        && r.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && r.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric());
    if !ok {
        return Err(format!(
            "repository '{r}': use only lowercase letters, digits, '.', '_' and '-'"
        ));
    }
    Ok(())
}

pub fn check_description(d: &str) -> Result<(), String> {
    if d.trim().is_empty() {
        return Err("the description must not be empty".into());
    }
    let n = d.chars().count();
    if n > MAX_DESCRIPTION {
        return Err(format!(
            "the description is too long ({n} characters, at most {MAX_DESCRIPTION})"
        ));
    }
    Ok(())
}

pub fn parse_port(s: &str) -> Result<u16, String> {
    s.trim()
        .parse::<u16>()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("port '{s}' is not an integer between 1 and 65535"))
}

pub fn check_protocol(p: &str) -> Result<(), String> {
    if PROTOCOLS.contains(&p) {
        Ok(())
    } else {
        Err(format!(
            "protocol '{p}' is not one of {}",
            PROTOCOLS.join(", ")
        ))
    }
}

pub fn check_auth(a: &str) -> Result<(), String> {
    if AUTHS.contains(&a) {
        Ok(())
    } else {
        Err(format!("auth '{a}' is not one of {}", AUTHS.join(", ")))
    }
}

pub fn check_host(host: &str, port: u16, resolve: Resolver) -> Result<(), String> {
    if host.trim().is_empty() {
        return Err("the host must not be empty".into());
    }
    if !resolve(host, port) {
        return Err(format!("host '{host}' does not resolve"));
    }
    Ok(())
}

/// One registry per host:port (several jfrog-artifactory entries may share
/// one if their repositories differ, as WalT allows).
pub fn check_host_port_unique(
    host: &str,
    port: u16,
    all: &[RegistryEntry],
    except: Option<usize>,
) -> Result<(), String> {
    let jfrog_repo = except
        .and_then(|i| all.get(i))
        .filter(|e| is_jfrog(e))
        .and_then(|e| e.repository.as_deref());
    for (i, e) in all.iter().enumerate() {
        if Some(i) == except || is_hub(e) || !is_used(e) {
            continue;
        }
        if e.host.as_deref() == Some(host) && entry_port(e).ok() == Some(port) {
            if let Some(r) = jfrog_repo
                && is_jfrog(e)
            {
                if e.repository.as_deref() != Some(r) {
                    continue;
                }
                return Err(format!(
                    "the JFrog repository '{r}' at {host}:{port} is already used by registry '{}'",
                    entry_label(e)
                ));
            }
            return Err(format!(
                "registry '{}' already uses {host}:{port}",
                entry_label(e)
            ));
        }
    }
    Ok(())
}

/// (api, description, configuration) columns of one entry.
pub fn describe(e: &RegistryEntry) -> (String, String, String) {
    let api = e.api.clone().unwrap_or_default();
    let desc = e.description.clone().unwrap_or_default();
    let conf = if is_hub(e) {
        String::new()
    } else if !is_used(e) {
        "(not supported: kept as is, skipped by the server)".into()
    } else {
        let mut c = format!(
            "host={} port={} protocol={} auth={}",
            e.host.as_deref().unwrap_or("?"),
            entry_port(e)
                .map(|p| p.to_string())
                .unwrap_or_else(|_| "?".into()),
            e.protocol.as_deref().unwrap_or(DEFAULT_PROTOCOL),
            e.auth.as_deref().unwrap_or(DEFAULT_AUTH)
        );
        if is_jfrog(e) {
            c.push_str(&format!(
                " repository={}",
                e.repository.as_deref().unwrap_or("?")
            ));
        }
        c
    };
    (api, desc, conf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yes(_: &str, _: u16) -> bool {
        true
    }
    fn no(_: &str, _: u16) -> bool {
        false
    }

    const WALT_FILE: &str = "# WalT server configuration file.
# Run 'walt-server-setup --edit-conf' to update.

network:
    walt-net:
        raw-device: null
        ip: 192.168.212.1/24
    walt-adm:
        raw-device: eth0
        ip: dhcp
registries:
-   label: hub
    api: docker-hub
    description: Public registry at hub.docker.com
-   label: local
    api: docker-registry-v2
    description: Local registry
    host: registry.example.org
    port: 5000
    protocol: https
    auth: basic
    mirror-of: something
vpn:
    enabled: false
    boot-mode: tftp
";

    fn reg(label: &str, host: &str, port: u16) -> NewRegistry {
        NewRegistry {
            label: label.into(),
            description: format!("Registry {label}"),
            host: host.into(),
            port,
            protocol: "https".into(),
            auth: "basic".into(),
            repository: None,
        }
    }

    #[test]
    fn round_trip_keeps_everything() {
        let c = Config::parse(WALT_FILE).unwrap();
        let text = c.to_yaml().unwrap();
        assert!(text.starts_with(HEADER), "{text}");
        let c2 = Config::parse(&text).unwrap();
        assert_eq!(c, c2);
        assert!(c2.file.other.contains_key("vpn"));
        assert!(c2.registries()[1].other.contains_key("mirror-of"));
        assert_eq!(c2.walt_net(), (None, Some("192.168.212.1/24".to_string())));
        // The server accepts what we write.
        let s = ServerConfig::parse("f", &text).unwrap();
        assert_eq!(s.registries.len(), 2);
        assert_eq!(c2.status(&yes), Status::Ok);
    }

    #[test]
    fn add_remove_and_hub() {
        let mut c = Config::parse(WALT_FILE).unwrap();
        c.add(&reg("new", "reg.example.org", 443), &yes).unwrap();
        assert_eq!(c.registries().len(), 3);
        let text = c.to_yaml().unwrap();
        let s = ServerConfig::parse("f", &text).unwrap();
        assert!(s.registry("new").is_some());
        c.remove("new").unwrap();
        assert!(c.remove("new").unwrap_err().contains("no registry"));
        c.set_hub(false);
        assert!(!c.hub_enabled());
        assert_eq!(c.registries().len(), 1);
        c.set_hub(true);
        assert!(c.hub_enabled());
        assert_eq!(entry_label(&c.registries()[0]), "hub");
        // No file: the hub only; adding keeps it.
        let mut c = Config::default();
        assert!(c.hub_enabled());
        c.add(&reg("a", "h", 443), &yes).unwrap();
        assert_eq!(c.registries().len(), 2);
    }

    #[test]
    fn label_rules() {
        let c = Config::parse(WALT_FILE).unwrap();
        let regs = c.registries();
        assert!(check_label("my-reg2", &regs, None).is_ok());
        assert_eq!(
            check_label("", &regs, None).unwrap_err(),
            "the label must not be empty"
        );
        assert!(
            check_label("My_Reg", &regs, None)
                .unwrap_err()
                .contains("use only lowercase letters, digits and '-'")
        );
        for r in ["hub", "walt", "docker"] {
            assert!(
                check_label(r, &regs, None)
                    .unwrap_err()
                    .contains("reserved")
            );
        }
        assert!(
            check_label("local", &regs, None)
                .unwrap_err()
                .contains("already used")
        );
        // Editing entry 1 keeps its own label.
        assert!(check_label("local", &regs, Some(1)).is_ok());
    }

    #[test]
    fn description_rules() {
        assert!(check_description("Local registry").is_ok());
        assert_eq!(
            check_description("  ").unwrap_err(),
            "the description must not be empty"
        );
        assert!(check_description(&"x".repeat(35)).is_ok());
        assert!(
            check_description(&"x".repeat(36))
                .unwrap_err()
                .contains("too long (36 characters, at most 35)")
        );
    }

    #[test]
    fn port_protocol_auth_rules() {
        assert_eq!(parse_port("5000"), Ok(5000));
        assert!(parse_port("abc").unwrap_err().contains("not an integer"));
        assert!(parse_port("0").is_err());
        assert!(parse_port("70000").is_err());
        assert!(check_protocol("https-no-verify").is_ok());
        assert!(check_protocol("ftp").unwrap_err().contains("not one of"));
        assert!(check_auth("none").is_ok());
        assert!(check_auth("token").unwrap_err().contains("not one of"));
    }

    #[test]
    fn host_rules() {
        let c = Config::parse(WALT_FILE).unwrap();
        let regs = c.registries();
        assert!(check_host("h", 1, &yes).is_ok());
        assert_eq!(
            check_host("nowhere.invalid", 443, &no).unwrap_err(),
            "host 'nowhere.invalid' does not resolve"
        );
        assert!(check_host("", 443, &yes).unwrap_err().contains("empty"));
        assert!(
            check_host_port_unique("registry.example.org", 5000, &regs, None)
                .unwrap_err()
                .contains("registry 'local' already uses registry.example.org:5000")
        );
        assert!(check_host_port_unique("registry.example.org", 5001, &regs, None).is_ok());
        assert!(check_host_port_unique("registry.example.org", 5000, &regs, Some(1)).is_ok());
        assert!(system_resolver("127.0.0.1", 443));
    }

    #[test]
    fn add_checks_every_rule() {
        let mut c = Config::parse(WALT_FILE).unwrap();
        let before = c.clone();
        assert!(c.add(&reg("local", "x", 1), &yes).is_err());
        assert!(
            c.add(&reg("other", "registry.example.org", 5000), &yes)
                .is_err()
        );
        assert!(c.add(&reg("other", "x", 1), &no).is_err());
        let mut r = reg("other", "x", 1);
        r.description = "y".repeat(40);
        assert!(c.add(&r, &yes).is_err());
        let mut r = reg("other", "x", 1);
        r.protocol = "ftp".into();
        assert!(c.add(&r, &yes).is_err());
        assert_eq!(c, before);
    }

    #[test]
    fn status_line() {
        let mut c = Config::parse(WALT_FILE).unwrap();
        assert_eq!(c.status(&yes).to_string(), "OK");
        assert!(matches!(c.status(&no), Status::Invalid(r) if r.contains("does not resolve")));
        let mut e = c.registries()[1].clone();
        e.host = None;
        c.replace(1, e);
        assert_eq!(
            c.status(&yes),
            Status::Incomplete("registry 'local': host is missing".into())
        );
        let mut e = c.registries()[1].clone();
        e.host = Some("h".into());
        e.port = Some(Value::String("abc".into()));
        c.replace(1, e);
        assert!(matches!(c.status(&yes), Status::Invalid(r) if r.contains("not an integer")));
    }

    /// Entries of WalT's regconf.py: a JFrog instance, and an api walt does
    /// not know. Neither stops the editor; both are kept on save.
    const WALT_JFROG: &str = "registries:
-   label: hub
    api: docker-hub
    description: Public registry at hub.docker.com
-   label: art
    api: jfrog-artifactory
    description: Local registry
    host: jfrog.example.org
    port: 443
    protocol: https
    auth: basic
    repository: walt-images
-   label: gl
    api: gitlab-registry
    description: d
vpn:
    enabled: false
    zeta: 1
    alpha: 2
";

    #[test]
    fn jfrog_and_unknown_entries() {
        let mut c = Config::parse(WALT_JFROG).unwrap();
        assert_eq!(c.status(&yes), Status::Ok);
        let regs = c.registries();
        assert_eq!(
            describe(&regs[1]).2,
            "host=jfrog.example.org port=443 protocol=https auth=basic repository=walt-images"
        );
        assert!(describe(&regs[2]).2.contains("not supported"));
        // A second JFrog repository on the same host:port is fine, the same
        // one is not, nor a docker-registry-v2 there.
        let mut jf = reg("art2", "jfrog.example.org", 443);
        jf.repository = Some("other".into());
        c.add(&jf, &yes).unwrap();
        let mut same = reg("art3", "jfrog.example.org", 443);
        same.repository = Some("walt-images".into());
        assert!(c.add(&same, &yes).unwrap_err().contains("already used"));
        assert!(c.add(&reg("v2", "jfrog.example.org", 443), &yes).is_err());
        let mut bad = reg("art4", "x", 1);
        bad.repository = Some("Bad Repo".into());
        assert!(c.add(&bad, &yes).unwrap_err().contains("repository"));
        // Missing repository: incomplete.
        let mut e = c.registries()[1].clone();
        e.repository = None;
        c.replace(1, e);
        assert_eq!(
            c.status(&yes),
            Status::Incomplete("registry 'art': repository is missing".into())
        );
        // Saved: everything kept, keys of other sections in their order.
        let c = Config::parse(WALT_JFROG).unwrap();
        let text = c.to_yaml().unwrap();
        assert!(text.contains("  repository: walt-images\n"), "{text}");
        assert!(text.contains("api: gitlab-registry"), "{text}");
        assert!(
            text.contains("vpn:\n  enabled: false\n  zeta: 1\n  alpha: 2\n"),
            "{text}"
        );
        assert_eq!(Config::parse(&text).unwrap(), c);
    }

    #[test]
    fn network_settings() {
        let mut c = Config::parse(WALT_FILE).unwrap();
        c.set_walt_net(Some("eth1".into()), Some("10.0.0.1/24".into()));
        assert_eq!(
            c.walt_net(),
            (Some("eth1".into()), Some("10.0.0.1/24".into()))
        );
        // walt-adm kept.
        let text = c.to_yaml().unwrap();
        assert!(text.contains("walt-adm"), "{text}");
        let mut c = Config::default();
        assert_eq!(c.walt_net(), (None, None));
        c.set_walt_net(None, Some("192.168.212.1/24".into()));
        let c2 = Config::parse(&c.to_yaml().unwrap()).unwrap();
        assert_eq!(c2.walt_net(), (None, Some("192.168.212.1/24".into())));
    }
}
