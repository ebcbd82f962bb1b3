//! The dual-stack lab over IPv6: the client, the LB and web1..3 reach each
//! other over IPv6 with the agent running (its XDP program on both of the
//! LB's legs passes IPv6 that is not VIP traffic to the kernel), `lab-serve`
//! answers on both families, the webs' IPv6 routes follow the mode, and
//! the agent's health probes (tcp, http, udp) work over IPv6 against the
//! webs' real servers from the LB's namespace.
//!
//! Needs root and the `lb` binary in `LB_BIN` (`cargo xtask test` sets
//! both up); without them the test fails loudly.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use lb_tests::{lb_bin, unique_prefix};
use lb_userspace::{
    config::{CheckKind, Forwarding, UdpCheck, UdpExpect},
    harness::{
        lab::{
            self, CLIENT_FRONT6, ECHO_PORT, HTTP_PORT, LB_BACK6, LB_FRONT6, Lab, UDP_PORT, VIP6,
            WEB_NAMES, http_get, lab_config, udp_connect, udp_request, web_addr6,
        },
        netns::in_netns,
    },
    health::{self, ProbeError},
};

/// The lab's MariaDB members over IPv6 (each binds its IPv4 and its IPv6
/// address): the agent's mysql check passes against each from the LB's
/// namespace, and a pool member's observation (the role and the
/// replication state the pool decides on) reads db1 as the writable
/// primary and db2 as a read-only replica of it.
#[test]
fn mysql_checks_and_pool_observations_work_over_ipv6() -> Result<()> {
    use lb_userspace::{
        config::{MysqlLogin, Secret},
        harness::lab::{ADMIN_USER, DB_NAMES, DB_PORT, admin_password_file, db_addr6},
        health::mysql,
    };
    let prefix = unique_prefix("lbv6d");
    let mut lab = Lab::up(&prefix, &lb_bin()).with_context(|| format!("building lab {prefix}"))?;
    lab.start_databases()?;
    let password = std::fs::read_to_string(admin_password_file(&lab.run_dir()))?;
    let login = MysqlLogin {
        user: ADMIN_USER.to_owned(),
        password: Secret::new(password.trim().to_owned()),
        password_file: None,
    };
    let lb = lab.lb_ns();
    for n in 1..=DB_NAMES.len() {
        let member = SocketAddr::new(db_addr6(n).into(), DB_PORT);
        probe_from(&lb, member, &CheckKind::Mysql(login.clone()))?
            .with_context(|| format!("mysql probe of {member}"))?;
    }
    let observe = |n: usize| {
        let member = SocketAddr::new(db_addr6(n).into(), DB_PORT);
        let login = login.clone();
        in_netns(&lb, move || -> Result<mysql::Observation> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(mysql::observe(member, &login, PROBE_TIMEOUT))
                .map_err(|e| anyhow::anyhow!("observing {member}: {e}"))
        })?
    };
    let primary = observe(1)?;
    ensure!(
        !primary.read_only && primary.server_id == 1,
        "db1 over IPv6: {primary:?}"
    );
    let replica = observe(2)?;
    ensure!(
        replica.read_only && replica.server_id == 2 && replica.replication.is_some(),
        "db2 over IPv6: {replica:?}"
    );
    // A wrong password is refused, naming the IPv6 member.
    let wrong = MysqlLogin {
        password: Secret::new("not-the-password".to_owned()),
        ..login.clone()
    };
    let member = SocketAddr::new(db_addr6(1).into(), DB_PORT);
    let why = probe_from(&lb, member, &CheckKind::Mysql(wrong))?.expect_err("wrong password");
    ensure!(
        why.to_string().starts_with(&format!("mysql {member}: ")),
        "{why}"
    );
    Ok(())
}

const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

fn ping6(lab: &Lab, ns: &str, to: impl ToString) -> Result<()> {
    let to = to.to_string();
    lab.exec_ok(ns, &["ping", "-6", "-c", "1", "-W", "2", &to])
        .with_context(|| format!("ping -6 {to} from {ns}"))
        .map(drop)
}

/// The next hop `ip -6 route get` picks in `ns` for `to`.
fn route_via(lab: &Lab, ns: &str, to: impl ToString) -> Result<String> {
    let to = to.to_string();
    let out = lab.exec_ok(ns, &["ip", "-6", "route", "get", &to])?;
    let mut words = out.split_whitespace();
    words
        .by_ref()
        .find(|w| *w == "via")
        .and_then(|_| words.next())
        .map(str::to_owned)
        .with_context(|| format!("no gateway in `ip -6 route get {to}` in {ns}: {out}"))
}

/// Runs the agent's own probe of `check` against `address` from `ns`.
fn probe_from(ns: &str, address: SocketAddr, check: &CheckKind) -> Result<Result<(), ProbeError>> {
    let check = check.clone();
    in_netns(ns, move || -> Result<Result<(), ProbeError>> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(rt.block_on(health::probe(address, &check, PROBE_TIMEOUT)))
    })?
}

#[test]
fn the_lab_is_dual_stack_and_checks_work_over_ipv6() -> Result<()> {
    let prefix = unique_prefix("lbv6");
    let mut lab = Lab::up(&prefix, &lb_bin()).with_context(|| format!("building lab {prefix}"))?;
    let _agent = lab.start_agent(&lab_config(Forwarding::Nat))?;
    let client = lab.client_ns();

    // Client ↔ LB: its front address, its echo listener, and the VIP6 (the
    // LB's kernel answers echo requests to a VIP).
    ping6(&lab, &client, LB_FRONT6)?;
    ping6(&lab, &client, VIP6)?;
    let echoed = in_netns(&client, || -> Result<Vec<u8>> {
        let mut s = TcpStream::connect_timeout(
            &SocketAddr::new(LB_FRONT6.into(), ECHO_PORT),
            Duration::from_secs(2),
        )?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.write_all(b"over ipv6")?;
        let mut buf = [0u8; 9];
        s.read_exact(&mut buf)?;
        Ok(buf.to_vec())
    })??;
    ensure!(echoed == b"over ipv6", "echo answered {echoed:?}");

    // Client ↔ webs: HTTP and UDP on each web's IPv6 address.
    for (i, name) in WEB_NAMES.iter().enumerate() {
        let web = web_addr6(i + 1);
        let body = in_netns(&client, || {
            http_get(SocketAddr::new(web.into(), HTTP_PORT), "/")
        })??;
        ensure!(
            body.status == 200 && body.text() == *name,
            "GET / on [{web}]:80 answered {} {:?}",
            body.status,
            body.text()
        );
        let reply = in_netns(&client, || -> Result<String> {
            let socket = udp_connect(SocketAddr::new(web.into(), UDP_PORT))?;
            udp_request(&socket, "hello6")
        })??;
        ensure!(
            reply == format!("{name} hello6"),
            "UDP [{web}] answered {reply:?}"
        );
    }
    // Each web also serves on the VIP6 (what DSR delivers to it).
    let web1 = lab.web_ns(1);
    let on_vip = in_netns(&web1, || http_get(lab::vip6_http(), "/"))??;
    ensure!(
        on_vip.text() == WEB_NAMES[0],
        "web1 on the VIP6 answered {on_vip:?}"
    );

    // Webs → client: in NAT their IPv6 gateway is the LB (which does not
    // forward IPv6 yet: see configure_lb_v6); in DSR the client's back leg
    // takes the replies.
    ensure!(route_via(&lab, &web1, CLIENT_FRONT6)? == LB_BACK6.to_string());
    lab.set_mode(Forwarding::Dsr)?;
    ensure!(route_via(&lab, &web1, CLIENT_FRONT6)? == lab::CLIENT_BACK6.to_string());
    ping6(&lab, &web1, CLIENT_FRONT6)?;
    lab.set_mode(Forwarding::Nat)?;
    ensure!(route_via(&lab, &web1, CLIENT_FRONT6)? == LB_BACK6.to_string());

    // The agent's probes over IPv6, from the LB's namespace, against the
    // webs' real servers: tcp, http (body = the web's name), udp.
    let lb = lab.lb_ns();
    for (i, name) in WEB_NAMES.iter().enumerate() {
        let web = web_addr6(i + 1);
        let http = CheckKind::Http {
            path: "/".to_owned(),
            expect_status: 200,
            expect_body: Some((*name).to_owned()),
        };
        probe_from(&lb, SocketAddr::new(web.into(), HTTP_PORT), &CheckKind::Tcp)?
            .with_context(|| format!("tcp probe of [{web}]:80"))?;
        probe_from(&lb, SocketAddr::new(web.into(), HTTP_PORT), &http)?
            .with_context(|| format!("http probe of [{web}]:80"))?;
        let udp = CheckKind::Udp(UdpCheck {
            send: b"health".to_vec(),
            expect: UdpExpect::Prefix(format!("{name} health").into_bytes()),
        });
        probe_from(&lb, SocketAddr::new(web.into(), UDP_PORT), &udp)?
            .with_context(|| format!("udp probe of [{web}]:5353"))?;
    }
    // A web whose body is not the expected one, and a stopped web, fail
    // with reasons that name the IPv6 address.
    let web2 = SocketAddr::new(web_addr6(2).into(), HTTP_PORT);
    let wrong = CheckKind::Http {
        path: "/".to_owned(),
        expect_status: 200,
        expect_body: Some("web1".to_owned()),
    };
    let why = probe_from(&lb, web2, &wrong)?.expect_err("web2's body is not web1");
    ensure!(
        why.to_string() == format!("{web2}/: body does not contain \"web1\""),
        "{why}"
    );
    lab.stop_web(3)?;
    let web3 = SocketAddr::new(web_addr6(3).into(), HTTP_PORT);
    let why = probe_from(&lb, web3, &CheckKind::Tcp)?.expect_err("web3 is stopped");
    ensure!(
        why.to_string() == format!("connect {web3}: connection refused"),
        "{why}"
    );
    Ok(())
}

/// Issue 24: `cargo xtask demo` (`lb lab demo`) shows round robin over
/// IPv6 in both modes next to IPv4: its first act (`--web-only`: NAT then
/// DSR, no databases, tunnels or failover) makes new connections to the
/// VIP and to the VIP6, and each mode's IPv6 summary has every web answer
/// as often, in exact round robin.
#[test]
fn the_demo_shows_round_robin_over_ipv6_in_both_modes() -> Result<()> {
    const REQUESTS: usize = 6;
    let prefix = unique_prefix("lbdm");
    let out = std::process::Command::new(lb_bin())
        .args([
            "lab",
            "demo",
            "--prefix",
            &prefix,
            "--web-only",
            "--requests",
        ])
        .arg(REQUESTS.to_string())
        .output()
        .context("running lb lab demo")?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "lb lab demo failed ({}):\n{text}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    for mode in ["nat", "dsr"] {
        for family in ["", " IPv6"] {
            let heading = format!("-- {mode}{family} summary:");
            let summary: Vec<&str> = text
                .lines()
                .skip_while(|l| *l != heading)
                .take_while(|l| !l.contains("exact round robin"))
                .chain(
                    text.lines()
                        .skip_while(|l| *l != heading)
                        .find(|l| l.contains("exact round robin")),
                )
                .collect();
            let want: Vec<String> = WEB_NAMES
                .iter()
                .map(|w| format!("   {w}: {}", REQUESTS / WEB_NAMES.len()))
                .collect();
            let n = want.len();
            ensure!(
                summary.len() == n + 2
                    && summary[1..=n] == want
                    && summary[n + 1].starts_with("   exact round robin: yes"),
                "no {heading:?} with each web {} times in exact round robin:\n{text}",
                REQUESTS / WEB_NAMES.len()
            );
        }
    }
    ensure!(
        text.contains("over IPv4 and IPv6"),
        "the demo's verdict names both families:\n{text}"
    );
    Ok(())
}
