//! Kernel tier (issue 23): the flow tables' clock and layout. The real
//! `lb` object under BPF_PROG_TEST_RUN in the kernel tier's namespace
//! (tests/src/kernel_net.rs).
//!
//! - The data plane reads its clock from the kernel's jiffies (no helper
//!   call per packet) and stamps entries on the agent's clock
//!   (CLOCK_MONOTONIC_COARSE, in ticks), which the sweep and the status
//!   compare them with.
//! - A `FLOW_CONF` pinned before the clock joined it is refused clearly.
//! - The established table (`ESTABLISHED`): one slot holds both directions
//!   of a NAT flow; a bucket whose ways hold live flows is never made room
//!   in by evicting one (the agent's `insert_established` says "full", the
//!   data plane's promotion goes to the overflow, `CONNTRACK`), and the
//!   overflowed flow still forwards both ways; the sweep empties an
//!   expired slot and counts it for its backend.
//! - `lb explain`'s facts judge an entry's expiry as the data plane does
//!   (a NAT flow's live reply direction keeps it; both expired: a miss).
//!
//! Needs root and BPF; without them the tests fail loudly.

use lb_common::{
    Flow, FlowKey, SLOT_F_OVERFLOWED, Verdict,
    flow::{FORWARD, REPLY, STATE_ESTABLISHED},
    flow_table,
    map_names::MapName,
};
use lb_tests::{
    kernel_frames::{ACK, SYN_ACK, Tcp, from_web, web_of, with_flags},
    kernel_net::{
        Bpffs, CLIENT, CLIENT_MAC, FRONT_MAC, Harness, TestNet, VIP, WEBS,
        expect_old_version_refused, lab_config, pin_old_layout, udp,
    },
};
use lb_userspace::{
    dataplane::{Dataplane, InsertError, Inserted, sweep::now_ticks},
    harness::xdp::XDP_REDIRECT,
};

fn key(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> FlowKey {
    FlowKey {
        saddr: u32::from_ne_bytes(src),
        daddr: u32::from_ne_bytes(dst),
        sport: sport.to_be(),
        dport: dport.to_be(),
        protocol: 17,
        ..FlowKey::default()
    }
}

/// A flow's `seen` is the agent's "now": the program's jiffies clock and
/// the agent's coarse clock agree to within the tick the program may run
/// ahead, at the first packet (half-open) and after promotion
/// (established), seconds apart.
#[test]
fn flows_are_stamped_on_the_agents_clock() {
    let net = TestNet::new();
    net.run(|| {
        let mut h = Harness::new(&lab_config());
        let flow = key(CLIENT, 40_000, VIP, 5353);
        let datagram = udp(CLIENT_MAC, FRONT_MAC, CLIENT, VIP, 64, 40_000, 5353, b"q");
        let stamp = |h: &mut Harness, want_established: bool| {
            let before = now_ticks();
            h.expect(h.front, &datagram, XDP_REDIRECT, Verdict::Forwarded);
            let after = now_ticks();
            let (established, entry) =
                h.dp.flow_table()
                    .expect("flow table")
                    .lookup(&flow)
                    .expect("lookup")
                    .expect("the flow has an entry");
            assert_eq!(established, want_established);
            assert!(
                (before..=after + 1).contains(&entry.seen),
                "stamped {} on the data plane's clock, the agent's read {before}..={after}",
                entry.seen
            );
            entry.seen
        };
        let first = stamp(&mut h, false);
        std::thread::sleep(std::time::Duration::from_millis(2300));
        // UDP: the second packet promotes; its stamp is two ticks on.
        let second = stamp(&mut h, true);
        assert!(
            (2..=3).contains(&second.wrapping_sub(first)),
            "2.3 s is 2 or 3 ticks of 1.07 s: {first} → {second}"
        );
    });
}

/// `FLOW_CONF` grew the clock's settings (jiffy length, epoch): one pinned
/// by an earlier version cannot be adopted (the verifier would reject the
/// program reading past its end). The loader refuses clearly, saying what
/// to do, and leaves the pins as they were.
#[test]
fn a_flow_conf_pinned_before_the_jiffies_clock_is_refused_clearly() {
    let net = TestNet::new();
    let fs = Bpffs::new();
    let pins = fs.dir.join("lb");
    net.run(|| {
        let cfg = lab_config();
        let (first, adopted) = Dataplane::load_pinned(&cfg.dataplane, &pins).expect("load pinned");
        assert!(!adopted);
        drop(first);
        // As the version before: timeouts, budget, half-open size and seed.
        pin_old_layout(
            &pins,
            "FLOW_CONF",
            aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_ARRAY,
            4,
            28,
        );
        expect_old_version_refused(
            &cfg.dataplane,
            &pins,
            "FLOW_CONF",
            &["of 28-byte entries", "of 48-byte entries"],
        );
    });
}

/// The client → VIP:80 key of a lab client's TCP connection from `sport`.
fn tcp_key(sport: u16, vip: [u8; 4]) -> FlowKey {
    FlowKey {
        saddr: u32::from_ne_bytes(CLIENT),
        daddr: u32::from_ne_bytes(vip),
        sport: sport.to_be(),
        dport: 80u16.to_be(),
        protocol: 6,
        ..FlowKey::default()
    }
}

/// The client's bare ACK on its connection to the VIP from `port`.
fn client_ack(port: u16) -> Vec<u8> {
    with_flags(
        Tcp {
            syn: false,
            ..Tcp::request(port, VIP)
        }
        .build(),
        ACK,
    )
}

/// SYN, the web's SYN-ACK, the client's ACK: a NAT connection from `port`
/// established; the web server it went to.
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
    h.expect(h.front, &client_ack(port), XDP_REDIRECT, Verdict::Forwarded);
    web
}

/// Entries in `CONNTRACK`, the established table's overflow.
fn overflow_entries(h: &Harness) -> usize {
    use aya::maps::{HashMap, Map, MapData};
    let data = h.dp.map_data(MapName::CONNTRACK).expect("CONNTRACK");
    let map: HashMap<MapData, FlowKey, Flow> =
        HashMap::try_from(Map::HashMap(data)).expect("a hash map");
    map.keys().count()
}

/// A live established DSR flow from the lab client's `sport` to a made-up
/// VIP `vip` (same client address and port: the same bucket).
fn made_up(sport: u16, vip: [u8; 4], seen: u32) -> (FlowKey, Flow) {
    let key = tcp_key(sport, vip);
    let flow = Flow {
        backend_id: 1,
        service_id: 0,
        state: STATE_ESTABLISHED,
        seen,
        direction: FORWARD,
        ..Flow::default()
    };
    (key, flow)
}

/// Both directions of a NAT connection live in one slot of `ESTABLISHED`
/// (nothing in the overflow). A connection whose bucket's two ways hold
/// live flows evicts neither: the agent's `insert_established` refuses
/// ("full"), the data plane's promotion puts it in the overflow and flags
/// the bucket, and it forwards both ways from there. The sweep then keeps
/// the bucket's live flows and the flag (its overflowed flow is still
/// there).
#[test]
fn a_nat_flow_is_one_slot_and_a_full_bucket_overflows_without_evicting() {
    let net = TestNet::new();
    net.run(|| {
        let mut h = Harness::new(&lab_config());
        let port = 41_000;
        let web = open(&mut h, port);
        let key = tcp_key(port, VIP);
        let table = h.dp.established_table().expect("ESTABLISHED");
        let slots = table.occupied();
        assert_eq!(slots.len(), 1, "one slot for the flow: {slots:?}");
        let slot = slots[0];
        assert_eq!(slot.key, key);
        assert_eq!(slot.forward.direction, FORWARD);
        assert_eq!(slot.forward.state, STATE_ESTABLISHED);
        let (reply_key, reply) = flow_table::reply_entry(&slot).expect("a NAT flow's reply side");
        assert_eq!(reply_key.saddr, u32::from_ne_bytes(WEBS[web]));
        assert_eq!(reply_key.daddr, key.saddr);
        assert_eq!((reply.direction, reply.state), (REPLY, STATE_ESTABLISHED));
        assert_eq!(overflow_entries(&h), 0, "nothing in the overflow");
        assert_eq!(
            h.dp.flow_table()
                .expect("flows")
                .entries()
                .expect("entries")
                .0,
            2,
            "two entries (directions), one slot"
        );

        // Fill the bucket of the client's next port with two live flows
        // (same client address and port, other VIPs: same bucket).
        let conf = h.dp.flow_conf().expect("FLOW_CONF");
        let now = now_ticks();
        let next = 41_001;
        let filler = [[198, 18, 0, 98], [198, 18, 0, 99]].map(|vip| made_up(next, vip, now));
        for (k, f) in &filler {
            assert_eq!(
                table.insert_established(k, f, None, &conf, now),
                Ok(Inserted::New { ended: None })
            );
        }
        let (third, f) = made_up(next, [198, 18, 0, 97], now);
        assert_eq!(
            table.insert_established(&third, &f, None, &conf, now),
            Err(InsertError::TableFull),
            "a full bucket evicts no live flow"
        );

        let web = open(&mut h, next);
        let key = tcp_key(next, VIP);
        for (k, _) in &filler {
            assert!(table.get(k, &conf).is_some(), "{k:?} was evicted");
        }
        assert!(table.get(&key, &conf).is_none(), "no way was free");
        assert_eq!(overflow_entries(&h), 2, "forward and reply in the overflow");
        let flagged = table.overflowed_buckets();
        assert_eq!(flagged.len(), 1, "{flagged:?}");
        let found =
            h.dp.flow_table()
                .expect("flows")
                .lookup(&key)
                .expect("lookup");
        assert!(matches!(found, Some((true, _))), "{found:?}");
        // Both directions forward from the overflow.
        h.expect(h.front, &client_ack(next), XDP_REDIRECT, Verdict::Forwarded);
        let back = h.back;
        h.expect(
            back,
            &from_web(web, next, ACK),
            XDP_REDIRECT,
            Verdict::ForwardedReply,
        );
        // The sweep keeps live flows and the flag of a bucket whose flow is
        // still in the overflow.
        let report =
            h.dp.sweeper()
                .expect("sweeper")
                .sweep(now_ticks())
                .expect("sweep");
        assert_eq!(report.removed, 0, "{report:?}");
        assert_eq!(table.overflowed_buckets(), flagged);
        let first = table
            .read_slot(flagged[0])
            .expect("a filler in the first way");
        assert_eq!(
            u32::from(first.flags) & SLOT_F_OVERFLOWED,
            SLOT_F_OVERFLOWED
        );
    });
}

/// An established flow idle past its timeout in `ESTABLISHED` is emptied
/// by the sweep, counted as swept for its backend, and its slot is free
/// again for `insert_established` (which takes an expired way, never a
/// live one).
#[test]
fn the_sweep_empties_an_expired_slot_and_counts_it() {
    let net = TestNet::new();
    net.run(|| {
        let h = Harness::new(&lab_config());
        let table = h.dp.established_table().expect("ESTABLISHED");
        let conf = h.dp.flow_conf().expect("FLOW_CONF");
        let now = now_ticks();
        let tcp_timeout = conf.timeouts[lb_common::flow::Timeout::Tcp as usize];
        let (stale, old) = made_up(42_000, [198, 18, 0, 96], now.wrapping_sub(tcp_timeout + 2));
        let (live, fresh) = made_up(42_000, [198, 18, 0, 95], now);
        assert!(
            table
                .insert_established(&stale, &old, None, &conf, now)
                .is_ok()
        );
        assert!(
            table
                .insert_established(&live, &fresh, None, &conf, now)
                .is_ok()
        );
        let report = h.dp.sweeper().expect("sweeper").sweep(now).expect("sweep");
        assert_eq!(report.removed, 1, "{report:?}");
        assert_eq!(report.swept.get(&1), Some(&1), "{report:?}");
        assert!(table.get(&stale, &conf).is_none());
        assert!(table.get(&live, &conf).is_some());
        // An expired way is free; with it the bucket takes a third flow.
        let (third, f) = made_up(42_000, [198, 18, 0, 94], now);
        assert_eq!(
            table.insert_established(&third, &f, None, &conf, now),
            Ok(Inserted::New { ended: None })
        );
    });
}

/// `lb explain` of a connection as its entry ages, judged as the data
/// plane judges it: live, pinned; its forward entry past the timeout but
/// the reply direction live, still pinned (and the client's next segment
/// forwarded); both past it, "expired" and a new flow — and the client's
/// next segment is indeed a miss (`DropNoFlow`: round robin cannot place a
/// mid-stream segment).
#[test]
fn explain_says_an_expired_entry_is_a_miss_as_the_data_plane_finds_it() {
    use lb_userspace::explain::{FlowQuery, explain};
    let net = TestNet::new();
    net.run(|| {
        let mut h = Harness::new(&lab_config());
        let port = 43_000;
        open(&mut h, port);
        let key = tcp_key(port, VIP);
        let q = FlowQuery::parse(
            &format!("{}:{port}", std::net::Ipv4Addr::from(CLIENT)),
            &format!("{}:80/tcp", std::net::Ipv4Addr::from(VIP)),
        )
        .expect("query");
        let said = |h: &Harness| {
            let facts = h.dp.flow_facts(&key).expect("facts");
            let age = facts.age.expect("an entry's age");
            (age, explain(&q, &facts, None, &[]))
        };
        let (age, text) = said(&h);
        assert!(!age.expired, "{age:?}");
        assert!(text.contains("pinned by conntrack"), "{text}");
        assert!(text.contains("timeout 900 s (tcp)"), "{text}");

        let table = h.dp.established_table().expect("ESTABLISHED");
        let conf = h.dp.flow_conf().expect("FLOW_CONF");
        let tcp_timeout = conf.timeouts[lb_common::flow::Timeout::Tcp as usize];
        // Two ticks past it: the data plane's clock may run one ahead.
        let stale = now_ticks().wrapping_sub(tcp_timeout + 2);
        table
            .update(&key, &conf, |s| s.forward.seen = stale)
            .expect("the flow's slot");
        let (age, text) = said(&h);
        assert!(age.expired && age.pair_live, "{age:?}");
        assert!(text.contains("the entry stays"), "{text}");
        assert!(text.contains("pinned by conntrack"), "{text}");
        h.expect(h.front, &client_ack(port), XDP_REDIRECT, Verdict::Forwarded);

        table
            .update(&key, &conf, |s| {
                s.forward.seen = stale;
                s.reply.seen = stale;
            })
            .expect("the flow's slot");
        let (age, text) = said(&h);
        assert!(age.is_miss() && age.idle >= tcp_timeout + 2, "{age:?}");
        assert!(
            text.contains(&format!("expired: idle {} ticks", age.idle)),
            "{text}"
        );
        assert!(
            text.contains("timeout 900 s (tcp): the next packet is a miss"),
            "{text}"
        );
        assert!(!text.contains("pinned by conntrack"), "{text}");
        h.expect(
            h.front,
            &client_ack(port),
            lb_userspace::harness::xdp::XDP_DROP,
            Verdict::DropNoFlow,
        );
    });
}
