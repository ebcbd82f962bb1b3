//! End-to-end tests of the tunnel services (issue 26) in the routed lab
//! (`Lab::up_routed`): the web servers sit behind a router, off the LB's
//! L2 segment, each with the VIP on `lo` and `lb decap` attached allowing
//! the LB's tunnel source; they answer the client directly through the
//! router. Each test runs its scenario over IPIP and over GUE:
//!
//! - rotation over three webs and an 8 MB transfer byte-exact;
//! - a web killed goes DOWN and comes back UP;
//! - a drained web keeps its tunnelled flows until their clients close;
//! - path-MTU discovery through the tunnel with the router's link to the
//!   webs lowered: the client gets "fragmentation needed" with the link's
//!   MTU minus the tunnel's overhead, and the upload completes — with the
//!   LB's route declaring the MTU, and without (the LB learns it from the
//!   router's "fragmentation needed");
//! - the check through the VIP: a web without the VIP on its `lo`, or
//!   without its decapsulator, goes DOWN under it while a plain check
//!   keeps it UP;
//! - keep-alive connections survive a SYN flood ten times the tables;
//! - two LBs behind an ECMP router (the multi-LB lab) with a maglev tunnel
//!   service: losing an LB breaks no established connection.
//!
//! Over IPv6 (issue 24: an IPv6 service's tunnels are IP6IP6 and GUE over
//! IPv6, to the webs' IPv6 addresses, taken off by their `lb decap`):
//! `curl -6` rotation over the three webs and an 8 MB transfer byte-exact;
//! a web killed goes DOWN under its IPv6 check and comes back UP; path-MTU
//! discovery with the router's link to the webs lowered and the LB's IPv6
//! route declaring it.
//!
//! And the routed lab itself, before any tunnel: the webs are reached by
//! routing alone, never on the LB's segment.
//!
//! Needs root and the `lb` binary in `LB_BIN` (`cargo xtask test`). Each
//! test builds its own lab under a unique prefix (tag `tun`).

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use lb_tests::{
    answers, backend_status, count,
    flood::{TABLE, drain_web1_until_its_clients_close, keepalive_connections_survive_a_syn_flood},
    lb_bin,
    pmtu::{cached_mtu, forget_path_mtus, forget_path_mtus6, upload, upload_to},
    status, transfer, unique_prefix, wait_for_status,
};
use lb_userspace::{
    config::Forwarding,
    control::HealthStatus,
    harness::{
        lab::{
            CLIENT_FRONT, HTTP_PORT, HttpConn, Lab, ROUTER_LB_SIDE, ROUTER_LB_SIDE6,
            ROUTER_WEB_IFACE, ROUTER_WEB_SIDE, Tunnel, VIP, VIP6, WEB_NAMES, WEB_NET, WEB_NET6,
            bulk_byte, http_get, lb_front_addr, vip_http, vip6_http, web_addr,
        },
        netns::{in_netns, require_tool},
    },
};

/// The 8 MB transfer.
const BIG: usize = 8 << 20;
/// The MTU of the router's link to the webs in the PMTUD test.
const LOW_MTU: u32 = 1400;

fn routed_lab() -> Result<Lab> {
    let prefix = unique_prefix("tun");
    let lab =
        Lab::up_routed(&prefix, &lb_bin()).with_context(|| format!("building lab {prefix}"))?;
    lab.attach_decaps()?;
    Ok(lab)
}

/// For each tunnel: a fresh agent with `config(lab, tunnel)` on a fresh
/// data plane (so round robin counts from web1), `check`, then the agent
/// stops (exit 0) and its data plane goes.
fn in_each_tunnel(
    lab: &mut Lab,
    config: impl Fn(&Lab, Tunnel) -> String,
    mut check: impl FnMut(&mut Lab, Tunnel) -> Result<()>,
) -> Result<()> {
    for tunnel in Tunnel::ALL {
        let name = tunnel.name();
        let agent = lab
            .start_agent(&config(lab, tunnel))
            .with_context(|| format!("starting the agent ({name})"))?;
        check(lab, tunnel)
            .with_context(|| format!("{name}; agent stderr:\n{}", agent.log_text()))?;
        agent
            .stop()
            .with_context(|| format!("stopping the agent ({name})"))?;
        lab.remove_dataplane()?;
    }
    Ok(())
}

/// `www` over `tunnel`, round robin, fast HTTP checks.
fn checked(lab: &Lab, tunnel: Tunnel) -> String {
    lab.tunnel_config(tunnel, "round-robin", true, "")
}

/// Packets each web's decapsulator has stripped from `tunnel` (its
/// `decap_ipip` or `decap_gue` counter in `lb decap status --json`).
fn decapsulated(lab: &Lab, tunnel: Tunnel) -> Result<Vec<u64>> {
    let verdict = format!("decap_{}", tunnel.name());
    (1..=WEB_NAMES.len())
        .map(|n| Ok(lab.decap_verdicts(n)?.get(&verdict).copied().unwrap_or(0)))
        .collect()
}

/// `www6` (the VIP6, TCP :80) over each tunnel in its IPv6 form, with
/// `health`, the LB forwarding IPv6: `check` runs under each.
fn in_each_tunnel6(
    lab: &mut Lab,
    health: &str,
    check: impl FnMut(&mut Lab, Tunnel) -> Result<()>,
) -> Result<()> {
    lab.forward_ipv6()?;
    in_each_tunnel(
        lab,
        |lab, t| lab.tunnel_config6(t, "round-robin", health),
        check,
    )
}

/// Packets each web's decapsulator has stripped from `tunnel`'s IPv6 form
/// (`decap_ip6ip6`, `decap_gue6`).
fn decapsulated6(lab: &Lab, tunnel: Tunnel) -> Result<Vec<u64>> {
    let verdict = tunnel.decap_verdict6();
    (1..=WEB_NAMES.len())
        .map(|n| Ok(lab.decap_verdicts(n)?.get(verdict).copied().unwrap_or(0)))
        .collect()
}

/// `n` new `curl -6` connections to the VIP6 from the client: who answered.
fn curl6(lab: &Lab, n: usize) -> Result<Vec<String>> {
    let url = format!("http://[{VIP6}]:{HTTP_PORT}/");
    (0..n)
        .map(|_| {
            let body = lab
                .exec_ok(
                    &lab.client_ns(),
                    &["curl", "-6", "-sS", "--max-time", "5", &url],
                )
                .with_context(|| format!("curl -6 {url}"))?;
            Ok(body.trim().to_owned())
        })
        .collect()
}

/// IPv6 services' tunnels: six new `curl -6` connections to the VIP6
/// rotate web1, web2, web3, …; an 8 MB download arrives byte-exact; every
/// web's decapsulator counts the IPv6 tunnel packets it stripped.
#[test]
fn each_ipv6_tunnel_rotates_over_three_webs_and_carries_8_mb_byte_exact() -> Result<()> {
    require_tool("curl", "apt-get install curl")?;
    let mut lab = routed_lab()?;
    in_each_tunnel6(&mut lab, "", |lab, tunnel| {
        let before = decapsulated6(lab, tunnel)?;
        let got = curl6(lab, 6)?;
        let want: Vec<&str> = (0..6).map(|i| WEB_NAMES[i % 3]).collect();
        ensure!(
            got == want,
            "new IPv6 connections went to {got:?}, not {want:?}"
        );
        let started = Instant::now();
        let response = in_netns(&lab.client_ns(), || {
            http_get(vip6_http(), &format!("/bytes/{BIG}"))
        })??;
        ensure!(
            response.status == 200 && response.body.len() == BIG,
            "GET /bytes/{BIG} over IPv6: status {}, {} bytes",
            response.status,
            response.body.len()
        );
        let exact = response
            .body
            .iter()
            .enumerate()
            .all(|(i, b)| *b == bulk_byte(i as u64));
        ensure!(exact, "the IPv6 transfer arrived corrupted");
        eprintln!(
            "{} over IPv6: 8 MB byte-exact in {:.2?}",
            tunnel.name(),
            started.elapsed()
        );
        every_web_decapsulated(
            lab,
            &before,
            &decapsulated6(lab, tunnel)?,
            tunnel.decap_verdict6(),
        )
    })
}

/// Every web's decapsulator stripped more `what` packets than `before`
/// (counts per web, in `WEB_NAMES` order).
fn every_web_decapsulated(lab: &Lab, before: &[u64], after: &[u64], what: &str) -> Result<()> {
    for n in 0..WEB_NAMES.len() {
        ensure!(
            after[n] > before[n],
            "web{}'s decapsulator stripped no {what} packet ({} -> {}): {}",
            n + 1,
            before[n],
            after[n],
            lab.decap_status(n + 1)?
        );
    }
    Ok(())
}

/// A web killed goes DOWN under its HTTP check over IPv6, leaves the
/// IPv6 rotation, and comes back UP once restarted, behind each tunnel.
#[test]
fn a_killed_web_goes_down_and_recovers_behind_each_ipv6_tunnel() -> Result<()> {
    require_tool("curl", "apt-get install curl")?;
    let mut lab = routed_lab()?;
    let health = |lab: &Lab, web: &str, want: HealthStatus, what: &str| {
        wait_for_status(lab, what, Duration::from_secs(10), |s| {
            backend_status(s, "www6", web).is_ok_and(|b| b.health == want)
        })
    };
    let check = "health = { check = \"http\", path = \"/\", interval = \"200ms\", timeout = \"200ms\", rise = 2, fall = 2 }\n";
    in_each_tunnel6(&mut lab, check, |lab, _| {
        for web in WEB_NAMES {
            health(lab, web, HealthStatus::Up, &format!("{web} up"))?;
        }
        lab.stop_web(2)?;
        health(lab, "web2", HealthStatus::Down, "web2 down after its kill")?;
        let got = curl6(lab, 6)?;
        ensure!(
            !got.iter().any(|w| w == "web2"),
            "new IPv6 connections reached the dead web2: {got:?}"
        );
        lab.start_web(2)?;
        health(lab, "web2", HealthStatus::Up, "web2 up after its restart")?;
        let got = count(&curl6(lab, 9)?);
        ensure!(
            got.get("web2").copied().unwrap_or(0) > 0,
            "the recovered web2 gets no new IPv6 connection: {got:?}"
        );
        Ok(())
    })
}

/// Lowers the router's link to the webs to [`LOW_MTU`]; the MTU as text,
/// for the route commands.
fn lower_the_routers_web_link(lab: &Lab) -> Result<String> {
    let low = LOW_MTU.to_string();
    lab.exec_ok(
        &lab.router_ns(),
        &["ip", "link", "set", ROUTER_WEB_IFACE, "mtu", &low],
    )?;
    Ok(low)
}

/// Path-MTU discovery through the IPv6 tunnels: the router's link to the
/// webs lowered to 1400 and the LB's IPv6 route saying so (`mtu lock
/// 1400`): the client's upload to the VIP6 gets "packet too big" with 1400
/// less the overhead (1360 IP6IP6, 1348 GUE over IPv6) and completes.
/// Without the route's MTU it would stall: a router's "packet too big"
/// about an outer IPv6 packet is not learned yet (docs/architecture.md,
/// "Tunnels").
#[test]
fn ipv6_path_mtu_discovery_through_the_tunnel_gives_the_client_mtu_minus_overhead() -> Result<()> {
    let mut lab = routed_lab()?;
    // The LB's answers leave by XDP_TX: see `run_xdp_on_client_front`.
    lab.run_xdp_on_client_front()?;
    let low = lower_the_routers_web_link(&lab)?;
    let router = ROUTER_LB_SIDE6.to_string();
    lab.exec_ok(
        &lab.lb_ns(),
        &[
            "ip", "-6", "route", "replace", WEB_NET6, "via", &router, "mtu", "lock", &low,
        ],
    )?;
    let vip = VIP6.to_string();
    in_each_tunnel6(&mut lab, "", |lab, tunnel| {
        for ns in [lab.client_ns(), lab.lb_ns()] {
            forget_path_mtus6(lab, &ns)?;
        }
        in_netns(&lab.client_ns(), || upload_to(vip6_http(), 300_000))??;
        let want = LOW_MTU - tunnel.overhead6();
        let got = cached_mtu(lab, &lab.client_ns(), &vip)?;
        ensure!(
            got == Some(want),
            "the client's path MTU to the VIP6 is {got:?}, not {want} ({LOW_MTU} - {} bytes of {} over IPv6); verdicts: {:?}",
            tunnel.overhead6(),
            tunnel.name(),
            status(lab)?.verdicts
        );
        Ok(())
    })
}

/// The routed lab before any tunnel: the client and the LB reach every
/// web through the router, which is the LB's route to them (not its own
/// segment); each web's route back to the client is the router, and the
/// router's to the client is the client's back leg, not the LB. A service
/// with only a MAC rewrite (DSR) has no next hop on the webs' segment.
#[test]
fn the_routed_lab_reaches_its_webs_through_the_router_only() -> Result<()> {
    let lab = Lab::up_routed(&unique_prefix("tun"), &lb_bin())?;
    for n in 1..=WEB_NAMES.len() {
        let web = SocketAddr::V4(SocketAddrV4::new(web_addr(n), HTTP_PORT));
        for ns in [lab.client_ns(), lab.lb_ns()] {
            let name = in_netns(&ns, || http_get(web, "/"))??.text();
            ensure!(name == WEB_NAMES[n - 1], "{web} from {ns} answered {name}");
        }
        let via_router = format!("via {ROUTER_LB_SIDE} dev lb-back");
        let route = lab.exec_ok(
            &lab.lb_ns(),
            &["ip", "route", "get", &web_addr(n).to_string()],
        )?;
        ensure!(
            route.contains(&via_router),
            "the LB's route to web{n}: {route}"
        );
        let back = lab.exec_ok(
            &lab.web_ns(n),
            &[
                "ip",
                "route",
                "get",
                &CLIENT_FRONT.to_string(),
                "from",
                &VIP.to_string(),
            ],
        )?;
        ensure!(
            back.contains(&format!("via {ROUTER_WEB_SIDE}")),
            "web{n}'s route to the client: {back}"
        );
    }
    let onward = lab.exec_ok(
        &lab.router_ns(),
        &["ip", "route", "get", &CLIENT_FRONT.to_string()],
    )?;
    ensure!(
        onward.contains("dev r-client"),
        "the router sends the webs' replies to the client via {onward}, not its back leg"
    );
    // The webs are not on the LB's segment: the LB has no neighbour there
    // (the single lab's LB address 198.19.0.1 is the router's here).
    let neighbours = lab.exec_ok(&lab.lb_ns(), &["ip", "neigh", "show", "dev", "lb-back"])?;
    for n in 1..=WEB_NAMES.len() {
        ensure!(
            !neighbours.contains(&web_addr(n).to_string()),
            "the LB has web{n} as a neighbour: {neighbours}"
        );
    }
    Ok(())
}

/// Rotation over three webs (six new connections: web1, web2, web3, web1,
/// …) and an 8 MB download byte-exact, over each tunnel; every web's
/// decapsulator counts the packets it stripped.
#[test]
fn each_tunnel_rotates_over_three_webs_and_carries_8_mb_byte_exact() -> Result<()> {
    let mut lab = routed_lab()?;
    in_each_tunnel(
        &mut lab,
        |lab, t| lab.tunnel_config(t, "round-robin", false, ""),
        |lab, tunnel| {
            let before = decapsulated(lab, tunnel)?;
            let got = answers(lab, 6)?;
            let want: Vec<&str> = (0..6).map(|i| WEB_NAMES[i % 3]).collect();
            ensure!(got == want, "new connections went to {got:?}, not {want:?}");
            let started = Instant::now();
            let len = transfer(lab, BIG)
                .join()
                .map_err(|_| anyhow::anyhow!("the transfer thread panicked"))??;
            ensure!(len == BIG, "received {len} bytes of {BIG}");
            eprintln!(
                "{}: 8 MB byte-exact in {:.2?}",
                tunnel.name(),
                started.elapsed()
            );
            every_web_decapsulated(lab, &before, &decapsulated(lab, tunnel)?, tunnel.name())
        },
    )
}

/// A web whose server is killed goes DOWN (its HTTP check fails through
/// the router), leaves the rotation, and comes back UP once restarted.
#[test]
fn a_killed_web_goes_down_and_recovers_behind_each_tunnel() -> Result<()> {
    let mut lab = routed_lab()?;
    let health = |lab: &Lab, web: &str, want: HealthStatus, what: &str| {
        wait_for_status(lab, what, Duration::from_secs(10), |s| {
            backend_status(s, "www", web).is_ok_and(|b| b.health == want)
        })
    };
    in_each_tunnel(&mut lab, checked, |lab, _| {
        for web in WEB_NAMES {
            health(lab, web, HealthStatus::Up, &format!("{web} up"))?;
        }
        lab.stop_web(2)?;
        let took = health(lab, "web2", HealthStatus::Down, "web2 down after its kill")?;
        eprintln!("web2 down {took:.2?} after its server was killed");
        let got = answers(lab, 6)?;
        ensure!(
            !got.iter().any(|w| w == "web2"),
            "new connections reached the dead web2: {got:?}"
        );
        lab.start_web(2)?;
        let took = health(lab, "web2", HealthStatus::Up, "web2 up after its restart")?;
        eprintln!("web2 up {took:.2?} after its restart");
        let got = count(&answers(lab, 9)?);
        ensure!(
            got.get("web2").copied().unwrap_or(0) > 0,
            "the recovered web2 gets no new connection: {got:?}"
        );
        Ok(())
    })
}

/// A drained web keeps its tunnelled connections (answering from it) while
/// new ones go elsewhere, and its `active` flows fall to 0 once its
/// clients close.
#[test]
fn a_drained_web_keeps_its_tunnelled_flows_until_they_close() -> Result<()> {
    let mut lab = routed_lab()?;
    in_each_tunnel(
        &mut lab,
        |lab, t| {
            lab.tunnel_config(t, "round-robin", false, "")
                + "\n[dataplane.timeouts]\ntcp-closing = \"1s\"\n"
        },
        |lab, _| drain_web1_until_its_clients_close(lab),
    )
}

/// Path-MTU discovery through the tunnel: the router's link to the webs is
/// lowered to 1400 bytes, and the LB's route to the webs' subnet says so
/// (`mtu lock 1400`, what `bpf_fib_lookup` reports as the next hop's MTU).
/// The client's full-size upload segments, once encapsulated, would not
/// fit; the client gets "fragmentation needed" from the VIP with 1400 minus
/// the tunnel's overhead (1380 IPIP, 1368 GUE), and the upload completes.
///
/// The route's MTU is needed: the router's own "fragmentation needed" goes
/// to the LB's tunnel source (the outer packet's), and neither the LB's
/// data plane nor its kernel (no tunnel device or socket for that quote)
/// turns it into one for the client — without the route, the upload stalls
/// (README, "The routed lab").
#[test]
fn path_mtu_discovery_through_the_tunnel_gives_the_client_mtu_minus_overhead() -> Result<()> {
    let mut lab = routed_lab()?;
    let low = lower_the_routers_web_link(&lab)?;
    let router = ROUTER_LB_SIDE.to_string();
    lab.exec_ok(
        &lab.lb_ns(),
        &[
            "ip", "route", "replace", WEB_NET, "via", &router, "mtu", "lock", &low,
        ],
    )?;
    let vip = VIP.to_string();
    in_each_tunnel(&mut lab, checked, |lab, tunnel| {
        for ns in [lab.client_ns(), lab.lb_ns()] {
            forget_path_mtus(&ns)?;
        }
        in_netns(&lab.client_ns(), || upload(300_000))??;
        let want = LOW_MTU - tunnel.overhead();
        let got = cached_mtu(lab, &lab.client_ns(), &vip)?;
        ensure!(
            got == Some(want),
            "the client's path MTU to the VIP is {got:?}, not {want} ({LOW_MTU} - {} bytes of {}); verdicts: {:?}",
            tunnel.overhead(),
            tunnel.name(),
            status(lab)?.verdicts
        );
        let frag_needed = status(lab)?
            .verdicts
            .get("frag_needed")
            .copied()
            .unwrap_or(0);
        ensure!(frag_needed > 0, "no frag_needed counted");
        Ok(())
    })
}

/// Path-MTU discovery when a router further on has the smaller link (no
/// `mtu lock` on the LB's route this time): only the router's link to the
/// webs is lowered to 1400. The LB's next hop takes 1500, so the tunnel
/// packet leaves; the router's "fragmentation needed" goes to the LB's
/// tunnel source, where the data plane learns 1400 for that web
/// (`tunnel_icmp`), and the client's retransmission gets "fragmentation
/// needed" from the VIP with 1400 minus the overhead. An 8 MB upload
/// completes (the web's server reads the whole body before it answers).
#[test]
fn path_mtu_discovery_learns_a_routers_smaller_link_beyond_the_lb() -> Result<()> {
    let mut lab = routed_lab()?;
    // The LB's answers leave by XDP_TX: see `run_xdp_on_client_front`.
    lab.run_xdp_on_client_front()?;
    lower_the_routers_web_link(&lab)?;
    let route = lab.exec_ok(&lab.lb_ns(), &["ip", "route", "show", WEB_NET])?;
    ensure!(
        !route.contains("mtu"),
        "the LB's route declares an MTU: {route}"
    );
    let vip = VIP.to_string();
    in_each_tunnel(&mut lab, checked, |lab, tunnel| {
        for ns in [lab.client_ns(), lab.lb_ns()] {
            forget_path_mtus(&ns)?;
        }
        let started = Instant::now();
        let uploaded = in_netns(&lab.client_ns(), || upload(BIG))?;
        let took = started.elapsed();
        let (counts, mtus) = learned_pmtus(lab)?;
        let verdicts = status(lab)?.verdicts;
        uploaded.with_context(|| {
            format!(
                "after {took:?}; learned {mtus:?}, (learned, clamped, refused) {counts:?}; verdicts {verdicts:?}"
            )
        })?;
        let want = LOW_MTU - tunnel.overhead();
        let got = cached_mtu(lab, &lab.client_ns(), &vip)?;
        ensure!(
            got == Some(want),
            "the client's path MTU to the VIP is {got:?}, not {want} ({LOW_MTU} - {} bytes of {}); verdicts: {verdicts:?}",
            tunnel.overhead(),
            tunnel.name(),
        );
        // The LB learned the router's link for the web that served it.
        ensure!(
            counts[0] >= 1 && counts[1] == 0 && counts[2] == 0,
            "(learned, clamped, refused): {counts:?}"
        );
        ensure!(
            mtus.len() == 1 && mtus[0].1 == LOW_MTU as u16,
            "the LB learned {mtus:?}, not {LOW_MTU} for one web"
        );
        let frag_needed = verdicts.get("frag_needed").copied().unwrap_or(0);
        ensure!(frag_needed > 0, "no frag_needed counted");
        println!(
            "{}: 8 MB upload with the router's link at {LOW_MTU} in {} ms; client path MTU {want}",
            tunnel.name(),
            took.as_millis()
        );
        Ok(())
    })
}

/// (learned, clamped, refused) counts and (web, path MTU) pairs.
type Learned = ([u64; 3], Vec<(Ipv4Addr, u16)>);

/// What the LB's data plane learned from routers (its pinned
/// `TUNNEL_PMTU_STATS`: learned, clamped, refused) and the live path MTUs
/// by web address (`TUNNEL_PMTU`).
fn learned_pmtus(lab: &Lab) -> Result<Learned> {
    use aya::maps::{HashMap, Map, MapData, PerCpuArray};
    use lb_common::map_names::MapName;
    use lb_common::tunnel::TunnelPmtu;
    let pin = |map: MapName| {
        MapData::from_pin(lab.pin_dir().join(map.name()))
            .with_context(|| format!("the pinned {}", map.name()))
    };
    let stats: PerCpuArray<_, u64> =
        PerCpuArray::try_from(Map::PerCpuArray(pin(MapName::TUNNEL_PMTU_STATS)?))?;
    let mut counts = [0u64; 3];
    for (i, n) in counts.iter_mut().enumerate() {
        *n = stats.get(&(i as u32), 0)?.iter().sum();
    }
    let map: HashMap<_, u32, TunnelPmtu> =
        HashMap::try_from(Map::HashMap(pin(MapName::TUNNEL_PMTU)?))?;
    let mtus = map
        .iter()
        .filter_map(|e| e.ok())
        .filter(|(_, e)| e.mtu != 0)
        .map(|(addr, e)| (Ipv4Addr::from(u32::from_be(addr)), e.mtu))
        .collect();
    Ok((counts, mtus))
}

/// Polls until `service`'s `web` is `want` (within `within`), checking on
/// every poll that every other backend of `www` and every backend of
/// `plain` is UP (the plain check never notices what the test breaks).
/// How long it took.
fn through_vip_wait(
    lab: &Lab,
    web: &str,
    want: HealthStatus,
    within: Duration,
) -> Result<Duration> {
    let start = Instant::now();
    loop {
        let s = status(lab)?;
        for other in WEB_NAMES {
            let plain = backend_status(&s, "plain", other)?;
            ensure!(
                plain.health == HealthStatus::Up,
                "the plain check lost {other}: {plain:?}"
            );
            let www = backend_status(&s, "www", other)?;
            ensure!(
                other == web || www.health == HealthStatus::Up,
                "www/{other} left UP: {www:?}"
            );
        }
        let now = backend_status(&s, "www", web)?;
        if now.health == want {
            return Ok(start.elapsed());
        }
        ensure!(
            start.elapsed() < within,
            "www/{web} is {:?}, not {want:?}, after {within:?}: {now:?}",
            now.health
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// The check through the VIP for a tunnel backend (issue 26), over each
/// tunnel: `www`'s HTTP check has `through-vip = true` (the probe goes
/// encapsulated to the backend like a client's packet), `plain`'s checks
/// each web's own address. All UP; then
/// - web1 loses the VIP from its `lo`: DOWN under `www` only (the plain
///   check keeps it UP), new connections avoid it; the VIP back: UP;
/// - web2's decapsulator is detached: DOWN under `www` only, new
///   connections avoid it; attached again: UP.
///
/// The probes' answers come back from the VIP by the router: the LB
/// hands one into its probe namespace only if it arrives by the interface
/// and from the MAC the probe left to (`lb_common::probe::answers`), so
/// every UP under `www` is that path working; the webs' route to the
/// probes' source is the router, the one the probes left by.
#[test]
fn a_tunnel_backend_without_the_vip_or_its_decapsulator_fails_the_check_through_the_vip()
-> Result<()> {
    let mut lab = routed_lab()?;
    let within = Duration::from_secs(5);
    let source = lab.tunnel_sources()[0].to_string();
    for n in 1..=WEB_NAMES.len() {
        let back = lab.exec_ok(
            &lab.web_ns(n),
            &["ip", "route", "get", &source, "from", &VIP.to_string()],
        )?;
        ensure!(
            back.contains(&format!("via {ROUTER_WEB_SIDE}")),
            "web{n}'s route to the probes' source {source}: {back}"
        );
    }
    let vip = format!("{VIP}/32");
    in_each_tunnel(
        &mut lab,
        |lab, t| lab.through_vip_config(t),
        |lab, tunnel| {
            let name = tunnel.name();
            wait_for_status(lab, "every backend up", Duration::from_secs(10), |s| {
                s.services
                    .iter()
                    .all(|svc| svc.backends.iter().all(|b| b.health == HealthStatus::Up))
            })?;

            lab.exec_ok(&lab.web_ns(1), &["ip", "addr", "del", &vip, "dev", "lo"])?;
            let down = through_vip_wait(lab, "web1", HealthStatus::Down, within)?;
            let www1 = backend_status(&status(lab)?, "www", "web1")?;
            ensure!(
                www1.last_check
                    .as_deref()
                    .unwrap_or("")
                    .contains("through the VIP"),
                "{www1:?}"
            );
            let got = answers(lab, 6)?;
            ensure!(
                !got.iter().any(|w| w == "web1"),
                "new connections reached web1 without the VIP: {got:?}"
            );
            lab.exec_ok(&lab.web_ns(1), &["ip", "addr", "add", &vip, "dev", "lo"])?;
            let up = through_vip_wait(lab, "web1", HealthStatus::Up, within)?;
            println!(
                "{name}: www/web1 DOWN {} ms after the VIP left its lo, UP {} ms after it came back",
                down.as_millis(),
                up.as_millis()
            );

            lab.detach_decap(2)?;
            let down = through_vip_wait(lab, "web2", HealthStatus::Down, within)?;
            let got = answers(lab, 6)?;
            ensure!(
                !got.iter().any(|w| w == "web2"),
                "new connections reached web2 without its decapsulator: {got:?}"
            );
            // Its own address still answers the plain check (`through_vip_wait`
            // checked `plain` on every poll); a while longer:
            through_vip_wait(lab, "web2", HealthStatus::Down, within)?;
            thread::sleep(Duration::from_millis(600));
            through_vip_wait(lab, "web2", HealthStatus::Down, within)?;
            lab.attach_decap(2)?;
            let up = through_vip_wait(lab, "web2", HealthStatus::Up, within)?;
            println!(
                "{name}: www/web2 DOWN {} ms after its decapsulator was detached, UP {} ms after it came back",
                down.as_millis(),
                up.as_millis()
            );
            let got = count(&answers(lab, 6)?);
            ensure!(
                got.len() == 3,
                "after recovery, new connections went to {got:?}"
            );
            // Probes are not client traffic, and the answers were handed in.
            let forwarded = status(lab)?
                .verdicts
                .get("forwarded_probe_reply")
                .copied()
                .unwrap_or(0);
            ensure!(forwarded > 0, "no probe answer handed over");
            Ok(())
        },
    )
}

/// Ten keep-alive tunnelled connections survive a flood of spoofed SYNs
/// ten times the connection tables (`lb pktgen --proto tcp-syn`), while new
/// connections made during and after it are all served. The webs' kernels
/// answer the SYNs that reach them towards spoofed sources the router
/// cannot reach.
#[test]
fn tunnelled_keepalive_connections_survive_a_syn_flood_ten_times_the_tables() -> Result<()> {
    let mut lab = routed_lab()?;
    let small = format!("conntrack-size = {TABLE}\n");
    in_each_tunnel(
        &mut lab,
        |lab, t| lab.tunnel_config(t, "round-robin", false, &small),
        |lab, tunnel| keepalive_connections_survive_a_syn_flood(lab, tunnel.name()),
    )
}

/// Held keep-alive connections in the multi-LB lab: each asks `GET /`
/// every 20 ms on its own thread; (backend, answers, error, longest gap).
type Held = (
    Arc<AtomicBool>,
    Vec<thread::JoinHandle<(String, usize, Option<String>, Duration)>>,
);

fn hold(lab: &Lab, n: usize) -> Result<Held> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for _ in 0..n {
        let mut conn = in_netns(&lab.client_ns(), || HttpConn::connect(vip_http()))??;
        let stop = stop.clone();
        threads.push(thread::spawn(move || {
            let (mut backend, mut answered, mut error) = (String::new(), 0, None);
            let (mut last, mut gap) = (Instant::now(), Duration::ZERO);
            while !stop.load(Ordering::Relaxed) && error.is_none() {
                match conn.get("/") {
                    Ok(r) if backend.is_empty() || r.text() == backend => {
                        backend = r.text();
                        answered += 1;
                        gap = gap.max(last.elapsed());
                        last = Instant::now();
                    }
                    Ok(r) => error = Some(format!("moved from {backend} to {}", r.text())),
                    Err(e) => error = Some(format!("{e:#}")),
                }
                thread::sleep(Duration::from_millis(20));
            }
            (backend, answered, error, gap)
        }));
    }
    Ok((stop, threads))
}

/// Two LBs behind the ECMP router (`lb lab up --lbs 2`), `www` over IPIP
/// with maglev on both, every web decapsulating from both LBs' tunnel
/// sources: lb1 is cut off while twelve keep-alive connections run; the
/// router's route drops it (BFD) and the connections that crossed it go on
/// through lb2 to the same web — none broken.
#[test]
fn two_lbs_lose_one_and_break_no_tunnelled_connection() -> Result<()> {
    let lab = Lab::up_ha(&unique_prefix("tun"), &lb_bin(), 2)?;
    lab.set_mode(Forwarding::Dsr)?;
    lab.attach_decaps()?;
    let agents = (1..=2)
        .map(|n| lab.start_agent_on(n, &lab.ha_tunnel_config(n, Tunnel::Ipip)?))
        .collect::<Result<Vec<_>>>()?;
    let logs = || {
        agents
            .iter()
            .map(|a| a.log_text())
            .collect::<Vec<_>>()
            .join("\n---\n")
    };
    let both: Vec<Ipv4Addr> = (1..=2).map(lb_front_addr).collect();
    lab.wait_for_route(&both, Duration::from_secs(20))
        .with_context(logs)?;
    let packets = |n: usize| -> Result<u64> {
        let socket = lab.agent_socket_of(n);
        let s = lb_userspace::control::request(&socket, &lb_userspace::control::Request::Status)?
            .status
            .context("no status")?;
        Ok(s.services.iter().map(|s| s.packets).sum())
    };
    let (stop, threads) = hold(&lab, 12)?;
    thread::sleep(Duration::from_secs(1));
    let lb1_before = packets(1)?;
    lab.set_lb_reachable(1, false)?;
    let took = lab.wait_for_route(&[lb_front_addr(2)], Duration::from_secs(5));
    thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::Relaxed);
    let held: Vec<_> = threads
        .into_iter()
        .map(|t| {
            t.join()
                .map_err(|_| anyhow::anyhow!("a connection thread panicked"))
        })
        .collect::<Result<_>>()?;
    let took = took.with_context(logs)?;
    let broken: Vec<_> = held.iter().filter(|h| h.2.is_some()).collect();
    let moved = held
        .iter()
        .filter(|h| h.2.is_some() || h.3 > Duration::from_millis(200))
        .count();
    let longest = held.iter().map(|h| h.3).max().unwrap_or_default();
    println!(
        "IPIP + maglev, lb1 cut off: route converged in {took:.2?}; {moved} of {} held connections crossed lb1, {} broken, longest gap {longest:.2?}",
        held.len(),
        broken.len()
    );
    ensure!(lb1_before > 0, "no flow crossed lb1 before it failed");
    ensure!(moved > 0, "no held connection crossed lb1: {held:?}");
    ensure!(
        broken.is_empty(),
        "held connections broke: {broken:?}\n{}",
        logs()
    );
    ensure!(packets(2)? > 0, "lb2 forwarded nothing");
    Ok(())
}
