//! `[sync]`'s metrics: per peer, flow records sent and received, the
//! rejections by reason, the last message's age; the data plane's lost
//! events and the synced flows in the table — from the status snapshot.

use prometheus_client::{
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::sync::SyncStatus;

type Labels = Vec<(String, String)>;

fn peer(p: &str) -> Labels {
    vec![("peer".to_owned(), p.to_owned())]
}

/// Registers sync's metrics in `registry`.
pub fn register(registry: &mut Registry, s: &SyncStatus) {
    let sent = Family::<Labels, Counter>::default();
    let received = Family::<Labels, Counter>::default();
    let kept = Family::<Labels, Counter>::default();
    let wrapped = Family::<Labels, Counter>::default();
    let rejected = Family::<Labels, Counter>::default();
    let age = Family::<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
    for p in &s.peers {
        sent.get_or_create(&peer(&p.peer)).inc_by(p.flows_sent);
        received
            .get_or_create(&peer(&p.peer))
            .inc_by(p.flows_received);
        kept.get_or_create(&peer(&p.peer))
            .inc_by(p.flows_kept_local);
        wrapped.get_or_create(&peer(&p.peer)).inc_by(p.wrapped_ages);
        for (reason, n) in &p.rejected {
            rejected
                .get_or_create(&vec![
                    ("peer".to_owned(), p.peer.clone()),
                    ("reason".to_owned(), reason.clone()),
                ])
                .inc_by(*n);
        }
        if let Some(ms) = p.last_message_age_ms {
            age.get_or_create(&peer(&p.peer)).set(ms as f64 / 1000.0);
        }
    }
    for (reason, n) in &s.rejected_strangers {
        rejected
            .get_or_create(&vec![
                ("peer".to_owned(), "stranger".to_owned()),
                ("reason".to_owned(), reason.clone()),
            ])
            .inc_by(*n);
    }
    registry.register(
        "lb_sync_flows_sent",
        "Flow records sent to the peer LB",
        sent,
    );
    registry.register(
        "lb_sync_flows_received",
        "Flow records from the peer LB inserted, refreshed or ended here",
        received,
    );
    registry.register(
        "lb_sync_flows_kept_local",
        "Flow records from the peer LB for a tuple with a local entry (left as it is)",
        kept,
    );
    registry.register(
        "lb_sync_wrapped_ages",
        "Of the records received, those with an older LB's wrapped age (u32::MAX ms: a flow it \
         had just seen), inserted as fresh instead of expired",
        wrapped,
    );
    registry.register(
        "lb_sync_rejected",
        "Sync messages and flow records rejected, per peer (\"stranger\": not a peer) and reason",
        rejected,
    );
    registry.register(
        "lb_sync_last_message_age_seconds",
        "Seconds since the peer LB's last accepted message",
        age,
    );
    let lost = Counter::<u64>::default();
    lost.inc_by(s.events_lost);
    registry.register(
        "lb_sync_events_lost",
        "Flow events the data plane could not queue for sync (ring buffer full)",
        lost,
    );
    let synced = Gauge::<i64>::default();
    synced.set(i64::try_from(s.synced_flows).unwrap_or(i64::MAX));
    registry.register(
        "lb_sync_flows",
        "Flows in the established table that came from peer LBs (at the last refresh walk)",
        synced,
    );
}
