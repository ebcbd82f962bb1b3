//! `ESTABLISHED`, the established table (issue 23): a set-associative array
//! of two-line slots (`lb_common::EstablishedSlot`, one flow, both
//! directions), [`WAYS`] to a bucket, indexed by the seeded hash of the
//! client's address, port and protocol (`HALF_OPEN`'s seed): an
//! established packet costs the hash (arithmetic) and one bucket, where
//! the kernel hash cost a helper call, jhash and a bucket walk. The rules
//! (bucket, way choice, overflow) are `lb_common::flow_table`; the lifecycle
//! around it is `flows.rs`.
//!
//! A flow whose bucket holds live flows in every way is never placed by
//! evicting one: it goes to `CONNTRACK` (the kernel hash, now the
//! overflow) and its bucket is flagged, and only a miss in a flagged bucket
//! probes the overflow.

use aya_ebpf::{macros::map, maps::Array};
use core::{
    intrinsics::{AtomicOrdering::SeqCst, atomic_or},
    ptr::read_volatile,
};
use lb_common::{
    DEFAULT_CONNTRACK_SIZE, EstablishedSlot, FLOW_F_FULL_NAT, Flow, FlowConf, FlowKey,
    SLOT_F_OVERFLOWED,
    flow::{FORWARD, REPLY, STATE_ESTABLISHED, bucket_hash, is_idle, replies_to},
    flow_table::{Place, WAYS, Way, first_way, place, probes_overflow},
    slot_flags_mask,
};

use crate::flows::{Claimed, SeqLocked, lock, same_key, unlock, write_words};

const BPF_F_MMAPABLE: u32 = 1 << 10;

/// Established flows, one slot each (both directions of a NAT flow).
/// Sized by the agent at load time (twice `conntrack-size`: at the rated
/// fill half the slots are taken); mappable, so the agent reads and writes
/// it as memory under the slot locks.
#[map]
pub(crate) static ESTABLISHED: Array<EstablishedSlot> =
    Array::with_max_entries(DEFAULT_CONNTRACK_SIZE * 2, BPF_F_MMAPABLE);

/// What a lookup found.
pub(crate) enum Lookup {
    /// The flow's slot and its entry for the packet's direction.
    Found(*mut EstablishedSlot, *mut Flow),
    /// Not in the bucket looked in; `overflow`: that bucket is flagged, so
    /// it may be in `CONNTRACK`.
    Miss { overflow: bool },
}

/// The first slot of the bucket of the flow whose client is
/// `client:port` (out of range, so every lookup misses, before the agent
/// sized the table).
#[inline(always)]
fn bucket(conf: &FlowConf, client: u32, port: u16, protocol: u8) -> u32 {
    if conf.established_slots < WAYS {
        return u32::MAX - WAYS;
    }
    first_way(
        bucket_hash(client, port, protocol, conf.half_open_seed),
        conf.established_slots,
        WAYS,
    )
}

/// Which bucket a packet's entry is looked for in.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    /// The source's: a forward packet (client → VIP), under its own key.
    /// Every packet looks here first.
    Sender,
    /// The destination's: a NAT backend's reply (backend → client), in the
    /// slot whose client and backend it connects. Only a packet that is not
    /// to a VIP can be one, so a packet to a VIP (a new flow's SYN) never
    /// reads this bucket. `to`: where the reply arrived addressed to
    /// (before `fullnat::nat_shaped`), which picks a full-NAT flow
    /// (`lb_common::flow::replies_to`).
    Receiver { to: (u32, u16) },
}

/// `key` as it arrives, in the bucket of `side`: a forward packet's entry
/// is in its source's bucket under its own key, a NAT reply's in its
/// destination's bucket.
#[inline(always)]
pub(crate) fn find(conf: &FlowConf, key: &FlowKey, side: Side) -> Lookup {
    let first = match side {
        Side::Sender => bucket(conf, key.saddr, key.sport, key.protocol),
        Side::Receiver { .. } => bucket(conf, key.daddr, key.dport, key.protocol),
    };
    for way in 0..WAYS {
        let Some(slot) = ESTABLISHED.get_ptr_mut(first + way) else {
            return Lookup::Miss { overflow: false };
        };
        // SAFETY: a valid array map value; the key is compared between two
        // reads of the slot's sequence.
        unsafe {
            let found = match side {
                Side::Sender => stable(slot, |s| same_key(&raw const (*s).key, key)),
                Side::Receiver { to } => stable(slot, |s| is_reply(s, key, to)),
            };
            if found {
                let entry = match side {
                    Side::Sender => &raw mut (*slot).forward,
                    Side::Receiver { .. } => &raw mut (*slot).reply,
                };
                return Lookup::Found(slot, entry);
            }
        }
    }
    // Only a miss reads the bucket's flags (the first way's last bytes).
    let overflow = match ESTABLISHED.get_ptr(first) {
        // SAFETY: a valid array map value; a racy read of a flags word.
        Some(slot) => probes_overflow(unsafe { read_volatile(&raw const (*slot).flags) } as u32),
        None => false,
    };
    Lookup::Miss { overflow }
}

/// A PROXY v2 flow's `first` as its slot keeps it (written with the flow
/// under the slot's lock, before its key).
#[inline(always)]
pub(crate) fn proxy_first(slot: *mut EstablishedSlot) -> u32 {
    // SAFETY: a valid array map value; one aligned word.
    unsafe { read_volatile(&raw const (*slot).proxy_first) }
}

/// `test` of the slot, true only if no writer held or took the slot
/// meanwhile.
#[inline(always)]
unsafe fn stable(slot: *mut EstablishedSlot, test: impl Fn(*mut EstablishedSlot) -> bool) -> bool {
    // SAFETY: the caller's slot is a valid array map value.
    unsafe {
        let seq = read_volatile(&raw const (*slot).seq);
        seq & 1 == 0 && test(slot) && read_volatile(&raw const (*slot).seq) == seq
    }
}

/// Is `key` (backend → client; it arrived addressed to `to`) the reply of
/// the NAT or full-NAT flow in `slot`?
#[inline(always)]
unsafe fn is_reply(slot: *mut EstablishedSlot, key: &FlowKey, to: (u32, u16)) -> bool {
    // SAFETY: the caller's slot is a valid array map value.
    unsafe {
        read_volatile(&raw const (*slot).forward.vip) != 0
            && replies_to(&*(&raw const (*slot).forward), to)
            && read_volatile(&raw const (*slot).backend_addr) == key.saddr
            && read_volatile(&raw const (*slot).backend_port) == key.sport
            && read_volatile(&raw const (*slot).key.saddr) == key.daddr
            && read_volatile(&raw const (*slot).key.sport) == key.dport
            && read_volatile(&raw const (*slot).key.protocol) == key.protocol
    }
}

/// The slot holding the flow whose forward key is `forward`.
#[inline(always)]
pub(crate) fn slot_of(conf: &FlowConf, forward: &FlowKey) -> Option<*mut EstablishedSlot> {
    let first = bucket(conf, forward.saddr, forward.sport, forward.protocol);
    for way in 0..WAYS {
        let slot = ESTABLISHED.get_ptr_mut(first + way)?;
        // SAFETY: a valid array map value.
        if unsafe { stable(slot, |s| same_key(&raw const (*s).key, forward)) } {
            return Some(slot);
        }
    }
    None
}

/// Is the other entry of the slot's flow (a NAT flow's other direction
/// than `direction`'s) live?
#[inline(always)]
pub(crate) fn other_is_live(
    slot: *mut EstablishedSlot,
    direction: u8,
    protocol: u8,
    conf: &FlowConf,
    now: u32,
) -> bool {
    // SAFETY: a valid array map value; racy reads of two words.
    unsafe {
        if read_volatile(&raw const (*slot).forward.vip) == 0 {
            return false;
        }
        let other = if direction == REPLY {
            &raw const (*slot).forward
        } else {
            &raw const (*slot).reply
        };
        !is_idle(
            conf,
            protocol,
            read_volatile(&raw const (*other).state),
            read_volatile(&raw const (*other).seen),
            now,
        )
    }
}

impl SeqLocked for EstablishedSlot {
    #[inline(always)]
    fn seq(slot: *mut Self) -> *mut u32 {
        // SAFETY: a field of the caller's valid slot pointer.
        unsafe { &raw mut (*slot).seq }
    }
}

/// A flow [`remove`] took out of its slot.
pub(crate) struct Removed {
    pub(crate) state: u32,
    pub(crate) backend_id: u32,
    /// A full-NAT flow's claim (`fullnat::release`).
    pub(crate) claimed: Option<Claimed>,
}

/// Empties the slot of the flow whose forward key is `forward`, under its
/// lock; what it held, `None` if the slot did not hold it (gone already,
/// or never here).
#[inline(always)]
pub(crate) fn remove(conf: &FlowConf, forward: &FlowKey) -> Option<Removed> {
    let slot = slot_of(conf, forward)?;
    if !lock(slot) {
        return None;
    }
    // SAFETY: locked: the slot is ours to write.
    let removed =
        unsafe {
            if same_key(&raw const (*slot).key, forward) {
                let entry = &raw const (*slot).forward;
                let backend_id = read_volatile(&raw const (*entry).backend_id);
                let claimed = (read_volatile(&raw const (*entry).flags) & FLOW_F_FULL_NAT != 0)
                    .then(|| Claimed {
                        backend_id,
                        source: (
                            read_volatile(&raw const (*entry).vip),
                            read_volatile(&raw const (*entry).vport),
                        ),
                    });
                let state = read_volatile(&raw const (*entry).state);
                write_words(&raw mut (*slot).key, &FlowKey::EMPTY);
                Some(Removed {
                    state,
                    backend_id,
                    claimed,
                })
            } else {
                None
            }
        };
    unlock(slot);
    removed
}

/// What placing a flow did.
pub(crate) enum Placed {
    /// Written into a way; `ended`: the backend of an expired established
    /// flow it took the way of (its close is to be counted).
    Slot { ended: Option<u32> },
    /// The flow is in the table already.
    There,
    /// Every way holds a live flow: the overflow's turn.
    Full,
    /// Another writer holds the way: not placed (the flow stays half-open).
    Busy,
}

/// Places an established flow (forward entry `forward` under `key`; NAT:
/// the backend endpoint its replies come from and its reply entry; a PROXY
/// v2 flow's `first`, `proxy_first`, 0 for any other) in a way of its bucket, never one
/// holding a live flow (`lb_common::flow_table::place`).
#[inline(always)]
pub(crate) fn insert(
    conf: &FlowConf,
    key: &FlowKey,
    forward: &Flow,
    reply: Option<(u32, u16, &Flow)>,
    proxy_first: u32,
    now: u32,
) -> Placed {
    let first = bucket(conf, key.saddr, key.sport, key.protocol);
    let mut ways = [Way::Empty; WAYS as usize];
    for (way, seen) in ways.iter_mut().enumerate() {
        let Some(slot) = ESTABLISHED.get_ptr_mut(first + way as u32) else {
            return Placed::Busy;
        };
        *seen = peek(slot, key, conf, now);
    }
    let Place::Way(way) = place(&ways) else {
        return Placed::Full;
    };
    if ways[way as usize] == Way::Same {
        return Placed::There;
    }
    let Some(slot) = ESTABLISHED.get_ptr_mut(first + way) else {
        return Placed::Busy;
    };
    if !lock(slot) {
        return Placed::Busy;
    }
    // SAFETY: locked: the slot is ours to write.
    let placed = unsafe {
        // Rechecked under the lock: the way must still be what the choice
        // saw (a racing insert may have taken it).
        if peek(slot, key, conf, now) != ways[way as usize] {
            Placed::Busy
        } else {
            let ended = (ways[way as usize] == Way::Expired
                && read_volatile(&raw const (*slot).forward.state) == STATE_ESTABLISHED)
                .then(|| read_volatile(&raw const (*slot).forward.backend_id));
            core::ptr::write_volatile(&raw mut (*slot).proxy_first, proxy_first);
            write_words(&raw mut (*slot).forward, forward);
            if let Some((addr, port, entry)) = reply {
                write_words(&raw mut (*slot).reply, entry);
                core::ptr::write_volatile(&raw mut (*slot).backend_addr, addr);
                core::ptr::write_volatile(&raw mut (*slot).backend_port, port);
            }
            write_words(&raw mut (*slot).key, key);
            Placed::Slot { ended }
        }
    };
    unlock(slot);
    placed
}

/// What a way holds, as a flow being established (`key`) sees it: racy
/// peeks, rechecked under the lock before the way is written.
#[inline(always)]
fn peek(slot: *mut EstablishedSlot, key: &FlowKey, conf: &FlowConf, now: u32) -> Way {
    // SAFETY: a valid array map value.
    unsafe {
        if same_key(&raw const (*slot).key, key) {
            return Way::Same;
        }
        if same_key(&raw const (*slot).key, &FlowKey::EMPTY) {
            return Way::Empty;
        }
        let protocol = read_volatile(&raw const (*slot).key.protocol);
        let idle = is_idle(
            conf,
            protocol,
            read_volatile(&raw const (*slot).forward.state),
            read_volatile(&raw const (*slot).forward.seen),
            now,
        );
        if idle && !other_is_live(slot, FORWARD, protocol, conf, now) {
            Way::Expired
        } else {
            Way::Live
        }
    }
}

/// Flags the bucket of the flow whose forward key is `key`: one of its
/// flows is in the overflow. Set after the overflow insert (the agent's
/// sweep clears a bit, then re-reads the overflow and sets it again for
/// what it finds there, so no set is lost).
#[inline(always)]
pub(crate) fn flag_overflow(conf: &FlowConf, key: &FlowKey) {
    let first = bucket(conf, key.saddr, key.sport, key.protocol);
    if let Some(slot) = ESTABLISHED.get_ptr_mut(first) {
        // SAFETY: a valid, aligned u32 in an array map value (the word of
        // `backend_port` and `flags`: the OR leaves the port alone).
        unsafe {
            let word = (&raw mut (*slot).backend_port).cast::<u32>();
            atomic_or::<u32, u32, { SeqCst }>(word, slot_flags_mask(SLOT_F_OVERFLOWED));
        }
    }
}
