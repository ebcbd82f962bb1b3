//! End-to-end regression tests of issue 8: what `lb status` and the log say
//! is what the data plane does. Health survives reloads and live changes,
//! new backends wait for their checks, the agent restarts the way the README
//! says without taking the site down, and no control client can stall or
//! bloat the agent or start a second one on its data plane.
//!
//! After every change the status is checked against the ring rule
//! (`control::ring_violations`). Needs root; fails loudly without it.

use std::{
    io::{Read, Write},
    os::unix::net::UnixStream,
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
    FALL, INTERVAL_MS, RISE, add_backend, answers, backend_status, checked_status, lb_bin, ok,
    pin_made_up_flows, steady_stream, three_webs, transfer, unique_prefix, wait_for_status,
    web_config,
};
use lb_userspace::{
    control::{BackendChange, HealthStatus, Request},
    harness::lab::Lab,
};

fn lab() -> Result<Lab> {
    Lab::up(&unique_prefix("lbs"), &lb_bin())
}

/// Detection of a failure or a recovery, with margin for a loaded machine.
fn verdict_window() -> Duration {
    Duration::from_millis(FALL.max(RISE) * INTERVAL_MS + 1500)
}

fn health(lab: &Lab, name: &str) -> Result<(HealthStatus, bool)> {
    let b = backend_status(&checked_status(lab)?, "www", name)?;
    Ok((b.health, b.in_ring))
}

fn wait_health(lab: &Lab, name: &str, want: HealthStatus, in_ring: bool) -> Result<Duration> {
    wait_for_status(
        lab,
        &format!("{name} {want}, in ring {in_ring}"),
        verdict_window(),
        |s| backend_status(s, "www", name).is_ok_and(|b| b.health == want && b.in_ring == in_ring),
    )
}

/// Issue 8.1: a reload (or a live add) keeps every backend's health; a
/// backend that recovers just before it is not stranded outside the ring.
#[test]
fn health_survives_reloads_and_live_changes() -> Result<()> {
    let mut lab = lab()?;
    let _agent = lab.start_agent(&three_webs())?;
    checked_status(&lab)?;

    // Down stays down across a reload: no optimistic reset to up.
    lab.stop_web(2)?;
    wait_health(&lab, "web2", HealthStatus::Down, false)?;
    ok(&lab, Request::Reload)?;
    assert_eq!(health(&lab, "web2")?, (HealthStatus::Down, false));
    let stop = Arc::new(AtomicBool::new(false));
    let stream = steady_stream(&lab, Arc::clone(&stop));
    thread::sleep(Duration::from_millis(600));
    stop.store(true, Ordering::Relaxed);
    let results = stream.join().expect("stream");
    let failed: Vec<_> = results.iter().filter(|(_, r)| r.is_err()).collect();
    assert!(
        failed.is_empty(),
        "connections failed after a reload with web2 down: {failed:?}"
    );

    // Recovered, then a reload at once: back in the ring within rise.
    lab.start_web(2)?;
    ok(&lab, Request::Reload)?;
    let took = wait_health(&lab, "web2", HealthStatus::Up, true)?;
    eprintln!("web2 back in the ring {took:?} after restart + reload");
    assert!(answers(&lab, 3)?.iter().any(|s| s == "web2"));

    // The same with a live add in between.
    lab.stop_web(2)?;
    wait_health(&lab, "web2", HealthStatus::Down, false)?;
    lab.start_web(2)?;
    add_backend(&lab, "web4", "198.19.0.14:80")?;
    let took = wait_health(&lab, "web2", HealthStatus::Up, true)?;
    eprintln!("web2 back in the ring {took:?} after restart + live add");
    // And removing a backend keeps the others' state too.
    ok(
        &lab,
        Request::Backend(BackendChange::Remove {
            service: "www".into(),
            backend: "web4".into(),
        }),
    )?;
    assert_eq!(health(&lab, "web2")?, (HealthStatus::Up, true));
    Ok(())
}

/// Issue 8.3: a backend added live waits for `rise` passed checks before it
/// takes flows; one that never passes never gets any.
#[test]
fn new_backends_take_no_flows_before_their_checks_pass() -> Result<()> {
    let lab = lab()?;
    let _agent = lab.start_agent(&web_config(
        "round-robin",
        &[("web1", 1, false), ("web2", 1, false)],
        "",
    ))?;
    // Nothing listens on .14: every check of it fails.
    add_backend(&lab, "web4", "198.19.0.14:80")?;
    assert_eq!(health(&lab, "web4")?, (HealthStatus::Pending, false));
    let got = answers(&lab, 12)?;
    assert!(got.iter().all(|s| s == "web1" || s == "web2"), "{got:?}");
    wait_health(&lab, "web4", HealthStatus::Down, false)?;

    // A live server joins, but only after it passed `rise` checks.
    let added = Instant::now();
    add_backend(&lab, "web3", "198.19.0.13:80")?;
    let (state, in_ring) = health(&lab, "web3")?;
    assert!(
        state == HealthStatus::Pending && !in_ring
            || added.elapsed() >= Duration::from_millis(INTERVAL_MS),
        "web3 {state} in ring {in_ring} right after the add"
    );
    wait_health(&lab, "web3", HealthStatus::Up, true)?;
    assert!(
        added.elapsed() >= Duration::from_millis((RISE - 1) * INTERVAL_MS),
        "web3 joined before {RISE} checks could pass"
    );
    assert!(answers(&lab, 6)?.iter().any(|s| s == "web3"));
    Ok(())
}

/// Issue 8.2 and 8.3: the agent restarted exactly as the README says
/// (`lb run --netns ...`, SIGTERM) during a transfer: the transfer completes
/// byte-exact, new connections keep rotating while no agent runs, and the
/// new agent keeps every ring as it was (a down backend stays out).
#[test]
fn restarting_the_agent_as_the_readme_says_keeps_the_site_up() -> Result<()> {
    const SIZE: usize = 32 << 20;
    let mut lab = lab()?;
    let agent = lab.start_agent(&three_webs())?;
    assert_eq!(answers(&lab, 3)?, vec!["web1", "web2", "web3"]);

    let transfer = transfer(&lab, SIZE);
    thread::sleep(Duration::from_millis(100));
    let log = agent.log_path().to_path_buf();
    agent.stop()?;
    let said = std::fs::read_to_string(&log)?;
    assert!(
        said.contains("the data plane stays attached"),
        "stop message: {said}"
    );
    ensure!(
        lab.pin_dir().join("CONNTRACK").exists(),
        "the pins are gone with the agent"
    );
    // No agent: the transfer was flow 4 (web1), so rotation resumes at web2.
    assert_eq!(answers(&lab, 3)?, vec!["web2", "web3", "web1"]);
    assert_eq!(transfer.join().expect("transfer")?, SIZE);

    // A down backend stays out of the ring across a restart.
    lab.stop_web(2)?;
    let agent = lab.start_agent(&three_webs())?;
    wait_health(&lab, "web2", HealthStatus::Down, false)?;
    agent.stop()?;
    let _agent = lab.start_agent(&three_webs())?;
    let status = checked_status(&lab)?;
    assert!(status.adopted);
    let web2 = backend_status(&status, "www", "web2")?;
    assert!(!web2.in_ring, "a restart put down web2 back: {web2:?}");
    let got = answers(&lab, 6)?;
    assert!(got.iter().all(|s| s != "web2"), "{got:?}");

    // The old way is refused with the fix, before anything is touched.
    let out = lab.exec(
        &lab.lb_ns(),
        &[
            &lb_bin().display().to_string(),
            "run",
            "--config",
            &lab.run_dir().join("lb.toml").display().to_string(),
            "--socket",
            &lab.run_dir().join("other.sock").display().to_string(),
        ],
    )?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "ip netns exec lb run was accepted");
    assert!(err.contains("--netns"), "{err}");
    Ok(())
}

/// `lb run` as the README says, on the lab's config and pin dir, with
/// control socket `socket`; the agent under test already runs there.
fn second_agent(lab: &Lab, socket: &std::path::Path) -> Result<std::process::Output> {
    Ok(Command::new(lb_bin())
        .args([
            "run",
            "--netns",
            &lab.lb_ns(),
            "--config",
            &lab.run_dir().join("lb.toml").display().to_string(),
            "--socket",
            &socket.display().to_string(),
            "--pin-dir",
            &lab.pin_dir().display().to_string(),
        ])
        .output()?)
}

/// Issue 8.7: silent clients, huge or broken requests, a second agent (or
/// `lb teardown`) on the same pin dir and a --socket naming a regular file
/// change nothing and delay nothing.
#[test]
fn no_control_client_can_stall_bloat_or_double_the_agent() -> Result<()> {
    let mut lab = lab()?;
    let agent = lab.start_agent(&three_webs())?;
    let pid = agent.pid().context("agent pid")?;
    let before = checked_status(&lab)?;

    // Four clients that connect and say nothing.
    let silent: Vec<UnixStream> = (0..4)
        .map(|_| UnixStream::connect(lab.agent_socket()))
        .collect::<std::io::Result<_>>()?;
    let start = Instant::now();
    checked_status(&lab)?;
    let took = start.elapsed();
    assert!(took < Duration::from_secs(1), "status took {took:?}");
    // Health transitions do not wait for them either.
    lab.stop_web(3)?;
    let took = wait_health(&lab, "web3", HealthStatus::Down, false)?;
    eprintln!("web3 marked down {took:?} after the kill, 4 silent clients connected");
    lab.start_web(3)?;
    drop(silent);

    // 64 MiB without a newline: refused after 64 KiB, memory stays small.
    let mut hog = UnixStream::connect(lab.agent_socket())?;
    let writer = {
        let mut hog = hog.try_clone()?;
        thread::spawn(move || {
            let chunk = vec![b'x'; 1 << 20];
            for _ in 0..64 {
                if hog.write_all(&chunk).is_err() {
                    break;
                }
            }
        })
    };
    // The agent answers and closes with our bytes unread, so the socket
    // reports a reset after the answer: keep what came before it.
    let mut reply = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n @ 1..) = hog.read(&mut buf) {
        reply.extend_from_slice(&buf[..n]);
    }
    let reply = String::from_utf8_lossy(&reply);
    writer.join().expect("writer");
    assert!(reply.contains("request longer than 64 KiB"), "{reply}");
    let peak_kb: u64 = std::fs::read_to_string(format!("/proc/{pid}/status"))?
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("VmHWM")?;
    assert!(peak_kb < 96 * 1024, "agent peak memory {peak_kb} kB");

    // Garbage, truncated JSON, unknown verbs: clear errors, nothing changed.
    for (line, want) in [
        ("garbage\n", "bad request"),
        ("{\"op\":\"status\"\n", "bad request"),
        ("{\"op\":\"explode\"}\n", "unknown variant"),
    ] {
        let mut c = UnixStream::connect(lab.agent_socket())?;
        c.write_all(line.as_bytes())?;
        let mut reply = String::new();
        c.read_to_string(&mut reply)?;
        assert!(
            reply.contains("\"ok\":false") && reply.contains(want),
            "{reply}"
        );
    }

    // A second agent on the same pin dir is refused before it touches
    // anything, naming the running one.
    let out = second_agent(&lab, &lab.run_dir().join("second.sock"))?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains(&format!("pid {pid}")), "{err}");

    // `lb teardown` under the running agent is refused the same way.
    let out = Command::new(lb_bin())
        .args([
            "teardown",
            "--pin-dir",
            &lab.pin_dir().display().to_string(),
        ])
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "teardown under a live agent ran");
    assert!(err.contains(&format!("pid {pid}")), "{err}");
    ensure!(lab.pin_dir().join("CONNTRACK").exists(), "pins removed");

    // --socket naming a regular file: refused, the file intact.
    let precious = lab.run_dir().join("precious.txt");
    std::fs::write(&precious, "keep me")?;
    let out = second_agent(&lab, &precious)?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a socket"));
    assert_eq!(std::fs::read_to_string(&precious)?, "keep me");

    // The first agent runs on as it was.
    wait_health(&lab, "web3", HealthStatus::Up, true)?;
    let after = checked_status(&lab)?;
    assert_eq!(after.adopted, before.adopted);
    let got = answers(&lab, 3)?;
    let mut sorted = got.clone();
    sorted.sort();
    if sorted != ["web1", "web2", "web3"] {
        bail!("rotation changed: {got:?}");
    }
    Ok(())
}

/// Issue 8.7: counting a big flow table for `lb status` happens off the
/// agent's loop: a change asked for meanwhile is answered at once.
#[test]
fn status_of_a_big_flow_table_does_not_stall_the_agent() -> Result<()> {
    const FLOWS: u32 = 200_000;
    let lab = lab()?;
    let _agent = lab.start_agent(&three_webs())?;
    pin_made_up_flows(&lab, FLOWS)?;

    let socket = lab.agent_socket();
    let walker = thread::spawn(move || {
        let start = Instant::now();
        let r = lb_userspace::control::request(&socket, &Request::Status);
        (start.elapsed(), r)
    });
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
    let (walk, status) = walker.join().expect("status thread");
    let status = status?.status.context("status")?;
    let flows = backend_status(&status, "www", "web1")?.flows;
    eprintln!("status walked {flows} flows in {walk:?}; a change meanwhile took {change:?}");
    assert!(flows > u64::from(FLOWS), "web1 flows {flows}");
    assert!(
        change < Duration::from_millis(300),
        "a change waited {change:?} for the flow walk ({walk:?})"
    );
    Ok(())
}

/// Issue 8.5: `lb lab up` tells users to start the agent with the lab's own
/// socket and pin dir (and `--netns`), so two labs never share them; and
/// (issue 21.16) with a config of the whole site.
#[test]
fn lab_up_prints_the_labs_own_socket_and_pin_dir() -> Result<()> {
    let prefix = unique_prefix("lbs");
    let run = |verb: &str| {
        Command::new(lb_bin())
            .args(["lab", verb, "--prefix", &prefix])
            .output()
    };
    let up = run("up")?;
    let text = String::from_utf8_lossy(&up.stdout);
    // The config it tells users to run (issue 21.16): the whole site, its
    // weaknesses answered: health checks, monitoring, firewall, database.
    let start = text
        .lines()
        .find(|l| l.contains(" run --netns "))
        .map(str::to_owned);
    let config = start
        .as_deref()
        .and_then(|l| l.split(" --config ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .map(std::fs::read_to_string);
    let down = run("down")?;
    ensure!(up.status.success(), "lab up failed: {text}");
    ensure!(down.status.success(), "lab down failed");
    let config = config
        .with_context(|| format!("no --config in:\n{text}"))?
        .context("reading the printed config")?;
    for table in [
        "[monitoring]",
        "[firewall]",
        "health = ",
        "[[pool]]",
        // The database only from the web servers.
        "allow-from = [\"198.19.0.11\", \"198.19.0.12\", \"198.19.0.13\"]",
        "www-tls",
    ] {
        ensure!(
            config.contains(table),
            "no {table} in the printed config:\n{config}"
        );
    }
    for line in [
        "  health: ",
        "  monitoring: ",
        "  firewall: ",
        "  database pool",
        "only the webs may connect",
    ] {
        ensure!(text.contains(line), "no {line:?} line in:\n{text}");
    }
    let socket = format!("--socket /run/lb-lab/{prefix}/lb.sock");
    let pins = format!("--pin-dir /sys/fs/bpf/lb-lab-{prefix}");
    let start = start.with_context(|| format!("no `lb run` line in:\n{text}"))?;
    for want in [format!("--netns {prefix}-lb"), socket.clone(), pins] {
        ensure!(start.contains(&want), "{want:?} missing from {start:?}");
    }
    ensure!(
        text.lines()
            .any(|l| l.contains(" status ") && l.contains(&socket)),
        "no `lb status {socket}` line in:\n{text}"
    );
    Ok(())
}
