//! Kernel tier (issue 24): IPv6 in the `lb` program, as far as it is built.
//! IPv6 frames take their own entry (EtherType 0x86DD, `lb-ebpf/src/v6.rs`):
//! traffic that is not to an IPv6 VIP (neighbour discovery, router
//! advertisements, the host's own traffic) passes untouched, byte for byte;
//! traffic to a VIP in `VIPS6` gets the VIP rules (`parse6.rs`), each case
//! that cannot be balanced its verdict.
//! A packet that passes the rules with no service on its VIP and port finds
//! none (`PassNoService`); the services of `config_v6` are balanced (NAT66,
//! DSR, TCP and UDP, the lifecycle), by `lb_v6` and `lb_v6_setup`.
//!
//! The real `lb` object under BPF_PROG_TEST_RUN in the kernel tier's
//! namespace (tests/src/kernel_net.rs); frames built by etherparse. Needs
//! root and BPF; without them the tests fail loudly.

use aya::maps::{HashMap, Map, MapData};
use etherparse::{Icmpv6Type, PacketBuilder};
use lb_common::{Verdict, ipv6::addr_of, map_names::MapName};
use lb_tests::{
    kernel_net::{
        BACK_MAC, CLIENT_MAC, FRONT_MAC, Harness, TestNet, WEB_MACS, WEB_PORT, WEB_UDP_PORT,
        lab_config,
    },
    kernel_net6::{
        CLIENT_V6, NOT_A_VIP6, Seg, VIP_DSR6, VIP_NAT6, config_v6, dual_stack_net, tcp6, udp6,
        web_of_mac, web_of6, web6,
    },
};
use lb_userspace::harness::xdp::{XDP_DROP, XDP_PASS, XDP_REDIRECT};

const CLIENT6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
const VIP6: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
];
const OTHER6: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x99,
];

const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_DEST: u8 = 60;
const TCP: u8 = 6;
const UDP: u8 = 17;

/// A TCP SYN client:40000 → `dst`:80 over Ethernet/IPv6.
fn syn(dst: [u8; 16]) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, FRONT_MAC)
        .ipv6(CLIENT6, dst, 64)
        .tcp(40000, 80, 1, 64240)
        .syn()
        .write(&mut out, &[])
        .expect("syn");
    out
}

/// A frame client → `dst` whose IPv6 header is followed by `exts` (each
/// (kind, 8-byte units after the first, segments left for a routing
/// header; a fragment header takes (offset, more) from the last two)),
/// then `upper` with an 8-byte-or-more header.
fn with_extensions(
    dst: [u8; 16],
    exts: &[(u8, u8, u16)],
    upper: u8,
    upper_bytes: &[u8],
) -> Vec<u8> {
    let mut kinds: Vec<u8> = exts.iter().map(|e| e.0).collect();
    kinds.push(upper);
    let mut body = Vec::new();
    for (i, &(kind, units, arg)) in exts.iter().enumerate() {
        let next = kinds[i + 1];
        if kind == NEXTHDR_FRAGMENT {
            let (offset, more) = (arg >> 1, arg & 1);
            body.extend([next, 0]);
            body.extend((offset << 3 | more).to_be_bytes());
            body.extend(0x0102_0304u32.to_be_bytes());
            continue;
        }
        let len = (units as usize + 1) * 8;
        let mut e = vec![0u8; len];
        e[0] = next;
        e[1] = units;
        if kind == NEXTHDR_ROUTING {
            e[3] = arg as u8;
        } else {
            e[2] = 1; // PadN over the rest
            e[3] = (len - 4) as u8;
        }
        body.extend(e);
    }
    body.extend_from_slice(upper_bytes);
    let mut f = Vec::new();
    f.extend(FRONT_MAC);
    f.extend(CLIENT_MAC);
    f.extend(0x86ddu16.to_be_bytes());
    f.extend([0x60, 0, 0, 0]);
    f.extend((body.len() as u16).to_be_bytes());
    f.extend([kinds[0], 64]);
    f.extend(CLIENT6);
    f.extend(dst);
    f.extend(body);
    f
}

/// A 20-byte TCP SYN header (checksum not checked on the way in).
fn tcp_header() -> Vec<u8> {
    etherparse::TcpHeader::new(40000, 80, 1, 1024)
        .to_bytes()
        .to_vec()
}

fn vips6(h: &Harness) -> HashMap<MapData, [u32; 4], u32> {
    HashMap::try_from(Map::HashMap(h.dp.map_data(MapName::VIPS6).expect("VIPS6")))
        .expect("VIPS6 is a hash of IPv6 addresses")
}

/// Non-VIP IPv6 is the kernel's: neighbour solicitation, router
/// advertisement, a connection to the host's own address, echo; each
/// passed as it came (`PassNotOurs`), also with extension headers the
/// VIP rules would drop (they are not ours to judge).
#[test]
fn ipv6_not_to_a_vip_passes_untouched() {
    let net = TestNet::new();
    net.run(|| {
        let cfg = lab_config();
        let mut h = Harness::new(&cfg);
        // A VIP exists, and these frames are not to it.
        vips6(&h).insert(addr_of(VIP6), 1, 0).expect("VIPS6");

        let solicited = [0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, 0, 0, 0x10];
        let mut ns = Vec::new();
        // Target address, then the source link-layer address option (1).
        let mut ns_body = VIP6.to_vec();
        ns_body.extend([1, 1]);
        ns_body.extend(CLIENT_MAC);
        PacketBuilder::ethernet2(CLIENT_MAC, [0x33, 0x33, 0xff, 0, 0, 0x10])
            .ipv6(CLIENT6, solicited, 255)
            .icmpv6(Icmpv6Type::Unknown {
                type_u8: 135,
                code_u8: 0,
                bytes5to8: [0; 4],
            })
            .write(&mut ns, &ns_body)
            .expect("neighbour solicitation");
        let mut ra = Vec::new();
        PacketBuilder::ethernet2(CLIENT_MAC, [0x33, 0x33, 0, 0, 0, 1])
            .ipv6(
                [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
                [0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
                255,
            )
            .icmpv6(Icmpv6Type::Unknown {
                type_u8: 134,
                code_u8: 0,
                bytes5to8: [64, 0, 0x07, 0x08],
            })
            .write(&mut ra, &[0; 8])
            .expect("router advertisement");
        let mut echo = Vec::new();
        PacketBuilder::ethernet2(CLIENT_MAC, FRONT_MAC)
            .ipv6(CLIENT6, OTHER6, 64)
            .icmpv6_echo_request(7, 1)
            .write(&mut echo, b"ping")
            .expect("echo");
        let routed_elsewhere =
            with_extensions(OTHER6, &[(NEXTHDR_ROUTING, 0, 1)], TCP, &tcp_header());
        for (what, frame) in [
            ("neighbour solicitation", ns),
            ("router advertisement", ra),
            ("a SYN to the host's own address", syn(OTHER6)),
            ("echo to another address", echo),
            ("a routing header not to a VIP", routed_elsewhere),
        ] {
            let out = h.expect_case(what, h.front, &frame, XDP_PASS, Verdict::PassNotOurs);
            assert_eq!(out, frame, "{what}: passed byte for byte");
        }
    });
}

/// Each IPv6 case to a VIP that cannot be balanced gets its verdict; a
/// frame passed to the kernel is left as it came.
#[test]
fn each_ipv6_case_to_a_vip_has_its_verdict() {
    let net = TestNet::new();
    net.run(|| {
        let cfg = lab_config();
        let mut h = Harness::new(&cfg);
        vips6(&h).insert(addr_of(VIP6), 1, 0).expect("VIPS6");
        let tcp = tcp_header();
        let udp_header = [0x9c, 0x40, 0, 53, 0, 8, 0, 0];

        let mut bad_version = syn(VIP6);
        bad_version[14] = 0x40;
        let mut too_long = syn(VIP6);
        too_long[18..20].copy_from_slice(&100u16.to_be_bytes());
        let mut truncated_ext = with_extensions(VIP6, &[(NEXTHDR_DEST, 3, 0)], TCP, &[]);
        truncated_ext.truncate(14 + 40 + 16);
        let len = (truncated_ext.len() - 54) as u16;
        truncated_ext[18..20].copy_from_slice(&len.to_be_bytes());
        let mut echo = Vec::new();
        PacketBuilder::ethernet2(CLIENT_MAC, FRONT_MAC)
            .ipv6(CLIENT6, VIP6, 64)
            .icmpv6_echo_request(7, 1)
            .write(&mut echo, b"ping")
            .expect("echo");
        let four = [
            (NEXTHDR_HOP, 0, 0),
            (NEXTHDR_DEST, 1, 0),
            (NEXTHDR_ROUTING, 0, 0),
            (NEXTHDR_DEST, 0, 0),
        ];
        let mut five = four.to_vec();
        five.push((NEXTHDR_DEST, 0, 0));

        let cases: Vec<(&str, Vec<u8>, u32, Verdict)> = vec![
            (
                "a bad version",
                bad_version,
                XDP_DROP,
                Verdict::DropMalformed,
            ),
            (
                "a payload length past the frame",
                too_long,
                XDP_DROP,
                Verdict::DropMalformed,
            ),
            (
                "an extension header cut short",
                truncated_ext,
                XDP_DROP,
                Verdict::DropMalformed,
            ),
            (
                "two fragment headers",
                with_extensions(
                    VIP6,
                    &[(NEXTHDR_FRAGMENT, 0, 1), (NEXTHDR_FRAGMENT, 0, 1)],
                    TCP,
                    &tcp,
                ),
                XDP_DROP,
                Verdict::DropMalformed,
            ),
            (
                "five extension headers",
                with_extensions(VIP6, &five, TCP, &tcp),
                XDP_DROP,
                Verdict::DropIpv6TooManyExtensions,
            ),
            (
                "a routing header with segments left",
                with_extensions(
                    VIP6,
                    &[(NEXTHDR_HOP, 0, 0), (NEXTHDR_ROUTING, 0, 2)],
                    TCP,
                    &tcp,
                ),
                XDP_DROP,
                Verdict::DropIpv6Routing,
            ),
            (
                "a later fragment",
                with_extensions(VIP6, &[(NEXTHDR_FRAGMENT, 0, 185 << 1)], TCP, &[0; 16]),
                XDP_DROP,
                Verdict::DropFragment,
            ),
            (
                "echo to the VIP",
                echo,
                XDP_PASS,
                Verdict::PassOtherProtocol,
            ),
            (
                "ESP to the VIP",
                with_extensions(VIP6, &[], 50, &[0; 16]),
                XDP_PASS,
                Verdict::PassOtherProtocol,
            ),
            (
                "a TCP header cut short",
                with_extensions(VIP6, &[(NEXTHDR_DEST, 0, 0)], TCP, &tcp[..12]),
                XDP_DROP,
                Verdict::DropTruncatedL4,
            ),
            // What passes the rules: four extension headers (a routing
            // header without segments left among them), a first fragment,
            // none at all; no IPv6 service is balanced yet.
            (
                "four extension headers",
                with_extensions(VIP6, &four, TCP, &tcp),
                XDP_PASS,
                Verdict::PassNoService,
            ),
            (
                "a first fragment",
                with_extensions(VIP6, &[(NEXTHDR_FRAGMENT, 0, 1)], UDP, &udp_header),
                XDP_PASS,
                Verdict::PassNoService,
            ),
            ("a plain SYN", syn(VIP6), XDP_PASS, Verdict::PassNoService),
        ];
        for (what, frame, action, verdict) in cases {
            let out = h.expect_case(what, h.front, &frame, action, verdict);
            if action == XDP_PASS {
                assert_eq!(out, frame, "{what}: passed byte for byte");
            }
        }

        // Without the VIP in VIPS6, the same SYN is not ours.
        vips6(&h).remove(&addr_of(VIP6)).expect("remove");
        h.expect(h.front, &syn(VIP6), XDP_PASS, Verdict::PassNotOurs);
    });
}

// ---- IPv6 balanced (NAT66, DSR, TCP and UDP, the flow lifecycle) ----
//
// The test namespace made dual-stack (tests/src/kernel_net6.rs).

/// A client's TCP SYN with a hop-by-hop and a destination-options header
/// before it (PadN), its checksum computed by etherparse.
fn syn_with_options(
    macs: ([u8; 6], [u8; 6]),
    (src, sport): ([u8; 16], u16),
    (dst, dport): ([u8; 16], u16),
    hop: u8,
) -> Vec<u8> {
    let mut tcp = etherparse::TcpHeader::new(sport, dport, 7, 64240);
    tcp.syn = true;
    tcp.checksum = tcp.calc_checksum_ipv6_raw(src, dst, &[]).expect("checksum");
    let mut body = vec![NEXTHDR_DEST, 0, 1, 4, 0, 0, 0, 0];
    body.extend([TCP, 0, 1, 4, 0, 0, 0, 0]);
    body.extend(tcp.to_bytes());
    let mut f = Vec::new();
    f.extend(macs.1);
    f.extend(macs.0);
    f.extend(0x86ddu16.to_be_bytes());
    f.extend([0x60, 0, 0, 0]);
    f.extend((body.len() as u16).to_be_bytes());
    f.extend([NEXTHDR_HOP, hop]);
    f.extend(src);
    f.extend(dst);
    f.extend(body);
    f
}

fn active(h: &Harness, backend_id: u32) -> u64 {
    h.dp.flow_table()
        .expect("flow table")
        .active(backend_id)
        .expect("active")
}

/// NAT66 byte for byte: the client's SYNs rotate over the webs, each
/// rewritten as the backend must get it (destination address and port,
/// the TCP checksum over the IPv6 pseudo-header: the expected frames are
/// etherparse's, hop limit 63); the backend's SYN-ACK comes back as the
/// VIP's; the client's ACK establishes the flow (active 1), data flows
/// both ways, a blind RST is dropped, the client's FIN closes it (active
/// 0).
#[test]
fn nat66_forward_and_reply_byte_for_byte_with_the_flow_lifecycle() {
    let net = dual_stack_net();
    net.run(|| {
        let cfg = config_v6();
        let mut h = Harness::new(&cfg);
        let applied = h.dp.apply(&cfg).expect("apply");
        let www6 = applied.iter().find(|s| s.name == "www6").expect("www6");
        let to_lb = (CLIENT_MAC, FRONT_MAC);
        let mut seen = std::collections::BTreeSet::new();
        let mut first_web = None;
        for sport in [41000, 41001, 41002] {
            let syn = tcp6(
                to_lb,
                (CLIENT_V6, sport),
                (VIP_NAT6, 80),
                64,
                Seg::Syn(1000),
                &[],
            );
            let out = h.expect(h.front, &syn, XDP_REDIRECT, Verdict::Forwarded);
            let w = web_of6(&out);
            let want = tcp6(
                (BACK_MAC, WEB_MACS[w]),
                (CLIENT_V6, sport),
                (web6(w), WEB_PORT),
                63,
                Seg::Syn(1000),
                &[],
            );
            assert_eq!(out, want, "SYN from port {sport} as web{} gets it", w + 1);
            seen.insert(w);
            first_web.get_or_insert(w);
        }
        assert_eq!(seen.len(), 3, "round robin over web1..3");
        let w = first_web.expect("a web");
        let web_id = www6.backends[w].1;
        let from_web = (WEB_MACS[w], BACK_MAC);
        let to_client = (FRONT_MAC, CLIENT_MAC);
        let web = (web6(w), WEB_PORT);
        let client = (CLIENT_V6, 41000);
        // The SYN-ACK: the VIP's, to the client.
        let syn_ack = tcp6(from_web, web, client, 64, Seg::SynAck(5000, 1001), &[]);
        let out = h.expect(h.back, &syn_ack, XDP_REDIRECT, Verdict::ForwardedReply);
        let want = tcp6(
            to_client,
            (VIP_NAT6, 80),
            client,
            63,
            Seg::SynAck(5000, 1001),
            &[],
        );
        assert_eq!(out, want, "the SYN-ACK as the VIP's");
        assert_eq!(active(&h, web_id), 0, "a half-open flow is not active");
        // The client's ACK of it establishes the flow.
        let ack = tcp6(to_lb, client, (VIP_NAT6, 80), 64, Seg::Ack(1001, 5001), &[]);
        h.expect(h.front, &ack, XDP_REDIRECT, Verdict::Forwarded);
        assert_eq!(active(&h, web_id), 1, "established: active");
        // Established, both ways.
        let get = tcp6(
            to_lb,
            client,
            (VIP_NAT6, 80),
            64,
            Seg::Ack(1001, 5001),
            b"GET /",
        );
        let out = h.expect(h.front, &get, XDP_REDIRECT, Verdict::Forwarded);
        let want = tcp6(
            (BACK_MAC, WEB_MACS[w]),
            client,
            web,
            63,
            Seg::Ack(1001, 5001),
            b"GET /",
        );
        assert_eq!(out, want, "established data to the same web");
        let answer = tcp6(from_web, web, client, 64, Seg::Ack(5001, 1006), b"200 OK");
        let out = h.expect(h.back, &answer, XDP_REDIRECT, Verdict::ForwardedReply);
        let want = tcp6(
            to_client,
            (VIP_NAT6, 80),
            client,
            63,
            Seg::Ack(5001, 1006),
            b"200 OK",
        );
        assert_eq!(out, want, "established reply as the VIP's");
        // A blind RST far from the client's sequence: dropped.
        let blind = tcp6(
            to_lb,
            client,
            (VIP_NAT6, 80),
            64,
            Seg::Rst(1001 + (1 << 30)),
            &[],
        );
        h.expect(h.front, &blind, XDP_DROP, Verdict::DropRstOutOfWindow);
        assert_eq!(active(&h, web_id), 1);
        // The client's FIN: forwarded, the flow closing, no longer active.
        let fin = tcp6(to_lb, client, (VIP_NAT6, 80), 64, Seg::Fin(1006, 5007), &[]);
        h.expect(h.front, &fin, XDP_REDIRECT, Verdict::Forwarded);
        assert_eq!(active(&h, web_id), 0, "FIN: closing, not active");
    });
}

/// DSR (only the MACs change, the hop limit too is the client's), UDP
/// NAT66 (checksum over the pseudo-header), a SYN behind a hop-by-hop and
/// a destination-options header (balanced, the headers kept, TCP rewritten
/// where the walk found it), SYN-only creation (an ACK without a flow is
/// dropped), and an IPv6 packet to no VIP untouched.
#[test]
fn dsr_udp_extension_headers_and_syn_only_creation() {
    let net = dual_stack_net();
    net.run(|| {
        let cfg = config_v6();
        let mut h = Harness::new(&cfg);
        let to_lb = (CLIENT_MAC, FRONT_MAC);

        let syn = tcp6(
            to_lb,
            (CLIENT_V6, 42000),
            (VIP_DSR6, 80),
            64,
            Seg::Syn(9),
            &[],
        );
        let out = h.expect(h.front, &syn, XDP_REDIRECT, Verdict::Forwarded);
        let w = web_of_mac(&out);
        let mut want = syn.clone();
        want[..6].copy_from_slice(&WEB_MACS[w]);
        want[6..12].copy_from_slice(&BACK_MAC);
        assert_eq!(out, want, "DSR: the MACs only");

        let query = udp6(to_lb, (CLIENT_V6, 42001), (VIP_NAT6, 5353), 64, b"query");
        let out = h.expect(h.front, &query, XDP_REDIRECT, Verdict::Forwarded);
        let w = web_of6(&out);
        let want = udp6(
            (BACK_MAC, WEB_MACS[w]),
            (CLIENT_V6, 42001),
            (web6(w), WEB_UDP_PORT),
            63,
            b"query",
        );
        assert_eq!(out, want, "UDP NAT66, checksum over the pseudo-header");

        let syn = syn_with_options(to_lb, (CLIENT_V6, 42002), (VIP_NAT6, 80), 64);
        let out = h.expect(h.front, &syn, XDP_REDIRECT, Verdict::Forwarded);
        let w = web_of6(&out);
        let want = syn_with_options(
            (BACK_MAC, WEB_MACS[w]),
            (CLIENT_V6, 42002),
            (web6(w), WEB_PORT),
            63,
        );
        assert_eq!(
            out, want,
            "extension headers kept, TCP rewritten after them"
        );

        let ack = tcp6(
            to_lb,
            (CLIENT_V6, 42003),
            (VIP_NAT6, 80),
            64,
            Seg::Ack(5, 6),
            &[],
        );
        h.expect(h.front, &ack, XDP_DROP, Verdict::DropNoFlow);

        let other = tcp6(
            to_lb,
            (CLIENT_V6, 42004),
            (NOT_A_VIP6, 80),
            64,
            Seg::Syn(1),
            &[],
        );
        let out = h.expect(h.front, &other, XDP_PASS, Verdict::PassNotOurs);
        assert_eq!(out, other, "not to a VIP: untouched");
    });
}

/// `source-ip` on a prefix (`source-ip-prefix = 64`): every address of a
/// client's /64 reaches one backend (a client rotating its interface
/// identifiers keeps its backend), while /64s spread over the webs; on the
/// whole address (the default, 128) addresses of one /64 spread too, so
/// the prefix is what keeps them together.
#[test]
fn source_ip_on_a_64_keeps_a_prefix_on_one_backend() {
    use lb_userspace::config::Scheduler;
    let net = dual_stack_net();
    net.run(|| {
        let mut cfg = config_v6();
        let dsr6 = cfg
            .services
            .iter_mut()
            .find(|s| s.name == "dsr6")
            .expect("dsr6");
        dsr6.scheduler = Scheduler::SourceIp;
        dsr6.source_ip_prefix = 64;
        let mut h = Harness::new(&cfg);
        // Client `net`:`host` in 2001:db8:18:NET::HOST.
        let client = |net: u16, host: u16| {
            let mut a = CLIENT_V6;
            a[6..8].copy_from_slice(&net.to_be_bytes());
            a[8..10].copy_from_slice(&host.to_be_bytes());
            a[14..16].copy_from_slice(&host.to_be_bytes());
            a
        };
        let web_of = |h: &mut Harness, src: [u8; 16], sport: u16| {
            let syn = tcp6(
                (CLIENT_MAC, FRONT_MAC),
                (src, sport),
                (VIP_DSR6, 80),
                64,
                Seg::Syn(9),
                &[],
            );
            web_of_mac(&h.expect(h.front, &syn, XDP_REDIRECT, Verdict::Forwarded))
        };
        let mut sport = 50000;
        let mut webs_of_64s = std::collections::BTreeSet::new();
        for net in 0..12u16 {
            let mut webs = std::collections::BTreeSet::new();
            for host in 1..=8u16 {
                sport += 1;
                webs.insert(web_of(&mut h, client(net, host), sport));
            }
            assert_eq!(
                webs.len(),
                1,
                "/64 number {net}: one web for all its addresses"
            );
            webs_of_64s.extend(webs);
        }
        assert!(webs_of_64s.len() > 1, "12 /64s over more than one web");
        // The whole address: one /64's addresses spread.
        let dsr6 = cfg
            .services
            .iter_mut()
            .find(|s| s.name == "dsr6")
            .expect("dsr6");
        dsr6.source_ip_prefix = 128;
        h.dp.apply(&cfg).expect("apply source-ip on /128");
        let mut webs = std::collections::BTreeSet::new();
        for host in 1..=16u16 {
            sport += 1;
            webs.insert(web_of(&mut h, client(0, host), sport));
        }
        assert!(webs.len() > 1, "per address, one /64 spreads over the webs");
    });
}

/// IPv6 next hops without a neighbour entry (issue 24), as IPv4's
/// (`kernel_forward::unresolved_neighbour_falls_back_to_the_kernel`): a
/// NAT66 SYN to a backend the LB's kernel has not resolved is rewritten and
/// passed for the kernel to forward, a DSR one passed unchanged; a NAT66
/// reply to a client without an entry is dropped (`DropNoNeighbour`: the
/// LB's kernel would drop it, its source being the VIP6). Each next hop is
/// reported in `NEIGH_WANTED6` and drained as the agent's resolver drains
/// it, and the agent's request (`Neighbours::resolve`, `NTF_USE`) makes
/// the kernel start neighbour discovery for it: an entry appears.
#[test]
fn unresolved_ipv6_next_hops_are_reported_and_the_agent_has_them_resolved() {
    use std::net::{IpAddr, Ipv6Addr, SocketAddr};

    use lb_userspace::{
        config::{Forwarding, Protocol},
        harness::xdp,
        neighbours::Neighbours,
    };
    const FAR_WEB: [u8; 16] = [
        0x20, 0x01, 0x0d, 0xb8, 0, 0x19, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x77,
    ];
    const STRANGER: [u8; 16] = [
        0x20, 0x01, 0x0d, 0xb8, 0, 0x18, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x77,
    ];
    let net = dual_stack_net();
    net.run(|| {
        let mut cfg = config_v6();
        for (name, vip, mode, to) in [
            ("far6", VIP_NAT6, Forwarding::Nat, WEB_PORT),
            ("fardsr6", VIP_DSR6, Forwarding::Dsr, 81),
        ] {
            let mut s = lb_tests::kernel_net6::service6(name, vip, 81, Protocol::Tcp, mode, to);
            s.backends.truncate(1);
            s.backends[0].address = SocketAddr::new(FAR_WEB.into(), to);
            cfg.services.push(s);
        }
        let mut h = Harness::new(&cfg);
        let to_lb = (CLIENT_MAC, FRONT_MAC);
        // NAT66 to the unresolved backend: rewritten, the hop limit left
        // for the kernel, passed.
        let syn = tcp6(
            to_lb,
            (CLIENT_V6, 42000),
            (VIP_NAT6, 81),
            64,
            Seg::Syn(1),
            &[],
        );
        let out = h.expect(h.front, &syn, XDP_PASS, Verdict::PassKernelForward);
        let want = tcp6(
            to_lb,
            (CLIENT_V6, 42000),
            (FAR_WEB, WEB_PORT),
            64,
            Seg::Syn(1),
            &[],
        );
        assert_eq!(out, want, "NAT66 to an unresolved backend");
        // DSR to it: passed as it arrived.
        let syn = tcp6(
            to_lb,
            (CLIENT_V6, 42001),
            (VIP_DSR6, 81),
            64,
            Seg::Syn(1),
            &[],
        );
        let out = h.expect(h.front, &syn, XDP_PASS, Verdict::PassKernelForward);
        assert_eq!(out, syn, "DSR to an unresolved backend");
        // A NAT66 reply to a client the LB has no entry for: dropped.
        let from_stranger = tcp6(
            to_lb,
            (STRANGER, 42002),
            (VIP_NAT6, 80),
            64,
            Seg::Syn(7),
            &[],
        );
        let out = h.expect(h.front, &from_stranger, XDP_REDIRECT, Verdict::Forwarded);
        let w = web_of6(&out);
        let syn_ack = tcp6(
            (WEB_MACS[w], BACK_MAC),
            (web6(w), WEB_PORT),
            (STRANGER, 42002),
            64,
            Seg::SynAck(9, 8),
            &[],
        );
        h.expect(h.back, &syn_ack, XDP_DROP, Verdict::DropNoNeighbour);
        let mut requests = h.dp.neighbour_requests().expect("NEIGH_WANTED6");
        let mut wanted = requests.drain();
        wanted.sort();
        let index = |iface: &str| xdp::ifindex(iface).expect("ifindex");
        let mut expected = vec![
            (index("b0"), IpAddr::from(FAR_WEB)),
            (index("f0"), IpAddr::from(STRANGER)),
        ];
        expected.sort();
        assert_eq!(wanted, expected, "both next hops reported");
        assert_eq!(requests.drain(), vec![], "drained");
        // The agent's request: the kernel makes an entry and solicits.
        let mut neighbours = Neighbours::new().expect("netlink socket");
        for (ifindex, addr) in &wanted {
            neighbours.resolve(*ifindex, *addr).expect("NTF_USE");
        }
        for (iface, addr) in [("b0", FAR_WEB), ("f0", STRANGER)] {
            let addr = Ipv6Addr::from(addr).to_string();
            let out = std::process::Command::new("ip")
                .args(["-6", "neigh", "show", &addr, "dev", iface])
                .output()
                .expect("ip -6 neigh show");
            let entry = String::from_utf8_lossy(&out.stdout);
            assert!(
                entry.contains(&addr),
                "no neighbour entry for {addr} on {iface} after the agent's request: {entry:?}"
            );
        }
    });
}
