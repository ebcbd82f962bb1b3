//! The firewall's maps from userspace: reading the rules a data plane
//! holds (adoption, `lb firewall show`) and writing a firewall plan's
//! additions and removals (the write order is in `Dataplane::write`).

use aya::maps::{
    Array, MapData, MapError,
    lpm_trie::{Key, LpmTrie},
};
use lb_common::{FW_SCOPE_COUNT, FwKey, FwScope};

use super::{
    Dataplane, MapName, Result,
    firewall::{FwIds, FwPlan, List, Rule},
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
    /// The firewall rules and scopes as the maps hold them.
    pub(super) fn read_firewall(&self) -> Result<FwIds> {
        let mut fw = FwIds::default();
        for (list, name) in [
            (List::Deny, MapName::FW_DENY),
            (List::Allow, MapName::FW_ALLOW),
        ] {
            let trie = self.trie(name)?;
            for (key, id) in trie.iter().filter_map(|r| r.ok()) {
                if let Some(rule) = Rule::from_key(list, key.prefix_len(), key.data()) {
                    fw.rules.insert(rule, id);
                }
            }
        }
        let err = map_err(MapName::FW_SCOPES);
        let scopes: Array<&MapData, FwScope> =
            Array::try_from(self.map_ref(MapName::FW_SCOPES)?).map_err(err)?;
        for id in 0..FW_SCOPE_COUNT {
            let conf = scopes.get(&id, 0).map_err(err)?;
            if conf != FwScope::default() {
                fw.scopes.insert(id, conf);
            }
        }
        Ok(fw)
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

    /// Writes a firewall plan's first half: new rules (counters zeroed),
    /// then the scopes with the union of old and new flags.
    pub(super) fn firewall_additions(&mut self, fw: &FwPlan) -> Result<()> {
        for (rule, id) in &fw.add {
            self.zero_counter(MapName::FW_RULE_STATS, *id, 0u64)?;
            let (len, data) = rule.key();
            let name = trie_name(rule.list);
            self.trie_mut(name)?
                .insert(&Key::new(len, data), *id, 0)
                .map_err(map_err(name))?;
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
            let (len, data) = rule.key();
            let name = trie_name(rule.list);
            match self.trie_mut(name)?.remove(&Key::new(len, data)) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(source) => return Err(map_err(name)(source)),
            }
        }
        Ok(())
    }

    pub(super) fn trie(&self, map: MapName) -> Result<LpmTrie<&MapData, FwKey, u32>> {
        LpmTrie::try_from(self.map_ref(map)?).map_err(map_err(map))
    }

    pub(super) fn trie_mut(&mut self, map: MapName) -> Result<LpmTrie<&mut MapData, FwKey, u32>> {
        LpmTrie::try_from(self.map_mut(map)?).map_err(map_err(map))
    }
}

pub(super) fn trie_name(list: List) -> MapName {
    match list {
        List::Deny => MapName::FW_DENY,
        List::Allow => MapName::FW_ALLOW,
    }
}
