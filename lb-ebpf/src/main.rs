//! The XDP data plane `lb`, its entry: which family's path a frame takes
//! (by EtherType), the verdict counted, tracing and capture. One pass per
//! packet, constant work.
//!
//! - `path`: the packet path, as numbered steps (docs/architecture.md),
//!   written once over the address family (`family`: IPv4 today);
//! - `v6`: IPv6, the path's second family, in programs of its own (`lb`
//!   tail-calls `lb_v6` with every IPv6 frame): its maps and `PathFamily`
//!   instance, its VIP rules in `parse6`, its flow tables in `flows6`;
//! - its stages and primitives, one room each: `parse` (headers, the VIP
//!   rules), `flows` (the flow tables), `frag` and `icmp` (packets without
//!   ports that belong to a flow: they hand it back to the path),
//!   `firewall`, `schedule`, `hops` (shared next hops), `fib`, `transmit`
//!   (the one place a forwarding mode is decided), `tunnel` (IPIP and GUE
//!   headers in front of a packet), `tunnel_icmp` (path MTU beyond the
//!   LB's own link, from routers' ICMP), `compose` (frames the LB
//!   builds itself), `mem` (frame pointers and copies), `verdict`
//!   (outcomes and counters), `trace` and `capture`, `sync` (flow events
//!   for the LBs' flow sync);
//! - `probe`: checks through the VIP, the second entry point `lb_probe` and
//!   the answers' hand-over the path asks for.
//!
//! Every return goes through a [`Verdict`] so each rule has a counter. There is
//! no logging here: the fast path only counts. A packet that is *not*
//! forwarded may also be traced (`lb trace`): when `TRACE_ON` asks for its
//! verdict, its headers are read again and an event goes into the `TRACE`
//! ring buffer. Forwarded packets never reach that check.
#![no_std]
#![no_main]
// The bpf target has no RMW atomics in core::sync; the intrinsic lowers to
// BPF_ATOMIC | BPF_FETCH (needs -Ctarget-cpu=v3, set by xtask).
#![feature(core_intrinsics)]
// `stage::tail_call`: a tail call with its slot an immediate (inline asm;
// aya-ebpf enables the same feature for its own helpers).
#![feature(asm_experimental_arch)]
#![allow(internal_features)]

mod capture;
mod compose;
mod established;
mod family;
mod fib;
mod firewall;
mod flows;
mod flows6;
mod frag;
mod frag6;
mod fullnat;
mod hops;
mod icmp;
mod icmp6;
mod mem;
mod parse;
mod parse6;
mod path;
mod probe;
mod proxy;
mod schedule;
mod stage;
mod sync;
mod trace;
mod transmit;
mod tunnel;
mod tunnel_icmp;
mod v4;
mod v6;
mod verdict;

use capture::capture;
use mem::header;
use trace::{Traced, trace};
use verdict::count;

use aya_ebpf::{
    macros::{map, xdp},
    maps::{Array, HashMap, PerCpuArray},
    programs::XdpContext,
};
use lb_common::{
    Backend, Counters, MAX_BACKENDS, MAX_SERVICES, ServiceConf, ServiceKey, VERDICT_COUNT, Verdict,
    family::{Family, V4, V6},
    headers::EthHdr,
};

// ---- maps (docs/architecture.md has the full table) ----

/// (VIP, port, protocol) → service id. Written by the agent.
#[map]
pub(crate) static SERVICES: HashMap<ServiceKey, u32> = HashMap::with_max_entries(MAX_SERVICES, 0);
/// VIP address → number of services on it: "is this packet for us at all".
#[map]
pub(crate) static VIPS: HashMap<u32, u32> = HashMap::with_max_entries(MAX_SERVICES, 0);
/// Service id → mode, scheduler, active ring half. Written by the agent.
#[map]
pub(crate) static SERVICE_CONF: Array<ServiceConf> = Array::with_max_entries(MAX_SERVICES, 0);
// RINGS, RR_COUNTERS and MAGLEV (the scheduling tables) live in schedule.rs.
/// Backend id → address, port, flags. Written by the agent.
#[map]
pub(crate) static BACKENDS: Array<Backend> = Array::with_max_entries(MAX_BACKENDS, 0);
// CONNTRACK and HALF_OPEN, the flow tables, are in `flows.rs`.
/// Per-service and per-backend traffic, per CPU. This program; agent reads.
#[map]
pub(crate) static SERVICE_STATS: PerCpuArray<Counters> =
    PerCpuArray::with_max_entries(MAX_SERVICES, 0);
#[map]
pub(crate) static BACKEND_STATS: PerCpuArray<Counters> =
    PerCpuArray::with_max_entries(MAX_BACKENDS, 0);
/// One counter per [`Verdict`], per CPU.
#[map]
static VERDICTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(VERDICT_COUNT, 0);

#[xdp]
// The macro wraps this in the exported entry point: without the hint, once
// the path grew LLVM kept it out of line, a BPF-to-BPF call on every packet.
#[inline(always)]
pub fn lb(ctx: XdpContext) -> u32 {
    finish::<V4>(&ctx, dispatch(&ctx))
}

/// The path's second stage (`stage.rs`): tail-called by `lb` after an
/// established-table miss; never attached.
#[xdp]
#[inline(always)]
pub fn lb_setup(ctx: XdpContext) -> u32 {
    finish::<V4>(&ctx, dispatch_setup(&ctx))
}

/// The PROXY v2 stage (`proxy.rs`): tail-called for packets of flows
/// flagged `FLOW_F_PROXY`; never attached.
#[xdp]
#[inline(always)]
pub fn lb_proxy(ctx: XdpContext) -> u32 {
    finish::<V4>(&ctx, dispatch_proxy::<V4>(&ctx))
}

/// IPv6's PROXY v2 stage (`proxy.rs` over `V6`): tail-called by `lb_v6`
/// and `lb_v6_setup` for IPv6 PROXY flows' packets; a program of its own
/// (with IPv4's in `lb_proxy` it was past the verifier's budget); never
/// attached.
#[xdp]
#[inline(always)]
pub fn lb_proxy6(ctx: XdpContext) -> u32 {
    finish::<V6>(&ctx, dispatch_proxy::<V6>(&ctx))
}

/// IPv6's first stage (`v6.rs`): tail-called by `lb` with every IPv6
/// frame; never attached.
#[xdp]
#[inline(always)]
pub fn lb_v6(ctx: XdpContext) -> u32 {
    finish::<V6>(&ctx, dispatch_v6(&ctx, false))
}

/// IPv6's second stage: tail-called by `lb_v6` after an established-table
/// miss, as `lb_setup` by `lb`; never attached.
#[xdp]
#[inline(always)]
pub fn lb_v6_setup(ctx: XdpContext) -> u32 {
    finish::<V6>(&ctx, dispatch_v6(&ctx, true))
}

/// IPv6's packets without ports of their own (fragments, ICMPv6 errors
/// quoting a flow: `frag6.rs`, `icmp6.rs`), tail-called by `lb`, and the
/// "packet too big" `lb_v6` and `lb_v6_setup` ask it to answer: a program
/// of its own so neither IPv6 stage verifies their code; never attached.
#[xdp]
#[inline(always)]
pub fn lb_v6_portless(ctx: XdpContext) -> u32 {
    finish::<V6>(&ctx, dispatch_v6_portless(&ctx))
}

/// A packet's verdict counted, traced (with family `F`'s event: the
/// program's, IPv4's for `lb` whatever the frame) and captured; its action.
#[inline(always)]
fn finish<F: Traced>(ctx: &XdpContext, verdict: verdict::Outcome) -> u32 {
    count(&VERDICTS, verdict.reason as u32, 1, 0);
    // Forwarded packets (the fast path) pay this compare and nothing more.
    if !verdict.reason.is_forwarded() {
        trace::<F>(ctx, verdict.reason);
    }
    // `lb capture`: one lookup and one branch while no capture runs.
    capture(ctx, verdict.reason);
    verdict.action
}

/// The family's path by EtherType; anything else is the kernel's.
#[inline(always)]
fn dispatch(ctx: &XdpContext) -> verdict::Outcome {
    let Some(eth) = header::<EthHdr>(ctx, 0) else {
        return verdict::pass(Verdict::PassTruncated);
    };
    // SAFETY: `header` checked the bounds against data_end.
    let ether_type = unsafe { (*eth).ether_type };
    if ether_type == V4::ETHER_TYPE_RAW {
        return path::balance::<V4>(ctx, eth);
    }
    if ether_type == V6::ETHER_TYPE_RAW {
        return v6::to_v6(ctx);
    }
    verdict::pass(Verdict::PassNotOurs)
}

/// IPv6's stages' entry: the first (`setup` false) or the second.
#[inline(always)]
fn dispatch_v6(ctx: &XdpContext, setup: bool) -> verdict::Outcome {
    let Some(eth) = header::<EthHdr>(ctx, 0) else {
        return verdict::pass(Verdict::PassTruncated);
    };
    // SAFETY: `header` checked the bounds against data_end.
    if unsafe { (*eth).ether_type } != V6::ETHER_TYPE_RAW {
        return verdict::pass(Verdict::PassNotOurs);
    }
    if setup {
        path::setup::<V6>(ctx, eth)
    } else {
        path::balance::<V6>(ctx, eth)
    }
}

/// `lb_v6_portless`'s entry.
#[inline(always)]
fn dispatch_v6_portless(ctx: &XdpContext) -> verdict::Outcome {
    let Some(eth) = header::<EthHdr>(ctx, 0) else {
        return verdict::pass(Verdict::PassTruncated);
    };
    // SAFETY: `header` checked the bounds against data_end.
    if unsafe { (*eth).ether_type } != V6::ETHER_TYPE_RAW {
        return verdict::pass(Verdict::PassNotOurs);
    }
    // A packet too big that `lb_v6` or `lb_v6_setup` asks it to answer.
    if let Some(mtu) = icmp6::asked_too_big() {
        return icmp6::too_big(ctx, mtu);
    }
    // A first fragment: its ports recorded, back to `lb_v6`.
    if let Some(ip) = header::<lb_common::ipv6::Ipv6Hdr>(ctx, EthHdr::LEN)
        && frag6::record_first(ctx, ip)
    {
        return verdict::drop(Verdict::DropNoStage);
    }
    path::port_less::<V6>(ctx, eth)
}

/// The second stage's entry: only IPv4 is tail-called into it today.
#[inline(always)]
fn dispatch_setup(ctx: &XdpContext) -> verdict::Outcome {
    let Some(eth) = header::<EthHdr>(ctx, 0) else {
        return verdict::pass(Verdict::PassTruncated);
    };
    // SAFETY: `header` checked the bounds against data_end.
    if unsafe { (*eth).ether_type } == V4::ETHER_TYPE_RAW {
        return path::setup::<V4>(ctx, eth);
    }
    verdict::pass(Verdict::PassNotOurs)
}

/// A PROXY stage's entry: family `F`'s frames only.
#[inline(always)]
fn dispatch_proxy<F: family::PathFamily>(ctx: &XdpContext) -> verdict::Outcome {
    let Some(eth) = header::<EthHdr>(ctx, 0) else {
        return verdict::pass(Verdict::PassTruncated);
    };
    // SAFETY: `header` checked the bounds against data_end.
    if unsafe { (*eth).ether_type } == F::ETHER_TYPE_RAW {
        return path::proxied::<F>(ctx, eth);
    }
    verdict::pass(Verdict::PassNotOurs)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
