//! The firewall's maps from a config, planned without touching them: which
//! rules (scope, list, prefix) to add with which ids, which to remove, and
//! the scope confs to write before and after. Pure, host-tested.
//!
//! One planner for both families: a rule's prefix is IPv4's or IPv6's
//! ([`Source`]), each family's rules go to its own LPM trie ([`RuleKey`]),
//! and rule ids (one counter array) and scope confs are shared. A rate
//! limit's IPv6 bucket mask (`per = "/64"`) is a scope's `masks6` entry.
//!
//! A change is written additions first (rules, then scopes with the union of
//! old and new flags), then the services, then removals (scopes with their
//! final flags, then rules). So no rule is ever missing while it is both in
//! the old and the new config, and a new service is published with its
//! rules already in place. For the microseconds between the two halves, a
//! source matched by an old or a new rule of a scope gets that rule.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, Ipv6Addr},
};

use lb_common::{
    FW_F_ALLOW, FW_F_DENY, FW_F_DENY6, FW_F_RATE, FW_GLOBAL, FwKey, FwScope, MAX_FW_RULES,
    ipv6::{Addr6, addr_of},
    maps6::FwKey6,
};

use crate::config::{Config, Firewall, Prefix, Prefix6};

/// Which list a rule is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum List {
    Deny,
    Allow,
}

impl List {
    pub fn name(self) -> &'static str {
        match self {
            List::Deny => "deny",
            List::Allow => "allow",
        }
    }
}

/// A rule's source prefix, of either family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Source {
    V4(Prefix),
    V6(Prefix6),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::V4(p) => p.fmt(f),
            Source::V6(p) => p.fmt(f),
        }
    }
}

/// One firewall rule: a prefix in a scope's deny or allow list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rule {
    /// A service id, or [`FW_GLOBAL`].
    pub scope: u32,
    pub list: List,
    pub prefix: Source,
}

/// A rule's LPM trie key in its family's trie: the LPM prefix length
/// (`32 + CIDR length`: the scope is exact) and the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuleKey {
    V4(u32, FwKey),
    V6(u32, FwKey6),
}

impl Rule {
    /// The LPM trie key: the scope (32 bits, exact) then the prefix.
    pub fn key(&self) -> RuleKey {
        match self.prefix {
            Source::V4(p) => RuleKey::V4(
                32 + u32::from(p.len),
                FwKey {
                    scope: self.scope,
                    addr: u32::from_ne_bytes(p.addr.octets()),
                },
            ),
            Source::V6(p) => RuleKey::V6(
                32 + u32::from(p.len),
                FwKey6 {
                    scope: self.scope,
                    addr: addr_of(p.addr.octets()),
                },
            ),
        }
    }

    /// The rule an LPM trie entry of `scope` and `addr` stands for (`None`:
    /// not one of ours).
    pub fn from_key(list: List, prefix_len: u32, scope: u32, addr: IpAddr) -> Option<Rule> {
        let len = u8::try_from(prefix_len.checked_sub(32)?).ok()?;
        let text = format!("{addr}/{len}");
        let prefix = match addr {
            IpAddr::V4(_) => Source::V4(Prefix::parse(&text).ok()?),
            IpAddr::V6(_) => Source::V6(Prefix6::parse(&text).ok()?),
        };
        Some(Rule {
            scope,
            list,
            prefix,
        })
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.list.name(), self.prefix)
    }
}

/// What the firewall maps hold: every rule with its id, and every scope
/// whose conf is not all zero.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FwIds {
    pub rules: BTreeMap<Rule, u32>,
    pub scopes: BTreeMap<u32, FwScope>,
    /// Each rate-limited scope's IPv6 bucket mask ([`prefix_mask6`]).
    pub masks6: BTreeMap<u32, Addr6>,
}

/// A planned firewall change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FwPlan {
    /// IPv6 bucket masks that change, written first: a mask only keys the
    /// buckets of a scope whose flags ask for a rate limit.
    pub masks6: Vec<(u32, Addr6)>,
    /// New rules with their fresh ids (counters zeroed before use).
    pub add: Vec<(Rule, u32)>,
    /// Scope confs written after the additions: the union of old and new.
    pub interim: Vec<(u32, FwScope)>,
    /// Scope confs written after the services: the final ones (all zero for
    /// a scope without rules any more).
    pub finals: Vec<(u32, FwScope)>,
    /// Rules that are gone, removed last.
    pub remove: Vec<(Rule, u32)>,
    /// The maps once the plan is written.
    pub next: FwIds,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FwError {
    #[error(
        "the old and the new firewall rules together exceed {MAX_FW_RULES} (each new rule is \
         added before the old ones go): apply the change in two steps"
    )]
    TooManyRules,
    #[error("service {0:?} has no data-plane id")]
    UnknownService(String),
}

/// The scope conf of one scope's rules.
pub fn scope_conf(fw: &Firewall) -> FwScope {
    let mut conf = FwScope::default();
    if !fw.deny.is_empty() {
        conf.flags |= FW_F_DENY;
    }
    if !fw.deny6.is_empty() {
        conf.flags |= FW_F_DENY6;
    }
    // An allow list is exhaustive over both families: IPv6 entries alone
    // still leave IPv4 sources out.
    if !fw.allow.is_empty() || !fw.allow6.is_empty() {
        conf.flags |= FW_F_ALLOW;
    }
    if let Some(r) = fw.rate_limit {
        conf.flags |= FW_F_RATE;
        conf.rate = r.new_flows_per_second;
        conf.burst = r.burst;
        conf.mask = u32::from_ne_bytes(Prefix::mask(r.per).to_be_bytes());
    }
    conf
}

/// The IPv6 mask of a prefix length as the data plane applies it (raw
/// network-order words): a rate limit's `per6` (all ones per address, a
/// /64's mask per /64, zero for `per = "all"`) or a `source-ip-prefix`.
pub fn prefix_mask6(per6: u8) -> Addr6 {
    addr_of(Ipv6Addr::from(Prefix6::mask(per6)).octets())
}

/// Every rule, scope conf and IPv6 bucket mask `cfg` asks for;
/// `service_ids` names each service's data-plane id.
pub fn desired(cfg: &Config, service_ids: &BTreeMap<String, u32>) -> Result<FwIds, FwError> {
    let mut rules = BTreeSet::new();
    let mut want = FwIds::default();
    let mut scope = |id: u32, fw: &Firewall| {
        for (list, v4, v6) in [
            (List::Deny, &fw.deny, &fw.deny6),
            (List::Allow, &fw.allow, &fw.allow6),
        ] {
            let sources = v4
                .iter()
                .map(|p| Source::V4(*p))
                .chain(v6.iter().map(|p| Source::V6(*p)));
            for prefix in sources {
                rules.insert(Rule {
                    scope: id,
                    list,
                    prefix,
                });
            }
        }
        let conf = scope_conf(fw);
        if conf != FwScope::default() {
            want.scopes.insert(id, conf);
        }
        if let Some(r) = fw.rate_limit {
            want.masks6.insert(id, prefix_mask6(r.per6));
        }
    };
    scope(FW_GLOBAL, &cfg.firewall);
    for svc in &cfg.services {
        let id = *service_ids
            .get(&svc.name)
            .ok_or_else(|| FwError::UnknownService(svc.name.clone()))?;
        scope(id, &svc.firewall);
    }
    // Ids are the planner's: the rules here hold none yet.
    want.rules = rules.into_iter().map(|r| (r, 0)).collect();
    Ok(want)
}

/// Plans the change from `current` to what `cfg` asks for. Rules in both
/// keep their ids (and counters); new ones take the lowest ids that no
/// current rule holds.
pub fn plan(
    current: &FwIds,
    cfg: &Config,
    service_ids: &BTreeMap<String, u32>,
) -> Result<FwPlan, FwError> {
    let FwIds {
        rules,
        scopes,
        masks6,
    } = desired(cfg, service_ids)?;
    let used: BTreeSet<u32> = current.rules.values().copied().collect();
    let mut free = (0..MAX_FW_RULES).filter(|id| !used.contains(id));
    let changed_masks = masks6
        .iter()
        .filter(|(id, mask)| current.masks6.get(id) != Some(mask))
        .map(|(id, mask)| (*id, *mask))
        .collect();
    let mut next = FwIds {
        rules: BTreeMap::new(),
        scopes: scopes.clone(),
        masks6,
    };
    let mut add = Vec::new();
    for rule in rules.keys() {
        let id = match current.rules.get(rule) {
            Some(&id) => id,
            None => {
                let id = free.next().ok_or(FwError::TooManyRules)?;
                add.push((*rule, id));
                id
            }
        };
        next.rules.insert(*rule, id);
    }
    let remove = current
        .rules
        .iter()
        .filter(|(rule, _)| !rules.contains_key(rule))
        .map(|(rule, id)| (*rule, *id))
        .collect();
    let ids: BTreeSet<u32> = current
        .scopes
        .keys()
        .chain(scopes.keys())
        .copied()
        .collect();
    let (mut interim, mut finals) = (Vec::new(), Vec::new());
    for id in ids {
        let old = current.scopes.get(&id).copied().unwrap_or_default();
        let new = scopes.get(&id).copied().unwrap_or_default();
        if old == new {
            continue;
        }
        let rate = if new.flags & FW_F_RATE != 0 { new } else { old };
        let union = FwScope {
            flags: old.flags | new.flags,
            ..rate
        };
        if union != old {
            interim.push((id, union));
        }
        if new != union {
            finals.push((id, new));
        }
    }
    Ok(FwPlan {
        masks6: changed_masks,
        add,
        interim,
        finals,
        remove,
        next,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;

    fn cfg(global_deny: &[&str], svc_allow: &[&str]) -> Config {
        let text = format!(
            "[dataplane]\ninterfaces = [\"a\"]\n[firewall]\ndeny = {global_deny:?}\n\
             [[service]]\nname = \"www\"\nvip = \"198.18.0.10:80\"\nallow-from = {svc_allow:?}\n\
             backends = [{{ address = \"198.19.0.11:80\" }}]\n"
        );
        config::parse(&text, std::path::Path::new("t.toml")).expect("valid")
    }

    fn ids() -> BTreeMap<String, u32> {
        [("www".to_owned(), 3)].into()
    }

    #[test]
    fn kept_rules_keep_their_ids_and_new_ones_never_take_a_live_id() {
        let first = plan(&FwIds::default(), &cfg(&["10.0.0.0/8"], &[]), &ids()).expect("plan");
        assert_eq!(first.add.len(), 1);
        assert_eq!(first.add[0].1, 0);
        assert_eq!(
            first.interim,
            vec![(
                FW_GLOBAL,
                FwScope {
                    flags: FW_F_DENY,
                    ..Default::default()
                }
            )]
        );
        assert!(first.finals.is_empty() && first.remove.is_empty());

        let second = plan(
            &first.next,
            &cfg(&["192.0.2.0/24"], &["198.18.0.0/24"]),
            &ids(),
        )
        .expect("plan");
        // 10/8 goes, last; the new rules take ids 1 and 2, not 0 (still live
        // until the removal).
        let added: Vec<u32> = second.add.iter().map(|(_, id)| *id).collect();
        assert_eq!(added, vec![1, 2]);
        assert_eq!(second.remove.len(), 1);
        assert_eq!(second.remove[0].1, 0);
        assert_eq!(
            second.interim,
            vec![(
                3,
                FwScope {
                    flags: FW_F_ALLOW,
                    ..Default::default()
                }
            )]
        );

        // Dropping the allow list: the flag is cleared before the entries go.
        let third = plan(&second.next, &cfg(&["192.0.2.0/24"], &[]), &ids()).expect("plan");
        assert!(third.add.is_empty() && third.interim.is_empty());
        assert_eq!(third.finals, vec![(3, FwScope::default())]);
        assert_eq!(third.remove.len(), 1);
        assert_eq!(
            third.next.rules.values().copied().collect::<Vec<_>>(),
            // Rules are planned in (scope, list, prefix) order: www's allow
            // rule took 1, the global deny 2.
            vec![2]
        );
    }

    #[test]
    fn a_rule_key_round_trips_and_masks_are_network_order() {
        let rule = Rule {
            scope: 7,
            list: List::Deny,
            prefix: Source::V4(Prefix::parse("203.0.113.0/24").expect("prefix")),
        };
        let RuleKey::V4(len, key) = rule.key() else {
            panic!("an IPv4 rule has an IPv4 key")
        };
        assert_eq!(len, 56);
        assert_eq!(key.addr.to_ne_bytes(), [203, 0, 113, 0]);
        let addr = IpAddr::from(key.addr.to_ne_bytes());
        assert_eq!(Rule::from_key(List::Deny, len, key.scope, addr), Some(rule));
        let fw = Firewall {
            rate_limit: Some(config::RateLimit {
                per6: 128,
                new_flows_per_second: 5,
                burst: 9,
                per: 24,
            }),
            ..Default::default()
        };
        assert_eq!(scope_conf(&fw).mask.to_ne_bytes(), [255, 255, 255, 0]);
    }

    fn cfg6(global: &str, service: &str) -> Config {
        let text = format!(
            "[dataplane]\ninterfaces = [\"a\"]\n[firewall]\n{global}\n\
             [[service]]\nname = \"www\"\nvip = \"[2001:db8:18::10]:80\"\n{service}\n\
             backends = [{{ address = \"[2001:db8:19::11]:80\" }}]\n"
        );
        config::parse(&text, std::path::Path::new("t.toml")).expect("valid")
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
    fn ipv6_rules_share_the_planner_and_ids_and_get_their_own_keys() {
        let mixed = cfg6(
            "deny = [\"203.0.113.0/24\", \"2001:db8:bad::/48\"]\n\
             rate-limit = { new-flows-per-second = 10, per = \"/64\" }",
            "allow-from = [\"2001:db8:1::/64\", \"2001:db8:1::7\"]",
        );
        let first = plan(&FwIds::default(), &mixed, &ids()).expect("plan");
        let ip = |t: &str| t.parse::<Ipv6Addr>().expect("ip").octets();
        let mut keys = Vec::new();
        for (rule, id) in &first.add {
            match rule.key() {
                RuleKey::V6(len, key) => {
                    keys.push((*id, len, key.scope, rule.list, wire(key.addr)))
                }
                RuleKey::V4(len, key) => {
                    assert_eq!((len, key.scope, *id), (56, FW_GLOBAL, 2), "{rule}");
                }
            }
            // Every key reads back as its rule (adoption, `lb firewall show`).
            let back = match rule.key() {
                RuleKey::V4(len, k) => {
                    Rule::from_key(rule.list, len, k.scope, IpAddr::from(k.addr.to_ne_bytes()))
                }
                RuleKey::V6(len, k) => {
                    Rule::from_key(rule.list, len, k.scope, IpAddr::from(wire(k.addr)))
                }
            };
            assert_eq!(back, Some(*rule));
        }
        // One id space over both families, rules in (scope, list, prefix)
        // order: www's two allow entries, then the global IPv4 and IPv6 deny.
        assert_eq!(
            keys,
            [
                (0, 32 + 64, 3, List::Allow, ip("2001:db8:1::")),
                (1, 32 + 128, 3, List::Allow, ip("2001:db8:1::7")),
                (3, 32 + 48, FW_GLOBAL, List::Deny, ip("2001:db8:bad::")),
            ]
        );
        assert_eq!(
            first
                .add
                .iter()
                .map(|(r, _)| r.to_string())
                .collect::<Vec<_>>(),
            [
                "allow 2001:db8:1::/64",
                "allow 2001:db8:1::7/128",
                "deny 203.0.113.0/24",
                "deny 2001:db8:bad::/48"
            ]
        );
        // The global scope: IPv4 and IPv6 deny flags and a rate limit whose
        // IPv6 buckets are per /64 (IPv4's per address); www: an allow list
        // (IPv6 entries only: IPv4 sources are refused too).
        let global = first.next.scopes[&FW_GLOBAL];
        assert_eq!(global.flags, FW_F_DENY | FW_F_DENY6 | FW_F_RATE);
        assert_eq!(global.mask, u32::MAX);
        assert_eq!(first.next.scopes[&3].flags, FW_F_ALLOW);
        assert_eq!(
            first
                .masks6
                .iter()
                .map(|(id, m)| (*id, wire(*m)))
                .collect::<Vec<_>>(),
            [(FW_GLOBAL, ip("ffff:ffff:ffff:ffff::"))]
        );

        // Only the IPv6 mask changes (per /56): the mask is rewritten, the
        // rules and scope flags stay.
        let wider = cfg6(
            "deny = [\"203.0.113.0/24\", \"2001:db8:bad::/48\"]\n\
             rate-limit = { new-flows-per-second = 10, per = \"/56\" }",
            "allow-from = [\"2001:db8:1::/64\", \"2001:db8:1::7\"]",
        );
        let second = plan(&first.next, &wider, &ids()).expect("plan");
        assert!(second.add.is_empty() && second.remove.is_empty());
        assert!(second.interim.is_empty() && second.finals.is_empty());
        assert_eq!(
            second
                .masks6
                .iter()
                .map(|(id, m)| (*id, wire(*m)))
                .collect::<Vec<_>>(),
            [(FW_GLOBAL, ip("ffff:ffff:ffff:ff00::"))]
        );

        // The IPv6 deny goes: its flag is cleared before its entry goes.
        let v4_only = cfg6(
            "deny = [\"203.0.113.0/24\"]\n\
             rate-limit = { new-flows-per-second = 10, per = \"/56\" }",
            "allow-from = [\"2001:db8:1::/64\", \"2001:db8:1::7\"]",
        );
        let third = plan(&second.next, &v4_only, &ids()).expect("plan");
        assert_eq!(
            third
                .remove
                .iter()
                .map(|(r, id)| (r.to_string(), *id))
                .collect::<Vec<_>>(),
            [("deny 2001:db8:bad::/48".to_owned(), 3)]
        );
        assert_eq!(third.finals.len(), 1);
        assert_eq!(third.finals[0].1.flags, FW_F_DENY | FW_F_RATE);
    }

    #[test]
    fn bucket_masks_follow_per() {
        assert_eq!(wire(prefix_mask6(128)), [0xff; 16]);
        assert_eq!(wire(prefix_mask6(0)), [0; 16]);
        let mut m56 = [0u8; 16];
        m56[..7].fill(0xff);
        assert_eq!(wire(prefix_mask6(56)), m56);
    }

    #[test]
    fn an_unknown_service_is_named() {
        let err = desired(&cfg6("", ""), &BTreeMap::new()).expect_err("no id");
        assert_eq!(err, FwError::UnknownService("www".into()));
    }
}
