//! End to end, full NAT (issue 25): the lab's web servers with **no** route
//! to the client network (no route to it, their default route a
//! blackhole, no VIP on `lo`) serve a `forwarding = "full-nat"` service
//! through the real agent: new connections rotate, an 8 MB download is
//! byte-exact, and a killed web leaves the rotation and comes back.
//!
//! Needs root and the `lb` binary in `LB_BIN` (`cargo xtask test` sets both
//! up). The lab is built under a unique prefix.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use lb_tests::{
    FALL, INTERVAL_MS, RISE, backend_status, checked_status, lb_bin, transfer, unique_prefix,
    wait_for_status, web_config,
};
use lb_userspace::{
    config::Forwarding,
    harness::{
        lab::{HttpConn, LB_BACK, Lab, VIP, WEB_NAMES, http_get, vip_http},
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
