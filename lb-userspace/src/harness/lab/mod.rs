//! The lab: the seed's infrastructure (a client, the load balancer, a switch
//! and three web servers) built from network namespaces and veth pairs, so
//! the real `lb` agent can balance real traffic on one machine.
//!
//! ```text
//!   {P}-client                  {P}-lb                        {P}-webN
//!   eth0 198.18.0.2 ──────── lb-front 198.18.0.1
//!                            lo 198.18.0.10 (VIP)
//!                            lb-back 198.19.0.1 ──┐
//!   back0 198.19.0.2 ──┐                          │
//!                      └── {P}-sw: br0 (p-client, p-lb, p-web1..3) ── eth0 198.19.0.1N
//!                                                                     lo 198.18.0.10 (VIP)
//! ```
//!
//! Dual stack: every address above has an IPv6 twin in the documentation
//! prefix 2001:db8::/32 (nothing leaves the namespaces): the front network
//! 198.18.0.0/24 is 2001:db8:18::/64, the back network 198.19.0.0/24 is
//! 2001:db8:19::/64, and the host part is the same digits (client front
//! 2001:db8:18::2, LB front ::1, LB back 2001:db8:19::1, client back ::2,
//! webN 2001:db8:19::1N). The IPv6 VIP 2001:db8:18::10 sits on the LB's and
//! every web's `lo` beside 198.18.0.10; the client reaches it by a /128
//! route through the LB's front address (IPv6 neighbour discovery answers
//! only for addresses on the asked interface, unlike ARP for the IPv4 VIP).
//! `lab-serve` listens on both families. The LB does not forward IPv6 yet
//! (see `configure_lb_v6`). (The routed lab is dual-stack too, `routed.rs`; the multi-LB
//! lab is dual-stack too: see `ha.rs`.)
//!
//! The same code backs the `lb lab` CLI verbs and the end-to-end tests: a
//! [`Lab`] is a guard whose `Drop` removes every namespace and process it made.

mod cli;
mod client;
mod db;
mod db_demo;
mod dns;
mod ha;
mod routed;
mod serve;
mod teardown;
mod tls;
mod tunnel_demo;
mod visits;

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use rustix::process::Signal;

use crate::{
    config::Forwarding,
    harness::netns::{self, SpawnGated as _, VethEnd, in_netns},
};

pub use cli::{LabCommand, run};
pub use client::{HttpConn, HttpResponse, http_get, http_get_from, udp_connect, udp_request};
pub use db::{
    ADMIN_USER, APP_PASSWORD, APP_USER, DB_GATEWAY6, DB_NAMES, DB_PORT, READ_VIP, READ_VIP6,
    TableLock, VISITS_TABLE, WRITE_VIP, WRITE_VIP6, admin_password_file, db_addr, db_addr6,
    pool_client_addr, pool_config, pool_config6, pool_lb_back_addr, read_vip, read_vip6,
    site_pool_config, write_vip, write_vip6,
};
pub use dns::{
    DNS_NAME, DNS_PORT, DNS_ZONE, DnsAnswer, DnsZone, dns_query, dns_service_config, vip_dns,
};
pub use ha::{
    EcmpRoute, HA_CLIENT, HA_CLIENT_NET, HA_CLIENT_NET6, HA_CLIENT6, LC_VIP, RR_VIP, SYNC_PORT,
    ha_service, ha_service6, lb_back_addr, lb_back_addr6, lb_front_addr, lb_front_addr6,
    lb_front_of, lb_source_addr,
};
pub use routed::{
    GUE_PORT, ROUTED_CLIENT_BACK, ROUTED_CLIENT_BACK6, ROUTED_LB_BACK, ROUTED_LB_BACK6,
    ROUTER_CLIENT_SIDE, ROUTER_CLIENT_SIDE6, ROUTER_LB_SIDE, ROUTER_LB_SIDE6, ROUTER_WEB_IFACE,
    ROUTER_WEB_SIDE, Tunnel, WEB_NET, WEB_NET6,
};
pub use serve::{ServeArgs, bulk_byte, serve};
pub use teardown::{down, lab_serve_pids, pin_dir};
pub use tls::{HTTPS_PORT, LAB_CERT_DAYS, SITE_NAME, ca_path};

/// The virtual service address, on the LB's `lo` (and every web's `lo`).
pub const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);
/// The IPv6 VIP, beside [`VIP`] on the same `lo`s.
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x18, 0, 0, 0, 0, 0x10);
/// The client's IPv6 front address (beside [`CLIENT_FRONT`]).
pub const CLIENT_FRONT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x18, 0, 0, 0, 0, 2);
/// The LB's own IPv6 front address: the client's route to [`VIP6`].
pub const LB_FRONT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x18, 0, 0, 0, 0, 1);
/// The LB's IPv6 back address: the webs' IPv6 gateway.
pub const LB_BACK6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x19, 0, 0, 0, 0, 1);
/// The client's IPv6 back address (DSR replies over IPv6 arrive there).
pub const CLIENT_BACK6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x19, 0, 0, 0, 0, 2);
/// The IPv6 front and back networks.
pub const FRONT_NET6: &str = "2001:db8:18::/64";
pub const BACK_NET6: &str = "2001:db8:19::/64";
/// Port of the TCP (HTTP) service.
pub const HTTP_PORT: u16 = 80;
/// Port of the UDP service.
pub const UDP_PORT: u16 = 5353;
/// Port of each web's HTTP listener whose connections start with a PROXY
/// protocol v2 header (`lab-serve --proxy-http`; a `proxy-protocol = "v2"`
/// service's backends).
pub const PROXY_HTTP_PORT: u16 = 8081;
/// The client's front address (on `eth0`, facing `lb-front`).
pub const CLIENT_FRONT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// The LB's own front address.
pub const LB_FRONT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The LB's back address: the web servers' gateway.
pub const LB_BACK: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 1);
/// The client's back address: the "internet router" for DSR replies.
pub const CLIENT_BACK: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 2);
/// Port of the TCP echo listener on the LB host itself (198.18.0.1).
pub const ECHO_PORT: u16 = 2222;
/// Web server names, in config (and round-robin) order.
pub const WEB_NAMES: [&str; 3] = ["web1", "web2", "web3"];
/// The agents' monitoring listener (status page, /metrics) in the labs'
/// configs: loopback of the LB's namespace.
pub const MONITORING_LISTEN: &str = "127.0.0.1:9100";
/// The prefix the CLI uses when none is given.
pub const DEFAULT_PREFIX: &str = "foobar";

const RUN_ROOT: &str = "/run/lb-lab";
const SERVER_READY_TIMEOUT: Duration = Duration::from_secs(10);
// Loading verifies the data plane: about 10 s on this 2-core machine once
// full NAT joined the path (4 s before), more while other labs load theirs.
const AGENT_READY_TIMEOUT: Duration = Duration::from_secs(45);
const AGENT_STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// The line `lb run` prints on stdout once traffic is being balanced.
const AGENT_READY_LINE: &str = "lb: ready";

/// Address of web server `n` (1-based) on the back network: 198.19.0.1N.
pub fn web_addr(n: usize) -> Ipv4Addr {
    let last = u8::try_from(10 + n).unwrap_or(u8::MAX);
    Ipv4Addr::new(198, 19, 0, last)
}

/// IPv6 address of web server `n` (1-based): 2001:db8:19::1N, the digits
/// of [`web_addr`]'s last byte.
pub fn web_addr6(n: usize) -> Ipv6Addr {
    let last = u16::try_from(0x10 + n).unwrap_or(u16::MAX);
    Ipv6Addr::new(0x2001, 0xdb8, 0x19, 0, 0, 0, 0, last)
}

/// The IPv6 VIP's TCP (HTTP) service address.
pub fn vip6_http() -> SocketAddr {
    SocketAddr::new(VIP6.into(), HTTP_PORT)
}

/// The IPv6 VIP's UDP service address.
pub fn vip6_udp() -> SocketAddr {
    SocketAddr::new(VIP6.into(), UDP_PORT)
}

/// The VIP's TCP service address.
pub fn vip_http() -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(VIP, HTTP_PORT))
}

/// The VIP's HTTPS (TLS passthrough) service address.
pub fn vip_https() -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(VIP, HTTPS_PORT))
}

/// The VIP's UDP service address.
pub fn vip_udp() -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(VIP, UDP_PORT))
}

/// Where a lab with this prefix keeps its configs and logs.
pub fn run_dir(prefix: &str) -> PathBuf {
    Path::new(RUN_ROOT).join(prefix)
}

/// The agent config for the lab: a TCP service on VIP:80, a UDP service
/// on VIP:5353 and a TCP service on VIP:443 (HTTPS, passed through to the
/// web servers), each round robin over web1..web3 in that order.
pub fn lab_config(mode: Forwarding) -> String {
    web_services(mode, "", "")
}

/// The health check of the site's web services: HTTP on the webs' port 80
/// (the UDP and HTTPS services too: a web that stops answering HTTP leaves
/// every rotation).
const SITE_HEALTH: &str = "health = { check = \"http\", port = 80, path = \"/\", interval = \"1s\", timeout = \"500ms\", rise = 2, fall = 2 }\n";

/// A network the site's firewall denies (TEST-NET-3, standing for a
/// known-bad network).
pub const SITE_DENIED: &str = "203.0.113.0/24";

/// The whole www.foobar.com as `lb lab up` and the demo run it, its
/// weaknesses answered: the services of [`lab_config`] each health-checked,
/// the monitoring listener (status page, /metrics), and a firewall (a
/// denied network, a per-/24 limit on new flows). `lb lab up` adds the
/// database pool, reachable only from the webs ([`site_pool_config`]);
/// `--lbs N` has its own ([`Lab::ha_site_config`]).
pub fn site_config(mode: Forwarding) -> String {
    let tables = format!(
        "\n[monitoring]\nlisten = \"{MONITORING_LISTEN}\"\n\n\
         [firewall]\ndeny = [\"{SITE_DENIED}\"]\n\
         rate-limit = {{ new-flows-per-second = 1000, burst = 2000, per = \"/24\" }}\n"
    );
    web_services(mode, SITE_HEALTH, &tables)
}

/// `[dataplane]`, then `tables` (TOML tables, or empty), then the three
/// web services with `health` (a line, or empty) in each.
fn web_services(mode: Forwarding, health: &str, tables: &str) -> String {
    let forwarding = mode.name();
    let mut toml = format!(
        "[dataplane]\ninterfaces = [\"lb-front\", \"lb-back\"]\nforwarding = \"{forwarding}\"\nxdp-mode = \"native\"\n{tables}"
    );
    for (name, protocol, port) in [
        ("www", "tcp", HTTP_PORT),
        ("www-udp", "udp", UDP_PORT),
        ("www-tls", "tcp", HTTPS_PORT),
    ] {
        toml.push_str(&web_service(name, protocol, port, "round-robin", health));
    }
    toml
}

/// One `[[service]]` table: `name` on VIP:`port` over web1..3 at the same
/// port, with `scheduler` and `lines` (a `health = …` line, a
/// `forwarding = …` line, or empty).
fn web_service(name: &str, protocol: &str, port: u16, scheduler: &str, lines: &str) -> String {
    let backends = |n| IpAddr::V4(web_addr(n));
    web_service_on(
        VIP.into(),
        backends,
        (name, protocol, port),
        scheduler,
        lines,
    )
}

/// [`web_service`] on `vip` over web1..3's `address(n)`: IPv4's or
/// IPv6's.
pub(super) fn web_service_on(
    vip: IpAddr,
    address: impl Fn(usize) -> IpAddr,
    (name, protocol, port): (&str, &str, u16),
    scheduler: &str,
    lines: &str,
) -> String {
    let backends = (1..=WEB_NAMES.len())
        .map(|n| {
            format!(
                "{{ address = \"{}\", name = \"web{n}\" }}",
                SocketAddr::new(address(n), port)
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    let vip = SocketAddr::new(vip, port);
    format!(
        "\n[[service]]\nname = \"{name}\"\nvip = \"{vip}\"\nprotocol = \"{protocol}\"\nscheduler = \"{scheduler}\"\n{lines}backends = [ {backends} ]\n"
    )
}

/// [`site_config`] plus `www6`, the web service on the VIP6 (TCP :80 over
/// web1..3's IPv6 addresses, round robin, the site's HTTP check over
/// IPv6): what the demo runs. The LB must forward IPv6
/// ([`Lab::forward_ipv6`]).
pub fn site_config_v6(mode: Forwarding) -> String {
    let backends = |n| IpAddr::V6(web_addr6(n));
    site_config(mode)
        + &web_service_on(
            VIP6.into(),
            backends,
            ("www6", "tcp", HTTP_PORT),
            "round-robin",
            SITE_HEALTH,
        )
}

/// A running lab. Dropping it kills every process in its namespaces, deletes
/// the namespaces (which removes the veths and the bridge) and its run dir.
pub struct Lab {
    prefix: String,
    lb_bin: PathBuf,
    /// Servers started by this process, reaped on drop.
    children: Vec<Child>,
    /// Set by [`Lab::keep`]: leave everything running on drop.
    keep: bool,
    /// 0: the single-LB lab; N ≥ 2: N LBs behind a BGP/ECMP router
    /// (see `ha.rs`).
    lbs: usize,
    /// The single-LB lab with the webs behind a router (see `routed.rs`).
    routed: bool,
}

impl Lab {
    /// Builds the lab and starts its servers (web1..3, and the echo listener
    /// on the LB host). Leftovers of an earlier lab with the same prefix are
    /// removed first, so this also works after a crash.
    pub fn up(prefix: &str, lb_bin: &Path) -> anyhow::Result<Lab> {
        Self::create(prefix, lb_bin, false)
    }

    /// Like [`Lab::up`], but the servers are started in their own sessions
    /// so they outlive this process (for `lb lab up`). Still a guard until
    /// [`Lab::keep`] is called.
    pub(crate) fn up_detached(prefix: &str, lb_bin: &Path) -> anyhow::Result<Lab> {
        Self::create(prefix, lb_bin, true)
    }

    fn create(prefix: &str, lb_bin: &Path, detached: bool) -> anyhow::Result<Lab> {
        Self::create_with(prefix, lb_bin, detached, 0)
    }

    fn create_with(prefix: &str, lb_bin: &Path, detached: bool, lbs: usize) -> anyhow::Result<Lab> {
        Self::create_layout(prefix, lb_bin, detached, lbs, false)
    }

    fn create_layout(
        prefix: &str,
        lb_bin: &Path,
        detached: bool,
        lbs: usize,
        routed: bool,
    ) -> anyhow::Result<Lab> {
        teardown::validate_prefix(prefix)?;
        netns::require_tool(
            "ethtool",
            "apt-get install ethtool (cargo xtask setup installs it)",
        )?;
        down(prefix).with_context(|| format!("removing leftovers of lab {prefix}"))?;
        // The guard exists before anything is created, so an error half-way
        // through tears down whatever was already made.
        let mut lab = Lab {
            prefix: prefix.to_owned(),
            lb_bin: lb_bin.to_path_buf(),
            children: Vec::new(),
            keep: false,
            lbs,
            routed,
        };
        fs::create_dir_all(lab.run_dir())
            .with_context(|| format!("creating {}", lab.run_dir().display()))?;
        let webs: Vec<(&str, Ipv4Addr)> = WEB_NAMES
            .iter()
            .enumerate()
            .map(|(i, name)| (*name, web_addr(i + 1)))
            .collect();
        tls::write_lab_pki(&lab.run_dir(), &webs, VIP)
            .with_context(|| format!("making the TLS certificates of lab {prefix}"))?;
        if routed {
            lab.build_routed_topology()
        } else if lbs == 0 {
            lab.build_topology()
        } else {
            lab.build_ha_topology()
        }
        .with_context(|| format!("building lab {prefix}"))?;
        lab.start_servers(detached)
            .with_context(|| format!("starting the servers of lab {prefix}"))?;
        if lbs > 0 {
            lab.start_birds(detached)
                .with_context(|| format!("starting BIRD in lab {prefix}"))?;
        }
        Ok(lab)
    }

    /// Leaves the lab running when this guard goes away (`lb lab up`);
    /// `lb lab down` removes it later.
    pub fn keep(mut self) {
        self.keep = true;
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn client_ns(&self) -> String {
        format!("{}-client", self.prefix)
    }

    pub fn lb_ns(&self) -> String {
        format!("{}-lb", self.prefix)
    }

    pub fn sw_ns(&self) -> String {
        format!("{}-sw", self.prefix)
    }

    /// Namespace of web server `n` (1-based).
    pub fn web_ns(&self, n: usize) -> String {
        format!("{}-web{n}", self.prefix)
    }

    /// Every namespace of the lab.
    pub fn namespaces(&self) -> Vec<String> {
        if self.routed {
            teardown::routed_namespace_names(&self.prefix)
        } else if self.lbs == 0 {
            teardown::namespace_names(&self.prefix)
        } else {
            teardown::ha_namespace_names(&self.prefix, self.lbs)
        }
    }

    /// `/run/lb-lab/{prefix}`: configs and logs.
    pub fn run_dir(&self) -> PathBuf {
        run_dir(&self.prefix)
    }

    /// The lab CA's certificate (`{run_dir}/ca.pem`): what clients verify
    /// the web servers' HTTPS certificates against. Its key was never
    /// written anywhere.
    pub fn ca_path(&self) -> PathBuf {
        ca_path(&self.run_dir())
    }

    /// The control socket of agents started by [`Lab::start_agent`] (for
    /// `lb status --socket ...`).
    pub fn agent_socket(&self) -> PathBuf {
        self.run_dir().join("lb.sock")
    }

    /// Runs `args` inside namespace `ns` (`ip netns exec ns args...`) and
    /// returns its output, whatever its exit status.
    pub fn exec(&self, ns: &str, args: &[&str]) -> anyhow::Result<Output> {
        netns::ns_output(ns, args)
    }

    /// Like [`Lab::exec`], but fails (with the command line and its stderr)
    /// unless the command succeeds; returns its stdout.
    pub fn exec_ok(&self, ns: &str, args: &[&str]) -> anyhow::Result<String> {
        netns::ns_run(ns, args)
    }

    /// Switches how the web servers send replies to the client network.
    /// NAT: through their default route, the LB, which rewrites them back to
    /// VIP→client. DSR: straight to the client's back leg, bypassing the LB.
    /// In the multi-LB lab, DSR replies go to the router's back leg (which
    /// has the same address as the single lab's client back leg).
    /// The single lab's client network 198.18.0.0/24 also holds the
    /// database VIPs, which the webs reach through the LB (their `/visits`):
    /// in DSR they keep host routes via the LB, more specific than the
    /// client network's.
    ///
    /// The routed lab's webs always answer through their router, straight
    /// to the client: only tunnel (DSR-like) services work there, and NAT
    /// is refused.
    pub fn set_mode(&self, mode: Forwarding) -> anyhow::Result<()> {
        if self.routed {
            if mode == Forwarding::Nat {
                bail!(
                    "the routed lab's webs answer clients through their router, not the LB: NAT cannot work there"
                );
            }
            return Ok(());
        }
        let client_net = if self.lbs == 0 {
            "198.18.0.0/24"
        } else {
            HA_CLIENT_NET
        };
        let router = CLIENT_BACK.to_string();
        let through_lb: Vec<String> = [WRITE_VIP, READ_VIP]
            .iter()
            .filter(|_| self.lbs == 0)
            .map(|vip| format!("{vip}/32"))
            .collect();
        for n in 1..=WEB_NAMES.len() {
            let ns = self.web_ns(n);
            match mode {
                Forwarding::Dsr | Forwarding::Ipip | Forwarding::Gue => {
                    netns::ns_run(&ns, &["ip", "route", "replace", client_net, "via", &router])?;
                    for vip in &through_lb {
                        let gateway = LB_BACK.to_string();
                        netns::ns_run(&ns, &["ip", "route", "replace", vip, "via", &gateway])?;
                    }
                }
                // Full NAT: the webs answer the LB's source address, on
                // their own subnet; no route to the clients at all.
                Forwarding::Nat | Forwarding::FullNat => {
                    for net in
                        std::iter::once(client_net).chain(through_lb.iter().map(String::as_str))
                    {
                        if !netns::ns_run(&ns, &["ip", "route", "show", net])?
                            .trim()
                            .is_empty()
                        {
                            netns::ns_run(&ns, &["ip", "route", "del", net])?;
                        }
                    }
                }
            };
            let client_net6 = if self.lbs == 0 {
                FRONT_NET6
            } else {
                HA_CLIENT_NET6
            };
            set_mode_v6(&ns, mode, client_net6)?;
        }
        Ok(())
    }

    /// Writes `config_toml` to `{run_dir}/lb.toml`, starts the agent the
    /// way the README tells users to (`lb run --netns {P}-lb --config ...`,
    /// its pins on the host's bpffs under [`Lab::pin_dir`], so they outlive
    /// the agent and a restarted agent adopts them) and waits up to 45 s for
    /// it to print `lb: ready`. On failure the agent is killed and the error
    /// carries its stderr.
    pub fn start_agent(&self, config_toml: &str) -> anyhow::Result<AgentProcess> {
        self.start_agent_with(config_toml, &[])
    }

    /// Where the lab's agents pin the data plane: on the host's bpffs, one
    /// directory per lab so labs side by side never share a data plane.
    /// `down` removes it.
    pub fn pin_dir(&self) -> PathBuf {
        pin_dir(&self.prefix)
    }

    /// `lb teardown --pin-dir` of the lab's data plane: detaches XDP and
    /// removes the pins, so the next agent starts afresh instead of adopting
    /// flows and round-robin positions; and the agent's runtime changes
    /// (its state file), so it starts from the config alone.
    pub fn remove_dataplane(&self) -> anyhow::Result<()> {
        let state = self.run_dir().join("lb.state.toml");
        match fs::remove_file(&state) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", state.display())),
        }
        crate::dataplane::Dataplane::teardown(&self.pin_dir())
            .map(drop)
            .with_context(|| format!("lb teardown --pin-dir {}", self.pin_dir().display()))
    }

    /// [`Lab::start_agent`] with extra `lb run` arguments.
    pub fn start_agent_with(
        &self,
        config_toml: &str,
        extra: &[&str],
    ) -> anyhow::Result<AgentProcess> {
        self.start_agent_at(&self.site(self.pin_dir()), config_toml, extra)
    }

    /// [`Lab::start_agent`] with the pins under `pin_dir` instead of
    /// [`Lab::pin_dir`] (removing them is the caller's business).
    pub fn start_agent_pinned_at(
        &self,
        config_toml: &str,
        pin_dir: &Path,
    ) -> anyhow::Result<AgentProcess> {
        self.start_agent_at(&self.site(pin_dir.to_path_buf()), config_toml, &[])
    }

    /// The lab's agent site (namespace, files, socket), pinned at `pin_dir`.
    fn site(&self, pin_dir: PathBuf) -> AgentSite {
        AgentSite {
            ns: self.lb_ns(),
            dir: self.run_dir(),
            socket: self.agent_socket(),
            pin_dir,
        }
    }

    /// Starts an agent in `site` (its namespace, files, socket and pins).
    fn start_agent_at(
        &self,
        site: &AgentSite,
        config_toml: &str,
        extra: &[&str],
    ) -> anyhow::Result<AgentProcess> {
        let config = site.dir.join("lb.toml");
        fs::write(&config, config_toml).with_context(|| format!("writing {}", config.display()))?;
        let log = site.dir.join("agent.log");
        let stderr =
            fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let lb_bin = self.lb_bin.display().to_string();
        let config_arg = config.display().to_string();
        // The agent's control socket defaults to one fixed path shared by
        // every namespace (/run is not per network namespace): give each lab
        // its own, so labs with different prefixes can run side by side.
        let socket_arg = site.socket.display().to_string();
        let pin_arg = site.pin_dir.display().to_string();
        let lb_ns = site.ns.clone();
        let args = [
            "run",
            "--netns",
            &lb_ns,
            "--config",
            &config_arg,
            "--socket",
            &socket_arg,
            "--pin-dir",
            &pin_arg,
        ];
        let args: Vec<&str> = args.iter().chain(extra).copied().collect();
        let mut child = Command::new(&lb_bin)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .spawn_gated()
            .with_context(|| format!("starting the agent: {lb_bin} {}", args.join(" ")))?;
        let ready = watch_for_ready_line(&mut child);
        let mut agent = AgentProcess {
            child: Some(child),
            log,
        };
        match ready.recv_timeout(AGENT_READY_TIMEOUT) {
            Ok(()) => Ok(agent),
            Err(why) => {
                let status = agent.terminate();
                let reason = match why {
                    mpsc::RecvTimeoutError::Timeout => {
                        format!("no `{AGENT_READY_LINE}` within {AGENT_READY_TIMEOUT:?}")
                    }
                    mpsc::RecvTimeoutError::Disconnected => {
                        format!("exited before `{AGENT_READY_LINE}` ({status})")
                    }
                };
                bail!(
                    "agent in {}: {reason}; its stderr:\n{}",
                    site.ns,
                    agent.log_text()
                )
            }
        }
    }

    fn build_topology(&self) -> anyhow::Result<()> {
        let p = &self.prefix;
        for ns in self.namespaces() {
            netns::add_namespace(&ns)?;
        }
        let sw = self.sw_ns();
        netns::ns_run(&sw, &["ip", "link", "add", "br0", "type", "bridge"])?;
        netns::ns_run(&sw, &["ip", "link", "set", "br0", "up"])?;

        // Front link: client eth0 <-> lb lb-front.
        netns::add_veth(
            &VethEnd::new(&self.client_ns(), "eth0"),
            &VethEnd::new(&self.lb_ns(), "lb-front"),
        )?;
        // Back network: every leg is a veth whose switch end joins br0.
        let mut back_legs = vec![
            (self.lb_ns(), "lb-back".to_owned(), "p-lb".to_owned()),
            (self.client_ns(), "back0".to_owned(), "p-client".to_owned()),
        ];
        for n in 1..=WEB_NAMES.len() {
            back_legs.push((self.web_ns(n), "eth0".to_owned(), format!("p-web{n}")));
        }
        for (ns, dev, port) in &back_legs {
            netns::add_veth(&VethEnd::new(ns, dev), &VethEnd::new(&sw, port))?;
            netns::ns_run(&sw, &["ip", "link", "set", port, "master", "br0", "up"])
                .with_context(|| format!("enslaving {port} to br0 in {sw}"))?;
        }

        self.configure_client()?;
        self.configure_client_v6()?;
        self.configure_lb()?;
        self.configure_lb_v6()?;
        for n in 1..=WEB_NAMES.len() {
            self.configure_web(n)?;
        }
        for (ns, dev) in self.veth_ends() {
            netns::tune_veth(&ns, &dev)?;
        }
        tracing::debug!("lab {p}: topology built");
        Ok(())
    }

    /// Every veth end of the lab, as (namespace, device).
    fn veth_ends(&self) -> Vec<(String, String)> {
        let mut ends = vec![
            (self.client_ns(), "eth0".to_owned()),
            (self.client_ns(), "back0".to_owned()),
            (self.lb_ns(), "lb-front".to_owned()),
            (self.lb_ns(), "lb-back".to_owned()),
            (self.sw_ns(), "p-lb".to_owned()),
            (self.sw_ns(), "p-client".to_owned()),
        ];
        for n in 1..=WEB_NAMES.len() {
            ends.push((self.web_ns(n), "eth0".to_owned()));
            ends.push((self.sw_ns(), format!("p-web{n}")));
        }
        ends
    }

    fn configure_client(&self) -> anyhow::Result<()> {
        self.configure_client_with_back(CLIENT_BACK)
    }

    /// The client: `eth0` facing the LB, `back0` at `back` where replies
    /// that bypass the LB arrive.
    fn configure_client_with_back(&self, back: Ipv4Addr) -> anyhow::Result<()> {
        let ns = self.client_ns();
        netns::add_addr(&ns, "eth0", &format!("{CLIENT_FRONT}/24"))?;
        netns::add_addr(&ns, "back0", &format!("{back}/24"))?;
        // DSR replies arrive on back0 with source VIP, whose route points out
        // of eth0: reverse-path filtering would drop them.
        for dev in ["all", "default", "eth0", "back0"] {
            netns::sysctl(&ns, &format!("net/ipv4/conf/{dev}/rp_filter"), "0")?;
        }
        // The client is a host, not a router between its two legs.
        netns::sysctl(&ns, "net/ipv4/ip_forward", "0")
    }

    /// The client's IPv6 side: its two legs' addresses, and the VIP6 by a
    /// /128 route through the LB's front address.
    fn configure_client_v6(&self) -> anyhow::Result<()> {
        let ns = self.client_ns();
        add_addr6(&ns, "eth0", &format!("{CLIENT_FRONT6}/64"))?;
        add_addr6(&ns, "back0", &format!("{CLIENT_BACK6}/64"))?;
        let (vip, via) = (format!("{VIP6}/128"), LB_FRONT6.to_string());
        netns::ns_run(&ns, &["ip", "-6", "route", "add", &vip, "via", &via])?;
        netns::sysctl(&ns, "net/ipv6/conf/all/forwarding", "0")
    }

    /// The LB's IPv6 side: front and back addresses and the VIP6 on `lo`.
    /// Has the LB's kernel forward IPv6 (`net.ipv6.conf.all.forwarding`),
    /// which an IPv6 service needs (`bpf_fib_lookup` with AF_INET6, and the
    /// agent's start-up check); not part of [`Lab::up`] (see
    /// `configure_lb_v6`).
    pub fn forward_ipv6(&self) -> anyhow::Result<()> {
        netns::sysctl(&self.lb_ns(), "net/ipv6/conf/all/forwarding", "1")
    }

    fn configure_lb_v6(&self) -> anyhow::Result<()> {
        let ns = self.lb_ns();
        add_addr6(&ns, "lb-front", &format!("{LB_FRONT6}/64"))?;
        add_addr6(&ns, "lb-back", &format!("{LB_BACK6}/64"))?;
        add_addr6(&ns, "lo", &format!("{VIP6}/128"))?;
        // Not `net.ipv6.conf.all.forwarding=1`: with it on, the IPv4 path-MTU
        // test (frag_e2e.rs) stalled 3 runs of 3 (cause not found yet); the
        // IPv6 data plane will need it (bpf_fib_lookup), so that is open.
        Ok(())
    }

    fn configure_lb(&self) -> anyhow::Result<()> {
        let ns = self.lb_ns();
        netns::add_addr(&ns, "lb-front", &format!("{LB_FRONT}/24"))?;
        netns::add_addr(&ns, "lb-back", &format!("{LB_BACK}/24"))?;
        // The VIP on lo makes the LB answer ARP for it on lb-front, so the
        // client sends VIP traffic to the LB's MAC.
        netns::add_addr(&ns, "lo", &format!("{VIP}/32"))?;
        // bpf_fib_lookup only resolves next hops when forwarding is on.
        netns::sysctl(&ns, "net/ipv4/ip_forward", "1")
    }

    fn configure_web(&self, n: usize) -> anyhow::Result<()> {
        let ns = self.web_ns(n);
        netns::add_addr(&ns, "eth0", &format!("{}/24", web_addr(n)))?;
        own_vip_quietly(&ns)?;
        netns::add_default_route(&ns, LB_BACK)?;
        configure_web_v6(&ns, n)
    }

    fn start_servers(&mut self, detached: bool) -> anyhow::Result<()> {
        for n in 1..=WEB_NAMES.len() {
            self.spawn_web(n, detached)?;
        }
        if self.lbs > 0 {
            return self.wait_for_servers();
        }
        let echo = format!("{LB_FRONT}:{ECHO_PORT}");
        let echo6 = SocketAddr::new(LB_FRONT6.into(), ECHO_PORT).to_string();
        let args = vec!["--name", "lb", "--echo", &echo, "--echo", &echo6];
        self.spawn_server(&self.lb_ns(), "echo", &args, detached)?;
        self.wait_for_servers()
    }

    /// Starts web server `n` (1-based) in its namespace.
    fn spawn_web(&mut self, n: usize, detached: bool) -> anyhow::Result<()> {
        let name = WEB_NAMES
            .get(n - 1)
            .copied()
            .with_context(|| format!("no web server {n}"))?;
        let own_udp = format!("{}:{UDP_PORT}", web_addr(n));
        let vip_udp = format!("{VIP}:{UDP_PORT}");
        let https = format!("0.0.0.0:{HTTPS_PORT}");
        let proxy_http = format!("0.0.0.0:{PROXY_HTTP_PORT}");
        let (cert, key) = tls::web_cert_paths(&self.run_dir(), name);
        let (cert, key) = (cert.display().to_string(), key.display().to_string());
        let (db_write, db_read) = (write_vip().to_string(), read_vip().to_string());
        let db_password = db::app_password_file(&self.run_dir()).display().to_string();
        // Two UDP sockets, one per address, rather than one on 0.0.0.0:
        // a reply then leaves with the address the request was sent to
        // (the web's own in NAT, the VIP in DSR), which is what the
        // client's connected socket expects.
        let mut args: Vec<String> = [
            "--name",
            name,
            "--http",
            "0.0.0.0:80",
            "--https",
            &https,
            "--cert",
            &cert,
            "--key",
            &key,
            "--udp",
            &own_udp,
            "--udp",
            &vip_udp,
            "--proxy-http",
            &proxy_http,
            "--db-write",
            &db_write,
            "--db-read",
            &db_read,
            "--db-password-file",
            &db_password,
        ]
        .iter()
        .map(|a| a.to_string())
        .collect();
        {
            // IPv6: each service on the web's own address and on the VIP6
            // (own sockets beside the IPv4 wildcards, which stay IPv4's).
            for addr in [web_addr6(n), VIP6] {
                for (flag, port) in [
                    ("--http", HTTP_PORT),
                    ("--https", HTTPS_PORT),
                    ("--udp", UDP_PORT),
                    ("--proxy-http", PROXY_HTTP_PORT),
                ] {
                    args.push(flag.to_owned());
                    args.push(SocketAddr::new(addr.into(), port).to_string());
                }
            }
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.spawn_server(&self.web_ns(n), name, &args, detached)
    }

    /// Kills web server `n` (1-based), as a crashed server would vanish, and
    /// waits until its port refuses connections.
    pub fn stop_web(&mut self, n: usize) -> anyhow::Result<()> {
        let ns = self.web_ns(n);
        let out = Command::new("ip")
            .args(["netns", "pids", &ns])
            .output()
            .with_context(|| format!("ip netns pids {ns}"))?;
        for pid in String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.trim().parse::<u32>().ok())
        {
            netns::signal(pid, Signal::KILL);
        }
        let addr = SocketAddr::V4(SocketAddrV4::new(web_addr(n), HTTP_PORT));
        let deadline = Instant::now() + SERVER_READY_TIMEOUT;
        while in_netns(&self.client_ns(), || {
            TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
        })? {
            if Instant::now() > deadline {
                bail!("web{n} still accepts on {addr} after being killed");
            }
            thread::sleep(Duration::from_millis(20));
        }
        // Reap the killed child so a restarted one is not mistaken for it.
        for child in &mut self.children {
            let _ = child.try_wait();
        }
        Ok(())
    }

    /// Starts web server `n` again and waits until it accepts.
    pub fn start_web(&mut self, n: usize) -> anyhow::Result<()> {
        self.children
            .retain_mut(|c| matches!(c.try_wait(), Ok(None)));
        self.spawn_web(n, false)?;
        // Only this one: others may be stopped on purpose.
        let addr = SocketAddr::V4(SocketAddrV4::new(web_addr(n), HTTP_PORT));
        let deadline = Instant::now() + SERVER_READY_TIMEOUT;
        while !in_netns(&self.client_ns(), || {
            TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok()
        })? {
            if Instant::now() > deadline {
                bail!(
                    "web{n} not accepting on {addr} after {SERVER_READY_TIMEOUT:?}; {}",
                    self.server_log(&format!("web{n}"))
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    fn spawn_server(
        &mut self,
        ns: &str,
        name: &str,
        args: &[&str],
        detached: bool,
    ) -> anyhow::Result<()> {
        let log = self.run_dir().join(format!("{name}.log"));
        let out = fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out
            .try_clone()
            .with_context(|| format!("duplicating {}", log.display()))?;
        let lb_bin = self.lb_bin.display().to_string();
        let mut full = vec![lb_bin.as_str(), "lab-serve", "--lab", self.prefix.as_str()];
        full.extend_from_slice(args);
        let mut cmd = netns::ns_command(ns, &full);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        if detached {
            netns::new_session(&mut cmd);
        }
        let child = cmd.spawn_gated().with_context(|| {
            format!(
                "starting server {name}: ip netns exec {ns} {}",
                full.join(" ")
            )
        })?;
        self.children.push(child);
        Ok(())
    }

    /// Waits until every web server accepts HTTP connections (seen from the
    /// client's back leg) and the echo listener accepts on the LB host.
    fn wait_for_servers(&mut self) -> anyhow::Result<()> {
        let mut targets: Vec<(String, SocketAddr)> = (1..=WEB_NAMES.len())
            .map(|n| {
                (
                    format!("web{n}"),
                    SocketAddr::V4(SocketAddrV4::new(web_addr(n), HTTP_PORT)),
                )
            })
            .collect();
        // The multi-LB lab's client has no leg on the back network: the
        // router has.
        let from = if self.lbs == 0 {
            targets.push((
                "echo".to_owned(),
                SocketAddr::V4(SocketAddrV4::new(LB_FRONT, ECHO_PORT)),
            ));
            self.client_ns()
        } else {
            self.router_ns()
        };
        let deadline = Instant::now() + SERVER_READY_TIMEOUT;
        for (name, addr) in targets {
            loop {
                let connected = in_netns(&from, || {
                    TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok()
                })?;
                if connected {
                    break;
                }
                self.check_servers_alive()?;
                if Instant::now() > deadline {
                    bail!(
                        "server {name} not accepting on {addr} after {SERVER_READY_TIMEOUT:?}; {}",
                        self.server_log(&name)
                    );
                }
                thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    fn check_servers_alive(&mut self) -> anyhow::Result<()> {
        for child in &mut self.children {
            if let Some(status) = child.try_wait().context("checking a lab server")? {
                bail!(
                    "a lab server exited early ({status}); logs are in {}",
                    self.run_dir().display()
                );
            }
        }
        Ok(())
    }

    fn server_log(&self, name: &str) -> String {
        let path = self.run_dir().join(format!("{name}.log"));
        match fs::read_to_string(&path) {
            Ok(text) => format!("{}:\n{text}", path.display()),
            Err(e) => format!("cannot read {}: {e}", path.display()),
        }
    }

    /// Pids of the servers this process started (for `lb lab up`'s record).
    fn server_pids(&self) -> Vec<u32> {
        self.children.iter().map(Child::id).collect()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // After a signal, the handler tears down (and exits); doing it here
        // too would race with it.
        if self.keep || netns::interrupted() {
            return;
        }
        if let Err(e) = down(&self.prefix) {
            tracing::error!("tearing down lab {}: {e:#}", self.prefix);
        }
        for child in &mut self.children {
            // Killed by `down` already; kill() only covers a server that was
            // somehow outside its namespace, wait() reaps the zombie.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Puts the VIP on `lo` of a web's namespace `ns`, for DSR and tunnels,
/// which deliver packets still addressed to the VIP: the web must own it,
/// yet never answer ARP for it (arp_ignore) nor use it as the source of its
/// own ARP requests (arp_announce), or it would steal the VIP from the LB
/// on a shared back network.
/// [`Lab::set_mode`] for a web's IPv6 replies (namespace `ns`) to the
/// IPv6 client network `client_net` (the single lab's front network, the
/// multi-LB lab's client network): in DSR through the client's back leg
/// (the multi-LB lab's router's), in NAT through the default route (the
/// LB; lb1 in the multi-LB lab).
fn set_mode_v6(ns: &str, mode: Forwarding, client_net: &str) -> anyhow::Result<()> {
    if mode == Forwarding::Nat {
        if !netns::ns_run(ns, &["ip", "-6", "route", "show", client_net])?
            .trim()
            .is_empty()
        {
            netns::ns_run(ns, &["ip", "-6", "route", "del", client_net])?;
        }
        return Ok(());
    }
    let router = CLIENT_BACK6.to_string();
    netns::ns_run(
        ns,
        &["ip", "-6", "route", "replace", client_net, "via", &router],
    )?;
    Ok(())
}

/// Adds IPv6 `cidr` to `dev` in `ns`, usable at once (`nodad`: no
/// duplicate detection in a lab whose addresses are all ours, so servers
/// bind them without waiting a second for the address to stop being
/// tentative).
/// Web `n`'s IPv6 side (in `ns`): its own address, the VIP6 (delivered to
/// it in DSR and by its decapsulator), and 2001:db8:19::1 as its gateway
/// (the LB in the single lab, the router in the routed one). Nobody on the
/// back network asks for the VIP6 (neighbour discovery answers only for the
/// asked interface's addresses), so it needs no arp_ignore twin.
pub(super) fn configure_web_v6(ns: &str, n: usize) -> anyhow::Result<()> {
    add_addr6(ns, "eth0", &format!("{}/64", web_addr6(n)))?;
    add_addr6(ns, "lo", &format!("{VIP6}/128"))?;
    let gateway = LB_BACK6.to_string();
    netns::ns_run(
        ns,
        &["ip", "-6", "route", "add", "default", "via", &gateway],
    )
    .map(drop)
}

pub(super) fn add_addr6(ns: &str, dev: &str, cidr: &str) -> anyhow::Result<()> {
    netns::ns_run(ns, &["ip", "-6", "addr", "add", cidr, "dev", dev, "nodad"])
        .with_context(|| format!("adding {cidr} to {dev} in {ns}"))?;
    Ok(())
}

fn own_vip_quietly(ns: &str) -> anyhow::Result<()> {
    netns::add_addr(ns, "lo", &format!("{VIP}/32"))?;
    for dev in ["all", "eth0"] {
        netns::sysctl(ns, &format!("net/ipv4/conf/{dev}/arp_ignore"), "1")?;
        netns::sysctl(ns, &format!("net/ipv4/conf/{dev}/arp_announce"), "2")?;
    }
    Ok(())
}

/// Where an agent runs: its namespace, the directory of its config and
/// log, its control socket and its pin dir.
struct AgentSite {
    ns: String,
    dir: PathBuf,
    socket: PathBuf,
    pin_dir: PathBuf,
}

/// Sends `()` once the child prints the ready line; the channel disconnects
/// if its stdout closes first. Keeps draining stdout afterwards so the agent
/// never blocks on a full pipe.
fn watch_for_ready_line(child: &mut Child) -> mpsc::Receiver<()> {
    let (tx, rx) = mpsc::channel();
    if let Some(stdout) = child.stdout.take() {
        thread::spawn(move || {
            use std::io::BufRead as _;
            let mut tx = Some(tx);
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.trim() == AGENT_READY_LINE
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(());
                }
            }
        });
    }
    rx
}

/// A running `lb run` agent. Dropping it stops it: SIGTERM, up to 5 s to
/// exit (it detaches XDP on the way out), then SIGKILL.
pub struct AgentProcess {
    child: Option<Child>,
    log: PathBuf,
}

impl AgentProcess {
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The agent's stderr so far.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log)
            .unwrap_or_else(|e| format!("(cannot read {}: {e})", self.log.display()))
    }

    /// Path of the file holding the agent's stderr.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// SIGKILLs the agent (a crash, an OOM kill) and reaps it.
    pub fn kill(mut self) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else {
            bail!("agent already stopped");
        };
        netns::signal(child.id(), Signal::KILL);
        child.wait().context("reaping the killed agent")?;
        Ok(())
    }

    /// Stops the agent and checks it exited cleanly (status 0 after SIGTERM).
    pub fn stop(mut self) -> anyhow::Result<()> {
        match self.terminate() {
            StopOutcome::Exited(status) if status.success() => Ok(()),
            outcome => bail!(
                "agent did not stop cleanly on SIGTERM: {outcome}; its stderr:\n{}",
                self.log_text()
            ),
        }
    }

    fn terminate(&mut self) -> StopOutcome {
        let Some(mut child) = self.child.take() else {
            return StopOutcome::AlreadyStopped;
        };
        netns::signal(child.id(), Signal::TERM);
        let deadline = Instant::now() + AGENT_STOP_TIMEOUT;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return StopOutcome::Exited(status),
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
                Ok(None) => break,
                Err(e) => return StopOutcome::WaitFailed(e.to_string()),
            }
        }
        let _ = child.kill();
        match child.wait() {
            Ok(_) => StopOutcome::Killed,
            Err(e) => StopOutcome::WaitFailed(e.to_string()),
        }
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if let StopOutcome::Killed | StopOutcome::WaitFailed(_) = self.terminate() {
            tracing::warn!(
                "agent needed SIGKILL; its stderr is in {}",
                self.log.display()
            );
        }
    }
}

enum StopOutcome {
    AlreadyStopped,
    Exited(ExitStatus),
    Killed,
    WaitFailed(String),
}

impl std::fmt::Display for StopOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StopOutcome::AlreadyStopped => write!(f, "already stopped"),
            StopOutcome::Exited(status) => write!(f, "exited with {status}"),
            StopOutcome::Killed => write!(f, "still running after {AGENT_STOP_TIMEOUT:?}, killed"),
            StopOutcome::WaitFailed(e) => write!(f, "waiting for it failed: {e}"),
        }
    }
}
