//! Map keys and codes from config values: the raw network-order endpoint,
//! protocol number, service key and scheduler code the maps hold.

use std::net::{SocketAddr, SocketAddrV4};

use lb_common::ServiceKey;

use crate::config::{self, Protocol};

/// Address and port as raw network-order values, as the maps hold them.
pub fn raw_endpoint(addr: SocketAddrV4) -> (u32, u16) {
    (u32::from_ne_bytes(addr.ip().octets()), addr.port().to_be())
}

/// An IPv4 address's raw endpoint as the IPv4 maps hold it; `None` for an
/// IPv6 one, whose keys are IPv6's own (`plan::SvcKey::V6`).
pub fn ipv4_endpoint(addr: SocketAddr) -> Option<(u32, u16)> {
    match addr {
        SocketAddr::V4(v4) => Some(raw_endpoint(v4)),
        SocketAddr::V6(_) => None,
    }
}

/// The IP protocol number of a config protocol.
pub fn protocol_number(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => lb_common::headers::IPPROTO_TCP,
        Protocol::Udp => lb_common::headers::IPPROTO_UDP,
    }
}

/// An IPv4 service's key in `SERVICES`; `None` for an IPv6 service (its
/// key is a `ServiceKey6`, `plan::SvcKey::V6`).
pub fn service_key(svc: &config::Service) -> Option<ServiceKey> {
    let (vip, port) = ipv4_endpoint(svc.vip)?;
    Some(ServiceKey {
        vip,
        port,
        protocol: protocol_number(svc.protocol),
        _pad: 0,
    })
}
