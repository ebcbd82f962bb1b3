//! The lab's traffic for the flow-lifecycle tests (flood.rs,
//! tunnel_e2e.rs): keep-alive connections and whether they survive, the
//! agent's `lb status --json` and its `active` counts, and the spoofed-SYN
//! flood (`lb pktgen --proto tcp-syn` from the client's namespace) measured
//! by what the LB's XDP program saw on `lb-front`.

use std::{
    net::SocketAddr,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use lb_userspace::harness::{
    lab::{HTTP_PORT, HttpConn, Lab, VIP, VIP6, WEB_NAMES, vip_http},
    netns::in_netns,
    xdp,
};
use serde_json::Value;

use crate::{lb_bin, steady_stream};

/// `conntrack-size`: the smallest the config accepts.
pub const TABLE: u32 = 1024;
/// `half-open-size`: as small as the established table.
pub const HALF_OPEN: u32 = 1024;
/// Spoofed SYNs the LB must see: ten times both tables together, each a
/// distinct flow.
pub const FLOOD: u32 = 10 * (TABLE + HALF_OPEN);
/// SYNs per `lb pktgen` run: twice both tables; the flood repeats runs (new
/// sources each time) until the LB has seen `FLOOD`.
pub const ROUND: u32 = 2 * (TABLE + HALF_OPEN);
pub const MAX_ROUNDS: u32 = 10;
/// The flood's rate (all generator threads together): about a second of
/// flood, so the new connections made meanwhile really meet it, and the web
/// servers' kernels (which answer every SYN that reaches them) keep up on a
/// shared two-CPU machine.
pub const FLOOD_RATE: u64 = 20_000;
/// Long-lived keep-alive connections that must outlive the flood.
pub const KEEPALIVE: usize = 10;

/// `lb status --json` of the lab's agent, as the CLI prints it.
pub fn status_json(lab: &Lab) -> Result<Value> {
    let socket = lab.agent_socket();
    let out = Command::new(lb_bin())
        .args(["status", "--json", "--socket"])
        .arg(&socket)
        .output()
        .context("running lb status --json")?;
    ensure!(
        out.status.success(),
        "lb status --json failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).context("parsing lb status --json")
}

/// Each keep-alive connection asked again: the ones that no longer answer,
/// or answer from another server than their own, described.
pub fn broken_connections(conns: &mut [(HttpConn, String)]) -> Vec<String> {
    let mut broken = Vec::new();
    for (i, (conn, server)) in conns.iter_mut().enumerate() {
        match conn.get("/") {
            Ok(r) if r.text() == *server => {}
            Ok(r) => broken.push(format!(
                "connection {i}: answered by {} instead of {server}",
                r.text()
            )),
            Err(e) => broken.push(format!("connection {i} (on {server}): {e:#}")),
        }
    }
    broken
}

/// `n` keep-alive connections from the client through the VIP, one `GET /`
/// each: the connections and the server that answered each.
pub fn keepalive_connections(lab: &Lab, n: usize) -> Result<Vec<(HttpConn, String)>> {
    keepalive_connections_to(lab, vip_http(), n)
}

/// [`keepalive_connections`] to `vip` (e.g. the VIP6's).
pub fn keepalive_connections_to(
    lab: &Lab,
    vip: SocketAddr,
    n: usize,
) -> Result<Vec<(HttpConn, String)>> {
    in_netns(&lab.client_ns(), || {
        (0..n)
            .map(|_| {
                let mut conn = HttpConn::connect(vip)?;
                let server = conn.get("/")?.text();
                Ok((conn, server))
            })
            .collect()
    })?
}

/// `lb status` of the lab's agent, as the CLI prints it (for the log).
pub fn status_text(lab: &Lab) -> Result<String> {
    let out = Command::new(lb_bin())
        .args(["status", "--socket"])
        .arg(lab.agent_socket())
        .output()
        .context("running lb status")?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `active` of backend `backend` of service `service` in a status JSON.
pub fn active_flows(status: &Value, service: &str, backend: &str) -> Result<u64> {
    let b = status["services"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == service))
        .and_then(|s| s["backends"].as_array())
        .and_then(|b| b.iter().find(|b| b["name"] == backend))
        .with_context(|| format!("no backend {service}/{backend} in lb status --json"))?;
    b["active"].as_u64().with_context(|| {
        format!("backend {service}/{backend} in lb status --json has no `active` count: {b}")
    })
}

/// Frames the LB's XDP program saw on `lb-front` (`ethtool -S`, every
/// queue's `xdp_packets`): where the flood enters.
pub fn front_xdp_packets(lab: &Lab) -> Result<u64> {
    let out = lab.exec_ok(&lab.lb_ns(), &["ethtool", "-S", "lb-front"])?;
    let mut total = 0;
    for line in out.lines() {
        if let Some((key, value)) = line.trim().split_once(':')
            && key.starts_with("rx_queue_")
            && key.ends_with("_xdp_packets")
        {
            total += value
                .trim()
                .parse::<u64>()
                .with_context(|| format!("ethtool -S line {line:?}"))?;
        }
    }
    Ok(total)
}

/// `lb pktgen --proto tcp-syn` from the client's `eth0` to the VIP: one
/// round of `ROUND` SYNs from distinct spoofed sources (198.18.{64+round}.1,
/// ports from 1024), at `FLOOD_RATE`.
pub fn syn_flood_round(lab: &Lab, dst_mac: &str, round: u32) -> Result<String> {
    let src = format!("198.18.{}.1", 64 + round);
    pktgen(lab, dst_mac, &src, ROUND, "tcp-syn")
}

/// IPv6's round: spoofed sources from 2001:db8:66:ROUND::1 (the low 32
/// bits counted per flow) to the lab's VIP6, port 80.
pub fn syn_flood_round6(lab: &Lab, dst_mac: &str, round: u32) -> Result<String> {
    let src = format!("2001:db8:66:{round:x}::1");
    // An IPv6 TCP SYN frame is 74 bytes.
    let dst = format!("[{VIP6}]:{HTTP_PORT}");
    pktgen_to(lab, dst_mac, (&dst, 74), &src, ROUND, "tcp-syn")
}

/// `lb pktgen --proto PROTO` from the client's `eth0` to the VIP: `flows`
/// frames, one per spoofed source (from `src`, ports from 1024 first), at
/// `FLOOD_RATE`. The same `src` and `flows` give the same tuples, so a
/// `tcp-syn` run and a `tcp-ack` run make spoofed SYN + ACK pairs.
pub fn pktgen(lab: &Lab, dst_mac: &str, src: &str, flows: u32, proto: &str) -> Result<String> {
    let dst = format!("{VIP}:{HTTP_PORT}");
    pktgen_to(lab, dst_mac, (&dst, 64), src, flows, proto)
}

/// [`pktgen`] to `dst` (either family's `ADDR:PORT`, IPv6 in brackets),
/// frames of `size` bytes.
pub fn pktgen_to(
    lab: &Lab,
    dst_mac: &str,
    (dst, size): (&str, usize),
    src: &str,
    flows: u32,
    proto: &str,
) -> Result<String> {
    let bin = lb_bin().display().to_string();
    let (flows, rate, size) = (flows.to_string(), FLOOD_RATE.to_string(), size.to_string());
    lab.exec_ok(
        &lab.client_ns(),
        &[
            &bin,
            "pktgen",
            "--dev",
            "eth0",
            "--dst-mac",
            dst_mac,
            "--dst",
            dst,
            "--src",
            src,
            "--flows",
            &flows,
            "--count",
            &flows,
            "--rate",
            &rate,
            "--proto",
            proto,
            "--size",
            &size,
        ],
    )
}

/// The MAC of the LB's front interface, as `lb pktgen --dst-mac` takes it.
pub fn front_mac(lab: &Lab) -> Result<String> {
    let mac = in_netns(&lab.lb_ns(), || xdp::if_mac("lb-front"))??;
    Ok(mac
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":"))
}

/// Floods the VIP with spoofed SYNs in rounds until the LB's XDP program
/// has seen at least `FLOOD` frames on `lb-front` (a veth drops frames when
/// its ring is full on a busy machine, so frames sent are not frames
/// received). Returns the frames seen and the generator's last report.
pub fn syn_flood(lab: &Lab) -> Result<(u64, String)> {
    syn_flood_with(lab, syn_flood_round)
}

/// [`syn_flood`] with `round` sending each round (IPv4's or IPv6's).
pub fn syn_flood_with(
    lab: &Lab,
    round_of: impl Fn(&Lab, &str, u32) -> Result<String>,
) -> Result<(u64, String)> {
    let mac = front_mac(lab)?;
    let before = front_xdp_packets(lab)?;
    let mut report = String::new();
    for n in 0..MAX_ROUNDS {
        report = round_of(lab, &mac, n)
            .with_context(|| format!("lb pktgen --proto tcp-syn, round {n}"))?;
        let seen = front_xdp_packets(lab)? - before;
        if seen >= u64::from(FLOOD) {
            return Ok((seen, report));
        }
    }
    let seen = front_xdp_packets(lab)? - before;
    bail!(
        "after {MAX_ROUNDS} rounds of {ROUND} SYNs the LB's XDP program saw only {seen} frames, fewer than {FLOOD} (last round: {})",
        report.trim()
    )
}

/// Drains web1 of service `www` (round robin over web1..3, a fresh agent)
/// while six keep-alive connections run: its two go on, new connections go
/// elsewhere, and its `active` flows fall to 0 once its clients close
/// (`tcp-closing` short); the others' connections are untouched.
pub fn drain_web1_until_its_clients_close(lab: &Lab) -> Result<()> {
    drain_web1_of(lab, "www", vip_http())
}

/// [`drain_web1_until_its_clients_close`] of `service`, whose VIP is `vip`
/// (e.g. an IPv6 service).
pub fn drain_web1_of(lab: &Lab, service: &str, vip: SocketAddr) -> Result<()> {
    // Six connections: web1, web2, web3, web1, web2, web3.
    let mut conns = keepalive_connections_to(lab, vip, 6)?;
    let on_web1 = conns.iter().filter(|(_, s)| s == "web1").count() as u64;
    ensure!(on_web1 == 2, "{on_web1} connections on web1, not 2");
    ensure!(
        active_flows(&status_json(lab)?, service, "web1")? == on_web1,
        "web1's active flows before the drain: {}",
        status_json(lab)?
    );

    let out = Command::new(lb_bin())
        .args(["backend", "drain", service, "web1", "--socket"])
        .arg(lab.agent_socket())
        .output()
        .context("running lb backend drain")?;
    ensure!(
        out.status.success(),
        "lb backend drain {service} web1: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Drained: its connections go on, new ones go elsewhere, and it
    // still holds their flows.
    for (conn, server) in &mut conns {
        let again = conn.get("/")?.text();
        ensure!(
            again == *server,
            "a {server} connection answered by {again}"
        );
    }
    let fresh = crate::answers_at(lab, vip, 4)?;
    ensure!(
        !fresh.iter().any(|s| s == "web1"),
        "new connections reached the drained web1: {fresh:?}"
    );
    ensure!(
        active_flows(&status_json(lab)?, service, "web1")? == on_web1,
        "web1's active flows while draining: {}",
        status_json(lab)?
    );

    // Its clients close; the closing flows expire and `active` falls to 0.
    conns.retain(|(_, s)| s != "web1");
    let closed = Instant::now();
    let within = Duration::from_secs(15);
    loop {
        let status = status_json(lab)?;
        let active = active_flows(&status, service, "web1")?;
        if active == 0 {
            eprintln!(
                "web1 drained: 0 active flows {:.2?} after its clients closed",
                closed.elapsed()
            );
            break;
        }
        if closed.elapsed() > within {
            bail!(
                "web1 still holds {active} active flows {within:?} after its clients closed: {status}"
            );
        }
        thread::sleep(Duration::from_millis(100));
    }
    // The others' connections are untouched.
    for (conn, server) in &mut conns {
        let again = conn.get("/")?.text();
        ensure!(
            again == *server,
            "a {server} connection answered by {again}"
        );
    }
    Ok(())
}

/// Ten keep-alive connections (round robin from web1 on a fresh agent with
/// `conntrack-size` = [`TABLE`]) outlive a spoofed-SYN flood ten times the
/// tables ([`syn_flood`]), answering from their own servers, while new
/// connections made during and after it are all served; `label` names the
/// mode in the log.
pub fn keepalive_connections_survive_a_syn_flood(lab: &Lab, label: &str) -> Result<()> {
    // Ten connections, one request each: a fresh agent spreads them
    // web1, web2, web3, web1, …
    let mut conns = keepalive_connections(lab, KEEPALIVE)?;
    let servers: Vec<&str> = conns.iter().map(|(_, s)| s.as_str()).collect();
    let expected: Vec<&str> = (0..KEEPALIVE)
        .map(|i| WEB_NAMES[i % WEB_NAMES.len()])
        .collect();
    ensure!(
        servers == expected,
        "the keep-alive connections went to {servers:?}, not round robin from web1"
    );

    // New connections all along the flood and for a while after it.
    let stop = Arc::new(AtomicBool::new(false));
    let stream = steady_stream(lab, stop.clone());
    let started = Instant::now();
    let flood = syn_flood(lab);
    let flood_took = started.elapsed();
    thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let fresh = stream
        .join()
        .map_err(|_| anyhow::anyhow!("the new-connection thread panicked"))?;
    let (seen, report) = flood?;
    eprintln!(
        "{}: the LB saw {seen} frames of the flood in {flood_took:.2?} (last run: {}); {} new connections meanwhile",
        label,
        report.trim(),
        fresh.len(),
    );
    let after = status_text(lab)?;

    // Every new connection made during and after the flood was served.
    let failed: Vec<String> = fresh
        .iter()
        .filter_map(|(at, r)| r.as_ref().err().map(|e| format!("at {at:.2?}: {e}")))
        .collect();
    ensure!(
        failed.is_empty(),
        "{} of {} new connections during/after the flood failed: {failed:#?}\nthe agent's status after the flood:\n{after}",
        failed.len(),
        fresh.len()
    );
    let during = fresh.iter().filter(|(at, _)| *at < flood_took).count();
    ensure!(
        during >= 5,
        "only {during} new connections were made during the {flood_took:.2?} flood"
    );

    // Every long-lived connection answers again, from its own server.
    let broken = broken_connections(&mut conns);
    ensure!(
        broken.is_empty(),
        "{} of {KEEPALIVE} keep-alive connections did not survive the flood: {broken:#?}\nthe agent's status after the flood:\n{after}",
        broken.len()
    );
    Ok(())
}
