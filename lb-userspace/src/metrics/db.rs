//! The database pools' metrics: each member's reachability, role, lag and
//! the services routing to it, and each pool's writer and refused second
//! writers — from the status snapshot, like every other metric.

use prometheus_client::{
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::wire::{HealthStatus, PoolStatus, Role};

type Labels = Vec<(String, String)>;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

const ROLES: [Role; 5] = [
    Role::Primary,
    Role::Replica,
    Role::SecondWriter,
    Role::Writable,
    Role::Unknown,
];

/// Registers the pools' metrics in `registry`.
pub fn register(registry: &mut Registry, pools: &[PoolStatus]) {
    if pools.is_empty() {
        return;
    }
    let up = Family::<Labels, Gauge>::default();
    let role = Family::<Labels, Gauge>::default();
    let lag = Family::<Labels, Gauge>::default();
    let routed = Family::<Labels, Gauge>::default();
    let writer = Family::<Labels, Gauge>::default();
    let refused = Family::<Labels, Counter>::default();
    let errant = Family::<Labels, Gauge>::default();
    let leader = Family::<Labels, Gauge>::default();
    let lease_age = Family::<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
    let record = Family::<Labels, Gauge>::default();
    let etcd_up = Family::<Labels, Gauge>::default();
    for p in pools {
        if let Some(c) = &p.coordination {
            let pool = labels(&[("pool", &p.name)]);
            if let Some(l) = &c.leader {
                leader
                    .get_or_create(&labels(&[("pool", &p.name), ("leader", l), ("me", &c.me)]))
                    .set(i64::from(c.leading));
            }
            if let Some(a) = c.lease_age_ms {
                lease_age.get_or_create(&pool).set(a as f64 / 1000.0);
            }
            if let (Some(primary), Some(rev)) = (&c.recorded_primary, c.revision) {
                record
                    .get_or_create(&labels(&[("pool", &p.name), ("primary", primary)]))
                    .set(rev);
            }
            etcd_up
                .get_or_create(&pool)
                .set(i64::from(c.etcd_error.is_none()));
        }
        writer
            .get_or_create(&labels(&[("pool", &p.name)]))
            .set(i64::from(p.writer.is_some()));
        refused
            .get_or_create(&labels(&[("pool", &p.name)]))
            .inc_by(p.conflicts);
        for m in &p.members {
            let member = labels(&[("pool", &p.name), ("member", &m.name)]);
            up.get_or_create(&member)
                .set(i64::from(m.health == HealthStatus::Up));
            for r in ROLES {
                let name: &'static str = r.into();
                role.get_or_create(&labels(&[
                    ("pool", &p.name),
                    ("member", &m.name),
                    ("role", name),
                ]))
                .set(i64::from(m.role == r));
            }
            if let Some(gtids) = &m.errant_gtids {
                errant
                    .get_or_create(&labels(&[
                        ("pool", &p.name),
                        ("member", &m.name),
                        ("gtids", gtids),
                    ]))
                    .set(i64::try_from(gtids.split(',').count()).unwrap_or(i64::MAX));
            }
            if let Some(l) = m.lag_seconds {
                lag.get_or_create(&member)
                    .set(i64::try_from(l).unwrap_or(i64::MAX));
            }
            for service in [&p.write_service, &p.read_service] {
                routed
                    .get_or_create(&labels(&[
                        ("pool", &p.name),
                        ("member", &m.name),
                        ("service", service),
                    ]))
                    .set(i64::from(m.routed_by.contains(service)));
            }
        }
    }
    registry.register(
        "lb_db_member_up",
        "Whether the pool member answers its MySQL check (login works)",
        up,
    );
    registry.register(
        "lb_db_member_role",
        "The member's role as the pool sees it (1 for the current role)",
        role,
    );
    registry.register(
        "lb_db_replica_lag_seconds",
        "Seconds_Behind_Master of a replicating member",
        lag,
    );
    registry.register(
        "lb_db_member_routed",
        "Whether the pool's write or read service routes to the member",
        routed,
    );
    registry.register(
        "lb_db_pool_has_writer",
        "Whether the pool's write service has its one member",
        writer,
    );
    registry.register(
        "lb_db_second_writers",
        "Members refused as a second writer (writable beside the primary) since the agent started",
        refused,
    );
    registry.register(
        "lb_db_member_errant_gtids",
        "auto-rejoin kept the member out: the GTIDs (label gtids) it holds that the primary lacks, \
         one per domain and server",
        errant,
    );
    registry.register(
        "lb_db_pool_leader",
        "[coordination]: the LB (label leader) holding the pool's lease as this LB (label me) last \
         saw it; 1 if this LB leads now",
        leader,
    );
    registry.register(
        "lb_db_pool_lease_age_seconds",
        "[coordination]: how long the pool's current leader has held its lease (seen from this LB)",
        lease_age,
    );
    registry.register(
        "lb_db_pool_recorded_primary_revision",
        "[coordination]: etcd's revision of the primary (label primary) recorded for the pool",
        record,
    );
    registry.register(
        "lb_db_pool_etcd_reachable",
        "[coordination]: whether this LB's latest round with etcd succeeded",
        etcd_up,
    );
}

/// A pool as the tests see it: db1 the primary (write service), db2 a
/// replica 3 s behind (read service), two second writers refused so far.
#[cfg(test)]
pub(super) fn sample_pool() -> PoolStatus {
    use crate::wire::MemberStatus;
    let member = |name: &str, role: Role, lag, routed_by: Vec<String>| MemberStatus {
        name: name.into(),
        address: "198.19.1.21:3306".into(),
        health: HealthStatus::Up,
        role,
        read_only: Some(role != Role::Primary),
        server_id: Some(1),
        replication: None,
        lag_seconds: lag,
        routed_by,
        last_check: Some("ok".into()),
        rejoin: None,
        errant_gtids: None,
    };
    PoolStatus {
        name: "db".into(),
        write_service: "db-write".into(),
        write_vip: "198.18.0.20:3306".into(),
        read_service: "db-read".into(),
        read_vip: "198.18.0.21:3306".into(),
        primary: Some("db1".into()),
        writer: Some("db1".into()),
        readers: vec!["db2".into()],
        conflicts: 2,
        max_lag_ms: 5000,
        auto_failover_ms: None,
        promoting: false,
        last_event: None,
        coordination: None,
        members: vec![
            member("db1", Role::Primary, None, vec!["db-write".into()]),
            member("db2", Role::Replica, Some(3), vec!["db-read".into()]),
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::MemberStatus;

    #[test]
    fn a_pool_shows_roles_lag_and_routing() {
        let mut pool = sample_pool();
        let db3 = MemberStatus {
            name: "db3".into(),
            rejoin: Some("kept out: errant GTIDs 0-3-11 (not in db1's binlog)".into()),
            errant_gtids: Some("0-3-11".into()),
            routed_by: vec![],
            ..pool.members[1].clone()
        };
        pool.members.push(db3);
        pool.coordination = Some(crate::wire::CoordStatus {
            me: "lb2".into(),
            leader: Some("lb1".into()),
            leading: false,
            lease_age_ms: Some(12_500),
            recorded_primary: Some("db1".into()),
            revision: Some(17),
            etcd_error: None,
            etcd_silent_ms: Some(300),
        });
        let mut registry = Registry::default();
        register(&mut registry, &[pool]);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        for line in [
            "lb_db_member_role{pool=\"db\",member=\"db1\",role=\"primary\"} 1",
            "lb_db_member_role{pool=\"db\",member=\"db2\",role=\"primary\"} 0",
            "lb_db_replica_lag_seconds{pool=\"db\",member=\"db2\"} 3",
            "lb_db_member_routed{pool=\"db\",member=\"db1\",service=\"db-write\"} 1",
            "lb_db_member_routed{pool=\"db\",member=\"db1\",service=\"db-read\"} 0",
            "lb_db_pool_has_writer{pool=\"db\"} 1",
            "lb_db_second_writers_total{pool=\"db\"} 2",
            "lb_db_member_errant_gtids{pool=\"db\",member=\"db3\",gtids=\"0-3-11\"} 1",
            "lb_db_pool_leader{pool=\"db\",leader=\"lb1\",me=\"lb2\"} 0",
            "lb_db_pool_lease_age_seconds{pool=\"db\"} 12.5",
            "lb_db_pool_recorded_primary_revision{pool=\"db\",primary=\"db1\"} 17",
            "lb_db_pool_etcd_reachable{pool=\"db\"} 1",
        ] {
            assert!(text.contains(line), "{line} missing in:\n{text}");
        }
    }
}
