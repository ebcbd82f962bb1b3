//! Firewall rules of one scope (`[firewall]`, or a service's or pool's
//! `allow-from`, `deny-from` and `rate-limit`): the validated model
//! ([`Firewall`], [`Prefix`], [`Prefix6`], [`RateLimit`]) and its validation.
//!
//! A list holds prefixes of either family; the model keeps each family's
//! apart (`deny`/`allow` IPv4, `deny6`/`allow6` IPv6), as the data plane
//! keeps each family's rules in its own LPM trie.

use std::{
    fmt,
    net::{Ipv4Addr, Ipv6Addr},
};

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
    /// IPv6 sources whose new flows are dropped.
    pub deny6: Vec<Prefix6>,
    /// IPv6 sources accepted. An allow list is one list over both
    /// families: either family's entries make it exhaustive for both.
    pub allow6: Vec<Prefix6>,
}

impl Firewall {
    pub fn is_empty(&self) -> bool {
        self.deny.is_empty()
            && self.allow.is_empty()
            && self.deny6.is_empty()
            && self.allow6.is_empty()
            && self.rate_limit.is_none()
    }

    /// The deny list as the config spells it (IPv4 entries, then IPv6).
    pub fn deny_texts(&self) -> Vec<String> {
        texts(&self.deny, &self.deny6)
    }

    /// The allow list as the config spells it (IPv4 entries, then IPv6).
    pub fn allow_texts(&self) -> Vec<String> {
        texts(&self.allow, &self.allow6)
    }

    /// Adds (`add`) or removes `text`'s prefix to or from the deny (or
    /// allow) list of its family: the prefix as text, and whether the list
    /// changed (`false`: it was there already, or was not there to remove).
    /// The reason when `text` is not a prefix.
    pub fn edit(&mut self, deny: bool, add: bool, text: &str) -> Result<(String, bool), String> {
        if is_ipv6_text(text) {
            let p = Prefix6::parse(text)?;
            let list = if deny {
                &mut self.deny6
            } else {
                &mut self.allow6
            };
            Ok((p.to_string(), edit_list(list, p, add)))
        } else {
            let p = Prefix::parse(text)?;
            let list = if deny {
                &mut self.deny
            } else {
                &mut self.allow
            };
            Ok((p.to_string(), edit_list(list, p, add)))
        }
    }
}

/// Adds or removes `p`; whether `list` changed.
fn edit_list<P: PartialEq>(list: &mut Vec<P>, p: P, add: bool) -> bool {
    match (add, list.iter().position(|q| *q == p)) {
        (true, None) => {
            list.push(p);
            true
        }
        (false, Some(i)) => {
            list.remove(i);
            true
        }
        (true, Some(_)) | (false, None) => false,
    }
}

fn texts(v4: &[Prefix], v6: &[Prefix6]) -> Vec<String> {
    v4.iter()
        .map(ToString::to_string)
        .chain(v6.iter().map(ToString::to_string))
        .collect()
}

/// IPv6 text has a colon; IPv4 never does.
fn is_ipv6_text(text: &str) -> bool {
    text.contains(':')
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

/// An IPv6 source prefix (CIDR) without host bits, e.g. 2001:db8::/32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Prefix6 {
    pub addr: Ipv6Addr,
    pub len: u8,
}

impl Prefix6 {
    /// Parses `ADDR/LEN` (or a bare address, a /128); the reason when it is
    /// not one, or has host bits set.
    pub fn parse(text: &str) -> Result<Prefix6, String> {
        let (addr_text, len_text) = text.split_once('/').unwrap_or((text, "128"));
        let (Ok(addr), Ok(len)) = (addr_text.parse::<Ipv6Addr>(), len_text.parse::<u8>()) else {
            return Err(format!(
                "expected an IPv6 prefix like \"2001:db8::/32\", got {text:?}"
            ));
        };
        if len > 128 {
            return Err(format!(
                "prefix length must be between 0 and 128, got {len} in {text:?}"
            ));
        }
        let masked = Ipv6Addr::from(u128::from(addr) & Prefix6::mask(len));
        if masked != addr {
            return Err(format!(
                "{text:?} has host bits set: did you mean \"{masked}/{len}\"?"
            ));
        }
        Ok(Prefix6 { addr, len })
    }

    /// The netmask of a prefix length, host order.
    pub fn mask(len: u8) -> u128 {
        if len == 0 {
            0
        } else {
            u128::MAX << (128 - u32::from(len))
        }
    }

    /// Does the prefix hold `ip`?
    pub fn contains(&self, ip: Ipv6Addr) -> bool {
        u128::from(ip) & Prefix6::mask(self.len) == u128::from(self.addr)
    }
}

impl fmt::Display for Prefix6 {
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
    /// IPv6 sources sharing a bucket: 128 per address, 64 per /64 (a
    /// client rotating addresses within its /64 keeps one bucket), 0 with
    /// `per = "all"`.
    pub per6: u8,
}

impl RateLimit {
    /// `per` as the config spells it: "address", "all" or "/N" (N up to
    /// 32 groups IPv4 sources, N from 33 to 128 IPv6 sources; the other
    /// family's stay per address).
    pub fn per_text(&self) -> String {
        match (self.per, self.per6) {
            (32, 128) => "address".to_owned(),
            (0, _) => "all".to_owned(),
            (32, n) => format!("/{n}"),
            (n, _) => format!("/{n}"),
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
        let (deny, deny6) = self.prefixes(keys.deny, deny.unwrap_or_default())?;
        let (allow, allow6) = self.prefixes(keys.allow, allow.unwrap_or_default())?;
        self.not_in_both(&keys, &allow, &deny)?;
        self.not_in_both(&keys, &allow6, &deny6)?;
        let rate_limit = match rate_limit {
            None => None,
            Some(r) => Some(self.rate_limit(keys.rate_limit, r)?),
        };
        let strip = |l: Vec<(usize, _)>| l.into_iter().map(|(_, p)| p).collect();
        let strip6 = |l: Vec<(usize, _)>| l.into_iter().map(|(_, p)| p).collect();
        Ok(Firewall {
            deny: strip(deny),
            allow: strip(allow),
            rate_limit,
            deny6: strip6(deny6),
            allow6: strip6(allow6),
        })
    }

    /// No prefix (of one family, with its index in its list) in both lists.
    fn not_in_both<P: PartialEq + fmt::Display>(
        &self,
        keys: &FirewallKeys<'_>,
        allow: &[(usize, P)],
        deny: &[(usize, P)],
    ) -> Result<(), ConfigError> {
        for (j, p) in allow {
            if let Some((k, _)) = deny.iter().find(|(_, d)| d == p) {
                return Err(self.err(
                    format!("{}[{j}]", keys.allow),
                    format!(
                        "{p} is also {}[{k}]: deny wins, so allowing it has no effect",
                        keys.deny
                    ),
                ));
            }
        }
        Ok(())
    }

    /// A list's prefixes by family, each with its index in the list; none
    /// twice.
    #[allow(clippy::type_complexity)]
    fn prefixes(
        &self,
        key: &str,
        texts: Vec<String>,
    ) -> Result<(Vec<(usize, Prefix)>, Vec<(usize, Prefix6)>), ConfigError> {
        let (mut v4, mut v6) = (Vec::new(), Vec::new());
        for (i, text) in texts.iter().enumerate() {
            let k = format!("{key}[{i}]");
            if is_ipv6_text(text) {
                let prefix = Prefix6::parse(text).map_err(|reason| self.err(&k, reason))?;
                self.first_time(key, &k, &v6, &prefix)?;
                v6.push((i, prefix));
            } else {
                let prefix = Prefix::parse(text).map_err(|reason| self.err(&k, reason))?;
                self.first_time(key, &k, &v4, &prefix)?;
                v4.push((i, prefix));
            }
        }
        Ok((v4, v6))
    }

    fn first_time<P: PartialEq + fmt::Display>(
        &self,
        key: &str,
        k: &str,
        earlier: &[(usize, P)],
        prefix: &P,
    ) -> Result<(), ConfigError> {
        match earlier.iter().find(|(_, p)| p == prefix) {
            Some((j, _)) => Err(self.err(k, format!("{prefix} is already {key}[{j}]"))),
            None => Ok(()),
        }
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
        // A length names its family: up to /32 groups IPv4 sources, from
        // /33 IPv6 ones (a /64 is one IPv6 subscriber); the other family's
        // sources keep a bucket per address.
        let (per, per6) = match raw.per.as_deref() {
            None | Some("address") => (32, 128),
            Some("all") => (0, 0),
            Some(text) => match text.strip_prefix('/').map(str::parse::<u8>) {
                Some(Ok(len)) if (8..=32).contains(&len) => (len, 128),
                Some(Ok(len)) if (33..=128).contains(&len) => (32, len),
                _ => {
                    return Err(self.err(
                        k("per"),
                        format!(
                            "expected \"address\", \"all\" (one bucket for every source) or a \
                             prefix length from \"/8\" to \"/32\" (e.g. \"/24\"; IPv4 \
                             sources) or from \"/33\" to \"/128\" (e.g. \"/64\"; IPv6 \
                             sources), got {text:?}"
                        ),
                    ));
                }
            },
        };
        Ok(RateLimit {
            new_flows_per_second,
            burst,
            per,
            per6,
        })
    }
}
