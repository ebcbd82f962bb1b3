//! Loading the `lb` object (pinned under a pin dir or not), attaching its
//! program to interfaces, and removing a pinned data plane (`teardown`).

use std::path::Path;

use aya::{
    Ebpf, EbpfLoader,
    maps::ProgramArray,
    programs::{
        Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        xdp::XdpLink,
    },
};

use super::{
    Dataplane, DataplaneError, MapName, PROGRAM, PROXY_PROGRAM, PROXY6_PROGRAM, Result,
    SETUP_PROGRAM, TableSizes, V6_PORTLESS_PROGRAM, V6_PROGRAM, V6_SETUP_PROGRAM, adopt,
    firewall::FwIds, handles::map_err, plan::Ids,
};
use crate::{config, object::ebpf_object};

impl Dataplane {
    /// Loads the object and the `lb` program (not yet attached). Nothing is
    /// pinned: the data plane lives as long as this value (tests, tools).
    pub fn load(sizes: impl Into<TableSizes>) -> Result<Self> {
        Self::load_bytes(ebpf_object()?, sizes.into(), None)
    }

    /// Loads with every map pinned under `pin_dir` (a bpffs directory),
    /// reusing maps already pinned there: a restarted agent adopts the
    /// previous one's flows, rings and counters. Returns whether it adopted.
    pub fn load_pinned(sizes: impl Into<TableSizes>, pin_dir: &Path) -> Result<(Self, bool)> {
        let sizes = sizes.into();
        std::fs::create_dir_all(pin_dir).map_err(|e| DataplaneError::Pin {
            path: pin_dir.into(),
            reason: e.to_string(),
        })?;
        let object = ebpf_object()?;
        // Before the loader touches anything: it would silently reuse
        // whatever is pinned at a map's path, whatever its layout or size.
        adopt::check_pins(object, sizes, pin_dir)?;
        let adopted = pin_dir.join(MapName::SERVICES.name()).exists();
        let mut dp = Self::load_bytes(object, sizes, Some(pin_dir))?;
        if adopted {
            dp.adopt_ids()?;
        }
        Ok((dp, adopted))
    }

    /// Loads another build of the object, unpinned: for measurements that
    /// compare builds (`tests/tests/kernel_trace.rs`, the trace cost).
    pub fn load_object(object: &[u8], sizes: impl Into<TableSizes>) -> Result<Self> {
        Self::load_bytes(object, sizes.into(), None)
    }

    fn load_bytes(object: &[u8], sizes: TableSizes, pin_dir: Option<&Path>) -> Result<Self> {
        let mut loader = EbpfLoader::new();
        for &map in MapName::ALL {
            if let Some(entries) = sizes.entries(map) {
                loader.map_max_entries(map.name(), entries);
            }
        }
        // Pinning is the list's (`MapName::pinned`), not the object's: see
        // lb-common/src/map_names.rs.
        for map in pin_dir
            .into_iter()
            .flat_map(|dir| MapName::pinned().map(move |m| (m, dir.join(m.name()))))
        {
            loader.map_pin_path(map.0.name(), map.1);
        }
        let mut ebpf = loader.load(object)?;
        for name in [
            PROGRAM,
            SETUP_PROGRAM,
            PROXY_PROGRAM,
            V6_PROGRAM,
            V6_SETUP_PROGRAM,
            V6_PORTLESS_PROGRAM,
            PROXY6_PROGRAM,
        ] {
            program_mut(&mut ebpf, name)?
                .load()
                .map_err(|source| DataplaneError::Program {
                    name: name.into(),
                    source,
                })?;
        }
        set_stages(&mut ebpf)?;
        Ok(Self {
            ebpf,
            ids: Ids::default(),
            fw: FwIds::default(),
            attached: Vec::new(),
            pin_dir: pin_dir.map(Path::to_path_buf),
            least_connections: Vec::new(),
            active: Vec::new(),
        })
    }

    /// Attaches `lb` to an interface. Unpinned: detached when `self` drops.
    /// Pinned: the link is pinned as `link-<iface>` and outlives the agent;
    /// if a previous agent's link is pinned there, the new program replaces
    /// the old one in place (bpf_link_update), so no packet goes unprocessed.
    pub fn attach(&mut self, iface: &str, mode: config::XdpMode) -> Result<()> {
        let mode = match mode {
            config::XdpMode::Native => XdpMode::Driver,
            config::XdpMode::Generic => XdpMode::Skb,
        };
        let attach_err = |source| DataplaneError::Attach {
            iface: iface.into(),
            source,
        };
        let Some(dir) = self.pin_dir.clone() else {
            // The program keeps the link and detaches it when it drops.
            program_mut(&mut self.ebpf, PROGRAM)?
                .attach(iface, mode)
                .map_err(attach_err)?;
            self.attached.push(iface.to_string());
            return Ok(());
        };
        let path = dir.join(format!("link-{iface}"));
        let prog = program_mut(&mut self.ebpf, PROGRAM)?;
        if path.exists() {
            let pinned = PinnedLink::from_pin(&path).map_err(|source| DataplaneError::Link {
                path: path.clone(),
                source,
            })?;
            let link =
                XdpLink::try_from(FdLink::from(pinned)).map_err(|source| DataplaneError::Link {
                    path: path.clone(),
                    source,
                })?;
            let id = prog.attach_to_link(link).map_err(attach_err)?;
            // The pin keeps the link attached; closing our fd does not detach it.
            drop(prog.take_link(id).map_err(attach_err)?);
        } else {
            let id = prog.attach(iface, mode).map_err(attach_err)?;
            let link = prog.take_link(id).map_err(attach_err)?;
            let fd = FdLink::try_from(link).map_err(|source| DataplaneError::Link {
                path: path.clone(),
                source,
            })?;
            fd.pin(&path).map_err(|e| DataplaneError::Pin {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        }
        self.attached.push(iface.to_string());
        Ok(())
    }

    /// Removes a pinned data plane: unpins every link (detaching XDP) and map.
    /// The explicit opposite of a restart.
    pub fn teardown(pin_dir: &Path) -> Result<Vec<String>> {
        let mut removed = Vec::new();
        let entries = match std::fs::read_dir(pin_dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
            Err(e) => {
                return Err(DataplaneError::Pin {
                    path: pin_dir.into(),
                    reason: e.to_string(),
                });
            }
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("link-") {
                let pinned =
                    PinnedLink::from_pin(&path).map_err(|source| DataplaneError::Link {
                        path: path.clone(),
                        source,
                    })?;
                // Unpinned and closed: the kernel detaches the program.
                drop(pinned.unpin().map_err(|e| DataplaneError::Pin {
                    path: path.clone(),
                    reason: e.to_string(),
                })?);
            } else {
                std::fs::remove_file(&path).map_err(|e| DataplaneError::Pin {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
            }
            removed.push(name);
        }
        let _ = std::fs::remove_dir(pin_dir);
        Ok(removed)
    }
}

/// Puts the loaded stages in `STAGES` (an adopted array too: the running
/// `lb` then reaches this load's stages, which read the same maps): the
/// second stage, the PROXY v2 stage, IPv6's three and its PROXY stage.
fn set_stages(ebpf: &mut Ebpf) -> Result<()> {
    for (index, program) in [
        (lb_common::STAGE_SETUP, SETUP_PROGRAM),
        (lb_common::STAGE_PROXY, PROXY_PROGRAM),
        (lb_common::maps6::STAGE_V6, V6_PROGRAM),
        (lb_common::maps6::STAGE_V6_SETUP, V6_SETUP_PROGRAM),
        (lb_common::maps6::STAGE_V6_PORTLESS, V6_PORTLESS_PROGRAM),
        (lb_common::maps6::STAGE_PROXY6, PROXY6_PROGRAM),
    ] {
        set_stage(ebpf, index, program)?;
    }
    Ok(())
}

fn set_stage(ebpf: &mut Ebpf, index: u32, program: &str) -> Result<()> {
    let fd = program_mut(ebpf, program)?
        .fd()
        .map_err(|source| DataplaneError::Program {
            name: program.into(),
            source,
        })?
        .try_clone()
        .map_err(|e| DataplaneError::Program {
            name: program.into(),
            source: aya::programs::ProgramError::IOError(e),
        })?;
    let name = MapName::STAGES;
    let map = ebpf
        .map_mut(name.name())
        .ok_or(DataplaneError::MissingMap(name.name()))?;
    let mut stages = ProgramArray::try_from(map).map_err(map_err(name))?;
    stages.set(index, &fd, 0).map_err(map_err(name))
}

pub(super) fn program_mut<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Xdp> {
    let prog = ebpf
        .program_mut(name)
        .ok_or_else(|| DataplaneError::MissingProgram(name.into()))?;
    prog.try_into().map_err(|source| DataplaneError::Program {
        name: name.into(),
        source,
    })
}
