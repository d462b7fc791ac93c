//! The server configuration file (`/etc/walt/server.conf`), WalT format.
//!
//! Sections walt does not use are kept as they are (so an existing WalT
//! file loads unchanged and is written back unchanged, keys in the order they
//! were written); the registries list is parsed and validated into
//! [`Registry`] values. Registry entries WalT accepts but walt cannot use
//! (an `api` it does not know) are kept in the file and listed in
//! [`ServerConfig::skipped`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A problem in the configuration file, naming the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: not valid YAML: {message}")]
    Syntax { file: String, message: String },
    #[error("{file}: {key}: {message}")]
    Invalid {
        file: String,
        key: String,
        message: String,
    },
}

/// The file as written (unknown keys preserved).
///
/// Serialised, it gives `network`, `registries`, then the other sections;
/// every map that is not a registry entry keeps the key order of the text
/// it was read from ([`ServerConfigFile::from_yaml`]), keys added since
/// come after the known ones, sorted.
#[derive(Debug, Clone, Deserialize, Default)]
pub struct ServerConfigFile {
    #[serde(default)]
    pub network: Option<Value>,
    #[serde(default)]
    pub registries: Option<Vec<RegistryEntry>>,
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
    /// The key order of the text read (not part of the content: two files
    /// differing only by it are equal).
    #[serde(skip)]
    pub key_order: KeyOrder,
}

impl PartialEq for ServerConfigFile {
    fn eq(&self, o: &Self) -> bool {
        self.network == o.network && self.registries == o.registries && self.other == o.other
    }
}

impl ServerConfigFile {
    /// Parses YAML text, remembering its key order (empty text: empty file).
    pub fn from_yaml(text: &str) -> Result<Self, serde_saphyr::Error> {
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        let mut file: ServerConfigFile = serde_saphyr::from_str(text)?;
        file.key_order = serde_saphyr::from_str(text)?;
        Ok(file)
    }
}

/// The order of the keys of every map of a YAML document (nested maps and
/// sequence items included), as read.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KeyOrder {
    keys: Vec<(String, KeyOrder)>,
    items: Vec<KeyOrder>,
}

impl KeyOrder {
    fn child(&self, key: &str) -> &KeyOrder {
        static EMPTY: KeyOrder = KeyOrder {
            keys: Vec::new(),
            items: Vec::new(),
        };
        self.keys
            .iter()
            .find(|(k, _)| k == key)
            .map_or(&EMPTY, |(_, o)| o)
    }

    fn item(&self, i: usize) -> &KeyOrder {
        static EMPTY: KeyOrder = KeyOrder {
            keys: Vec::new(),
            items: Vec::new(),
        };
        self.items.get(i).unwrap_or(&EMPTY)
    }

    /// The keys of `map`: those read, in their order, then the others.
    fn ordered<'a>(&self, map: &'a serde_json::Map<String, Value>) -> Vec<(&'a String, &'a Value)> {
        let mut out: Vec<(&String, &Value)> = self
            .keys
            .iter()
            .filter_map(|(k, _)| map.get_key_value(k))
            .collect();
        out.extend(
            map.iter()
                .filter(|(k, _)| self.keys.iter().all(|(r, _)| r != *k)),
        );
        out
    }
}

impl<'de> Deserialize<'de> for KeyOrder {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(KeyOrderVisitor)
    }
}

struct KeyOrderVisitor;

/// A map key of any scalar type, as text (what serde_json's maps hold).
struct KeyText(String);

impl<'de> Deserialize<'de> for KeyText {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Value::deserialize(d)? {
            Value::String(s) => Ok(KeyText(s)),
            v => Ok(KeyText(v.to_string())),
        }
    }
}

macro_rules! scalar {
    ($($f:ident: $t:ty),*) => {$(
        fn $f<E: serde::de::Error>(self, _: $t) -> Result<KeyOrder, E> {
            Ok(KeyOrder::default())
        }
    )*};
}

impl<'de> serde::de::Visitor<'de> for KeyOrderVisitor {
    type Value = KeyOrder;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a YAML document")
    }

    scalar!(visit_bool: bool, visit_i64: i64, visit_u64: u64, visit_i128: i128, visit_u128: u128,
        visit_f64: f64, visit_str: &str, visit_bytes: &[u8]);

    fn visit_unit<E: serde::de::Error>(self) -> Result<KeyOrder, E> {
        Ok(KeyOrder::default())
    }

    fn visit_none<E: serde::de::Error>(self) -> Result<KeyOrder, E> {
        Ok(KeyOrder::default())
    }

    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<KeyOrder, D::Error> {
        KeyOrder::deserialize(d)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<KeyOrder, A::Error> {
        let mut items = Vec::new();
        while let Some(o) = seq.next_element::<KeyOrder>()? {
            items.push(o);
        }
        Ok(KeyOrder {
            keys: Vec::new(),
            items,
        })
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<KeyOrder, A::Error> {
        let mut keys: Vec<(String, KeyOrder)> = Vec::new();
        while let Some((KeyText(k), o)) = map.next_entry::<KeyText, KeyOrder>()? {
            // A repeated key: the last value wins, at the first place.
            match keys.iter_mut().find(|(r, _)| *r == k) {
                Some(slot) => slot.1 = o,
                None => keys.push((k, o)),
            }
        }
        Ok(KeyOrder {
            keys,
            items: Vec::new(),
        })
    }
}

/// `value` serialised with the key order of `order`.
struct InOrder<'a>(&'a Value, &'a KeyOrder);

impl Serialize for InOrder<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{SerializeMap, SerializeSeq};
        match self.0 {
            Value::Object(m) => {
                let mut out = s.serialize_map(Some(m.len()))?;
                for (k, v) in self.1.ordered(m) {
                    out.serialize_entry(k, &InOrder(v, self.1.child(k)))?;
                }
                out.end()
            }
            Value::Array(a) => {
                let mut out = s.serialize_seq(Some(a.len()))?;
                for (i, v) in a.iter().enumerate() {
                    out.serialize_element(&InOrder(v, self.1.item(i)))?;
                }
                out.end()
            }
            v => v.serialize(s),
        }
    }
}

impl Serialize for ServerConfigFile {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut out = s.serialize_map(None)?;
        if let Some(n) = &self.network {
            out.serialize_entry("network", &InOrder(n, self.key_order.child("network")))?;
        }
        if let Some(r) = &self.registries {
            out.serialize_entry("registries", r)?;
        }
        // `other` as an object, to order it like any map read.
        let other: serde_json::Map<String, Value> = self
            .other
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (k, v) in self.key_order.ordered(&other) {
            out.serialize_entry(k, &InOrder(v, self.key_order.child(k)))?;
        }
        out.end()
    }
}

/// One entry of `registries:` as written.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct RegistryEntry {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<String>,
    /// `jfrog-artifactory`: the Artifactory repository the images live under.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<String>,
    /// walt extension: PEM file of extra CA certificates trusted for this registry.
    #[serde(rename = "ca-file", default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Https,
    Http,
    HttpsNoVerify,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Auth {
    None,
    Basic,
}

/// A validated `docker-registry-v2` (or `jfrog-artifactory`) registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct V2Registry {
    pub label: String,
    pub description: String,
    pub host: String,
    pub port: u16,
    pub protocol: Protocol,
    pub auth: Auth,
    pub ca_file: Option<String>,
    /// `jfrog-artifactory`: every image lives under this repository
    /// (`<repository>/<name>`, the user part of its clone URL) and the
    /// catalog is at `/v2/<repository>/_catalog`, as WalT reads it.
    pub repository: Option<String>,
}

impl V2Registry {
    /// `http(s)://host:port`.
    pub fn base_url(&self) -> String {
        let scheme = match self.protocol {
            Protocol::Http => "http",
            Protocol::Https | Protocol::HttpsNoVerify => "https",
        };
        let host = if self.host.contains(':') && !self.host.starts_with('[') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        format!("{scheme}://{host}:{}", self.port)
    }
}

/// The Docker Hub entry (endpoints overridable for tests and mirrors).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubRegistry {
    pub description: String,
    pub other: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Registry {
    Hub(HubRegistry),
    V2(V2Registry),
}

impl Registry {
    pub fn label(&self) -> &str {
        match self {
            Registry::Hub(_) => "hub",
            Registry::V2(r) => &r.label,
        }
    }
}

/// Labels that name the built-in sources and cannot be used for a registry.
pub const RESERVED_LABELS: [&str; 3] = ["hub", "walt", "docker"];

/// The loaded configuration: the file as written plus validated registries
/// and limits.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    pub file: ServerConfigFile,
    pub registries: Vec<Registry>,
    /// The `limits:` section (a walt extension), defaults for what it omits.
    pub limits: Limits,
    /// The `nodes:` section (a walt extension), defaults for what it omits.
    pub nodes: NodesConfig,
    /// Entries of `registries:` kept in the file but not used (WalT accepts
    /// them, walt does not know their `api`).
    pub skipped: Vec<SkippedRegistry>,
}

/// A registry entry walt skips.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedRegistry {
    /// Its label (`registries[i]` when it has none).
    pub label: String,
    pub api: String,
    /// Why, for the warning.
    pub reason: String,
}

impl SkippedRegistry {
    /// The warning logged and shown for it.
    pub fn warning(&self) -> String {
        format!("registry '{}' skipped: {}", self.label, self.reason)
    }
}

/// The `nodes:` section of `server.conf` (walt extension).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodesConfig {
    /// `unmount-grace`: how long the mount of an image no node uses any
    /// more stays, before it is released.
    pub unmount_grace: std::time::Duration,
}

impl Default for NodesConfig {
    fn default() -> Self {
        NodesConfig {
            unmount_grace: std::time::Duration::from_secs(60),
        }
    }
}

/// The keys of the `nodes:` section.
pub const NODES_KEYS: [&str; 1] = ["unmount-grace"];

/// Validates the `nodes:` section (absent: the defaults).
fn validate_nodes(file: &str, section: Option<&Value>) -> Result<NodesConfig, ConfigError> {
    let mut nodes = NodesConfig::default();
    let err = |key: &str, message: String| ConfigError::Invalid {
        file: file.to_string(),
        key: format!("nodes.{key}"),
        message,
    };
    let map = match section {
        None | Some(Value::Null) => return Ok(nodes),
        Some(Value::Object(m)) => m,
        Some(v) => {
            return Err(ConfigError::Invalid {
                file: file.to_string(),
                key: "nodes".into(),
                message: format!("{v} is not a section of keys"),
            });
        }
    };
    for (key, v) in map {
        match key.as_str() {
            "unmount-grace" => {
                let t = match v {
                    Value::String(s) => s.clone(),
                    Value::Number(n) => n.to_string(),
                    v => return Err(err(key, format!("{v} is not a value"))),
                };
                let d = parse_duration(&t).map_err(|m| err(key, m))?;
                if d > std::time::Duration::from_secs(7 * 24 * 3600) {
                    return Err(err(key, "must be at most 168h".into()));
                }
                nodes.unmount_grace = d;
            }
            _ => {
                return Err(err(
                    key,
                    format!("unknown key (known: {})", NODES_KEYS.join(", ")),
                ));
            }
        }
    }
    Ok(nodes)
}

/// The server's address and prefix length on the walt network, from
/// `network: walt-net: ip: a.b.c.d/len` (None when absent or not of that
/// form, e.g. `dhcp`).
pub fn walt_net_ip(file: &ServerConfigFile) -> Option<(std::net::Ipv4Addr, u8)> {
    let ip = file
        .network
        .as_ref()?
        .get("walt-net")?
        .get("ip")?
        .as_str()?;
    let (addr, len) = ip.trim().split_once('/')?;
    let addr: std::net::Ipv4Addr = addr.parse().ok()?;
    let len: u8 = len.parse().ok().filter(|l| *l <= 32)?;
    Some((addr, len))
}

/// Free space kept on the data dir's filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reserve {
    Bytes(u64),
    /// A percentage of the filesystem's size.
    Percent(u8),
}

impl Reserve {
    /// The bytes to keep free on a filesystem of `total` bytes.
    pub fn bytes(self, total: u64) -> u64 {
        match self {
            Reserve::Bytes(b) => b,
            Reserve::Percent(p) => (u128::from(total) * u128::from(p) / 100) as u64,
        }
    }
}

impl std::fmt::Display for Reserve {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reserve::Bytes(b) => f.write_str(&format_size(*b)),
            Reserve::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// The bounds of the `limits:` section of `server.conf` (walt extension).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// `layer-unpacked-size`: bytes of file data in one unpacked layer
    /// (apparent sizes: the holes of sparse files count).
    pub layer_unpacked_size: u64,
    /// `image-unpacked-size`: the same for all the layers of an image.
    pub image_unpacked_size: u64,
    /// `free-space-reserve`: what clone, cp and save leave free on the data
    /// dir's filesystem.
    pub free_space_reserve: Reserve,
    /// `grpc-receive-size`: largest gRPC message the server decodes.
    pub grpc_receive_size: u64,
    /// `grpc-send-size`: largest gRPC message the server encodes.
    pub grpc_send_size: u64,
    /// `shells-per-user`: shells one user may have open at once.
    pub shells_per_user: u32,
    /// `save-prompt-timeout`: how long the server waits for the answer to
    /// the save prompt after a shell, before discarding the changes.
    pub save_prompt_timeout: std::time::Duration,
    /// `build-cache-size`: what the layers only `walt image build`'s cache
    /// keeps may add up to; the least recently used go first.
    pub build_cache_size: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            layer_unpacked_size: 64 << 30,
            image_unpacked_size: 256 << 30,
            free_space_reserve: Reserve::Bytes(2 << 30),
            grpc_receive_size: 4 << 20,
            grpc_send_size: 64 << 20,
            shells_per_user: 8,
            save_prompt_timeout: std::time::Duration::from_secs(600),
            build_cache_size: 20 << 30,
        }
    }
}

/// The keys of the `limits:` section.
pub const LIMIT_KEYS: [&str; 8] = [
    "layer-unpacked-size",
    "image-unpacked-size",
    "free-space-reserve",
    "grpc-receive-size",
    "grpc-send-size",
    "shells-per-user",
    "save-prompt-timeout",
    "build-cache-size",
];

/// `n` bytes in the largest binary unit that divides it (`64G`, `512M`, `100`).
pub fn format_size(n: u64) -> String {
    for (shift, unit) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
        if n != 0 && n.is_multiple_of(1u64 << shift) {
            return format!("{}{unit}", n >> shift);
        }
    }
    n.to_string()
}

/// Parses a size: an integer of bytes, or followed by `K`, `M`, `G` or `T`
/// (binary units; `KiB`, `MB`... accepted as the same).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let digits = t.bytes().take_while(u8::is_ascii_digit).count();
    let (num, unit) = t.split_at(digits);
    let bad = || format!("'{text}' is not a size (e.g. 512M, 64G, or a number of bytes)");
    let n: u64 = num.parse().map_err(|_| bad())?;
    let unit = unit.trim();
    let unit = unit
        .strip_suffix("iB")
        .or_else(|| unit.strip_suffix('B'))
        .unwrap_or(unit);
    let shift = match unit.to_ascii_uppercase().as_str() {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(bad()),
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("'{text}' is too large"))
}

/// Parses a duration: an integer followed by `ms`, `s`, `m` or `h` (a bare
/// integer is seconds).
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let t = text.trim();
    let digits = t.bytes().take_while(u8::is_ascii_digit).count();
    let (num, unit) = t.split_at(digits);
    let bad = || format!("'{text}' is not a duration (e.g. 10m, 90s, 1h)");
    let n: u64 = num.parse().map_err(|_| bad())?;
    let ms = match unit.trim() {
        "ms" => Some(n),
        "" | "s" => n.checked_mul(1000),
        "m" | "min" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        _ => return Err(bad()),
    };
    ms.map(std::time::Duration::from_millis)
        .ok_or_else(|| format!("'{text}' is too long"))
}

/// Validates the `limits:` section (absent: the defaults).
fn validate_limits(file: &str, section: Option<&Value>) -> Result<Limits, ConfigError> {
    let mut limits = Limits::default();
    let err = |key: &str, message: String| ConfigError::Invalid {
        file: file.to_string(),
        key: format!("limits.{key}"),
        message,
    };
    let map = match section {
        None | Some(Value::Null) => return Ok(limits),
        Some(Value::Object(m)) => m,
        Some(v) => {
            return Err(ConfigError::Invalid {
                file: file.to_string(),
                key: "limits".into(),
                message: format!("{v} is not a section of keys"),
            });
        }
    };
    // A value as text (YAML numbers and strings alike).
    let text = |key: &str, v: &Value| -> Result<String, ConfigError> {
        match v {
            Value::String(s) => Ok(s.clone()),
            Value::Number(n) => Ok(n.to_string()),
            v => Err(err(key, format!("{v} is not a value"))),
        }
    };
    let size = |key: &str, v: &Value, min: u64| -> Result<u64, ConfigError> {
        let n = parse_size(&text(key, v)?).map_err(|m| err(key, m))?;
        if n < min {
            return Err(err(key, format!("must be at least {}", format_size(min))));
        }
        Ok(n)
    };
    for (key, v) in map {
        match key.as_str() {
            "layer-unpacked-size" => limits.layer_unpacked_size = size(key, v, 1)?,
            "image-unpacked-size" => limits.image_unpacked_size = size(key, v, 1)?,
            "free-space-reserve" => {
                let t = text(key, v)?;
                limits.free_space_reserve = match t.trim().strip_suffix('%') {
                    Some(p) => Reserve::Percent(
                        p.trim()
                            .parse::<u8>()
                            .ok()
                            .filter(|p| *p < 100)
                            .ok_or_else(|| {
                                err(key, format!("'{t}' is not a percentage below 100%"))
                            })?,
                    ),
                    None => Reserve::Bytes(size(key, v, 0)?),
                }
            }
            "grpc-receive-size" => limits.grpc_receive_size = size(key, v, 1 << 20)?,
            "grpc-send-size" => limits.grpc_send_size = size(key, v, 1 << 20)?,
            "build-cache-size" => limits.build_cache_size = size(key, v, 0)?,
            "shells-per-user" => {
                let t = text(key, v)?;
                limits.shells_per_user = t
                    .trim()
                    .parse::<u32>()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| err(key, format!("'{t}' is not a positive integer")))?;
            }
            "save-prompt-timeout" => {
                let d = parse_duration(&text(key, v)?).map_err(|m| err(key, m))?;
                if d.is_zero() {
                    return Err(err(key, "must be longer than 0s".into()));
                }
                limits.save_prompt_timeout = d;
            }
            _ => {
                return Err(err(
                    key,
                    format!("unknown key (known: {})", LIMIT_KEYS.join(", ")),
                ));
            }
        }
    }
    Ok(limits)
}

impl ServerConfig {
    /// Configuration used when there is no file: the hub only.
    pub fn default_config() -> Self {
        Self {
            file: ServerConfigFile::default(),
            registries: vec![Registry::Hub(HubRegistry {
                description: "Public registry at hub.docker.com".into(),
                other: BTreeMap::new(),
            })],
            limits: Limits::default(),
            nodes: NodesConfig::default(),
            skipped: Vec::new(),
        }
    }

    /// Parses and validates the text of `file_name`.
    pub fn parse(file_name: &str, text: &str) -> Result<Self, ConfigError> {
        let file = ServerConfigFile::from_yaml(text).map_err(|e| ConfigError::Syntax {
            file: file_name.to_string(),
            message: e.to_string().lines().next().unwrap_or_default().to_string(),
        })?;
        let (registries, skipped) = match &file.registries {
            None => (Self::default_config().registries, Vec::new()),
            Some(entries) => validate_registries(file_name, entries)?,
        };
        let limits = validate_limits(file_name, file.other.get("limits"))?;
        let nodes = validate_nodes(file_name, file.other.get("nodes"))?;
        Ok(Self {
            file,
            registries,
            limits,
            nodes,
            skipped,
        })
    }

    pub fn registry(&self, label: &str) -> Option<&Registry> {
        self.registries.iter().find(|r| r.label() == label)
    }
}

/// The registries walt uses, and those it skips.
fn validate_registries(
    file: &str,
    entries: &[RegistryEntry],
) -> Result<(Vec<Registry>, Vec<SkippedRegistry>), ConfigError> {
    let mut out = Vec::new();
    let mut skipped = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let err = |key: &str, message: String| ConfigError::Invalid {
            file: file.to_string(),
            key: format!("registries[{i}].{key}"),
            message,
        };
        let api = e
            .api
            .as_deref()
            .ok_or_else(|| err("api", "missing".into()))?;
        let description = e.description.clone().unwrap_or_default();
        match api {
            "docker-hub" => {
                if let Some(l) = e.label.as_deref().filter(|l| *l != "hub") {
                    return Err(err(
                        "label",
                        format!("the docker-hub registry must be labelled 'hub', not '{l}'"),
                    ));
                }
                let mut other: BTreeMap<String, String> = e
                    .other
                    .iter()
                    .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_string())))
                    .collect();
                // An extra CA for hub endpoints (mirrors, tests).
                if let Some(ca) = &e.ca_file {
                    other.insert("ca-file".into(), ca.clone());
                }
                out.push(Registry::Hub(HubRegistry { description, other }));
            }
            "docker-registry-v2" | "jfrog-artifactory" => {
                let repository = match (api, e.repository.as_deref()) {
                    ("jfrog-artifactory", Some(r)) if valid_repository(r) => Some(r.to_string()),
                    ("jfrog-artifactory", r) => {
                        skipped.push(SkippedRegistry {
                            label: e.label.clone().unwrap_or_else(|| format!("registries[{i}]")),
                            api: api.to_string(),
                            reason: match r {
                                None => "jfrog-artifactory without a repository".into(),
                                Some(r) => format!(
                                    "repository '{r}' is not a repository name (lowercase letters, digits, '.', '_', '-')"
                                ),
                            },
                        });
                        continue;
                    }
                    _ => None,
                };
                let label = e
                    .label
                    .clone()
                    .ok_or_else(|| err("label", "missing".into()))?;
                if label.is_empty()
                    || !label
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                {
                    return Err(err(
                        "label",
                        format!("'{label}' must use only lowercase letters, digits and '-'"),
                    ));
                }
                if RESERVED_LABELS.contains(&label.as_str()) {
                    return Err(err("label", format!("'{label}' is reserved")));
                }
                let host = e
                    .host
                    .clone()
                    .filter(|h| !h.is_empty())
                    .ok_or_else(|| err("host", "missing".into()))?;
                let port = match &e.port {
                    None => 443,
                    Some(Value::Number(n)) => n
                        .as_u64()
                        .and_then(|p| u16::try_from(p).ok())
                        .filter(|p| *p > 0)
                        .ok_or_else(|| err("port", format!("{n} is not a valid port")))?,
                    Some(Value::String(s)) => s
                        .parse::<u16>()
                        .ok()
                        .filter(|p| *p > 0)
                        .ok_or_else(|| err("port", format!("'{s}' is not an integer port")))?,
                    Some(v) => return Err(err("port", format!("{v} is not an integer port"))),
                };
                let protocol = match e.protocol.as_deref().unwrap_or("https") {
                    "https" => Protocol::Https,
                    "http" => Protocol::Http,
                    "https-no-verify" => Protocol::HttpsNoVerify,
                    p => {
                        return Err(err(
                            "protocol",
                            format!("'{p}' is not one of https, http, https-no-verify"),
                        ));
                    }
                };
                let auth = match e.auth.as_deref().unwrap_or("basic") {
                    "basic" => Auth::Basic,
                    "none" => Auth::None,
                    a => return Err(err("auth", format!("'{a}' is not one of basic, none"))),
                };
                out.push(Registry::V2(V2Registry {
                    label,
                    description,
                    host,
                    port,
                    protocol,
                    auth,
                    ca_file: e.ca_file.clone(),
                    repository,
                }));
            }
            other => skipped.push(SkippedRegistry {
                label: e.label.clone().unwrap_or_else(|| format!("registries[{i}]")),
                api: other.to_string(),
                reason: format!(
                    "api '{other}' is not supported (docker-hub, docker-registry-v2, jfrog-artifactory)"
                ),
            }),
        }
    }
    for (i, r) in out.iter().enumerate() {
        if out[..i].iter().any(|o| o.label() == r.label()) {
            return Err(ConfigError::Invalid {
                file: file.to_string(),
                key: format!("registries[{i}].label"),
                message: format!("label '{}' is used twice", r.label()),
            });
        }
    }
    Ok((out, skipped))
}

/// A JFrog repository name: one path component of a v2 repository name.
fn valid_repository(r: &str) -> bool {
    !r.is_empty()
        && r.len() <= 128
        && r.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'_' || b == b'-'
        })
        && r.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && r.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric())
}

#[cfg(test)]
mod tests {
    use super::*;

    const WALT_FILE: &str = r#"
# WalT server configuration file.
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
vpn:
    enabled: false
"#;

    #[test]
    fn loads_walt_file_and_keeps_unknown_sections() {
        let c = ServerConfig::parse("server.conf", WALT_FILE).unwrap();
        assert_eq!(c.registries.len(), 2);
        let Registry::V2(r) = &c.registries[1] else {
            panic!()
        };
        assert_eq!(r.base_url(), "https://registry.example.org:5000");
        assert_eq!(r.auth, Auth::Basic);
        assert!(c.file.other.contains_key("vpn"));
        assert!(c.file.network.is_some());
    }

    #[test]
    fn defaults_and_errors() {
        let c = ServerConfig::parse("f", "network: {}\n").unwrap();
        assert_eq!(c.registries, ServerConfig::default_config().registries);
        let e = ServerConfig::parse(
            "f",
            "registries:\n- {label: Bad, api: docker-registry-v2, host: h}\n",
        )
        .unwrap_err();
        assert!(e.to_string().starts_with("f: registries[0].label:"), "{e}");
        let e = ServerConfig::parse(
            "f",
            "registries:\n- {label: x, api: docker-registry-v2, host: h, port: abc}\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("port"), "{e}");
        let e = ServerConfig::parse("f", "registries: [\n").unwrap_err();
        assert!(matches!(e, ConfigError::Syntax { .. }));
        let e = ServerConfig::parse(
            "f",
            "registries:\n- {label: walt, api: docker-registry-v2, host: h}\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("reserved"), "{e}");
    }

    #[test]
    fn limits_section() {
        let c = ServerConfig::parse("f", WALT_FILE).unwrap();
        assert_eq!(c.limits, Limits::default());
        let text = "limits:\n  layer-unpacked-size: 1G\n  image-unpacked-size: 3GiB\n  \
                    free-space-reserve: 5%\n  grpc-send-size: 16M\n  shells-per-user: 2\n  \
                    save-prompt-timeout: 2s\n";
        let c = ServerConfig::parse("f", text).unwrap();
        assert_eq!(c.limits.layer_unpacked_size, 1 << 30);
        assert_eq!(c.limits.image_unpacked_size, 3 << 30);
        assert_eq!(c.limits.free_space_reserve, Reserve::Percent(5));
        assert_eq!(c.limits.free_space_reserve.bytes(1000), 50);
        assert_eq!(c.limits.grpc_send_size, 16 << 20);
        assert_eq!(c.limits.grpc_receive_size, 4 << 20);
        assert_eq!(c.limits.shells_per_user, 2);
        assert_eq!(
            c.limits.save_prompt_timeout,
            std::time::Duration::from_secs(2)
        );
        // Kept as written, for walt-server-setup.
        assert!(c.file.other.contains_key("limits"));
        let c = ServerConfig::parse("f", "limits:\n  free-space-reserve: 0\n").unwrap();
        assert_eq!(c.limits.free_space_reserve, Reserve::Bytes(0));

        for (text, key) in [
            (
                "limits:\n  layer-unpacked-size: 12X\n",
                "limits.layer-unpacked-size:",
            ),
            (
                "limits:\n  image-unpacked-size: 0\n",
                "limits.image-unpacked-size:",
            ),
            (
                "limits:\n  free-space-reserve: 120%\n",
                "limits.free-space-reserve:",
            ),
            (
                "limits:\n  grpc-receive-size: 10K\n",
                "limits.grpc-receive-size:",
            ),
            (
                "limits:\n  shells-per-user: -1\n",
                "limits.shells-per-user:",
            ),
            (
                "limits:\n  save-prompt-timeout: soon\n",
                "limits.save-prompt-timeout:",
            ),
            ("limits:\n  shells: 3\n", "limits.shells:"),
            ("limits: 3\n", "limits:"),
        ] {
            let e = ServerConfig::parse("f", text).unwrap_err();
            assert!(e.to_string().starts_with(&format!("f: {key}")), "{e}");
        }
    }

    #[test]
    fn nodes_section() {
        let c = ServerConfig::parse("f", WALT_FILE).unwrap();
        assert_eq!(c.nodes.unmount_grace, std::time::Duration::from_secs(60));
        assert_eq!(
            walt_net_ip(&c.file),
            Some((std::net::Ipv4Addr::new(192, 168, 212, 1), 24))
        );
        let c = ServerConfig::parse("f", "nodes:\n  unmount-grace: 500ms\n").unwrap();
        assert_eq!(c.nodes.unmount_grace, std::time::Duration::from_millis(500));
        assert!(c.file.other.contains_key("nodes"));
        assert_eq!(walt_net_ip(&c.file), None);
        let c = ServerConfig::parse("f", "nodes:\n  unmount-grace: 0\n").unwrap();
        assert!(c.nodes.unmount_grace.is_zero());
        for (text, key) in [
            ("nodes:\n  unmount-grace: soon\n", "nodes.unmount-grace:"),
            ("nodes:\n  unmount-grace: 200h\n", "nodes.unmount-grace:"),
            ("nodes:\n  grace: 3s\n", "nodes.grace:"),
            ("nodes: 3\n", "nodes:"),
        ] {
            let e = ServerConfig::parse("f", text).unwrap_err();
            assert!(e.to_string().starts_with(&format!("f: {key}")), "{e}");
        }
        let c = ServerConfig::parse("f", "network:\n  walt-net:\n    ip: dhcp\n").unwrap();
        assert_eq!(walt_net_ip(&c.file), None);
    }

    /// As WalT's `walt-server-setup --edit-conf` writes it (regconf.py,
    /// conf.py: 4-space indent, category comments, keys in insertion order).
    const WALT_JFROG_FILE: &str = r#"
# WalT server configuration file.
# Run 'walt-server-setup --edit-conf' to update.

# network configuration
# ---------------------
network:
    walt-net:
        raw-device: null
        ip: 192.168.212.1/24

# image registries
# ----------------
registries:
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
    description: Some future kind
    host: gitlab.example.org

# VPN configuration
# -----------------
vpn:
    enabled: true
    ssh-entrypoint: vpn.example.org
    http-entrypoint: http://vpn.example.org
    boot-mode: nbfs
zzz-first:
    b: 1
    a: 2
aaa-last: x
"#;

    #[test]
    fn jfrog_and_unknown_api_never_refused() {
        let c = ServerConfig::parse("server.conf", WALT_JFROG_FILE).unwrap();
        assert_eq!(c.registries.len(), 2, "{:?}", c.registries);
        let Registry::V2(r) = &c.registries[1] else {
            panic!("{:?}", c.registries[1])
        };
        assert_eq!(r.label, "art");
        assert_eq!(r.repository.as_deref(), Some("walt-images"));
        assert_eq!(r.base_url(), "https://jfrog.example.org:443");
        assert_eq!(r.auth, Auth::Basic);
        assert_eq!(c.skipped.len(), 1);
        assert_eq!(
            c.skipped[0].warning(),
            "registry 'gl' skipped: api 'gitlab-registry' is not supported (docker-hub, docker-registry-v2, jfrog-artifactory)"
        );
        // Kept in the file as written.
        let entries = c.file.registries.as_ref().unwrap();
        assert_eq!(entries.len(), 3);
        assert_eq!(entries[2].api.as_deref(), Some("gitlab-registry"));
        assert_eq!(entries[1].repository.as_deref(), Some("walt-images"));
        // A jfrog entry without a usable repository is skipped too.
        for (repo, reason) in [
            ("", "without a repository"),
            ("    repository: Bad/Repo\n", "is not a repository name"),
        ] {
            let text = format!(
                "registries:\n-   label: art\n    api: jfrog-artifactory\n    description: d\n    host: h\n{repo}"
            );
            let c = ServerConfig::parse("f", &text).unwrap();
            assert!(c.registries.is_empty());
            assert!(c.skipped[0].warning().contains(reason), "{:?}", c.skipped);
        }
    }

    #[test]
    fn unknown_sections_keep_their_key_order() {
        let c = ServerConfig::parse("server.conf", WALT_JFROG_FILE).unwrap();
        let text = serde_saphyr::to_string(&c.file).unwrap();
        let keys: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with([' ', '-']))
            .collect();
        assert_eq!(
            keys,
            [
                "network:",
                "registries:",
                "vpn:",
                "zzz-first:",
                "aaa-last: x"
            ],
            "{text}"
        );
        let vpn = text.split("vpn:\n").nth(1).unwrap();
        let vpn_keys: Vec<&str> = vpn
            .lines()
            .take(4)
            .map(|l| l.trim().split(':').next().unwrap())
            .collect();
        assert_eq!(
            vpn_keys,
            ["enabled", "ssh-entrypoint", "http-entrypoint", "boot-mode"],
            "{text}"
        );
        assert!(text.contains("zzz-first:\n  b: 1\n  a: 2\n"), "{text}");
        // WalT's registry key order, repository last.
        let art = text.split("label: art").nth(1).unwrap();
        let order: Vec<usize> = [
            "api:",
            "description:",
            "host:",
            "port:",
            "protocol:",
            "auth:",
            "repository:",
        ]
        .iter()
        .map(|k| art.find(k).unwrap())
        .collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{text}");
        // What is written reads back the same.
        let again = ServerConfig::parse("f", &text).unwrap();
        assert_eq!(again.file, c.file);
        assert_eq!(serde_saphyr::to_string(&again.file).unwrap(), text);
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("100"), Ok(100));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("64G"), Ok(64 << 30));
        assert_eq!(parse_size("2 MiB"), Ok(2 << 20));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert!(parse_size("G").is_err());
        assert!(parse_size("1.5G").is_err());
        assert!(parse_size("99999999999T").is_err());
        assert_eq!(format_size(64 << 30), "64G");
        assert_eq!(format_size(1000), "1000");
        use std::time::Duration;
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert!(parse_duration("1d").is_err());
        assert!(parse_duration("").is_err());
    }
}
