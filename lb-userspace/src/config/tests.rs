//! Tests of the config: accepted configs, and every rejection with its key
//! path and reason.

use std::net::SocketAddrV4;

use lb_common::{MAX_BACKENDS, MAX_RING, MAX_SERVICES};

use super::*;

const FILE: &str = "test.toml";
const DP: &str = "[dataplane]\ninterfaces = [\"lb-front\", \"lb-back\"]\n";
const B1: &str = r#"{ address = "198.19.0.11:80" }"#;

#[track_caller]
fn parse_ok(text: &str) -> Config {
    match parse(text, Path::new(FILE)) {
        Ok(config) => config,
        Err(e) => panic!("expected a valid config, got: {e}\n{text}"),
    }
}

#[track_caller]
fn parse_err(text: &str) -> (String, String) {
    match parse(text, Path::new(FILE)) {
        Err(ConfigError::Invalid { file, key, reason }) => {
            assert_eq!(file, Path::new(FILE));
            (key, reason)
        }
        other => panic!("expected ConfigError::Invalid, got {other:?}\n{text}"),
    }
}

#[track_caller]
fn assert_rejected(text: &str, key: &str, fragment: &str) {
    let (got_key, reason) = parse_err(text);
    assert_eq!(got_key, key, "wrong key (reason: {reason:?}) for:\n{text}");
    assert!(
        reason.contains(fragment),
        "reason {reason:?} lacks {fragment:?} for:\n{text}"
    );
}

/// The dataplane plus one service "www" on 198.18.0.10:80 with `extra`
/// lines and the given backend entries.
fn one_service(extra: &str, backends: &str) -> String {
    format!(
        "{DP}\n[[service]]\nname = \"www\"\nvip = \"198.18.0.10:80\"\n{extra}\nbackends = [\n{backends}\n]\n"
    )
}

/// `one_service("", B1)` with `line` added to [dataplane].
fn with_dataplane_line(line: &str) -> String {
    one_service("", B1).replace(DP, &format!("{DP}{line}\n"))
}

fn with_health(health: &str) -> String {
    one_service(&format!("health = {{ {health} }}"), B1)
}

fn addr(s: &str) -> SocketAddrV4 {
    match s.parse() {
        Ok(a) => a,
        Err(e) => panic!("{s}: {e}"),
    }
}

/// `n` distinct backend entries on 10.1.x.y:80.
fn many_backends(n: usize, extra: &str) -> String {
    (0..n)
        .map(|i| {
            format!(
                "{{ address = \"10.1.{}.{}:80\"{extra} }},\n",
                i / 256,
                i % 256
            )
        })
        .collect()
}

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
scheduler = "source-hash"
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
    };
    let expected = Config {
        dataplane: Dataplane {
            interfaces: vec!["eth0".to_owned()],
            forwarding: Forwarding::Dsr,
            xdp_mode: XdpMode::Generic,
            conntrack_size: 1024,
        },
        services: vec![
            Service {
                name: "defaults".to_owned(),
                vip: addr("10.0.0.1:443"),
                protocol: Protocol::Tcp,
                // Inherited from [dataplane].
                forwarding: Forwarding::Dsr,
                scheduler: Scheduler::RoundRobin,
                health: None,
                on_backend_down: OnBackendDown::KeepFlows,
                backends: vec![Backend {
                    name: "10.0.1.1:443".to_owned(),
                    address: addr("10.0.1.1:443"),
                    weight: 1,
                    backup: false,
                    health: None,
                }],
            },
            Service {
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
                }),
                on_backend_down: OnBackendDown::KeepFlows,
                backends: vec![
                    Backend {
                        name: "a".to_owned(),
                        address: addr("10.0.1.1:5353"),
                        weight: 3,
                        backup: false,
                        health: None,
                    },
                    Backend {
                        name: "b.2_x-y".to_owned(),
                        address: addr("10.0.1.2:5353"),
                        weight: 0,
                        backup: true,
                        health: None,
                    },
                ],
            },
            Service {
                name: "checks".to_owned(),
                vip: addr("10.0.0.2:80"),
                protocol: Protocol::Tcp,
                forwarding: Forwarding::Dsr,
                scheduler: Scheduler::SourceHash,
                health: Some(tcp_defaults),
                on_backend_down: OnBackendDown::KeepFlows,
                backends: vec![Backend {
                    name: "10.0.1.3:80".to_owned(),
                    address: addr("10.0.1.3:80"),
                    weight: 1,
                    backup: false,
                    health: None,
                }],
            },
            Service {
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
                }),
                on_backend_down: OnBackendDown::KeepFlows,
                backends: vec![Backend {
                    name: "10.0.1.3:80".to_owned(),
                    address: addr("10.0.1.3:80"),
                    weight: 1,
                    backup: false,
                    health: None,
                }],
            },
        ],
    };
    assert_eq!(parse_ok(text), expected);
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
        }
    );
    assert_eq!(config.services[0].forwarding, Forwarding::Nat);
}

#[test]
fn check_accepts_a_parsed_config_unchanged() {
    // The last one has an unnamed backend (named after its address).
    for text in [
        include_str!("../../../config/foobar.toml"),
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
    let cfg = parse_ok(include_str!("../../../config/foobar.toml"));
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
    let config = parse_ok(include_str!("../../../config/foobar.toml"));
    assert_eq!(config.dataplane.interfaces, ["lb-front", "lb-back"]);
    assert_eq!(config.dataplane.forwarding, Forwarding::Nat);
    assert_eq!(config.dataplane.xdp_mode, XdpMode::Native);
    assert_eq!(config.services.len(), 2);

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
        })
    );
    let backends: Vec<(&str, SocketAddrV4, u32, bool)> = www
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
    let backends: Vec<(&str, SocketAddrV4)> = udp
        .backends
        .iter()
        .map(|b| (b.name.as_str(), b.address))
        .collect();
    assert_eq!(
        backends,
        [
            ("web1", addr("198.19.0.11:5353")),
            ("web2", addr("198.19.0.12:5353")),
            ("web3", addr("198.19.0.13:5353"))
        ]
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

// --- file and dataplane -------------------------------------------------

#[test]
fn empty_file_is_rejected() {
    assert_rejected("", "dataplane", "missing [dataplane]");
    assert_rejected("# only a comment\n", "dataplane", "missing [dataplane]");
}

#[test]
fn missing_dataplane_is_rejected() {
    let text = one_service("", B1).replace(DP, "");
    assert_rejected(&text, "dataplane", "missing [dataplane]");
}

#[test]
fn interfaces_are_validated() {
    let service = one_service("", B1).replace(DP, "");
    let with = |dp: &str| format!("[dataplane]\n{dp}\n{service}");
    assert_rejected(
        &with("forwarding = \"nat\""),
        "dataplane.interfaces",
        "required key is missing",
    );
    assert_rejected(
        &with("interfaces = []"),
        "dataplane.interfaces",
        "at least one interface",
    );
    assert_rejected(
        &with("interfaces = [\"eth0\", \"abcdefghijklmnop\"]"),
        "dataplane.interfaces[1]",
        "1 to 15 bytes",
    );
    assert_rejected(
        &with("interfaces = [\"\"]"),
        "dataplane.interfaces[0]",
        "1 to 15 bytes",
    );
    assert_rejected(
        &with("interfaces = [\"lb/front\"]"),
        "dataplane.interfaces[0]",
        "cannot contain '/'",
    );
    assert_rejected(
        &with("interfaces = [\"lb front\"]"),
        "dataplane.interfaces[0]",
        "whitespace",
    );
    assert_rejected(
        &with("interfaces = [\"..\"]"),
        "dataplane.interfaces[0]",
        "not a valid interface name",
    );
    assert_rejected(
        &with("interfaces = [\"a\", \"b\", \"a\"]"),
        "dataplane.interfaces[2]",
        "duplicate of dataplane.interfaces[0] (\"a\")",
    );
    assert_rejected(
        &with("interfaces = [\"a\", 5]"),
        "dataplane.interfaces[1]",
        "invalid type: integer `5`",
    );
    assert_rejected(
        &with("interfaces = \"eth0\""),
        "dataplane.interfaces",
        "invalid type: string \"eth0\"",
    );
}

#[test]
fn conntrack_size_is_range_checked() {
    for (size, shown) in [("1023", "1023"), ("16_777_217", "16777217"), ("-1", "-1")] {
        let text = with_dataplane_line(&format!("conntrack-size = {size}"));
        assert_rejected(
            &text,
            "dataplane.conntrack-size",
            &format!("must be between 1024 and 16777216, got {shown}"),
        );
    }
}

// --- services -------------------------------------------------------------

#[test]
fn no_service_is_rejected() {
    assert_rejected(DP, "service", "at least one [[service]]");
    assert_rejected(
        &format!("service = []\n{DP}"),
        "service",
        "at least one [[service]]",
    );
}

#[test]
fn too_many_services_are_rejected() {
    let mut text = DP.to_owned();
    for i in 0..=MAX_SERVICES {
        text.push_str(&format!(
            "[[service]]\nname = \"s{i}\"\nvip = \"198.18.0.10:{}\"\nbackends = [{B1}]\n",
            i + 1
        ));
    }
    assert_rejected(
        &text,
        "service",
        "257 services, but the data plane holds at most 256",
    );
    // One fewer is fine.
    let cut = text.rfind("[[service]]").unwrap_or(0);
    assert_eq!(parse_ok(&text[..cut]).services.len(), 256);
}

#[test]
fn service_names_are_validated() {
    assert_rejected(
        &one_service("", B1).replace("name = \"www\"\n", ""),
        "service[0].name",
        "required key is missing",
    );
    assert_rejected(
        &one_service("", B1).replace("\"www\"", "\"w w\""),
        "service[0].name",
        "got \"w w\"",
    );
    assert_rejected(
        &one_service("", B1).replace("\"www\"", &format!("{:?}", "n".repeat(65))),
        "service[0].name",
        "1 to 64 characters",
    );
    let text = format!(
        "{}\n[[service]]\nname = \"www\"\nvip = \"198.18.0.11:80\"\nbackends = [{B1}]\n",
        one_service("", B1)
    );
    assert_rejected(&text, "service[1].name", "already used by service[0]");
}

#[test]
fn vips_are_validated() {
    let vip = |v: &str| one_service("", B1).replace("\"198.18.0.10:80\"", &format!("\"{v}\""));
    let (key, reason) = parse_err(&vip("web1"));
    assert_eq!(key, "service[0].vip");
    assert_eq!(
        reason,
        r#"expected IPv4 address and port like "198.18.0.10:80", got "web1""#
    );
    assert_rejected(
        &vip("198.18.0.10"),
        "service[0].vip",
        "expected IPv4 address and port",
    );
    assert_rejected(
        &vip("[::1]:80"),
        "service[0].vip",
        "expected IPv4 address and port",
    );
    assert_rejected(&vip("198.18.0.10:0"), "service[0].vip", "port 0");
    assert_rejected(&vip("0.0.0.0:80"), "service[0].vip", "unspecified");
    assert_rejected(&vip("255.255.255.255:80"), "service[0].vip", "broadcast");
    assert_rejected(&vip("224.0.0.1:80"), "service[0].vip", "multicast");
    assert_rejected(
        &one_service("", B1).replace("vip = \"198.18.0.10:80\"\n", ""),
        "service[0].vip",
        "required key is missing",
    );
}

#[test]
fn duplicate_vip_port_protocol_is_rejected() {
    let text = format!(
        "{}\n[[service]]\nname = \"again\"\nvip = \"198.18.0.10:80\"\nprotocol = \"tcp\"\nbackends = [{B1}]\n",
        one_service("", B1)
    );
    assert_rejected(
        &text,
        "service[1].vip",
        "198.18.0.10:80/tcp is already used by service[0] (\"www\")",
    );
}

// --- backends -------------------------------------------------------------

#[test]
fn backend_addresses_are_validated() {
    let (key, reason) = parse_err(&one_service(
        "",
        r#"{ address = "198.19.0.11:80" }, { address = "web1" }"#,
    ));
    assert_eq!(key, "service[0].backends[1].address");
    assert_eq!(
        reason,
        r#"expected IPv4 address and port like "198.19.0.11:80", got "web1""#
    );
    assert_rejected(
        &one_service("", r#"{ address = "198.19.0.11:0" }"#),
        "service[0].backends[0].address",
        "port 0",
    );
    assert_rejected(
        &one_service("", r#"{ address = "0.0.0.0:80" }"#),
        "service[0].backends[0].address",
        "unspecified",
    );
    assert_rejected(
        &one_service("", r#"{ name = "web1" }"#),
        "service[0].backends[0].address",
        "required key is missing",
    );
    assert_rejected(
        &one_service("", ""),
        "service[0].backends",
        "at least one backend",
    );
    assert_rejected(
        &one_service("", B1)
            .replace("backends = [\n", "xbackends = [\n")
            .replace("xbackends", "# no backends\nfoo"),
        "service[0].foo",
        "unknown field `foo`",
    );
    let text = format!("{DP}\n[[service]]\nname = \"www\"\nvip = \"198.18.0.10:80\"\n");
    assert_rejected(&text, "service[0].backends", "required key is missing");
}

#[test]
fn duplicate_backend_in_one_service_is_rejected() {
    let backends = r#"{ address = "198.19.0.11:80", name = "web1" }, { address = "198.19.0.12:80" }, { address = "198.19.0.11:80", name = "again" }"#;
    assert_rejected(
        &one_service("", backends),
        "service[0].backends[2].address",
        "198.19.0.11:80 is already backends[0] (\"web1\")",
    );
}

#[test]
fn backend_names_are_validated() {
    let backends = r#"{ address = "198.19.0.11:80", name = "web" }, { address = "198.19.0.12:80", name = "web" }"#;
    assert_rejected(
        &one_service("", backends),
        "service[0].backends[1].name",
        "already used by backends[0]",
    );
    assert_rejected(
        &one_service("", r#"{ address = "198.19.0.11:80", name = "web 1" }"#),
        "service[0].backends[0].name",
        "got \"web 1\"",
    );
}

#[test]
fn dsr_requires_backend_port_equal_to_vip_port() {
    let backends = r#"{ address = "198.19.0.11:80" }, { address = "198.19.0.12:8080" }"#;
    assert_rejected(
        &one_service("forwarding = \"dsr\"", backends),
        "service[0].backends[1].address",
        "must equal the VIP port 80, got 8080",
    );
    // Inherited from [dataplane] ...
    let inherited = one_service("", backends).replace(DP, &format!("{DP}forwarding = \"dsr\"\n"));
    assert_rejected(
        &inherited,
        "service[0].backends[1].address",
        "only MAC addresses are rewritten",
    );
    // ... and overridable per service.
    let overridden = inherited.replace(
        "vip = \"198.18.0.10:80\"\n",
        "vip = \"198.18.0.10:80\"\nforwarding = \"nat\"\n",
    );
    assert_eq!(
        parse_ok(&overridden).services[0].forwarding,
        Forwarding::Nat
    );
}

#[test]
fn weights_are_validated() {
    assert_rejected(
        &one_service(
            "scheduler = \"weighted-round-robin\"",
            r#"{ address = "198.19.0.11:80", weight = 1001 }"#,
        ),
        "service[0].backends[0].weight",
        "must be between 0 and 1000, got 1001",
    );
    assert_rejected(
        &one_service("", r#"{ address = "198.19.0.11:80", weight = -1 }"#),
        "service[0].backends[0].weight",
        "must be between 0 and 1000, got -1",
    );
}

#[test]
fn weight_needs_weighted_round_robin() {
    let backends = r#"{ address = "198.19.0.11:80" }, { address = "198.19.0.12:80", weight = 2 }"#;
    assert_rejected(
        &one_service("", backends),
        "service[0].backends[1].weight",
        "set scheduler = \"weighted-round-robin\"",
    );
    assert_rejected(
        &one_service("scheduler = \"source-hash\"", backends),
        "service[0].backends[1].weight",
        "no effect with scheduler = \"source-hash\"",
    );
    let config = parse_ok(&one_service(
        "scheduler = \"weighted-round-robin\"",
        backends,
    ));
    assert_eq!(config.services[0].backends[1].weight, 2);
    // weight 0 (drained) is fine under any scheduler.
    let drained = backends.replace("weight = 2", "weight = 0");
    assert_eq!(
        parse_ok(&one_service("", &drained)).services[0].backends[1].weight,
        0
    );
}

#[test]
fn round_robin_ring_length_is_limited() {
    assert_rejected(
        &one_service("", &many_backends(MAX_RING + 1, "")),
        "service[0].backends",
        "the non-backup backends need 4097 ring slots but a ring holds at most 4096",
    );
    assert_rejected(
        &one_service(
            "scheduler = \"source-hash\"",
            &many_backends(MAX_RING + 1, ", backup = true"),
        ),
        "service[0].backends",
        "the backup backends need 4097 ring slots",
    );
}

#[test]
fn weighted_ring_length_is_sum_over_gcd() {
    let weights = |ws: &[u32]| {
        ws.iter()
            .enumerate()
            .map(|(i, w)| format!("{{ address = \"198.19.0.{}:80\", weight = {w} }},", i + 1))
            .collect::<String>()
    };
    let wrr = "scheduler = \"weighted-round-robin\"";
    assert_rejected(
        &one_service(wrr, &weights(&[999, 1000, 1000, 1000, 1000])),
        "service[0].backends",
        "need 4999 ring slots (sum of weights / their gcd)",
    );
    // gcd 1000: 5 slots. gcd 500 (zero weights ignored): 9 slots.
    parse_ok(&one_service(wrr, &weights(&[1000, 1000, 1000, 1000, 1000])));
    parse_ok(&one_service(
        wrr,
        &weights(&[1000, 1000, 0, 1000, 1000, 500]),
    ));
}

#[test]
fn backends_across_services_are_limited() {
    // 4096 backends in service 0; service 1 lists one of them again,
    // which takes a slot of its own in the data plane (the 4097th).
    let text = format!(
        "{}\n[[service]]\nname = \"other\"\nvip = \"198.18.0.11:80\"\nbackends = [{{ address = \"10.1.0.0:80\" }}, {B1}]\n",
        one_service("", &many_backends(MAX_BACKENDS as usize, ""))
    );
    assert_rejected(
        &text,
        "service[1].backends[0].address",
        "more than 4096 backends across all services",
    );
}

// --- health -------------------------------------------------------------

#[test]
fn health_check_kind_is_required_and_validated() {
    assert_rejected(
        &with_health("rise = 2"),
        "service[0].health.check",
        "required key is missing",
    );
    assert_rejected(
        &with_health("check = \"icmp\""),
        "service[0].health.check",
        "unknown variant `icmp`",
    );
}

#[test]
fn http_keys_on_tcp_check_are_rejected() {
    for (key, value) in [
        ("path", "\"/\""),
        ("expect-status", "200"),
        ("expect-body", "\"ok\""),
    ] {
        assert_rejected(
            &with_health(&format!("check = \"tcp\", {key} = {value}")),
            &format!("service[0].health.{key}"),
            "only valid with check = \"http\"",
        );
    }
}

#[test]
fn http_check_values_are_validated() {
    assert_rejected(
        &with_health("check = \"http\", path = \"healthz\""),
        "service[0].health.path",
        "must start with '/'",
    );
    assert_rejected(
        &with_health("check = \"http\", path = \"/a b\""),
        "service[0].health.path",
        "no whitespace",
    );
    assert_rejected(
        &with_health("check = \"http\", expect-status = 600"),
        "service[0].health.expect-status",
        "must be between 100 and 599, got 600",
    );
    assert_rejected(
        &with_health("check = \"http\", expect-status = 99"),
        "service[0].health.expect-status",
        "got 99",
    );
}

#[test]
fn rise_and_fall_are_range_checked() {
    assert_rejected(
        &with_health("check = \"tcp\", rise = 0"),
        "service[0].health.rise",
        "between 1 and 100, got 0",
    );
    assert_rejected(
        &with_health("check = \"tcp\", fall = 101"),
        "service[0].health.fall",
        "between 1 and 100, got 101",
    );
}

#[test]
fn bad_durations_are_rejected() {
    for (field, value, fragment) in [
        (
            "interval",
            "1h",
            "expected a duration like \"300ms\" or \"2s\", got \"1h\"",
        ),
        ("interval", "0s", "greater than 0"),
        ("timeout", "0ms", "greater than 0"),
        ("timeout", "abc", "got \"abc\""),
        ("interval", "s", "got \"s\""),
        ("interval", "+5s", "got \"+5s\""),
        ("interval", "5 s", "got \"5 s\""),
        ("interval", "1.5s", "got \"1.5s\""),
        ("interval", "99999999999999999999s", "too large"),
    ] {
        assert_rejected(
            &with_health(&format!("check = \"tcp\", {field} = \"{value}\"")),
            &format!("service[0].health.{field}"),
            fragment,
        );
    }
    assert_rejected(
        &with_health("check = \"tcp\", interval = 2"),
        "service[0].health.interval",
        "invalid type: integer `2`",
    );
}

#[test]
fn timeout_must_not_exceed_interval() {
    assert_rejected(
        &with_health("check = \"tcp\", interval = \"1s\", timeout = \"1500ms\""),
        "service[0].health.timeout",
        "timeout 1500ms must not exceed interval 1s",
    );
    // Against the default interval (2s).
    assert_rejected(
        &with_health("check = \"tcp\", timeout = \"3s\""),
        "service[0].health.timeout",
        "interval 2s",
    );
    // Against the default timeout (1s).
    assert_rejected(
        &with_health("check = \"tcp\", interval = \"500ms\""),
        "service[0].health.timeout",
        "timeout 1s",
    );
}

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
fn backend_health_is_validated_with_its_key_path() {
    let with_backend_health = |health: &str| {
        one_service(
            "health = { check = \"tcp\" }",
            &format!(
                r#"{{ address = "198.19.0.11:80" }}, {{ address = "198.19.0.12:80", health = {{ {health} }} }}"#
            ),
        )
    };
    for (health, key, fragment) in [
        (
            "check = \"tcp\", interval = \"1h\"",
            "service[0].backends[1].health.interval",
            "got \"1h\"",
        ),
        (
            "check = \"tcp\", interval = \"1s\", timeout = \"2s\"",
            "service[0].backends[1].health.timeout",
            "timeout 2s must not exceed interval 1s",
        ),
        (
            "rise = 2",
            "service[0].backends[1].health.check",
            "required key is missing",
        ),
        (
            "check = \"tcp\", path = \"/\"",
            "service[0].backends[1].health.path",
            "only valid with check = \"http\"",
        ),
        (
            "check = \"http\", expect-status = 600",
            "service[0].backends[1].health.expect-status",
            "between 100 and 599",
        ),
        (
            "check = \"tcp\", fall = 0",
            "service[0].backends[1].health.fall",
            "between 1 and 100, got 0",
        ),
        (
            "check = \"ping\"",
            "service[0].backends[1].health.check",
            "unknown variant `ping`",
        ),
        (
            "check = \"tcp\", retries = 3",
            "service[0].backends[1].health.retries",
            "unknown field `retries`",
        ),
    ] {
        assert_rejected(&with_backend_health(health), key, fragment);
    }
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
    let targets: Vec<Option<SocketAddrV4>> = [b1, b2]
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
fn health_port_is_validated_with_its_key_path() {
    // On the second service, so the key names its index.
    let second = |health: &str| {
        format!(
            "{}\n[[service]]\nname = \"dns\"\nvip = \"198.18.0.10:5353\"\nprotocol = \"udp\"\n\
             health = {{ {health} }}\nbackends = [{{ address = \"198.19.0.11:5353\" }}]\n",
            one_service("", B1)
        )
    };
    for (value, fragment) in [
        ("0", "must be between 1 and 65535, got 0"),
        ("65536", "must be between 1 and 65535, got 65536"),
        ("-80", "must be between 1 and 65535, got -80"),
        ("\"80\"", "invalid type: string \"80\", expected i64"),
    ] {
        assert_rejected(
            &second(&format!("check = \"http\", port = {value}")),
            "service[1].health.port",
            fragment,
        );
    }
    // On a backend's own check.
    let text = one_service(
        "",
        r#"{ address = "198.19.0.11:80" }, { address = "198.19.0.12:80", health = { check = "tcp", port = 0 } }"#,
    );
    assert_rejected(
        &text,
        "service[0].backends[1].health.port",
        "must be between 1 and 65535, got 0",
    );
    // The message names the file, the key and the reason.
    let err = parse(&second("check = \"tcp\", port = 0"), Path::new(FILE))
        .expect_err("port 0 is rejected");
    assert_eq!(
        err.to_string(),
        "test.toml: service[1].health.port: must be between 1 and 65535, got 0"
    );
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
fn bad_on_backend_down_is_rejected() {
    assert_rejected(
        &one_service("on-backend-down = \"reset\"", B1),
        "service[0].on-backend-down",
        "unknown variant `reset`, expected `keep-flows` or `drop-flows`",
    );
    assert_rejected(
        &one_service("on-backend-down = true", B1),
        "service[0].on-backend-down",
        "wanted string or table",
    );
    // It is a service key, not a backend key.
    assert_rejected(
        &one_service(
            "",
            r#"{ address = "198.19.0.11:80", on-backend-down = "drop-flows" }"#,
        ),
        "service[0].backends[0].on-backend-down",
        "unknown field `on-backend-down`",
    );
}

// --- unknown keys, enums, syntax ---------------------------------------

#[test]
fn unknown_keys_are_rejected_with_their_path() {
    assert_rejected(
        &format!("colour = 1\n{}", one_service("", B1)),
        "colour",
        "unknown field `colour`",
    );
    assert_rejected(
        &with_dataplane_line("mtu = 1500"),
        "dataplane.mtu",
        "unknown field `mtu`",
    );
    assert_rejected(
        &one_service("port = 80", B1),
        "service[0].port",
        "unknown field `port`",
    );
    assert_rejected(
        &one_service(
            "",
            r#"{ address = "198.19.0.11:80" }, { address = "198.19.0.12:80", colour = "red" }"#,
        ),
        "service[0].backends[1].colour",
        "unknown field `colour`",
    );
    assert_rejected(
        &with_health("check = \"tcp\", retries = 3"),
        "service[0].health.retries",
        "unknown field `retries`",
    );
    // The same through [[service.backends]], [service.health] and dotted keys,
    // and in a later service.
    let text = format!(
        "{}\n[[service]]\nname = \"b\"\nvip = \"198.18.0.11:80\"\n[service.health]\ncheck = \"tcp\"\ncolour = 1\n",
        one_service("", B1)
    );
    assert_rejected(&text, "service[1].health.colour", "unknown field `colour`");
    let text = format!(
        "{DP}[[service]]\nname = \"b\"\nvip = \"198.18.0.11:80\"\nhealth.check = \"tcp\"\nhealth.colour = 1\n\
         [[service.backends]]\naddress = \"198.19.0.11:80\"\n"
    );
    assert_rejected(&text, "service[0].health.colour", "unknown field `colour`");
    let text = format!(
        "{DP}[[service]]\nname = \"b\"\nvip = \"198.18.0.11:80\"\n[[service.backends]]\naddress = \"198.19.0.11:80\"\n\
         [[service.backends]]\naddress = \"198.19.0.12:80\"\ncolour = 1\n"
    );
    assert_rejected(
        &text,
        "service[0].backends[1].colour",
        "unknown field `colour`",
    );
}

#[test]
fn bad_enum_values_are_rejected() {
    let dp = with_dataplane_line;
    assert_rejected(
        &dp("forwarding = \"tunnel\""),
        "dataplane.forwarding",
        "unknown variant `tunnel`, expected `nat` or `dsr`",
    );
    assert_rejected(
        &dp("xdp-mode = \"offload\""),
        "dataplane.xdp-mode",
        "unknown variant `offload`",
    );
    assert_rejected(
        &one_service("protocol = \"sctp\"", B1),
        "service[0].protocol",
        "unknown variant `sctp`",
    );
    assert_rejected(
        &one_service("forwarding = \"NAT\"", B1),
        "service[0].forwarding",
        "unknown variant `NAT`",
    );
    assert_rejected(
        &one_service("scheduler = \"maglev\"", B1),
        "service[0].scheduler",
        "unknown variant `maglev`",
    );
    assert_rejected(
        &one_service("", r#"{ address = "198.19.0.11:80", backup = "yes" }"#),
        "service[0].backends[0].backup",
        "invalid type: string \"yes\", expected a boolean",
    );
}

#[test]
fn wrong_shapes_are_rejected_with_a_key() {
    // A datetime is not a table even though serde sees it as a map.
    assert_rejected(
        &with_health("check = \"tcp\", interval = 1979-05-27"),
        "service[0].health.interval",
        "invalid type",
    );
    assert_rejected(
        &one_service("protocol = 1979-05-27", B1),
        "service[0].protocol",
        "wanted string or table",
    );
    // [service] instead of [[service]].
    let text = format!("{DP}[service]\nname = \"www\"\n");
    assert_rejected(&text, "service", "invalid type: map, expected a sequence");
}

#[test]
fn syntax_errors_name_line_and_column() {
    let (key, reason) = parse_err("[dataplane]\ninterfaces = [\"a\"\n");
    assert_eq!(key, "<toml>:3:1");
    assert!(!reason.is_empty() && reason == reason.trim(), "{reason:?}");
    let (key, _) = parse_err("[dataplane]\ninterfaces = [\"a\"]\ninterfaces = [\"b\"]\n");
    assert!(key.starts_with("<toml>:3:"), "{key}");
}

#[test]
fn errors_display_file_key_and_reason() {
    let err = parse(
        &one_service("", r#"{ address = "198.19.0.11:0" }"#),
        Path::new("conf/lb.toml"),
    )
    .err()
    .map(|e| e.to_string());
    assert_eq!(
        err.as_deref(),
        Some(
            "conf/lb.toml: service[0].backends[0].address: port 0 is not a usable port, got \"198.19.0.11:0\""
        )
    );
}

#[test]
fn load_reports_unreadable_files() {
    let path = Path::new("/nonexistent/lb.toml");
    match load(path) {
        Err(ConfigError::Read { file, .. }) => assert_eq!(file, path),
        other => panic!("expected ConfigError::Read, got {other:?}"),
    }
}
