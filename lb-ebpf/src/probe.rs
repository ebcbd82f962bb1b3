//! Health checks through the VIP (docs/architecture.md, "Checks through the
//! VIP"; the layouts in lb-common/src/probe.rs). Two halves:
//!
//! - `lb_probe`, a second entry point of this object, on the host end of
//!   the probe namespace's veth: a probe (a packet from a source port with
//!   a `PROBES` entry) goes to its backend exactly as a client's packet of
//!   its service would (`transmit::to_backend`: the service's mode), and
//!   notes the way it left for its answer. Anything else IPv4 or IPv6 from
//!   there is dropped (but IPv6's link-scoped housekeeping): handed to the
//!   LB's stack, a probe to the VIP would be answered by the LB itself.
//! - [`answer`], asked by the `lb` program (IPv6: `lb_v6_setup`) for a
//!   packet that found no flow and is not for a VIP: the backend's answer
//!   to a probe goes back into the veth, before the LB's stack (to which
//!   its source, the VIP, is a martian) sees it.
//!
//! Both halves are written once over [`ProbeFamily`]: IPv4's probes are in
//! `PROBES`, IPv6's in `PROBES6` (the same entry with 16-byte addresses).
//!
//! Probes are never a service's or backend's traffic: they count in
//! `PROBE_STATS` only.

use aya_ebpf::{
    bindings::xdp_action,
    helpers::generated::bpf_redirect,
    macros::{map, xdp},
    maps::{Array, HashMap, PerCpuArray},
    programs::XdpContext,
};
use lb_common::{
    Backend, NextHop, Verdict,
    family::{Family, FlowTuple, V4, V6},
    headers::EthHdr,
    ipv6::{Addr6, copy_addr, is_link_scoped},
    maps6::FlowKey6,
    probe::{
        PROBE_COUNTERS, PROBE_PORTS, ProbeAddr, ProbeConf, ProbeCounter, ProbeEntry, ProbeEntry6,
        ProbeEntryOf, answers, is_probe_port,
    },
};

use crate::{
    SERVICE_CONF,
    family::PathFamily,
    mem::{copy_mac, header},
    parse::{Packet, flow_key},
    transmit,
    verdict::{Outcome, count},
};

/// Probe source port (network order) → where the probe goes. The agent's
/// prober writes it; `lb_probe` notes the way out in it.
#[map]
static PROBES: HashMap<u16, ProbeEntry> = HashMap::with_max_entries(PROBE_PORTS, 0);
/// `PROBES` for IPv6 probes. A map of its own, not a family field in one:
/// IPv4's entries keep their 36 bytes and IPv4's lookups their key; the
/// agent hands each port to one probe of either family.
#[map]
static PROBES6: HashMap<u16, ProbeEntry6> = HashMap::with_max_entries(PROBE_PORTS, 0);
/// `[0]`: the probe namespace's veth (ifindex 0: no prober).
#[map]
static PROBE_CONF: Array<ProbeConf> = Array::with_max_entries(1, 0);
/// [`ProbeCounter`] → packets, per CPU.
#[map]
static PROBE_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(PROBE_COUNTERS, 0);

#[xdp]
pub fn lb_probe(ctx: XdpContext) -> u32 {
    let (action, counter) = steer(&ctx);
    count(&PROBE_STATS, counter as u32, 1, 0);
    action
}

/// A family's probes: its map, and the `Backend` the transmit code sends a
/// probe to (as a client's flow of the service would be sent).
pub(crate) trait ProbeFamily: PathFamily<Addr: ProbeAddr + 'static> {
    fn probes() -> &'static HashMap<u16, ProbeEntryOf<Self::Addr>>;
    fn backend_of(entry: &ProbeEntryOf<Self::Addr>) -> Backend;
    /// The key's destination port (an answer's probe port), in place: the
    /// lookup's key pointer is the key's own field, as IPv4's code had it
    /// (a copy on the stack first cost `lb_setup` verified instructions).
    fn probe_port(key: &Self::FlowKey) -> &u16;
}

impl ProbeFamily for V4 {
    #[inline(always)]
    fn probes() -> &'static HashMap<u16, ProbeEntry> {
        &PROBES
    }

    #[inline(always)]
    fn probe_port(key: &lb_common::FlowKey) -> &u16 {
        &key.dport
    }

    #[inline(always)]
    fn backend_of(entry: &ProbeEntry) -> Backend {
        Backend {
            addr: entry.backend,
            port: entry.backend_port,
            flags: 0,
            service_id: entry.service_id,
            _pad: 0,
        }
    }
}

impl ProbeFamily for V6 {
    #[inline(always)]
    fn probes() -> &'static HashMap<u16, ProbeEntry6> {
        &PROBES6
    }

    #[inline(always)]
    fn probe_port(key: &FlowKey6) -> &u16 {
        &key.dport
    }

    #[inline(always)]
    fn backend_of(entry: &ProbeEntry6) -> Backend {
        // An IPv6 backend's `addr` is its own id, the index of its
        // `BACKENDS6` slot (`V6::backend_addr`), as in `BACKENDS`.
        Backend {
            addr: entry.backend_id,
            port: entry.backend_port,
            flags: 0,
            service_id: entry.service_id,
            _pad: 0,
        }
    }
}

/// A frame from the probe namespace: a probe to its backend, or dropped.
#[inline(always)]
fn steer(ctx: &XdpContext) -> (u32, ProbeCounter) {
    let Some(eth) = header::<EthHdr>(ctx, 0) else {
        return (xdp_action::XDP_DROP, ProbeCounter::Unknown);
    };
    // SAFETY: `header` checked the bounds against data_end.
    let ether_type = unsafe { (*eth).ether_type };
    if ether_type == V4::ETHER_TYPE_RAW {
        let Some(ip) = V4::ip_header(ctx) else {
            return (xdp_action::XDP_DROP, ProbeCounter::Unknown);
        };
        return steer_to::<V4>(ctx, V4::parse_l4(ctx, eth, ip).ok());
    }
    if ether_type == V6::ETHER_TYPE_RAW {
        let Some(ip) = V6::ip_header(ctx) else {
            return (xdp_action::XDP_DROP, ProbeCounter::Unknown);
        };
        let mut destination: Addr6 = [0; 4];
        // SAFETY: `ip_header` checked the fixed header's bounds (16 bytes,
        // 2-byte aligned). `copy_addr`, not a copy by value, which compiles
        // to an out-of-line memmove on the bpf target (ipv6.rs).
        unsafe { copy_addr(&raw mut destination, &raw const (*ip).daddr) };
        if is_link_scoped(&destination) {
            // Neighbour discovery, MLD, router solicitation: the
            // namespace's own housekeeping on its link, which the LB's
            // stack never routes on (and no VIP is link-scoped). The
            // probes need none of it (the gateway's MAC is static).
            return (xdp_action::XDP_PASS, ProbeCounter::Unknown);
        }
        return steer_to::<V6>(ctx, V6::parse_l4(ctx, eth, ip).ok());
    }
    // ARP and the like: the namespace's own, for the kernel (its gateway's
    // MAC is static, so the probes need none of it).
    (xdp_action::XDP_PASS, ProbeCounter::Unknown)
}

/// A parsed frame (`None`: not TCP/UDP, or malformed) of family `F` from
/// the probe namespace: to its backend if it is a probe, else dropped.
#[inline(always)]
fn steer_to<F: ProbeFamily>(ctx: &XdpContext, pkt: Option<Packet<F>>) -> (u32, ProbeCounter) {
    let unknown = (xdp_action::XDP_DROP, ProbeCounter::Unknown);
    let Some(pkt) = pkt else {
        return unknown;
    };
    let key = flow_key(&pkt);
    let Some(entry) = F::probes().get_ptr_mut(&key.source_port()) else {
        return unknown;
    };
    // SAFETY: a map value; the agent rewrites it only before a probe's
    // first packet (it owns the port until then).
    let entry = unsafe { &mut *entry };
    if !entry.vip.same(&key.destination())
        || entry.vport != key.destination_port()
        || entry.protocol != key.protocol()
    {
        return unknown;
    }
    let Some(conf) = SERVICE_CONF.get(entry.service_id) else {
        return (xdp_action::XDP_DROP, ProbeCounter::NotSent);
    };
    if conf.enabled == 0 {
        return (xdp_action::XDP_DROP, ProbeCounter::NotSent);
    }
    let backend = F::backend_of(entry);
    // No cached hop: a probe is rare, the FIB answers each.
    let mut hop = NextHop::default();
    let outcome = transmit::to_backend(ctx, &pkt, &key, conf, entry.backend_id, &backend, &mut hop);
    if outcome.reason != Verdict::Forwarded {
        // Never handed to the LB's stack (where the VIP would answer it):
        // the probe fails, and the agent resolves the backend meanwhile.
        return (xdp_action::XDP_DROP, ProbeCounter::NotSent);
    }
    entry.ifindex = hop.ifindex;
    copy_mac(&raw mut entry.mac, &hop.dmac);
    (outcome.action, ProbeCounter::Sent)
}

/// The `lb` program's question (`lb_v6_setup`'s for IPv6) for a packet
/// without a flow, not for a VIP: is it a backend's answer to a probe?
/// Then it goes into the probe namespace. Packets to other ports pay two
/// compares; those to a probe port, one lookup.
#[inline(always)]
pub(crate) fn answer<F: ProbeFamily>(
    ctx: &XdpContext,
    pkt: &Packet<F>,
    key: &F::FlowKey,
) -> Option<Outcome> {
    let port = F::probe_port(key);
    if !is_probe_port(u16::from_be(*port)) {
        return None;
    }
    // SAFETY: a plain hash lookup; the value is copied at once.
    let entry = unsafe { F::probes().get(port) }.copied()?;
    // SAFETY: bounds-checked Ethernet header.
    let source_mac = unsafe { (*pkt.eth).src };
    if !answers(
        &entry,
        key.source(),
        key.source_port(),
        ctx.ingress_ifindex() as u32,
        &source_mac,
    ) {
        return None;
    }
    let conf = PROBE_CONF.get(0)?;
    if conf.ifindex == 0 {
        return None;
    }
    // SAFETY: bounds-checked Ethernet header.
    unsafe {
        copy_mac(&raw mut (*pkt.eth).dst, &conf.probe_mac);
        copy_mac(&raw mut (*pkt.eth).src, &conf.host_mac);
    }
    count(&PROBE_STATS, ProbeCounter::Answers as u32, 1, 0);
    // SAFETY: plain helper call.
    let action = unsafe { bpf_redirect(conf.ifindex, 0) } as u32;
    Some(Outcome {
        action,
        reason: Verdict::ForwardedProbeReply,
    })
}
