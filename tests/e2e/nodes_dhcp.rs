//! Node detection over real DHCP exchanges: network namespaces on a
//! bridge, dnsmasq or isc-dhcp-server running the hook configuration
//! shipped in `contrib/dhcp/`, busybox `udhcpc` as the nodes' client.

use walt_e2e::dhcp::{ClientOpts, DhcpKind, DhcpNet, DhcpServer, EVENT_SOCKET_ENV, RecordingHook};

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
