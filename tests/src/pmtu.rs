//! Path-MTU discovery seen from the lab's hosts: an upload to the VIP that
//! only completes if every segment got through (frag_e2e.rs, tunnel_e2e.rs,
//! v6_pmtu.rs), the path MTU a host's route cache learnt, and a UDP request
//! bigger than the MTU.

use std::{
    io::{Read, Write},
    net::{TcpStream, UdpSocket},
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use lb_userspace::harness::{
    lab::{Lab, vip_http},
    netns,
};

/// An upload of `size` bytes to the VIP on a new connection. The lab's
/// server drains a request body before it answers (405: it serves GET
/// only), so an answer means every byte arrived.
pub fn upload(size: usize) -> Result<()> {
    upload_to(vip_http(), size)
}

/// [`upload`] to `vip` (the lab's IPv6 VIP, say).
pub fn upload_to(vip: std::net::SocketAddr, size: usize) -> Result<()> {
    let mut s = TcpStream::connect_timeout(&vip, Duration::from_secs(3))
        .context("connecting to the VIP")?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    s.set_write_timeout(Some(Duration::from_secs(20)))?;
    write!(
        s,
        "POST / HTTP/1.1\r\nHost: www.foobar.com\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n"
    )?;
    s.write_all(&vec![b'u'; size])
        .context("uploading (stalled: packets too big vanished?)")?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)
        .context("reading the answer")?;
    ensure!(
        answer.starts_with("HTTP/1.1 405"),
        "unexpected answer {:?}",
        &answer[..answer.len().min(40)]
    );
    Ok(())
}

/// The path MTU of `to` from namespace `ns` as its route cache holds it.
pub fn cached_mtu(lab: &Lab, ns: &str, to: &str) -> Result<Option<u32>> {
    let route = lab.exec_ok(ns, &["ip", "route", "get", to])?;
    Ok(route
        .split_whitespace()
        .skip_while(|w| *w != "mtu")
        .nth(1)
        .and_then(|m| m.parse().ok()))
}

/// Drops every path MTU `ns` has learnt (the route cache's exceptions).
pub fn forget_path_mtus(ns: &str) -> Result<()> {
    netns::sysctl(ns, "net/ipv4/route/flush", "1")
}

/// [`forget_path_mtus`] for IPv6 destinations: IPv6's `route/flush` only
/// collects expired exceptions, so the cached routes are deleted.
pub fn forget_path_mtus6(lab: &Lab, ns: &str) -> Result<()> {
    lab.exec_ok(ns, &["ip", "-6", "route", "flush", "cache"])
        .map(drop)
}

/// Sends `payload` (a `size N …` request) and returns the answer that
/// carries it, retrying a few times since UDP may drop.
pub fn big_request(socket: &UdpSocket, payload: &str) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; 65536];
    for _ in 0..3 {
        socket.send(payload.as_bytes()).context("sending")?;
        while let Ok(len) = socket.recv(&mut buf) {
            let reply = &buf[..len];
            if reply
                .windows(payload.len())
                .any(|w| w == payload.as_bytes())
            {
                return Ok(reply.to_vec());
            }
        }
    }
    bail!(
        "no answer to a {}-byte request {:?}… (a datagram lost in fragments?)",
        payload.len(),
        &payload[..payload.len().min(20)]
    )
}
