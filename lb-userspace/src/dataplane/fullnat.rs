//! Full NAT's maps from userspace (docs/architecture.md, "Full NAT"):
//! `FNAT_CONF` (the source addresses and port range, written at every
//! apply) and `FNAT_REPLIES` read back (the claims: ports in use per
//! source address).

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
};

use lb_common::{FNAT_MAX_SOURCES, FlowKey, FnatClaim, FnatConf};

use super::{
    Dataplane, MapName, Result,
    handles::{map_err, set},
};
use crate::config::{Config, Forwarding};

/// The addresses full NAT translates with: `[dataplane] source-addresses`,
/// or else the address this host reaches each full-NAT backend from
/// (`route`: the route's preferred source), each once, at most
/// [`FNAT_MAX_SOURCES`]. Empty while no full-NAT service has a route.
pub fn sources(cfg: &Config, route: impl Fn(Ipv4Addr) -> Option<Ipv4Addr>) -> Vec<Ipv4Addr> {
    if !cfg.dataplane.full_nat.addresses.is_empty() {
        return cfg.dataplane.full_nat.addresses.clone();
    }
    let mut found = Vec::new();
    let backends = cfg
        .services
        .iter()
        .filter(|s| s.forwarding == Forwarding::FullNat)
        .flat_map(|s| &s.backends);
    for backend in backends {
        // IPv4 only: the config's gate refuses an IPv6 service (and so an
        // IPv6 backend) until the data plane balances IPv6.
        let IpAddr::V4(address) = backend.address.ip() else {
            continue;
        };
        if let Some(source) = route(address)
            && !found.contains(&source)
            && found.len() < FNAT_MAX_SOURCES
        {
            found.push(source);
        }
    }
    found
}

/// `FNAT_CONF` for `sources` and the config's port range.
pub fn fnat_conf(cfg: &Config, sources: &[Ipv4Addr]) -> FnatConf {
    let mut conf = FnatConf {
        count: 0,
        port_lo: cfg.dataplane.full_nat.port_lo,
        port_hi: cfg.dataplane.full_nat.port_hi,
        addrs: [0; FNAT_MAX_SOURCES],
    };
    for (slot, addr) in conf.addrs.iter_mut().zip(sources) {
        *slot = u32::from(*addr).to_be();
        conf.count += 1;
    }
    conf
}

/// Claims per source address, from `FNAT_REPLIES`' keys (their
/// destination is the source address).
pub fn ports_in_use(claims: impl IntoIterator<Item = FlowKey>) -> BTreeMap<Ipv4Addr, u64> {
    let mut by_source = BTreeMap::new();
    for key in claims {
        *by_source
            .entry(Ipv4Addr::from(u32::from_be(key.daddr)))
            .or_insert(0) += 1;
    }
    by_source
}

impl Dataplane {
    /// Writes `FNAT_CONF` for `cfg` (one store: a packet sees the old
    /// settings or the new).
    pub(super) fn set_fnat_conf(&mut self, cfg: &Config) -> Result<()> {
        let sources = sources(cfg, super::tunnel::route_source);
        let conf = fnat_conf(cfg, &sources);
        set(
            &mut self.array::<FnatConf>(MapName::FNAT_CONF)?,
            MapName::FNAT_CONF,
            0,
            conf,
        )
    }

    /// What `FNAT_CONF` holds now.
    pub fn fnat_conf(&self) -> Result<FnatConf> {
        let map: aya::maps::Array<&aya::maps::MapData, FnatConf> =
            aya::maps::Array::try_from(self.map_ref(MapName::FNAT_CONF)?)
                .map_err(map_err(MapName::FNAT_CONF))?;
        map.get(&0, 0).map_err(map_err(MapName::FNAT_CONF))
    }

    /// Every full-NAT claim: reply tuple → the flow's forward key.
    pub fn fnat_claims(&self) -> Result<Vec<(FlowKey, FnatClaim)>> {
        let map: aya::maps::HashMap<&aya::maps::MapData, FlowKey, FnatClaim> =
            aya::maps::HashMap::try_from(self.map_ref(MapName::FNAT_REPLIES)?)
                .map_err(map_err(MapName::FNAT_REPLIES))?;
        map.iter()
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(map_err(MapName::FNAT_REPLIES))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Backend, FullNatSources, Protocol, Scheduler, Service};
    use std::net::SocketAddrV4;

    fn config(forwarding: Forwarding, sources: &[Ipv4Addr]) -> Config {
        let mut cfg = Config {
            firewall: Default::default(),
            dataplane: crate::config::Dataplane {
                interfaces: vec!["lo".to_owned()],
                forwarding: Forwarding::Nat,
                xdp_mode: crate::config::XdpMode::Generic,
                conntrack_size: 65536,
                half_open_size: lb_common::DEFAULT_HALF_OPEN_SIZE,
                new_flow_budget: 125_000,
                timeouts: Default::default(),
                tunnel_source: None,
                gue_port: lb_common::tunnel::GUE_DEFAULT_PORT,
                full_nat: FullNatSources {
                    addresses: sources.to_vec(),
                    ..FullNatSources::default()
                },
            },
            monitoring: None,
            announce: None,
            coordination: None,
            sync: None,
            services: Vec::new(),
            pools: Vec::new(),
        };
        let backend = |ip: [u8; 4]| Backend {
            name: format!("{ip:?}"),
            address: SocketAddrV4::new(ip.into(), 8080).into(),
            weight: 1,
            backup: false,
            health: None,
            max_connections: None,
        };
        cfg.services = vec![Service {
            firewall: Default::default(),
            name: "www".into(),
            vip: SocketAddrV4::new([198, 18, 0, 10].into(), 80).into(),
            protocol: Protocol::Tcp,
            forwarding,
            scheduler: Scheduler::RoundRobin,
            health: None,
            on_backend_down: crate::config::OnBackendDown::KeepFlows,
            maglev_table_size: lb_common::maglev::MAGLEV_DEFAULT_SIZE,
            backends: vec![
                backend([198, 19, 0, 11]),
                backend([198, 19, 0, 12]),
                backend([198, 20, 0, 11]),
            ],
            limits: Default::default(),
            proxy_protocol: None,
        }];
        cfg
    }

    /// The route's source: 198.19/16 from .1 of it, 198.20/16 from .1.
    fn route(ip: Ipv4Addr) -> Option<Ipv4Addr> {
        let [a, b, ..] = ip.octets();
        Some(Ipv4Addr::new(a, b, 0, 1))
    }

    #[test]
    fn configured_sources_win_else_each_backends_route_source_once() {
        let listed = [Ipv4Addr::new(198, 19, 0, 99)];
        assert_eq!(
            sources(&config(Forwarding::FullNat, &listed), route),
            listed
        );
        assert_eq!(
            sources(&config(Forwarding::FullNat, &[]), route),
            [Ipv4Addr::new(198, 19, 0, 1), Ipv4Addr::new(198, 20, 0, 1)]
        );
        assert!(
            sources(&config(Forwarding::Nat, &[]), route).is_empty(),
            "no full-NAT service: no sources"
        );
    }

    #[test]
    fn the_conf_holds_the_sources_in_network_order_and_the_range() {
        let cfg = config(Forwarding::FullNat, &[]);
        let conf = fnat_conf(&cfg, &[Ipv4Addr::new(198, 19, 0, 1)]);
        assert_eq!(conf.count, 1);
        assert_eq!(conf.addrs[0].to_ne_bytes(), [198, 19, 0, 1]);
        assert_eq!((conf.port_lo, conf.port_hi), (1024, 32767));
    }

    #[test]
    fn ports_in_use_are_counted_per_source_address() {
        let claim = |source: [u8; 4], port: u16| FlowKey {
            saddr: u32::from_ne_bytes([198, 19, 0, 11]),
            daddr: u32::from_ne_bytes(source),
            sport: 8080u16.to_be(),
            dport: port.to_be(),
            protocol: 6,
            _pad0: 0,
            _pad1: 0,
        };
        let counts = ports_in_use([
            claim([10, 0, 0, 1], 1),
            claim([10, 0, 0, 1], 2),
            claim([10, 0, 0, 2], 1),
        ]);
        assert_eq!(counts[&Ipv4Addr::new(10, 0, 0, 1)], 2);
        assert_eq!(counts[&Ipv4Addr::new(10, 0, 0, 2)], 1);
    }
}
