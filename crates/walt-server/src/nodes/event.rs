//! The DHCP hook and the socket it reports to.
//!
//! The DHCP server runs `walt-dhcp-event` (or `walt-server dhcp-event`) on
//! each lease commit, with WalT's arguments
//! `commit <vci> <uci> <ip> <mac> <name> <is_known> <type>` (isc-dhcp-server)
//! or dnsmasq's `add|old <mac> <ip> [<hostname>]` and its `DNSMASQ_*`
//! environment (`--dhcp-script`). The hook writes the lease as one JSON line
//! on the daemon's local socket (mode 0600, root only; the peer must be
//! root), reads `ok` and exits: the DHCP server never waits for what the
//! lease leads to (a default image download).

use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::State;

/// Environment variable naming the socket (both sides).
pub const SOCKET_ENV: &str = "WALT_DHCP_EVENT_SOCKET";
/// The socket's default path.
pub const DEFAULT_SOCKET: &str = "/run/walt/dhcp-event.sock";

/// Longest event line accepted (a lease is well under 1 KiB).
const MAX_LINE: u64 = 4096;
/// A hook that connects but does not send within this delay is dropped.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Leases being handled at once at most; more are dropped (logged) — the
/// DHCP client asks again.
const MAX_PENDING: usize = 4096;
/// Longest class, hostname or address field kept from an event.
const MAX_FIELD: usize = 255;

/// A lease as the hook reports it, not validated yet.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseEvent {
    /// Vendor class identifier (option 60).
    #[serde(default)]
    pub vci: String,
    /// User class (option 77), raw or hex as the DHCP server gave it.
    #[serde(default)]
    pub uci: String,
    pub ip: String,
    pub mac: String,
    /// Hostname the client sent (option 12), may be empty.
    #[serde(default)]
    pub hostname: String,
}

// ----- the daemon side -----

/// Binds `path` (root only) and spawns the task accepting events.
pub async fn listen(state: Arc<State>, path: PathBuf) -> anyhow::Result<()> {
    let listener = bind(&path)?;
    tracing::info!(socket = %path.display(), "listening for DHCP events");
    let pending = Arc::new(tokio::sync::Semaphore::new(MAX_PENDING));
    tokio::spawn(async move {
        let shutdown = state.shutdown.clone();
        loop {
            let conn = tokio::select! {
                c = listener.accept() => c,
                _ = shutdown.cancelled() => break,
            };
            match conn {
                Ok((stream, _)) => {
                    let state = state.clone();
                    let pending = pending.clone();
                    tokio::spawn(async move {
                        if let Err(e) = handle(state, stream, pending).await {
                            tracing::warn!("DHCP event refused: {e:#}");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!("DHCP event socket: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        let _ = std::fs::remove_file(&path);
    });
    Ok(())
}

/// Creates the socket with mode 0600 before it has its name, so that no
/// one else can ever connect; a stale socket of an earlier run is replaced
/// (anything else at the path is refused).
fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            // A live socket is another walt-server's: never taken over.
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                anyhow::bail!(
                    "another walt-server listens for DHCP events on {} (use --event-socket)",
                    path.display()
                );
            }
            std::fs::remove_file(path)
                .with_context(|| format!("cannot remove the stale socket {}", path.display()))?
        }
        Ok(_) => anyhow::bail!(
            "{} exists and is not a socket: refusing to replace it",
            path.display()
        ),
        Err(_) => {}
    }
    let tmp = path.with_file_name(format!(
        ".{}.{}",
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        std::process::id()
    ));
    let _ = std::fs::remove_file(&tmp);
    let listener =
        UnixListener::bind(&tmp).with_context(|| format!("cannot listen on {}", tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot restrict {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot create {}", path.display()))?;
    Ok(listener)
}

async fn handle(
    state: Arc<State>,
    stream: UnixStream,
    pending: Arc<tokio::sync::Semaphore>,
) -> anyhow::Result<()> {
    let cred = stream
        .peer_cred()
        .context("cannot read the peer's credentials")?;
    if cred.uid() != 0 {
        anyhow::bail!("from uid {}: only root may report leases", cred.uid());
    }
    let (rd, mut wr) = stream.into_split();
    let mut line = String::new();
    let mut rd = BufReader::new(tokio::io::AsyncReadExt::take(rd, MAX_LINE));
    tokio::time::timeout(READ_TIMEOUT, rd.read_line(&mut line))
        .await
        .context("the hook sent nothing")?
        .context("cannot read the event")?;
    let ev: LeaseEvent = serde_json::from_str(line.trim()).context("malformed event")?;
    let Ok(permit) = pending.try_acquire_owned() else {
        let _ = wr.write_all(b"busy\n").await;
        anyhow::bail!("too many leases being handled; {} dropped", ev.mac);
    };
    // The hook is answered first: the DHCP server goes on at once.
    let _ = wr.write_all(b"ok\n").await;
    drop(wr);
    let _permit = permit;
    super::register::on_lease(state, ev).await;
    Ok(())
}

// ----- the hook side (`walt-dhcp-event`) -----

/// What the hook's arguments mean.
#[derive(Debug, PartialEq, Eq)]
enum Hook {
    Lease(LeaseEvent),
    /// An action that needs nothing (dnsmasq `del`, `init`, `tftp`...).
    Ignore,
}

fn field(s: &str) -> String {
    s.chars().take(MAX_FIELD).collect()
}

/// Parses the hook's arguments (and, for dnsmasq, its environment).
fn parse_hook(args: &[String], env: &dyn Fn(&str) -> Option<String>) -> Result<Hook, String> {
    let usage = "usage: walt-dhcp-event commit <vci> <uci> <ip> <mac> <name> <is_known> <type> \
                 (isc-dhcp-server), or as dnsmasq's --dhcp-script";
    match args.first().map(String::as_str) {
        Some("commit") => {
            let mut rest: Vec<&String> = args[1..].iter().collect();
            if rest.first().map(|s| s.as_str()) == Some("--force-name") {
                rest.remove(0);
            }
            if rest.len() < 4 {
                return Err(usage.into());
            }
            let get = |i: usize| rest.get(i).map(|s| field(s)).unwrap_or_default();
            // Known devices of a known type have nothing to tell (WalT's
            // rule), unless they now announce a model.
            let is_known = get(5) == "1";
            let dev_type = get(6);
            let (vci, uci) = (get(0), get(1));
            if is_known
                && !dev_type.is_empty()
                && dev_type != "unknown"
                && !vci.contains("walt.node.")
                && !uci.contains("walt.node.")
            {
                return Ok(Hook::Ignore);
            }
            Ok(Hook::Lease(LeaseEvent {
                vci,
                uci,
                ip: get(2),
                mac: get(3),
                hostname: get(4),
            }))
        }
        Some("add" | "old") => {
            if args.len() < 3 {
                return Err(usage.into());
            }
            // dnsmasq gives each user class in DNSMASQ_USER_CLASS0, 1...
            let uci = (0..8)
                .filter_map(|i| env(&format!("DNSMASQ_USER_CLASS{i}")))
                .find(|c| c.contains("walt.node."))
                .or_else(|| env("DNSMASQ_USER_CLASS0"))
                .unwrap_or_default();
            let hostname = args
                .get(3)
                .cloned()
                .or_else(|| env("DNSMASQ_SUPPLIED_HOSTNAME"))
                .unwrap_or_default();
            Ok(Hook::Lease(LeaseEvent {
                vci: field(&env("DNSMASQ_VENDOR_CLASS").unwrap_or_default()),
                uci: field(&uci),
                ip: field(&args[2]),
                mac: field(&args[1]),
                hostname: field(&hostname),
            }))
        }
        Some("del" | "init" | "tftp" | "arp-add" | "arp-del" | "relay-snoop") => Ok(Hook::Ignore),
        _ => Err(usage.into()),
    }
}

/// Sends one event and waits for the daemon's `ok` (a few milliseconds:
/// it answers before handling the lease).
fn send(path: &Path, ev: &LeaseEvent) -> Result<(), String> {
    let shown = path.display();
    let mut s = std::os::unix::net::UnixStream::connect(path)
        .map_err(|e| format!("cannot reach walt-server at {shown}: {e}"))?;
    let _ = s.set_write_timeout(Some(Duration::from_secs(5)));
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let mut line = serde_json::to_string(ev).map_err(|e| e.to_string())?;
    line.push('\n');
    s.write_all(line.as_bytes())
        .map_err(|e| format!("cannot send the lease to walt-server at {shown}: {e}"))?;
    let mut reply = String::new();
    let _ = (&s).take(64).read_to_string(&mut reply);
    match reply.trim() {
        "ok" => Ok(()),
        "" => Err(format!("walt-server at {shown} closed without answering")),
        other => Err(format!("walt-server at {shown} answered: {other}")),
    }
}

/// `walt-dhcp-event <args>`: the exit code (0: reported or nothing to
/// report; 1: the daemon could not be told; 2: bad arguments).
pub fn client_main(args: &[String]) -> i32 {
    let env = |k: &str| std::env::var(k).ok();
    let hook = match parse_hook(args, &env) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("walt-dhcp-event: {e}");
            return 2;
        }
    };
    let Hook::Lease(ev) = hook else {
        return 0;
    };
    let path = env(SOCKET_ENV).unwrap_or_else(|| DEFAULT_SOCKET.to_string());
    match send(Path::new(&path), &ev) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("walt-dhcp-event: {}", walt_core::text::one_line(&e));
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn walt_arguments() {
        let h = parse_hook(
            &args(&[
                "commit",
                "walt.node.pc-x86-64",
                "\twalt.node",
                "192.168.152.50",
                "52:54:00:12:34:56",
                "nodeA",
                "0",
                "unknown",
            ]),
            &no_env,
        )
        .unwrap();
        assert_eq!(
            h,
            Hook::Lease(LeaseEvent {
                vci: "walt.node.pc-x86-64".into(),
                uci: "\twalt.node".into(),
                ip: "192.168.152.50".into(),
                mac: "52:54:00:12:34:56".into(),
                hostname: "nodeA".into(),
            })
        );
        // A known node with nothing new: nothing to say.
        let known = parse_hook(
            &args(&[
                "commit",
                "x",
                "",
                "1.2.3.4",
                "52:54:00:12:34:56",
                "",
                "1",
                "node",
            ]),
            &no_env,
        )
        .unwrap();
        assert_eq!(known, Hook::Ignore);
        assert!(parse_hook(&args(&["commit", "x"]), &no_env).is_err());
        assert!(parse_hook(&args(&["bogus"]), &no_env).is_err());
        assert!(parse_hook(&[], &no_env).is_err());
    }

    #[test]
    fn dnsmasq_arguments() {
        let env = |k: &str| match k {
            "DNSMASQ_VENDOR_CLASS" => Some("walt.node.rpi-4-b".to_string()),
            "DNSMASQ_USER_CLASS0" => Some("iPXE".to_string()),
            "DNSMASQ_USER_CLASS1" => Some("walt.node.pc-x86-64".to_string()),
            _ => None,
        };
        let h = parse_hook(&args(&["add", "52:54:00:12:34:56", "10.0.0.2"]), &env).unwrap();
        let Hook::Lease(ev) = h else { panic!() };
        assert_eq!(ev.uci, "walt.node.pc-x86-64");
        assert_eq!(ev.vci, "walt.node.rpi-4-b");
        assert_eq!(ev.ip, "10.0.0.2");
        assert_eq!(
            parse_hook(&args(&["del", "52:54:00:12:34:56", "10.0.0.2"]), &env).unwrap(),
            Hook::Ignore
        );
        assert!(parse_hook(&args(&["add", "x"]), &env).is_err());
    }
}
