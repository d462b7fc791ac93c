//! Node detection over real DHCP exchanges: network namespaces on a
//! bridge, dnsmasq or isc-dhcp-server running the hook configuration
//! shipped in `contrib/dhcp/`, busybox `udhcpc` as the nodes' client.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use walt_e2e::dhcp::{
    ClientOpts, DeviceRow, DhcpKind, DhcpNet, DhcpServer, EVENT_SOCKET_ENV, RecordingHook, devices,
    wait_device,
};
use walt_e2e::util::{unique_seed, wait_for, workspace_bin};
use walt_e2e::*;

/// The shipped isc-dhcp-server snippet runs the hook with WalT's
/// arguments (`commit <vci> <uci> <ip> <mac> <name> <is_known> <type>`),
/// in dhcpd's environment.
#[test]
fn dhcpd_snippet_passes_walts_arguments() {
    let mut net = DhcpNet::new().unwrap();
    let a = net.add_node(&net.mac(1)).unwrap();
    let b = net.add_node(&net.mac(2)).unwrap();
    let hook = RecordingHook::new().unwrap();
    let _dhcpd = DhcpServer::start(
        DhcpKind::IscDhcpd,
        &net,
        &hook.path(),
        &[(EVENT_SOCKET_ENV, "/some/where.sock")],
    )
    .unwrap();

    let ip_a = a
        .udhcpc(&ClientOpts::vendor_model("pc-x86-64").hostname("nodeA"))
        .unwrap();
    let call = hook
        .wait_call("the hook run for node a", |c| c.args.get(3) == Some(&ip_a))
        .unwrap();
    assert_eq!(
        call.args,
        [
            "commit",
            "walt.node.pc-x86-64",
            "",
            ip_a.as_str(),
            a.mac.as_str(),
            "nodeA",
            "0",
            "unknown"
        ],
        "{call:?}"
    );
    assert_eq!(call.var(EVENT_SOCKET_ENV), Some("/some/where.sock"));

    // The user class (RFC 3004 form) comes through with its length byte;
    // no hostname gives an empty name.
    let ip_b = b
        .udhcpc(&ClientOpts::user_model("rpi-3-b").vendor_class("udhcp 1.35.0"))
        .unwrap();
    let call = hook
        .wait_call("the hook run for node b", |c| c.args.get(3) == Some(&ip_b))
        .unwrap();
    assert_eq!(call.args.len(), 8, "{call:?}");
    assert_eq!(call.args[1], "udhcp 1.35.0");
    // 0x11: the length of `walt.node.rpi-3-b`.
    assert_eq!(call.args[2], "\u{11}walt.node.rpi-3-b");
    assert_eq!(call.args[4], b.mac);
    assert_eq!(call.args[5], "");
}

/// The shipped dnsmasq options run the hook with dnsmasq's
/// `add <mac> <ip> [hostname]` and the classes in DNSMASQ_* variables, in
/// dnsmasq's environment.
#[test]
fn dnsmasq_options_pass_the_lease_and_classes() {
    let mut net = DhcpNet::new().unwrap();
    let a = net.add_node(&net.mac(1)).unwrap();
    let b = net.add_node(&net.mac(2)).unwrap();
    let hook = RecordingHook::new().unwrap();
    let _dnsmasq = DhcpServer::start(
        DhcpKind::Dnsmasq,
        &net,
        &hook.path(),
        &[(EVENT_SOCKET_ENV, "/some/where.sock")],
    )
    .unwrap();

    let ip_a = a
        .udhcpc(&ClientOpts::vendor_model("pc-x86-64").hostname("nodeA"))
        .unwrap();
    let call = hook
        .wait_call("the hook run for node a", |c| c.args.get(2) == Some(&ip_a))
        .unwrap();
    assert_eq!(call.args, ["add", a.mac.as_str(), ip_a.as_str(), "nodeA"]);
    assert_eq!(
        call.var("DNSMASQ_VENDOR_CLASS"),
        Some("walt.node.pc-x86-64"),
        "{call:?}"
    );
    assert_eq!(call.var(EVENT_SOCKET_ENV), Some("/some/where.sock"));

    let ip_b = b.udhcpc(&ClientOpts::user_model("rpi-3-b")).unwrap();
    let call = hook
        .wait_call("the hook run for node b", |c| c.args.get(2) == Some(&ip_b))
        .unwrap();
    assert_eq!(call.args, ["add", b.mac.as_str(), ip_b.as_str()]);
    assert_eq!(call.var("DNSMASQ_USER_CLASS0"), Some("walt.node.rpi-3-b"));
}

/// A registry behind the counting/throttling proxy (the server's only
/// source), a walt server, and an image builder.
struct NodesEnv {
    images: ImageBuilder,
    registry: Registry,
    proxy: Proxy,
    server: WaltServer,
}

impl NodesEnv {
    fn start() -> Self {
        let registry = Registry::start(RegistryOpts::plain()).unwrap();
        let proxy = Proxy::start(registry.port()).unwrap();
        let server = WaltServer::start(&[proxy.server_entry("local")]).unwrap();
        // The server opens its API port before its event socket: a lease
        // reported in between would be lost.
        wait_for("the event socket", Duration::from_secs(30), || {
            server.event_socket().exists().then_some(())
        })
        .unwrap();
        Self {
            images: ImageBuilder::new().unwrap(),
            registry,
            proxy,
            server,
        }
    }

    /// Pushes `waltplatform/<model>-default:latest` (busybox, labelled
    /// for `model`, plus `extra` layers).
    fn push_default(&self, model: &str, extra: &[Layer]) -> BuiltImage {
        let mut layers = vec![
            self.images
                .busybox_layer(Format::Oci, Compression::Gzip, &format!("default {model}"))
                .unwrap(),
        ];
        layers.extend_from_slice(extra);
        let img = self
            .images
            .image(Format::Oci, ImageConfig::amd64(model), &layers)
            .unwrap();
        self.registry
            .client()
            .push_image(&format!("waltplatform/{model}-default"), "latest", &img)
            .unwrap();
        img
    }

    /// `kind` on `net` running the real hook, reporting to this server.
    fn dhcp(&self, kind: DhcpKind, net: &DhcpNet) -> DhcpServer {
        let sock = self.server.event_socket();
        DhcpServer::start(
            kind,
            net,
            &workspace_bin("walt-dhcp-event"),
            &[(EVENT_SOCKET_ENV, sock.to_str().unwrap())],
        )
        .unwrap()
    }

    fn wait_device(&self, mac: &str, what: &str, f: impl Fn(&DeviceRow) -> bool) -> DeviceRow {
        wait_device(&self.server.data_dir(), mac, what, f).unwrap()
    }

    /// Waits until `mac` is a node; fails at once when the server says its
    /// default image could not be obtained.
    fn wait_node(&self, mac: &str) -> DeviceRow {
        let data = self.server.data_dir();
        let res = wait_for(
            &format!("{mac} to become a node"),
            Duration::from_secs(90),
            || {
                let d = devices(&data).ok()?.into_iter().find(|d| d.mac == mac)?;
                if d.kind == "node" {
                    return Some(Ok(d));
                }
                let failed = d
                    .reason
                    .as_deref()
                    .is_some_and(|r| r.contains("not available"));
                failed.then_some(Err(d))
            },
        );
        match res {
            Ok(Ok(d)) => d,
            Ok(Err(d)) => panic!("{mac} did not become a node: {d:?}"),
            Err(e) => panic!("{e}: {:#?}", devices(&data)),
        }
    }

    /// GETs of each path the proxy forwarded (`GET <path>` -> count).
    fn gets(&self) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for r in self.proxy.stats().requests {
            if let Some(path) = r.strip_prefix("GET ").and_then(|r| r.split(" -> ").next()) {
                *m.entry(path.to_string()).or_default() += 1;
            }
        }
        m
    }
}

const DEFAULT_PC: &str = "waltplatform/pc-x86-64-default:latest";

/// The row of `name` in the table under `title` of a `walt node show` or
/// `walt device show` output.
fn row_under(stdout: &str, title: &str, name: &str) -> Option<Vec<String>> {
    stdout
        .lines()
        .skip_while(|l| l.trim() != title)
        .skip(1)
        .skip_while(|l| l.trim().is_empty())
        .take_while(|l| !l.trim().is_empty())
        .map(walt_e2e::store::table_cells)
        .find(|cells| cells.first().map(String::as_str) == Some(name))
}

const FREE: &str = "The following nodes are currently free:";
const NOT_NODES: &str = "The following devices were detected but are not nodes:";

/// The last 6 hex digits of a MAC.
fn suffix(mac: &str) -> String {
    mac.replace(':', "")[6..].to_string()
}

/// dnsmasq + udhcpc `-V walt.node.pc-x86-64`: the device is recorded with
/// its lease and hostname, the model's default image is fetched from the
/// registry, and the device becomes a node booting it, listed by `walt
/// node show --all`.
#[test]
fn dnsmasq_new_model_node_boots_its_default_image() {
    let env = NodesEnv::start();
    let img = env.push_default("pc-x86-64", &[]);
    let mut net = DhcpNet::new().unwrap();
    let node = net.add_node(&net.mac(1)).unwrap();
    let _dnsmasq = env.dhcp(DhcpKind::Dnsmasq, &net);

    let ip = node
        .udhcpc(&ClientOpts::vendor_model("pc-x86-64").hostname("nodeA"))
        .unwrap();
    let name = format!("nodea-{}", suffix(&node.mac));
    let dev = env.wait_device(&node.mac, "the device recorded", |_| true);
    assert_eq!(dev.ip.as_deref(), Some(ip.as_str()), "{dev:?}");
    assert_eq!(dev.name, name, "{dev:?}");
    assert_eq!(dev.model.as_deref(), Some("pc-x86-64"), "{dev:?}");
    let dev = env.wait_node(&node.mac);
    assert_eq!(dev.image.as_deref(), Some(DEFAULT_PC), "{dev:?}");
    // Fetched from the registry: every blob went through.
    let gets = env.gets();
    for d in img
        .layers
        .iter()
        .map(|l| &l.digest)
        .chain([&img.config.digest])
    {
        assert!(
            gets.keys().any(|p| p.ends_with(&format!("/blobs/{d}"))),
            "{d} not fetched: {gets:#?}"
        );
    }
    // Served: its tree, by MAC and by its leased address, shows the
    // default image's root.
    let nodes_dir = env.server.data_dir().join("nodes");
    let marker = wait_for("the node's tree", Duration::from_secs(30), || {
        std::fs::read_to_string(nodes_dir.join(&node.mac).join("fs/etc/walt-test-marker")).ok()
    })
    .unwrap();
    assert_eq!(marker, "default pc-x86-64\n");
    let by_ip = std::fs::read_to_string(nodes_dir.join(&ip).join("fs/etc/walt-test-marker"));
    assert_eq!(by_ip.unwrap(), marker);
    // Listed as a free node (it boots a default image).
    let out = env.server.cli("alice", &[]).run(&["node", "show", "--all"]);
    out.assert_success();
    let row = row_under(&out.stdout, FREE, &name).unwrap_or_else(|| panic!("{out}"));
    assert_eq!(row[1], "pc-x86-64", "{out}");
    assert!(row.contains(&ip) && row.contains(&node.mac), "{out}");
}

/// Devices that announce no model: recorded `unknown` with why, a
/// Raspberry Pi MAC as a Raspberry Pi of unknown model; `walt device show`
/// lists them.
#[test]
fn devices_without_a_model_stay_unknown() {
    let env = NodesEnv::start();
    let mut net = DhcpNet::new().unwrap();
    let plain = net.add_node(&net.mac(1)).unwrap();
    // b8:27:eb: the Raspberry Pi foundation's.
    let pi = net
        .add_node(&format!("b8:27:eb:{}", &net.mac(2)[9..]))
        .unwrap();
    let _dnsmasq = env.dhcp(DhcpKind::Dnsmasq, &net);

    let ip_plain = plain.udhcpc(&ClientOpts::default()).unwrap();
    let ip_pi = pi.udhcpc(&ClientOpts::default().hostname("pi")).unwrap();
    let d = env.wait_device(&plain.mac, "the device unknown with why", |d| {
        d.reason.is_some()
    });
    assert_eq!(d.kind, "unknown", "{d:?}");
    assert_eq!(d.model, None, "{d:?}");
    assert_eq!(d.ip.as_deref(), Some(ip_plain.as_str()), "{d:?}");
    assert_eq!(d.name, format!("unknown-{}", suffix(&plain.mac)), "{d:?}");
    assert!(
        d.reason.as_deref().unwrap().contains("walt.node.<model>"),
        "{d:?}"
    );
    let d = env.wait_device(&pi.mac, "the Raspberry Pi unknown with why", |d| {
        d.reason.is_some()
    });
    assert_eq!(d.kind, "unknown", "{d:?}");
    assert_eq!(d.ip.as_deref(), Some(ip_pi.as_str()), "{d:?}");
    assert_eq!(d.name, format!("pi-{}", suffix(&pi.mac)), "{d:?}");
    assert!(
        d.reason
            .as_deref()
            .unwrap()
            .starts_with("Raspberry Pi of unknown model"),
        "{d:?}"
    );

    let out = env.server.cli("alice", &[]).run(&["device", "show"]);
    out.assert_success();
    let row = row_under(&out.stdout, NOT_NODES, &d.name).unwrap_or_else(|| panic!("{out}"));
    assert!(row.contains(&pi.mac), "{out}");
    assert!(
        row.join(" ").contains("Raspberry Pi of unknown model"),
        "{out}"
    );
    let name = format!("unknown-{}", suffix(&plain.mac));
    let row = row_under(&out.stdout, NOT_NODES, &name).unwrap_or_else(|| panic!("{out}"));
    assert!(row.contains(&plain.mac) && row.contains(&ip_plain), "{out}");
}

/// isc-dhcp-server with the shipped snippet: the user class (RFC 3004
/// form) names the model, before the vendor class.
#[test]
fn dhcpd_user_class_names_the_model_before_the_vendor_class() {
    let env = NodesEnv::start();
    env.push_default("pc-x86-64", &[]);
    let mut net = DhcpNet::new().unwrap();
    let node = net.add_node(&net.mac(1)).unwrap();
    let _dhcpd = env.dhcp(DhcpKind::IscDhcpd, &net);

    // No rpi-3-b default image exists: taking the vendor class would leave
    // the device unknown.
    let ip = node
        .udhcpc(&ClientOpts::user_model("pc-x86-64").vendor_class("walt.node.rpi-3-b"))
        .unwrap();
    let dev = env.wait_node(&node.mac);
    assert_eq!(dev.model.as_deref(), Some("pc-x86-64"), "{dev:?}");
    assert_eq!(dev.image.as_deref(), Some(DEFAULT_PC), "{dev:?}");
    assert_eq!(dev.ip.as_deref(), Some(ip.as_str()), "{dev:?}");
    assert_eq!(
        dev.name,
        format!("pc-x86-64-{}", suffix(&node.mac)),
        "{dev:?}"
    );
}

/// The DHCP server never waits for walt: with the registry held back (a
/// 4 MiB layer sent at 512 KiB/s), dhcpd — which runs its hook
/// synchronously before answering — grants leases to two nodes of the new
/// model while the default image is still downloading. Then both become
/// nodes, from one download.
#[test]
fn dhcp_server_never_waits_for_the_default_image() {
    let env = NodesEnv::start();
    let big = env
        .images
        .big_random_layer(Format::Oci, Compression::Gzip, 4 << 20, unique_seed())
        .unwrap();
    let big_digest = big.blob.digest.clone();
    env.push_default("pc-x86-64", &[big]);
    env.proxy.rate_limit(Some(512 * 1024));
    let mut net = DhcpNet::new().unwrap();
    let a = net.add_node(&net.mac(1)).unwrap();
    let b = net.add_node(&net.mac(2)).unwrap();
    let _dhcpd = env.dhcp(DhcpKind::IscDhcpd, &net);

    let data = env.server.data_dir();
    let opts = ClientOpts::vendor_model("pc-x86-64");
    a.udhcpc(&opts).unwrap();
    let nodes = |devs: Vec<DeviceRow>| devs.into_iter().filter(|d| d.kind == "node").count();
    assert_eq!(
        nodes(devices(&data).unwrap()),
        0,
        "the lease must be granted before the default image is there"
    );
    // The second node asks while the download is under way (its first
    // bytes went through).
    wait_for("the download to start", Duration::from_secs(30), || {
        (env.proxy.stats().paced_chunks > 0).then_some(())
    })
    .unwrap();
    b.udhcpc(&opts).unwrap();
    assert_eq!(
        nodes(devices(&data).unwrap()),
        0,
        "the second lease must be granted before the default image is there"
    );

    for n in [&a, &b] {
        let d = env.wait_node(&n.mac);
        assert_eq!(d.image.as_deref(), Some(DEFAULT_PC), "{d:?}");
    }
    let gets = env.gets();
    let big_gets: usize = gets
        .iter()
        .filter(|(p, _)| p.ends_with(&format!("/blobs/{big_digest}")))
        .map(|(_, n)| n)
        .sum();
    assert_eq!(big_gets, 1, "{gets:#?}");
}

/// Fifty nodes of one new model at once, over real DHCP (dnsmasq, fifty
/// namespaces on one bridge): one manifest fetch and one fetch of each
/// blob at the registry, and all fifty become nodes with their leases.
#[test]
fn fifty_nodes_of_a_new_model_fetch_its_default_image_once() {
    let env = NodesEnv::start();
    let img = env.push_default("pc-x86-64", &[]);
    let mut net = DhcpNet::new().unwrap();
    let nodes = net.add_nodes(50).unwrap();
    let _dnsmasq = env.dhcp(DhcpKind::Dnsmasq, &net);

    let opts = ClientOpts::vendor_model("pc-x86-64");
    let runs: Vec<_> = nodes
        .iter()
        .map(|n| n.spawn_udhcpc(&opts).unwrap())
        .collect();
    let leases: Vec<String> = runs.into_iter().map(|r| r.lease().unwrap()).collect();
    let distinct: BTreeSet<&String> = leases.iter().collect();
    assert_eq!(distinct.len(), 50, "{leases:?}");

    let data = env.server.data_dir();
    // Each is a node, or an unknown device whose default image could not
    // be obtained (a failure: stop waiting).
    for n in &nodes {
        env.wait_node(&n.mac);
    }
    let devs = devices(&data).unwrap();
    for (n, ip) in nodes.iter().zip(&leases) {
        let d = devs.iter().find(|d| d.mac == n.mac).unwrap();
        assert_eq!(d.ip.as_deref(), Some(ip.as_str()), "{d:?}");
        assert_eq!(d.image.as_deref(), Some(DEFAULT_PC), "{d:?}");
    }

    let gets = env.gets();
    let manifests: usize = gets
        .iter()
        .filter(|(p, _)| p.contains("/v2/waltplatform/pc-x86-64-default/manifests/"))
        .map(|(_, n)| n)
        .sum();
    assert_eq!(manifests, 1, "one manifest fetch: {gets:#?}");
    for d in img
        .layers
        .iter()
        .map(|l| &l.digest)
        .chain([&img.config.digest])
    {
        let n: usize = gets
            .iter()
            .filter(|(p, _)| p.ends_with(&format!("/blobs/{d}")))
            .map(|(_, n)| n)
            .sum();
        assert_eq!(n, 1, "one fetch of {d}: {gets:#?}");
    }
}

/// dnsmasq reports each lease of its lease file when it starts (`old`,
/// without the classes): a node stays a node booting its image, and its
/// address follows the lease file.
#[test]
fn dnsmasq_restart_keeps_nodes_booting_their_image() {
    let env = NodesEnv::start();
    env.push_default("pc-x86-64", &[]);
    let mut net = DhcpNet::new().unwrap();
    let node = net.add_node(&net.mac(1)).unwrap();
    let mut dnsmasq = env.dhcp(DhcpKind::Dnsmasq, &net);
    let ip = node.udhcpc(&ClientOpts::vendor_model("pc-x86-64")).unwrap();
    env.wait_node(&node.mac);

    // Stopped, dnsmasq's lease file gets another address for the node.
    dnsmasq.stop();
    let moved = net.host(249);
    assert_ne!(moved, ip);
    let leases = std::fs::read_to_string(dnsmasq.lease_file()).unwrap();
    assert!(leases.contains(&format!(" {ip} ")), "{leases}");
    std::fs::write(
        dnsmasq.lease_file(),
        leases.replace(&format!(" {ip} "), &format!(" {moved} ")),
    )
    .unwrap();
    dnsmasq.restart().unwrap();
    let d = env.wait_device(&node.mac, "the address of the lease file", |d| {
        d.ip.as_deref() == Some(moved.as_str())
    });
    assert_eq!(d.kind, "node", "{d:?}");
    assert_eq!(d.model.as_deref(), Some("pc-x86-64"), "{d:?}");
    assert_eq!(d.image.as_deref(), Some(DEFAULT_PC), "{d:?}");
}
