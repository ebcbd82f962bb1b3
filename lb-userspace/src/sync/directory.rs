//! Services and backends by id (what the data plane's events carry) and
//! by address (what the peers' records carry), read from the maps the
//! agent wrote: the sync thread sees exactly what the data plane forwards
//! by, and needs nothing from the agent's loop.

use std::{collections::BTreeMap, net::SocketAddrV4};

use lb_common::{BACKEND_F_IN_USE, Backend, MAX_BACKENDS, MODE_NAT, ServiceConf, ServiceKey};

/// A service as the peers name it: VIP, port, protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ServiceName {
    pub vip: SocketAddrV4,
    pub protocol: u8,
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
    backends: BTreeMap<(u32, SocketAddrV4), u32>,
    backend_addrs: BTreeMap<u32, SocketAddrV4>,
}

/// Address and port from the maps' raw network-order values.
pub fn endpoint(addr: u32, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(addr.to_ne_bytes().into(), u16::from_be(port))
}

impl Directory {
    /// From the maps' contents: `SERVICES` entries, `SERVICE_CONF` and
    /// `BACKENDS` by id.
    pub fn build(
        services: impl IntoIterator<Item = (ServiceKey, u32)>,
        conf: impl Fn(u32) -> Option<ServiceConf>,
        backend: impl Fn(u32) -> Option<Backend>,
    ) -> Directory {
        let mut d = Directory::default();
        for (key, id) in services {
            let Some(c) = conf(id) else { continue };
            if c.enabled == 0 {
                continue;
            }
            let name = ServiceName {
                vip: endpoint(key.vip, key.port),
                protocol: key.protocol,
            };
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
            if b.flags & BACKEND_F_IN_USE == 0 || !d.service_names.contains_key(&b.service_id) {
                continue;
            }
            let addr = endpoint(b.addr, b.port);
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

    pub fn backend(&self, service_id: u32, addr: SocketAddrV4) -> Option<u32> {
        self.backends.get(&(service_id, addr)).copied()
    }

    pub fn backend_addr(&self, id: u32) -> Option<SocketAddrV4> {
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
        let d = Directory::build([(key, 3)], conf, backend);
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
}
