//! ICMP errors that quote a flow: which flow an error belongs to, and what
//! of it the translation rewrites (the path admits it and `transmit` sends
//! it; the header rewrites and checksum arithmetic are in
//! `lb_common::icmp`, tested on the host).
//!
//! An error quotes the packet that caused it, which travelled the other way:
//! its swapped tuple is the flow's key. A client's error about a VIP's
//! packet (outer destination the VIP) goes to the flow's backend: in NAT
//! with the outer destination, the quoted source address and port and the
//! checksums rewritten (the quoted L4 checksum is left, see
//! `lb_common::icmp`); in DSR unchanged but for the MACs. A backend's error
//! about a NAT flow's packet goes to the client as the VIP's. Echo and other
//! ICMP are not ours: the VIP rules pass them to the kernel (ping the VIP).

use aya_ebpf::programs::XdpContext;
use lb_common::{
    FlowKey,
    family::V4,
    headers::{EthHdr, Ipv4Hdr, L4Ports},
    icmp::{IcmpHdr, quotes_a_flow},
};

use crate::{
    family::found,
    mem::header,
    parse::{Found, Quote, plain_ipv4},
};

const ICMP_OFF: usize = EthHdr::LEN + Ipv4Hdr::LEN;
const QUOTED_OFF: usize = ICMP_OFF + IcmpHdr::LEN;
const QUOTED_PORTS_OFF: usize = QUOTED_OFF + Ipv4Hdr::LEN;
/// The end of what the translator reads and rewrites: the quoted ports.
const QUOTED_END: usize = QUOTED_PORTS_OFF + size_of::<L4Ports>();

/// An ICMP error quoting a flow's packet: the flow, and the quote to
/// rewrite. `None`: not an error about one of our flows.
#[inline(always)]
pub(crate) fn error_of_flow(
    ctx: &XdpContext,
    eth: *mut EthHdr,
    ip: *mut Ipv4Hdr,
) -> Option<Found<V4, Quote<V4>>> {
    // SAFETY: the caller bounds-checked the fixed IPv4 header.
    let hdr = unsafe { &*ip };
    if !plain_ipv4(ctx, hdr) || hdr.is_fragment() {
        return None;
    }
    // Everything read and rewritten below must lie within the IP total
    // length: bytes past it (Ethernet padding, trailing garbage) are not
    // the message, and the ICMP checksum does not cover them. A quote cut
    // short by it is not translated.
    if (u16::from_be(hdr.tot_len) as usize) < QUOTED_END - EthHdr::LEN {
        return None;
    }
    let icmp = header::<IcmpHdr>(ctx, ICMP_OFF)?;
    // SAFETY: `header` checked the bounds of each.
    if !quotes_a_flow(unsafe { (*icmp).kind }) {
        return None;
    }
    let quoted = header::<Ipv4Hdr>(ctx, QUOTED_OFF)?;
    let ports = header::<L4Ports>(ctx, QUOTED_PORTS_OFF)?;
    let (q, qp) = unsafe { (&*quoted, &*ports) };
    // A router's "fragmentation needed" about our own tunnel packet: its
    // MTU is the tunnel backend's path's (`tunnel_icmp`), not a flow's.
    if crate::tunnel_icmp::learn(hdr, unsafe { &*icmp }, q, qp) {
        return None;
    }
    // The error goes back to the quoted packet's sender; quoted options
    // would move the ports, and a quoted later fragment has none.
    if hdr.daddr != q.saddr || !q.carries_ports() {
        return None;
    }
    let key = FlowKey {
        saddr: q.daddr,
        daddr: q.saddr,
        sport: qp.dest,
        dport: qp.source,
        protocol: q.protocol,
        _pad0: 0,
        _pad1: 0,
    };
    found(
        eth,
        ip,
        key,
        Quote {
            quoted,
            ports,
            // SAFETY: within the bounds-checked ICMP header.
            icmp_check: unsafe { &raw mut (*icmp).check },
        },
    )
}
