//! `/metrics`: a status snapshot (with flow counts) and the probe latency
//! histograms, rendered in the OpenMetrics text format by
//! `prometheus-client`. A pure function of its inputs: every scrape builds
//! a fresh registry from the snapshot, so the counters are exactly the
//! data plane's per-CPU counters summed at scrape time.

use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex, PoisonError, atomic::AtomicU64},
    time::Duration,
};

use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram, info::Info},
    registry::Registry,
};

use crate::wire::{AdminState, HealthStatus, Status};

/// Label sets are (name, value) pairs in this order.
type Labels = Vec<(String, String)>;
type Counters = Family<Labels, Counter>;
type Gauges = Family<Labels, Gauge>;
type FloatGauges = Family<Labels, Gauge<f64, AtomicU64>>;

/// The verdict of the data plane that counts failed connection-table
/// inserts (`lb_common::Verdict::DropConntrackFull`).
const CONNTRACK_FULL: &str = "drop_conntrack_full";

/// Probe latency buckets, in seconds: from a loopback connect (well under a
/// millisecond) to the longest timeout worth having.
const PROBE_BUCKETS: [f64; 13] = [
    0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// Health probe durations per (service, backend), observed by the health
/// check tasks as probes finish. Clones share the histograms.
#[derive(Clone, Debug)]
pub struct ProbeLatency {
    family: Family<Labels, Histogram, fn() -> Histogram>,
    /// The label sets in `family` (which cannot list them), for pruning.
    known: Arc<Mutex<BTreeSet<Labels>>>,
}

impl Default for ProbeLatency {
    fn default() -> Self {
        ProbeLatency {
            family: Family::new_with_constructor(|| Histogram::new(PROBE_BUCKETS)),
            known: Arc::default(),
        }
    }
}

impl ProbeLatency {
    pub fn observe(&self, service: &str, backend: &str, took: Duration) {
        let labels = backend_labels(service, backend);
        self.family
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
        self.known
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(labels);
    }

    /// Drops the histograms of backends that `status` no longer has
    /// (removed by a reload or `lb backend remove`).
    pub fn prune(&self, status: &Status) {
        let live: BTreeSet<Labels> = status
            .services
            .iter()
            .flat_map(|s| s.backends.iter().map(|b| backend_labels(&s.name, &b.name)))
            .collect();
        let mut known = self.known.lock().unwrap_or_else(PoisonError::into_inner);
        for gone in known.difference(&live) {
            self.family.remove(gone);
        }
        known.retain(|l| live.contains(l));
    }
}

/// The Content-Type of [`render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

fn service_labels(service: &str) -> Labels {
    vec![("service".to_owned(), service.to_owned())]
}

fn backend_labels(service: &str, backend: &str) -> Labels {
    vec![
        ("service".to_owned(), service.to_owned()),
        ("backend".to_owned(), backend.to_owned()),
    ]
}

fn with(mut labels: Labels, name: &str, value: &str) -> Labels {
    labels.push((name.to_owned(), value.to_owned()));
    labels
}

fn seconds(ms: u64) -> f64 {
    // Milliseconds since the epoch fit in f64's 53 bits for 285 000 years.
    ms as f64 / 1000.0
}

fn gauge(registry: &mut Registry, name: &str, help: &str, value: i64) {
    let g: Gauge = Gauge::default();
    g.set(value);
    registry.register(name, help, g);
}

fn float_gauge(registry: &mut Registry, name: &str, help: &str, value: f64) {
    let g: Gauge<f64, AtomicU64> = Gauge::default();
    g.set(value);
    registry.register(name, help, g);
}

/// The OpenMetrics text of `status` (a full status: flow counts and
/// conntrack entries filled in) and of the probe latency histograms.
pub fn render(status: &Status, probes: &ProbeLatency) -> String {
    let mut registry = Registry::default();

    // The agent.
    let agent = &status.agent;
    registry.register(
        "lb_agent",
        "The running lb agent",
        Info::new(vec![("version".to_owned(), agent.version.clone())]),
    );
    float_gauge(
        &mut registry,
        "lb_agent_start_time_seconds",
        "When the agent started, in seconds since the Unix epoch",
        seconds(agent.started_at_ms),
    );
    gauge(
        &mut registry,
        "lb_config_generation",
        "Config generation: 1 at start, one more for every applied reload or lb backend change",
        i64::try_from(agent.generation).unwrap_or(i64::MAX),
    );
    let probe_agent_errors: Counter = Counter::default();
    probe_agent_errors.inc_by(agent.probe_agent_errors);
    registry.register(
        "lb_probe_agent_errors",
        "Health probes the agent could not run for a reason of its own (out of file \
         descriptors, socket buffers or memory); never counted against a backend",
        probe_agent_errors,
    );
    if let Some(reload) = &agent.last_reload {
        gauge(
            &mut registry,
            "lb_config_last_reload_success",
            "Whether the last reload (SIGHUP or lb reload) was applied (1) or rejected (0)",
            i64::from(reload.ok),
        );
        float_gauge(
            &mut registry,
            "lb_config_last_reload_timestamp_seconds",
            "When the last reload was attempted, in seconds since the Unix epoch",
            seconds(reload.at_ms),
        );
    }

    // Services and backends.
    let service_packets = Counters::default();
    let service_bytes = Counters::default();
    let packets = Counters::default();
    let bytes = Counters::default();
    let flows = Gauges::default();
    let active = Gauges::default();
    let up = Gauges::default();
    let health = Gauges::default();
    let admin = Gauges::default();
    let weight = Gauges::default();
    let backup = Gauges::default();
    let in_ring = Gauges::default();
    let max_connections = Gauges::default();
    let at_limit = Gauges::default();
    let effective_weight = FloatGauges::default();
    let cert_expiry = Gauges::default();
    let last_check_time = FloatGauges::default();
    let last_check_duration = FloatGauges::default();
    // Registered first (clones share the values), filled below.
    registry.register(
        "lb_service_packets",
        "Packets forwarded for the service (NAT: both directions)",
        service_packets.clone(),
    );
    registry.register(
        "lb_service_bytes",
        "Bytes forwarded for the service (NAT: both directions)",
        service_bytes.clone(),
    );
    registry.register(
        "lb_backend_packets",
        "Packets forwarded to and from the backend (NAT: both directions)",
        packets.clone(),
    );
    registry.register(
        "lb_backend_bytes",
        "Bytes forwarded to and from the backend (NAT: both directions)",
        bytes.clone(),
    );
    registry.register(
        "lb_backend_flows",
        "Flows pinned to the backend in the flow tables (established and half-open)",
        flows.clone(),
    );
    registry.register(
        "lb_backend_active_flows",
        "Established flows of the backend that have not closed or expired",
        active.clone(),
    );
    registry.register(
        "lb_backend_up",
        "Whether the backend's health checks pass (1), or it has none (1), or not (0)",
        up.clone(),
    );
    registry.register(
        "lb_backend_health",
        "The backend's health state (1 for the current state)",
        health.clone(),
    );
    registry.register(
        "lb_backend_admin",
        "The backend's admin state set with lb backend (1 for the current state)",
        admin.clone(),
    );
    registry.register("lb_backend_weight", "The backend's weight", weight.clone());
    registry.register(
        "lb_backend_backup",
        "Whether the backend is a backup (1) or a primary (0)",
        backup.clone(),
    );
    registry.register(
        "lb_backend_in_ring",
        "Whether the backend is in its service's ring (takes new flows)",
        in_ring.clone(),
    );
    registry.register(
        "lb_backend_max_connections",
        "The backend's max-connections (backends with a limit only)",
        max_connections.clone(),
    );
    registry.register(
        "lb_backend_at_max_connections",
        "Whether the backend holds its max-connections active flows (1: out of the ring for new flows)",
        at_limit.clone(),
    );
    registry.register(
        "lb_backend_effective_weight",
        "The weight the rings give the backend now: its weight, or less while slow start ramps it",
        effective_weight.clone(),
    );
    registry.register(
        "lb_backend_tls_cert_expiry_timestamp_seconds",
        "When the backend's TLS certificate expires (check = \"tls\"), in seconds since the Unix epoch",
        cert_expiry.clone(),
    );
    registry.register(
        "lb_health_last_check_timestamp_seconds",
        "When the backend's last health probe finished, in seconds since the Unix epoch",
        last_check_time.clone(),
    );
    registry.register(
        "lb_health_last_check_duration_seconds",
        "How long the backend's last health probe took",
        last_check_duration.clone(),
    );
    registry.register(
        "lb_health_probe_duration_seconds",
        "Health probe durations",
        probes.family.clone(),
    );
    for s in &status.services {
        let labels = service_labels(&s.name);
        service_packets.get_or_create(&labels).inc_by(s.packets);
        service_bytes.get_or_create(&labels).inc_by(s.bytes);
        for b in &s.backends {
            let labels = backend_labels(&s.name, &b.name);
            packets.get_or_create(&labels).inc_by(b.packets);
            bytes.get_or_create(&labels).inc_by(b.bytes);
            flows
                .get_or_create(&labels)
                .set(i64::try_from(b.flows).unwrap_or(i64::MAX));
            active
                .get_or_create(&labels)
                .set(i64::try_from(b.active).unwrap_or(i64::MAX));
            up.get_or_create(&labels).set(i64::from(matches!(
                b.health,
                HealthStatus::Up | HealthStatus::Unchecked
            )));
            for state in [
                HealthStatus::Up,
                HealthStatus::Down,
                HealthStatus::Pending,
                HealthStatus::Unchecked,
            ] {
                health
                    .get_or_create(&with(labels.clone(), "state", state.into()))
                    .set(i64::from(b.health == state));
            }
            for state in [AdminState::Enabled, AdminState::Drain, AdminState::Disabled] {
                admin
                    .get_or_create(&with(labels.clone(), "state", state.into()))
                    .set(i64::from(b.admin == state));
            }
            weight.get_or_create(&labels).set(i64::from(b.weight));
            backup.get_or_create(&labels).set(i64::from(b.backup));
            in_ring.get_or_create(&labels).set(i64::from(b.in_ring));
            if let Some(max) = b.max_connections {
                max_connections.get_or_create(&labels).set(i64::from(max));
            }
            at_limit.get_or_create(&labels).set(i64::from(b.at_limit));
            effective_weight
                .get_or_create(&labels)
                .set(b.effective_weight());
            if let Some(at) = b.tls_cert_expiry {
                cert_expiry.get_or_create(&labels).set(at);
            }
            if let Some(at) = b.last_check_at_ms {
                last_check_time.get_or_create(&labels).set(seconds(at));
            }
            if let Some(us) = b.last_check_us {
                last_check_duration
                    .get_or_create(&labels)
                    .set(us as f64 / 1e6);
            }
        }
    }

    // The data plane.
    let verdicts = Counters::default();
    for (verdict, n) in &status.verdicts {
        verdicts
            .get_or_create(&vec![("verdict".to_owned(), verdict.clone())])
            .inc_by(*n);
    }
    registry.register(
        "lb_verdicts",
        "Packets seen by the XDP program, per verdict",
        verdicts,
    );
    gauge(
        &mut registry,
        "lb_conntrack_entries",
        "Flows in the connection table, IPv4 and IPv6",
        i64::try_from(status.conntrack.entries).unwrap_or(i64::MAX),
    );
    gauge(
        &mut registry,
        "lb_conntrack_entries_ipv6",
        "Of lb_conntrack_entries, the IPv6 flows",
        i64::try_from(status.conntrack.entries_v6).unwrap_or(i64::MAX),
    );
    gauge(
        &mut registry,
        "lb_conntrack_capacity",
        "Size of the connection table (conntrack-size)",
        i64::from(status.conntrack.capacity),
    );
    let full: Counter = Counter::default();
    full.inc_by(status.verdicts.get(CONNTRACK_FULL).copied().unwrap_or(0));
    registry.register(
        "lb_conntrack_insert_failures",
        "New flows dropped because the connection table was full (verdict drop_conntrack_full)",
        full,
    );
    if let Some(f) = &status.full_nat {
        register_full_nat(&mut registry, f);
    }
    if let Some(a) = &status.announce {
        register_announce(&mut registry, a);
    }

    super::db::register(&mut registry, &status.pools);
    if let Some(s) = &status.sync {
        super::sync::register(&mut registry, s);
    }

    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = encode(&mut out, &registry);
    out
}

/// Full NAT: the ports in use per source address, the range's size, and
/// the allocation failures (one counter: the data plane does not know
/// which address a refused flow would have had).
fn register_full_nat(registry: &mut Registry, f: &crate::wire::FullNatStatus) {
    let in_use = Gauges::default();
    for s in &f.sources {
        in_use
            .get_or_create(&vec![("source".to_owned(), s.address.clone())])
            .set(i64::try_from(s.ports_in_use).unwrap_or(i64::MAX));
    }
    registry.register(
        "lb_fullnat_ports_in_use",
        "Full-NAT claims held on the source address: (port, backend endpoint) pairs of live flows \
         and in quarantine",
        in_use,
    );
    let quarantined = Gauges::default();
    for s in &f.sources {
        quarantined
            .get_or_create(&vec![("source".to_owned(), s.address.clone())])
            .set(i64::try_from(s.quarantined).unwrap_or(i64::MAX));
    }
    registry.register(
        "lb_fullnat_ports_quarantined",
        "Of the full-NAT claims on the source address, those in quarantine: freed by an ended \
         flow, not given out again toward their backend yet (source-port-quarantine)",
        quarantined,
    );
    gauge(
        registry,
        "lb_fullnat_ports_per_backend",
        "Ports full NAT allocates from (source-ports), per source address and backend endpoint",
        i64::from(f.port_hi.saturating_sub(f.port_lo)) + 1,
    );
    let failures: Counter = Counter::default();
    failures.inc_by(f.allocation_failures);
    registry.register(
        "lb_fullnat_allocation_failures",
        "New full-NAT flows dropped because none of their candidate (address, port) pairs was free \
         (verdict drop_fnat_exhausted); all source addresses together",
        failures,
    );
}

/// `[announce]`: each VIP announced (1) or not (0), and BIRD's BGP and
/// BFD sessions up (1) or not (0).
fn register_announce(registry: &mut Registry, a: &crate::wire::AnnounceStatus) {
    let announced = Gauges::default();
    for v in &a.vips {
        announced
            .get_or_create(&vec![("vip".to_owned(), v.vip.to_string())])
            .set(i64::from(v.announced));
    }
    registry.register(
        "lb_vip_announced",
        "Whether this LB announces the VIP over BGP (through BIRD)",
        announced,
    );
    let sessions = Gauges::default();
    for p in a
        .bird
        .iter()
        .flat_map(|b| &b.protocols)
        .filter(|p| p.proto == "BGP" || p.proto == "BFD")
    {
        // BGP is only useful Established; BFD is a protocol without a
        // session of its own in `show protocols`, up when running.
        let up = p.state == "up" && (p.proto != "BGP" || p.info.starts_with("Established"));
        sessions
            .get_or_create(&vec![
                ("name".to_owned(), p.name.clone()),
                ("proto".to_owned(), p.proto.clone()),
            ])
            .set(i64::from(up));
    }
    registry.register(
        "lb_bird_protocol_up",
        "Whether a BGP session of this LB's BIRD is established (BFD: running), as of the last look",
        sessions,
    );
    gauge(
        registry,
        "lb_announce_error",
        "Whether the last attempt to write the include file or reach BIRD failed",
        i64::from(a.error.is_some()),
    );
}

#[cfg(test)]
mod tests;
