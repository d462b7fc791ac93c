//! Real DHCP exchanges: a Linux bridge holding the server side's address,
//! one network namespace per node (a veth into the bridge, a fixed MAC),
//! a real DHCP server (dnsmasq or isc-dhcp-server) running the hook
//! configuration shipped in `contrib/dhcp/`, and busybox `udhcpc` clients.
//!
//! Names and subnets are unique per network, so tests can run in
//! parallel; everything (processes, namespaces, links) goes on drop.
//! Needs root and the `ip`, `dnsmasq`, `dhcpd` and `busybox` commands
//! (`scripts/install-deps.sh`).

use std::fs::File;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tempfile::TempDir;

use crate::util::{run_cmd, unique_seed, wait_for};

/// The shipped hook configurations (`contrib/dhcp/`).
pub fn contrib_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .join("contrib/dhcp")
}

/// Where the shipped configurations expect the hook.
pub const SHIPPED_HOOK_PATH: &str = "/usr/local/bin/walt-dhcp-event";

/// The environment variable naming the daemon's event socket for the hook.
pub const EVENT_SOCKET_ENV: &str = "WALT_DHCP_EVENT_SOCKET";

/// The client script: prints the bound address, configures nothing.
const UDHCPC_SCRIPT: &str =
    "#!/bin/sh\n[ \"$1\" = bound ] && echo \"walt-e2e-lease $ip\"\nexit 0\n";

fn ip(args: &[&str]) -> Result<()> {
    run_cmd(Command::new("ip").args(args)).map(|_| ())
}

/// A node: a network namespace with `eth0` bridged to the server side.
#[derive(Debug, Clone)]
pub struct NodeNs {
    /// The namespace's name.
    pub ns: String,
    /// The MAC of its `eth0` (lower case, `aa:bb:cc:dd:ee:ff`).
    pub mac: String,
    /// The host side of its veth.
    host_if: String,
    script: PathBuf,
}

/// What a node's DHCP client announces.
#[derive(Debug, Clone, Default)]
pub struct ClientOpts {
    /// Option 60 (without it, udhcpc sends `udhcp <version>`).
    pub vendor_class: Option<String>,
    /// Option 77, sent in RFC 3004 form (one length-prefixed class).
    pub user_class: Option<String>,
    /// Option 12.
    pub hostname: Option<String>,
}

impl ClientOpts {
    /// `-V walt.node.<model>`.
    pub fn vendor_model(model: &str) -> Self {
        Self {
            vendor_class: Some(format!("walt.node.{model}")),
            ..Self::default()
        }
    }

    /// User class `walt.node.<model>`.
    pub fn user_model(model: &str) -> Self {
        Self {
            user_class: Some(format!("walt.node.{model}")),
            ..Self::default()
        }
    }

    pub fn hostname(mut self, h: &str) -> Self {
        self.hostname = Some(h.to_string());
        self
    }

    pub fn vendor_class(mut self, v: &str) -> Self {
        self.vendor_class = Some(v.to_string());
        self
    }
}

/// A running `udhcpc` (see [`NodeNs::spawn_udhcpc`]).
pub struct ClientRun {
    child: Child,
    ns: String,
}

impl ClientRun {
    /// Waits for the client (it gives up by itself after 5 tries) and
    /// returns the address it was leased.
    pub fn lease(self) -> Result<String> {
        let ns = self.ns;
        let out = self
            .child
            .wait_with_output()
            .with_context(|| format!("udhcpc in {ns}"))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        match stdout
            .lines()
            .find_map(|l| l.strip_prefix("walt-e2e-lease "))
        {
            Some(ip) if out.status.success() => Ok(ip.trim().to_string()),
            _ => bail!(
                "udhcpc in {ns} got no lease ({}):\n{stdout}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ),
        }
    }
}

impl NodeNs {
    /// Starts busybox `udhcpc` in the node: one exchange (`-n -q`), 5
    /// tries 1 s apart.
    pub fn spawn_udhcpc(&self, opts: &ClientOpts) -> Result<ClientRun> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns, "busybox", "udhcpc", "-i", "eth0"]);
        if let Some(v) = &opts.vendor_class {
            cmd.arg("-V").arg(v);
        }
        if let Some(u) = &opts.user_class {
            if u.is_empty() || u.len() > 255 {
                bail!("a user class is 1 to 255 bytes: {u:?}");
            }
            cmd.arg("-x")
                .arg(format!("0x4d:{:02x}{}", u.len(), hex::encode(u)));
        }
        if let Some(h) = &opts.hostname {
            cmd.arg("-x").arg(format!("hostname:{h}"));
        }
        cmd.arg("-s")
            .arg(&self.script)
            .args(["-n", "-q", "-t", "5", "-T", "1"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start udhcpc in {}", self.ns))?;
        Ok(ClientRun {
            child,
            ns: self.ns.clone(),
        })
    }

    /// One DHCP exchange; the leased address.
    pub fn udhcpc(&self, opts: &ClientOpts) -> Result<String> {
        self.spawn_udhcpc(opts)?.lease()
    }
}

/// A bridge with the server's address and the nodes plugged into it.
pub struct DhcpNet {
    dir: TempDir,
    /// Unique part of every name (8 hex digits).
    tag: String,
    bridge: String,
    /// The /24 network's first three bytes.
    prefix: [u8; 3],
    nodes: Vec<NodeNs>,
}

impl DhcpNet {
    /// Creates the bridge `wbr<tag>` with `10.x.y.1/24` on a subnet no
    /// interface of the host uses.
    pub fn new() -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("walt-e2e-dhcp-")
            .tempdir()?;
        let script = dir.path().join("udhcpc.script");
        std::fs::write(&script, UDHCPC_SCRIPT)?;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;
        let seed = unique_seed();
        let tag = format!("{:08x}", seed as u32);
        let used = String::from_utf8_lossy(
            &run_cmd(Command::new("ip").args(["-4", "-o", "addr", "show"]))?.stdout,
        )
        .into_owned()
            + &String::from_utf8_lossy(
                &run_cmd(Command::new("ip").args(["-4", "route", "show", "table", "all"]))?.stdout,
            );
        let mut r = seed >> 32;
        let prefix = loop {
            let p = [10, 100 + (r % 150) as u8, ((r >> 8) % 256) as u8];
            if !used.contains(&format!("{}.{}.{}.", p[0], p[1], p[2])) {
                break p;
            }
            r = r.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1) >> 7;
        };
        let bridge = format!("wbr{tag}");
        ip(&["link", "add", &bridge, "type", "bridge"])?;
        let net = Self {
            dir,
            tag,
            bridge,
            prefix,
            nodes: Vec::new(),
        };
        ip(&[
            "addr",
            "add",
            &format!("{}/24", net.server_ip()),
            "dev",
            &net.bridge,
        ])?;
        ip(&["link", "set", &net.bridge, "up"])?;
        Ok(net)
    }

    /// The bridge (the DHCP servers' interface).
    pub fn bridge(&self) -> &str {
        &self.bridge
    }

    /// `10.x.y.1`.
    pub fn server_ip(&self) -> String {
        self.host(1)
    }

    /// `10.x.y.<n>`.
    pub fn host(&self, n: u8) -> String {
        let [a, b, c] = self.prefix;
        format!("{a}.{b}.{c}.{n}")
    }

    /// `10.x.y.0`.
    pub fn network(&self) -> String {
        self.host(0)
    }

    /// The addresses the DHCP servers hand out: `10.x.y.10` to `.250`.
    pub fn range(&self) -> (String, String) {
        (self.host(10), self.host(250))
    }

    /// A directory for the servers' files (removed on drop).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A MAC `52:54:00:<2 bytes of the tag>:<n>` unique to this network.
    pub fn mac(&self, n: u8) -> String {
        format!("52:54:00:{}:{}:{n:02x}", &self.tag[0..2], &self.tag[2..4])
    }

    pub fn nodes(&self) -> &[NodeNs] {
        &self.nodes
    }

    /// Plugs a node with this MAC into the bridge.
    pub fn add_node(&mut self, mac: &str) -> Result<NodeNs> {
        let i = self.nodes.len();
        let ns = format!("wn{}-{i}", self.tag);
        let host_if = format!("wv{}-{i}", self.tag);
        ip(&["netns", "add", &ns])?;
        let node = NodeNs {
            ns,
            mac: mac.to_ascii_lowercase(),
            host_if,
            script: self.dir.path().join("udhcpc.script"),
        };
        // Recorded first: dropped with the net even when a step fails.
        self.nodes.push(node.clone());
        ip(&[
            "link",
            "add",
            &node.host_if,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "address",
            &node.mac,
            "netns",
            &node.ns,
        ])?;
        ip(&["link", "set", &node.host_if, "master", &self.bridge, "up"])?;
        ip(&["-n", &node.ns, "link", "set", "eth0", "up"])?;
        Ok(node)
    }

    /// Plugs `n` nodes with MACs [`DhcpNet::mac`]`(1..=n)`.
    pub fn add_nodes(&mut self, n: u8) -> Result<Vec<NodeNs>> {
        (1..=n).map(|i| self.add_node(&self.mac(i))).collect()
    }
}

impl Drop for DhcpNet {
    fn drop(&mut self) {
        // Deleting a namespace deletes its veth and so the host side.
        for n in &self.nodes {
            let _ = ip(&["netns", "del", &n.ns]);
        }
        let _ = ip(&["link", "del", &self.bridge]);
    }
}

/// Which DHCP server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DhcpKind {
    Dnsmasq,
    IscDhcpd,
}

/// A DHCP server on a [`DhcpNet`], running the shipped hook configuration
/// with the hook at `hook` instead of [`SHIPPED_HOOK_PATH`].
pub struct DhcpServer {
    kind: DhcpKind,
    child: Option<Child>,
    dir: TempDir,
    /// The command line and environment, to start it again.
    program: &'static str,
    args: Vec<std::ffi::OsString>,
    env: Vec<(String, String)>,
}

impl DhcpServer {
    /// Starts `kind` on `net`; `env` is given to the server (its hook
    /// inherits it), e.g. [`EVENT_SOCKET_ENV`].
    pub fn start(kind: DhcpKind, net: &DhcpNet, hook: &Path, env: &[(&str, &str)]) -> Result<Self> {
        Self::start_with_options(kind, net, hook, env, &[])
    }

    /// [`DhcpServer::start`] with more options on dnsmasq's command line
    /// (e.g. `--dhcp-boot=start.ipxe` for PXE clients: tests/src/vnet.rs).
    pub fn start_with_options(
        kind: DhcpKind,
        net: &DhcpNet,
        hook: &Path,
        env: &[(&str, &str)],
        extra: &[String],
    ) -> Result<Self> {
        if kind != DhcpKind::Dnsmasq && !extra.is_empty() {
            bail!("extra options are for dnsmasq only");
        }
        let dir = tempfile::Builder::new()
            .prefix("walt-e2e-dhcpd-")
            .tempdir_in(net.dir())?;
        let shipped = match kind {
            DhcpKind::Dnsmasq => "dnsmasq-walt.conf",
            DhcpKind::IscDhcpd => "dhcpd-walt.conf",
        };
        let text = std::fs::read_to_string(contrib_dir().join(shipped))
            .with_context(|| format!("cannot read contrib/dhcp/{shipped}"))?;
        if !text.contains(SHIPPED_HOOK_PATH) {
            bail!("contrib/dhcp/{shipped} does not run {SHIPPED_HOOK_PATH}");
        }
        let hook = hook.to_str().context("hook path is not UTF-8")?;
        let snippet = dir.path().join(shipped);
        std::fs::write(&snippet, text.replace(SHIPPED_HOOK_PATH, hook))?;
        let (first, last) = net.range();
        let cmd = match kind {
            DhcpKind::Dnsmasq => {
                let mut c = Command::new("dnsmasq");
                c.arg("--no-daemon")
                    .arg(format!("--conf-file={}", snippet.display()))
                    .arg("--port=0")
                    .arg(format!("--interface={}", net.bridge()))
                    .arg("--bind-interfaces")
                    .arg("--except-interface=lo")
                    .arg(format!("--dhcp-range={first},{last},255.255.255.0,12h"))
                    .arg("--dhcp-authoritative")
                    .arg("--no-ping")
                    .arg("--dhcp-lease-max=1000")
                    .arg(format!(
                        "--dhcp-leasefile={}",
                        dir.path().join("leases").display()
                    ))
                    .arg(format!("--pid-file={}", dir.path().join("pid").display()))
                    .arg("--log-dhcp")
                    .arg("--log-facility=-")
                    .args(extra);
                c
            }
            DhcpKind::IscDhcpd => {
                let conf = dir.path().join("dhcpd.conf");
                std::fs::write(
                    &conf,
                    format!(
                        "authoritative;\nddns-update-style none;\n\
                         default-lease-time 43200;\nmax-lease-time 86400;\n\
                         subnet {} netmask 255.255.255.0 {{\n  range {first} {last};\n  \
                         ping-check false;\n}}\ninclude \"{}\";\n",
                        net.network(),
                        snippet.display()
                    ),
                )?;
                let leases = dir.path().join("dhcpd.leases");
                File::create(&leases)?;
                let mut c = Command::new("dhcpd");
                c.args(["-4", "-f", "-d", "-cf"])
                    .arg(&conf)
                    .arg("-lf")
                    .arg(&leases)
                    .arg("-pf")
                    .arg(dir.path().join("dhcpd.pid"))
                    .arg(net.bridge());
                c
            }
        };
        let mut s = Self {
            kind,
            child: None,
            dir,
            program: match kind {
                DhcpKind::Dnsmasq => "dnsmasq",
                DhcpKind::IscDhcpd => "dhcpd",
            },
            args: cmd.get_args().map(|a| a.to_os_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        s.spawn()?;
        Ok(s)
    }

    /// The line the server prints once it serves.
    fn ready_line(&self) -> &'static str {
        match self.kind {
            DhcpKind::Dnsmasq => "sockets bound exclusively to interface",
            DhcpKind::IscDhcpd => "Server starting service.",
        }
    }

    fn spawn(&mut self) -> Result<()> {
        let kind = self.kind;
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.dir.path().join("server.log"))?;
        let started_before = self.log().matches(self.ready_line()).count();
        let child = Command::new(self.program)
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {kind:?}"))?;
        self.child = Some(child);
        let res = wait_for(
            &format!("{kind:?} to start"),
            Duration::from_secs(20),
            || {
                if let Some(Ok(Some(st))) = self.child.as_mut().map(|c| c.try_wait()) {
                    return Some(Err(anyhow::anyhow!("{kind:?} exited: {st}")));
                }
                (self.log().matches(self.ready_line()).count() > started_before).then_some(Ok(()))
            },
        );
        match res {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) | Err(e) => bail!("{e}\n{kind:?} log:\n{}", self.log()),
        }
    }

    /// Stops the server (SIGTERM, then SIGKILL after 5 s).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: plain kill(2) on our own child's pid.
            unsafe {
                libc::kill(c.id() as libc::pid_t, libc::SIGTERM);
            }
            let stopped = wait_for("the DHCP server to stop", Duration::from_secs(5), || {
                matches!(c.try_wait(), Ok(Some(_)) | Err(_)).then_some(())
            });
            if stopped.is_err() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }

    /// Stops and starts the server again, with its lease file.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        self.spawn()
    }

    /// The lease file.
    pub fn lease_file(&self) -> PathBuf {
        self.dir.path().join(match self.kind {
            DhcpKind::Dnsmasq => "leases",
            DhcpKind::IscDhcpd => "dhcpd.leases",
        })
    }

    pub fn kind(&self) -> DhcpKind {
        self.kind
    }

    /// What the server printed.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }
}

impl Drop for DhcpServer {
    fn drop(&mut self) {
        if std::thread::panicking() && self.child.is_some() {
            eprintln!("--- {:?} log ---\n{}", self.kind, self.log());
        }
        self.stop();
    }
}

/// A hook that records its arguments and `DNSMASQ_*`/`WALT_*` variables,
/// one block per call, to check what the shipped configurations pass
/// (stands in for `walt-dhcp-event`).
pub struct RecordingHook {
    dir: TempDir,
}

impl RecordingHook {
    pub fn new() -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("walt-e2e-hook-")
            .tempdir()?;
        let calls = dir.path().join("calls");
        std::fs::create_dir(&calls)?;
        // Each call written whole, then renamed: a reader never sees half.
        let script = format!(
            "#!/bin/sh\nf='{}'/$(date +%s%N).$$\n\
             {{ for a in \"$@\"; do printf 'arg=%s\\n' \"$a\"; done; \
             env | grep -E '^(DNSMASQ_|WALT_)' | sort; }} > \"$f.tmp\" && mv \"$f.tmp\" \"$f\"\n",
            calls.display()
        );
        let path = dir.path().join("hook.sh");
        std::fs::write(&path, script)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
        Ok(Self { dir })
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().join("hook.sh")
    }

    /// Each call, in order: its arguments, then its variables.
    pub fn calls(&self) -> Vec<HookCall> {
        let calls = self.dir.path().join("calls");
        let mut names: Vec<_> = std::fs::read_dir(&calls)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| !n.ends_with(".tmp"))
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
            .iter()
            .map(|n| {
                let text = std::fs::read_to_string(calls.join(n)).unwrap_or_default();
                let mut call = HookCall::default();
                for line in text.lines() {
                    if let Some(a) = line.strip_prefix("arg=") {
                        call.args.push(a.to_string());
                    } else if let Some((k, v)) = line.split_once('=') {
                        call.env.push((k.to_string(), v.to_string()));
                    }
                }
                call
            })
            .collect()
    }

    /// Waits until a call satisfies `f`.
    pub fn wait_call(&self, what: &str, f: impl Fn(&HookCall) -> bool) -> Result<HookCall> {
        wait_for(what, Duration::from_secs(20), || {
            self.calls().into_iter().find(|c| f(c))
        })
        .with_context(|| format!("hook calls: {:#?}", self.calls()))
    }
}

/// One run of a [`RecordingHook`].
#[derive(Debug, Clone, Default)]
pub struct HookCall {
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

impl HookCall {
    pub fn var(&self, name: &str) -> Option<&str> {
        self.env
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A device as the server recorded it (read from its store database).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRow {
    pub mac: String,
    pub ip: Option<String>,
    pub name: String,
    /// `node` or `unknown`.
    pub kind: String,
    /// The model (the node's, else the one an `unknown` device announced).
    pub model: Option<String>,
    /// Why an `unknown` device is not a node.
    pub reason: Option<String>,
    /// `owner/name:tag` of a node's image.
    pub image: Option<String>,
    /// The manifest digest of a node's image.
    pub manifest: Option<String>,
}

/// The store database of the server whose data dir is `data_dir`, read only
/// (the server writes it meanwhile).
pub fn store_db(data_dir: &Path) -> Result<rusqlite::Connection> {
    let conn = rusqlite::Connection::open_with_flags(
        data_dir.join("walt.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )?;
    conn.busy_timeout(Duration::from_secs(5))?;
    Ok(conn)
}

/// The devices recorded in the store of the server whose data dir is
/// `data_dir` (empty before the first one).
pub fn devices(data_dir: &Path) -> Result<Vec<DeviceRow>> {
    let conn = store_db(data_dir)?;
    let mut stmt = conn.prepare(
        "SELECT d.mac, d.ip, d.name, d.type, COALESCE(n.model, d.model), d.reason,
            i.owner || '/' || i.name || ':' || i.tag, i.manifest_digest
         FROM devices d LEFT JOIN nodes n ON n.mac = d.mac
            LEFT JOIN images i ON i.id = n.image_id
         ORDER BY d.name",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(DeviceRow {
            mac: r.get(0)?,
            ip: r.get(1)?,
            name: r.get(2)?,
            kind: r.get(3)?,
            model: r.get(4)?,
            reason: r.get(5)?,
            image: r.get(6)?,
            manifest: r.get(7)?,
        })
    })?;
    Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
}

/// Waits until the device `mac` is recorded and satisfies `f`.
pub fn wait_device(
    data_dir: &Path,
    mac: &str,
    what: &str,
    f: impl Fn(&DeviceRow) -> bool,
) -> Result<DeviceRow> {
    wait_for(what, Duration::from_secs(60), || {
        devices(data_dir)
            .ok()?
            .into_iter()
            .find(|d| d.mac == mac && f(d))
    })
    .with_context(|| format!("devices: {:#?}", devices(data_dir)))
}
