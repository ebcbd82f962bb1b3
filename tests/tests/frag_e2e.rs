//! End-to-end (issue 11): datagrams bigger than the MTU, fragmented by the
//! host that sends them, and path-MTU discovery, through the real agent in
//! the lab.
//!
//! Needs root and the `lb` binary in `LB_BIN` (`cargo xtask test` sets
//! both). Each test builds its own lab under a unique prefix.

use anyhow::{Context, Result, ensure};
use lb_tests::{
    in_each_mode, lb_bin,
    pmtu::{big_request, cached_mtu, forget_path_mtus, upload},
    status, unique_prefix,
};
use lb_userspace::{
    config::Forwarding,
    harness::{
        lab::{
            CLIENT_FRONT, HttpConn, LB_BACK, Lab, bulk_byte, lab_config, udp_connect, vip_http,
            vip_udp,
        },
        netns::in_netns,
    },
};

fn new_lab() -> Result<Lab> {
    let prefix = unique_prefix("frg");
    Lab::up(&prefix, &lb_bin()).with_context(|| format!("building lab {prefix}"))
}

/// The reported bug: a UDP answer bigger than the MTU, fragmented by the
/// backend, must reach the client whole and as the VIP's (the socket is
/// connected to VIP:5353 and takes nothing else); a request bigger than the
/// MTU, fragmented by the client, must reach the flow's backend whole. Both
/// modes; no fragment may be dropped for want of its flow.
#[test]
fn udp_datagrams_bigger_than_the_mtu_cross_the_lb_whole() -> Result<()> {
    let mut lab = new_lab()?;
    in_each_mode(&mut lab, lab_config, |lab, _| {
        in_netns(&lab.client_ns(), || -> Result<()> {
            let socket = udp_connect(vip_udp())?;
            // (answer size, request padding): a 3-fragment answer, a
            // 3-fragment request, and both at once (7 and 4 fragments).
            for (i, (size, pad)) in [(4000, 0), (100, 3000), (9000, 5000)].iter().enumerate() {
                let payload = format!("size {size} q{i} {}", "x".repeat(*pad));
                let reply = big_request(&socket, &payload)?;
                let want = (*size).max("web1 ".len() + payload.len());
                ensure!(
                    reply.len() == want,
                    "answer of {} bytes, not {want}",
                    reply.len()
                );
                // One flow, one backend: every datagram to web1.
                ensure!(
                    reply.starts_with(b"web1 "),
                    "answer from {:?}",
                    String::from_utf8_lossy(&reply[..8])
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

/// Path-MTU discovery through the LB. The LB's link to the backends is
/// lowered to 1400 bytes: the client's full-size upload segments get
/// "fragmentation needed" from the VIP (the LB's XDP program), the client
/// lowers its path MTU to the VIP, and the upload completes, in both
/// modes. Then (NAT, where replies cross the LB) the client's link is
/// lowered instead: the backend's full-size download segments get "frag
/// needed" sent back to it and the download completes.
#[test]
fn path_mtu_discovery_works_through_the_lb() -> Result<()> {
    let mut lab = new_lab()?;
    let lb = lab.lb_ns();
    let client = lab.client_ns();
    let vip = vip_http().ip().to_string();
    // The LB's "fragmentation needed" answers leave by XDP_TX, to the
    // client (upload) and to a web through the switch (download): both veth
    // peers need an XDP program for them to arrive at once (see
    // `Lab::run_xdp_on`; without, every download here stalled 3.5–5 s and
    // one in five ran past the client's 5 s read timeout).
    lab.run_xdp_on(&client, "eth0", LB_BACK)?;
    lab.run_xdp_on(&lab.sw_ns(), "p-lb", LB_BACK)?;
    in_each_mode(&mut lab, lab_config, |lab, mode| {
        lab.exec_ok(&lb, &["ip", "link", "set", "lb-back", "mtu", "1400"])?;
        forget_path_mtus(&client)?;
        in_netns(&client, || upload(300_000))??;
        ensure!(
            cached_mtu(lab, &client, &vip)? == Some(1400),
            "the client's path MTU to the VIP is not 1400"
        );
        let frag_needed = |lab: &Lab| -> Result<u64> {
            Ok(status(lab)?
                .verdicts
                .get("frag_needed")
                .copied()
                .unwrap_or(0))
        };
        ensure!(frag_needed(lab)? > 0, "no frag_needed counted");
        lab.exec_ok(&lb, &["ip", "link", "set", "lb-back", "mtu", "1500"])?;
        if mode == Forwarding::Nat {
            // The client advertises an MSS from its path MTU: forgotten, it
            // asks for full-size segments again.
            forget_path_mtus(&client)?;
            lab.exec_ok(&lb, &["ip", "link", "set", "lb-front", "mtu", "1400"])?;
            let got = in_netns(&client, || -> Result<usize> {
                let mut conn = HttpConn::connect(vip_http())?;
                let started = std::time::Instant::now();
                // The state is read while the stalled connection is open.
                let r = conn
                    .get("/bytes/300000")
                    .map_err(|e| e.context(download_state(lab)))?;
                eprintln!("the download took {:?}", started.elapsed());
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
            let client_addr = CLIENT_FRONT.to_string();
            let mut mtus = Vec::new();
            for n in 1..=3 {
                mtus.push(cached_mtu(lab, &lab.web_ns(n), &client_addr)?);
            }
            ensure!(
                mtus.contains(&Some(1400)),
                "no backend learnt the 1400 path MTU to the client: {mtus:?}"
            );
        }
        Ok(())
    })
}

/// What the LB, the client and the webs knew when a download through the
/// lowered front MTU stalled: the LB's verdicts, and each host's TCP
/// sockets (queues, mss/pmtu, retransmissions, backoff), its route to the
/// client (a learnt path MTU shows there) and its counters, so a failure
/// says where it stalled.
fn download_state(lab: &Lab) -> String {
    let mut out = match status(lab) {
        Ok(st) => format!("LB verdicts: {:?}\n", st.verdicts),
        Err(e) => format!("LB status: {e:#}\n"),
    };
    let client = CLIENT_FRONT.to_string();
    let mut hosts: Vec<(String, String)> = vec![("client".into(), lab.client_ns())];
    hosts.extend((1..=3).map(|n| (format!("web{n}"), lab.web_ns(n))));
    for (name, ns) in hosts {
        for args in [
            &["ss", "-tnioa"][..],
            &["ip", "route", "get", client.as_str()][..],
            // Every non-zero counter (-s: the history file stays as it was).
            &["nstat", "-as"][..],
        ] {
            let text = lab
                .exec(&ns, args)
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_else(|e| format!("{e:#}"));
            out.push_str(&format!("{name} $ {}\n{text}\n", args.join(" ")));
        }
    }
    out
}
