//! The packet path, top to bottom, numbered as in docs/architecture.md:
//! each step a function, each stage (parse, flow tables, firewall,
//! schedule, transmit) in a module of its own below it. Written once over
//! the address family ([`PathFamily`]); `main.rs` picks the family by
//! EtherType.
//!
//! 1. parse Ethernet → IP → TCP/UDP; a later fragment or an ICMP error
//!    that belongs to a flow is handed back by its stage (`frag`, `icmp`)
//!    and follows that flow (steps 5 and 6); a packet that fails the VIP
//!    rules (options, an unplaceable fragment, truncation) gets its
//!    verdict if it is addressed to a VIP, and is passed untouched
//!    otherwise;
//! 2. flow tables (`flows.rs`): an established flow is one bucket of
//!    `ESTABLISHED` (the sender's; a packet not to a VIP, which may be a NAT
//!    reply, also the receiver's), then a half-open one in `HALF_OPEN`; an
//!    entry idle past its timeout is a miss. FIN/RST within the sender's sequence window moves a
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
//!    budget on a DSR or tunnel hash service, no entry. Established flows
//!    never reach the firewall;
//! 5. admission of the pinned flow (`admit`), for its packets, fragments
//!    and ICMP errors alike: its service still exists, its backend does not
//!    drop its flows;
//! 6. transmit (`transmit.rs`, the one place a mode is decided): NAT
//!    rewrites addresses, ports, TTL, checksums; DSR the MACs only; IPIP
//!    and GUE put outer headers in front (`tunnel.rs`); next hop cached in
//!    the flow with its MTU, else `bpf_fib_lookup`; XDP_TX or redirect; too
//!    big for it: "fragmentation needed" (DF set) or the kernel fragments
//!    it (DF clear; a tunnel answers "fragmentation needed" then too);
//! 7. counters (`main.rs` counts the verdict; here, service and backend).

use aya_ebpf::programs::XdpContext;
use core::borrow::Borrow;
use lb_common::{
    BACKEND_F_DROP_FLOWS, Backend, FLOW_F_PROXY, FW_GLOBAL, Flow, MODE_FULL_NAT, SERVICE_PROXY_V2,
    ServiceConf, Verdict, answers_directly,
    family::FlowTuple,
    flow::{Confirm, REPLY, STATE_NEW, STATE_PICKED_UP, advances, closes, confirms, in_window},
    hashes_flow,
    headers::{EthHdr, IPPROTO_TCP, TCP_FLAG_RST, TCP_FLAG_SYN, opens_connection},
};

use crate::{
    BACKEND_STATS, SERVICE_CONF, SERVICE_STATS,
    family::PathFamily,
    fib::routed_on,
    flows::{self, Table},
    hops,
    mem::header,
    parse::{Found, Fragment, Packet, PortLess, Quote, Segment, flow_key, tcp_segment},
    proxy,
    stage::{self, PROXY_DONE, PROXY_ESTABLISHED, PROXY_OPTIONS},
    transmit,
    verdict::{Outcome, count, drop, pass},
};

/// Balances one frame of family `F` (its EtherType already checked).
#[inline(always)]
pub(crate) fn balance<F: PathFamily>(ctx: &XdpContext, eth: *mut EthHdr) -> Outcome {
    let Some(ip) = F::ip_header(ctx) else {
        return pass(Verdict::PassTruncated);
    };
    // Later fragments and ICMP errors carry no ports of their own: they
    // follow the flow of their first fragment or of the packet they quote
    // (one compare each on the fast path).
    match F::port_less(ip) {
        PortLess::LaterFragment => {
            if let Some(found) = F::later_fragment(ctx, eth, ip) {
                return follow_fragment(ctx, found);
            }
        }
        PortLess::Icmp => {
            if let Some(found) = F::error_of_flow(ctx, eth, ip) {
                return follow_error(ctx, found);
            }
        }
        PortLess::No => {}
    }
    let pkt = match F::parse_l4(ctx, eth, ip) {
        Ok(pkt) => pkt,
        // Only traffic to a VIP gets the VIP rules' verdict; anything
        // else the kernel handles as if we were not here.
        Err(outcome) if is_vip::<F>(ip) => return outcome,
        Err(_) => return pass(Verdict::PassNotOurs),
    };
    let mut key = flow_key(&pkt);
    let seg = tcp_segment::<F>(ctx, pkt.l4, &key);
    // The lifecycle's settings, read once for the packet (the clock and
    // the established lookup both need them).
    let conf = flows::conf();
    let now = flows::now_in(conf);
    // Established flows first: one bucket on the hot path (the sender's),
    // with no VIP lookup before it. Only a miss asks whether the packet is
    // to a VIP: a packet that is not may be a NAT backend's reply, found in
    // its receiver's bucket; one to a VIP (a new flow) never reads that.
    let mut to_vip = None;
    let hit = F::established_hit(conf, &mut key, now, || {
        *to_vip.get_or_insert_with(|| is_vip::<F>(ip))
    });
    if let Some(hit) = hit {
        // SAFETY: a flow table value (see `flows::established`).
        let flow = unsafe { &mut *hit.entry };
        // A PROXY v2 flow (one flag test for the others): seq or ack
        // shifted here with the `first` its slot keeps; a segment that
        // takes the header goes to the PROXY stage (`proxy.rs`).
        if flow.flags & FLOW_F_PROXY != 0 {
            match proxy::shift::<F>(ctx, &key, flow, hit.slot, &seg) {
                Ok(true) => {}
                Ok(false) => return F::to_proxy(ctx, PROXY_ESTABLISHED),
                Err(outcome) => return outcome,
            }
        }
        if let Some(outcome) = established(ctx, &pkt, &key, flow, &seg, now) {
            return outcome;
        }
    }
    let to_vip = to_vip.unwrap_or_else(|| is_vip::<F>(ip));
    // The rest is the second stage's (`stage.rs`: its own program, so the
    // verifier walks it on its own budget).
    F::to_setup(ctx, &key, to_vip, now)
}

/// The second stage (`lb_setup`, `stage.rs`): a packet the established
/// table missed, as the first stage carried it (its key, whether it is to a
/// VIP, the tick): half-open flows, new flows, the no-flow rules.
#[inline(always)]
pub(crate) fn setup<F: PathFamily>(ctx: &XdpContext, eth: *mut EthHdr) -> Outcome {
    let Some(ip) = F::ip_header(ctx) else {
        return pass(Verdict::PassTruncated);
    };
    // Parsed again for its pointers: the first stage took it, so it parses.
    let Ok(pkt) = F::parse_l4(ctx, eth, ip) else {
        return pass(Verdict::PassNotOurs);
    };
    let Some((carried, to_vip, now)) = F::carried() else {
        return drop(Verdict::DropNoStage);
    };
    let key: &F::FlowKey = carried.borrow();
    let seg = tcp_segment::<F>(ctx, pkt.l4, key);
    // The packet as it came (the carried key may have a full-NAT reply's
    // NAT shape): where a reply was sent picks its full-NAT flow.
    let arrived = flow_key(&pkt);
    if let Some((mut flow, slot)) = F::half_open(key, &arrived, now, to_vip) {
        if let Some(outcome) = half_open(ctx, &pkt, key, &mut flow, slot, &seg, now) {
            return outcome;
        }
    }
    if to_vip {
        return new_flow(ctx, &pkt, key, (seg.flags, seg.seq), now);
    }
    // A backend's answer to a check through the VIP: into the probe
    // namespace (`probe.rs`). Two compares unless to a probe port.
    if let Some(outcome) = F::probe_answer(ctx, &pkt, key) {
        return outcome;
    }
    if F::from_nat_backend(key) && routed_on::<F>(ctx, ip) {
        // A NAT backend's segment that no flow translates would leave with
        // the backend's own address (a late retransmission, a SYN-ACK to a
        // spoofed SYN whose slot was taken).
        return drop(Verdict::DropBackendNoFlow);
    }
    pass(Verdict::PassNotOurs)
}

/// The PROXY stage (`lb_proxy`, `proxy.rs`), either family: a PROXY flow's
/// SYN or SYN-ACK gets its options fixed and goes back to the family's
/// second stage; an established PROXY flow's packet is shifted or given
/// the header, then takes the established path as in the first stage.
#[inline(always)]
pub(crate) fn proxied<F: PathFamily>(ctx: &XdpContext, eth: *mut EthHdr) -> Outcome {
    if stage::proxy_errand() == PROXY_OPTIONS {
        proxy::fix_options::<F>(ctx);
        return F::proxy_back_to_setup(ctx);
    }
    let Some(ip) = F::ip_header(ctx) else {
        return pass(Verdict::PassTruncated);
    };
    let Ok(pkt) = F::parse_l4(ctx, eth, ip) else {
        return pass(Verdict::PassNotOurs);
    };
    let mut key = flow_key(&pkt);
    let seg = tcp_segment::<F>(ctx, pkt.l4, &key);
    let conf = flows::conf();
    let now = flows::now_in(conf);
    let Some(hit) = F::established_hit(conf, &mut key, now, || is_vip::<F>(ip)) else {
        // Gone since the first stage (or the second) found it.
        return drop(Verdict::DropProxyLost);
    };
    // SAFETY: a flow table value (see `flows::established`).
    let flow = unsafe { &mut *hit.entry };
    let adjusted = if flow.direction == REPLY {
        proxy::backend::<F>(ctx, &key, flow, hit.slot, &seg)
    } else {
        proxy::client::<F>(ctx, &key, flow, hit.slot, &seg)
    };
    if let Err(outcome) = adjusted {
        return outcome;
    }
    // The frame may have grown at its head: its pointers again.
    let Some(eth) = header::<EthHdr>(ctx, 0) else {
        return pass(Verdict::PassTruncated);
    };
    let Some(ip) = F::ip_header(ctx) else {
        return pass(Verdict::PassTruncated);
    };
    let Ok(pkt) = F::parse_l4(ctx, eth, ip) else {
        return pass(Verdict::PassNotOurs);
    };
    match established(ctx, &pkt, &key, flow, &seg, now) {
        Some(outcome) => outcome,
        None => F::to_setup(ctx, &key, is_vip::<F>(ip), now),
    }
}

/// A packet without ports of its own in a stage of its own (IPv6's
/// `lb_v6_portless`, `STAGES[4]`): a later fragment or an ICMP error
/// follows its flow as in `balance`; one that belongs to no flow gets the
/// VIP rules' verdict (to a VIP) or is passed untouched.
#[inline(always)]
pub(crate) fn port_less<F: PathFamily>(ctx: &XdpContext, eth: *mut EthHdr) -> Outcome {
    let Some(ip) = F::ip_header(ctx) else {
        return pass(Verdict::PassTruncated);
    };
    if let Some(found) = F::later_fragment(ctx, eth, ip) {
        return follow_fragment(ctx, found);
    }
    if let Some(found) = F::error_of_flow(ctx, eth, ip) {
        return follow_error(ctx, found);
    }
    match F::parse_l4(ctx, eth, ip) {
        Err(outcome) if is_vip::<F>(ip) => outcome,
        _ => pass(Verdict::PassNotOurs),
    }
}

/// Is the packet addressed to one of our VIPs?
#[inline(always)]
fn is_vip<F: PathFamily>(ip: *const F::IpHdr) -> bool {
    use lb_common::family::IpHeader;
    // SAFETY: the caller bounds-checked the fixed IP header.
    F::is_vip(unsafe { (*ip).destination() })
}

/// A packet of an established flow: replies are turned back into the VIP's,
/// FIN/RST start closing. `None`: a SYN ended the flow; it is a new one.
#[inline(always)]
fn established<F: PathFamily>(
    ctx: &XdpContext,
    pkt: &Packet<F>,
    key: &F::FlowKey,
    flow: &mut Flow,
    seg: &Segment,
    now: u32,
) -> Option<Outcome> {
    if key.protocol() == IPPROTO_TCP {
        if closes(seg.flags) {
            // Only the sender's own FIN/RST is near its sequence; a blind
            // spoofer's RST is dropped, and its FIN (which the endpoint
            // discards too) does not close the flow.
            if in_window(seg.seq, flow.seq) {
                F::close(key, flow);
            } else if seg.flags & TCP_FLAG_RST != 0 {
                return Some(drop(Verdict::DropRstOutOfWindow));
            }
        } else if advances(seg.seq, flow.seq) {
            flow.seq = seg.seq;
        }
    }
    if flow.direction == REPLY {
        return Some(transmit::reverse_nat(ctx, pkt, key, flow));
    }
    // Only a TCP SYN pays for this branch; established packets go on.
    if opens_connection(seg.flags) && flows::restarts_on_syn(flow) {
        F::remove_flow(Table::Established, key, flow);
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
fn half_open<F: PathFamily>(
    ctx: &XdpContext,
    pkt: &Packet<F>,
    key: &F::FlowKey,
    flow: &mut Flow,
    slot: F::Slot,
    seg: &Segment,
    now: u32,
) -> Option<Outcome> {
    // A PROXY flow's SYN and SYN-ACK: their options (`proxy.rs`) first.
    let proxied = flow.flags & FLOW_F_PROXY != 0;
    if proxied && seg.flags & TCP_FLAG_SYN != 0 && stage::proxy_errand() != PROXY_DONE {
        return Some(F::to_proxy(ctx, PROXY_OPTIONS));
    }
    if flow.direction == REPLY {
        if key.protocol() == IPPROTO_TCP {
            F::answered(slot, key, flow, seg.flags, seg.seq);
        }
        return Some(transmit::reverse_nat(ctx, pkt, key, flow));
    }
    if opens_connection(seg.flags) && flows::restarts_on_syn(flow) {
        F::remove_flow(Table::HalfOpen, key, flow);
        return None;
    }
    let tcp = key.protocol() == IPPROTO_TCP;
    let confirm = confirms(flow, tcp, flow.vip != 0, seg.flags, seg.seq, seg.ack);
    if confirm == Confirm::Refused {
        return Some(drop(Verdict::DropBadHandshake));
    }
    // Data with a PROXY flow's promoting segment: established first (its
    // `first` moves from the half-open slot to the established one), then
    // the PROXY stage inserts the header as for any established segment.
    if proxied && confirm == Confirm::Promote && proxy::has_payload::<F>(ctx) {
        F::promote(key, flow, seg.seq, seg.ack, now);
        return Some(F::to_proxy(ctx, PROXY_ESTABLISHED));
    }
    let outcome = forward(ctx, pkt, key, flow, Table::HalfOpen, now);
    let delivered = matches!(
        outcome.reason,
        Verdict::Forwarded | Verdict::PassKernelForward
    );
    match confirm {
        Confirm::Promote if delivered => F::promote(key, flow, seg.seq, seg.ack, now),
        Confirm::Record { state, seq } if delivered => F::record(slot, key, state, seq),
        _ => {}
    }
    Some(outcome)
}

/// A packet to a VIP without a flow yet: find its service, schedule a
/// backend, enter the flow in `HALF_OPEN`, forward.
#[inline(always)]
fn new_flow<F: PathFamily>(
    ctx: &XdpContext,
    pkt: &Packet<F>,
    key: &F::FlowKey,
    (flags, seq): (u8, u32),
    now: u32,
) -> Outcome {
    // The global firewall scope first: before the service lookup, so a
    // denied source gets nothing from any VIP port.
    if let Err(outcome) = F::firewall(FW_GLOBAL, key.source()) {
        return outcome;
    }
    let Some(service_id) = F::service(&F::service_key(key)) else {
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
    if key.protocol() == IPPROTO_TCP && !opens_connection(flags) && !hashed {
        return drop(Verdict::DropNoFlow);
    }
    if let Err(outcome) = F::firewall(service_id, key.source()) {
        return outcome;
    }
    let backend_id = match F::schedule(key, service_id, conf) {
        Ok(id) => id,
        Err(outcome) => return outcome,
    };
    // DSR and the tunnels: the backend answers the client itself, so the
    // flow has no reply entry.
    let direct = answers_directly(conf.mode);
    // Over the budget, a flow the hash table finds again needs no entry: a
    // flood degrades to stateless forwarding instead of churning the table.
    // Other services cannot go without (NAT replies, round-robin choice):
    // they insert anyway, into the half-open table only.
    if !flows::within_budget(now) && direct && hashed {
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
    let state = if key.protocol() == IPPROTO_TCP && !opens_connection(flags) {
        STATE_PICKED_UP
    } else {
        STATE_NEW
    };
    let mut flow = if conf.mode == MODE_FULL_NAT {
        match F::create_full_nat(key, service_id, backend_id, state, now) {
            Ok(flow) => flow,
            Err(outcome) => return outcome,
        }
    } else {
        F::create(key, service_id, backend_id, !direct, state, now)
    };
    // A PROXY v2 service's flow opened by a SYN: flagged, and its SYN's
    // options fixed by the PROXY stage (which comes back here, to find the
    // flow half-open).
    if conf.enabled & SERVICE_PROXY_V2 != 0 && state == STATE_NEW && key.protocol() == IPPROTO_TCP {
        if F::mark_proxy(key, seq.wrapping_add(1)) {
            flow.flags |= FLOW_F_PROXY;
        }
        if stage::proxy_errand() != PROXY_DONE {
            return F::to_proxy(ctx, PROXY_OPTIONS);
        }
    }
    forward(ctx, pkt, key, &mut flow, Table::HalfOpen, now)
}

/// Step 5: may a packet of this pinned flow go on? Its service must still
/// exist; a backend that drops its flows (disabled, removed, down with
/// "drop flows") has the flow removed and the packet dropped.
#[inline(always)]
fn admit<F: PathFamily>(
    key: &F::FlowKey,
    flow: &Flow,
    table: Table,
) -> Result<(&'static ServiceConf, &'static Backend), Outcome> {
    let Some(conf) = SERVICE_CONF.get(flow.service_id) else {
        return Err(pass(Verdict::PassNoService));
    };
    if conf.enabled == 0 {
        // The service was removed: its flows go with it.
        return Err(pass(Verdict::PassNoService));
    }
    let Some(backend) = F::backend(flow.backend_id) else {
        return Err(drop(Verdict::DropNoBackend));
    };
    if backend.flags & BACKEND_F_DROP_FLOWS != 0 {
        F::remove_flow(table, key, flow);
        return Err(drop(Verdict::DropBackendGone));
    }
    Ok((conf, backend))
}

/// Steps 5 and 6 for a packet of a pinned flow: admitted, sent to its
/// backend in its service's mode, counted. The flow is a `CONNTRACK` value
/// (removed under us at worst: stale, never a fault) or a copy.
#[inline(always)]
fn forward<F: PathFamily>(
    ctx: &XdpContext,
    pkt: &Packet<F>,
    key: &F::FlowKey,
    flow: &mut Flow,
    table: Table,
    now: u32,
) -> Outcome {
    let (conf, backend) = match admit::<F>(key, flow, table) {
        Ok(admitted) => admitted,
        Err(outcome) => return outcome,
    };
    F::remember_fragment(pkt.ip, pkt.ports);
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    let (service_id, backend_id) = (flow.service_id, flow.backend_id);
    // A new flow's first packet: the backend's shared hop if it is fresh.
    let resolving =
        flow.next_hop.ifindex == 0 && !hops::borrow(backend_id, now, &mut flow.next_hop);
    // Full NAT: the source address and port the flow was given.
    let source = (F::reply_vip(flow), flow.vport);
    let outcome = transmit::to_backend_from(
        ctx,
        pkt,
        key,
        conf,
        (backend_id, backend),
        source,
        &mut flow.next_hop,
    );
    if resolving && flow.next_hop.ifindex != 0 {
        hops::share(backend_id, now, &flow.next_hop);
    }
    if outcome.reason == Verdict::Forwarded {
        count(&SERVICE_STATS, service_id, 1, bytes);
        count(&BACKEND_STATS, backend_id, 1, bytes);
    }
    outcome
}

/// A later fragment whose flow `frag` found (step 1): it follows the flow
/// as its packets do, admitted and counted, with the flow's rewrite on its
/// IP header only. It never creates, promotes or closes a flow.
#[inline(always)]
fn follow_fragment<F: PathFamily>(ctx: &XdpContext, found: Found<F, Fragment>) -> Outcome {
    let Found {
        eth,
        ip,
        key,
        mut flow,
        table,
        now,
        l4,
    } = found;
    // No L4 header in this frame: the flow's port and L4 checksum rewrite
    // lands in these two scratch words and goes nowhere.
    let mut scratch_ports = l4.ports;
    let mut scratch_check = 0u16;
    let pkt = Packet::<F> {
        eth,
        ip,
        ports: &mut scratch_ports,
        l4_check: &mut scratch_check,
        l4: 0,
        protocol: key.protocol(),
    };
    if flow.direction == REPLY {
        transmit::reverse_nat(ctx, &pkt, &key, &mut flow)
    } else {
        forward(ctx, &pkt, &key, &mut flow, table, now)
    }
}

/// An ICMP error quoting a packet of a flow `icmp` found (step 1): to the
/// flow's other end, translated; an error to a backend passes the flow's
/// admission as its packets do (a disabled backend's flows get nothing).
#[inline(always)]
fn follow_error<F: PathFamily>(ctx: &XdpContext, found: Found<F, Quote<F>>) -> Outcome {
    let Found {
        eth,
        ip,
        key,
        mut flow,
        table,
        l4,
        ..
    } = found;
    let pkt = Packet::<F> {
        eth,
        ip,
        ports: l4.ports,
        l4_check: l4.icmp_check,
        l4: 0,
        protocol: key.protocol(),
    };
    if flow.direction == REPLY {
        return transmit::error_to_client(ctx, &pkt, l4.quoted, &key, &mut flow);
    }
    match admit::<F>(&key, &flow, table) {
        Ok((conf, backend)) => {
            transmit::error_to_backend(ctx, &pkt, &key, l4.quoted, conf, backend, &mut flow)
        }
        Err(outcome) => outcome,
    }
}
