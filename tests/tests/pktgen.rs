//! Smoke test of `lb pktgen` through the real data plane, on the benchmark's
//! own topology (`lb_userspace::harness::bench::BenchNet`): the XDP generator
//! transmits on `gen0`; its veth peer `lbin` runs `lb` (NAT, one UDP service,
//! three backends); `lb` forwards out of `lbout`, whose peer `sink0` runs the
//! counting `sink` (the generator and the sink from the harness's bench
//! object, `lb` from the data plane's). Everything lives in one throwaway namespace
//! (`lbp{pid}-smoke`), deleted on drop, so no traffic leaves it.
//!
//! Needs root and BPF; without them the test fails loudly.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use aya::programs::XdpMode as AyaXdpMode;
use lb_common::Verdict;
use lb_userspace::{
    config::{Forwarding, XdpMode},
    dataplane::Dataplane,
    harness::{
        bench::{self, BenchNet},
        load_bench_object,
        pktgen::{self, Limit, Spec},
        xdp,
    },
};

const FRAMES: u64 = 5000;
const FLOWS: u32 = 16;
const BACKENDS: usize = 3;

fn sink_packets(tools: &aya::Ebpf) -> u64 {
    bench::sink_packets(tools).expect("read SINK_STATS")
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
    assert!(
        rustix::process::geteuid().is_root(),
        "the pktgen smoke test needs root (BPF_PROG_RUN, XDP, network namespaces): run `cargo xtask test` as root"
    );
    // Two queues per veth give each sending CPU its own ring.
    let net = BenchNet::new(&format!("lbp{}-smoke", std::process::id()), BACKENDS, 2)
        .expect("benchmark topology");
    net.run(|| -> anyhow::Result<()> {
        let mut cfg = bench::lb_config(Forwarding::Nat, BACKENDS).expect("config");
        // The benchmark's table is sized for 1M flows; 16 need far less.
        cfg.dataplane.conntrack_size = 65536;
        let mut dp = Dataplane::load(&cfg.dataplane)
            .expect("load the lb object (built by cargo xtask build)");
        dp.apply(&cfg).expect("apply config");
        dp.attach("lbin", XdpMode::Native)
            .expect("attach lb to lbin");
        let mut tools = load_bench_object().expect("load the bench object");
        let _sink_link = xdp::xdp_program(&mut tools, "sink")
            .expect("sink program")
            .attach("sink0", AyaXdpMode::Driver)
            .expect("attach sink to sink0");
        let before = forwarded(&dp);
        assert_eq!(sink_packets(&tools), 0);
        assert_eq!(xdp::if_mac("gen0").expect("gen0 mac"), bench::GEN_MAC);

        let gen0 = xdp::ifindex("gen0").expect("gen0");
        let spec = Spec {
            limit: Limit::Count(FRAMES),
            // Paced, so a busy machine cannot overflow a veth ring (256 frames).
            rate: Some(50_000),
            // `lb` rewrites frames in place: the generator's template restore
            // is what keeps reused frames valid, so do reuse them.
            ..bench::generator_spec(gen0, FLOWS, 0.0, 2)
        };
        assert!(!spec.fresh_frames);
        let summary = pktgen::generate(&mut tools, &spec).expect("pktgen");
        assert_eq!(summary.frames, FRAMES);

        let deadline = Instant::now() + Duration::from_secs(2);
        let mut got = sink_packets(&tools);
        while got < FRAMES && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
            got = sink_packets(&tools);
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
        let per_backend: u64 = (0..BACKENDS as u32)
            .map(|id| {
                dp.counters(lb_common::map_names::MapName::BACKEND_STATS, id)
                    .expect("backend counters")
                    .packets
            })
            .sum();
        assert_eq!(per_backend, FRAMES, "backend counters");
        Ok(())
    })
    .expect("smoke test");
}

/// Rows of `/proc/thread-self/net/{file}` (this thread's namespace: the
/// process-wide `/proc/net` follows the main thread's).
fn proc_net(file: &str) -> String {
    std::fs::read_to_string(format!("/proc/thread-self/net/{file}"))
        .unwrap_or_else(|e| panic!("reading /proc/thread-self/net/{file}: {e}"))
}

/// A counter of `/proc/net/snmp6` ("Udp6InCsumErrors 0").
fn snmp6(name: &str) -> u64 {
    proc_net("snmp6")
        .lines()
        .find_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some(name)).then(|| words.next()?.parse().ok())?
        })
        .unwrap_or_else(|| panic!("{name} missing from snmp6"))
}

/// A counter of `/proc/net/snmp`'s `Tcp:` rows (IPv4 and IPv6 together).
fn tcp_snmp(name: &str) -> u64 {
    let snmp = proc_net("snmp");
    let rows: Vec<&str> = snmp.lines().filter(|l| l.starts_with("Tcp:")).collect();
    let names: Vec<&str> = rows[0].split_whitespace().collect();
    let values: Vec<&str> = rows[1].split_whitespace().collect();
    let i = names.iter().position(|n| *n == name).expect("counter");
    values[i].parse().expect("number")
}

/// The generator's IPv6 frames, through a real IPv6 stack: `lbin` (the
/// benchmark topology's, without `lb`) takes the IPv6 VIP and a UDP
/// socket and a TCP listener on it. Every UDP frame is delivered (the
/// kernel drops a UDP datagram with a bad IPv6 checksum, and counts it),
/// from each of the flows (the source's low 32 bits and port vary), every
/// SYN opens a request on the listener (a bad TCP checksum is dropped and
/// counted), and every ACK after it is answered with a reset.
#[test]
fn pktgen_ipv6_frames_reach_a_real_stack_with_valid_checksums() {
    use std::{
        collections::BTreeSet,
        net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener, UdpSocket},
    };

    use lb_userspace::harness::netns;

    assert!(
        rustix::process::geteuid().is_root(),
        "the pktgen IPv6 test needs root (BPF_PROG_RUN, network namespaces): run `cargo xtask test` as root"
    );
    const V6_FRAMES: u64 = 1000;
    // From port 65530: 6 ports per address, so 16 flows span 3 addresses.
    const V6_FLOWS: u32 = 16;
    const SPORT: u16 = 65530;
    let name = format!("lbp{}-smoke6", std::process::id());
    let net = BenchNet::new(&name, 0, 1).expect("benchmark topology");
    net.run(|| -> anyhow::Result<()> {
        // BenchNet turns IPv6 off; lbin gets it back, with the VIP6.
        netns::sysctl(&name, "net/ipv6/conf/lbin/disable_ipv6", "0")?;
        let vip6 = format!("{}/64", bench::VIP6);
        netns::ns_run(
            &name,
            &["ip", "-6", "addr", "add", &vip6, "dev", "lbin", "nodad"],
        )?;
        // lbin has no XDP program: GRO gives it the NAPI that frames
        // redirected into its peer need.
        netns::tune_veth(&name, "lbin")?;
        let udp = UdpSocket::bind(SocketAddr::new(bench::VIP6.into(), bench::PORT))?;
        udp.set_read_timeout(Some(Duration::from_millis(200)))?;
        let tcp = TcpListener::bind(SocketAddr::new(bench::VIP6.into(), bench::PORT))?;
        let csum_errors = snmp6("Udp6InCsumErrors");
        let tcp_csum_errors = tcp_snmp("InCsumErrors");

        let mut tools = load_bench_object()?;
        let gen0 = xdp::ifindex("gen0")?;
        let base = bench::generator_spec_v6(gen0, V6_FLOWS, 0.0, 1);
        let mut frame = base.frame;
        frame.src.set_port(SPORT);
        let spec = Spec {
            frame,
            limit: Limit::Count(V6_FRAMES),
            // Paced, so the socket's buffer keeps up with its reader.
            rate: Some(5_000),
            ..base
        };
        let sources: BTreeSet<SocketAddr> = std::thread::scope(|s| {
            let reader = s.spawn(|| {
                let mut seen = Vec::new();
                let mut buf = [0u8; 2048];
                while let Ok((n, from)) = udp.recv_from(&mut buf) {
                    assert_eq!(n, 64 - 14 - 40 - 8, "payload of a 64-byte frame");
                    seen.push(from);
                }
                seen
            });
            let summary = pktgen::generate(&mut tools, &spec).expect("pktgen");
            assert_eq!(summary.frames, V6_FRAMES);
            let seen = reader.join().expect("reader");
            assert_eq!(
                seen.len() as u64,
                V6_FRAMES,
                "UDP datagrams received (Udp6InCsumErrors {}){}",
                snmp6("Udp6InCsumErrors") - csum_errors,
                veth_stats()
            );
            seen.into_iter().collect()
        });
        assert_eq!(snmp6("Udp6InCsumErrors"), csum_errors);
        assert_eq!(sources.len(), V6_FLOWS as usize, "{sources:?}");
        let client = u128::from(bench::CLIENT6);
        for (i, src) in sources.iter().enumerate() {
            let IpAddr::V6(ip) = src.ip() else {
                panic!("{src} is not IPv6")
            };
            // Flow i: address CLIENT6 + i / 6, port 65530 + i % 6.
            let want: Ipv6Addr = (client + i as u128 / 6).into();
            assert_eq!((ip, src.port()), (want, SPORT + (i % 6) as u16), "flow {i}");
        }

        // SYNs: each flow's opens a request on the listener (SYN_RECV).
        let syn = Spec {
            frame: pktgen::FrameSpec {
                proto: pktgen::Proto::TcpSyn,
                size: 74,
                ..spec.frame
            },
            limit: Limit::Count(u64::from(V6_FLOWS)),
            ..spec.clone()
        };
        pktgen::generate(&mut tools, &syn).expect("pktgen SYNs");
        let port = format!("{:04X}", bench::PORT);
        let deadline = Instant::now() + Duration::from_secs(2);
        let syn_recv = || {
            proc_net("tcp6")
                .lines()
                .skip(1)
                .filter(|l| {
                    let w: Vec<&str> = l.split_whitespace().collect();
                    w[1].ends_with(&format!(":{port}")) && w[3] == "03"
                })
                .count()
        };
        while syn_recv() < V6_FLOWS as usize && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(
            syn_recv(),
            V6_FLOWS as usize,
            "SYN_RECV requests (TCP InCsumErrors {})",
            tcp_snmp("InCsumErrors") - tcp_csum_errors
        );
        assert_eq!(tcp_snmp("InCsumErrors"), tcp_csum_errors);

        // The handshake's ACK (what an established flow's frames are, to a
        // load balancer): each flow's meets its request, whose server
        // sequence it cannot know (ack 1), and the stack answers it with a
        // reset, which it only does for a segment whose checksum held.
        let resets = tcp_snmp("OutRsts");
        let ack = Spec {
            frame: pktgen::FrameSpec {
                proto: pktgen::Proto::TcpAck,
                ..syn.frame
            },
            ..syn.clone()
        };
        pktgen::generate(&mut tools, &ack).expect("pktgen ACKs");
        let deadline = Instant::now() + Duration::from_secs(2);
        while tcp_snmp("OutRsts") - resets < u64::from(V6_FLOWS) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(
            tcp_snmp("OutRsts") - resets,
            u64::from(V6_FLOWS),
            "resets to the IPv6 ACKs (TCP InCsumErrors {})",
            tcp_snmp("InCsumErrors") - tcp_csum_errors
        );
        assert_eq!(tcp_snmp("InCsumErrors"), tcp_csum_errors);
        drop(tcp);
        Ok(())
    })
    .expect("IPv6 smoke test");
}

/// Issue 24's throughput rows on the benchmark's topology made dual-stack
/// (`BenchNet::enable_ipv6`): the generator's IPv6 frames cross the IPv6
/// ceiling (`bare_fwd6`) to the sink, IPv4 frames do not (it forwards IPv6
/// only), and `lb` on the dual-stack config (`bench::lb_config_dual`)
/// forwards every IPv6 frame of every flow to the sink in NAT66 and DSR,
/// counted `forwarded` and by its IPv6 backends only.
#[test]
fn ipv6_frames_cross_bare_fwd6_and_lb_to_the_sink() {
    use lb_common::FwdConf;
    use lb_userspace::dataplane::TableSizes;

    assert!(
        rustix::process::geteuid().is_root(),
        "the pktgen IPv6 forwarding test needs root (BPF_PROG_RUN, XDP, network namespaces): run `cargo xtask test` as root"
    );
    let net = BenchNet::new(&format!("lbp{}-fwd6", std::process::id()), BACKENDS, 2)
        .expect("benchmark topology");
    net.enable_ipv6(BACKENDS).expect("IPv6 on the topology");
    net.run(|| -> anyhow::Result<()> {
        let mut tools = load_bench_object()?;
        let _sink_link =
            xdp::xdp_program(&mut tools, "sink")?.attach("sink0", AyaXdpMode::Driver)?;
        let conf = FwdConf {
            ifindex: xdp::ifindex("lbout")?,
            dmac: xdp::if_mac("sink0")?,
            smac: xdp::if_mac("lbout")?,
        };
        aya::maps::Array::<_, FwdConf>::try_from(tools.map_mut("FWD_CONF").expect("FWD_CONF"))?
            .set(0, conf, 0)?;
        let gen0 = xdp::ifindex("gen0")?;
        let paced = |spec: Spec| Spec {
            limit: Limit::Count(FRAMES),
            rate: Some(50_000),
            ..spec
        };
        let v6 = paced(bench::generator_spec_v6(gen0, FLOWS, 0.0, 2));
        // Waits until the sink has counted `want` more frames than `from`
        // (or 2 s), and returns how many it counted.
        let counted = |tools: &aya::Ebpf, from: u64, want: u64| {
            let deadline = Instant::now() + Duration::from_secs(2);
            let mut got = sink_packets(tools) - from;
            while got < want && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
                got = sink_packets(tools) - from;
            }
            got
        };

        let link = xdp::xdp_program(&mut tools, "bare_fwd6")?.attach("lbin", AyaXdpMode::Driver)?;
        let before = sink_packets(&tools);
        assert_eq!(pktgen::generate(&mut tools, &v6)?.frames, FRAMES);
        assert_eq!(
            counted(&tools, before, FRAMES),
            FRAMES,
            "IPv6 through bare_fwd6{}",
            veth_stats()
        );
        let before = sink_packets(&tools);
        let v4 = paced(bench::generator_spec(gen0, FLOWS, 0.0, 2));
        pktgen::generate(&mut tools, &v4)?;
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(
            sink_packets(&tools),
            before,
            "bare_fwd6 forwarded IPv4 frames"
        );
        xdp::xdp_program(&mut tools, "bare_fwd6")?.detach(link)?;

        for mode in [Forwarding::Nat, Forwarding::Dsr] {
            let sizes = TableSizes {
                conntrack: 65536,
                half_open: 65536,
            };
            let cfg = bench::lb_config_dual(mode, BACKENDS, sizes)?;
            let mut dp = Dataplane::load(sizes)?;
            dp.apply(&cfg)?;
            dp.attach("lbin", XdpMode::Native)?;
            let (before, fwd_before) = (sink_packets(&tools), forwarded(&dp));
            assert_eq!(pktgen::generate(&mut tools, &v6)?.frames, FRAMES);
            let got = counted(&tools, before, FRAMES);
            let verdicts: Vec<(Verdict, u64)> =
                dp.verdicts()?.into_iter().filter(|(_, n)| *n > 0).collect();
            assert_eq!(
                got,
                FRAMES,
                "{mode:?}: IPv6 frames at the sink (verdicts {verdicts:?}){}",
                veth_stats()
            );
            assert_eq!(forwarded(&dp) - fwd_before, FRAMES, "{mode:?}: `forwarded`");
            // Backend ids: the IPv4 service's first, then the IPv6 twin's.
            let packets = |ids: std::ops::Range<u32>| -> anyhow::Result<u64> {
                ids.map(|id| {
                    Ok(dp
                        .counters(lb_common::map_names::MapName::BACKEND_STATS, id)?
                        .packets)
                })
                .sum()
            };
            let n = BACKENDS as u32;
            assert_eq!(packets(0..n)?, 0, "{mode:?}: IPv4 backends");
            assert_eq!(packets(n..2 * n)?, FRAMES, "{mode:?}: IPv6 backends");
        }
        Ok(())
    })
    .expect("IPv6 forwarding on the benchmark topology");
}
