//! End to end (issue 24): IPv6's SYN-flood guarantee in the lab, in NAT
//! and DSR. Keep-alive connections over IPv6 (through the VIP6) and over
//! IPv4 (through the VIP) are held open while `lb pktgen --proto tcp-syn`
//! floods the VIP6 from the client's namespace with spoofed IPv6 sources,
//! ten times the flow tables (`conntrack-size` = `half-open-size` = 1024;
//! IPv6's tables are sized by them too). Every held connection still
//! answers from its own web, and new IPv6 connections succeed after the
//! flood; `lb status` counts the IPv6 flows.
//!
//! The generator is the product's `lb pktgen` (its IPv6 template: a SYN
//! whose source's low 32 bits count the flows). Needs root and the `lb`
//! binary in `LB_BIN` (`cargo xtask test`); without them the test fails
//! loudly.

use std::collections::BTreeSet;

use anyhow::{Context, Result, ensure};
use lb_tests::{
    flood::{
        KEEPALIVE, TABLE, broken_connections, keepalive_connections, status_json, status_text,
        syn_flood_round6, syn_flood_with,
    },
    in_each_mode,
};
use lb_userspace::{
    config::Forwarding,
    harness::{
        lab::{HTTP_PORT, HttpConn, Lab, VIP6, WEB_NAMES, lab_config, vip6_http, web_addr6},
        netns::in_netns,
    },
};

/// The lab's config with small tables and the web service on the VIP6 too
/// (TCP :80 over web1..3's IPv6 addresses, round robin).
fn config(mode: Forwarding) -> String {
    let base = lab_config(mode);
    let mut toml = base.replacen(
        "[dataplane]\n",
        &format!("[dataplane]\nconntrack-size = {TABLE}\nhalf-open-size = {TABLE}\n"),
        1,
    );
    let backends = (1..=WEB_NAMES.len())
        .map(|n| {
            format!(
                "{{ address = \"[{}]:{HTTP_PORT}\", name = \"web{n}\" }}",
                web_addr6(n)
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    toml.push_str(&format!(
        "\n[[service]]\nname = \"www6\"\nvip = \"[{VIP6}]:{HTTP_PORT}\"\nprotocol = \"tcp\"\n\
         scheduler = \"round-robin\"\nbackends = [ {backends} ]\n"
    ));
    toml
}

/// `n` keep-alive IPv6 connections through the VIP6, one `GET /` each.
fn keepalive6(lab: &Lab, n: usize) -> Result<Vec<(HttpConn, String)>> {
    in_netns(&lab.client_ns(), || {
        (0..n)
            .map(|_| {
                let mut conn = HttpConn::connect(vip6_http())?;
                let server = conn.get("/")?.text();
                Ok((conn, server))
            })
            .collect()
    })?
}

/// The IPv6 flows `lb status --json` counts.
fn v6_flows(lab: &Lab) -> Result<u64> {
    let status = status_json(lab)?;
    status["conntrack"]["entries_v6"]
        .as_u64()
        .with_context(|| format!("no conntrack.entries_v6 in {status}"))
}

#[test]
fn held_ipv6_and_ipv4_connections_survive_a_spoofed_ipv6_syn_flood() -> Result<()> {
    let mut lab = lb_tests::lab6::up("lb6fl")?;
    in_each_mode(&mut lab, config, |lab, mode| {
        let mut held6 = keepalive6(lab, KEEPALIVE)?;
        let mut held4 = keepalive_connections(lab, KEEPALIVE)?;
        let servers: BTreeSet<&str> = held6.iter().map(|(_, s)| s.as_str()).collect();
        ensure!(
            servers.len() == WEB_NAMES.len(),
            "the IPv6 connections went to {servers:?}, not to every web"
        );
        let counted = v6_flows(lab)?;
        ensure!(
            counted >= KEEPALIVE as u64,
            "lb status counts {counted} IPv6 flows with {KEEPALIVE} connections open"
        );

        let (seen, report) = syn_flood_with(lab, syn_flood_round6)?;
        let after = status_text(lab)?;
        eprintln!(
            "{mode:?}: the LB saw {seen} frames of the IPv6 flood (last run: {}); status:\n{after}",
            report.trim()
        );

        for (family, held) in [("IPv6", &mut held6), ("IPv4", &mut held4)] {
            let broken = broken_connections(held);
            ensure!(
                broken.is_empty(),
                "{} of {KEEPALIVE} {family} keep-alive connections did not survive the IPv6 \
                 flood: {broken:#?}\nstatus after the flood:\n{after}",
                broken.len()
            );
        }
        // New IPv6 connections after the flood: each served, round robin
        // over every web.
        let fresh =
            keepalive6(lab, 2 * WEB_NAMES.len()).context("new IPv6 connections after the flood")?;
        let servers: BTreeSet<&str> = fresh.iter().map(|(_, s)| s.as_str()).collect();
        ensure!(
            servers.len() == WEB_NAMES.len(),
            "new IPv6 connections after the flood went to {servers:?}"
        );
        Ok(())
    })
}
