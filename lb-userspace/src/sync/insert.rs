//! The one place a flow from a peer enters this LB's established table.
//! Every write of a synced flow goes through [`insert_established`] (and
//! a synced entry's refresh and end through [`refresh_synced`] and
//! [`end_synced`]), so a change of the table's design swaps these bodies
//! and nothing else.
//!
//! The table is `ESTABLISHED` (slots, both directions of a flow in one:
//! `crate::dataplane::EstablishedTable`) with `CONNTRACK` as its overflow
//! for flows whose bucket has no free way, as the data plane's promotion
//! places them. A synced flow takes only a free way (never a live flow's,
//! nor an expired one's: that flow's end is the sweep's to count), else
//! goes to the overflow with its bucket flagged.

use aya::maps::{Array, HashMap, MapData, MapError};
use lb_common::{
    FLOW_F_SYNCED, Flow, FlowConf, FlowKey,
    flow::{STATE_CLOSING, STATE_ESTABLISHED},
};

use crate::dataplane::{EstablishedTable, InsertError as SlotError, now_ticks};

/// The established table as the sync agent holds it: the slots, their
/// overflow, and the settings that place a flow in them.
pub struct Table {
    pub slots: EstablishedTable,
    pub overflow: HashMap<MapData, FlowKey, Flow>,
    pub flow_conf: Array<MapData, FlowConf>,
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

impl Table {
    fn conf(&self) -> Result<FlowConf, InsertError> {
        self.flow_conf.get(&0, 0).map_err(InsertError::Map)
    }

    /// The entry `key` (either direction) belongs to, in the slots or the
    /// overflow.
    fn get(&self, key: &FlowKey, conf: &FlowConf) -> Result<Option<Flow>, InsertError> {
        if let Some(f) = self.slots.get(key, conf) {
            return Ok(Some(f));
        }
        match self.overflow.get(key, 0) {
            Ok(f) => Ok(Some(f)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) if errno(&e) == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(InsertError::Map(e)),
        }
    }

    /// Every entry, keyed as its packets arrive (forward, and a NAT flow's
    /// reply), slots and overflow.
    pub fn entries(&self) -> Vec<(FlowKey, Flow)> {
        let mut out = self.slots.entries();
        out.extend(self.overflow.iter().filter_map(Result::ok));
        out
    }

    /// `change` applied to the flow (forward key `key`, and `pair`, a NAT
    /// flow's reply key) wherever it is; only entries that exist are
    /// written (a flow that ended here meanwhile stays ended).
    fn change(
        &mut self,
        key: &FlowKey,
        pair: Option<&FlowKey>,
        change: impl Fn(&mut Flow),
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
        for k in std::iter::once(key).chain(pair) {
            if let Ok(mut f) = self.overflow.get(k, 0) {
                change(&mut f);
                self.overflow
                    .insert(k, f, BPF_EXIST)
                    .map_err(insert_error)?;
            }
        }
        Ok(())
    }
}

/// Inserts a flow (its forward entry, and a NAT flow's reply entry) that
/// never evicts anything: into a free way of its bucket, else into the
/// overflow where there is no entry (if the reply cannot go in, the
/// forward entry is taken out again).
pub fn insert_established(
    table: &mut Table,
    key: &FlowKey,
    forward: &Flow,
    reply: Option<(&FlowKey, &Flow)>,
) -> Result<(), InsertError> {
    let conf = table.conf()?;
    let exists = |k: &FlowKey| table.get(k, &conf).map(|f| f.is_some());
    if exists(key)? || reply.map(|(k, _)| exists(k)).transpose()? == Some(true) {
        return Err(InsertError::Exists);
    }
    // The reply comes from the backend's address and port (network order).
    let backend = reply.map(|(k, f)| ((k.saddr, k.sport), *f));
    match table
        .slots
        .insert_if_free(key, forward, backend, &conf, now_ticks())
    {
        Ok(_) => return Ok(()),
        Err(SlotError::TableFull) => {}
        Err(e) => return Err(InsertError::Slots(e)),
    }
    table
        .overflow
        .insert(key, forward, BPF_NOEXIST)
        .map_err(insert_error)?;
    if let Some((reply_key, reply)) = reply
        && let Err(e) = table.overflow.insert(reply_key, reply, BPF_NOEXIST)
    {
        let _ = table.overflow.remove(key);
        return Err(insert_error(e));
    }
    table.slots.flag_overflow(key, &conf);
    Ok(())
}

/// The entry at `key` if it came from a peer.
pub fn synced(table: &Table, key: &FlowKey) -> Result<Option<Flow>, InsertError> {
    let conf = table.conf()?;
    match table.get(key, &conf)? {
        Some(f) if f.flags & FLOW_F_SYNCED != 0 => Ok(Some(f)),
        Some(_) => Err(InsertError::Exists),
        None => Ok(None),
    }
}

/// A peer says the synced flow at `key` is still active: its entries
/// (`key`, and `pair` for NAT) are seen at `seen` and keep their state.
pub fn refresh_synced(
    table: &mut Table,
    key: &FlowKey,
    _entry: &Flow,
    pair: Option<&FlowKey>,
    seen: u32,
) -> Result<(), InsertError> {
    table.change(key, pair, |f| f.seen = seen)
}

/// A peer says the synced flow at `key` ended: its entries move to the
/// closing state (the closing timeout removes them; a SYN reusing the
/// tuple starts a new flow at once). True if it was established.
pub fn end_synced(
    table: &mut Table,
    key: &FlowKey,
    entry: &Flow,
    pair: Option<&FlowKey>,
) -> Result<bool, InsertError> {
    if entry.state != STATE_ESTABLISHED {
        return Ok(false);
    }
    table.change(key, pair, |f| f.state = STATE_CLOSING)?;
    Ok(true)
}
