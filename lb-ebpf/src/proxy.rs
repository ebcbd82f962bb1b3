//! PROXY protocol v2 in the data plane (issue 25; docs/architecture.md,
//! "PROXY protocol v2"): the third program, `lb_proxy` (IPv6's:
//! `lb_proxy6`), reached by a tail call (`STAGES[STAGE_PROXY]`,
//! `STAGES[STAGE_PROXY6]`) only for flows flagged `FLOW_F_PROXY`, so every
//! other packet pays one flag test. The rules are `lb_common::proxy`'s;
//! this module applies them to the frame, written once over the family
//! (`PathFamily`'s PROXY items: the TCP header at the fixed IP header's
//! end, the header's bytes and length, the IP length field, where `first`
//! is):
//!
//! - `PROXY_OPTIONS` (from `lb_setup`): a PROXY flow's SYN loses its
//!   SACK-permitted option, its SYN-ACK's MSS drops by the header's length;
//!   then back to `lb_setup`;
//! - `PROXY_ESTABLISHED` (from `lb`, or from `lb_setup` for a flow it just
//!   established with a data segment): the client's segment at `first` with
//!   payload gets the header in front of its payload, later ones `seq +=
//!   len`; the backend's acks `client_ack`; then the established path
//!   (`path::proxied`) as `lb` would have taken it.
//!
//! An IPv4 flow's `first` is in its established slot
//! (`EstablishedSlot::proxy_first`), read from the slot the packet's lookup
//! already holds; only a PROXY flow in the overflow (`CONNTRACK`, no slot)
//! keeps it in `PROXY_FLOWS` (forward key → `first`). An IPv6 flow's is in
//! `PROXY_FLOWS6` (`flows6.rs`). (The stage names above are IPv4's; IPv6's
//! are `lb_v6`, `lb_v6_setup`, `lb_proxy6`.)

use aya_ebpf::{
    helpers::generated::bpf_xdp_adjust_head, macros::map, maps::LruHashMap, programs::XdpContext,
};
use lb_common::{
    EstablishedSlot, Flow, FlowKey, MAX_PROXY_FLOWS, ProxyFlow, REPLY, Verdict,
    checksum::replace16,
    flow::forward_key,
    headers::{EthHdr, Ipv4Hdr, TCP_FLAG_ACK, TCP_FLAG_SYN, TcpNumbers},
    proxy::{
        ClientSegment, TCPOPT_EOL, TCPOPT_MSS, TCPOPT_NOP, TCPOPT_SACK_PERMITTED, announced_mtu,
        check_after_field, check_after_insert, client_ack, client_segment, fits,
        ipv4_check_after_length, shifted_seq,
    },
};

use crate::{
    established,
    family::PathFamily,
    mem::header,
    parse::Segment,
    verdict::{Outcome, drop},
};

/// A PROXY flow in the overflow: its forward key (client → VIP) → `first`.
#[map]
pub(crate) static PROXY_FLOWS: LruHashMap<FlowKey, ProxyFlow> =
    LruHashMap::with_max_entries(MAX_PROXY_FLOWS, 0);

/// The TCP header's offset in an IPv4 PROXY flow's frame (IPv4 without
/// options: the VIP rules' `DropIpOptions`, and a backend's reply with
/// options is not ours).
pub(crate) const TCP_AT4: usize = EthHdr::LEN + Ipv4Hdr::LEN;
/// The longest TCP header (data offset 15).
const TCP_MAX: usize = 60;

/// A PROXY flow was established in the overflow.
#[inline(always)]
pub(crate) fn started(forward: &FlowKey, first: u32) {
    let _ = PROXY_FLOWS.insert(forward, &ProxyFlow { first, _pad: 0 }, 0);
}

/// A PROXY flow in the overflow went (`flows::remove_flow`).
#[inline(always)]
pub(crate) fn ended(forward: &FlowKey) {
    let _ = PROXY_FLOWS.remove(forward);
}

/// An IPv4 flow's `first`, if known: its slot's (`slot`, where the lookup
/// found the entry), else (the overflow) `PROXY_FLOWS`'s under its forward
/// key (made from `key` and `flow` only then).
#[inline(always)]
pub(crate) fn first4(
    key: &FlowKey,
    flow: &Flow,
    slot: Option<*mut EstablishedSlot>,
) -> Option<u32> {
    if let Some(slot) = slot {
        return Some(established::proxy_first(slot));
    }
    let forward = if flow.direction == REPLY {
        forward_key(key, flow)
    } else {
        *key
    };
    // SAFETY: a map value, read once.
    PROXY_FLOWS.get_ptr(&forward).map(|p| unsafe { (*p).first })
}

/// The IPv4 frame's TCP segment length (IP total length less the header).
#[inline(always)]
pub(crate) fn segment_len4(ctx: &XdpContext) -> Option<u32> {
    let ip = header::<Ipv4Hdr>(ctx, EthHdr::LEN)?;
    // SAFETY: bounds-checked.
    let total = unsafe { u16::from_be((*ip).tot_len) as u32 };
    Some(total.wrapping_sub(Ipv4Hdr::LEN as u32))
}

/// Writes the IPv4 frame's grown length (TCP segment `old` → `new` bytes),
/// its header checksum updated.
#[inline(always)]
pub(crate) fn set_segment_len4(ctx: &XdpContext, old: u32, new: u32) -> bool {
    let Some(ip) = header::<Ipv4Hdr>(ctx, EthHdr::LEN) else {
        return false;
    };
    let (old, new) = (
        (old + Ipv4Hdr::LEN as u32) as u16,
        (new + Ipv4Hdr::LEN as u32) as u16,
    );
    // SAFETY: bounds-checked.
    unsafe {
        (*ip).tot_len = new.to_be();
        (*ip).check = ipv4_check_after_length((*ip).check, old, new);
    }
    true
}

/// The TCP segment's length (header and payload, from the IP header) and
/// the TCP header's length of the frame's segment.
#[inline(always)]
fn lengths<F: PathFamily>(ctx: &XdpContext) -> Option<(u32, u32)> {
    let segment = F::proxy_segment_len(ctx)?;
    let doff = header::<u8>(ctx, F::PROXY_TCP_AT + 12)?;
    // SAFETY: bounds-checked.
    let doff = unsafe { (*doff >> 4) as u32 };
    Some((segment, doff * 4))
}

/// Does the frame's TCP segment carry data? A frame whose TCP header is
/// not where the PROXY rules write (IPv6 extension headers) counts as
/// data: the PROXY stage gives it its verdict.
#[inline(always)]
pub(crate) fn has_payload<F: PathFamily>(ctx: &XdpContext) -> bool {
    if !F::proxy_fixed(ctx) {
        return true;
    }
    match lengths::<F>(ctx) {
        Some((segment, tcp_len)) => segment > tcp_len,
        None => false,
    }
}

/// In the first stage, a packet of an established PROXY flow (`key` as the
/// established table left it, `flow` its entry, in `slot`): a backend's
/// ack shifted back, a client segment kept or shifted, in place.
/// `Ok(false)`: a client segment that takes the header, for the PROXY
/// stage (the frame grows).
#[inline(always)]
pub(crate) fn shift<F: PathFamily>(
    ctx: &XdpContext,
    key: &F::FlowKey,
    flow: &Flow,
    slot: Option<*mut EstablishedSlot>,
    seg: &Segment,
) -> Result<bool, Outcome> {
    if flow.direction == REPLY {
        backend::<F>(ctx, key, flow, slot, seg)?;
        return Ok(true);
    }
    let (rule, _, _) = client_rule::<F>(ctx, key, flow, slot, seg)?;
    Ok(rule != ClientSegment::Insert)
}

/// A PROXY flow's packet whose TCP header is not at the fixed header's
/// end (IPv6 extension headers) cannot be rewritten: dropped, counted.
#[inline(always)]
fn fixed<F: PathFamily>(ctx: &XdpContext) -> Result<(), Outcome> {
    if F::proxy_fixed(ctx) {
        Ok(())
    } else {
        Err(drop(Verdict::DropProxyExtHeaders))
    }
}

/// The rule for a client segment (`forward`, its key) and the frame's TCP
/// segment length and TCP header length; a `Shift` is applied here.
#[inline(always)]
fn client_rule<F: PathFamily>(
    ctx: &XdpContext,
    forward: &F::FlowKey,
    flow: &Flow,
    slot: Option<*mut EstablishedSlot>,
    seg: &Segment,
) -> Result<(ClientSegment, u32, u32), Outcome> {
    fixed::<F>(ctx)?;
    let Some(first) = F::proxy_first(forward, flow, slot) else {
        return Err(drop(Verdict::DropProxyLost));
    };
    let Some((segment, tcp_len)) = lengths::<F>(ctx) else {
        return Ok((ClientSegment::Keep, 0, 0));
    };
    let payload = segment.saturating_sub(tcp_len);
    let rule = client_segment(seg.seq, payload, seg.flags & TCP_FLAG_SYN != 0, first);
    if rule == ClientSegment::Shift {
        set_number::<F>(ctx, 0, seg.seq, shifted_seq(seg.seq, F::PROXY_LEN));
    }
    Ok((rule, segment, tcp_len))
}

/// In the PROXY stage, a client segment of an established PROXY flow
/// (`forward`, its key as it arrived; `flow` its entry, in `slot`): kept,
/// shifted, or given the header.
#[inline(always)]
pub(crate) fn client<F: PathFamily>(
    ctx: &XdpContext,
    forward: &F::FlowKey,
    flow: &Flow,
    slot: Option<*mut EstablishedSlot>,
    seg: &Segment,
) -> Result<(), Outcome> {
    match client_rule::<F>(ctx, forward, flow, slot, seg)? {
        (ClientSegment::Insert, segment, tcp_len) => {
            insert::<F>(ctx, forward, flow, segment, tcp_len)
        }
        _ => Ok(()),
    }
}

/// A backend's segment of an established PROXY flow (`reply`, its key in
/// NAT shape; `flow` its reply entry, in `slot`): its ack as the client
/// numbers it.
#[inline(always)]
pub(crate) fn backend<F: PathFamily>(
    ctx: &XdpContext,
    reply: &F::FlowKey,
    flow: &Flow,
    slot: Option<*mut EstablishedSlot>,
    seg: &Segment,
) -> Result<(), Outcome> {
    fixed::<F>(ctx)?;
    if seg.flags & TCP_FLAG_ACK == 0 {
        return Ok(());
    }
    let Some(first) = F::proxy_first(reply, flow, slot) else {
        return Err(drop(Verdict::DropProxyLost));
    };
    let ack = client_ack(seg.ack, first, F::PROXY_LEN);
    if ack != seg.ack {
        set_number::<F>(ctx, 4, seg.ack, ack);
    }
    Ok(())
}

/// Writes the TCP sequence (`at` 0) or acknowledgement (`at` 4) number
/// `new` over `old` (host order), checksum updated.
#[inline(always)]
fn set_number<F: PathFamily>(ctx: &XdpContext, at: usize, old: u32, new: u32) {
    let (Some(numbers), Some(check)) = (
        header::<TcpNumbers>(ctx, F::PROXY_TCP_AT + 4),
        header::<u16>(ctx, F::PROXY_TCP_AT + 16),
    ) else {
        return;
    };
    // SAFETY: bounds-checked; `at` is 0 or 4.
    unsafe {
        let field = numbers.cast::<u8>().add(at).cast::<u32>();
        core::ptr::write_unaligned(field, new.to_be());
        *check = check_after_field(*check, old, new);
    }
}

/// Puts the header in front of the payload of the segment in the frame
/// (TCP segment `segment` bytes, its header `tcp_len`): the frame grows by
/// the header's length at its head, the headers move forward, the header
/// goes where they were; lengths and checksums incrementally. Too big for
/// the flow's link once grown: "fragmentation needed" (IPv6: "packet too
/// big") with the MTU less the header.
#[inline(always)]
fn insert<F: PathFamily>(
    ctx: &XdpContext,
    forward: &F::FlowKey,
    flow: &Flow,
    segment: u32,
    tcp_len: u32,
) -> Result<(), Outcome> {
    let len = F::PROXY_LEN;
    let ip_total = segment + (F::PROXY_TCP_AT - EthHdr::LEN) as u32;
    let mtu = flow.next_hop.mtu as u32;
    if flow.next_hop.ifindex != 0 && mtu != 0 && !fits(ip_total, len, mtu) {
        return Err(F::too_big(ctx, announced_mtu(mtu, len) as u16));
    }
    // The TCP options' bytes (a multiple of 4, at most 40).
    let option_bytes = (tcp_len as usize).wrapping_sub(20) & 0x3c;
    if option_bytes > TCP_MAX - 20 {
        return Ok(());
    }
    // Client and VIP as the client addressed them (before the NAT rewrite).
    let proxy = F::proxy_header(forward);
    // SAFETY: plain helper call; every pointer is derived again after it.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(len as i32)) } != 0 {
        return Err(drop(Verdict::DropProxyNoRoom));
    }
    // Ethernet, IP and the fixed TCP header, and the header's length after
    // them: one bounds check.
    let fixed_words = (F::PROXY_TCP_AT + 20) / 2;
    let shift_words = len as usize / 2;
    let Some(words) = crate::mem::span(ctx, (fixed_words + shift_words) * 2) else {
        return Err(drop(Verdict::DropProxyNoRoom));
    };
    let words = words.cast::<u16>();
    for i in 0..fixed_words {
        // SAFETY: both within the bounds-checked span; the copy runs
        // forward (the destination is before the source).
        unsafe {
            core::ptr::write_volatile(
                words.add(i),
                core::ptr::read_volatile(words.add(i + shift_words)),
            )
        };
    }
    // The TCP options, 4 bytes at a time (at most 40).
    let options = option_bytes / 4;
    for k in 0..(TCP_MAX - 20) / 4 {
        if k >= options {
            break;
        }
        let at = F::PROXY_TCP_AT + 20 + k * 4;
        let Some(src) = header::<u32>(ctx, at + len as usize) else {
            break;
        };
        let dst = (ctx.data() + at) as *mut u32;
        // SAFETY: `src` bounds-checked, `dst` before it.
        unsafe { core::ptr::write_unaligned(dst, core::ptr::read_unaligned(src)) };
    }
    // The header after the TCP header.
    let at = F::PROXY_TCP_AT + 20 + (core::hint::black_box(option_bytes) & 0x3c);
    if !crate::mem::store_in_frame(ctx, at, &proxy) {
        return Err(drop(Verdict::DropProxyNoRoom));
    }
    let grown = segment + len;
    if !F::proxy_set_segment_len(ctx, segment, grown) {
        return Err(drop(Verdict::DropProxyNoRoom));
    }
    let Some(check) = header::<u16>(ctx, F::PROXY_TCP_AT + 16) else {
        return Err(drop(Verdict::DropProxyNoRoom));
    };
    // SAFETY: bounds-checked.
    unsafe {
        *check = check_after_insert(*check, proxy.as_ref(), segment as u16, grown as u16);
    }
    Ok(())
}

/// `PROXY_OPTIONS`: a PROXY flow's SYN loses SACK-permitted (two NOPs), its
/// SYN-ACK's MSS drops by the header's length (`lb_common::proxy`'s
/// `strip_sack_permitted` and `clamp_mss`, walked here over the frame).
#[inline(always)]
pub(crate) fn fix_options<F: PathFamily>(ctx: &XdpContext) {
    // A SYN with IPv6 extension headers keeps its options (its flow's
    // established packets with them are dropped: `fixed`).
    if !F::proxy_fixed(ctx) {
        return;
    }
    let Some(flags) = header::<u8>(ctx, F::PROXY_TCP_AT + 13) else {
        return;
    };
    // SAFETY: bounds-checked.
    let flags = unsafe { *flags };
    if flags & TCP_FLAG_SYN == 0 {
        return;
    }
    let Some((_, tcp_len)) = lengths::<F>(ctx) else {
        return;
    };
    let syn_ack = flags & TCP_FLAG_ACK != 0;
    let kind = if syn_ack {
        TCPOPT_MSS
    } else {
        TCPOPT_SACK_PERMITTED
    };
    let Some(at) = find_option::<F>(ctx, tcp_len as usize, kind) else {
        return;
    };
    if syn_ack {
        if option_byte::<F>(ctx, at + 1) != Some(4) {
            return;
        }
        let (Some(hi), Some(lo)) = (option_byte::<F>(ctx, at + 2), option_byte::<F>(ctx, at + 3))
        else {
            return;
        };
        let mss = u16::from_be_bytes([hi, lo]).saturating_sub(F::PROXY_LEN as u16);
        let [hi, lo] = mss.to_be_bytes();
        write_option_byte::<F>(ctx, at + 2, hi);
        write_option_byte::<F>(ctx, at + 3, lo);
    } else if option_byte::<F>(ctx, at + 1) == Some(2) {
        write_option_byte::<F>(ctx, at, TCPOPT_NOP);
        write_option_byte::<F>(ctx, at + 1, TCPOPT_NOP);
    }
}

/// The byte at `at` of the TCP header.
#[inline(always)]
fn option_byte<F: PathFamily>(ctx: &XdpContext, at: usize) -> Option<u8> {
    let at = at & 0x3f;
    // SAFETY: bounds-checked by `header`.
    header::<u8>(ctx, F::PROXY_TCP_AT + at).map(|p| unsafe { *p })
}

/// Writes `value` at `at` of the TCP header, its 16-bit word replaced as a
/// whole in the frame and the checksum (an option may start at an odd
/// offset).
#[inline(always)]
fn write_option_byte<F: PathFamily>(ctx: &XdpContext, at: usize, value: u8) {
    let at = at & 0x3f;
    let word_at = at & !1;
    let (Some(word), Some(check)) = (
        header::<u16>(ctx, F::PROXY_TCP_AT + word_at),
        header::<u16>(ctx, F::PROXY_TCP_AT + 16),
    ) else {
        return;
    };
    // SAFETY: bounds-checked; the byte is within the word.
    unsafe {
        let old = core::ptr::read_volatile(word);
        let mut bytes = old.to_ne_bytes();
        if at & 1 == 0 {
            bytes[0] = value;
        } else {
            bytes[1] = value;
        }
        let new = u16::from_ne_bytes(bytes);
        core::ptr::write_volatile(word, new);
        *check = replace16(*check, old, new);
    }
}

/// The offset in the TCP header (`len` bytes) of the first option of `kind`
/// (`lb_common::proxy::find_option`'s walk, over the frame, bounded).
#[inline(always)]
fn find_option<F: PathFamily>(ctx: &XdpContext, len: usize, kind: u8) -> Option<usize> {
    let end = len.min(TCP_MAX);
    let mut at = 20;
    for _ in 0..TCP_MAX - 20 {
        if at >= end {
            return None;
        }
        let k = option_byte::<F>(ctx, at)?;
        if k == TCPOPT_EOL {
            return None;
        }
        if k == TCPOPT_NOP {
            at += 1;
            continue;
        }
        if at + 1 >= end {
            return None;
        }
        let l = option_byte::<F>(ctx, at + 1)? as usize;
        if l < 2 || at + l > end {
            return None;
        }
        if k == kind {
            return Some(at);
        }
        at += l;
    }
    None
}
