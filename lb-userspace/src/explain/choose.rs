//! Which backend the data plane's scheduler picks for a new flow, as a model
//! of `lb-ebpf/src/schedule.rs` over the facts read from the maps.

use lb_common::{
    FlowKey, SCHED_HASH, SCHED_MAGLEV, SCHED_SOURCE_IP,
    hash::{flow_hash, flow_hash6, source_hash, source_hash6},
    ipv6::Addr6,
    maps6::FlowKey6,
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
    pick(service, || flow_hash(key), || source_hash(key.saddr))
}

/// [`choose`] for an IPv6 flow: its flow hash, and for `source-ip` the
/// hash of the client's address masked by `source_mask` (the service's
/// `SOURCE_MASKS6` entry, as `schedule::source_key6` applies it: none
/// written, the whole address).
pub fn choose6(key: &FlowKey6, source_mask: &Addr6, service: &ServiceFacts) -> Option<Choice> {
    pick(
        service,
        || flow_hash6(key),
        || source_hash6(&source_key6(&key.saddr, source_mask), 128),
    )
}

/// An IPv6 client's address as a `source-ip` service hashes it
/// (`schedule::source_key6`).
pub fn source_key6(saddr: &Addr6, mask: &Addr6) -> Addr6 {
    if mask[0] == 0 {
        return *saddr;
    }
    std::array::from_fn(|i| saddr[i] & mask[i])
}

/// `schedule::pick` for either family: the table and position each
/// scheduler reads, each hash computed only by the schedulers that read it.
fn pick(
    service: &ServiceFacts,
    flow_hash: impl FnOnce() -> u32,
    source_hash: impl FnOnce() -> u32,
) -> Option<Choice> {
    let (hash, table, position) = match service.conf.scheduler {
        SCHED_MAGLEV => {
            let h = flow_hash();
            (Some(h), &service.maglev, u64::from(h))
        }
        SCHED_SOURCE_IP => {
            let h = source_hash();
            (Some(h), &service.maglev, u64::from(h))
        }
        SCHED_HASH => {
            let h = flow_hash();
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
