//! MariaDB GTIDs, without I/O: which member holds the most complete
//! history (the one a promotion must pick), what a candidate would lose,
//! and which transactions of a returning member the primary never had
//! (errant ones, that keep it out of replication). Tested on the host.
//!
//! A MariaDB GTID is `domain-server-seq`. A *position* (`@@gtid_binlog_pos`,
//! `@@gtid_slave_pos`, `Gtid_IO_Pos`) names the last GTID per replication
//! domain; with `gtid_strict_mode` sequence numbers only grow within a
//! domain, so between replicas of one primary a position with the higher
//! sequence number holds everything the lower one does. A *binlog state*
//! (`@@gtid_binlog_state`) names the last GTID per (domain, server): what
//! a server logged of each writer, which is what tells a transaction that
//! only the old primary logged from one that reached the new primary.

use std::{collections::BTreeMap, fmt};

use super::mysql::Observation;

/// One GTID: `domain-server-seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Gtid {
    pub domain: u32,
    pub server: u32,
    pub seq: u64,
}

impl fmt::Display for Gtid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}-{}", self.domain, self.server, self.seq)
    }
}

/// Parses a comma-separated GTID list (empty: none); the error names the
/// part that is not a GTID.
pub fn parse_list(text: &str) -> Result<Vec<Gtid>, String> {
    text.split(',')
        .map(str::trim)
        .filter(|g| !g.is_empty())
        .map(|g| {
            let mut parts = g.split('-');
            let mut next = || parts.next().and_then(|p| p.parse::<u64>().ok());
            let (Some(domain), Some(server), Some(seq), None) = (next(), next(), next(), next())
            else {
                return Err(format!("{g:?} is not a GTID (domain-server-seq)"));
            };
            Ok(Gtid {
                domain: u32::try_from(domain).map_err(|_| format!("{g:?}: domain too large"))?,
                server: u32::try_from(server).map_err(|_| format!("{g:?}: server too large"))?,
                seq,
            })
        })
        .collect()
}

/// The last GTID per domain: how far a member's history goes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Position(BTreeMap<u32, Gtid>);

impl Position {
    /// The furthest of several positions, per domain (text that is not a
    /// GTID list is an error).
    pub fn furthest<'a>(lists: impl IntoIterator<Item = &'a str>) -> Result<Position, String> {
        let mut pos = Position::default();
        for list in lists {
            for g in parse_list(list)? {
                pos.0
                    .entry(g.domain)
                    .and_modify(|have| {
                        if g.seq > have.seq {
                            *have = g;
                        }
                    })
                    .or_insert(g);
            }
        }
        Ok(pos)
    }

    /// Whether this position holds every transaction of `other`: every
    /// domain of `other` is here, at the same or a later sequence number.
    pub fn covers(&self, other: &Position) -> bool {
        self.lacks(other).is_empty()
    }

    /// What `other` has beyond this position: per domain, (where this one
    /// stops, if it has the domain; `other`'s last GTID there).
    pub fn lacks(&self, other: &Position) -> Vec<(Option<Gtid>, Gtid)> {
        other
            .0
            .values()
            .filter_map(|want| {
                let have = self.0.get(&want.domain).copied();
                (have.is_none_or(|h| h.seq < want.seq)).then_some((have, *want))
            })
            .collect()
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let all: Vec<String> = self.0.values().map(Gtid::to_string).collect();
        f.write_str(&all.join(","))
    }
}

/// Everything a member has or will have once it applies what it
/// received: its binlog, what it applied as a replica and what its IO
/// thread received (the relay log), furthest per domain.
pub fn history(o: &Observation) -> Result<Position, String> {
    let received = o
        .replication
        .as_ref()
        .map_or("", |r| r.gtid_io_pos.as_str());
    Position::furthest([
        o.gtid_binlog_pos.as_str(),
        o.gtid_slave_pos.as_str(),
        received,
    ])
}

/// What `candidate` (history `have`) lacks of each other member's history,
/// as one sentence per member that holds more ("db2 has up to 0-1-57,
/// db3 only 0-1-54: 3 transactions"); empty: it holds the most complete
/// history of all.
pub fn shortfall(candidate: &str, have: &Position, others: &[(String, Position)]) -> Vec<String> {
    others
        .iter()
        .filter(|(name, _)| name != candidate)
        .filter_map(|(name, pos)| {
            let lacks = have.lacks(pos);
            if lacks.is_empty() {
                return None;
            }
            let parts: Vec<String> = lacks
                .iter()
                .map(|(h, want)| match h {
                    Some(h) => format!(
                        "{name} has up to {want}, {candidate} only {h}: {} transaction(s)",
                        want.seq - h.seq
                    ),
                    None => format!(
                        "{name} has domain {} up to {want}, {candidate} none of it",
                        want.domain
                    ),
                })
                .collect();
            Some(parts.join("; "))
        })
        .collect()
}

/// The member with the most complete history: the first (in the order
/// given) whose history covers every other one's. `Err`: no member holds
/// all the others have (their histories diverge), with what each lacks.
pub fn most_complete(members: &[(String, Position)]) -> Result<String, String> {
    let mut why = Vec::new();
    for (name, pos) in members {
        let short = shortfall(name, pos, members);
        if short.is_empty() {
            return Ok(name.clone());
        }
        why.extend(short);
    }
    Err(if members.is_empty() {
        "no candidate".to_owned()
    } else {
        format!(
            "no member holds every transaction the others have: {}",
            why.join("; ")
        )
    })
}

/// The transactions of a returning member that `primary` never logged:
/// every GTID of the member's `@@gtid_binlog_state` whose (domain, server)
/// the primary's binlog state lacks or has only at a lower sequence
/// number. Empty: the member's history is a subset of the primary's, and
/// it can replicate from it by GTID.
pub fn errant(member_state: &str, primary_state: &str) -> Result<Vec<Gtid>, String> {
    let primary: BTreeMap<(u32, u32), u64> = parse_list(primary_state)?
        .into_iter()
        .map(|g| ((g.domain, g.server), g.seq))
        .collect();
    Ok(parse_list(member_state)?
        .into_iter()
        .filter(|g| {
            primary
                .get(&(g.domain, g.server))
                .is_none_or(|seq| *seq < g.seq)
        })
        .collect())
}

/// GTIDs as MariaDB writes them: `0-1-57,1-2-3`.
pub fn show(gtids: &[Gtid]) -> String {
    gtids
        .iter()
        .map(Gtid::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pos(text: &str) -> Position {
        Position::furthest([text]).expect("position")
    }

    #[test]
    fn lists_parse_and_bad_ones_are_named() {
        assert_eq!(parse_list(""), Ok(vec![]));
        assert_eq!(
            parse_list("0-1-57, 1-2-3"),
            Ok(vec![
                Gtid {
                    domain: 0,
                    server: 1,
                    seq: 57
                },
                Gtid {
                    domain: 1,
                    server: 2,
                    seq: 3
                }
            ])
        );
        for bad in ["0-1", "0-1-2-3", "a-1-2", "0-1-x", "99999999999-1-1"] {
            assert!(parse_list(bad).is_err(), "{bad}");
        }
        assert_eq!(
            show(&parse_list("0-1-57,1-2-3").expect("ok")),
            "0-1-57,1-2-3"
        );
    }

    #[test]
    fn positions_compare_per_domain() {
        let furthest = Position::furthest(["0-1-50", "0-1-57", "", "1-2-3"]).expect("ok");
        assert_eq!(furthest.to_string(), "0-1-57,1-2-3");
        assert!(pos("0-1-57").covers(&pos("0-1-57")));
        assert!(pos("0-2-60").covers(&pos("0-1-57")));
        assert!(!pos("0-1-56").covers(&pos("0-1-57")));
        assert!(!pos("0-1-57").covers(&pos("0-1-57,1-2-1")));
        assert!(pos("0-1-57").covers(&pos("")));
        assert_eq!(
            pos("0-1-54").lacks(&pos("0-1-57,1-2-1")),
            vec![
                (
                    Some(Gtid {
                        domain: 0,
                        server: 1,
                        seq: 54
                    }),
                    Gtid {
                        domain: 0,
                        server: 1,
                        seq: 57
                    }
                ),
                (
                    None,
                    Gtid {
                        domain: 1,
                        server: 2,
                        seq: 1
                    }
                )
            ]
        );
    }

    #[test]
    fn the_most_complete_history_wins_and_a_shortfall_is_spelled_out() {
        let members = |list: &[(&str, &str)]| -> Vec<(String, Position)> {
            list.iter()
                .map(|(n, p)| ((*n).to_owned(), pos(p)))
                .collect()
        };
        // The last event reached db2 only.
        let m = members(&[("db3", "0-1-54"), ("db2", "0-1-57")]);
        assert_eq!(most_complete(&m), Ok("db2".to_owned()));
        assert_eq!(
            shortfall("db3", &pos("0-1-54"), &m),
            ["db2 has up to 0-1-57, db3 only 0-1-54: 3 transaction(s)"]
        );
        assert!(shortfall("db2", &pos("0-1-57"), &m).is_empty());
        // Equal histories: the first in order.
        let m = members(&[("db2", "0-1-57"), ("db3", "0-1-57")]);
        assert_eq!(most_complete(&m), Ok("db2".to_owned()));
        // Diverged domains: nobody has it all.
        let m = members(&[("db2", "0-1-57"), ("db3", "0-1-50,1-3-2")]);
        let why = most_complete(&m).expect_err("diverged");
        assert!(
            why.contains("db3 has domain 1 up to 1-3-2, db2 none of it"),
            "{why}"
        );
        assert!(most_complete(&[]).is_err());
    }

    #[test]
    fn history_includes_what_the_relay_log_holds() {
        use crate::health::mysql::Replication;
        let o = Observation {
            read_only: true,
            server_id: 2,
            gtid_binlog_pos: "0-1-50".into(),
            gtid_slave_pos: "0-1-50".into(),
            replication: Some(Replication {
                source: "198.19.1.21:3306".into(),
                io_running: "Connecting".into(),
                sql_running: true,
                lag_seconds: None,
                gtid_io_pos: "0-1-52".into(),
                error: None,
            }),
        };
        assert_eq!(history(&o).expect("ok").to_string(), "0-1-52");
    }

    #[test]
    fn errant_transactions_are_the_ones_the_primary_never_logged() {
        // db1 was the primary up to 0-1-100; db2 took over at 101.
        let new_primary = "0-1-100,0-2-140";
        assert_eq!(errant("0-1-100", new_primary), Ok(vec![]));
        assert_eq!(errant("", new_primary), Ok(vec![]));
        // db1 logged 101 before it crashed, and no replica got it: errant,
        // although the new primary's position (0-2-140) is further on.
        assert_eq!(
            errant("0-1-101", new_primary).map(|e| show(&e)),
            Ok("0-1-101".to_owned())
        );
        // A domain (or writer) the primary never saw.
        assert_eq!(
            errant("0-1-100,5-1-3", new_primary).map(|e| show(&e)),
            Ok("5-1-3".to_owned())
        );
        assert!(errant("junk", new_primary).is_err());
    }
}
