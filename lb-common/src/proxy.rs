//! PROXY protocol v2 (HAProxy's `proxy-protocol.txt`, section 2.2) for a
//! NAT flow: the header the data plane puts at the start of the TCP stream
//! toward the backend, and the rules that keep both ends' sequence spaces
//! consistent once the backend's stream is `len` bytes longer than the
//! client's.
//!
//! The rules (docs/architecture.md, "PROXY protocol v2"):
//! - `first` is the client's ISN + 1: the sequence number of the client's
//!   first data byte. The header takes `first .. first + len` in the
//!   backend's view; client byte `s` (s ≥ first) becomes `s + len`.
//! - Client → backend: a segment starting at `first` with payload gets the
//!   header inserted in front of its payload (its seq stays `first`): the
//!   first data segment, and every retransmission of it, even repacketized
//!   longer or shorter (the header is positional, so a retransmission carries
//!   the same header bytes at the same sequence numbers and the backend's TCP
//!   simply sees a duplicate). Any other segment's seq moves by `len`. A
//!   segment at `first` without payload (the handshake's ACK, a FIN or RST
//!   before any data) is kept: the backend has not seen the header either.
//!   No client segment can straddle the boundary: the header occupies no
//!   client sequence numbers, so a segment either starts at `first`
//!   (insert) or wholly after it (shift). A SYN carrying data (TCP Fast
//!   Open) is not given the header (its data would come before it): it is
//!   [`ClientSegment::Keep`]; backends of a PROXY service must not enable
//!   TFO (Linux's default is off).
//! - Backend → client: ack `a` becomes `a - len` once it is past the header;
//!   an ack inside the header (the backend took only part of it) becomes
//!   `first` (nothing of the client's data acknowledged yet).
//! - SACK: blocks in the backend's replies would need the same shift, which
//!   means walking the options of every reply. Instead the client's SYN loses
//!   its SACK-permitted option (overwritten with two NOPs), so the backend
//!   never sends SACK blocks; the flow falls back to plain cumulative ACKs.
//! - Room: the backend's SYN-ACK gets its MSS option lowered by `len`, so a
//!   conforming client never sends a first segment that cannot take the
//!   header within the path's MTU. One that still does not fit is answered
//!   with "fragmentation needed" announcing the MTU less `len`
//!   ([`announced_mtu`]).
//!
//! Checksums are updated incrementally (RFC 1624) with [`crate::checksum`]:
//! the inserted header starts at the payload, which is at an even offset of
//! the TCP segment (the TCP header is a multiple of 4 bytes) and is an even
//! number of bytes long, so every later byte keeps its 16-bit word position:
//! the new checksum is the old one plus the header's words plus the change
//! of the pseudo-header's length.

use crate::checksum::{fold, replace16, replace32};

/// The v2 signature: the first 12 bytes of every v2 header.
pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Version 2, command PROXY.
pub const VERSION_PROXY: u8 = 0x21;
/// Address family INET, transport STREAM.
pub const TCP_OVER_IPV4: u8 = 0x11;
/// Address family INET6, transport STREAM.
pub const TCP_OVER_IPV6: u8 = 0x21;
/// Length of the address block of a TCP over IPv4 header.
pub const V4_ADDRESSES: usize = 12;
/// Length of the address block of a TCP over IPv6 header.
pub const V6_ADDRESSES: usize = 36;
/// Fixed part: signature, version/command, family, length.
pub const FIXED_LEN: usize = 16;
/// Bytes a TCP over IPv4 flow's stream grows by.
pub const V4_LEN: usize = FIXED_LEN + V4_ADDRESSES;
/// Bytes a TCP over IPv6 flow's stream grows by.
pub const V6_LEN: usize = FIXED_LEN + V6_ADDRESSES;

/// TCP option kinds the rules touch.
pub const TCPOPT_EOL: u8 = 0;
pub const TCPOPT_NOP: u8 = 1;
pub const TCPOPT_MSS: u8 = 2;
pub const TCPOPT_SACK_PERMITTED: u8 = 4;

/// Offset of the checksum in a TCP header.
const TCP_CHECK: usize = 16;
/// Length of a TCP header without options.
const TCP_MIN: usize = 20;

/// The 16 fixed bytes before an address block of `addresses` bytes.
const fn fixed(family: u8, addresses: usize) -> [u8; FIXED_LEN] {
    let mut out = [0u8; FIXED_LEN];
    let mut i = 0;
    while i < SIGNATURE.len() {
        out[i] = SIGNATURE[i];
        i += 1;
    }
    out[12] = VERSION_PROXY;
    out[13] = family;
    // `addresses` is 12 or 36: fits a byte; the high byte is 0.
    out[15] = addresses as u8;
    out
}

/// The header of a TCP over IPv4 flow from `client` to `vip`. Addresses and
/// ports are raw (network order as read from packet memory), as everywhere
/// on the packet path; the header carries them in network order.
pub fn header_v4(client: u32, client_port: u16, vip: u32, vip_port: u16) -> [u8; V4_LEN] {
    let mut out = [0u8; V4_LEN];
    out[..FIXED_LEN].copy_from_slice(&fixed(TCP_OVER_IPV4, V4_ADDRESSES));
    out[16..20].copy_from_slice(&client.to_ne_bytes());
    out[20..24].copy_from_slice(&vip.to_ne_bytes());
    out[24..26].copy_from_slice(&client_port.to_ne_bytes());
    out[26..28].copy_from_slice(&vip_port.to_ne_bytes());
    out
}

/// The header of a TCP over IPv6 flow (addresses as they sit in the packet,
/// ports raw).
pub fn header_v6(
    client: &[u8; 16],
    client_port: u16,
    vip: &[u8; 16],
    vip_port: u16,
) -> [u8; V6_LEN] {
    let mut out = [0u8; V6_LEN];
    out[..FIXED_LEN].copy_from_slice(&fixed(TCP_OVER_IPV6, V6_ADDRESSES));
    out[16..32].copy_from_slice(client);
    out[32..48].copy_from_slice(vip);
    out[48..50].copy_from_slice(&client_port.to_ne_bytes());
    out[50..52].copy_from_slice(&vip_port.to_ne_bytes());
    out
}

/// [`header_v6`] from addresses as the packet path holds them (`Addr6`:
/// four raw words, network order in memory) without a byte copy of each.
pub fn header_v6_raw(
    client: &[u32; 4],
    client_port: u16,
    vip: &[u32; 4],
    vip_port: u16,
) -> [u8; V6_LEN] {
    let mut out = [0u8; V6_LEN];
    out[..FIXED_LEN].copy_from_slice(&fixed(TCP_OVER_IPV6, V6_ADDRESSES));
    let mut i = 0;
    while i < 4 {
        let at = 16 + i * 4;
        out[at..at + 4].copy_from_slice(&client[i].to_ne_bytes());
        out[at + 16..at + 20].copy_from_slice(&vip[i].to_ne_bytes());
        i += 1;
    }
    out[48..50].copy_from_slice(&client_port.to_ne_bytes());
    out[50..52].copy_from_slice(&vip_port.to_ne_bytes());
    out
}

/// What happens to a client → backend segment of a PROXY flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientSegment {
    /// Passed with its sequence number unchanged (the SYN, anything at
    /// `first` without payload).
    Keep,
    /// The header goes in front of its payload; seq unchanged.
    Insert,
    /// Its seq moves by the header's length.
    Shift,
}

/// The rule for a client segment with sequence number `seq` (host order),
/// `payload` bytes of data and the SYN flag `syn`, in a flow whose client
/// ISN + 1 is `first`.
pub const fn client_segment(seq: u32, payload: u32, syn: bool, first: u32) -> ClientSegment {
    if syn {
        ClientSegment::Keep
    } else if seq == first {
        if payload == 0 {
            ClientSegment::Keep
        } else {
            ClientSegment::Insert
        }
    } else {
        ClientSegment::Shift
    }
}

/// A shifted client segment's sequence number (host order, wrapping).
pub const fn shifted_seq(seq: u32, len: u32) -> u32 {
    seq.wrapping_add(len)
}

/// The acknowledgement number the client is shown for the backend's `ack`
/// (host order): acks up to `first` are the client's own numbers, acks
/// inside the header show `first`, acks past it lose `len`. Compared in
/// sequence space (wrapping), as TCP does.
pub const fn client_ack(ack: u32, first: u32, len: u32) -> u32 {
    let past = ack.wrapping_sub(first) as i32;
    if past <= 0 {
        ack
    } else if past as u32 <= len {
        first
    } else {
        ack.wrapping_sub(len)
    }
}

/// TCP checksum after a 32-bit field (seq or ack) went from `old` to `new`,
/// both host order.
pub const fn check_after_field(check: u16, old: u32, new: u32) -> u16 {
    replace32(check, old.to_be(), new.to_be())
}

/// TCP checksum after `header` was inserted in front of the payload and the
/// segment's length (the pseudo-header's TCP length) went from `old_len` to
/// `new_len`, host order. `header` must be an even number of bytes.
pub fn check_after_insert(check: u16, header: &[u8], old_len: u16, new_len: u16) -> u16 {
    let mut sum = !replace16(check, old_len.to_be(), new_len.to_be()) as u32;
    let mut words = header.chunks_exact(2);
    for w in &mut words {
        sum += u16::from_ne_bytes([w[0], w[1]]) as u32;
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !fold(sum)
}

/// IPv4 header checksum after the total length went from `old` to `new`
/// (host order).
pub const fn ipv4_check_after_length(check: u16, old: u16, new: u16) -> u16 {
    replace16(check, old.to_be(), new.to_be())
}

/// Offset (from the TCP header's start) of the first option of `kind` in
/// the TCP header `tcp` (options included, its data offset read from it).
/// `None` when absent or when the options are malformed before it.
pub fn find_option(tcp: &[u8], kind: u8) -> Option<usize> {
    let end = tcp_header_len(tcp)?;
    let mut at = TCP_MIN;
    while at < end {
        match tcp[at] {
            TCPOPT_EOL => return None,
            TCPOPT_NOP => at += 1,
            k => {
                let len = *tcp.get(at + 1).filter(|_| at + 1 < end)? as usize;
                if len < 2 || at + len > end {
                    return None;
                }
                if k == kind {
                    return Some(at);
                }
                at += len;
            }
        }
    }
    None
}

/// The data offset of `tcp` in bytes, if the header is that long.
fn tcp_header_len(tcp: &[u8]) -> Option<usize> {
    let len = ((*tcp.get(12)? >> 4) as usize) * 4;
    (len >= TCP_MIN && len <= tcp.len()).then_some(len)
}

/// Writes `new` at `at` in the TCP header `tcp` and updates its checksum
/// word by word (an option may start at an odd offset: each 16-bit word it
/// touches is replaced as a whole).
fn patch(tcp: &mut [u8], at: usize, new: &[u8]) {
    let first = at & !1;
    let last = (at + new.len() + 1) & !1;
    let old: [u8; 8] = {
        let mut o = [0u8; 8];
        o[..last - first].copy_from_slice(&tcp[first..last]);
        o
    };
    tcp[at..at + new.len()].copy_from_slice(new);
    let mut check = u16::from_ne_bytes([tcp[TCP_CHECK], tcp[TCP_CHECK + 1]]);
    let mut w = first;
    while w < last {
        let before = u16::from_ne_bytes([old[w - first], old[w - first + 1]]);
        let after = u16::from_ne_bytes([tcp[w], tcp[w + 1]]);
        check = replace16(check, before, after);
        w += 2;
    }
    tcp[TCP_CHECK..TCP_CHECK + 2].copy_from_slice(&check.to_ne_bytes());
}

/// Overwrites the SYN's SACK-permitted option with two NOPs (checksum
/// updated). Returns whether there was one.
pub fn strip_sack_permitted(tcp: &mut [u8]) -> bool {
    match find_option(tcp, TCPOPT_SACK_PERMITTED) {
        Some(at) if tcp[at + 1] == 2 => {
            patch(tcp, at, &[TCPOPT_NOP, TCPOPT_NOP]);
            true
        }
        _ => false,
    }
}

/// Lowers the SYN-ACK's MSS option by `by` bytes (checksum updated), so the
/// client's segments leave room for the header. Returns whether there was
/// an MSS option (without one the client assumes 536, which has room).
pub fn clamp_mss(tcp: &mut [u8], by: u16) -> bool {
    match find_option(tcp, TCPOPT_MSS) {
        Some(at) if tcp[at + 1] == 4 => {
            let mss = u16::from_be_bytes([tcp[at + 2], tcp[at + 3]]);
            patch(tcp, at + 2, &mss.saturating_sub(by).to_be_bytes());
            true
        }
        _ => false,
    }
}

/// Whether an IP packet of `ip_len` bytes still fits `mtu` once the header
/// (`len` bytes) is inserted.
pub const fn fits(ip_len: u32, len: u32, mtu: u32) -> bool {
    ip_len + len <= mtu
}

/// The MTU a "fragmentation needed" answer to a first segment that does not
/// fit announces: the link's less the header. The client's path MTU
/// discovery then sends its data (and the retransmission of that segment) in
/// segments that take the header; dropping it silently would make the client
/// retransmit the same too-big segment until it gave up. The MSS clamp means
/// only a client ignoring the MSS it was given, or a path whose MTU is below
/// the backend's, gets here.
pub const fn announced_mtu(mtu: u32, len: u32) -> u32 {
    mtu.saturating_sub(len)
}

#[cfg(test)]
mod tests;
