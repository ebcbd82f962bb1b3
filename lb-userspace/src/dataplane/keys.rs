//! Map keys and codes from config values: the raw network-order endpoint,
//! protocol number, service key and scheduler code the maps hold.

use std::net::SocketAddrV4;

use lb_common::ServiceKey;

use crate::config::{self, Protocol};

/// Address and port as raw network-order values, as the maps hold them.
pub fn raw_endpoint(addr: SocketAddrV4) -> (u32, u16) {
    (u32::from_ne_bytes(addr.ip().octets()), addr.port().to_be())
}

/// The IP protocol number of a config protocol.
pub fn protocol_number(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => lb_common::headers::IPPROTO_TCP,
        Protocol::Udp => lb_common::headers::IPPROTO_UDP,
    }
}

/// A service's key in `SERVICES`.
pub fn service_key(svc: &config::Service) -> ServiceKey {
    let (vip, port) = raw_endpoint(svc.vip);
    ServiceKey {
        vip,
        port,
        protocol: protocol_number(svc.protocol),
        _pad: 0,
    }
}
