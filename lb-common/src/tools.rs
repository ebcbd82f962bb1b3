//! Layouts of the tools' XDP programs (lb-ebpf-tools), not the data
//! plane's: the load generator's (`pktgen`, feature `pktgen`: `lb pktgen`
//! ships in the product) and the benchmark baselines' (`bare_fwd`,
//! `bare_fwd6`, `hash_fwd`, `hash_fwd6`, `tail_fwd`, feature `bench`: only
//! the harness builds them). The agent's object and the data plane never
//! see them.

/// Bytes of each generated frame the `pktgen` program restores before use.
pub const PKTGEN_TEMPLATE_LEN: usize = 64;

/// Entries of `PKTGEN_FLOWS`, the generator's table of flow indices for a
/// non-uniform flow mix, as the generator loads it (the object declares one
/// entry: the loader sizes it, `lb_userspace::xdp::load_tool`). A power of
/// two.
pub const PKTGEN_FLOW_TABLE: u32 = 1 << 18;

/// `PKTGEN_CONF[0]`: how the `pktgen` program prepares each frame.
///
/// Live-frames mode recycles pages without copying the original frame
/// back, and a load balancer in NAT mode rewrites frames in place (veth
/// hands it the same page). So every frame starts from `template` (its
/// headers, the first 64 bytes) and then gets its flow's source.
///
/// IPv6 frames (EtherType 0x86dd) vary the low 32 bits of the source
/// address (the template holds the upper 96), and their L4 checksum is
/// written whole from `l4_check` ([`PktgenConf::l4_check_of`]): a TCP
/// header's checksum lies past the 64 restored bytes (14 + 40 + 16), and
/// IPv6 has no UDP checksum of 0 to leave alone.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PktgenConf {
    /// Interface to send on (0: XDP_TX on the ingress interface).
    pub ifindex: u32,
    /// Number of distinct flows (>= 1).
    pub flows: u32,
    /// First source address, host order; flows spread over ports first.
    pub saddr_base: u32,
    /// First source port (host order) and how many ports per address.
    pub sport_base: u16,
    pub sport_span: u16,
    /// 0: frame `n` is flow `n % flows` (uniform). Otherwise a power of two
    /// minus one: frame `n` is flow `PKTGEN_FLOWS[n & flow_table_mask]`, a
    /// table of flow indices userspace drew from a distribution (Zipf).
    pub flow_table_mask: u32,
    /// IPv6 frames: the template's L4 checksum (raw, as in the frame), the
    /// one of flow 0 (`saddr_base`, `sport_base`). Unused for IPv4.
    pub l4_check: u16,
    pub _pad: u16,
    pub template: [u8; PKTGEN_TEMPLATE_LEN],
}

impl PktgenConf {
    /// Source address and port (both host order) of frame `n`: flow
    /// `n % flows`, ports first (`sport_span` ports per address), then the
    /// next addresses. The `pktgen` program writes these into each frame; the
    /// generator's host side predicts them with the same function.
    #[inline(always)]
    pub fn flow_source(&self, n: u32) -> (u32, u16) {
        let span = if self.sport_span == 0 {
            1
        } else {
            self.sport_span as u32
        };
        let flow = if self.flows == 0 { 0 } else { n % self.flows };
        let addr = self.saddr_base.wrapping_add(flow / span);
        let port = (self.sport_base as u32 + flow % span) as u16;
        (addr, port)
    }

    /// IPv6 frames: the L4 checksum of the flow from (`addr` as the source
    /// address's low 32 bits, `port`), both host order, for L4 `protocol`:
    /// the template's `l4_check` updated for the two fields that differ
    /// from flow 0's (the address is in the pseudo-header).
    #[inline(always)]
    pub fn l4_check_of(&self, protocol: u8, addr: u32, port: u16) -> u16 {
        crate::rewrite::l4_check(
            self.l4_check,
            protocol,
            self.saddr_base.to_be(),
            addr.to_be(),
            self.sport_base.to_be(),
            port.to_be(),
        )
    }
}

/// EtherType of IPv6, host order (the generator's frames).
pub const PKTGEN_ETH_P_IPV6: u16 = 0x86dd;
/// Offsets in a generated IPv6 frame (Ethernet + IPv6 without extension
/// headers): the next-header byte, the source address's low 32 bits, and
/// the L4 header.
pub const PKTGEN_V6_NEXT_HEADER: usize = 14 + 6;
pub const PKTGEN_V6_SADDR_LOW: usize = 14 + 8 + 12;
pub const PKTGEN_V6_L4: usize = 14 + 40;

#[cfg(feature = "bench")]
/// `FWD_CONF[0]`: the `bare_fwd` / `bare_fwd6` programs' fixed next hop
/// (the benchmark's ceilings rewrite both MACs and redirect, nothing else).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FwdConf {
    /// Interface to redirect to.
    pub ifindex: u32,
    /// Destination and source MAC written into every frame.
    pub dmac: [u8; 6],
    pub smac: [u8; 6],
}

const _: () = assert!(core::mem::size_of::<PktgenConf>() == 24 + PKTGEN_TEMPLATE_LEN);
const _: () = assert!(PKTGEN_FLOW_TABLE.is_power_of_two());
#[cfg(feature = "bench")]
const _: () = assert!(core::mem::size_of::<FwdConf>() == 16);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), Copy, explicit padding fields and no implicit padding
    // (checked by the size asserts above).
    unsafe impl aya::Pod for super::PktgenConf {}
    #[cfg(feature = "bench")]
    unsafe impl aya::Pod for super::FwdConf {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(flows: u32, saddr_base: u32, sport_base: u16, sport_span: u16) -> PktgenConf {
        PktgenConf {
            ifindex: 0,
            flows,
            saddr_base,
            sport_base,
            sport_span,
            flow_table_mask: 0,
            l4_check: 0,
            _pad: 0,
            template: [0; PKTGEN_TEMPLATE_LEN],
        }
    }

    #[test]
    fn flow_source_goes_through_ports_then_addresses() {
        let c = conf(6, 0x0a00_0001, 1024, 3);
        let got: Vec<(u32, u16)> = (0..7).map(|n| c.flow_source(n)).collect();
        assert_eq!(
            got,
            [
                (0x0a00_0001, 1024),
                (0x0a00_0001, 1025),
                (0x0a00_0001, 1026),
                (0x0a00_0002, 1024),
                (0x0a00_0002, 1025),
                (0x0a00_0002, 1026),
                (0x0a00_0001, 1024),
            ]
        );
    }

    #[test]
    fn flow_source_tolerates_zero_flows_and_span() {
        assert_eq!(conf(0, 5, 7, 0).flow_source(123), (5, 7));
        assert_eq!(conf(4, 5, 7, 0).flow_source(3), (8, 7));
    }
}
