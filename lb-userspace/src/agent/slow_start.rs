//! `slow-start`: a backend that comes up (its checks pass after a DOWN or
//! at first, `lb backend enable`, `lb backend add`) gets a small share of
//! its service's new flows at first, growing linearly to its full weight
//! over the service's `slow-start` period — cold caches and connection
//! pools are not handed a full share at once.
//!
//! The ramp is a weight: while a backend of a service ramps, every weight
//! of the service is scaled by [`RAMP_SCALE`] (fewer when a weighted ring
//! would not fit) and the ramping backend's by its progress, so it starts
//! at 1/scale of its weight. The rings (weighted, least-connections) and
//! Maglev tables are planned from these effective weights like any others;
//! the agent re-plans every [`RAMP_REFRESH`] while a ramp is on.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use lb_common::MAX_RING;

use super::state::{Key, key};
use crate::config::{Config, Scheduler, Service};

/// Weights are scaled by this during a ramp: the first step is 1/20 (5 %)
/// of the full weight.
pub const RAMP_SCALE: u32 = 20;

/// How often the effective weights follow the ramp.
pub const RAMP_REFRESH: Duration = Duration::from_millis(250);

/// Where a backend stands in its ramp.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ramp {
    /// The weight the rings use (in the scaled units of its service).
    pub weight: u32,
    /// Its share of the full weight, in percent (1 to 99).
    pub percent: u32,
}

/// Which backends ramp, since when; kept across commits.
#[derive(Debug, Clone, Default)]
pub struct SlowStart {
    /// Backends admitted to rotation (by admin state and health) at the
    /// last commit.
    serving: BTreeSet<Key>,
    /// Backends that came up within their service's period.
    since: BTreeMap<Key, Instant>,
}

impl SlowStart {
    /// Records which backends of `cfg` serve now (`serves`): those that did
    /// not before start a ramp, unless `first` (the agent's first commit:
    /// what serves then was serving before this agent). Backends of
    /// services without `slow-start`, and finished ramps, are forgotten.
    pub fn observe(
        &mut self,
        cfg: &Config,
        serves: &dyn Fn(&Service, &crate::config::Backend) -> bool,
        now: Instant,
        first: bool,
    ) {
        let mut serving = BTreeSet::new();
        let mut since = BTreeMap::new();
        for svc in &cfg.services {
            let Some(period) = svc.limits.slow_start else {
                continue;
            };
            for b in svc.backends.iter().filter(|b| serves(svc, b)) {
                let k = key(&svc.name, &b.name);
                let start = match self.since.get(&k) {
                    Some(&t) => Some(t),
                    None if !first && !self.serving.contains(&k) => Some(now),
                    None => None,
                };
                if let Some(t) = start.filter(|t| now.duration_since(*t) < period) {
                    since.insert(k.clone(), t);
                }
                serving.insert(k);
            }
        }
        self.serving = serving;
        self.since = since;
    }

    /// Is a ramp on?
    pub fn ramping(&self) -> bool {
        !self.since.is_empty()
    }

    /// `cfg` with the ramp applied to its weights, and each ramping
    /// backend's [`Ramp`]. Services without a ramp on are unchanged.
    pub fn effective(&self, cfg: &Config, now: Instant) -> (Config, BTreeMap<Key, Ramp>) {
        let mut out = cfg.clone();
        let mut ramps = BTreeMap::new();
        for svc in &mut out.services {
            let Some(period) = svc.limits.slow_start else {
                continue;
            };
            let progress: Vec<Option<f64>> = svc
                .backends
                .iter()
                .map(|b| {
                    self.since
                        .get(&key(&svc.name, &b.name))
                        .map(|t| now.duration_since(*t).as_secs_f64() / period.as_secs_f64())
                })
                .collect();
            if progress.iter().all(Option::is_none) {
                continue;
            }
            let scale = scale_for(svc);
            for (b, p) in svc.backends.iter_mut().zip(progress) {
                let full = b.weight * scale;
                b.weight = match p {
                    Some(p) if b.weight > 0 && p < 1.0 => {
                        let w = ramped(full, p);
                        ramps.insert(
                            key(&svc.name, &b.name),
                            Ramp {
                                weight: w,
                                percent: (w * 100 / full).clamp(1, 99),
                            },
                        );
                        w
                    }
                    _ => full,
                };
            }
        }
        (out, ramps)
    }
}

/// The weight at `progress` (0 to 1) of a ramp to `full`: linear, at
/// least 1 (a backend that came up is in the ring from the start).
pub fn ramped(full: u32, progress: f64) -> u32 {
    let w = (f64::from(full) * progress.clamp(0.0, 1.0)).ceil() as u32;
    w.clamp(1, full.max(1))
}

/// The scale of a service's weights during a ramp: [`RAMP_SCALE`], or less
/// for weighted round robin when the ring (sum of the weights of a group)
/// would not fit in `MAX_RING` slots.
fn scale_for(svc: &Service) -> u32 {
    if svc.scheduler != Scheduler::WeightedRoundRobin {
        return RAMP_SCALE;
    }
    let sum = |backup: bool| -> u32 {
        svc.backends
            .iter()
            .filter(|b| b.backup == backup)
            .map(|b| b.weight)
            .sum()
    };
    let largest = sum(false).max(sum(true)).max(1);
    (MAX_RING as u32 / largest).clamp(1, RAMP_SCALE)
}

#[cfg(test)]
mod tests;
