//! `lb explain`'s arguments: the flow as the operator names it, and the
//! conntrack key the data plane builds from its packets.

use std::net::SocketAddr;

use anyhow::{Context, bail};
use lb_common::{
    FlowKey,
    headers::{IPPROTO_TCP, IPPROTO_UDP},
    ipv6::addr_of,
    maps6::FlowKey6,
};

/// A flow as `lb explain` takes it: client → VIP, protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowQuery {
    pub client: SocketAddr,
    pub vip: SocketAddr,
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub protocol: u8,
}

impl FlowQuery {
    /// Parses `CLIENT_IP:PORT` and `VIP:PORT/PROTO` (proto `tcp` or `udp`),
    /// in either family (IPv6 in brackets), both of one family.
    pub fn parse(client: &str, service: &str) -> anyhow::Result<FlowQuery> {
        let client: SocketAddr = client.parse().with_context(|| {
            format!(
                "bad client {client:?}: expected IP:PORT, e.g. 198.18.0.2:40000 \
                 or [2001:db8::2]:40000"
            )
        })?;
        let Some((vip, proto)) = service.rsplit_once('/') else {
            bail!("bad flow {service:?}: expected VIP:PORT/PROTO, e.g. 198.18.0.10:80/tcp");
        };
        let vip: SocketAddr = vip.parse().with_context(|| {
            format!(
                "bad VIP {vip:?} in {service:?}: expected IP:PORT, e.g. 198.18.0.10:80 \
                 or [2001:db8::10]:80"
            )
        })?;
        if client.is_ipv4() != vip.is_ipv4() {
            bail!(
                "client {client} and VIP {vip} are of different families: a packet \
                 carries one (the data plane does not translate IPv4 to IPv6)"
            );
        }
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

    /// The IPv4 conntrack key the data plane would build from this flow's
    /// packets (network order, as in the packet); `None` for an IPv6 flow
    /// (no IPv6 flow table yet).
    pub fn key(&self) -> Option<FlowKey> {
        let (SocketAddr::V4(client), SocketAddr::V4(vip)) = (self.client, self.vip) else {
            return None;
        };
        Some(FlowKey {
            saddr: u32::from_ne_bytes(client.ip().octets()),
            daddr: u32::from_ne_bytes(vip.ip().octets()),
            sport: client.port().to_be(),
            dport: vip.port().to_be(),
            protocol: self.protocol,
            _pad0: 0,
            _pad1: 0,
        })
    }

    /// The IPv6 flow-table key (`ESTABLISHED6`, `HALF_OPEN6`) of this
    /// flow's client packets; `None` for an IPv4 flow.
    pub fn key6(&self) -> Option<FlowKey6> {
        let (SocketAddr::V6(client), SocketAddr::V6(vip)) = (self.client, self.vip) else {
            return None;
        };
        Some(FlowKey6 {
            saddr: addr_of(client.ip().octets()),
            daddr: addr_of(vip.ip().octets()),
            sport: client.port().to_be(),
            dport: vip.port().to_be(),
            protocol: self.protocol,
            _pad0: 0,
            _pad1: 0,
        })
    }

    pub(super) fn protocol_name(&self) -> &'static str {
        if self.protocol == IPPROTO_UDP {
            "udp"
        } else {
            "tcp"
        }
    }
}
