//! The data plane's side of checks through the VIP
//! (`health::through_vip`): `lb_probe` on the probe namespace's veth, and
//! the services' ids the probes' entries name.

use std::{collections::BTreeMap, net::SocketAddr};

use aya::programs::XdpMode;

use super::{
    Dataplane, DataplaneError, Result,
    load::program_mut,
    plan::{any_endpoint, svc_key},
};
use crate::config::Config;

/// A service's VIP as the probes address it, its data plane id and its
/// backends' ids by address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceRoute {
    pub id: u32,
    pub vip: SocketAddr,
    pub backends: BTreeMap<SocketAddr, u32>,
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

    /// Every service of `cfg` the maps hold, of either family: its VIP, its
    /// id and its backends' ids.
    pub fn service_routes(&self, cfg: &Config) -> BTreeMap<String, ServiceRoute> {
        cfg.services
            .iter()
            .filter_map(|s| {
                let id = *self.ids.services.get(&svc_key(s))?;
                let backends = s
                    .backends
                    .iter()
                    .filter_map(|b| {
                        let (addr, port) = any_endpoint(b.address);
                        Some((b.address, *self.ids.backends.get(&(id, addr, port))?))
                    })
                    .collect();
                Some((
                    s.name.clone(),
                    ServiceRoute {
                        id,
                        vip: s.vip,
                        backends,
                    },
                ))
            })
            .collect()
    }
}
