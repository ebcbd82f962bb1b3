//! IPv6, the packet path's second family: its maps (VIPs, services,
//! backends' addresses, NAT endpoints; its flow tables are `flows6.rs`)
//! and its `impl PathFamily for V6`, so `path.rs` runs for IPv6 as it does
//! for IPv4, in programs of its own:
//!
//! - `lb` tail-calls `lb_v6` (`STAGES[STAGE_V6]`) with every IPv6 frame
//!   (EtherType 0x86DD): one compare and a tail call on IPv4's program, so
//!   IPv4's code, stack and verifier budget stay as they were;
//! - `lb_v6` is `path::balance::<V6>` (parse with the extension-header
//!   walk, `parse6`; the established table), and tail-calls `lb_v6_setup`
//!   (`STAGES[STAGE_V6_SETUP]`), `path::setup::<V6>` (half-open and new
//!   flows), on a miss, as `lb` does `lb_setup`.
//!
//! Traffic not to an IPv6 VIP and of no flow (neighbour discovery, router
//! advertisements, the host's own traffic) passes untouched. Ids are
//! IPv4's: an IPv6 service has its `SERVICE_CONF`, rings and Maglev table
//! under its id as any service, an IPv6 backend its `BACKENDS` slot (port,
//! flags, service; its `addr` the index of its `BACKENDS6` slot, its own
//! id) and its counters.
//!
//! Packets without ports of their own — fragments (`frag6.rs`), ICMPv6
//! errors quoting a flow (`icmp6.rs`) — are handed by `lb` to a third
//! program, `lb_v6_portless` (`STAGES[STAGE_V6_PORTLESS]`,
//! `path::port_less::<V6>`), so neither IPv6 stage carries their code on
//! its verifier budget. A packet too big for its next hop is answered with
//! ICMPv6 "packet too big" (`icmp6::too_big`), by that program too.
//!
//! PROXY v2 (NAT66) is `proxy.rs`'s rules over this family's frame: the
//! TCP header at the fixed header's end (a PROXY flow's packet with
//! extension headers is dropped, `drop_proxy_ext_headers`), `first` in
//! `PROXY_FLOWS6` (`flows6.rs`), its PROXY stage a program of its own,
//! `lb_proxy6` (`STAGES[STAGE_PROXY6]`; `lb_proxy` with IPv6's path beside
//! IPv4's was past the verifier's 1 000 000 instructions).
//!
//! The tunnels carry IPv6 services in IPv6 (IP6IP6, GUE over IPv6:
//! `tunnel.rs`). Not built for IPv6 yet (docs/architecture.md, "IPv6"):
//! full NAT (config refuses it).

use aya_ebpf::{
    bindings::bpf_fib_lookup as FibParams,
    macros::map,
    maps::{Array, HashMap, PerCpuArray},
    programs::XdpContext,
};
use lb_common::{
    Backend, EstablishedSlot, Flow, MAX_BACKENDS, MAX_SERVICES, ServiceConf, Verdict,
    family::V6,
    hash::{flow_hash6, source_hash6},
    headers::{EthHdr, IPPROTO_TCP, L4Ports},
    ipv6::{Addr6, Ipv6Hdr},
    maps6::{
        Backend6, Endpoint6, FlowKey6, STAGE_PROXY6, STAGE_V6, STAGE_V6_PORTLESS, STAGE_V6_SETUP,
        ServiceKey6,
    },
    proxy::{V6_LEN, header_v6_raw},
};

use crate::{
    BACKENDS,
    family::PathFamily,
    firewall,
    flows::{Table, write_words},
    flows6::{self, Slot6},
    frag6, hops, icmp6,
    mem::header,
    parse::{Found, Fragment, Packet, PortLess, Quote},
    parse6, probe, schedule,
    stage::{self, tail_call},
    verdict::{Outcome, drop, pass},
};

/// IPv6 VIP → number of services on it: "is this packet for us at all",
/// as `VIPS` for IPv4.
#[map]
pub(crate) static VIPS6: HashMap<Addr6, u32> = HashMap::with_max_entries(MAX_SERVICES, 0);
/// (IPv6 VIP, port, protocol) → service id. Written by the agent.
#[map]
pub(crate) static SERVICES6: HashMap<ServiceKey6, u32> = HashMap::with_max_entries(MAX_SERVICES, 0);
/// Service id → its IPv6 VIP: the source a NAT reply gets.
#[map]
pub(crate) static SERVICE_VIPS6: Array<Addr6> = Array::with_max_entries(MAX_SERVICES, 0);
/// Backend id → the IPv6 backend's address (its port, flags and service
/// are in `BACKENDS`).
#[map]
pub(crate) static BACKENDS6: Array<Backend6> = Array::with_max_entries(MAX_BACKENDS, 0);
/// The backend endpoints of IPv6 NAT services: their segments that find no
/// flow are dropped (`DropBackendNoFlow`).
#[map]
pub(crate) static NAT_BACKENDS6: HashMap<Endpoint6, u32> =
    HashMap::with_max_entries(MAX_BACKENDS, 0);

/// What `lb_v6` hands `lb_v6_setup` (as `stage::Carry` for IPv4), and
/// the flow tables' scratch (`flows6`): a flow's other key and entry are
/// built here, not on the stack (IPv6's stages have no room left in their
/// 512 bytes for 40-byte keys and 48-byte entries in out-of-line calls).
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct Carry6 {
    key: FlowKey6,
    to_vip: u32,
    now: u32,
    pub(crate) pair: FlowKey6,
    pub(crate) entry: Flow,
}

#[map]
pub(crate) static CARRY6: PerCpuArray<Carry6> = PerCpuArray::with_max_entries(1, 0);

/// In `lb`: hands an IPv6 frame to IPv6's own program: a fragment or an
/// ICMPv6 error to `lb_v6_portless` (which sends a first fragment on to
/// `lb_v6`, its ports recorded), anything else to `lb_v6`. Chosen here,
/// where nothing follows the tail call, so `lb_v6`'s path is verified as
/// it was. Without the program (an agent that has not loaded it yet), the
/// frame is the kernel's.
#[inline(always)]
pub(crate) fn to_v6(ctx: &XdpContext) -> Outcome {
    // Two call sites, each with its slot a constant (`stage::tail_call`):
    // the JIT's direct jump, not a retpolined indirect one.
    if frag6::is_fragment(ctx) || icmp6::is_error(ctx) {
        tail_call::<STAGE_V6_PORTLESS>(ctx);
    } else {
        tail_call::<STAGE_V6>(ctx);
    }
    pass(Verdict::PassNotOurs)
}

impl PathFamily for V6 {
    type Slot = Slot6;
    type CarriedKey = &'static FlowKey6;
    const FULL_NAT: bool = false;

    #[inline(always)]
    fn ip_header(ctx: &XdpContext) -> Option<*mut Ipv6Hdr> {
        header::<Ipv6Hdr>(ctx, EthHdr::LEN)
    }

    #[inline(always)]
    fn port_less(_ip: *const Ipv6Hdr) -> PortLess {
        // `lb_v6` hands later fragments and ICMPv6 errors to
        // `lb_v6_portless` before its path (`to_portless`): what reaches
        // `path::balance` has ports or is nothing the stages look at.
        PortLess::No
    }

    #[inline(always)]
    fn later_fragment(
        ctx: &XdpContext,
        eth: *mut EthHdr,
        ip: *mut Ipv6Hdr,
    ) -> Option<Found<V6, Fragment>> {
        frag6::later_fragment(ctx, eth, ip)
    }

    #[inline(always)]
    fn error_of_flow(
        ctx: &XdpContext,
        eth: *mut EthHdr,
        ip: *mut Ipv6Hdr,
    ) -> Option<Found<V6, Quote<V6>>> {
        icmp6::error_of_flow(ctx, eth, ip)
    }

    #[inline(always)]
    fn parse_l4(
        ctx: &XdpContext,
        eth: *mut EthHdr,
        ip: *mut Ipv6Hdr,
    ) -> Result<Packet<V6>, Outcome> {
        parse6::parse_l4(ctx, eth, ip)
    }

    #[inline(always)]
    fn is_vip(addr: Addr6) -> bool {
        VIPS6.get_ptr(&addr).is_some()
    }

    #[inline(always)]
    fn service(key: &ServiceKey6) -> Option<u32> {
        // SAFETY: a plain hash lookup; the value is copied at once.
        unsafe { SERVICES6.get(key) }.copied()
    }

    #[inline(always)]
    fn backend(id: u32) -> Option<&'static Backend> {
        BACKENDS.get(id)
    }

    #[inline(always)]
    fn backend_addr(backend: &Backend) -> Addr6 {
        flows6::backend_addr(backend.addr)
    }

    #[inline(always)]
    fn reply_vip(flow: &Flow) -> Addr6 {
        flows6::service_vip(flow.service_id)
    }

    #[inline(always)]
    fn firewall(scope: u32, source: Addr6) -> Result<(), Outcome> {
        firewall::firewall6(scope, &source)
    }

    #[inline(always)]
    fn schedule(key: &FlowKey6, service_id: u32, conf: &ServiceConf) -> Result<u32, Outcome> {
        schedule::pick(
            service_id,
            conf,
            || flow_hash6(key),
            || source_hash6(&schedule::source_key6(service_id, &key.saddr), 128),
        )
    }

    #[inline(always)]
    fn flow_hash(key: &FlowKey6) -> u32 {
        flow_hash6(key)
    }

    #[inline(always)]
    fn probe_answer(ctx: &XdpContext, pkt: &Packet<V6>, key: &FlowKey6) -> Option<Outcome> {
        probe::answer(ctx, pkt, key)
    }

    #[inline(always)]
    fn remember_fragment(_ip: *const Ipv6Hdr, _ports: *const L4Ports) {
        // Recorded on arrival by `lb_v6_portless` (`frag6::record_first`):
        // here, in both IPv6 stages' paths, the verifier walked `lb_v6`
        // past its 1 000 000 instructions.
    }

    #[inline(always)]
    fn set_fib_addresses(fib: &mut FibParams, source: Addr6, destination: Addr6) {
        fib.__bindgen_anon_3.ipv6_src = source;
        fib.__bindgen_anon_4.ipv6_dst = destination;
    }

    #[inline(always)]
    fn report_unresolved(fib: &FibParams) {
        // SAFETY: on NO_NEIGH the kernel has set the egress interface and
        // the next hop's address (the gateway, or the destination).
        hops::wanted6(unsafe { &fib.__bindgen_anon_4.ipv6_dst }, fib.ifindex);
    }

    #[inline(always)]
    fn too_big(ctx: &XdpContext, mtu: u16) -> Outcome {
        icmp6::ask_too_big(ctx, mtu)
    }

    #[inline(always)]
    fn established(
        key: &mut FlowKey6,
        now: u32,
        _to_vip: impl FnMut() -> bool,
    ) -> Option<*mut Flow> {
        flows6::established(key, now)
    }

    #[inline(always)]
    fn half_open(
        key: &FlowKey6,
        _arrived: &FlowKey6,
        now: u32,
        _to_vip: bool,
    ) -> Option<(Flow, Slot6)> {
        flows6::half_open(key, now)
    }

    #[inline(always)]
    fn answered(_slot: Slot6, key: &FlowKey6, reply: &Flow, flags: u8, seq: u32) {
        flows6::answered(key, reply, flags, seq);
    }

    #[inline(always)]
    fn record(_slot: Slot6, forward: &FlowKey6, state: u32, seq: u32) {
        flows6::record(forward, state, seq);
    }

    #[inline(always)]
    fn close(key: &FlowKey6, flow: &mut Flow) {
        flows6::close(key, flow);
    }

    #[inline(always)]
    fn promote(key: &FlowKey6, flow: &mut Flow, seq: u32, ack: u32, now: u32) {
        flows6::promote(key, flow, seq, ack, now);
    }

    #[inline(always)]
    fn create(
        key: &FlowKey6,
        service_id: u32,
        backend_id: u32,
        nat: bool,
        state: u32,
        now: u32,
    ) -> Flow {
        flows6::create(key, service_id, backend_id, nat, state, now)
    }

    #[inline(always)]
    fn remove_flow(table: Table, key: &FlowKey6, flow: &Flow) {
        flows6::remove_flow(table, key, flow);
    }

    #[inline(always)]
    fn from_nat_backend(key: &FlowKey6) -> bool {
        flows6::from_nat_backend(key)
    }

    type ProxyHeader = [u8; V6_LEN];
    const PROXY_TCP_AT: usize = EthHdr::LEN + Ipv6Hdr::LEN;
    const PROXY_LEN: u32 = V6_LEN as u32;

    #[inline(always)]
    fn mark_proxy(forward: &FlowKey6, first: u32) -> bool {
        flows6::mark_proxy(forward, first)
    }

    #[inline(always)]
    fn proxy_header(forward: &FlowKey6) -> [u8; V6_LEN] {
        header_v6_raw(&forward.saddr, forward.sport, &forward.daddr, forward.dport)
    }

    #[inline(always)]
    fn proxy_first(
        key: &FlowKey6,
        flow: &Flow,
        _slot: Option<*mut EstablishedSlot>,
    ) -> Option<u32> {
        flows6::proxy_first(key, flow)
    }

    #[inline(always)]
    fn proxy_fixed(ctx: &XdpContext) -> bool {
        match header::<Ipv6Hdr>(ctx, EthHdr::LEN) {
            // SAFETY: bounds-checked.
            Some(ip) => (unsafe { (*ip).next_header }) == IPPROTO_TCP,
            None => false,
        }
    }

    #[inline(always)]
    fn proxy_segment_len(ctx: &XdpContext) -> Option<u32> {
        let ip = header::<Ipv6Hdr>(ctx, EthHdr::LEN)?;
        // SAFETY: bounds-checked; no extension headers (`proxy_fixed`):
        // the payload is the TCP segment.
        Some(unsafe { u16::from_be((*ip).payload_len) } as u32)
    }

    #[inline(always)]
    fn proxy_set_segment_len(ctx: &XdpContext, _old: u32, new: u32) -> bool {
        let Some(ip) = header::<Ipv6Hdr>(ctx, EthHdr::LEN) else {
            return false;
        };
        // SAFETY: bounds-checked. IPv6 has no header checksum; the TCP
        // checksum's pseudo-header length is the caller's.
        unsafe { (*ip).payload_len = (new as u16).to_be() };
        true
    }

    #[inline(always)]
    fn to_proxy(ctx: &XdpContext, errand: u32) -> Outcome {
        stage::to_proxy::<STAGE_PROXY6>(ctx, errand)
    }

    #[inline(always)]
    fn proxy_back_to_setup(ctx: &XdpContext) -> Outcome {
        stage::back_to_setup::<STAGE_V6_SETUP>(ctx)
    }

    #[inline(always)]
    fn to_setup(ctx: &XdpContext, key: &FlowKey6, to_vip: bool, now: u32) -> Outcome {
        let Some(carry) = CARRY6.get_ptr_mut(0) else {
            return drop(Verdict::DropNoStage);
        };
        // SAFETY: this CPU's slot; nothing else runs on it meanwhile.
        unsafe {
            write_words(&raw mut (*carry).key, key);
            (*carry).to_vip = to_vip as u32;
            (*carry).now = now;
        }
        stage::no_errand();
        tail_call::<STAGE_V6_SETUP>(ctx);
        drop(Verdict::DropNoStage)
    }

    #[inline(always)]
    fn carried() -> Option<(&'static FlowKey6, bool, u32)> {
        let carry = CARRY6.get_ptr(0)?;
        // SAFETY: this CPU's slot, written by the first stage just before;
        // the scratch (`pair`, `entry`) is other fields, so the key stays
        // as it is for the stage.
        unsafe { Some((&(*carry).key, (*carry).to_vip != 0, (*carry).now)) }
    }
}
