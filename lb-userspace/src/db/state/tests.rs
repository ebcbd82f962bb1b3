//! The routing rule on made-up pools: writes to the one primary, reads to
//! replicas within max-lag, second writers refused, failover, rejoin, and
//! coordination through a recorded primary. `pool`, `primary` and
//! `replica` serve the pools' event tests too (`db::events`).

use super::*;
use crate::{
    config::{CheckKind, HealthCheck, MysqlLogin, PoolMember, Secret},
    health::mysql::Replication,
};

pub(crate) fn pool(fallback: bool, auto: Option<Duration>) -> Pool {
    let login = MysqlLogin {
        user: "lb".into(),
        password: Secret::new("pw".into()),
        password_file: None,
    };
    Pool {
        name: "db".into(),
        write_vip: "198.18.0.20:3306".parse().expect("vip"),
        read_vip: "198.18.0.21:3306".parse().expect("vip"),
        members: (1..=3)
            .map(|n| PoolMember {
                name: format!("db{n}"),
                address: format!("198.19.1.2{n}:3306").parse().expect("addr"),
            })
            .collect(),
        health: HealthCheck {
            check: CheckKind::Mysql(login.clone()),
            port: None,
            interval: Duration::from_millis(500),
            timeout: Duration::from_millis(500),
            rise: 1,
            fall: 2,
            through_vip: false,
        },
        login,
        max_lag: Duration::from_secs(5),
        primary_fallback: fallback,
        auto_failover: auto,
        auto_rejoin: false,
        write_firewall: crate::config::Firewall::default(),
        read_firewall: crate::config::Firewall::default(),
    }
}

pub(crate) fn primary(applied: u64) -> Result<Observation, String> {
    Ok(Observation {
        read_only: false,
        server_id: 1,
        gtid_binlog_pos: format!("0-1-{applied}"),
        gtid_slave_pos: String::new(),
        replication: None,
    })
}

pub(crate) fn replica(applied: u64, lag: Option<u64>, io: &str) -> Result<Observation, String> {
    Ok(Observation {
        read_only: true,
        server_id: 2,
        gtid_binlog_pos: String::new(),
        gtid_slave_pos: format!("0-1-{applied}"),
        replication: Some(Replication {
            source: "198.19.1.21:3306".into(),
            io_running: io.into(),
            sql_running: true,
            lag_seconds: lag,
            gtid_io_pos: format!("0-1-{applied}"),
            error: None,
        }),
    })
}

fn down() -> Result<Observation, String> {
    Err("mysql 198.19.1.21:3306: connection refused".into())
}

fn healthy(state: &mut PoolState, now: Instant) {
    state.record("db1", primary(10), now);
    state.record("db2", replica(10, Some(0), "Yes"), now);
    state.record("db3", replica(9, Some(1), "Yes"), now);
}

#[test]
fn writes_go_to_the_one_primary_and_reads_to_the_replicas() {
    let now = Instant::now();
    let mut s = PoolState::new(pool(true, None), None);
    assert_eq!(s.health("db-write", "db1"), Some(Health::Pending));
    healthy(&mut s, now);
    assert_eq!(s.routing.writer.as_deref(), Some("db1"));
    assert_eq!(s.routing.readers, ["db2", "db3"]);
    assert_eq!(s.health("db-write", "db1"), Some(Health::Up));
    assert_eq!(s.health("db-write", "db2"), Some(Health::Down));
    assert_eq!(s.health("db-read", "db1"), Some(Health::Down));
    assert_eq!(s.health("db-read", "db3"), Some(Health::Up));
    assert_eq!(s.health("www", "db3"), None);
}

#[test]
fn a_lagging_or_stopped_replica_leaves_reads_after_fall_and_comes_back() {
    let now = Instant::now();
    let mut s = PoolState::new(pool(true, None), None);
    healthy(&mut s, now);
    // fall = 2: one bad probe is not enough.
    s.record("db2", replica(10, Some(30), "Yes"), now);
    assert_eq!(s.routing.readers, ["db2", "db3"]);
    let o = s.record("db2", replica(10, None, "No"), now);
    assert!(o.routing_changed);
    assert_eq!(s.routing.readers, ["db3"]);
    // rise = 1: back at the first good probe.
    s.record("db2", replica(12, Some(0), "Yes"), now);
    assert_eq!(s.routing.readers, ["db2", "db3"]);
}

#[test]
fn no_replica_qualifying_falls_back_to_the_primary_if_allowed() {
    let now = Instant::now();
    for (fallback, want) in [(true, vec!["db1".to_owned()]), (false, vec![])] {
        let mut s = PoolState::new(pool(fallback, None), None);
        healthy(&mut s, now);
        for _ in 0..2 {
            s.record("db2", down(), now);
            s.record("db3", replica(9, Some(60), "Yes"), now);
        }
        assert_eq!(s.routing.readers, want, "fallback {fallback}");
    }
}

#[test]
fn a_second_writer_is_refused_and_the_kept_one_stays() {
    let now = Instant::now();
    let mut s = PoolState::new(pool(true, None), None);
    healthy(&mut s, now);
    let o = s.record("db3", primary(9), now);
    assert_eq!(o.new_conflicts, ["db3"]);
    assert_eq!(s.routing.writer.as_deref(), Some("db1"));
    assert_eq!(s.routing.refused, ["db3"]);
    assert_eq!(s.health("db-write", "db3"), Some(Health::Down));
    assert_eq!(s.conflicts, 1);
    // Still refused at the next probe: counted once.
    let o = s.record("db3", primary(9), now);
    assert!(o.new_conflicts.is_empty());
    assert_eq!(s.conflicts, 1);
}

#[test]
fn two_writers_and_no_kept_primary_means_no_writer() {
    let now = Instant::now();
    let mut s = PoolState::new(pool(true, None), None);
    s.record("db1", primary(1), now);
    s.record("db2", primary(1), now);
    // db1 was adopted first (the only writable one at the time).
    assert_eq!(s.routing.writer.as_deref(), Some("db1"));
    assert_eq!(s.routing.refused, ["db2"]);
    // With no primary to keep, neither is trusted.
    s.primary = None;
    s.reroute(now);
    assert_eq!(s.routing.writer, None);
    assert_eq!(s.routing.refused, ["db1", "db2"]);
}

#[test]
fn the_primary_going_down_loses_the_writer_and_a_promotion_moves_it() {
    let t0 = Instant::now();
    let mut s = PoolState::new(pool(true, Some(Duration::from_secs(2))), None);
    healthy(&mut s, t0);
    s.record("db1", down(), t0);
    assert_eq!(s.routing.writer.as_deref(), Some("db1"));
    s.record("db1", down(), t0);
    assert_eq!(s.routing.writer, None);
    assert_eq!(s.health("db-write", "db1"), Some(Health::Down));
    assert_eq!(s.primary.as_deref(), Some("db1"));
    assert_eq!(s.failover_due(t0 + Duration::from_secs(1)), None);
    // db2 has applied more than db3.
    assert_eq!(
        s.failover_due(t0 + Duration::from_secs(2)),
        Some(Ok("db2".to_owned()))
    );
    let o = s.promoted("db2", t0);
    assert!(o.routing_changed);
    assert_eq!(s.routing.writer.as_deref(), Some("db2"));
    assert_eq!(s.routing.readers, ["db3"]);
    // The old primary comes back writable: refused, never the writer.
    let o = s.record("db1", primary(10), t0);
    assert_eq!(o.new_conflicts, ["db1"]);
    assert_eq!(s.routing.writer.as_deref(), Some("db2"));
    assert_eq!(s.health("db-write", "db1"), Some(Health::Down));
}

#[test]
fn failover_picks_the_replica_that_received_the_last_event() {
    let t0 = Instant::now();
    let mut s = PoolState::new(pool(true, Some(Duration::from_secs(1))), None);
    healthy(&mut s, t0);
    for _ in 0..2 {
        s.record("db1", down(), t0);
        // db2 applied more so far, but db3 received the last event:
        // db2 could follow db3, not the other way round.
        s.record("db2", orphan(10, 10), t0);
        s.record("db3", orphan(9, 11), t0);
    }
    let later = t0 + Duration::from_secs(1);
    assert_eq!(s.failover_due(later), Some(Ok("db3".to_owned())));
    // Histories that diverged (a domain only db2 has): no failover.
    let mut other_domain = orphan(10, 10);
    if let Ok(o) = &mut other_domain {
        o.gtid_slave_pos = "0-1-10,1-2-1".into();
    }
    s.record("db2", other_domain, t0);
    let why = s.failover_due(later).expect("due").expect_err("withheld");
    assert!(
        why.contains("db2 has domain 1 up to 1-2-1, db3 none of it"),
        "{why}"
    );
}

#[test]
fn a_member_back_without_replication_is_due_for_rejoin_once() {
    let t0 = Instant::now();
    let mut p = pool(true, None);
    p.auto_rejoin = true;
    let mut s = PoolState::new(p, None);
    healthy(&mut s, t0);
    assert!(s.rejoin_due(t0).is_empty(), "every replica follows db1");
    // db3 comes back as a standalone server (a former primary, fenced).
    let mut standalone = primary(9);
    if let Ok(o) = &mut standalone {
        o.read_only = true;
        o.replication = None;
    }
    s.record("db3", standalone.clone(), t0);
    assert_eq!(s.rejoin_due(t0), ["db3"]);
    // Writable: fenced first, not rejoined yet.
    s.record("db3", primary(9), t0);
    assert!(s.rejoin_due(t0).is_empty());
    s.record("db3", standalone.clone(), t0);
    s.rejoin.insert(
        "db3".into(),
        Rejoin::Checking {
            primary: "db1".into(),
        },
    );
    assert!(s.rejoin_due(t0).is_empty(), "one check at a time");
    let errant = Rejoin::Errant {
        primary: "db1".into(),
        binlog_pos: "0-1-9".into(),
        gtids: "0-3-10".into(),
    };
    s.rejoin.insert("db3".into(), errant);
    assert!(
        s.rejoin_due(t0).is_empty(),
        "errant: not again until it moves"
    );
    let mut moved = standalone.clone();
    if let Ok(o) = &mut moved {
        o.gtid_binlog_pos = "0-1-10".into();
    }
    s.record("db3", moved, t0);
    assert_eq!(s.rejoin_due(t0), ["db3"]);
    // Off without the key; and not right after a promotion of ours.
    s.pool.auto_rejoin = false;
    assert!(s.rejoin_due(t0).is_empty());
    s.pool.auto_rejoin = true;
    s.promoted("db1", t0);
    assert!(s.rejoin_due(t0).is_empty());
    assert_eq!(s.rejoin_due(t0 + Duration::from_secs(3)), ["db3"]);
}

/// An IPv6 pool: a replica that follows the primary is not due for a
/// rejoin. Its source is `SHOW SLAVE STATUS`'s host and port as the probe
/// writes them (`mysql::source_text`); written `host:port`, every IPv6
/// replica looked astray and was re-pointed again after every settling
/// time. One that follows another member is due.
#[test]
fn an_ipv6_replica_following_the_primary_is_not_due_for_rejoin() {
    let t0 = Instant::now();
    let mut p = pool(true, None);
    p.auto_rejoin = true;
    for (n, m) in p.members.iter_mut().enumerate() {
        m.address = format!("[2001:db8:19:1::2{}]:3306", n + 1)
            .parse()
            .expect("addr");
    }
    let mut s = PoolState::new(p, None);
    let from = |host: &str| {
        let mut o = replica(10, Some(0), "Yes");
        if let Ok(Observation {
            replication: Some(r),
            ..
        }) = &mut o
        {
            r.source = crate::health::mysql::source_text(host, "3306");
        }
        o
    };
    s.record("db1", primary(10), t0);
    s.record("db2", from("2001:db8:19:1::21"), t0);
    s.record("db3", from("2001:0db8:0019:0001::0021"), t0);
    assert_eq!(s.routing.writer.as_deref(), Some("db1"));
    let later = t0 + Duration::from_secs(60);
    assert!(s.rejoin_due(later).is_empty(), "both follow db1");
    s.record("db3", from("2001:db8:19:1::22"), t0);
    assert_eq!(s.rejoin_due(later), ["db3"], "db3 follows db2");
}

#[test]
fn an_outside_promotion_is_followed() {
    let now = Instant::now();
    let mut s = PoolState::new(pool(true, None), None);
    healthy(&mut s, now);
    // An orchestrator demotes db1 and promotes db3.
    s.record("db1", replica(10, Some(0), "Yes"), now);
    let o = s.record("db3", primary(10), now);
    assert_eq!(o.adopted.as_deref(), Some("db3"));
    assert_eq!(s.routing.writer.as_deref(), Some("db3"));
}

/// A replica whose IO thread lost its primary, having applied up to
/// `applied` of the `received` transactions.
fn orphan(applied: u64, received: u64) -> Result<Observation, String> {
    let mut o = replica(applied, None, "Connecting")?;
    if let Some(r) = &mut o.replication {
        r.gtid_io_pos = format!("0-1-{received}");
    }
    Ok(o)
}

#[test]
fn replicas_that_lost_a_crashed_primary_keep_serving_reads() {
    let now = Instant::now();
    let mut s = PoolState::new(pool(true, None), None);
    healthy(&mut s, now);
    // The primary crashes: its probe fails, and the replicas' IO
    // threads reconnect in vain. db2 applied all it got; db3 did not.
    s.record("db1", down(), now);
    for _ in 0..3 {
        s.record("db2", orphan(10, 10), now);
        s.record("db3", orphan(8, 9), now);
    }
    assert_eq!(s.routing.readers, ["db2"]);
    s.record("db1", down(), now);
    assert_eq!(s.routing.writer, None);
    assert_eq!(s.routing.readers, ["db2"]);
    // db3 catches up with what it received: back in (rise 1).
    s.record("db3", orphan(9, 9), now);
    assert_eq!(s.routing.readers, ["db2", "db3"]);
}

#[test]
fn a_replica_cut_off_from_a_live_primary_leaves_the_reads() {
    let now = Instant::now();
    let mut s = PoolState::new(pool(true, None), None);
    healthy(&mut s, now);
    // db1 still answers the agent: db2 cannot reach it and falls
    // behind, however caught up it is with what it received.
    for _ in 0..2 {
        s.record("db1", primary(12), now);
        s.record("db2", orphan(10, 10), now);
    }
    assert_eq!(s.routing.writer.as_deref(), Some("db1"));
    assert_eq!(s.routing.readers, ["db3"]);
}

#[test]
fn the_reader_rule_reads_lag_or_gtids() {
    let max = Duration::from_secs(5);
    let o = |r: Result<Observation, String>| r.expect("observation");
    assert!(qualifies_as_reader(
        &o(replica(10, Some(0), "Yes")),
        max,
        true
    ));
    assert!(!qualifies_as_reader(
        &o(replica(10, Some(9), "Yes")),
        max,
        false
    ));
    assert!(qualifies_as_reader(&o(orphan(10, 10)), max, false));
    assert!(!qualifies_as_reader(&o(orphan(10, 10)), max, true));
    assert!(!qualifies_as_reader(&o(orphan(9, 10)), max, false));
    // Stopped by hand: not orphaned, whatever it applied.
    assert!(!qualifies_as_reader(
        &o(replica(10, None, "No")),
        max,
        false
    ));
    assert!(!qualifies_as_reader(&o(primary(10)), max, false));
}

#[test]
fn a_reload_keeps_what_is_known() {
    let now = Instant::now();
    let mut s = PoolState::new(pool(true, None), None);
    healthy(&mut s, now);
    let next = PoolState::new(pool(true, None), Some(&s));
    assert_eq!(next.routing, s.routing);
    let mut moved = pool(true, None);
    moved.members[1].address = "198.19.1.99:3306".parse().expect("addr");
    let next = PoolState::new(moved, Some(&s));
    assert_eq!(next.routing.readers, ["db3"]);
}

fn coordinated(me: &str, leader: &str, t0: Instant, recorded: Option<(&str, i64)>) -> PoolState {
    let mut s = PoolState::new(pool(true, Some(Duration::from_secs(2))), None);
    s.coord = Some(Coordination::new(me, Duration::from_secs(10)));
    let view = coord::View {
        leader: leader.into(),
        leader_revision: 3,
        mine: me == leader,
        renewed: t0,
        recorded: recorded.map(|(p, revision)| coord::Recorded {
            primary: p.into(),
            revision,
        }),
    };
    s.coordinate(t0, |c| c.observed(view, t0));
    s
}

#[test]
fn under_coordination_writes_follow_the_record_and_only_the_leader_records() {
    let t0 = Instant::now();
    // The leader finds db1 writable, nothing recorded: no writes until
    // it records db1.
    let mut lead = coordinated("lb1", "lb1", t0, None);
    let o = lead.record("db1", primary(10), t0);
    assert_eq!(o.record.as_deref(), Some("db1"));
    assert_eq!(lead.routing.writer, None);
    assert!(lead.routing.refused.is_empty());
    let o = lead.coordinate(t0, |c| {
        c.wrote(coord::Recorded {
            primary: "db1".into(),
            revision: 7,
        })
    });
    assert!(o.routing_changed);
    assert_eq!(o.record, None);
    assert_eq!(lead.routing.writer.as_deref(), Some("db1"));
    assert!(lead.may_act(t0));

    // A follower with the same record routes there too, never records.
    let mut follow = coordinated("lb2", "lb1", t0, Some(("db1", 7)));
    healthy(&mut follow, t0);
    assert_eq!(follow.routing.writer.as_deref(), Some("db1"));
    assert!(!follow.may_act(t0));
    // db1 dies; the leader promotes db2 (writable now): the follower
    // neither refuses nor routes to db2 until the record moves.
    follow.record("db1", down(), t0);
    follow.record("db1", down(), t0);
    let o = follow.record("db2", primary(11), t0);
    assert_eq!(follow.routing.writer, None);
    assert!(follow.routing.refused.is_empty());
    assert_eq!(o.record, None);
    assert!(!follow.may_act(t0 + Duration::from_secs(3)));
    follow.coordinate(t0, |c| {
        c.wrote(coord::Recorded {
            primary: "db2".into(),
            revision: 9,
        })
    });
    assert_eq!(follow.routing.writer.as_deref(), Some("db2"));
    // db1 back writable: refused (the leader fences it).
    let o = follow.record("db1", primary(10), t0);
    assert_eq!(o.new_conflicts, ["db1"]);
    assert_eq!(follow.routing.writer.as_deref(), Some("db2"));
}

#[test]
fn cut_off_from_etcd_an_lb_keeps_the_record_and_stops_writes_when_that_primary_dies() {
    let t0 = Instant::now();
    let mut s = coordinated("lb2", "lb2", t0, Some(("db1", 7)));
    healthy(&mut s, t0);
    assert_eq!(s.routing.writer.as_deref(), Some("db1"));
    s.coordinate(t0, |c| c.unreachable("no etcd endpoint answered".into()));
    assert_eq!(s.routing.writer.as_deref(), Some("db1"));
    let later = t0 + Duration::from_secs(5);
    s.record("db1", down(), later);
    s.record("db1", down(), later);
    assert_eq!(s.routing.writer, None);
    // Its lease ran out: it may not promote, whatever is due.
    assert!(s.failover_due(later + Duration::from_secs(2)).is_some());
    assert!(!s.may_act(later + Duration::from_secs(2)));
    // Someone made db2 writable: still no writes here (not recorded).
    s.record("db2", primary(11), later);
    assert_eq!(s.routing.writer, None);
}

#[test]
fn a_leader_with_an_unrecorded_new_primary_does_not_fail_over_again() {
    let t0 = Instant::now();
    let mut s = coordinated("lb1", "lb1", t0, Some(("db1", 7)));
    healthy(&mut s, t0);
    s.record("db1", down(), t0);
    s.record("db1", down(), t0);
    assert_eq!(
        s.failover_due(t0 + Duration::from_secs(2)),
        Some(Ok("db2".to_owned()))
    );
    let o = s.promoted("db2", t0 + Duration::from_secs(2));
    assert_eq!(o.record.as_deref(), Some("db2"));
    assert_eq!(s.routing.writer, None);
    assert_eq!(s.failover_due(t0 + Duration::from_secs(9)), None);
}

#[test]
fn a_new_leader_finishes_or_redoes_a_promotion_the_dead_leader_left() {
    let t0 = Instant::now();
    let takeover = |s: &mut PoolState, at: Instant| {
        let view = coord::View {
            leader: "lb2".into(),
            leader_revision: 11,
            mine: true,
            renewed: at,
            recorded: Some(coord::Recorded {
                primary: "db1".into(),
                revision: 7,
            }),
        };
        s.coordinate(at, |c| c.observed(view, at))
    };
    // lb1 made db2 writable, then died before recording it.
    let mut s = coordinated("lb2", "lb1", t0, Some(("db1", 7)));
    healthy(&mut s, t0);
    s.record("db1", down(), t0);
    s.record("db1", down(), t0);
    s.record("db2", primary(11), t0);
    assert_eq!(s.routing.writer, None);
    let o = takeover(&mut s, t0 + Duration::from_secs(2));
    assert_eq!(o.record.as_deref(), Some("db2"), "finishes it: records db2");
    assert_eq!(s.failover_due(t0 + Duration::from_secs(9)), None);

    // lb1 died before db2 was writable: the new leader promotes again.
    let mut s = coordinated("lb2", "lb1", t0, Some(("db1", 7)));
    healthy(&mut s, t0);
    s.record("db1", down(), t0);
    s.record("db1", down(), t0);
    let at = t0 + Duration::from_secs(2);
    assert!(!s.may_act(at));
    let o = takeover(&mut s, at);
    assert_eq!(o.record, None);
    assert!(s.may_act(at));
    assert_eq!(s.failover_due(at), Some(Ok("db2".to_owned())));
}
