//! ICMP errors that belong to a flow, and the "fragmentation needed" the
//! data plane answers with: wire layout, the rewrites that hand a quoted
//! flow's error to the other end of a NAT, and the checksum arithmetic.
//!
//! An ICMP error quotes the IP header and the first 8 (or more) bytes of the
//! packet that caused it, so the quoted ports name the flow. Translating it
//! through a NAT rewrites the outer header *and* the quoted one, as the
//! packet it quotes was rewritten on its way (RFC 5508 §4.2). The quoted
//! TCP/UDP checksum is left as it is (as Linux and Katran leave it): it
//! covers the whole original datagram, of which the error carries only a
//! part, and no receiver checks it.

use crate::{
    checksum::{fold, replace16, replace32},
    headers::{Ipv4Hdr, L4Ports},
};

pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_TIME_EXCEEDED: u8 = 11;
/// Destination unreachable, code "fragmentation needed and DF set".
pub const ICMP_FRAG_NEEDED: u8 = 4;

/// ICMP header of an error message: type, code, checksum, then four bytes
/// that are unused except for "fragmentation needed" (next-hop MTU in the
/// last two, RFC 1191).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IcmpHdr {
    pub kind: u8,
    pub code: u8,
    /// Raw network order, as in the packet.
    pub check: u16,
    pub unused: u16,
    /// Next-hop MTU of "fragmentation needed", raw network order.
    pub mtu: u16,
}

impl IcmpHdr {
    pub const LEN: usize = 8;
}

/// The ICMP messages that quote a packet of a flow and so are delivered to
/// that flow's end: destination unreachable (port unreachable, frag needed,
/// …) and time exceeded. Echo and the rest are the LB's own (the kernel
/// answers them).
#[inline(always)]
pub const fn quotes_a_flow(kind: u8) -> bool {
    matches!(kind, ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED)
}

/// Bytes of the original packet a "fragmentation needed" from the data
/// plane quotes: its IP header and 64 bytes after it (RFC 792 asks for 8;
/// 64 is what Katran quotes, and keeps the checksum loop fixed-size).
pub const TOO_BIG_QUOTE: usize = Ipv4Hdr::LEN + 64;
/// IP total length of that "fragmentation needed" message.
pub const TOO_BIG_LEN: usize = Ipv4Hdr::LEN + IcmpHdr::LEN + TOO_BIG_QUOTE;
/// TTL of the messages the data plane originates (Linux's default).
pub const ICMP_TTL: u8 = 64;

/// A client's error about a NAT flow goes to the backend: the quoted packet
/// was VIP:port → client, the backend sent it from `addr`:`port` (network
/// order). Rewrites the quoted source, its IP checksum, and folds every
/// change into the ICMP checksum. The outer header is the caller's.
#[inline(always)]
pub fn rewrite_quoted_source(
    icmp_check: &mut u16,
    inner: &mut Ipv4Hdr,
    ports: &mut L4Ports,
    addr: u32,
    port: u16,
) {
    let (old_addr, old_port) = (inner.saddr, ports.source);
    inner.saddr = addr;
    ports.source = port;
    quoted_change(
        icmp_check,
        &mut inner.check,
        (old_addr, addr),
        (old_port, port),
    );
}

/// A backend's error about a NAT reply goes to the client: the quoted
/// packet was client → backend (`addr`:`port` as the client knows it is the
/// VIP's). Rewrites the quoted destination, as [`rewrite_quoted_source`].
#[inline(always)]
pub fn rewrite_quoted_destination(
    icmp_check: &mut u16,
    inner: &mut Ipv4Hdr,
    ports: &mut L4Ports,
    addr: u32,
    port: u16,
) {
    let (old_addr, old_port) = (inner.daddr, ports.dest);
    inner.daddr = addr;
    ports.dest = port;
    quoted_change(
        icmp_check,
        &mut inner.check,
        (old_addr, addr),
        (old_port, port),
    );
}

/// One quoted address and port changed (old, new): the quoted header's
/// checksum covers the address; the ICMP checksum covers all three.
#[inline(always)]
fn quoted_change(icmp_check: &mut u16, ip_check: &mut u16, addr: (u32, u32), port: (u16, u16)) {
    let old_ip_check = *ip_check;
    *ip_check = replace32(*ip_check, addr.0, addr.1);
    let c = replace32(*icmp_check, addr.0, addr.1);
    let c = replace16(c, old_ip_check, *ip_check);
    *icmp_check = replace16(c, port.0, port.1);
}

/// Outer destination of a translated error (the VIP becomes the backend).
#[inline(always)]
pub fn set_destination(ip: &mut Ipv4Hdr, addr: u32) {
    ip.check = replace32(ip.check, ip.daddr, addr);
    ip.daddr = addr;
}

/// Outer source of a translated error (the backend becomes the VIP).
#[inline(always)]
pub fn set_source(ip: &mut Ipv4Hdr, addr: u32) {
    ip.check = replace32(ip.check, ip.saddr, addr);
    ip.saddr = addr;
}

/// The outer IPv4 header of a "fragmentation needed" about `quoted`: from
/// the address the packet was sent to, back to its sender, checksum set.
/// A 20-byte header summed word by word: no loop, no memset.
#[inline(always)]
pub fn too_big_ip(quoted_saddr: u32, quoted_daddr: u32) -> Ipv4Hdr {
    let mut ip = Ipv4Hdr {
        version_ihl: 0x45,
        tos: 0,
        tot_len: (TOO_BIG_LEN as u16).to_be(),
        id: 0,
        frag_off: 0,
        ttl: ICMP_TTL,
        protocol: crate::headers::IPPROTO_ICMP,
        check: 0,
        saddr: quoted_daddr,
        daddr: quoted_saddr,
    };
    ip.check = ipv4_check(&ip);
    ip
}

/// Full IPv4 header checksum of an option-less header (raw word).
#[inline(always)]
pub fn ipv4_check(ip: &Ipv4Hdr) -> u16 {
    let w = |a: u8, b: u8| u16::from_ne_bytes([a, b]) as u32;
    let half = |x: u32| (x & 0xffff) + (x >> 16);
    let tot_len = ip.tot_len as u32;
    let (id, frag_off, check) = (ip.id as u32, ip.frag_off as u32, ip.check as u32);
    let sum = w(ip.version_ihl, ip.tos)
        + tot_len
        + id
        + frag_off
        + w(ip.ttl, ip.protocol)
        + check
        + half(ip.saddr)
        + half(ip.daddr);
    !fold(sum)
}

/// The ICMP header of a "fragmentation needed" with next-hop `mtu` (host
/// order), checksum still zero: the caller sums it with the quote.
#[inline(always)]
pub const fn too_big_icmp(mtu: u16) -> IcmpHdr {
    IcmpHdr {
        kind: ICMP_DEST_UNREACH,
        code: ICMP_FRAG_NEEDED,
        check: 0,
        unused: 0,
        mtu: mtu.to_be(),
    }
}

/// Finishes a one's-complement sum of the ICMP message (as returned by the
/// kernel's `bpf_csum_diff`, a 32-bit accumulator) into its checksum field.
#[inline(always)]
pub const fn finish(sum: u32) -> u16 {
    !fold(sum)
}

const _: () = assert!(core::mem::size_of::<IcmpHdr>() == IcmpHdr::LEN);
// The kernel's csum helper sums whole 32-bit words.
const _: () = assert!((IcmpHdr::LEN + TOO_BIG_QUOTE).is_multiple_of(4));

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{checksum::compute, headers::EthHdr};
    use etherparse::{
        IcmpEchoHeader, Icmpv4Slice, Icmpv4Type, Ipv4HeaderSlice, PacketBuilder,
        icmpv4::DestUnreachableHeader,
    };
    use proptest::prelude::*;

    /// IPv4 + TCP/UDP packet (no Ethernet) as a host would quote it.
    fn quoted(udp: bool, src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
        let b = PacketBuilder::ipv4(src, dst, 63);
        let mut out = Vec::new();
        if udp {
            b.udp(sport, dport)
                .write(&mut out, b"dns answer")
                .expect("udp");
        } else {
            b.tcp(sport, dport, 7, 1000)
                .ack(9)
                .write(&mut out, b"data")
                .expect("tcp");
        }
        out
    }

    /// Ethernet/IPv4/ICMP error frame quoting `inner`.
    fn error(src: [u8; 4], dst: [u8; 4], kind: Icmpv4Type, inner: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv4(src, dst, 64)
            .icmpv4(kind)
            .write(&mut out, inner)
            .expect("icmp");
        out
    }

    const ICMP: usize = EthHdr::LEN + Ipv4Hdr::LEN;
    const INNER: usize = ICMP + IcmpHdr::LEN;
    const PORTS: usize = INNER + Ipv4Hdr::LEN;

    fn read<T: Copy>(buf: &[u8], at: usize) -> T {
        unsafe { core::ptr::read_unaligned(buf[at..].as_ptr().cast()) }
    }

    fn write<T: Copy>(buf: &mut [u8], at: usize, v: T) {
        unsafe { core::ptr::write_unaligned(buf[at..].as_mut_ptr().cast(), v) }
    }

    /// Runs `f` on the outer header, ICMP checksum, quoted header and
    /// quoted ports of `buf` as the data plane does on a frame.
    fn apply(buf: &mut [u8], f: impl FnOnce(&mut Ipv4Hdr, &mut u16, &mut Ipv4Hdr, &mut L4Ports)) {
        let mut outer: Ipv4Hdr = read(buf, EthHdr::LEN);
        let mut icmp: IcmpHdr = read(buf, ICMP);
        let mut inner: Ipv4Hdr = read(buf, INNER);
        let mut ports: L4Ports = read(buf, PORTS);
        f(&mut outer, &mut icmp.check, &mut inner, &mut ports);
        write(buf, EthHdr::LEN, outer);
        write(buf, ICMP, icmp);
        write(buf, INNER, inner);
        write(buf, PORTS, ports);
    }

    /// Every checksum an ICMP error receiver checks, from scratch.
    fn assert_valid(buf: &[u8]) -> Result<(), TestCaseError> {
        let outer = Ipv4HeaderSlice::from_slice(&buf[EthHdr::LEN..]).expect("outer");
        let h = outer.to_header();
        prop_assert_eq!(h.header_checksum, h.calc_header_checksum());
        let icmp = Icmpv4Slice::from_slice(&buf[ICMP..]).expect("icmp");
        prop_assert_eq!(compute(icmp.slice(), 0), 0, "icmp checksum");
        let inner = Ipv4HeaderSlice::from_slice(&buf[INNER..]).expect("inner");
        let h = inner.to_header();
        prop_assert_eq!(h.header_checksum, h.calc_header_checksum());
        Ok(())
    }

    fn addr(a: [u8; 4]) -> u32 {
        u32::from_ne_bytes(a)
    }

    proptest! {
        #[test]
        fn an_error_to_the_backend_keeps_every_checksum_valid(
            udp in any::<bool>(), vip in any::<[u8; 4]>(), client in any::<[u8; 4]>(),
            backend in any::<[u8; 4]>(), vport in any::<u16>(), bport in any::<u16>(),
            cport in any::<u16>(), mtu in any::<u16>(),
        ) {
            let inner = quoted(udp, vip, client, vport, cport);
            let kind = Icmpv4Type::DestinationUnreachable(
                DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: mtu });
            let mut buf = error(client, vip, kind, &inner);
            apply(&mut buf, |outer, check, inner, ports| {
                set_destination(outer, addr(backend));
                rewrite_quoted_source(check, inner, ports, addr(backend), bport.to_be());
            });
            assert_valid(&buf)?;
            let want_inner = quoted(udp, backend, client, bport, cport);
            // Everything but the quoted L4 checksum is what the backend sent.
            let l4_check = INNER + 20 + if udp { 6 } else { 16 };
            let mut got = buf[INNER..].to_vec();
            got[l4_check - INNER..l4_check - INNER + 2]
                .copy_from_slice(&want_inner[l4_check - INNER..l4_check - INNER + 2]);
            prop_assert_eq!(got, want_inner);
            prop_assert_eq!(&buf[EthHdr::LEN + 16..EthHdr::LEN + 20], &backend[..]);
        }

        #[test]
        fn an_error_to_the_client_keeps_every_checksum_valid(
            udp in any::<bool>(), vip in any::<[u8; 4]>(), client in any::<[u8; 4]>(),
            backend in any::<[u8; 4]>(), vport in any::<u16>(), bport in any::<u16>(),
            cport in any::<u16>(),
        ) {
            let inner = quoted(udp, client, backend, cport, bport);
            let kind = Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port);
            let mut buf = error(backend, client, kind, &inner);
            apply(&mut buf, |outer, check, inner, ports| {
                set_source(outer, addr(vip));
                rewrite_quoted_destination(check, inner, ports, addr(vip), vport.to_be());
            });
            assert_valid(&buf)?;
            let quoted_hdr = Ipv4HeaderSlice::from_slice(&buf[INNER..]).expect("inner");
            prop_assert_eq!(quoted_hdr.destination(), vip);
            let p: L4Ports = read(&buf, PORTS);
            prop_assert_eq!((u16::from_be(p.source), u16::from_be(p.dest)), (cport, vport));
            prop_assert_eq!(&buf[EthHdr::LEN + 12..EthHdr::LEN + 16], &vip[..]);
        }

        #[test]
        fn the_too_big_header_checksum_is_right(src in any::<[u8; 4]>(), dst in any::<[u8; 4]>()) {
            let ip = too_big_ip(addr(src), addr(dst));
            let mut bytes = [0u8; 20];
            write(&mut bytes, 0, ip);
            let h = Ipv4HeaderSlice::from_slice(&bytes).expect("ip").to_header();
            prop_assert_eq!(h.header_checksum, h.calc_header_checksum());
            prop_assert_eq!((h.source, h.destination), (dst, src));
            prop_assert_eq!(h.total_len as usize, TOO_BIG_LEN);
        }
    }

    #[test]
    fn only_errors_quote_a_flow() {
        assert!(quotes_a_flow(ICMP_DEST_UNREACH));
        assert!(quotes_a_flow(ICMP_TIME_EXCEEDED));
        let mut echo = Vec::new();
        PacketBuilder::ipv4([1, 1, 1, 1], [2, 2, 2, 2], 9)
            .icmpv4(Icmpv4Type::EchoRequest(IcmpEchoHeader { id: 1, seq: 1 }))
            .write(&mut echo, b"")
            .expect("echo");
        assert!(!quotes_a_flow(echo[20]));
        assert!(!quotes_a_flow(0), "echo reply");
    }

    #[test]
    fn a_too_big_message_sums_to_zero_when_finished() {
        // What the data plane does: header with zero checksum + quote,
        // summed, finished into the checksum field.
        let quote: Vec<u8> = (0..TOO_BIG_QUOTE as u32).map(|i| i as u8).collect();
        let mut msg = vec![0u8; IcmpHdr::LEN];
        write(&mut msg, 0, too_big_icmp(1400));
        msg.extend_from_slice(&quote);
        let sum: u32 = msg
            .chunks(2)
            .map(|c| u16::from_ne_bytes([c[0], c[1]]) as u32)
            .sum();
        let check = finish(sum);
        msg[2..4].copy_from_slice(&check.to_ne_bytes());
        assert_eq!(compute(&msg, 0), 0);
        assert_eq!(
            &msg[..8],
            &[
                3,
                4,
                check.to_ne_bytes()[0],
                check.to_ne_bytes()[1],
                0,
                0,
                0x05,
                0x78
            ]
        );
    }
}
