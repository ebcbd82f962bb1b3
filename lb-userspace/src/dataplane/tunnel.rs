//! The tunnel backends' `TUNNELS` slots: the outer source address and the
//! GUE port of each IPIP and GUE backend, written with the backend. A
//! source the config leaves to the route (no `[dataplane] tunnel-source`)
//! is the address this host sends from to the backend, as the kernel picks
//! it for its route ([`route_source`]), so the backend's answers to the
//! tunnel's health and errors come back the way a packet from this host
//! would.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};

use lb_common::Tunnel;

use super::plan::TunnelPlan;

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
}
