//! Virtual nodes (`walt node create/remove/reboot/config/console`): qemu
//! PCs (`pc-x86-64`) the server runs itself, plugged by a tap device into
//! the walt network bridge, booting as a physical PC does: PXE ROM → DHCP
//! (the walt network's DHCP server and its hook) → `start.ipxe` over TFTP
//! → kernel + initramfs → NFS root.
//!
//! Each virtual node has a supervisor task: it makes the tap device, runs
//! qemu (killed if the server dies: `PR_SET_PDEATHSIG`, and on drop),
//! starts it again when it exits (a guest reboot exits qemu: `-no-reboot`),
//! restarts it when its image changed (once serving has mounted the new
//! one), and on remove or server stop kills it and deletes the tap. The
//! serial port is qemu's stdio: the supervisor keeps a log of it
//! (`<data>/vnodes/<mac>/console.log`, each line stamped with the Unix time
//! it was read) and relays it to `walt node console` sessions.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{broadcast, mpsc, oneshot};
use walt_store::{Device, VnodeConf};

use crate::State;

/// The model of every virtual node (as in WalT).
pub const VNODE_MODEL: &str = "pc-x86-64";
/// WalT's defaults (`VNODE_DEFAULT_CPU_CORES`, `VNODE_DEFAULT_RAM`).
pub const DEFAULT_CPU_CORES: u32 = 4;
pub const DEFAULT_RAM_MB: u32 = 512;
/// Bounds of `walt node config` values.
pub const MAX_CPU_CORES: u32 = 64;
pub const MAX_RAM_MB: u32 = 256 * 1024;
pub const MAX_DISKS: usize = 8;
/// Largest disk, in GB (disks are sparse files).
pub const MAX_DISK_GB: u64 = 16_000;
/// The bridge of the walt network, unless `$WALT_VNODE_BRIDGE` names another.
pub const DEFAULT_BRIDGE: &str = "walt-net";
pub const BRIDGE_ENV: &str = "WALT_VNODE_BRIDGE";
/// `kvm`, `tcg` or `auto` (the default: KVM when `/dev/kvm` creates a VM).
/// Nested KVM (a VM without hardware virtualisation passed through) can be
/// far slower than TCG: `tcg` forces it.
pub const ACCEL_ENV: &str = "WALT_VNODE_ACCEL";
/// How long a qemu that exits at once waits before its next start.
const RESTART_DELAY: Duration = Duration::from_secs(2);
/// A console log is cut in half past this size.
const MAX_CONSOLE_LOG: u64 = 16 * 1024 * 1024;
/// Console sessions at once, per node.
const CONSOLE_BACKLOG: usize = 256;

/// The MAC of the virtual node `name`: `52:54:00` (qemu's prefix, WalT's
/// for virtual nodes) then 3 bytes of the 64-bit FNV-1a hash of the name
/// (of `name#<attempt>` after a collision), so a node created again under
/// the same name gets the same address.
pub fn vnode_mac(name: &str, attempt: u32) -> String {
    let mut key = name.as_bytes().to_vec();
    if attempt > 0 {
        key.extend_from_slice(format!("#{attempt}").as_bytes());
    }
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let d = h.to_be_bytes();
    format!("52:54:00:{:02x}:{:02x}:{:02x}", d[5], d[6], d[7])
}

/// The tap device of the node of that MAC (`walt-vn-<last 6 hex>`, 14
/// characters: interface names have at most 15).
pub fn tap_name(mac: &str) -> String {
    let hex: String = mac.chars().filter(|c| *c != ':').collect();
    format!("walt-vn-{}", &hex[hex.len().saturating_sub(6)..])
}

/// WalT's `ram` value (`512M`, `1G`) in MB.
pub fn parse_ram(v: &str) -> Result<u32, String> {
    let bad = || format!("'{v}' is not a valid value for ram (expecting for instance 512M or 1G)");
    let (num, unit) = v.split_at(v.len().saturating_sub(1));
    if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit()) || num.len() > 9 {
        return Err(bad());
    }
    let n: u64 = num.parse().map_err(|_| bad())?;
    let mb = match unit {
        "M" => n,
        "G" => n * 1024,
        _ => return Err(bad()),
    };
    if mb < 64 || mb > u64::from(MAX_RAM_MB) {
        return Err(format!(
            "ram {v} is out of bounds (64M to {}G)",
            MAX_RAM_MB / 1024
        ));
    }
    Ok(mb as u32)
}

/// `512M` / `1G` as WalT shows it.
pub fn show_ram(mb: u32) -> String {
    if mb.is_multiple_of(1024) {
        format!("{}G", mb / 1024)
    } else {
        format!("{mb}M")
    }
}

/// WalT's `cpu.cores` value.
pub fn parse_cpu_cores(v: &str) -> Result<u32, String> {
    match v.parse::<u32>() {
        Ok(n) if (1..=MAX_CPU_CORES).contains(&n) => Ok(n),
        _ => Err(format!(
            "'{v}' is not a valid value for cpu.cores (expecting for instance 1 or 4, at most {MAX_CPU_CORES})"
        )),
    }
}

/// WalT's `disks` value: `none`, or `<capacity>[,<capacity>...]` with
/// capacities like `8G` or `1T`, each optionally followed by
/// `[template=none]`. Returns the sizes in GB. walt makes blank disks
/// only: WalT's formatted templates (ext4, fat32, hybrid-boot-*) are
/// refused.
pub fn parse_disks(v: &str) -> Result<Vec<u64>, String> {
    if v == "none" {
        return Ok(Vec::new());
    }
    let bad = || format!("could not parse disks value '{v}' (expecting none, or e.g. 8G or 8G,1T)");
    let mut out = Vec::new();
    for disk in v.split(',') {
        let (cap, opts) = match disk.split_once('[') {
            Some((c, rest)) => (c, Some(rest.strip_suffix(']').ok_or_else(bad)?)),
            None => (disk, None),
        };
        if let Some(opts) = opts {
            match opts.strip_prefix("template=") {
                Some("none") => {}
                Some(t) if ["ext4", "fat32", "hybrid-boot-v", "hybrid-boot-p"].contains(&t) => {
                    return Err(format!(
                        "disk template '{t}' is not supported by walt (only blank disks: template=none)"
                    ));
                }
                _ => return Err(format!("'{opts}' is not a valid disk option")),
            }
        }
        let (num, unit) = cap.split_at(cap.len().saturating_sub(1));
        if num.is_empty() || num.len() > 6 || !num.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let n: u64 = num.parse().map_err(|_| bad())?;
        let gb = match unit {
            "G" => n,
            "T" => n * 1000,
            _ => return Err(bad()),
        };
        if gb == 0 || gb > MAX_DISK_GB {
            return Err(format!(
                "disk size {cap} is out of bounds (1G to {}T)",
                MAX_DISK_GB / 1000
            ));
        }
        out.push(gb);
    }
    if out.len() > MAX_DISKS {
        return Err(format!("at most {MAX_DISKS} disks"));
    }
    Ok(out)
}

pub fn default_conf() -> VnodeConf {
    VnodeConf {
        cpu_cores: DEFAULT_CPU_CORES,
        ram_mb: DEFAULT_RAM_MB,
        disks: "none".into(),
    }
}

/// Whether KVM can be used: `/dev/kvm` opens and creates a VM.
fn kvm_works() -> bool {
    use std::os::fd::AsRawFd;
    let Ok(f) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    else {
        return false;
    };
    const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;
    const KVM_CREATE_VM: libc::c_ulong = 0xAE01;
    // SAFETY: both ioctls take no pointer argument; the fd is open.
    let version = unsafe { libc::ioctl(f.as_raw_fd(), KVM_GET_API_VERSION as _, 0) };
    if version != 12 {
        return false;
    }
    // SAFETY: as above; the VM fd it returns is closed at once.
    let vm = unsafe { libc::ioctl(f.as_raw_fd(), KVM_CREATE_VM as _, 0) };
    if vm < 0 {
        return false;
    }
    // SAFETY: `vm` is a file descriptor we own and use nowhere else.
    unsafe { libc::close(vm) };
    true
}

enum Cmd {
    /// Power-cycle: kill qemu, start it again.
    Reboot,
    /// Kill qemu, delete the tap, end the task.
    Stop,
}

struct Handle {
    cmd: mpsc::UnboundedSender<Cmd>,
    /// What the serial port prints.
    output: broadcast::Sender<Bytes>,
    /// Keystrokes for the serial port.
    input: mpsc::Sender<Bytes>,
    task: tokio::task::JoinHandle<()>,
}

/// The running virtual nodes (in [`super::Nodes`]).
pub struct Vnodes {
    bridge: String,
    running: Mutex<HashMap<String, Handle>>,
    /// `-accel kvm` (else `tcg`), probed once.
    kvm: std::sync::OnceLock<bool>,
}

impl Default for Vnodes {
    fn default() -> Self {
        Self::new()
    }
}

impl Vnodes {
    pub fn new() -> Self {
        let bridge = std::env::var(BRIDGE_ENV)
            .ok()
            .filter(|b| !b.is_empty() && b.len() <= 15)
            .unwrap_or_else(|| DEFAULT_BRIDGE.to_string());
        Self {
            bridge,
            running: Mutex::new(HashMap::new()),
            kvm: std::sync::OnceLock::new(),
        }
    }

    pub fn bridge(&self) -> &str {
        &self.bridge
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Handle>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn kvm(&self) -> bool {
        *self
            .kvm
            .get_or_init(|| match std::env::var(ACCEL_ENV).as_deref() {
                Ok("tcg") => false,
                Ok("kvm") => true,
                _ => kvm_works(),
            })
    }

    /// Whether a supervisor runs for this MAC.
    pub fn is_running(&self, mac: &str) -> bool {
        self.lock().contains_key(mac)
    }

    /// Starts the supervisor of the virtual node of that MAC (no-op when it
    /// runs). Must be called from the runtime's worker threads (not from a
    /// blocking task): qemu's parent-death signal follows the thread that
    /// started it.
    ///
    /// The receiver learns how the first start went: qemu's pid, or why
    /// its tap or qemu could not be set up (None when it already ran).
    pub fn start(
        &self,
        state: &Arc<State>,
        mac: &str,
    ) -> Option<oneshot::Receiver<Result<u32, String>>> {
        let mut running = self.lock();
        if running.contains_key(mac) {
            return None;
        }
        let (started, started_rx) = oneshot::channel();
        let (cmd, cmd_rx) = mpsc::unbounded_channel();
        let (output, _) = broadcast::channel(CONSOLE_BACKLOG);
        let (input, input_rx) = mpsc::channel(64);
        let sup = Supervisor {
            state: state.clone(),
            mac: mac.to_string(),
            tap: tap_name(mac),
            bridge: self.bridge.clone(),
            kvm: self.kvm(),
            output: output.clone(),
        };
        let task = tokio::spawn(sup.run(cmd_rx, input_rx, started));
        running.insert(
            mac.to_string(),
            Handle {
                cmd,
                output,
                input,
                task,
            },
        );
        Some(started_rx)
    }

    /// Power-cycles the virtual node; false if it does not run.
    pub fn reboot(&self, mac: &str) -> bool {
        self.lock()
            .get(mac)
            .is_some_and(|h| h.cmd.send(Cmd::Reboot).is_ok())
    }

    /// Stops the virtual node and waits until qemu is gone and its tap
    /// deleted.
    pub async fn stop(&self, mac: &str) {
        let h = self.lock().remove(mac);
        if let Some(h) = h {
            let _ = h.cmd.send(Cmd::Stop);
            let _ = h.task.await;
        }
    }

    /// Stops them all (server stop).
    pub async fn stop_all(&self) {
        let all: Vec<Handle> = self.lock().drain().map(|(_, h)| h).collect();
        for h in &all {
            let _ = h.cmd.send(Cmd::Stop);
        }
        for h in all {
            let _ = h.task.await;
        }
    }

    /// A console session: what the serial port prints from now on, and
    /// where keystrokes go.
    pub fn console(&self, mac: &str) -> Option<(broadcast::Receiver<Bytes>, mpsc::Sender<Bytes>)> {
        self.lock()
            .get(mac)
            .map(|h| (h.output.subscribe(), h.input.clone()))
    }
}

/// Starts the recorded virtual nodes (at server start).
pub async fn start_all(state: &Arc<State>) {
    let st = state.clone();
    let vnodes = match tokio::task::spawn_blocking(move || st.store.list_vnodes()).await {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            tracing::error!("cannot list the virtual nodes: {e}");
            return;
        }
        Err(e) => {
            tracing::error!("cannot list the virtual nodes: {e}");
            return;
        }
    };
    if vnodes.is_empty() {
        return;
    }
    tracing::info!(
        count = vnodes.len(),
        bridge = %state.nodes.vnodes.bridge(),
        "starting the virtual nodes"
    );
    for v in vnodes {
        let _ = state.nodes.vnodes.start(state, &v.device.mac);
    }
}

/// Where a virtual node's files are: `<data>/vnodes/<mac>/`.
pub fn vnode_dir(data_dir: &Path, mac: &str) -> PathBuf {
    data_dir.join("vnodes").join(mac)
}

struct Supervisor {
    state: Arc<State>,
    mac: String,
    tap: String,
    bridge: String,
    kvm: bool,
    output: broadcast::Sender<Bytes>,
}

/// Why qemu was stopped or ended.
enum End {
    Exited(std::process::ExitStatus),
    Reboot(&'static str),
    Stop,
}

impl Supervisor {
    fn dir(&self) -> PathBuf {
        vnode_dir(&self.state.nodes.paths.data_dir, &self.mac)
    }

    /// The node as recorded and the manifest of its image (None once it
    /// was removed).
    async fn record(&self) -> Option<(Device, VnodeConf, Option<String>)> {
        let st = self.state.clone();
        let mac = self.mac.clone();
        tokio::task::spawn_blocking(move || {
            let v = st.store.get_vnode(&mac).ok()??;
            let manifest = v
                .device
                .image
                .as_ref()
                .and_then(|i| st.store.get_image(i).ok().flatten())
                .map(|r| r.manifest_digest.to_string());
            Some((v.device, v.conf, manifest))
        })
        .await
        .ok()
        .flatten()
    }

    async fn run(
        self,
        mut cmds: mpsc::UnboundedReceiver<Cmd>,
        mut input: mpsc::Receiver<Bytes>,
        started: oneshot::Sender<Result<u32, String>>,
    ) {
        // Told once, at the first attempt; `None` afterwards.
        let mut first_start = Some(started);
        let mut served = self.state.nodes.serving.reconciled();
        let shutdown = self.state.shutdown.clone();
        loop {
            let Some((dev, conf, manifest)) = self.record().await else {
                break;
            };
            if let Err(e) = self.make_tap().await {
                tracing::error!(node = %dev.name, "virtual node {}: {e}", dev.name);
                if let Some(s) = first_start.take() {
                    let _ = s.send(Err(e.to_string()));
                }
                if self.wait_or_stop(&mut cmds, RESTART_DELAY * 5).await {
                    break;
                }
                continue;
            }
            let mut child = match self.spawn_qemu(&dev, &conf).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(node = %dev.name, "virtual node {}: cannot start qemu: {e}", dev.name);
                    if let Some(s) = first_start.take() {
                        let _ = s.send(Err(format!("cannot start qemu: {e}")));
                    }
                    if self.wait_or_stop(&mut cmds, RESTART_DELAY * 5).await {
                        break;
                    }
                    continue;
                }
            };
            if let Some(s) = first_start.take() {
                let _ = s.send(Ok(child.id().unwrap_or(0)));
            }
            let started = Instant::now();
            tracing::info!(
                node = %dev.name,
                mac = %self.mac,
                pid = child.id().unwrap_or(0),
                accel = if self.kvm { "kvm" } else { "tcg" },
                "virtual node {} started (qemu)",
                dev.name
            );
            let stdout = child.stdout.take();
            let mut stdin = child.stdin.take();
            let reader =
                stdout.map(|s| tokio::spawn(relay_output(s, self.dir(), self.output.clone())));
            let end = loop {
                tokio::select! {
                    st = child.wait() => match st {
                        Ok(st) => break End::Exited(st),
                        Err(e) => {
                            tracing::error!(node = %dev.name, "waiting for qemu: {e}");
                            break End::Reboot("qemu could not be waited for");
                        }
                    },
                    c = cmds.recv() => match c {
                        Some(Cmd::Reboot) => break End::Reboot("reboot requested"),
                        Some(Cmd::Stop) | None => break End::Stop,
                    },
                    _ = shutdown.cancelled() => break End::Stop,
                    Some(bytes) = input.recv() => {
                        if let Some(s) = stdin.as_mut()
                            && s.write_all(&bytes).await.is_err()
                        {
                            stdin = None;
                        }
                    }
                    r = served.changed() => {
                        if r.is_err() {
                            // Serving stopped: the server stops.
                            break End::Stop;
                        }
                        // Its image changed and the new one is served.
                        if let Some((_, _, now)) = self.record().await
                            && now != manifest
                            && now.as_deref().is_some_and(|m| self.served(m))
                        {
                            break End::Reboot("its image changed");
                        }
                    }
                }
            };
            if !matches!(end, End::Exited(_)) {
                let _ = child.kill().await;
            }
            drop(stdin);
            if let Some(r) = reader {
                let _ = r.await;
            }
            match end {
                End::Stop => break,
                End::Reboot(why) => {
                    tracing::info!(node = %dev.name, "virtual node {} rebooting: {why}", dev.name);
                }
                End::Exited(st) => {
                    tracing::info!(node = %dev.name, "virtual node {} stopped ({st}): starting it again", dev.name);
                    // One that dies at once is not restarted in a busy loop.
                    if started.elapsed() < RESTART_DELAY * 5
                        && self.wait_or_stop(&mut cmds, RESTART_DELAY).await
                    {
                        break;
                    }
                }
            }
        }
        self.delete_tap().await;
        tracing::info!(mac = %self.mac, "virtual node {} stopped", self.mac);
    }

    fn served(&self, manifest: &str) -> bool {
        walt_core::Digest::parse(manifest)
            .map(|d| self.state.nodes.serving.is_mounted(&d))
            .unwrap_or(false)
    }

    /// Waits `d`; true when the node must stop meanwhile.
    async fn wait_or_stop(&self, cmds: &mut mpsc::UnboundedReceiver<Cmd>, d: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(d) => false,
            _ = self.state.shutdown.cancelled() => true,
            c = cmds.recv() => !matches!(c, Some(Cmd::Reboot)),
        }
    }

    /// A tap device plugged into the bridge, up (made again when present).
    async fn make_tap(&self) -> Result<(), String> {
        if Path::new("/sys/class/net").join(&self.tap).exists() {
            let _ = ip(&["link", "del", &self.tap]).await;
        }
        if !Path::new("/sys/class/net").join(&self.bridge).exists() {
            return Err(format!(
                "the walt network bridge '{}' does not exist (create it, or set {BRIDGE_ENV})",
                self.bridge
            ));
        }
        ip(&["tuntap", "add", "dev", &self.tap, "mode", "tap"]).await?;
        if let Err(e) = ip(&[
            "link",
            "set",
            "dev",
            &self.tap,
            "master",
            &self.bridge,
            "up",
        ])
        .await
        {
            let _ = ip(&["link", "del", &self.tap]).await;
            return Err(e);
        }
        Ok(())
    }

    async fn delete_tap(&self) {
        if Path::new("/sys/class/net").join(&self.tap).exists()
            && let Err(e) = ip(&["link", "del", &self.tap]).await
        {
            tracing::warn!(tap = %self.tap, "cannot delete the tap device: {e}");
        }
    }

    /// The disk files (`disk_<i>.dd`, sparse), made or resized to the
    /// configured sizes; their qemu arguments.
    fn disk_args(&self, conf: &VnodeConf) -> Result<Vec<String>, String> {
        let sizes = parse_disks(&conf.disks)?;
        let dir = self.dir();
        let mut args = Vec::new();
        for (i, gb) in sizes.iter().enumerate() {
            let path = dir.join(format!("disk_{i}.dd"));
            let bytes = gb * 1_000_000_000;
            let f = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
            if f.metadata().map(|m| m.len()).unwrap_or(0) != bytes {
                f.set_len(0)
                    .and_then(|_| f.set_len(bytes))
                    .map_err(|e| format!("cannot size {}: {e}", path.display()))?;
            }
            if i == 0 {
                args.extend([
                    "-device".to_string(),
                    "virtio-scsi-pci,id=scsi0".to_string(),
                ]);
            }
            args.extend([
                "-drive".to_string(),
                format!("file={},format=raw,id=disk{i},if=none", path.display()),
                "-device".to_string(),
                format!("scsi-hd,drive=disk{i},product=QEMU-DISK"),
            ]);
        }
        // Disks no longer configured go.
        for i in sizes.len()..MAX_DISKS {
            let _ = std::fs::remove_file(dir.join(format!("disk_{i}.dd")));
        }
        Ok(args)
    }

    async fn spawn_qemu(
        &self,
        dev: &Device,
        conf: &VnodeConf,
    ) -> Result<tokio::process::Child, String> {
        let dir = self.dir();
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let disks = self.disk_args(conf)?;
        let mut cmd = tokio::process::Command::new("qemu-system-x86_64");
        cmd.args(["-name", &dev.name, "-machine", "pc"]);
        if self.kvm {
            cmd.args(["-accel", "kvm", "-cpu", "host", "-accel", "tcg"]);
        } else {
            cmd.args(["-accel", "tcg"]);
        }
        cmd.arg("-m")
            .arg(conf.ram_mb.to_string())
            .arg("-smp")
            .arg(conf.cpu_cores.to_string())
            // The serial port (and the BIOS and iPXE messages) on stdio.
            .args(["-nographic", "-serial", "stdio", "-monitor", "none"])
            // A guest reboot ends qemu: the supervisor starts it again.
            .arg("-no-reboot")
            // PXE; without a boot script (DHCP or TFTP failed) the BIOS
            // reboots after 5 s, i.e. qemu ends and starts again.
            .args(["-boot", "order=n,reboot-timeout=5000"])
            .arg("-netdev")
            .arg(format!(
                "tap,id=walt-net,ifname={},script=no,downscript=no",
                self.tap
            ))
            .arg("-device")
            .arg(format!("virtio-net-pci,netdev=walt-net,mac={}", self.mac))
            .args(&disks)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(
                std::fs::File::create(dir.join("qemu.stderr"))
                    .map(Stdio::from)
                    .unwrap_or_else(|_| Stdio::null()),
            )
            .kill_on_drop(true);
        // SAFETY: between fork and exec only async-signal-safe calls
        // (prctl, getppid); the child dies with the server's thread that
        // started it (a runtime worker, alive as long as the server).
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGKILL as libc::c_ulong,
                    0,
                    0,
                    0,
                ) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                // The server died before the prctl: do not outlive it.
                if libc::getppid() == 1 {
                    return Err(std::io::Error::other("the server is gone"));
                }
                Ok(())
            });
        }
        cmd.spawn().map_err(|e| e.to_string())
    }
}

/// Copies what qemu prints to the console sessions and to the console
/// log (each line stamped with the Unix time it was read, in ms), until
/// qemu closes its stdout.
async fn relay_output(
    mut out: tokio::process::ChildStdout,
    dir: PathBuf,
    tx: broadcast::Sender<Bytes>,
) {
    let path = dir.join("console.log");
    let mut log = match tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .await
    {
        Ok(f) => Some(f),
        Err(e) => {
            tracing::warn!("cannot open {}: {e}", path.display());
            None
        }
    };
    let mut buf = vec![0u8; 8192];
    let mut at_line_start = true;
    let mut stamped = Vec::with_capacity(16384);
    loop {
        let n = match out.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let chunk = &buf[..n];
        let _ = tx.send(Bytes::copy_from_slice(chunk));
        let Some(f) = log.as_mut() else {
            continue;
        };
        stamped.clear();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let stamp = format!("[{}.{:03}] ", now.as_secs(), now.subsec_millis());
        for &b in chunk {
            if at_line_start {
                stamped.extend_from_slice(stamp.as_bytes());
                at_line_start = false;
            }
            if b == b'\r' {
                continue;
            }
            stamped.push(b);
            if b == b'\n' {
                at_line_start = true;
            }
        }
        if f.write_all(&stamped).await.is_err() {
            log = None;
            continue;
        }
        if f.metadata().await.map(|m| m.len()).unwrap_or(0) > MAX_CONSOLE_LOG {
            // Keep the newer half.
            if let Ok(data) = tokio::fs::read(&path).await {
                let keep = &data[data.len() / 2..];
                let _ = tokio::fs::write(&path, keep).await;
            }
            log = tokio::fs::OpenOptions::new()
                .append(true)
                .open(&path)
                .await
                .ok();
        }
    }
}

async fn ip(args: &[&str]) -> Result<(), String> {
    let out = tokio::process::Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_are_stable_qemu_ones() {
        let a = vnode_mac("vnode1", 0);
        assert_eq!(a, vnode_mac("vnode1", 0));
        assert!(a.starts_with("52:54:00:"), "{a}");
        assert_ne!(a, vnode_mac("vnode2", 0));
        assert_ne!(a, vnode_mac("vnode1", 1));
        assert_eq!(walt_core::models::normalize_mac(&a).as_deref(), Some(&*a));
        let t = tap_name(&a);
        assert!(t.len() <= 15 && t.starts_with("walt-vn-"), "{t}");
        assert_eq!(&t[8..], &a.replace(':', "")[6..]);
    }

    #[test]
    fn settings_are_parsed_as_walt_does() {
        assert_eq!(parse_ram("512M"), Ok(512));
        assert_eq!(parse_ram("2G"), Ok(2048));
        assert!(parse_ram("512").is_err());
        assert!(parse_ram("1K").is_err());
        assert!(parse_ram("32M").is_err());
        assert!(parse_ram("99999999999G").is_err());
        assert_eq!(show_ram(2048), "2G");
        assert_eq!(show_ram(512), "512M");
        assert_eq!(parse_cpu_cores("4"), Ok(4));
        assert!(parse_cpu_cores("0").is_err());
        assert!(parse_cpu_cores("65").is_err());
        assert!(parse_cpu_cores("x").is_err());
        assert_eq!(parse_disks("none"), Ok(vec![]));
        assert_eq!(parse_disks("8G,1T"), Ok(vec![8, 1000]));
        assert_eq!(parse_disks("8G[template=none]"), Ok(vec![8]));
        assert!(
            parse_disks("8G[template=ext4]")
                .unwrap_err()
                .contains("not supported")
        );
        assert!(parse_disks("8G[x=y]").is_err());
        assert!(parse_disks("8").is_err());
        assert!(parse_disks("0G").is_err());
        assert!(parse_disks("17T").is_err());
        assert!(parse_disks("1G,1G,1G,1G,1G,1G,1G,1G,1G").is_err());
    }
}
