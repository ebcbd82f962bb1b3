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
//! Over IPv6 (issue 24), NAT66 through the lab's VIP6: the same to
//! lab-serve (its `/client` the client's IPv6 address, 8 MB byte-exact)
//! and to nginx on web1's IPv6 address, which logs the client's IPv6
//! address as `$proxy_protocol_addr`.
//!
//! Needs root, curl, nginx and the `lb` binary in `LB_BIN` (`cargo xtask
//! test` sets them up). The lab is built under a unique prefix.

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use lb_tests::{backend_status, lab6, lb_bin, nginx::Nginx, unique_prefix, wait_for_status};
use lb_userspace::{
    config::Forwarding,
    harness::{
        lab::{
            CLIENT_FRONT, CLIENT_FRONT6, HttpConn, LB_BACK, Lab, PROXY_HTTP_PORT, VIP, VIP6,
            bulk_byte, web_addr, web_addr6,
        },
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

/// IPv6 (NAT66): lab-serve's PROXY listener on the webs' IPv6 addresses
/// and nginx on web1's, behind the VIP6.
fn config_v6() -> String {
    let webs: Vec<String> = (1..=3)
        .map(|n| {
            format!(
                "{{ name = \"web{n}\", address = \"[{}]:{PROXY_HTTP_PORT}\" }}",
                web_addr6(n)
            )
        })
        .collect();
    let webs = webs.join(", ");
    format!(
        "[dataplane]\ninterfaces = [\"lb-front\", \"lb-back\"]\nforwarding = \"nat\"\n\n\
         [[service]]\nname = \"pp-nat6\"\nvip = \"[{VIP6}]:{NAT_PORT}\"\nproxy-protocol = \"v2\"\n\
         backends = [ {webs} ]\n\n\
         [[service]]\nname = \"pp-nginx6\"\nvip = \"[{VIP6}]:{NGINX_PORT}\"\n\
         proxy-protocol = \"v2\"\n\
         backends = [ {{ name = \"nginx\", address = \"[{}]:{NGINX_PORT}\" }} ]\n",
        web_addr6(1)
    )
}

/// `curl http://VIP:port/path` from the client, from source port `local`.
fn curl(lab: &Lab, port: u16, path: &str, local: u16) -> Result<String> {
    curl_to(lab, VIP.into(), port, path, local)
}

/// `curl http://vip:port/path` (either family) from the client, from
/// source port `local`.
fn curl_to(lab: &Lab, vip: IpAddr, port: u16, path: &str, local: u16) -> Result<String> {
    ns_run(
        &lab.client_ns(),
        &[
            "curl",
            "-sS",
            "--max-time",
            "10",
            "--local-port",
            &local.to_string(),
            &format!("http://{}{path}", SocketAddr::new(vip, port)),
        ],
    )
}

/// An 8 MB download over one connection to `vip:port`, checked byte for
/// byte.
fn download(lab: &Lab, vip: IpAddr, port: u16) -> Result<()> {
    let addr = SocketAddr::new(vip, port);
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

/// nginx's access log gets the line `want` (within 5 s); then nginx is
/// stopped and its directory `dir` must be gone.
fn logged_then_stopped(nginx: Nginx, dir: &std::path::Path, want: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let log = loop {
        let log = nginx.log("access.log");
        if log.contains(want) || Instant::now() > deadline {
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
    Ok(())
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
        download(&lab, VIP.into(), port).with_context(|| format!("the download on port {port}"))?;
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
    logged_then_stopped(nginx, &dir, &want)?;
    drop(agent);
    Ok(())
}

/// NAT66: lab-serve behind the VIP6 names the client's IPv6 address and
/// port (the 52-byte TCP-over-IPv6 header's), 8 MB arrive byte-exact (every
/// client segment shifted by 52, every backend ack shifted back), and nginx
/// on web1's IPv6 address logs the client's IPv6 address as
/// `$proxy_protocol_addr` (its TCP peer too: NAT66 keeps the source).
#[test]
fn an_ipv6_proxy_service_names_the_real_client_to_lab_serve_and_nginx() -> Result<()> {
    require_tool("curl", "apt-get install curl")?;
    require_tool(
        "nginx",
        "apt-get install nginx-light (cargo xtask setup installs it)",
    )?;
    let lab = lab6::up("k24px6")?;
    lab.set_mode(Forwarding::Nat)?;
    let dir = std::env::temp_dir().join(format!("{}-nginx6", lab.web_ns(1)));
    let nginx_listen = SocketAddr::new(web_addr6(1).into(), NGINX_PORT).to_string();
    let nginx = Nginx::start(&lab.web_ns(1), &dir, &[&nginx_listen])?;
    let agent = lab.start_agent(&config_v6())?;
    wait_for_status(
        &lab,
        "every IPv6 backend in its ring",
        Duration::from_secs(20),
        |s| {
            (1..=3)
                .all(|n| backend_status(s, "pp-nat6", &format!("web{n}")).is_ok_and(|b| b.in_ring))
                && backend_status(s, "pp-nginx6", "nginx").is_ok_and(|b| b.in_ring)
        },
    )
    .with_context(|| agent.log_text())?;

    let local = 45011u16;
    let answer = curl_to(&lab, VIP6.into(), NAT_PORT, "/client", local)
        .with_context(|| format!("GET /client on the VIP6: {}", agent.log_text()))?;
    let client = SocketAddr::new(CLIENT_FRONT6.into(), local);
    ensure!(
        answer.trim_end().ends_with(&format!(" {client}")),
        "/client answered {answer:?}, not the client {client}"
    );

    download(&lab, VIP6.into(), NAT_PORT).context("the download over the VIP6")?;

    let local = 45013u16;
    let answer = curl_to(&lab, VIP6.into(), NGINX_PORT, "/who", local)?;
    ensure!(
        answer == format!("client {CLIENT_FRONT6} {local}\n"),
        "nginx answered {answer:?}"
    );
    let want = format!("{CLIENT_FRONT6} {local} {CLIENT_FRONT6} \"GET /who HTTP/1.1\" 200");
    logged_then_stopped(nginx, &dir, &want)?;
    drop(agent);
    Ok(())
}
