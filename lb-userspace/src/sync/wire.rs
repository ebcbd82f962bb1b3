//! The sync messages between LBs, on the wire (UDP, one message a
//! datagram): pure, no I/O. docs/architecture.md, "Flow sync", has the
//! layout and the reasoning.
//!
//! ```text
//! header (44 bytes, big endian)
//!   magic "LBSY" | version 1 | kind | flags | family (0 IPv4, 6 IPv6)
//!   sender id (u32) | sender epoch (u64, ms) | sequence (u64)
//!   sent at (u64, Unix ms) | count (u16) | 0 (u16) | 0 (u32)
//! count × record (36 bytes IPv4, 72 bytes IPv6: addresses of 4 or 16)
//!   client addr, port | VIP, port | protocol | event | state | flags
//!   backend addr, port | 0 (u16) | age (ms, u32) | seq | reply seq
//! tag: HMAC-SHA256 (32 bytes) over everything before it
//! ```
//!
//! A record names its service (VIP, port, protocol) and backend (address,
//! port) by address, never by id: ids are each LB's own. A message's
//! records are of one family, the header's: an IPv6 flow's record is the
//! IPv4 one with 16-byte addresses. The family byte was 0 in every message
//! before IPv6 flows were synced, so an IPv4 message is what it was, and a
//! receiver that predates it refuses an IPv6 message as `truncated` (its
//! length is not count × 36). Decoding checks, in order: the magic, the
//! version, the family (malformed), the length (truncated), the tag (with
//! the shared key, in constant time), then the sender's (epoch, sequence)
//! against replay and the send time against a window ([`ReplayGuard`]).
//! Each failure is its own [`Reject`] reason, counted by the agent.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
};

use ring::hmac;

pub const MAGIC: [u8; 4] = *b"LBSY";
pub const VERSION: u8 = 1;
pub const HEADER_LEN: usize = 44;
pub const TAG_LEN: usize = 32;
/// Largest message: header, records, tag (either family's).
pub const MAX_MESSAGE: usize =
    HEADER_LEN + Family::V4.max_records() * Family::V4.record_len() + TAG_LEN;
// With its IP and UDP headers, in one 1500-byte Ethernet frame (the sync
// socket is IPv4: 28 bytes of headers).
const _: () = assert!(MAX_MESSAGE + 28 <= 1500);
const _: () = assert!(
    HEADER_LEN + Family::V6.max_records() * Family::V6.record_len() + TAG_LEN <= MAX_MESSAGE
);
/// A message sent longer ago (or further ahead) than this is stale: the
/// clocks of the LBs must agree within it (NTP does far better).
pub const WINDOW_MS: u64 = 30_000;
pub use crate::config::MIN_KEY_LEN;

/// The address family of a message's records (header byte 7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// A record's family: its client's (a record's three addresses are of
    /// one family, as its service's VIP and backends are).
    pub fn of(r: &Record) -> Family {
        if r.client.is_ipv4() {
            Family::V4
        } else {
            Family::V6
        }
    }

    const fn code(self) -> u8 {
        match self {
            Family::V4 => 0,
            Family::V6 => 6,
        }
    }

    fn from_code(code: u8) -> Option<Family> {
        match code {
            0 => Some(Family::V4),
            6 => Some(Family::V6),
            _ => None,
        }
    }

    /// Bytes of an address in a record.
    const fn addr_len(self) -> usize {
        match self {
            Family::V4 => 4,
            Family::V6 => 16,
        }
    }

    /// Bytes of a record: three endpoints (address, port) and 18 bytes.
    pub const fn record_len(self) -> usize {
        3 * (self.addr_len() + 2) + 18
    }

    /// Records per message: a message fits one 1500-byte Ethernet frame
    /// (IP and UDP headers included): 38 IPv4 records, 19 IPv6 ones.
    pub const fn max_records(self) -> usize {
        match self {
            Family::V4 => 38,
            Family::V6 => 19,
        }
    }
}

/// `records` as the messages that carry them: grouped by family (IPv4's
/// first), at most a message's worth each, in their order otherwise.
pub fn batches(records: &[Record]) -> Vec<Vec<Record>> {
    let mut out = Vec::new();
    for family in [Family::V4, Family::V6] {
        let of: Vec<Record> = records
            .iter()
            .filter(|r| Family::of(r) == family)
            .copied()
            .collect();
        out.extend(of.chunks(family.max_records()).map(<[Record]>::to_vec));
    }
    out
}

/// What a message carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Flow events as they happen, and refreshes of active flows.
    Flows,
    /// "Send me your established flows": a starting LB's bulk copy.
    BulkRequest,
    /// A page of the answer to a bulk request; `last` on the final page.
    BulkPage { last: bool },
}

impl Kind {
    fn code(self) -> (u8, u8) {
        match self {
            Kind::Flows => (1, 0),
            Kind::BulkRequest => (2, 0),
            Kind::BulkPage { last } => (3, u8::from(last)),
        }
    }

    fn of(code: u8, flags: u8) -> Option<Kind> {
        match code {
            1 => Some(Kind::Flows),
            2 => Some(Kind::BulkRequest),
            3 => Some(Kind::BulkPage {
                last: flags & 1 != 0,
            }),
            _ => None,
        }
    }
}

/// A record's event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The flow is established on the sender (new, a refresh of an active
    /// flow, or a bulk copy's).
    Established,
    /// The flow ended on the sender.
    Ended,
}

/// One flow, as LBs name it to each other. Its three endpoints are of one
/// family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    pub event: Event,
    pub client: SocketAddr,
    /// The service's VIP and port.
    pub vip: SocketAddr,
    /// IP protocol (6 TCP, 17 UDP).
    pub protocol: u8,
    /// The flow was closing (FIN or RST seen) on the sender.
    pub closing: bool,
    /// NAT: the flow has a reply translation.
    pub nat: bool,
    pub backend: SocketAddr,
    /// How long ago the sender last saw a packet of the flow, in ms.
    pub age_ms: u32,
    /// The client's highest TCP sequence number the sender saw.
    pub seq: u32,
    /// NAT: the backend's (0: unknown).
    pub reply_seq: u32,
}

/// The age an older sender (before 2026-12-07's fix) gave a flow its data
/// plane had stamped a tick after the agent's clock: it read the age
/// unsigned, 2^32 − 1 ticks, about 4.6 × 10^12 ms, which its
/// `u32::try_from(…).unwrap_or(u32::MAX)` saturated to `u32::MAX`. Only
/// saturation gives this value (4 000 000 ticks are 4 294 967 296 ms, one
/// tick fewer 4 294 966 222 ms), so an honest age reaches it only after
/// 49.7 days idle — seven times the longest timeout, a week: no live flow.
pub const WRAPPED_AGE_MS: u32 = u32::MAX;

/// A record's age as the receiver takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordAge {
    /// Ticks since the sender last saw a packet of the flow.
    Ticks(u32),
    /// [`WRAPPED_AGE_MS`]: an older sender's reading of a flow it had just
    /// seen, taken as fresh (0 ticks) rather than inserted expired.
    Wrapped,
}

impl RecordAge {
    /// The age to insert the flow with, in ticks.
    pub fn ticks(self) -> u32 {
        match self {
            RecordAge::Ticks(t) => t,
            RecordAge::Wrapped => 0,
        }
    }
}

impl Record {
    /// [`Record::age_ms`] in ticks (rounded down, as the sender's clock
    /// reads), or [`RecordAge::Wrapped`]. Any other age is taken as it is,
    /// past the flow's timeout too: a record of an expired flow is inserted
    /// expired.
    pub fn age(&self) -> RecordAge {
        if self.age_ms == WRAPPED_AGE_MS {
            return RecordAge::Wrapped;
        }
        RecordAge::Ticks(lb_common::flow::ticks(u64::from(self.age_ms) * 1_000_000))
    }
}

/// A decoded, authenticated message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub kind: Kind,
    pub sender: u32,
    pub epoch: u64,
    pub seq: u64,
    pub sent_ms: u64,
    pub records: Vec<Record>,
}

/// Why a datagram was not accepted; each is counted on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, strum::IntoStaticStr)]
#[strum(serialize_all = "snake_case")]
pub enum Reject {
    /// Shorter or longer than its header says (or than a header).
    Truncated,
    /// Not a sync message (magic) or of an unknown kind.
    Malformed,
    /// Another version of the format.
    WrongVersion,
    /// The tag does not match: another key, or forged or altered.
    BadTag,
    /// An (epoch, sequence) this receiver has already accepted, or older.
    Replayed,
    /// Sent outside the time window ([`WINDOW_MS`]).
    Stale,
}

impl Reject {
    pub const ALL: [Reject; 6] = [
        Reject::Truncated,
        Reject::Malformed,
        Reject::WrongVersion,
        Reject::BadTag,
        Reject::Replayed,
        Reject::Stale,
    ];

    pub fn name(self) -> &'static str {
        self.into()
    }
}

/// The shared key, ready to sign and verify.
#[derive(Clone)]
pub struct Key(hmac::Key);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(***)")
    }
}

impl Key {
    pub fn new(secret: &[u8]) -> Key {
        Key(hmac::Key::new(hmac::HMAC_SHA256, secret))
    }
}

/// A sender's side: its identity and the next sequence number.
#[derive(Debug)]
pub struct Sealer {
    key: Key,
    sender: u32,
    epoch: u64,
    next_seq: u64,
}

impl Sealer {
    /// `epoch`: when this sender started (Unix ms): a restarted sender's
    /// sequence starts again at 1 in a later epoch.
    pub fn new(key: Key, sender: u32, epoch: u64) -> Sealer {
        Sealer {
            key,
            sender,
            epoch,
            next_seq: 1,
        }
    }

    /// One message of `kind` with `records`: those of the first record's
    /// family (IPv4 if none), at most its [`Family::max_records`]; the
    /// rest are left out (callers group them with [`batches`]). Sent at
    /// `now_ms`.
    pub fn seal(&mut self, kind: Kind, records: &[Record], now_ms: u64) -> Vec<u8> {
        let family = records.first().map_or(Family::V4, Family::of);
        let records: Vec<&Record> = records
            .iter()
            .filter(|r| Family::of(r) == family)
            .take(family.max_records())
            .collect();
        let (code, flags) = kind.code();
        let mut out =
            Vec::with_capacity(HEADER_LEN + records.len() * family.record_len() + TAG_LEN);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&[VERSION, code, flags, family.code()]);
        out.extend_from_slice(&self.sender.to_be_bytes());
        out.extend_from_slice(&self.epoch.to_be_bytes());
        out.extend_from_slice(&self.next_seq.to_be_bytes());
        out.extend_from_slice(&now_ms.to_be_bytes());
        // At most the family's max_records: fits.
        out.extend_from_slice(&(records.len() as u16).to_be_bytes());
        out.extend_from_slice(&[0; 6]);
        for r in records {
            put_record(&mut out, r);
        }
        let tag = hmac::sign(&self.key.0, &out);
        out.extend_from_slice(tag.as_ref());
        self.next_seq += 1;
        out
    }
}

fn put_addr(out: &mut Vec<u8>, a: SocketAddr) {
    match a {
        SocketAddr::V4(a) => out.extend_from_slice(&a.ip().octets()),
        SocketAddr::V6(a) => out.extend_from_slice(&a.ip().octets()),
    }
    out.extend_from_slice(&a.port().to_be_bytes());
}

fn put_record(out: &mut Vec<u8>, r: &Record) {
    put_addr(out, r.client);
    put_addr(out, r.vip);
    let event = match r.event {
        Event::Established => 1,
        Event::Ended => 2,
    };
    out.extend_from_slice(&[r.protocol, event, u8::from(r.closing), u8::from(r.nat)]);
    put_addr(out, r.backend);
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&r.age_ms.to_be_bytes());
    out.extend_from_slice(&r.seq.to_be_bytes());
    out.extend_from_slice(&r.reply_seq.to_be_bytes());
}

/// Big-endian reads at fixed offsets of a slice whose length was checked.
struct At<'a>(&'a [u8]);

impl At<'_> {
    fn bytes<const N: usize>(&self, at: usize) -> [u8; N] {
        let mut b = [0; N];
        b.copy_from_slice(&self.0[at..at + N]);
        b
    }
    fn u16(&self, at: usize) -> u16 {
        u16::from_be_bytes(self.bytes(at))
    }
    fn u32(&self, at: usize) -> u32 {
        u32::from_be_bytes(self.bytes(at))
    }
    fn u64(&self, at: usize) -> u64 {
        u64::from_be_bytes(self.bytes(at))
    }
    /// An endpoint of `family` at `at`: the address, then the port.
    fn addr(&self, family: Family, at: usize) -> SocketAddr {
        match family {
            Family::V4 => {
                SocketAddr::new(Ipv4Addr::from(self.bytes::<4>(at)).into(), self.u16(at + 4))
            }
            Family::V6 => SocketAddr::new(
                Ipv6Addr::from(self.bytes::<16>(at)).into(),
                self.u16(at + 16),
            ),
        }
    }
}

/// Checks a datagram's length, format and tag, and reads it. Replay is
/// the caller's [`ReplayGuard`]'s (it keeps state per sender).
pub fn open(key: &Key, data: &[u8]) -> Result<Message, Reject> {
    if data.len() < HEADER_LEN + TAG_LEN {
        return Err(Reject::Truncated);
    }
    let h = At(&data[..HEADER_LEN]);
    if h.bytes::<4>(0) != MAGIC {
        return Err(Reject::Malformed);
    }
    if h.0[4] != VERSION {
        return Err(Reject::WrongVersion);
    }
    let family = Family::from_code(h.0[7]).ok_or(Reject::Malformed)?;
    let count = usize::from(h.u16(36));
    if data.len() != HEADER_LEN + count * family.record_len() + TAG_LEN {
        return Err(Reject::Truncated);
    }
    let (body, tag) = data.split_at(data.len() - TAG_LEN);
    hmac::verify(&key.0, body, tag).map_err(|_| Reject::BadTag)?;
    let kind = Kind::of(h.0[5], h.0[6]).ok_or(Reject::Malformed)?;
    let records = body[HEADER_LEN..]
        .chunks_exact(family.record_len())
        .map(|chunk| record(family, &At(chunk)))
        .collect::<Option<Vec<_>>>()
        .ok_or(Reject::Malformed)?;
    Ok(Message {
        kind,
        sender: h.u32(8),
        epoch: h.u64(12),
        seq: h.u64(20),
        sent_ms: h.u64(28),
        records,
    })
}

/// A record of `family`: endpoints of `e` = address + port bytes.
fn record(family: Family, r: &At) -> Option<Record> {
    let e = family.addr_len() + 2;
    let flags = 2 * e;
    let event = match r.0[flags + 1] {
        1 => Event::Established,
        2 => Event::Ended,
        _ => return None,
    };
    let tail = 3 * e + 6;
    Some(Record {
        event,
        client: r.addr(family, 0),
        vip: r.addr(family, e),
        protocol: r.0[flags],
        closing: r.0[flags + 2] != 0,
        nat: r.0[flags + 3] != 0,
        backend: r.addr(family, flags + 4),
        age_ms: r.u32(tail),
        seq: r.u32(tail + 4),
        reply_seq: r.u32(tail + 8),
    })
}

/// Sequence numbers a receiver still accepts below the highest it saw from
/// a sender's epoch, each once (UDP may reorder a little).
const REPLAY_WINDOW: u64 = 64;

/// Per sender: the latest epoch and which sequence numbers of it arrived.
#[derive(Debug, Default, Clone, Copy)]
struct Seen {
    epoch: u64,
    highest: u64,
    /// Bit i: `highest - i` arrived.
    bits: u64,
}

/// Replay protection: per sender, its (epoch, sequence) must be new — a
/// later epoch (the sender restarted), or in the current epoch a sequence
/// number above the highest seen or within [`REPLAY_WINDOW`] below it and
/// not seen yet — and the message sent within [`WINDOW_MS`] of now.
/// Only authenticated messages are shown to it (an attacker cannot move a
/// sender's state).
#[derive(Debug, Default)]
pub struct ReplayGuard {
    senders: BTreeMap<u32, Seen>,
}

impl ReplayGuard {
    pub fn admit(&mut self, m: &Message, now_ms: u64) -> Result<(), Reject> {
        if m.sent_ms.abs_diff(now_ms) > WINDOW_MS {
            return Err(Reject::Stale);
        }
        let seen = self.senders.entry(m.sender).or_default();
        if m.epoch > seen.epoch {
            *seen = Seen {
                epoch: m.epoch,
                highest: m.seq,
                bits: 1,
            };
            return Ok(());
        }
        if m.epoch < seen.epoch {
            return Err(Reject::Replayed);
        }
        if m.seq > seen.highest {
            let shift = m.seq - seen.highest;
            seen.bits = if shift >= 64 { 0 } else { seen.bits << shift } | 1;
            seen.highest = m.seq;
            return Ok(());
        }
        let back = seen.highest - m.seq;
        if back >= REPLAY_WINDOW || seen.bits & (1 << back) != 0 {
            return Err(Reject::Replayed);
        }
        seen.bits |= 1 << back;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000_000;

    fn key() -> Key {
        Key::new(b"0123456789abcdef0123456789abcdef")
    }

    fn rec(port: u16) -> Record {
        Record {
            event: Event::Established,
            client: SocketAddr::new(Ipv4Addr::new(198, 18, 0, 10).into(), port),
            vip: SocketAddr::new(Ipv4Addr::new(198, 18, 0, 100).into(), 80),
            protocol: 6,
            closing: false,
            nat: true,
            backend: SocketAddr::new(Ipv4Addr::new(198, 19, 0, 2).into(), 8080),
            age_ms: 1234,
            seq: 0xdead_beef,
            reply_seq: 7,
        }
    }

    #[test]
    fn an_older_senders_wrapped_age_is_fresh_and_any_other_age_stands() {
        let aged = |age_ms| Record { age_ms, ..rec(1) }.age();
        // What the older sender sent for a flow stamped a tick after its
        // clock: 2^32 - 1 ticks in ms, saturated.
        let wrapped = u32::try_from(u64::from(u32::MAX) * lb_common::flow::TICK_NS / 1_000_000)
            .unwrap_or(u32::MAX);
        assert_eq!(aged(wrapped), RecordAge::Wrapped);
        assert_eq!(aged(wrapped).ticks(), 0);
        assert_eq!(aged(0), RecordAge::Ticks(0));
        assert_eq!(aged(95_000), RecordAge::Ticks(88));
        // Past any timeout (a week at most), yet below the wrap: as it is.
        assert_eq!(aged(30 * 86_400_000), RecordAge::Ticks(2_413_988));
        assert_eq!(aged(u32::MAX - 1), RecordAge::Ticks(3_999_999));
    }

    /// A message's worth of `family`'s records from `rec`, every field
    /// varied.
    fn full_message(family: Family, rec: fn(u16) -> Record) -> Vec<Record> {
        (0..family.max_records() as u16)
            .map(|i| Record {
                event: if i % 2 == 0 {
                    Event::Established
                } else {
                    Event::Ended
                },
                closing: i % 3 == 0,
                nat: i % 5 == 0,
                age_ms: u32::from(i) * 1000,
                ..rec(40_000 + i)
            })
            .collect()
    }

    #[test]
    fn round_trip() {
        let mut s = Sealer::new(key(), 42, 1000);
        let records = full_message(Family::V4, rec);
        let data = s.seal(Kind::Flows, &records, NOW);
        assert_eq!(data.len(), MAX_MESSAGE);
        let m = open(&key(), &data).expect("opens");
        assert_eq!(
            m,
            Message {
                kind: Kind::Flows,
                sender: 42,
                epoch: 1000,
                seq: 1,
                sent_ms: NOW,
                records
            }
        );
        let page = s.seal(Kind::BulkPage { last: true }, &[], NOW);
        let m = open(&key(), &page).expect("opens");
        assert_eq!(
            (m.kind, m.seq, m.records.len()),
            (Kind::BulkPage { last: true }, 2, 0)
        );
        let req = s.seal(Kind::BulkRequest, &[rec(1)], NOW);
        assert_eq!(open(&key(), &req).expect("opens").kind, Kind::BulkRequest);
    }

    #[test]
    fn truncated_and_padded_messages_are_rejected() {
        let data = Sealer::new(key(), 1, 1).seal(Kind::Flows, &[rec(1), rec(2)], NOW);
        for len in 0..data.len() {
            assert_eq!(
                open(&key(), &data[..len]),
                Err(Reject::Truncated),
                "{len} bytes"
            );
        }
        let mut longer = data.clone();
        longer.push(0);
        assert_eq!(open(&key(), &longer), Err(Reject::Truncated));
    }

    #[test]
    fn forged_altered_or_foreign_messages_are_rejected() {
        let data = Sealer::new(key(), 1, 1).seal(Kind::Flows, &[rec(1)], NOW);
        // Any bit flipped past the version: the tag no longer matches (or,
        // in the count, the length).
        for byte in 5..data.len() {
            let mut forged = data.clone();
            forged[byte] ^= 0x01;
            let got = open(&key(), &forged);
            // The family byte: 1 is no family.
            let expected = if byte == 7 {
                matches!(got, Err(Reject::Malformed))
            } else {
                matches!(got, Err(Reject::BadTag | Reject::Truncated))
            };
            assert!(expected, "byte {byte}: {got:?}");
        }
        // Another key: a stranger's message, however well formed.
        let stranger = Sealer::new(Key::new(b"another key, as long as the first"), 1, 1).seal(
            Kind::Flows,
            &[rec(1)],
            NOW,
        );
        assert_eq!(open(&key(), &stranger), Err(Reject::BadTag));
        let mut magic = data.clone();
        magic[0] = b'X';
        assert_eq!(open(&key(), &magic), Err(Reject::Malformed));
        let mut version = data.clone();
        version[4] = 2;
        assert_eq!(open(&key(), &version), Err(Reject::WrongVersion));
    }

    #[test]
    fn replays_and_stale_messages_are_rejected() {
        let mut s = Sealer::new(key(), 7, 500);
        let mut guard = ReplayGuard::default();
        let first = open(&key(), &s.seal(Kind::Flows, &[rec(1)], NOW)).expect("opens");
        let second = open(&key(), &s.seal(Kind::Flows, &[rec(2)], NOW)).expect("opens");
        assert_eq!(guard.admit(&first, NOW), Ok(()));
        assert_eq!(guard.admit(&first, NOW), Err(Reject::Replayed));
        assert_eq!(guard.admit(&second, NOW), Ok(()));
        assert_eq!(guard.admit(&second, NOW), Err(Reject::Replayed));
        // Reordered within the window: once.
        let msgs: Vec<Message> = (0..5)
            .map(|_| open(&key(), &s.seal(Kind::Flows, &[], NOW)).expect("opens"))
            .collect();
        assert_eq!(guard.admit(&msgs[4], NOW), Ok(()));
        assert_eq!(guard.admit(&msgs[2], NOW), Ok(()));
        assert_eq!(guard.admit(&msgs[2], NOW), Err(Reject::Replayed));
        // Far behind the highest: refused even if never seen.
        let mut old = msgs[0].clone();
        old.seq = msgs[4].seq + 100;
        assert_eq!(guard.admit(&old, NOW), Ok(()));
        assert_eq!(guard.admit(&msgs[0], NOW), Err(Reject::Replayed));
        // A restarted sender (later epoch) starts over; its old epoch is over.
        let restarted = open(
            &key(),
            &Sealer::new(key(), 7, 501).seal(Kind::Flows, &[], NOW),
        )
        .expect("opens");
        assert_eq!(guard.admit(&restarted, NOW), Ok(()));
        let mut previous_epoch = msgs[1].clone();
        previous_epoch.seq = 10_000;
        assert_eq!(guard.admit(&previous_epoch, NOW), Err(Reject::Replayed));
        // Another sender has its own sequence.
        let other = open(
            &key(),
            &Sealer::new(key(), 8, 1).seal(Kind::Flows, &[], NOW),
        )
        .expect("opens");
        assert_eq!(guard.admit(&other, NOW), Ok(()));
        // Outside the time window, either way: stale.
        let late = open(
            &key(),
            &Sealer::new(key(), 9, 1).seal(Kind::Flows, &[], NOW - WINDOW_MS - 1),
        )
        .expect("opens");
        assert_eq!(guard.admit(&late, NOW), Err(Reject::Stale));
        let early = open(
            &key(),
            &Sealer::new(key(), 9, 1).seal(Kind::Flows, &[], NOW + WINDOW_MS + 1),
        )
        .expect("opens");
        assert_eq!(guard.admit(&early, NOW), Err(Reject::Stale));
    }

    #[test]
    fn a_record_with_an_unknown_event_is_malformed() {
        let mut s = Sealer::new(key(), 1, 1);
        let data = s.seal(Kind::Flows, &[rec(1)], NOW);
        // Re-sign an altered body: authenticated, yet not a record we know.
        let mut body = data[..data.len() - TAG_LEN].to_vec();
        body[HEADER_LEN + 13] = 9;
        let tag = hmac::sign(&key().0, &body);
        body.extend_from_slice(tag.as_ref());
        assert_eq!(open(&key(), &body), Err(Reject::Malformed));
    }

    /// An IPv6 flow's record: the same flow over 2001:db8 addresses.
    fn rec6(port: u16) -> Record {
        Record {
            client: SocketAddr::new("2001:db8:18:1::2".parse::<Ipv6Addr>().unwrap().into(), port),
            vip: "[2001:db8:18::10]:80".parse().unwrap(),
            backend: "[2001:db8:19::11]:8080".parse().unwrap(),
            ..rec(port)
        }
    }

    /// IPv6 records go 19 to a message (72 bytes each), in a message whose
    /// family byte is 6, and come back whole; an IPv4 message is what it
    /// was before IPv6 (family byte 0, 36-byte records).
    #[test]
    fn ipv6_records_round_trip_in_messages_of_their_own() {
        let mut s = Sealer::new(key(), 42, 1000);
        let records = full_message(Family::V6, rec6);
        let data = s.seal(Kind::Flows, &records, NOW);
        assert_eq!(data.len(), HEADER_LEN + 19 * 72 + TAG_LEN);
        assert!(data.len() <= MAX_MESSAGE);
        assert_eq!(data[7], 6, "the family byte");
        let m = open(&key(), &data).expect("opens");
        assert_eq!(m.records, records);
        let v4 = s.seal(Kind::Flows, &[rec(1)], NOW);
        assert_eq!((v4[7], v4.len()), (0, HEADER_LEN + 36 + TAG_LEN));
        // A message takes the first record's family only.
        let mixed = s.seal(Kind::Flows, &[rec6(1), rec(2), rec6(3)], NOW);
        let m = open(&key(), &mixed).expect("opens");
        assert_eq!(m.records, [rec6(1), rec6(3)]);
        // A receiver from before IPv6 reads an IPv6 message's length as
        // count × 36: not its length, so it is refused (truncated), never
        // misread; here, the family byte set to IPv4 does the same.
        let mut as_v4 = data.clone();
        as_v4[7] = 0;
        assert_eq!(open(&key(), &as_v4), Err(Reject::Truncated));
    }

    /// `batches` groups records by family, a message's worth at most each,
    /// keeping their order within a family.
    #[test]
    fn batches_split_by_family_and_size() {
        let mut records = Vec::new();
        for i in 0..50u16 {
            records.push(rec(i));
            records.push(rec6(i));
        }
        let batches = batches(&records);
        let shape: Vec<(Family, usize)> = batches
            .iter()
            .map(|b| (Family::of(&b[0]), b.len()))
            .collect();
        assert_eq!(
            shape,
            [
                (Family::V4, 38),
                (Family::V4, 12),
                (Family::V6, 19),
                (Family::V6, 19),
                (Family::V6, 12)
            ]
        );
        for b in &batches {
            assert!(b.iter().all(|r| Family::of(r) == Family::of(&b[0])));
        }
        let ports: Vec<u16> = batches[2..]
            .iter()
            .flatten()
            .map(|r| r.client.port())
            .collect();
        assert_eq!(ports, (0..50).collect::<Vec<_>>());
        assert!(super::batches(&[]).is_empty());
    }
}
