//! Kernel tier (issue 26, "Checks through the VIP"): `lb_probe`, the
//! steering program on the probe namespace's veth, and the `lb` program's
//! hand-over of the answers, on crafted frames (BPF_PROG_TEST_RUN).
//!
//! - a probe (from a port with a `PROBES` entry, to its VIP) leaves for its
//!   backend as a client's packet of a DSR service does: the IP packet
//!   untouched, the backend's MAC; the way it left is noted;
//! - a packet from a port without an entry, or to another VIP than its
//!   entry's, is dropped (never handed to the LB's stack, where the VIP
//!   would answer);
//! - the backend's answer (from the VIP, to the probe port, from its MAC,
//!   on the interface the probe left by) goes into the veth; the same
//!   answer from another MAC or on another interface, and a client's
//!   packet to the probe address and port, are passed as not ours;
//! - probes count in `PROBE_STATS` only, never as service traffic;
//! - the same over IPv6 (`PROBES6`, `lb_v6_setup`'s hand-over): a probe to
//!   an IPv6 DSR VIP leaves byte for byte with the backend's MAC, its
//!   backend's answer goes into the veth, a spoofed one does not, and any
//!   other IPv6 frame from the namespace is dropped but link-scoped
//!   neighbour discovery, which passes.
//!
//! Needs root and BPF; without them the tests fail loudly.

use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray};
use etherparse::{Icmpv6Type, PacketBuilder};
use lb_common::{
    Verdict,
    ipv6::addr_of,
    probe::{PROBE_PORT_FIRST, ProbeConf, ProbeCounter, ProbeEntry, ProbeEntry6},
};
use lb_tests::{
    kernel_frames::Tcp,
    kernel_net::{
        BACK_MAC, CLIENT_MAC, FRONT_MAC, Harness, TestNet, VIP, VIP_DSR, WEB_MACS, WEBS, lab_config,
    },
    kernel_net6::{CLIENT_V6, Seg, VIP_DSR6, VIP_NAT6, config_v6, dual_stack_net, tcp6, web6},
};
use lb_userspace::{
    dataplane::MapName,
    harness::xdp::{self, XDP_DROP, XDP_PASS, XDP_REDIRECT},
};

/// The LB's back address: the probes' source.
const LB_BACK: [u8; 4] = [198, 19, 0, 1];
const PROBE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xcc, 0x02];
const HOST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xcc, 0x01];
/// Stands for the host end of the probe veth (any interface that forwards).
const VETH_IFINDEX: &str = "f1";

fn be(a: [u8; 4]) -> u32 {
    u32::from_ne_bytes(a)
}

/// The probe from `sport` to `dst`:80, as the probe namespace sends it.
fn probe(sport: u16, dst: [u8; 4]) -> Tcp<'static> {
    Tcp {
        src_mac: PROBE_MAC,
        dst_mac: HOST_MAC,
        src: LB_BACK,
        ..Tcp::request(sport, dst)
    }
}

/// web1's answer to the probe from `dport`.
fn answer(dport: u16) -> Tcp<'static> {
    Tcp {
        src_mac: WEB_MACS[0],
        dst_mac: BACK_MAC,
        src: VIP_DSR,
        dst: LB_BACK,
        sport: 80,
        dport,
        ..Tcp::request(0, LB_BACK)
    }
}

fn stats(h: &Harness) -> Vec<u64> {
    let map: PerCpuArray<MapData, u64> = PerCpuArray::try_from(Map::PerCpuArray(
        h.dp.map_data(MapName::PROBE_STATS).expect("PROBE_STATS"),
    ))
    .expect("PROBE_STATS");
    (0..lb_common::probe::PROBE_COUNTERS)
        .map(|i| map.get(&i, 0).expect("read").iter().sum())
        .collect()
}

/// `lb_probe` on `frame` from the probe namespace (arriving on `veth`):
/// its action and the frame as it left.
fn steer(h: &mut Harness, veth: u32, frame: &[u8]) -> (u32, Vec<u8>) {
    let prog = xdp::xdp_program(h.dp.ebpf(), "lb_probe").expect("load lb_probe");
    let r = xdp::test_run(prog, veth, frame, 0, true).expect("BPF_PROG_TEST_RUN");
    (r.action, r.frame.unwrap_or_default())
}

/// One probe sent, one answer handed in, `unknown` frames from the
/// namespace, and nothing counted as the service's or backend's traffic.
fn counted_as_probes_only(h: &Harness, (service_id, backend_id): (u32, u32), unknown: u64) {
    let counted = stats(h);
    assert_eq!(counted[ProbeCounter::Sent as usize], 1, "{counted:?}");
    assert_eq!(
        counted[ProbeCounter::Unknown as usize],
        unknown,
        "{counted:?}"
    );
    assert_eq!(counted[ProbeCounter::Answers as usize], 1, "{counted:?}");
    let service =
        h.dp.counters(MapName::SERVICE_STATS, service_id)
            .expect("SERVICE_STATS");
    assert_eq!(service.packets, 0, "probes are not the service's traffic");
    let backend =
        h.dp.counters(MapName::BACKEND_STATS, backend_id)
            .expect("BACKEND_STATS");
    assert_eq!(backend.packets, 0, "nor the backend's");
}

#[test]
fn a_probe_goes_to_its_backend_and_only_its_answer_comes_back() {
    let net = TestNet::new();
    net.run(|| {
        let cfg = lab_config();
        let mut h = Harness::new(&cfg);
        let veth = xdp::ifindex(VETH_IFINDEX).expect("veth stand-in");
        let routes = h.dp.service_routes(&cfg);
        let route = routes.get("www-dsr").expect("www-dsr in the maps");
        let service_id = route.id;
        let web1 = std::net::SocketAddr::new(WEBS[0].into(), 80);
        let backend_id = *route.backends.get(&web1).expect("web1's id");
        let port = PROBE_PORT_FIRST;
        let mut probes: HashMap<MapData, u16, ProbeEntry> = HashMap::try_from(Map::HashMap(
            h.dp.map_data(MapName::PROBES).expect("PROBES"),
        ))
        .expect("PROBES");
        probes
            .insert(
                port.to_be(),
                ProbeEntry::new(
                    (be(VIP_DSR), 80),
                    6,
                    (be(WEBS[0]), 80),
                    (service_id, backend_id),
                ),
                0,
            )
            .expect("write PROBES");
        set_probe_conf(&h, veth);

        // Before any probe left, an "answer" is nobody's.
        let early = answer(port).build();
        let out = h.expect(h.back, &early, XDP_PASS, Verdict::PassNotOurs);
        assert_eq!(out, early, "passed untouched");

        // The probe: out to web1 (its entry's backend, whatever the
        // service's scheduler would pick) as a DSR client's packet goes.
        let syn = probe(port, VIP_DSR);
        let (action, out) = steer(&mut h, veth, &syn.build());
        assert_eq!(action, XDP_REDIRECT, "the probe is sent on");
        let want = Tcp {
            src_mac: BACK_MAC,
            dst_mac: WEB_MACS[0],
            ..probe(port, VIP_DSR)
        };
        assert_eq!(out, want.build(), "IP untouched, web1's MAC");
        let entry = probes.get(&port.to_be(), 0).expect("entry");
        assert_eq!(entry.mac, WEB_MACS[0], "the way it left is noted");
        assert_eq!(entry.ifindex, h.back);

        // Not probes: an unknown port, a probe port to another VIP.
        let (action, _) = steer(&mut h, veth, &probe(port + 1, VIP_DSR).build());
        assert_eq!(action, XDP_DROP, "a port without an entry");
        let (action, _) = steer(&mut h, veth, &probe(port, VIP).build());
        assert_eq!(action, XDP_DROP, "another VIP than the entry's");

        // web1's answer goes into the veth, addressed to the probe end.
        let back = answer(port).build();
        let out = h.expect(h.back, &back, XDP_REDIRECT, Verdict::ForwardedProbeReply);
        let want = Tcp {
            src_mac: HOST_MAC,
            dst_mac: PROBE_MAC,
            ..answer(port)
        };
        assert_eq!(out, want.build(), "only the MACs change");

        // Security: the same answer from another MAC (a spoofer on the
        // back network), or on the front interface, and a client's packet
        // to the probe address and port: not ours, untouched.
        let spoofed = Tcp {
            src_mac: CLIENT_MAC,
            ..answer(port)
        }
        .build();
        let out = h.expect(h.back, &spoofed, XDP_PASS, Verdict::PassNotOurs);
        assert_eq!(out, spoofed);
        let on_front = Tcp {
            dst_mac: FRONT_MAC,
            ..answer(port)
        }
        .build();
        let out = h.expect(h.front, &on_front, XDP_PASS, Verdict::PassNotOurs);
        assert_eq!(out, on_front);
        let client = Tcp {
            sport: 40000,
            ..Tcp::request(40000, LB_BACK)
        };
        let client = Tcp {
            dport: port,
            ..client
        }
        .build();
        let out = h.expect(h.front, &client, XDP_PASS, Verdict::PassNotOurs);
        assert_eq!(out, client);

        // Counted as probes only.
        counted_as_probes_only(&h, (service_id, backend_id), 2);
    });
}

/// Points `PROBE_CONF` at the veth stand-in.
fn set_probe_conf(h: &Harness, veth: u32) {
    let mut conf: Array<MapData, ProbeConf> = Array::try_from(Map::Array(
        h.dp.map_data(MapName::PROBE_CONF).expect("PROBE_CONF"),
    ))
    .expect("PROBE_CONF");
    conf.set(
        0,
        ProbeConf {
            ifindex: veth,
            probe_mac: PROBE_MAC,
            host_mac: HOST_MAC,
        },
        0,
    )
    .expect("write PROBE_CONF");
}

/// The LB's back address over IPv6 (`dual_stack`'s b0): the probes' source.
const LB_BACK6: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0, 0x19, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1,
];

/// The IPv6 probe from `sport` to `dst`:80, as the probe namespace sends it.
fn probe6(sport: u16, dst: [u8; 16]) -> Vec<u8> {
    tcp6(
        (PROBE_MAC, HOST_MAC),
        (LB_BACK6, sport),
        (dst, 80),
        64,
        Seg::Syn(7),
        &[],
    )
}

/// web1's answer to the IPv6 probe from `dport`, from `mac` to `to_mac`.
fn answer6(dport: u16, (mac, to_mac): ([u8; 6], [u8; 6])) -> Vec<u8> {
    tcp6(
        (mac, to_mac),
        (VIP_DSR6, 80),
        (LB_BACK6, dport),
        64,
        Seg::SynAck(9, 8),
        &[],
    )
}

#[test]
fn an_ipv6_probe_goes_to_its_backend_and_only_its_answer_comes_back() {
    let net = dual_stack_net();
    net.run(|| {
        let cfg = config_v6();
        let mut h = Harness::new(&cfg);
        let veth = xdp::ifindex(VETH_IFINDEX).expect("veth stand-in");
        let routes = h.dp.service_routes(&cfg);
        let route = routes.get("dsr6").expect("dsr6 in the maps");
        let service_id = route.id;
        let web1 = std::net::SocketAddr::new(web6(0).into(), 80);
        let backend_id = *route.backends.get(&web1).expect("web1's id");
        let port = PROBE_PORT_FIRST + 3;
        let mut probes: HashMap<MapData, u16, ProbeEntry6> = HashMap::try_from(Map::HashMap(
            h.dp.map_data(MapName::PROBES6).expect("PROBES6"),
        ))
        .expect("PROBES6");
        probes
            .insert(
                port.to_be(),
                ProbeEntry6::new(
                    (addr_of(VIP_DSR6), 80),
                    6,
                    (addr_of(web6(0)), 80),
                    (service_id, backend_id),
                ),
                0,
            )
            .expect("write PROBES6");
        set_probe_conf(&h, veth);
        let from_web1 = (WEB_MACS[0], BACK_MAC);

        // Before any probe left, an "answer" is nobody's.
        let early = answer6(port, from_web1);
        let out = h.expect(h.back, &early, XDP_PASS, Verdict::PassNotOurs);
        assert_eq!(out, early, "passed untouched");

        // The probe: out to web1, as a DSR client's IPv6 packet goes (the
        // MACs only; DSR keeps the hop limit).
        let syn = probe6(port, VIP_DSR6);
        let (action, out) = steer(&mut h, veth, &syn);
        assert_eq!(action, XDP_REDIRECT, "the probe is sent on");
        let mut want = syn.clone();
        want[..6].copy_from_slice(&WEB_MACS[0]);
        want[6..12].copy_from_slice(&BACK_MAC);
        assert_eq!(out, want, "IPv6 untouched, web1's MAC");
        let entry = probes.get(&port.to_be(), 0).expect("entry");
        assert_eq!(entry.mac, WEB_MACS[0], "the way it left is noted");
        assert_eq!(entry.ifindex, h.back);

        // Not probes: an unknown port, a probe port to another VIP, an
        // echo request to the VIP6 (which the LB's stack would answer).
        let (action, _) = steer(&mut h, veth, &probe6(port + 1, VIP_DSR6));
        assert_eq!(action, XDP_DROP, "a port without an entry");
        let (action, _) = steer(&mut h, veth, &probe6(port, VIP_NAT6));
        assert_eq!(action, XDP_DROP, "another VIP than the entry's");
        let mut echo = Vec::new();
        PacketBuilder::ethernet2(PROBE_MAC, HOST_MAC)
            .ipv6(LB_BACK6, VIP_DSR6, 64)
            .icmpv6(Icmpv6Type::EchoRequest(etherparse::IcmpEchoHeader {
                id: 1,
                seq: 1,
            }))
            .write(&mut echo, b"ping")
            .expect("echo");
        let (action, _) = steer(&mut h, veth, &echo);
        assert_eq!(action, XDP_DROP, "a non-probe frame to the VIP6");
        // Neighbour discovery (to a solicited-node group) is the link's.
        let solicited = [0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, 0, 0, 1];
        let mut ns = Vec::new();
        PacketBuilder::ethernet2(PROBE_MAC, [0x33, 0x33, 0xff, 0, 0, 1])
            .ipv6(LB_BACK6, solicited, 255)
            .icmpv6(Icmpv6Type::Unknown {
                type_u8: 135,
                code_u8: 0,
                bytes5to8: [0; 4],
            })
            .write(&mut ns, &[0; 16])
            .expect("neighbour solicitation");
        let (action, out) = steer(&mut h, veth, &ns);
        assert_eq!(action, XDP_PASS, "neighbour discovery passes");
        assert_eq!(out, ns, "untouched");

        // web1's answer goes into the veth, addressed to the probe end.
        let back = answer6(port, from_web1);
        let out = h.expect(h.back, &back, XDP_REDIRECT, Verdict::ForwardedProbeReply);
        assert_eq!(
            out,
            answer6(port, (HOST_MAC, PROBE_MAC)),
            "only the MACs change"
        );

        // Security: from another MAC, on the front interface, or a
        // client's packet to the probe address and port: not ours.
        let spoofed = answer6(port, (CLIENT_MAC, BACK_MAC));
        let out = h.expect(h.back, &spoofed, XDP_PASS, Verdict::PassNotOurs);
        assert_eq!(out, spoofed);
        let on_front = answer6(port, (WEB_MACS[0], FRONT_MAC));
        let out = h.expect(h.front, &on_front, XDP_PASS, Verdict::PassNotOurs);
        assert_eq!(out, on_front);
        let client = tcp6(
            (CLIENT_MAC, FRONT_MAC),
            (CLIENT_V6, 80),
            (LB_BACK6, port),
            64,
            Seg::SynAck(9, 8),
            &[],
        );
        let out = h.expect(h.front, &client, XDP_PASS, Verdict::PassNotOurs);
        assert_eq!(out, client);

        // Counted as probes only (`Unknown` counts the passed neighbour
        // solicitation too, as IPv4's ARP).
        counted_as_probes_only(&h, (service_id, backend_id), 4);
    });
}

/// Prints the verifier's instruction counts of the programs the checks
/// through the VIP touch (run with `--nocapture`): `lb` and `lb_setup`
/// (IPv4's hand-over), `lb_v6` and `lb_v6_setup` (IPv6's), `lb_probe`.
#[test]
fn the_verifier_reports_the_probe_paths_instruction_counts() {
    let net = dual_stack_net();
    net.run(|| {
        Harness::new(&config_v6()).print_verified_counts(&[
            "lb",
            "lb_setup",
            "lb_v6",
            "lb_v6_setup",
            "lb_probe",
        ]);
    });
}

/// What the answers' hand-over costs the `lb` program (issue 26; the
/// figures in docs/architecture.md): the established fast path, which
/// never reaches it; a packet that is not for a VIP, to another port
/// (`pass_not_ours` after two compares); and one to a probe port without
/// an entry (one lookup more). Against the build before it
/// (`LB_BASE_OBJECT`, the `lb` object of main) in the same run,
/// alternating, median of the rounds:
/// `LB_BASE_OBJECT=… cargo xtask test -- --test kernel_probe -- --ignored --nocapture`.
#[test]
#[ignore = "a measurement, run by hand"]
fn answer_check_cost_ns_per_packet() {
    use lb_tests::kernel_net::{ns_per_packet, test_run};
    use lb_userspace::dataplane::Dataplane;
    const REPEAT: u32 = 1_000_000;
    const ROUNDS: usize = 15;
    let base = std::env::var_os("LB_BASE_OBJECT").map(|p| std::fs::read(p).expect("read base"));
    let net = TestNet::new();
    net.run(|| {
        let cfg = lab_config();
        let mut h = Harness::new(&cfg);
        let dsr_syn = Tcp::request(49000, VIP_DSR).build();
        let dsr_ack = Tcp {
            syn: false,
            payload: b"GET / HTTP/1.1\r\n\r\n",
            ..Tcp::request(49000, VIP_DSR)
        }
        .build();
        // To the LB's own back address, as the agent's own connections'
        // answers come: not for a VIP, no flow.
        let other_port = Tcp {
            src_mac: WEB_MACS[0],
            dst_mac: BACK_MAC,
            src: WEBS[0],
            dst: LB_BACK,
            sport: 80,
            dport: 40000,
            ..Tcp::request(0, LB_BACK)
        }
        .build();
        let probe_port = Tcp {
            src_mac: WEB_MACS[0],
            dst_mac: BACK_MAC,
            src: WEBS[0],
            dst: LB_BACK,
            sport: 80,
            dport: PROBE_PORT_FIRST + 7,
            ..Tcp::request(0, LB_BACK)
        }
        .build();
        assert_eq!(test_run(&mut h.dp, h.front, &dsr_syn).0, XDP_REDIRECT);
        assert_eq!(test_run(&mut h.dp, h.front, &dsr_ack).0, XDP_REDIRECT);
        let mut base_dp = base.map(|object| {
            let mut dp = Dataplane::load_object(&object, 65536).expect("load base");
            dp.apply(&cfg).expect("apply base");
            assert_eq!(test_run(&mut dp, h.front, &dsr_syn).0, XDP_REDIRECT);
            assert_eq!(test_run(&mut dp, h.front, &dsr_ack).0, XDP_REDIRECT);
            dp
        });
        let (front, back) = (h.front, h.back);
        let cases = [
            ("established DSR", front, &dsr_ack),
            ("not for a VIP, another port", back, &other_port),
            ("not for a VIP, a probe port without entry", back, &probe_port),
        ];
        let mut samples = vec![(Vec::new(), Vec::new()); cases.len()];
        for _ in 0..ROUNDS {
            for (i, (_, ifindex, frame)) in cases.iter().enumerate() {
                if let Some(dp) = base_dp.as_mut() {
                    samples[i].0.push(ns_per_packet(dp, *ifindex, frame, REPEAT));
                }
                samples[i].1.push(ns_per_packet(&mut h.dp, *ifindex, frame, REPEAT));
            }
        }
        let median = |s: &mut Vec<f64>| {
            s.sort_by(f64::total_cmp);
            (s.get(s.len() / 2).copied().unwrap_or(f64::NAN), s.first().copied().unwrap_or(f64::NAN), s.last().copied().unwrap_or(f64::NAN))
        };
        for ((what, ..), (mut base, mut this)) in cases.iter().zip(samples) {
            let (b, bmin, bmax) = median(&mut base);
            let (t, tmin, tmax) = median(&mut this);
            eprintln!(
                "{what:<45} base {b:>5.1} ns ({bmin:.0}–{bmax:.0})  this {t:>5.1} ns ({tmin:.0}–{tmax:.0})  {ROUNDS} rounds"
            );
        }
    });
}
