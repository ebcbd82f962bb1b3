//! The `lb lab` verbs: up, down, demo.

use std::{
    fs,
    path::{Path, PathBuf},
    thread,
};

use anyhow::{Context, bail};
use signal_hook::{
    consts::{SIGHUP, SIGINT, SIGTERM},
    iterator::Signals,
};

use super::{
    CLIENT_BACK, CLIENT_FRONT, DEFAULT_PREFIX, DNS_NAME, DNS_PORT, DnsZone, HTTPS_PORT, LB_BACK,
    LB_FRONT, Lab, MONITORING_LISTEN, SITE_DENIED, SITE_NAME, UDP_PORT, VIP, VIP6, WEB_NAMES,
    dns_service_config, down, http_get, site_config, site_config_v6, vip_http, vip6_http, web_addr,
};
use crate::{
    config::Forwarding,
    control::Request,
    harness::netns::{self, in_netns},
};

/// `lb lab ...`
#[derive(Debug, Clone, clap::Subcommand)]
pub enum LabCommand {
    /// Create the namespaces and start the web servers; they keep running
    /// after this command returns, until `lb lab down`
    Up {
        /// Namespaces are named {prefix}-client, {prefix}-lb, ...
        #[arg(long, default_value = DEFAULT_PREFIX)]
        prefix: String,
        /// How the web servers route replies: through the LB (nat),
        /// straight to the client (dsr), or to the LB's source address
        /// with no route to the clients (full-nat; with --lbs each LB has
        /// its own); must match the agent's config
        #[arg(long, value_enum, default_value_t = Mode::Nat)]
        mode: Mode,
        /// Build the multi-LB lab instead: a router running BIRD (BGP, BFD,
        /// ECMP) in front of this many LBs, each with its own BIRD; the
        /// agents' configs (with `[announce]`) are written for you
        #[arg(long, value_parser = clap::value_parser!(u32).range(2..=4))]
        lbs: Option<u32>,
        /// Build the routed lab instead: the web servers in a subnet behind
        /// a router (not on the LB's segment), each with `lb decap`
        /// attached; the agent's config (services over IPIP and GUE) is
        /// written for you
        #[arg(long, conflicts_with_all = ["lbs", "mode"])]
        tunnel: bool,
    },
    /// Remove the lab: processes, namespaces, links (fine if none exists)
    Down {
        #[arg(long, default_value = DEFAULT_PREFIX)]
        prefix: String,
    },
    /// Build the lab, balance requests through the agent in NAT then DSR
    /// mode (HTTP over IPv4 and IPv6, HTTPS, health checks, the status
    /// page, the firewall),
    /// run the database tier through a failover, the tunnel act (the web
    /// servers behind a router, services over IPIP and GUE, `lb decap` on
    /// each), then the LB failover act (two LBs behind a BGP/ECMP router,
    /// one dies while a connection runs); report what answered each
    /// request, and remove the lab
    Demo {
        #[arg(long, default_value = DEFAULT_PREFIX)]
        prefix: String,
        /// New TCP connections to make per mode
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(3..=10_000))]
        requests: u32,
        /// Skip the LB failover act (it needs BIRD)
        #[arg(long)]
        no_failover: bool,
        /// Only the first act: NAT then DSR (no databases, tunnels or
        /// failover)
        #[arg(long)]
        web_only: bool,
        /// The LB failover act runs by default now; kept so that older
        /// command lines still work
        #[arg(long, hide = true, conflicts_with = "no_failover")]
        failover: bool,
    },
}

/// Forwarding mode, as a command-line value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    Nat,
    Dsr,
    FullNat,
}

impl From<Mode> for Forwarding {
    fn from(mode: Mode) -> Forwarding {
        match mode {
            Mode::Nat => Forwarding::Nat,
            Mode::Dsr => Forwarding::Dsr,
            Mode::FullNat => Forwarding::FullNat,
        }
    }
}

/// Runs one `lb lab` verb.
pub fn run(cmd: LabCommand) -> anyhow::Result<()> {
    let result = match cmd {
        LabCommand::Up {
            prefix,
            mode,
            lbs,
            tunnel,
        } => {
            teardown_on_signal(&prefix)?;
            match lbs {
                _ if tunnel => super::tunnel_demo::up_routed(&prefix, &current_lb()?),
                None => up(&prefix, mode.into()),
                Some(n) => up_ha(&prefix, mode.into(), n as usize),
            }
        }
        LabCommand::Down { prefix } => {
            down(&prefix)?;
            println!(
                "lab {prefix}: removed (namespaces, links, processes, {})",
                super::run_dir(&prefix).display()
            );
            Ok(())
        }
        LabCommand::Demo {
            prefix,
            requests,
            no_failover,
            web_only,
            failover: _,
        } => {
            teardown_on_signal(&prefix)?;
            demo(&prefix, requests, !web_only)?;
            if !web_only {
                super::tunnel_demo::demo_tunnels(&prefix, &current_lb()?, requests)?;
            }
            if !no_failover && !web_only {
                demo_failover(&prefix)?;
            }
            Ok(())
        }
    };
    if netns::interrupted() {
        // The verb gave up because of a signal; returning would end the
        // process while the handler is still tearing down, and the handler
        // exits the process when it is done.
        loop {
            thread::park();
        }
    }
    result
}

/// On Ctrl-C (or SIGTERM/SIGHUP) while a verb runs, remove the lab and exit:
/// a half-built lab must not outlive an interrupted command. `exit` skips
/// the `Lab` guard's Drop, so the handler does the teardown itself.
fn teardown_on_signal(prefix: &str) -> anyhow::Result<()> {
    let mut signals =
        Signals::new([SIGINT, SIGTERM, SIGHUP]).context("installing signal handlers")?;
    let prefix = prefix.to_owned();
    thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            eprintln!("lab {prefix}: interrupted (signal {sig}), removing the lab");
            netns::block_new_work();
            if let Err(e) = down(&prefix) {
                eprintln!(
                    "lab {prefix}: teardown failed: {e:#}; run `lb lab down --prefix {prefix}`"
                );
            }
            std::process::exit(128 + sig);
        }
    });
    Ok(())
}

pub(super) fn current_lb() -> anyhow::Result<PathBuf> {
    std::env::current_exe().context("finding the lb binary (current_exe)")
}

fn up(prefix: &str, mode: Forwarding) -> anyhow::Result<()> {
    let mut lab = Lab::up_detached(prefix, &current_lb()?)?;
    lab.set_mode(mode)?;
    lab.start_databases()
        .context("starting the lab's databases (db1..db3)")?;
    for n in 1..=WEB_NAMES.len() {
        lab.start_dns(n, DnsZone::Serving)
            .with_context(|| format!("starting the DNS server of web{n}"))?;
    }
    let configs = write_configs(&lab)?;
    let pids: Vec<String> = lab.server_pids().iter().map(ToString::to_string).collect();
    let pid_file = lab.run_dir().join("servers.pid");
    fs::write(&pid_file, pids.join("\n") + "\n")
        .with_context(|| format!("writing {}", pid_file.display()))?;
    print_instructions(&lab, mode, &configs)?;
    lab.keep();
    Ok(())
}

/// `lb lab up --lbs N`: the multi-LB lab, its BIRDs running, an agent
/// config per LB written (consistent hashing: `maglev`),
/// and how to start the agents.
fn up_ha(prefix: &str, mode: Forwarding, lbs: usize) -> anyhow::Result<()> {
    let mut lab = Lab::up_ha_detached(prefix, &current_lb()?, lbs)?;
    lab.set_mode(mode)?;
    lab.start_databases()
        .context("starting the lab's databases (db1..db3)")?;
    let etcd = lab.start_lab_etcd()?;
    let pids: Vec<String> = lab.server_pids().iter().map(ToString::to_string).collect();
    let pid_file = lab.run_dir().join("servers.pid");
    fs::write(&pid_file, pids.join("\n") + "\n")
        .with_context(|| format!("writing {}", pid_file.display()))?;
    let lb = lb_command()?;
    println!(
        "lab {prefix} is up: {lbs} LBs behind a BGP/ECMP router ({} mode)",
        mode.name()
    );
    println!("  namespaces: {}", lab.namespaces().join(" "));
    println!(
        "  {}: eth0 {}/24, default via the router",
        lab.client_ns(),
        super::HA_CLIENT
    );
    println!(
        "  {}: BIRD (BGP + BFD to each LB, kernel multipath route to {VIP}); socket {}",
        lab.router_ns(),
        lab.router_bird_socket().display()
    );
    for n in 1..=lbs {
        let config = lab.lb_dir(n).join("lb.toml");
        fs::write(&config, lab.ha_site_config_coordinated(n, mode, &etcd))
            .with_context(|| format!("writing {}", config.display()))?;
        println!(
            "  {}: lb-front {}/24, VIP on lo, BIRD socket {}\n    start its agent: {lb} run --netns {} --config {} --socket {} --pin-dir {}",
            lab.lb_ns_of(n),
            super::lb_front_addr(n),
            lab.bird_socket_of(n).display(),
            lab.lb_ns_of(n),
            config.display(),
            lab.agent_socket_of(n).display(),
            lab.pin_dir_of(n).display()
        );
    }
    if mode == Forwarding::FullNat {
        let sources: Vec<String> = (1..=lbs)
            .map(|n| format!("lb{n} {}", super::lb_source_addr(n)))
            .collect();
        println!(
            "  full NAT: each LB translates from its own source address on lb-back ({}), \
             so the webs' replies return to the LB that translated the flow; full-NAT flows \
             are not synced, and those of an LB that dies end with it",
            sources.join(", ")
        );
    }
    super::db_demo::print_databases(&lab);
    println!(
        "  services on every LB: tcp {VIP}:80 and tcp {VIP}:443 (TLS passed through), maglev over web1..web3, \
         tcp {}:80 round robin and tcp {}:80 least connections (their flows kept across LBs by [sync]: port {} \
         on the back network, key {}), HTTP health checks; every LB runs the pool under [coordination] (one leader promotes, all follow its \
         record in etcd), lb1 (the webs' and the databases' gateway) carries its traffic; \
         firewall: {SITE_DENIED} denied, 1000 new flows/s per /24",
        super::RR_VIP,
        super::LC_VIP,
        super::SYNC_PORT,
        lab.sync_key_path().display()
    );
    println!(
        "  etcd (three members) in {}: {}",
        lab.sw_ns(),
        etcd.join(" ")
    );
    println!(
        "  monitoring: status page http://{MONITORING_LISTEN}/ inside each LB's namespace (pools, BGP sessions, active flows)"
    );
    println!(
        "  then: ip netns exec {} ip route show {VIP}   (one next hop per LB announcing)\n  \
         ip netns exec {} curl -X POST http://{VIP}/visits   (the webs write to the database through lb1)\n  \
         remove it: {lb} lab down --prefix {prefix}",
        lab.router_ns(),
        lab.client_ns()
    );
    lab.keep();
    Ok(())
}

/// Writes the agent configs of every mode into the run dir.
fn write_configs(lab: &Lab) -> anyhow::Result<[(Forwarding, PathBuf); 3]> {
    let configs = [Forwarding::Nat, Forwarding::Dsr, Forwarding::FullNat]
        .map(|m| (m, lab.run_dir().join(format!("{}.toml", m.name()))));
    for (mode, path) in &configs {
        let pool = super::site_pool_config(&lab.run_dir(), Some("5s"));
        fs::write(path, site_config(*mode) + &dns_service_config() + &pool)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(configs)
}

/// How to name the lb binary in printed commands: `lb` if that is what
/// PATH finds, else its full path.
pub(super) fn lb_command() -> anyhow::Result<String> {
    let exe = current_lb()?;
    let path = std::env::var_os("PATH").unwrap_or_default();
    let on_path = std::env::split_paths(&path)
        .map(|dir| dir.join("lb"))
        .find(|candidate| candidate.is_file())
        .and_then(|found| found.canonicalize().ok());
    if on_path.is_some() && on_path == exe.canonicalize().ok() {
        Ok("lb".to_owned())
    } else {
        Ok(exe.display().to_string())
    }
}

fn print_instructions(
    lab: &Lab,
    mode: Forwarding,
    configs: &[(Forwarding, PathBuf)],
) -> anyhow::Result<()> {
    let p = lab.prefix();
    let lb = lb_command()?;
    let mode_name = mode.name();
    // The repository's sample config is the NAT one; the run dir has both.
    let repo_config = Path::new("config").join(format!("{DEFAULT_PREFIX}.toml"));
    let run_config = configs
        .iter()
        .find(|(m, _)| *m == mode)
        .map(|(_, path)| path.clone())
        .with_context(|| format!("no config written for {mode_name}"))?;
    let config = if mode == Forwarding::Nat && repo_config.is_file() {
        repo_config
    } else {
        run_config
    };
    println!("lab {p} is up ({mode_name} mode)");
    println!("  namespaces: {}", lab.namespaces().join(" "));
    println!(
        "  {}: eth0 {CLIENT_FRONT}/24, back0 {CLIENT_BACK}/24 (return path for DSR)",
        lab.client_ns()
    );
    println!(
        "  {}: lb-front {LB_FRONT}/24, lb-back {LB_BACK}/24, VIP {VIP}/32 on lo",
        lab.lb_ns()
    );
    println!(
        "  {}: bridge br0 joining lb-back, back0 and the webs' eth0",
        lab.sw_ns()
    );
    for (i, name) in WEB_NAMES.iter().enumerate() {
        println!(
            "  {}: eth0 {}/24, VIP on lo; HTTP :80, HTTPS :443, UDP :{UDP_PORT} (answers \"{name}\"), DNS :{DNS_PORT} (NSD: {DNS_NAME} A = its address)",
            lab.web_ns(i + 1),
            web_addr(i + 1)
        );
    }
    println!(
        "  services: tcp {VIP}:80, udp {VIP}:{UDP_PORT}, tcp {VIP}:443 (TLS passed through) and udp {VIP}:{DNS_PORT} (dns, check = \"dns\"), round robin over web1, web2, web3"
    );
    println!(
        "  TLS: lab CA {} (the webs hold their keys; the LB never sees them)",
        lab.ca_path().display()
    );
    super::db_demo::print_databases(lab);
    println!(
        "  health: every web checked over HTTP on :80 every 1 s (out after 2 failures, back after 2 passes)"
    );
    println!(
        "  monitoring: status page http://{MONITORING_LISTEN}/ and /metrics inside {} (a browser or curl under ip netns exec)",
        lab.lb_ns()
    );
    println!(
        "  firewall: new flows from {SITE_DENIED} denied; at most 1000 new flows/s per /24 (lb firewall show)"
    );
    println!("  logs and configs: {}", lab.run_dir().display());
    println!();
    println!("Try it:");
    // --netns, not `ip netns exec`: the agent stays in the host's mount
    // namespace, so its pins (and the data plane) outlive it. Socket and pin
    // dir are the lab's own, so two labs never share an agent's paths.
    let socket = lab.agent_socket();
    println!(
        "  terminal 1:  {lb} run --netns {p}-lb --config {} --socket {} --pin-dir {}",
        config.display(),
        socket.display(),
        lab.pin_dir().display()
    );
    println!("  terminal 2:  ip netns exec {p}-client curl http://{VIP}/");
    println!(
        "               ip netns exec {p}-client curl --cacert {} --resolve {SITE_NAME}:443:{VIP} https://{SITE_NAME}/",
        lab.ca_path().display()
    );
    println!("               {lb} status --socket {}", socket.display());
    println!("               ip netns exec {p}-lb curl -s http://{MONITORING_LISTEN}/metrics");
    println!(
        "               ip netns exec {p}-client curl -X POST http://{VIP}/visits   (then GET: reads)"
    );
    println!(
        "               {lb} db promote db db2 --socket {}",
        socket.display()
    );
    println!("  restart the agent at will: the data plane keeps forwarding while it is stopped");
    println!(
        "Without the agent, the webs answer directly: ip netns exec {p}-client curl http://{}/",
        web_addr(1)
    );
    let others: Vec<&str> = configs
        .iter()
        .filter(|(m, _)| *m != mode)
        .map(|(m, _)| m.name())
        .collect();
    println!(
        "Other modes: {lb} lab up --prefix {p} --mode {} (configs: {})",
        others.join("|"),
        configs
            .iter()
            .map(|(_, path)| path.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("Remove it:   {lb} lab down --prefix {p}");
    Ok(())
}

fn demo(prefix: &str, requests: u32, databases: bool) -> anyhow::Result<()> {
    let mut lab = Lab::up(prefix, &current_lb()?)?;
    println!(
        "lab {prefix} is up: namespaces {}",
        lab.namespaces().join(" ")
    );
    // The VIP6's service needs the LB's kernel to forward IPv6.
    lab.forward_ipv6()?;
    let mut problems = Vec::new();
    for mode in [Forwarding::Nat, Forwarding::Dsr] {
        problems.extend(demo_mode(&lab, mode, requests)?);
    }
    if databases {
        problems.extend(super::db_demo::demo_databases(&mut lab)?);
    }
    drop(lab);
    println!("lab {prefix} removed");
    if !problems.is_empty() {
        bail!("demo failed: {}", problems.join("; "));
    }
    println!(
        "demo ok: every request answered, every server used, in both modes, over IPv4 and IPv6{}",
        if databases {
            "; writes on the primary, reads over the replicas, failover done"
        } else {
            ""
        }
    );
    Ok(())
}

/// The failover act: two LBs announce the VIP over BGP, the router
/// spreads connections over both; lb1 is cut off (its switch port stops forwarding) while a keep-alive
/// connection asks every 50 ms; BFD takes lb1 out of the route and the
/// connection goes on through lb2 to the same web (consistent hashing).
fn demo_failover(prefix: &str) -> anyhow::Result<()> {
    use std::time::{Duration, Instant};
    let lab = Lab::up_ha(prefix, &current_lb()?, 2)?;
    lab.set_mode(Forwarding::Dsr)?;
    println!();
    println!("== failover: lab {prefix} with a router (BIRD, ECMP) and two LBs (BIRD each), DSR");
    let mut agents = Vec::new();
    for n in 1..=2 {
        agents.push(lab.start_agent_on(n, &lab.ha_config(n, Forwarding::Dsr, "maglev", 0))?);
    }
    let both = [super::lb_front_addr(1), super::lb_front_addr(2)];
    let took = lab.wait_for_route(&both, Duration::from_secs(20))?;
    println!("== both LBs announce {VIP} over BGP; the router's ECMP route after {took:?}:");
    print!(
        "{}",
        lab.exec_ok(&lab.router_ns(), &["ip", "route", "show", &VIP.to_string()])?
    );
    let mut conn = in_netns(&lab.client_ns(), || super::HttpConn::connect(vip_http()))??;
    let first = conn.get("/")?.text();
    println!("== a keep-alive connection is served by {first}; lb1 is cut off now (a dead host)");
    lab.set_lb_reachable(1, false)?;
    let down_at = Instant::now();
    let (mut answers, mut longest, mut last, mut moved) = (0, Duration::ZERO, Instant::now(), None);
    while down_at.elapsed() < Duration::from_secs(3) {
        let name = conn.get("/")?.text();
        longest = longest.max(last.elapsed());
        last = Instant::now();
        answers += 1;
        if name != first {
            moved = Some(name);
        }
        thread::sleep(Duration::from_millis(50));
    }
    println!("== the router's route 3 s later (BFD took lb1 out):");
    print!(
        "{}",
        lab.exec_ok(&lab.router_ns(), &["ip", "route", "show", &VIP.to_string()])?
    );
    println!(
        "== the connection went on: {answers} answers in 3 s, longest gap {longest:?}, {}",
        moved
            .as_deref()
            .map_or(format!("all from {first}"), |m| format!(
                "but {m} answered too"
            ))
    );
    drop(agents);
    drop(lab);
    println!("lab {prefix} removed");
    if let Some(other) = moved {
        bail!("demo failed: the connection moved from {first} to {other}");
    }
    println!("failover ok: no connection broken");
    Ok(())
}

/// One mode of the demo; returns what went wrong with the traffic (errors
/// setting up the mode are returned as Err).
fn demo_mode(lab: &Lab, mode: Forwarding, requests: u32) -> anyhow::Result<Vec<String>> {
    let name = mode.name();
    println!();
    println!("== {name}: starting the agent");
    lab.set_mode(mode)?;
    let agent = lab.start_agent(&site_config_v6(mode))?;
    println!(
        "== {name}: {requests} new TCP connections to http://{VIP}/ from {}",
        lab.client_ns()
    );
    let answers = client_requests(lab, requests)?;
    let mut problems = summarize(name, &answers);
    println!(
        "== {name}: {requests} new TCP connections to http://[{VIP6}]/ (IPv6) from {}",
        lab.client_ns()
    );
    let answers = client_requests_to(lab, vip6_http(), requests)?;
    problems.extend(summarize(&format!("{name} IPv6"), &answers));
    problems.extend(demo_https(lab, name));
    problems.extend(demo_watch(lab, name));
    agent
        .stop()
        .with_context(|| format!("stopping the agent ({name})"))?;
    // The agent's stop leaves the data plane forwarding (hitless restarts);
    // the next mode starts from a fresh one.
    lab.remove_dataplane()?;
    Ok(problems)
}

/// What an operator sees of the mode: the monitoring listener's status
/// (as the status page shows it) and the firewall's answer for a client of
/// the denied network (`lb explain`); the problems seen.
fn demo_watch(lab: &Lab, mode: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let listen: std::net::SocketAddr = match MONITORING_LISTEN.parse() {
        Ok(a) => a,
        Err(e) => return vec![format!("{mode}: monitoring address: {e}")],
    };
    match in_netns(&lab.lb_ns(), || http_get(listen, "/status.json")) {
        Ok(Ok(r)) if r.status == 200 => {
            match serde_json::from_slice::<crate::control::Status>(&r.body) {
                Ok(st) => {
                    let backends: Vec<_> = st.services.iter().flat_map(|s| &s.backends).collect();
                    let up = backends
                        .iter()
                        .filter(|b| b.health == crate::control::HealthStatus::Up)
                        .count();
                    let active: u64 = backends.iter().map(|b| b.active).sum();
                    println!(
                        "== {mode}: status page http://{MONITORING_LISTEN}/ (in {}): {} services, {up} of {} backends up (HTTP checks), {active} active flows",
                        lab.lb_ns(),
                        st.services.len(),
                        backends.len()
                    );
                    if up != backends.len() {
                        problems.push(format!("{mode}: {up} of {} backends up", backends.len()));
                    }
                }
                Err(e) => problems.push(format!("{mode}: status.json: {e}")),
            }
        }
        Ok(Ok(r)) => problems.push(format!("{mode}: status.json answered {}", r.status)),
        Ok(Err(e)) | Err(e) => problems.push(format!("{mode}: status.json: {e:#}")),
    }
    let denied = SITE_DENIED.replace(".0/24", ".7:40000");
    let explain = Request::Explain {
        client: denied.clone(),
        service: format!("{VIP}:{}/tcp", super::HTTP_PORT),
    };
    match crate::control::request(&lab.agent_socket(), &explain) {
        Ok(r) => {
            // The line of the explanation that says what the firewall does.
            let verdict = r
                .message
                .lines()
                .find(|l| l.contains("firewall"))
                .unwrap_or_default()
                .trim()
                .to_owned();
            println!(
                "== {mode}: firewall: a new flow from {denied} (denied network {SITE_DENIED}): {verdict}"
            );
            if !verdict.contains("drop_firewall_deny") {
                problems.push(format!(
                    "{mode}: the firewall does not deny {denied}: {}",
                    r.message
                ));
            }
        }
        Err(e) => problems.push(format!("{mode}: lb explain: {e:#}")),
    }
    problems
}

/// Three HTTPS requests through the VIP with curl, verified against the lab
/// CA (TLS passed through to the webs); the problems seen.
pub(super) fn demo_https(lab: &Lab, mode: &str) -> Vec<String> {
    if netns::require_tool("curl", "apt-get install curl").is_err() {
        println!("== {mode}: no curl, skipping HTTPS");
        return Vec::new();
    }
    let ca = lab.ca_path().display().to_string();
    let resolve = format!("{SITE_NAME}:{HTTPS_PORT}:{VIP}");
    let url = format!("https://{SITE_NAME}/");
    println!("== {mode}: curl --cacert {ca} --resolve {resolve} {url}");
    let mut problems = Vec::new();
    for i in 1..=3 {
        let args = [
            "curl",
            "-sS",
            "--max-time",
            "5",
            "--cacert",
            &ca,
            "--resolve",
            &resolve,
            &url,
        ];
        match lab.exec(&lab.client_ns(), &args) {
            Ok(out) if out.status.success() => {
                println!(
                    "https {i} -> {}",
                    String::from_utf8_lossy(&out.stdout).trim()
                );
            }
            Ok(out) => {
                let why = String::from_utf8_lossy(&out.stderr).trim().to_owned();
                println!("https {i} -> FAILED: {why}");
                problems.push(format!("{mode}: HTTPS request {i} failed: {why}"));
            }
            Err(e) => problems.push(format!("{mode}: running curl: {e:#}")),
        }
    }
    problems
}

/// `requests` new connections from the client to http://VIP/, one
/// request each (stopping early on a signal); the server that answered
/// each, or `None`.
pub(super) fn client_requests(lab: &Lab, requests: u32) -> anyhow::Result<Vec<Option<String>>> {
    client_requests_to(lab, vip_http(), requests)
}

/// [`client_requests`] to `vip` (e.g. the VIP6's).
fn client_requests_to(
    lab: &Lab,
    vip: std::net::SocketAddr,
    requests: u32,
) -> anyhow::Result<Vec<Option<String>>> {
    in_netns(&lab.client_ns(), || {
        (1..=requests)
            .take_while(|_| !netns::interrupted())
            .map(|i| one_request(vip, i))
            .collect()
    })
}

/// One request on a new connection to `vip`; prints its outcome, returns
/// the name of the server that answered.
fn one_request(vip: std::net::SocketAddr, i: u32) -> Option<String> {
    match http_get(vip, "/") {
        Ok(response) if response.status == 200 => {
            let server = response.text();
            println!("request {i:>2} -> {server}");
            Some(server)
        }
        Ok(response) => {
            println!("request {i:>2} -> FAILED: HTTP status {}", response.status);
            None
        }
        Err(e) => {
            println!("request {i:>2} -> FAILED: {e:#}");
            None
        }
    }
}

pub(super) fn summarize(mode: &str, answers: &[Option<String>]) -> Vec<String> {
    let mut problems = Vec::new();
    println!("-- {mode} summary:");
    for web in WEB_NAMES {
        let count = answers.iter().filter(|a| a.as_deref() == Some(web)).count();
        println!("   {web}: {count}");
        if count == 0 {
            problems.push(format!("{mode}: {web} never answered"));
        }
    }
    let failed = answers.iter().filter(|a| a.is_none()).count();
    if failed > 0 {
        println!("   failed: {failed}");
        problems.push(format!(
            "{mode}: {failed} of {} requests failed",
            answers.len()
        ));
    }
    match rotation_start(answers) {
        Some(first) => println!("   exact round robin: yes (starting at {first})"),
        None => println!("   exact round robin: no"),
    }
    problems
}

/// If the answers follow web1→web2→web3→web1... exactly, the first one.
fn rotation_start(answers: &[Option<String>]) -> Option<&'static str> {
    let first = answers.first()?.as_deref()?;
    let start = WEB_NAMES.iter().position(|w| *w == first)?;
    let exact = answers
        .iter()
        .enumerate()
        .all(|(i, a)| a.as_deref() == Some(WEB_NAMES[(start + i) % WEB_NAMES.len()]));
    exact.then_some(WEB_NAMES[start])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answers(names: &[&str]) -> Vec<Option<String>> {
        names
            .iter()
            .map(|n| (!n.is_empty()).then(|| (*n).to_owned()))
            .collect()
    }

    /// What `lb lab up` writes and prints and the demo runs is the whole
    /// site, its weaknesses answered: every service health-checked, the
    /// monitoring listener, a firewall; `lb lab up` adds the database pool
    /// (and the repository's sample config has all of it too).
    #[test]
    fn the_lab_site_config_has_checks_monitoring_and_a_firewall() {
        let sample = include_str!("../../../../config/foobar.toml");
        // The pool reads its password file when parsed.
        let run_dir = std::env::temp_dir().join(format!("lb-site-pool-{}", std::process::id()));
        fs::create_dir_all(&run_dir).expect("run dir");
        let password = super::super::admin_password_file(&run_dir);
        fs::write(&password, "x\n").expect("password file");
        fs::set_permissions(
            &password,
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .expect("chmod");
        let pool = super::super::site_pool_config(&run_dir, Some("5s"));
        let configs = [
            (site_config(Forwarding::Nat), false),
            (site_config(Forwarding::Dsr), false),
            (site_config_v6(Forwarding::Nat), false),
            (site_config_v6(Forwarding::Dsr), false),
            (site_config(Forwarding::Nat) + &pool, true),
            (site_config(Forwarding::Dsr) + &pool, true),
            (site_config(Forwarding::FullNat) + &pool, true),
            (sample.to_owned(), true),
        ];
        for (text, with_pool) in configs {
            let cfg = crate::config::parse(&text, Path::new("lab.toml")).expect("valid");
            assert!(cfg.monitoring.is_some(), "{text}");
            assert!(!cfg.firewall.deny.is_empty(), "{text}");
            assert!(cfg.firewall.rate_limit.is_some(), "{text}");
            // A pool's services are checked by the pool (MySQL checks).
            let pooled = |name: &str| {
                cfg.pools
                    .iter()
                    .any(|p| p.write_service() == name || p.read_service() == name)
            };
            for svc in cfg.services.iter().filter(|s| !pooled(&s.name)) {
                assert!(
                    svc.backends.iter().all(|b| svc.health_for(b).is_some()),
                    "{} has an unchecked backend",
                    svc.name
                );
            }
            let names: Vec<&str> = cfg.services.iter().map(|s| s.name.as_str()).collect();
            for wanted in ["www", "www-udp", "www-tls"] {
                assert!(names.contains(&wanted), "{names:?}");
            }
            assert_eq!(!cfg.pools.is_empty(), with_pool, "{text}");
            // The database only from the web servers.
            let webs: Vec<String> = (1..=3).map(|n| format!("198.19.0.1{n}/32")).collect();
            for p in &cfg.pools {
                for fw in [&p.write_firewall, &p.read_firewall] {
                    let allowed: Vec<String> = fw.allow.iter().map(ToString::to_string).collect();
                    assert_eq!(allowed, webs, "{text}");
                }
            }
        }
        let _ = fs::remove_dir_all(&run_dir);
    }

    #[test]
    fn rotation_is_detected_from_any_start() {
        assert_eq!(
            rotation_start(&answers(&["web1", "web2", "web3", "web1"])),
            Some("web1")
        );
        assert_eq!(
            rotation_start(&answers(&["web2", "web3", "web1"])),
            Some("web2")
        );
        assert_eq!(rotation_start(&answers(&["web1", "web3", "web2"])), None);
        assert_eq!(rotation_start(&answers(&["web1", "", "web3"])), None);
    }

    #[test]
    fn summary_reports_missing_servers_and_failures() {
        let problems = summarize("nat", &answers(&["web1", "web1", ""]));
        assert!(problems.iter().any(|p| p.contains("web2 never answered")));
        assert!(
            problems
                .iter()
                .any(|p| p.contains("1 of 3 requests failed"))
        );
    }
}
