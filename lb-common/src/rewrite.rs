//! Header rewrites of the two forwarding modes' IP path, with incremental
//! checksum updates. The XDP program calls these on pointers into the frame;
//! tests call them on byte buffers and check against a full recompute.

use crate::{
    checksum::{replace16, replace32},
    headers::{IPPROTO_UDP, Ipv4Hdr, L4Ports},
};

/// New L4 checksum after one address and one port changed. The address is
/// part of the TCP/UDP pseudo-header, so it is folded in too. A UDP checksum
/// of 0 means "none" and stays 0; a computed 0 is sent as 0xffff (RFC 768).
/// (The generator's IPv6 frames use it too: `PktgenConf::l4_check_of`.)
#[inline(always)]
pub fn l4_check(
    check: u16,
    protocol: u8,
    old_addr: u32,
    new_addr: u32,
    old_port: u16,
    new_port: u16,
) -> u16 {
    if protocol == IPPROTO_UDP && check == 0 {
        return 0;
    }
    let c = replace16(replace32(check, old_addr, new_addr), old_port, new_port);
    if protocol == IPPROTO_UDP && c == 0 {
        0xffff
    } else {
        c
    }
}

/// DNAT: client→VIP becomes client→backend (`addr`, `port` raw network order).
#[inline(always)]
pub fn rewrite_destination(
    ip: &mut Ipv4Hdr,
    ports: &mut L4Ports,
    check: &mut u16,
    addr: u32,
    port: u16,
) {
    let old = ip.daddr;
    ip.check = replace32(ip.check, old, addr);
    ip.daddr = addr;
    *check = l4_check(*check, ip.protocol, old, addr, ports.dest, port);
    ports.dest = port;
}

/// Reverse NAT: backend→client becomes VIP→client.
#[inline(always)]
pub fn rewrite_source(
    ip: &mut Ipv4Hdr,
    ports: &mut L4Ports,
    check: &mut u16,
    addr: u32,
    port: u16,
) {
    let old = ip.saddr;
    ip.check = replace32(ip.check, old, addr);
    ip.saddr = addr;
    *check = l4_check(*check, ip.protocol, old, addr, ports.source, port);
    ports.source = port;
}

/// Decrements TTL as a router does. Returns false (and changes nothing) when
/// the packet must not be forwarded (TTL ≤ 1): the kernel then sends the ICMP
/// time-exceeded a router owes the sender.
#[inline(always)]
pub fn decrement_ttl(ip: &mut Ipv4Hdr) -> bool {
    if ip.ttl <= 1 {
        return false;
    }
    // TTL shares a 16-bit checksum word with the protocol byte.
    let old = u16::from_ne_bytes([ip.ttl, ip.protocol]);
    ip.ttl -= 1;
    let new = u16::from_ne_bytes([ip.ttl, ip.protocol]);
    ip.check = replace16(ip.check, old, new);
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::headers::{EthHdr, IPPROTO_TCP, TCP_CHECK_OFF, UDP_CHECK_OFF};
    use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};
    use proptest::prelude::*;

    /// Builds an Ethernet/IPv4/TCP-or-UDP frame with valid checksums.
    fn frame(
        udp: bool,
        src: [u8; 4],
        dst: [u8; 4],
        sport: u16,
        dport: u16,
        ttl: u8,
        payload: &[u8],
    ) -> Vec<u8> {
        let b =
            PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]).ipv4(src, dst, ttl);
        let mut out = Vec::new();
        if udp {
            let b = b.udp(sport, dport);
            b.write(&mut out, payload).expect("build udp");
        } else {
            let b = b.tcp(sport, dport, 1234, 4096).syn();
            b.write(&mut out, payload).expect("build tcp");
        }
        out
    }

    /// Applies `f` to the header views of a frame exactly as the XDP program does.
    fn apply(buf: &mut [u8], f: impl FnOnce(&mut Ipv4Hdr, &mut L4Ports, &mut u16)) {
        let ip_off = EthHdr::LEN;
        let mut ip: Ipv4Hdr = unsafe { core::ptr::read_unaligned(buf[ip_off..].as_ptr().cast()) };
        let l4 = ip_off + ip.header_len();
        let mut ports: L4Ports = unsafe { core::ptr::read_unaligned(buf[l4..].as_ptr().cast()) };
        let coff = l4
            + if ip.protocol == IPPROTO_TCP {
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

    /// Recomputes every checksum independently (etherparse) and compares.
    fn assert_checksums_valid(buf: &[u8]) -> Result<(), TestCaseError> {
        let p =
            SlicedPacket::from_ethernet(buf).map_err(|e| TestCaseError::fail(format!("{e:?}")))?;
        let Some(etherparse::NetSlice::Ipv4(ip)) = p.net else {
            return Err(TestCaseError::fail("not ipv4"));
        };
        let hdr = ip.header().to_header();
        prop_assert_eq!(hdr.header_checksum, hdr.calc_header_checksum());
        match p.transport {
            Some(TransportSlice::Tcp(t)) => {
                let want = t
                    .to_header()
                    .calc_checksum_ipv4(&hdr, t.payload())
                    .expect("tcp csum");
                prop_assert_eq!(t.checksum(), want);
            }
            Some(TransportSlice::Udp(u)) => {
                if u.checksum() != 0 {
                    let want = u
                        .to_header()
                        .calc_checksum_ipv4(&hdr, u.payload())
                        .expect("udp csum");
                    prop_assert_eq!(u.checksum(), want);
                }
            }
            _ => return Err(TestCaseError::fail("no transport")),
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn destination_rewrite_keeps_checksums_valid(
            udp in any::<bool>(), src in any::<[u8; 4]>(), dst in any::<[u8; 4]>(), new in any::<[u8; 4]>(),
            sport in any::<u16>(), dport in any::<u16>(), nport in any::<u16>(),
            payload in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let mut buf = frame(udp, src, dst, sport, dport, 64, &payload);
            apply(&mut buf, |ip, ports, check| {
                rewrite_destination(ip, ports, check, u32::from_ne_bytes(new), nport.to_be())
            });
            assert_checksums_valid(&buf)?;
            let p = SlicedPacket::from_ethernet(&buf).expect("parse");
            let Some(etherparse::NetSlice::Ipv4(ip)) = p.net else { unreachable!() };
            prop_assert_eq!(ip.header().destination(), new);
            prop_assert_eq!(ip.header().source(), src);
            let (s, d) = match p.transport { Some(TransportSlice::Tcp(t)) => (t.source_port(), t.destination_port()), Some(TransportSlice::Udp(u)) => (u.source_port(), u.destination_port()), _ => unreachable!() };
            prop_assert_eq!((s, d), (sport, nport));
        }

        #[test]
        fn source_rewrite_keeps_checksums_valid(
            udp in any::<bool>(), src in any::<[u8; 4]>(), dst in any::<[u8; 4]>(), new in any::<[u8; 4]>(),
            sport in any::<u16>(), dport in any::<u16>(), nport in any::<u16>(), ttl in 2u8..,
        ) {
            let mut buf = frame(udp, src, dst, sport, dport, ttl, b"reply");
            apply(&mut buf, |ip, ports, check| {
                rewrite_source(ip, ports, check, u32::from_ne_bytes(new), nport.to_be());
                assert!(decrement_ttl(ip));
            });
            assert_checksums_valid(&buf)?;
            let p = SlicedPacket::from_ethernet(&buf).expect("parse");
            let Some(etherparse::NetSlice::Ipv4(ip)) = p.net else { unreachable!() };
            prop_assert_eq!(ip.header().source(), new);
            prop_assert_eq!(ip.header().ttl(), ttl - 1);
        }
    }

    #[test]
    fn udp_without_checksum_stays_without() {
        let mut buf = frame(true, [198, 18, 0, 2], [198, 18, 0, 10], 5000, 53, 64, b"q");
        let coff = EthHdr::LEN + 20 + UDP_CHECK_OFF;
        buf[coff] = 0;
        buf[coff + 1] = 0;
        apply(&mut buf, |ip, ports, check| {
            rewrite_destination(
                ip,
                ports,
                check,
                u32::from_ne_bytes([198, 19, 0, 11]),
                53u16.to_be(),
            )
        });
        assert_eq!(&buf[coff..coff + 2], &[0, 0]);
    }

    #[test]
    fn ttl_one_is_not_forwarded() {
        let mut buf = frame(false, [198, 18, 0, 2], [198, 18, 0, 10], 5000, 80, 1, b"");
        let before = buf.clone();
        apply(&mut buf, |ip, _, _| assert!(!decrement_ttl(ip)));
        assert_eq!(buf, before);
    }
}
