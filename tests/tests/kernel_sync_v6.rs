//! Kernel tier, flow-state sync of IPv6 flows (issue 24 over issue 27's
//! sync): the data plane's IPv6 flow events — one when a NAT66 or IPv6 DSR
//! flow becomes established (`flows6::promote`), one when its established
//! entry ends (`flows6::remove_flow`), none for half-open flows or a
//! spoofed IPv6 SYN flood — share `SYNC_EVENTS` with IPv4's and are told
//! apart by their length; the agent names them by IPv6 address, and a
//! peer's IPv6 record becomes an `ESTABLISHED6` flow (both entries of a
//! NAT66 flow) whose next packet goes to the synced backend without the
//! scheduler and whose replies are translated back; a record for a backend
//! this LB does not have creates nothing, a local flow is never replaced;
//! two LBs exchange IPv6 flows over UDP, by events and by the bulk copy.
//!
//! The real `lb` object run with BPF_PROG_TEST_RUN on crafted frames in a
//! throwaway dual-stack namespace (`lb_tests::kernel_net`,
//! `kernel_net6`). Needs root and BPF; without them the tests fail loudly.

use std::net::SocketAddr;

use lb_common::{
    FLOW_F_SYNCED, Flow, Verdict,
    ipv6::addr_of,
    maps6::FlowKey6,
    sync::{SYNC_EVENT_ENDED, SYNC_EVENT_ESTABLISHED, SyncEvent6},
};
use lb_tests::{
    kernel_net::{BACK_MAC, CLIENT_MAC, FRONT_MAC, Harness, WEB_MACS, WEB_PORT},
    kernel_net6::{
        CLIENT_V6, Seg, VIP_DSR6, VIP_NAT6, config_v6, dual_stack_net, tcp6, web_of_mac, web_of6,
        web6,
    },
    sync_peers::{events_of, eventually, start_sync},
};
use lb_userspace::{
    harness::xdp::{XDP_DROP, XDP_REDIRECT},
    sync::{
        Applied, FlowEvent, SyncMaps, apply, record_of,
        stats::RecordReject,
        wire::{Event, Record},
    },
};

const TO_LB: ([u8; 6], [u8; 6]) = (CLIENT_MAC, FRONT_MAC);
/// The client's sequence numbers in these flows: SYN 100, then 101.
const CLIENT_SEQ: u32 = 101;
/// The web's: SYN-ACK 900, then 901.
const WEB_SEQ: u32 = 901;

fn key6(sport: u16, vip: [u8; 16]) -> FlowKey6 {
    FlowKey6 {
        saddr: addr_of(CLIENT_V6),
        daddr: addr_of(vip),
        sport: sport.to_be(),
        dport: 80u16.to_be(),
        protocol: 6,
        ..FlowKey6::default()
    }
}

fn client(sport: u16) -> SocketAddr {
    SocketAddr::new(std::net::Ipv6Addr::from(CLIENT_V6).into(), sport)
}

fn vip(vip: [u8; 16]) -> SocketAddr {
    SocketAddr::new(std::net::Ipv6Addr::from(vip).into(), 80)
}

/// Web `i`'s NAT66 backend endpoint.
fn web_addr(i: usize) -> SocketAddr {
    SocketAddr::new(std::net::Ipv6Addr::from(web6(i)).into(), WEB_PORT)
}

/// IPv6's events, every one of them.
fn v6(events: Vec<FlowEvent>) -> Vec<SyncEvent6> {
    events_of(events)
}

/// The client's segment `seg` on its NAT66 connection from `sport`.
fn to_nat(sport: u16, seg: Seg) -> Vec<u8> {
    tcp6(TO_LB, (CLIENT_V6, sport), (VIP_NAT6, 80), 64, seg, &[])
}

/// Web `web`'s segment `seg` to the client's NAT66 connection from `sport`.
fn from_web(web: usize, sport: u16, seg: Seg) -> Vec<u8> {
    tcp6(
        (WEB_MACS[web], BACK_MAC),
        (web6(web), WEB_PORT),
        (CLIENT_V6, sport),
        64,
        seg,
        &[],
    )
}

/// SYN, the web's SYN-ACK, the client's ACK: a NAT66 connection from
/// `sport`, established; the web it went to. `between` runs while the flow
/// is half-open (after the SYN-ACK).
fn open_nat(h: &mut Harness, sport: u16, between: &mut dyn FnMut(&mut Harness)) -> usize {
    let syn = to_nat(sport, Seg::Syn(CLIENT_SEQ - 1));
    let web = web_of6(&h.expect(h.front, &syn, XDP_REDIRECT, Verdict::Forwarded));
    let back = h.back;
    h.expect(
        back,
        &from_web(web, sport, Seg::SynAck(WEB_SEQ - 1, CLIENT_SEQ)),
        XDP_REDIRECT,
        Verdict::ForwardedReply,
    );
    between(h);
    h.expect(
        h.front,
        &to_nat(sport, Seg::Ack(CLIENT_SEQ, WEB_SEQ)),
        XDP_REDIRECT,
        Verdict::Forwarded,
    );
    web
}

/// The client's ACK on its NAT66 connection from `sport` goes to web
/// `web`, and the web's answer comes back translated.
fn served_by(h: &mut Harness, sport: u16, web: usize) {
    let out = h.expect(
        h.front,
        &to_nat(sport, Seg::Ack(CLIENT_SEQ, WEB_SEQ)),
        XDP_REDIRECT,
        Verdict::Forwarded,
    );
    assert_eq!(web_of6(&out), web, "port {sport}: another web");
    let back = h.back;
    let reply = h.expect(
        back,
        &from_web(web, sport, Seg::Ack(WEB_SEQ, CLIENT_SEQ)),
        XDP_REDIRECT,
        Verdict::ForwardedReply,
    );
    // The reply leaves as the VIP's (IPv6 source at bytes 22..38).
    assert_eq!(reply[22..38], VIP_NAT6, "port {sport}: the reply's source");
}

/// A dual-stack harness on `config_v6` (inside `net.run`).
fn harness() -> Harness {
    Harness::new(&config_v6())
}

fn sync_maps(h: &Harness) -> SyncMaps {
    let mut maps = SyncMaps::of(&h.dp).expect("sync maps");
    maps.switch(true).expect("switch");
    maps
}

/// `key`'s established entry in `ESTABLISHED6`, if any.
fn established(h: &Harness, key: &FlowKey6) -> Option<Flow> {
    h.dp.flows6()
        .expect("IPv6's tables")
        .lookup(key)
        .expect("lookup")
        .filter(|(est, _)| *est)
        .map(|(_, f)| f)
}

/// A peer's record of the NAT66 flow from `sport` on web `web`.
fn record(sport: u16, web: usize) -> Record {
    Record {
        event: Event::Established,
        client: client(sport),
        vip: vip(VIP_NAT6),
        protocol: 6,
        closing: false,
        nat: true,
        backend: web_addr(web),
        age_ms: 0,
        seq: CLIENT_SEQ,
        reply_seq: WEB_SEQ,
    }
}

/// Backend ids of `www6` (the NAT66 TCP service), web1..3.
fn www6_ids(h: &mut Harness) -> Vec<u32> {
    let applied = h.dp.apply(&config_v6()).expect("apply");
    let www6 = applied
        .iter()
        .find(|s| s.name == "www6")
        .expect("www6 applied");
    www6.backends.iter().map(|b| b.1).collect()
}

#[test]
fn an_ipv6_flow_and_its_end_are_events_and_half_open_flows_and_a_syn_flood_are_not() {
    let net = dual_stack_net();
    net.run(|| {
        let mut h = harness();
        let mut maps = sync_maps(&h);
        let web = open_nat(&mut h, 41000, &mut |_| {
            assert_eq!(v6(maps.drain()), [], "half-open: no event");
        });
        let events = v6(maps.drain());
        assert_eq!(events.len(), 1, "one event, at promotion: {events:?}");
        let ev = events[0];
        assert_eq!(ev.kind, SYNC_EVENT_ESTABLISHED);
        assert_eq!(ev.key, key6(41000, VIP_NAT6));
        assert_eq!((ev.nat, ev.flags), (1, 0));
        assert_eq!(
            (ev.seq, ev.reply_seq),
            (CLIENT_SEQ, WEB_SEQ),
            "the ACK's sequence and acknowledgement"
        );
        // Named by IPv6 address for the peers.
        let dir = maps.directory();
        let rec = record_of(&dir, &FlowEvent::V6(ev)).expect("a record");
        assert_eq!(
            (rec.client, rec.vip, rec.backend, rec.nat),
            (client(41000), vip(VIP_NAT6), web_addr(web), true)
        );
        // Packets of the established flow, both ways: no event.
        for _ in 0..5 {
            served_by(&mut h, 41000, web);
        }
        assert_eq!(v6(maps.drain()), [], "no event per packet");
        // The client's FIN closes it (no event); a SYN on the tuple then
        // ends it (one event) and starts a new flow.
        h.expect(
            h.front,
            &to_nat(41000, Seg::Fin(CLIENT_SEQ, WEB_SEQ)),
            XDP_REDIRECT,
            Verdict::Forwarded,
        );
        assert_eq!(v6(maps.drain()), []);
        h.expect(
            h.front,
            &to_nat(41000, Seg::Syn(5000)),
            XDP_REDIRECT,
            Verdict::Forwarded,
        );
        let events = v6(maps.drain());
        assert_eq!(events.len(), 1, "one event for the end: {events:?}");
        assert_eq!(events[0].kind, SYNC_EVENT_ENDED);
        assert_eq!(events[0].key, key6(41000, VIP_NAT6));
        let rec = record_of(&dir, &FlowEvent::V6(events[0])).expect("a record");
        assert_eq!(rec.event, Event::Ended);

        // An IPv6 DSR flow: an event without NAT, its backend the web's
        // port-80 endpoint.
        let dsr = (CLIENT_V6, 41001);
        let syn = tcp6(TO_LB, dsr, (VIP_DSR6, 80), 64, Seg::Syn(100), &[]);
        let web = web_of_mac(&h.expect(h.front, &syn, XDP_REDIRECT, Verdict::Forwarded));
        // The handshake's ACK, then data past it (as a DSR client does).
        for (seq, data) in [(101, &b""[..]), (101, b"GET /"), (106, b"more")] {
            let ack = tcp6(TO_LB, dsr, (VIP_DSR6, 80), 64, Seg::Ack(seq, 1), data);
            h.expect(h.front, &ack, XDP_REDIRECT, Verdict::Forwarded);
        }
        let events = v6(maps.drain());
        assert_eq!(events.len(), 1, "{events:?}");
        let rec = record_of(&dir, &FlowEvent::V6(events[0])).expect("a record");
        assert_eq!(
            (rec.client, rec.vip, rec.backend, rec.nat),
            (
                client(41001),
                vip(VIP_DSR6),
                SocketAddr::new(std::net::Ipv6Addr::from(web6(web)).into(), 80),
                false
            )
        );

        // 2 000 spoofed IPv6 SYNs: 2 000 half-open flows, no event.
        for i in 0..2000u32 {
            let mut src = [
                0x20, 0x01, 0x0d, 0xb8, 0, 0x66, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            ];
            src[12..].copy_from_slice(&i.to_be_bytes());
            let syn = tcp6(TO_LB, (src, 40000), (VIP_NAT6, 80), 64, Seg::Syn(1), &[]);
            h.expect(h.front, &syn, XDP_REDIRECT, Verdict::Forwarded);
        }
        assert_eq!(v6(maps.drain()), [], "an IPv6 SYN flood is no sync flood");
    });
}

#[test]
fn a_synced_ipv6_flow_forwards_to_its_backend_and_a_bad_record_creates_nothing() {
    let net = dual_stack_net();
    net.run(|| {
        let mut h = harness();
        let ids = www6_ids(&mut h);
        let mut maps = sync_maps(&h);
        let dir = maps.directory();
        // Without an entry, a mid-stream segment of a round-robin service
        // is dropped: the scheduler cannot place it.
        h.expect(
            h.front,
            &to_nat(42000, Seg::Ack(CLIENT_SEQ, WEB_SEQ)),
            XDP_DROP,
            Verdict::DropNoFlow,
        );
        for (sport, web) in [(42001u16, 2usize), (42002, 1), (42003, 2)] {
            let got = apply(&mut maps, &dir, &record(sport, web), now()).expect("apply");
            assert_eq!(got, Applied::Taken, "port {sport}");
            let flow = established(&h, &key6(sport, VIP_NAT6)).expect("an entry");
            assert_eq!(flow.flags & FLOW_F_SYNCED, FLOW_F_SYNCED, "marked synced");
            assert_eq!(flow.backend_id, ids[web]);
            // Its next packet goes to the synced web; the web's answer is
            // translated back through the synced reply entry.
            served_by(&mut h, sport, web);
        }
        let active = |h: &Harness, id: u32| {
            h.dp.flow_table()
                .expect("flow table")
                .active(id)
                .expect("active")
        };
        assert_eq!(active(&h, ids[2]), 2, "synced flows count as active");
        assert_eq!(v6(maps.drain()), [], "synced entries are not sent back");
        // A peer's end of the flow closes the synced entry.
        let ended = Record {
            event: Event::Ended,
            ..record(42003, 2)
        };
        assert_eq!(
            apply(&mut maps, &dir, &ended, now()).expect("apply"),
            Applied::Taken
        );
        assert_eq!(active(&h, ids[2]), 1);

        // A backend this LB does not have, a port no web listens on, a VIP
        // without the service: rejected, nothing created.
        let stranger = Record {
            backend: "[2001:db8:19::99]:8080".parse().expect("addr"),
            ..record(42100, 0)
        };
        let other_port = Record {
            backend: SocketAddr::new(web_addr(0).ip(), WEB_PORT + 1),
            ..record(42101, 0)
        };
        let no_service = Record {
            vip: SocketAddr::new(vip(VIP_NAT6).ip(), 8443),
            ..record(42102, 0)
        };
        // The DSR service on a NAT record: another service.
        let wrong_mode = Record {
            vip: vip(VIP_DSR6),
            ..record(42103, 0)
        };
        for (r, why) in [
            (stranger, RecordReject::UnknownBackend),
            (other_port, RecordReject::UnknownBackend),
            (no_service, RecordReject::UnknownService),
            (wrong_mode, RecordReject::UnknownService),
        ] {
            assert_eq!(
                apply(&mut maps, &dir, &r, now()).expect("apply"),
                Applied::Rejected(why),
                "{r:?}"
            );
            let key = FlowKey6 {
                daddr: addr_of(VIP_DSR6),
                ..key6(r.client.port(), VIP_NAT6)
            };
            assert!(
                established(&h, &key6(r.client.port(), VIP_NAT6)).is_none()
                    && established(&h, &key).is_none(),
                "{r:?} created a flow"
            );
        }
        // A local flow keeps its backend, whatever a peer says.
        let web = open_nat(&mut h, 42200, &mut |_| {});
        let other = (web + 1) % 3;
        assert_eq!(
            apply(&mut maps, &dir, &record(42200, other), now()).expect("apply"),
            Applied::KeptLocal
        );
        served_by(&mut h, 42200, web);
        let local = established(&h, &key6(42200, VIP_NAT6)).expect("local");
        assert_eq!(local.flags & FLOW_F_SYNCED, 0, "still the local entry");
    });
}

fn now() -> u32 {
    lb_userspace::dataplane::sweep::now_ticks()
}

/// Two LBs with the same dual-stack config: a NAT66 flow A had before
/// sync ran reaches B by the bulk copy, one A opens later by its event
/// (in a message of IPv6 records), and B serves both to A's webs, replies
/// translated.
#[test]
fn two_lbs_sync_ipv6_flows_over_udp_by_events_and_the_bulk_copy() {
    let net = dual_stack_net();
    net.ip(&["link", "set", "lo", "up"]);
    net.run(|| {
        let (a_addr, b_addr) = ([127, 0, 0, 1], [127, 0, 0, 2]);
        let mut a = harness();
        let mut b = harness();
        let before = open_nat(&mut a, 43000, &mut |_| {});
        let (_a_stats, answered) = start_sync(&a, a_addr, &[b_addr]);
        assert!(!answered, "no peer answered A: its bulk copy times out");
        let (b_stats, answered) = start_sync(&b, b_addr, &[a_addr]);
        assert!(answered, "A answered B's bulk request");
        let copied = established(&b, &key6(43000, VIP_NAT6)).expect("A's flow on B by the bulk");
        assert_eq!(copied.flags & FLOW_F_SYNCED, FLOW_F_SYNCED);
        served_by(&mut b, 43000, before);
        // A flow A opens now reaches B within a batch or so.
        let after = open_nat(&mut a, 43001, &mut |_| {});
        eventually("A's new IPv6 flow on B", || {
            established(&b, &key6(43001, VIP_NAT6)).is_some()
        });
        served_by(&mut b, 43001, after);
        let status = b_stats.status();
        assert!(status.peers[0].flows_received >= 2, "{status:?}");
        assert!(status.peers[0].rejected.is_empty(), "{status:?}");
    });
}
