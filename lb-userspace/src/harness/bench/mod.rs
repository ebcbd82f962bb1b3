//! `lb bench` (run by `cargo xtask bench`): builds its own topology in a
//! throwaway network namespace (`lbp{pid}-bench`, deleted on drop) and
//! measures, writing BENCHMARKS.md:
//!
//! - forwarding rate at the sink: generator (`pktgen`, XDP live frames) →
//!   veth → middle hop → veth → `sink`, with the middle hop either the
//!   `bare_fwd` ceiling or `lb` (NAT / DSR), sweeping flows and backends;
//! - ns/packet of `lb` with BPF_PROG_TEST_RUN, next to `xdp_pass`.
//!
//! Topology (one namespace, all veth pairs with one queue per CPU):
//! `gen0` ↔ `lbin` (middle hop's XDP) … `lbout` ↔ `sink0` (`sink`).
//! Backends are 198.19.x.y with static neighbour entries pointing at
//! `sink0`'s MAC, so `lb`'s `bpf_fib_lookup` resolves them out of `lbout`.
//!
//! NAT rewrites frames in place and live-frames mode recycles pages without
//! copying the original frame back; the `pktgen` program therefore restores
//! each frame's headers from a template (`PktgenConf::template`) before
//! giving it its flow, so NAT and DSR are measured the same way.
//!
//! - HTTP req/s and p50/p99 latency with wrk from the lab's client: through
//!   the XDP LB (NAT, `lb run` in the lab), through HAProxy (mode tcp,
//!   roundrobin, same three backends, in the LB namespace) and directly to
//!   web1. The lab (`lbp{pid}h-*` namespaces) is torn down by its guard.

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context, bail, ensure};
use aya::{
    Ebpf,
    maps::{Array, PerCpuArray},
    programs::XdpMode as AyaXdpMode,
};
use lb_common::Counters;

use crate::{
    config::{self, Config, Forwarding},
    dataplane::Dataplane,
    harness::{
        netns::{self, Netns, VethEnd},
        pktgen::{self, FrameSpec, Limit, Proto, Spec},
        xdp::{self, XDP_PASS, XDP_REDIRECT},
    },
};

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Reduced sweep (flows 1/100000, backends 2/100), shorter runs
    #[arg(long)]
    pub quick: bool,
    /// Repetitions per measurement (the median is reported)
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// Seconds per throughput measurement (default 2, 0.5 with --quick)
    #[arg(long)]
    pub seconds: Option<f64>,
    /// Where to write the report (default: BENCHMARKS.md at the workspace
    /// root when this binary is `<root>/target/<profile>/lb`, else ./BENCHMARKS.md)
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Generator threads (default: number of CPUs)
    #[arg(long)]
    pub threads: Option<usize>,
    /// Skip the HTTP comparison (wrk: XDP LB vs HAProxy vs direct)
    #[arg(long)]
    pub skip_http: bool,
    /// Only run `lb` (DSR, established flow) under BPF_PROG_TEST_RUN for
    /// this many seconds and write nothing: a steady load to profile with
    /// `perf record -a -e cpu-clock`
    #[arg(long, value_name = "SECONDS")]
    pub profile_lb: Option<f64>,
    /// With --profile-lb: forward this many flows through lb with the
    /// generator instead (real XDP path, after a warm-up pass)
    #[arg(long, value_name = "FLOWS")]
    pub profile_flows: Option<u32>,
}

/// The benchmark topology's addresses (`BenchNet`, `generator_spec`).
pub const GEN_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x0c, 0x01];
pub const LBIN_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x0c, 0x02];
const LBOUT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x0d, 0x01];
const SINK_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x0d, 0x02];
pub const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);
pub const PORT: u16 = 5353;
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
/// Connection-table size for the sweeps: twice the largest flow count, so
/// 1 000 000 flows measure a full table, not LRU eviction (with a smaller
/// table every packet would be a new flow).
const CONNTRACK: u32 = 2_097_152;

/// `FWD_CONF[0]` of `bare_fwd`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct FwdConf {
    ifindex: u32,
    dmac: [u8; 6],
    smac: [u8; 6],
}

const _: () = assert!(std::mem::size_of::<FwdConf>() == 16);

// SAFETY: #[repr(C)], no padding (asserted 16 bytes above).
unsafe impl aya::Pod for FwdConf {}

/// Backend `i` (0-based): 198.19.(1 + i / 250).(1 + i % 250).
pub fn backend_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, 1 + (i / 250) as u8, 1 + (i % 250) as u8)
}

/// The benchmark's `lb` config: one UDP service with `backends` backends.
pub fn lb_config(mode: Forwarding, backends: usize) -> anyhow::Result<Config> {
    let list: Vec<String> = (0..backends)
        .map(|i| {
            format!(
                "{{ address = \"{}:{PORT}\", name = \"b{i}\" }}",
                backend_addr(i)
            )
        })
        .collect();
    let forwarding = match mode {
        Forwarding::Nat => "nat",
        Forwarding::Dsr => "dsr",
    };
    let toml = format!(
        "[dataplane]\ninterfaces = [\"lbin\"]\nforwarding = \"{forwarding}\"\nxdp-mode = \"native\"\n\
         conntrack-size = {CONNTRACK}\n\n[[service]]\nname = \"bench\"\nvip = \"{VIP}:{PORT}\"\n\
         protocol = \"udp\"\nscheduler = \"round-robin\"\nbackends = [ {} ]\n",
        list.join(", ")
    );
    Ok(config::parse(&toml, Path::new("bench.toml"))?)
}

/// Median, min and max.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Stat {
    pub fn of(values: &[f64]) -> Stat {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        v.sort_by(f64::total_cmp);
        if v.is_empty() {
            return Stat {
                median: f64::NAN,
                min: f64::NAN,
                max: f64::NAN,
            };
        }
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Stat {
            median,
            min: v[0],
            max: v[n - 1],
        }
    }

    fn text(&self, digits: usize) -> String {
        format!(
            "{:.d$} ({:.d$}–{:.d$})",
            self.median,
            self.min,
            self.max,
            d = digits
        )
    }
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

fn sink_packets(ebpf: &Ebpf) -> anyhow::Result<u64> {
    let map = ebpf.map("SINK_STATS").context("map SINK_STATS missing")?;
    let map: PerCpuArray<_, Counters> = PerCpuArray::try_from(map)?;
    Ok(map.get(&0, 0)?.iter().map(|c| c.packets).sum())
}

/// One forwarding measurement: (offered Mpps, Mpps counted at the sink).
fn forward_once(ebpf: &mut Ebpf, spec: &Spec) -> anyhow::Result<(f64, f64)> {
    let before = sink_packets(ebpf)?;
    let s = pktgen::generate(ebpf, spec)?;
    std::thread::sleep(Duration::from_millis(50));
    let after = sink_packets(ebpf)?;
    let secs = s.elapsed.as_secs_f64();
    Ok((s.mpps(), (after - before) as f64 / secs / 1e6))
}

#[derive(Debug)]
struct FwdRow {
    label: String,
    flows: u32,
    backends: usize,
    offered: Stat,
    delivered: Stat,
}

fn forward(ebpf: &mut Ebpf, spec: &Spec, reps: usize) -> anyhow::Result<(Stat, Stat)> {
    // Warm-up: one pass over every flow first, so the measured runs see a
    // full connection table (established flows), not its filling.
    if spec.flows > 1 {
        let warm = Spec {
            limit: pktgen::Limit::Count(u64::from(spec.flows) * 2),
            rate: None,
            ..spec.clone()
        };
        pktgen::generate(ebpf, &warm)?;
    }
    let mut offered = Vec::new();
    let mut delivered = Vec::new();
    for _ in 0..reps {
        let (o, d) = forward_once(ebpf, spec)?;
        offered.push(o);
        delivered.push(d);
    }
    Ok((Stat::of(&offered), Stat::of(&delivered)))
}

#[derive(Debug)]
struct NsRow {
    label: String,
    method: String,
    ns: Stat,
}

/// The benchmark's namespace: one per process.
fn bench_netns() -> String {
    format!("lbp{}-bench", std::process::id())
}

/// On Ctrl-C or SIGTERM, remove the benchmark's namespace and the HTTP
/// lab before exiting: `exit` skips the guards' Drop, so the handler does it.
fn cleanup_on_signal() -> anyhow::Result<()> {
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
            src: SocketAddrV4::new(CLIENT, 1024),
            dst: SocketAddrV4::new(VIP, PORT),
            proto: Proto::Udp,
            size: 64,
        },
        flows,
        limit: Limit::Duration(Duration::from_secs_f64(seconds)),
        rate: None,
        threads,
        fresh_frames: false,
    }
}

/// Real forwarding of `flows` flows through `lb` (DSR, 100 backends) for
/// `secs` seconds after a warm-up pass, for an external profiler.
fn profile_forwarding(secs: f64, flows: u32, threads: usize) -> anyhow::Result<()> {
    let mut ebpf = xdp::load_object()?;
    let gen0 = xdp::ifindex("gen0")?;
    let _sink = xdp::xdp_program(&mut ebpf, "sink")?
        .attach("sink0", AyaXdpMode::Driver)
        .context("attach sink")?;
    let cfg = lb_config(Forwarding::Dsr, 100)?;
    let mut dp = Dataplane::load(CONNTRACK)?;
    dp.apply(&cfg)?;
    dp.attach("lbin", cfg.dataplane.xdp_mode)?;
    let (offered, delivered) = forward(&mut ebpf, &generator_spec(gen0, flows, secs, threads), 1)?;
    eprintln!(
        "bench: profiled forwarding of {flows} flows for {secs} s: offered {:.2} Mpps, delivered {:.2} Mpps",
        offered.median, delivered.median
    );
    Ok(())
}

/// A steady BPF_PROG_TEST_RUN load of `lb` (DSR, 100 backends, one
/// established flow) for `secs` seconds, for an external profiler.
fn profile_lb(secs: f64) -> anyhow::Result<()> {
    let lbin = xdp::ifindex("lbin")?;
    let mut dp = Dataplane::load(CONNTRACK)?;
    dp.apply(&lb_config(Forwarding::Dsr, 100)?)?;
    let est = vec![frame_from(SocketAddrV4::new(CLIENT, 1024))?];
    let prog = dp.program()?;
    let deadline = std::time::Instant::now() + Duration::from_secs_f64(secs);
    let mut samples = Vec::new();
    while std::time::Instant::now() < deadline {
        samples.push(ns_per_packet(
            prog,
            &est,
            lbin,
            1_000_000,
            Some(XDP_REDIRECT),
        )?);
    }
    eprintln!(
        "bench: profiled lb for {secs} s: {:.1} ns/packet (median of {} runs)",
        Stat::of(&samples).median,
        samples.len()
    );
    Ok(())
}

/// Mean ns/packet of `prog` over `frames` (each run with `repeat`), as the
/// kernel reports it; every return value must be `expect` (if given).
fn ns_per_packet(
    prog: &aya::programs::Xdp,
    frames: &[Vec<u8>],
    ifindex: u32,
    repeat: u32,
    expect: Option<u32>,
) -> anyhow::Result<f64> {
    let mut total = 0f64;
    for f in frames {
        let r = xdp::test_run(prog, ifindex, f, repeat, false)?;
        if let Some(e) = expect {
            ensure!(
                r.action == e,
                "program returned {} instead of {e}",
                r.action
            );
        }
        total += r.duration.as_nanos() as f64;
    }
    Ok(total / frames.len() as f64)
}

fn frame_from(src: SocketAddrV4) -> anyhow::Result<Vec<u8>> {
    pktgen::build_frame(&FrameSpec {
        dst_mac: LBIN_MAC,
        src_mac: GEN_MAC,
        src,
        dst: SocketAddrV4::new(VIP, PORT),
        proto: Proto::Udp,
        size: 64,
    })
}

/// `count` frames of distinct flows, from 10.(100 + tag).0.0 upwards.
fn new_flow_frames(tag: u8, count: usize) -> anyhow::Result<Vec<Vec<u8>>> {
    let base = u32::from(Ipv4Addr::new(10, 100u8.wrapping_add(tag), 0, 0));
    (0..count)
        .map(|i| {
            let addr = Ipv4Addr::from(base + (i / 50_000) as u32);
            frame_from(SocketAddrV4::new(addr, 1024 + (i % 50_000) as u16))
        })
        .collect()
}

/// `<root>` for a binary at `<root>/target/<profile>/lb`.
fn workspace_root() -> Option<PathBuf> {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent()?.parent()?.parent().map(Path::to_path_buf))
        .filter(|root| root.join("Cargo.toml").is_file() && root.join("target").is_dir())
}

/// `<root>/BENCHMARKS.md` for a binary at `<root>/target/<profile>/lb`.
fn default_output() -> PathBuf {
    workspace_root()
        .map(|root| root.join("BENCHMARKS.md"))
        .unwrap_or_else(|| PathBuf::from("BENCHMARKS.md"))
}

/// Set by `cargo xtask bench` to the command the user typed, so that the
/// report names it rather than the binary xtask built and ran.
pub const COMMAND_ENV: &str = "LB_BENCH_COMMAND";

/// The command that ran the benchmark, as the report shows it: `invoked`
/// (from [`COMMAND_ENV`]) if set, else `argv`. No absolute path of this
/// machine is shown: a path inside the workspace `root` is made relative to
/// it, any other absolute path is cut to its file name.
pub fn shown_command(invoked: Option<&str>, argv: &[String], root: Option<&Path>) -> String {
    let words: Vec<&str> = match invoked {
        Some(text) if !text.trim().is_empty() => text.split_whitespace().collect(),
        _ => argv.iter().map(String::as_str).collect(),
    };
    words
        .iter()
        .map(|word| {
            let path = Path::new(word);
            if !path.is_absolute() {
                return (*word).to_owned();
            }
            root.and_then(|r| path.strip_prefix(r).ok())
                .filter(|rel| !rel.as_os_str().is_empty())
                .or_else(|| path.file_name().map(Path::new))
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The UTC calendar date (`YYYY-MM-DD`) of a Unix time in seconds.
pub fn utc_date(unix_secs: u64) -> String {
    // Howard Hinnant's civil_from_days.
    let z = (unix_secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "unknown CPU".into());
    let cpus = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let uname = Command::new("uname")
        .arg("-srvm")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    format!("{model}, {cpus} CPU(s); {uname}")
}

/// `lb bench`.
pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    ensure!(
        rustix::process::geteuid().is_root(),
        "lb bench needs root (XDP, BPF_PROG_RUN, network namespaces)"
    );
    ensure!(args.reps >= 1, "--reps must be at least 1");
    let seconds = args.seconds.unwrap_or(if args.quick { 0.5 } else { 2.0 });
    ensure!(
        seconds.is_finite() && seconds > 0.0,
        "--seconds must be positive"
    );
    let (flow_sweep, backend_sweep): (&[u32], &[usize]) = if args.quick {
        (&[1, 100_000], &[2, 100])
    } else {
        (&[1, 1000, 100_000, 1_000_000], &[2, 100, 1000])
    };
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let threads = args.threads.unwrap_or(cpus);
    let max_backends = backend_sweep.iter().copied().max().unwrap_or(2);
    let started = std::time::Instant::now();
    cleanup_on_signal()?;
    let net = BenchNet::new(&bench_netns(), max_backends, cpus)?;
    if let Some(secs) = args.profile_lb {
        return match args.profile_flows {
            Some(flows) => net.run(|| profile_forwarding(secs, flows, threads)),
            None => net.run(|| profile_lb(secs)),
        };
    }
    let reps = args.reps;
    let (fwd, ns) = net.run(|| {
        let mut ebpf = xdp::load_object()?;
        let ifindex = |d: &str| xdp::ifindex(d);
        let (gen0, lbin, lbout) = (ifindex("gen0")?, ifindex("lbin")?, ifindex("lbout")?);
        let _sink = xdp::xdp_program(&mut ebpf, "sink")?
            .attach("sink0", AyaXdpMode::Driver)
            .context("attach sink")?;
        let spec = |flows: u32| generator_spec(gen0, flows, seconds, threads);
        let mut rows = Vec::new();

        // (a) The ceiling: bare_fwd on the middle hop.
        {
            let map = ebpf.map_mut("FWD_CONF").context("map FWD_CONF missing")?;
            let mut map: Array<_, FwdConf> = Array::try_from(map)?;
            map.set(
                0,
                FwdConf {
                    ifindex: lbout,
                    dmac: SINK_MAC,
                    smac: LBOUT_MAC,
                },
                0,
            )?;
        }
        let link = xdp::xdp_program(&mut ebpf, "bare_fwd")?
            .attach("lbin", AyaXdpMode::Driver)
            .context("attach bare_fwd")?;
        eprintln!("bench: ceiling (bare_fwd)");
        let (offered, delivered) = forward(&mut ebpf, &spec(1), reps)?;
        rows.push(FwdRow {
            label: "bare_fwd (ceiling)".into(),
            flows: 1,
            backends: 0,
            offered,
            delivered,
        });
        xdp::xdp_program(&mut ebpf, "bare_fwd")?
            .detach(link)
            .context("detach bare_fwd")?;

        // (b) lb in both modes.
        for mode in [Forwarding::Nat, Forwarding::Dsr] {
            for &backends in backend_sweep {
                let cfg = lb_config(mode, backends)?;
                let mut dp = Dataplane::load(CONNTRACK)?;
                dp.apply(&cfg)?;
                dp.attach("lbin", cfg.dataplane.xdp_mode)?;
                for &flows in flow_sweep {
                    eprintln!("bench: lb {mode:?}, {backends} backends, {flows} flows");
                    let (offered, delivered) = forward(&mut ebpf, &spec(flows), reps)?;
                    rows.push(FwdRow {
                        label: format!("lb {mode:?}"),
                        flows,
                        backends,
                        offered,
                        delivered,
                    });
                }
            }
        }

        // (c) ns/packet with BPF_PROG_TEST_RUN.
        eprintln!("bench: ns/packet (BPF_PROG_TEST_RUN)");
        let mut ns_rows = Vec::new();
        let repeat: u32 = if args.quick { 100_000 } else { 1_000_000 };
        let calls = if args.quick { 2_000 } else { 20_000 };
        let est = vec![frame_from(SocketAddrV4::new(CLIENT, 1024))?];
        let est_calls: Vec<Vec<u8>> = std::iter::repeat_n(est[0].clone(), calls).collect();
        {
            let pass = xdp::xdp_program(&mut ebpf, "xdp_pass")?;
            let (mut a, mut b) = (Vec::new(), Vec::new());
            for _ in 0..reps {
                a.push(ns_per_packet(pass, &est, lbin, repeat, Some(XDP_PASS))?);
                b.push(ns_per_packet(pass, &est_calls, lbin, 1, Some(XDP_PASS))?);
            }
            ns_rows.push(NsRow {
                label: "xdp_pass".into(),
                method: format!("repeat={repeat}"),
                ns: Stat::of(&a),
            });
            ns_rows.push(NsRow {
                label: "xdp_pass".into(),
                method: format!("{calls} calls, repeat=1"),
                ns: Stat::of(&b),
            });
        }
        for mode in [Forwarding::Nat, Forwarding::Dsr] {
            let mut dp = Dataplane::load(CONNTRACK)?;
            dp.apply(&lb_config(mode, 100)?)?;
            let prog = dp.program()?;
            // Establish the flow once.
            ns_per_packet(prog, &est, lbin, 1, Some(XDP_REDIRECT))?;
            let (mut est_ns, mut new_ns, mut rep_ns) = (Vec::new(), Vec::new(), Vec::new());
            for rep in 0..reps {
                est_ns.push(ns_per_packet(
                    prog,
                    &est_calls,
                    lbin,
                    1,
                    Some(XDP_REDIRECT),
                )?);
                new_ns.push(ns_per_packet(
                    prog,
                    &new_flow_frames(rep as u8, calls)?,
                    lbin,
                    1,
                    Some(XDP_REDIRECT),
                )?);
                if mode == Forwarding::Dsr {
                    // DSR only rewrites MACs, so a repeated frame stays the same flow.
                    rep_ns.push(ns_per_packet(prog, &est, lbin, repeat, Some(XDP_REDIRECT))?);
                }
            }
            let m = format!("lb {mode:?} (100 backends)");
            if !rep_ns.is_empty() {
                ns_rows.push(NsRow {
                    label: format!("{m}, established flow"),
                    method: format!("repeat={repeat}"),
                    ns: Stat::of(&rep_ns),
                });
            }
            ns_rows.push(NsRow {
                label: format!("{m}, established flow"),
                method: format!("{calls} calls, repeat=1"),
                ns: Stat::of(&est_ns),
            });
            ns_rows.push(NsRow {
                label: format!("{m}, new flow"),
                method: format!("{calls} distinct flows, repeat=1"),
                ns: Stat::of(&new_ns),
            });
        }
        Ok((rows, ns_rows))
    })?;
    drop(net);
    let http = if args.skip_http {
        Err("skipped (--skip-http)".to_string())
    } else {
        let secs = if args.quick { 2 } else { 5 };
        eprintln!("bench: HTTP (wrk, {secs} s per run)");
        http_bench(reps, secs).map_err(|e| format!("failed: {e:#}"))
    };
    if let Err(e) = &http {
        eprintln!("bench: HTTP comparison {e}");
    }
    let took = started.elapsed();
    let output = args.output.clone().unwrap_or_else(default_output);
    let plot = output.with_extension("svg");
    std::fs::write(&plot, plot_svg(&fwd)).with_context(|| format!("writing {}", plot.display()))?;
    let argv: Vec<String> = std::env::args().collect();
    let unix_secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let report = Report {
        command: shown_command(
            std::env::var(COMMAND_ENV).ok().as_deref(),
            &argv,
            workspace_root().as_deref(),
        ),
        date: utc_date(unix_secs),
        machine: machine(),
        cpus,
        reps,
        seconds,
        threads,
        frame_size: generator_spec(0, 1, seconds, threads).frame.size,
        took,
        fwd,
        ns,
        http,
        wrk_loads: WRK_LOADS
            .iter()
            .map(|(load, t, c)| ((*load).to_owned(), format!("{t} {c}")))
            .collect(),
        plot: plot.file_name().map(|n| n.to_string_lossy().into_owned()),
    };
    let text = render(&report);
    std::fs::write(&output, &text).with_context(|| format!("writing {}", output.display()))?;
    print!("{text}");
    eprintln!(
        "bench: wrote {} in {:.0} s",
        output.display(),
        took.as_secs_f64()
    );
    if report.fwd.iter().any(|r| r.delivered.median.is_nan()) {
        bail!("some measurements produced no result");
    }
    Ok(())
}

#[derive(Debug)]
struct HttpRow {
    target: String,
    rps: Stat,
    p50: Stat,
    p99: Stat,
}

/// A duration as wrk prints it (`812.00us`, `1.23ms`, `2.01s`), in ms.
pub fn wrk_ms(text: &str) -> Option<f64> {
    let text = text.trim();
    let (num, scale) = if let Some(n) = text.strip_suffix("us") {
        (n, 1e-3)
    } else if let Some(n) = text.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1e3)
    } else {
        return None;
    };
    num.trim().parse::<f64>().ok().map(|v| v * scale)
}

/// (req/s, p50 ms, p99 ms) from `wrk --latency` output.
pub fn parse_wrk(out: &str) -> anyhow::Result<(f64, f64, f64)> {
    let mut rps = None;
    let mut p50 = None;
    let mut p99 = None;
    for line in out.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Requests/sec:", v] => rps = v.parse::<f64>().ok(),
            ["50%", v] => p50 = wrk_ms(v),
            ["99%", v] => p99 = wrk_ms(v),
            _ => {}
        }
    }
    ensure!(
        !out.contains("Non-2xx"),
        "wrk saw non-2xx responses:\n{out}"
    );
    match (rps, p50, p99) {
        (Some(r), Some(a), Some(b)) => Ok((r, a, b)),
        _ => bail!("unexpected wrk output:\n{out}"),
    }
}

/// wrk loads: saturating (2 threads, 32 connections), where throughput is
/// compared, and light (1 thread, 2 connections), where latency is not
/// dominated by CPU queueing on a 2-core machine shared by client, LB and
/// servers.
const WRK_LOADS: [(&str, &str, &str); 2] = [("32 conns", "-t2", "-c32"), ("2 conns", "-t1", "-c2")];

fn wrk(
    lab: &crate::harness::lab::Lab,
    url: &str,
    secs: u32,
    reps: usize,
    (threads, conns): (&str, &str),
) -> anyhow::Result<(Stat, Stat, Stat)> {
    let (mut rps, mut p50, mut p99) = (Vec::new(), Vec::new(), Vec::new());
    let duration = format!("-d{secs}s");
    for _ in 0..reps {
        let out = lab.exec_ok(
            &lab.client_ns(),
            &["wrk", threads, conns, &duration, "--latency", url],
        )?;
        let (r, a, b) = parse_wrk(&out)?;
        rps.push(r);
        p50.push(a);
        p99.push(b);
    }
    Ok((Stat::of(&rps), Stat::of(&p50), Stat::of(&p99)))
}

/// A child process killed (and reaped) on drop.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const HAPROXY_PORT: u16 = 8080;

/// Waits until `addr` accepts TCP connections from the client namespace.
fn wait_listening(lab: &crate::harness::lab::Lab, addr: SocketAddrV4) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let ok = netns::in_netns(&lab.client_ns(), || {
            std::net::TcpStream::connect_timeout(&addr.into(), Duration::from_millis(200)).is_ok()
        })?;
        if ok {
            return Ok(());
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "{addr} does not accept connections"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn http_bench(reps: usize, secs: u32) -> anyhow::Result<Vec<HttpRow>> {
    use crate::harness::lab;
    for tool in ["wrk", "haproxy"] {
        ensure!(
            Command::new(tool)
                .arg("-v")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok(),
            "{tool} is not installed (cargo xtask setup installs it)"
        );
    }
    let lb_bin = std::env::current_exe().context("path of the lb binary")?;
    let prefix = format!("lbp{}h", std::process::id());
    let lab = lab::Lab::up(&prefix, &lb_bin)?;
    lab.set_mode(Forwarding::Nat)?;
    let mut rows = Vec::new();
    let mut push = |target: &str, (rps, p50, p99): (Stat, Stat, Stat)| {
        rows.push(HttpRow {
            target: target.into(),
            rps,
            p50,
            p99,
        });
    };

    let web1 = SocketAddrV4::new(lab::web_addr(1), lab::HTTP_PORT);
    wait_listening(&lab, web1)?;
    for (load, t, c) in WRK_LOADS {
        push(
            &format!("direct (client → web1), {load}"),
            wrk(&lab, &format!("http://{web1}/"), secs, reps, (t, c))?,
        );
    }

    let agent = lab.start_agent(&lab::lab_config(Forwarding::Nat))?;
    let vip = SocketAddrV4::new(lab::VIP, lab::HTTP_PORT);
    wait_listening(&lab, vip)?;
    for (load, t, c) in WRK_LOADS {
        push(
            &format!("XDP LB (lb, NAT, 3 backends), {load}"),
            wrk(&lab, &format!("http://{vip}/"), secs, reps, (t, c))?,
        );
    }
    agent.stop()?;

    let servers: String = (1..=lab::WEB_NAMES.len())
        .map(|n| {
            format!(
                "    server web{n} {}:{}\n",
                lab::web_addr(n),
                lab::HTTP_PORT
            )
        })
        .collect();
    let cfg = format!(
        "global\n    maxconn 4096\ndefaults\n    mode tcp\n    timeout connect 5s\n    timeout client 60s\n    timeout server 60s\n\
         frontend fe\n    bind {}:{HAPROXY_PORT}\n    default_backend be\nbackend be\n    balance roundrobin\n{servers}",
        lab::LB_FRONT
    );
    let cfg_path = lab.run_dir().join("haproxy.cfg");
    std::fs::write(&cfg_path, cfg).with_context(|| format!("writing {}", cfg_path.display()))?;
    let cfg_arg = cfg_path.display().to_string();
    let log_path = lab.run_dir().join("haproxy.log");
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    let lb_ns = lab.lb_ns();
    let child = netns::ns_command(&lb_ns, &["haproxy", "-db", "-f", &cfg_arg])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .spawn()
        .context("starting haproxy")?;
    let _haproxy = KillOnDrop(child);
    let front = SocketAddrV4::new(lab::LB_FRONT, HAPROXY_PORT);
    wait_listening(&lab, front).with_context(|| {
        format!(
            "haproxy: {}",
            std::fs::read_to_string(&log_path)
                .unwrap_or_default()
                .trim()
        )
    })?;
    for (load, t, c) in WRK_LOADS {
        push(
            &format!("HAProxy (mode tcp, roundrobin, 3 backends), {load}"),
            wrk(&lab, &format!("http://{front}/"), secs, reps, (t, c))?,
        );
    }
    Ok(rows)
}

/// Everything a report states: how the benchmark was run and what it
/// measured. [`render`] writes nothing that is not here or computed from it,
/// apart from the targets' thresholds ([`TARGET_RATIO`] and the others).
#[derive(Debug)]
struct Report {
    /// The command that ran it ([`shown_command`]).
    command: String,
    /// UTC date of the run, `YYYY-MM-DD`.
    date: String,
    /// CPU model, CPU count and kernel ([`machine`]).
    machine: String,
    /// CPUs the generator, forwarder, sink and HTTP lab share.
    cpus: usize,
    reps: usize,
    /// Seconds per throughput measurement.
    seconds: f64,
    /// Generator threads.
    threads: usize,
    /// Generator frame size in bytes.
    frame_size: usize,
    took: Duration,
    fwd: Vec<FwdRow>,
    ns: Vec<NsRow>,
    http: Result<Vec<HttpRow>, String>,
    /// wrk loads: (name used in the HTTP rows, wrk arguments).
    wrk_loads: Vec<(String, String)>,
    /// File name of the bar chart next to the report, if one was written.
    plot: Option<String>,
}

/// Where the analysis of a profiled run lives (relative to the workspace
/// root, where BENCHMARKS.md is written by default).
const ANALYSIS_DOC: &str = "docs/benchmarks-analysis.md";

/// The report as Markdown.
fn render(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# Benchmarks\n");
    let _ = writeln!(
        s,
        "Generated by `{}` on {} in {:.0} s.\n",
        r.command,
        r.date,
        r.took.as_secs_f64()
    );
    let _ = writeln!(s, "- Machine: {}", r.machine);
    let _ = writeln!(
        s,
        "- Each figure: median of {} repetitions, (min–max) in parentheses; {} s per throughput run, {} generator thread(s).",
        r.reps, r.seconds, r.threads
    );
    let _ = writeln!(
        s,
        "- Path: `lb pktgen` (XDP live frames, {}-byte UDP) → veth → middle hop (native XDP) → veth → `sink` (counts, drops), all on this host's {} CPU(s), so generator, forwarder and sink share them.\n",
        r.frame_size, r.cpus
    );
    let _ = writeln!(s, "## Forwarding rate (Mpps at the sink)\n");
    if let Some(plot) = &r.plot {
        let _ = writeln!(
            s,
            "![delivered Mpps per configuration, ceiling marked]({plot})\n"
        );
    }
    let _ = writeln!(
        s,
        "| middle hop | backends | flows | offered Mpps | delivered Mpps | vs ceiling |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|");
    let ceiling = ceiling(&r.fwd);
    for row in &r.fwd {
        let ratio = match ceiling {
            Some(c) => format!("{:.0} %", 100.0 * row.delivered.median / c),
            None => "–".into(),
        };
        let backends = if row.backends == 0 {
            "–".to_string()
        } else {
            row.backends.to_string()
        };
        let _ = writeln!(
            s,
            "| {} | {backends} | {} | {} | {} | {ratio} |",
            row.label,
            row.flows,
            row.offered.text(2),
            row.delivered.text(2)
        );
    }
    let _ = writeln!(
        s,
        "\n## Cost per packet (BPF_PROG_TEST_RUN, ns/packet as the kernel reports it)\n"
    );
    let _ = writeln!(
        s,
        "With repeat=1 each figure includes the kernel's timer overhead for one run (compare with `xdp_pass` measured the same way). NAT is only measured with repeat=1: the kernel does not restore the frame between repetitions, so after the first run a NATed frame is no longer addressed to the VIP.\n"
    );
    let _ = writeln!(s, "| program | method | ns/packet |");
    let _ = writeln!(s, "|---|---|---|");
    for row in &r.ns {
        let _ = writeln!(s, "| {} | {} | {} |", row.label, row.method, row.ns.text(1));
    }
    let _ = writeln!(s, "\n## HTTP through the load balancer (wrk)\n");
    match &r.http {
        Ok(rows) => {
            let loads: Vec<String> = r
                .wrk_loads
                .iter()
                .map(|(name, args)| format!("{name} (`{args}`)"))
                .collect();
            let _ = writeln!(
                s,
                "`wrk --latency` from the lab's client namespace, at {}; three backends (the lab's `lb lab-serve` web servers) except for *direct*, which is web1 alone. Client, load balancer and servers all run on this host's {} CPU(s).\n",
                loads.join(" and "),
                r.cpus
            );
            let _ = writeln!(s, "| path | req/s | p50 ms | p99 ms |");
            let _ = writeln!(s, "|---|---|---|---|");
            for row in rows {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} |",
                    row.target,
                    row.rps.text(0),
                    row.p50.text(2),
                    row.p99.text(2)
                );
            }
        }
        Err(e) => {
            let _ = writeln!(s, "Not measured: {e}");
        }
    }
    s.push_str(&targets(&r.fwd, &r.ns, &r.http));
    s.push_str(&summary(r));
    s
}

/// The ceiling's delivered Mpps (the `bare_fwd` row), if it measured any.
fn ceiling(fwd: &[FwdRow]) -> Option<f64> {
    fwd.iter()
        .find(|r| r.backends == 0)
        .map(|r| r.delivered.median)
        .filter(|c| c.is_finite() && *c > 0.0)
}

/// `lo–hi` of `values` formatted with `digits` decimals, or one value if
/// they are the same at that precision.
fn span(values: &[f64], digits: usize) -> Option<String> {
    let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if !lo.is_finite() || !hi.is_finite() {
        return None;
    }
    let (a, b) = (format!("{lo:.digits$}"), format!("{hi:.digits$}"));
    Some(if a == b { a } else { format!("{a}–{b}") })
}

/// The figures the tables imply, computed from them: ratios to the ceiling
/// and to one flow, ns/packet over `xdp_pass`, HTTP relative to direct and
/// HAProxy. Why they are what they are is not generated: it comes from
/// profiles, analysed for one run in [`ANALYSIS_DOC`].
fn summary(r: &Report) -> String {
    let mut s = String::from("\n## This run in ratios\n\n");
    if let Some(c) = ceiling(&r.fwd) {
        let _ = writeln!(
            s,
            "- The ceiling (`bare_fwd`, one flow) delivered {c:.2} Mpps."
        );
        for mode in ["Nat", "Dsr"] {
            let label = format!("lb {mode}");
            let one: Vec<&FwdRow> = r
                .fwd
                .iter()
                .filter(|row| row.label == label && row.flows == 1)
                .collect();
            let ratios: Vec<f64> = one
                .iter()
                .map(|row| 100.0 * row.delivered.median / c)
                .collect();
            let counts: Vec<String> = one.iter().map(|row| row.backends.to_string()).collect();
            if let Some(range) = span(&ratios, 0) {
                let _ = writeln!(
                    s,
                    "- `{label}`, one established flow: {range} % of the ceiling (backends: {}).",
                    counts.join(", ")
                );
            }
            let most = r
                .fwd
                .iter()
                .filter(|row| row.label == label)
                .map(|row| row.flows)
                .max()
                .filter(|&f| f > 1);
            if let Some(most) = most {
                let kept: Vec<f64> = one
                    .iter()
                    .filter_map(|o| {
                        r.fwd
                            .iter()
                            .find(|row| {
                                row.label == label
                                    && row.backends == o.backends
                                    && row.flows == most
                            })
                            .map(|m| 100.0 * m.delivered.median / o.delivered.median)
                    })
                    .collect();
                if let Some(range) = span(&kept, 0) {
                    let _ = writeln!(
                        s,
                        "- `{label}` with {most} flows: {range} % of its single-flow rate at the same backend count."
                    );
                }
            }
        }
    }
    for pass in r.ns.iter().filter(|row| row.label == "xdp_pass") {
        for row in
            r.ns.iter()
                .filter(|row| row.label.starts_with("lb ") && row.method == pass.method)
        {
            let _ = writeln!(
                s,
                "- `{}`, {}: {:.1} ns/packet, {:.1} ns more than `xdp_pass` measured the same way ({:.1} ns).",
                row.label,
                row.method,
                row.ns.median,
                row.ns.median - pass.ns.median,
                pass.ns.median
            );
        }
    }
    if let Ok(rows) = &r.http {
        for (load, _) in &r.wrk_loads {
            let suffix = format!(", {load}");
            let find = |prefix: &str| {
                rows.iter()
                    .find(|row| row.target.starts_with(prefix) && row.target.ends_with(&suffix))
            };
            if let (Some(lb), Some(direct), Some(ha)) =
                (find("XDP LB"), find("direct"), find("HAProxy"))
            {
                let _ = writeln!(
                    s,
                    "- HTTP, {load}: the XDP LB served {:.0} % of direct's req/s and {:.2}× HAProxy's; its p99 was {:.2}× direct's and {:.2}× HAProxy's.",
                    100.0 * lb.rps.median / direct.rps.median,
                    lb.rps.median / ha.rps.median,
                    lb.p99.median / direct.p99.median,
                    lb.p99.median / ha.p99.median
                );
            }
        }
    }
    let _ = writeln!(
        s,
        "\nWhat limits these figures (profiles of the conntrack lookup, the program body, CPU sharing) is analysed for one earlier run in [{ANALYSIS_DOC}]({ANALYSIS_DOC}), which names that run; it is not regenerated with this report."
    );
    s
}

/// A horizontal bar chart of delivered Mpps per forwarding configuration,
/// min–max as a whisker, the ceiling as a dashed line: plain SVG, no
/// plotting dependency.
fn plot_svg(fwd: &[FwdRow]) -> String {
    const ROW: f64 = 16.0;
    const LABEL: f64 = 230.0;
    const WIDTH: f64 = 520.0;
    const TOP: f64 = 30.0;
    let max = fwd
        .iter()
        .map(|r| r.delivered.max)
        .filter(|m| m.is_finite())
        .fold(1.0f64, f64::max)
        .ceil();
    let x = |mpps: f64| LABEL + WIDTH * (mpps / max).clamp(0.0, 1.0);
    let height = TOP + ROW * fwd.len() as f64 + 30.0;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"11\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{LABEL}\" y=\"16\" font-size=\"13\">Delivered Mpps at the sink (median, min–max)</text>\n",
        w = LABEL + WIDTH + 60.0
    );
    for (i, r) in fwd.iter().enumerate() {
        let y = TOP + ROW * i as f64;
        let label = if r.backends == 0 {
            r.label.clone()
        } else {
            format!("{}, {} backends, {} flows", r.label, r.backends, r.flows)
        };
        let color = if r.backends == 0 {
            "#777"
        } else if r.label.ends_with("Nat") {
            "#3b7dd8"
        } else {
            "#e08a1e"
        };
        let d = &r.delivered;
        let _ = write!(
            svg,
            "<text x=\"{lx}\" y=\"{ty}\" text-anchor=\"end\">{label}</text>\n\
             <rect x=\"{LABEL}\" y=\"{y}\" width=\"{bw:.1}\" height=\"{bh}\" fill=\"{color}\"/>\n\
             <line x1=\"{x0:.1}\" x2=\"{x1:.1}\" y1=\"{wy}\" y2=\"{wy}\" stroke=\"black\"/>\n\
             <text x=\"{vx:.1}\" y=\"{ty}\">{m:.2}</text>\n",
            lx = LABEL - 6.0,
            ty = y + ROW - 5.0,
            bw = x(d.median) - LABEL,
            bh = ROW - 3.0,
            x0 = x(d.min),
            x1 = x(d.max),
            wy = y + (ROW - 3.0) / 2.0,
            vx = x(d.max) + 4.0,
            m = d.median,
        );
    }
    if let Some(c) = fwd.iter().find(|r| r.backends == 0) {
        let cx = x(c.delivered.median);
        let _ = write!(
            svg,
            "<line x1=\"{cx:.1}\" x2=\"{cx:.1}\" y1=\"{TOP}\" y2=\"{y2}\" stroke=\"#777\" stroke-dasharray=\"4 3\"/>\n\
             <text x=\"{cx:.1}\" y=\"{ly}\" text-anchor=\"middle\">ceiling {m:.2} Mpps</text>\n",
            y2 = height - 25.0,
            ly = height - 10.0,
            m = c.delivered.median
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// The targets: an established flow at ≥ 90 % of the bare
/// forwarder, ≤ 100 ns/packet, 1 000 000 flows costing ≤ 20 % of the
/// single-flow rate. The only figures a report states that a run did not
/// measure.
const TARGET_RATIO: f64 = 0.9;
const TARGET_NS: f64 = 100.0;
const TARGET_FLOWS: u32 = 1_000_000;
const TARGET_FLOW_COST: f64 = 0.2;

/// `1 000 000` for 1000000.
fn grouped(n: u32) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(' ');
        }
        out.push(c);
    }
    out
}

/// The targets, checked against this run's medians: met, or missed
/// and by how much.
fn targets(fwd: &[FwdRow], ns: &[NsRow], http: &Result<Vec<HttpRow>, String>) -> String {
    let mut s = String::from("\n## Targets (this run)\n\n| target | result |\n|---|---|\n");
    let verdict = |ok: bool| if ok { "met" } else { "**missed**" };
    if let Some(c) = ceiling(fwd) {
        for mode in ["Nat", "Dsr"] {
            let rows: Vec<&FwdRow> = fwd
                .iter()
                .filter(|r| r.label == format!("lb {mode}") && r.flows == 1)
                .collect();
            let worst = rows
                .iter()
                .map(|r| r.delivered.median / c)
                .fold(f64::INFINITY, f64::min);
            if worst.is_finite() {
                let _ = writeln!(
                    s,
                    "| established flow ≥ {:.0} % of the bare forwarder, {mode} | {}: {:.0} % at worst over backend counts (by {:.0} points) |",
                    100.0 * TARGET_RATIO,
                    verdict(worst >= TARGET_RATIO),
                    100.0 * worst,
                    (100.0 * (worst - TARGET_RATIO)).abs()
                );
            }
        }
    }
    if let Some(r) = ns
        .iter()
        .find(|r| r.label.contains("established") && r.method.starts_with("repeat="))
    {
        let _ = writeln!(
            s,
            "| ≤ {TARGET_NS:.0} ns/packet, established flow | {}: {:.0} ns |",
            verdict(r.ns.median <= TARGET_NS),
            r.ns.median
        );
    }
    for mode in ["Nat", "Dsr"] {
        let mut worst: Option<(f64, usize)> = None;
        for one in fwd
            .iter()
            .filter(|r| r.label == format!("lb {mode}") && r.flows == 1)
        {
            if let Some(million) = fwd.iter().find(|r| {
                r.label == one.label && r.backends == one.backends && r.flows == TARGET_FLOWS
            }) {
                let cost = 1.0 - million.delivered.median / one.delivered.median;
                if worst.is_none_or(|(w, _)| cost > w) {
                    worst = Some((cost, one.backends));
                }
            }
        }
        if let Some((cost, backends)) = worst {
            let _ = writeln!(
                s,
                "| {} flows cost ≤ {:.0} % of the single-flow rate, {mode} | {}: {:.0} % at worst ({backends} backends) |",
                grouped(TARGET_FLOWS),
                100.0 * TARGET_FLOW_COST,
                verdict(cost <= TARGET_FLOW_COST),
                100.0 * cost
            );
        }
    }
    if let Ok(rows) = http {
        for load in ["32 conns", "2 conns"] {
            // ", 2 conns", not "2 conns": "32 conns" ends with that too.
            let suffix = format!(", {load}");
            let find = |prefix: &str| {
                rows.iter()
                    .find(|r| r.target.starts_with(prefix) && r.target.ends_with(&suffix))
            };
            if let (Some(lb), Some(ha)) = (find("XDP LB"), find("HAProxy")) {
                let _ = writeln!(
                    s,
                    "| HTTP ≥ HAProxy req/s, {load} | {}: {:.0} vs {:.0} req/s |",
                    verdict(lb.rps.median >= ha.rps.median),
                    lb.rps.median,
                    ha.rps.median
                );
                let _ = writeln!(
                    s,
                    "| HTTP p99 below HAProxy's, {load} | {}: {:.2} vs {:.2} ms |",
                    verdict(lb.p99.median < ha.p99.median),
                    lb.p99.median,
                    ha.p99.median
                );
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plot_has_a_bar_per_row_and_the_ceiling() {
        let stat = |m: f64| Stat {
            median: m,
            min: m - 0.5,
            max: m + 0.5,
        };
        let rows = vec![
            FwdRow {
                label: "bare_fwd (ceiling)".into(),
                flows: 1,
                backends: 0,
                offered: stat(7.0),
                delivered: stat(7.0),
            },
            FwdRow {
                label: "lb Nat".into(),
                flows: 1000,
                backends: 2,
                offered: stat(5.5),
                delivered: stat(5.5),
            },
        ];
        let svg = plot_svg(&rows);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<rect x=").count(), 2, "one bar per row");
        assert!(svg.contains("lb Nat, 2 backends, 1000 flows"));
        assert!(svg.contains("ceiling 7.00 Mpps"));
        // The 5.5 Mpps bar is 5.5/8 of the scale (max 7.5 rounds up to 8).
        assert!(svg.contains("width=\"357.5\""), "{svg}");
    }

    fn st(median: f64, min: f64, max: f64) -> Stat {
        Stat { median, min, max }
    }

    /// Two runs whose figures differ everywhere except the flow counts both
    /// sweep (1 and 1 000 000, needed for the targets).
    struct Variant {
        command: &'static str,
        date: &'static str,
        machine: &'static str,
        cpus: usize,
        reps: usize,
        seconds: f64,
        threads: usize,
        frame_size: usize,
        took_s: u64,
        backends: [usize; 2],
        ceiling: f64,
        /// Delivered Mpps per (mode, backends index, flows 1 / 1 000 000).
        mpps: [[[f64; 2]; 2]; 2],
        ns: [f64; 5],
        calls: usize,
        repeat: u32,
        conns: [u32; 2],
        http: [[f64; 3]; 6],
        plot: Option<&'static str>,
    }

    const A: Variant = Variant {
        command: "cargo xtask bench",
        date: "2026-11-22",
        machine: "AMD EPYC, 2 CPU(s); Linux 6.18.44 x86_64",
        cpus: 2,
        reps: 3,
        seconds: 2.0,
        threads: 2,
        frame_size: 64,
        took_s: 262,
        backends: [2, 100],
        ceiling: 7.18,
        mpps: [[[5.90, 2.62], [5.38, 2.27]], [[5.73, 2.31], [5.96, 2.46]]],
        ns: [28.0, 107.6, 200.6, 79.0, 194.9],
        calls: 20000,
        repeat: 1_000_000,
        conns: [32, 2],
        http: [
            [66919.0, 0.26, 2.36],
            [61014.0, 0.03, 0.07],
            [58195.0, 0.31, 2.8],
            [49061.0, 0.04, 0.09],
            [32893.0, 0.9, 1.95],
            [22222.0, 0.08, 0.15],
        ],
        plot: Some("BENCHMARKS.svg"),
    };

    const B: Variant = Variant {
        command: "lb bench --quick --reps 5",
        date: "2025-03-07",
        machine: "Intel Xeon, 4 CPU(s); Linux 5.15.0 aarch",
        cpus: 4,
        reps: 5,
        seconds: 0.5,
        threads: 4,
        frame_size: 128,
        took_s: 47,
        backends: [6, 50],
        ceiling: 9.41,
        mpps: [[[9.13, 5.71], [8.85, 5.83]], [[8.94, 6.31], [9.22, 5.08]]],
        ns: [31.3, 113.9, 257.7, 88.8, 219.4],
        calls: 3000,
        repeat: 400_000,
        conns: [48, 6],
        http: [
            [71234.0, 0.44, 3.61],
            [54321.0, 0.05, 0.13],
            [63456.0, 0.57, 4.73],
            [45678.0, 0.06, 0.17],
            [27777.0, 1.31, 3.27],
            [19876.0, 0.11, 0.29],
        ],
        plot: None,
    };

    fn report(v: &Variant) -> Report {
        let spread = |m: f64| st(m, m * 0.97, m * 1.01);
        let mut fwd = vec![FwdRow {
            label: "bare_fwd (ceiling)".into(),
            flows: 1,
            backends: 0,
            offered: spread(v.ceiling),
            delivered: spread(v.ceiling),
        }];
        for (m, mode) in ["Nat", "Dsr"].iter().enumerate() {
            for (b, &backends) in v.backends.iter().enumerate() {
                for (f, flows) in [1, TARGET_FLOWS].into_iter().enumerate() {
                    let mpps = v.mpps[m][b][f];
                    fwd.push(FwdRow {
                        label: format!("lb {mode}"),
                        flows,
                        backends,
                        offered: spread(mpps),
                        delivered: spread(mpps),
                    });
                }
            }
        }
        let (calls, repeat) = (v.calls, v.repeat);
        let lb = format!("lb Dsr ({} backends)", v.backends[1]);
        let ns = [
            ("xdp_pass".to_owned(), format!("repeat={repeat}")),
            ("xdp_pass".to_owned(), format!("{calls} calls, repeat=1")),
            (
                format!("{lb}, new flow"),
                format!("{calls} distinct flows, repeat=1"),
            ),
            (
                format!("{lb}, established flow"),
                format!("repeat={repeat}"),
            ),
            (
                format!("{lb}, established flow"),
                format!("{calls} calls, repeat=1"),
            ),
        ]
        .into_iter()
        .zip(v.ns)
        .map(|((label, method), ns)| NsRow {
            label,
            method,
            ns: spread(ns),
        })
        .collect();
        let loads: Vec<(String, String)> = v
            .conns
            .iter()
            .map(|c| (format!("{c} conns"), format!("-t1 -c{c}")))
            .collect();
        let mut http = Vec::new();
        let mut figures = v.http.iter();
        for path in [
            "direct (client → web1)",
            "XDP LB (lb, NAT)",
            "HAProxy (mode tcp)",
        ] {
            for (load, _) in &loads {
                if let Some(&[rps, p50, p99]) = figures.next() {
                    http.push(HttpRow {
                        target: format!("{path}, {load}"),
                        rps: spread(rps),
                        p50: spread(p50),
                        p99: spread(p99),
                    });
                }
            }
        }
        Report {
            command: v.command.into(),
            date: v.date.into(),
            machine: v.machine.into(),
            cpus: v.cpus,
            reps: v.reps,
            seconds: v.seconds,
            threads: v.threads,
            frame_size: v.frame_size,
            took: Duration::from_secs(v.took_s),
            fwd,
            ns,
            http: Ok(http),
            wrk_loads: loads,
            plot: v.plot.map(str::to_owned),
        }
    }

    /// Every number in `text` that stands on its own (not part of a name
    /// like `p99`, `web1` or `x86_64`), e.g. `7.18`, `262`, `2026`.
    fn numbers(text: &str) -> std::collections::BTreeSet<String> {
        let chars: Vec<char> = text.chars().collect();
        let mut out = std::collections::BTreeSet::new();
        let mut i = 0;
        while i < chars.len() {
            let glued = i > 0 && (chars[i - 1].is_alphanumeric() || chars[i - 1] == '_');
            if chars[i].is_ascii_digit() && !glued {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_ascii_digit()
                        || (chars[i] == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit)))
                {
                    i += 1;
                }
                out.insert(chars[start..i].iter().collect());
            } else {
                i += 1;
            }
        }
        out
    }

    #[test]
    fn report_states_no_figure_that_is_not_from_its_run() {
        let (a, b) = (render(&report(&A)), render(&report(&B)));
        // A figure written into the template would show in both reports.
        // Only these may: the targets' thresholds (90 %, 100 ns, 20 %; 100 is
        // also the ceiling's ratio to itself) and the flow counts both runs
        // swept (1 and 1 000 000).
        let allowed: std::collections::BTreeSet<String> =
            ["90", "100", "20", "1", "000", "1000000"]
                .into_iter()
                .map(String::from)
                .collect();
        let (na, nb) = (numbers(&a), numbers(&b));
        let shared: Vec<&String> = na
            .intersection(&nb)
            .filter(|n| !allowed.contains(*n))
            .collect();
        assert!(
            shared.is_empty(),
            "figures in both reports: {shared:?}\n{a}\n{b}"
        );
        // Each report does state its own run's figures and ratios.
        for (text, v) in [(&a, &A), (&b, &B)] {
            let ceiling = format!("{:.2}", v.ceiling);
            assert!(
                text.contains(&format!("delivered {ceiling} Mpps")),
                "{text}"
            );
            let ratio = format!("{:.0} %", 100.0 * v.mpps[0][0][0] / v.ceiling);
            assert!(text.contains(&ratio), "{ratio}: {text}");
            let over_pass = format!("{:.1} ns more than `xdp_pass`", v.ns[3] - v.ns[0]);
            assert!(text.contains(&over_pass), "{over_pass}: {text}");
            assert!(text.contains(&format!("this host's {} CPU(s)", v.cpus)));
            assert!(text.contains(&format!("{}-byte UDP", v.frame_size)));
        }
        // The analysis is referred to, not copied.
        assert!(a.contains(&format!("]({ANALYSIS_DOC})")));
        for prose in ["What limits it", "Mpps here", "perf record"] {
            assert!(!a.contains(prose), "{prose}");
        }
    }

    #[test]
    fn report_header_names_the_command_used_and_no_absolute_path() {
        let argv: Vec<String> = [
            "/work/main/target/release/lb",
            "bench",
            "--output",
            "/tmp/x/B.md",
            "--quick",
        ]
        .into_iter()
        .map(String::from)
        .collect();
        let root = Path::new("/work/main");
        assert_eq!(
            shown_command(None, &argv, Some(root)),
            "target/release/lb bench --output B.md --quick"
        );
        assert_eq!(
            shown_command(None, &argv, None),
            "lb bench --output B.md --quick"
        );
        assert_eq!(
            shown_command(Some("cargo xtask bench --quick"), &argv, Some(root)),
            "cargo xtask bench --quick"
        );
        assert_eq!(
            shown_command(
                Some("cargo xtask bench --output /work/main/out/R.md"),
                &argv,
                Some(root)
            ),
            "cargo xtask bench --output out/R.md"
        );
        assert_eq!(
            shown_command(Some(" "), &argv, None),
            "lb bench --output B.md --quick"
        );

        for command in [
            shown_command(None, &argv, Some(root)),
            shown_command(Some("cargo xtask bench --quick"), &argv, None),
        ] {
            let text = render(&Report {
                command: command.clone(),
                ..report(&A)
            });
            let header = text
                .lines()
                .find(|l| l.starts_with("Generated by"))
                .unwrap_or("");
            assert_eq!(
                header,
                format!("Generated by `{command}` on 2026-11-22 in 262 s."),
                "{text}"
            );
            assert!(!text.contains("via cargo xtask"), "{text}");
            let absolute: Vec<&str> = text
                .split(|c: char| c.is_whitespace() || "`()[]|,;:".contains(c))
                .filter(|w| w.starts_with('/'))
                .collect();
            assert!(
                absolute.is_empty(),
                "absolute paths {absolute:?} in:\n{text}"
            );
        }
    }

    #[test]
    fn report_without_http_or_plot_says_so() {
        let text = render(&Report {
            http: Err("skipped (--skip-http)".into()),
            ..report(&B)
        });
        assert!(text.contains("Not measured: skipped (--skip-http)"));
        assert!(!text.contains("HTTP,"), "no HTTP ratios without HTTP rows");
        assert!(!text.contains("!["), "no plot link without a plot");
        assert!(
            render(&report(&A))
                .contains("![delivered Mpps per configuration, ceiling marked](BENCHMARKS.svg)")
        );
    }

    #[test]
    fn dates_are_utc_calendar_days() {
        assert_eq!(utc_date(0), "1970-01-01");
        assert_eq!(utc_date(951_868_799), "2000-02-29");
        assert_eq!(utc_date(946_598_400), "1999-12-31");
        assert_eq!(utc_date(1_795_326_739), "2026-11-22");
        assert_eq!(grouped(1_000_000), "1 000 000");
        assert_eq!(grouped(999), "999");
    }

    #[test]
    fn stats_are_median_min_max() {
        assert_eq!(
            Stat::of(&[3.0, 1.0, 2.0]),
            Stat {
                median: 2.0,
                min: 1.0,
                max: 3.0
            }
        );
        assert_eq!(
            Stat::of(&[4.0, 1.0]),
            Stat {
                median: 2.5,
                min: 1.0,
                max: 4.0
            }
        );
        assert!(Stat::of(&[]).median.is_nan());
    }

    #[test]
    fn backends_are_distinct_and_outside_the_router_address() {
        let addrs: std::collections::HashSet<_> = (0..1000).map(backend_addr).collect();
        assert_eq!(addrs.len(), 1000);
        assert!(!addrs.contains(&Ipv4Addr::new(198, 19, 0, 1)));
    }

    #[test]
    fn wrk_output_parses() {
        let out = "Running 2s test @ http://198.18.0.10/\n  Latency Distribution\n     50%  812.00us\n     75%    1.10ms\n     90%    2.00ms\n     99%    3.50ms\n  40000 requests in 2.00s, 4.00MB read\nRequests/sec:  19999.50\nTransfer/sec:      2.00MB\n";
        let (rps, p50, p99) = parse_wrk(out).expect("parse");
        assert_eq!(rps, 19999.5);
        assert!((p50 - 0.812).abs() < 1e-9);
        assert_eq!(p99, 3.5);
        assert_eq!(wrk_ms("1.5s"), Some(1500.0));
        assert!(parse_wrk("garbage").is_err());
    }

    #[test]
    fn configs_validate() {
        for mode in [Forwarding::Nat, Forwarding::Dsr] {
            for n in [2, 100, 1000] {
                let cfg = lb_config(mode, n).expect("valid config");
                assert_eq!(cfg.services[0].backends.len(), n);
                assert_eq!(cfg.services[0].forwarding, mode);
            }
        }
    }
}
