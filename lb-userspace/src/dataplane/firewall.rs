//! The firewall's maps from a config, planned without touching them: which
//! rules (scope, list, prefix) to add with which ids, which to remove, and
//! the scope confs to write before and after. Pure, host-tested.
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
    net::Ipv4Addr,
};

use lb_common::{FW_F_ALLOW, FW_F_DENY, FW_F_RATE, FW_GLOBAL, FwKey, FwScope, MAX_FW_RULES};

use crate::config::{Config, Firewall, Prefix};

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

/// One firewall rule: a prefix in a scope's deny or allow list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rule {
    /// A service id, or [`FW_GLOBAL`].
    pub scope: u32,
    pub list: List,
    pub prefix: Prefix,
}

impl Rule {
    /// The LPM trie key: the scope (32 bits, exact) then the prefix.
    pub fn key(&self) -> (u32, FwKey) {
        (
            32 + u32::from(self.prefix.len),
            FwKey {
                scope: self.scope,
                addr: u32::from_ne_bytes(self.prefix.addr.octets()),
            },
        )
    }

    /// The rule an LPM trie entry stands for (`None`: not one of ours).
    pub fn from_key(list: List, prefix_len: u32, key: FwKey) -> Option<Rule> {
        let len = u8::try_from(prefix_len.checked_sub(32)?).ok()?;
        let prefix =
            Prefix::parse(&format!("{}/{len}", Ipv4Addr::from(key.addr.to_ne_bytes()))).ok()?;
        Some(Rule {
            scope: key.scope,
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
}

/// A planned firewall change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FwPlan {
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

/// Every rule and scope conf `cfg` asks for; `service_ids` names each
/// service's data-plane id.
pub fn desired(
    cfg: &Config,
    service_ids: &BTreeMap<String, u32>,
) -> Result<(BTreeSet<Rule>, BTreeMap<u32, FwScope>), FwError> {
    let mut rules = BTreeSet::new();
    let mut scopes = BTreeMap::new();
    let mut scope = |id: u32, fw: &Firewall| {
        for (list, prefixes) in [(List::Deny, &fw.deny), (List::Allow, &fw.allow)] {
            for prefix in prefixes {
                rules.insert(Rule {
                    scope: id,
                    list,
                    prefix: *prefix,
                });
            }
        }
        let conf = scope_conf(fw);
        if conf != FwScope::default() {
            scopes.insert(id, conf);
        }
    };
    scope(FW_GLOBAL, &cfg.firewall);
    for svc in &cfg.services {
        let id = *service_ids
            .get(&svc.name)
            .ok_or_else(|| FwError::UnknownService(svc.name.clone()))?;
        scope(id, &svc.firewall);
    }
    Ok((rules, scopes))
}

/// Plans the change from `current` to what `cfg` asks for. Rules in both
/// keep their ids (and counters); new ones take the lowest ids that no
/// current rule holds.
pub fn plan(
    current: &FwIds,
    cfg: &Config,
    service_ids: &BTreeMap<String, u32>,
) -> Result<FwPlan, FwError> {
    let (rules, scopes) = desired(cfg, service_ids)?;
    let used: BTreeSet<u32> = current.rules.values().copied().collect();
    let mut free = (0..MAX_FW_RULES).filter(|id| !used.contains(id));
    let mut next = FwIds {
        rules: BTreeMap::new(),
        scopes: scopes.clone(),
    };
    let mut add = Vec::new();
    for rule in &rules {
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
        .filter(|(rule, _)| !rules.contains(rule))
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
            prefix: Prefix::parse("203.0.113.0/24").expect("prefix"),
        };
        let (len, key) = rule.key();
        assert_eq!(len, 56);
        assert_eq!(key.addr.to_ne_bytes(), [203, 0, 113, 0]);
        assert_eq!(Rule::from_key(List::Deny, len, key), Some(rule));
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
}
