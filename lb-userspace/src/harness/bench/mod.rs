//! `lb bench` (run by `cargo xtask bench`): builds its own topology in a
//! throwaway network namespace (`lbp{pid}-bench`, deleted on drop) and
//! measures, writing BENCHMARKS.md:
//!
//! - forwarding rate at the sink: generator (`pktgen`, XDP live frames) →
//!   veth → middle hop → veth → `sink`, with the middle hop either the
//!   `bare_fwd` ceiling or `lb` (NAT / DSR), sweeping flows and backends;
//! - ns/packet of `lb` with BPF_PROG_TEST_RUN, next to `xdp_pass`;
//! - a SYN flood: established connections, spoofed SYNs at full rate into
//!   a smaller table, legitimate clients meanwhile (`flood`).
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
//!
//! Files by job: `net` (the topology, its addresses, the generator's
//! traffic), `measure` (the forwarding and ns/packet sweeps and their typed
//! rows), `http` (wrk and HAProxy), `report` (BENCHMARKS.md), `svg` (its
//! chart) and `targets` (the targets judged on a run).

mod decap;
mod flood;
mod http;
mod measure;
mod net;
mod proxy;
mod report;
mod svg;
mod sync;
mod targets;
#[cfg(test)]
mod tests;

use std::path::PathBuf;

use anyhow::{Context, bail, ensure};

use crate::config::Forwarding;
use net::Family;

pub use http::{parse_wrk, wrk_ms};
pub use measure::{Stat, sink_packets};
pub use net::{
    BenchNet, CLIENT, GEN_MAC, LBIN_MAC, PORT, VIP, backend_addr, generator_spec, lb_config,
};
pub use net::{CLIENT6, VIP6, backend_addr6, frame6_to, generator_spec_v6, lb_config_dual};
pub use report::{COMMAND_ENV, shown_command, utc_date};

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
    /// With --profile-lb: new flows instead (DSR, the product's default
    /// tables, each call the first datagram of a flow not seen before, as
    /// the cost section's new-flow row)
    #[arg(long, conflicts_with = "profile_flows")]
    pub profile_new: bool,
    /// With --profile-new: full NAT's new flows instead of DSR's (as the
    /// cost section's full-NAT row; at most 240 000 flows, below
    /// the 262 144 claims `FNAT_CLAIMS` is rated for, since no sweep frees them)
    #[arg(long, requires = "profile_new")]
    pub profile_full_nat: bool,
    /// With --profile-lb: IPv6's flow instead of IPv4's (`lb_v6`, on the
    /// dual-stack config of the cost section's IPv6 rows)
    #[arg(long, conflicts_with_all = ["profile_flows", "profile_full_nat"])]
    pub profile_v6: bool,
    /// With --profile-lb: NAT (NAT66 with --profile-v6) instead of DSR (its
    /// established flow with --profile-one-call only: NAT rewrites the
    /// frame a repeat runs on again)
    #[arg(long, conflicts_with_all = ["profile_flows", "profile_full_nat"])]
    pub profile_nat: bool,
    /// With --profile-lb: one packet per call (repeat=1, as the paired
    /// rows measure) instead of 1 000 000 repeats of one frame per call
    #[arg(long, conflicts_with = "profile_flows")]
    pub profile_one_call: bool,
    /// Run only these sections (comma-separated) and print the report;
    /// BENCHMARKS.md is left alone unless --output names a file
    #[arg(long, value_enum, value_delimiter = ',')]
    pub only: Vec<Section>,
}

/// A part of the benchmark that `--only` can run alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Section {
    /// The ceiling, then lb in both modes at 100 backends over 1, 100 000
    /// and 1 000 000 flows, uniform and Zipf: the flow mix and the
    /// connection table's cost per packet; then the IPv6 ceiling and lb
    /// NAT66 and DSR over IPv6 with 1 and 1 000 000 flows
    FlowMix,
    /// Established connections, then spoofed SYNs at full rate into a
    /// table smaller than the flood while clients connect: what survived,
    /// what was served, the Mpps held (both modes)
    SynFlood,
    /// ns/packet under BPF_PROG_TEST_RUN: established and new flows in both
    /// modes, next to `xdp_pass`; IPv6's next to IPv4's, paired
    Cost,
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
    let only = !args.only.is_empty();
    let (flow_sweep, backend_sweep): (&[u32], &[usize]) = if only {
        if args.only.contains(&Section::FlowMix) {
            (&[1, 100_000, 1_000_000], &[measure::MIX_BACKENDS])
        } else {
            (&[], &[])
        }
    } else if args.quick {
        (&[1, 100_000], &[2, 100])
    } else {
        (&[1, 1000, 100_000, 1_000_000], &[2, 100, 1000])
    };
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let threads = args.threads.unwrap_or(cpus);
    let syn_flood = !only || args.only.contains(&Section::SynFlood);
    let max_backends = backend_sweep
        .iter()
        .copied()
        .chain(syn_flood.then_some(flood::BACKENDS))
        // The ns/packet rows are measured at 100 backends.
        .chain((!only || args.only.contains(&Section::Cost)).then_some(measure::MIX_BACKENDS))
        .max()
        .unwrap_or(2);
    let started = std::time::Instant::now();
    net::cleanup_on_signal()?;
    let net = BenchNet::new(&net::bench_netns(), max_backends, cpus)?;
    // Issue 24's rows: the IPv6 backends mirror the IPv4 ones.
    net.enable_ipv6(max_backends)?;
    if let Some(secs) = args.profile_lb {
        return match args.profile_flows {
            Some(flows) => net.run(|| measure::profile_forwarding(secs, flows, threads)),
            None => net.run(|| {
                measure::profile_lb(
                    secs,
                    measure::ProfileLoad {
                        new_flows: args.profile_new,
                        mode: if args.profile_full_nat {
                            Forwarding::FullNat
                        } else if args.profile_nat {
                            Forwarding::Nat
                        } else {
                            Forwarding::Dsr
                        },
                        family: if args.profile_v6 {
                            Family::V6
                        } else {
                            Family::V4
                        },
                        one_call: args.profile_one_call,
                    },
                )
            }),
        };
    }
    let reps = args.reps;
    let (fwd, ns, families, firewall, schedulers, flood, sync) = net.run(|| {
        let mut ebpf = super::load_bench_object()?;
        // Always the ceiling at least (empty sweeps): every section's
        // ratios are to the bare forwarder in the same run.
        let fwd = measure::forwarding_rows(
            &mut ebpf,
            flow_sweep,
            backend_sweep,
            (reps, seconds, threads),
        )?;
        let flood = if syn_flood {
            flood::flood_rows(&mut ebpf, (reps, seconds, threads))?
        } else {
            Vec::new()
        };
        if only {
            let (ns, families, sync) = if args.only.contains(&Section::Cost) {
                (
                    measure::cost_rows(&mut ebpf, args.quick, reps)?,
                    measure::family_rows(&mut ebpf, args.quick, reps)?,
                    sync::sync_rows(args.quick, reps)?,
                )
            } else {
                (
                    Vec::new(),
                    measure::FamilyCost::default(),
                    sync::SyncRows::default(),
                )
            };
            return Ok((fwd, ns, families, Vec::new(), Vec::new(), flood, sync));
        }
        let ns = measure::cost_rows(&mut ebpf, args.quick, reps)?;
        let families = measure::family_rows(&mut ebpf, args.quick, reps)?;
        let firewall = measure::firewall_rows(args.quick, reps)?;
        let schedulers = measure::scheduler_rows(args.quick, reps)?;
        let sync = sync::sync_rows(args.quick, reps)?;
        Ok((fwd, ns, families, firewall, schedulers, flood, sync))
    })?;
    drop(net);
    let http = if only {
        Err(format!("not in --only {:?}", args.only))
    } else if args.skip_http {
        Err("skipped (--skip-http)".to_string())
    } else {
        let secs = if args.quick { 2 } else { 5 };
        eprintln!("bench: HTTP (wrk, {secs} s per run)");
        http::http_bench(reps, secs).map_err(|e| format!("failed: {e:#}"))
    };
    if let Err(e) = &http {
        eprintln!("bench: HTTP comparison {e}");
    }
    let took = started.elapsed();
    // --only prints its sections; it writes files only where told to.
    let output = match (&args.output, only) {
        (Some(path), _) => Some(path.clone()),
        (None, false) => Some(report::default_output()),
        (None, true) => None,
    };
    let plot = output.as_ref().map(|o| o.with_extension("svg"));
    if let Some(plot) = &plot {
        std::fs::write(plot, svg::plot_svg(&fwd))
            .with_context(|| format!("writing {}", plot.display()))?;
    }
    let argv: Vec<String> = std::env::args().collect();
    let unix_secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let report = report::Report {
        command: shown_command(
            std::env::var(COMMAND_ENV).ok().as_deref(),
            &argv,
            report::workspace_root().as_deref(),
        ),
        date: utc_date(unix_secs),
        machine: report::machine(),
        cpus,
        reps,
        seconds,
        threads,
        frame_size: generator_spec(0, 1, seconds, threads).frame.size,
        sender: crate::pktgen::sender_used(),
        took,
        fwd,
        ns,
        families,
        firewall,
        schedulers,
        flood,
        sync,
        http,
        wrk_loads: http::WRK_LOADS
            .iter()
            .map(|(load, t, c)| ((*load).to_owned(), format!("{t} {c}")))
            .collect(),
        plot: plot
            .as_ref()
            .and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned()),
    };
    let text = report::render(&report);
    print!("{text}");
    match &output {
        Some(output) => {
            std::fs::write(output, &text)
                .with_context(|| format!("writing {}", output.display()))?;
            eprintln!(
                "bench: wrote {} in {:.0} s",
                output.display(),
                took.as_secs_f64()
            );
        }
        None => eprintln!(
            "bench: --only, nothing written, {:.0} s",
            took.as_secs_f64()
        ),
    }
    if report.fwd.iter().any(|r| r.delivered.median.is_nan()) {
        bail!("some measurements produced no result");
    }
    Ok(())
}
