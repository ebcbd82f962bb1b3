//! Programs for `lb pktgen` and `cargo xtask bench`, kept in the same object
//! so one build serves the data plane, the generator and the baselines.
//!
//! - `pktgen`: run by BPF_PROG_RUN in live-frames mode; gives each frame its
//!   flow (source address/port from a per-CPU sequence) and transmits it.
//! - `sink`: counts and drops: the receiving end of a benchmark.
//! - `bare_fwd`: the ceiling: destination MAC rewrite + redirect, no parsing.
//! - `xdp_pass`: returns XDP_PASS; the floor of BPF_PROG_TEST_RUN cost, and the
//!   program a veth peer needs so redirected frames are delivered.

use aya_ebpf::{
    bindings::xdp_action,
    helpers::generated::bpf_redirect,
    macros::{map, xdp},
    maps::{Array, PerCpuArray},
    programs::XdpContext,
};
use lb_common::{
    Counters, PKTGEN_TEMPLATE_LEN, PktgenConf,
    checksum::{replace16, replace32},
    headers::{EthHdr, IPPROTO_UDP, Ipv4Hdr, L4Ports, l4_layout},
};

use crate::{copy_mac, count, header};

/// `FWD_CONF[0]`: the bare forwarder's fixed next hop.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FwdConf {
    pub ifindex: u32,
    pub dmac: [u8; 6],
    pub smac: [u8; 6],
}

#[map]
static PKTGEN_CONF: Array<PktgenConf> = Array::with_max_entries(1, 0);
/// Per-CPU frame sequence number of the generator.
#[map]
static PKTGEN_SEQ: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);
#[map]
static FWD_CONF: Array<FwdConf> = Array::with_max_entries(1, 0);
#[map]
static SINK_STATS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(1, 0);

#[xdp]
pub fn pktgen(ctx: XdpContext) -> u32 {
    let Some(conf) = PKTGEN_CONF.get(0) else {
        return xdp_action::XDP_ABORTED;
    };
    let Some(seq) = PKTGEN_SEQ.get_ptr_mut(0) else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: per-CPU slot.
    let n = unsafe {
        let n = *seq;
        *seq = n.wrapping_add(1);
        n
    };
    restore_template(&ctx, conf);
    set_flow(&ctx, conf, n);
    if conf.ifindex == 0 {
        return xdp_action::XDP_TX;
    }
    // SAFETY: plain helper call.
    unsafe { bpf_redirect(conf.ifindex, 0) as u32 }
}

/// Puts the frame's headers back as userspace built them (see PktgenConf).
#[inline(always)]
fn restore_template(ctx: &XdpContext, conf: &PktgenConf) {
    const WORDS: usize = PKTGEN_TEMPLATE_LEN / 8;
    if let Some(head) = header::<[u64; WORDS]>(ctx, 0) {
        let src = conf.template.as_ptr().cast::<u64>();
        for i in 0..WORDS {
            // SAFETY: bounds checked; the template (8-aligned in the map
            // value) is exactly that long. Word stores, not an array
            // assignment: that became an out-of-line memmove, ~10 % of the
            // generator's CPU in the profile.
            unsafe {
                core::ptr::write_volatile(head.cast::<u64>().add(i), core::ptr::read(src.add(i)))
            };
        }
    }
}

/// Rewrites source address/port to flow `n % flows`, fixing checksums.
#[inline(always)]
fn set_flow(ctx: &XdpContext, conf: &PktgenConf, n: u32) {
    let (Some(ip), Some(ports)) = (
        header::<Ipv4Hdr>(ctx, EthHdr::LEN),
        header::<L4Ports>(ctx, EthHdr::LEN + Ipv4Hdr::LEN),
    ) else {
        return;
    };
    // SAFETY: bounds checked above.
    let (ip, ports) = unsafe { (&mut *ip, &mut *ports) };
    let Some((_, check_off)) = l4_layout(ip.protocol) else {
        return;
    };
    let Some(check) = header::<u16>(ctx, EthHdr::LEN + Ipv4Hdr::LEN + check_off) else {
        return;
    };
    // SAFETY: bounds checked above.
    let check = unsafe { &mut *check };
    let span = if conf.sport_span == 0 {
        1
    } else {
        conf.sport_span as u32
    };
    let flow = if conf.flows == 0 { 0 } else { n % conf.flows };
    let saddr = conf.saddr_base.wrapping_add(flow / span).to_be();
    let sport = (conf.sport_base as u32 + flow % span) as u16;
    let sport = sport.to_be();
    let old_addr = ip.saddr;
    ip.check = replace32(ip.check, old_addr, saddr);
    ip.saddr = saddr;
    if !(ip.protocol == IPPROTO_UDP && *check == 0) {
        *check = replace16(replace32(*check, old_addr, saddr), ports.source, sport);
    }
    ports.source = sport;
}

#[xdp]
pub fn sink(ctx: XdpContext) -> u32 {
    count(&SINK_STATS, 0, 1, (ctx.data_end() - ctx.data()) as u64);
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
    // The same word-store MAC copy as `lb`: a fair ceiling pays no
    // out-of-line memmove either.
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
