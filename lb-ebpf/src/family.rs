//! The address families the packet path is instantiated for, and what each
//! brings of its own: the parse of its header, its stages for packets
//! without ports (fragments, ICMP errors), the frames it composes, its FIB
//! fields, and its hot maps and flow tables. The path (`path.rs`) is
//! written once over [`PathFamily`]; `V4` is the one instance. IPv6 is an
//! `impl PathFamily for V6` with its own maps (its own VIPs, services,
//! backends, flow tables, fragments), not a branch in the path.

use aya_ebpf::{bindings::bpf_fib_lookup as FibParams, programs::XdpContext};
use lb_common::{
    Backend, Flow, FlowKey, ServiceConf, ServiceKey,
    family::{Family, FlowTuple, V4},
    headers::{EthHdr, Ipv4Hdr},
};

use crate::{
    BACKENDS, SERVICES, VIPS, compose, firewall,
    flows::{self, Slot, Table},
    frag, hops, icmp,
    mem::header,
    parse::{self, Found, Fragment, Packet, PortLess, Quote},
    schedule,
    verdict::Outcome,
};

/// A family the packet path runs on (see the module's doc).
pub(crate) trait PathFamily: Family + Sized {
    /// The half-open table's slot a copy was read from.
    type Slot: Copy;

    // ---- parse (step 1) ----
    /// The bounds-checked fixed IP header after the Ethernet header.
    fn ip_header(ctx: &XdpContext) -> Option<*mut Self::IpHdr>;
    /// Is this a packet without ports of its own (one compare each)?
    fn port_less(ip: *const Self::IpHdr) -> PortLess;
    /// A later fragment's flow, if its first fragment was seen.
    fn later_fragment(
        ctx: &XdpContext,
        eth: *mut EthHdr,
        ip: *mut Self::IpHdr,
    ) -> Option<Found<Self, Fragment>>;
    /// The flow an ICMP error quotes, if it is one of ours.
    fn error_of_flow(
        ctx: &XdpContext,
        eth: *mut EthHdr,
        ip: *mut Self::IpHdr,
    ) -> Option<Found<Self, Quote<Self>>>;
    /// The VIP rules: a TCP/UDP packet the path can balance, or the
    /// verdict of one it cannot.
    fn parse_l4(
        ctx: &XdpContext,
        eth: *mut EthHdr,
        ip: *mut Self::IpHdr,
    ) -> Result<Packet<Self>, Outcome>;

    // ---- hot maps ----
    fn is_vip(addr: Self::Addr) -> bool;
    /// The service id of (VIP, port, protocol).
    fn service(key: &Self::ServiceKey) -> Option<u32>;
    fn backend(id: u32) -> Option<&'static Backend>;
    fn backend_addr(backend: &Backend) -> Self::Addr;
    /// A reply entry's VIP (the source its replies get).
    fn reply_vip(flow: &Flow) -> Self::Addr;
    /// The firewall (step 4) of one scope for a new flow from `source`.
    fn firewall(scope: u32, source: Self::Addr) -> Result<(), Outcome>;
    /// A new flow's backend (step 4).
    fn schedule(key: &Self::FlowKey, service_id: u32, conf: &ServiceConf) -> Result<u32, Outcome>;

    // ---- fragments, FIB, composed frames ----
    /// Records a first fragment's ports for the fragments after it.
    fn remember_fragment(ip: *const Self::IpHdr, key: &Self::FlowKey);
    /// `bpf_fib_lookup`'s family, source and destination fields.
    fn set_fib_addresses(fib: &mut FibParams, source: Self::Addr, destination: Self::Addr);
    /// Reports the next hop of a lookup without a neighbour entry.
    fn report_unresolved(fib: &FibParams);
    /// Answers a packet too big for its next hop ("fragmentation needed").
    fn too_big(ctx: &XdpContext, mtu: u16) -> Outcome;

    // ---- flow tables (step 2 and 4; `flows.rs` for IPv4) ----
    fn established(key: &Self::FlowKey, now: u32) -> Option<*mut Flow>;
    fn half_open(key: &Self::FlowKey, now: u32, to_vip: bool) -> Option<(Flow, Self::Slot)>;
    fn answered(slot: Self::Slot, key: &Self::FlowKey, reply: &Flow, flags: u8, seq: u32);
    fn record(slot: Self::Slot, forward: &Self::FlowKey, state: u32, seq: u32);
    fn close(key: &Self::FlowKey, flow: &mut Flow);
    fn restarted_by_syn(table: Table, key: &Self::FlowKey, flow: &Flow) -> bool;
    fn promote(key: &Self::FlowKey, flow: &mut Flow, seq: u32, ack: u32, now: u32);
    fn create(
        key: &Self::FlowKey,
        service_id: u32,
        backend_id: u32,
        nat: bool,
        state: u32,
        now: u32,
    ) -> Flow;
    fn remove_flow(table: Table, key: &Self::FlowKey, flow: &Flow);
    fn from_nat_backend(key: &Self::FlowKey) -> bool;

    /// The live entry a tuple (as it arrives) belongs to, and its table: a
    /// flow's forward entry (client → VIP) or its reply entry (backend →
    /// client, NAT). Fragments and ICMP errors find their flow only through
    /// here; they never create, promote or close one. Both come as copies:
    /// their next hop is not worth caching.
    #[inline(always)]
    fn flow_of(key: &Self::FlowKey, now: u32) -> Option<(Flow, Table)> {
        if let Some(entry) = Self::established(key, now) {
            // SAFETY: a flow table value (see `flows::established`).
            return Some((unsafe { flows::copy_flow(entry) }, Table::Established));
        }
        Self::half_open(key, now, Self::is_vip(key.destination()))
            .map(|(flow, _)| (flow, Table::HalfOpen))
    }
}

impl PathFamily for V4 {
    type Slot = Slot;

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
    fn remember_fragment(ip: *const Ipv4Hdr, key: &FlowKey) {
        frag::remember(ip, key);
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
    fn established(key: &FlowKey, now: u32) -> Option<*mut Flow> {
        flows::established(key, now)
    }

    #[inline(always)]
    fn half_open(key: &FlowKey, now: u32, to_vip: bool) -> Option<(Flow, Slot)> {
        flows::half_open(key, now, to_vip)
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
    fn restarted_by_syn(table: Table, key: &FlowKey, flow: &Flow) -> bool {
        flows::restarted_by_syn(table, key, flow)
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
}
