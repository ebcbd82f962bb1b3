//! The control socket: how `lb status`, `lb backend …` and `lb reload` talk
//! to a running agent. A unix socket (mode 0600, root only), one JSON
//! request line in, one JSON response line out.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use crate::{
    config::{Forwarding, Protocol, Scheduler},
    health::Health,
};

/// Where `lb run` listens unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/lb/lb.sock";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    Status,
    Reload,
    Backend(BackendChange),
    /// `lb firewall …`: change the firewall rules live, or show them.
    Firewall(FirewallChange),
    /// `lb explain`: which service and backend a flow gets, and why. The
    /// answer is the response's message.
    /// `lb db …`: database pools (promotion).
    Db(crate::db::DbCommand),
    Explain {
        /// The client's address and source port, e.g. 198.18.0.2:40000.
        client: String,
        /// VIP:PORT/PROTO, e.g. 198.18.0.10:80/tcp.
        service: String,
    },
    /// `lb vip withdraw|announce [VIP]`: take VIPs out of this LB's BGP
    /// announcement (maintenance), or give them back.
    Vip(VipChange),
}

/// `lb vip …`: the operator's side of `[announce]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, clap::Subcommand)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum VipChange {
    /// Stop announcing VIP (or, without one, every VIP: drain this LB).
    /// Routers move new flows to the other LBs; established flows of a
    /// consistent-hash service follow to the same backends.
    Withdraw { vip: Option<std::net::Ipv4Addr> },
    /// Announce VIP (or every VIP) again, as far as its backends allow.
    Announce { vip: Option<std::net::Ipv4Addr> },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, clap::Subcommand)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum BackendChange {
    /// Add a backend to a service (validated with the whole service first)
    Add {
        service: String,
        backend: String,
        /// IPv4 address and port, e.g. 198.19.0.14:80
        #[arg(long)]
        address: String,
        #[arg(long, default_value_t = 1)]
        weight: u32,
        /// Only takes traffic while every non-backup backend is down
        #[arg(long)]
        backup: bool,
    },
    /// Remove a backend; flows still pinned to it are dropped
    Remove { service: String, backend: String },
    /// Put a disabled or drained backend back into rotation
    Enable { service: String, backend: String },
    /// Take a backend out of rotation and drop its flows at once
    Disable { service: String, backend: String },
    /// No new flows; established flows continue until they end
    Drain {
        service: String,
        backend: String,
        /// Then wait until the backend holds no active flow (prints the
        /// count as it falls); fails after --timeout seconds
        #[arg(long)]
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        wait: bool,
        /// Seconds --wait waits at most
        #[arg(long, default_value_t = 300, requires = "wait")]
        #[serde(default, skip)]
        timeout: u64,
    },
    /// Change a backend's weight (weighted-round-robin services; 0 drains)
    Weight {
        service: String,
        backend: String,
        weight: u32,
    },
    /// Drop the runtime changes of a service (or one of its backends): it
    /// runs as the config file says again
    Reset {
        service: String,
        backend: Option<String>,
    },
}

/// `lb firewall …`. Changes are validated with the rules of the config
/// file and applied whole; they are kept in the state file (restarts and
/// reloads keep them) until `lb firewall reset`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, clap::Subcommand)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum FirewallChange {
    /// Deny new flows from a source prefix (to every VIP, or one service's)
    Deny {
        #[command(subcommand)]
        edit: RuleEdit,
    },
    /// Allow lists: with one, every other source is denied
    Allow {
        #[command(subcommand)]
        edit: RuleEdit,
    },
    /// Every rule, its scope and how many new flows it decided
    Show,
    /// Drop every runtime change of the rules: the config file's apply again
    Reset,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, clap::Subcommand)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum RuleEdit {
    /// Add a prefix (e.g. 203.0.113.0/24) to the list
    Add {
        prefix: String,
        /// The service's list (allow-from/deny-from) instead of [firewall]'s
        #[arg(long)]
        service: Option<String>,
    },
    /// Remove a prefix from the list
    Remove {
        prefix: String,
        #[arg(long)]
        service: Option<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
}

impl Response {
    pub fn ok(message: impl Into<String>) -> Self {
        Response {
            ok: true,
            message: message.into(),
            status: None,
        }
    }

    pub fn error(message: impl Into<String>) -> Self {
        Response {
            ok: false,
            message: message.into(),
            status: None,
        }
    }

    /// The agent refused the client before reading its request: every
    /// client slot is taken. The request was not seen; sending it again
    /// is safe whatever it was.
    pub fn busy(why: impl std::fmt::Display) -> Self {
        Response::error(format!("{BUSY_PREFIX}{why}; retry"))
    }

    pub fn is_busy(&self) -> bool {
        !self.ok && self.message.starts_with(BUSY_PREFIX)
    }
}

/// How a [`Response::busy`] message starts.
const BUSY_PREFIX: &str = "busy: ";

/// What an operator set with `lb backend` (kept in the state file until
/// `lb backend enable` or `lb backend reset`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, strum::Display, strum::IntoStaticStr,
)]
#[serde(rename_all = "kebab-case")]
#[strum(serialize_all = "kebab-case")]
pub enum AdminState {
    Enabled,
    Drain,
    Disabled,
}

/// A backend's health as `lb status` shows it: its checks' verdict, or
/// `unchecked` for a backend without a check (always serving).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, strum::Display, strum::IntoStaticStr,
)]
#[serde(rename_all = "kebab-case")]
#[strum(serialize_all = "kebab-case")]
pub enum HealthStatus {
    Up,
    Down,
    Pending,
    Unchecked,
}

/// A pool member's place in one of its pool's services (`[[pool]]`): the
/// service routes to it, or it stands by — a healthy replica under the
/// write service, the primary under the read service — which is normal
/// operation, not a failure.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, strum::Display, strum::IntoStaticStr,
)]
#[serde(rename_all = "kebab-case")]
#[strum(serialize_all = "kebab-case")]
pub enum PoolRole {
    Routed,
    Standby,
}

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

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub config: String,
    /// The bpffs directory holding the pinned data plane.
    pub pin_dir: Option<String>,
    /// True when this agent adopted a data plane left by a previous one.
    pub adopted: bool,
    pub interfaces: Vec<String>,
    pub services: Vec<ServiceStatus>,
    /// Packets per verdict of the XDP program, since it was first loaded.
    pub verdicts: BTreeMap<String, u64>,
    /// The agent itself: version, config generation, last reload.
    #[serde(default)]
    pub agent: AgentStatus,
    /// How full the connection table is.
    #[serde(default)]
    pub conntrack: ConntrackStatus,
    /// Database pools: members, roles, lag, where writes and reads go.
    #[serde(default)]
    pub pools: Vec<crate::db::PoolStatus>,
    /// `[announce]`: which VIPs this LB announces and what BIRD reports;
    /// `None` without `[announce]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub announce: Option<AnnounceStatus>,
    /// Runtime changes (`lb backend …`, `lb firewall …`) kept in the state
    /// file and applied over the config.
    #[serde(default)]
    pub runtime: RuntimeStatus,
}

/// The runtime changes that outlive the agent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeStatus {
    /// The state file.
    pub file: String,
    /// One line per change (`lb backend reset` drops a service's).
    pub changes: Vec<String>,
    /// The last failure to read, apply or write the state file.
    pub error: Option<String>,
}

/// The BGP announcement of this LB's VIPs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnnounceStatus {
    /// BIRD's control socket.
    pub bird_socket: String,
    /// The include file the agent writes.
    pub include: String,
    pub med: u32,
    /// Every VIP: announced or not, and why.
    pub vips: Vec<crate::announce::VipPlan>,
    /// BIRD's protocols and what each BGP session exports, as of the last
    /// look (every second); `None` until BIRD answered once.
    pub bird: Option<crate::announce::BirdView>,
    /// The last failure to write the include file or reach BIRD, if the
    /// last attempt failed (it is retried every second).
    pub error: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentStatus {
    /// The `lb` version running.
    pub version: String,
    /// When this agent started, in milliseconds since the Unix epoch.
    pub started_at_ms: u64,
    /// Config generation: 1 at start, one more for every reload or
    /// `lb backend` change that was applied.
    pub generation: u64,
    /// The latest reload (SIGHUP or `lb reload`), if any.
    pub last_reload: Option<ReloadStatus>,
    /// Health probes that could not run for a reason of the agent's own
    /// (out of descriptors, buffers, memory) since it started: the agent's
    /// errors, never counted against a backend.
    #[serde(default)]
    pub probe_agent_errors: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadStatus {
    pub ok: bool,
    /// When it happened, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// "reloaded FILE" or why it was rejected.
    pub message: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConntrackStatus {
    /// Flows in the connection table (counted with the flows per backend).
    pub entries: u64,
    /// Its size (`conntrack-size`).
    pub capacity: u32,
    /// The half-open table's size (`half-open-size`).
    #[serde(default)]
    pub half_open_capacity: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub name: String,
    pub vip: String,
    pub protocol: Protocol,
    pub forwarding: Forwarding,
    pub scheduler: Scheduler,
    pub packets: u64,
    pub bytes: u64,
    pub backends: Vec<BackendStatus>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendStatus {
    pub name: String,
    pub address: String,
    pub weight: u32,
    pub backup: bool,
    /// Set with `lb backend`.
    pub admin: AdminState,
    /// From the health checks; for a pool's member, whether it answers its
    /// MySQL check (its role decides the ring, see `pool_role`).
    pub health: HealthStatus,
    /// A pool service's member: routed or standing by for this service.
    /// `None` for a backend of an ordinary service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool_role: Option<PoolRole>,
    /// Result of the last health check, if any.
    pub last_check: Option<String>,
    /// When the last health check finished (ms since the Unix epoch).
    #[serde(default)]
    pub last_check_at_ms: Option<u64>,
    /// How long the last health check took, in microseconds.
    #[serde(default)]
    pub last_check_us: Option<u64>,
    /// Whether new flows can go to it now.
    pub in_ring: bool,
    /// Flows pinned to it in the flow tables (established and half-open,
    /// closing included, until they expire).
    pub flows: u64,
    /// Established flows that have not closed (no FIN/RST, not expired):
    /// exact, kept by the data plane. A drain is done when it is 0.
    #[serde(default)]
    pub active: u64,
    pub packets: u64,
    pub bytes: u64,
    /// What runtime changes set on it (e.g. "drain", "weight 5 (file: 1)"),
    /// kept in the state file; `None`: it runs as the config file says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<String>,
    /// Its `max-connections` (its own or the service's); `None`: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// Holding its `max-connections` active flows: out of the ring for new
    /// flows until it is below.
    #[serde(default)]
    pub at_limit: bool,
    /// Slow start: while it ramps, its effective weight as a percentage of
    /// `weight`; `None`: full weight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slow_start_percent: Option<u32>,
    /// `check = "tls"`: when its certificate expires (seconds since the
    /// Unix epoch), as of the last passed probe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_cert_expiry: Option<i64>,
}

impl BackendStatus {
    /// The weight the rings give it now: `weight`, or less while slow
    /// start ramps it.
    pub fn effective_weight(&self) -> f64 {
        f64::from(self.weight) * f64::from(self.slow_start_percent.unwrap_or(100)) / 100.0
    }
}

impl BackendStatus {
    /// What `lb status` and the status page show as its role: a pool
    /// member's place in this service (`routed`, `standby`), else
    /// `primary` or `backup`.
    pub fn role(&self) -> &'static str {
        match self.pool_role {
            Some(role) => role.into(),
            None if self.backup => "backup",
            None => "primary",
        }
    }
}

/// The ring rule, checked against a status: a backend is in its service's
/// ring if and only if it is enabled, up (or unchecked) — a pool's member:
/// routed — has a weight, is below its `max-connections`, and is a primary
/// — or a backup while no primary qualifies. Returns one line per backend
/// that breaks it (empty: the rings are derived from state).
pub fn ring_violations(status: &Status) -> Vec<String> {
    let mut out = Vec::new();
    for s in &status.services {
        let eligible = |b: &BackendStatus| {
            let serving = match b.pool_role {
                Some(role) => role == PoolRole::Routed,
                None => matches!(b.health, HealthStatus::Up | HealthStatus::Unchecked),
            };
            b.admin == AdminState::Enabled && serving && b.weight > 0 && !b.at_limit
        };
        let any_primary = s.backends.iter().any(|b| !b.backup && eligible(b));
        for b in &s.backends {
            let expected = eligible(b) && b.backup != any_primary;
            if b.in_ring != expected {
                out.push(format!(
                    "{}/{}: in ring {} but admin {}, health {}, weight {}, {}{}",
                    s.name,
                    b.name,
                    b.in_ring,
                    b.admin,
                    b.health,
                    b.weight,
                    b.role(),
                    if b.at_limit {
                        ", at max-connections"
                    } else {
                        ""
                    }
                ));
            }
        }
    }
    out
}

/// How long a CLI command waits for the agent, retries included.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);
/// The pause between attempts while the agent is busy.
const BUSY_RETRY: Duration = Duration::from_millis(250);

/// Sends one request to the agent at `socket` and returns its response.
/// While the agent is busy (every client slot taken, e.g. by clients that
/// connect and say nothing) it says so once on stderr and tries again,
/// within [`CLIENT_TIMEOUT`] in all.
pub fn request(socket: &Path, req: &Request) -> anyhow::Result<Response> {
    let started = Instant::now();
    let mut said = false;
    loop {
        let left = CLIENT_TIMEOUT.saturating_sub(started.elapsed());
        match attempt(socket, req, left)? {
            Attempt::Answered(response) => return Ok(*response),
            Attempt::Busy(why) => {
                if left <= BUSY_RETRY {
                    bail!(
                        "the agent at {} stayed busy for {} s: {why}",
                        socket.display(),
                        CLIENT_TIMEOUT.as_secs()
                    );
                }
                if !said {
                    eprintln!(
                        "lb: the agent is busy, retrying (for up to {} s): {why}",
                        CLIENT_TIMEOUT.as_secs()
                    );
                    said = true;
                }
                std::thread::sleep(BUSY_RETRY);
            }
        }
    }
}

enum Attempt {
    Answered(Box<Response>),
    /// Refused before the request was read: safe to send again.
    Busy(String),
}

/// One connection, one request, within `left`.
fn attempt(socket: &Path, req: &Request, left: Duration) -> anyhow::Result<Attempt> {
    use std::io::ErrorKind;
    let mut stream = match UnixStream::connect(socket) {
        Ok(stream) => stream,
        // The listen backlog is full: the agent has not even accepted.
        Err(e) if e.kind() == ErrorKind::WouldBlock => {
            return Ok(Attempt::Busy("its listen queue is full".to_owned()));
        }
        Err(e) => {
            return Err(e).with_context(|| {
                format!(
                    "connecting to the agent at {} (is `lb run` running? --socket)",
                    socket.display()
                )
            });
        }
    };
    let left = left.max(Duration::from_millis(1));
    stream
        .set_read_timeout(Some(left))
        .and_then(|()| stream.set_write_timeout(Some(left)))
        .context("socket timeout")?;
    let mut line = serde_json::to_string(req).context("encoding request")?;
    line.push('\n');
    // A busy agent may answer and close before the request is sent: the
    // write then fails (EPIPE), and the answer, if any, is still there.
    let sent = stream.write_all(line.as_bytes());
    let mut reply = String::new();
    let read = BufReader::new(stream).read_line(&mut reply);
    let closed_early = |e: &std::io::Error| {
        matches!(
            e.kind(),
            ErrorKind::BrokenPipe | ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted
        )
    };
    match (sent, read) {
        (_, Ok(_)) if !reply.is_empty() => {
            let response: Response = serde_json::from_str(&reply)
                .with_context(|| format!("decoding the agent's reply {reply:?}"))?;
            Ok(if response.is_busy() {
                Attempt::Busy(response.message)
            } else {
                Attempt::Answered(Box::new(response))
            })
        }
        // Closed on us before the request was read: refused, not failed.
        (Err(e), _) if closed_early(&e) => {
            Ok(Attempt::Busy(format!("it closed the connection ({e})")))
        }
        (Err(e), _) => Err(e).context("sending request"),
        (Ok(()), Err(e))
            if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut =>
        {
            Err(e).with_context(|| {
                format!(
                    "no reply from the agent within {} s",
                    CLIENT_TIMEOUT.as_secs()
                )
            })
        }
        (Ok(()), Err(e)) => Err(e).context("reading the agent's reply"),
        (Ok(()), Ok(_)) => bail!("the agent closed the connection without answering"),
    }
}

/// `lb status` as a table an operator can read at a glance.
pub fn render(status: &Status) -> String {
    let mut out = format!(
        "config {}  interfaces {}  pinned {}{}\nconntrack {}/{} flows  config generation {}\n",
        status.config,
        status.interfaces.join(","),
        status.pin_dir.as_deref().unwrap_or("no"),
        if status.adopted {
            " (adopted from a previous agent)"
        } else {
            ""
        },
        status.conntrack.entries,
        status.conntrack.capacity,
        status.agent.generation,
    );
    for s in &status.services {
        out.push_str(&format!(
            "\nservice {} {} {} {} {}  {} pkts {} bytes\n",
            s.name, s.vip, s.protocol, s.forwarding, s.scheduler, s.packets, s.bytes
        ));
        out.push_str(&format!(
            "  {:<12} {:<22} {:>6} {:<8} {:<9} {:<9} {:<5} {:>7} {:>7} {:>10}  {}\n",
            "backend",
            "address",
            "weight",
            "role",
            "admin",
            "health",
            "ring",
            "active",
            "flows",
            "packets",
            "last check"
        ));
        for b in &s.backends {
            out.push_str(&format!(
                "  {:<12} {:<22} {:>6} {:<8} {:<9} {:<9} {:<5} {:>7} {:>7} {:>10}  {}\n",
                b.name,
                b.address,
                b.weight,
                b.role(),
                b.admin,
                b.health,
                // "full": out of the ring at its max-connections.
                match (b.in_ring, b.at_limit) {
                    (true, _) => "yes",
                    (false, true) => "full",
                    (false, false) => "no",
                },
                b.active,
                b.flows,
                b.packets,
                b.last_check.as_deref().unwrap_or("-")
            ));
        }
    }
    if !status.pools.is_empty() {
        out.push('\n');
        out.push_str(&crate::db::render(&status.pools));
    }
    if let Some(a) = &status.announce {
        out.push_str(&render_announce(a));
    }
    out.push_str(&render_slow_start(status));
    out.push_str(&render_runtime(&status.runtime));
    let verdicts: Vec<String> = status
        .verdicts
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(k, n)| format!("{k}={n}"))
        .collect();
    out.push_str(&format!(
        "\nverdicts: {}\n",
        if verdicts.is_empty() {
            "none yet".into()
        } else {
            verdicts.join(" ")
        }
    ));
    out
}

/// `lb status`'s slow-start lines: the backends ramping their weight.
fn render_slow_start(status: &Status) -> String {
    let ramps: Vec<String> = status
        .services
        .iter()
        .flat_map(|s| {
            s.backends.iter().filter_map(move |b| {
                b.slow_start_percent.map(|p| {
                    format!(
                        "  {}/{}: {p} % of weight {} (effective {:.2})\n",
                        s.name,
                        b.name,
                        b.weight,
                        b.effective_weight()
                    )
                })
            })
        })
        .collect();
    if ramps.is_empty() {
        return String::new();
    }
    format!("\nslow start (weight ramping up)\n{}", ramps.concat())
}

/// `lb status`'s runtime changes: which entries differ from the file.
fn render_runtime(r: &RuntimeStatus) -> String {
    let mut out = String::new();
    if !r.changes.is_empty() {
        out.push_str(&format!(
            "\nruntime changes (kept in {}; `lb backend reset SERVICE [NAME]` drops them)\n",
            r.file
        ));
        for c in &r.changes {
            out.push_str(&format!("  {c}\n"));
        }
    }
    if let Some(e) = &r.error {
        out.push_str(&format!("\nruntime state: {e}\n"));
    }
    out
}

/// `lb status`'s announcement lines: each VIP, then BIRD's sessions.
fn render_announce(a: &AnnounceStatus) -> String {
    let mut out = format!(
        "\nannounce via BIRD {} (include {}, med {})\n",
        a.bird_socket, a.include, a.med
    );
    for v in &a.vips {
        out.push_str(&format!(
            "  {:<16} {:<13} {}\n",
            v.vip,
            if v.announced {
                "announced"
            } else {
                "not announced"
            },
            v.reason
        ));
    }
    match &a.bird {
        None => out.push_str("  BIRD: no answer yet\n"),
        Some(view) => {
            for p in view
                .protocols
                .iter()
                .filter(|p| p.proto == "BGP" || p.proto == "BFD")
            {
                let exported = view
                    .exported
                    .get(&p.name)
                    .map(|e| format!("  exports [{}]", e.join(" ")))
                    .unwrap_or_default();
                out.push_str(&format!(
                    "  BIRD {} {} {} {}{}\n",
                    p.proto, p.name, p.state, p.info, exported
                ));
            }
        }
    }
    if let Some(e) = &a.error {
        out.push_str(&format!("  last error: {e}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_as_one_json_line() {
        let reqs = [
            Request::Status,
            Request::Reload,
            Request::Backend(BackendChange::Drain {
                service: "www".into(),
                backend: "web1".into(),
                wait: false,
                timeout: 0,
            }),
            Request::Backend(BackendChange::Add {
                service: "www".into(),
                backend: "web4".into(),
                address: "198.19.0.14:80".into(),
                weight: 2,
                backup: true,
            }),
            Request::Explain {
                client: "198.18.0.2:40000".into(),
                service: "198.18.0.10:80/tcp".into(),
            },
        ];
        for r in reqs {
            let line = serde_json::to_string(&r).expect("encode");
            assert!(!line.contains('\n'));
            assert_eq!(serde_json::from_str::<Request>(&line).expect("decode"), r);
        }
        let drain = serde_json::to_string(&Request::Backend(BackendChange::Drain {
            service: "www".into(),
            backend: "web1".into(),
            wait: false,
            timeout: 0,
        }))
        .expect("encode");
        assert_eq!(
            drain,
            r#"{"op":"backend","action":"drain","service":"www","backend":"web1"}"#
        );
    }

    #[test]
    fn render_shows_every_backend_and_state() {
        let status = Status {
            config: "c.toml".into(),
            pin_dir: Some("/sys/fs/bpf/lb".into()),
            adopted: true,
            interfaces: vec!["lb-front".into()],
            services: vec![ServiceStatus {
                name: "www".into(),
                vip: "198.18.0.10:80".into(),
                protocol: Protocol::Tcp,
                forwarding: Forwarding::Nat,
                scheduler: Scheduler::RoundRobin,
                packets: 10,
                bytes: 1000,
                backends: vec![BackendStatus {
                    name: "web1".into(),
                    address: "198.19.0.11:80".into(),
                    weight: 1,
                    backup: false,
                    admin: AdminState::Drain,
                    health: HealthStatus::Down,
                    pool_role: None,
                    last_check: Some("connection refused".into()),
                    last_check_at_ms: None,
                    last_check_us: None,
                    in_ring: false,
                    flows: 3,
                    active: 3,
                    packets: 7,
                    bytes: 700,
                    runtime: Some("drain".into()),
                    max_connections: None,
                    at_limit: false,
                    slow_start_percent: Some(40),
                    tls_cert_expiry: None,
                }],
            }],
            verdicts: BTreeMap::from([("forwarded".into(), 10), ("drop_fragment".into(), 0)]),
            agent: AgentStatus::default(),
            conntrack: ConntrackStatus {
                entries: 3,
                capacity: 1024,
                half_open_capacity: 1024,
            },
            pools: Vec::new(),
            announce: None,
            runtime: RuntimeStatus {
                file: "lb.state.toml".into(),
                changes: vec!["www/web1: drain".into()],
                error: None,
            },
        };
        let text = render(&status);
        for want in [
            "adopted",
            "conntrack 3/1024 flows",
            "web1",
            "198.19.0.11:80",
            "drain",
            "down",
            "connection refused",
            "forwarded=10",
            "runtime changes (kept in lb.state.toml",
            "  www/web1: drain",
            "slow start (weight ramping up)\n  www/web1: 40 % of weight 1 (effective 0.40)",
        ] {
            assert!(text.contains(want), "{want} missing from\n{text}");
        }
        assert!(!text.contains("drop_fragment"), "zero verdicts are hidden");
        // The columns README lists, active flows among them.
        let header = text
            .lines()
            .find(|l| l.trim_start().starts_with("backend"))
            .expect("a backend header");
        let columns: Vec<&str> = header.split_whitespace().collect();
        assert_eq!(
            columns,
            [
                "backend", "address", "weight", "role", "admin", "health", "ring", "active",
                "flows", "packets", "last", "check"
            ]
        );
        // web1 drains and is out of the ring: the rule holds.
        assert_eq!(ring_violations(&status), Vec::<String>::new());
    }

    #[test]
    fn ring_rule_flags_stale_rings() {
        use HealthStatus::{Down, Pending, Unchecked, Up};
        let backend = |name: &str, backup: bool, health, in_ring: bool| BackendStatus {
            name: name.into(),
            address: "198.19.0.11:80".into(),
            weight: 1,
            backup,
            admin: AdminState::Enabled,
            health,
            pool_role: None,
            last_check: None,
            last_check_at_ms: None,
            last_check_us: None,
            in_ring,
            flows: 0,
            active: 0,
            packets: 0,
            bytes: 0,
            runtime: None,
            max_connections: None,
            at_limit: false,
            slow_start_percent: None,
            tls_cert_expiry: None,
        };
        let status = |backends| Status {
            config: String::new(),
            pin_dir: None,
            adopted: false,
            interfaces: Vec::new(),
            services: vec![ServiceStatus {
                name: "www".into(),
                vip: String::new(),
                protocol: Protocol::Tcp,
                forwarding: Forwarding::Nat,
                scheduler: Scheduler::RoundRobin,
                packets: 0,
                bytes: 0,
                backends,
            }],
            verdicts: BTreeMap::new(),
            agent: AgentStatus::default(),
            conntrack: ConntrackStatus::default(),
            pools: Vec::new(),
            announce: None,
            runtime: RuntimeStatus::default(),
        };
        // Up but out of the ring (issue 8's stranded backend): flagged.
        let stranded = status(vec![
            backend("web1", false, Up, true),
            backend("web2", false, Up, false),
        ]);
        assert_eq!(ring_violations(&stranded).len(), 1);
        // Backups only while no primary qualifies.
        let fine = status(vec![
            backend("web1", false, Down, false),
            backend("web2", false, Pending, false),
            backend("web3", true, Up, true),
        ]);
        assert_eq!(ring_violations(&fine), Vec::<String>::new());
        let backup_too_early = status(vec![
            backend("web1", false, Unchecked, true),
            backend("web3", true, Up, true),
        ]);
        assert_eq!(ring_violations(&backup_too_early).len(), 1);
        // A pool's members: the role decides the ring, not the health. A
        // healthy standby out of the ring is normal; a routed member out of
        // it, or a standby in it, is not.
        let member = |name: &str, role, in_ring: bool| BackendStatus {
            pool_role: Some(role),
            ..backend(name, false, Up, in_ring)
        };
        let pool = status(vec![
            member("db1", PoolRole::Routed, true),
            member("db2", PoolRole::Standby, false),
        ]);
        assert_eq!(ring_violations(&pool), Vec::<String>::new());
        let stale = status(vec![
            member("db1", PoolRole::Routed, false),
            member("db2", PoolRole::Standby, true),
        ]);
        assert_eq!(ring_violations(&stale).len(), 2);
    }

    #[test]
    fn pool_members_show_their_role_not_a_failure() {
        let member = |name: &str, role| BackendStatus {
            name: name.into(),
            address: "198.19.1.21:3306".into(),
            weight: 1,
            backup: false,
            admin: AdminState::Enabled,
            health: HealthStatus::Up,
            pool_role: Some(role),
            last_check: Some("ok".into()),
            last_check_at_ms: None,
            last_check_us: None,
            in_ring: role == PoolRole::Routed,
            flows: 0,
            active: 0,
            packets: 0,
            bytes: 0,
            runtime: None,
            max_connections: None,
            at_limit: false,
            slow_start_percent: None,
            tls_cert_expiry: None,
        };
        let status = Status {
            config: String::new(),
            pin_dir: None,
            adopted: false,
            interfaces: Vec::new(),
            services: vec![ServiceStatus {
                name: "db-write".into(),
                vip: "198.18.0.20:3306".into(),
                protocol: Protocol::Tcp,
                forwarding: Forwarding::Nat,
                scheduler: Scheduler::RoundRobin,
                packets: 0,
                bytes: 0,
                backends: vec![
                    member("db1", PoolRole::Routed),
                    member("db2", PoolRole::Standby),
                ],
            }],
            runtime: RuntimeStatus::default(),
            verdicts: BTreeMap::new(),
            agent: AgentStatus::default(),
            conntrack: ConntrackStatus::default(),
            pools: Vec::new(),
            announce: None,
        };
        let text = render(&status);
        let row = |name: &str| {
            text.lines()
                .find(|l| l.trim_start().starts_with(name))
                .unwrap_or_else(|| panic!("no row {name} in\n{text}"))
                .split_whitespace()
                .collect::<Vec<_>>()
        };
        // name address weight role admin health ring active flows packets check
        assert_eq!(row("db1")[3..7], ["routed", "enabled", "up", "yes"]);
        assert_eq!(row("db2")[3..7], ["standby", "enabled", "up", "no"]);
        assert_eq!(row("db2")[10], "ok", "a member's last check is shown");
        let json = serde_json::to_value(&status).expect("json");
        assert_eq!(
            json["services"][0]["backends"][1]["pool_role"],
            serde_json::json!("standby")
        );
        assert_eq!(
            json["services"][0]["backends"][1]["health"],
            serde_json::json!("up")
        );
    }
}
