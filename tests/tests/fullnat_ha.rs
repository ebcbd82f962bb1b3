//! Full NAT behind several LBs (issue 25, "Several LBs"): two LBs behind
//! the multi-LB lab's BGP/ECMP router share full-NAT services, each
//! translating from its own source address (`[dataplane] source-addresses`,
//! `lb_source_addr(n)` on its back interface), to webs that have no route
//! to the clients at all (a blackhole default route, no VIP on `lo`). Each
//! web's reply goes to the source address of the LB that translated its
//! flow, so both LBs carry connections. Then lb1 is cut off as a dead host
//! would be (its front switch port stops forwarding; BFD tells the router),
//! under load: keep-alive connections asking every 20 ms and a new
//! connection every 20 ms. The test measures and checks what README's
//! "What survives what" says of full NAT: new connections succeed through
//! lb2 once the route has moved (how long that takes), every connection
//! lb1 translated ends (its source address was on lb1: how many, of how
//! many, and how), and lb2's own carry on.
//!
//! Two services, to show how the dead LB's flows end under each kind of
//! scheduler: `www` on the VIP (`maglev`) — lb2 picks the flow up by its
//! hash and sends it from its own source address, and the web, which has
//! no such connection, resets it — and `www-rr` on `RR_VIP` (round robin)
//! — lb2 has no flow and cannot schedule a segment without SYN
//! (`drop_no_flow`), so the connection stalls until the client gives up.
//!
//! New connections through lb2 must not fail at all. Last, through lb2
//! alone, one client port connects to both services at once: flows that
//! differ only by their VIP, each given its own source port, whose replies
//! from one web must each reach their own connection.
//!
//! Needs root, BIRD and the `lb` binary in `LB_BIN` (`cargo xtask test`
//! provides them); fails loudly without them. The lab is built under a
//! unique prefix and removed even on failure (its guard).

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use aya::maps::MapData;
use lb_common::FnatClaim;
use lb_tests::multi_lb::{ConnLog, HELD, Ha, Held, ROUTE_FAILOVER, WithAgentLogs};
use lb_userspace::{
    config::Forwarding,
    harness::{
        lab::{
            HA_CLIENT, HttpConn, Lab, RR_VIP, SYNC_PORT, VIP, ha_service, lb_back_addr,
            lb_front_addr, lb_source_addr, vip_http,
        },
        netns::{self, in_netns},
    },
};

/// A new connection answered within this is prompt; a SYN lost on the
/// dead path is retransmitted after 1 s.
const PROMPT: Duration = Duration::from_millis(300);
/// Of the new connections started after the route moved, at most 1 in
/// this many may be slower than [`PROMPT`] (a loaded machine); none may
/// fail.
const MAX_SLOW_SHARE: usize = 20;
/// After the route has moved: time for TCP's retransmissions on the
/// surviving LB's connections and for the new-connection stream to show
/// the steady state.
const AFTER_FAILOVER: Duration = Duration::from_secs(3);
/// Client ports for [`one_client_port_to_both_services`]: below the
/// client's ephemeral range, so no other connection of the test takes them.
const SHARED_PORTS: std::ops::Range<u16> = 20000..20024;

fn rr_http() -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(RR_VIP, 80))
}

/// LB `n`'s config: `www` (`maglev`) and `www-rr` (round robin), full NAT
/// from the LB's own source address.
fn config(lab: &Lab, n: usize, med: u32) -> String {
    lab.ha_config(n, Forwarding::FullNat, "maglev", med)
        + &ha_service("www-rr", RR_VIP, "round-robin")
}

/// LB `n`'s full-NAT claims (`FNAT_CLAIMS`, mapped from its pin, as the
/// agent reads it): each its reply tuple (web → source address:port) and
/// the flow's forward key.
fn claims(lab: &Lab, n: usize) -> Result<Vec<FnatClaim>> {
    let path = lab.pin_dir_of(n).join("FNAT_CLAIMS");
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    let table = lb_userspace::dataplane::SlotTable::<FnatClaim>::map(&data)
        .with_context(|| format!("mapping lb{n}'s FNAT_CLAIMS"))?;
    Ok(lb_userspace::dataplane::fullnat::claims(&table))
}

/// The client ports of the flows LB `n` has translated, after checking that
/// every claim is from its own source address and for the lab's client.
fn client_ports(lab: &Lab, n: usize) -> Result<BTreeSet<u16>> {
    let mut ports = BTreeSet::new();
    for claim in claims(lab, n)? {
        let source = Ipv4Addr::from(u32::from_be(claim.reply.daddr));
        ensure!(
            source == lb_source_addr(n),
            "lb{n} translated a flow from {source}, not its own source address {}",
            lb_source_addr(n)
        );
        let client = Ipv4Addr::from(u32::from_be(claim.client));
        ensure!(client == HA_CLIENT, "lb{n} has a flow of {client}");
        // A freed claim (in quarantine) is an ended flow's.
        if claim.kind() == lb_common::CLAIM_HELD {
            ports.insert(u16::from_be(claim.client_port));
        }
    }
    Ok(ports)
}

/// The peers of every web's established TCP connections on port 80.
fn web_peers(lab: &Lab) -> Result<BTreeSet<Ipv4Addr>> {
    let mut peers = BTreeSet::new();
    for w in 1..=3 {
        let out = netns::ns_run(
            &lab.web_ns(w),
            &["ss", "-Htn", "state", "established", "sport", "= :80"],
        )?;
        // Columns: Recv-Q Send-Q Local:Port Peer:Port.
        for line in out.lines() {
            let peer = line
                .split_whitespace()
                .nth(3)
                .and_then(|p| p.rsplit_once(':'))
                .and_then(|(addr, _)| addr.parse().ok())
                .with_context(|| format!("web{w}: unreadable ss line {line:?}"))?;
            peers.insert(peer);
        }
    }
    Ok(peers)
}

/// What to look at when the test fails: both LBs' drop verdicts and the
/// router's BGP/BFD session changes.
fn diagnostics(ha: &Ha) -> String {
    let mut out = String::new();
    for n in 1..=2 {
        let verdicts = ha.status(n).map(|s| {
            s.verdicts
                .into_iter()
                .filter(|(name, count)| !name.starts_with("forwarded") && *count > 0)
                .collect::<Vec<_>>()
        });
        out.push_str(&format!("lb{n}'s verdicts but forwarded: {verdicts:?}\n"));
    }
    // Where a SYN may be lost besides the LB: a listen queue, TIME-WAIT.
    let counters = [
        "TcpExtListenOverflows",
        "TcpExtListenDrops",
        "TcpExtPAWSEstabRejected",
        "TcpExtTCPTimeWaitOverflow",
        "TcpExtTCPReqQFullDrop",
        "TcpExtTW",
        "TcpAttemptFails",
        "TcpOutRsts",
        "TcpInCsumErrors",
        "TcpExtTCPChallengeACK",
        "TcpExtTCPSYNChallenge",
        "TcpExtTCPACKSkippedSynRecv",
    ];
    let namespaces = (1..=3)
        .map(|w| ha.lab.web_ns(w))
        .chain([ha.lab.client_ns()]);
    for ns in namespaces {
        let mut args = vec!["nstat", "-az"];
        args.extend(counters);
        let text = netns::ns_run(&ns, &args).unwrap_or_else(|e| format!("{e:#}"));
        let nonzero: Vec<String> = text
            .lines()
            .filter_map(|l| {
                let mut w = l.split_whitespace();
                let (name, value) = (w.next()?, w.next()?);
                (value != "0" && !name.starts_with('#')).then(|| format!("{name} {value}"))
            })
            .collect();
        out.push_str(&format!("{ns}: {nonzero:?}\n"));
    }
    // The webs' sockets from lb2's source address, by state.
    for w in 1..=3 {
        let text = netns::ns_run(&ha.lab.web_ns(w), &["ss", "-Htan", "sport", "= :80"])
            .unwrap_or_else(|e| format!("{e:#}"));
        let mut states = std::collections::BTreeMap::<String, usize>::new();
        for line in text.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            if words.len() >= 5 && words[4].starts_with(&lb_source_addr(2).to_string()) {
                *states.entry(words[0].to_owned()).or_default() += 1;
            }
        }
        out.push_str(&format!(
            "web{w}'s sockets from lb2's source address: {states:?}\n"
        ));
    }
    let log = ha.lab.run_dir().join("router/bird.log");
    let log = std::fs::read_to_string(&log).unwrap_or_default();
    out.push_str("the router's session changes:\n");
    for line in log.lines().filter(|l| l.contains("State changed")) {
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// One new connection of the stream.
#[derive(Debug)]
struct Attempt {
    at: Instant,
    took: Duration,
    /// Its client port, once connected.
    port: Option<u16>,
    error: Option<String>,
}

impl Attempt {
    fn prompt(&self) -> bool {
        self.error.is_none() && self.took <= PROMPT
    }
}

/// A new connection every 20 ms until stopped, to each of `services` in
/// turn, each on a thread of its own (so a slow one does not hold back the
/// next; threads made in the client's namespace are in it too) and timed.
fn timed_stream(
    lab: &Lab,
    services: Vec<SocketAddr>,
    stop: Arc<AtomicBool>,
) -> thread::JoinHandle<Result<Vec<Attempt>>> {
    let ns = lab.client_ns();
    thread::spawn(move || {
        in_netns(&ns, || {
            let mut running = Vec::new();
            for service in services.iter().cycle() {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let service = *service;
                running.push(thread::spawn(move || {
                    let at = Instant::now();
                    let mut port = None;
                    let error = HttpConn::connect(service)
                        .and_then(|mut conn| {
                            port = Some(conn.local_addr()?.port());
                            conn.get("/").map(drop)
                        })
                        .err()
                        .map(|e| format!("{e:#}"));
                    Attempt {
                        at,
                        took: at.elapsed(),
                        port,
                        error,
                    }
                }));
                thread::sleep(Duration::from_millis(20));
            }
            running
                .into_iter()
                .map(|t| {
                    t.join()
                        .map_err(|_| anyhow::anyhow!("a connection thread panicked"))
                })
                .collect()
        })?
    })
}

/// What the new connections saw from the cut on.
#[derive(Debug)]
struct NewConnections {
    /// Attempts that ended after the cut.
    total: usize,
    /// Connected through lb1 just before the route moved, then ended with
    /// it (a flow lb1 translated).
    ended_with_lb1: usize,
    /// Failed otherwise.
    failed: usize,
    /// Answered, but not promptly (a SYN retransmitted).
    slow: usize,
    slowest: Duration,
    /// From the cut to the start of the last attempt that was not prompt:
    /// every new connection started later was answered at once.
    settled_after: Duration,
    /// Each attempt that was not prompt: when it started (from the cut),
    /// how long it took, its error.
    not_prompt: Vec<String>,
}

/// `lb1`: the client ports of the flows lb1 translated.
fn new_connections(attempts: &[Attempt], cut: Instant, lb1: &BTreeSet<u16>) -> NewConnections {
    let after: Vec<&Attempt> = attempts.iter().filter(|a| a.at + a.took > cut).collect();
    let bad: Vec<&&Attempt> = after.iter().filter(|a| !a.prompt()).collect();
    let since_cut = |a: &Attempt| a.at.saturating_duration_since(cut);
    let via_lb1 = |a: &Attempt| a.port.is_some_and(|p| lb1.contains(&p));
    NewConnections {
        total: after.len(),
        ended_with_lb1: bad
            .iter()
            .filter(|a| a.error.is_some() && via_lb1(a))
            .count(),
        failed: bad
            .iter()
            .filter(|a| a.error.is_some() && !via_lb1(a))
            .count(),
        slow: bad.iter().filter(|a| a.error.is_none()).count(),
        slowest: after.iter().map(|a| a.took).max().unwrap_or_default(),
        settled_after: bad.iter().map(|a| since_cut(a)).max().unwrap_or_default(),
        not_prompt: bad
            .iter()
            .map(|a| {
                let before = cut.saturating_duration_since(a.at);
                format!(
                    "started {:?} after the cut ({before:?} before), took {:?}{}: {}",
                    since_cut(a),
                    a.took,
                    if via_lb1(a) { ", through lb1" } else { "" },
                    a.error.as_deref().unwrap_or("answered")
                )
            })
            .collect(),
    }
}

/// How a connection ended: reset by the web (through lb2), or timed out.
fn how(log: &ConnLog) -> &'static str {
    match &log.error {
        None => "alive",
        Some(e) if e.contains("reset") => "reset",
        Some(e) if e.contains("timed out") || e.contains("Resource temporarily") => "timed out",
        Some(_) => "other error",
    }
}

/// The scenarios run one at a time: BFD's detection must not see an LB as
/// dead because two labs share two cores (as in ha.rs).
static SERIAL: Mutex<()> = Mutex::new(());

#[test]
fn two_lbs_share_a_full_nat_service_and_only_the_dead_lbs_connections_end() -> Result<()> {
    let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let ha = Ha::up_configured(2, Forwarding::FullNat, [0, 0], &[VIP, RR_VIP], config)?;
    fail_lb1_under_load(&ha)
}

/// With `[sync]` on both LBs nothing changes for full NAT: a full-NAT flow
/// is not sent to the peers (a copy on lb2 would translate to lb1's source
/// address, which the webs answer on lb1), so lb2 receives none, rejects
/// none, holds no synced flow, and lb1's flows end with it all the same.
#[test]
fn with_sync_the_dead_lbs_full_nat_connections_end_all_the_same() -> Result<()> {
    let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let ha = Ha::up_configured(
        2,
        Forwarding::FullNat,
        [0, 0],
        &[VIP, RR_VIP],
        |lab, n, med| config(lab, n, med) + &lab.sync_section(n),
    )?;
    fail_lb1_under_load(&ha)?;
    // lb1 is cut off from the router only: its sync messages still reach
    // lb2 over the back network, so this counts everything it sent.
    let sent = ha.status(1)?.sync.context("lb1: no sync status")?;
    let got = ha.status(2)?.sync.context("lb2: no sync status")?;
    let from_lb1 = got
        .peers
        .iter()
        .find(|p| p.peer == format!("{}:{SYNC_PORT}", lb_back_addr(1)))
        .with_context(|| format!("lb2 has no peer lb1: {got:?}"))?;
    println!(
        "[sync]: lb1 sent {:?} flow records; lb2 received {} from lb1, rejected {:?}, holds {} synced flows",
        sent.peers.iter().map(|p| p.flows_sent).collect::<Vec<_>>(),
        from_lb1.flows_received,
        from_lb1.rejected,
        got.synced_flows
    );
    ensure!(
        sent.peers.iter().all(|p| p.flows_sent == 0),
        "lb1 sent full-NAT flows to its peers: {sent:?}"
    );
    ensure!(
        from_lb1.flows_received == 0
            && from_lb1.rejected.values().all(|n| *n == 0)
            && got.synced_flows == 0,
        "lb2 got full-NAT flows from lb1: {got:?}"
    );
    Ok(())
}

/// Both LBs carry connections of both services, each from its own source
/// address, to webs with no route to the clients; then lb1 dies under
/// load (module doc).
fn fail_lb1_under_load(ha: &Ha) -> Result<()> {
    let services = [vip_http(), rr_http()];
    ha.lab.cut_webs_off()?;

    // Both LBs carry connections, each from its own source address.
    let held = Held::open_to(&ha.lab, HELD, &services)?;
    thread::sleep(Duration::from_millis(500));
    let ports = [client_ports(&ha.lab, 1)?, client_ports(&ha.lab, 2)?];
    let packets = [ha.packets(1)?, ha.packets(2)?];
    let peers = web_peers(&ha.lab)?;
    println!(
        "before: lb1 {} flows ({} packets), lb2 {} flows ({} packets); the webs' peers on :80: {peers:?}",
        ports[0].len(),
        packets[0],
        ports[1].len(),
        packets[1]
    );
    ensure!(
        !ports[0].is_empty() && !ports[1].is_empty() && packets[0] > 0 && packets[1] > 0,
        "ECMP must use both LBs: {ports:?}, packets {packets:?}\n{}",
        ha.logs()
    );
    // The webs see the LBs' source addresses (and the LBs' back addresses,
    // their health checks), never the client.
    let lbs: BTreeSet<Ipv4Addr> = (1..=2)
        .flat_map(|n| [lb_source_addr(n), lb_back_addr(n)])
        .collect();
    ensure!(
        peers.contains(&lb_source_addr(1)) && peers.contains(&lb_source_addr(2)),
        "the webs do not see both source addresses: {peers:?}"
    );
    ensure!(
        peers.is_subset(&lbs) && !peers.contains(&HA_CLIENT),
        "the webs see other peers than the LBs: {peers:?}"
    );

    // lb1 dies under load.
    let stop = Arc::new(AtomicBool::new(false));
    let stream = timed_stream(&ha.lab, services.to_vec(), stop.clone());
    thread::sleep(Duration::from_secs(1));
    let cut = Instant::now();
    ha.lab.set_lb_reachable(1, false)?;
    let converged = [VIP, RR_VIP]
        .iter()
        .map(|vip| {
            ha.lab
                .wait_for_route_to(*vip, &[lb_front_addr(2)], ROUTE_FAILOVER)
        })
        .collect::<Result<Vec<_>>>();
    let convergence = cut.elapsed();
    thread::sleep(AFTER_FAILOVER);
    stop.store(true, Ordering::Relaxed);
    let logs = held.close();
    let attempts = stream
        .join()
        .map_err(|_| anyhow::anyhow!("the new-connection thread panicked"))??;
    converged.with_agent_logs(ha)?;
    let new = new_connections(&attempts, cut, &client_ports(&ha.lab, 1)?);
    let diag = diagnostics(ha);
    let on_both: Vec<&u16> = ports[0].intersection(&ports[1]).collect();
    // lb2's claims are still all from its own address (the flows it picked
    // up included), and it forwarded the new connections.
    client_ports(&ha.lab, 2)?;
    let lb2_packets = ha.packets(2)?;

    // Each held connection by the LB that translated it.
    let mut by_lb: [Vec<&ConnLog>; 2] = [Vec::new(), Vec::new()];
    for log in &logs {
        let port = log
            .local
            .context("a held connection without its address")?
            .port();
        let n = ports
            .iter()
            .position(|p| p.contains(&port))
            .with_context(|| {
                format!("no LB translated the connection from port {port}: {log:?}")
            })?;
        by_lb[n].push(log);
    }
    println!(
        "full NAT, two LBs, lb1 cut off: route converged in {convergence:?}; new connections: {} after the cut, \
         {} connected through lb1 just before and ended with it, {} failed, {} slow, slowest {:?}, \
         all answered at once from {:?} after the cut",
        new.total, new.ended_with_lb1, new.failed, new.slow, new.slowest, new.settled_after
    );
    for line in &new.not_prompt {
        println!("    new connection {line}");
    }
    println!("{diag}");
    ensure!(
        on_both.is_empty(),
        "client ports with a flow on both LBs: {on_both:?}"
    );
    for (service, scheduler) in [(vip_http(), "maglev"), (rr_http(), "round-robin")] {
        let of = |n: usize| -> Vec<&&ConnLog> {
            by_lb[n]
                .iter()
                .filter(|c| c.service == Some(service))
                .collect()
        };
        let (dead, alive) = (of(0), of(1));
        let broken = |v: &[&&ConnLog]| v.iter().filter(|c| c.error.is_some()).count();
        let ways: BTreeSet<&str> = dead.iter().map(|c| how(c)).collect();
        let gap = alive
            .iter()
            .map(|c| c.longest_gap)
            .max()
            .unwrap_or_default();
        println!(
            "  {scheduler} ({service}): {} of {} held connections via lb1, {} of them broken ({ways:?}); \
             {} via lb2, {} broken, longest gap {gap:?}",
            dead.len(),
            dead.len() + alive.len(),
            broken(&dead),
            alive.len(),
            broken(&alive)
        );
        for c in dead.iter().chain(&alive).filter(|c| c.error.is_some()) {
            println!(
                "    from {:?} after {} answers from {}: {:?}",
                c.local, c.answers, c.backend, c.error
            );
        }
        // Every connection lb1 translated ends: its source address was
        // on lb1. lb2's carry on, untouched.
        ensure!(
            broken(&dead) == dead.len(),
            "{scheduler}: a connection lb1 translated survived it: {dead:#?}"
        );
        ensure!(
            broken(&alive) == 0,
            "{scheduler}: a connection lb2 translated broke: {alive:#?}"
        );
        ensure!(
            gap < Duration::from_secs(2),
            "{scheduler}: lb2's connections stalled {gap:?}"
        );
    }
    ensure!(
        !by_lb[0].is_empty() && !by_lb[1].is_empty(),
        "the held connections did not use both LBs"
    );

    // New connections: lb2 takes them as soon as the route has moved (a
    // SYN that went to lb1 before is retransmitted to lb2), and none
    // fails. (One in ~170 once timed out through lb2 in about one run in
    // six: the stream's two services each advance their own client ports,
    // so at times one port served both, and when both flows were on one
    // web the second's SYN-ACK was matched to the first's flow, which
    // shares its NAT shape; a full-NAT reply now picks its flow by the
    // source address and port it was sent to. The case is checked on its
    // own by `one_client_port_to_both_services`.)
    let after_route: Vec<&Attempt> = attempts
        .iter()
        .filter(|a| a.at >= cut + convergence)
        .collect();
    let prompt = after_route.iter().filter(|a| a.prompt()).count();
    println!(
        "  new connections started after the route moved: {prompt} of {} answered at once",
        after_route.len()
    );
    ensure!(new.failed == 0, "new connections failed: {new:#?}");
    ensure!(
        !after_route.is_empty()
            && prompt * MAX_SLOW_SHARE >= after_route.len() * (MAX_SLOW_SHARE - 1),
        "new connections were not answered at once after the route moved: {prompt} of {}: {new:#?}",
        after_route.len()
    );
    ensure!(
        lb2_packets > packets[1],
        "lb2 forwarded nothing after the cut: {lb2_packets} packets, {} before",
        packets[1]
    );
    one_client_port_to_both_services(ha)
}

/// One client port to both services at once, through lb2 (lb1 is cut
/// off): a keep-alive connection to `www` from a fixed port, then one to
/// `www-rr` from the same port while the first stays open. lb2 gives them
/// distinct source ports; when both land on one web, the web's replies
/// to them share (web:80, client:port) once turned back to the client's
/// shape and differ only by the source port they were sent to, which must
/// pick the flow: the second's SYN-ACK once went to the first connection
/// (its established reply entry matched on client and web alone), so the
/// second never connected — the rare connect timeout of a new connection
/// through the surviving LB (the test's new connections alternate between
/// the services, each service's client ports advancing on their own, so
/// one port at times served both).
fn one_client_port_to_both_services(ha: &Ha) -> Result<()> {
    let (mut pairs, mut same_web, mut failed) = (0, 0, Vec::new());
    in_netns(&ha.lab.client_ns(), || {
        for port in SHARED_PORTS {
            let from = SocketAddrV4::new(HA_CLIENT, port);
            let first = HttpConn::connect_from_port(from, SocketAddrV4::new(VIP, 80))
                .and_then(|mut c| c.get("/").map(|r| (r.text(), c)));
            let (web, mut first) = match first {
                Ok(found) => found,
                Err(e) => {
                    failed.push(format!("port {port}, www: {e:#}"));
                    continue;
                }
            };
            match HttpConn::connect_from_port(from, SocketAddrV4::new(RR_VIP, 80))
                .and_then(|mut c| c.get("/"))
            {
                Ok(r) => {
                    pairs += 1;
                    same_web += usize::from(r.text() == web);
                }
                Err(e) => failed.push(format!("port {port}, www-rr (www on {web}): {e:#}")),
            }
            match first.get("/") {
                Ok(r) if r.text() == web => {}
                other => failed.push(format!(
                    "port {port}, www on {web} after www-rr's connection: {:?}",
                    other.map(|r| r.text())
                )),
            }
        }
    })?;
    println!(
        "one client port to both services through lb2: {pairs} of {} pairs connected, \
         {same_web} of them on one web; failures: {failed:#?}",
        SHARED_PORTS.len()
    );
    ensure!(
        failed.is_empty(),
        "connections from one client port to both services failed: {failed:#?}"
    );
    ensure!(
        same_web > 0,
        "no pair of connections landed on one web: nothing was checked"
    );
    Ok(())
}
