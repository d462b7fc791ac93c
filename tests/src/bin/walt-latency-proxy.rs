//! Runs the test proxy's latency mode alone, for benchmarks: a TCP relay
//! from `127.0.0.1:<listen>` to `127.0.0.1:<upstream>` that adds a round trip
//! of `<rtt-ms>` milliseconds (see `walt_e2e::LatencyProxy`).
//!
//! Usage: `walt-latency-proxy <rtt-ms> <upstream-port> [<listen-port>]`.
//! Prints the port it listens on, then relays until killed.

use std::io::Write;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use walt_e2e::LatencyProxy;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (rtt, upstream, listen) = match args.as_slice() {
        [rtt, up] => (rtt, up, None),
        [rtt, up, listen] => (rtt, up, Some(listen)),
        _ => bail!("usage: walt-latency-proxy <rtt-ms> <upstream-port> [<listen-port>]"),
    };
    let rtt: u64 = rtt
        .parse()
        .context("invalid round-trip time (milliseconds)")?;
    if rtt > 10_000 {
        bail!("round-trip time {rtt} ms is above 10000 ms");
    }
    let upstream: u16 = upstream.parse().context("invalid upstream port")?;
    let listen: u16 = match listen {
        Some(p) => p.parse().context("invalid listen port")?,
        None => 0,
    };
    let proxy = LatencyProxy::start_on(listen, upstream, Duration::from_millis(rtt))
        .context("cannot start the proxy")?;
    let mut out = std::io::stdout();
    writeln!(out, "{}", proxy.port())?;
    out.flush()?;
    loop {
        std::thread::park();
    }
}
