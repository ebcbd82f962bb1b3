//! The kernel tier's network made dual-stack, for the IPv6 tests
//! (`kernel_v6.rs`, `kernel_v6_icmp.rs`): the front 2001:db8:18::1/64
//! (client 2001:db8:18::2), the back 2001:db8:19::1/64 (web1..3 at
//! ::11..::13, with web1..3's MACs), static neighbours; IPv6 forwarding on
//! (`bpf_fib_lookup` AF_INET6 needs it, `ipv6_forwarding_on` inside
//! `net.run`). The lab config's IPv6 services, and frames built by
//! etherparse.

use etherparse::PacketBuilder;
use lb_userspace::config::{Backend, Config, Forwarding, Protocol, Service};

use crate::kernel_net::{
    CLIENT_MAC, TestNet, WEB_MACS, WEB_PORT, WEB_UDP_PORT, backend, lab_config, service,
};

pub const CLIENT_V6: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0, 0x18, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2,
];
pub const VIP_NAT6: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0, 0x18, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
];
pub const VIP_DSR6: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0, 0x18, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x20,
];
pub const NOT_A_VIP6: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0, 0x18, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x99,
];

pub fn web6(i: usize) -> [u8; 16] {
    let mut a = [
        0x20, 0x01, 0x0d, 0xb8, 0, 0x19, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    a[15] = 0x11 + i as u8;
    a
}

pub fn text6(a: [u8; 16]) -> String {
    std::net::Ipv6Addr::from(a).to_string()
}

pub fn mac_text(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Makes the test namespace dual-stack (see the module's doc); call it
/// before `net.run`.
pub fn dual_stack(net: &TestNet) {
    net.ip(&[
        "-6",
        "addr",
        "add",
        "2001:db8:18::1/64",
        "dev",
        "f0",
        "nodad",
    ]);
    net.ip(&[
        "-6",
        "addr",
        "add",
        "2001:db8:19::1/64",
        "dev",
        "b0",
        "nodad",
    ]);
    let client = (text6(CLIENT_V6), CLIENT_MAC, "f0");
    let webs = (0..3).map(|i| (text6(web6(i)), WEB_MACS[i], "b0"));
    for (addr, mac, dev) in std::iter::once(client).chain(webs) {
        let mac = mac_text(mac);
        net.ip(&[
            "-6",
            "neigh",
            "replace",
            &addr,
            "lladdr",
            &mac,
            "dev",
            dev,
            "nud",
            "permanent",
        ]);
    }
}

/// A test namespace made dual-stack ([`dual_stack`]) with IPv6 forwarding
/// on: what every IPv6 kernel-tier test starts from.
pub fn dual_stack_net() -> TestNet {
    let net = TestNet::new();
    dual_stack(&net);
    net.run(ipv6_forwarding_on);
    net
}

pub fn ipv6_forwarding_on() {
    std::fs::write("/proc/sys/net/ipv6/conf/all/forwarding", "1")
        .expect("net.ipv6.conf.all.forwarding=1 in the test namespace");
}

pub fn backend6(name: &str, i: usize, port: u16) -> Backend {
    let mut b = backend(name, [0, 0, 0, 0], port);
    b.address = std::net::SocketAddr::new(web6(i).into(), port);
    b
}

pub fn service6(
    name: &str,
    vip: [u8; 16],
    port: u16,
    p: Protocol,
    f: Forwarding,
    to: u16,
) -> Service {
    let webs = (0..3)
        .map(|i| backend6(&format!("web{}", i + 1), i, to))
        .collect();
    let mut s = service(name, [0, 0, 0, 0], port, p, f, webs);
    s.vip = std::net::SocketAddr::new(vip.into(), port);
    s
}

/// The lab's config plus IPv6 services: NAT66 TCP (80 → 8080), NAT66 UDP
/// (5353 → 5300), DSR TCP (80).
pub fn config_v6() -> Config {
    let mut cfg = lab_config();
    cfg.services.extend([
        service6(
            "www6",
            VIP_NAT6,
            80,
            Protocol::Tcp,
            Forwarding::Nat,
            WEB_PORT,
        ),
        service6(
            "udp6",
            VIP_NAT6,
            5353,
            Protocol::Udp,
            Forwarding::Nat,
            WEB_UDP_PORT,
        ),
        service6("dsr6", VIP_DSR6, 80, Protocol::Tcp, Forwarding::Dsr, 80),
    ]);
    cfg
}

/// One TCP segment's flags and numbers.
#[derive(Clone, Copy)]
pub enum Seg {
    Syn(u32),
    SynAck(u32, u32),
    Ack(u32, u32),
    Fin(u32, u32),
    Rst(u32),
}

/// An Ethernet/IPv6/TCP frame, checksum computed by etherparse.
#[allow(clippy::too_many_arguments)]
pub fn tcp6(
    macs: ([u8; 6], [u8; 6]),
    (src, sport): ([u8; 16], u16),
    (dst, dport): ([u8; 16], u16),
    hop: u8,
    seg: Seg,
    payload: &[u8],
) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(macs.0, macs.1).ipv6(src, dst, hop);
    let seq = match seg {
        Seg::Syn(s) | Seg::SynAck(s, _) | Seg::Ack(s, _) | Seg::Fin(s, _) | Seg::Rst(s) => s,
    };
    let b = b.tcp(sport, dport, seq, 64240);
    let b = match seg {
        Seg::Syn(_) => b.syn(),
        Seg::SynAck(_, ack) => b.syn().ack(ack),
        Seg::Ack(_, ack) => b.ack(ack),
        Seg::Fin(_, ack) => b.fin().ack(ack),
        Seg::Rst(_) => b.rst(),
    };
    let mut out = Vec::new();
    b.write(&mut out, payload).expect("tcp6");
    out
}

pub fn udp6(
    macs: ([u8; 6], [u8; 6]),
    (src, sport): ([u8; 16], u16),
    (dst, dport): ([u8; 16], u16),
    hop: u8,
    payload: &[u8],
) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(macs.0, macs.1)
        .ipv6(src, dst, hop)
        .udp(sport, dport)
        .write(&mut out, payload)
        .expect("udp6");
    out
}

/// Which web an IPv6 frame is addressed to (by its destination address).
pub fn web_of6(frame: &[u8]) -> usize {
    let i = usize::from(frame[14 + 39]) - 0x11;
    assert!(i < 3, "not to a web: {frame:02x?}");
    i
}

pub fn web_of_mac(frame: &[u8]) -> usize {
    WEB_MACS
        .iter()
        .position(|m| frame[..6] == m[..])
        .unwrap_or_else(|| panic!("not to a web's MAC: {frame:02x?}"))
}

/// An ICMPv6 error frame `src` → `dst` quoting `quote` (IPv6 bytes).
pub fn icmp6_error(
    macs: ([u8; 6], [u8; 6]),
    (src, dst): ([u8; 16], [u8; 16]),
    hop: u8,
    kind: etherparse::Icmpv6Type,
    quote: &[u8],
) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(macs.0, macs.1)
        .ipv6(src, dst, hop)
        .icmpv6(kind)
        .write(&mut out, quote)
        .expect("icmpv6 error");
    out
}

/// The "packet too big" the LB sends back for `frame` (as it arrived):
/// MACs and addresses swapped (from the address it was sent to), hop limit
/// 64, the MTU, its first `TOO_BIG_QUOTE6` IPv6 bytes quoted.
pub fn packet_too_big_for(frame: &[u8], mtu: u32) -> Vec<u8> {
    let mac = |at: usize| <[u8; 6]>::try_from(&frame[at..at + 6]).expect("a MAC");
    let addr = |at: usize| <[u8; 16]>::try_from(&frame[at..at + 16]).expect("an address");
    icmp6_error(
        (mac(0), mac(6)),
        (addr(14 + 24), addr(14 + 8)),
        64,
        etherparse::Icmpv6Type::PacketTooBig { mtu },
        &frame[14..14 + lb_common::ipv6::TOO_BIG_QUOTE6],
    )
}
