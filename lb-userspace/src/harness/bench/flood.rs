//! The SYN flood scenario (issue 11): established connections, then
//! spoofed SYNs at the generator's full rate into connection tables far
//! smaller than the flood, while legitimate clients open new connections.
//! Reported, per forwarding mode: the established flows still in the
//! connection table afterwards (the target is all of them), the legitimate
//! connections that had their entry right after their handshake, and the
//! rate the load balancer held under the flood.
//!
//! All of it is generated on the benchmark's topology (`net`): a connection
//! is what the data plane must see of it to count it established
//! (`lb_common::flow::confirms`): its client's SYN; with NAT, its backend's
//! SYN-ACK ([`Proto::TcpSynAck`], sent into the load balancer as a reply
//! arrives, from the backend the flow was scheduled to); the client's ACK;
//! then the client's next segment ([`Proto::TcpNext`], past the ACK's data:
//! what confirms a DSR flow, whose load balancer never sees the SYN-ACK).
//! A SYN then an ACK alone, which this scenario sent before the handshake
//! rules of issue 20, is a blind spoofer's pair: it stays half-open. Whether
//! a flow has its entry is read from the established table (`ESTABLISHED`,
//! overflow `CONNTRACK`) by key, from userspace.

use std::{
    collections::{HashMap, HashSet},
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use anyhow::Context;
use aya::{
    Ebpf,
    maps::{Array, Map, MapData},
};
use lb_common::{Backend, Flow, FlowKey, map_names::MapName};

use super::{
    measure::{Hop, Stat, sink_packets},
    net::{CLIENT, GEN_MAC, LBIN_MAC, PORT, VIP, lb_config_for},
};
use crate::{
    config::Forwarding,
    dataplane::{Dataplane, TableSizes},
    harness::{
        pktgen::{
            self, FlowDist, FrameSpec, Limit, Proto, Spec, build_frame, flow_conf, flow_endpoint,
        },
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
/// The rate of the clients' (and their backends') packets: well under a
/// veth ring's burst, so none is lost on the way in. Each step of the
/// handshake therefore takes `count / CLIENT_RATE` (5 ms for `LEGIT`), and
/// the next step follows it by `HANDSHAKE_GAP`: a half-open entry must
/// outlive [`handshake_ms`] under the flood.
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
    /// How long the legitimate clients' handshakes took under the flood,
    /// from their first SYN to their last confirming segment, in ms (the
    /// pacing's figure, [`handshake_ms`], plus what the flood's load adds).
    pub(super) handshake_ms: Stat,
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
/// overflow, the ones no new flow evicts) holds: one pass over the tables,
/// so the count is quick even for all of `ESTABLISHED`'s keys.
fn in_table(dp: &Dataplane, keys: &[FlowKey]) -> anyhow::Result<usize> {
    let established: HashSet<FlowKey> = dp
        .flow_table()?
        .established_entries()?
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    Ok(keys.iter().filter(|k| established.contains(k)).count())
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

/// The handshake's steps as the load balancer sees them: the client's SYN,
/// the backend's SYN-ACK (NAT only: a DSR load balancer never sees it), the
/// client's ACK, the client's next segment.
fn steps(mode: Forwarding) -> &'static [Proto] {
    match mode {
        Forwarding::Nat => &[
            Proto::TcpSyn,
            Proto::TcpSynAck,
            Proto::TcpAck,
            Proto::TcpNext,
        ],
        _ => &[Proto::TcpSyn, Proto::TcpAck, Proto::TcpNext],
    }
}

/// How long a connection of `count` made together stays half-open in
/// `mode`: from its SYN to its confirming segment, in ms.
pub(super) fn handshake_ms(mode: Forwarding, count: u32) -> u128 {
    let step = u128::from(count) * 1000 / u128::from(CLIENT_RATE) + HANDSHAKE_GAP.as_millis();
    (steps(mode).len() as u128 - 1) * step
}

/// `count` connections from `src:1024..` (their keys `keys`), step by step
/// ([`steps`]): every SYN, then every SYN-ACK, and so on. Returns the
/// clients' frames sent (the SYN-ACKs go to the clients, not the sink).
fn connect(
    ebpf: &mut Ebpf,
    dp: &Dataplane,
    (gen0, mode): (u32, Forwarding),
    src: Ipv4Addr,
    keys: &[FlowKey],
) -> anyhow::Result<u64> {
    let count = keys.len() as u32;
    let mut sent = 0;
    for &proto in steps(mode) {
        if proto == Proto::TcpSynAck {
            answer_syns(dp, gen0, keys)?;
        } else {
            sent += pktgen::generate(ebpf, &spec(gen0, src, proto, count, 1))?.frames;
        }
        std::thread::sleep(HANDSHAKE_GAP);
    }
    Ok(sent)
}

/// The backends' SYN-ACKs to the half-open flows of `keys`, each from the
/// backend its flow was scheduled to (read from the table, as a backend
/// knows whom it answers), into the load balancer from the generator's
/// side as replies arrive. A flow the flood has already replaced gets none:
/// its backend's SYN-ACK would find no flow and be dropped
/// (`DropBackendNoFlow`), so it could not complete either way.
fn answer_syns(dp: &Dataplane, gen0: u32, keys: &[FlowKey]) -> anyhow::Result<()> {
    let half_open: HashMap<FlowKey, Flow> =
        dp.flow_table()?.half_open_live()?.into_iter().collect();
    let backends: Array<MapData, Backend> =
        Array::try_from(Map::Array(dp.map_data(MapName::BACKENDS)?)).context("map BACKENDS")?;
    let mut frames = Vec::with_capacity(keys.len());
    for key in keys {
        let Some(flow) = half_open.get(key) else {
            continue;
        };
        let b = backends.get(&flow.backend_id, 0).context("map BACKENDS")?;
        frames.push(build_frame(&FrameSpec {
            dst_mac: LBIN_MAC,
            src_mac: GEN_MAC,
            src: endpoint(b.addr, b.port).into(),
            dst: endpoint(key.saddr, key.sport).into(),
            proto: Proto::TcpSynAck,
            size: 64,
        })?);
    }
    send_frames(gen0, &frames, CLIENT_RATE)
}

/// An address and port as the maps hold them (network order).
fn endpoint(addr: u32, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from(addr.to_ne_bytes()), u16::from_be(port))
}

/// Sends `frames` out of interface `ifindex` through a packet socket, at
/// `rate` frames per second in bursts of 32 (well under a veth ring).
fn send_frames(ifindex: u32, frames: &[Vec<u8>], rate: u64) -> anyhow::Result<()> {
    let socket = crate::pktgen::packet_socket(ifindex)?;
    let start = Instant::now();
    for (n, frame) in frames.iter().enumerate() {
        crate::pktgen::send_frame(&socket, frame)?;
        if n % 32 == 31 {
            let due = start + Duration::from_secs_f64((n + 1) as f64 / rate as f64);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
    }
    Ok(())
}

/// One run of the scenario on a fresh data plane: (spoofed SYNs sent,
/// offered Mpps, delivered Mpps, established before, survived share,
/// served share, the legitimate handshakes' ms).
fn flood_once(
    ebpf: &mut Ebpf,
    mode: Forwarding,
    seconds: f64,
    threads: usize,
) -> anyhow::Result<[f64; 7]> {
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
    connect(&mut clients_gen, &dp, (gen0, mode), CLIENT, &established)?;
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
    let (summary, legit_frames, (served, took)) = std::thread::scope(|s| {
        let flooding = s.spawn(|| pktgen::generate(ebpf, &flood));
        // The clients come once the flood is in full swing.
        std::thread::sleep(Duration::from_secs_f64(seconds * 0.3));
        let start = Instant::now();
        let clients = connect(&mut clients_gen, &dp, (gen0, mode), legit_src, &legit)
            .and_then(|sent| Ok((sent, start.elapsed(), in_table(&dp, &legit)?)));
        let summary = flooding
            .join()
            .map_err(|_| anyhow::anyhow!("the flood's thread panicked"))??;
        let (sent, took, served) = clients?;
        if took + Duration::from_secs_f64(seconds * 0.3) > summary.elapsed {
            eprintln!(
                "bench: SYN flood, {}: the legitimate handshakes ({took:.2?}) outlasted the flood ({:.2?}): \
                 their last steps met no flood (a longer --seconds avoids it)",
                Hop::Lb(mode),
                summary.elapsed
            );
        }
        anyhow::Ok((summary, sent, (served, took)))
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
        took.as_secs_f64() * 1000.0,
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
        let mut runs: Vec<[f64; 7]> = Vec::new();
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
            handshake_ms: stat(6),
        });
    }
    Ok(rows)
}
