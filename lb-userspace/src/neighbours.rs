//! Neighbour entries the data plane needs, resolved by the kernel on the
//! agent's request over rtnetlink (`netlink-packet-route`): the program
//! forwards only to next hops whose MAC is in the neighbour table
//! (`bpf_fib_lookup`), and a NAT reply cannot be handed to the LB's kernel
//! instead (its source is the LB's own VIP: dropped as a martian).
//!
//! The request is an `RTM_NEWNEIGH` with `NTF_USE` (`ip neigh replace ADDR
//! dev IF use`): the kernel creates the entry if it has none and runs its
//! own resolution (an ARP request, or an IPv6 neighbour solicitation), or
//! refreshes a stale one, exactly as if it had a packet for it — and sends
//! nothing to the address's services. Two sources of addresses, both
//! families: every backend (route looked up with `RTM_GETROUTE`), every
//! 10 s, so DSR finds their MACs before the first packet; and the next hops
//! the data plane reports when it finds none (`NEIGH_WANTED`,
//! `NEIGH_WANTED6`, drained every 100 ms), so a client whose entry went
//! stale and was deleted is resolved again before its backend
//! retransmits.

use std::{io, net::IpAddr};

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage,
    NetlinkPayload,
};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    neighbour::{
        NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
    },
    route::{RouteAddress, RouteAttribute, RouteMessage},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// A netlink route socket for neighbour requests.
pub struct Neighbours {
    socket: Socket,
    sequence: u32,
}

impl Neighbours {
    pub fn new() -> io::Result<Self> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        Ok(Neighbours {
            socket,
            sequence: 0,
        })
    }

    /// Has the kernel resolve (or refresh) the neighbour `next_hop` on
    /// interface `ifindex`. A static entry (`nud permanent` or `noarp`) is
    /// left as it is: the kernel (6.x) turns it into an INCOMPLETE one on a
    /// `use` request, losing the operator's MAC for an ARP nobody may
    /// answer.
    pub fn resolve(&mut self, ifindex: u32, next_hop: impl Into<IpAddr>) -> io::Result<()> {
        let next_hop = next_hop.into();
        if self.is_static(ifindex, next_hop)? {
            return Ok(());
        }
        let mut msg = NeighbourMessage::default();
        msg.header.family = family(next_hop);
        msg.header.ifindex = ifindex;
        msg.header.flags = NeighbourFlags::Use;
        msg.attributes = vec![NeighbourAttribute::Destination(neighbour(next_hop))];
        let flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE;
        self.request(RouteNetlinkMessage::NewNeighbour(msg), flags)?;
        Ok(())
    }

    /// Whether the neighbour table holds a static entry for `next_hop` on
    /// `ifindex` (`RTM_GETNEIGH`; no entry: false).
    fn is_static(&mut self, ifindex: u32, next_hop: IpAddr) -> io::Result<bool> {
        let mut msg = NeighbourMessage::default();
        msg.header.family = family(next_hop);
        msg.header.ifindex = ifindex;
        msg.attributes = vec![NeighbourAttribute::Destination(neighbour(next_hop))];
        match self.request(RouteNetlinkMessage::GetNeighbour(msg), NLM_F_REQUEST) {
            Ok(Some(RouteNetlinkMessage::NewNeighbour(entry))) => Ok(matches!(
                entry.header.state,
                NeighbourState::Permanent | NeighbourState::Noarp
            )),
            Ok(_) => Ok(false),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Resolves the next hop the kernel routes `addr` through (its gateway,
    /// or `addr` itself on a connected network), in either family.
    pub fn resolve_route(&mut self, addr: impl Into<IpAddr>) -> io::Result<()> {
        let (ifindex, next_hop) = self.route(addr.into())?;
        self.resolve(ifindex, next_hop)
    }

    /// The interface and next hop of the kernel's route to `addr`.
    fn route(&mut self, addr: IpAddr) -> io::Result<(u32, IpAddr)> {
        let mut msg = RouteMessage::default();
        msg.header.address_family = family(addr);
        let (destination, length) = match addr {
            IpAddr::V4(a) => (RouteAddress::Inet(a), 32),
            IpAddr::V6(a) => (RouteAddress::Inet6(a), 128),
        };
        msg.header.destination_prefix_length = length;
        msg.attributes = vec![RouteAttribute::Destination(destination)];
        let answer = self.request(RouteNetlinkMessage::GetRoute(msg), NLM_F_REQUEST)?;
        let Some(RouteNetlinkMessage::NewRoute(route)) = answer else {
            return Err(io::Error::other(format!("no route to {addr}")));
        };
        let mut found = (None, addr);
        for attribute in &route.attributes {
            match attribute {
                RouteAttribute::Oif(i) => found.0 = Some(*i),
                RouteAttribute::Gateway(RouteAddress::Inet(gw)) => found.1 = IpAddr::V4(*gw),
                RouteAttribute::Gateway(RouteAddress::Inet6(gw)) => found.1 = IpAddr::V6(*gw),
                _ => {}
            }
        }
        match found {
            (Some(ifindex), next_hop) => Ok((ifindex, next_hop)),
            (None, _) => Err(io::Error::other(format!(
                "the route to {addr} has no interface"
            ))),
        }
    }

    /// Sends one request and reads its answer: the message it returns, if
    /// any; an error for a netlink error (an ACK is `Ok(None)`).
    fn request(
        &mut self,
        message: RouteNetlinkMessage,
        flags: u16,
    ) -> io::Result<Option<RouteNetlinkMessage>> {
        self.sequence = self.sequence.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        header.sequence_number = self.sequence;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(message));
        packet.finalize();
        let mut buf = vec![0; packet.buffer_len()];
        packet.serialize(&mut buf);
        self.socket.send(&buf, 0)?;
        loop {
            let (answer, _) = self.socket.recv_from_full()?;
            let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&answer)
                .map_err(|e| io::Error::other(format!("netlink answer: {e}")))?;
            if reply.header.sequence_number != self.sequence {
                continue; // an answer to an earlier request that gave up
            }
            return match reply.payload {
                NetlinkPayload::Error(e) => match e.code {
                    Some(code) => Err(io::Error::from_raw_os_error(-code.get())),
                    None => Ok(None),
                },
                NetlinkPayload::InnerMessage(m) => Ok(Some(m)),
                _ => Ok(None),
            };
        }
    }
}

fn family(addr: IpAddr) -> AddressFamily {
    match addr {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    }
}

fn neighbour(addr: IpAddr) -> NeighbourAddress {
    match addr {
        IpAddr::V4(a) => NeighbourAddress::Inet(a),
        IpAddr::V6(a) => NeighbourAddress::Inet6(a),
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn ip(args: &[&str]) -> String {
        let out = std::process::Command::new("ip")
            .args(args)
            .output()
            .expect("ip");
        assert!(out.status.success(), "ip {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `f` in a network namespace of its own (made with unshare, on
    /// a thread of its own) holding a veth pair, wa0 198.18.99.1/24 ↔ wa1.
    /// Needs root: `cargo xtask test` runs the host tests as root.
    fn in_own_netns(f: impl FnOnce() + Send + 'static) {
        if !rustix::process::geteuid().is_root() {
            panic!("this test needs root (a network namespace)");
        }
        std::thread::spawn(|| {
            // SAFETY: plain syscall; it moves only this thread (and the
            // commands it starts) into a new network namespace.
            let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "unshare: {}", std::io::Error::last_os_error());
            ip(&["link", "add", "wa0", "type", "veth", "peer", "name", "wa1"]);
            ip(&["addr", "add", "198.18.99.1/24", "dev", "wa0"]);
            ip(&["link", "set", "wa0", "up"]);
            ip(&["link", "set", "wa1", "up"]);
            f();
        })
        .join()
        .expect("the namespace thread");
    }

    #[test]
    fn a_use_request_creates_an_entry_the_kernel_resolves_itself() {
        in_own_netns(|| {
            let mut n = Neighbours::new().expect("netlink socket");
            let peer = Ipv4Addr::new(198, 18, 99, 7);
            n.resolve_route(peer).expect("resolve");
            let text = ip(&["neigh", "show", "198.18.99.7", "dev", "wa0"]);
            // Nobody answers ARP on the peer: the entry exists and is being
            // resolved (or has failed), which only the kernel's own
            // resolution does.
            assert!(
                ["INCOMPLETE", "FAILED", "PROBE"]
                    .iter()
                    .any(|s| text.contains(s)),
                "{text:?}"
            );
            assert!(
                n.resolve_route(Ipv4Addr::new(203, 0, 113, 1)).is_err(),
                "no route"
            );
        });
    }

    #[test]
    fn a_static_entry_is_left_as_the_operator_wrote_it() {
        in_own_netns(|| {
            let mac = "02:00:00:00:99:08";
            ip(&[
                "neigh",
                "replace",
                "198.18.99.8",
                "lladdr",
                mac,
                "dev",
                "wa0",
                "nud",
                "permanent",
            ]);
            let mut n = Neighbours::new().expect("netlink socket");
            for _ in 0..2 {
                n.resolve_route(Ipv4Addr::new(198, 18, 99, 8))
                    .expect("resolve");
            }
            let text = ip(&["neigh", "show", "198.18.99.8", "dev", "wa0"]);
            assert!(
                text.contains(mac) && text.contains("PERMANENT"),
                "the static entry was replaced: {text:?}"
            );
        });
    }
}
