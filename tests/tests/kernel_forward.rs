//! Kernel tier, forwarding: NAT and DSR frames rewritten byte for byte and
//! their replies restored, exact round robin, frames not for a service
//! passed untouched, every malformed frame's documented verdict, and the
//! fallbacks (a neighbour not resolved, a next hop on the ingress interface).
//!
//! The real `lb` object run with BPF_PROG_TEST_RUN on crafted frames,
//! inside a throwaway network namespace whose routes and (static) neighbour
//! entries give `bpf_fib_lookup` a real next hop (`lb_tests::kernel_net`;
//! the frames several files build are in `lb_tests::kernel_frames`).
//! Expected frames are built independently with etherparse (which computes
//! every checksum from scratch) and compared byte for byte with the output,
//! so a wrong checksum, address, port, TTL or MAC fails the test.
//!
//! Needs root and BPF; without them the tests fail loudly.

use etherparse::TcpOptionElement;
use lb_common::Verdict;
use lb_tests::{
    kernel_frames::{Tcp, WEB_SEQ, answer, icmp_echo, syn_ack_to, web_of},
    kernel_net::{
        BACK_MAC, CLIENT, CLIENT_MAC, FRONT_MAC, HAIRPIN_BACKEND, HAIRPIN_MAC, Harness, LB_FRONT,
        TestNet, VIP, VIP_DSR, VIP_HAIRPIN, VIP_UNRESOLVED, VIP_UNRESOLVED_DSR, WEB_MACS, WEB_PORT,
        WEB_UDP_PORT, WEB_UNRESOLVED, WEBS, fix_ip_checksum, lab_config, udp,
    },
};
use lb_userspace::dataplane::MapName;
use lb_userspace::harness::xdp::{self, XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX};

/// What a fixture expects of the frame the program leaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Output {
    /// Exactly the input frame (every passed frame: the kernel gets it as sent).
    Untouched,
    /// Not looked at (a dropped frame goes nowhere).
    Dropped,
}

/// One frame and what `lb` must do with it (Katran's fixtures style): the
/// malformed-frame and not-for-a-service tests are tables of these.
struct Fixture {
    description: &'static str,
    frame: Vec<u8>,
    action: u32,
    verdict: Verdict,
    output: Output,
}

impl Fixture {
    fn new(description: &'static str, frame: Vec<u8>, action: u32, verdict: Verdict) -> Fixture {
        let output = if action == XDP_PASS {
            Output::Untouched
        } else {
            Output::Dropped
        };
        Fixture {
            description,
            frame,
            action,
            verdict,
            output,
        }
    }
}

/// Runs every fixture on the front interface: the action, exactly its
/// verdict counted, and the output it expects.
fn run_fixtures(h: &mut Harness, fixtures: &[Fixture]) {
    for f in fixtures {
        let out = h.expect_case(f.description, h.front, &f.frame, f.action, f.verdict);
        if f.output == Output::Untouched {
            assert_eq!(out, f.frame, "{}: frame must be untouched", f.description);
        }
    }
}

#[test]
fn nat_syn_is_rewritten_byte_for_byte_and_replies_restored() {
    let net = TestNet::new();
    net.run(|| {
        let mut h = Harness::new(&lab_config());
        let options = [
            TcpOptionElement::MaximumSegmentSize(1460),
            TcpOptionElement::WindowScale(7),
        ];
        let syn = Tcp {
            options: &options,
            payload: b"",
            ..Tcp::request(40000, VIP)
        };
        let out = h.expect(h.front, &syn.build(), XDP_REDIRECT, Verdict::Forwarded);
        answer(&mut h, &out);
        // Every byte: MACs from the FIB, DNAT to web1:8080, TTL 63, TCP
        // options intact, checksums recomputed from scratch by etherparse.
        let want = Tcp {
            src_mac: BACK_MAC,
            dst_mac: WEB_MACS[0],
            dst: WEBS[0],
            dport: WEB_PORT,
            ttl: 63,
            options: &options,
            ..Tcp::request(40000, VIP)
        };
        assert_eq!(out, want.build());

        // The same flow keeps its backend, whatever other flows do.
        h.expect(
            h.front,
            &Tcp::request(40001, VIP).build(),
            XDP_REDIRECT,
            Verdict::Forwarded,
        );
        let data = Tcp {
            syn: false,
            payload: b"GET / HTTP/1.1\r\n\r\n",
            ..Tcp::request(40000, VIP)
        };
        let out = h.expect(h.front, &data.build(), XDP_REDIRECT, Verdict::Forwarded);
        let want = Tcp {
            src_mac: BACK_MAC,
            dst_mac: WEB_MACS[0],
            dst: WEBS[0],
            dport: WEB_PORT,
            ttl: 63,
            ..data
        };
        assert_eq!(out, want.build());

        // web1's reply from :8080 goes back out as VIP:80 → client.
        let reply = Tcp {
            src_mac: WEB_MACS[0],
            dst_mac: BACK_MAC,
            src: WEBS[0],
            dst: CLIENT,
            ttl: 64,
            sport: WEB_PORT,
            dport: 40000,
            seq: WEB_SEQ,
            syn: false,
            options: &[],
            payload: b"HTTP/1.1 200 OK\r\n\r\nweb1\n",
        };
        let out = h.expect(
            h.back,
            &reply.build(),
            XDP_REDIRECT,
            Verdict::ForwardedReply,
        );
        let want = Tcp {
            src_mac: FRONT_MAC,
            dst_mac: CLIENT_MAC,
            src: VIP,
            sport: 80,
            ttl: 63,
            ..reply
        };
        assert_eq!(out, want.build());

        // Per-service and per-backend counters saw the traffic.
        let svc =
            h.dp.counters(MapName::SERVICE_STATS, 0)
                .expect("service counters");
        assert_eq!(svc.packets, 5, "3 forwarded + SYN-ACK and reply");
        let web1 =
            h.dp.counters(MapName::BACKEND_STATS, 0)
                .expect("backend counters");
        assert_eq!(web1.packets, 4);
    });
}

#[test]
fn new_flows_are_spread_round_robin_exactly() {
    let net = TestNet::new();
    net.run(|| {
        let mut h = Harness::new(&lab_config());
        let sequence: Vec<usize> = (0..30)
            .map(|i| {
                let (action, out) = h.run(h.front, &Tcp::request(41000 + i, VIP).build());
                assert_eq!(action, XDP_REDIRECT);
                answer(&mut h, &out);
                web_of(&out)
            })
            .collect();
        let expected: Vec<usize> = (0..30).map(|i| i % 3).collect();
        assert_eq!(sequence, expected);
        // Replaying the same 30 flows sends each to the backend it got first.
        for i in 0..30u16 {
            let (_, out) = h.run(
                h.front,
                &Tcp {
                    syn: false,
                    ..Tcp::request(41000 + i, VIP)
                }
                .build(),
            );
            assert_eq!(web_of(&out), i as usize % 3, "flow {i}");
        }
    });
}

#[test]
fn udp_nat_keeps_zero_checksum_and_restores_replies() {
    let net = TestNet::new();
    net.run(|| {
        let mut h = Harness::new(&lab_config());
        let req = udp(CLIENT_MAC, FRONT_MAC, CLIENT, VIP, 64, 5000, 5353, b"ping");
        let out = h.expect(h.front, &req, XDP_REDIRECT, Verdict::Forwarded);
        assert_eq!(
            out,
            udp(
                BACK_MAC,
                WEB_MACS[0],
                CLIENT,
                WEBS[0],
                63,
                5000,
                WEB_UDP_PORT,
                b"ping"
            )
        );

        // A datagram without checksum (0) keeps it 0 after the rewrite.
        let mut bare = udp(
            CLIENT_MAC, FRONT_MAC, CLIENT, VIP, 64, 5001, 5353, b"no-csum",
        );
        bare[40..42].copy_from_slice(&[0, 0]);
        let out = h.expect(h.front, &bare, XDP_REDIRECT, Verdict::Forwarded);
        let mut want = udp(
            BACK_MAC,
            WEB_MACS[1],
            CLIENT,
            WEBS[1],
            63,
            5001,
            WEB_UDP_PORT,
            b"no-csum",
        );
        want[40..42].copy_from_slice(&[0, 0]);
        assert_eq!(out, want);

        let reply = udp(
            WEB_MACS[0],
            BACK_MAC,
            WEBS[0],
            CLIENT,
            64,
            WEB_UDP_PORT,
            5000,
            b"web1 ping",
        );
        let out = h.expect(h.back, &reply, XDP_REDIRECT, Verdict::ForwardedReply);
        assert_eq!(
            out,
            udp(
                FRONT_MAC,
                CLIENT_MAC,
                VIP,
                CLIENT,
                63,
                5353,
                5000,
                b"web1 ping"
            )
        );
    });
}

#[test]
fn dsr_changes_only_the_destination_mac() {
    let net = TestNet::new();
    net.run(|| {
        let mut h = Harness::new(&lab_config());
        for i in 0..6u16 {
            let syn = Tcp::request(42000 + i, VIP_DSR);
            let out = h.expect(h.front, &syn.build(), XDP_REDIRECT, Verdict::Forwarded);
            // IP and TCP untouched (no TTL change, VIP stays the destination);
            // Ethernet: backend MAC as destination, the LB's back MAC as source.
            let want = Tcp {
                src_mac: BACK_MAC,
                dst_mac: WEB_MACS[i as usize % 3],
                ..syn
            };
            assert_eq!(out, want.build(), "flow {i}");
        }
        // No reverse state is created in DSR: a "reply" is not ours.
        let reply = Tcp {
            src_mac: WEB_MACS[0],
            dst_mac: BACK_MAC,
            src: VIP_DSR,
            dst: CLIENT,
            sport: 80,
            dport: 42000,
            ..Tcp::request(0, CLIENT)
        };
        let frame = reply.build();
        let out = h.expect(h.back, &frame, XDP_PASS, Verdict::PassNotOurs);
        assert_eq!(out, frame);
    });
}

#[test]
fn non_service_traffic_is_passed_untouched() {
    let net = TestNet::new();
    net.run(|| {
        let mut h = Harness::new(&lab_config());
        let pass =
            |description, frame, verdict| Fixture::new(description, frame, XDP_PASS, verdict);
        let fixtures = [
            pass(
                "ssh to the LB itself",
                Tcp {
                    dport: 22,
                    ..Tcp::request(43000, LB_FRONT)
                }
                .build(),
                Verdict::PassNotOurs,
            ),
            pass(
                "VIP, port without a service",
                Tcp {
                    dport: 22,
                    ..Tcp::request(43001, VIP)
                }
                .build(),
                Verdict::PassNoService,
            ),
            pass(
                "UDP to the VIP's TCP port",
                udp(CLIENT_MAC, FRONT_MAC, CLIENT, VIP, 64, 43002, 80, b"x"),
                Verdict::PassNoService,
            ),
            pass("ARP", arp_request(), Verdict::PassNotOurs),
            pass(
                "ICMP echo to the VIP",
                icmp_echo(VIP),
                Verdict::PassOtherProtocol,
            ),
            pass(
                "ICMP echo to the LB",
                icmp_echo(LB_FRONT),
                Verdict::PassNotOurs,
            ),
            pass(
                "TTL 1 to a NAT service",
                Tcp {
                    ttl: 1,
                    ..Tcp::request(43003, VIP)
                }
                .build(),
                Verdict::PassKernelForward,
            ),
        ];
        run_fixtures(&mut h, &fixtures);
    });
}

#[test]
fn unresolved_neighbour_falls_back_to_the_kernel() {
    let net = TestNet::new();
    net.run(|| {
        let mut h = Harness::new(&lab_config());
        // NAT: rewritten, then passed so the kernel forwards it (resolving the
        // neighbour); TTL is left for the kernel to decrement.
        let syn = Tcp::request(44000, VIP_UNRESOLVED);
        let out = h.expect(h.front, &syn.build(), XDP_PASS, Verdict::PassKernelForward);
        let want = Tcp {
            dst: WEB_UNRESOLVED,
            dport: 8080,
            ..Tcp::request(44000, VIP_UNRESOLVED)
        };
        assert_eq!(out, want.build());
        // DSR: cannot rewrite a MAC it does not know; passed unchanged.
        let frame = Tcp::request(44001, VIP_UNRESOLVED_DSR).build();
        let out = h.expect(h.front, &frame, XDP_PASS, Verdict::PassKernelForward);
        assert_eq!(out, frame);
        // A NAT reply to a client without a neighbour entry (issue 20 item
        // 3): the LB's kernel would drop it as a martian (the VIP as its
        // source), so it is dropped, and the client reported for the agent
        // to resolve, as the backend was.
        let stranger = [198, 18, 0, 77];
        let syn = Tcp {
            src: stranger,
            ..Tcp::request(44002, VIP)
        };
        let out = h.expect(h.front, &syn.build(), XDP_REDIRECT, Verdict::Forwarded);
        let back = h.back;
        h.expect(back, &syn_ack_to(&out), XDP_DROP, Verdict::DropNoNeighbour);
        let mut requests = h.dp.neighbour_requests().expect("NEIGH_WANTED");
        let mut wanted = requests.drain();
        wanted.sort();
        let want = |iface: &str, addr: [u8; 4]| {
            (
                xdp::ifindex(iface).expect("ifindex"),
                std::net::IpAddr::from(addr),
            )
        };
        let mut expected = vec![want("b0", WEB_UNRESOLVED), want("f0", stranger)];
        expected.sort();
        assert_eq!(wanted, expected);
        assert_eq!(requests.drain(), vec![], "drained");
    });
}

fn arp_request() -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&CLIENT);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&VIP);
    f
}

#[test]
fn malformed_frames_get_their_documented_verdict() {
    let net = TestNet::new();
    net.run(|| {
        let mut h = Harness::new(&lab_config());
        let syn = Tcp::request(45000, VIP).build();

        // (Frames shorter than an Ethernet header cannot be fed in: the
        // kernel's BPF_PROG_TEST_RUN rejects them with EINVAL.)
        let truncated = syn[..30].to_vec();

        let mut options = syn[..34].to_vec();
        options[14] = 0x46; // IHL 6: one word of options
        options.extend_from_slice(&[1, 1, 1, 0]); // NOP NOP NOP EOL
        options.extend_from_slice(&syn[34..]);
        let tot = (options.len() - 14) as u16;
        options[16..18].copy_from_slice(&tot.to_be_bytes());
        fix_ip_checksum(&mut options);

        let mut later_fragment = syn.clone();
        later_fragment[20..22].copy_from_slice(&0x0010u16.to_be_bytes()); // offset 128
        fix_ip_checksum(&mut later_fragment);

        let mut short_ihl = syn.clone();
        short_ihl[14] = 0x44;

        let mut long_total = syn.clone();
        long_total[16..18].copy_from_slice(&1500u16.to_be_bytes());
        fix_ip_checksum(&mut long_total);

        let mut cut_tcp = syn[..14 + 20 + 10].to_vec();
        cut_tcp[16..18].copy_from_slice(&30u16.to_be_bytes());
        fix_ip_checksum(&mut cut_tcp);

        let mut not_ipv4 = syn.clone();
        not_ipv4[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());

        let fixtures = [
            Fixture::new(
                "truncated IPv4 header",
                truncated,
                XDP_PASS,
                Verdict::PassTruncated,
            ),
            Fixture::new("IPv4 options", options, XDP_DROP, Verdict::DropIpOptions),
            // (A first fragment carries the ports and follows its flow:
            // kernel_frag.rs.)
            Fixture::new(
                "non-first fragment without its first",
                later_fragment,
                XDP_DROP,
                Verdict::DropFragment,
            ),
            Fixture::new("IHL below 5", short_ihl, XDP_DROP, Verdict::DropMalformed),
            Fixture::new(
                "total length beyond the frame",
                long_total,
                XDP_DROP,
                Verdict::DropMalformed,
            ),
            Fixture::new(
                "TCP header cut short",
                cut_tcp,
                XDP_DROP,
                Verdict::DropTruncatedL4,
            ),
            Fixture::new("IPv6 EtherType", not_ipv4, XDP_PASS, Verdict::PassNotOurs),
        ];
        run_fixtures(&mut h, &fixtures);
        // None of them created a flow: the next SYN still goes to web1.
        let (_, out) = h.run(h.front, &Tcp::request(45999, VIP).build());
        assert_eq!(web_of(&out), 0);
    });
}

#[test]
fn next_hop_on_the_ingress_interface_uses_xdp_tx() {
    let net = TestNet::new();
    net.run(|| {
        let mut h = Harness::new(&lab_config());
        let syn = Tcp::request(47000, VIP_HAIRPIN);
        let out = h.expect(h.front, &syn.build(), XDP_TX, Verdict::Forwarded);
        let want = Tcp {
            src_mac: FRONT_MAC,
            dst_mac: HAIRPIN_MAC,
            dst: HAIRPIN_BACKEND,
            ttl: 63,
            ..Tcp::request(47000, VIP_HAIRPIN)
        };
        assert_eq!(out, want.build());
    });
}
