//! ICMP in the packet path: errors that quote a flow go to that flow's
//! other end, and packets too big for their next hop get "fragmentation
//! needed" (the header rewrites and checksum arithmetic are in
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

use aya_ebpf::{
    bindings::xdp_action,
    helpers::generated::{bpf_csum_diff, bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use lb_common::{
    Flow, FlowKey, MODE_DSR, NextHop, Verdict,
    flow::REPLY,
    headers::{EthHdr, Ipv4Hdr, L4Ports, l4_layout},
    icmp::{
        IcmpHdr, TOO_BIG_QUOTE, finish, quotes_a_flow, rewrite_quoted_destination,
        rewrite_quoted_source, set_destination, set_source, too_big_icmp, too_big_ip,
    },
    rewrite::decrement_ttl,
};

use crate::{
    BACKEND_STATS, BACKENDS, FIB_SUCCESS, Outcome, Packet, SERVICE_CONF, SERVICE_STATS, count,
    drop,
    frag::{flow_of, plain_ipv4},
    header, next_hop, pass, send,
};

const ICMP_OFF: usize = EthHdr::LEN + Ipv4Hdr::LEN;
const QUOTED_OFF: usize = ICMP_OFF + IcmpHdr::LEN;
const QUOTED_PORTS_OFF: usize = QUOTED_OFF + Ipv4Hdr::LEN;
/// The end of what the translator reads and rewrites: the quoted ports.
const QUOTED_END: usize = QUOTED_PORTS_OFF + size_of::<L4Ports>();

/// An ICMP error quoting a flow's packet: translated and forwarded to the
/// flow's other end. `None`: not an error about one of our flows.
#[inline(always)]
pub(crate) fn error_of_flow(
    ctx: &XdpContext,
    eth: *mut EthHdr,
    ip: *mut Ipv4Hdr,
) -> Option<Outcome> {
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
    // The error goes back to the quoted packet's sender; quoted options
    // would move the ports, and a quoted later fragment has none.
    if hdr.daddr != q.saddr
        || q.header_len() != Ipv4Hdr::LEN
        || q.is_later_fragment()
        || l4_layout(q.protocol).is_none()
    {
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
    let pkt = Packet {
        eth,
        ip,
        ports,
        // SAFETY: within the bounds-checked ICMP header.
        l4_check: unsafe { &raw mut (*icmp).check },
    };
    let (mut flow, _) = flow_of(&key, crate::flows::now())?;
    Some(if flow.direction == REPLY {
        to_client(ctx, &pkt, quoted, &mut flow)
    } else {
        to_backend(ctx, &pkt, quoted, &mut flow)
    })
}

/// A client's error about a VIP's packet, to the flow's backend. Anything
/// that keeps it from leaving at once (no next hop yet, TTL) hands it to the
/// kernel untouched, as before this path existed.
#[inline(always)]
fn to_backend(ctx: &XdpContext, pkt: &Packet, quoted: *mut Ipv4Hdr, flow: &mut Flow) -> Outcome {
    let Some(conf) = SERVICE_CONF.get(flow.service_id) else {
        return pass(Verdict::PassNoService);
    };
    if conf.enabled == 0 {
        return pass(Verdict::PassNoService);
    }
    let Some(backend) = BACKENDS.get(flow.backend_id) else {
        return drop(Verdict::DropNoBackend);
    };
    // SAFETY: bounds-checked by `error_of_flow`; nothing else aliases them.
    let (ip, check, q, ports) = unsafe {
        (
            &mut *pkt.ip,
            &mut *pkt.l4_check,
            &mut *quoted,
            &mut *pkt.ports,
        )
    };
    if ip.ttl <= 1 {
        return pass(Verdict::PassKernelForward);
    }
    if next_hop(ctx, ip, ip.saddr, backend.addr, &mut flow.next_hop) != FIB_SUCCESS {
        return pass(Verdict::PassKernelForward);
    }
    if conf.mode != MODE_DSR {
        set_destination(ip, backend.addr);
        rewrite_quoted_source(check, q, ports, backend.addr, backend.port);
        decrement_ttl(ip);
    }
    deliver(ctx, pkt, flow.service_id, flow.backend_id, &flow.next_hop)
}

/// A backend's (or a router's behind it) error about a NAT flow's packet,
/// to the client, as the VIP's.
#[inline(always)]
fn to_client(ctx: &XdpContext, pkt: &Packet, quoted: *mut Ipv4Hdr, restore: &mut Flow) -> Outcome {
    // SAFETY: bounds-checked by `error_of_flow`; nothing else aliases them.
    let (ip, check, q, ports) = unsafe {
        (
            &mut *pkt.ip,
            &mut *pkt.l4_check,
            &mut *quoted,
            &mut *pkt.ports,
        )
    };
    if ip.ttl <= 1 {
        return pass(Verdict::PassKernelForward);
    }
    let (vip, vport) = (restore.vip, restore.vport);
    if next_hop(ctx, ip, vip, ip.daddr, &mut restore.next_hop) != FIB_SUCCESS {
        return pass(Verdict::PassKernelForward);
    }
    // From the backend itself: the client knows it as the VIP. A router's
    // error keeps its own source.
    if ip.saddr == q.daddr {
        set_source(ip, vip);
    }
    rewrite_quoted_destination(check, q, ports, vip, vport);
    decrement_ttl(ip);
    deliver(
        ctx,
        pkt,
        restore.service_id,
        restore.backend_id,
        &restore.next_hop,
    )
}

/// Counts a translated error as its flow's traffic and sends it on.
#[inline(always)]
fn deliver(
    ctx: &XdpContext,
    pkt: &Packet,
    service_id: u32,
    backend_id: u32,
    next_hop: &NextHop,
) -> Outcome {
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    count(&SERVICE_STATS, service_id, 1, bytes);
    count(&BACKEND_STATS, backend_id, 1, bytes);
    send(ctx, pkt, next_hop, Verdict::ForwardedIcmp)
}

/// Bytes prepended to the frame: the ICMP message's IP and ICMP headers.
const HEADROOM: usize = Ipv4Hdr::LEN + IcmpHdr::LEN;
/// The frame's bytes kept: its Ethernet header (replaced) and the quote.
const KEPT: usize = EthHdr::LEN + TOO_BIG_QUOTE;
/// The answer's ICMP message: header and quote.
const ICMP_LEN: usize = IcmpHdr::LEN + TOO_BIG_QUOTE;

/// Answers a packet too big for its next hop (DF set) with "fragmentation
/// needed" carrying `mtu`, as a router does (Katran's `send_icmp_too_big`):
/// the frame is cut to its first `TOO_BIG_QUOTE` IP bytes, IP and ICMP
/// headers are put in front, and it goes back out where it came from. The
/// packet must be as it arrived (not rewritten yet). A frame that cannot be
/// reshaped (shorter than the quote: only below an 84-byte MTU) is dropped
/// under the same verdict.
#[inline(always)]
pub(crate) fn too_big(ctx: &XdpContext, mtu: u16) -> Outcome {
    let fail = drop(Verdict::FragNeeded);
    let frame = ctx.data_end() - ctx.data();
    if frame < KEPT {
        return fail;
    }
    // SAFETY: helper calls on our own context; every pointer below is taken
    // and bounds-checked after them.
    if frame > KEPT && unsafe { bpf_xdp_adjust_tail(ctx.ctx, -((frame - KEPT) as i32)) } != 0 {
        return fail;
    }
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(HEADROOM as i32)) } != 0 {
        return fail;
    }
    // Now: [HEADROOM new][old Ethernet][quoted IP header + 64 bytes].
    let (Some(eth), Some(old_eth), Some(quoted), Some(msg)) = (
        header::<EthHdr>(ctx, 0),
        header::<EthHdr>(ctx, HEADROOM),
        header::<Ipv4Hdr>(ctx, HEADROOM + EthHdr::LEN),
        header::<[u8; ICMP_LEN]>(ctx, ICMP_OFF),
    ) else {
        return fail;
    };
    // SAFETY: all four bounds-checked. The old Ethernet header lies where
    // the new IP and ICMP headers go: its MACs are copied out first.
    unsafe {
        crate::copy_mac(&raw mut (*eth).dst, &(*old_eth).src);
        crate::copy_mac(&raw mut (*eth).src, &(*old_eth).dst);
        (*eth).ether_type = lb_common::headers::ETH_P_IPV4_RAW;
        let q = &*quoted;
        let ip = too_big_ip(q.saddr, q.daddr);
        copy_words(ctx, EthHdr::LEN, &ip);
        copy_words(ctx, ICMP_OFF, &too_big_icmp(mtu));
    }
    // SAFETY: `msg` covers ICMP_LEN bytes (a multiple of 4) of the frame.
    let sum = unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, msg.cast(), ICMP_LEN as u32, 0) };
    let Some(icmp) = header::<IcmpHdr>(ctx, ICMP_OFF) else {
        return fail;
    };
    // SAFETY: bounds-checked.
    unsafe { (*icmp).check = finish(sum as u32) };
    Outcome {
        action: xdp_action::XDP_TX,
        reason: Verdict::FragNeeded,
    }
}

/// Writes a header built on the stack into the frame at `offset` as 16-bit
/// volatile stores: a struct store became an out-of-line memcpy.
#[inline(always)]
fn copy_words<T>(ctx: &XdpContext, offset: usize, value: &T) {
    let Some(dst) = header::<T>(ctx, offset) else {
        return;
    };
    let (d, s) = (dst.cast::<u16>(), (value as *const T).cast::<u16>());
    for i in 0..size_of::<T>() / 2 {
        // SAFETY: `dst` was bounds-checked for a whole T; T is 2-aligned here.
        unsafe { core::ptr::write_volatile(d.add(i), core::ptr::read_unaligned(s.add(i))) };
    }
}
