//! End-to-end tests of `lb trace` and `lb explain` (issue 13) on a lab with
//! a running agent: the trace shows the client's packets the data plane does
//! not forward, and `lb explain` names the backend a new connection then
//! really reaches, and the conntrack pin afterwards; the same over IPv6
//! (issue 24: IPv6 tuples, the IPv6 firewall, the IPv6 scheduler's
//! model). Needs root.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream, UdpSocket},
    os::fd::FromRawFd,
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use lb_tests::{ask, lb_bin, three_webs, unique_prefix};
use lb_userspace::{
    control::Request,
    harness::{lab::Lab, netns::in_netns},
    trace::Tracer,
};

fn lab() -> Result<Lab> {
    Lab::up(&unique_prefix("lbx"), &lb_bin())
}

/// A running `lb trace`: its stdout lines arrive on a channel.
struct TraceProcess {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl TraceProcess {
    /// Starts `lb trace --pin-dir <lab's> ARGS` and waits until it says the
    /// switch is on.
    fn start(lab: &Lab, args: &[&str]) -> Result<TraceProcess> {
        let pin_dir = lab.pin_dir().display().to_string();
        let mut child = Command::new(lb_bin())
            .args(["trace", "--pin-dir", &pin_dir])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawning lb trace")?;
        let stderr = child.stderr.take().context("stderr")?;
        let stdout = child.stdout.take().context("stdout")?;
        let (ready_tx, ready) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("lb trace: {line}");
                let _ = ready_tx.send(line);
            }
        });
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut trace = TraceProcess { child, lines };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match ready.recv_timeout(left) {
                Ok(line) if line.starts_with("lb: tracing") => return Ok(trace),
                Ok(_) => {}
                Err(_) => {
                    let _ = trace.child.kill();
                    let _ = trace.child.wait();
                    bail!("lb trace did not switch tracing on within 10 s");
                }
            }
        }
    }

    /// Waits for it to exit (killing it after `within`); its stdout lines.
    fn finish(mut self, within: Duration) -> Result<Vec<String>> {
        let deadline = Instant::now() + within;
        let status = loop {
            if let Some(status) = self.child.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                let got: Vec<String> = self.lines.try_iter().collect();
                bail!("lb trace still running after {within:?}; printed {got:?}");
            }
            thread::sleep(Duration::from_millis(20));
        };
        ensure!(status.success(), "lb trace exited with {status}");
        // The reader thread ends with the pipe.
        thread::sleep(Duration::from_millis(50));
        Ok(self.lines.try_iter().collect())
    }
}

/// The switch is off once `lb trace` has stopped.
fn assert_tracing_off(lab: &Lab) -> Result<()> {
    let conf = Tracer::open(&lab.pin_dir())?.conf()?;
    ensure!(conf.verdicts == 0, "TRACE_ON left at {conf:?}");
    Ok(())
}

#[test]
fn lb_trace_shows_the_clients_packets_that_are_not_forwarded() -> Result<()> {
    let lab = lab()?;
    let _agent = lab.start_agent(&three_webs())?;
    let trace = TraceProcess::start(&lab, &["--count", "2"])?;
    // A ping to the VIP (the kernel answers it), then UDP to a VIP port
    // without a service.
    lab.exec_ok(
        &lab.client_ns(),
        &["ping", "-c", "1", "-W", "2", "198.18.0.10"],
    )?;
    let sport = in_netns(&lab.client_ns(), || -> Result<u16> {
        let socket = UdpSocket::bind("198.18.0.2:0")?;
        socket.send_to(b"anyone?", "198.18.0.10:9")?;
        Ok(socket.local_addr()?.port())
    })??;
    let lines = trace.finish(Duration::from_secs(10))?;
    eprintln!("{lines:#?}");
    ensure!(lines.len() == 2, "two events: {lines:?}");
    ensure!(
        lines[0].contains("pass_other_protocol 198.18.0.2 → 198.18.0.10/icmp service none"),
        "the ping: {lines:?}"
    );
    ensure!(
        lines[1].contains(&format!(
            "pass_no_service 198.18.0.2:{sport} → 198.18.0.10:9/udp service none"
        )),
        "the UDP datagram: {lines:?}"
    );
    assert_tracing_off(&lab)?;

    // Forwarded traffic produces no event; Ctrl-C stops it and switches
    // tracing off. JSON carries the same fields.
    let trace = TraceProcess::start(&lab, &["--json"])?;
    lb_tests::answers(&lab, 3)?;
    lab.exec_ok(
        &lab.client_ns(),
        &["ping", "-c", "1", "-W", "2", "198.18.0.10"],
    )?;
    thread::sleep(Duration::from_millis(300));
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(trace.child.id() as i32, libc::SIGINT) };
    let lines = trace.finish(Duration::from_secs(5))?;
    ensure!(
        lines.len() == 1,
        "only the ping, not the HTTP flows: {lines:?}"
    );
    ensure!(
        lines[0].contains("\"verdict\":\"pass_other_protocol\"")
            && lines[0].contains("\"saddr\":\"198.18.0.2\""),
        "{lines:?}"
    );
    assert_tracing_off(&lab)
}

/// A keep-alive connection from `local` (the client's address and a chosen
/// source port) to `to`, either family.
fn connect_from(local: SocketAddr, to: SocketAddr) -> Result<TcpStream> {
    let family = if local.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket calls on a descriptor we own; the sockaddrs are
    // fully initialised (zeroed storage, then the family's fields).
    unsafe {
        let fd = libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        ensure!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let stream = TcpStream::from_raw_fd(fd);
        let one: libc::c_int = 1;
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&raw const one).cast(),
            size_of::<libc::c_int>() as u32,
        );
        let sockaddr = |a: SocketAddr| -> (libc::sockaddr_storage, u32) {
            let mut ss: libc::sockaddr_storage = std::mem::zeroed();
            match a {
                SocketAddr::V4(a) => {
                    let sin = (&raw mut ss).cast::<libc::sockaddr_in>();
                    (*sin).sin_family = libc::AF_INET as u16;
                    (*sin).sin_port = a.port().to_be();
                    (*sin).sin_addr.s_addr = u32::from_ne_bytes(a.ip().octets());
                    (ss, size_of::<libc::sockaddr_in>() as u32)
                }
                SocketAddr::V6(a) => {
                    let sin6 = (&raw mut ss).cast::<libc::sockaddr_in6>();
                    (*sin6).sin6_family = libc::AF_INET6 as u16;
                    (*sin6).sin6_port = a.port().to_be();
                    (*sin6).sin6_addr.s6_addr = a.ip().octets();
                    (ss, size_of::<libc::sockaddr_in6>() as u32)
                }
            }
        };
        let (here, len) = sockaddr(local);
        if libc::bind(fd, (&raw const here).cast(), len) != 0 {
            bail!("bind {local}: {}", std::io::Error::last_os_error());
        }
        let (remote, len) = sockaddr(to);
        if libc::connect(fd, (&raw const remote).cast(), len) != 0 {
            bail!("connect {to}: {}", std::io::Error::last_os_error());
        }
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        Ok(stream)
    }
}

/// `GET /` on a keep-alive connection: the name of the server that answers.
fn who_answers(stream: &mut TcpStream) -> Result<String> {
    stream.write_all(b"GET / HTTP/1.1\r\nHost: vip\r\nConnection: keep-alive\r\n\r\n")?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut length = None;
    loop {
        let mut line = String::new();
        ensure!(reader.read_line(&mut line)? > 0, "closed in the head");
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            length = Some(v.trim().parse::<u64>()?);
        }
    }
    let mut body = String::new();
    reader
        .take(length.context("no Content-Length")?)
        .read_to_string(&mut body)?;
    Ok(body.trim_end().to_string())
}

/// The backend an explanation's round-robin line names ("→ web2 (").
fn round_robin_prediction(text: &str) -> Result<String> {
    let schedule = text
        .lines()
        .find(|l| l.starts_with("round robin:"))
        .context("a round robin line")?;
    named_after(schedule, " → ")
}

fn explain(lab: &Lab, client: &str, service: &str) -> Result<String> {
    let r = ask(
        lab,
        &Request::Explain {
            client: client.into(),
            service: service.into(),
        },
    )?;
    ensure!(r.ok, "explain {client} {service}: {}", r.message);
    eprintln!("$ lb explain {client} {service}\n{}", r.message);
    Ok(r.message)
}

/// The backend name after `prefix` in an explanation, e.g. "→ web2 (".
fn named_after(text: &str, prefix: &str) -> Result<String> {
    let rest = &text[text
        .find(prefix)
        .with_context(|| format!("no {prefix:?} in {text}"))?
        + prefix.len()..];
    Ok(rest
        .split_whitespace()
        .next()
        .context("a name")?
        .to_string())
}

#[test]
fn lb_explain_predicts_the_backend_and_then_names_the_pin() -> Result<()> {
    let lab = lab()?;
    let _agent = lab.start_agent(&three_webs())?;
    // Move the round-robin counter off its start, so the prediction is read
    // from the map, not assumed.
    lb_tests::answers(&lab, 2)?;
    let (port, client) = (41234u16, "198.18.0.2:41234");
    let before = explain(&lab, client, "198.18.0.10:80/tcp")?;
    ensure!(before.contains("service www"), "{before}");
    ensure!(before.contains("no conntrack entry"), "{before}");
    ensure!(before.contains("round robin"), "{before}");
    ensure!(before.contains("not a promise for this tuple"), "{before}");
    let predicted = round_robin_prediction(&before)?;

    let answered = in_netns(&lab.client_ns(), || -> Result<String> {
        let mut conn = connect_from(
            SocketAddr::new([198, 18, 0, 2].into(), port),
            "198.18.0.10:80".parse()?,
        )?;
        let first = who_answers(&mut conn)?;
        // Keep the flow open while the agent explains it again.
        let again = explain(&lab, client, "198.18.0.10:80/tcp")?;
        ensure!(
            again.contains(&format!("pinned by conntrack to {first} (")),
            "{again}"
        );
        ensure!(again.contains("stays on it"), "{again}");
        // Just active: its age against the tcp timeout, not expired.
        ensure!(again.contains("timeout 900 s (tcp)"), "{again}");
        ensure!(!again.contains("expired"), "{again}");
        ensure!(who_answers(&mut conn)? == first, "a keep-alive flow moved");
        Ok(first)
    })??;
    ensure!(
        answered == predicted,
        "explain predicted {predicted}, {answered} answered"
    );

    // No service, and bad arguments named.
    let none = explain(&lab, "198.18.0.2:5000", "198.18.0.10:9/udp")?;
    ensure!(
        none.contains("no service on 198.18.0.10:9/udp") && none.contains("pass_no_service"),
        "{none}"
    );
    let bad = ask(
        &lab,
        &Request::Explain {
            client: "198.18.0.2:5000".into(),
            service: "198.18.0.10:80/sctp".into(),
        },
    )?;
    ensure!(
        !bad.ok && bad.message.contains("bad protocol \"sctp\""),
        "{bad:?}"
    );
    let out = Command::new(lb_bin())
        .args(["explain", "198.18.0.2", "198.18.0.10:80/tcp", "--socket"])
        .arg(lab.agent_socket())
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && stderr.contains("bad client \"198.18.0.2\""),
        "{stderr}"
    );
    Ok(())
}

const CLIENT6: &str = "2001:db8:18::2";
/// The client's second IPv6 address, denied by the firewall.
const DENIED6: &str = "2001:db8:18::3";

/// The lab for IPv6 (NAT66): the LB forwards IPv6 and the client has a
/// second address on eth0 (the LB resolves both: `NEIGH_WANTED6`).
fn lab6() -> Result<Lab> {
    lb_tests::lab6::up_nat_with_second_address("lbx6", DENIED6)
}

/// The lab's web service, `www6` (round robin over web1..3's IPv6
/// addresses) on the VIP6, and the client's second address denied.
fn config6() -> String {
    lb_tests::lab6::three_webs_and_www6(&format!("\n[firewall]\ndeny = [\"{DENIED6}/128\"]\n"))
}

/// A connection from the denied address to the VIP6's port 80 (curl,
/// giving up after a second: the firewall drops its SYN).
fn syn_from_denied(lab: &Lab) -> Result<()> {
    let url = format!("http://[{}]:80/", lb_userspace::harness::lab::VIP6);
    let out = lb_userspace::harness::netns::ns_output(
        &lab.client_ns(),
        &[
            "curl",
            "-sS",
            "-g",
            "--connect-timeout",
            "1",
            "--interface",
            DENIED6,
            &url,
        ],
    )?;
    ensure!(!out.status.success(), "a denied source connected");
    Ok(())
}

#[test]
fn lb_trace_and_lb_explain_over_ipv6() -> Result<()> {
    use lb_userspace::harness::lab::{VIP6, vip6_http};
    let lab = lab6()?;
    let _agent = lab.start_agent(&config6())?;
    let vip6 = format!("[{VIP6}]");

    // `lb trace`: UDP to a VIP6 port without a service, then a SYN from
    // the denied address: two events with their IPv6 tuples.
    let trace = TraceProcess::start(&lab, &["--count", "2"])?;
    let sport = in_netns(&lab.client_ns(), || -> Result<u16> {
        let socket = UdpSocket::bind(format!("[{CLIENT6}]:0"))?;
        socket.send_to(b"anyone?", format!("{vip6}:9"))?;
        Ok(socket.local_addr()?.port())
    })??;
    syn_from_denied(&lab)?;
    let lines = trace.finish(Duration::from_secs(10))?;
    eprintln!("{lines:#?}");
    ensure!(lines.len() == 2, "two events: {lines:?}");
    ensure!(
        lines[0].contains(&format!(
            "pass_no_service [{CLIENT6}]:{sport} → {vip6}:9/udp service none"
        )),
        "the UDP datagram: {lines:?}"
    );
    ensure!(
        lines[1].contains(&format!("drop_firewall_deny [{DENIED6}]:"))
            && lines[1].contains(&format!("→ {vip6}:80/tcp service ")),
        "the denied SYN: {lines:?}"
    );
    ensure!(!lines[1].contains("service none"), "www6's id: {lines:?}");
    assert_tracing_off(&lab)?;

    // The verdict filter over IPv6: only drop_firewall_deny, as JSON.
    let trace = TraceProcess::start(
        &lab,
        &["--json", "--count", "1", "--verdict", "drop_firewall_deny"],
    )?;
    in_netns(&lab.client_ns(), || -> Result<()> {
        let socket = UdpSocket::bind(format!("[{CLIENT6}]:0"))?;
        socket.send_to(b"not traced", format!("{vip6}:9"))?;
        Ok(())
    })??;
    syn_from_denied(&lab)?;
    let lines = trace.finish(Duration::from_secs(10))?;
    ensure!(lines.len() == 1, "{lines:?}");
    ensure!(
        lines[0].contains("\"verdict\":\"drop_firewall_deny\"")
            && lines[0].contains("\"family\":\"ipv6\"")
            && lines[0].contains(&format!("\"saddr\":\"{DENIED6}\"")),
        "{lines:?}"
    );
    assert_tracing_off(&lab)?;

    // `lb explain` of a new flow from the denied address names the rule.
    let denied = explain(
        &lab,
        &format!("[{DENIED6}]:5000"),
        &format!("{vip6}:80/tcp"),
    )?;
    ensure!(
        denied.contains(&format!("deny {DENIED6}/128")) && denied.contains("drop_firewall_deny"),
        "{denied}"
    );

    // Move the round-robin counter off its start, then predict a new
    // flow's backend and open it: the web that answers is the predicted
    // one, and explain then names the flow's entry. (From CLIENT6 by
    // name: the kernel could pick the denied address as the source.)
    in_netns(&lab.client_ns(), || -> Result<()> {
        for _ in 0..2 {
            let mut conn = connect_from(SocketAddr::new(CLIENT6.parse()?, 0), vip6_http())?;
            who_answers(&mut conn)?;
        }
        Ok(())
    })??;
    let (port, client) = (41234u16, format!("[{CLIENT6}]:41234"));
    let service = format!("{vip6}:80/tcp");
    let before = explain(&lab, &client, &service)?;
    ensure!(before.contains("service www6"), "{before}");
    ensure!(
        before.contains("no entry in IPv6's flow tables"),
        "{before}"
    );
    ensure!(before.contains("not a promise for this tuple"), "{before}");
    let predicted = round_robin_prediction(&before)?;
    let answered = in_netns(&lab.client_ns(), || -> Result<String> {
        let mut conn = connect_from(
            SocketAddr::new(CLIENT6.parse()?, port),
            format!("{vip6}:80").parse()?,
        )?;
        let first = who_answers(&mut conn)?;
        let again = explain(&lab, &client, &service)?;
        ensure!(
            again.contains("established in IPv6's flow table")
                && again.contains(&format!("pinned to {first} (")),
            "{again}"
        );
        // Its age, read signed (a flow just stamped is idle 0 or so, never
        // 2^32 - 1 ticks), against the tcp timeout.
        ensure!(
            again.contains("timeout 900 s (tcp)") && !again.contains("expired"),
            "{again}"
        );
        ensure!(who_answers(&mut conn)? == first, "a keep-alive flow moved");
        Ok(first)
    })??;
    ensure!(
        answered == predicted,
        "explain predicted {predicted}, {answered} answered"
    );
    Ok(())
}
