//! Services and backends by id (what the data plane's events carry) and
//! by address (what the peers' records carry), read from the maps the
//! agent wrote: the sync thread sees exactly what the data plane forwards
//! by, and needs nothing from the agent's loop. Both families: IPv4's
//! services are in `SERVICES`, IPv6's in `SERVICES6`, and one id space
//! covers them (`SERVICE_CONF`, `BACKENDS`); an IPv6 backend's address is
//! in `BACKENDS6`, at the index its `BACKENDS` slot names.

use std::{
    collections::BTreeMap,
    net::{Ipv6Addr, SocketAddr, SocketAddrV4},
};

use lb_common::{
    BACKEND_F_IN_USE, Backend, MAX_BACKENDS, MODE_NAT, ServiceConf, ServiceKey,
    ipv6::{Addr6, octets_of},
    maps6::ServiceKey6,
};

/// A service as the peers name it: VIP, port, protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ServiceName {
    pub vip: SocketAddr,
    pub protocol: u8,
}

impl ServiceName {
    /// An IPv4 service's name from its `SERVICES` key.
    pub fn of(key: &ServiceKey) -> ServiceName {
        ServiceName {
            vip: endpoint(key.vip, key.port).into(),
            protocol: key.protocol,
        }
    }

    /// An IPv6 service's name from its `SERVICES6` key.
    pub fn of6(key: &ServiceKey6) -> ServiceName {
        ServiceName {
            vip: endpoint6(&key.vip, key.port),
            protocol: key.protocol,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalService {
    pub id: u32,
    pub nat: bool,
}

/// Both ways between ids and addresses.
#[derive(Debug, Default, Clone)]
pub struct Directory {
    services: BTreeMap<ServiceName, LocalService>,
    service_names: BTreeMap<u32, ServiceName>,
    /// (service id, backend address) → backend id.
    backends: BTreeMap<(u32, SocketAddr), u32>,
    backend_addrs: BTreeMap<u32, SocketAddr>,
}

/// Address and port from the maps' raw network-order values.
pub fn endpoint(addr: u32, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(addr.to_ne_bytes().into(), u16::from_be(port))
}

/// An IPv6 address (as the maps hold it) and a raw network-order port.
pub fn endpoint6(addr: &Addr6, port: u16) -> SocketAddr {
    SocketAddr::new(Ipv6Addr::from(octets_of(addr)).into(), u16::from_be(port))
}

impl Directory {
    /// From the maps' contents: the services (`SERVICES` and `SERVICES6`
    /// entries, named), `SERVICE_CONF` and `BACKENDS` by id, and an IPv6
    /// backend's address by its `BACKENDS6` index (`addr6`).
    pub fn build(
        services: impl IntoIterator<Item = (ServiceName, u32)>,
        conf: impl Fn(u32) -> Option<ServiceConf>,
        backend: impl Fn(u32) -> Option<Backend>,
        addr6: impl Fn(u32) -> Option<Addr6>,
    ) -> Directory {
        let mut d = Directory::default();
        for (name, id) in services {
            let Some(c) = conf(id) else { continue };
            if c.enabled == 0 {
                continue;
            }
            d.services.insert(
                name,
                LocalService {
                    id,
                    nat: c.mode == MODE_NAT,
                },
            );
            d.service_names.insert(id, name);
        }
        for id in 0..MAX_BACKENDS {
            let Some(b) = backend(id) else { continue };
            if b.flags & BACKEND_F_IN_USE == 0 {
                continue;
            }
            let Some(service) = d.service_names.get(&b.service_id) else {
                continue;
            };
            // A backend is of its service's family.
            let addr = if service.vip.is_ipv4() {
                endpoint(b.addr, b.port).into()
            } else {
                let Some(a) = addr6(b.addr) else { continue };
                endpoint6(&a, b.port)
            };
            d.backends.insert((b.service_id, addr), id);
            d.backend_addrs.insert(id, addr);
        }
        d
    }

    pub fn service(&self, name: &ServiceName) -> Option<LocalService> {
        self.services.get(name).copied()
    }

    pub fn service_name(&self, id: u32) -> Option<ServiceName> {
        self.service_names.get(&id).copied()
    }

    pub fn backend(&self, service_id: u32, addr: SocketAddr) -> Option<u32> {
        self.backends.get(&(service_id, addr)).copied()
    }

    pub fn backend_addr(&self, id: u32) -> Option<SocketAddr> {
        self.backend_addrs.get(&id).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(a: [u8; 4], port: u16) -> (u32, u16) {
        (u32::from_ne_bytes(a), port.to_be())
    }

    #[test]
    fn records_map_to_local_ids_by_address_only() {
        let (vip, port) = raw([198, 18, 0, 100], 80);
        let key = ServiceKey {
            vip,
            port,
            protocol: 6,
            _pad: 0,
        };
        let conf = |id| {
            (id == 3).then_some(ServiceConf {
                mode: MODE_NAT,
                enabled: 1,
                ..ServiceConf::default()
            })
        };
        let backend = |id| {
            let (addr, port) = raw([198, 19, 0, 2], 8080);
            match id {
                7 => Some(Backend {
                    addr,
                    port,
                    flags: BACKEND_F_IN_USE,
                    service_id: 3,
                    _pad: 0,
                }),
                // Retired: not a backend to sync to.
                8 => Some(Backend {
                    addr,
                    port: 9090u16.to_be(),
                    flags: 0,
                    service_id: 3,
                    _pad: 0,
                }),
                _ => None,
            }
        };
        let d = Directory::build([(ServiceName::of(&key), 3)], conf, backend, |_| None);
        let name = ServiceName {
            vip: "198.18.0.100:80".parse().unwrap(),
            protocol: 6,
        };
        assert_eq!(d.service(&name), Some(LocalService { id: 3, nat: true }));
        assert_eq!(
            d.service(&ServiceName {
                protocol: 17,
                ..name
            }),
            None,
            "another protocol is another service"
        );
        assert_eq!(d.service_name(3), Some(name));
        assert_eq!(d.backend(3, "198.19.0.2:8080".parse().unwrap()), Some(7));
        assert_eq!(d.backend(3, "198.19.0.2:9090".parse().unwrap()), None);
        assert_eq!(d.backend(4, "198.19.0.2:8080".parse().unwrap()), None);
        assert_eq!(d.backend_addr(7), Some("198.19.0.2:8080".parse().unwrap()));
    }

    /// An IPv6 service's backends are named by their `BACKENDS6` address
    /// (their `BACKENDS` slot holds its index), beside an IPv4 service of
    /// the same id space.
    #[test]
    fn ipv6_services_and_backends_are_named_by_their_ipv6_addresses() {
        let vip6: std::net::Ipv6Addr = "2001:db8:18::10".parse().unwrap();
        let key6 = ServiceKey6 {
            vip: lb_common::ipv6::addr_of(vip6.octets()),
            port: 80u16.to_be(),
            protocol: 6,
            _pad: 0,
        };
        let (vip, port) = raw([198, 18, 0, 100], 80);
        let key4 = ServiceKey {
            vip,
            port,
            protocol: 6,
            _pad: 0,
        };
        let conf = |id| {
            (id < 2).then_some(ServiceConf {
                mode: MODE_NAT,
                enabled: 1,
                ..ServiceConf::default()
            })
        };
        let web6: std::net::Ipv6Addr = "2001:db8:19::11".parse().unwrap();
        let backend = |id: u32| {
            let (addr, _) = raw([198, 19, 0, 2], 0);
            match id {
                // IPv4's: its own address.
                0 => Some(Backend {
                    addr,
                    port: 8080u16.to_be(),
                    flags: BACKEND_F_IN_USE,
                    service_id: 0,
                    _pad: 0,
                }),
                // IPv6's: `addr` is its BACKENDS6 index, 5.
                1 => Some(Backend {
                    addr: 5,
                    port: 8080u16.to_be(),
                    flags: BACKEND_F_IN_USE,
                    service_id: 1,
                    _pad: 0,
                }),
                _ => None,
            }
        };
        let addr6 = |i| (i == 5).then(|| lb_common::ipv6::addr_of(web6.octets()));
        let d = Directory::build(
            [(ServiceName::of(&key4), 0), (ServiceName::of6(&key6), 1)],
            conf,
            backend,
            addr6,
        );
        let name6 = ServiceName {
            vip: "[2001:db8:18::10]:80".parse().unwrap(),
            protocol: 6,
        };
        assert_eq!(d.service(&name6), Some(LocalService { id: 1, nat: true }));
        assert_eq!(d.service_name(1), Some(name6));
        let backend6 = "[2001:db8:19::11]:8080".parse().unwrap();
        assert_eq!(d.backend(1, backend6), Some(1));
        assert_eq!(d.backend_addr(1), Some(backend6));
        assert_eq!(d.backend(0, backend6), None, "not the IPv4 service's");
        assert_eq!(d.backend_addr(0), Some("198.19.0.2:8080".parse().unwrap()));
    }
}
