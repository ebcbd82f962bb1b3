//! End to end, full NAT (issue 25): the lab's web servers with **no** route
//! to the client network (no route to it, their default route a
//! blackhole, no VIP on `lo`) serve a `forwarding = "full-nat"` service
//! through the real agent: new connections rotate, an 8 MB download is
//! byte-exact, and a killed web leaves the rotation and comes back; health
//! probes come from the configured source address (webs that answer only
//! it stay up); a drained full-NAT backend's connections finish and it
//! takes no new ones; a spoofed-SYN flood ten times the tables leaves the
//! established full-NAT connections alive and leaks no port (claims back to
//! the flows' count once the flood's half-open flows expire and are swept).
//!
//! Needs root and the `lb` binary in `LB_BIN` (`cargo xtask test` sets both
//! up). The lab is built under a unique prefix.

use std::{
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use lb_tests::{
    FALL, INTERVAL_MS, RISE, backend_status, checked_status,
    flood::{
        KEEPALIVE, TABLE, broken_connections, drain_web1_until_its_clients_close,
        keepalive_connections, status_json, status_text, syn_flood,
    },
    lb_bin, transfer, unique_prefix, wait_for_status, web_config,
};
use lb_userspace::{
    config::Forwarding,
    harness::{
        lab::{HttpConn, LB_BACK, Lab, VIP, WEB_NAMES, http_get, lab_config, vip_http},
        netns::{self, in_netns},
    },
};

/// The client network the webs must not reach.
const CLIENT_NET: &str = "198.18.0.0/24";

/// web1..3, round robin, full NAT, fast HTTP health checks.
fn config() -> String {
    web_config(
        "round-robin",
        &[("web1", 1, false), ("web2", 1, false), ("web3", 1, false)],
        "forwarding = \"full-nat\"\n",
    )
}

/// Web `n`'s namespace cut off from the clients: no route to them, a
/// blackhole default route.
fn cut_off(lab: &Lab, n: usize) -> Result<()> {
    let ns = lab.web_ns(n);
    // The lab's webs are DSR-ready (the VIP on lo): not these.
    let lo = netns::ns_run(&ns, &["ip", "-4", "-o", "addr", "show", "dev", "lo"])?;
    for cidr in lo
        .split_whitespace()
        .filter(|w| w.starts_with(&format!("{VIP}/")))
    {
        netns::ns_run(&ns, &["ip", "addr", "del", cidr, "dev", "lo"])?;
    }
    netns::ns_run(&ns, &["ip", "route", "replace", "blackhole", "default"])?;
    let routes = netns::ns_run(&ns, &["ip", "route", "get", &VIP.to_string()]);
    ensure!(
        routes.is_err() || routes.as_deref().is_ok_and(|r| r.contains("blackhole")),
        "web{n} still routes to the clients: {routes:?}"
    );
    let lo = netns::ns_run(&ns, &["ip", "-4", "addr", "show", "dev", "lo"])?;
    ensure!(
        !lo.contains(&VIP.to_string()),
        "web{n} holds the VIP on lo: {lo}"
    );
    Ok(())
}

fn server_of_new_connection() -> Result<String> {
    let response = http_get(vip_http(), "/")?;
    ensure!(response.status == 200, "GET / answered {}", response.status);
    Ok(response.text())
}

fn servers(lab: &Lab, n: usize) -> Result<Vec<String>> {
    in_netns(&lab.client_ns(), || {
        (0..n).map(|_| server_of_new_connection()).collect()
    })?
}

#[test]
fn backends_without_a_route_to_the_clients_serve_a_full_nat_service() -> Result<()> {
    let mut lab = Lab::up(&unique_prefix("lbf"), &lb_bin()).context("building the lab")?;
    lab.set_mode(Forwarding::FullNat)?;
    for n in 1..=WEB_NAMES.len() {
        cut_off(&lab, n)?;
    }
    let agent = lab.start_agent(&config())?;
    let window = Duration::from_millis(FALL.max(RISE) * INTERVAL_MS + 3000);
    wait_for_status(&lab, "every web in the ring", window, |s| {
        (1..=3).all(|n| backend_status(s, "www", &format!("web{n}")).is_ok_and(|b| b.in_ring))
    })
    .with_context(|| agent.log_text())?;

    // Rotation: exact round robin from web1.
    let seen = servers(&lab, 9)?;
    let want: Vec<String> = (0..9).map(|i| WEB_NAMES[i % 3].to_owned()).collect();
    ensure!(seen == want, "9 new connections went to {seen:?}");

    // 8 MB, byte-exact, through the LB both ways.
    let got = transfer(&lab, 8 << 20)
        .join()
        .map_err(|_| anyhow::anyhow!("the transfer thread panicked"))??;
    ensure!(got == 8 << 20, "received {got} bytes");

    // A web sees the connection from the LB's back address, never from
    // the client.
    let mut conn = in_netns(&lab.client_ns(), || HttpConn::connect(vip_http()))??;
    let web = in_netns(&lab.client_ns(), || conn.get("/").map(|r| r.text()))??;
    let n = 1 + WEB_NAMES
        .iter()
        .position(|w| *w == web)
        .with_context(|| format!("answered by {web:?}"))?;
    let sockets = netns::ns_run(&lab.web_ns(n), &["ss", "-Htn", "state", "established"])?;
    ensure!(
        sockets.contains(&format!("{LB_BACK}:")) && !sockets.contains("198.18.0."),
        "{web}'s connections: {sockets}"
    );
    drop(conn);

    // A killed web leaves the rotation...
    lab.stop_web(3)?;
    wait_for_status(&lab, "web3 down", window, |s| {
        backend_status(s, "www", "web3").is_ok_and(|b| !b.in_ring)
    })?;
    let seen = servers(&lab, 6)?;
    ensure!(
        seen.iter().all(|s| s != "web3"),
        "a new connection went to the dead web3: {seen:?}"
    );
    // ...and comes back. (The lab's server binds a UDP socket to the VIP,
    // and `start_web` waits for it to accept a direct connection from the
    // client namespace, which a cut-off web cannot answer: the VIP and the
    // client route are back only while it starts.)
    let ns = lab.web_ns(3);
    let vip = format!("{VIP}/32");
    let lb_back = LB_BACK.to_string();
    netns::ns_run(&ns, &["ip", "addr", "add", &vip, "dev", "lo"])?;
    netns::ns_run(
        &ns,
        &["ip", "route", "replace", CLIENT_NET, "via", &lb_back],
    )?;
    lab.start_web(3)?;
    netns::ns_run(&ns, &["ip", "route", "del", CLIENT_NET])?;
    cut_off(&lab, 3)?;
    wait_for_status(&lab, "web3 back", window, |s| {
        backend_status(s, "www", "web3").is_ok_and(|b| b.in_ring)
    })?;
    let seen = servers(&lab, 9)?;
    ensure!(
        seen.iter().filter(|s| *s == "web3").count() == 3,
        "web3 is not back in the rotation: {seen:?}"
    );
    let status = checked_status(&lab)?;
    ensure!(
        backend_status(&status, "www", "web3")?.in_ring,
        "web3 left again"
    );
    agent.stop().context("stopping the agent")?;
    Ok(())
}

/// A second address on the LB's back interface, configured as full NAT's
/// only source address.
const SOURCE: &str = "198.19.0.250";

/// Full NAT's held claims over every source address (`ports_in_use` in
/// `lb status --json`, less those `quarantined`: freed by an ended flow)
/// and the flows in the tables over every backend.
fn ports_and_flows(lab: &Lab) -> Result<(u64, u64)> {
    let status = status_json(lab)?;
    let (in_use, quarantined) = claims_of(&status)?;
    let ports = in_use - quarantined;
    let flows = status["services"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|s| s["backends"].as_array().into_iter().flatten())
        .map(|b| b["flows"].as_u64().unwrap_or(0))
        .sum();
    Ok((ports, flows))
}

/// Full NAT's claims over every source address: (in use, of which
/// quarantined), from `lb status --json`.
fn claims_of(status: &serde_json::Value) -> Result<(u64, u64)> {
    let sources = status["full_nat"]["sources"]
        .as_array()
        .with_context(|| format!("no full_nat sources in lb status --json: {status}"))?;
    let sum = |field: &str| {
        sources
            .iter()
            .map(|s| s[field].as_u64().unwrap_or(0))
            .sum::<u64>()
    };
    Ok((sum("ports_in_use"), sum("quarantined")))
}

/// Waits until full NAT holds exactly one claim per flow in the tables and
/// the tables hold exactly the `live` flows the test keeps open (the
/// others closed or expired, their claims released or swept: `sweep`
/// every 5 s).
fn wait_ports_back_to_the_flows(lab: &Lab, live: u64, within: Duration) -> Result<()> {
    let start = Instant::now();
    loop {
        let (ports, flows) = ports_and_flows(lab)?;
        if ports == flows && flows == live {
            eprintln!(
                "full NAT: {ports} ports in use for {flows} flows, {:.1?} after",
                start.elapsed()
            );
            return Ok(());
        }
        if start.elapsed() > within {
            bail!(
                "after {within:?}: {ports} ports in use for {flows} flows ({live} live):\n{}",
                status_text(lab)?
            );
        }
        thread::sleep(Duration::from_millis(500));
    }
}

/// The webs answer only `SOURCE` (no nft/iptables on this machine: their
/// route to the LB's own back address, 198.19.0.1, is a blackhole, so a
/// probe or a flow from it gets no answer), and the agent translates with
/// and probes from `SOURCE`: every web comes up and serves, and sees its
/// clients from `SOURCE`.
#[test]
fn probes_come_from_the_source_address_so_webs_that_answer_only_it_stay_up() -> Result<()> {
    let lab = Lab::up(&unique_prefix("lbf"), &lb_bin()).context("building the lab")?;
    lab.set_mode(Forwarding::FullNat)?;
    netns::ns_run(
        &lab.lb_ns(),
        &[
            "ip",
            "addr",
            "add",
            &format!("{SOURCE}/24"),
            "dev",
            "lb-back",
        ],
    )?;
    for n in 1..=WEB_NAMES.len() {
        cut_off(&lab, n)?;
        netns::ns_run(
            &lab.web_ns(n),
            &["ip", "route", "add", "blackhole", &format!("{LB_BACK}/32")],
        )?;
    }
    let toml = config().replacen(
        "forwarding = \"nat\"\n",
        &format!("forwarding = \"nat\"\nsource-addresses = [\"{SOURCE}\"]\n"),
        1,
    );
    ensure!(toml.contains(SOURCE), "no source-addresses in {toml}");
    let agent = lab.start_agent(&toml)?;
    let window = Duration::from_millis(FALL.max(RISE) * INTERVAL_MS + 3000);
    wait_for_status(&lab, "every web up and in the ring", window, |s| {
        (1..=3).all(|n| {
            backend_status(s, "www", &format!("web{n}"))
                .is_ok_and(|b| b.in_ring && b.last_check.as_deref() == Some("ok"))
        })
    })
    .with_context(|| agent.log_text())?;
    let seen = servers(&lab, 6)?;
    let want: Vec<String> = (0..6).map(|i| WEB_NAMES[i % 3].to_owned()).collect();
    ensure!(seen == want, "6 new connections went to {seen:?}");
    // The web sees the flow from SOURCE; the status names SOURCE.
    let mut conn = in_netns(&lab.client_ns(), || HttpConn::connect(vip_http()))??;
    let web = in_netns(&lab.client_ns(), || conn.get("/").map(|r| r.text()))??;
    let n = 1 + WEB_NAMES
        .iter()
        .position(|w| *w == web)
        .with_context(|| format!("answered by {web:?}"))?;
    let sockets = netns::ns_run(&lab.web_ns(n), &["ss", "-Htn", "state", "established"])?;
    ensure!(
        sockets.contains(&format!("{SOURCE}:")) && !sockets.contains(&format!("{LB_BACK}:")),
        "{web}'s connections: {sockets}"
    );
    let status = status_json(&lab)?;
    ensure!(
        status["full_nat"]["sources"][0]["address"] == SOURCE
            && status["full_nat"]["sources"][0]["ports_in_use"].as_u64() >= Some(1),
        "full_nat in lb status --json: {}",
        status["full_nat"]
    );
    drop(conn);
    agent.stop().context("stopping the agent")?;
    Ok(())
}

/// The lab's config in full NAT (TCP :80, UDP :5353, TCP :443 over
/// web1..3, round robin, no health checks) with `dataplane` lines and
/// `[dataplane.timeouts]`.
fn lab_full_nat(dataplane: &str, timeouts: &str) -> String {
    let base = lab_config(Forwarding::FullNat);
    let mut toml = base.replacen("[dataplane]\n", &format!("[dataplane]\n{dataplane}"), 1);
    toml.push_str(&format!("\n[dataplane.timeouts]\n{timeouts}"));
    toml
}

/// A drained full-NAT backend: its two keep-alive connections go on (their
/// source ports held), new connections go elsewhere, its active flows fall
/// to 0 once its clients close, and once every connection has closed full
/// NAT holds no claim but quarantined ones (the closed flows' ports wait
/// out the backends' TIME_WAIT, `source-port-quarantine`, then return to
/// the pool).
#[test]
fn a_drained_full_nat_backend_finishes_its_connections_and_takes_no_new_ones() -> Result<()> {
    let lab = Lab::up(&unique_prefix("lbf"), &lb_bin()).context("building the lab")?;
    lab.set_mode(Forwarding::FullNat)?;
    let agent = lab.start_agent(&lab_full_nat("", "tcp-closing = \"1s\"\n"))?;
    drain_web1_until_its_clients_close(&lab).with_context(|| agent.log_text())?;
    // Every connection has closed (the helper closes the others at its
    // end): every flow and every claim is gone.
    wait_ports_back_to_the_flows(&lab, 0, Duration::from_secs(30))
        .with_context(|| agent.log_text())?;
    let (in_use, quarantined) = claims_of(&status_json(&lab)?)?;
    eprintln!("full NAT after the drain: {in_use} ports in use, {quarantined} in quarantine");
    ensure!(
        quarantined >= 2 && in_use == quarantined,
        "the closed connections' ports are in quarantine, no other claim is held: \
         {in_use} in use, {quarantined} in quarantine"
    );
    agent.stop().context("stopping the agent")?;
    Ok(())
}

/// Ten keep-alive full-NAT connections outlive a spoofed-SYN flood ten
/// times the tables (`flood::syn_flood`: each spoofed SYN gets a claim, a
/// half-open slot the flood keeps replacing, and a SYN-ACK from its web),
/// and no port leaks: once the flood's half-open flows expire
/// (`tcp-half-open` 2 s) and the sweep has run, full NAT holds exactly one
/// claim per flow in the tables, and the tables hold the ten alone.
#[test]
fn a_syn_flood_leaves_full_nat_connections_alive_and_leaks_no_port() -> Result<()> {
    let lab = Lab::up(&unique_prefix("lbf"), &lb_bin()).context("building the lab")?;
    lab.set_mode(Forwarding::FullNat)?;
    let agent = lab.start_agent(&lab_full_nat(
        &format!("conntrack-size = {TABLE}\n"),
        "tcp-half-open = \"2s\"\ntcp-closing = \"1s\"\n",
    ))?;
    let mut conns = keepalive_connections(&lab, KEEPALIVE)?;
    let (before, _) = ports_and_flows(&lab)?;
    ensure!(
        before >= KEEPALIVE as u64,
        "{before} ports in use for {KEEPALIVE} connections"
    );
    let (seen, report) = syn_flood(&lab).with_context(|| agent.log_text())?;
    let (during, _) = ports_and_flows(&lab)?;
    eprintln!(
        "full NAT: the LB saw {seen} frames of the flood ({}); {during} ports in use right after",
        report.trim()
    );
    let broken = broken_connections(&mut conns);
    ensure!(
        broken.is_empty(),
        "{} of {KEEPALIVE} keep-alive connections did not survive the flood: {broken:#?}\n{}",
        broken.len(),
        status_text(&lab)?
    );
    wait_ports_back_to_the_flows(&lab, KEEPALIVE as u64, Duration::from_secs(45))
        .with_context(|| agent.log_text())?;
    // Still alive, still on their own webs.
    let broken = broken_connections(&mut conns);
    ensure!(broken.is_empty(), "after the sweep: {broken:#?}");
    drop(conns);
    agent.stop().context("stopping the agent")?;
    Ok(())
}
