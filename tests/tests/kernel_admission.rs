//! Kernel tier, what the rings admit: atomic ring switches that keep
//! established flows, drained, disabled and backup backends, a SYN on a
//! reused tuple whose backend left the ring, and a reload that replaces
//! every backend at the limit (a rejected apply changes nothing).
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
    kernel_frames::{Tcp, WEB_SEQ, answer, web_of},
    kernel_net::{
        BACK_MAC, CLIENT, CLIENT_MAC, FRONT_MAC, Harness, TestNet, VIP, VIP_DSR, WEB_MACS,
        WEB_PORT, WEBS, backend, lab_config, service, udp,
    },
};
use lb_userspace::{
    config::{Backend, Config, Forwarding, Protocol, Scheduler, Service},
    dataplane::{Dataplane, MapName},
    harness::xdp::{XDP_DROP, XDP_REDIRECT},
};

/// A SYN from the client's `port` to `vip`:80, answered by its web's
/// SYN-ACK: the web it went to.
fn syn_answered(h: &mut Harness, port: u16, vip: [u8; 4]) -> usize {
    let (action, out) = h.run(h.front, &Tcp::request(port, vip).build());
    assert_eq!(action, XDP_REDIRECT);
    answer(h, &out);
    web_of(&out)
}

#[test]
fn ring_update_switches_atomically_and_keeps_established_flows() {
    let net = TestNet::new();
    net.run(|| {
        let mut cfg = lab_config();
        let mut h = Harness::new(&cfg);
        let (_, out) = h.run(h.front, &Tcp::request(46000, VIP).build());
        assert_eq!(web_of(&out), 0);
        answer(&mut h, &out);
        // web1 leaves the ring: new flows only see web2/web3 ...
        cfg.services[0].backends[0].weight = 0;
        h.dp.apply(&cfg).expect("apply");
        let next: Vec<usize> = (1..7u16)
            .map(|i| {
                let out = h.run(h.front, &Tcp::request(46000 + i, VIP).build()).1;
                answer(&mut h, &out);
                web_of(&out)
            })
            .collect();
        assert!(next.iter().all(|&w| w != 0), "{next:?}");
        // ... but the established flow keeps web1.
        let (_, out) = h.run(
            h.front,
            &Tcp {
                syn: false,
                ..Tcp::request(46000, VIP)
            }
            .build(),
        );
        assert_eq!(web_of(&out), 0);
        // Removing web3 entirely drops its pinned flows deliberately.
        let web3_flow = (1..7u16)
            .find(|i| next[*i as usize - 1] == 2)
            .expect("a flow on web3");
        cfg.services[0].backends.remove(2);
        cfg.services[2].backends.remove(2);
        h.dp.apply(&cfg).expect("apply");
        h.expect(
            h.front,
            &Tcp {
                syn: false,
                ..Tcp::request(46000 + web3_flow, VIP)
            }
            .build(),
            XDP_DROP,
            Verdict::DropBackendGone,
        );
    });
}

#[test]
fn drain_disable_and_backup_admissions() {
    use lb_userspace::dataplane::Admission;
    let net = TestNet::new();
    net.run(|| {
        let mut cfg = lab_config();
        cfg.services[0].backends[2].backup = true; // web3 is www's backup
        let mut h = Harness::new(&cfg);
        let rotation: Vec<usize> = (0..4u16)
            .map(|i| syn_answered(&mut h, 49000 + i, VIP))
            .collect();
        assert_eq!(
            rotation,
            vec![0, 1, 0, 1],
            "the backup takes no traffic while primaries serve"
        );

        let admit = |drain: &'static str, disable: &'static str| {
            move |_: &Service, b: &Backend| {
                if b.name == drain {
                    Admission {
                        in_rotation: false,
                        drop_flows: false,
                    }
                } else if b.name == disable {
                    Admission {
                        in_rotation: false,
                        drop_flows: true,
                    }
                } else {
                    Admission::SERVING
                }
            }
        };
        // web1 drains, web2 is disabled: no primary left → the backup serves new
        // flows; web1's flow continues, web2's flow is dropped.
        h.dp.apply_with(&cfg, &admit("web1", "web2"))
            .expect("apply");
        let (_, out) = h.run(h.front, &Tcp::request(49100, VIP).build());
        assert_eq!(web_of(&out), 2, "backup takes over");
        let (_, out) = h.run(
            h.front,
            &Tcp {
                syn: false,
                ..Tcp::request(49000, VIP)
            }
            .build(),
        );
        assert_eq!(web_of(&out), 0, "drained backend keeps its flow");
        h.expect(
            h.front,
            &Tcp {
                syn: false,
                ..Tcp::request(49001, VIP)
            }
            .build(),
            XDP_DROP,
            Verdict::DropBackendGone,
        );

        // web1 back: new flows leave the backup.
        h.dp.apply_with(&cfg, &admit("none", "web2"))
            .expect("apply");
        let (_, out) = h.run(h.front, &Tcp::request(49200, VIP).build());
        assert_eq!(web_of(&out), 0);
    });
}

/// Admission for a test: `out` leaves the ring but keeps its flows (drain,
/// or down with keep-flows); every other backend serves.
fn out_of_ring(
    out: &'static str,
) -> impl Fn(&Service, &Backend) -> lb_userspace::dataplane::Admission {
    move |_: &Service, b: &Backend| {
        if b.name == out {
            lb_userspace::dataplane::Admission {
                in_rotation: false,
                drop_flows: false,
            }
        } else {
            lb_userspace::dataplane::Admission::SERVING
        }
    }
}

/// Item 8: a client that reuses a source port opens a new connection whose
/// tuple still has a CONNTRACK entry. A SYN is scheduled afresh when the
/// entry's backend left the ring; any other segment keeps the pinned flow.
#[test]
fn a_syn_on_a_reused_tuple_leaves_a_backend_out_of_the_ring() {
    let net = TestNet::new();
    net.run(|| {
        let cfg = lab_config();
        let mut h = Harness::new(&cfg);
        let syn = Tcp::request(50000, VIP);
        let ack = Tcp {
            syn: false,
            payload: b"GET / HTTP/1.1\r\n\r\n",
            ..Tcp::request(50000, VIP)
        };
        // What `lb` must send to web `w` for `sent`: DNAT to webN:8080.
        let to_web = |sent: &Tcp, w: usize| {
            Tcp {
                src_mac: BACK_MAC,
                dst_mac: WEB_MACS[w],
                dst: WEBS[w],
                dport: WEB_PORT,
                ttl: 63,
                options: sent.options,
                payload: sent.payload,
                ..*sent
            }
            .build()
        };
        let out = h.expect(h.front, &syn.build(), XDP_REDIRECT, Verdict::Forwarded);
        assert_eq!(out, to_web(&syn, 0), "the first SYN goes to web1");
        answer(&mut h, &out);

        // web1 still takes new flows: a repeated SYN keeps its entry.
        let out = h.expect(h.front, &syn.build(), XDP_REDIRECT, Verdict::Forwarded);
        assert_eq!(out, to_web(&syn, 0), "web1 in the ring keeps the tuple");

        // web1 leaves the ring, keeping its flows (drain / down keep-flows).
        h.dp.apply_with(&cfg, &out_of_ring("web1")).expect("apply");
        let out = h.expect(h.front, &ack.build(), XDP_REDIRECT, Verdict::Forwarded);
        assert_eq!(out, to_web(&ack, 0), "the established flow stays on web1");

        // A SYN on the same tuple is a new connection: not to web1.
        let out = h.expect(h.front, &syn.build(), XDP_REDIRECT, Verdict::Forwarded);
        let w = web_of(&out);
        assert_ne!(w, 0, "a new connection went to the drained web1");
        assert_eq!(out, to_web(&syn, w), "rescheduled SYN, byte for byte");
        answer(&mut h, &out);
        // The entry is re-pinned: the rest of the connection follows it.
        let out = h.expect(h.front, &ack.build(), XDP_REDIRECT, Verdict::Forwarded);
        assert_eq!(
            out,
            to_web(&ack, w),
            "the new connection stays on web{}",
            w + 1
        );

        // Replies: the new backend's are restored to the VIP; web1's old
        // reply entry for this tuple is gone.
        let reply_from = |web: usize| {
            Tcp {
                src_mac: WEB_MACS[web],
                dst_mac: BACK_MAC,
                src: WEBS[web],
                dst: CLIENT,
                ttl: 64,
                sport: WEB_PORT,
                dport: 50000,
                seq: WEB_SEQ,
                syn: false,
                options: &[],
                payload: b"HTTP/1.1 200 OK\r\n\r\n",
            }
            .build()
        };
        let out = h.expect(
            h.back,
            &reply_from(w),
            XDP_REDIRECT,
            Verdict::ForwardedReply,
        );
        let want = Tcp {
            src_mac: FRONT_MAC,
            dst_mac: CLIENT_MAC,
            src: VIP,
            dst: CLIENT,
            ttl: 63,
            sport: 80,
            dport: 50000,
            seq: WEB_SEQ,
            syn: false,
            options: &[],
            payload: b"HTTP/1.1 200 OK\r\n\r\n",
        };
        assert_eq!(out, want.build());
        // web1's old reply entry was removed: its segment has no flow, and
        // is dropped rather than routed on with web1's address.
        h.expect(h.back, &reply_from(0), XDP_DROP, Verdict::DropBackendNoFlow);

        // DSR: same rule, only the MACs change.
        let dsr_syn = Tcp::request(50001, VIP_DSR);
        let dsr_ack = Tcp {
            syn: false,
            ..Tcp::request(50001, VIP_DSR)
        };
        let mac_to = |sent: &Tcp, w: usize| {
            Tcp {
                src_mac: BACK_MAC,
                dst_mac: WEB_MACS[w],
                ..*sent
            }
            .build()
        };
        let out = h.expect(h.front, &dsr_syn.build(), XDP_REDIRECT, Verdict::Forwarded);
        let first = web_of(&out);
        assert_eq!(out, mac_to(&dsr_syn, first));
        let name = ["web1", "web2", "web3"][first];
        h.dp.apply_with(&cfg, &out_of_ring(name)).expect("apply");
        let out = h.expect(h.front, &dsr_ack.build(), XDP_REDIRECT, Verdict::Forwarded);
        assert_eq!(out, mac_to(&dsr_ack, first), "DSR: established flow kept");
        let out = h.expect(h.front, &dsr_syn.build(), XDP_REDIRECT, Verdict::Forwarded);
        let again = web_of(&out);
        assert_ne!(again, first, "DSR: a new connection went to {name}");
        assert_eq!(out, mac_to(&dsr_syn, again));

        // UDP has no connection start: its flow keeps its backend.
        let datagram = udp(CLIENT_MAC, FRONT_MAC, CLIENT, VIP, 64, 50002, 5353, b"x");
        let (_, out) = h.run(h.front, &datagram);
        let udp_web = web_of(&out);
        let name = ["web1", "web2", "web3"][udp_web];
        h.dp.apply_with(&cfg, &out_of_ring(name)).expect("apply");
        let (_, out) = h.run(h.front, &datagram);
        assert_eq!(web_of(&out), udp_web, "UDP flow kept on {name}");
    });
}

/// Item 8, the other side: when every backend is out of the ring, a SYN on a
/// pinned tuple is dropped (no backend), never sent to the old one.
#[test]
fn a_syn_on_a_reused_tuple_with_an_empty_ring_is_dropped() {
    let net = TestNet::new();
    net.run(|| {
        let cfg = lab_config();
        let mut h = Harness::new(&cfg);
        let syn = Tcp::request(50100, VIP).build();
        let (_, out) = h.run(h.front, &syn);
        assert_eq!(web_of(&out), 0);
        answer(&mut h, &out);
        let none = |_: &Service, _: &Backend| lb_userspace::dataplane::Admission {
            in_rotation: false,
            drop_flows: false,
        };
        let ack = Tcp {
            syn: false,
            ..Tcp::request(50100, VIP)
        }
        .build();
        let out = h.expect(h.front, &ack, XDP_REDIRECT, Verdict::Forwarded);
        assert_eq!(web_of(&out), 0, "the handshake's ACK establishes the flow");
        h.dp.apply_with(&cfg, &none).expect("apply");
        // A SYN on the tuple is a new connection (the client reused the
        // port): the old one is over, and the new one has nowhere to go.
        h.expect(h.front, &syn, XDP_DROP, Verdict::DropNoBackend);
        h.expect(h.front, &ack, XDP_DROP, Verdict::DropNoFlow);
    });
}

/// Every entry of the maps an apply writes (rings as their valid slots).
#[derive(Debug, PartialEq)]
struct Tables {
    backends: Vec<lb_common::Backend>,
    rings: Vec<Vec<u32>>,
    confs: Vec<lb_common::ServiceConf>,
    services: std::collections::BTreeMap<(u32, u16, u8), u32>,
    vips: std::collections::BTreeMap<u32, u32>,
}

fn tables(dp: &mut Dataplane) -> Tables {
    use aya::maps::{Array, HashMap};
    let ebpf = dp.ebpf();
    let array = |map: MapName| ebpf.map(map.name()).unwrap_or_else(|| panic!("map {map}"));
    let backends: Array<_, lb_common::Backend> =
        Array::try_from(array(MapName::BACKENDS)).expect("BACKENDS");
    let rings: Array<_, lb_common::Ring> = Array::try_from(array(MapName::RINGS)).expect("RINGS");
    let confs: Array<_, lb_common::ServiceConf> =
        Array::try_from(array(MapName::SERVICE_CONF)).expect("SERVICE_CONF");
    let services: HashMap<_, lb_common::ServiceKey, u32> =
        HashMap::try_from(array(MapName::SERVICES)).expect("SERVICES");
    let vips: HashMap<_, u32, u32> = HashMap::try_from(array(MapName::VIPS)).expect("VIPS");
    Tables {
        backends: backends.iter().map(|b| b.expect("backend")).collect(),
        rings: rings
            .iter()
            .map(|r| {
                let r = r.expect("ring");
                r.ids[..r.len as usize].to_vec()
            })
            .collect(),
        confs: confs.iter().map(|c| c.expect("conf")).collect(),
        services: services
            .iter()
            .map(|r| {
                let (k, v) = r.expect("service");
                ((k.vip, k.port, k.protocol), v)
            })
            .collect(),
        vips: vips.iter().map(|r| r.expect("vip")).collect(),
    }
}

/// Two NAT services on VIP:80 and VIP:81 sharing MAX_BACKENDS backends
/// (2048 each): web1's address on ports `base..`.
fn full_config(base: u16) -> Config {
    let half = lb_common::MAX_BACKENDS as u16 / 2;
    let mut cfg = lab_config();
    cfg.services = (0..2u16)
        .map(|s| {
            let backends = (0..half)
                .map(|i| backend(&format!("b{s}-{i}"), WEBS[0], base + s * half + i))
                .collect();
            service(
                &format!("s{s}"),
                VIP,
                80 + s,
                Protocol::Tcp,
                Forwarding::Nat,
                backends,
            )
        })
        .collect();
    cfg
}

/// Item 5a: a reload that replaces every backend at the 4096 limit fits
/// (retired ids are freed first), flows pinned to reused ids are purged,
/// and a rejected apply leaves every map exactly as it was.
#[test]
fn replacing_every_backend_at_the_limit_and_rejected_applies_change_nothing() {
    use lb_userspace::dataplane::{DataplaneError, plan::PlanError};
    let net = TestNet::new();
    net.run(|| {
        let old = full_config(10000);
        let mut h = Harness::new(&old);
        let syn = Tcp {
            dport: 80,
            ..Tcp::request(52000, VIP)
        };
        let out = h.expect(h.front, &syn.build(), XDP_REDIRECT, Verdict::Forwarded);
        assert_eq!(&out[36..38], &10000u16.to_be_bytes(), "to b0-0, id 0");
        assert_eq!(
            h.dp.flow_table()
                .expect("flow table")
                .per_backend()
                .expect("flows"),
            [(0, 1)].into_iter().collect()
        );

        // Every backend replaced, at the limit: accepted.
        let new = full_config(20000);
        let applied = h.dp.apply(&new).expect("replace all 4096 backends");
        let ids: std::collections::BTreeSet<u32> = applied
            .iter()
            .flat_map(|s| s.backends.iter().map(|(_, id)| *id))
            .collect();
        assert_eq!(ids.len(), lb_common::MAX_BACKENDS as usize);
        // Id 0 now names b0-0 of the new config: the flow pinned to the old
        // b0-0 was deleted, so it cannot reach the new backend by its old pin.
        assert!(
            h.dp.flow_table()
                .expect("flow table")
                .per_backend()
                .expect("flows")
                .is_empty(),
            "flows pinned to reused ids survived"
        );
        let t = tables(&mut h.dp);
        assert_eq!(t.backends[0].port, 20000u16.to_be());
        assert!(
            t.backends
                .iter()
                .all(|b| b.flags == lb_common::BACKEND_F_IN_USE | lb_common::BACKEND_F_IN_RING)
        );
        for (i, svc) in applied.iter().enumerate() {
            let conf = t.confs[svc.id as usize];
            assert_eq!(conf.enabled, 1);
            assert_eq!(
                t.rings[lb_common::Ring::slot(svc.id, conf.active_ring) as usize],
                svc.ring,
                "service {i} runs its final ring"
            );
        }
        let out = h.expect(h.front, &syn.build(), XDP_REDIRECT, Verdict::Forwarded);
        let port = u16::from_be_bytes([out[36], out[37]]);
        assert!(
            (20000..22048).contains(&port),
            "a new-config backend: {port}"
        );

        // Rejected: one backend over the limit, and a ring too long.
        let before = tables(&mut h.dp);
        let mut over = new.clone();
        over.services[1]
            .backends
            .push(backend("extra", WEBS[1], 9999));
        let err = h.dp.apply(&over).expect_err("4097 backends");
        assert!(
            matches!(
                err,
                DataplaneError::Plan(PlanError::Full { limit: 4096, .. })
            ),
            "{err}"
        );
        assert_eq!(
            tables(&mut h.dp),
            before,
            "a rejected apply wrote to the maps"
        );
        let mut long = new.clone();
        long.services[0].scheduler = Scheduler::WeightedRoundRobin;
        long.services[0].backends[0].weight = 5000;
        let err = h.dp.apply(&long).expect_err("ring of 7047 slots");
        assert!(
            matches!(err, DataplaneError::Plan(PlanError::Ring { .. })),
            "{err}"
        );
        assert_eq!(
            tables(&mut h.dp),
            before,
            "a rejected apply wrote to the maps"
        );

        // The id tables are untouched too: re-applying the same config keeps
        // every id.
        let again = h.dp.apply(&new).expect("re-apply");
        assert_eq!(again, applied);
    });
}
