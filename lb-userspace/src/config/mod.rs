//! The TOML config: the validated model ([`Config`] and its parts), and
//! [`load`], [`parse`] and [`check`], which accept a config whole or reject
//! it whole. This folder owns everything about the config file: the raw TOML
//! mirror (`raw`), the validator and its field rules (`validate`), the
//! duration syntax ([`duration`]) and locating TOML errors (`keypath`).
//!
//! Every error names the file, the key (e.g. `service[1].backends[2].address`)
//! and the reason.

mod coordination;
pub mod duration;
mod keypath;
mod pool;
mod raw;
mod validate;

use std::{
    fmt,
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

pub use coordination::{ClientCert, Coordination, EtcdLogin, EtcdTls, KeyDer};
pub use pool::{Pool, PoolMember};
use raw::RawConfig;
use validate::Validator;

/// The config spelling of an enum value (`"weighted-round-robin"`), from
/// the same rename rule serde parses it with.
macro_rules! config_name {
    ($($t:ty),*) => {$(
        impl $t {
            pub fn name(self) -> &'static str {
                self.into()
            }
        }
    )*};
}
config_name!(Forwarding, XdpMode, Protocol, Scheduler);

/// A validated config.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub dataplane: Dataplane,
    /// The HTTP listener for `/metrics`, the status page and
    /// `/status.json`; `None`: off.
    pub monitoring: Option<Monitoring>,
    /// `[firewall]`: the rules for every VIP (empty: none).
    pub firewall: Firewall,
    /// `[announce]`: the BIRD this LB announces its VIPs through; `None`:
    /// the agent announces nothing (a single LB, or routes made by hand).
    pub announce: Option<Announce>,
    /// `[coordination]`: the etcd cluster the LBs running the same pools
    /// agree through; `None`: this LB decides alone.
    pub coordination: Option<Coordination>,
    /// Every service, a pool's write and read services included (after the
    /// `[[service]]` ones).
    pub services: Vec<Service>,
    /// `[[pool]]`: database pools, whose members feed their services by role.
    pub pools: Vec<Pool>,
}

/// `[announce]`: announcing the VIPs to routers over BGP through a BIRD 2
/// daemon of this host. The agent writes `include` (a `protocol static
/// lb_vips` of /32 routes, one per VIP it may announce) and asks BIRD to
/// reconfigure over `bird-socket`; BIRD's own config exports `lb_vips` to
/// the routers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announce {
    /// BIRD's control socket (`bird -s`).
    pub bird_socket: PathBuf,
    /// The file BIRD's config `include`s; the agent owns it.
    pub include: PathBuf,
    /// The BGP MED of the routes: equal MEDs share the traffic (ECMP), a
    /// higher one makes this LB the standby of those with a lower one.
    pub med: u32,
}

/// Firewall rules of one scope: `[firewall]` (every VIP) or one service's
/// `allow-from`, `deny-from` and `rate-limit`. They filter new flows to a
/// VIP only; the LB's own traffic is never filtered.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Firewall {
    /// Sources whose new flows are dropped. Deny wins over allow.
    pub deny: Vec<Prefix>,
    /// When not empty, the only sources whose new flows are accepted.
    pub allow: Vec<Prefix>,
    /// Per-source new-flow rate limit; `None`: none.
    pub rate_limit: Option<RateLimit>,
}

impl Firewall {
    pub fn is_empty(&self) -> bool {
        self.deny.is_empty() && self.allow.is_empty() && self.rate_limit.is_none()
    }
}

/// An IPv4 source prefix (CIDR) without host bits, e.g. 203.0.113.0/24.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Prefix {
    pub addr: Ipv4Addr,
    pub len: u8,
}

impl Prefix {
    /// Parses `A.B.C.D/LEN` (or a bare address, a /32); the reason when it
    /// is not one, or has host bits set.
    pub fn parse(text: &str) -> Result<Prefix, String> {
        let (addr_text, len_text) = text.split_once('/').unwrap_or((text, "32"));
        let (Ok(addr), Ok(len)) = (addr_text.parse::<Ipv4Addr>(), len_text.parse::<u8>()) else {
            return Err(format!(
                "expected an IPv4 prefix like \"203.0.113.0/24\", got {text:?}"
            ));
        };
        if len > 32 {
            return Err(format!(
                "prefix length must be between 0 and 32, got {len} in {text:?}"
            ));
        }
        let masked = Ipv4Addr::from(u32::from(addr) & Prefix::mask(len));
        if masked != addr {
            return Err(format!(
                "{text:?} has host bits set: did you mean \"{masked}/{len}\"?"
            ));
        }
        Ok(Prefix { addr, len })
    }

    /// The netmask of a prefix length, host order.
    pub fn mask(len: u8) -> u32 {
        if len == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(len))
        }
    }

    /// Does the prefix hold `ip`?
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & Prefix::mask(self.len) == u32::from(self.addr)
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// A per-source new-flow rate limit: a token bucket per source address (or
/// per prefix of length `per`) holding up to `burst` new flows, refilled at
/// `new_flows_per_second`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub new_flows_per_second: u32,
    pub burst: u32,
    /// Sources sharing a bucket: 32 per address, 24 per /24, …; 0 (`per =
    /// "all"`): one bucket for every source, an aggregate bound on the
    /// scope's new flows however their sources are spread.
    pub per: u8,
}

impl RateLimit {
    /// `per` as the config spells it: "address", "all" or "/N".
    pub fn per_text(&self) -> String {
        match self.per {
            32 => "address".to_owned(),
            0 => "all".to_owned(),
            n => format!("/{n}"),
        }
    }
}

/// `[monitoring]`: where the agent serves its metrics and status page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Monitoring {
    /// Address and port of the HTTP listener, e.g. 127.0.0.1:9100.
    pub listen: SocketAddrV4,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Dataplane {
    /// Interfaces the `lb` XDP program is attached to (front and back).
    pub interfaces: Vec<String>,
    /// Default forwarding mode for services that do not set one.
    pub forwarding: Forwarding,
    pub xdp_mode: XdpMode,
    /// Capacity of the established-flow table, in flows.
    pub conntrack_size: u32,
    /// Capacity of the half-open table, in flows.
    pub half_open_size: u32,
    /// New flows one CPU enters per second before new flows of DSR services
    /// with a hash scheduler go stateless; 0: no limit.
    pub new_flow_budget: u32,
    pub timeouts: Timeouts,
}

/// Idle timeouts of the flow table (`[dataplane.timeouts]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP, established.
    pub tcp: Duration,
    /// TCP after a FIN or RST.
    pub tcp_closing: Duration,
    /// TCP before the handshake completes.
    pub tcp_half_open: Duration,
    /// UDP.
    pub udp: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            tcp: Duration::from_secs(900),
            tcp_closing: Duration::from_secs(10),
            tcp_half_open: Duration::from_secs(30),
            udp: Duration::from_secs(60),
        }
    }
}

impl Dataplane {
    /// Does going from `old` to this need a restart of the agent? Everything
    /// but the flow timeouts and the budget does (attachment, modes, map
    /// sizes); those two are written live.
    pub fn needs_restart_from(&self, old: &Dataplane) -> bool {
        let fixed = |d: &Dataplane| Dataplane {
            timeouts: Timeouts::default(),
            new_flow_budget: 0,
            ..d.clone()
        };
        fixed(self) != fixed(old)
    }

    /// What the data plane's `FLOW_CONF` holds for these settings.
    pub fn flow_conf(&self) -> lb_common::FlowConf {
        use lb_common::flow::{Timeout, duration_ticks};
        let ticks = |d: Duration| duration_ticks(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        let mut timeouts = [0; lb_common::flow::TIMEOUT_COUNT];
        timeouts[Timeout::TcpHalfOpen as usize] = ticks(self.timeouts.tcp_half_open);
        timeouts[Timeout::Tcp as usize] = ticks(self.timeouts.tcp);
        timeouts[Timeout::TcpClosing as usize] = ticks(self.timeouts.tcp_closing);
        timeouts[Timeout::Udp as usize] = ticks(self.timeouts.udp);
        lb_common::FlowConf {
            timeouts,
            // A tick is 2^30 ns, a little over a second: the budget per tick
            // is the budget per second scaled up, so "per second" holds.
            new_flow_budget: u32::try_from(
                u64::from(self.new_flow_budget) * lb_common::flow::TICK_NS / 1_000_000_000,
            )
            .unwrap_or(u32::MAX),
            // The table's, not the config's: the data plane fills them in.
            half_open_slots: 0,
            half_open_seed: 0,
        }
    }
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, strum::IntoStaticStr, strum::Display,
)]
#[serde(rename_all = "kebab-case")]
#[strum(serialize_all = "kebab-case")]
pub enum Forwarding {
    Nat,
    Dsr,
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, strum::IntoStaticStr, strum::Display,
)]
#[serde(rename_all = "kebab-case")]
#[strum(serialize_all = "kebab-case")]
pub enum XdpMode {
    Native,
    Generic,
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, strum::IntoStaticStr, strum::Display,
)]
#[serde(rename_all = "kebab-case")]
#[strum(serialize_all = "kebab-case")]
pub enum Protocol {
    Tcp,
    Udp,
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, strum::IntoStaticStr, strum::Display,
)]
#[serde(rename_all = "kebab-case")]
#[strum(serialize_all = "kebab-case")]
pub enum Scheduler {
    /// Backends in turn (an atomic counter over the ring).
    RoundRobin,
    /// Smooth weighted sequence (nginx's), walked by the counter.
    WeightedRoundRobin,
    /// The 5-tuple's hash indexes a Maglev table: consistent hashing,
    /// deterministic from the config (two LBs choose alike).
    Maglev,
    /// The client address's hash indexes a Maglev table: client affinity.
    SourceIp,
    /// New flows in proportion to weight / (active flows + 1), from a ring
    /// the agent refreshes every second.
    LeastConnections,
    /// The 5-tuple's hash modulo the ring length (not consistent: a backend
    /// set change moves most flows).
    FlowHash,
}

impl Scheduler {
    /// Does this scheduler use a Maglev table (and `maglev-table-size`)?
    pub fn uses_maglev(self) -> bool {
        matches!(self, Scheduler::Maglev | Scheduler::SourceIp)
    }

    /// Do backend weights other than 0 and 1 mean something here?
    pub fn uses_weights(self) -> bool {
        !matches!(self, Scheduler::RoundRobin | Scheduler::FlowHash)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Service {
    pub name: String,
    pub vip: SocketAddrV4,
    pub protocol: Protocol,
    pub forwarding: Forwarding,
    pub scheduler: Scheduler,
    /// Slots of the Maglev table (prime; `maglev` and `source-ip` only).
    pub maglev_table_size: u32,
    pub health: Option<HealthCheck>,
    /// What happens to flows pinned to a backend that health checks mark down.
    pub on_backend_down: OnBackendDown,
    pub backends: Vec<Backend>,
    /// `allow-from`, `deny-from` and `rate-limit`: this service's firewall
    /// rules, on top of `[firewall]`'s.
    pub firewall: Firewall,
    /// `max-connections`: the service's defaults for its backends.
    pub limits: ServiceLimits,
}

/// A service's defaults for how much its backends take.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServiceLimits {
    /// `max-connections`: a backend without its own limit takes no new flow
    /// while it holds this many active flows; `None`: no limit.
    pub max_connections: Option<u32>,
    /// `slow-start`: a backend that comes up ramps its weight from a small
    /// share to its full weight over this period; `None`: at once.
    pub slow_start: Option<Duration>,
}

impl Service {
    /// The health check that applies to `backend`: its own override if it
    /// has one, else the service's check (`None`: never checked, always up).
    pub fn health_for<'a>(&'a self, backend: &'a Backend) -> Option<&'a HealthCheck> {
        backend.health.as_ref().or(self.health.as_ref())
    }

    /// The active-flow limit of `backend`: its own `max-connections`, else
    /// the service's; `None`: unlimited.
    pub fn max_connections_of(&self, backend: &Backend) -> Option<u32> {
        backend.max_connections.or(self.limits.max_connections)
    }
}

/// What happens to established flows when a backend is marked down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnBackendDown {
    /// Flows already pinned to the backend continue; only new flows avoid it.
    KeepFlows,
    /// Flows pinned to the backend are dropped, so clients reconnect at once
    /// (and get a backend that is up).
    DropFlows,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Backend {
    /// Defaults to the address as text.
    pub name: String,
    pub address: SocketAddrV4,
    pub weight: u32,
    pub backup: bool,
    /// This backend's own health check, overriding the service's. Use
    /// [`Service::health_for`] to get the check that applies.
    pub health: Option<HealthCheck>,
    /// This backend's own `max-connections` (see
    /// [`Service::max_connections_of`]).
    pub max_connections: Option<u32>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct HealthCheck {
    pub check: CheckKind,
    /// The port probes go to, on the backend's IP; `None`: the backend's own
    /// port. Lets a UDP service be checked over TCP or HTTP on a sibling
    /// port, or a service on :443 over HTTP on :80.
    pub port: Option<u16>,
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
}

impl HealthCheck {
    /// Where probes for a backend at `backend` go: its IP, on
    /// [`port`](Self::port) if set, else on its own port.
    pub fn target(&self, backend: SocketAddrV4) -> SocketAddrV4 {
        SocketAddrV4::new(*backend.ip(), self.port.unwrap_or(backend.port()))
    }

    /// The longest a backend's first verdict can take under this check:
    /// `rise` (or `fall`) probes, `interval` apart, the last one's
    /// `timeout`. Saturating: a config built by hand (not validated) must
    /// not panic the agent either.
    pub fn first_verdict_time(&self) -> Duration {
        self.interval
            .saturating_mul(self.rise.max(self.fall).saturating_sub(1))
            .saturating_add(self.timeout)
    }
}

impl Config {
    /// The longest any checked backend or pool member can take to get its
    /// first verdict (zero with no checks at all).
    pub fn first_verdict_bound(&self) -> Duration {
        let backends = self
            .services
            .iter()
            .flat_map(|s| s.backends.iter().filter_map(|b| s.health_for(b)));
        let pools = self.pools.iter().map(|p| &p.health);
        backends
            .chain(pools)
            .map(HealthCheck::first_verdict_time)
            .max()
            .unwrap_or_default()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum CheckKind {
    Tcp,
    Http {
        path: String,
        expect_status: u16,
        expect_body: Option<String>,
    },
    /// A MySQL handshake and login (and, in a pool, the member's role).
    Mysql(MysqlLogin),
    /// A datagram sent, a reply expected (issue 28).
    Udp(UdpCheck),
    /// A TLS handshake; the certificate's expiry is exported.
    Tls(TlsCheck),
    /// A DNS query, its rcode (and optionally an answer) checked.
    Dns(DnsCheck),
}

/// `check = "dns"`: one DNS query (built and parsed by hickory-proto) for
/// `name`/`record_type`; the reply must carry `expect_rcode` and, if set,
/// an answer record whose data reads `expect_answer`.
#[derive(Debug, Clone, PartialEq)]
pub struct DnsCheck {
    /// The name queried, fully qualified (ends in `.`; checked at load).
    pub name: String,
    /// The record type, upper case (`"A"`, `"AAAA"`, `"SOA"`…; checked).
    pub record_type: String,
    pub transport: DnsTransport,
    /// The rcode the reply must carry (`expect-rcode`, default NOERROR).
    pub expect_rcode: DnsRcode,
    /// An answer record of `record_type` must read this (an address for A
    /// and AAAA, else the record's presentation form).
    pub expect_answer: Option<String>,
}

/// How a DNS probe travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DnsTransport {
    /// UDP, and the same query again over TCP when the reply is truncated.
    Udp,
    /// TCP only.
    Tcp,
}

/// The rcodes a check can expect (RFC 1035's, by their usual names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DnsRcode {
    NoError,
    FormErr,
    ServFail,
    NxDomain,
    NotImp,
    Refused,
}

impl DnsRcode {
    pub const ALL: [(DnsRcode, &'static str, u16); 6] = [
        (DnsRcode::NoError, "NOERROR", 0),
        (DnsRcode::FormErr, "FORMERR", 1),
        (DnsRcode::ServFail, "SERVFAIL", 2),
        (DnsRcode::NxDomain, "NXDOMAIN", 3),
        (DnsRcode::NotImp, "NOTIMP", 4),
        (DnsRcode::Refused, "REFUSED", 5),
    ];

    /// `"NOERROR"`, `"SERVFAIL"`…
    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(r, ..)| *r == self)
            .map_or("?", |(_, name, _)| name)
    }

    /// The wire value.
    pub fn code(self) -> u16 {
        Self::ALL
            .iter()
            .find(|(r, ..)| *r == self)
            .map_or(u16::MAX, |(.., code)| *code)
    }

    /// By name, any case.
    pub fn parse(text: &str) -> Option<DnsRcode> {
        Self::ALL
            .iter()
            .find(|(_, name, _)| name.eq_ignore_ascii_case(text))
            .map(|(r, ..)| *r)
    }
}

/// `check = "tls"`: a TLS handshake (rustls) within the timeout.
#[derive(Debug, Clone, PartialEq)]
pub struct TlsCheck {
    /// The server name sent (SNI) and, with a CA, verified; `None`: no SNI,
    /// and the backend's IP is what a CA-verified certificate must name.
    pub sni: Option<String>,
    /// `ca-file`: verify the chain against these certificates (DER, read
    /// when the config is loaded); `None`: the handshake alone is checked.
    pub ca: Option<(PathBuf, Vec<Vec<u8>>)>,
}

/// `check = "udp"`: send `send`, expect a reply within the timeout that
/// matches `expect`; an ICMP port unreachable fails the probe at once.
#[derive(Debug, Clone, PartialEq)]
pub struct UdpCheck {
    /// The probe's payload (`send` as text or `send-hex`).
    pub send: Vec<u8>,
    pub expect: UdpExpect,
}

/// What a UDP reply must look like.
#[derive(Debug, Clone, PartialEq)]
pub enum UdpExpect {
    /// Any reply.
    Any,
    /// The reply starts with these bytes (`expect` as text or `expect-hex`).
    Prefix(Vec<u8>),
    /// The reply, as UTF-8 text (invalid bytes replaced), matches this
    /// regular expression (`expect-regex`; checked when the config loads).
    Regex(String),
}

impl UdpExpect {
    /// Does `reply` match? The reason when it does not.
    pub fn check(&self, reply: &[u8]) -> Result<(), String> {
        let shown = || {
            let text = String::from_utf8_lossy(reply);
            let cut: String = text.chars().take(40).collect();
            format!(
                "{cut:?}{}",
                if text.chars().count() > 40 { "…" } else { "" }
            )
        };
        match self {
            UdpExpect::Any => Ok(()),
            UdpExpect::Prefix(p) if reply.starts_with(p) => Ok(()),
            UdpExpect::Prefix(p) => Err(format!(
                "reply {} does not start with {:?}",
                shown(),
                String::from_utf8_lossy(p)
            )),
            UdpExpect::Regex(pattern) => match regex::Regex::new(pattern) {
                Ok(re) if re.is_match(&String::from_utf8_lossy(reply)) => Ok(()),
                Ok(_) => Err(format!("reply {} does not match /{pattern}/", shown())),
                Err(e) => Err(format!("expect-regex: {e}")),
            },
        }
    }
}

/// The account health checks (and pool operations) log in with.
#[derive(Debug, Clone, PartialEq)]
pub struct MysqlLogin {
    pub user: String,
    pub password: Secret,
    /// Where the password was read from (`password-file`); `None`: inline.
    pub password_file: Option<PathBuf>,
}

/// A password: never shown by `Debug` (logs, errors, `lb status`).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(text: String) -> Secret {
        Secret(text)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Why a config was rejected.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("{file}: {key}: {reason}")]
    Invalid {
        file: PathBuf,
        key: String,
        reason: String,
    },
}

/// Reads and validates a config file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        file: path.to_path_buf(),
        source,
    })?;
    parse(&text, path)
}

/// Parses and validates config text; `file` is only used in errors.
pub fn parse(text: &str, file: &Path) -> Result<Config, ConfigError> {
    let raw: RawConfig = keypath::from_str(text, file)?;
    Validator { file }.config(raw)
}

/// Validates a config changed at run time (`lb backend add`, `weight`, …)
/// with exactly the rules a file goes through: it is turned back into the
/// file's shape and validated again, so a live change and a file can never
/// disagree. `origin` names the change in errors, as `file` does for files.
pub fn check(cfg: &Config, origin: &Path) -> Result<Config, ConfigError> {
    Validator { file: origin }.config(RawConfig::from(cfg))
}

#[cfg(test)]
mod tests;
