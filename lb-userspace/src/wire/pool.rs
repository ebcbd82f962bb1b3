//! The database pools' part of the status (`[[pool]]`): members, their
//! roles and replication, where writes and reads go, coordination. Built
//! by `db`, shown by `lb status`, the status page and `/metrics`.

use serde::{Deserialize, Serialize};

use super::HealthStatus;

/// A member's role as the pool sees it.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, strum::Display, strum::IntoStaticStr,
)]
#[serde(rename_all = "kebab-case")]
#[strum(serialize_all = "kebab-case")]
pub enum Role {
    /// The write service routes to it.
    Primary,
    /// Read-only: a replica (replicating or not).
    Replica,
    /// Writable beside the primary: refused, being fenced.
    SecondWriter,
    /// Writable, but no writer could be chosen (or it is not checked yet).
    Writable,
    /// Not reachable (or never checked).
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolStatus {
    pub name: String,
    pub write_service: String,
    pub write_vip: String,
    pub read_service: String,
    pub read_vip: String,
    /// The member the pool considers primary (even while it is down).
    pub primary: Option<String>,
    /// Where writes go now.
    pub writer: Option<String>,
    /// Where reads go now.
    pub readers: Vec<String>,
    /// Second writers refused so far.
    pub conflicts: u64,
    pub max_lag_ms: u64,
    pub auto_failover_ms: Option<u64>,
    pub promoting: bool,
    pub last_event: Option<String>,
    pub members: Vec<MemberStatus>,
    /// `[coordination]`: the pool's leader and recorded primary.
    #[serde(default)]
    pub coordination: Option<CoordStatus>,
}

/// A pool's coordination as this LB sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoordStatus {
    /// This LB's name.
    pub me: String,
    /// The LB holding the pool's lease (as last seen).
    pub leader: Option<String>,
    /// This LB leads the pool now.
    pub leading: bool,
    /// How long the current leader has held the lease (seen from here).
    pub lease_age_ms: Option<u64>,
    pub recorded_primary: Option<String>,
    /// etcd's revision of that record.
    pub revision: Option<i64>,
    /// Why the latest round with etcd failed (`None`: it answered).
    pub etcd_error: Option<String>,
    /// Since etcd last answered.
    pub etcd_silent_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberStatus {
    pub name: String,
    pub address: String,
    /// Reachable (login works), with rise and fall.
    pub health: HealthStatus,
    pub role: Role,
    pub read_only: Option<bool>,
    pub server_id: Option<u64>,
    pub replication: Option<Replication>,
    /// `Seconds_Behind_Master` of a replica.
    pub lag_seconds: Option<u64>,
    /// The services routing to it now (the write and/or read service).
    pub routed_by: Vec<String>,
    pub last_check: Option<String>,
    /// `auto-rejoin`: what was found or done when it came back.
    pub rejoin: Option<String>,
    /// Transactions it holds that the primary lacks (kept out), if found.
    pub errant_gtids: Option<String>,
}

/// A replica's replication, from `SHOW SLAVE STATUS`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replication {
    /// The primary it replicates from.
    pub source: String,
    /// `Slave_IO_Running`: "Yes", "No" or "Connecting".
    pub io_running: String,
    /// `Slave_SQL_Running` is "Yes".
    pub sql_running: bool,
    /// `Seconds_Behind_Master`; `None` while a thread is not running.
    pub lag_seconds: Option<u64>,
    /// `Gtid_IO_Pos`: the last transaction received from the primary.
    pub gtid_io_pos: String,
    /// The last IO or SQL error, if any.
    pub error: Option<String>,
}
