//! Planning IPv6 services' entries: the keys and addresses the IPv6 maps
//! will hold, pure and host-tested, before those maps exist.
//!
//! The IPv6 data plane keeps one id space with IPv4 (docs/architecture.md
//! "IPv6"): a service's id indexes the shared `SERVICE_CONF`, a backend's
//! id the shared `BACKENDS` (port, flags, service), and only what is 16
//! bytes wide lives in IPv6's own maps: `VIPS6` (VIP → services on it),
//! `SERVICES6` (`ServiceKey6` → service id), `BACKENDS6` (backend id →
//! `Backend6`, its address) and `NAT_BACKENDS6` (a NAT backend's
//! `Endpoint6`, so replies are recognised). [`plan6`] gives those keys and
//! values per service and backend, in config order; the ids, rings and
//! flags are the shared planner's ([`super::plan`]) once it allocates for
//! both families. Nothing writes these entries yet: `lb-ebpf` has only
//! `VIPS6`, and the config rejects an IPv6 service (config/service.rs
//! `data_plane_balances`).

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
};

use lb_common::{
    ipv6::{Addr6, addr_of},
    maps6::{Backend6, Endpoint6, ServiceKey6},
};

use super::keys::protocol_number;
use crate::config::{Config, Forwarding, Service};

/// One IPv6 service's entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service6Plan {
    pub name: String,
    /// Its `SERVICES6` key (VIP, port raw network order, protocol).
    pub key: ServiceKey6,
    /// Its backends in config order: name, `BACKENDS6` value, and the port
    /// (raw network order) its `BACKENDS` slot holds.
    pub backends: Vec<(String, Backend6, u16)>,
}

/// Every IPv6 entry `cfg` needs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan6 {
    pub services: Vec<Service6Plan>,
    /// `VIPS6`: IPv6 VIP → number of services on it.
    pub vips: BTreeMap<Addr6, u32>,
    /// `NAT_BACKENDS6`: every NAT service's backend endpoint, with the
    /// number of backends on it (as IPv4's `Plan::nat_endpoints`).
    pub nat_endpoints: BTreeMap<Endpoint6, u32>,
}

/// An IPv6 address as the maps hold it (raw network-order words); `None`
/// for an IPv4 one.
fn addr6(addr: SocketAddr) -> Option<Addr6> {
    match addr.ip() {
        IpAddr::V6(v6) => Some(addr_of(v6.octets())),
        IpAddr::V4(_) => None,
    }
}

/// The IPv6 entries of `svc`; `None` for an IPv4 service (a backend of
/// the other family cannot pass the config: `same_family`).
fn service6(svc: &Service) -> Option<Service6Plan> {
    let protocol = protocol_number(svc.protocol);
    let key = ServiceKey6 {
        vip: addr6(svc.vip)?,
        port: svc.vip.port().to_be(),
        protocol,
        _pad: 0,
    };
    let backends = svc
        .backends
        .iter()
        .map(|b| {
            let addr = addr6(b.address)?;
            Some((b.name.clone(), Backend6 { addr }, b.address.port().to_be()))
        })
        .collect::<Option<Vec<_>>>()?;
    Some(Service6Plan {
        name: svc.name.clone(),
        key,
        backends,
    })
}

/// The IPv6 entries of every IPv6 service of `cfg` (IPv4 services are
/// [`super::plan::plan`]'s).
pub fn plan6(cfg: &Config) -> Plan6 {
    let mut plan = Plan6::default();
    for svc in &cfg.services {
        let Some(entries) = service6(svc) else {
            continue;
        };
        *plan.vips.entry(entries.key.vip).or_default() += 1;
        if svc.forwarding == Forwarding::Nat {
            for (_, backend, port) in &entries.backends {
                let endpoint = Endpoint6 {
                    addr: backend.addr,
                    port: *port,
                    protocol: entries.key.protocol,
                    _pad: 0,
                };
                *plan.nat_endpoints.entry(endpoint).or_default() += 1;
            }
        }
        plan.services.push(entries);
    }
    plan
}

#[cfg(test)]
mod tests {
    use std::net::Ipv6Addr;

    use lb_common::headers::{IPPROTO_TCP, IPPROTO_UDP};

    use super::*;
    use crate::config::{Backend, OnBackendDown, Protocol, Scheduler};

    fn backend(address: &str) -> Backend {
        Backend {
            name: address.into(),
            address: address.parse().expect("address"),
            weight: 1,
            backup: false,
            health: None,
            max_connections: None,
        }
    }

    fn service(name: &str, vip: &str, protocol: Protocol, forwarding: Forwarding) -> Service {
        Service {
            name: name.into(),
            vip: vip.parse().expect("vip"),
            protocol,
            forwarding,
            scheduler: Scheduler::RoundRobin,
            maglev_table_size: lb_common::maglev::MAGLEV_DEFAULT_SIZE,
            health: None,
            on_backend_down: OnBackendDown::KeepFlows,
            backends: Vec::new(),
            firewall: Default::default(),
            limits: Default::default(),
            proxy_protocol: None,
        }
    }

    /// The words as a packet carries them: the address's bytes in order.
    fn wire(addr: Addr6) -> [u8; 16] {
        let mut out = [0u8; 16];
        for (i, w) in addr.iter().enumerate() {
            out[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
        }
        out
    }

    fn cfg(services: Vec<Service>) -> Config {
        let mut cfg = crate::config::parse(
            "[dataplane]\ninterfaces = [\"eth0\"]\n\n[[service]]\nname = \"v4\"\n\
             vip = \"198.18.0.10:80\"\nbackends = [{ address = \"198.19.0.11:80\" }]\n",
            std::path::Path::new("plan6.toml"),
        )
        .expect("config");
        cfg.services.extend(services);
        cfg
    }

    #[test]
    fn ipv6_services_get_their_keys_addresses_vips_and_nat_endpoints() {
        let mut web = service(
            "web6",
            "[2001:db8:18::10]:80",
            Protocol::Tcp,
            Forwarding::Nat,
        );
        web.backends = vec![
            backend("[2001:db8:19::11]:8080"),
            backend("[2001:db8:19::12]:8080"),
        ];
        let mut dns = service(
            "dns6",
            "[2001:db8:18::10]:53",
            Protocol::Udp,
            Forwarding::Nat,
        );
        dns.backends = vec![backend("[2001:db8:19::11]:5353")];
        let mut dsr = service(
            "dsr6",
            "[2001:db8:18::20]:443",
            Protocol::Tcp,
            Forwarding::Dsr,
        );
        dsr.backends = vec![backend("[2001:db8:19::13]:443")];
        let plan = plan6(&cfg(vec![web, dns, dsr]));

        // The IPv4 service is the IPv4 planner's.
        let names: Vec<&str> = plan.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["web6", "dns6", "dsr6"]);
        let web = &plan.services[0];
        let vip: Ipv6Addr = "2001:db8:18::10".parse().expect("ip");
        assert_eq!(
            wire(web.key.vip),
            vip.octets(),
            "network order, as in the packet"
        );
        assert_eq!(web.key.port, 80u16.to_be());
        assert_eq!(web.key.protocol, IPPROTO_TCP);
        assert_eq!(plan.services[1].key.protocol, IPPROTO_UDP);
        let b2: Ipv6Addr = "2001:db8:19::12".parse().expect("ip");
        assert_eq!(web.backends[1].0, "[2001:db8:19::12]:8080");
        assert_eq!(wire(web.backends[1].1.addr), b2.octets());
        assert_eq!(web.backends[1].2, 8080u16.to_be());

        // Two services on one VIP count twice; the DSR VIP once.
        let dsr_vip: Ipv6Addr = "2001:db8:18::20".parse().expect("ip");
        let vips: Vec<([u8; 16], u32)> = plan.vips.iter().map(|(a, n)| (wire(*a), *n)).collect();
        assert_eq!(vips, [(vip.octets(), 2), (dsr_vip.octets(), 1)]);

        // NAT backends only: web's two (tcp) and dns's one (udp) on the
        // same address but another port and protocol; not the DSR one.
        let mut endpoints: Vec<([u8; 16], u16, u8, u32)> = plan
            .nat_endpoints
            .iter()
            .map(|(e, n)| (wire(e.addr), u16::from_be(e.port), e.protocol, *n))
            .collect();
        endpoints.sort();
        let b1: Ipv6Addr = "2001:db8:19::11".parse().expect("ip");
        assert_eq!(
            endpoints,
            [
                (b1.octets(), 5353, IPPROTO_UDP, 1),
                (b1.octets(), 8080, IPPROTO_TCP, 1),
                (b2.octets(), 8080, IPPROTO_TCP, 1),
            ]
        );
    }

    #[test]
    fn an_ipv4_config_plans_no_ipv6_entry() {
        assert_eq!(plan6(&cfg(Vec::new())), Plan6::default());
    }
}
