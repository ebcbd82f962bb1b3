//! `lb explain CLIENT:PORT VIP:PORT/PROTO`: which service a flow belongs
//! to, which backend it goes to and why, answered from the live maps.
//!
//! The agent reads the facts ([`FlowFacts`], from `Dataplane::flow_facts`:
//! the service, its conf, active ring and round-robin counter, the flow's
//! conntrack entry and its backend) and what it knows itself
//! ([`ServiceView`]: names, admin state, health); the decision text is
//! built here, without I/O, and tested on the host. [`query`] parses the
//! flow, [`choose`] models the scheduler. An IPv6 flow is answered by
//! [`explain6`] from IPv6's flow tables ([`Flow6Facts`]) and, for a new
//! flow, its maps' facts ([`FlowFacts6`]: the same scheduler model and
//! firewall scopes as IPv4's, over IPv6's keys).

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, Ipv6Addr},
};

use lb_common::{
    BACKEND_F_DROP_FLOWS, BACKEND_F_IN_RING, Backend, FW_F_ALLOW, FW_F_RATE, FW_GLOBAL, SCHED_HASH,
    SCHED_MAGLEV, SCHED_SOURCE_IP,
    flow::{TICK_NS, Timeout},
    headers::IPPROTO_TCP,
};

use crate::{
    config::{Forwarding, Scheduler},
    wire::{AdminState, HealthStatus},
};

pub mod choose;
pub mod query;

pub use crate::dataplane::{EntryAge, FlowFacts, FlowFacts6, FwFacts, ServiceFacts};
pub use choose::{Choice, choose, choose6};
pub use query::FlowQuery;

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
        // An IPv6 client's bucket is keyed by the scope's IPv6 mask.
        let (bits, whole) = match &fw.mask6 {
            Some(m) => (m.iter().map(|w| w.count_ones()).sum(), 128),
            None => (u32::from_be(fw.conf.mask).count_ones(), 32),
        };
        let per = if bits == whole {
            "address".to_owned()
        } else {
            format!("/{bits}")
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
    let flow = format!("{} → {}/{}", query.client, query.vip, query.protocol_name());
    let Some(key) = query.key() else {
        return explain6(query, None, &FlowFacts6::default(), view, vip_services);
    };
    let mut out = String::new();
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
                 passed too (pass_no_service) until the sweep expires it"
            );
        }
        return out;
    };
    let name = view.map_or("?", |v| v.name.as_str());
    let _ = writeln!(out, "{flow}: {}", service_line(service, view));
    // An expired entry is a miss: the packet is a new flow.
    let expired = facts.age.filter(EntryAge::is_miss);
    let live = facts.conntrack.as_ref().filter(|_| expired.is_none());
    if let (Some((entry, backend)), Some(age)) = (&facts.conntrack, expired) {
        let _ = writeln!(
            out,
            "a conntrack entry to {} remains, {}",
            backend_name(view, entry.backend_id, Some(backend)),
            age_text(&age)
        );
    }
    if let Some((entry, backend)) = live {
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
        if let Some(age) = &facts.age {
            let _ = writeln!(out, "{}", age_text(age));
        }
        if entry.flags & lb_common::FLOW_F_FULL_NAT != 0 {
            // A full-NAT forward entry keeps its source in `vip`/`vport`.
            let _ = writeln!(
                out,
                "full NAT: the backend sees this flow from {}:{} (the source address and port \
                 claimed for it in FNAT_CLAIMS; its replies come back there)",
                Ipv4Addr::from(entry.vip.to_ne_bytes()),
                u16::from_be(entry.vport)
            );
        }
        if entry.flags & lb_common::FLOW_F_SYNCED != 0 {
            let _ = writeln!(out, "{FROM_A_PEER}");
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
    } else if expired.is_none() {
        let _ = writeln!(out, "no conntrack entry: a packet of it is a new flow");
    }
    // The firewall sees new flows only (not a SYN on a pinned tuple).
    let firewall: &[FwFacts] = if live.is_none() { &facts.firewall } else { &[] };
    new_flow_text(
        &mut out,
        firewall,
        name,
        choose(&key, service),
        "the client address",
        service,
        view,
    );
    out
}

/// `service NAME (id N, MODE, SCHEDULER)`.
fn service_line(service: &ServiceFacts, view: Option<&ServiceView>) -> String {
    format!(
        "service {} (id {}, {}, {})",
        view.map_or("?", |v| v.name.as_str()),
        service.id,
        view.map_or("?", |v| v.forwarding.name()),
        view.map_or("?", |v| v.scheduler.name()),
    )
}

/// A new flow's way through the service: each firewall scope it meets
/// (the text stops at one that drops it), the scheduler's choice (from
/// [`choose`] or [`choose6`]; `source` says what `source-ip` hashes),
/// the service's backends.
fn new_flow_text(
    out: &mut String,
    firewall: &[FwFacts],
    name: &str,
    choice: Option<Choice>,
    source: &str,
    service: &ServiceFacts,
    view: Option<&ServiceView>,
) {
    for fw in firewall {
        let (text, drops) = firewall_text(fw, name);
        out.push_str(&text);
        if drops {
            return;
        }
    }
    out.push_str(&schedule_text(choice, source, service, view));
    out.push_str(&backends_text(view, &service.ring));
}

/// What `lb explain` says of an entry a peer LB's sync put here, of
/// either family.
const FROM_A_PEER: &str = "the entry came from a peer LB ([sync]): the flow was established \
                           there, and this LB keeps its backend";

/// What IPv6's flow tables hold for a flow (`ESTABLISHED6`, `HALF_OPEN6`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flow6Facts {
    /// In `ESTABLISHED6` (else half-open).
    pub established: bool,
    pub entry: lb_common::Flow,
    /// Its idle time against its timeout.
    pub age: EntryAge,
}

/// The `[dataplane.timeouts]` key of a timeout.
fn timeout_key(timeout: Timeout) -> &'static str {
    match timeout {
        Timeout::TcpHalfOpen => "tcp-half-open",
        Timeout::Tcp => "tcp",
        Timeout::TcpClosing => "tcp-closing",
        Timeout::Udp => "udp",
    }
}

/// Whole seconds of `ticks` (a tick is ~1.07 s).
fn seconds(ticks: u32) -> u64 {
    u64::from(ticks) * TICK_NS / 1_000_000_000
}

/// A flow entry's idle time against its timeout, and what that means for
/// its next packet: kept, kept by its other direction, or (expired) a miss.
pub fn age_text(age: &EntryAge) -> String {
    let idle = format!("idle {} ticks (~{} s)", age.idle, seconds(age.idle));
    let timeout = format!(
        "timeout {} s ({})",
        seconds(age.timeout_ticks),
        timeout_key(age.timeout)
    );
    if age.timeout_ticks == 0 {
        format!("{idle}, no timeouts written yet (nothing expires)")
    } else if age.is_miss() {
        format!(
            "expired: {idle}, {timeout}: the next packet is a miss (a new flow) and removes \
             the entry, if the sweep has not"
        )
    } else if age.expired {
        format!(
            "{idle}, past its {timeout}, but the flow's other direction is within its own: \
             the entry stays"
        )
    } else {
        format!("{idle}, {timeout}")
    }
}

/// A flow entry's lifecycle state, by name.
fn state_name(state: u32) -> &'static str {
    use lb_common::flow::*;
    match state {
        STATE_NEW => "new (SYN seen)",
        STATE_ESTABLISHED => "established",
        STATE_CLOSING => "closing (FIN or RST seen)",
        STATE_SYN_ACKED => "SYN-ACK seen",
        STATE_PICKED_UP => "picked up mid-flow",
        STATE_PICKED_UP_ANSWERED => "picked up, answered",
        STATE_ACKED => "handshake ACK seen, unconfirmed",
        _ => "unknown",
    }
}

/// An IPv6 flow's answer: from IPv6's flow tables (`flow6`), the backend
/// it is pinned to, its state and age; without an entry (or with an
/// expired one: a miss), what a new flow meets (`facts`): the global
/// firewall scope, the service (or why none takes it), the service's
/// firewall scope, the scheduler's choice
/// ([`choose6`], `source-ip` on the service's prefix) — as IPv4's
/// [`explain`]. Also the services configured on the VIP's address
/// (`vip_services`), and the service's backends (`view`).
pub fn explain6(
    query: &FlowQuery,
    flow6: Option<&Flow6Facts>,
    facts: &FlowFacts6,
    view: Option<&ServiceView>,
    vip_services: &[String],
) -> String {
    let flow = format!("{} → {}/{}", query.client, query.vip, query.protocol_name());
    let mut out = format!(
        "{flow}: {}\n",
        if vip_services.is_empty() {
            "no service is configured on this address".to_string()
        } else {
            format!(
                "services configured on this address: {}",
                vip_services.join(", ")
            )
        }
    );
    match flow6 {
        Some(f) => {
            let table = if f.established {
                "established"
            } else {
                "half-open"
            };
            let (state, to) = (
                state_name(f.entry.state),
                backend_name(view, f.entry.backend_id, None),
            );
            if f.age.is_miss() {
                let _ = writeln!(
                    out,
                    "{table} in IPv6's flow table ({state}), to {to}, {}",
                    age_text(&f.age)
                );
                if let Some(key) = query.key6() {
                    new_flow6(&mut out, query, &key, facts, view);
                    return out;
                }
            } else {
                let _ = writeln!(
                    out,
                    "{table} in IPv6's flow table ({state}): pinned to {to}; every packet of \
                     this flow goes there\n{}",
                    age_text(&f.age)
                );
                if f.entry.flags & lb_common::FLOW_F_SYNCED != 0 {
                    let _ = writeln!(out, "{FROM_A_PEER}");
                }
            }
        }
        None => {
            let _ = writeln!(
                out,
                "no entry in IPv6's flow tables: a packet of it is a new flow"
            );
            if let Some(key) = query.key6() {
                new_flow6(&mut out, query, &key, facts, view);
                return out;
            }
        }
    }
    if let Some(view) = view {
        out.push_str(&backends_names(view));
    }
    out
}

/// [`explain6`]'s new flow, in the data plane's order (`path::new_flow`):
/// the global scope (before the service lookup), the service, its scope,
/// the scheduler.
fn new_flow6(
    out: &mut String,
    query: &FlowQuery,
    key: &lb_common::maps6::FlowKey6,
    facts: &FlowFacts6,
    view: Option<&ServiceView>,
) {
    let global = facts.firewall.iter().find(|f| f.scope == FW_GLOBAL);
    if facts.vip_known
        && let Some((text, true)) = global.map(|g| firewall_text(g, ""))
    {
        out.push_str(&text);
        return;
    }
    let Some(service) = facts.service.as_ref().filter(|s| s.conf.enabled != 0) else {
        let _ = writeln!(
            out,
            "{}",
            if facts.vip_known {
                format!(
                    "no service on {}/{}: the data plane passes the packet (pass_no_service) \
                     and the kernel answers it (e.g. a TCP reset or an ICMPv6 port unreachable)",
                    query.vip,
                    query.protocol_name()
                )
            } else {
                format!(
                    "{} is not a VIP here: the data plane passes the packet untouched \
                     (pass_not_ours) and the kernel handles it",
                    query.vip.ip()
                )
            }
        );
        if let Some(view) = view {
            out.push_str(&backends_names(view));
        }
        return;
    };
    let name = view.map_or("?", |v| v.name.as_str());
    let _ = writeln!(out, "{}", service_line(service, view));
    new_flow_text(
        out,
        &facts.firewall,
        name,
        choose6(key, &facts.source_mask, service),
        &source_text6(&key.saddr, &facts.source_mask),
        service,
        view,
    );
}

/// What an IPv6 `source-ip` service hashes of the client: its address, or
/// its prefix (`source-ip-prefix`) when the mask keeps less.
fn source_text6(saddr: &lb_common::ipv6::Addr6, mask: &lb_common::ipv6::Addr6) -> String {
    let bits: u32 = mask.iter().map(|w| w.count_ones()).sum();
    if bits == 0 || bits == 128 {
        return "the client address".to_owned();
    }
    let prefix = Ipv6Addr::from(lb_common::ipv6::octets_of(&choose::source_key6(
        saddr, mask,
    )));
    format!("the client's /{bits} ({prefix}/{bits})")
}

/// One line per backend of an IPv6 service: name, address, admin state
/// and health (its ring is not read for IPv6).
fn backends_names(view: &ServiceView) -> String {
    let mut out = String::from("backends:\n");
    for b in &view.backends {
        let _ = writeln!(
            out,
            "  {:<12} {:<40} admin {:<8} health {}",
            b.name,
            b.address,
            b.admin.to_string(),
            b.health,
        );
    }
    out
}

/// Which backend the scheduler picks for a new flow (`choice`), and how
/// sure that is; `source` names what `source-ip` hashes.
fn schedule_text(
    choice: Option<Choice>,
    source: &str,
    service: &ServiceFacts,
    view: Option<&ServiceView>,
) -> String {
    let Some(c) = choice else {
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
            "source-ip: hash of {source} = {hash:#010x}, slot {slot} of the \
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
    // IPv4 addresses fit 22 columns; IPv6 ones widen the column.
    let width = view
        .backends
        .iter()
        .map(|b| b.address.len() + 1)
        .max()
        .unwrap_or(0)
        .max(22);
    let mut out = String::from("backends:\n");
    for b in &view.backends {
        let slots = ring.iter().filter(|id| **id == b.id).count();
        let _ = writeln!(
            out,
            "  {:<12} {:<width$} admin {:<8} health {:<9} {}",
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
mod tests;
