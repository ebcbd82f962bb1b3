//! Kernel tier, full NAT (issue 25): a full-NAT flow's SYN, the backend's
//! SYN-ACK, data both ways and FIN rewritten byte for byte (source and
//! destination both translated, every checksum recomputed independently
//! by etherparse); the port allocator under collision and exhaustion
//! (`DropFnatExhausted`); a claim returned when its flow ends; a later
//! fragment and ICMP errors both ways of a full-NAT flow; the agent's
//! sweep of stale claims (a claim whose flow is gone is removed, a live
//! flow's stays) and the ports in use per source address; the quarantine
//! of a port an established flow freed (not given out again toward its
//! backend until it is over, whether the data plane or the agent's sweep
//! removed the flow).
//!
//! The real `lb` object run with BPF_PROG_TEST_RUN inside the kernel
//! tier's throwaway namespace (`lb_tests::kernel_net`): its back interface
//! b0 holds 198.19.0.1, the default source address.
//!
//! Needs root and BPF; without them the tests fail loudly.

use std::{net::Ipv4Addr, time::Duration};

use etherparse::{Icmpv4Type, PacketBuilder, icmpv4::DestUnreachableHeader};
use lb_common::{CLAIM_FREED, CLAIM_HELD, FlowKey, FnatClaim, Verdict, fullnat::CLAIM_TICK_MASK};
use lb_tests::kernel_net::{
    BACK_MAC, CLIENT, CLIENT_MAC, FRONT_MAC, Harness, TestNet, WEB_MACS, WEB_PORT, WEB_UDP_PORT,
    WEBS, backend, fix_ip_checksum, fragments, icmp_error, lab_config, service, webs,
};
use lb_userspace::{
    config::{Config, Forwarding, FullNatSources, Protocol},
    harness::xdp::{XDP_DROP, XDP_REDIRECT},
};

/// The full-NAT services' VIP (TCP 80, UDP 5353).
const VIP: [u8; 4] = [198, 18, 0, 60];
/// b0's address: the source full-NAT flows leave with by default.
const SOURCE: [u8; 4] = [198, 19, 0, 1];
const CLIENT_SEQ: u32 = 0x1000_0000;
const WEB_SEQ: u32 = 0x2000_0000;

/// The kernel tier's config plus a TCP and a UDP full-NAT service over
/// web1..3, with `sources` (empty: the default) and `ports`, and no
/// quarantine of freed ports (`quarantined_config` has one).
fn config(sources: &[[u8; 4]], ports: (u16, u16)) -> Config {
    let mut cfg = lab_config();
    cfg.dataplane.full_nat = FullNatSources {
        addresses: sources.iter().map(|a| Ipv4Addr::from(*a)).collect(),
        port_lo: ports.0,
        port_hi: ports.1,
        quarantine: Duration::ZERO,
    };
    cfg.services.push(service(
        "fnat",
        VIP,
        80,
        Protocol::Tcp,
        Forwarding::FullNat,
        webs(WEB_PORT),
    ));
    cfg.services.push(service(
        "fnat-udp",
        VIP,
        5353,
        Protocol::Udp,
        Forwarding::FullNat,
        webs(WEB_UDP_PORT),
    ));
    cfg
}

/// A TCP segment, every checksum computed by etherparse.
#[derive(Clone, Copy)]
struct Seg<'a> {
    macs: ([u8; 6], [u8; 6]),
    src: ([u8; 4], u16),
    dst: ([u8; 4], u16),
    ttl: u8,
    seq: u32,
    ack: Option<u32>,
    syn: bool,
    fin: bool,
    payload: &'a [u8],
}

impl Seg<'_> {
    fn build(&self) -> Vec<u8> {
        let mut b = PacketBuilder::ethernet2(self.macs.0, self.macs.1)
            .ipv4(self.src.0, self.dst.0, self.ttl)
            .tcp(self.src.1, self.dst.1, self.seq, 64240);
        if self.syn {
            b = b.syn();
        }
        if let Some(ack) = self.ack {
            b = b.ack(ack);
        }
        if self.fin {
            b = b.fin();
        }
        let mut out = Vec::new();
        b.write(&mut out, self.payload).expect("tcp frame");
        out
    }
}

/// The client's SYN from `port` to the full-NAT VIP.
fn syn(port: u16) -> Seg<'static> {
    Seg {
        macs: (CLIENT_MAC, FRONT_MAC),
        src: (CLIENT, port),
        dst: (VIP, 80),
        ttl: 64,
        seq: CLIENT_SEQ,
        ack: None,
        syn: true,
        fin: false,
        payload: b"",
    }
}

/// Where a frame sent to a web went: (web index, source address, port).
fn sent(frame: &[u8]) -> (usize, [u8; 4], u16) {
    let web = WEB_MACS
        .iter()
        .position(|m| frame[..6] == m[..])
        .unwrap_or_else(|| panic!("not sent to a web: {:02x?}", &frame[..6]));
    let source = frame[26..30].try_into().expect("address");
    (web, source, u16::from_be_bytes([frame[34], frame[35]]))
}

/// The full-NAT claims: (reply tuple, forward key), network order.
fn claims(h: &Harness) -> Vec<(FlowKey, FlowKey)> {
    h.dp.fnat_claims()
        .expect("FNAT_CLAIMS")
        .into_iter()
        .map(|c| (c.reply, c.forward()))
        .collect()
}

fn raw(a: [u8; 4]) -> u32 {
    u32::from_ne_bytes(a)
}

/// A handshake through the LB: the SYN from `port` (checked byte for byte),
/// the web's SYN-ACK back (checked), the client's ACK. Returns the web's
/// index and the source port the flow was given.
fn handshake(h: &mut Harness, port: u16, source: [u8; 4]) -> (usize, u16) {
    let out = h.expect(
        h.front,
        &syn(port).build(),
        XDP_REDIRECT,
        Verdict::Forwarded,
    );
    let (web, from, sport) = sent(&out);
    assert_eq!(from, source, "the flow leaves with the source address");
    let want = Seg {
        macs: (BACK_MAC, WEB_MACS[web]),
        src: (source, sport),
        dst: (WEBS[web], WEB_PORT),
        ttl: 63,
        ..syn(port)
    };
    assert_eq!(out, want.build(), "the SYN, both ends translated");
    // The claim names the flow: reply tuple web → source:port.
    let tuple = FlowKey {
        saddr: raw(WEBS[web]),
        daddr: raw(source),
        sport: WEB_PORT.to_be(),
        dport: sport.to_be(),
        protocol: 6,
        _pad0: 0,
        _pad1: 0,
    };
    let forward = claims(h)
        .into_iter()
        .find(|(k, _)| *k == tuple)
        .map(|(_, f)| f)
        .expect("the SYN's claim");
    assert_eq!(
        (forward.saddr, forward.sport, forward.daddr, forward.dport),
        (raw(CLIENT), port.to_be(), raw(VIP), 80u16.to_be())
    );
    let syn_ack = Seg {
        macs: (WEB_MACS[web], BACK_MAC),
        src: (WEBS[web], WEB_PORT),
        dst: (source, sport),
        ttl: 64,
        seq: WEB_SEQ,
        ack: Some(CLIENT_SEQ + 1),
        syn: true,
        fin: false,
        payload: b"",
    };
    let back = h.expect(
        h.back,
        &syn_ack.build(),
        XDP_REDIRECT,
        Verdict::ForwardedReply,
    );
    let want = Seg {
        macs: (FRONT_MAC, CLIENT_MAC),
        src: (VIP, 80),
        dst: (CLIENT, port),
        ttl: 63,
        ..syn_ack
    };
    assert_eq!(
        back,
        want.build(),
        "the SYN-ACK, as the VIP's to the client"
    );
    let ack = Seg {
        seq: CLIENT_SEQ + 1,
        ack: Some(WEB_SEQ + 1),
        syn: false,
        ..syn(port)
    };
    let out = h.expect(h.front, &ack.build(), XDP_REDIRECT, Verdict::Forwarded);
    let want = Seg {
        macs: (BACK_MAC, WEB_MACS[web]),
        src: (source, sport),
        dst: (WEBS[web], WEB_PORT),
        ttl: 63,
        ..ack
    };
    assert_eq!(out, want.build(), "the handshake's ACK");
    (web, sport)
}

#[test]
fn a_full_nat_flow_is_translated_byte_for_byte_both_ways_through_fin() {
    let net = TestNet::new();
    net.run(|| {
        // No source-addresses: b0's own address, the route's source.
        let mut h = Harness::new(&config(&[], (1024, 32767)));
        let conf = h.dp.fnat_conf().expect("FNAT_CONF");
        assert_eq!((conf.count, conf.addrs[0]), (1, raw(SOURCE)));
        let (web, sport) = handshake(&mut h, 40000, SOURCE);
        assert!((1024..=32767).contains(&sport), "port {sport} in the range");
        // The flow is established: promoted by the ACK of the answered
        // handshake, one slot, found from either direction.
        let flows = h.dp.established_table().expect("ESTABLISHED").entries();
        assert!(
            flows
                .iter()
                .any(|(k, _)| k.saddr == raw(CLIENT) && k.sport == 40000u16.to_be()),
            "the flow is established"
        );

        let request = Seg {
            seq: CLIENT_SEQ + 1,
            ack: Some(WEB_SEQ + 1),
            syn: false,
            payload: b"GET / HTTP/1.1\r\n\r\n",
            ..syn(40000)
        };
        let out = h.expect(h.front, &request.build(), XDP_REDIRECT, Verdict::Forwarded);
        let to_web = |seg: Seg| {
            Seg {
                macs: (BACK_MAC, WEB_MACS[web]),
                src: (SOURCE, sport),
                dst: (WEBS[web], WEB_PORT),
                ttl: 63,
                ..seg
            }
            .build()
        };
        assert_eq!(out, to_web(request), "client data");
        let answer = Seg {
            macs: (WEB_MACS[web], BACK_MAC),
            src: (WEBS[web], WEB_PORT),
            dst: (SOURCE, sport),
            ttl: 64,
            seq: WEB_SEQ + 1,
            ack: Some(CLIENT_SEQ + 1 + 18),
            syn: false,
            fin: false,
            payload: b"HTTP/1.1 200 OK\r\n\r\nhello",
        };
        let to_client = |seg: Seg| {
            Seg {
                macs: (FRONT_MAC, CLIENT_MAC),
                src: (VIP, 80),
                dst: (CLIENT, 40000),
                ttl: 63,
                ..seg
            }
            .build()
        };
        let back = h.expect(
            h.back,
            &answer.build(),
            XDP_REDIRECT,
            Verdict::ForwardedReply,
        );
        assert_eq!(back, to_client(answer), "backend data");

        // FIN both ways, each translated.
        let fin = Seg {
            fin: true,
            payload: b"",
            seq: CLIENT_SEQ + 1 + 18,
            ack: Some(WEB_SEQ + 1 + 25),
            ..request
        };
        let out = h.expect(h.front, &fin.build(), XDP_REDIRECT, Verdict::Forwarded);
        assert_eq!(out, to_web(fin), "client FIN");
        let web_fin = Seg {
            fin: true,
            payload: b"",
            seq: WEB_SEQ + 1 + 25,
            ack: Some(CLIENT_SEQ + 1 + 19),
            ..answer
        };
        let back = h.expect(
            h.back,
            &web_fin.build(),
            XDP_REDIRECT,
            Verdict::ForwardedReply,
        );
        assert_eq!(back, to_client(web_fin), "backend FIN");

        // A segment to the source address that no claim names is not
        // translated: the kernel gets it.
        let stray = Seg {
            src: (WEBS[web], WEB_PORT),
            dst: (SOURCE, sport.wrapping_add(1).max(1024)),
            ..answer
        };
        let (action, out) = h.run(h.back, &stray.build());
        assert_ne!(action, XDP_REDIRECT);
        assert_eq!(out, stray.build(), "untouched");
    });
}

#[test]
fn udp_datagrams_are_translated_both_ways() {
    let net = TestNet::new();
    net.run(|| {
        let mut h = Harness::new(&config(&[SOURCE], (1024, 32767)));
        let request = |payload: &[u8]| {
            let mut out = Vec::new();
            PacketBuilder::ethernet2(CLIENT_MAC, FRONT_MAC)
                .ipv4(CLIENT, VIP, 64)
                .udp(5000, 5353)
                .write(&mut out, payload)
                .expect("udp");
            out
        };
        let out = h.expect(
            h.front,
            &request(b"query"),
            XDP_REDIRECT,
            Verdict::Forwarded,
        );
        let (web, from, sport) = sent(&out);
        assert_eq!(from, SOURCE);
        let mut want = Vec::new();
        PacketBuilder::ethernet2(BACK_MAC, WEB_MACS[web])
            .ipv4(SOURCE, WEBS[web], 63)
            .udp(sport, WEB_UDP_PORT)
            .write(&mut want, b"query")
            .expect("udp");
        assert_eq!(out, want);
        let mut answer = Vec::new();
        PacketBuilder::ethernet2(WEB_MACS[web], BACK_MAC)
            .ipv4(WEBS[web], SOURCE, 64)
            .udp(WEB_UDP_PORT, sport)
            .write(&mut answer, b"answer")
            .expect("udp");
        let back = h.expect(h.back, &answer, XDP_REDIRECT, Verdict::ForwardedReply);
        let mut want = Vec::new();
        PacketBuilder::ethernet2(FRONT_MAC, CLIENT_MAC)
            .ipv4(VIP, CLIENT, 63)
            .udp(5353, 5000)
            .write(&mut want, b"answer")
            .expect("udp");
        assert_eq!(back, want);
        // The second datagram keeps its port (and promotes the flow).
        let out = h.expect(
            h.front,
            &request(b"again"),
            XDP_REDIRECT,
            Verdict::Forwarded,
        );
        assert_eq!(sent(&out), (web, SOURCE, sport));
    });
}

#[test]
fn the_allocator_never_collides_and_refuses_a_full_pool() {
    let net = TestNet::new();
    net.run(|| {
        // One backend, one address, four ports: a pool of four.
        let mut cfg = config(&[SOURCE], (5000, 5003));
        cfg.services.retain(|s| s.name != "fnat-udp");
        let fnat = cfg.services.iter_mut().find(|s| s.name == "fnat").unwrap();
        fnat.backends = vec![backend("web1", WEBS[0], WEB_PORT)];
        let mut h = Harness::new(&cfg);
        let (mut forwarded, mut refused) = (0, 0);
        let mut given = Vec::new();
        for port in 41000..41020 {
            let before = h.verdicts();
            let (action, out) = h.run(h.front, &syn(port).build());
            let after = h.verdicts();
            let grew = |v: Verdict| lb_tests::kernel_net::verdict_delta(&before, &after, v) == 1;
            if grew(Verdict::Forwarded) {
                assert_eq!(action, XDP_REDIRECT);
                let (_, source, sport) = sent(&out);
                assert_eq!(source, SOURCE);
                given.push((port, sport));
                forwarded += 1;
            } else {
                assert!(grew(Verdict::DropFnatExhausted), "SYN {port}: {after:?}");
                assert_eq!(action, XDP_DROP);
                refused += 1;
            }
        }
        let mut ports: Vec<u16> = given.iter().map(|&(_, sport)| sport).collect();
        ports.sort_unstable();
        assert_eq!(
            ports,
            [5000, 5001, 5002, 5003],
            "each port once, no collision"
        );
        assert_eq!((forwarded, refused), (4, 16));
        assert_eq!(
            claims(&h).len(),
            4,
            "one claim per flow, none for refused SYNs"
        );
        // A retransmitted SYN of a flow that has a port keeps it.
        let (client_port, sport) = given[0];
        let (action, out) = h.run(h.front, &syn(client_port).build());
        assert_eq!(action, XDP_REDIRECT);
        assert_eq!(sent(&out).2, sport);
        assert_eq!(claims(&h).len(), 4);
    });
}

/// Pins the calling thread to CPU 0: BPF_PROG_TEST_RUN runs the program on
/// the caller's CPU, and the allocation cursor is per CPU.
fn pin_to_cpu0() {
    // SAFETY: a zeroed cpu_set_t with one bit set, for this thread (0).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set),
            0,
            "sched_setaffinity: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// A CPU hands out ports toward a backend in order (its cursor in
/// `FNAT_CURSORS`), each backend from a cursor of its own, and wraps at
/// the range's end (its start is drawn: six ports of eight from it wrap
/// five times in eight).
#[test]
fn one_cpu_hands_out_ports_toward_each_backend_in_order() {
    let net = TestNet::new();
    net.run(|| {
        pin_to_cpu0();
        // Two backends under round robin, one address, eight ports.
        let mut cfg = config(&[SOURCE], (5000, 5007));
        cfg.services.retain(|s| s.name != "fnat-udp");
        let fnat = cfg.services.iter_mut().find(|s| s.name == "fnat").unwrap();
        fnat.backends = vec![
            backend("web1", WEBS[0], WEB_PORT),
            backend("web2", WEBS[1], WEB_PORT),
        ];
        let mut h = Harness::new(&cfg);
        let mut by_web: [Vec<u16>; 2] = [Vec::new(), Vec::new()];
        for port in 42000..42012 {
            let (action, out) = h.run(h.front, &syn(port).build());
            assert_eq!(action, XDP_REDIRECT, "SYN {port}");
            let (web, source, sport) = sent(&out);
            assert_eq!(source, SOURCE);
            by_web[web].push(sport);
        }
        for (web, ports) in by_web.iter().enumerate() {
            assert_eq!(ports.len(), 6, "round robin: six flows to web{}", web + 1);
            for pair in ports.windows(2) {
                let next = if pair[0] == 5007 { 5000 } else { pair[0] + 1 };
                assert_eq!(pair[1], next, "web{}'s ports {ports:?}", web + 1);
            }
        }
    });
}

/// The reply tuple of web1's flows from `SOURCE:port` (network order).
fn web1_tuple(port: u16) -> FlowKey {
    lb_common::fullnat::reply_tuple(
        (raw(WEBS[0]), WEB_PORT.to_be()),
        (raw(SOURCE), port.to_be()),
        6,
    )
}

/// `FNAT_CLAIMS` for writes from the test, and the first slot of `tuple`'s
/// bucket (the data plane's placement, under the tables' seed).
fn claim_slots(
    h: &Harness,
    tuple: &FlowKey,
) -> (aya::maps::Array<aya::maps::MapData, FnatClaim>, u32) {
    use aya::maps::{Array, Map};
    let data =
        h.dp.map_data(lb_common::map_names::MapName::FNAT_CLAIMS)
            .expect("FNAT_CLAIMS");
    let map = Array::try_from(Map::Array(data)).expect("an array");
    let seed = h.dp.flow_conf().expect("FLOW_CONF").half_open_seed;
    let first = lb_common::fullnat::claim_bucket(tuple, seed, map.len());
    (map, first)
}

/// A claim of another flow: `tuple` held since tick 1 by client port 9.
fn foreign(kind: u32, tuple: FlowKey) -> FnatClaim {
    FnatClaim {
        state: lb_common::fullnat::claim_state(kind, 1),
        reply: tuple,
        client: raw(CLIENT),
        vip: raw(VIP),
        client_port: 9u16.to_be(),
        vport: 80u16.to_be(),
    }
}

/// Two flows whose candidates collide (one bucket of `FNAT_CLAIMS`, two
/// slots): with a one-port pool, the port's bucket is filled from the test
/// with other claims. Both slots taken by other tuples: refused
/// (`drop_fnat_exhausted`); one free: the flow takes it, whichever it is,
/// and its reply finds it there; the tuple itself held in one slot: never
/// claimed again in the other.
#[test]
fn colliding_claims_share_a_bucket_and_a_tuple_is_never_held_twice() {
    let net = TestNet::new();
    net.run(|| {
        let mut h = Harness::new(&quarantined_config(Duration::from_secs(60)));
        let mine = web1_tuple(5000);
        let (mut map, first) = claim_slots(&h, &mine);
        // Two other tuples in the bucket (as a hash collision leaves them).
        let (x, y) = (web1_tuple(7001), web1_tuple(7002));
        map.set(first, foreign(CLAIM_HELD, x), 0).expect("set");
        map.set(first + 1, foreign(CLAIM_FREED, y), 0).expect("set");
        h.expect(
            h.front,
            &syn(41100).build(),
            XDP_DROP,
            Verdict::DropFnatExhausted,
        );
        // The first slot freed: the flow's claim takes it, beside y's.
        map.set(first, FnatClaim::default(), 0).expect("set");
        let (_, sport) = handshake(&mut h, 41100, SOURCE);
        assert_eq!(sport, 5000);
        let at = |map: &aya::maps::Array<_, FnatClaim>, i| map.get(&i, 0).expect("get");
        assert_eq!(
            (at(&map, first).kind(), at(&map, first).reply),
            (CLAIM_HELD, mine)
        );
        assert_eq!(at(&map, first).forward().sport, 41100u16.to_be());

        // Again with the second slot free and the first taken: the claim
        // goes to the second slot, and the reply's lookup finds it there.
        map.set(first, foreign(CLAIM_HELD, x), 0).expect("set");
        map.set(first + 1, FnatClaim::default(), 0).expect("set");
        let (_, sport) = handshake(&mut h, 41101, SOURCE);
        assert_eq!(sport, 5000);
        assert_eq!(at(&map, first + 1).reply, mine);
        assert_eq!(at(&map, first + 1).forward().sport, 41101u16.to_be());
        assert_eq!(at(&map, first).reply, x, "the other claim untouched");

        // The tuple in quarantine in the second slot (freed this tick),
        // the first free: a new flow may not claim it in the first.
        let now = lb_userspace::dataplane::now_ticks();
        let held = foreign(CLAIM_FREED, mine);
        let held = FnatClaim {
            state: lb_common::fullnat::claim_state(CLAIM_FREED, now),
            ..held
        };
        map.set(first, FnatClaim::default(), 0).expect("set");
        map.set(first + 1, held, 0).expect("set");
        h.expect(
            h.front,
            &syn(41102).build(),
            XDP_DROP,
            Verdict::DropFnatExhausted,
        );
        assert_eq!(
            at(&map, first).kind(),
            lb_common::CLAIM_FREE,
            "not held twice"
        );
        assert_eq!(at(&map, first + 1), held);
    });
}

#[test]
fn a_flows_claim_returns_to_the_pool_when_the_flow_ends() {
    let net = TestNet::new();
    net.run(|| {
        let mut cfg = config(&[SOURCE], (1024, 32767));
        let fnat = cfg.services.iter_mut().find(|s| s.name == "fnat").unwrap();
        fnat.backends = vec![backend("web1", WEBS[0], WEB_PORT)];
        let mut h = Harness::new(&cfg);
        let (_, sport) = handshake(&mut h, 40100, SOURCE);
        assert_eq!(claims(&h).len(), 1);
        // web1 leaves the service (its flows drop): the flow's next packet
        // is dropped and its flow removed, and its claim with it.
        let fnat = cfg.services.iter_mut().find(|s| s.name == "fnat").unwrap();
        fnat.backends = vec![backend("web2", WEBS[1], WEB_PORT)];
        h.dp.apply(&cfg).expect("apply");
        let data = Seg {
            seq: CLIENT_SEQ + 1,
            ack: Some(WEB_SEQ + 1),
            syn: false,
            payload: b"x",
            ..syn(40100)
        };
        h.expect(h.front, &data.build(), XDP_DROP, Verdict::DropBackendGone);
        assert!(claims(&h).is_empty(), "port {sport} returned to the pool");
    });
}

#[test]
fn a_later_fragment_and_icmp_errors_both_ways_follow_the_full_nat_flow() {
    let net = TestNet::new();
    net.run(|| {
        let mut h = Harness::new(&config(&[SOURCE], (1024, 32767)));
        let (web, sport) = handshake(&mut h, 40200, SOURCE);
        // A data segment in two fragments: the first carries the ports, the
        // later ones follow it by FRAGS (only their IP header is translated).
        let data = Seg {
            seq: CLIENT_SEQ + 1,
            ack: Some(WEB_SEQ + 1),
            syn: false,
            payload: &[7; 40],
            ..syn(40200)
        };
        let pieces = fragments(&data.build(), 0x4242, 24);
        assert_eq!(pieces.len(), 3);
        for (i, piece) in pieces.iter().enumerate() {
            let out = h.expect(h.front, piece, XDP_REDIRECT, Verdict::Forwarded);
            if i == 0 {
                continue;
            }
            // Only the IP header changes: both addresses, TTL, checksum.
            let mut want = piece.clone();
            want[..6].copy_from_slice(&WEB_MACS[web]);
            want[6..12].copy_from_slice(&BACK_MAC);
            want[22] = 63;
            want[26..30].copy_from_slice(&SOURCE);
            want[30..34].copy_from_slice(&WEBS[web]);
            fix_ip_checksum(&mut want);
            assert_eq!(out, want, "fragment {i}");
        }

        // web's "port unreachable" about a packet the LB sent it (source →
        // web) goes to the client, as the VIP's, quoting the packet as the
        // client sent it.
        let quoted = Seg {
            macs: (BACK_MAC, WEB_MACS[web]),
            src: (SOURCE, sport),
            dst: (WEBS[web], WEB_PORT),
            ttl: 63,
            ..data
        }
        .build();
        let unreachable = Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port);
        let error = icmp_error(
            (WEB_MACS[web], BACK_MAC),
            WEBS[web],
            SOURCE,
            64,
            unreachable.clone(),
            &quoted[14..],
        );
        let out = h.expect(h.back, &error, XDP_REDIRECT, Verdict::ForwardedIcmp);
        let mut as_client_sent = Seg {
            macs: (CLIENT_MAC, FRONT_MAC),
            ttl: 63,
            ..data
        }
        .build();
        // The quoted TCP checksum is left as quoted (it covers bytes the
        // error does not carry whole; no receiver checks it).
        as_client_sent[50..52].copy_from_slice(&quoted[50..52]);
        let want = icmp_error(
            (FRONT_MAC, CLIENT_MAC),
            VIP,
            CLIENT,
            63,
            unreachable.clone(),
            &as_client_sent[14..],
        );
        assert_eq!(out, want, "the web's error, to the client");

        // The client's error about a reply (VIP → client) goes to the web,
        // from the source address, quoting the reply as the web sent it.
        let reply = Seg {
            macs: (FRONT_MAC, CLIENT_MAC),
            src: (VIP, 80),
            dst: (CLIENT, 40200),
            ttl: 63,
            seq: WEB_SEQ + 1,
            ack: Some(CLIENT_SEQ + 41),
            syn: false,
            fin: false,
            payload: b"hello",
        }
        .build();
        let error = icmp_error(
            (CLIENT_MAC, FRONT_MAC),
            CLIENT,
            VIP,
            64,
            unreachable.clone(),
            &reply[14..],
        );
        let out = h.expect(h.front, &error, XDP_REDIRECT, Verdict::ForwardedIcmp);
        let mut as_web_sent = Seg {
            macs: (WEB_MACS[web], BACK_MAC),
            src: (WEBS[web], WEB_PORT),
            dst: (SOURCE, sport),
            ttl: 63,
            seq: WEB_SEQ + 1,
            ack: Some(CLIENT_SEQ + 41),
            syn: false,
            fin: false,
            payload: b"hello",
        }
        .build();
        as_web_sent[50..52].copy_from_slice(&reply[50..52]);
        let want = icmp_error(
            (BACK_MAC, WEB_MACS[web]),
            SOURCE,
            WEBS[web],
            63,
            unreachable,
            &as_web_sent[14..],
        );
        assert_eq!(out, want, "the client's error, to the web");
    });
}

#[test]
fn the_sweep_removes_a_claim_whose_flow_is_gone_and_keeps_a_live_ones() {
    let net = TestNet::new();
    net.run(|| {
        let mut cfg = config(&[SOURCE], (1024, 32767));
        let fnat = cfg.services.iter_mut().find(|s| s.name == "fnat").unwrap();
        fnat.backends = vec![backend("web1", WEBS[0], WEB_PORT)];
        let mut h = Harness::new(&cfg);
        // An established flow, and a SYN that never completes (its
        // half-open slot expires after tcp-half-open, 30 s).
        let (web, sport) = handshake(&mut h, 40200, SOURCE);
        let (action, out) = h.run(h.front, &syn(40201).build());
        assert_eq!(action, XDP_REDIRECT);
        let half_open_port = sent(&out).2;
        assert_eq!(claims(&h).len(), 2);
        let in_use = |h: &Harness| {
            h.dp.flow_table()
                .expect("flow table")
                .fnat_ports_in_use()
                .expect("ports in use")
        };
        assert_eq!(
            in_use(&h).get(&Ipv4Addr::from(SOURCE)).map(|c| c.in_use),
            Some(2)
        );

        let mut sweeper = h.dp.sweeper().expect("sweeper");
        let now = lb_userspace::dataplane::now_ticks();
        let report = sweeper.sweep(now).expect("sweep");
        assert_eq!(report.claims, 0, "both flows are live: {report:?}");
        assert_eq!(claims(&h).len(), 2);

        // 40 ticks on (~43 s): the half-open flow has expired, the
        // established one (900 s) has not.
        let report = sweeper.sweep(now + 40).expect("sweep");
        assert_eq!(report.claims, 1, "{report:?}");
        let left = claims(&h);
        assert_eq!(left.len(), 1, "{left:?}");
        assert_eq!(
            left[0].0.dport,
            sport.to_be(),
            "the live flow's claim stays"
        );
        assert_ne!(sport, half_open_port);
        assert_eq!(
            in_use(&h).get(&Ipv4Addr::from(SOURCE)).map(|c| c.in_use),
            Some(1)
        );

        // The live flow's reply still finds its flow through its claim.
        let reply = Seg {
            macs: (WEB_MACS[web], BACK_MAC),
            src: (WEBS[web], WEB_PORT),
            dst: (SOURCE, sport),
            ttl: 64,
            seq: WEB_SEQ + 1,
            ack: Some(CLIENT_SEQ + 1),
            syn: false,
            fin: false,
            payload: b"hello",
        };
        h.expect(
            h.back,
            &reply.build(),
            XDP_REDIRECT,
            Verdict::ForwardedReply,
        );
        // A sweep that finds nothing stale removes nothing more.
        let report = sweeper.sweep(now + 41).expect("sweep");
        assert_eq!(report.claims, 0, "{report:?}");
        assert_eq!(claims(&h).len(), 1);
    });
}

/// `config` with one backend (web1), one source address, a one-port
/// range, and a quarantine of `quarantine`.
fn quarantined_config(quarantine: Duration) -> Config {
    let mut cfg = config(&[SOURCE], (5000, 5000));
    cfg.dataplane.full_nat.quarantine = quarantine;
    cfg.services.retain(|s| s.name != "fnat-udp");
    let fnat = cfg
        .services
        .iter_mut()
        .find(|s| s.name == "fnat")
        .expect("the fnat service");
    fnat.backends = vec![backend("web1", WEBS[0], WEB_PORT)];
    cfg
}

/// The full-NAT claims with their state: (reply tuple's source port, host
/// order; the claim).
fn claim_states(h: &Harness) -> Vec<(u16, FnatClaim)> {
    h.dp.fnat_claims()
        .expect("FNAT_CLAIMS")
        .into_iter()
        .map(|c| (u16::from_be(c.reply.dport), c))
        .collect()
}

/// (in use, in quarantine) on the source address, as `lb status` counts.
fn source_counts(h: &Harness) -> (u64, u64) {
    let counts =
        h.dp.flow_table()
            .expect("flow table")
            .fnat_ports_in_use()
            .expect("ports in use");
    counts
        .get(&Ipv4Addr::from(SOURCE))
        .map_or((0, 0), |c| (c.in_use, c.quarantined))
}

/// The quarantine (the rare connect timeout behind two LBs): a port an
/// established flow held is not given out again toward its backend until
/// the quarantine is over (the backend may hold the old connection in
/// TIME_WAIT, and would answer a new SYN on that tuple with an ACK of the
/// old one); then a new flow takes it over.
#[test]
fn a_freed_port_is_not_given_out_again_until_its_quarantine_is_over() {
    let net = TestNet::new();
    net.run(|| {
        let mut cfg = quarantined_config(Duration::from_secs(2));
        let mut h = Harness::new(&cfg);
        assert_eq!(h.dp.fnat_conf().expect("FNAT_CONF").quarantine, 2, "ticks");
        let (_, sport) = handshake(&mut h, 40300, SOURCE);
        assert_eq!(sport, 5000);
        // web1 leaves the service: the flow's next packet ends it in the
        // data plane, and its port goes into quarantine (not back to the
        // pool).
        let fnat = cfg.services.iter_mut().find(|s| s.name == "fnat").unwrap();
        fnat.backends = vec![backend("web2", WEBS[1], WEB_PORT)];
        h.dp.apply(&cfg).expect("apply");
        let data = Seg {
            seq: CLIENT_SEQ + 1,
            ack: Some(WEB_SEQ + 1),
            syn: false,
            payload: b"x",
            ..syn(40300)
        };
        h.expect(h.front, &data.build(), XDP_DROP, Verdict::DropBackendGone);
        let states = claim_states(&h);
        assert_eq!(states.len(), 1, "{states:?}");
        assert_eq!((states[0].0, states[0].1.kind()), (5000, CLAIM_FREED));
        assert_eq!(source_counts(&h), (1, 1), "in use, of which quarantined");
        // A late segment from web1 to the freed port finds no flow: it is
        // not sent on to the client.
        let late = Seg {
            macs: (WEB_MACS[0], BACK_MAC),
            src: (WEBS[0], WEB_PORT),
            dst: (SOURCE, 5000),
            ttl: 64,
            seq: WEB_SEQ + 1,
            ack: Some(CLIENT_SEQ + 2),
            syn: false,
            fin: true,
            payload: b"",
        };
        let (_, out) = h.run(h.back, &late.build());
        assert!(
            !out.starts_with(&CLIENT_MAC),
            "a quarantined port's late segment went to the client"
        );
        // web1 back: a new flow toward it cannot have the only port while
        // it is in quarantine.
        let fnat = cfg.services.iter_mut().find(|s| s.name == "fnat").unwrap();
        fnat.backends = vec![backend("web1", WEBS[0], WEB_PORT)];
        h.dp.apply(&cfg).expect("apply");
        let freed_at = std::time::Instant::now();
        h.expect(
            h.front,
            &syn(40301).build(),
            XDP_DROP,
            Verdict::DropFnatExhausted,
        );
        // Once it is over (2 ticks, ~2.1 s, counted from the tick it was
        // freed in), the next SYN takes the port over.
        let mut taken = None;
        while freed_at.elapsed() < Duration::from_secs(6) {
            std::thread::sleep(Duration::from_millis(250));
            let (action, out) = h.run(h.front, &syn(40302).build());
            if action == XDP_REDIRECT {
                taken = Some((freed_at.elapsed(), sent(&out)));
                break;
            }
        }
        let (after, (web, source, port)) = taken.expect("the port out of quarantine within 6 s");
        assert!(
            after >= Duration::from_secs(1),
            "given out again after {after:?}"
        );
        assert_eq!((web, source, port), (0, SOURCE, 5000));
        let states = claim_states(&h);
        assert_eq!(states.len(), 1, "{states:?}");
        assert_eq!(states[0].1.kind(), CLAIM_HELD);
        assert_eq!(
            states[0].1.forward().sport,
            40302u16.to_be(),
            "the new flow's"
        );
        assert_eq!(source_counts(&h), (1, 0));
    });
}

/// The agent's sweep ends an established full-NAT flow (closed, past
/// tcp-closing): its port goes into quarantine too, and the claim sweep
/// removes it once the quarantine is over. A flow that never got past its
/// half-open slot frees its port at once (the backend holds no connection
/// to wait out): a SYN flood's claims do not sit in quarantine.
#[test]
fn the_sweep_quarantines_a_closed_flows_port_and_frees_it_after() {
    let net = TestNet::new();
    net.run(|| {
        let mut cfg = quarantined_config(Duration::from_secs(60));
        cfg.dataplane.full_nat.port_hi = 5009;
        let mut h = Harness::new(&cfg);
        let (web, sport) = handshake(&mut h, 40400, SOURCE);
        let fin = Seg {
            seq: CLIENT_SEQ + 1,
            ack: Some(WEB_SEQ + 1),
            syn: false,
            fin: true,
            ..syn(40400)
        };
        h.expect(h.front, &fin.build(), XDP_REDIRECT, Verdict::Forwarded);
        // And a SYN that never completes.
        let (action, _) = h.run(h.front, &syn(40401).build());
        assert_eq!(action, XDP_REDIRECT);
        assert_eq!(source_counts(&h), (2, 0));

        let mut sweeper = h.dp.sweeper().expect("sweeper");
        let now = lb_userspace::dataplane::now_ticks();
        // 40 ticks on: the closed flow (tcp-closing 10 s) and the half-open
        // one (30 s) have expired; the established flow's claim is freed
        // into quarantine, the half-open one's removed.
        let report = sweeper.sweep(now + 40).expect("sweep");
        assert_eq!(report.claims, 1, "the half-open flow's: {report:?}");
        let states = claim_states(&h);
        assert_eq!(states.len(), 1, "{states:?}");
        assert_eq!((states[0].0, states[0].1.kind()), (sport, CLAIM_FREED));
        assert_eq!(
            states[0].1.tick(),
            (now + 40) & CLAIM_TICK_MASK,
            "freed at the sweep's tick"
        );
        assert_eq!(source_counts(&h), (1, 1));
        // The web's late FIN to the freed port is not sent on.
        let late = Seg {
            macs: (WEB_MACS[web], BACK_MAC),
            src: (WEBS[web], WEB_PORT),
            dst: (SOURCE, sport),
            ttl: 64,
            seq: WEB_SEQ + 1,
            ack: Some(CLIENT_SEQ + 2),
            syn: false,
            fin: true,
            payload: b"",
        };
        let (_, out) = h.run(h.back, &late.build());
        assert!(!out.starts_with(&CLIENT_MAC), "sent on to the client");
        // Within the quarantine (56 ticks for 60 s) the sweep keeps it;
        // after it, the sweep removes it.
        let report = sweeper.sweep(now + 40 + 56).expect("sweep");
        assert_eq!(
            (report.claims, claim_states(&h).len()),
            (0, 1),
            "{report:?}"
        );
        let report = sweeper.sweep(now + 40 + 57).expect("sweep");
        assert_eq!(report.claims, 1, "{report:?}");
        assert!(claim_states(&h).is_empty());
        assert_eq!(source_counts(&h), (0, 0));
    });
}

/// Every program of the object loads with full NAT's claims in it (the
/// claim is a subprogram called from the allocation loop); prints each
/// one's verified instruction count (`--nocapture`). The programs are
/// this harness's: those that use its `VERDICTS` (so the same test runs on
/// an object without `FNAT_CLAIMS`, for a count before a change).
#[test]
fn every_program_loads_and_reports_its_verified_instruction_count() {
    use lb_common::map_names::MapName;
    let net = TestNet::new();
    net.run(|| {
        let h = Harness::new(&config(&[SOURCE], (1024, 32767)));
        let verdicts =
            h.dp.map_data(MapName::VERDICTS)
                .expect("VERDICTS")
                .info()
                .expect("map info")
                .id();
        let mut counts = Vec::new();
        for info in aya::programs::loaded_programs().filter_map(Result::ok) {
            let maps = info.map_ids().ok().flatten().unwrap_or_default();
            if maps.contains(&verdicts) {
                let name = info.name_as_str().unwrap_or("?").to_owned();
                let count = info.verified_instruction_count().unwrap_or(0);
                println!("{name}: verified_instruction_count = {count}");
                counts.push((name, count));
            }
        }
        for program in ["lb", "lb_setup"] {
            assert!(
                counts.iter().any(|(n, c)| n == program && *c > 0),
                "{program} loaded and counted: {counts:?}"
            );
        }
    });
}
