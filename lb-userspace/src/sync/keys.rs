//! A flow key of either family as sync names it: IPv4's `FlowKey` and
//! IPv6's `FlowKey6` each say how a peer's record becomes their key, which
//! client a key names, and how a NAT flow's two entries find each other —
//! the rules the data plane's `flows` and `flows6` follow, so an entry
//! written here is one the data plane finds.

use std::{hash::Hash, net::SocketAddr};

use lb_common::{Flow, FlowKey, ipv6::addr_of, maps6::FlowKey6};

use super::{
    Directory,
    directory::{endpoint, endpoint6},
    wire::Record,
};

/// A flow key sync reads and writes.
pub trait SyncKey: Copy + Eq + Hash + std::fmt::Debug {
    /// The forward key (client → VIP) of a record's flow, if the record is
    /// of this family.
    fn of_record(r: &Record) -> Option<Self>;
    /// The reply key (backend → client) of the NAT flow whose forward key
    /// this is, its backend at `backend` (of this family).
    fn reply(&self, backend: SocketAddr) -> Option<Self>;
    /// What a NAT flow's entries hold in `Flow::vip`: IPv4's the VIP
    /// (`flows::forward_key` reads it back), IPv6's the marker 1 (its VIP
    /// is its service's, `SERVICE_VIPS6`).
    fn nat_vip(&self) -> u32;
    /// The client a forward key names.
    fn client(&self) -> SocketAddr;
    /// The forward key of the flow a reply entry (`flow`) belongs to.
    fn forward_of_reply(&self, flow: &Flow, dir: &Directory) -> Option<Self>;
}

/// Raw network-order (address, port) of an IPv4 endpoint.
fn raw4(a: SocketAddr) -> Option<(u32, u16)> {
    match a {
        SocketAddr::V4(a) => Some(crate::dataplane::raw_endpoint(a)),
        SocketAddr::V6(_) => None,
    }
}

/// An IPv6 endpoint as IPv6's maps hold it.
fn raw6(a: SocketAddr) -> Option<(lb_common::ipv6::Addr6, u16)> {
    match a {
        SocketAddr::V6(a) => Some((addr_of(a.ip().octets()), a.port().to_be())),
        SocketAddr::V4(_) => None,
    }
}

impl SyncKey for FlowKey {
    fn of_record(r: &Record) -> Option<FlowKey> {
        let (saddr, sport) = raw4(r.client)?;
        let (daddr, dport) = raw4(r.vip)?;
        Some(FlowKey {
            saddr,
            daddr,
            sport,
            dport,
            protocol: r.protocol,
            ..FlowKey::default()
        })
    }

    fn reply(&self, backend: SocketAddr) -> Option<FlowKey> {
        let (addr, port) = raw4(backend)?;
        Some(lb_common::flow::reply_key(
            self,
            &lb_common::Backend {
                addr,
                port,
                ..lb_common::Backend::default()
            },
        ))
    }

    fn nat_vip(&self) -> u32 {
        self.daddr
    }

    fn client(&self) -> SocketAddr {
        endpoint(self.saddr, self.sport).into()
    }

    fn forward_of_reply(&self, flow: &Flow, _dir: &Directory) -> Option<FlowKey> {
        Some(lb_common::flow::forward_key(self, flow))
    }
}

impl SyncKey for FlowKey6 {
    fn of_record(r: &Record) -> Option<FlowKey6> {
        let (saddr, sport) = raw6(r.client)?;
        let (daddr, dport) = raw6(r.vip)?;
        Some(FlowKey6 {
            saddr,
            daddr,
            sport,
            dport,
            protocol: r.protocol,
            ..FlowKey6::EMPTY
        })
    }

    fn reply(&self, backend: SocketAddr) -> Option<FlowKey6> {
        let (addr, port) = raw6(backend)?;
        Some(self.reply_of(addr, port))
    }

    fn nat_vip(&self) -> u32 {
        1
    }

    fn client(&self) -> SocketAddr {
        endpoint6(&self.saddr, self.sport)
    }

    fn forward_of_reply(&self, flow: &Flow, dir: &Directory) -> Option<FlowKey6> {
        let (vip, _) = raw6(dir.service_name(flow.service_id)?.vip)?;
        Some(self.forward_of(vip, flow.vport))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::wire::Event;

    fn record(client: &str, vip: &str, backend: &str) -> Record {
        Record {
            event: Event::Established,
            client: client.parse().unwrap(),
            vip: vip.parse().unwrap(),
            protocol: 6,
            closing: false,
            nat: true,
            backend: backend.parse().unwrap(),
            age_ms: 0,
            seq: 0,
            reply_seq: 0,
        }
    }

    /// A record becomes the key of its own family only, and the key's
    /// client and reply are the record's, as the data plane builds them.
    #[test]
    fn a_record_is_a_key_of_its_own_family() {
        let r4 = record("198.18.1.2:40000", "198.18.0.10:80", "198.19.0.11:8080");
        let r6 = record(
            "[2001:db8:18:1::2]:40000",
            "[2001:db8:18::10]:80",
            "[2001:db8:19::11]:8080",
        );
        assert!(FlowKey6::of_record(&r4).is_none());
        assert!(FlowKey::of_record(&r6).is_none());
        let k4 = FlowKey::of_record(&r4).expect("IPv4");
        assert_eq!(k4.client(), r4.client);
        let k6 = FlowKey6::of_record(&r6).expect("IPv6");
        assert_eq!(k6.client(), r6.client);
        let reply = k6.reply(r6.backend).expect("reply");
        assert_eq!(endpoint6(&reply.saddr, reply.sport), r6.backend);
        assert_eq!(endpoint6(&reply.daddr, reply.dport), r6.client);
        assert!(k6.reply(r4.backend).is_none(), "no IPv4 backend for IPv6");
        let reply4 = k4.reply(r4.backend).expect("reply");
        assert_eq!(
            SocketAddr::from(endpoint(reply4.saddr, reply4.sport)),
            r4.backend
        );
    }
}
