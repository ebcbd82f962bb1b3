//! Kernel tier, drop tracing: events only while switched on, exactly one
//! per packet not forwarded and none for forwarded packets, lost events
//! counted; and its cost per packet (an ignored test, run by hand).
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

use lb_common::{TraceEvent, Verdict};
use lb_tests::{
    kernel_frames::{Tcp, answer, icmp_echo},
    kernel_net::{
        BACK_MAC, CLIENT, CLIENT_MAC, FRONT_MAC, Harness, LB_FRONT, TestNet, VIP, VIP_DSR,
        WEB_MACS, WEB_PORT, WEBS, fix_ip_checksum, lab_config, ns_per_packet, test_run, udp,
    },
};
use lb_userspace::{
    dataplane::Dataplane,
    harness::xdp::{self, XDP_DROP, XDP_PASS, XDP_REDIRECT},
    trace::Event,
};

/// The events of IPv4's programs (the test's frames are all IPv4).
fn v4(events: Vec<Event>) -> Vec<TraceEvent> {
    events
        .into_iter()
        .map(|e| match e {
            Event::V4(e) => e,
            Event::V6(e) => panic!("an IPv6 event for an IPv4 frame: {e:?}"),
        })
        .collect()
}

/// BPF_PROG_TEST_RUN of `lb` on `frame`, `repeat` times in one call.
fn test_run_repeat(dp: &mut Dataplane, ifindex: u32, frame: &[u8], repeat: u32) -> u32 {
    let prog = dp.program().expect("program");
    xdp::test_run(prog, ifindex, frame, repeat, false)
        .expect("BPF_PROG_TEST_RUN")
        .action
}

/// A SYN to the www VIP with its TCP header cut short: dropped, ports
/// readable.
fn cut_syn(sport: u16) -> Vec<u8> {
    let mut frame = Tcp::request(sport, VIP).build()[..14 + 20 + 10].to_vec();
    frame[16..18].copy_from_slice(&30u16.to_be_bytes());
    fix_ip_checksum(&mut frame);
    frame
}

#[test]
fn drop_tracing_reports_what_is_not_forwarded_only_while_switched_on() {
    use lb_common::{TRACE_DEFAULT_VERDICTS, TRACE_NO_SERVICE};
    use lb_userspace::trace::Tracer;
    let net = TestNet::new();
    net.run(|| {
        let cfg = lab_config();
        let mut h = Harness::new(&cfg);
        let www = h.dp.apply(&cfg).expect("re-apply")[0].id;
        let mut tracer = Tracer::of(&h.dp).expect("trace maps");
        assert_eq!(tracer.conf().expect("conf").verdicts, 0, "off by default");
        let no_service = udp(CLIENT_MAC, FRONT_MAC, CLIENT, VIP, 64, 43100, 9, b"x");

        // Off: malformed and passed packets count, and send nothing.
        h.expect(h.front, &cut_syn(43101), XDP_DROP, Verdict::DropTruncatedL4);
        h.expect(h.front, &no_service, XDP_PASS, Verdict::PassNoService);
        assert_eq!(tracer.drain(), vec![], "no events while tracing is off");

        // On: exactly one event per packet not forwarded, with its tuple.
        tracer.start(TRACE_DEFAULT_VERDICTS).expect("start");
        h.expect(h.front, &no_service, XDP_PASS, Verdict::PassNoService);
        let events = v4(tracer.drain());
        assert_eq!(events.len(), 1, "{events:?}");
        let ev = events[0];
        assert_eq!(ev.verdict, Verdict::PassNoService as u32);
        assert_eq!(
            (ev.saddr, ev.daddr, ev.sport, ev.dport, ev.protocol),
            (
                u32::from_ne_bytes(CLIENT),
                u32::from_ne_bytes(VIP),
                43100u16.to_be(),
                9u16.to_be(),
                17
            )
        );
        assert_eq!(ev.service_id, TRACE_NO_SERVICE);
        assert_eq!((ev.ifindex, ev.len), (h.front, no_service.len() as u32));
        assert_eq!(
            lb_userspace::trace::render(&ev),
            format!(
                "pass_no_service 198.18.0.2:43100 → 198.18.0.10:9/udp service none if {} len {}",
                h.front,
                no_service.len()
            )
        );
        // A drop on a service's port names the service.
        h.expect(h.front, &cut_syn(43102), XDP_DROP, Verdict::DropTruncatedL4);
        let events = v4(tracer.drain());
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(events[0].verdict, Verdict::DropTruncatedL4 as u32);
        assert_eq!(events[0].service_id, www);
        assert_eq!(events[0].sport, 43102u16.to_be());
        // Ping to the VIP: no ports, no service.
        h.expect(
            h.front,
            &icmp_echo(VIP),
            XDP_PASS,
            Verdict::PassOtherProtocol,
        );
        let events = v4(tracer.drain());
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(
            (events[0].verdict, events[0].protocol, events[0].dport),
            (Verdict::PassOtherProtocol as u32, 1, 0)
        );

        // Forwarded packets never produce events: new flow, established,
        // NAT reply.
        let syn = Tcp::request(43103, VIP);
        let out = h.expect(h.front, &syn.build(), XDP_REDIRECT, Verdict::Forwarded);
        answer(&mut h, &out);
        let data = Tcp {
            syn: false,
            ..Tcp::request(43103, VIP)
        };
        h.expect(h.front, &data.build(), XDP_REDIRECT, Verdict::Forwarded);
        let reply = Tcp {
            src_mac: WEB_MACS[0],
            dst_mac: BACK_MAC,
            src: WEBS[0],
            dst: CLIENT,
            sport: WEB_PORT,
            dport: 43103,
            syn: false,
            ..Tcp::request(43103, VIP)
        };
        h.expect(
            h.back,
            &reply.build(),
            XDP_REDIRECT,
            Verdict::ForwardedReply,
        );
        // The host's own traffic is left out by default ...
        let ssh = Tcp {
            dport: 22,
            ..Tcp::request(43104, LB_FRONT)
        };
        h.expect(h.front, &ssh.build(), XDP_PASS, Verdict::PassNotOurs);
        assert_eq!(
            tracer.drain(),
            vec![],
            "forwarded and pass_not_ours: no events"
        );
        // ... and traced when asked for; forwarded bits are ignored.
        tracer
            .start(Verdict::PassNotOurs.trace_bit() | Verdict::Forwarded.trace_bit())
            .expect("start");
        h.expect(h.front, &ssh.build(), XDP_PASS, Verdict::PassNotOurs);
        h.expect(h.front, &data.build(), XDP_REDIRECT, Verdict::Forwarded);
        let events = v4(tracer.drain());
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(events[0].verdict, Verdict::PassNotOurs as u32);

        // A full ring buffer loses events and counts them.
        tracer.start(TRACE_DEFAULT_VERDICTS).expect("start");
        let capacity = (lb_common::TRACE_RING_BYTES as usize) / (8 + 32);
        assert_eq!(
            test_run_repeat(&mut h.dp, h.front, &no_service, capacity as u32 + 100),
            XDP_PASS
        );
        let lost = tracer.conf().expect("conf").lost;
        let kept = tracer.drain().len();
        assert!(lost >= 100, "lost {lost}, kept {kept}");
        assert_eq!(kept as u64 + lost, capacity as u64 + 100);

        // Off again: nothing.
        assert_eq!(tracer.stop().expect("stop"), lost);
        assert_eq!(tracer.conf().expect("conf"), Default::default());
        h.expect(h.front, &no_service, XDP_PASS, Verdict::PassNoService);
        assert_eq!(tracer.drain(), vec![]);
    });
}

/// IPv6's programs trace with IPv6 tuples: a UDP datagram to a VIP6 port
/// without a service, a SYN cut short on `www6`'s port, a SYN from a
/// denied IPv6 prefix, a later fragment whose first was never seen (in
/// `lb_v6_portless`): one `TraceEvent6` each, with the frame's 16-byte
/// addresses, ports, next header and service id; NAT66 packets that are
/// forwarded (a new flow, its handshake, the reply) give none; the verdict
/// filter holds (only the asked-for verdict is traced).
#[test]
fn ipv6_drops_are_traced_with_their_ipv6_tuples_and_forwarded_ipv6_is_not() {
    use lb_common::{TRACE_DEFAULT_VERDICTS, TRACE_NO_SERVICE, ipv6::addr_of, maps6::TraceEvent6};
    use lb_tests::kernel_net6::{
        CLIENT_V6, Seg, VIP_NAT6, config_v6, dual_stack_net, tcp6, udp6, web_of6, web6,
    };
    use lb_userspace::trace::{Tracer, render};
    let net = dual_stack_net();
    net.run(|| {
        let mut cfg = config_v6();
        cfg.firewall.deny6 =
            vec![lb_userspace::config::Prefix6::parse("2001:db8:66::/48").expect("IPv6 prefix")];
        let mut h = Harness::new(&cfg);
        let applied = h.dp.apply(&cfg).expect("re-apply");
        let www6 = applied.iter().find(|s| s.name == "www6").expect("www6").id;
        let mut tracer = Tracer::of(&h.dp).expect("trace maps");
        tracer.start(TRACE_DEFAULT_VERDICTS).expect("start");
        let one = |tracer: &mut Tracer| -> TraceEvent6 {
            let events = tracer.drain();
            assert_eq!(events.len(), 1, "{events:?}");
            match events[0] {
                Event::V6(e) => e,
                Event::V4(e) => panic!("an IPv4 event for an IPv6 frame: {e:?}"),
            }
        };
        let denied: [u8; 16] = "2001:db8:66::5"
            .parse::<std::net::Ipv6Addr>()
            .expect("ip")
            .octets();
        let macs = (CLIENT_MAC, FRONT_MAC);

        // No service on the port: the tuple, no service.
        let no_service = udp6(macs, (CLIENT_V6, 41234), (VIP_NAT6, 9), 64, b"x");
        h.expect(h.front, &no_service, XDP_PASS, Verdict::PassNoService);
        let ev = one(&mut tracer);
        assert_eq!(
            (
                ev.verdict,
                ev.saddr,
                ev.daddr,
                ev.sport,
                ev.dport,
                ev.protocol
            ),
            (
                Verdict::PassNoService as u32,
                addr_of(CLIENT_V6),
                addr_of(VIP_NAT6),
                41234u16.to_be(),
                9u16.to_be(),
                17
            )
        );
        assert_eq!(ev.service_id, TRACE_NO_SERVICE);
        assert_eq!((ev.ifindex, ev.len), (h.front, no_service.len() as u32));
        assert_eq!(
            render(&ev),
            format!(
                "pass_no_service [2001:db8:18::2]:41234 → [2001:db8:18::10]:9/udp service none \
                 if {} len {}",
                h.front,
                no_service.len()
            )
        );

        // A SYN to www6 whose TCP header is cut short: www6 named.
        let mut cut = tcp6(
            macs,
            (CLIENT_V6, 41235),
            (VIP_NAT6, 80),
            64,
            Seg::Syn(1),
            b"",
        );
        cut.truncate(14 + 40 + 10);
        cut[18..20].copy_from_slice(&10u16.to_be_bytes());
        h.expect(h.front, &cut, XDP_DROP, Verdict::DropTruncatedL4);
        let ev = one(&mut tracer);
        assert_eq!(
            (ev.verdict, ev.service_id, ev.sport, ev.dport, ev.protocol),
            (
                Verdict::DropTruncatedL4 as u32,
                www6,
                41235u16.to_be(),
                80u16.to_be(),
                6
            )
        );

        // A new flow from a denied IPv6 prefix.
        let syn = tcp6(macs, (denied, 41236), (VIP_NAT6, 80), 64, Seg::Syn(1), b"");
        h.expect(h.front, &syn, XDP_DROP, Verdict::DropFirewallDeny);
        let ev = one(&mut tracer);
        assert_eq!(
            (ev.verdict, ev.saddr, ev.daddr, ev.service_id),
            (
                Verdict::DropFirewallDeny as u32,
                addr_of(denied),
                addr_of(VIP_NAT6),
                www6
            )
        );
        assert!(
            render(&ev).starts_with(
                "drop_firewall_deny [2001:db8:66::5]:41236 → [2001:db8:18::10]:80/tcp service"
            ),
            "{}",
            render(&ev)
        );

        // A later fragment no first fragment announced (`lb_v6_portless`):
        // the fragment header's type, no ports.
        let mut frag = no_service[..14 + 40].to_vec();
        frag[20] = 44; // next header: fragment
        frag.extend([17, 0]);
        frag.extend(((8u16 << 3) | 1).to_be_bytes());
        frag.extend(0x0102_0304u32.to_be_bytes());
        frag.extend([0u8; 16]);
        let payload = (frag.len() - 14 - 40) as u16;
        frag[18..20].copy_from_slice(&payload.to_be_bytes());
        h.expect(h.front, &frag, XDP_DROP, Verdict::DropFragment);
        let ev = one(&mut tracer);
        assert_eq!(
            (ev.verdict, ev.protocol, ev.sport, ev.dport, ev.service_id),
            (Verdict::DropFragment as u32, 44, 0, 0, TRACE_NO_SERVICE)
        );
        assert_eq!(ev.saddr, addr_of(CLIENT_V6));
        assert!(render(&ev).contains("/ipv6-frag"), "{}", render(&ev));

        // Forwarded IPv6 packets never produce events: a NAT66 flow's SYN,
        // the web's SYN-ACK (a reply), the client's ACK.
        let syn = tcp6(
            macs,
            (CLIENT_V6, 41237),
            (VIP_NAT6, 80),
            64,
            Seg::Syn(100),
            b"",
        );
        let out = h.expect(h.front, &syn, XDP_REDIRECT, Verdict::Forwarded);
        let web = web_of6(&out);
        let syn_ack = tcp6(
            (WEB_MACS[web], BACK_MAC),
            (web6(web), WEB_PORT),
            (CLIENT_V6, 41237),
            64,
            Seg::SynAck(500, 101),
            b"",
        );
        h.expect(h.back, &syn_ack, XDP_REDIRECT, Verdict::ForwardedReply);
        let ack = tcp6(
            macs,
            (CLIENT_V6, 41237),
            (VIP_NAT6, 80),
            64,
            Seg::Ack(101, 501),
            b"",
        );
        h.expect(h.front, &ack, XDP_REDIRECT, Verdict::Forwarded);
        assert_eq!(tracer.drain(), vec![], "forwarded IPv6: no events");

        // The verdict filter: only drop_fragment asked for.
        tracer
            .start(Verdict::DropFragment.trace_bit())
            .expect("start");
        h.expect(h.front, &no_service, XDP_PASS, Verdict::PassNoService);
        h.expect(h.front, &frag, XDP_DROP, Verdict::DropFragment);
        assert_eq!(one(&mut tracer).verdict, Verdict::DropFragment as u32);
        tracer.stop().expect("stop");
    });
}

/// The cost of drop tracing, off and on, against the object without it
/// (`LB_BASE_OBJECT`, e.g. built from the commit before). Not a check: a
/// measurement, run by hand:
/// `LB_BASE_OBJECT=/tmp/base.o cargo xtask test --test kernel_trace -- --ignored trace_cost --nocapture`
/// The cases take turns, round after round, so a busy neighbour slows them
/// all alike; each prints the median over the rounds.
#[test]
#[ignore = "a measurement, run by hand"]
fn trace_cost_ns_per_packet() {
    use lb_common::TRACE_DEFAULT_VERDICTS;
    use lb_userspace::trace::Tracer;
    const REPEAT: u32 = 1_000_000;
    /// Events that fit the 256 KiB ring (40 bytes each with the header;
    /// IPv6's 64).
    const FITS: u32 = 6000;
    const FITS6: u32 = 3500;
    const ROUNDS: usize = 15;
    let base = std::env::var_os("LB_BASE_OBJECT").map(|p| std::fs::read(p).expect("read base"));
    let net = lb_tests::kernel_net6::dual_stack_net();
    net.run(|| {
        use lb_tests::kernel_net6::{CLIENT_V6, VIP_NAT6, config_v6, udp6};
        let cfg = config_v6();
        let mut h = Harness::new(&cfg);
        let no_service6 = udp6(
            (CLIENT_MAC, FRONT_MAC),
            (CLIENT_V6, 49002),
            (VIP_NAT6, 9),
            64,
            b"x",
        );
        let dsr_syn = Tcp::request(49000, VIP_DSR);
        let dsr_ack = Tcp {
            syn: false,
            payload: b"GET / HTTP/1.1\r\n\r\n",
            ..Tcp::request(49000, VIP_DSR)
        }
        .build();
        let no_service = udp(CLIENT_MAC, FRONT_MAC, CLIENT, VIP, 64, 49001, 9, b"x");
        h.expect(h.front, &dsr_syn.build(), XDP_REDIRECT, Verdict::Forwarded);
        h.expect(h.front, &dsr_ack, XDP_REDIRECT, Verdict::Forwarded);
        let mut base_dp = base.map(|object| {
            let mut dp = Dataplane::load_object(&object, 65536).expect("load base");
            dp.apply(&cfg).expect("apply base");
            assert_eq!(test_run(&mut dp, h.front, &dsr_syn.build()).0, XDP_REDIRECT);
            dp
        });
        let front = h.front;
        let mut tracer = Tracer::of(&h.dp).expect("trace maps");
        let cases = [
            "established DSR, base object (no tracing)",
            "established DSR, tracing off",
            "established DSR, tracing on",
            "pass_no_service, base object (no tracing)",
            "pass_no_service, tracing off",
            "pass_no_service, tracing on, event written (repeat 6000)",
            "pass_no_service, tracing on, ring full (event lost)",
            "IPv6 pass_no_service, base object (no tracing)",
            "IPv6 pass_no_service, tracing off",
            "IPv6 pass_no_service, tracing on, event written (repeat 3500)",
        ];
        let mut samples = vec![Vec::new(); cases.len()];
        for _ in 0..ROUNDS {
            if let Some(dp) = base_dp.as_mut() {
                samples[0].push(ns_per_packet(dp, front, &dsr_ack, REPEAT));
                samples[3].push(ns_per_packet(dp, front, &no_service, REPEAT));
                samples[7].push(ns_per_packet(dp, front, &no_service6, REPEAT));
            }
            tracer.stop().expect("off");
            samples[1].push(ns_per_packet(&mut h.dp, front, &dsr_ack, REPEAT));
            samples[4].push(ns_per_packet(&mut h.dp, front, &no_service, REPEAT));
            samples[8].push(ns_per_packet(&mut h.dp, front, &no_service6, REPEAT));
            tracer.start(TRACE_DEFAULT_VERDICTS).expect("on");
            samples[2].push(ns_per_packet(&mut h.dp, front, &dsr_ack, REPEAT));
            tracer.drain();
            samples[5].push(ns_per_packet(&mut h.dp, front, &no_service, FITS));
            samples[6].push(ns_per_packet(&mut h.dp, front, &no_service, REPEAT));
            tracer.drain();
            samples[9].push(ns_per_packet(&mut h.dp, front, &no_service6, FITS6));
            tracer.drain();
        }
        tracer.stop().expect("off");
        for (what, mut s) in cases.iter().zip(samples) {
            if s.is_empty() {
                continue;
            }
            s.sort_by(f64::total_cmp);
            eprintln!(
                "{what:<58} median {:>5.1} ns  (min {:.0}, max {:.0}, {} rounds)",
                s[s.len() / 2],
                s[0],
                s[s.len() - 1],
                s.len()
            );
        }
    });
}
