//! The tunnel modes' wire format (`forwarding = "ipip"` and `"gue"`): the
//! outer headers the data plane puts in front of a client's packet, left
//! untouched, to carry it to a backend across routers. Built here as pure
//! functions (tested on the host against etherparse); `lb-ebpf`'s `tunnel`
//! makes the room in the frame and writes them. The backends' decapsulator
//! (`lb decap`) reads the same format.
//!
//! - IPIP: an outer IPv4 header, 20 bytes, no options: TOS copied from the
//!   inner packet, total length inner + 20, ID 0, DF set, TTL 64, protocol
//!   4, from the tunnel source to the backend, checksum set.
//! - GUE (variant 0): the same outer IPv4 header with protocol 17, a UDP
//!   header to the GUE port (6080 unless configured) from a source port
//!   chosen by the flow hash ([`gue_source_port`]: one flow keeps one port,
//!   flows spread over the backend's receive queues), UDP checksum 0 (IPv4
//!   allows it), and 4 bytes of GUE: version 0, no options, the inner
//!   protocol (4 for IPv4, 41 for IPv6), flags 0. 32 bytes in all.
//!
//! An IPv6 service's backends are IPv6 (a service is one family), so its
//! outer header is IPv6:
//!
//! - IP6IP6 (`"ipip"`, RFC 2473): an outer IPv6 header, 40 bytes, no
//!   extension headers: traffic class copied from the inner packet, flow
//!   label the flow hash's low 20 bits ([`flow_label`]: one flow keeps one
//!   label, flows spread over the routers' ECMP paths and the backend's
//!   receive queues, as Katran does), payload length the inner packet's
//!   length, next header 41, hop limit 64.
//! - GUE over IPv6: the same outer header with next header 17, the UDP and
//!   GUE headers as over IPv4 (inner protocol 41), 52 bytes in all. UDP
//!   checksum 0: RFC 6935/6936 allow it for tunnel encapsulations over
//!   IPv6, and the receiver is our own `lb decap`, which strips the outer
//!   headers in XDP before the stack sees the UDP datagram (and so never
//!   checks it); the inner packet carries its own checksum. A receiver
//!   that hands the datagram to a UDP socket (Linux fou6) must accept zero
//!   checksums on it (`udp6zerocsumrx`). A full checksum would cost a pass
//!   over the whole inner packet in XDP for every packet.

use crate::{
    headers::{IP_DF, IPPROTO_UDP, Ipv4Hdr},
    icmp::ipv4_check,
    ipv6::{Addr6, Ipv6Hdr},
};
// The headers GUE puts on the wire, shared with the decapsulator's parse.
pub use crate::decap::{GueHdr, Ipv6Start, UdpHdr};

/// IP protocol number of IPv4 in IP (RFC 2003), and GUE's inner IPv4.
pub const IPPROTO_IPIP: u8 = 4;
/// IP protocol number of IPv6 in IP (RFC 2473), and GUE's inner IPv6.
pub const IPPROTO_IPV6: u8 = 41;

/// Bytes IPIP puts in front of the inner packet: one IPv4 header.
pub const IPIP_OVERHEAD: u16 = Ipv4Hdr::LEN as u16;
/// Bytes GUE puts in front of the inner packet: IPv4, UDP and GUE headers.
pub const GUE_OVERHEAD: u16 = core::mem::size_of::<GueHeaders>() as u16;
/// Bytes IP6IP6 puts in front of the inner packet: one IPv6 header.
pub const IP6IP6_OVERHEAD: u16 = Ipv6Hdr::LEN as u16;
/// Bytes GUE over IPv6 puts in front of the inner packet: IPv6, UDP and
/// GUE headers.
pub const GUE6_OVERHEAD: u16 = core::mem::size_of::<Gue6Headers>() as u16;
/// The IPv6 minimum link MTU (RFC 8200 §5): a host never sends smaller
/// packets whatever "packet too big" says (it may keep to 1280), so a
/// tunnel over IPv6 needs every link to its backends to carry 1280 bytes
/// plus its overhead (docs/architecture.md, "Tunnels").
pub const IPV6_MIN_MTU: u16 = 1280;
/// The GUE port backends listen on unless `[dataplane] gue-port` says
/// otherwise (Katran's default).
pub const GUE_DEFAULT_PORT: u16 = 6080;
/// The outer header's TTL: a fresh packet the LB sends, as a host would.
pub const OUTER_TTL: u8 = 64;
/// GUE source ports are `GUE_PORT_BASE + hash % GUE_PORTS`: the dynamic
/// range (RFC 6335), 49152-65535.
pub const GUE_PORT_BASE: u16 = 49152;
pub const GUE_PORTS: u32 = 16384;

/// Everything GUE puts between the Ethernet header and the inner packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GueHeaders {
    pub ip: Ipv4Hdr,
    pub udp: UdpHdr,
    pub gue: GueHdr,
}

/// Everything GUE over IPv6 puts between the Ethernet header and the
/// inner packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gue6Headers {
    pub ip: Ipv6Hdr,
    pub udp: UdpHdr,
    pub gue: GueHdr,
}

/// What GUE puts after the outer IPv6 header: UDP and GUE (12 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GueTail {
    pub udp: UdpHdr,
    pub gue: GueHdr,
}

/// The outer IPv4 header of a tunnel packet carrying `inner_len` bytes
/// of IP packet (`protocol`: 4 for IPIP, 17 for GUE; `overhead`: the
/// bytes the tunnel adds) from `source` to `destination` (raw network
/// order), checksum set.
#[inline(always)]
pub fn outer_ipv4(
    inner_len: u16,
    overhead: u16,
    tos: u8,
    protocol: u8,
    source: u32,
    destination: u32,
) -> Ipv4Hdr {
    let mut ip = Ipv4Hdr {
        version_ihl: 0x45,
        tos,
        tot_len: inner_len.wrapping_add(overhead).to_be(),
        id: 0,
        frag_off: IP_DF.to_be(),
        ttl: OUTER_TTL,
        protocol,
        check: 0,
        saddr: source,
        daddr: destination,
    };
    ip.check = ipv4_check(&ip);
    ip
}

/// IPIP's one header (see the module's doc): `inner_proto` is 4 for an
/// IPv4 packet inside (41 would carry IPv6, "6in4").
#[inline(always)]
pub fn ipip_header(
    inner_len: u16,
    tos: u8,
    inner_proto: u8,
    source: u32,
    destination: u32,
) -> Ipv4Hdr {
    outer_ipv4(
        inner_len,
        IPIP_OVERHEAD,
        tos,
        inner_proto,
        source,
        destination,
    )
}

/// GUE's headers (see the module's doc): `inner_proto` is 4 (IPv4) or 41
/// (IPv6), `source_port` comes from [`gue_source_port`] (host order),
/// `gue_port` is the backend's GUE port (raw network order).
#[inline(always)]
pub fn gue_headers(
    inner_len: u16,
    tos: u8,
    inner_proto: u8,
    source: u32,
    destination: u32,
    source_port: u16,
    gue_port: u16,
) -> GueHeaders {
    let udp_len = inner_len.wrapping_add(GUE_OVERHEAD - Ipv4Hdr::LEN as u16);
    GueHeaders {
        ip: outer_ipv4(
            inner_len,
            GUE_OVERHEAD,
            tos,
            IPPROTO_UDP,
            source,
            destination,
        ),
        udp: UdpHdr {
            source: source_port.to_be(),
            dest: gue_port,
            len: udp_len.to_be(),
            // No checksum (RFC 768, allowed over IPv4): the inner packet
            // carries its own, and the outer one would cost a pass over
            // the whole payload.
            check: 0,
        },
        gue: GueHdr {
            version_c_hlen: 0,
            proto: inner_proto,
            flags: 0,
        },
    }
}

/// The flow label of the outer IPv6 header of a flow whose hash is
/// `flow_hash` (host order): its low 20 bits. One flow keeps one label, so
/// routers' ECMP (which hash the label with the addresses, RFC 6438) keep
/// its packets on one path, and flows spread over the paths.
#[inline(always)]
pub const fn flow_label(flow_hash: u32) -> u32 {
    flow_hash & 0x000f_ffff
}

/// The first 8 bytes of the outer IPv6 header of a tunnel packet carrying
/// `inner_len` bytes of IP packet (`next_header`: 41 for IP6IP6, 17 for
/// GUE; `overhead`: the bytes the tunnel adds, this header's 40 included),
/// the flow label from `flow_hash`. The data plane writes the addresses
/// after it straight from its maps (no 40-byte header on its stack).
#[inline(always)]
pub fn outer_ipv6_start(
    inner_len: u16,
    overhead: u16,
    traffic_class: u8,
    next_header: u8,
    flow_hash: u32,
) -> Ipv6Start {
    let vtc_flow = 6u32 << 28 | (traffic_class as u32) << 20 | flow_label(flow_hash);
    Ipv6Start {
        vtc_flow: vtc_flow.to_be(),
        payload_len: inner_len
            .wrapping_add(overhead - Ipv6Hdr::LEN as u16)
            .to_be(),
        next_header,
        hop_limit: OUTER_TTL,
    }
}

/// The whole outer IPv6 header ([`outer_ipv6_start`]) from `source` to
/// `destination`.
#[inline(always)]
pub fn outer_ipv6(
    inner_len: u16,
    overhead: u16,
    traffic_class: u8,
    next_header: u8,
    flow_hash: u32,
    source: &Addr6,
    destination: &Addr6,
) -> Ipv6Hdr {
    let start = outer_ipv6_start(inner_len, overhead, traffic_class, next_header, flow_hash);
    Ipv6Hdr {
        vtc_flow: start.vtc_flow,
        payload_len: start.payload_len,
        next_header,
        hop_limit: start.hop_limit,
        saddr: *source,
        daddr: *destination,
    }
}

/// IP6IP6's one header (RFC 2473; see the module's doc).
#[inline(always)]
pub fn ip6ip6_header(
    inner_len: u16,
    traffic_class: u8,
    flow_hash: u32,
    source: &Addr6,
    destination: &Addr6,
) -> Ipv6Hdr {
    outer_ipv6(
        inner_len,
        IP6IP6_OVERHEAD,
        traffic_class,
        IPPROTO_IPV6,
        flow_hash,
        source,
        destination,
    )
}

/// What GUE over IPv6 puts after the outer IPv6 header (see the module's
/// doc): UDP from the [`gue_source_port`] of `flow_hash` to `gue_port`
/// (the backend's, raw network order), checksum 0; GUE with inner
/// protocol 41.
#[inline(always)]
pub fn gue6_tail(inner_len: u16, flow_hash: u32, gue_port: u16) -> GueTail {
    let udp_len = inner_len.wrapping_add(GUE6_OVERHEAD - Ipv6Hdr::LEN as u16);
    GueTail {
        udp: UdpHdr {
            source: gue_source_port(flow_hash).to_be(),
            dest: gue_port,
            len: udp_len.to_be(),
            // Zero (RFC 6935/6936, tunnels over IPv6): see the module's doc.
            check: 0,
        },
        gue: GueHdr {
            version_c_hlen: 0,
            proto: IPPROTO_IPV6,
            flags: 0,
        },
    }
}

/// GUE's headers over IPv6 whole: [`outer_ipv6`] and [`gue6_tail`].
#[inline(always)]
pub fn gue6_headers(
    inner_len: u16,
    traffic_class: u8,
    flow_hash: u32,
    source: &Addr6,
    destination: &Addr6,
    gue_port: u16,
) -> Gue6Headers {
    let tail = gue6_tail(inner_len, flow_hash, gue_port);
    Gue6Headers {
        ip: outer_ipv6(
            inner_len,
            GUE6_OVERHEAD,
            traffic_class,
            IPPROTO_UDP,
            flow_hash,
            source,
            destination,
        ),
        udp: tail.udp,
        gue: tail.gue,
    }
}

/// The GUE source port of a flow whose hash is `flow_hash`: every packet
/// of the flow (and the ICMP errors about it) gets the same port, so the
/// backend's NIC keeps the flow on one receive queue, and flows spread over
/// the queues (Katran's reason). Host order.
#[inline(always)]
pub const fn gue_source_port(flow_hash: u32) -> u16 {
    GUE_PORT_BASE + (flow_hash % GUE_PORTS) as u16
}

/// Does the inner packet plus the tunnel's `overhead` exceed `mtu`?
#[inline(always)]
pub const fn too_big(inner_len: u16, overhead: u16, mtu: u16) -> bool {
    inner_len as u32 + overhead as u32 > mtu as u32
}

/// The MTU a sender must keep to for its packets to fit the tunnel: the
/// next hop's less the overhead (what "fragmentation needed" tells it).
#[inline(always)]
pub const fn inner_mtu(mtu: u16, overhead: u16) -> u16 {
    mtu.saturating_sub(overhead)
}

/// Path MTU discovery beyond the LB's own link (docs/architecture.md,
/// "Path MTU beyond the next hop"). A router further on whose link to a
/// tunnel backend is smaller than the outer packet answers "fragmentation
/// needed" to the packet's source, the LB's tunnel source, not to the
/// client. The data plane (`lb-ebpf`'s `tunnel_icmp`) judges that message
/// here ([`judge_frag_needed`]), records the reported MTU for the backend
/// in `TUNNEL_PMTU` ([`TunnelPmtu`]), and the tunnel's too-big check uses
/// the smaller of the next hop's MTU and the learned one
/// ([`TunnelPmtu::live`]): the client's next too-big packet gets
/// "fragmentation needed" with the learned MTU less the overhead.
///
/// The learned MTU lives [`PMTU_EXPIRY_NS`] (10 minutes, the kernel's
/// `net.ipv4.route.mtu_expires` default), as the kernel's PMTU cache: a
/// path that grew back is used again after it.
pub const PMTU_EXPIRY_NS: u64 = 600 * 1_000_000_000;

/// The lowest path MTU a "fragmentation needed" can make the LB learn
/// (Linux's `net.ipv4.route.min_pmtu` default): a smaller reported MTU
/// (a forged message, or a broken router) is clamped to it, so no one can
/// shrink a tunnel's packets below 552 − overhead bytes.
pub const PMTU_FLOOR: u16 = 552;

/// `TUNNEL_PMTU` value, keyed by a tunnel backend's address (raw network
/// order). The agent writes one for every IPIP and GUE backend address
/// (its tunnel source and GUE port, nothing learned); the data plane only
/// updates existing ones, so a message about an address that is not a
/// current backend is refused.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TunnelPmtu {
    /// The LB's tunnel source to this backend (raw network order).
    pub source: u32,
    /// The GUE port (raw network order).
    pub gue_port: u16,
    /// The learned path MTU of the outer packets (host order); 0: none.
    pub mtu: u16,
    /// When it expires (`bpf_ktime_get_ns`, CLOCK_MONOTONIC).
    pub expires_ns: u64,
}

impl TunnelPmtu {
    /// The agent's entry for a backend reached from `source` (GUE port
    /// `gue_port`, both raw network order): nothing learned.
    pub const fn new(source: u32, gue_port: u16) -> Self {
        TunnelPmtu {
            source,
            gue_port,
            mtu: 0,
            expires_ns: 0,
        }
    }

    /// The learned path MTU at `now`, if any and not expired.
    #[inline(always)]
    pub const fn live(&self, now: u64) -> Option<u16> {
        if self.mtu != 0 && now < self.expires_ns {
            Some(self.mtu)
        } else {
            None
        }
    }
}

/// What a "fragmentation needed" to an LB address is to the tunnel code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PmtuJudgement {
    /// It does not quote one of our tunnel packets (the LB's own
    /// connections, health checks): the kernel's, untouched.
    NotATunnel,
    /// It quotes a tunnel packet but cannot be ours (its destination is
    /// not a current tunnel backend, or another source) or is not
    /// believable (no MTU, or one the quoted packet would have fit):
    /// counted, nothing learned.
    Refused,
    /// Learn `mtu` for the backend (until `now` + [`PMTU_EXPIRY_NS`]);
    /// `clamped`: the message said less than [`PMTU_FLOOR`].
    Learn { mtu: u16, clamped: bool },
}

/// The quoted packet's fields the judgement reads (raw network order but
/// for the lengths).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuotedOuter {
    /// The ICMP message's destination: the LB address it was sent to.
    pub icmp_daddr: u32,
    /// The ICMP's next-hop MTU (host order).
    pub next_hop_mtu: u16,
    /// The quoted outer header.
    pub outer: Ipv4Hdr,
    /// The quoted UDP destination port (raw; GUE's port for a GUE packet).
    pub udp_dport: u16,
}

/// Judges a "fragmentation needed" (ICMP 3/4) `q` sent to an LB address,
/// with `entry` the `TUNNEL_PMTU` entry of the quoted destination (`None`:
/// not a tunnel backend), at `now`. Only our tunnel packets are judged: the
/// quoted source is the address the message came to, no options (ours have
/// none), protocol 4 (IPIP) or UDP to the backend's GUE port. A new MTU is
/// never above a live learned one (a message can only lower it until it
/// expires) nor below [`PMTU_FLOOR`].
#[inline(always)]
pub fn judge_frag_needed(q: &QuotedOuter, entry: Option<&TunnelPmtu>, now: u64) -> PmtuJudgement {
    let outer = &q.outer;
    if outer.saddr != q.icmp_daddr || outer.version_ihl != 0x45 {
        return PmtuJudgement::NotATunnel;
    }
    let Some(entry) = entry else {
        // An IPIP packet from us to an address we tunnel nothing to, or
        // UDP (the LB's own, or a forgery): not a tunnel packet of ours.
        return if outer.protocol == IPPROTO_IPIP {
            PmtuJudgement::Refused
        } else {
            PmtuJudgement::NotATunnel
        };
    };
    match outer.protocol {
        IPPROTO_IPIP => {}
        IPPROTO_UDP if q.udp_dport == entry.gue_port => {}
        _ => return PmtuJudgement::NotATunnel,
    }
    if entry.source != outer.saddr {
        return PmtuJudgement::Refused;
    }
    // A router reports the MTU of the link the packet did not fit: one
    // at least as long as the quoted packet is not believable (RFC 1191
    // old routers report 0).
    let mtu = q.next_hop_mtu;
    if mtu == 0 || mtu >= u16::from_be(outer.tot_len) {
        return PmtuJudgement::Refused;
    }
    let clamped = mtu < PMTU_FLOOR;
    let mut learned = if clamped { PMTU_FLOOR } else { mtu };
    if let Some(live) = entry.live(now)
        && live < learned
    {
        learned = live;
    }
    PmtuJudgement::Learn {
        mtu: learned,
        clamped,
    }
}

/// The MTU an outer packet of `outer_len` bytes to a backend must keep
/// to: `Some(mtu)` when it is longer than the backend's live learned path
/// MTU (then "fragmentation needed" with `mtu` less the overhead).
#[inline(always)]
pub fn beyond_learned(entry: &TunnelPmtu, outer_len: u16, now: u64) -> Option<u16> {
    match entry.live(now) {
        Some(mtu) if outer_len > mtu => Some(mtu),
        _ => None,
    }
}

/// `TUNNEL_PMTU_STATS[i]` (per CPU): what the data plane did with the
/// "fragmentation needed" messages about our tunnel packets.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PmtuCounter {
    /// Accepted: the backend's path MTU learned (or kept, if lower).
    Learned = 0,
    /// Accepted, with an MTU below [`PMTU_FLOOR`] raised to it.
    Clamped = 1,
    /// Refused: not from one of our tunnels, or not believable.
    Refused = 2,
}

pub const PMTU_COUNTERS: u32 = 3;

const _: () = assert!(core::mem::size_of::<TunnelPmtu>() == 16);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), Copy, no implicit padding (size assert above).
    unsafe impl aya::Pod for super::TunnelPmtu {}
}

const _: () = assert!(core::mem::size_of::<UdpHdr>() == 8);
const _: () = assert!(core::mem::size_of::<GueHdr>() == 4);
const _: () = assert!(GUE_OVERHEAD == 32);
const _: () = assert!(IPIP_OVERHEAD == 20);
const _: () = assert!(IP6IP6_OVERHEAD == 40 && GUE6_OVERHEAD == 52);
const _: () = assert!(core::mem::size_of::<GueTail>() == 12);
const _: () = assert!(GUE_PORT_BASE as u32 + GUE_PORTS == 65536);

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{IpNumber, Ipv4HeaderSlice, Ipv6HeaderSlice, PacketBuilder, UdpHeaderSlice};
    use proptest::prelude::*;

    fn bytes<T: Copy>(v: &T) -> Vec<u8> {
        // SAFETY: plain-data header structs without padding (size asserts).
        unsafe { core::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }
            .to_vec()
    }

    fn addr(a: [u8; 4]) -> u32 {
        u32::from_ne_bytes(a)
    }

    /// A client's TCP packet to the VIP, as IP bytes.
    fn inner(client: [u8; 4], vip: [u8; 4], tos: u8, payload: usize) -> Vec<u8> {
        let mut out = Vec::new();
        PacketBuilder::ipv4(client, vip, 61)
            .tcp(40_000, 80, 1, 1000)
            .write(&mut out, &vec![7u8; payload])
            .expect("tcp");
        out[1] = tos;
        out
    }

    proptest! {
        #[test]
        fn the_ipip_header_is_rfc_2003s(
            src in any::<[u8; 4]>(), dst in any::<[u8; 4]>(), tos in any::<u8>(),
            payload in 0usize..1400,
        ) {
            let packet = inner([198, 18, 0, 1], [198, 18, 0, 10], tos, payload);
            let hdr = ipip_header(packet.len() as u16, tos, IPPROTO_IPIP, addr(src), addr(dst));
            let mut frame = bytes(&hdr);
            frame.extend_from_slice(&packet);
            let outer = Ipv4HeaderSlice::from_slice(&frame).expect("outer").to_header();
            prop_assert_eq!(outer.header_checksum, outer.calc_header_checksum());
            prop_assert_eq!((outer.source, outer.destination), (src, dst));
            prop_assert_eq!(outer.protocol, IpNumber::IPV4);
            prop_assert_eq!(outer.total_len as usize, packet.len() + 20);
            prop_assert_eq!(outer.time_to_live, OUTER_TTL);
            prop_assert!(outer.dont_fragment);
            prop_assert_eq!(outer.identification, 0);
            prop_assert_eq!(outer.dscp.value() << 2 | outer.ecn.value(), tos);
            prop_assert!(outer.options.is_empty());
            prop_assert_eq!(&frame[20..], &packet[..]);
        }

        #[test]
        fn the_gue_headers_are_variant_0_over_udp(
            src in any::<[u8; 4]>(), dst in any::<[u8; 4]>(), tos in any::<u8>(),
            payload in 0usize..1400, hash in any::<u32>(), port in 1u16..,
        ) {
            let packet = inner([198, 18, 0, 1], [198, 18, 0, 10], tos, payload);
            let sport = gue_source_port(hash);
            let hdrs = gue_headers(
                packet.len() as u16, tos, IPPROTO_IPIP, addr(src), addr(dst), sport, port.to_be(),
            );
            let mut frame = bytes(&hdrs);
            prop_assert_eq!(frame.len(), GUE_OVERHEAD as usize);
            frame.extend_from_slice(&packet);
            let outer = Ipv4HeaderSlice::from_slice(&frame).expect("outer").to_header();
            prop_assert_eq!(outer.header_checksum, outer.calc_header_checksum());
            prop_assert_eq!((outer.source, outer.destination), (src, dst));
            prop_assert_eq!(outer.protocol, IpNumber::UDP);
            prop_assert_eq!(outer.total_len as usize, packet.len() + 32);
            prop_assert!(outer.dont_fragment);
            prop_assert_eq!(outer.time_to_live, OUTER_TTL);
            let udp = UdpHeaderSlice::from_slice(&frame[20..]).expect("udp").to_header();
            prop_assert_eq!((udp.source_port, udp.destination_port), (sport, port));
            prop_assert_eq!(udp.length as usize, packet.len() + 12);
            prop_assert_eq!(udp.checksum, 0);
            prop_assert!((49152..=65535).contains(&sport));
            prop_assert_eq!(&frame[28..32], &[0, 4, 0, 0]);
            prop_assert_eq!(&frame[32..], &packet[..]);
        }
    }

    fn addr6(a: [u8; 16]) -> Addr6 {
        let mut out = [0u32; 4];
        for (i, w) in out.iter_mut().enumerate() {
            *w = u32::from_ne_bytes([a[4 * i], a[4 * i + 1], a[4 * i + 2], a[4 * i + 3]]);
        }
        out
    }

    /// A client's TCP packet to an IPv6 VIP, as IP bytes.
    fn inner6(traffic_class: u8, payload: usize) -> Vec<u8> {
        let mut out = Vec::new();
        let client = [0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
        let vip = [0x20, 1, 0xd, 0xb8, 0, 0x18, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10];
        PacketBuilder::ipv6(client, vip, 61)
            .tcp(40_000, 80, 1, 1000)
            .write(&mut out, &vec![7u8; payload])
            .expect("tcp");
        // Traffic class: the low nibble of byte 0 and the high of byte 1.
        out[0] = 0x60 | traffic_class >> 4;
        out[1] = (traffic_class & 0x0f) << 4 | (out[1] & 0x0f);
        out
    }

    proptest! {
        #[test]
        fn the_ip6ip6_header_is_rfc_2473s(
            src in any::<[u8; 16]>(), dst in any::<[u8; 16]>(), tc in any::<u8>(),
            payload in 0usize..1400, hash in any::<u32>(),
        ) {
            let packet = inner6(tc, payload);
            let hdr = ip6ip6_header(packet.len() as u16, tc, hash, &addr6(src), &addr6(dst));
            let mut frame = bytes(&hdr);
            prop_assert_eq!(frame.len(), IP6IP6_OVERHEAD as usize);
            frame.extend_from_slice(&packet);
            let outer = Ipv6HeaderSlice::from_slice(&frame).expect("outer").to_header();
            prop_assert_eq!((outer.source, outer.destination), (src, dst));
            prop_assert_eq!(outer.next_header.0, IPPROTO_IPV6);
            prop_assert_eq!(outer.payload_length as usize, packet.len());
            prop_assert_eq!(outer.hop_limit, OUTER_TTL);
            prop_assert_eq!(outer.traffic_class, tc);
            prop_assert_eq!(outer.flow_label.value(), hash & 0xf_ffff);
            prop_assert_eq!(&frame[40..], &packet[..]);
            let inner = Ipv6HeaderSlice::from_slice(&frame[40..]).expect("inner").to_header();
            prop_assert_eq!(inner.traffic_class, tc);
        }

        #[test]
        fn the_gue6_headers_are_variant_0_over_udp_over_ipv6(
            src in any::<[u8; 16]>(), dst in any::<[u8; 16]>(), tc in any::<u8>(),
            payload in 0usize..1400, hash in any::<u32>(), port in 1u16..,
        ) {
            let packet = inner6(tc, payload);
            let hdrs = gue6_headers(
                packet.len() as u16, tc, hash, &addr6(src), &addr6(dst), port.to_be(),
            );
            let mut frame = bytes(&hdrs);
            prop_assert_eq!(frame.len(), GUE6_OVERHEAD as usize);
            frame.extend_from_slice(&packet);
            let outer = Ipv6HeaderSlice::from_slice(&frame).expect("outer").to_header();
            prop_assert_eq!((outer.source, outer.destination), (src, dst));
            prop_assert_eq!(outer.next_header, IpNumber::UDP);
            prop_assert_eq!(outer.payload_length as usize, packet.len() + 12);
            prop_assert_eq!(outer.hop_limit, OUTER_TTL);
            prop_assert_eq!(outer.traffic_class, tc);
            prop_assert_eq!(outer.flow_label.value(), hash & 0xf_ffff);
            let udp = UdpHeaderSlice::from_slice(&frame[40..]).expect("udp").to_header();
            prop_assert_eq!(
                (udp.source_port, udp.destination_port),
                (gue_source_port(hash), port)
            );
            prop_assert_eq!(udp.length as usize, packet.len() + 12);
            prop_assert_eq!(udp.checksum, 0);
            prop_assert_eq!(&frame[48..52], &[0, 41, 0, 0]);
            prop_assert_eq!(&frame[52..], &packet[..]);
        }
    }

    #[test]
    fn the_ipv6_mtu_rule_counts_the_larger_overheads() {
        assert!(!too_big(1460, IP6IP6_OVERHEAD, 1500));
        assert!(too_big(1461, IP6IP6_OVERHEAD, 1500));
        assert!(!too_big(1448, GUE6_OVERHEAD, 1500));
        assert!(too_big(1449, GUE6_OVERHEAD, 1500));
        assert_eq!(inner_mtu(1500, GUE6_OVERHEAD), 1448);
        // A 1280-byte link cannot carry a 1280-byte client packet in a
        // tunnel: the answer's MTU is below what IPv6 hosts keep to.
        assert!(inner_mtu(IPV6_MIN_MTU, IP6IP6_OVERHEAD) < IPV6_MIN_MTU);
    }

    #[test]
    fn gue_carries_ipv6_as_protocol_41() {
        let h = gue_headers(100, 0, IPPROTO_IPV6, 1, 2, 50_000, 6080u16.to_be());
        assert_eq!(bytes(&h.gue), [0, 41, 0, 0]);
    }

    #[test]
    fn the_source_port_is_one_per_flow_and_flows_spread() {
        use crate::{FlowKey, hash::flow_hash};
        let key = |port: u16| FlowKey {
            saddr: addr([198, 18, 0, 1]),
            daddr: addr([198, 18, 0, 10]),
            sport: port.to_be(),
            dport: 80u16.to_be(),
            protocol: 6,
            _pad0: 0,
            _pad1: 0,
        };
        assert_eq!(
            gue_source_port(flow_hash(&key(40_000))),
            gue_source_port(flow_hash(&key(40_000)))
        );
        // 16 000 flows over the 16 384 ports: about 10 000 distinct ones
        // if spread evenly (a constant or a few would be a handful).
        let ports: std::collections::BTreeSet<u16> = (1024..17_024)
            .map(|p| gue_source_port(flow_hash(&key(p))))
            .collect();
        assert!(ports.len() > 9_000, "{} distinct ports", ports.len());
        assert_eq!(gue_source_port(0), 49152);
        assert_eq!(gue_source_port(u32::MAX), 65535);
    }

    fn frag_needed(next_hop_mtu: u16, protocol: u8, udp_dport: u16) -> QuotedOuter {
        QuotedOuter {
            icmp_daddr: addr([198, 19, 2, 1]),
            next_hop_mtu,
            outer: outer_ipv4(
                1480,
                IPIP_OVERHEAD,
                0,
                protocol,
                addr([198, 19, 2, 1]),
                addr([198, 19, 0, 11]),
            ),
            udp_dport,
        }
    }

    const GUE: u16 = GUE_DEFAULT_PORT.to_be();

    fn backend() -> TunnelPmtu {
        TunnelPmtu::new(addr([198, 19, 2, 1]), GUE)
    }

    #[test]
    fn a_routers_frag_needed_about_our_tunnel_is_learned() {
        let entry = backend();
        for (protocol, port) in [(IPPROTO_IPIP, 0), (IPPROTO_UDP, GUE)] {
            assert_eq!(
                judge_frag_needed(&frag_needed(1400, protocol, port), Some(&entry), 5),
                PmtuJudgement::Learn {
                    mtu: 1400,
                    clamped: false
                }
            );
        }
    }

    #[test]
    fn only_our_tunnel_packets_are_judged() {
        let entry = backend();
        // The LB's own UDP (a health check) to the backend, another port.
        let own_udp = frag_needed(1400, IPPROTO_UDP, 5353u16.to_be());
        assert_eq!(
            judge_frag_needed(&own_udp, Some(&entry), 5),
            PmtuJudgement::NotATunnel
        );
        // TCP from the LB (its own connection).
        let tcp = frag_needed(1400, 6, 0);
        assert_eq!(
            judge_frag_needed(&tcp, Some(&entry), 5),
            PmtuJudgement::NotATunnel
        );
        // Quoting a packet another host sent.
        let mut other = frag_needed(1400, IPPROTO_IPIP, 0);
        other.icmp_daddr = addr([198, 19, 2, 9]);
        assert_eq!(
            judge_frag_needed(&other, Some(&entry), 5),
            PmtuJudgement::NotATunnel
        );
        // Quoted options: never ours.
        let mut options = frag_needed(1400, IPPROTO_IPIP, 0);
        options.outer.version_ihl = 0x46;
        assert_eq!(
            judge_frag_needed(&options, Some(&entry), 5),
            PmtuJudgement::NotATunnel
        );
        // UDP to a non-backend: not a tunnel packet of ours.
        let gue = frag_needed(1400, IPPROTO_UDP, GUE);
        assert_eq!(judge_frag_needed(&gue, None, 5), PmtuJudgement::NotATunnel);
    }

    #[test]
    fn forged_or_unbelievable_messages_are_refused() {
        let entry = backend();
        // IPIP to an address that is not a current tunnel backend.
        let ipip = frag_needed(1400, IPPROTO_IPIP, 0);
        assert_eq!(judge_frag_needed(&ipip, None, 5), PmtuJudgement::Refused);
        // A backend reached from another tunnel source.
        let other = TunnelPmtu::new(addr([198, 19, 2, 7]), GUE);
        assert_eq!(
            judge_frag_needed(&ipip, Some(&other), 5),
            PmtuJudgement::Refused
        );
        // No MTU (RFC 1191's old routers), or one the packet fitted.
        for mtu in [0, 1500, 1501, u16::MAX] {
            assert_eq!(
                judge_frag_needed(&frag_needed(mtu, IPPROTO_IPIP, 0), Some(&entry), 5),
                PmtuJudgement::Refused,
                "{mtu}"
            );
        }
        assert_eq!(
            judge_frag_needed(&frag_needed(1499, IPPROTO_IPIP, 0), Some(&entry), 5),
            PmtuJudgement::Learn {
                mtu: 1499,
                clamped: false
            }
        );
    }

    #[test]
    fn a_tiny_mtu_is_clamped_to_the_floor_and_a_message_only_lowers() {
        let entry = backend();
        assert_eq!(
            judge_frag_needed(&frag_needed(68, IPPROTO_IPIP, 0), Some(&entry), 5),
            PmtuJudgement::Learn {
                mtu: PMTU_FLOOR,
                clamped: true
            }
        );
        let learned = TunnelPmtu {
            mtu: 1300,
            expires_ns: 100,
            ..entry
        };
        // Live: a larger report keeps 1300; a smaller one lowers it.
        assert_eq!(
            judge_frag_needed(&frag_needed(1400, IPPROTO_IPIP, 0), Some(&learned), 99),
            PmtuJudgement::Learn {
                mtu: 1300,
                clamped: false
            }
        );
        assert_eq!(
            judge_frag_needed(&frag_needed(1200, IPPROTO_IPIP, 0), Some(&learned), 99),
            PmtuJudgement::Learn {
                mtu: 1200,
                clamped: false
            }
        );
        // Expired: the new report stands.
        assert_eq!(
            judge_frag_needed(&frag_needed(1400, IPPROTO_IPIP, 0), Some(&learned), 100),
            PmtuJudgement::Learn {
                mtu: 1400,
                clamped: false
            }
        );
    }

    #[test]
    fn a_learned_mtu_holds_until_it_expires() {
        let learned = TunnelPmtu {
            mtu: 1400,
            expires_ns: 1000,
            ..backend()
        };
        assert_eq!(beyond_learned(&learned, 1401, 999), Some(1400));
        assert_eq!(beyond_learned(&learned, 1400, 999), None);
        assert_eq!(beyond_learned(&learned, 1401, 1000), None);
        assert_eq!(beyond_learned(&backend(), 9000, 0), None);
        assert_eq!(learned.live(999), Some(1400));
        assert_eq!(learned.live(1000), None);
        assert_eq!(PMTU_EXPIRY_NS, 600_000_000_000);
    }

    #[test]
    fn the_mtu_rule_counts_the_overhead() {
        assert!(!too_big(1480, IPIP_OVERHEAD, 1500));
        assert!(too_big(1481, IPIP_OVERHEAD, 1500));
        assert!(!too_big(1468, GUE_OVERHEAD, 1500));
        assert!(too_big(1469, GUE_OVERHEAD, 1500));
        assert!(too_big(u16::MAX, GUE_OVERHEAD, u16::MAX));
        assert_eq!(inner_mtu(1500, GUE_OVERHEAD), 1468);
        assert_eq!(inner_mtu(1500, IPIP_OVERHEAD), 1480);
        assert_eq!(inner_mtu(10, GUE_OVERHEAD), 0);
    }
}
