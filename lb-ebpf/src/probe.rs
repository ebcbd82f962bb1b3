//! Health checks through the VIP (docs/architecture.md, "Checks through the
//! VIP"; the layouts in lb-common/src/probe.rs). Two halves:
//!
//! - `lb_probe`, a second entry point of this object, on the host end of
//!   the probe namespace's veth: a probe (a packet from a source port with
//!   a `PROBES` entry) goes to its backend exactly as a client's packet of
//!   its service would (`transmit::to_backend`: the service's mode), and
//!   notes the way it left for its answer. Anything else IPv4 from there is
//!   dropped: handed to the LB's stack, a probe to the VIP would be
//!   answered by the LB itself.
//! - [`answer`], asked by the `lb` program for a packet that found no flow
//!   and is not for a VIP: the backend's answer to a probe goes back into
//!   the veth, before the LB's stack (to which its source, the VIP, is a
//!   martian) sees it.
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
    family::{Family, V4},
    headers::EthHdr,
    probe::{
        PROBE_COUNTERS, PROBE_PORTS, ProbeConf, ProbeCounter, ProbeEntry, answers, is_probe_port,
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

/// A frame from the probe namespace: a probe to its backend, or dropped.
#[inline(always)]
fn steer(ctx: &XdpContext) -> (u32, ProbeCounter) {
    let unknown = (xdp_action::XDP_DROP, ProbeCounter::Unknown);
    let Some(eth) = header::<EthHdr>(ctx, 0) else {
        return unknown;
    };
    // SAFETY: `header` checked the bounds against data_end.
    if unsafe { (*eth).ether_type } != V4::ETHER_TYPE_RAW {
        // IPv6 neighbour discovery and the like: the namespace's own, for
        // the kernel (the prober is IPv4 only; its gateway's MAC is static).
        return (xdp_action::XDP_PASS, ProbeCounter::Unknown);
    }
    let Some(ip) = V4::ip_header(ctx) else {
        return unknown;
    };
    let Ok(pkt) = V4::parse_l4(ctx, eth, ip) else {
        return unknown;
    };
    let key = flow_key(&pkt);
    let Some(entry) = PROBES.get_ptr_mut(&key.sport) else {
        return unknown;
    };
    // SAFETY: a map value; the agent rewrites it only before a probe's
    // first packet (it owns the port until then).
    let entry = unsafe { &mut *entry };
    if entry.vip != key.daddr || entry.vport != key.dport || entry.protocol != key.protocol {
        return unknown;
    }
    let Some(conf) = SERVICE_CONF.get(entry.service_id) else {
        return (xdp_action::XDP_DROP, ProbeCounter::NotSent);
    };
    if conf.enabled == 0 {
        return (xdp_action::XDP_DROP, ProbeCounter::NotSent);
    }
    let backend = Backend {
        addr: entry.backend,
        port: entry.backend_port,
        flags: 0,
        service_id: entry.service_id,
        _pad: 0,
    };
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

/// The `lb` program's question for a packet without a flow, not for a VIP:
/// is it a backend's answer to a probe? Then it goes into the probe
/// namespace. Packets to other ports pay two compares; those to a probe
/// port, one lookup.
#[inline(always)]
pub(crate) fn answer(
    ctx: &XdpContext,
    pkt: &Packet<V4>,
    key: &lb_common::FlowKey,
) -> Option<Outcome> {
    if !is_probe_port(u16::from_be(key.dport)) {
        return None;
    }
    // SAFETY: a plain hash lookup; the value is copied at once.
    let entry = unsafe { PROBES.get(&key.dport) }.copied()?;
    // SAFETY: bounds-checked Ethernet header.
    let source_mac = unsafe { (*pkt.eth).src };
    if !answers(
        &entry,
        key.saddr,
        key.sport,
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
