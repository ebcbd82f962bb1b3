//! Tunnels (step 6 for `forwarding = "ipip"` and `"gue"`): where a tunnel
//! backend's outer packet goes (its next hop, by the FIB, from the tunnel
//! source to the backend's address, cached in the flow as for NAT), and the
//! frame reshaped around the packet, which stays untouched: room made in
//! front (`bpf_xdp_adjust_head`), bounds checked again, then the Ethernet
//! header and the outer headers (`lb_common::tunnel`, tested on the host)
//! written. `transmit` decides the mode, the MTU rule and sends it.
//!
//! The outer packet is of the inner packet's family (a service's VIP and
//! backends are one family): IPIP and GUE over IPv4 for IPv4 services,
//! IP6IP6 and GUE over IPv6 for IPv6 ones ([`TunnelFamily`]: each family's
//! `TUNNELS` map, overheads and headers).

use aya_ebpf::{
    helpers::generated::bpf_xdp_adjust_head, macros::map, maps::Array, programs::XdpContext,
};
use lb_common::{
    Backend, MAX_BACKENDS, NextHop, Tunnel, Tunnel6, Verdict,
    family::{Family, IpHeader, V4, V6},
    headers::{EthHdr, IPPROTO_UDP},
    ipv6::Addr6,
    tunnel::{
        GUE_OVERHEAD, GUE6_OVERHEAD, IP6IP6_OVERHEAD, IPIP_OVERHEAD, IPPROTO_IPIP, IPPROTO_IPV6,
        gue_headers, gue_source_port, gue6_headers, ip6ip6_header, ipip_header,
    },
};

use crate::{
    family::PathFamily,
    fib::{Leaving, route},
    flows6,
    mem::{copy_mac, header, store_in_frame},
    tunnel_icmp,
    verdict::{Outcome, drop, pass},
};

/// Backend id → its tunnel's outer IPv4 source and GUE port. Written by
/// the agent with the backend.
#[map]
static TUNNELS: Array<Tunnel> = Array::with_max_entries(MAX_BACKENDS, 0);
/// Backend id → an IPv6 tunnel backend's outer IPv6 source and GUE port,
/// as `TUNNELS` (one id space: an id is in one of the two).
#[map]
static TUNNELS6: Array<Tunnel6> = Array::with_max_entries(MAX_BACKENDS, 0);

/// What a family brings to the tunnels: its outer header is its own.
pub(crate) trait TunnelFamily: Family + Sized {
    /// The IP protocol number of this family's packets inside an outer
    /// header (IPIP's protocol or next header, GUE's inner protocol).
    const ENCAP_PROTOCOL: u8;
    /// The overheads of IPIP and GUE (outer IP header, UDP and GUE).
    const IPIP_OVERHEAD: u16;
    const GUE_OVERHEAD: u16;
    /// Does `encap`'s header need the flow hash? (GUE's source port;
    /// IPv6's flow label.)
    fn needs_hash(encap: Encap) -> bool;
    /// The tunnel to backend `id`; `None` while the agent knows no source
    /// for it (no route to the backend when it wrote it).
    fn endpoints(id: u32, backend: &Backend) -> Option<Endpoints<'_, Self::Addr>>;
    /// Writes `encap`'s outer headers after the Ethernet header for an
    /// inner packet of `len` bytes with TOS (traffic class) `tos` of the
    /// flow whose hash is `hash`; false if the frame is too short.
    fn write_outer(
        ctx: &XdpContext,
        encap: Encap,
        inner: (u16, u8, u32),
        ends: &Endpoints<'_, Self::Addr>,
    ) -> bool;
    /// `rc` and `mtu` of the tunnel's next hop for an outer packet of
    /// `outer_len` bytes to `backend`, with a path MTU learned beyond it
    /// applied (`tunnel_icmp`).
    fn beyond(rc: i64, mtu: u16, backend: &Backend, outer_len: u16) -> (i64, u16);
}

impl TunnelFamily for V4 {
    const ENCAP_PROTOCOL: u8 = IPPROTO_IPIP;
    const IPIP_OVERHEAD: u16 = IPIP_OVERHEAD;
    const GUE_OVERHEAD: u16 = GUE_OVERHEAD;

    #[inline(always)]
    fn needs_hash(encap: Encap) -> bool {
        matches!(encap, Encap::Gue)
    }

    #[inline(always)]
    fn endpoints(id: u32, backend: &Backend) -> Option<Endpoints<'_, u32>> {
        let tunnel = TUNNELS.get(id)?;
        if tunnel.source == 0 {
            return None;
        }
        Some(Endpoints {
            source: &tunnel.source,
            destination: &backend.addr,
            gue_port: tunnel.gue_port,
        })
    }

    #[inline(always)]
    fn write_outer(
        ctx: &XdpContext,
        encap: Encap,
        (len, tos, hash): (u16, u8, u32),
        ends: &Endpoints<'_, u32>,
    ) -> bool {
        match encap {
            Encap::Ipip => store_in_frame(
                ctx,
                EthHdr::LEN,
                &ipip_header(len, tos, IPPROTO_IPIP, *ends.source, *ends.destination),
            ),
            Encap::Gue => store_in_frame(
                ctx,
                EthHdr::LEN,
                &gue_headers(
                    len,
                    tos,
                    IPPROTO_IPIP,
                    *ends.source,
                    *ends.destination,
                    gue_source_port(hash),
                    ends.gue_port,
                ),
            ),
        }
    }

    #[inline(always)]
    fn beyond(rc: i64, mtu: u16, backend: &Backend, outer_len: u16) -> (i64, u16) {
        tunnel_icmp::beyond(rc, mtu, backend.addr, outer_len)
    }
}

impl TunnelFamily for V6 {
    const ENCAP_PROTOCOL: u8 = IPPROTO_IPV6;
    const IPIP_OVERHEAD: u16 = IP6IP6_OVERHEAD;
    const GUE_OVERHEAD: u16 = GUE6_OVERHEAD;

    #[inline(always)]
    fn needs_hash(_encap: Encap) -> bool {
        // Both headers carry the flow label.
        true
    }

    #[inline(always)]
    fn endpoints(id: u32, backend: &Backend) -> Option<Endpoints<'_, Addr6>> {
        let tunnel = TUNNELS6.get(id)?;
        if tunnel.source == [0; 4] {
            return None;
        }
        Some(Endpoints {
            source: &tunnel.source,
            // An IPv6 backend's `addr` is its `BACKENDS6` index.
            destination: &flows6::backend6(backend.addr)?.addr,
            gue_port: tunnel.gue_port,
        })
    }

    #[inline(always)]
    fn write_outer(
        ctx: &XdpContext,
        encap: Encap,
        (len, tos, hash): (u16, u8, u32),
        ends: &Endpoints<'_, Addr6>,
    ) -> bool {
        match encap {
            Encap::Ipip => store_in_frame(
                ctx,
                EthHdr::LEN,
                &ip6ip6_header(len, tos, hash, ends.source, ends.destination),
            ),
            Encap::Gue => store_in_frame(
                ctx,
                EthHdr::LEN,
                &gue6_headers(len, tos, hash, ends.source, ends.destination, ends.gue_port),
            ),
        }
    }

    #[inline(always)]
    fn beyond(rc: i64, mtu: u16, _backend: &Backend, _outer_len: u16) -> (i64, u16) {
        // Routers' "packet too big" about IPv6 tunnel packets are not
        // learned yet (docs/architecture.md, "What is not here yet"): the
        // LB's own link's MTU is the rule.
        (rc, mtu)
    }
}

/// How a tunnel wraps a packet.
#[derive(Clone, Copy)]
pub(crate) enum Encap {
    /// An outer IPv4 header (20 bytes).
    Ipip,
    /// Outer IPv4, UDP to the GUE port, GUE (32 bytes).
    Gue,
}

impl Encap {
    /// Bytes put in front of an inner packet of family `F`.
    #[inline(always)]
    pub(crate) const fn overhead<F: TunnelFamily>(self) -> u16 {
        match self {
            Encap::Ipip => F::IPIP_OVERHEAD,
            Encap::Gue => F::GUE_OVERHEAD,
        }
    }

    /// The outer packet's protocol, inner packets of family `F`.
    #[inline(always)]
    const fn outer_protocol<F: TunnelFamily>(self) -> u8 {
        match self {
            Encap::Ipip => F::ENCAP_PROTOCOL,
            Encap::Gue => IPPROTO_UDP,
        }
    }
}

/// A backend's tunnel: outer source and destination, GUE port (raw
/// network order). The addresses are references into the maps (the
/// tunnel's slot, the backend's): IPv6's 16-byte copies here took
/// `lb_v6_portless` past the verifier's 512-byte combined stack.
pub(crate) struct Endpoints<'a, A> {
    source: &'a A,
    destination: &'a A,
    gue_port: u16,
}

/// The next hop of the outer packet that carries `ip` to the backend: the
/// flow's cached hop (its MTU against the inner length plus the overhead)
/// or the FIB's (`fib::route`), with `FIB_FRAG_NEEDED` and the link's MTU
/// in `cache.mtu` when the outer packet would not fit.
#[inline(always)]
pub(crate) fn next_hop<F: PathFamily>(
    ctx: &XdpContext,
    ip: &F::IpHdr,
    encap: Encap,
    ends: &Endpoints<'_, F::Addr>,
    cache: &mut NextHop,
) -> i64 {
    let out = Leaving {
        protocol: encap.outer_protocol::<F>(),
        // Saturating: a 64 KiB packet must look too big, not tiny.
        len: ip.packet_len().saturating_add(encap.overhead::<F>()),
        tos: ip.tos(),
        source: *ends.source,
        destination: *ends.destination,
    };
    route::<F>(ctx, &out, cache)
}

/// Wraps the frame's packet (`ip`, inner, of the flow `key`) in `encap`'s
/// headers to the backend and addresses the frame to the next hop `nh`.
/// `Err`: the frame could not be given the room; it is unchanged and goes
/// to the kernel.
#[inline(always)]
pub(crate) fn encapsulate<F: PathFamily>(
    ctx: &XdpContext,
    ip: &F::IpHdr,
    key: &F::FlowKey,
    encap: Encap,
    ends: &Endpoints<'_, F::Addr>,
    nh: &NextHop,
) -> Result<(), Outcome> {
    // Read before the frame moves: `ip` points into it.
    let (len, tos) = (ip.packet_len(), ip.tos());
    let overhead = encap.overhead::<F>();
    // The flow hash (GUE's source port, IPv6's flow label) before the
    // helper call: the hash's chain of dependent multiplies runs while the
    // call does (issue 26's profile).
    let hash = if F::needs_hash(encap) {
        F::flow_hash(key)
    } else {
        0
    };
    // SAFETY: helper call on our own context; every pointer below is taken
    // and bounds-checked after it.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -i32::from(overhead)) } != 0 {
        // No headroom (a driver without it): nothing changed.
        return Err(pass(Verdict::PassKernelForward));
    }
    // Now: [new Ethernet][outer headers][old Ethernet, overwritten][inner].
    let Some(eth) = header::<EthHdr>(ctx, 0) else {
        // Cannot happen (the frame just grew by `overhead`); the verifier
        // wants the check. The frame has lost its shape: dropped.
        return Err(drop(Verdict::DropMalformed));
    };
    // SAFETY: bounds-checked Ethernet header.
    unsafe {
        copy_mac(&raw mut (*eth).dst, &nh.dmac);
        copy_mac(&raw mut (*eth).src, &nh.smac);
        (*eth).ether_type = F::ETHER_TYPE_RAW;
    }
    if !F::write_outer(ctx, encap, (len, tos, hash), ends) {
        // As above: cannot happen.
        return Err(drop(Verdict::DropMalformed));
    }
    Ok(())
}
