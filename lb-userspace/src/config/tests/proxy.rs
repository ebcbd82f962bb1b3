//! `proxy-protocol = "v2"`: rejected (file, key, reason) with DSR, the
//! tunnels and UDP, and with NAT until the data plane inserts the header.

use super::*;

#[test]
fn a_nat_tcp_service_is_refused_proxy_protocol_v2_until_the_data_plane_inserts_it() {
    assert_rejected(
        &one_service("proxy-protocol = \"v2\"", B1),
        "service[0].proxy-protocol",
        "the data plane does not insert the header",
    );
    // Without the key: none, and a live check keeps none.
    let plain = parse_ok(&one_service("", B1));
    assert_eq!(plain.services[0].proxy_protocol, None);
    assert_eq!(
        check(&plain, Path::new("live")).expect("valid").services[0].proxy_protocol,
        None
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
