//! Rejected configs: one table of {config text, key path, reason fragment}
//! with a test per row, then the rejections that assert more than that.

use lb_common::{MAX_BACKENDS, MAX_MAGLEV_SERVICES, MAX_SERVICES};

use super::*;

/// One test per row: `name: text => key, fragment;` asserts that `text` is
/// rejected on `key` with a reason that contains `fragment`.
macro_rules! rejections {
    ($($name:ident: $text:expr => $key:expr, $fragment:expr;)*) => {$(
        #[test]
        fn $name() {
            assert_rejected(&$text, $key, $fragment);
        }
    )*};
}

rejections! {
    // --- file and dataplane ---------------------------------------------------
    empty_file: "" => "dataplane", "missing [dataplane]";
    comment_only_file: "# only a comment\n" => "dataplane", "missing [dataplane]";
    missing_dataplane: one_service("", B1).replace(DP, "") => "dataplane", "missing [dataplane]";
    interfaces_missing: dataplane("forwarding = \"nat\"")
        => "dataplane.interfaces", "required key is missing";
    interfaces_empty: dataplane("interfaces = []")
        => "dataplane.interfaces", "at least one interface";
    interface_too_long: dataplane("interfaces = [\"eth0\", \"abcdefghijklmnop\"]")
        => "dataplane.interfaces[1]", "1 to 15 bytes";
    interface_empty: dataplane("interfaces = [\"\"]")
        => "dataplane.interfaces[0]", "1 to 15 bytes";
    interface_with_slash: dataplane("interfaces = [\"lb/front\"]")
        => "dataplane.interfaces[0]", "cannot contain '/'";
    interface_with_space: dataplane("interfaces = [\"lb front\"]")
        => "dataplane.interfaces[0]", "whitespace";
    interface_dot_dot: dataplane("interfaces = [\"..\"]")
        => "dataplane.interfaces[0]", "not a valid interface name";
    interface_twice: dataplane("interfaces = [\"a\", \"b\", \"a\"]")
        => "dataplane.interfaces[2]", "duplicate of dataplane.interfaces[0] (\"a\")";
    interface_not_a_string: dataplane("interfaces = [\"a\", 5]")
        => "dataplane.interfaces[1]", "invalid type: integer `5`";
    interfaces_not_a_list: dataplane("interfaces = \"eth0\"")
        => "dataplane.interfaces", "invalid type: string \"eth0\"";
    conntrack_too_small: with_dataplane_line("conntrack-size = 1023")
        => "dataplane.conntrack-size", "must be between 1024 and 16777216, got 1023";
    conntrack_too_large: with_dataplane_line("conntrack-size = 16_777_217")
        => "dataplane.conntrack-size", "must be between 1024 and 16777216, got 16777217";
    conntrack_negative: with_dataplane_line("conntrack-size = -1")
        => "dataplane.conntrack-size", "must be between 1024 and 16777216, got -1";

    // --- firewall -------------------------------------------------------------
    firewall_prefix_not_cidr: with_firewall("deny = [\"203.0.113\"]", "")
        => "firewall.deny[0]", "expected an IPv4 prefix like \"203.0.113.0/24\"";
    firewall_prefix_too_long: with_firewall("deny = [\"10.0.0.0/8\", \"203.0.113.0/33\"]", "")
        => "firewall.deny[1]", "prefix length must be between 0 and 32, got 33";
    firewall_prefix_host_bits: with_firewall("allow = [\"203.0.113.7/24\"]", "")
        => "firewall.allow[0]", "host bits set: did you mean \"203.0.113.0/24\"?";
    firewall_prefix_twice: with_firewall("deny = [\"10.0.0.0/8\", \"10.0.0.0/8\"]", "")
        => "firewall.deny[1]", "10.0.0.0/8 is already firewall.deny[0]";
    firewall_prefix_allowed_and_denied: with_firewall(
        "deny = [\"10.0.0.0/8\"]\nallow = [\"192.0.2.0/24\", \"10.0.0.0/8\"]", "")
        => "firewall.allow[1]", "is also firewall.deny[0]: deny wins";
    firewall_prefix_not_a_string: with_firewall("deny = [24]", "")
        => "firewall.deny[0]", "invalid type: integer `24`";
    firewall_unknown_key: with_firewall("denied = []", "")
        => "firewall.denied", "unknown field `denied`";
    firewall_rate_missing: with_firewall("rate-limit = { burst = 10 }", "")
        => "firewall.rate-limit.new-flows-per-second", "required key is missing";
    firewall_rate_zero: with_firewall("rate-limit = { new-flows-per-second = 0 }", "")
        => "firewall.rate-limit.new-flows-per-second", "must be between 1 and 10000000, got 0";
    firewall_burst_too_large: with_firewall(
        "rate-limit = { new-flows-per-second = 10, burst = 100_000_001 }", "")
        => "firewall.rate-limit.burst", "must be between 1 and 100000000";
    firewall_rate_per_bad: with_firewall(
        "rate-limit = { new-flows-per-second = 10, per = \"/4\" }", "")
        => "firewall.rate-limit.per", "expected \"address\", \"all\" (one bucket for every source) or a prefix length";
    service_allow_from_host_bits: one_service("allow-from = [\"198.18.0.2/24\"]", B1)
        => "service[0].allow-from[0]", "host bits set";
    service_deny_from_bad: one_service("deny-from = [\"300.1.2.3/32\"]", B1)
        => "service[0].deny-from[0]", "expected an IPv4 prefix";
    service_allow_and_deny_same: one_service(
        "allow-from = [\"198.18.0.0/24\"]\ndeny-from = [\"198.18.0.0/24\"]", B1)
        => "service[0].allow-from[0]", "is also service[0].deny-from[0]";
    firewall_ipv6_host_bits: with_firewall("deny = [\"2001:db8::1/64\"]", "")
        => "firewall.deny[0]", "\"2001:db8::1/64\" has host bits set: did you mean \"2001:db8::/64\"?";
    firewall_ipv6_bad: with_firewall("deny = [\"203.0.113.0/24\", \"2001:db8::g/64\"]", "")
        => "firewall.deny[1]", "expected an IPv6 prefix like \"2001:db8::/32\", got \"2001:db8::g/64\"";
    firewall_ipv6_too_long: with_firewall("allow = [\"2001:db8::/129\"]", "")
        => "firewall.allow[0]", "prefix length must be between 0 and 128, got 129";
    firewall_ipv6_twice: with_firewall("deny = [\"2001:db8::/32\", \"198.51.100.0/24\", \"2001:db8::/32\"]", "")
        => "firewall.deny[2]", "2001:db8::/32 is already firewall.deny[0]";
    service_ipv6_allow_and_deny_same: one_service(
        "allow-from = [\"198.18.0.0/24\", \"2001:db8:1::/64\"]\ndeny-from = [\"2001:db8:1::/64\"]", B1)
        => "service[0].allow-from[1]", "2001:db8:1::/64 is also service[0].deny-from[0]: deny wins";
    firewall_rate_per_129: with_firewall(
        "rate-limit = { new-flows-per-second = 10, per = \"/129\" }", "")
        => "firewall.rate-limit.per", "or from \"/33\" to \"/128\" (e.g. \"/64\"; IPv6 sources), got \"/129\"";
    service_rate_limit_per_bad: one_service(
        "rate-limit = { new-flows-per-second = 5, per = \"subnet\" }", B1)
        => "service[0].rate-limit.per", "got \"subnet\"";

    // --- monitoring -----------------------------------------------------------
    monitoring_listen_missing: with_monitoring("")
        => "monitoring.listen", "required key is missing";
    monitoring_listen_without_port: with_monitoring("listen = \"127.0.0.1\"")
        => "monitoring.listen", "expected an address and port like \"127.0.0.1:9100\"";
    monitoring_listen_host_name: with_monitoring("listen = \"localhost:9100\"")
        => "monitoring.listen", "got \"localhost:9100\"";
    monitoring_listen_port_0: with_monitoring("listen = \"127.0.0.1:0\"")
        => "monitoring.listen", "port 0";
    monitoring_listen_multicast: with_monitoring("listen = \"224.0.0.1:9100\"")
        => "monitoring.listen", "not a unicast address";
    monitoring_listen_not_a_string: with_monitoring("listen = 9100")
        => "monitoring.listen", "invalid type: integer `9100`";
    monitoring_unknown_key: with_monitoring("listen = \"127.0.0.1:9100\"\nport = 9100")
        => "monitoring.port", "unknown field `port`";
    // Issue 21: configs that validated but made no sense.
    monitoring_listen_on_a_vip: with_monitoring("listen = \"198.18.0.10:80\"")
        => "monitoring.listen", "198.18.0.10:80 is the VIP of service \"www\"";
    monitoring_listen_on_a_pool_vip: format!(
            "{}\n[[pool]]\nname = \"db\"\nwrite-vip = \"198.18.0.20:3306\"\n\
             read-vip = \"198.18.0.21:3306\"\n\
             health = {{ check = \"mysql\", user = \"lb\", password = \"pw\" }}\n\
             members = [ {{ name = \"db1\", address = \"198.19.1.21:3306\" }} ]\n",
            with_monitoring("listen = \"198.18.0.21:3306\"")
        )
        => "monitoring.listen", "is the VIP of service \"db-read\"";

    // --- announce -------------------------------------------------------------
    announce_socket_missing: with_announce("include = \"/etc/bird/lb.conf\"")
        => "announce.bird-socket", "required key is missing";
    announce_include_missing: with_announce("bird-socket = \"/run/bird/bird.ctl\"")
        => "announce.include", "required key is missing";
    announce_socket_relative: with_announce("bird-socket = \"bird.ctl\"\ninclude = \"/etc/bird/lb.conf\"")
        => "announce.bird-socket", "must be an absolute path";
    announce_include_relative: with_announce("bird-socket = \"/run/bird/bird.ctl\"\ninclude = \"lb.conf\"")
        => "announce.include", "must be an absolute path";
    announce_include_is_the_socket: with_announce("bird-socket = \"/run/b\"\ninclude = \"/run/b\"")
        => "announce.include", "is also announce.bird-socket";
    announce_include_with_quote: with_announce("bird-socket = \"/run/b\"\ninclude = '/etc/a\"b'")
        => "announce.include", "cannot contain '\"'";
    announce_med_negative: with_announce("bird-socket = \"/run/b\"\ninclude = \"/etc/i\"\nmed = -1")
        => "announce.med", "must be between 0 and 4294967295, got -1";
    announce_unknown_key: with_announce("bird-socket = \"/run/b\"\ninclude = \"/etc/i\"\nas = 64513")
        => "announce.as", "unknown field `as`";

    // --- coordination ---------------------------------------------------------
    coordination_etcd_missing: with_coordination("name = \"lb1\"")
        => "coordination.etcd", "required key is missing";
    coordination_etcd_empty: with_coordination("etcd = []\nname = \"lb1\"")
        => "coordination.etcd", "at least one etcd endpoint";
    coordination_etcd_https_without_ca: with_coordination("etcd = [\"https://198.18.0.1:2379\"]\nname = \"lb1\"")
        => "coordination.ca-file", "required with https:// endpoints";
    coordination_etcd_mixed_schemes: with_coordination("etcd = [\"https://198.18.0.1:2379\", \"http://198.18.0.2:2379\"]\nname = \"lb1\"\nca-file = \"/nonexistent/ca.pem\"")
        => "coordination.etcd[1]", "every endpoint with the scheme of the first";
    coordination_ca_file_unreadable: with_coordination("etcd = [\"https://198.18.0.1:2379\"]\nname = \"lb1\"\nca-file = \"/nonexistent/ca.pem\"")
        => "coordination.ca-file", "/nonexistent/ca.pem";
    coordination_ca_file_relative: with_coordination("etcd = [\"https://198.18.0.1:2379\"]\nname = \"lb1\"\nca-file = \"ca.pem\"")
        => "coordination.ca-file", "must be an absolute path";
    coordination_ca_file_with_http: with_coordination("etcd = [\"http://198.18.0.1:2379\"]\nname = \"lb1\"\nca-file = \"/etc/ca.pem\"")
        => "coordination.ca-file", "only with https:// etcd endpoints";
    coordination_cert_without_key: with_coordination("etcd = [\"https://198.18.0.1:2379\"]\nname = \"lb1\"\nca-file = \"/etc/ssl/certs/ca-certificates.crt\"\ncert-file = \"/etc/c.pem\"")
        => "coordination.key-file", "required with cert-file";
    coordination_user_without_password_file: with_coordination("etcd = [\"http://198.18.0.1:2379\"]\nname = \"lb1\"\nuser = \"lb\"")
        => "coordination.password-file", "required with user";
    coordination_password_file_without_user: with_coordination("etcd = [\"http://198.18.0.1:2379\"]\nname = \"lb1\"\npassword-file = \"/etc/pw\"")
        => "coordination.user", "without a user";
    coordination_password_file_missing: with_coordination("etcd = [\"http://198.18.0.1:2379\"]\nname = \"lb1\"\nuser = \"lb\"\npassword-file = \"/nonexistent/pw\"")
        => "coordination.password-file", "/nonexistent/pw: cannot read";
    coordination_etcd_hostname: with_coordination("etcd = [\"http://etcd1:2379\"]\nname = \"lb1\"")
        => "coordination.etcd[0]", "expected http://IP:port";
    coordination_etcd_twice: with_coordination("etcd = [\"http://198.18.0.1:2379\", \"http://198.18.0.1:2379\"]\nname = \"lb1\"")
        => "coordination.etcd[1]", "listed twice";
    coordination_name_missing: with_coordination("etcd = [\"http://198.18.0.1:2379\"]")
        => "coordination.name", "required key is missing";
    coordination_name_slash: with_coordination("etcd = [\"http://198.18.0.1:2379\"]\nname = \"lb/1\"")
        => "coordination.name", "letters, digits";
    coordination_ttl_fraction: with_coordination("etcd = [\"http://198.18.0.1:2379\"]\nname = \"lb1\"\nlease-ttl = \"2500ms\"")
        => "coordination.lease-ttl", "whole seconds from 2s to 60s";
    coordination_ttl_too_short: with_coordination("etcd = [\"http://198.18.0.1:2379\"]\nname = \"lb1\"\nlease-ttl = \"1s\"")
        => "coordination.lease-ttl", "whole seconds from 2s to 60s";
    coordination_unknown_key: with_coordination("etcd = [\"http://198.18.0.1:2379\"]\nname = \"lb1\"\ntls = true")
        => "coordination.tls", "unknown field `tls`";

    // --- services -------------------------------------------------------------
    no_service: DP => "service", "at least one [[service]]";
    empty_service_list: format!("service = []\n{DP}") => "service", "at least one [[service]]";
    service_name_missing: one_service("", B1).replace("name = \"www\"\n", "")
        => "service[0].name", "required key is missing";
    service_name_with_space: one_service("", B1).replace("\"www\"", "\"w w\"")
        => "service[0].name", "got \"w w\"";
    service_name_too_long: one_service("", B1).replace("\"www\"", &format!("{:?}", "n".repeat(65)))
        => "service[0].name", "1 to 64 characters";
    service_name_twice:
        and_service(&format!("name = \"www\"\nvip = \"198.18.0.11:80\"\nbackends = [{B1}]\n"))
        => "service[1].name", "already used by service[0]";
    vip_without_port: vip("198.18.0.10") => "service[0].vip", "expected an address and port";
    vip_ipv6_without_brackets: vip("2001:db8::10:80")
        => "service[0].vip", "IPv6 in brackets, like \"[2001:db8::10]:80\"";
    vip_ipv6_loopback: vip("[::1]:80") => "service[0].vip", "::1 is a loopback address";
    vip_ipv6_unspecified: vip("[::]:80") => "service[0].vip", "unspecified";
    vip_ipv6_multicast: vip("[ff02::1]:80") => "service[0].vip", "ff02::1 is a multicast address";
    vip_ipv6_port_0: vip("[2001:db8::10]:0") => "service[0].vip", "port 0";
    // A service's VIP and backends are of one family, whichever comes
    // first; a pure IPv6 service waits for the data plane's IPv6 path.
    backend_ipv6_of_an_ipv4_vip: one_service("", r#"{ address = "198.19.0.11:80" }, { address = "[2001:db8::11]:80" }"#)
        => "service[0].backends[1].address",
        "[2001:db8::11]:80 is an IPv6 address but the service's VIP 198.18.0.10:80 is IPv4: \
         a service's VIP and its backends must be of one family";
    backend_ipv4_of_an_ipv6_vip: one_service("", r#"{ address = "[2001:db8::11]:80" }, { address = "198.19.0.11:80" }"#)
        .replace("\"198.18.0.10:80\"", "\"[2001:db8::10]:80\"")
        => "service[0].backends[1].address",
        "198.19.0.11:80 is an IPv4 address but the service's VIP [2001:db8::10]:80 is IPv6";
    backend_of_an_ipv6_vip_checked_first: one_service("", r#"{ address = "[ff02::1]:80" }"#)
        .replace("\"198.18.0.10:80\"", "\"[2001:db8::10]:80\"")
        => "service[0].backends[0].address", "ff02::1 is a multicast address";
    // What the IPv6 data plane does not do yet, refused by the key that
    // asks for it (config/service.rs `data_plane_balances`).
    vip_ipv6_full_nat_not_built: one_service("forwarding = \"full-nat\"", r#"{ address = "[2001:db8::11]:80" }"#)
        .replace("\"198.18.0.10:80\"", "\"[2001:db8::10]:80\"")
        .replace(DP, &format!("{DP}source-addresses = [\"198.19.0.1\"]\n"))
        => "service[0].forwarding", "[2001:db8::10]:80 is an IPv6 VIP: the data plane balances IPv6 in \"nat\", \"dsr\", \"ipip\" and \"gue\" only so far";
    // PROXY v2 over IPv6 is built (NAT66): config/tests/proxy.rs
    // `vip_ipv6_proxy_built_for_nat66`.
    // The firewall over IPv6 (issue 24): its prefixes and rate limits are
    // checked like IPv4's, by key.
    vip_ipv6_deny_prefix_host_bits: one_service("deny-from = [\"2001:db8:66::1/48\"]", r#"{ address = "[2001:db8::11]:80" }"#)
        .replace("\"198.18.0.10:80\"", "\"[2001:db8::10]:80\"")
        => "service[0].deny-from[0]", "\"2001:db8:66::1/48\" has host bits set: did you mean \"2001:db8:66::/48\"?";
    vip_ipv6_rate_limit_per_bad: one_service("rate-limit = { new-flows-per-second = 10, per = \"64\" }", r#"{ address = "[2001:db8::11]:80" }"#)
        .replace("\"198.18.0.10:80\"", "\"[2001:db8::10]:80\"")
        => "service[0].rate-limit.per", "from \"/33\" to \"/128\" (e.g. \"/64\"; IPv6 sources), got \"64\"";
    source_ip_prefix_without_source_ip: one_service("source-ip-prefix = 64", r#"{ address = "[2001:db8::11]:80" }"#)
        .replace("\"198.18.0.10:80\"", "\"[2001:db8::10]:80\"")
        => "service[0].source-ip-prefix", "has no effect with scheduler = \"round-robin\"";
    source_ip_prefix_ipv4: one_service("scheduler = \"source-ip\"\nsource-ip-prefix = 24", B1)
        => "service[0].source-ip-prefix", "198.18.0.10:80 is an IPv4 VIP";
    source_ip_prefix_too_long: one_service("scheduler = \"source-ip\"\nsource-ip-prefix = 129", r#"{ address = "[2001:db8::11]:80" }"#)
        .replace("\"198.18.0.10:80\"", "\"[2001:db8::10]:80\"")
        => "service[0].source-ip-prefix", "must be between 1 and 128, got 129";
    source_ip_prefix_zero: one_service("scheduler = \"source-ip\"\nsource-ip-prefix = 0", r#"{ address = "[2001:db8::11]:80" }"#)
        .replace("\"198.18.0.10:80\"", "\"[2001:db8::10]:80\"")
        => "service[0].source-ip-prefix", "must be between 1 and 128, got 0";
    // An IPv6 service goes through every rule of a service before the
    // data plane's gate (config/service.rs `data_plane_balances`).
    ipv6_backend_twice_before_the_gate: one_service("", r#"{ address = "[2001:db8::11]:80" }, { address = "[2001:db8::11]:80" }"#)
        .replace("\"198.18.0.10:80\"", "\"[2001:db8::10]:80\"")
        => "service[0].backends[1].address", "[2001:db8::11]:80 is already backends[0]";
    ipv6_backend_is_the_vip_before_the_gate: one_service("", r#"{ address = "[2001:db8::10]:80" }"#)
        .replace("\"198.18.0.10:80\"", "\"[2001:db8::10]:80\"")
        => "service[0].backends[0].address", "is the service's own VIP";
    ipv6_dsr_port_before_the_gate: one_service("forwarding = \"dsr\"", r#"{ address = "[2001:db8::11]:8080" }"#)
        .replace("\"198.18.0.10:80\"", "\"[2001:db8::10]:80\"")
        => "service[0].backends[0].address", "the backend port must equal the VIP port 80, got 8080";
    ipv6_weight_before_the_gate: one_service("", r#"{ address = "[2001:db8::11]:80", weight = 3 }"#)
        .replace("\"198.18.0.10:80\"", "\"[2001:db8::10]:80\"")
        => "service[0].backends[0].weight", "has no effect with scheduler = \"round-robin\"";
    vip_port_0: vip("198.18.0.10:0") => "service[0].vip", "port 0";
    vip_unspecified: vip("0.0.0.0:80") => "service[0].vip", "unspecified";
    vip_broadcast: vip("255.255.255.255:80") => "service[0].vip", "broadcast";
    vip_multicast: vip("224.0.0.1:80") => "service[0].vip", "multicast";
    vip_loopback: vip("127.0.0.1:80") => "service[0].vip", "127.0.0.1 is a loopback address";
    vip_loopback_anywhere_in_8: vip("127.200.0.1:80")
        => "service[0].vip", "loopback address (127.0.0.0/8)";
    vip_missing: one_service("", B1).replace("vip = \"198.18.0.10:80\"\n", "")
        => "service[0].vip", "required key is missing";
    vip_port_protocol_twice: and_service(&format!(
            "name = \"again\"\nvip = \"198.18.0.10:80\"\nprotocol = \"tcp\"\nbackends = [{B1}]\n"
        ))
        => "service[1].vip", "198.18.0.10:80/tcp is already used by service[0] (\"www\")";

    // --- backends -------------------------------------------------------------
    backend_port_0: one_service("", r#"{ address = "198.19.0.11:0" }"#)
        => "service[0].backends[0].address", "port 0";
    backend_unspecified: one_service("", r#"{ address = "0.0.0.0:80" }"#)
        => "service[0].backends[0].address", "unspecified";
    backend_is_its_own_vip: one_service("", &format!("{B1}, {{ address = \"198.18.0.10:80\" }}"))
        => "service[0].backends[1].address", "198.18.0.10:80 is the service's own VIP";
    backend_address_missing: one_service("", r#"{ name = "web1" }"#)
        => "service[0].backends[0].address", "required key is missing";
    backends_empty: one_service("", "") => "service[0].backends", "at least one backend";
    backends_key_misspelt: one_service("", B1)
            .replace("backends = [\n", "xbackends = [\n")
            .replace("xbackends", "# no backends\nfoo")
        => "service[0].foo", "unknown field `foo`";
    backends_missing: format!("{DP}\n[[service]]\nname = \"www\"\nvip = \"198.18.0.10:80\"\n")
        => "service[0].backends", "required key is missing";
    backend_address_twice: one_service(
            "",
            r#"{ address = "198.19.0.11:80", name = "web1" }, { address = "198.19.0.12:80" }, { address = "198.19.0.11:80", name = "again" }"#,
        )
        => "service[0].backends[2].address", "198.19.0.11:80 is already backends[0] (\"web1\")";
    backend_name_twice: one_service(
            "",
            r#"{ address = "198.19.0.11:80", name = "web" }, { address = "198.19.0.12:80", name = "web" }"#,
        )
        => "service[0].backends[1].name", "already used by backends[0]";
    backend_name_with_space: one_service("", r#"{ address = "198.19.0.11:80", name = "web 1" }"#)
        => "service[0].backends[0].name", "got \"web 1\"";
    weight_too_large: one_service(
            "scheduler = \"weighted-round-robin\"",
            r#"{ address = "198.19.0.11:80", weight = 1001 }"#,
        )
        => "service[0].backends[0].weight", "must be between 0 and 1000, got 1001";
    weight_negative: one_service("", r#"{ address = "198.19.0.11:80", weight = -1 }"#)
        => "service[0].backends[0].weight", "must be between 0 and 1000, got -1";
    weight_without_wrr: one_service("", WEIGHT_2)
        => "service[0].backends[1].weight", "set scheduler = \"weighted-round-robin\"";
    weight_with_flow_hash: one_service("scheduler = \"flow-hash\"", WEIGHT_2)
        => "service[0].backends[1].weight", "no effect with scheduler = \"flow-hash\"";
    source_hash_is_renamed: one_service("scheduler = \"source-hash\"", B1)
        => "service[0].scheduler",
           "Use \"flow-hash\" for that same behaviour, or \"source-ip\" for client affinity";
    maglev_table_size_not_prime: one_service("scheduler = \"maglev\"\nmaglev-table-size = 65536", B1)
        => "service[0].maglev-table-size", "must be a prime number";
    maglev_table_size_too_large: one_service("scheduler = \"source-ip\"\nmaglev-table-size = 65539", B1)
        => "service[0].maglev-table-size", "must be between 2 and 65537, got 65539";
    maglev_table_size_without_maglev: one_service("scheduler = \"round-robin\"\nmaglev-table-size = 251", B1)
        => "service[0].maglev-table-size", "has no effect with scheduler = \"round-robin\"";
    maglev_table_smaller_than_backends: one_service(
            "scheduler = \"maglev\"\nmaglev-table-size = 3",
            &many_backends(5, ""),
        )
        => "service[0].maglev-table-size", "3 slots cannot hold 5 backends";
    maglev_too_many_services: maglev_services(MAX_MAGLEV_SERVICES as usize + 1)
        => "service[16].scheduler", "more than 16 services use \"maglev\" or \"source-ip\"";
    dsr_backend_port: one_service("forwarding = \"dsr\"", DSR_BACKENDS)
        => "service[0].backends[1].address", "must equal the VIP port 80, got 8080";
    dsr_inherited_backend_port: dsr_inherited()
        => "service[0].backends[1].address", "only MAC addresses are rewritten";
    // --- tunnels: the DSR port rule, the source and the GUE port -------------
    ipip_backend_port: one_service("forwarding = \"ipip\"", DSR_BACKENDS)
        => "service[0].backends[1].address",
           "with forwarding = \"ipip\" the packet reaches the backend unchanged inside the tunnel, \
            so the backend port must equal the VIP port 80, got 8080";
    gue_inherited_backend_port: one_service("", DSR_BACKENDS)
            .replace(DP, &format!("{DP}forwarding = \"gue\"\n"))
        => "service[0].backends[1].address", "with forwarding = \"gue\" the packet reaches";
    tunnel_source_not_an_address: with_dataplane_line("tunnel-source = \"lb-back\"")
        => "dataplane.tunnel-source", "expected an IPv4 address like \"198.19.0.1\", got \"lb-back\"";
    tunnel_source_with_a_port: with_dataplane_line("tunnel-source = \"198.19.0.1:80\"")
        => "dataplane.tunnel-source", "expected an IPv4 address";
    tunnel_source_ipv6: with_dataplane_line("tunnel-source = \"2001:db8::1\"")
        => "dataplane.tunnel-source", "expected an IPv4 address";
    tunnel_source_unspecified: with_dataplane_line("tunnel-source = \"0.0.0.0\"")
        => "dataplane.tunnel-source", "0.0.0.0 is the unspecified address";
    tunnel_source_multicast: with_dataplane_line("tunnel-source = \"224.0.0.1\"")
        => "dataplane.tunnel-source", "224.0.0.1 is a multicast address";
    tunnel_source_loopback: with_dataplane_line("tunnel-source = \"127.0.0.1\"")
        => "dataplane.tunnel-source", "127.0.0.1 is a loopback address";
    tunnel_source_not_a_string: with_dataplane_line("tunnel-source = 3")
        => "dataplane.tunnel-source", "invalid type: integer `3`, expected a string";
    tunnel_source6_not_an_address: with_dataplane_line("tunnel-source6 = \"lb-back\"")
        => "dataplane.tunnel-source6", "expected an IPv6 address like \"2001:db8:19::1\", got \"lb-back\"";
    tunnel_source6_ipv4: with_dataplane_line("tunnel-source6 = \"198.19.0.1\"")
        => "dataplane.tunnel-source6", "expected an IPv6 address";
    tunnel_source6_unspecified: with_dataplane_line("tunnel-source6 = \"::\"")
        => "dataplane.tunnel-source6", ":: is the unspecified address";
    tunnel_source6_multicast: with_dataplane_line("tunnel-source6 = \"ff02::1\"")
        => "dataplane.tunnel-source6", "ff02::1 is a multicast address";
    tunnel_source6_loopback: with_dataplane_line("tunnel-source6 = \"::1\"")
        => "dataplane.tunnel-source6", "::1 is the loopback address";
    tunnel_source6_link_local: with_dataplane_line("tunnel-source6 = \"fe80::1\"")
        => "dataplane.tunnel-source6", "fe80::1 is a link-local address (fe80::/10)";
    gue_port_zero: with_dataplane_line("gue-port = 0")
        => "dataplane.gue-port", "must be between 1 and 65535, got 0";
    gue_port_too_big: with_dataplane_line("gue-port = 65536")
        => "dataplane.gue-port", "must be between 1 and 65535, got 65536";
    gue_port_not_a_number: with_dataplane_line("gue-port = \"6080\"")
        => "dataplane.gue-port", "invalid type: string \"6080\", expected i64";
    round_robin_ring_too_long: one_service("", &many_backends(MAX_RING + 1, ""))
        => "service[0].backends",
           "the non-backup backends need 4097 ring slots but a ring holds at most 4096";
    backup_ring_too_long: one_service(
            "scheduler = \"flow-hash\"",
            &many_backends(MAX_RING + 1, ", backup = true"),
        )
        => "service[0].backends", "the backup backends need 4097 ring slots";
    weighted_ring_too_long:
        weighted("scheduler = \"weighted-round-robin\"", &[999, 1000, 1000, 1000, 1000])
        => "service[0].backends", "need 4999 ring slots (sum of weights / their gcd)";
    // 4096 backends in service 0; service 1 lists one of them again, which
    // takes a slot of its own in the data plane (the 4097th).
    backends_across_services: format!(
            "{}\n[[service]]\nname = \"other\"\nvip = \"198.18.0.11:80\"\nbackends = [{{ address = \"10.1.0.0:80\" }}, {B1}]\n",
            one_service("", &many_backends(MAX_BACKENDS as usize, ""))
        )
        => "service[1].backends[0].address", "more than 4096 backends across all services";

    // --- health ---------------------------------------------------------------
    check_missing: with_health("rise = 2") => "service[0].health.check", "required key is missing";
    check_unknown: with_health("check = \"icmp\"")
        => "service[0].health.check", "unknown variant `icmp`";
    path_on_tcp_check: with_health("check = \"tcp\", path = \"/\"")
        => "service[0].health.path", "only valid with check = \"http\"";
    expect_status_on_tcp_check: with_health("check = \"tcp\", expect-status = 200")
        => "service[0].health.expect-status", "only valid with check = \"http\"";
    expect_body_on_tcp_check: with_health("check = \"tcp\", expect-body = \"ok\"")
        => "service[0].health.expect-body", "only valid with check = \"http\"";
    path_without_slash: with_health("check = \"http\", path = \"healthz\"")
        => "service[0].health.path", "must start with '/'";
    path_with_space: with_health("check = \"http\", path = \"/a b\"")
        => "service[0].health.path", "no whitespace";
    expect_status_too_large: with_health("check = \"http\", expect-status = 600")
        => "service[0].health.expect-status", "must be between 100 and 599, got 600";
    expect_status_too_small: with_health("check = \"http\", expect-status = 99")
        => "service[0].health.expect-status", "got 99";
    dns_without_query_name: with_health("check = \"dns\"")
        => "service[0].health.query-name", "required key is missing";
    dns_bad_query_name: with_health("check = \"dns\", query-name = \"a..b\"")
        => "service[0].health.query-name", "not a DNS name";
    dns_unknown_query_type: with_health("check = \"dns\", query-name = \"a.b\", query-type = \"IXFR\"")
        => "service[0].health.query-type", "not a record type to query";
    dns_unknown_transport: with_health("check = \"dns\", query-name = \"a.b\", transport = \"doh\"")
        => "service[0].health.transport", "must be \"udp\" (with TCP when truncated) or \"tcp\"";
    dns_unknown_rcode: with_health("check = \"dns\", query-name = \"a.b\", expect-rcode = \"FAIL\"")
        => "service[0].health.expect-rcode", "must be one of NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED";
    dns_answer_not_an_address: with_health("check = \"dns\", query-name = \"a.b\", expect-answer = \"web1\"")
        => "service[0].health.expect-answer", "not A record data";
    query_name_on_tcp_check: with_health("check = \"tcp\", query-name = \"a.b\"")
        => "service[0].health.query-name", "only valid with check = \"dns\"";
    rise_0: with_health("check = \"tcp\", rise = 0")
        => "service[0].health.rise", "between 1 and 100, got 0";
    fall_101: with_health("check = \"tcp\", fall = 101")
        => "service[0].health.fall", "between 1 and 100, got 101";
    interval_in_hours: with_health("check = \"tcp\", interval = \"1h\"")
        => "service[0].health.interval",
           "expected a duration like \"300ms\" or \"2s\", got \"1h\"";
    interval_0s: with_health("check = \"tcp\", interval = \"0s\"")
        => "service[0].health.interval", "greater than 0";
    timeout_0ms: with_health("check = \"tcp\", timeout = \"0ms\"")
        => "service[0].health.timeout", "greater than 0";
    timeout_not_a_duration: with_health("check = \"tcp\", timeout = \"abc\"")
        => "service[0].health.timeout", "got \"abc\"";
    interval_without_number: with_health("check = \"tcp\", interval = \"s\"")
        => "service[0].health.interval", "got \"s\"";
    interval_with_plus: with_health("check = \"tcp\", interval = \"+5s\"")
        => "service[0].health.interval", "got \"+5s\"";
    interval_with_space: with_health("check = \"tcp\", interval = \"5 s\"")
        => "service[0].health.interval", "got \"5 s\"";
    interval_fractional: with_health("check = \"tcp\", interval = \"1.5s\"")
        => "service[0].health.interval", "got \"1.5s\"";
    interval_too_large: with_health("check = \"tcp\", interval = \"99999999999999999999s\"")
        => "service[0].health.interval", "longer than any key takes (at most 604800s, a week)";
    // Issue 21: this one validated, then panicked `lb run`.
    interval_u64_max_seconds: with_health("check = \"tcp\", interval = \"18446744073709551615s\"")
        => "service[0].health.interval", "longer than any key takes";
    interval_past_an_hour: with_health("check = \"tcp\", interval = \"3601s\"")
        => "service[0].health.interval", "must be at most 3600s";
    backend_interval_past_an_hour: with_backend_health("check = \"tcp\", interval = \"3600001ms\"")
        => "service[0].backends[1].health.interval", "must be at most 3600s";
    flow_timeout_u64_max: with_dataplane_line("timeouts = { udp = \"18446744073709551615ms\" }")
        => "dataplane.timeouts.udp", "longer than any key takes";
    interval_integer: with_health("check = \"tcp\", interval = 2")
        => "service[0].health.interval", "invalid type: integer `2`";
    timeout_over_interval: with_health("check = \"tcp\", interval = \"1s\", timeout = \"1500ms\"")
        => "service[0].health.timeout", "timeout 1500ms must not exceed interval 1s";
    timeout_over_default_interval: with_health("check = \"tcp\", timeout = \"3s\"")
        => "service[0].health.timeout", "interval 2s";
    default_timeout_over_interval: with_health("check = \"tcp\", interval = \"500ms\"")
        => "service[0].health.timeout", "timeout 1s";
    backend_interval_in_hours: with_backend_health("check = \"tcp\", interval = \"1h\"")
        => "service[0].backends[1].health.interval", "got \"1h\"";
    backend_timeout_over_interval:
        with_backend_health("check = \"tcp\", interval = \"1s\", timeout = \"2s\"")
        => "service[0].backends[1].health.timeout", "timeout 2s must not exceed interval 1s";
    backend_check_missing: with_backend_health("rise = 2")
        => "service[0].backends[1].health.check", "required key is missing";
    backend_path_on_tcp_check: with_backend_health("check = \"tcp\", path = \"/\"")
        => "service[0].backends[1].health.path", "only valid with check = \"http\"";
    backend_expect_status_too_large: with_backend_health("check = \"http\", expect-status = 600")
        => "service[0].backends[1].health.expect-status", "between 100 and 599";
    backend_fall_0: with_backend_health("check = \"tcp\", fall = 0")
        => "service[0].backends[1].health.fall", "between 1 and 100, got 0";
    backend_check_unknown: with_backend_health("check = \"ping\"")
        => "service[0].backends[1].health.check", "unknown variant `ping`";
    backend_health_unknown_key: with_backend_health("check = \"tcp\", retries = 3")
        => "service[0].backends[1].health.retries", "unknown field `retries`";
    health_port_0: second_with_health("check = \"http\", port = 0")
        => "service[1].health.port", "must be between 1 and 65535, got 0";
    health_port_65536: second_with_health("check = \"http\", port = 65536")
        => "service[1].health.port", "must be between 1 and 65535, got 65536";
    health_port_negative: second_with_health("check = \"http\", port = -80")
        => "service[1].health.port", "must be between 1 and 65535, got -80";
    health_port_string: second_with_health("check = \"http\", port = \"80\"")
        => "service[1].health.port", "invalid type: string \"80\", expected i64";
    backend_health_port_0: one_service(
            "",
            r#"{ address = "198.19.0.11:80" }, { address = "198.19.0.12:80", health = { check = "tcp", port = 0 } }"#,
        )
        => "service[0].backends[1].health.port", "must be between 1 and 65535, got 0";
    on_backend_down_unknown: one_service("on-backend-down = \"reset\"", B1)
        => "service[0].on-backend-down",
           "unknown variant `reset`, expected `keep-flows` or `drop-flows`";
    on_backend_down_bool: one_service("on-backend-down = true", B1)
        => "service[0].on-backend-down", "wanted string or table";
    // It is a service key, not a backend key.
    on_backend_down_on_a_backend: one_service(
            "",
            r#"{ address = "198.19.0.11:80", on-backend-down = "drop-flows" }"#,
        )
        => "service[0].backends[0].on-backend-down", "unknown field `on-backend-down`";

    // --- unknown keys, enums, shapes ------------------------------------------
    unknown_top_level_key: format!("colour = 1\n{}", one_service("", B1))
        => "colour", "unknown field `colour`";
    unknown_dataplane_key: with_dataplane_line("mtu = 1500")
        => "dataplane.mtu", "unknown field `mtu`";
    unknown_service_key: one_service("port = 80", B1)
        => "service[0].port", "unknown field `port`";
    unknown_backend_key: one_service(
            "",
            r#"{ address = "198.19.0.11:80" }, { address = "198.19.0.12:80", colour = "red" }"#,
        )
        => "service[0].backends[1].colour", "unknown field `colour`";
    unknown_health_key: with_health("check = \"tcp\", retries = 3")
        => "service[0].health.retries", "unknown field `retries`";
    // The same through [[service.backends]], [service.health] and dotted
    // keys, and in a later service.
    unknown_key_in_health_table: and_service(
            "name = \"b\"\nvip = \"198.18.0.11:80\"\n[service.health]\ncheck = \"tcp\"\ncolour = 1\n"
        )
        => "service[1].health.colour", "unknown field `colour`";
    unknown_dotted_health_key: format!(
            "{DP}[[service]]\nname = \"b\"\nvip = \"198.18.0.11:80\"\nhealth.check = \"tcp\"\nhealth.colour = 1\n\
             [[service.backends]]\naddress = \"198.19.0.11:80\"\n"
        )
        => "service[0].health.colour", "unknown field `colour`";
    unknown_key_in_backends_table: format!(
            "{DP}[[service]]\nname = \"b\"\nvip = \"198.18.0.11:80\"\n[[service.backends]]\naddress = \"198.19.0.11:80\"\n\
             [[service.backends]]\naddress = \"198.19.0.12:80\"\ncolour = 1\n"
        )
        => "service[0].backends[1].colour", "unknown field `colour`";
    forwarding_unknown: with_dataplane_line("forwarding = \"tunnel\"")
        => "dataplane.forwarding", "unknown variant `tunnel`, expected one of `nat`, `dsr`, `ipip`, `gue`";
    xdp_mode_unknown: with_dataplane_line("xdp-mode = \"offload\"")
        => "dataplane.xdp-mode", "unknown variant `offload`";
    protocol_unknown: one_service("protocol = \"sctp\"", B1)
        => "service[0].protocol", "unknown variant `sctp`";
    forwarding_upper_case: one_service("forwarding = \"NAT\"", B1)
        => "service[0].forwarding", "unknown variant `NAT`";
    scheduler_unknown: one_service("scheduler = \"lottery\"", B1)
        => "service[0].scheduler", "unknown variant `lottery`, expected one of `round-robin`";
    backup_not_a_bool: one_service("", r#"{ address = "198.19.0.11:80", backup = "yes" }"#)
        => "service[0].backends[0].backup", "invalid type: string \"yes\", expected a boolean";
    // A datetime is not a table even though serde sees it as a map.
    interval_datetime: with_health("check = \"tcp\", interval = 1979-05-27")
        => "service[0].health.interval", "invalid type";
    protocol_datetime: one_service("protocol = 1979-05-27", B1)
        => "service[0].protocol", "wanted string or table";
    // [service] instead of [[service]].
    service_table_not_list: format!("{DP}[service]\nname = \"www\"\n")
        => "service", "invalid type: map, expected a sequence";
}

// --- rejections that assert more than a key and a fragment --------------------

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
fn addresses_are_rejected_with_an_example() {
    for (text, key, example) in [
        (vip("web1"), "service[0].vip", "198.18.0.10:80"),
        (
            one_service(
                "",
                r#"{ address = "198.19.0.11:80" }, { address = "web1" }"#,
            ),
            "service[0].backends[1].address",
            "198.19.0.11:80",
        ),
    ] {
        let (got_key, reason) = parse_err(&text);
        assert_eq!(got_key, key);
        assert_eq!(
            reason,
            format!(
                r#"expected an address and port like "{example}" (IPv6 in brackets, like "[2001:db8::10]:80"), got "web1""#
            )
        );
    }
}

#[test]
fn weighted_ring_length_is_sum_over_gcd() {
    // gcd 1000: 5 slots. gcd 500 (zero weights ignored): 9 slots. (4999
    // slots is a row of the table.)
    let wrr = "scheduler = \"weighted-round-robin\"";
    parse_ok(&weighted(wrr, &[1000, 1000, 1000, 1000, 1000]));
    parse_ok(&weighted(wrr, &[1000, 1000, 0, 1000, 1000, 500]));
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
    // The message names the file, the key and the reason.
    let err = parse(
        &second_with_health("check = \"tcp\", port = 0"),
        Path::new(FILE),
    )
    .expect_err("port 0 is rejected");
    assert_eq!(
        err.to_string(),
        "test.toml: service[1].health.port: must be between 1 and 65535, got 0"
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

/// `n` services on their own VIPs, every one with a Maglev table.
fn maglev_services(n: usize) -> String {
    let mut text = DP.to_string();
    for i in 0..n {
        text.push_str(&format!(
            "\n[[service]]\nname = \"s{i}\"\nvip = \"198.18.1.{i}:80\"\nscheduler = \"{}\"\nbackends = [{B1}]\n",
            if i % 2 == 0 { "maglev" } else { "source-ip" }
        ));
    }
    text
}
