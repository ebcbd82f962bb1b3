//! `[coordination]`: several LBs running the same `[[pool]]` agree through
//! etcd on one decision-maker per pool and on the pool's primary.
//!
//! - Each LB holds one etcd lease (`lease-ttl`, renewed every fifth of it)
//!   and campaigns for every pool's key `/lb/pool/<pool>/leader` with a
//!   create-if-absent transaction under that lease: the LB whose name is
//!   there *leads* the pool. Only the leader promotes (automatic failover,
//!   `lb db promote`), re-points (`auto-rejoin`) and fences.
//! - The leader records the pool's primary at `/lb/pool/<pool>/primary`
//!   with a transaction guarded by its tenure (the leader key's create
//!   revision): a deposed leader's write fails. The key's revision orders
//!   records.
//! - Every LB (leader included) routes writes only to the recorded
//!   primary, and only while its own checks find it reachable and
//!   writable: an LB cut off from etcd keeps the last record, never
//!   promotes, and routes no writes once that primary dies.
//! - A leader counts itself leader only until half a TTL after its last
//!   renewal was *sent*, so it stops acting before etcd can expire its
//!   lease and hand the pool to another LB.
//!
//! [`Coordination`] is the pure per-pool part (tested on the host); [`run`]
//! is the task that talks to etcd.

pub mod etcd;

use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;
use tracing::warn;

use crate::config::Coordination as Config;

/// The key whose holder leads `pool`.
pub fn leader_key(pool: &str) -> String {
    format!("/lb/pool/{pool}/leader")
}

/// The key holding `pool`'s recorded primary.
pub fn record_key(pool: &str) -> String {
    format!("/lb/pool/{pool}/primary")
}

/// The primary the leader recorded, and the etcd revision of that record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    pub primary: String,
    pub revision: i64,
}

/// What one round with etcd found for a pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct View {
    /// The LB holding the pool's key.
    pub leader: String,
    /// Its tenure: the key's create revision.
    pub leader_revision: i64,
    /// The key is held under this LB's current lease.
    pub mine: bool,
    /// When the latest successful renewal of our lease was sent.
    pub renewed: Instant,
    pub recorded: Option<Recorded>,
}

/// One pool's coordination state in one LB.
#[derive(Debug, Clone)]
pub struct Coordination {
    /// This LB's name.
    pub me: String,
    pub ttl: Duration,
    /// The latest leader seen and its tenure.
    pub leader: Option<(String, i64)>,
    /// When this LB first saw the current tenure (the lease's age).
    pub leader_seen: Option<Instant>,
    /// This LB leads until then (half a TTL after a renewal was sent).
    pub leading_until: Option<Instant>,
    /// The latest record read or written (kept while etcd is unreachable).
    pub recorded: Option<Recorded>,
    /// When etcd last answered.
    pub reached: Option<Instant>,
    /// Why the latest round failed.
    pub error: Option<String>,
}

impl Coordination {
    pub fn new(me: &str, ttl: Duration) -> Coordination {
        Coordination {
            me: me.to_owned(),
            ttl,
            leader: None,
            leader_seen: None,
            leading_until: None,
            recorded: None,
            reached: None,
            error: None,
        }
    }

    /// This LB may promote, re-point and fence now.
    pub fn leads(&self, now: Instant) -> bool {
        self.leader.as_ref().is_some_and(|(l, _)| *l == self.me)
            && self.leading_until.is_some_and(|t| now < t)
    }

    /// A round with etcd succeeded.
    pub fn observed(&mut self, view: View, now: Instant) {
        if self.leader.as_ref().map(|(_, r)| *r) != Some(view.leader_revision) {
            self.leader_seen = Some(now);
        }
        self.leading_until = view.mine.then(|| view.renewed + self.ttl / 2);
        self.leader = Some((view.leader, view.leader_revision));
        // A record is only ever replaced by a newer one (a slow answer
        // must not undo what this LB just wrote).
        if let Some(r) = view.recorded
            && self
                .recorded
                .as_ref()
                .is_none_or(|old| old.revision <= r.revision)
        {
            self.recorded = Some(r);
        }
        self.reached = Some(now);
        self.error = None;
    }

    /// A round with etcd failed: keep the record; leadership runs out on
    /// its own (`leading_until`).
    pub fn unreachable(&mut self, why: String) {
        self.error = Some(why);
    }

    /// This LB's leader wrote `recorded`.
    pub fn wrote(&mut self, recorded: Recorded) {
        if self
            .recorded
            .as_ref()
            .is_none_or(|old| old.revision < recorded.revision)
        {
            self.recorded = Some(recorded);
        }
    }
}

/// The write service's member under coordination: the recorded primary,
/// only if this LB's own checks find it writable. Nothing recorded, or
/// the recorded one dead or read-only: no writer (no writer is better
/// than two).
pub fn writer(recorded: Option<&Recorded>, writable: &[String]) -> Option<String> {
    recorded
        .map(|r| r.primary.clone())
        .filter(|p| writable.contains(p))
}

/// What the leader should record: its own rule's writer (which keeps the
/// recorded primary while it is writable and adopts the one writable
/// member otherwise) when that differs from the record. Not leading:
/// nothing.
pub fn to_record(leads: bool, recorded: Option<&Recorded>, local: Option<&str>) -> Option<String> {
    let local = local.filter(|_| leads)?;
    (recorded.map(|r| r.primary.as_str()) != Some(local)).then(|| local.to_owned())
}

/// What the coordination tasks report, for the pools' loop (`db` turns
/// it into its own events: coordination never imports the pools).
#[derive(Debug)]
pub enum Report {
    /// A round with etcd for `pool`: what this LB saw, or why it failed.
    Coordinated {
        pool: String,
        result: Result<View, String>,
    },
    /// This LB tried to record `primary`: the record's revision, `None` if
    /// it no longer leads, or why etcd failed.
    Recorded {
        pool: String,
        primary: String,
        result: Result<Option<i64>, String>,
    },
}

/// How often the task renews the lease and reads every pool's keys.
pub fn tick(ttl: Duration) -> Duration {
    (ttl / 5).max(Duration::from_millis(200))
}

/// The coordination task: renews this LB's lease, campaigns for every
/// pool in `pools` and reports each round as [`Report::Coordinated`].
pub async fn run<E: From<Report>>(cfg: Config, pools: Vec<String>, tx: UnboundedSender<E>) {
    let tick = tick(cfg.lease_ttl);
    // One endpoint's silence must leave time for the others within a tick.
    let per_call = (tick / 2).max(Duration::from_millis(100));
    let client = match etcd::Etcd::from_config(&cfg, per_call) {
        Ok(c) => c,
        Err(e) => {
            // The config checked these settings: only a changed file
            // could fail here. Said, and no leadership (never acting blind).
            for pool in &pools {
                let _ = tx.send(E::from(Report::Coordinated {
                    pool: pool.clone(),
                    result: Err(e.to_string()),
                }));
            }
            return;
        }
    };
    let mut lease: Option<(i64, Instant)> = None;
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let sent = Instant::now();
        let renewed = match lease {
            None => client.grant(cfg.lease_ttl.as_secs()).await.map(Some),
            Some((id, _)) => client
                .keepalive(id)
                .await
                .map(|ttl| (ttl > 0).then_some(id)),
        };
        let id = match renewed {
            Ok(Some(id)) => {
                lease = Some((id, sent));
                id
            }
            Ok(None) => {
                warn!(
                    "coordination: etcd let lease {:?} expire: taking a new one",
                    lease.map(|l| l.0)
                );
                lease = None;
                continue;
            }
            Err(e) => {
                for pool in &pools {
                    let _ = tx.send(E::from(Report::Coordinated {
                        pool: pool.clone(),
                        result: Err(e.to_string()),
                    }));
                }
                continue;
            }
        };
        for pool in &pools {
            let result = client
                .campaign(&leader_key(pool), &cfg.name, id, &record_key(pool))
                .await;
            let result = match result {
                Ok(c) if c.leader.value == cfg.name && c.leader.lease != id => {
                    // Ours from a previous run of this LB, under a lease
                    // nobody renews: give it up now rather than at expiry.
                    let _ = client
                        .delete_if_created(&leader_key(pool), c.leader.create_revision)
                        .await;
                    continue;
                }
                Ok(c) => Ok(View {
                    mine: c.leader.lease == id,
                    leader: c.leader.value,
                    leader_revision: c.leader.create_revision,
                    renewed: sent,
                    recorded: c.record.map(|r| Recorded {
                        primary: r.value,
                        revision: r.mod_revision,
                    }),
                }),
                Err(e) => Err(e.to_string()),
            };
            let _ = tx.send(E::from(Report::Coordinated {
                pool: pool.clone(),
                result,
            }));
        }
    }
}

/// Records `primary` for `pool` if this LB still leads it (tenure
/// `leader_revision`); reports [`Report::Recorded`].
pub async fn record<E: From<Report>>(
    cfg: Config,
    pool: String,
    leader_revision: i64,
    primary: String,
    tx: UnboundedSender<E>,
) {
    let result = match etcd::Etcd::from_config(&cfg, tick(cfg.lease_ttl)) {
        Ok(client) => client
            .put_if_leader(
                &leader_key(&pool),
                (&cfg.name, leader_revision),
                &record_key(&pool),
                &primary,
            )
            .await
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    let _ = tx.send(E::from(Report::Recorded {
        pool,
        primary,
        result,
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(p: &str, revision: i64) -> Recorded {
        Recorded {
            primary: p.into(),
            revision,
        }
    }

    fn view(leader: &str, mine: bool, renewed: Instant, recorded: Option<Recorded>) -> View {
        View {
            leader: leader.into(),
            leader_revision: 5,
            mine,
            renewed,
            recorded,
        }
    }

    #[test]
    fn writes_go_to_the_recorded_primary_only_while_it_is_writable() {
        let w = |names: &[&str]| names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>();
        assert_eq!(
            writer(Some(&rec("db1", 3)), &w(&["db1"])),
            Some("db1".into())
        );
        // Dead (or read-only) recorded primary: nobody, even if another
        // member is writable (the record has not moved yet).
        assert_eq!(writer(Some(&rec("db1", 3)), &w(&["db2"])), None);
        // Nothing recorded yet: nobody.
        assert_eq!(writer(None, &w(&["db1"])), None);
    }

    #[test]
    fn only_the_leader_records_and_only_a_change() {
        let r = rec("db1", 3);
        assert_eq!(to_record(true, Some(&r), Some("db1")), None);
        assert_eq!(to_record(true, Some(&r), Some("db2")), Some("db2".into()));
        assert_eq!(to_record(true, None, Some("db1")), Some("db1".into()));
        assert_eq!(to_record(false, Some(&r), Some("db2")), None);
        assert_eq!(to_record(true, Some(&r), None), None);
    }

    #[test]
    fn leadership_ends_half_a_ttl_after_the_last_renewal_even_if_etcd_is_gone() {
        let t0 = Instant::now();
        let ttl = Duration::from_secs(4);
        let mut c = Coordination::new("lb1", ttl);
        assert!(!c.leads(t0));
        c.observed(view("lb1", true, t0, Some(rec("db1", 3))), t0);
        assert!(c.leads(t0 + Duration::from_secs(1)));
        // etcd unreachable: the record stays, leadership runs out at TTL/2
        // (before etcd may expire the lease at TTL).
        c.unreachable("no etcd endpoint answered".into());
        assert_eq!(c.recorded, Some(rec("db1", 3)));
        assert!(c.leads(t0 + Duration::from_millis(1999)));
        assert!(!c.leads(t0 + Duration::from_secs(2)));
        // Another LB's key: not ours whatever the clock says.
        c.observed(view("lb2", false, t0, None), t0);
        assert!(!c.leads(t0));
        assert_eq!(c.recorded, Some(rec("db1", 3)));
    }

    #[test]
    fn an_older_record_never_replaces_a_newer_one() {
        let t0 = Instant::now();
        let mut c = Coordination::new("lb1", Duration::from_secs(4));
        c.wrote(rec("db2", 9));
        // A round that read the key before the write answers late.
        c.observed(view("lb1", true, t0, Some(rec("db1", 3))), t0);
        assert_eq!(c.recorded, Some(rec("db2", 9)));
        c.observed(view("lb1", true, t0, Some(rec("db3", 12))), t0);
        assert_eq!(c.recorded, Some(rec("db3", 12)));
    }

    #[test]
    fn the_lease_age_counts_from_a_new_tenure() {
        let t0 = Instant::now();
        let mut c = Coordination::new("lb2", Duration::from_secs(4));
        c.observed(view("lb1", false, t0, None), t0);
        c.observed(view("lb1", false, t0, None), t0 + Duration::from_secs(3));
        assert_eq!(c.leader_seen, Some(t0));
        let mut v = view("lb2", true, t0, None);
        v.leader_revision = 8;
        c.observed(v, t0 + Duration::from_secs(5));
        assert_eq!(c.leader_seen, Some(t0 + Duration::from_secs(5)));
    }
}
