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
    net::SocketAddrV4,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::mpsc::UnboundedSender,
    task::JoinHandle,
    time::{Instant, MissedTickBehavior, timeout_at},
};

use crate::config::{CheckKind, Config, HealthCheck};

/// At most this much of an HTTP response is read.
const HTTP_RESPONSE_CAP: u64 = 64 * 1024;

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

/// Identifies a checked backend: its service, and its address within it.
/// Health follows the address, so a backend keeps its state across reloads
/// and live changes for as long as its service has a backend there.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Target {
    pub service: String,
    pub address: SocketAddrV4,
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
}

/// The rise/fall state machine of one backend, without any I/O.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Counter {
    health: Health,
    /// Outcome of the latest probe.
    last_ok: Option<bool>,
    /// Length of the current run of `last_ok` outcomes.
    consecutive: u32,
}

impl Default for Counter {
    fn default() -> Self {
        Self::new()
    }
}

impl Counter {
    /// Starts up, with no probe recorded.
    pub fn new() -> Self {
        Self::starting(Health::Up)
    }

    /// Starts in `health`, with no probe recorded.
    pub fn starting(health: Health) -> Self {
        Self {
            health,
            last_ok: None,
            consecutive: 0,
        }
    }

    pub fn health(&self) -> Health {
        self.health
    }

    pub fn up(&self) -> bool {
        self.health.serving()
    }

    /// How many probes in a row had the latest outcome.
    pub fn consecutive(&self) -> u32 {
        self.consecutive
    }

    /// Records one probe outcome. Returns the new state if it changed: down
    /// on the `fall`th consecutive failure while up or pending, up on the
    /// `rise`th consecutive success while down or pending. (A `rise` or
    /// `fall` of 0 acts as 1.)
    pub fn record(&mut self, ok: bool, rise: u32, fall: u32) -> Option<Health> {
        if self.last_ok == Some(ok) {
            self.consecutive = self.consecutive.saturating_add(1);
        } else {
            self.last_ok = Some(ok);
            self.consecutive = 1;
        }
        let (needed, next) = if ok {
            (rise, Health::Up)
        } else {
            (fall, Health::Down)
        };
        if self.health != next && self.consecutive >= needed {
            self.health = next;
            Some(next)
        } else {
            None
        }
    }
}

type States = Arc<Mutex<BTreeMap<Target, TargetState>>>;

/// One running check.
struct Check {
    id: u64,
    backend: String,
    probe: SocketAddrV4,
    check: HealthCheck,
    task: JoinHandle<()>,
}

/// Runs every configured check; drop it to stop them all.
pub struct HealthChecker {
    checks: BTreeMap<Target, Check>,
    states: States,
    tx: UnboundedSender<Transition>,
    next_id: u64,
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
        }
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
                    wanted.insert(target, (backend.name.clone(), check.clone()));
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
        for (target, (backend, check)) in wanted {
            let probe = check.target(target.address);
            if let Some(running) = self.checks.get(&target)
                && running.backend == backend
                && running.check == check
                && running.probe == probe
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
                    last_check: last.and_then(|s| s.last_check),
                    consecutive: 0,
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
                    check: check.clone(),
                    start,
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

/// What one check task probes, and from which state it starts.
struct CheckRun {
    id: u64,
    target: Target,
    backend: String,
    probe: SocketAddrV4,
    check: HealthCheck,
    start: Health,
}

async fn run_check(run: CheckRun, states: States, tx: UnboundedSender<Transition>) {
    let CheckRun {
        id,
        target,
        backend,
        probe: address,
        check,
        start,
    } = run;
    // tokio::time::interval panics on a zero period; a validated config
    // never has one, but a Config can be built by hand.
    let mut ticker = tokio::time::interval(check.interval.max(Duration::from_millis(1)));
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut counter = Counter::starting(start);
    loop {
        // The first tick completes at once: the first probe runs at spawn.
        ticker.tick().await;
        let outcome = probe(address, &check.check, check.timeout).await;
        let changed = counter.record(outcome.is_ok(), check.rise, check.fall);
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
            log::debug!("health {}/{backend}: {why}", target.service);
        }
        lock(&states).insert(
            target.clone(),
            TargetState {
                health: counter.health(),
                last_check: Some(match outcome {
                    Ok(()) => "ok".to_owned(),
                    Err(why) => why,
                }),
                consecutive: n,
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

fn plural(n: u32, one: &'static str, many: &'static str) -> &'static str {
    if n == 1 { one } else { many }
}

/// Runs one probe of `check` against `address`, all of it within `timeout`.
/// The error is a short reason naming the step and the address.
pub async fn probe(
    address: SocketAddrV4,
    check: &CheckKind,
    timeout: Duration,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let timed_out = || format!("timed out after {}", show(timeout));

    let mut stream = timeout_at(deadline, TcpStream::connect(address))
        .await
        .map_err(|_| format!("connect {address}: {}", timed_out()))?
        .map_err(|e| format!("connect {address}: {}", io_reason(&e)))?;

    let CheckKind::Http {
        path,
        expect_status,
        expect_body,
    } = check
    else {
        return Ok(());
    };

    let request = format!(
        "GET {path} HTTP/1.0\r\nHost: {}\r\nUser-Agent: lb-health\r\nConnection: close\r\n\r\n",
        address.ip()
    );
    timeout_at(deadline, stream.write_all(request.as_bytes()))
        .await
        .map_err(|_| format!("send request to {address}: {}", timed_out()))?
        .map_err(|e| format!("send request to {address}: {}", io_reason(&e)))?;

    let mut response = Vec::new();
    timeout_at(
        deadline,
        (&mut stream)
            .take(HTTP_RESPONSE_CAP)
            .read_to_end(&mut response),
    )
    .await
    .map_err(|_| format!("read response from {address}: {}", timed_out()))?
    .map_err(|e| format!("read response from {address}: {}", io_reason(&e)))?;

    check_response(&response, *expect_status, expect_body.as_deref())
        .map_err(|why| format!("{address}{path}: {why}"))
}

/// Checks an HTTP response's status code and (optionally) body.
fn check_response(
    response: &[u8],
    expect_status: u16,
    expect_body: Option<&str>,
) -> Result<(), String> {
    if response.is_empty() {
        return Err("empty response".to_owned());
    }
    let text = String::from_utf8_lossy(response);
    let status_line = text.lines().next().unwrap_or_default();
    let mut words = status_line.split_whitespace();
    let status = match (words.next(), words.next()) {
        (Some(version), Some(code)) if version.starts_with("HTTP/") && code.len() == 3 => {
            code.parse::<u16>().ok()
        }
        _ => None,
    };
    let Some(status) = status else {
        let shown: String = status_line.chars().take(60).collect();
        return Err(format!("not an HTTP status line: {shown:?}"));
    };
    if status != expect_status {
        return Err(format!("status {status}, expected {expect_status}"));
    }
    if let Some(expected) = expect_body {
        let body = match text.find("\r\n\r\n") {
            Some(i) => &text[i + 4..],
            None => text.find("\n\n").map_or("", |i| &text[i + 2..]),
        };
        if !body.contains(expected) {
            return Err(format!("body does not contain {expected:?}"));
        }
    }
    Ok(())
}

/// An I/O error as a short lower-case reason: "connection refused" rather
/// than "Connection refused (os error 111)".
fn io_reason(e: &std::io::Error) -> String {
    let text = e.to_string();
    let text = match text.find(" (os error ") {
        Some(i) => &text[..i],
        None => &text,
    };
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => format!("{:?}", e.kind()),
    }
}

fn show(d: Duration) -> String {
    let ms = d.as_millis();
    if ms >= 1000 && ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{
        Backend, Dataplane, Forwarding, OnBackendDown, Protocol, Scheduler, Service, XdpMode,
    };
    use std::time::Instant as StdInstant;
    use tokio::{net::TcpListener, sync::mpsc};

    // --- state machine -----------------------------------------------------

    #[test]
    fn falls_on_the_fall_th_consecutive_failure() {
        let mut c = Counter::new();
        assert!(c.up());
        assert_eq!(c.record(true, 2, 3), None);
        assert_eq!(c.record(false, 2, 3), None);
        assert_eq!(c.record(false, 2, 3), None);
        // A success in between resets the run.
        assert_eq!(c.record(true, 2, 3), None);
        assert_eq!(c.record(false, 2, 3), None);
        assert_eq!(c.record(false, 2, 3), None);
        assert!(c.up());
        assert_eq!(c.record(false, 2, 3), Some(Health::Down));
        assert!(!c.up());
        assert_eq!(c.consecutive(), 3);
        // No repeat while it stays down.
        for _ in 0..5 {
            assert_eq!(c.record(false, 2, 3), None);
        }
        assert_eq!(c.consecutive(), 8);
    }

    #[test]
    fn rises_on_the_rise_th_consecutive_success() {
        let mut c = Counter::new();
        assert_eq!(c.record(false, 2, 1), Some(Health::Down));
        assert_eq!(c.record(true, 2, 1), None);
        // A failure in between resets the run (and does not repeat "down").
        assert_eq!(c.record(false, 2, 1), None);
        assert_eq!(c.record(true, 2, 1), None);
        assert!(!c.up());
        assert_eq!(c.record(true, 2, 1), Some(Health::Up));
        assert!(c.up());
        assert_eq!(c.consecutive(), 2);
        for _ in 0..5 {
            assert_eq!(c.record(true, 2, 1), None);
        }
        // Starting up, successes never produce a transition.
        let mut fresh = Counter::new();
        for _ in 0..5 {
            assert_eq!(fresh.record(true, 1, 1), None);
        }
    }

    #[test]
    fn a_pending_backend_needs_rise_passes_and_falls_after_fall_failures() {
        let mut c = Counter::starting(Health::Pending);
        assert!(!c.up());
        assert_eq!(c.record(true, 3, 2), None);
        assert_eq!(c.record(true, 3, 2), None);
        assert_eq!(c.health(), Health::Pending);
        assert_eq!(c.record(true, 3, 2), Some(Health::Up));
        let mut c = Counter::starting(Health::Pending);
        assert_eq!(c.record(false, 3, 2), None);
        assert_eq!(c.health(), Health::Pending);
        assert_eq!(c.record(false, 3, 2), Some(Health::Down));
        assert_eq!(c.record(true, 3, 2), None);
    }

    // --- probes --------------------------------------------------------------

    async fn listener() -> (TcpListener, SocketAddrV4) {
        let listener = match TcpListener::bind("127.0.0.1:0").await {
            Ok(l) => l,
            Err(e) => panic!("bind: {e}"),
        };
        let addr = match listener.local_addr() {
            Ok(std::net::SocketAddr::V4(a)) => a,
            other => panic!("local_addr: {other:?}"),
        };
        (listener, addr)
    }

    async fn closed_port() -> SocketAddrV4 {
        let (l, addr) = listener().await;
        drop(l);
        addr
    }

    /// Answers every connection with `response` after reading the request
    /// head; the requests are sent on the returned channel.
    fn serve(
        listener: TcpListener,
        response: &'static str,
    ) -> (JoinHandle<()>, mpsc::UnboundedReceiver<String>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !request.ends_with(b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&buf[..n]),
                        }
                    }
                    let _ = tx.send(String::from_utf8_lossy(&request).into_owned());
                    let _ = stream.write_all(response.as_bytes()).await;
                });
            }
        });
        (task, rx)
    }

    const OK_WEB1: &str = "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nweb1\n";

    fn http(path: &str, expect_status: u16, expect_body: Option<&str>) -> CheckKind {
        CheckKind::Http {
            path: path.to_owned(),
            expect_status,
            expect_body: expect_body.map(str::to_owned),
        }
    }

    const T: Duration = Duration::from_millis(500);

    #[tokio::test]
    async fn tcp_check_passes_on_a_listening_port() {
        let (_listener, addr) = listener().await;
        assert_eq!(probe(addr, &CheckKind::Tcp, T).await, Ok(()));
    }

    #[tokio::test]
    async fn tcp_check_fails_on_a_closed_port() {
        let addr = closed_port().await;
        let why = probe(addr, &CheckKind::Tcp, T).await.err();
        assert_eq!(why, Some(format!("connect {addr}: connection refused")));
    }

    #[tokio::test]
    async fn http_check_passes_on_expected_status_and_body() {
        let (l, addr) = listener().await;
        let (_server, mut requests) = serve(l, OK_WEB1);
        assert_eq!(
            probe(addr, &http("/healthz", 200, Some("web1")), T).await,
            Ok(())
        );
        assert_eq!(
            requests.recv().await,
            Some(format!(
                "GET /healthz HTTP/1.0\r\nHost: {}\r\nUser-Agent: lb-health\r\nConnection: close\r\n\r\n",
                addr.ip()
            ))
        );
        assert_eq!(probe(addr, &http("/", 200, None), T).await, Ok(()));
    }

    #[tokio::test]
    async fn http_check_fails_when_body_lacks_the_expected_text() {
        let (l, addr) = listener().await;
        let (_server, _) = serve(l, OK_WEB1);
        let why = probe(addr, &http("/", 200, Some("nope")), T).await.err();
        assert_eq!(
            why,
            Some(format!("{addr}/: body does not contain \"nope\""))
        );
    }

    #[tokio::test]
    async fn http_check_fails_on_wrong_status() {
        let (l, addr) = listener().await;
        let (_server, _) = serve(l, "HTTP/1.1 503 Service Unavailable\r\n\r\nweb1");
        let why = probe(addr, &http("/", 200, None), T).await.err();
        assert_eq!(why, Some(format!("{addr}/: status 503, expected 200")));
        // An expected non-200 status passes.
        assert_eq!(probe(addr, &http("/", 503, None), T).await, Ok(()));
    }

    #[tokio::test]
    async fn http_check_fails_on_garbage_and_on_closed_ports() {
        let (l, addr) = listener().await;
        let (_server, _) = serve(l, "SSH-2.0-OpenSSH\r\n");
        let why = probe(addr, &http("/", 200, None), T)
            .await
            .err()
            .unwrap_or_default();
        assert!(
            why.contains("not an HTTP status line: \"SSH-2.0-OpenSSH\""),
            "{why}"
        );

        let addr = closed_port().await;
        let why = probe(addr, &http("/", 200, None), T).await.err();
        assert_eq!(why, Some(format!("connect {addr}: connection refused")));
    }

    #[tokio::test]
    async fn http_check_times_out_on_a_silent_server() {
        let (l, addr) = listener().await;
        // Accepts and holds connections, never answers.
        let _server = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = l.accept().await {
                held.push(stream);
            }
        });
        let start = StdInstant::now();
        let why = probe(addr, &http("/", 200, None), Duration::from_millis(200))
            .await
            .err();
        let took = start.elapsed();
        assert_eq!(
            why,
            Some(format!("read response from {addr}: timed out after 200ms"))
        );
        assert!(
            took >= Duration::from_millis(200) && took < Duration::from_secs(1),
            "{took:?}"
        );
    }

    #[test]
    fn responses_are_parsed() {
        assert_eq!(
            check_response(b"HTTP/1.1 200 OK\n\nbody", 200, Some("body")),
            Ok(())
        );
        assert_eq!(
            check_response(b"HTTP/1.1 200 OK\r\n\r\n", 200, Some("x")),
            Err("body does not contain \"x\"".to_owned())
        );
        // The expected text in a header does not count.
        assert!(check_response(b"HTTP/1.1 200 OK\r\nX: web1\r\n\r\n", 200, Some("web1")).is_err());
        assert_eq!(
            check_response(b"", 200, None),
            Err("empty response".to_owned())
        );
        assert!(check_response(b"HTTP/1.1 2000 OK\r\n\r\n", 200, None).is_err());
    }

    #[test]
    fn io_reasons_are_short() {
        let e = std::io::Error::from_raw_os_error(libc::ECONNREFUSED);
        assert_eq!(io_reason(&e), "connection refused");
        assert_eq!(show(Duration::from_millis(1500)), "1500ms");
        assert_eq!(show(Duration::from_secs(2)), "2s");
    }

    // --- the engine --------------------------------------------------------

    fn config(services: Vec<Service>) -> Config {
        Config {
            dataplane: Dataplane {
                interfaces: vec!["lo".to_owned()],
                forwarding: Forwarding::Nat,
                xdp_mode: XdpMode::Generic,
                conntrack_size: 65536,
            },
            services,
        }
    }

    fn service(name: &str, health: Option<HealthCheck>, backends: Vec<Backend>) -> Service {
        Service {
            name: name.to_owned(),
            vip: SocketAddrV4::new([198, 18, 0, 10].into(), 80),
            protocol: Protocol::Tcp,
            forwarding: Forwarding::Nat,
            scheduler: Scheduler::RoundRobin,
            health,
            on_backend_down: OnBackendDown::KeepFlows,
            backends,
        }
    }

    fn backend(name: &str, address: SocketAddrV4, health: Option<HealthCheck>) -> Backend {
        Backend {
            name: name.to_owned(),
            address,
            weight: 1,
            backup: false,
            health,
        }
    }

    fn fast(check: CheckKind) -> HealthCheck {
        HealthCheck {
            check,
            port: None,
            interval: Duration::from_millis(100),
            timeout: Duration::from_millis(100),
            rise: 2,
            fall: 2,
        }
    }

    fn target(service: &str, address: SocketAddrV4) -> Target {
        Target {
            service: service.to_owned(),
            address,
        }
    }

    async fn next(rx: &mut mpsc::UnboundedReceiver<Transition>, within: Duration) -> Transition {
        match tokio::time::timeout(within, rx.recv()).await {
            Ok(Some(t)) => t,
            Ok(None) => panic!("transition channel closed"),
            Err(_) => panic!("no transition within {within:?}"),
        }
    }

    /// Waits until `check` holds for the target's state.
    async fn wait_state(
        checker: &HealthChecker,
        t: &Target,
        what: &str,
        check: impl Fn(&TargetState) -> bool,
    ) {
        let start = StdInstant::now();
        loop {
            let state = checker.states().get(t).cloned();
            if state.as_ref().is_some_and(&check) {
                return;
            }
            if start.elapsed() > Duration::from_secs(1) {
                panic!("{what}: state still {state:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn checker_reports_down_and_up_transitions() {
        let (l, addr) = listener().await;
        let (server, _) = serve(l, OK_WEB1);
        let cfg = config(vec![service(
            "www",
            Some(fast(http("/", 200, Some("web1")))),
            vec![backend("web1", addr, None)],
        )]);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let checker = HealthChecker::spawn(&cfg, tx);
        let web1 = target("www", addr);

        // Starts up, before any probe.
        let initial = checker.states();
        assert_eq!(initial.keys().collect::<Vec<_>>(), [&web1]);
        assert_eq!(initial[&web1].health, Health::Up);
        wait_state(&checker, &web1, "first probe passes", |s| {
            s.health == Health::Up && s.last_check.as_deref() == Some("ok")
        })
        .await;

        // Stop the server: the port is closed, probes are refused.
        server.abort();
        let _ = server.await;
        let down = next(&mut rx, Duration::from_secs(1)).await;
        assert_eq!(
            (&down.target, down.health),
            (&web1, Health::Down),
            "{down:?}"
        );
        assert_eq!(
            down.reason,
            format!("2 consecutive failures: connect {addr}: connection refused")
        );
        let state = &checker.states()[&web1];
        assert_eq!(state.health, Health::Down);
        assert!(state.consecutive >= 2, "{state:?}");

        // A server on the same port again: back up after two passes.
        let l = match TcpListener::bind(addr).await {
            Ok(l) => l,
            Err(e) => panic!("rebind {addr}: {e}"),
        };
        let (_server, _) = serve(l, OK_WEB1);
        let up = next(&mut rx, Duration::from_secs(1)).await;
        assert_eq!(
            (&up.target, up.health, up.reason.as_str()),
            (&web1, Health::Up, "2 consecutive successes")
        );
        assert!(checker.is_current(&up));
        wait_state(&checker, &web1, "up after rise", |s| {
            s.health == Health::Up && s.consecutive >= 2
        })
        .await;

        // Dropping the checker stops the probes (and with them the senders).
        drop(checker);
        assert_eq!(
            tokio::time::timeout(Duration::from_secs(1), rx.recv()).await,
            Ok(None)
        );
    }

    #[tokio::test]
    async fn only_backends_with_a_check_are_checked_with_their_own_check() {
        let (_up_listener, up_addr) = listener().await;
        let down_addr = closed_port().await;
        let tcp = HealthCheck {
            fall: 1,
            ..fast(CheckKind::Tcp)
        };
        let cfg = config(vec![
            // The service's check applies to a; b overrides it.
            service(
                "checked",
                Some(tcp.clone()),
                vec![
                    backend("a", up_addr, None),
                    backend("b", down_addr, Some(tcp.clone())),
                ],
            ),
            // Only c has a check (its own); d has none.
            service(
                "partial",
                None,
                vec![
                    backend("c", down_addr, Some(tcp)),
                    backend("d", down_addr, None),
                ],
            ),
            service("unchecked", None, vec![backend("e", down_addr, None)]),
        ]);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let checker = HealthChecker::spawn(&cfg, tx);
        assert_eq!(
            checker.states().into_keys().collect::<Vec<_>>(),
            [
                target("checked", up_addr),
                target("checked", down_addr),
                target("partial", down_addr)
            ]
        );
        let mut down = [
            next(&mut rx, Duration::from_secs(1)).await,
            next(&mut rx, Duration::from_secs(1)).await,
        ];
        down.sort_by(|x, y| x.target.cmp(&y.target));
        assert_eq!(
            down.iter()
                .map(|t| (&t.target, t.health, t.reason.as_str()))
                .collect::<Vec<_>>(),
            [
                (
                    &target("checked", down_addr),
                    Health::Down,
                    format!("1 consecutive failure: connect {down_addr}: connection refused")
                        .as_str()
                ),
                (
                    &target("partial", down_addr),
                    Health::Down,
                    format!("1 consecutive failure: connect {down_addr}: connection refused")
                        .as_str()
                ),
            ]
        );
        wait_state(&checker, &target("checked", up_addr), "a passes", |s| {
            s.health == Health::Up && s.last_check.as_deref() == Some("ok")
        })
        .await;
    }

    #[tokio::test]
    async fn sync_keeps_unchanged_checks_and_seeds_new_ones_from_the_agent() {
        let (_l, up_addr) = listener().await;
        let down_addr = closed_port().await;
        let tcp = HealthCheck {
            fall: 1,
            rise: 1,
            ..fast(CheckKind::Tcp)
        };
        let one = config(vec![service(
            "www",
            Some(tcp.clone()),
            vec![backend("down", down_addr, None)],
        )]);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut checker = HealthChecker::new(tx);
        checker.sync(&one, &|_| Health::Up);
        let down = next(&mut rx, Duration::from_secs(1)).await;
        assert_eq!(down.health, Health::Down);
        assert!(checker.is_current(&down));

        // The same backend plus a new one: the first check keeps running
        // (no new transition, its state stays down), the new one starts
        // in the state the agent gives it and rises on its own.
        let two = config(vec![service(
            "www",
            Some(tcp.clone()),
            vec![
                backend("down", down_addr, None),
                backend("new", up_addr, None),
            ],
        )]);
        checker.sync(&two, &|t| {
            assert_eq!(t.address, up_addr, "only the new target is seeded");
            Health::Pending
        });
        assert!(checker.is_current(&down), "unchanged check kept");
        let up = next(&mut rx, Duration::from_secs(1)).await;
        assert_eq!((up.target.address, up.health), (up_addr, Health::Up));
        assert_eq!(
            checker.states()[&target("www", down_addr)].health,
            Health::Down
        );

        // A changed check restarts from the agent's state; the old one's
        // transitions become stale.
        let slower = HealthCheck {
            interval: Duration::from_millis(150),
            ..tcp
        };
        let three = config(vec![service(
            "www",
            Some(slower),
            vec![backend("down", down_addr, None)],
        )]);
        checker.sync(&three, &|_| Health::Down);
        assert!(!checker.is_current(&down), "replaced check is stale");
        assert_eq!(
            checker.states().into_keys().collect::<Vec<_>>(),
            [target("www", down_addr)],
            "the removed backend's check stopped"
        );
        assert_eq!(
            checker.states()[&target("www", down_addr)].health,
            Health::Down
        );
    }
}
