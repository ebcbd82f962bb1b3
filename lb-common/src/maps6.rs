//! IPv6's map layouts: its own keys and slots beside IPv4's (`maps.rs`),
//! so an IPv4 flow never hashes or compares a 16-byte address and IPv4's
//! layouts stay byte for byte what they are. The entries themselves
//! ([`Flow`], [`HalfOpenEntry`]) are the families' shared ones: the path
//! works on them in place whatever the family; what differs is the key,
//! the VIP a reply gets, and the backend's address.
//!
//! Sizes, and why:
//! - [`FlowKey6`] 40 bytes: two addresses, two ports, the protocol.
//! - [`HalfOpenSlot6`] 128 bytes, two cache lines: the lock, the key and
//!   the entry (88 bytes) do not fit one line as IPv4's do; padded to the
//!   pair a CPU's adjacent-line prefetch fetches together.
//! - [`EstablishedSlot6`] 192 bytes, three lines: lock + key + flags +
//!   forward entry are 96 bytes (IPv4's 128-byte slot cannot hold a
//!   40-byte key and two 48-byte entries: 144 bytes before the reply's
//!   VIP and the backend endpoint), so a client's packet reads lines 0–1;
//!   the reply entry, the VIP its replies get and the backend endpoint
//!   they come from follow at 96–178, so a backend's reply reads lines
//!   1–2. A forward entry's `Flow::vip` is 1 in a NAT flow (the marker
//!   "has a reply entry"; the VIP itself is the key's destination), and
//!   a reply's VIP is `reply_vip`, since `Flow::vip` holds 4 bytes.

use crate::{
    headers::L4Ports,
    ipv6::{Addr6, Ipv6Hdr, copy_addr},
    maps::{Flow, HalfOpenEntry},
};

/// `STAGES` index of IPv6's first stage (`lb_v6`): `lb` tail-calls it
/// with every IPv6 frame (indexes 0 and 1 are IPv4's second stage and
/// the PROXY stage).
pub const STAGE_V6: u32 = 2;
/// `STAGES` index of IPv6's second stage (`lb_v6_setup`), tail-called by
/// `lb_v6` after an established-table miss.
pub const STAGE_V6_SETUP: u32 = 3;
/// `STAGES` index of `lb_v6_portless`: IPv6's packets without ports of
/// their own (later fragments, ICMPv6 errors), tail-called by `lb_v6`.
pub const STAGE_V6_PORTLESS: u32 = 4;
/// `STAGES` index of IPv6's PROXY v2 stage (`lb_proxy6`), tail-called by
/// `lb_v6` and `lb_v6_setup` as `lb_proxy` by IPv4's stages: a program of
/// its own, as IPv6's path does not fit `lb_proxy`'s budget beside IPv4's.
pub const STAGE_PROXY6: u32 = 5;
/// Entries of IPv6's flow tables in the object (two per NAT flow); the
/// agent sizes them at load as IPv4's: `ESTABLISHED6` twice
/// `conntrack-size`, `HALF_OPEN6` twice `half-open-size`.
pub const FLOWS6_SIZE: u32 = 65_536;

/// `SERVICES6` key: (VIP, port, protocol), as [`crate::ServiceKey`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct ServiceKey6 {
    pub vip: Addr6,
    /// Raw network order.
    pub port: u16,
    pub protocol: u8,
    pub _pad: u8,
}

/// `BACKENDS6[id]`: an IPv6 backend. Ids are shared with IPv4's
/// `BACKENDS` (one id space, one `BACKEND_FLOWS`, `BACKEND_HOPS`): a v6
/// backend's slot in `BACKENDS` carries its port, flags and service as
/// every backend's does, and this its address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Backend6 {
    pub addr: Addr6,
}

/// `TUNNELS6[backend id]`: how an IPv6 tunnel service's backend is
/// reached, as `Tunnel` for IPv4: the outer IPv6 source (raw network-order
/// words; all zero: no source known, the packets go to the kernel as they
/// arrived) and the GUE port (raw network order).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Tunnel6 {
    pub source: Addr6,
    pub gue_port: u16,
    pub _pad: u16,
}

/// `NAT_BACKENDS6` key: a NAT service's backend endpoint, as
/// [`crate::Endpoint`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Endpoint6 {
    pub addr: Addr6,
    pub port: u16,
    pub protocol: u8,
    pub _pad: u8,
}

/// A flow's key in IPv6's flow tables (`HALF_OPEN6`, `ESTABLISHED6`,
/// `CONNTRACK6`): its tuple as a packet arrives, as [`crate::FlowKey`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey6 {
    pub saddr: Addr6,
    pub daddr: Addr6,
    pub sport: u16,
    pub dport: u16,
    /// The upper-layer protocol the extension-header walk ended on.
    pub protocol: u8,
    pub _pad0: u8,
    pub _pad1: u16,
}

impl FlowKey6 {
    /// The key of a packet with this header, upper-layer `protocol` (the
    /// walk's: `ip.next_header` only without extension headers) and ports.
    #[inline(always)]
    pub fn of(ip: &Ipv6Hdr, protocol: u8, ports: &L4Ports) -> FlowKey6 {
        let mut key = FlowKey6 {
            sport: ports.source,
            dport: ports.dest,
            protocol,
            ..FlowKey6::EMPTY
        };
        // Copied word by word from the packed header (`copy_addr`: no
        // call).
        // SAFETY: both are 16-byte fields, the header's 2-byte aligned.
        unsafe {
            copy_addr(&raw mut key.saddr, &raw const ip.saddr);
            copy_addr(&raw mut key.daddr, &raw const ip.daddr);
        }
        key
    }

    /// The reply key (backend → client) of the NAT flow whose forward key
    /// this is, its backend at `addr`, `port` (raw network order): as
    /// [`crate::flow::reply_key`].
    pub const fn reply_of(&self, addr: Addr6, port: u16) -> FlowKey6 {
        FlowKey6 {
            saddr: addr,
            daddr: self.saddr,
            sport: port,
            dport: self.sport,
            protocol: self.protocol,
            _pad0: 0,
            _pad1: 0,
        }
    }

    /// The forward key (client → VIP) of the NAT flow whose reply key this
    /// is, to `vip` (its service's, `SERVICE_VIPS6`) and the reply entry's
    /// `vport`: as [`crate::flow::forward_key`].
    pub const fn forward_of(&self, vip: Addr6, vport: u16) -> FlowKey6 {
        FlowKey6 {
            saddr: self.daddr,
            daddr: vip,
            sport: self.dport,
            dport: vport,
            protocol: self.protocol,
            _pad0: 0,
            _pad1: 0,
        }
    }

    /// The all-zero key marks an empty slot: no packet has it (source and
    /// destination `::`).
    pub const EMPTY: FlowKey6 = FlowKey6 {
        saddr: [0; 4],
        daddr: [0; 4],
        sport: 0,
        dport: 0,
        protocol: 0,
        _pad0: 0,
        _pad1: 0,
    };
}

/// `HALF_OPEN6[slot]`: as [`crate::HalfOpenSlot`] (a sequence lock, the
/// key, the entry), two lines. A NAT flow's VIP is the key's destination.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HalfOpenSlot6 {
    pub seq: u32,
    pub key: FlowKey6,
    pub flow: HalfOpenEntry,
    pub _pad: [u32; 10],
}

impl Default for HalfOpenSlot6 {
    fn default() -> Self {
        HalfOpenSlot6 {
            seq: 0,
            key: FlowKey6::EMPTY,
            flow: HalfOpenEntry::default(),
            _pad: [0; 10],
        }
    }
}

/// `ESTABLISHED6[slot]`: one IPv6 flow, both directions, as
/// [`crate::EstablishedSlot`] (the module's doc has the layout and why).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct EstablishedSlot6 {
    pub seq: u32,
    /// The forward key (client → VIP); all zero: the slot is empty.
    pub key: FlowKey6,
    /// `SLOT_F_*` (the bucket's, on its first way).
    pub flags: u32,
    /// The forward entry (`direction` FORWARD).
    pub forward: Flow,
    /// NAT: the reply entry (`direction` REPLY); DSR: zero.
    pub reply: Flow,
    /// NAT: the VIP replies' source becomes (`reply.vport` the port).
    pub reply_vip: Addr6,
    /// NAT: the backend's address and port its replies come from.
    pub backend_addr: Addr6,
    pub backend_port: u16,
    pub _pad0: u16,
    pub _pad: [u32; 3],
}

/// `FRAGS6` key: one fragmented datagram as it arrives (source,
/// destination, identification, upper-layer protocol: what IPv6
/// reassembly keys on, RFC 8200 §4.5), as [`crate::FragKey`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FragKey6 {
    pub saddr: Addr6,
    pub daddr: Addr6,
    /// Identification, raw network order.
    pub id: u32,
    pub protocol: u8,
    pub _pad0: u8,
    pub _pad1: u16,
}

/// IPv6's `FW_DENY6` / `FW_ALLOW6` LPM trie data, as IPv4's `FwKey`: the
/// scope (exact, the first 32 bits of every prefix) then the source prefix,
/// network order. A rule's LPM prefix length is `32 + its CIDR length`
/// (up to 160).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FwKey6 {
    pub scope: u32,
    pub addr: Addr6,
}

/// IPv6's token-bucket key: the scope and the source masked to the rate
/// limit's IPv6 prefix (`per = "/64"`: a client's whole /64 shares one).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BucketKey6 {
    pub scope: u32,
    pub addr: Addr6,
}

/// `FW_SCRATCH6`, per CPU: the IPv6 firewall's trie key and bucket key,
/// built here rather than on IPv6's full stack. The trie key is an LPM
/// key: its prefix length (160, a whole address) then [`FwKey6`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FwScratch6 {
    pub prefix_len: u32,
    pub rule: FwKey6,
    pub bucket: BucketKey6,
}

/// IPv6's drop-tracing event in the `TRACE` ring buffer (`lb_v6`,
/// `lb_v6_setup`, `lb_v6_portless` send it): [`crate::TraceEvent`]'s
/// fields in its order, with 16-byte addresses. A second event type
/// rather than a family field, so IPv4's 32-byte event (and the code that
/// writes it) stays as it was; the reader tells them apart by the record's
/// length. `protocol` is the fixed header's next header (an extension
/// header's type when one follows it); the ports are read only when TCP
/// or UDP follows the fixed header.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TraceEvent6 {
    /// The [`crate::Verdict`] index.
    pub verdict: u32,
    /// The service on (daddr, dport, protocol) in `SERVICES6`, or
    /// [`crate::TRACE_NO_SERVICE`].
    pub service_id: u32,
    pub saddr: Addr6,
    pub daddr: Addr6,
    pub sport: u16,
    pub dport: u16,
    pub protocol: u8,
    pub _pad0: u8,
    /// The frame's EtherType as in the frame (network order).
    pub ether_type: u16,
    pub ifindex: u32,
    /// Frame length in bytes.
    pub len: u32,
}

/// `source-ip-prefix` unset: an IPv6 `source-ip` service hashes the
/// client's whole address (its `SOURCE_MASKS6` entry all ones; 64: every
/// address of a /64 reaches one backend).
pub const SOURCE_PREFIX_WHOLE: u8 = 128;

const _: () = assert!(core::mem::size_of::<FwScratch6>() == 44);
const _: () = assert!(core::mem::size_of::<TraceEvent6>() == 56);
// The reader tells the events apart by length.
const _: () =
    assert!(core::mem::size_of::<TraceEvent6>() != core::mem::size_of::<crate::TraceEvent>());
const _: () = assert!(core::mem::size_of::<ServiceKey6>() == 20);
const _: () = assert!(core::mem::size_of::<Backend6>() == 16);
const _: () = assert!(core::mem::size_of::<Tunnel6>() == 20);
const _: () = assert!(core::mem::size_of::<Endpoint6>() == 20);
const _: () = assert!(core::mem::size_of::<FlowKey6>() == 40);
const _: () = assert!(core::mem::size_of::<HalfOpenSlot6>() == 128);
const _: () = assert!(core::mem::size_of::<EstablishedSlot6>() == 192);
// A client's packet reads the first 96 bytes, a reply the last 96.
const _: () = assert!(core::mem::offset_of!(EstablishedSlot6, forward) == 48);
const _: () = assert!(core::mem::offset_of!(EstablishedSlot6, reply) == 96);
const _: () = assert!(core::mem::offset_of!(EstablishedSlot6, backend_port) == 176);
const _: () = assert!(core::mem::size_of::<FragKey6>() == 40);
const _: () = assert!(core::mem::size_of::<FwKey6>() == 20);
const _: () = assert!(core::mem::size_of::<BucketKey6>() == 20);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), Copy, explicit padding, no implicit padding (checked
    // by the size asserts above).
    unsafe impl aya::Pod for super::ServiceKey6 {}
    unsafe impl aya::Pod for super::Backend6 {}
    unsafe impl aya::Pod for super::Tunnel6 {}
    unsafe impl aya::Pod for super::Endpoint6 {}
    unsafe impl aya::Pod for super::FlowKey6 {}
    unsafe impl aya::Pod for super::HalfOpenSlot6 {}
    unsafe impl aya::Pod for super::EstablishedSlot6 {}
    unsafe impl aya::Pod for super::FragKey6 {}
    unsafe impl aya::Pod for super::FwKey6 {}
    unsafe impl aya::Pod for super::BucketKey6 {}
    unsafe impl aya::Pod for super::FwScratch6 {}
    unsafe impl aya::Pod for super::TraceEvent6 {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nat_flows_keys_lead_to_each_other() {
        let client = [0x2001_0db8u32.to_be(), 0, 0, 2u32.to_be()];
        let vip = [0x2001_0db8u32.to_be(), 0, 0, 0x10u32.to_be()];
        let backend = [0xfd00_0000u32.to_be(), 0, 0, 5u32.to_be()];
        let forward = FlowKey6 {
            saddr: client,
            daddr: vip,
            sport: 41234u16.to_be(),
            dport: 80u16.to_be(),
            protocol: 6,
            ..FlowKey6::default()
        };
        let reply = forward.reply_of(backend, 8080u16.to_be());
        assert_eq!(
            (reply.saddr, reply.daddr, reply.sport, reply.dport),
            (backend, client, 8080u16.to_be(), 41234u16.to_be())
        );
        assert_eq!(reply.forward_of(vip, forward.dport), forward);
    }
}
