//! The sync thread: one UDP socket (`[sync] listen`), the data plane's
//! flow events, the peers' messages, and three timers — the 10 ms batch,
//! the refresh walk of the table, the directory's re-read — plus the bulk
//! copy at start. Blocking I/O on a thread of its own: it never waits on
//! the agent's loop, nor the loop on it.

use std::{
    collections::BTreeSet,
    net::{SocketAddr, SocketAddrV4, UdpSocket},
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context;
use aya::maps::{Array, HashMap, Map, MapData, RingBuf};
use lb_common::{
    Backend, FLOW_F_FULL_NAT, FLOW_F_PROXY, FLOW_F_SYNCED, Flow, FlowConf, NextHop, ServiceConf,
    ServiceKey,
    flow::{FORWARD, REPLY, STATE_CLOSING, STATE_ESTABLISHED, TICK_NS, Timeout, idle_ticks, ticks},
    map_names::MapName,
    maps6::{Backend6, ServiceKey6},
    sync::{SYNC_EVENT_ENDED, SyncConf, SyncEvent, SyncEvent6, SyncEventOf},
};
use tracing::{debug, info, warn};

use super::{
    Directory,
    directory::{LocalService, ServiceName},
    insert::{self, InsertError, SyncTable},
    keys::SyncKey,
    stats::{RecordReject, Stats},
    wire::{self, Event, Family, Key, Kind, Record, RecordAge, ReplayGuard, Sealer},
};
use crate::{config, dataplane::Dataplane};

/// How often the data plane's events are drained and sent.
const BATCH: Duration = Duration::from_millis(10);
/// How often the directory follows the maps (a service or backend added).
const DIRECTORY_REFRESH: Duration = Duration::from_secs(1);
/// How often an unanswered bulk request is sent again.
const BULK_RETRY: Duration = Duration::from_millis(500);
/// The sync socket's receive buffer.
const RECV_BUFFER: usize = 4 << 20;
/// The longest refresh period, whatever the timeouts.
const MAX_REFRESH: Duration = Duration::from_secs(30);

/// The maps sync reads and writes, as owned handles for its thread.
pub struct SyncMaps {
    on: Array<MapData, SyncConf>,
    events: RingBuf<MapData>,
    table: insert::Table,
    table6: insert::Table6,
    services: HashMap<MapData, ServiceKey, u32>,
    services6: HashMap<MapData, ServiceKey6, u32>,
    confs: Array<MapData, ServiceConf>,
    backends: Array<MapData, Backend>,
    backends6: Array<MapData, Backend6>,
    /// Backend id → synced flows inserted established, less those ended by
    /// a peer (this thread is its only writer): the active count adds it.
    opened: Array<MapData, u64>,
    flow_conf: Array<MapData, FlowConf>,
}

fn array<T: aya::Pod>(dp: &Dataplane, m: MapName) -> anyhow::Result<Array<MapData, T>> {
    Array::try_from(Map::Array(dp.map_data(m)?)).with_context(|| m.name())
}

impl SyncMaps {
    pub fn of(dp: &Dataplane) -> anyhow::Result<SyncMaps> {
        let hash = |m: MapName| -> anyhow::Result<MapData> { Ok(dp.map_data(m)?) };
        Ok(SyncMaps {
            on: array(dp, MapName::SYNC_ON)?,
            events: RingBuf::try_from(Map::RingBuf(dp.map_data(MapName::SYNC_EVENTS)?))
                .context("SYNC_EVENTS")?,
            table: insert::Table {
                slots: dp.established_table().context("ESTABLISHED")?,
                overflow: HashMap::try_from(Map::HashMap(hash(MapName::CONNTRACK)?))
                    .context("CONNTRACK")?,
                flow_conf: array(dp, MapName::FLOW_CONF)?,
            },
            table6: insert::Table6 {
                established: HashMap::try_from(Map::HashMap(hash(MapName::ESTABLISHED6)?))
                    .context("ESTABLISHED6")?,
            },
            services: HashMap::try_from(Map::HashMap(hash(MapName::SERVICES)?))
                .context("SERVICES")?,
            services6: HashMap::try_from(Map::HashMap(hash(MapName::SERVICES6)?))
                .context("SERVICES6")?,
            confs: array(dp, MapName::SERVICE_CONF)?,
            backends: array(dp, MapName::BACKENDS)?,
            backends6: array(dp, MapName::BACKENDS6)?,
            opened: array(dp, MapName::SYNC_OPENED)?,
            flow_conf: array(dp, MapName::FLOW_CONF)?,
        })
    }

    /// Turns the data plane's flow events on or off.
    pub fn switch(&mut self, on: bool) -> anyhow::Result<()> {
        let mut conf = self.on.get(&0, 0).context("SYNC_ON")?;
        conf.on = u32::from(on);
        self.on.set(0, conf, 0).context("SYNC_ON")
    }

    /// Events the data plane lost (full ring buffer).
    pub fn lost(&self) -> u64 {
        self.on.get(&0, 0).map(|c| c.lost).unwrap_or(0)
    }

    /// Every event waiting now, of both families: the ring keeps each
    /// record's length, which says which layout it is (an IPv4 event is
    /// 40 bytes, an IPv6 one 64).
    pub fn drain(&mut self) -> Vec<FlowEvent> {
        let mut out = Vec::new();
        while let Some(item) = self.events.next() {
            let ptr = item.as_ptr();
            match item.len() {
                // SAFETY: exactly one event of plain data, of the length's layout.
                n if n == size_of::<SyncEvent>() => out.push(FlowEvent::V4(unsafe {
                    ptr.cast::<SyncEvent>().read_unaligned()
                })),
                // SAFETY: as above.
                n if n == size_of::<SyncEvent6>() => out.push(FlowEvent::V6(unsafe {
                    ptr.cast::<SyncEvent6>().read_unaligned()
                })),
                n => debug!("SYNC_EVENTS: a record of {n} bytes, no event's length"),
            }
        }
        out
    }

    /// Services and backends (both families) as the maps hold them now.
    pub fn directory(&self) -> Directory {
        let services4 = self
            .services
            .iter()
            .filter_map(Result::ok)
            .map(|(k, id)| (ServiceName::of(&k), id));
        let services6 = self
            .services6
            .iter()
            .filter_map(Result::ok)
            .map(|(k, id)| (ServiceName::of6(&k), id));
        let services: Vec<(ServiceName, u32)> = services4.chain(services6).collect();
        Directory::build(
            services,
            |id| self.confs.get(&id, 0).ok(),
            |id| self.backends.get(&id, 0).ok(),
            |index| self.backends6.get(&index, 0).ok().map(|b| b.addr),
        )
    }

    /// How often active flows are refreshed to the peers: a third of the
    /// shortest established timeout (so two refreshes can be lost), at
    /// most [`MAX_REFRESH`], at least a tick.
    fn refresh_period(&self) -> Duration {
        let conf = self.flow_conf.get(&0, 0).unwrap_or_default();
        let shortest =
            conf.timeouts[Timeout::Tcp as usize].min(conf.timeouts[Timeout::Udp as usize]);
        let period = Duration::from_nanos(u64::from(shortest / 3).max(1) * TICK_NS);
        period.min(MAX_REFRESH)
    }
}

/// Backend id's synced flows in `SYNC_OPENED`, one up or down.
fn add_opened(opened: &mut Array<MapData, u64>, backend_id: u32, up: bool) {
    let n = opened.get(&backend_id, 0).unwrap_or(0);
    let n = if up { n + 1 } else { n.saturating_sub(1) };
    if let Err(e) = opened.set(backend_id, n, 0) {
        debug!("SYNC_OPENED[{backend_id}]: {e}");
    }
}

/// A data plane's flow event, of either family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowEvent {
    V4(SyncEvent),
    V6(SyncEvent6),
}

/// What became of one received record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// Inserted, refreshed or ended a synced entry (or ended nothing).
    Taken,
    /// The tuple has a local entry here: left as it is.
    KeptLocal,
    Rejected(RecordReject),
}

/// Applies one peer's record to the table of its family through
/// `insert`, at `now` (ticks): the service and the backend are found by
/// address (unknown: rejected, nothing written), a local entry is never
/// touched.
pub fn apply(
    maps: &mut SyncMaps,
    dir: &Directory,
    r: &Record,
    now: u32,
) -> anyhow::Result<Applied> {
    let name = ServiceName {
        vip: r.vip,
        protocol: r.protocol,
    };
    let Some(svc) = dir.service(&name).filter(|s| s.nat == r.nat) else {
        return Ok(Applied::Rejected(RecordReject::UnknownService));
    };
    let Some(backend_id) = dir.backend(svc.id, r.backend) else {
        return Ok(Applied::Rejected(RecordReject::UnknownBackend));
    };
    let found = Found { svc, backend_id };
    match Family::of(r) {
        Family::V4 => apply_in(&mut maps.table, &mut maps.opened, found, r, now),
        Family::V6 => apply_in(&mut maps.table6, &mut maps.opened, found, r, now),
    }
}

/// A record's service and backend, found here.
#[derive(Clone, Copy)]
struct Found {
    svc: LocalService,
    backend_id: u32,
}

/// [`apply`] in the record's family's table.
fn apply_in<T: SyncTable>(
    table: &mut T,
    opened: &mut Array<MapData, u64>,
    Found { svc, backend_id }: Found,
    r: &Record,
    now: u32,
) -> anyhow::Result<Applied> {
    // A decoded record's addresses are all of its message's family, as
    // its service's (found by its VIP) are: a mismatch names no service.
    let Some(key) = T::Key::of_record(r) else {
        return Ok(Applied::Rejected(RecordReject::UnknownService));
    };
    let reply_key = match svc.nat {
        true => match key.reply(r.backend) {
            Some(k) => Some(k),
            None => return Ok(Applied::Rejected(RecordReject::UnknownBackend)),
        },
        false => None,
    };
    // An older peer's wrapped age (`wire::WRAPPED_AGE_MS`) is 0 here.
    let seen = now.saturating_sub(r.age().ticks());
    match insert::synced(table, &key) {
        Err(InsertError::Exists) => Ok(Applied::KeptLocal),
        Err(e) => Err(e.into()),
        Ok(Some(entry)) => {
            match r.event {
                Event::Established => {
                    insert::refresh_synced(table, &key, &entry, reply_key.as_ref(), seen)?
                }
                Event::Ended => {
                    if insert::end_synced(table, &key, &entry, reply_key.as_ref())? {
                        add_opened(opened, entry.backend_id, false);
                    }
                }
            }
            Ok(Applied::Taken)
        }
        Ok(None) if r.event == Event::Ended => Ok(Applied::Taken),
        Ok(None) => {
            let state = if r.closing {
                STATE_CLOSING
            } else {
                STATE_ESTABLISHED
            };
            let forward = Flow {
                backend_id,
                service_id: svc.id,
                state,
                seen,
                vip: if svc.nat { key.nat_vip() } else { 0 },
                vport: 0,
                direction: FORWARD,
                flags: FLOW_F_SYNCED,
                next_hop: NextHop::default(),
                seq: r.seq,
            };
            let reply = Flow {
                vip: key.nat_vip(),
                vport: r.vip.port().to_be(),
                direction: REPLY,
                seq: r.reply_seq,
                ..forward
            };
            let pair = reply_key.as_ref().map(|k| (k, &reply));
            match insert::insert_established(table, &key, &forward, pair) {
                Ok(()) => {
                    if state == STATE_ESTABLISHED {
                        add_opened(opened, backend_id, true);
                    }
                    Ok(Applied::Taken)
                }
                Err(InsertError::Exists) => Ok(Applied::KeptLocal),
                Err(InsertError::TableFull) => Ok(Applied::Rejected(RecordReject::TableFull)),
                Err(e) => Err(e.into()),
            }
        }
    }
}

/// The record a data plane event becomes, `None` for what is not sent: a
/// flow that came from a peer, a full-NAT flow (its source address is
/// this LB's: no peer can translate it, and a peer rejects its records as
/// of an unknown service — the data plane sends no event when one is
/// established, but its end and the refresh walk would), a PROXY v2 flow
/// (its `first` is in this LB's tables only: a peer holding it as a plain
/// NAT flow would forward its segments unshifted; here too the refresh
/// walk and its end would send it), or one whose service or backend is
/// gone.
pub fn record_of(dir: &Directory, ev: &FlowEvent) -> Option<Record> {
    match ev {
        FlowEvent::V4(ev) => record_of_event(dir, ev),
        FlowEvent::V6(ev) => record_of_event(dir, ev),
    }
}

/// [`record_of`] of one family's event.
fn record_of_event<K: SyncKey>(dir: &Directory, ev: &SyncEventOf<K>) -> Option<Record> {
    if ev.flags & (FLOW_F_SYNCED | FLOW_F_FULL_NAT | FLOW_F_PROXY) != 0 {
        return None;
    }
    let service = dir.service_name(ev.service_id)?;
    Some(Record {
        event: if ev.kind == SYNC_EVENT_ENDED {
            Event::Ended
        } else {
            Event::Established
        },
        client: ev.key.client(),
        vip: service.vip,
        protocol: service.protocol,
        closing: false,
        nat: ev.nat != 0,
        backend: dir.backend_addr(ev.backend_id)?,
        age_ms: 0,
        seq: ev.seq,
        reply_seq: ev.reply_seq,
    })
}

/// The refresh records of the flows active here (a packet within
/// `within` ticks), established, local; and how many synced entries the
/// table holds. `include_synced`: also the entries that came from a peer
/// (the bulk copy: a restarted LB needs back the flows it had, which live
/// on its peer as synced entries; the refresh leaves them out, or they
/// would echo between the LBs for ever).
fn active_records(
    maps: &SyncMaps,
    dir: &Directory,
    now: u32,
    within: u32,
    include_synced: bool,
) -> (Vec<Record>, u64) {
    let (mut out, synced) = records_of(&maps.table.entries(), dir, now, within, include_synced);
    let (out6, synced6) = records_of(&maps.table6.entries(), dir, now, within, include_synced);
    out.extend(out6);
    (out, synced + synced6)
}

/// [`active_records`] of `entries` (one family's, keyed as their packets
/// arrive, as the table lists them).
fn records_of<K: SyncKey>(
    entries: &[(K, Flow)],
    dir: &Directory,
    now: u32,
    within: u32,
    include_synced: bool,
) -> (Vec<Record>, u64) {
    let mut out = Vec::new();
    let mut synced = 0;
    let replies: std::collections::HashMap<K, u32> = entries
        .iter()
        .filter(|(_, f)| f.direction == REPLY)
        .filter_map(|(k, f)| Some((k.forward_of_reply(f, dir)?, f.seq)))
        .collect();
    for (key, flow) in entries {
        if flow.direction != FORWARD {
            continue;
        }
        if flow.flags & FLOW_F_SYNCED != 0 {
            synced += 1;
            if !include_synced {
                continue;
            }
        }
        // Signed: a flow the data plane stamped a tick after `now` (its
        // clock runs ahead) is 0 ticks old. Unsigned, it was 2^32 − 1 ticks
        // old: the bulk copy sent it with an age of u32::MAX ms, and the
        // peer inserted it expired — a miss for its next packet.
        let age = idle_ticks(flow.seen, now);
        if flow.state != STATE_ESTABLISHED || age > within {
            continue;
        }
        let ev = SyncEventOf {
            key: *key,
            backend_id: flow.backend_id,
            service_id: flow.service_id,
            seq: flow.seq,
            reply_seq: replies.get(key).copied().unwrap_or(0),
            kind: lb_common::sync::SYNC_EVENT_ESTABLISHED,
            // record_of drops synced entries' events; the bulk copy wants them.
            flags: flow.flags & !FLOW_F_SYNCED,
            nat: u8::from(flow.vip != 0),
            _pad0: 0,
            _pad1: 0,
        };
        if let Some(mut r) = record_of_event(dir, &ev) {
            r.age_ms = u32::try_from(u64::from(age) * TICK_NS / 1_000_000).unwrap_or(u32::MAX);
            out.push(r);
        }
    }
    (out, synced)
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Resolves once the bulk copy at start is over: `true` if every peer
/// answered, `false` if `bulk-timeout` passed first.
pub struct Bulk(pub tokio::sync::oneshot::Receiver<bool>);

/// Opens the socket, switches the data plane's events on and starts the
/// sync thread.
pub fn start(cfg: &config::Sync, mut maps: SyncMaps) -> anyhow::Result<(Stats, Bulk)> {
    let socket = UdpSocket::bind(cfg.listen)
        .with_context(|| format!("[sync] listen: binding UDP {}", cfg.listen))?;
    socket
        .set_read_timeout(Some(Duration::from_millis(2)))
        .context("sync socket")?;
    // A peer's bulk copy comes in bursts of 64 pages (90 KiB): room for
    // several, whatever the host's default (best effort: capped by
    // net.core.rmem_max).
    if let Err(e) = rustix::net::sockopt::set_socket_recv_buffer_size(&socket, RECV_BUFFER) {
        debug!("sync socket: receive buffer: {e}");
    }
    maps.switch(true).context("switching flow events on")?;
    let stats = Stats::new(cfg.listen, &cfg.peers);
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let mut syncer = Syncer {
        key: Key::new(cfg.key.expose().as_bytes()),
        sealer: Sealer::new(
            Key::new(cfg.key.expose().as_bytes()),
            u32::from(*cfg.listen.ip()),
            unix_ms(),
        ),
        guard: ReplayGuard::default(),
        peers: cfg.peers.clone(),
        socket,
        dir: maps.directory(),
        maps,
        stats: stats.clone(),
        bulk: BulkCopy {
            deadline: Instant::now() + cfg.bulk_timeout,
            answered: BTreeSet::new(),
            asked: None,
            done: Some(done_tx),
        },
    };
    std::thread::Builder::new()
        .name("lb-sync".into())
        .spawn(move || syncer.run())
        .context("starting the sync thread")?;
    info!(
        "sync: listening on {} for peers {}",
        cfg.listen,
        cfg.peers
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok((stats, Bulk(done_rx)))
}

struct BulkCopy {
    deadline: Instant,
    answered: BTreeSet<SocketAddrV4>,
    asked: Option<Instant>,
    done: Option<tokio::sync::oneshot::Sender<bool>>,
}

struct Syncer {
    key: Key,
    sealer: Sealer,
    guard: ReplayGuard,
    peers: Vec<SocketAddrV4>,
    socket: UdpSocket,
    maps: SyncMaps,
    dir: Directory,
    stats: Stats,
    bulk: BulkCopy,
}

impl Syncer {
    fn run(&mut self) {
        let mut buf = vec![0u8; 65_536];
        let mut last_dir = Instant::now();
        let mut last_refresh = Instant::now();
        loop {
            let batch_end = Instant::now() + BATCH;
            while Instant::now() < batch_end {
                match self.socket.recv_from(&mut buf) {
                    Ok((n, SocketAddr::V4(from))) => self.receive(&buf[..n], from),
                    Ok(_) => {}
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(e) => {
                        debug!("sync: receiving: {e}");
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
            }
            if last_dir.elapsed() >= DIRECTORY_REFRESH {
                self.dir = self.maps.directory();
                let lost = self.maps.lost();
                self.stats.with(|s| s.events_lost = lost);
                last_dir = Instant::now();
            }
            let events = self.maps.drain();
            let records: Vec<Record> = events
                .iter()
                .filter_map(|e| record_of(&self.dir, e))
                .collect();
            self.send_all(Kind::Flows, &records);
            let period = self.maps.refresh_period();
            if last_refresh.elapsed() >= period {
                last_refresh = Instant::now();
                let within = ticks(u64::try_from(period.as_nanos()).unwrap_or(u64::MAX)) + 1;
                let now = crate::dataplane::sweep::now_ticks();
                let (active, synced) = active_records(&self.maps, &self.dir, now, within, false);
                self.stats.with(|s| s.synced_flows = synced);
                self.send_all(Kind::Flows, &active);
            }
            self.bulk_step();
        }
    }

    /// Asks the peers that have not answered yet, until they all did or
    /// the time is up.
    fn bulk_step(&mut self) {
        if self.bulk.done.is_none() {
            return;
        }
        let all = self.peers.iter().all(|p| self.bulk.answered.contains(p));
        if all || Instant::now() >= self.bulk.deadline {
            let status = if all { "done" } else { "timed out" };
            if all {
                info!("sync: bulk copy done: every peer sent its established flows");
            } else {
                let missing: Vec<String> = self
                    .peers
                    .iter()
                    .filter(|p| !self.bulk.answered.contains(p))
                    .map(ToString::to_string)
                    .collect();
                warn!(
                    "sync: no bulk copy from {} within bulk-timeout: going on without their flows",
                    missing.join(", ")
                );
            }
            self.stats.with(|s| s.bulk = status.into());
            if let Some(done) = self.bulk.done.take() {
                let _ = done.send(all);
            }
            return;
        }
        if self.bulk.asked.is_none_or(|t| t.elapsed() >= BULK_RETRY) {
            self.bulk.asked = Some(Instant::now());
            for peer in self.peers.clone() {
                if !self.bulk.answered.contains(&peer) {
                    let data = self.sealer.seal(Kind::BulkRequest, &[], unix_ms());
                    self.send(peer, &data);
                }
            }
        }
    }

    fn send(&self, peer: SocketAddrV4, data: &[u8]) {
        if let Err(e) = self.socket.send_to(data, peer) {
            debug!("sync: sending to {peer}: {e}");
        }
    }

    /// `records` to every peer, in as many messages as they take.
    fn send_all(&mut self, kind: Kind, records: &[Record]) {
        for chunk in wire::batches(records) {
            let data = self.sealer.seal(kind, &chunk, unix_ms());
            for peer in self.peers.clone() {
                self.send(peer, &data);
            }
            self.stats.with(|s| {
                for p in s.peers.values_mut() {
                    p.status.flows_sent += chunk.len() as u64;
                }
            });
        }
    }

    /// The established flows here, in pages, to `peer` (its bulk request).
    fn send_bulk(&mut self, peer: SocketAddrV4) {
        let now = crate::dataplane::sweep::now_ticks();
        let (records, _) = active_records(&self.maps, &self.dir, now, u32::MAX, true);
        let pages = wire::batches(&records);
        info!("sync: bulk copy of {} flows to {peer}", records.len());
        for (i, page) in pages.iter().enumerate() {
            let data = self
                .sealer
                .seal(Kind::BulkPage { last: false }, page, unix_ms());
            self.send(peer, &data);
            // Paced: a peer's socket buffer takes a burst, not a table.
            if i % 64 == 63 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        let last = self
            .sealer
            .seal(Kind::BulkPage { last: true }, &[], unix_ms());
        self.send(peer, &last);
        self.stats.with(|s| {
            if let Some(p) = s.peers.get_mut(&peer) {
                p.status.flows_sent += records.len() as u64;
            }
        });
    }

    fn receive(&mut self, data: &[u8], from: SocketAddrV4) {
        if !self.peers.contains(&from) {
            self.stats.with(|s| s.reject(from, "not_a_peer"));
            return;
        }
        let msg = match wire::open(&self.key, data) {
            Ok(m) => m,
            Err(r) => {
                self.stats.with(|s| s.reject(from, r.name()));
                return;
            }
        };
        if msg.sender != u32::from(*from.ip()) {
            self.stats.with(|s| s.reject(from, "wrong_sender"));
            return;
        }
        if let Err(r) = self.guard.admit(&msg, unix_ms()) {
            self.stats.with(|s| s.reject(from, r.name()));
            return;
        }
        self.stats.with(|s| {
            if let Some(p) = s.peers.get_mut(&from) {
                p.last = Some(Instant::now());
            }
        });
        match msg.kind {
            Kind::BulkRequest => self.send_bulk(from),
            Kind::Flows | Kind::BulkPage { .. } => {
                let now = crate::dataplane::sweep::now_ticks();
                for r in &msg.records {
                    let applied = match apply(&mut self.maps, &self.dir, r, now) {
                        Ok(a) => a,
                        Err(e) => {
                            warn!("sync: inserting a flow from {from}: {e:#}");
                            continue;
                        }
                    };
                    self.stats.with(|s| {
                        let Some(p) = s.peers.get_mut(&from) else {
                            return;
                        };
                        match applied {
                            Applied::Taken => {
                                p.status.flows_received += 1;
                                if r.event == Event::Established && r.age() == RecordAge::Wrapped {
                                    p.status.wrapped_ages += 1;
                                }
                            }
                            Applied::KeptLocal => p.status.flows_kept_local += 1,
                            Applied::Rejected(why) => {
                                *p.status.rejected.entry(why.name().into()).or_insert(0) += 1
                            }
                        }
                    });
                }
                if msg.kind == (Kind::BulkPage { last: true }) {
                    self.bulk.answered.insert(from);
                    self.stats.with(|s| {
                        if let Some(p) = s.peers.get_mut(&from) {
                            p.status.bulk_copied = true;
                        }
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use lb_common::{BACKEND_F_IN_USE, FlowKey, MODE_DSR, MODE_NAT};

    use super::*;

    fn addr(a: [u8; 4]) -> u32 {
        u32::from_ne_bytes(a)
    }

    /// The service 198.18.0.10:80/tcp (id 0) in `mode`, with one backend
    /// (id 1, 198.19.0.11:80); its key.
    fn one_service(mode: u32) -> (Directory, ServiceKey) {
        let key = ServiceKey {
            vip: addr([198, 18, 0, 10]),
            port: 80u16.to_be(),
            protocol: 6,
            _pad: 0,
        };
        let conf = |_| {
            Some(ServiceConf {
                mode,
                enabled: 1,
                ..ServiceConf::default()
            })
        };
        let backend = |id| {
            (id == 1).then_some(Backend {
                addr: addr([198, 19, 0, 11]),
                port: 80u16.to_be(),
                flags: BACKEND_F_IN_USE,
                service_id: 0,
                _pad: 0,
            })
        };
        (
            Directory::build([(ServiceName::of(&key), 0)], conf, backend, |_| None),
            key,
        )
    }

    /// The forward key of the client 198.18.1.2:`sport`'s flow to `service`.
    fn client_key(service: &ServiceKey, sport: u16) -> FlowKey {
        FlowKey {
            saddr: addr([198, 18, 1, 2]),
            daddr: service.vip,
            sport: sport.to_be(),
            dport: service.port,
            protocol: 6,
            ..FlowKey::default()
        }
    }

    /// A NAT flow's events become records; a full-NAT flow's (its end, its
    /// refresh), a PROXY flow's and a synced flow's are not sent.
    #[test]
    fn full_nat_proxy_and_synced_flows_are_not_sent() {
        let (dir, key) = one_service(MODE_NAT);
        let event = |flags| SyncEvent {
            key: client_key(&key, 40000),
            backend_id: 1,
            service_id: 0,
            kind: lb_common::sync::SYNC_EVENT_ENDED,
            flags,
            nat: 1,
            ..SyncEvent::default()
        };
        let of = |flags| record_of(&dir, &FlowEvent::V4(event(flags)));
        assert!(of(0).is_some());
        assert!(of(FLOW_F_FULL_NAT).is_none());
        assert!(of(FLOW_F_SYNCED).is_none());
        assert!(of(FLOW_F_PROXY).is_none());
    }

    /// The data plane's clock runs up to two jiffies ahead of the agent's,
    /// so near a tick boundary a flow's `seen` is the tick after the
    /// agent's `now`. Such a flow is as fresh as can be: the bulk copy and
    /// the refresh send it with age 0. (They sent it with u32::MAX ms, and
    /// the peer inserted it expired: a failback's flows broke.)
    #[test]
    fn a_flow_seen_a_tick_after_now_is_sent_fresh() {
        let (dir, key) = one_service(MODE_DSR);
        let now = 1_000;
        let flow = |seen, flags| Flow {
            backend_id: 1,
            service_id: 0,
            state: STATE_ESTABLISHED,
            seen,
            direction: FORWARD,
            flags,
            ..Flow::default()
        };
        let entries = [
            (client_key(&key, 40001), flow(now + 1, 0)),
            (client_key(&key, 40002), flow(now - 3, 0)),
            (client_key(&key, 40003), flow(now + 1, FLOW_F_SYNCED)),
        ];
        let ages = |records: &[Record]| -> Vec<(u16, u32)> {
            records
                .iter()
                .map(|r| (r.client.port(), r.age_ms))
                .collect()
        };
        let three_ticks = u32::try_from(3 * TICK_NS / 1_000_000).expect("ms");
        // The bulk copy: every established flow, synced ones too.
        let (bulk, synced) = records_of(&entries, &dir, now, u32::MAX, true);
        assert_eq!(synced, 1);
        assert_eq!(ages(&bulk), [(40001, 0), (40002, three_ticks), (40003, 0)]);
        // The refresh: local flows seen within the period.
        let (refresh, _) = records_of(&entries, &dir, now, 2, false);
        assert_eq!(ages(&refresh), [(40001, 0)]);
    }
}
