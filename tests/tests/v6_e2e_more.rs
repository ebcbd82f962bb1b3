//! End to end over IPv6 (issue 24), the cases after v6_e2e.rs's rotation,
//! pinning and 8 MB: the real `lb` agent and real clients through the
//! lab's VIP6 [2001:db8:18::10].
//!
//! - A NAT66 reply to a client the LB's kernel has no neighbour entry for
//!   is delivered: the data plane reports the next hop (`NEIGH_WANTED6`),
//!   the agent has the kernel resolve it (neighbour discovery), and the
//!   backend's retransmitted SYN-ACK gets through — new connections after
//!   `ip -6 neigh flush all` on the LB succeed within the client's connect
//!   timeout; a keep-alive connection carries on.
//! - A web killed goes DOWN (HTTP check over IPv6), leaves the rotation and
//!   comes back UP once restarted, in NAT66 and DSR.
//! - A drained web keeps its IPv6 connections while new ones go elsewhere,
//!   and its `active` flows fall to 0 once its clients close, in NAT66 and
//!   DSR.
//!
//! HTTPS through the VIP6 is in https.rs. Needs root and the `lb` binary in
//! `LB_BIN` (`cargo xtask test` sets both up); without them the tests fail
//! loudly.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use lb_tests::{
    answers_at, backend_status, count,
    flood::drain_web1_of,
    in_each_mode,
    lab6::{self, checked_config_v6},
    wait_for_status,
};
use lb_userspace::{
    config::Forwarding,
    control::HealthStatus,
    harness::lab::{CLIENT_FRONT6, Lab, WEB_NAMES, vip6_http},
};

/// Waits until backend `web` of `www6` reports `want`.
fn health(lab: &Lab, web: &str, want: HealthStatus, what: &str) -> Result<Duration> {
    wait_for_status(lab, what, Duration::from_secs(10), |s| {
        backend_status(s, "www6", web).is_ok_and(|b| b.health == want)
    })
}

/// NAT66 only: in DSR the replies do not cross the LB. Three rounds of:
/// the LB's IPv6 neighbour table flushed (the client's entry gone), the
/// keep-alive connection's next request answered by its own web (an
/// established flow keeps the next hop it resolved), and a new connection
/// answered — its SYN-ACK finds no entry, is dropped and its next hop
/// reported, the agent has the kernel resolve it, and the backend's
/// retransmission gets through (before IPv6 next hops were reported, it
/// timed out: nothing resolved the client); the client's entry is back.
#[test]
fn nat66_replies_reach_a_client_the_lbs_kernel_has_no_neighbour_entry_for() -> Result<()> {
    let lab = lab6::up("lbv6n")?;
    lab.set_mode(Forwarding::Nat)?;
    let agent = lab.start_agent(&checked_config_v6(Forwarding::Nat))?;
    let run = || -> Result<()> {
        let lb = lab.lb_ns();
        let client = CLIENT_FRONT6.to_string();
        let neighbour = || {
            lab.exec_ok(
                &lb,
                &["ip", "-6", "neigh", "show", &client, "dev", "lb-front"],
            )
        };
        let mut dropped = 0;
        lb_tests::connections_carry_on_when_the_client_neighbour_goes(
            &lab,
            vip6_http(),
            neighbour,
            || {
                lab.exec_ok(&lb, &["ip", "-6", "neigh", "flush", "all"])
                    .map(drop)
            },
            |_| {
                dropped = lb_tests::status(&lab)?
                    .verdicts
                    .get("drop_no_neighbour")
                    .copied()
                    .unwrap_or(0);
                Ok(())
            },
        )?;
        // The SYN-ACKs met the flushed table: each round's first was
        // dropped and reported (not resolved some other way).
        ensure!(
            dropped >= 3,
            "{dropped} replies counted drop_no_neighbour in 3 rounds"
        );
        Ok(())
    };
    run().with_context(|| format!("agent stderr:\n{}", agent.log_text()))?;
    agent.stop()
}

/// A web whose server is killed goes DOWN (its HTTP check over IPv6
/// fails), new IPv6 connections avoid it, and once restarted it comes back
/// UP and takes new connections again.
#[test]
fn a_killed_ipv6_web_goes_down_and_recovers_in_nat66_and_dsr() -> Result<()> {
    let mut lab = lab6::up("lbv6k")?;
    in_each_mode(&mut lab, checked_config_v6, |lab, mode| {
        for web in WEB_NAMES {
            health(lab, web, HealthStatus::Up, &format!("{web} up"))?;
        }
        lab.stop_web(2)?;
        let took = health(lab, "web2", HealthStatus::Down, "web2 down after its kill")?;
        eprintln!("{mode:?}: web2 down {took:.2?} after its server was killed");
        let got = answers_at(lab, vip6_http(), 6)?;
        ensure!(
            !got.iter().any(|w| w == "web2"),
            "new IPv6 connections reached the dead web2: {got:?}"
        );
        ensure!(
            count(&got).len() == 2,
            "web1 and web3 share the rotation: {got:?}"
        );
        lab.start_web(2)?;
        let took = health(lab, "web2", HealthStatus::Up, "web2 up after its restart")?;
        eprintln!("{mode:?}: web2 up {took:.2?} after its restart");
        let got = count(&answers_at(lab, vip6_http(), 9)?);
        ensure!(
            got.get("web2").copied().unwrap_or(0) > 0,
            "the recovered web2 gets no new IPv6 connection: {got:?}"
        );
        Ok(())
    })
}

/// A drained web keeps its IPv6 keep-alive connections (answering from
/// it) while new ones go elsewhere, and its `active` flows fall to 0 once
/// its clients close (`flood::drain_web1_of`, as IPv4's and the tunnels').
#[test]
fn a_drained_ipv6_web_keeps_its_connections_until_they_close_in_nat66_and_dsr() -> Result<()> {
    let mut lab = lab6::up("lbv6d")?;
    in_each_mode(&mut lab, checked_config_v6, |lab, _| {
        for web in WEB_NAMES {
            health(lab, web, HealthStatus::Up, &format!("{web} up"))?;
        }
        drain_web1_of(lab, "www6", vip6_http())
    })
}
