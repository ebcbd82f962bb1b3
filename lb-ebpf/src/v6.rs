//! IPv6's entry (EtherType 0x86DD). Traffic not addressed to an IPv6 VIP
//! (neighbour discovery, router advertisements, the host's own traffic)
//! passes untouched after one lookup; traffic to a VIP (`VIPS6`) gets the
//! VIP rules (`parse6`), each case that cannot be balanced its verdict.
//!
//! Not built yet (issue 24): IPv6 services, so no packet is balanced. A
//! packet that passes the VIP rules finds no service (`PassNoService`):
//! there is no `SERVICES6` yet, and the agent writes no `VIPS6` entry (the
//! config rejects an IPv6 VIP). The `impl PathFamily for V6` (its services,
//! backends, flow tables, NAT66 and DSR over `path.rs`) comes here.

use aya_ebpf::{macros::map, maps::HashMap, programs::XdpContext};
use lb_common::{
    MAX_SERVICES, Verdict,
    headers::EthHdr,
    ipv6::{Addr6, Ipv6Hdr},
};

use crate::{
    mem::header,
    parse6,
    verdict::{Outcome, pass},
};

/// IPv6 VIP → number of services on it: "is this packet for us at all",
/// as `VIPS` for IPv4.
#[map]
pub(crate) static VIPS6: HashMap<Addr6, u32> = HashMap::with_max_entries(MAX_SERVICES, 0);

/// One IPv6 frame (its EtherType already checked). Out of line (a
/// BPF-to-BPF call for IPv6 frames only), so IPv4's path keeps its own
/// stack frame and code as they were.
#[inline(never)]
pub(crate) fn balance(ctx: &XdpContext) -> Outcome {
    let Some(ip) = header::<Ipv6Hdr>(ctx, EthHdr::LEN) else {
        return pass(Verdict::PassTruncated);
    };
    // SAFETY: bounds-checked by `header`; a copy of the 16 bytes.
    let daddr = unsafe { (*ip).daddr };
    if VIPS6.get_ptr(&daddr).is_none() {
        return pass(Verdict::PassNotOurs);
    }
    match parse6::vip_rules(ctx, ip) {
        Err(outcome) => outcome,
        Ok(()) => pass(Verdict::PassNoService),
    }
}
