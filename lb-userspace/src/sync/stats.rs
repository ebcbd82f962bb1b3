//! What `lb status` and `/metrics` show of sync: per peer, flows sent and
//! received, rejections by reason, the last message's age.

use std::{
    collections::BTreeMap,
    net::SocketAddrV4,
    sync::{Arc, Mutex},
    time::Instant,
};

pub use crate::wire::sync::{PeerStatus, SyncStatus};

/// Why a datagram or a record was not taken, beyond the format's own
/// reasons ([`super::wire::Reject`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum RecordReject {
    /// No service here with the record's VIP, port and protocol (or one
    /// with another forwarding mode).
    UnknownService,
    /// The service has no backend with the record's address and port.
    UnknownBackend,
    /// The established table is full.
    TableFull,
}

impl RecordReject {
    pub fn name(self) -> &'static str {
        match self {
            RecordReject::UnknownService => "unknown_service",
            RecordReject::UnknownBackend => "unknown_backend",
            RecordReject::TableFull => "table_full",
        }
    }
}

impl SyncStatus {
    /// `lb status`'s sync lines: one per peer, then what came from
    /// strangers and the data plane's lost events.
    pub fn render(&self) -> String {
        let mut out = format!(
            "\nsync on {} (bulk copy at start: {}; {} synced flows)\n",
            self.listen, self.bulk, self.synced_flows
        );
        for p in &self.peers {
            let rejected: Vec<String> = p
                .rejected
                .iter()
                .map(|(why, n)| format!("{why}={n}"))
                .collect();
            // Only during a rolling upgrade from an LB with the wrapping age.
            let wrapped = match p.wrapped_ages {
                0 => String::new(),
                n => format!(" (wrapped age taken as fresh: {n})"),
            };
            out.push_str(&format!(
                "  peer {}: sent {} received {}{wrapped} kept-local {} rejected [{}] last message \
                 {}\n",
                p.peer,
                p.flows_sent,
                p.flows_received,
                p.flows_kept_local,
                rejected.join(" "),
                p.last_message_age_ms
                    .map_or("never".to_owned(), |ms| format!(
                        "{:.1}s ago",
                        ms as f64 / 1000.0
                    )),
            ));
        }
        if !self.rejected_strangers.is_empty() {
            let r: Vec<String> = self
                .rejected_strangers
                .iter()
                .map(|(why, n)| format!("{why}={n}"))
                .collect();
            out.push_str(&format!("  from strangers: rejected [{}]\n", r.join(" ")));
        }
        if self.events_lost > 0 {
            out.push_str(&format!(
                "  flow events lost (ring buffer full): {}\n",
                self.events_lost
            ));
        }
        out
    }
}

#[derive(Debug, Default)]
pub(super) struct Peer {
    pub(super) status: PeerStatus,
    pub(super) last: Option<Instant>,
}

/// Shared between the sync thread (writes) and the agent (reads).
#[derive(Debug, Clone, Default)]
pub struct Stats(pub(super) Arc<Mutex<Inner>>);

#[derive(Debug, Default)]
pub(super) struct Inner {
    pub(super) listen: String,
    pub(super) peers: BTreeMap<SocketAddrV4, Peer>,
    pub(super) strangers: BTreeMap<String, u64>,
    pub(super) events_lost: u64,
    pub(super) synced_flows: u64,
    pub(super) bulk: String,
}

impl Stats {
    pub(super) fn new(listen: SocketAddrV4, peers: &[SocketAddrV4]) -> Stats {
        let inner = Inner {
            listen: listen.to_string(),
            peers: peers
                .iter()
                .map(|p| {
                    (
                        *p,
                        Peer {
                            status: PeerStatus {
                                peer: p.to_string(),
                                ..PeerStatus::default()
                            },
                            last: None,
                        },
                    )
                })
                .collect(),
            bulk: "waiting".into(),
            ..Inner::default()
        };
        Stats(Arc::new(Mutex::new(inner)))
    }

    pub(super) fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        let mut guard = match self.0.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        f(&mut guard)
    }

    /// A snapshot for the status and the metrics.
    pub fn status(&self) -> SyncStatus {
        self.with(|s| SyncStatus {
            listen: s.listen.clone(),
            peers: s
                .peers
                .values()
                .map(|p| PeerStatus {
                    last_message_age_ms: p
                        .last
                        .map(|t| u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX)),
                    ..p.status.clone()
                })
                .collect(),
            rejected_strangers: s.strangers.clone(),
            events_lost: s.events_lost,
            synced_flows: s.synced_flows,
            bulk: s.bulk.clone(),
        })
    }
}

impl Inner {
    pub(super) fn reject(&mut self, peer: SocketAddrV4, reason: &str) {
        if let Some(p) = self.peers.get_mut(&peer) {
            *p.status.rejected.entry(reason.to_owned()).or_insert(0) += 1;
        } else {
            *self.strangers.entry(reason.to_owned()).or_insert(0) += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peers_wrapped_ages_are_shown_only_when_there_are_some() {
        let peer = |wrapped_ages| PeerStatus {
            peer: "198.19.0.12:7890".into(),
            flows_received: 30,
            wrapped_ages,
            ..PeerStatus::default()
        };
        let status = |p| SyncStatus {
            peers: vec![p],
            ..SyncStatus::default()
        };
        let text = status(peer(4)).render();
        assert!(
            text.contains("received 30 (wrapped age taken as fresh: 4) kept-local 0"),
            "{text}"
        );
        let text = status(peer(0)).render();
        assert!(text.contains("received 30 kept-local 0"), "{text}");
    }
}
