//! The server configuration file (`/etc/walt/server.conf`), WalT format.
//!
//! Sections walt does not use are kept as they are (so an existing WalT
//! file loads unchanged and is written back unchanged); the registries list
//! is parsed and validated into [`Registry`] values.

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
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct ServerConfigFile {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registries: Option<Vec<RegistryEntry>>,
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
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

/// A validated `docker-registry-v2` registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct V2Registry {
    pub label: String,
    pub description: String,
    pub host: String,
    pub port: u16,
    pub protocol: Protocol,
    pub auth: Auth,
    pub ca_file: Option<String>,
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

/// The loaded configuration: the file as written plus validated registries.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    pub file: ServerConfigFile,
    pub registries: Vec<Registry>,
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
        }
    }

    /// Parses and validates the text of `file_name`.
    pub fn parse(file_name: &str, text: &str) -> Result<Self, ConfigError> {
        let file: ServerConfigFile = if text.trim().is_empty() {
            ServerConfigFile::default()
        } else {
            serde_saphyr::from_str(text).map_err(|e| ConfigError::Syntax {
                file: file_name.to_string(),
                message: e.to_string().lines().next().unwrap_or_default().to_string(),
            })?
        };
        let registries = match &file.registries {
            None => Self::default_config().registries,
            Some(entries) => validate_registries(file_name, entries)?,
        };
        Ok(Self { file, registries })
    }

    pub fn registry(&self, label: &str) -> Option<&Registry> {
        self.registries.iter().find(|r| r.label() == label)
    }
}

fn validate_registries(
    file: &str,
    entries: &[RegistryEntry],
) -> Result<Vec<Registry>, ConfigError> {
    let mut out = Vec::new();
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
            "docker-registry-v2" => {
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
                }));
            }
            other => {
                return Err(err(
                    "api",
                    format!("unknown registry api '{other}' (docker-hub or docker-registry-v2)"),
                ));
            }
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
    Ok(out)
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
}
