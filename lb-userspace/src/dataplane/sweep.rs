//! The agent's sweep of the flow tables: entries idle past their timeout
//! that no packet came to find (the data plane removes those it finds). It
//! reads and deletes through handles of its own, off the agent's loop, and
//! counts the established flows it removes in `FLOWS_SWEPT` (the data plane
//! counts its own removals in `BACKEND_FLOWS`).
//!
//! Which entries go is [`expired`], a pure function of a snapshot: a flow
//! goes when both of its entries (NAT: forward and reply) are idle past the
//! timeout of its state; an entry whose pair is already gone goes once it
//! is idle itself. Under pressure (`CONNTRACK` at least [`PRESSURE_NUM`] /
//! [`PRESSURE_DEN`] full) an established TCP flow idle longer than
//! [`LONG_IDLE`] counts as idle too: long-idle flows make room for new
//! ones (which stay half-open, still forwarded, while the table is full),
//! never a flow that carried a packet within it.

use std::collections::{BTreeMap, HashMap as StdHashMap};

use aya::maps::{Array, MapData, MapError};
use lb_common::{
    Backend, Flow, FlowConf, FlowKey,
    family::FlowTuple,
    flow::{REPLY, STATE_ESTABLISHED, forward_key, idle_ticks, is_expired, reply_key, ticks},
    headers::IPPROTO_TCP,
};

use super::{Dataplane, DataplaneError, MapName, Result, handles::map_err};

/// `CONNTRACK` is under pressure from this fill on: entries over capacity,
/// 7/8.
pub const PRESSURE_NUM: u64 = 7;
pub const PRESSURE_DEN: u64 = 8;
/// Ticks (~1.07 s each; ~2 min) an established TCP flow must be idle to be
/// removed under pressure, before its `tcp` timeout: far longer than a
/// keep-alive connection's pause between requests (tests hold 35 s), far
/// shorter than the 900 s a blind spoofer's DSR entries (SYN, ACK and a
/// segment past it) would otherwise hold the table.
pub const LONG_IDLE: u32 = 112;

/// Is `CONNTRACK` under pressure with `entries` of `capacity` used?
pub fn under_pressure(entries: u64, capacity: u64) -> bool {
    capacity > 0 && entries * PRESSURE_DEN >= capacity * PRESSURE_NUM
}

/// Now on the flow tables' clock (CLOCK_MONOTONIC_COARSE, which the data
/// plane reads through jiffies: `super::clock`), in ticks.
pub fn now_ticks() -> u32 {
    ticks(coarse_ns())
}

/// CLOCK_MONOTONIC_COARSE in nanoseconds.
pub(super) fn coarse_ns() -> u64 {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::MonotonicCoarse);
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// The keys of `entries` to remove at `now`: expired flows, both entries,
/// and under `pressure` established TCP flows idle past [`LONG_IDLE`].
/// `backend` gives a backend id's address (a NAT forward entry's reply key).
pub fn expired(
    entries: &StdHashMap<FlowKey, Flow>,
    backend: impl Fn(u32) -> Option<Backend>,
    conf: &FlowConf,
    now: u32,
    pressure: bool,
) -> Vec<FlowKey> {
    let pair = |key: &FlowKey, flow: &Flow| conntrack_pair(key, flow, &backend);
    expired_by(entries, pair, conf, now, pressure)
}

/// The key of a `CONNTRACK` entry's other direction: a NAT reply's forward
/// key, a NAT forward entry's reply key (from its backend's address, which
/// `backend` gives by id), `None` for a DSR entry or an unknown backend.
pub(super) fn conntrack_pair(
    key: &FlowKey,
    flow: &Flow,
    backend: impl Fn(u32) -> Option<Backend>,
) -> Option<FlowKey> {
    if flow.direction == REPLY {
        Some(forward_key(key, flow))
    } else if flow.vip != 0 {
        backend(flow.backend_id).map(|b| reply_key(key, &b))
    } else {
        None
    }
}

/// [`expired`] over either family's entries: `pair` gives an entry's other
/// direction (a NAT flow's reply or forward key), `None` for a DSR flow.
pub fn expired_by<K: FlowTuple + Eq + std::hash::Hash>(
    entries: &StdHashMap<K, Flow>,
    pair: impl Fn(&K, &Flow) -> Option<K>,
    conf: &FlowConf,
    now: u32,
    pressure: bool,
) -> Vec<K> {
    let idle = |key: &K, flow: &Flow| {
        is_expired(conf, key.protocol(), flow, now)
            || (pressure
                && key.protocol() == IPPROTO_TCP
                && flow.state == STATE_ESTABLISHED
                // Signed: a flow stamped a tick after `now` (the data
                // plane's clock runs ahead) was just active.
                && idle_ticks(flow.seen, now) > LONG_IDLE)
    };
    let mut gone = Vec::new();
    for (key, flow) in entries {
        if !idle(key, flow) {
            continue;
        }
        // Each entry decides for itself; an idle pair decides the same way,
        // so both go together. A live pair keeps both.
        match pair(key, flow).and_then(|p| entries.get(&p).map(|f| (p, f))) {
            Some((p, f)) if !idle(&p, f) => {}
            _ => gone.push(*key),
        }
    }
    gone
}

/// What one sweep did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SweepReport {
    /// Entries removed, every table (both families).
    pub removed: u64,
    /// Established flows removed per backend id (added to `FLOWS_SWEPT`).
    pub swept: BTreeMap<u32, u64>,
    /// Full-NAT claims freed in `FNAT_CLAIMS` whose flow was gone
    /// (`fullnat::stale_claims`): their ports are free again.
    pub claims: u64,
}

/// Handles on the flow tables for the sweep, apart from the agent's loop.
pub struct Sweeper {
    conntrack: super::read::FlowMap,
    half_open: super::HalfOpenTable,
    established: super::EstablishedTable,
    backends: Array<MapData, Backend>,
    conf: Array<MapData, FlowConf>,
    swept: Array<MapData, u64>,
    /// Full NAT's claims (`FNAT_CLAIMS`).
    claims: super::fullnat::ClaimTable,
    /// Full NAT's settings (`FNAT_CONF`: the quarantine).
    fnat_conf: Array<MapData, lb_common::FnatConf>,
    /// IPv6's tables, swept by the same rule.
    v6: super::Flows6,
    /// Established entries the tables are rated for (two per NAT flow:
    /// twice `conntrack-size`).
    capacity: u64,
}

impl Dataplane {
    /// The sweep's own handles on the maps it needs.
    pub fn sweeper(&self) -> Result<Sweeper> {
        let (conntrack, half_open, established) = self.flow_maps()?;
        let info = self
            .map_data(MapName::CONNTRACK)?
            .info()
            .map_err(map_err(MapName::CONNTRACK))?;
        Ok(Sweeper {
            capacity: u64::from(info.max_entries()),
            conntrack,
            half_open,
            established,
            backends: self.owned_array(MapName::BACKENDS)?,
            conf: self.owned_array(MapName::FLOW_CONF)?,
            swept: self.owned_array(MapName::FLOWS_SWEPT)?,
            claims: self.claim_table()?,
            fnat_conf: self.owned_array(MapName::FNAT_CONF)?,
            v6: self.flows6()?,
        })
    }
}

impl Sweeper {
    /// Removes every expired flow at `now` from both tables.
    pub fn sweep(&mut self, now: u32) -> Result<SweepReport> {
        let conf = self.conf.get(&0, 0).map_err(map_err(MapName::FLOW_CONF))?;
        let quarantine = self
            .fnat_conf
            .get(&0, 0)
            .map_err(map_err(MapName::FNAT_CONF))?
            .quarantine;
        // Claims of the established full-NAT flows removed here: freed into
        // their quarantine (as the data plane's removal does).
        let mut freed = Vec::new();
        let backends = &self.backends;
        let backend = |id: u32| backends.get(&id, 0).ok();
        let mut report = SweepReport::default();
        // The established table and its overflow, as one set of entries
        // (a NAT flow's two directions are two entries, as they were in
        // CONNTRACK alone): the rule sees a flow's pair wherever it is.
        let overflow: StdHashMap<FlowKey, Flow> =
            self.conntrack.iter().filter_map(|r| r.ok()).collect();
        let slots = self.established.occupied();
        let mut entries = overflow.clone();
        entries.extend(super::established::entries(&slots));
        let pressure = under_pressure(entries.len() as u64, self.capacity);
        let gone = expired(&entries, backend, &conf, now, pressure);
        // A flow in a slot goes whole, by its forward key (both of its
        // entries are in `gone` together), under the slot's lock and only
        // if no packet came for it since the snapshot.
        let idle: std::collections::HashSet<FlowKey> = gone.iter().copied().collect();
        for was in slots.iter().filter(|s| idle.contains(&s.key)) {
            let unchanged = |s: &lb_common::EstablishedSlot| {
                (s.forward.seen, s.reply.seen, s.forward.state)
                    == (was.forward.seen, was.reply.seen, was.forward.state)
            };
            if let Some(slot) = self.established.remove_if(&was.key, &conf, unchanged) {
                report.removed += lb_common::flow_table::entries_of(&slot).count() as u64;
                if slot.forward.state == STATE_ESTABLISHED {
                    *report.swept.entry(slot.forward.backend_id).or_insert(0) += 1;
                }
                freed.extend(super::fullnat::freed_claim(
                    &was.key,
                    &slot.forward,
                    (slot.backend_addr, slot.backend_port),
                    now,
                    quarantine,
                ));
            }
        }
        for key in gone.into_iter().filter(|k| overflow.contains_key(k)) {
            match self.conntrack.remove(&key) {
                Ok(()) => {}
                // The data plane got there first.
                Err(MapError::KeyNotFound) => continue,
                Err(MapError::SyscallError(e))
                    if e.io_error.kind() == std::io::ErrorKind::NotFound =>
                {
                    continue;
                }
                Err(source) => {
                    return Err(DataplaneError::Map {
                        name: MapName::CONNTRACK.name(),
                        source,
                    });
                }
            }
            report.removed += 1;
            let flow = &overflow[&key];
            if flow.direction != REPLY && flow.state == STATE_ESTABLISHED {
                *report.swept.entry(flow.backend_id).or_insert(0) += 1;
            }
            if let Some(b) = backend(flow.backend_id) {
                freed.extend(super::fullnat::freed_claim(
                    &key,
                    flow,
                    (b.addr, b.port),
                    now,
                    quarantine,
                ));
            }
        }
        // Half-open slots: the same choice over a snapshot, then each slot
        // cleared under its lock only if it still holds that expired entry.
        let entries: StdHashMap<FlowKey, Flow> = self.half_open.entries().into_iter().collect();
        let gone: std::collections::HashSet<FlowKey> =
            expired(&entries, backend, &conf, now, false)
                .into_iter()
                .collect();
        report.removed += self
            .half_open
            .clear_all(|k, f| gone.contains(k) && is_expired(&conf, k.protocol, f, now));
        // Buckets whose overflowed flows are all gone stop sending misses
        // to the overflow.
        let conntrack = &self.conntrack;
        self.established.refresh_overflow_flags(&conf, || {
            conntrack
                .iter()
                .filter_map(|r| r.ok())
                .filter(|(_, f)| f.direction != REPLY)
                .map(|(k, _)| k)
                .collect()
        });
        for claim in &freed {
            super::fullnat::free(&self.claims, conf.half_open_seed, claim);
        }
        self.v6.sweep(&conf, now, &mut report)?;
        report.claims = self.sweep_claims(&conf, now, quarantine)?;
        for (&id, &n) in &report.swept {
            let before = self
                .swept
                .get(&id, 0)
                .map_err(map_err(MapName::FLOWS_SWEPT))?;
            self.swept
                .set(id, before + n, 0)
                .map_err(map_err(MapName::FLOWS_SWEPT))?;
        }
        Ok(report)
    }

    /// Removes full NAT's stale claims (`fullnat::stale_claims`), after the
    /// tables' own sweep so the claims of the flows it removed go in the
    /// same pass. The claims are read before the tables: a claim newer
    /// than the tables' snapshot is within its grace anyway.
    fn sweep_claims(&mut self, conf: &FlowConf, now: u32, quarantine: u16) -> Result<u64> {
        let claims = super::fullnat::claims(&self.claims);
        if claims.is_empty() {
            return Ok(0);
        }
        let mut flows: StdHashMap<FlowKey, Flow> =
            super::read::snapshot(MapName::CONNTRACK, &self.conntrack)?
                .into_iter()
                .collect();
        flows.extend(super::established::entries(&self.established.occupied()));
        flows.extend(
            self.half_open
                .entries()
                .into_iter()
                .filter(|(k, f)| !is_expired(conf, k.protocol, f, now)),
        );
        let backends = &self.backends;
        let stale = super::fullnat::stale_claims(
            &claims,
            &flows,
            |id| backends.get(&id, 0).ok(),
            now,
            quarantine,
        );
        Ok(super::fullnat::remove_stale(
            &self.claims,
            conf.half_open_seed,
            &stale,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::flow::{FORWARD, STATE_CLOSING, STATE_NEW};

    const TCP: u8 = 6;
    const UDP: u8 = 17;

    fn conf() -> FlowConf {
        FlowConf {
            timeouts: [5, 100, 10, 30],
            ..FlowConf::default()
        }
    }

    fn key(sport: u16, protocol: u8) -> FlowKey {
        FlowKey {
            saddr: 0x0200_12c6,
            daddr: 0x0a00_12c6,
            sport,
            dport: 80,
            protocol,
            ..FlowKey::default()
        }
    }

    fn backend(_: u32) -> Option<Backend> {
        Some(Backend {
            addr: 0x0b00_13c6,
            port: 80,
            ..Backend::default()
        })
    }

    /// A NAT flow's two entries, the forward one seen at `fwd`, the reply at
    /// `rep`.
    fn nat_flow(sport: u16, state: u32, fwd: u32, rep: u32) -> [(FlowKey, Flow); 2] {
        let k = key(sport, TCP);
        let forward = Flow {
            state,
            seen: fwd,
            vip: k.daddr,
            direction: FORWARD,
            ..Flow::default()
        };
        let reply = Flow {
            state,
            seen: rep,
            vip: k.daddr,
            vport: k.dport,
            direction: REPLY,
            ..Flow::default()
        };
        let r = reply_key(&k, &backend(0).expect("backend"));
        [(k, forward), (r, reply)]
    }

    #[test]
    fn a_flow_goes_when_both_entries_are_idle_and_not_before() {
        let mut entries: StdHashMap<FlowKey, Flow> = StdHashMap::new();
        // Both idle past the established timeout (100): both go.
        entries.extend(nat_flow(1, STATE_ESTABLISHED, 10, 20));
        // Forward idle, reply busy (a download): both stay.
        entries.extend(nat_flow(2, STATE_ESTABLISHED, 10, 190));
        // Closing, 11 ticks idle (timeout 10): both go.
        entries.extend(nat_flow(3, STATE_CLOSING, 189, 189));
        // A DSR flow (no reply entry), half-open, 6 ticks idle (timeout 5).
        let dsr = key(4, TCP);
        entries.insert(
            dsr,
            Flow {
                state: STATE_NEW,
                seen: 194,
                ..Flow::default()
            },
        );
        // UDP, 30 ticks idle: not yet (timeout 30 means > 30).
        let udp = key(5, UDP);
        entries.insert(
            udp,
            Flow {
                seen: 170,
                ..Flow::default()
            },
        );
        let mut gone = expired(&entries, backend, &conf(), 200, false);
        gone.sort_by_key(|k| (k.sport, k.dport));
        let flow1 = nat_flow(1, STATE_ESTABLISHED, 0, 0);
        let flow3 = nat_flow(3, STATE_CLOSING, 0, 0);
        let mut want = vec![flow1[0].0, flow1[1].0, flow3[0].0, flow3[1].0, dsr];
        want.sort_by_key(|k| (k.sport, k.dport));
        assert_eq!(gone, want);
    }

    #[test]
    fn an_orphaned_reply_entry_goes_once_idle() {
        let [_, (rk, reply)] = nat_flow(7, STATE_ESTABLISHED, 0, 50);
        let entries = StdHashMap::from([(rk, reply)]);
        assert!(expired(&entries, backend, &conf(), 150, false).is_empty());
        assert_eq!(expired(&entries, backend, &conf(), 151, false), vec![rk]);
    }

    #[test]
    fn under_pressure_long_idle_established_flows_go_and_recently_active_ones_stay() {
        let conf = FlowConf {
            timeouts: [30, 900, 10, 60],
            ..FlowConf::default()
        };
        let now = 1000;
        let mut entries: StdHashMap<FlowKey, Flow> = StdHashMap::new();
        // A DSR flow (one entry) idle past LONG_IDLE, one idle 35 ticks,
        // one the data plane stamped a tick after the agent's `now` (its
        // clock runs ahead).
        let (old, recent, ahead) = (key(1, TCP), key(2, TCP), key(6, TCP));
        for (k, seen) in [
            (old, now - LONG_IDLE - 1),
            (recent, now - 35),
            (ahead, now + 1),
        ] {
            let flow = Flow {
                state: STATE_ESTABLISHED,
                seen,
                ..Flow::default()
            };
            entries.insert(k, flow);
        }
        // A NAT flow, both directions long idle; one whose reply is busy.
        entries.extend(nat_flow(3, STATE_ESTABLISHED, 0, now - LONG_IDLE - 5));
        entries.extend(nat_flow(4, STATE_ESTABLISHED, 0, now - 1));
        // UDP is not a TCP flow: its own timeout only.
        let udp = key(5, UDP);
        let udp_flow = Flow {
            state: STATE_ESTABLISHED,
            seen: now - 59,
            ..Flow::default()
        };
        entries.insert(udp, udp_flow);
        assert!(expired(&entries, backend, &conf, now, false).is_empty());
        let mut gone = expired(&entries, backend, &conf, now, true);
        gone.sort_by_key(|k| (k.sport, k.dport));
        let nat3 = nat_flow(3, STATE_ESTABLISHED, 0, 0);
        let mut want = vec![old, nat3[0].0, nat3[1].0];
        want.sort_by_key(|k| (k.sport, k.dport));
        assert_eq!(gone, want);
        assert!(!under_pressure(895, 1024) && under_pressure(896, 1024));
        assert!(!under_pressure(0, 0));
    }
}
