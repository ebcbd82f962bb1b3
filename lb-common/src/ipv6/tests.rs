//! IPv6's rules against an independent parser (etherparse): the walk's
//! offsets and protocols, NAT66 and ICMPv6 translation checksums.

use super::*;
use crate::headers::{EthHdr, TCP_CHECK_OFF, UDP_CHECK_OFF};
use etherparse::{
    Icmpv6Slice, Icmpv6Type, IpNumber, Ipv6Slice, PacketBuilder, SlicedPacket, TransportSlice,
    icmpv6::DestUnreachableCode,
};
use proptest::prelude::*;

const CLIENT: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
const VIP: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
];
const BACKEND: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x11,
];

fn header(next: u8, payload_len: usize) -> Vec<u8> {
    let mut h = vec![0x60, 0, 0, 0];
    h.extend_from_slice(&(payload_len as u16).to_be_bytes());
    h.extend_from_slice(&[next, 64]);
    h.extend_from_slice(&CLIENT);
    h.extend_from_slice(&VIP);
    h
}

/// An extension header of `kind` followed by `next`, `units` 8-byte units
/// long after the first (options are PadN, valid for etherparse).
fn extension(kind: u8, next: u8, units: u8, segments_left: u8) -> Vec<u8> {
    let len = (units as usize + 1) * 8;
    let mut e = vec![0u8; len];
    e[0] = next;
    e[1] = units;
    if kind == NEXTHDR_ROUTING {
        e[2] = 0; // type 0, deprecated, still walks: its length is its length
        e[3] = segments_left;
    } else {
        // One PadN option filling the rest.
        e[2] = 1;
        e[3] = (len - 4) as u8;
    }
    e
}

fn fragment(next: u8, offset: u16, more: bool, id: u32) -> Vec<u8> {
    let word = offset << 3 | more as u16;
    let mut f = vec![next, 0];
    f.extend_from_slice(&word.to_be_bytes());
    f.extend_from_slice(&id.to_be_bytes());
    f
}

/// A packet: fixed header, `exts` (kind, units) in order, then a TCP SYN.
fn packet(exts: &[(u8, u8)], frag: Option<(u16, bool)>) -> Vec<u8> {
    let mut kinds: Vec<u8> = exts.iter().map(|e| e.0).collect();
    if frag.is_some() {
        kinds.push(NEXTHDR_FRAGMENT);
    }
    kinds.push(IPPROTO_TCP);
    let mut body = Vec::new();
    for (i, (kind, units)) in exts.iter().enumerate() {
        body.extend(extension(*kind, kinds[i + 1], *units, 0));
    }
    if let Some((offset, more)) = frag {
        body.extend(fragment(IPPROTO_TCP, offset, more, 0x1234_5678));
    }
    let tcp = etherparse::TcpHeader::new(40000, 80, 1, 1024);
    body.extend(tcp.to_bytes());
    let mut p = header(kinds[0], body.len());
    p.extend(body);
    p
}

#[test]
fn plain_packet_is_its_own_upper_layer() {
    let p = packet(&[], None);
    assert_eq!(
        walk(&p),
        Ok(Chain {
            protocol: IPPROTO_TCP,
            offset: 40,
            fragment: None
        })
    );
}

proptest! {
    /// Any chain etherparse accepts (hop-by-hop first, then destination
    /// options, a routing header without segments left, a first or atomic
    /// fragment, each optional) ends where etherparse says its payload
    /// starts, on the same protocol.
    #[test]
    fn walk_agrees_with_etherparse(
        hop in proptest::option::of(0u8..4),
        dest in proptest::option::of(0u8..4),
        routing in proptest::option::of(0u8..4),
        frag in proptest::option::of(any::<bool>()),
    ) {
        let mut exts = Vec::new();
        if let Some(u) = hop { exts.push((NEXTHDR_HOP, u)); }
        if let Some(u) = dest { exts.push((NEXTHDR_DEST, u)); }
        if let Some(u) = routing { exts.push((NEXTHDR_ROUTING, u)); }
        let p = packet(&exts, frag.map(|more| (0, more)));
        let theirs = Ipv6Slice::from_slice(&p).expect("etherparse accepts it");
        let ours = walk(&p).expect("walk accepts it");
        prop_assert_eq!(ours.protocol, u8::from(theirs.payload().ip_number));
        prop_assert_eq!(ours.offset, p.len() - theirs.payload().payload.len());
        prop_assert_eq!(ours.fragment.is_some(), frag.is_some());
        if let Some(f) = ours.fragment {
            prop_assert_eq!(f.is_first(), frag == Some(true));
            prop_assert_eq!(u32::from_be(f.id), 0x1234_5678);
        }
        prop_assert!(carries_ports(ours.protocol));
    }
}

#[test]
fn a_later_fragment_ends_the_walk_at_its_data() {
    let p = packet(&[(NEXTHDR_DEST, 0)], Some((185, true)));
    let chain = walk(&p).expect("walks");
    assert_eq!((chain.protocol, chain.offset), (IPPROTO_TCP, 40 + 8 + 8));
    let f = chain.fragment.expect("fragment");
    assert!(f.is_later() && !f.is_first() && f.more);
    assert_eq!(f.offset, 185);
    // etherparse agrees it is a fragment.
    assert!(Ipv6Slice::from_slice(&p).unwrap().is_payload_fragmented());
}

#[test]
fn each_case_that_cannot_be_balanced_has_its_verdict() {
    // Exactly MAX_EXTENSIONS headers walk; one more is too many.
    let four = [
        (NEXTHDR_HOP, 0),
        (NEXTHDR_DEST, 1),
        (NEXTHDR_DEST, 0),
        (NEXTHDR_DEST, 2),
    ];
    assert_eq!(MAX_EXTENSIONS, 4);
    assert_eq!(
        walk(&packet(&four, None)).map(|c| c.offset),
        Ok(40 + 8 + 16 + 8 + 24)
    );
    let five = [
        (NEXTHDR_HOP, 0),
        (NEXTHDR_DEST, 0),
        (NEXTHDR_DEST, 0),
        (NEXTHDR_DEST, 0),
        (NEXTHDR_DEST, 0),
    ];
    assert_eq!(walk(&packet(&five, None)), Err(ChainError::TooMany));
    let four_and_fragment = packet(&four, Some((0, true)));
    assert_eq!(walk(&four_and_fragment), Err(ChainError::TooMany));

    // A routing header with segments left: the VIP is not the last hop.
    let mut p = header(NEXTHDR_ROUTING, 8 + 20);
    p.extend(extension(NEXTHDR_ROUTING, IPPROTO_TCP, 0, 1));
    p.extend([0u8; 20]);
    assert_eq!(walk(&p), Err(ChainError::Routing));

    // An extension header longer than the packet.
    let mut p = header(NEXTHDR_DEST, 8);
    p.extend(extension(NEXTHDR_DEST, IPPROTO_TCP, 3, 0)[..8].to_vec());
    assert_eq!(walk(&p), Err(ChainError::Malformed));
    // Fewer than 8 bytes where an extension header should be.
    let mut p = header(NEXTHDR_HOP, 4);
    p.extend([IPPROTO_TCP, 0, 1, 0]);
    assert_eq!(walk(&p), Err(ChainError::Malformed));
    // Two fragment headers.
    let mut p = header(NEXTHDR_FRAGMENT, 36);
    p.extend(fragment(NEXTHDR_FRAGMENT, 0, true, 1));
    p.extend(fragment(IPPROTO_TCP, 0, true, 1));
    p.extend([0u8; 20]);
    assert_eq!(walk(&p), Err(ChainError::Malformed));
    // Shorter than the fixed header.
    assert_eq!(walk(&[0x60; 39]), Err(ChainError::Malformed));
}

#[test]
fn upper_layers_that_are_not_balanced_end_the_walk_too() {
    for protocol in [IPPROTO_ICMPV6, NEXTHDR_NONE, NEXTHDR_ESP, NEXTHDR_AUTH, 132] {
        let mut p = header(NEXTHDR_HOP, 16);
        p.extend(extension(NEXTHDR_HOP, protocol, 0, 0));
        p.extend([0u8; 8]);
        let chain = walk(&p).expect("walks");
        assert_eq!((chain.protocol, chain.offset), (protocol, 48));
        assert!(!carries_ports(chain.protocol));
    }
    // A short upper layer is the upper layer's own parse's business.
    let mut p = header(IPPROTO_TCP, 4);
    p.extend([0u8; 4]);
    assert_eq!(walk(&p).map(|c| c.offset), Ok(40));
}

#[test]
fn the_fixed_header_validity_check() {
    let hdr = |vtc: u32, len: u16| Ipv6Hdr {
        vtc_flow: vtc.to_be(),
        payload_len: len.to_be(),
        next_header: IPPROTO_TCP,
        hop_limit: 64,
        saddr: [0; 4],
        daddr: [0; 4],
    };
    assert!(hdr(0x6000_0000, 20).is_valid(60));
    assert!(hdr(0x6000_0000, 20).is_valid(80));
    assert!(!hdr(0x6000_0000, 21).is_valid(60));
    assert!(!hdr(0x4000_0000, 20).is_valid(60));
    assert!(!hdr(0x6000_0000, 0).is_valid(60), "jumbogram");
    assert_eq!(hdr(0x6ab0_0000, 20).traffic_class(), 0xab);
}

#[test]
fn addresses_convert_both_ways() {
    let a = addr_of(VIP);
    assert_eq!(octets_of(&a), VIP);
    // Raw network order: the first word's bytes are the first octets.
    assert_eq!(a[0].to_ne_bytes(), [0x20, 0x01, 0x0d, 0xb8]);
}

/// An Ethernet/IPv6/TCP-or-UDP frame with valid checksums.
fn frame(
    udp: bool,
    src: [u8; 16],
    dst: [u8; 16],
    sport: u16,
    dport: u16,
    hop: u8,
    payload: &[u8],
) -> Vec<u8> {
    let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]).ipv6(src, dst, hop);
    let mut out = Vec::new();
    if udp {
        b.udp(sport, dport).write(&mut out, payload).expect("udp");
    } else {
        b.tcp(sport, dport, 1234, 4096)
            .syn()
            .write(&mut out, payload)
            .expect("tcp");
    }
    out
}

/// Applies `f` to the header views of a frame as the XDP program does.
fn apply(buf: &mut [u8], f: impl FnOnce(&mut Ipv6Hdr, &mut L4Ports, &mut u16)) {
    let ip_off = EthHdr::LEN;
    let mut ip: Ipv6Hdr = unsafe { core::ptr::read_unaligned(buf[ip_off..].as_ptr().cast()) };
    let l4 = ip_off + Ipv6Hdr::LEN;
    let mut ports: L4Ports = unsafe { core::ptr::read_unaligned(buf[l4..].as_ptr().cast()) };
    let coff = l4
        + if ip.next_header == IPPROTO_TCP {
            TCP_CHECK_OFF
        } else {
            UDP_CHECK_OFF
        };
    let mut check = u16::from_ne_bytes([buf[coff], buf[coff + 1]]);
    f(&mut ip, &mut ports, &mut check);
    unsafe {
        core::ptr::write_unaligned(buf[ip_off..].as_mut_ptr().cast(), ip);
        core::ptr::write_unaligned(buf[l4..].as_mut_ptr().cast(), ports);
    }
    buf[coff..coff + 2].copy_from_slice(&check.to_ne_bytes());
}

/// (source, destination, source port, destination port, hop limit).
type Seen = ([u8; 16], [u8; 16], u16, u16, u8);

/// Every checksum recomputed by etherparse; what the packet now carries.
fn parsed(buf: &[u8]) -> Result<Seen, TestCaseError> {
    let p = SlicedPacket::from_ethernet(buf).map_err(|e| TestCaseError::fail(format!("{e:?}")))?;
    let Some(etherparse::NetSlice::Ipv6(ip)) = p.net else {
        return Err(TestCaseError::fail("not ipv6"));
    };
    let hdr = ip.header().to_header();
    let (s, d) = match p.transport {
        Some(TransportSlice::Tcp(t)) => {
            let want = t
                .to_header()
                .calc_checksum_ipv6(&hdr, t.payload())
                .expect("tcp csum");
            prop_assert_eq!(t.checksum(), want);
            (t.source_port(), t.destination_port())
        }
        Some(TransportSlice::Udp(u)) => {
            let want = u
                .to_header()
                .calc_checksum_ipv6(&hdr, u.payload())
                .expect("udp csum");
            prop_assert_eq!(u.checksum(), want);
            (u.source_port(), u.destination_port())
        }
        _ => return Err(TestCaseError::fail("no transport")),
    };
    Ok((hdr.source, hdr.destination, s, d, hdr.hop_limit))
}

proptest! {
    #[test]
    fn nat66_forward_keeps_checksums_valid(
        udp in any::<bool>(), src in any::<[u8; 16]>(), dst in any::<[u8; 16]>(), new in any::<[u8; 16]>(),
        sport in any::<u16>(), dport in any::<u16>(), nport in any::<u16>(), hop in 2u8..,
        payload in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut buf = frame(udp, src, dst, sport, dport, hop, &payload);
        apply(&mut buf, |ip, ports, check| {
            let protocol = ip.next_header;
            rewrite_destination(ip, protocol, ports, check, addr_of(new), nport.to_be());
            assert!(decrement_hop_limit(ip));
        });
        prop_assert_eq!(parsed(&buf)?, (src, new, sport, nport, hop - 1));
    }

    #[test]
    fn nat66_reply_keeps_checksums_valid(
        udp in any::<bool>(), src in any::<[u8; 16]>(), dst in any::<[u8; 16]>(), new in any::<[u8; 16]>(),
        sport in any::<u16>(), dport in any::<u16>(), nport in any::<u16>(),
    ) {
        let mut buf = frame(udp, src, dst, sport, dport, 64, b"reply");
        apply(&mut buf, |ip, ports, check| {
            let protocol = ip.next_header;
            rewrite_source(ip, protocol, ports, check, addr_of(new), nport.to_be());
        });
        prop_assert_eq!(parsed(&buf)?, (new, dst, nport, dport, 64));
    }

    #[test]
    fn replace128_matches_eight_replace16(check in any::<u16>(), old in any::<[u32; 4]>(), new in any::<[u32; 4]>()) {
        let mut c = check;
        for i in 0..4 {
            c = replace16(c, old[i] as u16, new[i] as u16);
            c = replace16(c, (old[i] >> 16) as u16, (new[i] >> 16) as u16);
        }
        let one = replace128(check, old, new);
        prop_assert!(one == c || (one, c) == (0, 0xffff) || (one, c) == (0xffff, 0), "{one:#x} vs {c:#x}");
    }

    #[test]
    fn pseudo_checksum_is_etherparses(payload in proptest::collection::vec(any::<u8>(), 0..64), sport in any::<u16>()) {
        let buf = frame(true, CLIENT, VIP, sport, 53, 64, &payload);
        let udp = &buf[EthHdr::LEN + Ipv6Hdr::LEN..];
        let mut zeroed = udp.to_vec();
        zeroed[UDP_CHECK_OFF] = 0;
        zeroed[UDP_CHECK_OFF + 1] = 0;
        let ours = pseudo_checksum(&addr_of(CLIENT), &addr_of(VIP), IPPROTO_UDP, &zeroed);
        prop_assert_eq!(ours.to_ne_bytes(), [udp[UDP_CHECK_OFF], udp[UDP_CHECK_OFF + 1]]);
    }
}

#[test]
fn hop_limit_one_is_not_forwarded() {
    let mut buf = frame(false, CLIENT, VIP, 40000, 80, 1, b"");
    let before = buf.clone();
    apply(&mut buf, |ip, _, _| assert!(!decrement_hop_limit(ip)));
    assert_eq!(buf, before);
}

#[test]
fn udp_without_checksum_stays_without() {
    let mut buf = frame(true, CLIENT, VIP, 5000, 53, 64, b"q");
    let coff = EthHdr::LEN + Ipv6Hdr::LEN + UDP_CHECK_OFF;
    buf[coff..coff + 2].copy_from_slice(&[0, 0]);
    apply(&mut buf, |ip, ports, check| {
        rewrite_destination(
            ip,
            IPPROTO_UDP,
            ports,
            check,
            addr_of(BACKEND),
            53u16.to_be(),
        )
    });
    assert_eq!(&buf[coff..coff + 2], &[0, 0]);
}

/// An ICMPv6 destination unreachable from `from` to `to` quoting `quoted`
/// (an IPv6/TCP packet's bytes), checksum valid; its offsets.
fn icmp_error(from: [u8; 16], to: [u8; 16], quoted: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv6(from, to, 64)
        .icmpv6(Icmpv6Type::DestinationUnreachable(
            DestUnreachableCode::Address,
        ))
        .write(&mut out, quoted)
        .expect("icmpv6");
    out
}

const OUTER: usize = EthHdr::LEN;
const ICMP: usize = OUTER + Ipv6Hdr::LEN;
const QUOTED: usize = ICMP + 8;
const QUOTED_L4: usize = QUOTED + Ipv6Hdr::LEN;

/// Applies an ICMPv6 translation to the frame's views.
fn translate(buf: &mut [u8], f: impl FnOnce(&mut Ipv6Hdr, &mut u16, &mut Ipv6Hdr, &mut L4Ports)) {
    let mut ip: Ipv6Hdr = unsafe { core::ptr::read_unaligned(buf[OUTER..].as_ptr().cast()) };
    let mut quoted: Ipv6Hdr = unsafe { core::ptr::read_unaligned(buf[QUOTED..].as_ptr().cast()) };
    let mut ports: L4Ports = unsafe { core::ptr::read_unaligned(buf[QUOTED_L4..].as_ptr().cast()) };
    let mut check = u16::from_ne_bytes([buf[ICMP + 2], buf[ICMP + 3]]);
    f(&mut ip, &mut check, &mut quoted, &mut ports);
    unsafe {
        core::ptr::write_unaligned(buf[OUTER..].as_mut_ptr().cast(), ip);
        core::ptr::write_unaligned(buf[QUOTED..].as_mut_ptr().cast(), quoted);
        core::ptr::write_unaligned(buf[QUOTED_L4..].as_mut_ptr().cast(), ports);
    }
    buf[ICMP + 2..ICMP + 4].copy_from_slice(&check.to_ne_bytes());
}

fn icmp_valid(buf: &[u8]) -> bool {
    let ip = Ipv6Slice::from_slice(&buf[OUTER..]).expect("ipv6");
    let h = ip.header();
    Icmpv6Slice::from_slice(&buf[ICMP..])
        .expect("icmpv6")
        .is_checksum_valid(h.source_addr().octets(), h.destination_addr().octets())
}

#[test]
fn a_clients_error_about_a_reply_goes_to_the_backend() {
    // The reply VIP:80 → client:40000 got an error from the client.
    let quoted = &frame(false, VIP, CLIENT, 80, 40000, 63, b"")[EthHdr::LEN..];
    let mut buf = icmp_error(CLIENT, VIP, quoted);
    assert!(icmp_valid(&buf));
    translate(&mut buf, |ip, check, q, ports| {
        error_to_backend(ip, check, q, ports, addr_of(BACKEND), 8080u16.to_be())
    });
    assert!(icmp_valid(&buf), "ICMPv6 checksum after translation");
    let ip = Ipv6Slice::from_slice(&buf[OUTER..]).unwrap();
    assert_eq!(ip.header().destination(), BACKEND);
    assert_eq!(ip.header().source(), CLIENT);
    let q = Ipv6Slice::from_slice_lax(&buf[QUOTED..]).unwrap();
    assert_eq!(
        (q.header().source(), q.header().destination()),
        (BACKEND, CLIENT)
    );
    assert_eq!(&buf[QUOTED_L4..QUOTED_L4 + 4], &[0x1f, 0x90, 0x9c, 0x40]);
    assert_eq!(q.payload().ip_number, IpNumber::TCP);
}

#[test]
fn a_backends_error_goes_to_the_client_as_the_vips() {
    // The forward client:40000 → backend:8080 (rewritten) met an error.
    let quoted = &frame(false, CLIENT, BACKEND, 40000, 8080, 63, b"")[EthHdr::LEN..];
    // From the backend itself: its source becomes the VIP.
    let mut buf = icmp_error(BACKEND, CLIENT, quoted);
    translate(&mut buf, |ip, check, q, ports| {
        error_to_client(ip, check, q, ports, addr_of(VIP), 80u16.to_be())
    });
    assert!(icmp_valid(&buf));
    let ip = Ipv6Slice::from_slice(&buf[OUTER..]).unwrap();
    assert_eq!(
        (ip.header().source(), ip.header().destination()),
        (VIP, CLIENT)
    );
    let q = Ipv6Slice::from_slice_lax(&buf[QUOTED..]).unwrap();
    assert_eq!(
        (q.header().source(), q.header().destination()),
        (CLIENT, VIP)
    );
    assert_eq!(&buf[QUOTED_L4..QUOTED_L4 + 4], &[0x9c, 0x40, 0, 80]);

    // From a router on the way: it keeps its own source.
    let router = [0x20, 0x01, 0x0d, 0xb8, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    let mut buf = icmp_error(router, CLIENT, quoted);
    translate(&mut buf, |ip, check, q, ports| {
        error_to_client(ip, check, q, ports, addr_of(VIP), 80u16.to_be())
    });
    assert!(icmp_valid(&buf));
    let ip = Ipv6Slice::from_slice(&buf[OUTER..]).unwrap();
    assert_eq!(ip.header().source(), router);
}

#[test]
fn errors_that_quote_a_flow() {
    for kind in [1, 2, 3, 4] {
        assert!(quotes_a_flow(kind), "{kind}");
    }
    // Echo request/reply, router/neighbour solicitation/advertisement.
    for kind in [128, 129, 133, 134, 135, 136] {
        assert!(!quotes_a_flow(kind), "{kind}");
    }
}

#[test]
fn step_reads_each_header_kind() {
    let head = |b: &[u8]| -> [u8; 8] { b[..8].try_into().unwrap() };
    assert_eq!(
        step(
            NEXTHDR_HOP,
            &head(&extension(NEXTHDR_HOP, IPPROTO_UDP, 2, 0))
        ),
        Step::Skip {
            len: 24,
            next: IPPROTO_UDP
        }
    );
    assert_eq!(
        step(
            NEXTHDR_ROUTING,
            &head(&extension(NEXTHDR_ROUTING, IPPROTO_UDP, 2, 0))
        ),
        Step::Skip {
            len: 24,
            next: IPPROTO_UDP
        }
    );
    assert_eq!(
        step(
            NEXTHDR_ROUTING,
            &head(&extension(NEXTHDR_ROUTING, IPPROTO_UDP, 2, 3))
        ),
        Step::Routing
    );
    assert_eq!(
        step(
            NEXTHDR_FRAGMENT,
            &head(&fragment(IPPROTO_UDP, 0x1fff, true, 7))
        ),
        Step::Fragment {
            next: IPPROTO_UDP,
            fragment: Fragment6 {
                id: 7u32.to_be(),
                offset: 0x1fff,
                more: true
            }
        }
    );
    assert_eq!(step(IPPROTO_TCP, &[0; 8]), Step::Upper);
}

/// The "packet too big" the data plane composes (`icmp6::too_big`): its
/// headers from `too_big_ip6`/`too_big_icmp6`, the first
/// `TOO_BIG_QUOTE6` bytes of the packet as the quote, the checksum the
/// kernel's way (the pseudo-header's sum as the seed of a sum over the
/// message, then finished): etherparse reads a valid "packet too big"
/// with the MTU, from the VIP back to the client.
#[test]
fn the_packet_too_big_the_lb_composes_is_valid() {
    let big = frame(false, CLIENT, VIP, 40000, 80, 64, &[7u8; 1400]);
    let quote = &big[EthHdr::LEN..EthHdr::LEN + TOO_BIG_QUOTE6];
    let q: Ipv6Hdr = unsafe { core::ptr::read_unaligned(quote.as_ptr().cast()) };
    let ip = too_big_ip6(q.saddr, q.daddr);
    let mut msg = vec![0u8; Icmp6Hdr::LEN];
    unsafe { core::ptr::write_unaligned(msg.as_mut_ptr().cast(), too_big_icmp6(1280)) };
    msg.extend_from_slice(quote);
    assert_eq!(msg.len(), TOO_BIG_MSG6);
    let seed = crate::checksum::fold(pseudo_sum(
        &{ ip.saddr },
        &{ ip.daddr },
        TOO_BIG_MSG6 as u32,
        IPPROTO_ICMPV6,
    )) as u32;
    let sum = msg
        .chunks(4)
        .map(|w| u32::from_ne_bytes([w[0], w[1], w[2], w[3]]) as u64)
        .sum::<u64>()
        + seed as u64;
    // The helper's 32-bit accumulator, end-around carried.
    let sum = ((sum & 0xffff_ffff) + (sum >> 32)) as u32;
    let check = !crate::checksum::fold(sum);
    msg[2..4].copy_from_slice(&check.to_ne_bytes());
    let mut packet = vec![0u8; Ipv6Hdr::LEN];
    unsafe { core::ptr::write_unaligned(packet.as_mut_ptr().cast(), ip) };
    packet.extend_from_slice(&msg);

    let parsed = Ipv6Slice::from_slice(&packet).expect("ipv6");
    let h = parsed.header();
    assert_eq!((h.source(), h.destination()), (VIP, CLIENT));
    assert_eq!(
        (h.hop_limit(), h.payload_length() as usize),
        (64, TOO_BIG_MSG6)
    );
    assert_eq!(parsed.payload().ip_number, IpNumber::IPV6_ICMP);
    let icmp = Icmpv6Slice::from_slice(&packet[Ipv6Hdr::LEN..]).expect("icmpv6");
    assert!(icmp.is_checksum_valid(VIP, CLIENT), "ICMPv6 checksum");
    assert_eq!(
        icmp.icmp_type(),
        Icmpv6Type::PacketTooBig { mtu: 1280 },
        "type 2 with the MTU"
    );
    assert_eq!(icmp.payload(), quote, "the packet's first bytes, quoted");
}

/// The pseudo-header's sum, folded and finished over an empty message, is
/// etherparse's checksum of a message of that length with zero words.
#[test]
fn pseudo_sum_is_the_pseudo_headers() {
    let data = [0u8; 16];
    let want = pseudo_checksum(&addr_of(CLIENT), &addr_of(VIP), IPPROTO_ICMPV6, &data);
    let got = !crate::checksum::fold(pseudo_sum(
        &addr_of(CLIENT),
        &addr_of(VIP),
        16,
        IPPROTO_ICMPV6,
    ));
    assert_eq!(got, want);
}

proptest! {
    /// `copy_addr` (the flow key's copy of the packet's addresses, a
    /// half-word pair per word) gives the address's bytes in memory order,
    /// from a header 14 bytes into a frame as XDP sees it (2-byte aligned
    /// only), whatever the bytes.
    #[test]
    fn the_flow_key_holds_the_headers_addresses_byte_for_byte(
        source in any::<[u8; 16]>(),
        destination in any::<[u8; 16]>(),
        ports in any::<[u16; 2]>(),
    ) {
        // u16 storage: the frame's start is at least 2-byte aligned.
        let mut frame = [0u16; (EthHdr::LEN + Ipv6Hdr::LEN) / 2];
        // SAFETY: 54 bytes of plain storage viewed as bytes.
        let bytes = unsafe {
            core::slice::from_raw_parts_mut(frame.as_mut_ptr().cast::<u8>(), EthHdr::LEN + Ipv6Hdr::LEN)
        };
        let mut fixed = header(6, 20);
        fixed[8..24].copy_from_slice(&source);
        fixed[24..40].copy_from_slice(&destination);
        bytes[EthHdr::LEN..].copy_from_slice(&fixed);
        // SAFETY: a whole header, 2-byte aligned (offset 14 of u16 storage).
        let ip = unsafe { &*bytes.as_ptr().add(EthHdr::LEN).cast::<Ipv6Hdr>() };
        let l4 = L4Ports { source: ports[0], dest: ports[1] };
        let key = crate::maps6::FlowKey6::of(ip, 6, &l4);
        let as_bytes = |a: Addr6| a.iter().flat_map(|w| w.to_ne_bytes()).collect::<Vec<u8>>();
        prop_assert_eq!(as_bytes(key.saddr), source.to_vec());
        prop_assert_eq!(as_bytes(key.daddr), destination.to_vec());
        prop_assert_eq!((key.sport, key.dport, key.protocol), (ports[0], ports[1], 6));
        prop_assert_eq!(key.saddr, { ip.saddr });
        prop_assert_eq!(key.daddr, { ip.daddr });
    }
}

#[test]
fn link_scoped_addresses_are_link_local_unicast_and_link_or_interface_multicast() {
    for scoped in [
        "fe80::1",
        "febf:ffff::1",
        "ff02::1",
        "ff02::16",
        "ff02::1:ff00:1",
        "ff01::1",
        "ff12::1",
    ] {
        let addr: std::net::Ipv6Addr = scoped.parse().unwrap();
        assert!(is_link_scoped(&addr_of(addr.octets())), "{scoped}");
    }
    for routed in [
        "2001:db8:18::10",
        "fec0::1",
        "fe7f::1",
        "ff05::2",
        "ff0e::1",
        "::1",
        "::",
        "fd00::1",
    ] {
        let addr: std::net::Ipv6Addr = routed.parse().unwrap();
        assert!(!is_link_scoped(&addr_of(addr.octets())), "{routed}");
    }
}
