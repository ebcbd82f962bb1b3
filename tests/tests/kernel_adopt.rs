//! Kernel tier, adopting a pinned data plane: a restarted agent keeps the
//! pinned flows, counters and firewall rules; pin dirs from older versions
//! are adopted (before the trace maps, before the firewall) or refused
//! before anything is touched (another conntrack-size, before the flow
//! lifecycle).
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
use lb_tests::kernel_net6::{config_v6, dual_stack_net};
use lb_tests::{
    kernel_frames::{Tcp, from, syn_ack_to, web_of},
    kernel_net::{
        Bpffs, CLIENT, CLIENT_MAC, FRONT_MAC, Harness, TestNet, VIP, expect_rule, lab_config,
        pinned_files, prefix, rule_counts, test_run, udp,
    },
};
use lb_userspace::{
    config::{Config, Service},
    dataplane::{Dataplane, MapName},
    harness::xdp::{self, XDP_DROP, XDP_PASS, XDP_REDIRECT},
};

/// A fresh data plane pinned under `pins` with `conntrack` flow entries, the
/// lab config applied, and one flow from client port `sport` (to web1, the
/// first in the ring). Runs inside the test namespace.
fn first_pinned_flow(pins: &std::path::Path, conntrack: u32, sport: u16) -> Dataplane {
    let front = xdp::ifindex("f0").expect("f0");
    let (mut first, adopted) = Dataplane::load_pinned(conntrack, pins).expect("load pinned");
    assert!(!adopted);
    first.apply(&lab_config()).expect("apply");
    let (_, out) = test_run(&mut first, front, &Tcp::request(sport, VIP).build());
    assert_eq!(web_of(&out), 0);
    let back = xdp::ifindex("b0").expect("b0");
    assert_eq!(
        test_run(&mut first, back, &syn_ack_to(&out)).0,
        XDP_REDIRECT
    );
    first
}

#[test]
fn a_restarted_data_plane_adopts_pinned_flows_and_counters() {
    let net = TestNet::new();
    let fs = Bpffs::new();
    let pins = fs.dir.join("lb");
    net.run(|| {
        let cfg = lab_config();
        let front = xdp::ifindex("f0").expect("f0");
        let run = |dp: &mut Dataplane, frame: &[u8]| test_run(dp, front, frame).1;
        drop(first_pinned_flow(&pins, 65536, 48000));

        // A new agent: same pins, so the flow table, ring position and ids survive.
        let (mut second, adopted) = Dataplane::load_pinned(65536, &pins).expect("adopt");
        assert!(adopted);
        second.apply(&cfg).expect("re-apply");
        assert_eq!(
            web_of(&run(
                &mut second,
                &Tcp {
                    syn: false,
                    ..Tcp::request(48000, VIP)
                }
                .build()
            )),
            0,
            "established flow kept"
        );
        assert_eq!(
            web_of(&run(&mut second, &Tcp::request(48001, VIP).build())),
            1,
            "round robin continues where it was"
        );
        let removed = Dataplane::teardown(&pins).expect("teardown");
        assert!(removed.contains(&"CONNTRACK".to_string()), "{removed:?}");
        assert!(!pins.exists());
    });
}

/// What a restarted agent starts as up (`Dataplane::ring_members`): the
/// backends in each service's adopted ring, IPv6 services' too (their
/// addresses from `BACKENDS6`). A backend out of its ring (weight 0) is
/// not named, nor a backend of another service on the same address.
#[test]
fn the_adopted_rings_name_their_backends_in_either_family() {
    let net = dual_stack_net();
    let fs = Bpffs::new();
    let pins = fs.dir.join("lb");
    net.run(|| {
        let mut cfg = config_v6();
        for s in &mut cfg.services {
            if s.name == "www" || s.name == "www6" {
                s.backends[2].weight = 0;
            }
        }
        let (mut first, adopted) = Dataplane::load_pinned(&cfg.dataplane, &pins).expect("load");
        assert!(!adopted);
        first.apply(&cfg).expect("apply");
        drop(first);

        let (second, adopted) = Dataplane::load_pinned(&cfg.dataplane, &pins).expect("adopt");
        assert!(adopted);
        let serving = second.ring_members().expect("ring members");
        let mut v6 = 0;
        for s in &cfg.services {
            for (i, b) in s.backends.iter().enumerate() {
                let out = (s.name == "www" || s.name == "www6") && i == 2;
                assert_eq!(
                    serving.serves(s, b),
                    !out,
                    "{} {} ({})",
                    s.name,
                    b.name,
                    b.address
                );
                v6 += usize::from(b.address.is_ipv6() && !out);
            }
        }
        assert!(v6 >= 8, "IPv6 backends named: {v6}");
        // An address and port in another service's ring is not this
        // service's: dsr6 has web1 at :80, www6 has it at its WEB_PORT.
        let (www6, dsr6) = (service_named(&cfg, "www6"), service_named(&cfg, "dsr6"));
        let mut moved = www6.backends[0].clone();
        moved.address = dsr6.backends[0].address;
        assert!(serving.serves(dsr6, &dsr6.backends[0]));
        assert!(
            !serving.serves(www6, &moved),
            "dsr6's backend is not www6's"
        );
        Dataplane::teardown(&pins).expect("teardown");
    });
}

fn service_named<'a>(cfg: &'a Config, name: &str) -> &'a Service {
    cfg.services
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no service {name}"))
}

/// Item 5b: adopting pinned maps cannot change their size, so a changed
/// conntrack-size is refused (with how to fix it) before anything is touched.
#[test]
fn adopting_a_pinned_data_plane_with_another_conntrack_size_is_refused() {
    use lb_userspace::dataplane::DataplaneError;
    let net = TestNet::new();
    let fs = Bpffs::new();
    let pins = fs.dir.join("lb");
    net.run(|| {
        let cfg = lab_config();
        let front = xdp::ifindex("f0").expect("f0");
        drop(first_pinned_flow(&pins, 1024, 51000));
        let before = pinned_files(&pins);

        let err = match Dataplane::load_pinned(2048, &pins) {
            Ok(_) => panic!("adopted a data plane with another conntrack-size"),
            Err(e) => e,
        };
        assert!(
            matches!(
                err,
                DataplaneError::ConntrackSize {
                    configured: 2048,
                    pinned: 1024,
                    ..
                }
            ),
            "{err:?}"
        );
        let message = err.to_string();
        let dir = pins.display().to_string();
        for part in [
            "conntrack-size is 2048 in the config".to_string(),
            format!("under {dir} has 1024"),
            "set conntrack-size = 1024".to_string(),
            format!("`lb teardown --pin-dir {dir}`"),
        ] {
            assert!(message.contains(&part), "{part:?} not in: {message}");
        }
        assert_eq!(pinned_files(&pins), before, "the refusal changed the pins");

        // The same size adopts, with the flow table intact.
        let (mut second, adopted) = Dataplane::load_pinned(1024, &pins).expect("adopt");
        assert!(adopted);
        second.apply(&cfg).expect("re-apply");
        let ack = Tcp {
            syn: false,
            ..Tcp::request(51000, VIP)
        };
        let (_, out) = test_run(&mut second, front, &ack.build());
        assert_eq!(web_of(&out), 0, "the pinned flow survived the refusal");
        drop(second);
        Dataplane::teardown(&pins).expect("teardown");
    });
}

#[test]
fn a_pinned_data_plane_without_the_trace_maps_gets_them_when_adopted() {
    let net = TestNet::new();
    let fs = Bpffs::new();
    let pins = fs.dir.join("lb");
    net.run(|| {
        let cfg = lab_config();
        let (mut first, _) = Dataplane::load_pinned(65536, &pins).expect("load pinned");
        first.apply(&cfg).expect("apply");
        drop(first);
        // As an older version left it: no TRACE, no TRACE_ON.
        for map in [MapName::TRACE, MapName::TRACE_ON] {
            std::fs::remove_file(pins.join(map.name())).expect("unpin");
        }
        let (mut second, adopted) = Dataplane::load_pinned(65536, &pins).expect("adopt");
        assert!(adopted);
        second.apply(&cfg).expect("re-apply");
        for map in MapName::pinned() {
            assert!(pins.join(map.name()).exists(), "{map} pinned");
        }
        let mut tracer = lb_userspace::trace::Tracer::open(&pins).expect("open the pins");
        tracer
            .start(lb_common::TRACE_DEFAULT_VERDICTS)
            .expect("start");
        let index = unsafe { libc::if_nametoindex(c"f0".as_ptr()) };
        let frame = udp(CLIENT_MAC, FRONT_MAC, CLIENT, VIP, 64, 43200, 9, b"x");
        assert_eq!(test_run(&mut second, index, &frame).0, XDP_PASS);
        let events = tracer.drain();
        assert_eq!(events.len(), 1, "the adopted program writes the new maps");
        tracer.stop().expect("stop");
        drop(tracer);
        Dataplane::teardown(&pins).expect("teardown");
    });
}

/// A restarted agent reads the firewall back from the pins: the rules keep
/// their ids and counters, and a config without a rule removes it (it is not
/// left behind, unknown to the new agent).
#[test]
fn a_restarted_data_plane_adopts_its_firewall_rules() {
    use lb_common::FW_GLOBAL;
    let net = TestNet::new();
    let fs = Bpffs::new();
    let pins = fs.dir.join("lb");
    net.run(|| {
        let mut cfg = lab_config();
        cfg.firewall.deny = vec![prefix("203.0.113.0/24"), prefix("192.0.2.0/24")];
        let denied = from([203, 0, 113, 9], 42000, VIP, true);
        {
            let (mut first, adopted) = Dataplane::load_pinned(65536, &pins).expect("load");
            assert!(!adopted);
            first.apply(&cfg).expect("apply");
            let front = xdp::ifindex("f0").expect("f0");
            assert_eq!(test_run(&mut first, front, &denied).0, XDP_DROP);
        }
        let (second, adopted) = Dataplane::load_pinned(65536, &pins).expect("adopt");
        assert!(adopted);
        let mut h = Harness {
            dp: second,
            front: xdp::ifindex("f0").expect("f0"),
            back: xdp::ifindex("b0").expect("b0"),
        };
        let counts = rule_counts(&h.dp);
        assert_eq!(counts[&(FW_GLOBAL, "deny 203.0.113.0/24".to_owned())], 1);
        assert_eq!(counts.len(), 2);
        cfg.firewall.deny.pop();
        h.dp.apply(&cfg).expect("re-apply without 192.0.2.0/24");
        assert_eq!(rule_counts(&h.dp).len(), 1);
        expect_rule(
            &mut h,
            "the adopted rule still drops and counts",
            &denied,
            XDP_DROP,
            Verdict::DropFirewallDeny,
            Some((FW_GLOBAL, "deny 203.0.113.0/24")),
        );
        expect_rule(
            &mut h,
            "the rule the new config dropped is gone",
            &from([192, 0, 2, 1], 42001, VIP, true),
            XDP_REDIRECT,
            Verdict::Forwarded,
            None,
        );
        Dataplane::teardown(&pins).expect("teardown");
    });
}

/// A pin dir from before the firewall: its `VERDICTS` has 14 slots and keeps
/// them when adopted (a pinned map keeps its size). The verdicts reader does
/// not fail on the three new ones (they read 0), the others still count,
/// and the firewall maps are created and work.
#[test]
fn a_pinned_data_plane_from_before_the_firewall_is_adopted() {
    use aya::maps::PerCpuArray;
    let net = TestNet::new();
    let fs = Bpffs::new();
    let pins = fs.dir.join("lb");
    net.run(|| {
        let mut cfg = lab_config();
        let (mut first, _) = Dataplane::load_pinned(65536, &pins).expect("load pinned");
        first.apply(&cfg).expect("apply");
        drop(first);
        // As an older version left it: 14 verdicts, no firewall maps.
        for map in MapName::pinned()
            .filter(|m| m.name().starts_with("FW_"))
            .chain([MapName::VERDICTS])
        {
            std::fs::remove_file(pins.join(map.name())).expect("unpin");
        }
        PerCpuArray::<_, u64>::create(14, 0)
            .expect("create an old VERDICTS")
            .pin(pins.join(MapName::VERDICTS.name()))
            .expect("pin it");
        let (second, adopted) = Dataplane::load_pinned(65536, &pins).expect("adopt");
        assert!(adopted);
        let mut h = Harness {
            dp: second,
            front: xdp::ifindex("f0").expect("f0"),
            back: xdp::ifindex("b0").expect("b0"),
        };
        cfg.firewall.deny = vec![prefix("203.0.113.0/24")];
        h.dp.apply(&cfg).expect("apply with a rule");
        let denied = from([203, 0, 113, 9], 42000, VIP, true);
        let front = h.front;
        assert_eq!(h.run(front, &denied).0, XDP_DROP);
        h.expect(
            front,
            &Tcp::request(42001, VIP).build(),
            XDP_REDIRECT,
            Verdict::Forwarded,
        );
        let verdicts = h.verdicts();
        assert_eq!(verdicts.len(), lb_common::VERDICT_COUNT as usize);
        let deny = verdicts
            .iter()
            .find(|(v, _)| *v == Verdict::DropFirewallDeny);
        assert_eq!(
            deny,
            Some(&(Verdict::DropFirewallDeny, 0)),
            "not counted there"
        );
        let counts = rule_counts(&h.dp);
        assert_eq!(counts.values().copied().collect::<Vec<_>>(), vec![1]);
        Dataplane::teardown(&pins).expect("teardown");
    });
}

/// Issue 11: a pin dir left by the version before the flow lifecycle (its
/// replies in a `REVERSE_NAT` table of their own) cannot be adopted: the
/// agent refuses before touching anything and says how to go on.
#[test]
fn adopting_a_data_plane_from_before_the_flow_lifecycle_is_refused() {
    refuses_a_pin_dir_holding("REVERSE_NAT");
}

/// Issue 25: a pin dir whose full-NAT claims are in the kernel hash
/// `FNAT_REPLIES` (the version before `FNAT_CLAIMS`) cannot be adopted:
/// its full-NAT flows' replies are found only through those claims.
#[test]
fn adopting_a_data_plane_with_full_nats_claims_in_a_hash_is_refused() {
    refuses_a_pin_dir_holding("FNAT_REPLIES");
}

/// A pin dir holding `old`, a map this version no longer has, with a
/// pinned flow, is refused as an earlier version's (naming `old` and the
/// teardown), and left untouched.
fn refuses_a_pin_dir_holding(old: &'static str) {
    use lb_userspace::dataplane::DataplaneError;
    let net = TestNet::new();
    let fs = Bpffs::new();
    let pins = fs.dir.join("lb");
    net.run(|| {
        let first = first_pinned_flow(&pins, 1024, 51500);
        // What the old version left: `old` pinned with the rest.
        let map = first.map_data(MapName::VIPS).expect("a map to stand in");
        map.pin(pins.join(old)).expect("pin the old map");
        drop(first);
        let err = match Dataplane::load_pinned(1024, &pins) {
            Ok(_) => panic!("adopted a data plane of the previous version"),
            Err(e) => e,
        };
        assert!(
            matches!(err, DataplaneError::OldVersion { map, .. } if map == old),
            "{err:?}"
        );
        let message = err.to_string();
        let dir = pins.display().to_string();
        for part in [
            "from an earlier version of lb",
            &format!("`lb teardown --pin-dir {dir}`"),
        ] {
            assert!(message.contains(part), "{part:?} not in: {message}");
        }
        // Refused means untouched: the flow is still pinned.
        assert!(pins.join("CONNTRACK").exists() && pins.join("HALF_OPEN").exists());
        assert!(pins.join(old).exists());
        Dataplane::teardown(&pins).expect("teardown");
    });
}

/// Issue 23: a pinned pair of flow tables placed by another bucket hash
/// (the version before `FlowConf::table_version`, whose word there was 0)
/// is refused before anything is touched: every flow would be looked for
/// in another bucket. The same pins with this version's word are adopted.
#[test]
fn adopting_flow_tables_placed_by_another_bucket_hash_is_refused() {
    use aya::maps::{Array, Map, MapData};
    use lb_common::{FlowConf, flow::TABLE_VERSION};
    use lb_userspace::dataplane::DataplaneError;
    let net = TestNet::new();
    let fs = Bpffs::new();
    let pins = fs.dir.join("lb");
    let set_version = |version: u32| {
        let data = MapData::from_pin(pins.join("FLOW_CONF")).expect("pinned FLOW_CONF");
        let mut conf: Array<MapData, FlowConf> =
            Array::try_from(Map::Array(data)).expect("FLOW_CONF");
        let mut c = conf.get(&0, 0).expect("FLOW_CONF[0]");
        assert_ne!(c.half_open_seed, 0, "the tables have their seed");
        let was = c.table_version;
        c.table_version = version;
        conf.set(0, c, 0).expect("write FLOW_CONF");
        was
    };
    net.run(|| {
        drop(first_pinned_flow(&pins, 1024, 51600));
        // This version wrote its own; the previous one left 0 there.
        assert_eq!(set_version(0), TABLE_VERSION);
        let err = match Dataplane::load_pinned(1024, &pins) {
            Ok(_) => panic!("adopted flow tables placed by another bucket hash"),
            Err(e) => e,
        };
        assert!(
            matches!(
                err,
                DataplaneError::OldVersion {
                    map: "FLOW_CONF",
                    ..
                }
            ),
            "{err:?}"
        );
        let message = err.to_string();
        let dir = pins.display().to_string();
        for part in [
            "from an earlier version of lb",
            "flows placed by bucket hash version 0",
            &format!("`lb teardown --pin-dir {dir}`"),
        ] {
            assert!(message.contains(part), "{part:?} not in: {message}");
        }
        // Refused means untouched: the tables and the word are still there.
        assert!(pins.join("ESTABLISHED").exists() && pins.join("HALF_OPEN").exists());
        assert_eq!(set_version(TABLE_VERSION), 0);
        let (_, adopted) = Dataplane::load_pinned(1024, &pins).expect("adopt");
        assert!(adopted, "this version's tables are adopted");
        Dataplane::teardown(&pins).expect("teardown");
    });
}
