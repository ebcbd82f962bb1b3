//! Tunnels (step 6 for `forwarding = "ipip"` and `"gue"`): where a tunnel
//! backend's outer packet goes (its next hop, by the FIB, from the tunnel
//! source to the backend's address, cached in the flow as for NAT), and the
//! frame reshaped around the packet, which stays untouched: room made in
//! front (`bpf_xdp_adjust_head`), bounds checked again, then the Ethernet
//! header and the outer headers (`lb_common::tunnel`, tested on the host)
//! written. `transmit` decides the mode, the MTU rule and sends it.
//!
//! The outer packet is IPv4 whatever the inner family (IPv6 tunnels wait
//! for the IPv6 path, issue 24).

use aya_ebpf::{
    helpers::generated::bpf_xdp_adjust_head, macros::map, maps::Array, programs::XdpContext,
};
use lb_common::{
    Backend, MAX_BACKENDS, NextHop, Tunnel, Verdict,
    family::{IpHeader, V4},
    headers::{ETH_P_IPV4_RAW, EthHdr, IPPROTO_UDP},
    tunnel::{GUE_OVERHEAD, IPIP_OVERHEAD, gue_headers, gue_source_port, ipip_header},
};

use crate::{
    family::PathFamily,
    fib::{Leaving, route},
    mem::{copy_mac, header, store_in_frame},
    verdict::{Outcome, drop, pass},
};

/// Backend id → its tunnel's outer source and GUE port. Written by the
/// agent with the backend.
#[map]
static TUNNELS: Array<Tunnel> = Array::with_max_entries(MAX_BACKENDS, 0);

/// How a tunnel wraps a packet.
#[derive(Clone, Copy)]
pub(crate) enum Encap {
    /// An outer IPv4 header (20 bytes).
    Ipip,
    /// Outer IPv4, UDP to the GUE port, GUE (32 bytes).
    Gue,
}

impl Encap {
    /// Bytes put in front of the inner packet.
    #[inline(always)]
    pub(crate) const fn overhead(self) -> u16 {
        match self {
            Encap::Ipip => IPIP_OVERHEAD,
            Encap::Gue => GUE_OVERHEAD,
        }
    }

    /// The outer packet's protocol, inner packets of family `F`.
    #[inline(always)]
    const fn outer_protocol<F: PathFamily>(self) -> u8 {
        match self {
            Encap::Ipip => F::ENCAP_PROTOCOL,
            Encap::Gue => IPPROTO_UDP,
        }
    }
}

/// A backend's tunnel: outer source and destination, GUE port (raw
/// network order).
pub(crate) struct Endpoints {
    source: u32,
    destination: u32,
    gue_port: u16,
}

/// The tunnel to backend `id`; `None` while the agent knows no source for
/// it (no route to the backend when it wrote it).
#[inline(always)]
pub(crate) fn endpoints(id: u32, backend: &Backend) -> Option<Endpoints> {
    let tunnel = TUNNELS.get(id)?;
    if tunnel.source == 0 {
        return None;
    }
    Some(Endpoints {
        source: tunnel.source,
        destination: backend.addr,
        gue_port: tunnel.gue_port,
    })
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
    ends: &Endpoints,
    cache: &mut NextHop,
) -> i64 {
    let out = Leaving {
        protocol: encap.outer_protocol::<F>(),
        // Saturating: a 64 KiB packet must look too big, not tiny.
        len: ip.packet_len().saturating_add(encap.overhead()),
        tos: ip.tos(),
        source: ends.source,
        destination: ends.destination,
    };
    route::<V4>(ctx, &out, cache)
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
    ends: &Endpoints,
    nh: &NextHop,
) -> Result<(), Outcome> {
    // Read before the frame moves: `ip` points into it.
    let (len, tos) = (ip.packet_len(), ip.tos());
    let overhead = encap.overhead();
    // GUE's source port before the helper call: the hash's chain of
    // dependent multiplies runs while the call does (issue 26's profile).
    let source_port = match encap {
        Encap::Ipip => 0,
        Encap::Gue => gue_source_port(F::flow_hash(key)),
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
        (*eth).ether_type = ETH_P_IPV4_RAW;
    }
    let written = match encap {
        Encap::Ipip => store_in_frame(
            ctx,
            EthHdr::LEN,
            &ipip_header(len, tos, F::ENCAP_PROTOCOL, ends.source, ends.destination),
        ),
        Encap::Gue => store_in_frame(
            ctx,
            EthHdr::LEN,
            &gue_headers(
                len,
                tos,
                F::ENCAP_PROTOCOL,
                ends.source,
                ends.destination,
                source_port,
                ends.gue_port,
            ),
        ),
    };
    if !written {
        // As above: cannot happen.
        return Err(drop(Verdict::DropMalformed));
    }
    Ok(())
}
