//! End to end, the database tier: a lab with real MariaDB servers (db1
//! primary, db2 and db3 replicas by GTID, semi-synchronous), the agent
//! routing the pool's write VIP and read VIP by role, and MySQL clients
//! (`mysql_async`) in the client namespace going through the load balancer.
//! Run with `--nocapture` to see the measured write outages and the read
//! rotation.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use lb_tests::{
    ask, backend_status, checked_status, checked_status_at, chromium,
    db::{
        CLIENT_TIMEOUT, app_opts, ask_promote, from_client, from_ns, pool, promote, read_from,
        reads_from, routed, runtime, seqs_on, write_to, writes_land_at,
    },
    dom_attr, lb_bin, status, three_webs, unique_prefix, wait_for_status, wait_for_status_at,
};
use lb_userspace::{
    config::Forwarding,
    control::{FirewallChange, HealthStatus, PoolRole, Request, RuleEdit, Status},
    db::{DbCommand, Role},
    harness::{
        lab::{
            AgentProcess, Lab, MONITORING_LISTEN, VISITS_TABLE, admin_password_file, pool_config,
            read_vip, run_dir, vip_http, write_vip,
        },
        netns::in_netns,
    },
};
use mysql_async::{Conn, prelude::Queryable};

/// Probe interval 500 ms, fall 2: a member is judged down within about
/// this long (plus the probe timeout).
const FALL_WINDOW: Duration = Duration::from_millis(1500);

fn lab_with_databases() -> Result<Lab> {
    let mut lab = Lab::up(&unique_prefix("db"), &lb_bin())?;
    lab.start_databases()?;
    Ok(lab)
}

/// The www service (web1..web3), the monitoring listener (the status
/// page the Chromium check reads) and the lab's pool, last: the tests
/// append pool keys. Every reload of a scenario uses it, so `[monitoring]`
/// (which a reload cannot change) stays as it started.
fn config(lab: &Lab, auto_failover: Option<&str>) -> String {
    let pool = pool_config(&run_dir(lab.prefix()), auto_failover);
    format!(
        "{}\n[monitoring]\nlisten = \"{MONITORING_LISTEN}\"\n{pool}",
        three_webs()
    )
}

/// One write through the write VIP on a new connection: inserts `seq`,
/// returns the server id that committed it.
async fn write(seq: u64, writer: &str) -> Result<u64, String> {
    write_to(write_vip(), seq, writer).await
}

/// One read through the read VIP on a new connection: (server id, rows).
async fn read() -> Result<(u64, u64), String> {
    read_from(read_vip()).await
}

fn reads(lab: &Lab, n: usize) -> Result<Vec<u64>> {
    reads_from(lab, read_vip(), n)
}

/// A write loop from the client: (time since start, seq, server id or error).
type WriteLog = Vec<(Duration, u64, Result<u64, String>)>;

fn write_loop(
    lab: &Lab,
    writer: &'static str,
    stop: Arc<AtomicBool>,
) -> thread::JoinHandle<Result<WriteLog>> {
    write_loop_from(lab.client_ns(), writer, stop)
}

/// [`write_loop`] from namespace `ns` (a client behind another LB).
fn write_loop_from(
    ns: String,
    writer: &'static str,
    stop: Arc<AtomicBool>,
) -> thread::JoinHandle<Result<WriteLog>> {
    let mut seq = 0;
    client_loop(ns, stop, move |at| {
        seq += 1;
        let this = seq;
        async move {
            let r = write(this, writer).await;
            if r.is_err() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (at, this, r)
        }
    })
}

/// A read loop from the client through the read VIP, each read on a new
/// connection: (time since start, server id or error).
type ReadLog = Vec<(Duration, Result<u64, String>)>;

fn read_loop(lab: &Lab, stop: Arc<AtomicBool>) -> thread::JoinHandle<Result<ReadLog>> {
    client_loop(lab.client_ns(), stop, |at| async move {
        let r = read().await.map(|(id, _)| id);
        tokio::time::sleep(Duration::from_millis(20)).await;
        (at, r)
    })
}

/// Runs `step` (given the time since the start) from namespace `ns` (a
/// client's) until `stop`; the log of what each step returned.
fn client_loop<T, F, Fut>(
    ns: String,
    stop: Arc<AtomicBool>,
    mut step: F,
) -> thread::JoinHandle<Result<Vec<T>>>
where
    T: Send + 'static,
    F: FnMut(Duration) -> Fut + Send + 'static,
    Fut: Future<Output = T>,
{
    thread::spawn(move || {
        let rt = runtime()?;
        in_netns(&ns, || {
            rt.block_on(async {
                let start = Instant::now();
                let mut log = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    log.push(step(start.elapsed()).await);
                }
                log
            })
        })
    })
}

/// The write outage around `event`: the longest time between two
/// consecutive acknowledged writes from the last one acknowledged at or
/// before `event` on (the loop writes back to back, so in steady state acks
/// are milliseconds apart), how long before `event` that last one was,
/// and every acked seq. Writes that stalled before the event (once in CI,
/// two writes to a live primary timed out 1.4 s before it was killed: a
/// commit held, e.g. waiting for its semi-synchronous replica's ack) count
/// in the outage: the writes were out, which does not make the measure
/// impossible (it was refused when no ack fell in the second before the
/// event).
fn outage(log: &WriteLog, event: Duration) -> Result<Outage> {
    let acks: Vec<Duration> = log
        .iter()
        .filter(|(_, _, r)| r.is_ok())
        .map(|(t, _, _)| *t)
        .collect();
    let from = acks
        .iter()
        .rposition(|t| *t <= event)
        .with_context(|| format!("no write acknowledged before the event: {log:?}"))?;
    ensure!(
        acks.last().is_some_and(|t| *t > event),
        "no write acknowledged after the event: {log:?}"
    );
    let gap = acks[from..]
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default();
    let acked = log
        .iter()
        .filter(|(_, _, r)| r.is_ok())
        .map(|(_, s, _)| *s)
        .collect();
    Ok(Outage {
        gap,
        last_before: event - acks[from],
        acked,
    })
}

/// What [`outage`] found.
struct Outage {
    gap: Duration,
    /// How long before the event the last write before it was acknowledged.
    last_before: Duration,
    acked: BTreeSet<u64>,
}

/// Writes refused as read-only (MySQL error 1290) by whichever member got
/// them: must be none — read-only members never get write traffic.
fn read_only_refusals(log: &WriteLog) -> usize {
    log.iter()
        .filter(|(_, _, r)| {
            r.as_ref()
                .is_err_and(|e| e.contains("1290") || e.contains("read-only"))
        })
        .count()
}

/// Writes `seqs` (tag "basic") through the write VIP, each on a new
/// connection, and checks that server `server_id` committed every one.
fn writes_land_on(lab: &Lab, seqs: std::ops::RangeInclusive<u64>, server_id: u64) -> Result<()> {
    writes_land_at(lab, write_vip(), seqs, server_id)
}

/// One HTTP/1.0 request; the response body.
fn http(addr: SocketAddr, method: &str, path: &str) -> Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: www\r\nContent-Length: 0\r\n\r\n"
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let (head, body) = text.split_once("\r\n\r\n").context("no response head")?;
    ensure!(head.starts_with("HTTP/1.1 200"), "{method} {path}: {text}");
    Ok(body.to_owned())
}

/// Lets the write loop run 1 s more, stops it and checks it: prints the
/// write outage around `event`; every acknowledged write is on database
/// `primary`; no write was refused as read-only.
fn finish(
    lab: &Lab,
    stop: &AtomicBool,
    writes: thread::JoinHandle<Result<WriteLog>>,
    event: Duration,
    tag: &str,
    primary: usize,
    what: &str,
) -> Result<WriteLog> {
    // Long enough for a write that started just before the switch (its SYN
    // dropped while the write service had no member) to time out, and for
    // the next ones to be acknowledged by the new primary.
    thread::sleep(3 * CLIENT_TIMEOUT);
    stop.store(true, Ordering::Relaxed);
    let log = joined(writes)?;
    check_writes(lab, log, event, tag, primary, what)
}

fn joined(writes: thread::JoinHandle<Result<WriteLog>>) -> Result<WriteLog> {
    writes
        .join()
        .map_err(|_| anyhow::anyhow!("write loop panicked"))?
}

/// [`finish`]'s checks of one stopped write loop's log.
fn check_writes(
    lab: &Lab,
    log: WriteLog,
    event: Duration,
    tag: &str,
    primary: usize,
    what: &str,
) -> Result<WriteLog> {
    let Outage {
        gap,
        last_before,
        acked,
    } = outage(&log, event)?;
    println!(
        "{what}: write outage {gap:?} ({} writes, {} acknowledged, {} failed; the last \
         acknowledged before the event {last_before:?} before it)",
        log.len(),
        acked.len(),
        log.len() - acked.len()
    );
    let on_primary = seqs_on(lab, primary, tag)?;
    let missing: Vec<&u64> = acked.difference(&on_primary).collect();
    ensure!(
        missing.is_empty(),
        "acknowledged writes missing on the new primary db{primary}: {missing:?}"
    );
    ensure!(
        read_only_refusals(&log) == 0,
        "a read-only member got writes: {log:?}"
    );
    Ok(log)
}

#[test]
fn writes_go_to_the_primary_reads_rotate_and_replicas_leave_and_return() -> Result<()> {
    let lab = lab_with_databases()?;
    let agent = lab.start_agent(&config(&lab, None))?;
    let check = || -> Result<()> {
        wait_for_status(
            &lab,
            "db1 writes, db2+db3 read",
            Duration::from_secs(10),
            |s| routed(s, Some("db1"), &["db2", "db3"]),
        )?;
        let p = pool(&status(&lab)?)?;
        let role = |n: &str| p.members.iter().find(|m| m.name == n).map(|m| m.role);
        assert_eq!(role("db1"), Some(Role::Primary));
        assert_eq!(role("db2"), Some(Role::Replica));
        let db2 = p.members.iter().find(|m| m.name == "db2").context("db2")?;
        assert_eq!(db2.routed_by, ["db-read"]);
        assert_eq!(db2.lag_seconds, Some(0));
        let repl = db2.replication.as_ref().context("db2 replicates")?;
        assert!(repl.io_running == "Yes" && repl.sql_running, "{repl:?}");

        // Members by role, not as failures: in each service a member is
        // routed or stands by, its health and last check are its own
        // MySQL check's; the ring rule holds with roles.
        let st = checked_status(&lab)?;
        for (service, member, role) in [
            ("db-write", "db1", PoolRole::Routed),
            ("db-write", "db2", PoolRole::Standby),
            ("db-write", "db3", PoolRole::Standby),
            ("db-read", "db1", PoolRole::Standby),
            ("db-read", "db2", PoolRole::Routed),
            ("db-read", "db3", PoolRole::Routed),
        ] {
            let b = backend_status(&st, service, member)?;
            assert_eq!(b.pool_role, Some(role), "{service}/{member}");
            assert_eq!(b.health, HealthStatus::Up, "{service}/{member}");
            assert_eq!(b.last_check.as_deref(), Some("ok"), "{service}/{member}");
            assert!(b.last_check_at_ms.is_some(), "{service}/{member}");
        }
        // `lb explain` reads the same standing: each member's health is its
        // own MySQL check's, routed or standing by (it was "unchecked").
        for vip in [write_vip(), read_vip()] {
            let r = ask(
                &lab,
                &Request::Explain {
                    client: "198.18.0.2:40000".into(),
                    service: format!("{vip}/tcp"),
                },
            )?;
            ensure!(r.ok, "lb explain {vip}/tcp: {}", r.message);
            for member in ["db1", "db2", "db3"] {
                let line = r
                    .message
                    .lines()
                    .find(|l| l.trim_start().starts_with(&format!("{member} ")))
                    .with_context(|| format!("no {member} in lb explain:\n{}", r.message))?;
                let words: Vec<&str> = line.split_whitespace().collect();
                ensure!(
                    words.windows(2).any(|w| w == ["health", "up"]),
                    "lb explain {vip}/tcp shows {member} as {line:?}"
                );
            }
        }
        // The status page's pool section, rendered by Chromium: roles,
        // lag, second writers; the services' rows by role.
        let dom = chromium(
            &lab.lb_ns(),
            &format!("http://{MONITORING_LISTEN}/"),
            &["--dump-dom"],
        )?;
        assert_eq!(dom_attr(&dom, "pool-db", "class")?, "pool");
        assert_eq!(dom_attr(&dom, "m-db-db1", "data-role")?, "primary");
        assert_eq!(dom_attr(&dom, "m-db-db2", "data-role")?, "replica");
        assert_eq!(dom_attr(&dom, "m-db-db3", "data-health")?, "up");
        assert_eq!(dom_attr(&dom, "b-db-write-db2", "data-role")?, "standby");
        assert_eq!(dom_attr(&dom, "b-db-write-db2", "data-health")?, "up");
        assert_eq!(dom_attr(&dom, "b-db-read-db1", "data-role")?, "standby");
        assert_eq!(dom_attr(&dom, "b-db-read-db2", "data-role")?, "routed");
        for text in ["second writers refused: 0", "last event:"] {
            ensure!(
                dom.contains(text),
                "no {text:?} in the pool section:\n{dom}"
            );
        }

        // Writes land on the primary, and replicate.
        writes_land_on(&lab, 1..=20, 1)?;
        let primary_pos = lab.db_admin(1, "SELECT @@gtid_binlog_pos")?;
        for n in [2, 3] {
            let waited = lab.db_admin(
                n,
                &format!("SELECT MASTER_GTID_WAIT('{}', 5)", primary_pos.trim()),
            )?;
            assert_eq!(waited.trim(), "0", "db{n} did not replicate");
            assert_eq!(
                seqs_on(&lab, n, "basic")?,
                (1..=20).collect(),
                "rows on db{n}"
            );
        }

        // Reads rotate over the replicas.
        let ids = reads(&lab, 12)?;
        println!("read rotation over db2+db3 (server ids of 12 new connections): {ids:?}");
        assert_eq!(ids.iter().filter(|i| **i == 2).count(), 6, "{ids:?}");
        assert_eq!(ids.iter().filter(|i| **i == 3).count(), 6, "{ids:?}");

        // The application: the web servers (through the web VIP) write
        // through the write VIP and read through the read VIP.
        let pages = in_netns(&lab.client_ns(), || -> Result<Vec<String>> {
            let mut pages = Vec::new();
            for method in ["POST", "POST", "POST", "GET", "GET", "GET", "GET"] {
                pages.push(http(vip_http(), method, "/visits")?);
            }
            Ok(pages)
        })??;
        println!("web app through the LB:\n{}", pages.join(""));
        for page in &pages[..3] {
            assert!(
                page.contains("visit recorded by db1 (write VIP 198.18.0.20:3306)"),
                "{page}"
            );
        }
        let from: BTreeSet<&str> = pages[3..]
            .iter()
            .filter_map(|p| p.split("read from ").nth(1)?.split(' ').next())
            .collect();
        assert_eq!(from, BTreeSet::from(["db2", "db3"]), "{pages:?}");
        let webs: BTreeSet<&str> = pages.iter().filter_map(|p| p.split(':').next()).collect();
        assert_eq!(webs.len(), 3, "every web answered: {pages:?}");

        // Replication stopped on db2: it leaves the reads within the fall
        // window, and comes back once it replicates again.
        let stopped = Instant::now();
        lab.db_admin(2, "STOP SLAVE")?;
        let left = wait_for_status(&lab, "db2 out of reads", FALL_WINDOW * 2, |s| {
            routed(s, Some("db1"), &["db3"])
        })?;
        let gone = stopped.elapsed();
        println!(
            "replication stopped on db2: out of the read service after {gone:?} (status poll {left:?})"
        );
        assert!(gone <= FALL_WINDOW + Duration::from_millis(700), "{gone:?}");
        let ids = reads(&lab, 6)?;
        println!("reads while db2 is stopped: {ids:?}");
        assert!(ids.iter().all(|i| *i == 3), "{ids:?}");
        // Writes continue meanwhile; db2 catches up once restarted.
        from_client(&lab, async {
            for seq in 21..=30 {
                write(seq, "basic").await.map_err(anyhow::Error::msg)?;
            }
            Ok::<_, anyhow::Error>(())
        })??;
        let started = Instant::now();
        lab.db_admin(2, "START SLAVE")?;
        wait_for_status(&lab, "db2 back in reads", Duration::from_secs(5), |s| {
            routed(s, Some("db1"), &["db2", "db3"])
        })?;
        println!(
            "db2 replicating again: back in the read service after {:?}",
            started.elapsed()
        );
        assert_eq!(
            seqs_on(&lab, 2, "basic")?,
            (1..=30).collect(),
            "db2 caught up"
        );
        let ids = reads(&lab, 6)?;
        println!("reads after db2 returned: {ids:?}");
        assert_eq!(ids.iter().filter(|i| **i == 2).count(), 3, "{ids:?}");

        // Never two writers: db3 made writable behind the agent's back is
        // refused (no writes) and set read-only again.
        lab.db_admin(3, "SET GLOBAL read_only = 0")?;
        wait_for_status(
            &lab,
            "db3 refused as a second writer",
            Duration::from_secs(5),
            |s| pool(s).is_ok_and(|p| p.conflicts >= 1 && p.writer.as_deref() == Some("db1")),
        )?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while lab.db_admin(3, "SELECT @@global.read_only")?.trim() != "1" {
            ensure!(
                Instant::now() < deadline,
                "the agent did not set db3 read-only again"
            );
            thread::sleep(Duration::from_millis(50));
        }
        writes_land_on(&lab, 31..=36, 1)?;
        let text = lb_userspace::control::render(&status(&lab)?);
        println!("{text}");
        assert!(
            text.contains("pool db  write db-write 198.18.0.20:3306 -> db1"),
            "{text}"
        );
        pool_firewall(&lab)?;
        reload_with_a_new_login(&lab)?;
        visits_in_dsr(&lab)
    };
    check().with_context(|| format!("agent stderr:\n{}", agent.log_text()))
}

/// `r` is a refusal whose message says every one of `needles`.
fn refused_with(r: &lb_userspace::control::Response, needles: &[&str]) -> Result<()> {
    ensure!(
        !r.ok && needles.iter().all(|n| r.message.contains(n)),
        "expected a refusal saying {needles:?}: ok {}: {}",
        r.ok,
        r.message
    );
    Ok(())
}

/// `lb reload` of `text` written as the lab's config.
fn reload(lab: &Lab, text: &str) -> Result<lb_userspace::control::Response> {
    std::fs::write(lab.run_dir().join("lb.toml"), text)?;
    ask(lab, &Request::Reload)
}

fn firewall(lab: &Lab, change: FirewallChange) -> Result<String> {
    let r = ask(lab, &Request::Firewall(change))?;
    ensure!(r.ok, "lb firewall: {}", r.message);
    Ok(r.message)
}

/// POST then GET /visits from the client through the web VIP: the web
/// servers write through the write VIP and read through the read VIP.
fn visits_work(lab: &Lab) -> Result<(String, String)> {
    in_netns(&lab.client_ns(), || -> Result<(String, String)> {
        let post = http(vip_http(), "POST", "/visits")?;
        ensure!(post.contains("visit recorded by db1"), "{post}");
        let get = http(vip_http(), "GET", "/visits")?;
        ensure!(get.contains("read from db"), "{get}");
        Ok((post, get))
    })?
}

/// What the client's own write and read through the DB VIPs got.
type ClientDb = (Result<u64, String>, Result<(u64, u64), String>);

/// The client's own write and read through the DB VIPs (new connections).
fn client_db(lab: &Lab) -> Result<ClientDb> {
    // Side by side: a denied one costs the client's whole timeout.
    from_client(lab, async { tokio::join!(write(1000, "client"), read()) })
}

/// A pool's services are first-class for the firewall: a live rule on the
/// write service and the pool's `allow-from` keep the client off the
/// database while the web servers' `/visits` go on.
fn pool_firewall(lab: &Lab) -> Result<()> {
    let client = "198.18.0.2/32".to_owned();
    let msg = firewall(
        lab,
        FirewallChange::Deny {
            edit: RuleEdit::Add {
                prefix: client.clone(),
                service: Some("db-write".into()),
            },
        },
    )?;
    println!("lb firewall deny add {client} --service db-write: {msg}");
    let (w, r) = client_db(lab)?;
    ensure!(
        w.is_err(),
        "the denied client wrote through the write VIP: {w:?}"
    );
    ensure!(r.is_ok(), "the client's read (not denied) failed: {r:?}");
    let (post, _) = visits_work(lab)?;
    println!("client denied on db-write ({w:?}); the webs' /visits still work: {post}");
    let show = firewall(lab, FirewallChange::Show)?;
    println!("lb firewall show:\n{show}");
    ensure!(
        show.lines()
            .any(|l| l.starts_with("service db-write: deny 198.18.0.2/32")
                && !l.contains(": 0 new flows")),
        "the rule on db-write is not listed with its count: {show}"
    );
    firewall(
        lab,
        FirewallChange::Deny {
            edit: RuleEdit::Remove {
                prefix: client,
                service: Some("db-write".into()),
            },
        },
    )?;
    ensure!(
        client_db(lab)?.0.is_ok(),
        "the client still denied after remove"
    );

    // The config's way: the database only from the web servers.
    let only_webs = format!("{}allow-from = [\"198.19.0.0/24\"]\n", config(lab, None));
    let r = reload(lab, &only_webs)?;
    ensure!(r.ok, "reload with allow-from: {}", r.message);
    let (w, r) = client_db(lab)?;
    ensure!(
        w.is_err() && r.is_err(),
        "the client reached the database: {w:?} {r:?}"
    );
    visits_work(lab)?;
    println!(
        "[[pool]] allow-from = [\"198.19.0.0/24\"]: client refused on both VIPs, /visits work"
    );
    let r = reload(lab, &config(lab, None))?;
    ensure!(r.ok, "reload back: {}", r.message);
    Ok(())
}

/// A reload with a wrong database password is rejected naming the key,
/// and the running login stays (writes go on); a right new one is
/// accepted.
fn reload_with_a_new_login(lab: &Lab) -> Result<()> {
    let good = config(lab, None);
    let password_file = admin_password_file(&run_dir(lab.prefix()));
    let file_key = format!("password-file = \"{}\"", password_file.display());
    ensure!(good.contains(&file_key), "{good}");
    let r = reload(lab, &good.replace(&file_key, "password = \"wrong\""))?;
    println!(
        "reload with a wrong database password: ok {}: {}",
        r.ok, r.message
    );
    refused_with(&r, &["pool[0].health.password:", "Access denied"])?;
    // Longer than the fall window: the running login still works.
    thread::sleep(FALL_WINDOW * 2);
    let s = status(lab)?;
    ensure!(routed(&s, Some("db1"), &["db2", "db3"]), "{:?}", pool(&s));
    ensure!(
        s.agent.last_reload.as_ref().is_some_and(|r| !r.ok),
        "the rejected reload is not in the status"
    );
    writes_land_on(lab, 40..=42, 1)?;
    // The same password given inline: a changed login that works.
    let password = std::fs::read_to_string(&password_file)?;
    let inline = format!("password = \"{}\"", password.trim());
    let r = reload(lab, &good.replace(&file_key, &inline))?;
    ensure!(r.ok, "reload with the right password inline: {}", r.message);
    wait_for_status(
        lab,
        "still db1 after the login change",
        FALL_WINDOW * 2,
        |s| routed(s, Some("db1"), &["db2", "db3"]),
    )?;
    let r = reload(lab, &good)?;
    ensure!(r.ok, "reload back: {}", r.message);
    Ok(())
}

/// `/visits` with the web service in DSR: the webs' return route to the
/// client network must not swallow the database VIPs.
fn visits_in_dsr(lab: &Lab) -> Result<()> {
    lab.set_mode(Forwarding::Dsr)?;
    let dsr = config(lab, None).replacen(
        "scheduler = \"round-robin\"\n",
        "scheduler = \"round-robin\"\nforwarding = \"dsr\"\n",
        1,
    );
    ensure!(dsr.contains("forwarding = \"dsr\""), "{dsr}");
    let r = reload(lab, &dsr)?;
    ensure!(r.ok, "reload in DSR: {}", r.message);
    let s = status(lab)?;
    ensure!(
        s.services
            .iter()
            .any(|x| x.name == "www" && x.forwarding == Forwarding::Dsr),
        "www is not in DSR"
    );
    for _ in 0..3 {
        let (post, get) = visits_work(lab)?;
        println!("DSR: {post}{get}");
    }
    Ok(())
}

#[test]
fn failover_by_command_and_automatic_keeps_every_acknowledged_write() -> Result<()> {
    let mut lab = lab_with_databases()?;
    let agent = lab.start_agent(&config(&lab, None))?;
    let mut run = || -> Result<()> {
        wait_for_status(&lab, "db1 writes", Duration::from_secs(10), |s| {
            routed(s, Some("db1"), &["db2", "db3"])
        })?;

        // 1. The primary crashes under a steady write loop; an operator
        //    promotes db2 by command.
        let stop = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let writes = write_loop(&lab, "crash", Arc::clone(&stop));
        // Reads through the read VIP go on through the crash: the
        // replicas that lost db1 hold all it sent them.
        let stop_reads = Arc::new(AtomicBool::new(false));
        let read_log = read_loop(&lab, Arc::clone(&stop_reads));
        thread::sleep(Duration::from_millis(1500));
        // db3 stops receiving first, so the last events before the crash
        // reach db2 only: db2 holds the most complete history.
        lab.db_admin(3, "STOP SLAVE IO_THREAD")?;
        thread::sleep(Duration::from_millis(300));
        let killed_at = started.elapsed();
        lab.kill_db(1)?;
        let lost = wait_for_status(&lab, "no writer once db1 is down", FALL_WINDOW * 2, |s| {
            pool(s).is_ok_and(|p| p.writer.is_none())
        })?;
        println!("db1 killed: the write service stopped routing to it after {lost:?}");
        // db3 lacks what db2 received: promoting it is refused, naming
        // what would be lost.
        let r = ask_promote(&lab, "db3", false)?;
        println!("lb db promote db db3 (db2 received more): {}", r.message);
        refused_with(&r, &["lacks transactions", "db2 has up to"])?;
        let msg = promote(&lab, "db2", false)?;
        println!("lb db promote db db2: {msg}");
        // db3 rejoins the reads once it has caught up with db2 (rise 2).
        wait_for_status(&lab, "db2 writes", Duration::from_secs(5), |s| {
            routed(s, Some("db2"), &["db3"])
        })?;
        let log = finish(
            &lab,
            &stop,
            writes,
            killed_at,
            "crash",
            2,
            "promote by command",
        )?;
        assert!(
            log.iter()
                .filter_map(|(_, _, r)| r.as_ref().ok())
                .all(|id| *id == 1 || *id == 2)
        );
        stop_reads.store(true, Ordering::Relaxed);
        let reads = read_log
            .join()
            .map_err(|_| anyhow::anyhow!("read loop panicked"))??;
        let failed: Vec<_> = reads.iter().filter(|(_, r)| r.is_err()).collect();
        let after: Vec<u64> = reads
            .iter()
            .filter(|(t, _)| *t > killed_at)
            .filter_map(|(_, r)| r.as_ref().ok().copied())
            .collect();
        println!(
            "reads through the read VIP during the primary kill: {} reads, {} failed, \
             {} after the kill (server ids {:?})",
            reads.len(),
            failed.len(),
            after.len(),
            after.iter().collect::<BTreeSet<_>>()
        );
        ensure!(
            failed.is_empty(),
            "reads failed during the primary kill: {failed:?}"
        );
        ensure!(
            reads
                .last()
                .is_some_and(|(t, _)| *t > killed_at + 2 * FALL_WINDOW),
            "the read loop did not run through the failover"
        );
        // db3 follows the new primary.
        let pos = lab.db_admin(2, "SELECT @@gtid_binlog_pos")?;
        let waited = lab.db_admin(3, &format!("SELECT MASTER_GTID_WAIT('{}', 5)", pos.trim()))?;
        ensure!(waited.trim() == "0", "db3 does not replicate from db2");

        // 2. A planned switchover to db3: a connection held on the write
        //    service (pinned to db2) is cut at once, and its write lands
        //    nowhere.
        let rt = runtime()?;
        let mut held = in_netns(&lab.client_ns(), || {
            rt.block_on(Conn::new(app_opts(write_vip())))
        })??;
        let id: Option<u64> = rt.block_on(held.query_first("SELECT @@server_id"))?;
        ensure!(id == Some(2), "held connection on {id:?}");
        let msg = promote(&lab, "db3", false)?;
        println!("lb db promote db db3 (db2 alive): {msg}");
        wait_for_status(&lab, "db3 writes", Duration::from_secs(2), |s| {
            routed(s, Some("db3"), &["db2"])
        })?;
        let late = rt.block_on(async {
            tokio::time::timeout(
                Duration::from_secs(2),
                held.exec_drop(
                    format!("INSERT INTO {VISITS_TABLE} (seq, writer, server_id) VALUES (1, 'held', @@server_id)"),
                    (),
                ),
            )
            .await
        });
        println!("write on the connection pinned to the old primary after the switch: {late:?}");
        match late {
            Err(_) => {}
            Ok(Err(e)) if !e.to_string().contains("1290") => {}
            other => bail!("the old primary's flow was not dropped: {other:?}"),
        }
        drop(held);
        for n in [2, 3] {
            ensure!(
                seqs_on(&lab, n, "held")?.is_empty(),
                "the held connection's write reached db{n}"
            );
        }

        // 3. The old primary comes back writable: it gets no writes and the
        //    agent sets it read-only.
        lab.start_db(1)?;
        let rows_before = seqs_on(&lab, 1, "crash")?.len();
        wait_for_status(&lab, "db1 refused", Duration::from_secs(5), |s| {
            pool(s).is_ok_and(|p| {
                p.conflicts >= 1
                    && p.writer.as_deref() == Some("db3")
                    && p.members
                        .iter()
                        .any(|m| m.name == "db1" && m.read_only == Some(true))
            })
        })?;
        let db1_ro = lab.db_admin(1, "SELECT @@global.read_only")?;
        ensure!(db1_ro.trim() == "1", "db1 still writable");
        println!("db1 came back writable: refused as a second writer, set read-only by the agent");
        // Without auto-rejoin it stays out. A write straight on db1 (as
        // its root) gives it a transaction no other member has: errant.
        let errant = lab
            .db_admin(
                1,
                &format!(
                    "SET GLOBAL read_only = 0; INSERT INTO {VISITS_TABLE} (seq, writer, server_id) \
                     VALUES (1, 'errant', @@server_id); SET GLOBAL read_only = 1; \
                     SELECT @@global.gtid_binlog_pos"
                ),
            )?
            .trim()
            .to_owned();
        let p = pool(&status(&lab)?)?;
        ensure!(
            p.readers == ["db2"] && p.members.iter().all(|m| m.rejoin.is_none()),
            "db1 rejoined without auto-rejoin: {p:?}"
        );

        // 4. Automatic failover and rejoin: the pool opts in (reload);
        //    db1 is checked and kept out, naming its errant GTID; db3
        //    crashes.
        let auto = format!("{}auto-rejoin = true\n", config(&lab, Some("1s")));
        std::fs::write(lab.run_dir().join("lb.toml"), auto)?;
        let r = ask(&lab, &Request::Reload)?;
        ensure!(r.ok, "reload: {}", r.message);
        let errant_seen = |s: &Status| {
            pool(s).is_ok_and(|p| {
                p.members
                    .iter()
                    .any(|m| m.name == "db1" && m.errant_gtids.as_deref() == Some(errant.as_str()))
            })
        };
        let took = wait_for_status(
            &lab,
            "db1 kept out as errant",
            Duration::from_secs(5),
            errant_seen,
        )?;
        let s = status(&lab)?;
        println!(
            "auto-rejoin found db1's errant transaction {errant} after {took:?}:\n{}",
            lb_userspace::db::render(&s.pools)
        );
        let metrics = lb_userspace::metrics::render::render(&s, &Default::default());
        let line =
            format!("lb_db_member_errant_gtids{{pool=\"db\",member=\"db1\",gtids=\"{errant}\"}} 1");
        ensure!(
            metrics.contains(&line),
            "{line} not in the metrics:\n{metrics}"
        );
        ensure!(
            pool(&s)?.readers == ["db2"] && lab.db_admin(1, "SHOW SLAVE STATUS")?.trim().is_empty(),
            "the errant db1 was let in"
        );
        wait_for_status(
            &lab,
            "still db3 after reload",
            Duration::from_secs(3),
            |s| {
                pool(s).is_ok_and(|p| {
                    p.writer.as_deref() == Some("db3") && p.auto_failover_ms == Some(1000)
                })
            },
        )?;
        let stop = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let writes = write_loop(&lab, "auto", Arc::clone(&stop));
        thread::sleep(Duration::from_millis(1500));
        let killed_at = started.elapsed();
        lab.kill_db(3)?;
        let took = wait_for_status(
            &lab,
            "automatic failover to db2",
            Duration::from_secs(10),
            |s| pool(s).is_ok_and(|p| p.writer.as_deref() == Some("db2")),
        )?;
        println!("db3 killed: automatic failover routed writes to db2 after {took:?}");
        let log = finish(
            &lab,
            &stop,
            writes,
            killed_at,
            "auto",
            2,
            "automatic failover (auto-failover = 1s)",
        )?;
        // db1 (read-only, fenced) acknowledged none of them. It may hold
        // them by replication: the failover re-pointed it at db2 by GTID.
        ensure!(
            log.iter()
                .all(|(_, _, r)| r.as_ref().map_or(true, |id| *id != 1)),
            "db1 acknowledged writes: {log:?}"
        );
        ensure!(
            seqs_on(&lab, 1, "crash")?.len() >= rows_before,
            "db1 lost rows"
        );
        wait_for_status(
            &lab,
            "db1 still kept out against db2",
            Duration::from_secs(5),
            errant_seen,
        )?;

        // 5. db3, the crashed primary, comes back: a subset of db2's
        //    history, it rejoins as db2's replica and serves reads. (Had
        //    its last transaction reached its binlog but no replica before
        //    the SIGKILL, it is errant instead: kept out and named.)
        let back = Instant::now();
        lab.start_db(3)?;
        let state_of = |n: usize| -> Result<String> {
            Ok(lab
                .db_admin(n, "SELECT @@global.gtid_binlog_state")?
                .trim()
                .to_owned())
        };
        let own = state_of(3)?
            .split(',')
            .find(|g| g.starts_with("0-3-"))
            .map(str::to_owned);
        let on_db2 = state_of(2)?;
        let lost = own.as_ref().is_some_and(|g| {
            let seq = |g: &str| g.rsplit('-').next().and_then(|n| n.parse::<u64>().ok());
            let theirs = on_db2.split(',').find(|x| x.starts_with("0-3-"));
            theirs.and_then(seq) < seq(g)
        });
        if lost {
            let want = own.clone().unwrap_or_default();
            wait_for_status(
                &lab,
                "db3 kept out as errant",
                Duration::from_secs(10),
                |s| {
                    pool(s).is_ok_and(|p| {
                        p.members.iter().any(|m| {
                            m.name == "db3" && m.errant_gtids.as_deref() == Some(want.as_str())
                        })
                    })
                },
            )?;
            println!("db3 came back holding {want}, which never reached db2: kept out (errant)");
        } else {
            wait_for_status(
                &lab,
                "db3 rejoined and reading",
                Duration::from_secs(15),
                |s| routed(s, Some("db2"), &["db3"]),
            )?;
            println!(
                "db3 came back (its history a subset of db2's): a reader again {:?} after its restart",
                back.elapsed()
            );
            writes_land_on(&lab, 50..=55, 2)?;
            let pos = lab.db_admin(2, "SELECT @@gtid_binlog_pos")?;
            let waited =
                lab.db_admin(3, &format!("SELECT MASTER_GTID_WAIT('{}', 5)", pos.trim()))?;
            ensure!(waited.trim() == "0", "db3 does not replicate from db2");
        }
        let p = pool(&status(&lab)?)?;
        println!("{}", lb_userspace::db::render(&[p]));
        Ok(())
    };
    run().with_context(|| format!("agent stderr:\n{}", agent.log_text()))
}

#[test]
fn bad_credentials_a_member_that_is_not_mysql_and_no_primary_are_reported() -> Result<()> {
    let lab = lab_with_databases()?;
    let dir = run_dir(lab.prefix());
    let good = config(&lab, None);
    let health = "health = { check = \"mysql\", user = \"lb\", password = \"wrong\", interval = \"500ms\", timeout = \"500ms\", rise = 2, fall = 2 }";
    let cfg = format!(
        "{good}\n[[pool]]\nname = \"badpw\"\nwrite-vip = \"198.18.0.30:3306\"\nread-vip = \"198.18.0.31:3306\"\n{health}\n\
         members = [ {{ name = \"db1\", address = \"198.19.1.21:3306\" }} ]\n\
         \n[[pool]]\nname = \"notdb\"\nwrite-vip = \"198.18.0.32:3306\"\nread-vip = \"198.18.0.33:3306\"\n{}\n\
         members = [ {{ name = \"web1\", address = \"198.19.0.11:80\" }} ]\n\
         \n[[pool]]\nname = \"nowriter\"\nwrite-vip = \"198.18.0.34:3306\"\nread-vip = \"198.18.0.35:3306\"\n{}\n\
         members = [ {{ name = \"db2\", address = \"198.19.1.22:3306\" }}, {{ name = \"db3\", address = \"198.19.1.23:3306\" }} ]\n",
        health.replace(
            "password = \"wrong\"",
            &format!("password-file = \"{}\"", dir.join("db-password").display())
        ),
        health.replace(
            "password = \"wrong\"",
            &format!("password-file = \"{}\"", dir.join("db-password").display())
        ),
    );
    let agent = lab.start_agent(&cfg)?;
    let check = || -> Result<()> {
        let find = |s: &Status, name: &str| s.pools.iter().find(|p| p.name == name).cloned();
        wait_for_status(&lab, "every pool judged", Duration::from_secs(10), |s| {
            ["badpw", "notdb", "nowriter"].iter().all(|n| {
                find(s, n).is_some_and(|p| p.members.iter().all(|m| m.last_check.is_some()))
            }) && routed(s, Some("db1"), &["db2", "db3"])
        })?;
        let s = status(&lab)?;
        let badpw = find(&s, "badpw").context("badpw")?;
        let why = badpw.members[0].last_check.clone().unwrap_or_default();
        println!("wrong password: {why}");
        assert!(why.contains("Access denied"), "{why}");
        assert_eq!(badpw.writer, None);
        let notdb = find(&s, "notdb").context("notdb")?;
        let why = notdb.members[0].last_check.clone().unwrap_or_default();
        println!("member that is not MySQL: {why}");
        assert!(why.contains("not a MySQL server?"), "{why}");
        assert_eq!(notdb.members[0].role, Role::Unknown);
        let nowriter = find(&s, "nowriter").context("nowriter")?;
        println!(
            "pool with no primary: writer {:?}, readers {:?}",
            nowriter.writer, nowriter.readers
        );
        assert_eq!(nowriter.writer, None);
        assert_eq!(nowriter.readers, ["db2", "db3"]);
        let write_service = s
            .services
            .iter()
            .find(|x| x.name == "nowriter-write")
            .context("nowriter-write")?;
        assert!(write_service.backends.iter().all(|b| !b.in_ring));

        // Promotions that must be refused, with the reason.
        for (pool, member, want) in [
            ("nope", "db2", "no pool named \"nope\""),
            ("db", "db9", "pool db has no member \"db9\""),
            ("db", "db1", "db1 is already the primary"),
            ("notdb", "web1", "web1 is not up"),
        ] {
            let r = ask(
                &lab,
                &Request::Db(DbCommand::Promote {
                    pool: pool.into(),
                    member: member.into(),
                    force: false,
                }),
            )?;
            println!("lb db promote {pool} {member}: {}", r.message);
            assert!(!r.ok && r.message.contains(want), "{}", r.message);
        }
        // A replica whose replication is stopped is refused (stale data).
        lab.db_admin(3, "STOP SLAVE")?;
        wait_for_status(&lab, "db3 out of reads", FALL_WINDOW * 2, |s| {
            routed(s, Some("db1"), &["db2"])
        })?;
        let r = ask_promote(&lab, "db3", false)?;
        println!("lb db promote db db3 (replication stopped): {}", r.message);
        assert!(
            !r.ok && r.message.contains("replication is stopped"),
            "{}",
            r.message
        );
        let p = pool(&status(&lab)?)?;
        assert_eq!(
            p.writer.as_deref(),
            Some("db1"),
            "refused promotion changed nothing"
        );
        assert_eq!(lab.db_admin(1, "SELECT @@global.read_only")?.trim(), "0");
        // Still alive and answering.
        status(&lab)?;
        Ok(())
    };
    check().with_context(|| format!("agent stderr:\n{}", agent.log_text()))
}

/// `[coordination]` with one LB and a real three-member etcd (in the LB's
/// namespace): the LB leads the pool and records db1; db1 crashes under a
/// write loop → the automatic failover promotes a replica and records it (a newer
/// revision), every acknowledged write is on it. Then etcd goes away: the
/// LB keeps routing writes to the recorded primary, refuses `lb db promote`
/// (it cannot hold the lease), and when that one dies too it routes writes to
/// nobody and promotes nobody.
#[test]
fn coordinated_failover_records_the_primary_and_an_lb_cut_off_from_etcd_never_promotes()
-> Result<()> {
    use lb_userspace::harness::etcd::{EtcdCluster, Member};
    let mut lab = lab_with_databases()?;
    let members: Vec<Member> = (11..=13)
        .map(|n| Member {
            ns: lab.lb_ns(),
            ip: std::net::Ipv4Addr::new(127, 0, 0, n),
        })
        .collect();
    let etcd_dir = run_dir(lab.prefix()).join("etcd");
    let mut cluster = Some(EtcdCluster::start(lab.prefix(), members, &etcd_dir)?);
    let endpoints = cluster
        .as_ref()
        .map(|c| c.endpoints())
        .unwrap_or_default()
        .iter()
        .map(|e| format!("\"{e}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let cfg = format!(
        "{}\n[coordination]\netcd = [{endpoints}]\nname = \"lb1\"\nlease-ttl = \"2s\"\n",
        config(&lab, Some("1s"))
    );
    let agent = lab.start_agent(&cfg)?;
    let mut run = || -> Result<()> {
        let coordination = |s: &Status| pool(s).ok().and_then(|p| p.coordination);
        wait_for_status(
            &lab,
            "lb1 leads and recorded db1",
            Duration::from_secs(10),
            |s| {
                coordination(s)
                    .is_some_and(|c| c.leading && c.recorded_primary.as_deref() == Some("db1"))
                    && routed(s, Some("db1"), &["db2", "db3"])
            },
        )?;
        let before = coordination(&status(&lab)?).context("coordination")?;
        println!("coordination before the crash: {before:?}");

        let stop = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let writes = write_loop(&lab, "coord", Arc::clone(&stop));
        thread::sleep(Duration::from_millis(1500));
        let killed_at = started.elapsed();
        lab.kill_db(1)?;
        // db2 or db3: whichever holds the most complete history (with
        // semi-sync, the last event may have reached one replica only).
        let took = wait_for_status(
            &lab,
            "a new primary recorded and routed",
            Duration::from_secs(15),
            |s| {
                coordination(s).is_some_and(|c| {
                    c.recorded_primary.as_deref().is_some_and(|p| p != "db1")
                        && c.revision > before.revision
                        && pool(s).is_ok_and(|p| p.writer == c.recorded_primary)
                })
            },
        )?;
        let new = coordination(&status(&lab)?)
            .and_then(|c| c.recorded_primary)
            .context("recorded primary")?;
        let (new_n, other_n) = if new == "db2" { (2, 3) } else { (3, 2) };
        println!("db1 killed: {new} recorded in etcd and routed after {took:?}");
        finish(
            &lab,
            &stop,
            writes,
            killed_at,
            "coord",
            new_n,
            "automatic failover with [coordination] (auto-failover = 1s, lease-ttl = 2s)",
        )?;

        // etcd goes away: the record stays, writes still go to it.
        drop(cluster.take());
        wait_for_status(&lab, "etcd seen unreachable", Duration::from_secs(5), |s| {
            coordination(s).is_some_and(|c| c.etcd_error.is_some() && !c.leading)
        })?;
        let s = status(&lab)?;
        let other = format!("db{other_n}");
        ensure!(
            routed(&s, Some(&new), &[other.as_str()]),
            "cut off from etcd, writes left {new}: {:?}",
            pool(&s)
        );
        let r = ask_promote(&lab, &other, false)?;
        println!("lb db promote db {other} without etcd: {}", r.message);
        refused_with(&r, &["does not hold pool db's lease", "etcd unreachable"])?;
        // The new primary dies too: nobody gets writes, nobody is promoted.
        lab.kill_db(new_n)?;
        wait_for_status(&lab, "no writer once it is down", FALL_WINDOW * 2, |s| {
            pool(s).is_ok_and(|p| p.writer.is_none())
        })?;
        thread::sleep(Duration::from_secs(3));
        let s = status(&lab)?;
        let p = pool(&s)?;
        ensure!(p.writer.is_none(), "writes routed to {:?}", p.writer);
        ensure!(
            lab.db_admin(other_n, "SELECT @@read_only")?.trim() == "1",
            "{other} was promoted by an LB that could not reach etcd"
        );
        println!("without etcd, {new} dead: writes to nobody, {other} still read-only");
        Ok(())
    };
    let result = run();
    drop(agent);
    drop(cluster);
    result
}

/// lb2's status (its own control socket).
fn status_of_lb2(lab: &Lab) -> Result<Status> {
    checked_status_at(&lab.agent_socket_of(2))
}

fn wait_for_lb2(
    lab: &Lab,
    what: &str,
    within: Duration,
    ok: impl Fn(&Status) -> bool,
) -> Result<Duration> {
    wait_for_status_at(&lab.agent_socket_of(2), &format!("lb2: {what}"), within, ok)
}

/// The lease TTL of the two-LB scenarios.
const TTL: Duration = Duration::from_secs(2);

/// The pool's coordination as an LB's status shows it.
fn coord(s: &Status) -> Option<lb_userspace::db::CoordStatus> {
    pool(s).ok().and_then(|p| p.coordination)
}

/// Two LBs running the lab's pool with `[coordination]` (lease-ttl 2s,
/// auto-failover 1s) over one three-member etcd on the back switch's
/// bridge (next to both LBs and the databases): lb1 in the lab's LB
/// namespace, lb2 added by [`Lab::add_pool_lb`]. Dropped in field order:
/// the agents, then etcd.
struct TwoLbs {
    agent1: Option<AgentProcess>,
    agent2: Option<AgentProcess>,
    _cluster: lb_userspace::harness::etcd::EtcdCluster,
}

/// Starts [`TwoLbs`] and waits until lb1 leads and recorded db1 and lb2
/// follows that record.
fn two_coordinated_lbs(lab: &Lab) -> Result<TwoLbs> {
    use lb_userspace::harness::{
        etcd::{EtcdCluster, Member},
        netns,
    };
    lab.add_pool_lb(2)?;
    let sw = lab.sw_ns();
    let members: Vec<Member> = (11..=13)
        .map(|n| Member {
            ns: sw.clone(),
            ip: std::net::Ipv4Addr::new(198, 19, 1, n),
        })
        .collect();
    for m in &members {
        netns::add_addr(&sw, "br0", &format!("{}/24", m.ip))?;
    }
    let etcd_dir = run_dir(lab.prefix()).join("etcd");
    let cluster = EtcdCluster::start(lab.prefix(), members, &etcd_dir)?;
    let endpoints = cluster
        .endpoints()
        .iter()
        .map(|e| format!("\"{e}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let coordination = |name: &str| {
        format!(
            "\n[coordination]\netcd = [{endpoints}]\nname = \"{name}\"\nlease-ttl = \"{}s\"\n",
            TTL.as_secs()
        )
    };
    let cfg1 = format!("{}{}", config(lab, Some("1s")), coordination("lb1"));
    let cfg2 = format!(
        "[dataplane]\ninterfaces = [\"lb-front\", \"lb-back\"]\nforwarding = \"nat\"\n{}{}",
        pool_config(&run_dir(lab.prefix()), Some("1s")),
        coordination("lb2")
    );
    let mut lbs = TwoLbs {
        agent1: Some(lab.start_agent(&cfg1)?),
        agent2: None,
        _cluster: cluster,
    };
    wait_for_status(
        lab,
        "lb1 leads and recorded db1",
        Duration::from_secs(10),
        |s| {
            coord(s).is_some_and(|c| c.leading && c.recorded_primary.as_deref() == Some("db1"))
                && routed(s, Some("db1"), &["db2", "db3"])
        },
    )?;
    lbs.agent2 = Some(lab.start_agent_on(2, &cfg2)?);
    wait_for_lb2(
        lab,
        "follows lb1's record of db1",
        Duration::from_secs(10),
        |s| {
            coord(s).is_some_and(|c| {
                !c.leading
                    && c.leader.as_deref() == Some("lb1")
                    && c.recorded_primary.as_deref() == Some("db1")
            }) && pool(s).is_ok_and(|p| p.writer.as_deref() == Some("db1"))
        },
    )?;
    Ok(lbs)
}

/// [`TwoLbs`]: two agents with `[coordination]` run the same pool over the
/// same MariaDB members and one three-member etcd, each carrying a client's
/// write loop through its write VIP: lb1 in the lab's LB namespace (the
/// lab's client), lb2 added by [`Lab::add_pool_lb`] (its own client, its
/// NAT replies routed back through it). lb1 leads. db2 stops receiving,
/// so the last events before db1 is SIGKILLed reach db3 only → exactly
/// one promotion, by the leader (lb1's log has it, lb2's has no failover
/// at all), of db3, the most complete replica (not db2, the first in the
/// list); db2 follows db3; exactly one replica became writable; both
/// agents show the same new primary and revision and route writes to it;
/// every acknowledged write of both loops is on it, none was refused as
/// read-only. lb2 is then cut off from etcd and the new primary dies: lb1
/// alone promotes the last replica and records it, lb2 keeps the old
/// record, routes writes to nobody and promotes nobody; healed, it follows
/// the newer record. Then lb1's agent is SIGKILLed (lease not revoked):
/// lb2 takes the lease within TTL + 3 ticks and keeps the same record.
#[test]
fn two_agents_promote_once_and_the_survivor_takes_the_lease() -> Result<()> {
    use lb_userspace::harness::netns;
    let mut lab = lab_with_databases()?;
    let mut lbs = two_coordinated_lbs(&lab)?;
    let mut run = || -> Result<()> {
        let before = coord(&status(&lab)?).context("lb1 coordination")?;

        let stop = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let writes = write_loop(&lab, "two", Arc::clone(&stop));
        let writes2 = write_loop_from(lab.pool_client_ns(2), "two-lb2", Arc::clone(&stop));
        thread::sleep(Duration::from_millis(1500));
        // db2 stops receiving: the last events before the crash reach db3
        // only (semi-sync acknowledges them from it).
        lab.db_admin(2, "STOP SLAVE IO_THREAD")?;
        thread::sleep(Duration::from_millis(300));
        let killed_at = started.elapsed();
        lab.kill_db(1)?;
        // A write started before db1 was gone may still have been db1's.
        let dead_at = started.elapsed();
        let new_recorded = |s: &Status| {
            coord(s).is_some_and(|c| {
                c.recorded_primary.as_deref().is_some_and(|p| p != "db1")
                    && c.revision > before.revision
                    && pool(s).is_ok_and(|p| p.writer == c.recorded_primary)
            })
        };
        let took1 = wait_for_status(
            &lab,
            "lb1: a new primary recorded and routed",
            Duration::from_secs(15),
            new_recorded,
        )?;
        let took2 = wait_for_lb2(
            &lab,
            "the new record read and followed",
            Duration::from_secs(5),
            new_recorded,
        )? + took1;
        let c1 = coord(&status(&lab)?).context("lb1 coordination")?;
        let c2 = coord(&status_of_lb2(&lab)?).context("lb2 coordination")?;
        ensure!(
            c1.recorded_primary == c2.recorded_primary && c1.revision == c2.revision,
            "the LBs disagree: lb1 {c1:?}, lb2 {c2:?}"
        );
        let new = c1.recorded_primary.clone().context("recorded primary")?;
        println!(
            "two LBs, db1 killed: {new} (revision {:?}) recorded and routed by the leader lb1 after {took1:?}, \
             followed by lb2 after {took2:?}",
            c1.revision
        );
        ensure!(
            new == "db3",
            "the failover promoted {new}, not db3 (the only replica holding db1's last events)"
        );
        let (new_n, other_n) = (3, 2);
        let log1 = finish(
            &lab,
            &stop,
            writes,
            killed_at,
            "two",
            new_n,
            "two LBs with [coordination], writes through lb1 (auto-failover = 1s, lease-ttl = 2s)",
        )?;
        let log2 = check_writes(
            &lab,
            joined(writes2)?,
            killed_at,
            "two-lb2",
            new_n,
            "two LBs with [coordination], writes through lb2 (auto-failover = 1s, lease-ttl = 2s)",
        )?;
        for (lb, log) in [("lb1", &log1), ("lb2", &log2)] {
            let after: BTreeSet<u64> = log
                .iter()
                .filter(|(t, _, _)| *t > dead_at)
                .filter_map(|(_, _, r)| r.as_ref().ok().copied())
                .collect();
            ensure!(
                after == BTreeSet::from([3]),
                "writes through {lb} started after db1 was gone acknowledged by server ids {after:?}, not db3 alone"
            );
        }
        // db2 (which had received less) follows db3 and gets what it lacked.
        let pos = lab.db_admin(3, "SELECT @@gtid_binlog_pos")?;
        let waited = lab.db_admin(2, &format!("SELECT MASTER_GTID_WAIT('{}', 10)", pos.trim()))?;
        ensure!(waited.trim() == "0", "db2 does not replicate from db3");
        for tag in ["two", "two-lb2"] {
            ensure!(
                seqs_on(&lab, 2, tag)? == seqs_on(&lab, 3, tag)?,
                "db2 lacks {tag} rows db3 holds"
            );
        }
        println!("db2 follows db3: it holds every row of both loops");
        // Exactly one promotion: the leader's.
        let log1 = lbs.agent1.as_ref().context("lb1")?.log_text();
        let log2 = lbs.agent2.as_ref().context("lb2")?.log_text();
        let promotions = log1.matches("(automatic failover, ").count();
        ensure!(promotions == 1, "lb1 promoted {promotions} times:\n{log1}");
        ensure!(
            !log2.contains("automatic failover"),
            "lb2 (not leading) started a failover:\n{log2}"
        );
        ensure!(
            lab.db_admin(other_n, "SELECT @@read_only")?.trim() == "1",
            "db{other_n} is writable too"
        );

        // lb2 is cut off from etcd (blackhole routes to the members): it
        // keeps the record; the new primary dies; the leader lb1 promotes
        // the last replica and records it, while lb2 promotes nobody and
        // routes writes to nobody. Healed, lb2 follows the newer record.
        let etcd_ips = ["198.19.1.11", "198.19.1.12", "198.19.1.13"];
        let lb2_ns = lab.lb_ns_of(2);
        for ip in etcd_ips {
            netns::ns_run(&lb2_ns, &["ip", "route", "add", "blackhole", ip])?;
        }
        wait_for_lb2(
            &lab,
            "sees etcd unreachable",
            Duration::from_secs(10),
            |s| coord(s).is_some_and(|c| c.etcd_error.is_some() && !c.leading),
        )?;
        lab.kill_db(new_n)?;
        let other = format!("db{other_n}");
        let took = wait_for_status(
            &lab,
            "lb1 records the last replica",
            Duration::from_secs(15),
            |s| {
                coord(s).is_some_and(|c| {
                    c.recorded_primary.as_deref() == Some(other.as_str())
                        && c.revision > c1.revision
                }) && pool(s).is_ok_and(|p| p.writer.as_deref() == Some(other.as_str()))
            },
        )?;
        wait_for_lb2(&lab, "routes writes to nobody", FALL_WINDOW * 2, |s| {
            pool(s).is_ok_and(|p| p.writer.is_none())
                && coord(s).is_some_and(|c| c.recorded_primary.as_deref() == Some(new.as_str()))
        })?;
        ensure!(
            !lbs.agent2
                .as_ref()
                .context("lb2")?
                .log_text()
                .contains("automatic failover"),
            "lb2, cut off from etcd, started a failover"
        );
        println!(
            "lb2 cut off from etcd, {new} killed: lb1 recorded and routed {other} after {took:?}; \
             lb2 kept the record of {new}, routes writes to nobody, promoted nobody"
        );
        for ip in etcd_ips {
            netns::ns_run(&lb2_ns, &["ip", "route", "del", "blackhole", ip])?;
        }
        let c1 = coord(&status(&lab)?).context("lb1 coordination")?;
        let healed = wait_for_lb2(
            &lab,
            "follows the newer record",
            Duration::from_secs(10),
            |s| {
                coord(s).is_some_and(|c| {
                    c.etcd_error.is_none()
                        && c.recorded_primary == c1.recorded_primary
                        && c.revision == c1.revision
                }) && pool(s).is_ok_and(|p| p.writer.as_deref() == Some(other.as_str()))
            },
        )?;
        println!(
            "healed: lb2 follows {other} (revision {:?}) after {healed:?}",
            c1.revision
        );
        let new = other;

        // The leader's agent dies (SIGKILL: its lease is not revoked).
        lbs.agent1.take().context("lb1")?.kill()?;
        let took = wait_for_lb2(&lab, "takes the lease", TTL * 4, |s| {
            coord(s).is_some_and(|c| c.leading)
        })?;
        let s2 = status_of_lb2(&lab)?;
        let c2 = coord(&s2).context("lb2 coordination")?;
        println!(
            "leader lb1 SIGKILLed: lb2 leads after {:?} (bound TTL + 3 ticks = {:?}); record {:?} revision {:?}",
            took,
            TTL + lb_userspace::coord::tick(TTL) * 3,
            c2.recorded_primary,
            c2.revision
        );
        ensure!(
            took <= TTL + lb_userspace::coord::tick(TTL) * 3,
            "lb2 took the lease after {took:?}"
        );
        ensure!(
            c2.recorded_primary.as_deref() == Some(new.as_str()) && c2.revision == c1.revision,
            "the new leader changed the record: {c2:?}"
        );
        ensure!(
            pool(&s2).is_ok_and(|p| p.writer.as_deref() == Some(new.as_str())),
            "lb2 routes writes elsewhere: {:?}",
            pool(&s2)
        );
        Ok(())
    };
    let result = run();
    drop(lbs);
    result
}

/// The received (IO thread) GTID position of replica `n`: the
/// `Gtid_IO_Pos` column of `SHOW SLAVE STATUS` (named by the header row).
fn received(lab: &Lab, n: usize) -> Result<String> {
    let out = std::process::Command::new("mariadb")
        .args(["--no-defaults", "-uroot", "-B"])
        .arg(format!("--socket={}", lab.db_socket(n).display()))
        .args(["-e", "SHOW SLAVE STATUS"])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    let (head, row) = (lines.next().unwrap_or(""), lines.next().unwrap_or(""));
    head.split('\t')
        .zip(row.split('\t'))
        .find(|(k, _)| *k == "Gtid_IO_Pos")
        .map(|(_, v)| v.trim().to_owned())
        .with_context(|| format!("no Gtid_IO_Pos on db{n}: {text}"))
}

/// [`TwoLbs`]; the leader's promotion is caught in its middle and its
/// agent SIGKILLed there. db2 and db3 each hold `LOCK TABLES app.visits
/// WRITE` in a root session, so their SQL threads wait while their IO
/// threads keep receiving (semi-sync still acknowledges): db1 commits 10
/// writes through lb1 that both replicas received and neither applied,
/// then db1 is SIGKILLed. lb1, the leader, starts the automatic failover
/// (its log says so) and waits in the promotion's catch-up step for its
/// candidate to apply what it received; there, with the candidate still
/// read-only and etcd still recording db1, lb1's agent is SIGKILLed and
/// the locks are released. lb2 takes the lease and redoes the promotion:
/// it records a new primary and routes writes to it; the pool ends with
/// exactly one writable member, which holds the 10 writes; the other
/// replicates from it; a write through lb2 lands on it.
#[test]
fn a_leader_killed_in_the_middle_of_a_promotion_leaves_it_to_the_other_lb() -> Result<()> {
    let mut lab = lab_with_databases()?;
    let mut lbs = two_coordinated_lbs(&lab)?;
    let mut run = || -> Result<()> {
        let locks = [
            lab.lock_table(2, VISITS_TABLE)?,
            lab.lock_table(3, VISITS_TABLE)?,
        ];
        writes_land_on(&lab, 1..=10, 1)?;
        let pos = lab
            .db_admin(1, "SELECT @@gtid_binlog_pos")?
            .trim()
            .to_owned();
        let deadline = Instant::now() + Duration::from_secs(5);
        while received(&lab, 2)? != pos || received(&lab, 3)? != pos {
            ensure!(Instant::now() < deadline, "db2/db3 did not receive {pos}");
            thread::sleep(Duration::from_millis(50));
        }
        for n in [2, 3] {
            let applied = lab.db_admin(n, "SELECT @@global.gtid_slave_pos")?;
            ensure!(
                applied.trim() != pos,
                "db{n} applied {pos} despite the lock"
            );
        }
        lab.kill_db(1)?;
        let killed = Instant::now();
        let agent1 = lbs.agent1.take().context("lb1")?;
        let start_line = "automatic failover to ";
        let deadline = killed + Duration::from_secs(10);
        let candidate = loop {
            let log = agent1.log_text();
            if let Some(rest) = log.split(start_line).nth(1) {
                break rest
                    .split(|c: char| !c.is_ascii_alphanumeric())
                    .next()
                    .unwrap_or_default()
                    .to_owned();
            }
            ensure!(
                Instant::now() < deadline,
                "lb1 did not start a failover:\n{log}"
            );
            thread::sleep(Duration::from_millis(20));
        };
        let started = killed.elapsed();
        // Still in the middle: not failed, not done, nothing recorded.
        let log = agent1.log_text();
        ensure!(
            !log.contains("automatic failover of pool db")
                && !log.contains("is the primary of pool db"),
            "lb1's promotion already ended:\n{log}"
        );
        let cand_n: usize = candidate
            .strip_prefix("db")
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("candidate {candidate:?}"))?;
        ensure!(
            lab.db_admin(cand_n, "SELECT @@global.read_only")?.trim() == "1",
            "{candidate} is writable already"
        );
        ensure!(
            coord(&status(&lab)?)
                .is_some_and(|c| c.leading && c.recorded_primary.as_deref() == Some("db1")),
            "lb1 recorded a new primary already"
        );
        agent1.kill()?;
        println!(
            "db1 killed; lb1 started the failover to {candidate} after {started:?}, waited in its catch-up step, \
             and was SIGKILLed there ({:?} after the crash)",
            killed.elapsed()
        );
        drop(locks);
        let took = wait_for_lb2(
            &lab,
            "leads, recorded a new primary and routes writes to it",
            Duration::from_secs(20),
            |s| {
                coord(s).is_some_and(|c| {
                    c.leading
                        && c.recorded_primary.as_deref().is_some_and(|p| p != "db1")
                        && pool(s).is_ok_and(|p| p.writer == c.recorded_primary)
                })
            },
        )?;
        let s2 = status_of_lb2(&lab)?;
        let new = coord(&s2)
            .and_then(|c| c.recorded_primary)
            .context("recorded primary")?;
        println!(
            "lb2 took over and finished the failover: {new} recorded and routed {took:?} after lb1's kill"
        );
        let log2 = lbs.agent2.as_ref().context("lb2")?.log_text();
        let promotions = log2.matches("(automatic failover, ").count();
        ensure!(promotions == 1, "lb2 promoted {promotions} times:\n{log2}");
        let writable: Vec<usize> = [2, 3]
            .into_iter()
            .filter(|n| {
                lab.db_admin(*n, "SELECT @@global.read_only")
                    .is_ok_and(|r| r.trim() == "0")
            })
            .collect();
        let new_n = if new == "db2" { 2 } else { 3 };
        ensure!(
            writable == [new_n],
            "writable members {writable:?}, recorded {new}"
        );
        ensure!(
            seqs_on(&lab, new_n, "basic")? == (1..=10).collect(),
            "{new} lacks acknowledged writes"
        );
        let other_n = 5 - new_n;
        let pos = lab.db_admin(new_n, "SELECT @@gtid_binlog_pos")?;
        let waited = lab.db_admin(
            other_n,
            &format!("SELECT MASTER_GTID_WAIT('{}', 10)", pos.trim()),
        )?;
        ensure!(
            waited.trim() == "0",
            "db{other_n} does not replicate from {new}"
        );
        let id = from_ns(&lab.pool_client_ns(2), write(11, "basic"))?;
        ensure!(
            id == Ok(u64::try_from(new_n)?),
            "a write through lb2 answered by {id:?}"
        );
        Ok(())
    };
    let result = run();
    drop(lbs);
    result
}
