//! The kernel tier's sync peers (`kernel_sync.rs`, `kernel_sync_v6.rs`):
//! two or more `Harness`es of one test namespace, each with the real sync
//! thread on a loopback address, sharing [`KEY`].

use std::{
    net::SocketAddrV4,
    time::{Duration, Instant},
};

use lb_common::sync::{SyncEvent, SyncEvent6};
use lb_userspace::sync::{FlowEvent, Stats, SyncMaps};

use crate::kernel_net::Harness;

/// The sync port on every test LB's loopback address.
pub const PORT: u16 = 17890;

/// The key the test's LBs share.
pub const KEY: &str = "a key the two LBs of this test share, long enough";

/// A `[sync]` on loopback address `me` with the peers `peers`.
pub fn sync_config(me: [u8; 4], peers: &[[u8; 4]]) -> lb_userspace::config::Sync {
    lb_userspace::config::Sync {
        listen: SocketAddrV4::new(me.into(), PORT),
        peers: peers
            .iter()
            .map(|p| SocketAddrV4::new((*p).into(), PORT))
            .collect(),
        key_file: "/unused/in/this/test".into(),
        key: lb_userspace::config::Secret::new(KEY.into()),
        bulk_timeout: Duration::from_secs(1),
    }
}

/// Starts `h`'s sync thread on loopback address `me` with the peers
/// `peers` and waits for its bulk copy: its stats, and whether every peer
/// answered.
pub fn start_sync(h: &Harness, me: [u8; 4], peers: &[[u8; 4]]) -> (Stats, bool) {
    let (stats, bulk) =
        lb_userspace::sync::start(&sync_config(me, peers), SyncMaps::of(&h.dp).expect("maps"))
            .expect("start sync");
    (stats, bulk.0.blocking_recv().expect("the bulk copy ends"))
}

/// Waits up to 3 s for `cond`.
pub fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(3);
    while !cond() {
        assert!(Instant::now() < until, "timed out waiting: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A sync event of one family, taken out of the ring's [`FlowEvent`].
pub trait FamilyEvent: Sized {
    /// The event if it is of this family; the other family's back.
    fn of(event: FlowEvent) -> Result<Self, FlowEvent>;
}

impl FamilyEvent for SyncEvent {
    fn of(event: FlowEvent) -> Result<Self, FlowEvent> {
        match event {
            FlowEvent::V4(e) => Ok(e),
            other => Err(other),
        }
    }
}

impl FamilyEvent for SyncEvent6 {
    fn of(event: FlowEvent) -> Result<Self, FlowEvent> {
        match event {
            FlowEvent::V6(e) => Ok(e),
            other => Err(other),
        }
    }
}

/// The events of family `T`, every one of them: an event of the other
/// family fails the test.
pub fn events_of<T: FamilyEvent>(events: Vec<FlowEvent>) -> Vec<T> {
    events
        .into_iter()
        .map(|e| T::of(e).unwrap_or_else(|other| panic!("an event of the other family: {other:?}")))
        .collect()
}
