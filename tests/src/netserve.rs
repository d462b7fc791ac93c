//! The servers nodes boot from, run for real on 127.0.0.1: tftpd-hpa with
//! walt's remap file, chrooted in walt's TFTP root, and nfs-ganesha (NFSv4 only, so no rpcbind)
//! exporting what walt's exports file lists. Clients: busybox `tftp`
//! (exit status 1 on errors, unlike tftp-hpa's) and libnfs's `nfs-ls` /
//! `nfs-cat`.

use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tempfile::TempDir;

use crate::util::{free_port, port_open, wait_for};

fn kill_and_wait(child: &mut Child) {
    // SAFETY: plain kill(2) on our own child's pid.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
    let stopped = wait_for("the server to stop", Duration::from_secs(10), || {
        matches!(child.try_wait(), Ok(Some(_))).then_some(())
    });
    if stopped.is_err() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// A free UDP port on 127.0.0.1 (at the time of the call).
fn free_udp_port() -> Result<u16> {
    let s = UdpSocket::bind("127.0.0.1:0")?;
    Ok(s.local_addr()?.port())
}

/// `in.tftpd` (tftpd-hpa) in the foreground on 127.0.0.1, with a remap
/// file, chrooted (`-s`) in walt's TFTP root, running as root (an image's
/// boot files may be root's only), as docs/configuration.md says.
pub struct Tftpd {
    child: Child,
    port: u16,
    dir: TempDir,
}

impl Tftpd {
    /// `in.tftpd -L -s -u root -a 127.0.0.1:<port> -m <map> <root>`;
    /// returns once it holds its port.
    pub fn start(map: &Path, root: &Path) -> Result<Self> {
        let port = free_udp_port()?;
        let child = Command::new("in.tftpd")
            .args(["-L", "-s", "-u", "root", "-a"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("-m")
            .arg(map)
            .arg(root)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start in.tftpd (apt-get install tftpd-hpa)")?;
        let mut t = Tftpd {
            child,
            port,
            dir: tempfile::tempdir()?,
        };
        // Listening = the port cannot be bound any more.
        let child = &mut t.child;
        wait_for("in.tftpd to listen", Duration::from_secs(10), || {
            if let Ok(Some(st)) = child.try_wait() {
                return Some(Err(anyhow::anyhow!("in.tftpd exited: {st}")));
            }
            UdpSocket::bind(("127.0.0.1", port))
                .is_err()
                .then_some(Ok(()))
        })??;
        Ok(t)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `busybox tftp -g` of `remote` (as a client on 127.0.0.1): its bytes.
    pub fn get(&self, remote: &str) -> Result<Vec<u8>> {
        let local = self.dir.path().join("got");
        let _ = std::fs::remove_file(&local);
        let out = Command::new("busybox")
            .args(["tftp", "-g", "-r", remote, "-l"])
            .arg(&local)
            .arg("127.0.0.1")
            .arg(self.port.to_string())
            .output()
            .context("cannot run busybox tftp")?;
        if !out.status.success() {
            bail!(
                "tftp get {remote}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(std::fs::read(&local)?)
    }

    /// `busybox tftp -p` of `data` as `remote`.
    pub fn put(&self, remote: &str, data: &[u8]) -> Result<()> {
        let local = self.dir.path().join("put");
        std::fs::write(&local, data)?;
        let out = Command::new("busybox")
            .args(["tftp", "-p", "-l"])
            .arg(&local)
            .args(["-r", remote])
            .arg("127.0.0.1")
            .arg(self.port.to_string())
            .output()
            .context("cannot run busybox tftp")?;
        if !out.status.success() {
            bail!(
                "tftp put {remote}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }
}

impl Drop for Tftpd {
    fn drop(&mut self) {
        kill_and_wait(&mut self.child);
    }
}

/// nfs-ganesha (FSAL VFS), NFSv4 only on 127.0.0.1, without grace period.
pub struct Ganesha {
    child: Child,
    port: u16,
    dir: TempDir,
}

impl Ganesha {
    /// Exports each path read-only at the same pseudo path.
    pub fn start(paths: &[PathBuf]) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let recov = dir.path().join("recov");
        std::fs::create_dir_all(&recov)?;
        let port = free_port();
        let mut conf = format!(
            "NFS_CORE_PARAM {{ Protocols = 4; Enable_NLM = false; Enable_RQUOTA = false; Enable_UDP = false; Bind_addr = 127.0.0.1; NFS_Port = {port}; }}
NFSV4 {{ Graceless = true; Allow_Numeric_Owners = true; Only_Numeric_Owners = true; Lease_Lifetime = 10; RecoveryBackend = fs; RecoveryRoot = {}; }}
NFS_KRB5 {{ Active_krb5 = false; }}
EXPORT_DEFAULTS {{ Access_Type = RO; Squash = No_Root_Squash; SecType = sys; Protocols = 4; Transports = TCP; }}
LOG {{ Default_Log_Level = EVENT; }}
",
            recov.display()
        );
        for (i, p) in paths.iter().enumerate() {
            conf.push_str(&format!(
                "EXPORT {{ Export_Id = {}; Path = {}; Pseudo = {}; FSAL {{ Name = VFS; }} }}\n",
                i + 1,
                p.display(),
                p.display()
            ));
        }
        let conf_path = dir.path().join("ganesha.conf");
        std::fs::write(&conf_path, conf)?;
        let child = Command::new("ganesha.nfsd")
            .arg("-F")
            .arg("-f")
            .arg(&conf_path)
            .arg("-L")
            .arg(dir.path().join("ganesha.log"))
            .arg("-p")
            .arg(dir.path().join("ganesha.pid"))
            .args(["-N", "NIV_EVENT"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start ganesha.nfsd (apt-get install nfs-ganesha nfs-ganesha-vfs)")?;
        let mut g = Ganesha { child, port, dir };
        let child = &mut g.child;
        wait_for("ganesha.nfsd to listen", Duration::from_secs(20), || {
            if let Ok(Some(st)) = child.try_wait() {
                return Some(Err(anyhow::anyhow!("ganesha.nfsd exited: {st}")));
            }
            port_open(port).then_some(Ok(()))
        })??;
        Ok(g)
    }

    /// The server's log (why an export failed).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("ganesha.log")).unwrap_or_default()
    }

    fn url(&self, path: &str) -> String {
        format!("nfs://127.0.0.1{path}?version=4&nfsport={}", self.port)
    }

    /// `nfs-ls` of a directory: the names it lists.
    pub fn ls(&self, path: &str) -> Result<Vec<String>> {
        let out = Command::new("nfs-ls")
            .arg(self.url(path))
            .output()
            .context("cannot run nfs-ls (apt-get install libnfs-utils)")?;
        if !out.status.success() {
            bail!(
                "nfs-ls {path}: {}\nganesha log:\n{}",
                String::from_utf8_lossy(&out.stderr).trim(),
                self.log()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().last().map(str::to_string))
            .collect())
    }

    /// `nfs-cat` of a file.
    pub fn cat(&self, path: &str) -> Result<Vec<u8>> {
        let out = Command::new("nfs-cat")
            .arg(self.url(path))
            .output()
            .context("cannot run nfs-cat (apt-get install libnfs-utils)")?;
        if !out.status.success() {
            bail!(
                "nfs-cat {path}: {}\nganesha log:\n{}",
                String::from_utf8_lossy(&out.stderr).trim(),
                self.log()
            );
        }
        Ok(out.stdout)
    }
}

impl Drop for Ganesha {
    fn drop(&mut self) {
        kill_and_wait(&mut self.child);
    }
}

/// The exported paths of a walt exports file (`<path> <clients>(opts)`
/// lines; comments skipped), with each one's `fsid=` when it has one.
pub fn exports_entries(text: &str) -> Vec<(PathBuf, Option<String>)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let (path, rest) = l.split_once(' ')?;
            let fsid = rest
                .split(['(', ',', ')'])
                .find_map(|o| o.strip_prefix("fsid="))
                .map(str::to_string);
            Some((PathBuf::from(path), fsid))
        })
        .collect()
}

/// The mount points of this mount namespace strictly below `dir`.
pub fn mounts_below(dir: &Path) -> Vec<PathBuf> {
    let Ok(dir) = dir.canonicalize() else {
        return Vec::new();
    };
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(PathBuf::from)
        .filter(|p| p.starts_with(&dir) && p != &dir)
        .collect()
}
