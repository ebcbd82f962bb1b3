//! Flow-state sync between LBs (issue 27): what the data plane tells the
//! agent. The data plane puts a [`SyncEvent`] into the `SYNC_EVENTS` ring
//! buffer when a flow becomes established (promotion, never a half-open
//! flow: a SYN flood must not become a sync flood) and when an established
//! flow's entry is removed, and only while `SYNC_ON` says sync is on (the
//! off path pays one array load). The agent drains the ring, batches the
//! events into authenticated messages for its peers (lb-userspace's
//! `sync::wire`) and inserts what its peers send into its own table,
//! marked [`crate::FLOW_F_SYNCED`].

use crate::{FlowKey, maps6::FlowKey6};

/// Bytes of the `SYNC_EVENTS` ring buffer: a power-of-two multiple of the
/// page size. 256 KiB holds 5461 IPv4 events (48 bytes with the ring's
/// header; 3640 IPv6 ones, 72): at 100k new flows a second, the agent's
/// 10 ms drain finds about a thousand.
pub const SYNC_RING_BYTES: u32 = 256 * 1024;

/// [`SyncEvent::kind`]: the flow became established (promoted).
pub const SYNC_EVENT_ESTABLISHED: u8 = 1;
/// [`SyncEvent::kind`]: the flow's established entry was removed (expiry a
/// packet found, a SYN reusing the tuple of a finished flow).
pub const SYNC_EVENT_ENDED: u8 = 2;

/// `SYNC_ON[0]`: sync's run-time switch, written by the agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncConf {
    /// Non-zero: flow events go into `SYNC_EVENTS`.
    pub on: u32,
    pub _pad: u32,
    /// Events lost because the ring buffer was full (atomic adds).
    pub lost: u64,
}

/// One flow event in `SYNC_EVENTS`, of either family: `K` is the flow
/// key's type ([`SyncEvent`] for IPv4, [`SyncEvent6`] for IPv6). Both go
/// into the one ring; the record's length (40 or 64 bytes, which the ring
/// keeps with each record) says which it is. Ids are the sender's own: the
/// agent turns them into addresses (the service's VIP, port and protocol,
/// the backend's address and port) before anything leaves the host.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncEventOf<K> {
    /// The flow's forward key (client → VIP), network order.
    pub key: K,
    pub backend_id: u32,
    pub service_id: u32,
    /// The client's highest sequence number (TCP), as the forward entry
    /// has it: a peer's entry starts from it, so the client's FIN closes
    /// the flow there too.
    pub seq: u32,
    /// A NAT flow's backend's sequence number (its reply entry's); 0 when
    /// unknown (the entry's first segment sets it).
    pub reply_seq: u32,
    /// [`SYNC_EVENT_ESTABLISHED`] or [`SYNC_EVENT_ENDED`].
    pub kind: u8,
    /// The entry's `Flow::flags` (a flow that came from a peer is not sent
    /// back to the peers).
    pub flags: u8,
    /// Non-zero: a NAT flow (it has a reply entry).
    pub nat: u8,
    pub _pad0: u8,
    pub _pad1: u32,
}

/// An IPv4 flow's event.
pub type SyncEvent = SyncEventOf<FlowKey>;
/// An IPv6 flow's event.
pub type SyncEvent6 = SyncEventOf<FlowKey6>;

const _: () = assert!(core::mem::size_of::<SyncConf>() == 16);
const _: () = assert!(core::mem::size_of::<SyncEvent>() == 40);
const _: () = assert!(core::mem::size_of::<SyncEvent6>() == 64);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), Copy, explicit padding (size asserts above).
    unsafe impl aya::Pod for super::SyncConf {}
    unsafe impl aya::Pod for super::SyncEvent {}
    unsafe impl aya::Pod for super::SyncEvent6 {}
}
