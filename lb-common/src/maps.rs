//! Map keys, values and limits shared by the XDP program and the agent.
//!
//! Every type is `#[repr(C)]` with explicit padding and a size assert, so the
//! kernel and userspace can never disagree on a layout. Addresses and ports
//! are raw network order, exactly as in the packet.

use crate::verdict::{VERDICT_COUNT, Verdict};

/// Most services (VIP, port, protocol) the data plane holds.
pub const MAX_SERVICES: u32 = 256;
/// Most backends over all services; a backend id indexes `BACKENDS`.
pub const MAX_BACKENDS: u32 = 4096;
/// Slots in one scheduling ring (one half of a service's double buffer).
pub const MAX_RING: usize = 4096;
/// Default capacity of the established-flow table (flows); the agent may
/// override it. The map holds two entries per NAT flow.
pub const DEFAULT_CONNTRACK_SIZE: u32 = 262_144;
/// Default capacity of the half-open table (flows that have not completed a
/// handshake, UDP flows seen once).
pub const DEFAULT_HALF_OPEN_SIZE: u32 = 65_536;

/// `SERVICES` key: which traffic a service takes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub vip: u32,
    pub port: u16,
    pub protocol: u8,
    pub _pad: u8,
}

/// Forwarding modes (`ServiceConf::mode`).
pub const MODE_NAT: u32 = 0;
pub const MODE_DSR: u32 = 1;
/// IPIP: the packet, untouched, inside an outer IPv4 header to the backend
/// (`crate::tunnel`); the backend answers the client itself.
pub const MODE_IPIP: u32 = 2;
/// GUE: as IPIP, in IPv4 + UDP + GUE headers (`crate::tunnel`).
pub const MODE_GUE: u32 = 3;
/// Full NAT (issue 25): the destination becomes the backend and the source
/// an address of the LB's with a port it allocates (`FNAT_CONF`,
/// `FNAT_CLAIMS`), so the backends' replies return to this LB whatever
/// their routing.
pub const MODE_FULL_NAT: u32 = 4;

/// Does the backend answer the client itself (DSR and the tunnels)? Then a
/// flow has no reply entry, and over the new-flow budget a hash service's
/// flow goes without one (the data plane's one test for "as for DSR").
pub const fn answers_directly(mode: u32) -> bool {
    !matches!(mode, MODE_NAT | MODE_FULL_NAT)
}

/// Does the mode carry packets in a tunnel (IPIP, GUE)?
pub const fn is_tunnel(mode: u32) -> bool {
    matches!(mode, MODE_IPIP | MODE_GUE)
}

/// Schedulers (`ServiceConf::scheduler`): which table is indexed, by what.
/// A per-service counter walks the ring (round robin, weighted round robin,
/// least connections: the agent refreshes that ring from active counts).
pub const SCHED_COUNTER: u32 = 0;
/// The 5-tuple hash indexes the ring (`flow-hash`).
pub const SCHED_HASH: u32 = 1;
/// The 5-tuple hash indexes the service's Maglev table (`maglev`).
pub const SCHED_MAGLEV: u32 = 2;
/// The client address's hash indexes the Maglev table (`source-ip`).
pub const SCHED_SOURCE_IP: u32 = 3;

/// Does this scheduler pick a backend from a hash of the packet alone
/// (`flow-hash`, `maglev`, `source-ip`)? Then a packet whose flow entry is
/// missing is routed by the same table and lands where its flow was
/// (hash-on-miss), while the backend set is unchanged. The counter
/// schedulers cannot.
pub const fn hashes_flow(scheduler: u32) -> bool {
    matches!(scheduler, SCHED_HASH | SCHED_MAGLEV | SCHED_SOURCE_IP)
}

/// Does this scheduler index the service's Maglev table (`maglev`,
/// `source-ip`) rather than its ring? The one place that says so: the data
/// plane's scheduler, the agent's table writes and its readers ask here.
pub const fn uses_maglev(scheduler: u32) -> bool {
    matches!(scheduler, SCHED_MAGLEV | SCHED_SOURCE_IP)
}

/// Slots of the largest Maglev table (prime). 256 KiB per table.
pub const MAGLEV_MAX: usize = 65_537;
/// Services that may use a Maglev table (`maglev`, `source-ip`) at once.
/// Each has two table halves (double buffer) of 256 KiB: 32 tables, 8 MiB
/// of kernel memory, preallocated.
pub const MAX_MAGLEV_SERVICES: u32 = 16;

/// `MAGLEV[Ring::slot(service id, half)]`: a service's Maglev lookup table,
/// `len` (prime) slots of backend ids. A hash map (keyed like `RINGS`) so
/// only Maglev services pay the 256 KiB.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct MaglevTable {
    pub len: u32,
    pub ids: [u32; MAGLEV_MAX],
}

/// `SERVICE_CONF[service id]`: what the packet path needs once the service
/// is known. `active_ring` flips between the two halves of the service's
/// double-buffered ring in one aligned 4-byte store.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceConf {
    /// 0 or 1: which half of the ring new flows use.
    pub active_ring: u32,
    pub mode: u32,
    pub scheduler: u32,
    /// Non-zero once the agent has filled this slot: [`SERVICE_FILLED`],
    /// with [`SERVICE_PROXY_V2`] for a `proxy-protocol = "v2"` service.
    pub enabled: u32,
}

/// `ServiceConf::enabled` bit: the agent filled the slot.
pub const SERVICE_FILLED: u32 = 1;
/// `ServiceConf::enabled` bit: the service's streams to its backends start
/// with a PROXY protocol v2 header (`crate::proxy`).
pub const SERVICE_PROXY_V2: u32 = 2;

/// `RINGS[service id * 2 + half]`: backend ids, `len` of them valid.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Ring {
    pub len: u32,
    pub ids: [u32; MAX_RING],
}

impl Ring {
    pub const EMPTY: Ring = Ring {
        len: 0,
        ids: [0; MAX_RING],
    };

    /// Index of a service's ring half in `RINGS`.
    #[inline(always)]
    pub const fn slot(service_id: u32, half: u32) -> u32 {
        service_id * 2 + (half & 1)
    }
}

/// Backend flag: flows already pinned to this backend are dropped (it was
/// removed, disabled, or marked down with the "drop-flows" rule) instead of
/// forwarded, so their clients reconnect to a live backend at once.
pub const BACKEND_F_DROP_FLOWS: u16 = 1;
/// Backend flag: the slot is allocated to `service_id`. A restarted agent
/// rebuilds its id table from the pinned map with it.
pub const BACKEND_F_IN_USE: u16 = 2;
/// Backend flag: this backend is in its service's active ring, i.e. it takes
/// new flows. A TCP SYN whose tuple is pinned to a backend without it opens a
/// new connection on a reused source port: the data plane schedules it afresh
/// instead of sending it to a drained, down, disabled or removed backend. The
/// agent sets it for every id in the ring it publishes, so the packet path
/// never scans a ring.
pub const BACKEND_F_IN_RING: u16 = 4;

/// `BACKENDS[backend id]`: where a backend lives. Ids are per service, so a
/// backend's flags (and counters) belong to one service.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    pub addr: u32,
    pub port: u16,
    pub flags: u16,
    pub service_id: u32,
    pub _pad: u32,
}

/// `TUNNELS[backend id]`: how a tunnel service's backend is reached: the
/// outer source address (the configured `tunnel-source`, or the address the
/// agent's host reaches the backend from) and the GUE port, raw network
/// order. Written by the agent with the backend; `source` 0: not known (no
/// route when it was written), and the data plane hands the packet to the
/// kernel as it does without a next hop.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tunnel {
    pub source: u32,
    pub gue_port: u16,
    pub _pad: u16,
}

/// `NAT_BACKENDS` key: a backend endpoint of a NAT service (address,
/// port, protocol; network order). Its segments that find no flow are
/// dropped (`Verdict::DropBackendNoFlow`) instead of routed on unchanged.
/// The value counts the NAT backends on the endpoint (several services may
/// share one). Written by the agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Endpoint {
    pub addr: u32,
    pub port: u16,
    pub protocol: u8,
    pub _pad: u8,
}

/// Flow-table key (`CONNTRACK`, `HALF_OPEN`): a flow's forward entry as its
/// packets arrive (client → VIP), or a NAT flow's reply entry as a reply
/// arrives (backend → client).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub protocol: u8,
    // Scalars, not `[u8; 3]`: zeroing a byte array became a call to an
    // out-of-line BPF memset on the packet path.
    pub _pad0: u8,
    pub _pad1: u16,
}

/// A resolved next hop: where a flow's packets leave, with which MACs, and
/// the largest IP packet that link takes (`bpf_fib_lookup`'s `mtu_result`).
/// `ifindex == 0` means not resolved yet.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NextHop {
    pub ifindex: u32,
    pub dmac: [u8; 6],
    pub smac: [u8; 6],
    /// Egress MTU (host order): a packet with a longer IP total length is
    /// answered with "fragmentation needed" (DF set) or passed to the kernel
    /// to fragment (DF clear).
    pub mtu: u16,
    pub _pad: u16,
}

/// `BACKEND_HOPS[backend id]`: the next hop towards a backend, as the last
/// new flow to it resolved it, and when (a tick). New flows to the backend
/// take it instead of asking the FIB while it is younger than
/// [`crate::flow::HOP_TTL`]; the agent zeroes it whenever it writes the
/// backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct BackendHop {
    pub hop: NextHop,
    pub resolved: u32,
}

/// Entry directions (`Flow::direction`): the client's, and the reply's.
pub const FORWARD: u8 = 0;
pub const REPLY: u8 = 1;

/// How many idle timeouts `FlowConf::timeouts` holds (`flow::Timeout`).
pub const TIMEOUT_COUNT: usize = 4;

/// `Flow::flags`: the entry came from a peer LB (flow sync, issue 27), not
/// from a handshake this LB saw.
pub const FLOW_F_SYNCED: u8 = 1;
/// [`Flow::flags`]: the flow is a full-NAT flow (`MODE_FULL_NAT`). Its
/// forward entry's `vip`/`vport` hold the source address and port it was
/// given (not the VIP); its reply entry's keep the VIP, as NAT's do, and the
/// reply's key is (backend → source address), found through
/// `FNAT_CLAIMS`.
pub const FLOW_F_FULL_NAT: u8 = 2;
/// [`Flow::flags`]: a `proxy-protocol = "v2"` flow opened by a SYN this LB
/// saw (both entries, half-open and established). Its established packets
/// have seq/ack shifted by `lb` with the flow's `first`
/// ([`EstablishedSlot::proxy_first`]; [`ProxyFlow`] for a flow in the
/// overflow); the one that takes the header goes to the PROXY stage
/// (`STAGE_PROXY`) (docs/architecture.md, "PROXY protocol v2").
pub const FLOW_F_PROXY: u8 = 4;
/// The bits a half-open slot keeps of [`Flow::flags`].
pub const HALF_OPEN_FLAGS: u8 = FLOW_F_FULL_NAT | FLOW_F_PROXY;

/// `PROXY_FLOWS` value, keyed by the flow's forward key (client → VIP): the
/// client's ISN + 1 (`first`, host order), the sequence number at which the
/// header goes in (`lb_common::proxy`), of a PROXY flow established in the
/// overflow (`CONNTRACK`, whose entries have no slot to keep it in; a flow
/// in `ESTABLISHED` keeps it in [`EstablishedSlot::proxy_first`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProxyFlow {
    pub first: u32,
    pub _pad: u32,
}

/// Capacity of `PROXY_FLOWS` (an LRU: the least recently used PROXY flows
/// go first when it is full; such a flow's packets are then dropped and
/// counted, `drop_proxy_lost`).
pub const MAX_PROXY_FLOWS: u32 = 131_072;

/// `STAGES` indexes (lb-ebpf/src/stage.rs): the path's second stage
/// (`lb_setup`) and the PROXY v2 stage (`lb_proxy`).
pub const STAGE_SETUP: u32 = 0;
pub const STAGE_PROXY: u32 = 1;

/// `CONNTRACK` and `HALF_OPEN` value: one direction of a flow.
///
/// A forward entry (key client → VIP) pins the flow to its backend; a NAT
/// flow has a second, reply entry (key backend → client) in the same table,
/// carrying the VIP its replies' source becomes. Both are created, promoted
/// and removed together, so a flow and its reply translation live and die
/// together. The next hop is the one the direction's first forwarded packet
/// resolved (`bpf_fib_lookup` is a third of the cost of a packet, so
/// established flows reuse it). docs/architecture.md has the states.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Flow {
    pub backend_id: u32,
    pub service_id: u32,
    /// [`crate::flow::STATE_NEW`], `STATE_ESTABLISHED` or `STATE_CLOSING`;
    /// a u32 so the data plane can compare-and-swap it (BPF has 32- and
    /// 64-bit atomics only).
    pub state: u32,
    /// When the direction last carried a packet, in ticks ([`crate::flow::ticks`]).
    pub seen: u32,
    /// Reply entries: the VIP and port (network order) the reply's source
    /// is rewritten to. Forward entries: the VIP in a NAT flow (non-zero
    /// marks "has a reply entry"), zero in DSR; `vport` zero.
    pub vip: u32,
    pub vport: u16,
    /// [`crate::flow::FORWARD`] or [`crate::flow::REPLY`].
    pub direction: u8,
    /// [`FLOW_F_SYNCED`]: bits about where the entry came from.
    pub flags: u8,
    pub next_hop: NextHop,
    /// TCP sequence state. Established entries: the highest sequence number
    /// this direction's sender has used (a FIN or RST closes the flow only
    /// within [`crate::flow::SEQ_WINDOW`] of it). A half-open NAT flow's
    /// copy in state [`crate::flow::STATE_SYN_ACKED`]: the acknowledgement
    /// number that completes its handshake (the backend's SYN-ACK
    /// sequence number + 1).
    pub seq: u32,
}

/// The part of a half-open flow its `HALF_OPEN` slot keeps (a
/// [`HalfOpenSlot`] is one cache line): a half-open flow is one forward
/// entry, its next hop is only ever cached in a packet's copy, so neither
/// `direction`, `vport` nor `next_hop` are stored. [`Flow::from`] and
/// [`HalfOpenEntry::from`] convert.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HalfOpenEntry {
    pub backend_id: u32,
    pub service_id: u32,
    /// `STATE_NEW`, `STATE_SYN_ACKED`, `STATE_PICKED_UP` or
    /// `STATE_PICKED_UP_ANSWERED` ([`crate::flow`]).
    pub state: u32,
    pub seen: u32,
    /// NAT: the VIP (non-zero: the flow has replies to translate).
    pub vip: u32,
    /// [`Flow::seq`] of a half-open copy.
    pub seq: u32,
    /// Full NAT: the allocated source port (network order; the source
    /// address is `vip`). Zero otherwise. [`Flow::vport`] of the copy.
    pub snat_port: u16,
    /// [`Flow::flags`] of the copy ([`HALF_OPEN_FLAGS`]).
    pub flags: u8,
    pub _pad0: u8,
    /// A PROXY v2 flow ([`FLOW_F_PROXY`]): its client's first sequence
    /// number (the SYN's + 1, host order), written with the flag and read
    /// at promotion into [`EstablishedSlot::proxy_first`] (or
    /// `PROXY_FLOWS`, in the overflow). Zero otherwise.
    pub proxy_first: u32,
    pub _pad: [u32; 3],
}

impl From<&HalfOpenEntry> for Flow {
    #[inline(always)]
    fn from(e: &HalfOpenEntry) -> Flow {
        Flow {
            backend_id: e.backend_id,
            service_id: e.service_id,
            state: e.state,
            seen: e.seen,
            vip: e.vip,
            vport: e.snat_port,
            direction: FORWARD,
            flags: e.flags & HALF_OPEN_FLAGS,
            next_hop: NextHop::default(),
            seq: e.seq,
        }
    }
}

impl From<&Flow> for HalfOpenEntry {
    #[inline(always)]
    fn from(f: &Flow) -> HalfOpenEntry {
        HalfOpenEntry {
            backend_id: f.backend_id,
            service_id: f.service_id,
            state: f.state,
            seen: f.seen,
            vip: f.vip,
            seq: f.seq,
            snat_port: f.vport,
            flags: f.flags & HALF_OPEN_FLAGS,
            _pad0: 0,
            proxy_first: 0,
            _pad: [0; 3],
        }
    }
}

/// `BACKEND_FLOWS[backend id]`: established flows the data plane opened
/// (promoted) and closed (FIN/RST, expiry) for the backend, counted with
/// atomic adds from every CPU. The agent's sweep counts its own removals in
/// `FLOWS_SWEPT`; active = opened - closed - swept.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowCounts {
    pub opened: u64,
    pub closed: u64,
}

/// `FLOW_CONF[0]`: the flow lifecycle's run-time settings, written by the
/// agent (live: a reload changes them without touching a flow).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowConf {
    /// Idle timeouts in ticks, indexed by [`crate::flow::Timeout`].
    pub timeouts: [u32; TIMEOUT_COUNT],
    /// New flows a CPU inserts per tick (about a second); 0: no limit.
    pub new_flow_budget: u32,
    /// Slots in `HALF_OPEN` (its `max_entries`), for [`crate::flow::slot_index`];
    /// 0: no half-open table yet (every half-open lookup misses).
    pub half_open_slots: u32,
    /// The half-open table's hash seed: random, chosen by the agent when it
    /// creates the table and kept with it (pinned), so a restart finds the
    /// same slots and a flood cannot aim at a chosen slot.
    pub half_open_seed: u32,
    /// The data plane's clock (`crate::flow::clock_ns`): nanoseconds per
    /// kernel jiffy (`TICK_NSEC`, from the kernel's HZ) and the epoch that
    /// puts `jiffies × jiffy_ns` on CLOCK_MONOTONIC_COARSE, as the agent
    /// measured them (`lb_userspace::dataplane::clock`). 0: not written
    /// yet (the clock stands at 0 and nothing expires).
    pub jiffy_ns: u32,
    pub clock_epoch_ns: u64,
    /// Slots in `ESTABLISHED` (its `max_entries`), for
    /// [`crate::flow_table::bucket_of`] (same seed as `HALF_OPEN`); 0: no
    /// established table yet (every lookup misses it).
    pub established_slots: u32,
    /// Which bucket hash placed the tables' flows
    /// ([`crate::flow::TABLE_VERSION`]), written with the seed: a pinned
    /// pair of tables placed by another one is refused, not adopted.
    pub table_version: u32,
}

/// `HALF_OPEN[slot]`: the half-open table is a two-way set-associative
/// array. A flow that has not completed its handshake lives in one slot of
/// the bucket its client hashes to ([`crate::flow::slot_index`]); a new
/// flow takes a free slot there, or the one least recently seen, so an
/// insert is one cache line and never walks or evicts a list. Exactly one
/// line: `seq` first, then the key and the entry.
///
/// `seq` is a sequence lock: even when the slot is stable, odd while a
/// writer (the data plane, or the agent through its mapping of the table)
/// holds it. Writers take it with a compare-and-swap and give up if it is
/// held; readers copy the slot and retry nothing: a copy whose `seq`
/// changed meanwhile is a miss.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HalfOpenSlot {
    pub seq: u32,
    /// All zero: the slot is empty.
    pub key: FlowKey,
    pub flow: HalfOpenEntry,
}

/// [`EstablishedSlot::flags`] of a bucket's first way: a flow of this
/// bucket found both ways live and went to the overflow table (`CONNTRACK`);
/// lookups that miss the bucket probe the overflow only while it is set
/// ([`crate::flow_table::probes_overflow`]). Set by the data plane, cleared
/// by the agent's sweep once no overflowed flow of the bucket is left.
pub const SLOT_F_OVERFLOWED: u32 = 1 << 0;

/// A slot of the established table (`ESTABLISHED`): one flow, both
/// directions, in two cache lines (the 128-byte-aligned pair a CPU's
/// adjacent-line prefetch fetches together). The lock, the forward key, a
/// PROXY v2 flow's `first` and the forward entry are the first 72 bytes;
/// the reply entry of a NAT flow and the backend endpoint its replies come
/// from (so a reply is matched without reading `BACKENDS`) follow, with the
/// bucket's flags in the last two bytes. The entries are whole [`Flow`]s,
/// so the packet path works on them in place as it did on `CONNTRACK`'s
/// values (one table, one layout, no copies on the hot path). A flow is
/// found by its client's bucket ([`crate::flow_table::bucket_of`]), which
/// both directions carry, so one slot serves both and its directions cannot
/// part.
///
/// `seq` is a sequence lock as in [`HalfOpenSlot`]: odd while a writer
/// holds it. A slot changes hands (key, `proxy_first`, entries, endpoint)
/// only under it; a packet's in-place updates of its own flow (`seen`,
/// `seq`, the next hop, the state's compare-and-swap) are lone aligned
/// stores, as they were on `CONNTRACK`'s values.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EstablishedSlot {
    pub seq: u32,
    /// The forward key (client → VIP); all zero: the slot is empty.
    pub key: FlowKey,
    /// A PROXY v2 flow ([`FLOW_F_PROXY`]): its client's ISN + 1 (`first`,
    /// host order), written with the flow at promotion, so a PROXY packet
    /// reads it from the slot its lookup already holds (next to the
    /// forward entry). Zero otherwise. (This word was the bucket's flags,
    /// which need only a bit: they moved to [`Self::flags`].)
    pub proxy_first: u32,
    /// The forward entry (`direction` [`FORWARD`]).
    pub forward: Flow,
    /// NAT: the reply entry (`direction` [`REPLY`]); DSR: unused (zero).
    pub reply: Flow,
    /// NAT: the backend's address and port (network order) its replies
    /// come from.
    pub backend_addr: u32,
    pub backend_port: u16,
    /// `SLOT_F_*` (the bucket's, on its first way). BPF's atomics are 32-
    /// and 64-bit: the flags are changed by atomic ORs and ANDs of
    /// [`slot_flags_mask`] on the aligned word they share with
    /// `backend_port` ([`SLOT_FLAGS_WORD`]), which leave the port alone.
    pub flags: u16,
}

/// Byte offset in [`EstablishedSlot`] of the aligned u32 word holding
/// `backend_port` and `flags` (the word the bucket flags' atomics work on).
pub const SLOT_FLAGS_WORD: usize = core::mem::offset_of!(EstablishedSlot, backend_port);

/// The bits of [`EstablishedSlot::flags`] `flags` sets, as a mask of the
/// u32 word at [`SLOT_FLAGS_WORD`] (`backend_port`'s bytes, then
/// `flags`'s, in memory order: any endianness).
pub const fn slot_flags_mask(flags: u32) -> u32 {
    let f = (flags as u16).to_ne_bytes();
    u32::from_ne_bytes([0, 0, f[0], f[1]])
}

/// Most source addresses full NAT translates with (`FnatConf::addrs`).
pub const FNAT_MAX_SOURCES: usize = 16;
/// Claims in `FNAT_CLAIMS` (32 B each, two to a 64-byte bucket: 32 MiB):
/// four per full-NAT flow (half-open, established or quarantined) at the
/// rated 262 144, so that a candidate's bucket is full of other claims
/// rarely enough (`fullnat::tests::refusals_at_the_rated_load`).
pub const FNAT_CLAIMS_SIZE: u32 = 1 << 20;
/// Claims to a bucket of `FNAT_CLAIMS` (one cache line).
pub const CLAIM_WAYS: u32 = 2;

/// `FNAT_CONF[0]`: full NAT's source addresses and port range, written by
/// the agent. `count` 0: no full NAT (every full-NAT new flow is
/// `DropFnatExhausted`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FnatConf {
    /// Addresses in `addrs` (at most [`FNAT_MAX_SOURCES`]).
    pub count: u16,
    /// Ticks a port freed by an established flow stays out of the pool
    /// toward its backend (`[dataplane] source-port-quarantine`; 0: none):
    /// the backend may hold the old connection in TIME_WAIT that long, and
    /// would answer a new SYN on the same tuple with an ACK of the old one.
    pub quarantine: u16,
    /// The allocated ports' range, inclusive, host order.
    pub port_lo: u16,
    pub port_hi: u16,
    /// The LB's own addresses (network order) full-NAT flows leave with.
    pub addrs: [u32; FNAT_MAX_SOURCES],
}

/// A slot of `FNAT_CLAIMS`: a full-NAT flow's claim on a (source address,
/// port) toward its backend, in the bucket of its reply tuple
/// (`fullnat::claim_bucket`). `state` is the claim: a compare-and-swap from
/// [`CLAIM_FREE`] (or a reclaimable state) to [`CLAIM_BUSY`] takes the slot,
/// the tuple and the forward key are written, then the state becomes
/// [`CLAIM_HELD`]; once an established flow ended, the slot stays
/// [`CLAIM_FREED`] as its tuple's quarantine. Two of them fill a line.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FnatClaim {
    /// The kind (low 3 bits: [`CLAIM_FREE`], [`CLAIM_BUSY`], [`CLAIM_HELD`],
    /// [`CLAIM_FREED`]) and, above it, the tick it was claimed or freed
    /// (`fullnat::claim_state`; 29 bits, compared modulo 2^29). Odd only
    /// while busy, so the agent's slot reader skips a claim being written,
    /// as a slot whose lock is held.
    pub state: u32,
    /// The reply tuple as it arrives (backend → source address:port).
    pub reply: FlowKey,
    /// The flow's forward key but its protocol (the reply's): client and
    /// VIP addresses, then ports, network order.
    pub client: u32,
    pub vip: u32,
    pub client_port: u16,
    pub vport: u16,
}

/// [`FnatClaim::state`]'s kind: an unused slot (its tuple is left over).
pub const CLAIM_FREE: u32 = 0;
/// [`FnatClaim::state`]'s kind: being written by the CPU that took it.
pub const CLAIM_BUSY: u32 = 1;
/// [`FnatClaim::state`]'s kind: the claim's flow holds the tuple.
pub const CLAIM_HELD: u32 = 2;
/// [`FnatClaim::state`]'s kind: the flow ended (established, then closed
/// or expired); the tuple is in quarantine from the state's tick for
/// [`FnatConf::quarantine`] ticks, and its replies find no flow.
pub const CLAIM_FREED: u32 = 4;
/// The bits of [`FnatClaim::state`] that hold the kind.
pub const CLAIM_KIND_MASK: u32 = 7;

impl FnatClaim {
    /// The claim's kind ([`CLAIM_FREE`], …).
    #[inline(always)]
    pub const fn kind(&self) -> u32 {
        self.state & CLAIM_KIND_MASK
    }

    /// The tick it was claimed or freed (29 bits).
    #[inline(always)]
    pub const fn tick(&self) -> u32 {
        self.state >> 3
    }

    /// The flow's forward key (client → VIP).
    #[inline(always)]
    pub const fn forward(&self) -> FlowKey {
        FlowKey {
            saddr: self.client,
            daddr: self.vip,
            sport: self.client_port,
            dport: self.vport,
            protocol: self.reply.protocol,
            _pad0: 0,
            _pad1: 0,
        }
    }
}

impl FlowKey {
    /// The key of a packet with these IPv4 and TCP/UDP port headers, as it
    /// arrives (network order, as the headers have it).
    #[inline(always)]
    pub fn of(ip: &crate::headers::Ipv4Hdr, ports: &crate::headers::L4Ports) -> FlowKey {
        FlowKey {
            saddr: ip.saddr,
            daddr: ip.daddr,
            sport: ports.source,
            dport: ports.dest,
            protocol: ip.protocol,
            _pad0: 0,
            _pad1: 0,
        }
    }

    /// The all-zero key marks an empty [`HalfOpenSlot`]: no packet has it
    /// (its source and destination would both be 0.0.0.0).
    pub const EMPTY: FlowKey = FlowKey {
        saddr: 0,
        daddr: 0,
        sport: 0,
        dport: 0,
        protocol: 0,
        _pad0: 0,
        _pad1: 0,
    };
}

/// Entries of `NEIGH_WANTED`: next hops (address → egress ifindex) the
/// data plane found without a neighbour entry, until the agent drains them
/// (every 100 ms); least recently reported first out.
pub const NEIGH_WANTED_SIZE: u32 = 1024;

/// `NEW_FLOW_BUDGET[0]` (per CPU): new flows inserted in the current tick.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BudgetWindow {
    pub tick: u32,
    pub inserted: u32,
}

/// Entries of `FRAGS`, the fragments' table: enough for the datagrams in
/// flight through one LB at once; least recently used first out.
pub const FRAG_TABLE_SIZE: u32 = 8192;

/// `FRAGS` key: one fragmented datagram as it arrives (source,
/// destination, IP id, protocol: what IPv4 reassembly keys on). Its value
/// is the datagram's ports (`headers::L4Ports`), read from the first
/// fragment, so the fragments after it find their flow (as Cilium does).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FragKey {
    pub saddr: u32,
    pub daddr: u32,
    /// IP identification, raw network order.
    pub id: u16,
    pub protocol: u8,
    pub _pad: u8,
}

/// Packet and byte counters (per CPU in the kernel; summed by the agent).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub packets: u64,
    pub bytes: u64,
}

/// Bytes of the drop-tracing ring buffer (`TRACE`): a power-of-two multiple
/// of the page size, as the kernel requires. 256 KiB holds 8192 events.
pub const TRACE_RING_BYTES: u32 = 256 * 1024;

/// Every verdict `lb trace` follows by default: all that are not forwarded,
/// except `pass_not_ours` (all of the host's own traffic).
pub const TRACE_DEFAULT_VERDICTS: u64 = {
    let mut mask = 0;
    let mut i = 0;
    while i < VERDICT_COUNT as usize {
        let v = Verdict::ALL[i];
        if !v.is_forwarded() && !matches!(v, Verdict::PassNotOurs) {
            mask |= v.trace_bit();
        }
        i += 1;
    }
    mask
};

/// `TRACE_ON[0]`: the run-time switch of drop tracing, written by `lb trace`.
/// Zero `verdicts` (the default) means off: the data plane then pays one
/// array lookup per packet that is not forwarded, and nothing else.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TraceConf {
    /// One bit per [`Verdict`] to trace (`Verdict::trace_bit`); forwarded
    /// verdicts are never traced whatever their bits say. 64 bits since
    /// verdicts passed 31; the low 32 are where the 32-bit mask of older
    /// versions was (the padding after it was always 0).
    pub verdicts: u64,
    /// Events lost because the ring buffer was full (atomic adds by `lb`).
    pub lost: u64,
}

/// [`TraceEvent::service_id`] when no service matches the packet's
/// (VIP, port, protocol).
pub const TRACE_NO_SERVICE: u32 = u32::MAX;

/// One drop-tracing event in the `TRACE` ring buffer: a packet that was not
/// forwarded, why, and its 5-tuple as the program left the frame (zero
/// where the frame did not carry the field, e.g. no ports on a truncated or
/// non-first-fragment packet). Addresses and ports in network order.
/// IPv6's programs send [`crate::TraceEvent6`] instead; a record's length
/// (32 or 56 bytes) tells which.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TraceEvent {
    /// The [`Verdict`] index.
    pub verdict: u32,
    /// The service on (daddr, dport, protocol), or [`TRACE_NO_SERVICE`].
    pub service_id: u32,
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    /// IP protocol; 0 when the frame is not IPv4 or its header is cut.
    pub protocol: u8,
    pub _pad0: u8,
    /// The frame's EtherType as in the frame (network order).
    pub ether_type: u16,
    pub ifindex: u32,
    /// Frame length in bytes.
    pub len: u32,
}

// ---- the firewall (new flows to a VIP; docs/architecture.md) ----

/// Most firewall rules (prefixes over every scope and list); a rule id
/// indexes `FW_RULE_STATS`.
pub const MAX_FW_RULES: u32 = 65_536;
/// Token buckets of the new-flow rate limits (an LRU: the least recently
/// seen sources lose theirs first, and start again with a full bucket).
pub const FW_BUCKETS_SIZE: u32 = 65_536;
/// The firewall scope of the rules that apply to every VIP; a service's
/// scope is its service id.
pub const FW_GLOBAL: u32 = MAX_SERVICES;
/// `FW_SCOPES` entries: one per service id, then the global one.
pub const FW_SCOPE_COUNT: u32 = MAX_SERVICES + 1;
/// `FwScope::flags`: the scope has deny rules.
pub const FW_F_DENY: u32 = 1;
/// `FwScope::flags`: the scope has an allow list: any other source is denied.
pub const FW_F_ALLOW: u32 = 2;
/// `FwScope::flags`: new flows are rate-limited per source.
pub const FW_F_RATE: u32 = 4;
/// `FwScope::flags`: the scope has IPv6 deny rules (`FW_DENY6`). An allow
/// list is one list over both families (`FW_F_ALLOW`), and a rate limit
/// covers both (IPv6 buckets keyed by `FW_MASKS6[scope]`).
pub const FW_F_DENY6: u32 = 8;
/// Nanoseconds per token: buckets count in nano-tokens, so a refill is one
/// multiply (`elapsed_ns * rate`) and never a division.
pub const FW_NS: u64 = 1_000_000_000;
/// Longer than this since a bucket's last new flow, it is simply full (the
/// cap keeps `elapsed * rate` far from overflowing).
pub const FW_REFILL_CAP_NS: u64 = 1 << 36;
/// Most new flows per second a rate limit may allow (keeps the refill in u64).
pub const FW_RATE_MAX: u32 = 10_000_000;
/// Largest burst a rate limit may allow.
pub const FW_BURST_MAX: u32 = 100_000_000;

/// `FW_SCOPES[scope]`: which of its checks a scope needs. Zero flags cost a
/// new flow one array lookup and nothing else.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FwScope {
    pub flags: u32,
    /// New flows per second per source (with `FW_F_RATE`).
    pub rate: u32,
    /// Bucket size in new flows.
    pub burst: u32,
    /// Applied to the source address (network order, as in the packet)
    /// to key its bucket: all ones per address, a /24's mask per /24.
    pub mask: u32,
}

/// `FW_DENY` / `FW_ALLOW` LPM trie data: the scope (exact, the first 32 bits
/// of every prefix) then the source prefix, network order. A rule's LPM
/// prefix length is `32 + its CIDR length`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FwKey {
    pub scope: u32,
    pub addr: u32,
}

/// `FW_BUCKETS` key: the scope and the masked source address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct BucketKey {
    pub scope: u32,
    pub addr: u32,
}

/// `FW_BUCKETS` value: a token bucket in nano-tokens (`FW_NS` per new flow),
/// refilled from `bpf_ktime_get_ns` at `rate` per second up to `burst`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bucket {
    pub tokens: u64,
    pub last_ns: u64,
}

const _: () = assert!(core::mem::size_of::<FwScope>() == 16);
const _: () = assert!(core::mem::size_of::<FwKey>() == 8);
const _: () = assert!(core::mem::size_of::<BucketKey>() == 8);
const _: () = assert!(core::mem::size_of::<Bucket>() == 16);
// No overflow: elapsed (capped) * rate, plus a full bucket, fits in u64.
const _: () = assert!(
    (FW_REFILL_CAP_NS as u128) * (FW_RATE_MAX as u128) + (FW_BURST_MAX as u128) * (FW_NS as u128)
        < u64::MAX as u128
);

const _: () = assert!(
    MAX_RING.is_power_of_two(),
    "the data plane masks ring indexes"
);
const _: () = assert!(core::mem::size_of::<ServiceKey>() == 8);
const _: () = assert!(core::mem::size_of::<Endpoint>() == 8);
const _: () = assert!(core::mem::size_of::<ServiceConf>() == 16);
const _: () = assert!(core::mem::size_of::<Ring>() == 4 + 4 * MAX_RING);
const _: () = assert!(core::mem::size_of::<Backend>() == 16);
const _: () = assert!(core::mem::size_of::<Tunnel>() == 8);
const _: () = assert!(core::mem::size_of::<MaglevTable>() == 4 + 4 * MAGLEV_MAX);
const _: () = assert!(core::mem::size_of::<FlowKey>() == 16);
const _: () = assert!(core::mem::size_of::<NextHop>() == 20);
const _: () = assert!(core::mem::size_of::<Flow>() == 48);
const _: () = assert!(core::mem::size_of::<HalfOpenEntry>() == 44);
const _: () = assert!(core::mem::size_of::<FnatConf>() == 8 + 4 * FNAT_MAX_SOURCES);
const _: () = assert!(core::mem::size_of::<FnatClaim>() == 32);
const _: () = assert!(core::mem::offset_of!(FnatClaim, reply) == 4);
const _: () = assert!(core::mem::size_of::<ProxyFlow>() == 8);
const _: () = assert!(core::mem::size_of::<FlowCounts>() == 16);
const _: () = assert!(core::mem::size_of::<FlowConf>() == 4 * TIMEOUT_COUNT + 32);
const _: () = assert!(core::mem::size_of::<HalfOpenSlot>() == 64);
const _: () = assert!(core::mem::size_of::<EstablishedSlot>() == 128);
const _: () = assert!(core::mem::offset_of!(EstablishedSlot, forward) == 24);
const _: () = assert!(core::mem::offset_of!(EstablishedSlot, proxy_first) == 20);
const _: () = assert!(SLOT_FLAGS_WORD.is_multiple_of(4));
const _: () = assert!(core::mem::offset_of!(EstablishedSlot, flags) == SLOT_FLAGS_WORD + 2);
const _: () = assert!(core::mem::size_of::<BackendHop>() == 24);
const _: () = assert!(core::mem::size_of::<BudgetWindow>() == 8);
const _: () = assert!(core::mem::size_of::<FragKey>() == 12);
const _: () = assert!(core::mem::size_of::<Counters>() == 16);
const _: () = assert!(core::mem::size_of::<TraceConf>() == 16);
const _: () = assert!(core::mem::size_of::<TraceEvent>() == 32);
const _: () = assert!(TRACE_DEFAULT_VERDICTS & Verdict::Forwarded.trace_bit() == 0);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are repr(C), Copy, with explicit padding fields and
    // no implicit padding (checked by the size asserts above).
    unsafe impl aya::Pod for super::ServiceKey {}
    unsafe impl aya::Pod for super::Endpoint {}
    unsafe impl aya::Pod for super::ServiceConf {}
    unsafe impl aya::Pod for super::Ring {}
    unsafe impl aya::Pod for super::MaglevTable {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::Tunnel {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::EstablishedSlot {}
    unsafe impl aya::Pod for super::FragKey {}
    unsafe impl aya::Pod for super::Flow {}
    unsafe impl aya::Pod for super::FlowCounts {}
    unsafe impl aya::Pod for super::FlowConf {}
    unsafe impl aya::Pod for super::HalfOpenSlot {}
    unsafe impl aya::Pod for super::HalfOpenEntry {}
    unsafe impl aya::Pod for super::BackendHop {}
    unsafe impl aya::Pod for super::BudgetWindow {}
    unsafe impl aya::Pod for super::Counters {}
    unsafe impl aya::Pod for super::TraceConf {}
    unsafe impl aya::Pod for super::TraceEvent {}
    unsafe impl aya::Pod for super::FwScope {}
    unsafe impl aya::Pod for super::FwKey {}
    unsafe impl aya::Pod for super::BucketKey {}
    unsafe impl aya::Pod for super::Bucket {}
    unsafe impl aya::Pod for super::FnatConf {}
    unsafe impl aya::Pod for super::FnatClaim {}
    unsafe impl aya::Pod for super::ProxyFlow {}
}
