//! The agent over IPv6 (issue 24): the monitoring listener on an IPv6
//! address of the dual-stack lab, fetched by curl from the client's
//! namespace across the LB's XDP interface; the start-up forwarding check
//! reading `net.ipv6.conf.IF.forwarding` in the LB's namespace; and an
//! agent restart that keeps an IPv6 service's backends serving. Needs root
//! and the lab; fails loudly without them, never skips.

use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use lb_tests::{
    backend_status, checked_status, lab6, lb_bin, steady_stream_at, three_webs, unique_prefix,
    wait_for_status,
};
use lb_userspace::{
    control::HealthStatus,
    doctor::{self, Check, Severity},
    harness::{
        lab::{LB_FRONT6, Lab, vip_http, vip6_http},
        netns::{self, in_netns},
    },
};

/// `curl -6` from the client's namespace until the listener answers.
fn curl6(lab: &Lab, url: &str) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = netns::ns_output(
            &lab.client_ns(),
            &["curl", "-6", "-sS", "--fail", "--max-time", "3", url],
        )?;
        if out.status.success() {
            return String::from_utf8(out.stdout).context("curl output: not UTF-8");
        }
        if Instant::now() > deadline {
            bail!(
                "curl -6 {url}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn metrics_are_served_over_ipv6() -> Result<()> {
    let lab = Lab::up(&unique_prefix("lbm6"), &lb_bin())?;
    let config = format!(
        "{}\n[monitoring]\nlisten = \"[{LB_FRONT6}]:9100\"\n",
        three_webs()
    );
    let _agent = lab.start_agent(&config)?;
    let metrics = curl6(&lab, &format!("http://[{LB_FRONT6}]:9100/metrics"))?;
    ensure!(
        metrics.contains("lb_backend_up{") && metrics.trim_end().ends_with("# EOF"),
        "not OpenMetrics with the backends: {metrics}"
    );
    for web in ["web1", "web2", "web3"] {
        ensure!(
            metrics.contains(&format!("backend=\"{web}\"")),
            "{web} missing from /metrics over IPv6"
        );
    }
    // The status page and the JSON it renders.
    let page = curl6(&lab, &format!("http://[{LB_FRONT6}]:9100/"))?;
    ensure!(
        page.contains("status.json"),
        "the status page over IPv6: {page}"
    );
    let status = curl6(&lab, &format!("http://[{LB_FRONT6}]:9100/status.json"))?;
    let status: serde_json::Value = serde_json::from_str(&status).context("status.json")?;
    ensure!(
        status.to_string().contains("\"web1\""),
        "status.json over IPv6: {status}"
    );
    // The IPv4 loopback is not where it listens.
    let v4 = netns::ns_output(
        &lab.lb_ns(),
        &[
            "curl",
            "-sS",
            "--max-time",
            "2",
            "http://127.0.0.1:9100/metrics",
        ],
    )?;
    ensure!(!v4.status.success(), "listening on IPv4 too");
    Ok(())
}

/// The forwarding findings of `cfg` on the lab LB's interfaces, gathered
/// in its namespace as `lb run` does at start.
fn forwarding_findings(lab: &Lab, cfg: &lb_userspace::config::Config) -> Result<Vec<String>> {
    let pin_dir = lab.pin_dir();
    let facts = in_netns(&lab.lb_ns(), || doctor::gather(cfg, &pin_dir, false))??;
    Ok(doctor::findings(cfg, &facts)
        .into_iter()
        .filter(|f| f.check == Check::Forwarding)
        .map(|f| {
            format!(
                "{:?} {}: {} ({})",
                f.severity,
                f.subject,
                f.message,
                f.fix.unwrap_or_default()
            )
        })
        .collect())
}

#[test]
fn the_forwarding_check_reads_ipv6_forwarding_for_ipv6_services() -> Result<()> {
    let lab = Lab::up(&unique_prefix("lbf6"), &lb_bin())?;
    let v4 = lb_userspace::config::parse(&three_webs(), Path::new("lab.toml"))?;
    let mut v6 = v4.clone();
    // Built by hand: the config's gate refuses an IPv6 service in a file
    // until the data plane balances IPv6.
    v6.services[0].vip = "[2001:db8:18::10]:80".parse()?;
    for (i, b) in v6.services[0].backends.iter_mut().enumerate() {
        b.address = format!("[2001:db8:19::1{}]:80", i + 1).parse()?;
    }
    let ifaces = v4.dataplane.interfaces.clone();
    let lb = lab.lb_ns();
    for iface in &ifaces {
        netns::sysctl(&lb, &format!("net/ipv6/conf/{iface}/forwarding"), "0")?;
    }
    // IPv4 only: IPv6 forwarding is not looked at.
    let found = forwarding_findings(&lab, &v4)?;
    ensure!(
        found.len() == ifaces.len() && found.iter().all(|f| f.starts_with("Ok")),
        "{found:#?}"
    );
    let found = forwarding_findings(&lab, &v6)?;
    for iface in &ifaces {
        ensure!(
            found.iter().any(|f| f.starts_with(&format!(
                "{:?} {iface}: IPv6 forwarding is off",
                Severity::Error
            )) && f.contains(&format!("net.ipv6.conf.{iface}.forwarding=1"))),
            "{iface}: {found:#?}"
        );
    }
    for iface in &ifaces {
        netns::sysctl(&lb, &format!("net/ipv6/conf/{iface}/forwarding"), "1")?;
    }
    let found = forwarding_findings(&lab, &v6)?;
    ensure!(
        found.len() == 2 * ifaces.len()
            && found.iter().all(|f| f.starts_with("Ok"))
            && found
                .iter()
                .filter(|f| f.contains("IPv6 forwarding on"))
                .count()
                == ifaces.len(),
        "{found:#?}"
    );
    Ok(())
}

/// A restarted agent (SIGTERM, then `lb run` again on the pins) starts the
/// backends of the adopted rings up, IPv6 services' as IPv4's: `www6`'s
/// webs are up and in its ring from the new agent's first commit, and new
/// connections to the VIP6 are answered across the restart.
/// Before, only IPv4 ring members were read back: every IPv6 backend
/// started pending, out of the ring until `rise` probes passed (here 3 s
/// of an empty ring).
#[test]
fn a_restarted_agent_keeps_serving_an_ipv6_service_without_a_gap() -> Result<()> {
    let lab = lab6::up("lbr6")?;
    let config = lab6::three_webs_and_checked_www6(
        "health = { check = \"http\", port = 80, path = \"/\", interval = \"1s\", \
         timeout = \"500ms\", rise = 4, fall = 2 }\n",
    );
    let agent = lab.start_agent(&config)?;
    let all_up = |s: &lb_userspace::control::Status| {
        ["www", "www6"].iter().all(|service| {
            ["web1", "web2", "web3"].iter().all(|web| {
                backend_status(s, service, web)
                    .is_ok_and(|b| b.health == HealthStatus::Up && b.in_ring)
            })
        })
    };
    wait_for_status(
        &lab,
        "every web up in www and www6",
        Duration::from_secs(15),
        all_up,
    )?;

    let stop = Arc::new(AtomicBool::new(false));
    let streams = [
        steady_stream_at(&lab, vip6_http(), stop.clone()),
        steady_stream_at(&lab, vip_http(), stop.clone()),
    ];
    std::thread::sleep(Duration::from_millis(500));
    agent.stop()?;
    std::thread::sleep(Duration::from_millis(300));
    let agent = lab.start_agent(&config)?;
    // The new agent's first commit (its line per service) kept www6's
    // ring whole: a pending web would have been left out of it until its
    // probes passed (`lb: ready` waits for them, so the status alone
    // would not tell).
    let first = agent
        .log_text()
        .lines()
        .find(|l| l.contains("service www6 "))
        .map(str::to_owned)
        .context("no line for www6 in the new agent's log")?;
    ensure!(
        first.contains("ring [web1 web2 web3] (3 of 3 backends)"),
        "the restarted agent's first www6 ring: {first}"
    );
    let status = checked_status(&lab)?;
    ensure!(status.adopted, "the new agent adopted the pins");
    ensure!(
        all_up(&status),
        "not every web up in its ring after the restart: {:#?}",
        status.services
    );
    // Longer than `rise` probes would take.
    std::thread::sleep(Duration::from_secs(5));
    stop.store(true, Ordering::Relaxed);
    for (stream, vip) in streams.into_iter().zip([vip6_http(), vip_http()]) {
        let log = stream
            .join()
            .map_err(|_| anyhow::anyhow!("stream to {vip} panicked"))?;
        let failed: Vec<_> = log.iter().filter(|(_, r)| r.is_err()).collect();
        let answered: Vec<Duration> = log
            .iter()
            .filter(|(_, r)| r.is_ok())
            .map(|(t, _)| *t)
            .collect();
        let gap = answered
            .windows(2)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or_default();
        println!(
            "{vip}: {} connections across the restart, {} failed, at most {gap:?} between \
             two answered",
            log.len(),
            failed.len()
        );
        ensure!(
            log.len() > 50,
            "too few connections to {vip}: {}",
            log.len()
        );
        // A ring emptied until `rise` probes pass leaves 3 s and more
        // without an answer (3.0 and 4.1 s on main 7dfa90f); one SYN lost
        // and sent again, 1 s. IPv4's stream is printed for comparison
        // only: a few of its connections are refused around the new
        // agent's start, on main too (docs/architecture.md, "IPv6 backends
        // across an agent restart").
        ensure!(
            vip.is_ipv4() || gap < Duration::from_secs(2),
            "no answer from {vip} for {gap:?} across the restart: {failed:?}\nagent log:\n{}",
            agent.log_text()
        );
    }
    Ok(())
}
