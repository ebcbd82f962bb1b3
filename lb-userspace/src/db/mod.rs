//! The database tier: `[[pool]]`s of MySQL/MariaDB servers routed by role.
//! One probe task per member (`check = "mysql"`: login, `@@read_only`,
//! replication threads, lag) reports to the agent's loop; the pure
//! [`state`] decides the write service's one member and the read service's
//! members, and the agent admits exactly those into the services' rings
//! (the write service drops flows of a member that stops being the writer:
//! that is the fencing of the data plane). [`ops`] acts on the servers:
//! promotion (`lb db promote`, automatic failover) and fencing a second
//! writer to read-only. A reload that changes a pool's login tries it on
//! the members first ([`vet_new_logins`]): a typo must not take the write
//! VIP to nobody.

pub mod gtid;
pub mod ops;
pub mod state;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    time::{Duration, Instant, SystemTime},
};

use tokio::{
    sync::{mpsc::UnboundedSender, oneshot},
    task::JoinHandle,
    time::MissedTickBehavior,
};
use tracing::{error, info, warn};

pub use crate::wire::{CoordStatus, DbCommand, MemberStatus, PoolStatus, Role};
use crate::{
    config::{Config, ConfigError, Pool, PoolMember},
    health::{
        AgentErrorLog, Health, ProbeError,
        mysql::{self, LoginFailure, Observation},
    },
    wire::{PoolRole, Response},
};
use state::PoolState;

/// What the pools' tasks report to the agent's loop.
#[derive(Debug)]
pub enum Event {
    Probed {
        pool: String,
        member: String,
        generation: u64,
        result: Result<Observation, ProbeError>,
    },
    Promoted {
        pool: String,
        member: String,
        /// "lb db promote" or "automatic failover".
        how: &'static str,
        started: Instant,
        result: Result<String, String>,
        reply: Option<oneshot::Sender<Response>>,
    },
    Fenced {
        pool: String,
        member: String,
        result: Result<(), String>,
    },
    /// `auto-rejoin` checked `member` against `primary`: the errant GTIDs
    /// (empty: re-pointed), or why it could not.
    Rejoined {
        pool: String,
        member: String,
        primary: String,
        /// The member's `gtid_binlog_pos` when the check was started.
        binlog_pos: String,
        result: Result<Vec<gtid::Gtid>, String>,
    },
    /// `[coordination]`: a round with etcd for `pool` (coord::run).
    Coordinated {
        pool: String,
        result: Result<crate::coord::View, String>,
    },
    /// `[coordination]`: this LB tried to record `primary`: the record's
    /// revision, `None` if it no longer leads, or why etcd failed.
    Recorded {
        pool: String,
        primary: String,
        result: Result<Option<i64>, String>,
    },
}

/// What handling an event asks of the agent.
#[derive(Default)]
pub struct Handled {
    /// The routing changed: commit.
    pub commit: bool,
    /// A promotion's answer, to send once committed.
    pub reply: Option<(oneshot::Sender<Response>, Response)>,
}

struct Running {
    pool: Pool,
    generation: u64,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// A task aborted when dropped.
struct Task(JoinHandle<()>);

impl Drop for Task {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Every pool's state and probe tasks; owned by the agent.
pub struct Pools {
    states: BTreeMap<String, PoolState>,
    running: BTreeMap<String, Running>,
    fencing: BTreeSet<(String, String)>,
    /// `[coordination]` and its task (with the pools it campaigns for).
    coordination: Option<(crate::config::Coordination, Vec<String>, Task)>,
    /// Records being written: (pool, primary).
    recording: BTreeSet<(String, String)>,
    tx: UnboundedSender<Event>,
    next_generation: u64,
    /// Member probes the agent could not run ([`ProbeError::Agent`]),
    /// in all and per (pool, member) for the once-a-minute log.
    agent_errors: u64,
    agent_error_logs: BTreeMap<(String, String), AgentErrorLog>,
}

impl Pools {
    pub fn new(tx: UnboundedSender<Event>) -> Pools {
        Pools {
            states: BTreeMap::new(),
            running: BTreeMap::new(),
            fencing: BTreeSet::new(),
            coordination: None,
            recording: BTreeSet::new(),
            tx,
            next_generation: 0,
            agent_errors: 0,
            agent_error_logs: BTreeMap::new(),
        }
    }

    /// Member probes the agent could not run since it started (they are
    /// never a member's failure); part of `lb_probe_agent_errors_total`.
    pub fn agent_errors(&self) -> u64 {
        self.agent_errors
    }

    /// Follows the config: unchanged pools keep probing as they are; a
    /// changed pool restarts its probes, keeping what is known of members
    /// that stayed. Must run inside the tokio runtime.
    pub fn sync(&mut self, cfg: &Config) {
        self.running
            .retain(|name, _| cfg.pools.iter().any(|p| &p.name == name));
        self.states
            .retain(|name, _| cfg.pools.iter().any(|p| &p.name == name));
        self.agent_error_logs
            .retain(|(name, _), _| cfg.pools.iter().any(|p| &p.name == name));
        for pool in &cfg.pools {
            if self
                .running
                .get(&pool.name)
                .is_some_and(|r| &r.pool == pool)
            {
                continue;
            }
            let state = PoolState::new(pool.clone(), self.states.get(&pool.name));
            self.states.insert(pool.name.clone(), state);
            self.next_generation += 1;
            let generation = self.next_generation;
            let tasks = pool
                .members
                .iter()
                .map(|m| {
                    tokio::spawn(probe_member(
                        pool.clone(),
                        m.clone(),
                        generation,
                        self.tx.clone(),
                    ))
                })
                .collect();
            self.running.insert(
                pool.name.clone(),
                Running {
                    pool: pool.clone(),
                    generation,
                    tasks,
                },
            );
        }
        self.sync_coordination(cfg);
    }

    /// Starts, restarts or stops the coordination task with the config;
    /// each pool's state gets a fresh coordination state when it changes.
    fn sync_coordination(&mut self, cfg: &Config) {
        let names: Vec<String> = cfg.pools.iter().map(|p| p.name.clone()).collect();
        let wanted = cfg.coordination.clone().filter(|_| !names.is_empty());
        let same = match (&self.coordination, &wanted) {
            (Some((c, n, _)), Some(w)) => c == w && *n == names,
            (None, None) => true,
            _ => false,
        };
        if same {
            return;
        }
        self.coordination = None;
        for state in self.states.values_mut() {
            state.coord = wanted
                .as_ref()
                .map(|c| crate::coord::Coordination::new(&c.name, c.lease_ttl));
            state.coordinate(Instant::now(), |_| {});
        }
        if let Some(c) = wanted {
            info!(
                "coordination: pools [{}] through etcd {} as {:?} (lease TTL {:?})",
                names.join(" "),
                c.etcd.join(" "),
                c.name,
                c.lease_ttl
            );
            let task = tokio::spawn(crate::coord::run(c.clone(), names.clone(), self.tx.clone()));
            self.coordination = Some((c, names, Task(task)));
        }
    }

    /// A coordination event: the pool's leader, record and routing.
    fn coordinated(
        &mut self,
        pool: &str,
        update: impl FnOnce(&mut crate::coord::Coordination),
    ) -> Handled {
        let now = Instant::now();
        let Some(state) = self.states.get_mut(pool) else {
            return Handled::default();
        };
        let before = state.routing.writer.clone();
        let outcome = state.coordinate(now, update);
        if outcome.routing_changed && state.routing.writer != before {
            info!(
                pool = %pool,
                "pool {pool}: writes -> {} (recorded primary {})",
                state.routing.writer.as_deref().unwrap_or("nobody"),
                state
                    .coord
                    .as_ref()
                    .and_then(|c| c.recorded.as_ref())
                    .map_or("none".to_owned(), |r| format!("{} at revision {}", r.primary, r.revision))
            );
        }
        self.start_record(pool, outcome.record.as_deref());
        Handled {
            commit: outcome.routing_changed,
            reply: None,
        }
    }

    /// Leading `pool`, records `primary` in etcd (once at a time).
    fn start_record(&mut self, pool: &str, primary: Option<&str>) {
        let (Some(primary), Some((cfg, _, _))) = (primary, &self.coordination) else {
            return;
        };
        let Some(revision) = self
            .states
            .get(pool)
            .and_then(|s| s.coord.as_ref())
            .and_then(|c| c.leader.as_ref().map(|(_, r)| *r))
        else {
            return;
        };
        if self.recording.iter().any(|(p, _)| p == pool) {
            return;
        }
        self.recording.insert((pool.to_owned(), primary.to_owned()));
        info!(pool = %pool, "pool {pool}: leading it, recording {primary} as its primary in etcd");
        tokio::spawn(crate::coord::record(
            cfg.clone(),
            pool.to_owned(),
            revision,
            primary.to_owned(),
            self.tx.clone(),
        ));
    }

    /// The health a pool's service gives a member: up if it routes to it.
    /// `None` for services that are not a pool's.
    pub fn health(&self, service: &str, member: &str) -> Option<Health> {
        self.states.values().find_map(|s| s.health(service, member))
    }

    /// A member as one of its pool's services shows it in `lb status`: its
    /// role there and its own check. `None` for services that are not a
    /// pool's.
    pub fn member_view(&self, service: &str, member: &str) -> Option<MemberView> {
        self.states.values().find_map(|s| {
            let routed = s.health(service, member)? == Health::Up;
            let m = s.members.get(member);
            Some(MemberView {
                role: if routed {
                    PoolRole::Routed
                } else {
                    PoolRole::Standby
                },
                health: m.map_or(Health::Pending, |m| m.up.health()),
                last_check: m.and_then(|m| m.last_check.clone()),
                last_at: m.and_then(|m| m.last_at),
            })
        })
    }

    pub fn handle(&mut self, event: Event) -> Handled {
        match event {
            Event::Coordinated { pool, result } => match result {
                Ok(view) => {
                    let now = Instant::now();
                    self.coordinated(&pool, |c| c.observed(view, now))
                }
                Err(why) => self.coordinated(&pool, |c| {
                    if c.error.is_none() {
                        warn!(pool = %pool, "coordination: etcd unreachable: keeping the recorded primary, not promoting: {why}");
                    }
                    c.unreachable(why);
                }),
            },
            Event::Recorded {
                pool,
                primary,
                result,
            } => {
                self.recording.remove(&(pool.clone(), primary.clone()));
                match result {
                    Ok(Some(revision)) => {
                        warn!(pool = %pool, "pool {pool}: recorded {primary} as its primary in etcd (revision {revision})");
                        if let Some(s) = self.states.get_mut(&pool) {
                            s.last_event = Some(format!(
                                "recorded {primary} as the primary in etcd (revision {revision})"
                            ));
                        }
                        self.coordinated(&pool, |c| {
                            c.wrote(crate::coord::Recorded { primary, revision })
                        })
                    }
                    Ok(None) => {
                        warn!(pool = %pool, "pool {pool}: no longer leading it: {primary} not recorded");
                        Handled::default()
                    }
                    Err(why) => {
                        error!(pool = %pool, "pool {pool}: recording {primary} in etcd failed: {why}");
                        Handled::default()
                    }
                }
            }
            Event::Probed {
                pool,
                member,
                generation,
                result,
            } => self.probed(&pool, &member, generation, result),
            Event::Fenced {
                pool,
                member,
                result,
            } => {
                self.fencing.remove(&(pool.clone(), member.clone()));
                let state = self.states.get_mut(&pool);
                match result {
                    Ok(()) => {
                        warn!(pool = %pool, member = %member, "fenced {pool}/{member}: set read_only = 1 (it was a second writer)");
                        if let Some(s) = state {
                            s.last_event = Some(format!(
                                "{member} was writable beside the primary: refused writes, set read-only"
                            ));
                        }
                    }
                    Err(why) => {
                        error!(pool = %pool, member = %member, "could not fence {pool}/{member} (a second writer): {why}");
                        if let Some(s) = state {
                            s.last_event = Some(format!(
                                "{member} is a second writer: refused writes, but setting it read-only failed: {why}"
                            ));
                        }
                    }
                }
                Handled::default()
            }
            Event::Rejoined {
                pool,
                member,
                primary,
                binlog_pos,
                result,
            } => {
                if let Some(state) = self.states.get_mut(&pool) {
                    let r = rejoined(&pool, &member, primary, binlog_pos, result);
                    if !matches!(r, state::Rejoin::Failed { .. }) {
                        state.last_event = Some(format!("{member}: {r}"));
                    }
                    state.rejoin.insert(member, r);
                }
                Handled::default()
            }
            Event::Promoted {
                pool,
                member,
                how,
                started,
                result,
                reply,
            } => {
                let Some(state) = self.states.get_mut(&pool) else {
                    return Handled::default();
                };
                state.promoting = false;
                let took = started.elapsed();
                let mut record = None;
                let (commit, response) = match result {
                    Ok(msg) => {
                        let outcome = state.promoted(&member, Instant::now());
                        record = outcome.record;
                        let msg = format!("{msg} ({how}, {} ms)", took.as_millis());
                        warn!(pool = %pool, member = %member, "{msg}");
                        state.last_event = Some(msg.clone());
                        (outcome.routing_changed, Response::ok(msg))
                    }
                    Err(why) => {
                        let msg = format!(
                            "promotion of {pool}/{member} refused or failed ({how}): {why}"
                        );
                        error!("{msg}");
                        state.last_event = Some(msg.clone());
                        (false, Response::error(msg))
                    }
                };
                self.start_record(&pool, record.as_deref());
                Handled {
                    commit,
                    reply: reply.map(|r| (r, response)),
                }
            }
        }
    }

    fn probed(
        &mut self,
        pool: &str,
        member: &str,
        generation: u64,
        result: Result<Observation, ProbeError>,
    ) -> Handled {
        if self.running.get(pool).map(|r| r.generation) != Some(generation) {
            return Handled::default();
        }
        let Some(state) = self.states.get_mut(pool) else {
            return Handled::default();
        };
        let result = match result {
            Ok(observation) => Ok(observation),
            Err(ProbeError::Backend(why)) => Err(why),
            Err(ProbeError::Agent(why)) => {
                // Not an outcome: the member's counters stay as they were.
                self.agent_errors += 1;
                let log = self
                    .agent_error_logs
                    .entry((pool.to_owned(), member.to_owned()))
                    .or_default();
                let Some(m) = state.members.get_mut(member) else {
                    return Handled::default();
                };
                if let Some(since) = log.note(Instant::now()) {
                    error!(
                        pool = %pool,
                        member = %member,
                        "health check of pool {pool} member {member} cannot run: {why} ({since} \
                         such probes since the last report); its health stays {} until probes run again \
                         (counted in lb_probe_agent_errors_total)",
                        m.up.health()
                    );
                }
                m.last_check = Some(ProbeError::Agent(why).to_string());
                m.last_at = Some(SystemTime::now());
                return Handled::default();
            }
        };
        let before = state.routing.clone();
        let had_primary = state.primary.is_some();
        let outcome = state.record(member, result, Instant::now());
        for conflict in &outcome.new_conflicts {
            error!(
                pool = %pool,
                member = %conflict,
                "pool {pool}: {conflict} is writable but {} is the primary: never two writers — \
                 {conflict} gets no writes and is being set read-only",
                state.routing.writer.as_deref().unwrap_or("(none)")
            );
        }
        if let Some(adopted) = &outcome.adopted {
            // The first primary found (at start) is said by the routing
            // line below; a primary replaced from outside is a warning.
            if had_primary {
                warn!(pool = %pool, "pool {pool}: {adopted} is the writable member: the write service routes to it");
            }
            state.last_event = Some(format!(
                "{adopted} adopted as primary (the only writable member)"
            ));
        }
        if outcome.routing_changed {
            info!(
                pool = %pool,
                "pool {pool}: writes -> {}, reads -> [{}] (was {} / [{}])",
                state.routing.writer.as_deref().unwrap_or("nobody"),
                state.routing.readers.join(" "),
                before.writer.as_deref().unwrap_or("nobody"),
                before.readers.join(" ")
            );
        }
        // Every refused writer that answers is set read-only, again at each
        // probe while it stays writable (under coordination, by the leader).
        let acts = state.may_act(Instant::now());
        let refused: Vec<PoolMember> = state
            .routing
            .refused
            .iter()
            .filter(|_| acts)
            .filter_map(|r| state.pool.member(r).cloned())
            .collect();
        let (login, timeout) = (state.pool.login.clone(), state.pool.health.timeout);
        for m in refused {
            if self.fencing.insert((pool.to_owned(), m.name.clone())) {
                let (tx, pool, login) = (self.tx.clone(), pool.to_owned(), login.clone());
                tokio::spawn(async move {
                    let result = ops::fence(m.address, &login, timeout).await;
                    let _ = tx.send(Event::Fenced {
                        pool,
                        member: m.name,
                        result,
                    });
                });
            }
        }
        self.start_record(pool, outcome.record.as_deref());
        let due = self
            .states
            .get(pool)
            .filter(|s| s.may_act(Instant::now()))
            .and_then(|s| s.failover_due(Instant::now()));
        if let Some(Err(why)) = due {
            // Said once per reason, not at every probe.
            let msg = format!("automatic failover of pool {pool} withheld: {why}");
            if let Some(state) = self.states.get_mut(pool)
                && state.last_event.as_ref() != Some(&msg)
            {
                error!("{msg}");
                state.last_event = Some(msg);
            }
        } else if let Some(Ok(candidate)) = due
            && let Some(state) = self.states.get(pool)
        {
            warn!(
                pool = %pool,
                "pool {pool}: primary {} has had no writer for {:?}: automatic failover to {candidate}",
                state.primary.as_deref().unwrap_or("?"),
                state.pool.auto_failover.unwrap_or_default()
            );
            if let Err(why) = self.promote(pool, &candidate, false, None, "automatic failover") {
                error!("automatic failover of pool {pool}: {why}");
            }
        }
        self.start_rejoins(pool);
        Handled {
            commit: outcome.routing_changed,
            reply: None,
        }
    }

    /// Starts `auto-rejoin`'s check (and re-pointing) of every member of
    /// `pool` that is due.
    fn start_rejoins(&mut self, pool: &str) {
        let Some(state) = self
            .states
            .get_mut(pool)
            .filter(|s| s.may_act(Instant::now()))
        else {
            return;
        };
        let Some(primary) = state
            .routing
            .writer
            .as_deref()
            .and_then(|w| state.pool.member(w).cloned())
        else {
            return;
        };
        for name in state.rejoin_due(Instant::now()) {
            let Some(member) = state.pool.member(&name).cloned() else {
                continue;
            };
            let binlog_pos = state
                .members
                .get(&name)
                .and_then(|m| m.last.as_ref())
                .map(|o| o.gtid_binlog_pos.clone())
                .unwrap_or_default();
            info!(pool = %pool, member = %name, "pool {pool}: {name} replicates from nobody or elsewhere: checking whether it can rejoin as a replica of {}", primary.name);
            state.rejoin.insert(
                name.clone(),
                state::Rejoin::Checking {
                    primary: primary.name.clone(),
                },
            );
            let (tx, pool, login) = (self.tx.clone(), pool.to_owned(), state.pool.login.clone());
            let timeout = state.pool.health.timeout.max(Duration::from_secs(1));
            let primary = primary.clone();
            tokio::spawn(async move {
                let result = ops::rejoin(member.address, primary.address, &login, timeout).await;
                let _ = tx.send(Event::Rejoined {
                    pool,
                    member: member.name,
                    primary: primary.name,
                    binlog_pos,
                    result,
                });
            });
        }
    }

    /// Starts a promotion of `member`; its outcome comes back as
    /// [`Event::Promoted`]. Refuses at once what is plainly wrong.
    pub fn promote(
        &mut self,
        pool: &str,
        member: &str,
        force: bool,
        reply: Option<oneshot::Sender<Response>>,
        how: &'static str,
    ) -> Result<(), String> {
        let Some(state) = self.states.get_mut(pool) else {
            let known: Vec<&str> = self.states.keys().map(String::as_str).collect();
            return Err(format!(
                "no pool named {pool:?} (pools: {})",
                if known.is_empty() {
                    "none configured".to_owned()
                } else {
                    known.join(", ")
                }
            ));
        };
        let Some(candidate) = state.pool.member(member).cloned() else {
            return Err(format!("pool {pool} has no member {member:?}"));
        };
        if state.promoting {
            return Err(format!("a promotion in pool {pool} is already running"));
        }
        if let Some(c) = &state.coord
            && !c.leads(Instant::now())
        {
            return Err(format!(
                "this LB ({}) does not hold pool {pool}'s lease in etcd ({}): only the leader promotes; run it there",
                c.me,
                match (&c.leader, &c.error) {
                    (_, Some(why)) => format!("etcd unreachable: {why}"),
                    (Some((l, _)), None) => format!("{l} holds it"),
                    (None, None) => "no leader seen yet".to_owned(),
                }
            ));
        }
        if state.routing.writer.as_deref() == Some(member) {
            return Err(format!("{member} is already the primary of pool {pool}"));
        }
        let m = state.members.get(member);
        if !force && !m.is_some_and(|m| m.up.up()) {
            return Err(format!(
                "{member} is not up ({}): refusing to promote it (use --force to try anyway)",
                m.and_then(|m| m.last_check.clone())
                    .unwrap_or_else(|| "never checked".to_owned())
            ));
        }
        if !force
            && let Some(r) = m
                .and_then(|m| m.last.as_ref())
                .and_then(|o| o.replication.as_ref())
            && r.io_running == "Yes"
            && r.lag_seconds
                .is_none_or(|l| l > state.pool.max_lag.as_secs())
        {
            return Err(format!(
                "{member} lags {} behind its primary (max-lag {}s): refusing to promote it \
                 (use --force to promote it anyway)",
                r.lag_seconds
                    .map_or("an unknown time".to_owned(), |l| format!("{l}s")),
                state.pool.max_lag.as_secs()
            ));
        }
        let plan = ops::PromotePlan {
            pool: pool.to_owned(),
            candidate: candidate.clone(),
            old_primary: state
                .primary
                .as_ref()
                .and_then(|p| state.pool.member(p).cloned()),
            others: state
                .pool
                .members
                .iter()
                .filter(|o| o.name != member)
                .cloned()
                .collect(),
            login: state.pool.login.clone(),
            timeout: state.pool.health.timeout.max(Duration::from_secs(1)),
            force,
        };
        state.promoting = true;
        let tx = self.tx.clone();
        let started = Instant::now();
        tokio::spawn(async move {
            let result = ops::promote(&plan).await;
            let _ = tx.send(Event::Promoted {
                pool: plan.pool.clone(),
                member: plan.candidate.name.clone(),
                how,
                started,
                result,
                reply,
            });
        });
        Ok(())
    }

    /// Whether some member has not been judged yet (reachable or not).
    pub fn awaiting_first_verdict(&self) -> bool {
        self.states
            .values()
            .flat_map(|s| s.members.values())
            .any(|m| m.up.health() == Health::Pending)
    }

    /// The pools as `lb status` shows them.
    pub fn status(&self) -> Vec<PoolStatus> {
        self.states.values().map(pool_status).collect()
    }
}

/// A rejoin's outcome as the member's state, logged.
fn rejoined(
    pool: &str,
    member: &str,
    primary: String,
    binlog_pos: String,
    result: Result<Vec<gtid::Gtid>, String>,
) -> state::Rejoin {
    match result {
        Ok(errant) if errant.is_empty() => {
            warn!(pool = %pool, member = %member, "pool {pool}: {member} rejoined as a replica of {primary} by GTID (its history is a subset of the primary's); it serves reads once within max-lag");
            state::Rejoin::Rejoined {
                primary,
                at: Instant::now(),
            }
        }
        Ok(errant) => {
            let gtids = gtid::show(&errant);
            error!(pool = %pool, member = %member, errant = %gtids, "pool {pool}: {member} holds transactions {primary} never had (errant GTIDs {gtids}): kept out of both services; rebuild it from {primary} or reconcile by hand");
            state::Rejoin::Errant {
                primary,
                binlog_pos,
                gtids,
            }
        }
        Err(why) => {
            warn!(pool = %pool, member = %member, "pool {pool}: rejoining {member} to {primary} failed: {why}");
            state::Rejoin::Failed {
                primary,
                why,
                at: Instant::now(),
            }
        }
    }
}

/// The longest a reload waits for a member to try a new login.
const LOGIN_TRY_MAX: Duration = Duration::from_secs(3);

/// What trying a pool's new login on its members found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoginVerdict {
    /// At least one member accepted it (named).
    Accepted(String),
    /// No member could be reached: the login cannot be tried (and the
    /// running one works nowhere either); the reasons.
    Untried(Vec<String>),
    /// Members answered and every one refused it; the reasons.
    Refused(Vec<String>),
}

/// The verdict on one pool's login from each member's attempt.
pub fn login_verdict(attempts: &[(String, Result<(), LoginFailure>)]) -> LoginVerdict {
    if let Some((name, _)) = attempts.iter().find(|(_, r)| r.is_ok()) {
        return LoginVerdict::Accepted(name.clone());
    }
    let reasons = |refused: bool| -> Vec<String> {
        attempts
            .iter()
            .filter_map(|(_, r)| r.as_ref().err())
            .filter(|e| matches!(e, LoginFailure::Refused(_)) == refused)
            .map(|e| e.reason().to_owned())
            .collect()
    };
    let refused = reasons(true);
    if refused.is_empty() {
        LoginVerdict::Untried(reasons(false))
    } else {
        LoginVerdict::Refused(refused)
    }
}

/// Tries `pool`'s login on every member at once; one result per member.
async fn try_login(pool: &Pool) -> Vec<(String, Result<(), LoginFailure>)> {
    let timeout = pool.health.timeout.min(LOGIN_TRY_MAX);
    let mut tries = tokio::task::JoinSet::new();
    for (i, m) in pool.members.iter().enumerate() {
        let (target, login) = (pool.health.target(m.address), pool.login.clone());
        tries.spawn(async move {
            let result = match mysql::log_in(target, &login, timeout).await {
                Ok(conn) => {
                    // A failed goodbye changes nothing about the login.
                    let _ = conn.disconnect().await;
                    Ok(())
                }
                Err(e) => Err(e),
            };
            (i, result)
        });
    }
    let mut results: Vec<(usize, Result<(), LoginFailure>)> = Vec::new();
    while let Some(done) = tries.join_next().await {
        if let Ok(r) = done {
            results.push(r);
        }
    }
    results.sort_by_key(|(i, _)| *i);
    results
        .into_iter()
        .filter_map(|(i, r)| Some((pool.members.get(i)?.name.clone(), r)))
        .collect()
}

/// Before a reload applies it: every pool of `next` whose login (user or
/// password) differs from the running pool of that name gets it tried on
/// its members, all at once, within the check's timeout (at most 3 s; the
/// agent's loop waits meanwhile). Rejected, naming the file and the
/// password's key, when members answered and every one refused it. A
/// login no member could be reached to try is let through, with a warning
/// returned: the running one works nowhere either. New pools are not
/// tried: they cannot break a running one, and their probes report.
pub fn vet_new_logins(
    running: &[Pool],
    next: &[Pool],
    file: &Path,
) -> Result<Vec<String>, ConfigError> {
    let changed: Vec<(usize, Pool)> = next
        .iter()
        .enumerate()
        .filter(|(_, p)| {
            running
                .iter()
                .any(|r| r.name == p.name && r.login != p.login)
        })
        .map(|(i, p)| (i, p.clone()))
        .collect();
    if changed.is_empty() {
        return Ok(Vec::new());
    }
    // The agent's loop runs on a current-thread runtime inside a sync
    // call: the tries run on a thread of their own (in the agent's
    // network namespace, which new threads inherit).
    let attempts = std::thread::scope(|scope| {
        scope
            .spawn(|| -> std::io::Result<Vec<_>> {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                Ok(rt.block_on(async {
                    let mut all = Vec::new();
                    for (i, p) in &changed {
                        all.push((*i, p, try_login(p).await));
                    }
                    all
                }))
            })
            .join()
    });
    let attempts = match attempts {
        Ok(Ok(a)) => a,
        Ok(Err(e)) => {
            return Err(invalid(
                file,
                "pool",
                format!("cannot try the new logins: {e}"),
            ));
        }
        Err(_) => {
            return Err(invalid(file, "pool", "trying the new logins failed"));
        }
    };
    let mut warnings = Vec::new();
    for (i, pool, tries) in attempts {
        let key = format!(
            "pool[{i}].health.{}",
            if pool.login.password_file.is_some() {
                "password-file"
            } else {
                "password"
            }
        );
        match login_verdict(&tries) {
            LoginVerdict::Accepted(by) => {
                info!(pool = %pool.name, "pool {}: the new login (user {}) works on {by}", pool.name, pool.login.user);
            }
            LoginVerdict::Untried(why) => warnings.push(format!(
                "pool {}: the new login (user {}) could not be tried, no member answered: {}",
                pool.name,
                pool.login.user,
                why.join("; ")
            )),
            LoginVerdict::Refused(why) => {
                return Err(invalid(
                    file,
                    &key,
                    format!(
                        "the new login (user {}) of pool {} is refused by every member that \
                         answered, so the pool would lose its writer: {}",
                        pool.login.user,
                        pool.name,
                        why.join("; ")
                    ),
                ));
            }
        }
    }
    Ok(warnings)
}

fn invalid(file: &Path, key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        file: file.to_path_buf(),
        key: key.to_owned(),
        reason: reason.into(),
    }
}

/// A pool member under one of its pool's services.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberView {
    /// Routed by this service, or standing by.
    pub role: PoolRole,
    /// Reachable (login works), with rise and fall.
    pub health: Health,
    /// "ok" or why the latest probe failed, and when it finished.
    pub last_check: Option<String>,
    pub last_at: Option<SystemTime>,
}

/// Probes one member every interval and reports every result.
async fn probe_member(pool: Pool, member: PoolMember, generation: u64, tx: UnboundedSender<Event>) {
    let mut ticker = tokio::time::interval(pool.health.interval.max(Duration::from_millis(1)));
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let target = pool.health.target(member.address);
    loop {
        ticker.tick().await;
        let result = mysql::observe(target, &pool.login, pool.health.timeout).await;
        let event = Event::Probed {
            pool: pool.name.clone(),
            member: member.name.clone(),
            generation,
            result,
        };
        if tx.send(event).is_err() {
            return;
        }
    }
}

fn pool_status(s: &PoolState) -> PoolStatus {
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let members = s
        .pool
        .members
        .iter()
        .map(|m| {
            let st = s.members.get(&m.name);
            let last = st.and_then(|x| x.last.as_ref());
            let up = st.is_some_and(|x| x.up.up());
            let role = if s.routing.writer.as_deref() == Some(m.name.as_str()) {
                Role::Primary
            } else if s.routing.refused.contains(&m.name) {
                Role::SecondWriter
            } else if !up {
                Role::Unknown
            } else if last.is_some_and(|o| o.read_only) {
                Role::Replica
            } else {
                Role::Writable
            };
            let mut routed_by = Vec::new();
            if s.routing.writer.as_deref() == Some(m.name.as_str()) {
                routed_by.push(s.pool.write_service());
            }
            if s.routing.readers.contains(&m.name) {
                routed_by.push(s.pool.read_service());
            }
            let replication = last.and_then(|o| o.replication.clone());
            MemberStatus {
                name: m.name.clone(),
                address: m.address.to_string(),
                health: st.map(|x| x.up.health()).into(),
                role,
                read_only: last.map(|o| o.read_only),
                server_id: last.map(|o| o.server_id),
                lag_seconds: replication.as_ref().and_then(|r| r.lag_seconds),
                replication,
                routed_by,
                last_check: st.and_then(|x| x.last_check.clone()),
                rejoin: s.rejoin.get(&m.name).map(ToString::to_string),
                errant_gtids: match s.rejoin.get(&m.name) {
                    Some(state::Rejoin::Errant { gtids, .. }) => Some(gtids.clone()),
                    _ => None,
                },
            }
        })
        .collect();
    PoolStatus {
        name: s.pool.name.clone(),
        write_service: s.pool.write_service(),
        write_vip: s.pool.write_vip.to_string(),
        read_service: s.pool.read_service(),
        read_vip: s.pool.read_vip.to_string(),
        primary: s.primary.clone(),
        writer: s.routing.writer.clone(),
        readers: s.routing.readers.clone(),
        conflicts: s.conflicts,
        max_lag_ms: ms(s.pool.max_lag),
        auto_failover_ms: s.pool.auto_failover.map(ms),
        promoting: s.promoting,
        last_event: s.last_event.clone(),
        members,
        coordination: s.coord.as_ref().map(|c| {
            let now = Instant::now();
            CoordStatus {
                me: c.me.clone(),
                leader: c.leader.as_ref().map(|(l, _)| l.clone()),
                leading: c.leads(now),
                lease_age_ms: c.leader_seen.map(|t| ms(now.duration_since(t))),
                recorded_primary: c.recorded.as_ref().map(|r| r.primary.clone()),
                revision: c.recorded.as_ref().map(|r| r.revision),
                etcd_error: c.error.clone(),
                etcd_silent_ms: c.reached.map(|t| ms(now.duration_since(t))),
            }
        }),
    }
}

/// `lb status`'s lines for the pools.
pub fn render(pools: &[PoolStatus]) -> String {
    let mut out = String::new();
    for p in pools {
        out.push_str(&format!(
            "pool {}  write {} {} -> {}  read {} {} -> [{}]  second writers refused {}{}\n",
            p.name,
            p.write_service,
            p.write_vip,
            p.writer.as_deref().unwrap_or("nobody"),
            p.read_service,
            p.read_vip,
            p.readers.join(" "),
            p.conflicts,
            if p.promoting { "  (promoting)" } else { "" }
        ));
        for m in &p.members {
            let lag = m
                .lag_seconds
                .map_or(String::new(), |l| format!(" lag {l}s"));
            let repl = m.replication.as_ref().map_or(String::new(), |r| {
                format!(
                    " io {} sql {}",
                    r.io_running,
                    if r.sql_running { "Yes" } else { "No" }
                )
            });
            out.push_str(&format!(
                "  {:<8} {:<21} {:<8} {:<13}{repl}{lag}  routed by [{}]  {}\n",
                m.name,
                m.address,
                m.health.to_string(),
                m.role.to_string(),
                m.routed_by.join(" "),
                m.last_check.as_deref().unwrap_or("")
            ));
            if let Some(r) = &m.rejoin {
                out.push_str(&format!("  {:<8} rejoin: {r}\n", ""));
            }
        }
        if let Some(c) = &p.coordination {
            out.push_str(&format!(
                "  coordination: leader {}{} for {}  recorded primary {} (revision {})  {}\n",
                c.leader.as_deref().unwrap_or("none seen"),
                if c.leading { " (this LB)" } else { "" },
                c.lease_age_ms
                    .map_or("-".to_owned(), |a| format!("{:.1}s", a as f64 / 1000.0)),
                c.recorded_primary.as_deref().unwrap_or("none"),
                c.revision.map_or("-".to_owned(), |r| r.to_string()),
                match &c.etcd_error {
                    None => "etcd ok".to_owned(),
                    Some(why) => format!(
                        "etcd unreachable for {}: {why}",
                        c.etcd_silent_ms
                            .map_or("ever".to_owned(), |s| format!("{:.1}s", s as f64 / 1000.0))
                    ),
                }
            ));
        }
        if let Some(e) = &p.last_event {
            out.push_str(&format!("  last event: {e}\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_shows_the_leader_the_lease_age_and_the_record() {
        let pool = |c: CoordStatus| PoolStatus {
            name: "db".into(),
            write_service: "db-write".into(),
            write_vip: "198.18.0.20:3306".into(),
            read_service: "db-read".into(),
            read_vip: "198.18.0.21:3306".into(),
            primary: Some("db2".into()),
            writer: Some("db2".into()),
            readers: vec![],
            conflicts: 0,
            max_lag_ms: 2000,
            auto_failover_ms: None,
            promoting: false,
            last_event: None,
            members: vec![],
            coordination: Some(c),
        };
        let leading = CoordStatus {
            me: "lb1".into(),
            leader: Some("lb1".into()),
            leading: true,
            lease_age_ms: Some(12_300),
            recorded_primary: Some("db2".into()),
            revision: Some(17),
            etcd_error: None,
            etcd_silent_ms: Some(100),
        };
        let text = render(&[pool(leading.clone())]);
        assert!(
            text.contains(
                "coordination: leader lb1 (this LB) for 12.3s  recorded primary db2 (revision 17)  etcd ok"
            ),
            "{text}"
        );
        let cut_off = CoordStatus {
            leading: false,
            etcd_error: Some("no etcd endpoint answered".into()),
            etcd_silent_ms: Some(4_000),
            ..leading
        };
        let text = render(&[pool(cut_off)]);
        assert!(
            text.contains(
                "leader lb1 for 12.3s  recorded primary db2 (revision 17)  etcd unreachable for 4.0s: no etcd endpoint answered"
            ),
            "{text}"
        );
    }

    #[test]
    fn a_new_login_is_judged_by_the_members_that_answered() {
        use LoginFailure::{Refused, Unreachable};
        let denied = || Err(Refused("server error 1045: Access denied".into()));
        let down = || Err(Unreachable("connect: connection refused".into()));
        let v = |a: Vec<(&str, Result<(), LoginFailure>)>| {
            login_verdict(
                &a.into_iter()
                    .map(|(n, r)| (n.to_owned(), r))
                    .collect::<Vec<_>>(),
            )
        };
        assert_eq!(
            v(vec![("db1", down()), ("db2", Ok(())), ("db3", denied())]),
            LoginVerdict::Accepted("db2".into())
        );
        // db1 is down and the others refuse: rejected, with their reasons.
        assert_eq!(
            v(vec![("db1", down()), ("db2", denied()), ("db3", denied())]),
            LoginVerdict::Refused(vec![
                "server error 1045: Access denied".into(),
                "server error 1045: Access denied".into()
            ])
        );
        assert!(matches!(
            v(vec![("db1", down()), ("db2", down())]),
            LoginVerdict::Untried(why) if why.len() == 2
        ));
    }

    #[test]
    fn a_member_probe_the_agent_could_not_run_is_counted_never_a_failure() {
        use state::tests::{pool, primary, replica};
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let mut pools = Pools::new(tx);
        let config = pool(true, None);
        pools
            .states
            .insert("db".into(), PoolState::new(config.clone(), None));
        pools.running.insert(
            "db".into(),
            Running {
                pool: config,
                generation: 1,
                tasks: Vec::new(),
            },
        );
        let backend = |r: Result<Observation, String>| r.map_err(ProbeError::Backend);
        let emfile = || {
            Err(ProbeError::Agent(
                "mysql 198.19.1.21:3306: connect: too many open files (os error 24)".into(),
            ))
        };
        for _ in 0..2 {
            pools.probed("db", "db1", 1, backend(primary(10)));
            pools.probed("db", "db2", 1, backend(replica(10, Some(0), "Yes")));
        }
        let member = |pools: &Pools, name: &str| pools.states["db"].members[name].clone();
        assert_eq!(member(&pools, "db1").up.health(), Health::Up);

        // fall = 2: a thousand probes the agent could not run leave the
        // primary up and routed, and are counted.
        for _ in 0..1000 {
            let handled = pools.probed("db", "db1", 1, emfile());
            assert!(!handled.commit);
        }
        assert_eq!(pools.agent_errors(), 1000);
        let db1 = member(&pools, "db1");
        assert_eq!(db1.up.health(), Health::Up);
        assert_eq!(db1.up.consecutive(), 2, "the counter did not move");
        assert!(
            db1.last_check
                .as_deref()
                .is_some_and(|c| c.starts_with("agent error, not the backend's: ")),
            "{:?}",
            db1.last_check
        );
        assert_eq!(pools.states["db"].routing.writer.as_deref(), Some("db1"));
        assert_eq!(pools.states["db"].routing.readers, ["db2"]);

        // Nor do they break a run of the member's own failures.
        let refused = || Err(ProbeError::Backend("connection refused".into()));
        pools.probed("db", "db2", 1, refused());
        pools.probed("db", "db2", 1, emfile());
        pools.probed("db", "db2", 1, refused());
        assert_eq!(member(&pools, "db2").up.health(), Health::Down);

        // A member never checked stays pending.
        pools.probed("db", "db3", 1, emfile());
        assert_eq!(member(&pools, "db3").up.health(), Health::Pending);
        assert_eq!(pools.agent_errors(), 1002);

        // The log: at once, then not again within the minute.
        let mut log = AgentErrorLog::default();
        let t0 = Instant::now();
        assert_eq!(log.note(t0), Some(1));
        assert_eq!(log.note(t0 + Duration::from_secs(30)), None);
        assert_eq!(log.note(t0 + Duration::from_secs(59)), None);
        assert_eq!(log.note(t0 + Duration::from_secs(60)), Some(3));
        assert_eq!(log.note(t0 + Duration::from_secs(61)), None);
    }
}
