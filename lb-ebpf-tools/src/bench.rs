//! The benchmark's programs (`cargo xtask bench`, the harness), in the
//! `lb-bench` object next to the generator, never in the product:
//!
//! - `sink`: counts and drops: the receiving end of a benchmark.
//! - `bare_fwd`: the ceiling: destination MAC rewrite + redirect, no parsing.
//! - `hash_fwd`: `bare_fwd` plus one 5-tuple hash lookup: the floor of any
//!   forwarder with a connection table, measured next to the ceiling.
//! - `xdp_pass`: returns XDP_PASS; the floor of BPF_PROG_TEST_RUN cost, and the
//!   program a veth peer needs so redirected frames are delivered.

use aya_ebpf::{
    bindings::xdp_action,
    helpers::generated::bpf_redirect,
    macros::{map, xdp},
    maps::{Array, HashMap, PerCpuArray},
    programs::XdpContext,
};
use lb_common::{
    Counters, FlowKey, FwdConf,
    headers::{EthHdr, Ipv4Hdr, L4Ports},
};

use crate::mem::{copy_mac, header};

#[map]
static FWD_CONF: Array<FwdConf> = Array::with_max_entries(1, 0);
#[map]
static SINK_STATS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(1, 0);

#[xdp]
pub fn sink(ctx: XdpContext) -> u32 {
    if let Some(slot) = SINK_STATS.get_ptr_mut(0) {
        // SAFETY: per-CPU slot: no other CPU writes it.
        unsafe {
            (*slot).packets += 1;
            (*slot).bytes += (ctx.data_end() - ctx.data()) as u64;
        }
    }
    xdp_action::XDP_DROP
}

#[xdp]
pub fn bare_fwd(ctx: XdpContext) -> u32 {
    let Some(conf) = FWD_CONF.get(0) else {
        return xdp_action::XDP_ABORTED;
    };
    let Some(eth) = header::<EthHdr>(&ctx, 0) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: bounds checked.
    unsafe {
        copy_mac(&raw mut (*eth).dst, &conf.dmac);
        copy_mac(&raw mut (*eth).src, &conf.smac);
    }
    // SAFETY: plain helper call.
    unsafe { bpf_redirect(conf.ifindex, 0) as u32 }
}

/// `hash_fwd`'s flow table: the 5-tuple → nothing, a preallocated hash of
/// `lb`'s key type. Small: the floor is measured with one flow, whose entry
/// stays hot in any size of table.
#[map]
static FWD_FLOWS: HashMap<FlowKey, u32> = HashMap::with_max_entries(1024, 0);

/// The floor of any stateful forwarder: `bare_fwd` plus what no connection
/// table can skip — parse to the ports and look the 5-tuple up in a hash
/// map (a miss inserts it). What `lb` does on top of this is its own cost.
#[xdp]
pub fn hash_fwd(ctx: XdpContext) -> u32 {
    let Some(conf) = FWD_CONF.get(0) else {
        return xdp_action::XDP_ABORTED;
    };
    let (Some(eth), Some(ip), Some(ports)) = (
        header::<EthHdr>(&ctx, 0),
        header::<Ipv4Hdr>(&ctx, EthHdr::LEN),
        header::<L4Ports>(&ctx, EthHdr::LEN + Ipv4Hdr::LEN),
    ) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: bounds checked above.
    let (ip, ports) = unsafe { (&*ip, &*ports) };
    let key = FlowKey::of(ip, ports);
    if FWD_FLOWS.get_ptr(&key).is_none() {
        let _ = FWD_FLOWS.insert(&key, &0, 0);
    }
    // SAFETY: bounds checked.
    unsafe {
        copy_mac(&raw mut (*eth).dst, &conf.dmac);
        copy_mac(&raw mut (*eth).src, &conf.smac);
    }
    // SAFETY: plain helper call.
    unsafe { bpf_redirect(conf.ifindex, 0) as u32 }
}

#[xdp]
pub fn xdp_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}
