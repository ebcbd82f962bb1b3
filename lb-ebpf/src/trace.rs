//! Drop tracing (`lb trace`): an event for each packet not forwarded whose
//! verdict the `TRACE_ON` switch asks for. Forwarded packets never reach it.
//!
//! Each family's programs write their own event: IPv4's (`lb`, `lb_setup`,
//! `lb_proxy`) a 32-byte `TraceEvent`, IPv6's (`lb_v6`, `lb_v6_setup`,
//! `lb_v6_portless`) a 56-byte `TraceEvent6` with the 16-byte addresses,
//! into the one `TRACE` ring buffer (the reader tells them apart by
//! length). So IPv4's programs carry no IPv6 code, and the switch — the
//! whole cost while tracing is off — is the same one array lookup for all.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    macros::map,
    maps::{Array, RingBuf},
    programs::XdpContext,
};
use lb_common::{
    ServiceKey, TRACE_NO_SERVICE, TRACE_RING_BYTES, TraceConf, TraceEvent, Verdict,
    family::{V4, V6},
    headers::{EthHdr, L4Ports},
    ipv6::{ETH_P_IPV6_RAW, Ipv6Hdr, carries_ports, copy_addr},
    maps6::{ServiceKey6, TraceEvent6},
};

use crate::{SERVICES, mem::header, parse::frame_tuple, v6::SERVICES6};

/// Drop tracing's switch: which verdicts to trace (none by default) and how
/// many events were lost. Written by `lb trace`.
#[map]
static TRACE_ON: Array<TraceConf> = Array::with_max_entries(1, 0);
/// Drop tracing's events, read by `lb trace`.
#[map]
static TRACE: RingBuf = RingBuf::with_byte_size(TRACE_RING_BYTES, 0);

/// A family's drop-tracing event: how its programs describe a frame.
pub(crate) trait Traced {
    /// Writes the event for the frame into `TRACE`; false when the ring
    /// buffer had no room.
    fn send(ctx: &XdpContext, reason: Verdict) -> bool;
}

/// Drop tracing: when `TRACE_ON` asks for this verdict, reads the frame's
/// headers again (each bounds-checked; the frame is as the program left it)
/// and sends one event of family `F` to `TRACE`. Off, it costs one array
/// lookup.
#[inline(always)]
pub(crate) fn trace<F: Traced>(ctx: &XdpContext, reason: Verdict) {
    let Some(conf) = TRACE_ON.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: a valid TRACE_ON value; userspace writes it whole, rarely.
    if unsafe { (*conf).verdicts } & reason.trace_bit() == 0 {
        return;
    }
    if !F::send(ctx, reason) {
        // Ring buffer full: the reader is behind. Counted, not retried.
        // SAFETY: a valid, aligned u64 in an array map value; SeqCst so
        // that it stays an atomic add (see `schedule`).
        unsafe {
            atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(&raw mut (*conf).lost, 1);
        }
    }
}

impl Traced for V4 {
    #[inline(always)]
    fn send(ctx: &XdpContext, reason: Verdict) -> bool {
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
            return false;
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
        true
    }
}

impl Traced for V6 {
    /// The event is reserved first and filled from the frame in place: no
    /// 16-byte addresses on IPv6's stages' stack (it has no room to spare),
    /// only the service key of the lookup. The addresses and next header
    /// are the fixed header's; the ports are read when TCP or UDP follows
    /// it directly (behind extension headers the event has none).
    #[inline(always)]
    fn send(ctx: &XdpContext, reason: Verdict) -> bool {
        let Some(mut entry) = TRACE.reserve::<TraceEvent6>(0) else {
            return false;
        };
        let ev = entry.as_mut_ptr();
        // SAFETY: `ev` points at a reserved, 8-byte aligned TraceEvent6;
        // every field is written below, whatever the frame holds.
        unsafe {
            (&raw mut (*ev).verdict).write(reason as u32);
            (&raw mut (*ev).service_id).write(TRACE_NO_SERVICE);
            (&raw mut (*ev).saddr).write([0; 4]);
            (&raw mut (*ev).daddr).write([0; 4]);
            (&raw mut (*ev).sport).write(0);
            (&raw mut (*ev).dport).write(0);
            (&raw mut (*ev).protocol).write(0);
            (&raw mut (*ev)._pad0).write(0);
            (&raw mut (*ev).ether_type).write(0);
            (&raw mut (*ev).ifindex).write(ctx.ingress_ifindex() as u32);
            (&raw mut (*ev).len).write((ctx.data_end() - ctx.data()) as u32);
        }
        if let Some(eth) = header::<EthHdr>(ctx, 0) {
            // SAFETY: bounds-checked by `header`; `ev` as above.
            let ether_type = unsafe {
                let ether_type = (*eth).ether_type;
                (&raw mut (*ev).ether_type).write(ether_type);
                ether_type
            };
            if ether_type == ETH_P_IPV6_RAW
                && let Some(ip) = header::<Ipv6Hdr>(ctx, EthHdr::LEN)
            {
                // SAFETY: bounds-checked by `header`; `ev` as above. The
                // addresses word by word (`copy_addr`: no out-of-line
                // memmove).
                let protocol = unsafe {
                    copy_addr(&raw mut (*ev).saddr, &raw const (*ip).saddr);
                    copy_addr(&raw mut (*ev).daddr, &raw const (*ip).daddr);
                    (&raw mut (*ev).protocol).write((*ip).next_header);
                    (*ip).next_header
                };
                if carries_ports(protocol)
                    && let Some(ports) = header::<L4Ports>(ctx, EthHdr::LEN + Ipv6Hdr::LEN)
                {
                    // SAFETY: bounds-checked by `header`; `ev` as above.
                    let (vip, dport) = unsafe {
                        (&raw mut (*ev).sport).write((*ports).source);
                        (&raw mut (*ev).dport).write((*ports).dest);
                        ((*ip).daddr, (*ports).dest)
                    };
                    let service = ServiceKey6 {
                        vip,
                        port: dport,
                        protocol,
                        _pad: 0,
                    };
                    // SAFETY: a plain hash lookup; the id is copied at once
                    // into the reserved event.
                    if let Some(&id) = unsafe { SERVICES6.get(&service) } {
                        // SAFETY: `ev` as above.
                        unsafe { (&raw mut (*ev).service_id).write(id) };
                    }
                }
            }
        }
        entry.submit(0);
        true
    }
}
