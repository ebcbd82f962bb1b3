//! The data plane from userspace: loads the `lb` XDP program, attaches it,
//! and owns every map write. A config is applied as a whole: rings are
//! written into the inactive half of each service's double buffer and then
//! switched with one store, so no packet ever sees half a table.

use std::{
    collections::{BTreeMap, HashMap as StdHashMap},
    net::SocketAddrV4,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, MapError, PerCpuArray},
    programs::{ProgramError, Xdp, XdpMode, xdp::XdpLinkId},
};
use lb_common::{
    BACKEND_F_DROP_FLOWS, Backend, Counters, MAX_BACKENDS, MAX_SERVICES, MODE_DSR, MODE_NAT, Ring,
    SCHED_COUNTER, SCHED_HASH, ServiceConf, ServiceKey, VERDICT_COUNT, Verdict, ring,
};

use crate::{
    config::{self, Config, Forwarding, Protocol, Scheduler},
    object::{MissingObject, ebpf_object},
};

/// The data plane program's name in the object.
pub const PROGRAM: &str = "lb";

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error(transparent)]
    MissingObject(#[from] MissingObject),
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program { name: String, source: ProgramError },
    #[error("map {name}: {source}")]
    Map { name: &'static str, source: MapError },
    #[error("map {0} missing from the eBPF object")]
    MissingMap(&'static str),
    #[error("program {0} missing from the eBPF object")]
    MissingProgram(String),
    #[error("attaching XDP to {iface}: {source}")]
    Attach { iface: String, source: ProgramError },
    #[error("service {service}: {source}")]
    Ring { service: String, source: ring::RingError },
    #[error("more than {limit} {what}")]
    Full { what: &'static str, limit: u32 },
}

type Result<T> = std::result::Result<T, DataplaneError>;

/// Ids the agent gave out, kept stable across reloads so conntrack entries
/// (which store backend ids) stay valid.
#[derive(Debug, Default)]
struct Ids {
    services: BTreeMap<ServiceKey, u32>,
    backends: BTreeMap<(u32, u16), u32>,
}

impl Ids {
    fn service(&mut self, key: ServiceKey) -> Result<u32> {
        allocate(&mut self.services, key, MAX_SERVICES, "services")
    }

    fn backend(&mut self, addr: SocketAddrV4) -> Result<u32> {
        allocate(&mut self.backends, raw_endpoint(addr), MAX_BACKENDS, "backends")
    }
}

/// The lowest free id for `key`, or its existing one.
fn allocate<K: Ord>(ids: &mut BTreeMap<K, u32>, key: K, limit: u32, what: &'static str) -> Result<u32> {
    if let Some(&id) = ids.get(&key) {
        return Ok(id);
    }
    let used: std::collections::BTreeSet<u32> = ids.values().copied().collect();
    let id = (0..limit).find(|i| !used.contains(i)).ok_or(DataplaneError::Full { what, limit })?;
    ids.insert(key, id);
    Ok(id)
}

/// Address and port as raw network-order values, as the maps hold them.
pub fn raw_endpoint(addr: SocketAddrV4) -> (u32, u16) {
    (u32::from_ne_bytes(addr.ip().octets()), addr.port().to_be())
}

/// What the agent reports about one applied service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedService {
    pub name: String,
    pub id: u32,
    /// Backend ids in ring order (the backends new flows go to).
    pub ring: Vec<u32>,
    /// Backend name → id, for every configured backend.
    pub backends: Vec<(String, u32)>,
}

pub struct Dataplane {
    ebpf: Ebpf,
    ids: Ids,
    active_half: StdHashMap<u32, u32>,
    links: Vec<(String, XdpLinkId)>,
}

impl Dataplane {
    /// Loads the object and the `lb` program (not yet attached).
    pub fn load(conntrack_size: u32) -> Result<Self> {
        let mut ebpf = EbpfLoader::new()
            .map_max_entries("CONNTRACK", conntrack_size)
            .map_max_entries("REVERSE_NAT", conntrack_size)
            .load(ebpf_object()?)?;
        program_mut(&mut ebpf, PROGRAM)?
            .load()
            .map_err(|source| DataplaneError::Program { name: PROGRAM.into(), source })?;
        Ok(Self { ebpf, ids: Ids::default(), active_half: StdHashMap::new(), links: Vec::new() })
    }

    /// Attaches `lb` to an interface; detached when `self` is dropped.
    pub fn attach(&mut self, iface: &str, mode: config::XdpMode) -> Result<()> {
        let mode = match mode {
            config::XdpMode::Native => XdpMode::Driver,
            config::XdpMode::Generic => XdpMode::Skb,
        };
        let link = program_mut(&mut self.ebpf, PROGRAM)?
            .attach(iface, mode)
            .map_err(|source| DataplaneError::Attach { iface: iface.into(), source })?;
        self.links.push((iface.to_string(), link));
        Ok(())
    }

    /// The loaded object, for tests and tools that run its programs directly.
    pub fn ebpf(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// The `lb` program (for BPF_PROG_TEST_RUN).
    pub fn program(&mut self) -> Result<&mut Xdp> {
        program_mut(&mut self.ebpf, PROGRAM)
    }

    /// Applies a whole config: backends, rings (double-buffered), services.
    /// Services and backends that are no longer configured are retired:
    /// their VIP stops matching and flows pinned to removed backends drop.
    pub fn apply(&mut self, cfg: &Config) -> Result<Vec<AppliedService>> {
        let mut applied = Vec::with_capacity(cfg.services.len());
        let mut live_backends = Vec::new();
        let mut plans = Vec::new();
        for svc in &cfg.services {
            let (vip, port) = raw_endpoint(svc.vip);
            let key = ServiceKey { vip, port, protocol: protocol_number(svc.protocol), _pad: 0 };
            let id = self.ids.service(key)?;
            let mut backends = Vec::with_capacity(svc.backends.len());
            for b in &svc.backends {
                let bid = self.ids.backend(b.address)?;
                live_backends.push((bid, b.address));
                backends.push((b.name.clone(), bid));
            }
            let slots = ring_slots(svc, &backends);
            let ring = ring::to_ring(&slots).map_err(|source| DataplaneError::Ring { service: svc.name.clone(), source })?;
            plans.push((key, id, svc, ring));
            applied.push(AppliedService { name: svc.name.clone(), id, ring: slots, backends });
        }

        // 1. Backends first: a ring may only name backends that exist.
        {
            let mut map = self.array::<Backend>("BACKENDS")?;
            for &(bid, addr) in &live_backends {
                let (addr, port) = raw_endpoint(addr);
                set(&mut map, "BACKENDS", bid, Backend { addr, port, flags: 0 })?;
            }
        }
        // 2. Each service's inactive ring half, then the switch.
        for (_, id, svc, ring) in &plans {
            let half = 1 - self.active_half.get(id).copied().unwrap_or(1);
            let mut rings = self.array::<Ring>("RINGS")?;
            set(&mut rings, "RINGS", Ring::slot(*id, half), *ring)?;
            let conf = ServiceConf {
                active_ring: half,
                mode: match svc.forwarding {
                    Forwarding::Nat => MODE_NAT,
                    Forwarding::Dsr => MODE_DSR,
                },
                scheduler: match svc.scheduler {
                    Scheduler::SourceHash => SCHED_HASH,
                    Scheduler::RoundRobin | Scheduler::WeightedRoundRobin => SCHED_COUNTER,
                },
                enabled: 1,
            };
            let mut confs = self.array::<ServiceConf>("SERVICE_CONF")?;
            set(&mut confs, "SERVICE_CONF", *id, conf)?;
            self.active_half.insert(*id, half);
        }
        // 3. Make the services match, and retire what is gone.
        self.publish_services(&plans.iter().map(|(k, id, _, _)| (*k, *id)).collect::<Vec<_>>())?;
        self.retire_backends(&live_backends.iter().map(|(id, _)| *id).collect::<Vec<_>>())?;
        Ok(applied)
    }

    fn publish_services(&mut self, live: &[(ServiceKey, u32)]) -> Result<()> {
        let mut vips: BTreeMap<u32, u32> = BTreeMap::new();
        for (k, _) in live {
            *vips.entry(k.vip).or_default() += 1;
        }
        let retired: Vec<(ServiceKey, u32)> = self
            .ids
            .services
            .iter()
            .filter(|(k, _)| !live.iter().any(|(l, _)| l == *k))
            .map(|(k, id)| (*k, *id))
            .collect();
        {
            let mut services = self.hash::<ServiceKey, u32>("SERVICES")?;
            for (k, id) in live {
                services.insert(k, id, 0).map_err(|source| DataplaneError::Map { name: "SERVICES", source })?;
            }
            for (k, _) in &retired {
                remove_if_present(&mut services, "SERVICES", k)?;
            }
        }
        {
            let mut map = self.hash::<u32, u32>("VIPS")?;
            for (vip, n) in &vips {
                map.insert(vip, n, 0).map_err(|source| DataplaneError::Map { name: "VIPS", source })?;
            }
            let stale: Vec<u32> = map.keys().filter_map(|k| k.ok()).filter(|k| !vips.contains_key(k)).collect();
            for vip in stale {
                remove_if_present(&mut map, "VIPS", &vip)?;
            }
        }
        let mut confs = self.array::<ServiceConf>("SERVICE_CONF")?;
        for &(_, id) in &retired {
            set(&mut confs, "SERVICE_CONF", id, ServiceConf::default())?;
        }
        for (k, id) in retired {
            self.ids.services.remove(&k);
            self.active_half.remove(&id);
        }
        Ok(())
    }

    /// Backends no service uses any more: flows still pinned to them drop,
    /// so clients reconnect to a live backend at once.
    fn retire_backends(&mut self, live: &[u32]) -> Result<()> {
        let retired: Vec<((u32, u16), u32)> = self
            .ids
            .backends
            .iter()
            .filter(|(_, id)| !live.contains(id))
            .map(|(k, id)| (*k, *id))
            .collect();
        let mut map = self.array::<Backend>("BACKENDS")?;
        for &((addr, port), id) in &retired {
            set(&mut map, "BACKENDS", id, Backend { addr, port, flags: BACKEND_F_DROP_FLOWS })?;
        }
        for (endpoint, _) in retired {
            self.ids.backends.remove(&endpoint);
        }
        Ok(())
    }

    /// Verdict counters summed over CPUs, in [`Verdict::ALL`] order.
    pub fn verdicts(&self) -> Result<Vec<(Verdict, u64)>> {
        let map = self.per_cpu::<u64>("VERDICTS")?;
        (0..VERDICT_COUNT)
            .map(|i| {
                let values = map.get(&i, 0).map_err(|source| DataplaneError::Map { name: "VERDICTS", source })?;
                Ok((Verdict::ALL[i as usize], values.iter().sum()))
            })
            .collect()
    }

    /// Traffic counters of a service or backend id, summed over CPUs.
    pub fn counters(&self, map: &'static str, id: u32) -> Result<Counters> {
        let values = self
            .per_cpu::<Counters>(map)?
            .get(&id, 0)
            .map_err(|source| DataplaneError::Map { name: map, source })?;
        Ok(values.iter().fold(Counters::default(), |acc, c| Counters {
            packets: acc.packets + c.packets,
            bytes: acc.bytes + c.bytes,
        }))
    }

    fn array<T: aya::Pod>(&mut self, name: &'static str) -> Result<Array<&mut MapData, T>> {
        let map = self.ebpf.map_mut(name).ok_or(DataplaneError::MissingMap(name))?;
        Array::try_from(map).map_err(|source| DataplaneError::Map { name, source })
    }

    fn hash<K: aya::Pod, V: aya::Pod>(&mut self, name: &'static str) -> Result<HashMap<&mut MapData, K, V>> {
        let map = self.ebpf.map_mut(name).ok_or(DataplaneError::MissingMap(name))?;
        HashMap::try_from(map).map_err(|source| DataplaneError::Map { name, source })
    }

    fn per_cpu<T: aya::Pod>(&self, name: &'static str) -> Result<PerCpuArray<&MapData, T>> {
        let map = self.ebpf.map(name).ok_or(DataplaneError::MissingMap(name))?;
        PerCpuArray::try_from(map).map_err(|source| DataplaneError::Map { name, source })
    }

    /// Interfaces the program is attached to.
    pub fn attached(&self) -> impl Iterator<Item = &str> {
        self.links.iter().map(|(iface, _)| iface.as_str())
    }
}

fn program_mut<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Xdp> {
    let prog = ebpf.program_mut(name).ok_or_else(|| DataplaneError::MissingProgram(name.into()))?;
    prog.try_into().map_err(|source| DataplaneError::Program { name: name.into(), source })
}

fn set<T: aya::Pod>(map: &mut Array<&mut MapData, T>, name: &'static str, index: u32, value: T) -> Result<()> {
    map.set(index, value, 0).map_err(|source| DataplaneError::Map { name, source })
}

fn remove_if_present<K: aya::Pod, V: aya::Pod>(map: &mut HashMap<&mut MapData, K, V>, name: &'static str, key: &K) -> Result<()> {
    match map.remove(key) {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(source) => Err(DataplaneError::Map { name, source }),
    }
}

pub fn protocol_number(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => lb_common::headers::IPPROTO_TCP,
        Protocol::Udp => lb_common::headers::IPPROTO_UDP,
    }
}

/// The ring of a service: its non-backup backends with weight > 0, or — when
/// there are none — its backups (HAProxy's `backup` semantics).
fn ring_slots(svc: &config::Service, ids: &[(String, u32)]) -> Vec<u32> {
    let pick = |backup: bool| -> Vec<(u32, u32)> {
        svc.backends
            .iter()
            .zip(ids)
            .filter(|(b, _)| b.backup == backup && b.weight > 0)
            .map(|(b, (_, id))| (*id, b.weight))
            .collect()
    };
    let mut members = pick(false);
    if members.is_empty() {
        members = pick(true);
    }
    match svc.scheduler {
        Scheduler::WeightedRoundRobin => ring::weighted(&members),
        Scheduler::RoundRobin | Scheduler::SourceHash => {
            ring::round_robin(&members.iter().map(|(id, _)| *id).collect::<Vec<_>>())
        }
    }
}
