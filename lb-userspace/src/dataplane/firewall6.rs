//! The firewall's IPv6 rules planned into their own LPM layout (`FwKey6`:
//! scope then a 16-byte prefix, the LPM length `32 + CIDR length`), and
//! each scope's IPv6 bucket mask for `per`. Pure, host-tested. IPv4's rules
//! and scope confs are [`super::firewall`]'s, unchanged by IPv6 entries
//! except that an allow list of either family makes it exhaustive.
//!
//! Not written yet: the data plane has no IPv6 firewall tries (its IPv6
//! path balances nothing yet), so nothing reads these keys; the writer
//! takes them as IPv4's are taken (additions first, ids kept).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv6Addr,
};

use lb_common::{
    FW_GLOBAL,
    ipv6::{Addr6, addr_of},
    maps6::FwKey6,
};

use super::firewall::{FwError, List};
use crate::config::{Config, Firewall, Prefix6};

/// One IPv6 rule: a prefix in a scope's deny or allow list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rule6 {
    /// A service id, or [`FW_GLOBAL`].
    pub scope: u32,
    pub list: List,
    pub prefix: Prefix6,
}

impl Rule6 {
    /// The LPM trie key: the scope (32 bits, exact) then the prefix.
    pub fn key(&self) -> (u32, FwKey6) {
        (
            32 + u32::from(self.prefix.len),
            FwKey6 {
                scope: self.scope,
                addr: addr_of(self.prefix.addr.octets()),
            },
        )
    }
}

/// The IPv6 source mask of a rate limit's `per6` as the bucket key takes
/// it (raw network-order words): all ones per address, a /64's mask per
/// /64, zero for `per = "all"`.
pub fn bucket_mask6(per6: u8) -> Addr6 {
    addr_of(Ipv6Addr::from(Prefix6::mask(per6)).octets())
}

/// Every IPv6 rule `cfg` asks for, and each rate-limited scope's IPv6
/// bucket mask; `service_ids` names each service's data-plane id.
#[allow(clippy::type_complexity)]
pub fn desired6(
    cfg: &Config,
    service_ids: &BTreeMap<String, u32>,
) -> Result<(BTreeSet<Rule6>, BTreeMap<u32, Addr6>), FwError> {
    let mut rules = BTreeSet::new();
    let mut masks = BTreeMap::new();
    let mut scope = |id: u32, fw: &Firewall| {
        for (list, prefixes) in [(List::Deny, &fw.deny6), (List::Allow, &fw.allow6)] {
            for prefix in prefixes {
                rules.insert(Rule6 {
                    scope: id,
                    list,
                    prefix: *prefix,
                });
            }
        }
        if let Some(r) = fw.rate_limit {
            masks.insert(id, bucket_mask6(r.per6));
        }
    };
    scope(FW_GLOBAL, &cfg.firewall);
    for svc in &cfg.services {
        let id = *service_ids
            .get(&svc.name)
            .ok_or_else(|| FwError::UnknownService(svc.name.clone()))?;
        scope(id, &svc.firewall);
    }
    Ok((rules, masks))
}

#[cfg(test)]
mod tests {
    use lb_common::{FW_F_ALLOW, FW_F_DENY};

    use super::*;
    use crate::{config, dataplane::firewall};

    fn cfg(global: &str, service: &str) -> Config {
        let text = format!(
            "[dataplane]\ninterfaces = [\"a\"]\n[firewall]\n{global}\n\
             [[service]]\nname = \"www\"\nvip = \"198.18.0.10:80\"\n{service}\n\
             backends = [{{ address = \"198.19.0.11:80\" }}]\n"
        );
        config::parse(&text, std::path::Path::new("t.toml")).expect("valid")
    }

    fn ids() -> BTreeMap<String, u32> {
        [("www".to_owned(), 3)].into()
    }

    /// The key's address as the packet carries it.
    fn wire(addr: Addr6) -> [u8; 16] {
        let mut out = [0u8; 16];
        for (i, w) in addr.iter().enumerate() {
            out[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
        }
        out
    }

    #[test]
    fn ipv6_rules_get_their_own_keys_and_leave_ipv4_rules_as_they_were() {
        let mixed = cfg(
            "deny = [\"203.0.113.0/24\", \"2001:db8:bad::/48\"]\n\
             rate-limit = { new-flows-per-second = 10, per = \"/64\" }",
            "allow-from = [\"2001:db8:1::/64\", \"2001:db8:1::7\"]",
        );
        let (rules, masks) = desired6(&mixed, &ids()).expect("plan");
        let keys: Vec<(u32, u32, List, [u8; 16])> = rules
            .iter()
            .map(|r| {
                let (len, key) = r.key();
                (len, key.scope, r.list, wire(key.addr))
            })
            .collect();
        let ip = |t: &str| t.parse::<Ipv6Addr>().expect("ip").octets();
        assert_eq!(
            keys,
            [
                (32 + 64, 3, List::Allow, ip("2001:db8:1::")),
                (32 + 128, 3, List::Allow, ip("2001:db8:1::7")),
                (32 + 48, FW_GLOBAL, List::Deny, ip("2001:db8:bad::")),
            ]
        );
        // The global scope's IPv6 buckets are per /64; IPv4's per address.
        assert_eq!(
            masks.get(&FW_GLOBAL).map(|m| wire(*m)),
            Some(ip("ffff:ffff:ffff:ffff::"))
        );
        assert_eq!(mixed.firewall.rate_limit.map(|r| r.per), Some(32));

        // IPv4's plan: the IPv4 deny only; www's allow list (IPv6 entries
        // only) still makes the scope exhaustive for IPv4 sources.
        let (v4, scopes) = firewall::desired(&mixed, &ids()).expect("plan");
        assert_eq!(
            v4.iter().map(|r| r.to_string()).collect::<Vec<_>>(),
            ["deny 203.0.113.0/24"]
        );
        assert_eq!(scopes[&3].flags, FW_F_ALLOW);
        assert_eq!(scopes[&FW_GLOBAL].flags & FW_F_DENY, FW_F_DENY);
        let ipv4_only = cfg("deny = [\"203.0.113.0/24\"]", "");
        assert_eq!(
            firewall::desired(&ipv4_only, &ids()).expect("plan").0,
            v4,
            "IPv4 rules as without IPv6 entries"
        );
    }

    #[test]
    fn bucket_masks_follow_per() {
        assert_eq!(wire(bucket_mask6(128)), [0xff; 16]);
        assert_eq!(wire(bucket_mask6(0)), [0; 16]);
        let mut m56 = [0u8; 16];
        m56[..7].fill(0xff);
        assert_eq!(wire(bucket_mask6(56)), m56);
    }

    #[test]
    fn an_unknown_service_is_named() {
        let err = desired6(&cfg("", ""), &BTreeMap::new()).expect_err("no id");
        assert_eq!(err, FwError::UnknownService("www".into()));
    }
}
