//! Health checks through the VIP (docs/architecture.md, "Checks through the
//! VIP"): what the agent's prober and the data plane agree on.
//!
//! The agent probes from a network namespace of its own (the VIP is not
//! local there), each probe from a source port of [`PROBE_PORTS`] it
//! records in `PROBES` (port → [`ProbeEntry`]) before connecting. The
//! `lb_probe` program on the host end of the probe namespace's veth sends
//! such a packet to its backend in the service's mode, as a client's would
//! go; the `lb` program on the back interface hands the backend's answer
//! (from the VIP, to a probe port, from the MAC and interface the probe
//! left by) back into the veth before the LB's own stack sees it. The
//! checks themselves are pure, here, for host tests.
//!
//! IPv6 probes have their own map, `PROBES6` (port → [`ProbeEntry6`]), of
//! the same shape with 16-byte addresses: IPv4's entries stay 36 bytes and
//! IPv4's programs never read an IPv6 one. The ports are one range for
//! both: a port is one probe, of either family (the agent hands them out).

use crate::ipv6::Addr6;

/// The probes' source ports (host order, inclusive): above Linux's default
/// ephemeral range (32768–60999), so no connection of the LB host's own is
/// ever taken for a probe's answer. The probe namespace's own sockets bind
/// these ports explicitly.
pub const PROBE_PORT_FIRST: u16 = 61000;
pub const PROBE_PORT_LAST: u16 = 61999;
/// How many probes can be in flight (and how many entries `PROBES` holds).
pub const PROBE_PORTS: u32 = (PROBE_PORT_LAST - PROBE_PORT_FIRST) as u32 + 1;

/// Is `port` (host order) one of the probes' source ports? The `lb`
/// program asks this (two compares) before it looks `PROBES` up.
#[inline(always)]
pub const fn is_probe_port(port: u16) -> bool {
    port >= PROBE_PORT_FIRST && port <= PROBE_PORT_LAST
}

/// `PROBES[source port, network order]` (IPv4) and `PROBES6[…]` (IPv6):
/// where one probe goes. The agent writes the first fields before the
/// probe's first packet; `lb_probe` fills in the way it left (`ifindex`,
/// `mac`), which its answer must come back by. `A` is the family's address
/// (`u32`, `Addr6`: raw network-order words).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProbeEntryOf<A> {
    /// The service's VIP and port (network order): the probe's destination
    /// and its answer's source.
    pub vip: A,
    pub vport: u16,
    pub protocol: u8,
    pub _pad: u8,
    /// The backend's address and port (network order). For IPv6 the data
    /// plane sends to the address `BACKENDS6[backend_id]` holds (as a
    /// client's flow goes); this one is the agent's record of it.
    pub backend: A,
    pub backend_port: u16,
    pub _pad2: u16,
    /// The service's id (`SERVICE_CONF`): its mode.
    pub service_id: u32,
    /// The backend's id (`BACKENDS`): what a mode keeps per backend (a
    /// tunnel's source). Never its counters: probes are not its traffic.
    pub backend_id: u32,
    /// Written by `lb_probe`: the interface the probe left by, and the MAC
    /// it was sent to (the backend's, or its router's). 0: not sent yet.
    pub ifindex: u32,
    pub mac: [u8; 6],
    pub _pad3: u16,
}

impl<A: Default> ProbeEntryOf<A> {
    /// The entry the agent writes for a probe of the service `ids.0`'s
    /// `vip` (address, port in host order) over `protocol`, to its backend
    /// `ids.1` at `backend`; the way out is `lb_probe`'s to fill in.
    pub fn new(vip: (A, u16), protocol: u8, backend: (A, u16), ids: (u32, u32)) -> Self {
        ProbeEntryOf {
            vip: vip.0,
            vport: vip.1.to_be(),
            protocol,
            backend: backend.0,
            backend_port: backend.1.to_be(),
            service_id: ids.0,
            backend_id: ids.1,
            ..ProbeEntryOf::default()
        }
    }
}

/// An IPv4 probe's entry (`PROBES`).
pub type ProbeEntry = ProbeEntryOf<u32>;
/// An IPv6 probe's entry (`PROBES6`).
pub type ProbeEntry6 = ProbeEntryOf<Addr6>;

/// A probe entry's address: compared word by word (an array compare
/// becomes a call to an out-of-line memcmp on the bpf target).
pub trait ProbeAddr: Copy {
    fn same(&self, other: &Self) -> bool;
}

impl ProbeAddr for u32 {
    #[inline(always)]
    fn same(&self, other: &u32) -> bool {
        self == other
    }
}

impl ProbeAddr for Addr6 {
    #[inline(always)]
    fn same(&self, other: &Addr6) -> bool {
        self[0] == other[0] && self[1] == other[1] && self[2] == other[2] && self[3] == other[3]
    }
}

/// `PROBE_CONF[0]`: the probe namespace's veth, as the `lb` program hands
/// answers into it. `ifindex` 0: no prober runs; nothing is handed over.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProbeConf {
    /// The host end of the veth (where `lb_probe` runs).
    pub ifindex: u32,
    /// The probe namespace's end (the answers' destination MAC) and the
    /// host end (their source MAC).
    pub probe_mac: [u8; 6],
    pub host_mac: [u8; 6],
}

/// `PROBE_STATS[i]` (per CPU): what `lb_probe` and the answers' hand-over
/// did. Never counted as a service's or backend's traffic.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeCounter {
    /// Probe packets sent to their backend.
    Sent = 0,
    /// Probe packets dropped: their backend had no next hop yet (the agent
    /// resolves it), they were too big, or their service is gone.
    NotSent = 1,
    /// IPv4 and IPv6 packets from the probe namespace without a `PROBES`
    /// (`PROBES6`) entry: dropped (never handed to the LB's stack, where
    /// the VIP is local and would answer for the backend). The frames
    /// `lb_probe` passes to the kernel (ARP, IPv6's link-scoped neighbour
    /// discovery and MLD) count here too.
    Unknown = 2,
    /// Backends' answers handed into the probe namespace.
    Answers = 3,
}

pub const PROBE_COUNTERS: u32 = 4;

/// Does a packet that arrived on `ifindex` from `mac`, from `source` port
/// `source_port` (network order), answer the probe `entry`? Only its
/// backend's answer does: from the VIP and port the probe went to, back by
/// the interface and from the MAC the probe left to. A client on another
/// segment (or a spoofer without the backend's MAC) gets nothing handed in.
#[inline(always)]
pub fn answers<A: ProbeAddr>(
    entry: &ProbeEntryOf<A>,
    source: A,
    source_port: u16,
    ifindex: u32,
    mac: &[u8; 6],
) -> bool {
    entry.ifindex != 0
        && entry.ifindex == ifindex
        && entry.vip.same(&source)
        && entry.vport == source_port
        // Byte by byte: an array compare became a call to an out-of-line
        // memcmp on the bpf target.
        && entry.mac[0] == mac[0]
        && entry.mac[1] == mac[1]
        && entry.mac[2] == mac[2]
        && entry.mac[3] == mac[3]
        && entry.mac[4] == mac[4]
        && entry.mac[5] == mac[5]
}

const _: () = assert!(core::mem::size_of::<ProbeEntry>() == 36);
const _: () = assert!(core::mem::size_of::<ProbeEntry6>() == 60);
const _: () = assert!(core::mem::size_of::<ProbeConf>() == 16);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), Copy, explicit padding, sizes asserted above.
    unsafe impl aya::Pod for super::ProbeEntry {}
    unsafe impl aya::Pod for super::ProbeEntry6 {}
    unsafe impl aya::Pod for super::ProbeConf {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_ports_are_above_the_default_ephemeral_range() {
        assert!(!is_probe_port(60999));
        assert!(is_probe_port(PROBE_PORT_FIRST));
        assert!(is_probe_port(PROBE_PORT_LAST));
        assert!(!is_probe_port(PROBE_PORT_LAST + 1));
        assert_eq!(PROBE_PORTS, 1000);
    }

    #[test]
    fn only_the_backends_answer_by_the_probes_way_is_handed_in() {
        let entry = ProbeEntry {
            vip: 0x0a00_0001,
            vport: 80u16.to_be(),
            ifindex: 3,
            mac: [2, 0, 0, 0, 0, 9],
            ..ProbeEntry::default()
        };
        let mac = [2, 0, 0, 0, 0, 9];
        assert!(answers(&entry, 0x0a00_0001, 80u16.to_be(), 3, &mac));
        assert!(
            !answers(&entry, 0x0a00_0002, 80u16.to_be(), 3, &mac),
            "another source"
        );
        assert!(
            !answers(&entry, 0x0a00_0001, 81u16.to_be(), 3, &mac),
            "another port"
        );
        assert!(
            !answers(&entry, 0x0a00_0001, 80u16.to_be(), 4, &mac),
            "another interface"
        );
        assert!(
            !answers(&entry, 0x0a00_0001, 80u16.to_be(), 3, &[2, 0, 0, 0, 0, 8]),
            "another MAC"
        );
        let unsent = ProbeEntry {
            ifindex: 0,
            ..entry
        };
        assert!(
            !answers(&unsent, 0x0a00_0001, 80u16.to_be(), 0, &[0; 6]),
            "not sent yet"
        );
    }

    #[test]
    fn only_the_backends_answer_by_the_probes_way_is_handed_in_over_ipv6() {
        let vip6: Addr6 = [0x2001_0db8u32.to_be(), 0x18u32.to_be(), 0, 0x10u32.to_be()];
        let entry = ProbeEntry6 {
            vip: vip6,
            vport: 80u16.to_be(),
            ifindex: 3,
            mac: [2, 0, 0, 0, 0, 9],
            ..ProbeEntry6::default()
        };
        let mac = [2, 0, 0, 0, 0, 9];
        assert!(answers(&entry, vip6, 80u16.to_be(), 3, &mac));
        for word in 0..4 {
            let mut other = vip6;
            other[word] ^= 1u32.to_be();
            assert!(
                !answers(&entry, other, 80u16.to_be(), 3, &mac),
                "another source (word {word})"
            );
        }
        assert!(
            !answers(&entry, vip6, 81u16.to_be(), 3, &mac),
            "another port"
        );
        assert!(
            !answers(&entry, vip6, 80u16.to_be(), 4, &mac),
            "another interface"
        );
        assert!(
            !answers(&entry, vip6, 80u16.to_be(), 3, &[2, 0, 0, 0, 0, 8]),
            "another MAC"
        );
        let unsent = ProbeEntry6 {
            ifindex: 0,
            ..entry
        };
        assert!(
            !answers(&unsent, vip6, 80u16.to_be(), 0, &[0; 6]),
            "not sent yet"
        );
    }
}
