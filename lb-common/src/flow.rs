//! The flow lifecycle's pure rules, shared by the data plane and the agent's
//! sweep: states, idle timeouts on a coarse clock, and how the two entries
//! of a NAT flow name each other.
//!
//! ```text
//!   SYN (or hash-on-miss, or a UDP packet)        client packet without SYN
//!   ─────────────────────────────────────► NEW ───────────────────────────► ESTABLISHED
//!                                 (HALF_OPEN, LRU)                      (CONNTRACK, never evicted)
//!                                                                              │ FIN or RST
//!                                                                              ▼
//!                                                                           CLOSING
//! ```
//! Every state has an idle timeout; an expired entry is a miss and is removed
//! (by the program when a packet finds it, by the agent's sweep otherwise).

use crate::{
    headers::{TCP_FLAG_FIN, TCP_FLAG_RST, TCP_FLAG_SYN},
    maps::{Backend, Flow, FlowConf, FlowKey},
};

/// Flow states (`Flow::state`).
pub const STATE_NEW: u32 = 0;
pub const STATE_ESTABLISHED: u32 = 1;
pub const STATE_CLOSING: u32 = 2;

/// Entry directions (`Flow::direction`).
pub const FORWARD: u8 = 0;
pub const REPLY: u8 = 1;

/// The clock is `bpf_ktime_get_coarse_ns` (CLOCK_MONOTONIC, coarse) shifted
/// right by this: a tick is 2^30 ns, about 1.07 s. A shift, not a division,
/// and a u32 of ticks lasts 146 years.
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
pub const TIMEOUT_COUNT: usize = 4;

/// Ticks of monotonic time `ns`.
#[inline(always)]
pub const fn ticks(ns: u64) -> u32 {
    (ns >> TICK_SHIFT) as u32
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
    } else if state == STATE_NEW {
        Timeout::TcpHalfOpen
    } else if state == STATE_CLOSING {
        Timeout::TcpClosing
    } else {
        Timeout::Tcp
    }
}

/// Has an entry last seen at `seen` been idle for longer than its timeout at
/// `now`? A tick later than `timeout` ticks: an entry is never dropped early.
/// A zero timeout (settings not written yet) never expires anything.
#[inline(always)]
pub fn is_expired(conf: &FlowConf, protocol: u8, flow: &Flow, now: u32) -> bool {
    let timeout = conf.timeouts[timeout_for(protocol, flow.state) as usize];
    timeout != 0 && now.wrapping_sub(flow.seen) > timeout
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
    bucket_index(client, client_port, protocol, seed, slots / HALF_OPEN_WAYS) * HALF_OPEN_WAYS
}

#[inline(always)]
const fn bucket_index(client: u32, client_port: u16, protocol: u8, seed: u32, buckets: u32) -> u32 {
    let key = FlowKey {
        saddr: client,
        daddr: 0,
        sport: client_port,
        dport: 0,
        protocol,
        _pad0: 0,
        _pad1: 0,
    };
    let h = crate::hash::seeded_flow_hash(&key, seed);
    ((h as u64 * buckets as u64) >> 32) as u32
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

/// Does a client packet with these TCP flags (0 for UDP) confirm a half-open
/// flow? Any client packet that is not a SYN: the handshake's ACK, or the
/// second packet of a flow created on a miss (the creating packet never
/// promotes its own entry).
#[inline(always)]
pub const fn confirms(tcp_flags: u8) -> bool {
    tcp_flags & TCP_FLAG_SYN == 0
}

/// Does a packet with these TCP flags close the connection?
#[inline(always)]
pub const fn closes(tcp_flags: u8) -> bool {
    tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST) != 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::headers::{IPPROTO_TCP, IPPROTO_UDP, TCP_FLAG_ACK};

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
    fn timeouts_follow_protocol_and_state() {
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
    fn only_non_syn_packets_confirm_and_fin_or_rst_close() {
        assert!(!confirms(TCP_FLAG_SYN));
        assert!(!confirms(TCP_FLAG_SYN | TCP_FLAG_ACK));
        assert!(confirms(TCP_FLAG_ACK));
        assert!(confirms(0)); // UDP
        assert!(closes(TCP_FLAG_FIN | TCP_FLAG_ACK));
        assert!(closes(TCP_FLAG_RST));
        assert!(!closes(TCP_FLAG_ACK));
    }
}
