//! What `lb doctor` reads from the host ([`Facts`]): the config's
//! interfaces and their links (XDP features, offloads, veth peers), the
//! sysctls, the addresses on `lo`, the bpffs, routes and neighbours.
//! Filled in by [`super::gather`]; judged by [`super::findings`].

use std::{net::Ipv4Addr, path::PathBuf};

use serde::Serialize;

/// Everything [`super::findings`] looks at, read from the host by [`super::gather`].
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Facts {
    /// The config's interfaces, in its order.
    pub interfaces: Vec<Interface>,
    /// `net.ipv4.conf.all.rp_filter` (the kernel uses the larger of it and
    /// the interface's).
    pub rp_filter_all: Option<u8>,
    /// IPv4 addresses on `lo`.
    pub loopback: Vec<Ipv4Addr>,
    /// Whether the pin directory's parent is on a bpffs.
    pub bpffs: Bpffs,
    /// The main IPv4 routing table (`/proc/net/route`); `None`: not read.
    pub routes: Option<Vec<Route>>,
    /// The IPv4 neighbour table (`/proc/net/arp`); `None`: not read.
    pub neighbours: Option<Vec<Neighbour>>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Bpffs {
    pub path: PathBuf,
    pub mounted: bool,
}

/// One of the config's interfaces; `link` is `None` when no interface of
/// that name exists in this network namespace.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Interface {
    pub name: String,
    pub link: Option<Link>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Link {
    pub ifindex: u32,
    /// The rtnetlink kind (`veth`, `bridge`, …); `None` for a NIC.
    pub kind: Option<String>,
    pub mtu: u32,
    /// `net.ipv4.conf.IF.forwarding`; `None`: unreadable.
    pub forwarding: Option<bool>,
    /// `net.ipv6.conf.IF.forwarding`; `None`: unreadable (or no IPv6).
    pub forwarding6: Option<bool>,
    /// `net.ipv4.conf.IF.rp_filter`.
    pub rp_filter: Option<u8>,
    /// What the driver says it supports (netlink family `netdev`, kernel
    /// 6.3+); `None` when the kernel does not say.
    pub xdp: Option<XdpFeatures>,
    /// A veth's other end.
    pub peer: Option<Peer>,
}

/// `NETDEV_XDP_ACT_*` bits of an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct XdpFeatures(pub u64);

impl XdpFeatures {
    pub const BASIC: u64 = 1;
    pub const REDIRECT: u64 = 1 << 1;
    pub const NDO_XMIT: u64 = 1 << 2;

    /// Native XDP: the driver runs programs (pass, drop, tx).
    pub fn native(self) -> bool {
        self.0 & Self::BASIC != 0
    }

    /// Frames may be redirected *into* it (`ndo_xdp_xmit`). On a veth the
    /// driver sets it exactly while the peer can take them (XDP program or
    /// GRO on the peer).
    pub fn redirect_target(self) -> bool {
        self.0 & Self::NDO_XMIT != 0
    }
}

/// A veth's peer: seen (same namespace, or one named under /run/netns),
/// or known only by the namespace id the kernel gave it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "visible")]
pub enum Peer {
    Seen {
        name: String,
        /// `None`: this namespace.
        netns: Option<String>,
        /// Any of tx-checksum-ipv4/ipv6/ip-generic active.
        tx_checksum: Option<bool>,
        gro: Option<bool>,
        xdp_attached: bool,
        /// The bridge (or other master) it is a port of.
        master: Option<String>,
    },
    Hidden {
        netnsid: i32,
        /// The peer's index in its namespace.
        index: u32,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Route {
    pub dest: Ipv4Addr,
    pub prefix_len: u8,
    /// `None`: directly connected.
    pub gateway: Option<Ipv4Addr>,
    pub metric: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Neighbour {
    pub address: Ipv4Addr,
    pub device: String,
    /// The kernel has its MAC (ATF_COM).
    pub complete: bool,
    pub mac: String,
}
