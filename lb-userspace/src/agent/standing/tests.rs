use std::path::Path;

use super::*;
use crate::{
    config::OnBackendDown,
    db::{
        Event,
        state::tests::{primary, replica},
    },
    health::{ProbeError, mysql::Observation},
};

const CONFIG: &str = r#"
[dataplane]
interfaces = ["lb-front", "lb-back"]

[[service]]
name = "www"
vip = "198.18.0.10:80"
health = { check = "tcp", interval = "1s", timeout = "500ms", rise = 1, fall = 1 }
backends = [
  { name = "web1", address = "198.19.0.11:80" },
  { name = "web2", address = "198.19.0.12:80" },
]

[[service]]
name = "plain"
vip = "198.18.0.11:80"
backends = [ { name = "web1", address = "198.19.0.11:80" } ]

[[pool]]
name = "db"
write-vip = "198.18.0.20:3306"
read-vip = "198.18.0.21:3306"
health = { check = "mysql", user = "lb", password = "pw", rise = 1, fall = 1 }
members = [
  { name = "db1", address = "198.19.1.21:3306" },
  { name = "db2", address = "198.19.1.22:3306" },
  { name = "db3", address = "198.19.1.23:3306" },
]
"#;

/// One standing function for every caller: admin state, the backend's own
/// check, a pool member's role, `max-connections`. A pool member's health
/// is its MySQL check's (what `lb explain` showed as "unchecked" when it
/// read the service checks only), and its ring goes by its role.
#[test]
fn a_backends_standing_has_its_admin_state_health_and_pool_role() {
    let cfg = crate::config::parse(CONFIG, Path::new("standing.toml")).expect("config");
    // The pools start a probe task per member on the runtime; this one is
    // never driven, so they never run (no packet leaves the test).
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let _entered = runtime.enter();
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let mut db = Pools::new(tx);
    db.sync(&cfg);
    // The first generation of probes (the pool's first sync).
    let probed = |db: &mut Pools, member: &str, result: Result<Observation, ProbeError>| {
        db.handle(Event::Probed {
            pool: "db".into(),
            member: member.into(),
            generation: 1,
            result,
        });
    };
    let backend = |r: Result<Observation, String>| r.map_err(ProbeError::Backend);
    probed(&mut db, "db1", backend(primary(10)));
    probed(&mut db, "db2", backend(replica(10, Some(0), "Yes")));
    probed(
        &mut db,
        "db3",
        Err(ProbeError::Backend("connection refused".into())),
    );

    let service = |name: &str| {
        cfg.services
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no service {name}"))
    };
    let www = service("www");
    let admin = BTreeMap::from([(state::key("www", "web2"), Admin::Drain)]);
    let health = BTreeMap::from([(
        Target {
            service: "www".into(),
            address: www.backends[0].address,
        },
        Health::Down,
    )]);
    let at_limit = AtLimit::from([(state::key("www", "web2"), (5, 5))]);
    let standings = Standings {
        admin: &admin,
        health: &health,
        db: &db,
        at_limit: &at_limit,
    };
    let of = |svc: &str, b: &str| {
        let svc = service(svc);
        let backend = svc
            .backends
            .iter()
            .find(|x| x.name == b)
            .unwrap_or_else(|| panic!("no backend {b}"));
        standings.of(svc, backend)
    };

    // An ordinary service's backends: its check, the operator's state.
    let web1 = of("www", "web1");
    assert_eq!(
        (web1.admin, web1.health, web1.ring_health),
        (Admin::Enabled, Some(Health::Down), Some(Health::Down))
    );
    assert_eq!(web1.member, None);
    assert!(!web1.admission(OnBackendDown::KeepFlows).in_rotation);
    let web2 = of("www", "web2");
    assert_eq!(web2.admin, Admin::Drain);
    assert_eq!(web2.at_limit, Some((5, 5)));
    // The same address under a service without a check: unchecked, serving.
    let plain = of("plain", "web1");
    assert_eq!((plain.health, plain.ring_health), (None, None));
    assert!(plain.admission(OnBackendDown::KeepFlows).in_rotation);

    // A pool's members: their own check's health whatever their role, and
    // the ring by role.
    let writer = of("db-write", "db1");
    assert_eq!(writer.health, Some(Health::Up));
    assert_eq!(writer.ring_health, Some(Health::Up));
    assert_eq!(
        writer.member.as_ref().map(|m| m.role),
        Some(crate::wire::PoolRole::Routed)
    );
    let standby = of("db-write", "db2");
    assert_eq!(standby.health, Some(Health::Up), "a healthy replica");
    assert_eq!(standby.ring_health, Some(Health::Down), "not the writer");
    assert_eq!(
        standby.member.as_ref().map(|m| m.role),
        Some(crate::wire::PoolRole::Standby)
    );
    assert!(!standby.admission(OnBackendDown::DropFlows).in_rotation);
    let reader = of("db-read", "db2");
    assert_eq!(
        (reader.health, reader.ring_health),
        (Some(Health::Up), Some(Health::Up))
    );
    let down = of("db-read", "db3");
    assert_eq!(down.health, Some(Health::Down));
    assert_eq!(
        down.member.as_ref().and_then(|m| m.last_check.as_deref()),
        Some("connection refused")
    );
}
