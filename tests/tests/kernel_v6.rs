//! Kernel tier (issue 24): IPv6 in the `lb` program, as far as it is built.
//! IPv6 frames take their own entry (EtherType 0x86DD, `lb-ebpf/src/v6.rs`):
//! traffic that is not to an IPv6 VIP (neighbour discovery, router
//! advertisements, the host's own traffic) passes untouched, byte for byte;
//! traffic to a VIP in `VIPS6` gets the VIP rules (`parse6.rs`), each case
//! that cannot be balanced its verdict.
//! IPv6 services are not balanced yet: a packet that passes the rules finds
//! no service (`PassNoService`).
//!
//! The real `lb` object under BPF_PROG_TEST_RUN in the kernel tier's
//! namespace (tests/src/kernel_net.rs); frames built by etherparse. Needs
//! root and BPF; without them the tests fail loudly.

use aya::maps::{HashMap, Map, MapData};
use etherparse::{Icmpv6Type, PacketBuilder};
use lb_common::{Verdict, ipv6::addr_of, map_names::MapName};
use lb_tests::kernel_net::{CLIENT_MAC, FRONT_MAC, Harness, TestNet, lab_config};
use lb_userspace::harness::xdp::{XDP_DROP, XDP_PASS};

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
