//! End-to-end tests of the monitoring listener (issue 13): the status page
//! rendered by a real headless Chromium inside the LB namespace, and
//! `/metrics` checked against the control socket's live counters and
//! against known traffic. Needs root and Chromium (`cargo xtask setup`
//! installs it); fails loudly without them, never skips.

use std::{
    collections::BTreeMap,
    fs,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use lb_tests::{
    FALL, INTERVAL_MS, RISE, answers, backend_status, checked_status, count, dom_attr, lb_bin, ok,
    pin_made_up_flows, steady_stream, three_webs, unique_prefix, wait_for_status,
};
use lb_userspace::{
    control::{HealthStatus, Request, Status},
    harness::{
        lab::{Lab, http_get},
        netns::in_netns,
    },
};

const LISTEN: &str = "127.0.0.1:9100";
const WEBS: [&str; 3] = ["web1", "web2", "web3"];

fn lab() -> Result<Lab> {
    Lab::up(&unique_prefix("lbm"), &lb_bin())
}

/// The three webs in round robin, with the monitoring listener on.
fn config() -> String {
    format!("{}\n[monitoring]\nlisten = \"{LISTEN}\"\n", three_webs())
}

/// Detection of a failure, with margin for a loaded machine.
fn verdict_window() -> Duration {
    Duration::from_millis(FALL.max(RISE) * INTERVAL_MS + 1500)
}

fn listen() -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9100))
}

/// GET `path` from the listener, from inside the LB namespace.
fn get(lab: &Lab, path: &str) -> Result<String> {
    let response = in_netns(&lab.lb_ns(), || http_get(listen(), path))??;
    ensure!(
        response.status == 200,
        "GET {path}: {} {}",
        response.status,
        response.text()
    );
    String::from_utf8(response.body).with_context(|| format!("GET {path}: not UTF-8"))
}

fn all_up(status: &Status) -> bool {
    WEBS.iter().all(|w| {
        backend_status(status, "www", w).is_ok_and(|b| b.health == HealthStatus::Up && b.in_ring)
    })
}

fn artifacts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-artifacts")
}

/// Headless Chromium on the status page inside the LB namespace
/// ([`lb_tests::chromium`]).
fn chromium(lab: &Lab, extra: &[&str]) -> Result<String> {
    lb_tests::chromium(&lab.lb_ns(), &format!("http://{LISTEN}/"), extra)
}

/// The `data-health` of the status page row of www/`backend` in a dumped
/// DOM (`<tr id="b-www-web1" class="backend" data-health="up" …>`).
fn row_health(dom: &str, backend: &str) -> Result<String> {
    dom_attr(dom, &format!("b-www-{backend}"), "data-health")
}

/// The status page, rendered by Chromium, shows every backend and its
/// state, and a killed web server turns down on it without a reload of
/// the agent; a screenshot is kept as a test artifact.
#[test]
fn status_page_in_chromium_shows_backends_and_a_kill() -> Result<()> {
    let mut lab = lab()?;
    let _agent = lab.start_agent(&config())?;
    wait_for_status(&lab, "all webs up", verdict_window(), all_up)?;

    let dom = chromium(&lab, &["--dump-dom"])?;
    for web in WEBS {
        assert_eq!(row_health(&dom, web)?, "up", "{web}");
        // The address and the state are in the row's text too.
        assert!(dom.contains(&format!(
            "{}:80",
            lb_userspace::harness::lab::web_addr(web[3..].parse()?)
        )));
    }
    assert!(dom.contains("generation 1"), "agent header missing:\n{dom}");
    assert!(
        dom.contains("id=\"v-forwarded\""),
        "verdict table missing:\n{dom}"
    );
    // The active-flows panel: a row per service and per backend.
    for id in ["a-www", "a-www-web1", "a-www-web2", "a-www-web3"] {
        ensure!(dom.contains(&format!("id=\"{id}\"")), "no {id} in:\n{dom}");
    }
    // The role column of an ordinary service.
    assert_eq!(dom_attr(&dom, "b-www-web1", "data-role")?, "primary");
    let error_div = dom
        .split("<div id=\"error\"")
        .nth(1)
        .and_then(|rest| rest.split("</div>").next())
        .context("no error banner in the page")?;
    assert!(
        !error_div.contains("display: block"),
        "the page could not fetch or show status.json: {error_div}"
    );

    lab.stop_web(2)?;
    thread::sleep(verdict_window());
    let dom = chromium(&lab, &["--dump-dom"])?;
    assert_eq!(row_health(&dom, "web2")?, "down");
    assert_eq!(row_health(&dom, "web1")?, "up");
    assert_eq!(row_health(&dom, "web3")?, "up");
    // The page agrees with the control socket.
    let status = checked_status(&lab)?;
    assert_eq!(
        backend_status(&status, "www", "web2")?.health,
        HealthStatus::Down
    );

    // A screenshot under traffic (so the rates are not zero).
    fs::create_dir_all(artifacts())?;
    let png = artifacts().join("status-page.png");
    let _ = fs::remove_file(&png);
    let stop = Arc::new(AtomicBool::new(false));
    let stream = steady_stream(&lab, Arc::clone(&stop));
    let shot = chromium(
        &lab,
        &[
            &format!("--screenshot={}", png.display()),
            "--window-size=1280,900",
            "--hide-scrollbars",
        ],
    );
    // And as a phone shows it (responsive layout), for a look.
    let phone = artifacts().join("status-page-phone.png");
    let phone_shot = chromium(
        &lab,
        &[
            &format!("--screenshot={}", phone.display()),
            "--window-size=390,1400",
            "--hide-scrollbars",
        ],
    );
    stop.store(true, Ordering::Relaxed);
    let _ = stream.join();
    shot?;
    phone_shot?;
    let bytes = fs::read(&png).with_context(|| format!("no screenshot at {}", png.display()))?;
    ensure!(
        bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.len() > 10_000,
        "{} is not a real PNG screenshot ({} bytes)",
        png.display(),
        bytes.len()
    );
    eprintln!("status page screenshot: {}", png.display());
    Ok(())
}

/// (name, labels) → value, from OpenMetrics text.
type Samples = BTreeMap<(String, BTreeMap<String, String>), f64>;

fn parse_metrics(text: &str) -> Result<Samples> {
    ensure!(text.ends_with("# EOF\n"), "no # EOF at the end:\n{text}");
    let mut out = Samples::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, value) = line.rsplit_once(' ').context("series value")?;
        let value: f64 = value.parse().with_context(|| format!("value of {line}"))?;
        let (name, labels) = match series.split_once('{') {
            None => (series, BTreeMap::new()),
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').context("closing brace")?;
                let mut labels = BTreeMap::new();
                for kv in body.split(',') {
                    let (k, v) = kv.split_once('=').context("label k=v")?;
                    labels.insert(k.to_owned(), v.trim_matches('"').to_owned());
                }
                (name, labels)
            }
        };
        out.insert((name.to_owned(), labels), value);
    }
    Ok(out)
}

fn metric(samples: &Samples, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
    let want: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    samples
        .get(&(name.to_owned(), want))
        .copied()
        .with_context(|| format!("no sample {name}{labels:?}"))
}

fn backend(name: &str) -> [(&'static str, &str); 2] {
    [("service", "www"), ("backend", name)]
}

/// `/metrics` against the control socket's counters and against the
/// traffic sent: requests per backend show in its packets, the verdicts
/// cover every forwarded packet, ring membership and health follow the
/// status, a reload is counted, and a killed backend is `up` 0 after the
/// check window. The agent logs in JSON (`--log-format json`): the kill's
/// health transition is one JSON line with its structured fields.
#[test]
fn metrics_follow_counters_and_traffic() -> Result<()> {
    let mut lab = lab()?;
    let agent = lab.start_agent_with(&config(), &["--log-format", "json"])?;
    wait_for_status(&lab, "all webs up", verdict_window(), all_up)?;
    let before = parse_metrics(&get(&lab, "/metrics")?)?;
    for web in WEBS {
        assert_eq!(
            metric(&before, "lb_backend_packets_total", &backend(web))?,
            0.0
        );
    }

    // Known traffic: 30 new connections, one request each.
    const REQUESTS: usize = 30;
    let served = count(&answers(&lab, REQUESTS)?);
    assert_eq!(served.values().sum::<usize>(), REQUESTS, "{served:?}");

    // The control socket's counters, then a scrape: no forwarded traffic
    // in between (health probes are the LB's own traffic, passed).
    let status = checked_status(&lab)?;
    let started = Instant::now();
    let text = get(&lab, "/metrics")?;
    let scrape_time = started.elapsed();
    let m = parse_metrics(&text)?;
    eprintln!("scrape: {} bytes in {scrape_time:?}", text.len());

    let mut packets_sum = 0.0;
    for web in WEBS {
        let b = backend_status(&status, "www", web)?;
        let labels = backend(web);
        let packets = metric(&m, "lb_backend_packets_total", &labels)?;
        let requests = served.get(web).copied().unwrap_or(0);
        assert_eq!(
            packets, b.packets as f64,
            "{web} packets: metrics vs status"
        );
        assert_eq!(
            metric(&m, "lb_backend_bytes_total", &labels)?,
            b.bytes as f64,
            "{web} bytes"
        );
        // Round robin: each backend served a third; a connection with one
        // request is at least 3 packets each way (NAT counts both).
        assert_eq!(requests, REQUESTS / 3, "{served:?}");
        assert!(
            packets >= (requests * 6) as f64 && packets <= (requests * 40) as f64,
            "{web}: {packets} packets for {requests} requests"
        );
        assert_eq!(
            metric(&m, "lb_backend_flows", &labels)?,
            b.flows as f64,
            "{web} flows"
        );
        assert!(
            b.flows >= requests as u64,
            "{web}: {} flows for {requests} connections",
            b.flows
        );
        assert_eq!(
            metric(&m, "lb_backend_in_ring", &labels)?,
            f64::from(u8::from(b.in_ring))
        );
        assert_eq!(metric(&m, "lb_backend_up", &labels)?, 1.0);
        assert_eq!(
            metric(&m, "lb_backend_weight", &labels)?,
            f64::from(b.weight)
        );
        assert_eq!(
            metric(
                &m,
                "lb_backend_admin",
                &[labels[0], labels[1], ("state", "enabled")]
            )?,
            1.0
        );
        assert!(metric(&m, "lb_health_probe_duration_seconds_count", &labels)? >= RISE as f64);
        packets_sum += packets;
    }
    let service = &status.services[0];
    assert_eq!(
        metric(&m, "lb_service_packets_total", &[("service", "www")])?,
        service.packets as f64
    );
    assert_eq!(packets_sum, service.packets as f64);
    // Every forwarded packet has its verdict (NAT: replies are
    // forwarded_reply); verdicts only grow between the status and the scrape.
    let forwarded = metric(&m, "lb_verdicts_total", &[("verdict", "forwarded")])?;
    let replies = metric(&m, "lb_verdicts_total", &[("verdict", "forwarded_reply")])?;
    assert!(
        forwarded + replies >= packets_sum,
        "{forwarded} + {replies} < {packets_sum}"
    );
    assert!(forwarded >= (REQUESTS * 3) as f64, "forwarded {forwarded}");
    for (verdict, n) in &status.verdicts {
        let scraped = metric(&m, "lb_verdicts_total", &[("verdict", verdict)])?;
        assert!(
            scraped >= *n as f64,
            "{verdict}: scraped {scraped} < status {n}"
        );
    }
    assert_eq!(
        metric(&m, "lb_conntrack_entries", &[])?,
        status.conntrack.entries as f64
    );
    assert!(status.conntrack.entries >= REQUESTS as u64);
    assert_eq!(metric(&m, "lb_conntrack_capacity", &[])?, 262_144.0);
    assert_eq!(metric(&m, "lb_conntrack_insert_failures_total", &[])?, 0.0);
    assert_eq!(
        metric(
            &m,
            "lb_agent_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        )?,
        1.0
    );
    assert_eq!(metric(&m, "lb_config_generation", &[])?, 1.0);

    // /status.json is the control socket's status.
    let json: Status = serde_json::from_str(&get(&lab, "/status.json")?)?;
    assert_eq!(json.services.len(), status.services.len());
    for (a, b) in json.services[0].backends.iter().zip(&service.backends) {
        assert_eq!(
            (&a.name, a.health, a.in_ring),
            (&b.name, b.health, b.in_ring)
        );
        assert!(a.packets >= b.packets);
    }

    // A reload is counted and its result exported.
    ok(&lab, Request::Reload)?;
    let m = parse_metrics(&get(&lab, "/metrics")?)?;
    assert_eq!(metric(&m, "lb_config_generation", &[])?, 2.0);
    assert_eq!(metric(&m, "lb_config_last_reload_success", &[])?, 1.0);

    // A killed backend: up 0, out of the ring, health down.
    lab.stop_web(3)?;
    thread::sleep(verdict_window());
    let m = parse_metrics(&get(&lab, "/metrics")?)?;
    let status = checked_status(&lab)?;
    let web3 = backend("web3");
    assert_eq!(metric(&m, "lb_backend_up", &web3)?, 0.0);
    assert_eq!(metric(&m, "lb_backend_in_ring", &web3)?, 0.0);
    assert_eq!(
        metric(
            &m,
            "lb_backend_health",
            &[web3[0], web3[1], ("state", "down")]
        )?,
        1.0
    );
    for web in WEBS {
        let b = backend_status(&status, "www", web)?;
        assert_eq!(
            metric(&m, "lb_backend_in_ring", &backend(web))?,
            f64::from(u8::from(b.in_ring)),
            "{web}"
        );
    }

    // The JSON log: every line parses; the kill is logged with its fields.
    let log = agent.log_text();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).with_context(|| format!("not JSON: {l}")))
        .collect::<Result<_>>()?;
    let down = lines
        .iter()
        .find(|l| l["backend"] == "web3" && l["health"] == "down")
        .with_context(|| format!("no JSON line for web3 going down in:\n{log}"))?;
    assert_eq!(down["service"], "www");
    assert_eq!(down["address"], "198.19.0.13:80");
    assert_eq!(down["level"], "WARN");
    assert!(
        down["reason"]
            .as_str()
            .is_some_and(|r| r.contains("consecutive failures")),
        "{down}"
    );
    Ok(())
}

/// Scrapes of a big flow table run off the agent's loop: with more scrapes
/// in flight than the listener walks at once (the rest are refused with a
/// 503 at once), a change asked of the agent meanwhile is answered at once,
/// and the scrape counts every flow.
#[test]
fn scrapes_of_a_big_flow_table_do_not_stall_the_agent() -> Result<()> {
    use lb_userspace::control::BackendChange;
    const FLOWS: u32 = 200_000;
    const SCRAPES: usize = 8;
    let lab = lab()?;
    let _agent = lab.start_agent(&config())?;
    wait_for_status(&lab, "all webs up", verdict_window(), all_up)?;
    pin_made_up_flows(&lab, FLOWS)?;

    let scrapes: Vec<_> = (0..SCRAPES)
        .map(|_| {
            let ns = lab.lb_ns();
            thread::spawn(move || {
                let start = Instant::now();
                let r = in_netns(&ns, || http_get(listen(), "/metrics"));
                (start.elapsed(), r)
            })
        })
        .collect();
    thread::sleep(Duration::from_millis(30));
    let start = Instant::now();
    ok(
        &lab,
        Request::Backend(BackendChange::Weight {
            service: "www".into(),
            backend: "web3".into(),
            weight: 1,
        }),
    )?;
    let change = start.elapsed();
    let (mut served, mut busy) = (0, 0);
    for scrape in scrapes {
        let (took, response) = scrape.join().expect("scrape thread");
        let response = response??;
        match response.status {
            200 => {
                served += 1;
                let m = parse_metrics(&String::from_utf8(response.body)?)?;
                let flows = metric(&m, "lb_backend_flows", &backend("web1"))?;
                assert!(flows > f64::from(FLOWS), "web1 flows {flows}");
                assert!(metric(&m, "lb_conntrack_entries", &[])? > f64::from(FLOWS));
                eprintln!("scrape of {FLOWS}+ flows took {took:?}");
            }
            503 => {
                busy += 1;
                assert!(response.text().starts_with("busy:"), "{}", response.text());
            }
            other => bail!("scrape answered {other}: {}", response.text()),
        }
    }
    eprintln!("{served} scrapes served, {busy} refused busy; a change meanwhile took {change:?}");
    // The walks last about a second each: all scrapes overlap, so only
    // MAX_SNAPSHOTS of them walk.
    assert!(
        (1..=lb_userspace::metrics::MAX_SNAPSHOTS).contains(&served),
        "served {served}, busy {busy}"
    );
    assert!(
        change < Duration::from_millis(300),
        "a change waited {change:?} for the scrapes' flow walks"
    );
    Ok(())
}

/// Opens `n` connections to the listener and trickles a header line on
/// each every 2 s (a request that never ends), opening again any the
/// listener closes, until `stop`. Returns how many it opened in all.
fn trickle(n: usize, stop: &AtomicBool) -> usize {
    use std::io::{ErrorKind, Read, Write};
    use std::net::TcpStream;
    let mut conns: Vec<Option<TcpStream>> = (0..n).map(|_| None).collect();
    let mut opened = 0;
    let mut round = 0u64;
    while !stop.load(Ordering::Relaxed) {
        for slot in conns.iter_mut().filter(|c| c.is_none()) {
            if let Ok(mut s) = TcpStream::connect_timeout(&listen(), Duration::from_millis(200)) {
                let _ = s.set_nonblocking(true);
                if s.write_all(b"GET /metrics HTTP/1.1\r\n").is_ok() {
                    *slot = Some(s);
                    opened += 1;
                }
            }
        }
        let next = Instant::now() + Duration::from_secs(2);
        while Instant::now() < next && !stop.load(Ordering::Relaxed) {
            thread::sleep(Duration::from_millis(100));
        }
        round += 1;
        for slot in &mut conns {
            let Some(s) = slot else { continue };
            let mut buf = [0u8; 512];
            let closed = match s.read(&mut buf) {
                // Closed, or answered (a 503): open another.
                Ok(_) => true,
                Err(e) => e.kind() != ErrorKind::WouldBlock,
            };
            if closed
                || s.write_all(format!("X-Trickle: {round}\r\n").as_bytes())
                    .is_err()
            {
                *slot = None;
            }
        }
    }
    opened
}

/// Issue 21, item 2: 1 100 connections trickling a header line every 2 s
/// took the agent to its 1 024 descriptors; probes then failed with "too
/// many open files", every backend was marked down, and `lb status`
/// failed. Now the listener caps its connections and cuts slow headers: an
/// agent whose descriptor limit the attack would exceed keeps every
/// backend up, answers `lb status` throughout, and serves the
/// page again once the attack stops.
#[test]
fn a_trickle_attack_on_the_listener_leaves_backends_up_and_status_answering() -> Result<()> {
    const ATTACKERS: usize = 300;
    const ATTACK: Duration = Duration::from_secs(14);
    let lab = lab()?;
    let agent = lab.start_agent(&config())?;
    wait_for_status(&lab, "all webs up", verdict_window(), all_up)?;
    let pid = agent.pid().context("agent pid")?;
    let fds = || fs::read_dir(format!("/proc/{pid}/fd")).map(Iterator::count);
    let baseline = fds()?;
    // Room for the listener's cap and the control clients', not for the
    // attack: an uncapped listener would take every descriptor.
    let limit = baseline + lb_userspace::metrics::MAX_CONNECTIONS + 64;
    ensure!(
        ATTACKERS > limit - baseline,
        "the attack must outnumber the headroom"
    );
    let out = Command::new("prlimit")
        .arg("--pid")
        .arg(pid.to_string())
        .arg(format!("--nofile={limit}:{limit}"))
        .output()
        .context("prlimit (util-linux)")?;
    ensure!(out.status.success(), "prlimit: {out:?}");

    let stop = Arc::new(AtomicBool::new(false));
    let attack = {
        let (ns, stop) = (lab.lb_ns(), Arc::clone(&stop));
        thread::spawn(move || in_netns(&ns, || trickle(ATTACKERS, &stop)))
    };
    let started = Instant::now();
    let (mut peak, mut looks) = (baseline, 0);
    let result = (|| -> Result<()> {
        while started.elapsed() < ATTACK {
            peak = peak.max(fds()?);
            let status = checked_status(&lab).context("lb status during the attack")?;
            ensure!(all_up(&status), "a backend left the ring: {status:#?}");
            looks += 1;
            thread::sleep(Duration::from_millis(500));
        }
        let out = Command::new(lb_bin())
            .arg("status")
            .arg("--socket")
            .arg(lab.agent_socket())
            .output()?;
        ensure!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains("service www"),
            "the lb status command during the attack: {out:?}"
        );
        Ok(())
    })();
    stop.store(true, Ordering::Relaxed);
    let opened = attack.join().expect("attack thread")?;
    result.with_context(|| format!("agent log:\n{}", agent.log_text()))?;
    eprintln!(
        "trickle attack: {opened} connections opened by {ATTACKERS} attackers over {ATTACK:?}; \
         agent descriptors {baseline} at rest, at most {peak} (limit {limit}); {looks} status looks"
    );
    // The attack ran: its connections were cut and opened again.
    ensure!(opened > ATTACKERS, "only {opened} connections opened");
    ensure!(
        peak < limit,
        "the agent reached its descriptor limit ({peak}/{limit})"
    );
    let status = checked_status(&lab)?;
    ensure!(all_up(&status), "{status:#?}");
    assert_eq!(
        status.agent.probe_agent_errors, 0,
        "probes never ran short of descriptors"
    );
    let mut served = count(&answers(&lab, 6)?);
    for web in WEBS {
        ensure!(
            served.remove(web) == Some(2),
            "round robin over all three webs"
        );
    }
    // Serving again once the attack is over.
    let metrics = get(&lab, "/metrics")?;
    ensure!(
        metrics.contains("lb_probe_agent_errors_total 0"),
        "{metrics}"
    );
    agent.stop()
}
