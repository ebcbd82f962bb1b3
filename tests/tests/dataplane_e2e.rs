//! End-to-end tests of data-plane rules with the real agent in the lab:
//! a client that reuses source ports must never reach a backend that left
//! the ring (issue 8, item 8).
//!
//! Needs root and the `lb` binary in `LB_BIN` (`cargo xtask test` sets both).

use std::{
    io::{Read, Write},
    net::{SocketAddrV4, TcpStream},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use lb_tests::{lb_bin, unique_prefix};
use lb_userspace::{
    config::Forwarding,
    control::{self, BackendChange, Request},
    harness::{
        lab::{CLIENT_FRONT, HTTP_PORT, Lab, VIP, WEB_NAMES, lab_config},
        netns::in_netns,
    },
};

/// The client's fixed source ports: a small set it cycles over, as a client
/// with a tiny ephemeral range (or a NAT in front of many clients) does.
const PORTS: std::ops::Range<u16> = 41000..41012;

fn prefix() -> String {
    unique_prefix("lbd")
}

fn check(what: &str, rc: libc::c_int) -> Result<()> {
    if rc < 0 {
        bail!("{what}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

fn setsockopt<T>(
    fd: &impl AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: &T,
) -> Result<()> {
    // SAFETY: `value` is a valid T for the option, of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (value as *const T).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    };
    check("setsockopt", rc)
}

fn sockaddr(addr: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(addr.ip().octets()),
        },
        sin_zero: [0; 8],
    }
}

/// A TCP connection to the VIP from the client's fixed `port` (SO_REUSEADDR,
/// so the port is reusable at once), with a 3 s connect timeout.
fn connect_from(port: u16) -> Result<TcpStream> {
    // SAFETY: plain socket(2); the fd is owned right away.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    check("socket", raw)?;
    // SAFETY: a fresh fd nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    setsockopt(
        &fd,
        libc::SOL_SOCKET,
        libc::SO_REUSEADDR,
        &1 as &libc::c_int,
    )?;
    let timeout = libc::timeval {
        tv_sec: 3,
        tv_usec: 0,
    };
    // SO_SNDTIMEO bounds a blocking connect(2) too.
    setsockopt(&fd, libc::SOL_SOCKET, libc::SO_SNDTIMEO, &timeout)?;
    let local = sockaddr(SocketAddrV4::new(CLIENT_FRONT, port));
    let remote = sockaddr(SocketAddrV4::new(VIP, HTTP_PORT));
    let len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: valid sockaddr_in of the given length.
    check("bind", unsafe {
        libc::bind(fd.as_raw_fd(), (&raw const local).cast(), len)
    })
    .with_context(|| format!("binding {CLIENT_FRONT}:{port}"))?;
    // EADDRNOTAVAIL is the client's own kernel refusing the local tuple
    // for a moment (seen once under load), not an answer from the LB: retry
    // it a few times. Refusals and timeouts, the LB's answers, are not.
    for attempt in 0.. {
        // SAFETY: as above.
        let rc = unsafe { libc::connect(fd.as_raw_fd(), (&raw const remote).cast(), len) };
        let busy =
            rc < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EADDRNOTAVAIL);
        if !busy || attempt == 4 {
            check("connect", rc)?;
            break;
        }
        thread::sleep(Duration::from_millis(50));
    }
    Ok(TcpStream::from(fd))
}

/// `GET /` from the fixed source `port`: the name of the server that
/// answered. The connection ends with an RST (SO_LINGER 0), so the client
/// keeps no TIME_WAIT and may reuse the port at once; the LB's conntrack
/// entry for the tuple stays, which is the point.
fn get_from(port: u16) -> Result<String> {
    let mut stream = connect_from(port).with_context(|| format!("connecting from :{port}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET / HTTP/1.1\r\nHost: {VIP}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .with_context(|| format!("reading the response on :{port}"))?;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    setsockopt(&stream, libc::SOL_SOCKET, libc::SO_LINGER, &linger)?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("no HTTP response on :{port}: {text:?}"))?;
    ensure!(head.starts_with("HTTP/1.1 200"), "on :{port}: {head}");
    Ok(body.trim_end().to_owned())
}

/// One `GET /` from every port in [`PORTS`]: (port, server or error).
fn round(lab: &Lab) -> Result<Vec<(u16, Result<String, String>)>> {
    in_netns(&lab.client_ns(), || {
        PORTS
            .map(|p| (p, get_from(p).map_err(|e| format!("{e:#}"))))
            .collect()
    })
}

fn ask(lab: &Lab, req: &Request) -> Result<control::Response> {
    let r = control::request(&lab.agent_socket(), req)?;
    ensure!(r.ok, "{req:?}: {}", r.message);
    Ok(r)
}

/// Waits until the agent reports `backend` of www out of the ring.
fn wait_out_of_ring(lab: &Lab, backend: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let status = ask(lab, &Request::Status)?.status.context("no status")?;
        let b = status.services[0]
            .backends
            .iter()
            .find(|b| b.name == backend)
            .with_context(|| format!("no backend {backend}"))?;
        if !b.in_ring {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{backend} still in the ring after {timeout:?}: {b:?}");
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Pins every port's tuple to a backend (all three get some), then takes
/// web1 out of the ring with `out`, kills it, and reuses every port twice.
fn reused_ports_avoid_web1(lab: &mut Lab, out: impl FnOnce(&mut Lab) -> Result<()>) -> Result<()> {
    let first = round(lab)?;
    let pinned: Vec<u16> = first
        .iter()
        .filter(|(_, r)| r.as_deref() == Ok(WEB_NAMES[0]))
        .map(|(p, _)| *p)
        .collect();
    ensure!(
        first.iter().all(|(_, r)| r.is_ok()) && !pinned.is_empty(),
        "before the change every port must connect and some reach web1: {first:?}"
    );
    out(lab)?;
    for again in 0..2 {
        let results = round(lab)?;
        let bad: Vec<_> = results
            .iter()
            .filter(|(_, r)| r.as_deref().map_or(true, |s| s == WEB_NAMES[0]))
            .collect();
        ensure!(
            bad.is_empty(),
            "round {again} after web1 left the ring: ports {pinned:?} were pinned to web1; \
             these connections failed or reached web1: {bad:?}"
        );
    }
    Ok(())
}

/// Drain (keep-flows) takes web1 out of the ring; web1 is then killed. New
/// connections from ports whose old tuple is still pinned to web1 must be
/// scheduled to web2/web3, in NAT and in DSR.
#[test]
fn reused_source_ports_skip_a_drained_backend() -> Result<()> {
    // Both modes run even when the first fails, so a failure names each.
    let failures: Vec<String> = [Forwarding::Nat, Forwarding::Dsr]
        .into_iter()
        .filter_map(|mode| {
            drained_backend_in(mode)
                .with_context(|| format!("{} mode", mode.name()))
                .err()
                .map(|e| format!("{e:#}"))
        })
        .collect();
    ensure!(failures.is_empty(), "{}", failures.join("\n\n"));
    Ok(())
}

fn drained_backend_in(mode: Forwarding) -> Result<()> {
    let mut lab = Lab::up(&prefix(), &lb_bin())?;
    lab.set_mode(mode)?;
    let agent = lab.start_agent(&lab_config(mode))?;
    reused_ports_avoid_web1(&mut lab, |lab| {
        ask(
            lab,
            &Request::Backend(BackendChange::Drain {
                service: "www".into(),
                backend: WEB_NAMES[0].into(),
                wait: false,
                timeout: 0,
            }),
        )?;
        wait_out_of_ring(lab, WEB_NAMES[0], Duration::from_secs(5))?;
        lab.stop_web(1)
    })
    .with_context(|| format!("agent stderr:\n{}", agent.log_text()))?;
    agent.stop()
}

/// The health checker marks the killed web1 down (on-backend-down =
/// keep-flows, the default): reused ports must not reach it either.
#[test]
fn reused_source_ports_skip_a_backend_down_by_health_check() -> Result<()> {
    let mut lab = Lab::up(&prefix(), &lb_bin())?;
    lab.set_mode(Forwarding::Nat)?;
    let backends = (1..=3)
        .map(|n| {
            format!(
                "{{ name = \"web{n}\", address = \"{}:80\" }}",
                lb_userspace::harness::lab::web_addr(n)
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    let config = format!(
        "[dataplane]\ninterfaces = [\"lb-front\", \"lb-back\"]\nforwarding = \"nat\"\n\n\
         [[service]]\nname = \"www\"\nvip = \"{VIP}:80\"\nscheduler = \"round-robin\"\n\
         health = {{ check = \"http\", path = \"/\", interval = \"200ms\", timeout = \"200ms\", rise = 2, fall = 2 }}\n\
         backends = [ {backends} ]\n"
    );
    let agent = lab.start_agent(&config)?;
    reused_ports_avoid_web1(&mut lab, |lab| {
        lab.stop_web(1)?;
        wait_out_of_ring(lab, WEB_NAMES[0], Duration::from_secs(10))
    })
    .with_context(|| format!("agent stderr:\n{}", agent.log_text()))?;
    agent.stop()
}

/// Issue 20 item 3: a NAT reply never depends on the LB's neighbour cache
/// being warm. With the LB's neighbour timers lowered (entries go stale
/// after about a second; `gc_thresh*` are global, outside any namespace, so
/// the test does not touch them and deletes the entry itself, as the
/// garbage collector does past `gc_thresh1`) the LB's neighbour entry for
/// the client is deleted mid-connection, three times. Each time the
/// keep-alive connection's next request succeeds (an established flow keeps
/// the next hop it resolved), and so does a new connection, whose SYN-ACK
/// finds no MAC: it is dropped and its next hop reported, the agent has the
/// kernel resolve it, and the backend's retransmitted SYN-ACK gets through.
/// Before, the reply went to the LB's kernel, which dropped it as a martian
/// (its own VIP as the source) and never resolved the client: new
/// connections failed until the client happened to ARP the LB.
#[test]
fn nat_connections_carry_on_when_the_lbs_neighbour_entry_for_the_client_goes() -> Result<()> {
    use lb_userspace::harness::lab::vip_http;
    let lab = Lab::up(&prefix(), &lb_bin())?;
    lab.set_mode(Forwarding::Nat)?;
    let agent = lab.start_agent(&lab_config(Forwarding::Nat))?;
    let run = || -> Result<()> {
        let lb = lab.lb_ns();
        for knob in ["base_reachable_time_ms=1000", "gc_stale_time=1"] {
            let key = format!("net.ipv4.neigh.lb-front.{knob}");
            lab.exec_ok(&lb, &["sysctl", "-w", &key])?;
        }
        let client = CLIENT_FRONT.to_string();
        let neighbour = || lab.exec_ok(&lb, &["ip", "neigh", "show", &client, "dev", "lb-front"]);
        lb_tests::connections_carry_on_when_the_client_neighbour_goes(
            &lab,
            vip_http(),
            neighbour,
            || {
                lab.exec_ok(&lb, &["ip", "neigh", "del", &client, "dev", "lb-front"])
                    .map(drop)
            },
            |_| Ok(()),
        )
    };
    run().with_context(|| format!("agent stderr:\n{}", agent.log_text()))?;
    agent.stop()
}
