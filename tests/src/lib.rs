//! Test support shared by the test tiers: the binary under test and the
//! root check, unique name prefixes, and the agent helpers the end-to-end
//! tests drive the `lb` agent with (configs, control requests, clients, the
//! ring rule). A test needing root fails loudly without it; none skips.
//! [`kernel_net`] is the kernel tier's network namespace and addresses,
//! [`kernel_frames`] the frames its test files share, [`flood`] the
//! lifecycle tests' traffic (keep-alive connections, the SYN flood),
//! [`pmtu`] the path-MTU tests' upload and route-cache readers,
//! [`multi_lb`] the multi-LB lab's agents, held connections and failover,
//! [`db`] the database tier's clients through a pool's VIPs.

pub mod db;
pub mod flood;
pub mod kernel_frames;
pub mod kernel_net;
pub mod kernel_net6;
pub mod lab6;
pub mod multi_lb;
pub mod nginx;
pub mod pmtu;
pub mod sync_peers;

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use lb_userspace::{
    config::Forwarding,
    control::{self, BackendChange, Request, Response, Status},
    harness::{
        lab::{HttpConn, Lab, bulk_byte, http_get, vip_http, web_addr},
        netns::{in_netns, ns_command},
    },
};

/// `tcpdump` in namespace `ns`, writing the frames on `dev` that match
/// `filter` to `file`: each packet as it comes (no buffering in the
/// kernel's ring or the file), whole, as root (the file is the test's).
/// Its ring is 64 MiB (`-B`): libpcap sizes each slot for a 64 KiB packet
/// when the device offloads (a veth does), so the default 2 MiB holds a
/// few dozen frames at most, about one exchange, and on a busy machine the
/// kernel dropped frames ("1 packet dropped by kernel" in 4 of 6 captures
/// under load, none in 10 with it).
pub fn tcpdump_command(ns: &str, dev: &str, file: &Path, filter: &str) -> Command {
    let mut cmd = ns_command(
        ns,
        &[
            "tcpdump",
            "-i",
            dev,
            "--immediate-mode",
            "-U",
            "-B",
            "65536",
            "-Z",
            "root",
            "-s",
            "0",
            "-w",
        ],
    );
    cmd.arg(file).arg(filter);
    cmd
}

/// The `lb` binary under test (`LB_BIN`, set by `cargo xtask test`); also
/// checks that we may build labs at all.
pub fn lb_bin() -> PathBuf {
    assert!(
        rustix::process::geteuid().is_root(),
        "these tests need root (network namespaces, XDP): run `cargo xtask test` as root"
    );
    PathBuf::from(std::env::var_os("LB_BIN").expect(
        "LB_BIN is not set: run the tests with `cargo xtask test`, which builds lb and sets it",
    ))
}

/// `{tag}{pid}-{n}`: distinct across the tests of a run and across runs.
pub fn unique_prefix(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{tag}{}-{}",
        std::process::id() % 100_000,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Both forwarding modes, NAT first.
pub const MODES: [Forwarding; 2] = [Forwarding::Nat, Forwarding::Dsr];

/// For each mode: route the webs for it, start a fresh agent with
/// `config(mode)` on a fresh data plane (so round robin counts from zero),
/// run `check`, stop the agent, which must exit 0, and remove its data
/// plane.
pub fn in_each_mode(
    lab: &mut Lab,
    config: impl Fn(Forwarding) -> String,
    mut check: impl FnMut(&mut Lab, Forwarding) -> Result<()>,
) -> Result<()> {
    for mode in MODES {
        let name = mode.name();
        lab.set_mode(mode)
            .with_context(|| format!("switching the lab to {name}"))?;
        let agent = lab
            .start_agent(&config(mode))
            .with_context(|| format!("starting the agent ({name})"))?;
        check(lab, mode)
            .with_context(|| format!("{name} mode; agent stderr:\n{}", agent.log_text()))?;
        agent
            .stop()
            .with_context(|| format!("stopping the agent ({name})"))?;
        // Stopping leaves the pinned data plane forwarding; the next mode
        // starts from a fresh one.
        lab.remove_dataplane()?;
    }
    Ok(())
}

/// Health check timings for the agent tests: fall 2 × 200 ms detection.
pub const INTERVAL_MS: u64 = 200;
pub const FALL: u64 = 2;
pub const RISE: u64 = 2;

/// A www service (VIP :80, NAT) over the named webs with fast HTTP health
/// checks; each backend is (webN, weight, backup). `extra` goes into the
/// service table.
pub fn web_config(scheduler: &str, backends: &[(&str, u32, bool)], extra: &str) -> String {
    let list: Vec<String> = backends
        .iter()
        .map(|(name, weight, backup)| {
            let n: usize = name[3..].parse().expect("webN");
            format!("{{ name = \"{name}\", address = \"{}:80\", weight = {weight}, backup = {backup} }}", web_addr(n))
        })
        .collect();
    format!(
        "[dataplane]\ninterfaces = [\"lb-front\", \"lb-back\"]\nforwarding = \"nat\"\n\n\
         [[service]]\nname = \"www\"\nvip = \"198.18.0.10:80\"\nscheduler = \"{scheduler}\"\n{extra}\
         health = {{ check = \"http\", path = \"/\", interval = \"{INTERVAL_MS}ms\", timeout = \"{INTERVAL_MS}ms\", rise = {RISE}, fall = {FALL} }}\n\
         backends = [ {} ]\n",
        list.join(", ")
    )
}

/// web1..web3 in round robin.
pub fn three_webs() -> String {
    web_config(
        "round-robin",
        &[("web1", 1, false), ("web2", 1, false), ("web3", 1, false)],
        "",
    )
}

/// One control request to the lab's agent.
pub fn ask(lab: &Lab, req: &Request) -> Result<Response> {
    control::request(&lab.agent_socket(), req)
}

/// The lab agent's status.
pub fn status(lab: &Lab) -> Result<Status> {
    ask(lab, &Request::Status)?
        .status
        .context("the agent sent no status")
}

/// The status, after checking the ring rule on it
/// ([`control::ring_violations`]): rings derived from admin state, health
/// and the backup rule, never stale.
pub fn checked_status(lab: &Lab) -> Result<Status> {
    checked_status_at(&lab.agent_socket())
}

/// [`checked_status`] of the agent listening on `socket` (another LB's).
pub fn checked_status_at(socket: &std::path::Path) -> Result<Status> {
    let status = control::request(socket, &Request::Status)?
        .status
        .context("the agent sent no status")?;
    let broken = control::ring_violations(&status);
    if !broken.is_empty() {
        bail!("rings do not follow state: {}", broken.join("; "));
    }
    Ok(status)
}

/// The status of backend `name` of service `service`.
pub fn backend_status(
    status: &Status,
    service: &str,
    name: &str,
) -> Result<control::BackendStatus> {
    status
        .services
        .iter()
        .find(|s| s.name == service)
        .and_then(|s| s.backends.iter().find(|b| b.name == name))
        .cloned()
        .with_context(|| format!("no backend {service}/{name} in status"))
}

/// Polls the (rule-checked) status until `ok` holds, for at most `within`;
/// returns how long it took.
pub fn wait_for_status(
    lab: &Lab,
    what: &str,
    within: Duration,
    ok: impl Fn(&Status) -> bool,
) -> Result<Duration> {
    wait_for_status_at(&lab.agent_socket(), what, within, ok)
}

/// [`wait_for_status`] of the agent listening on `socket` (another LB's).
pub fn wait_for_status_at(
    socket: &std::path::Path,
    what: &str,
    within: Duration,
    ok: impl Fn(&Status) -> bool,
) -> Result<Duration> {
    let start = Instant::now();
    loop {
        let status = checked_status_at(socket)?;
        if ok(&status) {
            return Ok(start.elapsed());
        }
        if start.elapsed() > within {
            bail!("{what}: not within {within:?}; status: {status:#?}");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Which server answers `n` new connections from the client.
pub fn answers(lab: &Lab, n: usize) -> Result<Vec<String>> {
    answers_at(lab, vip_http(), n)
}

/// [`answers`] of `n` new connections to `vip` (e.g. the VIP6's).
pub fn answers_at(lab: &Lab, vip: std::net::SocketAddr, n: usize) -> Result<Vec<String>> {
    in_netns(&lab.client_ns(), || {
        (0..n)
            .map(|_| http_get(vip, "/").map(|r| r.text()))
            .collect::<Result<Vec<_>>>()
    })?
}

/// How many times each name occurs.
pub fn count(names: &[String]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for n in names {
        *m.entry(n.clone()).or_insert(0) += 1;
    }
    m
}

/// New connections in a loop from the client until `stop`; each result is
/// (time since start, server name or error).
pub fn steady_stream(
    lab: &Lab,
    stop: Arc<AtomicBool>,
) -> thread::JoinHandle<Vec<(Duration, Result<String, String>)>> {
    steady_stream_at(lab, vip_http(), stop)
}

/// [`steady_stream`] to `vip` (e.g. the VIP6's).
pub fn steady_stream_at(
    lab: &Lab,
    vip: std::net::SocketAddr,
    stop: Arc<AtomicBool>,
) -> thread::JoinHandle<Vec<(Duration, Result<String, String>)>> {
    let ns = lab.client_ns();
    thread::spawn(move || {
        in_netns(&ns, move || {
            let start = Instant::now();
            let mut out = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let r = http_get(vip, "/")
                    .map(|r| r.text())
                    .map_err(|e| format!("{e:#}"));
                out.push((start.elapsed(), r));
                thread::sleep(Duration::from_millis(20));
            }
            out
        })
        .expect("client thread")
    })
}

/// A control request that must succeed; returns the agent's message.
pub fn ok(lab: &Lab, req: Request) -> Result<String> {
    let r = ask(lab, &req)?;
    if !r.ok {
        bail!("{req:?} rejected: {}", r.message);
    }
    Ok(r.message)
}

/// `lb backend add www NAME --address ADDRESS` (weight 1, primary).
pub fn add_backend(lab: &Lab, name: &str, address: &str) -> Result<String> {
    ok(
        lab,
        Request::Backend(BackendChange::Add {
            service: "www".into(),
            backend: name.into(),
            address: address.into(),
            weight: 1,
            backup: false,
        }),
    )
}

/// A download of `size` bytes through the VIP on a new connection, checked
/// byte for byte; returns the length received.
pub fn transfer(lab: &Lab, size: usize) -> thread::JoinHandle<Result<usize>> {
    let ns = lab.client_ns();
    thread::spawn(move || {
        in_netns(&ns, || -> Result<usize> {
            let mut conn = HttpConn::connect(vip_http())?;
            let r = conn.get(&format!("/bytes/{size}"))?;
            let exact = r
                .body
                .iter()
                .enumerate()
                .all(|(i, b)| *b == bulk_byte(i as u64));
            if !exact {
                bail!("corrupted transfer");
            }
            Ok(r.body.len())
        })
        .expect("client thread")
    })
}

/// Makes one connection (to web1, the first in the ring), then pins `count`
/// made-up flows from 100.64.0.0/10 to that backend in the lab agent's
/// connection table (`CONNTRACK`, the established table's overflow, which
/// the agent's counts read with it) — no packet ever matches them. For tests of what a big
/// flow table costs the agent.
pub fn pin_made_up_flows(lab: &Lab, count: u32) -> Result<()> {
    use aya::maps::{HashMap, Map, MapData};
    use lb_common::{Flow, FlowKey};
    let first = answers(lab, 1)?;
    if first != ["web1"] {
        bail!("the first connection went to {first:?}, not web1");
    }
    let open = || -> Result<HashMap<MapData, FlowKey, Flow>> {
        let data = MapData::from_pin(
            lab.pin_dir()
                .join(lb_common::map_names::MapName::CONNTRACK.name()),
        )?;
        Ok(HashMap::try_from(Map::HashMap(data))?)
    };
    // The connection's forward entry, in the established table (its slot
    // also holds the reply side of a NAT flow).
    let established = lb_userspace::dataplane::EstablishedTable::map(&MapData::from_pin(
        lab.pin_dir()
            .join(lb_common::map_names::MapName::ESTABLISHED.name()),
    )?)?;
    let flows: Vec<Flow> = established
        .entries()
        .into_iter()
        .map(|(_, f)| f)
        .filter(|f| f.direction == lb_common::flow::FORWARD)
        .collect();
    let [only] = flows[..] else {
        bail!("expected one flow, got {flows:?}");
    };
    let mut table = open()?;
    for i in 0..count {
        let key = FlowKey {
            saddr: u32::from_ne_bytes((0x6440_0000u32 + i).to_be_bytes()),
            daddr: u32::from_ne_bytes([198, 18, 0, 10]),
            sport: 4000u16.to_be(),
            dport: 80u16.to_be(),
            protocol: 6,
            ..FlowKey::default()
        };
        // Established, seen when the real one was; no reply entry (vip 0).
        let flow = Flow { vip: 0, ..only };
        table.insert(key, flow, 0)?;
    }
    Ok(())
}

/// Where headless Chromium is (`cargo xtask setup` installs Debian's).
pub const CHROMIUM: &str = "/usr/bin/chromium";

/// Runs headless Chromium inside namespace `ns` on `url` (a status page)
/// with `extra` arguments (e.g. `--dump-dom`); returns its stdout. A fresh
/// profile directory every time; killed after 60 s.
pub fn chromium(ns: &str, url: &str, extra: &[&str]) -> Result<String> {
    ensure!(
        Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: run `cargo xtask setup` (installs Debian's chromium)"
    );
    let profile = std::env::temp_dir().join(unique_prefix("lbm-chromium-"));
    fs::create_dir_all(&profile)?;
    let profile_arg = format!("--user-data-dir={}", profile.display());
    let mut args = vec![
        "netns",
        "exec",
        "",
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        &profile_arg,
        "--virtual-time-budget=4000",
    ];
    args[2] = ns;
    args.extend_from_slice(extra);
    args.push(url);
    let out_path = profile.join("stdout");
    let err_path = profile.join("stderr");
    let mut child = Command::new("ip")
        .args(&args)
        .stdin(Stdio::null())
        .stdout(fs::File::create(&out_path)?)
        .stderr(fs::File::create(&err_path)?)
        .spawn()
        .context("starting chromium")?;
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "chromium did not finish within 60 s; stderr:\n{}",
                fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        thread::sleep(Duration::from_millis(50));
    };
    let stdout = fs::read_to_string(&out_path)?;
    let stderr = fs::read_to_string(&err_path)?;
    let _ = fs::remove_dir_all(&profile);
    ensure!(
        status.success(),
        "chromium {}: {status}; stderr:\n{stderr}",
        args.join(" ")
    );
    Ok(stdout)
}

/// The value of attribute `attr` on the element with id `id` in a DOM
/// dumped by Chromium (`<tr id="b-www-web1" class="backend" data-health="up" …>`).
pub fn dom_attr(dom: &str, id: &str, attr: &str) -> Result<String> {
    let needle = format!("id=\"{id}\"");
    let at = dom
        .find(&needle)
        .with_context(|| format!("no element {needle} in the page:\n{dom}"))?;
    let tag_start = dom[..at].rfind('<').context("tag start")?;
    let tag = &dom[tag_start..at + dom[at..].find('>').context("tag end")?];
    let value = tag
        .split(&format!(" {attr}=\""))
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .with_context(|| format!("no {attr} in {tag}"))?;
    Ok(value.to_owned())
}

/// Three rounds of: `forget` removes the LB's neighbour entry for the
/// client (`neighbour` shows the entry), the keep-alive connection to `vip`
/// is answered by its own web (an established flow keeps the next hop it
/// resolved), a new connection is answered (its reply finds no entry, is
/// dropped and its next hop reported, the agent has the kernel resolve it
/// and the backend's retransmission gets through), and the client's entry
/// is back. `after_round` runs at the end of each round.
pub fn connections_carry_on_when_the_client_neighbour_goes(
    lab: &Lab,
    vip: std::net::SocketAddr,
    neighbour: impl Fn() -> Result<String>,
    forget: impl Fn() -> Result<()>,
    mut after_round: impl FnMut(u32) -> Result<()>,
) -> Result<()> {
    let connect = || in_netns(&lab.client_ns(), || HttpConn::connect(vip));
    let mut conn = connect()??;
    let server = conn.get("/")?.text();
    for round in 0..3 {
        forget()?;
        let left = neighbour()?;
        ensure!(
            left.trim().is_empty(),
            "round {round}: the client's entry is still there: {left}"
        );
        let answer = conn
            .get("/")
            .with_context(|| format!("round {round}: the keep-alive request"))?;
        ensure!(
            answer.text() == server,
            "round {round}: answered by {} instead of {server}",
            answer.text()
        );
        let started = Instant::now();
        let mut fresh = connect()?.with_context(|| format!("round {round}: connect"))?;
        fresh
            .get("/")
            .with_context(|| format!("round {round}: a new connection's request"))?;
        eprintln!(
            "round {round}: a new connection to {vip} answered {:.2?} after the client's neighbour entry went",
            started.elapsed()
        );
        let entry = neighbour()?;
        ensure!(
            ["REACHABLE", "STALE", "DELAY", "PROBE"]
                .iter()
                .any(|s| entry.contains(s)),
            "round {round}: the client's entry was not resolved again: {entry:?}"
        );
        after_round(round)?;
    }
    Ok(())
}
