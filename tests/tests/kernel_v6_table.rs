//! Kernel tier (issue 24): IPv6's flow tables keep IPv4's SYN-flood
//! guarantee. `ESTABLISHED6` is a kernel hash that never evicts, sized by
//! `conntrack-size`, `HALF_OPEN6` an LRU sized by `half-open-size`
//! (lb-ebpf/src/flows6.rs): spoofed SYNs only ever displace half-open
//! entries, and flows a blind spoofer can confirm (UDP's second packet,
//! DSR's SYN + ACK + data) find a full established table and stay
//! half-open, still forwarded, rather than evict a live flow. The agent's
//! sweep removes IPv6's expired flows and counts them, so the active counts
//! do not drift; a restarted agent adopts the pinned tables. `lb explain`'s
//! reading of an entry's expiry (with a NAT flow's reply entry) agrees with
//! the data plane's.
//!
//! The real `lb` object under BPF_PROG_TEST_RUN in the kernel tier's
//! namespace (tests/src/kernel_net.rs, dual-stack: kernel_net6.rs). Needs
//! root and BPF; without them the tests fail loudly.

use lb_common::{Verdict, ipv6::addr_of, map_names::MapName, maps6::FlowKey6};
use lb_tests::{
    kernel_net::{BACK_MAC, Bpffs, CLIENT_MAC, FRONT_MAC, Harness, TestNet, WEB_MACS, WEB_PORT},
    kernel_net6::{
        CLIENT_V6, Seg, VIP_DSR6, VIP_NAT6, config_v6, dual_stack_net, tcp6, udp6, web_of_mac,
        web_of6, web6,
    },
};
use lb_userspace::{
    config::Config,
    dataplane::{Dataplane, now_ticks},
    harness::xdp::{self, XDP_REDIRECT},
};

const TO_LB: ([u8; 6], [u8; 6]) = (CLIENT_MAC, FRONT_MAC);
/// The smallest tables the config allows: 1024 flows, 2048 entries each.
const SIZE: u32 = 1024;

fn small_tables() -> Config {
    let mut cfg = config_v6();
    cfg.dataplane.conntrack_size = SIZE;
    cfg.dataplane.half_open_size = SIZE;
    cfg
}

/// A spoofed source in 2001:db8:66::/48, one per `n`.
fn spoofed(n: u32) -> [u8; 16] {
    let mut a = [
        0x20, 0x01, 0x0d, 0xb8, 0, 0x66, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    a[12..].copy_from_slice(&n.to_be_bytes());
    a
}

fn key6(client: ([u8; 16], u16), vip: ([u8; 16], u16), protocol: u8) -> FlowKey6 {
    FlowKey6 {
        saddr: addr_of(client.0),
        daddr: addr_of(vip.0),
        sport: client.1.to_be(),
        dport: vip.1.to_be(),
        protocol,
        ..FlowKey6::default()
    }
}

/// A connection held through the flood: its client port, the web it went
/// to, NAT or DSR.
struct Held {
    port: u16,
    web: usize,
    nat: bool,
}

/// SYN, the web's SYN-ACK, the client's ACK: a NAT66 connection from
/// `port`, established.
fn open_nat(h: &mut Harness, port: u16) -> Held {
    let client = (CLIENT_V6, port);
    let syn = tcp6(TO_LB, client, (VIP_NAT6, 80), 64, Seg::Syn(100), &[]);
    let web = web_of6(&h.expect(h.front, &syn, XDP_REDIRECT, Verdict::Forwarded));
    let syn_ack = tcp6(
        (WEB_MACS[web], BACK_MAC),
        (web6(web), WEB_PORT),
        client,
        64,
        Seg::SynAck(900, 101),
        &[],
    );
    let back = h.back;
    h.expect(back, &syn_ack, XDP_REDIRECT, Verdict::ForwardedReply);
    let ack = tcp6(TO_LB, client, (VIP_NAT6, 80), 64, Seg::Ack(101, 901), &[]);
    h.expect(h.front, &ack, XDP_REDIRECT, Verdict::Forwarded);
    Held {
        port,
        web,
        nat: true,
    }
}

/// SYN, the handshake's ACK, then data past it: a DSR connection from
/// `client`, confirmed (what a blind spoofer can do too). The web it went
/// to.
fn open_dsr(h: &mut Harness, client: ([u8; 16], u16)) -> usize {
    let vip = (VIP_DSR6, 80);
    let syn = tcp6(TO_LB, client, vip, 64, Seg::Syn(100), &[]);
    let web = web_of_mac(&h.expect(h.front, &syn, XDP_REDIRECT, Verdict::Forwarded));
    let ack = tcp6(TO_LB, client, vip, 64, Seg::Ack(101, 1), &[]);
    h.expect(h.front, &ack, XDP_REDIRECT, Verdict::Forwarded);
    let data = tcp6(
        TO_LB,
        client,
        vip,
        64,
        Seg::Ack(101, 1),
        b"GET / HTTP/1.1\r\n\r\n",
    );
    h.expect(h.front, &data, XDP_REDIRECT, Verdict::Forwarded);
    let more = tcp6(TO_LB, client, vip, 64, Seg::Ack(119, 1), b"more");
    h.expect(h.front, &more, XDP_REDIRECT, Verdict::Forwarded);
    web
}

/// Is the flow of `key` in `ESTABLISHED6` (`Some(true)`), in `HALF_OPEN6`
/// (`Some(false)`), or in neither?
fn where_is(dp: &Dataplane, key: &FlowKey6) -> Option<bool> {
    dp.flows6()
        .expect("IPv6's tables")
        .lookup(key)
        .expect("lookup")
        .map(|(established, _)| established)
}

/// The held connection's next packet goes to its own web; a NAT one's
/// reply comes back as the VIP's; it is still established.
fn still_served(h: &mut Harness, held: &Held, what: &str) {
    let client = (CLIENT_V6, held.port);
    let vip = if held.nat {
        (VIP_NAT6, 80)
    } else {
        (VIP_DSR6, 80)
    };
    let data = tcp6(TO_LB, client, vip, 64, Seg::Ack(500, 901), b"again");
    let out = h.expect_case(
        &format!("{what}: port {}", held.port),
        h.front,
        &data,
        XDP_REDIRECT,
        Verdict::Forwarded,
    );
    let web = if held.nat {
        web_of6(&out)
    } else {
        web_of_mac(&out)
    };
    assert_eq!(web, held.web, "{what}: port {} moved web", held.port);
    let key = key6(client, vip, 6);
    assert_eq!(
        where_is(&h.dp, &key),
        Some(true),
        "{what}: port {} no longer established",
        held.port
    );
    if held.nat {
        let reply = tcp6(
            (WEB_MACS[web], BACK_MAC),
            (web6(web), WEB_PORT),
            client,
            64,
            Seg::Ack(901, 505),
            b"ok",
        );
        let back = h.back;
        h.expect(back, &reply, XDP_REDIRECT, Verdict::ForwardedReply);
    }
}

fn entries(dp: &Dataplane, map: MapName) -> usize {
    let t = dp.flows6().expect("IPv6's tables");
    match map {
        MapName::ESTABLISHED6 => t.established().expect("read").len(),
        _ => t
            .half_open_live(&Default::default(), now_ticks())
            .expect("read")
            .len(),
    }
}

fn active_total(h: &Harness, ids: &[u32]) -> u64 {
    let table = h.dp.flow_table().expect("flow table");
    ids.iter()
        .map(|&id| table.active(id).expect("active"))
        .sum()
}

/// 300 held connections (200 NAT66, 100 DSR); 20 480 spoofed SYNs (10×
/// the half-open table's entries); then blind spoofers confirm 3 000 UDP
/// and 500 DSR flows, more than `ESTABLISHED6` has room for. Every held
/// connection still goes to its own web and stays established; the
/// spoofers' flows past the table's room stay half-open and are still
/// forwarded; a new NAT66 connection gets through. Then the sweep (at a
/// time past every timeout) removes every IPv6 flow and the active counts
/// come back to 0, and a new connection is established again.
#[test]
fn spoofed_syns_and_blind_confirmations_never_displace_an_established_ipv6_flow() {
    let net = dual_stack_net();
    net.run(|| {
        let cfg = small_tables();
        let mut h = Harness::new(&cfg);
        let applied = h.dp.apply(&cfg).expect("apply");
        let ids: Vec<u32> = applied
            .iter()
            .filter(|s| s.name.ends_with('6'))
            .flat_map(|s| s.backends.iter().map(|(_, id)| *id))
            .collect();
        for (map, want) in [
            (MapName::ESTABLISHED6, 2 * SIZE),
            (MapName::HALF_OPEN6, 2 * SIZE),
        ] {
            let info = h.dp.map_data(map).expect("map").info().expect("info");
            assert_eq!(info.max_entries(), want, "{map:?} sized by the config");
        }

        let mut held: Vec<Held> = (0..200).map(|i| open_nat(&mut h, 40_000 + i)).collect();
        for i in 0..100 {
            let port = 45_000 + i;
            let web = open_dsr(&mut h, (CLIENT_V6, port));
            held.push(Held {
                port,
                web,
                nat: false,
            });
        }
        assert_eq!(entries(&h.dp, MapName::ESTABLISHED6), 2 * 200 + 100);
        assert_eq!(active_total(&h, &ids), 300);

        // The SYN flood: every SYN forwarded, each a half-open flow.
        for n in 0..20_480u32 {
            let syn = tcp6(
                TO_LB,
                (spoofed(n), 1024 + (n % 50_000) as u16),
                (VIP_NAT6, 80),
                64,
                Seg::Syn(n),
                &[],
            );
            let (action, _) = h.run(h.front, &syn);
            assert_eq!(action, XDP_REDIRECT, "spoofed SYN {n}");
        }
        assert!(entries(&h.dp, MapName::HALF_OPEN6) <= 2 * SIZE as usize);
        for held in &held {
            still_served(&mut h, held, "after the SYN flood");
        }

        // Blind confirmations: UDP's second packet, DSR's SYN + ACK + data.
        for n in 0..3_000u32 {
            let client = (spoofed(100_000 + n), 2000);
            for _ in 0..2 {
                let q = udp6(TO_LB, client, (VIP_NAT6, 5353), 64, b"q");
                let (action, _) = h.run(h.front, &q);
                assert_eq!(action, XDP_REDIRECT, "spoofed UDP {n}");
            }
        }
        for n in 0..500u32 {
            open_dsr(&mut h, (spoofed(200_000 + n), 3000));
        }
        let established = entries(&h.dp, MapName::ESTABLISHED6);
        assert!(
            established <= 2 * SIZE as usize && established > 2 * SIZE as usize - 4,
            "ESTABLISHED6 full, not past its size: {established}"
        );
        for held in &held {
            still_served(&mut h, held, "after the blind confirmations");
        }
        // The last spoofer's flow found no room: half-open, forwarded.
        let last = key6((spoofed(200_499), 3000), (VIP_DSR6, 80), 6);
        assert_eq!(where_is(&h.dp, &last), Some(false));

        // A new connection while the table is full: through, half-open.
        let new = open_nat(&mut h, 50_000);
        let key = key6((CLIENT_V6, 50_000), (VIP_NAT6, 80), 6);
        assert_eq!(where_is(&h.dp, &key), Some(false), "no room: half-open");
        let data = tcp6(
            TO_LB,
            (CLIENT_V6, 50_000),
            (VIP_NAT6, 80),
            64,
            Seg::Ack(101, 901),
            b"x",
        );
        let out = h.expect(h.front, &data, XDP_REDIRECT, Verdict::Forwarded);
        assert_eq!(web_of6(&out), new.web);

        // Every flow idle past its timeout: the sweep takes them all, and
        // counts the established ones, so active comes back to 0.
        let later = now_ticks() + 5_000;
        let report =
            h.dp.sweeper()
                .expect("sweeper")
                .sweep(later)
                .expect("sweep");
        assert!(report.removed as usize >= established, "{report:?}");
        assert_eq!(entries(&h.dp, MapName::ESTABLISHED6), 0);
        assert_eq!(active_total(&h, &ids), 0, "no drift: {report:?}");
        let again = open_nat(&mut h, 50_001);
        let key = key6((CLIENT_V6, 50_001), (VIP_NAT6, 80), 6);
        assert_eq!(where_is(&h.dp, &key), Some(true), "room again: established");
        still_served(&mut h, &again, "after the sweep");
    });
}

/// The agent's restart: a data plane loaded over the pins of the one
/// before adopts IPv6's tables, and its established flows go on to their
/// own webs, still counted active.
#[test]
fn a_restarted_agent_adopts_ipv6s_established_flows() {
    let net = dual_stack_net();
    let fs = Bpffs::new();
    let pins = fs.dir.join("lb");
    net.run(|| {
        let cfg = small_tables();
        let index = |name: &str| xdp::ifindex(name).expect("interface");
        let load = || {
            let (mut dp, adopted) =
                Dataplane::load_pinned(&cfg.dataplane, &pins).expect("load pinned");
            dp.apply(&cfg).expect("apply");
            let h = Harness {
                dp,
                front: index("f0"),
                back: index("b0"),
            };
            (h, adopted)
        };
        let (mut h, adopted) = load();
        assert!(!adopted);
        let held: Vec<Held> = (0..20).map(|i| open_nat(&mut h, 41_000 + i)).collect();
        let ids: Vec<u32> =
            h.dp.apply(&cfg)
                .expect("apply")
                .iter()
                .filter(|s| s.name == "www6")
                .flat_map(|s| s.backends.iter().map(|(_, id)| *id))
                .collect();
        assert_eq!(active_total(&h, &ids), 20);
        drop(h);

        let (mut h, adopted) = load();
        assert!(adopted, "the pins adopted");
        assert_eq!(entries(&h.dp, MapName::ESTABLISHED6), 40);
        assert_eq!(active_total(&h, &ids), 20);
        for held in &held {
            still_served(&mut h, held, "after the restart");
        }
    });
}

/// The verifier accepts IPv6's stages with the tables' new code; prints how
/// many instructions it processed for each (of 1 000 000; run with
/// `--nocapture`): the programs that use this data plane's `ESTABLISHED6`
/// (`lb_v6_portless`, later fragments and ICMPv6 errors, looks flows up too).
#[test]
fn the_verifier_reports_ipv6s_stages_instruction_counts() {
    let net = TestNet::new();
    net.run(|| {
        let h = Harness::new(&small_tables());
        let ours =
            h.dp.map_data(MapName::ESTABLISHED6)
                .expect("ESTABLISHED6")
                .info()
                .expect("info")
                .id();
        let mut seen = Vec::new();
        for info in aya::programs::loaded_programs().filter_map(Result::ok) {
            let uses_ours = info
                .map_ids()
                .ok()
                .flatten()
                .is_some_and(|ids| ids.contains(&ours));
            let name = info.name_as_str().unwrap_or_default().to_owned();
            if !uses_ours || !name.starts_with("lb_v6") {
                continue;
            }
            let count = info
                .verified_instruction_count()
                .expect("the kernel reports a verified instruction count");
            println!("{name}: verified_instruction_count = {count}");
            assert!(count > 0 && count < 1_000_000, "{name}: {count}");
            seen.push(name);
        }
        seen.sort();
        assert_eq!(seen, ["lb_v6", "lb_v6_portless", "lb_v6_setup"]);
    });
}

/// `lb explain`'s reading of an IPv6 entry's age (`EntryAge` over
/// `Flows6::lookup` and `pair_entry`, as the agent reads them) agrees with
/// the data plane: a NAT66 connection whose forward entry is past the tcp
/// timeout while its reply entry is live is still served; both past it,
/// it is a miss, and the client's next segment finds no established entry
/// (round robin drops a mid-stream segment: `DropNoFlow`).
#[test]
fn explains_reading_of_an_ipv6_entrys_expiry_agrees_with_the_data_plane() {
    use aya::maps::{HashMap, Map};
    use lb_common::Flow;
    use lb_userspace::explain::EntryAge;
    let net = dual_stack_net();
    net.run(|| {
        let mut h = Harness::new(&config_v6());
        let held = open_nat(&mut h, 44_000);
        let key = key6((CLIENT_V6, held.port), (VIP_NAT6, 80), 6);
        let conf = h.dp.flow_conf().expect("FLOW_CONF");
        let age = |h: &Harness| {
            let flows6 = h.dp.flows6().expect("IPv6's tables");
            let (established, entry) = flows6.lookup(&key).expect("lookup").expect("an entry");
            assert!(established);
            let pair = flows6.pair_entry(&key, &entry).expect("pair");
            assert!(pair.is_some(), "a NAT66 flow's reply entry");
            EntryAge::of(&conf, 6, &entry, pair.as_ref(), now_ticks())
        };
        assert!(!age(&h).expired, "{:?}", age(&h));

        let data = h.dp.map_data(MapName::ESTABLISHED6).expect("ESTABLISHED6");
        let mut table: HashMap<_, FlowKey6, Flow> =
            HashMap::try_from(Map::HashMap(data)).expect("a hash map");
        let tcp_timeout = conf.timeouts[lb_common::flow::Timeout::Tcp as usize];
        // Two ticks past it: the data plane's clock may run one ahead.
        let stale = now_ticks().wrapping_sub(tcp_timeout + 2);
        let set_stale = |table: &mut HashMap<_, FlowKey6, Flow>, k: &FlowKey6| {
            let mut f = table.get(k, 0).expect("the entry");
            f.seen = stale;
            table.insert(k, f, 0).expect("write");
        };
        set_stale(&mut table, &key);
        let kept = age(&h);
        assert!(
            kept.expired && kept.pair_live && !kept.is_miss(),
            "{kept:?}"
        );
        still_served(&mut h, &held, "forward entry expired, reply live");

        let keys: Vec<FlowKey6> = table.keys().map(|k| k.expect("key")).collect();
        assert_eq!(keys.len(), 2, "the flow's two entries");
        for k in &keys {
            set_stale(&mut table, k);
        }
        let gone = age(&h);
        assert!(gone.is_miss() && gone.idle >= tcp_timeout + 2, "{gone:?}");
        let segment = tcp6(
            TO_LB,
            (CLIENT_V6, held.port),
            (VIP_NAT6, 80),
            64,
            Seg::Ack(600, 901),
            b"late",
        );
        h.expect(h.front, &segment, xdp::XDP_DROP, Verdict::DropNoFlow);
        assert_ne!(where_is(&h.dp, &key), Some(true), "the expired entry");
    });
}
