//! The validator: raw config -> validated [`Config`], with the limits,
//! defaults and field rules, stopping at the first error in document order.
//! This file holds the validator's core (errors, required keys, ranges),
//! the rules of the config as a whole (limits across services,
//! `[dataplane]`, `[monitoring]`, `[announce]`) and of addresses and names;
//! a section's own rules sit beside its model (`service`, `health`,
//! `firewall`, `pool`, `coordination`).

use std::{
    net::{IpAddr, SocketAddr},
    ops::Range,
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use lb_common::{
    DEFAULT_CONNTRACK_SIZE, MAX_BACKENDS, MAX_FW_RULES, MAX_MAGLEV_SERVICES, MAX_SERVICES,
};

use super::{
    Announce, Config, ConfigError, Dataplane, Firewall, Forwarding, Monitoring, Protocol, Service,
    Timeouts, XdpMode, duration,
    firewall::FirewallKeys,
    raw::{RawAnnounce, RawConfig, RawDataplane, RawMonitoring, RawTimeouts},
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
/// Katran's figure: about 125k new connections per second per core.
const DEFAULT_NEW_FLOW_BUDGET: u32 = 125_000;
const LISTEN_EXAMPLE: &str = "127.0.0.1:9100";

// ---------------------------------------------------------------------------
// Validation: raw -> validated, stopping at the first error in document order.
// ---------------------------------------------------------------------------

pub(super) struct Validator<'a> {
    pub(super) file: &'a Path,
}

impl Validator<'_> {
    pub(super) fn err(&self, key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
        ConfigError::invalid(self.file, key, reason)
    }

    pub(super) fn required<T>(&self, value: Option<T>, key: &str) -> Result<T, ConfigError> {
        value.ok_or_else(|| self.err(key, "required key is missing"))
    }

    /// `value` if it is in `range`, as the field's integer type `T` (which
    /// holds the whole range, so that conversion does not fail in practice).
    pub(super) fn in_range<T: TryFrom<i64>>(
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
        let sync = raw.sync.map(|s| self.sync(s)).transpose()?;

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
        // Every prefix of every scope is one rule with its own counter (one
        // id space over both families; each family's rules fill a trie of
        // their own).
        let count = |f: &Firewall| f.deny.len() + f.allow.len() + f.deny6.len() + f.allow6.len();
        let mut rules = count(&firewall);
        for (i, s) in services.iter().enumerate() {
            rules += count(&s.firewall);
            if rules > MAX_FW_RULES as usize {
                return Err(self.err(
                    format!("service[{i}]"),
                    format!(
                        "more than {MAX_FW_RULES} firewall rules (prefixes of both families) \
                         across [firewall] and every service"
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
            sync,
            services,
            pools,
        })
    }

    fn monitoring(&self, raw: RawMonitoring) -> Result<Monitoring, ConfigError> {
        let key = "monitoring.listen";
        let text = self.required(raw.listen, key)?;
        let listen = self.addr_and_port(&text, key, LISTEN_EXAMPLE)?;
        let ip = listen.ip();
        if matches!(ip, IpAddr::V4(v4) if v4.is_broadcast()) || ip.is_multicast() {
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
        let tunnel_source = match raw.tunnel_source {
            None => None,
            Some(text) => {
                Some(self.tunnel_source("dataplane.tunnel-source", &text, "198.19.0.1")?)
            }
        };
        let tunnel_source6 = match raw.tunnel_source6 {
            None => None,
            Some(text) => {
                Some(self.tunnel_source("dataplane.tunnel-source6", &text, "2001:db8:19::1")?)
            }
        };
        let gue_port = match raw.gue_port {
            None => lb_common::tunnel::GUE_DEFAULT_PORT,
            Some(port) => self.in_range(port, 1..65536, "dataplane.gue-port")?,
        };
        let full_nat = self.full_nat_sources(
            raw.source_addresses,
            raw.source_ports,
            raw.source_port_quarantine,
        )?;
        Ok(Dataplane {
            full_nat,
            interfaces,
            forwarding: raw.forwarding.unwrap_or(Forwarding::Nat),
            xdp_mode: raw.xdp_mode.unwrap_or(XdpMode::Native),
            conntrack_size,
            half_open_size,
            new_flow_budget,
            timeouts,
            tunnel_source,
            tunnel_source6,
            gue_port,
        })
    }

    /// `[dataplane] tunnel-source` (IPv4, `example` "198.19.0.1") and
    /// `tunnel-source6` (IPv6, "2001:db8:19::1", the IPv6 services' outer
    /// source): an address of this host that backends can answer, unicast,
    /// neither loopback nor link-local (the outer packets leave the host and
    /// cross routers).
    fn tunnel_source<A: FromStr + Into<IpAddr> + Copy>(
        &self,
        key: &str,
        text: &str,
        example: &str,
    ) -> Result<A, ConfigError> {
        let family = if example.contains(':') {
            "IPv6"
        } else {
            "IPv4"
        };
        let addr: A = text.parse().map_err(|_| {
            self.err(
                key,
                format!("expected an {family} address like {example:?}, got {text:?}"),
            )
        })?;
        let ip: IpAddr = addr.into();
        if let Some(reason) = address_problem(ip) {
            return Err(self.err(key, reason));
        }
        let refused = match ip {
            IpAddr::V4(v4) if v4.is_loopback() => Some("a loopback address (127.0.0.0/8)"),
            IpAddr::V6(v6) if v6.is_loopback() => Some("the loopback address"),
            IpAddr::V6(v6) if v6.is_unicast_link_local() => {
                Some("a link-local address (fe80::/10)")
            }
            _ => None,
        };
        if let Some(what) = refused {
            return Err(self.err(
                key,
                format!(
                    "{ip} is {what}: tunnel packets leave the host, and no router forwards a \
                     packet from it"
                ),
            ));
        }
        Ok(addr)
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

    /// A VIP: a [`socket_addr`](Self::socket_addr) that packets can reach
    /// the data plane on. Packets to 127.0.0.0/8 (or ::1) never leave the
    /// host's loopback device, so XDP on the configured interfaces never
    /// sees them.
    pub(super) fn vip(
        &self,
        text: &str,
        key: &str,
        example: &str,
    ) -> Result<SocketAddr, ConfigError> {
        let vip = self.socket_addr(text, key, example)?;
        if vip.ip().is_loopback() {
            let range = if vip.is_ipv4() { " (127.0.0.0/8)" } else { "" };
            return Err(self.err(
                key,
                format!(
                    "{} is a loopback address{range}: packets to it never reach \
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
    ) -> Result<SocketAddr, ConfigError> {
        let addr = self.addr_and_port(text, key, example)?;
        if let Some(reason) = address_problem(addr.ip()) {
            return Err(self.err(key, reason));
        }
        Ok(addr)
    }

    /// `text` as an IPv4 or bracketed IPv6 address and a port other than 0
    /// (`example` shows the form in the error).
    fn addr_and_port(
        &self,
        text: &str,
        key: &str,
        example: &str,
    ) -> Result<SocketAddr, ConfigError> {
        let addr: SocketAddr = text.parse().map_err(|_| {
            self.err(
                key,
                format!(
                    "expected an address and port like {example:?} \
                     (IPv6 in brackets, like \"[2001:db8::10]:80\"), got {text:?}"
                ),
            )
        })?;
        if addr.port() == 0 {
            return Err(self.err(key, format!("port 0 is not a usable port, got {text:?}")));
        }
        Ok(addr)
    }

    /// A required name under `key` that passes [`name_problem`] and is not
    /// one of `earlier` (the names of the `what`s before it).
    pub(super) fn unique_name<'n>(
        &self,
        raw: Option<String>,
        key: &str,
        what: &str,
        mut earlier: impl Iterator<Item = &'n str>,
    ) -> Result<String, ConfigError> {
        let name = self.required(raw, key)?;
        if let Some(reason) = name_problem(&name) {
            return Err(self.err(key, reason));
        }
        if let Some(j) = earlier.position(|n| n == name) {
            return Err(self.err(
                key,
                format!("duplicate {what} name, already used by {what}[{j}]"),
            ));
        }
        Ok(name)
    }
}

/// Why `ip` cannot be a VIP or a backend: neither end of a unicast flow can
/// be the unspecified, broadcast or a multicast address.
pub(super) fn address_problem(ip: IpAddr) -> Option<String> {
    if ip.is_unspecified() {
        Some(format!("{ip} is the unspecified address"))
    } else if matches!(ip, IpAddr::V4(v4) if v4.is_broadcast()) {
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
