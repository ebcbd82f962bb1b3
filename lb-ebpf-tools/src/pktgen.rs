//! `pktgen`: the generator program, run by BPF_PROG_RUN in live-frames
//! mode (`lb pktgen`, lb-userspace/src/pktgen.rs): gives each frame its
//! flow (source address/port from a per-CPU sequence, directly or through a
//! table of drawn flow indices) and transmits it.

use aya_ebpf::{
    bindings::xdp_action,
    helpers::generated::bpf_redirect,
    macros::{map, xdp},
    maps::{Array, PerCpuArray},
    programs::XdpContext,
};
use lb_common::{
    PKTGEN_ETH_P_IPV6, PKTGEN_TEMPLATE_LEN, PKTGEN_V6_L4, PKTGEN_V6_NEXT_HEADER,
    PKTGEN_V6_SADDR_LOW, PktgenConf,
    headers::{EthHdr, Ipv4Hdr, L4Ports, l4_layout},
    rewrite::rewrite_source,
};

use crate::mem::header;

#[map]
static PKTGEN_CONF: Array<PktgenConf> = Array::with_max_entries(1, 0);
/// The flow of each frame, for a drawn flow mix (`flow_table_mask` != 0):
/// filled by userspace, which also sizes it (`PKTGEN_FLOW_TABLE` entries)
/// when it loads the object for the generator.
#[map]
static PKTGEN_FLOWS: Array<u32> = Array::with_max_entries(1, 0);
/// Per-CPU frame sequence number of the generator.
#[map]
static PKTGEN_SEQ: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

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
    if is_ipv6(&ctx) {
        set_flow_v6(&ctx, conf, flow_of(conf, n));
    } else {
        set_flow(&ctx, conf, flow_of(conf, n));
    }
    if conf.ifindex == 0 {
        return xdp_action::XDP_TX;
    }
    // SAFETY: plain helper call.
    unsafe { bpf_redirect(conf.ifindex, 0) as u32 }
}

/// Frame `n`'s flow: `n` itself (uniform: `flow_source` takes it modulo
/// the flow count) or the drawn table's entry (one array lookup).
#[inline(always)]
fn flow_of(conf: &PktgenConf, n: u32) -> u32 {
    if conf.flow_table_mask == 0 {
        return n;
    }
    PKTGEN_FLOWS
        .get(n & conf.flow_table_mask)
        .copied()
        .unwrap_or(n)
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

/// Rewrites source address/port to flow `n % flows`
/// ([`PktgenConf::flow_source`]), fixing checksums as the data plane's
/// reverse NAT does.
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
    let (saddr, sport) = conf.flow_source(n);
    rewrite_source(ip, ports, check, saddr.to_be(), sport.to_be());
}

/// The (restored) frame is IPv6: its EtherType says so.
#[inline(always)]
fn is_ipv6(ctx: &XdpContext) -> bool {
    match header::<EthHdr>(ctx, 0) {
        // SAFETY: bounds checked by `header`.
        Some(eth) => (unsafe { (*eth).ether_type }) == PKTGEN_ETH_P_IPV6.to_be(),
        None => false,
    }
}

/// IPv6: writes flow `n`'s source (the address's low 32 bits and the port)
/// and its whole L4 checksum ([`PktgenConf::l4_check_of`]; the TCP
/// checksum lies beyond the restored template, so it is written, never
/// updated from what the page held).
#[inline(always)]
fn set_flow_v6(ctx: &XdpContext, conf: &PktgenConf, n: u32) {
    let (Some(next), Some(saddr_low), Some(ports)) = (
        header::<u8>(ctx, PKTGEN_V6_NEXT_HEADER),
        header::<[u8; 4]>(ctx, PKTGEN_V6_SADDR_LOW),
        header::<L4Ports>(ctx, PKTGEN_V6_L4),
    ) else {
        return;
    };
    // SAFETY: bounds checked above.
    let protocol = unsafe { *next };
    let Some((_, check_off)) = l4_layout(protocol) else {
        return;
    };
    let Some(check) = header::<u16>(ctx, PKTGEN_V6_L4 + check_off) else {
        return;
    };
    let (addr, port) = conf.flow_source(n);
    // SAFETY: bounds checked above.
    unsafe {
        *saddr_low = addr.to_be_bytes();
        (*ports).source = port.to_be();
        *check = conf.l4_check_of(protocol, addr, port);
    }
}
