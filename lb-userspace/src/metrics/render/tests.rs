//! The renderer: every metric the README lists, with its labels and the
//! snapshot's values, in valid OpenMetrics text; and the Grafana dashboard
//! only queries metrics the renderer exports.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use lb_common::Verdict;

use super::*;
use crate::config::{Forwarding, Protocol, Scheduler};
use crate::wire::{
    AgentStatus, BackendStatus, ConntrackStatus, ReloadStatus, ServiceStatus, Status,
};

fn backend(name: &str, health: HealthStatus, admin: AdminState, in_ring: bool) -> BackendStatus {
    BackendStatus {
        name: name.into(),
        address: "198.19.0.11:80".into(),
        weight: 3,
        backup: name == "web3",
        admin,
        health,
        pool_role: None,
        last_check: Some("ok".into()),
        last_check_at_ms: Some(1_700_000_000_500),
        last_check_us: Some(1_250),
        in_ring,
        flows: 4,
        active: 4,
        packets: 70,
        bytes: 7_000,
        runtime: None,
        max_connections: None,
        at_limit: false,
        slow_start_percent: None,
        tls_cert_expiry: None,
    }
}

fn snapshot() -> Status {
    let mut verdicts: BTreeMap<String, u64> = Verdict::ALL
        .iter()
        .map(|v| (v.name().to_owned(), 0))
        .collect();
    verdicts.insert("forwarded".into(), 140);
    verdicts.insert("drop_conntrack_full".into(), 5);
    Status {
        config: "lb.toml".into(),
        pin_dir: None,
        adopted: false,
        interfaces: vec!["lb-front".into()],
        services: vec![ServiceStatus {
            name: "www".into(),
            vip: "198.18.0.10:80".into(),
            protocol: Protocol::Tcp,
            forwarding: Forwarding::Nat,
            scheduler: Scheduler::RoundRobin,
            packets: 140,
            bytes: 14_000,
            backends: vec![
                backend("web1", HealthStatus::Up, AdminState::Enabled, true),
                BackendStatus {
                    packets: 0,
                    bytes: 0,
                    flows: 0,
                    active: 0,
                    max_connections: Some(4),
                    at_limit: true,
                    slow_start_percent: Some(25),
                    tls_cert_expiry: Some(1_800_000_000),
                    ..backend("web2", HealthStatus::Down, AdminState::Drain, false)
                },
                BackendStatus {
                    last_check: None,
                    last_check_at_ms: None,
                    last_check_us: None,
                    ..backend("web3", HealthStatus::Unchecked, AdminState::Disabled, false)
                },
            ],
        }],
        verdicts,
        agent: AgentStatus {
            version: "0.1.0".into(),
            started_at_ms: 1_700_000_000_000,
            generation: 3,
            last_reload: Some(ReloadStatus {
                ok: false,
                at_ms: 1_700_000_001_000,
                message: "rejected".into(),
            }),
            probe_agent_errors: 2,
        },
        conntrack: ConntrackStatus {
            entries: 4,
            entries_v6: 3,
            capacity: 1024,
            half_open_capacity: 1024,
        },
        pools: Vec::new(),
        announce: None,
        sync: None,
        runtime: Default::default(),
        full_nat: None,
    }
}

/// Sample lines as (name, labels, value); comment lines are left out.
fn samples(text: &str) -> Vec<(String, BTreeMap<String, String>, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').expect("series value");
            let value: f64 = value.parse().expect("number");
            let (name, labels) = match series.split_once('{') {
                None => (series, BTreeMap::new()),
                Some((name, rest)) => {
                    let body = rest.strip_suffix('}').expect("closing brace");
                    let labels = body
                        .split(',')
                        .map(|kv| {
                            let (k, v) = kv.split_once('=').expect("k=v");
                            (k.to_owned(), v.trim_matches('"').to_owned())
                        })
                        .collect();
                    (name, labels)
                }
            };
            (name.to_owned(), labels, value)
        })
        .collect()
}

/// The value of the sample `name` whose labels include all of `labels`.
fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let found: Vec<f64> = samples(text)
        .into_iter()
        .filter(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, _, v)| v)
        .collect();
    assert_eq!(found.len(), 1, "{name}{labels:?}: {found:?} in\n{text}");
    found[0]
}

#[test]
fn every_metric_carries_the_snapshot() {
    let probes = ProbeLatency::default();
    probes.observe("www", "web1", Duration::from_micros(800));
    probes.observe("www", "web1", Duration::from_millis(30));
    let text = render(&snapshot(), &probes);
    let www = [("service", "www")];
    let web = |b: &'static str| [("service", "www"), ("backend", b)];

    assert_eq!(value(&text, "lb_agent_info", &[("version", "0.1.0")]), 1.0);
    assert_eq!(
        value(&text, "lb_agent_start_time_seconds", &[]),
        1_700_000_000.0
    );
    assert_eq!(value(&text, "lb_config_generation", &[]), 3.0);
    assert_eq!(value(&text, "lb_probe_agent_errors_total", &[]), 2.0);
    assert_eq!(value(&text, "lb_config_last_reload_success", &[]), 0.0);
    assert_eq!(
        value(&text, "lb_config_last_reload_timestamp_seconds", &[]),
        1_700_000_001.0
    );
    assert_eq!(value(&text, "lb_service_packets_total", &www), 140.0);
    assert_eq!(value(&text, "lb_service_bytes_total", &www), 14_000.0);
    assert_eq!(value(&text, "lb_backend_packets_total", &web("web1")), 70.0);
    assert_eq!(
        value(&text, "lb_backend_bytes_total", &web("web1")),
        7_000.0
    );
    assert_eq!(value(&text, "lb_backend_bytes_total", &web("web2")), 0.0);
    assert_eq!(value(&text, "lb_backend_flows", &web("web1")), 4.0);
    assert_eq!(
        value(&text, "lb_backend_max_connections", &web("web2")),
        4.0
    );
    assert_eq!(
        value(&text, "lb_backend_at_max_connections", &web("web2")),
        1.0
    );
    assert_eq!(
        value(&text, "lb_backend_at_max_connections", &web("web1")),
        0.0
    );
    assert_eq!(
        value(
            &text,
            "lb_backend_tls_cert_expiry_timestamp_seconds",
            &web("web2")
        ),
        1_800_000_000.0
    );
    // web2 ramps: a quarter of its weight 3.
    assert_eq!(
        value(&text, "lb_backend_effective_weight", &web("web2")),
        0.75
    );
    assert_eq!(
        value(&text, "lb_backend_effective_weight", &web("web1")),
        3.0
    );
    // Up: checks pass, or there are none.
    assert_eq!(value(&text, "lb_backend_up", &web("web1")), 1.0);
    assert_eq!(value(&text, "lb_backend_up", &web("web2")), 0.0);
    assert_eq!(value(&text, "lb_backend_up", &web("web3")), 1.0);
    // One series per state, 1 for the current one.
    for (b, now) in [("web1", "up"), ("web2", "down"), ("web3", "unchecked")] {
        for state in ["up", "down", "pending", "unchecked"] {
            let labels = [("service", "www"), ("backend", b), ("state", state)];
            let want = if state == now { 1.0 } else { 0.0 };
            assert_eq!(
                value(&text, "lb_backend_health", &labels),
                want,
                "{b} {state}"
            );
        }
    }
    for (b, now) in [("web1", "enabled"), ("web2", "drain"), ("web3", "disabled")] {
        for state in ["enabled", "drain", "disabled"] {
            let labels = [("service", "www"), ("backend", b), ("state", state)];
            let want = if state == now { 1.0 } else { 0.0 };
            assert_eq!(
                value(&text, "lb_backend_admin", &labels),
                want,
                "{b} {state}"
            );
        }
    }
    assert_eq!(value(&text, "lb_backend_weight", &web("web1")), 3.0);
    assert_eq!(value(&text, "lb_backend_backup", &web("web1")), 0.0);
    assert_eq!(value(&text, "lb_backend_backup", &web("web3")), 1.0);
    assert_eq!(value(&text, "lb_backend_in_ring", &web("web1")), 1.0);
    assert_eq!(value(&text, "lb_backend_in_ring", &web("web2")), 0.0);
    assert_eq!(
        value(&text, "lb_health_last_check_duration_seconds", &web("web1")),
        0.001_25
    );
    assert_eq!(
        value(
            &text,
            "lb_health_last_check_timestamp_seconds",
            &web("web1")
        ),
        1_700_000_000.5
    );
    // A backend without checks has no check series.
    assert!(
        !text.contains("lb_health_last_check_duration_seconds{service=\"www\",backend=\"web3\"}")
    );
    // The histogram: both probes counted, each in its bucket.
    let h = |le: &'static str| [("service", "www"), ("backend", "web1"), ("le", le)];
    assert_eq!(
        value(
            &text,
            "lb_health_probe_duration_seconds_count",
            &web("web1")
        ),
        2.0
    );
    assert_eq!(
        value(
            &text,
            "lb_health_probe_duration_seconds_bucket",
            &h("0.001")
        ),
        1.0
    );
    assert_eq!(
        value(
            &text,
            "lb_health_probe_duration_seconds_bucket",
            &h("0.025")
        ),
        1.0
    );
    assert_eq!(
        value(&text, "lb_health_probe_duration_seconds_bucket", &h("0.05")),
        2.0
    );
    assert_eq!(
        value(&text, "lb_health_probe_duration_seconds_bucket", &h("+Inf")),
        2.0
    );
    let sum = value(&text, "lb_health_probe_duration_seconds_sum", &web("web1"));
    assert!((sum - 0.0308).abs() < 1e-9, "{sum}");
    // Every verdict by name, zeros included.
    for v in Verdict::ALL {
        let want = match v.name() {
            "forwarded" => 140.0,
            "drop_conntrack_full" => 5.0,
            _ => 0.0,
        };
        assert_eq!(
            value(&text, "lb_verdicts_total", &[("verdict", v.name())]),
            want
        );
    }
    assert_eq!(value(&text, "lb_conntrack_entries", &[]), 4.0);
    assert_eq!(value(&text, "lb_conntrack_entries_ipv6", &[]), 3.0);
    assert_eq!(value(&text, "lb_conntrack_capacity", &[]), 1024.0);
    assert_eq!(value(&text, "lb_conntrack_insert_failures_total", &[]), 5.0);
}

#[test]
fn probe_histograms_of_removed_backends_are_pruned() {
    let probes = ProbeLatency::default();
    probes.observe("www", "web1", Duration::from_millis(1));
    probes.observe("www", "gone", Duration::from_millis(1));
    probes.prune(&snapshot());
    let text = render(&snapshot(), &probes);
    assert_eq!(
        value(
            &text,
            "lb_health_probe_duration_seconds_count",
            &[("backend", "web1")]
        ),
        1.0
    );
    assert!(!text.contains("backend=\"gone\""), "{text}");
}

#[test]
fn output_is_openmetrics_text() {
    let text = render(&snapshot(), &ProbeLatency::default());
    assert!(text.ends_with("# EOF\n"), "{text}");
    let mut typed = BTreeMap::new();
    for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
        let mut words = line.split(' ').skip(2);
        let (name, kind) = (words.next().expect("name"), words.next().expect("type"));
        typed.insert(name.to_owned(), kind.to_owned());
    }
    for (name, _, _) in samples(&text) {
        assert!(name.starts_with("lb_"), "{name}");
        // Counters end in _total, and every sample belongs to a typed family.
        let family = ["_total", "_info", "_bucket", "_count", "_sum"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| typed.contains_key(*f)))
            .unwrap_or(&name);
        let kind = typed
            .get(family)
            .unwrap_or_else(|| panic!("{name} has no TYPE"));
        if kind == "counter" {
            assert!(name.ends_with("_total"), "counter {name}");
        }
    }
    // No reload yet: no reload series.
    let mut fresh = snapshot();
    fresh.agent.last_reload = None;
    let text = render(&fresh, &ProbeLatency::default());
    assert!(!text.contains("lb_config_last_reload"), "{text}");
}

/// Every `lb_…` metric that deploy/grafana-lb.json queries in an `expr` is
/// one the renderer exports.
#[test]
fn grafana_dashboard_queries_only_exported_metrics() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/grafana-lb.json");
    let text = std::fs::read_to_string(path).expect("deploy/grafana-lb.json");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    fn exprs(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(map) => {
                for (k, v) in map {
                    match (k.as_str(), v) {
                        ("expr", serde_json::Value::String(e)) => out.push(e.clone()),
                        _ => exprs(v, out),
                    }
                }
            }
            serde_json::Value::Array(list) => list.iter().for_each(|v| exprs(v, out)),
            _ => {}
        }
    }
    let mut queries = Vec::new();
    exprs(&dashboard, &mut queries);
    assert!(queries.len() >= 8, "too few panels: {queries:?}");

    let probes = ProbeLatency::default();
    probes.observe("www", "web1", Duration::from_millis(1));
    let exported: BTreeSet<String> = samples(&render(&full_site(), &probes))
        .into_iter()
        .map(|(n, _, _)| n)
        .collect();
    let mut used = BTreeSet::new();
    for q in &queries {
        let bytes = q.as_bytes();
        let mut i = 0;
        while let Some(at) = q[i..].find("lb_") {
            let start = i + at;
            let boundary = start == 0
                || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
            let end = q[start..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .map_or(q.len(), |n| start + n);
            if boundary {
                used.insert(q[start..end].to_owned());
            }
            i = end;
        }
    }
    assert!(!used.is_empty());
    let missing: Vec<&String> = used.iter().filter(|n| !exported.contains(*n)).collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics lb does not export: {missing:?}"
    );
    // The panels beyond the web tier: active flows, the pool (roles, lag,
    // routing, writers and second writers) and the announcement.
    for wanted in [
        "lb_backend_active_flows",
        "lb_db_member_role",
        "lb_db_member_up",
        "lb_db_member_routed",
        "lb_db_replica_lag_seconds",
        "lb_db_pool_has_writer",
        "lb_db_second_writers_total",
        "lb_vip_announced",
        "lb_bird_protocol_up",
        "lb_announce_error",
    ] {
        assert!(used.contains(wanted), "no dashboard panel queries {wanted}");
    }
}

/// A snapshot of the whole site: the web tier, a database pool and the
/// BGP announcement, so every family the dashboard may query is present.
fn full_site() -> Status {
    use crate::announce::{BirdProtocol, BirdView, VipPlan};
    let mut status = snapshot();
    status.pools = vec![crate::metrics::db::sample_pool()];
    status.announce = Some(crate::wire::AnnounceStatus {
        vips: vec![VipPlan {
            vip: "198.18.0.10".parse().expect("vip"),
            announced: true,
            reason: "serving".into(),
        }],
        bird: Some(BirdView {
            protocols: vec![BirdProtocol {
                name: "router".into(),
                proto: "BGP".into(),
                state: "up".into(),
                info: "Established".into(),
            }],
            exported: BTreeMap::new(),
        }),
        ..Default::default()
    });
    status.sync = Some(sample_sync());
    status.full_nat = Some(sample_full_nat());
    status
}

/// Full NAT with two source addresses, one of them busy.
fn sample_full_nat() -> crate::wire::FullNatStatus {
    let source = |address: &str, ports_in_use, quarantined| crate::wire::FullNatSource {
        address: address.into(),
        ports_in_use,
        quarantined,
    };
    crate::wire::FullNatStatus {
        port_lo: 1024,
        port_hi: 2047,
        sources: vec![source("198.19.0.1", 700, 40), source("198.19.0.2", 0, 0)],
        allocation_failures: 9,
    }
}

#[test]
fn full_nat_ports_in_use_are_per_source_address_with_the_failures() {
    let mut status = snapshot();
    status.full_nat = Some(sample_full_nat());
    let text = render(&status, &ProbeLatency::default());
    let in_use = |source| value(&text, "lb_fullnat_ports_in_use", &[("source", source)]);
    assert_eq!((in_use("198.19.0.1"), in_use("198.19.0.2")), (700.0, 0.0));
    let quarantined = |source| value(&text, "lb_fullnat_ports_quarantined", &[("source", source)]);
    assert_eq!(
        (quarantined("198.19.0.1"), quarantined("198.19.0.2")),
        (40.0, 0.0)
    );
    assert_eq!(value(&text, "lb_fullnat_ports_per_backend", &[]), 1024.0);
    assert_eq!(
        value(&text, "lb_fullnat_allocation_failures_total", &[]),
        9.0
    );
    // Without a full-NAT service, none of it.
    let text = render(&snapshot(), &ProbeLatency::default());
    assert!(!text.contains("lb_fullnat"), "{text}");
}

/// Sync with one peer that sent flows and a forged message, and a stranger.
fn sample_sync() -> crate::sync::SyncStatus {
    crate::sync::SyncStatus {
        listen: "198.19.0.11:7890".into(),
        peers: vec![crate::sync::PeerStatus {
            peer: "198.19.0.12:7890".into(),
            flows_sent: 40,
            flows_received: 30,
            flows_kept_local: 2,
            wrapped_ages: 4,
            rejected: BTreeMap::from([
                ("bad_tag".to_owned(), 3),
                ("unknown_backend".to_owned(), 1),
            ]),
            last_message_age_ms: Some(1500),
            bulk_copied: true,
        }],
        rejected_strangers: BTreeMap::from([("not_a_peer".to_owned(), 5)]),
        events_lost: 0,
        synced_flows: 28,
        bulk: "done".into(),
    }
}

#[test]
fn sync_counts_are_per_peer_and_reason() {
    let mut status = snapshot();
    status.sync = Some(sample_sync());
    let text = render(&status, &ProbeLatency::default());
    let peer = [("peer", "198.19.0.12:7890")];
    assert_eq!(value(&text, "lb_sync_flows_sent_total", &peer), 40.0);
    assert_eq!(value(&text, "lb_sync_flows_received_total", &peer), 30.0);
    assert_eq!(value(&text, "lb_sync_flows_kept_local_total", &peer), 2.0);
    assert_eq!(value(&text, "lb_sync_wrapped_ages_total", &peer), 4.0);
    let rejected = |peer, reason| {
        value(
            &text,
            "lb_sync_rejected_total",
            &[("peer", peer), ("reason", reason)],
        )
    };
    assert_eq!(rejected("198.19.0.12:7890", "bad_tag"), 3.0);
    assert_eq!(rejected("198.19.0.12:7890", "unknown_backend"), 1.0);
    assert_eq!(rejected("stranger", "not_a_peer"), 5.0);
    assert_eq!(value(&text, "lb_sync_last_message_age_seconds", &peer), 1.5);
    assert_eq!(value(&text, "lb_sync_flows", &[]), 28.0);
    // Without [sync], none of it.
    let text = render(&snapshot(), &ProbeLatency::default());
    assert!(!text.contains("lb_sync"), "{text}");
}

#[test]
fn announcements_and_bird_sessions_are_gauges() {
    use crate::announce::{BirdProtocol, BirdView, VipPlan};
    let mut status = snapshot();
    let proto = |name: &str, proto: &str, info: &str| BirdProtocol {
        name: name.into(),
        proto: proto.into(),
        state: "up".into(),
        info: info.into(),
    };
    status.announce = Some(crate::wire::AnnounceStatus {
        vips: vec![
            VipPlan {
                vip: "198.18.0.10".parse().unwrap(),
                announced: true,
                reason: "serving".into(),
            },
            VipPlan {
                vip: "198.18.0.20".parse().unwrap(),
                announced: false,
                reason: "no backend admitted".into(),
            },
        ],
        bird: Some(BirdView {
            protocols: vec![
                proto("router", "BGP", "Established"),
                proto("backup", "BGP", "Active"),
                proto("device1", "Device", ""),
            ],
            exported: BTreeMap::new(),
        }),
        ..Default::default()
    });
    let text = render(&status, &ProbeLatency::default());
    assert_eq!(
        value(&text, "lb_vip_announced", &[("vip", "198.18.0.10")]),
        1.0
    );
    assert_eq!(
        value(&text, "lb_vip_announced", &[("vip", "198.18.0.20")]),
        0.0
    );
    let up = |name| {
        value(
            &text,
            "lb_bird_protocol_up",
            &[("name", name), ("proto", "BGP")],
        )
    };
    assert_eq!((up("router"), up("backup")), (1.0, 0.0));
    assert!(!text.contains("device1"), "only BGP and BFD: {text}");
    assert_eq!(value(&text, "lb_announce_error", &[]), 0.0);
}

/// README's metrics table names every family `/metrics` exports (a counter
/// as its `_total` sample, an info as its `_info`, as the table lists
/// them), so none is exported undocumented.
#[test]
fn readme_lists_every_exported_metric() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md");
    let readme = std::fs::read_to_string(path).expect("README.md");
    let table: Vec<&str> = readme
        .lines()
        .filter(|l| l.starts_with("| `lb_"))
        .map(|l| l.split(" | ").next().unwrap_or_default())
        .collect();
    let listed = |name: &str| {
        table.iter().any(|cell| {
            cell.match_indices(name).any(|(at, _)| {
                cell[..at].ends_with('`')
                    && cell[at + name.len()..].starts_with(['`', '{'].as_slice())
            })
        })
    };
    let probes = ProbeLatency::default();
    probes.observe("www", "web1", Duration::from_millis(1));
    let text = render(&full_site(), &probes);
    let mut families = 0;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut words = rest.split_whitespace();
        let (Some(name), Some(kind)) = (words.next(), words.next()) else {
            panic!("bad TYPE line {line}");
        };
        let sample = match kind {
            "counter" => format!("{name}_total"),
            "info" => format!("{name}_info"),
            _ => name.to_owned(),
        };
        assert!(
            listed(&sample),
            "{sample} ({kind}) is exported but not in README's metrics table"
        );
        families += 1;
    }
    assert!(families > 30, "only {families} families rendered:\n{text}");
}
