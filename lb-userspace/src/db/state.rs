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

use super::gtid;
use crate::{
    config::Pool,
    coord::{self, Coordination},
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
    /// `[coordination]`: the primary this LB, leading the pool, should
    /// record in etcd (writes follow once recorded).
    pub record: Option<String>,
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
    /// `auto-rejoin`: what was found or done for members that came back.
    pub rejoin: BTreeMap<String, Rejoin>,
    /// When the latest promotion of ours finished: members it re-pointed
    /// may still be seen at their old source until probed again.
    pub promoted_at: Option<Instant>,
    /// `[coordination]`: the pool's leader and recorded primary; `None`:
    /// this LB decides alone.
    pub coord: Option<Coordination>,
}

/// `auto-rejoin`'s state of one member (against the primary named).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejoin {
    /// Its history is being compared with the primary's.
    Checking { primary: String },
    /// Pointed at the primary by GTID (at `at`); a reader once within
    /// `max-lag`.
    Rejoined { primary: String, at: Instant },
    /// Holds transactions the primary lacks: kept out. `binlog_pos` is
    /// its position when checked (checked again if it moves).
    Errant {
        primary: String,
        binlog_pos: String,
        gtids: String,
    },
    /// The check or the re-pointing failed; tried again later.
    Failed {
        primary: String,
        why: String,
        at: Instant,
    },
}

impl Rejoin {
    fn primary(&self) -> &str {
        match self {
            Rejoin::Checking { primary }
            | Rejoin::Rejoined { primary, .. }
            | Rejoin::Errant { primary, .. }
            | Rejoin::Failed { primary, .. } => primary,
        }
    }
}

impl std::fmt::Display for Rejoin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rejoin::Checking { primary } => write!(f, "checking its GTIDs against {primary}"),
            Rejoin::Rejoined { primary, .. } => write!(f, "rejoined: replica of {primary}"),
            Rejoin::Errant { primary, gtids, .. } => {
                write!(
                    f,
                    "kept out: errant GTIDs {gtids} (not in {primary}'s binlog)"
                )
            }
            Rejoin::Failed { primary, why, .. } => {
                write!(f, "rejoining {primary} failed: {why}")
            }
        }
    }
}

/// How long a failed rejoin waits before it is tried again.
pub const REJOIN_RETRY: Duration = Duration::from_secs(5);

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
            rejoin: previous.map(|p| p.rejoin.clone()).unwrap_or_default(),
            promoted_at: previous.and_then(|p| p.promoted_at),
            coord: previous.and_then(|p| p.coord.clone()),
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
        self.promoted_at = Some(now);
        self.reroute(now)
    }

    /// The members `auto-rejoin` should check and re-point now: the pool
    /// opted in and has a writer, no promotion runs or just finished, and
    /// the member answers, is read-only (a writable one is fenced first)
    /// and replicates from nobody or from another member than the
    /// writer. One found errant is checked again only once its position
    /// moves or the primary changes; a failed one after [`REJOIN_RETRY`].
    /// A replica stopped by hand (still pointed at the writer) is left
    /// alone.
    pub fn rejoin_due(&self, now: Instant) -> Vec<String> {
        let Some(writer) = self.routing.writer.as_deref() else {
            return Vec::new();
        };
        let h = &self.pool.health;
        let settling = h.interval * (h.rise.max(h.fall) + 1) + h.timeout;
        if !self.pool.auto_rejoin
            || self.promoting
            || self
                .promoted_at
                .is_some_and(|t| now.duration_since(t) < settling)
        {
            return Vec::new();
        }
        let Some(source) = self.pool.member(writer).map(|m| m.address.to_string()) else {
            return Vec::new();
        };
        self.pool
            .members
            .iter()
            .filter(|m| m.name != writer)
            .filter(|m| {
                let Some(o) = self
                    .members
                    .get(&m.name)
                    .filter(|s| s.up.up() && s.answered)
                    .and_then(|s| s.last.as_ref())
                else {
                    return false;
                };
                let astray = o.replication.as_ref().is_none_or(|r| r.source != source);
                let again = match self.rejoin.get(&m.name) {
                    None => true,
                    Some(r) if r.primary() != writer => true,
                    Some(Rejoin::Checking { .. }) => false,
                    Some(Rejoin::Rejoined { at, .. }) => now.duration_since(*at) >= settling,
                    Some(Rejoin::Errant { binlog_pos, .. }) => *binlog_pos != o.gtid_binlog_pos,
                    Some(Rejoin::Failed { at, .. }) => now.duration_since(*at) >= REJOIN_RETRY,
                };
                o.read_only && astray && again
            })
            .map(|m| m.name.clone())
            .collect()
    }

    /// This LB may promote, re-point and fence in this pool now: it
    /// decides alone, or it holds the pool's lease.
    pub fn may_act(&self, now: Instant) -> bool {
        self.coord.as_ref().is_none_or(|c| c.leads(now))
    }

    /// Sets the coordination state (a round with etcd, a record written)
    /// and recomputes the routing.
    pub fn coordinate(&mut self, now: Instant, f: impl FnOnce(&mut Coordination)) -> Outcome {
        if let Some(c) = &mut self.coord {
            f(c);
        }
        self.reroute(now)
    }

    /// Recomputes the routing from the members' state. Under
    /// `[coordination]` the pool's primary is the recorded one, and the
    /// write service routes to it only (see [`coord::writer`]); the
    /// ordinary rule's choice is what a leader records.
    fn reroute(&mut self, now: Instant) -> Outcome {
        if let Some(r) = self.coord.as_ref().and_then(|c| c.recorded.as_ref())
            && self.members.contains_key(&r.primary)
        {
            self.primary = Some(r.primary.clone());
        }
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
        // Under coordination a member the ordinary rule would adopt is
        // not refused (it may be the leader's new primary, not recorded
        // yet), but gets no writes until it is recorded.
        let local = writer.clone();
        let writer = match &self.coord {
            None => writer,
            Some(c) => {
                outcome.record =
                    coord::to_record(c.leads(now), c.recorded.as_ref(), local.as_deref());
                coord::writer(c.recorded.as_ref(), &writable)
            }
        };
        let refused: Vec<String> = writable
            .iter()
            .filter(|w| writer.as_ref() != Some(*w) && local.as_ref() != Some(*w))
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
        // Lost by the ordinary rule: a leader whose new primary is not
        // recorded yet has one, and must not fail over again meanwhile.
        self.writer_lost_at = match (&local, &self.primary) {
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
    /// thread running), and holding the most complete GTID history of the
    /// reachable replicas (what it applied and what it received: the
    /// others must be able to follow it); ties go to the first in config
    /// order. Members without replication (a former primary kept out) do
    /// not count. `Err`: no candidate holds everything the other replicas
    /// have (promoting any would lose transactions), and why.
    pub fn best_replica(&self) -> Result<String, String> {
        let reachable: Vec<(&str, &Observation)> = self
            .pool
            .members
            .iter()
            .filter_map(|m| {
                let s = self.members.get(&m.name)?;
                let o = s.last.as_ref().filter(|_| s.up.up())?;
                (o.read_only && o.replication.is_some()).then_some((m.name.as_str(), o))
            })
            .collect();
        let mut histories = Vec::new();
        for (name, o) in &reachable {
            let h = gtid::history(o).map_err(|e| format!("{name}: {e}"))?;
            histories.push(((*name).to_owned(), h));
        }
        let candidates: Vec<(String, gtid::Position)> = reachable
            .iter()
            .zip(&histories)
            .filter(|((_, o), _)| o.replication.as_ref().is_some_and(|r| r.sql_running))
            .map(|(_, h)| h.clone())
            .collect();
        if candidates.is_empty() {
            return Err("no reachable replica with its SQL thread running".to_owned());
        }
        let mut why = Vec::new();
        for (name, pos) in &candidates {
            let short = gtid::shortfall(name, pos, &histories);
            if short.is_empty() {
                return Ok(name.clone());
            }
            why.extend(short);
        }
        Err(format!(
            "no replica holds every transaction the reachable members have ({}): \
             promote one by hand with --force",
            why.join("; ")
        ))
    }

    /// The member an automatic failover should promote now, if one is due:
    /// the pool opted in, its primary has had no writer for
    /// `auto-failover`, and no promotion is running. `Some(Err)`: due, but
    /// no replica may be promoted (why).
    pub fn failover_due(&self, now: Instant) -> Option<Result<String, String>> {
        let after = self.pool.auto_failover?;
        let since = self.writer_lost_at?;
        if self.promoting || now.duration_since(since) < after {
            return None;
        }
        Some(self.best_replica())
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
pub(crate) mod tests;
