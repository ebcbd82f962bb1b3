//! Applying a config: its plan written into the maps in an order no packet
//! can see half of (rings double-buffered, ids purged before reuse), and the
//! least-connections rings refreshed from live counts.

use std::collections::{BTreeMap, BTreeSet};

use aya::maps::{MapData, MapError, PerCpuArray, PerCpuValues};
use lb_common::{
    BACKEND_F_DROP_FLOWS, Backend, BackendHop, Counters, Endpoint, Flow, FlowConf, FlowCounts,
    FlowKey, MAX_BACKENDS, MaglevTable, Ring, ServiceConf, ServiceKey, Tunnel,
    ipv6::Addr6,
    maps6::{Backend6, Endpoint6, ServiceKey6, Tunnel6},
    ring, uses_maglev,
};

use super::{
    AppliedService, Dataplane, MapName, Result, firewall,
    handles::{map_err, remove_if_present, set},
    plan::{self, Admission, BackendAddr, BackendPlan, Plan, PlanError, ServicePlan, SvcKey},
};
use crate::config::{self, Config};

impl Dataplane {
    /// Applies a whole config: backends, rings (double-buffered), services.
    /// Services and backends that are no longer configured are retired:
    /// their VIP stops matching and flows pinned to removed backends drop.
    pub fn apply(&mut self, cfg: &Config) -> Result<Vec<AppliedService>> {
        self.apply_with(cfg, &|_, _| Admission::SERVING)
    }

    /// [`Dataplane::apply`] with each backend's admission decided by `admit`
    /// (health, drain, disable): out-of-rotation backends leave the ring, and
    /// backups enter it only when no primary is in rotation.
    ///
    /// Plan first, then write: [`plan::plan`] computes every id, ring and
    /// flag without touching anything, so a rejected change (ring too long,
    /// a limit) leaves the maps and the id tables exactly as they were.
    pub fn apply_with(
        &mut self,
        cfg: &Config,
        admit: &dyn Fn(&config::Service, &config::Backend) -> Admission,
    ) -> Result<Vec<AppliedService>> {
        let plan = plan::plan(&self.ids, cfg, admit, &self.active)?;
        let service_ids: BTreeMap<String, u32> = plan
            .services
            .iter()
            .map(|s| (s.name.clone(), s.id))
            .collect();
        let fw = firewall::plan(&self.fw, cfg, &service_ids)?;
        // The flow timeouts and budget first: one store, live.
        self.set_flow_conf(cfg.dataplane.flow_conf())?;
        // Full NAT's sources before any full-NAT service is published.
        self.set_fnat_conf(cfg)?;
        // A new service is published with its firewall rules in place, and
        // an IPv6 source-ip service with the client prefix it hashes.
        self.firewall_additions(&fw)?;
        self.set_source_prefixes6(cfg, &service_ids)?;
        let moved = self.write(&plan)?;
        self.firewall_removals(&fw)?;
        self.fw = fw.next;
        let applied = plan.services.iter().map(AppliedService::from).collect();
        self.ids = plan.next;
        // Services that waited for a reused id ended on the other half.
        for id in &moved {
            if let Some(half) = self.ids.active_half.get_mut(id) {
                *half = 1 - *half;
            }
        }
        self.least_connections = plan
            .services
            .into_iter()
            .filter(|s| !s.least_connections.is_empty())
            .map(|mut s| {
                if moved.contains(&s.id) {
                    s.half = 1 - s.half;
                }
                s
            })
            .collect();
        Ok(applied)
    }

    /// The backend ids of every least-connections service's ring members
    /// (each < `MAX_BACKENDS`).
    pub fn least_connections_members(&self) -> Vec<u32> {
        self.least_connections
            .iter()
            .flat_map(|s| s.least_connections.iter().map(|&(id, _)| id))
            .filter(|&id| id < MAX_BACKENDS)
            .collect()
    }

    /// Least connections: rebuilds each such service's ring from `active`
    /// (active flows by backend id) and switches to it, as an apply does
    /// (inactive half, then one store). Rings that come out the same are
    /// left alone. The agent calls it every second.
    pub fn refresh_least_connections(&mut self, active: Vec<u64>) -> Result<()> {
        self.active = active;
        let mut services = std::mem::take(&mut self.least_connections);
        let mut result = Ok(());
        for svc in &mut services {
            let ring = plan::least_connections_ring(&svc.least_connections, &self.active);
            if ring == svc.ring {
                continue;
            }
            let half = 1 - svc.half;
            if let Err(e) = self.switch_ring(svc, half, &ring) {
                result = Err(e);
                break;
            }
            svc.half = half;
            svc.ring = ring;
            self.ids.active_half.insert(svc.id, half);
        }
        self.least_connections = services;
        result
    }

    /// Writes a plan so that no packet sees a half-made change:
    /// 1. services that are gone stop matching (key out of `SERVICES`, conf
    ///    slot cleared), so nothing schedules from their rings any more;
    /// 2. backends (except reused ids), so a ring only names backends that
    ///    exist;
    /// 3. each service's inactive ring half, then `SERVICE_CONF` switching to
    ///    it (one store); a ring that needs a reused id gets it only in 6;
    /// 4. backends that are gone: DROP_FLOWS, so their pinned flows drop;
    /// 5. reused ids: flows still pinned to the backend they named before
    ///    are deleted from `CONNTRACK`/`HALF_OPEN`, and their counters
    ///    zeroed, before the new backend goes into the slot;
    /// 6. rings that waited for a reused id switch to their final contents;
    /// 7. `SERVICES` and `VIPS` match the new services, `NAT_BACKENDS` the
    ///    NAT services' backends.
    ///
    /// Returns the services whose ring ended on the other half than planned.
    fn write(&mut self, plan: &Plan) -> Result<Vec<u32>> {
        // 1. Retired services first: with its key gone and its conf cleared,
        // no packet schedules from a retired service's ring.
        {
            let mut services = self.hash::<ServiceKey, u32>(MapName::SERVICES)?;
            for (key, _) in &plan.retired_services {
                if let SvcKey::V4(key) = key {
                    remove_if_present(&mut services, MapName::SERVICES, key)?;
                }
            }
        }
        {
            let mut services = self.hash::<ServiceKey6, u32>(MapName::SERVICES6)?;
            for (key, _) in &plan.retired_services {
                if let SvcKey::V6(key) = key {
                    remove_if_present(&mut services, MapName::SERVICES6, key)?;
                }
            }
        }
        for &(_, id) in &plan.retired_services {
            self.forget_maglev(id)?;
            set(
                &mut self.array::<ServiceConf>(MapName::SERVICE_CONF)?,
                MapName::SERVICE_CONF,
                id,
                ServiceConf::default(),
            )?;
        }
        // 2. Backends, except those whose id still has old flows to purge.
        for b in plan.backends.iter().filter(|b| !plan.purge.contains(&b.id)) {
            self.write_backend(b)?;
        }
        // 3. Rings. One naming a reused id runs without it until step 6.
        // Services without a Maglev table first: a service that stopped
        // using one frees its `MAGLEV` entries before others need them.
        let mut waiting = Vec::new();
        let (plain, hashed): (Vec<&ServicePlan>, Vec<&ServicePlan>) = plan
            .services
            .iter()
            .partition(|s| !uses_maglev(s.scheduler));
        for svc in plain.into_iter().chain(hashed) {
            if svc.ring.iter().any(|id| plan.purge.contains(id)) {
                let interim: Vec<u32> = svc
                    .ring
                    .iter()
                    .copied()
                    .filter(|id| !plan.purge.contains(id))
                    .collect();
                self.switch_ring(svc, svc.half, &interim)?;
                waiting.push(svc);
            } else {
                self.switch_ring(svc, svc.half, &svc.ring)?;
            }
        }
        // 4. Backends that are gone: their pinned flows drop.
        {
            let mut map = self.array::<Backend>(MapName::BACKENDS)?;
            for &((service_id, addr, port), id) in &plan.retired_backends {
                let addr = match addr {
                    BackendAddr::V4(addr) => addr,
                    // An IPv6 backend's slot names its BACKENDS6 slot.
                    BackendAddr::V6(_) => id,
                };
                set(
                    &mut map,
                    MapName::BACKENDS,
                    id,
                    Backend {
                        addr,
                        port,
                        flags: BACKEND_F_DROP_FLOWS,
                        service_id,
                        _pad: 0,
                    },
                )?;
            }
        }
        // 5. Reused ids: no flow may reach the new backend by an old pin.
        if !plan.purge.is_empty() {
            self.purge_flows(&plan.purge)?;
            for b in plan.backends.iter().filter(|b| plan.purge.contains(&b.id)) {
                self.zero_backend_counters(b.id)?;
                self.write_backend(b)?;
            }
        }
        // 6. Rings that waited for a reused id: into the other half now.
        for svc in &waiting {
            self.switch_ring(svc, 1 - svc.half, &svc.ring)?;
        }
        // 7. Make the services match.
        self.publish_services(plan)?;
        self.publish_services6(plan)?;
        self.publish_nat_backends(plan)?;
        self.publish_nat_backends6(plan)?;
        self.publish_tunnel_pmtu(plan)?;
        Ok(waiting.iter().map(|svc| svc.id).collect())
    }

    fn write_backend(&mut self, b: &BackendPlan) -> Result<()> {
        if let Some(addr) = b.addr6 {
            set(
                &mut self.array::<Backend6>(MapName::BACKENDS6)?,
                MapName::BACKENDS6,
                b.id,
                Backend6 { addr },
            )?;
        }
        set(
            &mut self.array::<Backend>(MapName::BACKENDS)?,
            MapName::BACKENDS,
            b.id,
            Backend {
                addr: b.addr,
                port: b.port,
                flags: b.flags,
                service_id: b.service_id,
                _pad: 0,
            },
        )?;
        // An id is one family's: the other family's slot is zeroed (an id
        // reused across families must not keep the old tunnel).
        let (tunnel, tunnel6) = match b.addr6 {
            None => (super::tunnel::slot(b.addr, b.tunnel), Tunnel6::default()),
            Some(addr) => (Tunnel::default(), super::tunnel::slot6(addr, b.tunnel)),
        };
        set(
            &mut self.array::<Tunnel>(MapName::TUNNELS)?,
            MapName::TUNNELS,
            b.id,
            tunnel,
        )?;
        set(
            &mut self.array::<Tunnel6>(MapName::TUNNELS6)?,
            MapName::TUNNELS6,
            b.id,
            tunnel6,
        )?;
        // The shared next hop was for the address the id had: the next new
        // flow resolves it again.
        set(
            &mut self.array::<BackendHop>(MapName::BACKEND_HOPS)?,
            MapName::BACKEND_HOPS,
            b.id,
            BackendHop::default(),
        )
    }

    /// Writes `slots` (and, for the Maglev schedulers, the service's table
    /// without any id not in `slots`) into half `half` of the service, then
    /// switches `SERVICE_CONF` to it in one aligned store. A service
    /// without a Maglev table leaves `MAGLEV` once it has switched.
    fn switch_ring(&mut self, svc: &ServicePlan, half: u32, slots: &[u32]) -> Result<()> {
        // The plan checked the length; a shorter interim ring fits too.
        let ring = ring::to_ring(slots).map_err(|source| PlanError::Ring {
            service: svc.name.clone(),
            source,
        })?;
        let mut rings = self.array::<Ring>(MapName::RINGS)?;
        set(&mut rings, MapName::RINGS, Ring::slot(svc.id, half), ring)?;
        if uses_maglev(svc.scheduler) {
            self.write_maglev(svc, half, slots)?;
        }
        let conf = ServiceConf {
            active_ring: half,
            mode: svc.mode,
            scheduler: svc.scheduler,
            enabled: svc.conf_flags,
        };
        set(
            &mut self.array::<ServiceConf>(MapName::SERVICE_CONF)?,
            MapName::SERVICE_CONF,
            svc.id,
            conf,
        )?;
        if !uses_maglev(svc.scheduler) {
            self.forget_maglev(svc.id)?;
        }
        Ok(())
    }

    /// Writes the service's Maglev table into `MAGLEV` half `half`. While a
    /// reused id waits for its purge (`slots` lacks it), its slots go to the
    /// next slot's owner that is in `slots`, so no packet reaches it early.
    fn write_maglev(&mut self, svc: &ServicePlan, half: u32, slots: &[u32]) -> Result<()> {
        // Zeroed on the heap: 256 KiB built on the stack and moved would
        // overflow a 2 MiB thread stack in a debug build.
        // SAFETY: an all-zero MaglevTable (integers only) is valid.
        let mut table: Box<MaglevTable> = unsafe { Box::new_zeroed().assume_init() };
        let allowed = |id: &u32| slots.contains(id);
        let n = svc.maglev.len();
        if svc.maglev.iter().any(allowed) {
            for (i, id) in svc.maglev.iter().enumerate() {
                table.ids[i] = (0..n)
                    .map(|k| svc.maglev[(i + k) % n])
                    .find(allowed)
                    .unwrap_or(*id);
            }
            table.len = n as u32;
        }
        let mut map = self.hash::<u32, MaglevTable>(MapName::MAGLEV)?;
        map.insert(Ring::slot(svc.id, half), table, 0)
            .map_err(map_err(MapName::MAGLEV))
    }

    /// Drops both `MAGLEV` halves of a service that no longer uses them.
    fn forget_maglev(&mut self, service_id: u32) -> Result<()> {
        let mut map = self.hash::<u32, MaglevTable>(MapName::MAGLEV)?;
        for half in 0..2 {
            remove_if_present(&mut map, MapName::MAGLEV, &Ring::slot(service_id, half))?;
        }
        Ok(())
    }

    /// Deletes every flow pinned to one of `ids` (both tables, both
    /// directions). Walks the whole tables, so it runs only when an id with
    /// a past is reused.
    fn purge_flows(&mut self, ids: &BTreeSet<u32>) -> Result<()> {
        let mut flows = self.hash::<FlowKey, Flow>(MapName::CONNTRACK)?;
        let stale: Vec<FlowKey> = flows
            .iter()
            .filter_map(|r| r.ok())
            .filter(|(_, f)| ids.contains(&f.backend_id))
            .map(|(k, _)| k)
            .collect();
        for key in &stale {
            remove_if_present(&mut flows, MapName::CONNTRACK, key)?;
        }
        self.half_open_table()?
            .clear_all(|_, f| ids.contains(&f.backend_id));
        self.established_table()?
            .clear_all(|_, f| ids.contains(&f.backend_id));
        self.flows6()?.purge(ids)
    }

    /// Deletes one flow entry (by its key as it arrives) from both tables,
    /// as an eviction or another load balancer's miss would leave it. For
    /// tests and tools; the data plane and the sweep remove expired flows.
    pub fn forget_flow(&mut self, key: &FlowKey) -> Result<()> {
        remove_if_present(
            &mut self.hash::<FlowKey, Flow>(MapName::CONNTRACK)?,
            MapName::CONNTRACK,
            key,
        )?;
        let conf = self.flow_conf()?;
        self.established_table()?.remove(key, &conf);
        self.half_open_table()?.remove(key, &conf);
        Ok(())
    }

    /// The flow lifecycle's settings (timeouts, new-flow budget), live,
    /// with the half-open table's size and seed: the seed already in
    /// `FLOW_CONF` (a pinned table's, whose entries sit where it put them),
    /// or a new random one for a new table.
    fn set_flow_conf(&mut self, mut conf: FlowConf) -> Result<()> {
        let err = map_err(MapName::HALF_OPEN);
        conf.half_open_slots = self
            .map_data(MapName::HALF_OPEN)?
            .info()
            .map_err(err)?
            .max_entries();
        conf.established_slots = self
            .map_data(MapName::ESTABLISHED)?
            .info()
            .map_err(map_err(MapName::ESTABLISHED))?
            .max_entries();
        conf.half_open_seed = match self.flow_conf()?.half_open_seed {
            0 => random_seed(),
            seed => seed,
        };
        // Placed by this version's bucket hash (a pinned pair placed by
        // another was refused before loading: `adopt::check_pins`).
        conf.table_version = lb_common::flow::TABLE_VERSION;
        let clock = super::clock::JiffyClock::get()?;
        (conf.jiffy_ns, conf.clock_epoch_ns) = (clock.jiffy_ns, clock.epoch_ns);
        set(
            &mut self.array::<FlowConf>(MapName::FLOW_CONF)?,
            MapName::FLOW_CONF,
            0,
            conf,
        )
    }

    /// A reused id starts its traffic counters from zero.
    fn zero_backend_counters(&mut self, id: u32) -> Result<()> {
        self.zero_counter(MapName::BACKEND_STATS, id, Counters::default())?;
        set(
            &mut self.array::<FlowCounts>(MapName::BACKEND_FLOWS)?,
            MapName::BACKEND_FLOWS,
            id,
            FlowCounts::default(),
        )?;
        set(
            &mut self.array::<u64>(MapName::FLOWS_SWEPT)?,
            MapName::FLOWS_SWEPT,
            id,
            0,
        )?;
        set(
            &mut self.array::<u64>(MapName::SYNC_OPENED)?,
            MapName::SYNC_OPENED,
            id,
            0,
        )
    }

    /// Sets slot `id` of a per-CPU array to `zero` on every CPU.
    pub(super) fn zero_counter<T: aya::Pod>(
        &mut self,
        map: MapName,
        id: u32,
        zero: T,
    ) -> Result<()> {
        let map_err = map_err(map);
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| map_err(MapError::IoError(e)))?;
        let zeros =
            PerCpuValues::try_from(vec![zero; cpus]).map_err(|e| map_err(MapError::IoError(e)))?;
        let mut stats: PerCpuArray<&mut MapData, T> =
            PerCpuArray::try_from(self.map_mut(map)?).map_err(map_err)?;
        stats.set(id, zeros, 0).map_err(map_err)
    }

    /// `SERVICES` gets every live key and `VIPS` the count per VIP.
    fn publish_services(&mut self, plan: &Plan) -> Result<()> {
        {
            let mut services = self.hash::<ServiceKey, u32>(MapName::SERVICES)?;
            for svc in &plan.services {
                if let SvcKey::V4(key) = svc.key {
                    services
                        .insert(key, svc.id, 0)
                        .map_err(map_err(MapName::SERVICES))?;
                }
            }
        }
        let mut map = self.hash::<u32, u32>(MapName::VIPS)?;
        for (vip, n) in &plan.vips {
            map.insert(vip, n, 0).map_err(map_err(MapName::VIPS))?;
        }
        let stale: Vec<u32> = map
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| !plan.vips.contains_key(k))
            .collect();
        for vip in stale {
            remove_if_present(&mut map, MapName::VIPS, &vip)?;
        }
        Ok(())
    }

    /// `SOURCE_MASKS6`: each IPv6 service's `source-ip-prefix` as a mask
    /// (the whole address unless set; read only by `source-ip`).
    fn set_source_prefixes6(
        &mut self,
        cfg: &Config,
        service_ids: &BTreeMap<String, u32>,
    ) -> Result<()> {
        let mut ipv6 = cfg.services.iter().filter(|s| s.vip.is_ipv6()).peekable();
        if ipv6.peek().is_none() {
            return Ok(());
        }
        let mut map = self.array::<Addr6>(MapName::SOURCE_MASKS6)?;
        for svc in ipv6 {
            if let Some(&id) = service_ids.get(&svc.name) {
                let mask = firewall::prefix_mask6(svc.source_ip_prefix);
                set(&mut map, MapName::SOURCE_MASKS6, id, mask)?;
            }
        }
        Ok(())
    }

    /// IPv6's `publish_services`: `SERVICE_VIPS6` (the VIP a NAT reply
    /// gets) before `SERVICES6` names the service, then `VIPS6`.
    fn publish_services6(&mut self, plan: &Plan) -> Result<()> {
        {
            let mut vips = self.array::<Addr6>(MapName::SERVICE_VIPS6)?;
            for svc in &plan.services {
                if let SvcKey::V6(key) = svc.key {
                    set(&mut vips, MapName::SERVICE_VIPS6, svc.id, key.vip)?;
                }
            }
        }
        {
            let mut services = self.hash::<ServiceKey6, u32>(MapName::SERVICES6)?;
            for svc in &plan.services {
                if let SvcKey::V6(key) = svc.key {
                    services
                        .insert(key, svc.id, 0)
                        .map_err(map_err(MapName::SERVICES6))?;
                }
            }
        }
        let mut map = self.hash::<Addr6, u32>(MapName::VIPS6)?;
        for (vip, n) in &plan.vips6 {
            map.insert(vip, n, 0).map_err(map_err(MapName::VIPS6))?;
        }
        let stale: Vec<Addr6> = map
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| !plan.vips6.contains_key(k))
            .collect();
        for vip in stale {
            remove_if_present(&mut map, MapName::VIPS6, &vip)?;
        }
        Ok(())
    }

    /// `NAT_BACKENDS6`: as `NAT_BACKENDS`, for IPv6 NAT services.
    fn publish_nat_backends6(&mut self, plan: &Plan) -> Result<()> {
        let endpoints = plan.nat_endpoints6();
        let mut map = self.hash::<Endpoint6, u32>(MapName::NAT_BACKENDS6)?;
        let stale: Vec<Endpoint6> = map
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| !endpoints.contains_key(k))
            .collect();
        for endpoint in stale {
            remove_if_present(&mut map, MapName::NAT_BACKENDS6, &endpoint)?;
        }
        for (endpoint, n) in &endpoints {
            map.insert(endpoint, n, 0)
                .map_err(map_err(MapName::NAT_BACKENDS6))?;
        }
        Ok(())
    }

    /// `NAT_BACKENDS` gets the NAT services' backend endpoints, and only
    /// those: their segments without a flow are dropped, not routed on.
    fn publish_nat_backends(&mut self, plan: &Plan) -> Result<()> {
        let endpoints = plan.nat_endpoints();
        let mut map = self.hash::<Endpoint, u32>(MapName::NAT_BACKENDS)?;
        // Stale ones first: the map holds as many as there can be backends.
        let stale: Vec<Endpoint> = map
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| !endpoints.contains_key(k))
            .collect();
        for endpoint in stale {
            remove_if_present(&mut map, MapName::NAT_BACKENDS, &endpoint)?;
        }
        for (endpoint, n) in &endpoints {
            map.insert(endpoint, n, 0)
                .map_err(map_err(MapName::NAT_BACKENDS))?;
        }
        Ok(())
    }
}

/// A half-open table seed: random, never 0 (0 means "no seed yet").
fn random_seed() -> u32 {
    let mut bytes = [0u8; 4];
    // SAFETY: writes at most 4 bytes into `bytes`.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    let seed = if n == 4 {
        u32::from_ne_bytes(bytes)
    } else {
        // No entropy (never on Linux ≥ 3.17): the clock still varies per run.
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(1)
    };
    seed.max(1)
}
