//! The tunnel backends' `TUNNELS` slots (`TUNNELS6` for an IPv6
//! service's backends, whose outer header is IPv6): the outer source
//! address and the GUE port of each IPIP and GUE backend, written with the
//! backend. A source the config leaves to the route (no `[dataplane]
//! tunnel-source`, `tunnel-source6`) is the address this host sends from
//! to the backend, as the kernel picks it for its route ([`route_source`],
//! [`route_source6`]), so the backend's answers to the tunnel's health and
//! errors come back the way a packet from this host would.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6, UdpSocket};

use std::collections::BTreeMap;

use lb_common::{
    Tunnel, Tunnel6,
    ipv6::{Addr6, addr_of, octets_of},
    tunnel::{PMTU_COUNTERS, TunnelPmtu},
};

use super::{
    Dataplane, MapName, Result,
    handles::{map_err, remove_if_present},
    plan::{Plan, TunnelPlan},
};

/// The source address the kernel picks for a packet from this host to
/// `backend` (its route's preferred source): connecting a UDP socket
/// resolves the route and binds the source, and sends nothing. `None`: no
/// route to the backend now.
pub(super) fn route_source(backend: Ipv4Addr) -> Option<Ipv4Addr> {
    let socket = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)).ok()?;
    // The port only has to be non-zero; nothing is sent to it.
    socket.connect(SocketAddrV4::new(backend, 9)).ok()?;
    match socket.local_addr().ok()?.ip() {
        std::net::IpAddr::V4(source) if !source.is_unspecified() => Some(source),
        _ => None,
    }
}

/// [`route_source`] for an IPv6 backend: the IPv6 source the kernel picks
/// toward it. `None`: no route to it now (or no IPv6 on this host).
pub(super) fn route_source6(backend: Ipv6Addr) -> Option<Ipv6Addr> {
    let socket = UdpSocket::bind(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, 0, 0, 0)).ok()?;
    socket.connect(SocketAddrV6::new(backend, 9, 0, 0)).ok()?;
    match socket.local_addr().ok()?.ip() {
        std::net::IpAddr::V6(source) if !source.is_unspecified() => Some(source),
        _ => None,
    }
}

/// The `TUNNELS6` slot of an IPv6 backend at `addr` with tunnel `plan`,
/// as [`slot`]: all zero for another mode or without a route now.
pub(super) fn slot6(addr: Addr6, plan: Option<TunnelPlan>) -> Tunnel6 {
    let Some(plan) = plan else {
        return Tunnel6::default();
    };
    let source = plan
        .source6
        .or_else(|| route_source6(Ipv6Addr::from(octets_of(&addr))));
    Tunnel6 {
        source: source.map_or([0; 4], |a| addr_of(a.octets())),
        gue_port: plan.gue_port.to_be(),
        _pad: 0,
    }
}

/// The `TUNNELS` slot of a backend at `addr` (raw network order) with
/// tunnel `plan`; the zero slot for a backend of another mode (and for a
/// tunnel backend without a route now: the data plane hands its packets to
/// the kernel until the next apply finds one).
pub(super) fn slot(addr: u32, plan: Option<TunnelPlan>) -> Tunnel {
    let Some(plan) = plan else {
        return Tunnel::default();
    };
    let source = plan
        .source
        .or_else(|| route_source(Ipv4Addr::from(u32::from_be(addr))));
    Tunnel {
        source: source.map_or(0, |a| u32::from(a).to_be()),
        gue_port: plan.gue_port.to_be(),
        _pad: 0,
    }
}

impl Dataplane {
    /// `TUNNEL_PMTU` gets an entry for every tunnel backend address with a
    /// source (the one in its `TUNNELS` slot, and the GUE port), and only
    /// those: the data plane learns a path MTU only for them (a router's
    /// "fragmentation needed" about another address is refused). An entry
    /// whose source and port did not change keeps what it learned.
    pub(super) fn publish_tunnel_pmtu(&mut self, plan: &Plan) -> Result<()> {
        let mut wanted = BTreeMap::new();
        {
            let tunnels = self.array::<Tunnel>(MapName::TUNNELS)?;
            // IPv4 backends only: routers' ICMP about IPv6 tunnel packets
            // is not learned yet.
            for b in plan
                .backends
                .iter()
                .filter(|b| b.tunnel.is_some() && b.addr6.is_none())
            {
                let slot = tunnels.get(&b.id, 0).map_err(map_err(MapName::TUNNELS))?;
                if slot.source != 0 {
                    wanted.insert(b.addr, TunnelPmtu::new(slot.source, slot.gue_port));
                }
            }
        }
        let name = MapName::TUNNEL_PMTU;
        let mut map = self.hash::<u32, TunnelPmtu>(name)?;
        let stale: Vec<u32> = map
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| !wanted.contains_key(k))
            .collect();
        for addr in stale {
            remove_if_present(&mut map, name, &addr)?;
        }
        for (addr, fresh) in wanted {
            if let Ok(old) = map.get(&addr, 0)
                && (old.source, old.gue_port) == (fresh.source, fresh.gue_port)
            {
                continue;
            }
            map.insert(addr, fresh, 0).map_err(map_err(name))?;
        }
        Ok(())
    }
}

/// A tunnel backend's path MTU learned from a router's "fragmentation
/// needed" (`TUNNEL_PMTU`), while it lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LearnedPmtu {
    pub backend: Ipv4Addr,
    /// The outer packets' path MTU; clients get it less the overhead.
    pub mtu: u16,
    pub expires_in: std::time::Duration,
}

impl Dataplane {
    /// The live learned path MTUs, by backend address.
    pub fn tunnel_pmtus(&self) -> Result<Vec<LearnedPmtu>> {
        let name = MapName::TUNNEL_PMTU;
        let map: aya::maps::HashMap<&aya::maps::MapData, u32, TunnelPmtu> =
            aya::maps::HashMap::try_from(self.map_ref(name)?).map_err(map_err(name))?;
        let now = monotonic_ns();
        let mut learned: Vec<LearnedPmtu> = map
            .iter()
            .filter_map(|e| e.ok())
            .filter_map(|(addr, e)| {
                let mtu = e.live(now)?;
                Some(LearnedPmtu {
                    backend: Ipv4Addr::from(u32::from_be(addr)),
                    mtu,
                    expires_in: std::time::Duration::from_nanos(e.expires_ns - now),
                })
            })
            .collect();
        learned.sort_by_key(|l| l.backend);
        Ok(learned)
    }

    /// `TUNNEL_PMTU_STATS` summed over CPUs: routers' "fragmentation
    /// needed" about our tunnel packets learned, clamped, refused
    /// (`lb_common::tunnel::PmtuCounter` order).
    pub fn tunnel_pmtu_counts(&self) -> Result<[u64; PMTU_COUNTERS as usize]> {
        let name = MapName::TUNNEL_PMTU_STATS;
        let map = self.per_cpu::<u64>(name)?;
        let mut out = [0; PMTU_COUNTERS as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            *slot = map.get(&(i as u32), 0).map_err(map_err(name))?.iter().sum();
        }
        Ok(out)
    }
}

/// CLOCK_MONOTONIC in ns: `bpf_ktime_get_ns`'s clock.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to fill; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_route_source_is_the_address_the_host_sends_from() {
        // Loopback is routed from loopback in every namespace.
        assert_eq!(
            route_source(Ipv4Addr::new(127, 0, 0, 2)),
            Some(Ipv4Addr::LOCALHOST)
        );
    }

    #[test]
    fn a_configured_source_wins_and_other_modes_get_the_zero_slot() {
        let backend = u32::from(Ipv4Addr::new(127, 0, 0, 2)).to_be();
        let configured = Ipv4Addr::new(198, 19, 0, 1);
        let slot_of = |source| {
            slot(
                backend,
                Some(TunnelPlan {
                    source,
                    source6: None,
                    gue_port: 6080,
                }),
            )
        };
        assert_eq!(
            slot_of(Some(configured)),
            Tunnel {
                source: u32::from(configured).to_be(),
                gue_port: 6080u16.to_be(),
                _pad: 0,
            }
        );
        assert_eq!(slot_of(None).source, u32::from(Ipv4Addr::LOCALHOST).to_be());
        assert_eq!(slot(backend, None), Tunnel::default());
    }

    #[test]
    fn an_ipv6_backends_slot_takes_tunnel_source6_or_its_routes_source() {
        let plan = |source6| TunnelPlan {
            source: Some(Ipv4Addr::new(198, 19, 0, 1)),
            source6,
            gue_port: 6080,
        };
        let configured: Ipv6Addr = "2001:db8:19::1".parse().expect("v6");
        let backend = addr_of(Ipv6Addr::LOCALHOST.octets());
        assert_eq!(
            slot6(backend, Some(plan(Some(configured)))),
            Tunnel6 {
                source: addr_of(configured.octets()),
                gue_port: 6080u16.to_be(),
                _pad: 0,
            }
        );
        // ::1 is routed from ::1 wherever IPv6 is up (the test host's
        // loopback); IPv4's `tunnel-source` never leaks into it.
        assert_eq!(
            slot6(backend, Some(plan(None))).source,
            addr_of(Ipv6Addr::LOCALHOST.octets())
        );
        assert_eq!(slot6(backend, None), Tunnel6::default());
    }
}
