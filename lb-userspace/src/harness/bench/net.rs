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
    parse_config(
        mode,
        sizes,
        dataplane,
        &service_toml("bench", &format!("{VIP}:{PORT}"), protocol, &list),
    )
}

/// The benchmark's config: `services` (TOML) behind `lbin` in `mode`.
fn parse_config(
    mode: Forwarding,
    sizes: TableSizes,
    dataplane: &str,
    services: &str,
) -> anyhow::Result<Config> {
    let toml = format!(
        "[dataplane]\ninterfaces = [\"lbin\"]\nforwarding = \"{}\"\nxdp-mode = \"native\"\n\
         conntrack-size = {}\nhalf-open-size = {}\n{dataplane}\n{services}",
        mode.name(),
        sizes.conntrack,
        sizes.half_open,
    );
    Ok(config::parse(&toml, Path::new("bench.toml"))?)
}

/// One `[[service]]` table of the benchmark's configs.
fn service_toml(name: &str, vip: &str, protocol: &str, backends: &[String]) -> String {
    format!(
        "[[service]]\nname = \"{name}\"\nvip = \"{vip}\"\nprotocol = \"{protocol}\"\n\
         scheduler = \"round-robin\"\nbackends = [ {} ]\n",
        backends.join(", ")
    )
}

/// The benchmark's dual-stack config (issue 24's rows): [`lb_config`]'s
/// UDP service on [`VIP`] and its twin `bench6` on [`VIP6`] with as many
/// IPv6 backends ([`backend_addr6`]), flow tables of `sizes`: one data
/// plane carries both families, as a dual-stack deployment's does, so the
/// IPv6 rows and the IPv4 rows they are compared with run the same
/// programs over the same maps.
pub fn lb_config_dual(
    mode: Forwarding,
    backends: usize,
    sizes: TableSizes,
) -> anyhow::Result<Config> {
    let list = |v6: bool| -> Vec<String> {
        (0..backends)
            .map(|i| {
                let (addr, name) = if v6 {
                    (format!("[{}]", backend_addr6(i)), format!("b6-{i}"))
                } else {
                    (backend_addr(i).to_string(), format!("b{i}"))
                };
                format!("{{ address = \"{addr}:{PORT}\", name = \"{name}\" }}")
            })
            .collect()
    };
    let services = service_toml("bench", &format!("{VIP}:{PORT}"), "udp", &list(false))
        + &service_toml("bench6", &format!("[{VIP6}]:{PORT}"), "udp", &list(true));
    parse_config(mode, sizes, "", &services)
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

    /// Issue 24's IPv6 rows: IPv6 on `lbin` and `lbout` only (the
    /// generator's and the sink's ends stay IPv4-only, so the kernel sends
    /// the sink nothing of its own), forwarding on (`bpf_fib_lookup` with
    /// AF_INET6 needs it), 2001:db8:18::1/64 in front, 2001:db8:19::1/48
    /// behind, and `backends` IPv6 backends ([`backend_addr6`]) resolving
    /// to `sink0`, as the IPv4 ones do.
    pub fn enable_ipv6(&self, backends: usize) -> anyhow::Result<()> {
        let n = self.ns.name();
        for dev in ["lbin", "lbout"] {
            // No link-local address: nothing to announce or defend. The
            // MLD reports of the groups IPv6 joins (the kernel's only
            // frames here; the sink would count them) go out within a few
            // milliseconds instead of over the next second.
            for (key, value) in [
                ("addr_gen_mode", "1"),
                ("mldv1_unsolicited_report_interval", "1"),
                ("mldv2_unsolicited_report_interval", "1"),
                ("disable_ipv6", "0"),
            ] {
                netns::sysctl(n, &format!("net/ipv6/conf/{dev}/{key}"), value)?;
            }
        }
        netns::sysctl(n, "net/ipv6/conf/all/forwarding", "1")?;
        for (dev, cidr) in [
            ("lbin", "2001:db8:18::1/64"),
            ("lbout", "2001:db8:19::1/48"),
        ] {
            netns::ip(n, &["-6", "addr", "add", cidr, "dev", dev, "nodad"])
                .with_context(|| format!("adding {cidr} to {dev}"))?;
        }
        let neighbours: Vec<(std::net::Ipv6Addr, [u8; 6])> = (0..backends)
            .map(|i| (backend_addr6(i), SINK_MAC))
            .collect();
        netns::add_neighbours(n, "lbout", &neighbours)?;
        // Let those reports (and their retransmission) pass before any
        // measurement counts at the sink.
        std::thread::sleep(Duration::from_millis(200));
        Ok(())
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

/// The first UDP datagrams of `count` distinct flows, all new to a data
/// plane that has seen no earlier `batch`: from 10.100.0.0 + `batch`
/// (IPv4) or 2001:db8:100::`batch` (IPv6, [`Family::V6`]), ports 1024
/// upwards. At most 50 000 per batch, so batches never share a flow.
pub(super) fn new_flows_of(
    family: Family,
    batch: u32,
    count: usize,
) -> anyhow::Result<Vec<Vec<u8>>> {
    anyhow::ensure!(
        count <= NEW_FLOWS_PER_BATCH,
        "{count} new flows in one batch (at most {NEW_FLOWS_PER_BATCH})"
    );
    (0..count)
        .map(|i| {
            let port = 1024 + i as u16;
            match family {
                Family::V4 => {
                    let addr = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 100, 0, 0)) + batch);
                    frame_from(SocketAddrV4::new(addr, port))
                }
                Family::V6 => {
                    let base = std::net::Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 0);
                    let addr = std::net::Ipv6Addr::from(u128::from(base) + u128::from(batch));
                    frame6_to(std::net::SocketAddrV6::new(addr, port, 0, 0), PORT)
                }
            }
        })
        .collect()
}

/// The most flows [`new_flows_of`] makes in one batch.
pub(super) const NEW_FLOWS_PER_BATCH: usize = 50_000;

/// The address family of a benchmark row's traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Family {
    V4,
    V6,
}

impl Family {
    /// The established flow's frame: from [`CLIENT`]:1024 or [`CLIENT6`]:1024.
    pub(super) fn established_frame(self) -> anyhow::Result<Vec<u8>> {
        match self {
            Family::V4 => frame_from(SocketAddrV4::new(CLIENT, 1024)),
            Family::V6 => frame6_to(std::net::SocketAddrV6::new(CLIENT6, 1024, 0, 0), PORT),
        }
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
