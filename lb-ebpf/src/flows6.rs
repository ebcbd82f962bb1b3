//! IPv6's flow tables and its flow lifecycle (steps 2 and 4 for `V6`), the
//! rules of `lb_common::flow` as IPv4's (`flows.rs`), over two kernel
//! hashes of their own instead of IPv4's set-associative arrays:
//!
//! - `HALF_OPEN6` (LRU): flows that have not completed a handshake, a
//!   NAT flow as two entries (forward: client → VIP; reply: backend →
//!   client). New flows only ever evict each other here: no number of
//!   spoofed SYNs reaches an established flow.
//! - `ESTABLISHED6` (a plain hash, never evicting): flows promoted by the
//!   client's packet that completes the handshake (`flow::confirms`), two
//!   entries per NAT flow. Entries leave when a packet finds them expired
//!   (FIN/RST's closing timeout, idle), when the agent's sweep finds them
//!   expired (`lb-userspace/src/dataplane/flows6.rs`), or when their
//!   backend's id is purged; never to make room. A flow confirmed while
//!   the table is full stays half-open (still forwarded), as IPv4's does
//!   when its overflow is full: an established flow is never displaced by
//!   new ones (IPv4's guarantee, `flow_table::place`).
//!
//! Both are sized by the config (`conntrack-size`, `half-open-size`: two
//! entries per flow, as IPv4's), pinned and adopted with the others.
//! `maps6.rs` has the slot layouts (`HalfOpenSlot6`, `EstablishedSlot6`) a
//! set-associative IPv6 table would use (docs/architecture.md, "IPv6").
//!
//! A reply entry's VIP is its service's (`SERVICE_VIPS6`): `Flow::vip`
//! holds 4 bytes; in a forward entry it is 1 in a NAT flow (the marker "has
//! a reply entry"), 0 in DSR. A NAT flow's two entries carry the same
//! state and `seq` while half-open (`record` writes both), as IPv4's one
//! slot does.

use aya_ebpf::{
    macros::map,
    maps::{HashMap, LruHashMap},
};
use core::ptr::write_volatile;
use lb_common::{
    FLOW_F_PROXY, Flow, MAX_PROXY_FLOWS, NextHop, ProxyFlow,
    flow::{FORWARD, REPLY, STATE_CLOSING, STATE_ESTABLISHED, answer, is_expired},
    ipv6::Addr6,
    maps6::{Backend6, Endpoint6, FLOWS6_SIZE, FlowKey6},
};

use crate::{
    BACKENDS,
    flows::{self, Table, close_forward, copy_flow, count_closed, count_opened},
    v6::{BACKENDS6, CARRY6, NAT_BACKENDS6, SERVICE_VIPS6},
};

/// IPv6 flows that have not completed a handshake, both directions.
#[map]
pub(crate) static HALF_OPEN6: LruHashMap<FlowKey6, Flow> =
    LruHashMap::with_max_entries(FLOWS6_SIZE, 0);
/// IPv6 established flows, both directions: a hash that never evicts.
#[map]
pub(crate) static ESTABLISHED6: HashMap<FlowKey6, Flow> = HashMap::with_max_entries(FLOWS6_SIZE, 0);

/// IPv6 PROXY v2 flows: the forward key (client → VIP) → `first` (the
/// client's ISN + 1). A map of its own, not a field of the entry: IPv4
/// keeps `first` in its established slot, beside the `Flow`, and
/// `ESTABLISHED6`'s values are bare `Flow`s shared in layout with every
/// other flow table (a field there would change them all, pinned). An
/// LRU, as `PROXY_FLOWS`: written when the SYN flags the flow, removed
/// with the flow (`remove_flow`); a flow whose entry it evicted is dropped
/// (`drop_proxy_lost`).
#[map]
pub(crate) static PROXY_FLOWS6: LruHashMap<FlowKey6, ProxyFlow> =
    LruHashMap::with_max_entries(MAX_PROXY_FLOWS, 0);

const BPF_NOEXIST: u64 = 1;
/// `-EEXIST`: an insert's key is there already (any other failure of a
/// `BPF_NOEXIST` insert is a full table: `-E2BIG`).
const EEXIST: i32 = -17;

/// The `HALF_OPEN6` entry a half-open copy was read from.
#[derive(Clone, Copy)]
pub(crate) struct Slot6(#[allow(dead_code)] *mut Flow);

/// A backend's IPv6 address: `BACKENDS6` at the index its `BACKENDS` slot
/// names in `addr` (the agent writes the backend's own id there).
#[inline(always)]
pub(crate) fn backend6(index: u32) -> Option<&'static Backend6> {
    BACKENDS6.get(index)
}

/// The address of the IPv6 backend whose `BACKENDS6` index is `index`
/// (all zero if none).
#[inline(always)]
pub(crate) fn backend_addr(index: u32) -> Addr6 {
    match BACKENDS6.get(index) {
        Some(b) => b.addr,
        None => [0; 4],
    }
}

/// The VIP of service `service_id` (a NAT reply's source).
#[inline(always)]
pub(crate) fn service_vip(service_id: u32) -> Addr6 {
    match SERVICE_VIPS6.get(service_id) {
        Some(vip) => *vip,
        None => [0; 4],
    }
}

/// This CPU's scratch key (`Carry6::pair`), where a flow's other key is
/// built.
#[inline(always)]
fn scratch_key() -> Option<*mut FlowKey6> {
    let carry = CARRY6.get_ptr_mut(0)?;
    // SAFETY: a field of this CPU's slot.
    Some(unsafe { &raw mut (*carry).pair })
}

/// This CPU's scratch entry (`Carry6::entry`).
#[inline(always)]
fn scratch_entry() -> Option<*mut Flow> {
    let carry = CARRY6.get_ptr_mut(0)?;
    // SAFETY: a field of this CPU's slot.
    Some(unsafe { &raw mut (*carry).entry })
}

/// Writes a key field by field into the scratch key.
#[inline(always)]
fn set_key(
    out: *mut FlowKey6,
    (saddr, sport): (Addr6, u16),
    (daddr, dport): (Addr6, u16),
    protocol: u8,
) {
    // SAFETY: the caller's pointer is this CPU's scratch key.
    unsafe {
        (*out).saddr = saddr;
        (*out).daddr = daddr;
        (*out).sport = sport;
        (*out).dport = dport;
        (*out).protocol = protocol;
        (*out)._pad0 = 0;
        (*out)._pad1 = 0;
    }
}

/// The reply key (backend → client) of the NAT flow whose forward key is
/// `key`, pinned to `backend_id`, in the scratch key.
#[inline(always)]
fn reply_key(key: &FlowKey6, backend_id: u32) -> Option<&'static FlowKey6> {
    let backend = BACKENDS.get(backend_id)?;
    let out = scratch_key()?;
    set_key(
        out,
        (backend_addr(backend.addr), backend.port),
        (key.saddr, key.sport),
        key.protocol,
    );
    // SAFETY: this CPU's slot, written above.
    Some(unsafe { &*out })
}

/// The forward key (client → VIP) of a reply entry's flow, in the scratch
/// key.
#[inline(always)]
fn forward_key(reply: &FlowKey6, entry: &Flow) -> Option<&'static FlowKey6> {
    let out = scratch_key()?;
    set_key(
        out,
        (reply.daddr, reply.dport),
        (service_vip(entry.service_id), entry.vport),
        reply.protocol,
    );
    // SAFETY: this CPU's slot, written above.
    Some(unsafe { &*out })
}

/// The key of the entry's other direction, if its flow has one (NAT), in
/// the scratch key.
#[inline(always)]
fn pair_key(key: &FlowKey6, flow: &Flow) -> Option<&'static FlowKey6> {
    if flow.direction == REPLY {
        return forward_key(key, flow);
    }
    if flow.vip == 0 {
        return None;
    }
    reply_key(key, flow.backend_id)
}

/// Step 2: the live established entry of `key` (as it arrives: a forward
/// or a reply entry), refreshed once per tick; an expired one is removed
/// with its flow (unless the other direction is live) and is a miss.
#[inline(always)]
pub(crate) fn established(key: &FlowKey6, now: u32) -> Option<*mut Flow> {
    let conf = flows::conf()?;
    let entry = ESTABLISHED6.get_ptr_mut(key)?;
    // SAFETY: a map value; an entry removed under us stays readable until
    // the program ends (RCU), at worst stale, never a fault.
    let flow = unsafe { &mut *entry };
    if flow.seen != now {
        if is_expired(conf, key.protocol, flow, now) && !pair_is_live(key, flow, now) {
            remove_flow(Table::Established, key, flow);
            return None;
        }
        flow.seen = now;
    }
    Some(entry)
}

#[inline(always)]
fn pair_is_live(key: &FlowKey6, flow: &Flow, now: u32) -> bool {
    let (Some(conf), Some(pair)) = (flows::conf(), pair_key(key, flow)) else {
        return false;
    };
    match ESTABLISHED6.get_ptr(pair) {
        // SAFETY: a map value, as in `established`.
        Some(p) => !is_expired(conf, key.protocol, unsafe { &*p }, now),
        None => false,
    }
}

/// Step 2, second table: a copy of `key`'s live half-open entry.
#[inline(always)]
pub(crate) fn half_open(key: &FlowKey6, now: u32) -> Option<(Flow, Slot6)> {
    let conf = flows::conf()?;
    let entry = HALF_OPEN6.get_ptr_mut(key)?;
    // SAFETY: a map value (see `established`).
    let flow = unsafe { copy_flow(entry) };
    if flow.seen != now {
        if is_expired(conf, key.protocol, &flow, now) {
            return None;
        }
        // SAFETY: a valid, aligned u32 in a map value.
        unsafe { write_volatile(&raw mut (*entry).seen, now) };
    }
    Some((flow, Slot6(entry)))
}

/// A backend's segment on a half-open NAT flow (`reply`, the copy of its
/// reply entry `key`): a SYN-ACK or a picked-up flow's first answer is
/// recorded (`lb_common::flow::answer`).
#[inline(always)]
pub(crate) fn answered(key: &FlowKey6, reply: &Flow, flags: u8, seq: u32) {
    if let Some((state, expect)) = answer(reply.state, reply.seq, flags, seq) {
        if let Some(forward) = forward_key(key, reply) {
            record(forward, state, expect);
        }
    }
}

/// Writes a half-open flow's new state and `seq` into its entries (both
/// directions of a NAT flow), if they are still there.
// Out of line: IPv6's keys are 40 bytes, and the stage's one 512-byte
// frame had no room for this inlined.
#[inline(never)]
pub(crate) fn record(forward: &FlowKey6, state: u32, seq: u32) {
    let Some(entry) = HALF_OPEN6.get_ptr_mut(forward) else {
        return;
    };
    // SAFETY: a map value; plain aligned stores.
    let (nat, backend_id) = unsafe {
        write_volatile(&raw mut (*entry).state, state);
        write_volatile(&raw mut (*entry).seq, seq);
        ((*entry).vip != 0, (*entry).backend_id)
    };
    if !nat {
        return;
    }
    if let Some(reply) = reply_key(forward, backend_id).and_then(|r| HALF_OPEN6.get_ptr_mut(r)) {
        // SAFETY: as above.
        unsafe {
            write_volatile(&raw mut (*reply).state, state);
            write_volatile(&raw mut (*reply).seq, seq);
        }
    }
}

/// Flags the half-open flow `forward` (just created) as a PROXY flow
/// (`FLOW_F_PROXY`, both entries) whose client's first sequence number is
/// `first` (`PROXY_FLOWS6`). False if its entry is gone or `first` could
/// not be kept (the flow then goes on as a plain NAT flow).
// Out of line: IPv6's keys are 40 bytes, and the stage's one 512-byte
// frame had no room for this inlined.
#[inline(never)]
pub(crate) fn mark_proxy(forward: &FlowKey6, first: u32) -> bool {
    let Some(entry) = HALF_OPEN6.get_ptr_mut(forward) else {
        return false;
    };
    if PROXY_FLOWS6
        .insert(forward, &ProxyFlow { first, _pad: 0 }, 0)
        .is_err()
    {
        return false;
    }
    // SAFETY: a map value; plain aligned stores.
    let (nat, backend_id) = unsafe {
        (*entry).flags |= FLOW_F_PROXY;
        ((*entry).vip != 0, (*entry).backend_id)
    };
    if nat
        && let Some(reply) = reply_key(forward, backend_id).and_then(|r| HALF_OPEN6.get_ptr_mut(r))
    {
        // SAFETY: as above.
        unsafe { (*reply).flags |= FLOW_F_PROXY };
    }
    true
}

/// The `first` of the PROXY flow whose entry `flow` was found under `key`
/// (either direction), if `PROXY_FLOWS6` still holds it.
#[inline(always)]
pub(crate) fn proxy_first(key: &FlowKey6, flow: &Flow) -> Option<u32> {
    let forward = if flow.direction == REPLY {
        forward_key(key, flow)?
    } else {
        key
    };
    // SAFETY: a map value, read once.
    PROXY_FLOWS6.get_ptr(forward).map(|p| unsafe { (*p).first })
}

/// Is `key`'s source a backend endpoint of an IPv6 NAT service?
#[inline(always)]
pub(crate) fn from_nat_backend(key: &FlowKey6) -> bool {
    let endpoint = Endpoint6 {
        addr: key.saddr,
        port: key.sport,
        protocol: key.protocol,
        _pad: 0,
    };
    NAT_BACKENDS6.get_ptr(&endpoint).is_some()
}

/// Removes a flow (the entry and its pair) from `table`; an established
/// flow counts as closed for its backend once, unless FIN/RST already
/// counted it.
// Out of line: IPv6's keys are 40 bytes, and the stage's one 512-byte
// frame had no room for this inlined.
#[inline(never)]
pub(crate) fn remove_flow(table: Table, key: &FlowKey6, flow: &Flow) {
    let pair = pair_key(key, flow);
    let (backend_id, state, direction) = (flow.backend_id, flow.state, flow.direction);
    // A PROXY flow's `first` goes with it (under the forward key).
    if flow.flags & FLOW_F_PROXY != 0 {
        let forward = if direction == REPLY { pair } else { Some(key) };
        if let Some(forward) = forward {
            let _ = PROXY_FLOWS6.remove(forward);
        }
    }
    if table == Table::HalfOpen {
        let _ = HALF_OPEN6.remove(key);
        if let Some(pair) = pair {
            let _ = HALF_OPEN6.remove(pair);
        }
        return;
    }
    let removed = ESTABLISHED6.remove(key).is_ok();
    let pair_removed = match pair {
        Some(pair) => ESTABLISHED6.remove(pair).is_ok(),
        None => false,
    };
    // Counted (and told to the peers) by whoever removed the forward entry.
    let (forward_removed, forward) = if direction == REPLY {
        (pair_removed, pair)
    } else {
        (removed, Some(key))
    };
    if !forward_removed {
        return;
    }
    if let Some(forward) = forward {
        crate::sync::ended6(forward, flow);
    }
    if state == STATE_ESTABLISHED {
        count_closed(backend_id);
    }
}

/// A FIN or RST (either direction) on an established flow: both entries
/// move to the closing timeout; the forward entry's change is a
/// compare-and-swap, so the close is counted once.
// Out of line: IPv6's keys are 40 bytes, and the stage's one 512-byte
// frame had no room for this inlined.
#[inline(never)]
pub(crate) fn close(key: &FlowKey6, flow: &mut Flow) {
    if flow.state != STATE_ESTABLISHED {
        return;
    }
    if flow.direction == REPLY {
        let Some(forward) = forward_key(key, flow).and_then(|f| ESTABLISHED6.get_ptr_mut(f)) else {
            return;
        };
        close_forward(forward);
        flow.state = STATE_CLOSING;
        return;
    }
    close_forward(flow as *mut Flow);
    flow.state = STATE_CLOSING;
    if let Some(p) = pair_key(key, flow).and_then(|p| ESTABLISHED6.get_ptr_mut(p)) {
        // SAFETY: a map value; a plain store, the count is the forward's.
        unsafe { (*p).state = STATE_CLOSING };
    }
}

/// A new entry of a flow, in the scratch entry.
#[inline(always)]
fn entry(backend_id: u32, service_id: u32, now: u32, direction: u8) -> Option<&'static mut Flow> {
    let out = scratch_entry()?;
    // SAFETY: this CPU's slot.
    let flow = unsafe { &mut *out };
    flow.backend_id = backend_id;
    flow.service_id = service_id;
    flow.state = lb_common::flow::STATE_NEW;
    flow.seen = now;
    flow.vip = 0;
    flow.vport = 0;
    flow.direction = direction;
    flow.flags = 0;
    flow.next_hop = NextHop::default();
    flow.seq = 0;
    Some(flow)
}

/// Step 4's entry: a new flow in `HALF_OPEN6` (NAT: its reply entry too).
/// Returns the forward entry.
#[inline(always)]
pub(crate) fn create(
    key: &FlowKey6,
    service_id: u32,
    backend_id: u32,
    nat: bool,
    state: u32,
    now: u32,
) -> Flow {
    let flow = Flow {
        backend_id,
        service_id,
        state,
        seen: now,
        vip: nat as u32,
        vport: 0,
        direction: FORWARD,
        flags: 0,
        next_hop: NextHop::default(),
        seq: 0,
    };
    let _ = HALF_OPEN6.insert(key, &flow, 0);
    if nat {
        create_reply(key, service_id, backend_id, state, now);
    }
    flow
}

/// A new NAT flow's half-open reply entry.
// Out of line: IPv6's keys are 40 bytes, and the stage's one 512-byte
// frame had no room for this inlined.
#[inline(never)]
fn create_reply(key: &FlowKey6, service_id: u32, backend_id: u32, state: u32, now: u32) {
    let (Some(reply_key), Some(reply)) = (
        reply_key(key, backend_id),
        entry(backend_id, service_id, now, REPLY),
    ) else {
        return;
    };
    reply.state = state;
    reply.vip = 1;
    reply.vport = key.dport;
    let _ = HALF_OPEN6.insert(reply_key, &*reply, 0);
}

/// The client confirmed a half-open flow (`flow`, its copy): its entries
/// move to `ESTABLISHED6` and it counts as active. Each direction starts
/// its sender's sequence at what the segment shows (`seq`, `ack`). If the
/// flow is there already, only the half-open entries go; if the table is
/// full, nothing moves (the flow stays half-open, still forwarded).
// Out of line: IPv6's keys are 40 bytes, and the stage's one 512-byte
// frame had no room for this inlined.
#[inline(never)]
pub(crate) fn promote(key: &FlowKey6, flow: &mut Flow, seq: u32, ack: u32, now: u32) {
    let nat = flow.vip != 0;
    let state = flow.state;
    flow.state = STATE_ESTABLISHED;
    flow.seen = now;
    flow.seq = seq;
    match ESTABLISHED6.insert(key, &*flow, BPF_NOEXIST) {
        Ok(()) => {}
        // The flow is there already (a retransmitted confirmation).
        Err(EEXIST) => {
            clear_half_open(key, nat, flow.backend_id);
            return;
        }
        // Full: nothing established is displaced; the flow stays half-open.
        Err(_) => {
            flow.state = state;
            return;
        }
    }
    if nat {
        let (Some(reply_key), Some(reply)) = (
            reply_key(key, flow.backend_id),
            entry(flow.backend_id, flow.service_id, now, REPLY),
        ) else {
            let _ = ESTABLISHED6.remove(key);
            flow.state = state;
            return;
        };
        reply.state = STATE_ESTABLISHED;
        reply.vip = 1;
        reply.vport = key.dport;
        reply.seq = ack;
        // The backend's acks are shifted back too.
        reply.flags = flow.flags & FLOW_F_PROXY;
        if ESTABLISHED6.insert(reply_key, &*reply, 0).is_err() {
            let _ = ESTABLISHED6.remove(key);
            flow.state = state;
            return;
        }
    }
    clear_half_open(key, nat, flow.backend_id);
    count_opened(flow.backend_id);
    // A peer cannot shift a PROXY flow: its `first` is in this LB's
    // `PROXY_FLOWS6` only.
    if flow.flags & FLOW_F_PROXY == 0 {
        crate::sync::established6(key, flow, ack);
    }
}

#[inline(always)]
fn clear_half_open(key: &FlowKey6, nat: bool, backend_id: u32) {
    let _ = HALF_OPEN6.remove(key);
    if nat && let Some(reply_key) = reply_key(key, backend_id) {
        let _ = HALF_OPEN6.remove(reply_key);
    }
}
