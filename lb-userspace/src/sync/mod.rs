//! Flow-state sync between LBs (issue 27; docs/architecture.md, "Flow
//! sync"). The data plane reports flows that became established and
//! established entries that ended (`SYNC_EVENTS`, lb_common::sync); this
//! agent side turns them into records naming services and backends by
//! address, batches them every 10 ms into authenticated messages
//! (`wire`) for its peers, and inserts what its peers send into its own
//! table (`insert`), marked as synced. Every few seconds it also walks its
//! table and sends a refresh of the flows active here, so a flow that
//! carries no packet through a peer does not expire there; a starting
//! agent asks its peers for a bulk copy of their flows before it says
//! `lb: ready`.
//!
//! - `wire`: the message format, its authentication and replay guard (pure);
//! - `insert`: the one place a synced flow is written into the table;
//! - `directory`: services and backends by id and by address, from the maps;
//! - `stats`: what `lb status` and `/metrics` show;
//! - `run`: the sync thread (socket, ring buffer, timers).

mod directory;
pub mod insert;
mod keys;
mod run;
pub mod stats;
pub mod wire;

pub use directory::Directory;
pub use run::{Applied, Bulk, FlowEvent, SyncMaps, apply, record_of, start};
pub use stats::{PeerStatus, Stats, SyncStatus};
