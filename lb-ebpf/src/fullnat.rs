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
    ptr::{read_volatile, write_volatile},
};
use lb_common::{
    CLAIM_FREED, CLAIM_HELD, FLOW_F_FULL_NAT, FNAT_REPLIES_SIZE, Flow, FlowConf, FlowKey,
    FnatClaim, FnatConf, NextHop, Verdict,
    flow::FORWARD,
    fullnat::{FNAT_TRIES, candidate, flow_seed, may_be_reply, reclaimable, reply_tuple},
};

use crate::{
    BACKENDS, established, flows,
    flows::{Claimed, copy_key, same_key, write_words},
    verdict::{Outcome, drop},
};

const BPF_NOEXIST: u64 = 1;

/// Full NAT's source addresses and port range. Written by the agent.
#[map]
pub(crate) static FNAT_CONF: Array<FnatConf> = Array::with_max_entries(1, 0);
/// A full-NAT flow's reply tuple (backend → source address:port, as it
/// arrives) → its claim (the flow's forward key). Inserted with
/// `BPF_NOEXIST`: the insert is the allocation. Preallocated (~25 MB held
/// from load): the insert then takes its element from a per-CPU free list;
/// allocating one per claim made it about half of a full-NAT new flow's
/// time (docs/architecture.md, "Full NAT", "Cost").
#[map]
pub(crate) static FNAT_REPLIES: HashMap<FlowKey, FnatClaim> =
    HashMap::with_max_entries(FNAT_REPLIES_SIZE, 0);

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
        freed: CLAIM_HELD,
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
            fnat,
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
/// the claim is that flow's own, stale, or freed and out of its quarantine
/// (`reclaimable`), by a compare-and-swap of its tick (two CPUs cannot
/// both take it).
#[inline(always)]
fn take_over(
    fnat: &FnatConf,
    conf: &FlowConf,
    tuple: &FlowKey,
    forward: &FlowKey,
    now: u32,
) -> bool {
    let Some(held) = FNAT_REPLIES.get_ptr_mut(tuple) else {
        return false;
    };
    // SAFETY: a map value; stays readable while the program runs.
    unsafe {
        let found = FnatClaim {
            forward: copy_key(&raw const (*held).forward),
            claimed: read_volatile(&raw const (*held).claimed),
            freed: read_volatile(&raw const (*held).freed),
        };
        let freed = found.freed != CLAIM_HELD;
        if !freed && same_key(&raw const (*held).forward, forward) {
            return true;
        }
        // A freed claim's flow is gone: the tables are not looked in.
        let present = !freed && present(conf, &found.forward);
        if !reclaimable(&found, now, present, fnat.quarantine) {
            return false;
        }
        let (_, won) = atomic_cxchg::<u32, { SeqCst }, { SeqCst }>(
            &raw mut (*held).claimed,
            found.claimed,
            now,
        );
        if won {
            write_words(&raw mut (*held).forward, forward);
            write_volatile(&raw mut (*held).freed, CLAIM_HELD);
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

/// Step 2 for a full-NAT reply (backend → source address:port, as it
/// arrives): its claim names its flow, and `key` becomes the reply's NAT
/// shape (backend → client:port). From here on the flow tables find and
/// handle it as a NAT flow's reply (in the client's bucket, under the same
/// checks), and `key.destination()` is where the packet goes. Anything
/// else is left as it is.
#[inline(always)]
pub(crate) fn nat_shaped(key: &mut FlowKey) {
    if !conf().is_some_and(|c| may_be_reply(c, key.dport)) {
        return;
    }
    let Some(held) = FNAT_REPLIES.get_ptr(&*key) else {
        return;
    };
    // SAFETY: a map value (a claim taken over under us is read stale at
    // worst: the flow tables' checks then miss). A freed claim's flow is
    // gone: its late replies are left as they are, as with no claim.
    unsafe {
        if read_volatile(&raw const (*held).freed) != CLAIM_HELD {
            return;
        }
        key.daddr = read_volatile(&raw const (*held).forward.saddr);
        key.dport = read_volatile(&raw const (*held).forward.sport);
    }
}

/// A full-NAT flow (`forward`, its forward key) left the flow tables: its
/// claim (its source address and port toward its backend), if it is still
/// this flow's, goes back to the pool — at once for a flow that never got
/// past its half-open slot (`quarantine` false: the backend holds no
/// connection to wait out), else after the quarantine (`FnatConf`): the
/// claim stays, freed, from this tick.
#[inline(always)]
pub(crate) fn release(forward: &FlowKey, claimed: &Claimed, quarantine: bool) {
    let Some(backend) = BACKENDS.get(claimed.backend_id) else {
        return;
    };
    let tuple = reply_tuple(
        (backend.addr, backend.port),
        claimed.source,
        forward.protocol,
    );
    let Some(held) = FNAT_REPLIES.get_ptr_mut(&tuple) else {
        return;
    };
    let quarantine = quarantine && conf().is_some_and(|c| c.quarantine != 0);
    // SAFETY: a map value. The tick is read before the key: a take-over
    // changes the tick first, so a claim taken over between the two reads
    // fails the compare-and-swap below.
    unsafe {
        let was = read_volatile(&raw const (*held).claimed);
        if read_volatile(&raw const (*held).freed) != CLAIM_HELD
            || !same_key(&raw const (*held).forward, forward)
        {
            return;
        }
        if !quarantine {
            let _ = FNAT_REPLIES.remove(&tuple);
            return;
        }
        let (_, won) = atomic_cxchg::<u32, { SeqCst }, { SeqCst }>(
            &raw mut (*held).claimed,
            was,
            flows::now(),
        );
        if won {
            write_volatile(&raw mut (*held).freed, CLAIM_FREED);
        }
    }
}
