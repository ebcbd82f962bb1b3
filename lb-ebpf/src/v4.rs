//! IPv4, the packet path's one address family today: its header parse,
//! its stages for packets without ports (fragments, ICMP errors), the frames
//! it composes, its FIB fields, and its hot maps and flow tables, bound to
//! [`PathFamily`] (family.rs).

use aya_ebpf::{bindings::bpf_fib_lookup as FibParams, programs::XdpContext};
use lb_common::{
    Backend, EstablishedSlot, Flow, FlowConf, FlowKey, STAGE_PROXY, STAGE_SETUP, ServiceConf,
    ServiceKey,
    family::V4,
    headers::{EthHdr, Ipv4Hdr, L4Ports},
    proxy::{V4_LEN, header_v4},
};

use crate::{
    BACKENDS, SERVICES, VIPS, compose,
    family::PathFamily,
    firewall,
    flows::{self, Hit, Slot, Table},
    frag, fullnat, hops, icmp,
    mem::header,
    parse::{self, Found, Fragment, Packet, PortLess, Quote},
    probe, proxy, schedule, stage,
    verdict::Outcome,
};

impl PathFamily for V4 {
    type Slot = Slot;
    type CarriedKey = FlowKey;

    #[inline(always)]
    fn ip_header(ctx: &XdpContext) -> Option<*mut Ipv4Hdr> {
        header::<Ipv4Hdr>(ctx, EthHdr::LEN)
    }

    #[inline(always)]
    fn port_less(ip: *const Ipv4Hdr) -> PortLess {
        // SAFETY: the caller bounds-checked the fixed IPv4 header.
        let hdr = unsafe { &*ip };
        if hdr.is_later_fragment() {
            return PortLess::LaterFragment;
        }
        if hdr.protocol == lb_common::headers::IPPROTO_ICMP {
            return PortLess::Icmp;
        }
        PortLess::No
    }

    #[inline(always)]
    fn later_fragment(
        ctx: &XdpContext,
        eth: *mut EthHdr,
        ip: *mut Ipv4Hdr,
    ) -> Option<Found<V4, Fragment>> {
        frag::later_fragment(ctx, eth, ip)
    }

    #[inline(always)]
    fn error_of_flow(
        ctx: &XdpContext,
        eth: *mut EthHdr,
        ip: *mut Ipv4Hdr,
    ) -> Option<Found<V4, Quote<V4>>> {
        icmp::error_of_flow(ctx, eth, ip)
    }

    #[inline(always)]
    fn parse_l4(
        ctx: &XdpContext,
        eth: *mut EthHdr,
        ip: *mut Ipv4Hdr,
    ) -> Result<Packet<V4>, Outcome> {
        parse::parse_l4(ctx, eth, ip)
    }

    #[inline(always)]
    fn is_vip(addr: u32) -> bool {
        VIPS.get_ptr(addr).is_some()
    }

    #[inline(always)]
    fn service(key: &ServiceKey) -> Option<u32> {
        // SAFETY: a plain hash lookup; the value is copied at once.
        unsafe { SERVICES.get(key) }.copied()
    }

    #[inline(always)]
    fn backend(id: u32) -> Option<&'static Backend> {
        BACKENDS.get(id)
    }

    #[inline(always)]
    fn backend_addr(backend: &Backend) -> u32 {
        backend.addr
    }

    #[inline(always)]
    fn reply_vip(flow: &Flow) -> u32 {
        flow.vip
    }

    #[inline(always)]
    fn firewall(scope: u32, source: u32) -> Result<(), Outcome> {
        firewall::firewall(scope, source)
    }

    #[inline(always)]
    fn schedule(key: &FlowKey, service_id: u32, conf: &ServiceConf) -> Result<u32, Outcome> {
        schedule::schedule(key, service_id, conf)
    }

    #[inline(always)]
    fn flow_hash(key: &FlowKey) -> u32 {
        lb_common::hash::flow_hash(key)
    }

    #[inline(always)]
    fn probe_answer(ctx: &XdpContext, pkt: &Packet<V4>, key: &FlowKey) -> Option<Outcome> {
        probe::answer(ctx, pkt, key)
    }

    #[inline(always)]
    fn remember_fragment(ip: *const Ipv4Hdr, ports: *const L4Ports) {
        frag::remember(ip, ports);
    }

    #[inline(always)]
    fn set_fib_addresses(fib: &mut FibParams, source: u32, destination: u32) {
        fib.__bindgen_anon_3.ipv4_src = source;
        fib.__bindgen_anon_4.ipv4_dst = destination;
    }

    #[inline(always)]
    fn report_unresolved(fib: &FibParams) {
        // SAFETY: on NO_NEIGH the kernel has set the egress interface and
        // the next hop's address (the gateway, or the destination).
        hops::wanted(unsafe { fib.__bindgen_anon_4.ipv4_dst }, fib.ifindex);
    }

    #[inline(always)]
    fn too_big(ctx: &XdpContext, mtu: u16) -> Outcome {
        compose::too_big(ctx, mtu)
    }

    #[inline(always)]
    fn established(key: &mut FlowKey, now: u32, to_vip: impl FnMut() -> bool) -> Option<*mut Flow> {
        flows::established(key, now, to_vip)
    }

    #[inline(always)]
    fn established_hit(
        conf: Option<&'static FlowConf>,
        key: &mut FlowKey,
        now: u32,
        to_vip: impl FnMut() -> bool,
    ) -> Option<Hit> {
        flows::established_in(conf, key, now, to_vip)
    }

    #[inline(always)]
    fn half_open(key: &FlowKey, arrived: &FlowKey, now: u32, to_vip: bool) -> Option<(Flow, Slot)> {
        flows::half_open(key, arrived, now, to_vip)
    }

    #[inline(always)]
    fn answered(slot: Slot, key: &FlowKey, reply: &Flow, flags: u8, seq: u32) {
        flows::answered(slot, key, reply, flags, seq);
    }

    #[inline(always)]
    fn record(slot: Slot, forward: &FlowKey, state: u32, seq: u32) {
        flows::record(slot, forward, state, seq);
    }

    #[inline(always)]
    fn close(key: &FlowKey, flow: &mut Flow) {
        flows::close(key, flow);
    }

    #[inline(always)]
    fn promote(key: &FlowKey, flow: &mut Flow, seq: u32, ack: u32, now: u32) {
        flows::promote(key, flow, seq, ack, now);
    }

    #[inline(always)]
    fn create(
        key: &FlowKey,
        service_id: u32,
        backend_id: u32,
        nat: bool,
        state: u32,
        now: u32,
    ) -> Flow {
        flows::create(key, service_id, backend_id, nat, state, now)
    }

    #[inline(always)]
    fn remove_flow(table: Table, key: &FlowKey, flow: &Flow) {
        flows::remove_flow(table, key, flow);
    }

    #[inline(always)]
    fn from_nat_backend(key: &FlowKey) -> bool {
        flows::from_nat_backend(key)
    }

    #[inline(always)]
    fn to_setup(ctx: &XdpContext, key: &FlowKey, to_vip: bool, now: u32) -> Outcome {
        stage::to_setup(ctx, key, to_vip, now)
    }

    #[inline(always)]
    fn carried() -> Option<(FlowKey, bool, u32)> {
        stage::carried()
    }

    type ProxyHeader = [u8; V4_LEN];
    const PROXY_TCP_AT: usize = proxy::TCP_AT4;
    const PROXY_LEN: u32 = V4_LEN as u32;

    #[inline(always)]
    fn mark_proxy(forward: &FlowKey, first: u32) -> bool {
        flows::mark_proxy(forward, first)
    }

    #[inline(always)]
    fn proxy_header(forward: &FlowKey) -> [u8; V4_LEN] {
        header_v4(forward.saddr, forward.sport, forward.daddr, forward.dport)
    }

    #[inline(always)]
    fn proxy_first(key: &FlowKey, flow: &Flow, slot: Option<*mut EstablishedSlot>) -> Option<u32> {
        proxy::first4(key, flow, slot)
    }

    #[inline(always)]
    fn proxy_fixed(_ctx: &XdpContext) -> bool {
        // The VIP rules drop IPv4 with options (`DropIpOptions`).
        true
    }

    #[inline(always)]
    fn proxy_segment_len(ctx: &XdpContext) -> Option<u32> {
        proxy::segment_len4(ctx)
    }

    #[inline(always)]
    fn proxy_set_segment_len(ctx: &XdpContext, old: u32, new: u32) -> bool {
        proxy::set_segment_len4(ctx, old, new)
    }

    #[inline(always)]
    fn to_proxy(ctx: &XdpContext, errand: u32) -> Outcome {
        stage::to_proxy::<STAGE_PROXY>(ctx, errand)
    }

    #[inline(always)]
    fn proxy_back_to_setup(ctx: &XdpContext) -> Outcome {
        stage::back_to_setup::<STAGE_SETUP>(ctx)
    }

    #[inline(always)]
    fn create_full_nat(
        key: &FlowKey,
        service_id: u32,
        backend_id: u32,
        state: u32,
        now: u32,
    ) -> Result<Flow, Outcome> {
        fullnat::create(key, service_id, backend_id, state, now)
    }

    #[inline(always)]
    fn full_nat_error_to_backend(
        ip: &mut Ipv4Hdr,
        icmp_check: &mut u16,
        quoted: &mut Ipv4Hdr,
        quoted_ports: &mut L4Ports,
        source: (u32, u16),
    ) {
        lb_common::fullnat::error_to_backend_source(ip, icmp_check, quoted, quoted_ports, source);
    }

    #[inline(always)]
    fn full_nat_error_to_client(
        ip: &mut Ipv4Hdr,
        icmp_check: &mut u16,
        quoted: &mut Ipv4Hdr,
        quoted_ports: &mut L4Ports,
        client: (u32, u16),
    ) {
        lb_common::fullnat::error_to_client_destination(
            ip,
            icmp_check,
            quoted,
            quoted_ports,
            client,
        );
    }
}
