//! The benchmark's network: the generator → middle hop → sink topology in
//! one namespace ([`BenchNet`]), its addresses, the `lb` config it runs, the
//! generator's traffic, and removing it all on a signal.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
    time::Duration,
};

use anyhow::Context;

use crate::{
    config::{self, Config, Forwarding},
    dataplane::TableSizes,
    harness::{
        netns::{self, Netns, VethEnd},
        pktgen::{self, FlowDist, FrameSpec, Limit, Proto, Spec},
    },
};

/// The benchmark topology's addresses (`BenchNet`, `generator_spec`).
pub const GEN_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x0c, 0x01];

pub const LBIN_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x0c, 0x02];

pub(super) const LBOUT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x0d, 0x01];

pub(super) const SINK_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x0d, 0x02];

pub const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);

pub const PORT: u16 = 5353;

pub const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);

/// Flow-table sizes for the sweeps: twice the largest flow count in both
/// tables. The generator sends each flow's packets a whole round apart, so
/// a flow's second packet (the one that establishes it) comes after every
/// other flow's first: the half-open table must hold them all, or every
/// packet would be a new flow. 1 000 000 flows then measure a full
/// established table.
pub(super) const CONNTRACK: TableSizes = TableSizes {
    conntrack: 2_097_152,
    half_open: 2_097_152,
};

/// Backend `i` (0-based): 198.19.(1 + i / 250).(1 + i % 250).
pub fn backend_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, 1 + (i / 250) as u8, 1 + (i % 250) as u8)
}

/// The benchmark's `lb` config: one UDP service with `backends` backends.
pub fn lb_config(mode: Forwarding, backends: usize) -> anyhow::Result<Config> {
    lb_config_for(mode, backends, "udp", CONNTRACK, "")
}

/// The benchmark's `lb` config with one `protocol` service, flow tables of
/// `sizes`, and `dataplane` lines added to its `[dataplane]` table.
pub(super) fn lb_config_for(
    mode: Forwarding,
    backends: usize,
    protocol: &str,
    sizes: TableSizes,
    dataplane: &str,
) -> anyhow::Result<Config> {
    let list: Vec<String> = (0..backends)
        .map(|i| {
            format!(
                "{{ address = \"{}:{PORT}\", name = \"b{i}\" }}",
                backend_addr(i)
            )
        })
        .collect();
    let forwarding = mode.name();
    let toml = format!(
        "[dataplane]\ninterfaces = [\"lbin\"]\nforwarding = \"{forwarding}\"\nxdp-mode = \"native\"\n\
         conntrack-size = {}\nhalf-open-size = {}\n{dataplane}\n[[service]]\nname = \"bench\"\nvip = \"{VIP}:{PORT}\"\n\
         protocol = \"{protocol}\"\nscheduler = \"round-robin\"\nbackends = [ {} ]\n",
        sizes.conntrack,
        sizes.half_open,
        list.join(", ")
    );
    Ok(config::parse(&toml, Path::new("bench.toml"))?)
}

/// The generator → lb → sink topology, in one namespace deleted on drop
/// (also on error and panic): `gen0` ↔ `lbin` … `lbout` ↔ `sink0`, with
/// `backends` backends (`backend_addr`) resolving to `sink0` out of
/// `lbout`, and `queues` queues per veth. The benchmark and the pktgen
/// smoke test both run on it.
pub struct BenchNet {
    ns: Netns,
}

impl BenchNet {
    pub fn new(name: &str, backends: usize, queues: usize) -> anyhow::Result<BenchNet> {
        let ns = Netns::create(name)?;
        let n = ns.name();
        for key in [
            "net/ipv6/conf/all/disable_ipv6",
            "net/ipv6/conf/default/disable_ipv6",
            "net/ipv4/ip_forward",
        ] {
            netns::sysctl(n, key, "1")?;
        }
        for (dev, mac, peer, peer_mac) in [
            ("gen0", GEN_MAC, "lbin", LBIN_MAC),
            ("lbout", LBOUT_MAC, "sink0", SINK_MAC),
        ] {
            netns::add_veth(
                &VethEnd::new(n, dev).mac(mac).queues(queues),
                &VethEnd::new(n, peer).mac(peer_mac).queues(queues),
            )?;
        }
        netns::add_addr(n, "lbin", "198.18.0.1/24")?;
        netns::add_addr(n, "lbout", "198.19.0.1/16")?;
        let neighbours: Vec<(Ipv4Addr, [u8; 6])> =
            (0..backends).map(|i| (backend_addr(i), SINK_MAC)).collect();
        netns::add_neighbours(n, "lbout", &neighbours)?;
        Ok(BenchNet { ns })
    }

    /// Runs `f` on a thread that has joined this namespace.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> anyhow::Result<T> + Send) -> anyhow::Result<T> {
        self.ns.run(f)?
    }
}

/// The benchmark's namespace: one per process.
pub(super) fn bench_netns() -> String {
    format!("lbp{}-bench", std::process::id())
}

/// On Ctrl-C or SIGTERM, remove the benchmark's namespace and the HTTP
/// lab before exiting: `exit` skips the guards' Drop, so the handler does it.
pub(super) fn cleanup_on_signal() -> anyhow::Result<()> {
    use signal_hook::{
        consts::{SIGHUP, SIGINT, SIGTERM},
        iterator::Signals,
    };
    let mut signals =
        Signals::new([SIGINT, SIGTERM, SIGHUP]).context("installing signal handlers")?;
    let pid = std::process::id();
    std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            eprintln!("bench: interrupted (signal {sig}), removing its namespaces");
            if netns::exists(&bench_netns()) {
                let _ = netns::delete_namespace(&bench_netns());
            }
            if let Err(e) = crate::harness::lab::down(&format!("lbp{pid}h")) {
                eprintln!("bench: removing the HTTP lab failed: {e:#}");
            }
            std::process::exit(128 + sig);
        }
    });
    Ok(())
}

/// The generator's traffic on `BenchNet`: 64-byte UDP from CLIENT:1024..
/// to VIP:PORT, `flows` flows, for `seconds`.
pub fn generator_spec(gen0: u32, flows: u32, seconds: f64, threads: usize) -> Spec {
    Spec {
        ifindex: gen0,
        frame: FrameSpec {
            dst_mac: LBIN_MAC,
            src_mac: GEN_MAC,
            src: SocketAddrV4::new(CLIENT, 1024).into(),
            dst: SocketAddrV4::new(VIP, PORT).into(),
            proto: Proto::Udp,
            size: 64,
        },
        flows,
        dist: FlowDist::Uniform,
        limit: Limit::Duration(Duration::from_secs_f64(seconds)),
        rate: None,
        threads,
        fresh_frames: false,
    }
}

pub(super) fn frame_from(src: SocketAddrV4) -> anyhow::Result<Vec<u8>> {
    frame_to(src, PORT)
}

/// A 64-byte UDP frame from `src` to the VIP's `port`.
pub(super) fn frame_to(src: SocketAddrV4, port: u16) -> anyhow::Result<Vec<u8>> {
    pktgen::build_frame(&FrameSpec {
        dst_mac: LBIN_MAC,
        src_mac: GEN_MAC,
        src: src.into(),
        dst: SocketAddrV4::new(VIP, port).into(),
        proto: Proto::Udp,
        size: 64,
    })
}

/// `count` frames of distinct flows, from 10.(100 + tag).0.0 upwards.
pub(super) fn new_flow_frames(tag: u8, count: usize) -> anyhow::Result<Vec<Vec<u8>>> {
    let base = u32::from(Ipv4Addr::new(10, 100u8.wrapping_add(tag), 0, 0));
    (0..count)
        .map(|i| {
            let addr = Ipv4Addr::from(base + (i / 50_000) as u32);
            frame_from(SocketAddrV4::new(addr, 1024 + (i % 50_000) as u16))
        })
        .collect()
}

// IPv6 on the same topology (the `lb bench` IPv6 rows): the addresses, in
// the documentation prefix 2001:db8::/32, mirror the IPv4 ones.

/// The IPv6 VIP, beside [`VIP`].
pub const VIP6: std::net::Ipv6Addr = std::net::Ipv6Addr::new(0x2001, 0xdb8, 0x18, 0, 0, 0, 0, 0x10);

/// The generator's first IPv6 source, beside [`CLIENT`] (flows vary its
/// low 32 bits).
pub const CLIENT6: std::net::Ipv6Addr =
    std::net::Ipv6Addr::new(0x2001, 0xdb8, 0x18, 0, 0, 0, 0, 0x100);

/// IPv6 backend `i` (0-based): 2001:db8:19:1::(i + 1), beside [`backend_addr`].
pub fn backend_addr6(i: usize) -> std::net::Ipv6Addr {
    std::net::Ipv6Addr::from(
        u128::from(std::net::Ipv6Addr::new(0x2001, 0xdb8, 0x19, 1, 0, 0, 0, 0)) + i as u128 + 1,
    )
}

/// [`generator_spec`] over IPv6: 64-byte UDP from [CLIENT6]:1024.. to
/// [VIP6]:PORT.
pub fn generator_spec_v6(gen0: u32, flows: u32, seconds: f64, threads: usize) -> Spec {
    let spec = generator_spec(gen0, flows, seconds, threads);
    Spec {
        frame: FrameSpec {
            src: (CLIENT6, 1024).into(),
            dst: (VIP6, PORT).into(),
            ..spec.frame
        },
        ..spec
    }
}

/// [`frame_to`] over IPv6: a 64-byte UDP frame from `src` to [VIP6]:`port`.
pub fn frame6_to(src: std::net::SocketAddrV6, port: u16) -> anyhow::Result<Vec<u8>> {
    pktgen::build_frame(&FrameSpec {
        dst_mac: LBIN_MAC,
        src_mac: GEN_MAC,
        src: src.into(),
        dst: (VIP6, port).into(),
        proto: Proto::Udp,
        size: 64,
    })
}
