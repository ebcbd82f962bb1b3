//! `lb run`'s life, step by step: claim the host (bpffs, pin directory,
//! control socket, lock), load or adopt the data plane, restore the runtime
//! changes and fill the maps, attach, start the background threads and the
//! listeners, then one event loop until SIGINT/SIGTERM — leaving the pinned
//! data plane forwarding. Also the threads that run beside the loop (flow
//! sweep, neighbour resolution).

use std::{
    collections::BTreeMap,
    path::Path,
    sync::Arc,
    time::{Duration, SystemTime},
};

use anyhow::Context;
use tokio::{
    signal::unix::{Signal, SignalKind, signal},
    sync::mpsc,
    time::{Instant, Interval},
};
use tracing::{error, info, warn};

use super::{
    Agent, LEAST_CONNECTIONS_REFRESH, RunArgs, limits, runtime, slow_start, state::carry_health,
    unix_ms,
};
use crate::{
    announce::Announcer,
    config::{self, Config},
    dataplane::{Dataplane, FlowTable, RingMembers},
    db,
    health::{Health, HealthChecker, Transition},
    host::{self, ControlSocket, PinLock},
    metrics::{self, Monitor, ProbeLatency},
    neighbours::Neighbours,
    server,
};

/// How often neighbour entries of backends are refreshed.
const NEIGHBOUR_REFRESH: Duration = Duration::from_secs(10);
/// How often a failed announcement is retried and BIRD's view refreshed.
const ANNOUNCE_REFRESH: Duration = Duration::from_secs(1);

pub(super) async fn serve(args: RunArgs, cfg: Config) -> anyhow::Result<()> {
    let (mut control_socket, _lock) = claim_host(&args)?;
    let (dp, adopted) = load_dataplane(&cfg, &args.pin_dir)?;
    // At a restart, every backend keeps the place it has in the pinned
    // rings until its probes say otherwise; on a fresh start every checked
    // backend is new and waits for `rise` passed probes.
    let serving = if adopted {
        dp.ring_members().context("reading the adopted rings")?
    } else {
        RingMembers::default()
    };
    let (health_tx, health) = mpsc::unbounded_channel();
    let (db_tx, pools) = mpsc::unbounded_channel();
    let mut agent = Agent::new(&args, cfg.clone(), dp, adopted, health_tx, db_tx)?;
    record_announcement(&cfg, &args.pin_dir)?;
    // The probe latency histograms are fed from the first probe on.
    let probes = ProbeLatency::default();
    if cfg.monitoring.is_some() {
        agent
            .checker
            .observe_probes(metrics::probe_observer(&probes));
    }
    agent.restore(cfg, &serving)?;
    agent.sync_checks();
    agent.attach()?;
    prime_neighbours(&agent.cfg);
    let flow_table = Arc::new(agent.dp.flow_table().context("opening the flow table")?);
    start_threads(&agent.dp)?;
    let calls = start_listeners(&agent, &mut control_socket, &flow_table, probes).await?;
    info!("control socket {}", args.socket.display());
    agent.start_sync().await?;
    let inbox = Inbox {
        health,
        pools,
        calls,
        signals: Signals::new()?,
    };
    agent.run_loop(inbox, &flow_table).await;
    drop(control_socket);
    agent.say_stopping(&args.pin_dir);
    Ok(())
}

/// The host's side, before the data plane is touched: the pins' bpffs and
/// directory, the control socket, and the pin directory's lock — one agent
/// per data plane: a second agent must not adopt the maps or replace the
/// program of a live one. The lock is held while the result lives.
fn claim_host(args: &RunArgs) -> anyhow::Result<(ControlSocket, PinLock)> {
    host::ensure_lasting_bpffs(&args.pin_dir)?;
    host::secure_pin_dir(&args.pin_dir)?;
    let control_socket = ControlSocket::bind(&args.socket)?;
    let lock = PinLock::acquire(
        &args.pin_dir,
        "one agent per data plane. Stop it first, or give this one its own --pin-dir \
         (and interfaces)",
    )?;
    Ok((control_socket, lock))
}

/// Loads the data plane, or adopts the one pinned under `pin_dir` (true).
fn load_dataplane(cfg: &Config, pin_dir: &Path) -> anyhow::Result<(Dataplane, bool)> {
    let (dp, adopted) = Dataplane::load_pinned(&cfg.dataplane, pin_dir).with_context(|| {
        format!(
            "loading the data plane (pinned under {})",
            pin_dir.display()
        )
    })?;
    if adopted {
        info!(
            "adopting the data plane pinned under {} (flows, rings, counters)",
            pin_dir.display()
        );
    }
    Ok((dp, adopted))
}

/// What `lb teardown` (even without --config) needs to withdraw the VIPs
/// once this agent is gone.
fn record_announcement(cfg: &Config, pin_dir: &Path) -> anyhow::Result<()> {
    if let Some(a) = &cfg.announce {
        crate::announce::Record::of(a)
            .write(Path::new(crate::announce::RECORDS_DIR), pin_dir)
            .context("recording the announcement for `lb teardown`")?;
    }
    Ok(())
}

/// The sweep and the neighbour resolver, each on a thread of its own.
fn start_threads(dp: &Dataplane) -> anyhow::Result<()> {
    let sweeper = dp
        .sweeper()
        .context("opening the flow tables for the sweep")?;
    std::thread::Builder::new()
        .name("lb-sweep".into())
        .spawn(move || sweep_forever(sweeper))
        .context("starting the flow sweep")?;
    let requests = dp
        .neighbour_requests()
        .context("opening the data plane's neighbour requests")?;
    std::thread::Builder::new()
        .name("lb-neighbours".into())
        .spawn(move || resolve_forever(requests))
        .context("starting the neighbour resolver")?;
    Ok(())
}

/// The monitoring listener (with `[monitoring]`) and the control server;
/// both hand their requests to the loop through the returned channel.
async fn start_listeners(
    agent: &Agent,
    control_socket: &mut ControlSocket,
    flow_table: &Arc<FlowTable>,
    probes: ProbeLatency,
) -> anyhow::Result<mpsc::Receiver<server::Call>> {
    let (calls_tx, calls) = mpsc::channel(server::MAX_CLIENTS);
    let listener = control_socket.listener()?;
    if let Some(monitoring) = &agent.cfg.monitoring {
        let address = monitoring.listen;
        let http = metrics::bind(address).await?;
        let monitor = Monitor::new(calls_tx.clone(), Arc::clone(flow_table), probes);
        tokio::spawn(metrics::serve(http, monitor));
        info!("monitoring on http://{address}/ (status page; /metrics, /status.json)");
    }
    tokio::spawn(server::accept(listener, calls_tx, Arc::clone(flow_table)));
    Ok(calls)
}

/// What the loop waits on besides its timers.
struct Inbox {
    health: mpsc::UnboundedReceiver<Transition>,
    pools: mpsc::UnboundedReceiver<db::Event>,
    calls: mpsc::Receiver<server::Call>,
    signals: Signals,
}

/// SIGINT and SIGTERM stop the agent, SIGHUP reloads.
struct Signals {
    interrupt: Signal,
    terminate: Signal,
    hangup: Signal,
}

impl Signals {
    /// Installed before the ready line: a SIGTERM right after it must stop
    /// the agent cleanly, not kill it with the default action.
    fn new() -> anyhow::Result<Signals> {
        Ok(Signals {
            interrupt: signal(SignalKind::interrupt()).context("SIGINT handler")?,
            terminate: signal(SignalKind::terminate()).context("SIGTERM handler")?,
            hangup: signal(SignalKind::hangup()).context("SIGHUP handler")?,
        })
    }
}

/// The loop's periodic work.
struct Timers {
    neighbours: Interval,
    announce: Interval,
    /// Least connections: the rings follow the active flow counts.
    least_connections: Interval,
    connection_limits: Interval,
    ramp: Interval,
}

impl Timers {
    fn new() -> Timers {
        Timers {
            neighbours: tokio::time::interval(NEIGHBOUR_REFRESH),
            announce: tokio::time::interval(ANNOUNCE_REFRESH),
            least_connections: tokio::time::interval(LEAST_CONNECTIONS_REFRESH),
            connection_limits: tokio::time::interval(limits::LIMITS_REFRESH),
            ramp: tokio::time::interval(slow_start::RAMP_REFRESH),
        }
    }
}

impl Agent {
    /// The agent's state at start, before the first commit.
    fn new(
        args: &RunArgs,
        cfg: Config,
        dp: Dataplane,
        adopted: bool,
        health_tx: mpsc::UnboundedSender<Transition>,
        db_tx: mpsc::UnboundedSender<db::Event>,
    ) -> anyhow::Result<Agent> {
        Ok(Agent {
            path: args.config.clone(),
            cfg: cfg.clone(),
            dp,
            adopted,
            admin: BTreeMap::new(),
            health: BTreeMap::new(),
            checker: HealthChecker::new(health_tx),
            db: db::Pools::new(db_tx),
            applied: Vec::new(),
            generation: 1,
            started_at_ms: unix_ms(SystemTime::now()),
            last_reload: None,
            announcer: cfg
                .announce
                .clone()
                .map(Announcer::new)
                .transpose()
                .context("reading the announcement's include file")?,
            file_cfg: cfg,
            state_path: args
                .state
                .clone()
                .unwrap_or_else(|| runtime::default_path(&args.config)),
            runtime_error: None,
            at_limit: limits::AtLimit::new(),
            slow_start: slow_start::SlowStart::default(),
            ramps: BTreeMap::new(),
            sync: None,
        })
    }

    /// The first commit: the runtime changes of earlier agents over the
    /// config; if they cannot be applied, the config alone. Backends in
    /// the adopted rings (`serving`) start up, other checked ones pending.
    /// One line per service: what it is and who takes its flows.
    fn restore(&mut self, cfg: Config, serving: &RingMembers) -> anyhow::Result<()> {
        let serving_health = |svc: &config::Service, b: &config::Backend| {
            if serving.serves(svc, b) {
                Health::Up
            } else {
                Health::Pending
            }
        };
        let merged = self.read_runtime_state(&cfg);
        self.health = carry_health(&merged.config, &BTreeMap::new(), &serving_health);
        self.admin = merged.admin;
        match self.commit(merged.config) {
            Ok(lines) => {
                for line in lines {
                    info!("{line}");
                }
                self.save_runtime_state();
            }
            Err(e) => {
                error!(
                    "the runtime changes of {} cannot be applied ({e:#}); serving the config without them",
                    self.state_path.display()
                );
                self.runtime_error = Some(format!("not applied: {e:#}"));
                self.admin = BTreeMap::new();
                self.health = carry_health(&cfg, &BTreeMap::new(), &serving_health);
                for line in self.commit(cfg).context("filling the maps")? {
                    info!("{line}");
                }
            }
        }
        Ok(())
    }

    /// `[sync]`: the sync thread, and its bulk copy of the peers' flows
    /// before the loop can say `lb: ready` (at most `bulk-timeout`: then
    /// the agent goes on without them, as the thread's WARN says). Without
    /// `[sync]`, the data plane's flow events are switched off.
    async fn start_sync(&mut self) -> anyhow::Result<()> {
        let mut maps = crate::sync::SyncMaps::of(&self.dp).context("opening the sync maps")?;
        let Some(cfg) = self.cfg.sync.clone() else {
            return maps.switch(false).context("switching flow events off");
        };
        let (stats, bulk) = crate::sync::start(&cfg, maps)?;
        self.sync = Some(stats);
        // The thread resolves it by the deadline; the slack covers a thread
        // that died.
        let wait = cfg.bulk_timeout + Duration::from_secs(1);
        let _ = tokio::time::timeout(wait, bulk.0).await;
        Ok(())
    }

    /// XDP on every configured interface (in place of an adopted program).
    fn attach(&mut self) -> anyhow::Result<()> {
        for iface in self.cfg.dataplane.interfaces.clone() {
            let mode = self.cfg.dataplane.xdp_mode;
            self.dp
                .attach(&iface, mode)
                .with_context(|| format!("attaching XDP ({mode} mode) to {iface}"))?;
            info!(
                "attached lb to {iface} ({mode} mode{})",
                if self.adopted {
                    ", replacing the previous program in place"
                } else {
                    ""
                }
            );
        }
        Ok(())
    }

    /// Every event and timer, one at a time, until SIGINT or SIGTERM. Says
    /// `lb: ready` (the line scripts and the lab wait for) once no backend
    /// is waiting for its first verdict, or after the longest first verdict
    /// can take: then the rings say what the probes found; from then on
    /// the announcement follows the rings.
    async fn run_loop(&mut self, mut inbox: Inbox, flow_table: &FlowTable) {
        let ready_by = ready_by(&self.cfg, Instant::now());
        let mut ready = false;
        let mut announcing = false;
        let mut timers = Timers::new();
        loop {
            if !ready && !self.awaiting_first_verdict() {
                ready = announce_ready(self);
            }
            if ready && !announcing {
                self.start_announcing();
                announcing = true;
            }
            tokio::select! {
                _ = inbox.signals.interrupt.recv() => break,
                _ = inbox.signals.terminate.recv() => break,
                _ = inbox.signals.hangup.recv() => {
                    if let Err(e) = self.reload_recorded() {
                        error!("reload rejected, running config unchanged: {e:#}");
                    }
                }
                Some(t) = inbox.health.recv() => self.health_transition(t),
                Some(event) = inbox.pools.recv() => self.db_event(event),
                Some(call) = inbox.calls.recv() => {
                    let reply = self.handle(call.request);
                    // A client that went away only loses its answer.
                    let _ = call.reply.send(reply);
                }
                _ = tokio::time::sleep_until(ready_by), if !ready => {
                    ready = announce_ready(self);
                }
                _ = timers.neighbours.tick() => prime_neighbours(&self.cfg),
                _ = timers.announce.tick(), if self.announcer.is_some() => {
                    if let Some(a) = &mut self.announcer {
                        a.tick();
                    }
                }
                _ = timers.least_connections.tick(), if self.uses_least_connections() => {
                    self.refresh_least_connections(flow_table);
                }
                _ = timers.connection_limits.tick(), if self.has_limits() => {
                    self.refresh_limits(flow_table);
                }
                _ = timers.ramp.tick(), if self.slow_start.ramping() => self.refresh_ramp(),
            }
        }
    }

    /// The last line: what stays behind, and how to remove it.
    fn say_stopping(&self, pin_dir: &Path) {
        info!(
            "agent stopping; the data plane stays attached to {} through the pins under {} \
             (on a bpffs of the host's mount namespace, checked at start): \
             a new `lb run` adopts it, `lb teardown` removes it{}",
            self.cfg.dataplane.interfaces.join(", "),
            pin_dir.display(),
            if self.announcer.is_some() {
                "; the VIPs stay announced as they are (`lb teardown` withdraws them)"
            } else {
                ""
            }
        );
    }
}

/// Slack after the longest first verdict before `lb: ready` anyway.
const READY_SLACK: Duration = Duration::from_millis(500);
/// The latest `lb: ready` can come, however long the checks are.
const READY_AT_MOST: Duration = Duration::from_secs(24 * 3600);

/// When to say `lb: ready` at the latest: once the longest first verdict
/// ([`Config::first_verdict_bound`]) can have come, plus some slack, but
/// never later than [`READY_AT_MOST`] (the config's limits keep it far
/// below; the clamp keeps a hand-built config from overflowing the clock).
pub fn ready_by(cfg: &Config, now: Instant) -> Instant {
    let wait = cfg
        .first_verdict_bound()
        .saturating_add(READY_SLACK)
        .min(READY_AT_MOST);
    now.checked_add(wait).unwrap_or(now)
}

fn announce_ready(agent: &Agent) -> bool {
    let pending: Vec<String> = agent
        .health
        .iter()
        .filter(|(_, h)| **h == Health::Pending)
        .map(|(t, _)| format!("{}/{}", t.service, t.address))
        .collect();
    if !pending.is_empty() {
        warn!(
            "no health verdict yet for {}: out of rotation until they pass their checks",
            pending.join(", ")
        );
    }
    println!("lb: ready");
    true
}

/// How often the agent sweeps expired flows out of the tables (the data
/// plane removes those a packet finds; this catches the rest).
const SWEEP_INTERVAL: Duration = Duration::from_secs(5);

/// The sweep, on a thread of its own: it walks whole tables, and must
/// neither stall the loop nor be stalled by it.
fn sweep_forever(mut sweeper: crate::dataplane::Sweeper) {
    loop {
        std::thread::sleep(SWEEP_INTERVAL);
        match sweeper.sweep(crate::dataplane::sweep::now_ticks()) {
            Ok(r) if r.removed > 0 || r.claims > 0 => {
                tracing::debug!(
                    removed = r.removed,
                    claims = r.claims,
                    "swept expired flows and full NAT's stale claims"
                );
            }
            Ok(_) => {}
            Err(e) => warn!("sweeping expired flows: {e}"),
        }
    }
}

/// Has the kernel resolve (and keep fresh) each backend's neighbour entry
/// (`neighbours`: a netlink request, no packet to the backend): DSR needs
/// the backend's MAC in the neighbour table before the first packet, and
/// NAT saves a kernel detour.
fn prime_neighbours(cfg: &Config) {
    let mut neighbours = match Neighbours::new() {
        Ok(n) => n,
        Err(e) => {
            warn!("neighbour priming: netlink socket: {e}");
            return;
        }
    };
    let mut seen = std::collections::BTreeSet::new();
    for b in cfg.services.iter().flat_map(|s| &s.backends) {
        // Either family: IPv6's next hops come from `bpf_fib_lookup` with
        // AF_INET6, from the same neighbour table.
        let addr = b.address.ip();
        if seen.insert(addr)
            && let Err(e) = neighbours.resolve_route(addr)
        {
            tracing::debug!("neighbour priming: backend {addr}: {e}");
        }
    }
}

/// How often the resolver drains the data plane's neighbour requests: well
/// within a backend's first retransmission (200 ms at the least).
const NEIGHBOUR_POLL: Duration = Duration::from_millis(100);
/// Most next hops the resolver asks the kernel for per poll (320 a second):
/// a flood of spoofed sources on a connected network makes replies (SYN-ACKs)
/// to addresses nobody answers ARP for; each request costs the kernel an
/// entry and ARP probes, so they are bounded, and the rest are dropped
/// (a real client's next reply reports it again).
const NEIGHBOURS_PER_POLL: usize = 32;

/// The resolver, on a thread of its own: every next hop the data plane
/// reported without a neighbour entry (a NAT reply's client whose entry
/// expired, a backend not primed yet), IPv4's and IPv6's, is resolved by
/// the kernel (ARP, or neighbour discovery).
fn resolve_forever(mut requests: crate::dataplane::NeighbourRequests) {
    let mut neighbours = None;
    loop {
        std::thread::sleep(NEIGHBOUR_POLL);
        let mut wanted = requests.drain();
        if wanted.is_empty() {
            continue;
        }
        if wanted.len() > NEIGHBOURS_PER_POLL {
            tracing::debug!(
                "{} next hops without a neighbour entry; resolving {NEIGHBOURS_PER_POLL}",
                wanted.len()
            );
            wanted.truncate(NEIGHBOURS_PER_POLL);
        }
        if neighbours.is_none() {
            neighbours = Neighbours::new()
                .map_err(|e| warn!("neighbour requests: netlink socket: {e}"))
                .ok();
        }
        let Some(n) = neighbours.as_mut() else {
            continue;
        };
        for (ifindex, addr) in wanted {
            match n.resolve(ifindex, addr) {
                Ok(()) => tracing::debug!("resolving neighbour {addr} (if {ifindex})"),
                Err(e) => warn!("resolving neighbour {addr} (if {ifindex}): {e}"),
            }
        }
    }
}
