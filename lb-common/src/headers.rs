//! Wire layouts of the headers the data plane reads and rewrites.
//!
//! Fields hold raw network-order bytes/words: the packet path compares them
//! with map keys stored the same way and never byte-swaps.

/// Ethernet II header.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    /// EtherType, raw network order.
    pub ether_type: u16,
}

impl EthHdr {
    pub const LEN: usize = 14;
}

/// EtherType values as raw network-order words.
pub const ETH_P_IPV4_RAW: u16 = 0x0800u16.to_be();
pub const ETH_P_8021Q_RAW: u16 = 0x8100u16.to_be();

/// IPv4 header without options.
///
/// `packed(2)`: in a frame it starts 14 bytes in, so it is only 2-byte
/// aligned; the packed layout makes the compiler emit loads that are valid
/// there instead of assuming 4-byte alignment for the addresses.
#[repr(C, packed(2))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4Hdr {
    /// Version (high nibble) and IHL in 32-bit words (low nibble).
    pub version_ihl: u8,
    pub tos: u8,
    pub tot_len: u16,
    pub id: u16,
    /// Flags (3 bits) and fragment offset (13 bits), raw network order.
    pub frag_off: u16,
    pub ttl: u8,
    pub protocol: u8,
    pub check: u16,
    pub saddr: u32,
    pub daddr: u32,
}

impl Ipv4Hdr {
    pub const LEN: usize = 20;

    /// Header length in bytes as declared by IHL.
    #[inline(always)]
    pub const fn header_len(&self) -> usize {
        ((self.version_ihl & 0x0f) as usize) * 4
    }

    #[inline(always)]
    pub const fn version(&self) -> u8 {
        self.version_ihl >> 4
    }

    /// True for any fragment: "more fragments" set or a non-zero offset.
    #[inline(always)]
    pub const fn is_fragment(&self) -> bool {
        // MF (0x2000) | offset (0x1fff), in host order.
        u16::from_be(self.frag_off) & 0x3fff != 0
    }

    /// A fragment after the first (offset ≠ 0): it carries no L4 header.
    #[inline(always)]
    pub const fn is_later_fragment(&self) -> bool {
        u16::from_be(self.frag_off) & IP_OFFSET != 0
    }

    /// The first fragment of a fragmented datagram: MF set, offset 0. It
    /// carries the L4 header, so the ports of the fragments after it.
    #[inline(always)]
    pub const fn is_first_fragment(&self) -> bool {
        u16::from_be(self.frag_off) & (IP_MF | IP_OFFSET) == IP_MF
    }

    /// "Don't fragment": a router must answer "fragmentation needed" instead
    /// of fragmenting it.
    #[inline(always)]
    pub const fn dont_fragment(&self) -> bool {
        u16::from_be(self.frag_off) & IP_DF != 0
    }

    /// The one validity check of an IPv4 header in a frame whose IP part
    /// is `frame_ip_len` bytes long (the VIP rules, `parse_l4`, give each
    /// shape but `Plain` its verdict). A bad version, IHL or total length
    /// is `Malformed` before options are looked at.
    #[inline(always)]
    pub const fn shape(&self, frame_ip_len: usize) -> Ipv4Shape {
        if self.version() != 4 || self.header_len() < Ipv4Hdr::LEN {
            return Ipv4Shape::Malformed;
        }
        let tot_len = u16::from_be(self.tot_len) as usize;
        if tot_len < Ipv4Hdr::LEN || tot_len > frame_ip_len {
            return Ipv4Shape::Malformed;
        }
        if self.header_len() != Ipv4Hdr::LEN {
            return Ipv4Shape::Options;
        }
        Ipv4Shape::Plain
    }

    /// Do TCP/UDP ports follow this header where the balancer reads them:
    /// no options, not a later fragment, TCP or UDP?
    #[inline(always)]
    pub const fn carries_ports(&self) -> bool {
        self.header_len() == Ipv4Hdr::LEN
            && !self.is_later_fragment()
            && l4_layout(self.protocol).is_some()
    }
}

/// [`Ipv4Hdr::shape`]: what the VIP rules make of an IPv4 header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ipv4Shape {
    /// Version 4, no options, total length within the frame.
    Plain,
    /// Valid but for its options (`DropIpOptions` to a VIP).
    Options,
    /// A bad version, IHL or total length (`DropMalformed` to a VIP).
    Malformed,
}

/// IPv4 flags and fragment offset (host order of `frag_off`).
pub const IP_DF: u16 = 0x4000;
pub const IP_MF: u16 = 0x2000;
pub const IP_OFFSET: u16 = 0x1fff;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// The first four bytes of TCP and UDP: the ports.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct L4Ports {
    pub source: u16,
    pub dest: u16,
}

/// Minimal TCP header length (no options).
pub const TCP_HDR_LEN: usize = 20;
/// Offset of the checksum inside the TCP header.
pub const TCP_CHECK_OFF: usize = 16;
/// Offset of the flags byte (CWR … FIN) inside the TCP header.
pub const TCP_FLAGS_OFF: usize = 13;
/// Offset of the sequence number inside the TCP header.
pub const TCP_SEQ_OFF: usize = 4;
pub const TCP_FLAG_FIN: u8 = 0x01;
pub const TCP_FLAG_SYN: u8 = 0x02;
pub const TCP_FLAG_RST: u8 = 0x04;
pub const TCP_FLAG_ACK: u8 = 0x10;
pub const UDP_HDR_LEN: usize = 8;
/// Offset of the checksum inside the UDP header.
pub const UDP_CHECK_OFF: usize = 6;

/// A TCP header's sequence and acknowledgement numbers (network order
/// in the frame). `packed(2)`: 4 bytes into a TCP header that starts 34
/// bytes into the frame, so only 2-byte aligned.
#[repr(C, packed(2))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpNumbers {
    pub seq: u32,
    pub ack: u32,
}

/// Header length and checksum offset for a transport protocol we balance.
#[inline(always)]
pub const fn l4_layout(protocol: u8) -> Option<(usize, usize)> {
    match protocol {
        IPPROTO_TCP => Some((TCP_HDR_LEN, TCP_CHECK_OFF)),
        IPPROTO_UDP => Some((UDP_HDR_LEN, UDP_CHECK_OFF)),
        _ => None,
    }
}

/// A TCP segment that opens a connection: SYN set, ACK clear (a SYN-ACK
/// or any later segment belongs to a connection that already exists).
#[inline(always)]
pub const fn opens_connection(tcp_flags: u8) -> bool {
    tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN
}

const _: () = assert!(core::mem::size_of::<EthHdr>() == EthHdr::LEN);
const _: () = assert!(core::mem::size_of::<Ipv4Hdr>() == Ipv4Hdr::LEN);
const _: () = assert!(core::mem::size_of::<L4Ports>() == 4);
const _: () = assert!(core::mem::size_of::<TcpNumbers>() == 8);

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(frag_off: u16) -> Ipv4Hdr {
        Ipv4Hdr {
            version_ihl: 0x45,
            tos: 0,
            tot_len: 0,
            id: 0,
            frag_off: frag_off.to_be(),
            ttl: 64,
            protocol: IPPROTO_UDP,
            check: 0,
            saddr: 0,
            daddr: 0,
        }
    }

    #[test]
    fn fragment_kinds() {
        // (frag_off, fragment, first, later, DF)
        for (frag_off, any, first, later, df) in [
            (0, false, false, false, false),
            (IP_DF, false, false, false, true),
            (IP_MF, true, true, false, false),
            (IP_MF | 185, true, false, true, false),
            (185, true, false, true, false),
        ] {
            let h = ip(frag_off);
            assert_eq!(
                (
                    h.is_fragment(),
                    h.is_first_fragment(),
                    h.is_later_fragment(),
                    h.dont_fragment()
                ),
                (any, first, later, df),
                "frag_off {frag_off:#06x}"
            );
        }
    }

    #[test]
    fn one_validity_check_gives_each_shape() {
        let with = |version_ihl: u8, tot_len: u16| Ipv4Hdr {
            version_ihl,
            tot_len: tot_len.to_be(),
            ..ip(0)
        };
        // (version/IHL, total length, frame's IP bytes, shape)
        for (vi, tot, frame, want) in [
            (0x45, 40, 40, Ipv4Shape::Plain),
            (0x45, 40, 60, Ipv4Shape::Plain),
            (0x46, 40, 40, Ipv4Shape::Options),
            (0x44, 40, 40, Ipv4Shape::Malformed),
            (0x65, 40, 40, Ipv4Shape::Malformed),
            (0x45, 19, 40, Ipv4Shape::Malformed),
            (0x45, 41, 40, Ipv4Shape::Malformed),
            // Options with a bad total length: malformed first.
            (0x46, 41, 40, Ipv4Shape::Malformed),
        ] {
            assert_eq!(with(vi, tot).shape(frame), want, "{vi:#x} {tot} {frame}");
        }
    }

    #[test]
    fn ports_follow_only_a_plain_first_tcp_or_udp_header() {
        assert!(ip(0).carries_ports());
        assert!(ip(IP_MF).carries_ports());
        assert!(!ip(185).carries_ports());
        let options = Ipv4Hdr {
            version_ihl: 0x46,
            ..ip(0)
        };
        assert!(!options.carries_ports());
        let icmp = Ipv4Hdr {
            protocol: IPPROTO_ICMP,
            ..ip(0)
        };
        assert!(!icmp.carries_ports());
    }

    #[test]
    fn only_a_bare_syn_opens_a_connection() {
        const FIN: u8 = 0x01;
        const RST: u8 = 0x04;
        const PSH: u8 = 0x08;
        const ECE: u8 = 0x40;
        const CWR: u8 = 0x80;
        assert!(opens_connection(TCP_FLAG_SYN));
        // ECN negotiation sets ECE and CWR on the SYN.
        assert!(opens_connection(TCP_FLAG_SYN | ECE | CWR));
        assert!(!opens_connection(TCP_FLAG_SYN | TCP_FLAG_ACK));
        assert!(!opens_connection(TCP_FLAG_ACK));
        assert!(!opens_connection(TCP_FLAG_ACK | PSH));
        assert!(!opens_connection(FIN | TCP_FLAG_ACK));
        assert!(!opens_connection(RST));
        assert!(!opens_connection(0));
    }
}
