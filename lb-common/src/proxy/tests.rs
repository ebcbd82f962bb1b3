//! The PROXY v2 rules on real frames: built by etherparse, changed with the
//! module's incremental updates, every checksum recomputed by etherparse and
//! every header parsed by the `ppp` crate (independent implementations).

use super::*;
use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TcpOptionElement, TransportSlice};
use ppp::v2::{Addresses, Command, Header, Protocol};
use proptest::prelude::*;
use std::net::{Ipv4Addr, Ipv6Addr};

const ETH: usize = 14;
const CLIENT4: [u8; 4] = [198, 18, 0, 10];
const VIP4: [u8; 4] = [198, 18, 1, 1];
const BACKEND4: [u8; 4] = [198, 19, 0, 21];
const CLIENT6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10];
const VIP6: [u8; 16] = [0xfd, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const BACKEND6: [u8; 16] = [0xfd, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x21];

/// A TCP segment after NAT (client → backend), with `options`.
struct Seg<'a> {
    v6: bool,
    seq: u32,
    ack: u32,
    syn: bool,
    options: &'a [TcpOptionElement],
    payload: &'a [u8],
}

fn frame(s: &Seg) -> Vec<u8> {
    let eth = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
    let ip = if s.v6 {
        eth.ipv6(CLIENT6, BACKEND6, 64)
    } else {
        eth.ipv4(CLIENT4, BACKEND4, 64)
    };
    let mut tcp = ip.tcp(40000, 8080, s.seq, 64240).ack(s.ack);
    if s.syn {
        tcp = tcp.syn();
    }
    let tcp = tcp.options(s.options).expect("options fit");
    let mut out = Vec::new();
    tcp.write(&mut out, s.payload).expect("frame");
    out
}

/// Where the TCP header starts and how long it is.
fn tcp_at(buf: &[u8]) -> (usize, usize) {
    let v6 = buf[ETH] >> 4 == 6;
    let at = if v6 {
        ETH + 40
    } else {
        ETH + ((buf[ETH] & 0xf) as usize) * 4
    };
    (at, ((buf[at + 12] >> 4) as usize) * 4)
}

fn be32(buf: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]])
}

fn ne16(buf: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([buf[at], buf[at + 1]])
}

/// Sets a 32-bit field (4: seq, 8: ack) of the TCP header as the data plane
/// does: store, then incremental checksum update.
fn set_field(buf: &mut [u8], off: usize, new: u32) {
    let (tcp, _) = tcp_at(buf);
    let old = be32(buf, tcp + off);
    buf[tcp + off..tcp + off + 4].copy_from_slice(&new.to_be_bytes());
    let check = check_after_field(ne16(buf, tcp + 16), old, new);
    buf[tcp + 16..tcp + 18].copy_from_slice(&check.to_ne_bytes());
}

/// Inserts `header` in front of the payload, fixing lengths and checksums
/// incrementally, as the data plane does after moving the headers.
fn insert(buf: &[u8], header: &[u8]) -> Vec<u8> {
    let (tcp, hl) = tcp_at(buf);
    let data = tcp + hl;
    let mut out = Vec::with_capacity(buf.len() + header.len());
    out.extend_from_slice(&buf[..data]);
    out.extend_from_slice(header);
    out.extend_from_slice(&buf[data..]);
    let grow = header.len() as u16;
    let old_tcp_len = (buf.len() - tcp) as u16;
    if buf[ETH] >> 4 == 6 {
        let old = u16::from_be_bytes([out[ETH + 4], out[ETH + 5]]);
        out[ETH + 4..ETH + 6].copy_from_slice(&(old + grow).to_be_bytes());
    } else {
        let old = u16::from_be_bytes([out[ETH + 2], out[ETH + 3]]);
        out[ETH + 2..ETH + 4].copy_from_slice(&(old + grow).to_be_bytes());
        let check = ipv4_check_after_length(ne16(&out, ETH + 10), old, old + grow);
        out[ETH + 10..ETH + 12].copy_from_slice(&check.to_ne_bytes());
    }
    let check = check_after_insert(
        ne16(&out, tcp + 16),
        header,
        old_tcp_len,
        old_tcp_len + grow,
    );
    out[tcp + 16..tcp + 18].copy_from_slice(&check.to_ne_bytes());
    out
}

/// What etherparse reads back, after checking every checksum from scratch.
struct Parsed {
    seq: u32,
    ack: u32,
    options: Vec<TcpOptionElement>,
    payload: Vec<u8>,
}

fn parsed(buf: &[u8]) -> Result<Parsed, TestCaseError> {
    let p = SlicedPacket::from_ethernet(buf).map_err(|e| TestCaseError::fail(format!("{e:?}")))?;
    let Some(TransportSlice::Tcp(t)) = p.transport else {
        return Err(TestCaseError::fail("no tcp"));
    };
    let want = match p.net {
        Some(NetSlice::Ipv4(ip)) => {
            let h = ip.header().to_header();
            prop_assert_eq!(h.header_checksum, h.calc_header_checksum(), "ipv4 check");
            prop_assert_eq!(h.total_len as usize, buf.len() - ETH, "ipv4 length");
            t.to_header().calc_checksum_ipv4(&h, t.payload())
        }
        Some(NetSlice::Ipv6(ip)) => {
            let h = ip.header().to_header();
            prop_assert_eq!(
                h.payload_length as usize,
                buf.len() - ETH - 40,
                "ipv6 length"
            );
            t.to_header().calc_checksum_ipv6(&h, t.payload())
        }
        _ => return Err(TestCaseError::fail("no ip")),
    }
    .expect("checksum");
    prop_assert_eq!(t.checksum(), want, "tcp checksum");
    Ok(Parsed {
        seq: t.sequence_number(),
        ack: t.acknowledgment_number(),
        options: t
            .options_iterator()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TestCaseError::fail(format!("{e:?}")))?,
        payload: t.payload().to_vec(),
    })
}

fn raw4(a: [u8; 4]) -> u32 {
    u32::from_ne_bytes(a)
}

fn raw16(p: u16) -> u16 {
    p.to_be()
}

#[test]
fn the_ipv4_header_is_28_bytes_that_ppp_reads_as_the_client_and_the_vip() {
    let h = header_v4(raw4(CLIENT4), raw16(40000), raw4(VIP4), raw16(80));
    assert_eq!(h.len(), 28);
    assert_eq!(&h[..12], b"\r\n\r\n\0\r\nQUIT\n");
    assert_eq!(h[12..16], [0x21, 0x11, 0x00, 0x0c]);
    let parsed = Header::try_from(&h[..]).expect("ppp parses it");
    assert_eq!(parsed.command, Command::Proxy);
    assert_eq!(parsed.protocol, Protocol::Stream);
    assert_eq!(parsed.len(), 28);
    let Addresses::IPv4(a) = parsed.addresses else {
        panic!("not IPv4: {:?}", parsed.addresses)
    };
    assert_eq!(a.source_address, Ipv4Addr::from(CLIENT4));
    assert_eq!(a.source_port, 40000);
    assert_eq!(a.destination_address, Ipv4Addr::from(VIP4));
    assert_eq!(a.destination_port, 80);
}

#[test]
fn the_ipv6_header_is_52_bytes_that_ppp_reads_as_the_client_and_the_vip() {
    let h = header_v6(&CLIENT6, raw16(40001), &VIP6, raw16(443));
    assert_eq!(h.len(), 52);
    assert_eq!(h[12..16], [0x21, 0x21, 0x00, 0x24]);
    let parsed = Header::try_from(&h[..]).expect("ppp parses it");
    assert_eq!(parsed.len(), 52);
    let Addresses::IPv6(a) = parsed.addresses else {
        panic!("not IPv6: {:?}", parsed.addresses)
    };
    assert_eq!(a.source_address, Ipv6Addr::from(CLIENT6));
    assert_eq!(a.source_port, 40001);
    assert_eq!(a.destination_address, Ipv6Addr::from(VIP6));
    assert_eq!(a.destination_port, 443);
}

/// The data plane builds IPv6's header from `Addr6` words: the same bytes.
#[test]
fn the_ipv6_header_from_raw_words_is_the_same_header() {
    let words = |a: [u8; 16]| -> [u32; 4] {
        core::array::from_fn(|i| {
            u32::from_ne_bytes([a[4 * i], a[4 * i + 1], a[4 * i + 2], a[4 * i + 3]])
        })
    };
    assert_eq!(
        header_v6_raw(&words(CLIENT6), raw16(40001), &words(VIP6), raw16(443)),
        header_v6(&CLIENT6, raw16(40001), &VIP6, raw16(443))
    );
}

#[test]
fn segments_at_the_first_byte_get_the_header_later_ones_shift() {
    let first = 1001;
    use ClientSegment::*;
    assert_eq!(client_segment(1000, 0, true, first), Keep, "SYN");
    assert_eq!(client_segment(1000, 10, true, first), Keep, "SYN with data");
    assert_eq!(
        client_segment(first, 0, false, first),
        Keep,
        "handshake ACK"
    );
    assert_eq!(client_segment(first, 1, false, first), Insert, "first data");
    assert_eq!(
        client_segment(first, 1400, false, first),
        Insert,
        "retransmission"
    );
    assert_eq!(
        client_segment(first + 1, 0, false, first),
        Shift,
        "ACK after data"
    );
    assert_eq!(
        client_segment(first + 500, 900, false, first),
        Shift,
        "overlap of the first"
    );
    // Around the wrap of the sequence space.
    let first = u32::MAX;
    assert_eq!(client_segment(first, 5, false, first), Insert);
    assert_eq!(client_segment(3, 5, false, first), Shift);
    assert_eq!(shifted_seq(u32::MAX - 10, 28), 17);
}

#[test]
fn the_backends_acks_lose_the_header_once_past_it() {
    let first = 1001;
    assert_eq!(client_ack(first, first, 28), first, "nothing sent yet");
    assert_eq!(client_ack(first - 5, first, 28), first - 5, "old ack");
    assert_eq!(
        client_ack(first + 10, first, 28),
        first,
        "inside the header"
    );
    assert_eq!(client_ack(first + 28, first, 28), first, "just the header");
    assert_eq!(client_ack(first + 29, first, 28), first + 1);
    assert_eq!(client_ack(first + 100_000, first, 52), first + 100_000 - 52);
    let first = u32::MAX - 3;
    assert_eq!(client_ack(40, first, 28), 40u32.wrapping_sub(28));
    assert_eq!(client_ack(10, first, 28), first, "inside, across the wrap");
}

/// A client's stream sent as segments of `cuts` (with a retransmission of
/// the first segment, longer than the original, and one of a middle
/// segment) reaches the backend as header + stream: each segment is placed
/// at its (rewritten) sequence number in a buffer, as the backend's TCP
/// reassembles, and every frame's checksums are recomputed.
fn stream_arrives_whole(
    v6: bool,
    stream: &[u8],
    cuts: &[usize],
    isn: u32,
) -> Result<(), TestCaseError> {
    let first = isn.wrapping_add(1);
    let header: Vec<u8> = if v6 {
        header_v6(&CLIENT6, raw16(40000), &VIP6, raw16(80)).to_vec()
    } else {
        header_v4(raw4(CLIENT4), raw16(40000), raw4(VIP4), raw16(80)).to_vec()
    };
    let len = header.len() as u32;
    let mut bounds = vec![0usize];
    bounds.extend(cuts.iter().copied().filter(|&c| c > 0 && c < stream.len()));
    bounds.push(stream.len());
    bounds.sort_unstable();
    bounds.dedup();
    let mut segments: Vec<(usize, usize)> = bounds.windows(2).map(|w| (w[0], w[1])).collect();
    // Retransmissions: the first segment, repacketized up to the second's
    // end, and the last segment again.
    segments.push((0, bounds[bounds.len().min(3) - 1]));
    if let Some(&last) = segments.get(segments.len() - 2) {
        segments.push(last);
    }
    let mut backend = vec![None::<u8>; stream.len() + header.len()];
    for (from, to) in segments {
        let seq = first.wrapping_add(from as u32);
        let buf = frame(&Seg {
            v6,
            seq,
            ack: 7,
            syn: false,
            options: &[],
            payload: &stream[from..to],
        });
        let out = match client_segment(seq, (to - from) as u32, false, first) {
            ClientSegment::Insert => insert(&buf, &header),
            ClientSegment::Shift => {
                let mut b = buf.clone();
                set_field(&mut b, 4, shifted_seq(seq, len));
                b
            }
            ClientSegment::Keep => buf.clone(),
        };
        let p = parsed(&out)?;
        let at = p.seq.wrapping_sub(first) as usize;
        for (i, b) in p.payload.iter().enumerate() {
            let slot = &mut backend[at + i];
            prop_assert!(
                slot.is_none() || *slot == Some(*b),
                "a retransmission disagrees at {}",
                at + i
            );
            *slot = Some(*b);
        }
    }
    let got: Option<Vec<u8>> = backend.into_iter().collect();
    let mut want = header.clone();
    want.extend_from_slice(stream);
    prop_assert_eq!(got, Some(want));
    Ok(())
}

proptest! {
    #[test]
    fn the_backend_reads_the_header_then_the_clients_stream(
        v6 in any::<bool>(),
        stream in proptest::collection::vec(any::<u8>(), 1..3000),
        cuts in proptest::collection::vec(1usize..3000, 0..6),
        isn in any::<u32>(),
    ) {
        stream_arrives_whole(v6, &stream, &cuts, isn)?;
    }

    #[test]
    fn the_backends_acks_shown_to_the_client_keep_a_valid_checksum(
        v6 in any::<bool>(),
        ack in any::<u32>(),
        first in any::<u32>(),
        payload in proptest::collection::vec(any::<u8>(), 0..200),
    ) {
        let mut buf = frame(&Seg { v6, seq: 5, ack, syn: false, options: &[], payload: &payload });
        let len = if v6 { V6_LEN } else { V4_LEN } as u32;
        let shown = client_ack(ack, first, len);
        set_field(&mut buf, 8, shown);
        let p = parsed(&buf)?;
        prop_assert_eq!(p.ack, shown);
        prop_assert_eq!(p.seq, 5);
        prop_assert_eq!(p.payload, payload);
    }

    /// SACK-permitted at every alignment (preceded by 0..3 NOPs), among the
    /// options a Linux SYN carries.
    #[test]
    fn the_syn_loses_sack_permitted_and_keeps_everything_else(
        v6 in any::<bool>(),
        nops in 0usize..4,
        sack_first in any::<bool>(),
        mss in 500u16..9000,
    ) {
        use TcpOptionElement::*;
        let mut options = vec![Noop; nops];
        let rest = [MaximumSegmentSize(mss), Timestamp(77, 0), WindowScale(7)];
        if sack_first {
            options.push(SelectiveAcknowledgementPermitted);
            options.extend(rest.clone());
        } else {
            options.extend(rest.clone());
            options.push(SelectiveAcknowledgementPermitted);
        }
        let mut buf = frame(&Seg { v6, seq: 1000, ack: 0, syn: true, options: &options, payload: &[] });
        let (tcp, hl) = tcp_at(&buf);
        prop_assert!(strip_sack_permitted(&mut buf[tcp..tcp + hl]));
        let p = parsed(&buf)?;
        prop_assert!(!p.options.contains(&SelectiveAcknowledgementPermitted));
        for o in rest {
            prop_assert!(p.options.contains(&o), "{:?} lost", o);
        }
        // A second pass finds nothing to strip.
        prop_assert!(!strip_sack_permitted(&mut buf[tcp..tcp + hl]));
    }

    #[test]
    fn the_syn_acks_mss_leaves_room_for_the_header(
        v6 in any::<bool>(),
        nops in 0usize..4,
        mss in 0u16..=u16::MAX,
    ) {
        use TcpOptionElement::*;
        let mut options = vec![Noop; nops];
        options.extend([SelectiveAcknowledgementPermitted, MaximumSegmentSize(mss), WindowScale(7)]);
        let mut buf = frame(&Seg { v6, seq: 9000, ack: 1001, syn: true, options: &options, payload: &[] });
        let (tcp, hl) = tcp_at(&buf);
        let len = if v6 { V6_LEN } else { V4_LEN } as u16;
        prop_assert!(clamp_mss(&mut buf[tcp..tcp + hl], len));
        let p = parsed(&buf)?;
        prop_assert!(p.options.contains(&MaximumSegmentSize(mss.saturating_sub(len))));
        prop_assert!(p.options.contains(&WindowScale(7)));
    }
}

#[test]
fn options_without_the_kind_or_malformed_are_left_alone() {
    use TcpOptionElement::*;
    let mut buf = frame(&Seg {
        v6: false,
        seq: 1,
        ack: 0,
        syn: true,
        options: &[MaximumSegmentSize(1460), WindowScale(7)],
        payload: &[],
    });
    let (tcp, hl) = tcp_at(&buf);
    let before = buf.clone();
    assert!(!strip_sack_permitted(&mut buf[tcp..tcp + hl]));
    assert_eq!(buf, before);
    // A zero option length stops the walk: nothing is found after it.
    let mut opts = [0u8; 28];
    opts[12] = 7 << 4;
    opts[20] = TCPOPT_MSS;
    opts[21] = 0;
    assert_eq!(find_option(&opts, TCPOPT_MSS), None);
    // An option running past the header is not found either.
    opts[21] = 12;
    assert_eq!(find_option(&opts, TCPOPT_MSS), None);
    // A data offset beyond the buffer reads nothing.
    opts[12] = 15 << 4;
    assert_eq!(find_option(&opts, TCPOPT_MSS), None);
}

#[test]
fn a_first_segment_too_big_for_the_header_is_answered_with_a_smaller_mtu() {
    assert!(fits(1472, 28, 1500));
    assert!(!fits(1473, 28, 1500));
    assert_eq!(announced_mtu(1500, 28), 1472);
    assert_eq!(announced_mtu(1500, 52), 1448);
    assert_eq!(announced_mtu(20, 28), 0);
}
