//! The routed lab: the web servers in a subnet of their own behind a
//! router, not on the LB's L2 segment, so only a tunnel service (IPIP or
//! GUE) reaches them — a MAC rewrite (DSR) cannot cross the router. Each
//! web has the VIP on `lo` and `lb decap` on `eth0`, allowing the LB's
//! tunnel source only; the webs answer the client directly, through the
//! router, which stands for the internet.
//!
//! ```text
//!   {P}-client                 {P}-lb                     {P}-router
//!   eth0 198.18.0.2 ───────── lb-front 198.18.0.1
//!                             lo 198.18.0.10 (VIP)
//!                             lb-back 198.19.2.1 ──────── r-lb 198.19.2.2
//!   back0 198.19.3.2 ──────────────────────────────────── r-client 198.19.3.1
//!                                                          r-web 198.19.0.1 ──┐
//!                   {P}-webN eth0 198.19.0.1N (XDP: lb decap) ── {P}-sw br0 ──┘
//!                            lo 198.18.0.10 (VIP)
//! ```
//!
//! The LB reaches the webs' subnet through the router (198.19.2.2); the
//! webs' default route is the router, which routes the client network to
//! the client's back leg: replies never cross the LB. The webs keep their
//! addresses (198.19.0.1N) and their gateway's address (198.19.0.1) from
//! the single lab; only what lies between them and the LB changes.
//!
//! Dual stack (issue 24, IPv6 services' tunnels): the same picture in
//! 2001:db8::/32 with the same digits — client 2001:db8:18::2 and back
//! 2001:db8:19:3::2, LB front 2001:db8:18::1 and back 2001:db8:19:2::1 (the
//! IPv6 tunnel source), the router 2001:db8:19:2::2, 2001:db8:19:3::1 and
//! 2001:db8:19::1 (the webs' IPv6 gateway), webN 2001:db8:19::1N, the VIP6
//! 2001:db8:18::10 on the LB's and the webs' `lo`; the client reaches the
//! VIP6 by a /128 route via the LB's front address. The LB forwards IPv6
//! only when a test asks ([`Lab::forward_ipv6`]), as in the single lab.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
};

use anyhow::{Context, ensure};

use super::{
    CLIENT_FRONT6, HTTP_PORT, HTTPS_PORT, LB_BACK6, LB_FRONT, LB_FRONT6, Lab, MONITORING_LISTEN,
    UDP_PORT, VIP, VIP6, WEB_NAMES, add_addr6, web_addr, web_addr6, web_service_on,
};
use crate::harness::netns::{self, VethEnd};

/// The LB's back address in the routed lab, on its link to the router:
/// the tunnel source, and the one source the webs' decapsulators allow.
pub const ROUTED_LB_BACK: Ipv4Addr = Ipv4Addr::new(198, 19, 2, 1);
/// The router's end of the LB's link: the LB's route to the webs.
pub const ROUTER_LB_SIDE: Ipv4Addr = Ipv4Addr::new(198, 19, 2, 2);
/// The router on the webs' subnet: their default route (the address the
/// single lab's LB has there).
pub const ROUTER_WEB_SIDE: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 1);
/// The router's end of the client's back leg.
pub const ROUTER_CLIENT_SIDE: Ipv4Addr = Ipv4Addr::new(198, 19, 3, 1);
/// The client's back leg in the routed lab (where replies arrive).
pub const ROUTED_CLIENT_BACK: Ipv4Addr = Ipv4Addr::new(198, 19, 3, 2);
/// The webs' subnet.
pub const WEB_NET: &str = "198.19.0.0/24";
/// The LB's IPv6 back address in the routed lab: the IPv6 tunnel source.
pub const ROUTED_LB_BACK6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x19, 2, 0, 0, 0, 1);
/// The router's end of the LB's link, IPv6.
pub const ROUTER_LB_SIDE6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x19, 2, 0, 0, 0, 2);
/// The router's end of the client's back leg, IPv6.
pub const ROUTER_CLIENT_SIDE6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x19, 3, 0, 0, 0, 1);
/// The client's IPv6 back leg in the routed lab.
pub const ROUTED_CLIENT_BACK6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x19, 3, 0, 0, 0, 2);
/// The webs' IPv6 subnet (the router is its ::1, as the single lab's LB).
pub const WEB_NET6: &str = "2001:db8:19::/64";
/// The router's interface toward the webs (whose MTU the PMTUD test lowers).
pub const ROUTER_WEB_IFACE: &str = "r-web";
/// The GUE port the lab's agents and decapsulators agree on (the default).
pub const GUE_PORT: u16 = lb_common::decap::GUE_DEFAULT_PORT;

/// A tunnel forwarding mode, as the config spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tunnel {
    Ipip,
    Gue,
}

impl Tunnel {
    /// Both, IPIP first.
    pub const ALL: [Tunnel; 2] = [Tunnel::Ipip, Tunnel::Gue];

    /// The value of `forwarding = "…"`.
    pub fn name(self) -> &'static str {
        match self {
            Tunnel::Ipip => "ipip",
            Tunnel::Gue => "gue",
        }
    }

    /// Bytes the encapsulation adds in front of the inner packet: an outer
    /// IPv4 header; for GUE also UDP and the 4-byte GUE header.
    pub fn overhead(self) -> u32 {
        let bytes = match self {
            Tunnel::Ipip => lb_common::decap::IPIP_OVERHEAD,
            Tunnel::Gue => lb_common::decap::GUE_OVERHEAD,
        };
        u32::try_from(bytes).unwrap_or(u32::MAX)
    }

    /// [`Tunnel::overhead`] of the IPv6 form: an outer IPv6 header (40),
    /// for GUE also UDP and GUE (52).
    pub fn overhead6(self) -> u32 {
        let bytes = match self {
            Tunnel::Ipip => lb_common::decap::IP6IP6_OVERHEAD,
            Tunnel::Gue => lb_common::decap::GUE6_OVERHEAD,
        };
        u32::try_from(bytes).unwrap_or(u32::MAX)
    }

    /// The decapsulator's verdict for this tunnel's packets with an outer
    /// IPv6 header (`decap_ip6ip6`, `decap_gue6`).
    pub fn decap_verdict6(self) -> &'static str {
        match self {
            Tunnel::Ipip => "decap_ip6ip6",
            Tunnel::Gue => "decap_gue6",
        }
    }
}

impl Lab {
    /// Builds the routed lab (see the module's picture) and starts its
    /// servers. The decapsulators are attached by [`Lab::attach_decaps`].
    pub fn up_routed(prefix: &str, lb_bin: &std::path::Path) -> anyhow::Result<Lab> {
        Self::create_routed(prefix, lb_bin, false)
    }

    /// [`Lab::up_routed`] for `lb lab up --tunnel`: the servers outlive us.
    pub(crate) fn up_routed_detached(
        prefix: &str,
        lb_bin: &std::path::Path,
    ) -> anyhow::Result<Lab> {
        Self::create_routed(prefix, lb_bin, true)
    }

    /// Whether this is the routed lab.
    pub fn is_routed(&self) -> bool {
        self.routed
    }

    /// The addresses the LBs send tunnelled packets from: the routed lab's
    /// LB's back address, or each LB's back address in the multi-LB lab.
    pub fn tunnel_sources(&self) -> Vec<Ipv4Addr> {
        if self.routed {
            vec![ROUTED_LB_BACK]
        } else if self.lbs > 0 {
            (1..=self.lbs).map(super::ha::lb_back_addr).collect()
        } else {
            vec![super::LB_BACK]
        }
    }

    /// Where the webs' decapsulators pin their programs, links and maps
    /// (`lb decap --pin-dir`; each web's under `netns/{P}-webN/eth0`): on
    /// the host's bpffs beside the lab's pin dir, and `lb lab down`
    /// removes them.
    pub fn decap_pin_dir(&self) -> PathBuf {
        super::teardown::decap_pin_dir(&self.prefix)
    }

    /// `lb decap attach eth0 --from <the LBs' tunnel sources> --port 6080`
    /// on every web, as the README's backend guide tells users to.
    pub fn attach_decaps(&self) -> anyhow::Result<()> {
        for n in 1..=WEB_NAMES.len() {
            self.attach_decap(n)?;
        }
        Ok(())
    }

    /// `lb decap attach` on web `n` (allowing every LB's tunnel source;
    /// the routed lab's IPv6 one too).
    pub fn attach_decap(&self, n: usize) -> anyhow::Result<String> {
        let mut sources: Vec<IpAddr> = self.tunnel_sources().into_iter().map(IpAddr::V4).collect();
        if self.routed {
            sources.push(ROUTED_LB_BACK6.into());
        }
        let from = sources
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let port = GUE_PORT.to_string();
        self.decap(n, &["attach", "eth0", "--from", &from, "--port", &port])
            .with_context(|| format!("attaching the decapsulator of web{n}"))
    }

    /// `lb decap detach eth0` on web `n`: it then black-holes every
    /// tunnelled flow, as a backend without the decapsulator does.
    pub fn detach_decap(&self, n: usize) -> anyhow::Result<String> {
        self.decap(n, &["detach", "eth0"])
    }

    /// A native XDP program on the client's `eth0`, the peer of the LB's
    /// `lb-front`, passing every frame (see [`Lab::run_xdp_on`]), for the
    /// routed lab's tunnel source.
    pub fn run_xdp_on_client_front(&self) -> anyhow::Result<String> {
        self.run_xdp_on(&self.client_ns(), "eth0", ROUTED_LB_BACK)
    }

    /// A native XDP program on `iface` in `ns`, a veth peer of one of the
    /// LB's interfaces. The frames the LB sends back out of the interface
    /// they came in by with XDP_TX (its "fragmentation needed" answers)
    /// reach a veth peer at once only if the peer runs an XDP program: with
    /// GRO alone (which `netns::tune_veth` sets) the kernel queues them and
    /// wakes the peer only when something else is sent on the link, seconds
    /// later (PMTUD uploads stalled 15 s, downloads 3.5–5 s, on Linux
    /// 6.18: veth's XDP_TX flush kicks the peer's NAPI only when the peer
    /// has an XDP program). The program is `lb decap` allowing `from`: it
    /// passes every frame that is not a tunnel packet from `from`, so it
    /// changes nothing else. Its pins are under [`Lab::decap_pin_dir`],
    /// which `lb lab down` removes.
    pub fn run_xdp_on(&self, ns: &str, iface: &str, from: Ipv4Addr) -> anyhow::Result<String> {
        let bin = self.lb_bin.display().to_string();
        let pins = self.decap_pin_dir().display().to_string();
        let from = from.to_string();
        netns::run(
            &bin,
            &[
                "decap",
                "attach",
                iface,
                "--from",
                &from,
                "--netns",
                ns,
                "--pin-dir",
                &pins,
            ],
        )
        .with_context(|| format!("attaching an XDP program to {iface} in {ns}"))
    }

    /// `lb decap status eth0` on web `n`, as it prints it.
    pub fn decap_status(&self, n: usize) -> anyhow::Result<String> {
        self.decap(n, &["status", "eth0"])
    }

    /// Web `n`'s decapsulator's packets per verdict (`lb decap status
    /// --json`), by verdict name (`decap_ipip`, `decap_gue`, …).
    pub fn decap_verdicts(&self, n: usize) -> anyhow::Result<BTreeMap<String, u64>> {
        let text = self.decap(n, &["status", "eth0", "--json"])?;
        let parsed: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("lb decap status --json of web{n}: {text}"))?;
        let verdicts = parsed
            .get(0)
            .and_then(|r| r.get("verdicts"))
            .and_then(serde_json::Value::as_object)
            .with_context(|| format!("no verdicts in web{n}'s lb decap status --json: {text}"))?;
        verdicts
            .iter()
            .map(|(name, count)| {
                let count = count
                    .as_u64()
                    .with_context(|| format!("web{n}'s decap verdict {name}: {count}"))?;
                Ok((name.clone(), count))
            })
            .collect()
    }

    /// Runs `lb decap ARGS --netns {P}-webN --pin-dir DIR` from the host's
    /// mount namespace (the pins stay on the host's bpffs).
    fn decap(&self, n: usize, args: &[&str]) -> anyhow::Result<String> {
        let bin = self.lb_bin.display().to_string();
        let (ns, pins) = (self.web_ns(n), self.decap_pin_dir().display().to_string());
        let mut full = vec!["decap"];
        full.extend_from_slice(args);
        full.extend_from_slice(&["--netns", &ns, "--pin-dir", &pins]);
        netns::run(&bin, &full)
    }

    /// The agent config of the routed lab: `www` (TCP VIP:80) forwarded
    /// over `tunnel` with `scheduler` to web1..3, the tunnel source the
    /// LB's back address, fast HTTP checks when `checked`; `extra` goes
    /// into `[dataplane]` (e.g. `conntrack-size = 1024`).
    pub fn tunnel_config(
        &self,
        tunnel: Tunnel,
        scheduler: &str,
        checked: bool,
        extra: &str,
    ) -> String {
        let health = if checked {
            "health = { check = \"http\", path = \"/\", interval = \"200ms\", timeout = \"200ms\", rise = 2, fall = 2 }\n"
        } else {
            ""
        };
        self.tunnel_config_with(tunnel, scheduler, health, extra)
    }

    /// [`Lab::tunnel_config`] with `health` (a `health = …` line or empty).
    fn tunnel_config_with(
        &self,
        tunnel: Tunnel,
        scheduler: &str,
        health: &str,
        extra: &str,
    ) -> String {
        let source = self
            .tunnel_sources()
            .first()
            .copied()
            .unwrap_or(ROUTED_LB_BACK);
        let mut toml = format!(
            "[dataplane]\ninterfaces = [\"lb-front\", \"lb-back\"]\nxdp-mode = \"native\"\n\
             tunnel-source = \"{source}\"\ngue-port = {GUE_PORT}\n{extra}\n\
             [monitoring]\nlisten = \"{MONITORING_LISTEN}\"\n"
        );
        toml.push_str(&tunnel_service(
            "www", "tcp", HTTP_PORT, tunnel, scheduler, health,
        ));
        toml
    }

    /// The routed lab's IPv6 tunnel config (issue 24): `www6` (TCP
    /// VIP6:80) forwarded over `tunnel` (IP6IP6 or GUE over IPv6) with
    /// `scheduler` to web1..3's IPv6 addresses, the IPv6 tunnel source the
    /// LB's IPv6 back address, `health` (a `health = …` line or empty).
    /// The LB must forward IPv6 ([`Lab::forward_ipv6`]).
    pub fn tunnel_config6(&self, tunnel: Tunnel, scheduler: &str, health: &str) -> String {
        let mut toml = format!(
            "[dataplane]\ninterfaces = [\"lb-front\", \"lb-back\"]\nxdp-mode = \"native\"\n\
             tunnel-source6 = \"{ROUTED_LB_BACK6}\"\ngue-port = {GUE_PORT}\n\
             [monitoring]\nlisten = \"{MONITORING_LISTEN}\"\n"
        );
        let lines = format!("forwarding = \"{}\"\n{health}", tunnel.name());
        toml.push_str(&web_service_on(
            VIP6.into(),
            |n| IpAddr::V6(web_addr6(n)),
            ("www6", "tcp", HTTP_PORT),
            scheduler,
            &lines,
        ));
        toml
    }

    /// Checks through the VIP over `tunnel` (issue 26): `www` (TCP VIP:80)
    /// with a fast HTTP check `through-vip = true`, and `plain` (TCP
    /// VIP:443, TLS passed through) with the same check on each web's own
    /// address (`port = 80`), both round robin over web1..3.
    pub fn through_vip_config(&self, tunnel: Tunnel) -> String {
        let check = |extra: &str| {
            format!(
                "health = {{ check = \"http\", path = \"/\", interval = \"200ms\", timeout = \"200ms\", rise = 2, fall = 2, {extra} }}\n"
            )
        };
        let mut toml =
            self.tunnel_config_with(tunnel, "round-robin", &check("through-vip = true"), "");
        toml.push_str(&tunnel_service(
            "plain",
            "tcp",
            HTTPS_PORT,
            tunnel,
            "round-robin",
            &check("port = 80"),
        ));
        toml
    }

    /// The routed lab's site for `lb lab up --tunnel` and the demo: `www`
    /// (TCP :80) over IPIP, `www-tls` (TCP :443, TLS passed through) and
    /// `www-udp` (UDP :5353) over GUE, round robin, HTTP checks.
    pub fn tunnel_site_config(&self) -> String {
        let health = "health = { check = \"http\", port = 80, path = \"/\", interval = \"1s\", timeout = \"500ms\", rise = 2, fall = 2 }\n";
        let mut toml = self.tunnel_config(Tunnel::Ipip, "round-robin", true, "");
        toml.push_str(&tunnel_service(
            "www-tls",
            "tcp",
            HTTPS_PORT,
            Tunnel::Gue,
            "round-robin",
            health,
        ));
        toml.push_str(&tunnel_service(
            "www-udp",
            "udp",
            UDP_PORT,
            Tunnel::Gue,
            "round-robin",
            health,
        ));
        toml
    }

    /// LB `n`'s config in the multi-LB lab with `www` forwarded over
    /// `tunnel` ([`Lab::ha_config`] with maglev, each LB's tunnel source
    /// its own back address): the webs' decapsulators allow every LB.
    pub fn ha_tunnel_config(&self, n: usize, tunnel: Tunnel) -> anyhow::Result<String> {
        let base = self.ha_config(n, crate::config::Forwarding::Dsr, "maglev", 0);
        let source = super::ha::lb_back_addr(n);
        let (dataplane, service) = ("forwarding = \"dsr\"\n", "name = \"www\"\n");
        ensure!(
            base.contains(dataplane) && base.contains(service),
            "ha_config no longer has `{dataplane}` and `{service}`: {base}"
        );
        Ok(base
            .replacen(
                dataplane,
                &format!("{dataplane}tunnel-source = \"{source}\"\ngue-port = {GUE_PORT}\n"),
                1,
            )
            .replacen(
                service,
                &format!("{service}forwarding = \"{}\"\n", tunnel.name()),
                1,
            ))
    }

    fn create_routed(
        prefix: &str,
        lb_bin: &std::path::Path,
        detached: bool,
    ) -> anyhow::Result<Lab> {
        Self::create_layout(prefix, lb_bin, detached, 0, true)
    }

    pub(super) fn build_routed_topology(&self) -> anyhow::Result<()> {
        for ns in self.namespaces() {
            netns::add_namespace(&ns)?;
        }
        let (client, lb, router, sw) = (
            self.client_ns(),
            self.lb_ns(),
            self.router_ns(),
            self.sw_ns(),
        );
        netns::ns_run(&sw, &["ip", "link", "add", "br0", "type", "bridge"])?;
        netns::ns_run(&sw, &["ip", "link", "set", "br0", "up"])?;
        // Point-to-point links: (namespace, device) pairs.
        let links = [
            ((client.clone(), "eth0"), (lb.clone(), "lb-front")),
            ((lb.clone(), "lb-back"), (router.clone(), "r-lb")),
            ((client.clone(), "back0"), (router.clone(), "r-client")),
        ];
        let mut ends = Vec::new();
        for ((a_ns, a_dev), (b_ns, b_dev)) in &links {
            netns::add_veth(&VethEnd::new(a_ns, a_dev), &VethEnd::new(b_ns, b_dev))?;
            ends.push((a_ns.clone(), a_dev.to_string()));
            ends.push((b_ns.clone(), b_dev.to_string()));
        }
        // The webs' subnet: the router's leg and every web on one bridge.
        let mut legs = vec![(
            router.clone(),
            ROUTER_WEB_IFACE.to_owned(),
            "p-router".to_owned(),
        )];
        for n in 1..=WEB_NAMES.len() {
            legs.push((self.web_ns(n), "eth0".to_owned(), format!("p-web{n}")));
        }
        for (ns, dev, port) in &legs {
            netns::add_veth(&VethEnd::new(ns, dev), &VethEnd::new(&sw, port))?;
            netns::ns_run(&sw, &["ip", "link", "set", port, "master", "br0", "up"])
                .with_context(|| format!("enslaving {port} to br0 in {sw}"))?;
            ends.push((ns.clone(), dev.clone()));
            ends.push((sw.clone(), port.clone()));
        }
        self.configure_routed_client()?;
        self.configure_routed_lb()?;
        self.configure_router_of_webs()?;
        for n in 1..=WEB_NAMES.len() {
            self.configure_routed_web(n)?;
        }
        for (ns, dev) in ends {
            netns::tune_veth(&ns, &dev)?;
        }
        Ok(())
    }

    fn configure_routed_client(&self) -> anyhow::Result<()> {
        self.configure_client_with_back(ROUTED_CLIENT_BACK)?;
        // The webs directly (the servers' readiness checks, `curl` by hand)
        // through the router; the VIP through the LB.
        let gw = ROUTER_CLIENT_SIDE.to_string();
        netns::ns_run(
            &self.client_ns(),
            &["ip", "route", "add", WEB_NET, "via", &gw],
        )?;
        // IPv6: the same legs and routes; the VIP6 by a /128 via the LB.
        let ns = self.client_ns();
        add_addr6(&ns, "eth0", &format!("{CLIENT_FRONT6}/64"))?;
        add_addr6(&ns, "back0", &format!("{ROUTED_CLIENT_BACK6}/64"))?;
        let (vip, via) = (format!("{VIP6}/128"), LB_FRONT6.to_string());
        netns::ns_run(&ns, &["ip", "-6", "route", "add", &vip, "via", &via])?;
        let gw6 = ROUTER_CLIENT_SIDE6.to_string();
        netns::ns_run(&ns, &["ip", "-6", "route", "add", WEB_NET6, "via", &gw6])?;
        netns::sysctl(&ns, "net/ipv6/conf/all/forwarding", "0")
    }

    fn configure_routed_lb(&self) -> anyhow::Result<()> {
        let ns = self.lb_ns();
        netns::add_addr(&ns, "lb-front", &format!("{LB_FRONT}/24"))?;
        netns::add_addr(&ns, "lb-back", &format!("{ROUTED_LB_BACK}/24"))?;
        netns::add_addr(&ns, "lo", &format!("{VIP}/32"))?;
        let gw = ROUTER_LB_SIDE.to_string();
        netns::ns_run(&ns, &["ip", "route", "add", WEB_NET, "via", &gw])?;
        add_addr6(&ns, "lb-front", &format!("{LB_FRONT6}/64"))?;
        add_addr6(&ns, "lb-back", &format!("{ROUTED_LB_BACK6}/64"))?;
        add_addr6(&ns, "lo", &format!("{VIP6}/128"))?;
        let gw6 = ROUTER_LB_SIDE6.to_string();
        netns::ns_run(&ns, &["ip", "-6", "route", "add", WEB_NET6, "via", &gw6])?;
        // bpf_fib_lookup only resolves next hops when forwarding is on.
        netns::sysctl(&ns, "net/ipv4/ip_forward", "1")
    }

    fn configure_router_of_webs(&self) -> anyhow::Result<()> {
        let ns = self.router_ns();
        netns::add_addr(&ns, "r-lb", &format!("{ROUTER_LB_SIDE}/24"))?;
        netns::add_addr(&ns, "r-client", &format!("{ROUTER_CLIENT_SIDE}/24"))?;
        netns::add_addr(&ns, ROUTER_WEB_IFACE, &format!("{ROUTER_WEB_SIDE}/24"))?;
        // The client network (and the VIP in it) is reached on the client's
        // back leg: the webs' replies go there, never to the LB.
        let client = ROUTED_CLIENT_BACK.to_string();
        netns::ns_run(
            &ns,
            &["ip", "route", "add", "198.18.0.0/24", "via", &client],
        )?;
        netns::sysctl(&ns, "net/ipv4/ip_forward", "1")?;
        add_addr6(&ns, "r-lb", &format!("{ROUTER_LB_SIDE6}/64"))?;
        add_addr6(&ns, "r-client", &format!("{ROUTER_CLIENT_SIDE6}/64"))?;
        add_addr6(&ns, ROUTER_WEB_IFACE, &format!("{LB_BACK6}/64"))?;
        let client6 = ROUTED_CLIENT_BACK6.to_string();
        netns::ns_run(
            &ns,
            &[
                "ip",
                "-6",
                "route",
                "add",
                "2001:db8:18::/64",
                "via",
                &client6,
            ],
        )?;
        netns::sysctl(&ns, "net/ipv6/conf/all/forwarding", "1")?;
        // Replies from the VIP come in on r-web while the VIP's route
        // points at the client: strict reverse-path filtering drops them.
        for dev in ["all", "default", "r-lb", "r-client", ROUTER_WEB_IFACE] {
            netns::sysctl(&ns, &format!("net/ipv4/conf/{dev}/rp_filter"), "0")?;
        }
        Ok(())
    }

    fn configure_routed_web(&self, n: usize) -> anyhow::Result<()> {
        let ns = self.web_ns(n);
        netns::add_addr(&ns, "eth0", &format!("{}/24", web_addr(n)))?;
        // The decapsulated packet is addressed to the VIP.
        super::own_vip_quietly(&ns)?;
        // Loose reverse-path filtering: the inner packet's source (a client)
        // is checked against any route, not only one through eth0 — the
        // README's guide, for backends with more than one interface.
        for dev in ["all", "default", "eth0"] {
            netns::sysctl(&ns, &format!("net/ipv4/conf/{dev}/rp_filter"), "2")?;
        }
        netns::add_default_route(&ns, ROUTER_WEB_SIDE)?;
        // IPv6: the router holds the address the single lab's LB has.
        super::configure_web_v6(&ns, n)
    }
}

/// One `[[service]]` table over web1..3 at the VIP's port, forwarded over
/// `tunnel`.
fn tunnel_service(
    name: &str,
    protocol: &str,
    port: u16,
    tunnel: Tunnel,
    scheduler: &str,
    health: &str,
) -> String {
    let lines = format!("forwarding = \"{}\"\n{health}", tunnel.name());
    super::web_service(name, protocol, port, scheduler, &lines)
}
