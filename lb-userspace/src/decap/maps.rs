//! The decapsulator's maps as `lb decap` reads and writes them: the
//! allowed LB addresses (IPv4 and IPv6, each family in its own map) with
//! the GUE port (replaced together, atomically for the packets), and the
//! per-verdict counters.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv6Addr},
    path::Path,
};

use anyhow::{Context, bail, ensure};
use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray};
use lb_common::{
    decap::{DecapConf, DecapSourceKey, DecapSourceKey6, DecapVerdict, MAX_DECAP_SOURCES},
    ipv6::{addr_of, octets_of},
};

/// The maps of the `lb-decap` object, by name (lb-common's list).
pub use lb_common::map_names::decap::{
    ALL, DECAP_CONF as CONF, DECAP_SOURCES as SOURCES, DECAP_SOURCES6 as SOURCES6,
    DECAP_VERDICTS as VERDICTS,
};

/// Handles on the four maps of one decapsulator (loaded or pinned).
pub struct DecapMaps {
    conf: Array<MapData, DecapConf>,
    sources: HashMap<MapData, DecapSourceKey, u32>,
    sources6: HashMap<MapData, DecapSourceKey6, u32>,
    verdicts: PerCpuArray<MapData, u64>,
}

/// What `lb decap status` shows of one decapsulator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// The GUE port, host order.
    pub gue_port: u16,
    /// The allowed LB addresses in force, sorted (IPv4 before IPv6).
    pub sources: Vec<IpAddr>,
}

impl DecapMaps {
    /// From the maps of a loaded object (aya's `take_map`).
    pub fn from_maps(
        conf: Map,
        sources: Map,
        sources6: Map,
        verdicts: Map,
    ) -> anyhow::Result<Self> {
        Ok(DecapMaps {
            conf: Array::try_from(conf).context(CONF)?,
            sources: HashMap::try_from(sources).context(SOURCES)?,
            sources6: HashMap::try_from(sources6).context(SOURCES6)?,
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
            Map::HashMap(pin(SOURCES6)?),
            Map::PerCpuArray(pin(VERDICTS)?),
        )
    }

    /// Replaces the allowed sources and the GUE port. The new set goes into
    /// the half of `DECAP_SOURCES` not in force, then one write of
    /// `DECAP_CONF` switches port and half together: a packet sees the old
    /// settings or the new ones, never a mix or an empty set. IPv4
    /// addresses go into `DECAP_SOURCES`, IPv6 ones into `DECAP_SOURCES6`,
    /// in the same half.
    pub fn replace<A: Into<IpAddr> + Copy>(
        &mut self,
        sources: &[A],
        gue_port: u16,
    ) -> anyhow::Result<()> {
        let set = check_sources(sources)?;
        ensure!(gue_port != 0, "--port 0 is not a port GUE can use");
        let current = self.conf.get(&0, 0).context("reading DECAP_CONF")?;
        let next = u32::from(current.half ^ 1);
        // Leftovers of an attach interrupted before its switch.
        self.clear_half(next)?;
        for addr in &set {
            match addr {
                IpAddr::V4(v4) => {
                    let key = DecapSourceKey {
                        half: next,
                        addr: u32::from_ne_bytes(v4.octets()),
                    };
                    self.sources
                        .insert(key, 1, 0)
                        .with_context(|| format!("adding {addr} to DECAP_SOURCES"))?;
                }
                IpAddr::V6(v6) => {
                    let key = DecapSourceKey6 {
                        half: next,
                        addr: addr_of(v6.octets()),
                    };
                    self.sources6
                        .insert(key, 1, 0)
                        .with_context(|| format!("adding {addr} to DECAP_SOURCES6"))?;
                }
            }
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
        let stale6: Vec<DecapSourceKey6> = self
            .sources6
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.half == half)
            .collect();
        for key in stale6 {
            let _ = self.sources6.remove(&key);
        }
        Ok(())
    }

    /// The settings in force.
    pub fn settings(&self) -> anyhow::Result<Settings> {
        let conf = self.conf.get(&0, 0).context("reading DECAP_CONF")?;
        let half = u32::from(conf.half);
        let mut sources: Vec<IpAddr> = self
            .sources
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.half == half)
            .map(|k| IpAddr::from(k.addr.to_ne_bytes()))
            .collect();
        sources.extend(
            self.sources6
                .keys()
                .filter_map(Result::ok)
                .filter(|k| k.half == half)
                .map(|k| IpAddr::V6(Ipv6Addr::from(octets_of(&k.addr)))),
        );
        sources.sort();
        Ok(Settings {
            gue_port: u16::from_be(conf.gue_port),
            sources,
        })
    }

    /// Packets per verdict, summed over the CPUs, in counter order. A
    /// verdict past the end of an array an older version pinned (adopted
    /// shorter, `load::adoptable`) was never counted: 0.
    pub fn verdicts(&self) -> anyhow::Result<Vec<(DecapVerdict, u64)>> {
        let len = self.verdicts.len();
        DecapVerdict::ALL
            .iter()
            .map(|&v| {
                if v as u32 >= len {
                    return Ok((v, 0));
                }
                let per_cpu = self
                    .verdicts
                    .get(&(v as u32), 0)
                    .with_context(|| format!("reading DECAP_VERDICTS[{}]", v.name()))?;
                Ok((v, per_cpu.iter().sum()))
            })
            .collect()
    }
}

/// The `--from` set: at least one address, each a unicast host address
/// (IPv4 or IPv6), no more than each family's map holds. Duplicates count
/// once.
pub fn check_sources<A: Into<IpAddr> + Copy>(sources: &[A]) -> anyhow::Result<BTreeSet<IpAddr>> {
    let set: BTreeSet<IpAddr> = sources.iter().map(|&a| a.into()).collect();
    if set.is_empty() {
        bail!("--from needs at least one LB address (the tunnels' outer source)");
    }
    let broadcast = |a: &IpAddr| matches!(a, IpAddr::V4(v4) if v4.is_broadcast());
    if let Some(bad) = set
        .iter()
        .find(|a| a.is_unspecified() || a.is_multicast() || broadcast(a))
    {
        bail!(
            "--from {bad}: not an address an LB sends from (unspecified, multicast or broadcast)"
        );
    }
    let v6 = set.iter().filter(|a| a.is_ipv6()).count();
    for (family, n) in [("IPv4", set.len() - v6), ("IPv6", v6)] {
        ensure!(
            n <= MAX_DECAP_SOURCES as usize,
            "--from lists {n} {family} addresses; lb decap holds at most {MAX_DECAP_SOURCES}"
        );
    }
    Ok(set)
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::net::Ipv4Addr;

    #[test]
    fn the_source_set_is_checked_whole() {
        let a = Ipv4Addr::new(198, 18, 1, 1);
        assert_eq!(check_sources(&[a, a]).expect("ok").len(), 1);
        assert!(check_sources::<Ipv4Addr>(&[]).is_err());
        // Both families in one set; IPv6's own refusals.
        let six: IpAddr = "2001:db8:19::1".parse().expect("v6");
        assert_eq!(check_sources(&[a.into(), six]).expect("ok").len(), 2);
        for bad in ["::", "ff02::1"] {
            let bad: IpAddr = bad.parse().expect("v6");
            let e = check_sources(&[six, bad]).expect_err("refused");
            assert!(e.to_string().contains(&bad.to_string()), "{e}");
        }
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
