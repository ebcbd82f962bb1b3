//! The TOML config: schema, parsing and whole-config validation.
//!
//! A config is accepted whole or rejected whole; every error names the file,
//! the key (e.g. `service[1].backends[2].address`) and the reason.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddrV4},
    ops::Range,
    path::{Path, PathBuf},
    time::Duration,
};

use lb_common::{DEFAULT_CONNTRACK_SIZE, MAX_BACKENDS, MAX_RING, MAX_SERVICES};
use serde::{
    Deserialize,
    de::{self, MapAccess, SeqAccess, Visitor},
};
use toml::Spanned;

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
    pub services: Vec<Service>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Dataplane {
    /// Interfaces the `lb` XDP program is attached to (front and back).
    pub interfaces: Vec<String>,
    /// Default forwarding mode for services that do not set one.
    pub forwarding: Forwarding,
    pub xdp_mode: XdpMode,
    /// Connection-tracking capacity in flows.
    pub conntrack_size: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, strum::IntoStaticStr)]
#[serde(rename_all = "kebab-case")]
#[strum(serialize_all = "kebab-case")]
pub enum Forwarding {
    Nat,
    Dsr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, strum::IntoStaticStr)]
#[serde(rename_all = "kebab-case")]
#[strum(serialize_all = "kebab-case")]
pub enum XdpMode {
    Native,
    Generic,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, strum::IntoStaticStr)]
#[serde(rename_all = "kebab-case")]
#[strum(serialize_all = "kebab-case")]
pub enum Protocol {
    Tcp,
    Udp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, strum::IntoStaticStr)]
#[serde(rename_all = "kebab-case")]
#[strum(serialize_all = "kebab-case")]
pub enum Scheduler {
    RoundRobin,
    WeightedRoundRobin,
    SourceHash,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Service {
    pub name: String,
    pub vip: SocketAddrV4,
    pub protocol: Protocol,
    pub forwarding: Forwarding,
    pub scheduler: Scheduler,
    pub health: Option<HealthCheck>,
    /// What happens to flows pinned to a backend that health checks mark down.
    pub on_backend_down: OnBackendDown,
    pub backends: Vec<Backend>,
}

impl Service {
    /// The health check that applies to `backend`: its own override if it
    /// has one, else the service's check (`None`: never checked, always up).
    pub fn health_for<'a>(&'a self, backend: &'a Backend) -> Option<&'a HealthCheck> {
        backend.health.as_ref().or(self.health.as_ref())
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
}

#[derive(Debug, Clone, PartialEq)]
pub enum CheckKind {
    Tcp,
    Http {
        path: String,
        expect_status: u16,
        expect_body: Option<String>,
    },
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
    let raw: RawConfig = toml::from_str(text).map_err(|e| toml_error(text, file, &e))?;
    Validator { file }.config(raw)
}

/// Validates a config changed at run time (`lb backend add`, `weight`, …)
/// with exactly the rules a file goes through: it is turned back into the
/// file's shape and validated again, so a live change and a file can never
/// disagree. `origin` names the change in errors, as `file` does for files.
pub fn check(cfg: &Config, origin: &Path) -> Result<Config, ConfigError> {
    Validator { file: origin }.config(RawConfig::from(cfg))
}

// ---------------------------------------------------------------------------
// Raw layer: exactly the TOML shape. Every field is optional so that a missing
// key is reported by the validator with its full path (serde's "missing field"
// would only name the field, not which service or backend lacks it). Integers
// are i64 (TOML's integer type) so that out-of-range values get our range
// message instead of a serde type error. The container renames keep serde's
// "expected struct ..." messages in the config's vocabulary.
// ---------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", rename = "config")]
struct RawConfig {
    dataplane: Option<RawDataplane>,
    service: Option<Vec<RawService>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", rename = "dataplane")]
struct RawDataplane {
    interfaces: Option<Vec<String>>,
    forwarding: Option<Forwarding>,
    xdp_mode: Option<XdpMode>,
    conntrack_size: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", rename = "service")]
struct RawService {
    name: Option<String>,
    vip: Option<String>,
    protocol: Option<Protocol>,
    forwarding: Option<Forwarding>,
    scheduler: Option<Scheduler>,
    health: Option<RawHealth>,
    on_backend_down: Option<OnBackendDown>,
    backends: Option<Vec<RawBackend>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", rename = "health")]
struct RawHealth {
    check: Option<RawCheck>,
    port: Option<i64>,
    path: Option<String>,
    expect_status: Option<i64>,
    expect_body: Option<String>,
    interval: Option<String>,
    timeout: Option<String>,
    rise: Option<i64>,
    fall: Option<i64>,
}

#[derive(Clone, Copy, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum RawCheck {
    Tcp,
    Http,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", rename = "backend")]
struct RawBackend {
    address: Option<String>,
    name: Option<String>,
    weight: Option<i64>,
    backup: Option<bool>,
    health: Option<RawHealth>,
}

// A validated config back in the raw shape, for `check`.

impl From<&Config> for RawConfig {
    fn from(cfg: &Config) -> Self {
        let d = &cfg.dataplane;
        RawConfig {
            dataplane: Some(RawDataplane {
                interfaces: Some(d.interfaces.clone()),
                forwarding: Some(d.forwarding),
                xdp_mode: Some(d.xdp_mode),
                conntrack_size: Some(i64::from(d.conntrack_size)),
            }),
            service: Some(cfg.services.iter().map(RawService::from).collect()),
        }
    }
}

impl From<&Service> for RawService {
    fn from(s: &Service) -> Self {
        RawService {
            name: Some(s.name.clone()),
            vip: Some(s.vip.to_string()),
            protocol: Some(s.protocol),
            forwarding: Some(s.forwarding),
            scheduler: Some(s.scheduler),
            health: s.health.as_ref().map(RawHealth::from),
            on_backend_down: Some(s.on_backend_down),
            backends: Some(s.backends.iter().map(RawBackend::from).collect()),
        }
    }
}

impl From<&Backend> for RawBackend {
    fn from(b: &Backend) -> Self {
        RawBackend {
            address: Some(b.address.to_string()),
            // An unnamed backend is named after its address, which is not a
            // valid explicit name (it has a ':'); leave it unnamed again.
            name: (b.name != b.address.to_string()).then(|| b.name.clone()),
            weight: Some(i64::from(b.weight)),
            backup: Some(b.backup),
            health: b.health.as_ref().map(RawHealth::from),
        }
    }
}

impl From<&HealthCheck> for RawHealth {
    fn from(h: &HealthCheck) -> Self {
        let (check, path, expect_status, expect_body) = match &h.check {
            CheckKind::Tcp => (RawCheck::Tcp, None, None, None),
            CheckKind::Http {
                path,
                expect_status,
                expect_body,
            } => (
                RawCheck::Http,
                Some(path.clone()),
                Some(i64::from(*expect_status)),
                expect_body.clone(),
            ),
        };
        RawHealth {
            check: Some(check),
            port: h.port.map(i64::from),
            path,
            expect_status,
            expect_body,
            interval: Some(show_duration(h.interval)),
            timeout: Some(show_duration(h.timeout)),
            rise: Some(i64::from(h.rise)),
            fall: Some(i64::from(h.fall)),
        }
    }
}

// ---------------------------------------------------------------------------
// Limits and defaults.
// ---------------------------------------------------------------------------

const CONNTRACK_MIN: i64 = 1024;
const CONNTRACK_MAX: i64 = 16_777_216;
const NAME_MAX: usize = 64;
/// IFNAMSIZ (16) minus the terminating NUL.
const IFNAME_MAX: usize = 15;
const WEIGHT_MAX: i64 = 1000;
const RISE_FALL_MAX: i64 = 100;
const DEFAULT_INTERVAL: Duration = Duration::from_secs(2);
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
const DEFAULT_RISE: u32 = 2;
const DEFAULT_FALL: u32 = 3;
const DEFAULT_HTTP_PATH: &str = "/";
const DEFAULT_EXPECT_STATUS: u16 = 200;
const VIP_EXAMPLE: &str = "198.18.0.10:80";
const BACKEND_EXAMPLE: &str = "198.19.0.11:80";

// ---------------------------------------------------------------------------
// Validation: raw -> validated, stopping at the first error in document order.
// ---------------------------------------------------------------------------

/// Backend addresses and names already used in the service being validated,
/// with the index (and name) of the backend that uses them.
#[derive(Default)]
struct Seen {
    addresses: HashMap<SocketAddrV4, (usize, String)>,
    names: HashMap<String, usize>,
}

struct Validator<'a> {
    file: &'a Path,
}

impl Validator<'_> {
    fn err(&self, key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.to_path_buf(),
            key: key.into(),
            reason: reason.into(),
        }
    }

    fn required<T>(&self, value: Option<T>, key: &str) -> Result<T, ConfigError> {
        value.ok_or_else(|| self.err(key, "required key is missing"))
    }

    fn in_range(&self, value: i64, range: Range<i64>, key: &str) -> Result<i64, ConfigError> {
        if range.contains(&value) {
            Ok(value)
        } else {
            Err(self.err(
                key,
                format!(
                    "must be between {} and {}, got {value}",
                    range.start,
                    range.end - 1
                ),
            ))
        }
    }

    fn config(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let Some(raw_dataplane) = raw.dataplane else {
            return Err(self.err(
                "dataplane",
                "missing [dataplane] table (it needs at least `interfaces`)",
            ));
        };
        let dataplane = self.dataplane(raw_dataplane)?;

        let raw_services = raw.service.unwrap_or_default();
        if raw_services.is_empty() {
            return Err(self.err("service", "at least one [[service]] is required"));
        }
        if raw_services.len() > MAX_SERVICES as usize {
            return Err(self.err(
                "service",
                format!(
                    "{} services, but the data plane holds at most {MAX_SERVICES}",
                    raw_services.len()
                ),
            ));
        }

        let mut services: Vec<Service> = Vec::with_capacity(raw_services.len());
        // Backend ids index one global BACKENDS map and are per service (a
        // backend's flags and counters belong to its service, and a restarted
        // agent rebuilds ids from the map), so a backend listed in two
        // services takes two slots: the limit is on backend entries.
        let mut entries = 0usize;
        for (i, raw_service) in raw_services.into_iter().enumerate() {
            let service = self.service(i, raw_service, &dataplane, &services)?;
            for j in 0..service.backends.len() {
                entries += 1;
                if entries > MAX_BACKENDS as usize {
                    return Err(self.err(
                        format!("service[{i}].backends[{j}].address"),
                        format!(
                            "more than {MAX_BACKENDS} backends across all services \
                             (a backend listed in several services counts once per service)"
                        ),
                    ));
                }
            }
            services.push(service);
        }
        Ok(Config {
            dataplane,
            services,
        })
    }

    fn dataplane(&self, raw: RawDataplane) -> Result<Dataplane, ConfigError> {
        let interfaces = self.required(raw.interfaces, "dataplane.interfaces")?;
        if interfaces.is_empty() {
            return Err(self.err("dataplane.interfaces", "at least one interface is required"));
        }
        for (i, name) in interfaces.iter().enumerate() {
            let key = format!("dataplane.interfaces[{i}]");
            if let Some(reason) = ifname_problem(name) {
                return Err(self.err(key, reason));
            }
            if let Some(j) = interfaces[..i].iter().position(|other| other == name) {
                return Err(self.err(
                    key,
                    format!("duplicate of dataplane.interfaces[{j}] ({name:?})"),
                ));
            }
        }
        let conntrack_size = match raw.conntrack_size {
            None => DEFAULT_CONNTRACK_SIZE,
            Some(size) => {
                let size = self.in_range(
                    size,
                    CONNTRACK_MIN..CONNTRACK_MAX + 1,
                    "dataplane.conntrack-size",
                )?;
                u32::try_from(size)
                    .map_err(|_| self.err("dataplane.conntrack-size", "does not fit in 32 bits"))?
            }
        };
        Ok(Dataplane {
            interfaces,
            forwarding: raw.forwarding.unwrap_or(Forwarding::Nat),
            xdp_mode: raw.xdp_mode.unwrap_or(XdpMode::Native),
            conntrack_size,
        })
    }

    fn service(
        &self,
        i: usize,
        raw: RawService,
        dataplane: &Dataplane,
        earlier: &[Service],
    ) -> Result<Service, ConfigError> {
        let key = |field: &str| format!("service[{i}].{field}");

        let name = self.required(raw.name, &key("name"))?;
        if let Some(reason) = name_problem(&name) {
            return Err(self.err(key("name"), reason));
        }
        if let Some(j) = earlier.iter().position(|s| s.name == name) {
            return Err(self.err(
                key("name"),
                format!("duplicate service name, already used by service[{j}]"),
            ));
        }

        let vip_text = self.required(raw.vip, &key("vip"))?;
        let vip = self.socket_addr(&vip_text, &key("vip"), VIP_EXAMPLE)?;
        let protocol = raw.protocol.unwrap_or(Protocol::Tcp);
        // The data plane looks services up by (VIP, port, protocol); two
        // services with the same key would silently shadow each other.
        if let Some((j, other)) = earlier
            .iter()
            .enumerate()
            .find(|(_, s)| s.vip == vip && s.protocol == protocol)
        {
            return Err(self.err(
                key("vip"),
                format!(
                    "{vip}/{} is already used by service[{j}] ({:?})",
                    protocol_name(protocol),
                    other.name
                ),
            ));
        }

        let forwarding = raw.forwarding.unwrap_or(dataplane.forwarding);
        let scheduler = raw.scheduler.unwrap_or(Scheduler::RoundRobin);
        let health = match raw.health {
            None => None,
            Some(h) => Some(self.health(&key("health"), h)?),
        };
        let on_backend_down = raw.on_backend_down.unwrap_or(OnBackendDown::KeepFlows);

        let raw_backends = self.required(raw.backends, &key("backends"))?;
        if raw_backends.is_empty() {
            return Err(self.err(key("backends"), "at least one backend is required"));
        }
        let mut backends: Vec<Backend> = Vec::with_capacity(raw_backends.len());
        let mut seen = Seen::default();
        for (j, raw_backend) in raw_backends.into_iter().enumerate() {
            let prefix = format!("service[{i}].backends[{j}]");
            let backend = self.backend(&prefix, raw_backend, vip, forwarding, scheduler, &seen)?;
            seen.addresses
                .insert(backend.address, (j, backend.name.clone()));
            seen.names.insert(backend.name.clone(), j);
            backends.push(backend);
        }
        self.ring(&key("backends"), scheduler, &backends)?;

        Ok(Service {
            name,
            vip,
            protocol,
            forwarding,
            scheduler,
            health,
            on_backend_down,
            backends,
        })
    }

    fn backend(
        &self,
        prefix: &str,
        raw: RawBackend,
        vip: SocketAddrV4,
        forwarding: Forwarding,
        scheduler: Scheduler,
        seen: &Seen,
    ) -> Result<Backend, ConfigError> {
        let key = |field: &str| format!("{prefix}.{field}");

        let address_text = self.required(raw.address, &key("address"))?;
        let address = self.socket_addr(&address_text, &key("address"), BACKEND_EXAMPLE)?;
        // One address twice in a service would get two ring slots and be
        // health-checked twice; it is always a typo.
        if let Some((k, other)) = seen.addresses.get(&address) {
            return Err(self.err(
                key("address"),
                format!("{address} is already backends[{k}] ({other:?})"),
            ));
        }
        // DSR forwards the packet unchanged apart from the MAC addresses, so
        // the backend receives it on the VIP port and must listen there.
        if forwarding == Forwarding::Dsr && address.port() != vip.port() {
            return Err(self.err(
                key("address"),
                format!(
                    "with forwarding = \"dsr\" only MAC addresses are rewritten, \
                     so the backend port must equal the VIP port {}, got {}",
                    vip.port(),
                    address.port()
                ),
            ));
        }

        let name = match raw.name {
            None => address.to_string(),
            Some(name) => {
                if let Some(reason) = name_problem(&name) {
                    return Err(self.err(key("name"), reason));
                }
                name
            }
        };
        if let Some(k) = seen.names.get(&name) {
            return Err(self.err(
                key("name"),
                format!("duplicate backend name, already used by backends[{k}]"),
            ));
        }

        let weight = match raw.weight {
            None => 1,
            Some(w) => self.in_range(w, 0..WEIGHT_MAX + 1, &key("weight"))?,
        };
        // Outside weighted round robin a weight other than 0 (drained) or 1
        // would be silently ignored; reject it rather than surprise.
        if weight > 1 && scheduler != Scheduler::WeightedRoundRobin {
            return Err(self.err(
                key("weight"),
                format!(
                    "weight {weight} has no effect with scheduler = \"{}\"; \
                     set scheduler = \"weighted-round-robin\" (or use 1, or 0 to drain)",
                    scheduler_name(scheduler)
                ),
            ));
        }
        let weight = u32::try_from(weight)
            .map_err(|_| self.err(key("weight"), "does not fit in 32 bits"))?;
        let health = match raw.health {
            None => None,
            Some(h) => Some(self.health(&key("health"), h)?),
        };

        Ok(Backend {
            name,
            address,
            weight,
            backup: raw.backup.unwrap_or(false),
            health,
        })
    }

    /// The primaries and the backups each become a ring of at most
    /// `MAX_RING` slots (the backups' ring is used when no primary is up).
    fn ring(
        &self,
        key: &str,
        scheduler: Scheduler,
        backends: &[Backend],
    ) -> Result<(), ConfigError> {
        for (which, backup) in [("non-backup", false), ("backup", true)] {
            let group = backends.iter().filter(|b| b.backup == backup);
            let slots = match scheduler {
                Scheduler::RoundRobin | Scheduler::SourceHash => group.count() as u64,
                // Same length as lb_common::ring::weighted builds.
                Scheduler::WeightedRoundRobin => {
                    let weights: Vec<u64> = group
                        .map(|b| u64::from(b.weight))
                        .filter(|&w| w > 0)
                        .collect();
                    let g = weights.iter().fold(0, |g, &w| gcd(g, w)).max(1);
                    weights.iter().sum::<u64>() / g
                }
            };
            if slots > MAX_RING as u64 {
                let how = match scheduler {
                    Scheduler::WeightedRoundRobin => " (sum of weights / their gcd)",
                    Scheduler::RoundRobin | Scheduler::SourceHash => "",
                };
                return Err(self.err(
                    key,
                    format!("the {which} backends need {slots} ring slots{how} but a ring holds at most {MAX_RING}"),
                ));
            }
        }
        Ok(())
    }

    fn health(&self, prefix: &str, raw: RawHealth) -> Result<HealthCheck, ConfigError> {
        let key = |field: &str| format!("{prefix}.{field}");

        let check = match self.required(raw.check, &key("check"))? {
            RawCheck::Tcp => {
                // An HTTP-only key on a TCP check would be silently ignored,
                // which hides the mistake of forgetting check = "http".
                let http_only = [
                    ("path", raw.path.is_some()),
                    ("expect-status", raw.expect_status.is_some()),
                    ("expect-body", raw.expect_body.is_some()),
                ];
                if let Some((field, _)) = http_only.iter().find(|(_, set)| *set) {
                    return Err(self.err(key(field), "only valid with check = \"http\""));
                }
                CheckKind::Tcp
            }
            RawCheck::Http => {
                let path = raw.path.unwrap_or_else(|| DEFAULT_HTTP_PATH.to_owned());
                // The path goes verbatim into the request line; whitespace or
                // control characters would corrupt (or inject into) it.
                if !path.starts_with('/')
                    || path.chars().any(|c| c.is_whitespace() || c.is_control())
                {
                    return Err(self.err(
                        key("path"),
                        format!("must start with '/' and contain no whitespace or control characters, got {path:?}"),
                    ));
                }
                let expect_status = match raw.expect_status {
                    None => DEFAULT_EXPECT_STATUS,
                    Some(s) => {
                        let s = self.in_range(s, 100..600, &key("expect-status"))?;
                        u16::try_from(s).map_err(|_| {
                            self.err(key("expect-status"), "does not fit in 16 bits")
                        })?
                    }
                };
                CheckKind::Http {
                    path,
                    expect_status,
                    expect_body: raw.expect_body,
                }
            }
        };

        let port = match raw.port {
            None => None,
            Some(p) => {
                let p = self.in_range(p, 1..65536, &key("port"))?;
                Some(
                    u16::try_from(p)
                        .map_err(|_| self.err(key("port"), "does not fit in 16 bits"))?,
                )
            }
        };

        let duration = |value: Option<String>, field: &str, default: Duration| match value {
            None => Ok(default),
            Some(text) => parse_duration(&text).map_err(|reason| self.err(key(field), reason)),
        };
        let interval = duration(raw.interval, "interval", DEFAULT_INTERVAL)?;
        let timeout = duration(raw.timeout, "timeout", DEFAULT_TIMEOUT)?;
        // A probe still pending when the next one is due would overlap it.
        if timeout > interval {
            return Err(self.err(
                key("timeout"),
                format!(
                    "timeout {} must not exceed interval {}",
                    show_duration(timeout),
                    show_duration(interval)
                ),
            ));
        }

        let count = |value: Option<i64>, field: &str, default: u32| -> Result<u32, ConfigError> {
            match value {
                None => Ok(default),
                Some(n) => {
                    let n = self.in_range(n, 1..RISE_FALL_MAX + 1, &key(field))?;
                    u32::try_from(n).map_err(|_| self.err(key(field), "does not fit in 32 bits"))
                }
            }
        };
        let rise = count(raw.rise, "rise", DEFAULT_RISE)?;
        let fall = count(raw.fall, "fall", DEFAULT_FALL)?;

        Ok(HealthCheck {
            check,
            port,
            interval,
            timeout,
            rise,
            fall,
        })
    }

    fn socket_addr(
        &self,
        text: &str,
        key: &str,
        example: &str,
    ) -> Result<SocketAddrV4, ConfigError> {
        let addr: SocketAddrV4 = text.parse().map_err(|_| {
            self.err(
                key,
                format!("expected IPv4 address and port like {example:?}, got {text:?}"),
            )
        })?;
        if addr.port() == 0 {
            return Err(self.err(key, format!("port 0 is not a usable port, got {text:?}")));
        }
        if let Some(reason) = address_problem(*addr.ip()) {
            return Err(self.err(key, reason));
        }
        Ok(addr)
    }
}

/// Why `ip` cannot be a VIP or a backend: neither end of a unicast flow can
/// be the unspecified, broadcast or a multicast address.
fn address_problem(ip: Ipv4Addr) -> Option<String> {
    if ip.is_unspecified() {
        Some(format!("{ip} is the unspecified address"))
    } else if ip.is_broadcast() {
        Some(format!("{ip} is the broadcast address"))
    } else if ip.is_multicast() {
        Some(format!("{ip} is a multicast address"))
    } else {
        None
    }
}

/// The kernel's `dev_valid_name()` rules, so a bad name fails here rather
/// than at attach time.
fn ifname_problem(name: &str) -> Option<String> {
    if name.is_empty() || name.len() > IFNAME_MAX {
        Some(format!(
            "interface names are 1 to {IFNAME_MAX} bytes long, got {name:?}"
        ))
    } else if name == "." || name == ".." {
        Some(format!("{name:?} is not a valid interface name"))
    } else if name
        .chars()
        .any(|c| c == '/' || c == ':' || c == '\0' || c.is_whitespace())
    {
        Some(format!(
            "interface names cannot contain '/', ':', NUL or whitespace, got {name:?}"
        ))
    } else {
        None
    }
}

/// Service and backend names end up in logs, metrics labels and CLI output,
/// so they are kept to a shell- and label-safe charset.
fn name_problem(name: &str) -> Option<String> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-');
    if (1..=NAME_MAX).contains(&name.len()) && name.chars().all(ok_char) {
        None
    } else {
        Some(format!(
            "expected 1 to {NAME_MAX} characters from A-Z a-z 0-9 _ . -, got {name:?}"
        ))
    }
}

/// `<integer>ms` or `<integer>s`, greater than zero.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let invalid = || format!("expected a duration like \"300ms\" or \"2s\", got {text:?}");
    // "ms" first: "5ms" also ends in 's'.
    let (digits, millis) = match text.strip_suffix("ms") {
        Some(digits) => (digits, true),
        None => (text.strip_suffix('s').ok_or_else(invalid)?, false),
    };
    // u64::from_str would also take a leading '+'.
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid());
    }
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("duration {text:?} is too large"))?;
    if n == 0 {
        return Err(format!("duration must be greater than 0, got {text:?}"));
    }
    Ok(if millis {
        Duration::from_millis(n)
    } else {
        Duration::from_secs(n)
    })
}

/// Renders a duration in the config's own syntax (all config durations are
/// whole milliseconds).
fn show_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

fn protocol_name(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
    }
}

fn scheduler_name(s: Scheduler) -> &'static str {
    match s {
        Scheduler::RoundRobin => "round-robin",
        Scheduler::WeightedRoundRobin => "weighted-round-robin",
        Scheduler::SourceHash => "source-hash",
    }
}

// ---------------------------------------------------------------------------
// toml errors -> key paths.
//
// toml::de::Error carries a message and a byte span but not the key path, so
// on error the text is parsed a second time into a tree of key and
// array-element spans, and the key path is the innermost one at the error's
// position. Syntax errors (no tree) fall back to `<toml>:line:column`.
// ---------------------------------------------------------------------------

fn toml_error(text: &str, file: &Path, err: &toml::de::Error) -> ConfigError {
    let key = match err.span() {
        None => "<toml>".to_owned(),
        Some(span) => key_at(text, span.start).unwrap_or_else(|| {
            let (line, column) = line_column(text, span.start);
            format!("<toml>:{line}:{column}")
        }),
    };
    ConfigError::Invalid {
        file: file.to_path_buf(),
        key,
        reason: err.message().trim().to_owned(),
    }
}

/// 1-based line and column (in characters) of byte `offset`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// The key path of the key or value that starts at, or most closely before,
/// byte `offset`.
///
/// Serde errors point at a key (unknown field) or at the start of a value
/// (type, variant); a value starts right after its key's `=` or is an array
/// element, so the last marker at or before the offset is the one it belongs
/// to. Table-level errors may point at the `[` of a `[table]` header, which
/// precedes the table's own key; those are moved onto the header's key.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let root: SpanNode = toml::from_str(text).ok()?;
    let mut markers = Vec::new();
    collect_markers(&root, "", &mut markers);

    let offset = if markers.iter().any(|(start, _)| *start == offset) {
        offset
    } else {
        skip_header_brackets(text, offset)
    };
    markers
        .iter()
        .filter(|(start, _)| *start <= offset)
        // The latest start wins. Markers are pushed parent first, and
        // max_by_key keeps the last maximum, so a (hypothetical) tie goes to
        // the deeper path.
        .max_by_key(|(start, _)| *start)
        .map(|(_, path)| path.clone())
}

/// If `offset` is at a line-initial `[`/`[[` header, the offset of the
/// header's first key; otherwise `offset` unchanged.
fn skip_header_brackets(text: &str, offset: usize) -> usize {
    let Some((before, rest)) = text.split_at_checked(offset) else {
        return offset;
    };
    let line_so_far = before.rsplit('\n').next().unwrap_or(before);
    if !rest.starts_with('[') || !line_so_far.trim().is_empty() {
        return offset;
    }
    let skipped = rest.len() - rest.trim_start_matches(['[', ' ', '\t']).len();
    offset + skipped
}

fn collect_markers(node: &SpanNode, path: &str, out: &mut Vec<(usize, String)>) {
    match node {
        SpanNode::Leaf => {}
        SpanNode::Table(entries) => {
            for (key, value) in entries {
                let child = if path.is_empty() {
                    key.get_ref().clone()
                } else {
                    format!("{path}.{}", key.get_ref())
                };
                out.push((key.span().start, child.clone()));
                collect_markers(value, &child, out);
            }
        }
        SpanNode::Array(elements) => {
            for (i, element) in elements.iter().enumerate() {
                let child = format!("{path}[{i}]");
                out.push((element.span().start, child.clone()));
                collect_markers(element.get_ref(), &child, out);
            }
        }
    }
}

/// Any TOML document, keeping only structure and spans. Table values are
/// not `Spanned` because implicit tables (from dotted keys or `[a.b]`
/// headers) have no span; keys and array elements always do.
enum SpanNode {
    Leaf,
    Table(Vec<(Spanned<String>, SpanNode)>),
    Array(Vec<Spanned<SpanNode>>),
}

impl<'de> Deserialize<'de> for SpanNode {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(SpanNodeVisitor)
    }
}

struct SpanNodeVisitor;

impl<'de> Visitor<'de> for SpanNodeVisitor {
    type Value = SpanNode;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any TOML value")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<SpanNode, E> {
        Ok(SpanNode::Leaf)
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<SpanNode, E> {
        Ok(SpanNode::Leaf)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<SpanNode, E> {
        Ok(SpanNode::Leaf)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<SpanNode, E> {
        Ok(SpanNode::Leaf)
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<SpanNode, E> {
        Ok(SpanNode::Leaf)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<SpanNode, A::Error> {
        let mut elements = Vec::new();
        while let Some(element) = seq.next_element()? {
            elements.push(element);
        }
        Ok(SpanNode::Array(elements))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<SpanNode, A::Error> {
        let mut entries = Vec::new();
        loop {
            // A datetime value is handed to visitors as a one-entry map whose
            // key has no span; it is a leaf, not a table.
            let key: Spanned<String> = match map.next_key() {
                Ok(Some(key)) => key,
                Ok(None) => break,
                Err(_) => return Ok(SpanNode::Leaf),
            };
            entries.push((key, map.next_value()?));
        }
        Ok(SpanNode::Table(entries))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const FILE: &str = "test.toml";
    const DP: &str = "[dataplane]\ninterfaces = [\"lb-front\", \"lb-back\"]\n";
    const B1: &str = r#"{ address = "198.19.0.11:80" }"#;

    #[track_caller]
    fn parse_ok(text: &str) -> Config {
        match parse(text, Path::new(FILE)) {
            Ok(config) => config,
            Err(e) => panic!("expected a valid config, got: {e}\n{text}"),
        }
    }

    #[track_caller]
    fn parse_err(text: &str) -> (String, String) {
        match parse(text, Path::new(FILE)) {
            Err(ConfigError::Invalid { file, key, reason }) => {
                assert_eq!(file, Path::new(FILE));
                (key, reason)
            }
            other => panic!("expected ConfigError::Invalid, got {other:?}\n{text}"),
        }
    }

    #[track_caller]
    fn assert_rejected(text: &str, key: &str, fragment: &str) {
        let (got_key, reason) = parse_err(text);
        assert_eq!(got_key, key, "wrong key (reason: {reason:?}) for:\n{text}");
        assert!(
            reason.contains(fragment),
            "reason {reason:?} lacks {fragment:?} for:\n{text}"
        );
    }

    /// The dataplane plus one service "www" on 198.18.0.10:80 with `extra`
    /// lines and the given backend entries.
    fn one_service(extra: &str, backends: &str) -> String {
        format!(
            "{DP}\n[[service]]\nname = \"www\"\nvip = \"198.18.0.10:80\"\n{extra}\nbackends = [\n{backends}\n]\n"
        )
    }

    /// `one_service("", B1)` with `line` added to [dataplane].
    fn with_dataplane_line(line: &str) -> String {
        one_service("", B1).replace(DP, &format!("{DP}{line}\n"))
    }

    fn with_health(health: &str) -> String {
        one_service(&format!("health = {{ {health} }}"), B1)
    }

    fn addr(s: &str) -> SocketAddrV4 {
        match s.parse() {
            Ok(a) => a,
            Err(e) => panic!("{s}: {e}"),
        }
    }

    /// `n` distinct backend entries on 10.1.x.y:80.
    fn many_backends(n: usize, extra: &str) -> String {
        (0..n)
            .map(|i| {
                format!(
                    "{{ address = \"10.1.{}.{}:80\"{extra} }},\n",
                    i / 256,
                    i % 256
                )
            })
            .collect()
    }

    // --- accepted configs -------------------------------------------------

    #[test]
    fn full_config_parses_with_defaults_applied() {
        let text = r#"
[dataplane]
interfaces = ["eth0"]
forwarding = "dsr"
xdp-mode = "generic"
conntrack-size = 1024

[[service]]
name = "defaults"
vip = "10.0.0.1:443"
backends = [{ address = "10.0.1.1:443" }]

[[service]]
name = "explicit"
vip = "10.0.0.1:53"
protocol = "udp"
forwarding = "nat"
scheduler = "weighted-round-robin"
health = { check = "http", path = "/healthz", expect-status = 204, expect-body = "ok", interval = "500ms", timeout = "500ms", rise = 1, fall = 100 }
backends = [
  { address = "10.0.1.1:5353", name = "a", weight = 3, backup = false },
  { address = "10.0.1.2:5353", name = "b.2_x-y", weight = 0, backup = true },
]

[[service]]
name = "checks"
vip = "10.0.0.2:80"
scheduler = "source-hash"
health = { check = "tcp" }
backends = [{ address = "10.0.1.3:80" }]

[[service]]
name = "http-defaults"
vip = "10.0.0.3:80"
health = { check = "http" }
backends = [{ address = "10.0.1.3:80" }]
"#;
        let tcp_defaults = HealthCheck {
            check: CheckKind::Tcp,
            port: None,
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            rise: 2,
            fall: 3,
        };
        let expected = Config {
            dataplane: Dataplane {
                interfaces: vec!["eth0".to_owned()],
                forwarding: Forwarding::Dsr,
                xdp_mode: XdpMode::Generic,
                conntrack_size: 1024,
            },
            services: vec![
                Service {
                    name: "defaults".to_owned(),
                    vip: addr("10.0.0.1:443"),
                    protocol: Protocol::Tcp,
                    // Inherited from [dataplane].
                    forwarding: Forwarding::Dsr,
                    scheduler: Scheduler::RoundRobin,
                    health: None,
                    on_backend_down: OnBackendDown::KeepFlows,
                    backends: vec![Backend {
                        name: "10.0.1.1:443".to_owned(),
                        address: addr("10.0.1.1:443"),
                        weight: 1,
                        backup: false,
                        health: None,
                    }],
                },
                Service {
                    name: "explicit".to_owned(),
                    vip: addr("10.0.0.1:53"),
                    protocol: Protocol::Udp,
                    forwarding: Forwarding::Nat,
                    scheduler: Scheduler::WeightedRoundRobin,
                    health: Some(HealthCheck {
                        check: CheckKind::Http {
                            path: "/healthz".to_owned(),
                            expect_status: 204,
                            expect_body: Some("ok".to_owned()),
                        },
                        port: None,
                        interval: Duration::from_millis(500),
                        timeout: Duration::from_millis(500),
                        rise: 1,
                        fall: 100,
                    }),
                    on_backend_down: OnBackendDown::KeepFlows,
                    backends: vec![
                        Backend {
                            name: "a".to_owned(),
                            address: addr("10.0.1.1:5353"),
                            weight: 3,
                            backup: false,
                            health: None,
                        },
                        Backend {
                            name: "b.2_x-y".to_owned(),
                            address: addr("10.0.1.2:5353"),
                            weight: 0,
                            backup: true,
                            health: None,
                        },
                    ],
                },
                Service {
                    name: "checks".to_owned(),
                    vip: addr("10.0.0.2:80"),
                    protocol: Protocol::Tcp,
                    forwarding: Forwarding::Dsr,
                    scheduler: Scheduler::SourceHash,
                    health: Some(tcp_defaults),
                    on_backend_down: OnBackendDown::KeepFlows,
                    backends: vec![Backend {
                        name: "10.0.1.3:80".to_owned(),
                        address: addr("10.0.1.3:80"),
                        weight: 1,
                        backup: false,
                        health: None,
                    }],
                },
                Service {
                    name: "http-defaults".to_owned(),
                    vip: addr("10.0.0.3:80"),
                    protocol: Protocol::Tcp,
                    forwarding: Forwarding::Dsr,
                    scheduler: Scheduler::RoundRobin,
                    health: Some(HealthCheck {
                        check: CheckKind::Http {
                            path: "/".to_owned(),
                            expect_status: 200,
                            expect_body: None,
                        },
                        port: None,
                        interval: Duration::from_secs(2),
                        timeout: Duration::from_secs(1),
                        rise: 2,
                        fall: 3,
                    }),
                    on_backend_down: OnBackendDown::KeepFlows,
                    backends: vec![Backend {
                        name: "10.0.1.3:80".to_owned(),
                        address: addr("10.0.1.3:80"),
                        weight: 1,
                        backup: false,
                        health: None,
                    }],
                },
            ],
        };
        assert_eq!(parse_ok(text), expected);
    }

    #[test]
    fn dataplane_defaults() {
        let config = parse_ok(&one_service("", B1));
        assert_eq!(
            config.dataplane,
            Dataplane {
                interfaces: vec!["lb-front".to_owned(), "lb-back".to_owned()],
                forwarding: Forwarding::Nat,
                xdp_mode: XdpMode::Native,
                conntrack_size: lb_common::DEFAULT_CONNTRACK_SIZE,
            }
        );
        assert_eq!(config.services[0].forwarding, Forwarding::Nat);
    }

    #[test]
    fn check_accepts_a_parsed_config_unchanged() {
        // The last one has an unnamed backend (named after its address).
        for text in [
            include_str!("../../config/foobar.toml"),
            FULL_FOR_CHECK,
            &one_service("", B1),
        ] {
            let cfg = parse_ok(text);
            let again = check(&cfg, Path::new("lb backend")).expect("valid config");
            assert_eq!(again, cfg);
        }
    }

    #[test]
    fn check_applies_the_file_rules_to_live_changes() {
        let cfg = parse_ok(include_str!("../../config/foobar.toml"));
        let reject = |edit: &dyn Fn(&mut Config), key: &str, fragment: &str| {
            let mut next = cfg.clone();
            edit(&mut next);
            match check(&next, Path::new("lb backend")) {
                Err(ConfigError::Invalid {
                    file,
                    key: k,
                    reason,
                }) => {
                    assert_eq!(file, Path::new("lb backend"));
                    assert_eq!(k, key, "{reason}");
                    assert!(reason.contains(fragment), "{reason}");
                }
                other => panic!("expected a rejection on {key}, got {other:?}"),
            }
        };
        let added = |name: &str, address: &str, weight: u32| Backend {
            name: name.into(),
            address: addr(address),
            weight,
            backup: false,
            health: None,
        };
        reject(
            &|c| {
                c.services[0]
                    .backends
                    .push(added("web4", "198.19.0.11:80", 1))
            },
            "service[0].backends[3].address",
            "already backends[0]",
        );
        reject(
            &|c| {
                c.services[0]
                    .backends
                    .push(added("web1", "198.19.0.14:80", 1))
            },
            "service[0].backends[3].name",
            "duplicate backend name",
        );
        reject(
            &|c| c.services[0].backends[1].weight = 2,
            "service[0].backends[1].weight",
            "weighted-round-robin",
        );
        reject(
            &|c| {
                c.services[0]
                    .backends
                    .push(added("bad name", "198.19.0.14:80", 1))
            },
            "service[0].backends[3].name",
            "expected 1 to 64 characters",
        );
    }

    /// Every optional key set, for the `check` round trip.
    const FULL_FOR_CHECK: &str = r#"
[dataplane]
interfaces = ["eth0"]
forwarding = "dsr"
xdp-mode = "generic"
conntrack-size = 4096

[[service]]
name = "db"
vip = "198.18.0.20:3306"
protocol = "tcp"
forwarding = "nat"
scheduler = "weighted-round-robin"
on-backend-down = "drop-flows"
health = { check = "http", path = "/ready", expect-status = 204, expect-body = "ok", interval = "1500ms", timeout = "1s", rise = 3, fall = 4 }
backends = [
  { name = "db1", address = "198.19.0.21:3307", weight = 3 },
  { name = "db2", address = "198.19.0.22:3307", weight = 0, backup = true, health = { check = "tcp", interval = "2s", timeout = "250ms" } },
]
"#;

    #[test]
    fn foobar_toml_parses() {
        let config = parse_ok(include_str!("../../config/foobar.toml"));
        assert_eq!(config.dataplane.interfaces, ["lb-front", "lb-back"]);
        assert_eq!(config.dataplane.forwarding, Forwarding::Nat);
        assert_eq!(config.dataplane.xdp_mode, XdpMode::Native);
        assert_eq!(config.services.len(), 2);

        let www = &config.services[0];
        assert_eq!(
            (www.name.as_str(), www.vip, www.protocol),
            ("www", addr("198.18.0.10:80"), Protocol::Tcp)
        );
        assert_eq!(
            (www.forwarding, www.scheduler),
            (Forwarding::Nat, Scheduler::RoundRobin)
        );
        assert_eq!(
            www.health,
            Some(HealthCheck {
                check: CheckKind::Http {
                    path: "/".to_owned(),
                    expect_status: 200,
                    expect_body: None
                },
                port: None,
                interval: Duration::from_secs(1),
                timeout: Duration::from_millis(500),
                rise: 2,
                fall: 2,
            })
        );
        let backends: Vec<(&str, SocketAddrV4, u32, bool)> = www
            .backends
            .iter()
            .map(|b| (b.name.as_str(), b.address, b.weight, b.backup))
            .collect();
        assert_eq!(
            backends,
            [
                ("web1", addr("198.19.0.11:80"), 1, false),
                ("web2", addr("198.19.0.12:80"), 1, false),
                ("web3", addr("198.19.0.13:80"), 1, false),
            ]
        );

        let udp = &config.services[1];
        assert_eq!(
            (udp.name.as_str(), udp.vip, udp.protocol),
            ("www-udp", addr("198.18.0.10:5353"), Protocol::Udp)
        );
        // Checked over HTTP on the web servers' port 80, not on 5353.
        assert_eq!(udp.scheduler, Scheduler::RoundRobin);
        assert_eq!(
            udp.health,
            Some(HealthCheck {
                port: Some(80),
                ..www.health.clone().expect("www is checked")
            })
        );
        let web1 = &udp.backends[0];
        assert_eq!(
            udp.health_for(web1).map(|h| h.target(web1.address)),
            Some(addr("198.19.0.11:80"))
        );
        let backends: Vec<(&str, SocketAddrV4)> = udp
            .backends
            .iter()
            .map(|b| (b.name.as_str(), b.address))
            .collect();
        assert_eq!(
            backends,
            [
                ("web1", addr("198.19.0.11:5353")),
                ("web2", addr("198.19.0.12:5353")),
                ("web3", addr("198.19.0.13:5353"))
            ]
        );
    }

    #[test]
    fn array_of_tables_and_dotted_keys_are_accepted() {
        let text = format!(
            "{DP}\n[[service]]\nname = \"www\"\nvip = \"198.18.0.10:80\"\nhealth.check = \"tcp\"\nhealth.rise = 5\n\
             [[service.backends]]\naddress = \"198.19.0.11:80\"\n[[service.backends]]\naddress = \"198.19.0.12:80\"\n"
        );
        let config = parse_ok(&text);
        let service = &config.services[0];
        assert_eq!(
            service.health.as_ref().map(|h| (h.check.clone(), h.rise)),
            Some((CheckKind::Tcp, 5))
        );
        assert_eq!(
            service
                .backends
                .iter()
                .map(|b| b.address)
                .collect::<Vec<_>>(),
            [addr("198.19.0.11:80"), addr("198.19.0.12:80")]
        );
    }

    #[test]
    fn same_backend_in_several_services_is_allowed() {
        let text = format!(
            "{}\n[[service]]\nname = \"other\"\nvip = \"198.18.0.11:80\"\nbackends = [{B1}]\n",
            one_service("", B1)
        );
        let config = parse_ok(&text);
        assert_eq!(
            config.services[0].backends[0].address,
            config.services[1].backends[0].address
        );
    }

    #[test]
    fn same_vip_and_port_with_other_protocol_is_allowed() {
        let text = format!(
            "{}\n[[service]]\nname = \"dns\"\nvip = \"198.18.0.10:80\"\nprotocol = \"udp\"\nbackends = [{B1}]\n",
            one_service("", B1)
        );
        assert_eq!(parse_ok(&text).services[1].protocol, Protocol::Udp);
    }

    #[test]
    fn fully_drained_service_without_backup_is_allowed() {
        let backends = r#"{ address = "198.19.0.11:80", weight = 0 }, { address = "198.19.0.12:80", weight = 0 }"#;
        let config = parse_ok(&one_service("", backends));
        assert!(
            config.services[0]
                .backends
                .iter()
                .all(|b| b.weight == 0 && !b.backup)
        );
        // Also under weighted round robin (the ring is simply empty).
        parse_ok(&one_service(
            "scheduler = \"weighted-round-robin\"",
            backends,
        ));
    }

    #[test]
    fn limits_at_the_boundary_are_accepted() {
        let text = with_dataplane_line("conntrack-size = 16777216");
        assert_eq!(parse_ok(&text).dataplane.conntrack_size, 16_777_216);
        let text = one_service("", B1).replace("lb-front", "abcdefghijklmno");
        assert_eq!(parse_ok(&text).dataplane.interfaces[0], "abcdefghijklmno");
        let long = "n".repeat(64);
        assert_eq!(
            parse_ok(&one_service("", B1).replace("\"www\"", &format!("{long:?}"))).services[0]
                .name,
            long
        );
        let config = parse_ok(&one_service(
            "scheduler = \"weighted-round-robin\"",
            r#"{ address = "198.19.0.11:80", weight = 1000 }"#,
        ));
        assert_eq!(config.services[0].backends[0].weight, 1000);
        // Exactly MAX_RING primaries (and MAX_BACKENDS backends).
        assert_eq!(
            parse_ok(&one_service("", &many_backends(MAX_RING, ""))).services[0]
                .backends
                .len(),
            MAX_RING
        );
    }

    // --- file and dataplane -------------------------------------------------

    #[test]
    fn empty_file_is_rejected() {
        assert_rejected("", "dataplane", "missing [dataplane]");
        assert_rejected("# only a comment\n", "dataplane", "missing [dataplane]");
    }

    #[test]
    fn missing_dataplane_is_rejected() {
        let text = one_service("", B1).replace(DP, "");
        assert_rejected(&text, "dataplane", "missing [dataplane]");
    }

    #[test]
    fn interfaces_are_validated() {
        let service = one_service("", B1).replace(DP, "");
        let with = |dp: &str| format!("[dataplane]\n{dp}\n{service}");
        assert_rejected(
            &with("forwarding = \"nat\""),
            "dataplane.interfaces",
            "required key is missing",
        );
        assert_rejected(
            &with("interfaces = []"),
            "dataplane.interfaces",
            "at least one interface",
        );
        assert_rejected(
            &with("interfaces = [\"eth0\", \"abcdefghijklmnop\"]"),
            "dataplane.interfaces[1]",
            "1 to 15 bytes",
        );
        assert_rejected(
            &with("interfaces = [\"\"]"),
            "dataplane.interfaces[0]",
            "1 to 15 bytes",
        );
        assert_rejected(
            &with("interfaces = [\"lb/front\"]"),
            "dataplane.interfaces[0]",
            "cannot contain '/'",
        );
        assert_rejected(
            &with("interfaces = [\"lb front\"]"),
            "dataplane.interfaces[0]",
            "whitespace",
        );
        assert_rejected(
            &with("interfaces = [\"..\"]"),
            "dataplane.interfaces[0]",
            "not a valid interface name",
        );
        assert_rejected(
            &with("interfaces = [\"a\", \"b\", \"a\"]"),
            "dataplane.interfaces[2]",
            "duplicate of dataplane.interfaces[0] (\"a\")",
        );
        assert_rejected(
            &with("interfaces = [\"a\", 5]"),
            "dataplane.interfaces[1]",
            "invalid type: integer `5`",
        );
        assert_rejected(
            &with("interfaces = \"eth0\""),
            "dataplane.interfaces",
            "invalid type: string \"eth0\"",
        );
    }

    #[test]
    fn conntrack_size_is_range_checked() {
        for (size, shown) in [("1023", "1023"), ("16_777_217", "16777217"), ("-1", "-1")] {
            let text = with_dataplane_line(&format!("conntrack-size = {size}"));
            assert_rejected(
                &text,
                "dataplane.conntrack-size",
                &format!("must be between 1024 and 16777216, got {shown}"),
            );
        }
    }

    // --- services -------------------------------------------------------------

    #[test]
    fn no_service_is_rejected() {
        assert_rejected(DP, "service", "at least one [[service]]");
        assert_rejected(
            &format!("service = []\n{DP}"),
            "service",
            "at least one [[service]]",
        );
    }

    #[test]
    fn too_many_services_are_rejected() {
        let mut text = DP.to_owned();
        for i in 0..=MAX_SERVICES {
            text.push_str(&format!(
                "[[service]]\nname = \"s{i}\"\nvip = \"198.18.0.10:{}\"\nbackends = [{B1}]\n",
                i + 1
            ));
        }
        assert_rejected(
            &text,
            "service",
            "257 services, but the data plane holds at most 256",
        );
        // One fewer is fine.
        let cut = text.rfind("[[service]]").unwrap_or(0);
        assert_eq!(parse_ok(&text[..cut]).services.len(), 256);
    }

    #[test]
    fn service_names_are_validated() {
        assert_rejected(
            &one_service("", B1).replace("name = \"www\"\n", ""),
            "service[0].name",
            "required key is missing",
        );
        assert_rejected(
            &one_service("", B1).replace("\"www\"", "\"w w\""),
            "service[0].name",
            "got \"w w\"",
        );
        assert_rejected(
            &one_service("", B1).replace("\"www\"", &format!("{:?}", "n".repeat(65))),
            "service[0].name",
            "1 to 64 characters",
        );
        let text = format!(
            "{}\n[[service]]\nname = \"www\"\nvip = \"198.18.0.11:80\"\nbackends = [{B1}]\n",
            one_service("", B1)
        );
        assert_rejected(&text, "service[1].name", "already used by service[0]");
    }

    #[test]
    fn vips_are_validated() {
        let vip = |v: &str| one_service("", B1).replace("\"198.18.0.10:80\"", &format!("\"{v}\""));
        let (key, reason) = parse_err(&vip("web1"));
        assert_eq!(key, "service[0].vip");
        assert_eq!(
            reason,
            r#"expected IPv4 address and port like "198.18.0.10:80", got "web1""#
        );
        assert_rejected(
            &vip("198.18.0.10"),
            "service[0].vip",
            "expected IPv4 address and port",
        );
        assert_rejected(
            &vip("[::1]:80"),
            "service[0].vip",
            "expected IPv4 address and port",
        );
        assert_rejected(&vip("198.18.0.10:0"), "service[0].vip", "port 0");
        assert_rejected(&vip("0.0.0.0:80"), "service[0].vip", "unspecified");
        assert_rejected(&vip("255.255.255.255:80"), "service[0].vip", "broadcast");
        assert_rejected(&vip("224.0.0.1:80"), "service[0].vip", "multicast");
        assert_rejected(
            &one_service("", B1).replace("vip = \"198.18.0.10:80\"\n", ""),
            "service[0].vip",
            "required key is missing",
        );
    }

    #[test]
    fn duplicate_vip_port_protocol_is_rejected() {
        let text = format!(
            "{}\n[[service]]\nname = \"again\"\nvip = \"198.18.0.10:80\"\nprotocol = \"tcp\"\nbackends = [{B1}]\n",
            one_service("", B1)
        );
        assert_rejected(
            &text,
            "service[1].vip",
            "198.18.0.10:80/tcp is already used by service[0] (\"www\")",
        );
    }

    // --- backends -------------------------------------------------------------

    #[test]
    fn backend_addresses_are_validated() {
        let (key, reason) = parse_err(&one_service(
            "",
            r#"{ address = "198.19.0.11:80" }, { address = "web1" }"#,
        ));
        assert_eq!(key, "service[0].backends[1].address");
        assert_eq!(
            reason,
            r#"expected IPv4 address and port like "198.19.0.11:80", got "web1""#
        );
        assert_rejected(
            &one_service("", r#"{ address = "198.19.0.11:0" }"#),
            "service[0].backends[0].address",
            "port 0",
        );
        assert_rejected(
            &one_service("", r#"{ address = "0.0.0.0:80" }"#),
            "service[0].backends[0].address",
            "unspecified",
        );
        assert_rejected(
            &one_service("", r#"{ name = "web1" }"#),
            "service[0].backends[0].address",
            "required key is missing",
        );
        assert_rejected(
            &one_service("", ""),
            "service[0].backends",
            "at least one backend",
        );
        assert_rejected(
            &one_service("", B1)
                .replace("backends = [\n", "xbackends = [\n")
                .replace("xbackends", "# no backends\nfoo"),
            "service[0].foo",
            "unknown field `foo`",
        );
        let text = format!("{DP}\n[[service]]\nname = \"www\"\nvip = \"198.18.0.10:80\"\n");
        assert_rejected(&text, "service[0].backends", "required key is missing");
    }

    #[test]
    fn duplicate_backend_in_one_service_is_rejected() {
        let backends = r#"{ address = "198.19.0.11:80", name = "web1" }, { address = "198.19.0.12:80" }, { address = "198.19.0.11:80", name = "again" }"#;
        assert_rejected(
            &one_service("", backends),
            "service[0].backends[2].address",
            "198.19.0.11:80 is already backends[0] (\"web1\")",
        );
    }

    #[test]
    fn backend_names_are_validated() {
        let backends = r#"{ address = "198.19.0.11:80", name = "web" }, { address = "198.19.0.12:80", name = "web" }"#;
        assert_rejected(
            &one_service("", backends),
            "service[0].backends[1].name",
            "already used by backends[0]",
        );
        assert_rejected(
            &one_service("", r#"{ address = "198.19.0.11:80", name = "web 1" }"#),
            "service[0].backends[0].name",
            "got \"web 1\"",
        );
    }

    #[test]
    fn dsr_requires_backend_port_equal_to_vip_port() {
        let backends = r#"{ address = "198.19.0.11:80" }, { address = "198.19.0.12:8080" }"#;
        assert_rejected(
            &one_service("forwarding = \"dsr\"", backends),
            "service[0].backends[1].address",
            "must equal the VIP port 80, got 8080",
        );
        // Inherited from [dataplane] ...
        let inherited =
            one_service("", backends).replace(DP, &format!("{DP}forwarding = \"dsr\"\n"));
        assert_rejected(
            &inherited,
            "service[0].backends[1].address",
            "only MAC addresses are rewritten",
        );
        // ... and overridable per service.
        let overridden = inherited.replace(
            "vip = \"198.18.0.10:80\"\n",
            "vip = \"198.18.0.10:80\"\nforwarding = \"nat\"\n",
        );
        assert_eq!(
            parse_ok(&overridden).services[0].forwarding,
            Forwarding::Nat
        );
    }

    #[test]
    fn weights_are_validated() {
        assert_rejected(
            &one_service(
                "scheduler = \"weighted-round-robin\"",
                r#"{ address = "198.19.0.11:80", weight = 1001 }"#,
            ),
            "service[0].backends[0].weight",
            "must be between 0 and 1000, got 1001",
        );
        assert_rejected(
            &one_service("", r#"{ address = "198.19.0.11:80", weight = -1 }"#),
            "service[0].backends[0].weight",
            "must be between 0 and 1000, got -1",
        );
    }

    #[test]
    fn weight_needs_weighted_round_robin() {
        let backends =
            r#"{ address = "198.19.0.11:80" }, { address = "198.19.0.12:80", weight = 2 }"#;
        assert_rejected(
            &one_service("", backends),
            "service[0].backends[1].weight",
            "set scheduler = \"weighted-round-robin\"",
        );
        assert_rejected(
            &one_service("scheduler = \"source-hash\"", backends),
            "service[0].backends[1].weight",
            "no effect with scheduler = \"source-hash\"",
        );
        let config = parse_ok(&one_service(
            "scheduler = \"weighted-round-robin\"",
            backends,
        ));
        assert_eq!(config.services[0].backends[1].weight, 2);
        // weight 0 (drained) is fine under any scheduler.
        let drained = backends.replace("weight = 2", "weight = 0");
        assert_eq!(
            parse_ok(&one_service("", &drained)).services[0].backends[1].weight,
            0
        );
    }

    #[test]
    fn round_robin_ring_length_is_limited() {
        assert_rejected(
            &one_service("", &many_backends(MAX_RING + 1, "")),
            "service[0].backends",
            "the non-backup backends need 4097 ring slots but a ring holds at most 4096",
        );
        assert_rejected(
            &one_service(
                "scheduler = \"source-hash\"",
                &many_backends(MAX_RING + 1, ", backup = true"),
            ),
            "service[0].backends",
            "the backup backends need 4097 ring slots",
        );
    }

    #[test]
    fn weighted_ring_length_is_sum_over_gcd() {
        let weights = |ws: &[u32]| {
            ws.iter()
                .enumerate()
                .map(|(i, w)| format!("{{ address = \"198.19.0.{}:80\", weight = {w} }},", i + 1))
                .collect::<String>()
        };
        let wrr = "scheduler = \"weighted-round-robin\"";
        assert_rejected(
            &one_service(wrr, &weights(&[999, 1000, 1000, 1000, 1000])),
            "service[0].backends",
            "need 4999 ring slots (sum of weights / their gcd)",
        );
        // gcd 1000: 5 slots. gcd 500 (zero weights ignored): 9 slots.
        parse_ok(&one_service(wrr, &weights(&[1000, 1000, 1000, 1000, 1000])));
        parse_ok(&one_service(
            wrr,
            &weights(&[1000, 1000, 0, 1000, 1000, 500]),
        ));
    }

    #[test]
    fn backends_across_services_are_limited() {
        // 4096 backends in service 0; service 1 lists one of them again,
        // which takes a slot of its own in the data plane (the 4097th).
        let text = format!(
            "{}\n[[service]]\nname = \"other\"\nvip = \"198.18.0.11:80\"\nbackends = [{{ address = \"10.1.0.0:80\" }}, {B1}]\n",
            one_service("", &many_backends(MAX_BACKENDS as usize, ""))
        );
        assert_rejected(
            &text,
            "service[1].backends[0].address",
            "more than 4096 backends across all services",
        );
    }

    // --- health -------------------------------------------------------------

    #[test]
    fn health_check_kind_is_required_and_validated() {
        assert_rejected(
            &with_health("rise = 2"),
            "service[0].health.check",
            "required key is missing",
        );
        assert_rejected(
            &with_health("check = \"icmp\""),
            "service[0].health.check",
            "unknown variant `icmp`",
        );
    }

    #[test]
    fn http_keys_on_tcp_check_are_rejected() {
        for (key, value) in [
            ("path", "\"/\""),
            ("expect-status", "200"),
            ("expect-body", "\"ok\""),
        ] {
            assert_rejected(
                &with_health(&format!("check = \"tcp\", {key} = {value}")),
                &format!("service[0].health.{key}"),
                "only valid with check = \"http\"",
            );
        }
    }

    #[test]
    fn http_check_values_are_validated() {
        assert_rejected(
            &with_health("check = \"http\", path = \"healthz\""),
            "service[0].health.path",
            "must start with '/'",
        );
        assert_rejected(
            &with_health("check = \"http\", path = \"/a b\""),
            "service[0].health.path",
            "no whitespace",
        );
        assert_rejected(
            &with_health("check = \"http\", expect-status = 600"),
            "service[0].health.expect-status",
            "must be between 100 and 599, got 600",
        );
        assert_rejected(
            &with_health("check = \"http\", expect-status = 99"),
            "service[0].health.expect-status",
            "got 99",
        );
    }

    #[test]
    fn rise_and_fall_are_range_checked() {
        assert_rejected(
            &with_health("check = \"tcp\", rise = 0"),
            "service[0].health.rise",
            "between 1 and 100, got 0",
        );
        assert_rejected(
            &with_health("check = \"tcp\", fall = 101"),
            "service[0].health.fall",
            "between 1 and 100, got 101",
        );
    }

    #[test]
    fn bad_durations_are_rejected() {
        for (field, value, fragment) in [
            (
                "interval",
                "1h",
                "expected a duration like \"300ms\" or \"2s\", got \"1h\"",
            ),
            ("interval", "0s", "greater than 0"),
            ("timeout", "0ms", "greater than 0"),
            ("timeout", "abc", "got \"abc\""),
            ("interval", "s", "got \"s\""),
            ("interval", "+5s", "got \"+5s\""),
            ("interval", "5 s", "got \"5 s\""),
            ("interval", "1.5s", "got \"1.5s\""),
            ("interval", "99999999999999999999s", "too large"),
        ] {
            assert_rejected(
                &with_health(&format!("check = \"tcp\", {field} = \"{value}\"")),
                &format!("service[0].health.{field}"),
                fragment,
            );
        }
        assert_rejected(
            &with_health("check = \"tcp\", interval = 2"),
            "service[0].health.interval",
            "invalid type: integer `2`",
        );
    }

    #[test]
    fn timeout_must_not_exceed_interval() {
        assert_rejected(
            &with_health("check = \"tcp\", interval = \"1s\", timeout = \"1500ms\""),
            "service[0].health.timeout",
            "timeout 1500ms must not exceed interval 1s",
        );
        // Against the default interval (2s).
        assert_rejected(
            &with_health("check = \"tcp\", timeout = \"3s\""),
            "service[0].health.timeout",
            "interval 2s",
        );
        // Against the default timeout (1s).
        assert_rejected(
            &with_health("check = \"tcp\", interval = \"500ms\""),
            "service[0].health.timeout",
            "timeout 1s",
        );
    }

    #[test]
    fn backend_health_overrides_the_service_check() {
        let backends = r#"{ address = "198.19.0.11:80", name = "web1" },
            { address = "198.19.0.12:80", name = "web2", health = { check = "tcp", interval = "500ms", timeout = "200ms", fall = 1 } }"#;
        let config = parse_ok(&one_service(
            "health = { check = \"http\", path = \"/healthz\" }",
            backends,
        ));
        let service = &config.services[0];
        let (web1, web2) = (&service.backends[0], &service.backends[1]);
        assert_eq!(web1.health, None);
        let own = HealthCheck {
            check: CheckKind::Tcp,
            port: None,
            interval: Duration::from_millis(500),
            timeout: Duration::from_millis(200),
            rise: 2,
            fall: 1,
        };
        assert_eq!(web2.health.as_ref(), Some(&own));
        // web1 inherits the service's check, web2 uses its own.
        assert_eq!(service.health_for(web1), service.health.as_ref());
        assert!(matches!(
            service.health_for(web1).map(|h| &h.check),
            Some(CheckKind::Http { path, .. }) if path == "/healthz"
        ));
        assert_eq!(service.health_for(web2), Some(&own));
    }

    #[test]
    fn backend_health_without_service_health_is_allowed() {
        let backends = r#"{ address = "198.19.0.11:80" },
            { address = "198.19.0.12:80", health = { check = "http", expect-body = "ok" } }"#;
        let config = parse_ok(&one_service("", backends));
        let service = &config.services[0];
        assert_eq!(service.health, None);
        assert_eq!(service.health_for(&service.backends[0]), None);
        assert!(matches!(
            service.health_for(&service.backends[1]).map(|h| &h.check),
            Some(CheckKind::Http { expect_body: Some(body), .. }) if body == "ok"
        ));
        // As [service.backends.health] tables too.
        let text = format!(
            "{DP}[[service]]\nname = \"b\"\nvip = \"198.18.0.11:80\"\n[[service.backends]]\naddress = \"198.19.0.11:80\"\n\
             [service.backends.health]\ncheck = \"tcp\"\nrise = 7\n"
        );
        let config = parse_ok(&text);
        assert_eq!(
            config.services[0].backends[0]
                .health
                .as_ref()
                .map(|h| (h.check.clone(), h.rise)),
            Some((CheckKind::Tcp, 7))
        );
    }

    #[test]
    fn backend_health_is_validated_with_its_key_path() {
        let with_backend_health = |health: &str| {
            one_service(
                "health = { check = \"tcp\" }",
                &format!(
                    r#"{{ address = "198.19.0.11:80" }}, {{ address = "198.19.0.12:80", health = {{ {health} }} }}"#
                ),
            )
        };
        for (health, key, fragment) in [
            (
                "check = \"tcp\", interval = \"1h\"",
                "service[0].backends[1].health.interval",
                "got \"1h\"",
            ),
            (
                "check = \"tcp\", interval = \"1s\", timeout = \"2s\"",
                "service[0].backends[1].health.timeout",
                "timeout 2s must not exceed interval 1s",
            ),
            (
                "rise = 2",
                "service[0].backends[1].health.check",
                "required key is missing",
            ),
            (
                "check = \"tcp\", path = \"/\"",
                "service[0].backends[1].health.path",
                "only valid with check = \"http\"",
            ),
            (
                "check = \"http\", expect-status = 600",
                "service[0].backends[1].health.expect-status",
                "between 100 and 599",
            ),
            (
                "check = \"tcp\", fall = 0",
                "service[0].backends[1].health.fall",
                "between 1 and 100, got 0",
            ),
            (
                "check = \"ping\"",
                "service[0].backends[1].health.check",
                "unknown variant `ping`",
            ),
            (
                "check = \"tcp\", retries = 3",
                "service[0].backends[1].health.retries",
                "unknown field `retries`",
            ),
        ] {
            assert_rejected(&with_backend_health(health), key, fragment);
        }
    }

    #[test]
    fn health_port_defaults_to_the_backend_port() {
        let config = parse_ok(&with_health("check = \"tcp\""));
        let service = &config.services[0];
        let check = service.health.as_ref().expect("checked");
        assert_eq!(check.port, None);
        assert_eq!(
            check.target(service.backends[0].address),
            addr("198.19.0.11:80")
        );
    }

    #[test]
    fn health_port_moves_the_probe_to_another_port_of_the_backend() {
        // A UDP service checked over HTTP on port 80, one backend checked
        // over TCP on 8053 by its own check.
        let text = format!(
            "{DP}[[service]]\nname = \"dns\"\nvip = \"198.18.0.10:5353\"\nprotocol = \"udp\"\n\
             health = {{ check = \"http\", port = 80, path = \"/healthz\" }}\n\
             backends = [{{ address = \"198.19.0.11:5353\" }}, \
             {{ address = \"198.19.0.12:5353\", health = {{ check = \"tcp\", port = 8053 }} }}]\n"
        );
        let config = parse_ok(&text);
        let service = &config.services[0];
        let (b1, b2) = (&service.backends[0], &service.backends[1]);
        let service_check = service.health.as_ref().expect("checked");
        assert_eq!(service_check.port, Some(80));
        assert!(matches!(&service_check.check, CheckKind::Http { path, .. } if path == "/healthz"));
        let targets: Vec<Option<SocketAddrV4>> = [b1, b2]
            .iter()
            .map(|b| service.health_for(b).map(|h| h.target(b.address)))
            .collect();
        assert_eq!(
            targets,
            [Some(addr("198.19.0.11:80")), Some(addr("198.19.0.12:8053"))]
        );
        // The traffic still goes to the backends' own port.
        assert_eq!(b1.address, addr("198.19.0.11:5353"));
        // As a [service.health] table and a dotted key too.
        for health in [
            "[service.health]\ncheck = \"tcp\"\nport = 80\n",
            "health.check = \"tcp\"\nhealth.port = 80\n",
        ] {
            let text = format!(
                "{DP}[[service]]\nname = \"b\"\nvip = \"198.18.0.11:53\"\nbackends = [{B1}]\n{health}"
            );
            let config = parse_ok(&text);
            assert_eq!(
                config.services[0].health.as_ref().and_then(|h| h.port),
                Some(80),
                "{text}"
            );
        }
        // Through a live change, the port is kept.
        let again = check(&config, Path::new("lb backend")).map_err(|e| e.to_string());
        assert_eq!(again.as_ref().ok(), Some(&config), "{again:?}");
    }

    #[test]
    fn health_port_is_validated_with_its_key_path() {
        // On the second service, so the key names its index.
        let second = |health: &str| {
            format!(
                "{}\n[[service]]\nname = \"dns\"\nvip = \"198.18.0.10:5353\"\nprotocol = \"udp\"\n\
                 health = {{ {health} }}\nbackends = [{{ address = \"198.19.0.11:5353\" }}]\n",
                one_service("", B1)
            )
        };
        for (value, fragment) in [
            ("0", "must be between 1 and 65535, got 0"),
            ("65536", "must be between 1 and 65535, got 65536"),
            ("-80", "must be between 1 and 65535, got -80"),
            ("\"80\"", "invalid type: string \"80\", expected i64"),
        ] {
            assert_rejected(
                &second(&format!("check = \"http\", port = {value}")),
                "service[1].health.port",
                fragment,
            );
        }
        // On a backend's own check.
        let text = one_service(
            "",
            r#"{ address = "198.19.0.11:80" }, { address = "198.19.0.12:80", health = { check = "tcp", port = 0 } }"#,
        );
        assert_rejected(
            &text,
            "service[0].backends[1].health.port",
            "must be between 1 and 65535, got 0",
        );
        // The message names the file, the key and the reason.
        let err = parse(&second("check = \"tcp\", port = 0"), Path::new(FILE))
            .expect_err("port 0 is rejected");
        assert_eq!(
            err.to_string(),
            "test.toml: service[1].health.port: must be between 1 and 65535, got 0"
        );
    }

    #[test]
    fn on_backend_down_defaults_to_keep_flows() {
        let config = parse_ok(&one_service("", B1));
        assert_eq!(config.services[0].on_backend_down, OnBackendDown::KeepFlows);
        for (value, expected) in [
            ("keep-flows", OnBackendDown::KeepFlows),
            ("drop-flows", OnBackendDown::DropFlows),
        ] {
            let config = parse_ok(&one_service(
                &format!("health = {{ check = \"tcp\" }}\non-backend-down = \"{value}\""),
                B1,
            ));
            assert_eq!(config.services[0].on_backend_down, expected);
        }
    }

    #[test]
    fn bad_on_backend_down_is_rejected() {
        assert_rejected(
            &one_service("on-backend-down = \"reset\"", B1),
            "service[0].on-backend-down",
            "unknown variant `reset`, expected `keep-flows` or `drop-flows`",
        );
        assert_rejected(
            &one_service("on-backend-down = true", B1),
            "service[0].on-backend-down",
            "wanted string or table",
        );
        // It is a service key, not a backend key.
        assert_rejected(
            &one_service(
                "",
                r#"{ address = "198.19.0.11:80", on-backend-down = "drop-flows" }"#,
            ),
            "service[0].backends[0].on-backend-down",
            "unknown field `on-backend-down`",
        );
    }

    // --- unknown keys, enums, syntax ---------------------------------------

    #[test]
    fn unknown_keys_are_rejected_with_their_path() {
        assert_rejected(
            &format!("colour = 1\n{}", one_service("", B1)),
            "colour",
            "unknown field `colour`",
        );
        assert_rejected(
            &with_dataplane_line("mtu = 1500"),
            "dataplane.mtu",
            "unknown field `mtu`",
        );
        assert_rejected(
            &one_service("port = 80", B1),
            "service[0].port",
            "unknown field `port`",
        );
        assert_rejected(
            &one_service(
                "",
                r#"{ address = "198.19.0.11:80" }, { address = "198.19.0.12:80", colour = "red" }"#,
            ),
            "service[0].backends[1].colour",
            "unknown field `colour`",
        );
        assert_rejected(
            &with_health("check = \"tcp\", retries = 3"),
            "service[0].health.retries",
            "unknown field `retries`",
        );
        // The same through [[service.backends]], [service.health] and dotted keys,
        // and in a later service.
        let text = format!(
            "{}\n[[service]]\nname = \"b\"\nvip = \"198.18.0.11:80\"\n[service.health]\ncheck = \"tcp\"\ncolour = 1\n",
            one_service("", B1)
        );
        assert_rejected(&text, "service[1].health.colour", "unknown field `colour`");
        let text = format!(
            "{DP}[[service]]\nname = \"b\"\nvip = \"198.18.0.11:80\"\nhealth.check = \"tcp\"\nhealth.colour = 1\n\
             [[service.backends]]\naddress = \"198.19.0.11:80\"\n"
        );
        assert_rejected(&text, "service[0].health.colour", "unknown field `colour`");
        let text = format!(
            "{DP}[[service]]\nname = \"b\"\nvip = \"198.18.0.11:80\"\n[[service.backends]]\naddress = \"198.19.0.11:80\"\n\
             [[service.backends]]\naddress = \"198.19.0.12:80\"\ncolour = 1\n"
        );
        assert_rejected(
            &text,
            "service[0].backends[1].colour",
            "unknown field `colour`",
        );
    }

    #[test]
    fn bad_enum_values_are_rejected() {
        let dp = with_dataplane_line;
        assert_rejected(
            &dp("forwarding = \"tunnel\""),
            "dataplane.forwarding",
            "unknown variant `tunnel`, expected `nat` or `dsr`",
        );
        assert_rejected(
            &dp("xdp-mode = \"offload\""),
            "dataplane.xdp-mode",
            "unknown variant `offload`",
        );
        assert_rejected(
            &one_service("protocol = \"sctp\"", B1),
            "service[0].protocol",
            "unknown variant `sctp`",
        );
        assert_rejected(
            &one_service("forwarding = \"NAT\"", B1),
            "service[0].forwarding",
            "unknown variant `NAT`",
        );
        assert_rejected(
            &one_service("scheduler = \"maglev\"", B1),
            "service[0].scheduler",
            "unknown variant `maglev`",
        );
        assert_rejected(
            &one_service("", r#"{ address = "198.19.0.11:80", backup = "yes" }"#),
            "service[0].backends[0].backup",
            "invalid type: string \"yes\", expected a boolean",
        );
    }

    #[test]
    fn wrong_shapes_are_rejected_with_a_key() {
        // A datetime is not a table even though serde sees it as a map.
        assert_rejected(
            &with_health("check = \"tcp\", interval = 1979-05-27"),
            "service[0].health.interval",
            "invalid type",
        );
        assert_rejected(
            &one_service("protocol = 1979-05-27", B1),
            "service[0].protocol",
            "wanted string or table",
        );
        // [service] instead of [[service]].
        let text = format!("{DP}[service]\nname = \"www\"\n");
        assert_rejected(&text, "service", "invalid type: map, expected a sequence");
    }

    #[test]
    fn syntax_errors_name_line_and_column() {
        let (key, reason) = parse_err("[dataplane]\ninterfaces = [\"a\"\n");
        assert_eq!(key, "<toml>:3:1");
        assert!(!reason.is_empty() && reason == reason.trim(), "{reason:?}");
        let (key, _) = parse_err("[dataplane]\ninterfaces = [\"a\"]\ninterfaces = [\"b\"]\n");
        assert!(key.starts_with("<toml>:3:"), "{key}");
    }

    #[test]
    fn errors_display_file_key_and_reason() {
        let err = parse(
            &one_service("", r#"{ address = "198.19.0.11:0" }"#),
            Path::new("conf/lb.toml"),
        )
        .err()
        .map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some(
                "conf/lb.toml: service[0].backends[0].address: port 0 is not a usable port, got \"198.19.0.11:0\""
            )
        );
    }

    #[test]
    fn load_reports_unreadable_files() {
        let path = Path::new("/nonexistent/lb.toml");
        match load(path) {
            Err(ConfigError::Read { file, .. }) => assert_eq!(file, path),
            other => panic!("expected ConfigError::Read, got {other:?}"),
        }
    }

    #[test]
    fn durations_show_in_config_syntax() {
        assert_eq!(show_duration(Duration::from_secs(2)), "2s");
        assert_eq!(show_duration(Duration::from_millis(1500)), "1500ms");
    }

    proptest! {
        #[test]
        fn valid_durations_round_trip(n in 1u64.., millis in any::<bool>()) {
            let (text, expected) = if millis {
                (format!("{n}ms"), Duration::from_millis(n))
            } else {
                (format!("{n}s"), Duration::from_secs(n))
            };
            prop_assert_eq!(parse_duration(&text), Ok(expected));
        }
    }
}
