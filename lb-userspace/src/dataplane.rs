//! The data plane from userspace: loads the `lb` XDP program, attaches it,
//! and owns every map write. A config is applied as a whole: rings are
//! written into the inactive half of each service's double buffer and then
//! switched with one store, so no packet ever sees half a table.

mod batch;
mod clock;
pub mod firewall;
mod firewall_maps;
mod half_open;
pub mod plan;
mod read;
pub mod sweep;

pub use firewall_maps::RuleStats;
pub use half_open::HalfOpenTable;
pub use read::{FlowTable, NeighbourRequests};
pub use sweep::Sweeper;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, MapError, MapInfo, PerCpuArray, PerCpuValues},
    programs::{
        ProgramError, Xdp, XdpMode,
        links::{FdLink, LinkError, PinnedLink},
        xdp::XdpLink,
    },
};
use lb_common::{
    BACKEND_F_DROP_FLOWS, BACKEND_F_IN_USE, Backend, BackendHop, Counters, DEFAULT_HALF_OPEN_SIZE,
    Endpoint, Flow, FlowConf, FlowCounts, FlowKey, HalfOpenSlot, MAX_BACKENDS, MaglevTable, Ring,
    SCHED_MAGLEV, SCHED_SOURCE_IP, ServiceConf, ServiceKey, ring,
};

use firewall::{FwError, FwIds};
pub use plan::{Admission, protocol_number, raw_endpoint};
use plan::{BackendPlan, Ids, Plan, PlanError, ServicePlan};

use crate::{
    config::{self, Config},
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
    #[error("measuring the kernel's jiffies clock for the data plane: {0}")]
    Clock(#[from] clock::ClockError),
    #[error("mapping HALF_OPEN into memory: {0}")]
    HalfOpen(std::io::Error),
    #[error("program {0} missing from the eBPF object")]
    MissingProgram(String),
    #[error("attaching XDP to {iface}: {source}")]
    Attach { iface: String, source: ProgramError },
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error("firewall: {0}")]
    Firewall(#[from] FwError),
    #[error("pinning {path}: {reason}")]
    Pin { path: PathBuf, reason: String },
    #[error("pinned link {path}: {source}")]
    Link { path: PathBuf, source: LinkError },
    #[error(
        "{key} is {configured} in the config but the pinned data plane under {} has \
         {pinned} ({map} holds {} entries, two per flow): set {key} = {pinned}, or run \
         `lb teardown --pin-dir {}` first (drops every flow)",
        pin_dir.display(),
        pinned * 2,
        pin_dir.display()
    )]
    ConntrackSize {
        key: &'static str,
        configured: u32,
        pinned: u32,
        map: &'static str,
        pin_dir: PathBuf,
    },
    #[error(
        "the pinned data plane under {} is from an earlier version of lb: its {map} is {found}, \
         this version needs {wanted}. Its flows cannot be adopted: run `lb teardown --pin-dir {}` \
         (drops every flow) and start again",
        pin_dir.display(),
        pin_dir.display()
    )]
    OldVersion {
        map: &'static str,
        found: String,
        wanted: String,
        pin_dir: PathBuf,
    },
}

/// The flow tables' capacities, in flows (each map holds two entries per
/// flow: a NAT flow's forward and reply entries).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableSizes {
    /// Established flows (`conntrack-size`).
    pub conntrack: u32,
    /// Flows that have not completed a handshake (`half-open-size`).
    pub half_open: u32,
}

impl From<u32> for TableSizes {
    /// `conntrack` established flows and the default half-open table (no
    /// larger than the established one).
    fn from(conntrack: u32) -> Self {
        TableSizes {
            conntrack,
            half_open: DEFAULT_HALF_OPEN_SIZE.min(conntrack),
        }
    }
}

impl From<&config::Dataplane> for TableSizes {
    fn from(d: &config::Dataplane) -> Self {
        TableSizes {
            conntrack: d.conntrack_size,
            half_open: d.half_open_size,
        }
    }
}

type Result<T> = std::result::Result<T, DataplaneError>;

/// Every map of the `lb` program: all pinned, so a restarted agent adopts
/// the flows, rings and counters of the one before it, and `lb trace` finds
/// the drop-tracing switch and ring buffer. A pin dir left by an older
/// version lacks the newer maps: the loader creates and pins those (and
/// keeps the others), so adopting it works.
pub const LB_MAPS: [&str; 29] = [
    "SERVICES",
    "VIPS",
    "SERVICE_CONF",
    "RINGS",
    "MAGLEV",
    "RR_COUNTERS",
    "BACKENDS",
    "BACKEND_HOPS",
    "CONNTRACK",
    "HALF_OPEN",
    "FLOW_CONF",
    "BACKEND_FLOWS",
    "FLOWS_SWEPT",
    "NEW_FLOW_BUDGET",
    "FRAGS",
    "SERVICE_STATS",
    "BACKEND_STATS",
    "VERDICTS",
    "TRACE_ON",
    "TRACE",
    "FW_SCOPES",
    "FW_DENY",
    "FW_ALLOW",
    "FW_RULE_STATS",
    "FW_BUCKETS",
    "CAPTURE_ON",
    "CAPTURE",
    "NAT_BACKENDS",
    "NEIGH_WANTED",
];

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

impl From<&ServicePlan> for AppliedService {
    fn from(s: &ServicePlan) -> Self {
        AppliedService {
            name: s.name.clone(),
            id: s.id,
            ring: s.ring.clone(),
            backends: s.backends.clone(),
        }
    }
}

pub struct Dataplane {
    ebpf: Ebpf,
    /// The ids the maps hold; replaced by a plan's only once it is written.
    ids: Ids,
    /// The firewall rules and scopes the maps hold, the same way.
    fw: FwIds,
    /// Interfaces `lb` is attached to. Unpinned links belong to the program
    /// (detached when it drops); pinned ones to their pins.
    attached: Vec<String>,
    pin_dir: Option<PathBuf>,
    /// The least-connections services of the last apply, whose rings
    /// [`Dataplane::refresh_least_connections`] rebuilds from active counts.
    least_connections: Vec<ServicePlan>,
    /// Active flows per backend id as last refreshed (least connections).
    active: Vec<u64>,
}

impl Dataplane {
    /// Loads the object and the `lb` program (not yet attached). Nothing is
    /// pinned: the data plane lives as long as this value (tests, tools).
    pub fn load(sizes: impl Into<TableSizes>) -> Result<Self> {
        Self::load_with(sizes.into(), None)
    }

    /// Loads with every map pinned under `pin_dir` (a bpffs directory),
    /// reusing maps already pinned there: a restarted agent adopts the
    /// previous one's flows, rings and counters. Returns whether it adopted.
    pub fn load_pinned(sizes: impl Into<TableSizes>, pin_dir: &Path) -> Result<(Self, bool)> {
        let sizes = sizes.into();
        std::fs::create_dir_all(pin_dir).map_err(|e| DataplaneError::Pin {
            path: pin_dir.into(),
            reason: e.to_string(),
        })?;
        let adopted = pin_dir.join("SERVICES").exists();
        if adopted {
            // Before the loader touches anything: it would silently reuse
            // the pinned tables at their old size.
            check_pinned_tables(sizes, pin_dir)?;
        }
        let mut dp = Self::load_with(sizes, Some(pin_dir))?;
        if adopted {
            dp.adopt_ids()?;
        }
        Ok((dp, adopted))
    }

    /// Loads another build of the object, unpinned: for measurements that
    /// compare builds (`tests/tests/kernel.rs`, the trace cost).
    pub fn load_object(object: &[u8], sizes: impl Into<TableSizes>) -> Result<Self> {
        Self::load_bytes(object, sizes.into(), None)
    }

    fn load_with(sizes: TableSizes, pin_dir: Option<&Path>) -> Result<Self> {
        Self::load_bytes(ebpf_object()?, sizes, pin_dir)
    }

    fn load_bytes(object: &[u8], sizes: TableSizes, pin_dir: Option<&Path>) -> Result<Self> {
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries("CONNTRACK", sizes.conntrack.saturating_mul(2))
            .map_max_entries("HALF_OPEN", sizes.half_open.saturating_mul(2));
        let paths: Vec<(&str, PathBuf)> = pin_dir
            .map(|dir| LB_MAPS.iter().map(|m| (*m, dir.join(m))).collect())
            .unwrap_or_default();
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(object)?;
        program_mut(&mut ebpf, PROGRAM)?
            .load()
            .map_err(|source| DataplaneError::Program {
                name: PROGRAM.into(),
                source,
            })?;
        Ok(Self {
            ebpf,
            ids: Ids::default(),
            fw: FwIds::default(),
            attached: Vec::new(),
            pin_dir: pin_dir.map(Path::to_path_buf),
            least_connections: Vec::new(),
            active: Vec::new(),
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
        let (mut owned, mut retired) = (Vec::new(), Vec::new());
        for id in 0..MAX_BACKENDS {
            let b = backends.get(&id, 0).map_err(|source| DataplaneError::Map {
                name: "BACKENDS",
                source,
            })?;
            if b.flags & BACKEND_F_IN_USE != 0 {
                owned.push(((b.service_id, b.addr, b.port), id));
            } else if b.flags & BACKEND_F_DROP_FLOWS != 0 {
                // Retired: free, but flows may still be pinned to it.
                retired.push(id);
            }
        }
        self.ids.services.extend(services);
        self.ids.backends.extend(owned);
        self.ids.retired_backends.extend(retired);
        self.ids.active_half.extend(halves);
        self.fw = self.read_firewall()?;
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
        // A new service is published with its firewall rules in place.
        self.firewall_additions(&fw)?;
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
    ///    are deleted from `CONNTRACK`/`REVERSE_NAT`, and their counters
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
            let mut services = self.hash::<ServiceKey, u32>("SERVICES")?;
            for (key, _) in &plan.retired_services {
                remove_if_present(&mut services, "SERVICES", key)?;
            }
        }
        for &(_, id) in &plan.retired_services {
            self.forget_maglev(id)?;
            set(
                &mut self.array::<ServiceConf>("SERVICE_CONF")?,
                "SERVICE_CONF",
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
            let mut map = self.array::<Backend>("BACKENDS")?;
            for &((service_id, addr, port), id) in &plan.retired_backends {
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
        self.publish_nat_backends(plan)?;
        Ok(waiting.iter().map(|svc| svc.id).collect())
    }

    fn write_backend(&mut self, b: &BackendPlan) -> Result<()> {
        set(
            &mut self.array::<Backend>("BACKENDS")?,
            "BACKENDS",
            b.id,
            Backend {
                addr: b.addr,
                port: b.port,
                flags: b.flags,
                service_id: b.service_id,
                _pad: 0,
            },
        )?;
        // The shared next hop was for the address the id had: the next new
        // flow resolves it again.
        set(
            &mut self.array::<BackendHop>("BACKEND_HOPS")?,
            "BACKEND_HOPS",
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
        let mut rings = self.array::<Ring>("RINGS")?;
        set(&mut rings, "RINGS", Ring::slot(svc.id, half), ring)?;
        if uses_maglev(svc.scheduler) {
            self.write_maglev(svc, half, slots)?;
        }
        let conf = ServiceConf {
            active_ring: half,
            mode: svc.mode,
            scheduler: svc.scheduler,
            enabled: 1,
        };
        set(
            &mut self.array::<ServiceConf>("SERVICE_CONF")?,
            "SERVICE_CONF",
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
        let mut map = self.hash::<u32, MaglevTable>("MAGLEV")?;
        map.insert(Ring::slot(svc.id, half), table, 0)
            .map_err(|source| DataplaneError::Map {
                name: "MAGLEV",
                source,
            })
    }

    /// Drops both `MAGLEV` halves of a service that no longer uses them.
    fn forget_maglev(&mut self, service_id: u32) -> Result<()> {
        let mut map = self.hash::<u32, MaglevTable>("MAGLEV")?;
        for half in 0..2 {
            remove_if_present(&mut map, "MAGLEV", &Ring::slot(service_id, half))?;
        }
        Ok(())
    }

    /// Deletes every flow pinned to one of `ids` (both tables, both
    /// directions). Walks the whole tables, so it runs only when an id with
    /// a past is reused.
    fn purge_flows(&mut self, ids: &BTreeSet<u32>) -> Result<()> {
        let mut flows = self.hash::<FlowKey, Flow>("CONNTRACK")?;
        let stale: Vec<FlowKey> = flows
            .iter()
            .filter_map(|r| r.ok())
            .filter(|(_, f)| ids.contains(&f.backend_id))
            .map(|(k, _)| k)
            .collect();
        for key in &stale {
            remove_if_present(&mut flows, "CONNTRACK", key)?;
        }
        self.half_open_table()?
            .clear_all(|_, f| ids.contains(&f.backend_id));
        Ok(())
    }

    /// Deletes one flow entry (by its key as it arrives) from both tables,
    /// as an eviction or another load balancer's miss would leave it. For
    /// tests and tools; the data plane and the sweep remove expired flows.
    pub fn forget_flow(&mut self, key: &FlowKey) -> Result<()> {
        remove_if_present(
            &mut self.hash::<FlowKey, Flow>("CONNTRACK")?,
            "CONNTRACK",
            key,
        )?;
        let conf = self.flow_conf()?;
        self.half_open_table()?.remove(key, &conf);
        Ok(())
    }

    /// The flow lifecycle's settings (timeouts, new-flow budget), live,
    /// with the half-open table's size and seed: the seed already in
    /// `FLOW_CONF` (a pinned table's, whose entries sit where it put them),
    /// or a new random one for a new table.
    fn set_flow_conf(&mut self, mut conf: FlowConf) -> Result<()> {
        let err = |source| DataplaneError::Map {
            name: "HALF_OPEN",
            source,
        };
        conf.half_open_slots = self
            .map_data("HALF_OPEN")?
            .info()
            .map_err(err)?
            .max_entries();
        conf.half_open_seed = match self.flow_conf()?.half_open_seed {
            0 => random_seed(),
            seed => seed,
        };
        let clock = clock::JiffyClock::get()?;
        (conf.jiffy_ns, conf.clock_epoch_ns) = (clock.jiffy_ns, clock.epoch_ns);
        set(
            &mut self.array::<FlowConf>("FLOW_CONF")?,
            "FLOW_CONF",
            0,
            conf,
        )
    }

    /// `HALF_OPEN`, mapped into memory.
    pub(crate) fn half_open_table(&self) -> Result<HalfOpenTable> {
        HalfOpenTable::map(&self.map_data("HALF_OPEN")?).map_err(DataplaneError::HalfOpen)
    }

    /// What `FLOW_CONF` holds now (timeouts, budget, the half-open table's
    /// size and seed).
    pub fn flow_conf(&self) -> Result<FlowConf> {
        self.owned_array::<FlowConf>("FLOW_CONF")?
            .get(&0, 0)
            .map_err(|source| DataplaneError::Map {
                name: "FLOW_CONF",
                source,
            })
    }

    /// A reused id starts its traffic counters from zero.
    fn zero_backend_counters(&mut self, id: u32) -> Result<()> {
        self.zero_counter("BACKEND_STATS", id, Counters::default())?;
        set(
            &mut self.array::<FlowCounts>("BACKEND_FLOWS")?,
            "BACKEND_FLOWS",
            id,
            FlowCounts::default(),
        )?;
        set(&mut self.array::<u64>("FLOWS_SWEPT")?, "FLOWS_SWEPT", id, 0)
    }

    /// Sets slot `id` of a per-CPU array to `zero` on every CPU.
    fn zero_counter<T: aya::Pod>(&mut self, name: &'static str, id: u32, zero: T) -> Result<()> {
        let map_err = |source| DataplaneError::Map { name, source };
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| map_err(MapError::IoError(e)))?;
        let zeros =
            PerCpuValues::try_from(vec![zero; cpus]).map_err(|e| map_err(MapError::IoError(e)))?;
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(DataplaneError::MissingMap(name))?;
        let mut stats: PerCpuArray<&mut MapData, T> =
            PerCpuArray::try_from(map).map_err(map_err)?;
        stats.set(id, zeros, 0).map_err(map_err)
    }

    /// `SERVICES` gets every live key and `VIPS` the count per VIP.
    fn publish_services(&mut self, plan: &Plan) -> Result<()> {
        {
            let mut services = self.hash::<ServiceKey, u32>("SERVICES")?;
            for svc in &plan.services {
                services
                    .insert(svc.key, svc.id, 0)
                    .map_err(|source| DataplaneError::Map {
                        name: "SERVICES",
                        source,
                    })?;
            }
        }
        let mut map = self.hash::<u32, u32>("VIPS")?;
        for (vip, n) in &plan.vips {
            map.insert(vip, n, 0)
                .map_err(|source| DataplaneError::Map {
                    name: "VIPS",
                    source,
                })?;
        }
        let stale: Vec<u32> = map
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| !plan.vips.contains_key(k))
            .collect();
        for vip in stale {
            remove_if_present(&mut map, "VIPS", &vip)?;
        }
        Ok(())
    }

    /// `NAT_BACKENDS` gets the NAT services' backend endpoints, and only
    /// those: their segments without a flow are dropped, not routed on.
    fn publish_nat_backends(&mut self, plan: &Plan) -> Result<()> {
        let endpoints = plan.nat_endpoints();
        let mut map = self.hash::<Endpoint, u32>("NAT_BACKENDS")?;
        // Stale ones first: the map holds as many as there can be backends.
        let stale: Vec<Endpoint> = map
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| !endpoints.contains_key(k))
            .collect();
        for endpoint in stale {
            remove_if_present(&mut map, "NAT_BACKENDS", &endpoint)?;
        }
        for (endpoint, n) in &endpoints {
            map.insert(endpoint, n, 0)
                .map_err(|source| DataplaneError::Map {
                    name: "NAT_BACKENDS",
                    source,
                })?;
        }
        Ok(())
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

fn uses_maglev(scheduler: u32) -> bool {
    matches!(scheduler, SCHED_MAGLEV | SCHED_SOURCE_IP)
}

/// The pinned flow tables must be this version's (a hash of 48-byte flow
/// entries and an array of 64-byte half-open slots, two per flow) and have
/// the size the config asks for: a map's
/// type and size are fixed when it is created, and adopting keeps the old.
fn check_pinned_tables(sizes: TableSizes, pin_dir: &Path) -> Result<()> {
    let old_version = |map: &'static str, found: String, wanted: &str| DataplaneError::OldVersion {
        map,
        found,
        wanted: wanted.into(),
        pin_dir: pin_dir.to_path_buf(),
    };
    if pin_dir.join("REVERSE_NAT").exists() {
        return Err(old_version(
            "REVERSE_NAT",
            "present (replies in a table of their own)".into(),
            "none (a flow's reply entry lives next to it in CONNTRACK/HALF_OPEN)",
        ));
    }
    // FLOW_CONF carries the data plane's clock since it reads jiffies: the
    // program reads past the end of an older, shorter value.
    let conf = pin_dir.join("FLOW_CONF");
    if conf.exists() {
        let name = "FLOW_CONF";
        let info =
            MapInfo::from_pin(&conf).map_err(|source| DataplaneError::Map { name, source })?;
        let (found, wanted) = (info.value_size() as usize, std::mem::size_of::<FlowConf>());
        if found != wanted {
            return Err(old_version(
                name,
                format!("{found}-byte settings"),
                &format!("{wanted}-byte settings (with the jiffies clock)"),
            ));
        }
    }
    let tables = [
        (
            "CONNTRACK",
            "conntrack-size",
            sizes.conntrack,
            aya::maps::MapType::Hash,
            std::mem::size_of::<Flow>(),
        ),
        (
            "HALF_OPEN",
            "half-open-size",
            sizes.half_open,
            aya::maps::MapType::Array,
            std::mem::size_of::<HalfOpenSlot>(),
        ),
    ];
    for (map, key, configured, kind, entry_size) in tables {
        let path = pin_dir.join(map);
        if !path.exists() {
            continue;
        }
        let info =
            MapInfo::from_pin(&path).map_err(|source| DataplaneError::Map { name: map, source })?;
        let found_kind = info.map_type().ok();
        let value_size = info.value_size() as usize;
        if found_kind != Some(kind) || value_size != entry_size {
            return Err(old_version(
                map,
                format!("a {found_kind:?} of {value_size}-byte entries"),
                &format!("a {kind:?} of {entry_size}-byte entries"),
            ));
        }
        let pinned = info.max_entries() / 2;
        if pinned != configured {
            return Err(DataplaneError::ConntrackSize {
                key,
                configured,
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

/// A lookup's value, `None` for a missing key, or the map's error.
fn found<T>(r: std::result::Result<T, MapError>, name: &'static str) -> Result<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(MapError::KeyNotFound) => Ok(None),
        Err(source) => Err(DataplaneError::Map { name, source }),
    }
}

fn remove_if_present<K: aya::Pod, V: aya::Pod>(
    map: &mut HashMap<&mut MapData, K, V>,
    name: &'static str,
    key: &K,
) -> Result<()> {
    match map.remove(key) {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        // aya reports a delete's ENOENT as the syscall's error.
        Err(MapError::SyscallError(e)) if e.io_error.kind() == std::io::ErrorKind::NotFound => {
            Ok(())
        }
        Err(source) => Err(DataplaneError::Map { name, source }),
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
