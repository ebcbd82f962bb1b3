//! The data plane's side of checks through the VIP
//! (`health::through_vip`): `lb_probe` on the probe namespace's veth, and
//! the services' ids the probes' entries name.

use std::{
    collections::BTreeMap,
    net::{SocketAddr, SocketAddrV4},
};

use aya::programs::XdpMode;

use super::{
    Dataplane, DataplaneError, Result,
    keys::{raw_endpoint, service_key},
    load::program_mut,
    plan::{BackendAddr, SvcKey},
};
use crate::config::Config;

/// A service's VIP as the probes address it, its data plane id and its
/// backends' ids by address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceRoute {
    pub id: u32,
    pub vip: SocketAddrV4,
    pub backends: BTreeMap<SocketAddrV4, u32>,
}

/// The steering program's name in the object (lb-ebpf/src/probe.rs).
pub const PROBE_PROGRAM: &str = "lb_probe";

impl Dataplane {
    /// Loads `lb_probe` (once) and attaches it to `iface` (the host end of
    /// the probe namespace's veth), in native mode: veth runs XDP itself.
    /// The link is the program's: detached when the data plane drops.
    pub fn attach_probe(&mut self, iface: &str) -> Result<()> {
        let prog = program_mut(&mut self.ebpf, PROBE_PROGRAM)?;
        if prog.fd().is_err() {
            prog.load().map_err(|source| DataplaneError::Program {
                name: PROBE_PROGRAM.into(),
                source,
            })?;
        }
        prog.attach(iface, XdpMode::Driver)
            .map_err(|source| DataplaneError::Attach {
                iface: iface.into(),
                source,
            })?;
        Ok(())
    }

    /// Every service of `cfg` the maps hold (IPv4's: probes through the
    /// VIP are IPv4 frames): its VIP, its id and its backends' ids.
    pub fn service_routes(&self, cfg: &Config) -> BTreeMap<String, ServiceRoute> {
        cfg.services
            .iter()
            .filter_map(|s| {
                let SocketAddr::V4(vip) = s.vip else {
                    return None;
                };
                let id = *self.ids.services.get(&SvcKey::V4(service_key(s)?))?;
                let backends = s
                    .backends
                    .iter()
                    .filter_map(|b| {
                        let SocketAddr::V4(address) = b.address else {
                            return None;
                        };
                        let (addr, port) = raw_endpoint(address);
                        Some((
                            address,
                            *self.ids.backends.get(&(id, BackendAddr::V4(addr), port))?,
                        ))
                    })
                    .collect();
                Some((s.name.clone(), ServiceRoute { id, vip, backends }))
            })
            .collect()
    }
}
