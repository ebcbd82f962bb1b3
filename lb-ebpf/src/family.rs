//! The address families the packet path is instantiated for, and what each
//! brings of its own: the parse of its header, its stages for packets
//! without ports (fragments, ICMP errors), the frames it composes, its FIB
//! fields, and its hot maps and flow tables. The path (`path.rs`) is
//! written once over [`PathFamily`] (declared here); `V4` (v4.rs) is the one
//! instance. IPv6 is an
//! `impl PathFamily for V6` with its own maps (its own VIPs, services,
//! backends, flow tables, fragments), not a branch in the path.

use aya_ebpf::{bindings::bpf_fib_lookup as FibParams, programs::XdpContext};
use core::borrow::Borrow;
use lb_common::{
    Backend, EstablishedSlot, Flow, FlowConf, ServiceConf,
    family::{Family, FlowTuple},
    headers::{EthHdr, L4Ports},
};

use crate::{
    flows::{self, Hit, Table},
    parse::{Found, Fragment, Packet, PortLess, Quote},
    tunnel::TunnelFamily,
    verdict::Outcome,
};

/// A family the packet path runs on (see the module's doc).
pub(crate) trait PathFamily: Family + TunnelFamily + Sized {
    /// The half-open table's slot a copy was read from.
    type Slot: Copy;
    /// The packet's key as the second stage holds it (`carried`): IPv4's a
    /// copy on the stack (16 bytes), IPv6's a reference to where the first
    /// stage left it (`CARRY6`), so `lb_v6_setup`'s frame does not hold 40
    /// bytes more (its 512 bytes are shared with the out-of-line calls that
    /// write the established table).
    type CarriedKey: Borrow<Self::FlowKey>;
    /// Does the family have full NAT? (IPv6 not yet: its programs leave
    /// that code out.)
    const FULL_NAT: bool = true;

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
    /// The flow hash the hash schedulers use (also a GUE flow's source port).
    fn flow_hash(key: &Self::FlowKey) -> u32;
    /// A backend's answer to a check through the VIP, handed into the
    /// probe namespace (`probe.rs`); `None`: it is not one.
    fn probe_answer(ctx: &XdpContext, pkt: &Packet<Self>, key: &Self::FlowKey) -> Option<Outcome>;

    // ---- fragments, FIB, composed frames ----
    /// Records a first fragment's ports (as it arrived: `ports` not yet
    /// rewritten) for the fragments after it.
    fn remember_fragment(ip: *const Self::IpHdr, ports: *const L4Ports);
    /// `bpf_fib_lookup`'s family, source and destination fields.
    fn set_fib_addresses(fib: &mut FibParams, source: Self::Addr, destination: Self::Addr);
    /// Reports the next hop of a lookup without a neighbour entry.
    fn report_unresolved(fib: &FibParams);
    /// Answers a packet too big for its next hop ("fragmentation needed").
    fn too_big(ctx: &XdpContext, mtu: u16) -> Outcome;

    // ---- flow tables (step 2 and 4; `flows.rs` for IPv4) ----
    /// The live established entry of `key`; `to_vip` is asked only on a
    /// miss in the sender's bucket (a packet not to a VIP may be a NAT
    /// backend's reply, in its receiver's bucket).
    fn established(
        key: &mut Self::FlowKey,
        now: u32,
        to_vip: impl FnMut() -> bool,
    ) -> Option<*mut Flow>;
    /// [`Self::established`] given the packet's lifecycle settings (`conf`,
    /// read once per packet by the caller), with where the entry was found
    /// (IPv4: its `ESTABLISHED` slot, where a PROXY flow's `first` is).
    #[inline(always)]
    fn established_hit(
        _conf: Option<&'static FlowConf>,
        key: &mut Self::FlowKey,
        now: u32,
        to_vip: impl FnMut() -> bool,
    ) -> Option<Hit> {
        Self::established(key, now, to_vip).map(|entry| Hit { entry, slot: None })
    }
    /// `arrived`: the packet's own tuple (`key` before a full-NAT claim
    /// gave it its NAT shape).
    fn half_open(
        key: &Self::FlowKey,
        arrived: &Self::FlowKey,
        now: u32,
        to_vip: bool,
    ) -> Option<(Flow, Self::Slot)>;
    fn answered(slot: Self::Slot, key: &Self::FlowKey, reply: &Flow, flags: u8, seq: u32);
    fn record(slot: Self::Slot, forward: &Self::FlowKey, state: u32, seq: u32);
    fn close(key: &Self::FlowKey, flow: &mut Flow);
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

    // ---- full NAT (`fullnat.rs`; IPv4 only: another family's full-NAT
    // service gets no flows) ----
    /// A full-NAT service's new flow, with its claimed source address and
    /// port, entered half-open.
    #[inline(always)]
    fn create_full_nat(
        _key: &Self::FlowKey,
        _service_id: u32,
        _backend_id: u32,
        _state: u32,
        _now: u32,
    ) -> Result<Flow, Outcome> {
        Err(crate::verdict::drop(lb_common::Verdict::DropFnatExhausted))
    }
    /// What full NAT adds to `error_to_backend`: the outer source and the
    /// quoted destination become the flow's `source` address and port.
    #[inline(always)]
    fn full_nat_error_to_backend(
        _ip: &mut Self::IpHdr,
        _icmp_check: &mut u16,
        _quoted: &mut Self::IpHdr,
        _quoted_ports: &mut L4Ports,
        _source: (Self::Addr, u16),
    ) {
    }
    /// What full NAT adds to `error_to_client`: the outer destination and
    /// the quoted source become the `client`'s.
    #[inline(always)]
    fn full_nat_error_to_client(
        _ip: &mut Self::IpHdr,
        _icmp_check: &mut u16,
        _quoted: &mut Self::IpHdr,
        _quoted_ports: &mut L4Ports,
        _client: (Self::Addr, u16),
    ) {
    }

    // ---- PROXY v2 (`proxy.rs`: the rules, over these) ----
    /// The v2 header's bytes (TCP over IPv4: 28, over IPv6: 52).
    type ProxyHeader: Copy + AsRef<[u8]>;
    /// The TCP header's offset in a PROXY flow's frame: the end of the
    /// fixed IP header (IPv4 without options, IPv6 without extension
    /// headers).
    const PROXY_TCP_AT: usize;
    /// The header's length: what a PROXY flow's stream grows by.
    const PROXY_LEN: u32;
    /// Flags the half-open flow `forward` as a PROXY flow whose client's
    /// first sequence number is `first`.
    fn mark_proxy(forward: &Self::FlowKey, first: u32) -> bool;
    /// The header of the flow whose forward key is `forward`.
    fn proxy_header(forward: &Self::FlowKey) -> Self::ProxyHeader;
    /// The `first` of the flow whose entry `flow` (in `slot`, IPv4) was
    /// found under `key`, if known.
    fn proxy_first(
        key: &Self::FlowKey,
        flow: &Flow,
        slot: Option<*mut EstablishedSlot>,
    ) -> Option<u32>;
    /// Is the frame's TCP header at [`Self::PROXY_TCP_AT`]?
    fn proxy_fixed(ctx: &XdpContext) -> bool;
    /// The frame's TCP segment length (header and payload) as its IP
    /// header gives it.
    fn proxy_segment_len(ctx: &XdpContext) -> Option<u32>;
    /// Writes the grown TCP segment's length (`old` → `new`) into the IP
    /// header.
    fn proxy_set_segment_len(ctx: &XdpContext, old: u32, new: u32) -> bool;
    /// Hands the packet to the family's PROXY stage with `errand`
    /// (`stage::PROXY_*`); returns only if it could not.
    fn to_proxy(ctx: &XdpContext, errand: u32) -> Outcome;
    /// In the PROXY stage, after a SYN's or SYN-ACK's options: back to the
    /// family's second stage.
    fn proxy_back_to_setup(ctx: &XdpContext) -> Outcome;

    /// Hands a packet the established table missed to the path's second
    /// stage (`stage.rs`); returns only if it could not.
    fn to_setup(ctx: &XdpContext, key: &Self::FlowKey, to_vip: bool, now: u32) -> Outcome;
    /// In the second stage: the packet's key, whether it is to a VIP, and
    /// the tick, as the first stage carried them.
    fn carried() -> Option<(Self::CarriedKey, bool, u32)>;

    /// The live entry a tuple (as it arrives) belongs to, and its table: a
    /// flow's forward entry (client → VIP) or its reply entry (backend →
    /// client, NAT). Fragments and ICMP errors find their flow only through
    /// here; they never create, promote or close one. Both come as copies:
    /// their next hop is not worth caching.
    #[inline(always)]
    fn flow_of(key: &mut Self::FlowKey, now: u32) -> Option<(Flow, Table)> {
        let arrived = *key;
        let to_vip = Self::is_vip(key.destination());
        if let Some(entry) = Self::established(key, now, || to_vip) {
            // SAFETY: a flow table value (see `flows::established`).
            return Some((unsafe { flows::copy_flow(entry) }, Table::Established));
        }
        Self::half_open(key, &arrived, now, to_vip).map(|(flow, _)| (flow, Table::HalfOpen))
    }
}

/// A port-less packet's [`Found`], if `key` (its tuple as the flow's
/// packets arrive) has a live flow.
#[inline(always)]
pub(crate) fn found<F: PathFamily, L>(
    eth: *mut EthHdr,
    ip: *mut F::IpHdr,
    mut key: F::FlowKey,
    l4: L,
) -> Option<Found<F, L>> {
    let now = flows::now();
    let (flow, table) = F::flow_of(&mut key, now)?;
    Some(Found {
        eth,
        ip,
        key,
        flow,
        table,
        now,
        l4,
    })
}
