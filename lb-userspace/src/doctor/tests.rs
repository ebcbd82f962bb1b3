//! The doctor's rules on made-up hosts: a host set up right has no
//! warning or error, and each thing set up wrong gives its finding, with the
//! severity `lb run` acts on.

use std::{net::Ipv4Addr, path::PathBuf};

use super::{gather::parse_arp, gather::parse_routes, rules::route_for, *};
use crate::config::XdpMode;

const CONFIG: &str = r#"
[dataplane]
interfaces = ["front", "back"]

[[service]]
name = "www"
vip = "198.18.0.10:80"
backends = [{ name = "web1", address = "198.19.0.11:80" }]

[[service]]
name = "dsr"
vip = "198.18.0.10:443"
forwarding = "dsr"
backends = [{ name = "web1", address = "198.19.0.11:443" }]
"#;

fn config() -> Config {
    crate::config::parse(CONFIG, std::path::Path::new("doctor.toml")).expect("valid config")
}

fn veth(ifindex: u32, peer: &str) -> Link {
    Link {
        ifindex,
        kind: Some("veth".into()),
        mtu: 1500,
        forwarding: Some(true),
        forwarding6: Some(true),
        rp_filter: Some(0),
        xdp: Some(XdpFeatures(
            XdpFeatures::BASIC | XdpFeatures::REDIRECT | XdpFeatures::NDO_XMIT,
        )),
        peer: Some(Peer::Seen {
            name: peer.into(),
            netns: Some(format!("ns-{peer}")),
            tx_checksum: Some(false),
            gro: Some(true),
            xdp_attached: false,
            master: None,
        }),
    }
}

/// A host as the lab sets one up: every check passes.
fn good() -> Facts {
    Facts {
        interfaces: vec![
            Interface {
                name: "front".into(),
                link: Some(veth(2, "eth0")),
            },
            Interface {
                name: "back".into(),
                link: Some(veth(3, "eth1")),
            },
        ],
        rp_filter_all: Some(0),
        loopback: vec![Ipv4Addr::LOCALHOST, Ipv4Addr::new(198, 18, 0, 10)],
        bpffs: Bpffs {
            path: PathBuf::from("/sys/fs/bpf"),
            mounted: true,
        },
        routes: Some(vec![
            Route {
                dest: Ipv4Addr::new(198, 19, 0, 0),
                prefix_len: 24,
                gateway: None,
                metric: 0,
            },
            Route {
                dest: Ipv4Addr::UNSPECIFIED,
                prefix_len: 0,
                gateway: Some(Ipv4Addr::new(198, 18, 0, 254)),
                metric: 0,
            },
        ]),
        neighbours: Some(vec![Neighbour {
            address: Ipv4Addr::new(198, 19, 0, 11),
            device: "back".into(),
            complete: true,
            mac: "02:00:00:00:00:11".into(),
        }]),
    }
}

fn link_mut<'a>(facts: &'a mut Facts, name: &str) -> &'a mut Link {
    facts
        .interfaces
        .iter_mut()
        .find(|i| i.name == name)
        .and_then(|i| i.link.as_mut())
        .expect("interface in the fixture")
}

/// The findings other than ok.
fn problems(facts: &Facts) -> Vec<Finding> {
    findings(&config(), facts)
        .into_iter()
        .filter(|f| f.severity != Severity::Ok)
        .collect()
}

/// Exactly one problem, of `check` and `severity`, about `subject`, with a
/// fix that mentions `fix`.
#[track_caller]
fn only_problem(facts: &Facts, check: Check, severity: Severity, subject: &str, fix: &str) {
    let found = problems(facts);
    assert_eq!(found.len(), 1, "{}", render(&found));
    let f = &found[0];
    assert_eq!(
        (f.check, f.severity),
        (check, severity),
        "{}",
        render(&found)
    );
    assert!(f.subject.contains(subject), "{}", render(&found));
    let text = f.fix.as_deref().unwrap_or("");
    assert!(text.contains(fix), "fix {text:?} lacks {fix:?}");
}

/// With `xdp-mode = "generic"` the same host has nothing to fix.
#[track_caller]
fn assert_fine_in_generic_mode(facts: &Facts) {
    let mut cfg = config();
    cfg.dataplane.xdp_mode = XdpMode::Generic;
    let found = findings(&cfg, facts);
    assert!(
        found.iter().all(|f| f.severity == Severity::Ok),
        "{}",
        render(&found)
    );
}

#[test]
fn a_host_set_up_right_has_nothing_to_fix() {
    let found = findings(&config(), &good());
    assert!(
        found.iter().all(|f| f.severity == Severity::Ok),
        "{}",
        render(&found)
    );
    // One ok per check that applies: each interface's mode, forwarding,
    // rp_filter, checksum, GRO; the MTU, the VIP, the bpffs, the backend
    // (once per mode).
    for check in [
        Check::XdpMode,
        Check::Forwarding,
        Check::RpFilter,
        Check::ChecksumOffload,
        Check::VethGro,
        Check::Mtu,
        Check::VipOnLo,
        Check::Bpffs,
        Check::Neighbour,
    ] {
        assert!(found.iter().any(|f| f.check == check), "no {check} finding");
    }
}

#[test]
fn a_missing_interface_is_an_error() {
    let mut facts = good();
    facts.interfaces[1].link = None;
    let found = problems(&facts);
    assert!(
        found
            .iter()
            .any(|f| f.check == Check::Interface && f.severity == Severity::Error),
        "{}",
        render(&found)
    );
}

#[test]
fn native_mode_without_native_xdp_is_an_error() {
    let mut facts = good();
    link_mut(&mut facts, "front").xdp = Some(XdpFeatures(0));
    only_problem(
        &facts,
        Check::XdpMode,
        Severity::Error,
        "front",
        "xdp-mode = \"generic\"",
    );
    // Generic mode on the same host is fine.
    assert_fine_in_generic_mode(&facts);
}

#[test]
fn a_nic_that_takes_no_redirected_frames_is_a_warning() {
    let mut facts = good();
    let back = link_mut(&mut facts, "back");
    back.kind = None;
    back.peer = None;
    back.xdp = Some(XdpFeatures(XdpFeatures::BASIC | XdpFeatures::REDIRECT));
    only_problem(&facts, Check::XdpMode, Severity::Warning, "back", "generic");
}

#[test]
fn forwarding_off_is_an_error() {
    let mut facts = good();
    link_mut(&mut facts, "back").forwarding = Some(false);
    only_problem(
        &facts,
        Check::Forwarding,
        Severity::Error,
        "back",
        "net.ipv4.ip_forward=1",
    );
}

#[test]
fn ipv6_forwarding_is_checked_when_the_config_has_ipv6_services() {
    // IPv4 only: IPv6 forwarding off (or no IPv6 at all) is not a problem.
    let mut facts = good();
    link_mut(&mut facts, "back").forwarding6 = Some(false);
    link_mut(&mut facts, "front").forwarding6 = None;
    assert!(problems(&facts).is_empty(), "{}", render(&problems(&facts)));
    // An IPv6 service (built by hand: the config's gate refuses it in a
    // file until the data plane balances IPv6).
    let mut v6 = config();
    v6.services[1].vip = "[2001:db8:18::10]:443".parse().expect("vip");
    v6.services[1].backends[0].address = "[2001:db8:19::11]:443".parse().expect("addr");
    let found: Vec<Finding> = findings(&v6, &facts)
        .into_iter()
        .filter(|f| f.check == Check::Forwarding && f.severity != Severity::Ok)
        .collect();
    assert_eq!(found.len(), 2, "{}", render(&found));
    assert!(
        found[0].subject == "front" && found[0].message.contains("/proc/sys/net/ipv6/conf/front"),
        "{}",
        render(&found)
    );
    assert!(
        found[1].subject == "back"
            && found[1].message.contains("IPv6 forwarding is off")
            && found[1]
                .fix
                .as_deref()
                .is_some_and(|f| f.contains("net.ipv6.conf.back.forwarding=1")),
        "{}",
        render(&found)
    );
    let ok = findings(&v6, &good());
    assert!(
        ok.iter()
            .any(|f| f.check == Check::Forwarding && f.message == "IPv6 forwarding on"),
        "{}",
        render(&ok)
    );
}

#[test]
fn strict_rp_filter_is_a_warning_whether_set_on_all_or_the_interface() {
    let mut facts = good();
    link_mut(&mut facts, "front").rp_filter = Some(1);
    only_problem(&facts, Check::RpFilter, Severity::Warning, "front", "=2");
    let mut facts = good();
    facts.rp_filter_all = Some(1);
    let found = problems(&facts);
    assert_eq!(found.len(), 2, "both interfaces: {}", render(&found));
    // Loose on the interface does not undo strict on all: the larger wins.
    let mut facts = good();
    facts.rp_filter_all = Some(2);
    assert!(problems(&facts).is_empty());
}

#[test]
fn a_vip_not_on_lo_is_a_warning() {
    let mut facts = good();
    facts.loopback = vec![Ipv4Addr::LOCALHOST];
    only_problem(
        &facts,
        Check::VipOnLo,
        Severity::Warning,
        "198.18.0.10",
        "ip addr add 198.18.0.10/32 dev lo",
    );
}

#[test]
fn a_veth_peer_with_tx_checksum_offload_is_the_checksum_trap() {
    let mut facts = good();
    if let Some(Peer::Seen { tx_checksum, .. }) = &mut link_mut(&mut facts, "front").peer {
        *tx_checksum = Some(true);
    }
    only_problem(
        &facts,
        Check::ChecksumOffload,
        Severity::Warning,
        "front",
        "ip netns exec ns-eth0",
    );
    let found = problems(&facts);
    assert!(
        found[0]
            .fix
            .as_deref()
            .unwrap_or("")
            .contains("ethtool -K eth0 tx off")
    );
}

#[test]
fn a_peer_out_of_sight_or_behind_a_bridge_is_said_so() {
    let mut facts = good();
    link_mut(&mut facts, "front").peer = Some(Peer::Hidden {
        netnsid: 7,
        index: 4,
    });
    only_problem(
        &facts,
        Check::ChecksumOffload,
        Severity::Warning,
        "front",
        "tx off",
    );
    let mut facts = good();
    if let Some(Peer::Seen { master, .. }) = &mut link_mut(&mut facts, "back").peer {
        *master = Some("br0".into());
    }
    let found = problems(&facts);
    assert_eq!(found.len(), 1, "{}", render(&found));
    assert!(found[0].message.contains("br0"), "{}", render(&found));
}

#[test]
fn a_veth_whose_peer_takes_no_redirected_frames_needs_gro() {
    let mut facts = good();
    link_mut(&mut facts, "back").xdp =
        Some(XdpFeatures(XdpFeatures::BASIC | XdpFeatures::REDIRECT));
    only_problem(
        &facts,
        Check::VethGro,
        Severity::Warning,
        "back",
        "ethtool -K eth1 gro on",
    );
    // Generic mode redirects through the stack: no GRO needed.
    assert_fine_in_generic_mode(&facts);
}

#[test]
fn mtus_that_differ_or_exceed_a_page_are_warnings() {
    let mut facts = good();
    link_mut(&mut facts, "back").mtu = 1400;
    only_problem(
        &facts,
        Check::Mtu,
        Severity::Warning,
        "back",
        "ip link set back mtu 1500",
    );
    let mut facts = good();
    link_mut(&mut facts, "front").mtu = 9000;
    link_mut(&mut facts, "back").mtu = 9000;
    let found = problems(&facts);
    assert_eq!(found.len(), 2, "{}", render(&found));
    assert!(found.iter().all(|f| f.check == Check::Mtu));
}

#[test]
fn an_unmounted_bpffs_is_a_warning() {
    let mut facts = good();
    facts.bpffs.mounted = false;
    only_problem(
        &facts,
        Check::Bpffs,
        Severity::Warning,
        "/sys/fs/bpf",
        "mount -t bpf bpf /sys/fs/bpf",
    );
}

#[test]
fn backend_neighbours_missing_incomplete_or_behind_a_router() {
    let mut facts = good();
    facts.neighbours = Some(Vec::new());
    let found = problems(&facts);
    // Both services name web1: once for NAT, once for DSR.
    assert_eq!(found.len(), 2, "{}", render(&found));
    assert!(found.iter().all(|f| {
        f.check == Check::Neighbour
            && f.severity == Severity::Warning
            && f.fix
                .as_deref()
                .unwrap_or("")
                .contains("ping -c1 198.19.0.11")
    }));

    let mut facts = good();
    if let Some(n) = facts.neighbours.as_mut() {
        n[0].complete = false;
    }
    let found = problems(&facts);
    assert!(
        found[0].message.contains("does not answer ARP"),
        "{}",
        render(&found)
    );

    // Behind a router: NAT reaches it through the router's neighbour entry;
    // DSR cannot reach it at all.
    let mut facts = good();
    facts.routes = Some(vec![Route {
        dest: Ipv4Addr::UNSPECIFIED,
        prefix_len: 0,
        gateway: Some(Ipv4Addr::new(198, 18, 0, 254)),
        metric: 0,
    }]);
    facts.neighbours = Some(vec![Neighbour {
        address: Ipv4Addr::new(198, 18, 0, 254),
        device: "front".into(),
        complete: true,
        mac: "02:00:00:00:00:fe".into(),
    }]);
    only_problem(
        &facts,
        Check::Neighbour,
        Severity::Error,
        "dsr/web1",
        "forwarding = \"nat\"",
    );
}

#[test]
fn proc_net_tables_parse() {
    let routes = parse_routes(
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
         eth0\t00000000\t010012C6\t0003\t0\t0\t100\t00000000\t0\t0\t0\n\
         eth1\t000013C6\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n",
    );
    assert_eq!(
        routes,
        [
            Route {
                dest: Ipv4Addr::UNSPECIFIED,
                prefix_len: 0,
                gateway: Some(Ipv4Addr::new(198, 18, 0, 1)),
                metric: 100
            },
            Route {
                dest: Ipv4Addr::new(198, 19, 0, 0),
                prefix_len: 24,
                gateway: None,
                metric: 0
            },
        ]
    );
    assert_eq!(
        route_for(&routes, Ipv4Addr::new(198, 19, 0, 11)).map(|r| r.prefix_len),
        Some(24)
    );
    let arp = parse_arp(
        "IP address       HW type     Flags       HW address            Mask     Device\n\
         198.19.0.11      0x1         0x2         02:00:00:00:00:11     *        eth1\n\
         198.19.0.12      0x1         0x0         00:00:00:00:00:00     *        eth1\n",
    );
    assert_eq!(arp.len(), 2);
    assert!(arp[0].complete && !arp[1].complete);
    assert_eq!(arp[0].device, "eth1");
}
