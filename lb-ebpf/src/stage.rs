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
    macros::map,
    maps::{PerCpuArray, ProgramArray},
    programs::XdpContext,
};
use lb_common::{FlowKey, Verdict};

use crate::{
    flows::{copy_key, write_words},
    verdict::{Outcome, drop},
};

/// `STAGES[0]`: the second stage, `lb_setup`. Written by the agent at load.
#[map]
pub(crate) static STAGES: ProgramArray = ProgramArray::with_max_entries(8, 0);

/// What the first stage hands the second about the packet it tail-calls
/// with (per CPU: the tail call runs on the same CPU, at once).
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct Carry {
    key: FlowKey,
    to_vip: u32,
    now: u32,
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
        STAGES.tail_call(ctx, 0);
    }
    drop(Verdict::DropNoStage)
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
