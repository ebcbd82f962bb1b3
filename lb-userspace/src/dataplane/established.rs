//! The agent's view of `ESTABLISHED`, the established table
//! (`lb_common::EstablishedSlot`: one flow, both directions, in a slot of
//! the bucket its client hashes to; rules in `lb_common::flow_table`),
//! mapped into memory like `HALF_OPEN` ([`super::SlotTable`]). Readers see
//! it as the table of entries `CONNTRACK` was (a NAT flow's forward and
//! reply entries), so status, explain, the sweep and the purge treat both
//! tables alike; `CONNTRACK` is now the overflow, for flows whose bucket
//! had no free way.

use std::sync::atomic::{AtomicU32, Ordering};

use lb_common::{
    EstablishedSlot, Flow, FlowConf, FlowKey, SLOT_F_OVERFLOWED, SLOT_FLAGS_WORD,
    flow::{FORWARD, REPLY},
    flow_table::{self, Place, WAYS, Way, bucket_of, entries_of, place, slot_of, way_of},
    slot_flags_mask,
};

use super::SlotTable;

/// The bucket's overflow flag as a bit of its flags word.
const OVERFLOWED: u32 = slot_flags_mask(SLOT_F_OVERFLOWED);

/// `ESTABLISHED` mapped into this process.
pub type EstablishedTable = SlotTable<EstablishedSlot>;

/// Why a flow was not written into the established table.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InsertError {
    /// Every way of the flow's bucket holds a live flow: none is evicted.
    #[error("the established table's bucket for this flow is full (no live flow is evicted)")]
    TableFull,
    /// A packet held the way's lock for longer than a writer waits.
    #[error("the established table's slot for this flow stayed locked")]
    Busy,
    /// The table is not sized yet (`FLOW_CONF` not written).
    #[error("the established table is not set up yet")]
    NotReady,
}

/// What [`EstablishedTable::insert_established`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inserted {
    /// Written into a free (or expired) way; `ended`: the expired
    /// established flow it took the place of, if any.
    New { ended: Option<Flow> },
    /// The flow was there already; its slot was rewritten.
    Replaced,
}

impl EstablishedTable {
    /// The first slot of the bucket of the flow whose client is `key`'s
    /// source (a forward key).
    fn bucket(&self, key: &FlowKey, conf: &FlowConf) -> std::ops::Range<usize> {
        let first = bucket_of(key, conf.half_open_seed, self.slots()) as usize;
        first..first + WAYS as usize
    }

    /// Every entry (forward, and NAT reply), keyed as its packets arrive:
    /// the table as the two-entries-per-NAT-flow `CONNTRACK` was.
    pub fn entries(&self) -> Vec<(FlowKey, Flow)> {
        entries(&self.occupied())
    }

    /// Every occupied slot, copied under its lock.
    pub fn occupied(&self) -> Vec<EstablishedSlot> {
        self.occupied_slots()
    }

    /// The entry `key` (as it arrives: forward, or a NAT flow's reply)
    /// belongs to.
    pub fn get(&self, key: &FlowKey, conf: &FlowConf) -> Option<Flow> {
        self.get_with_pair(key, conf).map(|(entry, _)| entry)
    }

    /// [`get`](Self::get), with the flow's entry for the other direction
    /// (a NAT flow's; `None` for DSR), which keeps an expired entry alive
    /// while it is live itself.
    pub fn get_with_pair(&self, key: &FlowKey, conf: &FlowConf) -> Option<(Flow, Option<Flow>)> {
        if let Some(s) = self
            .bucket(key, conf)
            .filter_map(|i| self.read_slot(i))
            .find(|s| s.key == *key)
        {
            return Some((s.forward, flow_table::is_nat(&s).then_some(s.reply)));
        }
        // A reply's client is its destination.
        let client = FlowKey {
            saddr: key.daddr,
            sport: key.dport,
            ..*key
        };
        self.bucket(&client, conf)
            .filter_map(|i| self.read_slot(i))
            .find(|s| flow_table::is_reply_of(s, key))
            .map(|s| (s.reply, Some(s.forward)))
    }

    /// Empties the slot of the flow whose entry `key` (either direction) is,
    /// under its lock; the slot as it was.
    pub fn remove(&self, key: &FlowKey, conf: &FlowConf) -> Option<EstablishedSlot> {
        let forward = self.forward_key_of(key, conf)?;
        self.bucket(&forward, conf)
            .find_map(|i| self.take_if(i, |s| s.key == forward))
    }

    /// Empties the slot of the flow whose forward key is `forward` if
    /// `still` says so of it under the lock; the slot as it was.
    pub fn remove_if(
        &self,
        forward: &FlowKey,
        conf: &FlowConf,
        still: impl Fn(&EstablishedSlot) -> bool,
    ) -> Option<EstablishedSlot> {
        self.bucket(forward, conf)
            .find_map(|i| self.take_if(i, |s| s.key == *forward && still(s)))
    }

    /// The forward key of the flow `key` (either direction) belongs to.
    fn forward_key_of(&self, key: &FlowKey, conf: &FlowConf) -> Option<FlowKey> {
        let flow = self.get(key, conf)?;
        Some(if flow.direction == REPLY {
            lb_common::flow::forward_key(key, &flow)
        } else {
            *key
        })
    }

    /// Empties every slot whose forward entry `gone` picks (given the
    /// forward key and entry); the slots as they were.
    pub fn clear_all(&self, gone: impl Fn(&FlowKey, &Flow) -> bool) -> Vec<EstablishedSlot> {
        (0..self.slots() as usize)
            .filter_map(|i| self.take_if(i, |s| gone(&s.key, &s.forward)))
            .collect()
    }

    /// Writes one established flow into its bucket under the slot's lock,
    /// as the data plane's promotion does: its own slot if it is there,
    /// else a free way, else a way whose flow expired; never a live flow's
    /// (then [`InsertError::TableFull`]: the caller decides, e.g. to leave
    /// the flow to the half-open path). `forward` is the forward entry
    /// (key `key`, client → VIP); `reply`, for a NAT flow, the backend's
    /// address and port (network order) and the reply entry. Flow sync's
    /// receiver (issue 27) enters a peer's flows with it. The per-backend
    /// active counts are the caller's: it writes no counter.
    pub fn insert_established(
        &self,
        key: &FlowKey,
        forward: &Flow,
        reply: Option<((u32, u16), Flow)>,
        conf: &FlowConf,
        now: u32,
    ) -> Result<Inserted, InsertError> {
        self.insert_into(key, forward, reply, conf, now, true)
    }

    /// [`Self::insert_established`] into a free way only: an expired
    /// flow's way is left to the sweep (which counts its end), so a caller
    /// that cannot settle that flow's backend count (flow sync's receiver,
    /// on a thread of its own) never takes it; a bucket without a free way
    /// is [`InsertError::TableFull`].
    pub fn insert_if_free(
        &self,
        key: &FlowKey,
        forward: &Flow,
        reply: Option<((u32, u16), Flow)>,
        conf: &FlowConf,
        now: u32,
    ) -> Result<Inserted, InsertError> {
        self.insert_into(key, forward, reply, conf, now, false)
    }

    fn insert_into(
        &self,
        key: &FlowKey,
        forward: &Flow,
        reply: Option<((u32, u16), Flow)>,
        conf: &FlowConf,
        now: u32,
        take_expired: bool,
    ) -> Result<Inserted, InsertError> {
        if conf.established_slots == 0 || *key == FlowKey::EMPTY {
            return Err(InsertError::NotReady);
        }
        let bucket = self.bucket(key, conf);
        let way_at = |i: usize| match self.read_slot(i) {
            None => Way::Empty,
            Some(s) => {
                let fresher = fresher_side(&s);
                way_of(&s.key, &fresher, key, conf, now)
            }
        };
        let mut ways = [Way::Empty; WAYS as usize];
        for (w, i) in bucket.clone().enumerate() {
            ways[w] = way_at(i);
        }
        if !take_expired {
            for way in &mut ways {
                if *way == Way::Expired {
                    *way = Way::Live;
                }
            }
        }
        let Place::Way(w) = place(&ways) else {
            return Err(InsertError::TableFull);
        };
        let i = bucket.start + w as usize;
        let chosen = ways[w as usize];
        let new = slot_of(key, forward, reply.as_ref().map(|(b, f)| (*b, f)));
        let written = self.with_lock(i, |slot| {
            // SAFETY: locked: ours to read and write (volatile: the data
            // plane's lone stores and flag bits go on meanwhile; `flags` and
            // `seq` are left alone: `backend_port` is written as a u16).
            unsafe {
                let was = std::ptr::read_volatile(slot);
                let now_way = if was.key == FlowKey::EMPTY {
                    Way::Empty
                } else {
                    way_of(&was.key, &fresher_side(&was), key, conf, now)
                };
                if now_way != chosen {
                    return None;
                }
                std::ptr::write_volatile(&raw mut (*slot).proxy_first, new.proxy_first);
                std::ptr::write_volatile(&raw mut (*slot).forward, new.forward);
                std::ptr::write_volatile(&raw mut (*slot).reply, new.reply);
                std::ptr::write_volatile(&raw mut (*slot).backend_addr, new.backend_addr);
                std::ptr::write_volatile(&raw mut (*slot).backend_port, new.backend_port);
                std::ptr::write_volatile(&raw mut (*slot).key, new.key);
                Some(match chosen {
                    Way::Same => Inserted::Replaced,
                    Way::Expired => Inserted::New {
                        ended: Some(was.forward),
                    },
                    _ => Inserted::New { ended: None },
                })
            }
        });
        match written {
            Some(Some(done)) => Ok(done),
            // Locked for too long, or taken meanwhile.
            _ => Err(InsertError::Busy),
        }
    }

    /// `f` of slot `i`'s flags word (`EstablishedSlot::flags` and the
    /// `backend_port` beside it: an aligned u32 whose flag bits the data
    /// plane only ever changes with atomic ORs; [`slot_flags_mask`] names
    /// them in it).
    fn flags<T>(&self, i: usize, f: impl FnOnce(&AtomicU32) -> T) -> Option<T> {
        // SAFETY: an aligned word of a mapped slot (`SLOT_FLAGS_WORD`),
        // whose flag half is accessed atomically only.
        self.at(i, |slot| {
            f(
                unsafe {
                    AtomicU32::from_ptr(slot.cast::<u8>().add(SLOT_FLAGS_WORD).cast::<u32>())
                },
            )
        })
    }

    /// Flags the bucket of the flow whose forward key is `key` as having
    /// flows in the overflow (after a writer put one there), as the data
    /// plane's promotion does.
    pub fn flag_overflow(&self, key: &FlowKey, conf: &FlowConf) {
        let first = self.bucket(key, conf).start;
        self.flags(first, |f| f.fetch_or(OVERFLOWED, Ordering::AcqRel));
    }

    /// Runs `write` on the slot of the flow whose forward key is `key`,
    /// under its lock; `None` if no slot holds it (or it stayed locked).
    pub fn update(
        &self,
        key: &FlowKey,
        conf: &FlowConf,
        write: impl Fn(&mut EstablishedSlot),
    ) -> Option<()> {
        self.bucket(key, conf).find_map(|i| {
            self.with_lock(i, |slot| {
                // SAFETY: locked: ours to read and write; volatile as in
                // `insert_into` (the data plane's lone stores go on).
                unsafe {
                    let mut s = std::ptr::read_volatile(slot);
                    if s.key != *key {
                        return None;
                    }
                    write(&mut s);
                    std::ptr::write_volatile(&raw mut (*slot).forward, s.forward);
                    std::ptr::write_volatile(&raw mut (*slot).reply, s.reply);
                    Some(())
                }
            })
            .flatten()
        })
    }

    /// The first slots of the buckets flagged as having flows in the
    /// overflow.
    pub fn overflowed_buckets(&self) -> Vec<usize> {
        (0..self.slots() as usize)
            .step_by(WAYS as usize)
            .filter(|&i| {
                self.flags(i, |f| f.load(Ordering::Relaxed) & OVERFLOWED != 0)
                    .unwrap_or(false)
            })
            .collect()
    }

    /// Keeps the overflow flags true to the overflow's contents: clears
    /// the flag of every bucket none of whose flows `overflow()` lists,
    /// then reads the overflow again and flags every bucket it lists (the
    /// data plane flags a bucket after its overflow insert, so an insert
    /// racing with this is either in the second read or flags the bucket
    /// after the clear). `overflow` gives the overflow's forward keys.
    pub fn refresh_overflow_flags(&self, conf: &FlowConf, overflow: impl Fn() -> Vec<FlowKey>) {
        let buckets = |keys: Vec<FlowKey>| -> std::collections::BTreeSet<usize> {
            keys.iter().map(|k| self.bucket(k, conf).start).collect()
        };
        let listed = buckets(overflow());
        for i in self.overflowed_buckets() {
            if !listed.contains(&i) {
                self.flags(i, |f| f.fetch_and(!OVERFLOWED, Ordering::AcqRel));
            }
        }
        for i in buckets(overflow()) {
            self.flags(i, |f| f.fetch_or(OVERFLOWED, Ordering::AcqRel));
        }
    }
}

/// The entries of `slots`, keyed as their packets arrive.
pub fn entries(slots: &[EstablishedSlot]) -> Vec<(FlowKey, Flow)> {
    slots.iter().flat_map(entries_of).collect()
}

/// The slot's forward entry with the later `seen` of its two directions:
/// a NAT flow is idle only when both are.
fn fresher_side(s: &EstablishedSlot) -> Flow {
    let mut f = s.forward;
    if s.forward.vip != 0 && (s.reply.seen.wrapping_sub(f.seen) as i32) > 0 {
        f.seen = s.reply.seen;
    }
    debug_assert_eq!(f.direction, FORWARD);
    f
}
