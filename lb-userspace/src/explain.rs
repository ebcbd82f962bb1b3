//! `lb explain CLIENT:PORT VIP:PORT/PROTO`: which service a flow belongs
//! to, which backend it goes to and why, answered from the live maps.
//!
//! The agent reads the facts (`Dataplane::flow_facts`: the service, its
//! conf, active ring and round-robin counter, the flow's conntrack entry and
//! its backend) and what it knows itself (names, admin state, health); the
//! decision text is built here, without I/O, and tested on the host.

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddrV4},
};

use anyhow::{Context, bail};
use lb_common::{
    BACKEND_F_DROP_FLOWS, BACKEND_F_IN_RING, Backend, FW_F_ALLOW, FW_F_RATE, FW_GLOBAL, Flow,
    FlowKey, FwScope, SCHED_HASH, SCHED_MAGLEV, SCHED_SOURCE_IP, ServiceConf,
    hash::{flow_hash, source_hash},
    headers::{IPPROTO_TCP, IPPROTO_UDP},
};

use crate::{
    config::{Forwarding, Scheduler},
    wire::{AdminState, HealthStatus},
};

/// A flow as `lb explain` takes it: client → VIP, protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowQuery {
    pub client: SocketAddrV4,
    pub vip: SocketAddrV4,
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub protocol: u8,
}

impl FlowQuery {
    /// Parses `CLIENT_IP:PORT` and `VIP:PORT/PROTO` (proto `tcp` or `udp`).
    pub fn parse(client: &str, service: &str) -> anyhow::Result<FlowQuery> {
        let client: SocketAddrV4 = client.parse().with_context(|| {
            format!("bad client {client:?}: expected IPV4:PORT, e.g. 198.18.0.2:40000")
        })?;
        let Some((vip, proto)) = service.rsplit_once('/') else {
            bail!("bad flow {service:?}: expected VIP:PORT/PROTO, e.g. 198.18.0.10:80/tcp");
        };
        let vip: SocketAddrV4 = vip.parse().with_context(|| {
            format!("bad VIP {vip:?} in {service:?}: expected IPV4:PORT, e.g. 198.18.0.10:80")
        })?;
        let protocol = match proto.to_ascii_lowercase().as_str() {
            "tcp" => IPPROTO_TCP,
            "udp" => IPPROTO_UDP,
            _ => bail!("bad protocol {proto:?} in {service:?}: tcp or udp"),
        };
        Ok(FlowQuery {
            client,
            vip,
            protocol,
        })
    }

    /// The conntrack key the data plane would build from this flow's
    /// packets (network order, as in the packet).
    pub fn key(&self) -> FlowKey {
        FlowKey {
            saddr: u32::from_ne_bytes(self.client.ip().octets()),
            daddr: u32::from_ne_bytes(self.vip.ip().octets()),
            sport: self.client.port().to_be(),
            dport: self.vip.port().to_be(),
            protocol: self.protocol,
            _pad0: 0,
            _pad1: 0,
        }
    }

    fn protocol_name(&self) -> &'static str {
        if self.protocol == IPPROTO_UDP {
            "udp"
        } else {
            "tcp"
        }
    }
}

/// What the maps hold for a flow.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FlowFacts {
    /// The address is in `VIPS`.
    pub vip_known: bool,
    /// `SERVICES[(vip, port, protocol)]` and what goes with it.
    pub service: Option<ServiceFacts>,
    /// `CONNTRACK[key]`, and `BACKENDS[entry.backend_id]`.
    pub conntrack: Option<(Flow, Backend)>,
    /// The firewall scopes a new flow of this client meets: the global one,
    /// then the service's.
    pub firewall: Vec<FwFacts>,
}

/// One firewall scope for the client: its conf and the rules its source
/// matches (by LPM, as the data plane looks them up).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FwFacts {
    /// `FW_GLOBAL` or the service id.
    pub scope: u32,
    pub conf: FwScope,
    /// The deny rule that matches: its text ("deny 203.0.113.0/24") and id.
    pub deny: Option<(String, u32)>,
    /// The allow rule that matches.
    pub allow: Option<(String, u32)>,
}

/// What a scope does to a new flow from the client, and whether it drops it.
fn firewall_text(fw: &FwFacts, name: &str) -> (String, bool) {
    let scope = if fw.scope == FW_GLOBAL {
        "[firewall]".to_owned()
    } else {
        format!("service {name}'s firewall")
    };
    if let Some((rule, id)) = &fw.deny {
        return (
            format!(
                "{scope}: the source matches {rule} (rule {id}): a new flow is dropped \
                 (drop_firewall_deny)\n"
            ),
            true,
        );
    }
    let mut out = String::new();
    if fw.conf.flags & FW_F_ALLOW != 0 {
        match &fw.allow {
            None => {
                return (
                    format!(
                        "{scope}: the source is not in the allow list: a new flow is dropped \
                         (drop_firewall_not_allowed)\n"
                    ),
                    true,
                );
            }
            Some((rule, id)) => {
                let _ = writeln!(out, "{scope}: the source is allowed by {rule} (rule {id})");
            }
        }
    }
    if fw.conf.flags & FW_F_RATE != 0 {
        let per = match u32::from_be(fw.conf.mask).count_ones() {
            32 => "address".to_owned(),
            n => format!("/{n}"),
        };
        let _ = writeln!(
            out,
            "{scope}: new flows are rate-limited to {} a second, burst {}, per {per}: one \
             over it is dropped (drop_rate_limited)",
            fw.conf.rate, fw.conf.burst
        );
    }
    (out, false)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceFacts {
    pub id: u32,
    pub conf: ServiceConf,
    /// The active half of the ring: backend ids, one per slot.
    pub ring: Vec<u32>,
    /// `RR_COUNTERS[id]`: the next round-robin position.
    pub rr_counter: u64,
    /// The active half of the Maglev table (`maglev`, `source-ip`; else
    /// empty): backend ids, one per slot.
    pub maglev: Vec<u32>,
}

/// How the data plane picks a new flow's backend for this service, as a
/// model of `lb-ebpf/src/schedule.rs` (the kernel tier compares the two).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Choice {
    /// Which hash was taken (none for the counter schedulers).
    pub hash: Option<u32>,
    /// The slot and the table's length.
    pub slot: u64,
    pub len: u64,
    pub backend_id: u32,
}

/// The backend a new flow with `key` gets now: for the hash schedulers the
/// one it always gets while the table stays; for the counter ones the
/// service's next new flow's. `None`: the table is empty (drop_no_backend).
pub fn choose(key: &FlowKey, service: &ServiceFacts) -> Option<Choice> {
    let (hash, table, position) = match service.conf.scheduler {
        SCHED_MAGLEV => {
            let h = flow_hash(key);
            (Some(h), &service.maglev, u64::from(h))
        }
        SCHED_SOURCE_IP => {
            let h = source_hash(key.saddr);
            (Some(h), &service.maglev, u64::from(h))
        }
        SCHED_HASH => {
            let h = flow_hash(key);
            (Some(h), &service.ring, u64::from(h))
        }
        _ => (None, &service.ring, service.rr_counter),
    };
    let len = table.len() as u64;
    if len == 0 {
        return None;
    }
    let slot = position % len;
    Some(Choice {
        hash,
        slot,
        len,
        backend_id: table[slot as usize],
    })
}

/// What the agent knows of a service, by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceView {
    pub name: String,
    pub forwarding: Forwarding,
    pub scheduler: Scheduler,
    pub backends: Vec<BackendView>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendView {
    pub id: u32,
    pub name: String,
    pub address: String,
    pub admin: AdminState,
    pub health: HealthStatus,
    /// At its `max-connections`: (active flows, limit) as last read.
    pub at_limit: Option<(u64, u32)>,
}

/// Where `id` leads, by name when the agent knows it.
fn backend_name(view: Option<&ServiceView>, id: u32, backend: Option<&Backend>) -> String {
    if let Some(b) = view.and_then(|v| v.backends.iter().find(|b| b.id == id)) {
        return format!("{} ({})", b.name, b.address);
    }
    match backend {
        Some(b) => format!(
            "backend id {id} ({}:{}, no longer configured)",
            Ipv4Addr::from(b.addr.to_ne_bytes()),
            u16::from_be(b.port)
        ),
        None => format!("backend id {id} (not configured)"),
    }
}

/// The decision text for `query`: service, backend, and why. `vip_services`
/// lists the services configured on the query's VIP address (for the "no
/// service" case), `view` the agent's view of the matched service.
pub fn explain(
    query: &FlowQuery,
    facts: &FlowFacts,
    view: Option<&ServiceView>,
    vip_services: &[String],
) -> String {
    let mut out = String::new();
    let flow = format!("{} → {}/{}", query.client, query.vip, query.protocol_name());
    let global = facts.firewall.iter().find(|f| f.scope == FW_GLOBAL);
    let Some(service) = facts.service.as_ref().filter(|s| s.conf.enabled != 0) else {
        if let Some((text, true)) = facts
            .vip_known
            .then(|| global.map(|g| firewall_text(g, "")))
            .flatten()
        {
            // The global scope comes before the service lookup.
            let _ = write!(out, "{flow}: ");
            out.push_str(&text);
            return out;
        }
        if !facts.vip_known {
            let _ = writeln!(
                out,
                "{flow}: no service: {} is not a VIP here, so the data plane passes the packet \
                 untouched (pass_not_ours) and the kernel handles it",
                query.vip.ip()
            );
        } else {
            let _ = writeln!(
                out,
                "{flow}: no service on {}/{} (services on this VIP: {}): the data plane passes \
                 the packet (pass_no_service) and the kernel answers it (e.g. a TCP reset or an \
                 ICMP port unreachable)",
                query.vip,
                query.protocol_name(),
                if vip_services.is_empty() {
                    "none".to_string()
                } else {
                    vip_services.join(", ")
                }
            );
        }
        if facts.conntrack.is_some() {
            let _ = writeln!(
                out,
                "a conntrack entry of a removed service remains for this tuple: its packets are \
                 passed too (pass_no_service) until the LRU evicts it"
            );
        }
        return out;
    };
    let name = view.map_or("?", |v| v.name.as_str());
    let _ = writeln!(
        out,
        "{flow}: service {name} (id {}, {}, {})",
        service.id,
        view.map_or("?", |v| v.forwarding.name()),
        view.map_or("?", |v| v.scheduler.name()),
    );
    if let Some((entry, backend)) = &facts.conntrack {
        let pinned = backend_name(view, entry.backend_id, Some(backend));
        if backend.flags & BACKEND_F_DROP_FLOWS != 0 {
            let _ = writeln!(
                out,
                "pinned by conntrack to {pinned}, whose flows are dropped (disabled, removed, or \
                 down with drop-flows): the next packet is dropped (drop_backend_gone) and the \
                 entry deleted, so the one after is a new flow (below)"
            );
        } else {
            let _ = writeln!(
                out,
                "pinned by conntrack to {pinned}: every packet of this flow goes there"
            );
        }
        if query.protocol == IPPROTO_TCP {
            if backend.flags & BACKEND_F_IN_RING != 0 {
                let _ = writeln!(
                    out,
                    "a new SYN on this tuple (a reused source port) stays on it: it is in the \
                     ring (takes new flows)"
                );
                out.push_str(&backends_text(view, &service.ring));
                return out;
            }
            let _ = writeln!(
                out,
                "a new SYN on this tuple (a reused source port) is rescheduled: that backend is \
                 out of the ring (takes no new flows)"
            );
        } else if backend.flags & BACKEND_F_DROP_FLOWS == 0 {
            out.push_str(&backends_text(view, &service.ring));
            return out;
        }
    } else {
        let _ = writeln!(out, "no conntrack entry: a packet of it is a new flow");
    }
    // The firewall sees new flows only (not a SYN on a pinned tuple).
    if facts.conntrack.is_none() {
        for fw in &facts.firewall {
            let (text, drops) = firewall_text(fw, name);
            out.push_str(&text);
            if drops {
                return out;
            }
        }
    }
    out.push_str(&schedule_text(query, service, view));
    out.push_str(&backends_text(view, &service.ring));
    out
}

/// Which backend the scheduler picks for a new flow, and how sure that is.
fn schedule_text(query: &FlowQuery, service: &ServiceFacts, view: Option<&ServiceView>) -> String {
    let Some(c) = choose(&query.key(), service) else {
        let full = view.is_some_and(|v| v.backends.iter().any(|b| b.at_limit.is_some()));
        return format!(
            "the ring is empty (no backend takes new flows{}): a new flow is dropped \
             (drop_no_backend)\n",
            if full {
                "; those below are at their max-connections, or out for the reason shown"
            } else {
                ""
            }
        );
    };
    let (slot, len, to) = (c.slot, c.len, backend_name(view, c.backend_id, None));
    let hash = c.hash.unwrap_or(0);
    match service.conf.scheduler {
        SCHED_MAGLEV => format!(
            "maglev: flow_hash = {hash:#010x}, slot {slot} of the {len}-slot Maglev table → \
             {to}; the same on every LB with this config, and after the flow's entry is lost, \
             while the backend set stays as it is\n"
        ),
        SCHED_SOURCE_IP => format!(
            "source-ip: hash of the client address = {hash:#010x}, slot {slot} of the \
             {len}-slot Maglev table → {to}; every connection from this client goes there \
             while the backend set stays as it is\n"
        ),
        SCHED_HASH => format!(
            "flow hash: flow_hash = {hash:#010x}, slot {slot} of {len} → {to}; deterministic \
             for this tuple while the ring stays as it is\n"
        ),
        _ => format!(
            "{}: the counter is at {}, slot {slot} of {len} → {to}: the backend of the \
             service's next new flow, not a promise for this tuple (any new flow before it \
             moves the counter)\n",
            view.map_or("round robin", |v| match v.scheduler {
                Scheduler::LeastConnections =>
                    "least connections (ring refreshed from active flows)",
                Scheduler::WeightedRoundRobin => "weighted round robin",
                _ => "round robin",
            }),
            service.rr_counter,
        ),
    }
}

/// One line per backend: admin state, health, ring slots.
fn backends_text(view: Option<&ServiceView>, ring: &[u32]) -> String {
    let Some(view) = view else {
        return String::new();
    };
    let mut out = String::from("backends:\n");
    for b in &view.backends {
        let slots = ring.iter().filter(|id| **id == b.id).count();
        let _ = writeln!(
            out,
            "  {:<12} {:<22} admin {:<8} health {:<9} {}",
            b.name,
            b.address,
            b.admin.to_string(),
            b.health.to_string(),
            if let (0, Some((active, max))) = (slots, b.at_limit) {
                format!("not in the ring: at max-connections ({active} active, limit {max})")
            } else if slots == 0 {
                "not in the ring".to_string()
            } else {
                format!("{slots} of {} ring slots", ring.len())
            }
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use lb_common::{BACKEND_F_IN_USE, MODE_NAT, SCHED_COUNTER};

    use super::*;

    fn query() -> FlowQuery {
        FlowQuery::parse("198.18.0.2:40000", "198.18.0.10:80/tcp").expect("parse")
    }

    fn view() -> ServiceView {
        let b = |id, name: &str, admin, health| BackendView {
            id,
            name: name.into(),
            address: format!("198.19.0.1{}:80", id + 1),
            admin,
            health,
            at_limit: None,
        };
        ServiceView {
            name: "www".into(),
            forwarding: Forwarding::Nat,
            scheduler: Scheduler::RoundRobin,
            backends: vec![
                b(0, "web1", AdminState::Enabled, HealthStatus::Up),
                b(1, "web2", AdminState::Drain, HealthStatus::Up),
                b(2, "web3", AdminState::Enabled, HealthStatus::Up),
            ],
        }
    }

    fn service(scheduler: u32, ring: Vec<u32>, rr_counter: u64) -> ServiceFacts {
        ServiceFacts {
            id: 0,
            conf: ServiceConf {
                active_ring: 0,
                mode: MODE_NAT,
                scheduler,
                enabled: 1,
            },
            ring,
            rr_counter,
            maglev: Vec::new(),
        }
    }

    fn pinned(backend_id: u32, flags: u16) -> (Flow, Backend) {
        (
            Flow {
                backend_id,
                service_id: 0,
                ..Flow::default()
            },
            Backend {
                addr: u32::from_ne_bytes([198, 19, 0, 11 + backend_id as u8]),
                port: 80u16.to_be(),
                flags,
                service_id: 0,
                _pad: 0,
            },
        )
    }

    #[test]
    fn parses_flows_and_names_bad_arguments() {
        let q = query();
        assert_eq!(q.client, "198.18.0.2:40000".parse().expect("addr"));
        assert_eq!(q.protocol, IPPROTO_TCP);
        assert_eq!(q.key().sport, 40000u16.to_be());
        assert_eq!(
            FlowQuery::parse("198.18.0.2:1", "198.18.0.10:53/UDP")
                .expect("udp")
                .protocol,
            IPPROTO_UDP
        );
        for (client, service, want) in [
            (
                "198.18.0.2",
                "198.18.0.10:80/tcp",
                "bad client \"198.18.0.2\"",
            ),
            ("198.18.0.2:x", "198.18.0.10:80/tcp", "bad client"),
            ("198.18.0.2:1", "198.18.0.10:80", "expected VIP:PORT/PROTO"),
            ("198.18.0.2:1", "198.18.0.10/tcp", "bad VIP \"198.18.0.10\""),
            (
                "198.18.0.2:1",
                "198.18.0.10:80/sctp",
                "bad protocol \"sctp\"",
            ),
        ] {
            let e = FlowQuery::parse(client, service).expect_err("bad");
            assert!(format!("{e:#}").contains(want), "{client} {service}: {e:#}");
        }
    }

    #[test]
    fn no_service_says_why_the_kernel_gets_it() {
        let not_vip = explain(&query(), &FlowFacts::default(), None, &[]);
        assert!(not_vip.contains("not a VIP here"), "{not_vip}");
        assert!(not_vip.contains("pass_not_ours"), "{not_vip}");
        let facts = FlowFacts {
            vip_known: true,
            ..FlowFacts::default()
        };
        let q = FlowQuery::parse("198.18.0.2:40000", "198.18.0.10:81/udp").expect("parse");
        let text = explain(&q, &facts, None, &["www 198.18.0.10:80/tcp".into()]);
        assert!(text.contains("no service on 198.18.0.10:81/udp"), "{text}");
        assert!(text.contains("www 198.18.0.10:80/tcp"), "{text}");
        assert!(text.contains("pass_no_service"), "{text}");
    }

    #[test]
    fn round_robin_names_the_next_flows_backend_without_promising_it() {
        let facts = FlowFacts {
            vip_known: true,
            service: Some(service(SCHED_COUNTER, vec![0, 2], 7)),
            conntrack: None,
            firewall: Vec::new(),
        };
        let text = explain(&query(), &facts, Some(&view()), &[]);
        assert!(
            text.contains("service www (id 0, nat, round-robin)"),
            "{text}"
        );
        assert!(text.contains("no conntrack entry"), "{text}");
        assert!(
            text.contains("counter is at 7, slot 1 of 2 → web3 (198.19.0.13:80)"),
            "{text}"
        );
        assert!(text.contains("not a promise for this tuple"), "{text}");
        assert!(text.contains("web2"), "{text}");
        assert!(text.contains("drain"), "{text}");
        assert!(text.contains("not in the ring"), "{text}");
        assert!(text.contains("1 of 2 ring slots"), "{text}");
    }

    #[test]
    fn a_backend_at_max_connections_is_named_as_full() {
        let mut v = view();
        v.backends[0].at_limit = Some((5, 5));
        let facts = |ring| FlowFacts {
            vip_known: true,
            service: Some(service(SCHED_COUNTER, ring, 0)),
            conntrack: None,
            firewall: Vec::new(),
        };
        let text = explain(&query(), &facts(vec![2]), Some(&v), &[]);
        assert!(
            text.contains("not in the ring: at max-connections (5 active, limit 5)"),
            "{text}"
        );
        // Every backend out, one of them full: the drop says where to look.
        let text = explain(&query(), &facts(Vec::new()), Some(&v), &[]);
        assert!(
            text.contains("at their max-connections") && text.contains("drop_no_backend"),
            "{text}"
        );
    }

    #[test]
    fn maglev_and_source_ip_index_the_table() {
        let table: Vec<u32> = (0..251).map(|i| i % 3).collect();
        for (scheduler, hash, what) in [
            (SCHED_MAGLEV, flow_hash(&query().key()), "maglev: flow_hash"),
            (
                SCHED_SOURCE_IP,
                source_hash(query().key().saddr),
                "source-ip: hash of the client address",
            ),
        ] {
            let mut svc = service(scheduler, vec![0, 1, 2], 0);
            svc.maglev = table.clone();
            let c = choose(&query().key(), &svc).expect("a backend");
            assert_eq!(
                (c.hash, c.slot, c.len),
                (Some(hash), u64::from(hash % 251), 251)
            );
            assert_eq!(c.backend_id, table[(hash % 251) as usize]);
            let facts = FlowFacts {
                vip_known: true,
                service: Some(svc),
                conntrack: None,
                firewall: Vec::new(),
            };
            let text = explain(&query(), &facts, Some(&view()), &[]);
            assert!(text.contains(what), "{text}");
            assert!(text.contains("of the 251-slot Maglev table"), "{text}");
        }
        // Another port of the same client: same slot under source-ip only.
        let mut other = query();
        other.client.set_port(other.client.port() + 1);
        let mut svc = service(SCHED_SOURCE_IP, vec![0], 0);
        svc.maglev = table;
        assert_eq!(
            choose(&other.key(), &svc).map(|c| c.slot),
            choose(&query().key(), &svc).map(|c| c.slot)
        );
        svc.maglev = Vec::new();
        assert_eq!(choose(&query().key(), &svc), None);
    }

    #[test]
    fn source_hash_is_deterministic() {
        let facts = FlowFacts {
            vip_known: true,
            service: Some(service(SCHED_HASH, vec![0, 1, 2], 0)),
            conntrack: None,
            firewall: Vec::new(),
        };
        let slot = flow_hash(&query().key()) % 3;
        let text = explain(&query(), &facts, Some(&view()), &[]);
        let name = ["web1", "web2", "web3"][slot as usize];
        assert!(
            text.contains(&format!("slot {slot} of 3 → {name}")),
            "{text}"
        );
        assert!(text.contains("deterministic"), "{text}");
    }

    #[test]
    fn a_pinned_flow_names_its_backend_and_what_a_new_syn_does() {
        let mut facts = FlowFacts {
            vip_known: true,
            service: Some(service(SCHED_COUNTER, vec![0, 2], 4)),
            conntrack: Some(pinned(0, BACKEND_F_IN_USE | BACKEND_F_IN_RING)),
            firewall: Vec::new(),
        };
        let text = explain(&query(), &facts, Some(&view()), &[]);
        assert!(
            text.contains("pinned by conntrack to web1 (198.19.0.11:80)"),
            "{text}"
        );
        assert!(text.contains("stays on it"), "{text}");
        assert!(!text.contains("round robin:"), "{text}");

        // Drained: kept for established packets, a new SYN moves.
        facts.conntrack = Some(pinned(1, BACKEND_F_IN_USE));
        let text = explain(&query(), &facts, Some(&view()), &[]);
        assert!(text.contains("pinned by conntrack to web2"), "{text}");
        assert!(
            text.contains("every packet of this flow goes there"),
            "{text}"
        );
        assert!(text.contains("is rescheduled"), "{text}");
        assert!(text.contains("slot 0 of 2 → web1"), "{text}");

        // Disabled: dropped, then a new flow.
        facts.conntrack = Some(pinned(1, BACKEND_F_IN_USE | BACKEND_F_DROP_FLOWS));
        let text = explain(&query(), &facts, Some(&view()), &[]);
        assert!(text.contains("drop_backend_gone"), "{text}");

        // A retired id the agent no longer names.
        facts.conntrack = Some(pinned(9, BACKEND_F_DROP_FLOWS));
        let text = explain(&query(), &facts, Some(&view()), &[]);
        assert!(text.contains("backend id 9 ("), "{text}");
        assert!(text.contains("no longer configured"), "{text}");

        // An empty ring.
        facts.conntrack = None;
        facts.service = Some(service(SCHED_COUNTER, vec![], 4));
        let text = explain(&query(), &facts, Some(&view()), &[]);
        assert!(text.contains("drop_no_backend"), "{text}");
    }

    #[test]
    fn the_firewall_is_named_for_new_flows_only() {
        use lb_common::{FW_F_DENY, FW_F_RATE};
        let conf = |flags| FwScope {
            flags,
            rate: 1000,
            burst: 2000,
            mask: u32::from_ne_bytes([255, 255, 255, 0]),
        };
        let global = FwFacts {
            scope: FW_GLOBAL,
            conf: conf(FW_F_DENY | FW_F_RATE),
            deny: None,
            allow: None,
        };
        let svc = FwFacts {
            scope: 0,
            conf: conf(FW_F_ALLOW),
            deny: None,
            allow: None,
        };
        let mut facts = FlowFacts {
            vip_known: true,
            service: Some(service(SCHED_COUNTER, vec![0, 2], 7)),
            conntrack: None,
            firewall: vec![global.clone(), svc.clone()],
        };
        let text = explain(&query(), &facts, Some(&view()), &[]);
        assert!(
            text.contains(
                "[firewall]: new flows are rate-limited to 1000 a second, burst 2000, per /24"
            ),
            "{text}"
        );
        assert!(
            text.contains("service www's firewall: the source is not in the allow list"),
            "{text}"
        );
        assert!(text.contains("drop_firewall_not_allowed"), "{text}");
        assert!(!text.contains("round robin:"), "{text}");

        facts.firewall[1].allow = Some(("allow 198.18.0.0/24".into(), 4));
        let text = explain(&query(), &facts, Some(&view()), &[]);
        assert!(
            text.contains("allowed by allow 198.18.0.0/24 (rule 4)"),
            "{text}"
        );
        assert!(text.contains("round robin:"), "{text}");

        facts.firewall[0].deny = Some(("deny 198.18.0.0/16".into(), 1));
        let text = explain(&query(), &facts, Some(&view()), &[]);
        assert!(
            text.contains("[firewall]: the source matches deny 198.18.0.0/16 (rule 1)"),
            "{text}"
        );
        assert!(text.contains("drop_firewall_deny"), "{text}");

        // Established: the firewall is not mentioned (it never sees the flow).
        facts.conntrack = Some(pinned(0, BACKEND_F_IN_USE | BACKEND_F_IN_RING));
        let text = explain(&query(), &facts, Some(&view()), &[]);
        assert!(!text.contains("firewall"), "{text}");

        // No service on the port: the global deny still comes first.
        let q = FlowQuery::parse("198.18.0.2:40000", "198.18.0.10:81/udp").expect("parse");
        let no_service = FlowFacts {
            vip_known: true,
            firewall: vec![facts.firewall[0].clone()],
            ..FlowFacts::default()
        };
        let text = explain(&q, &no_service, None, &[]);
        assert!(text.contains("drop_firewall_deny"), "{text}");
        assert!(!text.contains("pass_no_service"), "{text}");
    }
}
