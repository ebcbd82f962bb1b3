//! The one place a flow from a peer enters this LB's established table.
//! Every write of a synced flow goes through [`insert_established`] (and
//! a synced entry's refresh and end through [`refresh_synced`] and
//! [`end_synced`]), so a change of the table's design swaps these bodies
//! and nothing else.

use aya::maps::{HashMap, MapData, MapError};
use lb_common::{FLOW_F_SYNCED, Flow, FlowKey, flow::STATE_ESTABLISHED};

/// The established table as the sync agent holds it.
pub type Table = HashMap<MapData, FlowKey, Flow>;

const BPF_NOEXIST: u64 = 1;
const BPF_EXIST: u64 = 2;

/// Why a synced flow was not inserted.
#[derive(Debug, thiserror::Error)]
pub enum InsertError {
    /// The tuple has an entry already (a local flow, or a synced one):
    /// never replaced.
    #[error("the flow has an entry already")]
    Exists,
    /// The table holds as many entries as it may.
    #[error("the established table is full")]
    TableFull,
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

/// Inserts a flow (its forward entry, and a NAT flow's reply entry) that
/// never evicts anything: both entries go in only where there is none, and
/// if the reply cannot, the forward entry is taken out again.
pub fn insert_established(
    table: &mut Table,
    key: &FlowKey,
    forward: &Flow,
    reply: Option<(&FlowKey, &Flow)>,
) -> Result<(), InsertError> {
    table
        .insert(key, forward, BPF_NOEXIST)
        .map_err(insert_error)?;
    if let Some((reply_key, reply)) = reply
        && let Err(e) = table.insert(reply_key, reply, BPF_NOEXIST)
    {
        let _ = table.remove(key);
        return Err(insert_error(e));
    }
    Ok(())
}

/// The entry at `key` if it came from a peer.
pub fn synced(table: &Table, key: &FlowKey) -> Result<Option<Flow>, InsertError> {
    match table.get(key, 0) {
        Ok(f) if f.flags & FLOW_F_SYNCED != 0 => Ok(Some(f)),
        Ok(_) => Err(InsertError::Exists),
        Err(MapError::KeyNotFound) => Ok(None),
        Err(e) if errno(&e) == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(InsertError::Map(e)),
    }
}

/// A peer says the synced flow at `key` is still active: its entries
/// (`entry`, and `pair` for NAT) are seen at `seen` and keep their
/// state. Only entries that exist are written (a flow that ended here
/// meanwhile stays ended).
pub fn refresh_synced(
    table: &mut Table,
    key: &FlowKey,
    entry: &Flow,
    pair: Option<&FlowKey>,
    seen: u32,
) -> Result<(), InsertError> {
    let mut fresh = *entry;
    fresh.seen = seen;
    table.insert(key, fresh, BPF_EXIST).map_err(insert_error)?;
    if let Some(pair) = pair
        && let Ok(mut p) = table.get(pair, 0)
    {
        p.seen = seen;
        let _ = table.insert(pair, p, BPF_EXIST);
    }
    Ok(())
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
    let closing = |f: &Flow| Flow {
        state: lb_common::flow::STATE_CLOSING,
        ..*f
    };
    table
        .insert(key, closing(entry), BPF_EXIST)
        .map_err(insert_error)?;
    if let Some(pair) = pair
        && let Ok(p) = table.get(pair, 0)
    {
        let _ = table.insert(pair, closing(&p), BPF_EXIST);
    }
    Ok(true)
}
