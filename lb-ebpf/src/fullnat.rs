//! Full NAT (issue 25; docs/architecture.md "Full NAT"): a new flow's
//! (source address, port) claimed in `FNAT_REPLIES`, the reply's way back
//! to its flow's slot through that claim, and the claim's release with the
//! flow. The pure rules (candidates, staleness, rewrites) are
//! `lb_common::fullnat`; the flow lives in the usual tables (`flows.rs`,
//! `established.rs`), marked `FLOW_F_FULL_NAT`, with its source address
//! and port in its forward entry's `vip`/`vport`.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap},
};
use core::{
    intrinsics::{AtomicOrdering::SeqCst, atomic_cxchg},
    ptr::read_volatile,
};
use lb_common::{
    EstablishedSlot, FLOW_F_FULL_NAT, FNAT_REPLIES_SIZE, Flow, FlowConf, FlowKey, FnatClaim,
    FnatConf, HalfOpenSlot, NextHop, Verdict,
    flow::{FORWARD, REPLY},
    fullnat::{FNAT_TRIES, candidate, flow_seed, is_source, reclaimable, reply_tuple},
};

use crate::{
    BACKENDS, established, flows,
    flows::{copy_key, same_key, write_words},
    verdict::{Outcome, drop},
};

const BPF_NOEXIST: u64 = 1;
const BPF_F_NO_PREALLOC: u32 = 1;

/// Full NAT's source addresses and port range. Written by the agent.
#[map]
pub(crate) static FNAT_CONF: Array<FnatConf> = Array::with_max_entries(1, 0);
/// A full-NAT flow's reply tuple (backend → source address:port, as it
/// arrives) → its claim (the flow's forward key). Inserted with
/// `BPF_NOEXIST`: the insert is the allocation. Entries are allocated as
/// flows come (no prealloc: an idle LB holds none).
#[map]
pub(crate) static FNAT_REPLIES: HashMap<FlowKey, FnatClaim> =
    HashMap::with_max_entries(FNAT_REPLIES_SIZE, BPF_F_NO_PREALLOC);

#[inline(always)]
fn conf() -> Option<&'static FnatConf> {
    FNAT_CONF.get(0)
}

/// Step 4 for a full-NAT service: claims a (source address, port) toward
/// the backend and enters the flow in `HALF_OPEN` with it. No free
/// candidate: `DropFnatExhausted`, nothing created.
///
/// The tries are plain `BPF_NOEXIST` inserts (one branch each: the
/// verifier walks the loop once per try, and a richer body per try made
/// the program too large to verify); only when every candidate is held is
/// the first one looked at, and taken over if its claim is this flow's own
/// (a SYN whose half-open slot was lost) or stale.
#[inline(always)]
pub(crate) fn create(
    key: &FlowKey,
    service_id: u32,
    backend_id: u32,
    state: u32,
    now: u32,
) -> Result<Flow, Outcome> {
    let exhausted = drop(Verdict::DropFnatExhausted);
    let (Some(fnat), Some(flow_conf), Some(backend)) =
        (conf(), flows::conf(), BACKENDS.get(backend_id))
    else {
        return Err(exhausted);
    };
    let hash = flow_seed(key, flow_conf.half_open_seed);
    let endpoint = (backend.addr, backend.port);
    let fresh = FnatClaim {
        forward: *key,
        claimed: now,
        _pad: 0,
    };
    let Some(first) = candidate(fnat, hash, 0) else {
        return Err(exhausted);
    };
    let mut given = None;
    for attempt in 0..FNAT_TRIES {
        let source = candidate(fnat, hash, attempt).unwrap_or(first);
        let tuple = reply_tuple(endpoint, source, key.protocol);
        if FNAT_REPLIES.insert(&tuple, &fresh, BPF_NOEXIST).is_ok() {
            given = Some(source);
            break;
        }
    }
    let source = match given {
        Some(source) => source,
        None if take_over(
            flow_conf,
            &reply_tuple(endpoint, first, key.protocol),
            key,
            now,
        ) =>
        {
            first
        }
        None => return Err(exhausted),
    };
    let flow = Flow {
        backend_id,
        service_id,
        state,
        seen: now,
        vip: source.0,
        vport: source.1,
        direction: FORWARD,
        flags: FLOW_F_FULL_NAT,
        next_hop: NextHop::default(),
        seq: 0,
    };
    flows::write_slot(flow_conf, key, &flow);
    Ok(flow)
}

/// Takes `tuple`'s claim for the flow whose forward key is `forward` if
/// the claim is that flow's own, or stale (`reclaimable`), by a
/// compare-and-swap of its tick (two CPUs cannot both take it).
#[inline(always)]
fn take_over(conf: &FlowConf, tuple: &FlowKey, forward: &FlowKey, now: u32) -> bool {
    let Some(held) = FNAT_REPLIES.get_ptr_mut(tuple) else {
        return false;
    };
    // SAFETY: a map value; stays readable while the program runs.
    unsafe {
        if same_key(&raw const (*held).forward, forward) {
            return true;
        }
        let found = FnatClaim {
            forward: copy_key(&raw const (*held).forward),
            claimed: read_volatile(&raw const (*held).claimed),
            _pad: 0,
        };
        if !reclaimable(&found, now, present(conf, &found.forward)) {
            return false;
        }
        let (_, won) = atomic_cxchg::<u32, { SeqCst }, { SeqCst }>(
            &raw mut (*held).claimed,
            found.claimed,
            now,
        );
        if won {
            write_words(&raw mut (*held).forward, forward);
        }
        won
    }
}

/// Is the flow whose forward key is `forward` in either flow table?
#[inline(always)]
fn present(conf: &FlowConf, forward: &FlowKey) -> bool {
    established::slot_of(conf, forward).is_some()
        || flows::forward_of_bucket(conf, forward).is_some()
}

/// The forward key of a full-NAT reply tuple's flow, by its claim.
#[inline(always)]
fn claimed_forward(key: &FlowKey) -> Option<FlowKey> {
    let held = FNAT_REPLIES.get_ptr(key)?;
    // SAFETY: a map value (a claim taken over under us is read stale at
    // worst: the slot checks below then miss).
    Some(unsafe { copy_key(&raw const (*held).forward) })
}

/// Is `key` addressed to a source address (so it may be a full-NAT reply)?
/// A compare per configured address; none while full NAT is unused.
#[inline(always)]
fn to_source(key: &FlowKey) -> bool {
    conf().is_some_and(|c| c.count != 0 && is_source(c, key.daddr))
}

/// Step 2 for a full-NAT reply (backend → source address:port): its
/// established flow's slot and reply entry, found through its claim.
#[inline(always)]
pub(crate) fn established_reply(
    conf: &FlowConf,
    key: &FlowKey,
) -> Option<(*mut EstablishedSlot, *mut Flow)> {
    if !to_source(key) {
        return None;
    }
    let forward = claimed_forward(key)?;
    let slot = established::slot_of(conf, &forward)?;
    // SAFETY: a valid array map value; racy reads of its own flow's words
    // (the slot's key matched under its sequence in `slot_of`).
    unsafe {
        let entry = &raw mut (*slot).forward;
        if read_volatile(&raw const (*entry).flags) & FLOW_F_FULL_NAT == 0
            || read_volatile(&raw const (*entry).vip) != key.daddr
            || read_volatile(&raw const (*entry).vport) != key.dport
        {
            return None;
        }
        Some((slot, &raw mut (*slot).reply))
    }
}

/// Step 2 for a full-NAT reply to a half-open flow: a copy of its reply
/// entry (the VIP its source becomes) and the flow's slot.
#[inline(always)]
pub(crate) fn half_open_reply(conf: &FlowConf, key: &FlowKey) -> Option<(Flow, *mut HalfOpenSlot)> {
    if !to_source(key) {
        return None;
    }
    let forward = claimed_forward(key)?;
    let (flow, slot) = flows::forward_of_bucket(conf, &forward)?;
    if flow.flags & FLOW_F_FULL_NAT == 0 || flow.vip != key.daddr || flow.vport != key.dport {
        return None;
    }
    let backend = BACKENDS.get(flow.backend_id)?;
    if backend.addr != key.saddr || backend.port != key.sport {
        return None;
    }
    Some((
        Flow {
            backend_id: flow.backend_id,
            service_id: flow.service_id,
            state: flow.state,
            seen: flow.seen,
            vip: forward.daddr,
            vport: forward.dport,
            direction: REPLY,
            flags: FLOW_F_FULL_NAT,
            next_hop: NextHop::default(),
            seq: flow.seq,
        },
        slot,
    ))
}

/// The forward (client → VIP) key of the flow an entry (`key` as it
/// arrives) belongs to: a full-NAT reply's by its claim, anything else's
/// as `lb_common::flow::forward_key` derives it.
#[inline(always)]
pub(crate) fn forward_key(key: &FlowKey, flow: &Flow) -> FlowKey {
    if flow.direction == REPLY && flow.flags & FLOW_F_FULL_NAT != 0 {
        if let Some(forward) = claimed_forward(key) {
            return forward;
        }
    }
    lb_common::flow::forward_key(key, flow)
}

/// A full-NAT reply's client (address, port): where its destination goes.
/// `None` for every other entry.
#[inline(always)]
pub(crate) fn client(key: &FlowKey, flow: &Flow) -> Option<(u32, u16)> {
    if flow.direction != REPLY || flow.flags & FLOW_F_FULL_NAT == 0 {
        return None;
    }
    claimed_forward(key).map(|f| (f.saddr, f.sport))
}

/// The flow of `key` (either direction, entry `flow`) ends: its claim goes
/// back to the pool, if it is still this flow's.
#[inline(always)]
pub(crate) fn release(key: &FlowKey, flow: &Flow) {
    if flow.flags & FLOW_F_FULL_NAT == 0 {
        return;
    }
    let (tuple, forward) = if flow.direction == REPLY {
        match claimed_forward(key) {
            Some(forward) => (*key, forward),
            None => return,
        }
    } else {
        let Some(backend) = BACKENDS.get(flow.backend_id) else {
            return;
        };
        let tuple = reply_tuple(
            (backend.addr, backend.port),
            (flow.vip, flow.vport),
            key.protocol,
        );
        (tuple, *key)
    };
    if claimed_forward(&tuple).is_some_and(|f| f == forward) {
        let _ = FNAT_REPLIES.remove(&tuple);
    }
}
