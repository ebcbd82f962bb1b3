//! The routed lab's verbs: `lb lab up --tunnel` and the demo's tunnel act
//! (the webs behind a router, reached over IPIP and GUE, `lb decap` on
//! each).

use std::{fs, path::Path};

use anyhow::{Context, bail};

use super::{
    CLIENT_FRONT, HTTPS_PORT, LB_FRONT, Lab, ROUTED_CLIENT_BACK, ROUTED_LB_BACK, ROUTER_WEB_SIDE,
    UDP_PORT, VIP, WEB_NAMES, WEB_NET,
    cli::{client_requests, demo_https, lb_command, summarize},
    udp_connect, udp_request, vip_udp, web_addr,
};
use crate::harness::netns::in_netns;

/// `lb lab up --tunnel`: the routed lab, decapsulators attached, its agent
/// config written; prints how to use it.
pub(super) fn up_routed(prefix: &str, lb_bin: &Path) -> anyhow::Result<()> {
    let lab = Lab::up_routed_detached(prefix, lb_bin)?;
    lab.attach_decaps()?;
    let config = lab.run_dir().join("tunnel.toml");
    fs::write(&config, lab.tunnel_site_config())
        .with_context(|| format!("writing {}", config.display()))?;
    let pids: Vec<String> = lab.server_pids().iter().map(ToString::to_string).collect();
    let pid_file = lab.run_dir().join("servers.pid");
    fs::write(&pid_file, pids.join("\n") + "\n")
        .with_context(|| format!("writing {}", pid_file.display()))?;
    let lb = lb_command()?;
    let p = lab.prefix().to_owned();
    println!("lab {p} is up (routed: the webs behind a router, reached over tunnels)");
    println!("  namespaces: {}", lab.namespaces().join(" "));
    println!(
        "  {}: eth0 {CLIENT_FRONT}/24 (to the LB), back0 {ROUTED_CLIENT_BACK}/24 (from the router: replies)",
        lab.client_ns()
    );
    println!(
        "  {}: lb-front {LB_FRONT}/24, lb-back {ROUTED_LB_BACK}/24 (the tunnel source), VIP {VIP}/32 on lo, {WEB_NET} via the router",
        lab.lb_ns()
    );
    println!(
        "  {}: routes between the LB, the webs' subnet {WEB_NET} ({ROUTER_WEB_SIDE}) and the client",
        lab.router_ns()
    );
    for n in 1..=WEB_NAMES.len() {
        println!(
            "  {}: eth0 {}/24 with `lb decap` (from {ROUTED_LB_BACK} only), VIP on lo, default via the router",
            lab.web_ns(n),
            web_addr(n)
        );
    }
    println!(
        "  services: tcp {VIP}:80 over IPIP, tcp {VIP}:{HTTPS_PORT} and udp {VIP}:{UDP_PORT} over GUE, round robin over web1..web3"
    );
    println!("  logs and configs: {}", lab.run_dir().display());
    println!();
    println!("Try it:");
    println!(
        "  terminal 1:  {lb} run --netns {p}-lb --config {} --socket {} --pin-dir {}",
        config.display(),
        lab.agent_socket().display(),
        lab.pin_dir().display()
    );
    println!("  terminal 2:  ip netns exec {p}-client curl http://{VIP}/");
    println!(
        "               {lb} decap status --netns {p}-web1 --pin-dir {}",
        lab.decap_pin_dir().display()
    );
    println!("Remove it:   {lb} lab down --prefix {p}");
    lab.keep();
    Ok(())
}

/// The demo's tunnel act: the routed lab, `requests` new connections to
/// the IPIP service, HTTPS and UDP over GUE, the decapsulators' counters;
/// fails if a request went unanswered or a web never answered.
pub(super) fn demo_tunnels(prefix: &str, lb_bin: &Path, requests: u32) -> anyhow::Result<()> {
    let lab = Lab::up_routed(prefix, lb_bin)?;
    println!();
    println!(
        "== tunnels: lab {prefix} rebuilt with the webs behind a router ({WEB_NET}), `lb decap` on each"
    );
    lab.attach_decaps()?;
    let agent = lab.start_agent(&lab.tunnel_site_config())?;
    println!("== ipip: {requests} new TCP connections to http://{VIP}/");
    let answers = client_requests(&lab, requests)?;
    let mut problems = summarize("ipip", &answers);
    problems.extend(demo_https(&lab, "gue"));
    let udp: Vec<String> = in_netns(&lab.client_ns(), || -> anyhow::Result<Vec<String>> {
        let socket = udp_connect(vip_udp())?;
        (1..=3)
            .map(|i| udp_request(&socket, &format!("u{i}")))
            .collect()
    })??;
    println!("== gue: udp {VIP}:{UDP_PORT} answered {udp:?}");
    let counted: Vec<String> = lab
        .decap_verdicts(1)?
        .into_iter()
        .filter(|(_, count)| *count > 0)
        .map(|(verdict, count)| format!("{verdict} {count}"))
        .collect();
    println!("== web1: lb decap status: {}", counted.join(", "));
    agent.stop().context("stopping the agent (tunnels)")?;
    drop(lab);
    println!("lab {prefix} removed");
    if !problems.is_empty() {
        bail!("demo failed: {}", problems.join("; "));
    }
    println!("tunnels ok: every request answered through the router, every web used");
    Ok(())
}
