//! The agent over IPv6 where it can be real before the IPv6 data plane
//! (issue 24): the monitoring listener on an IPv6 address of the dual-stack
//! lab, fetched by curl from the client's namespace across the LB's XDP
//! interface; and the start-up forwarding check reading
//! `net.ipv6.conf.IF.forwarding` in the LB's namespace. Needs root and the
//! lab; fails loudly without them, never skips.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use lb_tests::{lb_bin, three_webs, unique_prefix};
use lb_userspace::{
    doctor::{self, Check, Severity},
    harness::{
        lab::{LB_FRONT6, Lab},
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
