//! End to end, PROXY protocol v2 through the LB (issue 25): the lab's real
//! agent and XDP data plane with three `proxy-protocol = "v2"` services —
//! NAT and full NAT to the webs' `lab-serve --proxy-http` listener, and full
//! NAT to a real nginx (`listen … proxy_protocol`) in web1's namespace.
//! Real Linux TCP stacks on both ends: curl's `/client` is answered with the
//! client's own address and port (the header names it), an 8 MB download is
//! byte-exact over each mode (every client ACK shifted, every backend ack
//! shifted back), and nginx logs the lab client as `$proxy_protocol_addr`
//! while its TCP peer is the LB's source address.
//!
//! Needs root, curl, nginx and the `lb` binary in `LB_BIN` (`cargo xtask
//! test` sets them up). The lab is built under a unique prefix.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use lb_tests::{backend_status, lb_bin, nginx::Nginx, unique_prefix, wait_for_status};
use lb_userspace::{
    config::Forwarding,
    harness::{
        lab::{CLIENT_FRONT, HttpConn, LB_BACK, Lab, PROXY_HTTP_PORT, VIP, bulk_byte, web_addr},
        netns::{in_netns, ns_run, require_tool},
    },
};

/// The VIP's PROXY ports: NAT and full NAT to lab-serve, full NAT to nginx.
const NAT_PORT: u16 = 8081;
const FNAT_PORT: u16 = 8082;
const NGINX_PORT: u16 = 8083;
const BYTES: usize = 8 << 20;

fn config() -> String {
    let webs: Vec<String> = (1..=3)
        .map(|n| {
            format!(
                "{{ name = \"web{n}\", address = \"{}:{PROXY_HTTP_PORT}\" }}",
                web_addr(n)
            )
        })
        .collect();
    let webs = webs.join(", ");
    format!(
        "[dataplane]\ninterfaces = [\"lb-front\", \"lb-back\"]\nforwarding = \"nat\"\n\n\
         [[service]]\nname = \"pp-nat\"\nvip = \"{VIP}:{NAT_PORT}\"\nproxy-protocol = \"v2\"\n\
         backends = [ {webs} ]\n\n\
         [[service]]\nname = \"pp-fnat\"\nvip = \"{VIP}:{FNAT_PORT}\"\nforwarding = \"full-nat\"\n\
         proxy-protocol = \"v2\"\nbackends = [ {webs} ]\n\n\
         [[service]]\nname = \"pp-nginx\"\nvip = \"{VIP}:{NGINX_PORT}\"\nforwarding = \"full-nat\"\n\
         proxy-protocol = \"v2\"\n\
         backends = [ {{ name = \"nginx\", address = \"{}:{NGINX_PORT}\" }} ]\n",
        web_addr(1)
    )
}

/// `curl http://VIP:port/path` from the client, from source port `local`.
fn curl(lab: &Lab, port: u16, path: &str, local: u16) -> Result<String> {
    ns_run(
        &lab.client_ns(),
        &[
            "curl",
            "-sS",
            "--max-time",
            "10",
            "--local-port",
            &local.to_string(),
            &format!("http://{VIP}:{port}{path}"),
        ],
    )
}

/// An 8 MB download over one connection to `VIP:port`, checked byte for
/// byte.
fn download(lab: &Lab, port: u16) -> Result<()> {
    let addr = SocketAddr::from((VIP, port));
    in_netns(&lab.client_ns(), || -> Result<()> {
        let mut conn = HttpConn::connect(addr)?;
        let r = conn.get(&format!("/bytes/{BYTES}"))?;
        ensure!(r.body.len() == BYTES, "received {} bytes", r.body.len());
        let bad = r
            .body
            .iter()
            .enumerate()
            .position(|(i, b)| *b != bulk_byte(i as u64));
        ensure!(bad.is_none(), "the download differs at byte {bad:?}");
        Ok(())
    })?
}

#[test]
fn a_proxy_service_names_the_real_client_to_lab_serve_and_nginx() -> Result<()> {
    require_tool("curl", "apt-get install curl")?;
    require_tool(
        "nginx",
        "apt-get install nginx-light (cargo xtask setup installs it)",
    )?;
    let lab = Lab::up(&unique_prefix("k25pe"), &lb_bin()).context("building the lab")?;
    lab.set_mode(Forwarding::Nat)?;
    let dir = std::env::temp_dir().join(format!("{}-nginx", lab.web_ns(1)));
    let nginx_listen = format!("0.0.0.0:{NGINX_PORT}");
    let nginx = Nginx::start(&lab.web_ns(1), &dir, &[&nginx_listen])?;
    let agent = lab.start_agent(&config())?;
    wait_for_status(
        &lab,
        "every backend in its ring",
        Duration::from_secs(20),
        |s| {
            (1..=3).all(|n| {
                let web = format!("web{n}");
                ["pp-nat", "pp-fnat"]
                    .iter()
                    .all(|svc| backend_status(s, svc, &web).is_ok_and(|b| b.in_ring))
            }) && backend_status(s, "pp-nginx", "nginx").is_ok_and(|b| b.in_ring)
        },
    )
    .with_context(|| agent.log_text())?;

    // lab-serve names the client the header gives: its own address and port.
    for (port, local) in [(NAT_PORT, 45001u16), (FNAT_PORT, 45002)] {
        let answer = curl(&lab, port, "/client", local)
            .with_context(|| format!("GET /client on {port}: {}", agent.log_text()))?;
        ensure!(
            answer
                .trim_end()
                .ends_with(&format!(" {CLIENT_FRONT}:{local}")),
            "port {port}: /client answered {answer:?}, not the client {CLIENT_FRONT}:{local}"
        );
    }

    // 8 MB over a PROXY flow, byte-exact, in both modes.
    for port in [NAT_PORT, FNAT_PORT] {
        download(&lab, port).with_context(|| format!("the download on port {port}"))?;
    }

    // nginx behind full NAT: its TCP peer is the LB, its
    // $proxy_protocol_addr the lab client.
    let local = 45003u16;
    let answer = curl(&lab, NGINX_PORT, "/who", local)?;
    ensure!(
        answer == format!("client {CLIENT_FRONT} {local}\n"),
        "nginx answered {answer:?}"
    );
    let want = format!("{CLIENT_FRONT} {local} {LB_BACK} \"GET /who HTTP/1.1\" 200");
    let deadline = Instant::now() + Duration::from_secs(5);
    let log = loop {
        let log = nginx.log("access.log");
        if log.contains(&want) || Instant::now() > deadline {
            break log;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    ensure!(
        log.lines().any(|l| l == want),
        "nginx's access log {log:?} has no line {want:?}"
    );
    drop(nginx);
    ensure!(!dir.exists(), "{} left behind", dir.display());
    drop(agent);
    Ok(())
}
