//! `forwarding = "full-nat"` and `[dataplane] source-addresses` /
//! `source-ports`: accepted with their defaults, and every rejection keyed.

use std::net::Ipv4Addr;

use super::*;

#[test]
fn a_full_nat_service_takes_the_source_settings_and_survives_a_live_check() {
    let text = format!(
        "{DP}source-addresses = [\"198.19.0.1\", \"198.19.0.2\"]\nsource-ports = \"20000-20999\"\n\
         source-port-quarantine = \"90s\"\n\
         [[service]]\nname = \"www\"\nvip = \"198.18.0.10:80\"\nforwarding = \"full-nat\"\n\
         backends = [{{ address = \"10.2.0.11:8080\" }}]\n"
    );
    let config = parse_ok(&text);
    let sources = &config.dataplane.full_nat;
    assert_eq!(
        sources.addresses,
        [Ipv4Addr::new(198, 19, 0, 1), Ipv4Addr::new(198, 19, 0, 2)]
    );
    assert_eq!((sources.port_lo, sources.port_hi), (20000, 20999));
    assert_eq!(sources.quarantine, std::time::Duration::from_secs(90));
    assert_eq!(config.services[0].forwarding, Forwarding::FullNat);
    assert!(
        !Forwarding::FullNat.answers_directly(),
        "replies come back through the LB, so the backend port may differ"
    );
    assert_eq!(Forwarding::FullNat.code(), lb_common::MODE_FULL_NAT);
    assert_eq!(check(&config, Path::new("live")).expect("valid"), config);
}

#[test]
fn without_source_settings_the_routes_sources_and_the_default_range() {
    let config = parse_ok(&one_service("forwarding = \"full-nat\"", B1));
    assert!(config.dataplane.full_nat.addresses.is_empty());
    assert_eq!(
        (
            config.dataplane.full_nat.port_lo,
            config.dataplane.full_nat.port_hi
        ),
        (1024, 32767)
    );
    // Freed ports wait out the backends' TIME_WAIT by default; "0s": not.
    assert_eq!(
        config.dataplane.full_nat.quarantine,
        std::time::Duration::from_secs(60)
    );
    let none = parse_ok(&with_dataplane_line("source-port-quarantine = \"0s\""));
    assert!(none.dataplane.full_nat.quarantine.is_zero());
    assert_eq!(check(&none, Path::new("live")).expect("valid"), none);
    // Source settings are written live: no restart.
    let mut changed = config.dataplane.clone();
    changed.full_nat.port_lo = 2000;
    assert!(!changed.needs_restart_from(&config.dataplane));
}

#[test]
fn bad_source_settings_are_rejected_by_key() {
    let addresses = "dataplane.source-addresses";
    let ports = "dataplane.source-ports";
    let cases = [
        (
            "source-addresses = [\"lb-back\"]",
            addresses,
            "expected IPv4 addresses",
        ),
        (
            "source-addresses = [\"2001:db8::1\"]",
            addresses,
            "expected IPv4 addresses",
        ),
        ("source-addresses = [\"0.0.0.0\"]", addresses, "unspecified"),
        ("source-addresses = [\"127.0.0.1\"]", addresses, "loopback"),
        (
            "source-addresses = [\"198.19.0.1\", \"198.19.0.1\"]",
            addresses,
            "listed twice",
        ),
        ("source-ports = \"1024\"", ports, "expected a port range"),
        ("source-ports = \"a-b\"", ports, "expected a port range"),
        ("source-ports = \"0-100\"", ports, "from 1 to 65535"),
        ("source-ports = \"2000-1000\"", ports, "low to high"),
        ("source-ports = \"1-70000\"", ports, "expected a port range"),
        (
            "source-port-quarantine = \"2h\"",
            "dataplane.source-port-quarantine",
            "expected a duration",
        ),
        (
            "source-port-quarantine = \"7200s\"",
            "dataplane.source-port-quarantine",
            "must be at most 3600s",
        ),
    ];
    for (line, key, fragment) in cases {
        assert_rejected(&with_dataplane_line(line), key, fragment);
    }
    let many: Vec<String> = (1..=17).map(|i| format!("\"198.19.0.{i}\"")).collect();
    assert_rejected(
        &with_dataplane_line(&format!("source-addresses = [{}]", many.join(", "))),
        addresses,
        "at most 16",
    );
}
