//! What `lb status` (and `/status.json`) reports of a running agent: its
//! services and backends, conntrack, runtime changes; and the ring rule
//! checked against it ([`ring_violations`]). Types only, no I/O.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{AnnounceStatus, PoolStatus};
use crate::config::{Forwarding, Protocol, Scheduler};

/// What an operator set with `lb backend` (kept in the state file until
/// `lb backend enable` or `lb backend reset`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, strum::Display, strum::IntoStaticStr,
)]
#[serde(rename_all = "kebab-case")]
#[strum(serialize_all = "kebab-case")]
pub enum AdminState {
    Enabled,
    Drain,
    Disabled,
}

/// A backend's health as `lb status` shows it: its checks' verdict, or
/// `unchecked` for a backend without a check (always serving).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, strum::Display, strum::IntoStaticStr,
)]
#[serde(rename_all = "kebab-case")]
#[strum(serialize_all = "kebab-case")]
pub enum HealthStatus {
    Up,
    Down,
    Pending,
    Unchecked,
}

/// A pool member's place in one of its pool's services (`[[pool]]`): the
/// service routes to it, or it stands by — a healthy replica under the
/// write service, the primary under the read service — which is normal
/// operation, not a failure.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, strum::Display, strum::IntoStaticStr,
)]
#[serde(rename_all = "kebab-case")]
#[strum(serialize_all = "kebab-case")]
pub enum PoolRole {
    Routed,
    Standby,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub config: String,
    /// The bpffs directory holding the pinned data plane.
    pub pin_dir: Option<String>,
    /// True when this agent adopted a data plane left by a previous one.
    pub adopted: bool,
    pub interfaces: Vec<String>,
    pub services: Vec<ServiceStatus>,
    /// Packets per verdict of the XDP program, since it was first loaded.
    pub verdicts: BTreeMap<String, u64>,
    /// The agent itself: version, config generation, last reload.
    #[serde(default)]
    pub agent: AgentStatus,
    /// How full the connection table is.
    #[serde(default)]
    pub conntrack: ConntrackStatus,
    /// Database pools: members, roles, lag, where writes and reads go.
    #[serde(default)]
    pub pools: Vec<PoolStatus>,
    /// `[announce]`: which VIPs this LB announces and what BIRD reports;
    /// `None` without `[announce]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub announce: Option<AnnounceStatus>,
    /// Runtime changes (`lb backend …`, `lb firewall …`) kept in the state
    /// file and applied over the config.
    #[serde(default)]
    pub runtime: RuntimeStatus,
    /// `[sync]`: flow-state sync with the peer LBs, per peer; `None`
    /// without `[sync]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync: Option<super::sync::SyncStatus>,
    /// Full NAT's source addresses and their ports in use; `None` while no
    /// service is full NAT.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub full_nat: Option<FullNatStatus>,
}

/// Full NAT (issue 25) as `lb status` shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FullNatStatus {
    /// The allocated ports' range (`source-ports`), inclusive.
    pub port_lo: u16,
    pub port_hi: u16,
    /// Each source address in `FNAT_CONF`, with its claims.
    pub sources: Vec<FullNatSource>,
    /// New full-NAT flows refused because none of their candidate
    /// (address, port) pairs was free: the `drop_fnat_exhausted` verdict.
    /// One count for all addresses: a refused flow tried up to 8
    /// candidates, possibly on several addresses, and the data plane keeps
    /// no per-address counter for it.
    pub allocation_failures: u64,
}

/// One full-NAT source address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FullNatSource {
    pub address: String,
    /// Claims in `FNAT_CLAIMS` on this address: (port, backend endpoint)
    /// pairs held by live flows or in quarantine (and stale claims until
    /// the sweep removes them), counted with the flows, off the agent's
    /// loop.
    pub ports_in_use: u64,
    /// Of those, the pairs in quarantine (`[dataplane]
    /// source-port-quarantine`): freed by an ended flow, not yet given out
    /// again toward their backend.
    #[serde(default)]
    pub quarantined: u64,
}

/// The runtime changes that outlive the agent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeStatus {
    /// The state file.
    pub file: String,
    /// One line per change (`lb backend reset` drops a service's).
    pub changes: Vec<String>,
    /// The last failure to read, apply or write the state file.
    pub error: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentStatus {
    /// The `lb` version running.
    pub version: String,
    /// When this agent started, in milliseconds since the Unix epoch.
    pub started_at_ms: u64,
    /// Config generation: 1 at start, one more for every reload or
    /// `lb backend` change that was applied.
    pub generation: u64,
    /// The latest reload (SIGHUP or `lb reload`), if any.
    pub last_reload: Option<ReloadStatus>,
    /// Health probes that could not run for a reason of the agent's own
    /// (out of descriptors, buffers, memory) since it started: the agent's
    /// errors, never counted against a backend.
    #[serde(default)]
    pub probe_agent_errors: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadStatus {
    pub ok: bool,
    /// When it happened, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// "reloaded FILE" or why it was rejected.
    pub message: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConntrackStatus {
    /// Flows in the connection table (counted with the flows per backend),
    /// both families.
    pub entries: u64,
    /// Of those, IPv6 flows (`ESTABLISHED6`, `HALF_OPEN6`).
    #[serde(default)]
    pub entries_v6: u64,
    /// Its size (`conntrack-size`).
    pub capacity: u32,
    /// The half-open table's size (`half-open-size`).
    #[serde(default)]
    pub half_open_capacity: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub name: String,
    pub vip: String,
    pub protocol: Protocol,
    pub forwarding: Forwarding,
    pub scheduler: Scheduler,
    pub packets: u64,
    pub bytes: u64,
    pub backends: Vec<BackendStatus>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendStatus {
    pub name: String,
    pub address: String,
    pub weight: u32,
    pub backup: bool,
    /// Set with `lb backend`.
    pub admin: AdminState,
    /// From the health checks; for a pool's member, whether it answers its
    /// MySQL check (its role decides the ring, see `pool_role`).
    pub health: HealthStatus,
    /// A pool service's member: routed or standing by for this service.
    /// `None` for a backend of an ordinary service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool_role: Option<PoolRole>,
    /// Result of the last health check, if any.
    pub last_check: Option<String>,
    /// When the last health check finished (ms since the Unix epoch).
    #[serde(default)]
    pub last_check_at_ms: Option<u64>,
    /// How long the last health check took, in microseconds.
    #[serde(default)]
    pub last_check_us: Option<u64>,
    /// Whether new flows can go to it now.
    pub in_ring: bool,
    /// Flows pinned to it in the flow tables (established and half-open,
    /// closing included, until they expire).
    pub flows: u64,
    /// Established flows that have not closed (no FIN/RST, not expired):
    /// exact, kept by the data plane. A drain is done when it is 0.
    #[serde(default)]
    pub active: u64,
    pub packets: u64,
    pub bytes: u64,
    /// What runtime changes set on it (e.g. "drain", "weight 5 (file: 1)"),
    /// kept in the state file; `None`: it runs as the config file says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<String>,
    /// Its `max-connections` (its own or the service's); `None`: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// Holding its `max-connections` active flows: out of the ring for new
    /// flows until it is below.
    #[serde(default)]
    pub at_limit: bool,
    /// Slow start: while it ramps, its effective weight as a percentage of
    /// `weight`; `None`: full weight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slow_start_percent: Option<u32>,
    /// `check = "tls"`: when its certificate expires (seconds since the
    /// Unix epoch), as of the last passed probe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_cert_expiry: Option<i64>,
}

impl BackendStatus {
    /// The weight the rings give it now: `weight`, or less while slow
    /// start ramps it.
    pub fn effective_weight(&self) -> f64 {
        f64::from(self.weight) * f64::from(self.slow_start_percent.unwrap_or(100)) / 100.0
    }
}

impl BackendStatus {
    /// What `lb status` and the status page show as its role: a pool
    /// member's place in this service (`routed`, `standby`), else
    /// `primary` or `backup`.
    pub fn role(&self) -> &'static str {
        match self.pool_role {
            Some(role) => role.into(),
            None if self.backup => "backup",
            None => "primary",
        }
    }
}

/// The ring rule, checked against a status: a backend is in its service's
/// ring if and only if it is enabled, up (or unchecked) — a pool's member:
/// routed — has a weight, is below its `max-connections`, and is a primary
/// — or a backup while no primary qualifies. Returns one line per backend
/// that breaks it (empty: the rings are derived from state).
pub fn ring_violations(status: &Status) -> Vec<String> {
    let mut out = Vec::new();
    for s in &status.services {
        let eligible = |b: &BackendStatus| {
            let serving = match b.pool_role {
                Some(role) => role == PoolRole::Routed,
                None => matches!(b.health, HealthStatus::Up | HealthStatus::Unchecked),
            };
            b.admin == AdminState::Enabled && serving && b.weight > 0 && !b.at_limit
        };
        let any_primary = s.backends.iter().any(|b| !b.backup && eligible(b));
        for b in &s.backends {
            let expected = eligible(b) && b.backup != any_primary;
            if b.in_ring != expected {
                out.push(format!(
                    "{}/{}: in ring {} but admin {}, health {}, weight {}, {}{}",
                    s.name,
                    b.name,
                    b.in_ring,
                    b.admin,
                    b.health,
                    b.weight,
                    b.role(),
                    if b.at_limit {
                        ", at max-connections"
                    } else {
                        ""
                    }
                ));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_rule_flags_stale_rings() {
        use HealthStatus::{Down, Pending, Unchecked, Up};
        let backend = |name: &str, backup: bool, health, in_ring: bool| BackendStatus {
            name: name.into(),
            address: "198.19.0.11:80".into(),
            weight: 1,
            backup,
            admin: AdminState::Enabled,
            health,
            pool_role: None,
            last_check: None,
            last_check_at_ms: None,
            last_check_us: None,
            in_ring,
            flows: 0,
            active: 0,
            packets: 0,
            bytes: 0,
            runtime: None,
            max_connections: None,
            at_limit: false,
            slow_start_percent: None,
            tls_cert_expiry: None,
        };
        let status = |backends| Status {
            config: String::new(),
            pin_dir: None,
            adopted: false,
            interfaces: Vec::new(),
            services: vec![ServiceStatus {
                name: "www".into(),
                vip: String::new(),
                protocol: Protocol::Tcp,
                forwarding: Forwarding::Nat,
                scheduler: Scheduler::RoundRobin,
                packets: 0,
                bytes: 0,
                backends,
            }],
            verdicts: BTreeMap::new(),
            agent: AgentStatus::default(),
            conntrack: ConntrackStatus::default(),
            pools: Vec::new(),
            announce: None,
            sync: None,
            runtime: RuntimeStatus::default(),
            full_nat: None,
        };
        // Up but out of the ring (issue 8's stranded backend): flagged.
        let stranded = status(vec![
            backend("web1", false, Up, true),
            backend("web2", false, Up, false),
        ]);
        assert_eq!(ring_violations(&stranded).len(), 1);
        // Backups only while no primary qualifies.
        let fine = status(vec![
            backend("web1", false, Down, false),
            backend("web2", false, Pending, false),
            backend("web3", true, Up, true),
        ]);
        assert_eq!(ring_violations(&fine), Vec::<String>::new());
        let backup_too_early = status(vec![
            backend("web1", false, Unchecked, true),
            backend("web3", true, Up, true),
        ]);
        assert_eq!(ring_violations(&backup_too_early).len(), 1);
        // A pool's members: the role decides the ring, not the health. A
        // healthy standby out of the ring is normal; a routed member out of
        // it, or a standby in it, is not.
        let member = |name: &str, role, in_ring: bool| BackendStatus {
            pool_role: Some(role),
            ..backend(name, false, Up, in_ring)
        };
        let pool = status(vec![
            member("db1", PoolRole::Routed, true),
            member("db2", PoolRole::Standby, false),
        ]);
        assert_eq!(ring_violations(&pool), Vec::<String>::new());
        let stale = status(vec![
            member("db1", PoolRole::Routed, false),
            member("db2", PoolRole::Standby, true),
        ]);
        assert_eq!(ring_violations(&stale).len(), 2);
    }
}
