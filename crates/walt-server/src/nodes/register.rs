//! What a lease commit does: the device recorded, its model's default
//! image obtained (once per model, see [`super::defaults`]), the device
//! made a node booting it.
//!
//! A device of a model whose default image cannot be obtained stays
//! `unknown` with the reason (shown by `walt device show`); its next lease
//! tries again.

use std::net::Ipv4Addr;
use std::sync::Arc;

use walt_core::models::{is_rpi_mac, model_from_classes, normalize_mac};
use walt_store::{DeviceKind, Lease};

use super::event::LeaseEvent;
use crate::State;
use crate::images::blocking;

/// Longest hostname kept (a DNS label is 63 characters).
const MAX_HOSTNAME: usize = 63;

/// The lease, validated; Err: why it is ignored.
pub(crate) fn validate(ev: &LeaseEvent) -> Result<Lease, String> {
    let mac = normalize_mac(&ev.mac).ok_or_else(|| format!("invalid MAC address '{}'", ev.mac))?;
    let ip: Ipv4Addr = ev
        .ip
        .trim()
        .parse()
        .map_err(|_| format!("invalid IPv4 address '{}'", ev.ip))?;
    let hostname: String = ev.hostname.chars().take(MAX_HOSTNAME).collect();
    Ok(Lease {
        mac,
        ip: ip.to_string(),
        hostname,
        model: model_from_classes(&ev.uci, &ev.vci),
        now: walt_store::now_secs(),
    })
}

/// Why a device without a model is not a node.
fn no_model_reason(mac: &str) -> String {
    if is_rpi_mac(mac) {
        "Raspberry Pi of unknown model: it announces no walt.node.<model> class \
         (is its walt bootloader installed?)"
            .into()
    } else {
        "it announces no walt.node.<model> class in its DHCP requests".into()
    }
}

/// Handles one lease commit (errors are logged: nobody waits for them).
pub async fn on_lease(state: Arc<State>, ev: LeaseEvent) {
    let lease = match validate(&ev) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!("DHCP event ignored: {e}");
            return;
        }
    };
    // A model's default image is asked for at once, while the lease is
    // recorded: in a burst of new nodes, the download starts before the
    // others' records.
    let early = lease.model.clone().map(|model| {
        let st = state.clone();
        tokio::spawn(async move { super::defaults::ensure(&st, &model).await })
    });
    let st = state.clone();
    let l = lease.clone();
    let recorded = blocking(move || Ok(st.store.record_lease(&l)?)).await;
    let (dev, new) = match recorded {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(mac = %lease.mac, "cannot record the lease: {e}");
            return;
        }
    };
    if new {
        tracing::info!(name = %dev.name, mac = %dev.mac, ip = %lease.ip, "new device detected");
    }
    if dev.kind == DeviceKind::Node {
        // Its address may have changed: the per-node links follow.
        state.nodes.changed();
        return;
    }
    let Some(model) = lease.model.clone() else {
        let reason = no_model_reason(&dev.mac);
        if new {
            tracing::info!(name = %dev.name, "device {} is unknown: {reason}", dev.name);
        }
        set_reason(&state, &dev.mac, reason).await;
        state.nodes.changed();
        return;
    };
    tracing::info!(
        name = %dev.name,
        "device {} is a node of type {model}",
        dev.name
    );
    let outcome = match early {
        Some(task) => task
            .await
            .unwrap_or_else(|e| Err(format!("the download task failed: {e}"))),
        None => super::defaults::ensure(&state, &model).await,
    };
    match outcome {
        Ok(image) => {
            let st = state.clone();
            let (mac, m, img) = (dev.mac.clone(), model.clone(), image.clone());
            match blocking(move || Ok(st.store.make_node(&mac, &m, &img)?)).await {
                Ok(true) => {
                    tracing::info!(
                        name = %dev.name,
                        mac = %dev.mac,
                        "node {} registered, booting {image}",
                        dev.name
                    );
                    state.nodes.changed();
                }
                Ok(false) => state.nodes.changed(),
                Err(e) => tracing::error!(mac = %dev.mac, "cannot record the node: {e}"),
            }
        }
        Err(reason) => {
            set_reason(
                &state,
                &dev.mac,
                format!("the default image of {model} is not available: {reason}"),
            )
            .await;
        }
    }
}

async fn set_reason(state: &Arc<State>, mac: &str, reason: String) {
    let st = state.clone();
    let m = mac.to_string();
    if let Err(e) = blocking(move || Ok(st.store.set_unknown_reason(&m, &reason)?)).await {
        tracing::error!(%mac, "cannot record why the device is unknown: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_are_validated() {
        let ev = LeaseEvent {
            vci: "walt.node.pc-x86-64".into(),
            uci: "".into(),
            ip: "192.168.152.50".into(),
            mac: "52:54:0:12:34:56".into(),
            hostname: "x".repeat(300),
        };
        let l = validate(&ev).unwrap();
        assert_eq!(l.mac, "52:54:00:12:34:56");
        assert_eq!(l.model.as_deref(), Some("pc-x86-64"));
        assert_eq!(l.hostname.len(), MAX_HOSTNAME);
        let bad_ip = LeaseEvent {
            ip: "192.168.152.500".into(),
            ..ev.clone()
        };
        assert!(validate(&bad_ip).unwrap_err().contains("IPv4"));
        let bad_mac = LeaseEvent {
            mac: "../../etc".into(),
            ..ev
        };
        assert!(validate(&bad_mac).unwrap_err().contains("MAC"));
        assert!(no_model_reason("b8:27:eb:00:00:01").starts_with("Raspberry Pi"));
    }
}
