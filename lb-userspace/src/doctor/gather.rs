//! Reading the host for `lb doctor`, in the calling thread's network
//! namespace: links, addresses and namespace ids over rtnetlink
//! (`netlink-packet-route`), each interface's XDP features from the generic
//! netlink family `netdev`, offloads from the `ethtool` family (the
//! `ethtool` crate's messages), sysctls from /proc/sys, routes and
//! neighbours from /proc/net. Not /sys/class/net: under `lb run --netns`
//! the mount namespace, and with it sysfs, is still the host's.
//!
//! A veth's peer in another namespace is looked at from a thread that
//! enters that namespace, when it is one named under /run/netns.
//! The `netdev` family's messages are defined in `netdev`.

mod netdev;

use std::{
    collections::BTreeMap,
    fs,
    net::{IpAddr, Ipv4Addr},
    os::fd::AsRawFd,
    path::Path,
};

use anyhow::{Context, bail};
use ethtool::{EthtoolAttr, EthtoolFeatureAttr, EthtoolMessage};
use futures_util::StreamExt;
use genetlink::GenetlinkHandle;
use netlink_packet_core::{NLM_F_DUMP, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload};
use netlink_packet_generic::GenlMessage;
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    address::{AddressAttribute, AddressMessage},
    link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage, LinkXdp, XdpAttached},
    nsid::{NsidAttribute, NsidMessage},
};
use netlink_proto::{ConnectionHandle, sys::SocketAddr};

use netdev::{NetdevAttr, NetdevDev};

use super::{Bpffs, Facts, Interface, Link, Neighbour, Peer, Route, XdpFeatures};
use crate::config::Config;

/// Reads the facts for `cfg` and pin dir `pin_dir`; `neighbours` adds the
/// routing and neighbour tables. Must not run inside an async runtime
/// (it runs its own).
pub fn gather(cfg: &Config, pin_dir: &Path, neighbours: bool) -> anyhow::Result<Facts> {
    let names = cfg.dataplane.interfaces.clone();
    let mut facts = current_thread_runtime()?.block_on(async {
        let net = Netlink::connect()?;
        let links = net.links().await?;
        let loopback = net.loopback_addresses(&links).await?;
        let mut interfaces = Vec::new();
        for name in &names {
            let link = match links.values().find(|l| &l.name == name) {
                Some(l) => Some(link_facts(&net, l, &links).await?),
                None => None,
            };
            interfaces.push(Interface {
                name: name.clone(),
                link,
            });
        }
        anyhow::Ok(Facts {
            interfaces,
            loopback,
            ..Facts::default()
        })
    })?;
    // Peers in named namespaces: one thread per namespace, which enters it.
    for iface in &mut facts.interfaces {
        if let Some(link) = &mut iface.link
            && let Some(Peer::Hidden { netnsid, index }) = link.peer
            && let Some(ns) = named_netns_with_id(netnsid)?
        {
            link.peer = Some(peer_in(&ns, index)?);
        }
    }
    facts.rp_filter_all = read_sysctl("net/ipv4/conf/all/rp_filter");
    facts.bpffs = bpffs_of(pin_dir);
    if neighbours {
        facts.routes = Some(parse_routes(&read_proc_net("route")?));
        facts.neighbours = Some(parse_arp(&read_proc_net("arp")?));
    }
    Ok(facts)
}

fn current_thread_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .context("starting an async runtime for netlink")
}

/// What an rtnetlink link dump says of one link.
#[derive(Debug, Clone)]
struct RawLink {
    name: String,
    index: u32,
    kind: Option<String>,
    mtu: u32,
    /// IFLA_LINK: a veth's peer's index (in the peer's namespace).
    peer_index: Option<u32>,
    /// IFLA_LINK_NETNSID: the peer's namespace, when not this one.
    peer_netnsid: Option<i32>,
    master: Option<u32>,
    xdp_attached: bool,
}

fn raw_link(msg: &LinkMessage) -> RawLink {
    let mut l = RawLink {
        name: String::new(),
        index: msg.header.index,
        kind: None,
        mtu: 0,
        peer_index: None,
        peer_netnsid: None,
        master: None,
        xdp_attached: false,
    };
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::IfName(n) => l.name = n.clone(),
            LinkAttribute::Mtu(m) => l.mtu = *m,
            LinkAttribute::Link(i) => l.peer_index = Some(*i),
            LinkAttribute::LinkNetNsId(id) => l.peer_netnsid = Some(*id),
            LinkAttribute::Controller(m) => l.master = Some(*m),
            LinkAttribute::Xdp(xdp) => {
                l.xdp_attached = xdp
                    .iter()
                    .any(|x| matches!(x, LinkXdp::Attached(a) if *a != XdpAttached::None));
            }
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    if let LinkInfo::Kind(kind) = info {
                        l.kind = Some(kind_name(kind));
                    }
                }
            }
            _ => {}
        }
    }
    l
}

fn kind_name(kind: &InfoKind) -> String {
    match kind {
        InfoKind::Veth => "veth".into(),
        InfoKind::Bridge => "bridge".into(),
        InfoKind::Other(s) => s.clone(),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// Rtnetlink and generic netlink connections of this thread's namespace.
struct Netlink {
    route: ConnectionHandle<RouteNetlinkMessage>,
    genl: GenetlinkHandle,
}

impl Netlink {
    /// Needs a runtime: the connections run as its tasks.
    fn connect() -> anyhow::Result<Netlink> {
        let (conn, route, _) = netlink_proto::new_connection::<RouteNetlinkMessage>(
            netlink_sys::protocols::NETLINK_ROUTE,
        )
        .context("opening an rtnetlink socket")?;
        tokio::spawn(conn);
        let (conn, genl, _) =
            genetlink::new_connection().context("opening a generic netlink socket")?;
        tokio::spawn(conn);
        Ok(Netlink { route, genl })
    }

    async fn route_request(
        &self,
        msg: RouteNetlinkMessage,
        dump: bool,
    ) -> anyhow::Result<Vec<RouteNetlinkMessage>> {
        let mut req = NetlinkMessage::from(msg);
        req.header.flags = NLM_F_REQUEST | if dump { NLM_F_DUMP } else { 0 };
        req.finalize();
        let mut replies = self
            .route
            .request(req, SocketAddr::new(0, 0))
            .map_err(|e| anyhow::anyhow!("rtnetlink request: {e}"))?;
        let mut out = Vec::new();
        while let Some(reply) = replies.next().await {
            match reply.payload {
                NetlinkPayload::InnerMessage(m) => out.push(m),
                NetlinkPayload::Error(e) if e.code.is_some() => {
                    bail!("rtnetlink: {}", e.to_io())
                }
                _ => {}
            }
        }
        Ok(out)
    }

    /// Every link of the namespace, by index.
    async fn links(&self) -> anyhow::Result<BTreeMap<u32, RawLink>> {
        let replies = self
            .route_request(RouteNetlinkMessage::GetLink(LinkMessage::default()), true)
            .await
            .context("listing links")?;
        Ok(replies
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(raw_link(l)),
                _ => None,
            })
            .map(|l| (l.index, l))
            .collect())
    }

    async fn loopback_addresses(
        &self,
        links: &BTreeMap<u32, RawLink>,
    ) -> anyhow::Result<Vec<Ipv4Addr>> {
        let Some(lo) = links.values().find(|l| l.name == "lo").map(|l| l.index) else {
            return Ok(Vec::new());
        };
        let mut req = AddressMessage::default();
        req.header.family = AddressFamily::Inet;
        let replies = self
            .route_request(RouteNetlinkMessage::GetAddress(req), true)
            .await
            .context("listing addresses")?;
        Ok(replies
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewAddress(a) if a.header.index == lo => Some(a),
                _ => None,
            })
            .flat_map(|a| &a.attributes)
            .filter_map(|attr| match attr {
                AddressAttribute::Local(IpAddr::V4(ip))
                | AddressAttribute::Address(IpAddr::V4(ip)) => Some(*ip),
                _ => None,
            })
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect())
    }

    /// The namespace id this namespace gives the one of `fd` (-1: none).
    async fn nsid_of(&self, fd: u32) -> anyhow::Result<Option<i32>> {
        let mut req = NsidMessage::default();
        req.attributes.push(NsidAttribute::Fd(fd));
        let replies = self
            .route_request(RouteNetlinkMessage::GetNsId(req), false)
            .await?;
        Ok(replies.iter().find_map(|m| match m {
            RouteNetlinkMessage::NewNsId(n) => n.attributes.iter().find_map(|a| match a {
                NsidAttribute::Id(id) if *id >= 0 => Some(*id),
                _ => None,
            }),
            _ => None,
        }))
    }

    /// The XDP features of interface `index`; `None` when the kernel has
    /// no `netdev` family (before 6.3). One request per interface, not a
    /// dump: the family's dump replies lack NLM_F_MULTI, which netlink-proto
    /// needs to tie them to the request.
    async fn xdp_features(&self, index: u32) -> Option<XdpFeatures> {
        let mut dev = NetdevDev::get();
        dev.attrs.push(NetdevAttr::Ifindex(index));
        let mut req = NetlinkMessage::from(GenlMessage::from_payload(dev));
        req.header.flags = NLM_F_REQUEST;
        let mut handle = self.genl.clone();
        let mut replies = handle.request(req).await.ok()?;
        let mut features = None;
        while let Some(Ok(reply)) = replies.next().await {
            if let NetlinkPayload::InnerMessage(m) = reply.payload {
                features = m.payload.attrs.iter().find_map(|a| match a {
                    NetdevAttr::XdpFeatures(f) => Some(XdpFeatures(*f)),
                    _ => None,
                });
            }
        }
        features
    }

    /// The active offload features of `name` (ethtool's names:
    /// `tx-checksum-ip-generic`, `rx-gro`, …).
    async fn active_features(&self, name: &str) -> anyhow::Result<Vec<String>> {
        let mut req = NetlinkMessage::from(GenlMessage::from_payload(
            EthtoolMessage::new_feature_get(Some(name)),
        ));
        req.header.flags = NLM_F_REQUEST;
        let mut handle = self.genl.clone();
        let mut replies = handle
            .request(req)
            .await
            .map_err(|e| anyhow::anyhow!("ethtool netlink: {e}"))?;
        let mut active = Vec::new();
        while let Some(reply) = replies.next().await {
            let reply = reply.map_err(|e| anyhow::anyhow!("ethtool netlink: {e}"))?;
            match reply.payload {
                NetlinkPayload::InnerMessage(m) => {
                    for attr in m.payload.nlas {
                        if let EthtoolAttr::Feature(EthtoolFeatureAttr::Active(bits)) = attr {
                            active.extend(bits.into_iter().filter(|b| b.value).map(|b| b.name));
                        }
                    }
                }
                NetlinkPayload::Error(e) if e.code.is_some() => {
                    bail!("ethtool features of {name}: {}", e.to_io())
                }
                _ => {}
            }
        }
        Ok(active)
    }

    /// A link's offloads as the checks need them: (TX checksum, GRO).
    async fn offloads(&self, name: &str) -> (Option<bool>, Option<bool>) {
        match self.active_features(name).await {
            Ok(active) => (
                Some(active.iter().any(|f| {
                    matches!(
                        f.as_str(),
                        "tx-checksum-ipv4" | "tx-checksum-ip-generic" | "tx-checksum-ipv6"
                    )
                })),
                Some(active.iter().any(|f| f == "rx-gro")),
            ),
            Err(_) => (None, None),
        }
    }
}

async fn link_facts(
    net: &Netlink,
    l: &RawLink,
    links: &BTreeMap<u32, RawLink>,
) -> anyhow::Result<Link> {
    let conf = |key: &str| read_sysctl(&format!("net/ipv4/conf/{}/{key}", l.name));
    let peer = if l.kind.as_deref() == Some("veth") {
        match (l.peer_netnsid, l.peer_index) {
            (Some(netnsid), Some(index)) => Some(Peer::Hidden { netnsid, index }),
            (None, Some(index)) => match links.get(&index) {
                Some(p) => Some(seen_peer(net, p, links, None).await),
                None => None,
            },
            _ => None,
        }
    } else {
        None
    };
    Ok(Link {
        ifindex: l.index,
        kind: l.kind.clone(),
        mtu: l.mtu,
        forwarding: conf("forwarding").map(|v| v == 1),
        forwarding6: read_sysctl(&format!("net/ipv6/conf/{}/forwarding", l.name)).map(|v| v == 1),
        rp_filter: conf("rp_filter"),
        xdp: net.xdp_features(l.index).await,
        peer,
    })
}

async fn seen_peer(
    net: &Netlink,
    p: &RawLink,
    links: &BTreeMap<u32, RawLink>,
    netns: Option<String>,
) -> Peer {
    let (tx_checksum, gro) = net.offloads(&p.name).await;
    Peer::Seen {
        name: p.name.clone(),
        netns,
        tx_checksum,
        gro,
        xdp_attached: p.xdp_attached,
        master: p.master.map(|m| {
            links
                .get(&m)
                .map_or_else(|| format!("ifindex {m}"), |l| l.name.clone())
        }),
    }
}

/// The namespace named under /run/netns that this one knows as `netnsid`.
fn named_netns_with_id(netnsid: i32) -> anyhow::Result<Option<String>> {
    let Ok(dir) = fs::read_dir("/run/netns") else {
        return Ok(None);
    };
    let files: Vec<(String, fs::File)> = dir
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            fs::File::open(e.path()).ok().map(|f| (name, f))
        })
        .collect();
    current_thread_runtime()?.block_on(async {
        let net = Netlink::connect()?;
        for (name, file) in &files {
            let fd = u32::try_from(file.as_raw_fd()).context("a negative fd")?;
            if net.nsid_of(fd).await.ok().flatten() == Some(netnsid) {
                return Ok(Some(name.clone()));
            }
        }
        Ok(None)
    })
}

/// Peer `index` seen from inside namespace `ns` (a thread that enters it).
fn peer_in(ns: &str, index: u32) -> anyhow::Result<Peer> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| -> anyhow::Result<Peer> {
                crate::host::enter_netns(ns)?;
                current_thread_runtime()?.block_on(async {
                    let net = Netlink::connect()?;
                    let links = net.links().await?;
                    let p = links
                        .get(&index)
                        .with_context(|| format!("no link {index} in namespace {ns}"))?;
                    Ok(seen_peer(&net, p, &links, Some(ns.to_owned())).await)
                })
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the thread looking into {ns} panicked"))?
    })
}

fn read_sysctl(key: &str) -> Option<u8> {
    fs::read_to_string(Path::new("/proc/sys").join(key))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// /proc/net/FILE of this thread's network namespace (/proc/self/net
/// follows the process's main thread, /proc/thread-self/net this one).
fn read_proc_net(file: &str) -> anyhow::Result<String> {
    let path = Path::new("/proc/thread-self/net").join(file);
    fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
}

fn bpffs_of(pin_dir: &Path) -> Bpffs {
    let parent = pin_dir.parent().unwrap_or(pin_dir);
    let existing = parent
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    Bpffs {
        path: parent.to_path_buf(),
        mounted: crate::host::is_bpffs(existing),
    }
}

/// /proc/net/route: "Iface Destination Gateway Flags RefCnt Use Metric
/// Mask …", addresses as little-endian hex.
pub fn parse_routes(text: &str) -> Vec<Route> {
    let hex = |s: &str| {
        u32::from_str_radix(s, 16)
            .ok()
            .map(|v| Ipv4Addr::from(v.swap_bytes()))
    };
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (dest, gw, metric, mask) =
                (hex(f.get(1)?)?, hex(f.get(2)?)?, f.get(6)?, hex(f.get(7)?)?);
            Some(Route {
                dest,
                prefix_len: u8::try_from(u32::from(mask).count_ones()).ok()?,
                gateway: (!gw.is_unspecified()).then_some(gw),
                metric: metric.parse().ok()?,
            })
        })
        .collect()
}

/// /proc/net/arp: "IP address  HW type  Flags  HW address  Mask  Device".
pub fn parse_arp(text: &str) -> Vec<Neighbour> {
    const ATF_COM: u32 = 0x2;
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let flags = u32::from_str_radix(f.get(2)?.trim_start_matches("0x"), 16).ok()?;
            Some(Neighbour {
                address: f.first()?.parse().ok()?,
                complete: flags & ATF_COM != 0,
                mac: (*f.get(3)?).to_owned(),
                device: (*f.get(5)?).to_owned(),
            })
        })
        .collect()
}
