//! `[dataplane] source-addresses`, `source-ports` and
//! `source-port-quarantine`: the addresses and the port range full-NAT
//! services (`forwarding = "full-nat"`) translate their clients to, how
//! long a freed port stays out of the pool (docs/architecture.md, "Full
//! NAT"), and their rules.

use std::{net::Ipv4Addr, time::Duration};

use lb_common::{
    FNAT_MAX_SOURCES,
    fullnat::{DEFAULT_PORT_HI, DEFAULT_PORT_LO},
};

use super::{
    ConfigError, duration,
    validate::{Validator, address_problem},
};

/// `source-port-quarantine`'s default: Linux's TIME_WAIT (60 s), which a
/// backend holds after it closed first.
pub const DEFAULT_QUARANTINE: Duration = Duration::from_secs(60);
/// Its longest: an hour (each quarantined port is a port out of the pool).
pub const MAX_QUARANTINE: Duration = Duration::from_secs(3600);

/// Full NAT's source side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FullNatSources {
    /// `source-addresses`: addresses of this host the backends can answer;
    /// empty: the address this host reaches each full-NAT backend from
    /// (its route's preferred source), found at each apply.
    pub addresses: Vec<Ipv4Addr>,
    /// `source-ports`: the allocated ports, inclusive.
    pub port_lo: u16,
    pub port_hi: u16,
    /// `source-port-quarantine`: how long a port an established flow held
    /// stays out of the pool toward its backend once the flow ended (the
    /// backend's TIME_WAIT); zero: none.
    pub quarantine: Duration,
}

impl Default for FullNatSources {
    fn default() -> Self {
        FullNatSources {
            addresses: Vec::new(),
            port_lo: DEFAULT_PORT_LO,
            port_hi: DEFAULT_PORT_HI,
            quarantine: DEFAULT_QUARANTINE,
        }
    }
}

impl FullNatSources {
    /// The `source-ports` text ("lo-hi") of the range.
    pub fn ports_text(&self) -> String {
        format!("{}-{}", self.port_lo, self.port_hi)
    }
}

impl Validator<'_> {
    /// `[dataplane] source-addresses`, `source-ports` and
    /// `source-port-quarantine`.
    pub(super) fn full_nat_sources(
        &self,
        addresses: Option<Vec<String>>,
        ports: Option<String>,
        quarantine: Option<String>,
    ) -> Result<FullNatSources, ConfigError> {
        let mut sources = FullNatSources::default();
        let key = "dataplane.source-addresses";
        let addresses = addresses.unwrap_or_default();
        if addresses.len() > FNAT_MAX_SOURCES {
            return Err(self.err(
                key,
                format!(
                    "at most {FNAT_MAX_SOURCES} addresses, got {}",
                    addresses.len()
                ),
            ));
        }
        for text in addresses {
            let addr: Ipv4Addr = text.parse().map_err(|_| {
                self.err(
                    key,
                    format!("expected IPv4 addresses like \"198.19.0.1\", got {text:?}"),
                )
            })?;
            if let Some(reason) = address_problem(addr.into()) {
                return Err(self.err(key, reason));
            }
            if addr.is_loopback() {
                return Err(self.err(
                    key,
                    format!("{addr} is a loopback address: backends cannot answer it"),
                ));
            }
            if sources.addresses.contains(&addr) {
                return Err(self.err(key, format!("{addr} is listed twice")));
            }
            sources.addresses.push(addr);
        }
        if let Some(text) = ports {
            (sources.port_lo, sources.port_hi) = self.port_range(&text)?;
        }
        if let Some(text) = quarantine {
            sources.quarantine = self.quarantine(&text)?;
        }
        Ok(sources)
    }

    /// A duration of at most [`MAX_QUARANTINE`], or "0s": none.
    fn quarantine(&self, text: &str) -> Result<Duration, ConfigError> {
        if text == "0s" {
            return Ok(Duration::ZERO);
        }
        duration::parse_at_most(
            text,
            MAX_QUARANTINE,
            "each quarantined port is out of the pool; \"0s\": none",
        )
        .map_err(|reason| self.err("dataplane.source-port-quarantine", reason))
    }

    /// "lo-hi", 1 ≤ lo ≤ hi ≤ 65535.
    fn port_range(&self, text: &str) -> Result<(u16, u16), ConfigError> {
        let key = "dataplane.source-ports";
        let bad = || {
            self.err(
                key,
                format!("expected a port range like \"1024-32767\", got {text:?}"),
            )
        };
        let (lo, hi) = text.split_once('-').ok_or_else(bad)?;
        let lo: u16 = lo.trim().parse().map_err(|_| bad())?;
        let hi: u16 = hi.trim().parse().map_err(|_| bad())?;
        if lo == 0 || lo > hi {
            return Err(self.err(
                key,
                format!("the range must run from 1 to 65535, low to high, got {text:?}"),
            ));
        }
        Ok((lo, hi))
    }
}
