//! Packet capture (`lb capture`): while the `CAPTURE_ON` switch asks for
//! the packet's class (forwarded, or not) and its filter takes the frame as
//! the program leaves it, copies the frame's first `snaplen` bytes into
//! `CAPTURE`. Off, it costs one array lookup and one branch.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    helpers::generated::{bpf_ktime_get_ns, bpf_xdp_load_bytes},
    macros::map,
    maps::{Array, RingBuf},
    programs::XdpContext,
};
use lb_common::{
    Verdict,
    capture::{
        CAPTURE_FORWARDED, CAPTURE_MAX_SNAPLEN, CAPTURE_NOT_FORWARDED, CAPTURE_RING_BYTES,
        CaptureConf, CaptureRecord, CaptureTuple,
    },
};

use crate::parse::frame_tuple;

/// Capture's switch and filter, written by `lb capture`.
#[map]
static CAPTURE_ON: Array<CaptureConf> = Array::with_max_entries(1, 0);
/// Captured frames, read by `lb capture`.
#[map]
static CAPTURE: RingBuf = RingBuf::with_byte_size(CAPTURE_RING_BYTES, 0);

#[inline(always)]
pub(crate) fn capture(ctx: &XdpContext, reason: Verdict) {
    let Some(conf) = CAPTURE_ON.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: a valid CAPTURE_ON value; userspace writes it whole, rarely.
    let what = unsafe { (*conf).what };
    if what == 0 {
        return;
    }
    let class = if reason.is_forwarded() {
        CAPTURE_FORWARDED
    } else {
        CAPTURE_NOT_FORWARDED
    };
    // SAFETY: as above; a reference for the filter, not a copy.
    let conf_ref = unsafe { &*conf };
    if what & class == 0 || !conf_ref.matches(&tuple(ctx)) {
        return;
    }
    let len = (ctx.data_end() - ctx.data()) as u32;
    let snaplen = conf_ref.snaplen;
    let caplen = if len < snaplen { len } else { snaplen };
    // The helper wants a length the verifier can bound: 1..=MAX.
    if caplen == 0 || caplen > CAPTURE_MAX_SNAPLEN {
        return;
    }
    let Some(mut entry) = CAPTURE.reserve::<CaptureRecord>(0) else {
        // Ring buffer full: the reader is behind. Counted, not retried.
        // SAFETY: a valid, aligned u64 in an array map value; SeqCst so
        // that it stays an atomic add.
        unsafe {
            atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(&raw mut (*conf).lost, 1);
        }
        return;
    };
    let rec = entry.as_mut_ptr();
    // SAFETY: `rec` points at a reserved CaptureRecord; the helper writes at
    // most `caplen` ≤ CAPTURE_MAX_SNAPLEN bytes into its data.
    let copied = unsafe { bpf_xdp_load_bytes(ctx.ctx, 0, (&raw mut (*rec).data).cast(), caplen) };
    if copied != 0 {
        entry.discard(0);
        return;
    }
    // SAFETY: as above; one store per field.
    unsafe {
        (&raw mut (*rec).ktime_ns).write(bpf_ktime_get_ns());
        (&raw mut (*rec).len).write(len);
        (&raw mut (*rec).caplen).write(caplen);
        (&raw mut (*rec).verdict).write(reason as u32);
        (&raw mut (*rec).ifindex).write(ctx.ingress_ifindex() as u32);
    }
    entry.submit(0);
}

/// The frame's addresses and ports as the program left them (zeros where
/// it has none: not IPv4, options, a later fragment, another protocol).
#[inline(always)]
fn tuple(ctx: &XdpContext) -> CaptureTuple {
    let t = frame_tuple(ctx);
    CaptureTuple {
        saddr: t.saddr,
        daddr: t.daddr,
        sport: t.sport,
        dport: t.dport,
    }
}
