//! The measurements: forwarding rate at the sink (the ceiling, then `lb` in
//! both modes over the backend and flow sweeps), ns/packet under
//! BPF_PROG_TEST_RUN, the steady loads `--profile-lb` runs, and the typed
//! rows they produce.

use std::{fmt, net::SocketAddrV4, time::Duration};

use anyhow::{Context, ensure};
use aya::{
    Ebpf,
    maps::{Array, PerCpuArray},
    programs::XdpMode as AyaXdpMode,
};
use lb_common::{
    Counters, DEFAULT_CONNTRACK_SIZE, DEFAULT_HALF_OPEN_SIZE, FwdConf, TRACE_DEFAULT_VERDICTS,
    capture::{CAPTURE_FORWARDED, CAPTURE_NOT_FORWARDED, CaptureConf},
};

use super::net::{
    CLIENT, CONNTRACK, Family, LBOUT_MAC, NEW_FLOWS_PER_BATCH, PORT, SINK_MAC, frame_from,
    frame_to, generator_spec, generator_spec_v6, lb_config, lb_config_dual, lb_config_for,
    new_flow_frames, new_flows_of,
};
use crate::{
    capture::Capturer,
    config::{Forwarding, Scheduler},
    dataplane::{Dataplane, TableSizes},
    harness::{
        pktgen::{self, FlowDist, Spec},
        xdp::{self, XDP_PASS, XDP_REDIRECT},
    },
    trace::Tracer,
};

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

    pub(super) fn text(&self, digits: usize) -> String {
        format!(
            "{:.d$} ({:.d$}–{:.d$})",
            self.median,
            self.min,
            self.max,
            d = digits
        )
    }
}

/// Frames the `sink` program counted so far.
pub fn sink_packets(ebpf: &Ebpf) -> anyhow::Result<u64> {
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

/// One flow through `hop` and through the `ceiling` program (`bare_fwd`,
/// or `bare_fwd6` for IPv6; `FWD_CONF` already set), back to back in each
/// repetition, in alternating order (the first of a pair has no edge): the
/// hop's offered and delivered Mpps, and the per-repetition ratio of its
/// delivered rate to the ceiling's.
fn paired_with_ceiling(
    ebpf: &mut Ebpf,
    spec: &Spec,
    reps: usize,
    mut hop: PairedHop<'_>,
    ceiling: &'static str,
) -> anyhow::Result<(Stat, Stat, Stat)> {
    let (mut offered, mut delivered, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    let mut bare = PairedHop::Bench(ceiling);
    for rep in 0..reps {
        let ((o, d), (_, ceiling)) = if rep % 2 == 0 {
            let c = through(ebpf, &mut bare, spec)?;
            (through(ebpf, &mut hop, spec)?, c)
        } else {
            let h = through(ebpf, &mut hop, spec)?;
            (h, through(ebpf, &mut bare, spec)?)
        };
        offered.push(o);
        delivered.push(d);
        ratios.push(d / ceiling);
    }
    Ok((Stat::of(&offered), Stat::of(&delivered), Stat::of(&ratios)))
}

/// Offered and delivered Mpps of one run through `hop` on the middle hop,
/// attached for it (after a short pass: a flow's first packets make its
/// entry) and detached after.
fn through(ebpf: &mut Ebpf, hop: &mut PairedHop<'_>, spec: &Spec) -> anyhow::Result<(f64, f64)> {
    let link = hop
        .program(ebpf)?
        .attach("lbin", AyaXdpMode::Driver)
        .context("attach the middle hop")?;
    let warm = Spec {
        limit: pktgen::Limit::Count(1000),
        rate: None,
        ..spec.clone()
    };
    forward_once(ebpf, &warm)?;
    let rates = forward_once(ebpf, spec)?;
    hop.program(ebpf)?
        .detach(link)
        .context("detach the middle hop")?;
    Ok(rates)
}

/// The hop [`paired_with_ceiling`] measures: a program of the bench's
/// object, or a data plane's `lb`.
enum PairedHop<'a> {
    Bench(&'static str),
    Lb(&'a mut Dataplane),
}

impl PairedHop<'_> {
    fn program<'b>(&'b mut self, ebpf: &'b mut Ebpf) -> anyhow::Result<&'b mut aya::programs::Xdp> {
        Ok(match self {
            PairedHop::Bench(name) => xdp::xdp_program(ebpf, name)?,
            PairedHop::Lb(dp) => dp.program()?,
        })
    }
}

/// The middle hop of a forwarding measurement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Hop {
    /// `bare_fwd`: MAC rewrite and redirect, the ceiling.
    Ceiling,
    /// `hash_fwd`: the ceiling plus one 5-tuple hash lookup, the floor of
    /// any forwarder with a connection table.
    HashFwd,
    Lb(Forwarding),
    /// `bare_fwd6`: the ceiling for IPv6 frames (issue 24).
    Ceiling6,
    /// `lb` forwarding IPv6 (NAT66 or DSR) on its dual-stack config.
    Lb6(Forwarding),
}

impl Hop {
    /// The ceiling this hop's rate is a fraction of: [`Hop::Ceiling6`] for
    /// the IPv6 rows, [`Hop::Ceiling`] for the others.
    pub(super) fn ceiling(self) -> Hop {
        match self {
            Hop::Ceiling6 | Hop::Lb6(_) => Hop::Ceiling6,
            _ => Hop::Ceiling,
        }
    }
}

/// `Nat` / `Dsr` / `Ipip` / `Gue`, as the report names the modes.
pub(super) fn mode_name(mode: Forwarding) -> &'static str {
    match mode {
        Forwarding::Nat => "Nat",
        Forwarding::Dsr => "Dsr",
        Forwarding::Ipip => "Ipip",
        Forwarding::Gue => "Gue",
        Forwarding::FullNat => "FullNat",
    }
}

impl fmt::Display for Hop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Hop::Ceiling => f.write_str("bare_fwd (ceiling)"),
            Hop::HashFwd => f.write_str("hash_fwd (ceiling + one flow lookup)"),
            Hop::Lb(mode) => write!(f, "lb {}", mode_name(*mode)),
            Hop::Ceiling6 => f.write_str("bare_fwd6 (IPv6 ceiling)"),
            Hop::Lb6(Forwarding::Nat) => f.write_str("lb Nat66"),
            Hop::Lb6(mode) => write!(f, "lb {} IPv6", mode_name(*mode)),
        }
    }
}

/// One forwarding configuration's rates.
#[derive(Debug)]
pub(super) struct FwdRow {
    pub(super) hop: Hop,
    pub(super) flows: u32,
    /// How the generator spread its frames over the flows.
    pub(super) dist: FlowDist,
    pub(super) backends: usize,
    pub(super) offered: Stat,
    pub(super) delivered: Stat,
    /// One-flow rows: the ratio to the ceiling measured with each
    /// repetition (`bare_fwd` and this hop back to back), so a machine
    /// that drifts between sections does not read as the hop's cost.
    pub(super) paired: Option<Stat>,
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

/// Whether a cost measurement's flow is in the connection table already.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum FlowState {
    Established,
    New,
    /// A new flow into the flow-mix sweep's tables (2 097 152 flows each)
    /// instead of the product's default sizes: what the tables' size costs
    /// a new flow (cache and TLB misses).
    NewLargeTables,
    /// Established flows, one packet each from a stream over
    /// [`COLD_FLOWS`] of them: the flow table's cost when its entries are
    /// not in the cache.
    EstablishedCold,
}

/// The program a cost row measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum NsProgram {
    /// `xdp_pass`: the floor of BPF_PROG_TEST_RUN's cost.
    XdpPass,
    /// `hash_fwd`: parse, one flow-table lookup, MAC rewrite, redirect.
    HashFwd,
    /// `bare_fwd`: MAC rewrite and redirect, the ceiling's program.
    BareFwd,
    Lb {
        mode: Forwarding,
        backends: usize,
        flow: FlowState,
    },
    /// `lb` (DSR, 100 backends) with drop tracing off or on.
    LbTracing { packet: TracedPacket, on: bool },
    /// `lb` (DSR, 100 backends), an established flow, with `lb capture`
    /// off or on with a filter that matches nothing.
    LbCapture { on: bool },
    /// `lb_decap`, the backends' decapsulator (`lb decap`).
    Decap(DecapPacket),
    /// `lb` full NAT (100 backends), a TCP flow's established data
    /// segment, with `proxy-protocol = "v2"` or without (`proxy.rs`).
    LbTcpFullNat { proxy: bool },
    /// `ipip_fwd` / `gue_fwd` (the tunnel mode given): `bare_fwd` plus
    /// the room made in front and the outer headers written, issue 26's
    /// floor under `lb`'s tunnel rows.
    EncapFloor(Forwarding),
}

/// The packet of an `lb decap` cost row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum DecapPacket {
    /// IPIP from an allowed LB: decapsulated.
    Ipip,
    /// GUE from an allowed LB: decapsulated.
    Gue,
    /// The plain frame: not a tunnel, passed.
    NotTunnel,
}

/// The packet of a drop-tracing cost row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum TracedPacket {
    /// Forwarded: never reads the tracing switch.
    Established,
    /// Not forwarded (a VIP port without a service, `pass_no_service`):
    /// reads the switch; with tracing on and no reader the ring buffer is
    /// full, so it also re-reads its headers and counts a lost event.
    NotForwarded,
}

impl fmt::Display for NsProgram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NsProgram::XdpPass => f.write_str("xdp_pass"),
            NsProgram::HashFwd => f.write_str("hash_fwd (one flow lookup, MAC rewrite, redirect)"),
            NsProgram::BareFwd => f.write_str("bare_fwd (MAC rewrite, redirect)"),
            NsProgram::EncapFloor(mode) => write!(
                f,
                "{} (bare_fwd + bpf_xdp_adjust_head {} B + outer headers)",
                encap_floor_name(*mode),
                encap_floor_overhead(*mode)
            ),
            NsProgram::Lb {
                mode,
                backends,
                flow,
            } => {
                let flow = match flow {
                    FlowState::Established => "established flow",
                    FlowState::New => "new flow",
                    FlowState::NewLargeTables => "new flow, the sweep's tables",
                    FlowState::EstablishedCold => {
                        return write!(
                            f,
                            "lb {} ({backends} backends), established flow, a stream over {} flows (cold)",
                            mode_name(*mode),
                            super::targets::grouped(COLD_FLOWS)
                        );
                    }
                };
                write!(f, "lb {} ({backends} backends), {flow}", mode_name(*mode))
            }
            NsProgram::LbTracing { packet, on } => {
                let packet = match packet {
                    TracedPacket::Established => "established flow",
                    TracedPacket::NotForwarded => "not forwarded (pass_no_service)",
                };
                let tracing = if *on {
                    "drop tracing on, no reader (ring full)"
                } else {
                    "drop tracing off"
                };
                write!(f, "lb DSR (100 backends), {packet}, {tracing}")
            }
            NsProgram::LbTcpFullNat { proxy } => write!(
                f,
                "lb full NAT{} (100 backends), TCP established flow",
                if *proxy { " + PROXY v2" } else { "" }
            ),
            NsProgram::Decap(packet) => f.write_str(match packet {
                DecapPacket::Ipip => "lb decap, IPIP from an allowed LB (decapsulated)",
                DecapPacket::Gue => "lb decap, GUE from an allowed LB (decapsulated)",
                DecapPacket::NotTunnel => "lb decap, a packet that is no tunnel (passed)",
            }),
            NsProgram::LbCapture { on } => write!(
                f,
                "lb DSR (100 backends), established flow, {}",
                if *on {
                    "capture on, filter matching nothing"
                } else {
                    "capture off"
                }
            ),
        }
    }
}

/// How a cost row was measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum NsMethod {
    /// One frame, the kernel repeating the run this many times.
    Repeat(u32),
    /// This many calls of one frame, repeat=1.
    Calls(usize),
    /// This many calls, each a new flow, repeat=1.
    DistinctFlows(usize),
    /// This many calls of one frame, repeat=1, in each of `rounds` rounds
    /// that measure every program of issue 26's rows in turn.
    Paired { calls: usize, rounds: usize },
    /// This many calls (one frame, or `new`: each a new flow), repeat=1,
    /// in each of `rounds` rounds that measure NAT and full NAT in turn
    /// (issue 25's targets).
    PairedWithNat {
        calls: usize,
        rounds: usize,
        new: bool,
    },
}

impl fmt::Display for NsMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NsMethod::Repeat(n) => write!(f, "repeat={n}"),
            NsMethod::Calls(n) => write!(f, "{n} calls, repeat=1"),
            NsMethod::DistinctFlows(n) => write!(f, "{n} distinct flows, repeat=1"),
            NsMethod::Paired { calls, rounds } => write!(
                f,
                "{calls} calls, repeat=1, paired: {rounds} rounds over the tunnel rows"
            ),
            NsMethod::PairedWithNat { calls, rounds, new } => write!(
                f,
                "{calls} {}, repeat=1, paired: {rounds} rounds of NAT and full NAT",
                if *new { "distinct flows" } else { "calls" }
            ),
        }
    }
}

/// One ns/packet measurement.
#[derive(Debug)]
pub(super) struct NsRow {
    pub(super) program: NsProgram,
    pub(super) method: NsMethod,
    pub(super) ns: Stat,
}

/// Real forwarding of `flows` flows through `lb` (DSR, 100 backends) for
/// `secs` seconds after a warm-up pass, for an external profiler.
pub(super) fn profile_forwarding(secs: f64, flows: u32, threads: usize) -> anyhow::Result<()> {
    let mut ebpf = crate::harness::load_bench_object()?;
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

/// What `--profile-lb` runs: `lb` in `mode` (100 backends), `family`'s
/// established flow or new flows, each call one frame repeated 1 000 000
/// times or (`one_call`) one packet per call as the paired rows measure.
#[derive(Clone, Copy, Debug)]
pub(super) struct ProfileLoad {
    pub(super) new_flows: bool,
    pub(super) mode: Forwarding,
    pub(super) family: Family,
    pub(super) one_call: bool,
}

/// A steady BPF_PROG_TEST_RUN load of `lb` as `load` says for `secs`
/// seconds, for an external profiler. IPv4 runs on the cost section's
/// config, IPv6 on the dual-stack one of its IPv6 rows (so `lb` reaches
/// `lb_v6` by its tail call, as deployed).
pub(super) fn profile_lb(secs: f64, load: ProfileLoad) -> anyhow::Result<()> {
    // BPF_PROG_TEST_RUN repeats a run on the frame as the last one left
    // it: NAT's rewrite would make the repeats packets to the backend.
    ensure!(
        load.mode == Forwarding::Dsr || load.new_flows || load.one_call,
        "NAT rewrites the frame in place, so repeats of one frame are not one flow's packets: \
         profile NAT's established flow with --profile-one-call"
    );
    let lbin = xdp::ifindex("lbin")?;
    let v6 = load.family == Family::V6;
    let sizes = if load.new_flows || v6 {
        // As the cost section's new-flow and IPv6 rows: the product's
        // default tables.
        TableSizes {
            conntrack: DEFAULT_CONNTRACK_SIZE,
            half_open: DEFAULT_HALF_OPEN_SIZE,
        }
    } else {
        CONNTRACK
    };
    let mut dp = Dataplane::load(sizes)?;
    dp.apply(&if v6 {
        lb_config_dual(load.mode, 100, sizes)?
    } else {
        cost_config(load.mode)?
    })?;
    // Full NAT: each new flow holds a claim that nothing frees here.
    let batches: u32 = if load.mode == Forwarding::FullNat {
        12
    } else {
        u32::from(u8::MAX)
    };
    let one = load.family.established_frame()?;
    // A UDP flow's second datagram establishes it.
    for _ in 0..2 {
        ns_per_packet(
            dp.program()?,
            std::slice::from_ref(&one),
            lbin,
            1,
            Some(XDP_REDIRECT),
        )?;
    }
    let (est, repeat) = if load.one_call {
        (vec![one; 2_000], 1)
    } else {
        (vec![one], 1_000_000)
    };
    let prog = dp.program()?;
    let deadline = std::time::Instant::now() + Duration::from_secs_f64(secs);
    let mut samples = Vec::new();
    // New flows: distinct batches only (a flow seen twice would be a
    // second datagram, which promotes it).
    let mut batch = 0u32;
    while std::time::Instant::now() < deadline {
        samples.push(if load.new_flows {
            let frames = match load.family {
                Family::V4 => new_flow_frames(batch as u8, 20_000)?,
                Family::V6 => new_flows_of(Family::V6, batch, NEW_FLOWS_PER_BATCH)?,
            };
            let ns = ns_per_packet(prog, &frames, lbin, 1, Some(XDP_REDIRECT))?;
            batch += 1;
            if batch == batches {
                break;
            }
            ns
        } else {
            ns_per_packet(prog, &est, lbin, repeat, Some(XDP_REDIRECT))?
        });
    }
    eprintln!(
        "bench: profiled lb ({}, {:?}, {}, {}) for {secs} s: {:.1} ns/packet (median of {} runs)",
        if load.new_flows {
            "new flows"
        } else {
            "established flow"
        },
        load.family,
        load.mode.name(),
        if load.one_call || load.new_flows {
            "one packet per call"
        } else {
            "repeat=1000000"
        },
        Stat::of(&samples).median,
        samples.len()
    );
    Ok(())
}

/// The cost section's config of `mode` at 100 backends; full NAT's source
/// address is the LB's own on the backends' side.
fn cost_config(mode: Forwarding) -> anyhow::Result<crate::config::Config> {
    match mode {
        Forwarding::FullNat => lb_config_for(
            mode,
            100,
            "udp",
            CONNTRACK,
            "source-addresses = [\"198.19.0.1\"]",
        ),
        _ => lb_config(mode, 100),
    }
}

/// Mean ns/packet of `prog` over `frames` (each run with `repeat`), as the
/// kernel reports it; every return value must be `expect` (if given).
pub(super) fn ns_per_packet(
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

/// The realistic flow mix measured next to the uniform one: a Zipf law of
/// this exponent (a few flows carry most packets), at `MIX_BACKENDS`
/// backends and flow counts from `MIX_MIN_FLOWS` up.
pub(super) const ZIPF_S: f64 = 1.0;
pub(super) const MIX_BACKENDS: usize = 100;
pub(super) const MIX_MIN_FLOWS: u32 = 100_000;

/// The forwarding sweep: the ceiling (`bare_fwd` on the middle hop), then
/// `lb` in both modes for every backend and flow count, uniform flows, and
/// the Zipf mix too at `MIX_BACKENDS` backends and `MIX_MIN_FLOWS` or more. Runs inside the
/// benchmark's namespace, with `ebpf` holding the `sink` and `bare_fwd`.
pub(super) fn forwarding_rows(
    ebpf: &mut Ebpf,
    flow_sweep: &[u32],
    backend_sweep: &[usize],
    (reps, seconds, threads): (usize, f64, usize),
) -> anyhow::Result<Vec<FwdRow>> {
    let ifindex = |d: &str| xdp::ifindex(d);
    let (gen0, lbout) = (ifindex("gen0")?, ifindex("lbout")?);
    // The link lasts as long as `ebpf` (dropping the id does not detach):
    // later sections count at the same sink.
    let _sink = xdp::xdp_program(ebpf, "sink")?
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
    let link = xdp::xdp_program(ebpf, "bare_fwd")?
        .attach("lbin", AyaXdpMode::Driver)
        .context("attach bare_fwd")?;
    eprintln!("bench: ceiling (bare_fwd)");
    let (offered, delivered) = forward(ebpf, &spec(1), reps)?;
    rows.push(FwdRow {
        hop: Hop::Ceiling,
        flows: 1,
        dist: FlowDist::Uniform,
        backends: 0,
        offered,
        delivered,
        paired: None,
    });
    xdp::xdp_program(ebpf, "bare_fwd")?
        .detach(link)
        .context("detach bare_fwd")?;
    // (a') The same with one flow-table lookup: what being stateful costs
    // before anything `lb` adds.
    eprintln!("bench: hash_fwd (ceiling + one flow lookup)");
    let (offered, delivered, paired) = paired_with_ceiling(
        ebpf,
        &spec(1),
        reps,
        PairedHop::Bench("hash_fwd"),
        "bare_fwd",
    )?;
    rows.push(FwdRow {
        hop: Hop::HashFwd,
        flows: 1,
        dist: FlowDist::Uniform,
        backends: 0,
        offered,
        delivered,
        paired: Some(paired),
    });

    // (b) lb in both modes.
    for mode in [Forwarding::Nat, Forwarding::Dsr] {
        for &backends in backend_sweep {
            let cfg = lb_config(mode, backends)?;
            let mut dp = Dataplane::load(CONNTRACK)?;
            dp.apply(&cfg)?;
            if flow_sweep.contains(&1) {
                eprintln!(
                    "bench: {}, {backends} backends, 1 flow, paired with the ceiling",
                    Hop::Lb(mode)
                );
                let (offered, delivered, paired) =
                    paired_with_ceiling(ebpf, &spec(1), reps, PairedHop::Lb(&mut dp), "bare_fwd")?;
                rows.push(FwdRow {
                    hop: Hop::Lb(mode),
                    flows: 1,
                    dist: FlowDist::Uniform,
                    backends,
                    offered,
                    delivered,
                    paired: Some(paired),
                });
            }
            dp.attach("lbin", cfg.dataplane.xdp_mode)?;
            for &flows in flow_sweep.iter().filter(|&&f| f != 1) {
                let mut dists = vec![FlowDist::Uniform];
                if backends == MIX_BACKENDS && flows >= MIX_MIN_FLOWS {
                    dists.push(FlowDist::Zipf { s: ZIPF_S });
                }
                // Uniform first: its warm-up fills the table with every
                // flow, so the Zipf run meets a full table, as a real LB
                // whose tail flows come and go would.
                for dist in dists {
                    eprintln!(
                        "bench: {}, {backends} backends, {flows} flows ({dist})",
                        Hop::Lb(mode)
                    );
                    let spec = Spec {
                        dist,
                        ..spec(flows)
                    };
                    let (offered, delivered) = forward(ebpf, &spec, reps)?;
                    rows.push(FwdRow {
                        hop: Hop::Lb(mode),
                        flows,
                        dist,
                        backends,
                        offered,
                        delivered,
                        paired: None,
                    });
                }
            }
        }
    }
    if let Some(&most) = flow_sweep.iter().max() {
        rows.extend(forwarding_rows_v6(ebpf, most, (reps, seconds, threads))?);
    }
    Ok(rows)
}

/// Issue 24's IPv6 forwarding rows, after the IPv4 sweep (whose sink stays
/// attached): the IPv6 ceiling (`bare_fwd6` on IPv6 frames of the same
/// size), then `lb` NAT66 and DSR at [`MIX_BACKENDS`] backends (the
/// dual-stack config, the sweep's tables) with one flow, paired with the
/// IPv6 ceiling as the IPv4 rows are with theirs, and with `most` flows
/// (the sweep's largest count: 1 000 000 in the full run).
fn forwarding_rows_v6(
    ebpf: &mut Ebpf,
    most: u32,
    (reps, seconds, threads): (usize, f64, usize),
) -> anyhow::Result<Vec<FwdRow>> {
    let gen0 = xdp::ifindex("gen0")?;
    let spec = |flows: u32| generator_spec_v6(gen0, flows, seconds, threads);
    let mut rows = Vec::new();
    eprintln!("bench: IPv6 ceiling (bare_fwd6)");
    let link = xdp::xdp_program(ebpf, "bare_fwd6")?
        .attach("lbin", AyaXdpMode::Driver)
        .context("attach bare_fwd6")?;
    let (offered, delivered) = forward(ebpf, &spec(1), reps)?;
    xdp::xdp_program(ebpf, "bare_fwd6")?
        .detach(link)
        .context("detach bare_fwd6")?;
    rows.push(FwdRow {
        hop: Hop::Ceiling6,
        flows: 1,
        dist: FlowDist::Uniform,
        backends: 0,
        offered,
        delivered,
        paired: None,
    });
    for mode in [Forwarding::Nat, Forwarding::Dsr] {
        let cfg = lb_config_dual(mode, MIX_BACKENDS, CONNTRACK)?;
        let mut dp = Dataplane::load(CONNTRACK)?;
        dp.apply(&cfg)?;
        let hop = Hop::Lb6(mode);
        eprintln!("bench: {hop}, {MIX_BACKENDS} backends, 1 flow, paired with the IPv6 ceiling");
        let (offered, delivered, paired) =
            paired_with_ceiling(ebpf, &spec(1), reps, PairedHop::Lb(&mut dp), "bare_fwd6")?;
        rows.push(FwdRow {
            hop,
            flows: 1,
            dist: FlowDist::Uniform,
            backends: MIX_BACKENDS,
            offered,
            delivered,
            paired: Some(paired),
        });
        if most > 1 {
            dp.attach("lbin", cfg.dataplane.xdp_mode)?;
            eprintln!("bench: {hop}, {MIX_BACKENDS} backends, {most} flows (uniform)");
            let (offered, delivered) = forward(ebpf, &spec(most), reps)?;
            rows.push(FwdRow {
                hop,
                flows: most,
                dist: FlowDist::Uniform,
                backends: MIX_BACKENDS,
                offered,
                delivered,
                paired: None,
            });
        }
    }
    Ok(rows)
}

/// ns/packet of `xdp_pass` and of `lb` (both modes, 100 backends) under
/// BPF_PROG_TEST_RUN: established and new flows, repeat=1 and repeated.
pub(super) fn cost_rows(ebpf: &mut Ebpf, quick: bool, reps: usize) -> anyhow::Result<Vec<NsRow>> {
    // (c) ns/packet with BPF_PROG_TEST_RUN.
    eprintln!("bench: ns/packet (BPF_PROG_TEST_RUN)");
    let lbin = xdp::ifindex("lbin")?;
    let mut ns_rows = Vec::new();
    let repeat: u32 = if quick { 100_000 } else { 1_000_000 };
    let calls = if quick { 2_000 } else { 20_000 };
    let est = vec![frame_from(SocketAddrV4::new(CLIENT, 1024))?];
    let est_calls: Vec<Vec<u8>> = std::iter::repeat_n(est[0].clone(), calls).collect();
    {
        let pass = xdp::xdp_program(ebpf, "xdp_pass")?;
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for _ in 0..reps {
            a.push(ns_per_packet(pass, &est, lbin, repeat, Some(XDP_PASS))?);
            b.push(ns_per_packet(pass, &est_calls, lbin, 1, Some(XDP_PASS))?);
        }
        ns_rows.push(NsRow {
            program: NsProgram::XdpPass,
            method: NsMethod::Repeat(repeat),
            ns: Stat::of(&a),
        });
        ns_rows.push(NsRow {
            program: NsProgram::XdpPass,
            method: NsMethod::Calls(calls),
            ns: Stat::of(&b),
        });
        // The forwarding section set `FWD_CONF` (its ceiling always runs).
        let hash = xdp::xdp_program(ebpf, "hash_fwd")?;
        let mut h = Vec::new();
        for _ in 0..reps {
            h.push(ns_per_packet(hash, &est, lbin, repeat, Some(XDP_REDIRECT))?);
        }
        ns_rows.push(NsRow {
            program: NsProgram::HashFwd,
            method: NsMethod::Repeat(repeat),
            ns: Stat::of(&h),
        });
        // Both forwarders one call each too, and the bare one: the floors
        // issue 23's targets compare `lb` with.
        for (program, name) in [
            (NsProgram::HashFwd, "hash_fwd"),
            (NsProgram::BareFwd, "bare_fwd"),
        ] {
            let prog = xdp::xdp_program(ebpf, name)?;
            let (mut rep, mut each) = (Vec::new(), Vec::new());
            for _ in 0..reps {
                if program == NsProgram::BareFwd {
                    rep.push(ns_per_packet(prog, &est, lbin, repeat, Some(XDP_REDIRECT))?);
                }
                each.push(ns_per_packet(
                    prog,
                    &est_calls,
                    lbin,
                    1,
                    Some(XDP_REDIRECT),
                )?);
            }
            if !rep.is_empty() {
                ns_rows.push(NsRow {
                    program,
                    method: NsMethod::Repeat(repeat),
                    ns: Stat::of(&rep),
                });
            }
            ns_rows.push(NsRow {
                program,
                method: NsMethod::Calls(calls),
                ns: Stat::of(&each),
            });
        }
    }
    // Full NAT (issue 25) last, so NAT's and DSR's rows are measured where
    // they were before it: its targets are NAT's rows.
    for mode in [Forwarding::Nat, Forwarding::Dsr, Forwarding::FullNat] {
        let config = || cost_config(mode);
        // The product's default table sizes, as a deployment has them.
        let mut dp = Dataplane::load(TableSizes {
            conntrack: DEFAULT_CONNTRACK_SIZE,
            half_open: DEFAULT_HALF_OPEN_SIZE,
        })?;
        dp.apply(&config()?)?;
        let mut large = Dataplane::load(CONNTRACK)?;
        large.apply(&config()?)?;
        let large_prog = large.program()?;
        let mut large_ns = Vec::new();
        for rep in 0..reps {
            large_ns.push(ns_per_packet(
                large_prog,
                &new_flow_frames(rep as u8, calls)?,
                lbin,
                1,
                Some(XDP_REDIRECT),
            )?);
        }
        drop(large);
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
        let lb = |flow| NsProgram::Lb {
            mode,
            backends: 100,
            flow,
        };
        if !rep_ns.is_empty() {
            ns_rows.push(NsRow {
                program: lb(FlowState::Established),
                method: NsMethod::Repeat(repeat),
                ns: Stat::of(&rep_ns),
            });
        }
        ns_rows.push(NsRow {
            program: lb(FlowState::Established),
            method: NsMethod::Calls(calls),
            ns: Stat::of(&est_ns),
        });
        ns_rows.push(NsRow {
            program: lb(FlowState::New),
            method: NsMethod::DistinctFlows(calls),
            ns: Stat::of(&new_ns),
        });
        ns_rows.push(NsRow {
            program: lb(FlowState::NewLargeTables),
            method: NsMethod::DistinctFlows(calls),
            ns: Stat::of(&large_ns),
        });
    }
    ns_rows.extend(full_nat_rows(lbin, &est, &est_calls, reps)?);
    ns_rows.extend(super::proxy::proxy_rows(lbin, calls, reps)?);
    ns_rows.extend(tunnel_rows(ebpf, lbin, &est, &est_calls, reps)?);
    ns_rows.extend(cold_rows(lbin, calls, reps)?);
    ns_rows.extend(trace_rows(lbin, repeat, reps)?);
    ns_rows.extend(capture_rows(lbin, repeat, reps)?);
    ns_rows.extend(super::decap::decap_rows(lbin, calls, reps)?);
    Ok(ns_rows)
}

/// A data plane with the product's default tables, `config` applied, and
/// the flow of `est` (its first packet) sent once.
fn plane_with_a_flow(
    config: &crate::config::Config,
    est: &[Vec<u8>],
    lbin: u32,
) -> anyhow::Result<Dataplane> {
    let mut dp = Dataplane::load(TableSizes {
        conntrack: DEFAULT_CONNTRACK_SIZE,
        half_open: DEFAULT_HALF_OPEN_SIZE,
    })?;
    dp.apply(config)?;
    ns_per_packet(dp.program()?, est, lbin, 1, Some(XDP_REDIRECT))?;
    Ok(dp)
}

/// Rounds of issue 25's paired measurement per repetition asked.
const FULL_NAT_ROUNDS_PER_REP: usize = 7;

/// Issue 25's targets' rows, measured paired as issue 24's and 26's are:
/// NAT and full NAT (each its own data plane on the cost section's config,
/// 100 backends, the product's default tables) and, in every round, each
/// one's established flow (one call each) and a batch of new flows (each
/// call the first datagram of a flow no earlier round sent), in an order
/// rotating round by round, on one CPU. The unpaired rows above measure
/// the two modes minutes apart, and their new-flow rows moved by more than
/// the 25 % target between runs of one build (docs/benchmarks-analysis.md);
/// within a round, what the machine does to one mode it does to the other.
fn full_nat_rows(
    lbin: u32,
    est: &[Vec<u8>],
    est_calls: &[Vec<u8>],
    reps: usize,
) -> anyhow::Result<Vec<NsRow>> {
    let modes = [Forwarding::Nat, Forwarding::FullNat];
    // The flow's first datagram in each; the first call of a round
    // promotes it.
    let mut planes = modes
        .into_iter()
        .map(|mode| plane_with_a_flow(&cost_config(mode)?, est, lbin))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let rounds = reps.max(1) * FULL_NAT_ROUNDS_PER_REP;
    let new_calls = new_flows_per_round(est_calls.len(), rounds, 1)?;
    // Cases: (plane, new flows?), NAT's and full NAT's of each kind.
    let cases: Vec<(usize, bool)> = [false, true]
        .into_iter()
        .flat_map(|new| (0..planes.len()).map(move |plane| (plane, new)))
        .collect();
    let mut ns: Vec<Vec<f64>> = cases.iter().map(|_| Vec::new()).collect();
    let _pinned = PinnedToOneCpu::new()?;
    for round in 0..rounds {
        let tag = u8::try_from(round).context("at most 256 paired rounds")?;
        let fresh = new_flow_frames(tag, new_calls)?;
        for k in 0..cases.len() {
            let i = (round + k) % cases.len();
            let (plane, new) = cases[i];
            let frames = if new { &fresh } else { est_calls };
            ns[i].push(ns_per_packet(
                planes[plane].program()?,
                frames,
                lbin,
                1,
                Some(XDP_REDIRECT),
            )?);
        }
    }
    Ok(cases
        .iter()
        .zip(ns)
        .map(|(&(plane, new), ns)| NsRow {
            program: NsProgram::Lb {
                mode: modes[plane],
                backends: 100,
                flow: if new {
                    FlowState::New
                } else {
                    FlowState::Established
                },
            },
            method: NsMethod::PairedWithNat {
                calls: if new { new_calls } else { est_calls.len() },
                rounds,
                new,
            },
            ns: Stat::of(&ns),
        })
        .collect())
}

/// Rounds of issue 26's paired measurement per repetition asked.
const TUNNEL_ROUNDS_PER_REP: usize = 7;

/// One program of issue 26's paired rounds.
enum Paired {
    /// `lb`'s established flow in this mode (its own data plane).
    Lb(Forwarding),
    /// A program of the bench object (`xdp_pass`, `bare_fwd`, `ipip_fwd`,
    /// `gue_fwd`).
    Tool(NsProgram, &'static str, u32),
}

/// Issue 26's rows, measured paired: `lb`'s established flow in DSR, IPIP
/// and GUE (each its own data plane, 100 backends, the product's default
/// tables) and the floor programs (`xdp_pass`, `bare_fwd`, `ipip_fwd`,
/// `gue_fwd`), one call each (a repeated run would see its own output,
/// the frame wrapped for the backend, as its next input). Every round
/// measures every program, in an order that rotates round by round, on
/// one CPU. Rows measured minutes apart moved by more than the target's
/// 15 % between runs of one build (DSR's row and the tunnels' did, in
/// both directions: docs/benchmarks-analysis.md); within a round, what the
/// machine does to one program it does to the others.
fn tunnel_rows(
    ebpf: &mut Ebpf,
    lbin: u32,
    est: &[Vec<u8>],
    est_calls: &[Vec<u8>],
    reps: usize,
) -> anyhow::Result<Vec<NsRow>> {
    let modes = [Forwarding::Dsr, Forwarding::Ipip, Forwarding::Gue];
    let mut planes = modes
        .into_iter()
        .map(|mode| plane_with_a_flow(&lb_config(mode, 100)?, est, lbin))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut programs: Vec<Paired> = modes.into_iter().map(Paired::Lb).collect();
    programs.extend([
        Paired::Tool(NsProgram::XdpPass, "xdp_pass", XDP_PASS),
        Paired::Tool(NsProgram::BareFwd, "bare_fwd", XDP_REDIRECT),
        Paired::Tool(
            NsProgram::EncapFloor(Forwarding::Ipip),
            encap_floor_name(Forwarding::Ipip),
            XDP_REDIRECT,
        ),
        Paired::Tool(
            NsProgram::EncapFloor(Forwarding::Gue),
            encap_floor_name(Forwarding::Gue),
            XDP_REDIRECT,
        ),
    ]);
    let rounds = reps.max(1) * TUNNEL_ROUNDS_PER_REP;
    let mut ns: Vec<Vec<f64>> = programs.iter().map(|_| Vec::new()).collect();
    let _pinned = PinnedToOneCpu::new()?;
    for round in 0..rounds {
        for k in 0..programs.len() {
            let i = (round + k) % programs.len();
            let one = match &programs[i] {
                Paired::Lb(_) => {
                    ns_per_packet(planes[i].program()?, est_calls, lbin, 1, Some(XDP_REDIRECT))?
                }
                Paired::Tool(_, name, action) => {
                    let prog = xdp::xdp_program(ebpf, name)?;
                    ns_per_packet(prog, est_calls, lbin, 1, Some(*action))?
                }
            };
            ns[i].push(one);
        }
    }
    let method = NsMethod::Paired {
        calls: est_calls.len(),
        rounds,
    };
    Ok(programs
        .iter()
        .zip(ns)
        .map(|(p, ns)| NsRow {
            program: match p {
                Paired::Lb(mode) => NsProgram::Lb {
                    mode: *mode,
                    backends: 100,
                    flow: FlowState::Established,
                },
                Paired::Tool(program, ..) => *program,
            },
            method,
            ns: Stat::of(&ns),
        })
        .collect())
}

/// Rounds of issue 24's paired measurement per repetition asked.
const FAMILY_ROUNDS_PER_REP: usize = 7;

/// Issue 24's cost rows: what IPv6 costs next to IPv4, measured paired.
#[derive(Debug, Default)]
pub(super) struct FamilyCost {
    pub(super) rows: Vec<FamilyCostRow>,
    /// The bench's programs in the same rounds, one call each
    /// ([`FAMILY_FLOORS`]): where IPv6's extra time goes.
    pub(super) floors: Vec<(&'static str, Stat)>,
    /// Rounds, and packets per program per round: `calls` for an
    /// established flow, `new_calls` new flows.
    pub(super) rounds: usize,
    pub(super) calls: usize,
    pub(super) new_calls: usize,
}

/// One comparison of [`FamilyCost`]: `lb` in `mode` (its dual-stack config,
/// 100 backends each), an established or a new flow, IPv4's and IPv6's
/// ns/packet in the same rounds.
#[derive(Debug)]
pub(super) struct FamilyCostRow {
    pub(super) mode: Forwarding,
    pub(super) flow: FlowState,
    pub(super) v4: Stat,
    pub(super) v6: Stat,
    /// IPv6's ns/packet over IPv4's, taken within each round.
    pub(super) ratio: Stat,
}

/// One program of issue 24's paired rounds.
#[derive(Clone, Copy)]
enum FamilyCase {
    /// `lb` of plane `plane` (NAT, DSR), `family`'s established flow or
    /// new flows.
    Lb {
        plane: usize,
        family: Family,
        flow: FlowState,
    },
    /// A program of the bench object on `family`'s established frame.
    Tool(&'static str, Family, u32),
}

/// The bench's programs [`family_rows`] measures in its rounds, with the
/// family of the frame each gets and what it returns: `xdp_pass` (the
/// call's own cost), `bare_fwd`, `tail_fwd` (`bare_fwd` through one tail
/// call, as `lb` reaches `lb_v6`), `hash_fwd` and `hash_fwd6` (one kernel
/// hash lookup of IPv4's key, and of IPv6's 40-byte key as `ESTABLISHED6`
/// has it, where IPv4's established lookup is an array slot).
pub(super) const FAMILY_FLOORS: [(&str, Family, u32); 5] = [
    ("xdp_pass", Family::V4, XDP_PASS),
    ("bare_fwd", Family::V4, XDP_REDIRECT),
    ("tail_fwd", Family::V4, XDP_REDIRECT),
    ("hash_fwd", Family::V4, XDP_REDIRECT),
    ("hash_fwd6", Family::V6, XDP_REDIRECT),
];

/// Issue 24's cost rows, measured paired as issue 26's are
/// ([`tunnel_rows`]): one data plane per mode on the dual-stack config
/// (100 backends per family, the product's default tables, so IPv4 meets
/// its set-associative tables and IPv6 its kernel hash tables as deployed),
/// and in every round, for each mode and family, the established flow
/// (the same frame, one call each) and a batch of new flows (each call the
/// first datagram of a flow no earlier round sent), plus `xdp_pass`; the
/// order rotates round by round, on one CPU. IPv6's ns/packet over IPv4's
/// is taken within each round, so what the machine does to one it does to
/// the other.
pub(super) fn family_rows(ebpf: &mut Ebpf, quick: bool, reps: usize) -> anyhow::Result<FamilyCost> {
    eprintln!("bench: IPv6 next to IPv4, paired (BPF_PROG_TEST_RUN)");
    let lbin = xdp::ifindex("lbin")?;
    let calls = if quick { 2_000 } else { 20_000 };
    let rounds = reps.max(1) * FAMILY_ROUNDS_PER_REP;
    // NAT66's flows take two `HALF_OPEN6` entries each.
    let new_calls = new_flows_per_round(calls, rounds, 2)?;
    let tables = TableSizes {
        conntrack: DEFAULT_CONNTRACK_SIZE,
        half_open: DEFAULT_HALF_OPEN_SIZE,
    };
    const FAMILIES: [Family; 2] = [Family::V4, Family::V6];
    let mut planes = Vec::new();
    for mode in [Forwarding::Nat, Forwarding::Dsr] {
        let mut dp = Dataplane::load(tables)?;
        dp.apply(&lb_config_dual(mode, 100, tables)?)?;
        for family in FAMILIES {
            // A UDP flow's second datagram establishes it.
            let first = [family.established_frame()?];
            for _ in 0..2 {
                ns_per_packet(dp.program()?, &first, lbin, 1, Some(XDP_REDIRECT))?;
            }
        }
        planes.push((mode, dp));
    }
    let established = FAMILIES
        .map(|family| Ok(vec![family.established_frame()?; calls]))
        .into_iter()
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut cases = Vec::new();
    for plane in 0..planes.len() {
        for flow in [FlowState::Established, FlowState::New] {
            for family in FAMILIES {
                cases.push(FamilyCase::Lb {
                    plane,
                    family,
                    flow,
                });
            }
        }
    }
    cases.extend(
        FAMILY_FLOORS
            .iter()
            .map(|&(name, family, action)| FamilyCase::Tool(name, family, action)),
    );
    // `tail_fwd` jumps to `bare_fwd`.
    let bare = xdp::xdp_program(ebpf, "bare_fwd")?.fd()?.try_clone()?;
    xdp::xdp_program(ebpf, "tail_fwd")?;
    aya::maps::ProgramArray::try_from(ebpf.map_mut("TAIL_FWD").context("map TAIL_FWD missing")?)?
        .set(0, &bare, 0)?;
    let mut ns: Vec<Vec<f64>> = cases.iter().map(|_| Vec::new()).collect();
    let _pinned = PinnedToOneCpu::new()?;
    for round in 0..rounds {
        let fresh = FAMILIES
            .map(|family| new_flows_of(family, round as u32, new_calls))
            .into_iter()
            .collect::<anyhow::Result<Vec<_>>>()?;
        for k in 0..cases.len() {
            let i = (round + k) % cases.len();
            let one = match cases[i] {
                FamilyCase::Lb {
                    plane,
                    family,
                    flow,
                } => {
                    let f = family as usize;
                    let frames = if flow == FlowState::New {
                        &fresh[f]
                    } else {
                        &established[f]
                    };
                    let prog = planes[plane].1.program()?;
                    ns_per_packet(prog, frames, lbin, 1, Some(XDP_REDIRECT))?
                }
                FamilyCase::Tool(name, family, action) => {
                    let prog = xdp::xdp_program(ebpf, name)?;
                    ns_per_packet(prog, &established[family as usize], lbin, 1, Some(action))?
                }
            };
            ns[i].push(one);
        }
    }
    let samples = |plane: usize, family: Family, flow: FlowState| {
        cases
            .iter()
            .position(|c| {
                matches!(c, FamilyCase::Lb { plane: p, family: fa, flow: fl }
                    if *p == plane && *fa == family && *fl == flow)
            })
            .map(|i| ns[i].as_slice())
            .unwrap_or_default()
    };
    let mut rows = Vec::new();
    for (plane, (mode, _)) in planes.iter().enumerate() {
        for flow in [FlowState::Established, FlowState::New] {
            let (v4, v6) = (
                samples(plane, Family::V4, flow),
                samples(plane, Family::V6, flow),
            );
            rows.push(FamilyCostRow {
                mode: *mode,
                flow,
                v4: Stat::of(v4),
                v6: Stat::of(v6),
                ratio: Stat::of(&per_round_ratios(v6, v4)),
            });
        }
    }
    Ok(FamilyCost {
        rows,
        floors: cases
            .iter()
            .zip(&ns)
            .filter_map(|(c, ns)| match c {
                FamilyCase::Tool(name, ..) => Some((*name, Stat::of(ns))),
                FamilyCase::Lb { .. } => None,
            })
            .collect(),
        rounds,
        calls,
        new_calls,
    })
}

/// `numerator[r] / denominator[r]` for each round `r` both measured.
pub(super) fn per_round_ratios(numerator: &[f64], denominator: &[f64]) -> Vec<f64> {
    numerator
        .iter()
        .zip(denominator)
        .map(|(n, d)| n / d)
        .collect()
}

/// New flows per program per round in the paired rounds: `calls`, or fewer
/// so that every round's new flows together fill at most half of the
/// default half-open table (IPv4's and IPv6's are both that size) when
/// each takes `entries_per_flow` entries: a new flow then meets a table
/// that has room, in the last round as in the first, in both families. A
/// NAT66 flow takes two (`HALF_OPEN6` holds its forward and reply keys;
/// IPv4's slot holds both directions): counted as one, the last rounds'
/// NAT66 flows met a full LRU, each insert an eviction.
pub(super) fn new_flows_per_round(
    calls: usize,
    rounds: usize,
    entries_per_flow: usize,
) -> anyhow::Result<usize> {
    let room = DEFAULT_HALF_OPEN_SIZE as usize / 2 / rounds.max(1) / entries_per_flow.max(1);
    let n = calls.min(room).min(NEW_FLOWS_PER_BATCH);
    ensure!(
        n >= 100,
        "{rounds} rounds leave {n} new flows per round in the default half-open table: use fewer --reps"
    );
    Ok(n)
}

/// The calling thread pinned to the last CPU until dropped, then given its
/// CPUs back.
struct PinnedToOneCpu {
    before: rustix::thread::CpuSet,
}

impl PinnedToOneCpu {
    fn new() -> anyhow::Result<Self> {
        let before = rustix::thread::sched_getaffinity(None)
            .map_err(std::io::Error::from)
            .context("sched_getaffinity")?;
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        pktgen::pin_to_cpu(cpus - 1)?;
        Ok(Self { before })
    }
}

impl Drop for PinnedToOneCpu {
    fn drop(&mut self) {
        // Best effort: the rows after it run on whichever CPU they get.
        let _ = rustix::thread::sched_setaffinity(None, &self.before);
    }
}

/// The `lb-bench` program of a tunnel mode's floor row.
pub(super) fn encap_floor_name(mode: Forwarding) -> &'static str {
    if mode == Forwarding::Gue {
        "gue_fwd"
    } else {
        "ipip_fwd"
    }
}

/// The bytes that mode's floor program puts in front of the frame.
fn encap_floor_overhead(mode: Forwarding) -> u16 {
    if mode == Forwarding::Gue {
        lb_common::tunnel::GUE_OVERHEAD
    } else {
        lb_common::tunnel::IPIP_OVERHEAD
    }
}

/// Established flows in the cold-cache rows (issue 23): tables far larger
/// than the caches.
pub(super) const COLD_FLOWS: u32 = 1_000_000;
/// The cold rows' tables: every flow established, both entries of a NAT
/// flow.
const COLD_TABLES: TableSizes = TableSizes {
    conntrack: 1_048_576,
    half_open: DEFAULT_HALF_OPEN_SIZE,
};
/// The step of the cold stream through the flows: coprime with
/// [`COLD_FLOWS`] and near its golden section, so consecutive packets are
/// far apart in the tables' memory (entries are allocated in the order the
/// flows were established) and none repeats within a pass.
const COLD_STRIDE: u64 = 618_033;

/// The cold-cache rows: [`COLD_FLOWS`] UDP flows established (each
/// promoted by its second datagram; a one-hour UDP timeout so none expires
/// meanwhile), then `reps` streams of `calls` packets, one per flow, in a
/// stride over them that touches no flow twice: the established lookup as
/// a million-flow load sees it, every entry a cache miss.
fn cold_rows(lbin: u32, calls: usize, reps: usize) -> anyhow::Result<Vec<NsRow>> {
    let frame = |i: u64| {
        let i = (i % u64::from(COLD_FLOWS)) as u32;
        let addr = std::net::Ipv4Addr::from(
            u32::from(std::net::Ipv4Addr::new(10, 200, 0, 0)) + i / 50_000,
        );
        frame_from(SocketAddrV4::new(addr, 1024 + (i % 50_000) as u16))
    };
    let mut rows = Vec::new();
    for mode in [Forwarding::Nat, Forwarding::Dsr] {
        eprintln!(
            "bench: establishing {} flows ({})",
            COLD_FLOWS,
            mode_name(mode)
        );
        let mut dp = Dataplane::load(COLD_TABLES)?;
        dp.apply(&lb_config_for(
            mode,
            100,
            "udp",
            COLD_TABLES,
            "timeouts = { udp = \"3600s\" }",
        )?)?;
        {
            let prog = dp.program()?;
            for i in 0..u64::from(COLD_FLOWS) {
                let first = [frame(i)?];
                ns_per_packet(prog, &first, lbin, 1, Some(XDP_REDIRECT))?;
                ns_per_packet(prog, &first, lbin, 1, Some(XDP_REDIRECT))?;
            }
        }
        let (entries, _) = dp.flow_table()?.entries()?;
        let per_flow = if mode == Forwarding::Nat { 2 } else { 1 };
        ensure!(
            entries == u64::from(COLD_FLOWS) * per_flow,
            "{} established entries after {COLD_FLOWS} flows' second datagrams, not {}",
            entries,
            u64::from(COLD_FLOWS) * per_flow
        );
        let prog = dp.program()?;
        let mut ns = Vec::new();
        for rep in 0..reps {
            let frames = (0..calls)
                .map(|j| frame(((rep * calls + j) as u64 * COLD_STRIDE) % u64::from(COLD_FLOWS)))
                .collect::<anyhow::Result<Vec<_>>>()?;
            ns.push(ns_per_packet(prog, &frames, lbin, 1, Some(XDP_REDIRECT))?);
        }
        rows.push(NsRow {
            program: NsProgram::Lb {
                mode,
                backends: 100,
                flow: FlowState::EstablishedCold,
            },
            method: NsMethod::DistinctFlows(calls),
            ns: Stat::of(&ns),
        });
    }
    Ok(rows)
}

/// ns/packet of `lb` (DSR) with drop tracing off and on, for a forwarded
/// packet and one it does not forward: what `lb trace` costs while it runs,
/// and that it costs the forwarded path nothing.
fn trace_rows(lbin: u32, repeat: u32, reps: usize) -> anyhow::Result<Vec<NsRow>> {
    let mut dp = Dataplane::load(CONNTRACK)?;
    dp.apply(&lb_config(Forwarding::Dsr, 100)?)?;
    let mut tracer = Tracer::of(&dp)?;
    let client = SocketAddrV4::new(CLIENT, 1024);
    let established = vec![frame_from(client)?];
    let stray = vec![frame_to(client, PORT + 1)?];
    ns_per_packet(dp.program()?, &established, lbin, 1, Some(XDP_REDIRECT))?;
    // Off and on take turns within each round, so drift of a shared machine
    // lands on both alike; these runs are short, so take more rounds.
    let cases = [
        (TracedPacket::Established, &established, XDP_REDIRECT),
        (TracedPacket::NotForwarded, &stray, XDP_PASS),
    ];
    let mut samples: Vec<(TracedPacket, bool, Vec<f64>)> = Vec::new();
    for _ in 0..reps * 5 {
        for on in [false, true] {
            if on {
                tracer.start(TRACE_DEFAULT_VERDICTS)?;
            } else {
                tracer.stop()?;
            }
            for (packet, frames, action) in cases {
                let ns = ns_per_packet(dp.program()?, frames, lbin, repeat, Some(action))?;
                match samples
                    .iter_mut()
                    .find(|(p, o, _)| *p == packet && *o == on)
                {
                    Some((_, _, v)) => v.push(ns),
                    None => samples.push((packet, on, vec![ns])),
                }
            }
        }
    }
    let rows = samples
        .into_iter()
        .map(|(packet, on, ns)| NsRow {
            program: NsProgram::LbTracing { packet, on },
            method: NsMethod::Repeat(repeat),
            ns: Stat::of(&ns),
        })
        .collect();
    tracer.stop()?;
    Ok(rows)
}

/// ns/packet of `lb` (DSR) on an established flow with `lb capture` off,
/// and on with a filter that takes nothing (a client prefix no packet
/// has): what a capture costs the traffic it does not show.
fn capture_rows(lbin: u32, repeat: u32, reps: usize) -> anyhow::Result<Vec<NsRow>> {
    let mut dp = Dataplane::load(CONNTRACK)?;
    dp.apply(&lb_config(Forwarding::Dsr, 100)?)?;
    let mut capturer = Capturer::of(&dp)?;
    let established = vec![frame_from(SocketAddrV4::new(CLIENT, 1024))?];
    ns_per_packet(dp.program()?, &established, lbin, 1, Some(XDP_REDIRECT))?;
    let nothing = CaptureConf {
        what: CAPTURE_FORWARDED | CAPTURE_NOT_FORWARDED,
        snaplen: 256,
        // 203.0.113.0/24 (TEST-NET-3): no bench packet comes from it.
        client: u32::from_ne_bytes([203, 0, 113, 0]),
        client_mask: u32::from_ne_bytes([255, 255, 255, 0]),
        ..CaptureConf::default()
    };
    // Off and on take turns within each round, as for drop tracing.
    let (mut off, mut on) = (Vec::new(), Vec::new());
    for _ in 0..reps * 5 {
        for (conf, samples) in [(CaptureConf::default(), &mut off), (nothing, &mut on)] {
            capturer.start(conf)?;
            let program = dp.program()?;
            samples.push(ns_per_packet(
                program,
                &established,
                lbin,
                repeat,
                Some(XDP_REDIRECT),
            )?);
        }
    }
    capturer.stop()?;
    Ok([(false, off), (true, on)]
        .into_iter()
        .map(|(on, ns)| NsRow {
            program: NsProgram::LbCapture { on },
            method: NsMethod::Repeat(repeat),
            ns: Stat::of(&ns),
        })
        .collect())
}

/// Prefixes the firewall cost rows load.
pub(super) const FW_PREFIXES: usize = 10_000;

/// One firewall cost row: the same packets through `lb` with the firewall
/// empty and with [`FW_PREFIXES`] prefixes loaded.
#[derive(Debug)]
pub(super) struct FwCostRow {
    pub(super) flow: FlowState,
    pub(super) method: NsMethod,
    pub(super) empty: Stat,
    pub(super) loaded: Stat,
}

/// The config of the loaded case: 10,000 global deny /24s in 10.200.0.0 –
/// 10.239.15.0 (they share 10/8 with the generator's sources, so a lookup
/// walks deep into the trie before it misses), and an allow list on the
/// service that the sources match: a new flow pays two LPM lookups.
fn firewalled(mode: Forwarding) -> anyhow::Result<crate::config::Config> {
    use crate::config::Prefix;
    let mut cfg = lb_config(mode, 100)?;
    cfg.firewall.deny = (0..FW_PREFIXES)
        .map(|i| {
            let (b, c) = (200 + i / 256, i % 256);
            Prefix::parse(&format!("10.{b}.{c}.0/24")).map_err(anyhow::Error::msg)
        })
        .collect::<anyhow::Result<_>>()?;
    cfg.services[0].firewall.allow = vec![
        Prefix::parse("10.96.0.0/11").map_err(anyhow::Error::msg)?,
        Prefix::parse(&format!("{CLIENT}/32")).map_err(anyhow::Error::msg)?,
    ];
    Ok(cfg)
}

/// The firewall's cost (DSR, 100 backends): an established flow and new
/// flows, firewall empty vs [`FW_PREFIXES`] prefixes, the two data planes
/// taking turns in every repetition.
pub(super) fn firewall_rows(quick: bool, reps: usize) -> anyhow::Result<Vec<FwCostRow>> {
    eprintln!("bench: firewall cost ({FW_PREFIXES} prefixes, BPF_PROG_TEST_RUN)");
    let lbin = xdp::ifindex("lbin")?;
    let repeat: u32 = if quick { 100_000 } else { 1_000_000 };
    let calls = if quick { 2_000 } else { 20_000 };
    let est = vec![frame_from(SocketAddrV4::new(CLIENT, 1024))?];
    let est_calls: Vec<Vec<u8>> = std::iter::repeat_n(est[0].clone(), calls).collect();
    let mut planes = Vec::new();
    for cfg in [
        lb_config(Forwarding::Dsr, 100)?,
        firewalled(Forwarding::Dsr)?,
    ] {
        let mut dp = Dataplane::load(CONNTRACK)?;
        dp.apply(&cfg)?;
        ns_per_packet(dp.program()?, &est, lbin, 1, Some(XDP_REDIRECT))?;
        planes.push(dp);
    }
    // [plane][case] samples; cases: established repeat, established calls, new.
    let mut samples = vec![vec![Vec::new(); 3]; 2];
    for rep in 0..reps {
        for (p, dp) in planes.iter_mut().enumerate() {
            let prog = dp.program()?;
            samples[p][0].push(ns_per_packet(prog, &est, lbin, repeat, Some(XDP_REDIRECT))?);
            samples[p][1].push(ns_per_packet(
                prog,
                &est_calls,
                lbin,
                1,
                Some(XDP_REDIRECT),
            )?);
            // Fresh sources per plane and repetition: every frame a new flow.
            let tag = ((rep * 2 + p) % 28) as u8; // 10.100-10.127: in the allow list
            samples[p][2].push(ns_per_packet(
                prog,
                &new_flow_frames(tag, calls)?,
                lbin,
                1,
                Some(XDP_REDIRECT),
            )?);
        }
    }
    let cases = [
        (FlowState::Established, NsMethod::Repeat(repeat)),
        (FlowState::Established, NsMethod::Calls(calls)),
        (FlowState::New, NsMethod::DistinctFlows(calls)),
    ];
    Ok(cases
        .iter()
        .enumerate()
        .map(|(c, &(flow, method))| FwCostRow {
            flow,
            method,
            empty: Stat::of(&samples[0][c]),
            loaded: Stat::of(&samples[1][c]),
        })
        .collect())
}

/// One scheduler's cost: an established flow and new flows through `lb`
/// (DSR, 100 backends) with that scheduler.
#[derive(Debug)]
pub(super) struct SchedCostRow {
    pub(super) scheduler: Scheduler,
    pub(super) established: Stat,
    pub(super) established_method: NsMethod,
    pub(super) new: Stat,
    pub(super) new_method: NsMethod,
}

/// Every scheduler's cost (DSR, 100 backends): one data plane per
/// scheduler, all taking turns in every repetition. An established flow
/// does not schedule, so its rows show the scheduler costs it nothing; a
/// new flow pays the table lookup (and for the counter schedulers the
/// atomic add).
pub(super) fn scheduler_rows(quick: bool, reps: usize) -> anyhow::Result<Vec<SchedCostRow>> {
    eprintln!("bench: scheduler cost (BPF_PROG_TEST_RUN)");
    let lbin = xdp::ifindex("lbin")?;
    let repeat: u32 = if quick { 100_000 } else { 1_000_000 };
    let calls = if quick { 2_000 } else { 20_000 };
    let est = vec![frame_from(SocketAddrV4::new(CLIENT, 1024))?];
    let mut planes = Vec::new();
    for scheduler in SCHEDULERS {
        let mut cfg = lb_config(Forwarding::Dsr, 100)?;
        cfg.services[0].scheduler = scheduler;
        let mut dp = Dataplane::load(CONNTRACK)?;
        dp.apply(&cfg)?;
        ns_per_packet(dp.program()?, &est, lbin, 1, Some(XDP_REDIRECT))?;
        planes.push((scheduler, dp, Vec::new(), Vec::new()));
    }
    for rep in 0..reps {
        for (p, (_, dp, est_ns, new_ns)) in planes.iter_mut().enumerate() {
            let prog = dp.program()?;
            est_ns.push(ns_per_packet(prog, &est, lbin, repeat, Some(XDP_REDIRECT))?);
            // Fresh sources per plane and repetition: every frame a new flow.
            let tag = ((rep * SCHEDULERS.len() + p) % 100) as u8;
            new_ns.push(ns_per_packet(
                prog,
                &new_flow_frames(tag, calls)?,
                lbin,
                1,
                Some(XDP_REDIRECT),
            )?);
        }
    }
    Ok(planes
        .into_iter()
        .map(|(scheduler, _, est_ns, new_ns)| SchedCostRow {
            scheduler,
            established: Stat::of(&est_ns),
            established_method: NsMethod::Repeat(repeat),
            new: Stat::of(&new_ns),
            new_method: NsMethod::DistinctFlows(calls),
        })
        .collect())
}

const SCHEDULERS: [Scheduler; 6] = Scheduler::ALL;
