//! Smoke test of `lb pktgen` through the real data plane: the XDP generator
//! transmits on `gen0`; its veth peer `lbin` runs `lb` (NAT, one UDP service,
//! three backends); `lb` forwards out of `lbout`, whose peer `sink0` runs the
//! counting `sink`. Every interface lives in one throwaway namespace
//! (`lbp{pid}-N`), deleted on drop, so no traffic leaves it.
//!
//! Needs root and BPF; without them the test fails loudly.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use aya::{maps::PerCpuArray, programs::XdpMode as AyaXdpMode};
use lb_common::{Counters, Verdict};
use lb_userspace::{
    config::{self, Config, XdpMode},
    dataplane::Dataplane,
    pktgen::{self, FrameSpec, Limit, Proto, Spec},
};

const GEN_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x0a, 0x01];
const LBIN_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x0a, 0x02];
const LBOUT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x0b, 0x01];
const SINK_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x0b, 0x02];
const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
const BACKENDS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(198, 19, 0, 11),
    Ipv4Addr::new(198, 19, 0, 12),
    Ipv4Addr::new(198, 19, 0, 13),
];
const FRAMES: u64 = 5000;
const FLOWS: u32 = 16;

fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("spawn");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The namespace; deleted on drop (also when the test panics).
struct Netns {
    name: String,
}

impl Netns {
    fn new() -> Self {
        assert!(
            unsafe { libc::geteuid() } == 0,
            "the pktgen smoke test needs root (BPF_PROG_RUN, XDP, network namespaces): run `cargo xtask test` as root"
        );
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "lbp{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        sh(&["ip", "netns", "add", &name]);
        let ns = Netns { name };
        let n = ns.name.as_str();
        sh(&["ip", "-n", n, "link", "set", "lo", "up"]);
        // No IPv6 autoconfiguration chatter: the sink must count only ours.
        for key in [
            "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.default.disable_ipv6=1",
        ] {
            sh(&["ip", "netns", "exec", n, "sysctl", "-qw", key]);
        }
        for (dev, mac, peer, peer_mac) in [
            ("gen0", GEN_MAC, "lbin", LBIN_MAC),
            ("lbout", LBOUT_MAC, "sink0", SINK_MAC),
        ] {
            sh(&[
                "ip",
                "-n",
                n,
                "link",
                "add",
                dev,
                "address",
                &pktgen::mac_text(mac),
                "numtxqueues",
                "2",
                "numrxqueues",
                "2",
                "type",
                "veth",
                "peer",
                "name",
                peer,
                "address",
                &pktgen::mac_text(peer_mac),
                "numtxqueues",
                "2",
                "numrxqueues",
                "2",
            ]);
            sh(&["ip", "-n", n, "link", "set", dev, "up"]);
            sh(&["ip", "-n", n, "link", "set", peer, "up"]);
        }
        sh(&["ip", "-n", n, "addr", "add", "198.18.0.1/24", "dev", "lbin"]);
        sh(&[
            "ip",
            "-n",
            n,
            "addr",
            "add",
            "198.19.0.1/24",
            "dev",
            "lbout",
        ]);
        for b in BACKENDS {
            sh(&[
                "ip",
                "-n",
                n,
                "neigh",
                "replace",
                &b.to_string(),
                "lladdr",
                &pktgen::mac_text(SINK_MAC),
                "dev",
                "lbout",
                "nud",
                "permanent",
            ]);
        }
        sh(&[
            "ip",
            "-n",
            n,
            "neigh",
            "replace",
            &CLIENT.to_string(),
            "lladdr",
            &pktgen::mac_text(GEN_MAC),
            "dev",
            "lbin",
            "nud",
            "permanent",
        ]);
        sh(&[
            "ip",
            "netns",
            "exec",
            n,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ]);
        ns
    }

    /// Runs `f` on a thread that has joined this namespace.
    fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        lb_userspace::lab::in_netns(&self.name, f).expect("joining the test namespace")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Built from TOML so the config schema's defaults apply.
fn smoke_config() -> Config {
    let backends: Vec<String> = BACKENDS
        .iter()
        .enumerate()
        .map(|(i, ip)| format!("{{ address = \"{ip}:5353\", name = \"web{}\" }}", i + 1))
        .collect();
    let toml = format!(
        "[dataplane]\ninterfaces = [\"lbin\", \"lbout\"]\nforwarding = \"nat\"\nxdp-mode = \"native\"\nconntrack-size = 65536\n\n\
         [[service]]\nname = \"udp\"\nvip = \"{VIP}:5353\"\nprotocol = \"udp\"\nscheduler = \"round-robin\"\nbackends = [ {} ]\n",
        backends.join(", ")
    );
    config::parse(&toml, Path::new("pktgen-smoke.toml")).expect("smoke-test config")
}

fn sink_packets(dp: &mut Dataplane) -> u64 {
    let map = dp.ebpf().map("SINK_STATS").expect("SINK_STATS map");
    let map: PerCpuArray<_, Counters> = PerCpuArray::try_from(map).expect("SINK_STATS");
    map.get(&0, 0)
        .expect("read SINK_STATS")
        .iter()
        .map(|c| c.packets)
        .sum()
}

fn forwarded(dp: &Dataplane) -> u64 {
    dp.verdicts()
        .expect("verdicts")
        .into_iter()
        .find(|(v, _)| *v == Verdict::Forwarded)
        .map(|(_, n)| n)
        .expect("forwarded counter")
}

/// `ethtool -S` of the veths (xdp_xmit_errors: a full veth ring), for failures.
fn veth_stats() -> String {
    ["gen0", "lbin", "lbout", "sink0"]
        .iter()
        .map(|d| {
            let out = Command::new("ethtool")
                .args(["-S", d])
                .output()
                .map(|o| o.stdout)
                .unwrap_or_default();
            let nonzero: Vec<String> = String::from_utf8_lossy(&out)
                .lines()
                .filter(|l| !l.ends_with(": 0"))
                .map(|l| l.trim().to_string())
                .collect();
            format!("\n{d}: {}", nonzero.join(", "))
        })
        .collect()
}

#[test]
fn pktgen_through_lb_reaches_the_sink() {
    let ns = Netns::new();
    ns.run(|| {
        let cfg = smoke_config();
        let mut dp = Dataplane::load(cfg.dataplane.conntrack_size)
            .expect("load the lb object (built by cargo xtask build)");
        dp.apply(&cfg).expect("apply config");
        dp.attach("lbin", XdpMode::Native)
            .expect("attach lb to lbin");
        dp.attach("lbout", XdpMode::Native)
            .expect("attach lb to lbout");
        let _sink_link = pktgen::xdp_program(dp.ebpf(), "sink")
            .expect("sink program")
            .attach("sink0", AyaXdpMode::Driver)
            .expect("attach sink to sink0");
        let before = forwarded(&dp);
        assert_eq!(sink_packets(&mut dp), 0);

        let spec = Spec {
            ifindex: pktgen::ifindex("gen0").expect("gen0"),
            frame: FrameSpec {
                dst_mac: LBIN_MAC,
                src_mac: pktgen::if_mac("gen0").expect("gen0 mac"),
                src: SocketAddrV4::new(CLIENT, 1024),
                dst: SocketAddrV4::new(VIP, 5353),
                proto: Proto::Udp,
                size: 64,
            },
            flows: FLOWS,
            limit: Limit::Count(FRAMES),
            // Paced, so a busy machine cannot overflow a veth ring (256
            // frames); two queues per veth give each sending CPU its own ring.
            rate: Some(50_000),
            threads: 2,
            // `lb` rewrites frames in place; they must not be reused.
            fresh_frames: false,
        };
        assert_eq!(spec.frame.src_mac, GEN_MAC);
        let summary = pktgen::generate(dp.ebpf(), &spec).expect("pktgen");
        assert_eq!(summary.frames, FRAMES);

        let deadline = Instant::now() + Duration::from_secs(2);
        let mut got = sink_packets(&mut dp);
        while got < FRAMES && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
            got = sink_packets(&mut dp);
        }
        let verdicts: Vec<(Verdict, u64)> = dp
            .verdicts()
            .expect("verdicts")
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .collect();
        let diag = if got == FRAMES {
            String::new()
        } else {
            veth_stats()
        };
        assert_eq!(
            got, FRAMES,
            "frames counted by the sink (lb verdicts: {verdicts:?}){diag}"
        );
        assert_eq!(forwarded(&dp) - before, FRAMES, "lb `forwarded` verdicts");
        let per_backend: u64 = (0..3)
            .map(|id| {
                dp.counters("BACKEND_STATS", id)
                    .expect("backend counters")
                    .packets
            })
            .sum();
        assert_eq!(per_backend, FRAMES, "backend counters");
    });
}
