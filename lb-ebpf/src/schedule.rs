//! The scheduling stage of the packet path (step 4, and the SYN that
//! reschedules in step 2): a new flow's backend is one table lookup.
//!
//! | scheduler                     | table                  | index                     |
//! |-------------------------------|------------------------|---------------------------|
//! | round robin, weighted RR, least connections | `RINGS` half | atomic per-service counter |
//! | flow-hash                     | `RINGS` half           | 5-tuple hash % len        |
//! | maglev                        | `MAGLEV` half          | 5-tuple hash % len        |
//! | source-ip                     | `MAGLEV` half          | client address hash % len |
//!
//! An IPv6 `source-ip` service may hash its clients' prefix rather than
//! their whole address (`source-ip-prefix = 64`), so a
//! client rotating addresses within its /64 keeps its backend
//! (`SOURCE_MASKS6`).
//!
//! The agent builds every table (docs/architecture.md); both are
//! double-buffered per service, and `ServiceConf::active_ring` picks the half.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap},
};
use lb_common::{
    FlowKey, MAGLEV_MAX, MAX_MAGLEV_SERVICES, MAX_RING, MAX_SERVICES, MaglevTable, Ring,
    SCHED_HASH, SCHED_MAGLEV, SCHED_SOURCE_IP, ServiceConf, Verdict,
    hash::{flow_hash, source_hash},
    ipv6::Addr6,
};

use crate::verdict::{Outcome, drop};

/// Service id * 2 + half → ring of backend ids (double buffer). Agent.
#[map]
static RINGS: Array<Ring> = Array::with_max_entries(MAX_SERVICES * 2, 0);
/// Service id → round-robin position. Written by this program only.
#[map]
static RR_COUNTERS: Array<u64> = Array::with_max_entries(MAX_SERVICES, 0);
/// Service id * 2 + half → Maglev table (`maglev`, `source-ip` services
/// only; 256 KiB each). Agent.
#[map]
static MAGLEV: HashMap<u32, MaglevTable> = HashMap::with_max_entries(MAX_MAGLEV_SERVICES * 2, 0);

/// Service id → the mask an IPv6 `source-ip` service applies to its
/// clients' addresses before hashing them (network-order words: a /64's
/// for `source-ip-prefix = 64`, all ones for the whole address). Agent.
/// A mask, not a length: four ANDs, where a length would branch per word
/// and multiply the verifier's states.
#[map]
static SOURCE_MASKS6: Array<Addr6> = Array::with_max_entries(MAX_SERVICES, 0);

/// An IPv6 client's address as a `source-ip` service hashes it: masked
/// to the service's prefix (the whole address when no mask is written:
/// config never asks for /0).
#[inline(always)]
pub fn source_key6(service_id: u32, saddr: &Addr6) -> Addr6 {
    match SOURCE_MASKS6.get(service_id) {
        Some(m) if m[0] != 0 => [
            saddr[0] & m[0],
            saddr[1] & m[1],
            saddr[2] & m[2],
            saddr[3] & m[3],
        ],
        _ => *saddr,
    }
}

/// Picks a new flow's backend in its service's active table half.
#[inline(always)]
pub fn schedule(key: &FlowKey, service_id: u32, conf: &ServiceConf) -> Result<u32, Outcome> {
    pick(
        service_id,
        conf,
        || flow_hash(key),
        || source_hash(key.saddr),
    )
}

/// [`schedule`] for any family: its flow hash and source hash, each
/// computed only by the schedulers that read it.
#[inline(always)]
pub fn pick(
    service_id: u32,
    conf: &ServiceConf,
    flow_hash: impl FnOnce() -> u32,
    source_hash: impl FnOnce() -> u32,
) -> Result<u32, Outcome> {
    match conf.scheduler {
        SCHED_MAGLEV => from_maglev(flow_hash(), service_id, conf),
        SCHED_SOURCE_IP => from_maglev(source_hash(), service_id, conf),
        _ => from_ring(flow_hash, service_id, conf),
    }
}

/// The Maglev table's slot for `hash`.
#[inline(always)]
fn from_maglev(hash: u32, service_id: u32, conf: &ServiceConf) -> Result<u32, Outcome> {
    // SAFETY: a MAGLEV value; the agent replaces a half only while it is
    // inactive, and a hash map update swaps the element whole.
    let Some(table) = (unsafe { MAGLEV.get(&Ring::slot(service_id, conf.active_ring)) }) else {
        return Err(drop(Verdict::DropNoBackend));
    };
    let len = table.len;
    if len == 0 {
        return Err(drop(Verdict::DropNoBackend));
    }
    // black_box keeps the bound check the verifier needs: LLVM would drop
    // it, not knowing that len <= MAGLEV_MAX.
    let index = core::hint::black_box((hash % len) as usize);
    if index >= MAGLEV_MAX {
        return Err(drop(Verdict::DropNoBackend));
    }
    match table.ids.get(index) {
        Some(&id) => Ok(id),
        None => Err(drop(Verdict::DropNoBackend)),
    }
}

/// The ring's slot: by a shared atomic counter (round robin, exact across
/// CPUs) or by the flow hash (`flow-hash`).
#[inline(always)]
fn from_ring(
    flow_hash: impl FnOnce() -> u32,
    service_id: u32,
    conf: &ServiceConf,
) -> Result<u32, Outcome> {
    let Some(ring) = RINGS.get(Ring::slot(service_id, conf.active_ring)) else {
        return Err(drop(Verdict::DropNoBackend));
    };
    let len = ring.len;
    if len == 0 || len as usize > MAX_RING {
        return Err(drop(Verdict::DropNoBackend));
    }
    // BPF has 64-bit atomics only: the counter is a u64.
    let position = if conf.scheduler == SCHED_HASH {
        u64::from(flow_hash())
    } else {
        let Some(counter) = RR_COUNTERS.get_ptr_mut(service_id) else {
            return Err(drop(Verdict::DropNoBackend));
        };
        // SeqCst, not Relaxed: LLVM's BPF backend lowers a relaxed fetch-add
        // to the legacy non-fetching `lock +=`, losing the old value.
        // SAFETY: a valid, aligned u64 in an array map value.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(counter, 1) }
    };
    // index < len <= MAX_RING already; the mask (MAX_RING is a power of two)
    // changes nothing but gives the verifier a bound it can see. black_box
    // stops LLVM from proving the mask redundant and removing it.
    let index = core::hint::black_box((position % u64::from(len)) as usize) & (MAX_RING - 1);
    match ring.ids.get(index) {
        Some(&id) => Ok(id),
        None => Err(drop(Verdict::DropNoBackend)),
    }
}
