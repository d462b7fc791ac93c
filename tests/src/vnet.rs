//! A walt network for virtual nodes, run for real on the host: a bridge
//! with the server side's address ([`DhcpNet`]), dnsmasq on it running the
//! shipped hook configuration and handing PXE clients `start.ipxe`,
//! tftpd-hpa with walt's remap file on the bridge address, and an NFSv3
//! server (rpcbind + nfs-ganesha) serving each node its root at the path
//! its iPXE script names (`/var/lib/walt/nodes/<ip>/fs`): ganesha cannot
//! follow the node trees' links as the kernel's mountd does, so a watcher
//! thread exports each node's image mount under that pseudo path
//! (`Mount_Path_Pseudo`) and restarts ganesha when a node's image changes.
//!
//! Needs root and `ip`, `dnsmasq`, `in.tftpd`, `rpcbind`, `ganesha.nfsd`,
//! `qemu-system-x86_64` (scripts/install-deps.sh). Everything stops on drop.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::dhcp::{DhcpKind, DhcpNet, DhcpServer, EVENT_SOCKET_ENV};
use crate::util::{port_open, wait_for, workspace_bin};

/// The path node roots are mounted from (`images/common/start.ipxe`).
pub const NODES_PSEUDO_ROOT: &str = "/var/lib/walt/nodes";

fn kill_and_wait(child: &mut Child) {
    // SAFETY: plain kill(2) on our own child's pid.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
    let stopped = wait_for("a server to stop", Duration::from_secs(10), || {
        matches!(child.try_wait(), Ok(Some(_)) | Err(_)).then_some(())
    });
    if stopped.is_err() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

fn log_file(dir: &Path, name: &str) -> Result<(File, File)> {
    let f = File::options()
        .create(true)
        .append(true)
        .open(dir.join(name))?;
    Ok((f.try_clone()?, f))
}

/// The node side's servers for a walt server whose data dir is `data`.
pub struct VnodeNet {
    pub net: DhcpNet,
    dhcp: DhcpServer,
    tftpd: Child,
    rpcbind: Option<Child>,
    nfs: Arc<Mutex<Option<Child>>>,
    stop: Arc<AtomicBool>,
    watcher: Option<std::thread::JoinHandle<()>>,
    /// node IP → exported path, as ganesha serves now.
    exported: Arc<Mutex<BTreeMap<String, PathBuf>>>,
    /// Ganesha (re)starts.
    pub nfs_starts: Arc<Mutex<u32>>,
}

impl VnodeNet {
    /// The bridge first (the server needs its name): see [`VnodeNet::serve`].
    pub fn bridge() -> Result<DhcpNet> {
        DhcpNet::new()
    }

    /// Starts DHCP (hook → `event_socket`), TFTP and NFS on `net` for the
    /// walt data dir `data` (whose TFTP map is `tftp_map`).
    pub fn serve(net: DhcpNet, data: &Path, tftp_map: &Path, event_socket: &Path) -> Result<Self> {
        let dir = net.dir().to_path_buf();
        let ip = net.server_ip();
        let socket = event_socket.to_str().context("socket path")?.to_string();
        let dhcp = DhcpServer::start_with_options(
            DhcpKind::Dnsmasq,
            &net,
            &workspace_bin("walt-dhcp-event"),
            &[(EVENT_SOCKET_ENV, &socket)],
            &["--dhcp-boot=start.ipxe".to_string()],
        )?;
        // tftpd-hpa as docs/configuration.md runs it, on the bridge address.
        let (o, e) = log_file(&dir, "tftpd.log")?;
        let tftpd = Command::new("in.tftpd")
            .args(["-L", "-vvv", "-s", "-u", "root", "-a"])
            .arg(format!("{ip}:69"))
            .arg("-m")
            .arg(tftp_map)
            .arg(data.join("tftp-root"))
            .stdin(Stdio::null())
            .stdout(o)
            .stderr(e)
            .spawn()
            .context("cannot start in.tftpd (apt-get install tftpd-hpa)")?;
        // rpcbind: the initramfs' nfsmount asks it for the NFSv3 ports.
        let rpcbind = if port_open(111) {
            None
        } else {
            std::fs::create_dir_all("/run/rpcbind")?;
            let (o, e) = log_file(&dir, "rpcbind.log")?;
            let c = Command::new("rpcbind")
                .args(["-f", "-w"])
                .stdin(Stdio::null())
                .stdout(o)
                .stderr(e)
                .spawn()
                .context("cannot start rpcbind (apt-get install rpcbind)")?;
            wait_for("rpcbind to listen", Duration::from_secs(10), || {
                port_open(111).then_some(())
            })?;
            Some(c)
        };
        let mut v = Self {
            net,
            dhcp,
            tftpd,
            rpcbind,
            nfs: Arc::new(Mutex::new(None)),
            stop: Arc::new(AtomicBool::new(false)),
            watcher: None,
            exported: Arc::new(Mutex::new(BTreeMap::new())),
            nfs_starts: Arc::new(Mutex::new(0)),
        };
        // The watcher: each node IP's root, exported as its pseudo path.
        let (stop, nfs, exported, starts) = (
            v.stop.clone(),
            v.nfs.clone(),
            v.exported.clone(),
            v.nfs_starts.clone(),
        );
        let data = data.to_path_buf();
        v.watcher = Some(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let want = node_roots(&data);
                let changed = *exported.lock().unwrap() != want;
                if changed {
                    let mut g = nfs.lock().unwrap();
                    if let Some(mut c) = g.take() {
                        kill_and_wait(&mut c);
                    }
                    if !want.is_empty() {
                        match start_ganesha(&dir, &ip, &want) {
                            Ok(c) => {
                                *g = Some(c);
                                *starts.lock().unwrap() += 1;
                            }
                            Err(e) => eprintln!("vnet: cannot start ganesha: {e:#}"),
                        }
                    }
                    *exported.lock().unwrap() = want;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }));
        Ok(v)
    }

    /// What ganesha exports now: node IP → image root.
    pub fn exported(&self) -> BTreeMap<String, PathBuf> {
        self.exported.lock().unwrap().clone()
    }

    /// Logs of the servers (for failure messages).
    pub fn logs(&self) -> String {
        let dir = self.net.dir();
        let mut out = format!("dnsmasq:\n{}\n", self.dhcp.log());
        for f in ["tftpd.log", "ganesha.log", "ganesha.out"] {
            out.push_str(&format!(
                "{f}:\n{}\n",
                std::fs::read_to_string(dir.join(f)).unwrap_or_default()
            ));
        }
        out
    }

    pub fn dhcp_log(&self) -> String {
        self.dhcp.log()
    }
}

impl Drop for VnodeNet {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(w) = self.watcher.take() {
            let _ = w.join();
        }
        if let Some(mut c) = self.nfs.lock().unwrap().take() {
            kill_and_wait(&mut c);
        }
        kill_and_wait(&mut self.tftpd);
        self.dhcp.stop();
        if let Some(mut c) = self.rpcbind.take() {
            kill_and_wait(&mut c);
        }
    }
}

/// Each `nodes/<ipv4>` link of the data dir whose `fs` resolves to a
/// directory: IP → that directory.
fn node_roots(data: &Path) -> BTreeMap<String, PathBuf> {
    let mut out = BTreeMap::new();
    let Ok(rd) = std::fs::read_dir(data.join("nodes")) else {
        return out;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.parse::<std::net::Ipv4Addr>().is_err() {
            continue;
        }
        if let Ok(p) = e.path().join("fs").canonicalize()
            && p.is_dir()
            && p.starts_with(data.join("images").canonicalize().unwrap_or_default())
        {
            out.insert(name, p);
        }
    }
    out
}

/// ganesha.nfsd, NFSv3 (and v4) on `ip`, the standard ports, each root
/// exported read-only at `/var/lib/walt/nodes/<node-ip>/fs`, NFSv3 mounts
/// naming pseudo paths.
fn start_ganesha(dir: &Path, ip: &str, roots: &BTreeMap<String, PathBuf>) -> Result<Child> {
    let recov = dir.join("recov");
    std::fs::create_dir_all(&recov)?;
    let mut conf = format!(
        "NFS_CORE_PARAM {{ Protocols = 3, 4; Enable_NLM = false; Enable_RQUOTA = false; Enable_UDP = true; Bind_addr = {ip}; NFS_Port = 2049; MNT_Port = 20048; Mount_Path_Pseudo = true; }}
NFSV4 {{ Graceless = true; Allow_Numeric_Owners = true; Only_Numeric_Owners = true; Lease_Lifetime = 10; RecoveryBackend = fs; RecoveryRoot = {}; }}
NFS_KRB5 {{ Active_krb5 = false; }}
EXPORT_DEFAULTS {{ Access_Type = RO; Squash = No_Root_Squash; SecType = sys; Protocols = 3, 4; Transports = TCP, UDP; }}
LOG {{ Default_Log_Level = EVENT; }}
",
        recov.display()
    );
    for (i, (node_ip, root)) in roots.iter().enumerate() {
        conf.push_str(&format!(
            "EXPORT {{ Export_Id = {}; Path = {}; Pseudo = {NODES_PSEUDO_ROOT}/{node_ip}/fs; FSAL {{ Name = VFS; }} }}\n",
            i + 1,
            root.display()
        ));
    }
    let path = dir.join("ganesha.conf");
    std::fs::write(&path, conf)?;
    let (o, e) = log_file(dir, "ganesha.out")?;
    let mut cmd = Command::new("ganesha.nfsd");
    // SAFETY: only prctl(2) between fork and exec. Ganesha dies with the
    // watcher thread (i.e. with the test, even when it is killed).
    unsafe {
        use std::os::unix::process::CommandExt;
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
            Ok(())
        });
    }
    let mut child = cmd
        .arg("-F")
        .arg("-f")
        .arg(&path)
        .arg("-L")
        .arg(dir.join("ganesha.log"))
        .arg("-p")
        .arg(dir.join("ganesha.pid"))
        .args(["-N", "NIV_EVENT"])
        .stdin(Stdio::null())
        .stdout(o)
        .stderr(e)
        .spawn()
        .context("cannot start ganesha.nfsd (apt-get install nfs-ganesha nfs-ganesha-vfs)")?;
    let addr: std::net::SocketAddr = format!("{ip}:2049").parse()?;
    let up = wait_for("ganesha.nfsd to listen", Duration::from_secs(20), || {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(Err(anyhow::anyhow!("ganesha.nfsd exited: {st}")));
        }
        std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200))
            .is_ok()
            .then_some(Ok(()))
    });
    match up {
        Ok(Ok(())) => Ok(child),
        Ok(Err(e)) | Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "{e}\n{}",
                std::fs::read_to_string(dir.join("ganesha.log")).unwrap_or_default()
            )
        }
    }
}

/// The lines of a virtual node's console log (`<data>/vnodes/<mac>/console.log`).
pub fn console_log(data: &Path, mac: &str) -> String {
    std::fs::read_to_string(data.join("vnodes").join(mac).join("console.log")).unwrap_or_default()
}

/// The PIDs of the running `qemu-system-x86_64` processes whose command
/// line holds `needle`.
pub fn qemu_pids(needle: &str) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.starts_with("qemu-system-x86_64") && cmd.contains(needle) {
            out.push(pid);
        }
    }
    out
}
