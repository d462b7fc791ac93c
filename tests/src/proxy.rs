//! A fault-injecting HTTP/1.1 proxy in front of a real (plain HTTP)
//! registry: every request is forwarded on its own upstream connection and
//! answered with `Connection: close`. Blob GETs can fail with 500, be cut
//! short after some bytes (with the full Content-Length announced) or be
//! rate-limited.
//!
//! Its latency mode, [`LatencyProxy`], is a plain TCP relay that delays
//! every byte by half a round trip each way (benchmarks of a registry
//! behind a slow link; `tests/src/bin/walt-latency-proxy.rs` runs it alone).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::registry::registry_entry;

#[derive(Debug, Default, Clone)]
struct Faults {
    fail_blob_gets: u32,
    truncate_after: Option<u64>,
    rate: Option<u64>,
}

/// What the proxy saw (for assertions and diagnostics).
#[derive(Debug, Default, Clone)]
pub struct ProxyStats {
    /// `METHOD path -> status` per request, in order.
    pub requests: Vec<String>,
    /// Blob GETs received (including failed ones).
    pub blob_gets: u64,
    /// Blob GETs answered with an injected 500.
    pub injected_failures: u64,
    /// Blob GETs cut short.
    pub truncated: u64,
    /// Chunks of rate-limited bodies the proxy held back because they were
    /// ahead of the configured rate.
    pub paced_chunks: u64,
}

impl ProxyStats {
    /// GET requests whose path contains `part` (a blob digest, `manifests/latest`),
    /// whatever they were answered: each is one request the registry
    /// received (or, injected, would have).
    pub fn gets(&self, part: &str) -> usize {
        self.requests
            .iter()
            .filter(|r| {
                r.strip_prefix("GET ")
                    .and_then(|r| r.split(" -> ").next())
                    .is_some_and(|path| path.contains(part))
            })
            .count()
    }
}

#[derive(Default)]
struct Shared {
    faults: Mutex<Faults>,
    stats: Mutex<ProxyStats>,
}

/// A running proxy; stops accepting on drop.
pub struct Proxy {
    port: u16,
    upstream_port: u16,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Proxy {
    /// Starts a proxy to `127.0.0.1:upstream_port`.
    pub fn start(upstream_port: u16) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let shared = Arc::new(Shared::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (s2, stop2) = (shared.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let s = s2.clone();
                std::thread::spawn(move || {
                    let _ = handle(conn, upstream_port, &s);
                });
            }
        });
        Ok(Self {
            port,
            upstream_port,
            shared,
            stop,
            thread: Some(thread),
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn upstream_port(&self) -> u16 {
        self.upstream_port
    }

    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Its entry in the walt server config (`protocol: http`, no auth).
    pub fn server_entry(&self, label: &str) -> String {
        registry_entry(label, self.port, "http", false)
    }

    /// The next `n` blob GETs get a 500.
    pub fn fail_first_n_blob_gets(&self, n: u32) {
        self.shared.faults.lock().unwrap().fail_blob_gets = n;
    }

    /// Blob bodies stop after `bytes` (the connection is closed); `None` disables.
    pub fn truncate_blob_after(&self, bytes: Option<u64>) {
        self.shared.faults.lock().unwrap().truncate_after = bytes;
    }

    /// Blob bodies are sent at most at `bytes_per_sec` (per request); `None` disables.
    pub fn rate_limit(&self, bytes_per_sec: Option<u64>) {
        self.shared.faults.lock().unwrap().rate = bytes_per_sec;
    }

    /// Removes every fault.
    pub fn clear_faults(&self) {
        *self.shared.faults.lock().unwrap() = Faults::default();
    }

    pub fn stats(&self) -> ProxyStats {
        self.shared.stats.lock().unwrap().clone()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A request or status line and its headers.
type Head = (String, Vec<(String, String)>);

fn read_head<R: BufRead>(r: &mut R) -> std::io::Result<Option<Head>> {
    let mut first = String::new();
    if r.read_line(&mut first)? == 0 {
        return Ok(None);
    }
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Err(std::io::Error::other("unexpected EOF in headers"));
        }
        let line = line.trim_end_matches(['\r', '\n']);
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    Ok(Some((first.trim_end().to_string(), headers)))
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

fn write_head(
    w: &mut impl Write,
    first: &str,
    headers: &[(String, String)],
) -> std::io::Result<()> {
    let mut s = format!("{first}\r\n");
    for (k, v) in headers {
        if k.eq_ignore_ascii_case("connection") || k.eq_ignore_ascii_case("keep-alive") {
            continue;
        }
        s += &format!("{k}: {v}\r\n");
    }
    s += "Connection: close\r\n\r\n";
    w.write_all(s.as_bytes())
}

fn handle(client: TcpStream, upstream_port: u16, shared: &Shared) -> std::io::Result<()> {
    client.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut creader = BufReader::new(client.try_clone()?);
    let mut cwriter = client;
    let Some((req_line, req_headers)) = read_head(&mut creader)? else {
        return Ok(());
    };
    let mut parts = req_line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let path = parts.next().unwrap_or("").to_string();
    let mut body = Vec::new();
    if let Some(len) = header(&req_headers, "content-length").and_then(|v| v.parse::<u64>().ok()) {
        (&mut creader).take(len).read_to_end(&mut body)?;
    }
    let is_blob_get = method == "GET" && path.contains("/blobs/sha256:");
    let (faults, inject) = {
        let mut f = shared.faults.lock().unwrap();
        let inject = is_blob_get && f.fail_blob_gets > 0;
        if inject {
            f.fail_blob_gets -= 1;
        }
        (f.clone(), inject)
    };
    if is_blob_get {
        let mut st = shared.stats.lock().unwrap();
        st.blob_gets += 1;
        if inject {
            st.injected_failures += 1;
            st.requests
                .push(format!("{method} {path} -> 500 (injected)"));
            drop(st);
            let msg =
                br#"{"errors":[{"code":"UNKNOWN","message":"walt-e2e proxy: injected failure"}]}"#;
            write_head(
                &mut cwriter,
                "HTTP/1.1 500 Internal Server Error",
                &[
                    ("Content-Type".into(), "application/json".into()),
                    ("Content-Length".into(), msg.len().to_string()),
                ],
            )?;
            cwriter.write_all(msg)?;
            let _ = cwriter.shutdown(Shutdown::Both);
            return Ok(());
        }
    }
    let mut upstream = TcpStream::connect(("127.0.0.1", upstream_port))?;
    upstream.set_read_timeout(Some(Duration::from_secs(120)))?;
    write_head(&mut upstream, &req_line, &req_headers)?;
    upstream.write_all(&body)?;
    let mut ureader = BufReader::with_capacity(256 * 1024, upstream);
    let Some((status_line, resp_headers)) = read_head(&mut ureader)? else {
        return Ok(());
    };
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    shared
        .stats
        .lock()
        .unwrap()
        .requests
        .push(format!("{method} {path} -> {status}"));
    write_head(&mut cwriter, &status_line, &resp_headers)?;
    if method == "HEAD" {
        return Ok(());
    }
    let limit = if is_blob_get && status / 100 == 2 {
        faults.truncate_after
    } else {
        None
    };
    let rate = if is_blob_get { faults.rate } else { None };
    let start = Instant::now();
    let mut sent: u64 = 0;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let mut want = buf.len();
        if let Some(l) = limit {
            if sent >= l {
                shared.stats.lock().unwrap().truncated += 1;
                break;
            }
            want = want.min((l - sent) as usize);
        }
        let n = ureader.read(&mut buf[..want])?;
        if n == 0 {
            break;
        }
        cwriter.write_all(&buf[..n])?;
        sent += n as u64;
        if let Some(r) = rate {
            let due = Duration::from_secs_f64(sent as f64 / r.max(1) as f64);
            let elapsed = start.elapsed();
            if due > elapsed {
                shared.stats.lock().unwrap().paced_chunks += 1;
                std::thread::sleep(due - elapsed);
            }
        }
    }
    cwriter.flush()?;
    let _ = cwriter.shutdown(Shutdown::Both);
    Ok(())
}

/// What a [`LatencyProxy`] saw.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LatencyStats {
    /// Client connections accepted.
    pub connections: u64,
    /// Bytes relayed from the clients to the upstream.
    pub bytes_up: u64,
    /// Bytes relayed from the upstream to the clients.
    pub bytes_down: u64,
}

#[derive(Default)]
struct LatencyCounters {
    connections: AtomicU64,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
}

/// A transparent TCP relay that puts a network round trip between its
/// clients and `127.0.0.1:upstream_port` (the proxy's latency mode: the
/// machine has no `tc netem`).
///
/// What it models, for a link of round-trip time `rtt` and unbounded
/// bandwidth: every byte read from one side is written to the other
/// `rtt / 2` later (bytes keep their order, nothing is coalesced or held
/// back otherwise, so pipelined and concurrent requests overlap as they
/// would on the wire); and a new connection pays its TCP handshake: its
/// first bytes from the client are relayed no earlier than `rtt` after the
/// connection was accepted, plus `rtt / 2`. Connections are kept open as
/// long as both sides keep them (HTTP keep-alive works through it), and each
/// client connection gets its own upstream connection. Slow start, losses and
/// bandwidth limits are not modelled.
pub struct LatencyProxy {
    port: u16,
    counters: Arc<LatencyCounters>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl LatencyProxy {
    /// Starts a relay on `127.0.0.1:listen_port` (0: any free port) to
    /// `127.0.0.1:upstream_port`.
    pub fn start(upstream_port: u16, rtt: Duration) -> Result<Self> {
        Self::start_on(0, upstream_port, rtt)
    }

    /// Like [`Self::start`], on a given port.
    pub fn start_on(listen_port: u16, upstream_port: u16, rtt: Duration) -> Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", listen_port))?;
        let port = listener.local_addr()?.port();
        let counters = Arc::new(LatencyCounters::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (c2, stop2) = (counters.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let accepted = Instant::now();
                c2.connections.fetch_add(1, Ordering::Relaxed);
                let c = c2.clone();
                std::thread::spawn(move || {
                    let _ = relay(conn, upstream_port, rtt, accepted, &c);
                });
            }
        });
        Ok(Self {
            port,
            counters,
            stop,
            thread: Some(thread),
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its entry in the walt server config (`protocol: http`, no auth).
    pub fn server_entry(&self, label: &str) -> String {
        registry_entry(label, self.port, "http", false)
    }

    pub fn stats(&self) -> LatencyStats {
        LatencyStats {
            connections: self.counters.connections.load(Ordering::Relaxed),
            bytes_up: self.counters.bytes_up.load(Ordering::Relaxed),
            bytes_down: self.counters.bytes_down.load(Ordering::Relaxed),
        }
    }
}

impl Drop for LatencyProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Relays one client connection both ways, each direction delayed.
fn relay(
    client: TcpStream,
    upstream_port: u16,
    rtt: Duration,
    accepted: Instant,
    counters: &LatencyCounters,
) -> std::io::Result<()> {
    let upstream = TcpStream::connect(("127.0.0.1", upstream_port))?;
    for s in [&client, &upstream] {
        s.set_nodelay(true)?;
    }
    let half = rtt / 2;
    std::thread::scope(|scope| {
        let (c_read, u_write) = (client.try_clone()?, upstream.try_clone()?);
        let (u_read, c_write) = (upstream.try_clone()?, client.try_clone()?);
        // The client could not send before its handshake ended.
        let up_not_before = accepted + rtt;
        scope.spawn(move || delayed_copy(c_read, u_write, half, up_not_before, &counters.bytes_up));
        scope.spawn(move || delayed_copy(u_read, c_write, half, accepted, &counters.bytes_down));
        Ok(())
    })
}

/// Copies `from` to `to`, each chunk written `delay` after it was read (and
/// not before `not_before + delay`); the end of `from` is passed on as a
/// shutdown of `to`'s writing side, after the same delay.
fn delayed_copy(
    from: TcpStream,
    to: TcpStream,
    delay: Duration,
    not_before: Instant,
    bytes: &AtomicU64,
) {
    // `None`: the end of the stream.
    let (tx, rx) = std::sync::mpsc::channel::<(Instant, Option<Vec<u8>>)>();
    std::thread::scope(|scope| {
        let (from_ref, mut to_ref) = (&from, &to);
        scope.spawn(move || {
            for (due, chunk) in rx {
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                let Some(chunk) = chunk else {
                    let _ = to_ref.shutdown(Shutdown::Write);
                    return;
                };
                if to_ref.write_all(&chunk).is_err() {
                    // The other side is gone: so is this connection.
                    let _ = to_ref.shutdown(Shutdown::Both);
                    let _ = from_ref.shutdown(Shutdown::Both);
                    return;
                }
                bytes.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            }
        });
        let mut buf = vec![0u8; 64 * 1024];
        let mut reader = &from;
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) | Err(_) => 0,
                Ok(n) => n,
            };
            let due = Instant::now().max(not_before) + delay;
            let chunk = (n > 0).then(|| buf[..n].to_vec());
            if tx.send((due, chunk)).is_err() || n == 0 {
                break;
            }
        }
        drop(tx);
    });
}
