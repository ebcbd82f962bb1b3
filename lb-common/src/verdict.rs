//! The verdict table: every way a packet leaves the data plane, counted
//! (`VERDICTS`), named (status, metrics, `lb trace`) and traced by bit, all
//! from one declaration checked at compile time.

/// Declares the verdict table: each row is a verdict's doc, its variant and
/// counter index, the name status, metrics and `lb trace` use, and whether
/// the packet left (XDP_TX or a redirect). The enum, [`VERDICT_COUNT`],
/// [`Verdict::ALL`], [`Verdict::name`], [`Verdict::is_forwarded`] and the
/// trace bits all come from this one table; the checks below it fail the
/// build if an index is skipped, repeated or out of order, if a name is
/// repeated, or if the verdicts outgrow the 64 trace bits.
macro_rules! verdicts {
    ($($(#[$doc:meta])* $variant:ident = $index:literal => $name:literal, forwarded: $forwarded:literal;)*) => {
        /// Why the program returned what it did: the index into `VERDICTS`.
        /// Each case of the packet path's decision table has its own counter
        /// so operators (and tests) can see exactly which rule fired.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Verdict {
            $($(#[$doc])* $variant = $index,)*
        }

        /// How many verdicts (counters in `VERDICTS`) there are.
        pub const VERDICT_COUNT: u32 = [$($index),*].len() as u32;

        impl Verdict {
            /// Every verdict, by counter index.
            pub const ALL: [Verdict; VERDICT_COUNT as usize] = [$(Verdict::$variant),*];

            /// The verdict's name in status, metrics and `lb trace`.
            pub const fn name(self) -> &'static str {
                match self {
                    $(Verdict::$variant => $name,)*
                }
            }

            /// Packets with this verdict left through XDP_TX or a redirect.
            /// Drop tracing never looks at them: the trace check sits on the
            /// other verdicts only.
            /// One mask test (the packet path asks on every packet).
            pub const fn is_forwarded(self) -> bool {
                const FORWARDED: u64 = 0 $(| if $forwarded { 1u64 << $index } else { 0 })*;
                FORWARDED & (1u64 << self as u32) != 0
            }
        }
    };
}

verdicts! {
    /// Not IPv4 or not addressed to a VIP/NAT flow: handed to the kernel untouched.
    PassNotOurs = 0 => "pass_not_ours", forwarded: false;
    /// Truncated Ethernet or IPv4 header: the kernel drops or handles it.
    PassTruncated = 1 => "pass_truncated", forwarded: false;
    /// ICMP or another protocol to a VIP: the kernel answers (ping the VIP).
    PassOtherProtocol = 2 => "pass_other_protocol", forwarded: false;
    /// VIP address but no service on that port/protocol.
    PassNoService = 3 => "pass_no_service", forwarded: false;
    /// Forwarding needs the kernel: no neighbour entry, TTL expiring, or
    /// forwarding disabled. The packet is passed so the kernel resolves it.
    PassKernelForward = 4 => "pass_kernel_forward", forwarded: false;
    /// To a VIP with IPv4 options: not supported, dropped (as Katran does).
    DropIpOptions = 5 => "drop_ip_options", forwarded: false;
    /// To a VIP, a fragment after the first whose first fragment was not
    /// seen (it comes later, was lost, or the datagram belongs to no flow):
    /// without its ports it cannot be placed, so it is dropped. First
    /// fragments carry the ports and follow their flow like any packet.
    DropFragment = 6 => "drop_fragment", forwarded: false;
    /// To a VIP with a bad IPv4 header (IHL < 5, bad total length).
    DropMalformed = 7 => "drop_malformed", forwarded: false;
    /// To a service port but the TCP/UDP header is cut short.
    DropTruncatedL4 = 8 => "drop_truncated_l4", forwarded: false;
    /// The service has no usable backend (empty ring).
    DropNoBackend = 9 => "drop_no_backend", forwarded: false;
    /// Flow pinned to a backend that was removed with the drop-flows rule.
    DropBackendGone = 10 => "drop_backend_gone", forwarded: false;
    /// Connection table full and the insert failed. No longer given: a new
    /// flow always gets a half-open slot (it replaces the older flow of its
    /// bucket if it must), and a full `CONNTRACK` leaves a flow half-open.
    /// Kept so the verdict numbers, pinned counters and the metric stay.
    DropConntrackFull = 11 => "drop_conntrack_full", forwarded: false;
    /// Forwarded via XDP_TX or redirect.
    Forwarded = 12 => "forwarded", forwarded: true;
    /// NAT reply rewritten back to the VIP and forwarded.
    ForwardedReply = 13 => "forwarded_reply", forwarded: true;
    /// A new flow from a source in a deny list (global or the service's).
    DropFirewallDeny = 14 => "drop_firewall_deny", forwarded: false;
    /// A new flow from a source outside an allow list (global or the
    /// service's) that is not empty.
    DropFirewallNotAllowed = 15 => "drop_firewall_not_allowed", forwarded: false;
    /// A new flow over its source's new-flow rate limit (token bucket).
    DropRateLimited = 16 => "drop_rate_limited", forwarded: false;
    /// A TCP packet without SYN, of a flow no table knows, to a service whose
    /// scheduler cannot find its backend again (round robin, weighted,
    /// least connections): it belongs to no connection we can serve.
    DropNoFlow = 17 => "drop_no_flow", forwarded: false;
    /// A new flow over the CPU's new-flow budget, forwarded by its service's
    /// hash table without an entry (DSR services with a hash scheduler).
    ForwardedStateless = 18 => "forwarded_stateless", forwarded: true;
    /// An ICMP error (destination unreachable, time exceeded) quoting a
    /// flow, translated and forwarded to that flow's end: a client's to the
    /// backend, a backend's about a NAT reply to the client.
    ForwardedIcmp = 19 => "forwarded_icmp", forwarded: true;
    /// Bigger than the egress link's MTU with DF set: answered with an ICMP
    /// "fragmentation needed" (with the MTU) sent back by XDP_TX; the packet
    /// itself is dropped.
    FragNeeded = 20 => "frag_needed", forwarded: false;
    /// Bigger than the egress link's MTU with DF clear: passed to the kernel,
    /// which fragments it as a router (NAT: already rewritten).
    PassTooBig = 21 => "pass_too_big", forwarded: false;
    /// A TCP/UDP segment from a NAT service's backend endpoint (its address
    /// and port) to an address that is not the LB's own, that no flow knows
    /// (its flow expired, or it answers a spoofed SYN whose half-open slot
    /// was taken): dropped, never routed on with the backend's address.
    DropBackendNoFlow = 22 => "drop_backend_no_flow", forwarded: false;
    /// A TCP RST on an established flow whose sequence number is not within
    /// `SEQ_WINDOW` of what its sender last used (a blind spoofer's):
    /// dropped, the flow left as it was.
    DropRstOutOfWindow = 23 => "drop_rst_out_of_window", forwarded: false;
    /// NAT: a client's segment without SYN on a half-open flow its SYN
    /// opened, that does not complete a handshake the backend answered (no
    /// SYN-ACK seen, or not acknowledging its sequence number + 1): dropped,
    /// nothing promoted.
    DropBadHandshake = 24 => "drop_bad_handshake", forwarded: false;
    /// A NAT reply whose next hop towards the client has no neighbour
    /// entry: dropped (the LB's kernel would drop it as a martian, its
    /// source being the LB's own VIP) and the next hop reported to the
    /// agent (`NEIGH_WANTED`), which has the kernel resolve it; the
    /// backend's retransmission finds the MAC.
    DropNoNeighbour = 25 => "drop_no_neighbour", forwarded: false;
    /// A tunnel service's packet with DF clear that does not fit the tunnel
    /// (inner + overhead > the next hop's MTU): XDP cannot fragment it and
    /// the LB's kernel has no tunnel device to fragment it for, so it is
    /// answered as DF set is ("fragmentation needed" with the MTU less the
    /// overhead, XDP_TX) and dropped. A sender that honours the message
    /// (Linux does, for sockets that clear DF too) sends what fits.
    TunnelTooBig = 26 => "tunnel_too_big", forwarded: false;
    /// A backend's answer to a health check through the VIP (from the VIP,
    /// to a probe port, by the way the probe left): handed into the probe
    /// namespace's veth (lb-common/src/probe.rs), never to the LB's stack.
    ForwardedProbeReply = 27 => "forwarded_probe_reply", forwarded: true;
    /// IPv6 to a VIP with more extension headers than the walk reads
    /// (`lb_common::ipv6::MAX_EXTENSIONS`, 4): dropped, never guessed at.
    DropIpv6TooManyExtensions = 28 => "drop_ipv6_too_many_extensions", forwarded: false;
    /// IPv6 to a VIP with a routing header whose segments left is not 0:
    /// the VIP is not the packet's last destination, so balancing it would
    /// misroute it; dropped.
    DropIpv6Routing = 29 => "drop_ipv6_routing", forwarded: false;
    /// A full-NAT service's new flow for which none of the candidate
    /// (source address, port) pairs toward its backend was free
    /// (`lb_common::fullnat::FNAT_TRIES` tries): dropped, nothing created;
    /// the pool toward that backend is full (or no source address is
    /// configured).
    DropFnatExhausted = 30 => "drop_fnat_exhausted", forwarded: false;
    /// The path's second stage (`lb_setup`, tail-called after an
    /// established-table miss: lb-ebpf/src/stage.rs) was not there: the
    /// agent puts it in `STAGES` at load, so this counts a data plane
    /// loaded by hand or half torn down. Dropped.
    DropNoStage = 31 => "drop_no_stage", forwarded: false;
    /// A PROXY v2 flow's first data segment (or a retransmission of it)
    /// for which the frame had no headroom for the header
    /// (`bpf_xdp_adjust_head` refused): dropped; the client retransmits.
    DropProxyNoRoom = 32 => "drop_proxy_no_room", forwarded: false;
    /// A packet of a PROXY v2 flow whose start (`PROXY_FLOWS`) is not known:
    /// the LRU evicted it, or the flow's data came before it was
    /// established. Its sequence numbers cannot be shifted, so it is
    /// dropped.
    DropProxyLost = 33 => "drop_proxy_lost", forwarded: false;
    /// An established IPv6 PROXY v2 flow's packet with extension headers:
    /// the PROXY rules rewrite TCP at the fixed header's end only, and the
    /// packet must not reach the backend (or the client) unshifted, so it
    /// is dropped.
    DropProxyExtHeaders = 34 => "drop_proxy_ext_headers", forwarded: false;
}

// The table's checks: dense indexes in order (the counters are indexed by
// them, pinned across restarts), distinct names, one trace bit each.
const _: () = {
    let mut i = 0;
    while i < VERDICT_COUNT as usize {
        assert!(
            Verdict::ALL[i] as u32 == i as u32,
            "verdict indexes must be 0, 1, 2, … in order"
        );
        let mut j = 0;
        while j < i {
            assert!(
                !same_str(Verdict::ALL[i].name(), Verdict::ALL[j].name()),
                "two verdicts share a name"
            );
            j += 1;
        }
        i += 1;
    }
    assert!(
        VERDICT_COUNT <= u64::BITS,
        "one forwarded bit per verdict in a u64"
    );
};

const fn same_str(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

impl Verdict {
    /// The verdict with counter index `index`, if there is one.
    pub const fn from_index(index: u32) -> Option<Verdict> {
        if index < VERDICT_COUNT {
            Some(Verdict::ALL[index as usize])
        } else {
            None
        }
    }

    /// This verdict's bit in [`crate::TraceConf::verdicts`]: 64 bits, one
    /// per verdict (the table's check above keeps them within it).
    pub const fn trace_bit(self) -> u64 {
        1u64 << self as u32
    }
}
