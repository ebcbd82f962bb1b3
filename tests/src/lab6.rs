//! The lab over IPv6, for the end-to-end tests (v6_e2e.rs, v6_e2e_more.rs,
//! v6_pmtu.rs, https.rs): the lab with the LB forwarding IPv6, and the
//! lab's config with its web services on the VIP6 too.

use anyhow::{Context, Result};
use lb_userspace::{
    config::Forwarding,
    harness::lab::{HTTP_PORT, HTTPS_PORT, Lab, UDP_PORT, VIP6, WEB_NAMES, lab_config, web_addr6},
};

use crate::{FALL, INTERVAL_MS, RISE, lb_bin, three_webs, unique_prefix};

/// The lab (prefix `tag`…) with the LB's kernel forwarding IPv6:
/// `bpf_fib_lookup` with AF_INET6 resolves next hops only then, and the
/// agent's start-up check requires it for an IPv6 service.
pub fn up(tag: &str) -> Result<Lab> {
    let prefix = unique_prefix(tag);
    let lab = Lab::up(&prefix, &lb_bin()).with_context(|| format!("building lab {prefix}"))?;
    lab.forward_ipv6()?;
    Ok(lab)
}

/// The lab in NAT (NAT66: the webs answer IPv6 clients through the LB),
/// the LB's kernel forwarding IPv6, and the client's second IPv6 address
/// `second` on its eth0. No static neighbour entries on the LB: a NAT66
/// reply to an address its kernel has not resolved (the second one, which
/// never solicits the LB) is reported and resolved by the agent
/// (`NEIGH_WANTED6`).
pub fn up_nat_with_second_address(tag: &str, second: &str) -> Result<Lab> {
    let lab = up(tag)?;
    lab.set_mode(Forwarding::Nat)?;
    lab.exec_ok(
        &lab.client_ns(),
        &[
            "ip",
            "-6",
            "addr",
            "add",
            &format!("{second}/64"),
            "dev",
            "eth0",
            "nodad",
        ],
    )?;
    Ok(lab)
}

/// The lab's IPv4 web service (`three_webs`) plus `www6` (TCP :80 on the
/// VIP6 over web1..3's IPv6 addresses, round robin), then `more` (e.g. a
/// `[firewall]` table).
pub fn three_webs_and_www6(more: &str) -> String {
    three_webs() + &services_v6(&[("www6", "tcp", HTTP_PORT)], "") + more
}

/// The lab's IPv4 web service (`three_webs`) plus `www6` (as in
/// [`three_webs_and_www6`]) with `health` (a `health = …` line).
pub fn three_webs_and_checked_www6(health: &str) -> String {
    three_webs() + &services_v6(&[("www6", "tcp", HTTP_PORT)], health)
}

/// The lab's config plus the same web services on the VIP6: TCP :80 and
/// UDP :5353 over web1..3's IPv6 addresses, round robin, the lab's mode.
pub fn config_v6(mode: Forwarding) -> String {
    lab_config(mode)
        + &services_v6(
            &[("www6", "tcp", HTTP_PORT), ("www6-udp", "udp", UDP_PORT)],
            "",
        )
}

/// The lab's config plus `www6` (TCP :80) and `www6-tls` (TCP :443) on the
/// VIP6 over web1..3's IPv6 addresses, round robin, both checked over HTTP
/// on the webs' :80 every [`INTERVAL_MS`] (rise [`RISE`], fall [`FALL`]),
/// and closing TCP flows expiring after 1 s (a drained web's count falls
/// to 0 soon after its clients close).
pub fn checked_config_v6(mode: Forwarding) -> String {
    let health = format!(
        "health = {{ check = \"http\", port = {HTTP_PORT}, path = \"/\", interval = \"{INTERVAL_MS}ms\", \
         timeout = \"{INTERVAL_MS}ms\", rise = {RISE}, fall = {FALL} }}\n"
    );
    lab_config(mode)
        + &services_v6(
            &[("www6", "tcp", HTTP_PORT), ("www6-tls", "tcp", HTTPS_PORT)],
            &health,
        )
        + "\n[dataplane.timeouts]\ntcp-closing = \"1s\"\n"
}

/// One round-robin `[[service]]` on the VIP6 over web1..3's IPv6 addresses
/// per (name, protocol, port), with `lines` (e.g. a `health = …` line).
fn services_v6(services: &[(&str, &str, u16)], lines: &str) -> String {
    let mut toml = String::new();
    for (name, protocol, port) in services {
        let backends = (1..=WEB_NAMES.len())
            .map(|n| {
                format!(
                    "{{ address = \"[{}]:{port}\", name = \"web{n}\" }}",
                    web_addr6(n)
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        toml.push_str(&format!(
            "\n[[service]]\nname = \"{name}\"\nvip = \"[{VIP6}]:{port}\"\nprotocol = \"{protocol}\"\n\
             scheduler = \"round-robin\"\n{lines}backends = [ {backends} ]\n"
        ));
    }
    toml
}
