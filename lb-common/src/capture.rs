//! Packet capture (`lb capture`): the switch the data plane reads
//! (`CAPTURE_ON[0]`), the filter it applies to the frame as it leaves, and
//! the record it writes into the `CAPTURE` ring buffer. Off (the default),
//! the data plane pays one array lookup and one branch per packet.

/// Bytes of the `CAPTURE` ring buffer (a power-of-two multiple of the page
/// size): about 2600 full-size records.
pub const CAPTURE_RING_BYTES: u32 = 4 << 20;
/// Largest snap length: a 1500-byte MTU frame with its Ethernet header and
/// room for one VLAN tag.
pub const CAPTURE_MAX_SNAPLEN: u32 = 1536;
/// Address/port pairs a filter may list.
pub const CAPTURE_MAX_ENDPOINTS: usize = 16;

/// [`CaptureConf::what`]: packets the data plane forwards (XDP_TX or a
/// redirect, rewritten).
pub const CAPTURE_FORWARDED: u32 = 1;
/// [`CaptureConf::what`]: packets it does not forward (dropped or passed
/// to the kernel), as it leaves them.
pub const CAPTURE_NOT_FORWARDED: u32 = 2;

/// One address/port a packet must carry on either side; 0 matches any.
/// Network order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CaptureEndpoint {
    pub addr: u32,
    pub port: u16,
    pub _pad: u16,
}

/// `CAPTURE_ON[0]`, written by `lb capture`. `what == 0` (the default) is
/// off. A packet is captured when its class is in `what`, its source or
/// destination is in the client prefix (mask 0: any), and, when
/// `endpoints > 0`, one of the first `endpoints` entries matches its source
/// or destination address and port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CaptureConf {
    pub what: u32,
    /// Bytes of each frame copied (1 to [`CAPTURE_MAX_SNAPLEN`]).
    pub snaplen: u32,
    /// Client prefix and mask, network order.
    pub client: u32,
    pub client_mask: u32,
    pub endpoints: u32,
    pub _pad: u32,
    pub endpoint: [CaptureEndpoint; CAPTURE_MAX_ENDPOINTS],
    /// Records lost because the ring buffer was full (atomic adds by `lb`).
    pub lost: u64,
}

/// The addresses and ports of a frame as it leaves, network order (ports 0
/// when it has none).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CaptureTuple {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
}

impl CaptureConf {
    /// Does the filter take this frame?
    #[inline(always)]
    pub fn matches(&self, t: &CaptureTuple) -> bool {
        let mask = self.client_mask;
        if mask != 0 && t.saddr & mask != self.client && t.daddr & mask != self.client {
            return false;
        }
        if self.endpoints == 0 {
            return true;
        }
        let side = |e: &CaptureEndpoint, addr: u32, port: u16| {
            (e.addr == 0 || e.addr == addr) && (e.port == 0 || e.port == port)
        };
        let mut i = 0;
        while i < CAPTURE_MAX_ENDPOINTS {
            if i as u32 >= self.endpoints {
                return false;
            }
            let e = &self.endpoint[i];
            if side(e, t.saddr, t.sport) || side(e, t.daddr, t.dport) {
                return true;
            }
            i += 1;
        }
        false
    }
}

/// One captured frame in the `CAPTURE` ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct CaptureRecord {
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) when the frame left.
    pub ktime_ns: u64,
    /// The frame's length.
    pub len: u32,
    /// Bytes of it in `data`.
    pub caplen: u32,
    /// The [`crate::Verdict`] index.
    pub verdict: u32,
    pub ifindex: u32,
    pub data: [u8; CAPTURE_MAX_SNAPLEN as usize],
}

const _: () = assert!(core::mem::size_of::<CaptureEndpoint>() == 8);
const _: () = assert!(core::mem::size_of::<CaptureConf>() == 24 + 8 * CAPTURE_MAX_ENDPOINTS + 8);
const _: () = assert!(core::mem::size_of::<CaptureRecord>() == 24 + CAPTURE_MAX_SNAPLEN as usize);
const _: () = assert!(core::mem::size_of::<CaptureRecord>().is_multiple_of(8));

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain old data, explicit padding, no invalid bit patterns.
    unsafe impl aya::Pod for super::CaptureConf {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(a: [u8; 4]) -> u32 {
        u32::from_ne_bytes(a)
    }

    fn port(p: u16) -> u16 {
        p.to_be()
    }

    const FWD: CaptureTuple = CaptureTuple {
        saddr: 0,
        daddr: 0,
        sport: 0,
        dport: 0,
    };

    fn tuple() -> CaptureTuple {
        CaptureTuple {
            saddr: ip([198, 18, 0, 2]),
            daddr: ip([198, 19, 0, 11]),
            sport: port(40000),
            dport: port(80),
        }
    }

    #[test]
    fn an_empty_filter_takes_everything() {
        assert!(CaptureConf::default().matches(&tuple()));
        assert!(CaptureConf::default().matches(&FWD));
    }

    #[test]
    fn the_client_prefix_matches_either_side() {
        let mut c = CaptureConf {
            client: ip([198, 18, 0, 0]),
            client_mask: ip([255, 255, 255, 0]),
            ..CaptureConf::default()
        };
        assert!(c.matches(&tuple()));
        let t = tuple();
        let reply = CaptureTuple {
            saddr: t.daddr,
            daddr: t.saddr,
            sport: t.dport,
            dport: t.sport,
        };
        assert!(c.matches(&reply));
        c.client = ip([203, 0, 113, 0]);
        assert!(!c.matches(&tuple()));
    }

    #[test]
    fn endpoints_match_address_port_or_both_on_either_side() {
        let mut c = CaptureConf {
            endpoints: 2,
            ..CaptureConf::default()
        };
        c.endpoint[0] = CaptureEndpoint {
            addr: ip([198, 18, 0, 10]),
            port: port(80),
            _pad: 0,
        };
        c.endpoint[1] = CaptureEndpoint {
            addr: ip([198, 19, 0, 11]),
            port: port(80),
            _pad: 0,
        };
        assert!(c.matches(&tuple()), "the backend as destination");
        c.endpoint[1].port = port(443);
        assert!(!c.matches(&tuple()), "same address, other port");
        // A port alone, any address.
        c.endpoint[1] = CaptureEndpoint {
            addr: 0,
            port: port(40000),
            _pad: 0,
        };
        assert!(c.matches(&tuple()), "the client's port as source");
        // Entries past `endpoints` are ignored.
        c.endpoints = 1;
        assert!(!c.matches(&tuple()));
    }
}
