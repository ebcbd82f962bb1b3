//! Kernel tier, the flow lifecycle (issue 11, issue 20): half-open and
//! established tables, promotion only by a real handshake (NAT and DSR),
//! blind and in-window RSTs, closing and timeouts, a SYN flood into a full
//! half-open table, bucket replacement and the sweep, the new-flow budget.
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

use lb_common::Verdict;
use lb_tests::{
    kernel_frames::{
        ACK, CLIENT_SEQ, FIN_ACK, RST, SYN_ACK, Tcp, WEB_SEQ, answer, from_web, web_of, with_flags,
    },
    kernel_net::{
        BACK_MAC, CLIENT, CLIENT_MAC, FRONT_MAC, Harness, TestNet, VIP, VIP_DSR, WEB_MACS,
        WEB_PORT, WEBS, lab_config, udp, verdict_delta,
    },
};
use lb_userspace::{
    config::{Config, Forwarding, Scheduler},
    harness::xdp::{self, XDP_DROP, XDP_PASS, XDP_REDIRECT},
};

/// A client's TCP connection to the VIP, port 80: SYN, the web's SYN-ACK,
/// then the client's ACK that establishes it. Returns the web server it
/// went to.
fn open(h: &mut Harness, port: u16) -> usize {
    let syn = Tcp::request(port, VIP).build();
    let web = web_of(&h.expect(h.front, &syn, XDP_REDIRECT, Verdict::Forwarded));
    let back = h.back;
    h.expect(
        back,
        &from_web(web, port, SYN_ACK),
        XDP_REDIRECT,
        Verdict::ForwardedReply,
    );
    h.expect(
        h.front,
        &client_ack(port, VIP),
        XDP_REDIRECT,
        Verdict::Forwarded,
    );
    web
}

/// A client's bare ACK on its connection to `vip`:80 from `port`.
fn client_ack(port: u16, vip: [u8; 4]) -> Vec<u8> {
    with_flags(
        Tcp {
            syn: false,
            ..Tcp::request(port, vip)
        }
        .build(),
        ACK,
    )
}

/// The client → VIP key of a lab client's TCP flow.
fn client_key(sport: u16, vip: [u8; 4]) -> lb_common::FlowKey {
    lb_common::FlowKey {
        saddr: u32::from_ne_bytes(CLIENT),
        daddr: u32::from_ne_bytes(vip),
        sport: sport.to_be(),
        dport: 80u16.to_be(),
        protocol: 6,
        ..Default::default()
    }
}

/// web1's reply to the client's port `dport` (NAT service www).
fn reply_from_web1(dport: u16, flags: u8) -> Vec<u8> {
    from_web(0, dport, flags)
}

/// Where a flow is: `Some(true)` established, `Some(false)` half-open.
fn table_of(h: &Harness, key: &lb_common::FlowKey) -> Option<bool> {
    let table = h.dp.flow_table().expect("flow table");
    table.lookup(key).expect("lookup").map(|(est, _)| est)
}

/// The state of the flow `key` (either table), if there is one.
fn state_of(h: &Harness, key: &lb_common::FlowKey) -> Option<u32> {
    let table = h.dp.flow_table().expect("flow table");
    table.lookup(key).expect("lookup").map(|(_, f)| f.state)
}

/// Entries in the established and the half-open table.
fn entries(h: &Harness) -> (u64, u64) {
    h.dp.flow_table()
        .expect("flow table")
        .entries()
        .expect("entries")
}

fn active(h: &Harness, backend_id: u32) -> u64 {
    h.dp.flow_table()
        .expect("flow table")
        .active(backend_id)
        .expect("active")
}

/// The id of web1 in service www (the first backend the lab config applies).
fn web1_id(h: &mut Harness, cfg: &Config) -> u32 {
    let applied = h.dp.apply(cfg).expect("apply");
    applied[0].backends[0].1
}

#[test]
fn a_syn_opens_a_half_open_flow_and_the_clients_ack_establishes_it() {
    let net = TestNet::new();
    net.run(|| {
        let cfg = lab_config();
        let mut h = Harness::new(&cfg);
        let web1 = web1_id(&mut h, &cfg);
        let key = client_key(52000, VIP);
        h.expect(
            h.front,
            &Tcp::request(52000, VIP).build(),
            XDP_REDIRECT,
            Verdict::Forwarded,
        );
        assert_eq!(
            entries(&h),
            (0, 1),
            "one half-open slot: the reply finds the flow by the client's address and port"
        );
        assert_eq!(table_of(&h, &key), Some(false));
        assert_eq!(active(&h, web1), 0, "a half-open flow is not active");
        // The backend's SYN-ACK is translated from the half-open table and
        // does not promote the flow: only the client can.
        let back = h.back;
        h.expect(
            back,
            &reply_from_web1(52000, 0x12),
            XDP_REDIRECT,
            Verdict::ForwardedReply,
        );
        assert_eq!(table_of(&h, &key), Some(false));
        // A retransmitted SYN neither promotes nor moves it.
        let out = h.expect(
            h.front,
            &Tcp::request(52000, VIP).build(),
            XDP_REDIRECT,
            Verdict::Forwarded,
        );
        assert_eq!(web_of(&out), 0);
        let ack = client_ack(52000, VIP);
        let out = h.expect(h.front, &ack, XDP_REDIRECT, Verdict::Forwarded);
        assert_eq!(web_of(&out), 0);
        assert_eq!(entries(&h), (2, 0), "promoted, both entries");
        assert_eq!(table_of(&h, &key), Some(true));
        assert_eq!(active(&h, web1), 1);
        h.expect(
            back,
            &reply_from_web1(52000, ACK),
            XDP_REDIRECT,
            Verdict::ForwardedReply,
        );
        // UDP: the first packet opens, the second establishes.
        let dns = |sport| udp(CLIENT_MAC, FRONT_MAC, CLIENT, VIP, 64, sport, 5353, b"q");
        h.expect(h.front, &dns(52001), XDP_REDIRECT, Verdict::Forwarded);
        assert_eq!(entries(&h), (2, 1));
        h.expect(h.front, &dns(52001), XDP_REDIRECT, Verdict::Forwarded);
        assert_eq!(entries(&h), (4, 0));
    });
}

#[test]
fn tcp_without_syn_and_without_a_flow_is_dropped_unless_the_scheduler_hashes() {
    let net = TestNet::new();
    net.run(|| {
        let mut cfg = lab_config();
        let mut h = Harness::new(&cfg);
        let ack = |port| client_ack(port, VIP);
        h.expect(h.front, &ack(52100), XDP_DROP, Verdict::DropNoFlow);
        assert_eq!(entries(&h), (0, 0), "nothing created");
        // A hash scheduler finds the backend again: the flow goes where the
        // hash says (the same as its SYN would have), half-open first.
        cfg.services[0].scheduler = Scheduler::FlowHash;
        h.dp.apply(&cfg).expect("apply");
        let syn_choice = web_of(&h.expect(
            h.front,
            &Tcp::request(52101, VIP).build(),
            XDP_REDIRECT,
            Verdict::Forwarded,
        ));
        // Forget the flow (an eviction, another LB): its next segment.
        let key = client_key(52101, VIP);
        h.dp.forget_flow(&key).expect("forget");
        assert_eq!(table_of(&h, &key), None);
        let out = h.expect(h.front, &ack(52101), XDP_REDIRECT, Verdict::Forwarded);
        assert_eq!(
            web_of(&out),
            syn_choice,
            "hash-on-miss lands where the flow was"
        );
        assert_eq!(
            table_of(&h, &key),
            Some(false),
            "the packet that created it does not promote it"
        );
        // NAT: nor does the client's next segment, until the backend has
        // shown it holds the connection (a spoofer's ACK gets an RST).
        h.expect(h.front, &ack(52101), XDP_REDIRECT, Verdict::Forwarded);
        assert_eq!(table_of(&h, &key), Some(false));
        let back = h.back;
        h.expect(
            back,
            &from_web(syn_choice, 52101, RST),
            XDP_REDIRECT,
            Verdict::ForwardedReply,
        );
        h.expect(h.front, &ack(52101), XDP_REDIRECT, Verdict::Forwarded);
        assert_eq!(table_of(&h, &key), Some(false), "an RST answers nothing");
        h.expect(
            back,
            &from_web(syn_choice, 52101, ACK),
            XDP_REDIRECT,
            Verdict::ForwardedReply,
        );
        h.expect(h.front, &ack(52101), XDP_REDIRECT, Verdict::Forwarded);
        assert_eq!(table_of(&h, &key), Some(true));
    });
}

/// Issue 20 item 1: a spoofed SYN then ACK (the SYN-ACK went to the
/// spoofed address) never reaches the established table of a NAT service,
/// nor does an ACK of the wrong SYN-ACK; the real handshake still does.
#[test]
fn nat_promotes_only_a_handshake_its_backend_answered() {
    let net = TestNet::new();
    net.run(|| {
        let cfg = lab_config();
        let mut h = Harness::new(&cfg);
        let web1 = web1_id(&mut h, &cfg);
        let key = client_key(52400, VIP);
        let out = h.expect(
            h.front,
            &Tcp::request(52400, VIP).build(),
            XDP_REDIRECT,
            Verdict::Forwarded,
        );
        // The ACK before any SYN-ACK: dropped, nothing created.
        let ack = client_ack(52400, VIP);
        h.expect(h.front, &ack, XDP_DROP, Verdict::DropBadHandshake);
        assert_eq!(table_of(&h, &key), Some(false));
        assert_eq!(entries(&h), (0, 1));
        // The SYN-ACK, then an ACK of another sequence number: dropped.
        answer(&mut h, &out);
        let wrong = Tcp {
            syn: false,
            ..Tcp::request(52400, VIP)
        }
        .build();
        let mut wrong = with_flags(wrong, ACK);
        wrong[14 + 20 + 8..14 + 20 + 12].copy_from_slice(&WEB_SEQ.to_be_bytes());
        h.expect(h.front, &wrong, XDP_DROP, Verdict::DropBadHandshake);
        // An RST from the client is forwarded and promotes nothing.
        h.expect(
            h.front,
            &with_flags(ack.clone(), RST),
            XDP_REDIRECT,
            Verdict::Forwarded,
        );
        assert_eq!((entries(&h), active(&h, web1)), ((0, 1), 0));
        // The ACK of SYN-ACK + 1 establishes it.
        h.expect(h.front, &ack, XDP_REDIRECT, Verdict::Forwarded);
        assert_eq!(table_of(&h, &key), Some(true));
        assert_eq!((entries(&h), active(&h, web1)), ((2, 0), 1));
        // A spoofed pair on 100 tuples: 100 half-open slots, nothing more.
        for port in 52500..52600 {
            h.expect(
                h.front,
                &Tcp::request(port, VIP).build(),
                XDP_REDIRECT,
                Verdict::Forwarded,
            );
            h.expect(
                h.front,
                &client_ack(port, VIP),
                XDP_DROP,
                Verdict::DropBadHandshake,
            );
        }
        assert_eq!(entries(&h).0, 2, "no spoofed pair is established");
    });
}

/// Issue 20 item 1, DSR: the LB cannot see a DSR backend's SYN-ACK, so the
/// handshake's ACK leaves the flow half-open and unconfirmed (replaceable
/// by new flows like any half-open flow); only a later client segment past
/// it (the client sent data, then more) promotes it. A spoofed SYN + ACK
/// pair (or a flood of repeated ACKs) never reaches the established table.
#[test]
fn dsr_promotes_a_flow_only_once_the_client_sends_past_its_handshake() {
    use lb_common::flow::{STATE_ACKED, STATE_ESTABLISHED};
    let net = TestNet::new();
    net.run(|| {
        let cfg = lab_config();
        let mut h = Harness::new(&cfg);
        let segment = |port: u16, seq: u32, payload: &'static [u8]| {
            Tcp {
                seq,
                syn: false,
                payload,
                ..Tcp::request(port, VIP_DSR)
            }
            .build()
        };
        let key = client_key(52800, VIP_DSR);
        h.expect(
            h.front,
            &Tcp::request(52800, VIP_DSR).build(),
            XDP_REDIRECT,
            Verdict::Forwarded,
        );
        // The ACK, a repeat of it, and the request at the same sequence
        // number: forwarded, unconfirmed, still half-open.
        for frame in [
            segment(52800, CLIENT_SEQ, b""),
            segment(52800, CLIENT_SEQ, b""),
            segment(52800, CLIENT_SEQ, b"GET / HTTP/1.1\r\n\r\n"),
        ] {
            h.expect(h.front, &frame, XDP_REDIRECT, Verdict::Forwarded);
            assert_eq!(state_of(&h, &key), Some(STATE_ACKED));
            assert_eq!(table_of(&h, &key), Some(false));
        }
        // The client's ACK of the response, past the request: confirmed.
        h.expect(
            h.front,
            &segment(52800, CLIENT_SEQ.wrapping_add(18), b""),
            XDP_REDIRECT,
            Verdict::Forwarded,
        );
        assert_eq!(state_of(&h, &key), Some(STATE_ESTABLISHED));
        assert_eq!(entries(&h), (1, 0));
        // 100 spoofed pairs (and their ACKs again): half-open only.
        for port in 52900..53000 {
            h.run(h.front, &Tcp::request(port, VIP_DSR).build());
            for _ in 0..2 {
                h.expect(
                    h.front,
                    &client_ack(port, VIP_DSR),
                    XDP_REDIRECT,
                    Verdict::Forwarded,
                );
            }
        }
        assert_eq!(entries(&h), (1, 100), "no spoofed pair is established");
    });
}

/// Issue 20 item 2: a blind RST (a sequence number far from the sender's)
/// is dropped and leaves the flow established past the closing timeout; one
/// within the window of the sender's sequence closes it, in either
/// direction, NAT and DSR, as the sender's sequence moves on.
#[test]
fn a_blind_rst_leaves_the_flow_alone_and_an_in_window_rst_closes_it() {
    use lb_common::flow::{SEQ_WINDOW, STATE_CLOSING, STATE_ESTABLISHED};
    let net = TestNet::new();
    net.run(|| {
        let mut cfg = lab_config();
        cfg.dataplane.timeouts.tcp_closing = std::time::Duration::from_secs(1);
        let mut h = Harness::new(&cfg);
        let web1 = web1_id(&mut h, &cfg);
        let state = |h: &Harness, port: u16, vip| state_of(h, &client_key(port, vip));
        let client = |port: u16, vip, seq: u32, flags: u8| {
            let frame = Tcp {
                seq,
                syn: false,
                ..Tcp::request(port, vip)
            }
            .build();
            with_flags(frame, flags)
        };
        let web = |port: u16, seq: u32, flags: u8| {
            let mut frame = reply_from_web1(port, flags);
            frame[14 + 20 + 4..14 + 20 + 8].copy_from_slice(&seq.to_be_bytes());
            frame
        };
        assert_eq!(open(&mut h, 52300), 0);
        let back = h.back;
        // Blind RSTs, client side and backend side: dropped, flow untouched.
        for seq in [
            CLIENT_SEQ.wrapping_add(1 << 31),
            CLIENT_SEQ.wrapping_add(SEQ_WINDOW + 1),
            CLIENT_SEQ.wrapping_sub(SEQ_WINDOW + 1),
        ] {
            h.expect(
                h.front,
                &client(52300, VIP, seq, RST),
                XDP_DROP,
                Verdict::DropRstOutOfWindow,
            );
        }
        h.expect(
            back,
            &web(52300, WEB_SEQ.wrapping_add(1 << 30), RST),
            XDP_DROP,
            Verdict::DropRstOutOfWindow,
        );
        // A FIN out of the window is forwarded but does not close either.
        h.expect(
            h.front,
            &client(52300, VIP, CLIENT_SEQ ^ 0x8000_0000, FIN_ACK),
            XDP_REDIRECT,
            Verdict::Forwarded,
        );
        assert_eq!(state(&h, 52300, VIP), Some(STATE_ESTABLISHED));
        assert_eq!(active(&h, web1), 1);
        // Past the closing timeout the flow still carries the connection.
        std::thread::sleep(std::time::Duration::from_millis(2300));
        h.expect(
            h.front,
            &client_ack(52300, VIP),
            XDP_REDIRECT,
            Verdict::Forwarded,
        );
        assert_eq!(state(&h, 52300, VIP), Some(STATE_ESTABLISHED));
        // The client's sequence moves 5 MB on: the window follows it, so
        // the RST at the old number is now blind and one near it is not.
        let on = CLIENT_SEQ.wrapping_add(5_000_000);
        h.expect(
            h.front,
            &client(52300, VIP, on, ACK),
            XDP_REDIRECT,
            Verdict::Forwarded,
        );
        h.expect(
            h.front,
            &client(52300, VIP, CLIENT_SEQ, RST),
            XDP_DROP,
            Verdict::DropRstOutOfWindow,
        );
        h.expect(
            h.front,
            &client(52300, VIP, on.wrapping_add(1460), RST),
            XDP_REDIRECT,
            Verdict::Forwarded,
        );
        assert_eq!(state(&h, 52300, VIP), Some(STATE_CLOSING));
        assert_eq!(active(&h, web1), 0);
        // The backend's own RST (its sequence as the client acknowledged it)
        // closes a flow through the reply entry.
        assert_eq!(open(&mut h, 52301), 1);
        assert_eq!(open(&mut h, 52302), 2);
        assert_eq!(open(&mut h, 52303), 0);
        h.expect(
            back,
            &web(52303, WEB_SEQ.wrapping_add(1), RST),
            XDP_REDIRECT,
            Verdict::ForwardedReply,
        );
        assert_eq!(state(&h, 52303, VIP), Some(STATE_CLOSING));
        // DSR: the client's direction is all the LB sees, and is enough.
        h.expect(
            h.front,
            &Tcp::request(52304, VIP_DSR).build(),
            XDP_REDIRECT,
            Verdict::Forwarded,
        );
        for seq in [CLIENT_SEQ, CLIENT_SEQ.wrapping_add(100)] {
            // The handshake's ACK, then a segment past it (item 1, DSR).
            h.expect(
                h.front,
                &client(52304, VIP_DSR, seq, ACK),
                XDP_REDIRECT,
                Verdict::Forwarded,
            );
        }
        assert_eq!(state(&h, 52304, VIP_DSR), Some(STATE_ESTABLISHED));
        h.expect(
            h.front,
            &client(52304, VIP_DSR, CLIENT_SEQ.wrapping_add(1 << 31), RST),
            XDP_DROP,
            Verdict::DropRstOutOfWindow,
        );
        assert_eq!(state(&h, 52304, VIP_DSR), Some(STATE_ESTABLISHED));
        h.expect(
            h.front,
            &client(52304, VIP_DSR, CLIENT_SEQ.wrapping_add(1), RST),
            XDP_REDIRECT,
            Verdict::Forwarded,
        );
        assert_eq!(state(&h, 52304, VIP_DSR), Some(STATE_CLOSING));
    });
}

/// Issue 20 item 4: a NAT backend's segment that no flow knows (a late
/// retransmission, a SYN-ACK to a spoofed SYN whose slot was replaced) is
/// dropped with its own verdict, counted and traced — never routed on to
/// the client with the backend's address. DSR backends, and the LB's own
/// connections to a backend (health checks), are not affected.
#[test]
fn a_nat_backends_segment_without_a_flow_is_dropped_and_traced() {
    use lb_userspace::trace::Tracer;
    let net = TestNet::new();
    net.run(|| {
        let cfg = lab_config();
        let mut h = Harness::new(&cfg);
        let mut tracer = Tracer::of(&h.dp).expect("trace maps");
        tracer
            .start(lb_common::TRACE_DEFAULT_VERDICTS)
            .expect("start");
        let back = h.back;
        let stray = reply_from_web1(52700, SYN_ACK);
        h.expect(back, &stray, XDP_DROP, Verdict::DropBackendNoFlow);
        let events = tracer.drain();
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(
            lb_userspace::trace::render(&events[0]),
            format!(
                "drop_backend_no_flow 198.19.0.11:8080 → 198.18.0.2:52700/tcp service none if {} len {}",
                back,
                stray.len()
            )
        );
        // Its answer to the LB's own address (a health check) is the kernel's.
        let to_lb = Tcp {
            src_mac: WEB_MACS[0],
            dst_mac: BACK_MAC,
            src: WEBS[0],
            dst: [198, 19, 0, 1],
            sport: WEB_PORT,
            dport: 52701,
            seq: WEB_SEQ,
            syn: false,
            ..Tcp::request(0, VIP)
        }
        .build();
        h.expect(back, &to_lb, XDP_PASS, Verdict::PassNotOurs);
        // Another port of the backend's address is not the service's.
        let mut other = stray.clone();
        other[14 + 20..14 + 20 + 2].copy_from_slice(&22u16.to_be_bytes());
        h.expect(back, &other, XDP_PASS, Verdict::PassNotOurs);
        // Once the backend leaves every NAT service, its segments are
        // passed again.
        let mut cfg = cfg.clone();
        for svc in &mut cfg.services {
            if svc.forwarding == Forwarding::Nat {
                svc.backends.retain(|b| b.name != "web1");
            }
        }
        h.dp.apply(&cfg).expect("apply");
        h.expect(back, &stray, XDP_PASS, Verdict::PassNotOurs);
    });
}

#[test]
fn fin_or_rst_closes_a_flow_and_the_closing_timeout_expires_it() {
    let net = TestNet::new();
    net.run(|| {
        let mut cfg = lab_config();
        cfg.dataplane.timeouts.tcp_closing = std::time::Duration::from_secs(1);
        let mut h = Harness::new(&cfg);
        let web1 = web1_id(&mut h, &cfg);
        open(&mut h, 52200); // web1
        open(&mut h, 52201); // web2
        open(&mut h, 52202); // web3
        open(&mut h, 52203); // web1
        assert_eq!(active(&h, web1), 2);
        // The client's FIN: closing, no longer active, still forwarded.
        let fin = with_flags(
            Tcp {
                syn: false,
                ..Tcp::request(52200, VIP)
            }
            .build(),
            FIN_ACK,
        );
        h.expect(h.front, &fin, XDP_REDIRECT, Verdict::Forwarded);
        assert_eq!(active(&h, web1), 1);
        assert_eq!(
            state_of(&h, &client_key(52200, VIP)),
            Some(lb_common::flow::STATE_CLOSING)
        );
        // A second FIN (the other CPU, a retransmit) does not count twice.
        h.expect(h.front, &fin, XDP_REDIRECT, Verdict::Forwarded);
        assert_eq!(active(&h, web1), 1);
        // The backend's RST closes the other web1 flow through its reply entry.
        let back = h.back;
        h.expect(
            back,
            &reply_from_web1(52203, RST),
            XDP_REDIRECT,
            Verdict::ForwardedReply,
        );
        assert_eq!(active(&h, web1), 0);
        // Idle past the closing timeout (1 s: expired after more than one
        // tick of ~1.07 s): the next segment finds no flow, and both of the
        // flow's entries are gone.
        std::thread::sleep(std::time::Duration::from_millis(2300));
        let ack = client_ack(52200, VIP);
        h.expect(h.front, &ack, XDP_DROP, Verdict::DropNoFlow);
        assert_eq!(table_of(&h, &client_key(52200, VIP)), None);
        // The agent's sweep takes the other closed flow (no packet came).
        let mut sweeper = h.dp.sweeper().expect("sweeper");
        let report = sweeper
            .sweep(lb_userspace::dataplane::sweep::now_ticks())
            .expect("sweep");
        assert_eq!(report.removed, 2, "web1's RST flow, forward and reply");
        assert!(report.swept.is_empty(), "closed flows were already counted");
        assert_eq!(entries(&h), (4, 0), "two established flows stay");
        assert_eq!(active(&h, web1), 0);
    });
}

#[test]
fn a_syn_flood_into_a_full_half_open_table_leaves_established_flows_alone() {
    let net = TestNet::new();
    net.run(|| {
        let mut cfg = lab_config();
        cfg.dataplane.conntrack_size = 1024;
        cfg.dataplane.half_open_size = 1024;
        let mut h = Harness::new(&cfg);
        let mut pinned = Vec::new();
        for port in 53000..53010u16 {
            pinned.push((port, open(&mut h, port)));
        }
        // Ten times the half-open table in spoofed SYNs (one slot each).
        let prog = h.dp.program().expect("program");
        for i in 0..10 * 1024u32 {
            let frame = Tcp {
                src: [198, 18, 100 + (i >> 14) as u8, (i >> 6) as u8],
                sport: 1024 + (i & 63) as u16,
                ..Tcp::request(0, VIP)
            }
            .build();
            xdp::test_run(prog, h.front, &frame, 0, false).expect("flood");
        }
        let (established, half_open) = entries(&h);
        assert_eq!(established, 20, "ten NAT flows, both entries each");
        assert!(
            half_open <= 2048,
            "the half-open table stays in its size: {half_open}"
        );
        for (port, web) in pinned {
            let ack = client_ack(port, VIP);
            let out = h.expect(h.front, &ack, XDP_REDIRECT, Verdict::Forwarded);
            assert_eq!(web_of(&out), web, "port {port} kept its backend");
        }
    });
}

#[test]
fn a_new_flow_takes_a_slot_of_its_bucket_replacing_a_flow_whole_and_the_sweep_clears_expired_slots()
{
    let net = TestNet::new();
    net.run(|| {
        let mut cfg = lab_config();
        cfg.dataplane.half_open_size = 1024;
        cfg.dataplane.timeouts.tcp_half_open = std::time::Duration::from_secs(1);
        let mut h = Harness::new(&cfg);
        let conf = h.dp.flow_conf().expect("FLOW_CONF");
        assert_eq!(conf.half_open_slots, 2048, "two slots per half-open flow");
        assert_eq!(lb_common::flow::HALF_OPEN_WAYS, 2);
        assert_ne!(conf.half_open_seed, 0, "a seed was drawn");
        let slot = |port: u16| {
            lb_common::flow::slot_index(
                u32::from_ne_bytes(CLIENT),
                port.to_be(),
                6,
                conf.half_open_seed,
                conf.half_open_slots,
            )
        };
        // Flow A goes to web1 (the ring's first) and its SYN-ACK finds it
        // through the client's bucket: no reply entry of its own.
        let a = 55000;
        let out = h.expect(
            h.front,
            &Tcp::request(a, VIP).build(),
            XDP_REDIRECT,
            Verdict::Forwarded,
        );
        assert_eq!(web_of(&out), 0);
        h.expect(
            h.back,
            &reply_from_web1(a, 0x12),
            XDP_REDIRECT,
            Verdict::ForwardedReply,
        );
        // Flows B and C share A's bucket: B takes the free way, C one of the
        // two taken (seen in the same tick: either, at random), and the flow
        // it replaces is gone in both directions at once.
        let mut shared = (1024..=u16::MAX).filter(|&p| p != a && slot(p) == slot(a));
        let (b, c) = (
            shared.next().expect("a port"),
            shared.next().expect("another"),
        );
        for port in [b, c] {
            h.expect(
                h.front,
                &Tcp::request(port, VIP).build(),
                XDP_REDIRECT,
                Verdict::Forwarded,
            );
        }
        assert_eq!(table_of(&h, &client_key(c, VIP)), Some(false));
        let (gone, kept) = match table_of(&h, &client_key(a, VIP)) {
            None => (a, b),
            Some(_) => (b, a),
        };
        assert_eq!(
            table_of(&h, &client_key(gone, VIP)),
            None,
            "one of A and B went"
        );
        assert_eq!(table_of(&h, &client_key(kept, VIP)), Some(false));
        if gone == a {
            // A's SYN-ACK finds no flow: dropped, never routed on with
            // web1's address (issue 20 item 4).
            h.expect(
                h.back,
                &reply_from_web1(a, 0x12),
                XDP_DROP,
                Verdict::DropBackendNoFlow,
            );
        } else {
            h.expect(
                h.back,
                &reply_from_web1(a, 0x12),
                XDP_REDIRECT,
                Verdict::ForwardedReply,
            );
        }
        h.expect(
            h.front,
            &client_ack(gone, VIP),
            XDP_DROP,
            Verdict::DropNoFlow,
        );
        assert_eq!(entries(&h), (0, 2));
        // Past the half-open timeout with no packet, the agent's sweep
        // empties B's slot.
        std::thread::sleep(std::time::Duration::from_millis(2300));
        let report =
            h.dp.sweeper()
                .expect("sweeper")
                .sweep(lb_userspace::dataplane::sweep::now_ticks())
                .expect("sweep");
        assert_eq!(report.removed, 2, "{report:?}");
        assert_eq!(table_of(&h, &client_key(kept, VIP)), None);
        assert_eq!(table_of(&h, &client_key(c, VIP)), None);
        assert_eq!(entries(&h), (0, 0));
    });
}

#[test]
fn over_the_new_flow_budget_dsr_hash_flows_are_forwarded_without_an_entry() {
    let net = TestNet::new();
    net.run(|| {
        let mut cfg = lab_config();
        cfg.dataplane.new_flow_budget = 2;
        cfg.services[2].scheduler = Scheduler::FlowHash; // www-dsr
        let mut h = Harness::new(&cfg);
        // The budget is per CPU: one CPU's window for the whole test.
        lb_userspace::harness::pktgen::pin_to_cpu(0).expect("pin to cpu 0");
        let before = h.verdicts();
        let mut chosen = Vec::new();
        for port in 54000..54010u16 {
            let (action, out) = h.run(h.front, &Tcp::request(port, VIP_DSR).build());
            assert_eq!(action, XDP_REDIRECT);
            chosen.push((port, web_of(&out)));
        }
        let after = h.verdicts();
        let (stateful, stateless) = (
            verdict_delta(&before, &after, Verdict::Forwarded),
            verdict_delta(&before, &after, Verdict::ForwardedStateless),
        );
        assert_eq!(stateful + stateless, 10);
        // Two per tick of ~1.07 s; the loop may straddle one tick boundary.
        assert!(
            stateful <= 4 && stateless >= 6,
            "{stateful} inserted, {stateless} stateless"
        );
        let (_, half_open) = entries(&h);
        assert_eq!(
            half_open, stateful,
            "only the flows within the budget have entries"
        );
        // A stateless flow's next packet lands on the same backend.
        for (port, web) in chosen {
            let ack = client_ack(port, VIP_DSR);
            let (_, out) = h.run(h.front, &ack);
            assert_eq!(web_of(&out), web, "port {port}");
        }
        // A NAT service cannot do without entries: it inserts anyway.
        h.expect(
            h.front,
            &Tcp::request(54100, VIP).build(),
            XDP_REDIRECT,
            Verdict::Forwarded,
        );
        assert!(table_of(&h, &client_key(54100, VIP)).is_some());
    });
}
