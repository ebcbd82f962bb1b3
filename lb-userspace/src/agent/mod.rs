//! `lb run`: the agent. Validates the config, loads (or adopts) the pinned
//! data plane, attaches it, runs health checks, serves the control socket,
//! reloads on SIGHUP, and on SIGINT/SIGTERM exits leaving the pinned data
//! plane forwarding (a restart adopts it; `lb teardown` removes it).
//!
//! Every change — reload, `lb backend …`, a health transition — goes through
//! [`Agent::commit`]: the whole new state is checked first, then written to
//! the maps with the double-buffered ring switch, or rejected with nothing
//! changed.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

mod limits;
mod runtime;
mod slow_start;
mod state;

use anyhow::{Context, bail};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
    time::Instant,
};
use tracing::{debug, error, info, warn};

use state::{Admin, Key, admission, carry_health};

use crate::{
    announce::{Announcer, ServiceReach},
    config::{self, Config},
    control::{
        self, BackendChange, BackendStatus, FirewallChange, Request, Response, ServiceStatus,
        Status, VipChange,
    },
    dataplane::{AppliedService, Dataplane},
    explain::{self, BackendView, FlowQuery, ServiceView},
    health::{Health, HealthChecker, Target, Transition},
    host::{self, ControlSocket, PinLock},
    metrics::{self, Monitor, ProbeLatency},
    neighbours::Neighbours,
    server,
};

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// The TOML config (see config/foobar.toml)
    #[arg(long, short)]
    pub config: PathBuf,
    /// Control socket for `lb status`, `lb backend`, `lb reload`
    #[arg(long, default_value = control::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// bpffs directory where maps and XDP links are pinned, so the data plane
    /// keeps forwarding when the agent stops and a new agent adopts it
    #[arg(long, default_value = DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// Run in this network namespace (/run/netns/NAME) while staying in the
    /// host's mount namespace, so the pins outlive the agent. Use it instead
    /// of `ip netns exec`, whose private /sys takes the pins away.
    #[arg(long, value_name = "NAME")]
    pub netns: Option<String>,
    /// Where `lb backend …` and `lb firewall …` changes are kept so they
    /// survive restarts and reloads [default: beside the config,
    /// NAME.state.toml for NAME.toml]
    #[arg(long, value_name = "FILE")]
    pub state: Option<PathBuf>,
}

pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/lb";

/// How often neighbour entries of backends are refreshed.
const NEIGHBOUR_REFRESH: Duration = Duration::from_secs(10);
/// How often a failed announcement is retried and BIRD's view refreshed.
const ANNOUNCE_REFRESH: Duration = Duration::from_secs(1);

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    let cfg = config::load(&args.config)?;
    // Before the runtime exists: every thread it starts inherits the
    // namespace of the thread that creates it.
    if let Some(name) = &args.netns {
        host::enter_netns(name)?;
    }
    // Before the runtime: the checks run one of their own (netlink).
    crate::doctor::check_at_start(&cfg, &args.pin_dir)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve(args, cfg))
}

struct Agent {
    path: PathBuf,
    cfg: Config,
    dp: Dataplane,
    adopted: bool,
    admin: BTreeMap<Key, Admin>,
    /// Health of every checked backend, keyed like the checks (service,
    /// address). The one source of truth: rings are derived from it.
    health: BTreeMap<Target, Health>,
    checker: HealthChecker,
    /// Database pools: their members' roles decide their services' rings.
    db: crate::db::Pools,
    applied: Vec<AppliedService>,
    /// 1 at start, one more for every applied reload or live change.
    generation: u64,
    started_at_ms: u64,
    last_reload: Option<control::ReloadStatus>,
    /// `[announce]`: the VIPs' BGP announcement through BIRD.
    announcer: Option<Announcer>,
    /// The config file as last loaded (start, reload): runtime changes are
    /// kept as the difference between it and what runs.
    file_cfg: Config,
    /// The state file runtime changes are written to.
    state_path: PathBuf,
    /// The last failure to read or write the state file, if any.
    runtime_error: Option<String>,
    /// Backends at their `max-connections`: out of the ring for new flows.
    at_limit: limits::AtLimit,
    /// `slow-start`: which backends ramp their weight, since when.
    slow_start: slow_start::SlowStart,
    /// The ramping backends' effective weights at the last commit.
    ramps: BTreeMap<Key, slow_start::Ramp>,
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

async fn serve(args: RunArgs, cfg: Config) -> anyhow::Result<()> {
    host::ensure_lasting_bpffs(&args.pin_dir)?;
    host::secure_pin_dir(&args.pin_dir)?;
    let mut control_socket = ControlSocket::bind(&args.socket)?;
    // One agent per pin dir, decided before the data plane is touched: a
    // second agent must not adopt the maps or replace the program of a live
    // one.
    let _lock = PinLock::acquire(
        &args.pin_dir,
        "one agent per data plane. Stop it first, or give this one its own --pin-dir \
         (and interfaces)",
    )?;
    let (dp, adopted) =
        Dataplane::load_pinned(&cfg.dataplane, &args.pin_dir).with_context(|| {
            format!(
                "loading the data plane (pinned under {})",
                args.pin_dir.display()
            )
        })?;
    if adopted {
        info!(
            "adopting the data plane pinned under {} (flows, rings, counters)",
            args.pin_dir.display()
        );
    }
    // At a restart, every backend keeps the place it has in the pinned
    // rings until its probes say otherwise; on a fresh start every checked
    // backend is new and waits for `rise` passed probes.
    let serving = if adopted {
        dp.ring_members().context("reading the adopted rings")?
    } else {
        BTreeSet::new()
    };
    let (health_tx, mut health_rx) = mpsc::unbounded_channel();
    let (db_tx, mut db_rx) = mpsc::unbounded_channel();
    let mut agent = Agent {
        path: args.config.clone(),
        cfg: cfg.clone(),
        dp,
        adopted,
        admin: BTreeMap::new(),
        health: BTreeMap::new(),
        checker: HealthChecker::new(health_tx),
        db: crate::db::Pools::new(db_tx),
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
        file_cfg: cfg.clone(),
        state_path: args
            .state
            .clone()
            .unwrap_or_else(|| runtime::default_path(&args.config)),
        runtime_error: None,
        at_limit: limits::AtLimit::new(),
        slow_start: slow_start::SlowStart::default(),
        ramps: BTreeMap::new(),
    };
    // What `lb teardown` (even without --config) needs to withdraw the
    // VIPs once this agent is gone.
    if let Some(a) = &cfg.announce {
        crate::announce::Record::of(a)
            .write(
                std::path::Path::new(crate::announce::RECORDS_DIR),
                &args.pin_dir,
            )
            .context("recording the announcement for `lb teardown`")?;
    }
    // The probe latency histograms are fed from the first probe on.
    let probes = ProbeLatency::default();
    if cfg.monitoring.is_some() {
        agent
            .checker
            .observe_probes(metrics::probe_observer(&probes));
    }
    let serving_health = |svc: &config::Service, b: &config::Backend| {
        if serving.contains(&(dataplane_service_key(svc), b.address)) {
            Health::Up
        } else {
            Health::Pending
        }
    };
    // The runtime changes of earlier agents over the config; if they
    // cannot be applied, the config alone. One line per service at start:
    // what it is and who takes its flows.
    let merged = agent.read_runtime_state(&cfg);
    agent.health = carry_health(&merged.config, &BTreeMap::new(), &serving_health);
    agent.admin = merged.admin;
    match agent.commit(merged.config) {
        Ok(lines) => {
            for line in lines {
                info!("{line}");
            }
            agent.save_runtime_state();
        }
        Err(e) => {
            error!(
                "the runtime changes of {} cannot be applied ({e:#}); serving the config without them",
                agent.state_path.display()
            );
            agent.runtime_error = Some(format!("not applied: {e:#}"));
            agent.admin = BTreeMap::new();
            agent.health = carry_health(&cfg, &BTreeMap::new(), &serving_health);
            for line in agent.commit(cfg).context("filling the maps")? {
                info!("{line}");
            }
        }
    }
    agent.sync_checks();
    for iface in agent.cfg.dataplane.interfaces.clone() {
        let mode = agent.cfg.dataplane.xdp_mode;
        agent
            .dp
            .attach(&iface, mode)
            .with_context(|| format!("attaching XDP ({mode} mode) to {iface}"))?;
        info!(
            "attached lb to {iface} ({mode} mode{})",
            if adopted {
                ", replacing the previous program in place"
            } else {
                ""
            }
        );
    }
    prime_neighbours(&agent.cfg);
    let flow_table = Arc::new(agent.dp.flow_table().context("opening the flow table")?);
    let sweeper = agent
        .dp
        .sweeper()
        .context("opening the flow tables for the sweep")?;
    std::thread::Builder::new()
        .name("lb-sweep".into())
        .spawn(move || sweep_forever(sweeper))
        .context("starting the flow sweep")?;
    let requests = agent
        .dp
        .neighbour_requests()
        .context("opening the data plane's neighbour requests")?;
    std::thread::Builder::new()
        .name("lb-neighbours".into())
        .spawn(move || resolve_forever(requests))
        .context("starting the neighbour resolver")?;
    let (calls_tx, mut calls) = mpsc::channel(server::MAX_CLIENTS);
    let listener = control_socket.listener()?;
    if let Some(monitoring) = &agent.cfg.monitoring {
        let address = std::net::SocketAddr::V4(monitoring.listen);
        let http = metrics::bind(address).await?;
        let monitor = Monitor::new(calls_tx.clone(), Arc::clone(&flow_table), probes);
        tokio::spawn(metrics::serve(http, monitor));
        info!("monitoring on http://{address}/ (status page; /metrics, /status.json)");
    }
    tokio::spawn(server::accept(listener, calls_tx, Arc::clone(&flow_table)));
    info!("control socket {}", args.socket.display());
    // Handlers before the ready line: a SIGTERM right after it must stop the
    // agent cleanly, not kill it with the default action.
    let mut sigint = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
    // `lb: ready` (the line scripts and the lab wait for) once no backend
    // is waiting for its first verdict, or after the longest first verdict
    // can take: then the rings say what the probes found.
    let ready_by = ready_by(&agent.cfg, Instant::now());
    let mut ready = false;
    let mut announcing = false;
    let mut refresh = tokio::time::interval(NEIGHBOUR_REFRESH);
    let mut announce_refresh = tokio::time::interval(ANNOUNCE_REFRESH);
    // Least connections: the rings follow the active flow counts.
    let mut least_connections = tokio::time::interval(LEAST_CONNECTIONS_REFRESH);
    let mut connection_limits = tokio::time::interval(limits::LIMITS_REFRESH);
    let mut ramp = tokio::time::interval(slow_start::RAMP_REFRESH);
    loop {
        if !ready && !agent.awaiting_first_verdict() {
            ready = announce_ready(&agent);
        }
        if ready && !announcing {
            agent.start_announcing();
            announcing = true;
        }
        tokio::select! {
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = sighup.recv() => {
                if let Err(e) = agent.reload_recorded() {
                    error!("reload rejected, running config unchanged: {e:#}");
                }
            }
            Some(t) = health_rx.recv() => agent.health_transition(t),
            Some(event) = db_rx.recv() => agent.db_event(event),
            Some(call) = calls.recv() => {
                let reply = agent.handle(call.request);
                // A client that went away only loses its answer.
                let _ = call.reply.send(reply);
            }
            _ = tokio::time::sleep_until(ready_by), if !ready => {
                ready = announce_ready(&agent);
            }
            _ = refresh.tick() => prime_neighbours(&agent.cfg),
            _ = announce_refresh.tick(), if agent.announcer.is_some() => {
                if let Some(a) = &mut agent.announcer {
                    a.tick();
                }
            }
            _ = least_connections.tick(), if agent.uses_least_connections() => {
                agent.refresh_least_connections(&flow_table);
            }
            _ = connection_limits.tick(), if agent.has_limits() => {
                agent.refresh_limits(&flow_table);
            }
            _ = ramp.tick(), if agent.slow_start.ramping() => agent.refresh_ramp(),
        }
    }
    drop(control_socket);
    info!(
        "agent stopping; the data plane stays attached to {} through the pins under {} \
         (on a bpffs of the host's mount namespace, checked at start): \
         a new `lb run` adopts it, `lb teardown` removes it{}",
        agent.cfg.dataplane.interfaces.join(", "),
        args.pin_dir.display(),
        if agent.announcer.is_some() {
            "; the VIPs stay announced as they are (`lb teardown` withdraws them)"
        } else {
            ""
        }
    );
    Ok(())
}

/// How often least-connections rings follow the active flow counts.
const LEAST_CONNECTIONS_REFRESH: Duration = Duration::from_secs(1);

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

/// The (VIP, port, protocol) key of a service as the data plane stores it.
fn dataplane_service_key(svc: &config::Service) -> lb_common::ServiceKey {
    let (vip, port) = crate::dataplane::raw_endpoint(svc.vip);
    lb_common::ServiceKey {
        vip,
        port,
        protocol: crate::dataplane::protocol_number(svc.protocol),
        _pad: 0,
    }
}

impl Agent {
    fn target(svc: &config::Service, b: &config::Backend) -> Target {
        Target {
            service: svc.name.clone(),
            address: b.address,
        }
    }

    /// Checks `next` whole, then writes it to the data plane atomically,
    /// with every ring derived from the admin and health state.
    /// Rebuilds the least-connections rings from each member's active
    /// flows (exact counts, one lookup per backend: cheap on the loop).
    fn refresh_least_connections(&mut self, flows: &crate::dataplane::FlowTable) {
        let mut active = vec![0u64; lb_common::MAX_BACKENDS as usize];
        for id in self.dp.least_connections_members() {
            match flows.active(id) {
                Ok(n) => active[id as usize] = n,
                Err(e) => {
                    error!("least connections: reading active flows: {e:#}");
                    return;
                }
            }
        }
        if let Err(e) = self.dp.refresh_least_connections(active) {
            error!("least connections: rebuilding the rings: {e:#}");
        }
    }

    fn uses_least_connections(&self) -> bool {
        self.cfg
            .services
            .iter()
            .any(|s| s.scheduler == config::Scheduler::LeastConnections)
    }

    /// Returns one line per service whose ring changed (every service at
    /// the first commit), for the caller to log as part of its event.
    fn commit(&mut self, next: Config) -> anyhow::Result<Vec<String>> {
        // Pools first: their services' members are admitted by role, and a
        // pool not yet known would leave them unchecked (all serving).
        self.db.sync(&next);
        let (admin, health, db) = (&self.admin, &self.health, &self.db);
        let at_limit = &self.at_limit;
        let admitted = |svc: &config::Service, b: &config::Backend| {
            admission(
                admin
                    .get(&state::key(&svc.name, &b.name))
                    .copied()
                    .unwrap_or(Admin::Enabled),
                // A pool's services admit members by role.
                db.health(&svc.name, &b.name)
                    .or_else(|| health.get(&Agent::target(svc, b)).copied()),
                svc.on_backend_down,
            )
        };
        let admit = |svc: &config::Service, b: &config::Backend| {
            let full = at_limit.contains_key(&state::key(&svc.name, &b.name));
            limits::limited(admitted(svc, b), full)
        };
        // Slow start: backends that came into rotation ramp their weight.
        let now = std::time::Instant::now();
        let mut ramping = self.slow_start.clone();
        ramping.observe(
            &next,
            &|svc, b| admitted(svc, b).in_rotation,
            now,
            self.applied.is_empty(),
        );
        let (effective, ramps) = ramping.effective(&next, now);
        let applied = self.dp.apply_with(&effective, &admit)?;
        let changed = ring_changes(&self.cfg, &self.applied, &next, &applied);
        self.slow_start = ramping;
        self.ramps = ramps;
        self.cfg = next;
        self.applied = applied;
        let reach = self.service_reach();
        if let Some(a) = &mut self.announcer {
            a.update(&reach);
        }
        Ok(changed)
    }

    /// Slow start: the rings follow the ramps' effective weights (and a
    /// finished ramp gives the backend its full weight).
    fn refresh_ramp(&mut self) {
        let (_, ramps) = self
            .slow_start
            .effective(&self.cfg, std::time::Instant::now());
        let weights = |r: &BTreeMap<Key, slow_start::Ramp>| {
            r.iter()
                .map(|(k, r)| (k.clone(), r.weight))
                .collect::<Vec<_>>()
        };
        if weights(&ramps) != weights(&self.ramps) {
            let cfg = self.cfg.clone();
            if let Err(e) = self.commit(cfg) {
                warn!("slow start: applying the ramped weights: {e:#}");
            }
        }
    }

    /// From the ready line on, the VIPs' announcement follows the rings.
    /// Until then a restarted agent leaves the previous announcement as it
    /// was, over a data plane that kept forwarding; a fresh one announces
    /// nothing before the first health verdicts are in (another LB with
    /// the same config must find the same rings).
    fn start_announcing(&mut self) {
        let reach = self.service_reach();
        if let Some(a) = &mut self.announcer {
            a.set_attached(&reach);
            a.tick();
        }
    }

    /// Each service's VIP and whether its ring has a backend: what the
    /// announcement depends on.
    fn service_reach(&self) -> Vec<ServiceReach> {
        self.cfg
            .services
            .iter()
            .zip(&self.applied)
            .map(|(svc, applied)| ServiceReach {
                vip: *svc.vip.ip(),
                has_backend: !applied.ring.is_empty(),
            })
            .collect()
    }

    /// `lb vip withdraw|announce [VIP]`.
    fn change_vip(&mut self, change: VipChange) -> anyhow::Result<String> {
        let reach = self.service_reach();
        let Some(a) = &mut self.announcer else {
            bail!("this agent announces nothing: its config has no [announce] section");
        };
        Ok(a.change(&change, &reach)?)
    }

    /// A config change with health carried over: backends that still exist
    /// keep their state, new checked ones start pending. Admin state and
    /// health change only if the commit succeeds.
    fn commit_change(&mut self, next: Config, admin: BTreeMap<Key, Admin>) -> anyhow::Result<()> {
        let health = carry_health(&next, &self.health, &|_, _| Health::Pending);
        let previous_admin = std::mem::replace(&mut self.admin, admin);
        let previous_health = std::mem::replace(&mut self.health, health);
        match self.commit(next) {
            Ok(changed) => {
                for line in changed {
                    info!("{line}");
                }
            }
            Err(e) => {
                self.admin = previous_admin;
                self.health = previous_health;
                self.db.sync(&self.cfg);
                return Err(e);
            }
        }
        self.sync_checks();
        self.generation += 1;
        Ok(())
    }

    /// Checks follow the config: unchanged ones keep running, new and
    /// changed ones start from the agent's state for their target.
    fn sync_checks(&mut self) {
        let health = &self.health;
        self.checker.sync(&self.cfg, &|t| {
            health.get(t).copied().unwrap_or(Health::Pending)
        });
        self.db.sync(&self.cfg);
    }

    /// A pool's probe, promotion or fencing finished: routing follows.
    fn db_event(&mut self, event: crate::db::Event) {
        let handled = self.db.handle(event);
        if handled.commit {
            let cfg = self.cfg.clone();
            match self.commit(cfg) {
                // The pool logged the routing change (its event).
                Ok(changed) => {
                    for line in changed {
                        debug!("{line}");
                    }
                }
                Err(e) => error!("applying the database routing change failed: {e:#}"),
            }
        }
        if let Some((reply, response)) = handled.reply {
            let _ = reply.send(response);
        }
    }

    fn awaiting_first_verdict(&self) -> bool {
        self.health.values().any(|h| *h == Health::Pending) || self.db.awaiting_first_verdict()
    }

    /// [`reload`](Self::reload), its outcome kept for the status.
    fn reload_recorded(&mut self) -> anyhow::Result<()> {
        let result = self.reload();
        self.last_reload = Some(control::ReloadStatus {
            ok: result.is_ok(),
            at_ms: unix_ms(SystemTime::now()),
            message: match &result {
                Ok(()) => format!("reloaded {}", self.path.display()),
                Err(e) => format!("{e:#}"),
            },
        });
        result
    }

    fn reload(&mut self) -> anyhow::Result<()> {
        let new = config::load(&self.path)?;
        if new.dataplane.needs_restart_from(&self.cfg.dataplane) {
            bail!(
                "[dataplane] changed (interfaces, modes, sizes): that needs a restart of `lb run`"
            );
        }
        if new.announce != self.cfg.announce {
            bail!(
                "[announce] changed (BIRD's socket, the include file, the MED): that needs a restart of `lb run`"
            );
        }
        // Timeouts and the budget are live: `apply` writes them first.
        if new.monitoring != self.cfg.monitoring {
            bail!(
                "[monitoring] changed (the HTTP listener's address): that needs a restart of `lb run`"
            );
        }
        for warning in crate::db::vet_new_logins(&self.cfg.pools, &new.pools, &self.path)? {
            warn!("{warning}");
        }
        // The runtime changes stay over the new file, by the merge rule.
        self.commit_runtime(&new, &self.runtime_state())?;
        self.file_cfg = new;
        self.save_runtime_state();
        info!("reloaded {}", self.path.display());
        Ok(())
    }

    fn health_transition(&mut self, t: Transition) {
        if !self.checker.is_current(&t) {
            // From a check that a config change replaced.
            return;
        }
        if self.health.get(&t.target) == Some(&t.health) {
            return;
        }
        let previous = self.health.insert(t.target.clone(), t.health);
        let cfg = self.cfg.clone();
        let rings = match self.commit(cfg) {
            Ok(changed) => changed,
            Err(e) => {
                error!("applying the health change failed: {e:#}");
                // The maps are as they were: so is the state they reflect, and
                // the status keeps telling the truth.
                match previous {
                    Some(h) => self.health.insert(t.target.clone(), h),
                    None => self.health.remove(&t.target),
                };
                Vec::new()
            }
        };
        // One line per transition, with the rings it changed; a backend
        // coming up is good news (info), going down is a warning.
        let line = format!(
            "backend {}/{} ({}) is {}: {}{}",
            t.target.service,
            t.backend,
            t.target.address,
            t.health.name().to_uppercase(),
            t.reason,
            rings.iter().map(|r| format!("; {r}")).collect::<String>()
        );
        let (service, backend, address, health, reason) = (
            &t.target.service,
            &t.backend,
            &t.target.address,
            &t.health,
            &t.reason,
        );
        if t.health == Health::Down {
            warn!(%service, %backend, %address, %health, %reason, "{line}");
        } else {
            info!(%service, %backend, %address, %health, %reason, "{line}");
        }
    }

    fn handle(&mut self, req: Request) -> server::Reply {
        match req {
            Request::Status => server::Reply::Status(self.status()),
            Request::Reload => server::Reply::Done(match self.reload_recorded() {
                Ok(()) => Response::ok(format!("reloaded {}", self.path.display())),
                Err(e) => {
                    error!("reload rejected, running config unchanged: {e:#}");
                    Response::error(format!("reload rejected, running config unchanged: {e:#}"))
                }
            }),
            Request::Explain { client, service } => {
                server::Reply::Done(match self.explain(&client, &service) {
                    Ok(text) => Response::ok(text),
                    Err(e) => Response::error(format!("{e:#}")),
                })
            }
            Request::Firewall(change) => {
                let what = command("firewall", &change);
                server::Reply::Done(match self.change_firewall(change) {
                    Ok(msg) => {
                        info!("{}", msg.lines().next().unwrap_or_default());
                        Response::ok(msg)
                    }
                    Err(e) => {
                        warn!("rejected {what}: {e:#}");
                        Response::error(format!("rejected, the running rules stay: {e:#}"))
                    }
                })
            }
            Request::Db(crate::db::DbCommand::Promote {
                pool,
                member,
                force,
            }) => {
                let (tx, rx) = tokio::sync::oneshot::channel();
                match self
                    .db
                    .promote(&pool, &member, force, Some(tx), "lb db promote")
                {
                    Ok(()) => {
                        info!(
                            "promoting {pool}/{member}{}",
                            if force { " (forced)" } else { "" }
                        );
                        server::Reply::Later(rx)
                    }
                    Err(why) => {
                        warn!("rejected lb db promote {pool} {member}: {why}");
                        server::Reply::Done(Response::error(format!("rejected: {why}")))
                    }
                }
            }
            Request::Vip(change) => {
                let what = command("vip", &change);
                server::Reply::Done(match self.change_vip(change) {
                    Ok(msg) => {
                        info!("{msg}");
                        Response::ok(msg)
                    }
                    Err(e) => {
                        warn!("rejected {what}: {e:#}");
                        Response::error(format!("rejected: {e:#}"))
                    }
                })
            }
            Request::Backend(change) => {
                let what = command("backend", &change);
                server::Reply::Done(match self.change_backend(change) {
                    Ok(msg) => {
                        info!("{msg}");
                        Response::ok(msg)
                    }
                    Err(e) => {
                        warn!("rejected {what}: {e:#}");
                        Response::error(format!("rejected, nothing changed: {e:#}"))
                    }
                })
            }
        }
    }

    /// `lb explain`: the maps' facts for the flow, with names, admin state
    /// and health from the agent, through the pure decision text.
    fn explain(&self, client: &str, service: &str) -> anyhow::Result<String> {
        let query = FlowQuery::parse(client, service)?;
        let facts = self
            .dp
            .flow_facts(&query.key())
            .context("reading the maps")?;
        let view = facts.service.as_ref().and_then(|f| {
            let (svc, applied) = self
                .cfg
                .services
                .iter()
                .zip(&self.applied)
                .find(|(_, a)| a.id == f.id)?;
            Some(ServiceView {
                name: svc.name.clone(),
                forwarding: svc.forwarding,
                scheduler: svc.scheduler,
                backends: svc
                    .backends
                    .iter()
                    .zip(&applied.backends)
                    .map(|(b, (_, id))| BackendView {
                        id: *id,
                        name: b.name.clone(),
                        address: b.address.to_string(),
                        admin: self
                            .admin
                            .get(&state::key(&svc.name, &b.name))
                            .copied()
                            .unwrap_or(Admin::Enabled),
                        health: self.health.get(&Self::target(svc, b)).copied().into(),
                        at_limit: self.at_limit.get(&state::key(&svc.name, &b.name)).copied(),
                    })
                    .collect(),
            })
        });
        let on_vip: Vec<String> = self
            .cfg
            .services
            .iter()
            .filter(|s| s.vip.ip() == query.vip.ip())
            .map(|s| format!("{} {}/{}", s.name, s.vip, s.protocol.name()))
            .collect();
        Ok(explain::explain(&query, &facts, view.as_ref(), &on_vip))
    }

    /// `lb firewall`: an edit goes through the one commit path (checked
    /// whole, applied atomically); `show` reads the rules and counters.
    fn change_firewall(&mut self, change: FirewallChange) -> anyhow::Result<String> {
        use crate::dataplane::firewall::List;
        let (list, edit) = match change {
            FirewallChange::Show => return self.firewall_show(),
            FirewallChange::Reset => return self.reset_firewall(),
            FirewallChange::Deny { edit } => (List::Deny, edit),
            FirewallChange::Allow { edit } => (List::Allow, edit),
        };
        let (next, msg) = state::firewall_edit(&self.cfg, list, &edit)?;
        self.commit_change(next, self.admin.clone())?;
        Ok(msg + &self.save_runtime_state())
    }

    /// `lb firewall reset`: the file's rules again, backend changes kept.
    fn reset_firewall(&mut self) -> anyhow::Result<String> {
        let mut kept = self.runtime_state();
        let undone = std::mem::take(&mut kept.firewall);
        if undone.is_empty() {
            bail!("no runtime changes of the firewall: the config file's rules apply");
        }
        self.commit_runtime(&self.file_cfg.clone(), &kept)?;
        Ok(format!(
            "the config file's firewall rules apply again ({} runtime change(s) undone){}",
            undone.len(),
            self.save_runtime_state()
        ))
    }

    /// Every rule with its scope and counter, and each scope's rate limit.
    fn firewall_show(&self) -> anyhow::Result<String> {
        let name = |scope: u32| {
            if scope == lb_common::FW_GLOBAL {
                "[firewall]".to_owned()
            } else {
                self.applied
                    .iter()
                    .find(|a| a.id == scope)
                    .map_or(format!("service id {scope}"), |a| {
                        format!("service {}", a.name)
                    })
            }
        };
        let mut out = String::new();
        let limits = std::iter::once(("[firewall]".to_owned(), &self.cfg.firewall)).chain(
            self.cfg
                .services
                .iter()
                .map(|s| (format!("service {}", s.name), &s.firewall)),
        );
        for (scope, fw) in limits {
            if let Some(r) = fw.rate_limit {
                out.push_str(&format!(
                    "{scope}: rate-limit {} new flows/s, burst {}, per {}\n",
                    r.new_flows_per_second,
                    r.burst,
                    r.per_text()
                ));
            }
        }
        let rules = self
            .dp
            .firewall_rules()
            .context("reading the rule counters")?;
        if rules.is_empty() && out.is_empty() {
            return Ok("no firewall rules".to_owned());
        }
        for r in rules {
            out.push_str(&format!(
                "{}: {} (rule {}): {} new flows\n",
                name(r.rule.scope),
                r.rule,
                r.id,
                r.new_flows
            ));
        }
        Ok(out)
    }

    fn change_backend(&mut self, change: BackendChange) -> anyhow::Result<String> {
        if let BackendChange::Reset { service, backend } = change {
            return self.reset_backend(&service, backend.as_deref());
        }
        let edit = state::edit(&self.cfg, &self.admin, change)?;
        self.commit_change(edit.config, edit.admin)?;
        Ok(edit.message + &self.save_runtime_state())
    }

    /// `lb backend reset SERVICE [NAME]`: drops the runtime changes of the
    /// service (or one backend) and applies the rest over the file.
    fn reset_backend(&mut self, service: &str, backend: Option<&str>) -> anyhow::Result<String> {
        if !self.cfg.services.iter().any(|s| s.name == service) {
            bail!("service: no service named {service:?}");
        }
        let mut kept = self.runtime_state();
        let (dropped, rest): (Vec<_>, Vec<_>) = kept
            .backends
            .into_iter()
            .partition(|e| e.service == service && backend.is_none_or(|b| e.backend == b));
        kept.backends = rest;
        let what = backend.map_or(service.to_owned(), |b| format!("{service}/{b}"));
        if dropped.is_empty() {
            bail!("{what} has no runtime changes: it runs as the config file says");
        }
        self.commit_runtime(&self.file_cfg.clone(), &kept)?;
        let undone: Vec<String> = dropped
            .iter()
            .map(|e| format!("{}/{} {}", e.service, e.backend, e.describe()))
            .collect();
        Ok(format!(
            "{what}: back to the config file (undid {}){}",
            undone.join("; "),
            self.save_runtime_state()
        ))
    }

    /// Commits the config file `file` with `state` merged over it (a
    /// reload, a reset); changes that no longer apply are logged.
    fn commit_runtime(
        &mut self,
        file: &Config,
        state: &runtime::RuntimeState,
    ) -> anyhow::Result<()> {
        let merged = runtime::merge(file, state, &self.state_path);
        for why in &merged.dropped {
            warn!("runtime change dropped: {why}");
        }
        self.commit_change(merged.config, merged.admin)
    }

    /// The runtime changes: what runs, against the file.
    fn runtime_state(&self) -> runtime::RuntimeState {
        runtime::diff(&self.file_cfg, &self.cfg, &self.admin)
    }

    /// Reads the state file at start and merges it over `cfg`. A file that
    /// cannot be used is reported and set aside: the config alone serves.
    fn read_runtime_state(&mut self, cfg: &Config) -> runtime::Merged {
        let path = &self.state_path;
        let state = match runtime::load(path) {
            Ok(state) => state,
            Err(e) => {
                let aside = runtime::set_aside(path).map_or_else(
                    |err| format!("(could not move it aside: {err})"),
                    |p| format!("(moved to {})", p.display()),
                );
                error!(
                    "runtime changes not restored, serving the config without them: {e} {aside}"
                );
                self.runtime_error = Some(format!("{e} {aside}"));
                runtime::RuntimeState::default()
            }
        };
        if !state.is_empty() {
            info!(
                "restoring {} runtime change(s) from {}: {}",
                state.describe().len(),
                path.display(),
                state.describe().join("; ")
            );
        }
        let merged = runtime::merge(cfg, &state, path);
        for why in &merged.dropped {
            warn!("runtime change dropped: {why}");
        }
        merged
    }

    /// Writes the runtime changes to the state file; what to tell the
    /// operator when that failed (the change is applied, but would not
    /// survive a restart), else nothing.
    fn save_runtime_state(&mut self) -> String {
        match runtime::save(&self.state_path, &self.runtime_state()) {
            Ok(()) => {
                // A write error is over once a write succeeds; a corrupt
                // file found at start stays reported.
                if self
                    .runtime_error
                    .as_deref()
                    .is_some_and(|e| e.contains("cannot write"))
                {
                    self.runtime_error = None;
                }
                String::new()
            }
            Err(e) => {
                error!("runtime change not saved: {e}");
                self.runtime_error = Some(e.to_string());
                format!(" (warning: not saved, lost at the next restart: {e})")
            }
        }
    }

    /// Everything `lb status` shows but the flow counts, which the control
    /// server adds off this loop (walking the flow table takes a while).
    fn status(&self) -> anyhow::Result<(Status, Vec<Vec<u32>>)> {
        let checks = self.checker.states();
        let runtime = self.runtime_state();
        let mut services = Vec::new();
        let mut ids = Vec::new();
        for (svc, applied) in self.cfg.services.iter().zip(&self.applied) {
            let traffic = self
                .dp
                .counters(lb_common::map_names::MapName::SERVICE_STATS, applied.id)?;
            let mut backends = Vec::new();
            let mut backend_ids = Vec::new();
            for (b, (_, id)) in svc.backends.iter().zip(&applied.backends) {
                let key = state::key(&svc.name, &b.name);
                let target = Self::target(svc, b);
                let counters = self
                    .dp
                    .counters(lb_common::map_names::MapName::BACKEND_STATS, *id)?;
                let check = checks.get(&target);
                // A pool's member: its own check and its role in this
                // service (a standby is healthy, not down).
                let member = self.db.member_view(&svc.name, &b.name);
                let (health, last_check, last_at) = match &member {
                    Some(m) => (Some(m.health), m.last_check.clone(), m.last_at),
                    None => (
                        self.health.get(&target).copied(),
                        check.and_then(|s| s.last_check.clone()),
                        check.and_then(|s| s.last_at),
                    ),
                };
                backends.push(BackendStatus {
                    name: b.name.clone(),
                    address: b.address.to_string(),
                    weight: b.weight,
                    backup: b.backup,
                    admin: self.admin.get(&key).copied().unwrap_or(Admin::Enabled),
                    health: health.into(),
                    pool_role: member.map(|m| m.role),
                    last_check,
                    last_check_at_ms: last_at.map(unix_ms),
                    last_check_us: check
                        .and_then(|s| s.last_duration)
                        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX)),
                    in_ring: applied.ring.contains(id),
                    flows: 0,
                    active: 0,
                    packets: counters.packets,
                    bytes: counters.bytes,
                    max_connections: svc.max_connections_of(b),
                    slow_start_percent: self.ramps.get(&key).map(|r| r.percent),
                    tls_cert_expiry: check.and_then(|s| s.cert_expiry),
                    at_limit: self.at_limit.contains_key(&key),
                    runtime: runtime
                        .backends
                        .iter()
                        .find(|e| e.service == svc.name && e.backend == b.name)
                        .map(runtime::BackendEntry::describe),
                });
                backend_ids.push(*id);
            }
            services.push(ServiceStatus {
                name: svc.name.clone(),
                vip: svc.vip.to_string(),
                protocol: svc.protocol,
                forwarding: svc.forwarding,
                scheduler: svc.scheduler,
                packets: traffic.packets,
                bytes: traffic.bytes,
                backends,
            });
            ids.push(backend_ids);
        }
        let verdicts = self
            .dp
            .verdicts()?
            .into_iter()
            .map(|(v, n)| (v.name().to_string(), n))
            .collect();
        let status = Status {
            config: self.path.display().to_string(),
            pin_dir: self.dp.pin_dir().map(|p| p.display().to_string()),
            adopted: self.adopted,
            interfaces: self.cfg.dataplane.interfaces.clone(),
            services,
            verdicts,
            agent: control::AgentStatus {
                version: env!("CARGO_PKG_VERSION").to_owned(),
                started_at_ms: self.started_at_ms,
                generation: self.generation,
                last_reload: self.last_reload.clone(),
                probe_agent_errors: self.checker.agent_errors() + self.db.agent_errors(),
            },
            conntrack: control::ConntrackStatus {
                // Counted off the loop with the flows per backend.
                entries: 0,
                capacity: self.cfg.dataplane.conntrack_size,
                half_open_capacity: self.cfg.dataplane.half_open_size,
            },
            pools: self.db.status(),
            announce: self.announcer.as_ref().map(Announcer::status),
            runtime: control::RuntimeStatus {
                file: self.state_path.display().to_string(),
                changes: runtime.describe(),
                error: self.runtime_error.clone(),
            },
        };
        Ok((status, ids))
    }
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
            Ok(r) if r.removed > 0 => {
                tracing::debug!(removed = r.removed, "swept expired flows");
            }
            Ok(_) => {}
            Err(e) => warn!("sweeping expired flows: {e}"),
        }
    }
}

/// A control command as a log line names it: the verb and its request as
/// the control protocol spells it (`lb backend {"action":"drain",…}`), not
/// Rust's Debug form.
fn command(verb: &str, change: &impl serde::Serialize) -> String {
    format!(
        "lb {verb} {}",
        serde_json::to_string(change).unwrap_or_default()
    )
}

/// A service's ring as a log line names it: the backends taking its new
/// flows, in config order (a weighted ring holds a backend many times).
fn ring_names(applied: &AppliedService) -> Vec<String> {
    applied
        .backends
        .iter()
        .filter(|(_, id)| applied.ring.contains(id))
        .map(|(name, _)| name.clone())
        .collect()
}

/// One line per service of `next` that is new or whose ring differs from
/// `before` (names as the config spells them: `tcp`, `nat`,
/// `round-robin`).
fn ring_changes(
    cfg: &Config,
    before: &[AppliedService],
    next: &Config,
    applied: &[AppliedService],
) -> Vec<String> {
    let old: BTreeMap<&str, Vec<String>> = cfg
        .services
        .iter()
        .zip(before)
        .map(|(svc, a)| (svc.name.as_str(), ring_names(a)))
        .collect();
    next.services
        .iter()
        .zip(applied)
        .filter_map(|(svc, a)| {
            let ring = ring_names(a);
            if old.get(svc.name.as_str()) == Some(&ring) {
                return None;
            }
            Some(format!(
                "service {} {} {} {} {}: ring [{}] ({} of {} backends)",
                svc.name,
                svc.vip,
                svc.protocol,
                svc.forwarding,
                svc.scheduler,
                ring.join(" "),
                ring.len(),
                svc.backends.len()
            ))
        })
        .collect()
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
        let addr = *b.address.ip();
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
/// expired, a backend not primed yet) is resolved by the kernel.
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
