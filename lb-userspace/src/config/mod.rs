//! The TOML config: the validated model ([`Config`] and its parts), and
//! [`load`], [`parse`] and [`check`], which accept a config whole or reject
//! it whole. This folder owns everything about the config file: the raw TOML
//! mirror (`raw`), the validator and the whole config's rules (`validate`),
//! each section's model and rules (`service`, `health`, `firewall`, `pool`,
//! `coordination`), the duration syntax ([`duration`]) and locating TOML
//! errors (`keypath`). This file holds the top-level model (`[dataplane]`,
//! `[monitoring]`, `[announce]`) and the entry points.
//!
//! Every error names the file, the key (e.g. `service[1].backends[2].address`)
//! and the reason.

mod coordination;
pub mod duration;
mod firewall;
mod fullnat;
mod health;
mod keypath;
mod pool;
mod proxy;
mod raw;
mod service;
mod sync;
mod validate;

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

pub use coordination::{ClientCert, Coordination, EtcdLogin, EtcdTls, KeyDer};
pub use firewall::{Firewall, Prefix, Prefix6, RateLimit};
pub use fullnat::FullNatSources;
pub use health::{
    CheckKind, DnsCheck, DnsRcode, DnsTransport, HealthCheck, MysqlLogin, Secret, TlsCheck,
    UdpCheck, UdpExpect,
};
pub use pool::{Pool, PoolMember};
pub use proxy::ProxyProtocol;
use raw::RawConfig;
pub use service::{
    Backend, OnBackendDown, Protocol, SOURCE_IP_WHOLE, Scheduler, Service, ServiceLimits,
};
pub use sync::{MIN_KEY_LEN, Sync};
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
    /// `[sync]`: flow-state sync with the other LBs; `None`: off.
    pub sync: Option<Sync>,
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

/// `[monitoring]`: where the agent serves its metrics and status page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Monitoring {
    /// Address and port of the HTTP listener, e.g. 127.0.0.1:9100 or
    /// [::1]:9100.
    pub listen: SocketAddr,
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
    /// New flows one CPU enters per second before new flows of DSR and
    /// tunnel services with a hash scheduler go stateless; 0: no limit.
    pub new_flow_budget: u32,
    pub timeouts: Timeouts,
    /// `tunnel-source`: the outer source address of IPIP and GUE packets;
    /// `None`: for each backend, the address this host reaches it from
    /// (the source the kernel picks for its route).
    pub tunnel_source: Option<Ipv4Addr>,
    /// `tunnel-source6`: the outer source address of IPv6 services' IP6IP6
    /// and GUE packets; `None`: the address this host reaches each IPv6
    /// backend from.
    pub tunnel_source6: Option<Ipv6Addr>,
    /// `gue-port`: the UDP port GUE packets go to on the backends.
    pub gue_port: u16,
    /// `source-addresses`, `source-ports`: full NAT's source side.
    pub full_nat: FullNatSources,
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
    /// but the flow timeouts, the budget and the tunnels' settings does
    /// (attachment, modes, map sizes); those are written live (the tunnel
    /// settings with every backend, at each apply).
    pub fn needs_restart_from(&self, old: &Dataplane) -> bool {
        let fixed = |d: &Dataplane| Dataplane {
            timeouts: Timeouts::default(),
            new_flow_budget: 0,
            tunnel_source: None,
            tunnel_source6: None,
            gue_port: 0,
            full_nat: FullNatSources::default(),
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
            // The table's and the kernel's, not the config's: the data
            // plane fills them in.
            half_open_slots: 0,
            half_open_seed: 0,
            jiffy_ns: 0,
            clock_epoch_ns: 0,
            established_slots: 0,
            table_version: 0,
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
    /// The packet, untouched, in an outer IPv4 header to the backend.
    Ipip,
    /// The packet, untouched, in IPv4 + UDP + GUE headers to the backend.
    Gue,
    /// Both ends translated: the backend's address replaces the VIP, an
    /// address and port of the LB's the client's (`[dataplane]
    /// source-addresses`); backends need no route to the clients.
    FullNat,
}

impl Forwarding {
    /// The data plane's code for this mode (`ServiceConf::mode`).
    pub fn code(self) -> u32 {
        use lb_common::{MODE_DSR, MODE_GUE, MODE_IPIP, MODE_NAT};
        match self {
            Forwarding::Nat => MODE_NAT,
            Forwarding::Dsr => MODE_DSR,
            Forwarding::Ipip => MODE_IPIP,
            Forwarding::Gue => MODE_GUE,
            Forwarding::FullNat => lb_common::MODE_FULL_NAT,
        }
    }

    /// Does the backend get the client's packet as sent, to the VIP (DSR
    /// and the tunnels)? Then it must listen on the VIP's port, hold the
    /// VIP, and answer the client itself. The data plane's rule
    /// (`lb_common::answers_directly`), decided once.
    pub fn answers_directly(self) -> bool {
        lb_common::answers_directly(self.code())
    }

    /// Is this a tunnel mode (IPIP, GUE)?
    pub fn is_tunnel(self) -> bool {
        lb_common::is_tunnel(self.code())
    }
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

impl ConfigError {
    /// A rejection naming the file, the key and the reason.
    pub fn invalid(file: &Path, key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            file: file.to_path_buf(),
            key: key.into(),
            reason: reason.into(),
        }
    }
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
