//! End to end, the schedulers operators pick for affinity and load: real
//! TCP connections through the lab (client → lb → web1..3) with the `lb`
//! agent running.
//!
//! - `source-ip` (switched to live from round robin by `lb reload`):
//!   every connection of one client address lands on one
//!   backend, and clients spread over all three — on the very backend the
//!   Maglev table built from the config alone predicts (what a second LB
//!   with the same config would choose);
//! - `least-connections`: a backend holding long-lived connections gets
//!   proportionally fewer new ones.

use std::{collections::BTreeSet, net::Ipv4Addr, thread, time::Duration};

use anyhow::{Context, Result, bail, ensure};
use lb_common::{
    hash::source_hash,
    maglev::{self, MAGLEV_DEFAULT_SIZE, Member},
};
use lb_tests::{answers, count, lb_bin, ok, unique_prefix, wait_for_status, web_config};
use lb_userspace::{
    control::{BackendChange, Request},
    harness::{
        lab::{HttpConn, Lab, http_get_from, vip_http, web_addr},
        netns::{self, in_netns},
    },
};

fn prefix() -> String {
    unique_prefix("sch")
}

const WEBS: [(&str, u32, bool); 3] = [("web1", 1, false), ("web2", 1, false), ("web3", 1, false)];

/// The backend (web number) the `source-ip` table of the lab's config gives
/// `client`: built here from the backends' addresses alone.
fn predicted_web(table: &[u32], client: Ipv4Addr) -> usize {
    let hash = source_hash(u32::from_ne_bytes(client.octets()));
    table[(hash % table.len() as u32) as usize] as usize
}

#[test]
fn source_ip_keeps_each_client_on_one_backend_and_spreads_clients() -> Result<()> {
    let lab = Lab::up(&prefix(), &lb_bin())?;
    // Round robin first, then `source-ip` by `lb reload`: a live change.
    let agent = lab.start_agent(&web_config("round-robin", &WEBS, ""))?;
    let run = || -> Result<()> {
        let rr = answers(&lab, 6)?;
        ensure!(count(&rr).len() == 3, "round robin: {:?}", count(&rr));
        let path = lab.run_dir().join("lb.toml");
        let text = std::fs::read_to_string(&path)?;
        std::fs::write(
            &path,
            text.replace("scheduler = \"round-robin\"", "scheduler = \"source-ip\""),
        )?;
        ok(&lab, Request::Reload)?;
        let status = lb_tests::status(&lab)?;
        ensure!(
            status.services[0].scheduler == lb_userspace::config::Scheduler::SourceIp,
            "after the reload: {:?}",
            status.services[0].scheduler
        );

        // One client, 20 connections: one backend.
        let one = answers(&lab, 20)?;
        let first = one[0].clone();
        ensure!(
            one.iter().all(|w| *w == first),
            "20 connections from one client went to {:?}",
            count(&one)
        );

        // The table a second LB would build from the same config.
        let members: Vec<Member> = (1..=3)
            .map(|n| Member {
                addr: u32::from(web_addr(n)),
                port: 80,
                id: n as u32,
                weight: 1,
            })
            .collect();
        let table = maglev::table(&members, MAGLEV_DEFAULT_SIZE);
        let default_client = lb_userspace::harness::lab::CLIENT_FRONT;
        ensure!(
            first == format!("web{}", predicted_web(&table, default_client)),
            "{default_client} went to {first}, the config's table says web{}",
            predicted_web(&table, default_client)
        );

        // Three more client addresses, one per backend by that table.
        let mut clients = Vec::new();
        let mut covered = BTreeSet::new();
        for host in 100..200u8 {
            let c = Ipv4Addr::new(198, 18, 0, host);
            if covered.insert(predicted_web(&table, c)) {
                clients.push(c);
            }
            if clients.len() == 3 {
                break;
            }
        }
        ensure!(clients.len() == 3, "no three clients cover the backends");
        for c in &clients {
            netns::add_addr(&lab.client_ns(), "eth0", &format!("{c}/24"))?;
            // The LB learns the new address's MAC (as a client's ARP for
            // the VIP would teach it): the replies' next hop.
            lab.exec_ok(
                &lab.client_ns(),
                &[
                    "ping",
                    "-c",
                    "1",
                    "-W",
                    "2",
                    "-I",
                    &c.to_string(),
                    "198.18.0.1",
                ],
            )?;
        }
        let vip = match vip_http() {
            std::net::SocketAddr::V4(v) => v,
            other => bail!("the lab's VIP is {other}"),
        };
        let mut seen = BTreeSet::new();
        for c in &clients {
            let got: Vec<String> = in_netns(&lab.client_ns(), || {
                (0..10)
                    .map(|_| http_get_from(*c, vip, "/").map(|r| r.text()))
                    .collect::<Result<Vec<_>>>()
            })??;
            let want = format!("web{}", predicted_web(&table, *c));
            ensure!(
                got.iter().all(|w| *w == want),
                "client {c}: {:?}, the config's table says {want}",
                count(&got)
            );
            seen.insert(want);
        }
        ensure!(seen.len() == 3, "three clients on {seen:?}");
        Ok(())
    };
    run().with_context(|| format!("agent stderr:\n{}", agent.log_text()))?;
    agent.stop()
}

#[test]
fn least_connections_gives_a_loaded_backend_fewer_new_flows() -> Result<()> {
    let lab = Lab::up(&prefix(), &lb_bin())?;
    let agent = lab.start_agent(&web_config("least-connections", &WEBS, ""))?;
    let drain = |web: &str| {
        Request::Backend(BackendChange::Drain {
            service: "www".into(),
            backend: web.into(),
            wait: false,
            timeout: 0,
        })
    };
    let enable = |web: &str| {
        Request::Backend(BackendChange::Enable {
            service: "www".into(),
            backend: web.into(),
        })
    };
    let run = || -> Result<()> {
        // web1 alone takes 12 long-lived connections.
        ok(&lab, drain("web2"))?;
        ok(&lab, drain("web3"))?;
        let held: Vec<HttpConn> = in_netns(&lab.client_ns(), || {
            (0..12)
                .map(|_| {
                    let mut conn = HttpConn::connect(vip_http())?;
                    let who = conn.get("/")?.text();
                    ensure!(who == "web1", "a held connection went to {who}");
                    Ok(conn)
                })
                .collect::<Result<Vec<_>>>()
        })??;
        ok(&lab, enable("web2"))?;
        ok(&lab, enable("web3"))?;
        wait_for_status(
            &lab,
            "web2 and web3 back in the ring",
            Duration::from_secs(5),
            |s| s.services[0].backends.iter().all(|b| b.in_ring),
        )?;
        // Two refreshes of the rings (every second) with the counts.
        thread::sleep(Duration::from_millis(2200));

        let names = answers(&lab, 30)?;
        let spread = count(&names);
        let n = |w: &str| spread.get(w).copied().unwrap_or(0);
        println!("least-connections: 30 new flows with 12 held on web1: {spread:?}");
        // web1's share is weight / (12 + 1) against 1 / (0 + 1) for the
        // others: about 1 in 27 (the short flows close, so the others'
        // active counts stay near 0).
        ensure!(
            n("web1") <= 4 && n("web2") >= 8 && n("web3") >= 8,
            "new flows with 12 held on web1: {spread:?}"
        );
        drop(held);
        Ok(())
    };
    run().with_context(|| format!("agent stderr:\n{}", agent.log_text()))?;
    agent.stop()
}
