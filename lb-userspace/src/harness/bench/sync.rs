//! Flow sync's cost (issue 27), in `lb bench --only cost` and the full run:
//!
//! - the data plane with sync's switch off and on, in turns within each
//!   round (BPF_PROG_TEST_RUN, DSR, 100 backends): an established flow's
//!   packet (never an event), a new UDP flow's first datagram (half-open:
//!   never an event) and its second, which promotes it and writes the
//!   sync event (the ring drained between batches, as the agent does);
//! - the sync traffic of a real agent (`lb run` with `[sync]`, in the
//!   bench's namespace, its one peer a socket of ours that counts what it
//!   receives) while flows are established through the agent's own pinned
//!   maps at a paced rate (BPF_PROG_TEST_RUN of a program sharing them):
//!   bytes/s, datagrams/s and flow records/s at the peer, and the agent
//!   process's CPU time over the same window.

use std::{
    fmt::Write as _,
    io::BufRead as _,
    net::{SocketAddrV4, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};

use super::{
    measure::{Stat, ns_per_packet},
    net::{CLIENT, CONNTRACK, PORT, VIP, backend_addr, frame_from, lb_config, new_flow_frames},
};
use crate::{
    config::Forwarding,
    control::{self, Request},
    dataplane::{Dataplane, TableSizes},
    harness::xdp::{self, XDP_REDIRECT},
    sync::SyncMaps,
};

/// A packet the sync switch's cost is measured on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum SyncPacket {
    /// An established flow's packet (repeat): no event.
    Established,
    /// A new UDP flow's first datagram: half-open, no event.
    NewFirst,
    /// Its second datagram: promotes the flow, writes the sync event.
    Promoting,
}

/// One packet's ns with sync off and on, measured in turns.
#[derive(Debug)]
pub(super) struct SyncCostRow {
    pub(super) packet: SyncPacket,
    pub(super) method: String,
    pub(super) off: Stat,
    pub(super) on: Stat,
}

/// What a real agent's sync sent for a paced rate of new flows.
#[derive(Debug)]
pub(super) struct SyncTrafficRow {
    /// New flows per second asked for.
    pub(super) offered: u32,
    /// New flows per second established (the pacing may fall short).
    pub(super) achieved: f64,
    pub(super) seconds: f64,
    pub(super) bytes_per_s: f64,
    pub(super) datagrams_per_s: f64,
    /// Flow records the agent counted as sent, per second.
    pub(super) records_per_s: f64,
    /// The agent process's CPU time over the window, per second of it
    /// (1.0: one core).
    pub(super) agent_cpu: f64,
    /// Events the data plane dropped (the ring full) over the window.
    pub(super) lost: u64,
}

#[derive(Debug, Default)]
pub(super) struct SyncRows {
    pub(super) cost: Vec<SyncCostRow>,
    pub(super) traffic: Vec<SyncTrafficRow>,
    /// Why the traffic rows are missing, if they are.
    pub(super) traffic_error: Option<String>,
}

/// Events the ring buffer holds (256 KiB of 32-byte events plus headers):
/// the batches between two drains stay below it.
const DRAIN_EVERY: usize = 4000;

/// The switch's cost rows (DSR, 100 backends, the bench's tables).
pub(super) fn cost_rows(lbin: u32, quick: bool, reps: usize) -> anyhow::Result<Vec<SyncCostRow>> {
    eprintln!("bench: flow sync off/on (BPF_PROG_TEST_RUN)");
    let repeat: u32 = if quick { 100_000 } else { 1_000_000 };
    let calls = if quick { 2_000 } else { 20_000 };
    let mut dp = Dataplane::load(CONNTRACK)?;
    dp.apply(&lb_config(Forwarding::Dsr, 100)?)?;
    let mut maps = SyncMaps::of(&dp)?;
    let est = vec![frame_from(SocketAddrV4::new(CLIENT, 1024))?];
    ns_per_packet(dp.program()?, &est, lbin, 1, Some(XDP_REDIRECT))?;
    ns_per_packet(dp.program()?, &est, lbin, 1, Some(XDP_REDIRECT))?;
    let mut samples: [[Vec<f64>; 2]; 3] = Default::default();
    // Off and on take turns within each round, so a shared machine's drift
    // lands on both alike.
    for rep in 0..reps {
        for on in [false, true] {
            maps.switch(on)?;
            let prog = dp.program()?;
            samples[0][usize::from(on)].push(ns_per_packet(
                prog,
                &est,
                lbin,
                repeat,
                Some(XDP_REDIRECT),
            )?);
            // Distinct flows per round and switch: 10.(100 + tag).x.x.
            let tag = u8::try_from(10 + 2 * rep + usize::from(on)).context("too many reps")?;
            let frames = new_flow_frames(tag, calls)?;
            let (mut first, mut second) = (0.0, 0.0);
            for batch in frames.chunks(DRAIN_EVERY) {
                let share = batch.len() as f64 / frames.len() as f64;
                first += share * ns_per_packet(prog, batch, lbin, 1, Some(XDP_REDIRECT))?;
                second += share * ns_per_packet(prog, batch, lbin, 1, Some(XDP_REDIRECT))?;
                // What the agent's sync thread does every 10 ms.
                let drained = maps.drain().len();
                ensure!(
                    !on || drained == batch.len(),
                    "{drained} sync events for {} promoted flows",
                    batch.len()
                );
                ensure!(on || drained == 0, "{drained} sync events with sync off");
            }
            samples[1][usize::from(on)].push(first);
            samples[2][usize::from(on)].push(second);
        }
    }
    maps.switch(false)?;
    ensure!(maps.lost() == 0, "{} sync events lost", maps.lost());
    let method = [
        format!("repeat={repeat}"),
        format!("{calls} distinct flows, repeat=1"),
        format!("{calls} distinct flows, repeat=1"),
    ];
    Ok([
        SyncPacket::Established,
        SyncPacket::NewFirst,
        SyncPacket::Promoting,
    ]
    .into_iter()
    .zip(samples)
    .zip(method)
    .map(|((packet, [off, on]), method)| SyncCostRow {
        packet,
        method,
        off: Stat::of(&off),
        on: Stat::of(&on),
    })
    .collect())
}

/// The agent's sync address and its peer's (ours), on the bench
/// namespace's loopback.
const AGENT_SYNC: SocketAddrV4 = SocketAddrV4::new(std::net::Ipv4Addr::new(127, 0, 0, 1), 7891);
const PEER_SYNC: SocketAddrV4 = SocketAddrV4::new(std::net::Ipv4Addr::new(127, 0, 0, 2), 7892);
/// The agent's tables: room for every flow of the traffic rows.
const AGENT_TABLES: TableSizes = TableSizes {
    conntrack: 1_048_576,
    half_open: 262_144,
};

/// The traffic rows: a real agent, each rate for `seconds`. Run inside the
/// bench's namespace.
pub(super) fn traffic_rows(
    lbin: u32,
    rates: &[u32],
    seconds: f64,
) -> anyhow::Result<Vec<SyncTrafficRow>> {
    eprintln!("bench: flow sync traffic (a real agent, {rates:?} new flows/s)");
    let dir = std::env::temp_dir().join(format!("lb-bench-sync-{}", std::process::id()));
    let pins = Path::new("/sys/fs/bpf").join(format!("lb-bench-sync-{}", std::process::id()));
    let agent = BenchAgent::start(&dir, &pins)?;
    let result = (|| {
        // A program sharing the agent's pinned maps: its events go into
        // the ring the agent drains.
        let (mut dp, adopted) = Dataplane::load_pinned(AGENT_TABLES, &pins)?;
        ensure!(
            adopted,
            "the agent's maps are not pinned in {}",
            pins.display()
        );
        warm_up(&mut dp, lbin)?;
        let peer = Peer::listen()?;
        let mut rows = Vec::new();
        for (i, rate) in rates.iter().enumerate() {
            let tag = u8::try_from(200 + i).context("too many rates")?;
            rows.push(agent.traffic(&mut dp, &peer, lbin, *rate, seconds, tag)?);
        }
        Ok(rows)
    })();
    let stopped = agent.stop();
    let log = std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    let rows =
        result.inspect_err(|_| eprintln!("bench: the sync traffic's agent's log:\n{log}"))?;
    stopped?;
    Ok(rows)
}

/// Until the agent has every backend's next hop (it resolves them when the
/// data plane first asks, passing those packets meanwhile): round-robin
/// flows over all 100 backends until a whole round is forwarded.
fn warm_up(dp: &mut Dataplane, lbin: u32) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut tag = 150u8;
    loop {
        let frames = new_flow_frames(tag, 100)?;
        let prog = dp.program()?;
        let mut forwarded = true;
        for f in &frames {
            forwarded &= xdp::test_run(prog, lbin, f, 1, false)?.action == XDP_REDIRECT;
        }
        if forwarded {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "the agent's data plane still passes new flows after 10 s (next hops unresolved?)"
        );
        tag = tag.wrapping_add(1);
        thread::sleep(Duration::from_millis(100));
    }
}

/// `lb run` with `[sync]` in the bench's namespace, its maps pinned.
struct BenchAgent {
    child: Child,
    socket: PathBuf,
    pins: PathBuf,
}

impl BenchAgent {
    fn start(dir: &Path, pins: &Path) -> anyhow::Result<BenchAgent> {
        use std::os::unix::fs::OpenOptionsExt as _;
        std::fs::create_dir_all(dir)?;
        let key = dir.join("sync.key");
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&key)
            .and_then(|mut f| {
                std::io::Write::write_all(&mut f, b"bench-sync-key-of-at-least-32-characters\n")
            })
            .with_context(|| format!("writing {}", key.display()))?;
        let backends: Vec<String> = (0..100)
            .map(|i| {
                format!(
                    "{{ address = \"{}:{PORT}\", name = \"b{i}\" }}",
                    backend_addr(i)
                )
            })
            .collect();
        let config = dir.join("lb.toml");
        std::fs::write(
            &config,
            format!(
                "[dataplane]\ninterfaces = [\"lbin\", \"lbout\"]\nforwarding = \"dsr\"\nxdp-mode = \"native\"\n\
                 conntrack-size = {}\nhalf-open-size = {}\n\n\
                 [sync]\nlisten = \"{AGENT_SYNC}\"\npeers = [\"{PEER_SYNC}\"]\nkey-file = \"{}\"\nbulk-timeout = \"100ms\"\n\n\
                 [[service]]\nname = \"bench\"\nvip = \"{VIP}:{PORT}\"\nprotocol = \"udp\"\nscheduler = \"round-robin\"\n\
                 backends = [ {} ]\n",
                AGENT_TABLES.conntrack,
                AGENT_TABLES.half_open,
                key.display(),
                backends.join(", ")
            ),
        )?;
        let socket = dir.join("lb.sock");
        let exe = std::env::current_exe().context("this lb binary")?;
        let mut child = Command::new(&exe)
            .arg("run")
            .arg("--config")
            .arg(&config)
            .arg("--socket")
            .arg(&socket)
            .arg("--pin-dir")
            .arg(pins)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(std::fs::File::create(dir.join("agent.log"))?))
            .spawn()
            .with_context(|| format!("starting {} run", exe.display()))?;
        let stdout = child.stdout.take().context("the agent's stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.contains("lb: ready") {
                    let _ = tx.send(());
                }
            }
        });
        let mut agent = BenchAgent {
            child,
            socket,
            pins: pins.to_path_buf(),
        };
        if rx.recv_timeout(Duration::from_secs(30)).is_err() {
            let _ = agent.child.kill();
            let _ = agent.child.wait();
            bail!(
                "the bench's agent was not ready within 30 s: {}",
                std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default()
            );
        }
        Ok(agent)
    }

    /// The agent process's CPU time so far (user + system).
    fn cpu(&self) -> anyhow::Result<Duration> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))?;
        // Fields after the command's closing parenthesis; utime and stime
        // are the 14th and 15th of the line.
        let rest = stat.rsplit_once(')').context("/proc/PID/stat")?.1;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 = fields
            .get(11..13)
            .context("/proc/PID/stat fields")?
            .iter()
            .map(|f| f.parse::<u64>().unwrap_or(0))
            .sum();
        // SAFETY: sysconf reads a constant of the running system.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        ensure!(hz > 0, "sysconf(_SC_CLK_TCK) = {hz}");
        Ok(Duration::from_secs_f64(ticks as f64 / hz as f64))
    }

    fn flows_sent(&self) -> anyhow::Result<(u64, u64)> {
        let status = control::request(&self.socket, &Request::Status)?
            .status
            .context("no status")?;
        let sync = status.sync.context("the agent reports no sync")?;
        Ok((
            sync.peers.iter().map(|p| p.flows_sent).sum(),
            sync.events_lost,
        ))
    }

    /// `rate` new UDP flows a second for `seconds` through `dp` (sharing
    /// the agent's maps), each established by two datagrams, in 10 ms
    /// slots.
    fn traffic(
        &self,
        dp: &mut Dataplane,
        peer: &Peer,
        lbin: u32,
        rate: u32,
        seconds: f64,
        tag: u8,
    ) -> anyhow::Result<SyncTrafficRow> {
        let slot = Duration::from_millis(10);
        let per_slot = (rate as usize / 100).max(1);
        let slots = (seconds * 100.0).round() as usize;
        let frames = new_flow_frames(tag, per_slot * slots)?;
        let prog = dp.program()?;
        let (sent0, lost0) = self.flows_sent()?;
        let (bytes0, datagrams0) = peer.counts();
        let cpu0 = self.cpu()?;
        let start = Instant::now();
        for (i, batch) in frames.chunks(per_slot).enumerate() {
            for f in batch {
                // The first datagram (half-open), then the second (promoted).
                for _ in 0..2 {
                    let r = xdp::test_run(prog, lbin, f, 1, false)?;
                    ensure!(r.action == XDP_REDIRECT, "program returned {}", r.action);
                }
            }
            let next = start + slot * u32::try_from(i + 1)?;
            if let Some(wait) = next.checked_duration_since(Instant::now()) {
                thread::sleep(wait);
            }
        }
        let established = start.elapsed();
        // The last batch leaves within the agent's 10 ms.
        thread::sleep(Duration::from_millis(100));
        let window = start.elapsed().as_secs_f64();
        let cpu = self.cpu()? - cpu0;
        let (bytes, datagrams) = peer.counts();
        let (sent, lost) = self.flows_sent()?;
        Ok(SyncTrafficRow {
            offered: rate,
            achieved: frames.len() as f64 / established.as_secs_f64(),
            seconds: window,
            bytes_per_s: (bytes - bytes0) as f64 / window,
            datagrams_per_s: (datagrams - datagrams0) as f64 / window,
            records_per_s: (sent - sent0) as f64 / window,
            agent_cpu: cpu.as_secs_f64() / window,
            lost: lost - lost0,
        })
    }

    /// SIGTERM, then its data plane detached and its pins removed (what
    /// `lb teardown` does).
    fn stop(mut self) -> anyhow::Result<()> {
        let pid = rustix::process::Pid::from_raw(i32::try_from(self.child.id())?)
            .context("the agent's pid")?;
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
        Dataplane::teardown(&self.pins)
            .map(drop)
            .with_context(|| format!("tearing down {}", self.pins.display()))
    }
}

impl Drop for BenchAgent {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The agent's peer: a socket counting the bytes and datagrams it gets.
struct Peer {
    bytes: Arc<AtomicU64>,
    datagrams: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Peer {
    fn listen() -> anyhow::Result<Peer> {
        let socket = UdpSocket::bind(PEER_SYNC).with_context(|| format!("binding {PEER_SYNC}"))?;
        socket.set_read_timeout(Some(Duration::from_millis(50)))?;
        let peer = Peer {
            bytes: Arc::default(),
            datagrams: Arc::default(),
            stop: Arc::default(),
        };
        let (bytes, datagrams, stop) = (
            peer.bytes.clone(),
            peer.datagrams.clone(),
            peer.stop.clone(),
        );
        thread::spawn(move || {
            let mut buf = vec![0u8; 65_536];
            while !stop.load(Ordering::Relaxed) {
                if let Ok(n) = socket.recv(&mut buf) {
                    bytes.fetch_add(n as u64, Ordering::Relaxed);
                    datagrams.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        Ok(peer)
    }

    fn counts(&self) -> (u64, u64) {
        (
            self.bytes.load(Ordering::Relaxed),
            self.datagrams.load(Ordering::Relaxed),
        )
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Both parts of the sync rows; a traffic failure is reported, not fatal
/// (the cost rows stand on their own).
pub(super) fn sync_rows(quick: bool, reps: usize) -> anyhow::Result<SyncRows> {
    let lbin = xdp::ifindex("lbin")?;
    let cost = cost_rows(lbin, quick, reps)?;
    let seconds = if quick { 1.0 } else { 2.0 };
    let (traffic, traffic_error) = match traffic_rows(lbin, &[10_000, 100_000], seconds) {
        Ok(rows) => (rows, None),
        Err(e) => {
            eprintln!("bench: flow sync traffic failed: {e:#}");
            (Vec::new(), Some(format!("{e:#}")))
        }
    };
    Ok(SyncRows {
        cost,
        traffic,
        traffic_error,
    })
}

/// Issue 27's targets: the established path within 3 % with sync on, a
/// new flow (its promoting datagram) within 15 %.
pub(super) const TARGET_ESTABLISHED: f64 = 0.03;
pub(super) const TARGET_NEW_FLOW: f64 = 0.15;

fn packet_name(p: SyncPacket) -> &'static str {
    match p {
        SyncPacket::Established => "established flow",
        SyncPacket::NewFirst => "new UDP flow, first datagram (half-open: no event)",
        SyncPacket::Promoting => "new UDP flow, second datagram (promotes it: the sync event)",
    }
}

/// The report's section.
pub(super) fn render(s: &mut String, rows: &SyncRows) {
    if rows.cost.is_empty() && rows.traffic.is_empty() && rows.traffic_error.is_none() {
        return;
    }
    let _ = writeln!(
        s,
        "\n## Flow sync (issue 27)\n\n`lb` DSR, 100 backends, BPF_PROG_TEST_RUN, sync's switch off and on in turns within each round (on: the ring drained between batches of {DRAIN_EVERY}, as the agent does):\n\n| packet | method | sync off ns | sync on ns | on vs off |\n|---|---|---|---|---|"
    );
    for r in &rows.cost {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {:+.1} % |",
            packet_name(r.packet),
            r.method,
            r.off.text(1),
            r.on.text(1),
            100.0 * (r.on.median / r.off.median - 1.0)
        );
    }
    if let Some(e) = &rows.traffic_error {
        let _ = writeln!(s, "\nSync traffic: not measured ({e}).");
    }
    if !rows.traffic.is_empty() {
        let _ = writeln!(
            s,
            "\nSync traffic of a real agent (`lb run` with `[sync]`, one peer: a socket counting what it receives) while new UDP flows are established through its pinned maps at a paced rate (BPF_PROG_TEST_RUN, 10 ms slots); CPU: the agent process's user + system time over the window:\n\n| new flows/s asked | achieved | window s | bytes/s to the peer | datagrams/s | flow records/s | agent CPU (1 = a core) | events lost |\n|---|---|---|---|---|---|---|---|"
        );
        for r in &rows.traffic {
            let _ = writeln!(
                s,
                "| {} | {:.0} | {:.2} | {:.0} | {:.0} | {:.0} | {:.3} | {} |",
                super::targets::grouped(r.offered),
                r.achieved,
                r.seconds,
                r.bytes_per_s,
                r.datagrams_per_s,
                r.records_per_s,
                r.agent_cpu,
                r.lost
            );
        }
    }
}

/// Lines of the targets table.
pub(super) fn targets(s: &mut String, rows: &SyncRows) {
    let verdict = |ok: bool| if ok { "met" } else { "**missed**" };
    for (packet, target) in [
        (SyncPacket::Established, TARGET_ESTABLISHED),
        (SyncPacket::Promoting, TARGET_NEW_FLOW),
    ] {
        if let Some(r) = rows.cost.iter().find(|r| r.packet == packet) {
            let over = r.on.median / r.off.median - 1.0;
            let _ = writeln!(
                s,
                "| flow sync on: {} within {:.0} % of off | {}: {:+.1} % ({:.1} vs {:.1} ns) |",
                packet_name(packet),
                100.0 * target,
                verdict(over <= target),
                100.0 * over,
                r.on.median,
                r.off.median
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stat(median: f64) -> Stat {
        Stat::of(&[median])
    }

    #[test]
    fn the_targets_compare_on_with_off_in_the_same_run() {
        let rows = SyncRows {
            cost: vec![
                SyncCostRow {
                    packet: SyncPacket::Established,
                    method: "repeat=1000000".into(),
                    off: stat(40.0),
                    on: stat(41.0),
                },
                SyncCostRow {
                    packet: SyncPacket::Promoting,
                    method: "20000 distinct flows, repeat=1".into(),
                    off: stat(200.0),
                    on: stat(240.0),
                },
            ],
            traffic: vec![SyncTrafficRow {
                offered: 100_000,
                achieved: 98_000.0,
                seconds: 2.1,
                bytes_per_s: 1_000_000.0,
                datagrams_per_s: 2600.0,
                records_per_s: 98_000.0,
                agent_cpu: 0.25,
                lost: 0,
            }],
            traffic_error: None,
        };
        let mut t = String::new();
        targets(&mut t, &rows);
        assert!(
            t.contains("| flow sync on: established flow within 3 % of off | met: +2.5 % (41.0 vs 40.0 ns) |"),
            "{t}"
        );
        assert!(
            t.contains("within 15 % of off | **missed**: +20.0 % (240.0 vs 200.0 ns) |"),
            "{t}"
        );
        let mut s = String::new();
        render(&mut s, &rows);
        assert!(
            s.contains("| 100 000 | 98000 | 2.10 | 1000000 | 2600 | 98000 | 0.250 | 0 |"),
            "{s}"
        );
        let mut none = String::new();
        render(&mut none, &SyncRows::default());
        assert!(none.is_empty(), "nothing measured, nothing shown: {none}");
    }
}
