//! The one list of the `lb` eBPF object's maps: a typed name for each, and
//! whether the agent pins it (and how a pinned one may differ when adopted)
//! or leaves it unpinned, and why.
//!
//! The names are the `#[map]` statics of `lb-ebpf`; userspace names a map
//! only through [`MapName`], never by a string. A kernel-tier test
//! (`tests/tests/kernel_maps.rs`) compares this list with the maps of the
//! built object both ways, so a map added to `lb-ebpf` and not listed here,
//! or listed and gone, fails it.
//!
//! Pinning is driven from here, not declared in the object
//! (`HashMap::pinned`): aya 0.14 pins a map declared pinned by name at every
//! load, under `/sys/fs/bpf` unless told otherwise, so the unpinned loads
//! the tests and tools make would share one set of pins
//! (docs/architecture.md, "Pinned maps").

/// How the agent treats a map of the object under its pin dir.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Pinning {
    /// Pinned, so a restarted agent keeps what it holds; a pinned map is
    /// adopted only with exactly the object's layout (type, key and value
    /// size, entries, flags).
    Pinned,
    /// Pinned, with as many entries as twice the config key named (two per
    /// flow): adopted only with the layout and the size the config asks for.
    PinnedSized { config_key: &'static str },
    /// Pinned, and adopted with fewer entries than the object's too: a
    /// counter array an older version made shorter, whose newer slots read 0
    /// (and are not counted) until `lb teardown`.
    PinnedMayBeShorter,
    /// Not pinned: made afresh by every load, for the reason given: the
    /// checks through the VIP's maps (`PROBES`, `PROBES6`, `PROBE_CONF`,
    /// `PROBE_STATS`),
    /// which live and die with the agent's prober. The tools' maps (pktgen,
    /// bench) live in lb-ebpf-tools' objects, which are never pinned.
    Unpinned { why: &'static str },
}

impl Pinning {
    pub const fn is_pinned(self) -> bool {
        !matches!(self, Pinning::Unpinned { .. })
    }
}

/// A map of the `lb` object, by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MapName {
    name: &'static str,
    pinning: Pinning,
}

impl MapName {
    /// The map's name in the object (its `#[map]` static's).
    pub const fn name(self) -> &'static str {
        self.name
    }

    /// Whether the agent pins the map, and how it adopts a pinned one.
    pub const fn pinning(self) -> Pinning {
        self.pinning
    }

    /// Every map of the object that the agent pins, in list order.
    pub fn pinned() -> impl Iterator<Item = MapName> {
        Self::ALL
            .iter()
            .copied()
            .filter(|m| m.pinning().is_pinned())
    }

    /// The listed map of this name, if any.
    pub fn find(name: &str) -> Option<MapName> {
        Self::ALL.iter().copied().find(|m| m.name == name)
    }
}

impl core::fmt::Display for MapName {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name)
    }
}

/// Declares the list once: a constant per map and [`MapName::ALL`] come
/// from the same lines.
macro_rules! maps {
    ($($(#[$doc:meta])* $name:ident: $pinning:expr;)*) => {
        impl MapName {
            $($(#[$doc])* pub const $name: MapName = MapName {
                name: stringify!($name),
                pinning: $pinning,
            };)*

            /// Every map of the object, pinned or not.
            pub const ALL: &'static [MapName] = &[$(MapName::$name),*];
        }
    };
}

maps! {
    /// (VIP, port, protocol) → service id.
    SERVICES: Pinning::Pinned;
    /// VIP → number of services on it.
    VIPS: Pinning::Pinned;
    /// Service id → mode, scheduler, active ring half.
    SERVICE_CONF: Pinning::Pinned;
    /// Service id × 2 + half → backend ring.
    RINGS: Pinning::Pinned;
    /// Service id × 2 + half → Maglev table.
    MAGLEV: Pinning::Pinned;
    /// Service id → round-robin position.
    RR_COUNTERS: Pinning::Pinned;
    /// Backend id → address, port, flags, service.
    BACKENDS: Pinning::Pinned;
    /// Backend id → shared next hop.
    BACKEND_HOPS: Pinning::Pinned;
    /// The established flow table's overflow (flows their bucket had no
    /// free way for).
    CONNTRACK: Pinning::PinnedSized { config_key: "conntrack-size" };
    /// The established flow table (mapped into the agent's memory).
    ESTABLISHED: Pinning::PinnedSized { config_key: "conntrack-size" };
    /// The half-open flow table (mapped into the agent's memory).
    HALF_OPEN: Pinning::PinnedSized { config_key: "half-open-size" };
    /// The flow lifecycle's settings and the half-open table's seed.
    FLOW_CONF: Pinning::Pinned;
    /// Backend id → established flows opened and closed.
    BACKEND_FLOWS: Pinning::Pinned;
    /// Backend id → established flows the agent's sweep removed.
    FLOWS_SWEPT: Pinning::Pinned;
    /// Per CPU: the new-flow budget's window.
    NEW_FLOW_BUDGET: Pinning::Pinned;
    /// Fragments' ports by (source, destination, id, protocol).
    FRAGS: Pinning::Pinned;
    /// Service id → traffic counters, per CPU.
    SERVICE_STATS: Pinning::Pinned;
    /// Backend id → traffic counters, per CPU.
    BACKEND_STATS: Pinning::Pinned;
    /// Verdict → packets, per CPU. One pinned by a version with fewer
    /// verdicts is adopted: those added since read 0 there.
    VERDICTS: Pinning::PinnedMayBeShorter;
    /// Drop tracing's switch (`lb trace` opens the pin).
    TRACE_ON: Pinning::Pinned;
    /// Drop tracing's ring buffer (`lb trace` opens the pin).
    TRACE: Pinning::Pinned;
    /// Firewall scope → flags and rate limit.
    FW_SCOPES: Pinning::Pinned;
    /// (scope, source prefix) → deny rule id.
    FW_DENY: Pinning::Pinned;
    /// (scope, source prefix) → allow rule id.
    FW_ALLOW: Pinning::Pinned;
    /// Firewall rule id → new flows it decided, per CPU.
    FW_RULE_STATS: Pinning::Pinned;
    /// Rate limit token buckets.
    FW_BUCKETS: Pinning::Pinned;
    /// (scope, IPv6 source prefix) → deny rule id.
    FW_DENY6: Pinning::Pinned;
    /// (scope, IPv6 source prefix) → allow rule id.
    FW_ALLOW6: Pinning::Pinned;
    /// Firewall scope → the IPv6 source mask of its rate limit's buckets.
    FW_MASKS6: Pinning::Pinned;
    /// IPv6 rate limit token buckets.
    FW_BUCKETS6: Pinning::Pinned;
    /// The IPv6 firewall's keys, per CPU.
    FW_SCRATCH6: Pinning::Unpinned {
        why: "scratch for one packet's firewall keys, on one CPU",
    };
    /// Service id → the client mask an IPv6 `source-ip` service hashes under.
    SOURCE_MASKS6: Pinning::Pinned;
    /// Capture's switch and filter (`lb capture` opens the pin).
    CAPTURE_ON: Pinning::Pinned;
    /// Captured frames (`lb capture` opens the pin).
    CAPTURE: Pinning::Pinned;
    /// NAT services' backend endpoints.
    NAT_BACKENDS: Pinning::Pinned;
    /// Backend id → tunnel source and GUE port (IPIP, GUE services).
    TUNNELS: Pinning::Pinned;
    /// Next hops found without a neighbour entry.
    NEIGH_WANTED: Pinning::Pinned;
    /// Tunnel backend address → tunnel source, GUE port, learned path MTU.
    TUNNEL_PMTU: Pinning::Pinned;
    /// Routers' "fragmentation needed" about tunnel packets: learned,
    /// clamped, refused, per CPU.
    TUNNEL_PMTU_STATS: Pinning::Pinned;
    /// The latest expiry of a learned tunnel path MTU.
    TUNNEL_PMTU_UNTIL: Pinning::Pinned;
    /// Checks through the VIP: probe source port → its backend.
    PROBES: Pinning::Unpinned {
        why: "a probe's entry lives as long as the probe, which ends with the agent that runs it",
    };
    /// Checks through the VIP: IPv6 probe source port → its backend.
    PROBES6: Pinning::Unpinned {
        why: "an IPv6 probe's entry lives as long as the probe, which ends with the agent that runs it",
    };
    /// Checks through the VIP: the probe namespace's veth.
    PROBE_CONF: Pinning::Unpinned {
        why: "written by every agent at start for the veth it made; no prober, no entry",
    };
    /// Checks through the VIP: what lb_probe and the answers' hand-over did, per CPU.
    PROBE_STATS: Pinning::Unpinned {
        why: "the prober's own counters, read by the agent that runs it",
    };
    /// Flow sync's switch and lost-event count.
    SYNC_ON: Pinning::Pinned;
    /// Flow sync's events (established, ended) for the agent.
    SYNC_EVENTS: Pinning::Pinned;
    /// Backend id → established flows the agent inserted from peers.
    SYNC_OPENED: Pinning::Pinned;
    /// IPv6 VIP → number of services on it.
    VIPS6: Pinning::Pinned;
    /// IPv6 (VIP, port, protocol) → service id (ids shared with IPv4's).
    SERVICES6: Pinning::Pinned;
    /// Service id → its IPv6 VIP (the source an IPv6 NAT reply gets).
    SERVICE_VIPS6: Pinning::Pinned;
    /// Backend id → IPv6 address (port, flags, service in `BACKENDS`).
    BACKENDS6: Pinning::Pinned;
    /// IPv6 NAT services' backend endpoints.
    NAT_BACKENDS6: Pinning::Pinned;
    /// Backend id → IPv6 tunnel source and GUE port (IPv6 IPIP, GUE services).
    TUNNELS6: Pinning::Pinned;
    /// IPv6 flows that have not completed a handshake (both directions),
    /// sized by `half-open-size` as `HALF_OPEN`.
    HALF_OPEN6: Pinning::PinnedSized { config_key: "half-open-size" };
    /// IPv6 established flows (both directions), sized by `conntrack-size`
    /// as `ESTABLISHED`.
    ESTABLISHED6: Pinning::PinnedSized { config_key: "conntrack-size" };
    /// IPv6 fragments' ports by (source, destination, id, next header).
    FRAGS6: Pinning::Pinned;
    /// IPv6 next hops found without a neighbour entry.
    NEIGH_WANTED6: Pinning::Pinned;
    /// Full NAT's source addresses and port range.
    FNAT_CONF: Pinning::Pinned;
    /// Full NAT's claims: (source address, port) toward a backend, in the
    /// bucket of the reply tuple, with the flow's forward key.
    FNAT_CLAIMS: Pinning::Pinned;
    /// Full NAT's allocation cursor per CPU and backend.
    FNAT_CURSORS: Pinning::Unpinned {
        why: "a per-CPU hint of the next port to try; losing it costs one cold claim",
    };
    /// The path's second stage (`lb_setup`), tail-called after an
    /// established-table miss. Pinned: the kernel empties a program array
    /// when its last user reference goes, and the pinned link keeps `lb`
    /// running after the agent exits; a restarted agent puts its own
    /// `lb_setup` in the adopted array.
    STAGES: Pinning::Pinned;
    /// PROXY v2 flows (forward key) → the client's ISN + 1 (`ProxyFlow`).
    /// Pinned with the flow tables it completes: a restarted agent's
    /// program goes on shifting the flows it adopts.
    PROXY_FLOWS: Pinning::Pinned;
    /// IPv6 PROXY v2 flows (forward key) → `first` (`ProxyFlow`): every
    /// IPv6 PROXY flow's (`ESTABLISHED6`'s values are plain `Flow`s, no
    /// slot to keep it in). Pinned with `HALF_OPEN6` and `ESTABLISHED6`,
    /// as `PROXY_FLOWS` with IPv4's tables.
    PROXY_FLOWS6: Pinning::Pinned;
    /// What the first stage hands the second about a packet, per CPU.
    /// Pinned, though it holds nothing past one packet: `STAGES` is pinned
    /// and shared, so a restarted agent's stages are in it (`set_stages`)
    /// while the old `lb` still runs, until `attach` replaces it; the old
    /// `lb` hands its packets to the new `lb_setup` (and `lb_proxy`)
    /// through this map, which must then be one map for both loads. Made
    /// afresh per load, the new stage read another load's empty slot, and
    /// the new connections of those ~100 ms were refused.
    CARRY: Pinning::Pinned;
    /// A packet too big's MTU, for `lb_v6_portless` to answer, per CPU.
    /// Pinned for `CARRY`'s reason: a packet in flight while `set_stages`
    /// swaps IPv6's stages goes from one load's stage to the other's.
    TOO_BIG6: Pinning::Pinned;
    /// What IPv6's first stage hands its second about a packet, per CPU.
    /// Pinned for `CARRY`'s reason.
    CARRY6: Pinning::Pinned;
}

/// The maps of the `lb-decap` object (`lb decap`, the backends'
/// decapsulator): a list apart from the `lb` object's, since the two objects
/// are loaded and pinned apart. `lb decap attach` pins all four under
/// `PIN_DIR/IFACE` and reuses them on a re-attach (only with the object's
/// layout); `tests/tests/kernel_decap.rs` compares this list with the
/// built object both ways.
pub mod decap {
    /// The GUE port and the half of `DECAP_SOURCES` in force.
    pub const DECAP_CONF: &str = "DECAP_CONF";
    /// (half, allowed LB address) → 1.
    pub const DECAP_SOURCES: &str = "DECAP_SOURCES";
    /// (half, allowed LB IPv6 address) → 1.
    pub const DECAP_SOURCES6: &str = "DECAP_SOURCES6";
    /// Verdict → packets, per CPU.
    pub const DECAP_VERDICTS: &str = "DECAP_VERDICTS";
    /// Every map of the object, all pinned.
    pub const ALL: [&str; 4] = [DECAP_CONF, DECAP_SOURCES, DECAP_SOURCES6, DECAP_VERDICTS];
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_is_listed_once() {
        for (i, m) in MapName::ALL.iter().enumerate() {
            assert!(
                !MapName::ALL[..i].contains(m),
                "{m} is listed twice in map_names.rs"
            );
            assert_eq!(MapName::find(m.name()), Some(*m));
        }
    }

    #[test]
    fn each_map_has_its_own_pinning() {
        assert_eq!(
            MapName::CONNTRACK.pinning(),
            Pinning::PinnedSized {
                config_key: "conntrack-size"
            }
        );
        assert_eq!(MapName::VERDICTS.pinning(), Pinning::PinnedMayBeShorter);
        assert_eq!(MapName::SERVICES.pinning(), Pinning::Pinned);
        // 34, then the tunnels' path MTU (3), IPv6's VIPS6 (1), full NAT's
        // FNAT_CONF and FNAT_CLAIMS (2), the second stage's STAGES (1) and
        // PROXY_FLOWS (1), IPv6's services, VIPs, backends, NAT endpoints and
        // flow tables (6), the IPv6 firewall's tries, masks and buckets (4),
        // IPv6 source-ip's prefixes (1), IPv6's fragments (1) and IPv6's
        // unresolved next hops (1), IPv6's PROXY_FLOWS6 (1), the stages'
        // hand-over scratch CARRY, CARRY6 and TOO_BIG6 (3), IPv6's
        // TUNNELS6 (1).
        assert_eq!(MapName::pinned().count(), 60);
    }
}
