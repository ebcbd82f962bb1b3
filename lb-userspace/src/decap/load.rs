//! Loading the `lb-decap` object, and the decapsulator of one interface
//! pinned under `PIN_DIR/IFACE` so it outlives the command that attached it:
//! the link (`link`, which keeps the program attached) and the four maps.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::MapInfo,
    programs::{
        Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        xdp::XdpLink,
    },
};

use super::maps::{self, DecapMaps};
use crate::object::{DECAP_OBJECT, MapLayout, MissingObject, map_layouts};

/// The XDP program of the `lb-decap` object.
pub const PROGRAM: &str = "lb_decap";
/// The link's pin in an interface's directory.
const LINK: &str = "link";

/// A loaded decapsulator: the program (loaded, maybe not attached) and
/// its maps.
pub struct Decapsulator {
    ebpf: Ebpf,
    pub maps: DecapMaps,
}

impl Decapsulator {
    /// Loads the object with nothing pinned: it lives as long as this
    /// value (the kernel tests, the benchmark).
    pub fn load() -> anyhow::Result<Self> {
        Self::load_in(None)
    }

    /// Loads the object with its maps pinned in `dir`, reusing the ones
    /// already pinned there (a re-attach keeps its counters).
    fn load_in(dir: Option<&Path>) -> anyhow::Result<Self> {
        if DECAP_OBJECT.is_empty() {
            return Err(MissingObject.into());
        }
        let mut loader = EbpfLoader::new();
        for name in dir
            .into_iter()
            .flat_map(|d| maps::ALL.map(|m| (m, d.join(m))))
        {
            loader.map_pin_path(name.0, name.1);
        }
        let mut ebpf = loader
            .load(DECAP_OBJECT)
            .context("loading the lb-decap object")?;
        let mut take = |name: &str| {
            ebpf.take_map(name)
                .with_context(|| format!("map {name} missing from the lb-decap object"))
        };
        let maps = DecapMaps::from_maps(
            take(maps::CONF)?,
            take(maps::SOURCES)?,
            take(maps::SOURCES6)?,
            take(maps::VERDICTS)?,
        )?;
        let mut decap = Decapsulator { ebpf, maps };
        decap
            .program()?
            .load()
            .with_context(|| format!("loading the {PROGRAM} program"))?;
        Ok(decap)
    }

    /// The `lb_decap` program.
    pub fn program(&mut self) -> anyhow::Result<&mut Xdp> {
        self.ebpf
            .program_mut(PROGRAM)
            .with_context(|| format!("program {PROGRAM} missing from the lb-decap object"))?
            .try_into()
            .with_context(|| format!("program {PROGRAM}"))
    }
}

/// The directory of `iface`'s pinned decapsulator under `pin_dir`.
pub fn entry_dir(pin_dir: &Path, iface: &str) -> PathBuf {
    pin_dir.join(iface)
}

/// Attaches (or re-attaches) the decapsulator to `iface`, pinned in `dir`:
/// the maps pinned there are reused and the settings replaced, then the
/// program attached, or swapped in place of the one a pinned link holds
/// (bpf_link_update: no packet goes unprocessed). Returns whether it was
/// attached already.
pub fn attach_pinned<A: Into<std::net::IpAddr> + Copy>(
    dir: &Path,
    iface: &str,
    sources: &[A],
    gue_port: u16,
) -> anyhow::Result<bool> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    check_pinned_layouts(dir)?;
    let mut decap = Decapsulator::load_in(Some(dir))?;
    // The settings first: a fresh program sees them from its first packet.
    decap.maps.replace(sources, gue_port)?;
    let link_path = dir.join(LINK);
    let prog = decap.program()?;
    if link_path.exists() {
        let relink_hint = || {
            format!(
                "the link pinned at {} no longer attaches to {iface} (was the interface \
                 removed?): run `lb decap detach {iface}` and attach again",
                link_path.display()
            )
        };
        let pinned = PinnedLink::from_pin(&link_path).with_context(relink_hint)?;
        let link = XdpLink::try_from(FdLink::from(pinned)).with_context(relink_hint)?;
        let id = prog.attach_to_link(link).with_context(relink_hint)?;
        // The pin keeps the link; closing our handle does not detach it.
        drop(prog.take_link(id)?);
        return Ok(true);
    }
    let id = prog.attach(iface, XdpMode::default()).with_context(|| {
        format!(
            "attaching lb decap to {iface}: if another XDP program is attached there (`ip link \
             show {iface}` says `xdp`, e.g. an `lb run` data plane or another tool), lb decap \
             cannot share the interface: detach that program first"
        )
    })?;
    let link = FdLink::try_from(prog.take_link(id)?).context("the XDP link")?;
    link.pin(&link_path)
        .with_context(|| format!("pinning the link at {}", link_path.display()))?;
    Ok(false)
}

/// Refuses maps pinned in `dir` whose layout is not this version's (the
/// loader would reuse them whatever their layout).
fn check_pinned_layouts(dir: &Path) -> anyhow::Result<()> {
    let wanted = map_layouts(DECAP_OBJECT)?;
    for name in maps::ALL {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        let info =
            MapInfo::from_pin(&path).with_context(|| format!("reading {}", path.display()))?;
        let pinned = MapLayout::of(&info);
        let want = wanted
            .get(name)
            .with_context(|| format!("map {name} missing from the lb-decap object"))?
            .as_loaded();
        if !adoptable(name, &pinned, &want) {
            bail!(
                "{} is {pinned}, this version needs {want}: run `lb decap detach` on the \
                 interface first (its counters restart from 0)",
                path.display()
            );
        }
    }
    Ok(())
}

/// May a map pinned as `pinned` serve as `name`, which this version makes
/// as `want`? Only with its layout; the verdict counters also with fewer
/// entries, as an older version made them (verdicts were added since): an
/// upgrade re-attaches in place, without the detach that would leave the
/// backend's tunnelled packets undecapsulated meanwhile, and the newer
/// verdicts go uncounted until a detach (`DecapMaps::verdicts` reads 0).
fn adoptable(name: &str, pinned: &MapLayout, want: &MapLayout) -> bool {
    if name == maps::VERDICTS {
        let longer = MapLayout {
            max_entries: want.max_entries,
            ..*pinned
        };
        return longer == *want && pinned.max_entries <= want.max_entries;
    }
    pinned == want
}

/// Detaches the decapsulator pinned in `dir` (unpinning its link detaches
/// the program) and removes its pins. What was removed, by name.
pub fn detach_pinned(dir: &Path) -> anyhow::Result<Vec<String>> {
    let mut removed = Vec::new();
    let link = dir.join(LINK);
    if link.exists() {
        let pinned = PinnedLink::from_pin(&link)
            .with_context(|| format!("opening the link pinned at {}", link.display()))?;
        drop(
            pinned
                .unpin()
                .with_context(|| format!("unpinning {}", link.display()))?,
        );
        removed.push(LINK.to_owned());
    }
    for name in maps::ALL {
        let path = dir.join(name);
        if path.exists() {
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            removed.push(name.to_owned());
        }
    }
    // Only now empty; anything else left there is not ours to remove.
    let _ = std::fs::remove_dir(dir);
    Ok(removed)
}

/// Is the link of the decapsulator in `dir` pinned (so attached)?
pub fn link_pinned(dir: &Path) -> bool {
    dir.join(LINK).exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_older_shorter_verdict_array_is_adopted_beside_the_same_layout() {
        let want = MapLayout {
            map_type: 6,
            key_size: 4,
            value_size: 8,
            max_entries: 17,
            flags: 0,
        };
        let older = MapLayout {
            max_entries: 15,
            ..want
        };
        let longer = MapLayout {
            max_entries: 18,
            ..want
        };
        let other_value = MapLayout {
            value_size: 4,
            ..older
        };
        assert!(adoptable(maps::VERDICTS, &want, &want));
        assert!(adoptable(maps::VERDICTS, &older, &want));
        assert!(!adoptable(maps::VERDICTS, &longer, &want));
        assert!(!adoptable(maps::VERDICTS, &other_value, &want));
        // Any other map: its layout exactly.
        assert!(adoptable(maps::CONF, &want, &want));
        assert!(!adoptable(maps::CONF, &older, &want));
    }
}
