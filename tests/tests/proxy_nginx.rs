//! PROXY protocol v2 (issue 25) against a real server: Debian's nginx,
//! started in a namespace of the test's own with `listen … proxy_protocol`
//! and an access log of `$proxy_protocol_addr`, is sent the very bytes the
//! data plane inserts (`lb_common::proxy::header_v4` / `header_v6`) in front
//! of an HTTP request, and must answer and log the client the header names
//! (not the TCP peer). A connection without the header is refused. nginx is
//! stopped and its files removed afterwards, also on failure.
//!
//! Needs root and nginx (`cargo xtask setup` installs nginx-light).

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Result, ensure};
use lb_common::proxy::{header_v4, header_v6};
use lb_tests::{lb_bin, nginx::Nginx, unique_prefix};
use lb_userspace::harness::netns::{Netns, require_tool};

const PORT4: &str = "127.0.0.1:8081";
const PORT6: &str = "[::1]:8081";

/// Sends `before` (a PROXY header or nothing) and a request on a fresh
/// connection to `addr` from inside `ns`; returns all nginx answered.
fn exchange(ns: &Netns, addr: &str, before: &[u8]) -> Result<String> {
    let addr: SocketAddr = addr.parse()?;
    let before = before.to_vec();
    ns.run(move || -> Result<String> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(&before)?;
        s.write_all(b"GET /who HTTP/1.1\r\nHost: www.foobar.com\r\nConnection: close\r\n\r\n")?;
        let mut answer = String::new();
        // nginx refuses a connection without the header by closing it,
        // which may come as a reset: what was read so far is the answer.
        let _ = s.read_to_string(&mut answer);
        Ok(answer)
    })?
}

#[test]
fn nginx_reads_the_header_the_data_plane_inserts_and_logs_the_real_client() -> Result<()> {
    let _ = lb_bin(); // asserts root, as every test needing namespaces
    require_tool(
        "nginx",
        "apt-get install nginx-light (cargo xtask setup installs it)",
    )?;
    let ns = Netns::create(&format!("{}-web", unique_prefix("k25px")))?;
    let dir = std::env::temp_dir().join(format!("{}-nginx", ns.name()));
    let nginx = Nginx::start(ns.name(), &dir, &[PORT4, PORT6])?;

    // IPv4: client 198.18.0.77:40123 → VIP 198.18.0.10:80, as a NAT flow's.
    let v4 = header_v4(
        u32::from_ne_bytes([198, 18, 0, 77]),
        40123u16.to_be(),
        u32::from_ne_bytes([198, 18, 0, 10]),
        80u16.to_be(),
    );
    let answer = exchange(&ns, PORT4, &v4)?;
    ensure!(
        answer.starts_with("HTTP/1.1 200") && answer.ends_with("client 198.18.0.77 40123\n"),
        "nginx's answer to the IPv4 header: {answer:?}"
    );

    // IPv6: client fd00::77 port 40124 → VIP fd00:1::10 port 80.
    let client6: [u8; 16] = "fd00::77".parse::<std::net::Ipv6Addr>()?.octets();
    let vip6: [u8; 16] = "fd00:1::10".parse::<std::net::Ipv6Addr>()?.octets();
    let v6 = header_v6(&client6, 40124u16.to_be(), &vip6, 80u16.to_be());
    let answer = exchange(&ns, PORT6, &v6)?;
    ensure!(
        answer.starts_with("HTTP/1.1 200") && answer.ends_with("client fd00::77 40124\n"),
        "nginx's answer to the IPv6 header: {answer:?}"
    );

    // No header: refused, nothing served.
    let answer = exchange(&ns, PORT4, &[])?;
    ensure!(
        !answer.contains("200"),
        "nginx served a connection without a PROXY header: {answer:?}"
    );

    // The access log names the header's clients, not the TCP peer.
    let deadline = Instant::now() + Duration::from_secs(5);
    let log = loop {
        let log = nginx.log("access.log");
        if log.lines().count() >= 2 || Instant::now() > deadline {
            break log;
        }
        thread::sleep(Duration::from_millis(50));
    };
    let lines: Vec<&str> = log.lines().collect();
    ensure!(
        lines.len() == 2,
        "access log: two proxied requests expected, got {lines:?}"
    );
    ensure!(
        lines[0] == "198.18.0.77 40123 127.0.0.1 \"GET /who HTTP/1.1\" 200",
        "access log line {:?}",
        lines[0]
    );
    ensure!(
        lines[1] == "fd00::77 40124 ::1 \"GET /who HTTP/1.1\" 200",
        "access log line {:?}",
        lines[1]
    );
    let errors = nginx.log("error.log");
    ensure!(
        errors.contains("broken header") || errors.contains("PROXY protocol"),
        "nginx's error log names the connection without a header: {errors:?}"
    );
    drop(nginx);
    ensure!(!dir.exists(), "{} left behind", dir.display());
    Ok(())
}
