//! Accepted configs: defaults applied, every shape TOML allows, limits at
//! the boundary, and `check` agreeing with `parse`.

use super::*;

// --- accepted configs -------------------------------------------------

#[test]
fn full_config_parses_with_defaults_applied() {
    let text = r#"
[dataplane]
interfaces = ["eth0"]
forwarding = "dsr"
xdp-mode = "generic"
conntrack-size = 1024

[[service]]
name = "defaults"
vip = "10.0.0.1:443"
backends = [{ address = "10.0.1.1:443" }]

[[service]]
name = "explicit"
vip = "10.0.0.1:53"
protocol = "udp"
forwarding = "nat"
scheduler = "weighted-round-robin"
health = { check = "http", path = "/healthz", expect-status = 204, expect-body = "ok", interval = "500ms", timeout = "500ms", rise = 1, fall = 100 }
backends = [
  { address = "10.0.1.1:5353", name = "a", weight = 3, backup = false },
  { address = "10.0.1.2:5353", name = "b.2_x-y", weight = 0, backup = true },
]

[[service]]
name = "checks"
vip = "10.0.0.2:80"
scheduler = "flow-hash"
health = { check = "tcp" }
backends = [{ address = "10.0.1.3:80" }]

[[service]]
name = "http-defaults"
vip = "10.0.0.3:80"
health = { check = "http" }
backends = [{ address = "10.0.1.3:80" }]
"#;
    let tcp_defaults = HealthCheck {
        check: CheckKind::Tcp,
        port: None,
        interval: Duration::from_secs(2),
        timeout: Duration::from_secs(1),
        rise: 2,
        fall: 3,
        through_vip: false,
    };
    let expected = Config {
        firewall: Default::default(),
        dataplane: Dataplane {
            interfaces: vec!["eth0".to_owned()],
            forwarding: Forwarding::Dsr,
            xdp_mode: XdpMode::Generic,
            conntrack_size: 1024,
            half_open_size: lb_common::DEFAULT_HALF_OPEN_SIZE,
            new_flow_budget: 125_000,
            timeouts: Default::default(),
            tunnel_source: None,
            tunnel_source6: None,
            gue_port: lb_common::tunnel::GUE_DEFAULT_PORT,
            full_nat: Default::default(),
        },
        monitoring: None,
        pools: Vec::new(),
        announce: None,
        coordination: None,
        sync: None,
        services: vec![
            Service {
                firewall: Default::default(),
                name: "defaults".to_owned(),
                vip: addr("10.0.0.1:443"),
                protocol: Protocol::Tcp,
                // Inherited from [dataplane].
                forwarding: Forwarding::Dsr,
                scheduler: Scheduler::RoundRobin,
                health: None,
                on_backend_down: OnBackendDown::KeepFlows,
                maglev_table_size: lb_common::maglev::MAGLEV_DEFAULT_SIZE,
                source_ip_prefix: lb_common::maps6::SOURCE_PREFIX_WHOLE,
                backends: vec![Backend {
                    name: "10.0.1.1:443".to_owned(),
                    address: addr("10.0.1.1:443"),
                    weight: 1,
                    backup: false,
                    health: None,
                    max_connections: None,
                }],
                limits: Default::default(),
                proxy_protocol: None,
            },
            Service {
                firewall: Default::default(),
                name: "explicit".to_owned(),
                vip: addr("10.0.0.1:53"),
                protocol: Protocol::Udp,
                forwarding: Forwarding::Nat,
                scheduler: Scheduler::WeightedRoundRobin,
                health: Some(HealthCheck {
                    check: CheckKind::Http {
                        path: "/healthz".to_owned(),
                        expect_status: 204,
                        expect_body: Some("ok".to_owned()),
                    },
                    port: None,
                    interval: Duration::from_millis(500),
                    timeout: Duration::from_millis(500),
                    rise: 1,
                    fall: 100,
                    through_vip: false,
                }),
                on_backend_down: OnBackendDown::KeepFlows,
                maglev_table_size: lb_common::maglev::MAGLEV_DEFAULT_SIZE,
                source_ip_prefix: lb_common::maps6::SOURCE_PREFIX_WHOLE,
                backends: vec![
                    Backend {
                        name: "a".to_owned(),
                        address: addr("10.0.1.1:5353"),
                        weight: 3,
                        backup: false,
                        health: None,
                        max_connections: None,
                    },
                    Backend {
                        name: "b.2_x-y".to_owned(),
                        address: addr("10.0.1.2:5353"),
                        weight: 0,
                        backup: true,
                        health: None,
                        max_connections: None,
                    },
                ],
                limits: Default::default(),
                proxy_protocol: None,
            },
            Service {
                firewall: Default::default(),
                name: "checks".to_owned(),
                vip: addr("10.0.0.2:80"),
                protocol: Protocol::Tcp,
                forwarding: Forwarding::Dsr,
                scheduler: Scheduler::FlowHash,
                health: Some(tcp_defaults),
                on_backend_down: OnBackendDown::KeepFlows,
                maglev_table_size: lb_common::maglev::MAGLEV_DEFAULT_SIZE,
                source_ip_prefix: lb_common::maps6::SOURCE_PREFIX_WHOLE,
                backends: vec![Backend {
                    name: "10.0.1.3:80".to_owned(),
                    address: addr("10.0.1.3:80"),
                    weight: 1,
                    backup: false,
                    health: None,
                    max_connections: None,
                }],
                limits: Default::default(),
                proxy_protocol: None,
            },
            Service {
                firewall: Default::default(),
                name: "http-defaults".to_owned(),
                vip: addr("10.0.0.3:80"),
                protocol: Protocol::Tcp,
                forwarding: Forwarding::Dsr,
                scheduler: Scheduler::RoundRobin,
                health: Some(HealthCheck {
                    check: CheckKind::Http {
                        path: "/".to_owned(),
                        expect_status: 200,
                        expect_body: None,
                    },
                    port: None,
                    interval: Duration::from_secs(2),
                    timeout: Duration::from_secs(1),
                    rise: 2,
                    fall: 3,
                    through_vip: false,
                }),
                on_backend_down: OnBackendDown::KeepFlows,
                maglev_table_size: lb_common::maglev::MAGLEV_DEFAULT_SIZE,
                source_ip_prefix: lb_common::maps6::SOURCE_PREFIX_WHOLE,
                backends: vec![Backend {
                    name: "10.0.1.3:80".to_owned(),
                    address: addr("10.0.1.3:80"),
                    weight: 1,
                    backup: false,
                    health: None,
                    max_connections: None,
                }],
                limits: Default::default(),
                proxy_protocol: None,
            },
        ],
    };
    assert_eq!(parse_ok(text), expected);
}

#[test]
fn monitoring_listens_on_ipv6_too() {
    let on = parse_ok(&with_monitoring("listen = \"[::1]:9100\""));
    let listen = on.monitoring.as_ref().expect("on").listen;
    assert_eq!(listen, "[::1]:9100".parse().unwrap());
    assert!(listen.is_ipv6());
    // Round trip through the raw shape keeps the brackets.
    assert_eq!(
        check(&on, Path::new("live")).expect("valid").monitoring,
        on.monitoring
    );
}

#[test]
fn monitoring_is_off_unless_configured() {
    assert_eq!(parse_ok(&one_service("", B1)).monitoring, None);
    let on = parse_ok(&with_monitoring("listen = \"127.0.0.1:9100\""));
    assert_eq!(
        on.monitoring,
        Some(Monitoring {
            listen: "127.0.0.1:9100".parse().unwrap()
        })
    );
    // A live change keeps it (check() round-trips it through the raw shape).
    assert_eq!(
        check(&on, Path::new("live")).expect("valid").monitoring,
        on.monitoring
    );
}

#[test]
fn dataplane_defaults() {
    let config = parse_ok(&one_service("", B1));
    assert_eq!(
        config.dataplane,
        Dataplane {
            interfaces: vec!["lb-front".to_owned(), "lb-back".to_owned()],
            forwarding: Forwarding::Nat,
            xdp_mode: XdpMode::Native,
            conntrack_size: lb_common::DEFAULT_CONNTRACK_SIZE,
            half_open_size: lb_common::DEFAULT_HALF_OPEN_SIZE,
            new_flow_budget: 125_000,
            timeouts: Default::default(),
            tunnel_source: None,
            tunnel_source6: None,
            gue_port: lb_common::tunnel::GUE_DEFAULT_PORT,
            full_nat: Default::default(),
        }
    );
    assert_eq!(config.services[0].forwarding, Forwarding::Nat);
}

#[test]
fn check_accepts_a_parsed_config_unchanged() {
    // The last one has an unnamed backend (named after its address).
    for text in [
        include_str!("../../../../config/foobar.toml"),
        FULL_FOR_CHECK,
        &one_service("", B1),
    ] {
        let cfg = parse_ok(text);
        let again = check(&cfg, Path::new("lb backend")).expect("valid config");
        assert_eq!(again, cfg);
    }
}

#[test]
fn check_applies_the_file_rules_to_live_changes() {
    let cfg = parse_ok(include_str!("../../../../config/foobar.toml"));
    let reject = |edit: &dyn Fn(&mut Config), key: &str, fragment: &str| {
        let mut next = cfg.clone();
        edit(&mut next);
        match check(&next, Path::new("lb backend")) {
            Err(ConfigError::Invalid {
                file,
                key: k,
                reason,
            }) => {
                assert_eq!(file, Path::new("lb backend"));
                assert_eq!(k, key, "{reason}");
                assert!(reason.contains(fragment), "{reason}");
            }
            other => panic!("expected a rejection on {key}, got {other:?}"),
        }
    };
    let added = |name: &str, address: &str, weight: u32| Backend {
        name: name.into(),
        address: addr(address),
        weight,
        backup: false,
        health: None,
        max_connections: None,
    };
    reject(
        &|c| {
            c.services[0]
                .backends
                .push(added("web4", "198.19.0.11:80", 1))
        },
        "service[0].backends[3].address",
        "already backends[0]",
    );
    reject(
        &|c| {
            c.services[0]
                .backends
                .push(added("web1", "198.19.0.14:80", 1))
        },
        "service[0].backends[3].name",
        "duplicate backend name",
    );
    reject(
        &|c| c.services[0].backends[1].weight = 2,
        "service[0].backends[1].weight",
        "weighted-round-robin",
    );
    reject(
        &|c| {
            c.services[0]
                .backends
                .push(added("bad name", "198.19.0.14:80", 1))
        },
        "service[0].backends[3].name",
        "expected 1 to 64 characters",
    );
}

/// Every optional key set, for the `check` round trip.
const FULL_FOR_CHECK: &str = r#"
[dataplane]
interfaces = ["eth0"]
forwarding = "dsr"
xdp-mode = "generic"
conntrack-size = 4096

[[service]]
name = "db"
vip = "198.18.0.20:3306"
protocol = "tcp"
forwarding = "nat"
scheduler = "weighted-round-robin"
on-backend-down = "drop-flows"
health = { check = "http", path = "/ready", expect-status = 204, expect-body = "ok", interval = "1500ms", timeout = "1s", rise = 3, fall = 4 }
backends = [
  { name = "db1", address = "198.19.0.21:3307", weight = 3 },
  { name = "db2", address = "198.19.0.22:3307", weight = 0, backup = true, health = { check = "tcp", interval = "2s", timeout = "250ms" } },
]
"#;

#[test]
fn foobar_toml_parses() {
    fn endpoints(s: &Service) -> Vec<(&str, SocketAddr)> {
        s.backends
            .iter()
            .map(|b| (b.name.as_str(), b.address))
            .collect()
    }
    let config = parse_ok(include_str!("../../../../config/foobar.toml"));
    assert_eq!(config.dataplane.interfaces, ["lb-front", "lb-back"]);
    assert_eq!(config.dataplane.forwarding, Forwarding::Nat);
    assert_eq!(config.dataplane.xdp_mode, XdpMode::Native);
    assert_eq!(
        config.monitoring,
        Some(Monitoring {
            listen: "127.0.0.1:9100".parse().unwrap()
        })
    );
    // www, www-udp, www-tls, dns, and the pool's db-write and db-read.
    assert_eq!(config.services.len(), 6);
    assert!(matches!(
        config.services[3].health.as_ref().map(|h| &h.check),
        Some(CheckKind::Dns(d)) if d.name == "www.foobar.com." && d.record_type == "A"
    ));
    assert_eq!(config.pools.len(), 1);
    assert_eq!(config.pools[0].members.len(), 3);

    let www = &config.services[0];
    assert_eq!(
        (www.name.as_str(), www.vip, www.protocol),
        ("www", addr("198.18.0.10:80"), Protocol::Tcp)
    );
    assert_eq!(
        (www.forwarding, www.scheduler),
        (Forwarding::Nat, Scheduler::RoundRobin)
    );
    assert_eq!(
        www.health,
        Some(HealthCheck {
            check: CheckKind::Http {
                path: "/".to_owned(),
                expect_status: 200,
                expect_body: None
            },
            port: None,
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
            rise: 2,
            fall: 2,
            through_vip: false,
        })
    );
    let backends: Vec<(&str, SocketAddr, u32, bool)> = www
        .backends
        .iter()
        .map(|b| (b.name.as_str(), b.address, b.weight, b.backup))
        .collect();
    assert_eq!(
        backends,
        [
            ("web1", addr("198.19.0.11:80"), 1, false),
            ("web2", addr("198.19.0.12:80"), 1, false),
            ("web3", addr("198.19.0.13:80"), 1, false),
        ]
    );

    let udp = &config.services[1];
    assert_eq!(
        (udp.name.as_str(), udp.vip, udp.protocol),
        ("www-udp", addr("198.18.0.10:5353"), Protocol::Udp)
    );
    // Checked over HTTP on the web servers' port 80, not on 5353.
    assert_eq!(udp.scheduler, Scheduler::RoundRobin);
    assert_eq!(
        udp.health,
        Some(HealthCheck {
            port: Some(80),
            ..www.health.clone().expect("www is checked")
        })
    );
    let web1 = &udp.backends[0];
    assert_eq!(
        udp.health_for(web1).map(|h| h.target(web1.address)),
        Some(addr("198.19.0.11:80"))
    );
    assert_eq!(
        endpoints(udp),
        [
            ("web1", addr("198.19.0.11:5353")),
            ("web2", addr("198.19.0.12:5353")),
            ("web3", addr("198.19.0.13:5353"))
        ]
    );

    // HTTPS passed through to the webs' :443, checked over HTTP on :80.
    let tls = &config.services[2];
    assert_eq!(
        (tls.name.as_str(), tls.vip, tls.protocol, tls.scheduler),
        (
            "www-tls",
            addr("198.18.0.10:443"),
            Protocol::Tcp,
            Scheduler::RoundRobin
        )
    );
    assert_eq!(tls.health, udp.health);
    assert_eq!(
        endpoints(tls),
        [
            ("web1", addr("198.19.0.11:443")),
            ("web2", addr("198.19.0.12:443")),
            ("web3", addr("198.19.0.13:443"))
        ]
    );
    assert_eq!(
        tls.health_for(&tls.backends[0])
            .map(|h| h.target(tls.backends[0].address)),
        Some(addr("198.19.0.11:80"))
    );
}

#[test]
fn array_of_tables_and_dotted_keys_are_accepted() {
    let text = format!(
        "{DP}\n[[service]]\nname = \"www\"\nvip = \"198.18.0.10:80\"\nhealth.check = \"tcp\"\nhealth.rise = 5\n\
         [[service.backends]]\naddress = \"198.19.0.11:80\"\n[[service.backends]]\naddress = \"198.19.0.12:80\"\n"
    );
    let config = parse_ok(&text);
    let service = &config.services[0];
    assert_eq!(
        service.health.as_ref().map(|h| (h.check.clone(), h.rise)),
        Some((CheckKind::Tcp, 5))
    );
    assert_eq!(
        service
            .backends
            .iter()
            .map(|b| b.address)
            .collect::<Vec<_>>(),
        [addr("198.19.0.11:80"), addr("198.19.0.12:80")]
    );
}

#[test]
fn same_backend_in_several_services_is_allowed() {
    let text = format!(
        "{}\n[[service]]\nname = \"other\"\nvip = \"198.18.0.11:80\"\nbackends = [{B1}]\n",
        one_service("", B1)
    );
    let config = parse_ok(&text);
    assert_eq!(
        config.services[0].backends[0].address,
        config.services[1].backends[0].address
    );
}

#[test]
fn same_vip_and_port_with_other_protocol_is_allowed() {
    let text = format!(
        "{}\n[[service]]\nname = \"dns\"\nvip = \"198.18.0.10:80\"\nprotocol = \"udp\"\nbackends = [{B1}]\n",
        one_service("", B1)
    );
    assert_eq!(parse_ok(&text).services[1].protocol, Protocol::Udp);
}

#[test]
fn fully_drained_service_without_backup_is_allowed() {
    let backends =
        r#"{ address = "198.19.0.11:80", weight = 0 }, { address = "198.19.0.12:80", weight = 0 }"#;
    let config = parse_ok(&one_service("", backends));
    assert!(
        config.services[0]
            .backends
            .iter()
            .all(|b| b.weight == 0 && !b.backup)
    );
    // Also under weighted round robin (the ring is simply empty).
    parse_ok(&one_service(
        "scheduler = \"weighted-round-robin\"",
        backends,
    ));
}

#[test]
fn limits_at_the_boundary_are_accepted() {
    let text = with_dataplane_line("conntrack-size = 16777216");
    assert_eq!(parse_ok(&text).dataplane.conntrack_size, 16_777_216);
    let text = one_service("", B1).replace("lb-front", "abcdefghijklmno");
    assert_eq!(parse_ok(&text).dataplane.interfaces[0], "abcdefghijklmno");
    let long = "n".repeat(64);
    assert_eq!(
        parse_ok(&one_service("", B1).replace("\"www\"", &format!("{long:?}"))).services[0].name,
        long
    );
    let config = parse_ok(&one_service(
        "scheduler = \"weighted-round-robin\"",
        r#"{ address = "198.19.0.11:80", weight = 1000 }"#,
    ));
    assert_eq!(config.services[0].backends[0].weight, 1000);
    // Exactly MAX_RING primaries (and MAX_BACKENDS backends).
    assert_eq!(
        parse_ok(&one_service("", &many_backends(MAX_RING, ""))).services[0]
            .backends
            .len(),
        MAX_RING
    );
}

// --- health -------------------------------------------------------------

#[test]
fn backend_health_overrides_the_service_check() {
    let backends = r#"{ address = "198.19.0.11:80", name = "web1" },
        { address = "198.19.0.12:80", name = "web2", health = { check = "tcp", interval = "500ms", timeout = "200ms", fall = 1 } }"#;
    let config = parse_ok(&one_service(
        "health = { check = \"http\", path = \"/healthz\" }",
        backends,
    ));
    let service = &config.services[0];
    let (web1, web2) = (&service.backends[0], &service.backends[1]);
    assert_eq!(web1.health, None);
    let own = HealthCheck {
        check: CheckKind::Tcp,
        port: None,
        interval: Duration::from_millis(500),
        timeout: Duration::from_millis(200),
        rise: 2,
        fall: 1,
        through_vip: false,
    };
    assert_eq!(web2.health.as_ref(), Some(&own));
    // web1 inherits the service's check, web2 uses its own.
    assert_eq!(service.health_for(web1), service.health.as_ref());
    assert!(matches!(
        service.health_for(web1).map(|h| &h.check),
        Some(CheckKind::Http { path, .. }) if path == "/healthz"
    ));
    assert_eq!(service.health_for(web2), Some(&own));
}

#[test]
fn backend_health_without_service_health_is_allowed() {
    let backends = r#"{ address = "198.19.0.11:80" },
        { address = "198.19.0.12:80", health = { check = "http", expect-body = "ok" } }"#;
    let config = parse_ok(&one_service("", backends));
    let service = &config.services[0];
    assert_eq!(service.health, None);
    assert_eq!(service.health_for(&service.backends[0]), None);
    assert!(matches!(
        service.health_for(&service.backends[1]).map(|h| &h.check),
        Some(CheckKind::Http { expect_body: Some(body), .. }) if body == "ok"
    ));
    // As [service.backends.health] tables too.
    let text = format!(
        "{DP}[[service]]\nname = \"b\"\nvip = \"198.18.0.11:80\"\n[[service.backends]]\naddress = \"198.19.0.11:80\"\n\
         [service.backends.health]\ncheck = \"tcp\"\nrise = 7\n"
    );
    let config = parse_ok(&text);
    assert_eq!(
        config.services[0].backends[0]
            .health
            .as_ref()
            .map(|h| (h.check.clone(), h.rise)),
        Some((CheckKind::Tcp, 7))
    );
}

#[test]
fn health_port_defaults_to_the_backend_port() {
    let config = parse_ok(&with_health("check = \"tcp\""));
    let service = &config.services[0];
    let check = service.health.as_ref().expect("checked");
    assert_eq!(check.port, None);
    assert_eq!(
        check.target(service.backends[0].address),
        addr("198.19.0.11:80")
    );
}

#[test]
fn health_port_moves_the_probe_to_another_port_of_the_backend() {
    // A UDP service checked over HTTP on port 80, one backend checked
    // over TCP on 8053 by its own check.
    let text = format!(
        "{DP}[[service]]\nname = \"dns\"\nvip = \"198.18.0.10:5353\"\nprotocol = \"udp\"\n\
         health = {{ check = \"http\", port = 80, path = \"/healthz\" }}\n\
         backends = [{{ address = \"198.19.0.11:5353\" }}, \
         {{ address = \"198.19.0.12:5353\", health = {{ check = \"tcp\", port = 8053 }} }}]\n"
    );
    let config = parse_ok(&text);
    let service = &config.services[0];
    let (b1, b2) = (&service.backends[0], &service.backends[1]);
    let service_check = service.health.as_ref().expect("checked");
    assert_eq!(service_check.port, Some(80));
    assert!(matches!(&service_check.check, CheckKind::Http { path, .. } if path == "/healthz"));
    let targets: Vec<Option<SocketAddr>> = [b1, b2]
        .iter()
        .map(|b| service.health_for(b).map(|h| h.target(b.address)))
        .collect();
    assert_eq!(
        targets,
        [Some(addr("198.19.0.11:80")), Some(addr("198.19.0.12:8053"))]
    );
    // The traffic still goes to the backends' own port.
    assert_eq!(b1.address, addr("198.19.0.11:5353"));
    // As a [service.health] table and a dotted key too.
    for health in [
        "[service.health]\ncheck = \"tcp\"\nport = 80\n",
        "health.check = \"tcp\"\nhealth.port = 80\n",
    ] {
        let text = format!(
            "{DP}[[service]]\nname = \"b\"\nvip = \"198.18.0.11:53\"\nbackends = [{B1}]\n{health}"
        );
        let config = parse_ok(&text);
        assert_eq!(
            config.services[0].health.as_ref().and_then(|h| h.port),
            Some(80),
            "{text}"
        );
    }
    // Through a live change, the port is kept.
    let again = check(&config, Path::new("lb backend")).map_err(|e| e.to_string());
    assert_eq!(again.as_ref().ok(), Some(&config), "{again:?}");
}

#[test]
fn on_backend_down_defaults_to_keep_flows() {
    let config = parse_ok(&one_service("", B1));
    assert_eq!(config.services[0].on_backend_down, OnBackendDown::KeepFlows);
    for (value, expected) in [
        ("keep-flows", OnBackendDown::KeepFlows),
        ("drop-flows", OnBackendDown::DropFlows),
    ] {
        let config = parse_ok(&one_service(
            &format!("health = {{ check = \"tcp\" }}\non-backend-down = \"{value}\""),
            B1,
        ));
        assert_eq!(config.services[0].on_backend_down, expected);
    }
}

#[test]
fn dsr_is_overridable_per_service() {
    let overridden = dsr_inherited().replace(
        "vip = \"198.18.0.10:80\"\n",
        "vip = \"198.18.0.10:80\"\nforwarding = \"nat\"\n",
    );
    assert_eq!(
        parse_ok(&overridden).services[0].forwarding,
        Forwarding::Nat
    );
}

#[test]
fn weights_above_1_need_weighted_round_robin_and_0_drains_under_any() {
    let config = parse_ok(&one_service(
        "scheduler = \"weighted-round-robin\"",
        WEIGHT_2,
    ));
    assert_eq!(config.services[0].backends[1].weight, 2);
    // weight 0 (drained) is fine under any scheduler.
    let drained = WEIGHT_2.replace("weight = 2", "weight = 0");
    assert_eq!(
        parse_ok(&one_service("", &drained)).services[0].backends[1].weight,
        0
    );
}

#[test]
fn firewall_rules_parse_and_survive_a_live_check() {
    let text = with_firewall(
        "deny = [\"203.0.113.0/24\", \"192.0.2.1\"]\nallow = [\"0.0.0.0/0\"]\n\
         rate-limit = { new-flows-per-second = 1000, burst = 2000, per = \"/24\" }",
        "allow-from = [\"198.18.0.0/24\"]\ndeny-from = [\"198.18.0.99/32\"]\n\
         rate-limit = { new-flows-per-second = 50 }",
    );
    let cfg = parse_ok(&text);
    let p = |t: &str| Prefix::parse(t).expect("prefix");
    assert_eq!(
        cfg.firewall,
        Firewall {
            deny: vec![p("203.0.113.0/24"), p("192.0.2.1/32")],
            allow: vec![p("0.0.0.0/0")],
            rate_limit: Some(RateLimit {
                per6: 128,
                new_flows_per_second: 1000,
                burst: 2000,
                per: 24
            }),
            deny6: Vec::new(),
            allow6: Vec::new(),
        }
    );
    assert_eq!(
        cfg.services[0].firewall,
        Firewall {
            deny: vec![p("198.18.0.99/32")],
            allow: vec![p("198.18.0.0/24")],
            // burst defaults to one second's worth, per to the address.
            rate_limit: Some(RateLimit {
                per6: 128,
                new_flows_per_second: 50,
                burst: 50,
                per: 32
            }),
            deny6: Vec::new(),
            allow6: Vec::new(),
        }
    );
    assert!(p("203.0.113.0/24").contains("203.0.113.200".parse().expect("ip")));
    assert!(!p("203.0.113.0/24").contains("203.0.114.1".parse().expect("ip")));
    assert_eq!(check(&cfg, Path::new("lb firewall")).expect("valid"), cfg);
    // No [firewall]: no rules anywhere.
    assert!(parse_ok(&one_service("", B1)).firewall.is_empty());
}

#[test]
fn ipv6_prefixes_and_a_per_64_limit_are_accepted_beside_ipv4_ones() {
    let text = with_firewall(
        "deny = [\"203.0.113.0/24\", \"2001:db8:bad::/48\", \"2001:db8::1\"]\n\
         rate-limit = { new-flows-per-second = 100, per = \"/64\" }",
        "allow-from = [\"2001:db8:1::/64\"]\ndeny-from = [\"2001:db8:1::66/128\"]\n\
         rate-limit = { new-flows-per-second = 5, per = \"/56\" }",
    );
    let cfg = parse_ok(&text);
    let p6 = |t: &str| Prefix6::parse(t).expect("prefix");
    assert_eq!(
        cfg.firewall.deny,
        [Prefix::parse("203.0.113.0/24").expect("prefix")]
    );
    assert_eq!(
        cfg.firewall.deny6,
        [p6("2001:db8:bad::/48"), p6("2001:db8::1/128")]
    );
    assert!(cfg.firewall.allow.is_empty() && cfg.firewall.allow6.is_empty());
    let limit = cfg.firewall.rate_limit.expect("limit");
    assert_eq!(
        (limit.per, limit.per6),
        (32, 64),
        "IPv4 per address, IPv6 per /64"
    );
    assert_eq!(limit.per_text(), "/64");
    let www = &cfg.services[0].firewall;
    assert_eq!(www.allow6, [p6("2001:db8:1::/64")]);
    assert_eq!(www.deny6, [p6("2001:db8:1::66/128")]);
    assert_eq!(www.rate_limit.map(|r| (r.per, r.per6)), Some((32, 56)));
    assert!(p6("2001:db8:1::/64").contains("2001:db8:1::ffff".parse().expect("ip")));
    assert!(!p6("2001:db8:1::/64").contains("2001:db8:2::1".parse().expect("ip")));
    // A live check (lb firewall, the runtime state) re-reads it unchanged.
    assert_eq!(check(&cfg, Path::new("lb firewall")).expect("valid"), cfg);
    // `/24` still means IPv4's /24, IPv6 sources per address.
    let v4 = parse_ok(&with_firewall(
        "rate-limit = { new-flows-per-second = 1, per = \"/24\" }",
        "",
    ));
    assert_eq!(
        v4.firewall.rate_limit.map(|r| (r.per, r.per6)),
        Some((24, 128))
    );
}

#[test]
fn a_rate_limit_per_all_is_one_bucket_for_every_source_and_survives_a_live_check() {
    let text = with_firewall(
        "rate-limit = { new-flows-per-second = 20000, per = \"all\" }",
        "rate-limit = { new-flows-per-second = 50, per = \"/24\" }",
    );
    let cfg = parse_ok(&text);
    let limit = cfg.firewall.rate_limit.expect("global limit");
    assert_eq!(
        (limit.new_flows_per_second, limit.burst, limit.per),
        (20000, 20000, 0)
    );
    assert_eq!(limit.per_text(), "all");
    assert_eq!(check(&cfg, Path::new("lb firewall")).expect("valid"), cfg);
}

#[test]
fn announce_has_a_default_med_and_survives_a_live_change() {
    assert_eq!(parse_ok(&one_service("", B1)).announce, None);
    let on = parse_ok(&with_announce(
        "bird-socket = \"/run/bird/bird.ctl\"\ninclude = \"/etc/bird/lb-vips.conf\"",
    ));
    assert_eq!(
        on.announce,
        Some(Announce {
            bird_socket: "/run/bird/bird.ctl".into(),
            include: "/etc/bird/lb-vips.conf".into(),
            med: 0,
        })
    );
    assert_eq!(
        check(&on, Path::new("live")).expect("valid").announce,
        on.announce
    );
    let backup = parse_ok(&with_announce(
        "bird-socket = \"/run/bird/bird.ctl\"\ninclude = \"/etc/bird/lb-vips.conf\"\nmed = 100",
    ));
    assert_eq!(backup.announce.map(|a| a.med), Some(100));
}

#[test]
fn coordination_has_a_default_ttl_and_survives_a_live_change() {
    assert_eq!(parse_ok(&one_service("", B1)).coordination, None);
    let on = parse_ok(&with_coordination(
        "etcd = [\"http://198.18.0.1:2379\", \"http://198.18.0.2:2379/\"]\nname = \"lb-1.a\"",
    ));
    assert_eq!(
        on.coordination,
        Some(crate::config::Coordination {
            etcd: vec![
                "http://198.18.0.1:2379".into(),
                "http://198.18.0.2:2379/".into()
            ],
            name: "lb-1.a".into(),
            lease_ttl: std::time::Duration::from_secs(5),
            tls: None,
            login: None,
        })
    );
    assert_eq!(
        check(&on, Path::new("live")).expect("valid").coordination,
        on.coordination
    );
    let short = parse_ok(&with_coordination(
        "etcd = [\"http://198.18.0.1:2379\"]\nname = \"lb2\"\nlease-ttl = \"2s\"",
    ));
    assert_eq!(
        short.coordination.map(|c| c.lease_ttl),
        Some(std::time::Duration::from_secs(2))
    );
}

#[test]
fn every_scheduler_parses_by_its_name_and_survives_check() {
    for (name, scheduler) in [
        ("round-robin", Scheduler::RoundRobin),
        ("weighted-round-robin", Scheduler::WeightedRoundRobin),
        ("maglev", Scheduler::Maglev),
        ("source-ip", Scheduler::SourceIp),
        ("least-connections", Scheduler::LeastConnections),
        ("flow-hash", Scheduler::FlowHash),
    ] {
        let cfg = parse_ok(&one_service(&format!("scheduler = \"{name}\""), B1));
        assert_eq!(cfg.services[0].scheduler, scheduler);
        assert_eq!(scheduler.name(), name);
        assert_eq!(
            cfg.services[0].maglev_table_size,
            lb_common::maglev::MAGLEV_DEFAULT_SIZE
        );
        let again = check(&cfg, Path::new("live")).expect("check");
        assert_eq!(again, cfg, "{name}");
    }
}

#[test]
fn maglev_table_size_and_weights_with_the_hash_and_load_schedulers() {
    let cfg = parse_ok(&one_service(
        "scheduler = \"source-ip\"\nmaglev-table-size = 251",
        WEIGHT_2,
    ));
    assert_eq!(cfg.services[0].maglev_table_size, 251);
    assert_eq!(cfg.services[0].backends[1].weight, 2);
    assert_eq!(check(&cfg, Path::new("live")).expect("check"), cfg);
    for s in ["maglev", "least-connections", "weighted-round-robin"] {
        let cfg = parse_ok(&one_service(&format!("scheduler = \"{s}\""), WEIGHT_2));
        assert_eq!(cfg.services[0].backends[1].weight, 2, "{s}");
    }
    // 16 Maglev services fit (the data plane's MAGLEV map holds 32 tables).
    let mut text = String::from(DP);
    for i in 0..lb_common::MAX_MAGLEV_SERVICES {
        text.push_str(&format!(
            "\n[[service]]\nname = \"s{i}\"\nvip = \"198.18.1.{i}:80\"\nscheduler = \"maglev\"\nbackends = [{B1}]\n"
        ));
    }
    assert_eq!(parse_ok(&text).services.len(), 16);
}

/// config/host-example.toml, the guide's starting point for a real host
/// (docs/deployment.md): valid, and showing what the guide says it shows —
/// both NAT and DSR, backups, health checks, a loopback-only listener.
#[test]
fn host_example_toml_parses() {
    let config = parse_ok(include_str!("../../../../config/host-example.toml"));
    assert_eq!(config.dataplane.interfaces, ["eth0", "eth1"]);
    assert_eq!(config.dataplane.xdp_mode, XdpMode::Native);
    assert_eq!(
        config.monitoring,
        Some(Monitoring {
            listen: "127.0.0.1:9100".parse().unwrap()
        })
    );
    let modes: Vec<(&str, Forwarding)> = config
        .services
        .iter()
        .map(|s| (s.name.as_str(), s.forwarding))
        .collect();
    assert_eq!(
        modes,
        [("www", Forwarding::Nat), ("www-tls", Forwarding::Dsr)]
    );
    for s in &config.services {
        assert!(s.health.is_some(), "{}: every service is checked", s.name);
    }
    assert!(config.services[0].backends.iter().any(|b| b.backup));
}

#[test]
fn a_dns_check_takes_its_defaults_and_canonical_forms() {
    let text = format!(
        "{DP}[[service]]\nname = \"dns\"\nvip = \"198.18.0.10:53\"\nprotocol = \"udp\"\n\
         health = {{ check = \"dns\", query-name = \"WWW.foobar.com\" }}\n\
         backends = [{{ address = \"198.19.0.11:53\" }}, \
         {{ address = \"198.19.0.12:53\", health = {{ check = \"dns\", query-name = \"foobar.com.\", \
         query-type = \"txt\", transport = \"tcp\", expect-rcode = \"refused\" }} }}]\n"
    );
    let config = parse_ok(&text);
    let service = &config.services[0];
    let checks: Vec<&CheckKind> = service
        .backends
        .iter()
        .filter_map(|b| service.health_for(b).map(|h| &h.check))
        .collect();
    assert_eq!(
        checks,
        [
            &CheckKind::Dns(DnsCheck {
                name: "WWW.foobar.com.".into(),
                record_type: "A".into(),
                transport: DnsTransport::Udp,
                expect_rcode: DnsRcode::NoError,
                expect_answer: None,
            }),
            &CheckKind::Dns(DnsCheck {
                name: "foobar.com.".into(),
                record_type: "TXT".into(),
                transport: DnsTransport::Tcp,
                expect_rcode: DnsRcode::Refused,
                expect_answer: None,
            }),
        ]
    );
    assert_eq!(check(&config, Path::new("live")).expect("check"), config);
}

#[test]
fn tunnel_services_take_the_tunnel_settings_and_survive_a_live_check() {
    let text = format!(
        "{DP}tunnel-source = \"198.19.0.1\"\ngue-port = 7000\n\
         [[service]]\nname = \"ipip\"\nvip = \"198.18.0.10:80\"\nforwarding = \"ipip\"\n\
         scheduler = \"maglev\"\nbackends = [{{ address = \"10.2.0.11:80\" }}]\n\
         [[service]]\nname = \"gue\"\nvip = \"198.18.0.10:53\"\nprotocol = \"udp\"\n\
         forwarding = \"gue\"\nbackends = [{{ address = \"10.2.0.11:53\" }}]\n"
    );
    let config = parse_ok(&text);
    assert_eq!(
        config.dataplane.tunnel_source,
        Some(std::net::Ipv4Addr::new(198, 19, 0, 1))
    );
    assert_eq!(config.dataplane.gue_port, 7000);
    let modes: Vec<Forwarding> = config.services.iter().map(|s| s.forwarding).collect();
    assert_eq!(modes, [Forwarding::Ipip, Forwarding::Gue]);
    assert!(modes.iter().all(|m| m.is_tunnel() && m.answers_directly()));
    assert!(!Forwarding::Dsr.is_tunnel() && Forwarding::Dsr.answers_directly());
    assert!(!Forwarding::Nat.answers_directly());
    assert_eq!(check(&config, Path::new("live")).expect("valid"), config);
    // IPv6 services tunnel too (IP6IP6, GUE over IPv6), from
    // `tunnel-source6`.
    let v6 = parse_ok(
        &text
            .replace(
                "tunnel-source = \"198.19.0.1\"",
                "tunnel-source6 = \"2001:db8:19::1\"",
            )
            .replace("198.18.0.10:", "[2001:db8:18::10]:")
            .replace("10.2.0.11:", "[2001:db8:2::11]:"),
    );
    assert_eq!(
        v6.dataplane.tunnel_source6,
        Some("2001:db8:19::1".parse().expect("v6"))
    );
    assert_eq!(v6.dataplane.tunnel_source, None);
    let modes6: Vec<Forwarding> = v6.services.iter().map(|s| s.forwarding).collect();
    assert_eq!(modes6, [Forwarding::Ipip, Forwarding::Gue]);
    assert_eq!(check(&v6, Path::new("live")).expect("valid"), v6);
    // Without the keys: the route's source per backend, and GUE on 6080.
    let defaults = parse_ok(&one_service("forwarding = \"gue\"", B1));
    assert_eq!(defaults.dataplane.tunnel_source, None);
    assert_eq!(defaults.dataplane.gue_port, 6080);
    assert_eq!(
        check(&defaults, Path::new("live")).expect("valid"),
        defaults
    );
    // Both are written live with the backends: no restart.
    assert!(!config.dataplane.needs_restart_from(&defaults.dataplane));
}

#[test]
fn ipv6_nat_and_dsr_services_are_accepted() {
    for (forwarding, port) in [("nat", 8080), ("dsr", 80)] {
        let text = one_service(
            &format!("forwarding = \"{forwarding}\""),
            &format!(
                "{{ address = \"[2001:db8:19::11]:{port}\" }}, {{ address = \"[2001:db8:19::12]:{port}\" }}"
            ),
        )
        .replace("\"198.18.0.10:80\"", "\"[2001:db8:18::10]:80\"");
        let cfg = parse_ok(&text);
        let www = &cfg.services[0];
        assert_eq!(
            www.vip,
            "[2001:db8:18::10]:80"
                .parse::<std::net::SocketAddr>()
                .expect("vip"),
            "{forwarding}"
        );
        assert_eq!(www.backends.len(), 2, "{forwarding}");
    }
}

#[test]
fn ipv6_firewall_rules_rate_limits_and_source_ip_prefix_are_accepted() {
    let text = one_service(
        "scheduler = \"source-ip\"\nsource-ip-prefix = 64\n\
         deny-from = [\"2001:db8:66::/48\", \"203.0.113.0/24\"]\n\
         allow-from = [\"2001:db8:1::/64\"]\n\
         rate-limit = { new-flows-per-second = 10, burst = 20, per = \"/64\" }",
        r#"{ address = "[2001:db8:19::11]:80" }"#,
    )
    .replace("\"198.18.0.10:80\"", "\"[2001:db8:18::10]:80\"")
    .replace(
        "[[service]]",
        "[firewall]\ndeny = [\"2001:db8:bad::/48\"]\n\
         rate-limit = { new-flows-per-second = 100, per = \"/56\" }\n[[service]]",
    );
    let cfg = parse_ok(&text);
    let www = &cfg.services[0];
    assert_eq!(www.source_ip_prefix, 64);
    assert_eq!(
        www.firewall.deny_texts(),
        ["203.0.113.0/24", "2001:db8:66::/48"]
    );
    assert_eq!(www.firewall.allow_texts(), ["2001:db8:1::/64"]);
    let limit = www.firewall.rate_limit.expect("rate limit");
    assert_eq!((limit.per, limit.per6, limit.burst), (32, 64, 20));
    assert_eq!(cfg.firewall.deny_texts(), ["2001:db8:bad::/48"]);
    assert_eq!(cfg.firewall.rate_limit.map(|r| r.per6), Some(56));
    // Written back and read again (a live change's check), unchanged.
    let again = crate::config::check(&cfg, std::path::Path::new("again")).expect("again");
    assert_eq!(again.services[0].source_ip_prefix, 64);
    assert_eq!(again.services[0].firewall, www.firewall);
    // Unset: the whole address.
    let plain = parse_ok(
        &one_service(
            "scheduler = \"source-ip\"",
            r#"{ address = "[2001:db8:19::11]:80" }"#,
        )
        .replace("\"198.18.0.10:80\"", "\"[2001:db8:18::10]:80\""),
    );
    assert_eq!(plain.services[0].source_ip_prefix, 128);
}
