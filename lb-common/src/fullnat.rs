//! Full NAT's pure rules (issue 25): which (source address, port) pairs a
//! new flow may be given, when a claim on one is stale, the reply tuple a
//! claim is keyed by, and the header rewrites of both directions and of
//! the ICMP errors quoting them, with incremental checksums.
//!
//! Allocation keeps one hint per CPU and backend: a flow's first candidate
//! is the port after the one this CPU last gave toward its backend
//! ([`next_candidate`], a per-CPU cursor, so two CPUs never share a counter),
//! its later ones are derived from its keyed hash ([`candidate`]), and a
//! candidate is claimed by a compare-and-swap of a free slot's state in its
//! reply tuple's bucket of `FNAT_CLAIMS` (two slots in one cache line,
//! [`claim_bucket`]), checked against the bucket's other slot
//! ([`blocks`]), so one tuple is never given to two flows. Consecutive
//! ports toward one backend have consecutive buckets, so the cursor's
//! claims walk one page line by line instead of landing on a cold line of
//! a 32 MiB table each. docs/architecture.md ("Full NAT") says what it
//! costs.

use crate::{
    hash::{mix, seeded_flow_hash},
    headers::{Ipv4Hdr, L4Ports},
    icmp,
    maps::{
        CLAIM_BUSY, CLAIM_FREED, CLAIM_HELD, CLAIM_WAYS, FNAT_MAX_SOURCES, FlowKey, FnatClaim,
        FnatConf,
    },
    rewrite::{rewrite_destination, rewrite_source},
};

/// Candidates a new flow tries before it is refused
/// (`Verdict::DropFnatExhausted`): with the pool a fraction `f` full, a
/// flow is refused with probability `f^8` (1 % at 56 % full, 34 % at 87 %).
pub const FNAT_TRIES: u32 = 8;
/// The default range of allocated ports: below Linux's ephemeral range
/// (32768–60999), so the LB's own connections from a source address (its
/// health checks) never take a port a flow holds.
pub const DEFAULT_PORT_LO: u16 = 1024;
pub const DEFAULT_PORT_HI: u16 = 32767;

/// A flow's allocation hash: its forward key's hash under the table's
/// secret seed, so a client cannot choose the ports its flows draw.
#[inline(always)]
pub const fn flow_seed(forward: &FlowKey, seed: u32) -> u32 {
    seeded_flow_hash(forward, seed ^ 0x5f11_a7a7)
}

/// Ports in the configured range (0 if the range is empty).
#[inline(always)]
pub const fn span(conf: &FnatConf) -> u32 {
    if conf.port_hi < conf.port_lo {
        0
    } else {
        (conf.port_hi - conf.port_lo) as u32 + 1
    }
}

/// The pool's addresses (at most [`FNAT_MAX_SOURCES`], whatever `count`
/// says) and ports; `None` if either is empty.
#[inline(always)]
const fn pool(conf: &FnatConf) -> Option<(u32, u32)> {
    let count = if conf.count as usize > FNAT_MAX_SOURCES {
        FNAT_MAX_SOURCES as u32
    } else {
        conf.count as u32
    };
    let span = span(conf);
    if count == 0 || span == 0 {
        return None;
    }
    Some((count, span))
}

/// Try `attempt`'s (source address, port) for a flow of allocation hash
/// `hash`: the address and the port each scaled from a remix of the hash
/// (a multiply and a shift, no modulo), so the tries of one flow land on
/// unrelated ports of every address. Port in network order. `None`: no
/// address or an empty range.
#[inline(always)]
pub const fn candidate(conf: &FnatConf, hash: u32, attempt: u32) -> Option<(u32, u16)> {
    let Some((count, span)) = pool(conf) else {
        return None;
    };
    let (index, offset) = drawn(mix(hash ^ attempt.wrapping_mul(0x9e37_79b9)), count, span);
    Some(source_at(conf, index, offset))
}

/// An address index below `count` and a port offset below `span`, each
/// scaled from a remix of `h` (a multiply and a shift, no modulo).
#[inline(always)]
const fn drawn(h: u32, count: u32, span: u32) -> (u32, u32) {
    (
        ((h as u64 * count as u64) >> 32) as u32,
        ((mix(h ^ 0x27d4_eb2f) as u64 * span as u64) >> 32) as u32,
    )
}

/// The (address, port) at `index` of the addresses and `offset` into the
/// port range. Port in network order.
#[inline(always)]
const fn source_at(conf: &FnatConf, index: u32, offset: u32) -> (u32, u16) {
    (
        conf.addrs[index as usize & (FNAT_MAX_SOURCES - 1)],
        ((conf.port_lo as u32 + offset) as u16).to_be(),
    )
}

/// A cursor of `FNAT_CURSORS` (one per CPU and backend) that has been set:
/// bit 31, above the address index (bits 16–30) and the port's offset in
/// the range (bits 0–15). 0 is a cursor never set.
pub const CURSOR_SET: u32 = 1 << 31;

/// The first candidate of a new flow toward a backend on this CPU, and the
/// cursor's next value: the (address, port) `cursor` names — the one after
/// what this CPU last gave toward the backend —, or, for a cursor never set
/// or left out of a range or address list changed since, one drawn from
/// the flow's allocation `hash` (so CPUs start apart). The cursor steps
/// through the range port by port, then to the next address: ports toward
/// one backend are handed out in order, and their claims' buckets are
/// consecutive lines ([`claim_bucket`]). A division-free step (the
/// verifier-friendly form of `(offset + 1) % span`). Port in network order.
/// `None`: no address or an empty range.
#[inline(always)]
pub const fn next_candidate(conf: &FnatConf, hash: u32, cursor: u32) -> Option<((u32, u16), u32)> {
    let Some((count, span)) = pool(conf) else {
        return None;
    };
    let (mut index, mut offset) = ((cursor & !CURSOR_SET) >> 16, cursor & 0xffff);
    if cursor & CURSOR_SET == 0 || index >= count || offset >= span {
        (index, offset) = drawn(mix(hash ^ 0x1b87_3593), count, span);
    }
    let given = source_at(conf, index, offset);
    let (mut next_index, mut next_offset) = (index, offset + 1);
    if next_offset == span {
        next_offset = 0;
        next_index += 1;
        if next_index == count {
            next_index = 0;
        }
    }
    Some((given, CURSOR_SET | next_index << 16 | next_offset))
}

/// The tuple the replies of a full-NAT flow arrive with (backend →
/// source address:port), whose bucket of `FNAT_CLAIMS` holds its claim.
#[inline(always)]
pub const fn reply_tuple(backend: (u32, u16), source: (u32, u16), protocol: u8) -> FlowKey {
    FlowKey {
        saddr: backend.0,
        daddr: source.0,
        sport: backend.1,
        dport: source.1,
        protocol,
        _pad0: 0,
        _pad1: 0,
    }
}

/// Ticks are kept in a claim's state modulo 2^29 (~18 years of ~1.07 s
/// ticks): every comparison of them is modulo that too.
pub const CLAIM_TICK_MASK: u32 = u32::MAX >> 3;

/// A claim's state word: `kind` (`CLAIM_*`) at tick `now`.
#[inline(always)]
pub const fn claim_state(kind: u32, now: u32) -> u32 {
    now << 3 | kind
}

/// Ticks from `then` to `now`, both modulo 2^29 ([`CLAIM_TICK_MASK`]).
#[inline(always)]
pub const fn ticks_since(then: u32, now: u32) -> u32 {
    now.wrapping_sub(then) & CLAIM_TICK_MASK
}

/// murmur3's 64-bit finaliser.
#[inline(always)]
const fn fmix64(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

/// The first slot of `reply`'s bucket in a claim table of `slots` slots
/// ([`CLAIM_WAYS`] to a bucket): the start of the tuple's run — a hash of
/// its backend endpoint, source address and protocol under the tables'
/// secret seed — plus its source port, so the ports of one (backend,
/// source address) are consecutive buckets, one cache line each: a CPU
/// handing out ports in order ([`next_candidate`]) reads the next line of a
/// page it just read, where a hash of the whole tuple put every claim on a
/// cold line behind a cold TLB entry. A client chooses neither the ports
/// nor the run. The data plane and the agent (which frees and sweeps claims
/// by their tuple) place alike.
#[inline(always)]
pub const fn claim_bucket(reply: &FlowKey, seed: u32, slots: u32) -> u32 {
    let buckets = slots / CLAIM_WAYS;
    if buckets == 0 {
        return 0;
    }
    let key = (seed as u64 ^ 0x5f11_a7a7).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let x = fmix64(((reply.saddr as u64) << 32 | reply.daddr as u64) ^ key);
    let x = fmix64(x ^ ((reply.sport as u64) << 8 | reply.protocol as u64));
    let run = (x >> 32) as u32;
    (run.wrapping_add(u16::from_be(reply.dport) as u32) % buckets) * CLAIM_WAYS
}

/// Does `way` (a slot of `tuple`'s bucket) keep `tuple` from being claimed
/// in the bucket's other slot? If it holds `tuple` (held or in quarantine),
/// and if it is being written (busy: it may be for `tuple`; the claim then
/// backs off, and tries its next candidate).
#[inline(always)]
pub const fn blocks(way: &FnatClaim, tuple: &FlowKey) -> bool {
    match way.kind() {
        CLAIM_BUSY => true,
        CLAIM_HELD | CLAIM_FREED => same_tuple(&way.reply, tuple),
        _ => false,
    }
}

/// Is `way` the live claim of `tuple` (what a reply's lookup wants)?
#[inline(always)]
pub const fn held_for(way: &FnatClaim, tuple: &FlowKey) -> bool {
    way.kind() == CLAIM_HELD && same_tuple(&way.reply, tuple)
}

#[inline(always)]
const fn same_tuple(a: &FlowKey, b: &FlowKey) -> bool {
    a.saddr == b.saddr
        && a.daddr == b.daddr
        && a.sport == b.sport
        && a.dport == b.dport
        && a.protocol == b.protocol
}

/// May a claim found in the way be taken over? A held one only if its
/// flow is in neither flow table (`flow_present`: its half-open slot was
/// taken by a new flow, or it ended without its claim being removed) and
/// it was not made in this very tick (a claim is made just before its
/// flow's half-open slot is written: a claim of this tick may not have its
/// slot yet). A freed one (its flow ended) only once more than
/// `quarantine` ticks have passed since it was freed, so the port is
/// never given back toward its backend within the quarantine. A free or
/// busy one is not taken over (a free one is claimed, a busy one is
/// someone else's).
#[inline(always)]
pub const fn reclaimable(claim: &FnatClaim, now: u32, flow_present: bool, quarantine: u16) -> bool {
    match claim.kind() {
        CLAIM_FREED => out_of_quarantine(claim.tick(), now, quarantine),
        CLAIM_HELD => !flow_present && ticks_since(claim.tick(), now) != 0,
        _ => false,
    }
}

/// Has a tuple freed at tick `freed` served its quarantine by `now`? More
/// than `quarantine` whole ticks later (a tick is entered anywhere within
/// it), never in the tick it was freed. Modulo 2^29, as claims keep ticks.
#[inline(always)]
pub const fn out_of_quarantine(freed: u32, now: u32, quarantine: u16) -> bool {
    let since = ticks_since(freed, now);
    since > quarantine as u32 && since < CLAIM_TICK_MASK / 2
}

/// May a packet to port `dport` (network order) be a full-NAT reply, so
/// that its claim is worth looking up? Only while full NAT has a source
/// address, and only to a port of the allocated range: the LB's own
/// connections (ephemeral ports, above the default range) and most NAT
/// replies pay no lookup. A range compare, not a walk of the addresses:
/// the claim lookup matches the address itself, and a loop over 16
/// addresses cost the data plane's verification ~110k instructions.
#[inline(always)]
pub const fn may_be_reply(conf: &FnatConf, dport: u16) -> bool {
    let port = u16::from_be(dport);
    conf.count != 0 && port >= conf.port_lo && port <= conf.port_hi
}

/// A full-NAT flow's packet to its backend: client:cport → VIP:vport
/// becomes `source` → `backend` (addresses and ports network order), both
/// checksums updated incrementally (both addresses are in the TCP/UDP
/// pseudo-header; a UDP checksum of 0 stays 0).
#[inline(always)]
pub fn to_backend(
    ip: &mut Ipv4Hdr,
    ports: &mut L4Ports,
    check: &mut u16,
    source: (u32, u16),
    backend: (u32, u16),
) {
    rewrite_destination(ip, ports, check, backend.0, backend.1);
    rewrite_source(ip, ports, check, source.0, source.1);
}

/// A full-NAT flow's reply to the client: backend → source address:port
/// becomes `vip` → `client`.
#[inline(always)]
pub fn to_client(
    ip: &mut Ipv4Hdr,
    ports: &mut L4Ports,
    check: &mut u16,
    vip: (u32, u16),
    client: (u32, u16),
) {
    rewrite_source(ip, ports, check, vip.0, vip.1);
    rewrite_destination(ip, ports, check, client.0, client.1);
}

/// What full NAT adds to NAT's translation of a client's ICMP error to the
/// backend (`family::Family::error_to_backend` moved the outer destination
/// and the quoted source to the backend): the outer source and the quoted
/// destination become the flow's source address and port, as the backend
/// knows the flow.
#[inline(always)]
pub fn error_to_backend_source(
    ip: &mut Ipv4Hdr,
    icmp_check: &mut u16,
    quoted: &mut Ipv4Hdr,
    quoted_ports: &mut L4Ports,
    source: (u32, u16),
) {
    icmp::set_source(ip, source.0);
    icmp::rewrite_quoted_destination(icmp_check, quoted, quoted_ports, source.0, source.1);
}

/// What full NAT adds to NAT's translation of a backend's ICMP error to the
/// client (`family::Family::error_to_client` moved the quoted destination,
/// and the outer source if the backend sent it, to the VIP): the outer
/// destination and the quoted source become the client's.
#[inline(always)]
pub fn error_to_client_destination(
    ip: &mut Ipv4Hdr,
    icmp_check: &mut u16,
    quoted: &mut Ipv4Hdr,
    quoted_ports: &mut L4Ports,
    client: (u32, u16),
) {
    icmp::set_destination(ip, client.0);
    icmp::rewrite_quoted_source(icmp_check, quoted, quoted_ports, client.0, client.1);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        family::{Family, V4},
        headers::{EthHdr, IPPROTO_TCP, IPPROTO_UDP, TCP_CHECK_OFF, UDP_CHECK_OFF},
    };
    use etherparse::{Icmpv4Type, PacketBuilder, SlicedPacket, TransportSlice, icmpv4};
    use proptest::prelude::*;
    use std::collections::HashSet;

    fn conf(addrs: &[u32], lo: u16, hi: u16) -> FnatConf {
        let mut c = FnatConf {
            count: addrs.len() as u16,
            port_lo: lo,
            port_hi: hi,
            ..FnatConf::default()
        };
        c.addrs[..addrs.len()].copy_from_slice(addrs);
        c
    }

    fn key(client: u32, port: u16) -> FlowKey {
        FlowKey {
            saddr: client,
            daddr: 0xc612_0001,
            sport: port.to_be(),
            dport: 80u16.to_be(),
            protocol: IPPROTO_TCP,
            _pad0: 0,
            _pad1: 0,
        }
    }

    #[test]
    fn candidates_stay_in_the_range_and_on_configured_addresses() {
        let c = conf(&[11, 22, 33], 5000, 5009);
        let mut ports = HashSet::new();
        let mut addrs = HashSet::new();
        for h in 0..2000u32 {
            for attempt in 0..FNAT_TRIES {
                let (addr, port) = candidate(&c, h.wrapping_mul(0x0101_0101), attempt).unwrap();
                let port = u16::from_be(port);
                assert!((5000..=5009).contains(&port), "{port}");
                assert!([11, 22, 33].contains(&addr));
                ports.insert(port);
                addrs.insert(addr);
            }
        }
        assert_eq!(ports.len(), 10, "every port of the range is drawn");
        assert_eq!(addrs.len(), 3, "every address is drawn");
        // A one-port range always draws that port.
        let one = conf(&[7], 4242, 4242);
        assert_eq!(candidate(&one, 99, 3), Some((7, 4242u16.to_be())));
    }

    #[test]
    fn no_address_or_an_empty_range_gives_no_candidate() {
        assert_eq!(candidate(&conf(&[], 1024, 2048), 1, 0), None);
        assert_eq!(candidate(&conf(&[1], 2048, 1024), 1, 0), None);
        // A count past the array is clamped, never read out of bounds.
        let mut c = conf(&[1], 1024, 2048);
        c.count = 1000;
        assert!(candidate(&c, 5, 0).is_some());
    }

    #[test]
    fn a_flows_tries_are_spread_and_flows_start_apart() {
        let c = conf(&[1, 2], DEFAULT_PORT_LO, DEFAULT_PORT_HI);
        let h = flow_seed(&key(0xc612_0a01, 40000), 0x1234);
        let tries: HashSet<_> = (0..FNAT_TRIES).map(|i| candidate(&c, h, i)).collect();
        assert_eq!(tries.len(), FNAT_TRIES as usize, "distinct candidates");
        // Two flows of one client (ports next to each other) start on
        // different candidates: two CPUs allocating at once do not collide.
        let mut firsts = HashSet::new();
        for port in 40000..40100 {
            firsts.insert(candidate(&c, flow_seed(&key(0xc612_0a01, port), 0x1234), 0));
        }
        assert!(
            firsts.len() >= 99,
            "{} distinct first candidates",
            firsts.len()
        );
        // The seed decides: another table's seed draws other ports.
        let other = flow_seed(&key(0xc612_0a01, 40000), 0x4321);
        assert_ne!(candidate(&c, h, 0), candidate(&c, other, 0));
    }

    /// The allocator against a set of claimed tuples (insert if absent):
    /// it never hands out a taken tuple, fills a small pool almost whole,
    /// and refuses (never collides) once the pool is full.
    #[test]
    fn allocation_never_collides_and_refuses_when_the_pool_is_full() {
        let c = conf(&[0x0a00_0001], 2000, 2063); // 64 ports
        let backend = (0xc612_1401, 80u16.to_be());
        let mut claims = HashSet::new();
        let mut refused = 0;
        for port in 0..2000u16 {
            let h = flow_seed(&key(0xc612_0a01, 10000 + port), 7);
            let got = (0..FNAT_TRIES).find_map(|i| {
                let source = candidate(&c, h, i)?;
                claims
                    .insert(reply_tuple(backend, source, IPPROTO_TCP))
                    .then_some(source)
            });
            if got.is_none() {
                refused += 1;
            }
        }
        assert_eq!(claims.len(), 64, "the whole pool is handed out, once each");
        assert_eq!(refused, 2000 - 64);
        // Another backend has a pool of its own.
        let other = (0xc612_1402, 80u16.to_be());
        let h = flow_seed(&key(0xc612_0a01, 9), 7);
        let source = candidate(&c, h, 0).unwrap();
        assert!(claims.insert(reply_tuple(other, source, IPPROTO_TCP)));
    }

    #[test]
    fn the_cursor_steps_port_by_port_then_address_by_address() {
        let c = conf(&[11, 22], 5000, 5002); // 3 ports, 2 addresses
        let (first, mut cursor) = next_candidate(&c, 0xdead_beef, 0).unwrap();
        let mut given = vec![first];
        for _ in 0..6 {
            let (source, next) = next_candidate(&c, 0xdead_beef, cursor).unwrap();
            given.push(source);
            cursor = next;
        }
        let shown: Vec<(u32, u16)> = given.iter().map(|&(a, p)| (a, u16::from_be(p))).collect();
        // Every (address, port) once in six steps, in order, then round again.
        let start = shown[0];
        let order = [
            (11, 5000),
            (11, 5001),
            (11, 5002),
            (22, 5000),
            (22, 5001),
            (22, 5002),
        ];
        let at = order.iter().position(|&p| p == start).unwrap();
        for (i, got) in shown.iter().enumerate() {
            assert_eq!(*got, order[(at + i) % 6], "step {i}");
        }
    }

    #[test]
    fn an_unset_or_stale_cursor_starts_from_the_flows_hash() {
        let c = conf(&[11, 22, 33], 5000, 5099);
        // Never set: the hash decides, so flows (and CPUs) start apart.
        let starts: HashSet<_> = (0..200u32)
            .map(|h| {
                next_candidate(&c, h.wrapping_mul(0x9e37_79b9), 0)
                    .unwrap()
                    .0
            })
            .collect();
        // 200 draws of 300 tuples: about 146 distinct if uniform.
        assert!(starts.len() > 120, "{} distinct starts", starts.len());
        // A cursor past a range or address list that shrank since: restarts
        // inside them, never out of bounds.
        let stale = CURSOR_SET | 2 << 16 | 99;
        let small = conf(&[11], 5000, 5009);
        let ((addr, port), next) = next_candidate(&small, 7, stale).unwrap();
        assert_eq!(addr, 11);
        assert!((5000..=5009).contains(&u16::from_be(port)));
        assert_ne!(next & CURSOR_SET, 0);
        // A count past the array is clamped.
        let mut wide = conf(&[1], 1024, 2048);
        wide.count = 1000;
        assert!(next_candidate(&wide, 5, CURSOR_SET | 999 << 16).is_some());
        assert_eq!(next_candidate(&conf(&[], 1024, 2048), 1, 0), None);
        assert_eq!(next_candidate(&conf(&[1], 2048, 1024), 1, 0), None);
    }

    #[test]
    fn consecutive_ports_toward_a_backend_are_consecutive_buckets() {
        let slots = 1 << 20;
        let backend = (0xc612_1401, 80u16.to_be());
        let bucket = |port: u16| {
            claim_bucket(
                &reply_tuple(backend, (0x0a00_0001, port.to_be()), IPPROTO_TCP),
                0x1234,
                slots,
            )
        };
        for port in 1024..1100u16 {
            assert_eq!(
                bucket(port + 1),
                (bucket(port) + CLAIM_WAYS) % slots,
                "port {port}"
            );
        }
        // Another backend, address or seed starts its run elsewhere.
        let other = claim_bucket(
            &reply_tuple(
                (0xc612_1402, 80u16.to_be()),
                (0x0a00_0001, 1024u16.to_be()),
                IPPROTO_TCP,
            ),
            0x1234,
            slots,
        );
        assert_ne!(other, bucket(1024));
        let reseeded = claim_bucket(
            &reply_tuple(backend, (0x0a00_0001, 1024u16.to_be()), IPPROTO_TCP),
            0x4321,
            slots,
        );
        assert_ne!(reseeded, bucket(1024));
        // Buckets stay in the table and on a bucket's first way.
        assert!(bucket(65535) < slots && bucket(65535) % CLAIM_WAYS == 0);
        assert_eq!(claim_bucket(&reply_tuple(backend, (1, 2), 6), 1, 1), 0);
    }

    /// The data plane's allocation (the cursor's candidate, then the hash's)
    /// against a set of claimed tuples: one CPU filling a pool never
    /// collides, hands out the whole pool, and refuses once it is full.
    #[test]
    fn allocation_from_the_cursor_never_collides_and_fills_the_pool() {
        let c = conf(&[0x0a00_0001, 0x0a00_0002], 2000, 2031); // 64 tuples
        let backend = (0xc612_1401, 80u16.to_be());
        let mut claims = HashSet::new();
        let (mut cursor, mut refused, mut first_try) = (0, 0, 0);
        for port in 0..1000u16 {
            let h = flow_seed(&key(0xc612_0a01, 10000 + port), 7);
            let (first, next) = next_candidate(&c, h, cursor).unwrap();
            cursor = next;
            let got = (0..FNAT_TRIES).find_map(|i| {
                let source = if i == 0 { first } else { candidate(&c, h, i)? };
                claims
                    .insert(reply_tuple(backend, source, IPPROTO_TCP))
                    .then_some(i)
            });
            match got {
                Some(0) => first_try += 1,
                Some(_) => {}
                None => refused += 1,
            }
        }
        assert_eq!(claims.len(), 64, "the whole pool is handed out, once each");
        assert_eq!(refused, 1000 - 64);
        assert_eq!(first_try, 64, "in order, every port on its first try");
    }

    #[test]
    fn expected_tries_follow_the_pools_fill() {
        // At half full, a flow needs about two tries on average and is
        // refused about once in 2^8: the note's figures.
        let c = conf(&[1], 10000, 10000 + 4095);
        let backend = (2, 80u16.to_be());
        let mut claims = HashSet::new();
        let (mut tries, mut flows, mut refused) = (0u32, 0u32, 0u32);
        let mut port = 0u16;
        while claims.len() < 2048 {
            let h = flow_seed(&key(0xc612_0a01, port), 3);
            port = port.wrapping_add(1);
            let n = (0..FNAT_TRIES).position(|i| {
                let source = candidate(&c, h, i).unwrap();
                claims.insert(reply_tuple(backend, source, IPPROTO_UDP))
            });
            flows += 1;
            match n {
                Some(n) => tries += n as u32 + 1,
                None => refused += 1,
            }
        }
        let mean = tries as f64 / (flows - refused) as f64;
        assert!(mean < 1.6, "mean tries {mean} filling to half");
        // Expected: the sum of fill^8 over the flows, about one in all.
        assert!(refused <= 4, "{refused} refused filling to half");
    }

    fn claim(kind: u32, tick: u32, reply: FlowKey) -> FnatClaim {
        FnatClaim {
            state: claim_state(kind, tick),
            reply,
            ..FnatClaim::default()
        }
    }

    #[test]
    fn only_a_claim_of_an_absent_flow_from_an_earlier_tick_is_reclaimable() {
        let held = claim(CLAIM_HELD, 10, key(1, 2));
        assert_eq!((held.kind(), held.tick()), (CLAIM_HELD, 10));
        assert!(reclaimable(&held, 11, false, 56));
        assert!(!reclaimable(&held, 11, true, 56), "its flow is still there");
        assert!(
            !reclaimable(&held, 10, false, 56),
            "claimed this tick: its slot may not be written yet"
        );
        // A tick counter past 2^29 compares as its low 29 bits.
        assert!(!reclaimable(&held, 10 + (1 << 29), false, 56));
        for kind in [crate::maps::CLAIM_FREE, CLAIM_BUSY] {
            assert!(!reclaimable(&claim(kind, 10, key(1, 2)), 99, false, 0));
        }
    }

    #[test]
    fn a_freed_claim_is_reclaimable_only_past_its_quarantine() {
        let freed = claim(CLAIM_FREED, 100, key(1, 2));
        // 56 ticks (60 s): not within them, whatever the flow tables say.
        for now in [100, 101, 140, 156] {
            assert!(!reclaimable(&freed, now, false, 56), "{now}");
        }
        assert!(reclaimable(&freed, 157, false, 56));
        assert!(reclaimable(&freed, 157, true, 56), "its flow ended");
        // No quarantine: from the next tick on, never the tick it was freed.
        assert!(!reclaimable(&freed, 100, false, 0));
        assert!(reclaimable(&freed, 101, false, 0));
        // Across the claim's tick wrap (29 bits).
        let late = claim(CLAIM_FREED, CLAIM_TICK_MASK - 3, key(1, 2));
        assert_eq!(late.tick(), CLAIM_TICK_MASK - 3);
        assert!(!reclaimable(&late, 50, false, 56));
        assert!(reclaimable(&late, 60, false, 56));
        assert!(reclaimable(&late, 60 + (1 << 29), false, 56));
        // A clock read behind the freeing CPU's (a tick earlier) is not
        // "half a billion ticks later".
        assert!(!out_of_quarantine(100, 99, 56));
    }

    #[test]
    fn the_state_word_is_odd_only_while_busy() {
        for tick in [0, 1, 2, 12345, CLAIM_TICK_MASK] {
            for kind in [crate::maps::CLAIM_FREE, CLAIM_HELD, CLAIM_FREED] {
                assert_eq!(claim_state(kind, tick) % 2, 0, "{kind} {tick}");
            }
            assert_eq!(claim_state(CLAIM_BUSY, tick) % 2, 1);
        }
        assert_eq!(
            claim_state(crate::maps::CLAIM_FREE, 0),
            0,
            "a zeroed slot is free"
        );
    }

    #[test]
    fn a_way_blocks_its_tuple_while_held_freed_or_busy() {
        let (t, other) = (key(1, 2), key(1, 3));
        assert!(blocks(&claim(CLAIM_HELD, 5, t), &t));
        assert!(blocks(&claim(CLAIM_FREED, 5, t), &t));
        assert!(blocks(&claim(CLAIM_BUSY, 5, other), &t), "busy: maybe t");
        assert!(!blocks(&claim(CLAIM_HELD, 5, other), &t));
        assert!(
            !blocks(&claim(crate::maps::CLAIM_FREE, 5, t), &t),
            "left over"
        );
        assert!(held_for(&claim(CLAIM_HELD, 5, t), &t));
        assert!(!held_for(&claim(CLAIM_FREED, 5, t), &t), "in quarantine");
        assert!(!held_for(&claim(CLAIM_HELD, 5, other), &t));
    }

    #[test]
    fn buckets_are_spread_whole_and_keyed() {
        let slots = 1 << 12;
        let mut used = HashSet::new();
        for port in 0..20_000u16 {
            let b = claim_bucket(&key(0xc612_0a01, port), 77, slots);
            assert_eq!(b % CLAIM_WAYS, 0, "a bucket's first way");
            assert!(b + 1 < slots);
            used.insert(b);
        }
        assert_eq!(
            used.len() as u32,
            slots / CLAIM_WAYS,
            "every bucket is used"
        );
        let t = key(0xc612_0a01, 1);
        let moved = (0..64u32)
            .filter(|s| claim_bucket(&t, *s, slots) != claim_bucket(&t, 0, slots))
            .count();
        assert!(moved > 60, "the seed decides the bucket: {moved} of 64");
    }

    /// The data plane's claim of `tuple` in `table` (`lb-ebpf`'s
    /// `fullnat::claim`), one CPU at a time: the first way if free and the
    /// second does not block it, else the second if free and the first does
    /// not block it.
    fn claim_in(table: &mut [FnatClaim], seed: u32, tuple: FlowKey, now: u32) -> bool {
        let a = claim_bucket(&tuple, seed, table.len() as u32) as usize;
        for (mine, other) in [(a, a + 1), (a + 1, a)] {
            if table[mine].kind() == crate::maps::CLAIM_FREE {
                if blocks(&table[other], &tuple) {
                    return false;
                }
                table[mine] = claim(CLAIM_HELD, now, tuple);
                return true;
            }
            if blocks(&table[mine], &tuple) {
                return false;
            }
        }
        false
    }

    #[test]
    fn a_tuple_is_claimed_once_and_collisions_take_the_other_way() {
        let mut table = vec![FnatClaim::default(); 2]; // one bucket
        let (t, u, v) = (key(1, 1), key(1, 2), key(1, 3));
        assert!(claim_in(&mut table, 0, t, 1));
        assert!(!claim_in(&mut table, 0, t, 1), "taken");
        assert!(claim_in(&mut table, 0, u, 1), "a collision: the other way");
        assert!(!claim_in(&mut table, 0, v, 1), "the bucket is full");
        // t's way freed (a half-open flow ended): t is claimable again, u
        // still taken, never twice.
        table[0].state = 0;
        assert!(!claim_in(&mut table, 0, u, 2));
        assert!(claim_in(&mut table, 0, t, 2));
        // In quarantine it blocks its tuple from the other way.
        table[1].state = claim_state(CLAIM_FREED, 2);
        table[0].state = 0;
        assert!(!claim_in(&mut table, 0, u, 3), "u's quarantine blocks it");
        assert!(claim_in(&mut table, 0, v, 3));
    }

    /// Capacity: at the rated load (262 144 claims in the 2^20 slots of
    /// `FNAT_CLAIMS`), the share of candidates whose bucket is full of
    /// other claims, and the refusals it makes: a flow is refused only if
    /// all 8 candidates' buckets are full (independent buckets), so at
    /// `p^8` plus the pool's own fill.
    #[test]
    fn refusals_at_the_rated_load() {
        let slots = crate::maps::FNAT_CLAIMS_SIZE;
        let mut table = vec![FnatClaim::default(); slots as usize];
        let c = conf(
            &[0x0a00_0001, 0x0a00_0002],
            DEFAULT_PORT_LO,
            DEFAULT_PORT_HI,
        );
        let mut refused = 0u32;
        let (mut held, mut flow) = (0u32, 0u32);
        // As the data plane: a cursor per backend (one CPU's), then the
        // flow's hash; the cursors lay each backend's claims out in a run
        // of consecutive buckets, which the runs of others overlap.
        let mut cursors = [0u32; 100];
        let mut first_try = 0u32;
        while held < 262_144 {
            // Flows toward 100 backends, as the bench's.
            let b = (flow % 100) as usize;
            let backend = (0xc612_1400 + b as u32, 80u16.to_be());
            let h = flow_seed(&key(0x0a0a_0000 + flow / 60_000, (flow % 60_000) as u16), 9);
            flow += 1;
            let (first, next) = next_candidate(&c, h, cursors[b]).unwrap();
            cursors[b] = next;
            let got = (0..FNAT_TRIES).position(|i| {
                let source = if i == 0 {
                    first
                } else {
                    candidate(&c, h, i).unwrap()
                };
                claim_in(&mut table, 9, reply_tuple(backend, source, IPPROTO_TCP), 1)
            });
            if got == Some(0) {
                first_try += 1;
            }
            let got = got.is_some();
            if got {
                held += 1;
            } else {
                refused += 1;
            }
        }
        let full = table
            .chunks(2)
            .filter(|b| b.iter().all(|w| w.kind() == CLAIM_HELD))
            .count() as f64
            / (slots / 2) as f64;
        let refusal = full.powi(FNAT_TRIES as i32);
        // Poisson with half a claim per bucket: P(≥ 2) = 1 − 1.5/√e ≈ 9 %,
        // and a little more from the claims a full bucket sends on.
        eprintln!(
            "{full} of the buckets full: refusal {refusal:e}; {first_try} of {held} on the \
             cursor's candidate"
        );
        // Most flows take the cursor's port, whose line is next to the last.
        assert!(
            first_try as f64 > 0.85 * held as f64,
            "{first_try} of {held} on the first try"
        );
        assert!(full < 0.1, "{full} of the buckets full");
        assert!(refusal < 1e-8, "refusal {refusal} at the rated load");
        assert_eq!(refused, 0, "none refused filling to the rated load");
        // One slot per hash (the prototype) at the same load: a candidate
        // is taken with a quarter's chance, 1.5e-5 refused.
        assert!(0.25f64.powi(FNAT_TRIES as i32) > 1e-5);
    }

    #[test]
    fn only_a_port_of_the_range_may_be_a_reply_while_there_are_sources() {
        let c = conf(&[5, 6], 1000, 2000);
        for port in [1000u16, 1500, 2000] {
            assert!(may_be_reply(&c, port.to_be()), "{port}");
        }
        for port in [999u16, 2001, 40000] {
            assert!(!may_be_reply(&c, port.to_be()), "{port}");
        }
        let none = conf(&[], 1000, 2000);
        assert!(!may_be_reply(&none, 1500u16.to_be()), "no sources: none");
    }

    fn frame(
        udp: bool,
        src: [u8; 4],
        dst: [u8; 4],
        sport: u16,
        dport: u16,
        payload: &[u8],
    ) -> Vec<u8> {
        let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]).ipv4(src, dst, 64);
        let mut out = Vec::new();
        if udp {
            b.udp(sport, dport).write(&mut out, payload).expect("udp");
        } else {
            b.tcp(sport, dport, 1234, 4096)
                .ack(99)
                .write(&mut out, payload)
                .expect("tcp");
        }
        out
    }

    fn read<T: Copy>(buf: &[u8], at: usize) -> T {
        // SAFETY: tests hand in buffers long enough for T at `at`.
        unsafe { core::ptr::read_unaligned(buf[at..].as_ptr().cast()) }
    }

    fn write<T: Copy>(buf: &mut [u8], at: usize, v: T) {
        // SAFETY: as in `read`.
        unsafe { core::ptr::write_unaligned(buf[at..].as_mut_ptr().cast(), v) }
    }

    /// Applies a rewrite to a frame's headers as the XDP program does.
    fn apply(buf: &mut [u8], f: impl FnOnce(&mut Ipv4Hdr, &mut L4Ports, &mut u16)) {
        let ip_at = EthHdr::LEN;
        let mut ip: Ipv4Hdr = read(buf, ip_at);
        let l4 = ip_at + ip.header_len();
        let mut ports: L4Ports = read(buf, l4);
        let at = l4
            + if ip.protocol == IPPROTO_TCP {
                TCP_CHECK_OFF
            } else {
                UDP_CHECK_OFF
            };
        let mut check: u16 = read(buf, at);
        f(&mut ip, &mut ports, &mut check);
        write(buf, ip_at, ip);
        write(buf, l4, ports);
        write(buf, at, check);
    }

    /// The frame's tuple, with every checksum recomputed independently
    /// (etherparse) and compared.
    fn tuple_of_valid(buf: &[u8]) -> Result<([u8; 4], u16, [u8; 4], u16), TestCaseError> {
        let p =
            SlicedPacket::from_ethernet(buf).map_err(|e| TestCaseError::fail(format!("{e:?}")))?;
        let Some(etherparse::NetSlice::Ipv4(ip)) = p.net else {
            return Err(TestCaseError::fail("not ipv4"));
        };
        let hdr = ip.header().to_header();
        prop_assert_eq!(hdr.header_checksum, hdr.calc_header_checksum());
        let (sport, dport) = match p.transport {
            Some(TransportSlice::Tcp(t)) => {
                let want = t
                    .to_header()
                    .calc_checksum_ipv4(&hdr, t.payload())
                    .expect("csum");
                prop_assert_eq!(t.checksum(), want);
                (t.source_port(), t.destination_port())
            }
            Some(TransportSlice::Udp(u)) => {
                if u.checksum() != 0 {
                    let want = u
                        .to_header()
                        .calc_checksum_ipv4(&hdr, u.payload())
                        .expect("csum");
                    prop_assert_eq!(u.checksum(), want);
                }
                (u.source_port(), u.destination_port())
            }
            _ => return Err(TestCaseError::fail("no transport")),
        };
        Ok((hdr.source, sport, hdr.destination, dport))
    }

    fn be(a: [u8; 4]) -> u32 {
        u32::from_ne_bytes(a)
    }

    proptest! {
        #[test]
        fn both_directions_translate_and_keep_every_checksum_valid(
            udp in any::<bool>(),
            client in any::<[u8; 4]>(), vip in any::<[u8; 4]>(), source in any::<[u8; 4]>(), backend in any::<[u8; 4]>(),
            cport in any::<u16>(), vport in any::<u16>(), sport in any::<u16>(), bport in any::<u16>(),
            payload in proptest::collection::vec(any::<u8>(), 0..80),
        ) {
            let mut out = frame(udp, client, vip, cport, vport, &payload);
            apply(&mut out, |ip, ports, check| {
                to_backend(ip, ports, check, (be(source), sport.to_be()), (be(backend), bport.to_be()))
            });
            prop_assert_eq!(tuple_of_valid(&out)?, (source, sport, backend, bport));
            let mut back = frame(udp, backend, source, bport, sport, &payload);
            apply(&mut back, |ip, ports, check| {
                to_client(ip, ports, check, (be(vip), vport.to_be()), (be(client), cport.to_be()))
            });
            prop_assert_eq!(tuple_of_valid(&back)?, (vip, vport, client, cport));
        }

        #[test]
        fn a_udp_datagram_without_checksum_keeps_none(
            client in any::<[u8; 4]>(), source in any::<[u8; 4]>(), backend in any::<[u8; 4]>(),
            sport in any::<u16>(),
        ) {
            let mut out = frame(true, client, [198, 18, 0, 1], 4000, 53, b"q");
            let at = EthHdr::LEN + Ipv4Hdr::LEN + UDP_CHECK_OFF;
            write(&mut out, at, 0u16);
            apply(&mut out, |ip, ports, check| {
                to_backend(ip, ports, check, (be(source), sport.to_be()), (be(backend), 53u16.to_be()))
            });
            prop_assert_eq!(read::<u16>(&out, at), 0);
        }

        #[test]
        fn icmp_errors_translate_both_ways_with_valid_checksums(
            client in any::<[u8; 4]>(), vip in any::<[u8; 4]>(), source in any::<[u8; 4]>(), backend in any::<[u8; 4]>(),
            cport in any::<u16>(), vport in any::<u16>(), sport in any::<u16>(), bport in any::<u16>(),
        ) {
            // The client's error about a reply (VIP → client) goes to the
            // backend, quoting the packet as the backend sent it.
            let quoted = frame(false, vip, client, vport, cport, b"");
            let mut err = error(client, vip, &quoted[EthHdr::LEN..]);
            icmp_apply(&mut err, |ip, check, q, ports| {
                V4::error_to_backend(ip, check, q, ports, be(backend), bport.to_be());
                error_to_backend_source(ip, check, q, ports, (be(source), sport.to_be()));
            });
            prop_assert_eq!(icmp_tuples_of_valid(&err)?, ((source, backend), (backend, bport, source, sport)));
            // The backend's error about a forward packet (source → backend)
            // goes to the client, quoting the packet as the client sent it.
            let quoted = frame(true, source, backend, sport, bport, b"x");
            let mut err = error(backend, source, &quoted[EthHdr::LEN..]);
            icmp_apply(&mut err, |ip, check, q, ports| {
                V4::error_to_client(ip, check, q, ports, be(vip), vport.to_be());
                error_to_client_destination(ip, check, q, ports, (be(client), cport.to_be()));
            });
            prop_assert_eq!(icmp_tuples_of_valid(&err)?, ((vip, client), (client, cport, vip, vport)));
        }
    }

    fn error(src: [u8; 4], dst: [u8; 4], inner: &[u8]) -> Vec<u8> {
        let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv4(src, dst, 64)
            .icmpv4(Icmpv4Type::DestinationUnreachable(
                icmpv4::DestUnreachableHeader::Port,
            ));
        let mut out = Vec::new();
        b.write(&mut out, inner).expect("icmp");
        out
    }

    fn icmp_apply(
        buf: &mut [u8],
        f: impl FnOnce(&mut Ipv4Hdr, &mut u16, &mut Ipv4Hdr, &mut L4Ports),
    ) {
        let ip_at = EthHdr::LEN;
        let icmp_at = ip_at + Ipv4Hdr::LEN;
        let q_at = icmp_at + 8;
        let ports_at = q_at + Ipv4Hdr::LEN;
        let (mut ip, mut check, mut q, mut ports): (Ipv4Hdr, u16, Ipv4Hdr, L4Ports) = (
            read(buf, ip_at),
            read(buf, icmp_at + 2),
            read(buf, q_at),
            read(buf, ports_at),
        );
        f(&mut ip, &mut check, &mut q, &mut ports);
        write(buf, ip_at, ip);
        write(buf, icmp_at + 2, check);
        write(buf, q_at, q);
        write(buf, ports_at, ports);
    }

    /// (outer source, destination), (quoted source, port, destination,
    /// port), with the outer, ICMP and quoted IP checksums verified.
    #[allow(clippy::type_complexity)]
    fn icmp_tuples_of_valid(
        buf: &[u8],
    ) -> Result<(([u8; 4], [u8; 4]), ([u8; 4], u16, [u8; 4], u16)), TestCaseError> {
        let p =
            SlicedPacket::from_ethernet(buf).map_err(|e| TestCaseError::fail(format!("{e:?}")))?;
        let Some(etherparse::NetSlice::Ipv4(ip)) = p.net else {
            return Err(TestCaseError::fail("not ipv4"));
        };
        let hdr = ip.header().to_header();
        prop_assert_eq!(hdr.header_checksum, hdr.calc_header_checksum());
        let Some(TransportSlice::Icmpv4(icmp)) = p.transport else {
            return Err(TestCaseError::fail("not icmp"));
        };
        prop_assert_eq!(
            icmp.checksum(),
            icmp.header().icmp_type.calc_checksum(icmp.payload())
        );
        let inner = etherparse::Ipv4HeaderSlice::from_slice(icmp.payload()).expect("quoted");
        let ih = inner.to_header();
        prop_assert_eq!(ih.header_checksum, ih.calc_header_checksum());
        let l4 = &icmp.payload()[Ipv4Hdr::LEN..];
        let port = |at: usize| u16::from_be_bytes([l4[at], l4[at + 1]]);
        Ok((
            (hdr.source, hdr.destination),
            (ih.source, port(0), ih.destination, port(2)),
        ))
    }
}
