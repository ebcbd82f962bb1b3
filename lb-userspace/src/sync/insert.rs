//! The one place a flow from a peer enters this LB's established tables.
//! Every write of a synced flow goes through [`insert_established`] (and
//! a synced entry's refresh and end through [`refresh_synced`] and
//! [`end_synced`]), each a family's [`SyncTable`], so a change of a
//! table's design swaps its impl and nothing else.
//!
//! IPv4's table ([`Table`]) is `ESTABLISHED` (slots, both directions of a
//! flow in one: `crate::dataplane::EstablishedTable`) with `CONNTRACK` as
//! its overflow for flows whose bucket has no free way, as the data
//! plane's promotion places them. A synced flow takes only a free way
//! (never a live flow's, nor an expired one's: that flow's end is the
//! sweep's to count), else goes to the overflow with its bucket flagged.
//! IPv6's ([`Table6`]) is `ESTABLISHED6`, a kernel hash that never evicts:
//! a synced flow's entries go in where there are none (`BPF_NOEXIST`),
//! both or neither, as `flows6::promote` puts a local flow's.

use aya::maps::{Array, HashMap, MapData, MapError};
use lb_common::{
    FLOW_F_SYNCED, Flow, FlowConf, FlowKey,
    flow::{STATE_CLOSING, STATE_ESTABLISHED},
    maps6::FlowKey6,
};

use super::keys::SyncKey;
use crate::dataplane::{EstablishedTable, InsertError as SlotError, now_ticks};

/// IPv4's established table as the sync agent holds it: the slots, their
/// overflow, and the settings that place a flow in them.
pub struct Table {
    pub slots: EstablishedTable,
    pub overflow: HashMap<MapData, FlowKey, Flow>,
    pub flow_conf: Array<MapData, FlowConf>,
}

/// IPv6's established table, `ESTABLISHED6`: both entries of a NAT flow,
/// each under its own key.
pub struct Table6 {
    pub established: HashMap<MapData, FlowKey6, Flow>,
}

/// A family's established table, as sync reads and writes it.
pub trait SyncTable {
    type Key: SyncKey;
    /// The entry `key` (either direction) belongs to.
    fn get(&self, key: &Self::Key) -> Result<Option<Flow>, InsertError>;
    /// Places a flow none of whose keys has an entry (checked by the
    /// caller): its forward entry and, NAT, its reply entry, both or
    /// neither, evicting nothing.
    fn place(
        &mut self,
        key: &Self::Key,
        forward: &Flow,
        reply: Option<(&Self::Key, &Flow)>,
    ) -> Result<(), InsertError>;
    /// `change` applied to the flow (forward key `key`, and `pair`, a NAT
    /// flow's reply key) wherever it is; only entries that exist are
    /// written (a flow that ended here meanwhile stays ended).
    fn change(
        &mut self,
        key: &Self::Key,
        pair: Option<&Self::Key>,
        change: &dyn Fn(&mut Flow),
    ) -> Result<(), InsertError>;
    /// Every entry, keyed as its packets arrive (forward, and a NAT flow's
    /// reply).
    fn entries(&self) -> Vec<(Self::Key, Flow)>;
}

const BPF_NOEXIST: u64 = 1;
const BPF_EXIST: u64 = 2;

/// Why a synced flow was not inserted.
#[derive(Debug, thiserror::Error)]
pub enum InsertError {
    /// The tuple has an entry already (a local flow, or a synced one):
    /// never replaced.
    #[error("the flow has an entry already")]
    Exists,
    /// Neither a free way of its bucket nor room in the overflow.
    #[error("the established table is full")]
    TableFull,
    #[error("ESTABLISHED: {0}")]
    Slots(SlotError),
    #[error("CONNTRACK: {0}")]
    Map(MapError),
    #[error("ESTABLISHED6: {0}")]
    Map6(MapError),
}

fn errno(e: &MapError) -> Option<i32> {
    match e {
        MapError::SyscallError(s) => s.io_error.raw_os_error(),
        _ => None,
    }
}

fn insert_error(e: MapError) -> InsertError {
    match errno(&e) {
        Some(libc::EEXIST) => InsertError::Exists,
        Some(libc::E2BIG | libc::ENOMEM | libc::ENOSPC) => InsertError::TableFull,
        _ => InsertError::Map(e),
    }
}

/// A hash map's entry at `key`, `None` when there is none.
fn found<K: aya::Pod>(
    map: &HashMap<MapData, K, Flow>,
    key: &K,
    wrap: fn(MapError) -> InsertError,
) -> Result<Option<Flow>, InsertError> {
    match map.get(key, 0) {
        Ok(f) => Ok(Some(f)),
        Err(MapError::KeyNotFound) => Ok(None),
        Err(e) if errno(&e) == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(wrap(e)),
    }
}

/// A flow's entries into a kernel hash (IPv4's overflow, `ESTABLISHED6`)
/// where there are none (`BPF_NOEXIST`): the forward entry and, NAT, the
/// reply entry, both or neither (if the reply cannot go in, the forward
/// entry is taken out again).
fn insert_pair<K: aya::Pod>(
    map: &mut HashMap<MapData, K, Flow>,
    key: &K,
    forward: &Flow,
    reply: Option<(&K, &Flow)>,
) -> Result<(), InsertError> {
    map.insert(key, forward, BPF_NOEXIST)
        .map_err(insert_error)?;
    if let Some((reply_key, reply)) = reply
        && let Err(e) = map.insert(reply_key, reply, BPF_NOEXIST)
    {
        let _ = map.remove(key);
        return Err(insert_error(e));
    }
    Ok(())
}

/// `change` applied to those of a flow's entries (`key`, and `pair`, a
/// NAT flow's reply key) a kernel hash holds; a missing one stays missing.
fn change_entries<K: aya::Pod>(
    map: &mut HashMap<MapData, K, Flow>,
    key: &K,
    pair: Option<&K>,
    change: &dyn Fn(&mut Flow),
) -> Result<(), InsertError> {
    for k in std::iter::once(key).chain(pair) {
        if let Ok(mut f) = map.get(k, 0) {
            change(&mut f);
            map.insert(k, f, BPF_EXIST).map_err(insert_error)?;
        }
    }
    Ok(())
}

impl Table {
    fn conf(&self) -> Result<FlowConf, InsertError> {
        self.flow_conf.get(&0, 0).map_err(InsertError::Map)
    }
}

impl SyncTable for Table {
    type Key = FlowKey;

    /// In the slots or the overflow.
    fn get(&self, key: &FlowKey) -> Result<Option<Flow>, InsertError> {
        if let Some(f) = self.slots.get(key, &self.conf()?) {
            return Ok(Some(f));
        }
        found(&self.overflow, key, InsertError::Map)
    }

    /// Into a free way of its bucket, else into the overflow (if the reply
    /// cannot go in, the forward entry is taken out again).
    fn place(
        &mut self,
        key: &FlowKey,
        forward: &Flow,
        reply: Option<(&FlowKey, &Flow)>,
    ) -> Result<(), InsertError> {
        let conf = self.conf()?;
        // The reply comes from the backend's address and port (network order).
        let backend = reply.map(|(k, f)| ((k.saddr, k.sport), *f));
        match self
            .slots
            .insert_if_free(key, forward, backend, &conf, now_ticks())
        {
            Ok(_) => return Ok(()),
            Err(SlotError::TableFull) => {}
            Err(e) => return Err(InsertError::Slots(e)),
        }
        insert_pair(&mut self.overflow, key, forward, reply)?;
        self.slots.flag_overflow(key, &conf);
        Ok(())
    }

    /// Slots and overflow.
    fn entries(&self) -> Vec<(FlowKey, Flow)> {
        let mut out = self.slots.entries();
        out.extend(self.overflow.iter().filter_map(Result::ok));
        out
    }

    fn change(
        &mut self,
        key: &FlowKey,
        pair: Option<&FlowKey>,
        change: &dyn Fn(&mut Flow),
    ) -> Result<(), InsertError> {
        let conf = self.conf()?;
        if self
            .slots
            .update(key, &conf, |s| {
                change(&mut s.forward);
                change(&mut s.reply);
            })
            .is_some()
        {
            return Ok(());
        }
        change_entries(&mut self.overflow, key, pair, change)
    }
}

impl SyncTable for Table6 {
    type Key = FlowKey6;

    fn get(&self, key: &FlowKey6) -> Result<Option<Flow>, InsertError> {
        found(&self.established, key, InsertError::Map6)
    }

    /// Where there is no entry (`BPF_NOEXIST`); if the reply cannot go in,
    /// the forward entry is taken out again.
    fn place(
        &mut self,
        key: &FlowKey6,
        forward: &Flow,
        reply: Option<(&FlowKey6, &Flow)>,
    ) -> Result<(), InsertError> {
        insert_pair(&mut self.established, key, forward, reply)
    }

    fn entries(&self) -> Vec<(FlowKey6, Flow)> {
        self.established.iter().filter_map(Result::ok).collect()
    }

    fn change(
        &mut self,
        key: &FlowKey6,
        pair: Option<&FlowKey6>,
        change: &dyn Fn(&mut Flow),
    ) -> Result<(), InsertError> {
        change_entries(&mut self.established, key, pair, change)
    }
}

/// Inserts a flow (its forward entry, and a NAT flow's reply entry) that
/// never evicts anything and never replaces an entry: refused
/// ([`InsertError::Exists`]) if either key has one.
pub fn insert_established<T: SyncTable>(
    table: &mut T,
    key: &T::Key,
    forward: &Flow,
    reply: Option<(&T::Key, &Flow)>,
) -> Result<(), InsertError> {
    let exists = |k: &T::Key| table.get(k).map(|f| f.is_some());
    if exists(key)? || reply.map(|(k, _)| exists(k)).transpose()? == Some(true) {
        return Err(InsertError::Exists);
    }
    table.place(key, forward, reply)
}

/// The entry at `key` if it came from a peer.
pub fn synced<T: SyncTable>(table: &T, key: &T::Key) -> Result<Option<Flow>, InsertError> {
    match table.get(key)? {
        Some(f) if f.flags & FLOW_F_SYNCED != 0 => Ok(Some(f)),
        Some(_) => Err(InsertError::Exists),
        None => Ok(None),
    }
}

/// A peer says the synced flow at `key` is still active: its entries
/// (`key`, and `pair` for NAT) are seen at `seen` and keep their state.
pub fn refresh_synced<T: SyncTable>(
    table: &mut T,
    key: &T::Key,
    _entry: &Flow,
    pair: Option<&T::Key>,
    seen: u32,
) -> Result<(), InsertError> {
    table.change(key, pair, &|f| f.seen = seen)
}

/// A peer says the synced flow at `key` ended: its entries move to the
/// closing state (the closing timeout removes them; a SYN reusing the
/// tuple starts a new flow at once). True if it was established.
pub fn end_synced<T: SyncTable>(
    table: &mut T,
    key: &T::Key,
    entry: &Flow,
    pair: Option<&T::Key>,
) -> Result<bool, InsertError> {
    if entry.state != STATE_ESTABLISHED {
        return Ok(false);
    }
    table.change(key, pair, &|f| f.state = STATE_CLOSING)?;
    Ok(true)
}
