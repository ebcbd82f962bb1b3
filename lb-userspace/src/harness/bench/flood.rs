//! The SYN flood scenario (issue 11): established connections, then
//! spoofed SYNs at the generator's full rate into connection tables far
//! smaller than the flood, while legitimate clients open new connections.
//! Reported, per forwarding mode: the established flows still in the
//! connection table afterwards (the target is all of them), the legitimate
//! connections that had their entry right after their handshake, and the
//! rate the load balancer held under the flood.
//!
//! All of it is generated on the benchmark's topology (`net`): a connection
//! is its client's SYN, then its bare ACK ([`Proto::TcpAck`]), which is all
//! a load balancer sees of a handshake from the client's side. Whether a
//! flow has its entry is read from the established table (`ESTABLISHED`, overflow `CONNTRACK`) by
//! key, from userspace.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use aya::Ebpf;
use lb_common::FlowKey;

use super::{
    measure::{Hop, Stat, sink_packets},
    net::{CLIENT, GEN_MAC, LBIN_MAC, PORT, VIP, lb_config_for},
};
use crate::{
    config::Forwarding,
    dataplane::{Dataplane, TableSizes},
    harness::{
        pktgen::{self, FlowDist, FrameSpec, Limit, Proto, Spec, flow_conf, flow_endpoint},
        xdp,
    },
};

/// `conntrack-size` of the scenario: the established flows fit many times
/// over, the flood is far larger.
pub(super) const TABLE: u32 = 65_536;
/// `half-open-size`: a quarter of it, as a deployment would size a table
/// only handshakes in progress use.
pub(super) const HALF_OPEN: u32 = 16_384;
/// The service's backends (each resolves to the sink).
pub(super) const BACKENDS: usize = 100;
/// Established connections made before the flood.
pub(super) const ESTABLISHED: u32 = 10_000;
/// Legitimate connections opened while the flood runs.
pub(super) const LEGIT: u32 = 1_000;
/// Distinct spoofed sources (198.18.128.1 on, 64 512 ports per address):
/// more than a flood of a few seconds sends, so no spoofed flow repeats.
pub(super) const SPOOFED: u32 = 1 << 24;
/// The rate of the clients' packets: well under a veth ring's burst, so
/// none is lost on the way in. The clients' SYNs therefore take
/// `count / CLIENT_RATE` (5 ms for `LEGIT`), and each ACK follows its SYN
/// by that plus `HANDSHAKE_GAP`: the handshake time a half-open entry must
/// outlive under the flood.
pub(super) const CLIENT_RATE: u64 = 200_000;
pub(super) const HANDSHAKE_GAP: Duration = Duration::from_millis(2);

/// What one forwarding mode held under the flood.
#[derive(Debug)]
pub(super) struct FloodRow {
    pub(super) hop: Hop,
    /// Spoofed SYNs the generator sent in a run.
    pub(super) spoofed: Stat,
    pub(super) offered: Stat,
    pub(super) delivered: Stat,
    /// Established flows in the table before the flood (of `ESTABLISHED`).
    pub(super) established: Stat,
    /// Of those, the share still there after it.
    pub(super) survived: Stat,
    /// Legitimate connections opened during the flood that were
    /// established (in the established table) right after their ACK, as a share of
    /// `LEGIT`.
    pub(super) served: Stat,
}

/// A connection's key as the data plane stores it (network order).
fn flow_key(src: SocketAddrV4) -> FlowKey {
    FlowKey {
        saddr: u32::from_ne_bytes(src.ip().octets()),
        daddr: u32::from_ne_bytes(VIP.octets()),
        sport: src.port().to_be(),
        dport: PORT.to_be(),
        protocol: 6,
        ..FlowKey::default()
    }
}

/// Clients `src:1024..`, `count` of them (the generator's flow order).
fn clients(src: Ipv4Addr, count: u32) -> anyhow::Result<Vec<SocketAddrV4>> {
    let conf = flow_conf(0, src, 1024, count)?;
    Ok((0..count)
        .map(|n| {
            let (addr, port) = flow_endpoint(&conf, n);
            SocketAddrV4::new(addr, port)
        })
        .collect())
}

/// How many of `keys` the established table (`ESTABLISHED` and its
/// overflow, the ones no new flow evicts) holds.
fn in_table(dp: &Dataplane, keys: &[FlowKey]) -> anyhow::Result<usize> {
    let table = dp.flow_table()?;
    let mut n = 0;
    for k in keys {
        if matches!(table.lookup(k)?, Some((true, _))) {
            n += 1;
        }
    }
    Ok(n)
}

/// The generator's TCP frames from `src:1024..` to the VIP.
fn spec(gen0: u32, src: Ipv4Addr, proto: Proto, flows: u32, threads: usize) -> Spec {
    Spec {
        ifindex: gen0,
        frame: FrameSpec {
            dst_mac: LBIN_MAC,
            src_mac: GEN_MAC,
            src: SocketAddrV4::new(src, 1024).into(),
            dst: SocketAddrV4::new(VIP, PORT).into(),
            proto,
            size: 64,
        },
        flows,
        dist: FlowDist::Uniform,
        limit: Limit::Count(u64::from(flows)),
        rate: Some(CLIENT_RATE),
        threads,
        fresh_frames: false,
    }
}

/// `count` connections from `src:1024..`: every SYN, then every ACK.
fn connect(ebpf: &mut Ebpf, gen0: u32, src: Ipv4Addr, count: u32) -> anyhow::Result<u64> {
    let mut sent = 0;
    for proto in [Proto::TcpSyn, Proto::TcpAck] {
        sent += pktgen::generate(ebpf, &spec(gen0, src, proto, count, 1))?.frames;
        std::thread::sleep(HANDSHAKE_GAP);
    }
    Ok(sent)
}

/// One run of the scenario on a fresh data plane: (spoofed SYNs sent,
/// offered Mpps, delivered Mpps, established before, survived share,
/// served share).
fn flood_once(
    ebpf: &mut Ebpf,
    mode: Forwarding,
    seconds: f64,
    threads: usize,
) -> anyhow::Result<[f64; 6]> {
    let gen0 = xdp::ifindex("gen0")?;
    let sizes = TableSizes {
        conntrack: TABLE,
        half_open: HALF_OPEN,
    };
    let cfg = lb_config_for(mode, BACKENDS, "tcp", sizes, "")?;
    let mut dp = Dataplane::load(&cfg.dataplane)?;
    dp.apply(&cfg)?;
    dp.attach("lbin", cfg.dataplane.xdp_mode)?;
    // The legitimate clients run their own generator (its own conf map)
    // beside the flood's.
    let mut clients_gen = pktgen::load_object()?;

    let established: Vec<FlowKey> = clients(CLIENT, ESTABLISHED)?
        .into_iter()
        .map(flow_key)
        .collect();
    let legit_src = Ipv4Addr::new(198, 18, 2, 1);
    let legit: Vec<FlowKey> = clients(legit_src, LEGIT)?
        .into_iter()
        .map(flow_key)
        .collect();
    connect(&mut clients_gen, gen0, CLIENT, ESTABLISHED)?;
    let before = in_table(&dp, &established)?;

    let flood = Spec {
        rate: None,
        limit: Limit::Duration(Duration::from_secs_f64(seconds)),
        ..spec(
            gen0,
            Ipv4Addr::new(198, 18, 128, 1),
            Proto::TcpSyn,
            SPOOFED,
            threads,
        )
    };
    let sink_before = sink_packets(ebpf)?;
    let (summary, legit_frames, served) = std::thread::scope(|s| {
        let flooding = s.spawn(|| pktgen::generate(ebpf, &flood));
        // The clients come once the flood is in full swing.
        std::thread::sleep(Duration::from_secs_f64(seconds * 0.3));
        let clients = connect(&mut clients_gen, gen0, legit_src, LEGIT)
            .and_then(|sent| Ok((sent, in_table(&dp, &legit)?)));
        let summary = flooding
            .join()
            .map_err(|_| anyhow::anyhow!("the flood's thread panicked"))?;
        let (sent, served) = clients?;
        anyhow::Ok((summary?, sent, served))
    })?;
    std::thread::sleep(Duration::from_millis(50));
    let delivered = (sink_packets(ebpf)? - sink_before).saturating_sub(legit_frames);
    let survived = in_table(&dp, &established)?;
    let secs = summary.elapsed.as_secs_f64();
    Ok([
        summary.frames as f64,
        summary.mpps(),
        delivered as f64 / secs / 1e6,
        before as f64,
        if before == 0 {
            f64::NAN
        } else {
            survived as f64 / before as f64
        },
        served as f64 / f64::from(LEGIT),
    ])
}

/// The scenario in both modes, `reps` runs each. Runs inside the
/// benchmark's namespace, with `ebpf` holding the generator and the sink,
/// which `forwarding_rows` attached (its link lasts as long as `ebpf`).
pub(super) fn flood_rows(
    ebpf: &mut Ebpf,
    (reps, seconds, threads): (usize, f64, usize),
) -> anyhow::Result<Vec<FloodRow>> {
    let mut rows = Vec::new();
    for mode in [Forwarding::Nat, Forwarding::Dsr] {
        eprintln!(
            "bench: SYN flood, {} ({ESTABLISHED} established, tables {TABLE} + {HALF_OPEN} half-open)",
            Hop::Lb(mode)
        );
        let mut runs: Vec<[f64; 6]> = Vec::new();
        for _ in 0..reps {
            runs.push(flood_once(ebpf, mode, seconds, threads)?);
        }
        let stat = |i: usize| Stat::of(&runs.iter().map(|r| r[i]).collect::<Vec<_>>());
        rows.push(FloodRow {
            hop: Hop::Lb(mode),
            spoofed: stat(0),
            offered: stat(1),
            delivered: stat(2),
            established: stat(3),
            survived: stat(4),
            served: stat(5),
        });
    }
    Ok(rows)
}
