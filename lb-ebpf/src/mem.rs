//! Memory helpers of the packet path: bounds-checked pointers into the
//! frame, and copies into it written as plain stores (a struct or array
//! assignment became a call to an out-of-line BPF memcpy or memmove).

use core::mem::size_of;

use aya_ebpf::programs::XdpContext;

/// Bounds-checked pointer to a `T` at `offset` in the frame.
#[inline(always)]
pub(crate) fn header<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data() + offset;
    if start + size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some(start as *mut T)
}

/// Bounds-checked pointer to the frame's first `len` bytes (`len` a
/// constant once inlined: the PROXY stage's span of a family's headers).
#[inline(always)]
pub(crate) fn span(ctx: &XdpContext, len: usize) -> Option<*mut u8> {
    let start = ctx.data();
    if start + len > ctx.data_end() {
        return None;
    }
    Some(start as *mut u8)
}

/// Copies a MAC as three 16-bit stores (both sides are 2-byte aligned):
/// a `[u8; 6]` assignment became a call to an out-of-line BPF memmove.
#[inline(always)]
pub(crate) fn copy_mac(dst: *mut [u8; 6], src: &[u8; 6]) {
    let (d, s) = (dst.cast::<u16>(), src.as_ptr().cast::<u16>());
    for i in 0..3 {
        // SAFETY: both point at 6 valid bytes, 2-byte aligned.
        unsafe { core::ptr::write_volatile(d.add(i), core::ptr::read(s.add(i))) };
    }
}

/// Writes a header built on the stack into the frame at `offset` as 16-bit
/// volatile stores: a struct store became an out-of-line memcpy. (Map
/// values are copied by `flows::copy_words`, 32-bit words under a lock.)
/// False, and nothing written, if the frame is too short for it.
#[inline(always)]
pub(crate) fn store_in_frame<T>(ctx: &XdpContext, offset: usize, value: &T) -> bool {
    let Some(dst) = header::<T>(ctx, offset) else {
        return false;
    };
    let (d, s) = (dst.cast::<u16>(), (value as *const T).cast::<u16>());
    for i in 0..size_of::<T>() / 2 {
        // SAFETY: `dst` was bounds-checked for a whole T; T is 2-aligned here.
        unsafe { core::ptr::write_volatile(d.add(i), core::ptr::read_unaligned(s.add(i))) };
    }
    true
}
