//! Full NAT (issue 25; docs/architecture.md "Full NAT"): a new flow's
//! (source address, port) claimed in `FNAT_CLAIMS`, the reply's way back
//! to its flow's slot through that claim, and the claim's release with the
//! flow. The pure rules (candidates, buckets, staleness, rewrites) are
//! `lb_common::fullnat`; the flow lives in the usual tables (`flows.rs`,
//! `established.rs`), marked `FLOW_F_FULL_NAT`, with its source address
//! and port in its forward entry's `vip`/`vport`.

use aya_ebpf::{
    macros::map,
    maps::{Array, PerCpuArray},
};
use core::{
    intrinsics::{AtomicOrdering::SeqCst, atomic_cxchg, atomic_xchg},
    ptr::write_volatile,
};
use lb_common::{
    CLAIM_BUSY, CLAIM_FREE, CLAIM_FREED, CLAIM_HELD, FLOW_F_FULL_NAT, FNAT_CLAIMS_SIZE, Flow,
    FlowConf, FlowKey, FnatClaim, FnatConf, MAX_BACKENDS, NextHop, Verdict,
    flow::FORWARD,
    fullnat::{
        FNAT_TRIES, blocks, candidate, claim_bucket, claim_state, flow_seed, held_for,
        may_be_reply, next_candidate, reclaimable, reply_tuple,
    },
};

use crate::{
    BACKENDS, established, flows,
    flows::{Claimed, copy_words, write_words},
    verdict::{Outcome, drop},
};

const BPF_F_MMAPABLE: u32 = 1 << 10;

/// Full NAT's source addresses and port range. Written by the agent.
#[map]
pub(crate) static FNAT_CONF: Array<FnatConf> = Array::with_max_entries(1, 0);
/// Full NAT's claims (`FnatClaim`, 32 B): a (source address, port) toward a
/// backend is claimed in a slot of its reply tuple's bucket (two slots, one
/// cache line: `fullnat::claim_bucket`) by a compare-and-swap of the slot's
/// state. One cold line per claim and per reply lookup, where the kernel
/// hash it replaced took a bucket and an element from its free list, two
/// cold lines of 25 MB behind cold TLB entries, and was the whole of full
/// NAT's extra cost over NAT's new flow (docs/architecture.md, "Full NAT",
/// "Cost"). Mappable: the agent reads and sweeps it as memory.
#[map]
pub(crate) static FNAT_CLAIMS: Array<FnatClaim> =
    Array::with_max_entries(FNAT_CLAIMS_SIZE, BPF_F_MMAPABLE);

/// Backend id → the (address, port) after the last one this CPU gave
/// toward the backend (`fullnat::next_candidate`'s cursor; 0: none yet). A
/// hint, not a record: losing it (a restart) costs nothing but a cold
/// first claim, so it is not pinned.
#[map]
static FNAT_CURSORS: PerCpuArray<u32> = PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

#[inline(always)]
fn conf() -> Option<&'static FnatConf> {
    FNAT_CONF.get(0)
}

/// Step 4 for a full-NAT service: claims a (source address, port) toward
/// the backend and enters the flow in `HALF_OPEN` with it. No free
/// candidate: `DropFnatExhausted`, nothing created.
///
/// The first candidate is the next port this CPU hands out toward the
/// backend (`FNAT_CURSORS`), whose claim is the line after the one the
/// previous flow there took; the others come from the flow's keyed hash.
/// Each try is one call of [`claim`] (a subprogram: the verifier walks its
/// body once per call site state, and the loop's states stay alike); only
/// when every candidate is taken is the first one looked at, and taken over
/// if its claim is this flow's own or stale.
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
    let seed = flow_conf.half_open_seed;
    let hash = flow_seed(key, seed);
    let endpoint = (backend.addr, backend.port);
    let cursor = FNAT_CURSORS.get_ptr_mut(backend_id);
    // SAFETY: this CPU's value of a per-CPU array: no other writer.
    let at = cursor.map_or(0, |c| unsafe { *c });
    let Some((first, next)) = next_candidate(fnat, hash, at) else {
        return Err(exhausted);
    };
    if let Some(c) = cursor {
        // SAFETY: as above.
        unsafe { *c = next };
    }
    let mut given = None;
    for attempt in 0..FNAT_TRIES {
        let source = if attempt == 0 {
            first
        } else {
            candidate(fnat, hash, attempt).unwrap_or(first)
        };
        let tuple = reply_tuple(endpoint, source, key.protocol);
        if claim(&tuple, key, seed, now) {
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

/// The two slots of `tuple`'s bucket.
#[inline(always)]
fn bucket(tuple: &FlowKey, seed: u32) -> Option<(*mut FnatClaim, *mut FnatClaim)> {
    let first = claim_bucket(tuple, seed, FNAT_CLAIMS_SIZE);
    Some((
        FNAT_CLAIMS.get_ptr_mut(first)?,
        FNAT_CLAIMS.get_ptr_mut(first + 1)?,
    ))
}

/// A copy of a claim slot (volatile words: another CPU may write it).
#[inline(always)]
fn read(slot: *mut FnatClaim) -> FnatClaim {
    // SAFETY: a map value of `FNAT_CLAIMS`, 4-byte aligned.
    unsafe { copy_words(slot) }
}

/// Claims `tuple` for the flow `forward` in a free slot of its bucket: the
/// first slot if the second does not hold the tuple, else the second if
/// the first does not (`fullnat::blocks`). Two CPUs claiming one tuple at
/// once in the two slots each take theirs by a compare-and-swap (a full
/// barrier) before reading the other: at least one sees the other's busy
/// or held slot and backs off, so the tuple is never held twice.
#[inline(never)]
fn claim(tuple: &FlowKey, forward: &FlowKey, seed: u32, now: u32) -> bool {
    let Some((a, b)) = bucket(tuple, seed) else {
        return false;
    };
    if take(a, b, tuple, forward, now) {
        return true;
    }
    if blocks(&read(a), tuple) {
        return false;
    }
    take(b, a, tuple, forward, now)
}

/// Takes `mine` (free) for `tuple` unless `other` blocks it, and writes the
/// claim. The state goes free → busy (the claim) → held once the slot is
/// written (an exchange: a full barrier, so whoever sees it held sees the
/// tuple).
#[inline(always)]
fn take(
    mine: *mut FnatClaim,
    other: *mut FnatClaim,
    tuple: &FlowKey,
    forward: &FlowKey,
    now: u32,
) -> bool {
    // SAFETY: map values of `FNAT_CLAIMS`; the state word is 4-byte
    // aligned and only ever changed atomically.
    unsafe {
        let state = &raw mut (*mine).state;
        let (_, won) = atomic_cxchg::<u32, { SeqCst }, { SeqCst }>(
            state,
            CLAIM_FREE,
            claim_state(CLAIM_BUSY, now),
        );
        if !won {
            return false;
        }
        if blocks(&read(other), tuple) {
            let _ = atomic_xchg::<u32, { SeqCst }>(state, CLAIM_FREE);
            return false;
        }
        write_claim(mine, tuple, forward);
        let _ = atomic_xchg::<u32, { SeqCst }>(state, claim_state(CLAIM_HELD, now));
    }
    true
}

/// Writes a busy slot's tuple and forward key.
///
/// # Safety
/// `slot` is a map value of `FNAT_CLAIMS` this CPU made busy.
#[inline(always)]
unsafe fn write_claim(slot: *mut FnatClaim, tuple: &FlowKey, forward: &FlowKey) {
    // SAFETY: the caller's slot.
    unsafe {
        write_words(&raw mut (*slot).reply, tuple);
        write_volatile(&raw mut (*slot).client, forward.saddr);
        write_volatile(&raw mut (*slot).vip, forward.daddr);
        write_volatile(&raw mut (*slot).client_port, forward.sport);
        write_volatile(&raw mut (*slot).vport, forward.dport);
    }
}

/// The slot of `tuple`'s bucket that holds it (held or freed), and what it
/// held when read.
#[inline(always)]
fn find(tuple: &FlowKey, seed: u32) -> Option<(*mut FnatClaim, FnatClaim)> {
    let (a, b) = bucket(tuple, seed)?;
    let found = read(a);
    if found.kind() != CLAIM_BUSY && blocks(&found, tuple) {
        return Some((a, found));
    }
    let found = read(b);
    (found.kind() != CLAIM_BUSY && blocks(&found, tuple)).then_some((b, found))
}

/// Takes `tuple`'s claim for the flow whose forward key is `forward` if
/// the claim is that flow's own, stale, or freed and out of its quarantine
/// (`reclaimable`), by a compare-and-swap of its state (two CPUs cannot
/// both take it; the slot is busy while its forward key is rewritten).
#[inline(always)]
fn take_over(
    fnat: &FnatConf,
    conf: &FlowConf,
    tuple: &FlowKey,
    forward: &FlowKey,
    now: u32,
) -> bool {
    let Some((slot, found)) = find(tuple, conf.half_open_seed) else {
        return false;
    };
    let freed = found.kind() != CLAIM_HELD;
    if !freed && found.forward() == *forward {
        return true;
    }
    // A freed claim's flow is gone: the tables are not looked in.
    let present = !freed && present(conf, &found.forward());
    if !reclaimable(&found, now, present, fnat.quarantine) {
        return false;
    }
    // SAFETY: a map value of `FNAT_CLAIMS`, its state changed atomically.
    unsafe {
        let state = &raw mut (*slot).state;
        let (_, won) = atomic_cxchg::<u32, { SeqCst }, { SeqCst }>(
            state,
            found.state,
            claim_state(CLAIM_BUSY, now),
        );
        if won {
            write_claim(slot, tuple, forward);
            let _ = atomic_xchg::<u32, { SeqCst }>(state, claim_state(CLAIM_HELD, now));
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
/// else is left as it is. One line read: the tuple's bucket.
#[inline(always)]
pub(crate) fn nat_shaped(flow_conf: &FlowConf, key: &mut FlowKey) {
    if !conf().is_some_and(|c| may_be_reply(c, key.dport)) {
        return;
    }
    let Some((a, b)) = bucket(key, flow_conf.half_open_seed) else {
        return;
    };
    // A claim taken over under us is read torn at worst: the flow tables'
    // checks then miss. A freed claim's flow is gone: its late replies are
    // left as they are, as with no claim.
    let mut found = read(a);
    if !held_for(&found, key) {
        found = read(b);
        if !held_for(&found, key) {
            return;
        }
    }
    key.daddr = found.client;
    key.dport = found.client_port;
}

/// A full-NAT flow (`forward`, its forward key) left the flow tables: its
/// claim (its source address and port toward its backend), if it is still
/// this flow's, goes back to the pool — at once for a flow that never got
/// past its half-open slot (`quarantine` false: the backend holds no
/// connection to wait out), else after the quarantine (`FnatConf`): the
/// claim stays, freed, from this tick.
#[inline(always)]
pub(crate) fn release(forward: &FlowKey, claimed: &Claimed, quarantine: bool) {
    let (Some(backend), Some(flow_conf)) = (BACKENDS.get(claimed.backend_id), flows::conf()) else {
        return;
    };
    let tuple = reply_tuple(
        (backend.addr, backend.port),
        claimed.source,
        forward.protocol,
    );
    let Some((slot, found)) = find(&tuple, flow_conf.half_open_seed) else {
        return;
    };
    if found.kind() != CLAIM_HELD || found.forward() != *forward {
        return;
    }
    let quarantine = quarantine && conf().is_some_and(|c| c.quarantine != 0);
    let now = flows::now_in(Some(flow_conf));
    let next = if quarantine {
        claim_state(CLAIM_FREED, now)
    } else {
        CLAIM_FREE
    };
    // SAFETY: a map value; its state changed atomically. A take-over
    // between the read and here changed the state (busy, then held at
    // another tick), so the swap fails and the new claim stays.
    unsafe {
        let _ =
            atomic_cxchg::<u32, { SeqCst }, { SeqCst }>(&raw mut (*slot).state, found.state, next);
    }
}
