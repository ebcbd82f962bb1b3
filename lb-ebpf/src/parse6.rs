//! IPv6's VIP rules (step 1 for IPv6): the fixed header's validity, the
//! bounded walk over its extension headers, and the verdict of each case
//! that cannot be balanced. The rules of one header are
//! `lb_common::ipv6::step` (host-tested with the pure `walk`, against
//! etherparse); here each header's first 8 bytes are read bounds-checked
//! and handed to it, at most `MAX_EXTENSIONS + 1` times (the loop is
//! unrolled: the verifier sees a fixed number of steps).

use aya_ebpf::programs::XdpContext;
use lb_common::{
    Verdict,
    family::V6,
    headers::{EthHdr, L4Ports, l4_layout},
    ipv6::{Ipv6Hdr, MAX_EXTENSIONS, Step, is_extension, step},
};

use crate::{
    mem::header,
    parse::Packet,
    verdict::{Outcome, drop, pass},
};

/// The VIP rules (`vip_rules`) and, for a packet that passes them, its
/// [`Packet`]: the transport header where the walk ended, its protocol.
#[inline(always)]
pub(crate) fn parse_l4(
    ctx: &XdpContext,
    eth: *mut EthHdr,
    ip: *mut Ipv6Hdr,
) -> Result<Packet<V6>, Outcome> {
    let (l4, protocol) = vip_rules(ctx, ip)?;
    let Some((_, check_off)) = l4_layout(protocol) else {
        return Err(pass(Verdict::PassOtherProtocol));
    };
    let (Some(ports), Some(l4_check)) = (
        header::<L4Ports>(ctx, l4),
        header::<u16>(ctx, l4 + check_off),
    ) else {
        return Err(drop(Verdict::DropTruncatedL4));
    };
    Ok(Packet {
        eth,
        ip,
        ports,
        l4_check,
        l4,
        protocol,
    })
}

/// The VIP rules for an IPv6 packet to a VIP: `Ok` (the transport
/// header's offset and protocol) when it is a TCP/UDP packet the path can
/// balance (its transport header is in the frame), else the verdict of the
/// case:
/// - a bad version or payload length, an extension header cut short, two
///   fragment headers: `DropMalformed`;
/// - more than `MAX_EXTENSIONS` extension headers:
///   `DropIpv6TooManyExtensions`;
/// - a routing header with segments left: `DropIpv6Routing`;
/// - a fragment after the first: `DropFragment` (as IPv4's without its
///   first);
/// - another upper layer (ICMPv6, ESP, AH, no next header, …):
///   `PassOtherProtocol` (the kernel answers an echo to the VIP);
/// - a TCP/UDP header cut short: `DropTruncatedL4`.
#[inline(always)]
pub(crate) fn vip_rules(ctx: &XdpContext, ip: *const Ipv6Hdr) -> Result<(usize, u8), Outcome> {
    // SAFETY: the caller bounds-checked the fixed header.
    let hdr = unsafe { &*ip };
    let frame_ip_len = ctx.data_end() - ctx.data() - EthHdr::LEN;
    if !hdr.is_valid(frame_ip_len) {
        return Err(drop(Verdict::DropMalformed));
    }
    let mut next = hdr.next_header;
    let mut offset = EthHdr::LEN + Ipv6Hdr::LEN;
    let mut fragmented = false;
    for _ in 0..=MAX_EXTENSIONS {
        if !is_extension(next) {
            return upper_layer(ctx, next, offset);
        }
        let Some(head) = header::<[u8; 8]>(ctx, offset) else {
            return Err(drop(Verdict::DropMalformed));
        };
        // SAFETY: bounds-checked by `header`.
        match step(next, unsafe { &*head }) {
            Step::Upper => return upper_layer(ctx, next, offset),
            Step::Routing => return Err(drop(Verdict::DropIpv6Routing)),
            Step::Skip { len, next: n } => {
                // A header longer than the frame (the pure walk's rule).
                offset += len;
                if ctx.data() + offset > ctx.data_end() {
                    return Err(drop(Verdict::DropMalformed));
                }
                next = n;
            }
            Step::Fragment { next: n, fragment } => {
                if fragmented {
                    return Err(drop(Verdict::DropMalformed));
                }
                if fragment.is_later() {
                    return Err(drop(Verdict::DropFragment));
                }
                fragmented = true;
                offset += 8;
                next = n;
            }
        }
    }
    Err(drop(Verdict::DropIpv6TooManyExtensions))
}

/// The walk ended on `protocol` at `offset`: TCP/UDP with its header in
/// the frame, or the verdict.
#[inline(always)]
fn upper_layer(ctx: &XdpContext, protocol: u8, offset: usize) -> Result<(usize, u8), Outcome> {
    let Some((l4_len, _)) = l4_layout(protocol) else {
        return Err(pass(Verdict::PassOtherProtocol));
    };
    if ctx.data() + offset + l4_len > ctx.data_end() {
        return Err(drop(Verdict::DropTruncatedL4));
    }
    Ok((offset, protocol))
}
