//! `max-connections`: a backend holding its limit of active flows leaves
//! its service's ring for new flows (its established flows are untouched)
//! until it is below the limit again.
//!
//! The data plane counts each backend's active flows exactly (opened minus
//! closed minus swept); the agent reads them every [`LIMITS_REFRESH`] and
//! re-plans the rings when the set of backends at their limit changes. So
//! the limit reacts within one period, and a backend can overshoot it by the
//! new flows it is given during that period (its ring share of the
//! service's new flows per period).

use std::{collections::BTreeMap, time::Duration};

use tracing::{info, warn};

use super::{
    Agent,
    state::{self, Key},
};
use crate::{
    config::Config,
    dataplane::{Admission, AppliedService, FlowTable},
};

/// How often the agent compares active flows with `max-connections`.
pub const LIMITS_REFRESH: Duration = Duration::from_millis(250);

/// A backend at its limit: (active flows, max-connections) when last read.
pub type AtLimit = BTreeMap<Key, (u64, u32)>;

/// The backends of `cfg` (as applied) holding at least their
/// `max-connections` active flows, by `active(backend id)`.
pub fn at_limit<E>(
    cfg: &Config,
    applied: &[AppliedService],
    mut active: impl FnMut(u32) -> Result<u64, E>,
) -> Result<AtLimit, E> {
    let mut full = AtLimit::new();
    for (svc, a) in cfg.services.iter().zip(applied) {
        for (b, (_, id)) in svc.backends.iter().zip(&a.backends) {
            let Some(max) = svc.max_connections_of(b) else {
                continue;
            };
            let n = active(*id)?;
            if n >= u64::from(max) {
                full.insert(state::key(&svc.name, &b.name), (n, max));
            }
        }
    }
    Ok(full)
}

/// A backend's admission once its limit counts: at the limit it takes no
/// new flow, and keeps the flows it has.
pub fn limited(admission: Admission, at_limit: bool) -> Admission {
    Admission {
        in_rotation: admission.in_rotation && !at_limit,
        ..admission
    }
}

impl Agent {
    /// Does any backend have a limit (or is one still marked at it)?
    pub(super) fn has_limits(&self) -> bool {
        !self.at_limit.is_empty()
            || self
                .cfg
                .services
                .iter()
                .any(|s| s.backends.iter().any(|b| s.max_connections_of(b).is_some()))
    }

    /// Reads the active flows of limited backends; re-plans the rings when
    /// a backend reached its limit or went below it.
    pub(super) fn refresh_limits(&mut self, flows: &FlowTable) {
        let full = match at_limit(&self.cfg, &self.applied, |id| flows.active(id)) {
            Ok(full) => full,
            Err(e) => {
                warn!("max-connections: reading active flows: {e:#}");
                return;
            }
        };
        let changed = !full.keys().eq(self.at_limit.keys());
        for ((svc, b), (n, max)) in &full {
            if !self.at_limit.contains_key(&(svc.clone(), b.clone())) {
                info!(
                    "{svc}/{b} holds {n} active flows, max-connections {max}: \
                     no new flows until it is below"
                );
            }
        }
        for (svc, b) in self.at_limit.keys() {
            if !full.contains_key(&(svc.clone(), b.clone())) {
                info!("{svc}/{b} is below its max-connections again: takes new flows");
            }
        }
        let previous = std::mem::replace(&mut self.at_limit, full);
        if changed {
            let cfg = self.cfg.clone();
            if let Err(e) = self.commit(cfg) {
                warn!("max-connections: applying the rings: {e:#}");
                self.at_limit = previous;
            }
        }
    }
}

#[cfg(test)]
mod tests;
