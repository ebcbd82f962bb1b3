//! `lb explain`'s arguments: the flow as the operator names it, and the
//! conntrack key the data plane builds from its packets.

use std::net::SocketAddrV4;

use anyhow::{Context, bail};
use lb_common::{
    FlowKey,
    headers::{IPPROTO_TCP, IPPROTO_UDP},
};

/// A flow as `lb explain` takes it: client → VIP, protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowQuery {
    pub client: SocketAddrV4,
    pub vip: SocketAddrV4,
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub protocol: u8,
}

impl FlowQuery {
    /// Parses `CLIENT_IP:PORT` and `VIP:PORT/PROTO` (proto `tcp` or `udp`).
    pub fn parse(client: &str, service: &str) -> anyhow::Result<FlowQuery> {
        let client: SocketAddrV4 = client.parse().with_context(|| {
            format!("bad client {client:?}: expected IPV4:PORT, e.g. 198.18.0.2:40000")
        })?;
        let Some((vip, proto)) = service.rsplit_once('/') else {
            bail!("bad flow {service:?}: expected VIP:PORT/PROTO, e.g. 198.18.0.10:80/tcp");
        };
        let vip: SocketAddrV4 = vip.parse().with_context(|| {
            format!("bad VIP {vip:?} in {service:?}: expected IPV4:PORT, e.g. 198.18.0.10:80")
        })?;
        let protocol = match proto.to_ascii_lowercase().as_str() {
            "tcp" => IPPROTO_TCP,
            "udp" => IPPROTO_UDP,
            _ => bail!("bad protocol {proto:?} in {service:?}: tcp or udp"),
        };
        Ok(FlowQuery {
            client,
            vip,
            protocol,
        })
    }

    /// The conntrack key the data plane would build from this flow's
    /// packets (network order, as in the packet).
    pub fn key(&self) -> FlowKey {
        FlowKey {
            saddr: u32::from_ne_bytes(self.client.ip().octets()),
            daddr: u32::from_ne_bytes(self.vip.ip().octets()),
            sport: self.client.port().to_be(),
            dport: self.vip.port().to_be(),
            protocol: self.protocol,
            _pad0: 0,
            _pad1: 0,
        }
    }

    pub(super) fn protocol_name(&self) -> &'static str {
        if self.protocol == IPPROTO_UDP {
            "udp"
        } else {
            "tcp"
        }
    }
}
