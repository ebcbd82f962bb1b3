//! Next hops towards backends, shared by their new flows (step 6). A flow
//! caches the next hop its first packet resolved; without this table every
//! new flow's first packet asked `bpf_fib_lookup` (a tenth of a new flow's
//! cost in the profile, with the out-of-line memset of its parameters).
//! Now the first new flow to a backend asks, and the next ones copy its
//! answer while it is younger than `HOP_TTL` ticks. Writers racing on one
//! backend's slot write the same answer; the agent zeroes a slot when it
//! writes the backend (an address that moved).

use aya_ebpf::{
    macros::map,
    maps::{Array, LruHashMap},
};
use lb_common::{BackendHop, MAX_BACKENDS, NEIGH_WANTED_SIZE, NextHop, flow::HOP_TTL, ipv6::Addr6};

use crate::flows::{copy_words, write_words};

#[map]
static BACKEND_HOPS: Array<BackendHop> = Array::with_max_entries(MAX_BACKENDS, 0);
/// Next hops `bpf_fib_lookup` found without a neighbour entry (address,
/// network order → egress ifindex): the agent drains it and has the kernel
/// resolve each (`lb_userspace::neighbours`).
#[map]
static NEIGH_WANTED: LruHashMap<u32, u32> = LruHashMap::with_max_entries(NEIGH_WANTED_SIZE, 0);
/// `NEIGH_WANTED` for IPv6 next hops (address, network order → egress
/// ifindex): a map of its own, so IPv4's key and instructions stay as they
/// are; drained with it.
#[map]
static NEIGH_WANTED6: LruHashMap<Addr6, u32> = LruHashMap::with_max_entries(NEIGH_WANTED_SIZE, 0);

/// Reports a next hop without a neighbour entry to the agent. Only the
/// unresolved path pays it.
#[inline(always)]
pub(crate) fn wanted(next_hop: u32, ifindex: u32) {
    let _ = NEIGH_WANTED.insert(&next_hop, &ifindex, 0);
}

/// [`wanted`] for an IPv6 next hop. `next_hop` points into the caller's
/// `bpf_fib_lookup` parameters: no copy on IPv6's tight stack.
#[inline(always)]
pub(crate) fn wanted6(next_hop: &Addr6, ifindex: u32) {
    let _ = NEIGH_WANTED6.insert(next_hop, &ifindex, 0);
}

/// Fills an unresolved `cache` with the backend's shared hop if it is
/// fresh; false if the caller must resolve it.
#[inline(always)]
pub(crate) fn borrow(backend_id: u32, now: u32, cache: &mut NextHop) -> bool {
    let Some(shared) = BACKEND_HOPS.get_ptr(backend_id) else {
        return false;
    };
    // SAFETY: an array map value; plain data.
    let shared = unsafe { copy_words(shared) };
    if shared.hop.ifindex == 0 || now.wrapping_sub(shared.resolved) >= HOP_TTL {
        return false;
    }
    *cache = shared.hop;
    true
}

/// Shares a hop a flow to the backend just resolved at `now`.
#[inline(always)]
pub(crate) fn share(backend_id: u32, now: u32, hop: &NextHop) {
    let Some(slot) = BACKEND_HOPS.get_ptr_mut(backend_id) else {
        return;
    };
    let shared = BackendHop {
        hop: *hop,
        resolved: now,
    };
    // SAFETY: an array map value; word stores (see `copy_words`).
    unsafe { write_words(slot, &shared) };
}
