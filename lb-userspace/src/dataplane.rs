//! The data plane from userspace: loads the `lb` XDP program, attaches it,
//! and owns every map write. A config is applied as a whole: rings are
//! written into the inactive half of each service's double buffer and then
//! switched with one store, so no packet ever sees half a table.

use std::{
    collections::{BTreeMap, HashMap as StdHashMap},
    net::SocketAddrV4,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, MapError, MapInfo, PerCpuArray},
    programs::{
        ProgramError, Xdp, XdpMode,
        links::{FdLink, LinkError, PinnedLink},
        xdp::XdpLink,
    },
};
use lb_common::{
    BACKEND_F_DROP_FLOWS, BACKEND_F_IN_RING, BACKEND_F_IN_USE, Backend, Counters, Flow, FlowKey,
    MAX_BACKENDS, MAX_SERVICES, MODE_DSR, MODE_NAT, Ring, SCHED_COUNTER, SCHED_HASH, ServiceConf,
    ServiceKey, VERDICT_COUNT, Verdict, ring,
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
    Map {
        name: &'static str,
        source: MapError,
    },
    #[error("map {0} missing from the eBPF object")]
    MissingMap(&'static str),
    #[error("program {0} missing from the eBPF object")]
    MissingProgram(String),
    #[error("attaching XDP to {iface}: {source}")]
    Attach { iface: String, source: ProgramError },
    #[error("service {service}: {source}")]
    Ring {
        service: String,
        source: ring::RingError,
    },
    #[error("more than {limit} {what}")]
    Full { what: &'static str, limit: u32 },
    #[error("pinning {path}: {reason}")]
    Pin { path: PathBuf, reason: String },
    #[error("pinned link {path}: {source}")]
    Link { path: PathBuf, source: LinkError },
    #[error(
        "conntrack-size is {configured} in the config but the pinned data plane under {} has \
         {pinned} ({map}): set conntrack-size = {pinned}, or run `lb teardown --pin-dir {}` \
         first (drops every flow)",
        pin_dir.display(),
        pin_dir.display()
    )]
    ConntrackSize {
        configured: u32,
        pinned: u32,
        map: &'static str,
        pin_dir: PathBuf,
    },
}

type Result<T> = std::result::Result<T, DataplaneError>;

/// Ids the agent gave out, kept stable across reloads (and, through the
/// pinned maps, across restarts) so conntrack entries stay valid.
#[derive(Debug, Default)]
struct Ids {
    services: BTreeMap<ServiceKey, u32>,
    /// (service id, address, port) → backend id: ids are per service.
    backends: BTreeMap<(u32, u32, u16), u32>,
}

impl Ids {
    fn service(&mut self, key: ServiceKey) -> Result<u32> {
        allocate(&mut self.services, key, MAX_SERVICES, "services")
    }

    fn backend(&mut self, service_id: u32, addr: SocketAddrV4) -> Result<u32> {
        let (a, p) = raw_endpoint(addr);
        allocate(
            &mut self.backends,
            (service_id, a, p),
            MAX_BACKENDS,
            "backends",
        )
    }
}

/// Every map of the `lb` program: all pinned, so a restarted agent adopts
/// the flows, rings and counters of the one before it.
const LB_MAPS: [&str; 11] = [
    "SERVICES",
    "VIPS",
    "SERVICE_CONF",
    "RINGS",
    "RR_COUNTERS",
    "BACKENDS",
    "CONNTRACK",
    "REVERSE_NAT",
    "SERVICE_STATS",
    "BACKEND_STATS",
    "VERDICTS",
];

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

/// The lowest free id for `key`, or its existing one.
fn allocate<K: Ord>(
    ids: &mut BTreeMap<K, u32>,
    key: K,
    limit: u32,
    what: &'static str,
) -> Result<u32> {
    if let Some(&id) = ids.get(&key) {
        return Ok(id);
    }
    let used: std::collections::BTreeSet<u32> = ids.values().copied().collect();
    let id = (0..limit)
        .find(|i| !used.contains(i))
        .ok_or(DataplaneError::Full { what, limit })?;
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
    /// Interfaces `lb` is attached to. Unpinned links belong to the program
    /// (detached when it drops); pinned ones to their pins.
    attached: Vec<String>,
    pin_dir: Option<PathBuf>,
}

impl Dataplane {
    /// Loads the object and the `lb` program (not yet attached). Nothing is
    /// pinned: the data plane lives as long as this value (tests, tools).
    pub fn load(conntrack_size: u32) -> Result<Self> {
        Self::load_with(conntrack_size, None)
    }

    /// Loads with every map pinned under `pin_dir` (a bpffs directory),
    /// reusing maps already pinned there: a restarted agent adopts the
    /// previous one's flows, rings and counters. Returns whether it adopted.
    pub fn load_pinned(conntrack_size: u32, pin_dir: &Path) -> Result<(Self, bool)> {
        std::fs::create_dir_all(pin_dir).map_err(|e| DataplaneError::Pin {
            path: pin_dir.into(),
            reason: e.to_string(),
        })?;
        let adopted = pin_dir.join("SERVICES").exists();
        if adopted {
            // Before the loader touches anything: it would silently reuse
            // the pinned tables at their old size.
            check_pinned_sizes(conntrack_size, pin_dir)?;
        }
        let mut dp = Self::load_with(conntrack_size, Some(pin_dir))?;
        if adopted {
            dp.adopt_ids()?;
        }
        Ok((dp, adopted))
    }

    fn load_with(conntrack_size: u32, pin_dir: Option<&Path>) -> Result<Self> {
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries("CONNTRACK", conntrack_size)
            .map_max_entries("REVERSE_NAT", conntrack_size);
        let paths: Vec<(&str, PathBuf)> = pin_dir
            .map(|dir| LB_MAPS.iter().map(|m| (*m, dir.join(m))).collect())
            .unwrap_or_default();
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(ebpf_object()?)?;
        program_mut(&mut ebpf, PROGRAM)?
            .load()
            .map_err(|source| DataplaneError::Program {
                name: PROGRAM.into(),
                source,
            })?;
        Ok(Self {
            ebpf,
            ids: Ids::default(),
            active_half: StdHashMap::new(),
            attached: Vec::new(),
            pin_dir: pin_dir.map(Path::to_path_buf),
        })
    }

    /// Rebuilds the id tables from pinned maps written by a previous agent.
    fn adopt_ids(&mut self) -> Result<()> {
        let services: Vec<(ServiceKey, u32)> = self
            .hash::<ServiceKey, u32>("SERVICES")?
            .iter()
            .filter_map(|r| r.ok())
            .collect();
        let confs = self.array::<ServiceConf>("SERVICE_CONF")?;
        let mut halves = Vec::new();
        for (_, id) in &services {
            let conf = confs.get(id, 0).map_err(|source| DataplaneError::Map {
                name: "SERVICE_CONF",
                source,
            })?;
            halves.push((*id, conf.active_ring));
        }
        let backends = self.array::<Backend>("BACKENDS")?;
        let mut owned = Vec::new();
        for id in 0..MAX_BACKENDS {
            let b = backends.get(&id, 0).map_err(|source| DataplaneError::Map {
                name: "BACKENDS",
                source,
            })?;
            if b.flags & BACKEND_F_IN_USE != 0 {
                owned.push(((b.service_id, b.addr, b.port), id));
            }
        }
        self.ids.services.extend(services);
        self.ids.backends.extend(owned);
        self.active_half.extend(halves);
        Ok(())
    }

    /// Attaches `lb` to an interface. Unpinned: detached when `self` drops.
    /// Pinned: the link is pinned as `link-<iface>` and outlives the agent;
    /// if a previous agent's link is pinned there, the new program replaces
    /// the old one in place (bpf_link_update), so no packet goes unprocessed.
    pub fn attach(&mut self, iface: &str, mode: config::XdpMode) -> Result<()> {
        let mode = match mode {
            config::XdpMode::Native => XdpMode::Driver,
            config::XdpMode::Generic => XdpMode::Skb,
        };
        let attach_err = |source| DataplaneError::Attach {
            iface: iface.into(),
            source,
        };
        let Some(dir) = self.pin_dir.clone() else {
            // The program keeps the link and detaches it when it drops.
            program_mut(&mut self.ebpf, PROGRAM)?
                .attach(iface, mode)
                .map_err(attach_err)?;
            self.attached.push(iface.to_string());
            return Ok(());
        };
        let path = dir.join(format!("link-{iface}"));
        let prog = program_mut(&mut self.ebpf, PROGRAM)?;
        if path.exists() {
            let pinned = PinnedLink::from_pin(&path).map_err(|source| DataplaneError::Link {
                path: path.clone(),
                source,
            })?;
            let link =
                XdpLink::try_from(FdLink::from(pinned)).map_err(|source| DataplaneError::Link {
                    path: path.clone(),
                    source,
                })?;
            let id = prog.attach_to_link(link).map_err(attach_err)?;
            // The pin keeps the link attached; closing our fd does not detach it.
            drop(prog.take_link(id).map_err(attach_err)?);
        } else {
            let id = prog.attach(iface, mode).map_err(attach_err)?;
            let link = prog.take_link(id).map_err(attach_err)?;
            let fd = FdLink::try_from(link).map_err(|source| DataplaneError::Link {
                path: path.clone(),
                source,
            })?;
            fd.pin(&path).map_err(|e| DataplaneError::Pin {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        }
        self.attached.push(iface.to_string());
        Ok(())
    }

    /// Removes a pinned data plane: unpins every link (detaching XDP) and map.
    /// The explicit opposite of a restart.
    pub fn teardown(pin_dir: &Path) -> Result<Vec<String>> {
        let mut removed = Vec::new();
        let entries = match std::fs::read_dir(pin_dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
            Err(e) => {
                return Err(DataplaneError::Pin {
                    path: pin_dir.into(),
                    reason: e.to_string(),
                });
            }
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("link-") {
                let pinned =
                    PinnedLink::from_pin(&path).map_err(|source| DataplaneError::Link {
                        path: path.clone(),
                        source,
                    })?;
                // Unpinned and closed: the kernel detaches the program.
                drop(pinned.unpin().map_err(|e| DataplaneError::Pin {
                    path: path.clone(),
                    reason: e.to_string(),
                })?);
            } else {
                std::fs::remove_file(&path).map_err(|e| DataplaneError::Pin {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
            }
            removed.push(name);
        }
        let _ = std::fs::remove_dir(pin_dir);
        Ok(removed)
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
        self.apply_with(cfg, &|_, _| Admission::SERVING)
    }

    /// [`Dataplane::apply`] with each backend's admission decided by `admit`
    /// (health, drain, disable): out-of-rotation backends leave the ring, and
    /// backups enter it only when no primary is in rotation.
    pub fn apply_with(
        &mut self,
        cfg: &Config,
        admit: &dyn Fn(&config::Service, &config::Backend) -> Admission,
    ) -> Result<Vec<AppliedService>> {
        let mut applied = Vec::with_capacity(cfg.services.len());
        let mut live_backends = Vec::new();
        let mut plans = Vec::new();
        let mut in_ring = std::collections::BTreeSet::new();
        for svc in &cfg.services {
            let (vip, port) = raw_endpoint(svc.vip);
            let key = ServiceKey {
                vip,
                port,
                protocol: protocol_number(svc.protocol),
                _pad: 0,
            };
            let id = self.ids.service(key)?;
            let mut backends = Vec::with_capacity(svc.backends.len());
            let mut admissions = Vec::with_capacity(svc.backends.len());
            for b in &svc.backends {
                let bid = self.ids.backend(id, b.address)?;
                let admission = admit(svc, b);
                live_backends.push((bid, id, b.address, admission.drop_flows));
                backends.push((b.name.clone(), bid));
                admissions.push(admission);
            }
            let slots = ring_slots(svc, &backends, &admissions);
            in_ring.extend(slots.iter().copied());
            let ring = ring::to_ring(&slots).map_err(|source| DataplaneError::Ring {
                service: svc.name.clone(),
                source,
            })?;
            plans.push((key, id, svc, ring));
            applied.push(AppliedService {
                name: svc.name.clone(),
                id,
                ring: slots,
                backends,
            });
        }

        // 1. Backends first: a ring may only name backends that exist.
        {
            let mut map = self.array::<Backend>("BACKENDS")?;
            for &(bid, service_id, addr, drop_flows) in &live_backends {
                let (addr, port) = raw_endpoint(addr);
                let mut flags = BACKEND_F_IN_USE;
                if drop_flows {
                    flags |= BACKEND_F_DROP_FLOWS;
                }
                if in_ring.contains(&bid) {
                    flags |= BACKEND_F_IN_RING;
                }
                set(
                    &mut map,
                    "BACKENDS",
                    bid,
                    Backend {
                        addr,
                        port,
                        flags,
                        service_id,
                        _pad: 0,
                    },
                )?;
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
        self.publish_services(
            &plans
                .iter()
                .map(|(k, id, _, _)| (*k, *id))
                .collect::<Vec<_>>(),
        )?;
        self.retire_backends(&live_backends.iter().map(|b| b.0).collect::<Vec<_>>())?;
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
                services
                    .insert(k, id, 0)
                    .map_err(|source| DataplaneError::Map {
                        name: "SERVICES",
                        source,
                    })?;
            }
            for (k, _) in &retired {
                remove_if_present(&mut services, "SERVICES", k)?;
            }
        }
        {
            let mut map = self.hash::<u32, u32>("VIPS")?;
            for (vip, n) in &vips {
                map.insert(vip, n, 0)
                    .map_err(|source| DataplaneError::Map {
                        name: "VIPS",
                        source,
                    })?;
            }
            let stale: Vec<u32> = map
                .keys()
                .filter_map(|k| k.ok())
                .filter(|k| !vips.contains_key(k))
                .collect();
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
        let retired: Vec<((u32, u32, u16), u32)> = self
            .ids
            .backends
            .iter()
            .filter(|(_, id)| !live.contains(id))
            .map(|(k, id)| (*k, *id))
            .collect();
        let mut map = self.array::<Backend>("BACKENDS")?;
        // The slot stays DROP_FLOWS (not IN_USE) until it is given out again.
        for &((service_id, addr, port), id) in &retired {
            set(
                &mut map,
                "BACKENDS",
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
                let values = map.get(&i, 0).map_err(|source| DataplaneError::Map {
                    name: "VERDICTS",
                    source,
                })?;
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

    /// Flows in the connection table per backend id (walks the whole map:
    /// for status, not for the fast path).
    pub fn flows_per_backend(&self) -> Result<BTreeMap<u32, u64>> {
        let map = self
            .ebpf
            .map("CONNTRACK")
            .ok_or(DataplaneError::MissingMap("CONNTRACK"))?;
        let flows: HashMap<&MapData, FlowKey, Flow> =
            HashMap::try_from(map).map_err(|source| DataplaneError::Map {
                name: "CONNTRACK",
                source,
            })?;
        let mut counts = BTreeMap::new();
        for (_, flow) in flows.iter().filter_map(|r| r.ok()) {
            *counts.entry(flow.backend_id).or_insert(0) += 1;
        }
        Ok(counts)
    }

    fn array<T: aya::Pod>(&mut self, name: &'static str) -> Result<Array<&mut MapData, T>> {
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(DataplaneError::MissingMap(name))?;
        Array::try_from(map).map_err(|source| DataplaneError::Map { name, source })
    }

    fn hash<K: aya::Pod, V: aya::Pod>(
        &mut self,
        name: &'static str,
    ) -> Result<HashMap<&mut MapData, K, V>> {
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(DataplaneError::MissingMap(name))?;
        HashMap::try_from(map).map_err(|source| DataplaneError::Map { name, source })
    }

    fn per_cpu<T: aya::Pod>(&self, name: &'static str) -> Result<PerCpuArray<&MapData, T>> {
        let map = self
            .ebpf
            .map(name)
            .ok_or(DataplaneError::MissingMap(name))?;
        PerCpuArray::try_from(map).map_err(|source| DataplaneError::Map { name, source })
    }

    /// Interfaces the program is attached to.
    pub fn attached(&self) -> impl Iterator<Item = &str> {
        self.attached.iter().map(String::as_str)
    }

    /// Where the maps and links are pinned, if they are.
    pub fn pin_dir(&self) -> Option<&Path> {
        self.pin_dir.as_deref()
    }
}

/// The pinned flow tables must have the size the config asks for: a map's
/// size is fixed when it is created, and adopting keeps the old one.
fn check_pinned_sizes(conntrack_size: u32, pin_dir: &Path) -> Result<()> {
    for map in ["CONNTRACK", "REVERSE_NAT"] {
        let path = pin_dir.join(map);
        if !path.exists() {
            continue;
        }
        let pinned = MapInfo::from_pin(&path)
            .map_err(|source| DataplaneError::Map { name: map, source })?
            .max_entries();
        if pinned != conntrack_size {
            return Err(DataplaneError::ConntrackSize {
                configured: conntrack_size,
                pinned,
                map,
                pin_dir: pin_dir.to_path_buf(),
            });
        }
    }
    Ok(())
}

fn program_mut<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Xdp> {
    let prog = ebpf
        .program_mut(name)
        .ok_or_else(|| DataplaneError::MissingProgram(name.into()))?;
    prog.try_into().map_err(|source| DataplaneError::Program {
        name: name.into(),
        source,
    })
}

fn set<T: aya::Pod>(
    map: &mut Array<&mut MapData, T>,
    name: &'static str,
    index: u32,
    value: T,
) -> Result<()> {
    map.set(index, value, 0)
        .map_err(|source| DataplaneError::Map { name, source })
}

fn remove_if_present<K: aya::Pod, V: aya::Pod>(
    map: &mut HashMap<&mut MapData, K, V>,
    name: &'static str,
    key: &K,
) -> Result<()> {
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

/// The ring of a service: its non-backup backends in rotation with weight
/// > 0, or — when there are none — its backups (HAProxy's `backup`).
fn ring_slots(svc: &config::Service, ids: &[(String, u32)], admissions: &[Admission]) -> Vec<u32> {
    let pick = |backup: bool| -> Vec<(u32, u32)> {
        svc.backends
            .iter()
            .zip(ids)
            .zip(admissions)
            .filter(|((b, _), a)| b.backup == backup && b.weight > 0 && a.in_rotation)
            .map(|((b, (_, id)), _)| (*id, b.weight))
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
