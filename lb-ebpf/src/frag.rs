//! Fragments follow their flow.
//!
//! The first fragment of a datagram carries the TCP/UDP header, so it is
//! balanced like any packet; when a flow (or a NAT reply) takes it, its
//! ports are recorded under (source, destination, IP id, protocol) in
//! `FRAGS`, a small LRU, as Cilium does. The fragments after it carry no
//! ports: they find them there, then their flow, and get the flow's
//! rewrite on the IP header only (addresses, TTL, IP checksum): the L4
//! checksum covers the whole datagram and was updated on the first one.
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
    FRAG_TABLE_SIZE, Flow, FlowKey, FragKey,
    flow::REPLY,
    headers::{EthHdr, Ipv4Hdr, L4Ports},
};

use crate::{
    Outcome, Packet,
    flows::{self, Table},
    forward, reverse_nat,
};

/// Fragmented datagram → its ports, from its first fragment. This program.
#[map]
static FRAGS: LruHashMap<FragKey, L4Ports> = LruHashMap::with_max_entries(FRAG_TABLE_SIZE, 0);

/// The live entry a tuple (as it arrives) belongs to, and its table: a
/// flow's forward entry (client → VIP) or its reply entry (backend →
/// client, NAT). Fragments and ICMP errors find their flow only through
/// here; they never create, promote or close one.
/// Both come as copies: their next hop is not worth caching.
#[inline(always)]
pub(crate) fn flow_of(key: &FlowKey, now: u32) -> Option<(Flow, Table)> {
    if let Some(entry) = flows::established(key, now) {
        // SAFETY: a CONNTRACK value (see `flows::established`).
        return Some((unsafe { flows::copy_flow(entry) }, Table::Established));
    }
    flows::half_open(key, now, crate::is_vip_addr(key.daddr))
        .map(|(flow, _)| (flow, Table::HalfOpen))
}

/// A first fragment taken by a flow: records its ports for the fragments
/// after it. `key` is its tuple as it arrived (before any rewrite), which
/// is what they arrive with. Anything else costs one compare.
#[inline(always)]
pub(crate) fn remember(ip: *const Ipv4Hdr, key: &FlowKey) {
    // SAFETY: bounds-checked by `parse_l4`.
    let hdr = unsafe { &*ip };
    if !hdr.is_first_fragment() {
        return;
    }
    let ports = L4Ports {
        source: key.sport,
        dest: key.dport,
    };
    let datagram = datagram(key.saddr, key.daddr, hdr.id, key.protocol);
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

/// A fragment after the first: forwarded as its flow's packets are, if its
/// first fragment was recorded; `None` leaves it to the VIP rules.
#[inline(always)]
pub(crate) fn later_fragment(
    ctx: &XdpContext,
    eth: *mut EthHdr,
    ip: *mut Ipv4Hdr,
) -> Option<Outcome> {
    // SAFETY: the caller bounds-checked the fixed IPv4 header.
    let hdr = unsafe { &*ip };
    if !plain_ipv4(ctx, hdr) {
        return None;
    }
    let datagram = datagram(hdr.saddr, hdr.daddr, hdr.id, hdr.protocol);
    // SAFETY: a FRAGS value, copied out at once.
    let ports = *unsafe { FRAGS.get(&datagram) }?;
    let key = FlowKey {
        saddr: hdr.saddr,
        daddr: hdr.daddr,
        sport: ports.source,
        dport: ports.dest,
        protocol: hdr.protocol,
        _pad0: 0,
        _pad1: 0,
    };
    // No L4 header in this frame: the flow's port and L4 checksum rewrite
    // lands in these two scratch words and goes nowhere.
    let mut scratch_ports = ports;
    let mut scratch_check = 0u16;
    let pkt = Packet {
        eth,
        ip,
        ports: &mut scratch_ports,
        l4_check: &mut scratch_check,
    };
    let now = flows::now();
    let (mut flow, table) = flow_of(&key, now)?;
    Some(if flow.direction == REPLY {
        reverse_nat(ctx, &pkt, &key, &mut flow)
    } else {
        forward(ctx, &pkt, &key, &mut flow, table, now)
    })
}

/// An IPv4 header the VIP rules accept: version 4, no options, total
/// length within the frame. Anything else is left to `parse_l4`.
#[inline(always)]
pub(crate) fn plain_ipv4(ctx: &XdpContext, hdr: &Ipv4Hdr) -> bool {
    let frame_ip_len = ctx.data_end() - ctx.data() - EthHdr::LEN;
    let tot_len = u16::from_be(hdr.tot_len) as usize;
    hdr.version() == 4
        && hdr.header_len() == Ipv4Hdr::LEN
        && tot_len >= Ipv4Hdr::LEN
        && tot_len <= frame_ip_len
}
