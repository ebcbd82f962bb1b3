//! The report: what a run states about itself (command, date, machine),
//! and BENCHMARKS.md rendered from it, with the ratios its tables imply.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use lb_common::PKTGEN_FLOW_TABLE;

use super::{
    flood::{
        CLIENT_RATE, ESTABLISHED, FloodRow, HALF_OPEN, HANDSHAKE_GAP, LEGIT, SPOOFED, TABLE,
        handshake_ms,
    },
    http::{HttpPath, HttpRow},
    measure::{
        FW_PREFIXES, FamilyCost, FlowState, FwCostRow, FwdRow, Hop, MIX_BACKENDS, NsMethod,
        NsProgram, NsRow, SchedCostRow, Stat, TracedPacket, mode_name,
    },
    targets::{grouped, targets},
};
use crate::{
    config::Forwarding,
    harness::pktgen::{FlowDist, ZIPF_SEED, drawn_flows, mix_summary},
};

/// `<root>` for a binary at `<root>/target/<profile>/lb`.
pub(super) fn workspace_root() -> Option<PathBuf> {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent()?.parent()?.parent().map(Path::to_path_buf))
        .filter(|root| root.join("Cargo.toml").is_file() && root.join("target").is_dir())
}

/// `<root>/BENCHMARKS.md` for a binary at `<root>/target/<profile>/lb`.
pub(super) fn default_output() -> PathBuf {
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

pub(super) fn machine() -> String {
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

/// Everything a report states: how the benchmark was run and what it
/// measured. [`render`] writes nothing that is not here or computed from it,
/// apart from the targets' thresholds ([`TARGET_RATIO`] and the others).
#[derive(Debug)]
pub(super) struct Report {
    /// The command that ran it ([`shown_command`]).
    pub(super) command: String,
    /// UTC date of the run, `YYYY-MM-DD`.
    pub(super) date: String,
    /// CPU model, CPU count and kernel ([`machine`]).
    pub(super) machine: String,
    /// CPUs the generator, forwarder, sink and HTTP lab share.
    pub(super) cpus: usize,
    pub(super) reps: usize,
    /// Seconds per throughput measurement.
    pub(super) seconds: f64,
    /// Generator threads.
    pub(super) threads: usize,
    /// Generator frame size in bytes.
    pub(super) frame_size: usize,
    /// How the generator sent (live frames, or the packet socket where the
    /// kernel refused them).
    pub(super) sender: crate::pktgen::Sender,
    pub(super) took: Duration,
    pub(super) fwd: Vec<FwdRow>,
    pub(super) ns: Vec<NsRow>,
    /// IPv6's cost next to IPv4's, paired (issue 24; empty: not measured).
    pub(super) families: FamilyCost,
    /// The firewall's cost, empty vs loaded (none: not measured).
    pub(super) firewall: Vec<FwCostRow>,
    /// Each scheduler's cost (none: not measured).
    pub(super) schedulers: Vec<SchedCostRow>,
    /// The SYN flood scenario, per mode (none: not measured).
    pub(super) flood: Vec<FloodRow>,
    /// Flow sync's cost and traffic (empty: not measured).
    pub(super) sync: super::sync::SyncRows,
    pub(super) http: Result<Vec<HttpRow>, String>,
    /// wrk loads: (name used in the HTTP rows, wrk arguments).
    pub(super) wrk_loads: Vec<(String, String)>,
    /// File name of the bar chart next to the report, if one was written.
    pub(super) plot: Option<String>,
}

/// Where the analysis of a profiled run lives (relative to the workspace
/// root, where BENCHMARKS.md is written by default).
pub(super) const ANALYSIS_DOC: &str = "docs/benchmarks-analysis.md";

/// The report as Markdown.
pub(super) fn render(r: &Report) -> String {
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
        "- Path: `lb pktgen` ({}, {}-byte UDP) → veth → middle hop (native XDP) → veth → `sink` (counts, drops), all on this host's {} CPU(s), so generator, forwarder and sink share them.\n",
        r.sender, r.frame_size, r.cpus
    );
    if r.sender != crate::pktgen::Sender::XdpLiveFrames {
        let _ = writeln!(
            s,
            "- **The generator was the limit of this run**: this kernel refused BPF_PROG_RUN's live frames, so the frames came from an AF_PACKET socket, far slower than any hop; the forwarding rates below measure the generator, and their ratios to the ceiling say nothing of the data plane. The ns/packet sections (BPF_PROG_TEST_RUN) are unaffected.\n"
        );
    }
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
        // IPv6 rows are a fraction of the IPv6 ceiling.
        let ratio = match ceiling_of(&r.fwd, row.hop.ceiling()) {
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
            row.hop,
            flows_cell(row),
            row.offered.text(2),
            row.delivered.text(2)
        );
    }
    paired_section(&mut s, &r.fwd);
    table_cost_section(&mut s, &r.fwd);
    let _ = writeln!(
        s,
        "\n## Cost per packet (BPF_PROG_TEST_RUN, ns/packet as the kernel reports it)\n"
    );
    let _ = writeln!(
        s,
        "With repeat=1 each figure includes the kernel's timer overhead for one run (compare with `xdp_pass` measured the same way). NAT is only measured with repeat=1: the kernel does not restore the frame between repetitions, so after the first run a NATed frame is no longer addressed to the VIP. `lb` has the product's default table sizes (`conntrack-size` and `half-open-size` as config/README.md gives them) except in the rows marked *the sweep's tables* (the forwarding sweep's, sized for its largest flow count in both tables): a new flow's cost is mostly cache and TLB misses in the tables, so it grows with them.\n"
    );
    let _ = writeln!(s, "| program | method | ns/packet |");
    let _ = writeln!(s, "|---|---|---|");
    for row in &r.ns {
        let _ = writeln!(
            s,
            "| {} | {} | {} |",
            row.program,
            row.method,
            row.ns.text(1)
        );
    }
    family_section(&mut s, &r.families);
    if !r.firewall.is_empty() {
        firewall_section(&mut s, &r.firewall);
    }
    if !r.schedulers.is_empty() {
        scheduler_section(&mut s, &r.schedulers);
    }
    if !r.flood.is_empty() {
        flood_section(&mut s, &r.flood, ceiling);
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
                    row.target(),
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
    super::sync::render(&mut s, &r.sync);
    // Rates from a generator slower than every hop measure the generator:
    // the targets on forwarding rates are not judged on them.
    let live = r.sender == crate::pktgen::Sender::XdpLiveFrames;
    let mut t = targets(if live { &r.fwd } else { &[] }, &r.ns, &r.http, &r.flood);
    if !live {
        let _ = writeln!(
            t,
            "| the forwarding-rate targets (an established flow against the bare forwarder; 1 000 000 flows against one; NAT's rate against DSR's) | **not judged**: the generator was the limit of this run (live frames refused), so its rates say nothing of the data plane |"
        );
    }
    super::targets::family_targets(&mut t, &r.families);
    super::sync::targets(&mut t, &r.sync);
    s.push_str(&t);
    s.push_str(&summary(r));
    s
}

/// The SYN flood scenario's table.
fn flood_section(s: &mut String, rows: &[FloodRow], ceiling: Option<f64>) {
    let _ = writeln!(s, "\n## SYN flood\n");
    let _ = writeln!(
        s,
        "{ESTABLISHED} connections are made first, each a generated handshake as the load balancer sees it (the client's SYN; with NAT, its backend's SYN-ACK; the client's ACK; then its next segment, past the ACK, which confirms the flow); then spoofed SYNs from {} distinct sources at the generator's full rate, into flow tables of {} established (`conntrack-size`) and {} half-open (`half-open-size`) flows, while {LEGIT} legitimate clients connect the same way, 30 % into the flood (each step paced at {} per second, the next one {} ms after, so a legitimate connection is half-open for {} ms with NAT, {} ms with DSR, unloaded). Survived: the established flows still in the established table after the flood, of those there before it. Served: the legitimate connections established right after their handshake. Both are read from the table by key. Delivered: the flood's rate at the sink.\n",
        grouped(SPOOFED),
        grouped(TABLE),
        grouped(HALF_OPEN),
        grouped(CLIENT_RATE as u32),
        HANDSHAKE_GAP.as_millis(),
        handshake_ms(Forwarding::Nat, LEGIT),
        handshake_ms(Forwarding::Dsr, LEGIT),
    );
    let _ = writeln!(
        s,
        "| middle hop | spoofed SYNs sent | offered Mpps | delivered Mpps | vs ceiling | established before | survived | legitimate served |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|");
    for row in rows {
        let ratio = ceiling
            .map(|c| format!("{:.0} %", 100.0 * row.delivered.median / c))
            .unwrap_or_else(|| "–".into());
        let pct = |st: &Stat| {
            format!(
                "{:.1} % ({:.1}–{:.1})",
                100.0 * st.median,
                100.0 * st.min,
                100.0 * st.max
            )
        };
        let _ = writeln!(
            s,
            "| {} | {:.0} | {} | {} | {ratio} | {:.0} of {ESTABLISHED} | {} | {} |",
            row.hop,
            row.spoofed.median,
            row.offered.text(2),
            row.delivered.text(2),
            row.established.median,
            pct(&row.survived),
            pct(&row.served)
        );
    }
    let took: Vec<String> = rows
        .iter()
        .map(|r| format!("{} {} ms", r.hop, r.handshake_ms.text(0)))
        .collect();
    if !took.is_empty() {
        let _ = writeln!(
            s,
            "\nThe legitimate handshakes took, under the flood (first SYN to last confirming segment): {}.",
            took.join(", ")
        );
    }
}

/// The flows column: the count, and the mix unless uniform.
pub(super) fn flows_cell(row: &FwdRow) -> String {
    match row.dist {
        FlowDist::Uniform => row.flows.to_string(),
        dist => format!("{}, {dist}", row.flows),
    }
}

/// ns per packet at the sink: the inverse of the delivered rate.
fn ns_per_delivered(row: &FwdRow) -> f64 {
    1000.0 / row.delivered.median
}

/// The flow mix and what the connection table costs: at `MIX_BACKENDS`
/// backends, every flow count and mix next to one flow, as the delivered
/// rate's inverse (ns per packet through the whole path) and its excess
/// over one flow's, which is what holding and looking up that many flows
/// costs each packet.
fn table_cost_section(s: &mut String, fwd: &[FwdRow]) {
    let ceiling = ceiling(fwd);
    let mut lines = Vec::new();
    for mode in [Forwarding::Nat, Forwarding::Dsr] {
        let hop = Hop::Lb(mode);
        let at = |row: &&FwdRow| row.hop == hop && row.backends == MIX_BACKENDS;
        let Some(one) = fwd.iter().filter(at).find(|r| r.flows == 1) else {
            continue;
        };
        let base = ns_per_delivered(one);
        for row in fwd.iter().filter(at) {
            let ns = ns_per_delivered(row);
            let ratio = ceiling
                .map(|c| format!("{:.0} %", 100.0 * row.delivered.median / c))
                .unwrap_or_else(|| "–".into());
            let cost = if row.flows == 1 {
                "–".to_string()
            } else {
                format!("{:+.1} ns", ns - base)
            };
            let mix = match row.dist {
                FlowDist::Uniform if row.flows == 1 => "one flow".to_string(),
                FlowDist::Uniform => "uniform: every flow in turn".to_string(),
                FlowDist::Zipf { s } => {
                    let m = mix_summary(&drawn_flows(row.flows, s), row.flows);
                    format!(
                        "Zipf s={s}: {} distinct flows per {PKTGEN_FLOW_TABLE}-frame cycle, heaviest 1 % carry {:.0} %",
                        m.distinct,
                        100.0 * m.top_percent_share
                    )
                }
            };
            lines.push(format!(
                "| {hop} | {} | {mix} | {} | {ratio} | {ns:.1} | {cost} |",
                row.flows,
                row.delivered.text(2)
            ));
        }
    }
    if lines.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "\n## Flow mix and the connection table's cost ({MIX_BACKENDS} backends)\n"
    );
    let _ = writeln!(
        s,
        "The rows of the table above at {MIX_BACKENDS} backends. ns/packet is the delivered rate's inverse (the whole path, generator and sink included, on shared CPUs); the table's cost is its excess over one flow in the same mode. The Zipf mix draws each frame's flow from a fixed sequence (seed {ZIPF_SEED:#x}): flow k carries a share ∝ 1/(k+1)^s.\n"
    );
    let _ = writeln!(
        s,
        "| middle hop | flows | mix | delivered Mpps | vs ceiling | ns/packet | table cost vs one flow |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|");
    for line in lines {
        let _ = writeln!(s, "{line}");
    }
}

/// One flow against the bare forwarder measured back to back with it, per
/// repetition: the ratio the established-flow target is judged on.
fn paired_section(s: &mut String, fwd: &[FwdRow]) {
    let rows: Vec<&FwdRow> = fwd.iter().filter(|r| r.paired.is_some()).collect();
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "\n## One flow vs the bare forwarder, paired\n\nEach repetition forwards one flow through `bare_fwd`{} and through the hop, back to back (in alternating order), and takes the ratio of the two delivered rates; the table gives the median ratio (min–max). The ceiling row above is measured once, minutes before some rows, on CPUs other tenants share: its ratios move with the machine, these much less.\n",
        if rows.iter().any(|r| r.hop.ceiling() == Hop::Ceiling6) {
            " (`bare_fwd6` for the IPv6 rows)"
        } else {
            ""
        }
    );
    let _ = writeln!(
        s,
        "| middle hop | backends | delivered Mpps | vs its bare forwarder just before |"
    );
    let _ = writeln!(s, "|---|---|---|---|");
    for row in rows {
        let Some(p) = &row.paired else { continue };
        let backends = if row.backends == 0 {
            "–".to_string()
        } else {
            row.backends.to_string()
        };
        let pct = |x: f64| format!("{:.0}", 100.0 * x);
        let _ = writeln!(
            s,
            "| {} | {backends} | {} | {} % ({}–{} %) |",
            row.hop,
            row.delivered.text(2),
            pct(p.median),
            pct(p.min),
            pct(p.max)
        );
    }
}

/// The ceiling's delivered Mpps (the `bare_fwd` row), if it measured any.
pub(super) fn ceiling(fwd: &[FwdRow]) -> Option<f64> {
    ceiling_of(fwd, Hop::Ceiling)
}

/// The delivered Mpps of the ceiling row `hop` ([`Hop::Ceiling`] or
/// [`Hop::Ceiling6`]), if the run measured it.
pub(super) fn ceiling_of(fwd: &[FwdRow], hop: Hop) -> Option<f64> {
    fwd.iter()
        .find(|r| r.hop == hop)
        .map(|r| r.delivered.median)
        .filter(|c| c.is_finite() && *c > 0.0)
}

/// Issue 24's cost rows: IPv6's ns/packet next to IPv4's from the same
/// rounds, and their ratio round by round.
fn family_section(s: &mut String, f: &FamilyCost) {
    if f.rows.is_empty() {
        return;
    }
    let _ = writeln!(s, "\n## IPv6 next to IPv4 (BPF_PROG_TEST_RUN, paired)\n");
    let _ = writeln!(
        s,
        "`lb` on a dual-stack config (the UDP service and its IPv6 twin in one data plane, 100 backends each, the product's default table sizes: IPv4's set-associative tables, IPv6's kernel hash tables). Each of {} rounds measures, for each mode and family, the established flow ({} calls of one frame, repeat=1) and {} new flows (each call the first datagram of a flow no round sent before; all rounds' together fill at most half of IPv6's half-open table, where a NAT66 flow takes two entries), and `xdp_pass`, in an order rotating round by round, on one CPU. IPv6 / IPv4 is taken within each round; the table gives medians over the rounds (min–max).\n",
        f.rounds, f.calls, f.new_calls
    );
    let _ = writeln!(
        s,
        "| mode | flow | IPv4 ns/packet | IPv6 ns/packet | IPv6 / IPv4, per round |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|");
    for row in &f.rows {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {:.3} ({:.3}–{:.3}) |",
            family_mode_name(row.mode),
            flow_name(row.flow),
            row.v4.text(1),
            row.v6.text(1),
            row.ratio.median,
            row.ratio.min,
            row.ratio.max
        );
    }
    if f.floors.is_empty() {
        return;
    }
    let floors: Vec<String> = f
        .floors
        .iter()
        .map(|(name, ns)| format!("`{name}` {}", ns.text(1)))
        .collect();
    let _ = writeln!(
        s,
        "\nThe bench's programs in the same rounds, one call each (ns/packet): {}.",
        floors.join(", ")
    );
    let floor = |name: &str| {
        f.floors
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, ns)| ns.median)
    };
    let mut parts = Vec::new();
    if let (Some(tail), Some(bare)) = (floor("tail_fwd"), floor("bare_fwd")) {
        parts.push(format!(
            "one tail call (`tail_fwd` − `bare_fwd`, as `lb` → `lb_v6`) {:+.1} ns",
            tail - bare
        ));
    }
    if let (Some(h6), Some(h4), Some(bare)) =
        (floor("hash_fwd6"), floor("hash_fwd"), floor("bare_fwd"))
    {
        parts.push(format!(
            "a kernel hash lookup of IPv6's 40-byte key with its parse (`hash_fwd6` − `bare_fwd`) {:+.1} ns, of IPv4's key (`hash_fwd` − `bare_fwd`) {:+.1} ns",
            h6 - bare,
            h4 - bare
        ));
    }
    if !parts.is_empty() {
        let _ = writeln!(s, "Differences of medians: {}.", parts.join("; "));
    }
}

/// `Nat / Nat66`, `Dsr`: how the IPv6 rows name a mode.
pub(super) fn family_mode_name(mode: Forwarding) -> String {
    match mode {
        Forwarding::Nat => "Nat / Nat66".to_string(),
        _ => mode_name(mode).to_string(),
    }
}

/// `established` or `new`.
pub(super) fn flow_name(flow: FlowState) -> &'static str {
    match flow {
        FlowState::Established | FlowState::EstablishedCold => "established",
        FlowState::New | FlowState::NewLargeTables => "new",
    }
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
        if let Some(h) = r.fwd.iter().find(|row| row.hop == Hop::HashFwd) {
            let _ = writeln!(
                s,
                "- `hash_fwd` (the ceiling plus one 5-tuple hash lookup, what any forwarder with a connection table does at least) delivered {:.2} Mpps, {:.0} % of the ceiling.",
                h.delivered.median,
                100.0 * h.delivered.median / c
            );
        }
        for mode in [Forwarding::Nat, Forwarding::Dsr] {
            let label = Hop::Lb(mode);
            let one: Vec<&FwdRow> = r
                .fwd
                .iter()
                .filter(|row| row.hop == label && row.flows == 1)
                .collect();
            let uniform = |row: &&FwdRow| row.dist == FlowDist::Uniform;
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
                .filter(|row| row.hop == label)
                .filter(uniform)
                .map(|row| row.flows)
                .max()
                .filter(|&f| f > 1);
            if let Some(most) = most {
                let kept: Vec<f64> = one
                    .iter()
                    .filter_map(|o| {
                        r.fwd
                            .iter()
                            .filter(uniform)
                            .find(|row| {
                                row.hop == label && row.backends == o.backends && row.flows == most
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
    ipv6_forwarding_summary(&mut s, &r.fwd);
    for pass in r.ns.iter().filter(|row| row.program == NsProgram::XdpPass) {
        for row in r.ns.iter().filter(|row| {
            matches!(row.program, NsProgram::Lb { .. } | NsProgram::Decap(_))
                && row.method == pass.method
        }) {
            let _ = writeln!(
                s,
                "- `{}`, {}: {:.1} ns/packet, {:.1} ns more than `xdp_pass` measured the same way ({:.1} ns).",
                row.program,
                row.method,
                row.ns.median,
                row.ns.median - pass.ns.median,
                pass.ns.median
            );
        }
    }
    if let Some(hash) = r.ns.iter().find(|row| row.program == NsProgram::HashFwd) {
        for row in r.ns.iter().filter(|row| {
            matches!(
                row.program,
                NsProgram::Lb {
                    flow: FlowState::Established,
                    ..
                }
            ) && row.method == hash.method
        }) {
            let _ = writeln!(
                s,
                "- `{}`, {}: {:.1} ns more than `hash_fwd` ({:.1} ns), which does its flow-table lookup too: what `lb` itself adds per packet.",
                row.program,
                row.method,
                row.ns.median - hash.ns.median,
                hash.ns.median
            );
        }
    }
    for packet in [TracedPacket::Established, TracedPacket::NotForwarded] {
        let find = |on| {
            r.ns.iter()
                .find(|row| row.program == NsProgram::LbTracing { packet, on })
        };
        if let (Some(off), Some(on)) = (find(false), find(true)) {
            let _ = writeln!(
                s,
                "- Drop tracing, {}: {:.1} ns/packet off, {:.1} ns on ({:+.1} ns).",
                match packet {
                    TracedPacket::Established => "established flow",
                    TracedPacket::NotForwarded => "a packet not forwarded",
                },
                off.ns.median,
                on.ns.median,
                on.ns.median - off.ns.median
            );
        }
    }
    let capture = |on| {
        r.ns.iter()
            .find(|row| row.program == NsProgram::LbCapture { on })
    };
    if let (Some(off), Some(on)) = (capture(false), capture(true)) {
        let _ = writeln!(
            s,
            "- Capture, established flow: {:.1} ns/packet off, {:.1} ns on with a filter matching nothing ({:+.1} ns).",
            off.ns.median,
            on.ns.median,
            on.ns.median - off.ns.median
        );
    }
    if let Ok(rows) = &r.http {
        for (load, _) in &r.wrk_loads {
            let find = |path: fn(&HttpPath) -> bool| {
                rows.iter().find(|row| path(&row.path) && row.load == *load)
            };
            if let (Some(lb), Some(direct), Some(ha)) = (
                find(|p| matches!(p, HttpPath::XdpLb { .. })),
                find(|p| *p == HttpPath::Direct),
                find(|p| matches!(p, HttpPath::HaProxy { .. })),
            ) {
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

/// Issue 24's forwarding rows in ratios: the IPv6 ceiling next to IPv4's,
/// `lb` over IPv6 as a fraction of the IPv6 ceiling, and its most flows
/// against its one flow.
fn ipv6_forwarding_summary(s: &mut String, fwd: &[FwdRow]) {
    let Some(c6) = ceiling_of(fwd, Hop::Ceiling6) else {
        return;
    };
    let v4 = ceiling(fwd)
        .map(|c| format!(", {:.0} % of the IPv4 ceiling's", 100.0 * c6 / c))
        .unwrap_or_default();
    let _ = writeln!(
        s,
        "- The IPv6 ceiling (`bare_fwd6`, one flow) delivered {c6:.2} Mpps{v4}."
    );
    for mode in [Forwarding::Nat, Forwarding::Dsr] {
        let hop = Hop::Lb6(mode);
        let Some(one) = fwd.iter().find(|r| r.hop == hop && r.flows == 1) else {
            continue;
        };
        let paired = one
            .paired
            .map(|p| format!(" ({:.0} % paired with it)", 100.0 * p.median))
            .unwrap_or_default();
        let _ = writeln!(
            s,
            "- `{hop}`, one flow: {:.0} % of the IPv6 ceiling{paired}.",
            100.0 * one.delivered.median / c6
        );
        if let Some(most) = fwd
            .iter()
            .filter(|r| r.hop == hop && r.flows > 1)
            .max_by_key(|r| r.flows)
        {
            let _ = writeln!(
                s,
                "- `{hop}` with {} flows: {:.0} % of the IPv6 ceiling, {:.0} % of its single-flow rate.",
                most.flows,
                100.0 * most.delivered.median / c6,
                100.0 * most.delivered.median / one.delivered.median
            );
        }
    }
}

/// Each scheduler's cost per packet: established (no scheduling) and new.
fn scheduler_section(s: &mut String, rows: &[SchedCostRow]) {
    let _ = writeln!(
        s,
        "\n## Scheduler cost (BPF_PROG_TEST_RUN, lb DSR, 100 backends)\n"
    );
    let _ = writeln!(
        s,
        "An established flow is forwarded by its conntrack entry and never scheduled; a new flow pays its scheduler's table lookup (maglev and source-ip: a 65,537-slot Maglev table; the others: the ring) and the conntrack insert.\n"
    );
    let _ = writeln!(s, "| scheduler | established (ns) | new flow (ns) |");
    let _ = writeln!(s, "|---|---|---|");
    for row in rows {
        let _ = writeln!(
            s,
            "| {} | {} ({}) | {} ({}) |",
            row.scheduler,
            row.established.text(1),
            row.established_method,
            row.new.text(1),
            row.new_method
        );
    }
}

/// The firewall's cost: the same packets with the firewall empty and with
/// [`FW_PREFIXES`] prefixes, and the difference as a share of the
/// established flow's cost (the target: at most 10 %).
fn firewall_section(s: &mut String, rows: &[FwCostRow]) {
    let _ = writeln!(
        s,
        "\n## Firewall cost (BPF_PROG_TEST_RUN, lb DSR, 100 backends)\n"
    );
    let _ = writeln!(
        s,
        "Loaded: {FW_PREFIXES} global deny /24s that share 10/8 with the sources, and an allow list on the service that the sources match, so a new flow pays two LPM trie lookups. Established flows never reach the firewall (it filters new flows only), so their rows measure that it costs them nothing.\n"
    );
    let _ = writeln!(
        s,
        "| flow | method | firewall empty (ns) | {FW_PREFIXES} prefixes (ns) | difference |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|");
    for row in rows {
        let flow = match row.flow {
            FlowState::Established | FlowState::EstablishedCold => "established",
            FlowState::New | FlowState::NewLargeTables => "new",
        };
        let diff = row.loaded.median - row.empty.median;
        let _ = writeln!(
            s,
            "| {flow} | {} | {} | {} | {:+.1} ns ({:+.1} %) |",
            row.method,
            row.empty.text(1),
            row.loaded.text(1),
            diff,
            100.0 * diff / row.empty.median
        );
    }
    // The target: the stage costs an established flow at most 10 %.
    if let Some(est) = rows
        .iter()
        .find(|r| r.flow == FlowState::Established && matches!(r.method, NsMethod::Repeat(_)))
    {
        let share = 100.0 * (est.loaded.median - est.empty.median) / est.empty.median;
        let verdict = if share <= 10.0 { "met" } else { "NOT met" };
        let _ = writeln!(
            s,
            "\nTarget (at most 10 % of an established flow's cost with {FW_PREFIXES} prefixes): {verdict}, {share:+.1} % ({}).",
            est.method
        );
    }
}

#[cfg(test)]
mod firewall_tests {
    use super::*;
    use crate::harness::bench::Stat;

    fn st(median: f64) -> Stat {
        Stat {
            median,
            min: median,
            max: median,
        }
    }

    #[test]
    fn the_scheduler_section_has_a_row_per_scheduler() {
        let mut s = String::new();
        scheduler_section(
            &mut s,
            &[SchedCostRow {
                scheduler: crate::config::Scheduler::SourceIp,
                established: st(40.0),
                established_method: NsMethod::Repeat(1000),
                new: st(900.0),
                new_method: NsMethod::DistinctFlows(10),
            }],
        );
        assert!(
            s.contains("| source-ip | 40.0 (40.0–40.0) (repeat=1000) | 900.0 (900.0–900.0) (10 distinct flows, repeat=1) |"),
            "{s}"
        );
    }

    #[test]
    fn the_firewall_section_gives_differences_and_judges_the_target() {
        let row = |flow, method, empty, loaded| FwCostRow {
            flow,
            method,
            empty: st(empty),
            loaded: st(loaded),
        };
        let mut s = String::new();
        firewall_section(
            &mut s,
            &[
                row(FlowState::Established, NsMethod::Repeat(1000), 40.0, 42.0),
                row(FlowState::New, NsMethod::DistinctFlows(10), 800.0, 880.0),
            ],
        );
        assert!(s.contains("| new | 10 distinct flows, repeat=1 | 800.0 (800.0–800.0) | 880.0 (880.0–880.0) | +80.0 ns (+10.0 %) |"), "{s}");
        assert!(s.contains("Target (at most 10 % of an established flow's cost with 10000 prefixes): met, +5.0 % (repeat=1000)."), "{s}");
        let mut over = String::new();
        firewall_section(
            &mut over,
            &[row(
                FlowState::Established,
                NsMethod::Repeat(1000),
                40.0,
                50.0,
            )],
        );
        assert!(over.contains("NOT met, +25.0 %"), "{over}");
    }
}
