//! `[[pool]]` configs: what a pool becomes (its two services, its check),
//! round trips through `check`, and every rejection with its key.

use super::*;

/// A pool with an inline password; `extra` goes into the pool table.
fn pool(extra: &str) -> String {
    format!(
        "{DP}\n[[pool]]\nname = \"db\"\nwrite-vip = \"198.18.0.20:3306\"\nread-vip = \"198.18.0.21:3306\"\n\
         health = {{ check = \"mysql\", user = \"lb\", password = \"pw\" }}\n\
         members = [ {{ name = \"db1\", address = \"198.19.1.21:3306\" }}, {{ name = \"db2\", address = \"198.19.1.22:3306\" }} ]\n{extra}"
    )
}

#[test]
fn a_pool_becomes_a_write_and_a_read_service() {
    let cfg = parse_ok(&pool(
        "max-lag = \"3s\"\nauto-failover = \"10s\"\nauto-rejoin = true\n",
    ));
    assert_eq!(cfg.pools.len(), 1);
    let p = &cfg.pools[0];
    assert!(p.auto_rejoin);
    assert!(!parse_ok(&pool("")).pools[0].auto_rejoin, "off by default");
    assert_eq!(p.max_lag, Duration::from_secs(3));
    assert_eq!(p.auto_failover, Some(Duration::from_secs(10)));
    assert!(p.primary_fallback);
    assert_eq!(p.login.user, "lb");
    assert_eq!(p.login.password.expose(), "pw");
    // Never printed.
    assert!(!format!("{p:?}").contains("\"pw\""));
    let names: Vec<&str> = cfg.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["db-write", "db-read"]);
    let write = &cfg.services[0];
    assert_eq!(write.vip.to_string(), "198.18.0.20:3306");
    assert_eq!(write.on_backend_down, OnBackendDown::DropFlows);
    assert_eq!(cfg.services[1].on_backend_down, OnBackendDown::KeepFlows);
    assert_eq!(write.backends.len(), 2);
    assert!(write.health.is_none(), "the pool checks its members itself");
    // Through `check` (a live change) unchanged: the pool's services are
    // not turned into [[service]]s.
    assert_eq!(check(&cfg, Path::new("live")).expect("check"), cfg);
}

/// [`pool`] over IPv6: VIPs and members.
fn pool6(extra: &str) -> String {
    pool(extra)
        .replace("198.18.0.20:3306", "[2001:db8:18::20]:3306")
        .replace("198.18.0.21:3306", "[2001:db8:18::21]:3306")
        .replace("198.19.1.21:3306", "[2001:db8:19:1::21]:3306")
        .replace("198.19.1.22:3306", "[2001:db8:19:1::22]:3306")
}

/// An IPv6 pool (VIPs and members) becomes two IPv6 NAT services (NAT66),
/// with IPv6 prefixes in its firewall lists; it passes `check` unchanged.
#[test]
fn an_ipv6_pool_becomes_two_ipv6_services() {
    let cfg = parse_ok(&pool6(
        "allow-from = [\"2001:db8:18::/64\"]\nwrite = { deny-from = [\"2001:db8:18::66/128\"] }\n",
    ));
    let p = &cfg.pools[0];
    assert_eq!(p.write_vip.to_string(), "[2001:db8:18::20]:3306");
    assert_eq!(p.members[1].address.to_string(), "[2001:db8:19:1::22]:3306");
    let [write, read] = &cfg.services[..] else {
        panic!("two services: {:?}", cfg.services);
    };
    assert_eq!(write.vip.to_string(), "[2001:db8:18::20]:3306");
    assert_eq!(read.vip.to_string(), "[2001:db8:18::21]:3306");
    for s in [write, read] {
        assert_eq!(s.forwarding, Forwarding::Nat, "{}", s.name);
        let members: Vec<String> = s.backends.iter().map(|b| b.address.to_string()).collect();
        assert_eq!(
            members,
            ["[2001:db8:19:1::21]:3306", "[2001:db8:19:1::22]:3306"],
            "{}",
            s.name
        );
        assert_eq!(s.firewall.allow6.len(), 1, "{}: {:?}", s.name, s.firewall);
    }
    assert_eq!(write.firewall.deny6.len(), 1);
    assert!(read.firewall.deny6.is_empty());
    assert_eq!(check(&cfg, Path::new("live")).expect("check"), cfg);
}

#[test]
fn a_password_file_is_read_and_named() {
    let dir = std::env::temp_dir().join(format!("lb-pool-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("pw");
    std::fs::write(&file, "s3cret\n").expect("write");
    let text = pool("").replace(
        "password = \"pw\"",
        &format!("password-file = \"{}\"", file.display()),
    );
    let cfg = parse_ok(&text);
    assert_eq!(cfg.pools[0].login.password.expose(), "s3cret");
    assert_eq!(
        cfg.pools[0].login.password_file.as_deref(),
        Some(file.as_path())
    );
    assert_eq!(check(&cfg, Path::new("live")).expect("check"), cfg);
    std::fs::remove_dir_all(&dir).expect("cleanup");
    let (key, reason) = parse_err(&text);
    assert_eq!(key, "pool[0].health.password-file");
    assert!(reason.contains("cannot read"), "{reason}");
}

#[test]
fn a_mysql_check_works_on_a_plain_service_too() {
    let text = format!(
        "{DP}\n[[service]]\nname = \"db\"\nvip = \"198.18.0.20:3306\"\n\
         health = {{ check = \"mysql\", user = \"lb\", password = \"pw\" }}\n\
         backends = [ {{ address = \"198.19.1.21:3306\" }} ]\n"
    );
    let cfg = parse_ok(&text);
    assert!(matches!(
        cfg.services[0].health.as_ref().map(|h| &h.check),
        Some(CheckKind::Mysql(_))
    ));
}

#[test]
fn pool_rejections_name_the_key() {
    let cases: &[(String, &str, &str)] = &[
        // A pool's VIPs and members are of one family, as a service's.
        (
            pool("").replace("198.19.1.22:3306", "[2001:db8::22]:3306"),
            "pool[0].members[1].address",
            "[2001:db8::22]:3306 is an IPv6 address but the service's VIP 198.18.0.20:3306 \
             is IPv4: a service's VIP and its backends must be of one family",
        ),
        (
            pool("").replace("198.18.0.21:3306", "[2001:db8::21]:3306"),
            "pool[0].read-vip",
            "[2001:db8::21]:3306 is an IPv6 address but the service's VIP 198.18.0.20:3306 is IPv4",
        ),
        // An IPv6 pool: one family too.
        (
            pool6("").replace("[2001:db8:19:1::22]:3306", "198.19.1.22:3306"),
            "pool[0].members[1].address",
            "198.19.1.22:3306 is an IPv4 address but the service's VIP [2001:db8:18::20]:3306 \
             is IPv6: a service's VIP and its backends must be of one family",
        ),
        (
            pool6("").replace("[2001:db8:18::21]:3306", "198.18.0.21:3306"),
            "pool[0].read-vip",
            "198.18.0.21:3306 is an IPv4 address but the service's VIP [2001:db8:18::20]:3306 is IPv6",
        ),
        (
            pool("")
                .replace("198.18.0.20:3306", "[2001:db8:18::20]:3306")
                .replace("198.18.0.21:3306", "[2001:db8:18::21]:3306")
                .replace("198.19.1.21:3306", "[2001:db8:18::20]:3306"),
            "pool[0].members[0].address",
            "is one of the pool's own VIPs",
        ),
        (
            pool("").replace(
                "check = \"mysql\", user = \"lb\", password = \"pw\"",
                "check = \"tcp\"",
            ),
            "pool[0].health.check",
            "check = \"mysql\"",
        ),
        (
            pool("").replace("user = \"lb\", ", ""),
            "pool[0].health.user",
            "required key is missing",
        ),
        (
            pool("").replace(
                "password = \"pw\"",
                "password = \"pw\", password-file = \"/x\"",
            ),
            "pool[0].health.password-file",
            "not both",
        ),
        (
            pool("").replace("password = \"pw\"", "password = \"pw\", path = \"/\""),
            "pool[0].health.path",
            "only valid with check = \"http\"",
        ),
        (
            pool("").replace("198.18.0.21:3306", "198.18.0.20:3306"),
            "pool[0].read-vip",
            "also the write-vip",
        ),
        (
            pool("").replace("198.19.1.22:3306", "198.19.1.21:3306"),
            "pool[0].members[1].address",
            "already members[0]",
        ),
        (
            pool("").replace("name = \"db2\"", "name = \"db1\""),
            "pool[0].members[1].name",
            "duplicate member name",
        ),
        (pool("max-lag = \"soon\"\n"), "pool[0].max-lag", ""),
        (
            pool("max-lag = \"86401s\"\n"),
            "pool[0].max-lag",
            "must be at most 86400s (a day), got \"86401s\"",
        ),
        (
            pool("auto-failover = \"18446744073709551615s\"\n"),
            "pool[0].auto-failover",
            "longer than any key takes",
        ),
        (
            pool("").replace("198.19.1.22:3306", "198.18.0.21:3306"),
            "pool[0].members[1].address",
            "one of the pool's own VIPs",
        ),
        (
            pool("").replace("198.18.0.20:3306", "127.0.0.20:3306"),
            "pool[0].write-vip",
            "loopback address",
        ),
        (
            pool("auto-failover = 3\n"),
            "pool[0].auto-failover",
            "invalid type",
        ),
        (
            pool("writers = 2\n"),
            "pool[0].writers",
            "unknown field `writers`",
        ),
        (
            format!(
                "{}\n[[service]]\nname = \"x\"\nvip = \"198.18.0.20:3306\"\nbackends = [ {B1} ]\n",
                pool("")
            ),
            "pool[0].write-vip",
            "198.18.0.20:3306/tcp is already used by \"x\"",
        ),
        (
            format!(
                "{}\n[[service]]\nname = \"db-read\"\nvip = \"198.18.0.10:80\"\nbackends = [ {B1} ]\n",
                pool("")
            ),
            "pool[0].name",
            "already a service's name",
        ),
        (
            format!(
                "{DP}\n[[service]]\nname = \"w\"\nvip = \"198.18.0.10:80\"\n\
                 health = {{ check = \"http\", user = \"lb\" }}\nbackends = [ {B1} ]\n"
            ),
            "service[0].health.user",
            "only valid with check = \"mysql\"",
        ),
    ];
    for (text, key, fragment) in cases {
        assert_rejected(text, key, fragment);
    }
}

#[test]
fn a_pools_firewall_keys_are_a_services() {
    let cfg = parse_ok(&pool(
        "allow-from = [\"198.19.0.0/24\"]\n\
         write = { deny-from = [\"198.19.0.13/32\"], rate-limit = { new-flows-per-second = 50 } }\n",
    ));
    let (write, read) = (&cfg.services[0], &cfg.services[1]);
    let texts = |p: &[Prefix]| p.iter().map(ToString::to_string).collect::<Vec<_>>();
    assert_eq!(texts(&write.firewall.allow), ["198.19.0.0/24"]);
    assert_eq!(texts(&write.firewall.deny), ["198.19.0.13/32"]);
    assert_eq!(write.firewall.rate_limit.map(|r| r.burst), Some(50));
    assert_eq!(texts(&read.firewall.allow), ["198.19.0.0/24"]);
    assert!(read.firewall.deny.is_empty() && read.firewall.rate_limit.is_none());
    // A live change goes through `check`: the rules stay with the pool.
    assert_eq!(check(&cfg, Path::new("live")).expect("check"), cfg);
}

#[test]
fn a_pools_firewall_rejections_name_the_key() {
    for (text, key, fragment) in [
        (
            pool("deny-from = [\"198.19.0.13/24\"]\n"),
            "pool[0].deny-from[0]",
            "host bits",
        ),
        (
            pool("deny-from = [\"198.19.0.0/24\"]\nwrite = { deny-from = [\"198.19.0.0/24\"] }\n"),
            "pool[0].write.deny-from[0]",
            "already pool[0].deny-from[0]",
        ),
        (
            pool("allow-from = [\"198.19.0.0/24\"]\nread = { deny-from = [\"198.19.0.0/24\"] }\n"),
            "pool[0].read.deny-from[0]",
            "either allowed or denied",
        ),
        (
            pool(
                "rate-limit = { new-flows-per-second = 5 }\n\
                 write = { rate-limit = { new-flows-per-second = 9 } }\n",
            ),
            "pool[0].write.rate-limit",
            "in one place",
        ),
        (
            pool("write = { allow = [\"198.19.0.0/24\"] }\n"),
            "pool[0].write.allow",
            "unknown field `allow`",
        ),
    ] {
        assert_rejected(&text, key, fragment);
    }
}
