//! End-to-end tests: the real `lb` agent balancing real traffic in the
//! network-namespace lab, in NAT and in DSR mode.
//!
//! Needs root and the `lb` binary in `LB_BIN` (`cargo xtask test` sets
//! both up). Each test builds its own lab under a unique prefix, so the
//! tests run in parallel without sharing a namespace.

use std::{
    io::{Read, Write},
    net::{SocketAddr, SocketAddrV4, TcpStream},
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use lb_tests::{MODES, in_each_mode, lb_bin, unique_prefix};
use lb_userspace::harness::{
    lab::{
        self, ECHO_PORT, HttpConn, LB_FRONT, Lab, VIP, WEB_NAMES, bulk_byte, http_get, lab_config,
        udp_connect, udp_request, vip_http, vip_udp,
    },
    netns::{self, in_netns, require_tool},
};

fn new_lab() -> Result<Lab> {
    let prefix = unique_prefix("lbt");
    Lab::up(&prefix, &lb_bin()).with_context(|| format!("building lab {prefix}"))
}

/// `n` names following the round-robin order from `WEB_NAMES[start]`.
fn rotation(start: usize, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| WEB_NAMES[(start + i) % WEB_NAMES.len()].to_owned())
        .collect()
}

/// `GET /` on a new connection (a new flow): the server that answered.
fn server_of_new_connection() -> Result<String> {
    let response = http_get(vip_http(), "/")?;
    ensure!(response.status == 200, "GET / answered {}", response.status);
    Ok(response.text())
}

fn servers_of_new_connections(n: usize) -> Result<Vec<String>> {
    (0..n).map(|_| server_of_new_connection()).collect()
}

/// The `webN` of a UDP reply `webN payload`.
fn udp_server(reply: &str) -> String {
    reply
        .split_once(' ')
        .map_or(reply, |(server, _)| server)
        .to_owned()
}

#[test]
fn tcp_new_connections_rotate_exactly() -> Result<()> {
    let mut lab = new_lab()?;
    in_each_mode(&mut lab, lab_config, |lab, _| {
        let servers = in_netns(&lab.client_ns(), || servers_of_new_connections(9))??;
        // A fresh agent: the service's first flow goes to web1.
        ensure!(
            servers == rotation(0, 9),
            "9 new connections went to {servers:?}, not exact round robin from web1"
        );
        Ok(())
    })
}

#[test]
fn keepalive_connection_keeps_its_server_while_new_ones_rotate() -> Result<()> {
    let mut lab = new_lab()?;
    in_each_mode(&mut lab, lab_config, |lab, _| {
        in_netns(&lab.client_ns(), || -> Result<()> {
            let mut long_lived = HttpConn::connect(vip_http())?;
            let first = long_lived.get("/")?.text();
            ensure!(
                first == WEB_NAMES[0],
                "the service's first flow went to {first}, not web1"
            );
            let others = servers_of_new_connections(6)?;
            ensure!(
                others == rotation(1, 6),
                "6 new connections went to {others:?}, not a rotation after {first}"
            );
            let again = long_lived.get("/")?.text();
            ensure!(
                again == first,
                "the keep-alive connection moved from {first} to {again}"
            );
            Ok(())
        })?
    })
}

#[test]
fn bulk_transfer_arrives_byte_exact() -> Result<()> {
    const SIZE: usize = 8_000_000;
    let mut lab = new_lab()?;
    in_each_mode(&mut lab, lab_config, |lab, _| {
        let response = in_netns(&lab.client_ns(), || {
            http_get(vip_http(), &format!("/bytes/{SIZE}"))
        })??;
        ensure!(
            response.status == 200,
            "GET /bytes/{SIZE} answered {}",
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
            "body differs from the pattern first at byte {mismatch:?}"
        );
        Ok(())
    })
}

#[test]
fn udp_flows_stick_and_new_flows_rotate() -> Result<()> {
    let mut lab = new_lab()?;
    in_each_mode(&mut lab, lab_config, |lab, _| {
        in_netns(&lab.client_ns(), || -> Result<()> {
            // Connected to VIP:5353, the socket only accepts replies whose
            // source is exactly VIP:5353.
            let socket = udp_connect(vip_udp())?;
            let mut servers = Vec::new();
            for i in 0..5 {
                let payload = format!("sticky-{i}");
                let reply = udp_request(&socket, &payload)?;
                ensure!(
                    reply.ends_with(&format!(" {payload}")),
                    "reply {reply:?} does not echo {payload:?}"
                );
                servers.push(udp_server(&reply));
            }
            ensure!(
                servers == vec![WEB_NAMES[0]; 5],
                "5 datagrams of one flow went to {servers:?}, not all to web1"
            );
            let mut rotated = Vec::new();
            for i in 0..3 {
                let reply = udp_request(&udp_connect(vip_udp())?, &format!("new-{i}"))?;
                rotated.push(udp_server(&reply));
            }
            ensure!(
                rotated == rotation(1, 3),
                "3 new UDP flows went to {rotated:?}, not web2, web3, web1"
            );
            Ok(())
        })?
    })
}

#[test]
fn wrk_load_has_no_errors() -> Result<()> {
    require_tool("wrk", "install wrk (cargo xtask setup does)")?;
    let mut lab = new_lab()?;
    in_each_mode(&mut lab, lab_config, |lab, _| {
        let url = format!("http://{VIP}/");
        let out = lab.exec(&lab.client_ns(), &["wrk", "-t2", "-c16", "-d3s", &url])?;
        let report = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success(),
            "wrk failed ({}): {report}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let requests = report
            .lines()
            .find(|line| line.contains(" requests in "))
            .and_then(|line| line.split_whitespace().next())
            .and_then(|count| count.parse::<u64>().ok())
            .with_context(|| format!("no request count in wrk's report:\n{report}"))?;
        ensure!(requests > 100, "only {requests} requests in 3 s:\n{report}");
        ensure!(
            !report.contains("Socket errors"),
            "wrk saw socket errors:\n{report}"
        );
        ensure!(
            !report.contains("Non-2xx or 3xx responses"),
            "wrk saw error responses:\n{report}"
        );
        Ok(())
    })
}

#[test]
fn lb_host_traffic_is_untouched() -> Result<()> {
    require_tool("ping", "install iputils-ping (cargo xtask setup should)")?;
    let mut lab = new_lab()?;
    in_each_mode(&mut lab, lab_config, |lab, _| {
        // ICMP, even to the VIP, is passed to the LB's kernel, which answers.
        for target in [LB_FRONT, VIP] {
            let target = target.to_string();
            lab.exec_ok(&lab.client_ns(), &["ping", "-c1", "-W2", &target])
                .with_context(|| format!("pinging {target} from the client"))?;
        }
        let echo = SocketAddr::V4(SocketAddrV4::new(LB_FRONT, ECHO_PORT));
        let echoed = in_netns(&lab.client_ns(), || {
            echo_roundtrip(echo, b"hello, lb host\n")
        })??;
        ensure!(
            echoed == b"hello, lb host\n",
            "echo from {echo} returned {echoed:?}"
        );
        Ok(())
    })
}

/// Sends `message` to a TCP echo server and reads it back.
fn echo_roundtrip(addr: SocketAddr, message: &[u8]) -> Result<Vec<u8>> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream
        .write_all(message)
        .context("sending to the echo server")?;
    let mut echoed = vec![0; message.len()];
    stream.read_exact(&mut echoed).context("reading the echo")?;
    Ok(echoed)
}

/// Names in `ip netns list`.
fn listed_namespaces() -> Result<Vec<String>> {
    Ok(netns::run("ip", &["netns", "list"])?
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

#[test]
fn dropping_the_lab_removes_everything() -> Result<()> {
    for mode in MODES {
        let lab = new_lab()?;
        lab.set_mode(mode)?;
        let prefix = lab.prefix().to_owned();
        let namespaces = lab.namespaces();
        ensure!(
            !lab::lab_serve_pids(&prefix).is_empty(),
            "lab {prefix} runs no lab-serve process to clean up"
        );
        // With the agent still running: the lab must take it down too.
        let agent = lab.start_agent(&lab_config(mode))?;
        drop(lab);
        drop(agent);
        let listed = listed_namespaces()?;
        let left: Vec<&String> = namespaces.iter().filter(|ns| listed.contains(ns)).collect();
        ensure!(
            left.is_empty(),
            "namespaces {left:?} survived the lab ({})",
            mode.name()
        );
        let servers = lab::lab_serve_pids(&prefix);
        ensure!(
            servers.is_empty(),
            "lab-serve processes {servers:?} of {prefix} survived the lab"
        );
        ensure!(
            !lab::run_dir(&prefix).exists(),
            "{} survived the lab",
            lab::run_dir(&prefix).display()
        );
    }
    Ok(())
}
