//! The decapsulator's maps as `lb decap` reads and writes them: the
//! allowed LB addresses with the GUE port (replaced together, atomically
//! for the packets), and the per-verdict counters.

use std::{collections::BTreeSet, net::Ipv4Addr, path::Path};

use anyhow::{Context, bail, ensure};
use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray};
use lb_common::decap::{DecapConf, DecapSourceKey, DecapVerdict, MAX_DECAP_SOURCES};

/// The maps of the `lb-decap` object, by name (lb-common's list).
pub use lb_common::map_names::decap::{
    ALL, DECAP_CONF as CONF, DECAP_SOURCES as SOURCES, DECAP_VERDICTS as VERDICTS,
};

/// Handles on the three maps of one decapsulator (loaded or pinned).
pub struct DecapMaps {
    conf: Array<MapData, DecapConf>,
    sources: HashMap<MapData, DecapSourceKey, u32>,
    verdicts: PerCpuArray<MapData, u64>,
}

/// What `lb decap status` shows of one decapsulator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// The GUE port, host order.
    pub gue_port: u16,
    /// The allowed LB addresses in force, sorted.
    pub sources: Vec<Ipv4Addr>,
}

impl DecapMaps {
    /// From the maps of a loaded object (aya's `take_map`).
    pub fn from_maps(conf: Map, sources: Map, verdicts: Map) -> anyhow::Result<Self> {
        Ok(DecapMaps {
            conf: Array::try_from(conf).context(CONF)?,
            sources: HashMap::try_from(sources).context(SOURCES)?,
            verdicts: PerCpuArray::try_from(verdicts).context(VERDICTS)?,
        })
    }

    /// The maps pinned in `dir` by `lb decap attach`.
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        let pin = |name: &str| {
            let path = dir.join(name);
            MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))
        };
        Self::from_maps(
            Map::Array(pin(CONF)?),
            Map::HashMap(pin(SOURCES)?),
            Map::PerCpuArray(pin(VERDICTS)?),
        )
    }

    /// Replaces the allowed sources and the GUE port. The new set goes into
    /// the half of `DECAP_SOURCES` not in force, then one write of
    /// `DECAP_CONF` switches port and half together: a packet sees the old
    /// settings or the new ones, never a mix or an empty set.
    pub fn replace(&mut self, sources: &[Ipv4Addr], gue_port: u16) -> anyhow::Result<()> {
        let set = check_sources(sources)?;
        ensure!(gue_port != 0, "--port 0 is not a port GUE can use");
        let current = self.conf.get(&0, 0).context("reading DECAP_CONF")?;
        let next = u32::from(current.half ^ 1);
        // Leftovers of an attach interrupted before its switch.
        self.clear_half(next)?;
        for addr in &set {
            let key = DecapSourceKey {
                half: next,
                addr: u32::from_ne_bytes(addr.octets()),
            };
            self.sources
                .insert(key, 1, 0)
                .with_context(|| format!("adding {addr} to DECAP_SOURCES"))?;
        }
        let conf = DecapConf {
            gue_port: gue_port.to_be(),
            half: next as u8,
            _pad: 0,
        };
        self.conf.set(0, conf, 0).context("writing DECAP_CONF")?;
        self.clear_half(u32::from(current.half))
    }

    fn clear_half(&mut self, half: u32) -> anyhow::Result<()> {
        let stale: Vec<DecapSourceKey> = self
            .sources
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.half == half)
            .collect();
        for key in stale {
            // Already gone (a concurrent clear) is what we wanted.
            let _ = self.sources.remove(&key);
        }
        Ok(())
    }

    /// The settings in force.
    pub fn settings(&self) -> anyhow::Result<Settings> {
        let conf = self.conf.get(&0, 0).context("reading DECAP_CONF")?;
        let mut sources: Vec<Ipv4Addr> = self
            .sources
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.half == u32::from(conf.half))
            .map(|k| Ipv4Addr::from(k.addr.to_ne_bytes()))
            .collect();
        sources.sort();
        Ok(Settings {
            gue_port: u16::from_be(conf.gue_port),
            sources,
        })
    }

    /// Packets per verdict, summed over the CPUs, in counter order.
    pub fn verdicts(&self) -> anyhow::Result<Vec<(DecapVerdict, u64)>> {
        DecapVerdict::ALL
            .iter()
            .map(|&v| {
                let per_cpu = self
                    .verdicts
                    .get(&(v as u32), 0)
                    .with_context(|| format!("reading DECAP_VERDICTS[{}]", v.name()))?;
                Ok((v, per_cpu.iter().sum()))
            })
            .collect()
    }
}

/// The `--from` set: at least one address, each a unicast host address,
/// no more than the map holds. Duplicates count once.
pub fn check_sources(sources: &[Ipv4Addr]) -> anyhow::Result<BTreeSet<Ipv4Addr>> {
    let set: BTreeSet<Ipv4Addr> = sources.iter().copied().collect();
    if set.is_empty() {
        bail!("--from needs at least one LB address (the tunnels' outer source)");
    }
    if let Some(bad) = set
        .iter()
        .find(|a| a.is_unspecified() || a.is_multicast() || a.is_broadcast())
    {
        bail!(
            "--from {bad}: not an address an LB sends from (unspecified, multicast or broadcast)"
        );
    }
    ensure!(
        set.len() <= MAX_DECAP_SOURCES as usize,
        "--from lists {} addresses; lb decap holds at most {MAX_DECAP_SOURCES}",
        set.len()
    );
    Ok(set)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_source_set_is_checked_whole() {
        let a = Ipv4Addr::new(198, 18, 1, 1);
        assert_eq!(check_sources(&[a, a]).expect("ok").len(), 1);
        assert!(check_sources(&[]).is_err());
        for bad in [
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::BROADCAST,
            Ipv4Addr::new(224, 0, 0, 1),
        ] {
            let e = check_sources(&[a, bad]).expect_err("refused");
            assert!(e.to_string().contains(&bad.to_string()), "{e}");
        }
        let many: Vec<Ipv4Addr> = (0..=MAX_DECAP_SOURCES)
            .map(|i| Ipv4Addr::from(0x0a00_0001 + i))
            .collect();
        assert!(check_sources(&many).is_err());
    }
}
