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
//!
//! This file owns the [`Pools`] (every pool's state and probe tasks) and
//! what the agent asks of them; the rest has a file each: [`Event`]s
//! applied (`events`), `[coordination]` (`coordination`), starting a
//! promotion (`promote`), a reload's new login (`login`), and what
//! `lb status` shows (`status`).

mod coordination;
mod events;
pub use crate::health::gtid;
mod login;
pub mod ops;
mod promote;
pub mod state;
mod status;

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant, SystemTime},
};

use tokio::{
    sync::{mpsc::UnboundedSender, oneshot},
    task::JoinHandle,
    time::MissedTickBehavior,
};

pub use crate::wire::{CoordStatus, DbCommand, MemberStatus, PoolStatus, Role};
use crate::{
    config::{Config, Pool, PoolMember},
    health::{
        AgentErrorLog, Health, ProbeError,
        mysql::{self, Observation},
    },
    wire::{PoolRole, Response},
};
pub use login::{LoginVerdict, login_verdict, vet_new_logins};
use state::PoolState;
use status::pool_status;
pub use status::render;

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
    /// `[coordination]`: what a coordination task reports (`coord::run`,
    /// `coord::record`).
    Coord(crate::coord::Report),
}

impl From<crate::coord::Report> for Event {
    fn from(report: crate::coord::Report) -> Event {
        Event::Coord(report)
    }
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
