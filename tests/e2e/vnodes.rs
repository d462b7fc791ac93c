//! Virtual nodes end to end (issue 17): a fresh server with an empty store,
//! the real pc-x86-64 default image only in a local registry, a real walt
//! network on a bridge (dnsmasq with the shipped hook, tftpd-hpa with
//! walt's map, rpcbind + nfs-ganesha: `walt_e2e::vnet`), and
//! `walt node create`: the server's qemu PXE-boots the image (DHCP → iPXE
//! script over TFTP → kernel + initramfs → NFS root under a tmpfs overlay)
//! up to the login prompt on its serial console; a copy of the image made
//! with `walt image shell` is booted with `walt node boot`; `walt node
//! remove` leaves nothing behind. Runs under TCG here: minutes per boot.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use walt_e2e::default_images;
use walt_e2e::dhcp::{DeviceRow, devices};
use walt_e2e::netserve::{exports_entries, mounts_below};
use walt_e2e::util::wait_for;
use walt_e2e::vnet::{VnodeNet, console_log, qemu_pids};
use walt_e2e::{Registry, RegistryOpts, WaltServer};

/// Generous: the machine is shared and qemu runs under TCG.
const BOOT_TIMEOUT: Duration = Duration::from_secs(900);

/// `walt node console <node>` with pipes (no terminal): what it printed so
/// far, and keystrokes.
struct Console {
    child: Child,
    stdin: Option<ChildStdin>,
    out: Arc<Mutex<String>>,
}

impl Console {
    fn attach(alice: &walt_e2e::Walt, node: &str) -> Self {
        let mut child = alice
            .command(&["node", "console", node])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take();
        let mut stdout = child.stdout.take().unwrap();
        let out = Arc::new(Mutex::new(String::new()));
        let o = out.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                o.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Console { child, stdin, out }
    }

    fn text(&self) -> String {
        self.out.lock().unwrap().clone()
    }

    fn send(&mut self, keys: &str) {
        let s = self.stdin.as_mut().expect("console stdin");
        s.write_all(keys.as_bytes()).unwrap();
        s.flush().unwrap();
    }

    /// Waits for `needle` in what the console printed after byte `from`;
    /// returns the position after it. `nudge` is typed every 10 s meanwhile
    /// (e.g. Enter, to have a login prompt printed again).
    fn wait(
        &mut self,
        what: &str,
        needle: &str,
        from: usize,
        nudge: Option<&str>,
        t: Duration,
    ) -> usize {
        let start = Instant::now();
        let mut last_nudge = Instant::now();
        loop {
            let text = self.text();
            if let Some(i) = text.get(from..).and_then(|t| t.find(needle)) {
                return from + i + needle.len();
            }
            if start.elapsed() > t {
                panic!(
                    "timed out waiting for {what} ({needle:?}) on the console; it printed:\n{}",
                    &text[from.min(text.len())..]
                );
            }
            if let Some(k) = nudge
                && last_nudge.elapsed() > Duration::from_secs(10)
            {
                self.send(k);
                last_nudge = Instant::now();
            }
            let _ = wait_for("console output", Duration::from_millis(300), || {
                (self.out.lock().unwrap().len() != text.len()).then_some(())
            });
        }
    }

    /// Logs in as root (no password in the default image) and runs `cmd`;
    /// returns what it printed between two markers the shell computes.
    fn login_and_run(&mut self, cmd: &str) -> String {
        let from = self.text().len();
        self.send("\r");
        let p = self.wait(
            "the login prompt",
            "login:",
            from,
            Some("\r"),
            Duration::from_secs(120),
        );
        self.send("root\r");
        // root has no password in the default image: its shell prompt.
        let p = self.wait(
            "the root shell prompt",
            "# ",
            p,
            None,
            Duration::from_secs(120),
        );
        // The markers are computed by the shell: the echo of the command
        // line does not match them.
        self.send(&format!("echo BEGIN-$((6*7)); {cmd}; echo END-$((6*7))\r"));
        let b = self.wait(
            "the command to start",
            "BEGIN-42",
            p,
            None,
            Duration::from_secs(120),
        );
        let e = self.wait(
            "the command to end",
            "END-42",
            b,
            None,
            Duration::from_secs(120),
        );
        let text = self.text();
        let out = text[b..e - "END-42".len()].to_string();
        self.send("exit\r");
        out
    }

    /// `<ctrl-a> d`: the client quits with status 0.
    fn detach(mut self) {
        self.send("\x01d");
        let st = wait_for("walt node console to quit", Duration::from_secs(30), || {
            self.child.try_wait().ok().flatten()
        })
        .unwrap();
        assert!(st.success(), "walt node console: {st}");
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `registries` and `docker` sections of a server configuration: the
/// local registry, and a Docker socket that does not exist.
fn registries_conf(local: &Registry) -> String {
    format!(
        "registries:\n{}docker:\n    socket: {}\n",
        local.server_entry("local"),
        std::env::temp_dir()
            .join(format!("walt-e2e-no-docker-{}.sock", std::process::id()))
            .display()
    )
}

fn device(data: &Path, name: &str) -> Option<DeviceRow> {
    devices(data).ok()?.into_iter().find(|d| d.name == name)
}

#[test]
fn a_virtual_node_boots_the_default_image_then_a_copy_and_is_removed() {
    let img = default_images::default_image("pc-x86-64").unwrap();
    let bridge = VnodeNet::bridge().unwrap();
    // The bridge the server plugs its virtual nodes into. SAFETY: nextest
    // runs each test in its own process; no other thread reads the
    // environment yet.
    unsafe { std::env::set_var("WALT_VNODE_BRIDGE", bridge.bridge()) };
    set_accel();
    let server_ip = bridge.server_ip();
    // The server's ssh key, which it installs in the images it serves to
    // nodes (`<HOME>/.ssh/id_*.pub`): a fresh one, in a HOME of the test's.
    let home = tempfile::Builder::new()
        .prefix("walt-e2e-home-")
        .tempdir()
        .unwrap();
    let key = server_ssh_key(home.path());
    // SAFETY: as above (no other thread reads the environment yet).
    unsafe { std::env::set_var("HOME", home.path()) };
    let local = Registry::start(RegistryOpts::plain()).unwrap();
    img.seed(&local).unwrap();
    let config = format!(
        "network:\n  walt-net:\n    ip: {server_ip}/24\n{}nodes:\n  unmount-grace: 0s\n",
        registries_conf(&local)
    );
    let server = WaltServer::start_with_config(&config).unwrap();
    let data = server.data_dir();
    let vnet = VnodeNet::serve(
        bridge,
        &data,
        &server.tftp_map_file(),
        &server.event_socket(),
    )
    .unwrap();
    let alice = server.cli("alice", &[]);
    let fail = |what: &str| -> String {
        format!("{what}\nserver log:\n{}\n{}", server.log(), vnet.logs())
    };

    // ----- 1. create: fetched once, DHCP + hook, TFTP, NFS root, login -----
    let t0 = Instant::now();
    let out = alice.run(&["node", "create", "vnode1"]);
    out.assert_success();
    assert!(out.stdout.contains("Node vnode1 created"), "{out}");
    let dev = device(&data, "vnode1").expect("vnode1 recorded");
    assert_eq!(dev.kind, "node");
    assert_eq!(dev.model.as_deref(), Some("pc-x86-64"));
    assert_eq!(
        dev.image.as_deref(),
        Some("waltplatform/pc-x86-64-default:latest")
    );
    let mac = dev.mac.clone();
    assert!(mac.starts_with("52:54:00:"), "{mac}");
    let log = server.log();
    assert_eq!(
        log.matches(
            "default image of pc-x86-64 downloaded from local:waltplatform/pc-x86-64-default:latest"
        )
        .count(),
        1,
        "{log}"
    );
    assert_eq!(qemu_pids(&mac).len(), 1, "{}", fail("one qemu for vnode1"));
    let tap = format!("walt-vn-{}", &mac.replace(':', "")[6..]);
    assert!(Path::new("/sys/class/net").join(&tap).exists());
    // The same name gives the same MAC; a second create is refused.
    alice
        .run(&["node", "create", "vnode1"])
        .assert_failure("already exists");

    // The hook reported its lease: it has an address of the walt network.
    let prefix = server_ip.rsplit_once('.').unwrap().0.to_string() + ".";
    let ip = wait_for("vnode1 to get an address", BOOT_TIMEOUT, || {
        device(&data, "vnode1")?
            .ip
            .filter(|ip| ip.starts_with(&prefix))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", fail("")));
    let t_dhcp = t0.elapsed();
    // TFTP served its start.ipxe: iPXE runs the script's first line.
    let booting = format!("walt: booting {ip} from {server_ip}");
    wait_for("iPXE to run start.ipxe", BOOT_TIMEOUT, || {
        console_log(&data, &mac).contains(&booting).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\nconsole:\n{}\n{}", console_log(&data, &mac), fail("")));
    let t_ipxe = t0.elapsed();
    // The whole boot, up to the login prompt on the serial console.
    wait_for("vnode1 to reach its login prompt", BOOT_TIMEOUT, || {
        console_log(&data, &mac).contains("login:").then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\nconsole:\n{}\n{}", console_log(&data, &mac), fail("")));
    let t_login = t0.elapsed();
    eprintln!(
        "vnode1: address after {t_dhcp:?}, start.ipxe after {t_ipxe:?}, login prompt after {t_login:?} (target: 240 s under TCG)"
    );
    // Its root is the image, over NFS, under the tmpfs overlay.
    let id = dev_manifest_hex(&data, "vnode1");
    assert_eq!(
        vnet.exported().get(&ip),
        Some(
            &data
                .canonicalize()
                .unwrap()
                .join("images")
                .join(&id)
                .join("fs")
        )
    );
    let mut console = Console::attach(&alice, "vnode1");
    let mounts = console.login_and_run("grep -E ' / | /media/root-ro ' /proc/mounts");
    assert!(
        mounts.contains(&format!(
            "{server_ip}:/var/lib/walt/nodes/{ip}/fs /media/root-ro nfs ro"
        )),
        "{mounts}"
    );
    assert!(mounts.contains("overlay / overlay rw"), "{mounts}");

    // ----- 2. a copy with /root/marker, booted with walt node boot -----
    let out = alice.run(&["image", "show"]);
    out.assert_success();
    assert!(out.stdout.contains("pc-x86-64-default"), "{out}");
    let (t, exit) = alice.in_terminal("image shell pc-x86-64-default");
    t.wait_line("the shell prompt", |l| l.ends_with('#'))
        .unwrap();
    t.enter("echo vnode-marker-4242 > /root/marker; exit")
        .unwrap();
    t.wait_line("the save prompt", |l| {
        l.starts_with("Name of the image to save")
    })
    .unwrap();
    t.enter("mycopy").unwrap();
    t.wait_line("the result", |l| {
        l.contains("mycopy") && l.ends_with("saved.")
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", t.screen()));
    assert_eq!(
        t.exit_status(&exit, Duration::from_secs(60)),
        0,
        "{}",
        t.screen()
    );
    drop(t);
    let from = console.text().len();
    let boots = console_log(&data, &mac).matches(&booting).count();
    let t1 = Instant::now();
    let out = alice.run(&["node", "boot", "vnode1", "mycopy"]);
    out.assert_success();
    assert!(
        out.stdout.contains("Node vnode1 will now boot mycopy."),
        "{out}"
    );
    // It reboots by itself into the copy.
    wait_for("vnode1 to reboot", BOOT_TIMEOUT, || {
        (console_log(&data, &mac).matches(&booting).count() > boots).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", fail("")));
    console.wait(
        "the login prompt after the reboot",
        "login:",
        from,
        Some("\r"),
        BOOT_TIMEOUT,
    );
    eprintln!(
        "vnode1: boot of mycopy to the login prompt in {:?}",
        t1.elapsed()
    );
    let new_id = dev_manifest_hex(&data, "vnode1");
    assert_ne!(new_id, id, "mycopy has the default image's manifest");
    let marker = console.login_and_run("cat /root/marker");
    assert!(marker.contains("vnode-marker-4242"), "{marker}");
    console.detach();
    // The node answers on ssh with the server's key (its sshd may start
    // just after the login prompt).
    let over_ssh = wait_for("vnode1 to answer on ssh", Duration::from_secs(120), || {
        let out = ssh(&key, &ip, "cat /root/marker");
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    })
    .unwrap_or_else(|e| {
        let out = ssh(&key, &ip, "true");
        panic!(
            "{e}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            fail("")
        )
    });
    assert_eq!(over_ssh.trim(), "vnode-marker-4242");
    // A key the server does not have is refused.
    let other = server_ssh_key(&home.path().join("other"));
    assert!(!ssh(&other, &ip, "true").status.success());

    // walt node reboot power-cycles it.
    let boots = console_log(&data, &mac).matches(&booting).count();
    let out = alice.run(&["node", "reboot", "vnode1"]);
    out.assert_success();
    assert!(out.stdout.contains("Node vnode1 rebooted."), "{out}");
    wait_for("vnode1 to boot again", BOOT_TIMEOUT, || {
        (console_log(&data, &mac).matches(&booting).count() > boots).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", fail("")));

    // WALT_E2E_SHOW_NET_LOGS=1: the walt network's logs (dnsmasq with
    // its DHCP exchanges, tftpd, ganesha) and the console, to see where a
    // boot spends its time.
    if std::env::var_os("WALT_E2E_SHOW_NET_LOGS").is_some() {
        eprintln!("{}\nconsole:\n{}", vnet.logs(), console_log(&data, &mac));
    }

    // ----- 3. remove: no qemu, tap, mount or export left -----
    let out = alice.run(&["node", "remove", "vnode1"]);
    out.assert_success();
    assert!(out.stdout.contains("Node vnode1 removed."), "{out}");
    assert!(qemu_pids(&mac).is_empty(), "qemu still runs");
    assert!(
        !Path::new("/sys/class/net").join(&tap).exists(),
        "tap {tap} left"
    );
    assert!(device(&data, "vnode1").is_none());
    let images = data.join("images");
    wait_for("the image mounts to go", Duration::from_secs(120), || {
        let exports = std::fs::read_to_string(server.exports_file()).unwrap_or_default();
        let exported: Vec<PathBuf> = exports_entries(&exports)
            .into_iter()
            .filter(|(_, fsid)| fsid.is_some())
            .map(|(p, _)| p)
            .collect();
        (mounts_below(&images).is_empty() && exported.is_empty()).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", fail("")));
    alice
        .run(&["node", "console", "vnode1"])
        .assert_failure("no node named 'vnode1'");
}

/// The hex of the manifest of the image node `name` boots.
fn dev_manifest_hex(data: &Path, name: &str) -> String {
    device(data, name)
        .and_then(|d| d.manifest)
        .and_then(|m| m.strip_prefix("sha256:").map(str::to_string))
        .expect("the node's image manifest")
}

/// Unix seconds of a tracing timestamp (`2026-12-01T08:55:19.306265Z`).
fn log_time(line: &str) -> Option<f64> {
    let ts = line.split_whitespace().next()?.strip_suffix('Z')?;
    let (date, time) = ts.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let mut t = time.split(':');
    let (h, mi) = (
        t.next()?.parse::<i64>().ok()?,
        t.next()?.parse::<i64>().ok()?,
    );
    let sec: f64 = t.next()?.parse().ok()?;
    let days = walt_core::civil::days_from_civil(y, m, day);
    Some((days * 86_400 + h * 3600 + mi * 60) as f64 + sec)
}

/// The time of the first line of `text` after `after` (Unix seconds)
/// holding `needle`: server log lines (tracing timestamps) or console log
/// lines (`[<unix>.<ms>] `).
fn first_after(text: &str, needle: &str, after: f64) -> Option<f64> {
    text.lines().find_map(|l| {
        if !l.contains(needle) {
            return None;
        }
        let t = match l.strip_prefix('[') {
            Some(rest) => rest.split_once(']')?.0.parse().ok()?,
            None => log_time(l)?,
        };
        (t >= after).then_some(t)
    })
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Prints the phases of a boot that started at `t0` (Unix seconds), from
/// the server log and the console log; `label` names the run.
fn print_phases(label: &str, t0: f64, server_log: &str, console: &str) {
    let marks: [(&str, Option<f64>); 9] = [
        (
            "default image fetched (server log)",
            first_after(server_log, "default image of pc-x86-64 downloaded", t0),
        ),
        (
            "qemu started (server log)",
            first_after(server_log, "virtual node vnode1 started", t0),
        ),
        (
            "iPXE configures net0 (DHCP, IPv6)",
            first_after(console, "Configuring (net0", t0),
        ),
        (
            "net0 configured: boot file named",
            first_after(console, "start.ipxe", t0),
        ),
        (
            "TFTP: start.ipxe runs",
            first_after(console, "walt: booting", t0),
        ),
        (
            "TFTP: kernel+initrd loaded, kernel starts",
            first_after(console, "Linux version", t0),
        ),
        (
            "initramfs: NFS root mounting",
            first_after(console, "Mounting root file system", t0),
        ),
        (
            "NFS root mounted, init starts",
            first_after(console, "Welcome to", t0),
        ),
        (
            "userspace: login prompt",
            first_after(console, "login:", t0),
        ),
    ];
    println!("vnode-boot {label}: phase, seconds since walt node create (delta)");
    let mut prev = t0;
    for (what, t) in &marks {
        match t {
            Some(t) => {
                println!(
                    "vnode-boot {label}:   {what:<45} {:>7.2} ({:+.2})",
                    t - t0,
                    t - prev
                );
                prev = *t;
            }
            None => println!("vnode-boot {label}:   {what:<45}     n/a"),
        }
    }
    let mount_ms: Vec<&str> = server_log
        .lines()
        .filter(|l| l.contains("image mounted for nodes"))
        .filter_map(|l| l.split(" ms=").nth(1))
        .filter_map(|x| x.split_whitespace().next())
        .collect();
    println!("vnode-boot {label}:   image mounts (server, ms): {mount_ms:?}");
}

/// bench/vnode-boot.sh: the phases of a first boot (fresh server, image
/// only in the registry), then of a power-cycle with the image mounted.
#[test]
#[ignore = "benchmark: run by bench/vnode-boot.sh"]
fn vnode_boot_phases() {
    let img = default_images::default_image("pc-x86-64").unwrap();
    let bridge = VnodeNet::bridge().unwrap();
    // SAFETY: as in the test above.
    unsafe { std::env::set_var("WALT_VNODE_BRIDGE", bridge.bridge()) };
    set_accel();
    let server_ip = bridge.server_ip();
    let local = Registry::start(RegistryOpts::plain()).unwrap();
    img.seed(&local).unwrap();
    let config = format!(
        "network:\n  walt-net:\n    ip: {server_ip}/24\nregistries:\n{}",
        local.server_entry("local")
    );
    let server = WaltServer::start_with_config(&config).unwrap();
    let data = server.data_dir();
    let _vnet = VnodeNet::serve(
        bridge,
        &data,
        &server.tftp_map_file(),
        &server.event_socket(),
    )
    .unwrap();
    let alice = server.cli("alice", &[]);
    let t0 = unix_now();
    alice.run(&["node", "create", "vnode1"]).assert_success();
    let mac = device(&data, "vnode1").unwrap().mac;
    let login = |from: f64| {
        wait_for("the login prompt", BOOT_TIMEOUT, || {
            first_after(&console_log(&data, &mac), "login:", from).map(|_| ())
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", console_log(&data, &mac)))
    };
    login(t0);
    print_phases("cold", t0, &server.log(), &console_log(&data, &mac));
    let t1 = unix_now();
    alice.run(&["node", "reboot", "vnode1"]).assert_success();
    login(t1);
    print_phases("mounted", t1, &server.log(), &console_log(&data, &mac));
    alice.run(&["node", "remove", "vnode1"]).assert_success();
}

/// KVM on these machines is nested and slower than TCG (ENVIRONMENT.md):
/// TCG unless `WALT_VNODE_ACCEL` says otherwise.
fn set_accel() {
    if std::env::var_os("WALT_VNODE_ACCEL").is_none() {
        // SAFETY: as for WALT_VNODE_BRIDGE.
        unsafe { std::env::set_var("WALT_VNODE_ACCEL", "tcg") };
    }
}

/// Makes an ed25519 key pair in `<home>/.ssh/` (no passphrase); returns
/// the private key's path.
fn server_ssh_key(home: &Path) -> PathBuf {
    let dir = home.join(".ssh");
    std::fs::create_dir_all(&dir).unwrap();
    let key = dir.join("id_ed25519");
    let st = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "walt-e2e", "-f"])
        .arg(&key)
        .stdin(Stdio::null())
        .status()
        .expect("ssh-keygen (openssh-client) must be installed");
    assert!(st.success(), "ssh-keygen: {st}");
    key
}

/// `ssh root@<ip> <cmd>` with `key` only, no host key check, no prompt.
fn ssh(key: &Path, ip: &str, cmd: &str) -> std::process::Output {
    std::process::Command::new("ssh")
        .args(["-i"])
        .arg(key)
        .args([
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "ConnectTimeout=5",
            "-o",
            "LogLevel=ERROR",
        ])
        .arg(format!("root@{ip}"))
        .arg(cmd)
        .stdin(Stdio::null())
        .output()
        .expect("ssh (openssh-client) must be installed")
}

/// A virtual node whose qemu cannot be started (here: its tap cannot join
/// a bridge that does not exist) is refused by `walt node create` with the
/// reason, and nothing of it is left: no device, no tap, no directory.
#[test]
fn a_virtual_node_that_cannot_start_is_refused_and_not_recorded() {
    use walt_e2e::{Compression, Format, ImageBuilder};
    let bridge = format!("walt-nobr{}", std::process::id() % 100_000);
    // SAFETY: nextest runs each test in its own process; no other thread
    // reads the environment yet.
    unsafe { std::env::set_var("WALT_VNODE_BRIDGE", &bridge) };
    let local = Registry::start(RegistryOpts::plain()).unwrap();
    let images = ImageBuilder::new().unwrap();
    let pc64 = images
        .busybox_image(Format::Oci, Compression::Gzip, "pc-x86-64")
        .unwrap();
    local
        .client()
        .push_image("waltplatform/pc-x86-64-default", "latest", &pc64)
        .unwrap();
    let server = WaltServer::start_with_config(&registries_conf(&local)).unwrap();
    let alice = server.cli("alice", &[]);
    let out = alice.run(&["node", "create", "vnodebad"]);
    out.assert_failure("cannot create virtual node 'vnodebad'");
    assert!(
        out.stderr.contains(&bridge),
        "the reason names the bridge: {out}"
    );
    assert_eq!(out.stderr.trim().lines().count(), 1, "{out}");
    assert!(
        device(&server.data_dir(), "vnodebad").is_none(),
        "not recorded"
    );
    let mac_dirs = std::fs::read_dir(server.data_dir().join("vnodes"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(mac_dirs, 0, "no virtual node directory left");
    let taps: Vec<String> = std::fs::read_dir("/sys/class/net")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("walt-vn-"))
        .collect();
    for t in &taps {
        let master = std::fs::read_link(format!("/sys/class/net/{t}/master")).ok();
        assert!(
            master.is_none_or(|m| !m.ends_with(&bridge)),
            "tap {t} left on {bridge}"
        );
    }
    // The name is free again: the same refusal, not "already exists".
    alice
        .run(&["node", "create", "vnodebad"])
        .assert_failure("cannot create virtual node 'vnodebad'");
}
