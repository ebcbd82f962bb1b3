//! End to end (issue 26, "Checks through the VIP"): a DSR backend that
//! lacks the VIP on its loopback black-holes every flow sent to it, while a
//! check of its own address passes. A check with `through-vip = true`
//! probes the VIP as a client's flow arrives (the data plane carries the
//! probe in the service's mode) and catches it.
//!
//! The lab in DSR mode, three services over the same three webs: `www`
//! (VIP:80) checked over HTTP through the VIP, `dgram` (VIP:5353, UDP)
//! over UDP through the VIP, `plain` (VIP:443) over HTTP on each web's own
//! address. web1 loses the VIP from its `lo`: under `www` and `dgram` it
//! goes DOWN, under `plain` it stays UP; the VIP back, it is UP again; web2
//! and web3 stay UP throughout. A killed agent's probe namespace is
//! replaced by the next agent's, and removed by `lb teardown`. The agent's probe namespace
//! exists while it runs and is gone once it stopped.
//!
//! The same over IPv6 (issue 24): the three services on the VIP6
//! [2001:db8:18::10] over the webs' IPv6 addresses, web1 losing the VIP6
//! from its `lo` and getting it back.
//!
//! Needs root; fails loudly without it.

use std::{
    path::Path,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use lb_tests::{backend_status, lab6, lb_bin, status, unique_prefix, wait_for_status};
use lb_userspace::{
    config::Forwarding,
    control::HealthStatus,
    harness::{
        lab::{Lab, VIP, VIP6, web_addr, web_addr6},
        netns,
    },
    health::through_vip::Names,
};

const INTERVAL_MS: u64 = 200;

/// The services of IPv4's test.
const SERVICES: [&str; 3] = ["www", "plain", "dgram"];
/// The services of IPv6's test.
const SERVICES6: [&str; 3] = ["www6", "plain6", "dgram6"];

/// IPv4's three services on the VIP.
fn config() -> String {
    config_on(&VIP.to_string(), "", |n| web_addr(n).to_string())
}

/// IPv6's three services on the VIP6, over the webs' IPv6 addresses.
fn config6() -> String {
    config_on(&format!("[{VIP6}]"), "6", |n| format!("[{}]", web_addr6(n)))
}

/// `www`, `plain` and `dgram` (each name followed by `suffix`) on `vip`
/// over the webs at `web(n)`.
fn config_on(vip: &str, suffix: &str, web: impl Fn(usize) -> String) -> String {
    let backends = |port: u16| -> String {
        (1..=3)
            .map(|n| format!("{{ name = \"web{n}\", address = \"{}:{port}\" }}", web(n)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let check = |extra: &str| {
        format!(
            "health = {{ check = \"http\", path = \"/\", interval = \"{INTERVAL_MS}ms\", \
             timeout = \"{INTERVAL_MS}ms\", rise = 2, fall = 2{extra} }}"
        )
    };
    format!(
        "[dataplane]\ninterfaces = [\"lb-front\", \"lb-back\"]\nforwarding = \"dsr\"\n\n\
         [[service]]\nname = \"www{suffix}\"\nvip = \"{vip}:80\"\n{}\nbackends = [ {} ]\n\n\
         [[service]]\nname = \"plain{suffix}\"\nvip = \"{vip}:443\"\n{}\nbackends = [ {} ]\n\n\
         [[service]]\nname = \"dgram{suffix}\"\nvip = \"{vip}:5353\"\nprotocol = \"udp\"\n{}\nbackends = [ {} ]\n",
        check(", through-vip = true"),
        backends(80),
        check(", port = 80"),
        backends(443),
        check(", through-vip = true").replace(
            "check = \"http\", path = \"/\"",
            "check = \"udp\", send = \"health\""
        ),
        backends(5353),
    )
}

fn health(lab: &Lab, service: &str, web: &str) -> Result<HealthStatus> {
    Ok(backend_status(&status(lab)?, service, web)?.health)
}

/// web2 and web3 are UP under every one of `services`.
fn others_up(lab: &Lab, services: &[&str]) -> Result<()> {
    let s = status(lab)?;
    for service in services {
        for web in ["web2", "web3"] {
            let b = backend_status(&s, service, web)?;
            ensure!(
                b.health == HealthStatus::Up,
                "{service}/{web} left UP: {b:?}"
            );
        }
    }
    Ok(())
}

/// Waits up to `within` for web1's health under `service`, checking that
/// the others stay UP meanwhile under every one of `services`.
fn wait_web1(
    lab: &Lab,
    (services, service): (&[&str], &str),
    want: HealthStatus,
    within: Duration,
) -> Result<Duration> {
    let start = Instant::now();
    loop {
        others_up(lab, services)?;
        let now = health(lab, service, "web1")?;
        if now == want {
            return Ok(start.elapsed());
        }
        ensure!(
            start.elapsed() < within,
            "{service}/web1 is {now:?}, not {want:?}, after {within:?}: {:#?}",
            backend_status(&status(lab)?, service, "web1")?
        );
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_backend_without_the_vip_fails_the_check_through_the_vip_only() -> Result<()> {
    let lab = Lab::up(&unique_prefix("k26p"), &lb_bin())?;
    lab.set_mode(Forwarding::Dsr)?;
    let agent = lab.start_agent(&config())?;
    let names = Names::for_pin_dir(&lab.pin_dir());
    let probe_ns = Path::new("/run/netns").join(&names.netns);
    ensure!(
        probe_ns.exists(),
        "no probe namespace {}",
        probe_ns.display()
    );

    web1_without_the_vip(&lab, &SERVICES, &["ip", "addr"], &format!("{VIP}/32"))?;

    // A killed agent leaves its namespace; the next one replaces it (one
    // veth, one namespace) and its checks through the VIP run again.
    agent.kill()?;
    ensure!(probe_ns.exists(), "the namespace went with a SIGKILL?");
    let agent = lab.start_agent(&config())?;
    ensure!(probe_ns.exists(), "no probe namespace after the restart");
    let veths = netns::ns_run(&lab.lb_ns(), &["ip", "-o", "link", "show", "type", "veth"])?;
    let probe_veths = veths.lines().filter(|l| l.contains(&names.host_if)).count();
    ensure!(
        probe_veths == 1,
        "{probe_veths} probe veths after the restart:\n{veths}"
    );
    wait_for_status(
        &lab,
        "www and dgram up through the VIP after the restart",
        Duration::from_secs(10),
        |s| {
            s.services
                .iter()
                .filter(|svc| svc.name == "www")
                .all(|svc| {
                    svc.backends.iter().all(|b| {
                        b.health == HealthStatus::Up && b.last_check.as_deref() == Some("ok")
                    })
                })
        },
    )?;

    agent.stop().context("stopping the agent")?;
    ensure!(
        !probe_ns.exists(),
        "the stopped agent left its probe namespace {}",
        probe_ns.display()
    );

    // `lb teardown` removes what a killed agent left.
    let agent = lab.start_agent(&config())?;
    agent.kill()?;
    ensure!(probe_ns.exists());
    let pins = lab.pin_dir().display().to_string();
    let bin = lb_bin().display().to_string();
    let out = lab.exec_ok(&lab.lb_ns(), &[&bin, "teardown", "--pin-dir", &pins])?;
    ensure!(out.contains(&names.netns), "teardown said: {out}");
    ensure!(!probe_ns.exists(), "teardown left {}", probe_ns.display());
    Ok(())
}

/// The scenario of both families' tests, on `services` (`www`, `plain`,
/// `dgram` and their suffix) once every backend is up: web1 loses `vip`
/// (removed and added back with `ip_addr`, e.g. `ip -6 addr`) from its
/// `lo` and goes DOWN under the checks through the VIP (HTTP and UDP)
/// while the plain check keeps it UP; the VIP back, it is UP again; web2
/// and web3 stay UP throughout, and no probe counts as a service's traffic.
fn web1_without_the_vip(
    lab: &Lab,
    services: &[&str; 3],
    ip_addr: &[&str],
    vip: &str,
) -> Result<()> {
    let [www, plain, dgram] = *services;
    wait_for_status(lab, "every backend up", Duration::from_secs(10), |s| {
        s.services
            .iter()
            .all(|svc| svc.backends.iter().all(|b| b.health == HealthStatus::Up))
    })?;
    let www1 = backend_status(&status(lab)?, www, "web1")?;
    ensure!(www1.last_check.as_deref() == Some("ok"), "{www1:?}");

    // web1 loses the VIP: its own address still answers, the VIP does not.
    let web1 = lab.web_ns(1);
    let on_lo = |verb: &str| -> Result<String> {
        let args: Vec<&str> = ip_addr
            .iter()
            .copied()
            .chain([verb, vip, "dev", "lo"])
            .collect();
        netns::ns_run(&web1, &args)
    };
    on_lo("del")?;
    let fall = Duration::from_millis(2 * INTERVAL_MS + 2000);
    for service in [www, dgram] {
        let down = wait_web1(lab, (services, service), HealthStatus::Down, fall)?;
        eprintln!("{service}/web1 DOWN {down:?} after {vip} left its lo");
    }
    let www1 = backend_status(&status(lab)?, www, "web1")?;
    ensure!(!www1.in_ring, "{www1:?}");
    let reason = www1.last_check.clone().unwrap_or_default();
    ensure!(reason.contains("through the VIP"), "{www1:?}");
    // The plain check of web1's own address keeps it UP, for a while.
    for _ in 0..10 {
        ensure!(
            health(lab, plain, "web1")? == HealthStatus::Up,
            "the plain check lost web1 too"
        );
        others_up(lab, services)?;
        thread::sleep(Duration::from_millis(INTERVAL_MS));
    }

    // The VIP back: UP again under the checks through the VIP.
    on_lo("add")?;
    for service in [www, dgram] {
        let up = wait_web1(lab, (services, service), HealthStatus::Up, fall)?;
        eprintln!("{service}/web1 UP {up:?} after {vip} came back");
    }
    ensure!(health(lab, plain, "web1")? == HealthStatus::Up);

    // Probes are not clients: the services' traffic counters saw none.
    let s = status(lab)?;
    for svc in &s.services {
        ensure!(
            svc.packets == 0,
            "{}: probes were counted as its traffic: {} packets",
            svc.name,
            svc.packets
        );
    }
    Ok(())
}

/// IPv6's twin of the test above: the three services on the VIP6; web1
/// without the VIP6 on its `lo` goes DOWN under the checks through the
/// VIP (HTTP and UDP, probes from the LB's own IPv6 address carried by
/// `lb_probe` over `PROBES6`) and stays UP under the plain check; the VIP6
/// back, it is UP again.
#[test]
fn a_backend_without_the_vip6_fails_the_check_through_the_vip_only() -> Result<()> {
    let lab = lab6::up("k24p6")?;
    lab.set_mode(Forwarding::Dsr)?;
    let _agent = lab.start_agent(&config6())?;
    web1_without_the_vip(
        &lab,
        &SERVICES6,
        &["ip", "-6", "addr"],
        &format!("{VIP6}/128"),
    )
}
