//! The benchmark's programs (`cargo xtask bench`, the harness), in the
//! `lb-bench` object next to the generator, never in the product:
//!
//! - `sink`: counts and drops: the receiving end of a benchmark.
//! - `bare_fwd`: the ceiling: destination MAC rewrite + redirect, no parsing.
//! - `bare_fwd6`: the IPv6 ceiling: `bare_fwd` for frames it has checked
//!   are IPv6 (EtherType, fixed header in bounds); anything else is passed.
//! - `hash_fwd`: `bare_fwd` plus one 5-tuple hash lookup: the floor of any
//!   forwarder with a connection table, measured next to the ceiling.
//! - `hash_fwd6`, `tail_fwd`: what IPv6's path has that IPv4's has not
//!   (issue 24): `hash_fwd` over IPv6 (a 40-byte key, `lb`'s `FlowKey6`, in
//!   a kernel hash, as `ESTABLISHED6`), and `bare_fwd` reached through one
//!   tail call (as `lb` reaches `lb_v6`).
//! - `ipip_fwd`, `gue_fwd`: `bare_fwd` plus what any encapsulating
//!   forwarder must do (issue 26's floor): room made in front of the frame
//!   (`bpf_xdp_adjust_head`, 20 or 32 bytes), the bounds checked again, the
//!   Ethernet header and the outer headers written, as `lb`'s tunnels do.
//! - `xdp_pass`: returns XDP_PASS; the floor of BPF_PROG_TEST_RUN cost, and the
//!   program a veth peer needs so redirected frames are delivered.

use aya_ebpf::{
    bindings::xdp_action,
    helpers::generated::{bpf_redirect, bpf_xdp_adjust_head},
    macros::{map, xdp},
    maps::{Array, HashMap, PerCpuArray, ProgramArray},
    programs::XdpContext,
};
use lb_common::{
    Counters, FlowKey, FlowKey6, FwdConf,
    headers::{ETH_P_IPV4_RAW, EthHdr, Ipv4Hdr, L4Ports},
    ipv6::{ETH_P_IPV6_RAW, Ipv6Hdr},
    tunnel::{GUE_OVERHEAD, IPIP_OVERHEAD, IPPROTO_IPIP, gue_headers, ipip_header},
};

use crate::mem::{copy_mac, header, store_in_frame};

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
    rewrite_and_redirect(eth, conf)
}

/// The IPv6 ceiling (issue 24): `bare_fwd` for an IPv6 frame. It checks
/// the EtherType and that the fixed IPv6 header is in the frame (what any
/// IPv6 forwarder does first) and passes anything else, so the rows it is
/// the ceiling of are known to have carried IPv6: a generator sending
/// IPv4 by mistake reads as 0 Mpps at the sink, not as a ceiling.
#[xdp]
pub fn bare_fwd6(ctx: XdpContext) -> u32 {
    let Some(conf) = FWD_CONF.get(0) else {
        return xdp_action::XDP_ABORTED;
    };
    let (Some(eth), Some(_)) = (
        header::<EthHdr>(&ctx, 0),
        header::<Ipv6Hdr>(&ctx, EthHdr::LEN),
    ) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: bounds checked.
    if unsafe { (*eth).ether_type } != ETH_P_IPV6_RAW {
        return xdp_action::XDP_PASS;
    }
    rewrite_and_redirect(eth, conf)
}

/// Both MACs from `conf`, then the redirect: the ceiling's whole work.
#[inline(always)]
fn rewrite_and_redirect(eth: *mut EthHdr, conf: &FwdConf) -> u32 {
    // SAFETY: the callers checked `eth`'s bounds.
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
    rewrite_and_redirect(eth, conf)
}

/// `hash_fwd6`'s flow table: `hash_fwd`'s for IPv6's key.
#[map]
static FWD_FLOWS6: HashMap<FlowKey6, u32> = HashMap::with_max_entries(1024, 0);

/// `hash_fwd` for an IPv6 frame without extension headers: the fixed
/// header, the ports, one lookup of `lb`'s 40-byte `FlowKey6` in a kernel
/// hash (a miss inserts it), as IPv6's established lookup does.
#[xdp]
pub fn hash_fwd6(ctx: XdpContext) -> u32 {
    let Some(conf) = FWD_CONF.get(0) else {
        return xdp_action::XDP_ABORTED;
    };
    let (Some(eth), Some(ip), Some(ports)) = (
        header::<EthHdr>(&ctx, 0),
        header::<Ipv6Hdr>(&ctx, EthHdr::LEN),
        header::<L4Ports>(&ctx, EthHdr::LEN + Ipv6Hdr::LEN),
    ) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: bounds checked above.
    let (ip, ports) = unsafe { (&*ip, &*ports) };
    // SAFETY: bounds checked.
    if unsafe { (*eth).ether_type } != ETH_P_IPV6_RAW {
        return xdp_action::XDP_PASS;
    }
    let key = FlowKey6::of(ip, ip.next_header, ports);
    if FWD_FLOWS6.get_ptr(&key).is_none() {
        let _ = FWD_FLOWS6.insert(&key, &0, 0);
    }
    rewrite_and_redirect(eth, conf)
}

/// `tail_fwd`'s one entry: `bare_fwd` (the harness sets it).
#[map]
static TAIL_FWD: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// `bare_fwd` through one tail call: less `bare_fwd`, what the tail call
/// costs (`lb` tail-calls `lb_v6` for every IPv6 frame). Aborts if the
/// entry is missing.
#[xdp]
pub fn tail_fwd(ctx: XdpContext) -> u32 {
    // SAFETY: our own program array; returns only if the call fails.
    unsafe { TAIL_FWD.tail_call(&ctx, 0) };
    xdp_action::XDP_ABORTED
}

/// The encapsulation floor's outer addresses (198.18.0.1 → 198.18.1.11,
/// raw network order) and GUE ports: fixed, as `lb` reads its from a map.
const FLOOR_SOURCE: u32 = u32::from_ne_bytes([198, 18, 0, 1]);
const FLOOR_DESTINATION: u32 = u32::from_ne_bytes([198, 18, 1, 11]);
const FLOOR_GUE_SOURCE_PORT: u16 = 50000;
const FLOOR_GUE_PORT: u16 = 6080u16.to_be();

/// `bare_fwd` with an IPIP outer header in front (issue 26's floor). One
/// call per frame only: a repeated run would wrap its own output again.
#[xdp]
pub fn ipip_fwd(ctx: XdpContext) -> u32 {
    encap_fwd(&ctx, false)
}

/// `bare_fwd` with GUE's outer IPv4, UDP and GUE headers in front.
#[xdp]
pub fn gue_fwd(ctx: XdpContext) -> u32 {
    encap_fwd(&ctx, true)
}

/// What an encapsulating forwarder cannot skip, the way `lb`'s tunnel does
/// it (`lb-ebpf/src/tunnel.rs`): read the inner length and TOS, make room
/// (the one helper call besides the redirect), check the bounds again,
/// write the Ethernet header and the outer headers (built by the product's
/// own `lb_common::tunnel` functions), redirect.
#[inline(always)]
fn encap_fwd(ctx: &XdpContext, gue: bool) -> u32 {
    let Some(conf) = FWD_CONF.get(0) else {
        return xdp_action::XDP_ABORTED;
    };
    let Some(ip) = header::<Ipv4Hdr>(ctx, EthHdr::LEN) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: bounds checked; read before the frame moves.
    let (len, tos) = unsafe { (u16::from_be((*ip).tot_len), (*ip).tos) };
    let overhead = if gue { GUE_OVERHEAD } else { IPIP_OVERHEAD };
    // SAFETY: helper call on our own context; pointers are taken after it.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -i32::from(overhead)) } != 0 {
        return xdp_action::XDP_ABORTED;
    }
    let Some(eth) = header::<EthHdr>(ctx, 0) else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: bounds checked.
    unsafe {
        copy_mac(&raw mut (*eth).dst, &conf.dmac);
        copy_mac(&raw mut (*eth).src, &conf.smac);
        (*eth).ether_type = ETH_P_IPV4_RAW;
    }
    let written = if gue {
        store_in_frame(
            ctx,
            EthHdr::LEN,
            &gue_headers(
                len,
                tos,
                IPPROTO_IPIP,
                FLOOR_SOURCE,
                FLOOR_DESTINATION,
                FLOOR_GUE_SOURCE_PORT,
                FLOOR_GUE_PORT,
            ),
        )
    } else {
        store_in_frame(
            ctx,
            EthHdr::LEN,
            &ipip_header(len, tos, IPPROTO_IPIP, FLOOR_SOURCE, FLOOR_DESTINATION),
        )
    };
    if !written {
        return xdp_action::XDP_ABORTED;
    }
    // SAFETY: plain helper call.
    unsafe { bpf_redirect(conf.ifindex, 0) as u32 }
}

#[xdp]
pub fn xdp_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}
