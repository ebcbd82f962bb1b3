//! `lb status` as text: the agent's line, one table per service (a
//! table crate lays the columns out), then the pools, the announcement,
//! slow start, runtime changes and verdicts.

use comfy_table::{CellAlignment, Table, presets};

use crate::wire::{AnnounceStatus, BackendStatus, RuntimeStatus, Status};

/// How far a table's rows are indented under their heading.
const INDENT: u16 = 2;

/// A table without borders or separator lines: columns as wide as their
/// widest cell, two spaces apart, so the text stays easy to read and to
/// split on whitespace; `right` lists the columns aligned to the right
/// (numbers). No header line when `header` is empty.
fn table(header: &[&str], right: &[usize], rows: Vec<Vec<String>>) -> String {
    let mut t = Table::new();
    t.load_style(presets::NOTHING);
    if !header.is_empty() {
        t.set_header(header.to_vec());
    }
    t.add_rows(rows);
    for (i, column) in t.column_iter_mut().enumerate() {
        column.set_padding((if i == 0 { INDENT } else { 1 }, 1));
        if right.contains(&i) {
            column.set_cell_alignment(CellAlignment::Right);
        }
    }
    let mut out = String::new();
    for line in t.lines() {
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// A service's backends, one row each.
fn backends_table(backends: &[BackendStatus]) -> String {
    let rows = backends
        .iter()
        .map(|b| {
            vec![
                b.name.clone(),
                b.address.clone(),
                b.weight.to_string(),
                b.role().to_owned(),
                b.admin.to_string(),
                b.health.to_string(),
                // "full": out of the ring at its max-connections.
                match (b.in_ring, b.at_limit) {
                    (true, _) => "yes",
                    (false, true) => "full",
                    (false, false) => "no",
                }
                .to_owned(),
                b.active.to_string(),
                b.flows.to_string(),
                b.packets.to_string(),
                b.last_check.clone().unwrap_or_else(|| "-".to_owned()),
            ]
        })
        .collect();
    table(
        &[
            "backend",
            "address",
            "weight",
            "role",
            "admin",
            "health",
            "ring",
            "active",
            "flows",
            "packets",
            "last check",
        ],
        &[2, 7, 8, 9],
        rows,
    )
}

/// `lb status` as a table an operator can read at a glance.
pub fn render(status: &Status) -> String {
    let mut out = format!(
        "config {}  interfaces {}  pinned {}{}\nconntrack {}/{} flows (IPv4 {}, IPv6 {})  \
         config generation {}\n",
        status.config,
        status.interfaces.join(","),
        status.pin_dir.as_deref().unwrap_or("no"),
        if status.adopted {
            " (adopted from a previous agent)"
        } else {
            ""
        },
        status.conntrack.entries,
        status.conntrack.capacity,
        status
            .conntrack
            .entries
            .saturating_sub(status.conntrack.entries_v6),
        status.conntrack.entries_v6,
        status.agent.generation,
    );
    for s in &status.services {
        out.push_str(&format!(
            "\nservice {} {} {} {} {}  {} pkts {} bytes\n",
            s.name, s.vip, s.protocol, s.forwarding, s.scheduler, s.packets, s.bytes
        ));
        out.push_str(&backends_table(&s.backends));
    }
    if !status.pools.is_empty() {
        out.push('\n');
        out.push_str(&crate::db::render(&status.pools));
    }
    if let Some(a) = &status.announce {
        out.push_str(&render_announce(a));
    }
    if let Some(s) = &status.sync {
        out.push_str(&s.render());
    }
    if let Some(f) = &status.full_nat {
        out.push_str(&render_full_nat(f));
    }
    out.push_str(&render_slow_start(status));
    out.push_str(&render_runtime(&status.runtime));
    let verdicts: Vec<String> = status
        .verdicts
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(k, n)| format!("{k}={n}"))
        .collect();
    out.push_str(&format!(
        "\nverdicts: {}\n",
        if verdicts.is_empty() {
            "none yet".into()
        } else {
            verdicts.join(" ")
        }
    ));
    out
}

/// `lb status`'s full-NAT lines: the ports in use per source address (of
/// the range's size: one range per backend endpoint, so a source address
/// can hold more claims than the range has ports) and the allocation
/// failures.
fn render_full_nat(f: &crate::wire::FullNatStatus) -> String {
    let mut out = format!(
        "\nfull NAT: ports {}-{}  allocation failures (drop_fnat_exhausted) {}\n",
        f.port_lo, f.port_hi, f.allocation_failures
    );
    if f.sources.is_empty() {
        out.push_str("  no source address (no route to a full-NAT backend)\n");
    }
    for s in &f.sources {
        out.push_str(&format!(
            "  source {}  {} ports in use ({} in quarantine)\n",
            s.address, s.ports_in_use, s.quarantined
        ));
    }
    out
}

/// `lb status`'s slow-start lines: the backends ramping their weight.
fn render_slow_start(status: &Status) -> String {
    let ramps: Vec<String> = status
        .services
        .iter()
        .flat_map(|s| {
            s.backends.iter().filter_map(move |b| {
                b.slow_start_percent.map(|p| {
                    format!(
                        "  {}/{}: {p} % of weight {} (effective {:.2})\n",
                        s.name,
                        b.name,
                        b.weight,
                        b.effective_weight()
                    )
                })
            })
        })
        .collect();
    if ramps.is_empty() {
        return String::new();
    }
    format!("\nslow start (weight ramping up)\n{}", ramps.concat())
}

/// `lb status`'s runtime changes: which entries differ from the file.
fn render_runtime(r: &RuntimeStatus) -> String {
    let mut out = String::new();
    if !r.changes.is_empty() {
        out.push_str(&format!(
            "\nruntime changes (kept in {}; `lb backend reset SERVICE [NAME]` drops them)\n",
            r.file
        ));
        for c in &r.changes {
            out.push_str(&format!("  {c}\n"));
        }
    }
    if let Some(e) = &r.error {
        out.push_str(&format!("\nruntime state: {e}\n"));
    }
    out
}

/// `lb status`'s announcement lines: each VIP, then BIRD's sessions.
fn render_announce(a: &AnnounceStatus) -> String {
    let mut out = format!(
        "\nannounce via BIRD {} (include {}, med {})\n",
        a.bird_socket, a.include, a.med
    );
    let vips = a
        .vips
        .iter()
        .map(|v| {
            let announced = if v.announced {
                "announced"
            } else {
                "not announced"
            };
            vec![v.vip.to_string(), announced.to_owned(), v.reason.clone()]
        })
        .collect();
    out.push_str(&table(&[], &[], vips));
    match &a.bird {
        None => out.push_str("  BIRD: no answer yet\n"),
        Some(view) => {
            for p in view
                .protocols
                .iter()
                .filter(|p| p.proto == "BGP" || p.proto == "BFD")
            {
                let exported = view
                    .exported
                    .get(&p.name)
                    .map(|e| format!("  exports [{}]", e.join(" ")))
                    .unwrap_or_default();
                out.push_str(&format!(
                    "  BIRD {} {} {} {}{}\n",
                    p.proto, p.name, p.state, p.info, exported
                ));
            }
        }
    }
    if let Some(e) = &a.error {
        out.push_str(&format!("  last error: {e}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::{
        config::{Forwarding, Protocol, Scheduler},
        wire::{
            AdminState, AgentStatus, BackendStatus, ConntrackStatus, HealthStatus, PoolRole,
            ServiceStatus, ring_violations,
        },
    };

    #[test]
    fn render_shows_every_backend_and_state() {
        let status = Status {
            config: "c.toml".into(),
            pin_dir: Some("/sys/fs/bpf/lb".into()),
            adopted: true,
            interfaces: vec!["lb-front".into()],
            services: vec![ServiceStatus {
                name: "www".into(),
                vip: "198.18.0.10:80".into(),
                protocol: Protocol::Tcp,
                forwarding: Forwarding::Nat,
                scheduler: Scheduler::RoundRobin,
                packets: 10,
                bytes: 1000,
                backends: vec![BackendStatus {
                    name: "web1".into(),
                    address: "198.19.0.11:80".into(),
                    weight: 1,
                    backup: false,
                    admin: AdminState::Drain,
                    health: HealthStatus::Down,
                    pool_role: None,
                    last_check: Some("connection refused".into()),
                    last_check_at_ms: None,
                    last_check_us: None,
                    in_ring: false,
                    flows: 3,
                    active: 3,
                    packets: 7,
                    bytes: 700,
                    runtime: Some("drain".into()),
                    max_connections: None,
                    at_limit: false,
                    slow_start_percent: Some(40),
                    tls_cert_expiry: None,
                }],
            }],
            verdicts: BTreeMap::from([("forwarded".into(), 10), ("drop_fragment".into(), 0)]),
            agent: AgentStatus::default(),
            conntrack: ConntrackStatus {
                entries: 3,
                entries_v6: 1,
                capacity: 1024,
                half_open_capacity: 1024,
            },
            pools: Vec::new(),
            announce: None,
            sync: None,
            full_nat: Some(crate::wire::FullNatStatus {
                port_lo: 1024,
                port_hi: 32767,
                sources: vec![crate::wire::FullNatSource {
                    address: "198.19.0.1".into(),
                    ports_in_use: 5,
                    quarantined: 3,
                }],
                allocation_failures: 2,
            }),
            runtime: RuntimeStatus {
                file: "lb.state.toml".into(),
                changes: vec!["www/web1: drain".into()],
                error: None,
            },
        };
        let text = render(&status);
        for want in [
            "adopted",
            "conntrack 3/1024 flows",
            "conntrack 3/1024 flows (IPv4 2, IPv6 1)",
            "full NAT: ports 1024-32767  allocation failures (drop_fnat_exhausted) 2",
            "  source 198.19.0.1  5 ports in use (3 in quarantine)",
            "web1",
            "198.19.0.11:80",
            "drain",
            "down",
            "connection refused",
            "forwarded=10",
            "runtime changes (kept in lb.state.toml",
            "  www/web1: drain",
            "slow start (weight ramping up)\n  www/web1: 40 % of weight 1 (effective 0.40)",
        ] {
            assert!(text.contains(want), "{want} missing from\n{text}");
        }
        assert!(!text.contains("drop_fragment"), "zero verdicts are hidden");
        // The columns README lists, active flows among them.
        let header = text
            .lines()
            .find(|l| l.trim_start().starts_with("backend"))
            .expect("a backend header");
        let columns: Vec<&str> = header.split_whitespace().collect();
        assert_eq!(
            columns,
            [
                "backend", "address", "weight", "role", "admin", "health", "ring", "active",
                "flows", "packets", "last", "check"
            ]
        );
        // web1 drains and is out of the ring: the rule holds.
        assert_eq!(ring_violations(&status), Vec::<String>::new());
    }

    #[test]
    fn pool_members_show_their_role_not_a_failure() {
        let member = |name: &str, role| BackendStatus {
            name: name.into(),
            address: "198.19.1.21:3306".into(),
            weight: 1,
            backup: false,
            admin: AdminState::Enabled,
            health: HealthStatus::Up,
            pool_role: Some(role),
            last_check: Some("ok".into()),
            last_check_at_ms: None,
            last_check_us: None,
            in_ring: role == PoolRole::Routed,
            flows: 0,
            active: 0,
            packets: 0,
            bytes: 0,
            runtime: None,
            max_connections: None,
            at_limit: false,
            slow_start_percent: None,
            tls_cert_expiry: None,
        };
        let status = Status {
            config: String::new(),
            pin_dir: None,
            adopted: false,
            interfaces: Vec::new(),
            services: vec![ServiceStatus {
                name: "db-write".into(),
                vip: "198.18.0.20:3306".into(),
                protocol: Protocol::Tcp,
                forwarding: Forwarding::Nat,
                scheduler: Scheduler::RoundRobin,
                packets: 0,
                bytes: 0,
                backends: vec![
                    member("db1", PoolRole::Routed),
                    member("db2", PoolRole::Standby),
                ],
            }],
            runtime: RuntimeStatus::default(),
            verdicts: BTreeMap::new(),
            agent: AgentStatus::default(),
            conntrack: ConntrackStatus::default(),
            pools: Vec::new(),
            announce: None,
            sync: None,
            full_nat: None,
        };
        let text = render(&status);
        let row = |name: &str| {
            text.lines()
                .find(|l| l.trim_start().starts_with(name))
                .unwrap_or_else(|| panic!("no row {name} in\n{text}"))
                .split_whitespace()
                .collect::<Vec<_>>()
        };
        // name address weight role admin health ring active flows packets check
        assert_eq!(row("db1")[3..7], ["routed", "enabled", "up", "yes"]);
        assert_eq!(row("db2")[3..7], ["standby", "enabled", "up", "no"]);
        assert_eq!(row("db2")[10], "ok", "a member's last check is shown");
        let json = serde_json::to_value(&status).expect("json");
        assert_eq!(
            json["services"][0]["backends"][1]["pool_role"],
            serde_json::json!("standby")
        );
        assert_eq!(
            json["services"][0]["backends"][1]["health"],
            serde_json::json!("up")
        );
    }
}
