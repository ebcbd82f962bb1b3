//! Transmit (step 6): the one place a forwarding mode is decided. A
//! packet (or an ICMP error) of an admitted flow is rewritten for its mode
//! — NAT (addresses, ports, TTL, checksums), DSR (MACs only), a tunnel
//! (IPIP, GUE: the packet untouched in outer headers to the backend),
//! reverse NAT (a backend's reply becomes the VIP's) — given its next hop
//! and sent (XDP_TX or redirect), or handed to the kernel with the reason.
//! A new mode is a new [`Mode`]: every `match` on it below must then say
//! how that mode carries a packet and an ICMP error.

use aya_ebpf::{bindings::xdp_action, helpers::generated::bpf_redirect, programs::XdpContext};
use lb_common::{
    Backend, FLOW_F_FULL_NAT, Flow, MODE_DSR, MODE_FULL_NAT, MODE_GUE, MODE_IPIP, NextHop,
    ServiceConf, Verdict,
    family::{FlowTuple, IpHeader},
    tunnel::inner_mtu,
};

use crate::{
    BACKEND_STATS, SERVICE_STATS,
    family::PathFamily,
    fib::{FIB_FRAG_NEEDED, FIB_NO_NEIGH, FIB_SUCCESS, next_hop},
    mem::copy_mac,
    parse::Packet,
    tunnel::{self, Encap},
    verdict::{Outcome, count, drop, pass},
};

/// How a service's packets reach its backends.
enum Mode {
    /// The backend's address and port replace the VIP's; replies come back
    /// through the LB (reverse NAT).
    Nat,
    /// Layer-2 direct server return: only the MACs change; the backend
    /// answers the client itself.
    Dsr,
    /// NAT of both ends: the backend's address and port replace the VIP's,
    /// a source address and port of the LB's (`fullnat.rs`) the client's;
    /// replies come back to that address whatever the backend's routes.
    FullNat,
    /// Direct server return across routers: the packet, untouched, inside
    /// outer headers to the backend's address; the backend (its
    /// decapsulator) unwraps it and answers the client itself.
    Tunnel(Encap),
}

#[inline(always)]
fn mode(conf: &ServiceConf) -> Mode {
    match conf.mode {
        MODE_DSR => Mode::Dsr,
        MODE_IPIP => Mode::Tunnel(Encap::Ipip),
        MODE_GUE => Mode::Tunnel(Encap::Gue),
        MODE_FULL_NAT => Mode::FullNat,
        _ => Mode::Nat,
    }
}

/// A packet of an admitted flow (`key`) to its backend (`backend_id`), in
/// its service's mode; a full-NAT service's keeps its own source (a check
/// through the VIP: the probe's address is the LB's already).
#[inline(always)]
pub(crate) fn to_backend<F: PathFamily>(
    ctx: &XdpContext,
    pkt: &Packet<F>,
    key: &F::FlowKey,
    conf: &ServiceConf,
    backend_id: u32,
    backend: &Backend,
    cache: &mut NextHop,
) -> Outcome {
    let source = (key.source(), key.source_port());
    to_backend_from(ctx, pkt, key, conf, (backend_id, backend), source, cache)
}

/// [`to_backend`] for a flow given `source`, the source address and port
/// of a full-NAT flow (the other modes ignore it).
#[inline(always)]
pub(crate) fn to_backend_from<F: PathFamily>(
    ctx: &XdpContext,
    pkt: &Packet<F>,
    key: &F::FlowKey,
    conf: &ServiceConf,
    (backend_id, backend): (u32, &Backend),
    source: (F::Addr, u16),
    cache: &mut NextHop,
) -> Outcome {
    match mode(conf) {
        Mode::Nat => nat(ctx, pkt, backend, cache),
        Mode::Dsr => dsr(ctx, pkt, backend, cache),
        // Not built for this family (IPv6; config refuses such a service).
        Mode::FullNat if !F::FULL_NAT => drop(Verdict::DropNoBackend),
        Mode::FullNat => full_nat(ctx, pkt, backend, source, cache),
        Mode::Tunnel(encap) => through_tunnel(ctx, pkt, key, encap, backend_id, backend, cache),
    }
}

/// NAT forward: DNAT to the backend, TTL as a router, next hop by FIB.
#[inline(always)]
fn nat<F: PathFamily>(
    ctx: &XdpContext,
    pkt: &Packet<F>,
    backend: &Backend,
    cache: &mut NextHop,
) -> Outcome {
    // SAFETY: pointers bounds-checked by `parse_l4`; nothing else aliases them.
    let (ip, ports, check) = unsafe { (&mut *pkt.ip, &mut *pkt.ports, &mut *pkt.l4_check) };
    if ip.ttl() <= 1 {
        // Addressed to the VIP, which is local to the LB: the kernel answers
        // (e.g. traceroute's last hop) instead of forwarding with TTL 0.
        return pass(Verdict::PassKernelForward);
    }
    let (vip, vport) = (ip.destination(), ports.dest);
    let addr = F::backend_addr(backend);
    let rc = next_hop::<F>(ctx, ip, ip.source(), addr, cache);
    if rc == FIB_FRAG_NEEDED && ip.dont_fragment() {
        return F::too_big(ctx, cache.mtu);
    }
    F::rewrite_destination(ip, pkt.protocol, ports, check, addr, backend.port);
    match rc {
        FIB_SUCCESS => {
            F::decrement_ttl(ip);
            send(ctx, pkt, cache, Verdict::Forwarded)
        }
        // Rewritten but unresolved: the kernel forwards it (decrementing TTL
        // itself) and resolves the neighbour for the next packets.
        FIB_NO_NEIGH => pass(Verdict::PassKernelForward),
        // Too big, DF clear: the kernel forwards it in fragments.
        FIB_FRAG_NEEDED => pass(Verdict::PassTooBig),
        _ => {
            // No route (or forwarding off): the kernel gets the packet
            // exactly as it arrived and decides.
            F::rewrite_destination(ip, pkt.protocol, ports, check, vip, vport);
            pass(Verdict::PassKernelForward)
        }
    }
}

/// Full NAT forward: the destination becomes the backend and the source
/// the flow's (`source`), TTL as a router, next hop by FIB from the source
/// address. What the LB's kernel cannot take (a packet from its own
/// address) is never passed rewritten: no neighbour yet, dropped and
/// reported (the client retransmits); too big, "fragmentation needed" with
/// DF clear too (XDP cannot fragment); no route, passed as it arrived.
#[inline(always)]
fn full_nat<F: PathFamily>(
    ctx: &XdpContext,
    pkt: &Packet<F>,
    backend: &Backend,
    source: (F::Addr, u16),
    cache: &mut NextHop,
) -> Outcome {
    // SAFETY: pointers bounds-checked by `parse_l4`; nothing else aliases them.
    let (ip, ports, check) = unsafe { (&mut *pkt.ip, &mut *pkt.ports, &mut *pkt.l4_check) };
    if ip.ttl() <= 1 {
        return pass(Verdict::PassKernelForward);
    }
    let addr = F::backend_addr(backend);
    let rc = next_hop::<F>(ctx, ip, source.0, addr, cache);
    match rc {
        FIB_SUCCESS => {
            F::rewrite_destination(ip, pkt.protocol, ports, check, addr, backend.port);
            F::rewrite_source(ip, pkt.protocol, ports, check, source.0, source.1);
            F::decrement_ttl(ip);
            send(ctx, pkt, cache, Verdict::Forwarded)
        }
        FIB_NO_NEIGH => drop(Verdict::DropNoNeighbour),
        FIB_FRAG_NEEDED => F::too_big(ctx, cache.mtu),
        _ => pass(Verdict::PassKernelForward),
    }
}

/// L2 DSR: the IP packet is left as it is; only the MACs change.
#[inline(always)]
fn dsr<F: PathFamily>(
    ctx: &XdpContext,
    pkt: &Packet<F>,
    backend: &Backend,
    cache: &mut NextHop,
) -> Outcome {
    // SAFETY: bounds-checked by `parse_l4`.
    let ip = unsafe { &*pkt.ip };
    let rc = next_hop::<F>(ctx, ip, ip.source(), F::backend_addr(backend), cache);
    if rc == FIB_FRAG_NEEDED {
        if ip.dont_fragment() {
            return F::too_big(ctx, cache.mtu);
        }
        // The kernel gets it as it arrived: it cannot forward a packet to
        // the VIP in fragments to a backend (docs/architecture.md).
        return pass(Verdict::PassTooBig);
    }
    if rc != FIB_SUCCESS {
        // No MAC for the backend yet: the agent primes neighbour entries;
        // meanwhile the kernel gets the packet unchanged.
        return pass(Verdict::PassKernelForward);
    }
    send(ctx, pkt, cache, Verdict::Forwarded)
}

/// A tunnel: the packet, untouched, in `encap`'s headers from the tunnel
/// source to the backend, to the outer packet's next hop. Too big once
/// wrapped: "fragmentation needed" with the hop's MTU less the overhead,
/// so the client's PMTUD finds a size that fits the tunnel; with DF clear
/// too (`TunnelTooBig`: XDP cannot fragment, and the LB's kernel has no
/// tunnel device to do it). No source or next hop yet: the kernel gets
/// the packet as it arrived, as for DSR.
#[inline(always)]
fn through_tunnel<F: PathFamily>(
    ctx: &XdpContext,
    pkt: &Packet<F>,
    key: &F::FlowKey,
    encap: Encap,
    backend_id: u32,
    backend: &Backend,
    cache: &mut NextHop,
) -> Outcome {
    let Some(ends) = F::endpoints(backend_id, backend) else {
        return pass(Verdict::PassKernelForward);
    };
    // SAFETY: bounds-checked by `parse_l4`.
    let ip = unsafe { &*pkt.ip };
    let rc = tunnel::next_hop::<F>(ctx, ip, encap, &ends, cache);
    // A router further on may have a smaller link (`tunnel_icmp`).
    let outer_len = ip.packet_len().saturating_add(encap.overhead::<F>());
    let (rc, mtu) = F::beyond(rc, cache.mtu, backend, outer_len);
    if rc == FIB_FRAG_NEEDED {
        // Read first: the answer reshapes the frame.
        let df = ip.dont_fragment();
        // Over IPv6 the answer may be below 1280 (a link under 1280 plus
        // the overhead): the client then keeps to 1280 and its larger
        // packets never fit (docs/architecture.md, "Tunnels").
        let answer = F::too_big(ctx, inner_mtu(mtu, encap.overhead::<F>()));
        if df {
            return answer;
        }
        return Outcome {
            action: answer.action,
            reason: Verdict::TunnelTooBig,
        };
    }
    if rc != FIB_SUCCESS {
        return pass(Verdict::PassKernelForward);
    }
    if let Err(outcome) = tunnel::encapsulate::<F>(ctx, ip, key, encap, &ends, cache) {
        return outcome;
    }
    leave(ctx, cache, Verdict::Forwarded)
}

/// Step 3: a backend's reply to a NAT flow becomes VIP → client.
#[inline(always)]
pub(crate) fn reverse_nat<F: PathFamily>(
    ctx: &XdpContext,
    pkt: &Packet<F>,
    key: &F::FlowKey,
    restore: &mut Flow,
) -> Outcome {
    // SAFETY: bounds-checked by `parse_l4`.
    let (ip, ports, check) = unsafe { (&mut *pkt.ip, &mut *pkt.ports, &mut *pkt.l4_check) };
    if ip.ttl() <= 1 {
        return pass(Verdict::PassKernelForward);
    }
    F::remember_fragment(pkt.ip, pkt.ports);
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    let (vip, vport) = (F::reply_vip(restore), restore.vport);
    // `key` is the reply's NAT shape (backend → client): a full-NAT reply's
    // destination (the LB's source address) becomes the client's.
    let full_nat = restore.flags & FLOW_F_FULL_NAT != 0;
    let (arrived, arrived_port) = (ip.destination(), ports.dest);
    let rc = next_hop::<F>(ctx, ip, vip, key.destination(), &mut restore.next_hop);
    if rc == FIB_FRAG_NEEDED && ip.dont_fragment() {
        // To the backend, quoting the reply as it sent it.
        return F::too_big(ctx, restore.next_hop.mtu);
    }
    F::rewrite_source(ip, pkt.protocol, ports, check, vip, vport);
    if full_nat {
        F::rewrite_destination(
            ip,
            pkt.protocol,
            ports,
            check,
            key.destination(),
            key.destination_port(),
        );
    }
    match rc {
        FIB_SUCCESS => {
            F::decrement_ttl(ip);
            count(&SERVICE_STATS, restore.service_id, 1, bytes);
            count(&BACKEND_STATS, restore.backend_id, 1, bytes);
            send(ctx, pkt, &restore.next_hop, Verdict::ForwardedReply)
        }
        // The LB's kernel would drop it (the VIP, its own address, as the
        // source) and never resolve the client: dropped here, the next hop
        // reported (`next_hop`) for the agent to resolve.
        FIB_NO_NEIGH => drop(Verdict::DropNoNeighbour),
        FIB_FRAG_NEEDED => pass(Verdict::PassTooBig),
        _ => {
            F::rewrite_source(
                ip,
                pkt.protocol,
                ports,
                check,
                key.source(),
                key.source_port(),
            );
            if full_nat {
                F::rewrite_destination(ip, pkt.protocol, ports, check, arrived, arrived_port);
            }
            pass(Verdict::PassKernelForward)
        }
    }
}

/// A client's ICMP error about a packet of an admitted flow (`key`), to
/// the flow's backend: NAT translates it as the backend knows the flow, DSR
/// only changes the MACs, a tunnel carries it untouched (the backend's
/// stack finds the VIP's socket by the quote). Anything that keeps it from
/// leaving at once (no next hop yet, TTL, too big for the tunnel: an
/// error is never answered with one) hands it to the kernel untouched.
#[inline(always)]
pub(crate) fn error_to_backend<F: PathFamily>(
    ctx: &XdpContext,
    pkt: &Packet<F>,
    key: &F::FlowKey,
    quoted: *mut F::IpHdr,
    conf: &ServiceConf,
    backend: &Backend,
    flow: &mut Flow,
) -> Outcome {
    // SAFETY: bounds-checked by `icmp::error_of_flow`; nothing else
    // aliases them.
    let (ip, check, q, ports) = unsafe {
        (
            &mut *pkt.ip,
            &mut *pkt.l4_check,
            &mut *quoted,
            &mut *pkt.ports,
        )
    };
    if ip.ttl() <= 1 {
        return pass(Verdict::PassKernelForward);
    }
    let addr = F::backend_addr(backend);
    // Full NAT: the error comes from the flow's source address and port.
    let (translate, full_nat) = match mode(conf) {
        Mode::Nat => (true, false),
        Mode::FullNat => (true, true),
        Mode::Dsr => (false, false),
        Mode::Tunnel(encap) => return error_through_tunnel(ctx, pkt, key, encap, backend, flow),
    };
    let from = if full_nat {
        F::reply_vip(flow)
    } else {
        ip.source()
    };
    if next_hop::<F>(ctx, ip, from, addr, &mut flow.next_hop) != FIB_SUCCESS {
        return pass(Verdict::PassKernelForward);
    }
    if translate {
        F::error_to_backend(ip, check, q, ports, addr, backend.port);
        if full_nat {
            F::full_nat_error_to_backend(ip, check, q, ports, (from, flow.vport));
        }
        F::decrement_ttl(ip);
    }
    count_flow(ctx, flow.service_id, flow.backend_id);
    send(ctx, pkt, &flow.next_hop, Verdict::ForwardedIcmp)
}

/// A client's ICMP error to a tunnel backend, in the tunnel as the flow's
/// packets go (GUE: the flow's source port too).
#[inline(always)]
fn error_through_tunnel<F: PathFamily>(
    ctx: &XdpContext,
    pkt: &Packet<F>,
    key: &F::FlowKey,
    encap: Encap,
    backend: &Backend,
    flow: &mut Flow,
) -> Outcome {
    let Some(ends) = F::endpoints(flow.backend_id, backend) else {
        return pass(Verdict::PassKernelForward);
    };
    // SAFETY: bounds-checked by `icmp::error_of_flow`.
    let ip = unsafe { &*pkt.ip };
    if tunnel::next_hop::<F>(ctx, ip, encap, &ends, &mut flow.next_hop) != FIB_SUCCESS {
        return pass(Verdict::PassKernelForward);
    }
    // Counted before the frame is reshaped: the error as it arrived.
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    if let Err(outcome) = tunnel::encapsulate::<F>(ctx, ip, key, encap, &ends, &flow.next_hop) {
        return outcome;
    }
    count(&SERVICE_STATS, flow.service_id, 1, bytes);
    count(&BACKEND_STATS, flow.backend_id, 1, bytes);
    leave(ctx, &flow.next_hop, Verdict::ForwardedIcmp)
}

/// A backend's (or a router's behind it) ICMP error about a NAT flow's
/// reply, to the client, as the VIP's.
#[inline(always)]
pub(crate) fn error_to_client<F: PathFamily>(
    ctx: &XdpContext,
    pkt: &Packet<F>,
    quoted: *mut F::IpHdr,
    key: &F::FlowKey,
    restore: &mut Flow,
) -> Outcome {
    // SAFETY: bounds-checked by `icmp::error_of_flow`; nothing else
    // aliases them.
    let (ip, check, q, ports) = unsafe {
        (
            &mut *pkt.ip,
            &mut *pkt.l4_check,
            &mut *quoted,
            &mut *pkt.ports,
        )
    };
    if ip.ttl() <= 1 {
        return pass(Verdict::PassKernelForward);
    }
    let (vip, vport) = (F::reply_vip(restore), restore.vport);
    // `key` is the quoted reply's NAT shape (backend → client): a full-NAT
    // error goes to the client, not to the LB's source address.
    let to = key.destination();
    if next_hop::<F>(ctx, ip, vip, to, &mut restore.next_hop) != FIB_SUCCESS {
        return pass(Verdict::PassKernelForward);
    }
    F::error_to_client(ip, check, q, ports, vip, vport);
    if restore.flags & FLOW_F_FULL_NAT != 0 {
        F::full_nat_error_to_client(ip, check, q, ports, (to, key.destination_port()));
    }
    F::decrement_ttl(ip);
    count_flow(ctx, restore.service_id, restore.backend_id);
    send(ctx, pkt, &restore.next_hop, Verdict::ForwardedIcmp)
}

/// Counts a translated error (the frame as it is) as its flow's traffic.
#[inline(always)]
fn count_flow(ctx: &XdpContext, service_id: u32, backend_id: u32) {
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    count(&SERVICE_STATS, service_id, 1, bytes);
    count(&BACKEND_STATS, backend_id, 1, bytes);
}

/// Sets the next hop's MACs and sends the frame out of its interface.
#[inline(always)]
fn send<F: PathFamily>(
    ctx: &XdpContext,
    pkt: &Packet<F>,
    nh: &NextHop,
    reason: Verdict,
) -> Outcome {
    // SAFETY: bounds-checked Ethernet header.
    unsafe {
        copy_mac(&raw mut (*pkt.eth).dst, &nh.dmac);
        copy_mac(&raw mut (*pkt.eth).src, &nh.smac);
    }
    leave(ctx, nh, reason)
}

/// Sends the frame, addressed to the next hop `nh`, out of its interface.
#[inline(always)]
fn leave(ctx: &XdpContext, nh: &NextHop, reason: Verdict) -> Outcome {
    if nh.ifindex == ctx.ingress_ifindex() as u32 {
        return Outcome {
            action: xdp_action::XDP_TX,
            reason,
        };
    }
    // SAFETY: plain helper call.
    let action = unsafe { bpf_redirect(nh.ifindex, 0) } as u32;
    Outcome { action, reason }
}
