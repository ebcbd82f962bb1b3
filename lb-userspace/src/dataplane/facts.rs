//! What the maps hold for one flow, as `Dataplane::flow_facts` reads it:
//! plain data that `lb explain` (`explain/`) turns into text.

use lb_common::{
    Backend, Flow, FlowConf, FwScope, ServiceConf,
    flow::{Timeout, idle_ticks, is_expired, timeout_for},
    ipv6::Addr6,
};

/// What the maps hold for a flow.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FlowFacts {
    /// The address is in `VIPS`.
    pub vip_known: bool,
    /// `SERVICES[(vip, port, protocol)]` and what goes with it.
    pub service: Option<ServiceFacts>,
    /// The flow's entry (`ESTABLISHED`, `CONNTRACK`, `HALF_OPEN`), and
    /// `BACKENDS[entry.backend_id]`.
    pub conntrack: Option<(Flow, Backend)>,
    /// That entry's idle time against its timeout at the agent's clock.
    pub age: Option<EntryAge>,
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

/// A flow entry's idle time against its timeout at the agent's clock, and
/// whether the data plane's lookup would still take it: an expired entry
/// is a miss (removed by that packet, or by the sweep) unless it is a NAT
/// flow's whose other direction is within its timeout (`other_is_live`,
/// `pair_is_live` in the data plane; the sweep's pair rule).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryAge {
    /// Ticks since the entry's last packet, read signed
    /// (`flow::idle_ticks`): the data plane's clock may stamp an entry a
    /// tick after the agent's `now`, which is idle 0, not 2^32 − 1.
    pub idle: u32,
    /// The timeout its protocol and state take.
    pub timeout: Timeout,
    /// That timeout in ticks (`FLOW_CONF`; 0: not written yet, nothing
    /// expires).
    pub timeout_ticks: u32,
    /// Idle past its timeout (`flow::is_expired`).
    pub expired: bool,
    /// A NAT flow's other direction is within its timeout.
    pub pair_live: bool,
}

impl EntryAge {
    /// `flow`'s age at `now` (ticks) under `conf`'s timeouts; `pair`: a
    /// NAT flow's entry for the other direction, if the table holds one.
    pub fn of(
        conf: &FlowConf,
        protocol: u8,
        flow: &Flow,
        pair: Option<&Flow>,
        now: u32,
    ) -> EntryAge {
        let timeout = timeout_for(protocol, flow.state);
        EntryAge {
            idle: idle_ticks(flow.seen, now),
            timeout,
            timeout_ticks: conf.timeouts[timeout as usize],
            expired: is_expired(conf, protocol, flow, now),
            pair_live: pair.is_some_and(|p| !is_expired(conf, protocol, p, now)),
        }
    }

    /// The flow's next packet misses the entry: it is a new flow.
    pub fn is_miss(&self) -> bool {
        self.expired && !self.pair_live
    }
}
