//! The doctor's rules, pure: facts and config in, [`Finding`]s out (each
//! with its severity and fix), in the guide's order (docs/deployment.md).

use std::{collections::BTreeSet, net::Ipv4Addr};

use serde::Serialize;

use super::{Bpffs, Facts, Interface, Link, Neighbour, Peer, Route};
use crate::config::{Config, Forwarding, XdpMode};

/// Native XDP without multi-buffer support: a frame must fit one page with
/// the XDP headroom and the skb's shared info (4096 - 256 - 320 bytes,
/// less the Ethernet header). Drivers refuse to attach a single-buffer
/// program (lb's is one) above about this MTU.
pub const XDP_SINGLE_BUFFER_MTU: u32 = 3506;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, strum::Display)]
#[serde(rename_all = "kebab-case")]
#[strum(serialize_all = "kebab-case")]
pub enum Severity {
    Ok,
    Warning,
    Error,
}

/// What a finding is about: one check of the guide (docs/deployment.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, strum::Display)]
#[serde(rename_all = "kebab-case")]
#[strum(serialize_all = "kebab-case")]
pub enum Check {
    Interface,
    XdpMode,
    Forwarding,
    RpFilter,
    VipOnLo,
    ChecksumOffload,
    VethGro,
    Mtu,
    Bpffs,
    Neighbour,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub severity: Severity,
    pub check: Check,
    /// The interface, VIP, backend or path it is about.
    pub subject: String,
    pub message: String,
    /// What to run or change; `None` for an ok.
    pub fix: Option<String>,
}

impl Finding {
    fn new(severity: Severity, check: Check, subject: impl Into<String>, message: String) -> Self {
        Finding {
            severity,
            check,
            subject: subject.into(),
            message,
            fix: None,
        }
    }

    fn ok(check: Check, subject: impl Into<String>, message: String) -> Self {
        Self::new(Severity::Ok, check, subject, message)
    }

    fn warn(check: Check, subject: impl Into<String>, message: String, fix: String) -> Self {
        Self::new(Severity::Warning, check, subject, message).with_fix(fix)
    }

    fn error(check: Check, subject: impl Into<String>, message: String, fix: String) -> Self {
        Self::new(Severity::Error, check, subject, message).with_fix(fix)
    }

    fn with_fix(mut self, fix: String) -> Self {
        self.fix = Some(fix);
        self
    }
}

/// The findings for `cfg` on a host described by `facts`, in the guide's
/// order: per interface, then sysctls, VIPs, bpffs, backends.
pub fn findings(cfg: &Config, facts: &Facts) -> Vec<Finding> {
    let mut out = Vec::new();
    let mode = cfg.dataplane.xdp_mode;
    let several = facts.interfaces.len() > 1;
    for iface in &facts.interfaces {
        let Some(link) = &iface.link else {
            out.push(Finding::error(
                Check::Interface,
                &iface.name,
                "no such interface in this network namespace".into(),
                "check [dataplane].interfaces against `ip link`; in a namespace, run \
                 `lb run --netns NAME` (or `lb doctor --netns NAME`)"
                    .into(),
            ));
            continue;
        };
        out.extend(xdp_mode(&iface.name, link, mode, several));
        out.push(forwarding(&iface.name, link));
        if has_ipv6_services(cfg) {
            out.push(forwarding6(&iface.name, link));
        }
        out.push(rp_filter(&iface.name, link, facts.rp_filter_all));
        out.extend(veth_peer(&iface.name, link, mode));
    }
    out.extend(mtus(&facts.interfaces, mode));
    out.extend(vips_on_lo(cfg, &facts.loopback));
    out.push(bpffs(&facts.bpffs));
    if let (Some(routes), Some(neighbours)) = (&facts.routes, &facts.neighbours) {
        out.extend(backends(cfg, routes, neighbours));
    }
    out
}

fn xdp_mode(name: &str, link: &Link, mode: XdpMode, several: bool) -> Vec<Finding> {
    let kind = link.kind.as_deref().unwrap_or("NIC");
    let Some(xdp) = link.xdp else {
        return vec![Finding::warn(
            Check::XdpMode,
            name,
            format!(
                "the kernel does not report the XDP features of this {kind} (netlink family \
                 `netdev`, kernel 6.3+): whether native XDP works shows at attach"
            ),
            "if `lb run` fails to attach, set xdp-mode = \"generic\"".into(),
        )];
    };
    let supports = match (xdp.native(), xdp.redirect_target()) {
        (true, true) => "native XDP, and takes redirected frames",
        (true, false) => "native XDP, but takes no redirected frames",
        (false, _) => "generic XDP only",
    };
    let mut out = Vec::new();
    match mode {
        XdpMode::Native if !xdp.native() => out.push(Finding::error(
            Check::XdpMode,
            name,
            format!("xdp-mode = \"native\", but this {kind}'s driver has no native XDP ({supports})"),
            "set xdp-mode = \"generic\" in [dataplane] (slower: an skb per packet), or use a NIC \
             whose driver has native XDP"
                .into(),
        )),
        XdpMode::Generic if xdp.native() => out.push(Finding::ok(
            Check::XdpMode,
            name,
            format!(
                "xdp-mode = \"generic\"; this {kind} supports {supports}: \"native\" would be faster"
            ),
        )),
        _ => out.push(Finding::ok(
            Check::XdpMode,
            name,
            format!("xdp-mode = \"{mode}\"; this {kind} supports {supports}"),
        )),
    }
    // A veth's missing redirect target is its peer's GRO: reported there.
    let veth = link.kind.as_deref() == Some("veth");
    if mode == XdpMode::Native && xdp.native() && !xdp.redirect_target() && several && !veth {
        out.push(Finding::warn(
            Check::XdpMode,
            name,
            format!(
                "this {kind}'s driver takes no frames redirected by XDP (no ndo_xdp_xmit): \
                 packets the data plane forwards out of {name} are dropped"
            ),
            "set xdp-mode = \"generic\", or use a NIC whose driver takes redirected frames".into(),
        ));
    }
    out
}

fn forwarding(name: &str, link: &Link) -> Finding {
    let fix = format!("sysctl -w net.ipv4.ip_forward=1 (or net.ipv4.conf.{name}.forwarding=1)");
    match link.forwarding {
        Some(true) => Finding::ok(Check::Forwarding, name, "IPv4 forwarding on".into()),
        Some(false) => Finding::error(
            Check::Forwarding,
            name,
            "IPv4 forwarding is off: bpf_fib_lookup does not forward, every packet would go \
             to the kernel"
                .into(),
            fix,
        ),
        None => Finding::error(
            Check::Forwarding,
            name,
            format!("cannot read /proc/sys/net/ipv4/conf/{name}/forwarding"),
            fix,
        ),
    }
}

/// Does the config forward IPv6 (a service on an IPv6 VIP)? Then IPv6
/// forwarding matters as IPv4's does: `bpf_fib_lookup` with AF_INET6
/// answers "not forwarded" while `net.ipv6.conf.IF.forwarding` is off.
fn has_ipv6_services(cfg: &Config) -> bool {
    cfg.services.iter().any(|s| s.vip.is_ipv6())
}

fn forwarding6(name: &str, link: &Link) -> Finding {
    let fix =
        format!("sysctl -w net.ipv6.conf.all.forwarding=1 (or net.ipv6.conf.{name}.forwarding=1)");
    match link.forwarding6 {
        Some(true) => Finding::ok(Check::Forwarding, name, "IPv6 forwarding on".into()),
        Some(false) => Finding::error(
            Check::Forwarding,
            name,
            "IPv6 forwarding is off and the config has IPv6 services: bpf_fib_lookup does \
             not forward IPv6, every IPv6 packet would go to the kernel"
                .into(),
            fix,
        ),
        None => Finding::error(
            Check::Forwarding,
            name,
            format!(
                "cannot read /proc/sys/net/ipv6/conf/{name}/forwarding (IPv6 disabled?) and the \
                 config has IPv6 services"
            ),
            fix,
        ),
    }
}

fn rp_filter(name: &str, link: &Link, all: Option<u8>) -> Finding {
    // The kernel applies the larger of `all` and the interface's value.
    let effective = link.rp_filter.max(all);
    match effective {
        Some(1) => Finding::warn(
            Check::RpFilter,
            name,
            "strict reverse-path filter (rp_filter = 1): packets the data plane passes to the \
             kernel are dropped when their source routes out of another interface (several \
             routers, ECMP, asymmetric paths)"
                .into(),
            format!(
                "sysctl -w net.ipv4.conf.all.rp_filter=2 net.ipv4.conf.{name}.rp_filter=2 (loose)"
            ),
        ),
        Some(v) => Finding::ok(
            Check::RpFilter,
            name,
            format!("rp_filter = {v} ({})", if v == 0 { "off" } else { "loose" }),
        ),
        None => Finding::warn(
            Check::RpFilter,
            name,
            "cannot read rp_filter".into(),
            format!("sysctl net.ipv4.conf.all.rp_filter net.ipv4.conf.{name}.rp_filter"),
        ),
    }
}

/// A veth's peer: TX checksum offload (the silent checksum trap) and
/// whether frames redirected into the veth are delivered (GRO or XDP on the
/// peer).
///
/// Only the peer's offload matters: it is the sender whose packets carry a
/// partial checksum into XDP. This side's own TX offload concerns only the
/// LB's own packets (health probes), which the kernel sends as usual.
fn veth_peer(name: &str, link: &Link, mode: XdpMode) -> Vec<Finding> {
    if link.kind.as_deref() != Some("veth") {
        return Vec::new();
    }
    let mut out = Vec::new();
    let where_ = |netns: &Option<String>| match netns {
        Some(ns) => format!(" (in namespace {ns}: ip netns exec {ns} …)"),
        None => String::new(),
    };
    match &link.peer {
        Some(Peer::Seen {
            name: peer,
            netns,
            tx_checksum,
            master,
            ..
        }) => {
            let on = format!("ethtool -K {peer} tx off{}", where_(netns));
            out.push(match (master, tx_checksum) {
                (Some(bridge), _) => Finding::warn(
                    Check::ChecksumOffload,
                    name,
                    format!(
                        "peer {peer} is a port of {bridge}: the clients or backends behind it \
                         send through their own interfaces, which lb cannot see"
                    ),
                    "turn TX checksum offload off on each veth of a client or backend behind \
                     the bridge: ethtool -K DEV tx off"
                        .into(),
                ),
                (None, Some(true)) => Finding::warn(
                    Check::ChecksumOffload,
                    name,
                    format!(
                        "peer {peer} has TX checksum offload on: its TCP/UDP packets carry a \
                         partial checksum that no device finishes; after NAT or DSR the \
                         receiver drops every one (TcpInCsumErrors) while lb counts them \
                         forwarded"
                    ),
                    on,
                ),
                (None, Some(false)) => Finding::ok(
                    Check::ChecksumOffload,
                    name,
                    format!("peer {peer}: TX checksum offload off"),
                ),
                (None, None) => Finding::warn(
                    Check::ChecksumOffload,
                    name,
                    format!("cannot read the offloads of peer {peer}"),
                    on,
                ),
            });
        }
        Some(Peer::Hidden { netnsid, .. }) => out.push(Finding::warn(
            Check::ChecksumOffload,
            name,
            format!(
                "the peer is in a namespace not named under /run/netns (netns id {netnsid}): \
                 lb cannot see its TX checksum offload"
            ),
            "turn it off where the peer lives: ethtool -K PEER tx off".into(),
        )),
        None => {}
    }
    if mode == XdpMode::Native
        && let Some(xdp) = link.xdp
        && xdp.native()
    {
        let (peer, fix) = match &link.peer {
            Some(Peer::Seen { name, netns, .. }) => (
                name.clone(),
                format!("ethtool -K {name} gro on{}", where_(netns)),
            ),
            _ => (
                "the peer".to_owned(),
                "ethtool -K PEER gro on, where the peer lives".to_owned(),
            ),
        };
        out.push(if xdp.redirect_target() {
            Finding::ok(
                Check::VethGro,
                name,
                format!("{peer} takes frames XDP sends into {name} (GRO or XDP on it)"),
            )
        } else {
            Finding::warn(
                Check::VethGro,
                name,
                format!(
                    "{peer} has neither GRO nor an XDP program: every frame XDP redirects or \
                     transmits into {name} is dropped without a counter"
                ),
                fix,
            )
        });
    }
    out
}

fn mtus(interfaces: &[Interface], mode: XdpMode) -> Vec<Finding> {
    let links: Vec<(&str, u32)> = interfaces
        .iter()
        .filter_map(|i| i.link.as_ref().map(|l| (i.name.as_str(), l.mtu)))
        .collect();
    let mut out = Vec::new();
    for (name, mtu) in &links {
        if mode == XdpMode::Native && *mtu > XDP_SINGLE_BUFFER_MTU {
            out.push(Finding::warn(
                Check::Mtu,
                *name,
                format!(
                    "MTU {mtu}: above about {XDP_SINGLE_BUFFER_MTU} a frame does not fit one \
                     page, and lb's program is single-buffer: drivers refuse to attach it in \
                     native mode"
                ),
                format!("ip link set {name} mtu {XDP_SINGLE_BUFFER_MTU} (or lower)"),
            ));
        }
    }
    let (Some(largest), Some(smallest)) = (
        links.iter().max_by_key(|(_, m)| *m),
        links.iter().min_by_key(|(_, m)| *m),
    ) else {
        return out;
    };
    if largest.1 != smallest.1 {
        out.push(Finding::warn(
            Check::Mtu,
            smallest.0,
            format!(
                "MTU {} but {} takes frames up to MTU {}: XDP_REDIRECT neither fragments nor \
                 tells the sender, so a longer frame forwarded out of {} is dropped",
                smallest.1, largest.0, largest.1, smallest.0
            ),
            format!(
                "ip link set {} mtu {} (the same MTU on every interface in the path)",
                smallest.0, largest.1
            ),
        ));
    } else if links.len() > 1 {
        out.push(Finding::ok(
            Check::Mtu,
            links.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(" "),
            format!("the same MTU ({}) on every interface", largest.1),
        ));
    }
    out
}

fn vips_on_lo(cfg: &Config, loopback: &[Ipv4Addr]) -> Vec<Finding> {
    // The host facts are IPv4's (routes, neighbours, lo's addresses).
    let vips: BTreeSet<Ipv4Addr> = cfg.services.iter().filter_map(|s| ipv4(s.vip)).collect();
    vips.into_iter()
        .map(|vip| {
            if loopback.contains(&vip) {
                Finding::ok(Check::VipOnLo, vip.to_string(), "on lo".into())
            } else {
                Finding::warn(
                    Check::VipOnLo,
                    vip.to_string(),
                    "not on lo: the kernel does not answer ARP for it on the front \
                     interface, and does not accept what the data plane passes to it"
                        .into(),
                    format!("ip addr add {vip}/32 dev lo"),
                )
            }
        })
        .collect()
}

fn bpffs(b: &Bpffs) -> Finding {
    if b.mounted {
        Finding::ok(
            Check::Bpffs,
            b.path.display().to_string(),
            "a bpffs: pinned maps and XDP links outlive the agent (hitless restarts)".into(),
        )
    } else {
        Finding::warn(
            Check::Bpffs,
            b.path.display().to_string(),
            "not a bpffs: `lb run` mounts one there in the host's mount namespace, or refuses \
             under a private one (`ip netns exec`)"
                .into(),
            format!(
                "mount -t bpf bpf {} (the systemd unit does it before each start)",
                b.path.display()
            ),
        )
    }
}

/// The route `routes` choose for `ip`: the longest prefix, then the lowest
/// metric (the main table only; policy routing is not followed).
pub(super) fn route_for(routes: &[Route], ip: Ipv4Addr) -> Option<&Route> {
    routes
        .iter()
        .filter(|r| {
            let mask = u32::MAX
                .checked_shl(32 - u32::from(r.prefix_len))
                .unwrap_or(0);
            u32::from(ip) & mask == u32::from(r.dest) & mask
        })
        .max_by_key(|r| (r.prefix_len, std::cmp::Reverse(r.metric)))
}

fn backends(cfg: &Config, routes: &[Route], neighbours: &[Neighbour]) -> Vec<Finding> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for svc in &cfg.services {
        for b in &svc.backends {
            let Some(ip) = ipv4(b.address) else {
                continue;
            };
            if !seen.insert((ip, svc.forwarding == Forwarding::Dsr)) {
                continue;
            }
            let subject = format!("{}/{} {ip}", svc.name, b.name);
            let Some(route) = route_for(routes, ip) else {
                out.push(Finding::warn(
                    Check::Neighbour,
                    subject,
                    "no route to the backend".into(),
                    format!("ip route get {ip}; add the backend network to an interface"),
                ));
                continue;
            };
            if let (Forwarding::Dsr, Some(gw)) = (svc.forwarding, route.gateway) {
                out.push(Finding::error(
                    Check::Neighbour,
                    subject,
                    format!(
                        "a DSR backend behind a router (via {gw}): DSR rewrites only the MAC, so \
                         the backend must be on a segment the LB is attached to"
                    ),
                    "put the backend on the LB's back segment, or use forwarding = \"ipip\" \
                     or \"gue\" (DSR across routers, with `lb decap` on the backend), or forwarding = \"nat\""
                        .into(),
                ));
                continue;
            }
            let hop = route.gateway.unwrap_or(ip);
            let via = route
                .gateway
                .map_or_else(String::new, |gw| format!(" (next hop {gw})"));
            out.push(match neighbours.iter().find(|n| n.address == hop) {
                Some(n) if n.complete => Finding::ok(
                    Check::Neighbour,
                    subject,
                    format!("{hop} is {} on {}{via}", n.mac, n.device),
                ),
                Some(n) => Finding::warn(
                    Check::Neighbour,
                    subject,
                    format!("{hop} does not answer ARP on {}{via}", n.device),
                    format!(
                        "check that {hop} is up and on {}'s segment: ping -c1 {hop}; ip neigh show {hop}",
                        n.device
                    ),
                ),
                None => Finding::warn(
                    Check::Neighbour,
                    subject,
                    format!("no neighbour entry for {hop}{via} yet (lb run resolves it at start)"),
                    format!("ping -c1 {hop}; ip neigh show {hop}"),
                ),
            });
        }
    }
    out
}

/// The IPv4 address of `addr`; `None` for IPv6, which the doctor's host
/// facts (IPv4 routes, neighbours and lo addresses) do not cover.
fn ipv4(addr: std::net::SocketAddr) -> Option<Ipv4Addr> {
    match addr {
        std::net::SocketAddr::V4(v4) => Some(*v4.ip()),
        std::net::SocketAddr::V6(_) => None,
    }
}
