//! The two-LB ECMP failover over IPv6 (issue 24): the multi-LB lab is
//! dual-stack (`harness/lab/ha.rs`), each LB's agent announces the IPv6
//! VIP as a /128 over its BGP session's ipv6 channel (`[announce]`, BIRD's
//! `lb_vips6`), and the router merges the two announcements into one IPv6
//! ECMP route hashed over L4. Both LBs serve the IPv6 VIP (`www6`, DSR,
//! next to the IPv4 VIP's `www`); then lb1 is cut off under load as ha.rs
//! does for IPv4 (its front switch port stops forwarding, BFD tells the
//! router), and the test counts and reports what the held IPv6 connections
//! and a stream of new ones saw: with a consistent hash (`maglev`) none
//! breaks; with round robin those lb1 carried may.
//!
//! The scenarios run one at a time (as in ha.rs: BFD must not see an LB
//! as dead because two labs share two cores). Needs root, BIRD and the
//! `lb` binary in `LB_BIN` (`cargo xtask test` provides them); fails
//! loudly without them.

use std::{
    net::IpAddr,
    sync::{Mutex, PoisonError},
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use lb_tests::multi_lb::{Failover, Ha, WithAgentLogs, fail_lb1_to, fail_lb1_to_then};
use lb_userspace::{
    config::Forwarding,
    harness::{
        lab::{
            HA_CLIENT6, VIP, VIP6, WEB_NAMES, ha_service6, http_get, lb_back_addr6, lb_front_addr6,
            vip6_http,
        },
        netns::{self, in_netns},
    },
};

static SERIAL: Mutex<()> = Mutex::new(());

/// Two LBs in DSR serving the IPv4 VIP's `www` and the IPv6 VIP's `www6`,
/// both with `scheduler`, announcing both VIPs with equal MEDs.
fn up(scheduler: &str) -> Result<Ha> {
    up_dual(Forwarding::Dsr, scheduler, [0, 0], false)
}

/// Two LBs in `mode` serving `www` and `www6` with `scheduler`, LB n
/// announcing both VIPs with MED `meds[n-1]`; with `sync`, the lab's
/// `[sync]` between them (each listening on its back address).
fn up_dual(mode: Forwarding, scheduler: &str, meds: [u32; 2], sync: bool) -> Result<Ha> {
    let vips = [IpAddr::from(VIP), IpAddr::from(VIP6)];
    Ha::up_configured(2, mode, meds, &vips, |lab, n, med| {
        let mut cfg =
            lab.ha_config(n, mode, scheduler, med) + &ha_service6("www6", VIP6, scheduler);
        if sync {
            cfg += &lab.sync_section(n);
        }
        cfg
    })
}

/// Packets LB `n` forwarded for the IPv6 service.
fn v6_packets(ha: &Ha, n: usize) -> Result<u64> {
    let status = ha.status(n)?;
    let service = status
        .services
        .iter()
        .find(|s| s.name == "www6")
        .with_context(|| format!("lb{n} has no www6: {:?}", status.services))?;
    Ok(service.packets)
}

/// `n` new IPv6 connections from the client (`GET /`); the webs that
/// answered.
fn new_v6_connections(ha: &Ha, n: usize) -> Result<Vec<String>> {
    in_netns(&ha.lab.client_ns(), || {
        (0..n)
            .map(|_| http_get(vip6_http(), "/").map(|r| r.text()))
            .collect::<Result<Vec<_>>>()
    })?
}

/// Both LBs carry new IPv6 connections (ECMP over the /128s), then lb1 is
/// cut off under IPv6 load.
fn spread_then_fail_lb1(ha: &Ha, what: &str) -> Result<Failover> {
    let route = ha.lab.wait_for_route_to(
        VIP6,
        &[lb_front_addr6(1), lb_front_addr6(2)],
        Duration::ZERO,
    );
    route.context("the router's IPv6 route is not over both LBs")?;
    let answered = new_v6_connections(ha, 60)?;
    let (p1, p2) = (v6_packets(ha, 1)?, v6_packets(ha, 2)?);
    let webs: std::collections::BTreeSet<&str> = answered.iter().map(String::as_str).collect();
    println!(
        "{what}: 60 new IPv6 connections from {HA_CLIENT6} to [{VIP6}]:80 answered by {webs:?}; \
         lb1 forwarded {p1} packets of www6, lb2 {p2}"
    );
    ensure!(answered.len() == 60, "{} of 60 answered", answered.len());
    ensure!(
        p1 > 0 && p2 > 0,
        "ECMP must use both LBs over IPv6: lb1 {p1}, lb2 {p2}"
    );
    let f = fail_lb1_to(ha, &[2], vip6_http()).with_agent_logs(ha)?;
    f.report(what);
    ensure!(
        f.lb1_packets_before > 0,
        "no flow crossed lb1 before it failed"
    );
    ensure!(f.moved() > 0, "no held connection crossed lb1: {f:#?}");
    // New IPv6 connections succeed through lb2: a SYN sent to lb1 before
    // the route moved is retransmitted to lb2.
    ensure!(
        f.new_failed.is_empty() && f.new_ok > 0,
        "new IPv6 connections failed: {f:#?}"
    );
    ensure!(
        v6_packets(ha, 2)? > p2,
        "lb2 forwarded no IPv6 packet after the cut"
    );
    Ok(f)
}

#[test]
fn ipv6_flows_spread_over_two_lbs_and_consistent_hash_ones_survive_the_loss_of_one() -> Result<()> {
    let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let ha = up("maglev")?;
    let f = spread_then_fail_lb1(&ha, "maglev, DSR, IPv6, lb1 cut off")?;
    // lb2 picks every moved flow up by the same hash: none breaks.
    ensure!(f.broken() == 0, "{f:#?}");
    // Bounded: BFD's 500 ms, then TCP's retransmission finds lb2.
    ensure!(f.longest_gap() < Duration::from_secs(3), "{f:#?}");
    Ok(())
}

#[test]
fn ipv6_round_robin_flows_moved_to_the_other_lb_break_and_new_ones_succeed() -> Result<()> {
    let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let ha = up("round-robin")?;
    let f = spread_then_fail_lb1(&ha, "round-robin, DSR, IPv6, lb1 cut off")?;
    // Flows that stayed on lb2 are untouched; those that crossed lb1 miss
    // lb2's tables and are scheduled afresh (most land on another web,
    // which resets them): counted and reported, never more than moved.
    ensure!(
        f.broken() <= f.moved(),
        "flows that stayed on lb2 broke too: {f:#?}"
    );
    Ok(())
}

/// With flow sync, round-robin IPv6 flows that move from a dead LB to the
/// other keep their backend there: none breaks (without sync, the test
/// above counts those that do).
#[test]
fn synced_ipv6_round_robin_flows_survive_the_loss_of_an_lb() -> Result<()> {
    let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let ha = up_dual(Forwarding::Dsr, "round-robin", [0, 0], true)?;
    let f = spread_then_fail_lb1(&ha, "round-robin, DSR, IPv6, sync, lb1 cut off")?;
    ensure!(f.broken() == 0, "{f:#?}");
    ensure!(f.longest_gap() < Duration::from_secs(3), "{f:#?}");
    Ok(())
}

/// NAT66 behind two LBs, active-passive (lb2 announces with a higher MED)
/// with flow sync, lb1 the webs' IPv6 gateway: when lb1 dies (front and
/// back) and the webs' IPv6 default route moves to lb2 (what the
/// operator's routing does; here the test moves it), the held NAT66
/// connections go on through lb2, which had their flows and reply
/// translations from sync, and new ones succeed.
#[test]
fn synced_nat66_flows_survive_the_primary_dying_when_the_gateway_moves() -> Result<()> {
    let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let ha = up_dual(Forwarding::Nat, "round-robin", [0, 100], true)?;
    ha.lab
        .wait_for_route_to(VIP6, &[lb_front_addr6(1)], Duration::from_secs(5))
        .context("the router's IPv6 route is not via lb1 alone")?;
    let standby_before = v6_packets(&ha, 2)?;
    let f = fail_lb1_to_then(&ha, &[2], vip6_http(), |ha| {
        // The whole host is gone: its back leg too (it is the webs'
        // gateway, and would otherwise still take their replies).
        netns::ns_run(
            &ha.lab.sw_ns(),
            &["bridge", "link", "set", "dev", "p-lb1b", "state", "0"],
        )?;
        let standby = lb_back_addr6(2).to_string();
        for w in 1..=WEB_NAMES.len() {
            netns::ns_run(
                &ha.lab.web_ns(w),
                &["ip", "-6", "route", "replace", "default", "via", &standby],
            )?;
        }
        Ok(())
    })
    .with_agent_logs(&ha)?;
    f.report("sync, NAT66 active-passive, primary cut off, gateway moved");
    let standby_after = v6_packets(&ha, 2)?;
    ensure!(
        standby_before == 0 && standby_after > 0,
        "the standby forwarded {standby_before} IPv6 packets before the primary died, \
         {standby_after} after"
    );
    ensure!(f.lb1_packets_before > 0, "no flow crossed lb1");
    ensure!(f.broken() == 0, "{f:#?}");
    ensure!(
        f.new_failed.is_empty() && f.new_ok > 0,
        "new IPv6 connections failed: {f:#?}"
    );
    Ok(())
}
