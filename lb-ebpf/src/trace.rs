//! Drop tracing (`lb trace`): an event for each packet not forwarded whose
//! verdict the `TRACE_ON` switch asks for. Forwarded packets never reach it.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    macros::map,
    maps::{Array, RingBuf},
    programs::XdpContext,
};
use lb_common::{
    ServiceKey, TRACE_NO_SERVICE, TRACE_RING_BYTES, TraceConf, TraceEvent, Verdict,
    headers::{ETH_P_IPV4_RAW, EthHdr, Ipv4Hdr, L4Ports, l4_layout},
};

use crate::{SERVICES, header};

/// Drop tracing's switch: which verdicts to trace (none by default) and how
/// many events were lost. Written by `lb trace`.
#[map]
static TRACE_ON: Array<TraceConf> = Array::with_max_entries(1, 0);
/// Drop tracing's events, read by `lb trace`.
#[map]
static TRACE: RingBuf = RingBuf::with_byte_size(TRACE_RING_BYTES, 0);

/// Drop tracing: when `TRACE_ON` asks for this verdict, reads the frame's
/// headers again (each bounds-checked; the frame is as the program left it)
/// and sends one event to `TRACE`. Off, it costs one array lookup.
#[inline(always)]
pub(crate) fn trace(ctx: &XdpContext, reason: Verdict) {
    let Some(conf) = TRACE_ON.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: a valid TRACE_ON value; userspace writes it whole, rarely.
    if unsafe { (*conf).verdicts } & reason.trace_bit() == 0 {
        return;
    }
    let (mut ether_type, mut saddr, mut daddr, mut protocol) = (0u16, 0u32, 0u32, 0u8);
    let (mut sport, mut dport, mut service_id) = (0u16, 0u16, TRACE_NO_SERVICE);
    if let Some(eth) = header::<EthHdr>(ctx, 0) {
        // SAFETY: bounds-checked by `header`.
        ether_type = unsafe { (*eth).ether_type };
    }
    if ether_type == ETH_P_IPV4_RAW
        && let Some(ip) = header::<Ipv4Hdr>(ctx, EthHdr::LEN)
    {
        // SAFETY: bounds-checked by `header`; a reference, not a copy.
        let hdr = unsafe { &*ip };
        (saddr, daddr, protocol) = (hdr.saddr, hdr.daddr, hdr.protocol);
        // Ports only where the balancer itself would read them: no options,
        // not a later fragment.
        let later_fragment = u16::from_be(hdr.frag_off) & 0x1fff != 0;
        if hdr.header_len() == Ipv4Hdr::LEN
            && !later_fragment
            && l4_layout(protocol).is_some()
            && let Some(ports) = header::<L4Ports>(ctx, EthHdr::LEN + Ipv4Hdr::LEN)
        {
            // SAFETY: bounds-checked by `header`.
            (sport, dport) = unsafe { ((*ports).source, (*ports).dest) };
            let service = ServiceKey {
                vip: daddr,
                port: dport,
                protocol,
                _pad: 0,
            };
            // SAFETY: a plain hash lookup; the value is copied at once.
            if let Some(&id) = unsafe { SERVICES.get(&service) } {
                service_id = id;
            }
        }
    }
    let Some(mut entry) = TRACE.reserve::<TraceEvent>(0) else {
        // Ring buffer full: the reader is behind. Counted, not retried.
        // SAFETY: a valid, aligned u64 in an array map value; SeqCst so
        // that it stays an atomic add (see `schedule`).
        unsafe {
            atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(&raw mut (*conf).lost, 1);
        }
        return;
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: `ev` points at a reserved, 8-byte aligned TraceEvent; every
    // field is written, one store each (no out-of-line memset/memcpy).
    unsafe {
        (&raw mut (*ev).verdict).write(reason as u32);
        (&raw mut (*ev).service_id).write(service_id);
        (&raw mut (*ev).saddr).write(saddr);
        (&raw mut (*ev).daddr).write(daddr);
        (&raw mut (*ev).sport).write(sport);
        (&raw mut (*ev).dport).write(dport);
        (&raw mut (*ev).protocol).write(protocol);
        (&raw mut (*ev)._pad0).write(0);
        (&raw mut (*ev).ether_type).write(ether_type);
        (&raw mut (*ev).ifindex).write(ctx.ingress_ifindex() as u32);
        (&raw mut (*ev).len).write((ctx.data_end() - ctx.data()) as u32);
    }
    entry.submit(0);
}
