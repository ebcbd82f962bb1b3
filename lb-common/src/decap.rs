//! `lb decap`, the decapsulator backends run: the wire formats it accepts
//! (IPIP, GUE variant 0 over UDP, over IPv4; IP6IP6 and GUE over IPv6, the
//! IPv6 services' tunnels), its maps' layouts, its verdicts and the
//! pure checks of each step. The XDP program (lb-ebpf's `lb-decap` object)
//! calls these checks in order; [`decide`] composes the same checks over a
//! byte slice, so the host tests and the kernel tests (which compare the
//! program's verdict with it on every crafted frame) share one reference.
//!
//! The security rule: only a packet from an allowed LB address
//! (`DECAP_SOURCES`, `DECAP_SOURCES6` for IPv6 outer sources) is ever
//! decapsulated. Everything else — not a tunnel,
//! from another source, malformed — is passed untouched, so attaching the
//! decapsulator never makes the host accept a packet it did not accept
//! before; on a kernel without ipip/fou the kernel then drops it (no
//! protocol handler for IPIP, no socket on the GUE port).

use crate::{
    checksum,
    headers::{ETH_P_IPV4_RAW, EthHdr, IPPROTO_UDP, Ipv4Hdr, Ipv4Shape, UDP_HDR_LEN},
    ipv6::{Addr6, Ipv6Hdr},
};

/// IP protocol number of IPv4-in-IPv4 (IPIP), and GUE's inner IPv4.
pub const IPPROTO_IPIP: u8 = 4;
/// IP protocol number of IPv6 (GUE's inner IPv6).
pub const IPPROTO_IPV6: u8 = 41;
/// EtherType of IPv6, raw network order (the frame of a decapsulated
/// inner IPv6 packet).
pub const ETH_P_IPV6_RAW: u16 = 0x86ddu16.to_be();
/// GUE's UDP port unless `--port` says otherwise (the fou default of
/// Katran and the Linux `ip fou` examples).
pub const GUE_DEFAULT_PORT: u16 = 6080;
/// The GUE header of variant 0 without optional fields.
pub const GUE_HDR_LEN: usize = 4;
/// IPIP's overhead: the outer IPv4 header.
pub const IPIP_OVERHEAD: usize = Ipv4Hdr::LEN;
/// GUE's overhead: outer IPv4, UDP and the GUE header.
pub const GUE_OVERHEAD: usize = Ipv4Hdr::LEN + UDP_HDR_LEN + GUE_HDR_LEN;
/// IP6IP6's overhead: the outer IPv6 header (no extension headers).
pub const IP6IP6_OVERHEAD: usize = IPV6_HDR_LEN;
/// GUE's overhead over IPv6: outer IPv6, UDP and the GUE header.
pub const GUE6_OVERHEAD: usize = IPV6_HDR_LEN + UDP_HDR_LEN + GUE_HDR_LEN;
/// Allowed LB addresses per half of `DECAP_SOURCES` (the map holds two
/// halves: the set in force and the one an attach writes).
pub const MAX_DECAP_SOURCES: u32 = 256;
/// IPv6's fixed header.
pub const IPV6_HDR_LEN: usize = 40;

/// A UDP header (raw network-order fields).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UdpHdr {
    pub source: u16,
    pub dest: u16,
    pub len: u16,
    pub check: u16,
}

/// The GUE header, variant 0 (draft-ietf-intarea-gue): byte 0 holds the
/// version (2 bits), the control flag C and the optional fields' length
/// `hlen` in 32-bit words (5 bits); byte 1 the inner protocol (or control
/// type); then 16 bits of flags.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GueHdr {
    pub version_c_hlen: u8,
    pub proto: u8,
    pub flags: u16,
}

impl GueHdr {
    pub const fn version(&self) -> u8 {
        self.version_c_hlen >> 6
    }
    pub const fn control(&self) -> bool {
        self.version_c_hlen & 0x20 != 0
    }
    pub const fn hlen(&self) -> u8 {
        self.version_c_hlen & 0x1f
    }
}

/// The first 8 bytes of an IPv6 header: what the inner IPv6 check reads.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv6Start {
    /// Version (4 bits), traffic class, flow label; raw network order.
    pub vtc_flow: u32,
    pub payload_len: u16,
    pub next_header: u8,
    pub hop_limit: u8,
}

/// `DECAP_CONF`'s one entry: the GUE port and which half of
/// `DECAP_SOURCES` is in force. The agent writes it whole, so a packet sees
/// either the old port and set or the new ones.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DecapConf {
    /// The GUE port, raw network order (compared with the UDP header's).
    pub gue_port: u16,
    /// The half of `DECAP_SOURCES` in force: 0 or 1.
    pub half: u8,
    pub _pad: u8,
}

/// A key of `DECAP_SOURCES`: an allowed LB address in one half of the set.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DecapSourceKey {
    pub half: u32,
    /// The IPv4 address, raw network order.
    pub addr: u32,
}

/// A key of `DECAP_SOURCES6`: an allowed LB IPv6 address in one half of
/// the set (the halves are `DECAP_CONF`'s, shared with IPv4's).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DecapSourceKey6 {
    pub half: u32,
    /// The IPv6 address, as the packet holds it.
    pub addr: Addr6,
}

const _: () = assert!(core::mem::size_of::<DecapSourceKey6>() == 20);
const _: () = assert!(GUE6_OVERHEAD == 52 && IP6IP6_OVERHEAD == 40);
const _: () = assert!(core::mem::size_of::<UdpHdr>() == UDP_HDR_LEN);
const _: () = assert!(core::mem::size_of::<GueHdr>() == GUE_HDR_LEN);
const _: () = assert!(core::mem::size_of::<Ipv6Start>() == 8);
const _: () = assert!(core::mem::size_of::<DecapConf>() == 4);
const _: () = assert!(core::mem::size_of::<DecapSourceKey>() == 8);
const _: () = assert!(GUE_OVERHEAD == 32 && IPIP_OVERHEAD == 20);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), Copy, no implicit padding (size asserts above).
    unsafe impl aya::Pod for super::DecapConf {}
    unsafe impl aya::Pod for super::DecapSourceKey {}
    unsafe impl aya::Pod for super::DecapSourceKey6 {}
}

/// Declares the verdict table once: the enum, its count, every verdict in
/// index order, its name, and whether its packet was decapsulated.
macro_rules! decap_verdicts {
    ($($(#[$doc:meta])* $variant:ident = $index:literal => $name:literal, decapsulated: $d:literal;)*) => {
        /// What `lb decap` did with a frame and why: the index into
        /// `DECAP_VERDICTS` (per CPU). Every verdict but the three
        /// `Decap*` ones passes the frame untouched.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum DecapVerdict {
            $($(#[$doc])* $variant = $index,)*
        }

        /// How many verdicts (counters in `DECAP_VERDICTS`) there are.
        pub const DECAP_VERDICT_COUNT: u32 = [$($index),*].len() as u32;

        impl DecapVerdict {
            /// Every verdict, by counter index.
            pub const ALL: [DecapVerdict; DECAP_VERDICT_COUNT as usize] =
                [$(DecapVerdict::$variant),*];

            /// The verdict's name in `lb decap status`.
            pub const fn name(self) -> &'static str {
                match self {
                    $(DecapVerdict::$variant => $name,)*
                }
            }

            /// The packet's outer headers were stripped.
            pub const fn is_decapsulated(self) -> bool {
                match self {
                    $(DecapVerdict::$variant => $d,)*
                }
            }
        }
    };
}

decap_verdicts! {
    /// Not a tunnel packet: neither IPv4 nor IPv6, not IPIP (IP6IP6) nor
    /// UDP, UDP to another port than GUE's, or a later fragment of a UDP
    /// datagram (no port to look at); over IPv6 also any packet whose fixed
    /// header is followed by an extension header (an LB's tunnel packets
    /// carry none). Passed untouched; the only counter ordinary traffic
    /// adds to.
    NotTunnel = 0 => "not_tunnel", decapsulated: false;
    /// IPIP from an allowed LB: the outer IPv4 header stripped, the inner
    /// IPv4 packet passed to the stack.
    DecapIpip = 1 => "decap_ipip", decapsulated: true;
    /// GUE carrying IPv4 from an allowed LB: outer IPv4, UDP and GUE
    /// stripped.
    DecapGue = 2 => "decap_gue", decapsulated: true;
    /// GUE carrying IPv6 from an allowed LB: stripped, the frame's
    /// EtherType set to IPv6.
    DecapGueV6 = 3 => "decap_gue_v6", decapsulated: true;
    /// A well-formed tunnel packet from a source that is not an allowed LB
    /// address: passed untouched (never decapsulated: an open decapsulator
    /// would let anyone inject spoofed packets to the VIP); the kernel,
    /// without ipip/fou, drops it.
    SourceNotAllowed = 4 => "source_not_allowed", decapsulated: false;
    /// An IPv4 frame to a tunnel protocol whose outer header is short, has
    /// a bad version, IHL, total length or header checksum (IPv6: short,
    /// bad version, a payload length of 0 or beyond the frame): passed
    /// untouched (the kernel's IP input drops it).
    OuterMalformed = 5 => "outer_malformed", decapsulated: false;
    /// IPIP, or UDP to the GUE port, with IPv4 options on the outer header
    /// (an LB never sends them): passed untouched.
    OuterOptions = 6 => "outer_options", decapsulated: false;
    /// A fragment of an outer IPIP packet or the first fragment of a
    /// datagram to the GUE port (the LB sends DF and answers "fragmentation
    /// needed" instead): passed untouched; the kernel reassembles it and
    /// has no handler for it.
    OuterFragment = 7 => "outer_fragment", decapsulated: false;
    /// To the GUE port, but the UDP length or the frame is too short for
    /// UDP + the GUE header, or the UDP length exceeds the IP payload.
    GueTruncated = 8 => "gue_truncated", decapsulated: false;
    /// A GUE control message (C = 1): not ours to answer.
    GueControl = 9 => "gue_control", decapsulated: false;
    /// A GUE version other than 0 (version 1 is GUE's "direct IP" form,
    /// which the LB does not send).
    GueVersion = 10 => "gue_version", decapsulated: false;
    /// GUE with optional fields (hlen ≠ 0) or flags set: the LB sends none.
    GueOptions = 11 => "gue_options", decapsulated: false;
    /// GUE carrying something other than IPv4 (4) or IPv6 (41).
    GueProtocol = 12 => "gue_protocol", decapsulated: false;
    /// From an allowed LB, but the inner IP header is cut short (by the
    /// frame or by the outer total length): passed untouched.
    InnerTruncated = 13 => "inner_truncated", decapsulated: false;
    /// From an allowed LB, but the inner header is not what the outer one
    /// announced (bad version), has a bad IHL, or a total (payload) length
    /// beyond the outer packet: passed untouched.
    InnerMalformed = 14 => "inner_malformed", decapsulated: false;
    /// IP6IP6 (outer IPv6, next header 41) from an allowed LB: the outer
    /// IPv6 header stripped, the inner IPv6 packet passed to the stack.
    DecapIp6ip6 = 15 => "decap_ip6ip6", decapsulated: true;
    /// GUE over IPv6 from an allowed LB: outer IPv6, UDP and GUE stripped,
    /// the frame's EtherType the inner packet's.
    DecapGue6 = 16 => "decap_gue6", decapsulated: true;
}

// Dense indexes in order: the counters are indexed by them.
const _: () = {
    let mut i = 0;
    while i < DECAP_VERDICT_COUNT as usize {
        assert!(DecapVerdict::ALL[i] as u32 == i as u32);
        i += 1;
    }
};

/// Which tunnel an outer IPv4 protocol may be (step 2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tunnel {
    Ipip,
    /// UDP: GUE if it goes to the GUE port.
    Udp,
}

#[inline(always)]
pub const fn tunnel_of(protocol: u8) -> Option<Tunnel> {
    match protocol {
        IPPROTO_IPIP => Some(Tunnel::Ipip),
        IPPROTO_UDP => Some(Tunnel::Udp),
        _ => None,
    }
}

/// Which tunnel an outer IPv6 header's next header may be: IP6IP6 (41)
/// or UDP. An extension header (the LB sends none) is none.
#[inline(always)]
pub const fn tunnel_of6(next_header: u8) -> Option<Tunnel> {
    match next_header {
        IPPROTO_IPV6 => Some(Tunnel::Ipip),
        IPPROTO_UDP => Some(Tunnel::Udp),
        _ => None,
    }
}

/// The inner packet's family, as the outer headers announce it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InnerFamily {
    V4,
    V6,
}

impl InnerFamily {
    /// The EtherType of the frame once decapsulated, raw network order.
    #[inline(always)]
    pub const fn ether_type_raw(self) -> u16 {
        match self {
            InnerFamily::V4 => ETH_P_IPV4_RAW,
            InnerFamily::V6 => ETH_P_IPV6_RAW,
        }
    }
}

/// Does the IPv4 header's checksum hold? (The sum of its ten words,
/// checksum included, folds to 0xffff.)
#[inline(always)]
pub fn ipv4_checksum_ok(ip: &Ipv4Hdr) -> bool {
    let words = (ip as *const Ipv4Hdr).cast::<u16>();
    let mut sum = 0u32;
    for i in 0..Ipv4Hdr::LEN / 2 {
        // SAFETY: `ip` is 20 bytes, 2-byte aligned (packed(2)).
        sum += unsafe { core::ptr::read(words.add(i)) } as u32;
    }
    checksum::fold(sum) == 0xffff
}

/// Step 3, the outer IPv4 header of a tunnel candidate in a frame whose
/// IP part is `frame_ip_len` bytes: `None` if it may be decapsulated.
#[inline(always)]
pub fn outer_verdict(ip: &Ipv4Hdr, frame_ip_len: usize) -> Option<DecapVerdict> {
    match ip.shape(frame_ip_len) {
        Ipv4Shape::Malformed => return Some(DecapVerdict::OuterMalformed),
        Ipv4Shape::Options => return Some(DecapVerdict::OuterOptions),
        Ipv4Shape::Plain => {}
    }
    if ip.is_fragment() {
        return Some(DecapVerdict::OuterFragment);
    }
    if !ipv4_checksum_ok(ip) {
        return Some(DecapVerdict::OuterMalformed);
    }
    None
}

/// Step 3 over IPv6, the outer fixed header of a tunnel candidate in a
/// frame whose IP part is `frame_ip_len` bytes: `None` if it may be
/// decapsulated. (IPv6 has no header checksum; fragments and options are
/// extension headers, which `tunnel_of6` already turned away.)
#[inline(always)]
pub fn outer6_verdict(ip: &Ipv6Hdr, frame_ip_len: usize) -> Option<DecapVerdict> {
    if ip.is_valid(frame_ip_len) {
        None
    } else {
        Some(DecapVerdict::OuterMalformed)
    }
}

/// Step 4, GUE: the UDP header and the GUE header after it, in an outer
/// packet whose IP payload is `ip_payload` bytes (the frame was checked to
/// hold both headers). The inner family, or why not.
#[inline(always)]
pub fn gue_verdict(
    udp: &UdpHdr,
    gue: &GueHdr,
    ip_payload: usize,
) -> Result<InnerFamily, DecapVerdict> {
    let udp_len = u16::from_be(udp.len) as usize;
    if udp_len < UDP_HDR_LEN + GUE_HDR_LEN || udp_len > ip_payload {
        return Err(DecapVerdict::GueTruncated);
    }
    if gue.control() {
        return Err(DecapVerdict::GueControl);
    }
    if gue.version() != 0 {
        return Err(DecapVerdict::GueVersion);
    }
    if gue.hlen() != 0 || gue.flags != 0 {
        return Err(DecapVerdict::GueOptions);
    }
    match gue.proto {
        IPPROTO_IPIP => Ok(InnerFamily::V4),
        IPPROTO_IPV6 => Ok(InnerFamily::V6),
        _ => Err(DecapVerdict::GueProtocol),
    }
}

/// Step 6, an inner IPv4 header with `room` bytes of the outer packet
/// left for it (header included): `None` if it is whole and valid.
#[inline(always)]
pub fn inner_v4_verdict(inner: &Ipv4Hdr, room: usize) -> Option<DecapVerdict> {
    if inner.version() != 4 || inner.header_len() < Ipv4Hdr::LEN {
        return Some(DecapVerdict::InnerMalformed);
    }
    let tot_len = u16::from_be(inner.tot_len) as usize;
    if tot_len < inner.header_len() || tot_len > room {
        return Some(DecapVerdict::InnerMalformed);
    }
    None
}

/// Step 6, an inner IPv6 header (its first 8 bytes) with `room` bytes
/// left for it: `None` if it is valid.
#[inline(always)]
pub fn inner_v6_verdict(inner: &Ipv6Start, room: usize) -> Option<DecapVerdict> {
    if u32::from_be(inner.vtc_flow) >> 28 != 6 {
        return Some(DecapVerdict::InnerMalformed);
    }
    if IPV6_HDR_LEN + u16::from_be(inner.payload_len) as usize > room {
        return Some(DecapVerdict::InnerMalformed);
    }
    None
}

/// What the decapsulator does with a frame: the verdict and, when
/// decapsulated, how many bytes after the Ethernet header go and the
/// frame's new EtherType.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub verdict: DecapVerdict,
    /// Bytes removed after the Ethernet header (0 unless decapsulated).
    pub strip: usize,
    /// The new EtherType, raw network order (decapsulated frames only).
    pub ether_type: u16,
}

impl Decision {
    const fn pass(verdict: DecapVerdict) -> Self {
        Decision {
            verdict,
            strip: 0,
            ether_type: 0,
        }
    }

    /// The frame as the decapsulator leaves it: Ethernet addresses kept,
    /// the new EtherType, the inner packet (and any trailing padding).
    pub fn apply(&self, frame: &[u8]) -> Option<([u8; 12], u16, usize)> {
        if !self.verdict.is_decapsulated() {
            return None;
        }
        let mut macs = [0u8; 12];
        macs.copy_from_slice(frame.get(..12)?);
        Some((macs, self.ether_type, EthHdr::LEN + self.strip))
    }
}

/// Reads a `T` at `offset` of `frame`, if it is whole there.
fn read<T: Copy>(frame: &[u8], offset: usize) -> Option<T> {
    let bytes = frame.get(offset..offset.checked_add(core::mem::size_of::<T>())?)?;
    // SAFETY: `bytes` holds size_of::<T>() bytes; T is plain data read
    // unaligned.
    Some(unsafe { core::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

/// [`decide_with`] for a decapsulator that allows no IPv6 source.
pub fn decide(frame: &[u8], gue_port: u16, allowed: impl Fn(u32) -> bool) -> Decision {
    decide_with(frame, gue_port, allowed, |_| false)
}

/// The decapsulator's steps over a whole frame, as the XDP program takes
/// them: `allowed` says whether an outer IPv4 source (raw network order)
/// is an allowed LB address, `allowed6` an outer IPv6 source, `gue_port`
/// is in host order. The reference the tests hold the program to.
pub fn decide_with(
    frame: &[u8],
    gue_port: u16,
    allowed: impl Fn(u32) -> bool,
    allowed6: impl Fn(&Addr6) -> bool,
) -> Decision {
    use DecapVerdict as V;
    // 1. Ethernet: IPv4, or IPv6 (`decide6`).
    let Some(eth) = read::<EthHdr>(frame, 0) else {
        return Decision::pass(V::NotTunnel);
    };
    if eth.ether_type == ETH_P_IPV6_RAW {
        return decide6(frame, gue_port, allowed6);
    }
    if eth.ether_type != ETH_P_IPV4_RAW {
        return Decision::pass(V::NotTunnel);
    }
    // 2. The outer protocol: IPIP, or UDP to the GUE port.
    let Some(ip) = read::<Ipv4Hdr>(frame, EthHdr::LEN) else {
        return Decision::pass(V::OuterMalformed);
    };
    let Some(tunnel) = tunnel_of(ip.protocol) else {
        return Decision::pass(V::NotTunnel);
    };
    let l4 = EthHdr::LEN + ip.header_len();
    if tunnel == Tunnel::Udp {
        if ip.is_later_fragment() || ip.header_len() < Ipv4Hdr::LEN {
            return Decision::pass(V::NotTunnel);
        }
        match read::<UdpHdr>(frame, l4) {
            Some(udp) if udp.dest == gue_port.to_be() => {}
            // Another port, or no whole UDP header: no port of ours.
            _ => return Decision::pass(V::NotTunnel),
        }
    }
    // 3. The outer header: plain, whole, not a fragment, checksum right.
    let frame_ip_len = frame.len() - EthHdr::LEN;
    if let Some(v) = outer_verdict(&ip, frame_ip_len) {
        return Decision::pass(v);
    }
    let ip_payload = u16::from_be(ip.tot_len) as usize - Ipv4Hdr::LEN;
    // 4. GUE's headers.
    let (family, overhead) = match tunnel {
        Tunnel::Ipip => (InnerFamily::V4, IPIP_OVERHEAD),
        Tunnel::Udp => match gue_of_frame(frame, l4, ip_payload) {
            Ok(f) => (f, GUE_OVERHEAD),
            Err(v) => return Decision::pass(v),
        },
    };
    // 5. The security rule: an allowed LB's packets only.
    if !allowed(ip.saddr) {
        return Decision::pass(V::SourceNotAllowed);
    }
    // 6. The inner header.
    let room = u16::from_be(ip.tot_len) as usize - overhead;
    if let Some(v) = inner_of_frame(frame, family, EthHdr::LEN + overhead, room) {
        return Decision::pass(v);
    }
    // 7. Strip: the outer headers go, the Ethernet header moves up.
    Decision {
        verdict: match (tunnel, family) {
            (Tunnel::Ipip, _) => V::DecapIpip,
            (Tunnel::Udp, InnerFamily::V4) => V::DecapGue,
            (Tunnel::Udp, InnerFamily::V6) => V::DecapGueV6,
        },
        strip: overhead,
        ether_type: family.ether_type_raw(),
    }
}

/// Step 4 over a frame, either outer family: GUE's UDP and GUE headers at
/// `l4` in an outer payload of `ip_payload` bytes; the inner family, or the
/// verdict that passes the frame.
fn gue_of_frame(frame: &[u8], l4: usize, ip_payload: usize) -> Result<InnerFamily, DecapVerdict> {
    let (Some(udp), Some(gue)) = (
        read::<UdpHdr>(frame, l4),
        read::<GueHdr>(frame, l4 + UDP_HDR_LEN),
    ) else {
        return Err(DecapVerdict::GueTruncated);
    };
    gue_verdict(&udp, &gue, ip_payload)
}

/// Step 6 over a frame: the inner header of `family` at `inner`, with
/// `room` bytes of the outer packet left for it.
fn inner_of_frame(
    frame: &[u8],
    family: InnerFamily,
    inner: usize,
    room: usize,
) -> Option<DecapVerdict> {
    match family {
        InnerFamily::V4 => match read::<Ipv4Hdr>(frame, inner) {
            Some(h) if room >= Ipv4Hdr::LEN => inner_v4_verdict(&h, room),
            _ => Some(DecapVerdict::InnerTruncated),
        },
        InnerFamily::V6 => match (
            read::<Ipv6Start>(frame, inner),
            frame.len() >= inner + IPV6_HDR_LEN,
        ) {
            (Some(h), true) if room >= IPV6_HDR_LEN => inner_v6_verdict(&h, room),
            _ => Some(DecapVerdict::InnerTruncated),
        },
    }
}

/// [`decide_with`]'s steps for an IPv6 frame: the outer IPv6 header's next
/// header IP6IP6 (41) or UDP to the GUE port, the fixed header valid, GUE's
/// headers as over IPv4, the source allowed (`allowed6`), the inner header
/// whole.
fn decide6(frame: &[u8], gue_port: u16, allowed6: impl Fn(&Addr6) -> bool) -> Decision {
    use DecapVerdict as V;
    // 2. The outer next header: IP6IP6, or UDP to the GUE port.
    let Some(ip) = read::<Ipv6Hdr>(frame, EthHdr::LEN) else {
        return Decision::pass(V::OuterMalformed);
    };
    let Some(tunnel) = tunnel_of6(ip.next_header) else {
        return Decision::pass(V::NotTunnel);
    };
    let l4 = EthHdr::LEN + IPV6_HDR_LEN;
    if tunnel == Tunnel::Udp {
        match read::<UdpHdr>(frame, l4) {
            Some(udp) if udp.dest == gue_port.to_be() => {}
            _ => return Decision::pass(V::NotTunnel),
        }
    }
    // 3. The outer header: version 6, its payload within the frame.
    if let Some(v) = outer6_verdict(&ip, frame.len() - EthHdr::LEN) {
        return Decision::pass(v);
    }
    let ip_payload = u16::from_be(ip.payload_len) as usize;
    // 4. GUE's headers.
    let (family, overhead) = match tunnel {
        Tunnel::Ipip => (InnerFamily::V6, IP6IP6_OVERHEAD),
        Tunnel::Udp => match gue_of_frame(frame, l4, ip_payload) {
            Ok(f) => (f, GUE6_OVERHEAD),
            Err(v) => return Decision::pass(v),
        },
    };
    // 5. The security rule.
    let saddr = ip.saddr;
    if !allowed6(&saddr) {
        return Decision::pass(V::SourceNotAllowed);
    }
    // 6. The inner header.
    let room = IPV6_HDR_LEN + ip_payload - overhead;
    if let Some(v) = inner_of_frame(frame, family, EthHdr::LEN + overhead, room) {
        return Decision::pass(v);
    }
    // 7. Strip.
    Decision {
        verdict: match tunnel {
            Tunnel::Ipip => V::DecapIp6ip6,
            Tunnel::Udp => V::DecapGue6,
        },
        strip: overhead,
        ether_type: family.ether_type_raw(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::PacketBuilder;
    use proptest::prelude::*;

    const LB: [u8; 4] = [198, 18, 1, 1];
    const OTHER: [u8; 4] = [198, 18, 1, 66];
    const BACKEND: [u8; 4] = [198, 19, 0, 11];
    const CLIENT: [u8; 4] = [198, 18, 0, 2];
    const VIP: [u8; 4] = [198, 18, 0, 10];

    fn allowed(a: u32) -> bool {
        a == u32::from_ne_bytes(LB)
    }

    fn inner_udp() -> Vec<u8> {
        let mut out = Vec::new();
        PacketBuilder::ipv4(CLIENT, VIP, 64)
            .udp(40000, 53)
            .write(&mut out, b"hello")
            .expect("inner");
        out
    }

    fn inner_v6() -> Vec<u8> {
        let mut out = Vec::new();
        PacketBuilder::ipv6([0xfd; 16], [0xfe; 16], 64)
            .udp(40000, 53)
            .write(&mut out, b"hello")
            .expect("inner v6");
        out
    }

    fn eth(ether_type: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2];
        f.extend_from_slice(&ether_type.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn outer(src: [u8; 4], protocol: u8, payload: &[u8]) -> Vec<u8> {
        let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, protocol, 0, 0];
        ip.extend_from_slice(&src);
        ip.extend_from_slice(&BACKEND);
        let len = (20 + payload.len()) as u16;
        ip[2..4].copy_from_slice(&len.to_be_bytes());
        let c = checksum::compute(&ip, 0);
        ip[10..12].copy_from_slice(&c.to_ne_bytes());
        ip.extend_from_slice(payload);
        eth(0x0800, &ip)
    }

    /// UDP to the GUE port and GUE (`byte0`, `proto`) around `inner`.
    fn gue_payload(byte0: u8, proto: u8, inner: &[u8]) -> Vec<u8> {
        let len = (8 + 4 + inner.len()) as u16;
        let mut udp = vec![0xc3, 0x50, 0x17, 0xc0];
        udp.extend_from_slice(&len.to_be_bytes());
        udp.extend_from_slice(&[0, 0, byte0, proto, 0, 0]);
        udp.extend_from_slice(inner);
        udp
    }

    fn gue(src: [u8; 4], byte0: u8, proto: u8, inner: &[u8]) -> Vec<u8> {
        outer(src, IPPROTO_UDP, &gue_payload(byte0, proto, inner))
    }

    fn verdict(frame: &[u8]) -> DecapVerdict {
        decide(frame, GUE_DEFAULT_PORT, allowed).verdict
    }

    #[test]
    fn an_allowed_lbs_tunnels_are_stripped_to_the_inner_packet() {
        let inner = inner_udp();
        for (frame, want, strip) in [
            (outer(LB, IPPROTO_IPIP, &inner), DecapVerdict::DecapIpip, 20),
            (gue(LB, 0, IPPROTO_IPIP, &inner), DecapVerdict::DecapGue, 32),
        ] {
            let d = decide(&frame, GUE_DEFAULT_PORT, allowed);
            assert_eq!((d.verdict, d.strip), (want, strip));
            assert_eq!(d.ether_type, ETH_P_IPV4_RAW);
            let (macs, _, from) = d.apply(&frame).expect("decapsulated");
            assert_eq!(&macs[..], &frame[..12]);
            assert_eq!(&frame[from..], &inner[..]);
        }
        let v6 = gue(LB, 0, IPPROTO_IPV6, &inner_v6());
        let d = decide(&v6, GUE_DEFAULT_PORT, allowed);
        assert_eq!(d.verdict, DecapVerdict::DecapGueV6);
        assert_eq!(d.ether_type, ETH_P_IPV6_RAW);
    }

    #[test]
    fn other_sources_and_other_traffic_are_left_alone() {
        let inner = inner_udp();
        assert_eq!(
            verdict(&outer(OTHER, IPPROTO_IPIP, &inner)),
            DecapVerdict::SourceNotAllowed
        );
        assert_eq!(
            verdict(&gue(OTHER, 0, IPPROTO_IPIP, &inner)),
            DecapVerdict::SourceNotAllowed
        );
        // Plain UDP, TCP, ARP: not tunnels.
        assert_eq!(verdict(&eth(0x0800, &inner)), DecapVerdict::NotTunnel);
        assert_eq!(verdict(&eth(0x0806, &[0; 28])), DecapVerdict::NotTunnel);
        assert_eq!(verdict(&[0u8; 10]), DecapVerdict::NotTunnel);
        // GUE to another port.
        assert_eq!(
            decide(&gue(LB, 0, 4, &inner), 6081, allowed).verdict,
            DecapVerdict::NotTunnel
        );
    }

    #[test]
    fn each_malformed_case_has_its_verdict() {
        let inner = inner_udp();
        let ipip = outer(LB, IPPROTO_IPIP, &inner);
        let with = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut frame = ipip.clone();
            f(&mut frame);
            verdict(&frame)
        };
        // Outer: short, bad checksum, bad total length, options, fragment.
        assert_eq!(verdict(&ipip[..30]), DecapVerdict::OuterMalformed);
        assert_eq!(with(&|f| f[24] ^= 1), DecapVerdict::OuterMalformed);
        assert_eq!(with(&|f| f[16] = 0xff), DecapVerdict::OuterMalformed);
        let mut opts = outer(LB, IPPROTO_IPIP, &inner);
        opts[14] = 0x46;
        assert_eq!(verdict(&opts), DecapVerdict::OuterOptions);
        assert_eq!(
            with(&|f| {
                f[20] = 0x20;
                refresh_checksum(f);
            }),
            DecapVerdict::OuterFragment
        );
        // Inner: truncated by the outer length, bad version, too long.
        assert_eq!(
            verdict(&outer(LB, IPPROTO_IPIP, &inner[..12])),
            DecapVerdict::InnerTruncated
        );
        let mut v6_in_ipip = inner.clone();
        v6_in_ipip[0] = 0x65;
        assert_eq!(
            verdict(&outer(LB, IPPROTO_IPIP, &v6_in_ipip)),
            DecapVerdict::InnerMalformed
        );
        let mut long = inner.clone();
        long[3] += 1;
        assert_eq!(
            verdict(&outer(LB, IPPROTO_IPIP, &long)),
            DecapVerdict::InnerMalformed
        );
        // GUE: control, version, options, flags, protocol, truncated.
        for (byte0, proto, want) in [
            (0x20, 4, DecapVerdict::GueControl),
            (0x40, 4, DecapVerdict::GueVersion),
            (0x01, 4, DecapVerdict::GueOptions),
            (0x00, 6, DecapVerdict::GueProtocol),
        ] {
            assert_eq!(verdict(&gue(LB, byte0, proto, &inner)), want, "{byte0:#x}");
        }
        let mut flags = gue(LB, 0, 4, &inner);
        flags[EthHdr::LEN + 20 + 8 + 3] = 1;
        assert_eq!(verdict(&flags), DecapVerdict::GueOptions);
        let mut short_udp = gue(LB, 0, 4, &inner);
        short_udp[EthHdr::LEN + 20 + 4..EthHdr::LEN + 20 + 6].copy_from_slice(&10u16.to_be_bytes());
        assert_eq!(verdict(&short_udp), DecapVerdict::GueTruncated);
        let bare = gue(LB, 0, 4, &[]);
        assert_eq!(
            verdict(&bare[..bare.len() - 2]),
            DecapVerdict::OuterMalformed
        );
        assert_eq!(verdict(&bare), DecapVerdict::InnerTruncated);
        // An inner IPv6 announced, IPv4 inside (40 bytes or more of it).
        let mut long_v4 = inner.clone();
        long_v4.extend_from_slice(&[0; 16]);
        assert_eq!(
            verdict(&gue(LB, 0, IPPROTO_IPV6, &long_v4)),
            DecapVerdict::InnerMalformed
        );
    }

    const LB6: [u8; 16] = [0x20, 1, 0xd, 0xb8, 0, 0x19, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    const OTHER6: [u8; 16] = [0x20, 1, 0xd, 0xb8, 0, 0x19, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x66];
    const BACKEND6: [u8; 16] = [0x20, 1, 0xd, 0xb8, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x11];

    fn allowed6(a: &Addr6) -> bool {
        *a == crate::ipv6::addr_of(LB6)
    }

    /// An outer IPv6 packet from `src` with next header `next` around
    /// `payload`.
    fn outer6(src: [u8; 16], next: u8, payload: &[u8]) -> Vec<u8> {
        let mut ip = vec![0x60, 0, 0, 0];
        ip.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        ip.extend_from_slice(&[next, 64]);
        ip.extend_from_slice(&src);
        ip.extend_from_slice(&BACKEND6);
        ip.extend_from_slice(payload);
        eth(0x86dd, &ip)
    }

    fn gue6(src: [u8; 16], byte0: u8, proto: u8, inner: &[u8]) -> Vec<u8> {
        outer6(src, IPPROTO_UDP, &gue_payload(byte0, proto, inner))
    }

    fn verdict6(frame: &[u8]) -> DecapVerdict {
        decide_with(frame, GUE_DEFAULT_PORT, allowed, allowed6).verdict
    }

    #[test]
    fn an_allowed_lbs_ipv6_tunnels_are_stripped_to_the_inner_packet() {
        let inner = inner_v6();
        for (frame, want, strip) in [
            (
                outer6(LB6, IPPROTO_IPV6, &inner),
                DecapVerdict::DecapIp6ip6,
                40,
            ),
            (
                gue6(LB6, 0, IPPROTO_IPV6, &inner),
                DecapVerdict::DecapGue6,
                52,
            ),
        ] {
            let d = decide_with(&frame, GUE_DEFAULT_PORT, allowed, allowed6);
            assert_eq!((d.verdict, d.strip), (want, strip));
            assert_eq!(d.ether_type, ETH_P_IPV6_RAW);
            let (macs, _, from) = d.apply(&frame).expect("decapsulated");
            assert_eq!(&macs[..], &frame[..12]);
            assert_eq!(&frame[from..], &inner[..]);
        }
        // The IPv4-only reference (`decide`) allows no IPv6 source.
        assert_eq!(
            decide(
                &outer6(LB6, IPPROTO_IPV6, &inner),
                GUE_DEFAULT_PORT,
                allowed
            )
            .verdict,
            DecapVerdict::SourceNotAllowed
        );
    }

    #[test]
    fn other_ipv6_sources_and_traffic_are_left_alone() {
        let inner = inner_v6();
        assert_eq!(
            verdict6(&outer6(OTHER6, IPPROTO_IPV6, &inner)),
            DecapVerdict::SourceNotAllowed
        );
        assert_eq!(
            verdict6(&gue6(OTHER6, 0, IPPROTO_IPV6, &inner)),
            DecapVerdict::SourceNotAllowed
        );
        // An allowed IPv4 address is not an allowed IPv6 one, nor the
        // other way round.
        assert_eq!(
            verdict(&outer6(LB6, IPPROTO_IPV6, &inner)),
            DecapVerdict::SourceNotAllowed
        );
        // Plain IPv6 traffic, an extension header first, another port.
        assert_eq!(verdict6(&eth(0x86dd, &inner)), DecapVerdict::NotTunnel);
        assert_eq!(verdict6(&outer6(LB6, 0, &[0; 48])), DecapVerdict::NotTunnel);
        assert_eq!(
            decide_with(&gue6(LB6, 0, IPPROTO_IPV6, &inner), 6081, allowed, allowed6).verdict,
            DecapVerdict::NotTunnel
        );
    }

    #[test]
    fn each_malformed_ipv6_case_has_its_verdict() {
        let inner = inner_v6();
        let ip6ip6 = outer6(LB6, IPPROTO_IPV6, &inner);
        // Outer: cut short, bad version, payload length 0 or past the frame.
        assert_eq!(verdict6(&ip6ip6[..40]), DecapVerdict::OuterMalformed);
        let with = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut frame = ip6ip6.clone();
            f(&mut frame);
            verdict6(&frame)
        };
        assert_eq!(with(&|f| f[14] = 0x40), DecapVerdict::OuterMalformed);
        assert_eq!(
            with(&|f| f[18..20].copy_from_slice(&[0, 0])),
            DecapVerdict::OuterMalformed
        );
        assert_eq!(with(&|f| f[19] += 1), DecapVerdict::OuterMalformed);
        // Inner: not IPv6, or cut short by the outer payload length.
        assert_eq!(with(&|f| f[54] = 0x45), DecapVerdict::InnerMalformed);
        assert_eq!(
            verdict6(&outer6(LB6, IPPROTO_IPV6, &inner[..30])),
            DecapVerdict::InnerTruncated
        );
        // GUE's own checks, as over IPv4.
        for (byte0, proto, want) in [
            (0x20, 41, DecapVerdict::GueControl),
            (0x40, 41, DecapVerdict::GueVersion),
            (0x01, 41, DecapVerdict::GueOptions),
            (0x00, 6, DecapVerdict::GueProtocol),
        ] {
            assert_eq!(
                verdict6(&gue6(LB6, byte0, proto, &inner)),
                want,
                "{byte0:#x}"
            );
        }
    }

    fn refresh_checksum(frame: &mut [u8]) {
        frame[24..26].copy_from_slice(&[0, 0]);
        let c = checksum::compute(&frame[14..34], 0);
        frame[24..26].copy_from_slice(&c.to_ne_bytes());
    }

    #[test]
    fn names_are_distinct() {
        for (i, v) in DecapVerdict::ALL.iter().enumerate() {
            assert!(DecapVerdict::ALL[..i].iter().all(|o| o.name() != v.name()));
        }
    }

    proptest! {
        /// No frame makes the reference panic, and a decapsulated frame
        /// always keeps at least the inner header it checked.
        #[test]
        fn any_frame_gets_a_verdict(bytes in proptest::collection::vec(any::<u8>(), 0..120), mode in 0u8..5) {
            let mut frame = match mode {
                0 => outer(LB, IPPROTO_IPIP, &bytes),
                1 => gue(LB, 0, IPPROTO_IPIP, &bytes),
                2 => outer6(LB6, IPPROTO_IPV6, &bytes),
                3 => gue6(LB6, 0, IPPROTO_IPV6, &bytes),
                _ => bytes.clone(),
            };
            if mode < 4 && !bytes.is_empty() {
                let cut = bytes[0] as usize % frame.len();
                frame.truncate(frame.len() - cut / 4);
            }
            let d = decide_with(&frame, GUE_DEFAULT_PORT, allowed, allowed6);
            if d.verdict.is_decapsulated() {
                prop_assert!(frame.len() >= EthHdr::LEN + d.strip + Ipv4Hdr::LEN);
            }
        }
    }
}
