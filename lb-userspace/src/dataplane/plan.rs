//! Planning a config change, before anything is written.
//!
//! [`plan`] is a pure function from the id tables the data plane holds now,
//! the new config and each backend's admission to everything the maps must
//! hold afterwards: service and backend ids, rings, backend flags, what is
//! retired, and which reused ids need their old flows purged first. A
//! rejected change (a ring too long, a limit) is rejected here, so the maps
//! and the id tables stay exactly as they were.
//!
//! Id rules:
//! - ids of services and backends that still exist never change (conntrack
//!   entries store them);
//! - retired ids are freed before new ones are given out, so a reload that
//!   replaces every backend at the limit fits;
//! - a new id is a never-used one when there is one; else an id retired by
//!   an earlier apply; only then one retired by this apply. A reused backend
//!   id may still have flows pinned to the backend it named (the flow table
//!   has no expiry), so it is listed in [`Plan::purge`]: the writer deletes
//!   those flows before it publishes the new backend.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
};

use lb_common::{
    BACKEND_F_DROP_FLOWS, BACKEND_F_IN_RING, BACKEND_F_IN_USE, Endpoint, MAX_BACKENDS,
    MAX_SERVICES, MODE_NAT, ServiceKey,
    ipv6::{Addr6, addr_of},
    maglev::{self, Member},
    maps6::{Endpoint6, ServiceKey6},
    ring,
};

use super::keys::{protocol_number, raw_endpoint, service_key};
use crate::config::{self, Config, Scheduler};

/// A service's identity in the id tables: its key in its family's map
/// (`SERVICES` or `SERVICES6`). One id space for both families.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SvcKey {
    V4(ServiceKey),
    V6(ServiceKey6),
}

/// A backend's address in the id tables, raw network order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum BackendAddr {
    V4(u32),
    V6(Addr6),
}

/// A backend's identity: (service id, address, port), raw network order.
/// Ids are per service, so the same server in two services has two ids.
pub type BackendKey = (u32, BackendAddr, u16);

/// A service's key in its family's map.
pub(super) fn svc_key(svc: &config::Service) -> SvcKey {
    match service_key(svc) {
        Some(key) => SvcKey::V4(key),
        None => {
            let (vip, port) = any_endpoint(svc.vip);
            let BackendAddr::V6(vip) = vip else {
                unreachable!("service_key takes every IPv4 VIP")
            };
            SvcKey::V6(ServiceKey6 {
                vip,
                port,
                protocol: protocol_number(svc.protocol),
                _pad: 0,
            })
        }
    }
}

/// An address and port as the maps hold them, in either family.
pub(super) fn any_endpoint(addr: SocketAddr) -> (BackendAddr, u16) {
    match addr {
        SocketAddr::V4(v4) => {
            let (a, p) = raw_endpoint(v4);
            (BackendAddr::V4(a), p)
        }
        SocketAddr::V6(v6) => (
            BackendAddr::V6(addr_of(v6.ip().octets())),
            v6.port().to_be(),
        ),
    }
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("service {service}: {source}")]
    Ring {
        service: String,
        source: ring::RingError,
    },
    #[error("more than {limit} {what}")]
    Full { what: &'static str, limit: u32 },
}

/// Whether a backend takes new flows, and what happens to its old ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admission {
    /// In the ring: new flows may go to it.
    pub in_rotation: bool,
    /// Flows already pinned to it are dropped instead of forwarded.
    pub drop_flows: bool,
}

impl Admission {
    pub const SERVING: Admission = Admission {
        in_rotation: true,
        drop_flows: false,
    };
}

/// The ids the data plane holds, kept stable across reloads (and, through
/// the pinned maps, across restarts) so conntrack entries stay valid.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ids {
    pub services: BTreeMap<SvcKey, u32>,
    pub backends: BTreeMap<BackendKey, u32>,
    /// Backend ids retired by earlier applies: free, but flows may still be
    /// pinned to the backend they named (its slot says DROP_FLOWS).
    pub retired_backends: BTreeSet<u32>,
    /// Service id → the ring half new flows use.
    pub active_half: BTreeMap<u32, u32>,
}

/// One service as the maps will hold it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePlan {
    pub name: String,
    pub key: SvcKey,
    pub id: u32,
    /// `MODE_NAT`, `MODE_DSR`, `MODE_IPIP` or `MODE_GUE`.
    pub mode: u32,
    /// `SCHED_COUNTER`, `SCHED_HASH`, `SCHED_MAGLEV` or `SCHED_SOURCE_IP`.
    pub scheduler: u32,
    /// `ServiceConf::enabled`: `SERVICE_FILLED` plus the service's flags
    /// (`SERVICE_PROXY_V2`).
    pub conf_flags: u32,
    /// The ring half this apply writes and switches to.
    pub half: u32,
    /// Backend ids in ring order (fits a ring: checked). For the Maglev
    /// schedulers, the backends in the table, each once.
    pub ring: Vec<u32>,
    /// The Maglev table (`maglev`, `source-ip`), written into the same half
    /// of `MAGLEV`; empty for the other schedulers.
    pub maglev: Vec<u32>,
    /// Least connections: the ring's members as (id, weight), so the agent
    /// can rebuild the ring from active counts between applies.
    pub least_connections: Vec<(u32, u32)>,
    /// Backend name → id, for every configured backend, in config order.
    pub backends: Vec<(String, u32)>,
}

/// One live backend's `BACKENDS` slot (and, for a tunnel service, its
/// `TUNNELS` slot).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackendPlan {
    pub id: u32,
    pub service_id: u32,
    /// `BACKENDS`' address: an IPv4 backend's; an IPv6 backend's own id,
    /// the index of its `BACKENDS6` slot (`addr6`).
    pub addr: u32,
    /// An IPv6 backend's address (`BACKENDS6`).
    pub addr6: Option<Addr6>,
    pub port: u16,
    pub flags: u16,
    /// The backend's tunnel (IPIP and GUE services); `None` otherwise.
    pub tunnel: Option<TunnelPlan>,
}

/// How a tunnel backend is reached, from the config: the writer resolves
/// a source the config leaves to the route ([`crate::dataplane`]'s
/// `tunnel::route_source`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TunnelPlan {
    /// `[dataplane] tunnel-source`; `None`: the route's source address.
    pub source: Option<std::net::Ipv4Addr>,
    /// `[dataplane] tunnel-source6` (an IPv6 backend's); `None`: the
    /// route's source address.
    pub source6: Option<std::net::Ipv6Addr>,
    /// `[dataplane] gue-port` (host order).
    pub gue_port: u16,
}

/// Everything an apply writes, computed before the first write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub services: Vec<ServicePlan>,
    /// Every live backend, each id once.
    pub backends: Vec<BackendPlan>,
    /// Services that are gone: their key leaves `SERVICES` and their conf
    /// slot is cleared (a new service given the id writes its own).
    pub retired_services: Vec<(SvcKey, u32)>,
    /// Backends that are gone: their slot becomes DROP_FLOWS (not IN_USE).
    pub retired_backends: Vec<(BackendKey, u32)>,
    /// Reused backend ids that may still have flows pinned to the backend
    /// they named before: delete those flows before writing the new one.
    pub purge: BTreeSet<u32>,
    /// VIP → number of services on it.
    pub vips: BTreeMap<u32, u32>,
    /// IPv6 VIP → number of services on it (`VIPS6`).
    pub vips6: BTreeMap<Addr6, u32>,
    /// The id tables once the plan is written.
    pub next: Ids,
}

impl Plan {
    /// `NAT_BACKENDS`: every backend endpoint (address, port, protocol) of
    /// a NAT service, with the number of the plan's backends on it.
    pub fn nat_endpoints(&self) -> BTreeMap<Endpoint, u32> {
        let mut endpoints = BTreeMap::new();
        for (b, protocol) in self.nat_backends() {
            if b.addr6.is_some() {
                continue;
            }
            let endpoint = Endpoint {
                addr: b.addr,
                port: b.port,
                protocol,
                _pad: 0,
            };
            *endpoints.entry(endpoint).or_default() += 1;
        }
        endpoints
    }

    /// `NAT_BACKENDS6`: [`Plan::nat_endpoints`] for IPv6 backends.
    pub fn nat_endpoints6(&self) -> BTreeMap<Endpoint6, u32> {
        let mut endpoints = BTreeMap::new();
        for (b, protocol) in self.nat_backends() {
            let Some(addr) = b.addr6 else {
                continue;
            };
            let endpoint = Endpoint6 {
                addr,
                port: b.port,
                protocol,
                _pad: 0,
            };
            *endpoints.entry(endpoint).or_default() += 1;
        }
        endpoints
    }

    /// The backends of NAT services, with their service's protocol.
    fn nat_backends(&self) -> impl Iterator<Item = (&BackendPlan, u8)> {
        self.backends.iter().filter_map(|b| {
            let svc = self.services.iter().find(|s| s.id == b.service_id)?;
            if svc.mode != MODE_NAT {
                return None;
            }
            let protocol = match svc.key {
                SvcKey::V4(k) => k.protocol,
                SvcKey::V6(k) => k.protocol,
            };
            Some((b, protocol))
        })
    }
}

/// Hands out ids: never-used ones first, then ones retired earlier, then
/// ones retired by this very plan.
struct Allocator {
    candidates: std::vec::IntoIter<u32>,
    limit: u32,
    what: &'static str,
}

impl Allocator {
    fn new(
        limit: u32,
        what: &'static str,
        live: &BTreeSet<u32>,
        earlier: &BTreeSet<u32>,
        just: &BTreeSet<u32>,
    ) -> Self {
        let fresh =
            (0..limit).filter(|i| !live.contains(i) && !earlier.contains(i) && !just.contains(i));
        let candidates: Vec<u32> = fresh
            .chain(earlier.iter().copied().filter(|i| !live.contains(i)))
            .chain(just.iter().copied())
            .collect();
        Allocator {
            candidates: candidates.into_iter(),
            limit,
            what,
        }
    }

    fn next(&mut self) -> Result<u32, PlanError> {
        self.candidates.next().ok_or(PlanError::Full {
            what: self.what,
            limit: self.limit,
        })
    }
}

/// Plans `cfg` over the ids in `now`, each backend admitted by `admit`;
/// `active` holds the active flows per backend id (least connections).
pub fn plan(
    now: &Ids,
    cfg: &Config,
    admit: &dyn Fn(&config::Service, &config::Backend) -> Admission,
    active: &[u64],
) -> Result<Plan, PlanError> {
    // Services: survivors keep their ids; new ones get free ids.
    let keys: Vec<SvcKey> = cfg.services.iter().map(svc_key).collect();
    // Every backend's raw endpoint, per service, in config order.
    let endpoints: Vec<Vec<(BackendAddr, u16)>> = cfg
        .services
        .iter()
        .map(|svc| {
            svc.backends
                .iter()
                .map(|b| any_endpoint(b.address))
                .collect()
        })
        .collect();
    let wanted: BTreeSet<SvcKey> = keys.iter().copied().collect();
    let kept_services: BTreeMap<SvcKey, u32> = now
        .services
        .iter()
        .filter(|(k, _)| wanted.contains(k))
        .map(|(k, id)| (*k, *id))
        .collect();
    let retired_services: Vec<(SvcKey, u32)> = now
        .services
        .iter()
        .filter(|(k, _)| !wanted.contains(k))
        .map(|(k, id)| (*k, *id))
        .collect();
    let mut service_ids = Allocator::new(
        MAX_SERVICES,
        "services",
        &kept_services.values().copied().collect(),
        &BTreeSet::new(),
        &retired_services.iter().map(|(_, id)| *id).collect(),
    );
    let mut next = Ids {
        services: kept_services,
        ..Ids::default()
    };
    let mut ids_of = Vec::with_capacity(keys.len());
    for key in &keys {
        let id = match next.services.get(key) {
            Some(&id) => id,
            None => {
                let id = service_ids.next()?;
                next.services.insert(*key, id);
                id
            }
        };
        ids_of.push(id);
    }
    // A backend survives when its service does (same id) and still lists it.
    let wanted_backends: BTreeSet<BackendKey> = cfg
        .services
        .iter()
        .zip(&endpoints)
        .zip(&ids_of)
        .flat_map(|((_, ends), &sid)| ends.iter().map(move |&(a, p)| (sid, a, p)))
        .collect();
    let kept_service_ids: BTreeSet<u32> = now
        .services
        .iter()
        .filter(|(k, _)| wanted.contains(k))
        .map(|(_, id)| *id)
        .collect();
    let survives = |k: &BackendKey| kept_service_ids.contains(&k.0) && wanted_backends.contains(k);
    next.backends = now
        .backends
        .iter()
        .filter(|(k, _)| survives(k))
        .map(|(k, id)| (*k, *id))
        .collect();
    let retired_backends: Vec<(BackendKey, u32)> = now
        .backends
        .iter()
        .filter(|(k, _)| !survives(k))
        .map(|(k, id)| (*k, *id))
        .collect();
    let just_retired: BTreeSet<u32> = retired_backends.iter().map(|(_, id)| *id).collect();
    let mut backend_ids = Allocator::new(
        MAX_BACKENDS,
        "backends",
        &next.backends.values().copied().collect(),
        &now.retired_backends,
        &just_retired,
    );
    let mut purge = BTreeSet::new();

    let mut services = Vec::with_capacity(cfg.services.len());
    let mut backends: BTreeMap<u32, BackendPlan> = BTreeMap::new();
    for (((svc, key), &id), ends) in cfg.services.iter().zip(&keys).zip(&ids_of).zip(&endpoints) {
        let mut named = Vec::with_capacity(svc.backends.len());
        let mut admissions = Vec::with_capacity(svc.backends.len());
        for (b, &(addr, port)) in svc.backends.iter().zip(ends) {
            let bid = match next.backends.get(&(id, addr, port)) {
                Some(&bid) => bid,
                None => {
                    let bid = backend_ids.next()?;
                    if now.retired_backends.contains(&bid) || just_retired.contains(&bid) {
                        purge.insert(bid);
                    }
                    next.backends.insert((id, addr, port), bid);
                    bid
                }
            };
            let admission = admit(svc, b);
            let (raw, addr6) = match addr {
                BackendAddr::V4(a) => (a, None),
                BackendAddr::V6(a) => (bid, Some(a)),
            };
            let slot = backends.entry(bid).or_insert(BackendPlan {
                id: bid,
                service_id: id,
                addr: raw,
                addr6,
                port,
                flags: BACKEND_F_IN_USE,
                tunnel: svc.forwarding.is_tunnel().then_some(TunnelPlan {
                    source: cfg.dataplane.tunnel_source,
                    source6: cfg.dataplane.tunnel_source6,
                    gue_port: cfg.dataplane.gue_port,
                }),
            });
            if admission.drop_flows {
                slot.flags |= BACKEND_F_DROP_FLOWS;
            }
            named.push((b.name.clone(), bid));
            admissions.push(admission);
        }
        let members = ring_members(svc, ends, &named, &admissions);
        let least_connections = match svc.scheduler {
            Scheduler::LeastConnections => {
                members.serving.iter().map(|m| (m.id, m.weight)).collect()
            }
            _ => Vec::new(),
        };
        let ring = ring_slots(svc.scheduler, &members.serving, active);
        let maglev = if svc.scheduler.uses_maglev() {
            maglev::with_standby(&members.configured, &members.serving, svc.maglev_table_size)
        } else {
            Vec::new()
        };
        ring::to_ring(&ring).map_err(|source| PlanError::Ring {
            service: svc.name.clone(),
            source,
        })?;
        for bid in &ring {
            if let Some(slot) = backends.get_mut(bid) {
                slot.flags |= BACKEND_F_IN_RING;
            }
        }
        let half = 1 - now.active_half.get(&id).copied().unwrap_or(1);
        next.active_half.insert(id, half);
        services.push(ServicePlan {
            name: svc.name.clone(),
            key: *key,
            id,
            mode: svc.forwarding.code(),
            scheduler: svc.scheduler.code(),
            conf_flags: lb_common::SERVICE_FILLED
                | crate::config::ProxyProtocol::conf_flag(svc.proxy_protocol),
            half,
            ring,
            maglev,
            least_connections,
            backends: named,
        });
    }
    next.retired_backends = now
        .retired_backends
        .iter()
        .chain(&just_retired)
        .copied()
        .filter(|id| !backends.contains_key(id))
        .collect();
    let (mut vips, mut vips6) = (BTreeMap::new(), BTreeMap::new());
    for key in next.services.keys() {
        match key {
            SvcKey::V4(key) => *vips.entry(key.vip).or_default() += 1,
            SvcKey::V6(key) => *vips6.entry(key.vip).or_default() += 1,
        }
    }
    Ok(Plan {
        services,
        backends: backends.into_values().collect(),
        retired_services,
        retired_backends,
        purge,
        vips,
        vips6,
        next,
    })
}

/// Who new flows may go to: the group in use (the non-backup backends, or
/// — when none of them is in rotation — the backups, HAProxy's `backup`),
/// every configured member of it with weight > 0, and those in rotation.
struct Members {
    configured: Vec<Member>,
    serving: Vec<Member>,
}

fn ring_members(
    svc: &config::Service,
    endpoints: &[(BackendAddr, u16)],
    ids: &[(String, u32)],
    admissions: &[Admission],
) -> Members {
    let pick = |backup: bool, serving_only: bool| -> Vec<Member> {
        svc.backends
            .iter()
            .zip(endpoints)
            .zip(ids)
            .zip(admissions)
            .filter(|(((b, _), _), a)| {
                b.backup == backup && b.weight > 0 && (a.in_rotation || !serving_only)
            })
            .map(|(((b, &(addr, port)), (_, id)), _)| Member {
                addr: maglev_name(addr),
                port: u16::from_be(port),
                id: *id,
                weight: b.weight,
            })
            .collect()
    };
    let serving = pick(false, true);
    if serving.is_empty() {
        return Members {
            configured: pick(true, false),
            serving: pick(true, true),
        };
    }
    Members {
        configured: pick(false, false),
        serving,
    }
}

/// The address a Maglev member's permutation is seeded with: an IPv4
/// backend's (host order), an IPv6 backend's folded to 32 bits.
fn maglev_name(addr: BackendAddr) -> u32 {
    match addr {
        BackendAddr::V4(a) => u32::from_be(a),
        BackendAddr::V6(a) => a
            .iter()
            .fold(0, |acc, w| acc.rotate_left(8) ^ u32::from_be(*w)),
    }
}

/// The ring a scheduler walks (or, for the Maglev ones, the table's
/// members once each: it sets their `BACKEND_F_IN_RING`).
fn ring_slots(scheduler: Scheduler, serving: &[Member], active: &[u64]) -> Vec<u32> {
    let ids = || serving.iter().map(|m| m.id).collect::<Vec<_>>();
    match scheduler {
        Scheduler::WeightedRoundRobin => {
            ring::weighted(&serving.iter().map(|m| (m.id, m.weight)).collect::<Vec<_>>())
        }
        Scheduler::LeastConnections => least_connections_ring(
            &serving.iter().map(|m| (m.id, m.weight)).collect::<Vec<_>>(),
            active,
        ),
        Scheduler::RoundRobin | Scheduler::FlowHash | Scheduler::Maglev | Scheduler::SourceIp => {
            ring::round_robin(&ids())
        }
    }
}

/// The least-connections ring of `members` (id, weight) under the active
/// flow counts `active` (by backend id; a missing id has none).
pub fn least_connections_ring(members: &[(u32, u32)], active: &[u64]) -> Vec<u32> {
    let loaded: Vec<(u32, u32, u64)> = members
        .iter()
        .map(|&(id, w)| (id, w, active.get(id as usize).copied().unwrap_or(0)))
        .collect();
    ring::least_connections(&loaded)
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddrV4};

    use lb_common::{SCHED_COUNTER, SCHED_MAGLEV};

    use super::*;
    use crate::config::{
        Backend, Dataplane, Forwarding, OnBackendDown, Protocol, Service, XdpMode,
    };

    fn backend(n: u32) -> Backend {
        let ip = Ipv4Addr::from(0x0a00_0000 + n);
        Backend {
            name: format!("b{n}"),
            address: SocketAddrV4::new(ip, 80).into(),
            weight: 1,
            backup: false,
            health: None,
            max_connections: None,
        }
    }

    fn service(name: &str, vip: u8, backends: impl IntoIterator<Item = u32>) -> Service {
        Service {
            firewall: Default::default(),
            name: name.into(),
            vip: SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, vip), 80).into(),
            protocol: Protocol::Tcp,
            forwarding: Forwarding::Nat,
            scheduler: Scheduler::RoundRobin,
            maglev_table_size: maglev::MAGLEV_DEFAULT_SIZE,
            source_ip_prefix: lb_common::maps6::SOURCE_PREFIX_WHOLE,
            health: None,
            on_backend_down: OnBackendDown::KeepFlows,
            backends: backends.into_iter().map(backend).collect(),
            limits: Default::default(),
            proxy_protocol: None,
        }
    }

    fn config(services: Vec<Service>) -> Config {
        Config {
            firewall: Default::default(),
            dataplane: Dataplane {
                interfaces: vec!["eth0".into()],
                forwarding: Forwarding::Nat,
                xdp_mode: XdpMode::Native,
                conntrack_size: 1024,
                half_open_size: lb_common::DEFAULT_HALF_OPEN_SIZE,
                new_flow_budget: 125_000,
                timeouts: Default::default(),
                tunnel_source: None,
                tunnel_source6: None,
                gue_port: lb_common::tunnel::GUE_DEFAULT_PORT,
                full_nat: Default::default(),
            },
            monitoring: None,
            announce: None,
            coordination: None,
            sync: None,
            services,
            pools: Vec::new(),
        }
    }

    fn serving(_: &config::Service, _: &config::Backend) -> Admission {
        Admission::SERVING
    }

    /// Plans `cfg` on `now` and returns the new id tables.
    fn apply(now: &Ids, cfg: &Config) -> Plan {
        plan(now, cfg, &serving, &[]).expect("plan")
    }

    fn ids_of(p: &Plan, service: usize) -> Vec<u32> {
        p.services[service]
            .backends
            .iter()
            .map(|(_, id)| *id)
            .collect()
    }

    #[test]
    fn a_proxy_services_conf_carries_its_flag() {
        let mut proxied = service("p", 11, 0..2);
        proxied.proxy_protocol = Some(crate::config::ProxyProtocol::V2);
        let p = apply(
            &Ids::default(),
            &config(vec![service("a", 10, 2..4), proxied]),
        );
        let flags = |name: &str| {
            p.services
                .iter()
                .find(|s| s.name == name)
                .map(|s| s.conf_flags)
        };
        assert_eq!(flags("a"), Some(lb_common::SERVICE_FILLED));
        assert_eq!(
            flags("p"),
            Some(lb_common::SERVICE_FILLED | lb_common::SERVICE_PROXY_V2)
        );
    }

    #[test]
    fn replacing_every_backend_at_the_limit_fits() {
        let max = MAX_BACKENDS;
        let first = apply(&Ids::default(), &config(vec![service("a", 10, 0..max)]));
        assert_eq!(first.backends.len(), max as usize);
        assert!(first.purge.is_empty(), "fresh ids need no purge");
        let second = apply(&first.next, &config(vec![service("a", 10, max..2 * max)]));
        assert_eq!(second.backends.len(), max as usize);
        assert_eq!(second.retired_backends.len(), max as usize);
        // Every id was just retired, so every one is purged before reuse.
        assert_eq!(second.purge.len(), max as usize);
        assert!(second.next.retired_backends.is_empty());
        let ids: BTreeSet<u32> = second.backends.iter().map(|b| b.id).collect();
        assert_eq!(ids, (0..max).collect());
    }

    #[test]
    fn one_backend_over_the_limit_is_rejected_and_nothing_changes() {
        let max = MAX_BACKENDS;
        let first = apply(&Ids::default(), &config(vec![service("a", 10, 0..max)]));
        let before = first.next.clone();
        // Split over two services so no ring exceeds its own limit.
        let over = config(vec![
            service("a", 10, max..max + max / 2),
            service("b", 11, 0..max / 2 + 1),
        ]);
        assert_eq!(
            plan(&first.next, &over, &serving, &[]),
            Err(PlanError::Full {
                what: "backends",
                limit: max
            })
        );
        assert_eq!(first.next, before, "the id tables are untouched");
    }

    #[test]
    fn surviving_backends_keep_their_ids() {
        let first = apply(&Ids::default(), &config(vec![service("a", 10, 0..6)]));
        let old = ids_of(&first, 0);
        // b0, b2, b4 go; b1, b3, b5 stay, in another order; b6, b7 are new.
        let second = apply(
            &first.next,
            &config(vec![service("a", 10, [5, 3, 1, 6, 7])]),
        );
        let new = ids_of(&second, 0);
        assert_eq!(&new[..3], &[old[5], old[3], old[1]]);
        // New backends get never-used ids, not the three just retired.
        assert_eq!(&new[3..], &[6, 7]);
        assert!(second.purge.is_empty());
        assert_eq!(
            second.next.retired_backends,
            [old[0], old[2], old[4]].into_iter().collect()
        );
    }

    #[test]
    fn retired_ids_are_reused_oldest_first_and_purged() {
        let max = MAX_BACKENDS;
        let full = apply(&Ids::default(), &config(vec![service("a", 10, 0..max)]));
        // Drop b0 and b1: free, but their flows may still be pinned.
        let fewer = apply(&full.next, &config(vec![service("a", 10, 2..max)]));
        assert_eq!(fewer.next.retired_backends, [0, 1].into_iter().collect());
        // Replace b2 by a new one: the earlier-retired id 0 is reused before
        // the just-retired b2's, and it is purged.
        let mut list: Vec<u32> = (3..max).collect();
        list.push(max);
        let next = apply(&fewer.next, &config(vec![service("a", 10, list)]));
        let new_id = *ids_of(&next, 0).last().expect("an id");
        assert_eq!(new_id, 0);
        assert_eq!(next.purge, [0].into_iter().collect());
        assert_eq!(next.next.retired_backends, [1, 2].into_iter().collect());
    }

    #[test]
    fn a_ring_error_is_rejected_before_any_id_moves() {
        let first = apply(&Ids::default(), &config(vec![service("a", 10, 0..3)]));
        let mut svc = service("a", 10, 3..6);
        svc.scheduler = Scheduler::WeightedRoundRobin;
        for (i, b) in svc.backends.iter_mut().enumerate() {
            b.weight = 4000 + i as u32; // coprime weights: a ring of ~12000 slots
        }
        let err = plan(&first.next, &config(vec![svc]), &serving, &[]);
        assert!(matches!(err, Err(PlanError::Ring { .. })), "{err:?}");
    }

    #[test]
    fn flags_follow_the_ring_and_admissions() {
        let admit = |_: &config::Service, b: &config::Backend| match b.name.as_str() {
            "b1" => Admission {
                in_rotation: false,
                drop_flows: false,
            },
            "b2" => Admission {
                in_rotation: false,
                drop_flows: true,
            },
            _ => Admission::SERVING,
        };
        let p = plan(
            &Ids::default(),
            &config(vec![service("a", 10, 0..3)]),
            &admit,
            &[],
        )
        .expect("plan");
        let flags: Vec<u16> = p.backends.iter().map(|b| b.flags).collect();
        assert_eq!(
            flags,
            vec![
                BACKEND_F_IN_USE | BACKEND_F_IN_RING,
                BACKEND_F_IN_USE,
                BACKEND_F_IN_USE | BACKEND_F_DROP_FLOWS,
            ]
        );
        assert_eq!(p.services[0].ring, vec![0]);
    }

    #[test]
    fn nat_endpoints_are_the_nat_services_backends_counted_once_per_backend() {
        let mut dsr = service("d", 11, 0..2);
        dsr.forwarding = Forwarding::Dsr;
        let mut udp = service("u", 12, 1..3);
        udp.protocol = Protocol::Udp;
        let p = apply(
            &Ids::default(),
            &config(vec![
                service("a", 10, 0..2),
                service("b", 13, 1..3),
                dsr,
                udp,
            ]),
        );
        let got: Vec<(u8, u8, u32)> = p
            .nat_endpoints()
            .iter()
            .map(|(e, n)| (e.addr.to_ne_bytes()[3], e.protocol, *n))
            .collect();
        // 10.0.0.n: a and b share n = 1 (TCP); DSR's backends are not there.
        assert_eq!(
            got,
            vec![(0, 6, 1), (1, 6, 2), (1, 17, 1), (2, 6, 1), (2, 17, 1)]
        );
    }

    #[test]
    fn services_keep_ids_and_flip_halves() {
        let first = apply(
            &Ids::default(),
            &config(vec![service("a", 10, 0..2), service("b", 11, 2..4)]),
        );
        assert_eq!(
            first
                .services
                .iter()
                .map(|s| (s.id, s.half))
                .collect::<Vec<_>>(),
            vec![(0, 0), (1, 0)]
        );
        // a goes, c comes: b keeps id 1 and flips; c gets the never-used 2.
        let second = apply(
            &first.next,
            &config(vec![service("b", 11, 2..4), service("c", 12, 0..2)]),
        );
        assert_eq!(
            second
                .services
                .iter()
                .map(|s| (s.id, s.half))
                .collect::<Vec<_>>(),
            vec![(1, 1), (2, 0)]
        );
        assert_eq!(second.retired_services.len(), 1);
        // b's backends survive with their ids; c's are new (a's were retired,
        // ids are per service).
        assert_eq!(ids_of(&second, 0), ids_of(&first, 1));
        assert_eq!(ids_of(&second, 1), vec![4, 5]);
        assert_eq!(second.vips.len(), 2);
    }

    #[test]
    fn maglev_tables_follow_admission_and_backups() {
        let mut svc = service("a", 10, 0..5);
        svc.scheduler = Scheduler::Maglev;
        svc.maglev_table_size = 4093;
        svc.backends[4].backup = true;
        let cfg = config(vec![svc]);
        let all = apply(&Ids::default(), &cfg);
        let table = &all.services[0].maglev;
        assert_eq!(table.len(), 4093);
        assert_eq!(all.services[0].scheduler, SCHED_MAGLEV);
        assert!(
            !table.contains(&4),
            "the backup is not used while primaries serve"
        );
        // b1 out of rotation: only its slots change, to other primaries.
        let out = |name: &'static str| {
            move |_: &config::Service, b: &config::Backend| {
                if name.split(',').any(|n| n == b.name) {
                    Admission {
                        in_rotation: false,
                        drop_flows: false,
                    }
                } else {
                    Admission::SERVING
                }
            }
        };
        let p = plan(&all.next, &cfg, &out("b1"), &[]).expect("plan");
        let after = &p.services[0].maglev;
        for (was, now) in table.iter().zip(after) {
            if *was == 1 {
                assert!(*now != 1 && *now != 4, "{now}");
            } else {
                assert_eq!(was, now);
            }
        }
        assert_eq!(p.services[0].ring, vec![0, 2, 3]);
        // Every primary out: the backup takes the whole table.
        let p = plan(&all.next, &cfg, &out("b0,b1,b2,b3"), &[]).expect("plan");
        assert!(p.services[0].maglev.iter().all(|&id| id == 4));
        // Nothing serves: an empty table (drop_no_backend).
        let p = plan(&all.next, &cfg, &out("b0,b1,b2,b3,b4"), &[]).expect("plan");
        assert!(p.services[0].maglev.is_empty());
    }

    #[test]
    fn least_connections_rings_use_the_active_counts() {
        let mut svc = service("a", 10, 0..3);
        svc.scheduler = Scheduler::LeastConnections;
        let p = plan(&Ids::default(), &config(vec![svc]), &serving, &[9, 0, 0]).expect("plan");
        let s = &p.services[0];
        assert_eq!(s.scheduler, SCHED_COUNTER);
        assert_eq!(s.least_connections, vec![(0, 1), (1, 1), (2, 1)]);
        let share = |id| s.ring.iter().filter(|&&x| x == id).count();
        // 1/10 of the others' share (10:100:100, reduced by their gcd).
        assert_eq!((share(0), share(1), share(2)), (1, 10, 10));
        assert!(s.maglev.is_empty());
    }

    #[test]
    fn ipv6_services_share_the_id_space_and_keep_their_ids() {
        let mut v6 = service("v6", 20, []);
        v6.vip = "[2001:db8:18::10]:80".parse().expect("vip");
        for n in [11u8, 12] {
            let mut b = backend(u32::from(n));
            b.address = format!("[2001:db8:19::{n}]:8080").parse().expect("backend");
            v6.backends.push(b);
        }
        let cfg = config(vec![service("www", 10, [1, 2]), v6.clone()]);
        let first = apply(&Ids::default(), &cfg);
        let (www, six) = (&first.services[0], &first.services[1]);
        assert!(matches!(www.key, SvcKey::V4(_)));
        let SvcKey::V6(key) = six.key else {
            panic!("an IPv6 service's key is a ServiceKey6: {:?}", six.key)
        };
        assert_eq!(
            key.vip,
            addr_of(
                "2001:db8:18::10"
                    .parse::<std::net::Ipv6Addr>()
                    .expect("ip")
                    .octets()
            )
        );
        assert_eq!(key.port, 80u16.to_be());
        assert_ne!(www.id, six.id, "one id space: distinct service ids");
        // Its backends: ids apart from IPv4's, BACKENDS' addr naming their
        // own BACKENDS6 slot, the address in `addr6`, the port raw.
        let ids6 = ids_of(&first, 1);
        assert!(ids6.iter().all(|id| !ids_of(&first, 0).contains(id)));
        for (n, id) in [11u8, 12].into_iter().zip(&ids6) {
            let b = first
                .backends
                .iter()
                .find(|b| b.id == *id)
                .expect("planned");
            assert_eq!(b.addr, *id);
            let ip: std::net::Ipv6Addr = format!("2001:db8:19::{n}").parse().expect("ip");
            assert_eq!(b.addr6, Some(addr_of(ip.octets())));
            assert_eq!(b.port, 8080u16.to_be());
        }
        assert_eq!(first.vips6.get(&key.vip), Some(&1));
        assert_eq!(first.vips.len(), 1, "IPv4's VIPS holds IPv4 VIPs only");
        // NAT: its endpoints are IPv6's, not IPv4's.
        assert_eq!(first.nat_endpoints6().len(), 2);
        assert_eq!(first.nat_endpoints().len(), 2, "www's two");
        // A second apply keeps every id.
        let again = apply(&first.next, &cfg);
        assert_eq!(again.services[1].id, six.id);
        assert_eq!(ids_of(&again, 1), ids6);
        // Removed: its key and backends retire like IPv4's.
        let gone = apply(&again.next, &config(vec![service("www", 10, [1, 2])]));
        assert_eq!(gone.retired_services, vec![(six.key, six.id)]);
        assert_eq!(gone.retired_backends.len(), 2);
        assert!(gone.vips6.is_empty());
    }
}
