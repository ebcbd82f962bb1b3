//! Kernel tier (issue 24): the tunnel modes of IPv6 services, whose outer
//! header is IPv6. IP6IP6 and GUE-over-IPv6 frames byte for byte (the outer
//! IPv6 header: traffic class copied, flow label from the flow hash,
//! payload length, next header, hop limit 64; GUE's UDP from the flow's
//! port with checksum 0; the inner packet untouched), the MTU rule ("packet
//! too big" with the link's MTU less the overhead, also below IPv6's 1280),
//! a client's ICMPv6 error carried to its tunnel backend in the tunnel, and
//! a backend without a route (so without a tunnel source) left to the
//! kernel.
//!
//! The real `lb` object under BPF_PROG_TEST_RUN in the kernel tier's
//! namespace made dual-stack (tests/src/kernel_net6.rs), whose back network
//! gets a route to a remote IPv6 subnet through a router (web1's address and
//! MAC): the tunnel backends sit behind it. Expected frames are built with
//! etherparse. Needs root and BPF; without them the tests fail loudly.

use etherparse::{
    Ethernet2Header, IpNumber, Ipv6FlowLabel, Ipv6Header, PacketBuilder, UdpHeader, UdpHeaderSlice,
};
use lb_common::{
    FlowKey6, Verdict,
    hash::flow_hash6,
    ipv6::addr_of,
    map_names::MapName,
    tunnel::{flow_label, gue_source_port},
};
use lb_tests::{
    kernel_net::{BACK_MAC, CLIENT_MAC, FRONT_MAC, Harness, TestNet, WEB_MACS, lab_config},
    kernel_net6::{
        CLIENT_V6, Seg, dual_stack_net, icmp6_error, packet_too_big_for, service6, tcp6, text6,
        udp6,
    },
};
use lb_userspace::{
    config::{Backend, Config, Forwarding, Protocol},
    harness::xdp::{XDP_PASS, XDP_REDIRECT, XDP_TX},
};

const fn v6(last: u8, net: u8) -> [u8; 16] {
    [
        0x20, 0x01, 0x0d, 0xb8, 0, net, 0, 0, 0, 0, 0, 0, 0, 0, 0, last,
    ]
}

const VIP_IP6IP6: [u8; 16] = v6(0x60, 0x18);
const VIP_GUE6: [u8; 16] = v6(0x61, 0x18);
/// A tunnel service whose backend has no route (so no tunnel source).
const VIP_NOWHERE6: [u8; 16] = v6(0x62, 0x18);
/// The LB's back address: the source the kernel picks for the remote
/// subnet's route (no `tunnel-source6` configured).
const LB_BACK6: [u8; 16] = v6(1, 0x19);
/// The remote backends, behind the router web1 (2001:db8:19::11).
const REMOTE6: [[u8; 16]; 3] = [v6(0x11, 0x98), v6(0x12, 0x98), v6(0x13, 0x98)];
const REMOTE_NET6: &str = "2001:db8:98::/64";
const ROUTER6: &str = "2001:db8:19::11";
const ROUTER_MAC: [u8; 6] = WEB_MACS[0];
const GUE_PORT: u16 = 6080;
/// A traffic class the client sets (DSCP EF, ECT(0)): the outer copies it.
const TCLASS: u8 = 0xba;
const ETH: usize = 14;

/// The kernel tier's lab plus IPv6 tunnel services on the remote
/// backends: IP6IP6 (TCP :80), GUE (TCP :80, UDP :53), and a GUE service
/// whose backend has no route.
fn config() -> Config {
    let mut cfg = lab_config();
    let remote = |name: &str, vip, port, protocol, forwarding| {
        let mut s = service6(name, vip, port, protocol, forwarding, port);
        for (b, addr) in s.backends.iter_mut().zip(REMOTE6) {
            b.address = std::net::SocketAddr::new(addr.into(), port);
        }
        s
    };
    let mut nowhere = remote("nowhere6", VIP_NOWHERE6, 80, Protocol::Tcp, Forwarding::Gue);
    nowhere.backends.truncate(1);
    let lost: &mut Backend = &mut nowhere.backends[0];
    lost.address = std::net::SocketAddr::new(v6(9, 0x99).into(), 80);
    cfg.services.extend([
        remote("ip6ip6", VIP_IP6IP6, 80, Protocol::Tcp, Forwarding::Ipip),
        remote("gue6", VIP_GUE6, 80, Protocol::Tcp, Forwarding::Gue),
        remote("gue6-udp", VIP_GUE6, 53, Protocol::Udp, Forwarding::Gue),
        nowhere,
    ]);
    cfg
}

/// The dual-stack namespace with the remote subnet routed via web1.
fn net() -> TestNet {
    let net = dual_stack_net();
    net.ip(&[
        "-6",
        "route",
        "add",
        REMOTE_NET6,
        "via",
        ROUTER6,
        "dev",
        "b0",
    ]);
    net
}

/// A client's TCP segment to `vip`:80 with the test's traffic class.
fn client_tcp(sport: u16, vip: [u8; 16], seg: Seg, payload: &[u8]) -> Vec<u8> {
    let mut frame = tcp6(
        (CLIENT_MAC, FRONT_MAC),
        (CLIENT_V6, sport),
        (vip, 80),
        64,
        seg,
        payload,
    );
    // Traffic class: the low nibble of the first byte, the high of the
    // second (no checksum covers it).
    frame[ETH] = 0x60 | TCLASS >> 4;
    frame[ETH + 1] = (TCLASS & 0x0f) << 4 | (frame[ETH + 1] & 0x0f);
    frame
}

/// The flow key of a client's packet (`frame`, as it arrived).
fn key_of(frame: &[u8]) -> FlowKey6 {
    let addr = |at: usize| addr_of(frame[at..at + 16].try_into().expect("16 bytes"));
    let half = |at: usize| u16::from_ne_bytes([frame[at], frame[at + 1]]);
    FlowKey6 {
        saddr: addr(ETH + 8),
        daddr: addr(ETH + 24),
        sport: half(ETH + 40),
        dport: half(ETH + 42),
        protocol: frame[ETH + 6],
        ..FlowKey6::default()
    }
}

/// The Ethernet and outer IPv6 headers a tunnel puts in front of `inner`
/// (IPv6 bytes) to `dst`, the flow label from `hash`.
fn outer6(inner: &[u8], extra: usize, next: IpNumber, dst: [u8; 16], hash: u32) -> Vec<u8> {
    let mut out = Vec::new();
    Ethernet2Header {
        source: BACK_MAC,
        destination: ROUTER_MAC,
        ether_type: etherparse::EtherType::IPV6,
    }
    .write(&mut out)
    .expect("eth");
    Ipv6Header {
        traffic_class: (inner[0] & 0x0f) << 4 | inner[1] >> 4,
        flow_label: Ipv6FlowLabel::try_new(flow_label(hash)).expect("20 bits"),
        payload_length: (inner.len() + extra) as u16,
        next_header: next,
        hop_limit: 64,
        source: LB_BACK6,
        destination: dst,
    }
    .write(&mut out)
    .expect("ipv6");
    out
}

/// `frame` (as the client sent it, flow `key`) in IP6IP6 to `dst`.
fn ip6ip6_of(frame: &[u8], dst: [u8; 16], key: &FlowKey6) -> Vec<u8> {
    let inner = &frame[ETH..];
    let mut out = outer6(inner, 0, IpNumber(41), dst, flow_hash6(key));
    out.extend_from_slice(inner);
    out
}

/// `frame` in GUE over IPv6 to `dst`, the flow `key`'s source port.
fn gue6_of(frame: &[u8], dst: [u8; 16], key: &FlowKey6) -> Vec<u8> {
    let inner = &frame[ETH..];
    let hash = flow_hash6(key);
    let mut out = outer6(inner, 12, IpNumber::UDP, dst, hash);
    UdpHeader {
        source_port: gue_source_port(hash),
        destination_port: GUE_PORT,
        length: (inner.len() + 12) as u16,
        checksum: 0,
    }
    .write(&mut out)
    .expect("udp");
    out.extend_from_slice(&[0, 41, 0, 0]);
    out.extend_from_slice(inner);
    out
}

/// Which remote backend a tunnel frame goes to (its outer destination).
fn remote_of(out: &[u8]) -> usize {
    let dst: [u8; 16] = out[ETH + 24..ETH + 40].try_into().expect("address");
    REMOTE6
        .iter()
        .position(|r| *r == dst)
        .unwrap_or_else(|| panic!("not to a remote backend: {}", text6(dst)))
}

fn id_of(cfg: &Config, name: &str) -> u32 {
    cfg.services
        .iter()
        .position(|s| s.name == name)
        .expect("service") as u32
}

#[test]
fn ip6ip6_frames_are_the_packet_untouched_in_an_outer_ipv6_header() {
    let net = net();
    net.run(|| {
        let cfg = config();
        let mut h = Harness::new(&cfg);
        let syn = client_tcp(40000, VIP_IP6IP6, Seg::Syn(100), b"");
        let key = key_of(&syn);
        let out = h.expect(h.front, &syn, XDP_REDIRECT, Verdict::Forwarded);
        assert_eq!(out, ip6ip6_of(&syn, REMOTE6[0], &key));
        assert_eq!(&out[ETH + 40..], &syn[ETH..], "the inner packet untouched");

        // The flow keeps its backend, its next hop and its flow label.
        let data = client_tcp(
            40000,
            VIP_IP6IP6,
            Seg::Ack(101, 1),
            b"GET / HTTP/1.1\r\n\r\n",
        );
        let out = h.expect(h.front, &data, XDP_REDIRECT, Verdict::Forwarded);
        assert_eq!(out, ip6ip6_of(&data, REMOTE6[0], &key));
        // Round robin: the next flow to the next backend, its own label.
        let other = client_tcp(40001, VIP_IP6IP6, Seg::Syn(100), b"");
        let out = h.expect(h.front, &other, XDP_REDIRECT, Verdict::Forwarded);
        assert_eq!(out, ip6ip6_of(&other, REMOTE6[1], &key_of(&other)));

        let svc =
            h.dp.counters(MapName::SERVICE_STATS, id_of(&cfg, "ip6ip6"))
                .expect("service counters");
        assert_eq!(svc.packets, 3);
        assert_eq!(
            svc.bytes,
            (syn.len() + data.len() + other.len()) as u64,
            "bytes as they arrived"
        );
    });
}

#[test]
fn gue6_frames_carry_the_packet_in_udp_over_ipv6_from_the_flows_port() {
    let net = net();
    net.run(|| {
        let mut h = Harness::new(&config());
        let syn = client_tcp(41000, VIP_GUE6, Seg::Syn(100), b"");
        let out = h.expect(h.front, &syn, XDP_REDIRECT, Verdict::Forwarded);
        assert_eq!(out, gue6_of(&syn, REMOTE6[0], &key_of(&syn)));
        assert_eq!(&out[ETH + 52..], &syn[ETH..], "the inner packet untouched");

        // UDP inside GUE: the same rule.
        let query = udp6(
            (CLIENT_MAC, FRONT_MAC),
            (CLIENT_V6, 5000),
            (VIP_GUE6, 53),
            64,
            b"q",
        );
        let out = h.expect(h.front, &query, XDP_REDIRECT, Verdict::Forwarded);
        assert_eq!(out, gue6_of(&query, REMOTE6[0], &key_of(&query)));

        // One source port and one flow label per flow; flows spread.
        let mut ports = std::collections::BTreeSet::new();
        for sport in 42000..42032u16 {
            let syn = client_tcp(sport, VIP_GUE6, Seg::Syn(100), b"");
            let first = h.expect(h.front, &syn, XDP_REDIRECT, Verdict::Forwarded);
            let port = UdpHeaderSlice::from_slice(&first[ETH + 40..])
                .expect("udp")
                .source_port();
            for payload in [&b"one"[..], b"two"] {
                let data = client_tcp(sport, VIP_GUE6, Seg::Ack(101, 1), payload);
                let out = h.expect(h.front, &data, XDP_REDIRECT, Verdict::Forwarded);
                assert_eq!(out[ETH..ETH + 4], first[ETH..ETH + 4], "flow {sport} label");
                assert_eq!(out[ETH + 40..ETH + 42], first[ETH + 40..ETH + 42]);
            }
            ports.insert(port);
        }
        assert!(ports.len() >= 30, "{} distinct ports", ports.len());
    });
}

/// With the back link's MTU at 1400: what fits once wrapped goes; one
/// byte more gets "packet too big" with 1400 less the overhead (40 for
/// IP6IP6, 52 for GUE), a new flow's first packet and an established
/// flow's alike. With the link at 1300, below 1280 + overhead, the answer
/// says 1248 (GUE): the client keeps to 1280 (RFC 8200 §5), so its packets
/// above 1248 never fit the tunnel (docs/architecture.md, "Tunnels").
#[test]
fn too_big_for_an_ipv6_tunnel_gets_packet_too_big_with_the_mtu_less_the_overhead() {
    let net = net();
    net.ip(&["link", "set", "b0", "mtu", "1400"]);
    net.run(|| {
        let mut h = Harness::new(&config());
        let datagram = |sport, len: usize| {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            udp6(
                (CLIENT_MAC, FRONT_MAC),
                (CLIENT_V6, sport),
                (VIP_GUE6, 53),
                64,
                &payload,
            )
        };
        // GUE: 1348 + 52 = 1400 fits.
        let fits = datagram(6000, 1348 - 48);
        let out = h.expect(h.front, &fits, XDP_REDIRECT, Verdict::Forwarded);
        assert_eq!(out.len(), ETH + 1400);
        // The flow's next packet, one byte more: its cached hop says no.
        let over = datagram(6000, 1349 - 48);
        let out = h.expect(h.front, &over, XDP_TX, Verdict::FragNeeded);
        assert_eq!(out, packet_too_big_for(&over, 1348));
        // A new flow's first packet: the FIB says no.
        let first = datagram(6001, 1349 - 48);
        let out = h.expect(h.front, &first, XDP_TX, Verdict::FragNeeded);
        assert_eq!(out, packet_too_big_for(&first, 1348));

        // IP6IP6 (TCP): 1360 + 40 fits, 1361 does not.
        let syn = client_tcp(43000, VIP_IP6IP6, Seg::Syn(100), b"");
        h.expect(h.front, &syn, XDP_REDIRECT, Verdict::Forwarded);
        let fits = client_tcp(43000, VIP_IP6IP6, Seg::Ack(101, 1), &[7; 1360 - 60]);
        let out = h.expect(h.front, &fits, XDP_REDIRECT, Verdict::Forwarded);
        assert_eq!(out, ip6ip6_of(&fits, REMOTE6[0], &key_of(&syn)));
        let over = client_tcp(43000, VIP_IP6IP6, Seg::Ack(101, 1), &[7; 1361 - 60]);
        let out = h.expect(h.front, &over, XDP_TX, Verdict::FragNeeded);
        assert_eq!(out, packet_too_big_for(&over, 1360));
    });
    // A link below 1280 + the overhead: the answer's MTU is below 1280.
    net.ip(&["link", "set", "b0", "mtu", "1300"]);
    net.run(|| {
        let mut h = Harness::new(&config());
        let payload = vec![3u8; 1280 - 48];
        let big = udp6(
            (CLIENT_MAC, FRONT_MAC),
            (CLIENT_V6, 6100),
            (VIP_GUE6, 53),
            64,
            &payload,
        );
        let out = h.expect(h.front, &big, XDP_TX, Verdict::FragNeeded);
        assert_eq!(out, packet_too_big_for(&big, 1300 - 52));
    });
}

/// A client's ICMPv6 error about the VIP's answer (a backend answers
/// directly) goes to the flow's backend in the tunnel, as the flow's
/// packets go: the same outer destination, flow label and GUE port.
#[test]
fn a_clients_icmpv6_error_reaches_its_tunnel_backend_in_the_tunnel() {
    let net = net();
    net.run(|| {
        let mut h = Harness::new(&config());
        for (vip, sport) in [(VIP_IP6IP6, 44000u16), (VIP_GUE6, 44001)] {
            let syn = client_tcp(sport, vip, Seg::Syn(100), b"");
            let first = h.expect(h.front, &syn, XDP_REDIRECT, Verdict::Forwarded);
            // The backend's answer (VIP → client) the client's path could
            // not carry.
            let mut sent = Vec::new();
            PacketBuilder::ipv6(vip, CLIENT_V6, 63)
                .tcp(80, sport, 1, 64240)
                .ack(101)
                .write(&mut sent, &[9u8; 1400])
                .expect("answer");
            let error = icmp6_error(
                (CLIENT_MAC, FRONT_MAC),
                (CLIENT_V6, vip),
                64,
                etherparse::Icmpv6Type::PacketTooBig { mtu: 1280 },
                &sent[..1232],
            );
            let out = h.expect(h.front, &error, XDP_REDIRECT, Verdict::ForwardedIcmp);
            let backend = REMOTE6[remote_of(&first)];
            let key = key_of(&syn);
            let want = if vip == VIP_IP6IP6 {
                ip6ip6_of(&error, backend, &key)
            } else {
                gue6_of(&error, backend, &key)
            };
            assert_eq!(out, want, "error to the {} flow's backend", text6(vip));
        }
    });
}

/// A tunnel backend the host has no route to has no tunnel source: its
/// packets go to the kernel as they arrived, as a DSR backend's without a
/// next hop do.
#[test]
fn an_ipv6_tunnel_backend_without_a_route_leaves_its_packets_to_the_kernel() {
    let net = net();
    net.run(|| {
        let mut h = Harness::new(&config());
        let syn = client_tcp(47000, VIP_NOWHERE6, Seg::Syn(100), b"");
        let out = h.expect(h.front, &syn, XDP_PASS, Verdict::PassKernelForward);
        assert_eq!(out, syn);
    });
}
