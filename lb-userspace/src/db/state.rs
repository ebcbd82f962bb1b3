//! One pool's state and the routing rule, without I/O: what the probes
//! found (rise/fall per member, for reachability and for qualifying as a
//! reader), which member the write service routes to, which ones the read
//! service spreads over, who is refused as a second writer, and when an
//! automatic failover is due. Tested on the host.
//!
//! The rules:
//! - **One writer.** The write service routes to the primary the pool
//!   has: it keeps that member while it is reachable and writable. A
//!   different writable member is *refused* (no write traffic, fenced to
//!   read-only by the agent) however it got writable. Only when the
//!   current primary is unreachable or read-only does the pool adopt a
//!   new one, and only if exactly one member is writable (a promotion by
//!   `lb db promote`, the automatic failover, or an outside orchestrator);
//!   two or more writable candidates and none kept: no writer at all.
//! - **Readers.** Reachable read-only members whose replication runs (IO
//!   and SQL threads) within `max-lag`, judged with the check's rise/fall;
//!   none qualifying: the primary, if `primary-fallback`.
//! - **Readers while the primary is gone.** A replica whose IO thread lost
//!   its primary (`Connecting`) has no lag to read (`Seconds_Behind_Master`
//!   is NULL). It stays a reader if it has applied everything it received
//!   (GTIDs) *and* the pool's primary did not answer the agent's latest
//!   probe either: nobody has fresher data, so a primary crash does not
//!   take the reads down with it. While the agent still reaches the
//!   primary, such a replica is cut off from a live primary and falls
//!   behind: it leaves.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant, SystemTime},
};

use crate::{
    config::Pool,
    health::{Counter, Health, mysql::Observation},
};

/// What the pool knows about one member.
#[derive(Debug, Clone)]
pub struct MemberState {
    /// Reachable (login works), with the check's rise and fall.
    pub up: Counter,
    /// Qualifies as a reader (replicating within max-lag), rise and fall.
    pub reader: Counter,
    /// The latest successful probe's findings.
    pub last: Option<Observation>,
    /// "ok" or why the latest probe failed.
    pub last_check: Option<String>,
    /// The latest probe logged in and read the state.
    pub answered: bool,
    pub last_at: Option<SystemTime>,
}

impl MemberState {
    fn new() -> MemberState {
        MemberState {
            up: Counter::starting(Health::Pending),
            reader: Counter::starting(Health::Pending),
            last: None,
            last_check: None,
            last_at: None,
            answered: false,
        }
    }

    /// Reachable and, at the latest probe, writable.
    pub fn writable(&self) -> bool {
        self.up.up() && self.last.as_ref().is_some_and(|o| !o.read_only)
    }
}

/// Where the pool's services route now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Routing {
    /// The write service's one member.
    pub writer: Option<String>,
    /// The read service's members.
    pub readers: Vec<String>,
    /// Writable members that are not the writer: no writes, fenced.
    pub refused: Vec<String>,
}

/// What an observation changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// The routing changed: the agent commits.
    pub routing_changed: bool,
    /// Members newly refused as a second writer (log loudly, count).
    pub new_conflicts: Vec<String>,
    /// The primary the pool adopted without a promotion of ours.
    pub adopted: Option<String>,
}

#[derive(Debug, Clone)]
pub struct PoolState {
    pub pool: Pool,
    pub members: BTreeMap<String, MemberState>,
    /// The member the pool considers primary (remembered while it is down).
    pub primary: Option<String>,
    pub routing: Routing,
    /// Since when the pool has had a primary but no writer.
    pub writer_lost_at: Option<Instant>,
    /// A promotion is running: no automatic one starts meanwhile.
    pub promoting: bool,
    /// Second writers refused so far.
    pub conflicts: u64,
    /// The latest failover, fencing or adoption, for the status.
    pub last_event: Option<String>,
}

impl PoolState {
    /// A pool's state; members still in `previous` (same name and
    /// address) keep what was known about them, and so does the primary.
    pub fn new(pool: Pool, previous: Option<&PoolState>) -> PoolState {
        let mut members = BTreeMap::new();
        for m in &pool.members {
            let kept = previous
                .filter(|p| p.pool.member(&m.name).map(|o| o.address) == Some(m.address))
                .and_then(|p| p.members.get(&m.name).cloned());
            members.insert(m.name.clone(), kept.unwrap_or_else(MemberState::new));
        }
        let primary = previous
            .and_then(|p| p.primary.clone())
            .filter(|name| members.contains_key(name));
        let mut state = PoolState {
            pool,
            members,
            primary,
            routing: Routing::default(),
            writer_lost_at: None,
            promoting: previous.is_some_and(|p| p.promoting),
            conflicts: previous.map_or(0, |p| p.conflicts),
            last_event: previous.and_then(|p| p.last_event.clone()),
        };
        state.reroute(Instant::now());
        state
    }

    /// Records one probe of `member`.
    pub fn record(
        &mut self,
        member: &str,
        result: Result<Observation, String>,
        now: Instant,
    ) -> Outcome {
        let (rise, fall, max_lag) = (
            self.pool.health.rise,
            self.pool.health.fall,
            self.pool.max_lag,
        );
        let primary_answered = self
            .primary
            .as_ref()
            .and_then(|p| self.members.get(p))
            .is_some_and(|p| p.answered);
        let Some(m) = self.members.get_mut(member) else {
            return Outcome::default();
        };
        let qualifies = result
            .as_ref()
            .is_ok_and(|o| qualifies_as_reader(o, max_lag, primary_answered));
        m.answered = result.is_ok();
        m.up.record(result.is_ok(), rise, fall);
        m.reader.record(qualifies, rise, fall);
        m.last_at = Some(SystemTime::now());
        match result {
            Ok(o) => {
                m.last_check = Some("ok".to_owned());
                m.last = Some(o);
            }
            Err(why) => m.last_check = Some(why),
        }
        self.reroute(now)
    }

    /// A promotion of ours succeeded: `member` is the primary now (before
    /// its next probe says so), the others are read-only replicas.
    pub fn promoted(&mut self, member: &str, now: Instant) -> Outcome {
        for (name, m) in &mut self.members {
            if let Some(o) = &mut m.last {
                o.read_only = name != member;
            }
        }
        if let Some(m) = self.members.get_mut(member) {
            // It answered the promotion: reachable now.
            if !m.up.up() {
                m.up = Counter::starting(Health::Up);
            }
        }
        self.primary = Some(member.to_owned());
        self.reroute(now)
    }

    /// Recomputes the routing from the members' state.
    fn reroute(&mut self, now: Instant) -> Outcome {
        let mut outcome = Outcome::default();
        let writable: Vec<String> = self
            .pool
            .members
            .iter()
            .filter(|m| self.members.get(&m.name).is_some_and(MemberState::writable))
            .map(|m| m.name.clone())
            .collect();
        let kept = self.primary.clone().filter(|p| writable.contains(p));
        let writer = match kept {
            Some(p) => Some(p),
            None if writable.len() == 1 => {
                let adopted = writable[0].clone();
                if self.primary.as_ref() != Some(&adopted) {
                    outcome.adopted = Some(adopted.clone());
                }
                self.primary = Some(adopted.clone());
                Some(adopted)
            }
            None => None,
        };
        let refused: Vec<String> = writable
            .iter()
            .filter(|w| writer.as_ref() != Some(*w))
            .cloned()
            .collect();
        outcome.new_conflicts = refused
            .iter()
            .filter(|r| !self.routing.refused.contains(r))
            .cloned()
            .collect();
        self.conflicts += outcome.new_conflicts.len() as u64;
        let mut readers: Vec<String> = self
            .pool
            .members
            .iter()
            .filter(|m| {
                self.members
                    .get(&m.name)
                    .is_some_and(|s| s.up.up() && s.reader.up() && !s.writable())
            })
            .map(|m| m.name.clone())
            .collect();
        if readers.is_empty()
            && self.pool.primary_fallback
            && let Some(w) = &writer
        {
            readers.push(w.clone());
        }
        self.writer_lost_at = match (&writer, &self.primary) {
            (None, Some(_)) => Some(self.writer_lost_at.unwrap_or(now)),
            _ => None,
        };
        let routing = Routing {
            writer,
            readers,
            refused,
        };
        outcome.routing_changed = routing != self.routing;
        self.routing = routing;
        outcome
    }

    /// The health the pool's `service` gives `member` (in its ring: up).
    /// `None`: not a service of this pool.
    pub fn health(&self, service: &str, member: &str) -> Option<Health> {
        let routed = if service == self.pool.write_service() {
            self.routing.writer.as_deref() == Some(member)
        } else if service == self.pool.read_service() {
            self.routing.readers.iter().any(|r| r == member)
        } else {
            return None;
        };
        let judged = self
            .members
            .get(member)
            .is_some_and(|m| m.up.health() != Health::Pending);
        Some(if routed {
            Health::Up
        } else if judged {
            Health::Down
        } else {
            Health::Pending
        })
    }

    /// The replica to promote: reachable, replicating from someone (SQL
    /// thread running), the most transactions applied.
    pub fn best_replica(&self) -> Option<String> {
        self.pool
            .members
            .iter()
            .filter_map(|m| {
                let s = self.members.get(&m.name)?;
                let o = s.last.as_ref()?;
                let r = o.replication.as_ref()?;
                (s.up.up() && o.read_only && r.sql_running).then(|| (o.applied(), m.name.clone()))
            })
            // Ties go to the first in config order.
            .fold(
                None,
                |best: Option<(u64, String)>, (applied, name)| match best {
                    Some((b, _)) if b >= applied => best,
                    _ => Some((applied, name)),
                },
            )
            .map(|(_, name)| name)
    }

    /// The member an automatic failover should promote now, if one is due:
    /// the pool opted in, its primary has had no writer for
    /// `auto-failover`, and no promotion is running.
    pub fn failover_due(&self, now: Instant) -> Option<String> {
        let after = self.pool.auto_failover?;
        let since = self.writer_lost_at?;
        if self.promoting || now.duration_since(since) < after {
            return None;
        }
        self.best_replica()
    }
}

/// Whether one probe's findings make a member fit to serve reads: a
/// read-only replica replicating within `max_lag`, or one that lost its
/// primary after applying all it received, while the pool's primary does
/// not answer the agent either (`primary_answered` false).
pub fn qualifies_as_reader(o: &Observation, max_lag: Duration, primary_answered: bool) -> bool {
    o.read_only
        && o.replication.as_ref().is_some_and(|r| {
            r.healthy_within(max_lag)
                || (!primary_answered && r.orphaned_but_caught_up(&o.gtid_slave_pos))
        })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::{
        config::{CheckKind, HealthCheck, MysqlLogin, PoolMember, Secret},
        health::mysql::Replication,
    };

    pub(crate) fn pool(fallback: bool, auto: Option<Duration>) -> Pool {
        let login = MysqlLogin {
            user: "lb".into(),
            password: Secret::new("pw".into()),
            password_file: None,
        };
        Pool {
            name: "db".into(),
            write_vip: "198.18.0.20:3306".parse().expect("vip"),
            read_vip: "198.18.0.21:3306".parse().expect("vip"),
            members: (1..=3)
                .map(|n| PoolMember {
                    name: format!("db{n}"),
                    address: format!("198.19.1.2{n}:3306").parse().expect("addr"),
                })
                .collect(),
            health: HealthCheck {
                check: CheckKind::Mysql(login.clone()),
                port: None,
                interval: Duration::from_millis(500),
                timeout: Duration::from_millis(500),
                rise: 1,
                fall: 2,
            },
            login,
            max_lag: Duration::from_secs(5),
            primary_fallback: fallback,
            auto_failover: auto,
            write_firewall: crate::config::Firewall::default(),
            read_firewall: crate::config::Firewall::default(),
        }
    }

    pub(crate) fn primary(applied: u64) -> Result<Observation, String> {
        Ok(Observation {
            read_only: false,
            server_id: 1,
            gtid_binlog_pos: format!("0-1-{applied}"),
            gtid_slave_pos: String::new(),
            replication: None,
        })
    }

    pub(crate) fn replica(applied: u64, lag: Option<u64>, io: &str) -> Result<Observation, String> {
        Ok(Observation {
            read_only: true,
            server_id: 2,
            gtid_binlog_pos: String::new(),
            gtid_slave_pos: format!("0-1-{applied}"),
            replication: Some(Replication {
                source: "198.19.1.21:3306".into(),
                io_running: io.into(),
                sql_running: true,
                lag_seconds: lag,
                gtid_io_pos: format!("0-1-{applied}"),
                error: None,
            }),
        })
    }

    fn down() -> Result<Observation, String> {
        Err("mysql 198.19.1.21:3306: connection refused".into())
    }

    fn healthy(state: &mut PoolState, now: Instant) {
        state.record("db1", primary(10), now);
        state.record("db2", replica(10, Some(0), "Yes"), now);
        state.record("db3", replica(9, Some(1), "Yes"), now);
    }

    #[test]
    fn writes_go_to_the_one_primary_and_reads_to_the_replicas() {
        let now = Instant::now();
        let mut s = PoolState::new(pool(true, None), None);
        assert_eq!(s.health("db-write", "db1"), Some(Health::Pending));
        healthy(&mut s, now);
        assert_eq!(s.routing.writer.as_deref(), Some("db1"));
        assert_eq!(s.routing.readers, ["db2", "db3"]);
        assert_eq!(s.health("db-write", "db1"), Some(Health::Up));
        assert_eq!(s.health("db-write", "db2"), Some(Health::Down));
        assert_eq!(s.health("db-read", "db1"), Some(Health::Down));
        assert_eq!(s.health("db-read", "db3"), Some(Health::Up));
        assert_eq!(s.health("www", "db3"), None);
    }

    #[test]
    fn a_lagging_or_stopped_replica_leaves_reads_after_fall_and_comes_back() {
        let now = Instant::now();
        let mut s = PoolState::new(pool(true, None), None);
        healthy(&mut s, now);
        // fall = 2: one bad probe is not enough.
        s.record("db2", replica(10, Some(30), "Yes"), now);
        assert_eq!(s.routing.readers, ["db2", "db3"]);
        let o = s.record("db2", replica(10, None, "No"), now);
        assert!(o.routing_changed);
        assert_eq!(s.routing.readers, ["db3"]);
        // rise = 1: back at the first good probe.
        s.record("db2", replica(12, Some(0), "Yes"), now);
        assert_eq!(s.routing.readers, ["db2", "db3"]);
    }

    #[test]
    fn no_replica_qualifying_falls_back_to_the_primary_if_allowed() {
        let now = Instant::now();
        for (fallback, want) in [(true, vec!["db1".to_owned()]), (false, vec![])] {
            let mut s = PoolState::new(pool(fallback, None), None);
            healthy(&mut s, now);
            for _ in 0..2 {
                s.record("db2", down(), now);
                s.record("db3", replica(9, Some(60), "Yes"), now);
            }
            assert_eq!(s.routing.readers, want, "fallback {fallback}");
        }
    }

    #[test]
    fn a_second_writer_is_refused_and_the_kept_one_stays() {
        let now = Instant::now();
        let mut s = PoolState::new(pool(true, None), None);
        healthy(&mut s, now);
        let o = s.record("db3", primary(9), now);
        assert_eq!(o.new_conflicts, ["db3"]);
        assert_eq!(s.routing.writer.as_deref(), Some("db1"));
        assert_eq!(s.routing.refused, ["db3"]);
        assert_eq!(s.health("db-write", "db3"), Some(Health::Down));
        assert_eq!(s.conflicts, 1);
        // Still refused at the next probe: counted once.
        let o = s.record("db3", primary(9), now);
        assert!(o.new_conflicts.is_empty());
        assert_eq!(s.conflicts, 1);
    }

    #[test]
    fn two_writers_and_no_kept_primary_means_no_writer() {
        let now = Instant::now();
        let mut s = PoolState::new(pool(true, None), None);
        s.record("db1", primary(1), now);
        s.record("db2", primary(1), now);
        // db1 was adopted first (the only writable one at the time).
        assert_eq!(s.routing.writer.as_deref(), Some("db1"));
        assert_eq!(s.routing.refused, ["db2"]);
        // With no primary to keep, neither is trusted.
        s.primary = None;
        s.reroute(now);
        assert_eq!(s.routing.writer, None);
        assert_eq!(s.routing.refused, ["db1", "db2"]);
    }

    #[test]
    fn the_primary_going_down_loses_the_writer_and_a_promotion_moves_it() {
        let t0 = Instant::now();
        let mut s = PoolState::new(pool(true, Some(Duration::from_secs(2))), None);
        healthy(&mut s, t0);
        s.record("db1", down(), t0);
        assert_eq!(s.routing.writer.as_deref(), Some("db1"));
        s.record("db1", down(), t0);
        assert_eq!(s.routing.writer, None);
        assert_eq!(s.health("db-write", "db1"), Some(Health::Down));
        assert_eq!(s.primary.as_deref(), Some("db1"));
        assert_eq!(s.failover_due(t0 + Duration::from_secs(1)), None);
        // db2 has applied more than db3.
        assert_eq!(
            s.failover_due(t0 + Duration::from_secs(2)).as_deref(),
            Some("db2")
        );
        let o = s.promoted("db2", t0);
        assert!(o.routing_changed);
        assert_eq!(s.routing.writer.as_deref(), Some("db2"));
        assert_eq!(s.routing.readers, ["db3"]);
        // The old primary comes back writable: refused, never the writer.
        let o = s.record("db1", primary(10), t0);
        assert_eq!(o.new_conflicts, ["db1"]);
        assert_eq!(s.routing.writer.as_deref(), Some("db2"));
        assert_eq!(s.health("db-write", "db1"), Some(Health::Down));
    }

    #[test]
    fn an_outside_promotion_is_followed() {
        let now = Instant::now();
        let mut s = PoolState::new(pool(true, None), None);
        healthy(&mut s, now);
        // An orchestrator demotes db1 and promotes db3.
        s.record("db1", replica(10, Some(0), "Yes"), now);
        let o = s.record("db3", primary(10), now);
        assert_eq!(o.adopted.as_deref(), Some("db3"));
        assert_eq!(s.routing.writer.as_deref(), Some("db3"));
    }

    /// A replica whose IO thread lost its primary, having applied up to
    /// `applied` of the `received` transactions.
    fn orphan(applied: u64, received: u64) -> Result<Observation, String> {
        let mut o = replica(applied, None, "Connecting")?;
        if let Some(r) = &mut o.replication {
            r.gtid_io_pos = format!("0-1-{received}");
        }
        Ok(o)
    }

    #[test]
    fn replicas_that_lost_a_crashed_primary_keep_serving_reads() {
        let now = Instant::now();
        let mut s = PoolState::new(pool(true, None), None);
        healthy(&mut s, now);
        // The primary crashes: its probe fails, and the replicas' IO
        // threads reconnect in vain. db2 applied all it got; db3 did not.
        s.record("db1", down(), now);
        for _ in 0..3 {
            s.record("db2", orphan(10, 10), now);
            s.record("db3", orphan(8, 9), now);
        }
        assert_eq!(s.routing.readers, ["db2"]);
        s.record("db1", down(), now);
        assert_eq!(s.routing.writer, None);
        assert_eq!(s.routing.readers, ["db2"]);
        // db3 catches up with what it received: back in (rise 1).
        s.record("db3", orphan(9, 9), now);
        assert_eq!(s.routing.readers, ["db2", "db3"]);
    }

    #[test]
    fn a_replica_cut_off_from_a_live_primary_leaves_the_reads() {
        let now = Instant::now();
        let mut s = PoolState::new(pool(true, None), None);
        healthy(&mut s, now);
        // db1 still answers the agent: db2 cannot reach it and falls
        // behind, however caught up it is with what it received.
        for _ in 0..2 {
            s.record("db1", primary(12), now);
            s.record("db2", orphan(10, 10), now);
        }
        assert_eq!(s.routing.writer.as_deref(), Some("db1"));
        assert_eq!(s.routing.readers, ["db3"]);
    }

    #[test]
    fn the_reader_rule_reads_lag_or_gtids() {
        let max = Duration::from_secs(5);
        let o = |r: Result<Observation, String>| r.expect("observation");
        assert!(qualifies_as_reader(
            &o(replica(10, Some(0), "Yes")),
            max,
            true
        ));
        assert!(!qualifies_as_reader(
            &o(replica(10, Some(9), "Yes")),
            max,
            false
        ));
        assert!(qualifies_as_reader(&o(orphan(10, 10)), max, false));
        assert!(!qualifies_as_reader(&o(orphan(10, 10)), max, true));
        assert!(!qualifies_as_reader(&o(orphan(9, 10)), max, false));
        // Stopped by hand: not orphaned, whatever it applied.
        assert!(!qualifies_as_reader(
            &o(replica(10, None, "No")),
            max,
            false
        ));
        assert!(!qualifies_as_reader(&o(primary(10)), max, false));
    }

    #[test]
    fn a_reload_keeps_what_is_known() {
        let now = Instant::now();
        let mut s = PoolState::new(pool(true, None), None);
        healthy(&mut s, now);
        let next = PoolState::new(pool(true, None), Some(&s));
        assert_eq!(next.routing, s.routing);
        let mut moved = pool(true, None);
        moved.members[1].address = "198.19.1.99:3306".parse().expect("addr");
        let next = PoolState::new(moved, Some(&s));
        assert_eq!(next.routing.readers, ["db3"]);
    }
}
