//! `--edit-conf`: the interactive configuration editor (network settings,
//! then image registries). The rules live in `model`; this module only asks.

use std::fmt;
use std::io::IsTerminal;

use anyhow::bail;
use inquire::error::InquireError;
use inquire::validator::Validation;
use inquire::{Confirm, Select, Text};
use walt_core::config::RegistryEntry;

use crate::model::{
    self, AUTHS, Config, NewRegistry, PROTOCOLS, Status, check_description, check_host,
    check_host_port_unique, check_label, check_repository_name, describe, entry_label, entry_port,
    is_hub, is_jfrog, is_used, parse_port, system_resolver,
};

const HELP: &str = "\
Registries are where users find images to clone: `walt image clone LABEL:user/image`.
- The Docker Hub (label 'hub') can be enabled or disabled.
- Other registries use the docker-registry-v2 API (distribution, Harbor, Zot, GHCR...):
  a label ([a-z0-9-], not hub/walt/docker), a short description (at most 35
  characters), a host that resolves, a port, a protocol (https, http, or
  https-no-verify for self-signed certificates) and an authentication (basic:
  users give their credentials to the walt client; none: anonymous).
- A JFrog Artifactory instance (api jfrog-artifactory) is a docker-registry-v2
  registry whose images all live under one repository (clone URLs
  LABEL:REPOSITORY/image); several may share a host:port with different repositories.
- Entries of another api (written by a later WalT) are kept as they are; the
  server skips them with a warning.
- Only one registry per host:port.
Press Esc to abort a prompt. 'Validate and quit' appears once the configuration is OK.";

/// What the user chose at the end.
pub enum Outcome {
    Save(Config),
    Discard,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Action {
    Edit,
    Remove,
    ToggleHub(bool),
    Add,
    AddJfrog,
    Help,
    Discard,
    Validate,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Edit => "Edit a registry",
            Action::Remove => "Remove a registry",
            Action::ToggleHub(true) => "Disable the Docker Hub",
            Action::ToggleHub(false) => "Enable the Docker Hub",
            Action::Add => "Connect a new registry",
            Action::AddJfrog => "Connect a JFrog Artifactory instance",
            Action::Help => "Help",
            Action::Discard => "Discard changes and quit",
            Action::Validate => "Validate and quit",
        })
    }
}

/// Turns an inquire error into Ok(None) for Esc and an error otherwise.
fn skippable<T>(r: Result<Option<T>, InquireError>) -> anyhow::Result<Option<T>> {
    match r {
        Ok(v) => Ok(v),
        Err(InquireError::OperationCanceled) => Ok(None),
        Err(InquireError::OperationInterrupted) => bail!("interrupted: nothing was written"),
        Err(e) => bail!("terminal error: {e}"),
    }
}

fn validation(r: Result<(), String>) -> Result<Validation, inquire::CustomUserError> {
    Ok(match r {
        Ok(()) => Validation::Valid,
        Err(m) => Validation::Invalid(m.into()),
    })
}

pub fn run(original: Config) -> anyhow::Result<Outcome> {
    if !std::io::stdin().is_terminal() || !std::io::stdout().is_terminal() {
        bail!(
            "--edit-conf is interactive and needs a terminal; in scripts use `walt-server-setup registry list|add|remove`"
        );
    }
    let mut config = original.clone();
    network(&mut config)?;
    loop {
        print_registries(&config);
        let status = config.status(&system_resolver);
        println!("Status: {status}\n");
        let mut actions = Vec::new();
        let has_v2 = config.registries().iter().any(|e| !is_hub(e) && is_used(e));
        if has_v2 {
            actions.extend([Action::Edit, Action::Remove]);
        }
        actions.extend([
            Action::ToggleHub(config.hub_enabled()),
            Action::Add,
            Action::AddJfrog,
            Action::Help,
            Action::Discard,
        ]);
        if status == Status::Ok {
            actions.push(Action::Validate);
        }
        let Some(action) = skippable(
            Select::new("What do you want to do?", actions)
                .without_filtering()
                .with_page_size(10)
                .prompt_skippable(),
        )?
        else {
            continue;
        };
        match action {
            Action::Edit => {
                if let Some(i) = pick_registry(&config, "Registry to edit:")? {
                    edit(&mut config, i)?;
                }
            }
            Action::Remove => {
                if let Some(i) = pick_registry(&config, "Registry to remove:")? {
                    let label = entry_label(&config.registries()[i]);
                    config.remove(&label).map_err(anyhow::Error::msg)?;
                }
            }
            Action::ToggleHub(enabled) => config.set_hub(!enabled),
            Action::Add => add(&mut config, None)?,
            Action::AddJfrog => add(&mut config, Some(String::new()))?,
            Action::Help => println!("\n{HELP}\n"),
            Action::Discard => {
                if config == original
                    || skippable(
                        Confirm::new("Discard your changes?")
                            .with_default(false)
                            .prompt_skippable(),
                    )?
                    .unwrap_or(false)
                {
                    return Ok(Outcome::Discard);
                }
            }
            Action::Validate => return Ok(Outcome::Save(config)),
        }
    }
}

fn network(config: &mut Config) -> anyhow::Result<()> {
    let (raw, ip) = config.walt_net();
    println!(
        "Network settings (walt-net): raw-device {}, ip {}",
        raw.as_deref().unwrap_or("none (virtual network)"),
        ip.as_deref().unwrap_or("not set")
    );
    let raw_now = raw.clone().unwrap_or_default();
    let new_raw = skippable(
        Text::new("walt-net raw device (empty: none, virtual network):")
            .with_initial_value(&raw_now)
            .prompt_skippable(),
    )?;
    let ip_now = ip.clone().unwrap_or_default();
    let new_ip = skippable(
        Text::new("walt-net IP address (CIDR, e.g. 192.168.212.1/24):")
            .with_initial_value(&ip_now)
            .with_validator(|s: &str| validation(check_cidr(s)))
            .prompt_skippable(),
    )?;
    let raw2 = new_raw
        .map(|s| s.trim().to_string())
        .map(|s| (!s.is_empty()).then_some(s))
        .unwrap_or(raw);
    let ip2 = new_ip
        .map(|s| s.trim().to_string())
        .map(|s| (!s.is_empty()).then_some(s))
        .unwrap_or(ip);
    if config.walt_net() != (raw2.clone(), ip2.clone()) {
        config.set_walt_net(raw2, ip2);
    }
    Ok(())
}

/// `a.b.c.d/n` (empty: unset).
fn check_cidr(s: &str) -> Result<(), String> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(());
    }
    let ok = s.split_once('/').is_some_and(|(ip, n)| {
        ip.parse::<std::net::IpAddr>().is_ok() && n.parse::<u8>().is_ok_and(|n| n <= 128)
    });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "'{s}' is not an address/prefix such as 192.168.212.1/24"
        ))
    }
}

fn print_registries(config: &Config) {
    println!();
    println!(
        "{:<12} {:<20} {:<36} CONFIGURATION",
        "LABEL", "API", "DESCRIPTION"
    );
    for e in config.registries() {
        let (api, desc, conf) = describe(&e);
        println!("{:<12} {api:<20} {desc:<36} {conf}", entry_label(&e));
    }
    if config.registries().is_empty() {
        println!("(no registry)");
    }
    println!();
}

/// Index (in `registries()`) of a docker-registry-v2 registry the user picks.
fn pick_registry(config: &Config, msg: &str) -> anyhow::Result<Option<usize>> {
    let regs = config.registries();
    let labels: Vec<String> = regs
        .iter()
        .filter(|e| !is_hub(e) && is_used(e))
        .map(entry_label)
        .collect();
    let Some(label) = skippable(Select::new(msg, labels).prompt_skippable())? else {
        return Ok(None);
    };
    Ok(regs.iter().position(|e| entry_label(e) == label))
}

/// The properties of a registry, asked one per prompt. None: aborted (Esc).
fn ask(
    all: &[RegistryEntry],
    index: Option<usize>,
    current: &NewRegistry,
) -> anyhow::Result<Option<NewRegistry>> {
    let others: Vec<RegistryEntry> = all.to_vec();
    let Some(label) = skippable(
        Text::new("Label:")
            .with_initial_value(&current.label)
            .with_help_message("used in clone URLs: LABEL:user/image")
            .with_validator(move |s: &str| validation(check_label(s.trim(), &others, index)))
            .prompt_skippable(),
    )?
    else {
        return Ok(None);
    };
    let Some(description) = skippable(
        Text::new("Description:")
            .with_initial_value(&current.description)
            .with_validator(|s: &str| validation(check_description(s.trim())))
            .prompt_skippable(),
    )?
    else {
        return Ok(None);
    };
    let Some(host) = skippable(
        Text::new("Host:")
            .with_initial_value(&current.host)
            .with_validator(|s: &str| validation(check_host(s.trim(), 443, &system_resolver)))
            .prompt_skippable(),
    )?
    else {
        return Ok(None);
    };
    let host = host.trim().to_string();
    let others: Vec<RegistryEntry> = all.to_vec();
    let h = host.clone();
    let port_now = current.port.to_string();
    // JFrog entries may share a host:port: checked with the repository.
    let jfrog = current.repository.is_some();
    let Some(port) = skippable(
        Text::new("Port:")
            .with_initial_value(&port_now)
            .with_validator(move |s: &str| {
                validation(parse_port(s).and_then(|p| {
                    if jfrog {
                        Ok(())
                    } else {
                        check_host_port_unique(&h, p, &others, index)
                    }
                }))
            })
            .prompt_skippable(),
    )?
    else {
        return Ok(None);
    };
    let port = parse_port(&port).map_err(anyhow::Error::msg)?;
    let start = PROTOCOLS
        .iter()
        .position(|p| *p == current.protocol)
        .unwrap_or(0);
    let Some(protocol) = skippable(
        Select::new("Protocol:", PROTOCOLS.to_vec())
            .with_starting_cursor(start)
            .without_filtering()
            .prompt_skippable(),
    )?
    else {
        return Ok(None);
    };
    let start = AUTHS.iter().position(|a| *a == current.auth).unwrap_or(0);
    let Some(auth) = skippable(
        Select::new("Authentication:", AUTHS.to_vec())
            .with_starting_cursor(start)
            .without_filtering()
            .prompt_skippable(),
    )?
    else {
        return Ok(None);
    };
    let repository = match &current.repository {
        None => None,
        Some(now) => {
            let Some(r) = skippable(
                Text::new("JFrog repository:")
                    .with_initial_value(now)
                    .with_help_message("the repository images are pushed to and pulled from")
                    .with_validator(|s: &str| validation(check_repository_name(s.trim())))
                    .prompt_skippable(),
            )?
            else {
                return Ok(None);
            };
            Some(r.trim().to_string())
        }
    };
    Ok(Some(NewRegistry {
        label: label.trim().to_string(),
        description: description.trim().to_string(),
        host,
        port,
        protocol: protocol.to_string(),
        auth: auth.to_string(),
        repository,
    }))
}

/// `repository`: Some for a JFrog Artifactory instance.
fn add(config: &mut Config, repository: Option<String>) -> anyhow::Result<()> {
    let blank = NewRegistry {
        label: String::new(),
        description: String::new(),
        host: String::new(),
        port: model::DEFAULT_PORT,
        protocol: model::DEFAULT_PROTOCOL.into(),
        auth: model::DEFAULT_AUTH.into(),
        repository,
    };
    if let Some(r) = ask(&config.registries(), None, &blank)?
        && let Err(e) = config.add(&r, &system_resolver)
    {
        println!("Not added: {e}");
    }
    Ok(())
}

fn edit(config: &mut Config, index: usize) -> anyhow::Result<()> {
    let regs = config.registries();
    let e = &regs[index];
    let current = NewRegistry {
        label: entry_label(e),
        description: e.description.clone().unwrap_or_default(),
        host: e.host.clone().unwrap_or_default(),
        port: entry_port(e).unwrap_or(model::DEFAULT_PORT),
        protocol: e
            .protocol
            .clone()
            .unwrap_or_else(|| model::DEFAULT_PROTOCOL.into()),
        auth: e.auth.clone().unwrap_or_else(|| model::DEFAULT_AUTH.into()),
        repository: is_jfrog(e).then(|| e.repository.clone().unwrap_or_default()),
    };
    if let Some(r) = ask(&regs, Some(index), &current)? {
        // Keep what the editor does not show (ca-file, unknown keys).
        let mut entry = r.to_entry();
        entry.ca_file = e.ca_file.clone();
        entry.other = e.other.clone();
        config.replace(index, entry);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr() {
        assert!(check_cidr("192.168.212.1/24").is_ok());
        assert!(check_cidr("").is_ok());
        assert!(check_cidr("192.168.212.1").is_err());
        assert!(check_cidr("dhcp/x").is_err());
    }
}
