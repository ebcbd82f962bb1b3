//! Flow sync's events (issue 27; lb_common::sync has the layout): one
//! event when a flow becomes established, one when its established entry
//! is removed, while `SYNC_ON` says sync is on. Called from the only two
//! places of `flows` (IPv4) and `flows6` (IPv6) where that happens
//! (`promote`, `remove_flow`), so a packet of an established flow, a
//! half-open flow and a SYN never send one. Off, an event costs one array
//! load. Both families' events share the ring; their lengths differ (40
//! and 64 bytes).

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    macros::map,
    maps::{Array, RingBuf},
};
use lb_common::{
    Flow, FlowKey, MAX_BACKENDS,
    flow::{REPLY, forward_key},
    maps6::FlowKey6,
    sync::{
        SYNC_EVENT_ENDED, SYNC_EVENT_ESTABLISHED, SYNC_RING_BYTES, SyncConf, SyncEvent, SyncEvent6,
    },
};

/// Sync's switch and lost-event count. Written by the agent.
#[map]
static SYNC_ON: Array<SyncConf> = Array::with_max_entries(1, 0);
/// Flow events for the agent's sync sender.
#[map]
static SYNC_EVENTS: RingBuf = RingBuf::with_byte_size(SYNC_RING_BYTES, 0);
/// Backend id → flows from peers the agent inserted established (less
/// those a peer ended): the agent's own count, declared here so it is
/// pinned with the flows it counts. The data plane never touches it; a
/// synced flow's end is counted closed as any other's.
#[map]
static SYNC_OPENED: Array<u64> = Array::with_max_entries(MAX_BACKENDS, 0);

/// `key`'s flow (its forward entry `flow`) became established; a NAT
/// flow's reply entry starts at `reply_seq`.
#[inline(always)]
pub(crate) fn established(key: &FlowKey, flow: &Flow, reply_seq: u32) {
    event(key, flow, SYNC_EVENT_ESTABLISHED, reply_seq);
}

/// The established entry `key` (`flow`, either direction) was removed.
#[inline(always)]
pub(crate) fn ended(key: &FlowKey, flow: &Flow) {
    event(key, flow, SYNC_EVENT_ENDED, 0);
}

#[inline(always)]
fn event(key: &FlowKey, flow: &Flow, kind: u8, reply_seq: u32) {
    let Some(conf) = SYNC_ON.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: a valid SYNC_ON value; the agent writes it whole, rarely.
    if unsafe { (*conf).on } == 0 {
        return;
    }
    // A NAT flow's reply entry names its flow by the forward key.
    let key = if flow.direction == REPLY {
        forward_key(key, flow)
    } else {
        *key
    };
    let Some(mut entry) = SYNC_EVENTS.reserve::<SyncEvent>(0) else {
        // The agent is behind: counted, not retried (the periodic refresh
        // of active flows sends it again).
        // SAFETY: a valid, aligned u64 in an array map value.
        unsafe {
            atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(&raw mut (*conf).lost, 1);
        }
        return;
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: `ev` points at a reserved, 8-byte aligned SyncEvent; every
    // field is written, one store each.
    unsafe {
        (&raw mut (*ev).key).write(key);
        (&raw mut (*ev).backend_id).write(flow.backend_id);
        (&raw mut (*ev).service_id).write(flow.service_id);
        (&raw mut (*ev).seq).write(if flow.direction == REPLY { 0 } else { flow.seq });
        (&raw mut (*ev).reply_seq).write(reply_seq);
        (&raw mut (*ev).kind).write(kind);
        (&raw mut (*ev).flags).write(flow.flags);
        (&raw mut (*ev).nat).write((flow.vip != 0) as u8);
        (&raw mut (*ev)._pad0).write(0);
        (&raw mut (*ev)._pad1).write(0);
    }
    entry.submit(0);
}

/// IPv6's [`established`]: `key` is the flow's forward key.
#[inline(always)]
pub(crate) fn established6(key: &FlowKey6, flow: &Flow, reply_seq: u32) {
    event6(key, flow, SYNC_EVENT_ESTABLISHED, reply_seq);
}

/// IPv6's [`ended`]: `forward` is the flow's forward key (the caller
/// built it from a reply entry's: `flows6::pair_key`), `flow` the removed
/// entry (either direction).
#[inline(always)]
pub(crate) fn ended6(forward: &FlowKey6, flow: &Flow) {
    event6(forward, flow, SYNC_EVENT_ENDED, 0);
}

/// IPv6's `event`: the same steps over a 64-byte `SyncEvent6`, its key
/// already the forward one.
// Not one function generic over the key with IPv4's: every such version
// tried (the event generic; its field writes in a generic helper; the
// `SYNC_ON` check and the reservation as helpers) took IPv4's `lb_setup`
// from 701 398 verified instructions past the verifier's 1 000 000, while
// this one leaves IPv4's code, and its count, as they were.
#[inline(always)]
fn event6(key: &FlowKey6, flow: &Flow, kind: u8, reply_seq: u32) {
    let Some(conf) = SYNC_ON.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: as in `event`.
    if unsafe { (*conf).on } == 0 {
        return;
    }
    let Some(mut entry) = SYNC_EVENTS.reserve::<SyncEvent6>(0) else {
        // SAFETY: as in `event`.
        unsafe {
            atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(&raw mut (*conf).lost, 1);
        }
        return;
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: as in `event`: a reserved, aligned SyncEvent6, every field
    // written once.
    unsafe {
        (&raw mut (*ev).key).write(*key);
        (&raw mut (*ev).backend_id).write(flow.backend_id);
        (&raw mut (*ev).service_id).write(flow.service_id);
        (&raw mut (*ev).seq).write(if flow.direction == REPLY { 0 } else { flow.seq });
        (&raw mut (*ev).reply_seq).write(reply_seq);
        (&raw mut (*ev).kind).write(kind);
        (&raw mut (*ev).flags).write(flow.flags);
        // The forward entry's `vip` is 1 in a NAT66 flow.
        (&raw mut (*ev).nat).write((flow.vip != 0) as u8);
        (&raw mut (*ev)._pad0).write(0);
        (&raw mut (*ev)._pad1).write(0);
    }
    entry.submit(0);
}
