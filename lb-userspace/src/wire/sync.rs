//! Flow sync's part of the status (`lb status`, `/status.json`,
//! `/metrics`): the types only; `crate::sync::stats` fills and renders them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One peer's counts (`lb status`, `/status.json`, `/metrics`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStatus {
    pub peer: String,
    /// Flow records sent to the peer.
    pub flows_sent: u64,
    /// Flow records from the peer inserted (or refreshed, or ended) here.
    pub flows_received: u64,
    /// Flow records whose tuple has a local entry: left as they are.
    pub flows_kept_local: u64,
    /// Of `flows_received`, records with an older peer's wrapped age
    /// (`u32::MAX` ms: a flow it had just seen), inserted as fresh.
    #[serde(default)]
    pub wrapped_ages: u64,
    /// Rejected messages and records, by reason (`bad_tag`, `replayed`,
    /// `unknown_backend`, `table_full`, ...).
    pub rejected: BTreeMap<String, u64>,
    /// Milliseconds since the peer's last accepted message; `None`: none yet.
    pub last_message_age_ms: Option<u64>,
    /// The peer answered this LB's bulk copy request.
    pub bulk_copied: bool,
}

/// Sync as a whole.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncStatus {
    pub listen: String,
    pub peers: Vec<PeerStatus>,
    /// Datagrams from addresses that are not peers, by reason.
    pub rejected_strangers: BTreeMap<String, u64>,
    /// Flow events the data plane lost (its ring buffer was full).
    pub events_lost: u64,
    /// Flows from peers in the table at the last refresh walk.
    pub synced_flows: u64,
    /// How the bulk copy at start ended: "done", "timed out" or "waiting".
    pub bulk: String,
}
