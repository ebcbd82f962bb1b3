use lb_common::{
    BACKEND_F_IN_USE, Flow, FwScope, MODE_NAT, SCHED_COUNTER, ServiceConf,
    hash::{flow_hash, source_hash},
    headers::IPPROTO_UDP,
};

use super::*;

fn query() -> FlowQuery {
    FlowQuery::parse("198.18.0.2:40000", "198.18.0.10:80/tcp").expect("parse")
}

fn view() -> ServiceView {
    let b = |id, name: &str, admin, health| BackendView {
        id,
        name: name.into(),
        address: format!("198.19.0.1{}:80", id + 1),
        admin,
        health,
        at_limit: None,
    };
    ServiceView {
        name: "www".into(),
        forwarding: Forwarding::Nat,
        scheduler: Scheduler::RoundRobin,
        backends: vec![
            b(0, "web1", AdminState::Enabled, HealthStatus::Up),
            b(1, "web2", AdminState::Drain, HealthStatus::Up),
            b(2, "web3", AdminState::Enabled, HealthStatus::Up),
        ],
    }
}

fn service(scheduler: u32, ring: Vec<u32>, rr_counter: u64) -> ServiceFacts {
    ServiceFacts {
        id: 0,
        conf: ServiceConf {
            active_ring: 0,
            mode: MODE_NAT,
            scheduler,
            enabled: 1,
        },
        ring,
        rr_counter,
        maglev: Vec::new(),
    }
}

fn pinned(backend_id: u32, flags: u16) -> (Flow, Backend) {
    (
        Flow {
            backend_id,
            service_id: 0,
            ..Flow::default()
        },
        Backend {
            addr: u32::from_ne_bytes([198, 19, 0, 11 + backend_id as u8]),
            port: 80u16.to_be(),
            flags,
            service_id: 0,
            _pad: 0,
        },
    )
}

#[test]
fn parses_flows_and_names_bad_arguments() {
    let q = query();
    assert_eq!(q.client, "198.18.0.2:40000".parse().expect("addr"));
    assert_eq!(q.protocol, IPPROTO_TCP);
    assert_eq!(q.key().expect("an IPv4 flow").sport, 40000u16.to_be());
    assert_eq!(
        FlowQuery::parse("198.18.0.2:1", "198.18.0.10:53/UDP")
            .expect("udp")
            .protocol,
        IPPROTO_UDP
    );
    for (client, service, want) in [
        (
            "198.18.0.2",
            "198.18.0.10:80/tcp",
            "bad client \"198.18.0.2\"",
        ),
        ("198.18.0.2:x", "198.18.0.10:80/tcp", "bad client"),
        ("198.18.0.2:1", "198.18.0.10:80", "expected VIP:PORT/PROTO"),
        ("198.18.0.2:1", "198.18.0.10/tcp", "bad VIP \"198.18.0.10\""),
        (
            "198.18.0.2:1",
            "198.18.0.10:80/sctp",
            "bad protocol \"sctp\"",
        ),
    ] {
        let e = FlowQuery::parse(client, service).expect_err("bad");
        assert!(format!("{e:#}").contains(want), "{client} {service}: {e:#}");
    }
}

#[test]
fn no_service_says_why_the_kernel_gets_it() {
    let not_vip = explain(&query(), &FlowFacts::default(), None, &[]);
    assert!(not_vip.contains("not a VIP here"), "{not_vip}");
    assert!(not_vip.contains("pass_not_ours"), "{not_vip}");
    let facts = FlowFacts {
        vip_known: true,
        ..FlowFacts::default()
    };
    let q = FlowQuery::parse("198.18.0.2:40000", "198.18.0.10:81/udp").expect("parse");
    let text = explain(&q, &facts, None, &["www 198.18.0.10:80/tcp".into()]);
    assert!(text.contains("no service on 198.18.0.10:81/udp"), "{text}");
    assert!(text.contains("www 198.18.0.10:80/tcp"), "{text}");
    assert!(text.contains("pass_no_service"), "{text}");
}

#[test]
fn round_robin_names_the_next_flows_backend_without_promising_it() {
    let facts = FlowFacts {
        vip_known: true,
        service: Some(service(SCHED_COUNTER, vec![0, 2], 7)),
        conntrack: None,
        age: None,
        firewall: Vec::new(),
    };
    let text = explain(&query(), &facts, Some(&view()), &[]);
    assert!(
        text.contains("service www (id 0, nat, round-robin)"),
        "{text}"
    );
    assert!(text.contains("no conntrack entry"), "{text}");
    assert!(
        text.contains("counter is at 7, slot 1 of 2 → web3 (198.19.0.13:80)"),
        "{text}"
    );
    assert!(text.contains("not a promise for this tuple"), "{text}");
    assert!(text.contains("web2"), "{text}");
    assert!(text.contains("drain"), "{text}");
    assert!(text.contains("not in the ring"), "{text}");
    assert!(text.contains("1 of 2 ring slots"), "{text}");
}

#[test]
fn a_backend_at_max_connections_is_named_as_full() {
    let mut v = view();
    v.backends[0].at_limit = Some((5, 5));
    let facts = |ring| FlowFacts {
        vip_known: true,
        service: Some(service(SCHED_COUNTER, ring, 0)),
        conntrack: None,
        age: None,
        firewall: Vec::new(),
    };
    let text = explain(&query(), &facts(vec![2]), Some(&v), &[]);
    assert!(
        text.contains("not in the ring: at max-connections (5 active, limit 5)"),
        "{text}"
    );
    // Every backend out, one of them full: the drop says where to look.
    let text = explain(&query(), &facts(Vec::new()), Some(&v), &[]);
    assert!(
        text.contains("at their max-connections") && text.contains("drop_no_backend"),
        "{text}"
    );
}

#[test]
fn maglev_and_source_ip_index_the_table() {
    let table: Vec<u32> = (0..251).map(|i| i % 3).collect();
    for (scheduler, hash, what) in [
        (
            SCHED_MAGLEV,
            flow_hash(&query().key().expect("an IPv4 flow")),
            "maglev: flow_hash",
        ),
        (
            SCHED_SOURCE_IP,
            source_hash(query().key().expect("an IPv4 flow").saddr),
            "source-ip: hash of the client address",
        ),
    ] {
        let mut svc = service(scheduler, vec![0, 1, 2], 0);
        svc.maglev = table.clone();
        let c = choose(&query().key().expect("an IPv4 flow"), &svc).expect("a backend");
        assert_eq!(
            (c.hash, c.slot, c.len),
            (Some(hash), u64::from(hash % 251), 251)
        );
        assert_eq!(c.backend_id, table[(hash % 251) as usize]);
        let facts = FlowFacts {
            vip_known: true,
            service: Some(svc),
            conntrack: None,
            age: None,
            firewall: Vec::new(),
        };
        let text = explain(&query(), &facts, Some(&view()), &[]);
        assert!(text.contains(what), "{text}");
        assert!(text.contains("of the 251-slot Maglev table"), "{text}");
    }
    // Another port of the same client: same slot under source-ip only.
    let mut other = query();
    other.client.set_port(other.client.port() + 1);
    let mut svc = service(SCHED_SOURCE_IP, vec![0], 0);
    svc.maglev = table;
    assert_eq!(
        choose(&other.key().expect("an IPv4 flow"), &svc).map(|c| c.slot),
        choose(&query().key().expect("an IPv4 flow"), &svc).map(|c| c.slot)
    );
    svc.maglev = Vec::new();
    assert_eq!(choose(&query().key().expect("an IPv4 flow"), &svc), None);
}

#[test]
fn source_hash_is_deterministic() {
    let facts = FlowFacts {
        vip_known: true,
        service: Some(service(SCHED_HASH, vec![0, 1, 2], 0)),
        conntrack: None,
        age: None,
        firewall: Vec::new(),
    };
    let slot = flow_hash(&query().key().expect("an IPv4 flow")) % 3;
    let text = explain(&query(), &facts, Some(&view()), &[]);
    let name = ["web1", "web2", "web3"][slot as usize];
    assert!(
        text.contains(&format!("slot {slot} of 3 → {name}")),
        "{text}"
    );
    assert!(text.contains("deterministic"), "{text}");
}

#[test]
fn a_pinned_flow_names_its_backend_and_what_a_new_syn_does() {
    let mut facts = FlowFacts {
        vip_known: true,
        service: Some(service(SCHED_COUNTER, vec![0, 2], 4)),
        conntrack: Some(pinned(0, BACKEND_F_IN_USE | BACKEND_F_IN_RING)),
        age: None,
        firewall: Vec::new(),
    };
    let text = explain(&query(), &facts, Some(&view()), &[]);
    assert!(
        text.contains("pinned by conntrack to web1 (198.19.0.11:80)"),
        "{text}"
    );
    assert!(text.contains("stays on it"), "{text}");
    assert!(!text.contains("round robin:"), "{text}");

    // Drained: kept for established packets, a new SYN moves.
    facts.conntrack = Some(pinned(1, BACKEND_F_IN_USE));
    let text = explain(&query(), &facts, Some(&view()), &[]);
    assert!(text.contains("pinned by conntrack to web2"), "{text}");
    assert!(
        text.contains("every packet of this flow goes there"),
        "{text}"
    );
    assert!(text.contains("is rescheduled"), "{text}");
    assert!(text.contains("slot 0 of 2 → web1"), "{text}");

    // Disabled: dropped, then a new flow.
    facts.conntrack = Some(pinned(1, BACKEND_F_IN_USE | BACKEND_F_DROP_FLOWS));
    let text = explain(&query(), &facts, Some(&view()), &[]);
    assert!(text.contains("drop_backend_gone"), "{text}");

    // A retired id the agent no longer names.
    facts.conntrack = Some(pinned(9, BACKEND_F_DROP_FLOWS));
    let text = explain(&query(), &facts, Some(&view()), &[]);
    assert!(text.contains("backend id 9 ("), "{text}");
    assert!(text.contains("no longer configured"), "{text}");

    // An empty ring.
    facts.conntrack = None;
    facts.service = Some(service(SCHED_COUNTER, vec![], 4));
    let text = explain(&query(), &facts, Some(&view()), &[]);
    assert!(text.contains("drop_no_backend"), "{text}");
}

#[test]
fn the_firewall_is_named_for_new_flows_only() {
    use lb_common::{FW_F_DENY, FW_F_RATE};
    let conf = |flags| FwScope {
        flags,
        rate: 1000,
        burst: 2000,
        mask: u32::from_ne_bytes([255, 255, 255, 0]),
    };
    let global = FwFacts {
        scope: FW_GLOBAL,
        conf: conf(FW_F_DENY | FW_F_RATE),
        deny: None,
        allow: None,
        mask6: None,
    };
    let svc = FwFacts {
        scope: 0,
        conf: conf(FW_F_ALLOW),
        deny: None,
        allow: None,
        mask6: None,
    };
    let mut facts = FlowFacts {
        vip_known: true,
        service: Some(service(SCHED_COUNTER, vec![0, 2], 7)),
        conntrack: None,
        age: None,
        firewall: vec![global.clone(), svc.clone()],
    };
    let text = explain(&query(), &facts, Some(&view()), &[]);
    assert!(
        text.contains(
            "[firewall]: new flows are rate-limited to 1000 a second, burst 2000, per /24"
        ),
        "{text}"
    );
    assert!(
        text.contains("service www's firewall: the source is not in the allow list"),
        "{text}"
    );
    assert!(text.contains("drop_firewall_not_allowed"), "{text}");
    assert!(!text.contains("round robin:"), "{text}");

    facts.firewall[1].allow = Some(("allow 198.18.0.0/24".into(), 4));
    let text = explain(&query(), &facts, Some(&view()), &[]);
    assert!(
        text.contains("allowed by allow 198.18.0.0/24 (rule 4)"),
        "{text}"
    );
    assert!(text.contains("round robin:"), "{text}");

    facts.firewall[0].deny = Some(("deny 198.18.0.0/16".into(), 1));
    let text = explain(&query(), &facts, Some(&view()), &[]);
    assert!(
        text.contains("[firewall]: the source matches deny 198.18.0.0/16 (rule 1)"),
        "{text}"
    );
    assert!(text.contains("drop_firewall_deny"), "{text}");

    // Established: the firewall is not mentioned (it never sees the flow).
    facts.conntrack = Some(pinned(0, BACKEND_F_IN_USE | BACKEND_F_IN_RING));
    let text = explain(&query(), &facts, Some(&view()), &[]);
    assert!(!text.contains("firewall"), "{text}");

    // No service on the port: the global deny still comes first.
    let q = FlowQuery::parse("198.18.0.2:40000", "198.18.0.10:81/udp").expect("parse");
    let no_service = FlowFacts {
        vip_known: true,
        firewall: vec![facts.firewall[0].clone()],
        ..FlowFacts::default()
    };
    let text = explain(&q, &no_service, None, &[]);
    assert!(text.contains("drop_firewall_deny"), "{text}");
    assert!(!text.contains("pass_no_service"), "{text}");
}

#[test]
fn a_full_nat_flow_names_its_source_address_and_port() {
    let mut entry = pinned(0, BACKEND_F_IN_USE | BACKEND_F_IN_RING);
    entry.0.flags = lb_common::FLOW_F_FULL_NAT;
    entry.0.vip = u32::from_ne_bytes([198, 19, 0, 1]);
    entry.0.vport = 20001u16.to_be();
    let facts = |conntrack| FlowFacts {
        vip_known: true,
        service: Some(service(SCHED_COUNTER, vec![0, 2], 4)),
        conntrack: Some(conntrack),
        age: None,
        firewall: Vec::new(),
    };
    let text = explain(&query(), &facts(entry), Some(&view()), &[]);
    assert!(
        text.contains("full NAT: the backend sees this flow from 198.19.0.1:20001"),
        "{text}"
    );
    // A NAT entry's `vip` is the VIP: no source line.
    let text = explain(
        &query(),
        &facts(pinned(0, BACKEND_F_IN_USE | BACKEND_F_IN_RING)),
        Some(&view()),
        &[],
    );
    assert!(!text.contains("full NAT"), "{text}");
}

#[test]
fn a_flow_from_a_peer_lb_says_so() {
    let local = pinned(0, BACKEND_F_IN_USE | BACKEND_F_IN_RING);
    let mut synced = local;
    synced.0.flags = lb_common::FLOW_F_SYNCED;
    let facts = |conntrack| FlowFacts {
        vip_known: true,
        service: Some(service(SCHED_COUNTER, vec![0, 2], 4)),
        conntrack: Some(conntrack),
        age: None,
        firewall: Vec::new(),
    };
    let text = explain(&query(), &facts(synced), Some(&view()), &[]);
    assert!(text.contains("came from a peer LB"), "{text}");
    assert!(text.contains("pinned by conntrack to web1"), "{text}");
    let text = explain(&query(), &facts(local), Some(&view()), &[]);
    assert!(!text.contains("peer"), "{text}");
}

/// An IPv6 flow a peer LB's sync put here says so, as an IPv4 one does.
#[test]
fn an_ipv6_flow_from_a_peer_lb_says_so() {
    let q = FlowQuery::parse("[2001:db8::2]:41234", "[2001:db8::10]:80/tcp").expect("parse");
    let view = view();
    let (entry, age) = aged(
        Flow {
            backend_id: view.backends[0].id,
            state: lb_common::flow::STATE_ESTABLISHED,
            flags: lb_common::FLOW_F_SYNCED,
            ..Flow::default()
        },
        IPPROTO_TCP,
        2,
        None,
    );
    let synced = Flow6Facts {
        established: true,
        entry,
        age,
    };
    let text = explain6(&q, Some(&synced), &FlowFacts6::default(), Some(&view), &[]);
    assert!(text.contains("came from a peer LB ([sync])"), "{text}");
    let local = Flow6Facts {
        entry: Flow { flags: 0, ..entry },
        ..synced
    };
    let text = explain6(&q, Some(&local), &FlowFacts6::default(), Some(&view), &[]);
    assert!(!text.contains("peer"), "{text}");
}

#[test]
fn an_ipv6_flow_parses_and_is_answered_honestly() {
    let q = FlowQuery::parse("[2001:db8::2]:41234", "[2001:db8::10]:80/tcp").expect("parse");
    assert_eq!(q.vip, "[2001:db8::10]:80".parse().expect("addr"));
    assert_eq!(q.key(), None, "not an IPv4 flow");
    let key6 = q.key6().expect("an IPv6 key");
    assert_eq!(
        (key6.sport, key6.dport, key6.protocol),
        (
            41234u16.to_be(),
            80u16.to_be(),
            lb_common::headers::IPPROTO_TCP
        )
    );
    assert_eq!(
        key6.saddr,
        lb_common::ipv6::addr_of(
            "2001:db8::2"
                .parse::<std::net::Ipv6Addr>()
                .expect("ip")
                .octets()
        )
    );
    // Whatever the IPv4 maps say, an IPv6 flow is not theirs: IPv6's tables
    // have no entry for it.
    let facts = FlowFacts {
        vip_known: true,
        ..FlowFacts::default()
    };
    let text = explain(&q, &facts, None, &[]);
    assert!(
        text.starts_with(
            "[2001:db8::2]:41234 → [2001:db8::10]:80/tcp: no service is configured on this address"
        ),
        "{text}"
    );
    assert!(
        text.contains("no entry in IPv6's flow tables: a packet of it is a new flow"),
        "{text}"
    );
    let named = explain(&q, &facts, None, &["v6 [2001:db8::10]:80/tcp".into()]);
    assert!(
        named.contains("services configured on this address: v6 [2001:db8::10]:80/tcp"),
        "{named}"
    );
    for (client, service, want) in [
        (
            "[2001:db8::2]:1",
            "198.18.0.10:80/tcp",
            "client [2001:db8::2]:1 and VIP 198.18.0.10:80 are of different families",
        ),
        ("2001:db8::2:1", "[2001:db8::10]:80/tcp", "bad client"),
        ("[2001:db8::2]:1", "2001:db8::10:80/udp", "bad VIP"),
    ] {
        let e = FlowQuery::parse(client, service).expect_err("bad");
        assert!(format!("{e:#}").contains(want), "{client} {service}: {e:#}");
    }
}

/// `FLOW_CONF`'s timeouts as the config's defaults make them (30 s
/// half-open, 900 s TCP, 10 s closing, 60 s UDP, in ticks).
fn flow_conf() -> lb_common::FlowConf {
    let t = |s: u64| lb_common::flow::duration_ticks(s * 1_000_000_000);
    lb_common::FlowConf {
        timeouts: [t(30), t(900), t(10), t(60)],
        ..lb_common::FlowConf::default()
    }
}

/// The agent's clock in these tests, in ticks.
const NOW: u32 = 100_000;

/// `flow` last seen `idle` ticks before [`NOW`] (negative: after it, as
/// the data plane's clock may stamp it), and its age then.
fn aged(mut flow: Flow, protocol: u8, idle: i32, pair: Option<&Flow>) -> (Flow, EntryAge) {
    flow.seen = NOW.wrapping_add_signed(-idle);
    let age = EntryAge::of(&flow_conf(), protocol, &flow, pair, NOW);
    (flow, age)
}

#[test]
fn an_ipv6_flow_in_ipv6s_tables_names_its_backend_state_and_age() {
    let q = FlowQuery::parse("[2001:db8::2]:41234", "[2001:db8::10]:80/tcp").expect("parse");
    let mut view = view();
    view.backends[0].address = "[fd00::b1]:8080".into();
    let id = view.backends[0].id;
    let (entry, age) = aged(
        Flow {
            backend_id: id,
            state: lb_common::flow::STATE_ESTABLISHED,
            ..Flow::default()
        },
        IPPROTO_TCP,
        28,
        None,
    );
    let established = Flow6Facts {
        established: true,
        entry,
        age,
    };
    let text = explain6(
        &q,
        Some(&established),
        &FlowFacts6::default(),
        Some(&view),
        &["v6 [2001:db8::10]:80/tcp".into()],
    );
    assert!(
        text.contains(&format!(
            "established in IPv6's flow table (established): pinned to {} ([fd00::b1]:8080); \
             every packet of this flow goes there\nidle 28 ticks (~30 s), timeout 900 s (tcp)\n",
            view.backends[0].name
        )),
        "{text}"
    );
    assert!(text.contains("backends:\n"), "{text}");
    // Stamped a tick after the agent's now (the data plane's clock runs
    // ahead): idle 0, read signed as the expiry reads it (not 2^32 - 1).
    let (entry, age) = aged(
        Flow {
            state: lb_common::flow::STATE_SYN_ACKED,
            ..entry
        },
        IPPROTO_TCP,
        -1,
        None,
    );
    let half_open = Flow6Facts {
        established: false,
        entry,
        age,
    };
    let text = explain6(
        &q,
        Some(&half_open),
        &FlowFacts6::default(),
        Some(&view),
        &[],
    );
    assert!(
        text.contains("half-open in IPv6's flow table (SYN-ACK seen): pinned to"),
        "{text}"
    );
    assert!(
        text.contains("idle 0 ticks (~0 s), timeout 30 s (tcp-half-open)"),
        "{text}"
    );
    // A backend id the agent does not know any more.
    let gone = Flow6Facts {
        entry: Flow {
            backend_id: 999,
            ..entry
        },
        ..established
    };
    assert!(
        explain6(&q, Some(&gone), &FlowFacts6::default(), Some(&view), &[])
            .contains("backend id 999 (not configured)")
    );
}

#[test]
fn an_entrys_age_is_read_signed_and_expires_after_its_whole_timeout() {
    let udp = Flow {
        state: lb_common::flow::STATE_ESTABLISHED,
        ..Flow::default()
    };
    let timeout = flow_conf().timeouts[lb_common::flow::Timeout::Udp as usize];
    // A tick ahead of the agent's clock: idle 0, live.
    let (_, ahead) = aged(udp, IPPROTO_UDP, -1, None);
    assert_eq!((ahead.idle, ahead.expired), (0, false));
    assert_eq!(age_text(&ahead), "idle 0 ticks (~0 s), timeout 60 s (udp)");
    // At its timeout: live; a tick past it: a miss.
    let (_, at) = aged(udp, IPPROTO_UDP, timeout as i32, None);
    assert!(!at.is_miss(), "{at:?}");
    let (_, past) = aged(udp, IPPROTO_UDP, timeout as i32 + 1, None);
    assert!(past.is_miss(), "{past:?}");
    let (_, long) = aged(udp, IPPROTO_UDP, 89, None);
    assert_eq!(
        age_text(&long),
        "expired: idle 89 ticks (~95 s), timeout 60 s (udp): the next packet is a miss (a new \
         flow) and removes the entry, if the sweep has not"
    );
    // A NAT flow's live other direction keeps the expired entry.
    let (reply, _) = aged(udp, IPPROTO_UDP, 2, None);
    let (_, kept) = aged(udp, IPPROTO_UDP, 89, Some(&reply));
    assert!(kept.expired && !kept.is_miss(), "{kept:?}");
    assert!(
        age_text(&kept).contains("the entry stays"),
        "{}",
        age_text(&kept)
    );
    // No timeouts written yet: nothing expires.
    let unset = EntryAge::of(
        &lb_common::FlowConf::default(),
        IPPROTO_UDP,
        &udp,
        None,
        NOW,
    );
    assert!(!unset.is_miss());
    assert!(
        age_text(&unset).contains("nothing expires"),
        "{}",
        age_text(&unset)
    );
}

#[test]
fn an_expired_conntrack_entry_is_a_miss_and_the_flow_is_new() {
    use lb_common::FW_F_DENY;
    let q = FlowQuery::parse("198.18.0.2:40000", "198.18.0.10:80/udp").expect("parse");
    let (pinned_entry, backend) = pinned(0, BACKEND_F_IN_USE | BACKEND_F_IN_RING);
    let (entry, age) = aged(
        Flow {
            state: lb_common::flow::STATE_ESTABLISHED,
            ..pinned_entry
        },
        IPPROTO_UDP,
        89,
        None,
    );
    let deny = FwFacts {
        scope: FW_GLOBAL,
        conf: FwScope {
            flags: FW_F_DENY,
            ..FwScope::default()
        },
        deny: Some(("deny 198.18.0.0/24".into(), 3)),
        allow: None,
        mask6: None,
    };
    let mut facts = FlowFacts {
        vip_known: true,
        service: Some(service(SCHED_COUNTER, vec![0, 2], 7)),
        conntrack: Some((entry, backend)),
        age: Some(age),
        firewall: Vec::new(),
    };
    let text = explain(&q, &facts, Some(&view()), &[]);
    assert!(
        text.contains(
            "a conntrack entry to web1 (198.19.0.11:80) remains, expired: idle 89 ticks (~95 s), \
             timeout 60 s (udp): the next packet is a miss"
        ),
        "{text}"
    );
    assert!(!text.contains("pinned by conntrack"), "{text}");
    assert!(
        text.contains("counter is at 7, slot 1 of 2 → web3"),
        "a new flow's scheduling: {text}"
    );
    // A new flow meets the firewall.
    facts.firewall = vec![deny];
    let text = explain(&q, &facts, Some(&view()), &[]);
    assert!(text.contains("drop_firewall_deny"), "{text}");
    // The same entry within its timeout is pinned, past the firewall.
    let (entry, age) = aged(entry, IPPROTO_UDP, 3, None);
    facts.conntrack = Some((entry, backend));
    facts.age = Some(age);
    let text = explain(&q, &facts, Some(&view()), &[]);
    assert!(
        text.contains(
            "pinned by conntrack to web1 (198.19.0.11:80): every packet of this flow goes \
             there\nidle 3 ticks (~3 s), timeout 60 s (udp)\n"
        ),
        "{text}"
    );
    assert!(!text.contains("expired"), "{text}");
    assert!(!text.contains("drop_firewall_deny"), "{text}");
}

#[test]
fn an_expired_ipv6_entry_is_a_miss_and_the_flow_is_new() {
    let (q, view) = v6();
    let (entry, age) = aged(
        Flow {
            backend_id: 0,
            state: lb_common::flow::STATE_ESTABLISHED,
            ..Flow::default()
        },
        IPPROTO_TCP,
        900,
        None,
    );
    let facts = FlowFacts6 {
        vip_known: true,
        service: Some(service(SCHED_COUNTER, vec![0, 2], 7)),
        ..FlowFacts6::default()
    };
    let flow6 = Flow6Facts {
        established: true,
        entry,
        age,
    };
    let text = explain6(&q, Some(&flow6), &facts, Some(&view), &[]);
    assert!(
        text.contains(
            "established in IPv6's flow table (established), to web1 ([2001:db8:19::11]:8080), \
             expired: idle 900 ticks (~966 s), timeout 900 s (tcp): the next packet is a miss"
        ),
        "{text}"
    );
    assert!(!text.contains("every packet of this flow"), "{text}");
    assert!(
        text.contains("counter is at 7, slot 1 of 2 → web3"),
        "a new flow's scheduling: {text}"
    );
}

/// An IPv6 query, its view (IPv6 backends) and a service's facts.
fn v6() -> (FlowQuery, ServiceView) {
    let q = FlowQuery::parse("[2001:db8:18::2]:41234", "[2001:db8:18::10]:80/tcp").expect("q");
    let mut view = view();
    for (i, b) in view.backends.iter_mut().enumerate() {
        b.address = format!("[2001:db8:19::{}]:8080", 11 + i);
    }
    view.name = "www6".into();
    (q, view)
}

#[test]
fn a_new_ipv6_flow_gets_the_scheduler_model_and_the_backends_ring_slots() {
    let (q, view) = v6();
    let facts = FlowFacts6 {
        vip_known: true,
        service: Some(service(SCHED_COUNTER, vec![0, 2, 0], 4)),
        source_mask: [0; 4],
        firewall: Vec::new(),
    };
    let text = explain6(&q, None, &facts, Some(&view), &["www6".into()]);
    assert!(
        text.contains("no entry in IPv6's flow tables: a packet of it is a new flow"),
        "{text}"
    );
    assert!(
        text.contains("service www6 (id 0, nat, round-robin)"),
        "{text}"
    );
    // Counter 4 of a 3-slot ring: slot 1, web3.
    assert!(
        text.contains(
            "round robin: the counter is at 4, slot 1 of 3 → web3 ([2001:db8:19::13]:8080)"
        ),
        "{text}"
    );
    assert!(text.contains("not a promise for this tuple"), "{text}");
    assert!(
        text.contains("  web1         [2001:db8:19::11]:8080  admin enabled  health up        2 of 3 ring slots"),
        "{text}"
    );
    assert!(
        text.contains("web2") && text.contains("not in the ring"),
        "{text}"
    );
    // An empty ring: dropped.
    let empty = FlowFacts6 {
        service: Some(service(SCHED_COUNTER, vec![], 0)),
        ..facts.clone()
    };
    assert!(
        explain6(&q, None, &empty, Some(&view), &[]).contains("drop_no_backend"),
        "empty ring"
    );
    // No service on the port; not a VIP.
    let none = FlowFacts6 {
        service: None,
        ..facts.clone()
    };
    let text = explain6(&q, None, &none, None, &[]);
    assert!(
        text.contains("no service on [2001:db8:18::10]:80/tcp") && text.contains("pass_no_service"),
        "{text}"
    );
    let text = explain6(&q, None, &FlowFacts6::default(), None, &[]);
    assert!(
        text.contains("2001:db8:18::10 is not a VIP here") && text.contains("pass_not_ours"),
        "{text}"
    );
}

#[test]
fn ipv6_hash_schedulers_are_modelled_with_ipv6s_hashes_and_the_source_prefix() {
    use lb_common::{
        hash::{flow_hash6, source_hash6},
        ipv6::addr_of,
    };
    let (q, view) = v6();
    let key = q.key6().expect("an IPv6 key");
    let table: Vec<u32> = (0..7).map(|i| i % 3).collect();
    let with = |scheduler, mask| FlowFacts6 {
        vip_known: true,
        service: Some(ServiceFacts {
            maglev: table.clone(),
            ..service(scheduler, table.clone(), 0)
        }),
        source_mask: mask,
        firewall: Vec::new(),
    };
    // maglev and flow-hash: IPv6's flow hash of the tuple.
    for scheduler in [SCHED_MAGLEV, SCHED_HASH] {
        let c = choose6(
            &key,
            &[0; 4],
            with(scheduler, [0; 4]).service.as_ref().expect("s"),
        )
        .expect("a backend");
        assert_eq!(c.hash, Some(flow_hash6(&key)));
        assert_eq!(c.slot, u64::from(flow_hash6(&key)) % 7);
        let text = explain6(&q, None, &with(scheduler, [0; 4]), Some(&view), &[]);
        assert!(
            text.contains(&format!(
                "flow_hash = {:#010x}, slot {}",
                flow_hash6(&key),
                c.slot
            )),
            "{text}"
        );
    }
    // source-ip on the whole address (no mask written, or all ones).
    let whole = source_hash6(&key.saddr, 128);
    for mask in [[0; 4], [u32::MAX; 4]] {
        let c = choose6(
            &key,
            &mask,
            with(SCHED_SOURCE_IP, mask).service.as_ref().expect("s"),
        )
        .expect("a backend");
        assert_eq!(c.hash, Some(whole));
        let text = explain6(&q, None, &with(SCHED_SOURCE_IP, mask), Some(&view), &[]);
        assert!(
            text.contains(&format!(
                "source-ip: hash of the client address = {whole:#010x}"
            )),
            "{text}"
        );
    }
    // source-ip on a /64: every address of the /64 hashes alike, and the
    // prefix is named.
    let mask64 = [u32::MAX, u32::MAX, 0, 0];
    let other = FlowQuery::parse("[2001:db8:18::99:2]:5000", "[2001:db8:18::10]:80/tcp")
        .expect("q")
        .key6()
        .expect("key");
    let svc = with(SCHED_SOURCE_IP, mask64).service.expect("s");
    let c = choose6(&key, &mask64, &svc).expect("a backend");
    assert_eq!(c.hash, Some(source_hash6(&key.saddr, 64)));
    assert_eq!(
        choose6(&other, &mask64, &svc),
        Some(c),
        "one /64, one backend"
    );
    assert_ne!(c.hash, Some(whole));
    let text = explain6(&q, None, &with(SCHED_SOURCE_IP, mask64), Some(&view), &[]);
    assert!(
        text.contains(&format!(
            "source-ip: hash of the client's /64 (2001:db8:18::/64) = {:#010x}",
            source_hash6(&key.saddr, 64)
        )),
        "{text}"
    );
    assert_eq!(
        key.saddr,
        addr_of(
            "2001:db8:18::2"
                .parse::<std::net::Ipv6Addr>()
                .expect("ip")
                .octets()
        )
    );
}

#[test]
fn a_new_ipv6_flow_meets_the_firewalls_ipv6_rules_and_rate_limits() {
    use lb_common::{FW_F_DENY6, FW_F_RATE};
    let (q, view) = v6();
    let conf = |flags| FwScope {
        flags,
        rate: 100,
        burst: 200,
        mask: u32::MAX,
    };
    let scope = |scope, flags, deny: Option<&str>, allow: Option<&str>, mask6| FwFacts {
        scope,
        conf: conf(flags),
        deny: deny.map(|r| (r.to_string(), 3)),
        allow: allow.map(|r| (r.to_string(), 4)),
        mask6,
    };
    let facts = |firewall| FlowFacts6 {
        vip_known: true,
        service: Some(service(SCHED_COUNTER, vec![0, 2], 0)),
        source_mask: [0; 4],
        firewall,
    };
    // A global IPv6 deny: dropped before the service is looked up.
    let text = explain6(
        &q,
        None,
        &facts(vec![scope(
            FW_GLOBAL,
            FW_F_DENY6,
            Some("deny 2001:db8:18::/48"),
            None,
            None,
        )]),
        Some(&view),
        &[],
    );
    assert!(
        text.contains(
            "[firewall]: the source matches deny 2001:db8:18::/48 (rule 3): a new flow is \
             dropped (drop_firewall_deny)"
        ),
        "{text}"
    );
    assert!(
        !text.contains("service www6 (id"),
        "stops at the global deny: {text}"
    );
    // The service's allow list without the client: not allowed.
    let text = explain6(
        &q,
        None,
        &facts(vec![
            scope(FW_GLOBAL, 0, None, None, None),
            scope(0, FW_F_ALLOW, None, None, None),
        ]),
        Some(&view),
        &[],
    );
    assert!(
        text.contains("service www6's firewall: the source is not in the allow list")
            && text.contains("drop_firewall_not_allowed")
            && !text.contains("round robin"),
        "{text}"
    );
    // Allowed by a /64, rate-limited per /64 (the IPv6 mask), then scheduled.
    let text = explain6(
        &q,
        None,
        &facts(vec![
            scope(FW_GLOBAL, 0, None, None, None),
            scope(
                0,
                FW_F_ALLOW | FW_F_RATE,
                None,
                Some("allow 2001:db8:18::/64"),
                Some([u32::MAX, u32::MAX, 0, 0]),
            ),
        ]),
        Some(&view),
        &[],
    );
    assert!(
        text.contains(
            "service www6's firewall: the source is allowed by allow 2001:db8:18::/64 (rule 4)"
        ),
        "{text}"
    );
    assert!(
        text.contains("new flows are rate-limited to 100 a second, burst 200, per /64"),
        "{text}"
    );
    assert!(text.contains("round robin: the counter is at 0"), "{text}");
    // Per address: the whole IPv6 mask.
    let text = explain6(
        &q,
        None,
        &facts(vec![scope(
            FW_GLOBAL,
            FW_F_RATE,
            None,
            None,
            Some([u32::MAX; 4]),
        )]),
        Some(&view),
        &[],
    );
    assert!(text.contains("burst 200, per address"), "{text}");
}
