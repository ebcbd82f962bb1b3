//! `through-vip = true` (checks through the VIP, issue 26; over IPv6, issue
//! 24): where it is accepted, where it is refused and why, and its round
//! trip.

use super::*;

fn dsr(health: &str) -> String {
    one_service(&format!("forwarding = \"dsr\"\nhealth = {health}"), B1)
}

#[test]
fn a_dsr_service_checks_through_the_vip_over_tcp_http_or_udp() {
    for check in ["tcp", "http", "udp"] {
        let cfg = parse_ok(&dsr(&format!(
            "{{ check = \"{check}\", through-vip = true }}"
        )));
        let service = &cfg.services[0];
        let health = service.health_for(&service.backends[0]).expect("checked");
        assert!(health.through_vip, "{check}");
    }
    // Off unless asked for; a backend's own check may ask for it too.
    let cfg = parse_ok(&dsr("{ check = \"tcp\" }"));
    assert!(
        !cfg.services[0]
            .health
            .as_ref()
            .expect("checked")
            .through_vip
    );
    let cfg = parse_ok(&one_service(
        "forwarding = \"dsr\"",
        r#"{ address = "198.19.0.11:80", health = { check = "http", through-vip = true } }"#,
    ));
    let service = &cfg.services[0];
    assert!(
        service
            .health_for(&service.backends[0])
            .expect("checked")
            .through_vip
    );
}

/// An IPv6 DSR service, `health` on it.
fn dsr6(health: &str) -> String {
    one_service(
        &format!("forwarding = \"dsr\"\nhealth = {health}"),
        r#"{ address = "[2001:db8:19::11]:80" }"#,
    )
    .replace("198.18.0.10:80", "[2001:db8:18::10]:80")
}

#[test]
fn an_ipv6_dsr_service_checks_through_the_vip6_and_an_ipv6_nat_service_refuses_it() {
    for check in ["tcp", "http", "udp"] {
        let cfg = parse_ok(&dsr6(&format!(
            "{{ check = \"{check}\", through-vip = true }}"
        )));
        let service = &cfg.services[0];
        assert!(service.vip.is_ipv6());
        let health = service.health_for(&service.backends[0]).expect("checked");
        assert!(health.through_vip, "{check}");
    }
    assert_rejected(
        &dsr6("{ check = \"tcp\", through-vip = true }").replace("forwarding = \"dsr\"\n", ""),
        "service[0].health.through-vip",
        "only valid with forwarding = \"dsr\"",
    );
}

#[test]
fn through_vip_is_refused_where_it_cannot_mean_anything() {
    // NAT: its flows reach the backend's own address, which a plain check probes.
    assert_rejected(
        &one_service("health = { check = \"tcp\", through-vip = true }", B1),
        "service[0].health.through-vip",
        "only valid with forwarding = \"dsr\"",
    );
    assert_rejected(
        &one_service(
            "",
            r#"{ address = "198.19.0.11:80", health = { check = "tcp", through-vip = true } }"#,
        ),
        "service[0].backends[0].health.through-vip",
        "only valid with forwarding = \"dsr\"",
    );
    // Checks whose clients make their own connections.
    assert_rejected(
        &dsr("{ check = \"dns\", query-name = \"www.foobar.com\", through-vip = true }"),
        "service[0].health.through-vip",
        "only valid with check = \"tcp\", \"http\" or \"udp\"",
    );
    assert_rejected(
        &dsr("{ check = \"tls\", through-vip = true }"),
        "service[0].health.through-vip",
        "only valid with check = \"tcp\", \"http\" or \"udp\"",
    );
    // The VIP's port is the service's.
    assert_rejected(
        &dsr("{ check = \"tcp\", port = 8080, through-vip = true }"),
        "service[0].health.port",
        "probes the service's own port",
    );
}

#[test]
fn through_vip_survives_the_round_trip() {
    let cfg = parse_ok(&dsr("{ check = \"http\", through-vip = true }"));
    let again = check(&cfg, Path::new(FILE)).expect("its own shape validates");
    assert_eq!(again, cfg);
}
