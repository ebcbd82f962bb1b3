//! Adopting a pinned data plane: before anything is touched, every pinned
//! map is checked against the object's definition of it ([`check_pins`]);
//! then the id tables are read back from what a previous agent wrote.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

use aya::maps::{Array, Map, MapData, MapInfo};
use lb_common::{
    BACKEND_F_DROP_FLOWS, BACKEND_F_IN_USE, Backend, FlowConf, MAX_BACKENDS, ServiceConf,
    ServiceKey,
    flow::{TABLE_VERSION, placed_by_another_hash},
    map_names::Pinning,
    maps6::{Backend6, ServiceKey6},
};

use super::{
    Dataplane, DataplaneError, MapName, Result, TableSizes,
    plan::{BackendAddr, SvcKey},
};
use crate::object::{MapLayout, map_layouts};

impl Dataplane {
    /// Rebuilds the id tables from pinned maps written by a previous agent.
    pub(super) fn adopt_ids(&mut self) -> Result<()> {
        let mut services: Vec<(SvcKey, u32)> = self
            .hash::<ServiceKey, u32>(MapName::SERVICES)?
            .iter()
            .filter_map(|r| r.ok())
            .map(|(k, id)| (SvcKey::V4(k), id))
            .collect();
        let services6: Vec<(SvcKey, u32)> = self
            .hash::<ServiceKey6, u32>(MapName::SERVICES6)?
            .iter()
            .filter_map(|r| r.ok())
            .map(|(k, id)| (SvcKey::V6(k), id))
            .collect();
        let v6_ids: BTreeSet<u32> = services6.iter().map(|(_, id)| *id).collect();
        services.extend(services6);
        let confs = self.array::<ServiceConf>(MapName::SERVICE_CONF)?;
        let mut halves = Vec::new();
        for (_, id) in &services {
            let conf = confs.get(id, 0).map_err(|source| DataplaneError::Map {
                name: MapName::SERVICE_CONF.name(),
                source,
            })?;
            halves.push((*id, conf.active_ring));
        }
        let backends6: Vec<Backend6> = {
            let map = self.array::<Backend6>(MapName::BACKENDS6)?;
            (0..MAX_BACKENDS)
                .map(|id| map.get(&id, 0).unwrap_or_default())
                .collect()
        };
        let backends = self.array::<Backend>(MapName::BACKENDS)?;
        let (mut owned, mut retired) = (Vec::new(), Vec::new());
        for id in 0..MAX_BACKENDS {
            let b = backends.get(&id, 0).map_err(|source| DataplaneError::Map {
                name: MapName::BACKENDS.name(),
                source,
            })?;
            if b.flags & BACKEND_F_IN_USE != 0 {
                // An IPv6 service's backend: its address is in BACKENDS6.
                let addr = if v6_ids.contains(&b.service_id) {
                    BackendAddr::V6(backends6[id as usize].addr)
                } else {
                    BackendAddr::V4(b.addr)
                };
                owned.push(((b.service_id, addr, b.port), id));
            } else if b.flags & BACKEND_F_DROP_FLOWS != 0 {
                // Retired: free, but flows may still be pinned to it.
                retired.push(id);
            }
        }
        self.ids.services.extend(services);
        self.ids.backends.extend(owned);
        self.ids.retired_backends.extend(retired);
        self.ids.active_half.extend(halves);
        self.fw = self.read_firewall()?;
        Ok(())
    }
}

/// A map this version no longer has: its pin means a data plane from before
/// the flow lifecycle, whose replies lived in a table of their own.
const REVERSE_NAT: &str = "REVERSE_NAT";
/// A map this version no longer has: full NAT's claims in a kernel hash,
/// before `FNAT_CLAIMS`. Its flows' replies are found only through it, so
/// a data plane holding it is refused (not adopted without its claims).
const FNAT_REPLIES: &str = "FNAT_REPLIES";

/// Every map pinned under `pin_dir` must be the one this object would make:
/// same type, key size, value size, entries and flags (what a map's
/// [`Pinning`] allows). aya would reuse whatever is pinned at a map's path,
/// and a map's layout and size are fixed when it is created: a value that
/// grew makes the verifier refuse the program, fields that moved within the
/// same size are read wrongly. A map this version added and the pin dir
/// lacks is fine: the loader creates it. Reads only.
pub(super) fn check_pins(object: &[u8], sizes: TableSizes, pin_dir: &Path) -> Result<()> {
    let old_version =
        |map: &'static str, found: String, wanted: String| DataplaneError::OldVersion {
            map,
            found,
            wanted,
            pin_dir: pin_dir.to_path_buf(),
        };
    if pin_dir.join(REVERSE_NAT).exists() {
        return Err(old_version(
            REVERSE_NAT,
            "present (replies in a table of their own)".into(),
            "none (a flow's reply entry lives next to it in CONNTRACK/HALF_OPEN)".into(),
        ));
    }
    if pin_dir.join(FNAT_REPLIES).exists() {
        return Err(old_version(
            FNAT_REPLIES,
            "present (full NAT's claims in a hash)".into(),
            "none (full NAT's claims in FNAT_CLAIMS, an array)".into(),
        ));
    }
    let wanted = wanted_layouts(object, sizes)?;
    for map in MapName::pinned() {
        let path = pin_dir.join(map.name());
        if !path.exists() {
            continue;
        }
        let name = map.name();
        let info =
            MapInfo::from_pin(&path).map_err(|source| DataplaneError::Map { name, source })?;
        let found = MapLayout::of(&info);
        let want = *wanted.get(&map).ok_or(DataplaneError::MissingMap(name))?;
        match judge(map.pinning(), &found, &want) {
            Fit::Adopt => {}
            Fit::OtherLayout => {
                return Err(old_version(name, found.to_string(), want.to_string()));
            }
            Fit::OtherSize { config_key } => {
                return Err(DataplaneError::ConntrackSize {
                    key: config_key,
                    configured: want.max_entries / 2,
                    pinned: found.max_entries / 2,
                    map: name,
                    pin_dir: pin_dir.to_path_buf(),
                });
            }
        }
    }
    // Same layouts, but flows placed by another bucket hash would each be
    // looked for in another bucket: refused like another layout.
    if let Some(conf) = pinned_flow_conf(pin_dir)?
        && placed_by_another_hash(&conf)
    {
        return Err(old_version(
            MapName::FLOW_CONF.name(),
            format!("flows placed by bucket hash version {}", conf.table_version),
            format!("version {TABLE_VERSION}"),
        ));
    }
    Ok(())
}

/// The pinned `FLOW_CONF`'s settings (its seed and table version), if it
/// is pinned.
fn pinned_flow_conf(pin_dir: &Path) -> Result<Option<FlowConf>> {
    let path = pin_dir.join(MapName::FLOW_CONF.name());
    if !path.exists() {
        return Ok(None);
    }
    let err = |source| DataplaneError::Map {
        name: MapName::FLOW_CONF.name(),
        source,
    };
    let data = MapData::from_pin(&path).map_err(err)?;
    let conf: Array<MapData, FlowConf> = Array::try_from(Map::Array(data)).map_err(err)?;
    conf.get(&0, 0).map(Some).map_err(err)
}

/// The layout each listed map gets when this object is loaded with `sizes`.
fn wanted_layouts(object: &[u8], sizes: TableSizes) -> Result<BTreeMap<MapName, MapLayout>> {
    let layouts = map_layouts(object)?;
    let mut wanted = BTreeMap::new();
    for &map in MapName::ALL {
        let Some(layout) = layouts.get(map.name()) else {
            continue;
        };
        let mut layout = layout.as_loaded();
        if let Some(entries) = sizes.entries(map) {
            layout.max_entries = entries;
        }
        wanted.insert(map, layout);
    }
    Ok(wanted)
}

/// Whether a pinned map can be adopted.
#[derive(Debug, PartialEq, Eq)]
enum Fit {
    Adopt,
    /// Another type, key or value size, flags, or (for a map the object
    /// sizes) number of entries: made by another version.
    OtherLayout,
    /// The layout, but another size than the config's `config_key` asks for.
    OtherSize {
        config_key: &'static str,
    },
}

fn judge(pinning: Pinning, found: &MapLayout, wanted: &MapLayout) -> Fit {
    let same_shape = found.map_type == wanted.map_type
        && found.key_size == wanted.key_size
        && found.value_size == wanted.value_size
        && found.flags == wanted.flags;
    if !same_shape {
        return Fit::OtherLayout;
    }
    let size_fits = match pinning {
        Pinning::PinnedMayBeShorter => found.max_entries <= wanted.max_entries,
        _ => found.max_entries == wanted.max_entries,
    };
    match (size_fits, pinning) {
        (true, _) => Fit::Adopt,
        (false, Pinning::PinnedSized { config_key }) => Fit::OtherSize { config_key },
        (false, _) => Fit::OtherLayout,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: u32 = 1;
    const PERCPU_ARRAY: u32 = 6;

    fn layout(map_type: u32, value_size: u32, max_entries: u32) -> MapLayout {
        MapLayout {
            map_type,
            key_size: 4,
            value_size,
            max_entries,
            flags: 0,
        }
    }

    #[test]
    fn only_the_same_layout_is_adopted() {
        let want = layout(HASH, 48, 1024);
        assert_eq!(judge(Pinning::Pinned, &want, &want), Fit::Adopt);
        for found in [
            layout(PERCPU_ARRAY, 48, 1024),
            layout(HASH, 40, 1024),
            layout(HASH, 48, 512),
            MapLayout {
                key_size: 8,
                ..want
            },
            MapLayout { flags: 1, ..want },
        ] {
            assert_eq!(
                judge(Pinning::Pinned, &found, &want),
                Fit::OtherLayout,
                "{found}"
            );
        }
    }

    #[test]
    fn a_sized_table_of_another_size_names_its_config_key() {
        let sized = Pinning::PinnedSized {
            config_key: "conntrack-size",
        };
        let want = layout(HASH, 48, 2048);
        assert_eq!(
            judge(sized, &layout(HASH, 48, 1024), &want),
            Fit::OtherSize {
                config_key: "conntrack-size"
            }
        );
        // Another entry size is another version, whatever the size.
        assert_eq!(
            judge(sized, &layout(HASH, 40, 1024), &want),
            Fit::OtherLayout
        );
    }

    #[test]
    fn a_shorter_counter_array_is_adopted_where_the_list_allows_it() {
        let want = layout(PERCPU_ARRAY, 8, 22);
        let older = layout(PERCPU_ARRAY, 8, 14);
        assert_eq!(
            judge(Pinning::PinnedMayBeShorter, &older, &want),
            Fit::Adopt
        );
        assert_eq!(judge(Pinning::Pinned, &older, &want), Fit::OtherLayout);
        let longer = layout(PERCPU_ARRAY, 8, 30);
        assert_eq!(
            judge(Pinning::PinnedMayBeShorter, &longer, &want),
            Fit::OtherLayout
        );
    }
}
