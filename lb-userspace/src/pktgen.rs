//! `lb pktgen`: an XDP packet generator, part of the product (the load
//! tester an operator runs), with its own object (`lb-pktgen`, built from
//! lb-ebpf-tools; the data plane's object has no tool). Its `pktgen` program is run
//! with BPF_PROG_RUN in live-frames mode: the kernel injects one template
//! frame `repeat` times, the program gives each copy its flow (source
//! address/port from a per-CPU sequence, each CPU's starting at its own
//! share of the flows) and redirects it out of `--dev`.
//!
//! The frame builder and the flow → (address, port) mapping are pure
//! functions, unit-tested on the host; the mapping is
//! `lb_common::PktgenConf::flow_source`, the one `set_flow` in
//! lb-ebpf-tools/src/pktgen.rs calls.
//!
//! Frame reuse: live-frames mode initialises a page with the template only
//! when the page is fresh; a page the receiving side modified in place (the
//! load balancer rewrites addresses and MACs on the same page, veth passes
//! it along without copying) comes back to the generator's page pool with
//! those changes. `pktgen` only rewrites the source, so when the path
//! modifies frames (`--fresh-frames`, and the bench/test through `lb`), each
//! BPF_PROG_RUN call sends a single batch: every call gets a new page pool
//! whose pages are all freshly initialised. That costs a pool set-up per
//! batch, so it is slower than the default.
//!
//! Where the kernel refuses live frames (`EPERM` from BPF_PROG_RUN, e.g. a
//! lockdown LSM in a sandbox), the same frames go out of an AF_PACKET
//! socket instead (`packet`, [`Sender`]); the summary says which sender ran.
//!
//! Backends: `xdp` (the default) is the one above. `kernel` would drive the
//! in-kernel pktgen through /proc/net/pktgen; it is only offered when that
//! interface exists, and this build does not drive it yet: it fails with a
//! clear error instead of pretending to send.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::Path,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};
use aya::{
    Ebpf,
    maps::{Array, PerCpuArray},
    programs::{TestRun, TestRunAttrs, TestRunOptions, Xdp},
};
use lb_common::{PKTGEN_ETH_P_IPV6, PKTGEN_FLOW_TABLE, PKTGEN_V6_L4, checksum};
use rustix::thread::{CpuSet, sched_setaffinity};

use crate::xdp::{if_mac, ifindex, load_tool, parse_mac, xdp_md, xdp_program};

/// The `lb-pktgen` object (lb-ebpf-tools): the generator alone. Empty in a
/// build without the BPF toolchain ([`load_object`] then says so).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-pktgen.o"));

/// Loads the generator's object (its program not yet in the kernel), with
/// `PKTGEN_FLOWS` sized for a drawn flow mix.
pub fn load_object() -> anyhow::Result<Ebpf> {
    load_tool(OBJECT)
}

/// The generator program's name in the object.
pub const PROGRAM: &str = "pktgen";
/// Frames per live-frames batch.
pub const BATCH: u32 = 64;
/// Frames per BPF_PROG_RUN call at full speed.
pub const REPEAT: u32 = 1 << 16;
/// Most source ports used per source address.
pub const MAX_PORT_SPAN: u32 = 64512;
/// Smallest and largest frame (without FCS) the generator builds.
pub const MIN_SIZE: usize = 64;
pub const MAX_SIZE: usize = 1514;

const ETH_LEN: usize = 14;
const IP_LEN: usize = 20;
const IP6_LEN: usize = 40;
const UDP_LEN: usize = 8;
const TCP_LEN: usize = 20;

/// `PKTGEN_CONF[0]`, shared with the kernel side.
pub use lb_common::PktgenConf;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Proto {
    Udp,
    /// A client's SYN: what opens a connection (and what a flood spoofs)
    TcpSyn,
    /// A client's bare ACK, as after the handshake: what completes a
    /// generated connection's handshake (NAT: once its backend answered)
    TcpAck,
    /// A server's SYN-ACK to that SYN, at sequence number 0 (the ACK
    /// acknowledges 1): what a NAT backend answers
    TcpSynAck,
    /// The client's next segment after its ACK, its sequence number past
    /// the ACK's payload: what confirms a DSR connection
    TcpNext,
}

/// `--flow-dist`: how frames are spread over the flows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum FlowDistArg {
    /// Every flow in turn, each carrying the same share
    Uniform,
    /// A few flows carry most packets: flow k's share is ∝ 1/(k+1)^s (--zipf-s)
    Zipf,
}

/// How frames are spread over the flows.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum FlowDist {
    /// Frame `n` is flow `n % flows`.
    Uniform,
    /// Frame `n`'s flow is drawn from a Zipf law of exponent `s` over the
    /// flows ranked by index (flow 0 the heaviest), through a table of
    /// [`PKTGEN_FLOW_TABLE`] draws (see [`zipf_table`]).
    Zipf { s: f64 },
}

impl std::fmt::Display for FlowDist {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FlowDist::Uniform => f.write_str("uniform"),
            FlowDist::Zipf { s } => write!(f, "Zipf s={s}"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// BPF_PROG_RUN live frames with the object's `pktgen` program
    Xdp,
    /// The in-kernel pktgen (/proc/net/pktgen), when the host has it
    Kernel,
}

#[derive(Debug, Clone, clap::Args)]
pub struct PktgenArgs {
    /// Interface to transmit on (in the current network namespace)
    #[arg(long)]
    pub dev: String,
    /// Destination MAC (aa:bb:cc:dd:ee:ff)
    #[arg(long, value_parser = parse_mac)]
    pub dst_mac: [u8; 6],
    /// Source MAC (default: the interface's)
    #[arg(long, value_parser = parse_mac)]
    pub src_mac: Option<[u8; 6]>,
    /// Destination address and port (`198.18.0.10:80` or
    /// `[2001:db8::10]:80`): its family is the frames' (IPv4 or IPv6)
    #[arg(long)]
    pub dst: SocketAddr,
    /// First source address, of the destination's family (IPv6: flows
    /// vary its low 32 bits)
    #[arg(long)]
    pub src: IpAddr,
    /// First source port
    #[arg(long, default_value_t = 1024)]
    pub sport: u16,
    /// Distinct flows: up to 64512 ports per address, then the next addresses
    #[arg(long, default_value_t = 1)]
    pub flows: u32,
    /// How frames are spread over the flows
    #[arg(long, value_enum, default_value_t = FlowDistArg::Uniform)]
    pub flow_dist: FlowDistArg,
    /// Exponent of the Zipf law (--flow-dist zipf): 1.0 is the classic
    /// "a few flows carry most packets"; 0 is uniform at random
    #[arg(long, default_value_t = 1.0)]
    pub zipf_s: f64,
    #[arg(long, value_enum, default_value_t = Proto::Udp)]
    pub proto: Proto,
    /// Frame size in bytes without FCS (64..=1514; IPv6 TCP at least 74)
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Frames to send (all threads together)
    #[arg(long, conflicts_with = "duration")]
    pub count: Option<u64>,
    /// Seconds to send for (default 5 when --count is not given)
    #[arg(long)]
    pub duration: Option<f64>,
    /// Target rate in packets per second (all threads together)
    #[arg(long)]
    pub rate: Option<u64>,
    /// Sending threads, one pinned per CPU (default: number of CPUs)
    #[arg(long)]
    pub threads: Option<usize>,
    /// One batch per BPF_PROG_RUN call, so every frame starts from the
    /// template (needed when a hop rewrites frames in place, e.g. `lb`)
    #[arg(long)]
    pub fresh_frames: bool,
    #[arg(long, value_enum, default_value_t = Backend::Xdp)]
    pub backend: Backend,
}

/// The template frame's contents.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameSpec {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    /// Source and destination, both of one family: the frame's.
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub proto: Proto,
    pub size: usize,
}

/// When a run stops.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Limit {
    Count(u64),
    Duration(Duration),
}

/// Everything a run needs, already resolved (interface index, MACs).
#[derive(Clone, Debug)]
pub struct Spec {
    pub ifindex: u32,
    pub frame: FrameSpec,
    pub flows: u32,
    pub dist: FlowDist,
    pub limit: Limit,
    pub rate: Option<u64>,
    pub threads: usize,
    /// Send one batch per call so no frame reuses a modified page.
    pub fresh_frames: bool,
}

/// How a run's frames left.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sender {
    /// BPF_PROG_RUN live frames: the kernel injects them from XDP.
    XdpLiveFrames,
    /// An AF_PACKET socket on the interface, one `send` per frame, used
    /// when the kernel refuses live frames (see [`generate`]).
    PacketSocket,
}

impl std::fmt::Display for Sender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Sender::XdpLiveFrames => "XDP live frames",
            Sender::PacketSocket => "an AF_PACKET socket (live frames refused by this kernel)",
        })
    }
}

/// What a run achieved.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Summary {
    pub frames: u64,
    pub elapsed: Duration,
    pub sender: Sender,
}

impl Summary {
    pub fn mpps(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs == 0.0 {
            0.0
        } else {
            self.frames as f64 / secs / 1e6
        }
    }
}

/// Builds the Ethernet + IP + UDP/TCP frame of `spec.size` bytes, IPv4 or
/// IPv6 as the addresses are; the payload is zeros. The IP and TCP
/// checksums are valid; the UDP checksum is 0 over IPv4 (none) and valid
/// over IPv6 (where it is mandatory).
pub fn build_frame(spec: &FrameSpec) -> anyhow::Result<Vec<u8>> {
    ensure!(
        (MIN_SIZE..=MAX_SIZE).contains(&spec.size),
        "frame size {} out of range {MIN_SIZE}..={MAX_SIZE}",
        spec.size
    );
    let (l4_len, protocol) = match spec.proto {
        Proto::Udp => (UDP_LEN, 17u8),
        Proto::TcpSyn | Proto::TcpAck | Proto::TcpSynAck | Proto::TcpNext => (TCP_LEN, 6u8),
    };
    let mut f = vec![0u8; spec.size];
    f[0..6].copy_from_slice(&spec.dst_mac);
    f[6..12].copy_from_slice(&spec.src_mac);
    // The pseudo-header of the L4 checksum, without the length and protocol.
    let (ip_len, ethertype, addrs): (usize, u16, Vec<u8>) = match (spec.src, spec.dst) {
        (SocketAddr::V4(src), SocketAddr::V4(dst)) => {
            let ip_total = (spec.size - ETH_LEN) as u16;
            let ip = &mut f[ETH_LEN..ETH_LEN + IP_LEN];
            ip[0] = 0x45;
            ip[2..4].copy_from_slice(&ip_total.to_be_bytes());
            ip[6..8].copy_from_slice(&0x4000u16.to_be_bytes()); // DF
            ip[8] = 64;
            ip[9] = protocol;
            ip[12..16].copy_from_slice(&src.ip().octets());
            ip[16..20].copy_from_slice(&dst.ip().octets());
            let check = checksum::compute(ip, 0);
            ip[10..12].copy_from_slice(&check.to_ne_bytes());
            (
                IP_LEN,
                0x0800,
                [src.ip().octets(), dst.ip().octets()].concat(),
            )
        }
        (SocketAddr::V6(src), SocketAddr::V6(dst)) => {
            ensure!(
                spec.size >= ETH_LEN + IP6_LEN + l4_len,
                "frame size {} too small for IPv6 {:?} (at least {})",
                spec.size,
                spec.proto,
                ETH_LEN + IP6_LEN + l4_len
            );
            let payload = (spec.size - ETH_LEN - IP6_LEN) as u16;
            let ip = &mut f[ETH_LEN..ETH_LEN + IP6_LEN];
            ip[0] = 0x60;
            ip[4..6].copy_from_slice(&payload.to_be_bytes());
            ip[6] = protocol;
            ip[7] = 64; // hop limit
            ip[8..24].copy_from_slice(&src.ip().octets());
            ip[24..40].copy_from_slice(&dst.ip().octets());
            (
                IP6_LEN,
                PKTGEN_ETH_P_IPV6,
                [src.ip().octets(), dst.ip().octets()].concat(),
            )
        }
        (src, dst) => bail!("source {src} and destination {dst} are of different families"),
    };
    f[12..14].copy_from_slice(&ethertype.to_be_bytes());

    let l4_total = spec.size - ETH_LEN - ip_len;
    let l4 = &mut f[ETH_LEN + ip_len..];
    l4[0..2].copy_from_slice(&spec.src.port().to_be_bytes());
    l4[2..4].copy_from_slice(&spec.dst.port().to_be_bytes());
    let check_off = match spec.proto {
        Proto::Udp => {
            l4[4..6].copy_from_slice(&(l4_total as u16).to_be_bytes());
            6
        }
        Proto::TcpSyn | Proto::TcpAck | Proto::TcpSynAck | Proto::TcpNext => {
            // A handshake from client sequence 1 and server sequence 0; the
            // client's segments after it carry the frame's padding as data.
            let data = (l4_total - TCP_LEN) as u32;
            let (seq, ack, flags): (u32, u32, u8) = match spec.proto {
                Proto::TcpSyn => (1, 0, 0x02),    // SYN
                Proto::TcpSynAck => (0, 2, 0x12), // SYN, ACK
                Proto::TcpAck => (2, 1, 0x10),    // ACK
                _ => (2 + data, 1, 0x18),         // PSH, ACK
            };
            l4[4..8].copy_from_slice(&seq.to_be_bytes());
            l4[8..12].copy_from_slice(&ack.to_be_bytes());
            l4[13] = flags;
            l4[12] = ((l4_len / 4) as u8) << 4;
            l4[14..16].copy_from_slice(&0xffffu16.to_be_bytes());
            16
        }
    };
    if spec.proto != Proto::Udp || ip_len == IP6_LEN {
        // Pseudo-header: addresses, then the L4 length and protocol (RFC 793,
        // RFC 8200 8.1; the sum is the same for both layouts' word order).
        let mut pseudo = addrs;
        pseudo.extend_from_slice(&[0, protocol]);
        pseudo.extend_from_slice(&(l4_total as u32).to_be_bytes());
        let covered = [&pseudo[..], l4].concat();
        let mut check = checksum::compute(&covered, 0);
        if protocol == 17 && check == 0 {
            check = 0xffff; // a computed 0 is sent as all ones (RFC 768)
        }
        l4[check_off..check_off + 2].copy_from_slice(&check.to_ne_bytes());
    }
    Ok(f)
}

/// The generator's flow configuration: `flows` distinct (address, port)
/// pairs starting at `src:sport`, ports first. An IPv6 `src` varies in its
/// low 32 bits ([`source_low`]).
pub fn flow_conf(
    ifindex: u32,
    src: impl Into<IpAddr>,
    sport: u16,
    flows: u32,
) -> anyhow::Result<PktgenConf> {
    let src = src.into();
    ensure!(flows >= 1, "--flows must be at least 1");
    ensure!(sport >= 1, "--sport must be at least 1");
    let span = flows.min(MAX_PORT_SPAN).min(65536 - u32::from(sport));
    let addrs = flows.div_ceil(span);
    ensure!(
        source_low(src).checked_add(addrs - 1).is_some(),
        "{flows} flows from {src} run past the end of its {} bits",
        match src {
            IpAddr::V4(_) => "32",
            IpAddr::V6(_) => "low 32",
        }
    );
    Ok(PktgenConf {
        ifindex,
        flows,
        saddr_base: source_low(src),
        sport_base: sport,
        sport_span: span as u16,
        flow_table_mask: 0,
        l4_check: 0,
        _pad: 0,
        template: [0; lb_common::PKTGEN_TEMPLATE_LEN],
    })
}

/// The part of a source address the generator varies per flow: all of an
/// IPv4 address, the low 32 bits of an IPv6 one (the rest is the
/// template's).
pub fn source_low(addr: IpAddr) -> u32 {
    match addr {
        IpAddr::V4(a) => a.into(),
        IpAddr::V6(a) => u128::from(a) as u32,
    }
}

/// Source of frame `n` of a run from `base` (either family): what
/// `set_flow`/`set_flow_v6` write.
pub fn flow_source_addr(conf: &PktgenConf, base: SocketAddr, n: u32) -> SocketAddr {
    let (low, port) = conf.flow_source(n);
    let ip = match base.ip() {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::from(low)),
        IpAddr::V6(a) => IpAddr::V6((u128::from(a) & !0xffff_ffff | u128::from(low)).into()),
    };
    SocketAddr::new(ip, port)
}

/// The `l4_check` an IPv6 `frame` (as [`build_frame`] made it) hands the
/// generator: its L4 checksum, raw. 0 for IPv4 frames, which do not use it.
fn template_l4_check(frame: &[u8]) -> u16 {
    if frame[12..14] != PKTGEN_ETH_P_IPV6.to_be_bytes() {
        return 0;
    }
    let off = PKTGEN_V6_L4 + if frame[20] == 6 { 16 } else { 6 };
    u16::from_ne_bytes([frame[off], frame[off + 1]])
}

/// The seed of the Zipf draws: every run draws the same sequence, so runs
/// (and the bench's repetitions) compare like with like.
pub const ZIPF_SEED: u64 = 0x5eed_f10e;

/// `len` flow indices drawn from a Zipf law of exponent `s` over `flows`
/// flows: flow `k` (0-based) is drawn with probability ∝ 1/(k+1)^s, by
/// inverting the cumulative distribution for each uniform draw of a
/// SplitMix64 sequence seeded with `seed`. The draws are in random order,
/// as a real mix interleaves its flows.
pub fn zipf_table(flows: u32, s: f64, len: usize, seed: u64) -> Vec<u32> {
    let flows = flows.max(1);
    let mut cdf = Vec::with_capacity(flows as usize);
    let mut total = 0.0;
    for k in 0..flows {
        total += (f64::from(k) + 1.0).powf(-s);
        cdf.push(total);
    }
    let mut rng = SplitMix64(seed);
    (0..len)
        .map(|_| {
            let u = rng.unit() * total;
            (cdf.partition_point(|&c| c <= u) as u32).min(flows - 1)
        })
        .collect()
}

/// A run's Zipf flow mix (`--flow-dist zipf`, exponent `s`): the drawn
/// sequence every sender and the summary use, [`PKTGEN_FLOW_TABLE`] draws
/// under [`ZIPF_SEED`].
pub fn drawn_flows(flows: u32, s: f64) -> Vec<u32> {
    zipf_table(flows, s, PKTGEN_FLOW_TABLE as usize, ZIPF_SEED)
}

/// SplitMix64 (Steele, Lea, Flood 2014): a seeded 64-bit sequence, enough
/// for drawing a benchmark's flow mix (no dependency for eight lines).
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// What a drawn flow table holds: distinct flows, and the share of draws
/// that go to the heaviest 1 % of the flows (at least one flow).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MixSummary {
    pub distinct: usize,
    pub top_percent_share: f64,
}

pub fn mix_summary(table: &[u32], flows: u32) -> MixSummary {
    let mut counts = std::collections::HashMap::new();
    for f in table {
        *counts.entry(*f).or_insert(0u64) += 1;
    }
    let mut sorted: Vec<u64> = counts.values().copied().collect();
    sorted.sort_unstable_by(|a, b| b.cmp(a));
    let top = (flows as usize / 100).max(1);
    let top_sum: u64 = sorted.iter().take(top).sum();
    MixSummary {
        distinct: counts.len(),
        top_percent_share: if table.is_empty() {
            0.0
        } else {
            top_sum as f64 / table.len() as f64
        },
    }
}

/// Writes `table` into the object's `PKTGEN_FLOWS` (sized by
/// [`crate::xdp::load_tool`]).
fn write_flow_table(ebpf: &mut Ebpf, table: &[u32]) -> anyhow::Result<()> {
    let map = ebpf
        .map_mut("PKTGEN_FLOWS")
        .context("map PKTGEN_FLOWS missing from the eBPF object")?;
    let mut map: Array<_, u32> = Array::try_from(map).context("map PKTGEN_FLOWS")?;
    ensure!(
        map.len() as usize >= table.len(),
        "PKTGEN_FLOWS holds {} entries, the flow mix needs {}: load the object with xdp::load_tool",
        map.len(),
        table.len()
    );
    for (i, flow) in table.iter().enumerate() {
        map.set(i as u32, *flow, 0)
            .with_context(|| format!("writing PKTGEN_FLOWS[{i}]"))?;
    }
    Ok(())
}

/// Source address and port of frame `n` (what `set_flow` writes).
pub fn flow_endpoint(conf: &PktgenConf, n: u32) -> (Ipv4Addr, u16) {
    let (addr, port) = conf.flow_source(n);
    (Ipv4Addr::from(addr), port)
}

/// Where each CPU's frame sequence starts: evenly spread over the flows,
/// so that CPUs sending at once send different flows (`--count N --flows N`
/// is N distinct flows), not the same ones in step.
pub fn seq_starts(flows: u32, cpus: usize) -> Vec<u32> {
    let cpus = cpus.max(1) as u64;
    (0..cpus)
        .map(|c| (u64::from(flows) * c / cpus) as u32)
        .collect()
}

/// Pins the calling thread to one CPU (the generator's threads; tests that
/// need one CPU's per-CPU state).
pub fn pin_to_cpu(cpu: usize) -> anyhow::Result<()> {
    let mut set = CpuSet::new();
    set.set(cpu);
    sched_setaffinity(None, &set)
        .map_err(std::io::Error::from)
        .with_context(|| format!("sched_setaffinity cpu {cpu}"))
}

fn cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Sends `spec`'s frames with `ebpf`'s `pktgen` program (from the calling
/// thread's network namespace; the sending threads inherit it).
///
/// A kernel may refuse BPF_PROG_RUN's live frames to a process that may
/// load XDP programs all the same (`EPERM`: a lockdown LSM in some
/// sandboxes and VMs does). Then, before any frame was sent, the same
/// frames — one per flow as the program would have rewritten them, the
/// same sequence, threads and rate — go out of an AF_PACKET socket on the
/// interface instead ([`Sender::PacketSocket`], far slower per frame: a
/// flood or a test still gets its traffic, a benchmark reports the sender).
pub fn generate(ebpf: &mut Ebpf, spec: &Spec) -> anyhow::Result<Summary> {
    match generate_live(ebpf, spec) {
        Err(e) if refused(&e) => {
            tracing::info!(
                "BPF_PROG_RUN live frames refused ({e:#}); sending from an AF_PACKET socket"
            );
            LIVE_FRAMES_REFUSED.store(true, Ordering::Relaxed);
            packet::generate(spec)
        }
        other => other,
    }
}

/// Set once a run of this process fell back to the packet socket (what a
/// report made of several runs, `lb bench`'s, states as its generator).
static LIVE_FRAMES_REFUSED: AtomicBool = AtomicBool::new(false);

/// The sender this process's runs used: the packet socket once the kernel
/// refused live frames to any of them.
pub fn sender_used() -> Sender {
    if LIVE_FRAMES_REFUSED.load(Ordering::Relaxed) {
        Sender::PacketSocket
    } else {
        Sender::XdpLiveFrames
    }
}

/// Whether `e` is the kernel's refusal of live frames (`EPERM` from the
/// first BPF_PROG_RUN, before any frame was sent).
fn refused(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.raw_os_error() == Some(libc::EPERM))
    }) && e.to_string().contains(LIVE_FRAMES_CALL)
}

/// The context of a live-frames call's error (what [`refused`] looks for).
const LIVE_FRAMES_CALL: &str = "BPF_PROG_RUN (live frames) of pktgen";

/// [`generate`] with live frames only.
fn generate_live(ebpf: &mut Ebpf, spec: &Spec) -> anyhow::Result<Summary> {
    let frame = build_frame(&spec.frame)?;
    let mut conf = flow_conf(
        spec.ifindex,
        spec.frame.src.ip(),
        spec.frame.src.port(),
        spec.flows,
    )?;
    conf.l4_check = template_l4_check(&frame);
    // Every frame starts from these headers again (frames are >= MIN_SIZE).
    conf.template
        .copy_from_slice(&frame[..lb_common::PKTGEN_TEMPLATE_LEN]);
    if let FlowDist::Zipf { s } = spec.dist {
        let table = drawn_flows(spec.flows, s);
        write_flow_table(ebpf, &table)?;
        conf.flow_table_mask = PKTGEN_FLOW_TABLE - 1;
    }
    {
        let map = ebpf
            .map_mut("PKTGEN_CONF")
            .context("map PKTGEN_CONF missing from the eBPF object")?;
        let mut map: Array<_, PktgenConf> = Array::try_from(map).context("map PKTGEN_CONF")?;
        map.set(0, conf, 0).context("writing PKTGEN_CONF")?;
    }
    {
        let map = ebpf
            .map_mut("PKTGEN_SEQ")
            .context("map PKTGEN_SEQ missing from the eBPF object")?;
        let mut map: PerCpuArray<_, u32> = PerCpuArray::try_from(map).context("map PKTGEN_SEQ")?;
        let starts = seq_starts(spec.flows, aya::util::nr_cpus().map_err(|(_, e)| e)?);
        let starts = aya::maps::PerCpuValues::try_from(starts)?;
        map.set(0, starts, 0).context("resetting PKTGEN_SEQ")?;
    }
    let prog: &Xdp = xdp_program(ebpf, PROGRAM)?;
    let md = xdp_md(frame.len(), spec.ifindex);
    let max_repeat = if spec.fresh_frames { BATCH } else { REPEAT };
    let (frames, elapsed) = in_threads(spec, |_, quota, rate, start, stop| {
        send_loop(
            prog, &frame, &md, quota, spec.limit, rate, max_repeat, start, stop,
        )
    })?;
    Ok(Summary {
        frames,
        elapsed,
        sender: Sender::XdpLiveFrames,
    })
}

/// Runs `send` on `spec.threads` threads, each pinned to a CPU in turn with
/// its share of the count and of the rate (thread index, quota, rate, the
/// run's start, the stop flag one failing thread raises); returns the
/// frames they sent together and the time it took.
fn in_threads(
    spec: &Spec,
    send: impl Fn(usize, Option<u64>, Option<f64>, Instant, &AtomicBool) -> anyhow::Result<u64> + Sync,
) -> anyhow::Result<(u64, Duration)> {
    let threads = spec.threads.max(1);
    let ncpu = cpus();
    let stop = AtomicBool::new(false);
    let start = Instant::now();
    let results: Vec<anyhow::Result<u64>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let quota = match spec.limit {
                    Limit::Count(n) => {
                        Some(n / threads as u64 + u64::from((t as u64) < n % threads as u64))
                    }
                    Limit::Duration(_) => None,
                };
                let rate = spec.rate.map(|r| (r as f64 / threads as f64).max(1.0));
                let (send, stop) = (&send, &stop);
                s.spawn(move || -> anyhow::Result<u64> {
                    pin_to_cpu(t % ncpu)?;
                    let res = send(t, quota, rate, start, stop);
                    if res.is_err() {
                        stop.store(true, Ordering::Relaxed);
                    }
                    res
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("sending thread panicked")))
            })
            .collect()
    });
    let elapsed = start.elapsed();
    let mut frames = 0;
    for r in results {
        frames += r?;
    }
    Ok((frames, elapsed))
}

#[allow(clippy::too_many_arguments)]
fn send_loop(
    prog: &Xdp,
    frame: &[u8],
    md: &[u8],
    quota: Option<u64>,
    limit: Limit,
    rate: Option<f64>,
    max_repeat: u32,
    start: Instant,
    stop: &AtomicBool,
) -> anyhow::Result<u64> {
    // With pacing, ~100 calls per second so sleeps stay short.
    let chunk = match rate {
        Some(r) => ((r / 100.0) as u32).clamp(1, max_repeat),
        None => max_repeat,
    };
    let mut sent = 0u64;
    loop {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let repeat = match (quota, limit) {
            (Some(q), _) => {
                if sent >= q {
                    break;
                }
                (q - sent).min(u64::from(chunk)) as u32
            }
            (None, Limit::Duration(d)) => {
                if start.elapsed() >= d {
                    break;
                }
                chunk
            }
            (None, Limit::Count(_)) => break,
        };
        let opts = TestRunOptions {
            data_in: Some(frame),
            ctx_in: Some(md),
            repeat,
            attrs: TestRunAttrs::new().xdp_live_frames(BATCH),
            ..Default::default()
        };
        prog.test_run(opts).context(LIVE_FRAMES_CALL)?;
        sent += u64::from(repeat);
        pace(rate, start, sent);
    }
    Ok(sent)
}

/// Sleeps until `sent` frames are due at `rate` frames a second since
/// `start` (no rate: at once).
fn pace(rate: Option<f64>, start: Instant, sent: u64) {
    if let Some(r) = rate {
        let due = start + Duration::from_secs_f64(sent as f64 / r);
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
    }
}

/// Resolves command-line arguments in the current network namespace.
pub fn spec_from_args(args: &PktgenArgs) -> anyhow::Result<Spec> {
    let ifindex = ifindex(&args.dev)?;
    let src_mac = match args.src_mac {
        Some(m) => m,
        None => if_mac(&args.dev)?,
    };
    let limit = match (args.count, args.duration) {
        (Some(n), _) => Limit::Count(n),
        (None, Some(d)) => {
            ensure!(d.is_finite() && d > 0.0, "--duration must be positive");
            Limit::Duration(Duration::from_secs_f64(d))
        }
        (None, None) => Limit::Duration(Duration::from_secs(5)),
    };
    if let Some(r) = args.rate {
        ensure!(r > 0, "--rate must be positive");
    }
    let dist = match args.flow_dist {
        FlowDistArg::Uniform => FlowDist::Uniform,
        FlowDistArg::Zipf => {
            ensure!(
                args.zipf_s.is_finite() && args.zipf_s >= 0.0,
                "--zipf-s must be a finite number >= 0"
            );
            FlowDist::Zipf { s: args.zipf_s }
        }
    };
    Ok(Spec {
        ifindex,
        frame: FrameSpec {
            dst_mac: args.dst_mac,
            src_mac,
            src: SocketAddr::new(args.src, args.sport),
            dst: args.dst,
            proto: args.proto,
            size: args.size,
        },
        flows: args.flows,
        dist,
        limit,
        rate: args.rate,
        threads: args.threads.unwrap_or_else(cpus),
        fresh_frames: args.fresh_frames,
    })
}

/// `lb pktgen`.
pub fn run(args: PktgenArgs) -> anyhow::Result<()> {
    if args.backend == Backend::Kernel {
        if !Path::new("/proc/net/pktgen").exists() {
            bail!(
                "--backend kernel needs the kernel pktgen module (/proc/net/pktgen is absent on this host); use --backend xdp"
            );
        }
        bail!(
            "--backend kernel: driving /proc/net/pktgen is not implemented in this build; use --backend xdp"
        );
    }
    ensure!(
        args.src.is_ipv4() == args.dst.is_ipv4(),
        "--src {} and --dst {} are of different families",
        args.src,
        args.dst
    );
    let spec = spec_from_args(&args)?;
    let mut ebpf = load_object()?;
    let summary = generate(&mut ebpf, &spec)?;
    // Frames handed to XDP; a full veth ring drops after that point (see
    // `ethtool -S DEV`, xdp_xmit_errors), so count delivery at the receiver.
    println!(
        "generated {} frames in {:.3} s on {} ({} thread(s), {}): {:.3} Mpps",
        summary.frames,
        summary.elapsed.as_secs_f64(),
        args.dev,
        spec.threads,
        summary.sender,
        summary.mpps()
    );
    if let FlowDist::Zipf { s } = spec.dist {
        let mix = mix_summary(&drawn_flows(spec.flows, s), spec.flows);
        println!(
            "flow mix: Zipf s={s} over {} flows, a sequence of {PKTGEN_FLOW_TABLE} draws per CPU holding {} distinct flows; the heaviest 1 % of the flows carry {:.0} % of the frames",
            spec.flows,
            mix.distinct,
            100.0 * mix.top_percent_share
        );
    }
    Ok(())
}

pub use packet::{packet_socket, send_frame};

/// The fallback sender: the frames built on the host, one `send` each on
/// an AF_PACKET socket bound to the interface.
mod packet {
    use std::{
        net::SocketAddr,
        os::fd::{AsRawFd, FromRawFd, OwnedFd},
        sync::atomic::{AtomicBool, Ordering},
        time::{Duration, Instant},
    };

    use anyhow::Context;

    use super::{
        FlowDist, Limit, Sender, Spec, Summary, build_frame, drawn_flows, flow_conf,
        flow_source_addr, in_threads, pace, seq_starts,
    };

    /// Sends `spec`'s frames: frame `n` of a thread whose sequence starts at
    /// `start` is flow `start + n` (uniform) or the drawn table's entry
    /// (Zipf), as the XDP program numbers them.
    pub(super) fn generate(spec: &Spec) -> anyhow::Result<Summary> {
        let conf = flow_conf(
            spec.ifindex,
            spec.frame.src.ip(),
            spec.frame.src.port(),
            spec.flows,
        )?;
        // Checked once here, so a bad size fails before any thread starts.
        build_frame(&spec.frame)?;
        let table = match spec.dist {
            FlowDist::Zipf { s } => Some(drawn_flows(spec.flows, s)),
            FlowDist::Uniform => None,
        };
        let starts = seq_starts(spec.flows, spec.threads.max(1));
        let frame_of = |n: u32| {
            let flow = match &table {
                Some(table) => table[n as usize % table.len()],
                None => n,
            };
            let src: SocketAddr = flow_source_addr(&conf, spec.frame.src, flow);
            build_frame(&super::FrameSpec { src, ..spec.frame })
        };
        let (frames, elapsed) = in_threads(spec, |t, quota, rate, start, stop| {
            let socket = packet_socket(spec.ifindex)?;
            send_loop(
                &socket, &frame_of, starts[t], quota, spec.limit, rate, start, stop,
            )
        })?;
        Ok(Summary {
            frames,
            elapsed,
            sender: Sender::PacketSocket,
        })
    }

    /// An AF_PACKET raw socket bound to `ifindex` for sending only
    /// (protocol 0: it receives nothing).
    pub fn packet_socket(ifindex: u32) -> anyhow::Result<OwnedFd> {
        // SAFETY: plain socket(2); the descriptor is owned from here on.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("socket(AF_PACKET, SOCK_RAW)");
        }
        // SAFETY: `fd` was just returned by socket(2) and is not owned elsewhere.
        let socket = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: all-zero is a valid sockaddr_ll; the fields are set below.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = ifindex as i32;
        // SAFETY: `addr` is a sockaddr_ll of the size passed.
        let rc = unsafe {
            libc::bind(
                socket.as_raw_fd(),
                (&raw const addr).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("binding an AF_PACKET socket to ifindex {ifindex}"));
        }
        Ok(socket)
    }

    /// Sends one frame, waiting while the interface's queue is full: a
    /// release build outruns a veth's queue (ENOBUFS), and a frame lost here
    /// is one the caller believes sent (a handshake the bench never made).
    pub fn send_frame(socket: &OwnedFd, frame: &[u8]) -> anyhow::Result<()> {
        const PATIENCE: Duration = Duration::from_secs(2);
        let start = Instant::now();
        loop {
            // SAFETY: the frame's buffer, of its length.
            let rc =
                unsafe { libc::send(socket.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
            if rc >= 0 {
                return Ok(());
            }
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::ENOBUFS) || start.elapsed() > PATIENCE {
                return Err(err).context("sending a frame on the AF_PACKET socket");
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// One thread's frames, paced as the XDP sender paces its calls. A full
    /// device queue (`ENOBUFS`) is waited out ([`send_frame`]), not counted
    /// as sent.
    #[allow(clippy::too_many_arguments)]
    fn send_loop(
        socket: &OwnedFd,
        frame_of: &impl Fn(u32) -> anyhow::Result<Vec<u8>>,
        first: u32,
        quota: Option<u64>,
        limit: Limit,
        rate: Option<f64>,
        start: Instant,
        stop: &AtomicBool,
    ) -> anyhow::Result<u64> {
        let mut sent = 0u64;
        let mut n = first;
        loop {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            match (quota, limit) {
                (Some(q), _) if sent >= q => break,
                (None, Limit::Duration(d)) if start.elapsed() >= d => break,
                (None, Limit::Count(_)) => break,
                _ => {}
            }
            send_frame(socket, &frame_of(n)?)?;
            sent += 1;
            n = n.wrapping_add(1);
            pace(rate, start, sent);
        }
        Ok(sent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{NetSlice, SlicedPacket, TransportSlice};

    fn spec(proto: Proto, size: usize) -> FrameSpec {
        FrameSpec {
            dst_mac: [2, 0, 0, 0, 0, 1],
            src_mac: [2, 0, 0, 0, 0, 2],
            src: SocketAddr::from((Ipv4Addr::new(198, 18, 0, 100), 1024)),
            dst: SocketAddr::from((Ipv4Addr::new(198, 18, 0, 10), 5353)),
            proto,
            size,
        }
    }

    const SRC6: &str = "[2001:db8:1::ffff:fff0]:1024";
    const DST6: &str = "[2001:db8:0:10::10]:5353";

    fn spec6(proto: Proto, size: usize) -> FrameSpec {
        FrameSpec {
            src: SRC6.parse().expect("src"),
            dst: DST6.parse().expect("dst"),
            ..spec(proto, size)
        }
    }

    /// The IPv6 header and L4 slice of a built frame, after checking the L4
    /// checksum with etherparse (over the IPv6 pseudo-header).
    fn checked_v6(f: &[u8]) -> (etherparse::Ipv6Header, TransportSlice<'_>) {
        let p = SlicedPacket::from_ethernet(f).expect("parse");
        let Some(NetSlice::Ipv6(ip)) = p.net else {
            panic!("not ipv6")
        };
        let h = ip.header().to_header();
        assert_eq!(h.hop_limit, 64);
        assert_eq!(usize::from(h.payload_length), f.len() - 54);
        let transport = p.transport.expect("transport");
        match &transport {
            TransportSlice::Udp(udp) => {
                let expected = udp
                    .to_header()
                    .calc_checksum_ipv6(&h, udp.payload())
                    .expect("checksum");
                assert_ne!(udp.checksum(), 0, "IPv6 UDP needs a checksum");
                assert_eq!(udp.checksum(), expected);
            }
            TransportSlice::Tcp(tcp) => {
                let expected = tcp
                    .to_header()
                    .calc_checksum_ipv6(&h, tcp.payload())
                    .expect("checksum");
                assert_eq!(tcp.checksum(), expected);
            }
            other => panic!("unexpected transport {other:?}"),
        }
        (h, transport)
    }

    #[test]
    fn ipv6_udp_frames_have_valid_checksums() {
        for size in [64, 128, 1514] {
            let f = build_frame(&spec6(Proto::Udp, size)).expect("frame");
            assert_eq!(f.len(), size);
            assert_eq!(f[12..14], [0x86, 0xdd]);
            let (h, transport) = checked_v6(&f);
            assert_eq!(h.next_header, etherparse::IpNumber::UDP);
            assert_eq!(
                std::net::Ipv6Addr::from(h.source),
                "2001:db8:1::ffff:fff0"
                    .parse::<std::net::Ipv6Addr>()
                    .unwrap()
            );
            assert_eq!(
                std::net::Ipv6Addr::from(h.destination),
                "2001:db8:0:10::10".parse::<std::net::Ipv6Addr>().unwrap()
            );
            let TransportSlice::Udp(udp) = transport else {
                panic!("not udp")
            };
            assert_eq!((udp.source_port(), udp.destination_port()), (1024, 5353));
            assert_eq!(usize::from(udp.length()), size - 54);
        }
    }

    #[test]
    fn ipv6_tcp_syn_and_ack_frames_have_valid_checksums() {
        let f = build_frame(&spec6(Proto::TcpSyn, 74)).expect("frame");
        let (_, TransportSlice::Tcp(tcp)) = checked_v6(&f) else {
            panic!("not tcp")
        };
        let tcp = tcp.to_header();
        assert!(tcp.syn && !tcp.ack && !tcp.fin && !tcp.rst);
        assert_eq!((tcp.source_port, tcp.destination_port), (1024, 5353));
        let f = build_frame(&spec6(Proto::TcpAck, 200)).expect("frame");
        let (_, TransportSlice::Tcp(tcp)) = checked_v6(&f) else {
            panic!("not tcp")
        };
        let tcp = tcp.to_header();
        assert!(tcp.ack && !tcp.syn && !tcp.fin && !tcp.rst);
        assert_eq!((tcp.sequence_number, tcp.acknowledgment_number), (2, 1));
    }

    #[test]
    fn ipv6_sizes_and_families_are_checked() {
        assert!(build_frame(&spec6(Proto::TcpSyn, 73)).is_err());
        assert!(build_frame(&spec6(Proto::Udp, 63)).is_err());
        let mixed = FrameSpec {
            dst: DST6.parse().expect("dst"),
            ..spec(Proto::Udp, 64)
        };
        let e = build_frame(&mixed).expect_err("mixed families");
        assert!(e.to_string().contains("different families"), "{e}");
    }

    /// What the `pktgen` program does to an IPv6 frame for flow `n`
    /// (`set_flow_v6`), on the host.
    fn set_flow_v6(frame: &mut [u8], conf: &PktgenConf, n: u32) {
        let protocol = frame[lb_common::PKTGEN_V6_NEXT_HEADER];
        let (_, check_off) = lb_common::headers::l4_layout(protocol).expect("tcp/udp");
        let (addr, port) = conf.flow_source(n);
        let low = lb_common::PKTGEN_V6_SADDR_LOW;
        frame[low..low + 4].copy_from_slice(&addr.to_be_bytes());
        frame[PKTGEN_V6_L4..PKTGEN_V6_L4 + 2].copy_from_slice(&port.to_be_bytes());
        let check = conf.l4_check_of(protocol, addr, port);
        let at = PKTGEN_V6_L4 + check_off;
        frame[at..at + 2].copy_from_slice(&check.to_ne_bytes());
    }

    #[test]
    fn ipv6_flows_vary_the_low_bits_and_keep_checksums_valid() {
        // 0xffff_fff0 + flows past 2^32 would leave the low 32 bits.
        assert!(flow_conf(0, spec6(Proto::Udp, 64).src.ip(), 1024, 64512 * 17).is_err());
        for proto in [Proto::Udp, Proto::TcpSyn, Proto::TcpAck] {
            let spec = spec6(proto, 96);
            let template = build_frame(&spec).expect("frame");
            let mut conf = flow_conf(0, spec.src.ip(), 1024, 64512 * 3).expect("conf");
            conf.l4_check = template_l4_check(&template);
            for n in [0, 1, 64511, 64512, 64512 * 2 + 7, 64512 * 3] {
                let mut f = template.clone();
                set_flow_v6(&mut f, &conf, n);
                let src = flow_source_addr(&conf, spec.src, n);
                assert_eq!(
                    f,
                    build_frame(&FrameSpec { src, ..spec }).expect("frame"),
                    "{proto:?} flow {n} from {src}"
                );
                checked_v6(&f);
            }
            assert_eq!(
                flow_source_addr(&conf, spec.src, 64512 * 2 + 7),
                "[2001:db8:1::ffff:fff2]:1031".parse().unwrap()
            );
        }
        // IPv4 frames keep the template's checksums (rewrite_source updates them).
        assert_eq!(
            template_l4_check(&build_frame(&spec(Proto::TcpSyn, 64)).unwrap()),
            0
        );
    }

    #[test]
    fn udp_frame_parses_with_valid_ip_checksum() {
        for size in [64, 128, 1514] {
            let f = build_frame(&spec(Proto::Udp, size)).expect("frame");
            assert_eq!(f.len(), size);
            let p = SlicedPacket::from_ethernet(&f).expect("parse");
            let link = p.link.expect("eth");
            let eth = link.to_header().expect("eth header");
            let etherparse::LinkHeader::Ethernet2(eth) = eth else {
                panic!("not ethernet")
            };
            assert_eq!(eth.destination, [2, 0, 0, 0, 0, 1]);
            assert_eq!(eth.source, [2, 0, 0, 0, 0, 2]);
            let Some(NetSlice::Ipv4(ip)) = p.net else {
                panic!("not ipv4")
            };
            let h = ip.header().to_header();
            assert_eq!(h.header_checksum, h.calc_header_checksum());
            assert_eq!(h.source, [198, 18, 0, 100]);
            assert_eq!(h.destination, [198, 18, 0, 10]);
            assert_eq!(usize::from(h.total_len), size - 14);
            assert!(h.dont_fragment);
            let Some(TransportSlice::Udp(udp)) = p.transport else {
                panic!("not udp")
            };
            assert_eq!(udp.source_port(), 1024);
            assert_eq!(udp.destination_port(), 5353);
            assert_eq!(udp.checksum(), 0);
            assert_eq!(usize::from(udp.length()), size - 34);
            assert!(udp.payload().iter().all(|b| *b == 0));
        }
    }

    /// The TCP header of a built frame, after checking its IPv4 and TCP
    /// checksums with etherparse.
    fn checked_tcp(f: &[u8]) -> etherparse::TcpHeader {
        let p = SlicedPacket::from_ethernet(f).expect("parse");
        let Some(NetSlice::Ipv4(ip)) = p.net else {
            panic!("not ipv4")
        };
        let h = ip.header().to_header();
        assert_eq!(h.header_checksum, h.calc_header_checksum());
        let Some(TransportSlice::Tcp(tcp)) = p.transport else {
            panic!("not tcp")
        };
        let expected = tcp
            .to_header()
            .calc_checksum_ipv4(&h, tcp.payload())
            .expect("checksum");
        assert_eq!(tcp.checksum(), expected);
        tcp.to_header()
    }

    #[test]
    fn tcp_syn_frame_has_valid_checksums() {
        let tcp = checked_tcp(&build_frame(&spec(Proto::TcpSyn, 100)).expect("frame"));
        assert!(tcp.syn && !tcp.ack && !tcp.fin && !tcp.rst);
        assert_eq!((tcp.source_port, tcp.destination_port), (1024, 5353));
    }

    #[test]
    fn tcp_ack_frame_is_a_bare_ack_with_valid_checksums() {
        let tcp = checked_tcp(&build_frame(&spec(Proto::TcpAck, 64)).expect("frame"));
        assert!(tcp.ack && !tcp.syn && !tcp.fin && !tcp.rst);
        assert_eq!((tcp.sequence_number, tcp.acknowledgment_number), (2, 1));
    }

    #[test]
    fn a_handshake_synack_then_the_clients_next_segment() {
        let syn_ack = checked_tcp(&build_frame(&spec(Proto::TcpSynAck, 64)).expect("frame"));
        assert!(syn_ack.syn && syn_ack.ack && !syn_ack.fin && !syn_ack.rst);
        // The ACK (2, 1) acknowledges this SYN-ACK's sequence number + 1.
        assert_eq!(
            (syn_ack.sequence_number, syn_ack.acknowledgment_number),
            (0, 2)
        );
        // A 64-byte frame's ACK carries 10 bytes: the next segment is past them.
        let next = checked_tcp(&build_frame(&spec(Proto::TcpNext, 64)).expect("frame"));
        assert!(next.ack && next.psh && !next.syn && !next.fin && !next.rst);
        assert_eq!((next.sequence_number, next.acknowledgment_number), (12, 1));
        let next = checked_tcp(&build_frame(&spec(Proto::TcpNext, 100)).expect("frame"));
        assert_eq!(next.sequence_number, 2 + 46);
    }

    #[test]
    fn frame_size_is_checked() {
        assert!(build_frame(&spec(Proto::Udp, 63)).is_err());
        assert!(build_frame(&spec(Proto::Udp, 1515)).is_err());
    }

    #[test]
    fn zipf_draws_are_in_range_deterministic_and_sized() {
        let t = zipf_table(1000, 1.0, 4096, 7);
        assert_eq!(t.len(), 4096);
        assert!(t.iter().all(|f| *f < 1000));
        assert_eq!(t, zipf_table(1000, 1.0, 4096, 7));
        assert_ne!(t, zipf_table(1000, 1.0, 4096, 8));
        assert!(zipf_table(1, 1.0, 100, 7).iter().all(|f| *f == 0));
        assert!(zipf_table(0, 1.0, 10, 7).iter().all(|f| *f == 0));
    }

    /// Shares of each flow in `t`.
    fn shares(t: &[u32], flows: u32) -> Vec<f64> {
        let mut c = vec![0u64; flows as usize];
        for f in t {
            c[*f as usize] += 1;
        }
        c.iter().map(|n| *n as f64 / t.len() as f64).collect()
    }

    #[test]
    fn zipf_shares_follow_the_law() {
        // s = 1 over 1000 flows: flow k's share is 1/((k+1) H), H ≈ 7.4855.
        let n = PKTGEN_FLOW_TABLE as usize;
        let h: f64 = (1..=1000).map(|k| 1.0 / f64::from(k)).sum();
        let p = shares(&zipf_table(1000, 1.0, n, ZIPF_SEED), 1000);
        for k in [0usize, 1, 2, 9, 99] {
            let expected = 1.0 / ((k as f64 + 1.0) * h);
            // Five standard deviations of a binomial share.
            let tolerance = 5.0 * (expected * (1.0 - expected) / n as f64).sqrt();
            assert!(
                (p[k] - expected).abs() < tolerance,
                "flow {k}: share {} vs {expected} ± {tolerance}",
                p[k]
            );
        }
        // s = 2 is steeper: flow 0 takes 1/ζ(2)-ish ≈ 61 %.
        let p2 = shares(&zipf_table(1000, 2.0, n, ZIPF_SEED), 1000);
        let h2: f64 = (1..=1000).map(|k| 1.0 / f64::from(k).powi(2)).sum();
        assert!((p2[0] - 1.0 / h2).abs() < 0.01, "s=2 flow 0: {}", p2[0]);
        // s = 0 is uniform at random: every flow near 1/1000.
        let p0 = shares(&zipf_table(1000, 0.0, n, ZIPF_SEED), 1000);
        assert!(p0.iter().all(|s| (s - 0.001).abs() < 0.0004));
    }

    #[test]
    fn zipf_a_few_flows_carry_most_packets() {
        // 1M flows, s = 1: the heaviest 1 % carry H(10^4)/H(10^6) ≈ 68 %.
        let t = zipf_table(1_000_000, 1.0, PKTGEN_FLOW_TABLE as usize, ZIPF_SEED);
        let mix = mix_summary(&t, 1_000_000);
        assert!(
            (0.64..0.72).contains(&mix.top_percent_share),
            "top 1 % share {}",
            mix.top_percent_share
        );
        // The draws reach deep into the tail, far beyond the heavy head.
        assert!(mix.distinct > 50_000, "distinct {}", mix.distinct);
        assert!(t.iter().any(|f| *f > 900_000));
        // Uniform for comparison: the heaviest 1 % carry about 1 %.
        let u: Vec<u32> = (0..PKTGEN_FLOW_TABLE).map(|n| n % 1000).collect();
        let mix = mix_summary(&u, 1000);
        assert_eq!(mix.distinct, 1000);
        assert!((mix.top_percent_share - 0.01).abs() < 0.001);
    }

    #[test]
    fn cpus_start_evenly_spread_over_the_flows() {
        assert_eq!(seq_starts(1, 2), [0, 0]);
        assert_eq!(seq_starts(20480, 2), [0, 10240]);
        assert_eq!(seq_starts(10, 4), [0, 2, 5, 7]);
        assert_eq!(seq_starts(u32::MAX, 2), [0, u32::MAX / 2]);
        assert_eq!(seq_starts(7, 0), [0]);
    }

    #[test]
    fn flows_use_ports_first_then_addresses() {
        let base = Ipv4Addr::new(10, 0, 0, 1);
        let c = flow_conf(7, base, 1024, 16).expect("conf");
        assert_eq!((c.ifindex, c.flows, c.sport_span), (7, 16, 16));
        assert_eq!(flow_endpoint(&c, 0), (base, 1024));
        assert_eq!(flow_endpoint(&c, 15), (base, 1039));
        assert_eq!(flow_endpoint(&c, 16), (base, 1024));

        let c = flow_conf(1, base, 1024, 1_000_000).expect("conf");
        assert_eq!(u32::from(c.sport_span), MAX_PORT_SPAN);
        assert_eq!(flow_endpoint(&c, 64511), (base, 65535));
        assert_eq!(flow_endpoint(&c, 64512), (Ipv4Addr::new(10, 0, 0, 2), 1024));
        let distinct: std::collections::HashSet<_> =
            (0..200_000).map(|n| flow_endpoint(&c, n)).collect();
        assert_eq!(distinct.len(), 200_000);

        // A high base port narrows the span.
        let c = flow_conf(1, base, 65000, 1000).expect("conf");
        assert_eq!(c.sport_span, 536);
        assert_eq!(flow_endpoint(&c, 536), (Ipv4Addr::new(10, 0, 0, 2), 65000));
        assert!(flow_conf(1, base, 1024, 0).is_err());
        assert!(flow_conf(1, Ipv4Addr::new(255, 255, 255, 255), 1024, 70_000).is_err());
    }
}
