//! End to end, a database pool over IPv6: the lab's real MariaDB servers
//! (db1 primary, db2 and db3 replicas by GTID, replicating over IPv6 from
//! db1's IPv6 address), a `[[pool]]` whose VIPs and members are IPv6
//! (NAT66), the agent's MySQL checks over IPv6 deciding the roles,
//! promoting (by command and automatically) and rejoining members, and
//! MySQL clients (`mysql_async`) in the client namespace going through the
//! IPv6 VIPs. The clients and checks are `lb_tests::db`'s, shared with
//! `db.rs` (IPv4). Run with `--nocapture` to see the rotation and the
//! status. Needs root and MariaDB; fails loudly without them.

use std::{
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use lb_tests::{
    ask,
    db::{
        from_client, pool, promote, read_from, reads_from, routed, seqs_on, write_to,
        writes_land_at,
    },
    lb_bin, status, three_webs, unique_prefix, wait_for_status,
};
use lb_userspace::{
    control::{FirewallChange, Request, RuleEdit},
    db::Role,
    harness::lab::{
        AgentProcess, CLIENT_FRONT6, Lab, pool_config6, read_vip6, run_dir, write_vip6,
    },
};

/// Probe interval 500 ms, fall 2: a member is judged down within about
/// this long (plus the probe timeout).
const FALL_WINDOW: Duration = Duration::from_millis(1500);
/// Longer than two of the pool's settling times after a rejoin or a
/// promotion (interval × (max(rise, fall) + 1) + timeout = 2 s): a member
/// wrongly seen astray would be re-pointed again within it.
const SETTLED: Duration = Duration::from_secs(5);

/// The www service and the lab's pool over IPv6, reachable only from the
/// client's /64, with `auto-rejoin` and `auto-failover` after 1 s.
fn config(lab: &Lab) -> String {
    let pool = pool_config6(
        &run_dir(lab.prefix()),
        Some("1s"),
        "auto-rejoin = true\nallow-from = [\"2001:db8:18::/64\"]\n",
    );
    format!("{}{pool}", three_webs())
}

/// The agent's log lines that start an auto-rejoin check.
fn rejoin_checks(agent: &AgentProcess) -> usize {
    agent
        .log_text()
        .lines()
        .filter(|l| l.contains("checking whether it can rejoin"))
        .count()
}

/// Database `n`'s `Master_Host`, empty without one: `SHOW SLAVE STATUS`'s
/// second column (batch mode: tab-separated, no column names).
fn master_host(lab: &Lab, n: usize) -> Result<String> {
    let text = lab.db_admin(n, "SHOW SLAVE STATUS")?;
    Ok(text
        .lines()
        .next()
        .and_then(|row| row.split('\t').nth(1))
        .unwrap_or_default()
        .to_owned())
}

/// Waits until database `n` has applied everything db `primary` logged.
fn replicated(lab: &Lab, primary: usize, n: usize) -> Result<()> {
    let pos = lab.db_admin(primary, "SELECT @@gtid_binlog_pos")?;
    let waited = lab.db_admin(n, &format!("SELECT MASTER_GTID_WAIT('{}', 5)", pos.trim()))?;
    ensure!(waited.trim() == "0", "db{n} did not replicate db{primary}");
    Ok(())
}

/// Writes `seqs` (tag "basic") through the write VIP6, each committed by
/// database `primary` (its server id is its number); then each of
/// `replicas` has applied them and holds every row from 1 to the last.
fn writes_reach(
    lab: &Lab,
    primary: usize,
    replicas: &[usize],
    seqs: std::ops::RangeInclusive<u64>,
) -> Result<()> {
    let last = *seqs.end();
    writes_land_at(lab, write_vip6(), seqs, primary as u64)?;
    for &n in replicas {
        replicated(lab, primary, n)?;
        ensure!(
            seqs_on(lab, n, "basic")? == (1..=last).collect(),
            "rows on db{n}"
        );
    }
    Ok(())
}

/// `ids` has `each` answers from every server of `servers` and no other.
fn rotation(ids: &[u64], servers: &[u64], each: usize) -> Result<()> {
    for s in servers {
        let n = ids.iter().filter(|i| *i == s).count();
        ensure!(n == each, "server {s} answered {n} of {ids:?}");
    }
    ensure!(ids.len() == each * servers.len(), "{ids:?}");
    Ok(())
}

#[test]
fn an_ipv6_pool_routes_by_role_fails_over_and_rejoins_over_ipv6() -> Result<()> {
    let mut lab = Lab::up(&unique_prefix("pool6"), &lb_bin())?;
    lab.start_databases6()?;
    let agent = lab.start_agent(&config(&lab))?;
    let check = |lab: &mut Lab| -> Result<()> {
        wait_for_status(
            lab,
            "db1 writes, db2+db3 read",
            Duration::from_secs(10),
            |s| routed(s, Some("db1"), &["db2", "db3"]),
        )?;
        // The members as the agent sees them over IPv6: addresses in
        // brackets, each replica's source as its member's address.
        let p = pool(&status(lab)?)?;
        ensure!(p.write_vip == "[2001:db8:18::20]:3306", "{}", p.write_vip);
        ensure!(p.read_vip == "[2001:db8:18::21]:3306", "{}", p.read_vip);
        for (n, m) in p.members.iter().enumerate() {
            ensure!(
                m.address == format!("[2001:db8:19:1::2{}]:3306", n + 1),
                "{}: {}",
                m.name,
                m.address
            );
        }
        for name in ["db2", "db3"] {
            let m = p.members.iter().find(|m| m.name == name).context(name)?;
            ensure!(m.role == Role::Replica, "{name}: {:?}", m.role);
            let repl = m.replication.as_ref().context("replicates")?;
            ensure!(
                repl.source == "[2001:db8:19:1::21]:3306" && repl.io_running == "Yes",
                "{name}: {repl:?}"
            );
        }

        // Writes through the write VIP6 land on the primary and replicate
        // over IPv6.
        writes_reach(lab, 1, &[2, 3], 1..=10)?;
        // Reads through the read VIP6 rotate over the replicas.
        let ids = reads_from(lab, read_vip6(), 12)?;
        println!("reads through {} (server ids): {ids:?}", read_vip6());
        rotation(&ids, &[2, 3], 6)?;

        // Replication stopped on db2: out of the reads, then back.
        lab.db_admin(2, "STOP SLAVE")?;
        wait_for_status(lab, "db2 out of reads", FALL_WINDOW * 2, |s| {
            routed(s, Some("db1"), &["db3"])
        })?;
        let ids = reads_from(lab, read_vip6(), 4)?;
        ensure!(
            ids.iter().all(|i| *i == 3),
            "reads while db2 stopped: {ids:?}"
        );
        lab.db_admin(2, "START SLAVE")?;
        wait_for_status(lab, "db2 back in reads", Duration::from_secs(5), |s| {
            routed(s, Some("db1"), &["db2", "db3"])
        })?;
        // Every replica follows the primary: nothing to rejoin (an IPv6
        // source read as `host:port` looked astray).
        thread::sleep(SETTLED);
        ensure!(
            rejoin_checks(&agent) == 0,
            "a rejoin of a replica that follows db1"
        );

        pool_firewall6(lab)?;

        // A promotion over IPv6: db2 becomes the primary, db1 and db3 are
        // re-pointed at its IPv6 address.
        let said = promote(lab, "db2", false)?;
        println!("lb db promote db db2: {said}");
        wait_for_status(
            lab,
            "db2 writes, db1+db3 read",
            Duration::from_secs(10),
            |s| routed(s, Some("db2"), &["db1", "db3"]),
        )?;
        for n in [1, 3] {
            ensure!(
                master_host(lab, n)? == "2001:db8:19:1::22",
                "db{n} replicates from {:?}",
                master_host(lab, n)?
            );
        }
        writes_reach(lab, 2, &[1, 3], 11..=20)?;
        let ids = reads_from(lab, read_vip6(), 12)?;
        println!("reads after the promotion (server ids): {ids:?}");
        rotation(&ids, &[1, 3], 6)?;
        thread::sleep(SETTLED);
        ensure!(
            rejoin_checks(&agent) == 0,
            "a rejoin after our own promotion"
        );

        // Auto-rejoin over IPv6: db3 loses its replication; the agent
        // points it at db2's IPv6 address, once, and it reads again.
        lab.db_admin(3, "STOP SLAVE; RESET SLAVE ALL")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !agent
            .log_text()
            .contains("db3 rejoined as a replica of db2")
        {
            ensure!(Instant::now() < deadline, "db3 was not rejoined");
            thread::sleep(Duration::from_millis(50));
        }
        wait_for_status(
            lab,
            "db3 rejoined and reads",
            Duration::from_secs(10),
            |s| {
                routed(s, Some("db2"), &["db1", "db3"])
                    && pool(s).is_ok_and(|p| {
                        p.members.iter().any(|m| {
                            m.name == "db3"
                                && m.replication
                                    .as_ref()
                                    .is_some_and(|r| r.source == "[2001:db8:19:1::22]:3306")
                        })
                    })
            },
        )?;
        ensure!(
            master_host(lab, 3)? == "2001:db8:19:1::22",
            "db3 not re-pointed"
        );
        thread::sleep(SETTLED);
        ensure!(
            rejoin_checks(&agent) == 1,
            "db3 rejoined {} times",
            rejoin_checks(&agent)
        );

        let text = lb_userspace::control::render(&status(lab)?);
        println!("{text}");
        ensure!(
            text.contains("pool db  write db-write [2001:db8:18::20]:3306 -> db2"),
            "{text}"
        );

        // The automatic failover over IPv6: db2 crashes; a replica holding
        // everything is promoted, the other re-pointed at its IPv6 address.
        lab.kill_db(2)?;
        let after = wait_for_status(
            lab,
            "a new primary after db2's crash",
            Duration::from_secs(15),
            |s| routed(s, Some("db1"), &["db3"]) || routed(s, Some("db3"), &["db1"]),
        )?;
        let writer = pool(&status(lab)?)?.writer.context("a writer")?;
        let (new, other): (usize, usize) = if writer == "db1" { (1, 3) } else { (3, 1) };
        println!("db2 crashed: {writer} promoted, routed {after:?} later (status poll)");
        ensure!(
            master_host(lab, other)? == format!("2001:db8:19:1::2{new}"),
            "db{other} replicates from {:?}",
            master_host(lab, other)?
        );
        writes_reach(lab, new, &[other], 21..=25)?;
        Ok(())
    };
    check(&mut lab).with_context(|| format!("agent stderr:\n{}", agent.log_text()))
}

/// `lb firewall …` on the pool's IPv6 write service: the client's /128
/// denied there cannot write (and reads go on), the rule is listed with
/// its count, and once removed the client writes again.
fn pool_firewall6(lab: &Lab) -> Result<()> {
    let client = format!("{CLIENT_FRONT6}/128");
    let deny = |edit| -> Result<String> {
        let r = ask(lab, &Request::Firewall(FirewallChange::Deny { edit }))?;
        ensure!(r.ok, "lb firewall: {}", r.message);
        Ok(r.message)
    };
    deny(RuleEdit::Add {
        prefix: client.clone(),
        service: Some("db-write".into()),
    })?;
    let (w, r) = from_client(lab, async {
        tokio::join!(
            write_to(write_vip6(), 1000, "client"),
            read_from(read_vip6())
        )
    })?;
    ensure!(
        w.is_err(),
        "the denied client wrote through the write VIP6: {w:?}"
    );
    ensure!(r.is_ok(), "the client's read (not denied) failed: {r:?}");
    let show = ask(lab, &Request::Firewall(FirewallChange::Show))?.message;
    println!("lb firewall show:\n{show}");
    ensure!(
        show.lines().any(
            |l| l.starts_with(&format!("service db-write: deny {client}"))
                && !l.contains(": 0 new flows")
        ),
        "the rule on db-write is not listed with its count: {show}"
    );
    deny(RuleEdit::Remove {
        prefix: client,
        service: Some("db-write".into()),
    })?;
    let w = from_client(lab, write_to(write_vip6(), 1001, "client"))?;
    ensure!(w.is_ok(), "the client still denied after remove: {w:?}");
    Ok(())
}
