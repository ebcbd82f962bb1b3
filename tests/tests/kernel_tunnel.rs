//! Kernel tier (issue 26): the tunnel modes. IPIP and GUE frames byte for
//! byte (outer header fields, the IP checksum checked by etherparse, the
//! inner packet untouched), the GUE source port per flow, the MTU rule
//! (DF set: "fragmentation needed" with the MTU less the overhead; DF
//! clear: the same, as `TunnelTooBig`), a client's ICMP error carried to
//! its tunnel backend, and tunnel services under every scheduler kind, the
//! new-flow budget and hash-on-miss as DSR's.
//!
//! The real `lb` object under BPF_PROG_TEST_RUN in the kernel tier's
//! namespace (tests/src/kernel_net.rs), whose back network gets a route to
//! a remote backend subnet through a router (web1's address and MAC): the
//! tunnel backends sit behind it, not on the LB's segment. Expected frames
//! are built independently with etherparse and compared byte for byte.
//!
//! Needs root and BPF; without them the tests fail loudly.

use etherparse::{
    Ethernet2Header, IpNumber, Ipv4Dscp, Ipv4Header, Ipv4HeaderSlice, UdpHeader, UdpHeaderSlice,
};
use lb_common::{FlowKey, Verdict, hash::flow_hash, map_names::MapName};
use lb_tests::{
    kernel_frames::{ACK, Tcp, frag_needed_for, with_flags},
    kernel_net::{
        BACK_MAC, CLIENT, CLIENT_MAC, FRONT_MAC, Harness, TestNet, WEB_MACS, backend,
        fix_ip_checksum, icmp_error, lab_config, service, test_run, udp, verdict_delta, without_df,
    },
};
use lb_userspace::{
    config::{Config, Forwarding, Protocol, Scheduler},
    harness::xdp::{XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX},
};

const VIP_IPIP: [u8; 4] = [198, 18, 0, 60];
const VIP_GUE: [u8; 4] = [198, 18, 0, 61];
/// A tunnel service whose backend has no route (so no tunnel source).
const VIP_NOWHERE: [u8; 4] = [198, 18, 0, 62];
/// The LB's back address: the source the kernel picks for the remote
/// subnet's route (no `tunnel-source` configured).
const LB_BACK: [u8; 4] = [198, 19, 0, 1];
/// The remote backends, behind the router web1 (198.19.0.11).
const REMOTE: [[u8; 4]; 3] = [[198, 19, 8, 11], [198, 19, 8, 12], [198, 19, 8, 13]];
const REMOTE_NET: &str = "198.19.8.0/24";
const ROUTER: &str = "198.19.0.11";
const ROUTER_MAC: [u8; 6] = WEB_MACS[0];
const GUE_PORT: u16 = 6080;
/// A TOS the client sets (DSCP EF, ECT(0)): the outer header copies it.
const TOS: u8 = 0xba;

/// The kernel tier's lab plus an IPIP service (TCP :80) and GUE services
/// (TCP :80, UDP :53) on the remote backends, and a GUE service whose
/// backend has no route.
fn config() -> Config {
    let mut cfg = lab_config();
    let remote = |port| -> Vec<_> {
        REMOTE
            .iter()
            .enumerate()
            .map(|(i, ip)| backend(&format!("remote{}", i + 1), *ip, port))
            .collect()
    };
    cfg.services.extend([
        service(
            "ipip",
            VIP_IPIP,
            80,
            Protocol::Tcp,
            Forwarding::Ipip,
            remote(80),
        ),
        service(
            "gue",
            VIP_GUE,
            80,
            Protocol::Tcp,
            Forwarding::Gue,
            remote(80),
        ),
        service(
            "gue-udp",
            VIP_GUE,
            53,
            Protocol::Udp,
            Forwarding::Gue,
            remote(53),
        ),
        service(
            "nowhere",
            VIP_NOWHERE,
            80,
            Protocol::Tcp,
            Forwarding::Gue,
            vec![backend("lost", [203, 0, 113, 9], 80)],
        ),
    ]);
    cfg
}

/// The kernel tier's namespace with the remote subnet routed via web1.
fn net() -> TestNet {
    let net = TestNet::new();
    net.ip(&["route", "add", REMOTE_NET, "via", ROUTER, "dev", "b0"]);
    net
}

/// The index of the service named `name` in `cfg` (its service id after
/// the first apply).
fn id_of(cfg: &Config, name: &str) -> u32 {
    cfg.services
        .iter()
        .position(|s| s.name == name)
        .expect("service") as u32
}

/// A client's TCP SYN (or ACK) to `vip`:80 with the test's TOS.
fn client_tcp(sport: u16, vip: [u8; 4], syn: bool, payload: &[u8]) -> Vec<u8> {
    let mut frame = Tcp {
        syn,
        payload,
        ..Tcp::request(sport, vip)
    }
    .build();
    if !syn {
        frame = with_flags(frame, ACK);
    }
    frame[15] = TOS;
    fix_ip_checksum(&mut frame);
    frame
}

/// The flow key of a client's packet (`frame`, as it arrived).
fn key_of(frame: &[u8]) -> FlowKey {
    let word = |at: usize| u32::from_ne_bytes(frame[at..at + 4].try_into().expect("4 bytes"));
    let half = |at: usize| u16::from_ne_bytes([frame[at], frame[at + 1]]);
    FlowKey {
        saddr: word(26),
        daddr: word(30),
        sport: half(34),
        dport: half(36),
        protocol: frame[23],
        ..Default::default()
    }
}

/// The outer IPv4 header a tunnel puts in front of `inner` (IP bytes):
/// built by etherparse from the wire format's fields, checksum computed.
fn outer_header(inner: &[u8], overhead: usize, protocol: IpNumber, dst: [u8; 4]) -> Ipv4Header {
    let mut ip = Ipv4Header::new(
        (inner.len() + overhead - 20) as u16,
        64,
        protocol,
        LB_BACK,
        dst,
    )
    .expect("outer header");
    ip.dont_fragment = true;
    ip.identification = 0;
    ip.dscp = Ipv4Dscp::try_new(inner[1] >> 2).expect("dscp");
    ip.ecn = etherparse::Ipv4Ecn::try_new(inner[1] & 3).expect("ecn");
    ip.header_checksum = ip.calc_header_checksum();
    ip
}

/// The Ethernet header of every tunnel frame: the LB's back interface to
/// the router.
fn to_router() -> Vec<u8> {
    let mut out = Vec::new();
    Ethernet2Header {
        source: BACK_MAC,
        destination: ROUTER_MAC,
        ether_type: etherparse::EtherType::IPV4,
    }
    .write(&mut out)
    .expect("eth");
    out
}

/// `frame` (as the client sent it) wrapped in IPIP to `dst`, addressed to
/// the router.
fn ipip_of(frame: &[u8], dst: [u8; 4]) -> Vec<u8> {
    let inner = &frame[14..];
    let mut out = to_router();
    outer_header(inner, 20, IpNumber::IPV4, dst)
        .write(&mut out)
        .expect("ip");
    out.extend_from_slice(inner);
    out
}

/// `frame` wrapped in GUE to `dst` from UDP port `sport`.
fn gue_of(frame: &[u8], dst: [u8; 4], sport: u16) -> Vec<u8> {
    let inner = &frame[14..];
    let mut out = to_router();
    outer_header(inner, 32, IpNumber::UDP, dst)
        .write(&mut out)
        .expect("ip");
    UdpHeader {
        source_port: sport,
        destination_port: GUE_PORT,
        length: (inner.len() + 12) as u16,
        checksum: 0,
    }
    .write(&mut out)
    .expect("udp");
    out.extend_from_slice(&[0, 4, 0, 0]);
    out.extend_from_slice(inner);
    out
}

/// Which remote backend a tunnel frame goes to (its outer destination).
fn remote_of(out: &[u8]) -> usize {
    let dst: [u8; 4] = out[30..34].try_into().expect("address");
    REMOTE
        .iter()
        .position(|r| *r == dst)
        .unwrap_or_else(|| panic!("not to a remote backend: {dst:?}"))
}

/// The GUE source port of a frame the program left (host order).
fn gue_port_of(out: &[u8]) -> u16 {
    UdpHeaderSlice::from_slice(&out[34..])
        .expect("udp")
        .source_port()
}

#[test]
fn ipip_frames_are_the_packet_untouched_in_an_outer_ipv4_header() {
    let net = net();
    net.run(|| {
        let cfg = config();
        let mut h = Harness::new(&cfg);
        let syn = client_tcp(40000, VIP_IPIP, true, b"");
        let out = h.expect(h.front, &syn, XDP_REDIRECT, Verdict::Forwarded);
        assert_eq!(out, ipip_of(&syn, REMOTE[0]));
        // The outer checksum as a receiver checks it, from scratch.
        let outer = Ipv4HeaderSlice::from_slice(&out[14..])
            .expect("outer")
            .to_header();
        assert_eq!(outer.header_checksum, outer.calc_header_checksum());
        assert_eq!(&out[34..], &syn[14..], "the inner packet untouched");

        // The flow keeps its backend and its cached next hop.
        let data = client_tcp(40000, VIP_IPIP, false, b"GET / HTTP/1.1\r\n\r\n");
        let out = h.expect(h.front, &data, XDP_REDIRECT, Verdict::Forwarded);
        assert_eq!(out, ipip_of(&data, REMOTE[0]));
        // Round robin: the next flow goes to the next backend.
        let other = client_tcp(40001, VIP_IPIP, true, b"");
        let out = h.expect(h.front, &other, XDP_REDIRECT, Verdict::Forwarded);
        assert_eq!(out, ipip_of(&other, REMOTE[1]));

        // Counted as the inner packets' traffic.
        let svc =
            h.dp.counters(MapName::SERVICE_STATS, id_of(&cfg, "ipip"))
                .expect("service counters");
        assert_eq!(svc.packets, 3);
        assert_eq!(
            svc.bytes,
            (syn.len() + data.len() + other.len()) as u64,
            "bytes as they arrived"
        );
    });
}

#[test]
fn gue_frames_carry_the_packet_in_udp_to_the_gue_port_from_the_flows_port() {
    let net = net();
    net.run(|| {
        let mut h = Harness::new(&config());
        let syn = client_tcp(41000, VIP_GUE, true, b"");
        let out = h.expect(h.front, &syn, XDP_REDIRECT, Verdict::Forwarded);
        let sport = lb_common::tunnel::gue_source_port(flow_hash(&key_of(&syn)));
        assert_eq!(out, gue_of(&syn, REMOTE[0], sport));
        assert!((49152..=65535).contains(&gue_port_of(&out)));
        let outer = Ipv4HeaderSlice::from_slice(&out[14..])
            .expect("outer")
            .to_header();
        assert_eq!(outer.header_checksum, outer.calc_header_checksum());
        assert_eq!(&out[46..], &syn[14..], "the inner packet untouched");

        // UDP inside GUE: the same rule.
        let query = udp(CLIENT_MAC, FRONT_MAC, CLIENT, VIP_GUE, 64, 5000, 53, b"q");
        let out = h.expect(h.front, &query, XDP_REDIRECT, Verdict::Forwarded);
        let sport = lb_common::tunnel::gue_source_port(flow_hash(&key_of(&query)));
        assert_eq!(out, gue_of(&query, REMOTE[0], sport));
    });
}

#[test]
fn the_gue_source_port_is_stable_within_a_flow_and_differs_across_flows() {
    let net = net();
    net.run(|| {
        let mut h = Harness::new(&config());
        let mut ports = std::collections::BTreeSet::new();
        for sport in 42000..42064u16 {
            let syn = client_tcp(sport, VIP_GUE, true, b"");
            let first = gue_port_of(&h.expect(h.front, &syn, XDP_REDIRECT, Verdict::Forwarded));
            for payload in [&b"one"[..], b"two"] {
                let data = client_tcp(sport, VIP_GUE, false, payload);
                let out = h.expect(h.front, &data, XDP_REDIRECT, Verdict::Forwarded);
                assert_eq!(gue_port_of(&out), first, "flow {sport} changed port");
            }
            ports.insert(first);
        }
        // 64 flows over 16384 ports: a collision or two at most.
        assert!(ports.len() >= 60, "{} distinct ports", ports.len());
    });
}

/// With the back link's MTU at 1400: what fits once wrapped goes; one byte
/// more gets "fragmentation needed" with 1400 less the overhead, DF set or
/// not (`TunnelTooBig` then), a new flow's first packet and an established
/// flow's (cached next hop) alike.
#[test]
fn too_big_for_the_tunnel_gets_frag_needed_with_the_mtu_less_the_overhead() {
    let net = net();
    net.ip(&["link", "set", "b0", "mtu", "1400"]);
    net.run(|| {
        let mut h = Harness::new(&config());
        let datagram = |vip, sport, len: usize| {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            udp(CLIENT_MAC, FRONT_MAC, CLIENT, vip, 64, sport, 53, &payload)
        };
        // GUE, 1368 + 32 = 1400: fits.
        let fits = datagram(VIP_GUE, 6000, 1368 - 28);
        let out = h.expect(h.front, &fits, XDP_REDIRECT, Verdict::Forwarded);
        assert_eq!(out.len(), 14 + 1400);
        // The flow's next packet, one byte more: its cached hop says no.
        let over = datagram(VIP_GUE, 6000, 1369 - 28);
        let out = h.expect(h.front, &over, XDP_TX, Verdict::FragNeeded);
        assert_eq!(out, frag_needed_for(&over, 1368));
        let loose = without_df(over.clone());
        let out = h.expect(h.front, &loose, XDP_TX, Verdict::TunnelTooBig);
        assert_eq!(out, frag_needed_for(&loose, 1368));
        // A new flow's first packet: the FIB says no.
        let first = datagram(VIP_GUE, 6001, 1369 - 28);
        let out = h.expect(h.front, &first, XDP_TX, Verdict::FragNeeded);
        assert_eq!(out, frag_needed_for(&first, 1368));

        // IPIP (TCP), 1380 + 20 fits, 1381 does not.
        let syn = client_tcp(43000, VIP_IPIP, true, b"");
        h.expect(h.front, &syn, XDP_REDIRECT, Verdict::Forwarded);
        let payload = vec![7u8; 1380 - 40];
        let fits = client_tcp(43000, VIP_IPIP, false, &payload);
        let out = h.expect(h.front, &fits, XDP_REDIRECT, Verdict::Forwarded);
        assert_eq!(out, ipip_of(&fits, REMOTE[0]));
        let payload = vec![7u8; 1381 - 40];
        let over = client_tcp(43000, VIP_IPIP, false, &payload);
        let out = h.expect(h.front, &over, XDP_TX, Verdict::FragNeeded);
        assert_eq!(out, frag_needed_for(&over, 1380));
        let loose = without_df(over);
        let out = h.expect(h.front, &loose, XDP_TX, Verdict::TunnelTooBig);
        assert_eq!(out, frag_needed_for(&loose, 1380));
    });
}

#[test]
fn a_clients_icmp_error_reaches_its_tunnel_backend_in_the_tunnel() {
    let net = net();
    net.run(|| {
        let mut h = Harness::new(&config());
        for (vip, sport) in [(VIP_IPIP, 44000u16), (VIP_GUE, 44001)] {
            let syn = client_tcp(sport, vip, true, b"");
            let first = h.expect(h.front, &syn, XDP_REDIRECT, Verdict::Forwarded);
            // The backend's answer (VIP → client, sent directly) that the
            // client's path could not carry.
            let mut sent = Vec::new();
            etherparse::PacketBuilder::ipv4(vip, CLIENT, 63)
                .tcp(80, sport, 1, 64240)
                .ack(1)
                .write(&mut sent, &[9u8; 1400])
                .expect("answer");
            let error = icmp_error(
                (CLIENT_MAC, FRONT_MAC),
                CLIENT,
                vip,
                64,
                etherparse::Icmpv4Type::DestinationUnreachable(
                    etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded {
                        next_hop_mtu: 1280,
                    },
                ),
                &sent[..548],
            );
            let out = h.expect(h.front, &error, XDP_REDIRECT, Verdict::ForwardedIcmp);
            let backend = REMOTE[remote_of(&first)];
            let want = if vip == VIP_IPIP {
                ipip_of(&error, backend)
            } else {
                // The flow's own source port: the error lands on its queue.
                gue_of(&error, backend, gue_port_of(&first))
            };
            assert_eq!(out, want, "error to the {vip:?} flow's backend");
        }
    });
}

/// Every scheduler kind runs a tunnel service as it runs any: a counter
/// scheduler pins flows to backends in turn and drops a segment without a
/// flow; a hash scheduler finds the flow's backend again (hash-on-miss).
#[test]
fn tunnel_services_work_under_every_scheduler() {
    let net = net();
    net.run(|| {
        let mut cfg = config();
        let gue = id_of(&cfg, "gue") as usize;
        let mut h = Harness::new(&cfg);
        for (n, scheduler) in Scheduler::ALL.into_iter().enumerate() {
            cfg.services[gue].scheduler = scheduler;
            h.dp.apply(&cfg).expect("apply");
            let base = 45000 + 100 * n as u16;
            let mut chosen = Vec::new();
            for sport in base..base + 6 {
                let syn = client_tcp(sport, VIP_GUE, true, b"");
                let out = h.expect_case(
                    &format!("{scheduler:?} SYN {sport}"),
                    h.front,
                    &syn,
                    XDP_REDIRECT,
                    Verdict::Forwarded,
                );
                let backend = remote_of(&out);
                assert_eq!(
                    out,
                    gue_of(&syn, REMOTE[backend], gue_port_of(&out)),
                    "{scheduler:?}"
                );
                chosen.push(backend);
            }
            if scheduler == Scheduler::RoundRobin {
                assert_eq!(chosen, [0, 1, 2, 0, 1, 2], "round robin in turn");
            }
            // Pinned: each flow's next packet goes where its SYN went.
            for (sport, backend) in (base..).zip(&chosen) {
                let (_, out) = h.run(h.front, &client_tcp(sport, VIP_GUE, false, b"x"));
                assert_eq!(remote_of(&out), *backend, "{scheduler:?} flow {sport}");
            }
            // A segment of a flow no table knows (evicted, or begun at
            // another LB): the first flow, forgotten.
            let key = key_of(&client_tcp(base, VIP_GUE, true, b""));
            h.dp.forget_flow(&key).expect("forget");
            let stray = client_tcp(base, VIP_GUE, false, b"y");
            if lb_common::hashes_flow(scheduler.code()) {
                let out = h.expect_case(
                    &format!("{scheduler:?} hash-on-miss"),
                    h.front,
                    &stray,
                    XDP_REDIRECT,
                    Verdict::Forwarded,
                );
                assert_eq!(
                    remote_of(&out),
                    chosen[0],
                    "{scheduler:?}: hash-on-miss lands where the flow was"
                );
            } else {
                h.expect_case(
                    &format!("{scheduler:?} stray segment"),
                    h.front,
                    &stray,
                    XDP_DROP,
                    Verdict::DropNoFlow,
                );
            }
        }
    });
}

/// Over the new-flow budget a tunnel service with a hash scheduler goes
/// stateless as DSR does, and a stateless flow's next packet lands where
/// its first did.
#[test]
fn over_the_new_flow_budget_tunnel_hash_flows_go_without_an_entry() {
    let net = net();
    net.run(|| {
        let mut cfg = config();
        cfg.dataplane.new_flow_budget = 2;
        let gue = id_of(&cfg, "gue") as usize;
        cfg.services[gue].scheduler = Scheduler::Maglev;
        let mut h = Harness::new(&cfg);
        // The budget is per CPU: one CPU's window for the whole test.
        lb_userspace::harness::pktgen::pin_to_cpu(0).expect("pin to cpu 0");
        let before = h.verdicts();
        let mut chosen = Vec::new();
        for sport in 46000..46010u16 {
            let (action, out) = h.run(h.front, &client_tcp(sport, VIP_GUE, true, b""));
            assert_eq!(action, XDP_REDIRECT);
            chosen.push((sport, remote_of(&out)));
        }
        let after = h.verdicts();
        let (stateful, stateless) = (
            verdict_delta(&before, &after, Verdict::Forwarded),
            verdict_delta(&before, &after, Verdict::ForwardedStateless),
        );
        assert_eq!(stateful + stateless, 10);
        assert!(
            stateful <= 4 && stateless >= 6,
            "{stateful} inserted, {stateless} stateless"
        );
        for (sport, backend) in chosen {
            let (_, out) = h.run(h.front, &client_tcp(sport, VIP_GUE, false, b"x"));
            assert_eq!(remote_of(&out), backend, "flow {sport}");
        }
    });
}

/// A tunnel backend the host has no route to has no tunnel source: its
/// packets go to the kernel as they arrived, as a DSR backend's without a
/// next hop do.
#[test]
fn a_tunnel_backend_without_a_route_leaves_its_packets_to_the_kernel() {
    let net = net();
    net.run(|| {
        let mut h = Harness::new(&config());
        let syn = client_tcp(47000, VIP_NOWHERE, true, b"");
        let out = h.expect(h.front, &syn, XDP_PASS, Verdict::PassKernelForward);
        assert_eq!(out, syn);
    });
}

/// The router's address on the LB's back segment (web1 in the kernel
/// tier's namespace), the remote backends' next hop.
const ROUTER_ADDR: [u8; 4] = [198, 19, 0, 11];

/// A "fragmentation needed" from the router to the LB's tunnel source,
/// saying its link is `mtu`, quoting `quote` (an outer packet the LB sent).
fn routers_frag_needed(quote: &[u8], mtu: u16) -> Vec<u8> {
    icmp_error(
        (ROUTER_MAC, BACK_MAC),
        ROUTER_ADDR,
        LB_BACK,
        64,
        etherparse::Icmpv4Type::DestinationUnreachable(
            etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: mtu },
        ),
        quote,
    )
}

/// `TUNNEL_PMTU_STATS` (learned, clamped, refused) and the learned MTUs.
fn learned(h: &Harness) -> ([u64; 3], Vec<(std::net::Ipv4Addr, u16)>) {
    let counts = h.dp.tunnel_pmtu_counts().expect("TUNNEL_PMTU_STATS");
    let mtus =
        h.dp.tunnel_pmtus()
            .expect("TUNNEL_PMTU")
            .into_iter()
            .map(|l| {
                // Ten minutes, less the test's own time.
                assert!(
                    l.expires_in > std::time::Duration::from_secs(590)
                        && l.expires_in <= std::time::Duration::from_secs(600),
                    "{l:?}"
                );
                (l.backend, l.mtu)
            })
            .collect();
    (counts, mtus)
}

/// PMTUD beyond the LB's own link (issue 26): the LB's link is 1500; the
/// router's link to a backend is 1300. Its "fragmentation needed" to the
/// LB's tunnel source, quoting only the outer header and 8 bytes (GUE) or
/// the inner packet too (IPIP, as Linux quotes), is learned for that
/// backend: the next too-big packet of any flow to it gets "fragmentation
/// needed" with 1300 less the overhead, and a packet that fits still goes.
/// Forged messages: about an address that is no tunnel backend, with an
/// MTU the quoted packet would have fitted or 0: refused; a tiny MTU:
/// clamped to 552. Expired, the learned MTU no longer applies.
#[test]
fn a_routers_frag_needed_about_a_tunnel_packet_lowers_that_backends_path_mtu() {
    let net = net();
    net.run(|| {
        let mut h = Harness::new(&config());
        let datagram = |sport, len: usize| {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            udp(
                CLIENT_MAC, FRONT_MAC, CLIENT, VIP_GUE, 64, sport, 53, &payload,
            )
        };
        assert_eq!(learned(&h), ([0, 0, 0], vec![]));

        // GUE: 1400 + 32 fits the LB's link, not the router's.
        let big = datagram(7000, 1400 - 28);
        let out = h.expect(h.front, &big, XDP_REDIRECT, Verdict::Forwarded);
        let backend = REMOTE[remote_of(&out)];
        // RFC 792's minimum quote: the outer header and 8 bytes (the UDP
        // header): the inner flow is not in it.
        let icmp = routers_frag_needed(&out[14..14 + 28], 1300);
        h.expect(h.back, &icmp, XDP_PASS, Verdict::PassNotOurs);
        let learnt = (backend.into(), 1300);
        assert_eq!(learned(&h), ([1, 0, 0], vec![learnt]));
        // The same flow's next big packet: "fragmentation needed", 1268.
        let out = h.expect(h.front, &big, XDP_TX, Verdict::FragNeeded);
        assert_eq!(out, frag_needed_for(&big, 1300 - 32));
        let fits = datagram(7000, 1268 - 28);
        let out = h.expect(h.front, &fits, XDP_REDIRECT, Verdict::Forwarded);
        assert_eq!(out.len(), 14 + 1300);
        // Any other flow to that backend (round robin: every third), too;
        // flows to the other backends still go at full size.
        let mut answered = 0;
        for sport in 7001..7004 {
            let other = datagram(sport, 1400 - 28);
            let verdicts = h.verdicts();
            let (action, out) = test_run(&mut h.dp, h.front, &other);
            if verdict_delta(&verdicts, &h.verdicts(), Verdict::FragNeeded) == 1 {
                assert_eq!(out, frag_needed_for(&other, 1268));
                answered += 1;
            } else {
                assert_eq!(action, XDP_REDIRECT);
                assert_ne!(REMOTE[remote_of(&out)], backend);
            }
        }
        assert_eq!(answered, 1, "one new flow in three goes to {backend:?}");

        // IPIP, a TCP flow to another backend, the router quoting 548
        // bytes (the inner header too): learned for that backend.
        let (sport, ipip_backend) = (45000..45003)
            .map(|sport| {
                let syn = client_tcp(sport, VIP_IPIP, true, b"");
                let first = h.expect(h.front, &syn, XDP_REDIRECT, Verdict::Forwarded);
                (sport, REMOTE[remote_of(&first)])
            })
            .find(|(_, b)| *b != backend)
            .expect("round robin reaches another backend");
        let payload = vec![7u8; 1400 - 40];
        let seg = client_tcp(sport, VIP_IPIP, false, &payload);
        let out = h.expect(h.front, &seg, XDP_REDIRECT, Verdict::Forwarded);
        let icmp = routers_frag_needed(&out[14..14 + 548], 1350);
        h.expect(h.back, &icmp, XDP_PASS, Verdict::PassNotOurs);
        let (counts, mtus) = learned(&h);
        assert_eq!(counts, [2, 0, 0]);
        assert!(mtus.contains(&(ipip_backend.into(), 1350)), "{mtus:?}");
        let out = h.expect(h.front, &seg, XDP_TX, Verdict::FragNeeded);
        assert_eq!(out, frag_needed_for(&seg, 1350 - 20));
        // A larger MTU for a live entry does not raise it.
        h.expect(
            h.back,
            &icmp_with_mtu(&icmp, 1390),
            XDP_PASS,
            Verdict::PassNotOurs,
        );
        assert!(learned(&h).1.contains(&(ipip_backend.into(), 1350)));
        assert_eq!(learned(&h).0, [3, 0, 0]);

        // Forged: about an address that is no tunnel backend; an MTU the
        // quoted packet fitted; no MTU. Refused, nothing learned.
        let mut stranger = out_ipip_quote(&seg, ipip_backend);
        stranger[16..20].copy_from_slice(&[198, 19, 8, 99]);
        for (quote, mtu) in [
            (stranger, 1300),
            (out_ipip_quote(&seg, ipip_backend), 1500),
            (out_ipip_quote(&seg, ipip_backend), 0),
        ] {
            h.expect(
                h.back,
                &routers_frag_needed(&quote, mtu),
                XDP_PASS,
                Verdict::PassNotOurs,
            );
        }
        let (counts, mtus) = learned(&h);
        assert_eq!(counts, [3, 0, 3]);
        assert_eq!(mtus.len(), 2, "{mtus:?}");
        // A tiny MTU: clamped to the floor (552), counted.
        let icmp = routers_frag_needed(&out_ipip_quote(&seg, ipip_backend), 68);
        h.expect(h.back, &icmp, XDP_PASS, Verdict::PassNotOurs);
        let (counts, mtus) = learned(&h);
        assert_eq!(counts, [3, 1, 3]);
        assert!(mtus.contains(&(ipip_backend.into(), 552)), "{mtus:?}");
        let out = h.expect(h.front, &seg, XDP_TX, Verdict::FragNeeded);
        assert_eq!(out, frag_needed_for(&seg, 552 - 20));
        // The LB's own UDP to a backend (not to the GUE port): the kernel's.
        let mut own = out_ipip_quote(&seg, ipip_backend);
        own[9] = 17;
        own[22..24].copy_from_slice(&5353u16.to_be_bytes());
        h.expect(
            h.back,
            &routers_frag_needed(&own, 1000),
            XDP_PASS,
            Verdict::PassNotOurs,
        );
        assert_eq!(learned(&h).0, [3, 1, 3]);

        // Expired (its time set in the past): the flow goes full size again.
        expire_all(&mut h);
        assert_eq!(learned(&h).1, vec![]);
        let out = h.expect(h.front, &seg, XDP_REDIRECT, Verdict::Forwarded);
        assert_eq!(out, ipip_of(&seg, ipip_backend));
    });
}

/// `icmp` (a router's frag needed) saying `mtu` instead, checksum fixed.
fn icmp_with_mtu(icmp: &[u8], mtu: u16) -> Vec<u8> {
    routers_frag_needed(&icmp[14 + 20 + 8..], mtu)
}

/// The IPIP packet the LB sends for `frame` to `backend`, from the outer
/// header on, with the 8 bytes after it (the shortest quote).
fn out_ipip_quote(frame: &[u8], backend: [u8; 4]) -> Vec<u8> {
    ipip_of(frame, backend)[14..14 + 28].to_vec()
}

/// Every `TUNNEL_PMTU` entry's expiry set to the past.
fn expire_all(h: &mut Harness) {
    use aya::maps::{HashMap, Map};
    let mut map: HashMap<_, u32, lb_common::tunnel::TunnelPmtu> = HashMap::try_from(Map::HashMap(
        h.dp.map_data(MapName::TUNNEL_PMTU).expect("TUNNEL_PMTU"),
    ))
    .expect("TUNNEL_PMTU");
    let entries: Vec<_> = map.iter().map(|e| e.expect("entry")).collect();
    for (addr, mut e) in entries {
        if e.mtu != 0 {
            e.expires_ns = 1;
            map.insert(addr, e, 0).expect("write");
        }
    }
}
