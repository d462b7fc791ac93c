//! `walt node ...` and `walt device ...`, and the welcome call made before
//! every command.
//!
//! A node belongs to the user whose image it boots; a node booting a
//! default image (owner `waltplatform`) is free.

use anyhow::{anyhow, bail};
use clap::Subcommand;
use tonic::Code;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use walt_proto::v1::{self as pb, nodes_client::NodesClient};

use crate::config;
use crate::image::{UserInterceptor, connect_channel, status_error};
use crate::prompt;
use crate::table;

#[derive(Subcommand, Debug, Clone)]
pub enum NodeCommand {
    /// Show your nodes (those booting your images).
    Show {
        /// Also show free nodes, the nodes of other users and the devices
        /// that are not nodes (with why).
        #[arg(long)]
        all: bool,
        /// Print only the node names, one per line.
        #[arg(long)]
        names_only: bool,
    },
    /// Make nodes boot an image of your working set, or `default` (each
    /// node its model's default image: the node becomes free).
    Boot {
        /// Take nodes that boot images of other users without asking.
        #[arg(long)]
        yes: bool,
        /// A node name, a comma-separated list, my-nodes, free-nodes or all.
        node_set: String,
        /// <name>[:<tag>] of your working set, or `default`.
        image: String,
    },
    /// Rename a node.
    Rename { name: String, new_name: String },
    /// Create a virtual node (a qemu PC on the walt network, run by the
    /// server; it boots the default image of pc-x86-64).
    Create { node_name: String },
    /// Remove a virtual node.
    Remove { node_name: String },
    /// Reboot a (set of) node(s) (walt reboots virtual nodes: a power-cycle).
    Reboot {
        /// Power-cycle only (virtual nodes are always power-cycled).
        #[arg(long)]
        hard: bool,
        /// A node name, a comma-separated list, my-nodes, free-nodes or all.
        node_set: String,
    },
    /// Get or set the configuration of nodes (virtual nodes: cpu.cores=<n>,
    /// ram=<n>M|<n>G, disks=none|<n>G[,<n>T...]); in effect at their next boot.
    Config {
        /// A node name, a comma-separated list, my-nodes, free-nodes or all.
        node_set: String,
        /// <setting>=<value>... (none: show the configuration).
        configuration: Vec<String>,
    },
    /// Connect to the serial console of a virtual node (<ctrl-a> d to
    /// quit, <ctrl-a> a to send <ctrl-a>).
    Console { node_name: String },
}

#[derive(Subcommand, Debug, Clone)]
pub enum DeviceCommand {
    /// Show every device of the walt network, with why those that are not
    /// nodes are not.
    Show,
}

pub(crate) type Client = NodesClient<InterceptedService<Channel, UserInterceptor>>;

async fn connect() -> anyhow::Result<(Client, config::Settings)> {
    let settings = config::load()?;
    let (channel, user) = connect_channel(&settings).await?;
    Ok((NodesClient::with_interceptor(channel, user), settings))
}

/// Asks the server for the default images of the models present that the
/// user was not given yet, and says which it copied (on stderr). A server
/// without the node API, or one that cannot be reached (the command itself
/// then says so), is not an error here.
pub async fn welcome(channel: Channel, user: UserInterceptor) {
    let mut client = NodesClient::with_interceptor(channel, user);
    match client.welcome(pb::WelcomeRequest {}).await {
        Ok(reply) => {
            for m in reply.into_inner().messages {
                eprintln!("{}", walt_core::text::neutralize(&m));
            }
        }
        Err(s) if matches!(s.code(), Code::Unimplemented | Code::Unavailable) => {}
        Err(s) => eprintln!(
            "warning: default images not checked: {}",
            walt_core::text::one_line(s.message())
        ),
    }
}

pub async fn run(cmd: NodeCommand) -> anyhow::Result<()> {
    let (mut client, settings) = connect().await?;
    match cmd {
        NodeCommand::Show { all, names_only } => {
            show(&mut client, &settings.username, all, names_only).await
        }
        NodeCommand::Boot {
            yes,
            node_set,
            image,
        } => boot(&mut client, &node_set, &image, yes).await,
        NodeCommand::Rename { name, new_name } => {
            client
                .rename(pb::NodeRenameRequest {
                    name: name.clone(),
                    new_name: new_name.clone(),
                })
                .await
                .map_err(status_error)?;
            println!("Node {name} renamed to {new_name}.");
            Ok(())
        }
        NodeCommand::Create { node_name } => {
            let reply = client
                .create_vnode(pb::VnodeCreateRequest { name: node_name })
                .await
                .map_err(status_error)?;
            println!(
                "{}",
                walt_core::text::neutralize(&reply.into_inner().message)
            );
            Ok(())
        }
        NodeCommand::Remove { node_name } => {
            client
                .remove_vnode(pb::VnodeRemoveRequest {
                    name: node_name.clone(),
                })
                .await
                .map_err(status_error)?;
            println!("Node {node_name} removed.");
            Ok(())
        }
        NodeCommand::Reboot { hard, node_set } => {
            let reply = client
                .reboot(pb::NodeRebootRequest { node_set, hard })
                .await
                .map_err(status_error)?;
            for line in reply.into_inner().message.lines() {
                let line = walt_core::text::neutralize(line);
                if line.starts_with("warning: ") {
                    eprintln!("{line}");
                } else {
                    println!("{line}");
                }
            }
            Ok(())
        }
        NodeCommand::Config {
            node_set,
            configuration,
        } => {
            let reply = client
                .config(pb::NodeConfigRequest {
                    node_set,
                    settings: configuration,
                })
                .await
                .map_err(status_error)?;
            println!(
                "{}",
                walt_core::text::neutralize(&reply.into_inner().message)
            );
            Ok(())
        }
        NodeCommand::Console { node_name } => {
            crate::console::console(&mut client, &node_name).await
        }
    }
}

pub async fn run_device(cmd: DeviceCommand) -> anyhow::Result<()> {
    let (mut client, _) = connect().await?;
    match cmd {
        DeviceCommand::Show => device_show(&mut client).await,
    }
}

/// A titled table, WalT's paragraph: the title, a blank line, the table.
fn section(out: &mut String, title: &str, header: &[&str], rows: &[Vec<String>]) {
    if !out.is_empty() {
        out.push('\n');
    }
    out.push_str(title);
    out.push_str("\n\n");
    out.push_str(&table::render(header, rows));
}

fn note(out: &mut String, text: &str) {
    if !out.is_empty() {
        out.push('\n');
    }
    out.push_str(text);
    out.push('\n');
}

const NOT_NODES: &str = "The following devices were detected but are not nodes:";

/// A column of a device table: its header and how a device fills it.
type Column = (&'static str, fn(&pb::DeviceInfo) -> String);

const NAME: Column = ("NAME", |d| d.name.clone());
const MODEL: Column = ("MODEL", |d| d.model.clone());
const IMAGE: Column = ("IMAGE", |d| d.image.clone());
const IMAGE_OWNER: Column = ("IMAGE OWNER", |d| d.image_owner.clone());
const LINK: Column = ("CLONABLE IMAGE LINK", |d| d.clonable_image_link.clone());
const IP: Column = ("IP", |d| d.ip.clone());
const MAC: Column = ("MAC", |d| d.mac.clone());
const TYPE: Column = ("TYPE", |d| d.r#type.clone());
const REASON: Column = ("REASON", |d| d.reason.clone());

/// A titled table of `devices` with these columns.
fn device_section<'a>(
    out: &mut String,
    title: &str,
    devices: impl IntoIterator<Item = &'a pb::DeviceInfo>,
    columns: &[Column],
) {
    let header: Vec<&str> = columns.iter().map(|c| c.0).collect();
    let rows: Vec<Vec<String>> = devices
        .into_iter()
        .map(|d| columns.iter().map(|c| (c.1)(d)).collect())
        .collect();
    section(out, title, &header, &rows);
}

async fn show(client: &mut Client, user: &str, all: bool, names_only: bool) -> anyhow::Result<()> {
    let reply = client
        .show(pb::NodeShowRequest {
            all,
            devices: all && !names_only,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    if names_only {
        for n in &reply.nodes {
            if all || n.image_owner == user {
                println!("{}", walt_core::text::one_line(&n.name));
            }
        }
        return Ok(());
    }
    let mut mine = Vec::new();
    let mut free = Vec::new();
    let mut others = Vec::new();
    for n in reply.nodes {
        if n.image_owner == user {
            mine.push(n);
        } else if n.image_owner == walt_core::DEFAULT_IMAGES_OWNER {
            free.push(n);
        } else {
            others.push(n);
        }
    }
    let mut out = String::new();
    if !mine.is_empty() {
        device_section(
            &mut out,
            "You currently own the following nodes:",
            &mine,
            &[NAME, MODEL, IMAGE, IP, MAC],
        );
    }
    if !all {
        if mine.is_empty() {
            note(&mut out, "You currently do not own any nodes.");
        }
        note(&mut out, "Re-run with --all to see all available nodes.");
        print!("{out}");
        return Ok(());
    }
    if mine.is_empty() && free.is_empty() && others.is_empty() {
        note(&mut out, "No nodes detected!");
    }
    if !free.is_empty() {
        device_section(
            &mut out,
            "The following nodes are currently free:",
            &free,
            &[NAME, MODEL, IP, MAC],
        );
    }
    if !others.is_empty() {
        device_section(
            &mut out,
            "The following nodes currently belong to other users:",
            &others,
            &[NAME, MODEL, IMAGE_OWNER, LINK, IP, MAC],
        );
    }
    if !mine.is_empty() && free.is_empty() && others.is_empty() {
        note(
            &mut out,
            "No other nodes were detected (apart from the ones listed above).",
        );
    }
    if !reply.devices.is_empty() {
        device_section(
            &mut out,
            NOT_NODES,
            &reply.devices,
            &[NAME, MODEL, IP, MAC, REASON],
        );
    }
    print!("{out}");
    Ok(())
}

async fn device_show(client: &mut Client) -> anyhow::Result<()> {
    let reply = client
        .show(pb::NodeShowRequest {
            all: true,
            devices: true,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let mut out = String::new();
    if reply.nodes.is_empty() && reply.devices.is_empty() {
        note(&mut out, "No devices detected.");
    }
    if !reply.nodes.is_empty() {
        device_section(
            &mut out,
            "The walt network contains the following nodes:",
            &reply.nodes,
            &[NAME, IP, MAC, TYPE, MODEL],
        );
    }
    if !reply.devices.is_empty() {
        device_section(
            &mut out,
            NOT_NODES,
            &reply.devices,
            &[NAME, MODEL, IP, MAC, REASON],
        );
    }
    print!("{out}");
    Ok(())
}

/// `a`, `a and b`, `a, b and c`.
fn list_names(names: &[String]) -> String {
    match names {
        [] => String::new(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}

async fn boot(client: &mut Client, node_set: &str, image: &str, yes: bool) -> anyhow::Result<()> {
    let mut req = pb::NodeBootRequest {
        node_set: node_set.to_string(),
        image: image.to_string(),
        confirmed: yes,
    };
    let mut reply = client
        .boot(req.clone())
        .await
        .map_err(status_error)?
        .into_inner();
    if !reply.owned_by_others.is_empty() {
        let names: Vec<String> = reply
            .owned_by_others
            .iter()
            .map(|n| walt_core::text::one_line(n).into_owned())
            .collect();
        let (what, verb) = if names.len() == 1 {
            ("node", "boots")
        } else {
            ("nodes", "boot")
        };
        let list = list_names(&names);
        if !prompt::interactive() {
            bail!(
                "{what} {list} {verb} images of other users: nothing changed \
                 (use walt node boot --yes {node_set} {image} to take {} anyway)",
                if names.len() == 1 { "it" } else { "them" }
            );
        }
        eprintln!("warning: {what} {list} {verb} images of other users.");
        let answer = prompt::ask_line("Boot your image on them anyway? (y/n): ")?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            return Err(anyhow!("nothing changed (answered no)"));
        }
        req.confirmed = true;
        reply = client.boot(req).await.map_err(status_error)?.into_inner();
    }
    if !reply.message.is_empty() {
        println!("{}", walt_core::text::neutralize(&reply.message));
    }
    Ok(())
}
