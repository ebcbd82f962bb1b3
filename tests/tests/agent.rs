//! End-to-end tests of the agent as operators use it (issue 4): health-check
//! failover under load, backup servers, weights, drain, rejected reloads,
//! and SIGKILL of the agent during a transfer (hitless restart).
//!
//! Each test builds its own lab (namespaces with a unique prefix), runs the
//! real `lb` binary from `LB_BIN` (set by `cargo xtask test`), and talks to
//! it over its control socket exactly as `lb status` / `lb backend` do.
//! Needs root; fails loudly without it.

use std::{
    fs,
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::PathBuf,
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
    FALL, INTERVAL_MS, RISE, answers, ask, backend_status, count, lb_bin, status, steady_stream,
    three_webs, transfer, unique_prefix, wait_for_status, web_config,
};
use lb_userspace::{
    config::Forwarding,
    control::{AdminState, BackendChange, HealthStatus, Request},
    harness::{
        lab::{HttpConn, Lab, lab_config, udp_connect, udp_request, vip_http, vip_udp, web_addr},
        netns::in_netns,
    },
};

fn prefix() -> String {
    unique_prefix("lba")
}

fn config(scheduler: &str, backends: &[(&str, u32, bool)], extra: &str) -> String {
    web_config(scheduler, backends, extra)
}

#[test]
fn failed_server_leaves_the_ring_and_comes_back() -> Result<()> {
    let mut lab = Lab::up(&prefix(), &lb_bin())?;
    let _agent = lab.start_agent(&three_webs())?;
    assert_eq!(answers(&lab, 3)?, vec!["web1", "web2", "web3"]);

    let stop = Arc::new(AtomicBool::new(false));
    let stream = steady_stream(&lab, stop.clone());
    thread::sleep(Duration::from_millis(300));
    let killed_at = Instant::now();
    lab.stop_web(2)?;
    let detection = Duration::from_millis(FALL * INTERVAL_MS + 600);
    thread::sleep(detection + Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    let results = stream.join().expect("stream thread");

    // Failures may only happen inside the detection window after the kill.
    let started = results.len();
    let window_end = {
        let stream_start_to_kill = Duration::from_millis(300);
        stream_start_to_kill + detection
    };
    let late: Vec<_> = results.iter().filter(|(t, _)| *t > window_end).collect();
    assert!(
        late.len() > 20,
        "too few connections after the window: {}",
        late.len()
    );
    let late_failures: Vec<_> = late.iter().filter(|(_, r)| r.is_err()).collect();
    assert!(
        late_failures.is_empty(),
        "failed connections after the detection window: {late_failures:?}"
    );
    assert!(
        late.iter().all(|(_, r)| r.as_deref() != Ok("web2")),
        "web2 answered while down"
    );
    let last_failure = results
        .iter()
        .filter(|(_, r)| r.is_err())
        .map(|(t, _)| *t)
        .max();
    eprintln!(
        "failover: {started} connections, last failure {:?} after the kill (detection window {:?})",
        last_failure.map(|t| t.saturating_sub(Duration::from_millis(300))),
        detection
    );
    let status = ask(&lab, &Request::Status)?.status.context("status")?;
    let web2 = &status.services[0].backends[1];
    assert_eq!(
        (web2.health, web2.in_ring),
        (HealthStatus::Down, false),
        "{web2:?}"
    );
    assert!(
        web2.last_check
            .as_deref()
            .unwrap_or("")
            .contains("198.19.0.12"),
        "{web2:?}"
    );

    // Back up: within rise × interval (plus margin) it takes new flows again.
    lab.start_web(2)?;
    let deadline = killed_at.elapsed() + Duration::from_secs(10);
    let back = Instant::now();
    loop {
        if answers(&lab, 3)?.iter().any(|s| s == "web2") {
            break;
        }
        if killed_at.elapsed() > deadline {
            bail!("web2 did not come back");
        }
        thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "recovery: web2 back in rotation {:?} after restart (rise window {:?})",
        back.elapsed(),
        Duration::from_millis(RISE * INTERVAL_MS)
    );
    Ok(())
}

#[test]
fn backup_serves_only_while_every_primary_is_down() -> Result<()> {
    let mut lab = Lab::up(&prefix(), &lb_bin())?;
    let _agent = lab.start_agent(&config(
        "round-robin",
        &[("web1", 1, false), ("web2", 1, false), ("web3", 1, true)],
        "",
    ))?;
    let c = count(&answers(&lab, 6)?);
    assert_eq!(
        (c.get("web1"), c.get("web2"), c.get("web3")),
        (Some(&3), Some(&3), None),
        "{c:?}"
    );

    lab.stop_web(1)?;
    lab.stop_web(2)?;
    thread::sleep(Duration::from_millis(FALL * INTERVAL_MS + 800));
    assert_eq!(
        answers(&lab, 4)?,
        vec!["web3"; 4],
        "the backup answers when all primaries are down"
    );

    lab.start_web(1)?;
    thread::sleep(Duration::from_millis(RISE * INTERVAL_MS + 800));
    assert_eq!(
        answers(&lab, 4)?,
        vec!["web1"; 4],
        "new flows leave the backup once a primary is back"
    );
    Ok(())
}

#[test]
fn weights_one_two_three_split_connections_proportionally() -> Result<()> {
    let lab = Lab::up(&prefix(), &lb_bin())?;
    let _agent = lab.start_agent(&config(
        "weighted-round-robin",
        &[("web1", 1, false), ("web2", 2, false), ("web3", 3, false)],
        "",
    ))?;
    let got = answers(&lab, 300)?;
    let c = count(&got);
    for (name, share) in [
        ("web1", 1.0 / 6.0),
        ("web2", 2.0 / 6.0),
        ("web3", 3.0 / 6.0),
    ] {
        let n = *c.get(name).unwrap_or(&0) as f64;
        assert!(
            (n / 300.0 - share).abs() < 0.03,
            "{name}: {n} of 300, want {share:.3}: {c:?}"
        );
    }
    // Smooth: web3 never serves three new connections in a row.
    assert!(
        got.windows(3)
            .all(|w| !(w[0] == "web3" && w[1] == "web3" && w[2] == "web3")),
        "bursty: {got:?}"
    );

    // Changed live: web1 weight 3 → it now gets the largest share.
    let r = ask(
        &lab,
        &Request::Backend(BackendChange::Weight {
            service: "www".into(),
            backend: "web1".into(),
            weight: 3,
        }),
    )?;
    assert!(r.ok, "{r:?}");
    let c = count(&answers(&lab, 80)?);
    assert!(c.get("web1") >= c.get("web2"), "{c:?}");
    Ok(())
}

#[test]
fn drain_keeps_open_connections_and_sends_new_ones_elsewhere() -> Result<()> {
    let lab = Lab::up(&prefix(), &lb_bin())?;
    let _agent = lab.start_agent(&three_webs())?;
    let ns = lab.client_ns();
    let mut conn = in_netns(&ns, || HttpConn::connect(vip_http()))??;
    let first = in_netns(&ns, || conn.get("/").map(|r| r.text()))??;
    assert_eq!(first, "web1");

    let r = ask(
        &lab,
        &Request::Backend(BackendChange::Drain {
            service: "www".into(),
            backend: "web1".into(),
            wait: false,
            timeout: 0,
        }),
    )?;
    assert!(r.ok, "{r:?}");
    let next = answers(&lab, 6)?;
    assert!(
        next.iter().all(|s| s != "web1"),
        "new connections reached the drained backend: {next:?}"
    );
    let again = in_netns(&ns, || conn.get("/").map(|r| r.text()))??;
    assert_eq!(
        again, "web1",
        "the established connection keeps its backend"
    );
    let status = ask(&lab, &Request::Status)?.status.context("status")?;
    let web1 = &status.services[0].backends[0];
    assert_eq!((web1.admin, web1.in_ring), (AdminState::Drain, false));
    assert!(
        web1.flows >= 1,
        "drained backend still holds its flow: {web1:?}"
    );

    // Unknown names are rejected with the key named, nothing changes.
    let r = ask(
        &lab,
        &Request::Backend(BackendChange::Drain {
            service: "www".into(),
            backend: "web9".into(),
            wait: false,
            timeout: 0,
        }),
    )?;
    assert!(
        !r.ok && r.message.contains("backend") && r.message.contains("web9"),
        "{r:?}"
    );
    // A live add goes through the config file's rules: a second backend on
    // web2's address is rejected with the file-style key, nothing changes.
    let r = ask(
        &lab,
        &Request::Backend(BackendChange::Add {
            service: "www".into(),
            backend: "web4".into(),
            address: "198.19.0.12:80".into(),
            weight: 1,
            backup: false,
        }),
    )?;
    assert!(
        !r.ok && r.message.contains("service[0].backends[3].address"),
        "{r:?}"
    );
    let status = ask(&lab, &Request::Status)?.status.context("status")?;
    assert_eq!(status.services[0].backends.len(), 3, "nothing was added");
    Ok(())
}

#[test]
fn invalid_reload_is_rejected_and_traffic_is_unaffected() -> Result<()> {
    let lab = Lab::up(&prefix(), &lb_bin())?;
    let agent = lab.start_agent(&three_webs())?;
    let config_path = lab.run_dir().join("lb.toml");
    let good = std::fs::read_to_string(&config_path)?;
    std::fs::write(
        &config_path,
        good.replace("address = \"198.19.0.12:80\"", "address = \"web2\""),
    )?;
    let r = ask(&lab, &Request::Reload)?;
    assert!(!r.ok, "{r:?}");
    assert!(
        r.message.contains("service[0].backends[1].address"),
        "the key is named: {}",
        r.message
    );
    assert!(
        agent.log_text().contains("running config unchanged"),
        "{}",
        agent.log_text()
    );
    assert_eq!(
        answers(&lab, 6)?,
        vec!["web1", "web2", "web3", "web1", "web2", "web3"]
    );

    // A valid reload takes effect: web3 removed.
    std::fs::write(
        &config_path,
        good.replace(
            ", { name = \"web3\", address = \"198.19.0.13:80\", weight = 1, backup = false }",
            "",
        ),
    )?;
    let r = ask(&lab, &Request::Reload)?;
    assert!(r.ok, "{r:?}");
    assert!(answers(&lab, 6)?.iter().all(|s| s != "web3"));
    Ok(())
}

#[test]
fn sigkill_of_the_agent_keeps_traffic_flowing_and_a_new_agent_adopts_it() -> Result<()> {
    const SIZE: usize = 64 << 20;
    let lab = Lab::up(&prefix(), &lb_bin())?;
    let agent = lab.start_agent(&three_webs())?;
    assert_eq!(answers(&lab, 3)?, vec!["web1", "web2", "web3"]);

    // A long transfer, still running when the agent dies.
    let transfer = transfer(&lab, SIZE);
    thread::sleep(Duration::from_millis(100));
    agent.kill()?;
    // While no agent runs, new connections are still balanced in order.
    // The transfer was flow 4 (web1), so rotation resumes at web2.
    assert_eq!(
        answers(&lab, 3)?,
        vec!["web2", "web3", "web1"],
        "round robin continues without the agent"
    );
    assert_eq!(
        transfer.join().expect("transfer")?,
        SIZE,
        "the transfer completes"
    );

    let agent = lab.start_agent(&three_webs())?;
    assert!(
        agent.log_text().contains("adopting the data plane"),
        "{}",
        agent.log_text()
    );
    let status = ask(&lab, &Request::Status)?.status.context("status")?;
    assert!(status.adopted);
    assert_eq!(
        answers(&lab, 3)?,
        vec!["web2", "web3", "web1"],
        "the adopted ring position continues"
    );
    Ok(())
}

/// A UDP service on VIP:5353 over web1..3:5353, health-checked over HTTP on
/// the same servers' port 80 (`health.port`).
fn udp_checked_over_http() -> String {
    let list: Vec<String> = (1..=3)
        .map(|n| {
            format!(
                "{{ name = \"web{n}\", address = \"{}:5353\" }}",
                web_addr(n)
            )
        })
        .collect();
    format!(
        "[dataplane]\ninterfaces = [\"lb-front\", \"lb-back\"]\nforwarding = \"nat\"\n\n\
         [[service]]\nname = \"www-udp\"\nvip = \"198.18.0.10:5353\"\nprotocol = \"udp\"\nscheduler = \"round-robin\"\n\
         health = {{ check = \"http\", port = 80, path = \"/\", interval = \"{INTERVAL_MS}ms\", timeout = \"{INTERVAL_MS}ms\", rise = {RISE}, fall = {FALL} }}\n\
         backends = [ {} ]\n",
        list.join(", ")
    )
}

/// Which server answers each of `n` new UDP flows (a fresh source port
/// each). The sockets are kept in `held` so that no later flow reuses a
/// source port pinned to a backend by an earlier one.
fn udp_answers(lab: &Lab, n: usize, held: &mut Vec<std::net::UdpSocket>) -> Result<Vec<String>> {
    let sockets = in_netns(&lab.client_ns(), || {
        (0..n)
            .map(|i| {
                let socket = udp_connect(vip_udp())?;
                let reply = udp_request(&socket, &format!("flow{i}"))?;
                let server = reply.split(' ').next().unwrap_or("").to_owned();
                Ok((socket, server))
            })
            .collect::<Result<Vec<_>>>()
    })??;
    Ok(sockets
        .into_iter()
        .map(|(socket, server)| {
            held.push(socket);
            server
        })
        .collect())
}

#[test]
fn udp_service_checked_over_http_on_another_port_drops_a_dead_server() -> Result<()> {
    let mut lab = Lab::up(&prefix(), &lb_bin())?;
    let _agent = lab.start_agent(&udp_checked_over_http())?;
    let mut held = Vec::new();
    let detection = Duration::from_millis(FALL * INTERVAL_MS + 600);

    // Past a detection window with every server up, all three are in the
    // ring: the checks pass on port 80 (nothing listens on TCP 5353, so a
    // check there would have taken them all out).
    thread::sleep(detection);
    assert_eq!(
        udp_answers(&lab, 3, &mut held)?,
        vec!["web1", "web2", "web3"]
    );
    let status = ask(&lab, &Request::Status)?.status.context("status")?;
    for b in &status.services[0].backends {
        assert_eq!(
            (b.health, b.in_ring, b.last_check.as_deref()),
            (HealthStatus::Up, true, Some("ok")),
            "{b:?}"
        );
    }

    // web2 dies (its HTTP and UDP servers both): after fall × interval it
    // is out, and no new UDP flow goes to it.
    lab.stop_web(2)?;
    thread::sleep(detection);
    let after = udp_answers(&lab, 12, &mut held)?;
    assert!(
        after.iter().all(|s| s == "web1" || s == "web3"),
        "new UDP flows reached a dead server: {after:?}"
    );
    assert_eq!(
        count(&after).len(),
        2,
        "web1 and web3 share them: {after:?}"
    );
    let status = ask(&lab, &Request::Status)?.status.context("status")?;
    let web2 = &status.services[0].backends[1];
    assert_eq!(
        (web2.name.as_str(), web2.health, web2.in_ring),
        ("web2", HealthStatus::Down, false),
        "{web2:?}"
    );
    // The probe went to port 80, while the service's traffic goes to 5353.
    assert!(
        web2.last_check
            .as_deref()
            .unwrap_or("")
            .contains("198.19.0.12:80"),
        "{web2:?}"
    );
    assert_eq!(web2.address, "198.19.0.12:5353");

    // Restarted: within rise × interval (plus margin) it takes new flows.
    lab.start_web(2)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !udp_answers(&lab, 3, &mut held)?.iter().any(|s| s == "web2") {
        if Instant::now() > deadline {
            bail!("web2 did not come back into the UDP rotation");
        }
        thread::sleep(Duration::from_millis(50));
    }
    let status = ask(&lab, &Request::Status)?.status.context("status")?;
    let web2 = &status.services[0].backends[1];
    assert_eq!(
        (web2.health, web2.in_ring),
        (HealthStatus::Up, true),
        "{web2:?}"
    );
    Ok(())
}

/// Issue 21, item 1: `interval = "18446744073709551615s"` validated, then
/// panicked `lb run` (overflow in the first-verdict bound) and, through
/// `lb reload`, stopped every health check for good. Now `lb validate`,
/// `lb run` and `lb reload` all reject it naming the key, and the running
/// config stays in force: its checks still take a killed web out.
#[test]
fn an_overflowing_interval_is_rejected_by_validate_run_and_reload() -> Result<()> {
    const KEY: &str = "service[0].health.interval";
    let mut lab = Lab::up(&prefix(), &lb_bin())?;
    let good = three_webs();
    let bad = good.replace(
        &format!("interval = \"{INTERVAL_MS}ms\""),
        "interval = \"18446744073709551615s\"",
    );
    assert_ne!(good, bad);

    let file = lab.run_dir().join("overflow.toml");
    fs::write(&file, &bad)?;
    let out = Command::new(lb_bin()).arg("validate").arg(&file).output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains(KEY) && stderr.contains("overflow.toml"),
        "lb validate: {}\n{stderr}",
        out.status
    );

    let refused = match lab.start_agent(&bad) {
        Ok(_) => bail!("lb run accepted an interval of u64::MAX seconds"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        refused.contains(KEY) && refused.contains("longer than any key takes"),
        "{refused}"
    );
    assert!(!refused.contains("panicked"), "{refused}");

    let agent = lab.start_agent(&good)?;
    let generation = status(&lab)?.agent.generation;
    fs::write(lab.run_dir().join("lb.toml"), &bad)?;
    let r = ask(&lab, &Request::Reload)?;
    assert!(!r.ok && r.message.contains(KEY), "{r:?}");
    assert_eq!(
        status(&lab)?.agent.generation,
        generation,
        "nothing applied"
    );

    // The running checks still work: a killed web leaves the ring.
    lab.stop_web(2)?;
    wait_for_status(
        &lab,
        "web2 down after the rejected reload",
        Duration::from_millis(FALL * INTERVAL_MS + 3000),
        |s| {
            backend_status(s, "www", "web2")
                .is_ok_and(|b| b.health == HealthStatus::Down && !b.in_ring)
        },
    )?;
    assert!(answers(&lab, 4)?.iter().all(|s| s != "web2"));
    assert!(
        !agent.log_text().contains("panicked"),
        "{}",
        agent.log_text()
    );
    agent.stop()
}

/// Issue 21, item 8: with every control slot held by clients that connect
/// and say nothing, `lb status` said "Broken pipe" or "busy". Now it says
/// the agent is busy, retries within its own timeout, and answers once the
/// silent clients' time is up.
#[test]
fn status_retries_while_silent_clients_hold_the_control_socket() -> Result<()> {
    use std::os::unix::net::UnixStream;
    let lab = Lab::up(&prefix(), &lb_bin())?;
    let agent = lab.start_agent(&three_webs())?;
    let socket = lab.agent_socket();
    let silent = (0..lb_userspace::server::MAX_CLIENTS + 4)
        .map(|_| UnixStream::connect(&socket))
        .collect::<std::io::Result<Vec<_>>>()?;
    // Let the agent accept every one of them.
    thread::sleep(Duration::from_millis(300));

    let started = Instant::now();
    let out = Command::new(lb_bin())
        .arg("status")
        .arg("--socket")
        .arg(&socket)
        .output()?;
    let took = started.elapsed();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    eprintln!("lb status with {} silent clients: {took:?}", silent.len());
    assert!(out.status.success(), "{}: {stderr}", out.status);
    assert!(stderr.contains("busy, retrying"), "{stderr}");
    assert!(!stderr.contains("Broken pipe"), "{stderr}");
    assert!(stdout.contains("service www"), "{stdout}");
    assert!(
        took >= Duration::from_secs(1) && took < lb_userspace::control::CLIENT_TIMEOUT,
        "answered after {took:?}"
    );
    drop(silent);
    agent.stop()
}

/// A fresh bpffs mounted the way `deploy/lb.service` used to (no `mode=`:
/// world-writable, 1777); unmounted (its pins with it) on drop.
struct OpenBpffs(PathBuf);

impl OpenBpffs {
    fn mount(prefix: &str) -> Result<OpenBpffs> {
        let dir = std::env::temp_dir().join(format!("{prefix}-bpffs"));
        fs::create_dir_all(&dir)?;
        let status = Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&dir)
            .status()?;
        let fs = OpenBpffs(dir);
        ensure!(
            status.success(),
            "mount -t bpf bpf {}: {status}",
            fs.0.display()
        );
        let mode = fs::metadata(&fs.0)?.permissions().mode() & 0o7777;
        ensure!(mode == 0o1777, "a fresh bpffs has mode {mode:o}, not 1777");
        Ok(fs)
    }
}

impl Drop for OpenBpffs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = fs::remove_dir(&self.0);
    }
}

/// Runs `args` as user nobody.
fn as_nobody(args: &[&std::ffi::OsStr]) -> Result<std::process::Output> {
    Command::new("setpriv")
        .args([
            "--reuid",
            "nobody",
            "--regid",
            "nogroup",
            "--clear-groups",
            "--",
        ])
        .args(args)
        .output()
        .context("setpriv (util-linux)")
}

/// Issue 21, item 3: on a world-writable bpffs, user nobody created the pin
/// dir before the agent, the agent used it, and nobody then deleted the
/// link pins: XDP detached. Now a pin dir another user owns (or others can
/// write to) is refused, naming why; the agent's own is root's, 0700, and
/// nobody's attacks on it fail while traffic flows on. `lb teardown` refuses
/// such a pin dir too.
#[test]
fn a_user_cannot_detach_the_data_plane() -> Result<()> {
    let prefix = prefix();
    let lab = Lab::up(&prefix, &lb_bin())?;
    let bpffs = OpenBpffs::mount(&prefix)?;

    let squatted = bpffs.0.join("squatted");
    let out = as_nobody(&["mkdir".as_ref(), squatted.as_os_str()])?;
    ensure!(out.status.success(), "nobody's mkdir: {out:?}");
    let refused = match lab.start_agent_pinned_at(&three_webs(), &squatted) {
        Ok(_) => bail!("the agent used a pin dir that nobody created"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        refused.contains("refusing pin dir") && refused.contains("owned by uid 65534"),
        "{refused}"
    );
    assert!(
        fs::read_dir(&squatted)?.next().is_none(),
        "nothing pinned there"
    );

    let shared = bpffs.0.join("shared");
    fs::create_dir(&shared)?;
    fs::set_permissions(&shared, fs::Permissions::from_mode(0o777))?;
    let refused = match lab.start_agent_pinned_at(&three_webs(), &shared) {
        Ok(_) => bail!("the agent used a world-writable pin dir"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        refused.contains("group or other users can write to it (mode 0777"),
        "{refused}"
    );
    // `lb teardown` (root) acts on neither: what is pinned there may not
    // be the agent's.
    for (dir, problem) in [
        (&squatted, "owned by uid 65534"),
        (&shared, "group or other users can write to it (mode 0777"),
    ] {
        let out = Command::new(lb_bin())
            .arg("teardown")
            .arg("--pin-dir")
            .arg(dir)
            .output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("refusing pin dir") && err.contains(problem),
            "teardown of {}: {out:?}",
            dir.display()
        );
    }

    let pins = bpffs.0.join("lb");
    let agent = lab.start_agent_pinned_at(&three_webs(), &pins)?;
    let meta = fs::metadata(&pins)?;
    assert_eq!(
        (meta.uid(), meta.permissions().mode() & 0o7777),
        (0, 0o700),
        "the agent's pin dir"
    );
    assert_eq!(answers(&lab, 3)?, vec!["web1", "web2", "web3"]);
    let pinned = lb_tests::kernel_net::pinned_files(&pins);
    assert!(!pinned.is_empty());
    let elsewhere = bpffs.0.join("elsewhere");
    let attacks: [Vec<&std::ffi::OsStr>; 4] = [
        vec!["rm".as_ref(), "-rf".as_ref(), pins.as_os_str()],
        vec!["find".as_ref(), pins.as_os_str(), "-delete".as_ref()],
        vec!["mv".as_ref(), pins.as_os_str(), elsewhere.as_os_str()],
        vec!["chmod".as_ref(), "0777".as_ref(), pins.as_os_str()],
    ];
    for attack in attacks {
        let out = as_nobody(&attack)?;
        assert!(!out.status.success(), "as nobody, {attack:?} succeeded");
    }
    assert_eq!(lb_tests::kernel_net::pinned_files(&pins), pinned);
    assert!(!elsewhere.exists());
    assert_eq!(
        answers(&lab, 3)?,
        vec!["web1", "web2", "web3"],
        "still attached and forwarding"
    );
    agent.stop()
}

/// The lab's three services (www :80, www-udp :5353, www-tls :443), each
/// over web1..web3, checked over HTTP on port 80.
fn three_checked_services() -> String {
    let health = format!(
        "health = {{ check = \"http\", port = 80, path = \"/\", interval = \"{INTERVAL_MS}ms\", timeout = \"{INTERVAL_MS}ms\", rise = {RISE}, fall = {FALL} }}\nbackends = ["
    );
    lab_config(Forwarding::Nat).replace("backends = [", &health)
}

/// The agent's log, one line per event at the right level, with names as
/// the config spells them: at start one line per service and one per
/// backend coming up (INFO, with the ring it changed), never a line per
/// service for each transition; a backend going down is one WARN line.
#[test]
fn logs_are_one_line_per_event_at_the_right_level() -> Result<()> {
    const SERVICES: [&str; 3] = ["www", "www-udp", "www-tls"];
    let mut lab = Lab::up(&prefix(), &lb_bin())?;
    let agent = lab.start_agent_with(&three_checked_services(), &["--log-format", "json"])?;
    let parse = |log: &str| -> Result<Vec<serde_json::Value>> {
        log.lines()
            .map(|l| serde_json::from_str(l).with_context(|| format!("not JSON: {l}")))
            .collect()
    };
    let message = |l: &serde_json::Value| l["message"].as_str().unwrap_or_default().to_owned();
    let mut check = || -> Result<()> {
        // `lb: ready` came after every first verdict: the start is logged.
        let start = parse(&agent.log_text())?;
        let text: Vec<String> = start
            .iter()
            .map(|l| format!("{} {}", l["level"], message(l)))
            .collect();
        println!("{} lines at start:\n{}", start.len(), text.join("\n"));
        for l in &start {
            // The host checks' findings (`lb doctor` at `lb run`) are
            // warnings about the host, not events of the agent: the lab's
            // back bridge hides the backends' veths, which it says once.
            if message(l).starts_with("host check: ") {
                assert_eq!(l["level"], "WARN", "{l}");
                continue;
            }
            assert_eq!(l["level"], "INFO", "a normal start is all INFO: {l}");
            let m = message(l);
            for debug in ["Tcp", "Udp", "Nat", "Native", "RoundRobin"] {
                assert!(!m.contains(debug), "Debug formatting {debug:?} in {m}");
            }
        }
        let ups: Vec<&serde_json::Value> = start.iter().filter(|l| l["health"] == "up").collect();
        assert_eq!(
            ups.len(),
            9,
            "one line per backend coming up:\n{}",
            text.join("\n")
        );
        for l in &ups {
            let m = message(l);
            let rings: Vec<&str> = m.split("; service ").skip(1).collect();
            assert_eq!(rings.len(), 1, "one ring, its own service's: {m}");
            assert!(
                rings[0].starts_with(&format!("{} ", l["service"].as_str().unwrap_or("?"))),
                "{m}"
            );
        }
        for (name, protocol) in [("www", "tcp"), ("www-udp", "udp"), ("www-tls", "tcp")] {
            let want = format!("service {name} ");
            let spelled = format!(" {protocol} nat round-robin: ring [] (0 of 3 backends)");
            assert!(
                start
                    .iter()
                    .any(|l| message(l).starts_with(&want) && message(l).contains(&spelled)),
                "no start line for {name} with {spelled:?}:\n{}",
                text.join("\n")
            );
        }
        // 3 services + 9 transitions + the fixed lines (interfaces, control
        // socket, bpffs): the old log had a line per service per transition.
        assert!(
            start.len() <= SERVICES.len() + 9 + 6,
            "{} lines:\n{}",
            start.len(),
            text.join("\n")
        );

        lab.stop_web(2)?;
        wait_for(Duration::from_secs(5), || {
            parse(&agent.log_text()).is_ok_and(|lines| {
                lines.iter().filter(|l| l["health"] == "down").count() == SERVICES.len()
            })
        })?;
        let all = parse(&agent.log_text())?;
        for l in all.iter().filter(|l| l["health"] == "down") {
            assert_eq!(l["level"], "WARN", "{l}");
            let m = message(l);
            assert_eq!(m.matches("; service ").count(), 1, "{m}");
            assert!(m.contains("ring [web1 web3] (2 of 3 backends)"), "{m}");
        }
        Ok(())
    };
    check().with_context(|| format!("agent stderr:\n{}", agent.log_text()))
}

/// Polls `ok` every 50 ms for at most `within`.
fn wait_for(within: Duration, ok: impl Fn() -> bool) -> Result<()> {
    let deadline = Instant::now() + within;
    while !ok() {
        if Instant::now() > deadline {
            bail!("not within {within:?}");
        }
        thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}
