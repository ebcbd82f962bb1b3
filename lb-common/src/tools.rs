//! Layouts of the tools' XDP programs (lb-ebpf-tools), not the data
//! plane's: the load generator's (`pktgen`, feature `pktgen`: `lb pktgen`
//! ships in the product) and the benchmark baselines' (`bare_fwd`,
//! `hash_fwd`, feature `bench`: only the harness builds them). The agent's
//! object and the data plane never see them.

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
    pub _pad: u32,
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
}

#[cfg(feature = "bench")]
/// `FWD_CONF[0]`: the `bare_fwd` program's fixed next hop (the benchmark's
/// ceiling rewrites both MACs and redirects, nothing else).
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
