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
    };
    let svc = FwFacts {
        scope: 0,
        conf: conf(FW_F_ALLOW),
        deny: None,
        allow: None,
    };
    let mut facts = FlowFacts {
        vip_known: true,
        service: Some(service(SCHED_COUNTER, vec![0, 2], 7)),
        conntrack: None,
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
        firewall: Vec::new(),
    };
    let text = explain(&query(), &facts(synced), Some(&view()), &[]);
    assert!(text.contains("came from a peer LB"), "{text}");
    assert!(text.contains("pinned by conntrack to web1"), "{text}");
    let text = explain(&query(), &facts(local), Some(&view()), &[]);
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

#[test]
fn an_ipv6_flow_in_ipv6s_tables_names_its_backend_state_and_age() {
    let q = FlowQuery::parse("[2001:db8::2]:41234", "[2001:db8::10]:80/tcp").expect("parse");
    let mut view = view();
    view.backends[0].address = "[fd00::b1]:8080".into();
    let id = view.backends[0].id;
    let entry = Flow {
        backend_id: id,
        state: lb_common::flow::STATE_ESTABLISHED,
        ..Flow::default()
    };
    let established = Flow6Facts {
        established: true,
        entry,
        idle: 28,
    };
    let text = explain6(
        &q,
        Some(&established),
        Some(&view),
        &["v6 [2001:db8::10]:80/tcp".into()],
    );
    assert!(
        text.contains(&format!(
            "established in IPv6's flow table (established), idle 28 ticks (~30 s): pinned to \
             {} ([fd00::b1]:8080)",
            view.backends[0].name
        )),
        "{text}"
    );
    assert!(text.contains("backends:\n"), "{text}");
    let half_open = Flow6Facts {
        established: false,
        entry: Flow {
            state: lb_common::flow::STATE_SYN_ACKED,
            ..entry
        },
        idle: 0,
    };
    let text = explain6(&q, Some(&half_open), Some(&view), &[]);
    assert!(
        text.contains("half-open in IPv6's flow table (SYN-ACK seen), idle 0 ticks"),
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
        explain6(&q, Some(&gone), Some(&view), &[]).contains("backend id 999 (not configured)")
    );
}
