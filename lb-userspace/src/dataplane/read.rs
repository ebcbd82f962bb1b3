//! Read-only views of a data plane: counters, verdicts, the flow table,
//! the facts `lb explain` needs, the rings a previous agent left. None of
//! them writes a map.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use aya::maps::{
    Array, HashMap, MapData, MapError,
    lpm_trie::{Key, LpmTrie},
};
use lb_common::{
    Backend, Counters, FW_F_RATE, FW_GLOBAL, Flow, FlowConf, FlowCounts, FlowKey, FwKey, FwScope,
    MaglevTable, Ring, ServiceConf, ServiceKey, VERDICT_COUNT, Verdict,
    flow::{REPLY, is_expired},
    ipv6::{Addr6, octets_of},
    maps6::{FlowKey6, FwKey6, ServiceKey6},
};

use super::{
    Dataplane, DataplaneError, EntryAge, EstablishedTable, FlowFacts, FlowFacts6, FwFacts,
    HalfOpenTable, MapName, Result, ServiceFacts, found,
    handles::map_err,
    plan::{BackendAddr, SvcKey, any_endpoint, svc_key},
};
use crate::config;

impl Dataplane {
    /// Verdict counters summed over CPUs, in [`Verdict::ALL`] order.
    ///
    /// A `VERDICTS` adopted from a pin dir of an older version is shorter
    /// (a pinned map keeps its size): the verdicts added since (the
    /// firewall's) read 0 there, and count once `lb teardown` lets the map
    /// be made again.
    pub fn verdicts(&self) -> Result<Vec<(Verdict, u64)>> {
        let map = self.per_cpu::<u64>(MapName::VERDICTS)?;
        (0..VERDICT_COUNT)
            .map(|i| {
                let n = match map.get(&i, 0) {
                    Ok(values) => values.iter().sum(),
                    Err(MapError::OutOfBounds { .. } | MapError::KeyNotFound) => 0,
                    Err(source) => {
                        return Err(DataplaneError::Map {
                            name: MapName::VERDICTS.name(),
                            source,
                        });
                    }
                };
                Ok((Verdict::ALL[i as usize], n))
            })
            .collect()
    }

    /// Traffic counters of a service or backend id, summed over CPUs.
    pub fn counters(&self, map: MapName, id: u32) -> Result<Counters> {
        let values = self
            .per_cpu::<Counters>(map)?
            .get(&id, 0)
            .map_err(map_err(map))?;
        Ok(values.iter().fold(Counters::default(), |acc, c| Counters {
            packets: acc.packets + c.packets,
            bytes: acc.bytes + c.bytes,
        }))
    }

    /// Second handles on the flow tables and the active counts, for
    /// counting flows off the agent's loop (walking 262k entries takes the
    /// better part of a second).
    pub fn flow_table(&self) -> Result<FlowTable> {
        let (conntrack, half_open, established) = self.flow_maps()?;
        Ok(FlowTable {
            conntrack,
            half_open,
            established,
            conf: self.owned_array(MapName::FLOW_CONF)?,
            counts: self.owned_array(MapName::BACKEND_FLOWS)?,
            swept: self.owned_array(MapName::FLOWS_SWEPT)?,
            sync_opened: self.owned_array(MapName::SYNC_OPENED)?,
            fnat_claims: self.claim_table()?,
            v6: self.flows6()?,
        })
    }

    /// Owned handles on `CONNTRACK` (the overflow), `HALF_OPEN` and
    /// `ESTABLISHED` (for readers and the sweep, apart from this value).
    pub(super) fn flow_maps(&self) -> Result<(FlowMap, HalfOpenTable, EstablishedTable)> {
        let conntrack =
            HashMap::try_from(aya::maps::Map::HashMap(self.map_data(MapName::CONNTRACK)?))
                .map_err(|source| DataplaneError::Map {
                    name: MapName::CONNTRACK.name(),
                    source,
                })?;
        Ok((
            conntrack,
            self.half_open_table()?,
            self.established_table()?,
        ))
    }

    /// An owned handle on `NEIGH_WANTED`, the next hops the data plane
    /// found without a neighbour entry (for the agent's resolver thread).
    pub fn neighbour_requests(&self) -> Result<NeighbourRequests> {
        let name = MapName::NEIGH_WANTED;
        let map = HashMap::try_from(aya::maps::Map::LruHashMap(self.map_data(name)?))
            .map_err(map_err(name))?;
        let name = MapName::NEIGH_WANTED6;
        let map6 = HashMap::try_from(aya::maps::Map::LruHashMap(self.map_data(name)?))
            .map_err(map_err(name))?;
        Ok(NeighbourRequests { map, map6 })
    }

    /// An owned handle on one of the program's array maps.
    pub(super) fn owned_array<T: aya::Pod>(&self, map: MapName) -> Result<Array<MapData, T>> {
        Array::try_from(aya::maps::Map::Array(self.map_data(map)?)).map_err(map_err(map))
    }

    /// What the maps hold for one flow, for `lb explain`: its service (conf,
    /// active ring, round-robin counter), its conntrack entry and the
    /// backend that entry names. Lookups only; nothing is written.
    pub fn flow_facts(&self, key: &FlowKey) -> Result<FlowFacts> {
        let map = |name: MapName| self.map_ref(name);
        let err = map_err;
        let vips: HashMap<&MapData, u32, u32> =
            HashMap::try_from(map(MapName::VIPS)?).map_err(err(MapName::VIPS))?;
        let services: HashMap<&MapData, ServiceKey, u32> =
            HashMap::try_from(map(MapName::SERVICES)?).map_err(err(MapName::SERVICES))?;
        let flows: HashMap<&MapData, FlowKey, Flow> =
            HashMap::try_from(map(MapName::CONNTRACK)?).map_err(err(MapName::CONNTRACK))?;
        let backends: Array<&MapData, Backend> =
            Array::try_from(map(MapName::BACKENDS)?).map_err(err(MapName::BACKENDS))?;
        let service_key = ServiceKey {
            vip: key.daddr,
            port: key.dport,
            protocol: key.protocol,
            _pad: 0,
        };
        let service = match found(services.get(&service_key, 0), MapName::SERVICES)? {
            None => None,
            Some(id) => Some(self.service_facts(id)?),
        };
        let conf = self.flow_conf()?;
        // The entry, and a NAT flow's other direction (which keeps an
        // expired entry alive while it is live; half-open slots hold one).
        let (entry, slot_pair, in_conntrack) =
            match self.established_table()?.get_with_pair(key, &conf) {
                Some((flow, pair)) => (Some(flow), pair, false),
                None => match found(flows.get(key, 0), MapName::CONNTRACK)? {
                    Some(flow) => (Some(flow), None, true),
                    None => (self.half_open_table()?.get(key, &conf), None, false),
                },
            };
        let conntrack = match entry {
            None => None,
            Some(flow) => Some((
                flow,
                backends
                    .get(&flow.backend_id, 0)
                    .map_err(err(MapName::BACKENDS))?,
            )),
        };
        // An overflow entry's other direction is an entry of its own.
        let pair = match &conntrack {
            Some((flow, backend)) if in_conntrack => {
                match super::sweep::conntrack_pair(key, flow, |_| Some(*backend)) {
                    Some(k) => found(flows.get(&k, 0), MapName::CONNTRACK)?,
                    None => None,
                }
            }
            _ => slot_pair,
        };
        let now = super::sweep::now_ticks();
        let age = conntrack
            .as_ref()
            .map(|(flow, _)| EntryAge::of(&conf, key.protocol, flow, pair.as_ref(), now));
        let firewall = self.firewall_facts(service.as_ref(), |scope, name| {
            let trie = self.trie(name)?;
            let lookup = Key::new(
                64,
                FwKey {
                    scope,
                    addr: key.saddr,
                },
            );
            found(trie.get(&lookup, 0), name)
        })?;
        Ok(FlowFacts {
            vip_known: found(vips.get(&key.daddr, 0), MapName::VIPS)?.is_some(),
            service,
            conntrack,
            age,
            firewall,
        })
    }

    /// What the maps hold for a new IPv6 flow, for `lb explain` (its entry
    /// in IPv6's flow tables is `Flows6::lookup`'s): `VIPS6`, the service
    /// `SERVICES6` names with its conf, tables and `SOURCE_MASKS6` entry,
    /// and the firewall scopes with `FW_DENY6`/`FW_ALLOW6` looked up as the
    /// data plane looks them up. Lookups only.
    pub fn flow_facts6(&self, key: &FlowKey6) -> Result<FlowFacts6> {
        let map = |name: MapName| self.map_ref(name);
        let err = map_err;
        let vips: HashMap<&MapData, Addr6, u32> =
            HashMap::try_from(map(MapName::VIPS6)?).map_err(err(MapName::VIPS6))?;
        let services: HashMap<&MapData, ServiceKey6, u32> =
            HashMap::try_from(map(MapName::SERVICES6)?).map_err(err(MapName::SERVICES6))?;
        let service_key = ServiceKey6 {
            vip: key.daddr,
            port: key.dport,
            protocol: key.protocol,
            _pad: 0,
        };
        let (service, source_mask) = match found(services.get(&service_key, 0), MapName::SERVICES6)?
        {
            None => (None, [0; 4]),
            Some(id) => {
                let masks: Array<&MapData, Addr6> = Array::try_from(map(MapName::SOURCE_MASKS6)?)
                    .map_err(err(MapName::SOURCE_MASKS6))?;
                let mask = masks.get(&id, 0).map_err(err(MapName::SOURCE_MASKS6))?;
                (Some(self.service_facts(id)?), mask)
            }
        };
        let mut firewall = self.firewall_facts(service.as_ref(), |scope, name| {
            let name = match name {
                MapName::FW_DENY => MapName::FW_DENY6,
                _ => MapName::FW_ALLOW6,
            };
            let trie: LpmTrie<&MapData, FwKey6, u32> =
                LpmTrie::try_from(map(name)?).map_err(err(name))?;
            let lookup = Key::new(
                160,
                FwKey6 {
                    scope,
                    addr: key.saddr,
                },
            );
            found(trie.get(&lookup, 0), name)
        })?;
        let masks: Array<&MapData, Addr6> =
            Array::try_from(map(MapName::FW_MASKS6)?).map_err(err(MapName::FW_MASKS6))?;
        for fw in &mut firewall {
            if fw.conf.flags & FW_F_RATE != 0 {
                fw.mask6 = Some(masks.get(&fw.scope, 0).map_err(err(MapName::FW_MASKS6))?);
            }
        }
        Ok(FlowFacts6 {
            vip_known: found(vips.get(&key.daddr, 0), MapName::VIPS6)?.is_some(),
            service,
            source_mask,
            firewall,
        })
    }

    /// Service `id` as the maps hold it: conf, active ring half, round-robin
    /// counter, active Maglev half. Ids are shared by both families.
    fn service_facts(&self, id: u32) -> Result<ServiceFacts> {
        let map = |name: MapName| self.map_ref(name);
        let err = map_err;
        let confs: Array<&MapData, ServiceConf> =
            Array::try_from(map(MapName::SERVICE_CONF)?).map_err(err(MapName::SERVICE_CONF))?;
        let rings: Array<&MapData, Ring> =
            Array::try_from(map(MapName::RINGS)?).map_err(err(MapName::RINGS))?;
        let counters: Array<&MapData, u64> =
            Array::try_from(map(MapName::RR_COUNTERS)?).map_err(err(MapName::RR_COUNTERS))?;
        let conf = confs.get(&id, 0).map_err(err(MapName::SERVICE_CONF))?;
        let ring = rings
            .get(&Ring::slot(id, conf.active_ring), 0)
            .map_err(err(MapName::RINGS))?;
        let len = (ring.len as usize).min(ring.ids.len());
        let maglev = if lb_common::uses_maglev(conf.scheduler) {
            let tables: HashMap<&MapData, u32, MaglevTable> =
                HashMap::try_from(map(MapName::MAGLEV)?).map_err(err(MapName::MAGLEV))?;
            match found(
                tables.get(&Ring::slot(id, conf.active_ring), 0),
                MapName::MAGLEV,
            )? {
                Some(t) => t.ids[..(t.len as usize).min(t.ids.len())].to_vec(),
                None => Vec::new(),
            }
        } else {
            Vec::new()
        };
        Ok(ServiceFacts {
            id,
            conf,
            ring: ring.ids[..len].to_vec(),
            rr_counter: counters.get(&id, 0).map_err(err(MapName::RR_COUNTERS))?,
            maglev,
        })
    }

    /// The firewall scopes a new flow meets (the global one, then its
    /// service's), each with the rule `matched(scope, FW_DENY or FW_ALLOW)`
    /// finds for the client (the family's trie lookup) named.
    fn firewall_facts(
        &self,
        service: Option<&ServiceFacts>,
        matched: impl Fn(u32, MapName) -> Result<Option<u32>>,
    ) -> Result<Vec<FwFacts>> {
        let scopes: Array<&MapData, FwScope> = Array::try_from(self.map_ref(MapName::FW_SCOPES)?)
            .map_err(map_err(MapName::FW_SCOPES))?;
        let named = |id: u32| {
            let rule = self
                .fw
                .rules
                .iter()
                .find(|(_, v)| **v == id)
                .map_or(format!("rule id {id}"), |(r, _)| r.to_string());
            (rule, id)
        };
        let scope_ids = std::iter::once(FW_GLOBAL).chain(service.map(|s| s.id));
        let mut firewall = Vec::new();
        for scope in scope_ids {
            firewall.push(FwFacts {
                scope,
                conf: scopes.get(&scope, 0).map_err(map_err(MapName::FW_SCOPES))?,
                deny: matched(scope, MapName::FW_DENY)?.map(named),
                allow: matched(scope, MapName::FW_ALLOW)?.map(named),
                mask6: None,
            });
        }
        Ok(firewall)
    }

    /// A second, owned handle on one of the program's maps (by its kernel
    /// id), for readers apart from this value: the flow table, `lb trace`.
    pub fn map_data(&self, name: MapName) -> Result<MapData> {
        let err = map_err(name);
        let data = match self.map_ref(name)? {
            aya::maps::Map::LruHashMap(d)
            | aya::maps::Map::HashMap(d)
            | aya::maps::Map::Array(d)
            | aya::maps::Map::PerCpuArray(d)
            | aya::maps::Map::RingBuf(d) => d,
            _ => return Err(DataplaneError::MissingMap(name.name())),
        };
        let id = data.info().map_err(err)?.id();
        MapData::from_id(id).map_err(err)
    }

    /// The backends in each service's active ring, of either family: what
    /// a previous agent left serving. A restarted agent starts those
    /// backends as up, so a restart changes no ring. Read after the id
    /// tables were adopted (`adopt_ids`), which name each backend id's
    /// address and port (an IPv6 backend's from `BACKENDS6`).
    pub fn ring_members(&self) -> Result<RingMembers> {
        let rings: Array<&MapData, Ring> =
            Array::try_from(self.map_ref(MapName::RINGS)?).map_err(map_err(MapName::RINGS))?;
        let endpoints: BTreeMap<u32, (u32, BackendAddr, u16)> = self
            .ids
            .backends
            .iter()
            .map(|(&key, &id)| (id, key))
            .collect();
        let mut members = BTreeSet::new();
        for (key, id) in &self.ids.services {
            let half = self.ids.active_half.get(id).copied().unwrap_or(0);
            let ring = rings
                .get(&Ring::slot(*id, half), 0)
                .map_err(map_err(MapName::RINGS))?;
            for bid in ring.ids.iter().take(ring.len as usize) {
                // A ring names its own service's backends only.
                if let Some(&(service, addr, port)) = endpoints.get(bid)
                    && service == *id
                {
                    members.insert((*key, addr, port));
                }
            }
        }
        Ok(RingMembers(members))
    }
}

/// The backends a previous agent left in the rings ([`Dataplane::ring_members`]):
/// (service key, address, port) as the maps hold them, either family.
#[derive(Debug, Default)]
pub struct RingMembers(BTreeSet<(SvcKey, BackendAddr, u16)>);

impl RingMembers {
    /// `backend` of `svc` was in `svc`'s ring.
    pub fn serves(&self, svc: &config::Service, backend: &config::Backend) -> bool {
        let (addr, port) = any_endpoint(backend.address);
        self.0.contains(&(svc_key(svc), addr, port))
    }
}

/// IPv6 flow-table entries as (key as packets arrive, entry).
pub type Entries6 = Vec<(FlowKey6, Flow)>;

/// An owned handle on a flow table.
pub(super) type FlowMap = HashMap<MapData, FlowKey, Flow>;

/// The flow tables, read apart from the agent's loop.
pub struct FlowTable {
    conntrack: FlowMap,
    half_open: HalfOpenTable,
    established: EstablishedTable,
    conf: Array<MapData, FlowConf>,
    counts: Array<MapData, FlowCounts>,
    swept: Array<MapData, u64>,
    /// Flows from peer LBs the sync agent inserted (issue 27).
    sync_opened: Array<MapData, u64>,
    /// Full NAT's claims (`FNAT_CLAIMS`): ports in use per source address.
    fnat_claims: super::fullnat::ClaimTable,
    /// IPv6's tables.
    v6: super::Flows6,
}

impl FlowTable {
    /// Flows in the tables per backend id, established and half-open (walks
    /// both tables: for status, not for the fast path). A NAT flow's reply
    /// entry is not a second flow.
    pub fn per_backend(&self) -> Result<BTreeMap<u32, u64>> {
        let mut counts = BTreeMap::new();
        let half_open = self.half_open_live()?;
        let (established6, half_open6) = self.v6_entries()?;
        for flow in self
            .established_entries()?
            .iter()
            .chain(&half_open)
            .map(|(_, f)| f)
            .chain(established6.iter().chain(&half_open6).map(|(_, f)| f))
        {
            if flow.direction != REPLY {
                *counts.entry(flow.backend_id).or_insert(0) += 1;
            }
        }
        Ok(counts)
    }

    /// Entries in the established table with its overflow, and in the
    /// half-open table (two per NAT flow, as directions; half-open entries
    /// past their timeout, which the next flow to hash there replaces, are
    /// not counted).
    pub fn entries(&self) -> Result<(u64, u64)> {
        Ok((
            self.established_entries()?.len() as u64,
            self.half_open_live()?.len() as u64,
        ))
    }

    /// Every established entry (both directions of a NAT flow), in the
    /// table and in its overflow: one pass over each, for a reader that
    /// looks many flows up at once (a `lookup` per flow maps a window of the
    /// table per call).
    pub fn established_entries(&self) -> Result<Vec<(FlowKey, Flow)>> {
        let mut all = self.established.entries();
        all.extend(snapshot(MapName::CONNTRACK, &self.conntrack)?);
        Ok(all)
    }

    /// IPv6's established entries and its live half-open ones (two per NAT
    /// flow, as directions).
    pub fn v6_entries(&self) -> Result<(Entries6, Entries6)> {
        let conf = self.flow_conf()?;
        let now = super::sweep::now_ticks();
        Ok((self.v6.established()?, self.v6.half_open_live(&conf, now)?))
    }

    /// IPv6 flows in the tables, established and half-open (a NAT flow's
    /// reply entry is not a second flow).
    pub fn v6_flows(&self) -> Result<u64> {
        let (established, half_open) = self.v6_entries()?;
        Ok(established
            .iter()
            .chain(&half_open)
            .filter(|(_, f)| f.direction != REPLY)
            .count() as u64)
    }

    /// The IPv6 entry for `key`: `(true, entry)` if established, `(false,
    /// entry)` if half-open.
    pub fn lookup6(&self, key: &FlowKey6) -> Result<Option<(bool, Flow)>> {
        self.v6.lookup(key)
    }

    /// Full NAT's claims per source address (one scan of the mapped
    /// `FNAT_CLAIMS`).
    pub fn fnat_ports_in_use(&self) -> Result<BTreeMap<Ipv4Addr, super::fullnat::SourceClaims>> {
        let claims = super::fullnat::claims(&self.fnat_claims);
        Ok(super::fullnat::ports_in_use(claims))
    }

    /// The half-open entries within their timeout (one pass, as
    /// `established_entries`).
    pub fn half_open_live(&self) -> Result<Vec<(FlowKey, Flow)>> {
        let conf = self.flow_conf()?;
        let now = super::sweep::now_ticks();
        Ok(self
            .half_open
            .entries()
            .into_iter()
            .filter(|(k, f)| !is_expired(&conf, k.protocol, f, now))
            .collect())
    }

    fn flow_conf(&self) -> Result<FlowConf> {
        self.conf.get(&0, 0).map_err(|source| DataplaneError::Map {
            name: MapName::FLOW_CONF.name(),
            source,
        })
    }

    /// The entry for `key`: `(true, entry)` if established, `(false, entry)`
    /// if half-open.
    pub fn lookup(&self, key: &FlowKey) -> Result<Option<(bool, Flow)>> {
        let conf = self.flow_conf()?;
        if let Some(f) = self.established.get(key, &conf) {
            return Ok(Some((true, f)));
        }
        if let Some(f) = found(self.conntrack.get(key, 0), MapName::CONNTRACK)? {
            return Ok(Some((true, f)));
        }
        Ok(self.half_open.get(key, &conf).map(|f| (false, f)))
    }

    /// Established flows of backend `id` that have not closed: opened minus
    /// closed (by the data plane) minus swept (by the agent). Exact, and one
    /// lookup per backend.
    pub fn active(&self, id: u32) -> Result<u64> {
        let err = map_err;
        let c = self
            .counts
            .get(&id, 0)
            .map_err(err(MapName::BACKEND_FLOWS))?;
        let swept = self.swept.get(&id, 0).map_err(err(MapName::FLOWS_SWEPT))?;
        let synced = self
            .sync_opened
            .get(&id, 0)
            .map_err(err(MapName::SYNC_OPENED))?;
        Ok((c.opened + synced)
            .saturating_sub(c.closed)
            .saturating_sub(swept))
    }
}

/// Every entry of a flow table, read in batches.
pub(super) fn snapshot(name: MapName, table: &FlowMap) -> Result<Vec<(FlowKey, Flow)>> {
    use aya::maps::IterableMap as _;
    super::batch::entries(table.map()).map_err(|e| map_err(name)(MapError::IoError(e)))
}

/// `NEIGH_WANTED` and `NEIGH_WANTED6`: next hops (address → egress
/// ifindex) the data plane found without a neighbour entry, IPv4's and
/// IPv6's.
pub struct NeighbourRequests {
    map: HashMap<MapData, u32, u32>,
    map6: HashMap<MapData, Addr6, u32>,
}

impl NeighbourRequests {
    /// Every reported next hop as (egress ifindex, address), IPv4's first,
    /// removed from the maps: a hop reported again afterwards is asked for
    /// again.
    pub fn drain(&mut self) -> Vec<(u32, IpAddr)> {
        let v4 = drain_map(&mut self.map, |a| Ipv4Addr::from(a.to_ne_bytes()).into());
        let v6 = drain_map(&mut self.map6, |a| Ipv6Addr::from(octets_of(&a)).into());
        v4.into_iter().chain(v6).collect()
    }
}

/// Every (address → ifindex) entry of `map` as (ifindex, `ip(address)`),
/// each removed.
fn drain_map<K: aya::Pod>(
    map: &mut HashMap<MapData, K, u32>,
    ip: impl Fn(K) -> IpAddr,
) -> Vec<(u32, IpAddr)> {
    let wanted: Vec<(K, u32)> = map.iter().filter_map(|r| r.ok()).collect();
    for (addr, _) in &wanted {
        // Gone already (the LRU recycled it): nothing to do.
        let _ = map.remove(addr);
    }
    wanted
        .into_iter()
        .map(|(addr, ifindex)| (ifindex, ip(addr)))
        .collect()
}
