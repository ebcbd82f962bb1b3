//! The multi-LB lab: N load balancers behind a router that spreads flows
//! over them by ECMP, each LB announcing the VIP to the router over BGP
//! (with BFD) through its own BIRD 2, as its agent's `[announce]` decides.
//!
//! ```text
//!   {P}-client           {P}-router                 {P}-sw               {P}-lbN
//!   eth0 198.18.1.2 ── r-client 198.18.1.1
//!                        r-front 198.18.2.1 ──── br1 ───────────────── lb-front 198.18.2.1N
//!                        BIRD: BGP+BFD to each LB,                     lo 198.18.0.10 (VIP)
//!                        kernel: VIP/32 multipath                      BIRD: BGP+BFD to router
//!                        r-back 198.19.0.2 ──┐                         lb-back 198.19.0.{1,3,..}
//!                                            └─ br0 (back network) ─── webN eth0 198.19.0.1N
//! ```
//!
//! The router hashes over L4 (`fib_multipath_hash_policy=1`), so each
//! connection sticks to one LB while the set of LBs is stable. In DSR the
//! webs reply to the client network through the router's back leg; in NAT
//! through their default route, lb1 (a second LB's NAT flows do not work:
//! see README, "Running more than one load balancer"). In full NAT each LB
//! translates with a source address of its own ([`lb_source_addr`], on its
//! `lb-back`, named in its config's `[dataplane] source-addresses`): the
//! webs answer that address on their own subnet, so each reply returns to
//! the LB that translated its flow, whatever the webs' routes.
//!
//! Flow sync (issue 27): [`Lab::ha_sync_config`] gives every LB a `[sync]`
//! section (its peers: the other LBs' back addresses, port [`SYNC_PORT`];
//! the lab's shared key, [`Lab::sync_key_path`]) and, next to the `maglev`
//! service on the VIP, a round-robin service on [`RR_VIP`] and a
//! least-connections one on [`LC_VIP`] (the webs and the LBs own those
//! VIPs too), whose flows survive an LB only through sync.
//!
//! Dual stack (issue 24): every address above has an IPv6 twin — client
//! 2001:db8:18:1::2 (network [`HA_CLIENT_NET6`]), router 2001:db8:18:1::1,
//! 2001:db8:18:2::1 and, on the back network, 2001:db8:19::2 (the single
//! lab's `CLIENT_BACK6`), LB n 2001:db8:18:2::1N in front
//! ([`lb_front_addr6`]) and 2001:db8:19::{1,3,..} behind
//! ([`lb_back_addr6`]), the webs the single lab's 2001:db8:19::1N with the
//! IPv6 VIP [`VIP6`] on `lo`. The BGP session carries an ipv6 channel
//! next to the ipv4 one: each LB exports its agent's IPv6 VIPs (the
//! `lb_vips6` /128s of `[announce]`) with its front IPv6 address as next
//! hop, and the router merges them into one IPv6 ECMP route, hashed over
//! L4 as for IPv4; BFD on the IPv4 session takes both families' routes
//! down together. IPv6 services: [`ha_service6`] (DSR or NAT66; full NAT
//! is IPv4-only).

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4},
    path::PathBuf,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use super::{
    AgentProcess, AgentSite, CLIENT_BACK, CLIENT_BACK6, HTTPS_PORT, Lab, MONITORING_LISTEN,
    SITE_DENIED, VIP, VIP6, WEB_NAMES, add_addr6, web_addr, web_addr6,
};
use crate::{
    announce::{self, Withdrawn},
    config::Forwarding,
    harness::netns::{self, SpawnGated as _, VethEnd},
};

/// The router's multipath hash fields (`fib_multipath_hash_fields`, with
/// policy 3): source and destination address, protocol, source and
/// destination port — policy 1's L4 hash, always computed from the packet.
const ECMP_HASH_FIELDS: &str = "0x0037";

/// The most LBs a lab may have (what `lb lab down` looks for).
pub const MAX_LBS: usize = 4;
/// The client network of the multi-LB lab (the VIP is outside it, so the
/// client reaches it through the router only).
pub const HA_CLIENT_NET: &str = "198.18.1.0/24";
/// The client's address.
pub const HA_CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);
const ROUTER_CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
const ROUTER_FRONT: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 1);
/// The IPv6 client network of the multi-LB lab (outside the single lab's
/// front network 2001:db8:18::/64, where the IPv6 VIP is).
pub const HA_CLIENT_NET6: &str = "2001:db8:18:1::/64";
/// The client's IPv6 address.
pub const HA_CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x18, 1, 0, 0, 0, 2);
const ROUTER_CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x18, 1, 0, 0, 0, 1);
const ROUTER_FRONT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x18, 2, 0, 0, 0, 1);
const ROUTER_AS: u32 = 64512;
const LB_AS: u32 = 64513;
/// BFD: 100 ms hellos, down after 5 missed (500 ms). With 3 (300 ms),
/// BIRD starved of CPU for a moment on a loaded machine declared live
/// peers dead.
const BFD_INTERVAL_MS: u32 = 100;
const BFD_MULTIPLIER: u32 = 5;
const BIRD_READY_TIMEOUT: Duration = Duration::from_secs(10);
/// The VIP of the multi-LB lab's round-robin service (port 80).
pub const RR_VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 11);
/// The VIP of the multi-LB lab's least-connections service (port 80).
pub const LC_VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 12);
/// The UDP port each LB's flow sync listens on (its back address).
pub const SYNC_PORT: u16 = 7890;
/// Bytes of the lab's sync key (HMAC-SHA256's block: more adds nothing).
const SYNC_KEY_BYTES: usize = 32;

/// LB `n`'s front address (on the router's segment): 198.18.2.1N.
pub fn lb_front_addr(n: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 2, u8::try_from(10 + n).unwrap_or(u8::MAX))
}

/// LB `n`'s IPv6 front address: 2001:db8:18:2::1N, the same digits as
/// [`lb_front_addr`].
pub fn lb_front_addr6(n: usize) -> Ipv6Addr {
    Ipv6Addr::new(
        0x2001,
        0xdb8,
        0x18,
        2,
        0,
        0,
        0,
        0x10 + u16::try_from(n).unwrap_or(0xf),
    )
}

/// LB `n`'s front address of `vip`'s family: the router's next hop to it.
pub fn lb_front_of(n: usize, vip: IpAddr) -> IpAddr {
    match vip {
        IpAddr::V4(_) => lb_front_addr(n).into(),
        IpAddr::V6(_) => lb_front_addr6(n).into(),
    }
}

/// LB `n`'s IPv6 back address: lb1 has the single lab's 2001:db8:19::1
/// (the webs' IPv6 gateway), the others ::3, ::4, … (as [`lb_back_addr`]).
pub fn lb_back_addr6(n: usize) -> Ipv6Addr {
    let last = if n == 1 { 1 } else { n + 1 };
    Ipv6Addr::new(
        0x2001,
        0xdb8,
        0x19,
        0,
        0,
        0,
        0,
        u16::try_from(last).unwrap_or(u16::MAX),
    )
}

/// LB `n`'s back address: lb1 has the single lab's 198.19.0.1 (the webs'
/// gateway), the others 198.19.0.3, .4, …
pub fn lb_back_addr(n: usize) -> Ipv4Addr {
    let last = if n == 1 { 1 } else { n + 1 };
    Ipv4Addr::new(198, 19, 0, u8::try_from(last).unwrap_or(u8::MAX))
}

/// LB `n`'s full-NAT source address: 198.19.0.10N, on its `lb-back`
/// beside its back address (so it answers ARP for it on the back network),
/// and its config's `[dataplane] source-addresses` in full NAT. One per LB:
/// a web's reply to it reaches the LB that translated the flow, and no
/// other.
pub fn lb_source_addr(n: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, 0, u8::try_from(100 + n).unwrap_or(u8::MAX))
}

/// The router's route to the VIP: the LBs it sends flows to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EcmpRoute {
    /// Next hops (LB front addresses), in the kernel's order.
    pub next_hops: Vec<Ipv4Addr>,
}

impl Lab {
    /// Builds the multi-LB lab with `lbs` LBs (2 to [`MAX_LBS`]), starts
    /// the webs and a BIRD in the router and in each LB. No agent runs:
    /// start them with [`Lab::start_agent_on`].
    pub fn up_ha(prefix: &str, lb_bin: &std::path::Path, lbs: usize) -> anyhow::Result<Lab> {
        Self::check_lbs(lbs)?;
        Self::create_with(prefix, lb_bin, false, lbs)
    }

    /// [`Lab::up_ha`] for `lb lab up --lbs N`: the servers outlive us.
    pub(crate) fn up_ha_detached(
        prefix: &str,
        lb_bin: &std::path::Path,
        lbs: usize,
    ) -> anyhow::Result<Lab> {
        Self::check_lbs(lbs)?;
        Self::create_with(prefix, lb_bin, true, lbs)
    }

    fn check_lbs(lbs: usize) -> anyhow::Result<()> {
        if !(2..=MAX_LBS).contains(&lbs) {
            bail!("a multi-LB lab has 2 to {MAX_LBS} LBs, not {lbs}");
        }
        netns::require_tool(
            "bird",
            "apt-get install bird2 (cargo xtask setup installs it)",
        )
    }

    /// How many LBs the lab has (0: the single-LB lab).
    pub fn lbs(&self) -> usize {
        self.lbs
    }

    pub fn router_ns(&self) -> String {
        format!("{}-router", self.prefix)
    }

    /// Namespace of LB `n` (1-based).
    pub fn lb_ns_of(&self, n: usize) -> String {
        format!("{}-lb{n}", self.prefix)
    }

    /// `{run_dir}/lbN`: LB `n`'s agent config and log, BIRD config, socket
    /// and the include file its agent writes.
    pub fn lb_dir(&self, n: usize) -> PathBuf {
        self.run_dir().join(format!("lb{n}"))
    }

    fn router_dir(&self) -> PathBuf {
        self.run_dir().join("router")
    }

    /// LB `n`'s agent control socket.
    pub fn agent_socket_of(&self, n: usize) -> PathBuf {
        self.lb_dir(n).join("lb.sock")
    }

    /// LB `n`'s BIRD control socket.
    pub fn bird_socket_of(&self, n: usize) -> PathBuf {
        self.lb_dir(n).join("bird.ctl")
    }

    /// The router's BIRD control socket.
    pub fn router_bird_socket(&self) -> PathBuf {
        self.router_dir().join("bird.ctl")
    }

    /// LB `n`'s pin dir (under the lab's, so `lb lab down` removes it).
    pub fn pin_dir_of(&self, n: usize) -> PathBuf {
        self.pin_dir().join(format!("lb{n}"))
    }

    /// The agent config of LB `n`: the lab's www service on VIP:80 over
    /// web1..3 with `scheduler` and fast HTTP health checks
    /// ([`ha_service`]), and `[announce]` through the LB's BIRD with `med`.
    /// Every LB gets the same services in the same order, hence the same
    /// rings. In full NAT, `[dataplane] source-addresses` is the LB's own
    /// [`lb_source_addr`].
    pub fn ha_config(&self, n: usize, mode: Forwarding, scheduler: &str, med: u32) -> String {
        let sources = if mode == Forwarding::FullNat {
            format!("source-addresses = [\"{}\"]\n", lb_source_addr(n))
        } else {
            String::new()
        };
        format!(
            "[dataplane]\ninterfaces = [\"lb-front\", \"lb-back\"]\nforwarding = \"{}\"\n{sources}\n\
             [monitoring]\nlisten = \"{MONITORING_LISTEN}\"\n\n\
             [announce]\nbird-socket = \"{}\"\ninclude = \"{}\"\nmed = {med}\n{}",
            mode.name(),
            self.bird_socket_of(n).display(),
            self.include_of(n).display(),
            ha_service("www", VIP, scheduler),
        )
    }

    /// The shared key of the LBs' flow sync (`[sync] key-file`), written
    /// by the lab (mode 0600) when it builds the topology.
    pub fn sync_key_path(&self) -> PathBuf {
        self.run_dir().join("sync.key")
    }

    /// [`Lab::ha_config`] (`maglev`) with flow sync: the round-robin
    /// service on [`RR_VIP`], the least-connections one on [`LC_VIP`]
    /// (both HTTP over web1..3, checked like www), and `[sync]` to every
    /// other LB of the lab.
    pub fn ha_sync_config(&self, n: usize, mode: Forwarding, med: u32) -> String {
        let mut toml = self.ha_config(n, mode, "maglev", med);
        toml.push_str(&ha_service("www-rr", RR_VIP, "round-robin"));
        toml.push_str(&ha_service("www-lc", LC_VIP, "least-connections"));
        toml.push_str(&self.sync_section(n));
        toml
    }

    /// LB `n`'s `[sync]`: it listens on its back address, sends to the
    /// other LBs' and shares the lab's key with them.
    pub fn sync_section(&self, n: usize) -> String {
        let peers = (1..=self.lbs)
            .filter(|&p| p != n)
            .map(|p| format!("\"{}:{SYNC_PORT}\"", lb_back_addr(p)))
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            "\n[sync]\nlisten = \"{}:{SYNC_PORT}\"\npeers = [{peers}]\nkey-file = \"{}\"\n",
            lb_back_addr(n),
            self.sync_key_path().display()
        )
    }

    /// The whole site on LB `n` for `lb lab up --lbs N`: [`Lab::ha_sync_config`]
    /// (consistent hashing for www, round robin and least connections
    /// kept across LBs by flow sync, health checks, monitoring, the
    /// announcement) with HTTPS passed through, the site's firewall, and on lb1 — the
    /// webs' and the databases' gateway — the database pool, reachable
    /// only from the webs ([`super::site_pool_config`]).
    pub fn ha_site_config(&self, n: usize, mode: Forwarding) -> String {
        let tls = web_backends(HTTPS_PORT);
        let mut toml = self.ha_sync_config(n, mode, 0);
        // The IPv6 VIP's web service (full NAT is IPv4-only).
        if mode != Forwarding::FullNat {
            toml.push_str(&ha_service6("www6", VIP6, "maglev"));
        }
        toml.push_str(&format!(
            "\n[[service]]\nname = \"www-tls\"\nvip = \"{VIP}:{HTTPS_PORT}\"\nscheduler = \"maglev\"\n\
             health = {{ check = \"http\", port = 80, path = \"/\", interval = \"1s\", timeout = \"500ms\", rise = 2, fall = 2 }}\n\
             backends = [ {tls} ]\n\n\
             [firewall]\ndeny = [\"{SITE_DENIED}\"]\n\
             rate-limit = {{ new-flows-per-second = 1000, burst = 2000, per = \"/24\" }}\n"
        ));
        if n == 1 {
            toml.push_str(&super::site_pool_config(&self.run_dir(), Some("5s")));
        }
        toml
    }

    /// [`Lab::ha_site_config`] for `lb lab up --lbs N` with etcd running
    /// ([`Lab::start_lab_etcd`]): every LB runs the pool and
    /// `[coordination]` through `etcd`, named `lbN`, so one leader per
    /// pool promotes and every LB follows its record. Only lb1 carries the
    /// pool's traffic (the databases' gateway: NAT replies cross it).
    pub fn ha_site_config_coordinated(
        &self,
        n: usize,
        mode: Forwarding,
        etcd: &[String],
    ) -> String {
        let mut toml = self.ha_site_config(n, mode);
        if n != 1 {
            toml.push_str(&super::site_pool_config(&self.run_dir(), Some("5s")));
        }
        let endpoints = etcd
            .iter()
            .map(|e| format!("\"{e}\""))
            .collect::<Vec<_>>()
            .join(", ");
        toml.push_str(&format!(
            "\n[coordination]\netcd = [{endpoints}]\nname = \"lb{n}\"\n"
        ));
        toml
    }

    /// Leaves every web only what full NAT needs (tests/tests/fullnat_ha.rs):
    /// its own subnet, where the LBs' source addresses are, and nothing
    /// else — a blackhole default route (so no route to the clients or to
    /// any LB's other addresses) and no VIP on `lo`. Checks that the
    /// client is unreachable from each web afterwards. The webs' servers
    /// keep running (a socket bound to a VIP stays, and receives nothing).
    pub fn cut_webs_off(&self) -> anyhow::Result<()> {
        let client = if self.lbs == 0 {
            super::CLIENT_FRONT
        } else {
            HA_CLIENT
        };
        for w in 1..=WEB_NAMES.len() {
            let ns = self.web_ns(w);
            let lo = netns::ns_run(&ns, &["ip", "-4", "-o", "addr", "show", "dev", "lo"])?;
            for cidr in lo_vips(&lo) {
                netns::ns_run(&ns, &["ip", "addr", "del", cidr, "dev", "lo"])?;
            }
            netns::ns_run(&ns, &["ip", "route", "replace", "blackhole", "default"])?;
            let route = netns::ns_run(&ns, &["ip", "route", "get", &client.to_string()]);
            if route.as_deref().is_ok_and(|r| !r.contains("blackhole")) {
                bail!("web{w} still routes to the client {client}: {route:?}");
            }
            let lo = netns::ns_run(&ns, &["ip", "-4", "-o", "addr", "show", "dev", "lo"])?;
            if !lo_vips(&lo).is_empty() {
                bail!("web{w} still holds a VIP on lo: {lo}");
            }
        }
        Ok(())
    }

    /// The include file LB `n`'s agent writes and its BIRD reads.
    pub fn include_of(&self, n: usize) -> PathBuf {
        self.lb_dir(n).join("vips.conf")
    }

    /// Starts the agent of LB `n` (1-based) and waits for `lb: ready`.
    pub fn start_agent_on(&self, n: usize, config_toml: &str) -> anyhow::Result<AgentProcess> {
        let site = AgentSite {
            ns: self.lb_ns_of(n),
            dir: self.lb_dir(n),
            socket: self.agent_socket_of(n),
            pin_dir: self.pin_dir_of(n),
        };
        self.start_agent_at(&site, config_toml, &[])
    }

    /// `lb teardown --pin-dir` of LB `n`, with its config so the VIPs are
    /// withdrawn first.
    pub fn teardown_lb(&self, n: usize) -> anyhow::Result<String> {
        let config = self.lb_dir(n).join("lb.toml").display().to_string();
        let pins = self.pin_dir_of(n).display().to_string();
        let bin = self.lb_bin.display().to_string();
        netns::run(&bin, &["teardown", "--pin-dir", &pins, "--config", &config])
    }

    /// `lb teardown --pin-dir` of LB `n` without its config: the VIPs
    /// are withdrawn through what its agent recorded.
    pub fn teardown_lb_without_config(&self, n: usize) -> anyhow::Result<String> {
        let pins = self.pin_dir_of(n).display().to_string();
        let bin = self.lb_bin.display().to_string();
        netns::run(&bin, &["teardown", "--pin-dir", &pins])
    }

    /// Cuts LB `n` off its router (or reconnects it) as a dead host would
    /// be: its switch port stops forwarding (bridge port state disabled)
    /// while every link stays up, so nothing but BFD (or the BGP hold
    /// timer) tells the router, and frames still sent to the LB's MAC are
    /// dropped, not flooded to the other LBs.
    pub fn set_lb_reachable(&self, n: usize, reachable: bool) -> anyhow::Result<()> {
        // STP port states: 0 disabled, 3 forwarding.
        let state = if reachable { "3" } else { "0" };
        let port = format!("p-lb{n}");
        netns::ns_run(
            &self.sw_ns(),
            &["bridge", "link", "set", "dev", &port, "state", state],
        )
        .map(drop)
    }

    /// The router's kernel route to the VIP (none: no LB announces it).
    pub fn ecmp_route(&self) -> anyhow::Result<EcmpRoute> {
        self.ecmp_route_to(VIP)
    }

    /// The router's kernel route to `vip`.
    pub fn ecmp_route_to(&self, vip: Ipv4Addr) -> anyhow::Result<EcmpRoute> {
        Ok(EcmpRoute {
            next_hops: self.next_hops_to(vip.into())?,
        })
    }

    /// The next hops of the router's kernel route to `vip` (IPv4 or IPv6).
    fn next_hops_to<A: std::str::FromStr>(&self, vip: IpAddr) -> anyhow::Result<Vec<A>> {
        let (family, prefix) = match vip {
            IpAddr::V4(v) => ("-4", format!("{v}/32")),
            IpAddr::V6(v) => ("-6", format!("{v}/128")),
        };
        let text = netns::ns_run(&self.router_ns(), &["ip", family, "route", "show", &prefix])?;
        Ok(parse_next_hops(&text))
    }

    /// The next hop (an LB's front address) the router's route to
    /// `service`'s VIP picks for a TCP flow from `client` now: the router's
    /// own lookup of a packet arriving from the client (`ip route get … iif
    /// r-client ipproto tcp sport … dport …`), hashed as the packets it
    /// forwards are.
    pub fn ecmp_next_hop(
        &self,
        client: SocketAddrV4,
        service: SocketAddrV4,
    ) -> anyhow::Result<Ipv4Addr> {
        let text = netns::ns_run(
            &self.router_ns(),
            &[
                "ip",
                "-4",
                "route",
                "get",
                &service.ip().to_string(),
                "from",
                &client.ip().to_string(),
                "iif",
                "r-client",
                "ipproto",
                "tcp",
                "sport",
                &client.port().to_string(),
                "dport",
                &service.port().to_string(),
            ],
        )?;
        parse_next_hops(&text)
            .into_iter()
            .next()
            .with_context(|| format!("no next hop for {client} → {service} in: {text}"))
    }

    /// Polls the router's VIP route until its next hops are `want` (in any
    /// order); returns how long it took.
    pub fn wait_for_route(&self, want: &[Ipv4Addr], within: Duration) -> anyhow::Result<Duration> {
        self.wait_for_route_to(VIP, want, within)
    }

    /// [`Lab::wait_for_route`] for `vip`'s route (IPv4 or IPv6; `want` of
    /// its family: [`lb_front_of`]).
    pub fn wait_for_route_to<A: Into<IpAddr> + Copy>(
        &self,
        vip: impl Into<IpAddr>,
        want: &[A],
        within: Duration,
    ) -> anyhow::Result<Duration> {
        let vip = vip.into();
        let start = Instant::now();
        let mut want: Vec<IpAddr> = want.iter().map(|a| (*a).into()).collect();
        want.sort();
        loop {
            let mut hops: Vec<IpAddr> = self.next_hops_to(vip)?;
            hops.sort();
            if hops == want {
                return Ok(start.elapsed());
            }
            if start.elapsed() > within {
                bail!(
                    "the router's route to {vip} goes via {hops:?}, not {want:?}, after {within:?}; \
                     router BIRD log:\n{}",
                    fs::read_to_string(self.router_dir().join("bird.log")).unwrap_or_default()
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    pub(super) fn build_ha_topology(&self) -> anyhow::Result<()> {
        for ns in self.namespaces() {
            netns::add_namespace(&ns)?;
        }
        let sw = self.sw_ns();
        for br in ["br0", "br1"] {
            netns::ns_run(&sw, &["ip", "link", "add", br, "type", "bridge"])?;
            netns::ns_run(&sw, &["ip", "link", "set", br, "up"])?;
        }
        let router = self.router_ns();
        netns::add_veth(
            &VethEnd::new(&self.client_ns(), "eth0"),
            &VethEnd::new(&router, "r-client"),
        )?;
        let mut ends = vec![
            (self.client_ns(), "eth0".to_owned()),
            (router.clone(), "r-client".to_owned()),
        ];
        // (namespace, device, switch port, bridge)
        let mut legs = vec![
            (
                router.clone(),
                "r-front".to_owned(),
                "p-router".to_owned(),
                "br1",
            ),
            (
                router.clone(),
                "r-back".to_owned(),
                "p-rback".to_owned(),
                "br0",
            ),
        ];
        for n in 1..=self.lbs {
            legs.push((
                self.lb_ns_of(n),
                "lb-front".into(),
                format!("p-lb{n}"),
                "br1",
            ));
            legs.push((
                self.lb_ns_of(n),
                "lb-back".into(),
                format!("p-lb{n}b"),
                "br0",
            ));
        }
        for w in 1..=WEB_NAMES.len() {
            legs.push((self.web_ns(w), "eth0".into(), format!("p-web{w}"), "br0"));
        }
        for (ns, dev, port, br) in &legs {
            netns::add_veth(&VethEnd::new(ns, dev), &VethEnd::new(&sw, port))?;
            netns::ns_run(&sw, &["ip", "link", "set", port, "master", br, "up"])
                .with_context(|| format!("enslaving {port} to {br} in {sw}"))?;
            if port.starts_with("p-lb") {
                // A NIC drops unicast frames for another MAC before XDP
                // sees them; a veth does not. When an LB's port goes down
                // the bridge forgets its MAC and floods frames still sent
                // to it: the other LBs' XDP would forward them, hiding the
                // failure the lab is there to show.
                netns::ns_run(&sw, &["bridge", "link", "set", "dev", port, "flood", "off"])
                    .with_context(|| format!("unknown-unicast flooding off on {port}"))?;
            }
            ends.push((ns.clone(), dev.clone()));
            ends.push((sw.clone(), port.clone()));
        }
        self.configure_ha_client()?;
        self.configure_router()?;
        for n in 1..=self.lbs {
            self.configure_ha_lb(n)?;
        }
        for w in 1..=WEB_NAMES.len() {
            self.configure_web(w)?;
            // DSR delivers the sync services' packets still addressed to
            // their VIPs (arp_ignore is set by configure_web).
            for vip in [RR_VIP, LC_VIP] {
                netns::add_addr(&self.web_ns(w), "lo", &format!("{vip}/32"))?;
            }
        }
        self.write_sync_key()?;
        for (ns, dev) in ends {
            netns::tune_veth(&ns, &dev)?;
        }
        Ok(())
    }

    /// The LBs' shared sync key, readable by root only (the agent refuses
    /// a key file others can read).
    fn write_sync_key(&self) -> anyhow::Result<()> {
        use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
        let path = self.sync_key_path();
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        file.write_all(random_sync_key()?.as_bytes())
            .with_context(|| format!("writing {}", path.display()))
    }

    fn configure_ha_client(&self) -> anyhow::Result<()> {
        let ns = self.client_ns();
        netns::add_addr(&ns, "eth0", &format!("{HA_CLIENT}/24"))?;
        netns::add_default_route(&ns, ROUTER_CLIENT)?;
        add_addr6(&ns, "eth0", &format!("{HA_CLIENT6}/64"))?;
        add_default_route6(&ns, ROUTER_CLIENT6)?;
        netns::sysctl(&ns, "net/ipv4/ip_forward", "0")
    }

    fn configure_router(&self) -> anyhow::Result<()> {
        let ns = self.router_ns();
        netns::add_addr(&ns, "r-client", &format!("{ROUTER_CLIENT}/24"))?;
        netns::add_addr(&ns, "r-front", &format!("{ROUTER_FRONT}/24"))?;
        netns::add_addr(&ns, "r-back", &format!("{CLIENT_BACK}/24"))?;
        add_addr6(&ns, "r-client", &format!("{ROUTER_CLIENT6}/64"))?;
        add_addr6(&ns, "r-front", &format!("{ROUTER_FRONT6}/64"))?;
        add_addr6(&ns, "r-back", &format!("{CLIENT_BACK6}/64"))?;
        netns::sysctl(&ns, "net/ipv4/ip_forward", "1")?;
        netns::sysctl(&ns, "net/ipv6/conf/all/forwarding", "1")?;
        // Hash the 5-tuple, not only the addresses: one client's
        // connections spread over the LBs, each staying on one. Policy 3
        // (these fields), not 1: a packet from the client's namespace
        // crosses the veth with its socket's hash (`sk_txhash`), which
        // policy 1 takes instead of hashing the packet, so each connection
        // went to a random LB, and to another one whenever TCP re-drew the
        // hash after a retransmission timeout. A router hashes the packet;
        // so does this one now, and `ip route get … sport … dport …` (its
        // own lookup, `Lab::ecmp_next_hop`) says where a connection goes.
        for family in ["ipv4", "ipv6"] {
            netns::sysctl(&ns, &format!("net/{family}/fib_multipath_hash_policy"), "3")?;
            netns::sysctl(
                &ns,
                &format!("net/{family}/fib_multipath_hash_fields"),
                ECMP_HASH_FIELDS,
            )?;
        }
        // DSR replies come in on r-back with the VIP as source, whose route
        // points at the LBs: strict reverse-path filtering would drop them.
        for dev in ["all", "default", "r-client", "r-front", "r-back"] {
            netns::sysctl(&ns, &format!("net/ipv4/conf/{dev}/rp_filter"), "0")?;
        }
        Ok(())
    }

    fn configure_ha_lb(&self, n: usize) -> anyhow::Result<()> {
        let ns = self.lb_ns_of(n);
        netns::add_addr(&ns, "lb-front", &format!("{}/24", lb_front_addr(n)))?;
        netns::add_addr(&ns, "lb-back", &format!("{}/24", lb_back_addr(n)))?;
        netns::add_addr(&ns, "lb-back", &format!("{}/32", lb_source_addr(n)))?;
        for vip in [VIP, RR_VIP, LC_VIP] {
            netns::add_addr(&ns, "lo", &format!("{vip}/32"))?;
        }
        add_addr6(&ns, "lb-front", &format!("{}/64", lb_front_addr6(n)))?;
        add_addr6(&ns, "lb-back", &format!("{}/64", lb_back_addr6(n)))?;
        add_addr6(&ns, "lo", &format!("{VIP6}/128"))?;
        // NAT replies to clients leave through the router.
        netns::add_default_route(&ns, ROUTER_FRONT)?;
        add_default_route6(&ns, ROUTER_FRONT6)?;
        // bpf_fib_lookup resolves next hops only when forwarding is on.
        netns::sysctl(&ns, "net/ipv6/conf/all/forwarding", "1")?;
        netns::sysctl(&ns, "net/ipv4/ip_forward", "1")
    }

    /// Writes the BIRD configs, starts BIRD in the router and every LB, and
    /// waits until each answers on its control socket.
    pub(super) fn start_birds(&mut self, detached: bool) -> anyhow::Result<()> {
        fs::create_dir_all(self.router_dir())?;
        let router_conf = self.router_dir().join("bird.conf");
        fs::write(&router_conf, self.router_bird_conf())?;
        let mut sites = vec![(self.router_ns(), self.router_dir(), router_conf)];
        for n in 1..=self.lbs {
            fs::create_dir_all(self.lb_dir(n))?;
            // BIRD cannot start without the file it includes: nothing is
            // announced until an agent says so.
            let include = self.include_of(n);
            if !include.exists() {
                fs::write(&include, announce::render(&[], &Withdrawn::default(), 0))?;
            }
            let conf = self.lb_dir(n).join("bird.conf");
            fs::write(&conf, self.lb_bird_conf(n))?;
            sites.push((self.lb_ns_of(n), self.lb_dir(n), conf));
        }
        for (ns, dir, conf) in &sites {
            let socket = dir.join("bird.ctl").display().to_string();
            let pid = dir.join("bird.pid").display().to_string();
            let conf = conf.display().to_string();
            let log = fs::File::create(dir.join("bird.out"))?;
            // -f: in the foreground, so it is our child (and the lab's
            // teardown finds it in its namespace). A routing daemon runs
            // ahead of ordinary work (nice -10), as BFD's timers need.
            let args = [
                "nice", "-n", "-10", "bird", "-f", "-c", &conf, "-s", &socket, "-P", &pid,
            ];
            let mut cmd = netns::ns_command(ns, &args);
            cmd.stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::from(log.try_clone()?))
                .stderr(std::process::Stdio::from(log));
            if detached {
                netns::new_session(&mut cmd);
            }
            let child = cmd
                .spawn_gated()
                .with_context(|| format!("starting BIRD in {ns}: {}", args.join(" ")))?;
            self.children.push(child);
        }
        let deadline = Instant::now() + BIRD_READY_TIMEOUT;
        for (ns, dir, _) in &sites {
            let bird = announce::Bird::new(&dir.join("bird.ctl"));
            while let Err(e) = bird.view() {
                self.check_servers_alive().with_context(|| {
                    let out = dir.join("bird.out");
                    format!(
                        "BIRD in {ns} ({}): {}",
                        out.display(),
                        fs::read_to_string(&out).unwrap_or_default().trim()
                    )
                })?;
                if Instant::now() > deadline {
                    bail!("BIRD in {ns} not answering after {BIRD_READY_TIMEOUT:?}: {e}");
                }
                thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    /// The router: BGP with BFD to every LB, and the VIP routes they
    /// announce installed in the kernel as one multipath route.
    fn router_bird_conf(&self) -> String {
        let mut peers = String::new();
        for n in 1..=self.lbs {
            peers.push_str(&format!(
                "protocol bgp lb{n} from lbs {{ neighbor {} as {LB_AS}; }}\n",
                lb_front_addr(n)
            ));
        }
        format!(
            "router id {ROUTER_FRONT};\n\
             log \"{log}\" all;\n\
             debug protocols {{ states }};\n\
             protocol device {{ scan time 10; }}\n\
             # The VIP routes into the kernel, equal ones merged into one ECMP route.\n\
             protocol kernel {{\n  ipv4 {{ import none; export where source = RTS_BGP; }};\n  merge paths on;\n}}\n\
             protocol kernel {{\n  ipv6 {{ import none; export where source = RTS_BGP; }};\n  merge paths on;\n}}\n\
             {bfd}\
             template bgp lbs {{\n  local {ROUTER_FRONT} as {ROUTER_AS};\n  ipv4 {{ import all; export none; }};\n  \
             ipv6 {{ import all; export none; }};\n  {timers}\n}}\n\
             {peers}",
            log = self.router_dir().join("bird.log").display(),
            bfd = bfd_block("r-front"),
            timers = BGP_TIMERS,
        )
    }

    /// LB `n`: one BGP session (with BFD) to the router, exporting the
    /// static routes its agent writes into the include file.
    fn lb_bird_conf(&self, n: usize) -> String {
        format!(
            "router id {me};\n\
             log \"{log}\" all;\n\
             debug protocols {{ states }};\n\
             include \"{include}\";\n\
             protocol device {{ scan time 10; }}\n\
             {bfd}\
             protocol bgp to_router {{\n  local {me} as {LB_AS};\n  neighbor {ROUTER_FRONT} as {ROUTER_AS};\n  \
             ipv4 {{ import none; export where proto = \"{proto}\"; }};\n  \
             ipv6 {{ import none; export where proto = \"{proto6}\"; next hop address {me6}; }};\n  {timers}\n}}\n",
            me = lb_front_addr(n),
            me6 = lb_front_addr6(n),
            proto6 = announce::STATIC_PROTOCOL6,
            log = self.lb_dir(n).join("bird.log").display(),
            include = self.include_of(n).display(),
            bfd = bfd_block("lb-front"),
            proto = announce::STATIC_PROTOCOL,
            timers = BGP_TIMERS,
        )
    }
}

/// The multi-LB lab's HTTP service `name` on `vip`:80 over web1..3 with
/// `scheduler`, checked over HTTP every 200 ms (2 to rise or fall): a
/// `[[service]]` table, after a blank line.
pub fn ha_service(name: &str, vip: Ipv4Addr, scheduler: &str) -> String {
    service_table(name, vip.into(), scheduler, |w| web_addr(w).into())
}

/// [`ha_service`] over IPv6: `name` on `[vip]:80` over web1..3's IPv6
/// addresses, checked the same way (over IPv6).
pub fn ha_service6(name: &str, vip: Ipv6Addr, scheduler: &str) -> String {
    service_table(name, vip.into(), scheduler, |w| web_addr6(w).into())
}

/// The `[[service]]` table of [`ha_service`]/[`ha_service6`]: web `w` at
/// `web(w)`.
fn service_table(name: &str, vip: IpAddr, scheduler: &str, web: fn(usize) -> IpAddr) -> String {
    format!(
        "\n[[service]]\nname = \"{name}\"\nvip = \"{}\"\nscheduler = \"{scheduler}\"\n\
         health = {{ check = \"http\", path = \"/\", interval = \"200ms\", timeout = \"200ms\", rise = 2, fall = 2 }}\n\
         backends = [ {} ]\n",
        SocketAddr::new(vip, 80),
        web_backends_at(web, 80)
    )
}

/// `ip -6 route add default via {via}` in `ns`.
fn add_default_route6(ns: &str, via: Ipv6Addr) -> anyhow::Result<()> {
    let via = via.to_string();
    netns::ns_run(ns, &["ip", "-6", "route", "add", "default", "via", &via])
        .with_context(|| format!("IPv6 default route via {via} in {ns}"))?;
    Ok(())
}

/// web1..3 on `port` as a service's `backends` list (inside the brackets).
fn web_backends(port: u16) -> String {
    web_backends_at(|w| web_addr(w).into(), port)
}

/// web `w` at `web(w)`:`port`, for w in 1..=3, as a `backends` list.
fn web_backends_at(web: fn(usize) -> IpAddr, port: u16) -> String {
    (1..=WEB_NAMES.len())
        .map(|w| {
            format!(
                "{{ address = \"{}\", name = \"web{w}\" }}",
                SocketAddr::new(web(w), port)
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The addresses on `lo` other than loopback's (the VIPs), as `a.b.c.d/len`,
/// from `ip -4 -o addr show dev lo`.
fn lo_vips(text: &str) -> Vec<&str> {
    let words: Vec<&str> = text.split_whitespace().collect();
    words
        .windows(2)
        .filter(|w| w[0] == "inet" && !w[1].starts_with("127."))
        .map(|w| w[1])
        .collect()
}

/// `SYNC_KEY_BYTES` random bytes from the kernel, hex: the lab's sync key.
fn random_sync_key() -> anyhow::Result<String> {
    use std::io::Read as _;
    let mut key = [0u8; SYNC_KEY_BYTES];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut key))
        .context("reading /dev/urandom for the lab's sync key")?;
    Ok(key.iter().map(|b| format!("{b:02x}")).collect::<String>() + "\n")
}

/// BGP with BFD; short timers so a lab session comes up (and back) fast.
const BGP_TIMERS: &str = "bfd on;\n  hold time 3;\n  keepalive time 1;\n  connect retry time 1;\n  error wait time 1, 5;";

fn bfd_block(iface: &str) -> String {
    format!(
        "protocol bfd {{\n  interface \"{iface}\" {{ min rx interval {BFD_INTERVAL_MS} ms; \
         min tx interval {BFD_INTERVAL_MS} ms; multiplier {BFD_MULTIPLIER}; }};\n}}\n"
    )
}

/// Next hops of `ip route show` output: `via A` once for a single path, or
/// one `nexthop via A …` line per path.
fn parse_next_hops<A: std::str::FromStr>(text: &str) -> Vec<A> {
    let words: Vec<&str> = text.split_whitespace().collect();
    words
        .windows(2)
        .filter(|w| w[0] == "via")
        .filter_map(|w| w[1].parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_hops_of_single_and_multipath_routes() {
        assert_eq!(
            parse_next_hops::<Ipv4Addr>(
                "198.18.0.10 via 198.18.2.11 dev r-front proto bird metric 32\n"
            ),
            [Ipv4Addr::new(198, 18, 2, 11)]
        );
        let multi = "198.18.0.10 proto bird metric 32 \n\tnexthop via 198.18.2.11 dev r-front weight 1 \n\tnexthop via 198.18.2.12 dev r-front weight 1 \n";
        assert_eq!(
            parse_next_hops::<Ipv4Addr>(multi),
            [Ipv4Addr::new(198, 18, 2, 11), Ipv4Addr::new(198, 18, 2, 12)]
        );
        assert!(parse_next_hops::<Ipv4Addr>("").is_empty());
        // IPv6: the same words (`ip -6 route show`).
        let multi6 = "2001:db8:18::10 proto bird metric 32 pref medium\n\tnexthop via 2001:db8:18:2::11 dev r-front weight 1 \n\tnexthop via 2001:db8:18:2::12 dev r-front weight 1 \n";
        assert_eq!(
            parse_next_hops::<Ipv6Addr>(multi6),
            [lb_front_addr6(1), lb_front_addr6(2)]
        );
    }

    #[test]
    fn the_vips_on_lo_are_every_address_but_loopback() {
        let lo = "1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever preferred_lft forever\n\
                  1: lo    inet 198.18.0.10/32 scope global lo\\       valid_lft forever preferred_lft forever\n\
                  1: lo    inet 198.18.0.11/32 scope global lo\\       valid_lft forever preferred_lft forever\n";
        assert_eq!(lo_vips(lo), ["198.18.0.10/32", "198.18.0.11/32"]);
        assert!(lo_vips("1: lo    inet 127.0.0.1/8 scope host lo\n").is_empty());
    }

    /// The IPv6 service parses (the VIP6 over the webs' IPv6 addresses,
    /// checked), and the multi-LB site serves it but in full NAT.
    #[test]
    fn the_ipv6_service_is_the_webs_ipv6_addresses_behind_the_vip6() {
        let lab = Lab {
            prefix: "k25v6cfg".to_owned(),
            lb_bin: PathBuf::new(),
            children: Vec::new(),
            keep: true,
            lbs: 2,
            routed: false,
        };
        let text =
            lab.ha_config(1, Forwarding::Dsr, "maglev", 0) + &ha_service6("www6", VIP6, "maglev");
        let cfg = crate::config::parse(&text, std::path::Path::new("lb.toml")).expect("valid");
        let www6 = cfg
            .services
            .iter()
            .find(|s| s.name == "www6")
            .expect("www6");
        assert_eq!(www6.vip, SocketAddr::new(VIP6.into(), 80), "{text}");
        let backends: Vec<SocketAddr> = www6.backends.iter().map(|b| b.address).collect();
        let webs: Vec<SocketAddr> = (1..=3)
            .map(|w| SocketAddr::new(web_addr6(w).into(), 80))
            .collect();
        assert_eq!(backends, webs);
        assert!(www6.backends.iter().all(|b| www6.health_for(b).is_some()));
        for mode in [Forwarding::Dsr, Forwarding::Nat, Forwarding::FullNat] {
            let site = lab.ha_site_config(2, mode);
            assert_eq!(
                site.contains(&format!("vip = \"[{VIP6}]:80\"")),
                mode != Forwarding::FullNat,
                "{site}"
            );
        }
        assert_eq!(lb_front_of(2, VIP6.into()), IpAddr::from(lb_front_addr6(2)));
        assert_eq!(lb_front_of(2, VIP.into()), IpAddr::from(lb_front_addr(2)));
    }

    /// Each LB of a full-NAT lab translates with its own source address,
    /// on its back network; the other modes' configs name none.
    #[test]
    fn each_lb_of_a_full_nat_lab_has_its_own_source_address() {
        // Only its configs: kept, so dropping it tears nothing down.
        let lab = Lab {
            prefix: "k25cfg".to_owned(),
            lb_bin: PathBuf::new(),
            children: Vec::new(),
            keep: true,
            lbs: 2,
            routed: false,
        };
        let mut seen = Vec::new();
        for n in 1..=2 {
            let text = lab.ha_config(n, Forwarding::FullNat, "maglev", 0);
            let cfg = crate::config::parse(&text, std::path::Path::new("lb.toml")).expect("valid");
            assert_eq!(cfg.dataplane.full_nat.addresses, [lb_source_addr(n)]);
            assert!(
                cfg.services
                    .iter()
                    .all(|s| s.forwarding == Forwarding::FullNat),
                "{text}"
            );
            assert_ne!(lb_source_addr(n), lb_back_addr(n));
            seen.push(lb_source_addr(n));
        }
        assert_ne!(seen[0], seen[1]);
        for mode in [Forwarding::Dsr, Forwarding::Nat] {
            let text = lab.ha_config(1, mode, "maglev", 0);
            let cfg = crate::config::parse(&text, std::path::Path::new("lb.toml")).expect("valid");
            assert!(cfg.dataplane.full_nat.addresses.is_empty(), "{text}");
            assert!(cfg.services.iter().all(|s| s.forwarding == mode), "{text}");
        }
    }
}
