//! `[[service]]`: a VIP, its backends and how they are chosen: the
//! validated model ([`Service`], [`Backend`], [`Scheduler`], …) and its
//! validation (names, addresses, weights, rings and Maglev tables within
//! the data plane's limits).

use std::{collections::HashMap, net::SocketAddr, time::Duration};

use lb_common::{
    MAGLEV_MAX, MAX_RING,
    maglev::{self, MAGLEV_DEFAULT_SIZE},
};
use serde::{Deserialize, Serialize};

use super::{
    ConfigError, Dataplane, Firewall, Forwarding, HealthCheck, duration,
    raw::{RawBackend, RawService},
    validate::{Validator, name_problem},
};

const WEIGHT_MAX: i64 = 1000;
const VIP_EXAMPLE: &str = "198.18.0.10:80";
const BACKEND_EXAMPLE: &str = "198.19.0.11:80";

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
    /// Every scheduler, in the order the docs list them.
    pub const ALL: [Scheduler; 6] = [
        Scheduler::RoundRobin,
        Scheduler::WeightedRoundRobin,
        Scheduler::LeastConnections,
        Scheduler::FlowHash,
        Scheduler::Maglev,
        Scheduler::SourceIp,
    ];

    /// The data plane's code for this scheduler (`ServiceConf::scheduler`).
    pub fn code(self) -> u32 {
        use lb_common::{SCHED_COUNTER, SCHED_HASH, SCHED_MAGLEV, SCHED_SOURCE_IP};
        match self {
            Scheduler::FlowHash => SCHED_HASH,
            Scheduler::Maglev => SCHED_MAGLEV,
            Scheduler::SourceIp => SCHED_SOURCE_IP,
            Scheduler::RoundRobin | Scheduler::WeightedRoundRobin | Scheduler::LeastConnections => {
                SCHED_COUNTER
            }
        }
    }

    /// Does this scheduler use a Maglev table (and `maglev-table-size`)?
    /// The data plane's rule, decided once (`lb_common::uses_maglev`).
    pub fn uses_maglev(self) -> bool {
        lb_common::uses_maglev(self.code())
    }

    /// Do backend weights other than 0 and 1 mean something here?
    pub fn uses_weights(self) -> bool {
        !matches!(self, Scheduler::RoundRobin | Scheduler::FlowHash)
    }
}

/// `source-ip-prefix` unset: `source-ip` hashes the client's whole address.
pub const SOURCE_IP_WHOLE: u8 = lb_common::maps6::SOURCE_PREFIX_WHOLE;

#[derive(Debug, Clone, PartialEq)]
pub struct Service {
    pub name: String,
    pub vip: SocketAddr,
    pub protocol: Protocol,
    pub forwarding: Forwarding,
    pub scheduler: Scheduler,
    /// Slots of the Maglev table (prime; `maglev` and `source-ip` only).
    pub maglev_table_size: u32,
    /// `source-ip-prefix`: the IPv6 client prefix length a `source-ip`
    /// service hashes ([`SOURCE_IP_WHOLE`]: the whole address; 64: every
    /// address of a client's /64 reaches one backend).
    pub source_ip_prefix: u8,
    pub health: Option<HealthCheck>,
    /// What happens to flows pinned to a backend that health checks mark down.
    pub on_backend_down: OnBackendDown,
    pub backends: Vec<Backend>,
    /// `allow-from`, `deny-from` and `rate-limit`: this service's firewall
    /// rules, on top of `[firewall]`'s.
    pub firewall: Firewall,
    /// `max-connections`: the service's defaults for its backends.
    pub limits: ServiceLimits,
    /// `proxy-protocol`: a PROXY header starts each stream to a backend.
    pub proxy_protocol: Option<super::ProxyProtocol>,
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
    pub address: SocketAddr,
    pub weight: u32,
    pub backup: bool,
    /// This backend's own health check, overriding the service's. Use
    /// [`Service::health_for`] to get the check that applies.
    pub health: Option<HealthCheck>,
    /// This backend's own `max-connections` (see
    /// [`Service::max_connections_of`]).
    pub max_connections: Option<u32>,
}

/// Backend addresses and names already used in the service being validated,
/// with the index (and name) of the backend that uses them.
#[derive(Default)]
struct Seen {
    addresses: HashMap<SocketAddr, (usize, String)>,
    names: HashMap<String, usize>,
}

impl Validator<'_> {
    pub(super) fn service(
        &self,
        i: usize,
        raw: RawService,
        dataplane: &Dataplane,
        earlier: &[Service],
    ) -> Result<Service, ConfigError> {
        let key = |field: &str| format!("service[{i}].{field}");

        let name = self.unique_name(
            raw.name,
            &key("name"),
            "service",
            earlier.iter().map(|s| s.name.as_str()),
        )?;

        let vip_text = self.required(raw.vip, &key("vip"))?;
        let vip = self.vip(&vip_text, &key("vip"), VIP_EXAMPLE)?;
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
                    protocol.name(),
                    other.name
                ),
            ));
        }

        let forwarding = raw.forwarding.unwrap_or(dataplane.forwarding);
        let scheduler = raw.scheduler.map_or(Scheduler::RoundRobin, |s| s.0);
        let health = match raw.health {
            None => None,
            Some(h) => Some(self.health(&key("health"), h)?),
        };
        self.through_vip_fits(&key("health"), health.as_ref(), forwarding)?;
        let on_backend_down = raw.on_backend_down.unwrap_or(OnBackendDown::KeepFlows);
        let proxy_protocol = self.proxy_protocol(
            &key("proxy-protocol"),
            raw.proxy_protocol,
            forwarding,
            protocol,
        )?;

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
        let maglev_table_size = self.maglev_table_size(
            &key("maglev-table-size"),
            scheduler,
            raw.maglev_table_size,
            &backends,
        )?;
        let source_ip_prefix = self.source_ip_prefix(
            &key("source-ip-prefix"),
            scheduler,
            vip,
            raw.source_ip_prefix,
        )?;
        let firewall = self.service_firewall(
            &format!("service[{i}]"),
            raw.deny_from,
            raw.allow_from,
            raw.rate_limit,
        )?;

        let limits = ServiceLimits {
            max_connections: self.max_connections(raw.max_connections, &key("max-connections"))?,
            slow_start: self.slow_start(raw.slow_start, &key("slow-start"), scheduler)?,
        };

        let service = Service {
            name,
            vip,
            protocol,
            forwarding,
            scheduler,
            maglev_table_size,
            source_ip_prefix,
            health,
            on_backend_down,
            backends,
            firewall,
            limits,
            proxy_protocol,
        };
        self.data_plane_balances(&format!("service[{i}]"), &service)?;
        Ok(service)
    }

    /// A backend must be of its VIP's family: the data plane rewrites a
    /// packet's addresses, it does not translate between IPv4 and IPv6
    /// (NAT64), and keeps each family's services and flows in maps of
    /// their own.
    pub(super) fn same_family(
        &self,
        address: SocketAddr,
        vip: SocketAddr,
        key: &str,
    ) -> Result<(), ConfigError> {
        if address.is_ipv4() == vip.is_ipv4() {
            return Ok(());
        }
        let family = |a: &SocketAddr| if a.is_ipv4() { "IPv4" } else { "IPv6" };
        Err(self.err(
            key,
            format!(
                "{address} is an {} address but the service's VIP {vip} is {}: a \
                 service's VIP and its backends must be of one family",
                family(&address),
                family(&vip)
            ),
        ))
    }

    /// The one gate between a valid IPv6 service and the agent, run after
    /// every other rule (so the operator sees the service's real mistakes
    /// first): the data plane balances IPv6 services in NAT, DSR and the
    /// tunnels (IP6IP6, GUE over IPv6), with the firewall's IPv6 rules and
    /// rate limits and PROXY v2 (NAT66); full NAT is not built for IPv6 yet
    /// (issue 24), so a service that needs it is rejected here, by the key
    /// that asks for it.
    pub(super) fn data_plane_balances(
        &self,
        prefix: &str,
        service: &Service,
    ) -> Result<(), ConfigError> {
        let vip = service.vip;
        if vip.is_ipv4() {
            return Ok(());
        }
        let key = |field: &str| format!("{prefix}.{field}");
        if service.forwarding == Forwarding::FullNat {
            return Err(self.err(
                key("forwarding"),
                format!(
                    "{vip} is an IPv6 VIP: the data plane balances IPv6 in \"nat\", \"dsr\", \
                     \"ipip\" and \"gue\" only so far (full NAT over IPv6 is not built, issue 24)"
                ),
            ));
        }
        // PROXY v2 over IPv6 is built for NAT66 (`lb_proxy6`); DSR is
        // refused for it by the service's own rules, as over IPv4.
        Ok(())
    }

    fn backend(
        &self,
        prefix: &str,
        raw: RawBackend,
        vip: SocketAddr,
        forwarding: Forwarding,
        scheduler: Scheduler,
        seen: &Seen,
    ) -> Result<Backend, ConfigError> {
        let key = |field: &str| format!("{prefix}.{field}");

        let address_text = self.required(raw.address, &key("address"))?;
        let address = self.socket_addr(&address_text, &key("address"), BACKEND_EXAMPLE)?;
        self.same_family(address, vip, &key("address"))?;
        // One address twice in a service would get two ring slots and be
        // health-checked twice; it is always a typo.
        if let Some((k, other)) = seen.addresses.get(&address) {
            return Err(self.err(
                key("address"),
                format!("{address} is already backends[{k}] ({other:?})"),
            ));
        }
        // NAT would send the packet back to the VIP it came to, DSR to a
        // server that is the load balancer itself: a loop either way.
        if address == vip {
            return Err(self.err(
                key("address"),
                format!(
                    "{address} is the service's own VIP: forwarding to it would send \
                     every packet back to the load balancer (a loop)"
                ),
            ));
        }
        // DSR forwards the packet unchanged apart from the MAC addresses,
        // a tunnel unchanged inside its headers: the backend receives it on
        // the VIP port and must listen there.
        if forwarding.answers_directly() && address.port() != vip.port() {
            let how = match forwarding {
                Forwarding::Dsr => "only MAC addresses are rewritten",
                _ => "the packet reaches the backend unchanged inside the tunnel",
            };
            return Err(self.err(
                key("address"),
                format!(
                    "with forwarding = \"{}\" {how}, \
                     so the backend port must equal the VIP port {}, got {}",
                    forwarding.name(),
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

        let weight: u32 = match raw.weight {
            None => 1,
            Some(w) => self.in_range(w, 0..WEIGHT_MAX + 1, &key("weight"))?,
        };
        // Under round robin and flow hash a weight other than 0 (drained)
        // or 1 would be silently ignored; reject it rather than surprise.
        if weight > 1 && !scheduler.uses_weights() {
            return Err(self.err(
                key("weight"),
                format!(
                    "weight {weight} has no effect with scheduler = \"{}\"; \
                     set scheduler = \"weighted-round-robin\", \"maglev\", \"source-ip\" \
                     or \"least-connections\" (or use 1, or 0 to drain)",
                    scheduler.name()
                ),
            ));
        }
        let health = match raw.health {
            None => None,
            Some(h) => Some(self.health(&key("health"), h)?),
        };
        self.through_vip_fits(&key("health"), health.as_ref(), forwarding)?;

        Ok(Backend {
            name,
            address,
            weight,
            backup: raw.backup.unwrap_or(false),
            health,
            max_connections: self.max_connections(raw.max_connections, &key("max-connections"))?,
        })
    }

    /// `slow-start`: a duration from 1s to 1h, with a scheduler that weighs
    /// (the ramp is a weight; round robin would ignore it).
    fn slow_start(
        &self,
        raw: Option<String>,
        key: &str,
        scheduler: Scheduler,
    ) -> Result<Option<Duration>, ConfigError> {
        let Some(text) = raw else {
            return Ok(None);
        };
        let period = duration::parse(&text).map_err(|reason| self.err(key, reason))?;
        if !(Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&period) {
            return Err(self.err(key, format!("must be between 1s and 1h, got {text:?}")));
        }
        if !scheduler.uses_weights() {
            return Err(self.err(
                key,
                format!(
                    "slow start ramps a backend's weight, which scheduler = \"{}\" ignores; \
                     use \"weighted-round-robin\", \"least-connections\", \"maglev\" or \"source-ip\"",
                    scheduler.name()
                ),
            ));
        }
        Ok(Some(period))
    }

    /// `max-connections`: at least 1 (0 would be a drain: say so).
    fn max_connections(&self, raw: Option<i64>, key: &str) -> Result<Option<u32>, ConfigError> {
        match raw {
            None => Ok(None),
            Some(0) => Err(self.err(
                key,
                "must be at least 1 (to take a backend out of rotation, drain it or give it weight 0)",
            )),
            Some(n) => self.in_range(n, 1..i64::from(u32::MAX) + 1, key).map(Some),
        }
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
                Scheduler::RoundRobin | Scheduler::FlowHash => group.count() as u64,
                Scheduler::WeightedRoundRobin => {
                    let weights: Vec<u32> = group.map(|b| b.weight).collect();
                    lb_common::ring::weighted_len(&weights)
                }
                // Maglev tables are checked by `maglev_table_size`; the
                // least-connections ring is sized to fit by its planner.
                Scheduler::Maglev | Scheduler::SourceIp | Scheduler::LeastConnections => 0,
            };
            if slots > MAX_RING as u64 {
                let how = match scheduler {
                    Scheduler::WeightedRoundRobin => " (sum of weights / their gcd)",
                    _ => "",
                };
                return Err(self.err(
                    key,
                    format!("the {which} backends need {slots} ring slots{how} but a ring holds at most {MAX_RING}"),
                ));
            }
        }
        Ok(())
    }

    /// `maglev-table-size`: only for the Maglev schedulers; a prime, at
    /// most `MAGLEV_MAX`, and at least as many slots as backends in a group.
    /// `source-ip-prefix`: 1 to 128, an IPv6 `source-ip` service's only
    /// (IPv4 clients are hashed by their whole address).
    fn source_ip_prefix(
        &self,
        key: &str,
        scheduler: Scheduler,
        vip: SocketAddr,
        raw: Option<i64>,
    ) -> Result<u8, ConfigError> {
        let Some(len) = raw else {
            return Ok(SOURCE_IP_WHOLE);
        };
        if scheduler != Scheduler::SourceIp {
            return Err(self.err(
                key,
                format!(
                    "has no effect with scheduler = \"{}\"; it sets the client prefix \
                     \"source-ip\" hashes",
                    scheduler.name()
                ),
            ));
        }
        if vip.is_ipv4() {
            return Err(self.err(
                key,
                format!(
                    "{vip} is an IPv4 VIP: \"source-ip\" hashes an IPv4 client's whole \
                     address; source-ip-prefix groups IPv6 clients (e.g. 64 for a /64)"
                ),
            ));
        }
        self.in_range(len, 1..i64::from(SOURCE_IP_WHOLE) + 1, key)
    }

    fn maglev_table_size(
        &self,
        key: &str,
        scheduler: Scheduler,
        raw: Option<i64>,
        backends: &[Backend],
    ) -> Result<u32, ConfigError> {
        let Some(size) = raw else {
            return Ok(MAGLEV_DEFAULT_SIZE);
        };
        if !scheduler.uses_maglev() {
            return Err(self.err(
                key,
                format!(
                    "has no effect with scheduler = \"{}\"; it sizes the table of \
                     \"maglev\" and \"source-ip\"",
                    scheduler.name()
                ),
            ));
        }
        let size: u32 = self.in_range(size, 2..MAGLEV_MAX as i64 + 1, key)?;
        if !maglev::is_prime(size) {
            return Err(self.err(
                key,
                format!(
                    "must be a prime number (so every backend's permutation visits \
                     every slot), got {size}; e.g. 251, 1021, 4093, 16381 or 65537"
                ),
            ));
        }
        for backup in [false, true] {
            let n = backends.iter().filter(|b| b.backup == backup).count();
            if n > size as usize {
                return Err(self.err(
                    key,
                    format!(
                        "{size} slots cannot hold {n} backends; use a prime of at least \
                         100 per backend for an even spread"
                    ),
                ));
            }
        }
        Ok(size)
    }
}
