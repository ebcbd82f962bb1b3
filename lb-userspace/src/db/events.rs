//! What the pools' tasks report ([`Event`]), applied to the pools' state:
//! probe results (routing, fencing a second writer, automatic failover),
//! promotions, fencing, `auto-rejoin` checks and coordination rounds.

use std::time::{Duration, Instant, SystemTime};

use tracing::{error, info, warn};

use super::{Event, Handled, Pools, gtid, ops, state};
use crate::{
    config::PoolMember,
    coord::Report,
    health::{ProbeError, mysql::Observation},
    wire::Response,
};

impl Pools {
    pub fn handle(&mut self, event: Event) -> Handled {
        match event {
            Event::Coord(Report::Coordinated { pool, result }) => match result {
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
            Event::Coord(Report::Recorded {
                pool,
                primary,
                result,
            }) => {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        db::{Running, state::PoolState},
        health::{AgentErrorLog, Health},
    };

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
