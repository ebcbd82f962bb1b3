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
