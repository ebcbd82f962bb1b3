//! Kernel tier (issue 26): `lb decap`, the backends' decapsulator, on
//! crafted frames under BPF_PROG_TEST_RUN. From an allowed LB, IPIP and GUE
//! (and, issue 24, IP6IP6 and GUE over IPv6 from an allowed IPv6 address)
//! come out as Ethernet + the exact inner packet; from another source, or
//! malformed, or not a tunnel, the frame passes untouched with its own
//! verdict counted. Every frame's verdict is also compared with
//! `lb_common::decap::decide`, the reference the program's steps follow.
//! The pinned attach (`lb decap attach`'s code) is tested on a real veth:
//! replaced settings, an interface already taken, detach.
//!
//! Frames are built independently with etherparse (outer headers and their
//! checksums computed from scratch). Needs root and BPF; without them the
//! tests fail loudly.

use std::net::{IpAddr, Ipv4Addr};

use etherparse::{
    EtherType, Ethernet2Header, IpNumber, Ipv4Header, Ipv6FlowLabel, Ipv6Header, PacketBuilder,
    UdpHeader,
};
use lb_common::{
    decap::{DecapVerdict, GUE_DEFAULT_PORT, decide_with},
    ipv6::addr_of,
};
use lb_tests::kernel_net::{Bpffs, TestNet};
use lb_userspace::{
    decap::{Decapsulator, load, maps::DecapMaps},
    harness::xdp::{self, XDP_PASS},
};

const LB: [u8; 4] = [198, 18, 1, 1];
const LB2: [u8; 4] = [198, 18, 1, 2];
const STRANGER: [u8; 4] = [198, 18, 9, 9];
const BACKEND: [u8; 4] = [198, 19, 0, 11];
const CLIENT: [u8; 4] = [198, 18, 0, 2];
const VIP: [u8; 4] = [198, 18, 0, 10];
const LB6: [u8; 16] = [0x20, 1, 0xd, 0xb8, 0, 0x19, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const STRANGER6: [u8; 16] = [0x20, 1, 0xd, 0xb8, 0, 0x19, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x99];
const BACKEND6: [u8; 16] = [0x20, 1, 0xd, 0xb8, 0, 0x98, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x11];
const SRC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xaa, 0x01];
const DST_MAC: [u8; 6] = [0x02, 0, 0, 0, 1, 0x11];

fn root() {
    assert!(
        rustix::process::geteuid().is_root(),
        "the kernel tier needs root (BPF_PROG_TEST_RUN): run `cargo xtask test` as root"
    );
}

/// The client's TCP SYN to the VIP, as the LB received it.
fn inner_tcp() -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ipv4(CLIENT, VIP, 63)
        .tcp(40000, 80, 1000, 64240)
        .syn()
        .write(&mut out, &[])
        .expect("inner TCP");
    out
}

/// A client's UDP datagram to the VIP, with a payload.
fn inner_udp(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ipv4(CLIENT, VIP, 63)
        .udp(40000, 53)
        .write(&mut out, payload)
        .expect("inner UDP");
    out
}

fn inner_v6() -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ipv6(
        [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
        [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10],
        63,
    )
    .udp(40000, 53)
    .write(&mut out, b"six")
    .expect("inner IPv6");
    out
}

fn ethernet(ether_type: EtherType, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    Ethernet2Header {
        source: SRC_MAC,
        destination: DST_MAC,
        ether_type,
    }
    .write(&mut f)
    .expect("ethernet");
    f.extend_from_slice(payload);
    f
}

/// An outer IPv4 header (DF set, checksum computed) around `payload`.
fn outer(src: [u8; 4], protocol: u8, payload: &[u8]) -> Vec<u8> {
    let mut ip = Ipv4Header::new(payload.len() as u16, 64, IpNumber(protocol), src, BACKEND)
        .expect("outer header");
    ip.dont_fragment = true;
    ip.header_checksum = ip.calc_header_checksum();
    let mut bytes = Vec::new();
    ip.write(&mut bytes).expect("outer");
    bytes.extend_from_slice(payload);
    ethernet(EtherType::IPV4, &bytes)
}

fn ipip(src: [u8; 4], inner: &[u8]) -> Vec<u8> {
    outer(src, 4, inner)
}

/// GUE variant 0: UDP to `port` (checksum 0), then `byte0`, `proto`,
/// flags 0, then the inner packet.
fn gue_to(src: [u8; 4], port: u16, byte0: u8, proto: u8, inner: &[u8]) -> Vec<u8> {
    let mut udp = Vec::new();
    UdpHeader {
        source_port: 50000,
        destination_port: port,
        length: (8 + 4 + inner.len()) as u16,
        checksum: 0,
    }
    .write(&mut udp)
    .expect("udp");
    udp.extend_from_slice(&[byte0, proto, 0, 0]);
    udp.extend_from_slice(inner);
    outer(src, 17, &udp)
}

fn gue(src: [u8; 4], inner: &[u8]) -> Vec<u8> {
    gue_to(src, GUE_DEFAULT_PORT, 0, 4, inner)
}

/// An outer IPv6 header (no extension headers) from `src` with next header
/// `next` around `payload`, as the LB sends it (flow label set).
fn outer6(src: [u8; 16], next: u8, payload: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::new();
    Ipv6Header {
        traffic_class: 0,
        flow_label: Ipv6FlowLabel::try_new(0x1_2345).expect("label"),
        payload_length: payload.len() as u16,
        next_header: IpNumber(next),
        hop_limit: 64,
        source: src,
        destination: BACKEND6,
    }
    .write(&mut bytes)
    .expect("outer6");
    bytes.extend_from_slice(payload);
    ethernet(EtherType::IPV6, &bytes)
}

fn ip6ip6(src: [u8; 16], inner: &[u8]) -> Vec<u8> {
    outer6(src, 41, inner)
}

/// GUE over IPv6 (UDP checksum 0, as the LB sends it), inner IPv6.
fn gue6(src: [u8; 16], inner: &[u8]) -> Vec<u8> {
    let mut udp = Vec::new();
    UdpHeader {
        source_port: 50000,
        destination_port: GUE_DEFAULT_PORT,
        length: (8 + 4 + inner.len()) as u16,
        checksum: 0,
    }
    .write(&mut udp)
    .expect("udp");
    udp.extend_from_slice(&[0, 41, 0, 0]);
    udp.extend_from_slice(inner);
    outer6(src, 17, &udp)
}

/// Re-computes the outer IPv4 checksum (of a 20-byte header) after a test
/// changed the header.
fn refresh_outer_checksum(frame: &mut [u8]) {
    frame[24..26].copy_from_slice(&[0, 0]);
    let c = lb_common::checksum::compute(&frame[14..34], 0);
    frame[24..26].copy_from_slice(&c.to_ne_bytes());
}

/// The decapsulator under test, with LB as the one allowed source.
struct Decap {
    decap: Decapsulator,
    allowed: Vec<[u8; 4]>,
    allowed6: Vec<[u8; 16]>,
    port: u16,
}

impl Decap {
    fn new() -> Self {
        root();
        let mut decap = Decapsulator::load().expect("load the lb-decap object (cargo xtask build)");
        decap
            .maps
            .replace(&[Ipv4Addr::from(LB)], GUE_DEFAULT_PORT)
            .expect("settings");
        Decap {
            decap,
            allowed: vec![LB],
            allowed6: vec![],
            port: GUE_DEFAULT_PORT,
        }
    }

    fn set(&mut self, allowed: &[[u8; 4]], port: u16) {
        self.set_both(allowed, &[], port);
    }

    /// Allows IPv4 `allowed` and IPv6 `allowed6` (one `--from` set).
    fn set_both(&mut self, allowed: &[[u8; 4]], allowed6: &[[u8; 16]], port: u16) {
        let addrs: Vec<IpAddr> = allowed
            .iter()
            .map(|a| IpAddr::from(*a))
            .chain(allowed6.iter().map(|a| IpAddr::from(*a)))
            .collect();
        self.decap.maps.replace(&addrs, port).expect("settings");
        self.allowed = allowed.to_vec();
        self.allowed6 = allowed6.to_vec();
        self.port = port;
    }

    fn counts(&self) -> Vec<(DecapVerdict, u64)> {
        self.decap.maps.verdicts().expect("verdicts")
    }

    /// Runs `frame`: the action must be XDP_PASS and exactly `want`
    /// counted, as the reference decides too. The frame as left.
    fn expect(&mut self, what: &str, frame: &[u8], want: DecapVerdict) -> Vec<u8> {
        let (allowed, allowed6) = (self.allowed.clone(), self.allowed6.clone());
        let reference = decide_with(
            frame,
            self.port,
            |a| allowed.iter().any(|x| u32::from_ne_bytes(*x) == a),
            |a| allowed6.iter().any(|x| addr_of(*x) == *a),
        );
        assert_eq!(reference.verdict, want, "the reference's verdict: {what}");
        let before = self.counts();
        let prog = self.decap.program().expect("program");
        let run = xdp::test_run(prog, 1, frame, 1, true).expect("BPF_PROG_TEST_RUN");
        let after = self.counts();
        assert_eq!(run.action, XDP_PASS, "action: {what}");
        let changed: Vec<DecapVerdict> = before
            .iter()
            .zip(&after)
            .filter(|(b, a)| a.1 != b.1)
            .map(|(_, a)| a.0)
            .collect();
        assert_eq!(changed, vec![want], "verdict counters: {what}");
        let out = run.frame.expect("output frame");
        if !want.is_decapsulated() {
            assert_eq!(out, frame, "passed untouched: {what}");
        }
        out
    }
}

fn decapsulated(ether_type: EtherType, inner: &[u8]) -> Vec<u8> {
    ethernet(ether_type, inner)
}

#[test]
fn an_allowed_lbs_ipip_and_gue_become_the_exact_inner_packet() {
    let mut d = Decap::new();
    let syn = inner_tcp();
    let out = d.expect("IPIP", &ipip(LB, &syn), DecapVerdict::DecapIpip);
    assert_eq!(out, decapsulated(EtherType::IPV4, &syn));
    let out = d.expect("GUE", &gue(LB, &syn), DecapVerdict::DecapGue);
    assert_eq!(out, decapsulated(EtherType::IPV4, &syn));
    // A full-size datagram, and one so short the outer frame is minimal.
    let big = inner_udp(&[0x5a; 1400]);
    let out = d.expect("GUE, 1400 bytes", &gue(LB, &big), DecapVerdict::DecapGue);
    assert_eq!(out, decapsulated(EtherType::IPV4, &big));
    let tiny = inner_udp(b"");
    let out = d.expect("IPIP, empty UDP", &ipip(LB, &tiny), DecapVerdict::DecapIpip);
    assert_eq!(out, decapsulated(EtherType::IPV4, &tiny));
    // GUE carrying IPv6: the EtherType follows the inner family.
    let v6 = inner_v6();
    let out = d.expect(
        "GUE with IPv6",
        &gue_to(LB, GUE_DEFAULT_PORT, 0, 41, &v6),
        DecapVerdict::DecapGueV6,
    );
    assert_eq!(out, decapsulated(EtherType::IPV6, &v6));
}

/// IPv6 services' tunnels (issue 24): IP6IP6 and GUE over IPv6 (its UDP
/// checksum 0) from an allowed IPv6 LB address become the exact inner
/// IPv6 packet; from another address, or an allowed IPv4 LB's only, they
/// pass untouched; an outer header followed by an extension header is no
/// tunnel; a malformed outer or inner header has its verdict.
#[test]
fn an_allowed_lbs_ip6ip6_and_gue6_become_the_exact_inner_packet() {
    let mut d = Decap::new();
    let v6 = inner_v6();
    // Only the IPv4 LB allowed: no IPv6 tunnel is taken off.
    d.expect(
        "IP6IP6, no IPv6 source allowed",
        &ip6ip6(LB6, &v6),
        DecapVerdict::SourceNotAllowed,
    );
    d.set_both(&[LB], &[LB6], GUE_DEFAULT_PORT);
    let out = d.expect("IP6IP6", &ip6ip6(LB6, &v6), DecapVerdict::DecapIp6ip6);
    assert_eq!(out, decapsulated(EtherType::IPV6, &v6));
    let out = d.expect("GUE over IPv6", &gue6(LB6, &v6), DecapVerdict::DecapGue6);
    assert_eq!(out, decapsulated(EtherType::IPV6, &v6));
    // IPv4's tunnels still from the IPv4 LB.
    let syn = inner_tcp();
    d.expect("IPIP beside", &ipip(LB, &syn), DecapVerdict::DecapIpip);
    // Strangers.
    d.expect(
        "IP6IP6 from a stranger",
        &ip6ip6(STRANGER6, &v6),
        DecapVerdict::SourceNotAllowed,
    );
    d.expect(
        "GUE over IPv6 from a stranger",
        &gue6(STRANGER6, &v6),
        DecapVerdict::SourceNotAllowed,
    );
    // Not tunnels: plain IPv6, a hop-by-hop header first, 4in6.
    d.expect(
        "plain IPv6",
        &ethernet(EtherType::IPV6, &v6),
        DecapVerdict::NotTunnel,
    );
    let mut hop_by_hop = vec![41, 0, 1, 4, 0, 0, 0, 0];
    hop_by_hop.extend_from_slice(&v6);
    d.expect(
        "an extension header first",
        &outer6(LB6, 0, &hop_by_hop),
        DecapVerdict::NotTunnel,
    );
    d.expect(
        "IPv4 in IPv6",
        &outer6(LB6, 4, &syn),
        DecapVerdict::NotTunnel,
    );
    // Malformed: the outer cut short of its payload, the inner not IPv6
    // or cut short.
    let frame = ip6ip6(LB6, &v6);
    d.expect(
        "outer cut short",
        &frame[..frame.len() - 1],
        DecapVerdict::OuterMalformed,
    );
    d.expect(
        "IPv4 inside IP6IP6",
        &ip6ip6(LB6, &[syn.clone(), vec![0; 40]].concat()),
        DecapVerdict::InnerMalformed,
    );
    d.expect(
        "inner cut short",
        &ip6ip6(LB6, &v6[..30]),
        DecapVerdict::InnerTruncated,
    );
}

#[test]
fn padding_after_the_outer_packet_stays_after_the_inner_one() {
    // Ethernet pads short frames; the kernel trims to the IP total length.
    let mut d = Decap::new();
    let tiny = inner_udp(b"");
    let mut frame = ipip(LB, &tiny);
    frame.extend_from_slice(&[0; 6]);
    let out = d.expect("padded IPIP", &frame, DecapVerdict::DecapIpip);
    let mut want = decapsulated(EtherType::IPV4, &tiny);
    want.extend_from_slice(&[0; 6]);
    assert_eq!(out, want);
}

#[test]
fn another_sources_tunnels_pass_untouched_and_are_counted() {
    let mut d = Decap::new();
    let syn = inner_tcp();
    d.expect(
        "IPIP from a stranger",
        &ipip(STRANGER, &syn),
        DecapVerdict::SourceNotAllowed,
    );
    d.expect(
        "GUE from a stranger",
        &gue(STRANGER, &syn),
        DecapVerdict::SourceNotAllowed,
    );
    // The inner source is no credential: a client address spoofed as the
    // outer source is a stranger too.
    d.expect(
        "IPIP from the client",
        &ipip(CLIENT, &syn),
        DecapVerdict::SourceNotAllowed,
    );
}

#[test]
fn traffic_that_is_no_tunnel_passes_untouched() {
    let mut d = Decap::new();
    let syn = inner_tcp();
    d.expect(
        "plain TCP",
        &ethernet(EtherType::IPV4, &syn),
        DecapVerdict::NotTunnel,
    );
    d.expect(
        "plain UDP",
        &ethernet(EtherType::IPV4, &inner_udp(b"x")),
        DecapVerdict::NotTunnel,
    );
    d.expect(
        "ARP",
        &ethernet(EtherType::ARP, &[0; 28]),
        DecapVerdict::NotTunnel,
    );
    d.expect(
        "IPv6",
        &ethernet(EtherType::IPV6, &inner_v6()),
        DecapVerdict::NotTunnel,
    );

    d.expect(
        "GUE from the LB to another port",
        &gue_to(LB, 6081, 0, 4, &syn),
        DecapVerdict::NotTunnel,
    );
}

#[test]
fn truncated_and_malformed_tunnels_get_their_verdicts() {
    let mut d = Decap::new();
    let syn = inner_tcp();
    let frame = ipip(LB, &syn);
    let changed = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut x = frame.clone();
        f(&mut x);
        x
    };
    // The outer header.
    d.expect(
        "an IPv4 EtherType and no header",
        &frame[..14],
        DecapVerdict::OuterMalformed,
    );
    d.expect(
        "short outer header",
        &frame[..14 + 12],
        DecapVerdict::OuterMalformed,
    );
    d.expect(
        "outer cut short of its total length",
        &frame[..frame.len() - 1],
        DecapVerdict::OuterMalformed,
    );
    d.expect(
        "bad outer checksum",
        &changed(&|f| f[14 + 8] ^= 0x01),
        DecapVerdict::OuterMalformed,
    );
    d.expect(
        "outer version 5",
        &changed(&|f| {
            f[14] = 0x55;
            refresh_outer_checksum(f);
        }),
        DecapVerdict::OuterMalformed,
    );
    let mut with_options = Vec::new();
    let mut ip = Ipv4Header::new(syn.len() as u16, 64, IpNumber(4), LB, BACKEND).expect("ip");
    ip.options = [1u8, 1, 1, 0][..].try_into().expect("options");
    ip.header_checksum = ip.calc_header_checksum();
    ip.write(&mut with_options).expect("ip");
    with_options.extend_from_slice(&syn);
    d.expect(
        "outer options",
        &ethernet(EtherType::IPV4, &with_options),
        DecapVerdict::OuterOptions,
    );
    d.expect(
        "outer first fragment",
        &changed(&|f| {
            f[14 + 6] = 0x20; // MF, DF clear
            refresh_outer_checksum(f);
        }),
        DecapVerdict::OuterFragment,
    );
    d.expect(
        "outer later fragment",
        &changed(&|f| {
            f[14 + 6] = 0x00;
            f[14 + 7] = 0x10;
            refresh_outer_checksum(f);
        }),
        DecapVerdict::OuterFragment,
    );
    // The inner header.
    d.expect(
        "inner header cut short",
        &ipip(LB, &syn[..12]),
        DecapVerdict::InnerTruncated,
    );
    let mut v6_in_ipip = syn.clone();
    v6_in_ipip[0] = 0x65;
    d.expect(
        "inner version 6 in IPIP",
        &ipip(LB, &v6_in_ipip),
        DecapVerdict::InnerMalformed,
    );
    let mut too_long = syn.clone();
    too_long[3] += 4;
    d.expect(
        "inner total length beyond the outer packet",
        &ipip(LB, &too_long),
        DecapVerdict::InnerMalformed,
    );
    let mut ihl_4 = syn.clone();
    ihl_4[0] = 0x44;
    d.expect(
        "inner IHL 4",
        &ipip(LB, &ihl_4),
        DecapVerdict::InnerMalformed,
    );
    d.expect(
        "GUE announcing IPv6, carrying IPv4",
        &gue_to(LB, GUE_DEFAULT_PORT, 0, 41, &syn),
        DecapVerdict::InnerMalformed,
    );
    // GUE's header.
    for (what, byte0, proto, want) in [
        ("GUE control message", 0x20, 0, DecapVerdict::GueControl),
        ("GUE version 1", 0x40, 4, DecapVerdict::GueVersion),
        ("GUE optional fields", 0x01, 4, DecapVerdict::GueOptions),
        ("GUE carrying TCP", 0x00, 6, DecapVerdict::GueProtocol),
    ] {
        d.expect(
            what,
            &gue_to(LB, GUE_DEFAULT_PORT, byte0, proto, &syn),
            want,
        );
    }
    let mut flags = gue(LB, &syn);
    flags[14 + 20 + 8 + 2] = 0x80;
    d.expect("GUE flags", &flags, DecapVerdict::GueOptions);
    let mut short_udp = gue(LB, &syn);
    short_udp[14 + 20 + 4..14 + 20 + 6].copy_from_slice(&11u16.to_be_bytes());
    d.expect("UDP length 11", &short_udp, DecapVerdict::GueTruncated);
    let mut long_udp = gue(LB, &syn);
    long_udp[14 + 20 + 4..14 + 20 + 6].copy_from_slice(&2000u16.to_be_bytes());
    d.expect(
        "UDP length beyond the packet",
        &long_udp,
        DecapVerdict::GueTruncated,
    );
    d.expect(
        "GUE without an inner packet",
        &gue(LB, &[]),
        DecapVerdict::InnerTruncated,
    );
}

#[test]
fn new_settings_replace_the_old_ones_whole() {
    let mut d = Decap::new();
    let syn = inner_tcp();
    d.set(&[LB2], 7000);
    d.expect(
        "the old LB after the change",
        &ipip(LB, &syn),
        DecapVerdict::SourceNotAllowed,
    );
    d.expect("the new LB", &ipip(LB2, &syn), DecapVerdict::DecapIpip);
    d.expect(
        "GUE to the old port",
        &gue(LB2, &syn),
        DecapVerdict::NotTunnel,
    );
    d.expect(
        "GUE to the new port",
        &gue_to(LB2, 7000, 0, 4, &syn),
        DecapVerdict::DecapGue,
    );
    let settings = d.decap.maps.settings().expect("settings");
    assert_eq!(settings.sources, vec![IpAddr::from(LB2)]);
    assert_eq!(settings.gue_port, 7000);
    // Back and forth: only the set in force answers, whichever half holds it.
    d.set(&[LB, LB2], GUE_DEFAULT_PORT);
    d.expect("LB again", &ipip(LB, &syn), DecapVerdict::DecapIpip);
    d.expect("LB2 still", &gue(LB2, &syn), DecapVerdict::DecapGue);
    assert_eq!(
        d.decap.maps.settings().expect("settings").sources,
        vec![IpAddr::from(LB), IpAddr::from(LB2)]
    );
    // Both families in one set, switched together.
    d.set_both(&[LB2], &[LB6], GUE_DEFAULT_PORT);
    d.expect(
        "LB6 now",
        &ip6ip6(LB6, &inner_v6()),
        DecapVerdict::DecapIp6ip6,
    );
    d.expect("LB gone", &ipip(LB, &syn), DecapVerdict::SourceNotAllowed);
    assert_eq!(
        d.decap.maps.settings().expect("settings").sources,
        vec![IpAddr::from(LB2), IpAddr::from(LB6)]
    );
    d.set(&[LB2], GUE_DEFAULT_PORT);
    d.expect(
        "LB6 gone with the next set",
        &ip6ip6(LB6, &inner_v6()),
        DecapVerdict::SourceNotAllowed,
    );
}

#[test]
fn the_pinned_attach_outlives_its_handles_and_is_replaced_in_place() {
    root();
    let net = TestNet::new();
    let pins = Bpffs::new();
    let dir = load::entry_dir(&pins.dir, "f0");
    let other = load::entry_dir(&pins.dir.join("other"), "f0");
    let lb = [Ipv4Addr::from(LB)];
    net.run(|| {
        let again = load::attach_pinned(&dir, "f0", &lb, GUE_DEFAULT_PORT).expect("attach");
        assert!(!again, "a first attach");
        assert!(load::link_pinned(&dir));
        // Nothing of the attach is held by this process any more: the pins
        // hold it. A re-attach replaces program and settings in place.
        let again =
            load::attach_pinned(&dir, "f0", &[Ipv4Addr::from(LB2)], 7000).expect("re-attach");
        assert!(again, "the second attach found the first");
        let settings = DecapMaps::open(&dir)
            .expect("open pins")
            .settings()
            .expect("read");
        assert_eq!(settings.sources, vec![IpAddr::from(LB2)]);
        assert_eq!(settings.gue_port, 7000);
        // Another decapsulator (another pin dir) cannot take the interface.
        let err = load::attach_pinned(&other, "f0", &lb, GUE_DEFAULT_PORT)
            .expect_err("the interface is taken");
        assert!(
            format!("{err:#}").contains("another XDP program is attached"),
            "{err:#}"
        );
        let removed = load::detach_pinned(&dir).expect("detach");
        assert_eq!(
            removed,
            [
                "link",
                "DECAP_CONF",
                "DECAP_SOURCES",
                "DECAP_SOURCES6",
                "DECAP_VERDICTS"
            ]
        );
        assert!(!dir.exists(), "the interface's pin directory is gone");
        // Free again: the other one attaches now.
        load::attach_pinned(&other, "f0", &lb, GUE_DEFAULT_PORT).expect("attach after detach");
        load::detach_pinned(&other).expect("detach the other");
    });
}

#[test]
fn the_map_list_names_every_map_of_the_object() {
    let object = lb_userspace::object::DECAP_OBJECT;
    assert!(
        !object.is_empty(),
        "lb was built without the lb-decap object"
    );
    let in_object: Vec<String> = lb_userspace::object::map_layouts(object)
        .expect("parse lb-decap")
        .into_keys()
        .collect();
    let mut listed: Vec<String> = lb_common::map_names::decap::ALL
        .iter()
        .map(|m| m.to_string())
        .collect();
    listed.sort();
    assert_eq!(in_object, listed, "lb-common/src/map_names.rs's decap list");
}
