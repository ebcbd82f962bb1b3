//! Outcomes and counters: what the program does with a frame and which
//! rule ([`Verdict`]) decided it, and the per-CPU counters every verdict,
//! service, backend and firewall rule adds to.

use aya_ebpf::{bindings::xdp_action, maps::PerCpuArray};
use lb_common::{Counters, Verdict};

/// What the program does with a frame, and which rule decided it.
pub(crate) struct Outcome {
    pub(crate) action: u32,
    pub(crate) reason: Verdict,
}

#[inline(always)]
pub(crate) const fn pass(reason: Verdict) -> Outcome {
    Outcome {
        action: xdp_action::XDP_PASS,
        reason,
    }
}

#[inline(always)]
pub(crate) const fn drop(reason: Verdict) -> Outcome {
    Outcome {
        action: xdp_action::XDP_DROP,
        reason,
    }
}

/// Adds to a per-CPU counter slot.
#[inline(always)]
pub(crate) fn count<T: Countable>(map: &PerCpuArray<T>, index: u32, packets: u64, bytes: u64) {
    if let Some(slot) = map.get_ptr_mut(index) {
        // SAFETY: per-CPU slot: no other CPU writes it.
        unsafe { (*slot).add(packets, bytes) };
    }
}

pub(crate) trait Countable {
    fn add(&mut self, packets: u64, bytes: u64);
}

impl Countable for u64 {
    #[inline(always)]
    fn add(&mut self, packets: u64, _bytes: u64) {
        *self += packets;
    }
}

impl Countable for Counters {
    #[inline(always)]
    fn add(&mut self, packets: u64, bytes: u64) {
        self.packets += packets;
        self.bytes += bytes;
    }
}
