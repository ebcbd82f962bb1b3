//! Which backend the data plane's scheduler picks for a new flow, as a model
//! of `lb-ebpf/src/schedule.rs` over the facts read from the maps.

use lb_common::{
    FlowKey, SCHED_HASH, SCHED_MAGLEV, SCHED_SOURCE_IP,
    hash::{flow_hash, source_hash},
};

use super::ServiceFacts;

/// How the data plane picks a new flow's backend for this service, as a
/// model of `lb-ebpf/src/schedule.rs` (the kernel tier compares the two).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Choice {
    /// Which hash was taken (none for the counter schedulers).
    pub hash: Option<u32>,
    /// The slot and the table's length.
    pub slot: u64,
    pub len: u64,
    pub backend_id: u32,
}

/// The backend a new flow with `key` gets now: for the hash schedulers the
/// one it always gets while the table stays; for the counter ones the
/// service's next new flow's. `None`: the table is empty (drop_no_backend).
pub fn choose(key: &FlowKey, service: &ServiceFacts) -> Option<Choice> {
    let (hash, table, position) = match service.conf.scheduler {
        SCHED_MAGLEV => {
            let h = flow_hash(key);
            (Some(h), &service.maglev, u64::from(h))
        }
        SCHED_SOURCE_IP => {
            let h = source_hash(key.saddr);
            (Some(h), &service.maglev, u64::from(h))
        }
        SCHED_HASH => {
            let h = flow_hash(key);
            (Some(h), &service.ring, u64::from(h))
        }
        _ => (None, &service.ring, service.rr_counter),
    };
    let len = table.len() as u64;
    if len == 0 {
        return None;
    }
    let slot = position % len;
    Some(Choice {
        hash,
        slot,
        len,
        backend_id: table[slot as usize],
    })
}
