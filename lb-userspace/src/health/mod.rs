//! Health checks: one tokio task per checked (service, backend) that probes
//! the backend every `interval` and reports health transitions.
//!
//! A backend's health is [`Health::Up`], [`Health::Down`] or
//! [`Health::Pending`] (never judged yet: out of the ring until it passes
//! `rise` probes in a row, as HAProxy treats a new server). Up goes down
//! after `fall` consecutive failed probes, down or pending goes up after
//! `rise` consecutive passed probes, pending goes down after `fall`
//! failures; the rise/fall logic is the pure [`Counter`].
//!
//! The agent owns the health of every backend and hands it to
//! [`HealthChecker::sync`] whenever the config changes: checks of backends
//! that still exist (same service, same address, same check) keep running
//! untouched, changed checks restart from the state the agent has, and only
//! new backends start pending. A reload therefore never resets a down
//! backend to up, nor forgets that one came back.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use serde::{Deserialize, Serialize};
use tokio::{sync::mpsc::UnboundedSender, task::JoinHandle, time::MissedTickBehavior};

use crate::{
    config::{Config, Forwarding, HealthCheck, Service},
    wire::HealthStatus,
};

mod counter;
mod dns;
pub mod gtid;
pub mod mysql;
mod probe;
#[cfg(test)]
mod tests;
pub mod through_vip;
pub mod tls;
mod udp;

pub use counter::Counter;
pub use probe::{ProbeError, probe};
pub use through_vip::ThroughVip;

/// A checked backend's health as the agent acts on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Health {
    /// Passed `rise` probes in a row (or inherited as serving): in the ring.
    Up,
    /// Failed `fall` probes in a row: out of the ring.
    Down,
    /// Not judged yet (a new backend): out of the ring until it passes
    /// `rise` probes in a row.
    Pending,
}

impl Health {
    /// Whether this state lets the backend take new flows.
    pub fn serving(self) -> bool {
        self == Health::Up
    }

    pub fn name(self) -> &'static str {
        match self {
            Health::Up => "up",
            Health::Down => "down",
            Health::Pending => "pending",
        }
    }
}

impl std::fmt::Display for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The status's spelling of a health (`None`: `unchecked`, no check).
impl From<Option<Health>> for HealthStatus {
    fn from(health: Option<Health>) -> Self {
        match health {
            None => HealthStatus::Unchecked,
            Some(Health::Up) => HealthStatus::Up,
            Some(Health::Down) => HealthStatus::Down,
            Some(Health::Pending) => HealthStatus::Pending,
        }
    }
}

/// Identifies a checked backend: its service, and its address within it.
/// Health follows the address, so a backend keeps its state across reloads
/// and live changes for as long as its service has a backend there.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Target {
    pub service: String,
    pub address: SocketAddr,
}

/// A backend changed state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    pub target: Target,
    /// The backend's name when the check was started (for the log).
    pub backend: String,
    pub health: Health,
    /// E.g. "3 consecutive failures: connect 198.19.0.11:80: connection
    /// refused" or "2 consecutive successes".
    pub reason: String,
    /// The check that produced it; a transition from a check that has since
    /// been replaced is stale (see [`HealthChecker::is_current`]).
    pub check_id: u64,
}

/// What is known about one checked backend's latest probes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetState {
    pub health: Health,
    /// The outcome of the latest probe: "ok" or why it failed; `None` before
    /// the first probe has finished.
    pub last_check: Option<String>,
    /// How many probes in a row had the latest probe's outcome (passed or
    /// failed); 0 before the first probe.
    pub consecutive: u32,
    /// When the latest probe finished, and how long it took.
    pub last_at: Option<SystemTime>,
    pub last_duration: Option<Duration>,
    /// `check = "tls"`: when the backend's certificate expires (seconds
    /// since the Unix epoch), as of the last passed probe.
    pub cert_expiry: Option<i64>,
}

/// Told of every finished probe: its target, backend name and duration
/// (the metrics' probe latency histogram).
pub type ProbeObserver = Arc<dyn Fn(&Target, &str, Duration) + Send + Sync>;

type States = Arc<Mutex<BTreeMap<Target, TargetState>>>;

/// One running check.
struct Check {
    id: u64,
    backend: String,
    probe: SocketAddr,
    /// The address the probes are sent from (`probe_source`).
    source: Option<IpAddr>,
    check: HealthCheck,
    task: JoinHandle<()>,
}

/// Runs every configured check; drop it to stop them all.
pub struct HealthChecker {
    checks: BTreeMap<Target, Check>,
    states: States,
    tx: UnboundedSender<Transition>,
    next_id: u64,
    observer: Option<ProbeObserver>,
    /// Probes that could not run for a reason of the agent's own.
    agent_errors: Arc<AtomicU64>,
    /// The prober of checks through the VIP, once the agent made it.
    through_vip: Option<ThroughVip>,
}

impl HealthChecker {
    /// A checker with no checks yet; [`sync`](Self::sync) starts them.
    /// Transitions are sent on `tx`.
    pub fn new(tx: UnboundedSender<Transition>) -> HealthChecker {
        HealthChecker {
            checks: BTreeMap::new(),
            states: Arc::default(),
            tx,
            next_id: 0,
            observer: None,
            agent_errors: Arc::default(),
            through_vip: None,
        }
    }

    /// Whether a check of `cfg` probes through the VIP and no prober is
    /// set yet: the agent makes one ([`ThroughVip::start`]).
    pub fn wants_through_vip(&self, cfg: &Config) -> bool {
        self.through_vip.is_none()
            && cfg.services.iter().any(|s| {
                s.backends
                    .iter()
                    .any(|b| s.health_for(b).is_some_and(|h| h.through_vip))
            })
    }

    /// The prober checks through the VIP use: checks take it when they
    /// start, so it is set before the `sync` that starts them.
    pub fn set_through_vip(&mut self, prober: ThroughVip) {
        self.through_vip = Some(prober);
    }

    /// The prober, if one runs (the agent updates its services' routes).
    pub fn through_vip(&self) -> Option<&ThroughVip> {
        self.through_vip.as_ref()
    }

    /// How many probes could not run for a reason of the agent's own
    /// ([`ProbeError::Agent`]) since the checker started.
    pub fn agent_errors(&self) -> u64 {
        self.agent_errors.load(Ordering::Relaxed)
    }

    /// Tells `observer` of every probe that checks started from now on run.
    pub fn observe_probes(&mut self, observer: ProbeObserver) {
        self.observer = Some(observer);
    }

    /// Spawns one task per (service, backend) that has a check
    /// ([`Service::health_for`](crate::config::Service::health_for)), every
    /// backend starting up. For tests and tools; the agent uses `sync`.
    pub fn spawn(cfg: &Config, tx: UnboundedSender<Transition>) -> HealthChecker {
        let mut checker = HealthChecker::new(tx);
        checker.sync(cfg, &|_| Health::Up);
        checker
    }

    /// Brings the running checks in line with `cfg`. A check whose target
    /// (service, address), backend name and check are unchanged keeps
    /// running as it is; a new or changed one starts in the state `health`
    /// gives for its target; checks of targets that are gone stop.
    ///
    /// Must be called from within a tokio runtime (`tokio::spawn` panics
    /// otherwise).
    pub fn sync(&mut self, cfg: &Config, health: &dyn Fn(&Target) -> Health) {
        let mut wanted = BTreeMap::new();
        for service in &cfg.services {
            for backend in &service.backends {
                if let Some(check) = service.health_for(backend) {
                    let target = Target {
                        service: service.name.clone(),
                        address: backend.address,
                    };
                    wanted.insert(
                        target,
                        (
                            backend.name.clone(),
                            check.clone(),
                            probe_source(cfg, service),
                        ),
                    );
                }
            }
        }
        let gone: Vec<Target> = self
            .checks
            .keys()
            .filter(|t| !wanted.contains_key(*t))
            .cloned()
            .collect();
        for target in gone {
            if let Some(c) = self.checks.remove(&target) {
                c.task.abort();
            }
            lock(&self.states).remove(&target);
        }
        for (target, (backend, check, source)) in wanted {
            let probe = check.target(target.address);
            if let Some(running) = self.checks.get(&target)
                && running.backend == backend
                && running.check == check
                && running.probe == probe
                && running.source == source
            {
                continue;
            }
            if let Some(old) = self.checks.remove(&target) {
                old.task.abort();
            }
            let start = health(&target);
            let last = lock(&self.states).get(&target).cloned();
            lock(&self.states).insert(
                target.clone(),
                TargetState {
                    health: start,
                    last_check: last.as_ref().and_then(|s| s.last_check.clone()),
                    consecutive: 0,
                    last_at: last.as_ref().and_then(|s| s.last_at),
                    last_duration: last.as_ref().and_then(|s| s.last_duration),
                    cert_expiry: last.and_then(|s| s.cert_expiry),
                },
            );
            self.next_id += 1;
            let id = self.next_id;
            let task = tokio::spawn(run_check(
                CheckRun {
                    id,
                    target: target.clone(),
                    backend: backend.clone(),
                    probe,
                    source,
                    check: check.clone(),
                    start,
                    observer: self.observer.clone(),
                    agent_errors: Arc::clone(&self.agent_errors),
                    through_vip: self.through_vip.clone(),
                },
                Arc::clone(&self.states),
                self.tx.clone(),
            ));
            self.checks.insert(
                target,
                Check {
                    id,
                    backend,
                    probe,
                    source,
                    check,
                    task,
                },
            );
        }
    }

    /// Whether `t` comes from a check that is still running (a transition
    /// queued by a check that a config change replaced is stale).
    pub fn is_current(&self, t: &Transition) -> bool {
        self.checks
            .get(&t.target)
            .is_some_and(|c| c.id == t.check_id)
    }

    /// Current state of every checked target.
    pub fn states(&self) -> BTreeMap<Target, TargetState> {
        lock(&self.states).clone()
    }
}

impl Drop for HealthChecker {
    fn drop(&mut self) {
        for check in self.checks.values() {
            check.task.abort();
        }
    }
}

/// The map stays consistent even if a holder panicked (every update is a
/// single insert), so a poisoned lock is used as is.
fn lock(states: &States) -> std::sync::MutexGuard<'_, BTreeMap<Target, TargetState>> {
    states.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The address a service's probes are sent from: a full-NAT service's
/// first configured source address (`[dataplane] source-addresses`), so a
/// backend firewall that admits only the LB's translated flows admits the
/// probes too; `None` (the kernel's choice, the route's preferred source,
/// which is full NAT's default source address too) otherwise.
pub fn probe_source(cfg: &Config, service: &Service) -> Option<IpAddr> {
    (service.forwarding == Forwarding::FullNat)
        .then(|| cfg.dataplane.full_nat.addresses.first())
        .flatten()
        .map(|a| IpAddr::V4(*a))
}

/// What one check task probes, and from which state it starts.
struct CheckRun {
    id: u64,
    target: Target,
    backend: String,
    probe: SocketAddr,
    source: Option<IpAddr>,
    check: HealthCheck,
    start: Health,
    observer: Option<ProbeObserver>,
    agent_errors: Arc<AtomicU64>,
    through_vip: Option<ThroughVip>,
}

/// Records one probe's outcome in `counter`; returns the new health if it
/// changed. A probe the agent could not run ([`ProbeError::Agent`]) is
/// not an outcome: the counter stays as it was, whatever `fall` is.
pub fn record(
    counter: &mut Counter,
    outcome: &Result<(), ProbeError>,
    rise: u32,
    fall: u32,
) -> Option<Health> {
    match outcome {
        Err(ProbeError::Agent(_)) => None,
        Ok(()) => counter.record(true, rise, fall),
        Err(ProbeError::Backend(_)) => counter.record(false, rise, fall),
    }
}

async fn run_check(run: CheckRun, states: States, tx: UnboundedSender<Transition>) {
    let CheckRun {
        id,
        target,
        backend,
        probe: address,
        source,
        check,
        start,
        observer,
        agent_errors,
        through_vip,
    } = run;
    // Probes the agent could not run: logged at most once a minute per
    // check (they come in bursts, and flap as descriptors free up).
    let mut agent_errors_here = AgentErrorLog::default();
    // tokio::time::interval panics on a zero period; a validated config
    // never has one, but a Config can be built by hand.
    let mut ticker = tokio::time::interval(check.interval.max(Duration::from_millis(1)));
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut counter = Counter::starting(start);
    let mut cert_expiry = None;
    loop {
        // The first tick completes at once: the first probe runs at spawn.
        ticker.tick().await;
        let started = Instant::now();
        let (outcome, expiry) = match (check.through_vip, &through_vip) {
            (false, _) => probe::probe_detailed(address, source, &check.check, check.timeout).await,
            (true, Some(prober)) => (
                prober.probe(&target.service, target.address, &check).await,
                None,
            ),
            (true, None) => (
                Err(ProbeError::Agent(
                    "no probe namespace for checks through the VIP (see the agent's log)".into(),
                )),
                None,
            ),
        };
        // A failed handshake says nothing new about the certificate.
        cert_expiry = expiry.or(cert_expiry);
        let took = started.elapsed();
        if let Some(observe) = &observer {
            observe(&target, &backend, took);
        }
        if let Err(ProbeError::Agent(why)) = &outcome {
            agent_errors.fetch_add(1, Ordering::Relaxed);
            if let Some(since) = agent_errors_here.note(Instant::now()) {
                tracing::error!(
                    service = %target.service,
                    backend = %backend,
                    "health check of {}/{backend} cannot run: {why} ({since} {} since the \
                     last report); its health stays {} until probes run again (counted in \
                     lb_probe_agent_errors_total)",
                    target.service,
                    plural(u32::try_from(since).unwrap_or(u32::MAX), "probe", "probes"),
                    counter.health()
                );
            }
            if let Some(state) = lock(&states).get_mut(&target) {
                state.last_check = Some(ProbeError::Agent(why.clone()).to_string());
                state.last_at = Some(SystemTime::now());
                state.last_duration = Some(took);
            }
            continue;
        }
        let changed = record(&mut counter, &outcome, check.rise, check.fall);
        let n = counter.consecutive();
        let reason = match (&outcome, changed) {
            (Err(why), Some(_)) => Some(format!(
                "{n} consecutive {}: {why}",
                plural(n, "failure", "failures")
            )),
            (Ok(()), Some(_)) => Some(format!(
                "{n} consecutive {}",
                plural(n, "success", "successes")
            )),
            _ => None,
        };
        if let Err(why) = &outcome {
            tracing::debug!(service = %target.service, backend = %backend, reason = %why, "probe failed");
        }
        lock(&states).insert(
            target.clone(),
            TargetState {
                health: counter.health(),
                last_check: Some(match outcome {
                    Ok(()) => "ok".to_owned(),
                    Err(why) => why.to_string(),
                }),
                consecutive: n,
                last_at: Some(SystemTime::now()),
                last_duration: Some(took),
                cert_expiry,
            },
        );
        if let Some(reason) = reason {
            let transition = Transition {
                target: target.clone(),
                backend: backend.clone(),
                health: counter.health(),
                reason,
                check_id: id,
            };
            // Nobody listening only means nobody acts on it; keep probing
            // so that states() stays current.
            let _ = tx.send(transition);
        }
    }
}

/// How often a check reports probes it could not run.
const AGENT_ERROR_LOG_EVERY: Duration = Duration::from_secs(60);

/// The probes of one check (or one pool member) the agent could not run
/// ([`ProbeError::Agent`]), reported at most once per
/// [`AGENT_ERROR_LOG_EVERY`].
#[derive(Debug, Default)]
pub struct AgentErrorLog {
    /// When the last report was made, and the count then.
    reported: Option<(Instant, u64)>,
    count: u64,
}

impl AgentErrorLog {
    /// Notes one more such probe at `now`. `Some(n)`: report it now, `n`
    /// of them since the last report; `None`: reported within the minute.
    pub fn note(&mut self, now: Instant) -> Option<u64> {
        self.count += 1;
        if let Some((at, _)) = self.reported
            && now.saturating_duration_since(at) < AGENT_ERROR_LOG_EVERY
        {
            return None;
        }
        let since = self.count - self.reported.map_or(0, |(_, n)| n);
        self.reported = Some((now, self.count));
        Some(since)
    }
}

fn plural(n: u32, one: &'static str, many: &'static str) -> &'static str {
    if n == 1 { one } else { many }
}
