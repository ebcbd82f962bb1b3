//! What the maps hold for one flow, as `Dataplane::flow_facts` reads it:
//! plain data that `lb explain` (`explain/`) turns into text.

use lb_common::{Backend, Flow, FwScope, ServiceConf, ipv6::Addr6};

/// What the maps hold for a flow.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FlowFacts {
    /// The address is in `VIPS`.
    pub vip_known: bool,
    /// `SERVICES[(vip, port, protocol)]` and what goes with it.
    pub service: Option<ServiceFacts>,
    /// `CONNTRACK[key]`, and `BACKENDS[entry.backend_id]`.
    pub conntrack: Option<(Flow, Backend)>,
    /// The firewall scopes a new flow of this client meets: the global one,
    /// then the service's.
    pub firewall: Vec<FwFacts>,
}

/// One firewall scope for the client: its conf and the rules its source
/// matches (by LPM, as the data plane looks them up).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FwFacts {
    /// `FW_GLOBAL` or the service id.
    pub scope: u32,
    pub conf: FwScope,
    /// The deny rule that matches: its text ("deny 203.0.113.0/24") and id.
    pub deny: Option<(String, u32)>,
    /// The allow rule that matches.
    pub allow: Option<(String, u32)>,
    /// An IPv6 client's: the scope's rate-limit bucket mask (`FW_MASKS6`,
    /// with `FW_F_RATE`); `None` for IPv4 (its mask is `conf.mask`).
    pub mask6: Option<Addr6>,
}

/// What the maps hold for a new IPv6 flow (its entry in IPv6's flow
/// tables, if any, is read apart: `Flows6::lookup`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FlowFacts6 {
    /// The address is in `VIPS6`.
    pub vip_known: bool,
    /// `SERVICES6[(vip, port, protocol)]` and what goes with it.
    pub service: Option<ServiceFacts>,
    /// `SOURCE_MASKS6[service]`: what a `source-ip` service keeps of the
    /// client's address before hashing it (zero: none written, the whole
    /// address).
    pub source_mask: Addr6,
    /// The firewall scopes a new flow of this client meets: the global
    /// one, then the service's.
    pub firewall: Vec<FwFacts>,
}

/// One service as the maps hold it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceFacts {
    pub id: u32,
    pub conf: ServiceConf,
    /// The active half of the ring: backend ids, one per slot.
    pub ring: Vec<u32>,
    /// `RR_COUNTERS[id]`: the next round-robin position.
    pub rr_counter: u64,
    /// The active half of the Maglev table (`maglev`, `source-ip`; else
    /// empty): backend ids, one per slot.
    pub maglev: Vec<u32>,
}
