//! The XDP data plane `lb`: one pass per packet, constant work.
//!
//! The packet path, top to bottom (`lb` → `balance`), numbered as in
//! docs/architecture.md:
//! 1. parse Ethernet → IPv4 → TCP/UDP; a later fragment or an ICMP error
//!    that belongs to a flow follows it (`frag`, `icmp`); a packet that
//!    fails the VIP rules (options, an unplaceable fragment, truncation)
//!    gets its verdict if it is addressed to a VIP, and is passed untouched
//!    otherwise;
//! 2. flow tables (`flows.rs`): an established flow is one lookup in
//!    `CONNTRACK`, then a half-open one in `HALF_OPEN`; an entry idle past its
//!    timeout is a miss. FIN/RST within the sender's sequence window moves a
//!    flow to closing (a blind RST is dropped); the client's packet that
//!    completes the handshake promotes a half-open flow (NAT: the ACK of the
//!    backend's SYN-ACK; DSR: a segment past the handshake's ACK; UDP: the
//!    second packet); a SYN on a closing flow, or on one pinned to a backend
//!    that left the ring (a reused source port), ends it and is a new flow;
//! 3. reverse NAT: a backend's reply (the flow's reply entry) becomes
//!    VIP → client; a NAT backend's packet without a flow is dropped;
//! 4. new flow: not for a VIP: XDP_PASS untouched; for a VIP: the
//!    firewall's global scope (deny, allow, rate limit), service lookup
//!    (VIP, port, protocol), a TCP packet without SYN only for a hash
//!    scheduler (hash-on-miss, else `drop_no_flow`), the service's firewall
//!    scope, schedule, then a half-open entry — or, over the CPU's new-flow
//!    budget on a DSR hash service, no entry. Established flows never reach
//!    the firewall;
//! 5. admission of the pinned flow: its service still exists, its backend
//!    does not drop its flows;
//! 6. rewrite (NAT: addresses, ports, TTL, checksums; DSR: MACs only) and
//!    next hop (cached in the flow with its MTU, else `bpf_fib_lookup`),
//!    XDP_TX or redirect; too big for it: "fragmentation needed" (DF set)
//!    or the kernel fragments it (DF clear);
//! 7. counters.
//!
//! Every return goes through a [`Verdict`] so each rule has a counter. There is
//! no logging here: the fast path only counts. A packet that is *not*
//! forwarded may also be traced (`lb trace`): when `TRACE_ON` asks for its
//! verdict, its headers are read again and an event goes into the `TRACE`
//! ring buffer. Forwarded packets never reach that check.
#![no_std]
#![no_main]
// The bpf target has no RMW atomics in core::sync; the intrinsic lowers to
// BPF_ATOMIC | BPF_FETCH (needs -Ctarget-cpu=v3, set by xtask).
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod capture;
mod firewall;
mod flows;
mod frag;
mod hops;
mod icmp;
mod schedule;
mod trace;

use capture::capture;
use firewall::firewall;
use flows::Table;
use schedule::schedule;
use trace::trace;

use core::mem::size_of;

use aya_ebpf::{
    bindings::{bpf_fib_lookup as FibParams, xdp_action},
    helpers::generated::{bpf_fib_lookup, bpf_redirect},
    macros::{map, xdp},
    maps::{Array, HashMap, PerCpuArray},
    programs::XdpContext,
};
use lb_common::{
    BACKEND_F_DROP_FLOWS, Backend, Counters, FW_GLOBAL, Flow, FlowKey, MAX_BACKENDS, MAX_SERVICES,
    MODE_DSR, NextHop, ServiceConf, ServiceKey, VERDICT_COUNT, Verdict,
    flow::{Confirm, REPLY, STATE_NEW, STATE_PICKED_UP, advances, closes, confirms, in_window},
    hashes_flow,
    headers::{
        ETH_P_IPV4_RAW, EthHdr, IPPROTO_ICMP, IPPROTO_TCP, Ipv4Hdr, L4Ports, TCP_FLAG_RST,
        TCP_FLAGS_OFF, TCP_SEQ_OFF, TcpNumbers, l4_layout, opens_connection,
    },
    rewrite::{decrement_ttl, rewrite_destination, rewrite_source},
};

// ---- maps (docs/architecture.md has the full table) ----

/// (VIP, port, protocol) → service id. Written by the agent.
#[map]
static SERVICES: HashMap<ServiceKey, u32> = HashMap::with_max_entries(MAX_SERVICES, 0);
/// VIP address → number of services on it: "is this packet for us at all".
#[map]
static VIPS: HashMap<u32, u32> = HashMap::with_max_entries(MAX_SERVICES, 0);
/// Service id → mode, scheduler, active ring half. Written by the agent.
#[map]
static SERVICE_CONF: Array<ServiceConf> = Array::with_max_entries(MAX_SERVICES, 0);
// RINGS, RR_COUNTERS and MAGLEV (the scheduling tables) live in schedule.rs.
/// Backend id → address, port, flags. Written by the agent.
#[map]
pub(crate) static BACKENDS: Array<Backend> = Array::with_max_entries(MAX_BACKENDS, 0);
// CONNTRACK and HALF_OPEN, the flow tables, are in `flows.rs`.
/// Per-service and per-backend traffic, per CPU. This program; agent reads.
#[map]
static SERVICE_STATS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(MAX_SERVICES, 0);
#[map]
static BACKEND_STATS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(MAX_BACKENDS, 0);
/// One counter per [`Verdict`], per CPU.
#[map]
static VERDICTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(VERDICT_COUNT, 0);

const AF_INET: u8 = 2;
const FIB_SUCCESS: i64 = 0;
const FIB_NO_NEIGH: i64 = 7;
/// `BPF_FIB_LKUP_RET_FRAG_NEEDED`: the packet is longer than the route's MTU
/// (then `mtu_result` holds it). `next_hop` also returns it for a cached hop.
const FIB_FRAG_NEEDED: i64 = 8;
/// `BPF_FIB_LOOKUP_SKIP_NEIGH`: the route only (kernel 6.3 and later).
const FIB_SKIP_NEIGH: u32 = 1 << 2;

#[xdp]
// The macro wraps this in the exported entry point: without the hint, once
// the path grew LLVM kept it out of line, a BPF-to-BPF call on every packet.
#[inline(always)]
pub fn lb(ctx: XdpContext) -> u32 {
    let verdict = balance(&ctx);
    count(&VERDICTS, verdict.reason as u32, 1, 0);
    // Forwarded packets (the fast path) pay this compare and nothing more.
    if !verdict.reason.is_forwarded() {
        trace(&ctx, verdict.reason);
    }
    // `lb capture`: one lookup and one branch while no capture runs.
    capture(&ctx, verdict.reason);
    verdict.action
}

/// What the program does with a frame, and which rule decided it.
struct Outcome {
    action: u32,
    reason: Verdict,
}

#[inline(always)]
const fn pass(reason: Verdict) -> Outcome {
    Outcome {
        action: xdp_action::XDP_PASS,
        reason,
    }
}

#[inline(always)]
const fn drop(reason: Verdict) -> Outcome {
    Outcome {
        action: xdp_action::XDP_DROP,
        reason,
    }
}

/// Pointers into one IPv4 TCP/UDP frame without options.
struct Packet {
    eth: *mut EthHdr,
    ip: *mut Ipv4Hdr,
    ports: *mut L4Ports,
    l4_check: *mut u16,
}

#[inline(always)]
fn balance(ctx: &XdpContext) -> Outcome {
    let Some(eth) = header::<EthHdr>(ctx, 0) else {
        return pass(Verdict::PassTruncated);
    };
    // SAFETY: `header` checked the bounds against data_end.
    if unsafe { (*eth).ether_type } != ETH_P_IPV4_RAW {
        return pass(Verdict::PassNotOurs);
    }
    let Some(ip) = header::<Ipv4Hdr>(ctx, EthHdr::LEN) else {
        return pass(Verdict::PassTruncated);
    };
    // Later fragments and ICMP errors carry no ports of their own: they
    // follow the flow of their first fragment or of the packet they quote.
    if let Some(outcome) = without_ports(ctx, eth, ip) {
        return outcome;
    }
    let pkt = match parse_l4(ctx, eth, ip) {
        Ok(pkt) => pkt,
        // Only traffic to a VIP gets the VIP rules' verdict; anything
        // else the kernel handles as if we were not here.
        Err(outcome) if is_vip(ip) => return outcome,
        Err(_) => return pass(Verdict::PassNotOurs),
    };
    let key = flow_key(&pkt);
    let seg = tcp_segment(ctx, &key);
    let now = flows::now();
    // Established flows first: one lookup on the hot path. Both directions
    // of a flow are keyed as they arrive, so replies hit here too.
    if let Some(entry) = flows::established(&key, now) {
        // SAFETY: a CONNTRACK value (see `flows::established`).
        let flow = unsafe { &mut *entry };
        if let Some(outcome) = established(ctx, &pkt, &key, flow, &seg, now) {
            return outcome;
        }
    }
    let to_vip = is_vip(ip);
    if let Some((mut flow, slot)) = flows::half_open(&key, now, to_vip) {
        if let Some(outcome) = half_open(ctx, &pkt, &key, &mut flow, slot, &seg, now) {
            return outcome;
        }
    }
    if to_vip {
        return new_flow(ctx, &pkt, &key, seg.flags, now);
    }
    if flows::from_nat_backend(&key) && routed_on(ctx, ip) {
        // A NAT backend's segment that no flow translates would leave with
        // the backend's own address (a late retransmission, a SYN-ACK to a
        // spoofed SYN whose slot was taken).
        return drop(Verdict::DropBackendNoFlow);
    }
    pass(Verdict::PassNotOurs)
}

/// Would the kernel route this packet on (not deliver it locally)? The
/// agent's own health checks and connections to a backend get their
/// answers on the LB's address: those are the kernel's.
#[inline(always)]
fn routed_on(ctx: &XdpContext, ip: *mut Ipv4Hdr) -> bool {
    // SAFETY: the caller bounds-checked the fixed IPv4 header.
    let hdr = unsafe { &*ip };
    let mut fib = fib_params(ctx, hdr, hdr.saddr, hdr.daddr);
    // Routing only: no neighbour is looked up, so none is reported (a
    // flood's stray packets must not make the agent resolve their
    // destinations).
    // SAFETY: helper call with a valid context and a correctly sized struct.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.ctx.cast(),
            &mut fib,
            size_of::<FibParams>() as i32,
            FIB_SKIP_NEIGH,
        )
    };
    matches!(rc, FIB_SUCCESS | FIB_FRAG_NEEDED)
}

/// What the flow rules read of a TCP segment (all zero for UDP).
pub(crate) struct Segment {
    flags: u8,
    /// Sequence and acknowledgement numbers, host order.
    seq: u32,
    ack: u32,
}

/// A packet of an established flow: replies are turned back into the VIP's,
/// FIN/RST start closing. `None`: a SYN ended the flow; it is a new one.
#[inline(always)]
fn established(
    ctx: &XdpContext,
    pkt: &Packet,
    key: &FlowKey,
    flow: &mut Flow,
    seg: &Segment,
    now: u32,
) -> Option<Outcome> {
    if key.protocol == IPPROTO_TCP {
        if closes(seg.flags) {
            // Only the sender's own FIN/RST is near its sequence; a blind
            // spoofer's RST is dropped, and its FIN (which the endpoint
            // discards too) does not close the flow.
            if in_window(seg.seq, flow.seq) {
                flows::close(key, flow);
            } else if seg.flags & TCP_FLAG_RST != 0 {
                return Some(drop(Verdict::DropRstOutOfWindow));
            }
        } else if advances(seg.seq, flow.seq) {
            flow.seq = seg.seq;
        }
    }
    if flow.direction == REPLY {
        return Some(reverse_nat(ctx, pkt, key, flow));
    }
    // Only a TCP SYN pays for this branch; established packets go on.
    if opens_connection(seg.flags) && flows::restarted_by_syn(Table::Established, key, flow) {
        return None;
    }
    Some(forward(ctx, pkt, key, flow, Table::Established, now))
}

/// A packet of a half-open flow (`flow` is its entry's copy): the backend's
/// answer (NAT) is recorded and goes back to the client; the client's
/// packet that completes the handshake (`flow::completes`) promotes the
/// flow. A NAT client's segment that claims to complete a handshake the
/// backend did not answer is dropped.
#[inline(always)]
fn half_open(
    ctx: &XdpContext,
    pkt: &Packet,
    key: &FlowKey,
    flow: &mut Flow,
    slot: flows::Slot,
    seg: &Segment,
    now: u32,
) -> Option<Outcome> {
    if flow.direction == REPLY {
        if key.protocol == IPPROTO_TCP {
            flows::answered(slot, key, flow, seg.flags, seg.seq);
        }
        return Some(reverse_nat(ctx, pkt, key, flow));
    }
    if opens_connection(seg.flags) && flows::restarted_by_syn(Table::HalfOpen, key, flow) {
        return None;
    }
    let tcp = key.protocol == IPPROTO_TCP;
    let confirm = confirms(flow, tcp, flow.vip != 0, seg.flags, seg.seq, seg.ack);
    if confirm == Confirm::Refused {
        return Some(drop(Verdict::DropBadHandshake));
    }
    let outcome = forward(ctx, pkt, key, flow, Table::HalfOpen, now);
    let delivered = matches!(
        outcome.reason,
        Verdict::Forwarded | Verdict::PassKernelForward
    );
    match confirm {
        Confirm::Promote if delivered => flows::promote(key, flow, seg.seq, seg.ack, now),
        Confirm::Record { state, seq } if delivered => flows::record(slot, key, state, seq),
        _ => {}
    }
    Some(outcome)
}

/// A fragment after the first or an ICMP error that belongs to a flow,
/// forwarded as the flow's; `None` for anything else (one compare each on
/// the fast path).
#[inline(always)]
fn without_ports(ctx: &XdpContext, eth: *mut EthHdr, ip: *mut Ipv4Hdr) -> Option<Outcome> {
    // SAFETY: the caller bounds-checked the fixed IPv4 header.
    let hdr = unsafe { &*ip };
    if hdr.is_later_fragment() {
        return frag::later_fragment(ctx, eth, ip);
    }
    if hdr.protocol == IPPROTO_ICMP {
        return icmp::error_of_flow(ctx, eth, ip);
    }
    None
}

/// Is the packet addressed to one of our VIPs?
#[inline(always)]
fn is_vip(ip: *const Ipv4Hdr) -> bool {
    // SAFETY: the caller bounds-checked the fixed IPv4 header.
    is_vip_addr(unsafe { (*ip).daddr })
}

#[inline(always)]
pub(crate) fn is_vip_addr(addr: u32) -> bool {
    VIPS.get_ptr(addr).is_some()
}

/// The TCP flags and numbers of a TCP packet, zero for UDP. VIP traffic
/// has no IP options (`parse_l4`), so the TCP header is at a fixed offset
/// (`parse_l4` checked it is whole).
#[inline(always)]
fn tcp_segment(ctx: &XdpContext, key: &FlowKey) -> Segment {
    let mut seg = Segment {
        flags: 0,
        seq: 0,
        ack: 0,
    };
    if key.protocol != IPPROTO_TCP {
        return seg;
    }
    const TCP: usize = EthHdr::LEN + Ipv4Hdr::LEN;
    if let (Some(flags), Some(numbers)) = (
        header::<u8>(ctx, TCP + TCP_FLAGS_OFF),
        header::<TcpNumbers>(ctx, TCP + TCP_SEQ_OFF),
    ) {
        // SAFETY: `header` checked the bounds against data_end.
        let (flags, numbers) = unsafe { (*flags, &*numbers) };
        seg.flags = flags;
        seg.seq = u32::from_be(numbers.seq);
        seg.ack = u32::from_be(numbers.ack);
    }
    seg
}

/// Bounds-checked pointer to a `T` at `offset` in the frame.
#[inline(always)]
fn header<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data() + offset;
    if start + size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some(start as *mut T)
}

/// The VIP rules: what a packet to a VIP must look like to be balanced.
#[inline(always)]
fn parse_l4(ctx: &XdpContext, eth: *mut EthHdr, ip: *mut Ipv4Hdr) -> Result<Packet, Outcome> {
    // SAFETY: `ip` was bounds-checked by the caller. A reference, not a
    // copy: copying the packed header became an out-of-line memmove.
    let hdr = unsafe { &*ip };
    if hdr.version() != 4 || hdr.header_len() < Ipv4Hdr::LEN {
        return Err(drop(Verdict::DropMalformed));
    }
    let frame_ip_len = ctx.data_end() - ctx.data() - EthHdr::LEN;
    let tot_len = u16::from_be(hdr.tot_len) as usize;
    if tot_len < Ipv4Hdr::LEN || tot_len > frame_ip_len {
        return Err(drop(Verdict::DropMalformed));
    }
    if hdr.header_len() != Ipv4Hdr::LEN {
        return Err(drop(Verdict::DropIpOptions));
    }
    // First fragments carry the ports and are balanced like any packet; a
    // later one reaches this only when its first was not seen.
    if hdr.is_later_fragment() {
        return Err(drop(Verdict::DropFragment));
    }
    let Some((l4_len, check_off)) = l4_layout(hdr.protocol) else {
        return Err(pass(Verdict::PassOtherProtocol));
    };
    let l4 = EthHdr::LEN + Ipv4Hdr::LEN;
    if tot_len < Ipv4Hdr::LEN + l4_len || ctx.data() + l4 + l4_len > ctx.data_end() {
        return Err(drop(Verdict::DropTruncatedL4));
    }
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
    })
}

#[inline(always)]
fn flow_key(pkt: &Packet) -> FlowKey {
    // SAFETY: every pointer in `Packet` was bounds-checked by `parse_l4`.
    let (ip, ports) = unsafe { (&*pkt.ip, &*pkt.ports) };
    FlowKey::of(ip, ports)
}

/// A packet to a VIP without a flow yet: find its service, schedule a
/// backend, enter the flow in `HALF_OPEN`, forward.
#[inline(always)]
fn new_flow(ctx: &XdpContext, pkt: &Packet, key: &FlowKey, flags: u8, now: u32) -> Outcome {
    // The global firewall scope first: before the service lookup, so a
    // denied source gets nothing from any VIP port.
    if let Err(outcome) = firewall(FW_GLOBAL, key.saddr) {
        return outcome;
    }
    let service = ServiceKey {
        vip: key.daddr,
        port: key.dport,
        protocol: key.protocol,
        _pad: 0,
    };
    let Some(&service_id) = (unsafe { SERVICES.get(&service) }) else {
        return pass(Verdict::PassNoService);
    };
    let Some(conf) = SERVICE_CONF.get(service_id) else {
        return pass(Verdict::PassNoService);
    };
    if conf.enabled == 0 {
        return pass(Verdict::PassNoService);
    }
    // TCP without SYN on a miss: an evicted or expired flow, one that began
    // at another load balancer, or a spoofed segment. Only a hash scheduler
    // can find its backend again; for the others it belongs to nothing.
    let hashed = hashes_flow(conf.scheduler);
    if key.protocol == IPPROTO_TCP && !opens_connection(flags) && !hashed {
        return drop(Verdict::DropNoFlow);
    }
    if let Err(outcome) = firewall(service_id, key.saddr) {
        return outcome;
    }
    let backend_id = match schedule(key, service_id, conf) {
        Ok(id) => id,
        Err(outcome) => return outcome,
    };
    let dsr = conf.mode == MODE_DSR;
    // Over the budget, a flow the hash table finds again needs no entry: a
    // flood degrades to stateless forwarding instead of churning the table.
    // Other services cannot go without (NAT replies, round-robin choice):
    // they insert anyway, into the half-open table only.
    if !flows::within_budget(now) && dsr && hashed {
        let mut flow = Flow {
            backend_id,
            service_id,
            ..Flow::default()
        };
        let outcome = forward(ctx, pkt, key, &mut flow, Table::HalfOpen, now);
        if outcome.reason == Verdict::Forwarded {
            return Outcome {
                action: outcome.action,
                reason: Verdict::ForwardedStateless,
            };
        }
        return outcome;
    }
    let state = if key.protocol == IPPROTO_TCP && !opens_connection(flags) {
        STATE_PICKED_UP
    } else {
        STATE_NEW
    };
    let mut flow = flows::create(key, service_id, backend_id, !dsr, state, now);
    forward(ctx, pkt, key, &mut flow, Table::HalfOpen, now)
}

/// Forwards a packet of a pinned flow to its backend in its service's mode.
/// The flow is a `CONNTRACK` value (removed under us at worst: stale, never
/// a fault) or a half-open entry's copy.
#[inline(always)]
fn forward(
    ctx: &XdpContext,
    pkt: &Packet,
    key: &FlowKey,
    flow: &mut Flow,
    table: Table,
    now: u32,
) -> Outcome {
    let Some(conf) = SERVICE_CONF.get(flow.service_id) else {
        return pass(Verdict::PassNoService);
    };
    if conf.enabled == 0 {
        // The service was removed: its flows go with it.
        return pass(Verdict::PassNoService);
    }
    let Some(backend) = BACKENDS.get(flow.backend_id) else {
        return drop(Verdict::DropNoBackend);
    };
    if backend.flags & BACKEND_F_DROP_FLOWS != 0 {
        flows::remove_flow(table, key, flow);
        return drop(Verdict::DropBackendGone);
    }
    frag::remember(pkt.ip, key);
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    let (service_id, backend_id) = (flow.service_id, flow.backend_id);
    // A new flow's first packet: the backend's shared hop if it is fresh.
    let resolving =
        flow.next_hop.ifindex == 0 && !hops::borrow(backend_id, now, &mut flow.next_hop);
    let outcome = if conf.mode == MODE_DSR {
        transmit_dsr(ctx, pkt, backend, &mut flow.next_hop)
    } else {
        transmit_nat(ctx, pkt, backend, &mut flow.next_hop)
    };
    if resolving && flow.next_hop.ifindex != 0 {
        hops::share(backend_id, now, &flow.next_hop);
    }
    if outcome.reason == Verdict::Forwarded {
        count(&SERVICE_STATS, service_id, 1, bytes);
        count(&BACKEND_STATS, backend_id, 1, bytes);
    }
    outcome
}

/// NAT forward: DNAT to the backend, TTL as a router, next hop by FIB.
#[inline(always)]
fn transmit_nat(ctx: &XdpContext, pkt: &Packet, backend: &Backend, cache: &mut NextHop) -> Outcome {
    // SAFETY: pointers bounds-checked by `parse_l4`; nothing else aliases them.
    let (ip, ports, check) = unsafe { (&mut *pkt.ip, &mut *pkt.ports, &mut *pkt.l4_check) };
    if ip.ttl <= 1 {
        // Addressed to the VIP, which is local to the LB: the kernel answers
        // (e.g. traceroute's last hop) instead of forwarding with TTL 0.
        return pass(Verdict::PassKernelForward);
    }
    let (vip, vport) = (ip.daddr, ports.dest);
    let rc = next_hop(ctx, ip, ip.saddr, backend.addr, cache);
    if rc == FIB_FRAG_NEEDED && ip.dont_fragment() {
        return icmp::too_big(ctx, cache.mtu);
    }
    rewrite_destination(ip, ports, check, backend.addr, backend.port);
    match rc {
        FIB_SUCCESS => {
            decrement_ttl(ip);
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
            rewrite_destination(ip, ports, check, vip, vport);
            pass(Verdict::PassKernelForward)
        }
    }
}

/// L2 DSR: the IP packet is left as it is; only the MACs change.
#[inline(always)]
fn transmit_dsr(ctx: &XdpContext, pkt: &Packet, backend: &Backend, cache: &mut NextHop) -> Outcome {
    // SAFETY: bounds-checked by `parse_l4`.
    let ip = unsafe { &*pkt.ip };
    let rc = next_hop(ctx, ip, ip.saddr, backend.addr, cache);
    if rc == FIB_FRAG_NEEDED {
        if ip.dont_fragment() {
            return icmp::too_big(ctx, cache.mtu);
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

/// Step 3: a backend's reply to a NAT flow becomes VIP → client.
#[inline(always)]
fn reverse_nat(ctx: &XdpContext, pkt: &Packet, key: &FlowKey, restore: &mut Flow) -> Outcome {
    // SAFETY: bounds-checked by `parse_l4`.
    let (ip, ports, check) = unsafe { (&mut *pkt.ip, &mut *pkt.ports, &mut *pkt.l4_check) };
    if ip.ttl <= 1 {
        return pass(Verdict::PassKernelForward);
    }
    frag::remember(pkt.ip, key);
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    let (vip, vport) = (restore.vip, restore.vport);
    let rc = next_hop(ctx, ip, vip, ip.daddr, &mut restore.next_hop);
    if rc == FIB_FRAG_NEEDED && ip.dont_fragment() {
        // To the backend, quoting the reply as it sent it.
        return icmp::too_big(ctx, restore.next_hop.mtu);
    }
    rewrite_source(ip, ports, check, vip, vport);
    match rc {
        FIB_SUCCESS => {
            decrement_ttl(ip);
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
            rewrite_source(ip, ports, check, key.saddr, key.sport);
            pass(Verdict::PassKernelForward)
        }
    }
}

/// The next hop for `daddr`: the flow's cached one, or the kernel's FIB and
/// neighbour table (then cached in the flow). A flow keeps the next hop its
/// first forwarded packet resolved; flows to a backend that moved are
/// retired by the agent (disable/remove drop them). A packet longer than
/// the hop's MTU gets `FIB_FRAG_NEEDED` with the MTU in `cache.mtu`.
#[inline(always)]
fn next_hop(ctx: &XdpContext, ip: &Ipv4Hdr, saddr: u32, daddr: u32, cache: &mut NextHop) -> i64 {
    if cache.ifindex != 0 {
        // The fast path's whole MTU check: the MTU came with the hop.
        if u16::from_be(ip.tot_len) > cache.mtu {
            return FIB_FRAG_NEEDED;
        }
        return FIB_SUCCESS;
    }
    let mut fib = fib_params(ctx, ip, saddr, daddr);
    // SAFETY: helper call with a valid context and a correctly sized struct.
    let rc = unsafe { bpf_fib_lookup(ctx.ctx.cast(), &mut fib, size_of::<FibParams>() as i32, 0) };
    if rc == FIB_SUCCESS || rc == FIB_FRAG_NEEDED {
        // SAFETY: on both the kernel replaced tot_len with the MTU (a u16
        // union either way). Only the MTU on FRAG_NEEDED: the hop stays
        // unresolved, so the next packet looks it up again.
        cache.mtu = unsafe { fib.__bindgen_anon_1.mtu_result };
    }
    if rc == FIB_NO_NEIGH {
        // SAFETY: on NO_NEIGH the kernel has set the egress interface and
        // the next hop's address (the gateway, or the destination).
        hops::wanted(unsafe { fib.__bindgen_anon_4.ipv4_dst }, fib.ifindex);
    }
    if rc == FIB_SUCCESS {
        // Field by field: a struct store of the MACs became an out-of-line
        // memmove once the program grew (drop tracing).
        cache.ifindex = fib.ifindex;
        copy_mac(&raw mut cache.dmac, &fib.dmac);
        copy_mac(&raw mut cache.smac, &fib.smac);
    }
    rc
}

/// `bpf_fib_lookup`'s parameters for `ip` from `saddr` to `daddr`, as it
/// arrived on this interface.
#[inline(always)]
fn fib_params(ctx: &XdpContext, ip: &Ipv4Hdr, saddr: u32, daddr: u32) -> FibParams {
    let mut fib = zeroed_fib_params();
    fib.family = AF_INET;
    fib.l4_protocol = ip.protocol;
    fib.__bindgen_anon_1.tot_len = u16::from_be(ip.tot_len);
    fib.__bindgen_anon_2.tos = ip.tos;
    fib.__bindgen_anon_3.ipv4_src = saddr;
    fib.__bindgen_anon_4.ipv4_dst = daddr;
    fib.ifindex = ctx.ingress_ifindex() as u32;
    fib
}

/// An all-zero `bpf_fib_lookup` (the verifier wants every byte initialised)
/// written as eight plain stores: `mem::zeroed` became a call to an
/// out-of-line BPF memset, 13 % of a packet's time in the profile.
#[inline(always)]
fn zeroed_fib_params() -> FibParams {
    const WORDS: usize = size_of::<FibParams>() / 8;
    const _: () = assert!(size_of::<FibParams>() == WORDS * 8);
    let mut fib = core::mem::MaybeUninit::<FibParams>::uninit();
    let p = fib.as_mut_ptr().cast::<u64>();
    for i in 0..WORDS {
        // SAFETY: in bounds; volatile so LLVM cannot fuse them into a memset.
        unsafe { core::ptr::write_volatile(p.add(i), 0) };
    }
    // SAFETY: every byte written; an all-zero FibParams is valid.
    unsafe { fib.assume_init() }
}

/// Copies a MAC as three 16-bit stores (both sides are 2-byte aligned):
/// a `[u8; 6]` assignment became a call to an out-of-line BPF memmove.
#[inline(always)]
fn copy_mac(dst: *mut [u8; 6], src: &[u8; 6]) {
    let (d, s) = (dst.cast::<u16>(), src.as_ptr().cast::<u16>());
    for i in 0..3 {
        // SAFETY: both point at 6 valid bytes, 2-byte aligned.
        unsafe { core::ptr::write_volatile(d.add(i), core::ptr::read(s.add(i))) };
    }
}

/// Sets the next hop's MACs and sends the frame out of its interface.
#[inline(always)]
fn send(ctx: &XdpContext, pkt: &Packet, nh: &NextHop, reason: Verdict) -> Outcome {
    // SAFETY: bounds-checked Ethernet header.
    unsafe {
        copy_mac(&raw mut (*pkt.eth).dst, &nh.dmac);
        copy_mac(&raw mut (*pkt.eth).src, &nh.smac);
    }
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

/// Adds to a per-CPU counter slot.
#[inline(always)]
fn count<T: Countable>(map: &PerCpuArray<T>, index: u32, packets: u64, bytes: u64) {
    if let Some(slot) = map.get_ptr_mut(index) {
        // SAFETY: per-CPU slot: no other CPU writes it.
        unsafe { (*slot).add(packets, bytes) };
    }
}

trait Countable {
    fn add(&mut self, packets: u64, bytes: u64);
}

impl Countable for u64 {
    #[inline(always)]
    fn add(&mut self, packets: u64, _bytes: u64) {
        *self += packets;
    }
}

impl Countable for Counters {
    #[inline(always)]
    fn add(&mut self, packets: u64, bytes: u64) {
        self.packets += packets;
        self.bytes += bytes;
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
