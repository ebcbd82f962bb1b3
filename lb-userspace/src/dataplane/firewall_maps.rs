//! The firewall's maps from userspace: reading the rules a data plane
//! holds (adoption, `lb firewall show`) and writing a firewall plan's
//! additions and removals (the write order is in `Dataplane::write`).

use std::net::IpAddr;

use aya::{
    Pod,
    maps::{
        Array, MapData, MapError,
        lpm_trie::{Key, LpmTrie},
    },
};
use lb_common::{FW_F_RATE, FW_SCOPE_COUNT, FwScope, ipv6::Addr6};

use super::{
    Dataplane, MapName, Result,
    firewall::{FwIds, FwPlan, List, Rule, RuleKey},
    handles::{map_err, set},
};

/// One firewall rule as `lb firewall show` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleStats {
    pub rule: Rule,
    pub id: u32,
    /// New flows this rule decided (denied, or let through an allow list).
    pub new_flows: u64,
}

impl Dataplane {
    /// The firewall rules, scopes and IPv6 masks as the maps hold them.
    pub(super) fn read_firewall(&self) -> Result<FwIds> {
        let mut fw = FwIds::default();
        for list in [List::Deny, List::Allow] {
            let (name, name6) = trie_names(list);
            for (len, scope, addr, id) in self.trie_entries::<lb_common::FwKey>(name, |k| {
                (k.scope, IpAddr::from(k.addr.to_ne_bytes()))
            })? {
                fw.rules
                    .extend(Rule::from_key(list, len, scope, addr).map(|r| (r, id)));
            }
            for (len, scope, addr, id) in self
                .trie_entries::<lb_common::maps6::FwKey6>(name6, |k| {
                    (k.scope, IpAddr::from(lb_common::ipv6::octets_of(&k.addr)))
                })?
            {
                fw.rules
                    .extend(Rule::from_key(list, len, scope, addr).map(|r| (r, id)));
            }
        }
        let err = map_err(MapName::FW_SCOPES);
        let scopes: Array<&MapData, FwScope> =
            Array::try_from(self.map_ref(MapName::FW_SCOPES)?).map_err(err)?;
        let err6 = map_err(MapName::FW_MASKS6);
        let masks: Array<&MapData, Addr6> =
            Array::try_from(self.map_ref(MapName::FW_MASKS6)?).map_err(err6)?;
        for id in 0..FW_SCOPE_COUNT {
            let conf = scopes.get(&id, 0).map_err(err)?;
            if conf != FwScope::default() {
                fw.scopes.insert(id, conf);
            }
            if conf.flags & FW_F_RATE != 0 {
                fw.masks6.insert(id, masks.get(&id, 0).map_err(err6)?);
            }
        }
        Ok(fw)
    }

    /// One trie's entries: (LPM length, scope, address, rule id).
    fn trie_entries<K: Pod>(
        &self,
        map: MapName,
        split: impl Fn(K) -> (u32, IpAddr),
    ) -> Result<Vec<(u32, u32, IpAddr, u32)>> {
        let trie: LpmTrie<&MapData, K, u32> =
            LpmTrie::try_from(self.map_ref(map)?).map_err(map_err(map))?;
        Ok(trie
            .iter()
            .filter_map(|r| r.ok())
            .map(|(key, id)| {
                let (scope, addr) = split(key.data());
                (key.prefix_len(), scope, addr, id)
            })
            .collect())
    }

    /// Every firewall rule with its id and counter, in rule order.
    pub fn firewall_rules(&self) -> Result<Vec<RuleStats>> {
        let stats = self.per_cpu::<u64>(MapName::FW_RULE_STATS)?;
        self.fw
            .rules
            .iter()
            .map(|(rule, &id)| {
                let values = stats.get(&id, 0).map_err(map_err(MapName::FW_RULE_STATS))?;
                Ok(RuleStats {
                    rule: *rule,
                    id,
                    new_flows: values.iter().sum(),
                })
            })
            .collect()
    }

    /// Writes a firewall plan's first half: changed IPv6 bucket masks, new
    /// rules (counters zeroed), then the scopes with the union of old and
    /// new flags.
    pub(super) fn firewall_additions(&mut self, fw: &FwPlan) -> Result<()> {
        for (scope, mask) in &fw.masks6 {
            set(
                &mut self.array(MapName::FW_MASKS6)?,
                MapName::FW_MASKS6,
                *scope,
                *mask,
            )?;
        }
        for (rule, id) in &fw.add {
            self.zero_counter(MapName::FW_RULE_STATS, *id, 0u64)?;
            let (name, name6) = trie_names(rule.list);
            match rule.key() {
                RuleKey::V4(len, data) => self.trie_insert(name, Key::new(len, data), *id)?,
                RuleKey::V6(len, data) => self.trie_insert(name6, Key::new(len, data), *id)?,
            }
        }
        for (scope, conf) in &fw.interim {
            set(
                &mut self.array(MapName::FW_SCOPES)?,
                MapName::FW_SCOPES,
                *scope,
                *conf,
            )?;
        }
        Ok(())
    }

    /// The second half: final scope confs, then the rules that are gone.
    pub(super) fn firewall_removals(&mut self, fw: &FwPlan) -> Result<()> {
        for (scope, conf) in &fw.finals {
            set(
                &mut self.array(MapName::FW_SCOPES)?,
                MapName::FW_SCOPES,
                *scope,
                *conf,
            )?;
        }
        for (rule, _) in &fw.remove {
            let (name, name6) = trie_names(rule.list);
            match rule.key() {
                RuleKey::V4(len, data) => self.trie_remove(name, Key::new(len, data))?,
                RuleKey::V6(len, data) => self.trie_remove(name6, Key::new(len, data))?,
            }
        }
        Ok(())
    }

    pub(super) fn trie(&self, map: MapName) -> Result<LpmTrie<&MapData, lb_common::FwKey, u32>> {
        LpmTrie::try_from(self.map_ref(map)?).map_err(map_err(map))
    }

    fn trie_insert<K: Pod>(&mut self, map: MapName, key: Key<K>, id: u32) -> Result<()> {
        let mut trie: LpmTrie<&mut MapData, K, u32> =
            LpmTrie::try_from(self.map_mut(map)?).map_err(map_err(map))?;
        trie.insert(&key, id, 0).map_err(map_err(map))
    }

    fn trie_remove<K: Pod>(&mut self, map: MapName, key: Key<K>) -> Result<()> {
        let mut trie: LpmTrie<&mut MapData, K, u32> =
            LpmTrie::try_from(self.map_mut(map)?).map_err(map_err(map))?;
        match trie.remove(&key) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(map_err(map)(source)),
        }
    }
}

/// A list's tries: IPv4's and IPv6's.
fn trie_names(list: List) -> (MapName, MapName) {
    match list {
        List::Deny => (MapName::FW_DENY, MapName::FW_DENY6),
        List::Allow => (MapName::FW_ALLOW, MapName::FW_ALLOW6),
    }
}
