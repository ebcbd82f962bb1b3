//! Path MTU beyond the LB's own link, for the tunnels (docs/architecture.md,
//! "Path MTU beyond the next hop"; the judgement in `lb_common::tunnel`,
//! tested on the host).
//!
//! The tunnel's too-big check knows the MTU of the LB's next hop only. A
//! router further on with a smaller link sends its "fragmentation needed"
//! to the outer packet's source, the LB's tunnel source, quoting the outer
//! packet (at least its header and 8 bytes, RFC 792; the inner header too
//! when it quotes more, RFC 1812). Nothing would tell the client, and its
//! upload would stall. Two halves:
//!
//! - [`learn`], asked by `icmp` for every ICMP error quoting a packet with
//!   ports-or-more: a "fragmentation needed" about one of our tunnel
//!   packets records the reported MTU for the quoted backend in
//!   `TUNNEL_PMTU` (only in an entry the agent made for a current tunnel
//!   backend from that source; clamped to `PMTU_FLOOR`; only ever lowered
//!   while it lives; 10 minutes), counted in `TUNNEL_PMTU_STATS`. The
//!   message then goes on to the kernel as before. Whether the quote holds
//!   the inner header does not matter: the MTU is the backend's path's,
//!   whichever flow met it.
//! - [`beyond`], asked by `transmit` for a tunnel packet that fits the next
//!   hop: does it fit the backend's learned path MTU? If not, the client
//!   gets "fragmentation needed" with that MTU less the overhead, as for
//!   the LB's own link. Until a first MTU is learned (`TUNNEL_PMTU_UNTIL`
//!   is 0), this is one array read.

use aya_ebpf::{
    helpers::bpf_ktime_get_ns,
    macros::map,
    maps::{Array, HashMap, PerCpuArray},
};
use lb_common::{
    MAX_BACKENDS,
    headers::{Ipv4Hdr, L4Ports},
    icmp::{ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, IcmpHdr},
    tunnel::{
        PMTU_COUNTERS, PMTU_EXPIRY_NS, PmtuCounter, PmtuJudgement, QuotedOuter, TunnelPmtu,
        beyond_learned, judge_frag_needed,
    },
};

use crate::{
    fib::{FIB_FRAG_NEEDED, FIB_SUCCESS},
    verdict::count,
};

/// Tunnel backend address → its tunnel source, GUE port and learned path
/// MTU. The agent makes and removes the entries; the data plane only
/// updates them.
#[map]
static TUNNEL_PMTU: HashMap<u32, TunnelPmtu> = HashMap::with_max_entries(MAX_BACKENDS, 0);
/// [`PmtuCounter`] → messages, per CPU.
#[map]
static TUNNEL_PMTU_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(PMTU_COUNTERS, 0);
/// `[0]`: the latest expiry of any MTU learned (`bpf_ktime_get_ns`); 0:
/// none ever. Past it, no entry is live and [`beyond`] reads nothing more.
#[map]
static TUNNEL_PMTU_UNTIL: Array<u64> = Array::with_max_entries(1, 0);

/// An ICMP error to `ip`'s destination quoting `quoted` (its first ports
/// `ports`): if it is "fragmentation needed" about one of our tunnel
/// packets, its MTU is learned or refused (and counted); `true` then, and
/// the message is not a flow's. The caller bounds-checked all four.
#[inline(always)]
pub(crate) fn learn(ip: &Ipv4Hdr, icmp: &IcmpHdr, quoted: &Ipv4Hdr, ports: &L4Ports) -> bool {
    if icmp.kind != ICMP_DEST_UNREACH || icmp.code != ICMP_FRAG_NEEDED {
        return false;
    }
    let q = QuotedOuter {
        icmp_daddr: ip.daddr,
        next_hop_mtu: u16::from_be(icmp.mtu),
        outer: *quoted,
        udp_dport: ports.dest,
    };
    // Copied out: the header is packed.
    let backend = quoted.daddr;
    let entry = TUNNEL_PMTU.get_ptr_mut(&backend);
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: a map value, updated field by field below; a racing update
    // from another CPU leaves one of two believable MTUs.
    let judged = judge_frag_needed(&q, entry.map(|e| unsafe { &*e }), now);
    let counter = match judged {
        PmtuJudgement::NotATunnel => return false,
        PmtuJudgement::Refused => PmtuCounter::Refused,
        PmtuJudgement::Learn { mtu, clamped } => {
            let Some(entry) = entry else {
                return false;
            };
            let expires = now + PMTU_EXPIRY_NS;
            // SAFETY: as above.
            unsafe {
                (*entry).mtu = mtu;
                (*entry).expires_ns = expires;
            }
            if let Some(until) = TUNNEL_PMTU_UNTIL.get_ptr_mut(0) {
                // SAFETY: a map value; a racing store writes a time as late.
                unsafe { *until = expires };
            }
            if clamped {
                PmtuCounter::Clamped
            } else {
                PmtuCounter::Learned
            }
        }
    };
    count(&TUNNEL_PMTU_STATS, counter as u32, 1, 0);
    true
}

/// `rc` and `mtu` of the tunnel's next hop for an outer packet of
/// `outer_len` bytes to `backend` (raw network order), with the backend's
/// learned path MTU applied: `(FIB_FRAG_NEEDED, learned)` when it fits the
/// hop but not the path beyond.
#[inline(always)]
pub(crate) fn beyond(rc: i64, mtu: u16, backend: u32, outer_len: u16) -> (i64, u16) {
    if rc != FIB_SUCCESS {
        return (rc, mtu);
    }
    let Some(&until) = TUNNEL_PMTU_UNTIL.get(0) else {
        return (rc, mtu);
    };
    if until == 0 {
        return (rc, mtu);
    }
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    if now >= until {
        return (rc, mtu);
    }
    // SAFETY: a map value, only read.
    let Some(entry) = (unsafe { TUNNEL_PMTU.get(&backend) }) else {
        return (rc, mtu);
    };
    match beyond_learned(entry, outer_len, now) {
        Some(learned) => (FIB_FRAG_NEEDED, learned),
        None => (rc, mtu),
    }
}
