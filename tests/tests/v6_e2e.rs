//! End to end over IPv6 (issue 24): the real `lb` agent balancing real
//! clients' IPv6 traffic through the lab's VIP6 [2001:db8:18::10] in NAT
//! (NAT66) and in DSR: `curl -6` and new connections rotating over
//! web1..3, an 8 MB transfer arriving byte-exact, a UDP client's flows
//! sticking while new ones rotate; the lab's IPv4 services beside them
//! keep working. Kill and recovery, drain and the neighbour priming:
//! v6_e2e_more.rs; HTTPS through the VIP6: https.rs.
//!
//! The LB's kernel forwards IPv6 here (`net.ipv6.conf.all.forwarding=1`):
//! `bpf_fib_lookup` with AF_INET6 resolves next hops only then, and the
//! agent's start-up check requires it for an IPv6 service.
//!
//! Needs root and the `lb` binary in `LB_BIN` (`cargo xtask test` sets
//! both up); without them the test fails loudly.

use std::{collections::BTreeMap, net::SocketAddr};

use anyhow::{Context, Result, ensure};
use lb_tests::{
    in_each_mode,
    lab6::{self, config_v6},
};
use lb_userspace::harness::{
    lab::{
        HTTP_PORT, UDP_PORT, VIP6, WEB_NAMES, bulk_byte, http_get, udp_connect, udp_request,
        vip_http,
    },
    netns::{in_netns, require_tool},
};

fn vip6_http() -> SocketAddr {
    SocketAddr::new(VIP6.into(), HTTP_PORT)
}

/// How many of `servers` each web is.
fn tally(servers: &[String]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for s in servers {
        *counts.entry(s.clone()).or_default() += 1;
    }
    counts
}

#[test]
fn ipv6_services_are_balanced_in_nat_and_dsr() -> Result<()> {
    require_tool("curl", "apt-get install curl")?;
    const SIZE: usize = 8_000_000;
    let mut lab = lab6::up("lbv6e")?;
    in_each_mode(&mut lab, config_v6, |lab, mode| {
        let client = lab.client_ns();
        // curl -6 through the VIP6: each new connection a new flow, round
        // robin over the three webs.
        let url = format!("http://[{VIP6}]:{HTTP_PORT}/");
        let mut servers = Vec::new();
        for _ in 0..6 {
            let body = lab
                .exec_ok(&client, &["curl", "-6", "-sS", "--max-time", "5", &url])
                .with_context(|| format!("curl -6 {url} ({mode:?})"))?;
            servers.push(body.trim().to_owned());
        }
        let want: BTreeMap<String, usize> = WEB_NAMES.iter().map(|w| (w.to_string(), 2)).collect();
        ensure!(
            tally(&servers) == want,
            "6 new IPv6 connections went to {servers:?}, not each web twice"
        );
        // An 8 MB transfer, byte-exact.
        let response = in_netns(&client, || http_get(vip6_http(), &format!("/bytes/{SIZE}")))??;
        ensure!(
            response.status == 200,
            "GET /bytes answered {}",
            response.status
        );
        ensure!(
            response.body.len() == SIZE,
            "got {} of {SIZE} bytes",
            response.body.len()
        );
        let mismatch = response
            .body
            .iter()
            .enumerate()
            .position(|(i, b)| *b != bulk_byte(i as u64));
        ensure!(
            mismatch.is_none(),
            "8 MB over IPv6 differs at byte {mismatch:?}"
        );
        // A UDP client: one socket's datagrams stay on one web, new
        // sockets rotate.
        in_netns(&client, || -> Result<()> {
            let vip = SocketAddr::new(VIP6.into(), UDP_PORT);
            let socket = udp_connect(vip)?;
            let first = udp_request(&socket, "one")?;
            let web = first.split(' ').next().unwrap_or_default().to_owned();
            ensure!(first == format!("{web} one"), "UDP answered {first:?}");
            for n in 0..3 {
                let again = udp_request(&socket, &format!("again{n}"))?;
                ensure!(
                    again == format!("{web} again{n}"),
                    "a UDP flow moved from {web}: {again:?}"
                );
            }
            let mut others = Vec::new();
            for _ in 0..3 {
                let s = udp_connect(vip)?;
                let reply = udp_request(&s, "new")?;
                others.push(reply.split(' ').next().unwrap_or_default().to_owned());
            }
            others.sort();
            ensure!(
                others == WEB_NAMES.map(String::from).to_vec(),
                "3 new UDP flows went to {others:?}, not one to each web"
            );
            Ok(())
        })??;
        // IPv4 beside it, unchanged.
        let v4 = in_netns(&client, || http_get(vip_http(), "/"))??;
        ensure!(v4.status == 200, "IPv4 GET / answered {}", v4.status);
        Ok(())
    })
}
