//! The flow lifecycle's pure rules, shared by the data plane and the agent's
//! sweep: states, idle timeouts on a coarse clock, and how the two entries
//! of a NAT flow name each other.
//!
//! ```text
//!   SYN (or hash-on-miss, or a UDP packet)   the handshake completed (`confirms`):
//!   ─────────────────────────────────► NEW ─────────────────────────────────────► ESTABLISHED
//!          (HALF_OPEN, 2-way slots)   NAT: ─SYN-ACK→ SYN_ACKED ─ACK of seq+1→  (CONNTRACK, never
//!                                     PICKED_UP ─backend segment→ …ANSWERED →   evicted by new flows)
//!                                     DSR: ─ACK→ ACKED ─segment past it→             │ FIN or RST in
//!                                     UDP: ─second packet→                           ▼ the window
//!                                                                                 CLOSING
//! ```
//! Every state has an idle timeout; an expired entry is a miss and is removed
//! (by the program when a packet finds it, by the agent's sweep otherwise).

use crate::{
    headers::{TCP_FLAG_ACK, TCP_FLAG_FIN, TCP_FLAG_RST, TCP_FLAG_SYN},
    maps::{Backend, FLOW_F_FULL_NAT, Flow, FlowConf, FlowKey},
};

/// Flow states (`Flow::state`). Half-open (in `HALF_OPEN`): a SYN or a
/// UDP packet created it.
pub const STATE_NEW: u32 = 0;
pub const STATE_ESTABLISHED: u32 = 1;
pub const STATE_CLOSING: u32 = 2;
/// Half-open, NAT: the backend answered the SYN with a SYN-ACK; the
/// client's ACK completes the handshake only if it acknowledges the
/// SYN-ACK's sequence number + 1 (kept in `Flow::seq`).
pub const STATE_SYN_ACKED: u32 = 3;
/// Half-open, TCP: picked up mid-stream (hash-on-miss: a segment without
/// SYN created it).
pub const STATE_PICKED_UP: u32 = 4;
/// Half-open, NAT: picked up mid-stream, and the backend has sent a
/// segment that is neither SYN nor RST on it: it holds this connection (a
/// backend answers a blind spoofer's segment with an RST, nothing else).
pub const STATE_PICKED_UP_ANSWERED: u32 = 5;
/// Half-open, DSR TCP, unconfirmed: the client's first segment without SYN
/// (the handshake's ACK) was seen, with the sequence number kept in
/// `Flow::seq`; a later client segment past it confirms the flow.
pub const STATE_ACKED: u32 = 6;

/// How far (either way) from the highest sequence number a direction's
/// sender has used a FIN or RST may be and still close the flow: 1 MiB.
/// The sender's own FIN/RST carries its next sequence number, which is that
/// plus at most the data in flight the LB has not seen yet; a blind
/// spoofer hits it with one guess in 2048 (one in 2^32 would need the
/// exact number, which a segment lost before the LB makes too strict).
pub const SEQ_WINDOW: u32 = 1 << 20;

/// Is `seq` within [`SEQ_WINDOW`] of `last` (wrapping)?
#[inline(always)]
pub const fn in_window(seq: u32, last: u32) -> bool {
    seq.wrapping_sub(last).wrapping_add(SEQ_WINDOW) <= 2 * SEQ_WINDOW
}

/// May a reply that arrived addressed to `to` (address, port; network
/// order) be the reply entry of the flow whose forward entry is `forward`,
/// once the reply has its NAT shape (backend → client)? A NAT flow's reply
/// comes to the client's address itself, so any; a full-NAT flow's was
/// sent to the flow's own source address and port (`Flow::vip`/`vport`),
/// and only to them: two full-NAT flows of one client port toward one
/// backend (two VIPs, say) have one NAT shape and differ only there.
#[inline(always)]
pub const fn replies_to(forward: &Flow, to: (u32, u16)) -> bool {
    forward.flags & FLOW_F_FULL_NAT == 0 || (forward.vip == to.0 && forward.vport == to.1)
}

/// Does a TCP sequence number `seq` advance past `last` (wrapping)?
#[inline(always)]
pub const fn advances(seq: u32, last: u32) -> bool {
    (seq.wrapping_sub(last) as i32) > 0
}

// The entry directions (`Flow::direction`) and the number of timeouts
// (`FlowConf::timeouts`) are part of the maps' layouts: declared there, so
// the layouts never import the flow rules.
pub use crate::maps::{FORWARD, REPLY, TIMEOUT_COUNT};

/// The clock is CLOCK_MONOTONIC_COARSE shifted right by this: a tick is
/// 2^30 ns, about 1.07 s. A shift, not a division, and a u32 of ticks lasts
/// 146 years. The data plane reads it as [`clock_ns`] of the kernel's
/// jiffies (`bpf_jiffies64`, which the verifier inlines into a load: no
/// helper call per packet), the agent as the clock itself.
pub const TICK_SHIFT: u32 = 30;
/// Nanoseconds per tick.
pub const TICK_NS: u64 = 1 << TICK_SHIFT;

/// Ticks a backend's shared next hop (`BackendHop`) serves new flows
/// before one of them asks the FIB again: a neighbour's new MAC reaches new
/// flows within about 4 s. (A flow keeps the hop it started with.)
pub const HOP_TTL: u32 = 4;

/// Which idle timeout applies (`FlowConf::timeouts` index).
#[repr(usize)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Timeout {
    /// TCP, handshake not complete (half-open).
    TcpHalfOpen = 0,
    /// TCP, established.
    Tcp = 1,
    /// TCP after a FIN or RST.
    TcpClosing = 2,
    /// UDP, any state.
    Udp = 3,
}

/// Ticks of monotonic time `ns`.
#[inline(always)]
pub const fn ticks(ns: u64) -> u32 {
    (ns >> TICK_SHIFT) as u32
}

/// The data plane's monotonic time from the kernel's `jiffies`: jiffies
/// advance with CLOCK_MONOTONIC_COARSE (both are moved by the timer tick),
/// so `jiffies × jiffy_ns − epoch_ns` is that clock to within a jiffy or
/// two (the agent measures `jiffy_ns` and `epoch_ns`, `FlowConf`). A
/// multiply and a subtract where `bpf_ktime_get_coarse_ns` was a helper
/// call (~15 ns) on every packet.
#[inline(always)]
pub const fn clock_ns(jiffies: u64, jiffy_ns: u32, epoch_ns: u64) -> u64 {
    jiffies.wrapping_mul(jiffy_ns as u64).wrapping_sub(epoch_ns)
}

/// A duration in whole ticks, rounded up so a timeout is never shorter than
/// configured (at least one tick).
pub const fn duration_ticks(ns: u64) -> u32 {
    let t = ns.div_ceil(TICK_NS);
    if t == 0 {
        1
    } else if t > u32::MAX as u64 {
        u32::MAX
    } else {
        t as u32
    }
}

/// The timeout of an entry of `protocol` in `state`.
#[inline(always)]
pub const fn timeout_for(protocol: u8, state: u32) -> Timeout {
    if protocol != crate::headers::IPPROTO_TCP {
        Timeout::Udp
    } else if state == STATE_ESTABLISHED {
        Timeout::Tcp
    } else if state == STATE_CLOSING {
        Timeout::TcpClosing
    } else {
        Timeout::TcpHalfOpen
    }
}

/// Has an entry last seen at `seen` been idle for longer than its timeout at
/// `now`? A tick later than `timeout` ticks: an entry is never dropped early.
/// A zero timeout (settings not written yet) never expires anything.
#[inline(always)]
pub fn is_expired(conf: &FlowConf, protocol: u8, flow: &Flow, now: u32) -> bool {
    is_idle(conf, protocol, flow.state, flow.seen, now)
}

/// [`is_expired`] of an entry in `state` last seen at `seen` (for readers
/// that hold the two words, not a whole entry).
#[inline(always)]
pub fn is_idle(conf: &FlowConf, protocol: u8, state: u32, seen: u32, now: u32) -> bool {
    let timeout = conf.timeouts[timeout_for(protocol, state) as usize];
    // Signed age: the data plane's clock may run up to 2 jiffies ahead of
    // the agent's, so near a tick boundary an entry can be stamped a tick
    // after the agent's `now`; that is age 0, not u32::MAX.
    timeout != 0 && (now.wrapping_sub(seen) as i32) > timeout as i32
}

/// How many ticks an entry last seen at `seen` has been idle at `now`, read
/// as [`is_idle`] reads it: signed, so an entry stamped a tick after the
/// agent's `now` (the data plane's clock runs up to two jiffies ahead) has
/// been idle 0 ticks, not 2^32 − 1.
#[inline(always)]
pub const fn idle_ticks(seen: u32, now: u32) -> u32 {
    let age = now.wrapping_sub(seen) as i32;
    if age < 0 { 0 } else { age as u32 }
}

/// Slots per `HALF_OPEN` bucket: a flow may sit in any slot of its bucket
/// (two ways, 128 bytes: the pair of lines a CPU fetches together). A new
/// flow replaces another only when both are taken, so flows lose their slot
/// to a collision rarely outside a flood (with k half-open flows in b
/// buckets, about (k/b)²/6 of them, against k/2b with one way).
pub const HALF_OPEN_WAYS: u32 = 2;

/// The first `HALF_OPEN` slot of a flow's bucket, from its client's address
/// and port and its protocol — what both directions carry (the client is
/// the source of a forward packet and the destination of a reply), so one
/// slot holds the whole flow and a reply finds it without an entry of its
/// own. Hashed with `seed`, then scaled onto the `slots / HALF_OPEN_WAYS`
/// buckets by a multiply and a shift (any size, no modulo); the bucket's
/// slots are that index and the next `HALF_OPEN_WAYS - 1`, all `< slots`.
#[inline(always)]
pub const fn slot_index(client: u32, client_port: u16, protocol: u8, seed: u32, slots: u32) -> u32 {
    slot_of_hash(bucket_hash(client, client_port, protocol, seed), slots)
}

/// The first slot of the bucket a [`bucket_hash`] names in a table of
/// `slots` slots.
#[inline(always)]
pub const fn slot_of_hash(hash: u32, slots: u32) -> u32 {
    crate::flow_table::first_way(hash, slots, HALF_OPEN_WAYS)
}

/// The seeded hash that places a flow's bucket ([`slot_index`]) and breaks
/// its victim ties ([`tie_replaces`]): [`crate::hash::client_hash`].
#[inline(always)]
pub const fn bucket_hash(client: u32, client_port: u16, protocol: u8, seed: u32) -> u32 {
    crate::hash::client_hash(client, client_port, protocol, seed)
}

/// Which [`bucket_hash`] placed the flows of a pair of tables, kept in
/// `FlowConf::table_version` with their seed. A new hash moves every
/// flow's bucket, so pinned tables placed by another one are refused, not
/// adopted (their flows would be looked for in the wrong buckets). 0: the
/// four-round hash of the tables before the version was kept (the field
/// was padding); 1: [`crate::hash::client_hash`]; 2: the same hash, and
/// `EstablishedSlot`'s word at offset 20 holds a PROXY v2 flow's `first`
/// (the bucket flags moved to the slot's last two bytes): version 1's
/// tables would be misread, so they are refused as well; 3: full NAT's
/// claims (`FNAT_CLAIMS`, pinned with the flow tables and under their
/// seed) placed by `fullnat::claim_bucket`'s runs of consecutive ports,
/// where version 2 hashed the whole tuple: a version 2 claim would be
/// looked for in another bucket, and its flow's replies lost.
pub const TABLE_VERSION: u32 = 3;

/// Were the flows of tables with these settings (a pinned `FLOW_CONF`)
/// placed by another [`bucket_hash`] than this version's? A conf never
/// written (no seed yet) placed nothing.
#[inline(always)]
pub const fn placed_by_another_hash(conf: &FlowConf) -> bool {
    conf.half_open_seed != 0 && conf.table_version != TABLE_VERSION
}

/// A new flow whose [`bucket_hash`] is `hash` finds, at slot `way` of its
/// bucket, the `ties`-th slot (counting this one) seen in the same tick as
/// the oldest so far, which under a flood is all of them: does it take
/// this one rather than the one chosen so far? Reservoir sampling with
/// bits of the hash for the dice (a byte further per way): as
/// unpredictable to a flooder as `bpf_get_prandom_u32`, since the hash is
/// keyed by the table's secret seed, and no helper call.
#[inline(always)]
pub const fn tie_replaces(hash: u32, way: u32, ties: u32) -> bool {
    ties != 0 && (hash.rotate_right(way * 8) & 0xffff).is_multiple_of(ties)
}

/// The tuple a NAT flow's replies arrive with: backend → client.
#[inline(always)]
pub fn reply_key(key: &FlowKey, backend: &Backend) -> FlowKey {
    FlowKey {
        saddr: backend.addr,
        daddr: key.saddr,
        sport: backend.port,
        dport: key.sport,
        protocol: key.protocol,
        _pad0: 0,
        _pad1: 0,
    }
}

/// The forward (client → VIP) key of the flow a reply entry belongs to.
#[inline(always)]
pub fn forward_key(reply: &FlowKey, entry: &Flow) -> FlowKey {
    FlowKey {
        saddr: reply.daddr,
        daddr: entry.vip,
        sport: reply.dport,
        dport: entry.vport,
        protocol: reply.protocol,
        _pad0: 0,
        _pad1: 0,
    }
}

/// What a client's packet does to its half-open flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Confirm {
    /// Forwarded; the flow stays half-open.
    No,
    /// Forwarded; it completes the handshake: the flow is promoted.
    Promote,
    /// Forwarded; the flow stays half-open in `state`, with `seq` as its
    /// `Flow::seq` (DSR: the handshake's ACK, unconfirmed).
    Record { state: u32, seq: u32 },
    /// NAT TCP: it claims to complete a handshake the backend did not
    /// answer (no SYN-ACK seen, or not acknowledging its sequence number +
    /// 1): dropped, nothing promoted.
    Refused,
}

/// The promotion rule for a client packet (TCP: its flags, sequence and
/// acknowledgement numbers; UDP: `tcp` false) on a half-open `flow` of a
/// NAT (`nat`) or DSR service. A SYN (a retransmission) and an RST never
/// promote.
/// - UDP: any other packet, the flow's second.
/// - NAT TCP: only a handshake the backend answered — for a SYN's flow the
///   client's ACK must acknowledge the SYN-ACK's sequence number + 1
///   (`Flow::seq`, [`answer`]); a flow picked up mid-stream is promoted once
///   the backend sent a segment on it that is neither SYN nor RST. A segment
///   that claims to complete a SYN's handshake otherwise is refused; one on
///   a picked-up flow the backend has not answered yet is only forwarded.
/// - DSR TCP (the LB never sees the backend's answers): the first segment
///   without SYN (the handshake's ACK) leaves the flow half-open,
///   unconfirmed, recording its sequence number; a later segment whose
///   sequence number is past it — the client sent data and then more —
///   promotes it. A blind spoofer's SYN + ACK pair therefore stays among
///   the half-open flows, which new flows replace.
#[inline(always)]
pub const fn confirms(
    flow: &Flow,
    tcp: bool,
    nat: bool,
    tcp_flags: u8,
    seq: u32,
    ack: u32,
) -> Confirm {
    if tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_RST) != 0 {
        return Confirm::No;
    }
    if !tcp {
        return Confirm::Promote;
    }
    if !nat {
        return match flow.state {
            STATE_ACKED if advances(seq, flow.seq) => Confirm::Promote,
            STATE_ACKED => Confirm::No,
            _ => Confirm::Record {
                state: STATE_ACKED,
                seq,
            },
        };
    }
    match flow.state {
        STATE_SYN_ACKED if tcp_flags & TCP_FLAG_ACK != 0 && ack == flow.seq => Confirm::Promote,
        STATE_PICKED_UP_ANSWERED => Confirm::Promote,
        STATE_PICKED_UP => Confirm::No,
        _ => Confirm::Refused,
    }
}

/// The half-open state a backend's segment (TCP flags, sequence number) on
/// a NAT flow in `state` moves it to, and the `Flow::seq` it records;
/// `None`: no change. A SYN-ACK answers a SYN's flow (a retransmitted one
/// may carry a new sequence number); a segment that is neither SYN nor RST
/// answers a flow picked up mid-stream.
#[inline(always)]
pub const fn answer(state: u32, seq_now: u32, tcp_flags: u8, seq: u32) -> Option<(u32, u32)> {
    let syn_ack =
        tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK | TCP_FLAG_RST) == TCP_FLAG_SYN | TCP_FLAG_ACK;
    match state {
        STATE_NEW if syn_ack => Some((STATE_SYN_ACKED, seq.wrapping_add(1))),
        STATE_SYN_ACKED if syn_ack && seq.wrapping_add(1) != seq_now => {
            Some((STATE_SYN_ACKED, seq.wrapping_add(1)))
        }
        STATE_PICKED_UP if tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_RST) == 0 => {
            Some((STATE_PICKED_UP_ANSWERED, 0))
        }
        _ => None,
    }
}

/// Does a packet with these TCP flags close the connection?
#[inline(always)]
pub const fn closes(tcp_flags: u8) -> bool {
    tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST) != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A full-NAT reply belongs only to the flow whose source address and
    /// port it was sent to; a NAT reply to any flow of its client and
    /// backend (the backend itself cannot tell those apart).
    #[test]
    fn a_full_nat_reply_belongs_only_to_the_flow_it_was_sent_to() {
        let source = (
            u32::from_be_bytes([198, 19, 0, 102]).to_be(),
            2000u16.to_be(),
        );
        let flow = Flow {
            vip: source.0,
            vport: source.1,
            flags: FLOW_F_FULL_NAT,
            ..Flow::default()
        };
        assert!(replies_to(&flow, source));
        // Another flow's source port, or another source address.
        assert!(!replies_to(&flow, (source.0, 2002u16.to_be())));
        assert!(!replies_to(&flow, (source.0 ^ 1, source.1)));
        // A NAT flow (its `vip` is the VIP): whatever the reply came to.
        let nat = Flow {
            vip: u32::from_be_bytes([198, 18, 0, 10]).to_be(),
            vport: 80u16.to_be(),
            ..Flow::default()
        };
        assert!(replies_to(
            &nat,
            (u32::from_be_bytes([198, 18, 1, 2]).to_be(), 4321)
        ));
    }
    use crate::headers::{IPPROTO_TCP, IPPROTO_UDP};

    fn conf() -> FlowConf {
        FlowConf {
            timeouts: [5, 900, 10, 60],
            ..FlowConf::default()
        }
    }

    #[test]
    fn slots_are_in_range_and_spread_evenly() {
        let slots = 1000;
        let mut hits = vec![0u32; slots as usize];
        for n in 0..100_000u32 {
            let (client, port) = (0x0a00_0000 + (n >> 8), (1024 + (n & 0xff)) as u16);
            let i = slot_index(client, port, IPPROTO_TCP, 0x1234_5678, slots);
            assert!(i + HALF_OPEN_WAYS <= slots && i.is_multiple_of(HALF_OPEN_WAYS));
            hits[i as usize] += 1;
        }
        // 200 keys per bucket on average: a fair hash keeps every bucket
        // within ±50 % of that (binomial σ ≈ 14).
        let buckets: Vec<u32> = hits
            .iter()
            .step_by(HALF_OPEN_WAYS as usize)
            .copied()
            .collect();
        assert!(
            buckets.iter().all(|&h| (100..=300).contains(&h)),
            "{buckets:?}"
        );
    }

    #[test]
    fn tables_placed_by_another_hash_are_told_apart() {
        let placed = |seed, table_version| FlowConf {
            half_open_seed: seed,
            table_version,
            ..FlowConf::default()
        };
        // This version's tables; a conf never written (no seed, no flow).
        assert!(!placed_by_another_hash(&placed(0x1234, TABLE_VERSION)));
        assert!(!placed_by_another_hash(&placed(0, 0)));
        // Before the version was kept (padding, 0), or a later hash.
        assert!(placed_by_another_hash(&placed(0x1234, 0)));
        assert!(placed_by_another_hash(&placed(0x1234, TABLE_VERSION + 1)));
        // And the hash did change: the same client under the same seed
        // lands elsewhere than under the four-round hash of version 0.
        let old = |n: u32| {
            crate::hash::seeded_flow_hash(
                &FlowKey {
                    saddr: n,
                    sport: 80,
                    protocol: IPPROTO_TCP,
                    ..FlowKey::default()
                },
                7,
            )
        };
        let moved = (0..1000u32)
            .filter(|&n| {
                slot_of_hash(old(n), 1 << 20) != slot_index(n, 80, IPPROTO_TCP, 7, 1 << 20)
            })
            .count();
        assert!(moved >= 995, "{moved}");
    }

    #[test]
    fn another_seed_moves_a_key_to_another_slot() {
        let slot = |seed, slots| slot_index(1, 3, IPPROTO_UDP, seed, slots);
        let moved = (1..100u32)
            .filter(|&seed| slot(seed, 1 << 16) != slot(0, 1 << 16))
            .count();
        assert!(moved >= 95, "{moved}");
        assert_eq!(slot(7, HALF_OPEN_WAYS), 0);
        assert_ne!(
            slot_index(1, 3, IPPROTO_UDP, 9, 1 << 16),
            slot_index(1, 3, IPPROTO_TCP, 9, 1 << 16),
            "the protocol counts"
        );
    }

    #[test]
    fn the_jiffies_clock_is_monotonic_time_on_the_agents_epoch() {
        // HZ = 250: 4 ms a jiffy; the kernel starts jiffies near 2^32.
        let (jiffy_ns, jiffies) = (4_000_000u32, 4_294_971_945u64);
        let coarse_ns = 362_637_914_117u64;
        let epoch = jiffies * u64::from(jiffy_ns) - coarse_ns;
        assert_eq!(clock_ns(jiffies, jiffy_ns, epoch), coarse_ns);
        // 250 jiffies later, one second later.
        assert_eq!(
            clock_ns(jiffies + 250, jiffy_ns, epoch),
            coarse_ns + 1_000_000_000
        );
        assert_eq!(
            ticks(clock_ns(jiffies + 250, jiffy_ns, epoch)) - ticks(coarse_ns),
            ((coarse_ns + 1_000_000_000) >> TICK_SHIFT) as u32 - ticks(coarse_ns)
        );
        // Not written yet: the clock stands at 0.
        assert_eq!(clock_ns(jiffies, 0, 0), 0);
    }

    #[test]
    fn ties_are_broken_by_the_keyed_hash_about_evenly() {
        assert!(!tie_replaces(5, 1, 0));
        assert!(tie_replaces(7, 0, 1), "the only candidate");
        // Over a flood's hashes, the second of two tied slots is taken
        // about half the time, and which one depends on the seed.
        let taken = |seed| {
            (0..10_000u32)
                .filter(|&n| tie_replaces(bucket_hash(n, (n >> 3) as u16, 6, seed), 1, 2))
                .count()
        };
        let (a, b) = (taken(1), taken(2));
        assert!((4_700..=5_300).contains(&a), "{a}");
        assert!((4_700..=5_300).contains(&b), "{b}");
        let differs = (0..1000u32)
            .filter(|&n| {
                tie_replaces(bucket_hash(n, 9, 6, 1), 1, 2)
                    != tie_replaces(bucket_hash(n, 9, 6, 2), 1, 2)
            })
            .count();
        assert!((400..=600).contains(&differs), "{differs}");
        // Three tied: each of the three ends up chosen about a third of the
        // time (the reservoir rule over ways 2 and 3).
        let mut chosen = [0u32; 3];
        for n in 0..30_000u32 {
            let h = bucket_hash(n, 1, 17, 3);
            let mut pick = 0;
            for way in 1..3 {
                if tie_replaces(h, way, way + 1) {
                    pick = way as usize;
                }
            }
            chosen[pick] += 1;
        }
        assert!(
            chosen.iter().all(|&c| (9_000..=11_000).contains(&c)),
            "{chosen:?}"
        );
    }

    #[test]
    fn a_fin_or_rst_closes_only_within_the_window_of_its_senders_sequence() {
        let last = 0xffff_fff0;
        assert!(in_window(last, last));
        assert!(in_window(last.wrapping_add(SEQ_WINDOW), last));
        assert!(in_window(last.wrapping_sub(SEQ_WINDOW), last));
        assert!(!in_window(last.wrapping_add(SEQ_WINDOW + 1), last));
        assert!(!in_window(last.wrapping_sub(SEQ_WINDOW + 1), last));
        assert!(!in_window(last.wrapping_add(1 << 31), last));
        // A blind guess: 2 * SEQ_WINDOW + 1 of 2^32 numbers pass.
        let hits = (0..1u64 << 16)
            .filter(|i| in_window((i << 16) as u32, 0x1234_5678))
            .count();
        assert_eq!(hits, 32);
        assert!(advances(5, 0xffff_fff0) && !advances(0xffff_fff0, 5) && !advances(7, 7));
    }

    #[test]
    fn timeouts_follow_protocol_and_state() {
        for half_open in [
            STATE_NEW,
            STATE_SYN_ACKED,
            STATE_PICKED_UP,
            STATE_PICKED_UP_ANSWERED,
            STATE_ACKED,
        ] {
            assert_eq!(timeout_for(IPPROTO_TCP, half_open), Timeout::TcpHalfOpen);
        }
        assert_eq!(timeout_for(IPPROTO_TCP, STATE_NEW), Timeout::TcpHalfOpen);
        assert_eq!(timeout_for(IPPROTO_TCP, STATE_ESTABLISHED), Timeout::Tcp);
        assert_eq!(timeout_for(IPPROTO_TCP, STATE_CLOSING), Timeout::TcpClosing);
        for state in [STATE_NEW, STATE_ESTABLISHED, STATE_CLOSING] {
            assert_eq!(timeout_for(IPPROTO_UDP, state), Timeout::Udp);
        }
    }

    #[test]
    fn an_entry_expires_only_after_its_whole_timeout() {
        let flow = Flow {
            state: STATE_CLOSING,
            seen: 100,
            ..Flow::default()
        };
        assert!(!is_expired(&conf(), IPPROTO_TCP, &flow, 110));
        assert!(is_expired(&conf(), IPPROTO_TCP, &flow, 111));
        // The clock wraps; the difference does not.
        let old = Flow {
            seen: u32::MAX - 2,
            ..flow
        };
        assert!(!is_expired(&conf(), IPPROTO_TCP, &old, 7));
        assert!(is_expired(&conf(), IPPROTO_TCP, &old, 8));
    }

    #[test]
    fn an_entry_stamped_after_the_agents_now_has_been_idle_no_time() {
        assert_eq!(idle_ticks(100, 110), 10);
        assert_eq!(idle_ticks(100, 100), 0);
        // The data plane's clock is ahead near a tick boundary.
        assert_eq!(idle_ticks(101, 100), 0);
        assert_eq!(idle_ticks(0, u32::MAX), 0);
        // The clock wraps; the difference does not.
        assert_eq!(idle_ticks(u32::MAX - 2, 7), 10);
    }

    #[test]
    fn durations_round_up_to_whole_ticks() {
        assert_eq!(duration_ticks(0), 1);
        assert_eq!(duration_ticks(1), 1);
        assert_eq!(duration_ticks(TICK_NS), 1);
        assert_eq!(duration_ticks(TICK_NS + 1), 2);
        assert_eq!(duration_ticks(2_000_000_000), 2);
        assert_eq!(duration_ticks(u64::MAX), u32::MAX);
    }

    #[test]
    fn reply_and_forward_keys_name_each_other() {
        let key = FlowKey {
            saddr: 0x0200_12c6,
            daddr: 0x0a00_12c6,
            sport: 0x3930,
            dport: 0x5000,
            protocol: IPPROTO_TCP,
            _pad0: 0,
            _pad1: 0,
        };
        let backend = Backend {
            addr: 0x0b00_13c6,
            port: 0x5000,
            ..Backend::default()
        };
        let reply = reply_key(&key, &backend);
        assert_eq!((reply.saddr, reply.sport), (backend.addr, backend.port));
        assert_eq!((reply.daddr, reply.dport), (key.saddr, key.sport));
        let entry = Flow {
            vip: key.daddr,
            vport: key.dport,
            direction: REPLY,
            ..Flow::default()
        };
        assert_eq!(forward_key(&reply, &entry), key);
    }

    #[test]
    fn a_nat_flow_is_promoted_only_by_a_handshake_its_backend_answered() {
        let (syn, ack, rst) = (TCP_FLAG_SYN, TCP_FLAG_ACK, TCP_FLAG_RST);
        let flow = |state, seq| Flow {
            state,
            seq,
            ..Flow::default()
        };
        let nat = |f: &Flow, flags, ack| confirms(f, true, true, flags, 0, ack);
        // UDP: any packet (NAT or DSR).
        let udp = |nat| confirms(&flow(STATE_NEW, 0), false, nat, 0, 0, 0);
        assert_eq!(
            (udp(true), udp(false)),
            (Confirm::Promote, Confirm::Promote)
        );
        // NAT: a spoofed SYN then ACK — no SYN-ACK seen — is refused.
        assert_eq!(nat(&flow(STATE_NEW, 0), ack, 1), Confirm::Refused);
        assert_eq!(nat(&flow(STATE_NEW, 0), syn, 0), Confirm::No);
        assert_eq!(nat(&flow(STATE_NEW, 0), rst | ack, 0), Confirm::No);
        // The SYN-ACK (seq 0xffff_ffff) records the ACK that completes it.
        let (state, expect) = answer(STATE_NEW, 0, syn | ack, u32::MAX).expect("answered");
        assert_eq!((state, expect), (STATE_SYN_ACKED, 0));
        let answered = flow(state, expect);
        assert_eq!(nat(&answered, ack, 0), Confirm::Promote);
        assert_eq!(nat(&answered, ack, 1), Confirm::Refused);
        assert_eq!(nat(&answered, 0, 0), Confirm::Refused, "no ACK flag");
        assert_eq!(nat(&answered, syn, 0), Confirm::No);
        // A retransmitted SYN-ACK with the same number changes nothing; an
        // RST or a bare ACK from the backend answers nothing.
        assert_eq!(answer(STATE_SYN_ACKED, 0, syn | ack, u32::MAX), None);
        assert_eq!(
            answer(STATE_SYN_ACKED, 0, syn | ack, 5),
            Some((STATE_SYN_ACKED, 6))
        );
        assert_eq!(answer(STATE_NEW, 0, rst | ack, 5), None);
        assert_eq!(answer(STATE_NEW, 0, ack, 5), None);
        // Picked up mid-stream: forwarded until the backend shows it has the
        // connection (not by an RST, which it sends a spoofer).
        let picked = flow(STATE_PICKED_UP, 0);
        assert_eq!(nat(&picked, ack, 9), Confirm::No);
        assert_eq!(answer(STATE_PICKED_UP, 0, rst, 5), None);
        let (state, _) = answer(STATE_PICKED_UP, 0, ack, 5).expect("answered");
        assert_eq!(nat(&flow(state, 0), ack, 9), Confirm::Promote);
    }

    #[test]
    fn a_dsr_flow_is_promoted_only_by_a_client_segment_past_its_handshake() {
        let (syn, ack, rst) = (TCP_FLAG_SYN, TCP_FLAG_ACK, TCP_FLAG_RST);
        let dsr = |state, last, flags, seq| {
            let f = Flow {
                state,
                seq: last,
                ..Flow::default()
            };
            confirms(&f, true, false, flags, seq, 0x5555)
        };
        // The handshake's ACK (or a picked-up flow's next segment) is
        // recorded, unconfirmed.
        let acked = Confirm::Record {
            state: STATE_ACKED,
            seq: 100,
        };
        assert_eq!(dsr(STATE_NEW, 0, ack, 100), acked);
        assert_eq!(dsr(STATE_PICKED_UP, 0, ack, 100), acked);
        assert_eq!(dsr(STATE_NEW, 0, syn, 100), Confirm::No);
        assert_eq!(dsr(STATE_NEW, 0, rst, 100), Confirm::No);
        // A spoofer's repeated ACK, or the request at the same sequence
        // number, does not confirm; the next segment past it does.
        assert_eq!(dsr(STATE_ACKED, 100, ack, 100), Confirm::No);
        assert_eq!(dsr(STATE_ACKED, 100, ack, 99), Confirm::No);
        assert_eq!(dsr(STATE_ACKED, 100, ack, 101), Confirm::Promote);
        assert_eq!(dsr(STATE_ACKED, u32::MAX, ack, 3), Confirm::Promote);
        assert_eq!(dsr(STATE_ACKED, 100, rst, 200), Confirm::No);
    }

    #[test]
    fn fin_or_rst_close() {
        assert!(closes(TCP_FLAG_FIN | TCP_FLAG_ACK));
        assert!(closes(TCP_FLAG_RST));
        assert!(!closes(TCP_FLAG_ACK));
    }
}
