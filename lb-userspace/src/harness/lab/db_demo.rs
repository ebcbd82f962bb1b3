//! The demo's database act and `lb lab up`'s lines about the databases:
//! writes through the web servers land on the primary, reads spread over
//! the replicas, then the primary crashes and the pool fails over on its
//! own (`auto-failover`), each line saying which web and database answered.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use super::{
    DB_NAMES, Lab, READ_VIP, VIP, WRITE_VIP, db_addr, site_config, site_pool_config, vip_http,
};
use crate::{
    config::Forwarding,
    control::{self, Request, Status},
    db::PoolStatus,
    harness::netns::{self, in_netns},
};

/// The longest the demo waits for the pool to settle or fail over.
const SETTLE: Duration = Duration::from_secs(15);

pub(super) fn print_databases(lab: &Lab) {
    for i in 0..DB_NAMES.len() {
        let role = if i == 0 {
            "primary"
        } else {
            "replica of db1 (GTID, semi-sync)"
        };
        println!(
            "  {}: eth0 {}/24 via {}; MariaDB :3306, {role}; datadir {}",
            lab.db_ns(i + 1),
            db_addr(i + 1),
            super::db::DB_GATEWAY,
            lab.run_dir().join(format!("db{}", i + 1)).display()
        );
    }
    println!(
        "  database pool \"db\": writes {WRITE_VIP}:3306 -> the primary, reads {READ_VIP}:3306 -> the replicas; \
         the webs' /visits use them, and only the webs may connect (allow-from web1..web3)"
    );
}

/// The database act: the problems seen (setup errors are Err).
pub(super) fn demo_databases(lab: &mut Lab) -> anyhow::Result<Vec<String>> {
    println!();
    println!("== database tier: starting db1 (primary), db2 and db3 (replicas)");
    lab.start_databases()?;
    lab.set_mode(Forwarding::Nat)?;
    let config = site_config(Forwarding::Nat) + &site_pool_config(&lab.run_dir(), Some("1s"));
    let agent = lab.start_agent(&config)?;
    let mut problems = Vec::new();
    let pool = wait_for_pool(lab, |p| {
        p.writer.as_deref() == Some("db1") && p.readers == ["db2", "db3"]
    })?;
    println!("{}", crate::db::render(&[pool]));

    println!(
        "== database tier: POST /visits (writes) and GET /visits (reads) through http://{VIP}/"
    );
    let pages = in_netns(&lab.client_ns(), || -> Vec<String> {
        ["POST", "POST", "POST", "GET", "GET", "GET", "GET"]
            .iter()
            .map(|m| visit(m).unwrap_or_else(|e| format!("FAILED: {e:#}")))
            .collect()
    })?;
    for (i, page) in pages.iter().enumerate() {
        println!("{} /visits -> {page}", if i < 3 { "POST" } else { "GET " });
    }
    if !pages[..3].iter().all(|p| p.contains("recorded by db1")) {
        problems.push("database: a write did not land on db1".to_owned());
    }
    for replica in ["db2", "db3"] {
        if !pages[3..]
            .iter()
            .any(|p| p.contains(&format!("read from {replica}")))
        {
            problems.push(format!("database: no read from {replica}"));
        }
    }
    // The database only from the webs: the client itself is refused.
    let direct = in_netns(&lab.client_ns(), || {
        TcpStream::connect_timeout(&super::write_vip(), Duration::from_secs(1))
    })?;
    match direct {
        Err(e) => println!(
            "== database tier: the client connecting to {WRITE_VIP}:3306 itself -> refused ({e}): only the webs may connect"
        ),
        Ok(_) => problems.push(format!(
            "database: the client connected to {WRITE_VIP}:3306 (allow-from the webs only)"
        )),
    }

    println!("== database tier: killing db1 (the primary); auto-failover = 1s");
    let killed = Instant::now();
    lab.kill_db(1)?;
    let mut answered = None;
    while killed.elapsed() < SETTLE && !netns::interrupted() {
        let page = in_netns(&lab.client_ns(), || visit("POST"))?;
        match page {
            Ok(text) if !text.contains("db1") => {
                println!(
                    "POST /visits -> {text}  ({:?} after the crash)",
                    killed.elapsed()
                );
                answered = Some(killed.elapsed());
                break;
            }
            Ok(text) => println!("POST /visits -> {text}"),
            Err(e) => println!("POST /visits -> FAILED: {e:#}"),
        }
        thread::sleep(Duration::from_millis(250));
    }
    match answered {
        Some(t) => println!("-- writes served again {t:?} after the primary crashed"),
        None => problems.push("database: no write succeeded after the failover".to_owned()),
    }
    let pool = wait_for_pool(lab, |p| {
        p.writer.is_some() && p.writer.as_deref() != Some("db1")
    })?;
    println!("{}", crate::db::render(&[pool]));
    let pages = in_netns(&lab.client_ns(), || -> Vec<String> {
        (0..3)
            .map(|_| visit("GET").unwrap_or_else(|e| format!("FAILED: {e:#}")))
            .collect()
    })?;
    for page in &pages {
        println!("GET  /visits -> {page}");
    }
    agent.stop().context("stopping the agent (database act)")?;
    lab.remove_dataplane()?;
    Ok(problems)
}

fn wait_for_pool(lab: &Lab, ok: impl Fn(&PoolStatus) -> bool) -> anyhow::Result<PoolStatus> {
    let deadline = Instant::now() + SETTLE;
    loop {
        let status: Option<Status> =
            control::request(&lab.agent_socket(), &Request::Status)?.status;
        let pool = status.and_then(|s| s.pools.into_iter().find(|p| p.name == "db"));
        if let Some(p) = pool {
            if ok(&p) {
                return Ok(p);
            }
            if Instant::now() > deadline {
                bail!(
                    "the database pool did not settle:\n{}",
                    crate::db::render(&[p])
                );
            }
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// One `/visits` request through the web VIP; the body's line.
fn visit(method: &str) -> anyhow::Result<String> {
    let addr: SocketAddr = vip_http();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "{method} /visits HTTP/1.0\r\nHost: www\r\nContent-Length: 0\r\n\r\n"
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let (head, body) = text.split_once("\r\n\r\n").context("no response head")?;
    let body = body.trim_end().to_owned();
    if !head.starts_with("HTTP/1.1 200") {
        bail!("{}", body);
    }
    Ok(body)
}
