//! The flow tables and the flow lifecycle (steps 2 and 4 of the packet path;
//! the states and rules are `lb_common::flow`, docs/architecture.md has the
//! picture).
//!
//! - `HALF_OPEN` (an array of one-line slots in buckets of two): flows that
//!   have not completed a handshake (a SYN, a UDP packet, or a hash-on-miss
//!   packet created them). A new flow takes a slot of the bucket its client
//!   hashes to (free, else the least recently seen): an insert is one cache
//!   line, with no list to walk or evict
//!   from (an LRU insert into a cold table touched a dozen lines and was most
//!   of a new flow's cost), and new flows only ever replace each other here:
//!   no number of spoofed SYNs reaches an established flow.
//! - `CONNTRACK` (plain hash, never evicted): established flows, promoted
//!   from `HALF_OPEN` by the client's packet that completes the handshake
//!   (`lb_common::flow::confirms`: NAT, the ACK of the backend's SYN-ACK;
//!   DSR, a segment past the handshake's ACK; UDP, the second packet).
//!   Entries leave on expiry only: the program removes an expired entry a
//!   packet finds, the agent's sweep the rest (and, under pressure, flows
//!   idle for long).
//!
//! An established NAT flow has two entries in `CONNTRACK`, forward (client →
//! VIP) and reply (backend → client), created, promoted and removed
//! together. A half-open flow has one slot for both directions, chosen by
//! what both carry (the client's address and port): a reply finds it there,
//! so a new NAT flow writes one line, and its directions cannot part.
//!
//! Half-open entries are read as copies under the slot's sequence lock
//! (`HalfOpenSlot`): a packet works on its copy, and a slot is only ever
//! written whole, by a writer holding the lock.

use aya_ebpf::{
    helpers::generated::bpf_jiffies64,
    macros::map,
    maps::{Array, HashMap, PerCpuArray},
};
use core::{
    intrinsics::{AtomicOrdering::SeqCst, atomic_cxchg, atomic_xadd},
    mem::{MaybeUninit, size_of},
    ptr::{read_volatile, write_volatile},
};
use lb_common::{
    BACKEND_F_IN_RING, BudgetWindow, DEFAULT_CONNTRACK_SIZE, DEFAULT_HALF_OPEN_SIZE, Endpoint,
    EstablishedSlot, FLOW_F_FULL_NAT, FLOW_F_PROXY, Flow, FlowConf, FlowCounts, FlowKey,
    HALF_OPEN_FLAGS, HalfOpenEntry, HalfOpenSlot, MAX_BACKENDS, NextHop,
    flow::{
        FORWARD, HALF_OPEN_WAYS, REPLY, STATE_CLOSING, STATE_ESTABLISHED, STATE_NEW, answer,
        bucket_hash, clock_ns, forward_key, is_expired, replies_to, reply_key, slot_of_hash, ticks,
        tie_replaces,
    },
};

use crate::{
    BACKENDS,
    established::{self, Lookup, Placed, Side},
    fullnat,
};

/// The established table's overflow (`established.rs`): flows whose bucket
/// had no free way, both directions (two entries per NAT flow). Sized by
/// the agent at load time (twice `conntrack-size`).
#[map]
pub(crate) static CONNTRACK: HashMap<FlowKey, Flow> =
    HashMap::with_max_entries(DEFAULT_CONNTRACK_SIZE * 2, 0);
/// Flows that have not completed a handshake, both directions, one slot
/// each. Sized by the agent at load time (twice `half-open-size`);
/// mappable, so the agent reads it as memory and writes it under the same
/// slot locks as the program.
#[map]
pub(crate) static HALF_OPEN: Array<HalfOpenSlot> =
    Array::with_max_entries(DEFAULT_HALF_OPEN_SIZE * 2, BPF_F_MMAPABLE);
/// The lifecycle's settings (timeouts, new-flow budget, the half-open
/// table's size and seed). Written by the agent.
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
/// The backend endpoints of NAT services: their segments that find no flow
/// are dropped (`DropBackendNoFlow`). Written by the agent.
#[map]
static NAT_BACKENDS: HashMap<Endpoint, u32> = HashMap::with_max_entries(MAX_BACKENDS, 0);
/// Per CPU: new flows inserted in the current tick, for the budget.
#[map]
static NEW_FLOW_BUDGET: PerCpuArray<BudgetWindow> = PerCpuArray::with_max_entries(1, 0);

const BPF_NOEXIST: u64 = 1;
const BPF_F_MMAPABLE: u32 = 1 << 10;

/// The `HALF_OPEN` slot a half-open flow's copy was read from.
#[derive(Clone, Copy)]
pub(crate) struct Slot(*mut HalfOpenSlot);

/// Which table an entry lives in.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Table {
    Established,
    HalfOpen,
}

/// Now, in ticks (about a second), on the agent's clock
/// (CLOCK_MONOTONIC_COARSE) read through `jiffies`: `bpf_jiffies64` is
/// rewritten by the verifier into a load of the kernel's variable, where
/// `bpf_ktime_get_coarse_ns` was a helper call (~15 ns with retpolines) on
/// every packet. 0 until the agent wrote the clock's settings.
#[inline(always)]
pub(crate) fn now() -> u32 {
    now_in(conf())
}

/// [`now`] with the packet's lifecycle settings (`conf()`, read once by
/// the caller and passed on: each read is a map lookup).
#[inline(always)]
pub(crate) fn now_in(conf: Option<&FlowConf>) -> u32 {
    let Some(conf) = conf else {
        return 0;
    };
    // SAFETY: plain helper call (inlined by the verifier).
    let jiffies = unsafe { bpf_jiffies64() };
    ticks(clock_ns(jiffies, conf.jiffy_ns, conf.clock_epoch_ns))
}

/// The lifecycle settings; all zero (every timeout one tick... never: the
/// agent writes them before attaching) if the slot is unreadable.
#[inline(always)]
pub(crate) fn conf() -> Option<&'static FlowConf> {
    FLOW_CONF.get(0)
}

/// Step 2: the live established entry for `key` (as it arrives: a flow's
/// forward entry, or a NAT flow's reply entry), refreshed; `None` on a
/// miss. The sender's bucket of `ESTABLISHED` first (`established::find`);
/// on a miss, if the packet is not to a VIP (`to_vip`, asked only then),
/// the receiver's bucket, where a NAT backend's reply finds its flow — a
/// full-NAT reply too, once its claim gave `key` its NAT shape
/// (`fullnat::nat_shaped`: the caller's key is changed, for the rest of the
/// path); then `CONNTRACK`, the overflow, only if a bucket looked in is
/// flagged. An entry idle past its timeout is a miss and is removed with
/// its flow, unless the flow's other direction has carried a packet within
/// it.
#[inline(always)]
pub(crate) fn established(
    key: &mut FlowKey,
    now: u32,
    to_vip: impl FnMut() -> bool,
) -> Option<*mut Flow> {
    established_in(conf(), key, now, to_vip).map(|hit| hit.entry)
}

/// An established entry found by [`established_in`].
#[derive(Clone, Copy)]
pub(crate) struct Hit {
    /// The entry for the packet's direction.
    pub(crate) entry: *mut Flow,
    /// Its `ESTABLISHED` slot; `None`: the overflow (`CONNTRACK`).
    pub(crate) slot: Option<*mut EstablishedSlot>,
}

/// [`established`] with the packet's lifecycle settings (read once by the
/// caller), and the slot the entry is in.
#[inline(always)]
pub(crate) fn established_in(
    conf: Option<&FlowConf>,
    key: &mut FlowKey,
    now: u32,
    mut to_vip: impl FnMut() -> bool,
) -> Option<Hit> {
    let conf = conf?;
    let lookup = match established::find(conf, key, Side::Sender) {
        Lookup::Miss { overflow } if !to_vip() => {
            // Where it was sent: a full-NAT reply's flow's source address
            // and port, which its NAT shape no longer shows.
            let to = (key.daddr, key.dport);
            fullnat::nat_shaped(conf, key);
            match established::find(conf, key, Side::Receiver { to }) {
                Lookup::Miss { overflow: also } => Lookup::Miss {
                    overflow: overflow | also,
                },
                found => found,
            }
        }
        lookup => lookup,
    };
    let (slot, entry) = match lookup {
        Lookup::Found(slot, entry) => (slot, entry),
        Lookup::Miss { overflow: true } => {
            return overflowed(conf, key, now).map(|entry| Hit { entry, slot: None });
        }
        Lookup::Miss { overflow: false } => return None,
    };
    // SAFETY: an array map value: stays mapped; if its slot changes hands
    // under us, the writes below land in the new flow's words, which its
    // next packet rewrites (as a removed CONNTRACK entry stayed readable).
    let flow = unsafe { &mut *entry };
    if flow.seen != now {
        if is_expired(conf, key.protocol, flow, now)
            && !established::other_is_live(slot, flow.direction, key.protocol, conf, now)
        {
            remove_flow(Table::Established, key, flow);
            return None;
        }
        // One store per tick, not per packet.
        flow.seen = now;
    }
    Some(Hit {
        entry,
        slot: Some(slot),
    })
}

/// Step 2 in the overflow (`CONNTRACK`): as `established`, for a flow its
/// bucket had no free way for.
#[inline(always)]
fn overflowed(conf: &FlowConf, key: &FlowKey, now: u32) -> Option<*mut Flow> {
    let entry = CONNTRACK.get_ptr_mut(key)?;
    // SAFETY: a map value; an entry removed under us stays readable until
    // the program ends (RCU), at worst stale, never a fault.
    let flow = unsafe { &mut *entry };
    if flow.seen != now {
        if is_expired(conf, key.protocol, flow, now) && !pair_is_live(key, flow, now, conf) {
            remove_flow(Table::Established, key, flow);
            return None;
        }
        flow.seen = now;
    }
    Some(entry)
}

#[inline(always)]
fn pair_is_live(key: &FlowKey, flow: &Flow, now: u32, conf: &FlowConf) -> bool {
    let Some(pair) = pair_key(key, flow) else {
        return false;
    };
    match CONNTRACK.get_ptr(&pair) {
        // SAFETY: a map value, as in `overflowed`.
        Some(p) => !is_expired(conf, key.protocol, unsafe { &*p }, now),
        None => false,
    }
}

/// Step 2, second table: a copy of the live half-open entry `key` belongs
/// to; `None` on a miss. A flow's one slot serves both directions: a packet
/// to a VIP (`to_vip`) is looked up as a client's, anything else as a reply
/// (backend → client, NAT; `arrived`: the packet's own tuple, before a
/// full-NAT claim gave `key` its NAT shape), whose entry is derived from
/// the slot. An
/// expired entry is a miss; a live one has its `seen` refreshed once per
/// tick, by either direction (a UDP request answered for longer than its
/// timeout stays).
#[inline(always)]
pub(crate) fn half_open(
    key: &FlowKey,
    arrived: &FlowKey,
    now: u32,
    to_vip: bool,
) -> Option<(Flow, Slot)> {
    let conf = conf()?;
    let (flow, slot) = if to_vip {
        forward_of_bucket(conf, key)?
    } else {
        reply_of_bucket(conf, key, (arrived.daddr, arrived.dport))?
    };
    if flow.seen != now {
        if is_expired(conf, key.protocol, &flow, now) {
            return None;
        }
        // A lone aligned store outside the lock: if the slot changed hands
        // meanwhile, its new flow just looks fresh, which it is.
        // SAFETY: a valid, aligned u32 in an array map value.
        unsafe { write_volatile(&raw mut (*slot).flow.seen, now) };
    }
    Some((flow, Slot(slot)))
}

/// A backend's segment (TCP flags, sequence number) on a half-open NAT
/// flow (`reply`, the reply copy `key` found in `slot`): a SYN-ACK or the
/// first answer to a flow picked up mid-stream is recorded in the slot
/// (`lb_common::flow::answer`). A slot another writer holds records
/// nothing: the backend retransmits its SYN-ACK.
#[inline(always)]
pub(crate) fn answered(slot: Slot, key: &FlowKey, reply: &Flow, flags: u8, seq: u32) {
    if let Some((state, expect)) = answer(reply.state, reply.seq, flags, seq) {
        record(slot, &forward_key(key, reply), state, expect);
    }
}

/// Writes a half-open flow's new state and `seq` into its slot, under the
/// slot's lock, if the slot still holds the flow whose forward key is
/// `forward` (it may have changed hands since it was read).
#[inline(always)]
pub(crate) fn record(slot: Slot, forward: &FlowKey, state: u32, seq: u32) {
    let slot = slot.0;
    if !lock(slot) {
        return;
    }
    // SAFETY: locked: the slot is ours to write.
    unsafe {
        if same_key(&raw const (*slot).key, forward) {
            write_volatile(&raw mut (*slot).flow.state, state);
            write_volatile(&raw mut (*slot).flow.seq, seq);
        }
    }
    unlock(slot);
}

/// Flags the half-open flow `forward` (just created) as a PROXY flow
/// (`FLOW_F_PROXY`) whose client's first sequence number is `first`, under
/// its slot's lock. False if its slot is not there or is being written.
#[inline(always)]
pub(crate) fn mark_proxy(forward: &FlowKey, first: u32) -> bool {
    let Some(conf) = conf() else {
        return false;
    };
    let Some((_, slot)) = forward_of_bucket(conf, forward) else {
        return false;
    };
    if !lock(slot) {
        return false;
    }
    // SAFETY: locked: the slot is ours to write.
    let marked = unsafe {
        let here = same_key(&raw const (*slot).key, forward);
        if here {
            let flags = &raw mut (*slot).flow.flags;
            write_volatile(flags, read_volatile(flags) | FLOW_F_PROXY);
            write_volatile(&raw mut (*slot).flow.proxy_first, first);
        }
        here
    };
    unlock(slot);
    marked
}

/// The first client sequence number `mark_proxy` recorded for the
/// half-open flow `forward` in `slot`, if the slot still holds it.
#[inline(always)]
fn proxy_first(slot: Slot, forward: &FlowKey) -> Option<u32> {
    let slot = slot.0;
    // SAFETY: a valid array map value, read under its sequence as in
    // `read_slot`.
    unsafe {
        let seq = read_volatile(&raw const (*slot).seq);
        if seq & 1 != 0 || !same_key(&raw const (*slot).key, forward) {
            return None;
        }
        let first = read_volatile(&raw const (*slot).flow.proxy_first);
        (read_volatile(&raw const (*slot).seq) == seq).then_some(first)
    }
}

/// The `first` `mark_proxy` recorded for the half-open flow `forward`, if
/// a slot of its bucket still holds it.
#[inline(always)]
fn half_open_first(conf: &FlowConf, forward: &FlowKey) -> Option<u32> {
    let first = bucket_of(conf, forward.saddr, forward.sport, forward.protocol);
    for way in 0..HALF_OPEN_WAYS {
        let slot = HALF_OPEN.get_ptr_mut(first + way)?;
        if let Some(found) = proxy_first(Slot(slot), forward) {
            return Some(found);
        }
    }
    None
}

/// Is `key`'s source a backend endpoint of a NAT service?
#[inline(always)]
pub(crate) fn from_nat_backend(key: &FlowKey) -> bool {
    let endpoint = Endpoint {
        addr: key.saddr,
        port: key.sport,
        protocol: key.protocol,
        _pad: 0,
    };
    NAT_BACKENDS.get_ptr(&endpoint).is_some()
}

/// The slot of the bucket holding the flow whose forward key is `key`.
#[inline(always)]
pub(crate) fn forward_of_bucket(
    conf: &FlowConf,
    key: &FlowKey,
) -> Option<(Flow, *mut HalfOpenSlot)> {
    let first = bucket_of(conf, key.saddr, key.sport, key.protocol);
    for way in 0..HALF_OPEN_WAYS {
        let slot = HALF_OPEN.get_ptr_mut(first + way)?;
        if let Some(flow) = read_slot(slot, key) {
            return Some((flow, slot));
        }
    }
    None
}

/// A backend's reply (backend → client) to a half-open NAT flow: a slot of
/// its destination's (the client's) bucket holds the flow if the flow's
/// backend is the sender (and, full NAT, the reply was sent `to` the
/// flow's source address and port); its reply entry is made from it.
#[inline(always)]
fn reply_of_bucket(
    conf: &FlowConf,
    key: &FlowKey,
    to: (u32, u16),
) -> Option<(Flow, *mut HalfOpenSlot)> {
    let first = bucket_of(conf, key.daddr, key.dport, key.protocol);
    for way in 0..HALF_OPEN_WAYS {
        let slot = HALF_OPEN.get_ptr_mut(first + way)?;
        if let Some(found) = reply_of_slot(slot, key, to) {
            return Some(found);
        }
    }
    None
}

#[inline(always)]
fn reply_of_slot(
    slot: *mut HalfOpenSlot,
    key: &FlowKey,
    to: (u32, u16),
) -> Option<(Flow, *mut HalfOpenSlot)> {
    // SAFETY: a valid array map value; the key is checked under the copy's
    // sequence (`read_slot`) once it is known.
    let forward = unsafe { copy_key(&raw const (*slot).key) };
    if forward.saddr != key.daddr || forward.sport != key.dport || forward.protocol != key.protocol
    {
        return None;
    }
    let flow = read_slot(slot, &forward)?;
    if flow.vip == 0 || !replies_to(&flow, to) {
        return None;
    }
    let backend = BACKENDS.get(flow.backend_id)?;
    if backend.addr != key.saddr || backend.port != key.sport {
        return None;
    }
    let mut reply = entry(
        flow.backend_id,
        flow.service_id,
        flow.seen,
        forward.daddr,
        forward.dport,
        REPLY,
    );
    reply.state = flow.state;
    reply.seq = flow.seq;
    reply.flags = flow.flags & HALF_OPEN_FLAGS;
    Some((reply, slot))
}

/// The first slot of the bucket of the flow whose client is
/// `client:port` (out of range, so every lookup misses, before the agent
/// sized the table).
#[inline(always)]
fn bucket_of(conf: &FlowConf, client: u32, port: u16, protocol: u8) -> u32 {
    first_slot(
        conf,
        bucket_hash(client, port, protocol, conf.half_open_seed),
    )
}

#[inline(always)]
fn first_slot(conf: &FlowConf, hash: u32) -> u32 {
    if conf.half_open_slots < HALF_OPEN_WAYS {
        return u32::MAX - HALF_OPEN_WAYS;
    }
    slot_of_hash(hash, conf.half_open_slots)
}

/// The slot's entry if it is `key`'s, copied whole under the sequence lock.
#[inline(always)]
fn read_slot(slot: *mut HalfOpenSlot, key: &FlowKey) -> Option<Flow> {
    // SAFETY: `slot` is a valid array map value; every read is volatile so
    // the copy happens between the two reads of `seq`.
    unsafe {
        let seq = read_volatile(&raw const (*slot).seq);
        if seq & 1 != 0 || !same_key(&raw const (*slot).key, key) {
            return None;
        }
        let entry: HalfOpenEntry = copy_words(&raw const (*slot).flow);
        if read_volatile(&raw const (*slot).seq) != seq {
            return None;
        }
        Some(Flow::from(&entry))
    }
}

/// A slot under a sequence lock (`seq`: odd while a writer holds it), the
/// layout `HALF_OPEN`'s and `ESTABLISHED`'s slots share.
pub(crate) trait SeqLocked {
    /// The slot's `seq` word.
    fn seq(slot: *mut Self) -> *mut u32;
}

impl SeqLocked for HalfOpenSlot {
    #[inline(always)]
    fn seq(slot: *mut Self) -> *mut u32 {
        // SAFETY: a field of the caller's valid slot pointer.
        unsafe { &raw mut (*slot).seq }
    }
}

/// Takes the slot's lock; false if another writer holds it (that writer
/// wins: the caller gives up, as half-open entries are best effort and an
/// established slot's writers retry or overflow).
#[inline(always)]
pub(crate) fn lock<S: SeqLocked>(slot: *mut S) -> bool {
    let seq = S::seq(slot);
    // SAFETY: a valid, aligned u32 in an array map value.
    let now = unsafe { read_volatile(seq) };
    if now & 1 != 0 {
        return false;
    }
    // SAFETY: as above.
    let (_, locked) = unsafe { atomic_cxchg::<u32, { SeqCst }, { SeqCst }>(seq, now, now + 1) };
    locked
}

#[inline(always)]
pub(crate) fn unlock<S: SeqLocked>(slot: *mut S) {
    // SAFETY: as in `lock`; the add publishes the writes before it.
    unsafe { atomic_xadd::<u32, u32, { SeqCst }>(S::seq(slot), 1) };
}

/// Puts a forward entry (client → VIP) in a slot of its bucket: the one
/// holding the same flow (a retransmitted SYN), else an empty one, else the
/// one least recently seen (one of them at random if they were seen in the
/// same tick). A flow lives in one slot, both directions, so
/// whatever it replaces goes whole.
#[inline(always)]
pub(crate) fn write_slot(conf: &FlowConf, key: &FlowKey, flow: &Flow) {
    let hash = bucket_hash(key.saddr, key.sport, key.protocol, conf.half_open_seed);
    let Some(slot) = victim(first_slot(conf, hash), hash, key) else {
        return;
    };
    if !lock(slot) {
        return;
    }
    // SAFETY: locked: the slot is ours to write.
    unsafe {
        write_words(&raw mut (*slot).key, key);
        write_words(&raw mut (*slot).flow, &HalfOpenEntry::from(flow));
    }
    unlock(slot);
}

/// The slot of bucket `first` a new flow `key` (its bucket hash `hash`)
/// takes (chosen without the locks: a race only makes the choice less
/// good).
#[inline(always)]
fn victim(first: u32, hash: u32, key: &FlowKey) -> Option<*mut HalfOpenSlot> {
    let mut chosen: Option<(*mut HalfOpenSlot, u32)> = None;
    let mut ties = 0u32;
    for way in 0..HALF_OPEN_WAYS {
        let slot = HALF_OPEN.get_ptr_mut(first + way)?;
        // SAFETY: a valid array map value; plain racy peeks.
        let (same, empty, seen) = unsafe {
            (
                same_key(&raw const (*slot).key, key),
                same_key(&raw const (*slot).key, &FlowKey::EMPTY),
                read_volatile(&raw const (*slot).flow.seen),
            )
        };
        if same || empty {
            return Some(slot);
        }
        match chosen {
            Some((_, oldest)) if seen == oldest => {
                // Seen in the same tick (~1 s; under a flood, all of them):
                // any of them, by the flow's keyed hash (as good as a
                // random draw to a flooder who does not know the seed, and
                // no helper call), so no way is the one a flood always
                // takes and a handshake keeps its slot while fewer than two
                // others land in its bucket.
                ties += 1;
                if tie_replaces(hash, way, ties) {
                    chosen = Some((slot, seen));
                }
            }
            Some((_, oldest)) if (seen.wrapping_sub(oldest) as i32) >= 0 => {}
            _ => {
                chosen = Some((slot, seen));
                ties = 1;
            }
        }
    }
    chosen.map(|(slot, _)| slot)
}

/// Empties the slot of the flow whose forward key is `key`, if it holds
/// it; what it held of a full-NAT claim, if it was one's.
#[inline(always)]
fn clear_slot(conf: &FlowConf, key: &FlowKey) -> Option<Claimed> {
    let first = bucket_of(conf, key.saddr, key.sport, key.protocol);
    let mut claimed = None;
    for way in 0..HALF_OPEN_WAYS {
        let Some(slot) = HALF_OPEN.get_ptr_mut(first + way) else {
            return claimed;
        };
        // SAFETY: a valid array map value (a racy peek; rechecked locked).
        if !unsafe { same_key(&raw const (*slot).key, key) } || !lock(slot) {
            continue;
        }
        // SAFETY: locked.
        unsafe {
            if same_key(&raw const (*slot).key, key) {
                write_words(&raw mut (*slot).key, &FlowKey::EMPTY);
                let entry = &raw const (*slot).flow;
                if read_volatile(&raw const (*entry).flags) & FLOW_F_FULL_NAT != 0 {
                    claimed = Some(Claimed {
                        backend_id: read_volatile(&raw const (*entry).backend_id),
                        source: (
                            read_volatile(&raw const (*entry).vip),
                            read_volatile(&raw const (*entry).snat_port),
                        ),
                    });
                }
            }
        }
        unlock(slot);
    }
    claimed
}

/// A removed full-NAT flow's claim: its backend, and the source address and
/// port it was given (`fullnat::release` returns them to the pool).
pub(crate) struct Claimed {
    pub(crate) backend_id: u32,
    pub(crate) source: (u32, u16),
}

/// Compares a key in a slot with `key` word by word (the slot's key is
/// only 4-byte aligned).
#[inline(always)]
pub(crate) unsafe fn same_key(stored: *const FlowKey, key: &FlowKey) -> bool {
    let (a, b) = (stored.cast::<u32>(), (key as *const FlowKey).cast::<u32>());
    let mut same = true;
    for i in 0..size_of::<FlowKey>() / 4 {
        // SAFETY: both point at a whole FlowKey (caller: `stored` valid).
        same &= unsafe { read_volatile(a.add(i)) == *b.add(i) };
    }
    same
}

#[inline(always)]
pub(crate) unsafe fn copy_key(src: *const FlowKey) -> FlowKey {
    // SAFETY: the caller's pointer is a valid FlowKey.
    unsafe { copy_words(src) }
}

/// Copies a flow entry out of a map value.
#[inline(always)]
pub(crate) unsafe fn copy_flow(src: *const Flow) -> Flow {
    // SAFETY: the caller's pointer is a valid Flow.
    unsafe { copy_words(src) }
}

/// Copies a 4-byte-aligned plain struct as 32-bit volatile loads: a struct
/// copy would become an out-of-line BPF memcpy, and a volatile copy cannot
/// be merged or moved out of the lock's window.
#[inline(always)]
pub(crate) unsafe fn copy_words<T: Copy>(src: *const T) -> T {
    let mut out = MaybeUninit::<T>::uninit();
    let (d, s) = (out.as_mut_ptr().cast::<u32>(), src.cast::<u32>());
    for i in 0..size_of::<T>() / 4 {
        // SAFETY: T is a whole number of u32 words (asserted in lb-common).
        unsafe { write_volatile(d.add(i), read_volatile(s.add(i))) };
    }
    // SAFETY: every word written; T is plain data.
    unsafe { out.assume_init() }
}

#[inline(always)]
pub(crate) unsafe fn write_words<T: Copy>(dst: *mut T, src: &T) {
    let (d, s) = (dst.cast::<u32>(), (src as *const T).cast::<u32>());
    for i in 0..size_of::<T>() / 4 {
        // SAFETY: as in `copy_words`.
        unsafe { write_volatile(d.add(i), *s.add(i)) };
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
/// entry, unless FIN/RST already counted it. A full-NAT flow's claim goes
/// back to the pool with the slot that held it (after it: the claim names
/// the flow until then).
#[inline(always)]
pub(crate) fn remove_flow(table: Table, key: &FlowKey, flow: &Flow) {
    if table == Table::HalfOpen {
        // One slot holds both directions: clear it by the forward key.
        let forward = if flow.direction == REPLY {
            forward_key(key, flow)
        } else {
            *key
        };
        if let Some(conf) = conf()
            && let Some(claimed) = clear_slot(conf, &forward)
        {
            fullnat::release(&forward, &claimed, false);
        }
        return;
    }
    let forward = if flow.direction == REPLY {
        forward_key(key, flow)
    } else {
        *key
    };
    if let Some(conf) = conf()
        && let Some(removed) = established::remove(conf, &forward)
    {
        crate::sync::ended(key, flow);
        // Both directions went with the slot; counted once, by whoever
        // emptied it.
        if removed.state == STATE_ESTABLISHED {
            count_closed(removed.backend_id);
        }
        if let Some(claimed) = removed.claimed {
            fullnat::release(&forward, &claimed, true);
        }
        return;
    }
    // The overflow: a PROXY flow's `first` is in `PROXY_FLOWS` (a slot
    // keeps its own, gone with it).
    if flow.flags & FLOW_F_PROXY != 0 {
        crate::proxy::ended(&forward);
    }
    let pair = pair_key(key, flow);
    let (backend_id, state, direction) = (flow.backend_id, flow.state, flow.direction);
    crate::sync::ended(key, flow);
    let removed = CONNTRACK.remove(key).is_ok();
    if let Some(pair) = pair {
        let pair_removed = CONNTRACK.remove(&pair).is_ok();
        // The forward entry is the pair when `key` is a reply's.
        if direction == REPLY {
            if pair_removed && state == STATE_ESTABLISHED {
                count_closed(backend_id);
            }
            return;
        }
    }
    if removed && state == STATE_ESTABLISHED {
        count_closed(backend_id);
    }
}

/// A FIN or RST (either direction) on an established flow: it moves to the
/// closing timeout and stops counting as active. Both entries of a NAT flow
/// carry the state, so both expire on the closing timeout. The forward
/// entry's change is a compare-and-swap: two CPUs seeing the FIN count it
/// once.
#[inline(always)]
pub(crate) fn close(key: &FlowKey, flow: &mut Flow) {
    if flow.state != STATE_ESTABLISHED {
        return;
    }
    let forward_key = if flow.direction == REPLY {
        forward_key(key, flow)
    } else {
        *key
    };
    if let Some(conf) = conf()
        && let Some(slot) = established::slot_of(conf, &forward_key)
    {
        // SAFETY: a valid array map value; the state's compare-and-swap
        // counts the close once, whichever direction's FIN came first.
        let (_, swapped) = unsafe {
            atomic_cxchg::<u32, { SeqCst }, { SeqCst }>(
                &raw mut (*slot).forward.state,
                STATE_ESTABLISHED,
                STATE_CLOSING,
            )
        };
        if swapped {
            // SAFETY: as above.
            count_closed(unsafe { read_volatile(&raw const (*slot).forward.backend_id) });
        }
        flow.state = STATE_CLOSING;
        // SAFETY: as above; a plain store, the count is the forward's.
        unsafe { write_volatile(&raw mut (*slot).reply.state, STATE_CLOSING) };
        return;
    }
    // The overflow: two entries. Each direction looks its pair up in its
    // own branch (one shared lookup, null-checked once, was more than the
    // verifier could follow).
    if flow.direction == REPLY {
        let Some(forward) = pair_key(key, flow).and_then(|p| CONNTRACK.get_ptr_mut(&p)) else {
            return;
        };
        close_forward(forward);
        flow.state = STATE_CLOSING;
        return;
    }
    close_forward(flow as *mut Flow);
    flow.state = STATE_CLOSING;
    if let Some(p) = pair_key(key, flow).and_then(|p| CONNTRACK.get_ptr_mut(&p)) {
        // SAFETY: a map value; a plain store, the count is the forward's.
        unsafe { (*p).state = STATE_CLOSING };
    }
}

/// An overflow flow's forward entry moves to closing, counted once (a
/// compare-and-swap: two CPUs seeing the FIN count it once).
#[inline(always)]
pub(crate) fn close_forward(forward: *mut Flow) {
    // SAFETY: a valid, aligned u32 in a map value (`established`).
    let (_, swapped) = unsafe {
        atomic_cxchg::<u32, { SeqCst }, { SeqCst }>(
            &raw mut (*forward).state,
            STATE_ESTABLISHED,
            STATE_CLOSING,
        )
    };
    if swapped {
        // SAFETY: as above.
        count_closed(unsafe { (*forward).backend_id });
    }
}

/// Step 4's entry: a new flow in its `HALF_OPEN` slot (one for both
/// directions: a NAT flow's replies find it there). Returns the forward
/// entry, recorded or not: a slot another CPU is writing at this instant is
/// not waited for, and the flow is forwarded all the same (its handshake
/// then completes only if its scheduler finds it again).
#[inline(always)]
pub(crate) fn create(
    key: &FlowKey,
    service_id: u32,
    backend_id: u32,
    nat: bool,
    state: u32,
    now: u32,
) -> Flow {
    let mut flow = entry(
        backend_id,
        service_id,
        now,
        if nat { key.daddr } else { 0 },
        0,
        FORWARD,
    );
    flow.state = state;
    if let Some(conf) = conf() {
        write_slot(conf, key, &flow);
    }
    flow
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
        flags: 0,
        next_hop: NextHop::default(),
        seq: 0,
    }
}

/// The client confirmed a half-open flow (`flow`, its copy, with the next
/// hop its packets resolved) with a segment carrying `seq` and `ack`: it
/// moves to the established table (one slot, both directions) and counts
/// as active. Each direction starts its sender's sequence at what the
/// segment shows: the client's own, and the backend's as the client
/// acknowledges it. A bucket whose ways all hold live flows sends the flow
/// to the overflow (`CONNTRACK`, two entries for NAT) and is flagged; if
/// that is full too, or the way is being written by another CPU, the flow
/// stays half-open, still forwarded (it can then be replaced by new flows).
#[inline(always)]
pub(crate) fn promote(key: &FlowKey, flow: &mut Flow, seq: u32, ack: u32, now: u32) {
    let Some(conf) = conf() else {
        return;
    };
    // A PROXY flow's `first` as its SYN gave it (not this segment's seq: a
    // segment after the first may be the one that promotes, when an
    // earlier promotion found the bucket busy or full), from its half-open
    // slot into its established one. Gone (its half-open slot taken
    // meanwhile): it is not established (its data is then `drop_proxy_lost`).
    let proxied = flow.flags & FLOW_F_PROXY != 0;
    let first = if proxied {
        match half_open_first(conf, key) {
            Some(first) => first,
            None => return,
        }
    } else {
        0
    };
    let nat = flow.vip != 0;
    let state = flow.state;
    flow.state = STATE_ESTABLISHED;
    flow.seen = now;
    flow.seq = seq;
    let (service_id, backend_id) = (flow.service_id, flow.backend_id);
    let mut reply = entry(backend_id, service_id, now, key.daddr, key.dport, REPLY);
    reply.state = STATE_ESTABLISHED;
    reply.seq = ack;
    let full_nat = flow.flags & FLOW_F_FULL_NAT;
    reply.flags = flow.flags & HALF_OPEN_FLAGS;
    let backend = if nat {
        match BACKENDS.get(backend_id) {
            Some(b) => Some((b.addr, b.port)),
            None => {
                flow.state = state;
                return;
            }
        }
    } else {
        None
    };
    let placed = established::insert(
        conf,
        key,
        flow,
        backend.map(|(addr, port)| (addr, port, &reply)),
        first,
        now,
    );
    match placed {
        Placed::Slot { ended } => {
            if let Some(old) = ended {
                count_closed(old);
            }
        }
        Placed::There => {
            clear_slot(conf, key);
            return;
        }
        // A full-NAT flow's reply is found by its slot only: it stays
        // half-open (forwarded, retrying) while its bucket is full.
        Placed::Full if full_nat != 0 => {
            flow.state = state;
            return;
        }
        Placed::Full => {
            // The overflow's entries have no slot: `first` in `PROXY_FLOWS`
            // (before the entries, which make the flow visible).
            if proxied {
                crate::proxy::started(key, first);
            }
            if !overflow_insert(key, flow, backend.is_some(), &reply) {
                if proxied {
                    crate::proxy::ended(key);
                }
                flow.state = state;
                return;
            }
            established::flag_overflow(conf, key);
        }
        Placed::Busy => {
            flow.state = state;
            return;
        }
    }
    clear_slot(conf, key);
    count_opened(backend_id);
    // A peer cannot translate a full-NAT flow: its source address is ours;
    // nor shift a PROXY flow: its `first` is in this LB's tables only.
    if flow.flags & (FLOW_F_FULL_NAT | FLOW_F_PROXY) == 0 {
        crate::sync::established(key, flow, ack);
    }
}

/// Enters an established flow in the overflow: its forward entry and, NAT,
/// its reply entry (`reply`), both or neither.
#[inline(always)]
fn overflow_insert(key: &FlowKey, flow: &Flow, nat: bool, reply: &Flow) -> bool {
    if CONNTRACK.insert(key, flow, BPF_NOEXIST).is_err() {
        return false;
    }
    if nat {
        let inserted = match pair_key(key, flow) {
            Some(pair) => CONNTRACK.insert(&pair, reply, BPF_NOEXIST).is_ok(),
            None => false,
        };
        if !inserted {
            let _ = CONNTRACK.remove(key);
            return false;
        }
    }
    true
}

/// Does a SYN on this flow start a new connection? Yes if its entry belongs
/// to a finished connection (closing) or to a backend that takes no new
/// flows (drained, down, disabled, removed: not in its service's ring): the
/// client reused a source port. The caller removes the old flow from its
/// family's table and treats the SYN as a miss, scheduled afresh. One rule
/// for both families.
#[inline(always)]
pub(crate) fn restarts_on_syn(flow: &Flow) -> bool {
    let retired = match BACKENDS.get(flow.backend_id) {
        Some(b) => b.flags & BACKEND_F_IN_RING == 0,
        None => true,
    };
    retired || flow.state == STATE_CLOSING
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
pub(crate) fn count_opened(backend_id: u32) {
    if let Some(c) = BACKEND_FLOWS.get_ptr_mut(backend_id) {
        // SAFETY: a valid, aligned u64 in an array map value; SeqCst so the
        // BPF backend emits a real atomic add (see `schedule`).
        unsafe { atomic_xadd::<u64, u64, { SeqCst }>(&raw mut (*c).opened, 1) };
    }
}

#[inline(always)]
pub(crate) fn count_closed(backend_id: u32) {
    if let Some(c) = BACKEND_FLOWS.get_ptr_mut(backend_id) {
        // SAFETY: as in `count_opened`.
        unsafe { atomic_xadd::<u64, u64, { SeqCst }>(&raw mut (*c).closed, 1) };
    }
}
