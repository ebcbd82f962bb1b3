//! Firewall rules of one scope (`[firewall]`, or a service's or pool's
//! `allow-from`, `deny-from` and `rate-limit`): the validated model
//! ([`Firewall`], [`Prefix`], [`RateLimit`]) and its validation.

use std::{fmt, net::Ipv4Addr};

use lb_common::{FW_BURST_MAX, FW_RATE_MAX};

use super::{ConfigError, raw::RawRateLimit, validate::Validator};

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

/// Where one scope's firewall keys are, for errors.
pub(super) struct FirewallKeys<'a> {
    pub(super) deny: &'a str,
    pub(super) allow: &'a str,
    pub(super) rate_limit: &'a str,
}

impl Validator<'_> {
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

    pub(super) fn firewall(
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
}
