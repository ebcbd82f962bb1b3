//! Starting a promotion (`lb db promote`, automatic failover): what is
//! refused at once (no such pool or member, not the leader, the candidate
//! down or lagging), and the plan handed to [`super::ops::promote`].

use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::{Event, Pools, ops};
use crate::wire::Response;

impl Pools {
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
}
