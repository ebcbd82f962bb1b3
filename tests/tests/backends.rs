//! End-to-end tests of issue 28 (backends treated as SREs expect): runtime
//! changes kept in the state file across agent restarts and reloads.
//!
//! Each test builds its own lab and runs the real `lb` binary from `LB_BIN`
//! (set by `cargo xtask test`). Needs root; fails loudly without it.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use lb_tests::{
    FALL, INTERVAL_MS, RISE, answers, backend_status, checked_status, count, lb_bin, ok,
    three_webs, unique_prefix, wait_for_status, web_config,
};
use lb_userspace::{
    control::{AdminState, BackendChange, FirewallChange, Request, RuleEdit},
    harness::{
        lab::{
            DNS_NAME, DNS_PORT, DnsZone, HTTPS_PORT, HttpConn, LAB_CERT_DAYS, Lab, SITE_NAME,
            dns_query, http_get, vip_dns, vip_http, web_addr,
        },
        netns::in_netns,
    },
};

fn lab() -> Result<Lab> {
    Lab::up(&unique_prefix("lbk"), &lb_bin())
}

fn drain(backend: &str) -> Request {
    Request::Backend(BackendChange::Drain {
        service: "www".into(),
        backend: backend.into(),
        wait: false,
        timeout: 0,
    })
}

/// (admin state, in ring, what the status says runtime changes set).
fn web(lab: &Lab, name: &str) -> Result<(AdminState, bool, Option<String>)> {
    let b = backend_status(&checked_status(lab)?, "www", name)?;
    Ok((b.admin, b.in_ring, b.runtime))
}

/// A config with one service on the VIP's `port` over web1..web3 on the
/// same port (`keys`: its name and protocol), checked by `check` with the
/// tests' fast timings; `top` goes before it (e.g. `[monitoring]`).
fn one_service(keys: &str, port: u16, check: &str, top: &str) -> String {
    let backends: Vec<String> = (1..=3)
        .map(|n| {
            format!(
                "{{ name = \"web{n}\", address = \"{}:{port}\" }}",
                web_addr(n)
            )
        })
        .collect();
    format!(
        "[dataplane]\ninterfaces = [\"lb-front\", \"lb-back\"]\nforwarding = \"nat\"\n\n{top}\n\
         [[service]]\n{keys}\nvip = \"198.18.0.10:{port}\"\n\
         health = {{ {check}, interval = \"{INTERVAL_MS}ms\", timeout = \"{INTERVAL_MS}ms\", \
         rise = {RISE}, fall = {FALL} }}\nbackends = [ {} ]\n",
        backends.join(", ")
    )
}

/// `lb ARGS… --socket` of the lab, as an operator types it.
fn lb(lab: &Lab, args: &[&str]) -> Result<String> {
    let socket = lab.agent_socket().display().to_string();
    let bin = lb_bin().display().to_string();
    let mut all = vec![bin.as_str()];
    all.extend(args);
    all.extend(["--socket", &socket]);
    lab.exec_ok(&lab.lb_ns(), &all)
}

/// A drained backend stays drained when the agent is stopped and started
/// again (systemd's restart: SIGTERM, then a new `lb run`), when it is
/// killed, and across `lb reload`, until `lb backend enable`; a firewall
/// rule added at run time likewise until `lb firewall reset`. The state
/// file is beside the config and goes when nothing differs from the file.
#[test]
fn a_drained_backend_stays_drained_across_restarts_and_reloads_until_enabled() -> Result<()> {
    let lab = lab()?;
    let state = lab.run_dir().join("lb.state.toml");
    let agent = lab.start_agent(&three_webs())?;
    ok(&lab, drain("web2"))?;
    ok(
        &lab,
        Request::Firewall(FirewallChange::Deny {
            edit: RuleEdit::Add {
                prefix: "203.0.113.0/24".into(),
                service: None,
            },
        }),
    )?;
    let text = std::fs::read_to_string(&state).context("the state file")?;
    ensure!(
        text.contains("drain") && text.contains("203.0.113.0/24"),
        "{text}"
    );
    assert_eq!(
        web(&lab, "web2")?,
        (AdminState::Drain, false, Some("drain".into()))
    );

    // Restarted as systemd does it, then killed and started again.
    agent.stop()?;
    let agent = lab.start_agent(&three_webs())?;
    assert_eq!(
        web(&lab, "web2")?,
        (AdminState::Drain, false, Some("drain".into())),
        "after a restart; agent log:\n{}",
        agent.log_text()
    );
    ensure!(
        agent.log_text().contains("restoring 2 runtime change(s)"),
        "{}",
        agent.log_text()
    );
    agent.kill()?;
    let _agent = lab.start_agent(&three_webs())?;
    assert_eq!(web(&lab, "web2")?.0, AdminState::Drain, "after a SIGKILL");
    let got = answers(&lab, 6)?;
    ensure!(got.iter().all(|s| s != "web2"), "{got:?}");

    // A reload, with an unrelated change in the file: still drained.
    let path = lab.run_dir().join("lb.toml");
    let edited = three_webs().replace("round-robin", "weighted-round-robin");
    std::fs::write(&path, &edited)?;
    ok(&lab, Request::Reload)?;
    let status = checked_status(&lab)?;
    assert_eq!(
        backend_status(&status, "www", "web2")?.admin,
        AdminState::Drain,
        "after a reload"
    );
    assert_eq!(
        status.runtime.changes,
        vec!["www/web2: drain", "[firewall]: deny 203.0.113.0/24 added"]
    );
    ensure!(
        lb(&lab, &["status"])?.contains("runtime changes (kept in"),
        "lb status does not list the runtime changes"
    );

    // `lb backend enable` ends it; `lb firewall reset` the rule; then the
    // file is gone: the agent runs the config as written.
    ok(
        &lab,
        Request::Backend(BackendChange::Enable {
            service: "www".into(),
            backend: "web2".into(),
        }),
    )?;
    assert_eq!(web(&lab, "web2")?, (AdminState::Enabled, true, None));
    ensure!(answers(&lab, 6)?.iter().any(|s| s == "web2"));
    lb(&lab, &["firewall", "reset"])?;
    ensure!(!state.exists(), "state file left with no runtime change");

    // `lb backend reset SERVICE NAME` drops one backend's changes.
    ok(&lab, drain("web1"))?;
    ok(&lab, drain("web3"))?;
    let said = lb(&lab, &["backend", "reset", "www", "web1"])?;
    ensure!(said.contains("www/web1: back to the config file"), "{said}");
    assert_eq!(web(&lab, "web1")?, (AdminState::Enabled, true, None));
    assert_eq!(web(&lab, "web3")?.0, AdminState::Drain);
    lb(&lab, &["backend", "reset", "www"])?;
    assert_eq!(web(&lab, "web3")?, (AdminState::Enabled, true, None));
    ensure!(!state.exists());
    Ok(())
}

/// A corrupt state file is reported at start (log and status), set aside,
/// and the agent serves the config.
#[test]
fn a_corrupt_state_file_is_reported_and_the_config_serves() -> Result<()> {
    let lab = lab()?;
    let state = lab.run_dir().join("lb.state.toml");
    std::fs::create_dir_all(lab.run_dir())?;
    std::fs::write(&state, "[[backend]]\nservice = \"www\"\nbackend = 7\n")?;
    let agent = lab.start_agent(&three_webs())?;
    let log = agent.log_text();
    ensure!(
        log.contains("runtime changes not restored") && log.contains("not a state file"),
        "{log}"
    );
    let status = checked_status(&lab)?;
    let error = status.runtime.error.clone().unwrap_or_default();
    ensure!(error.contains("lb.state.toml.corrupt"), "{error}");
    ensure!(status.services[0].backends.iter().all(|b| b.in_ring));
    ensure!(lab.run_dir().join("lb.state.toml.corrupt").exists());
    assert_eq!(answers(&lab, 3)?, vec!["web1", "web2", "web3"]);
    // The next change writes a good file again.
    ok(&lab, drain("web1"))?;
    ensure!(std::fs::read_to_string(&state)?.contains("drain"));
    Ok(())
}

/// `max-connections = 5` on web1 (round robin over web1..web3): holding 5
/// keep-alive connections, web1 gets no sixth while web2 and web3 take new
/// connections; once one of its connections closes it takes new ones again.
#[test]
fn a_backend_at_max_connections_gets_no_new_connection_until_one_closes() -> Result<()> {
    let lab = lab()?;
    let cfg = three_webs().replacen(
        "backup = false }",
        "backup = false, max-connections = 5 }",
        1,
    );
    ensure!(cfg.contains("max-connections = 5"), "{cfg}");
    let _agent = lab.start_agent(&cfg)?;
    let ns = lab.client_ns();
    // Open keep-alive connections one at a time until web1 holds 5.
    let mut held: Vec<(String, HttpConn)> = Vec::new();
    while held.iter().filter(|(s, _)| s == "web1").count() < 5 {
        ensure!(
            held.len() < 30,
            "web1 never reached 5 connections: {}",
            held.len()
        );
        let (server, conn) = in_netns(&ns, || -> Result<(String, HttpConn)> {
            let mut conn = HttpConn::connect(vip_http())?;
            let server = conn.get("/")?.text();
            Ok((server, conn))
        })??;
        held.push((server, conn));
    }
    let took = wait_for_status(&lab, "web1 at its limit", Duration::from_secs(3), |s| {
        backend_status(s, "www", "web1").is_ok_and(|b| b.at_limit && !b.in_ring && b.active == 5)
    })?;
    eprintln!("web1 out of the ring {took:?} after its 5th connection");
    let status = checked_status(&lab)?;
    let web1 = backend_status(&status, "www", "web1")?;
    assert_eq!(web1.max_connections, Some(5));
    let explained = ok(
        &lab,
        Request::Explain {
            client: "198.18.0.2:40000".into(),
            service: "198.18.0.10:80/tcp".into(),
        },
    )?;
    ensure!(
        explained.contains("at max-connections (5 active, limit 5)"),
        "{explained}"
    );

    // New connections: none to web1, the others take them.
    let got = answers(&lab, 12)?;
    let c = count(&got);
    ensure!(!c.contains_key("web1"), "web1 got a sixth: {c:?}");
    ensure!(c.contains_key("web2") && c.contains_key("web3"), "{c:?}");
    // Its connections still work.
    for (server, conn) in held.iter_mut().filter(|(s, _)| s == "web1") {
        let again = in_netns(&ns, || conn.get("/").map(|r| r.text()))??;
        ensure!(again == *server, "a held connection moved to {again}");
    }

    // One of web1's connections closes: below the limit, back in the ring.
    let i = held
        .iter()
        .position(|(s, _)| s == "web1")
        .context("a web1 connection")?;
    drop(held.remove(i));
    let took = wait_for_status(&lab, "web1 below its limit", Duration::from_secs(3), |s| {
        backend_status(s, "www", "web1").is_ok_and(|b| !b.at_limit && b.in_ring)
    })?;
    eprintln!("web1 back in the ring {took:?} after a connection closed");
    let got = answers(&lab, 6)?;
    ensure!(got.iter().any(|s| s == "web1"), "{got:?}");
    Ok(())
}

/// `slow-start = "5s"` (weighted round robin over web1..web3): web3 comes
/// back from DOWN and its share of 3000 new connections (paced over 7.5 s)
/// grows over the period from about 1/41 (its first step: 1/20 of its
/// weight) to 1/3.
#[test]
fn slow_start_ramps_a_returning_backends_share_of_new_connections() -> Result<()> {
    const PERIOD_S: u64 = 5;
    const CONNECTIONS: usize = 3000;
    let mut lab = lab()?;
    let webs = [("web1", 1, false), ("web2", 1, false), ("web3", 1, false)];
    let cfg = web_config(
        "weighted-round-robin",
        &webs,
        &format!("slow-start = \"{PERIOD_S}s\"\n"),
    );
    let _agent = lab.start_agent(&cfg)?;
    let window = Duration::from_millis(FALL.max(RISE) * INTERVAL_MS + 2000);
    lab.stop_web(3)?;
    wait_for_status(&lab, "web3 down", window, |s| {
        backend_status(s, "www", "web3").is_ok_and(|b| !b.in_ring)
    })?;
    lab.start_web(3)?;
    wait_for_status(&lab, "web3 back", window, |s| {
        backend_status(s, "www", "web3").is_ok_and(|b| b.in_ring)
    })?;
    let seen_up = std::time::Instant::now();
    let web3 = backend_status(&checked_status(&lab)?, "www", "web3")?;
    let percent = web3.slow_start_percent.context("web3 is not ramping")?;
    ensure!(percent < 50, "web3 starts at {percent} % of its weight");
    // The ramp began when the checks passed, maybe before `start_web`
    // returned: date it from the progress the status gives (5 % steps).
    let ramped = Duration::from_secs(PERIOD_S).mul_f64(f64::from(percent) / 100.0);
    let up = seen_up.checked_sub(ramped).unwrap_or(seen_up);
    eprintln!("web3 at {percent} % when first seen in the ring: the ramp began {ramped:?} earlier");

    // New connections as fast as the client makes them, each with the time
    // since web3 came back.
    let ns = lab.client_ns();
    let seen = in_netns(&ns, || -> Result<Vec<(f64, bool)>> {
        let mut seen = Vec::with_capacity(CONNECTIONS);
        // Paced: 3000 over one and a half periods.
        let pace = Duration::from_secs(PERIOD_S).mul_f64(1.5) / CONNECTIONS as u32;
        while seen.len() < CONNECTIONS && up.elapsed() < Duration::from_secs(3 * PERIOD_S) {
            let due = seen_up + pace * seen.len() as u32;
            std::thread::sleep(due.saturating_duration_since(std::time::Instant::now()));
            let server = http_get(vip_http(), "/")?.text();
            seen.push((up.elapsed().as_secs_f64(), server == "web3"));
        }
        Ok(seen)
    })??;
    ensure!(seen.len() >= 600, "only {} connections", seen.len());
    // web3's share per second of the period, then after it.
    let share = |from: f64, to: f64| {
        let part: Vec<bool> = seen
            .iter()
            .filter(|(t, _)| (from..to).contains(t))
            .map(|(_, w)| *w)
            .collect();
        let n = part.len();
        (
            part.into_iter().filter(|w| *w).count() as f64 / n.max(1) as f64,
            n,
        )
    };
    let mut table = Vec::new();
    for s in 0..PERIOD_S {
        table.push((format!("{s}-{}s", s + 1), share(s as f64, s as f64 + 1.0)));
    }
    let period = PERIOD_S as f64;
    table.push((format!("after {PERIOD_S}s"), share(period + 0.3, f64::MAX)));
    eprintln!(
        "slow start {PERIOD_S}s, {} new connections after web3 came back:",
        seen.len()
    );
    for (when, (s, n)) in &table {
        eprintln!("  {when:>10}: web3 {:.1} % of {n} connections", s * 100.0);
    }
    let (first, n_first) = table[0].1;
    let (last, n_last) = table[table.len() - 1].1;
    ensure!(
        n_last >= 100,
        "too few connections after the period: {table:?}"
    );
    ensure!(
        n_first < 50 || first < 0.15,
        "web3 got {first:.3} of the first second"
    );
    ensure!(
        (0.25..0.42).contains(&last),
        "web3 got {last:.3} after the period"
    );
    // Each second of the ramp gives web3 more than the one before (within
    // noise), and the last second of the period far more than the first.
    let during: Vec<f64> = table[..PERIOD_S as usize]
        .iter()
        .filter(|(_, (_, n))| *n >= 50)
        .map(|(_, (s, _))| *s)
        .collect();
    ensure!(
        during.len() >= 3,
        "too few seconds of the ramp measured: {table:?}"
    );
    ensure!(
        during.windows(2).all(|w| w[1] > w[0] - 0.03) && during[during.len() - 1] > during[0] + 0.1,
        "the share does not grow: {table:?}"
    );
    let status = checked_status(&lab)?;
    ensure!(
        backend_status(&status, "www", "web3")?
            .slow_start_percent
            .is_none(),
        "still ramping after the period"
    );
    Ok(())
}

/// `check = "udp"` on a UDP service (the lab's servers answer "webN " and
/// the datagram on :5353): web2's server stops while another socket holds
/// its port and never answers (probes time out), and later stops with the
/// port closed (ICMP port unreachable fails each probe at once). Both go
/// DOWN within fall × interval of the first failed probe (plus a timeout).
#[test]
fn a_udp_check_takes_a_silent_or_closed_server_down() -> Result<()> {
    let mut lab = lab()?;
    let cfg = one_service(
        "name = \"www-udp\"\nprotocol = \"udp\"",
        5353,
        "check = \"udp\", send = \"health\", expect-regex = \"^web[0-9] health$\"",
        "",
    );
    let _agent = lab.start_agent(&cfg)?;
    let state = |lab: &Lab| -> Result<(bool, String)> {
        let b = backend_status(&checked_status(lab)?, "www-udp", "web2")?;
        Ok((b.in_ring, b.last_check.unwrap_or_default()))
    };
    let bound = Duration::from_millis((FALL + 1) * INTERVAL_MS + 1000);
    wait_for_status(&lab, "every UDP backend up", bound * 3, |s| {
        s.services[0].backends.iter().all(|b| b.in_ring)
    })?;
    // Every probe to a closed port gets its ICMP answer (no rate limit).
    lab.exec_ok(
        &lab.web_ns(2),
        &["sysctl", "-qw", "net.ipv4.icmp_ratelimit=0"],
    )?;

    // 1. The server stops; a socket that never answers holds the port.
    lab.stop_web(2)?;
    let silent = in_netns(&lab.web_ns(2), || {
        std::net::UdpSocket::bind((web_addr(2), 5353))
    })??;
    let stopped = std::time::Instant::now();
    let took = wait_for_status(&lab, "web2 down (silent)", bound, |s| {
        backend_status(s, "www-udp", "web2").is_ok_and(|b| !b.in_ring)
    })?;
    let (_, why) = state(&lab)?;
    ensure!(why.contains("no reply from"), "{why}");
    eprintln!("silent port: web2 down {took:?} after its server stopped ({why})");
    ensure!(stopped.elapsed() < bound);

    // 2. Back up, then the server stops and nothing holds the port.
    drop(silent);
    lab.start_web(2)?;
    wait_for_status(&lab, "web2 up again", bound * 2, |s| {
        backend_status(s, "www-udp", "web2").is_ok_and(|b| b.in_ring)
    })?;
    lab.stop_web(2)?;
    let took = wait_for_status(&lab, "web2 down (closed)", bound, |s| {
        backend_status(s, "www-udp", "web2").is_ok_and(|b| !b.in_ring)
    })?;
    let (_, why) = state(&lab)?;
    ensure!(why.contains("ICMP port unreachable"), "{why}");
    eprintln!("closed port: web2 down {took:?} after its server stopped ({why})");
    Ok(())
}

/// `check = "tls"` with SNI and the lab's CA on the HTTPS service: every web
/// passes, and `/metrics` shows each certificate's expiry, which the lab
/// sets LAB_CERT_DAYS (30) days ahead.
#[test]
fn a_tls_check_exports_the_certificate_expiry() -> Result<()> {
    let lab = lab()?;
    let cfg = one_service(
        "name = \"www-tls\"",
        HTTPS_PORT,
        &format!(
            "check = \"tls\", sni = \"{SITE_NAME}\", ca-file = \"{}\"",
            lab.ca_path().display()
        ),
        "[monitoring]\nlisten = \"127.0.0.1:9100\"\n",
    );
    let _agent = lab.start_agent(&cfg)?;
    let bound = Duration::from_millis((FALL + RISE) * INTERVAL_MS + 3000);
    wait_for_status(&lab, "every TLS backend up", bound, |s| {
        s.services[0]
            .backends
            .iter()
            .all(|b| b.in_ring && b.tls_cert_expiry.is_some())
    })?;
    let listen: std::net::SocketAddr = "127.0.0.1:9100".parse()?;
    let metrics = in_netns(&lab.lb_ns(), || http_get(listen, "/metrics"))??.text();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs_f64();
    for n in 1..=3 {
        let line = metrics
            .lines()
            .find(|l| {
                l.starts_with("lb_backend_tls_cert_expiry_timestamp_seconds{")
                    && l.contains(&format!("backend=\"web{n}\""))
            })
            .with_context(|| format!("no expiry for web{n} in:\n{metrics}"))?;
        let at: f64 = line
            .rsplit(' ')
            .next()
            .context("no value")?
            .parse()
            .with_context(|| line.to_string())?;
        let days = (at - now) / 86_400.0;
        eprintln!("web{n}: certificate expires in {days:.2} days ({line})");
        ensure!(
            (days - LAB_CERT_DAYS as f64).abs() < 1.0,
            "web{n} expires in {days} days, the lab made it {LAB_CERT_DAYS}"
        );
    }
    Ok(())
}

/// `check = "dns"` on a `dns` service (UDP :53 on the VIP) over a real DNS
/// server (NSD) in each web: every backend is up and a client's query
/// through the VIP is answered (by each web in turn); web2's server
/// restarted with its zone file missing answers SERVFAIL and goes DOWN;
/// back up, then stopped, it goes DOWN again (nothing answers).
#[test]
fn a_dns_check_takes_a_servfailing_or_stopped_server_down() -> Result<()> {
    let mut lab = lab()?;
    for n in 1..=3 {
        lab.start_dns(n, DnsZone::Serving)?;
    }
    let cfg = one_service(
        "name = \"dns\"\nprotocol = \"udp\"",
        DNS_PORT,
        &format!("check = \"dns\", query-name = \"{DNS_NAME}\", query-type = \"A\""),
        "",
    );
    let _agent = lab.start_agent(&cfg)?;
    let web2 = |s: &lb_userspace::control::Status| backend_status(s, "dns", "web2");
    let bound = Duration::from_millis((FALL + 1) * INTERVAL_MS + 1000);
    wait_for_status(&lab, "every DNS backend up", bound * 3, |s| {
        s.services[0].backends.iter().all(|b| b.in_ring)
    })?;
    // Clients through the VIP: each query a new flow, round robin.
    let ask = |lab: &Lab| -> Result<Vec<std::net::Ipv4Addr>> {
        let mut seen = Vec::new();
        for _ in 0..6 {
            let a = in_netns(&lab.client_ns(), || {
                dns_query(vip_dns(), DNS_NAME, Duration::from_secs(1))
            })??;
            ensure!(a.rcode == "NOERROR" && a.addresses.len() == 1, "{a:?}");
            seen.extend(a.addresses);
        }
        seen.sort_unstable();
        seen.dedup();
        Ok(seen)
    };
    let all: Vec<_> = (1..=3).map(web_addr).collect();
    ensure!(ask(&lab)? == all, "every web answers through the VIP");

    // 1. web2's server comes back with its zone file missing: SERVFAIL.
    lab.stop_dns(2)?;
    lab.start_dns(2, DnsZone::Missing)?;
    let direct = in_netns(&lab.client_ns(), || {
        dns_query(
            std::net::SocketAddr::from((web_addr(2), DNS_PORT)),
            DNS_NAME,
            Duration::from_secs(1),
        )
    })??;
    ensure!(direct.rcode == "SERVFAIL", "{direct:?}");
    let took = wait_for_status(&lab, "web2 down (SERVFAIL)", bound, |s| {
        web2(s).is_ok_and(|b| {
            !b.in_ring
                && b.last_check
                    .as_deref()
                    .is_some_and(|c| c.contains("rcode SERVFAIL"))
        })
    })?;
    eprintln!("SERVFAIL: web2 down {took:?} after its server came back without its zone");
    ensure!(
        ask(&lab)? == [web_addr(1), web_addr(3)],
        "web2 out of the ring"
    );

    // 2. Serving again, then stopped: the port closes.
    lab.stop_dns(2)?;
    lab.start_dns(2, DnsZone::Serving)?;
    wait_for_status(&lab, "web2 up again", bound * 2, |s| {
        web2(s).is_ok_and(|b| b.in_ring)
    })?;
    lab.stop_dns(2)?;
    let took = wait_for_status(&lab, "web2 down (stopped)", bound, |s| {
        web2(s).is_ok_and(|b| !b.in_ring)
    })?;
    let why = web2(&checked_status(&lab)?)?.last_check.unwrap_or_default();
    ensure!(
        why.contains("ICMP port unreachable") || why.contains("no reply from"),
        "{why}"
    );
    eprintln!("stopped: web2 down {took:?} after its server stopped ({why})");
    Ok(())
}
