//! Parsing (step 1 of the packet path): what a frame is to the balancer.
//! The VIP rules (`parse_l4`) for packets with ports, the TCP numbers the
//! flow rules read, what the stages for packets without ports hand back
//! ([`Found`]), and the tuple tracing and capture report.

use aya_ebpf::programs::XdpContext;
use lb_common::{
    Flow,
    family::{Family, FlowTuple, V4},
    headers::{
        ETH_P_IPV4_RAW, EthHdr, IPPROTO_TCP, Ipv4Hdr, Ipv4Shape, L4Ports, TCP_FLAGS_OFF,
        TCP_SEQ_OFF, TcpNumbers, l4_layout,
    },
};

use crate::{
    flows::Table,
    mem::header,
    verdict::{Outcome, drop, pass},
};
use lb_common::Verdict;

/// Pointers into one TCP/UDP frame of family `F` (fixed IP header), and
/// where its transport header is: `l4` its offset in the frame, `protocol`
/// its protocol (IPv4: after the fixed header, the header's protocol;
/// IPv6: where the extension-header walk ended).
pub(crate) struct Packet<F: Family> {
    pub(crate) eth: *mut EthHdr,
    pub(crate) ip: *mut F::IpHdr,
    pub(crate) ports: *mut L4Ports,
    pub(crate) l4_check: *mut u16,
    pub(crate) l4: usize,
    pub(crate) protocol: u8,
}

/// A packet without ports of its own that belongs to a flow, as a stage
/// (`frag`, `icmp`) found it: the path admits and sends it. `L` is what it
/// carries in place of ports ([`Fragment`] or [`Quote`]).
pub(crate) struct Found<F: Family, L> {
    pub(crate) eth: *mut EthHdr,
    pub(crate) ip: *mut F::IpHdr,
    /// Its tuple as the flow's packets arrive.
    pub(crate) key: F::FlowKey,
    /// A copy of the flow's entry (its next hop is not worth caching).
    pub(crate) flow: Flow,
    pub(crate) table: Table,
    /// When it was looked up (ticks).
    pub(crate) now: u32,
    pub(crate) l4: L,
}

/// A fragment after the first: no L4 header in the frame. Its flow's ports
/// (from the first fragment), copied: the flow's port and L4 checksum
/// rewrite lands in the copy and goes nowhere (the first fragment carried
/// it).
pub(crate) struct Fragment {
    pub(crate) ports: L4Ports,
}

/// An ICMP error quoting a packet of the flow: the quoted IP header and
/// ports, and the ICMP checksum that covers them.
pub(crate) struct Quote<F: Family> {
    pub(crate) quoted: *mut F::IpHdr,
    pub(crate) ports: *mut L4Ports,
    pub(crate) icmp_check: *mut u16,
}

/// What a packet without ports is to the path, by its IP header alone.
pub(crate) enum PortLess {
    /// It has ports (or is nothing the stages look at).
    No,
    /// A fragment after the first (`frag`).
    LaterFragment,
    /// An ICMP message (`icmp`: maybe an error quoting a flow).
    Icmp,
}

/// What the flow rules read of a TCP segment (all zero for UDP).
pub(crate) struct Segment {
    pub(crate) flags: u8,
    /// Sequence and acknowledgement numbers, host order.
    pub(crate) seq: u32,
    pub(crate) ack: u32,
}

/// The VIP rules: what an IPv4 packet to a VIP must look like to be
/// balanced (`Ipv4Hdr::shape`, the one validity check).
#[inline(always)]
pub(crate) fn parse_l4(
    ctx: &XdpContext,
    eth: *mut EthHdr,
    ip: *mut Ipv4Hdr,
) -> Result<Packet<V4>, Outcome> {
    // SAFETY: `ip` was bounds-checked by the caller. A reference, not a
    // copy: copying the packed header became an out-of-line memmove.
    let hdr = unsafe { &*ip };
    match hdr.shape(ip_bytes(ctx)) {
        Ipv4Shape::Plain => {}
        Ipv4Shape::Malformed => return Err(drop(Verdict::DropMalformed)),
        Ipv4Shape::Options => return Err(drop(Verdict::DropIpOptions)),
    }
    let tot_len = u16::from_be(hdr.tot_len) as usize;
    // First fragments carry the ports and are balanced like any packet; a
    // later one reaches this only when its first was not seen.
    if hdr.is_later_fragment() {
        return Err(drop(Verdict::DropFragment));
    }
    let Some((l4_len, check_off)) = l4_layout(hdr.protocol) else {
        return Err(pass(Verdict::PassOtherProtocol));
    };
    let l4 = EthHdr::LEN + Ipv4Hdr::LEN;
    if tot_len < Ipv4Hdr::LEN + l4_len || ctx.data() + l4 + l4_len > ctx.data_end() {
        return Err(drop(Verdict::DropTruncatedL4));
    }
    let (Some(ports), Some(l4_check)) = (
        header::<L4Ports>(ctx, l4),
        header::<u16>(ctx, l4 + check_off),
    ) else {
        return Err(drop(Verdict::DropTruncatedL4));
    };
    Ok(Packet {
        eth,
        ip,
        ports,
        l4_check,
        l4,
        protocol: hdr.protocol,
    })
}

/// An IPv4 header the VIP rules accept (`Ipv4Shape::Plain`); anything else
/// is left to `parse_l4`.
#[inline(always)]
pub(crate) fn plain_ipv4(ctx: &XdpContext, hdr: &Ipv4Hdr) -> bool {
    hdr.shape(ip_bytes(ctx)) == Ipv4Shape::Plain
}

/// The frame's bytes after its Ethernet header.
#[inline(always)]
fn ip_bytes(ctx: &XdpContext) -> usize {
    ctx.data_end() - ctx.data() - EthHdr::LEN
}

#[inline(always)]
pub(crate) fn flow_key<F: Family>(pkt: &Packet<F>) -> F::FlowKey {
    // SAFETY: every pointer in `Packet` was bounds-checked by `parse_l4`.
    let (ip, ports) = unsafe { (&*pkt.ip, &*pkt.ports) };
    F::flow_key_with(ip, pkt.protocol, ports)
}

/// The TCP flags and numbers of a TCP packet whose TCP header is at `l4`
/// (`Packet::l4`: IPv4's VIP traffic has a fixed IP header, so a constant;
/// `parse_l4` checked it is whole), zero for UDP.
#[inline(always)]
pub(crate) fn tcp_segment<F: Family>(ctx: &XdpContext, l4: usize, key: &F::FlowKey) -> Segment {
    let mut seg = Segment {
        flags: 0,
        seq: 0,
        ack: 0,
    };
    if key.protocol() != IPPROTO_TCP {
        return seg;
    }
    let tcp = l4;
    if let (Some(flags), Some(numbers)) = (
        header::<u8>(ctx, tcp + TCP_FLAGS_OFF),
        header::<TcpNumbers>(ctx, tcp + TCP_SEQ_OFF),
    ) {
        // SAFETY: `header` checked the bounds against data_end.
        let (flags, numbers) = unsafe { (*flags, &*numbers) };
        seg.flags = flags;
        seg.seq = u32::from_be(numbers.seq);
        seg.ack = u32::from_be(numbers.ack);
    }
    seg
}

/// A frame's addresses and ports as the program left it, for tracing and
/// capture: zeros where it has none (not IPv4, cut short; no ports with
/// options, on a later fragment, or another protocol).
#[derive(Default)]
pub(crate) struct FrameTuple {
    /// Raw network order, as in the frame (0 if cut before it).
    pub(crate) ether_type: u16,
    pub(crate) saddr: u32,
    pub(crate) daddr: u32,
    pub(crate) protocol: u8,
    pub(crate) ports: bool,
    pub(crate) sport: u16,
    pub(crate) dport: u16,
}

/// Reads a frame's [`FrameTuple`] (each header bounds-checked).
#[inline(always)]
pub(crate) fn frame_tuple(ctx: &XdpContext) -> FrameTuple {
    let mut t = FrameTuple::default();
    let Some(eth) = header::<EthHdr>(ctx, 0) else {
        return t;
    };
    // SAFETY: bounds-checked by `header`.
    t.ether_type = unsafe { (*eth).ether_type };
    if t.ether_type != ETH_P_IPV4_RAW {
        return t;
    }
    let Some(ip) = header::<Ipv4Hdr>(ctx, EthHdr::LEN) else {
        return t;
    };
    // SAFETY: bounds-checked by `header`; a reference, not a copy.
    let hdr = unsafe { &*ip };
    (t.saddr, t.daddr, t.protocol) = (hdr.saddr, hdr.daddr, hdr.protocol);
    // Ports only where the balancer itself would read them.
    if hdr.carries_ports()
        && let Some(ports) = header::<L4Ports>(ctx, EthHdr::LEN + Ipv4Hdr::LEN)
    {
        // SAFETY: bounds-checked by `header`.
        (t.sport, t.dport) = unsafe { ((*ports).source, (*ports).dest) };
        t.ports = true;
    }
    t
}
