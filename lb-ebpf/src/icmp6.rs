//! ICMPv6 errors, as `icmp.rs` and `compose.rs` for IPv4: which flow an
//! error belongs to (the path admits it and `transmit` translates and sends
//! it; the rewrites and their checksum arithmetic are `lb_common::ipv6`'s,
//! host-tested), and the "packet too big" the LB answers with itself.
//!
//! An error (destination unreachable, packet too big, time exceeded,
//! parameter problem) quotes the packet that caused it, which travelled the
//! other way: its swapped tuple is the flow's key. A client's error about
//! a VIP's packet goes to the flow's backend (NAT66: the outer destination
//! and the quoted source become the backend's; DSR: the MACs only); a
//! backend's, or a router's behind it, about a NAT66 flow's packet goes to
//! the client as the VIP's. The ICMPv6 checksum covers a pseudo-header, so
//! it follows the outer address change too. Followed: an error right after
//! the fixed header, quoting a packet whose TCP/UDP header follows its
//! fixed header (what routers and hosts send about our flows); anything
//! else, and echo, are not ours: the VIP rules pass them to the kernel.
//! They reach `lb_v6_portless` (`STAGES[4]`) from `lb` (`is_error`),
//! as does a packet too big (`ask_too_big`): that stage composes the
//! answer.

use aya_ebpf::{
    bindings::xdp_action,
    helpers::generated::{bpf_csum_diff, bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    macros::map,
    maps::PerCpuArray,
    programs::XdpContext,
};
use lb_common::{
    Verdict,
    checksum::fold,
    family::V6,
    headers::{EthHdr, L4Ports},
    ipv6::{
        ETH_P_IPV6_RAW, IPPROTO_ICMPV6, Icmp6Hdr, Ipv6Hdr, TOO_BIG_MSG6, TOO_BIG_QUOTE6,
        carries_ports, pseudo_sum, quotes_a_flow, too_big_icmp6, too_big_ip6,
    },
    maps6::{FlowKey6, STAGE_V6_PORTLESS},
};

use crate::{
    family::found,
    mem::{copy_mac, header, store_in_frame},
    parse::{Found, Quote},
    stage::tail_call,
    verdict::{Outcome, drop},
};

const ICMP_OFF: usize = EthHdr::LEN + Ipv6Hdr::LEN;
const QUOTED_OFF: usize = ICMP_OFF + Icmp6Hdr::LEN;
const QUOTED_PORTS_OFF: usize = QUOTED_OFF + Ipv6Hdr::LEN;
/// The end of what the translator reads and rewrites: the quoted ports.
const QUOTED_END: usize = QUOTED_PORTS_OFF + size_of::<L4Ports>();

/// In `lb`: is this an ICMPv6 error (the kinds that quote a flow), for
/// `lb_v6_portless`? Echo and neighbour discovery are not.
#[inline(always)]
pub(crate) fn is_error(ctx: &XdpContext) -> bool {
    let (Some(next), Some(kind)) = (
        header::<u8>(ctx, EthHdr::LEN + 6),
        header::<u8>(ctx, ICMP_OFF),
    ) else {
        return false;
    };
    // SAFETY: bounds-checked by `header`.
    unsafe { *next == IPPROTO_ICMPV6 && quotes_a_flow(*kind) }
}

/// An ICMPv6 error quoting a flow's packet: the flow, and the quote to
/// rewrite. `None`: not an error about one of our flows.
#[inline(always)]
pub(crate) fn error_of_flow(
    ctx: &XdpContext,
    eth: *mut EthHdr,
    ip: *mut Ipv6Hdr,
) -> Option<Found<V6, Quote<V6>>> {
    // SAFETY: the caller bounds-checked the fixed header.
    let hdr = unsafe { &*ip };
    if hdr.next_header != IPPROTO_ICMPV6 || !hdr.is_valid(ctx.data_end() - ctx.data() - EthHdr::LEN)
    {
        return None;
    }
    // What is read and rewritten must lie within the payload length: bytes
    // past it are not the message, and its checksum does not cover them.
    if (u16::from_be(hdr.payload_len) as usize) < QUOTED_END - ICMP_OFF {
        return None;
    }
    let icmp = header::<Icmp6Hdr>(ctx, ICMP_OFF)?;
    // SAFETY: `header` checked the bounds of each.
    if !quotes_a_flow(unsafe { (*icmp).kind }) {
        return None;
    }
    let quoted = header::<Ipv6Hdr>(ctx, QUOTED_OFF)?;
    let ports = header::<L4Ports>(ctx, QUOTED_PORTS_OFF)?;
    let (q, qp) = unsafe { (&*quoted, &*ports) };
    // The error goes back to the quoted packet's sender; quoted extension
    // headers would move the ports.
    if { hdr.daddr } != { q.saddr } || !carries_ports(q.next_header) {
        return None;
    }
    let key = FlowKey6 {
        saddr: q.daddr,
        daddr: q.saddr,
        sport: qp.dest,
        dport: qp.source,
        protocol: q.next_header,
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
            // SAFETY: within the bounds-checked ICMPv6 header.
            icmp_check: unsafe { &raw mut (*icmp).check },
        },
    )
}

/// A packet too big, per CPU: `lb_v6` or `lb_v6_setup` found it and
/// `lb_v6_portless` answers it (`ask_too_big`): the MTU, with
/// `TOO_BIG_ASKED` set while asked.
#[map]
static TOO_BIG6: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);
const TOO_BIG_ASKED: u32 = 1 << 16;

/// In `lb_v6` or `lb_v6_setup`: a packet (as it arrived) too big for its
/// next hop's `mtu` is answered by `lb_v6_portless` (`too_big`), so the
/// two stages carry a tail call instead of the answer's code on their
/// verifier budgets. Without the stage the packet is dropped under the
/// same verdict (as an answer that cannot be composed).
#[inline(always)]
pub(crate) fn ask_too_big(ctx: &XdpContext, mtu: u16) -> Outcome {
    if let Some(slot) = TOO_BIG6.get_ptr_mut(0) {
        // SAFETY: this CPU's slot; the tail call runs on this CPU at once.
        unsafe {
            *slot = mtu as u32 | TOO_BIG_ASKED;
            tail_call::<STAGE_V6_PORTLESS>(ctx);
            *slot = 0;
        }
    }
    drop(Verdict::FragNeeded)
}

/// In `lb_v6_portless`: the MTU of a packet too big the caller asked it to
/// answer, if it did (and the ask is cleared).
#[inline(always)]
pub(crate) fn asked_too_big() -> Option<u16> {
    let slot = TOO_BIG6.get_ptr_mut(0)?;
    // SAFETY: this CPU's slot.
    unsafe {
        let asked = *slot;
        if asked & TOO_BIG_ASKED == 0 {
            return None;
        }
        *slot = 0;
        Some(asked as u16)
    }
}

/// Bytes prepended to the frame: the message's IPv6 and ICMPv6 headers.
const HEADROOM: usize = Ipv6Hdr::LEN + Icmp6Hdr::LEN;
/// The frame's bytes kept: its Ethernet header (replaced) and the quote.
const KEPT: usize = EthHdr::LEN + TOO_BIG_QUOTE6;

/// Answers an IPv6 packet too big for its next hop with ICMPv6 "packet
/// too big" carrying `mtu` (IPv6 routers never fragment, RFC 8200 §5), as
/// `compose::too_big` answers IPv4's with DF set: the frame is cut to its
/// first `TOO_BIG_QUOTE6` IP bytes, IPv6 and ICMPv6 headers are put in
/// front (from the address the packet was sent to, back to its sender),
/// the checksum is summed over the pseudo-header and the fixed-size
/// message, the MACs are swapped, and it leaves where it came from. The
/// packet must be as it arrived (not rewritten yet). A frame that cannot
/// be reshaped (shorter than the quote: never, for a packet over an IPv6
/// link's 1280-byte minimum MTU) is dropped under the same verdict.
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
    // Now: [HEADROOM new][old Ethernet][quoted IPv6 header + 64 bytes].
    let (Some(eth), Some(old_eth), Some(quoted), Some(msg)) = (
        header::<EthHdr>(ctx, 0),
        header::<EthHdr>(ctx, HEADROOM),
        header::<Ipv6Hdr>(ctx, HEADROOM + EthHdr::LEN),
        header::<[u8; TOO_BIG_MSG6]>(ctx, ICMP_OFF),
    ) else {
        return fail;
    };
    // SAFETY: all four bounds-checked. The old Ethernet header lies where
    // the new IPv6 header goes: its MACs are copied out first.
    let seed = unsafe {
        copy_mac(&raw mut (*eth).dst, &(*old_eth).src);
        copy_mac(&raw mut (*eth).src, &(*old_eth).dst);
        (*eth).ether_type = ETH_P_IPV6_RAW;
        let q = &*quoted;
        let ip = too_big_ip6(q.saddr, q.daddr);
        store_in_frame(ctx, EthHdr::LEN, &ip);
        store_in_frame(ctx, ICMP_OFF, &too_big_icmp6(mtu));
        pseudo_sum(
            &{ ip.saddr },
            &{ ip.daddr },
            TOO_BIG_MSG6 as u32,
            IPPROTO_ICMPV6,
        )
    };
    // Folded once: the helper adds the seed to its 32-bit accumulator.
    let seed = fold(seed) as u32;
    // SAFETY: `msg` covers TOO_BIG_MSG6 bytes (a multiple of 4) of the frame.
    let sum = unsafe {
        bpf_csum_diff(
            core::ptr::null_mut(),
            0,
            msg.cast(),
            TOO_BIG_MSG6 as u32,
            seed,
        )
    };
    let Some(icmp) = header::<Icmp6Hdr>(ctx, ICMP_OFF) else {
        return fail;
    };
    // SAFETY: bounds-checked.
    unsafe { (*icmp).check = !fold(sum as u32) };
    Outcome {
        action: xdp_action::XDP_TX,
        reason: Verdict::FragNeeded,
    }
}
