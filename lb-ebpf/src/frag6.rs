//! IPv6 fragments: which flow a fragment after the first belongs to, as
//! `frag.rs` for IPv4 (Cilium's design). `lb` hands every IPv6 fragment to
//! `lb_v6_portless` (`STAGES[4]`). A first fragment carries the TCP/UDP
//! header: its ports are recorded in `FRAGS6` under (source, destination,
//! identification, the fragment header's next header: what IPv6
//! reassembly keys on, RFC 8200 §4.5) when it is to a VIP or from a NAT66
//! backend, and it goes back to `lb_v6` to be balanced as any packet (a
//! UDP one may create its flow). A later fragment finds its ports there,
//! then its flow, and the path gives it the flow's rewrite on its IPv6
//! header only (addresses, hop limit): the L4 checksum covers the whole
//! datagram and was updated on the first fragment.
//!
//! Recorded on arrival, not when a flow takes the first fragment (IPv4's
//! rule): recording in the path's `forward`, in both IPv6 stages, took
//! `lb_v6` past the verifier's 1 000 000 instructions. A later fragment
//! of a datagram whose first no flow took finds ports but no flow: the VIP
//! rules then, as without an entry.
//!
//! Followed: a fragment header right after the fixed header, followed by
//! TCP or UDP (what Linux and every stack send: the fragmentable part
//! starts with the upper layer). A first fragment of another shape is
//! balanced but not recorded, so its later fragments meet the VIP rules
//! (`DropFragment` to a VIP, `PassNotOurs` otherwise), as does a later
//! fragment that overtook its first or whose first was lost.

use aya_ebpf::{macros::map, maps::LruHashMap, programs::XdpContext};
use lb_common::{
    FRAG_TABLE_SIZE,
    family::V6,
    headers::{EthHdr, L4Ports},
    ipv6::{Fragment6, Ipv6Hdr, NEXTHDR_FRAGMENT, Step, carries_ports, copy_addr, step},
    maps6::{FlowKey6, FragKey6, STAGE_V6},
};

use crate::{
    family::{PathFamily, found},
    flows6,
    mem::header,
    parse::{Found, Fragment},
    stage::tail_call,
};

/// Where a fragment header right after the fixed header sits.
const FRAG_OFF: usize = EthHdr::LEN + Ipv6Hdr::LEN;

/// IPv6 datagram → its ports, from its first fragment.
#[map]
static FRAGS6: LruHashMap<FragKey6, L4Ports> = LruHashMap::with_max_entries(FRAG_TABLE_SIZE, 0);

/// The fragment header right after `ip`'s fixed header, and the upper
/// layer it announces, if the packet has one there. One compare for a
/// packet without.
#[inline(always)]
pub(crate) fn fragment_of(ctx: &XdpContext, ip: &Ipv6Hdr) -> Option<(u8, Fragment6)> {
    if ip.next_header != NEXTHDR_FRAGMENT {
        return None;
    }
    let head = header::<[u8; 8]>(ctx, FRAG_OFF)?;
    // SAFETY: bounds-checked by `header`.
    match step(NEXTHDR_FRAGMENT, unsafe { &*head }) {
        Step::Fragment { next, fragment } => Some((next, fragment)),
        _ => None,
    }
}

/// In `lb_v6_portless`: a fragment that is not a later one (a first
/// fragment, or an atomic one) is balanced by `lb_v6` as any packet; a
/// first fragment's ports (as it arrived) are recorded for the fragments
/// after it when it is to a VIP or from a NAT66 backend (a flow's
/// forward or reply direction: nothing else fills the table). True: sent
/// back to `lb_v6` (returns only if that failed).
#[inline(always)]
pub(crate) fn record_first(ctx: &XdpContext, ip: *const Ipv6Hdr) -> bool {
    // SAFETY: the caller bounds-checked the fixed header.
    let hdr = unsafe { &*ip };
    let Some((next, fragment)) = fragment_of(ctx, hdr) else {
        return false;
    };
    if fragment.is_later() {
        return false;
    }
    if fragment.is_first()
        && carries_ports(next)
        && let Some(ports) = header::<L4Ports>(ctx, FRAG_OFF + 8)
    {
        // SAFETY: bounds-checked by `header`.
        let ports = unsafe { *ports };
        let key = FlowKey6::of(hdr, next, &ports);
        if V6::is_vip(key.daddr) || flows6::from_nat_backend(&key) {
            let _ = FRAGS6.insert(&datagram(hdr, next, fragment.id), &ports, 0);
        }
    }
    back_to_v6(ctx);
    true
}

/// Tail-calls `lb_v6` (returns only if that failed).
#[inline(always)]
fn back_to_v6(ctx: &XdpContext) {
    tail_call::<STAGE_V6>(ctx);
}

#[inline(always)]
fn datagram(hdr: &Ipv6Hdr, next: u8, id: u32) -> FragKey6 {
    let mut key = FragKey6 {
        saddr: [0; 4],
        daddr: [0; 4],
        id,
        protocol: next,
        _pad0: 0,
        _pad1: 0,
    };
    // Word by word (`copy_addr`): a by-value copy of the packed header's
    // addresses compiles to a call of an out-of-line byte-wise memmove.
    // SAFETY: both are 16-byte fields, the header's 2-byte aligned.
    unsafe {
        copy_addr(&raw mut key.saddr, &raw const hdr.saddr);
        copy_addr(&raw mut key.daddr, &raw const hdr.daddr);
    }
    key
}

/// A fragment after the first: its flow, if its first fragment was
/// recorded; `None` leaves it to the VIP rules.
#[inline(always)]
pub(crate) fn later_fragment(
    ctx: &XdpContext,
    eth: *mut EthHdr,
    ip: *mut Ipv6Hdr,
) -> Option<Found<V6, Fragment>> {
    // SAFETY: the caller bounds-checked the fixed header.
    let hdr = unsafe { &*ip };
    if !hdr.is_valid(ctx.data_end() - ctx.data() - EthHdr::LEN) {
        return None;
    }
    let (next, fragment) = fragment_of(ctx, hdr)?;
    if !fragment.is_later() {
        return None;
    }
    // SAFETY: a FRAGS6 value, copied out at once.
    let ports = *unsafe { FRAGS6.get(&datagram(hdr, next, fragment.id)) }?;
    found(eth, ip, FlowKey6::of(hdr, next, &ports), Fragment { ports })
}

/// In `lb`: does a fragment header follow the fixed header (for
/// `lb_v6_portless`)?
#[inline(always)]
pub(crate) fn is_fragment(ctx: &XdpContext) -> bool {
    // SAFETY: bounds-checked by `header`.
    header::<u8>(ctx, EthHdr::LEN + 6).is_some_and(|next| unsafe { *next } == NEXTHDR_FRAGMENT)
}
