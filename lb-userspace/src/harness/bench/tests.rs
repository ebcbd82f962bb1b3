//! The benchmark's host tests: report, chart, parsing, configs.

use std::{net::Ipv4Addr, path::Path, time::Duration};

use super::{
    http::{HttpPath, HttpRow, parse_wrk, wrk_ms},
    measure::{FlowState, FwdRow, Hop, NsMethod, NsProgram, NsRow, Stat},
    net::{backend_addr, lb_config},
    report::{ANALYSIS_DOC, Report, render, shown_command, utc_date},
    svg::plot_svg,
    targets::{TARGET_FLOWS, grouped, targets},
};
use crate::{config::Forwarding, harness::pktgen::FlowDist};

#[test]
fn plot_has_a_bar_per_row_and_the_ceiling() {
    let stat = |m: f64| Stat {
        median: m,
        min: m - 0.5,
        max: m + 0.5,
    };
    let rows = vec![
        FwdRow {
            hop: Hop::Ceiling,
            flows: 1,
            dist: FlowDist::Uniform,
            backends: 0,
            offered: stat(7.0),
            delivered: stat(7.0),
            paired: None,
        },
        FwdRow {
            hop: Hop::Lb(Forwarding::Nat),
            flows: 1000,
            dist: FlowDist::Uniform,
            backends: 2,
            offered: stat(5.5),
            delivered: stat(5.5),
            paired: None,
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
    /// Backends behind the XDP LB and HAProxy in the HTTP rows.
    http_backends: usize,
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
    http_backends: 3,
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
    http_backends: 7,
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
        hop: Hop::Ceiling,
        flows: 1,
        dist: FlowDist::Uniform,
        backends: 0,
        offered: spread(v.ceiling),
        delivered: spread(v.ceiling),
        paired: None,
    }];
    for (m, mode) in [Forwarding::Nat, Forwarding::Dsr].into_iter().enumerate() {
        for (b, &backends) in v.backends.iter().enumerate() {
            for (f, flows) in [1, TARGET_FLOWS].into_iter().enumerate() {
                let mpps = v.mpps[m][b][f];
                fwd.push(FwdRow {
                    hop: Hop::Lb(mode),
                    flows,
                    dist: FlowDist::Uniform,
                    backends,
                    offered: spread(mpps),
                    delivered: spread(mpps),
                    paired: (flows == 1).then(|| {
                        let r = mpps / v.ceiling;
                        st(r, r * 0.99, r * 1.005)
                    }),
                });
            }
        }
    }
    let (calls, repeat) = (v.calls, v.repeat);
    let lb = |flow| NsProgram::Lb {
        mode: Forwarding::Dsr,
        backends: v.backends[1],
        flow,
    };
    let ns = [
        (NsProgram::XdpPass, NsMethod::Repeat(repeat)),
        (NsProgram::XdpPass, NsMethod::Calls(calls)),
        (lb(FlowState::New), NsMethod::DistinctFlows(calls)),
        (lb(FlowState::Established), NsMethod::Repeat(repeat)),
        (lb(FlowState::Established), NsMethod::Calls(calls)),
    ]
    .into_iter()
    .zip(v.ns)
    .map(|((program, method), ns)| NsRow {
        program,
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
        HttpPath::Direct,
        HttpPath::XdpLb {
            backends: v.http_backends,
        },
        HttpPath::HaProxy {
            backends: v.http_backends,
        },
    ] {
        for (load, _) in &loads {
            if let Some(&[rps, p50, p99]) = figures.next() {
                http.push(HttpRow {
                    path,
                    load: load.clone(),
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
        sender: crate::pktgen::Sender::XdpLiveFrames,
        took: Duration::from_secs(v.took_s),
        fwd,
        ns,
        families: Default::default(),
        firewall: Vec::new(),
        schedulers: Vec::new(),
        flood: Vec::new(),
        sync: super::sync::SyncRows::default(),
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
    // Only these may: the targets' thresholds (90 %, 100 ns, 20 %, 3×; 100
    // is also the ceiling's ratio to itself; issue 23's 55 ns, 250 ns,
    // 60 %, 15 %, 95 % — B's DSR ratio is 95 %, so "by 0 points" from it)
    // and the flow counts both runs swept (1 and 1 000 000).
    let allowed: std::collections::BTreeSet<String> = [
        "90", "100", "20", "3", "1", "000", "1000000", "55", "250", "60", "15", "95", "0",
    ]
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
fn a_report_whose_generator_was_the_packet_socket_says_its_rates_are_the_generators() {
    let live = render(&report(&A));
    assert!(live.contains("`lb pktgen` (XDP live frames, "), "{live}");
    assert!(!live.contains("generator was the limit"), "{live}");
    let text = render(&Report {
        sender: crate::pktgen::Sender::PacketSocket,
        ..report(&A)
    });
    assert!(text.contains("`lb pktgen` (an AF_PACKET socket"), "{text}");
    assert!(
        text.contains("The generator was the limit of this run"),
        "{text}"
    );
    // The targets on rates are judged on live frames only.
    assert!(live.contains("% of the bare forwarder, Nat | "), "{live}");
    assert!(!live.contains("**not judged**"), "{live}");
    assert!(!text.contains("% of the bare forwarder, Nat | "), "{text}");
    assert!(
        text.contains("| the forwarding-rate targets (") && text.contains("**not judged**"),
        "{text}"
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

#[test]
fn table_cost_section_compares_mixes_with_one_flow() {
    use super::measure::MIX_BACKENDS;
    let row = |flows, dist, mpps: f64| FwdRow {
        hop: Hop::Lb(Forwarding::Dsr),
        flows,
        dist,
        backends: MIX_BACKENDS,
        offered: st(mpps, mpps, mpps),
        delivered: st(mpps, mpps, mpps),
        paired: None,
    };
    let zipf = FlowDist::Zipf { s: 1.0 };
    let mut r = report(&A);
    r.fwd = vec![
        FwdRow {
            hop: Hop::Ceiling,
            flows: 1,
            dist: FlowDist::Uniform,
            backends: 0,
            offered: st(10.0, 10.0, 10.0),
            delivered: st(10.0, 10.0, 10.0),
            paired: None,
        },
        row(1, FlowDist::Uniform, 8.0),
        row(1000, FlowDist::Uniform, 5.0),
        row(1000, zipf, 6.4),
    ];
    let s = render(&r);
    assert!(
        s.contains("## Flow mix and the connection table's cost (100 backends)"),
        "{s}"
    );
    // 1000/8 = 125 ns at one flow; 1000/5 = 200 ns: +75 ns for the table.
    assert!(
        s.contains("| lb Dsr | 1 | one flow | 8.00 (8.00–8.00) | 80 % | 125.0 | – |"),
        "{s}"
    );
    assert!(
        s.contains("| lb Dsr | 1000 | uniform: every flow in turn | 5.00 (5.00–5.00) | 50 % | 200.0 | +75.0 ns |"),
        "{s}"
    );
    // Zipf: 1000/6.4 = 156.25 ns, +31.2 ns; the mix line states the draws.
    assert!(s.contains("| lb Dsr | 1000 | Zipf s=1: "), "{s}");
    assert!(
        s.contains("| 6.40 (6.40–6.40) | 64 % | 156.2 | +31.2 ns |"),
        "{s}"
    );
    // The forwarding table names the mix; the 1M-flow target ignores Zipf rows.
    assert!(s.contains("| lb Dsr | 100 | 1000, Zipf s=1 | "), "{s}");
}

#[test]
fn flood_section_reports_survivors_served_and_rate_and_judges_the_target() {
    use super::flood::{ESTABLISHED, FloodRow};
    let flood = |mode, survived_min: f64| FloodRow {
        hop: Hop::Lb(mode),
        spoofed: st(9_000_000.0, 8_000_000.0, 9_500_000.0),
        offered: st(4.5, 4.0, 4.8),
        delivered: st(3.5, 3.0, 3.6),
        established: st(f64::from(ESTABLISHED), 9990.0, f64::from(ESTABLISHED)),
        survived: st(1.0, survived_min, 1.0),
        served: st(0.998, 0.99, 1.0),
        handshake_ms: st(40.0, 31.0, 52.0),
    };
    let mut r = report(&A);
    r.fwd.retain(|row| row.hop == Hop::Ceiling);
    r.fwd[0].delivered = st(7.0, 7.0, 7.0);
    r.flood = vec![flood(Forwarding::Nat, 0.25), flood(Forwarding::Dsr, 1.0)];
    let s = render(&r);
    assert!(s.contains("## SYN flood"), "{s}");
    // A ceiling of 7.0 Mpps: 3.5 is 50 %.
    assert!(
        s.contains("| lb Nat | 9000000 | 4.50 (4.00–4.80) | 3.50 (3.00–3.60) | 50 % | 10000 of 10000 | 100.0 % (25.0–100.0) | 99.8 % (99.0–100.0) |"),
        "{s}"
    );
    // The worst run decides.
    assert!(
        s.contains("| SYN flood: 100 % of the established flows survive, lb Nat | **missed**: 25.0 % in the worst run |"),
        "{s}"
    );
    assert!(
        s.contains("| SYN flood: 100 % of the established flows survive, lb Dsr | met: 100.0 % in the worst run |"),
        "{s}"
    );
    assert!(
        s.contains("The legitimate handshakes took, under the flood (first SYN to last confirming segment): lb Nat 40 (31–52) ms, lb Dsr 40 (31–52) ms."),
        "{s}"
    );
    // A run that established nothing measured nothing (survival 0 / 0): not
    // judged, where it used to read "missed: NaN %".
    r.flood = vec![FloodRow {
        established: st(0.0, 0.0, 0.0),
        survived: st(f64::NAN, f64::NAN, f64::NAN),
        ..flood(Forwarding::Nat, 1.0)
    }];
    let s = render(&r);
    assert!(
        s.contains("| SYN flood: 100 % of the established flows survive, lb Nat | **not measured**: a run established no connection before its flood |"),
        "{s}"
    );
}

/// Issue 26's target row names the encapsulation floor (`ipip_fwd` /
/// `gue_fwd` less `bare_fwd`, one call each) when the run measured it.
#[test]
fn the_tunnel_target_names_the_encapsulation_floor() {
    let calls = |program, median| NsRow {
        program,
        method: NsMethod::Calls(2000),
        ns: st(median, median, median),
    };
    let lb = |mode| NsProgram::Lb {
        mode,
        backends: 100,
        flow: FlowState::Established,
    };
    let ns = vec![
        calls(NsProgram::XdpPass, 117.0),
        calls(NsProgram::BareFwd, 144.0),
        calls(NsProgram::EncapFloor(Forwarding::Ipip), 173.5),
        calls(NsProgram::EncapFloor(Forwarding::Gue), 176.0),
        calls(lb(Forwarding::Dsr), 210.0),
        calls(lb(Forwarding::Ipip), 240.0),
        calls(lb(Forwarding::Gue), 245.0),
    ];
    let text = targets(&[], &ns, &Err("not run".into()), &[]);
    let row = |mode: &str| {
        text.lines()
            .find(|l| l.contains(&format!("one call each, {mode} within 15 % of DSR")))
            .unwrap_or_else(|| panic!("no {mode} target row in {text}"))
            .to_string()
    };
    let ipip = row("Ipip");
    assert!(ipip.contains("met: +14 %"), "{ipip}");
    assert!(
        ipip.contains("the floor, `ipip_fwd` less `bare_fwd`: +29.5 ns"),
        "{ipip}"
    );
    let gue = row("Gue");
    assert!(gue.contains("**missed**: +17 %"), "{gue}");
    assert!(
        gue.contains("the floor, `gue_fwd` less `bare_fwd`: +32.0 ns"),
        "{gue}"
    );
}

/// With paired rounds in the run, issue 26's target is judged on them, not
/// on the rows measured apart.
#[test]
fn the_tunnel_target_is_judged_on_the_paired_rounds_when_there_are_some() {
    let row = |program, method, median| NsRow {
        program,
        method,
        ns: st(median, median, median),
    };
    let lb = |mode| NsProgram::Lb {
        mode,
        backends: 100,
        flow: FlowState::Established,
    };
    let apart = NsMethod::Calls(2000);
    let paired = NsMethod::Paired {
        calls: 2000,
        rounds: 21,
    };
    let ns = vec![
        row(NsProgram::XdpPass, apart, 117.0),
        row(lb(Forwarding::Dsr), apart, 190.0),
        row(lb(Forwarding::Ipip), apart, 300.0),
        row(lb(Forwarding::Dsr), paired, 250.0),
        row(lb(Forwarding::Ipip), paired, 280.0),
        row(lb(Forwarding::Gue), paired, 300.0),
        row(NsProgram::XdpPass, paired, 120.0),
    ];
    let text = targets(&[], &ns, &Err("not run".into()), &[]);
    let find = |mode: &str| {
        text.lines()
            .find(|l| l.contains(&format!("one call each, {mode} within 15 % of DSR")))
            .unwrap_or_else(|| panic!("no {mode} target row in {text}"))
            .to_string()
    };
    let ipip = find("Ipip");
    assert!(
        ipip.contains("met: +12 % (paired rounds, medians: 280.0 vs 250.0 ns; net of `xdp_pass` 160.0 vs 130.0 ns)"),
        "{ipip}"
    );
    assert!(find("Gue").contains("**missed**: +20 %"), "{text}");
}

/// With NAT and full NAT measured in paired rounds, issue 25's targets are
/// judged on those rows, not on the rows measured minutes apart.
#[test]
fn the_full_nat_targets_are_judged_on_the_paired_rounds_when_there_are_some() {
    let row = |mode, flow, method, median| NsRow {
        program: NsProgram::Lb {
            mode,
            backends: 100,
            flow,
        },
        method,
        ns: st(median, median, median),
    };
    let (est, new) = (FlowState::Established, FlowState::New);
    let paired = |new| NsMethod::PairedWithNat {
        calls: 2000,
        rounds: 21,
        new,
    };
    let ns = vec![
        // Apart: full NAT's rows look 1.30x and 1.60x NAT's.
        row(Forwarding::Nat, est, NsMethod::Calls(2000), 100.0),
        row(Forwarding::Nat, new, NsMethod::DistinctFlows(2000), 500.0),
        row(Forwarding::FullNat, est, NsMethod::Calls(2000), 130.0),
        row(
            Forwarding::FullNat,
            new,
            NsMethod::DistinctFlows(2000),
            800.0,
        ),
        // Paired: 1.05x and 1.20x.
        row(Forwarding::Nat, est, paired(false), 100.0),
        row(Forwarding::FullNat, est, paired(false), 105.0),
        row(Forwarding::Nat, new, paired(true), 600.0),
        row(Forwarding::FullNat, new, paired(true), 720.0),
    ];
    let text = targets(&[], &ns, &Err("not run".into()), &[]);
    let find = |what: &str| {
        text.lines()
            .find(|l| l.contains(&format!("full NAT, {what} flow's packet")))
            .unwrap_or_else(|| panic!("no {what} row in {text}"))
            .to_string()
    };
    let est = find("an established");
    assert!(
        est.contains(
            "met: 1.05× (105 vs 100 ns, one packet per call each, paired: medians of 21 rounds)"
        ),
        "{est}"
    );
    assert!(
        find("a new").contains("met: 1.20× (720 vs 600 ns"),
        "{text}"
    );
    // Without paired rows, the rows measured apart are judged.
    let apart: Vec<NsRow> = ns
        .into_iter()
        .filter(|r| !matches!(r.method, NsMethod::PairedWithNat { .. }))
        .collect();
    let text = targets(&[], &apart, &Err("not run".into()), &[]);
    assert!(
        text.contains("**missed**: 1.30× (130 vs 100 ns, one packet per call each) |"),
        "{text}"
    );
}

/// Issue 24's forwarding rows: the IPv6 rows are fractions of the IPv6
/// ceiling (`bare_fwd6`), in the table and in the ratios, while the IPv4
/// rows and targets keep the IPv4 ceiling and ignore the IPv6 rows.
#[test]
fn ipv6_forwarding_rows_are_fractions_of_the_ipv6_ceiling() {
    let row = |hop, flows, backends, mpps: f64, paired: Option<f64>| FwdRow {
        hop,
        flows,
        dist: FlowDist::Uniform,
        backends,
        offered: st(mpps, mpps, mpps),
        delivered: st(mpps, mpps, mpps),
        paired: paired.map(|p| st(p, p, p)),
    };
    let mut r = report(&A);
    r.fwd = vec![
        row(Hop::Ceiling, 1, 0, 10.0, None),
        row(Hop::Lb(Forwarding::Nat), 1, 100, 9.0, Some(0.9)),
        row(Hop::Ceiling6, 1, 0, 8.0, None),
        row(Hop::Lb6(Forwarding::Nat), 1, 100, 6.0, Some(0.74)),
        row(Hop::Lb6(Forwarding::Nat), TARGET_FLOWS, 100, 4.0, None),
        row(Hop::Lb6(Forwarding::Dsr), 1, 100, 7.2, Some(0.91)),
    ];
    let s = render(&r);
    for line in [
        "| bare_fwd6 (IPv6 ceiling) | – | 1 | 8.00 (8.00–8.00) | 8.00 (8.00–8.00) | 100 % |",
        "| lb Nat66 | 100 | 1 | 6.00 (6.00–6.00) | 6.00 (6.00–6.00) | 75 % |",
        "| lb Nat66 | 100 | 1000000 | 4.00 (4.00–4.00) | 4.00 (4.00–4.00) | 50 % |",
        "| lb Dsr IPv6 | 100 | 1 | 7.20 (7.20–7.20) | 7.20 (7.20–7.20) | 90 % |",
        "| lb Nat | 100 | 1 | 9.00 (9.00–9.00) | 9.00 (9.00–9.00) | 90 % |",
        "| lb Nat66 | 100 | 6.00 (6.00–6.00) | 74 % (74–74 %) |",
        "- The IPv6 ceiling (`bare_fwd6`, one flow) delivered 8.00 Mpps, 80 % of the IPv4 ceiling's.",
        "- `lb Nat66`, one flow: 75 % of the IPv6 ceiling (74 % paired with it).",
        "- `lb Nat66` with 1000000 flows: 50 % of the IPv6 ceiling, 67 % of its single-flow rate.",
        "- `lb Dsr IPv6`, one flow: 90 % of the IPv6 ceiling (91 % paired with it).",
    ] {
        assert!(s.contains(line), "{line}\n{s}");
    }
    // The IPv4 ratios and targets read IPv4's rows only.
    assert!(
        s.contains("- `lb Nat`, one established flow: 90 % of the ceiling (backends: 100)."),
        "{s}"
    );
    assert!(!s.contains("`lb Dsr`, one established flow"), "{s}");
    assert!(
        !s.contains("flows cost ≤ 20 % of the single-flow rate, Nat"),
        "{s}"
    );
}

use super::measure::{FamilyCost, FamilyCostRow, new_flows_per_round, per_round_ratios};

/// A [`FamilyCostRow`] from per-round samples, as `family_rows` makes it.
fn family_row(mode: Forwarding, flow: FlowState, v4: &[f64], v6: &[f64]) -> FamilyCostRow {
    FamilyCostRow {
        mode,
        flow,
        v4: Stat::of(v4),
        v6: Stat::of(v6),
        ratio: Stat::of(&per_round_ratios(v6, v4)),
    }
}

/// Issue 24's cost targets are judged on the ratio taken within each
/// round: here NAT's established medians are 5 % apart (100 vs 105 ns),
/// but in two rounds of three IPv6 took 15 % longer, so it is missed; the
/// section states both families' figures and the per-round ratios.
#[test]
fn ipv6_cost_targets_are_judged_on_the_ratios_within_each_round() {
    let rounds = [100.0, 120.0, 80.0];
    let families = FamilyCost {
        rows: vec![
            family_row(
                Forwarding::Nat,
                FlowState::Established,
                &rounds,
                &[105.0, 138.0, 92.0],
            ),
            family_row(
                Forwarding::Nat,
                FlowState::New,
                &[300.0, 310.0, 290.0],
                &[345.0, 360.0, 340.0],
            ),
            family_row(
                Forwarding::Dsr,
                FlowState::Established,
                &rounds,
                &[108.0, 125.0, 86.0],
            ),
            family_row(
                Forwarding::Dsr,
                FlowState::New,
                &[300.0, 310.0, 290.0],
                &[372.0, 380.0, 350.0],
            ),
        ],
        floors: vec![
            ("xdp_pass", st(60.0, 58.0, 63.0)),
            ("bare_fwd", st(80.0, 78.0, 90.0)),
            ("tail_fwd", st(95.5, 90.0, 99.0)),
            ("hash_fwd", st(110.0, 100.0, 120.0)),
            ("hash_fwd6", st(131.0, 125.0, 140.0)),
        ],
        rounds: 3,
        calls: 2000,
        new_calls: 1560,
    };
    let s = render(&Report {
        families,
        ..report(&A)
    });
    for line in [
        "## IPv6 next to IPv4 (BPF_PROG_TEST_RUN, paired)",
        "Each of 3 rounds measures, for each mode and family, the established flow (2000 calls of one frame, repeat=1) and 1560 new flows",
        "| Nat / Nat66 | established | 100.0 (80.0–120.0) | 105.0 (92.0–138.0) | 1.150 (1.050–1.150) |",
        "| Dsr | established | 100.0 (80.0–120.0) | 108.0 (86.0–125.0) | 1.075 (1.042–1.080) |",
        "The bench's programs in the same rounds, one call each (ns/packet): `xdp_pass` 60.0 (58.0–63.0), `bare_fwd` 80.0 (78.0–90.0), `tail_fwd` 95.5 (90.0–99.0), `hash_fwd` 110.0 (100.0–120.0), `hash_fwd6` 131.0 (125.0–140.0).",
        "Differences of medians: one tail call (`tail_fwd` − `bare_fwd`, as `lb` → `lb_v6`) +15.5 ns; a kernel hash lookup of IPv6's 40-byte key with its parse (`hash_fwd6` − `bare_fwd`) +51.0 ns, of IPv4's key (`hash_fwd` − `bare_fwd`) +30.0 ns.",
        "| IPv6, an established flow's packet within 10 % of IPv4's, Nat / Nat66 | **missed**: +15.0 % (median of 3 paired rounds, +5.0 to +15.0 %; 105.0 vs 100.0 ns) |",
        "| IPv6, an established flow's packet within 10 % of IPv4's, Dsr | met: +7.5 % (median of 3 paired rounds, +4.2 to +8.0 %; 108.0 vs 100.0 ns) |",
        "| IPv6, a new flow's packet within 20 % of IPv4's, Nat / Nat66 | met: +16.1 % (median of 3 paired rounds, +15.0 to +17.2 %; 345.0 vs 300.0 ns) |",
        "| IPv6, a new flow's packet within 20 % of IPv4's, Dsr | **missed**: +22.6 % (median of 3 paired rounds, +20.7 to +24.0 %; 372.0 vs 300.0 ns) |",
    ] {
        assert!(s.contains(line), "{line}\n{s}");
    }
    // A run that did not measure them has neither the section nor targets.
    let none = render(&report(&A));
    assert!(!none.contains("IPv6"), "{none}");
}

/// The paired rounds' new flows: every round's batch fits, together with
/// all the others, in half the default half-open table; too many rounds is
/// an error, not a silently full table.
#[test]
fn new_flows_per_round_keep_the_half_open_table_half_empty() {
    let half = lb_common::DEFAULT_HALF_OPEN_SIZE as usize / 2;
    for (calls, rounds) in [(2000, 21), (20_000, 21), (2000, 7), (500, 35)] {
        for entries in [1, 2] {
            let n = new_flows_per_round(calls, rounds, entries).expect("fits");
            assert!(
                n <= calls && n * rounds * entries <= half,
                "{n} × {rounds} × {entries}"
            );
            assert!(n >= 100);
        }
    }
    assert_eq!(new_flows_per_round(2000, 7, 1).expect("fits"), 2000);
    assert_eq!(new_flows_per_round(20_000, 21, 1).expect("fits"), half / 21);
    // NAT66: two entries a flow, so half as many flows.
    assert_eq!(
        new_flows_per_round(20_000, 21, 2).expect("fits"),
        half / 21 / 2
    );
    assert!(new_flows_per_round(2000, 400, 1).is_err());
    assert_eq!(
        per_round_ratios(&[110.0, 90.0], &[100.0, 100.0, 5.0]),
        [1.1, 0.9]
    );
}

/// The new-flow batches: each frame a distinct flow of its family (the
/// source address and port etherparse reads), no flow in two batches, and
/// the IPv6 ones to the IPv6 VIP with a valid UDP checksum.
#[test]
fn new_flow_batches_are_distinct_flows_of_their_family() {
    use std::net::IpAddr;

    use etherparse::{NetSlice, SlicedPacket, TransportSlice};

    use super::net::{Family, NEW_FLOWS_PER_BATCH, VIP, VIP6, new_flows_of};

    let mut seen = std::collections::HashSet::new();
    for family in [Family::V4, Family::V6] {
        for batch in 0..3 {
            for f in new_flows_of(family, batch, 300).expect("frames") {
                let p = SlicedPacket::from_ethernet(&f).expect("parses");
                let (src, dst): (IpAddr, IpAddr) = match (&p.net, family) {
                    (Some(NetSlice::Ipv4(ip)), Family::V4) => (
                        ip.header().source_addr().into(),
                        ip.header().destination_addr().into(),
                    ),
                    (Some(NetSlice::Ipv6(ip)), Family::V6) => (
                        ip.header().source_addr().into(),
                        ip.header().destination_addr().into(),
                    ),
                    _ => panic!("batch {batch} of {family:?}: wrong family"),
                };
                let Some(TransportSlice::Udp(udp)) = &p.transport else {
                    panic!("not UDP")
                };
                if let Some(NetSlice::Ipv6(ip)) = &p.net {
                    let want = udp
                        .to_header()
                        .calc_checksum_ipv6(&ip.header().to_header(), udp.payload())
                        .expect("checksum");
                    assert_eq!(udp.checksum(), want, "IPv6 UDP checksum");
                }
                let vip: IpAddr = match family {
                    Family::V4 => VIP.into(),
                    Family::V6 => VIP6.into(),
                };
                assert_eq!(dst, vip);
                assert!(seen.insert((src, udp.source_port())), "{src} seen twice");
            }
        }
    }
    assert_eq!(seen.len(), 2 * 3 * 300);
    assert!(new_flows_of(Family::V6, 0, NEW_FLOWS_PER_BATCH + 1).is_err());
}

/// The dual-stack config: the IPv4 service and its IPv6 twin, both in the
/// mode asked, the twin's backends IPv6 and distinct.
#[test]
fn the_dual_stack_config_has_an_ipv6_twin_in_the_same_mode() {
    use std::net::{IpAddr, SocketAddr};

    use super::net::{VIP6, backend_addr6, lb_config_dual};
    for mode in [Forwarding::Nat, Forwarding::Dsr] {
        let cfg = lb_config_dual(mode, 100, lb_common::DEFAULT_CONNTRACK_SIZE.into())
            .expect("valid config");
        assert_eq!(cfg.services.len(), 2);
        let v6 = &cfg.services[1];
        assert_eq!(cfg.services[0].backends.len(), 100);
        assert_eq!(v6.forwarding, mode);
        assert_eq!(cfg.services[0].forwarding, mode);
        assert_eq!(v6.vip.ip(), IpAddr::from(VIP6));
        let addrs: std::collections::HashSet<SocketAddr> =
            v6.backends.iter().map(|b| b.address).collect();
        assert_eq!(addrs.len(), 100);
        assert!(addrs.contains(&SocketAddr::new(backend_addr6(99).into(), 5353)));
    }
}
