//! IPv6's flow tables as the agent sees them: `ESTABLISHED6` (a kernel
//! hash that never evicts) and `HALF_OPEN6` (an LRU hash), two entries per
//! NAT flow (lb-ebpf/src/flows6.rs). Read for `lb status`, `/metrics` and
//! `lb explain`; swept of expired flows by the same rule as IPv4's
//! ([`super::sweep::expired_by`]); purged of a reused backend id's flows.
//!
//! The sweep is what keeps `ESTABLISHED6` from filling with dead flows:
//! the data plane removes only the expired entries a packet finds, and a
//! full table takes no new established flow (they stay half-open) rather
//! than evict a live one.

use std::collections::{BTreeSet, HashMap as StdHashMap};

use aya::maps::{Array, HashMap, MapData, MapError};
use lb_common::{
    Backend, Flow, FlowConf,
    flow::{REPLY, STATE_ESTABLISHED, is_expired},
    ipv6::Addr6,
    maps6::{Backend6, FlowKey6},
};

use super::{
    Dataplane, DataplaneError, MapName, Result,
    handles::map_err,
    sweep::{SweepReport, expired_by, under_pressure},
};

/// An owned handle on one of IPv6's flow tables.
type FlowMap6 = HashMap<MapData, FlowKey6, Flow>;

/// Handles on IPv6's flow tables and what their pairs need (backends,
/// service VIPs), apart from the agent's loop.
pub struct Flows6 {
    established: FlowMap6,
    half_open: FlowMap6,
    backends: Array<MapData, Backend>,
    backends6: Array<MapData, Backend6>,
    vips: Array<MapData, Addr6>,
    /// `ESTABLISHED6`'s entries (twice `conntrack-size`).
    capacity: u64,
}

impl Dataplane {
    /// Owned handles on IPv6's flow tables.
    pub fn flows6(&self) -> Result<Flows6> {
        let hash = |name: MapName| -> Result<FlowMap6> {
            let data = self.map_data(name)?;
            let map = match name {
                MapName::HALF_OPEN6 => aya::maps::Map::LruHashMap(data),
                _ => aya::maps::Map::HashMap(data),
            };
            HashMap::try_from(map).map_err(map_err(name))
        };
        let established = hash(MapName::ESTABLISHED6)?;
        let capacity = self
            .map_data(MapName::ESTABLISHED6)?
            .info()
            .map_err(map_err(MapName::ESTABLISHED6))?
            .max_entries();
        Ok(Flows6 {
            established,
            half_open: hash(MapName::HALF_OPEN6)?,
            backends: self.owned_array(MapName::BACKENDS)?,
            backends6: self.owned_array(MapName::BACKENDS6)?,
            vips: self.owned_array(MapName::SERVICE_VIPS6)?,
            capacity: u64::from(capacity),
        })
    }
}

impl Flows6 {
    /// Every entry of `ESTABLISHED6` (both directions of a NAT flow).
    pub fn established(&self) -> Result<Vec<(FlowKey6, Flow)>> {
        snapshot(MapName::ESTABLISHED6, &self.established)
    }

    /// Every `HALF_OPEN6` entry within its timeout at `now`.
    pub fn half_open_live(&self, conf: &FlowConf, now: u32) -> Result<Vec<(FlowKey6, Flow)>> {
        Ok(snapshot(MapName::HALF_OPEN6, &self.half_open)?
            .into_iter()
            .filter(|(k, f)| !is_expired(conf, k.protocol, f, now))
            .collect())
    }

    /// The entry for `key` (as its packets arrive): `(true, entry)` if
    /// established, `(false, entry)` if half-open.
    pub fn lookup(&self, key: &FlowKey6) -> Result<Option<(bool, Flow)>> {
        if let Some(f) = super::found(self.established.get(key, 0), MapName::ESTABLISHED6)? {
            return Ok(Some((true, f)));
        }
        Ok(super::found(self.half_open.get(key, 0), MapName::HALF_OPEN6)?.map(|f| (false, f)))
    }

    /// An established entry's other direction (a NAT flow's; `None` for
    /// DSR or when the table has none), which keeps the entry alive past
    /// its timeout while it is live itself.
    pub fn pair_entry(&self, key: &FlowKey6, flow: &Flow) -> Result<Option<Flow>> {
        match self.pair(key, flow) {
            Some(pair) => super::found(self.established.get(&pair, 0), MapName::ESTABLISHED6),
            None => Ok(None),
        }
    }

    /// The key of an entry's other direction (a NAT flow's), as the data
    /// plane builds it: a reply's forward key goes to its service's VIP, a
    /// forward entry's reply comes from its backend.
    fn pair(&self, key: &FlowKey6, flow: &Flow) -> Option<FlowKey6> {
        if flow.direction == REPLY {
            let vip = self.vips.get(&flow.service_id, 0).ok()?;
            return Some(key.forward_of(vip, flow.vport));
        }
        if flow.vip == 0 {
            return None;
        }
        let backend = self.backends.get(&flow.backend_id, 0).ok()?;
        // A v6 backend's `addr` is its `BACKENDS6` index.
        let addr = self.backends6.get(&backend.addr, 0).ok()?.addr;
        Some(key.reply_of(addr, backend.port))
    }

    /// Removes the flows expired at `now` from both tables, as IPv4's sweep
    /// does (the pure rule is the same; under pressure long-idle TCP flows
    /// go too), adding what it removed to `report`.
    pub fn sweep(&mut self, conf: &FlowConf, now: u32, report: &mut SweepReport) -> Result<()> {
        let entries: StdHashMap<FlowKey6, Flow> = self.established()?.into_iter().collect();
        let pressure = under_pressure(entries.len() as u64, self.capacity);
        let gone = expired_by(&entries, |k, f| self.pair(k, f), conf, now, pressure);
        for key in gone {
            let was = &entries[&key];
            // A packet since the snapshot keeps its flow (its pair is
            // rechecked by the next sweep).
            match super::found(self.established.get(&key, 0), MapName::ESTABLISHED6)? {
                Some(f) if (f.seen, f.state) == (was.seen, was.state) => {}
                _ => continue,
            }
            if !remove(&mut self.established, MapName::ESTABLISHED6, &key)? {
                continue;
            }
            report.removed += 1;
            if was.direction != REPLY && was.state == STATE_ESTABLISHED {
                *report.swept.entry(was.backend_id).or_insert(0) += 1;
            }
        }
        let entries: StdHashMap<FlowKey6, Flow> = snapshot(MapName::HALF_OPEN6, &self.half_open)?
            .into_iter()
            .collect();
        for key in expired_by(&entries, |k, f| self.pair(k, f), conf, now, false) {
            if remove(&mut self.half_open, MapName::HALF_OPEN6, &key)? {
                report.removed += 1;
            }
        }
        Ok(())
    }

    /// Removes every flow pinned to one of `ids` (reused backend ids: no
    /// flow may reach the new backend by an old pin), both tables.
    pub fn purge(&mut self, ids: &BTreeSet<u32>) -> Result<()> {
        for (map, name) in [
            (&mut self.established, MapName::ESTABLISHED6),
            (&mut self.half_open, MapName::HALF_OPEN6),
        ] {
            let stale: Vec<FlowKey6> = snapshot(name, map)?
                .into_iter()
                .filter(|(_, f)| ids.contains(&f.backend_id))
                .map(|(k, _)| k)
                .collect();
            for key in &stale {
                remove(map, name, key)?;
            }
        }
        Ok(())
    }
}

/// Every entry of an IPv6 flow table, read in batches.
fn snapshot(name: MapName, table: &FlowMap6) -> Result<Vec<(FlowKey6, Flow)>> {
    use aya::maps::IterableMap as _;
    super::batch::entries(table.map()).map_err(|e| map_err(name)(MapError::IoError(e)))
}

/// Removes `key`; false if it was gone already (the data plane got there
/// first).
fn remove(map: &mut FlowMap6, name: MapName, key: &FlowKey6) -> Result<bool> {
    match map.remove(key) {
        Ok(()) => Ok(true),
        Err(MapError::KeyNotFound) => Ok(false),
        Err(MapError::SyscallError(e)) if e.io_error.kind() == std::io::ErrorKind::NotFound => {
            Ok(false)
        }
        Err(source) => Err(DataplaneError::Map {
            name: name.name(),
            source,
        }),
    }
}
