//! A backend's standing in its service: what the operator set (admin
//! state), what its checks say (health; a database pool's member: its own
//! MySQL check and its role in the service), and whether it is at its
//! `max-connections`. One function ([`Standings::of`]) answers it for the
//! commit (admission to the ring), `lb status` and `lb explain` alike.

use std::collections::BTreeMap;

use super::{
    limits::AtLimit,
    state::{self, Admin, Key, admission},
};
use crate::{
    config,
    dataplane::Admission,
    db::{MemberView, Pools},
    health::{Health, Target},
};

/// What the agent knows of one backend of one service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Standing {
    pub admin: Admin,
    /// Its checks' verdict: a pool member's own MySQL check (whatever its
    /// role), else its service's check; `None`: it has no check.
    pub health: Option<Health>,
    /// The health its ring goes by: a pool member's role in this service
    /// (routed: up; standing by: down, or pending while never judged), else
    /// [`health`](Self::health).
    pub ring_health: Option<Health>,
    /// A pool service's member: its role there and its last check.
    pub member: Option<MemberView>,
    /// At its `max-connections`: (active flows, limit) as last read.
    pub at_limit: Option<(u64, u32)>,
}

impl Standing {
    /// Whether it may take new flows by admin state and health (before
    /// `max-connections`: slow start ramps from this).
    pub fn admission(&self, on_down: config::OnBackendDown) -> Admission {
        admission(self.admin, self.ring_health, on_down)
    }
}

/// The agent's state a standing is read from, borrowed field by field so
/// that the commit can hold it while it writes the data plane.
#[derive(Clone, Copy)]
pub struct Standings<'a> {
    pub admin: &'a BTreeMap<Key, Admin>,
    pub health: &'a BTreeMap<Target, Health>,
    pub db: &'a Pools,
    pub at_limit: &'a AtLimit,
}

impl Standings<'_> {
    /// Backend `b` of service `svc`.
    pub fn of(&self, svc: &config::Service, b: &config::Backend) -> Standing {
        let key = state::key(&svc.name, &b.name);
        let checked = self
            .health
            .get(&Target {
                service: svc.name.clone(),
                address: b.address,
            })
            .copied();
        let member = self.db.member_view(&svc.name, &b.name);
        Standing {
            admin: self.admin.get(&key).copied().unwrap_or(Admin::Enabled),
            health: member.as_ref().map(|m| m.health).or(checked),
            // A pool's services admit members by role.
            ring_health: self.db.health(&svc.name, &b.name).or(checked),
            member,
            at_limit: self.at_limit.get(&key).copied(),
        }
    }
}

#[cfg(test)]
mod tests;
