//! Fragments: which flow a fragment after the first belongs to.
//!
//! The first fragment of a datagram carries the TCP/UDP header, so it is
//! balanced like any packet; when a flow (or a NAT reply) takes it, its
//! ports are recorded under (source, destination, IP id, protocol) in
//! `FRAGS`, a small LRU, as Cilium does. The fragments after it carry no
//! ports: they find them there, then their flow, and the path gives them
//! the flow's rewrite on the IP header only (addresses, TTL, IP checksum):
//! the L4 checksum covers the whole datagram and was updated on the first
//! one.
//!
//! A later fragment without an entry (it overtook its first fragment, the
//! first was lost, or the datagram belongs to no flow) cannot be placed: it
//! is not ours here, and `parse_l4` gives it its verdict (to a VIP,
//! `DropFragment`; anything else is passed to the kernel).
//!
//! Entries are not removed on the last fragment: fragments may arrive in
//! any order, and the LRU recycles them; a datagram id reused after 65,536
//! datagrams of the same pair overwrites its entry with its own first
//! fragment.

use aya_ebpf::{macros::map, maps::LruHashMap, programs::XdpContext};
use lb_common::{
    FRAG_TABLE_SIZE, FragKey,
    family::{Family, V4},
    headers::{EthHdr, Ipv4Hdr, L4Ports},
};

use crate::{
    family::found,
    parse::{Found, Fragment, plain_ipv4},
};

/// Fragmented datagram → its ports, from its first fragment. This program.
#[map]
static FRAGS: LruHashMap<FragKey, L4Ports> = LruHashMap::with_max_entries(FRAG_TABLE_SIZE, 0);

/// A first fragment taken by a flow: records its ports for the fragments
/// after it. Its header and `ports` are read as it arrived (before any
/// rewrite), which is what they arrive with (a full-NAT reply's flow key
/// is no longer that: see `fullnat::nat_shaped`). Anything else costs one
/// compare.
#[inline(always)]
pub(crate) fn remember(ip: *const Ipv4Hdr, ports: *const L4Ports) {
    // SAFETY: bounds-checked by `parse_l4`.
    let hdr = unsafe { &*ip };
    if !hdr.is_first_fragment() {
        return;
    }
    // SAFETY: bounds-checked by `parse_l4` (a later fragment's scratch
    // copy never gets here: it is not a first fragment).
    let ports = unsafe { *ports };
    let datagram = datagram(hdr.saddr, hdr.daddr, hdr.id, hdr.protocol);
    let _ = FRAGS.insert(&datagram, &ports, 0);
}

#[inline(always)]
fn datagram(saddr: u32, daddr: u32, id: u16, protocol: u8) -> FragKey {
    FragKey {
        saddr,
        daddr,
        id,
        protocol,
        _pad: 0,
    }
}

/// A fragment after the first: its flow, if its first fragment was
/// recorded; `None` leaves it to the VIP rules.
#[inline(always)]
pub(crate) fn later_fragment(
    ctx: &XdpContext,
    eth: *mut EthHdr,
    ip: *mut Ipv4Hdr,
) -> Option<Found<V4, Fragment>> {
    // SAFETY: the caller bounds-checked the fixed IPv4 header.
    let hdr = unsafe { &*ip };
    if !plain_ipv4(ctx, hdr) {
        return None;
    }
    let datagram = datagram(hdr.saddr, hdr.daddr, hdr.id, hdr.protocol);
    // SAFETY: a FRAGS value, copied out at once.
    let ports = *unsafe { FRAGS.get(&datagram) }?;
    found(eth, ip, V4::flow_key(hdr, &ports), Fragment { ports })
}
