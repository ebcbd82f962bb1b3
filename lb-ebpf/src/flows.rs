//! The flow tables and the flow lifecycle (steps 2 and 4 of the packet path;
//! the states and rules are `lb_common::flow`, docs/architecture.md has the
//! picture).
//!
//! - `HALF_OPEN` (LRU): flows that have not completed a handshake (a SYN, a
//!   UDP packet, or a hash-on-miss packet created them). New flows only ever
//!   evict each other here: no number of spoofed SYNs reaches an
//!   established flow.
//! - `CONNTRACK` (plain hash, never evicted): established flows, promoted
//!   from `HALF_OPEN` by the client's first packet that is not a SYN (the
//!   handshake's ACK; a UDP flow's second packet). Entries leave on expiry
//!   only: the program removes an expired entry a packet finds, the agent's
//!   sweep the rest.
//!
//! A NAT flow has two entries in the same table, forward (client → VIP) and
//! reply (backend → client); they are created, promoted and removed together.

use aya_ebpf::{
    helpers::generated::bpf_ktime_get_coarse_ns,
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
};
use lb_common::{
    BACKEND_F_IN_RING, BudgetWindow, DEFAULT_CONNTRACK_SIZE, DEFAULT_HALF_OPEN_SIZE, Flow,
    FlowConf, FlowCounts, FlowKey, MAX_BACKENDS, NextHop,
    flow::{
        FORWARD, REPLY, STATE_CLOSING, STATE_ESTABLISHED, STATE_NEW, forward_key, is_expired,
        reply_key, ticks,
    },
};

use crate::BACKENDS;

/// Established flows, both directions (two entries per NAT flow). Sized by
/// the agent at load time (twice `conntrack-size`).
#[map]
pub(crate) static CONNTRACK: HashMap<FlowKey, Flow> =
    HashMap::with_max_entries(DEFAULT_CONNTRACK_SIZE * 2, 0);
/// Flows that have not completed a handshake, both directions. Sized by the
/// agent at load time (twice `half-open-size`). Per-CPU LRU lists
/// (`BPF_F_NO_COMMON_LRU`, as Katran's flow table): an insert takes a free
/// entry from its own CPU's list instead of contending for a shared one —
/// the cost that matters in a flood.
#[map]
pub(crate) static HALF_OPEN: LruHashMap<FlowKey, Flow> =
    LruHashMap::with_max_entries(DEFAULT_HALF_OPEN_SIZE * 2, BPF_F_NO_COMMON_LRU);
/// The lifecycle's settings (timeouts, new-flow budget). Written by the agent.
#[map]
static FLOW_CONF: Array<FlowConf> = Array::with_max_entries(1, 0);
/// Backend id → established flows opened and closed, atomic adds from every
/// CPU. The agent reads `opened - closed - FLOWS_SWEPT`.
#[map]
static BACKEND_FLOWS: Array<FlowCounts> = Array::with_max_entries(MAX_BACKENDS, 0);
/// Backend id → established flows the agent's sweep removed. Written by the
/// agent only (it cannot add atomically to `BACKEND_FLOWS`); declared here
/// so it is pinned with the data plane and survives agent restarts.
#[map]
static FLOWS_SWEPT: Array<u64> = Array::with_max_entries(MAX_BACKENDS, 0);
/// Per CPU: new flows inserted in the current tick, for the budget.
#[map]
static NEW_FLOW_BUDGET: PerCpuArray<BudgetWindow> = PerCpuArray::with_max_entries(1, 0);

const BPF_NOEXIST: u64 = 1;
const BPF_F_NO_COMMON_LRU: u32 = 1 << 1;

/// Which table an entry lives in.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Table {
    Established,
    HalfOpen,
}

impl Table {
    #[inline(always)]
    fn get(self, key: &FlowKey) -> Option<*mut Flow> {
        match self {
            Table::Established => CONNTRACK.get_ptr_mut(key),
            Table::HalfOpen => HALF_OPEN.get_ptr_mut(key),
        }
    }

    /// Removes one entry; true only for the caller that removed it.
    #[inline(always)]
    fn remove(self, key: &FlowKey) -> bool {
        match self {
            Table::Established => CONNTRACK.remove(key).is_ok(),
            Table::HalfOpen => HALF_OPEN.remove(key).is_ok(),
        }
    }

    #[inline(always)]
    fn insert_new(self, key: &FlowKey, flow: &Flow) -> bool {
        match self {
            Table::Established => CONNTRACK.insert(key, flow, BPF_NOEXIST).is_ok(),
            Table::HalfOpen => HALF_OPEN.insert(key, flow, 0).is_ok(),
        }
    }
}

/// Now, in ticks (about a second): the coarse clock is the cheapest.
#[inline(always)]
pub(crate) fn now() -> u32 {
    // SAFETY: plain helper call.
    ticks(unsafe { bpf_ktime_get_coarse_ns() })
}

/// The lifecycle settings; all zero (every timeout one tick... never: the
/// agent writes them before attaching) if the slot is unreadable.
#[inline(always)]
pub(crate) fn conf() -> Option<&'static FlowConf> {
    FLOW_CONF.get(0)
}

/// Steps 2: the live entry for `key` in `table`, refreshed; `None` on a miss.
/// An entry idle past its timeout is a miss and is removed with its pair,
/// unless the pair (the other direction) has carried a packet within it.
#[inline(always)]
pub(crate) fn live(table: Table, key: &FlowKey, now: u32) -> Option<*mut Flow> {
    let entry = table.get(key)?;
    // SAFETY: a map value; the LRU may recycle it under us at worst, which
    // yields a wrong-but-valid entry, never a fault.
    let flow = unsafe { &mut *entry };
    if flow.seen != now {
        let conf = conf()?;
        if is_expired(conf, key.protocol, flow, now) && !pair_is_live(table, key, flow, now, conf) {
            remove_flow(table, key, flow);
            return None;
        }
        // One store per tick, not per packet.
        flow.seen = now;
    }
    Some(entry)
}

#[inline(always)]
fn pair_is_live(table: Table, key: &FlowKey, flow: &Flow, now: u32, conf: &FlowConf) -> bool {
    let Some(pair) = pair_key(key, flow) else {
        return false;
    };
    match table.get(&pair) {
        // SAFETY: a map value, as in `live`.
        Some(p) => !is_expired(conf, key.protocol, unsafe { &*p }, now),
        None => false,
    }
}

/// The key of the entry's other direction, if its flow has one (NAT).
#[inline(always)]
fn pair_key(key: &FlowKey, flow: &Flow) -> Option<FlowKey> {
    if flow.direction == REPLY {
        return Some(forward_key(key, flow));
    }
    if flow.vip == 0 {
        return None;
    }
    // A forward entry of a NAT flow keeps its backend's address in the
    // BACKENDS slot; `vip` non-zero marks "has a reply entry".
    let backend = BACKENDS.get(flow.backend_id)?;
    Some(reply_key(key, backend))
}

/// Removes a flow (the entry and its pair) from `table`. An established flow
/// counts as closed for its backend once, by whoever removed its forward
/// entry, unless FIN/RST already counted it.
#[inline(always)]
pub(crate) fn remove_flow(table: Table, key: &FlowKey, flow: &Flow) {
    let pair = pair_key(key, flow);
    let (backend_id, state, direction) = (flow.backend_id, flow.state, flow.direction);
    let removed = table.remove(key);
    if let Some(pair) = pair {
        let pair_removed = table.remove(&pair);
        // The forward entry is the pair when `key` is a reply's.
        if direction == REPLY {
            if pair_removed && table == Table::Established && state == STATE_ESTABLISHED {
                count_closed(backend_id);
            }
            return;
        }
    }
    if removed && table == Table::Established && state == STATE_ESTABLISHED {
        count_closed(backend_id);
    }
}

/// A FIN or RST (either direction): the flow moves to the closing timeout
/// and stops counting as active. Both entries of a NAT flow carry the
/// state, so both expire on the closing timeout. The forward entry's change
/// is a compare-and-swap: two CPUs seeing the FIN count it once.
#[inline(always)]
pub(crate) fn close(table: Table, key: &FlowKey, flow: &mut Flow) {
    if flow.state != STATE_ESTABLISHED {
        return;
    }
    let pair = pair_key(key, flow).and_then(|p| table.get(&p));
    let forward = if flow.direction == REPLY {
        match pair {
            Some(f) => f,
            None => return,
        }
    } else {
        flow as *mut Flow
    };
    // SAFETY: a valid, aligned u32 in a map value (`live` on recycling).
    let (_, swapped) = unsafe {
        core::intrinsics::atomic_cxchg::<
            u32,
            { core::intrinsics::AtomicOrdering::SeqCst },
            { core::intrinsics::AtomicOrdering::SeqCst },
        >(&raw mut (*forward).state, STATE_ESTABLISHED, STATE_CLOSING)
    };
    if swapped {
        // SAFETY: as above.
        count_closed(unsafe { (*forward).backend_id });
    }
    flow.state = STATE_CLOSING;
    if let Some(p) = pair {
        // SAFETY: as above; a plain store, the count is the forward's.
        unsafe { (*p).state = STATE_CLOSING };
    }
}

/// Step 4's entry: a new flow in `HALF_OPEN`, with its reply entry for NAT.
/// Returns the forward entry.
#[inline(always)]
pub(crate) fn create(
    key: &FlowKey,
    service_id: u32,
    backend_id: u32,
    nat: bool,
    now: u32,
) -> Option<*mut Flow> {
    let flow = entry(
        backend_id,
        service_id,
        now,
        if nat { key.daddr } else { 0 },
        0,
        FORWARD,
    );
    if !Table::HalfOpen.insert_new(key, &flow) {
        return None;
    }
    if nat && !insert_reply(Table::HalfOpen, key, service_id, backend_id, STATE_NEW, now) {
        let _ = HALF_OPEN.remove(key);
        return None;
    }
    HALF_OPEN.get_ptr_mut(key)
}

#[inline(always)]
fn entry(backend_id: u32, service_id: u32, now: u32, vip: u32, vport: u16, direction: u8) -> Flow {
    Flow {
        backend_id,
        service_id,
        state: STATE_NEW,
        seen: now,
        vip,
        vport,
        direction,
        _pad: 0,
        next_hop: NextHop::default(),
    }
}

#[inline(always)]
fn insert_reply(
    table: Table,
    key: &FlowKey,
    service_id: u32,
    backend_id: u32,
    state: u32,
    now: u32,
) -> bool {
    let Some(backend) = BACKENDS.get(backend_id) else {
        return false;
    };
    let mut reply = entry(backend_id, service_id, now, key.daddr, key.dport, REPLY);
    reply.state = state;
    table.insert_new(&reply_key(key, backend), &reply)
}

/// The client confirmed a half-open flow: it moves to `CONNTRACK` (both
/// entries) and counts as active. If `CONNTRACK` is full the flow stays
/// half-open, still forwarded (it can then be evicted by new flows).
#[inline(always)]
pub(crate) fn promote(key: &FlowKey, flow: &mut Flow, now: u32) {
    let nat = flow.vip != 0;
    flow.state = STATE_ESTABLISHED;
    if !Table::Established.insert_new(key, flow) {
        flow.state = STATE_NEW;
        return;
    }
    let (service_id, backend_id) = (flow.service_id, flow.backend_id);
    if nat {
        if !insert_reply(
            Table::Established,
            key,
            service_id,
            backend_id,
            STATE_ESTABLISHED,
            now,
        ) {
            let _ = CONNTRACK.remove(key);
            flow.state = STATE_NEW;
            return;
        }
        if let Some(backend) = BACKENDS.get(backend_id) {
            let _ = HALF_OPEN.remove(&reply_key(key, backend));
        }
    }
    let _ = HALF_OPEN.remove(key);
    count_opened(backend_id);
}

/// A SYN on a tuple whose entry belongs to a finished connection (closing)
/// or to a backend that takes no new flows (drained, down, disabled,
/// removed: not in its service's ring): the client reused a source port, so
/// this is a new connection. The old flow is removed; the caller treats the
/// SYN as a miss and schedules it afresh.
#[inline(always)]
pub(crate) fn restarted_by_syn(table: Table, key: &FlowKey, flow: &Flow) -> bool {
    let retired = match BACKENDS.get(flow.backend_id) {
        Some(b) => b.flags & BACKEND_F_IN_RING == 0,
        None => true,
    };
    if !retired && flow.state != STATE_CLOSING {
        return false;
    }
    remove_flow(table, key, flow);
    true
}

/// The per-CPU new-flow budget: false once this CPU inserted
/// `new_flow_budget` flows in the current tick.
#[inline(always)]
pub(crate) fn within_budget(now: u32) -> bool {
    let Some(conf) = conf() else {
        return true;
    };
    let budget = conf.new_flow_budget;
    if budget == 0 {
        return true;
    }
    let Some(window) = NEW_FLOW_BUDGET.get_ptr_mut(0) else {
        return true;
    };
    // SAFETY: per-CPU slot: no other CPU writes it.
    let window = unsafe { &mut *window };
    if window.tick != now {
        window.tick = now;
        window.inserted = 0;
    }
    if window.inserted >= budget {
        return false;
    }
    window.inserted += 1;
    true
}

#[inline(always)]
fn count_opened(backend_id: u32) {
    if let Some(c) = BACKEND_FLOWS.get_ptr_mut(backend_id) {
        // SAFETY: a valid, aligned u64 in an array map value; SeqCst so the
        // BPF backend emits a real atomic add (see `schedule`).
        unsafe {
            core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::SeqCst }>(
                &raw mut (*c).opened,
                1,
            )
        };
    }
}

#[inline(always)]
fn count_closed(backend_id: u32) {
    if let Some(c) = BACKEND_FLOWS.get_ptr_mut(backend_id) {
        // SAFETY: as in `count_opened`.
        unsafe {
            core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::SeqCst }>(
                &raw mut (*c).closed,
                1,
            )
        };
    }
}
