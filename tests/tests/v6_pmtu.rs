//! End to end over IPv6 (issue 24): datagrams bigger than the MTU,
//! fragmented by the host that sends them, and path-MTU discovery, through
//! the real agent in the lab's IPv6 (the VIP6 [2001:db8:18::10]), in NAT
//! (NAT66) and DSR, as frag_e2e.rs does for IPv4.
//!
//! Needs root and the `lb` binary in `LB_BIN` (`cargo xtask test` sets
//! both). Builds its own lab under a unique prefix, with IPv6 forwarding on
//! in the LB's namespace (the lab leaves it off).

use std::net::SocketAddr;

use anyhow::{Result, ensure};
use lb_tests::{
    in_each_mode,
    lab6::config_v6,
    pmtu::{big_request, cached_mtu, forget_path_mtus6, upload_to},
    status,
};
use lb_userspace::{
    config::Forwarding,
    harness::{
        lab::{
            CLIENT_FRONT6, HTTP_PORT, HttpConn, LB_BACK, Lab, UDP_PORT, VIP6, bulk_byte,
            udp_connect,
        },
        netns::in_netns,
    },
};

fn new_lab() -> Result<Lab> {
    lb_tests::lab6::up("v6mtu")
}

/// UDP datagrams bigger than the MTU over IPv6: a request fragmented by the
/// client reaches the flow's web whole (its later fragments follow the
/// first's flow), an answer fragmented by the web reaches the client whole
/// and as the VIP's (NAT66; DSR: straight from the web). No fragment is
/// dropped for want of its flow.
#[test]
fn ipv6_udp_datagrams_bigger_than_the_mtu_cross_the_lb_whole() -> Result<()> {
    let mut lab = new_lab()?;
    in_each_mode(&mut lab, config_v6, |lab, _| {
        in_netns(&lab.client_ns(), || -> Result<()> {
            let socket = udp_connect(SocketAddr::new(VIP6.into(), UDP_PORT))?;
            let mut first_web = None;
            for (i, (size, pad)) in [(4000, 0), (100, 3000), (9000, 5000)].iter().enumerate() {
                let payload = format!("size {size} q{i} {}", "x".repeat(*pad));
                let reply = big_request(&socket, &payload)?;
                let web = String::from_utf8_lossy(&reply[..5]).into_owned();
                let want = (*size).max(web.len() + payload.len());
                ensure!(
                    reply.len() == want,
                    "answer of {} bytes, not {want}",
                    reply.len()
                );
                // One flow, one backend.
                ensure!(
                    first_web.get_or_insert(web.clone()) == &web,
                    "a fragmented datagram moved to {web}"
                );
            }
            Ok(())
        })??;
        let verdicts = status(lab)?.verdicts;
        ensure!(
            verdicts.get("drop_fragment").copied().unwrap_or(0) == 0,
            "fragments dropped: {verdicts:?}"
        );
        Ok(())
    })
}

/// Path-MTU discovery over IPv6 through the LB. The LB's link to the webs
/// is lowered to 1400 bytes: the client's full-size upload segments get
/// ICMPv6 "packet too big" from the VIP (the LB's XDP program), the client
/// lowers its path MTU to the VIP6 and the upload completes, in both modes.
/// Then (NAT66, where replies cross the LB) the client's link is lowered:
/// the webs' full-size download segments get "packet too big" sent back,
/// a web learns the 1400 path MTU to the client, and the download
/// completes byte-exact.
#[test]
fn ipv6_path_mtu_discovery_works_through_the_lb() -> Result<()> {
    let mut lab = new_lab()?;
    // The LB's "packet too big" answers leave by XDP_TX: both veth peers
    // need an XDP program for them to arrive at once (`Lab::run_xdp_on`).
    lab.run_xdp_on(&lab.client_ns(), "eth0", LB_BACK)?;
    lab.run_xdp_on(&lab.sw_ns(), "p-lb", LB_BACK)?;
    let lb = lab.lb_ns();
    let client = lab.client_ns();
    let vip6 = SocketAddr::new(VIP6.into(), HTTP_PORT);
    in_each_mode(&mut lab, config_v6, |lab, mode| {
        lab.exec_ok(&lb, &["ip", "link", "set", "lb-back", "mtu", "1400"])?;
        forget_path_mtus6(lab, &client)?;
        in_netns(&client, || upload_to(vip6, 300_000))??;
        ensure!(
            cached_mtu(lab, &client, &VIP6.to_string())? == Some(1400),
            "the client's path MTU to the VIP6 is not 1400"
        );
        let frag_needed = status(lab)?
            .verdicts
            .get("frag_needed")
            .copied()
            .unwrap_or(0);
        ensure!(frag_needed > 0, "no packet too big counted (frag_needed)");
        lab.exec_ok(&lb, &["ip", "link", "set", "lb-back", "mtu", "1500"])?;
        if mode == Forwarding::Nat {
            forget_path_mtus6(lab, &client)?;
            lab.exec_ok(&lb, &["ip", "link", "set", "lb-front", "mtu", "1400"])?;
            let got = in_netns(&client, || -> Result<usize> {
                let mut conn = HttpConn::connect(vip6)?;
                let r = conn.get("/bytes/300000")?;
                ensure!(
                    r.body
                        .iter()
                        .enumerate()
                        .all(|(i, b)| *b == bulk_byte(i as u64)),
                    "corrupted download"
                );
                Ok(r.body.len())
            })??;
            lab.exec_ok(&lb, &["ip", "link", "set", "lb-front", "mtu", "1500"])?;
            ensure!(got == 300_000, "downloaded {got} bytes");
            let mut mtus = Vec::new();
            for n in 1..=3 {
                mtus.push(cached_mtu(lab, &lab.web_ns(n), &CLIENT_FRONT6.to_string())?);
            }
            ensure!(
                mtus.contains(&Some(1400)),
                "no web learnt the 1400 path MTU to the client: {mtus:?}"
            );
        }
        Ok(())
    })
}
