//! The established table's pure rules (issue 23): where a flow's slot is,
//! which way of its bucket a flow being established takes, when a lookup
//! must also probe the overflow table, and how a slot ([`EstablishedSlot`],
//! one flow, both directions) reads as the [`Flow`] entries the packet path
//! and the agent work with.
//!
//! The table is a set-associative array of two-line slots, [`WAYS`] to a
//! bucket, indexed by the same seeded hash of the client's address, port
//! and protocol as `HALF_OPEN` ([`crate::flow::bucket_hash`]): an attacker
//! who does not know the seed cannot aim at a bucket, and both directions
//! of a flow carry the client (source of a forward packet, destination of a
//! reply), so one slot serves both.
//!
//! Nothing established is ever evicted: a flow whose bucket's ways all hold
//! live flows goes to the overflow table (a kernel hash) and sets the
//! bucket's [`SLOT_F_OVERFLOWED`] bit, and only a lookup that misses a
//! flagged bucket probes the overflow ([`probes_overflow`]); the sweep
//! clears the bit once no overflowed flow of the bucket is left.
//!
//! The indexing only needs a key's client hash ([`ClientKey`]), so a wider
//! (IPv6) key and slot can use the same rules.

use crate::{
    flow::{bucket_hash, is_expired},
    maps::{EstablishedSlot, Flow, FlowConf, FlowKey, SLOT_F_OVERFLOWED},
};

/// Ways per bucket of the established table: two two-line slots, 256
/// bytes. Two ways keep a flow's first choice for all but a few flows at
/// the table's rated fill (see the tests' measurement), and a lookup is at
/// most two key compares.
pub const WAYS: u32 = 2;

/// A flow-table key that places its flow by the client (what both of its
/// directions carry).
pub trait ClientKey {
    /// The seeded hash of the client's address, port and protocol.
    fn client_hash(&self, seed: u32) -> u32;
}

impl ClientKey for FlowKey {
    /// A forward key's client is its source.
    #[inline(always)]
    fn client_hash(&self, seed: u32) -> u32 {
        bucket_hash(self.saddr, self.sport, self.protocol, seed)
    }
}

/// The first slot of the bucket a client hash names, in a table of
/// `slots` slots and `ways` ways to a bucket: the hash scaled onto the
/// `slots / ways` buckets by a multiply and a shift (any size, no modulo).
/// The bucket's slots are that one and the next `ways - 1`, all `< slots`.
#[inline(always)]
pub const fn first_way(hash: u32, slots: u32, ways: u32) -> u32 {
    let buckets = slots / ways;
    (((hash as u64 * buckets as u64) >> 32) as u32) * ways
}

/// The first slot of the established-table bucket of the flow whose
/// forward key is `key`.
#[inline(always)]
pub fn bucket_of<K: ClientKey>(key: &K, seed: u32, slots: u32) -> u32 {
    first_way(key.client_hash(seed), slots, WAYS)
}

/// What a way of a flow's bucket holds, as the flow being established sees
/// it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Way {
    /// Nothing.
    Empty,
    /// This very flow (established already: a retransmitted confirmation,
    /// or a flow a peer synchronised).
    Same,
    /// Another flow idle past its timeout: free to take (the sweep would
    /// remove it; its backend's count is the taker's to settle).
    Expired,
    /// Another live flow: never taken.
    Live,
}

/// What a way holds, from its key and entry.
#[inline(always)]
pub fn way_of(stored: &FlowKey, entry: &Flow, key: &FlowKey, conf: &FlowConf, now: u32) -> Way {
    if *stored == FlowKey::EMPTY {
        Way::Empty
    } else if stored == key {
        Way::Same
    } else if is_expired(conf, stored.protocol, entry, now) {
        Way::Expired
    } else {
        Way::Live
    }
}

/// Where a flow being established goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Place {
    /// This way of its bucket.
    Way(u32),
    /// The overflow table: every way holds a live flow.
    Overflow,
}

/// The way a flow being established takes: its own if it is there, else
/// the first empty one, else the first expired one; if all hold live flows,
/// the overflow. A live flow is never replaced, so no number of new flows
/// (a SYN flood, forged handshakes) can end an established one.
#[inline(always)]
pub const fn place<const N: usize>(ways: &[Way; N]) -> Place {
    let mut empty = None;
    let mut expired = None;
    let mut i = 0;
    while i < N {
        match ways[i] {
            Way::Same => return Place::Way(i as u32),
            Way::Empty if empty.is_none() => empty = Some(i as u32),
            Way::Expired if expired.is_none() => expired = Some(i as u32),
            _ => {}
        }
        i += 1;
    }
    match (empty, expired) {
        (Some(w), _) | (None, Some(w)) => Place::Way(w),
        (None, None) => Place::Overflow,
    }
}

/// Must a lookup that missed its bucket probe the overflow table? Only if
/// a flow of the bucket went there (`flags`: the bucket's first way's), so
/// the common miss (a new flow) costs no hash probe.
#[inline(always)]
pub const fn probes_overflow(first_way_flags: u32) -> bool {
    first_way_flags & SLOT_F_OVERFLOWED != 0
}

/// A flow's slot, made from its forward entry `forward` (key `key`) and,
/// for a NAT flow, its backend's endpoint (`backend`: address and port,
/// network order) and reply entry. Unlocked (`seq` 0), bucket bit clear:
/// the writer keeps those of the slot it writes.
#[inline(always)]
pub fn slot_of(
    key: &FlowKey,
    forward: &Flow,
    reply: Option<((u32, u16), &Flow)>,
) -> EstablishedSlot {
    let mut slot = EstablishedSlot {
        key: *key,
        forward: *forward,
        ..EstablishedSlot::default()
    };
    if let Some(((addr, port), entry)) = reply {
        slot.backend_addr = addr;
        slot.backend_port = port;
        slot.reply = *entry;
    }
    slot
}

/// Does the slot hold a NAT flow (a reply side)?
#[inline(always)]
pub const fn is_nat(slot: &EstablishedSlot) -> bool {
    slot.forward.vip != 0
}

/// The reply key and entry of a NAT flow's slot (`None`: DSR or empty).
#[inline(always)]
pub fn reply_entry(slot: &EstablishedSlot) -> Option<(FlowKey, Flow)> {
    if !is_nat(slot) || slot.key == FlowKey::EMPTY {
        return None;
    }
    Some((reply_key_of(slot), slot.reply))
}

/// The tuple a NAT flow's replies arrive with: its backend → its client.
#[inline(always)]
pub const fn reply_key_of(slot: &EstablishedSlot) -> FlowKey {
    FlowKey {
        saddr: slot.backend_addr,
        daddr: slot.key.saddr,
        sport: slot.backend_port,
        dport: slot.key.sport,
        protocol: slot.key.protocol,
        _pad0: 0,
        _pad1: 0,
    }
}

/// Every entry a slot holds as (key as its packets arrive, entry): the
/// forward one, and a NAT flow's reply (none for an empty slot). The
/// agent's readers see the table as the two-entries-per-NAT-flow table
/// `CONNTRACK` was.
#[inline(always)]
pub fn entries_of(slot: &EstablishedSlot) -> impl Iterator<Item = (FlowKey, Flow)> {
    let forward = (slot.key != FlowKey::EMPTY).then_some((slot.key, slot.forward));
    forward.into_iter().chain(reply_entry(slot))
}

/// Is `key` (a packet backend → client) the reply of the NAT flow in
/// `slot`? Its destination is the slot's client and its source the slot's
/// backend.
#[inline(always)]
pub fn is_reply_of(slot: &EstablishedSlot, key: &FlowKey) -> bool {
    is_nat(slot) && *key == reply_key_of(slot)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        flow::{REPLY, STATE_CLOSING, STATE_ESTABLISHED, reply_key},
        headers::{IPPROTO_TCP, IPPROTO_UDP},
        maps::{Backend, NextHop},
    };

    fn key(client: u32, port: u16) -> FlowKey {
        FlowKey {
            saddr: client,
            daddr: 0xc612_0001,
            sport: port,
            dport: 80u16.to_be(),
            protocol: IPPROTO_TCP,
            _pad0: 0,
            _pad1: 0,
        }
    }

    fn flow(seen: u32, state: u32) -> Flow {
        Flow {
            backend_id: 7,
            service_id: 3,
            state,
            seen,
            ..Flow::default()
        }
    }

    fn conf() -> FlowConf {
        FlowConf {
            timeouts: [5, 900, 10, 60],
            ..FlowConf::default()
        }
    }

    #[test]
    fn a_flow_and_its_replies_share_the_clients_bucket() {
        let seed = 0x5eed_1234;
        let slots = 1 << 20;
        let fwd = key(0xc612_0a01, 40000u16.to_be());
        let backend = Backend {
            addr: 0xc613_0002,
            port: 8080u16.to_be(),
            ..Backend::default()
        };
        let reply = reply_key(&fwd, &backend);
        let first = bucket_of(&fwd, seed, slots);
        assert!(first.is_multiple_of(WAYS) && first + WAYS <= slots);
        // The reply's bucket is its destination's: the same client.
        assert_eq!(
            first,
            first_way(
                bucket_hash(reply.daddr, reply.dport, reply.protocol, seed),
                slots,
                WAYS
            )
        );
        // The same bucket rule as HALF_OPEN's (two ways there too).
        assert_eq!(
            first,
            crate::flow::slot_index(fwd.saddr, fwd.sport, fwd.protocol, seed, slots)
        );
        // Another seed moves it (an attacker cannot aim without it).
        assert_ne!(first, bucket_of(&fwd, seed ^ 1, slots));
    }

    #[test]
    fn buckets_are_in_range_for_any_size_and_spread_evenly() {
        for slots in [WAYS, 2 * WAYS, 1000, 1 << 21, (16 << 20) * 2] {
            for n in 0..2000u32 {
                let i = bucket_of(&key(n * 7919, n as u16), 42, slots);
                assert!(i.is_multiple_of(WAYS) && i + WAYS <= slots, "{slots} {i}");
            }
        }
        let slots = 1024;
        let mut hits = vec![0u32; (slots / WAYS) as usize];
        for n in 0..102_400u32 {
            hits[(bucket_of(&key(0x0a00_0000 + (n >> 8), n as u16), 9, slots) / WAYS) as usize] +=
                1;
        }
        // 200 flows a bucket on average (σ ≈ 14).
        assert!(hits.iter().all(|&h| (130..=270).contains(&h)), "{hits:?}");
    }

    #[test]
    fn an_established_flow_is_never_replaced_a_full_bucket_overflows() {
        use Way::*;
        assert_eq!(place(&[Live, Live]), Place::Overflow);
        assert_eq!(place(&[Live, Empty]), Place::Way(1));
        assert_eq!(place(&[Empty, Empty]), Place::Way(0));
        assert_eq!(place(&[Live, Expired]), Place::Way(1));
        // An empty way before an expired one: nothing is removed needlessly.
        assert_eq!(place(&[Expired, Empty]), Place::Way(1));
        // The flow's own way wins wherever it is: no second slot for it.
        assert_eq!(place(&[Empty, Same]), Place::Way(1));
        assert_eq!(place(&[Expired, Same]), Place::Way(1));
        assert_eq!(place(&[Live, Live, Live, Same]), Place::Way(3));

        let conf = conf();
        let me = key(1, 1);
        let other = key(2, 2);
        let now = 1000;
        assert_eq!(way_of(&FlowKey::EMPTY, &flow(0, 0), &me, &conf, now), Empty);
        assert_eq!(
            way_of(&me, &flow(now, STATE_ESTABLISHED), &me, &conf, now),
            Same
        );
        // Established TCP: 900 ticks; closing: 10.
        assert_eq!(
            way_of(&other, &flow(now - 900, STATE_ESTABLISHED), &me, &conf, now),
            Live
        );
        assert_eq!(
            way_of(&other, &flow(now - 901, STATE_ESTABLISHED), &me, &conf, now),
            Expired
        );
        assert_eq!(
            way_of(&other, &flow(now - 11, STATE_CLOSING), &me, &conf, now),
            Expired
        );
        // Timeouts not written yet: nothing expires, nothing is taken.
        assert_eq!(
            way_of(
                &other,
                &flow(0, STATE_ESTABLISHED),
                &me,
                &FlowConf::default(),
                now
            ),
            Live
        );
    }

    #[test]
    fn only_a_flagged_bucket_sends_a_miss_to_the_overflow() {
        assert!(!probes_overflow(0));
        assert!(!probes_overflow(!SLOT_F_OVERFLOWED));
        assert!(probes_overflow(SLOT_F_OVERFLOWED));
        assert!(probes_overflow(u32::MAX));
    }

    #[test]
    fn one_slot_holds_both_directions_of_a_nat_flow() {
        let fwd = key(0xc612_0a01, 40000u16.to_be());
        let backend = Backend {
            addr: 0xc613_0002,
            port: 8080u16.to_be(),
            ..Backend::default()
        };
        let hop = |i| NextHop {
            ifindex: i,
            dmac: [i as u8; 6],
            smac: [2; 6],
            mtu: 1500,
            _pad: 0,
        };
        let forward = Flow {
            vip: fwd.daddr,
            seq: 111,
            next_hop: hop(4),
            flags: 1,
            ..flow(50, STATE_ESTABLISHED)
        };
        let rkey = reply_key(&fwd, &backend);
        let reply = Flow {
            vip: fwd.daddr,
            vport: fwd.dport,
            direction: REPLY,
            seq: 222,
            next_hop: hop(5),
            ..flow(51, STATE_ESTABLISHED)
        };
        let slot = slot_of(&fwd, &forward, Some(((backend.addr, backend.port), &reply)));
        assert_eq!((slot.key, slot.forward), (fwd, forward));
        assert_eq!(reply_entry(&slot), Some((rkey, reply)));
        assert_eq!(
            entries_of(&slot).collect::<Vec<_>>(),
            [(fwd, forward), (rkey, reply)]
        );
        assert!(is_reply_of(&slot, &rkey));
        // Not a reply: the client's own packet, another backend, another
        // client port, another protocol.
        assert!(!is_reply_of(&slot, &fwd));
        for other in [
            FlowKey {
                saddr: 0xc613_0003,
                ..rkey
            },
            FlowKey { dport: 1, ..rkey },
            FlowKey {
                protocol: IPPROTO_UDP,
                ..rkey
            },
        ] {
            assert!(!is_reply_of(&slot, &other));
        }

        // DSR: no reply side.
        let dsr = Flow {
            seq: 9,
            next_hop: hop(3),
            ..flow(60, STATE_ESTABLISHED)
        };
        let slot = slot_of(&fwd, &dsr, None);
        assert_eq!(entries_of(&slot).collect::<Vec<_>>(), [(fwd, dsr)]);
        assert!(!is_reply_of(&slot, &rkey));
        assert_eq!(u32::from(slot.flags) & SLOT_F_OVERFLOWED, 0);
        assert_eq!(slot.proxy_first, 0);
        // Empty: nothing.
        assert_eq!(entries_of(&EstablishedSlot::default()).count(), 0);
    }

    /// How a flow whose bucket is full may use a second bucket.
    #[derive(Clone, Copy)]
    enum Second {
        /// Not at all: the overflow table.
        None,
        /// d-left: the less full of the two buckets, from the start (every
        /// lookup reads both buckets).
        LessFull,
        /// Only once its first bucket is full (a lookup reads the second
        /// bucket only when the first is flagged).
        Spill,
    }

    /// The share of `flows` flows (random clients) that find no free way,
    /// in a table of `slots` slots, with the second bucket used as `second`
    /// says.
    fn overflow_share(slots: u32, flows: u32, second: Second) -> f64 {
        let mut used = vec![0u8; slots as usize];
        let mut overflowed = 0u32;
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let fill = |first: u32, used: &[u8]| -> u32 {
            (first..first + WAYS)
                .map(|i| u32::from(used[i as usize]))
                .sum()
        };
        for _ in 0..flows {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let k = key(x as u32, (x >> 32) as u16);
            let a = bucket_of(&k, 0x1111, slots);
            let b = bucket_of(&k, 0x2222, slots);
            let candidates = match second {
                Second::None => [a, a],
                Second::LessFull if fill(b, &used) < fill(a, &used) => [b, b],
                Second::LessFull => [a, a],
                Second::Spill => [a, b],
            };
            let free = candidates
                .iter()
                .flat_map(|&first| first..first + WAYS)
                .find(|&i| used[i as usize] == 0);
            match free {
                Some(i) => used[i as usize] = 1,
                None => overflowed += 1,
            }
        }
        f64::from(overflowed) / f64::from(flows)
    }

    /// The overflow rule's measurement (docs/architecture.md quotes it;
    /// `cargo test -p lb-common overflow_share -- --nocapture` prints it):
    /// flows are one slot each and the table has two slots per configured
    /// flow (`conntrack-size`), so at the rated fill half the slots are
    /// taken. With one bucket about 10 % of flows then overflow (the
    /// Poisson tail: 3/e − 1 for two ways at fill ½); a second bucket used
    /// only when the first is full (`Spill`) or the less full of two
    /// (d-left) keeps that under 1 %.
    #[test]
    fn overflow_share_one_bucket_against_two_choices() {
        let slots = 1 << 18;
        let mut rows = Vec::new();
        for fill in [0.25, 0.5, 0.75] {
            let flows = (f64::from(slots) * fill) as u32;
            let one = overflow_share(slots, flows, Second::None);
            let less = overflow_share(slots, flows, Second::LessFull);
            let spill = overflow_share(slots, flows, Second::Spill);
            eprintln!(
                "fill {fill:.2}: one bucket {:.2} % overflow, less full of two {:.3} %, \
                 second when the first is full {:.3} %",
                one * 100.0,
                less * 100.0,
                spill * 100.0
            );
            rows.push((fill, one, less, spill));
        }
        let (_, q1, q2, q3) = rows[0];
        let (_, h1, h2, h3) = rows[1];
        // The Poisson figures, within sampling noise.
        assert!((0.025..0.042).contains(&q1), "{q1}");
        assert!((0.095..0.113).contains(&h1), "{h1}");
        assert!(q2 < 0.001 && h2 < 0.01, "{q2} {h2}");
        // Spill at fill ¼ is about 0.19 % for any fair hash (12 seed pairs
        // of the table's hash: 0.174–0.220 %), so the bound sits above that
        // spread, not at its middle.
        assert!(q3 < 0.0025 && h3 < 0.03, "{q3} {h3}");
        assert!(
            rows.iter()
                .all(|&(_, one, less, spill)| less < one && spill < one)
        );
    }
}
