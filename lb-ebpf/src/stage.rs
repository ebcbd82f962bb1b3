//! The path's second stage (`lb_setup`, a program of its own reached by a
//! tail call): what follows an established-table miss — half-open flows,
//! new flows, a backend's answer to a check, the no-flow rules
//! (`path::setup`). The first stage (`lb`) keeps parsing, port-less
//! packets and the established table, so an established packet never
//! leaves it.
//!
//! Why two programs: the verifier walks every path of a program within one
//! budget (1M instructions) and one 512-byte stack, and a BPF-to-BPF call
//! is re-walked at each call site; a tail call's target is verified on its
//! own. With full NAT (issue 25) the one program no longer fitted.
//!
//! What crosses: the packet (the second stage parses it again: a few
//! bounds checks) and, in this CPU's [`CARRY`] slot, what the first stage
//! learned of it: its flow key (a full-NAT reply's in its NAT shape,
//! `fullnat::nat_shaped`), whether it is to a VIP, and the tick. The tail
//! call never fails once the agent has put `lb_setup` in [`STAGES`]; if it
//! did, the packet is dropped and counted (`DropNoStage`).

use aya_ebpf::{
    EbpfContext,
    macros::map,
    maps::{PerCpuArray, ProgramArray},
    programs::XdpContext,
};
use lb_common::{FlowKey, STAGE_SETUP, Verdict};

use crate::{
    flows::{copy_key, write_words},
    verdict::{Outcome, drop},
};

/// `STAGES[STAGE_SETUP]`: the second stage, `lb_setup`;
/// `STAGES[STAGE_PROXY]`: the PROXY v2 stage, `lb_proxy` (`proxy.rs`);
/// IPv6's stages are `v6.rs`'s (`STAGE_V6*`, `STAGE_PROXY6`).
/// Written by the agent at load (the programs the object has).
#[map]
pub(crate) static STAGES: ProgramArray = ProgramArray::with_max_entries(8, 0);

/// Tail-calls `STAGES[SLOT]`, the slot an immediate at the call site (as
/// libbpf's `bpf_tail_call_static`); returns only if the slot is empty.
///
/// Why not `STAGES.tail_call(ctx, slot)`: LLVM merges two such calls with
/// different slots into one whose key register is set on each path (`lb`'s
/// IPv6 dispatch was one), the verifier then sees a key that is not one
/// constant, and the JIT emits an indirect jump, which this kernel's
/// retpolines make dear: a fifth of `lb_v6`'s samples were on the jump's
/// landing (`lb bench --profile-lb --profile-v6`, perf, per JIT offset).
/// With one constant per call site the JIT emits a direct jump, patched
/// when the agent writes the slot.
#[inline(always)]
pub(crate) fn tail_call<const SLOT: u32>(ctx: &XdpContext) {
    // SAFETY: helper 12 (bpf_tail_call) with the context, the program
    // array and the slot, as the helper's binding would pass them; it
    // returns only on failure, and clobbers r0–r5 as any helper call.
    unsafe {
        core::arch::asm!(
            "r3 = {slot}",
            "call 12",
            slot = const SLOT,
            inlateout("r1") ctx.as_ptr() => _,
            inlateout("r2") (&raw const STAGES).cast::<core::ffi::c_void>() => _,
            lateout("r0") _,
            lateout("r3") _,
            lateout("r4") _,
            lateout("r5") _,
        );
    }
}

/// [`Carry::proxy`]: what the PROXY stage is asked to do with the packet.
/// `lb` (an established PROXY flow's packet, or `lb_setup` for a flow it
/// just established): shift or insert, then the established path.
pub(crate) const PROXY_ESTABLISHED: u32 = 0;
/// `lb_setup`: fix a PROXY flow's SYN or SYN-ACK options, then back.
pub(crate) const PROXY_OPTIONS: u32 = 1;
/// The PROXY stage fixed the options: `lb_setup` goes on without it.
pub(crate) const PROXY_DONE: u32 = 2;

/// What the first stage hands the second about the packet it tail-calls
/// with (per CPU: the tail call runs on the same CPU, at once).
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct Carry {
    key: FlowKey,
    to_vip: u32,
    now: u32,
    /// `PROXY_*`: the PROXY stage's errand (`to_proxy`).
    proxy: u32,
}

#[map]
static CARRY: PerCpuArray<Carry> = PerCpuArray::with_max_entries(1, 0);

/// Hands the packet to the second stage; returns only if it could not.
#[inline(always)]
pub(crate) fn to_setup(ctx: &XdpContext, key: &FlowKey, to_vip: bool, now: u32) -> Outcome {
    let Some(carry) = CARRY.get_ptr_mut(0) else {
        return drop(Verdict::DropNoStage);
    };
    // SAFETY: this CPU's slot; nothing else runs on it meanwhile.
    unsafe {
        write_words(&raw mut (*carry).key, key);
        (*carry).to_vip = to_vip as u32;
        (*carry).now = now;
        (*carry).proxy = PROXY_ESTABLISHED;
    }
    tail_call::<STAGE_SETUP>(ctx);
    drop(Verdict::DropNoStage)
}

/// Hands the packet to the family's PROXY stage (`STAGES[SLOT]`:
/// `lb_proxy`, `lb_proxy6`) with `errand` (`PROXY_*`); the carried key, VIP
/// bit and tick stay as they are (`PROXY_OPTIONS` comes back to the second
/// stage with them). Returns only if it could not.
#[inline(always)]
pub(crate) fn to_proxy<const SLOT: u32>(ctx: &XdpContext, errand: u32) -> Outcome {
    let Some(carry) = CARRY.get_ptr_mut(0) else {
        return drop(Verdict::DropNoStage);
    };
    // SAFETY: this CPU's slot; nothing else runs on it meanwhile.
    unsafe {
        (*carry).proxy = errand;
    }
    tail_call::<SLOT>(ctx);
    drop(Verdict::DropNoStage)
}

/// In the PROXY stage, after `PROXY_OPTIONS`: back to the family's second
/// stage (`STAGES[SLOT]`: `lb_setup`, `lb_v6_setup`), which then goes on
/// without the PROXY stage.
#[inline(always)]
pub(crate) fn back_to_setup<const SLOT: u32>(ctx: &XdpContext) -> Outcome {
    let Some(carry) = CARRY.get_ptr_mut(0) else {
        return drop(Verdict::DropNoStage);
    };
    // SAFETY: as in `to_proxy`.
    unsafe {
        (*carry).proxy = PROXY_DONE;
    }
    tail_call::<SLOT>(ctx);
    drop(Verdict::DropNoStage)
}

/// A second stage's packet starts without a PROXY errand: IPv6's first
/// stage hands its key over in `CARRY6`, and the errand left in `CARRY`
/// by another packet (`PROXY_DONE`) must not skip its PROXY stage.
#[inline(always)]
pub(crate) fn no_errand() {
    if let Some(carry) = CARRY.get_ptr_mut(0) {
        // SAFETY: this CPU's slot; nothing else runs on it meanwhile.
        unsafe { (*carry).proxy = PROXY_ESTABLISHED };
    }
}

/// The PROXY stage's errand (`PROXY_*`), as the caller carried it.
#[inline(always)]
pub(crate) fn proxy_errand() -> u32 {
    match CARRY.get_ptr(0) {
        // SAFETY: this CPU's slot, written just before the tail call.
        Some(carry) => unsafe { (*carry).proxy },
        None => PROXY_DONE,
    }
}

/// In the second stage: what the first carried (key, to a VIP, tick).
#[inline(always)]
pub(crate) fn carried() -> Option<(FlowKey, bool, u32)> {
    let carry = CARRY.get_ptr(0)?;
    // SAFETY: this CPU's slot, written by the first stage just before.
    unsafe {
        Some((
            copy_key(&raw const (*carry).key),
            (*carry).to_vip != 0,
            (*carry).now,
        ))
    }
}
