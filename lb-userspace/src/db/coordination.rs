//! The pools' side of `[coordination]`: starting and stopping the etcd
//! task with the config, applying its rounds to each pool's state, and
//! recording a pool's primary in etcd while this LB leads the pool.

use std::time::Instant;

use tracing::info;

use super::{Handled, Pools, Task};
use crate::config::Config;

impl Pools {
    /// Starts, restarts or stops the coordination task with the config;
    /// each pool's state gets a fresh coordination state when it changes.
    pub(super) fn sync_coordination(&mut self, cfg: &Config) {
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
    pub(super) fn coordinated(
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
    pub(super) fn start_record(&mut self, pool: &str, primary: Option<&str>) {
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
}
