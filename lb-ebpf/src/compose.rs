//! Frames the load balancer composes itself, in place of the packet it
//! answers: today ICMP "fragmentation needed" (SYN-ACKs or tunnel headers
//! would come here). The header layouts and checksum arithmetic are
//! `lb_common::icmp`'s, tested on the host.

use aya_ebpf::{
    bindings::xdp_action,
    helpers::generated::{bpf_csum_diff, bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use lb_common::{
    Verdict,
    headers::{ETH_P_IPV4_RAW, EthHdr, Ipv4Hdr},
    icmp::{IcmpHdr, TOO_BIG_QUOTE, finish, too_big_icmp, too_big_ip},
};

use crate::{
    mem::{copy_mac, header, store_in_frame},
    verdict::{Outcome, drop},
};

const ICMP_OFF: usize = EthHdr::LEN + Ipv4Hdr::LEN;
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
        copy_mac(&raw mut (*eth).dst, &(*old_eth).src);
        copy_mac(&raw mut (*eth).src, &(*old_eth).dst);
        (*eth).ether_type = ETH_P_IPV4_RAW;
        let q = &*quoted;
        let ip = too_big_ip(q.saddr, q.daddr);
        store_in_frame(ctx, EthHdr::LEN, &ip);
        store_in_frame(ctx, ICMP_OFF, &too_big_icmp(mtu));
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
