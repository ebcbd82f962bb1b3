//! The `lb-decap` object: the XDP program backends run (`lb decap
//! attach`). It strips the IPIP or GUE headers of packets an allowed LB
//! sent and passes the inner packet to the kernel, which delivers it to
//! the VIP on the backend's loopback — no ipip or fou module needed.
//!
//! Every frame is passed (XDP_PASS): decapsulated or untouched. The steps,
//! top to bottom, are lb-common's (`lb_common::decap`, where each verdict
//! is documented and `decide` is the reference the tests compare this
//! program with):
//!
//! 1. Ethernet: IPv4, or IPv6 (`decap6`: the same steps over an outer
//!    IPv6 header without extension headers, IP6IP6 or GUE; sources in
//!    `DECAP_SOURCES6`);
//! 2. the outer protocol: IPIP, or UDP to the GUE port;
//! 3. the outer header: plain (no options), whole, not a fragment,
//!    checksum right;
//! 4. GUE: UDP length, variant 0, no control, no options, inner IPv4/IPv6;
//! 5. the security rule: the outer source is an allowed LB address;
//! 6. the inner header: whole and of the announced family;
//! 7. strip: the outer headers go, the Ethernet header moves up with the
//!    inner family's EtherType.
#![no_std]
#![no_main]

// The data plane's frame helpers (bounds-checked pointers, 16-bit stores).
#[allow(dead_code)]
#[path = "../mem.rs"]
mod mem;

use aya_ebpf::{
    bindings::xdp_action,
    helpers::generated::bpf_xdp_adjust_head,
    macros::{map, xdp},
    maps::{Array, HashMap, PerCpuArray},
    programs::XdpContext,
};
use lb_common::{
    decap::{
        DECAP_VERDICT_COUNT, DecapConf, DecapSourceKey, DecapSourceKey6, DecapVerdict,
        ETH_P_IPV6_RAW, GUE_OVERHEAD, GUE6_OVERHEAD, GueHdr, IP6IP6_OVERHEAD, IPIP_OVERHEAD,
        IPV6_HDR_LEN, InnerFamily, Ipv6Start, MAX_DECAP_SOURCES, Tunnel, UdpHdr, gue_verdict,
        inner_v4_verdict, inner_v6_verdict, outer_verdict, outer6_verdict, tunnel_of, tunnel_of6,
    },
    headers::{ETH_P_IPV4_RAW, EthHdr, Ipv4Hdr, UDP_HDR_LEN},
    ipv6::Ipv6Hdr,
};

use mem::header;

/// The GUE port and the half of `DECAP_SOURCES` in force. Written by `lb
/// decap attach`.
#[map]
static DECAP_CONF: Array<DecapConf> = Array::with_max_entries(1, 0);
/// (half, allowed LB address) → 1. Two halves, so an attach with a new
/// `--from` writes the new set beside the old one and switches
/// `DECAP_CONF` once: a packet sees one whole set or the other.
#[map]
static DECAP_SOURCES: HashMap<DecapSourceKey, u32> =
    HashMap::with_max_entries(2 * MAX_DECAP_SOURCES, 0);
/// (half, allowed LB IPv6 address) → 1: `DECAP_SOURCES` for outer IPv6
/// sources, in the same halves (one `DECAP_CONF` switches both).
#[map]
static DECAP_SOURCES6: HashMap<DecapSourceKey6, u32> =
    HashMap::with_max_entries(2 * MAX_DECAP_SOURCES, 0);
/// One counter per [`DecapVerdict`], per CPU.
#[map]
static DECAP_VERDICTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(DECAP_VERDICT_COUNT, 0);

#[xdp]
#[inline(always)]
pub fn lb_decap(ctx: XdpContext) -> u32 {
    let verdict = decap(&ctx);
    if let Some(slot) = DECAP_VERDICTS.get_ptr_mut(verdict as u32) {
        // SAFETY: a per-CPU slot: no other CPU writes it.
        unsafe { *slot += 1 };
    }
    xdp_action::XDP_PASS
}

#[inline(always)]
fn decap(ctx: &XdpContext) -> DecapVerdict {
    use DecapVerdict as V;
    // 1. Ethernet: IPv4, or IPv6.
    let Some(eth) = header::<EthHdr>(ctx, 0) else {
        return V::NotTunnel;
    };
    // SAFETY: bounds-checked by `header`.
    let ether_type = unsafe { (*eth).ether_type };
    if ether_type == ETH_P_IPV6_RAW {
        return decap6(ctx);
    }
    if ether_type != ETH_P_IPV4_RAW {
        return V::NotTunnel;
    }
    // 2. The outer protocol: IPIP, or UDP to the GUE port.
    let Some(ip) = header::<Ipv4Hdr>(ctx, EthHdr::LEN) else {
        return V::OuterMalformed;
    };
    // SAFETY: bounds-checked; a reference, not a copy (a copy of the
    // packed header became an out-of-line memmove).
    let ip = unsafe { &*ip };
    let Some(tunnel) = tunnel_of(ip.protocol) else {
        return V::NotTunnel;
    };
    let Some(conf) = DECAP_CONF.get(0) else {
        return V::NotTunnel;
    };
    if tunnel == Tunnel::Udp && !to_gue_port(ctx, ip, conf.gue_port) {
        return V::NotTunnel;
    }
    // 3. The outer header.
    let frame_ip_len = ctx.data_end() - ctx.data() - EthHdr::LEN;
    if let Some(v) = outer_verdict(ip, frame_ip_len) {
        return v;
    }
    let tot_len = u16::from_be(ip.tot_len) as usize;
    // 4. GUE's headers (at fixed offsets now: no options).
    let (family, overhead) = match tunnel {
        Tunnel::Ipip => (InnerFamily::V4, IPIP_OVERHEAD),
        Tunnel::Udp => match gue_family(ctx, EthHdr::LEN + Ipv4Hdr::LEN, tot_len - Ipv4Hdr::LEN) {
            Ok(f) => (f, GUE_OVERHEAD),
            Err(v) => return v,
        },
    };
    // 5. The security rule: an allowed LB's packets only.
    let key = DecapSourceKey {
        half: conf.half as u32,
        addr: ip.saddr,
    };
    // SAFETY: the value is only tested for presence.
    if unsafe { DECAP_SOURCES.get(&key) }.is_none() {
        return V::SourceNotAllowed;
    }
    // 6. The inner header.
    let room = tot_len.saturating_sub(overhead);
    if let Some(v) = inner_verdict(ctx, family, EthHdr::LEN + overhead, room) {
        return v;
    }
    // 7. Strip.
    if !strip(ctx, overhead, family.ether_type_raw()) {
        // Not reached: the frame holds Ethernet, the outer headers and the
        // inner one (step 6), so moving its start cannot fail. Counted as
        // what the frame then is: untouched, its inner packet unreadable.
        return V::InnerTruncated;
    }
    match (tunnel, family) {
        (Tunnel::Ipip, _) => V::DecapIpip,
        (Tunnel::Udp, InnerFamily::V4) => V::DecapGue,
        (Tunnel::Udp, InnerFamily::V6) => V::DecapGueV6,
    }
}

/// The steps for an IPv6 frame (`lb_common::decap::decide6` is their
/// reference): the outer fixed header's next header IP6IP6 or UDP to the
/// GUE port, no extension headers (the LB sends none).
#[inline(always)]
fn decap6(ctx: &XdpContext) -> DecapVerdict {
    use DecapVerdict as V;
    // 2. The outer next header.
    let Some(ip) = header::<Ipv6Hdr>(ctx, EthHdr::LEN) else {
        return V::OuterMalformed;
    };
    // SAFETY: bounds-checked; a reference, not a copy.
    let ip = unsafe { &*ip };
    let Some(tunnel) = tunnel_of6(ip.next_header) else {
        return V::NotTunnel;
    };
    let Some(conf) = DECAP_CONF.get(0) else {
        return V::NotTunnel;
    };
    let l4 = EthHdr::LEN + IPV6_HDR_LEN;
    if tunnel == Tunnel::Udp {
        match header::<UdpHdr>(ctx, l4) {
            // SAFETY: bounds-checked.
            Some(udp) if unsafe { (*udp).dest } == conf.gue_port => {}
            _ => return V::NotTunnel,
        }
    }
    // 3. The outer header.
    let frame_ip_len = ctx.data_end() - ctx.data() - EthHdr::LEN;
    if let Some(v) = outer6_verdict(ip, frame_ip_len) {
        return v;
    }
    let payload = u16::from_be(ip.payload_len) as usize;
    // 4. GUE's headers.
    let (family, overhead) = match tunnel {
        Tunnel::Ipip => (InnerFamily::V6, IP6IP6_OVERHEAD),
        Tunnel::Udp => match gue_family(ctx, l4, payload) {
            Ok(f) => (f, GUE6_OVERHEAD),
            Err(v) => return v,
        },
    };
    // 5. The security rule.
    let mut key = DecapSourceKey6 {
        half: conf.half as u32,
        addr: [0; 4],
    };
    // SAFETY: both point at 16 bytes, 2-byte aligned.
    unsafe { lb_common::ipv6::copy_addr(&raw mut key.addr, &raw const ip.saddr) };
    // SAFETY: the value is only tested for presence.
    if unsafe { DECAP_SOURCES6.get(&key) }.is_none() {
        return V::SourceNotAllowed;
    }
    // 6. The inner header.
    let room = (IPV6_HDR_LEN + payload).saturating_sub(overhead);
    if let Some(v) = inner_verdict(ctx, family, EthHdr::LEN + overhead, room) {
        return v;
    }
    // 7. Strip.
    if !strip(ctx, overhead, family.ether_type_raw()) {
        return V::InnerTruncated;
    }
    match tunnel {
        Tunnel::Ipip => V::DecapIp6ip6,
        Tunnel::Udp => V::DecapGue6,
    }
}

/// Step 4 for GUE, either outer family: the UDP and GUE headers at `l4`
/// (fixed offsets: the outer header has no options or extension headers)
/// in an outer payload of `ip_payload` bytes; the inner family, or the
/// verdict that passes the frame.
#[inline(always)]
fn gue_family(ctx: &XdpContext, l4: usize, ip_payload: usize) -> Result<InnerFamily, DecapVerdict> {
    let (Some(udp), Some(gue)) = (
        header::<UdpHdr>(ctx, l4),
        header::<GueHdr>(ctx, l4 + UDP_HDR_LEN),
    ) else {
        return Err(DecapVerdict::GueTruncated);
    };
    // SAFETY: both bounds-checked.
    gue_verdict(unsafe { &*udp }, unsafe { &*gue }, ip_payload)
}

/// Step 2 for UDP: a datagram's first (or only) fragment whose UDP header
/// is whole and goes to the GUE port. The header follows any options.
#[inline(always)]
fn to_gue_port(ctx: &XdpContext, ip: &Ipv4Hdr, gue_port: u16) -> bool {
    let hlen = ip.header_len();
    if ip.is_later_fragment() || hlen < Ipv4Hdr::LEN {
        return false;
    }
    match header::<UdpHdr>(ctx, EthHdr::LEN + hlen) {
        // SAFETY: bounds-checked.
        Some(udp) => (unsafe { (*udp).dest }) == gue_port,
        None => false,
    }
}

/// Step 6: the inner header at `offset`, with `room` bytes of the outer
/// packet left for it.
#[inline(always)]
fn inner_verdict(
    ctx: &XdpContext,
    family: InnerFamily,
    offset: usize,
    room: usize,
) -> Option<DecapVerdict> {
    match family {
        InnerFamily::V4 => match header::<Ipv4Hdr>(ctx, offset) {
            // SAFETY: bounds-checked.
            Some(h) if room >= Ipv4Hdr::LEN => inner_v4_verdict(unsafe { &*h }, room),
            _ => Some(DecapVerdict::InnerTruncated),
        },
        InnerFamily::V6 => match (
            header::<Ipv6Start>(ctx, offset),
            header::<[u8; IPV6_HDR_LEN]>(ctx, offset),
        ) {
            // SAFETY: bounds-checked.
            (Some(h), Some(_)) if room >= IPV6_HDR_LEN => inner_v6_verdict(unsafe { &*h }, room),
            _ => Some(DecapVerdict::InnerTruncated),
        },
    }
}

/// Step 7: removes `overhead` bytes after the Ethernet header and writes
/// the Ethernet header back in front of the inner packet, its addresses
/// kept and its EtherType `ether_type`. False if the frame's start could
/// not be moved (then nothing changed).
#[inline(always)]
fn strip(ctx: &XdpContext, overhead: usize, ether_type: u16) -> bool {
    const WORDS: usize = EthHdr::LEN / 2;
    let Some(old) = header::<[u16; WORDS]>(ctx, 0) else {
        return false;
    };
    // The MACs, word by word (an array copy became an out-of-line memcpy).
    let mut eth = [0u16; WORDS];
    for (i, w) in eth.iter_mut().enumerate().take(WORDS - 1) {
        // SAFETY: bounds-checked, 2-byte aligned words.
        *w = unsafe { core::ptr::read_volatile(old.cast::<u16>().add(i)) };
    }
    eth[WORDS - 1] = ether_type;
    // SAFETY: the helper checks the new start against the frame's bounds.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, overhead as i32) } != 0 {
        return false;
    }
    let Some(new) = header::<[u16; WORDS]>(ctx, 0) else {
        return false;
    };
    for (i, w) in eth.iter().enumerate() {
        // SAFETY: bounds-checked after the move, 2-byte aligned words.
        unsafe { core::ptr::write_volatile(new.cast::<u16>().add(i), *w) };
    }
    true
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
