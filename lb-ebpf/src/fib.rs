//! The FIB: next hops from the kernel's routing and neighbour tables
//! (`bpf_fib_lookup`), cached in a flow with the link's MTU, and "would the
//! kernel route this packet on" for traffic without a flow.

use core::mem::size_of;

use aya_ebpf::{
    bindings::bpf_fib_lookup as FibParams, helpers::generated::bpf_fib_lookup, programs::XdpContext,
};
use lb_common::{NextHop, family::IpHeader};

use crate::{family::PathFamily, mem::copy_mac};

pub(crate) const FIB_SUCCESS: i64 = 0;
pub(crate) const FIB_NO_NEIGH: i64 = 7;
/// `BPF_FIB_LKUP_RET_FRAG_NEEDED`: the packet is longer than the route's MTU
/// (then `mtu_result` holds it). `next_hop` also returns it for a cached hop.
pub(crate) const FIB_FRAG_NEEDED: i64 = 8;
/// `BPF_FIB_LOOKUP_SKIP_NEIGH`: the route only (kernel 6.3 and later).
const FIB_SKIP_NEIGH: u32 = 1 << 2;

/// Would the kernel route this packet on (not deliver it locally)? The
/// agent's own health checks and connections to a backend get their
/// answers on the LB's address: those are the kernel's.
#[inline(always)]
pub(crate) fn routed_on<F: PathFamily>(ctx: &XdpContext, ip: *mut F::IpHdr) -> bool {
    // SAFETY: the caller bounds-checked the fixed IP header.
    let hdr = unsafe { &*ip };
    let mut fib = fib_params::<F>(ctx, &Leaving::of::<F>(hdr, hdr.source(), hdr.destination()));
    // Routing only: no neighbour is looked up, so none is reported (a
    // flood's stray packets must not make the agent resolve their
    // destinations).
    // SAFETY: helper call with a valid context and a correctly sized struct.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.ctx.cast(),
            &mut fib,
            size_of::<FibParams>() as i32,
            FIB_SKIP_NEIGH,
        )
    };
    matches!(rc, FIB_SUCCESS | FIB_FRAG_NEEDED)
}

/// The next hop for `daddr`: the flow's cached one, or the kernel's FIB and
/// neighbour table (then cached in the flow). A flow keeps the next hop its
/// first forwarded packet resolved; flows to a backend that moved are
/// retired by the agent (disable/remove drop them). A packet longer than
/// the hop's MTU gets `FIB_FRAG_NEEDED` with the MTU in `cache.mtu`.
#[inline(always)]
pub(crate) fn next_hop<F: PathFamily>(
    ctx: &XdpContext,
    ip: &F::IpHdr,
    saddr: F::Addr,
    daddr: F::Addr,
    cache: &mut NextHop,
) -> i64 {
    route::<F>(ctx, &Leaving::of::<F>(ip, saddr, daddr), cache)
}

/// A packet as it will leave, which is what `bpf_fib_lookup` is asked
/// about: the packet itself ([`Leaving::of`]), or a tunnel's outer packet
/// around it (`tunnel`).
pub(crate) struct Leaving<A> {
    pub(crate) protocol: u8,
    /// IP total length (host order).
    pub(crate) len: u16,
    pub(crate) tos: u8,
    pub(crate) source: A,
    pub(crate) destination: A,
}

impl<A> Leaving<A> {
    /// `ip` itself, from `source` to `destination`.
    #[inline(always)]
    pub(crate) fn of<F: PathFamily<Addr = A>>(ip: &F::IpHdr, source: A, destination: A) -> Self {
        Leaving {
            protocol: ip.protocol(),
            len: ip.packet_len(),
            tos: ip.tos(),
            source,
            destination,
        }
    }
}

/// [`next_hop`] for a packet described by `out`.
#[inline(always)]
pub(crate) fn route<F: PathFamily>(
    ctx: &XdpContext,
    out: &Leaving<F::Addr>,
    cache: &mut NextHop,
) -> i64 {
    if cache.ifindex != 0 {
        // The fast path's whole MTU check: the MTU came with the hop.
        if out.len > cache.mtu {
            return FIB_FRAG_NEEDED;
        }
        return FIB_SUCCESS;
    }
    let mut fib = fib_params::<F>(ctx, out);
    // SAFETY: helper call with a valid context and a correctly sized struct.
    let rc = unsafe { bpf_fib_lookup(ctx.ctx.cast(), &mut fib, size_of::<FibParams>() as i32, 0) };
    if rc == FIB_SUCCESS || rc == FIB_FRAG_NEEDED {
        // SAFETY: on both the kernel replaced tot_len with the MTU (a u16
        // union either way). Only the MTU on FRAG_NEEDED: the hop stays
        // unresolved, so the next packet looks it up again.
        cache.mtu = unsafe { fib.__bindgen_anon_1.mtu_result };
    }
    if rc == FIB_NO_NEIGH {
        F::report_unresolved(&fib);
    }
    if rc == FIB_SUCCESS {
        // Field by field: a struct store of the MACs became an out-of-line
        // memmove once the program grew (drop tracing).
        cache.ifindex = fib.ifindex;
        copy_mac(&raw mut cache.dmac, &fib.dmac);
        copy_mac(&raw mut cache.smac, &fib.smac);
    }
    rc
}

/// `bpf_fib_lookup`'s parameters for the packet `out` describes, as it
/// arrived on this interface.
#[inline(always)]
fn fib_params<F: PathFamily>(ctx: &XdpContext, out: &Leaving<F::Addr>) -> FibParams {
    let mut fib = zeroed_fib_params();
    fib.family = F::AF;
    fib.l4_protocol = out.protocol;
    fib.__bindgen_anon_1.tot_len = out.len;
    fib.__bindgen_anon_2.tos = out.tos;
    F::set_fib_addresses(&mut fib, out.source, out.destination);
    fib.ifindex = ctx.ingress_ifindex() as u32;
    fib
}

/// An all-zero `bpf_fib_lookup` (the verifier wants every byte initialised)
/// written as eight plain stores: `mem::zeroed` became a call to an
/// out-of-line BPF memset, 13 % of a packet's time in the profile.
#[inline(always)]
fn zeroed_fib_params() -> FibParams {
    const WORDS: usize = size_of::<FibParams>() / 8;
    const _: () = assert!(size_of::<FibParams>() == WORDS * 8);
    let mut fib = core::mem::MaybeUninit::<FibParams>::uninit();
    let p = fib.as_mut_ptr().cast::<u64>();
    for i in 0..WORDS {
        // SAFETY: in bounds; volatile so LLVM cannot fuse them into a memset.
        unsafe { core::ptr::write_volatile(p.add(i), 0) };
    }
    // SAFETY: every byte written; an all-zero FibParams is valid.
    unsafe { fib.assume_init() }
}
