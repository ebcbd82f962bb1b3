//! Drop tracing (`lb trace`): an event for each packet not forwarded whose
//! verdict the `TRACE_ON` switch asks for. Forwarded packets never reach it.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    macros::map,
    maps::{Array, RingBuf},
    programs::XdpContext,
};
use lb_common::{ServiceKey, TRACE_NO_SERVICE, TRACE_RING_BYTES, TraceConf, TraceEvent, Verdict};

use crate::{SERVICES, parse::frame_tuple};

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
    let t = frame_tuple(ctx);
    let mut service_id = TRACE_NO_SERVICE;
    if t.ports {
        let service = ServiceKey {
            vip: t.daddr,
            port: t.dport,
            protocol: t.protocol,
            _pad: 0,
        };
        // SAFETY: a plain hash lookup; the value is copied at once.
        if let Some(&id) = unsafe { SERVICES.get(&service) } {
            service_id = id;
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
        (&raw mut (*ev).saddr).write(t.saddr);
        (&raw mut (*ev).daddr).write(t.daddr);
        (&raw mut (*ev).sport).write(t.sport);
        (&raw mut (*ev).dport).write(t.dport);
        (&raw mut (*ev).protocol).write(t.protocol);
        (&raw mut (*ev)._pad0).write(0);
        (&raw mut (*ev).ether_type).write(t.ether_type);
        (&raw mut (*ev).ifindex).write(ctx.ingress_ifindex() as u32);
        (&raw mut (*ev).len).write((ctx.data_end() - ctx.data()) as u32);
    }
    entry.submit(0);
}
