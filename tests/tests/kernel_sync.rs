//! Kernel tier, flow-state sync (issue 27): the data plane's flow events —
//! one when a flow becomes established, one when its established entry
//! ends, none for half-open flows, a SYN flood or with sync off — and the
//! sync agent's insertion of a peer's flow: the next packet of the tuple
//! goes to the synced backend without the scheduler, its replies are
//! translated back, a record for a backend or service this LB does not
//! have is rejected and creates nothing, a local flow is never replaced;
//! an older peer's wrapped age (u32::MAX ms) is taken as fresh and
//! counted, an age merely past the timeout inserts the flow expired.
//!
//! The real `lb` object run with BPF_PROG_TEST_RUN on crafted frames in a
//! throwaway namespace (`lb_tests::kernel_net`). Needs root and BPF;
//! without them the tests fail loudly.

use std::net::{SocketAddr, SocketAddrV4};

use lb_common::{
    FLOW_F_SYNCED, FlowKey, Verdict,
    sync::{SYNC_EVENT_ENDED, SYNC_EVENT_ESTABLISHED, SyncEvent},
};
use lb_tests::{
    kernel_frames::{ACK, FIN_ACK, Tcp, WEB_SEQ, answer, from, from_web, web_of, with_flags},
    kernel_net::{CLIENT, Harness, TestNet, VIP, WEB_PORT, WEBS, lab_config},
    sync_peers::{KEY, PORT, events_of, eventually, start_sync},
};
use lb_userspace::{
    harness::xdp::{XDP_DROP, XDP_REDIRECT},
    sync::{
        Applied, Directory, FlowEvent, SyncMaps, apply,
        stats::RecordReject,
        wire::{Event, Key, Kind, Record, Sealer},
    },
};

/// The client → VIP:80 key of a lab client's TCP flow from `sport`.
fn client_key(sport: u16) -> FlowKey {
    FlowKey {
        saddr: u32::from_ne_bytes(CLIENT),
        daddr: u32::from_ne_bytes(VIP),
        sport: sport.to_be(),
        dport: 80u16.to_be(),
        protocol: 6,
        ..Default::default()
    }
}

/// The client's bare ACK on its connection from `sport`.
fn client_ack(sport: u16) -> Vec<u8> {
    with_flags(
        Tcp {
            syn: false,
            ..Tcp::request(sport, VIP)
        }
        .build(),
        ACK,
    )
}

/// The whole handshake of a NAT flow from `sport` (SYN, the web's SYN-ACK,
/// the client's ACK); the web it went to. `between` runs after the
/// SYN-ACK, while the flow is half-open.
fn open(h: &mut Harness, sport: u16, between: &mut dyn FnMut(&mut Harness)) -> usize {
    let syn = h.expect(
        h.front,
        &Tcp::request(sport, VIP).build(),
        XDP_REDIRECT,
        Verdict::Forwarded,
    );
    answer(h, &syn);
    between(h);
    h.expect(
        h.front,
        &client_ack(sport),
        XDP_REDIRECT,
        Verdict::Forwarded,
    );
    web_of(&syn)
}

/// IPv4's events, every one of them.
fn v4(events: Vec<FlowEvent>) -> Vec<SyncEvent> {
    events_of(events)
}

fn sync_maps(h: &Harness, on: bool) -> SyncMaps {
    let mut maps = SyncMaps::of(&h.dp).expect("sync maps");
    maps.switch(on).expect("switch");
    maps
}

/// The web (index) whose address and port a backend endpoint is.
fn web_addr(web: usize) -> SocketAddr {
    SocketAddrV4::new(WEBS[web].into(), WEB_PORT).into()
}

/// A peer's record of the client's flow from `sport` to VIP:80 on `backend`.
fn record(sport: u16, backend: impl Into<SocketAddr>) -> Record {
    Record {
        event: Event::Established,
        client: SocketAddrV4::new(CLIENT.into(), sport).into(),
        vip: SocketAddrV4::new(VIP.into(), 80).into(),
        protocol: 6,
        closing: false,
        nat: true,
        backend: backend.into(),
        age_ms: 0,
        seq: lb_tests::kernel_frames::CLIENT_SEQ,
        reply_seq: WEB_SEQ,
    }
}

fn now() -> u32 {
    lb_userspace::dataplane::sweep::now_ticks()
}

fn entries(h: &Harness) -> u64 {
    h.dp.flow_table()
        .expect("flow table")
        .entries()
        .expect("entries")
        .0
}

#[test]
fn an_established_flow_and_its_end_are_events_and_half_open_flows_are_not() {
    let net = TestNet::new();
    net.run(|| {
        let cfg = lab_config();
        let mut h = Harness::new(&cfg);
        let mut maps = sync_maps(&h, true);
        let web = open(&mut h, 53000, &mut |_| {
            assert_eq!(
                v4(maps.drain()),
                Vec::<SyncEvent>::new(),
                "half-open: no event"
            );
        });
        let events = v4(maps.drain());
        assert_eq!(events.len(), 1, "one event, at promotion: {events:?}");
        let ev = events[0];
        assert_eq!(ev.kind, SYNC_EVENT_ESTABLISHED);
        assert_eq!(ev.key, client_key(53000));
        assert_eq!((ev.nat, ev.flags), (1, 0));
        assert_eq!(ev.seq, lb_tests::kernel_frames::CLIENT_SEQ);
        assert_eq!(
            ev.reply_seq,
            WEB_SEQ.wrapping_add(1),
            "the ACK's acknowledgement"
        );
        // Named by address for the peers: the web the SYN went to.
        let dir = maps.directory();
        let rec = lb_userspace::sync::record_of(&dir, &FlowEvent::V4(ev)).expect("a record");
        assert_eq!(rec.backend, web_addr(web));
        assert_eq!(rec.vip, SocketAddrV4::new(VIP.into(), 80).into());
        assert_eq!(rec.client, SocketAddrV4::new(CLIENT.into(), 53000).into());
        // Packets of the established flow, both ways: no event.
        for _ in 0..10 {
            h.expect(
                h.front,
                &client_ack(53000),
                XDP_REDIRECT,
                Verdict::Forwarded,
            );
            let back = h.back;
            h.expect(
                back,
                &from_web(web, 53000, ACK),
                XDP_REDIRECT,
                Verdict::ForwardedReply,
            );
        }
        assert_eq!(
            v4(maps.drain()),
            Vec::<SyncEvent>::new(),
            "no event per packet"
        );
        // The client's FIN closes it (no event: the entry stays, closing);
        // a SYN on the tuple then ends it and starts a new flow.
        h.expect(
            h.front,
            &with_flags(client_ack(53000), FIN_ACK),
            XDP_REDIRECT,
            Verdict::Forwarded,
        );
        assert_eq!(v4(maps.drain()), Vec::<SyncEvent>::new());
        h.expect(
            h.front,
            &Tcp::request(53000, VIP).build(),
            XDP_REDIRECT,
            Verdict::Forwarded,
        );
        let events = v4(maps.drain());
        assert_eq!(events.len(), 1, "one event for the end: {events:?}");
        assert_eq!(events[0].kind, SYNC_EVENT_ENDED);
        assert_eq!(events[0].key, client_key(53000));
        // The ended flow's record, for the peers.
        let rec = lb_userspace::sync::record_of(&dir, &FlowEvent::V4(events[0])).expect("a record");
        assert_eq!(rec.event, Event::Ended);
    });
}

#[test]
fn a_syn_flood_and_sync_off_send_no_event() {
    let net = TestNet::new();
    net.run(|| {
        let cfg = lab_config();
        let mut h = Harness::new(&cfg);
        let mut maps = sync_maps(&h, true);
        // 2000 spoofed SYNs: 2000 half-open flows, no event.
        for i in 0..2000u32 {
            let src = [100, 64, (i >> 8) as u8, i as u8];
            h.expect(
                h.front,
                &from(src, 40000 + (i % 1000) as u16, VIP, true),
                XDP_REDIRECT,
                Verdict::Forwarded,
            );
        }
        assert_eq!(
            v4(maps.drain()),
            Vec::<SyncEvent>::new(),
            "a SYN flood is no sync flood"
        );
        // Sync off: an established flow is no event either.
        maps.switch(false).expect("off");
        open(&mut h, 53100, &mut |_| {});
        assert_eq!(entries(&h), 2, "the flow is established");
        assert_eq!(v4(maps.drain()), Vec::<SyncEvent>::new(), "off: no event");
        // On again: the next one is.
        maps.switch(true).expect("on");
        open(&mut h, 53101, &mut |_| {});
        assert_eq!(v4(maps.drain()).len(), 1);
    });
}

#[test]
fn a_synced_flow_forwards_to_its_backend_without_the_scheduler() {
    let net = TestNet::new();
    net.run(|| {
        let cfg = lab_config();
        let mut h = Harness::new(&cfg);
        let mut maps = sync_maps(&h, true);
        let dir: Directory = maps.directory();
        // Without an entry, a mid-stream segment of a round-robin service
        // is dropped: the scheduler cannot place it.
        h.expect(h.front, &client_ack(53200), XDP_DROP, Verdict::DropNoFlow);
        for (sport, web) in [(53201u16, 2usize), (53202, 1), (53203, 2)] {
            let got = apply(&mut maps, &dir, &record(sport, web_addr(web)), now()).expect("apply");
            assert_eq!(got, Applied::Taken);
            let (established, flow) =
                h.dp.flow_table()
                    .expect("flow table")
                    .lookup(&client_key(sport))
                    .expect("lookup")
                    .expect("an entry");
            assert!(established);
            assert_eq!(flow.flags & FLOW_F_SYNCED, FLOW_F_SYNCED, "marked synced");
            let out = h.expect(
                h.front,
                &client_ack(sport),
                XDP_REDIRECT,
                Verdict::Forwarded,
            );
            assert_eq!(web_of(&out), web, "port {sport}: the synced backend");
            // Its replies are translated back through the synced reply entry.
            let back = h.back;
            h.expect(
                back,
                &from_web(web, sport, ACK),
                XDP_REDIRECT,
                Verdict::ForwardedReply,
            );
        }
        // The synced flow counts as active on its backend, once.
        let web3 = h.dp.apply(&cfg).expect("apply")[0].backends[2].1;
        let active =
            h.dp.flow_table()
                .expect("flow table")
                .active(web3)
                .expect("active");
        assert_eq!(active, 2);
        // Synced entries are not sent back to the peers.
        assert_eq!(v4(maps.drain()), Vec::<SyncEvent>::new());
        // A peer's end of the flow closes the synced entry.
        let mut ended = record(53203, web_addr(2));
        ended.event = Event::Ended;
        assert_eq!(
            apply(&mut maps, &dir, &ended, now()).expect("apply"),
            Applied::Taken
        );
        let active =
            h.dp.flow_table()
                .expect("flow table")
                .active(web3)
                .expect("active");
        assert_eq!(active, 1);
    });
}

#[test]
fn a_synced_flow_for_an_unknown_backend_or_service_creates_nothing_and_never_replaces_a_local_one()
{
    let net = TestNet::new();
    net.run(|| {
        let cfg = lab_config();
        let mut h = Harness::new(&cfg);
        let mut maps = sync_maps(&h, true);
        let dir = maps.directory();
        let before = entries(&h);
        let stranger = SocketAddrV4::new([198, 19, 0, 99].into(), WEB_PORT);
        assert_eq!(
            apply(&mut maps, &dir, &record(53300, stranger), now()).expect("apply"),
            Applied::Rejected(RecordReject::UnknownBackend)
        );
        // web1's address on another port is another backend.
        let other_port = SocketAddrV4::new(WEBS[0].into(), WEB_PORT + 1);
        assert_eq!(
            apply(&mut maps, &dir, &record(53301, other_port), now()).expect("apply"),
            Applied::Rejected(RecordReject::UnknownBackend)
        );
        let mut no_service = record(53302, web_addr(0));
        no_service.vip = SocketAddrV4::new(VIP.into(), 8443).into();
        assert_eq!(
            apply(&mut maps, &dir, &no_service, now()).expect("apply"),
            Applied::Rejected(RecordReject::UnknownService)
        );
        // A NAT record for the DSR service's VIP: another service.
        let mut dsr = record(53303, SocketAddrV4::new(WEBS[0].into(), 80));
        dsr.vip = SocketAddrV4::new(lb_tests::kernel_net::VIP_DSR.into(), 80).into();
        assert_eq!(
            apply(&mut maps, &dir, &dsr, now()).expect("apply"),
            Applied::Rejected(RecordReject::UnknownService)
        );
        assert_eq!(entries(&h), before, "nothing created");
        h.expect(h.front, &client_ack(53300), XDP_DROP, Verdict::DropNoFlow);
        // A local flow keeps its backend, whatever a peer says.
        let web = open(&mut h, 53304, &mut |_| {});
        let other = (web + 1) % 3;
        assert_eq!(
            apply(&mut maps, &dir, &record(53304, web_addr(other)), now()).expect("apply"),
            Applied::KeptLocal
        );
        let out = h.expect(
            h.front,
            &client_ack(53304),
            XDP_REDIRECT,
            Verdict::Forwarded,
        );
        assert_eq!(web_of(&out), web);
    });
}

/// The entry of the client's flow from `sport`, if `h`'s table has one.
fn established(h: &Harness, sport: u16) -> Option<lb_common::Flow> {
    h.dp.flow_table()
        .expect("flow table")
        .lookup(&client_key(sport))
        .expect("lookup")
        .filter(|(est, _)| *est)
        .map(|(_, f)| f)
}

/// Now in Unix ms, a message's send time.
fn unix_ms() -> u64 {
    u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_millis(),
    )
    .expect("ms")
}

#[test]
fn two_lbs_sync_their_flows_over_udp_and_a_starting_lb_copies_its_peers_flows() {
    let net = TestNet::new();
    net.ip(&["link", "set", "lo", "up"]);
    net.run(|| {
        let cfg = lab_config();
        let (a_addr, b_addr, stranger) = ([127, 0, 0, 1], [127, 0, 0, 2], [127, 0, 0, 3]);
        let mut a = Harness::new(&cfg);
        let mut b = Harness::new(&cfg);
        // A flow on A before sync runs: only the bulk copy can carry it.
        let web = open(&mut a, 53400, &mut |_| {});
        let (_a_stats, answered) = start_sync(&a, a_addr, &[b_addr]);
        assert!(!answered, "no peer answered A: its bulk copy times out");
        let (b_stats, _) = start_sync(&b, b_addr, &[a_addr, stranger]);
        let copied = established(&b, 53400).expect("B has A's flow from the bulk copy");
        assert_eq!(copied.flags & FLOW_F_SYNCED, FLOW_F_SYNCED);
        let out = b.expect(
            b.front,
            &client_ack(53400),
            XDP_REDIRECT,
            Verdict::Forwarded,
        );
        assert_eq!(web_of(&out), web, "B sends A's flow to A's backend");
        // A flow A opens now reaches B within a batch or so.
        let web = open(&mut a, 53401, &mut |_| {});
        eventually("A's new flow on B", || established(&b, 53401).is_some());
        let out = b.expect(
            b.front,
            &client_ack(53401),
            XDP_REDIRECT,
            Verdict::Forwarded,
        );
        assert_eq!(web_of(&out), web);
        let status = b_stats.status();
        let from_a = &status.peers[0];
        assert_eq!(from_a.peer, format!("127.0.0.1:{PORT}"));
        assert!(from_a.flows_received >= 2, "{status:?}");
        assert!(from_a.last_message_age_ms.is_some());
        // Forged, replayed and strangers' messages: counted, no flow.
        let socket = std::net::UdpSocket::bind(SocketAddrV4::new(stranger.into(), PORT))
            .expect("the stranger's socket");
        let b_at = SocketAddrV4::new(b_addr.into(), PORT);
        let sender = u32::from(std::net::Ipv4Addr::from(stranger));
        let mut forger = Sealer::new(Key::new(b"not the key the LBs share, but long"), sender, 1);
        let forged = forger.seal(Kind::Flows, &[record(53402, web_addr(0))], unix_ms());
        socket.send_to(&forged, b_at).expect("send");
        let mut insider = Sealer::new(Key::new(KEY.as_bytes()), sender, 1);
        let unknown = insider.seal(
            Kind::Flows,
            &[record(
                53403,
                SocketAddrV4::new([198, 19, 0, 99].into(), WEB_PORT),
            )],
            unix_ms(),
        );
        socket.send_to(&unknown, b_at).expect("send");
        socket.send_to(&unknown, b_at).expect("send the same again");
        eventually("the rejections counted", || {
            let s = b_stats.status();
            let r = &s.peers[1].rejected;
            r.get("bad_tag") == Some(&1)
                && r.get("replayed") == Some(&1)
                && r.get("unknown_backend") == Some(&1)
        });
        assert!(
            established(&b, 53402).is_none(),
            "a forged message creates no flow"
        );
        assert!(established(&b, 53403).is_none(), "nor an unknown backend");
        // From an address that is not a peer at all.
        let outsider =
            std::net::UdpSocket::bind(SocketAddrV4::new([127, 0, 0, 4].into(), 0)).expect("bind");
        outsider.send_to(&unknown, b_at).expect("send");
        eventually("the outsider counted", || {
            b_stats.status().rejected_strangers.get("not_a_peer") == Some(&1)
        });
    });
}

/// The data plane's clock runs up to two jiffies ahead of the agent's, so
/// just after a tick boundary every flow that carried a packet is stamped
/// the tick after the agent's `now`. Such a flow reaches a starting peer by
/// the bulk copy alive: the peer forwards its next packet to its backend.
/// (The sender read its age unsigned — 2^32 − 1 ticks, sent as u32::MAX ms
/// — and the peer inserted it expired: a miss, `DropNoFlow` for a
/// round-robin flow's segment, the connections a failback broke.)
#[test]
fn a_flow_stamped_ahead_of_the_agents_clock_reaches_a_starting_peer_alive() {
    let net = TestNet::new();
    net.ip(&["link", "set", "lo", "up"]);
    net.run(|| {
        let cfg = lab_config();
        let (a_addr, b_addr) = ([127, 0, 0, 1], [127, 0, 0, 2]);
        let mut a = Harness::new(&cfg);
        let mut b = Harness::new(&cfg);
        let web = open(&mut a, 53500, &mut |_| {});
        let (_a_stats, answered) = start_sync(&a, a_addr, &[b_addr]);
        assert!(!answered, "no peer answered A");
        // Just after a tick boundary (so the stamp stays ahead for a whole
        // tick, far longer than the bulk copy takes), as the data plane
        // stamps a packet then.
        let tick = now();
        while now() == tick {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        let ahead = now() + 1;
        let conf = a.dp.flow_conf().expect("FLOW_CONF");
        a.dp.established_table()
            .expect("ESTABLISHED")
            .update(&client_key(53500), &conf, |s| s.forward.seen = ahead)
            .expect("A's flow in its slot");
        let (_b_stats, answered) = start_sync(&b, b_addr, &[a_addr]);
        assert!(answered, "A answered B's bulk request");
        assert!(now() < ahead, "the bulk copy took longer than a tick");
        let copied = established(&b, 53500).expect("B has A's flow from the bulk copy");
        let out = b.expect(
            b.front,
            &client_ack(53500),
            XDP_REDIRECT,
            Verdict::Forwarded,
        );
        assert_eq!(web_of(&out), web, "B sends A's flow to A's backend");
        let b_conf = b.dp.flow_conf().expect("FLOW_CONF");
        assert!(
            !lb_common::flow::is_expired(&b_conf, 6, &copied, now()),
            "B's copy was inserted expired: seen {}, now {}",
            copied.seen,
            now()
        );
    });
}

/// A peer still running the code before that fix (a rolling upgrade) sends
/// a flow it had just seen with its wrapped age, u32::MAX ms: the receiver
/// inserts it fresh, forwards its next packet, and counts it. A record
/// whose age is merely past the flow's timeout is inserted as it says:
/// expired, a miss for its next packet (`DropNoFlow`), not counted.
#[test]
fn an_older_peers_wrapped_age_is_taken_as_fresh_and_a_real_expiry_stands() {
    let net = TestNet::new();
    net.ip(&["link", "set", "lo", "up"]);
    net.run(|| {
        let cfg = lab_config();
        let (old_addr, b_addr) = ([127, 0, 0, 1], [127, 0, 0, 2]);
        let mut b = Harness::new(&cfg);
        // The older peer: a socket on its sync address, sealing with the key.
        let old_peer = std::net::UdpSocket::bind(SocketAddrV4::new(old_addr.into(), PORT))
            .expect("the older peer's socket");
        let (b_stats, answered) = start_sync(&b, b_addr, &[old_addr]);
        assert!(!answered, "the test's peer answers no bulk request");
        let conf = b.dp.flow_conf().expect("FLOW_CONF");
        let tcp_timeout = conf.timeouts[lb_common::flow::Timeout::Tcp as usize];
        // Two ticks past the timeout, in ms (rounded up).
        let past_ms =
            u32::try_from((u64::from(tcp_timeout) + 2) * lb_common::flow::TICK_NS / 1_000_000 + 1)
                .expect("ms");
        let wrapped = Record {
            age_ms: u32::MAX,
            ..record(53600, web_addr(1))
        };
        let expired = Record {
            age_ms: past_ms,
            ..record(53601, web_addr(2))
        };
        let sender = u32::from(std::net::Ipv4Addr::from(old_addr));
        let mut sealer = Sealer::new(Key::new(KEY.as_bytes()), sender, 1);
        let msg = sealer.seal(Kind::Flows, &[wrapped, expired], unix_ms());
        old_peer
            .send_to(&msg, SocketAddrV4::new(b_addr.into(), PORT))
            .expect("send");
        eventually("both records taken", || {
            b_stats.status().peers[0].flows_received == 2
        });
        let peer = &b_stats.status().peers[0];
        assert_eq!(peer.wrapped_ages, 1, "{peer:?}");

        let fresh = established(&b, 53600).expect("the wrapped-age flow inserted");
        assert!(
            !lb_common::flow::is_expired(&conf, 6, &fresh, now()),
            "inserted expired: seen {}, now {}",
            fresh.seen,
            now()
        );
        let out = b.expect(
            b.front,
            &client_ack(53600),
            XDP_REDIRECT,
            Verdict::Forwarded,
        );
        assert_eq!(web_of(&out), 1, "the peer's backend");

        let old = established(&b, 53601).expect("the expired flow inserted as it says");
        assert!(
            lb_common::flow::is_expired(&conf, 6, &old, now()),
            "seen {}, now {}",
            old.seen,
            now()
        );
        b.expect(b.front, &client_ack(53601), XDP_DROP, Verdict::DropNoFlow);
    });
}
