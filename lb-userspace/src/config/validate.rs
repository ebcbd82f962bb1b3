//! The validator: raw config -> validated [`Config`], with the limits,
//! defaults and field rules, stopping at the first error in document order.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddrV4},
    ops::Range,
    path::{Path, PathBuf},
    time::Duration,
};

use lb_common::{
    DEFAULT_CONNTRACK_SIZE, FW_BURST_MAX, FW_RATE_MAX, MAGLEV_MAX, MAX_BACKENDS, MAX_FW_RULES,
    MAX_MAGLEV_SERVICES, MAX_RING, MAX_SERVICES,
    maglev::{self, MAGLEV_DEFAULT_SIZE},
};

use super::{
    Announce, Backend, CheckKind, Config, ConfigError, Dataplane, DnsCheck, DnsRcode, DnsTransport,
    Firewall, Forwarding, HealthCheck, Monitoring, OnBackendDown, Prefix, Protocol, RateLimit,
    Scheduler, Service, ServiceLimits, Timeouts, TlsCheck, UdpCheck, UdpExpect, XdpMode, duration,
    raw::{
        RawAnnounce, RawBackend, RawCheck, RawConfig, RawDataplane, RawHealth, RawMonitoring,
        RawRateLimit, RawService, RawTimeouts,
    },
};

// ---------------------------------------------------------------------------
// Limits and defaults.
// ---------------------------------------------------------------------------

const CONNTRACK_MIN: i64 = 1024;
const CONNTRACK_MAX: i64 = 16_777_216;
/// Most new flows per second per CPU a budget may allow (0: no limit).
const BUDGET_MAX: i64 = 100_000_000;
/// Longest idle timeout: a week (ticks stay far from wrapping).
const FLOW_TIMEOUT_MAX: Duration = Duration::from_secs(7 * 24 * 3600);
const NAME_MAX: usize = 64;
/// IFNAMSIZ (16) minus the terminating NUL.
const IFNAME_MAX: usize = 15;
const WEIGHT_MAX: i64 = 1000;
const RISE_FALL_MAX: i64 = 100;
/// Longest health-check `interval` (and so `timeout`): an hour. With
/// `rise`/`fall` at most 100, a first verdict takes at most ~100 hours.
const HEALTH_DURATION_MAX: Duration = Duration::from_secs(3600);
/// Katran's figure: about 125k new connections per second per core.
const DEFAULT_NEW_FLOW_BUDGET: u32 = 125_000;
const DEFAULT_INTERVAL: Duration = Duration::from_secs(2);
/// The largest UDP health probe payload (an IPv4 datagram's limit).
const MAX_UDP_PAYLOAD: usize = 65_507;
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
const DEFAULT_RISE: u32 = 2;
const DEFAULT_FALL: u32 = 3;
const DEFAULT_HTTP_PATH: &str = "/";
const DEFAULT_EXPECT_STATUS: u16 = 200;
const VIP_EXAMPLE: &str = "198.18.0.10:80";
const BACKEND_EXAMPLE: &str = "198.19.0.11:80";
const LISTEN_EXAMPLE: &str = "127.0.0.1:9100";

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

/// Where one scope's firewall keys are, for errors.
struct FirewallKeys<'a> {
    deny: &'a str,
    allow: &'a str,
    rate_limit: &'a str,
}

pub(super) struct Validator<'a> {
    pub(super) file: &'a Path,
}

impl Validator<'_> {
    pub(super) fn err(&self, key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.to_path_buf(),
            key: key.into(),
            reason: reason.into(),
        }
    }

    pub(super) fn required<T>(&self, value: Option<T>, key: &str) -> Result<T, ConfigError> {
        value.ok_or_else(|| self.err(key, "required key is missing"))
    }

    /// `value` if it is in `range`, as the field's integer type `T` (which
    /// holds the whole range, so that conversion does not fail in practice).
    fn in_range<T: TryFrom<i64>>(
        &self,
        value: i64,
        range: Range<i64>,
        key: &str,
    ) -> Result<T, ConfigError> {
        if !range.contains(&value) {
            return Err(self.err(
                key,
                format!(
                    "must be between {} and {}, got {value}",
                    range.start,
                    range.end - 1
                ),
            ));
        }
        T::try_from(value)
            .map_err(|_| self.err(key, format!("does not fit in {} bits", 8 * size_of::<T>())))
    }

    pub(super) fn config(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let Some(raw_dataplane) = raw.dataplane else {
            return Err(self.err(
                "dataplane",
                "missing [dataplane] table (it needs at least `interfaces`)",
            ));
        };
        let dataplane = self.dataplane(raw_dataplane)?;
        let monitoring = match raw.monitoring {
            None => None,
            Some(m) => Some(self.monitoring(m)?),
        };

        let firewall = match raw.firewall {
            None => Firewall::default(),
            Some(f) => self.firewall(
                FirewallKeys {
                    deny: "firewall.deny",
                    allow: "firewall.allow",
                    rate_limit: "firewall.rate-limit",
                },
                f.deny,
                f.allow,
                f.rate_limit,
            )?,
        };
        let announce = match raw.announce {
            None => None,
            Some(a) => Some(self.announce(a)?),
        };

        let coordination = match raw.coordination {
            None => None,
            Some(c) => Some(self.coordination(c)?),
        };

        let raw_services = raw.service.unwrap_or_default();
        let raw_pools = raw.pool.unwrap_or_default();
        if raw_services.is_empty() && raw_pools.is_empty() {
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
            if service.scheduler.uses_maglev()
                && services
                    .iter()
                    .filter(|s| s.scheduler.uses_maglev())
                    .count()
                    >= MAX_MAGLEV_SERVICES as usize
            {
                return Err(self.err(
                    format!("service[{i}].scheduler"),
                    format!(
                        "more than {MAX_MAGLEV_SERVICES} services use \"maglev\" or \
                         \"source-ip\" (each Maglev table takes 512 KiB of kernel memory)"
                    ),
                ));
            }
            services.push(service);
        }
        let pools = self.pools(raw_pools, &mut services)?;
        self.monitoring_clear_of_vips(monitoring.as_ref(), &services)?;
        // Every prefix of every scope is one rule with its own counter.
        let mut rules = firewall.deny.len() + firewall.allow.len();
        for (i, s) in services.iter().enumerate() {
            rules += s.firewall.deny.len() + s.firewall.allow.len();
            if rules > MAX_FW_RULES as usize {
                return Err(self.err(
                    format!("service[{i}]"),
                    format!(
                        "more than {MAX_FW_RULES} firewall rules (prefixes) across \
                         [firewall] and every service"
                    ),
                ));
            }
        }
        if rules > MAX_FW_RULES as usize {
            return Err(self.err(
                "firewall",
                format!("more than {MAX_FW_RULES} firewall rules (prefixes)"),
            ));
        }
        Ok(Config {
            dataplane,
            monitoring,
            firewall,
            announce,
            coordination,
            services,
            pools,
        })
    }

    /// One scope's rules: prefixes that parse, have no host bits, are not
    /// listed twice nor in both lists; a rate limit in range.
    /// A service's rules: `allow-from`, `deny-from` and `rate-limit` under
    /// `prefix` (`service[0]`, `pool[1]`, `pool[1].write`).
    pub(super) fn service_firewall(
        &self,
        prefix: &str,
        deny: Option<Vec<String>>,
        allow: Option<Vec<String>>,
        rate_limit: Option<RawRateLimit>,
    ) -> Result<Firewall, ConfigError> {
        let key = |field: &str| format!("{prefix}.{field}");
        self.firewall(
            FirewallKeys {
                deny: &key("deny-from"),
                allow: &key("allow-from"),
                rate_limit: &key("rate-limit"),
            },
            deny,
            allow,
            rate_limit,
        )
    }

    fn firewall(
        &self,
        keys: FirewallKeys<'_>,
        deny: Option<Vec<String>>,
        allow: Option<Vec<String>>,
        rate_limit: Option<RawRateLimit>,
    ) -> Result<Firewall, ConfigError> {
        let deny = self.prefixes(keys.deny, deny.unwrap_or_default())?;
        let allow = self.prefixes(keys.allow, allow.unwrap_or_default())?;
        if let Some((j, p)) = allow.iter().enumerate().find(|(_, p)| deny.contains(p)) {
            let k = deny.iter().position(|d| d == p).unwrap_or(0);
            return Err(self.err(
                format!("{}[{j}]", keys.allow),
                format!(
                    "{p} is also {}[{k}]: deny wins, so allowing it has no effect",
                    keys.deny
                ),
            ));
        }
        let rate_limit = match rate_limit {
            None => None,
            Some(r) => Some(self.rate_limit(keys.rate_limit, r)?),
        };
        Ok(Firewall {
            deny,
            allow,
            rate_limit,
        })
    }

    fn prefixes(&self, key: &str, texts: Vec<String>) -> Result<Vec<Prefix>, ConfigError> {
        let mut out: Vec<Prefix> = Vec::with_capacity(texts.len());
        for (i, text) in texts.iter().enumerate() {
            let k = format!("{key}[{i}]");
            let prefix = Prefix::parse(text).map_err(|reason| self.err(&k, reason))?;
            if let Some(j) = out.iter().position(|p| *p == prefix) {
                return Err(self.err(k, format!("{prefix} is already {key}[{j}]")));
            }
            out.push(prefix);
        }
        Ok(out)
    }

    fn rate_limit(&self, key: &str, raw: RawRateLimit) -> Result<RateLimit, ConfigError> {
        let k = |field: &str| format!("{key}.{field}");
        let rate_raw = self.required(raw.new_flows_per_second, &k("new-flows-per-second"))?;
        let new_flows_per_second: u32 = self.in_range(
            rate_raw,
            1..i64::from(FW_RATE_MAX) + 1,
            &k("new-flows-per-second"),
        )?;
        let burst = match raw.burst {
            // One second's worth by default.
            None => new_flows_per_second,
            Some(b) => self.in_range(b, 1..i64::from(FW_BURST_MAX) + 1, &k("burst"))?,
        };
        let per = match raw.per.as_deref() {
            None | Some("address") => 32,
            Some("all") => 0,
            Some(text) => match text.strip_prefix('/').map(str::parse::<u8>) {
                Some(Ok(len)) if (8..=32).contains(&len) => len,
                _ => {
                    return Err(self.err(
                        k("per"),
                        format!(
                            "expected \"address\", \"all\" (one bucket for every source) or a \
                             prefix length from \"/8\" to \"/32\" (e.g. \"/24\"), got {text:?}"
                        ),
                    ));
                }
            },
        };
        Ok(RateLimit {
            new_flows_per_second,
            burst,
            per,
        })
    }

    fn monitoring(&self, raw: RawMonitoring) -> Result<Monitoring, ConfigError> {
        let key = "monitoring.listen";
        let text = self.required(raw.listen, key)?;
        let listen: SocketAddrV4 = text.parse().map_err(|_| {
            self.err(
                key,
                format!("expected IPv4 address and port like {LISTEN_EXAMPLE:?}, got {text:?}"),
            )
        })?;
        if listen.port() == 0 {
            return Err(self.err(key, format!("port 0 is not a usable port, got {text:?}")));
        }
        let ip = *listen.ip();
        if ip.is_broadcast() || ip.is_multicast() {
            return Err(self.err(
                key,
                format!("{ip} is not a unicast address one can listen on"),
            ));
        }
        Ok(Monitoring { listen })
    }

    fn announce(&self, raw: RawAnnounce) -> Result<Announce, ConfigError> {
        let bird_socket = self.absolute_path(raw.bird_socket, "announce.bird-socket")?;
        let include = self.absolute_path(raw.include, "announce.include")?;
        if include == bird_socket {
            return Err(self.err(
                "announce.include",
                format!(
                    "{} is also announce.bird-socket: the include file is a config file BIRD reads",
                    include.display()
                ),
            ));
        }
        let med = match raw.med {
            None => 0,
            Some(m) => self.in_range(m, 0..(i64::from(u32::MAX) + 1), "announce.med")?,
        };
        Ok(Announce {
            bird_socket,
            include,
            med,
        })
    }

    /// A required absolute path: the agent and BIRD may not share a working
    /// directory, so a relative one would name two different files.
    fn absolute_path(&self, raw: Option<String>, key: &str) -> Result<PathBuf, ConfigError> {
        let text = self.required(raw, key)?;
        let path = PathBuf::from(&text);
        if !path.is_absolute() {
            return Err(self.err(
                key,
                format!("must be an absolute path (BIRD and the agent run in different directories), got {text:?}"),
            ));
        }
        if text.contains('"') {
            return Err(self.err(
                key,
                format!("cannot contain '\"' (BIRD's config quotes it), got {text:?}"),
            ));
        }
        Ok(path)
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
            Some(size) => self.in_range(
                size,
                CONNTRACK_MIN..CONNTRACK_MAX + 1,
                "dataplane.conntrack-size",
            )?,
        };
        let half_open_size = match raw.half_open_size {
            None => lb_common::DEFAULT_HALF_OPEN_SIZE,
            Some(size) => self.in_range(
                size,
                CONNTRACK_MIN..CONNTRACK_MAX + 1,
                "dataplane.half-open-size",
            )?,
        };
        let new_flow_budget = match raw.new_flow_budget {
            None => DEFAULT_NEW_FLOW_BUDGET,
            Some(n) => self.in_range(n, 0..BUDGET_MAX + 1, "dataplane.new-flow-budget")?,
        };
        let timeouts = self.timeouts(raw.timeouts)?;
        Ok(Dataplane {
            interfaces,
            forwarding: raw.forwarding.unwrap_or(Forwarding::Nat),
            xdp_mode: raw.xdp_mode.unwrap_or(XdpMode::Native),
            conntrack_size,
            half_open_size,
            new_flow_budget,
            timeouts,
        })
    }

    /// `[dataplane.timeouts]`: whole seconds or more (the data plane's clock
    /// ticks about once a second), at most a week.
    fn timeouts(&self, raw: Option<RawTimeouts>) -> Result<Timeouts, ConfigError> {
        let defaults = Timeouts::default();
        let Some(raw) = raw else {
            return Ok(defaults);
        };
        let one = |value: Option<String>, field: &str, default: Duration| {
            let key = format!("dataplane.timeouts.{field}");
            let Some(text) = value else {
                return Ok(default);
            };
            let d = duration::parse(&text).map_err(|reason| self.err(&key, reason))?;
            if d < Duration::from_secs(1) || d > FLOW_TIMEOUT_MAX {
                return Err(self.err(
                    &key,
                    format!(
                        "must be between 1s and {}, got {text:?}",
                        duration::show(FLOW_TIMEOUT_MAX)
                    ),
                ));
            }
            Ok(d)
        };
        Ok(Timeouts {
            tcp: one(raw.tcp, "tcp", defaults.tcp)?,
            tcp_closing: one(raw.tcp_closing, "tcp-closing", defaults.tcp_closing)?,
            tcp_half_open: one(raw.tcp_half_open, "tcp-half-open", defaults.tcp_half_open)?,
            udp: one(raw.udp, "udp", defaults.udp)?,
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
        let maglev_table_size = self.maglev_table_size(
            &key("maglev-table-size"),
            scheduler,
            raw.maglev_table_size,
            &backends,
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

        Ok(Service {
            name,
            vip,
            protocol,
            forwarding,
            scheduler,
            maglev_table_size,
            health,
            on_backend_down,
            backends,
            firewall,
            limits,
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

    /// `check = "udp"`: at most one of `send`/`send-hex` (default: an empty
    /// datagram) and of `expect`/`expect-hex`/`expect-regex` (default: any
    /// reply). Takes the keys it uses out of `raw`.
    fn udp_check(&self, prefix: &str, raw: &mut RawHealth) -> Result<UdpCheck, ConfigError> {
        let key = |field: &str| format!("{prefix}.{field}");
        let hex = |text: String, field: &str| {
            data_encoding::HEXLOWER_PERMISSIVE
                .decode(text.replace([' ', ':'], "").as_bytes())
                .map_err(|e| self.err(key(field), format!("not hex bytes: {e}")))
        };
        let send = match (raw.send.take(), raw.send_hex.take()) {
            (Some(_), Some(_)) => {
                return Err(self.err(key("send-hex"), "give send or send-hex, not both"));
            }
            (Some(text), None) => text.into_bytes(),
            (None, Some(h)) => hex(h, "send-hex")?,
            (None, None) => Vec::new(),
        };
        if send.len() > MAX_UDP_PAYLOAD {
            return Err(self.err(
                key("send"),
                format!("at most {MAX_UDP_PAYLOAD} bytes, got {}", send.len()),
            ));
        }
        let expect = match (
            raw.expect.take(),
            raw.expect_hex.take(),
            raw.expect_regex.take(),
        ) {
            (None, None, None) => UdpExpect::Any,
            (Some(text), None, None) => UdpExpect::Prefix(text.into_bytes()),
            (None, Some(h), None) => UdpExpect::Prefix(hex(h, "expect-hex")?),
            (None, None, Some(pattern)) => {
                regex::Regex::new(&pattern)
                    .map_err(|e| self.err(key("expect-regex"), e.to_string()))?;
                UdpExpect::Regex(pattern)
            }
            _ => {
                return Err(self.err(
                    key("expect"),
                    "give one of expect, expect-hex and expect-regex",
                ));
            }
        };
        Ok(UdpCheck { send, expect })
    }

    /// `check = "tls"`: `sni` a DNS name; `ca-file` an absolute path to PEM
    /// certificates, read now (and at every reload). Takes its keys.
    fn tls_check(&self, prefix: &str, raw: &mut RawHealth) -> Result<TlsCheck, ConfigError> {
        use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject as _};
        let key = |field: &str| format!("{prefix}.{field}");
        let sni = raw.sni.take();
        if let Some(name) = &sni
            && !matches!(
                ServerName::try_from(name.as_str()),
                Ok(ServerName::DnsName(_))
            )
        {
            return Err(self.err(key("sni"), format!("not a DNS name: {name:?}")));
        }
        let ca = match raw.ca_file.take() {
            None => None,
            Some(text) => {
                let path = PathBuf::from(&text);
                if !path.is_absolute() {
                    return Err(self.err(
                        key("ca-file"),
                        format!("must be an absolute path, got {text:?}"),
                    ));
                }
                let certs: Vec<Vec<u8>> = CertificateDer::pem_file_iter(&path)
                    .and_then(|certs| certs.map(|c| c.map(|c| c.to_vec())).collect())
                    .map_err(|e| self.err(key("ca-file"), format!("{}: {e}", path.display())))?;
                if certs.is_empty() {
                    return Err(self.err(
                        key("ca-file"),
                        format!("{}: no PEM certificate in it", path.display()),
                    ));
                }
                Some((path, certs))
            }
        };
        Ok(TlsCheck { sni, ca })
    }

    /// `check = "dns"`: `query-name` (required, a DNS name), `query-type`
    /// (default A), `transport` (udp, the default, or tcp), `expect-rcode`
    /// (default NOERROR) and an optional `expect-answer` (an address for A
    /// and AAAA). Takes the keys it uses out of `raw`.
    fn dns_check(&self, prefix: &str, raw: &mut RawHealth) -> Result<DnsCheck, ConfigError> {
        use hickory_proto::rr::{Name, RecordType};
        let key = |field: &str| format!("{prefix}.{field}");
        let text = self.required(raw.query_name.take(), &key("query-name"))?;
        let mut name = Name::from_ascii(&text)
            .map_err(|e| self.err(key("query-name"), format!("not a DNS name {text:?}: {e}")))?;
        if name.is_root() {
            return Err(self.err(key("query-name"), "give a name below the root"));
        }
        name.set_fqdn(true);
        let record_type = raw.query_type.take().unwrap_or_else(|| "A".to_owned());
        let parsed = record_type
            .to_ascii_uppercase()
            .parse::<RecordType>()
            .ok()
            // Types that are not questions about data (OPT, ANY, AXFR…).
            .filter(|t| {
                !matches!(
                    t,
                    RecordType::ANY | RecordType::AXFR | RecordType::IXFR | RecordType::OPT
                )
            });
        let Some(parsed) = parsed else {
            return Err(self.err(
                key("query-type"),
                format!("not a record type to query: {record_type:?} (e.g. \"A\", \"AAAA\", \"SOA\", \"TXT\")"),
            ));
        };
        let transport = match raw.transport.take().as_deref() {
            None | Some("udp") => DnsTransport::Udp,
            Some("tcp") => DnsTransport::Tcp,
            Some(other) => {
                return Err(self.err(
                    key("transport"),
                    format!("must be \"udp\" (with TCP when truncated) or \"tcp\", got {other:?}"),
                ));
            }
        };
        let expect_rcode = match raw.expect_rcode.take() {
            None => DnsRcode::NoError,
            Some(text) => DnsRcode::parse(&text).ok_or_else(|| {
                let names: Vec<&str> = DnsRcode::ALL.iter().map(|(_, n, _)| *n).collect();
                self.err(
                    key("expect-rcode"),
                    format!("must be one of {}, got {text:?}", names.join(", ")),
                )
            })?,
        };
        let expect_answer = raw.expect_answer.take();
        if let Some(answer) = &expect_answer {
            let valid = match parsed {
                RecordType::A => answer.parse::<std::net::Ipv4Addr>().is_ok(),
                RecordType::AAAA => answer.parse::<std::net::Ipv6Addr>().is_ok(),
                _ => !answer.trim().is_empty(),
            };
            if !valid {
                return Err(self.err(
                    key("expect-answer"),
                    format!("not {parsed} record data: {answer:?}"),
                ));
            }
            if expect_rcode != DnsRcode::NoError {
                return Err(self.err(
                    key("expect-answer"),
                    format!("an answer comes with NOERROR, not {}", expect_rcode.name()),
                ));
            }
        }
        Ok(DnsCheck {
            name: name.to_ascii(),
            record_type: parsed.to_string(),
            transport,
            expect_rcode,
            expect_answer,
        })
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

    pub(super) fn health(
        &self,
        prefix: &str,
        mut raw: RawHealth,
    ) -> Result<HealthCheck, ConfigError> {
        let key = |field: &str| format!("{prefix}.{field}");

        let kind = self.required(raw.check, &key("check"))?;
        // An HTTP-only key on another check would be silently ignored,
        // which hides the mistake of forgetting check = "http".
        if !matches!(kind, RawCheck::Http) {
            let http_only = [
                ("path", raw.path.is_some()),
                ("expect-status", raw.expect_status.is_some()),
                ("expect-body", raw.expect_body.is_some()),
            ];
            if let Some((field, _)) = http_only.iter().find(|(_, set)| *set) {
                return Err(self.err(key(field), "only valid with check = \"http\""));
            }
        }
        let check = match kind {
            RawCheck::Tcp => CheckKind::Tcp,
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
                    Some(s) => self.in_range(s, 100..600, &key("expect-status"))?,
                };
                CheckKind::Http {
                    path,
                    expect_status,
                    expect_body: raw.expect_body,
                }
            }
            RawCheck::Mysql => CheckKind::Mysql(self.mysql_login(
                prefix,
                raw.user.take(),
                raw.password.take(),
                raw.password_file.take(),
            )?),
            RawCheck::Udp => CheckKind::Udp(self.udp_check(prefix, &mut raw)?),
            RawCheck::Tls => CheckKind::Tls(self.tls_check(prefix, &mut raw)?),
            RawCheck::Dns => CheckKind::Dns(self.dns_check(prefix, &mut raw)?),
        };
        // Keys of the DNS check on another check would be silently ignored.
        let dns_keys = [
            ("query-name", raw.query_name.is_some()),
            ("query-type", raw.query_type.is_some()),
            ("transport", raw.transport.is_some()),
            ("expect-rcode", raw.expect_rcode.is_some()),
            ("expect-answer", raw.expect_answer.is_some()),
        ];
        if let Some((field, _)) = dns_keys.iter().find(|(_, set)| *set) {
            return Err(self.err(key(field), "only valid with check = \"dns\""));
        }
        let tls_keys = [
            ("sni", raw.sni.is_some()),
            ("ca-file", raw.ca_file.is_some()),
        ];
        if let Some((field, _)) = tls_keys.iter().find(|(_, set)| *set) {
            return Err(self.err(key(field), "only valid with check = \"tls\""));
        }
        // Keys of the UDP check on another check would be silently ignored.
        let udp_keys = [
            ("send", raw.send.is_some()),
            ("send-hex", raw.send_hex.is_some()),
            ("expect", raw.expect.is_some()),
            ("expect-hex", raw.expect_hex.is_some()),
            ("expect-regex", raw.expect_regex.is_some()),
        ];
        if let Some((field, _)) = udp_keys.iter().find(|(_, set)| *set) {
            return Err(self.err(key(field), "only valid with check = \"udp\""));
        }
        // Login keys on a check that never logs in would be silently ignored.
        let login_keys = [
            ("user", raw.user.is_some()),
            ("password", raw.password.is_some()),
            ("password-file", raw.password_file.is_some()),
        ];
        if let Some((field, _)) = login_keys.iter().find(|(_, set)| *set) {
            return Err(self.err(key(field), "only valid with check = \"mysql\""));
        }

        let port = match raw.port {
            None => None,
            Some(p) => Some(self.in_range(p, 1..65536, &key("port"))?),
        };

        let duration = |value: Option<String>, field: &str, default: Duration| match value {
            None => Ok(default),
            Some(text) => duration::parse_at_most(
                &text,
                HEALTH_DURATION_MAX,
                "a backend probed less often than hourly is not health-checked",
            )
            .map_err(|reason| self.err(key(field), reason)),
        };
        let interval = duration(raw.interval, "interval", DEFAULT_INTERVAL)?;
        let timeout = duration(raw.timeout, "timeout", DEFAULT_TIMEOUT)?;
        // A probe still pending when the next one is due would overlap it.
        if timeout > interval {
            return Err(self.err(
                key("timeout"),
                format!(
                    "timeout {} must not exceed interval {}",
                    duration::show(timeout),
                    duration::show(interval)
                ),
            ));
        }

        let count = |value: Option<i64>, field: &str, default: u32| -> Result<u32, ConfigError> {
            match value {
                None => Ok(default),
                Some(n) => self.in_range(n, 1..RISE_FALL_MAX + 1, &key(field)),
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

    /// A VIP: a [`socket_addr`](Self::socket_addr) that packets can reach
    /// the data plane on. Packets to 127.0.0.0/8 never leave the host's
    /// loopback device, so XDP on the configured interfaces never sees them.
    pub(super) fn vip(
        &self,
        text: &str,
        key: &str,
        example: &str,
    ) -> Result<SocketAddrV4, ConfigError> {
        let vip = self.socket_addr(text, key, example)?;
        if vip.ip().is_loopback() {
            return Err(self.err(
                key,
                format!(
                    "{} is a loopback address (127.0.0.0/8): packets to it never reach \
                     the interfaces XDP runs on, so the service would never get a packet",
                    vip.ip()
                ),
            ));
        }
        Ok(vip)
    }

    /// `[monitoring] listen` on a VIP's address and port would never see a
    /// request: the data plane takes every packet to a VIP first.
    fn monitoring_clear_of_vips(
        &self,
        monitoring: Option<&Monitoring>,
        services: &[Service],
    ) -> Result<(), ConfigError> {
        let Some(listen) = monitoring.map(|m| m.listen) else {
            return Ok(());
        };
        match services
            .iter()
            .find(|s| s.vip == listen && s.protocol == Protocol::Tcp)
        {
            None => Ok(()),
            Some(s) => Err(self.err(
                "monitoring.listen",
                format!(
                    "{listen} is the VIP of service {:?}: the data plane forwards every \
                     packet to it to the backends, so the listener would never see a \
                     request; listen on another address or port",
                    s.name
                ),
            )),
        }
    }

    pub(super) fn socket_addr(
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
pub(super) fn address_problem(ip: Ipv4Addr) -> Option<String> {
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
pub(super) fn name_problem(name: &str) -> Option<String> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-');
    if (1..=NAME_MAX).contains(&name.len()) && name.chars().all(ok_char) {
        None
    } else {
        Some(format!(
            "expected 1 to {NAME_MAX} characters from A-Z a-z 0-9 _ . -, got {name:?}"
        ))
    }
}
