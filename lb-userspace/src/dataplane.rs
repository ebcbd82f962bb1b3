//! The data plane from userspace: the `Dataplane` value, its errors, and
//! the rooms its work is split into. It loads the `lb` XDP program, attaches
//! it, and owns every map write. A config is applied as a whole: rings are
//! written into the inactive half of each service's double buffer and then
//! switched with one store, so no packet ever sees half a table.
//!
//! - `load`: loading the object (pinned or not), attaching, teardown;
//! - `adopt`: every pinned map checked against the object, then the ids read
//!   back from a previous agent's maps;
//! - `apply`: a config (its plan) written into the maps;
//! - `handles`: typed handles on the maps, by [`MapName`];
//! - `keys`: map keys and codes from config values;
//! - `plan`, `firewall`: the pure planning of a change;
//! - `read`, `facts`: read-only views (counters, flow table, `lb explain`'s
//!   facts); `sweep`, `half_open`, `batch`: the flow tables' upkeep;
//! - `clock`: the kernel's jiffies measured, for the data plane's clock;
//! - `tunnel`: the IPIP and GUE backends' tunnel slots (outer source, GUE
//!   port).

mod adopt;
mod apply;
mod batch;
mod clock;
mod established;
mod facts;
pub mod firewall;
mod firewall_maps;
mod flows6;
pub mod fullnat;
mod half_open;
mod handles;
mod keys;
mod load;
pub mod plan;
mod probe;
mod read;
pub mod sweep;
mod tunnel;

pub use established::{EstablishedTable, InsertError, Inserted};
pub use facts::{EntryAge, FlowFacts, FlowFacts6, FwFacts, ServiceFacts};
pub use firewall_maps::RuleStats;
pub use flows6::Flows6;
pub use half_open::{HalfOpenTable, LockedSlot, SlotTable};
pub use keys::{protocol_number, raw_endpoint, service_key};
pub use lb_common::map_names::MapName;
pub use plan::Admission;
pub use probe::ServiceRoute;
pub use read::{FlowTable, NeighbourRequests, RingMembers};
pub use sweep::{Sweeper, now_ticks};
pub use tunnel::LearnedPmtu;

use std::path::{Path, PathBuf};

use aya::{
    Ebpf,
    maps::MapError,
    programs::{ProgramError, Xdp, links::LinkError},
};
use lb_common::DEFAULT_HALF_OPEN_SIZE;

use firewall::{FwError, FwIds};
use handles::found;
use load::program_mut;
use plan::{Ids, PlanError, ServicePlan};

use crate::{
    config,
    object::{BadObject, MissingObject},
};

/// The data plane program's name in the object.
pub const PROGRAM: &str = "lb";
/// The path's second stage (lb-ebpf/src/stage.rs): tail-called by `lb`
/// through `STAGES`, never attached.
pub const SETUP_PROGRAM: &str = "lb_setup";
/// The PROXY v2 stage (lb-ebpf/src/proxy.rs): tail-called through `STAGES`
/// for PROXY flows' packets, never attached.
pub const PROXY_PROGRAM: &str = "lb_proxy";
/// IPv6's two stages (`STAGES[STAGE_V6]`, `STAGES[STAGE_V6_SETUP]`):
/// `lb` tail-calls the first with every IPv6 frame.
pub const V6_PROGRAM: &str = "lb_v6";
pub const V6_SETUP_PROGRAM: &str = "lb_v6_setup";
/// IPv6's packets without ports (`STAGES[STAGE_V6_PORTLESS]`): later
/// fragments and ICMPv6 errors, tail-called by `lb_v6`.
pub const V6_PORTLESS_PROGRAM: &str = "lb_v6_portless";
/// IPv6's PROXY v2 stage (`STAGES[STAGE_PROXY6]`), tail-called by `lb_v6`
/// and `lb_v6_setup` for IPv6 PROXY flows' packets.
pub const PROXY6_PROGRAM: &str = "lb_proxy6";

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error(transparent)]
    MissingObject(#[from] MissingObject),
    #[error(transparent)]
    BadObject(#[from] BadObject),
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
    #[error("mapping ESTABLISHED into memory: {0}")]
    Established(std::io::Error),
    #[error("mapping FNAT_CLAIMS into memory: {0}")]
    FnatClaims(std::io::Error),
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

impl TableSizes {
    /// The entries of a map the config sizes (twice its flows: a NAT flow
    /// takes two), `None` for the others (sized by the object).
    pub fn entries(&self, map: MapName) -> Option<u32> {
        let flows = match map {
            MapName::CONNTRACK | MapName::ESTABLISHED | MapName::ESTABLISHED6 => self.conntrack,
            MapName::HALF_OPEN | MapName::HALF_OPEN6 => self.half_open,
            _ => return None,
        };
        Some(flows.saturating_mul(2))
    }
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
    /// The loaded object, for tests and tools that run its programs directly.
    pub fn ebpf(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// The `lb` program (for BPF_PROG_TEST_RUN).
    pub fn program(&mut self) -> Result<&mut Xdp> {
        program_mut(&mut self.ebpf, PROGRAM)
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
