//! Typed handles on the object's maps, named by [`MapName`] (never by a
//! string), and the small helpers every map write and lookup goes through.

use aya::maps::{Array, HashMap, MapData, MapError, PerCpuArray};
use lb_common::FlowConf;

use super::{Dataplane, DataplaneError, EstablishedTable, HalfOpenTable, MapName, Result};

impl Dataplane {
    /// `HALF_OPEN`, mapped into memory.
    pub(crate) fn half_open_table(&self) -> Result<HalfOpenTable> {
        HalfOpenTable::map(&self.map_data(MapName::HALF_OPEN)?).map_err(DataplaneError::HalfOpen)
    }

    /// `ESTABLISHED`, mapped into memory.
    pub fn established_table(&self) -> Result<EstablishedTable> {
        EstablishedTable::map(&self.map_data(MapName::ESTABLISHED)?)
            .map_err(DataplaneError::Established)
    }

    /// What `FLOW_CONF` holds now (timeouts, budget, the half-open table's
    /// size and seed).
    pub fn flow_conf(&self) -> Result<FlowConf> {
        self.owned_array::<FlowConf>(MapName::FLOW_CONF)?
            .get(&0, 0)
            .map_err(map_err(MapName::FLOW_CONF))
    }

    pub(super) fn array<T: aya::Pod>(&mut self, map: MapName) -> Result<Array<&mut MapData, T>> {
        Array::try_from(self.map_mut(map)?).map_err(map_err(map))
    }

    pub(super) fn hash<K: aya::Pod, V: aya::Pod>(
        &mut self,
        map: MapName,
    ) -> Result<HashMap<&mut MapData, K, V>> {
        HashMap::try_from(self.map_mut(map)?).map_err(map_err(map))
    }

    pub(super) fn per_cpu<T: aya::Pod>(&self, map: MapName) -> Result<PerCpuArray<&MapData, T>> {
        PerCpuArray::try_from(self.map_ref(map)?).map_err(map_err(map))
    }

    /// The object's map, to be read.
    pub(super) fn map_ref(&self, map: MapName) -> Result<&aya::maps::Map> {
        self.ebpf
            .map(map.name())
            .ok_or(DataplaneError::MissingMap(map.name()))
    }

    /// The object's map, to be written.
    pub(super) fn map_mut(&mut self, map: MapName) -> Result<&mut aya::maps::Map> {
        self.ebpf
            .map_mut(map.name())
            .ok_or(DataplaneError::MissingMap(map.name()))
    }
}

/// A map operation's error, naming the map.
pub(super) fn map_err(map: MapName) -> impl Fn(MapError) -> DataplaneError + Copy {
    move |source| DataplaneError::Map {
        name: map.name(),
        source,
    }
}

pub(super) fn set<T: aya::Pod>(
    map: &mut Array<&mut MapData, T>,
    name: MapName,
    index: u32,
    value: T,
) -> Result<()> {
    map.set(index, value, 0).map_err(map_err(name))
}

/// A lookup's value, `None` for a missing key, or the map's error.
pub(super) fn found<T>(r: std::result::Result<T, MapError>, map: MapName) -> Result<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(MapError::KeyNotFound) => Ok(None),
        Err(source) => Err(map_err(map)(source)),
    }
}

pub(super) fn remove_if_present<K: aya::Pod, V: aya::Pod>(
    map: &mut HashMap<&mut MapData, K, V>,
    name: MapName,
    key: &K,
) -> Result<()> {
    match map.remove(key) {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        // aya reports a delete's ENOENT as the syscall's error.
        Err(MapError::SyscallError(e)) if e.io_error.kind() == std::io::ErrorKind::NotFound => {
            Ok(())
        }
        Err(source) => Err(map_err(name)(source)),
    }
}
