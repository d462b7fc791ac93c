//! The commands of virtual nodes: `walt node create/remove/reboot/config`
//! and the console stream (the gRPC methods in [`super::service`] call
//! these).

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tokio::sync::broadcast::error::RecvError;
use tokio_stream::StreamExt;
use tonic::{Status, Streaming};

use walt_core::models::is_valid_device_name;
use walt_proto::v1 as pb;
use walt_store::{StoreError, VnodeConf};

use super::service::{nodes_phrase, resolve_node_set};
use super::vnode::{
    self, VNODE_MODEL, parse_cpu_cores, parse_disks, parse_ram, show_ram, vnode_mac,
};
use crate::State;
use crate::error::ServiceError;
use crate::images::blocking;

/// Settings per `walt node config` call.
const MAX_SETTINGS: usize = 16;
/// Keystrokes per console message.
const MAX_CONSOLE_INPUT: usize = 4096;

fn invalid_name(name: &str) -> ServiceError {
    ServiceError::InvalidArgument(format!(
        "invalid node name '{name}': a name is 1 to {} lower-case letters, digits or '-', \
         not starting with '-', and not all, my-nodes, server or walt-server",
        walt_core::models::MAX_DEVICE_NAME_LEN
    ))
}

/// `walt node create <name>`: the default image of `pc-x86-64` (fetched
/// once if missing), a device record that is already a node booting it,
/// and its qemu started.
pub async fn create(state: &Arc<State>, user: &str, name: &str) -> Result<String, ServiceError> {
    let name = name.trim().to_string();
    if !is_valid_device_name(&name) {
        return Err(invalid_name(&name));
    }
    let st = state.clone();
    let n = name.clone();
    if blocking(move || Ok(st.store.find_device(&n)?.is_some_and(|d| d.name == n))).await? {
        return Err(ServiceError::AlreadyExists(format!(
            "a device named '{name}' already exists (see walt device show)"
        )));
    }
    let image = super::defaults::ensure(state, VNODE_MODEL)
        .await
        .map_err(|reason| {
            ServiceError::FailedPrecondition(format!(
                "cannot create virtual node '{name}': the default image of {VNODE_MODEL} is not available: {reason}"
            ))
        })?;
    let st = state.clone();
    let (n, img) = (name.clone(), image.clone());
    let dev = blocking(move || {
        let now = walt_store::now_secs();
        for attempt in 0..64 {
            let mac = vnode_mac(&n, attempt);
            if st.store.find_device(&mac)?.is_some() {
                continue;
            }
            return match st.store.create_vnode(
                &n,
                &mac,
                VNODE_MODEL,
                &img,
                &vnode::default_conf(),
                now,
            ) {
                Ok(d) => Ok(d),
                Err(StoreError::DeviceExists(_)) => Err(ServiceError::AlreadyExists(format!(
                    "a device named '{n}' already exists (see walt device show)"
                ))),
                Err(e) => Err(e.into()),
            };
        }
        Err(ServiceError::FailedPrecondition(format!(
            "cannot create virtual node '{n}': no free MAC address derived from its name"
        )))
    })
    .await?;
    tracing::info!(
        user,
        name = %dev.name,
        mac = %dev.mac,
        "virtual node {} created, booting {image}",
        dev.name
    );
    state.nodes.changed();
    // Answer once qemu runs, so that a node that cannot start is reported
    // here (and not recorded) rather than left for the log to tell.
    let started = match state.nodes.vnodes.start(state, &dev.mac) {
        Some(rx) => rx
            .await
            .unwrap_or_else(|_| Err("its supervisor ended before starting qemu".into())),
        None => Ok(0),
    };
    if let Err(reason) = started {
        state.nodes.vnodes.stop(&dev.mac).await;
        let st = state.clone();
        let m = dev.mac.clone();
        blocking(move || {
            st.store.remove_vnode(&m)?;
            let _ = std::fs::remove_dir_all(vnode::vnode_dir(&st.nodes.paths.data_dir, &m));
            Ok(())
        })
        .await?;
        state.nodes.changed();
        return Err(ServiceError::FailedPrecondition(format!(
            "cannot create virtual node '{}': {reason}",
            dev.name
        )));
    }
    Ok(format!(
        "Node {} created: it boots the default image of {VNODE_MODEL}.\n\
         Use `walt node boot {} <image>` to boot another image, `walt node console {}` to see its console.",
        dev.name, dev.name, dev.name
    ))
}

/// The virtual node of that name (refused if it is none).
fn find_vnode(state: &State, name: &str) -> Result<walt_store::Vnode, ServiceError> {
    let dev = state
        .store
        .find_device(name)?
        .filter(|d| d.name == name)
        .ok_or_else(|| {
            ServiceError::NotFound(format!("no node named '{name}' (see walt node show --all)"))
        })?;
    state.store.get_vnode(&dev.mac)?.ok_or_else(|| {
        ServiceError::FailedPrecondition(format!("node '{name}' is not a virtual node"))
    })
}

/// `walt node remove <name>`: qemu stopped and its tap deleted, then the
/// records and files forgotten.
pub async fn remove(state: &Arc<State>, user: &str, name: &str) -> Result<(), ServiceError> {
    let name = name.trim().to_string();
    let st = state.clone();
    let n = name.clone();
    let v = blocking(move || find_vnode(&st, &n)).await?;
    let mac = v.device.mac.clone();
    state.nodes.vnodes.stop(&mac).await;
    let st = state.clone();
    let m = mac.clone();
    blocking(move || {
        st.store.remove_vnode(&m)?;
        let dir = vnode::vnode_dir(&st.nodes.paths.data_dir, &m);
        if let Err(e) = std::fs::remove_dir_all(&dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!("cannot remove {}: {e}", dir.display());
        }
        Ok(())
    })
    .await?;
    tracing::info!(user, name, mac, "virtual node {name} removed");
    state.nodes.changed();
    Ok(())
}

/// `walt node reboot <node-set>`: virtual nodes are power-cycled; walt
/// cannot reboot the others.
pub async fn reboot(
    state: &Arc<State>,
    user: &str,
    node_set: &str,
) -> Result<String, ServiceError> {
    let st = state.clone();
    let (u, set) = (user.to_string(), node_set.to_string());
    let nodes = blocking(move || resolve_node_set(&st, &u, &set)).await?;
    let (mut done, mut cannot) = (Vec::new(), Vec::new());
    for n in &nodes {
        if state.nodes.vnodes.reboot(&n.mac) {
            done.push(n.name.as_str());
        } else {
            cannot.push(n.name.as_str());
        }
    }
    if done.is_empty() {
        return Err(ServiceError::FailedPrecondition(format!(
            "cannot reboot {}: walt reboots virtual nodes only",
            super::service::list_names(&cannot)
        )));
    }
    tracing::info!(user, nodes = ?done, "virtual nodes rebooted");
    let mut lines = vec![format!("{} rebooted.", nodes_phrase(&done))];
    if !cannot.is_empty() {
        lines.push(format!(
            "warning: {}: not rebooted (walt reboots virtual nodes only)",
            nodes_phrase(&cannot)
        ));
    }
    Ok(lines.join("\n"))
}

/// `walt node config <node-set> [<setting>=<value>...]`: the settings of
/// virtual nodes (WalT's `cpu.cores`, `ram`, `disks`), shown or changed
/// (in effect at their next boot).
pub async fn config(
    state: &Arc<State>,
    user: &str,
    node_set: &str,
    settings: &[String],
) -> Result<String, ServiceError> {
    if settings.len() > MAX_SETTINGS {
        return Err(ServiceError::InvalidArgument(format!(
            "too many settings ({}, at most {MAX_SETTINGS})",
            settings.len()
        )));
    }
    let st = state.clone();
    let (u, set, settings) = (user.to_string(), node_set.to_string(), settings.to_vec());
    blocking(move || {
        let nodes = resolve_node_set(&st, &u, &set)?;
        let mut vnodes = Vec::with_capacity(nodes.len());
        for n in &nodes {
            vnodes.push((n, st.store.get_vnode(&n.mac)?));
        }
        if settings.is_empty() {
            let mut lines = Vec::new();
            for (n, v) in &vnodes {
                lines.push(match v {
                    Some(v) => format!(
                        "{}: cpu.cores={} disks={} ram={}",
                        n.name,
                        v.conf.cpu_cores,
                        v.conf.disks,
                        show_ram(v.conf.ram_mb)
                    ),
                    None => format!("{}: no settings (not a virtual node)", n.name),
                });
            }
            return Ok(lines.join("\n"));
        }
        let physical: Vec<&str> = vnodes
            .iter()
            .filter(|(_, v)| v.is_none())
            .map(|(n, _)| n.name.as_str())
            .collect();
        let mut changes: Vec<(&str, &str)> = Vec::new();
        for s in &settings {
            let Some((k, v)) = s.split_once('=') else {
                return Err(ServiceError::InvalidArgument(format!(
                    "invalid setting '{s}' (expecting <setting>=<value>, e.g. ram=1G)"
                )));
            };
            match k {
                "cpu.cores" => parse_cpu_cores(v).map(|_| ()),
                "ram" => parse_ram(v).map(|_| ()),
                "disks" => parse_disks(v).map(|_| ()),
                _ => Err(format!(
                    "unknown setting '{k}' (virtual nodes have cpu.cores, ram and disks)"
                )),
            }
            .map_err(ServiceError::InvalidArgument)?;
            if !physical.is_empty() {
                return Err(ServiceError::FailedPrecondition(format!(
                    "setting {k} applies to virtual nodes only, and {} {} not",
                    super::service::list_names(&physical),
                    if physical.len() == 1 { "is" } else { "are" }
                )));
            }
            changes.push((k, v));
        }
        for (n, v) in &vnodes {
            let Some(v) = v else { continue };
            let mut conf: VnodeConf = v.conf.clone();
            for (k, val) in &changes {
                match *k {
                    "cpu.cores" => conf.cpu_cores = parse_cpu_cores(val).unwrap_or(conf.cpu_cores),
                    "ram" => conf.ram_mb = parse_ram(val).unwrap_or(conf.ram_mb),
                    _ => conf.disks = (*val).to_string(),
                }
            }
            st.store.set_vnode_conf(&n.mac, &conf)?;
        }
        tracing::info!(user = %u, nodes = %set, ?settings, "virtual node settings changed");
        Ok("Done. Reboot node(s) to see new settings in effect.".to_string())
    })
    .await
}

pub type ConsoleStream = Pin<Box<dyn Stream<Item = Result<pb::ConsoleOutput, Status>> + Send>>;

/// `walt node console <name>`: the first message names the node; then
/// keystrokes go to its serial port and what it prints comes back, until
/// the client closes its stream (or the node is removed).
pub async fn console(
    state: &Arc<State>,
    user: &str,
    mut input: Streaming<pb::ConsoleInput>,
) -> Result<ConsoleStream, ServiceError> {
    let first = input
        .message()
        .await
        .map_err(|e| ServiceError::InvalidArgument(format!("console stream: {e}")))?
        .ok_or_else(|| ServiceError::InvalidArgument("no node given".into()))?;
    let name = first.node.trim().to_string();
    let st = state.clone();
    let n = name.clone();
    let v = blocking(move || find_vnode(&st, &n)).await?;
    let (output, keys) = state.nodes.vnodes.console(&v.device.mac).ok_or_else(|| {
        ServiceError::FailedPrecondition(format!("virtual node '{name}' is not running"))
    })?;
    tracing::info!(user, node = %name, "console session started");
    if !first.data.is_empty() && first.data.len() <= MAX_CONSOLE_INPUT {
        let _ = keys.send(first.data.into()).await;
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<pb::ConsoleOutput, Status>>(64);
    // Keystrokes: until the client ends its stream.
    let done = tokio_util::sync::CancellationToken::new();
    let input_done = done.clone();
    tokio::spawn(async move {
        while let Some(Ok(m)) = input.next().await {
            if m.data.len() > MAX_CONSOLE_INPUT || keys.send(m.data.into()).await.is_err() {
                break;
            }
        }
        input_done.cancel();
    });
    // Output: until the node stops or the client is gone.
    let mut output = output;
    let shutdown = state.shutdown.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = done.cancelled() => break,
                _ = shutdown.cancelled() => break,
                r = output.recv() => match r {
                    Ok(b) => {
                        if tx.send(Ok(pb::ConsoleOutput { data: b.to_vec() })).await.is_err() {
                            break;
                        }
                    }
                    // A slow client misses output rather than slowing the node.
                    Err(RecvError::Lagged(_)) => continue,
                    Err(RecvError::Closed) => break,
                },
            }
        }
    });
    Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
}
