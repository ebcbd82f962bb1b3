//! The kernel tier's network: one throwaway namespace whose routes and
//! (static) neighbour entries give `bpf_fib_lookup` a real next hop, and the
//! addresses the kernel tests build frames with. Built through the
//! harness's netns helper, like the lab and the benchmark's topology.
//!
//! ```text
//!   f0 198.18.0.1/24 (FRONT_MAC) ── f1     neighbours: client, hairpin backend
//!   b0 198.19.0.1/24 (BACK_MAC)  ── b1     neighbours: web1..3 (web4 has none)
//! ```

use std::sync::atomic::{AtomicU32, Ordering};

use lb_userspace::{
    config::{Config, Dataplane, Forwarding, Service, XdpMode},
    harness::netns::{self, Netns, VethEnd},
};

pub const CLIENT: [u8; 4] = [198, 18, 0, 2];
pub const LB_FRONT: [u8; 4] = [198, 18, 0, 1];
pub const VIP: [u8; 4] = [198, 18, 0, 10];
pub const VIP_DSR: [u8; 4] = [198, 18, 0, 20];
pub const VIP_UNRESOLVED: [u8; 4] = [198, 18, 0, 30];
pub const VIP_UNRESOLVED_DSR: [u8; 4] = [198, 18, 0, 31];
pub const WEBS: [[u8; 4]; 3] = [[198, 19, 0, 11], [198, 19, 0, 12], [198, 19, 0, 13]];
/// A service whose backend sits on the front network (next hop = ingress).
pub const VIP_HAIRPIN: [u8; 4] = [198, 18, 0, 40];
pub const HAIRPIN_BACKEND: [u8; 4] = [198, 18, 0, 50];
pub const HAIRPIN_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x50];
/// A backend with a route but no neighbour entry.
pub const WEB_UNRESOLVED: [u8; 4] = [198, 19, 0, 14];

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
pub const FRONT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xaa, 0x01];
pub const BACK_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xbb, 0x01];
pub const WEB_MACS: [[u8; 6]; 3] = [
    [0x02, 0, 0, 0, 1, 0x11],
    [0x02, 0, 0, 0, 1, 0x12],
    [0x02, 0, 0, 0, 1, 0x13],
];

/// A config for the test namespace's interfaces (NAT by default, 65,536
/// flows) with `services`.
pub fn config_with(services: Vec<Service>) -> Config {
    Config {
        firewall: Default::default(),
        dataplane: Dataplane {
            interfaces: vec!["f0".into(), "b0".into()],
            forwarding: Forwarding::Nat,
            xdp_mode: XdpMode::Native,
            conntrack_size: 65536,
            half_open_size: lb_common::DEFAULT_HALF_OPEN_SIZE,
            new_flow_budget: 125_000,
            timeouts: Default::default(),
        },
        monitoring: None,
        services,
    }
}

/// A namespace with a front (f0) and back (b0) interface, routes, static
/// neighbours for the client and web1..3, and forwarding on. Deleted on drop.
pub struct TestNet {
    ns: Netns,
}

impl TestNet {
    pub fn new() -> Self {
        assert!(
            rustix::process::geteuid().is_root(),
            "the kernel tier needs root (BPF_PROG_TEST_RUN, network namespaces): run `cargo xtask test` as root"
        );
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "lbk{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        Self::build(&name).unwrap_or_else(|e| panic!("building the test namespace: {e:#}"))
    }

    fn build(name: &str) -> anyhow::Result<Self> {
        let ns = Netns::create(name)?;
        let n = ns.name();
        for (dev, peer, mac, addr) in [
            ("f0", "f1", FRONT_MAC, "198.18.0.1/24"),
            ("b0", "b1", BACK_MAC, "198.19.0.1/24"),
        ] {
            netns::add_veth(&VethEnd::new(n, dev).mac(mac), &VethEnd::new(n, peer))?;
            netns::add_addr(n, dev, addr)?;
        }
        let ip = |a: [u8; 4]| std::net::Ipv4Addr::from(a);
        netns::add_neighbours(
            n,
            "f0",
            &[(ip(CLIENT), CLIENT_MAC), (ip(HAIRPIN_BACKEND), HAIRPIN_MAC)],
        )?;
        let webs: Vec<_> = WEBS.iter().map(|a| ip(*a)).zip(WEB_MACS).collect();
        netns::add_neighbours(n, "b0", &webs)?;
        netns::sysctl(n, "net/ipv4/ip_forward", "1")?;
        Ok(TestNet { ns })
    }

    /// Runs `f` on a thread that has joined this namespace.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        self.ns.run(f).expect("joining the test namespace")
    }
}

impl Default for TestNet {
    fn default() -> Self {
        Self::new()
    }
}
