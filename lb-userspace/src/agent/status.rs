//! `lb status` as the agent builds it: every service and backend with its
//! standing, counters, last check and runtime changes, the pools, the
//! announcement and the agent itself. The control server adds the flow
//! counts off the loop.

use lb_common::map_names::MapName;

use crate::{
    announce::Announcer,
    health::Target,
    wire::{self, BackendStatus, ServiceStatus, Status},
};

use super::{Agent, runtime, state, unix_ms};

impl Agent {
    /// Everything `lb status` shows but the flow counts, which the control
    /// server adds off this loop (walking the flow table takes a while).
    pub(super) fn status(&self) -> anyhow::Result<(Status, Vec<Vec<u32>>)> {
        let checks = self.checker.states();
        let runtime = self.runtime_state();
        let mut services = Vec::new();
        let mut ids = Vec::new();
        for (svc, applied) in self.cfg.services.iter().zip(&self.applied) {
            let traffic = self.dp.counters(MapName::SERVICE_STATS, applied.id)?;
            let mut backends = Vec::new();
            let mut backend_ids = Vec::new();
            for (b, (_, id)) in svc.backends.iter().zip(&applied.backends) {
                let key = state::key(&svc.name, &b.name);
                let counters = self.dp.counters(MapName::BACKEND_STATS, *id)?;
                let check = checks.get(&Target {
                    service: svc.name.clone(),
                    address: b.address,
                });
                // A pool's member: its own check and its role in this
                // service (a standby is healthy, not down).
                let standing = self.standing(svc, b);
                let (last_check, last_at) = match &standing.member {
                    Some(m) => (m.last_check.clone(), m.last_at),
                    None => (
                        check.and_then(|s| s.last_check.clone()),
                        check.and_then(|s| s.last_at),
                    ),
                };
                backends.push(BackendStatus {
                    name: b.name.clone(),
                    address: b.address.to_string(),
                    weight: b.weight,
                    backup: b.backup,
                    admin: standing.admin,
                    health: standing.health.into(),
                    pool_role: standing.member.as_ref().map(|m| m.role),
                    last_check,
                    last_check_at_ms: last_at.map(unix_ms),
                    last_check_us: check
                        .and_then(|s| s.last_duration)
                        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX)),
                    in_ring: applied.ring.contains(id),
                    flows: 0,
                    active: 0,
                    packets: counters.packets,
                    bytes: counters.bytes,
                    max_connections: svc.max_connections_of(b),
                    slow_start_percent: self.ramps.get(&key).map(|r| r.percent),
                    tls_cert_expiry: check.and_then(|s| s.cert_expiry),
                    at_limit: standing.at_limit.is_some(),
                    runtime: runtime
                        .backends
                        .iter()
                        .find(|e| e.service == svc.name && e.backend == b.name)
                        .map(runtime::BackendEntry::describe),
                });
                backend_ids.push(*id);
            }
            services.push(ServiceStatus {
                name: svc.name.clone(),
                vip: svc.vip.to_string(),
                protocol: svc.protocol,
                forwarding: svc.forwarding,
                scheduler: svc.scheduler,
                packets: traffic.packets,
                bytes: traffic.bytes,
                backends,
            });
            ids.push(backend_ids);
        }
        let verdicts: std::collections::BTreeMap<String, u64> = self
            .dp
            .verdicts()?
            .into_iter()
            .map(|(v, n)| (v.name().to_string(), n))
            .collect();
        let full_nat = self.full_nat_status(&verdicts)?;
        let status = Status {
            config: self.path.display().to_string(),
            pin_dir: self.dp.pin_dir().map(|p| p.display().to_string()),
            adopted: self.adopted,
            interfaces: self.cfg.dataplane.interfaces.clone(),
            services,
            verdicts,
            agent: wire::AgentStatus {
                version: env!("CARGO_PKG_VERSION").to_owned(),
                started_at_ms: self.started_at_ms,
                generation: self.generation,
                last_reload: self.last_reload.clone(),
                probe_agent_errors: self.checker.agent_errors() + self.db.agent_errors(),
            },
            conntrack: wire::ConntrackStatus {
                // Counted off the loop with the flows per backend.
                entries: 0,
                entries_v6: 0,
                capacity: self.cfg.dataplane.conntrack_size,
                half_open_capacity: self.cfg.dataplane.half_open_size,
            },
            pools: self.db.status(),
            announce: self.announcer.as_ref().map(Announcer::status),
            sync: self.sync.as_ref().map(crate::sync::Stats::status),
            runtime: wire::RuntimeStatus {
                file: self.state_path.display().to_string(),
                changes: runtime.describe(),
                error: self.runtime_error.clone(),
            },
            full_nat,
        };
        Ok((status, ids))
    }

    /// Full NAT's part of the status while a service is full NAT: its
    /// source addresses as `FNAT_CONF` holds them (their ports in use are
    /// counted off the loop, with the flows) and the allocation failures.
    fn full_nat_status(
        &self,
        verdicts: &std::collections::BTreeMap<String, u64>,
    ) -> anyhow::Result<Option<wire::FullNatStatus>> {
        if !self
            .cfg
            .services
            .iter()
            .any(|s| s.forwarding == crate::config::Forwarding::FullNat)
        {
            return Ok(None);
        }
        let conf = self.dp.fnat_conf()?;
        Ok(Some(wire::FullNatStatus {
            port_lo: conf.port_lo,
            port_hi: conf.port_hi,
            sources: crate::dataplane::fullnat::addresses(&conf)
                .into_iter()
                .map(|a| wire::FullNatSource {
                    address: a.to_string(),
                    ports_in_use: 0,
                    quarantined: 0,
                })
                .collect(),
            allocation_failures: verdicts
                .get(lb_common::Verdict::DropFnatExhausted.name())
                .copied()
                .unwrap_or(0),
        }))
    }
}
