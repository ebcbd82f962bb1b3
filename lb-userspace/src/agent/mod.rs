//! `lb run`: the agent's state and its one commit path. Validates the
//! config, loads (or adopts) the pinned data plane, attaches it, runs
//! health checks, serves the control socket, reloads on SIGHUP, and on
//! SIGINT/SIGTERM exits leaving the pinned data plane forwarding (a restart
//! adopts it; `lb teardown` removes it) — step by step in [`serve`].
//!
//! Every change — reload, `lb backend …`, a health transition — goes through
//! [`Agent::commit`]: the whole new state is checked first, then written to
//! the maps with the double-buffered ring switch, or rejected with nothing
//! changed. Requests are handled in [`handle`], `lb status` is built in
//! [`status`], and a backend's standing (admin state, health, a pool
//! member's role) is read in [`standing`] by all of them.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

mod handle;
mod limits;
mod runtime;
mod serve;
mod slow_start;
mod standing;
mod state;
mod status;

use anyhow::{Context, bail};
use tracing::{debug, error, info, warn};

pub use serve::ready_by;
use standing::Standings;
use state::{Admin, Key, carry_health};

use crate::{
    announce::{Announcer, ServiceReach},
    config::{self, Config},
    dataplane::{AppliedService, Dataplane},
    health::{Health, HealthChecker, Target, Transition},
    host, wire,
};

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// The TOML config (see config/foobar.toml)
    #[arg(long, short)]
    pub config: PathBuf,
    /// Control socket for `lb status`, `lb backend`, `lb reload`
    #[arg(long, default_value = wire::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// bpffs directory where maps and XDP links are pinned, so the data plane
    /// keeps forwarding when the agent stops and a new agent adopts it
    #[arg(long, default_value = host::DEFAULT_PIN_DIR)]
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
    runtime.block_on(serve::serve(args, cfg))
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
    last_reload: Option<wire::ReloadStatus>,
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
    /// `[sync]`: the sync thread's counts, once it runs.
    sync: Option<crate::sync::Stats>,
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// How often least-connections rings follow the active flow counts.
const LEAST_CONNECTIONS_REFRESH: Duration = Duration::from_secs(1);

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
    /// The standing of backend `b` of `svc` (admin state, health, a pool
    /// member's role, `max-connections`), as every reader sees it.
    fn standing(&self, svc: &config::Service, b: &config::Backend) -> standing::Standing {
        Standings {
            admin: &self.admin,
            health: &self.health,
            db: &self.db,
            at_limit: &self.at_limit,
        }
        .of(svc, b)
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
        // Field by field: the data plane is written while they are read.
        let standings = Standings {
            admin: &self.admin,
            health: &self.health,
            db: &self.db,
            at_limit: &self.at_limit,
        };
        let admitted = |svc: &config::Service, b: &config::Backend| {
            standings.of(svc, b).admission(svc.on_backend_down)
        };
        let admit = |svc: &config::Service, b: &config::Backend| {
            let standing = standings.of(svc, b);
            limits::limited(
                standing.admission(svc.on_backend_down),
                standing.at_limit.is_some(),
            )
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
                vip: svc.vip.ip().to_owned().into(),
                has_backend: !applied.ring.is_empty(),
            })
            .collect()
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
        crate::health::through_vip::follow(&mut self.checker, &mut self.dp, &self.cfg);
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
        self.last_reload = Some(wire::ReloadStatus {
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
        if new.sync != self.cfg.sync {
            bail!(
                "[sync] changed (listen, peers, key, bulk-timeout): that needs a restart of `lb run`"
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
