//! Kernel tier (issue 11): fragments and ICMP errors belong to their flow,
//! and packets too big for the egress link get "fragmentation needed" or go
//! to the kernel to be fragmented. The real `lb` object under
//! BPF_PROG_TEST_RUN in the kernel tier's namespace (tests/src/kernel_net.rs).
//!
//! Expected frames are built independently with etherparse (every checksum
//! computed from scratch) and fragmented by the test's own fragmenter, then
//! compared byte for byte with what the program left.
//!
//! Needs root and BPF; without them the tests fail loudly.

use etherparse::{Icmpv4Type, PacketBuilder, icmpv4::DestUnreachableHeader};
use lb_common::{Verdict, map_names::MapName};
use lb_tests::kernel_frames::frag_needed_for;
use lb_tests::kernel_net::{
    BACK_MAC, Bpffs, CLIENT, CLIENT_MAC, FRONT_MAC, Harness, TestNet, VIP, VIP_DSR, WEB_MACS,
    WEB_UDP_PORT, WEBS, expect_old_version_refused, fragments, icmp_error, lab_config,
    pin_old_layout, service, udp, webs, without_df,
};
use lb_userspace::{
    config::{Config, Forwarding, Protocol},
    harness::xdp::{XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX},
};

/// The kernel tier's lab plus a UDP service in DSR (VIP_DSR:53, webs on :53).
fn config() -> Config {
    let mut cfg = lab_config();
    cfg.services.push(service(
        "dns-dsr",
        VIP_DSR,
        53,
        Protocol::Udp,
        Forwarding::Dsr,
        webs(53),
    ));
    cfg
}

/// A UDP datagram with `len` bytes of a recognisable payload.
#[allow(clippy::too_many_arguments)] // one argument per header field under test
fn datagram(
    macs: ([u8; 6], [u8; 6]),
    src: [u8; 4],
    dst: [u8; 4],
    ttl: u8,
    sport: u16,
    dport: u16,
    len: usize,
) -> Vec<u8> {
    let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    udp(macs.0, macs.1, src, dst, ttl, sport, dport, &payload)
}

/// An IPv4 packet (no Ethernet) as a host quotes it in an ICMP error.
fn quoted(frame: &[u8]) -> Vec<u8> {
    frame[14..].to_vec()
}

/// Runs each fragment in order and asserts each leaves as `want`'s.
fn expect_fragments(
    h: &mut Harness,
    ifindex: u32,
    input: &[Vec<u8>],
    want: &[Vec<u8>],
    action: u32,
    reason: Verdict,
) {
    assert_eq!(input.len(), want.len());
    for (i, (frag, want)) in input.iter().zip(want).enumerate() {
        let out = h.expect_case(&format!("fragment {i}"), ifindex, frag, action, reason);
        assert_eq!(&out, want, "fragment {i} of {}", input.len());
    }
}

/// The reported bug: a backend's UDP reply larger than the MTU, fragmented
/// by the backend, must leave as the VIP's in every fragment, and a
/// client's fragmented request must reach its flow's backend whole.
#[test]
fn nat_fragments_follow_their_flow_both_ways() {
    let net = TestNet::new();
    net.run(|| {
        let mut h = Harness::new(&config());
        let (front, back) = (h.front, h.back);
        // The flow: client:5000 → VIP:5353, pinned to web1:5300.
        let req = datagram((CLIENT_MAC, FRONT_MAC), CLIENT, VIP, 64, 5000, 5353, 4);
        h.expect(h.front, &req, XDP_REDIRECT, Verdict::Forwarded);

        // web1's 3000-byte answer in three fragments (1480, 1480, 48).
        let reply = datagram(
            (WEB_MACS[0], BACK_MAC),
            WEBS[0],
            CLIENT,
            64,
            WEB_UDP_PORT,
            5000,
            3000,
        );
        let from_web = fragments(&reply, 0x4242, 1480);
        assert_eq!(from_web.len(), 3);
        let as_vip = datagram((FRONT_MAC, CLIENT_MAC), VIP, CLIENT, 63, 5353, 5000, 3000);
        let want = fragments(&as_vip, 0x4242, 1480);
        expect_fragments(
            &mut h,
            back,
            &from_web,
            &want,
            XDP_REDIRECT,
            Verdict::ForwardedReply,
        );

        // The client's 2000-byte request in two fragments, to web1:5300;
        // then a datagram whose first fragment opens a new flow like any
        // packet: the next backend in the ring, its later fragments after it.
        for (sport, web, id) in [(5000, 0, 7), (5001, 1, 8)] {
            let big = datagram((CLIENT_MAC, FRONT_MAC), CLIENT, VIP, 64, sport, 5353, 2000);
            let macs = (BACK_MAC, WEB_MACS[web]);
            let to_web = datagram(macs, CLIENT, WEBS[web], 63, sport, WEB_UDP_PORT, 2000);
            expect_fragments(
                &mut h,
                front,
                &fragments(&big, id, 1480),
                &fragments(&to_web, id, 1480),
                XDP_REDIRECT,
                Verdict::Forwarded,
            );
        }
        // Every fragment counted as the flow's traffic.
        let svc =
            h.dp.counters(MapName::SERVICE_STATS, 1)
                .expect("www-udp counters");
        assert_eq!(svc.packets, 1 + 3 + 2 + 2);
    });
}

/// A later fragment whose first was not seen has no ports: to a VIP it is
/// dropped (`DropFragment`, never sent to some backend); a stray from a
/// backend is passed to the kernel untouched. Its first fragment, arriving
/// after it, still follows the flow.
#[test]
fn a_later_fragment_without_its_first_is_never_misrouted() {
    let net = TestNet::new();
    net.run(|| {
        let mut h = Harness::new(&config());
        let big = datagram((CLIENT_MAC, FRONT_MAC), CLIENT, VIP, 64, 5002, 5353, 2000);
        let frags = fragments(&big, 9, 1480);
        h.expect(h.front, &frags[1], XDP_DROP, Verdict::DropFragment);
        let out = h.expect(h.front, &frags[0], XDP_REDIRECT, Verdict::Forwarded);
        let to_web = datagram(
            (BACK_MAC, WEB_MACS[0]),
            CLIENT,
            WEBS[0],
            63,
            5002,
            WEB_UDP_PORT,
            2000,
        );
        assert_eq!(out, fragments(&to_web, 9, 1480)[0]);

        // A backend's fragment of a datagram the LB never saw start.
        let stray = datagram(
            (WEB_MACS[1], BACK_MAC),
            WEBS[1],
            CLIENT,
            64,
            WEB_UDP_PORT,
            5002,
            2000,
        );
        let stray = fragments(&stray, 10, 1480);
        let out = h.expect(h.back, &stray[1], XDP_PASS, Verdict::PassNotOurs);
        assert_eq!(out, stray[1]);
        // Fragments of another datagram id do not match the recorded one.
        let other_id = fragments(&big, 11, 1480);
        h.expect(h.front, &other_id[1], XDP_DROP, Verdict::DropFragment);
    });
}

/// DSR, UDP service: every fragment goes to the flow's backend with only
/// the MACs changed (the backend has the VIP and reassembles).
#[test]
fn dsr_fragments_follow_their_flow() {
    let net = TestNet::new();
    net.run(|| {
        let mut h = Harness::new(&config());
        let front = h.front;
        for (i, sport) in [6000u16, 6001, 6002].into_iter().enumerate() {
            let big = datagram(
                (CLIENT_MAC, FRONT_MAC),
                CLIENT,
                VIP_DSR,
                64,
                sport,
                53,
                2500,
            );
            let frags = fragments(&big, 100 + i as u16, 1480);
            let want: Vec<Vec<u8>> = frags
                .iter()
                .map(|f| {
                    let mut w = f.clone();
                    w[..6].copy_from_slice(&WEB_MACS[i]);
                    w[6..12].copy_from_slice(&BACK_MAC);
                    w
                })
                .collect();
            expect_fragments(
                &mut h,
                front,
                &frags,
                &want,
                XDP_REDIRECT,
                Verdict::Forwarded,
            );
        }
    });
}

/// A client's "fragmentation needed" (and "port unreachable") about a NAT
/// flow's packet goes to the backend that sent it, translated as the
/// backend knows the flow: outer destination, quoted source address and
/// port, and every checksum but the quoted L4 one (left as quoted, as
/// Katran and Linux do). In DSR only the MACs change.
#[test]
fn a_clients_icmp_error_reaches_the_flows_backend() {
    let net = TestNet::new();
    net.run(|| {
        let mut h = Harness::new(&config());
        // NAT TCP flow client:40000 → VIP:80, pinned to web1:8080.
        let syn = tcp(CLIENT_MAC, FRONT_MAC, CLIENT, VIP, 40000, 80, true);
        h.expect(h.front, &syn, XDP_REDIRECT, Verdict::Forwarded);
        // The VIP's 1400-byte segment the client's path could not carry.
        let sent = tcp_data(VIP, CLIENT, 80, 40000, 1400);
        let frag_needed =
            Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded {
                next_hop_mtu: 1280,
            });
        let error = icmp_error(
            (CLIENT_MAC, FRONT_MAC),
            CLIENT,
            VIP,
            64,
            frag_needed.clone(),
            &sent[..548],
        );
        let out = h.expect(h.front, &error, XDP_REDIRECT, Verdict::ForwardedIcmp);
        // What web1 sent, quoted with the TCP checksum as the client saw it.
        let mut as_sent = tcp_data(WEBS[0], CLIENT, 8080, 40000, 1400);
        as_sent[36..38].copy_from_slice(&sent[36..38]);
        let want = icmp_error(
            (BACK_MAC, WEB_MACS[0]),
            CLIENT,
            WEBS[0],
            63,
            frag_needed,
            &as_sent[..548],
        );
        assert_eq!(out, want);

        // Port unreachable about the UDP NAT flow client:5000 → VIP:5353.
        let req = datagram((CLIENT_MAC, FRONT_MAC), CLIENT, VIP, 64, 5000, 5353, 4);
        h.expect(h.front, &req, XDP_REDIRECT, Verdict::Forwarded);
        let answer = datagram((FRONT_MAC, CLIENT_MAC), VIP, CLIENT, 63, 5353, 5000, 10);
        let unreachable = Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port);
        let error = icmp_error(
            (CLIENT_MAC, FRONT_MAC),
            CLIENT,
            VIP,
            64,
            unreachable.clone(),
            &quoted(&answer),
        );
        let out = h.expect(h.front, &error, XDP_REDIRECT, Verdict::ForwardedIcmp);
        assert_eq!(out, unreachable_to_web1(&answer, 5000));

        // DSR: the same error to the DSR VIP goes to the flow's backend as
        // it is, but for the MACs.
        let req = datagram((CLIENT_MAC, FRONT_MAC), CLIENT, VIP_DSR, 64, 6100, 53, 4);
        let out = h.expect(h.front, &req, XDP_REDIRECT, Verdict::Forwarded);
        let web = WEB_MACS
            .iter()
            .position(|m| out[..6] == m[..])
            .expect("a web");
        let answer = datagram((FRONT_MAC, CLIENT_MAC), VIP_DSR, CLIENT, 64, 53, 6100, 1400);
        let error = icmp_error(
            (CLIENT_MAC, FRONT_MAC),
            CLIENT,
            VIP_DSR,
            64,
            Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded {
                next_hop_mtu: 1280,
            }),
            &quoted(&answer)[..548],
        );
        let out = h.expect(h.front, &error, XDP_REDIRECT, Verdict::ForwardedIcmp);
        let mut want = error.clone();
        want[..6].copy_from_slice(&WEB_MACS[web]);
        want[6..12].copy_from_slice(&BACK_MAC);
        assert_eq!(out, want);
    });
}

/// The client's "port unreachable" about `answer` (web1's 10-byte UDP
/// datagram to the client's `port`, as the VIP's) as it must reach web1:
/// quoting the datagram as web1 sent it, but for its UDP checksum.
fn unreachable_to_web1(answer: &[u8], port: u16) -> Vec<u8> {
    let mut as_sent = quoted(&datagram(
        (WEB_MACS[0], BACK_MAC),
        WEBS[0],
        CLIENT,
        63,
        WEB_UDP_PORT,
        port,
        10,
    ));
    as_sent[26..28].copy_from_slice(&quoted(answer)[26..28]);
    icmp_error(
        (BACK_MAC, WEB_MACS[0]),
        CLIENT,
        WEBS[0],
        63,
        Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port),
        &as_sent,
    )
}

/// Issue 20 item 5, the fuzz case: an ICMP error whose quote is cut short
/// by its IP total length, with the rest of the quote in bytes after it
/// (Ethernet padding, trailing garbage), is not translated: the translator
/// reads and rewrites only within the total length (it rewrote the
/// trailing ports and left an invalid ICMP checksum). A whole quote with
/// padding behind it is translated, the padding untouched.
#[test]
fn an_icmp_error_is_read_only_within_its_ip_total_length() {
    let net = TestNet::new();
    net.run(|| {
        let mut h = Harness::new(&config());
        let req = datagram((CLIENT_MAC, FRONT_MAC), CLIENT, VIP, 64, 5001, 5353, 4);
        h.expect(h.front, &req, XDP_REDIRECT, Verdict::Forwarded);
        let answer = datagram((FRONT_MAC, CLIENT_MAC), VIP, CLIENT, 63, 5353, 5001, 10);
        let unreachable = Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port);
        let quote = quoted(&answer);
        // The quote ends 2 bytes into the quoted UDP header; its ports
        // follow the IP packet as trailing bytes.
        let mut cut = icmp_error(
            (CLIENT_MAC, FRONT_MAC),
            CLIENT,
            VIP,
            64,
            unreachable.clone(),
            &quote[..22],
        );
        cut.extend_from_slice(&quote[22..28]);
        let out = h.expect(h.front, &cut, XDP_PASS, Verdict::PassOtherProtocol);
        assert_eq!(out, cut, "passed to the kernel untouched");
        // The whole quote, then 18 bytes of padding: translated, and the
        // padding is left as it was.
        let error = icmp_error(
            (CLIENT_MAC, FRONT_MAC),
            CLIENT,
            VIP,
            64,
            unreachable.clone(),
            &quote,
        );
        let mut padded = error.clone();
        padded.extend_from_slice(&[0xa5; 18]);
        let out = h.expect(h.front, &padded, XDP_REDIRECT, Verdict::ForwardedIcmp);
        let mut want = unreachable_to_web1(&answer, 5001);
        want.extend_from_slice(&[0xa5; 18]);
        assert_eq!(out, want);
    });
}

/// A backend's "port unreachable" about a NAT flow's datagram reaches the
/// client as the VIP's, about the datagram the client sent to the VIP.
/// Errors quoting no flow, and pings, stay the kernel's.
#[test]
fn a_backends_icmp_error_reaches_the_client_as_the_vips() {
    let net = TestNet::new();
    net.run(|| {
        let mut h = Harness::new(&config());
        let req = datagram((CLIENT_MAC, FRONT_MAC), CLIENT, VIP, 64, 5005, 5353, 20);
        let out = h.expect(h.front, &req, XDP_REDIRECT, Verdict::Forwarded);
        let unreachable = Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port);
        let error = icmp_error(
            (WEB_MACS[0], BACK_MAC),
            WEBS[0],
            CLIENT,
            64,
            unreachable.clone(),
            &quoted(&out),
        );
        let out = h.expect(h.back, &error, XDP_REDIRECT, Verdict::ForwardedIcmp);
        // What the client sent (TTL as the LB forwarded it), quoted back
        // from the VIP; the quoted UDP checksum is web1's copy's.
        let mut as_sent = quoted(&datagram(
            (CLIENT_MAC, FRONT_MAC),
            CLIENT,
            VIP,
            63,
            5005,
            5353,
            20,
        ));
        let web_copy = quoted(&datagram(
            (BACK_MAC, WEB_MACS[0]),
            CLIENT,
            WEBS[0],
            63,
            5005,
            WEB_UDP_PORT,
            20,
        ));
        as_sent[26..28].copy_from_slice(&web_copy[26..28]);
        let want = icmp_error(
            (FRONT_MAC, CLIENT_MAC),
            VIP,
            CLIENT,
            63,
            unreachable.clone(),
            &as_sent,
        );
        assert_eq!(out, want);

        // No flow quoted: the kernel's, untouched.
        let unknown = datagram((FRONT_MAC, CLIENT_MAC), VIP, CLIENT, 63, 5353, 5999, 10);
        let error = icmp_error(
            (CLIENT_MAC, FRONT_MAC),
            CLIENT,
            VIP,
            64,
            unreachable,
            &quoted(&unknown),
        );
        let out = h.expect(h.front, &error, XDP_PASS, Verdict::PassOtherProtocol);
        assert_eq!(out, error);
        let mut ping = Vec::new();
        PacketBuilder::ethernet2(CLIENT_MAC, FRONT_MAC)
            .ipv4(CLIENT, VIP, 64)
            .icmpv4_echo_request(1, 1)
            .write(&mut ping, b"ping")
            .expect("echo");
        let out = h.expect(h.front, &ping, XDP_PASS, Verdict::PassOtherProtocol);
        assert_eq!(out, ping);
    });
}

/// A packet bigger than the egress link's MTU: with DF set the sender gets
/// "fragmentation needed" with that MTU by XDP_TX (a new flow's first packet
/// and an established flow's alike, both directions), never counted as
/// forwarded; with DF clear the kernel gets it to fragment (NAT: already
/// rewritten, so it forwards it to the backend).
#[test]
fn too_big_for_the_egress_link_gets_frag_needed_or_the_kernel() {
    let net = TestNet::new();
    net.ip(&["link", "set", "b0", "mtu", "1400"]);
    net.run(|| {
        let mut h = Harness::new(&config());
        // New flow, first packet 1428 bytes of IP with DF: frag needed.
        let big = datagram((CLIENT_MAC, FRONT_MAC), CLIENT, VIP, 64, 7000, 5353, 1400);
        let out = h.expect(h.front, &big, XDP_TX, Verdict::FragNeeded);
        assert_eq!(out, frag_needed_for(&big, 1400));
        // Nothing was forwarded.
        let svc =
            h.dp.counters(MapName::SERVICE_STATS, 1)
                .expect("www-udp counters");
        assert_eq!(svc.packets, 0);

        // The flow exists now (pinned to web1); a packet that fits goes.
        let small = datagram((CLIENT_MAC, FRONT_MAC), CLIENT, VIP, 64, 7000, 5353, 1372);
        let out = h.expect(h.front, &small, XDP_REDIRECT, Verdict::Forwarded);
        let want = datagram(
            (BACK_MAC, WEB_MACS[0]),
            CLIENT,
            WEBS[0],
            63,
            7000,
            WEB_UDP_PORT,
            1372,
        );
        assert_eq!(out, want);
        // Established, cached next hop: one byte too many is too big.
        let over = datagram((CLIENT_MAC, FRONT_MAC), CLIENT, VIP, 64, 7000, 5353, 1373);
        let out = h.expect(h.front, &over, XDP_TX, Verdict::FragNeeded);
        assert_eq!(out, frag_needed_for(&over, 1400));
        // DF clear: rewritten and handed to the kernel, which fragments it.
        let out = h.expect(h.front, &without_df(over), XDP_PASS, Verdict::PassTooBig);
        let want = datagram(
            (CLIENT_MAC, FRONT_MAC),
            CLIENT,
            WEBS[0],
            64,
            7000,
            WEB_UDP_PORT,
            1373,
        );
        assert_eq!(out, without_df(want));
        let svc =
            h.dp.counters(MapName::SERVICE_STATS, 1)
                .expect("www-udp counters");
        assert_eq!(svc.packets, 1, "only the packet that fitted");

        // DSR: frag needed from the VIP; DF clear goes to the kernel as is.
        let big = datagram((CLIENT_MAC, FRONT_MAC), CLIENT, VIP_DSR, 64, 7001, 53, 1400);
        let out = h.expect(h.front, &big, XDP_TX, Verdict::FragNeeded);
        assert_eq!(out, frag_needed_for(&big, 1400));
        let loose = without_df(big);
        let out = h.expect(h.front, &loose, XDP_PASS, Verdict::PassTooBig);
        assert_eq!(out, loose);
    });
}

/// The reply path: a NAT reply too big for the client's link gets "frag
/// needed" sent back to the backend, quoting the reply as it sent it.
#[test]
fn a_reply_too_big_for_the_clients_link_gets_frag_needed_to_the_backend() {
    let net = TestNet::new();
    net.ip(&["link", "set", "f0", "mtu", "1300"]);
    net.run(|| {
        let mut h = Harness::new(&config());
        let req = datagram((CLIENT_MAC, FRONT_MAC), CLIENT, VIP, 64, 7100, 5353, 4);
        h.expect(h.front, &req, XDP_REDIRECT, Verdict::Forwarded);
        let reply = datagram(
            (WEB_MACS[0], BACK_MAC),
            WEBS[0],
            CLIENT,
            64,
            WEB_UDP_PORT,
            7100,
            1300,
        );
        let out = h.expect(h.back, &reply, XDP_TX, Verdict::FragNeeded);
        assert_eq!(out, frag_needed_for(&reply, 1300));
        // A reply that fits still goes, as the VIP's.
        let fits = datagram(
            (WEB_MACS[0], BACK_MAC),
            WEBS[0],
            CLIENT,
            64,
            WEB_UDP_PORT,
            7100,
            1272,
        );
        let out = h.expect(h.back, &fits, XDP_REDIRECT, Verdict::ForwardedReply);
        assert_eq!(
            out,
            datagram((FRONT_MAC, CLIENT_MAC), VIP, CLIENT, 63, 5353, 7100, 1272)
        );
    });
}

/// The next hop's MTU grew `Flow` by 4 bytes: a flow table pinned by the
/// version before it cannot be adopted (the verifier would reject the
/// program with an obscure message). The loader refuses clearly, saying
/// what to do, and leaves the pins as they were.
#[test]
fn a_flow_table_pinned_before_the_mtu_is_refused_clearly() {
    use lb_userspace::dataplane::Dataplane;
    let net = TestNet::new();
    let fs = Bpffs::new();
    let pins = fs.dir.join("lb");
    net.run(|| {
        let cfg = config();
        let (first, adopted) = Dataplane::load_pinned(&cfg.dataplane, &pins).expect("load pinned");
        assert!(!adopted);
        drop(first);
        // CONNTRACK as the version before the MTU pinned it: 40-byte entries.
        pin_old_layout(
            &pins,
            "CONNTRACK",
            aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_HASH,
            16,
            40,
        );
        expect_old_version_refused(
            &cfg.dataplane,
            &pins,
            "CONNTRACK",
            &["of 40-byte entries", "of 48-byte entries"],
        );
    });
}

fn tcp(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
    sport: u16,
    dport: u16,
    syn: bool,
) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(src_mac, dst_mac)
        .ipv4(src, dst, 64)
        .tcp(sport, dport, 1, 64240);
    let b = if syn { b.syn() } else { b.ack(1) };
    let mut out = Vec::new();
    b.write(&mut out, b"").expect("tcp");
    out
}

/// An IPv4 TCP segment (no Ethernet) with `len` bytes of data.
fn tcp_data(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, len: usize) -> Vec<u8> {
    let payload: Vec<u8> = (0..len).map(|i| (i % 13) as u8).collect();
    let mut out = Vec::new();
    PacketBuilder::ipv4(src, dst, 63)
        .tcp(sport, dport, 1, 64240)
        .ack(1)
        .write(&mut out, &payload)
        .expect("tcp data");
    out
}
