//! Address families as types: what the packet path needs to know of one
//! (its addresses, IP header, flow and service keys, and the rewrites of
//! its header), so the path is written once, generic over the family, and
//! each family is an instance with its own keys and its own hot maps.
//!
//! [`V4`] and [`V6`] are the instances. IPv6 is a second one (16-byte
//! addresses in its own keys and maps, a 40-byte header without a checksum)
//! instead of an `if v6` in every function, and IPv4's keys stay as short
//! as they are: an IPv4 flow never hashes or compares 16-byte addresses.

use crate::{
    headers::{ETH_P_IPV4_RAW, Ipv4Hdr, L4Ports},
    icmp,
    ipv6::{self, Addr6, Ipv6Hdr},
    maps::{FlowKey, ServiceKey},
    maps6::{FlowKey6, ServiceKey6},
    rewrite,
};

/// An address family of the packet path.
pub trait Family {
    /// An address as the packet carries it (network order).
    type Addr: Copy + PartialEq;
    /// The fixed IP header (IPv4 without options).
    type IpHdr: IpHeader<Addr = Self::Addr>;
    /// A flow's key in the flow tables: its tuple as a packet arrives.
    type FlowKey: FlowTuple<Addr = Self::Addr>;
    /// A service's key: (VIP, port, protocol).
    type ServiceKey: Copy;

    /// The EtherType of the family's frames, raw network order.
    const ETHER_TYPE_RAW: u16;
    /// The family's `AF_*` number (`bpf_fib_lookup`'s `family`).
    const AF: u8;

    /// The key of a packet with these IP and TCP/UDP port headers, as it
    /// arrives.
    fn flow_key(ip: &Self::IpHdr, ports: &L4Ports) -> Self::FlowKey;
    /// [`Family::flow_key`] with the upper-layer `protocol` the parse
    /// found (IPv6: the extension-header walk's; IPv4: its header's, which
    /// this ignores and reads itself).
    fn flow_key_with(ip: &Self::IpHdr, protocol: u8, ports: &L4Ports) -> Self::FlowKey;
    /// The key of the service a flow's first packet is addressed to.
    fn service_key(key: &Self::FlowKey) -> Self::ServiceKey;
    /// NAT to a backend: the destination address and port become `addr`,
    /// `port`, every checksum updated. `protocol` is the packet's upper
    /// layer as the parse found it (IPv6: the extension-header walk's,
    /// which decides UDP's checksum rules; IPv4 reads its header's).
    fn rewrite_destination(
        ip: &mut Self::IpHdr,
        protocol: u8,
        ports: &mut L4Ports,
        check: &mut u16,
        addr: Self::Addr,
        port: u16,
    );
    /// Reverse NAT: the source address and port become `addr`, `port`
    /// (`protocol` as for [`Family::rewrite_destination`]).
    fn rewrite_source(
        ip: &mut Self::IpHdr,
        protocol: u8,
        ports: &mut L4Ports,
        check: &mut u16,
        addr: Self::Addr,
        port: u16,
    );
    /// Decrements the TTL (hop limit) as a router does; false, and nothing
    /// changed, when the packet must not be forwarded.
    fn decrement_ttl(ip: &mut Self::IpHdr) -> bool;
    /// A client's ICMP error about a NAT flow's packet, to the flow's
    /// backend (`addr`:`port`): the outer destination and the quoted
    /// source become the backend's, the checksums follow (the quoted L4
    /// checksum is left, see `icmp`).
    fn error_to_backend(
        ip: &mut Self::IpHdr,
        icmp_check: &mut u16,
        quoted: &mut Self::IpHdr,
        quoted_ports: &mut L4Ports,
        addr: Self::Addr,
        port: u16,
    );
    /// A backend's (or a router's behind it) ICMP error about a NAT reply,
    /// to the client: the quoted destination becomes the VIP's `vip`:`vport`,
    /// and the outer source too if the backend itself sent it.
    fn error_to_client(
        ip: &mut Self::IpHdr,
        icmp_check: &mut u16,
        quoted: &mut Self::IpHdr,
        quoted_ports: &mut L4Ports,
        vip: Self::Addr,
        vport: u16,
    );
}

/// What the path reads of a family's fixed IP header.
pub trait IpHeader {
    type Addr: Copy + PartialEq;
    /// Byte length of the fixed header.
    const LEN: usize;
    fn source(&self) -> Self::Addr;
    fn destination(&self) -> Self::Addr;
    /// TTL (IPv4) or hop limit (IPv6).
    fn ttl(&self) -> u8;
    /// The transport protocol (IPv4) or next header.
    fn protocol(&self) -> u8;
    /// Type of service (IPv4) or traffic class.
    fn tos(&self) -> u8;
    /// The IP packet's length in bytes, host order.
    fn packet_len(&self) -> u16;
    /// May a router fragment it? (IPv6: never, as if DF were set.)
    fn dont_fragment(&self) -> bool;
}

/// What the path reads of a family's flow key.
pub trait FlowTuple: Copy {
    type Addr: Copy + PartialEq;
    fn source(&self) -> Self::Addr;
    fn destination(&self) -> Self::Addr;
    /// Ports raw network order, as in the packet.
    fn source_port(&self) -> u16;
    fn destination_port(&self) -> u16;
    fn protocol(&self) -> u8;
}

/// IPv4: 4-byte addresses, `Ipv4Hdr`, the 16-byte [`FlowKey`], the 8-byte
/// [`ServiceKey`].
pub struct V4;

impl Family for V4 {
    type Addr = u32;
    type IpHdr = Ipv4Hdr;
    type FlowKey = FlowKey;
    type ServiceKey = ServiceKey;

    const ETHER_TYPE_RAW: u16 = ETH_P_IPV4_RAW;
    const AF: u8 = 2;

    #[inline(always)]
    fn flow_key(ip: &Ipv4Hdr, ports: &L4Ports) -> FlowKey {
        FlowKey::of(ip, ports)
    }

    #[inline(always)]
    fn flow_key_with(ip: &Ipv4Hdr, _protocol: u8, ports: &L4Ports) -> FlowKey {
        FlowKey::of(ip, ports)
    }

    #[inline(always)]
    fn service_key(key: &FlowKey) -> ServiceKey {
        ServiceKey {
            vip: key.daddr,
            port: key.dport,
            protocol: key.protocol,
            _pad: 0,
        }
    }

    #[inline(always)]
    fn rewrite_destination(
        ip: &mut Ipv4Hdr,
        _protocol: u8,
        ports: &mut L4Ports,
        check: &mut u16,
        addr: u32,
        port: u16,
    ) {
        rewrite::rewrite_destination(ip, ports, check, addr, port);
    }

    #[inline(always)]
    fn rewrite_source(
        ip: &mut Ipv4Hdr,
        _protocol: u8,
        ports: &mut L4Ports,
        check: &mut u16,
        addr: u32,
        port: u16,
    ) {
        rewrite::rewrite_source(ip, ports, check, addr, port);
    }

    #[inline(always)]
    fn decrement_ttl(ip: &mut Ipv4Hdr) -> bool {
        rewrite::decrement_ttl(ip)
    }

    #[inline(always)]
    fn error_to_backend(
        ip: &mut Ipv4Hdr,
        icmp_check: &mut u16,
        quoted: &mut Ipv4Hdr,
        quoted_ports: &mut L4Ports,
        addr: u32,
        port: u16,
    ) {
        icmp::set_destination(ip, addr);
        icmp::rewrite_quoted_source(icmp_check, quoted, quoted_ports, addr, port);
    }

    #[inline(always)]
    fn error_to_client(
        ip: &mut Ipv4Hdr,
        icmp_check: &mut u16,
        quoted: &mut Ipv4Hdr,
        quoted_ports: &mut L4Ports,
        vip: u32,
        vport: u16,
    ) {
        // From the backend itself: the client knows it as the VIP. A
        // router's error keeps its own source.
        if ip.saddr == quoted.daddr {
            icmp::set_source(ip, vip);
        }
        icmp::rewrite_quoted_destination(icmp_check, quoted, quoted_ports, vip, vport);
    }
}

impl IpHeader for Ipv4Hdr {
    type Addr = u32;
    const LEN: usize = Ipv4Hdr::LEN;

    #[inline(always)]
    fn source(&self) -> u32 {
        self.saddr
    }

    #[inline(always)]
    fn destination(&self) -> u32 {
        self.daddr
    }

    #[inline(always)]
    fn ttl(&self) -> u8 {
        self.ttl
    }

    #[inline(always)]
    fn protocol(&self) -> u8 {
        self.protocol
    }

    #[inline(always)]
    fn tos(&self) -> u8 {
        self.tos
    }

    #[inline(always)]
    fn packet_len(&self) -> u16 {
        u16::from_be(self.tot_len)
    }

    #[inline(always)]
    fn dont_fragment(&self) -> bool {
        Ipv4Hdr::dont_fragment(self)
    }
}

impl FlowTuple for FlowKey {
    type Addr = u32;

    #[inline(always)]
    fn source(&self) -> u32 {
        self.saddr
    }

    #[inline(always)]
    fn destination(&self) -> u32 {
        self.daddr
    }

    #[inline(always)]
    fn source_port(&self) -> u16 {
        self.sport
    }

    #[inline(always)]
    fn destination_port(&self) -> u16 {
        self.dport
    }

    #[inline(always)]
    fn protocol(&self) -> u8 {
        self.protocol
    }
}

/// IPv6: 16-byte addresses ([`Addr6`]), [`Ipv6Hdr`], the 40-byte
/// [`FlowKey6`], the 20-byte [`ServiceKey6`]; the rules in [`ipv6`].
///
/// [`Family::flow_key`] reads the fixed header's `next_header` as the
/// upper-layer protocol: right for a packet without extension headers. The
/// path carries the walk's protocol itself ([`Family::flow_key_with`], and
/// the rewrites take it, so UDP's checksum rules hold behind extension
/// headers too).
pub struct V6;

impl Family for V6 {
    type Addr = Addr6;
    type IpHdr = Ipv6Hdr;
    type FlowKey = FlowKey6;
    type ServiceKey = ServiceKey6;

    const ETHER_TYPE_RAW: u16 = ipv6::ETH_P_IPV6_RAW;
    const AF: u8 = ipv6::AF_INET6;

    #[inline(always)]
    fn flow_key(ip: &Ipv6Hdr, ports: &L4Ports) -> FlowKey6 {
        FlowKey6::of(ip, ip.next_header, ports)
    }

    #[inline(always)]
    fn flow_key_with(ip: &Ipv6Hdr, protocol: u8, ports: &L4Ports) -> FlowKey6 {
        FlowKey6::of(ip, protocol, ports)
    }

    #[inline(always)]
    fn service_key(key: &FlowKey6) -> ServiceKey6 {
        ServiceKey6 {
            vip: key.daddr,
            port: key.dport,
            protocol: key.protocol,
            _pad: 0,
        }
    }

    #[inline(always)]
    fn rewrite_destination(
        ip: &mut Ipv6Hdr,
        protocol: u8,
        ports: &mut L4Ports,
        check: &mut u16,
        addr: Addr6,
        port: u16,
    ) {
        nat66_destination(ip, ports, check, addr, port_protocol(port, protocol));
    }

    #[inline(always)]
    fn rewrite_source(
        ip: &mut Ipv6Hdr,
        protocol: u8,
        ports: &mut L4Ports,
        check: &mut u16,
        addr: Addr6,
        port: u16,
    ) {
        nat66_source(ip, ports, check, addr, port_protocol(port, protocol));
    }

    #[inline(always)]
    fn decrement_ttl(ip: &mut Ipv6Hdr) -> bool {
        ipv6::decrement_hop_limit(ip)
    }

    #[inline(always)]
    fn error_to_backend(
        ip: &mut Ipv6Hdr,
        icmp_check: &mut u16,
        quoted: &mut Ipv6Hdr,
        quoted_ports: &mut L4Ports,
        addr: Addr6,
        port: u16,
    ) {
        ipv6::error_to_backend(ip, icmp_check, quoted, quoted_ports, addr, port);
    }

    #[inline(always)]
    fn error_to_client(
        ip: &mut Ipv6Hdr,
        icmp_check: &mut u16,
        quoted: &mut Ipv6Hdr,
        quoted_ports: &mut L4Ports,
        vip: Addr6,
        vport: u16,
    ) {
        ipv6::error_to_client(ip, icmp_check, quoted, quoted_ports, vip, vport);
    }
}

/// A port and a protocol in one argument: a BPF call takes at most five.
#[inline(always)]
const fn port_protocol(port: u16, protocol: u8) -> u32 {
    (port as u32) | (protocol as u32) << 16
}

// Out of line: inlined, the 16-byte addresses' copies overflowed IPv6's
// second stage's one 512-byte frame.
#[inline(never)]
fn nat66_destination(
    ip: &mut Ipv6Hdr,
    ports: &mut L4Ports,
    check: &mut u16,
    addr: Addr6,
    port_protocol: u32,
) {
    let (port, protocol) = (port_protocol as u16, (port_protocol >> 16) as u8);
    ipv6::rewrite_destination(ip, protocol, ports, check, addr, port);
}

// Out of line, as `nat66_destination`.
#[inline(never)]
fn nat66_source(
    ip: &mut Ipv6Hdr,
    ports: &mut L4Ports,
    check: &mut u16,
    addr: Addr6,
    port_protocol: u32,
) {
    let (port, protocol) = (port_protocol as u16, (port_protocol >> 16) as u8);
    ipv6::rewrite_source(ip, protocol, ports, check, addr, port);
}

impl IpHeader for Ipv6Hdr {
    type Addr = Addr6;
    const LEN: usize = Ipv6Hdr::LEN;

    #[inline(always)]
    fn source(&self) -> Addr6 {
        self.saddr
    }

    #[inline(always)]
    fn destination(&self) -> Addr6 {
        self.daddr
    }

    #[inline(always)]
    fn ttl(&self) -> u8 {
        self.hop_limit
    }

    #[inline(always)]
    fn protocol(&self) -> u8 {
        self.next_header
    }

    #[inline(always)]
    fn tos(&self) -> u8 {
        self.traffic_class()
    }

    #[inline(always)]
    fn packet_len(&self) -> u16 {
        // IPv6's payload length excludes the fixed header; the MTU
        // compares the whole packet (saturating: a jumbogram's 0 never
        // gets here, `Ipv6Hdr::is_valid`).
        u16::from_be(self.payload_len).saturating_add(Ipv6Hdr::LEN as u16)
    }

    #[inline(always)]
    fn dont_fragment(&self) -> bool {
        // Routers never fragment IPv6: "packet too big" instead.
        true
    }
}

impl FlowTuple for FlowKey6 {
    type Addr = Addr6;

    #[inline(always)]
    fn source(&self) -> Addr6 {
        self.saddr
    }

    #[inline(always)]
    fn destination(&self) -> Addr6 {
        self.daddr
    }

    #[inline(always)]
    fn source_port(&self) -> u16 {
        self.sport
    }

    #[inline(always)]
    fn destination_port(&self) -> u16 {
        self.dport
    }

    #[inline(always)]
    fn protocol(&self) -> u8 {
        self.protocol
    }
}

const _: () = assert!(core::mem::size_of::<<V6 as Family>::FlowKey>() == 40);
const _: () = assert!(core::mem::size_of::<<V6 as Family>::ServiceKey>() == 20);
const _: () = assert!(core::mem::size_of::<<V6 as Family>::IpHdr>() == 40);

// IPv4's layouts stay byte for byte what they were before the family seam:
// the keys of the hot maps and the header the path reads.
const _: () = assert!(core::mem::size_of::<<V4 as Family>::FlowKey>() == 16);
const _: () = assert!(core::mem::size_of::<<V4 as Family>::ServiceKey>() == 8);
const _: () = assert!(core::mem::size_of::<<V4 as Family>::IpHdr>() == 20);
const _: () = assert!(core::mem::size_of::<<V4 as Family>::Addr>() == 4);

#[cfg(test)]
mod tests {
    use super::*;

    /// UDP behind an extension header (the fixed header's next header is
    /// not UDP): the rewrite takes the walk's protocol, so a checksum that
    /// comes out 0 is sent as 0xffff (0 is "no checksum", which IPv6
    /// receivers drop), and a datagram without one keeps 0.
    #[test]
    fn v6_udp_behind_extension_headers_keeps_udps_checksum_rules() {
        use crate::{headers::IPPROTO_UDP, ipv6::NEXTHDR_DEST};
        let mut ip = Ipv6Hdr {
            vtc_flow: 0x6000_0000u32.to_be(),
            payload_len: 16u16.to_be(),
            next_header: NEXTHDR_DEST,
            hop_limit: 64,
            saddr: [1, 2, 3, 4],
            daddr: [5, 6, 7, 8],
        };
        let (backend, port) = ([9, 10, 11, 12], 5300u16.to_be());
        // The one checksum the rewrite turns into 0.
        let zero_after = (1..=u16::MAX)
            .find(|&c| {
                crate::checksum::replace16(
                    ipv6::replace128(c, ip.daddr, backend),
                    53u16.to_be(),
                    port,
                ) == 0
            })
            .expect("a checksum the rewrite makes 0");
        let mut ports = L4Ports {
            source: 4000u16.to_be(),
            dest: 53u16.to_be(),
        };
        let mut check = zero_after;
        V6::rewrite_destination(&mut ip, IPPROTO_UDP, &mut ports, &mut check, backend, port);
        assert_eq!(check, 0xffff, "a computed 0 is sent as 0xffff");
        let mut none = 0u16;
        let mut ports = L4Ports {
            source: 4000u16.to_be(),
            dest: 53u16.to_be(),
        };
        V6::rewrite_source(&mut ip, IPPROTO_UDP, &mut ports, &mut none, [1; 4], 99);
        assert_eq!(none, 0, "no checksum stays none");
    }

    #[test]
    fn v4_keys_are_the_packets_tuple() {
        let ip = Ipv4Hdr {
            version_ihl: 0x45,
            tos: 0x10,
            tot_len: 60u16.to_be(),
            id: 0,
            frag_off: crate::headers::IP_DF.to_be(),
            ttl: 64,
            protocol: crate::headers::IPPROTO_TCP,
            check: 0,
            saddr: 0x0200_12c6,
            daddr: 0x0a00_12c6,
        };
        let ports = L4Ports {
            source: 40000u16.to_be(),
            dest: 80u16.to_be(),
        };
        let key = V4::flow_key(&ip, &ports);
        assert_eq!(
            (
                key.source(),
                key.destination(),
                key.source_port(),
                key.destination_port(),
                key.protocol()
            ),
            (ip.saddr, ip.daddr, ports.source, ports.dest, ip.protocol)
        );
        assert_eq!(
            V4::service_key(&key),
            ServiceKey {
                vip: ip.daddr,
                port: ports.dest,
                protocol: ip.protocol,
                _pad: 0
            }
        );
        assert_eq!(
            (ip.packet_len(), IpHeader::dont_fragment(&ip), ip.tos()),
            (60, true, 0x10)
        );
    }

    #[test]
    fn v6_keys_are_the_packets_tuple() {
        let addr =
            |s: &str| crate::ipv6::addr_of(s.parse::<std::net::Ipv6Addr>().unwrap().octets());
        let ip = Ipv6Hdr {
            vtc_flow: 0x6280_0000u32.to_be(),
            payload_len: 20u16.to_be(),
            next_header: crate::headers::IPPROTO_TCP,
            hop_limit: 64,
            saddr: addr("2001:db8:1::2"),
            daddr: addr("2001:db8::10"),
        };
        let ports = L4Ports {
            source: 40000u16.to_be(),
            dest: 80u16.to_be(),
        };
        let key = V6::flow_key(&ip, &ports);
        assert_eq!(
            (
                key.source(),
                key.destination(),
                key.source_port(),
                key.destination_port(),
                key.protocol()
            ),
            (ip.saddr, ip.daddr, ports.source, ports.dest, ip.next_header)
        );
        assert_eq!(
            V6::service_key(&key),
            ServiceKey6 {
                vip: ip.daddr,
                port: ports.dest,
                protocol: ip.next_header,
                _pad: 0
            }
        );
        // The whole packet's length; never fragmented by a router.
        assert_eq!(
            (
                ip.packet_len(),
                IpHeader::dont_fragment(&ip),
                ip.tos(),
                ip.ttl()
            ),
            (60, true, 0x28, 64)
        );
        assert_eq!((V6::AF, u16::from_be(V6::ETHER_TYPE_RAW)), (10, 0x86dd));
    }
}
