//! `proxy-protocol = "v2"`: accepted with NAT and full NAT on TCP (IPv6:
//! NAT66), kept by a live check, rejected (file, key, reason) with DSR, the
//! tunnels and UDP.

use super::*;

#[test]
fn nat_and_full_nat_tcp_services_take_proxy_protocol_v2() {
    for mode in ["nat", "full-nat"] {
        let cfg = parse_ok(&one_service(
            &format!("forwarding = \"{mode}\"\nproxy-protocol = \"v2\""),
            B1,
        ));
        assert_eq!(
            cfg.services[0].proxy_protocol,
            Some(ProxyProtocol::V2),
            "{mode}"
        );
        // A live change (check() round-trips through the raw shape) keeps it.
        let again = check(&cfg, Path::new("live")).expect("valid");
        assert_eq!(
            again.services[0].proxy_protocol,
            Some(ProxyProtocol::V2),
            "{mode}"
        );
    }
    // Without the key: none, and a live check keeps none.
    let plain = parse_ok(&one_service("", B1));
    assert_eq!(plain.services[0].proxy_protocol, None);
    assert_eq!(
        check(&plain, Path::new("live")).expect("valid").services[0].proxy_protocol,
        None
    );
}

/// An IPv6 NAT (NAT66) TCP service takes PROXY v2 (issue 24: it was
/// refused while the data plane rewrote IPv4 frames only); an IPv6 DSR one
/// is still refused, by the rule every mode whose replies bypass the LB
/// gets.
#[test]
fn vip_ipv6_proxy_built_for_nat66() {
    let v6 = |extra: &str| {
        one_service(
            &format!("{extra}proxy-protocol = \"v2\""),
            r#"{ address = "[2001:db8::11]:80" }"#,
        )
        .replace("\"198.18.0.10:80\"", "\"[2001:db8::10]:80\"")
    };
    let cfg = parse_ok(&v6("forwarding = \"nat\"\n"));
    assert!(cfg.services[0].vip.is_ipv6());
    assert_eq!(cfg.services[0].proxy_protocol, Some(ProxyProtocol::V2));
    let again = check(&cfg, Path::new("live")).expect("valid");
    assert_eq!(again.services[0].proxy_protocol, Some(ProxyProtocol::V2));
    assert_rejected(
        &v6("forwarding = \"dsr\"\n"),
        "service[0].proxy-protocol",
        "with forwarding = \"dsr\" the backend answers the client directly",
    );
}

#[test]
fn proxy_protocol_is_refused_where_the_replies_bypass_the_lb() {
    for mode in ["dsr", "ipip", "gue"] {
        let text = one_service(
            &format!("forwarding = \"{mode}\"\nproxy-protocol = \"v2\""),
            r#"{ address = "198.19.0.11:80" }"#,
        )
        .replace(DP, &format!("{DP}tunnel-source = \"198.19.0.1\"\n"));
        assert_rejected(
            &text,
            "service[0].proxy-protocol",
            &format!("with forwarding = \"{mode}\" the backend answers the client directly"),
        );
    }
    // The [dataplane] default counts as the service's mode.
    let text = one_service("proxy-protocol = \"v2\"", B1)
        .replace(DP, &format!("{DP}forwarding = \"dsr\"\n"));
    assert_rejected(
        &text,
        "service[0].proxy-protocol",
        "needs forwarding = \"nat\"",
    );
}

#[test]
fn proxy_protocol_is_refused_for_udp_and_unknown_versions() {
    assert_rejected(
        &one_service("protocol = \"udp\"\nproxy-protocol = \"v2\"", B1),
        "service[0].proxy-protocol",
        "is for TCP services",
    );
    let (key, reason) = parse_err(&one_service("proxy-protocol = \"v1\"", B1));
    assert!(key.contains("proxy-protocol"), "{key}: {reason}");
    assert!(reason.contains("v2"), "{reason}");
}
