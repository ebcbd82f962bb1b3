//! The pools as `lb status` shows them: the status types (`wire`'s
//! [`PoolStatus`], [`MemberStatus`], [`CoordStatus`], [`Role`]) built from a
//! pool's state, and their text lines ([`render`]).

use std::time::{Duration, Instant};

use super::state::{self, PoolState};
use crate::wire::{CoordStatus, MemberStatus, PoolStatus, Role};

pub(super) fn pool_status(s: &PoolState) -> PoolStatus {
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let members = s
        .pool
        .members
        .iter()
        .map(|m| {
            let st = s.members.get(&m.name);
            let last = st.and_then(|x| x.last.as_ref());
            let up = st.is_some_and(|x| x.up.up());
            let role = if s.routing.writer.as_deref() == Some(m.name.as_str()) {
                Role::Primary
            } else if s.routing.refused.contains(&m.name) {
                Role::SecondWriter
            } else if !up {
                Role::Unknown
            } else if last.is_some_and(|o| o.read_only) {
                Role::Replica
            } else {
                Role::Writable
            };
            let mut routed_by = Vec::new();
            if s.routing.writer.as_deref() == Some(m.name.as_str()) {
                routed_by.push(s.pool.write_service());
            }
            if s.routing.readers.contains(&m.name) {
                routed_by.push(s.pool.read_service());
            }
            let replication = last.and_then(|o| o.replication.clone());
            MemberStatus {
                name: m.name.clone(),
                address: m.address.to_string(),
                health: st.map(|x| x.up.health()).into(),
                role,
                read_only: last.map(|o| o.read_only),
                server_id: last.map(|o| o.server_id),
                lag_seconds: replication.as_ref().and_then(|r| r.lag_seconds),
                replication,
                routed_by,
                last_check: st.and_then(|x| x.last_check.clone()),
                rejoin: s.rejoin.get(&m.name).map(ToString::to_string),
                errant_gtids: match s.rejoin.get(&m.name) {
                    Some(state::Rejoin::Errant { gtids, .. }) => Some(gtids.clone()),
                    _ => None,
                },
            }
        })
        .collect();
    PoolStatus {
        name: s.pool.name.clone(),
        write_service: s.pool.write_service(),
        write_vip: s.pool.write_vip.to_string(),
        read_service: s.pool.read_service(),
        read_vip: s.pool.read_vip.to_string(),
        primary: s.primary.clone(),
        writer: s.routing.writer.clone(),
        readers: s.routing.readers.clone(),
        conflicts: s.conflicts,
        max_lag_ms: ms(s.pool.max_lag),
        auto_failover_ms: s.pool.auto_failover.map(ms),
        promoting: s.promoting,
        last_event: s.last_event.clone(),
        members,
        coordination: s.coord.as_ref().map(|c| {
            let now = Instant::now();
            CoordStatus {
                me: c.me.clone(),
                leader: c.leader.as_ref().map(|(l, _)| l.clone()),
                leading: c.leads(now),
                lease_age_ms: c.leader_seen.map(|t| ms(now.duration_since(t))),
                recorded_primary: c.recorded.as_ref().map(|r| r.primary.clone()),
                revision: c.recorded.as_ref().map(|r| r.revision),
                etcd_error: c.error.clone(),
                etcd_silent_ms: c.reached.map(|t| ms(now.duration_since(t))),
            }
        }),
    }
}

/// `lb status`'s lines for the pools.
pub fn render(pools: &[PoolStatus]) -> String {
    let mut out = String::new();
    for p in pools {
        out.push_str(&format!(
            "pool {}  write {} {} -> {}  read {} {} -> [{}]  second writers refused {}{}\n",
            p.name,
            p.write_service,
            p.write_vip,
            p.writer.as_deref().unwrap_or("nobody"),
            p.read_service,
            p.read_vip,
            p.readers.join(" "),
            p.conflicts,
            if p.promoting { "  (promoting)" } else { "" }
        ));
        for m in &p.members {
            let lag = m
                .lag_seconds
                .map_or(String::new(), |l| format!(" lag {l}s"));
            let repl = m.replication.as_ref().map_or(String::new(), |r| {
                format!(
                    " io {} sql {}",
                    r.io_running,
                    if r.sql_running { "Yes" } else { "No" }
                )
            });
            out.push_str(&format!(
                "  {:<8} {:<21} {:<8} {:<13}{repl}{lag}  routed by [{}]  {}\n",
                m.name,
                m.address,
                m.health.to_string(),
                m.role.to_string(),
                m.routed_by.join(" "),
                m.last_check.as_deref().unwrap_or("")
            ));
            if let Some(r) = &m.rejoin {
                out.push_str(&format!("  {:<8} rejoin: {r}\n", ""));
            }
        }
        if let Some(c) = &p.coordination {
            out.push_str(&format!(
                "  coordination: leader {}{} for {}  recorded primary {} (revision {})  {}\n",
                c.leader.as_deref().unwrap_or("none seen"),
                if c.leading { " (this LB)" } else { "" },
                c.lease_age_ms
                    .map_or("-".to_owned(), |a| format!("{:.1}s", a as f64 / 1000.0)),
                c.recorded_primary.as_deref().unwrap_or("none"),
                c.revision.map_or("-".to_owned(), |r| r.to_string()),
                match &c.etcd_error {
                    None => "etcd ok".to_owned(),
                    Some(why) => format!(
                        "etcd unreachable for {}: {why}",
                        c.etcd_silent_ms
                            .map_or("ever".to_owned(), |s| format!("{:.1}s", s as f64 / 1000.0))
                    ),
                }
            ));
        }
        if let Some(e) = &p.last_event {
            out.push_str(&format!("  last event: {e}\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_shows_the_leader_the_lease_age_and_the_record() {
        let pool = |c: CoordStatus| PoolStatus {
            name: "db".into(),
            write_service: "db-write".into(),
            write_vip: "198.18.0.20:3306".into(),
            read_service: "db-read".into(),
            read_vip: "198.18.0.21:3306".into(),
            primary: Some("db2".into()),
            writer: Some("db2".into()),
            readers: vec![],
            conflicts: 0,
            max_lag_ms: 2000,
            auto_failover_ms: None,
            promoting: false,
            last_event: None,
            members: vec![],
            coordination: Some(c),
        };
        let leading = CoordStatus {
            me: "lb1".into(),
            leader: Some("lb1".into()),
            leading: true,
            lease_age_ms: Some(12_300),
            recorded_primary: Some("db2".into()),
            revision: Some(17),
            etcd_error: None,
            etcd_silent_ms: Some(100),
        };
        let text = render(&[pool(leading.clone())]);
        assert!(
            text.contains(
                "coordination: leader lb1 (this LB) for 12.3s  recorded primary db2 (revision 17)  etcd ok"
            ),
            "{text}"
        );
        let cut_off = CoordStatus {
            leading: false,
            etcd_error: Some("no etcd endpoint answered".into()),
            etcd_silent_ms: Some(4_000),
            ..leading
        };
        let text = render(&[pool(cut_off)]);
        assert!(
            text.contains(
                "leader lb1 for 12.3s  recorded primary db2 (revision 17)  etcd unreachable for 4.0s: no etcd endpoint answered"
            ),
            "{text}"
        );
    }
}
