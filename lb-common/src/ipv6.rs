//! IPv6's wire rules, pure: the fixed header, the bounded walk over
//! extension headers and its verdicts, the pseudo-header checksum, NAT66
//! (destination, and source on replies) with incremental checksum updates,
//! the hop limit, and the translation of ICMPv6 errors that quote a flow.
//!
//! Differences from IPv4 that shape this module:
//! - no header checksum: NAT66 updates only the TCP/UDP (or ICMPv6)
//!   checksum, which covers the 16-byte addresses through the pseudo-header
//!   (RFC 8200 §8.1);
//! - the transport header may sit behind extension headers. The walk is
//!   bounded ([`MAX_EXTENSIONS`], as Cilium's `ipv6_hdrlen` bounds its loop)
//!   so the verifier can see its end, and each case that cannot be balanced
//!   gets its own verdict ([`ChainError`]) instead of a guess;
//! - the ICMPv6 checksum covers a pseudo-header too, so translating an error
//!   through the NAT folds the *outer* address change into it as well as the
//!   quoted one (ICMPv4's checksum covers the ICMP message only).
//!
//! Addresses are `[u32; 4]` of raw network-order words, as the packet holds
//! them: compared and hashed as four words, never byte-swapped.

use crate::{
    checksum::{compute, fold, replace16},
    headers::{IPPROTO_TCP, IPPROTO_UDP, L4Ports},
};

/// An IPv6 address as the packet carries it: four raw network-order words.
pub type Addr6 = [u32; 4];

/// Is `addr` link-scoped: link-local unicast (fe80::/10) or multicast of
/// interface or link scope (ff01::/16, ff02::/16 and their flag variants)?
/// Neighbour discovery, MLD and router solicitation go to such addresses;
/// a host never routes them off the link and a VIP is never one, so the
/// probe namespace's housekeeping can pass to the LB's stack safely.
#[inline(always)]
pub fn is_link_scoped(addr: &Addr6) -> bool {
    let first = u32::from_be(addr[0]);
    let link_local = first >> 22 == 0xfe80 >> 6;
    let multicast = first >> 24 == 0xff;
    let scope = (first >> 16) & 0xf;
    link_local || (multicast && scope <= 2)
}

/// EtherType of IPv6, raw network order.
pub const ETH_P_IPV6_RAW: u16 = 0x86ddu16.to_be();
/// `AF_INET6` (`bpf_fib_lookup`'s family).
pub const AF_INET6: u8 = 10;

/// Next-header values the walk knows (IANA "Assigned Internet Protocol
/// Numbers"; the extension headers of RFC 8200 §4).
pub const NEXTHDR_HOP: u8 = 0;
pub const NEXTHDR_ROUTING: u8 = 43;
pub const NEXTHDR_FRAGMENT: u8 = 44;
pub const NEXTHDR_ESP: u8 = 50;
pub const NEXTHDR_AUTH: u8 = 51;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const NEXTHDR_NONE: u8 = 59;
pub const NEXTHDR_DEST: u8 = 60;

/// At most this many extension headers are walked; a chain with more is
/// [`ChainError::TooMany`]. Real traffic carries zero or one (a fragment
/// header, a hop-by-hop for MLD/jumbograms); Cilium walks 4 too.
pub const MAX_EXTENSIONS: usize = 4;

/// Hop limit of the messages the data plane originates (Linux's default).
pub const HOP_LIMIT: u8 = 64;

/// IPv6 fixed header (RFC 8200 §3).
///
/// `packed(2)`: in a frame it starts 14 bytes in, so it is only 2-byte
/// aligned (as [`crate::headers::Ipv4Hdr`]).
#[repr(C, packed(2))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv6Hdr {
    /// Version (4 bits), traffic class (8), flow label (20), raw network order.
    pub vtc_flow: u32,
    /// Bytes after this header (extension headers + payload), raw network order.
    pub payload_len: u16,
    pub next_header: u8,
    pub hop_limit: u8,
    pub saddr: Addr6,
    pub daddr: Addr6,
}

impl Ipv6Hdr {
    pub const LEN: usize = 40;

    #[inline(always)]
    pub const fn version(&self) -> u8 {
        (u32::from_be(self.vtc_flow) >> 28) as u8
    }

    /// Traffic class (DSCP and ECN), IPv4's TOS.
    #[inline(always)]
    pub const fn traffic_class(&self) -> u8 {
        (u32::from_be(self.vtc_flow) >> 20) as u8
    }

    /// The one validity check of the fixed header in a frame whose IP part
    /// is `frame_ip_len` bytes long: version 6 and a payload length within
    /// the frame. A payload length of 0 is a jumbogram's (RFC 2675), which
    /// needs a hop-by-hop option we do not read: malformed for the balancer.
    #[inline(always)]
    pub const fn is_valid(&self, frame_ip_len: usize) -> bool {
        let payload = u16::from_be(self.payload_len) as usize;
        self.version() == 6 && payload != 0 && Ipv6Hdr::LEN + payload <= frame_ip_len
    }
}

/// Copies the address at `src` to `dst` (both 2-byte aligned, as in a
/// packed header) a word at a time, each word built from two 2-byte loads.
/// A by-value copy of the header's packed `[u32; 4]` field compiled,
/// for BPF, to a call of an out-of-line byte-by-byte `memmove` (LLVM's
/// memcpy optimizer makes one of a copy between pointers that may alias,
/// and its BPF backend expands `memcpy` in place but not `memmove`): ~20 ns
/// of an established IPv6 packet's 87 (`lb bench --profile-lb 4
/// --profile-v6`, perf). A word at a time holds no registers for a whole
/// address, so the stages' frames (the verifier's 512 bytes) stay as they
/// were; volatile half-word stores instead made them 24–40 bytes bigger.
///
/// # Safety
/// `src` and `dst` point at 16 valid bytes, 2-byte aligned.
#[inline(always)]
pub unsafe fn copy_addr(dst: *mut Addr6, src: *const Addr6) {
    let s = src.cast::<u16>();
    for i in 0..4 {
        // SAFETY: the caller's.
        unsafe {
            let (first, second) = (s.add(2 * i).read(), s.add(2 * i + 1).read());
            (*dst)[i] = join(first, second);
        }
    }
}

/// A word of two half-words in memory order.
#[inline(always)]
fn join(first: u16, second: u16) -> u32 {
    if cfg!(target_endian = "little") {
        u32::from(first) | u32::from(second) << 16
    } else {
        u32::from(first) << 16 | u32::from(second)
    }
}

/// A fragment header's fields (RFC 8200 §4.5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fragment6 {
    /// Identification, raw network order.
    pub id: u32,
    /// Offset of this fragment's data, in 8-byte units (host order).
    pub offset: u16,
    /// "More fragments".
    pub more: bool,
}

impl Fragment6 {
    /// A fragment after the first: no transport header in it.
    #[inline(always)]
    pub const fn is_later(&self) -> bool {
        self.offset != 0
    }

    /// The first fragment of a fragmented datagram: it carries the ports
    /// of the fragments after it. (Offset 0 without "more" is an atomic
    /// fragment, RFC 6946: a whole datagram, handled as unfragmented.)
    #[inline(always)]
    pub const fn is_first(&self) -> bool {
        self.offset == 0 && self.more
    }
}

/// One step of the walk: what a header of type `next` whose first 8 bytes
/// are `head` is. The kernel side reads the 8 bytes bounds-checked and
/// calls this, the host walk ([`walk`]) slices them: one set of rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Not an extension header: the upper-layer protocol (TCP, UDP,
    /// ICMPv6, or one we do not balance: ESP, AH, no next header, …).
    Upper,
    /// An extension header of `len` bytes, followed by `next`.
    Skip { len: usize, next: u8 },
    /// A fragment header (8 bytes), followed by `next`.
    Fragment { next: u8, fragment: Fragment6 },
    /// A routing header with segments left: the destination is not the
    /// packet's last (RFC 8200 §4.4).
    Routing,
}

/// The header of type `next` starting with `head` (see [`Step`]).
///
/// Hop-by-hop, destination options and routing headers are
/// `(head[1] + 1) × 8` bytes; a routing header with `segments left` 0 is
/// skipped like an options header (RFC 8200: "ignore the routing header and
/// proceed"), one with segments left is [`Step::Routing`]. AH is left
/// [`Step::Upper`]: the NAT rewrite would break its integrity check, so such
/// traffic is never balanced (the kernel gets it).
#[inline(always)]
pub const fn step(next: u8, head: &[u8; 8]) -> Step {
    match next {
        NEXTHDR_HOP | NEXTHDR_DEST => Step::Skip {
            len: (head[1] as usize + 1) * 8,
            next: head[0],
        },
        NEXTHDR_ROUTING => {
            if head[3] != 0 {
                Step::Routing
            } else {
                Step::Skip {
                    len: (head[1] as usize + 1) * 8,
                    next: head[0],
                }
            }
        }
        NEXTHDR_FRAGMENT => {
            let word = u16::from_be_bytes([head[2], head[3]]);
            Step::Fragment {
                next: head[0],
                fragment: Fragment6 {
                    id: u32::from_ne_bytes([head[4], head[5], head[6], head[7]]),
                    offset: word >> 3,
                    more: word & 1 != 0,
                },
            }
        }
        _ => Step::Upper,
    }
}

/// Where a walk ended: the upper-layer protocol, its offset from the start
/// of the IPv6 header, and the fragment header met on the way, if any.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chain {
    pub protocol: u8,
    /// Offset of the upper-layer header from the IPv6 header's first byte.
    /// For a later fragment: of its data (no header there).
    pub offset: usize,
    pub fragment: Option<Fragment6>,
}

/// The cases the walk cannot balance. Each is meant to be a verdict of its
/// own on VIP traffic when the data plane reads IPv6 (too many: dropped;
/// routing: dropped, the VIP is not the last destination; malformed:
/// `DropMalformed`); other traffic passes to the kernel untouched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChainError {
    /// More than [`MAX_EXTENSIONS`] extension headers.
    TooMany,
    /// A routing header with segments left.
    Routing,
    /// An extension header cut short by the end of the packet, or a second
    /// fragment header (RFC 8200 allows one).
    Malformed,
}

/// Walks the extension headers of the IPv6 packet `packet` (its bytes from
/// the fixed header on, as far as the frame has them).
pub fn walk(packet: &[u8]) -> Result<Chain, ChainError> {
    if packet.len() < Ipv6Hdr::LEN {
        return Err(ChainError::Malformed);
    }
    let mut next = packet[6];
    let mut offset = Ipv6Hdr::LEN;
    let mut fragment = None;
    for _ in 0..=MAX_EXTENSIONS {
        let head: Option<&[u8; 8]> = packet
            .get(offset..offset + 8)
            .and_then(|b| b.try_into().ok());
        let step = match head {
            Some(head) => step(next, head),
            // Fewer than 8 bytes left: only an upper layer may start here
            // (its own parse checks its length).
            None if !is_extension(next) => Step::Upper,
            None => return Err(ChainError::Malformed),
        };
        match step {
            Step::Upper => {
                return Ok(Chain {
                    protocol: next,
                    offset,
                    fragment,
                });
            }
            Step::Routing => return Err(ChainError::Routing),
            Step::Skip { len, next: n } => {
                if offset + len > packet.len() {
                    return Err(ChainError::Malformed);
                }
                offset += len;
                next = n;
            }
            Step::Fragment {
                next: n,
                fragment: f,
            } => {
                if fragment.is_some() {
                    return Err(ChainError::Malformed);
                }
                offset += 8;
                next = n;
                fragment = Some(f);
                if f.is_later() {
                    // The rest is data, not headers.
                    return Ok(Chain {
                        protocol: next,
                        offset,
                        fragment,
                    });
                }
            }
        }
    }
    Err(ChainError::TooMany)
}

/// Is `next` one of the extension headers the walk steps over?
#[inline(always)]
pub const fn is_extension(next: u8) -> bool {
    matches!(
        next,
        NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_FRAGMENT | NEXTHDR_DEST
    )
}

/// RFC 1624 for a 128-bit field (an IPv6 address): all eight words at once.
#[inline(always)]
pub const fn replace128(check: u16, old: Addr6, new: Addr6) -> u16 {
    let mut sum = !check as u32;
    let mut i = 0;
    while i < 4 {
        sum += (!(old[i] as u16) as u32)
            + (!((old[i] >> 16) as u16) as u32)
            + (new[i] as u16 as u32)
            + ((new[i] >> 16) as u16 as u32);
        // Fold as we go: eight terms of up to 0xffff each would not
        // overflow, but keeping the accumulator small costs nothing.
        sum = (sum & 0xffff) + (sum >> 16);
        i += 1;
    }
    !fold(sum)
}

/// The full upper-layer checksum of an IPv6 packet (RFC 8200 §8.1): the
/// pseudo-header (source, destination, upper-layer length, next header)
/// and `data` (the upper-layer header, checksum field zeroed, and payload).
/// For the frames the data plane composes ("packet too big") and tests.
pub fn pseudo_checksum(source: &Addr6, destination: &Addr6, protocol: u8, data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for word in source.iter().chain(destination.iter()) {
        sum += (*word as u16) as u32 + (*word >> 16) as u16 as u32;
    }
    let len = (data.len() as u32).to_be();
    sum += (len as u16) as u32 + (len >> 16) as u16 as u32;
    sum += u16::from_ne_bytes([0, protocol]) as u32;
    compute(data, sum)
}

/// The TCP/UDP checksum after an address and a port changed. A UDP
/// checksum of 0 is "none" (invalid in IPv6, RFC 8200 §8.1: the receiver
/// drops it, so the LB does not fabricate one); a computed 0 is sent as
/// 0xffff.
#[inline(always)]
fn l4_check(
    check: u16,
    protocol: u8,
    old_addr: Addr6,
    new_addr: Addr6,
    old_port: u16,
    new_port: u16,
) -> u16 {
    if protocol == IPPROTO_UDP && check == 0 {
        return 0;
    }
    let c = replace16(replace128(check, old_addr, new_addr), old_port, new_port);
    if protocol == IPPROTO_UDP && c == 0 {
        0xffff
    } else {
        c
    }
}

/// NAT66, forward: client → VIP becomes client → backend (`addr`, `port`
/// raw network order). `protocol` is the walk's upper layer (TCP or UDP),
/// which is `ip.next_header` only without extension headers.
#[inline(always)]
pub fn rewrite_destination(
    ip: &mut Ipv6Hdr,
    protocol: u8,
    ports: &mut L4Ports,
    check: &mut u16,
    addr: Addr6,
    port: u16,
) {
    let old = ip.daddr;
    ip.daddr = addr;
    *check = l4_check(*check, protocol, old, addr, ports.dest, port);
    ports.dest = port;
}

/// NAT66, reply: backend → client becomes VIP → client.
#[inline(always)]
pub fn rewrite_source(
    ip: &mut Ipv6Hdr,
    protocol: u8,
    ports: &mut L4Ports,
    check: &mut u16,
    addr: Addr6,
    port: u16,
) {
    let old = ip.saddr;
    ip.saddr = addr;
    *check = l4_check(*check, protocol, old, addr, ports.source, port);
    ports.source = port;
}

/// Decrements the hop limit as a router does (no header checksum to
/// update). False, and nothing changed, when the packet must not be
/// forwarded (hop limit ≤ 1): the kernel owes the sender "time exceeded".
#[inline(always)]
pub fn decrement_hop_limit(ip: &mut Ipv6Hdr) -> bool {
    if ip.hop_limit <= 1 {
        return false;
    }
    ip.hop_limit -= 1;
    true
}

/// ICMPv6 error types that quote a packet of a flow (RFC 4443 §3):
/// destination unreachable, packet too big, time exceeded, parameter
/// problem. Echo, ND and the rest are the host's (the kernel answers).
pub const ICMPV6_DEST_UNREACH: u8 = 1;
pub const ICMPV6_PACKET_TOO_BIG: u8 = 2;
pub const ICMPV6_TIME_EXCEEDED: u8 = 3;
pub const ICMPV6_PARAM_PROBLEM: u8 = 4;

#[inline(always)]
pub const fn quotes_a_flow(kind: u8) -> bool {
    matches!(
        kind,
        ICMPV6_DEST_UNREACH | ICMPV6_PACKET_TOO_BIG | ICMPV6_TIME_EXCEEDED | ICMPV6_PARAM_PROBLEM
    )
}

/// A client's ICMPv6 error about a NAT flow's reply goes to the backend:
/// the quoted packet was VIP:port → client, the backend sent it from
/// `addr`:`port`. The outer destination (the VIP, the quoted packet's
/// source) and the quoted source become the backend's; the ICMPv6
/// checksum follows both (the outer one through its pseudo-header). The
/// quoted TCP/UDP checksum is left as quoted (see `icmp`).
#[inline(always)]
pub fn error_to_backend(
    ip: &mut Ipv6Hdr,
    icmp_check: &mut u16,
    quoted: &mut Ipv6Hdr,
    quoted_ports: &mut L4Ports,
    addr: Addr6,
    port: u16,
) {
    let mut check = replace128(*icmp_check, ip.daddr, addr);
    ip.daddr = addr;
    check = replace128(check, quoted.saddr, addr);
    quoted.saddr = addr;
    check = replace16(check, quoted_ports.source, port);
    quoted_ports.source = port;
    *icmp_check = check;
}

/// A backend's (or a router's behind it) ICMPv6 error about a NAT flow's
/// packet goes to the client: the quoted destination becomes `vip`:`vport`,
/// and the outer source too when the backend itself sent it (a router's
/// error keeps its own source).
#[inline(always)]
pub fn error_to_client(
    ip: &mut Ipv6Hdr,
    icmp_check: &mut u16,
    quoted: &mut Ipv6Hdr,
    quoted_ports: &mut L4Ports,
    vip: Addr6,
    vport: u16,
) {
    let mut check = *icmp_check;
    if { ip.saddr } == { quoted.daddr } {
        check = replace128(check, ip.saddr, vip);
        ip.saddr = vip;
    }
    check = replace128(check, quoted.daddr, vip);
    quoted.daddr = vip;
    check = replace16(check, quoted_ports.dest, vport);
    quoted_ports.dest = vport;
    *icmp_check = check;
}

/// ICMPv6 header of an error message (RFC 4443 §2.1): type, code,
/// checksum, then four bytes: the MTU of "packet too big" (§3.2), the
/// pointer of "parameter problem", unused otherwise.
///
/// `packed(2)`: in a frame it starts 54 bytes in.
#[repr(C, packed(2))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Icmp6Hdr {
    pub kind: u8,
    pub code: u8,
    /// Raw network order, as in the packet.
    pub check: u16,
    /// "Packet too big"'s MTU, raw network order.
    pub mtu: u32,
}

impl Icmp6Hdr {
    pub const LEN: usize = 8;
}

/// Bytes of the original packet a "packet too big" from the data plane
/// quotes: its fixed header and 64 bytes after it (IPv4's quote,
/// `icmp::TOO_BIG_QUOTE`, with IPv6's header: a fixed-size checksum; the
/// ports and TCP numbers a host needs to find its socket are in it).
pub const TOO_BIG_QUOTE6: usize = Ipv6Hdr::LEN + 64;
/// The ICMPv6 message of that answer: header and quote (its payload length).
pub const TOO_BIG_MSG6: usize = Icmp6Hdr::LEN + TOO_BIG_QUOTE6;

/// The IPv6 header of a "packet too big" about a packet `quoted_saddr` →
/// `quoted_daddr`: from the address the packet was sent to (the VIP for a
/// client's packet; the client, as the backend knows it, for a NAT
/// reply), back to its sender, hop limit 64.
#[inline(always)]
pub const fn too_big_ip6(quoted_saddr: Addr6, quoted_daddr: Addr6) -> Ipv6Hdr {
    Ipv6Hdr {
        vtc_flow: 0x6000_0000u32.to_be(),
        payload_len: (TOO_BIG_MSG6 as u16).to_be(),
        next_header: IPPROTO_ICMPV6,
        hop_limit: HOP_LIMIT,
        saddr: quoted_daddr,
        daddr: quoted_saddr,
    }
}

/// The ICMPv6 header of a "packet too big" carrying `mtu` (host order),
/// checksum still zero: the caller sums it with the quote and the
/// pseudo-header ([`pseudo_sum`]).
#[inline(always)]
pub const fn too_big_icmp6(mtu: u16) -> Icmp6Hdr {
    Icmp6Hdr {
        kind: ICMPV6_PACKET_TOO_BIG,
        code: 0,
        check: 0,
        mtu: (mtu as u32).to_be(),
    }
}

/// The one's-complement sum (unfolded) of the pseudo-header of an
/// upper-layer message of `len` bytes and protocol `next` (RFC 8200 §8.1):
/// the seed of a checksum over the message itself (the kernel's
/// `bpf_csum_diff` takes it).
#[inline(always)]
pub const fn pseudo_sum(source: &Addr6, destination: &Addr6, len: u32, next: u8) -> u32 {
    let mut sum = 0u32;
    let mut i = 0;
    while i < 4 {
        sum += (source[i] & 0xffff) + (source[i] >> 16);
        sum += (destination[i] & 0xffff) + (destination[i] >> 16);
        i += 1;
    }
    let len = len.to_be();
    sum += (len & 0xffff) + (len >> 16);
    sum + u16::from_ne_bytes([0, next]) as u32
}

/// The upper layers the balancer reads ports of.
#[inline(always)]
pub const fn carries_ports(protocol: u8) -> bool {
    protocol == IPPROTO_TCP || protocol == IPPROTO_UDP
}

/// The address of an `std::net::Ipv6Addr`'s octets, as the packet has it.
#[inline(always)]
pub const fn addr_of(octets: [u8; 16]) -> Addr6 {
    let mut out = [0u32; 4];
    let mut i = 0;
    while i < 4 {
        out[i] = u32::from_ne_bytes([
            octets[4 * i],
            octets[4 * i + 1],
            octets[4 * i + 2],
            octets[4 * i + 3],
        ]);
        i += 1;
    }
    out
}

/// The octets of a packet's address (the reverse of [`addr_of`]).
#[inline(always)]
pub const fn octets_of(addr: &Addr6) -> [u8; 16] {
    let mut out = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let b = addr[i].to_ne_bytes();
        out[4 * i] = b[0];
        out[4 * i + 1] = b[1];
        out[4 * i + 2] = b[2];
        out[4 * i + 3] = b[3];
        i += 1;
    }
    out
}

const _: () = assert!(core::mem::size_of::<Ipv6Hdr>() == Ipv6Hdr::LEN);
const _: () = assert!(core::mem::size_of::<Icmp6Hdr>() == Icmp6Hdr::LEN);
// The kernel's csum helper sums whole 32-bit words.
const _: () = assert!(TOO_BIG_MSG6.is_multiple_of(4));

#[cfg(test)]
mod tests;
