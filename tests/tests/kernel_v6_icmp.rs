//! Kernel tier (issue 24): IPv6 packets without ports of their own follow
//! their flow, and the LB answers a packet too big for its link, byte for
//! byte (the expected frames are etherparse's, which computes every
//! checksum: the ICMPv6 checksum over its pseudo-header, the UDP checksum
//! of a fragmented datagram over the whole datagram):
//! - fragments (`lb-ebpf/src/frag6.rs`): the first fragment is balanced
//!   as its flow's packet (a UDP one creates the flow), the later ones
//!   (`lb_v6_portless`) follow it, NAT66 both ways and DSR;
//! - ICMPv6 errors (`icmp6.rs`): a client's error about a VIP's packet to
//!   the flow's backend (NAT66 translated, DSR by MACs), a backend's or a
//!   router's error about a forwarded packet to the client as the VIP's;
//! - "packet too big" from the LB (`icmp6::too_big`), both directions;
//! - UDP behind an extension header whose rewritten checksum comes out 0
//!   leaves with 0xffff.
//!
//! The real `lb` object under BPF_PROG_TEST_RUN in the kernel tier's
//! namespace made dual-stack (tests/src/kernel_net6.rs). Needs root and
//! BPF; without them the tests fail loudly.

use etherparse::{Icmpv6Type, PacketBuilder, icmpv6::DestUnreachableCode};
use lb_common::{Verdict, map_names::MapName};
use lb_tests::{
    kernel_net::{BACK_MAC, CLIENT_MAC, FRONT_MAC, Harness, TestNet, WEB_MACS, WEB_UDP_PORT},
    kernel_net6::{
        CLIENT_V6, Seg, VIP_DSR6, VIP_NAT6, config_v6, dual_stack_net, icmp6_error,
        packet_too_big_for, tcp6, udp6, web_of_mac, web_of6, web6,
    },
};
use lb_userspace::harness::xdp::{XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX};

const ETH: usize = 14;
const IP6: usize = 40;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_DEST: u8 = 60;
const UDP: u8 = 17;

/// A router on the client's side (the front) and one on the backends'.
const FRONT_ROUTER6: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0, 0x18, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xfe,
];
const BACK_ROUTER6: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0, 0x19, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xfe,
];

/// An Ethernet/IPv6 frame without extension headers cut into fragments of
/// `chunk` bytes of its payload (a multiple of 8) with identification `id`,
/// as a host sends them: a fragment header right after the fixed header.
fn fragments6(frame: &[u8], id: u32, chunk: usize) -> Vec<Vec<u8>> {
    let next = frame[ETH + 6];
    let payload = &frame[ETH + IP6..];
    payload
        .chunks(chunk)
        .enumerate()
        .map(|(i, part)| {
            let offset = i * chunk;
            let more = offset + part.len() < payload.len();
            let mut f = frame[..ETH + IP6].to_vec();
            f[ETH + 6] = NEXTHDR_FRAGMENT;
            f[ETH + 4..ETH + 6].copy_from_slice(&((8 + part.len()) as u16).to_be_bytes());
            f.extend([next, 0]);
            f.extend((((offset / 8) as u16) << 3 | more as u16).to_be_bytes());
            f.extend(id.to_be_bytes());
            f.extend(part);
            f
        })
        .collect()
}

/// The quote of `frame` (its IPv6 bytes) with its source address and port
/// replaced, the quoted L4 checksum left as it was.
fn quote_with_source(frame: &[u8], addr: [u8; 16], port: u16) -> Vec<u8> {
    let mut q = frame[ETH..].to_vec();
    q[8..24].copy_from_slice(&addr);
    q[IP6..IP6 + 2].copy_from_slice(&port.to_be_bytes());
    q
}

/// The same with its destination replaced.
fn quote_with_destination(frame: &[u8], addr: [u8; 16], port: u16) -> Vec<u8> {
    let mut q = frame[ETH..].to_vec();
    q[24..40].copy_from_slice(&addr);
    q[IP6 + 2..IP6 + 4].copy_from_slice(&port.to_be_bytes());
    q
}

/// NAT66 UDP fragments both ways: the client's first fragment creates the
/// flow and is rewritten as the web must get it (UDP checksum of the whole
/// datagram, updated in the first fragment), the later ones follow with
/// their IPv6 header rewritten; the web's fragmented answer comes back as
/// the VIP's. A later fragment whose first was never seen is dropped to a
/// VIP and passed untouched otherwise; the flow's counters count every
/// fragment.
#[test]
fn nat66_fragments_follow_their_flow_both_ways() {
    let net = dual_stack_net();
    net.run(|| {
        let cfg = config_v6();
        let mut h = Harness::new(&cfg);
        let applied = h.dp.apply(&cfg).expect("apply");
        let udp_id = applied.iter().find(|s| s.name == "udp6").expect("udp6").id;
        let to_lb = (CLIENT_MAC, FRONT_MAC);
        let payload: Vec<u8> = (0..3000u32).map(|i| (i * 7) as u8).collect();
        let client = (CLIENT_V6, 43000);
        let datagram = udp6(to_lb, client, (VIP_NAT6, 5353), 64, &payload);
        let id = 0x0a0b_0c0d;
        let frags = fragments6(&datagram, id, 1232);
        assert_eq!(frags.len(), 3);
        let out = h.expect(h.front, &frags[0], XDP_REDIRECT, Verdict::Forwarded);
        let w = web_of6(&out);
        let web = (web6(w), WEB_UDP_PORT);
        let as_web_gets_it = udp6((BACK_MAC, WEB_MACS[w]), client, web, 63, &payload);
        let want = fragments6(&as_web_gets_it, id, 1232);
        assert_eq!(out, want[0], "the first fragment, NAT66'd");
        // The last fragment first (fragments arrive in any order), then
        // the middle one.
        for i in [2, 1] {
            let out = h.expect(h.front, &frags[i], XDP_REDIRECT, Verdict::Forwarded);
            assert_eq!(out, want[i], "later fragment {i} follows its flow");
        }
        let svc = h.dp.counters(MapName::SERVICE_STATS, udp_id).expect("udp6");
        assert_eq!(svc.packets, 3, "every fragment counted as the flow's");

        // The web's answer, fragmented: as the VIP's, to the client.
        let answer: Vec<u8> = payload.iter().rev().copied().collect();
        let reply = udp6((WEB_MACS[w], BACK_MAC), web, client, 64, &answer);
        let reply_id = 0x5151_0001;
        let as_client_gets_it = udp6(
            (FRONT_MAC, CLIENT_MAC),
            (VIP_NAT6, 5353),
            client,
            63,
            &answer,
        );
        let want = fragments6(&as_client_gets_it, reply_id, 1232);
        for (i, frag) in fragments6(&reply, reply_id, 1232).iter().enumerate() {
            let out = h.expect(h.back, frag, XDP_REDIRECT, Verdict::ForwardedReply);
            assert_eq!(out, want[i], "reply fragment {i} as the VIP's");
        }

        // A later fragment whose first was never seen: no ports, no flow.
        let stray = udp6(to_lb, (CLIENT_V6, 43001), (VIP_NAT6, 5353), 64, &payload);
        let stray = fragments6(&stray, 0x0bad, 1232);
        h.expect(h.front, &stray[1], XDP_DROP, Verdict::DropFragment);
        let elsewhere = udp6(to_lb, client, (FRONT_ROUTER6, 5353), 64, &payload);
        let elsewhere = fragments6(&elsewhere, id, 1232);
        let out = h.expect(h.front, &elsewhere[1], XDP_PASS, Verdict::PassNotOurs);
        assert_eq!(out, elsewhere[1], "not to a VIP: untouched");
    });
}

/// DSR: a fragmented TCP segment of a flow (after its SYN) goes to the
/// flow's web whole: every fragment changes its MACs only.
#[test]
fn dsr_fragments_follow_their_flow() {
    let net = dual_stack_net();
    net.run(|| {
        let mut h = Harness::new(&config_v6());
        let to_lb = (CLIENT_MAC, FRONT_MAC);
        let (client, vip) = ((CLIENT_V6, 45000), (VIP_DSR6, 80));
        let syn = tcp6(to_lb, client, vip, 64, Seg::Syn(100), &[]);
        let out = h.expect(h.front, &syn, XDP_REDIRECT, Verdict::Forwarded);
        let w = web_of_mac(&out);
        let data = vec![0x5a; 2500];
        let segment = tcp6(to_lb, client, vip, 64, Seg::Ack(101, 1), &data);
        for (i, frag) in fragments6(&segment, 77, 1232).iter().enumerate() {
            let out = h.expect(h.front, frag, XDP_REDIRECT, Verdict::Forwarded);
            let mut want = frag.clone();
            want[..6].copy_from_slice(&WEB_MACS[w]);
            want[6..12].copy_from_slice(&BACK_MAC);
            assert_eq!(out, want, "fragment {i}: the flow's web, MACs only");
        }
    });
}

/// ICMPv6 errors about a NAT66 flow, both ways, byte for byte (the
/// expected ICMPv6 checksum is etherparse's, over the new pseudo-header):
/// a client-side router's "packet too big" about the VIP's SYN-ACK goes to
/// the web (outer destination and quoted source the web's, hop limit
/// decremented); the web's own "port unreachable" about the forwarded
/// SYN goes to the client as the VIP's; a backend-side router's "packet
/// too big" keeps its own source; a DSR flow's error goes to its web by
/// MACs only. An error quoting no flow, and echo, stay the kernel's.
#[test]
fn icmpv6_errors_follow_their_flow_both_ways() {
    let net = dual_stack_net();
    net.run(|| {
        let cfg = config_v6();
        let mut h = Harness::new(&cfg);
        let to_lb = (CLIENT_MAC, FRONT_MAC);
        let (client, vip) = ((CLIENT_V6, 41000), (VIP_NAT6, 80));
        let syn = tcp6(to_lb, client, vip, 64, Seg::Syn(1000), &[]);
        let forwarded = h.expect(h.front, &syn, XDP_REDIRECT, Verdict::Forwarded);
        let w = web_of6(&forwarded);
        let web = (web6(w), 8080);
        let syn_ack = tcp6(
            (WEB_MACS[w], BACK_MAC),
            web,
            client,
            64,
            Seg::SynAck(5000, 1001),
            &[],
        );
        let answered = h.expect(h.back, &syn_ack, XDP_REDIRECT, Verdict::ForwardedReply);

        // A router on the client's side: the VIP's SYN-ACK was too big.
        let too_big = Icmpv6Type::PacketTooBig { mtu: 1280 };
        let error = icmp6_error(
            (CLIENT_MAC, FRONT_MAC),
            (FRONT_ROUTER6, VIP_NAT6),
            64,
            too_big,
            &answered[ETH..],
        );
        let out = h.expect(h.front, &error, XDP_REDIRECT, Verdict::ForwardedIcmp);
        let want = icmp6_error(
            (BACK_MAC, WEB_MACS[w]),
            (FRONT_ROUTER6, web.0),
            63,
            too_big,
            &quote_with_source(&answered, web.0, web.1),
        );
        assert_eq!(out, want, "to the web, as it sent the SYN-ACK");

        // The web itself: port unreachable about the SYN it got.
        let unreachable = Icmpv6Type::DestinationUnreachable(DestUnreachableCode::Port);
        let error = icmp6_error(
            (WEB_MACS[w], BACK_MAC),
            (web.0, CLIENT_V6),
            64,
            unreachable,
            &forwarded[ETH..],
        );
        let out = h.expect(h.back, &error, XDP_REDIRECT, Verdict::ForwardedIcmp);
        let want = icmp6_error(
            (FRONT_MAC, CLIENT_MAC),
            (VIP_NAT6, CLIENT_V6),
            63,
            unreachable,
            &quote_with_destination(&forwarded, VIP_NAT6, 80),
        );
        assert_eq!(out, want, "to the client, as the VIP's");

        // A router behind the LB: packet too big about the forwarded SYN.
        let error = icmp6_error(
            (WEB_MACS[w], BACK_MAC),
            (BACK_ROUTER6, CLIENT_V6),
            64,
            too_big,
            &forwarded[ETH..],
        );
        let out = h.expect(h.back, &error, XDP_REDIRECT, Verdict::ForwardedIcmp);
        let want = icmp6_error(
            (FRONT_MAC, CLIENT_MAC),
            (BACK_ROUTER6, CLIENT_V6),
            63,
            too_big,
            &quote_with_destination(&forwarded, VIP_NAT6, 80),
        );
        assert_eq!(
            out, want,
            "the router keeps its source; the quote is the VIP's"
        );

        // Time exceeded on the way to the client, about the SYN-ACK.
        let expired =
            Icmpv6Type::TimeExceeded(etherparse::icmpv6::TimeExceededCode::HopLimitExceeded);
        let error = icmp6_error(
            (CLIENT_MAC, FRONT_MAC),
            (FRONT_ROUTER6, VIP_NAT6),
            64,
            expired,
            &answered[ETH..],
        );
        let out = h.expect(h.front, &error, XDP_REDIRECT, Verdict::ForwardedIcmp);
        let want = icmp6_error(
            (BACK_MAC, WEB_MACS[w]),
            (FRONT_ROUTER6, web.0),
            63,
            expired,
            &quote_with_source(&answered, web.0, web.1),
        );
        assert_eq!(out, want, "time exceeded to the web");

        // DSR: the client's error about the VIP's segment, MACs only.
        let dsr_client = (CLIENT_V6, 41001);
        let syn = tcp6(to_lb, dsr_client, (VIP_DSR6, 80), 64, Seg::Syn(1), &[]);
        let out = h.expect(h.front, &syn, XDP_REDIRECT, Verdict::Forwarded);
        let dw = web_of_mac(&out);
        let from_vip = tcp6(
            (FRONT_MAC, CLIENT_MAC),
            (VIP_DSR6, 80),
            dsr_client,
            63,
            Seg::SynAck(9, 2),
            &[],
        );
        let error = icmp6_error(
            (CLIENT_MAC, FRONT_MAC),
            (FRONT_ROUTER6, VIP_DSR6),
            64,
            too_big,
            &from_vip[ETH..],
        );
        let out = h.expect(h.front, &error, XDP_REDIRECT, Verdict::ForwardedIcmp);
        let mut want = error.clone();
        want[..6].copy_from_slice(&WEB_MACS[dw]);
        want[6..12].copy_from_slice(&BACK_MAC);
        assert_eq!(out, want, "DSR: the MACs only");

        // No flow quoted: the kernel's, untouched.
        let stranger = tcp6(
            (FRONT_MAC, CLIENT_MAC),
            vip,
            (CLIENT_V6, 49999),
            63,
            Seg::SynAck(1, 2),
            &[],
        );
        let error = icmp6_error(
            (CLIENT_MAC, FRONT_MAC),
            (FRONT_ROUTER6, VIP_NAT6),
            64,
            too_big,
            &stranger[ETH..],
        );
        let out = h.expect(h.front, &error, XDP_PASS, Verdict::PassOtherProtocol);
        assert_eq!(out, error, "an error about no flow: untouched");
        let mut echo = Vec::new();
        PacketBuilder::ethernet2(CLIENT_MAC, FRONT_MAC)
            .ipv6(CLIENT_V6, VIP_NAT6, 64)
            .icmpv6_echo_request(7, 1)
            .write(&mut echo, b"ping")
            .expect("echo");
        let out = h.expect(h.front, &echo, XDP_PASS, Verdict::PassOtherProtocol);
        assert_eq!(out, echo, "echo to the VIP: the kernel answers");
    });
}

/// A packet bigger than the egress link's MTU gets ICMPv6 "packet too big"
/// with that MTU from the LB, by XDP_TX (IPv6 routers never fragment): a
/// new NAT66 flow's first packet and an established one's, a DSR packet,
/// from the VIP to the client; never counted as forwarded. A packet that
/// fits goes.
#[test]
fn too_big_for_the_egress_link_gets_packet_too_big_from_the_lb() {
    let net = dual_stack_net();
    net.ip(&["link", "set", "b0", "mtu", "1400"]);
    net.run(|| {
        let cfg = config_v6();
        let mut h = Harness::new(&cfg);
        let applied = h.dp.apply(&cfg).expect("apply");
        let udp_id = applied.iter().find(|s| s.name == "udp6").expect("udp6").id;
        let to_lb = (CLIENT_MAC, FRONT_MAC);
        let client = (CLIENT_V6, 44000);
        // 40 + 8 + 1353 = 1401 bytes of IPv6: one too many.
        let big = udp6(to_lb, client, (VIP_NAT6, 5353), 64, &[7; 1353]);
        let out = h.expect(h.front, &big, XDP_TX, Verdict::FragNeeded);
        assert_eq!(out, packet_too_big_for(&big, 1400));
        let svc = h.dp.counters(MapName::SERVICE_STATS, udp_id).expect("udp6");
        assert_eq!(svc.packets, 0, "nothing forwarded");
        // The flow exists; a packet that fits goes, and its next hop (with
        // the MTU) is cached: one byte too many is too big again.
        let fits = udp6(to_lb, client, (VIP_NAT6, 5353), 64, &[7; 1352]);
        let out = h.expect(h.front, &fits, XDP_REDIRECT, Verdict::Forwarded);
        let w = web_of6(&out);
        let want = udp6(
            (BACK_MAC, WEB_MACS[w]),
            client,
            (web6(w), WEB_UDP_PORT),
            63,
            &[7; 1352],
        );
        assert_eq!(out, want);
        let out = h.expect(h.front, &big, XDP_TX, Verdict::FragNeeded);
        assert_eq!(out, packet_too_big_for(&big, 1400), "on the cached hop");
        let svc = h.dp.counters(MapName::SERVICE_STATS, udp_id).expect("udp6");
        assert_eq!(svc.packets, 1, "only the packet that fitted");

        // DSR: a SYN with data too big for the web's link.
        let syn = tcp6(
            to_lb,
            (CLIENT_V6, 44001),
            (VIP_DSR6, 80),
            64,
            Seg::Syn(1),
            &[1; 1400],
        );
        let out = h.expect(h.front, &syn, XDP_TX, Verdict::FragNeeded);
        assert_eq!(out, packet_too_big_for(&syn, 1400), "from the DSR VIP");
    });
}

/// The reply path: a NAT66 reply too big for the client's link gets
/// "packet too big" sent back to the web, from the client's address,
/// quoting the reply as the web sent it; a reply that fits goes as the
/// VIP's.
#[test]
fn a_reply_too_big_for_the_clients_link_gets_packet_too_big_to_the_web() {
    let net = dual_stack_net();
    net.ip(&["link", "set", "f0", "mtu", "1300"]);
    net.run(|| {
        let mut h = Harness::new(&config_v6());
        let client = (CLIENT_V6, 44100);
        let req = udp6((CLIENT_MAC, FRONT_MAC), client, (VIP_NAT6, 5353), 64, b"q");
        let out = h.expect(h.front, &req, XDP_REDIRECT, Verdict::Forwarded);
        let w = web_of6(&out);
        let web = (web6(w), WEB_UDP_PORT);
        let reply = udp6((WEB_MACS[w], BACK_MAC), web, client, 64, &[3; 1300]);
        let out = h.expect(h.back, &reply, XDP_TX, Verdict::FragNeeded);
        assert_eq!(out, packet_too_big_for(&reply, 1300));
        let fits = udp6((WEB_MACS[w], BACK_MAC), web, client, 64, &[3; 1252]);
        let out = h.expect(h.back, &fits, XDP_REDIRECT, Verdict::ForwardedReply);
        let want = udp6(
            (FRONT_MAC, CLIENT_MAC),
            (VIP_NAT6, 5353),
            client,
            63,
            &[3; 1252],
        );
        assert_eq!(out, want);
    });
}

/// A UDP datagram behind a destination-options header (so the fixed
/// header's next header is not UDP) whose NAT66-rewritten checksum comes
/// out 0 leaves with 0xffff (0 is "no checksum", which an IPv6 receiver
/// drops): the rewrite takes the walk's protocol.
#[test]
fn udp_behind_an_extension_header_never_leaves_with_checksum_zero() {
    let net = dual_stack_net();
    net.run(|| {
        let mut h = Harness::new(&config_v6());
        let to_lb = (CLIENT_MAC, FRONT_MAC);
        let client = (CLIENT_V6, 46000);
        // The flow's web first (round robin), with any payload.
        let probe = udp_behind_options(to_lb, client, (VIP_NAT6, 5353), 64, &[0; 8]);
        let out = h.expect(h.front, &probe, XDP_REDIRECT, Verdict::Forwarded);
        let w = web_of6(&out);
        let web = (web6(w), WEB_UDP_PORT);
        // A payload whose last word makes the web's checksum sum to zero.
        let mut payload = b"zero-sum".to_vec();
        payload.extend([0, 0]);
        let sum = ones_sum(web_datagram_words(client, web, &payload));
        payload[8..].copy_from_slice(&(!sum).to_be_bytes());
        let datagram = udp_behind_options(to_lb, client, (VIP_NAT6, 5353), 64, &payload);
        let out = h.expect(h.front, &datagram, XDP_REDIRECT, Verdict::Forwarded);
        let want = udp_behind_options((BACK_MAC, WEB_MACS[w]), client, web, 63, &payload);
        let check = ETH + IP6 + 8 + 6;
        assert_eq!(
            &want[check..check + 2],
            &[0xff, 0xff],
            "etherparse's: 0 as 0xffff"
        );
        assert_eq!(out, want, "sent with 0xffff, never 0");
    });
}

/// Ethernet/IPv6/destination options (PadN)/UDP, the UDP checksum
/// etherparse's (over the pseudo-header, 0 sent as 0xffff).
fn udp_behind_options(
    macs: ([u8; 6], [u8; 6]),
    (src, sport): ([u8; 16], u16),
    (dst, dport): ([u8; 16], u16),
    hop: u8,
    payload: &[u8],
) -> Vec<u8> {
    let udp = etherparse::UdpHeader::with_ipv6_checksum(
        sport,
        dport,
        &etherparse::Ipv6Header {
            source: src,
            destination: dst,
            next_header: etherparse::IpNumber::UDP,
            ..Default::default()
        },
        payload,
    )
    .expect("udp header");
    let mut body = vec![UDP, 0, 1, 4, 0, 0, 0, 0];
    body.extend(udp.to_bytes());
    body.extend(payload);
    let mut f = Vec::new();
    f.extend(macs.1);
    f.extend(macs.0);
    f.extend(0x86ddu16.to_be_bytes());
    f.extend([0x60, 0, 0, 0]);
    f.extend((body.len() as u16).to_be_bytes());
    f.extend([NEXTHDR_DEST, hop]);
    f.extend(src);
    f.extend(dst);
    f.extend(body);
    f
}

/// The 16-bit words a UDP checksum sums for `src` → `dst` with `payload`
/// (the pseudo-header, the UDP header with a zero checksum, the payload).
fn web_datagram_words(
    (src, sport): ([u8; 16], u16),
    (dst, dport): ([u8; 16], u16),
    payload: &[u8],
) -> Vec<u16> {
    let len = (8 + payload.len()) as u32;
    let mut bytes = Vec::new();
    bytes.extend(src);
    bytes.extend(dst);
    bytes.extend(len.to_be_bytes());
    bytes.extend([0, 0, 0, UDP]);
    bytes.extend(sport.to_be_bytes());
    bytes.extend(dport.to_be_bytes());
    bytes.extend((len as u16).to_be_bytes());
    bytes.extend([0, 0]);
    bytes.extend(payload);
    assert!(bytes.len().is_multiple_of(2));
    bytes
        .chunks(2)
        .map(|w| u16::from_be_bytes([w[0], w[1]]))
        .collect()
}

/// One's-complement sum, folded.
fn ones_sum(words: Vec<u16>) -> u16 {
    let mut sum: u32 = words.into_iter().map(u32::from).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The verifier accepts IPv6's three programs; prints each one's verified
/// (processed) instruction count against the 1 000 000 limit (run with
/// `--nocapture` to see them).
#[test]
fn the_verifier_reports_ipv6s_instruction_counts() {
    let net = TestNet::new();
    net.run(|| {
        Harness::new(&config_v6()).print_verified_counts(&[
            "lb",
            "lb_v6",
            "lb_v6_setup",
            "lb_v6_portless",
        ]);
    });
}
