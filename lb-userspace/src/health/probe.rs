//! One probe of a backend: TCP connect, or HTTP GET with an expected status
//! and body (MySQL and UDP in their own modules), all within the check's timeout; failures come back as short
//! reasons that name the step and the address.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
    time::{Instant, timeout_at},
};

use crate::config::{CheckKind, duration::show};

/// At most this much of an HTTP response is read.
const HTTP_RESPONSE_CAP: u64 = 64 * 1024;

/// Why a probe failed: the backend's fault, or the agent's own.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    /// The backend failed the probe: counts toward `fall`.
    #[error("{0}")]
    Backend(String),
    /// The agent could not run the probe (out of descriptors, socket
    /// buffers or memory): it says nothing about the backend, so it is
    /// logged and counted as the agent's error and never marks it down.
    #[error("agent error, not the backend's: {0}")]
    Agent(String),
}

impl From<String> for ProbeError {
    fn from(reason: String) -> Self {
        ProbeError::Backend(reason)
    }
}

#[cfg(test)]
impl ProbeError {
    /// A backend's failure as its text, for the probes' own tests, which
    /// never run the agent short of resources (an agent error panics).
    pub(crate) fn expect_backend(self) -> String {
        match self {
            ProbeError::Backend(why) => why,
            agent => panic!("{agent}"),
        }
    }
}

/// Runs one probe of `check` against `address` (IPv4 or IPv6), all of it
/// within `timeout`. The error is a short reason naming the step and the
/// address.
pub async fn probe(
    address: impl Into<SocketAddr>,
    check: &CheckKind,
    timeout: Duration,
) -> Result<(), ProbeError> {
    probe_from(address, None, check, timeout).await
}

/// [`probe`] from `source`: the probe's socket is bound to that address
/// (full NAT's source address, so a backend that admits only the LB's
/// translated flows admits its probes too) for every kind of check;
/// `None`: the kernel's choice (the route's preferred source).
pub async fn probe_from(
    address: impl Into<SocketAddr>,
    source: Option<IpAddr>,
    check: &CheckKind,
    timeout: Duration,
) -> Result<(), ProbeError> {
    let address = address.into();
    if let CheckKind::Mysql(login) = check {
        return super::mysql::probe_from(address, source, login, timeout).await;
    }
    if let CheckKind::Udp(udp) = check {
        return super::udp::probe(address, source, udp, timeout).await;
    }
    if let CheckKind::Dns(dns) = check {
        return super::dns::probe(address, source, dns, timeout).await;
    }
    if let CheckKind::Tls(tls) = check {
        return super::tls::probe(address, source, tls, timeout)
            .await
            .map(drop);
    }
    let deadline = deadline_after(timeout);
    let timed_out = || format!("timed out after {}", show(timeout));

    let stream = timeout_at(deadline, connect_from(address, source))
        .await
        .map_err(|_| format!("connect {address}: {}", timed_out()))?
        .map_err(|e| failure(format!("connect {address}{}", from(source)), &e))?;
    converse(stream, address, check, deadline, timeout).await
}

/// " from SOURCE" for a probe's error when it is bound to one.
pub(super) fn from(source: Option<IpAddr>) -> String {
    source.map(|s| format!(" from {s}")).unwrap_or_default()
}

/// A TCP connection to `address`, its socket bound to `source` (port 0:
/// an ephemeral port, outside full NAT's default range) if given.
pub(super) async fn connect_from(
    address: SocketAddr,
    source: Option<IpAddr>,
) -> std::io::Result<TcpStream> {
    let Some(source) = source else {
        return TcpStream::connect(address).await;
    };
    let socket = match address {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.bind(SocketAddr::new(source, 0))?;
    socket.connect(address).await
}

/// A TCP or HTTP check's part after the connection: nothing more for TCP;
/// for HTTP, a GET (`Host:` `address`'s IP) and its response checked, by
/// `deadline`. Checks through the VIP (`through_vip.rs`) connect their own
/// way and go on here.
pub(super) async fn converse(
    mut stream: TcpStream,
    address: impl Into<SocketAddr>,
    check: &CheckKind,
    deadline: Instant,
    timeout: Duration,
) -> Result<(), ProbeError> {
    let address = address.into();
    let timed_out = || format!("timed out after {}", show(timeout));
    let CheckKind::Http {
        path,
        expect_status,
        expect_body,
    } = check
    else {
        return Ok(());
    };

    let request = format!(
        "GET {path} HTTP/1.0\r\nHost: {}\r\nUser-Agent: lb-health\r\nConnection: close\r\n\r\n",
        host_header(address.ip())
    );
    timeout_at(deadline, stream.write_all(request.as_bytes()))
        .await
        .map_err(|_| format!("send request to {address}: {}", timed_out()))?
        .map_err(|e| failure(format!("send request to {address}"), &e))?;

    let mut response = Vec::new();
    timeout_at(
        deadline,
        (&mut stream)
            .take(HTTP_RESPONSE_CAP)
            .read_to_end(&mut response),
    )
    .await
    .map_err(|_| format!("read response from {address}: {}", timed_out()))?
    .map_err(|e| failure(format!("read response from {address}"), &e))?;

    check_response(&response, *expect_status, expect_body.as_deref())
        .map_err(|why| ProbeError::Backend(format!("{address}{path}: {why}")))
}

/// An HTTP `Host:` value for an address: an IPv6 literal in brackets
/// (RFC 3986's IP-literal), an IPv4 one as is.
fn host_header(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(a) => a.to_string(),
        IpAddr::V6(a) => format!("[{a}]"),
    }
}

/// An I/O error of probe step `step`: the agent's own when it is about
/// the agent's resources ([`is_local`]), else the backend's.
fn failure(step: String, e: &std::io::Error) -> ProbeError {
    let reason = format!("{step}: {}", io_reason(e));
    if is_local(e) {
        ProbeError::Agent(reason)
    } else {
        ProbeError::Backend(reason)
    }
}

/// Errors that come from this host running short, not from the backend:
/// out of file descriptors (process or system), socket buffers, memory,
/// or local ports to connect from.
pub fn is_local(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::EADDRNOTAVAIL)
    )
}

/// The longest a probe's deadline is put off, whatever its timeout: the
/// config allows an hour; a hand-built check must not overflow the clock.
const PROBE_DEADLINE_MAX: Duration = Duration::from_secs(24 * 3600);

/// `timeout` from now, clamped to [`PROBE_DEADLINE_MAX`].
pub(super) fn deadline_after(timeout: Duration) -> Instant {
    Instant::now() + timeout.min(PROBE_DEADLINE_MAX)
}

/// [`probe`], and what a passed probe learned: the expiry of a TLS
/// backend's certificate (seconds since the Unix epoch).
pub async fn probe_detailed(
    address: impl Into<SocketAddr>,
    source: Option<IpAddr>,
    check: &CheckKind,
    timeout: Duration,
) -> (Result<(), ProbeError>, Option<i64>) {
    let address = address.into();
    match check {
        CheckKind::Tls(tls) => match super::tls::probe(address, source, tls, timeout).await {
            Ok(expiry) => (Ok(()), expiry),
            Err(why) => (Err(why), None),
        },
        _ => (probe_from(address, source, check, timeout).await, None),
    }
}

/// Checks an HTTP response's status code and (optionally) body.
fn check_response(
    response: &[u8],
    expect_status: u16,
    expect_body: Option<&str>,
) -> Result<(), String> {
    if response.is_empty() {
        return Err("empty response".to_owned());
    }
    let text = String::from_utf8_lossy(response);
    let status_line = text.lines().next().unwrap_or_default();
    let mut words = status_line.split_whitespace();
    let status = match (words.next(), words.next()) {
        (Some(version), Some(code)) if version.starts_with("HTTP/") && code.len() == 3 => {
            code.parse::<u16>().ok()
        }
        _ => None,
    };
    let Some(status) = status else {
        let shown: String = status_line.chars().take(60).collect();
        return Err(format!("not an HTTP status line: {shown:?}"));
    };
    if status != expect_status {
        return Err(format!("status {status}, expected {expect_status}"));
    }
    if let Some(expected) = expect_body {
        let body = match text.find("\r\n\r\n") {
            Some(i) => &text[i + 4..],
            None => text.find("\n\n").map_or("", |i| &text[i + 2..]),
        };
        if !body.contains(expected) {
            return Err(format!("body does not contain {expected:?}"));
        }
    }
    Ok(())
}

/// An I/O error as a short lower-case reason: "connection refused" rather
/// than "Connection refused (os error 111)".
pub(super) fn io_reason(e: &std::io::Error) -> String {
    let text = e.to_string();
    let text = match text.find(" (os error ") {
        Some(i) => &text[..i],
        None => &text,
    };
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => format!("{:?}", e.kind()),
    }
}

/// Servers and checks the probe and engine tests share.
#[cfg(test)]
pub(super) mod test_support {
    use std::net::SocketAddrV4;

    use super::*;
    use tokio::{net::TcpListener, sync::mpsc, task::JoinHandle};

    pub async fn listener() -> (TcpListener, SocketAddrV4) {
        let listener = match TcpListener::bind("127.0.0.1:0").await {
            Ok(l) => l,
            Err(e) => panic!("bind: {e}"),
        };
        let addr = match listener.local_addr() {
            Ok(std::net::SocketAddr::V4(a)) => a,
            other => panic!("local_addr: {other:?}"),
        };
        (listener, addr)
    }

    pub async fn closed_port() -> SocketAddrV4 {
        let (l, addr) = listener().await;
        drop(l);
        addr
    }

    /// Answers every connection with `response` after reading the request
    /// head; the requests are sent on the returned channel.
    pub fn serve(
        listener: TcpListener,
        response: &'static str,
    ) -> (JoinHandle<()>, mpsc::UnboundedReceiver<String>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !request.ends_with(b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&buf[..n]),
                        }
                    }
                    let _ = tx.send(String::from_utf8_lossy(&request).into_owned());
                    let _ = stream.write_all(response.as_bytes()).await;
                });
            }
        });
        (task, rx)
    }

    pub const OK_WEB1: &str = "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nweb1\n";

    pub fn http(path: &str, expect_status: u16, expect_body: Option<&str>) -> CheckKind {
        CheckKind::Http {
            path: path.to_owned(),
            expect_status,
            expect_body: expect_body.map(str::to_owned),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{test_support::*, *};
    use std::time::Instant as StdInstant;

    const T: Duration = Duration::from_millis(500);

    /// [`probe`], its error as the text the status shows.
    async fn probe_text(
        address: impl Into<SocketAddr>,
        check: &CheckKind,
        timeout: Duration,
    ) -> Result<(), String> {
        probe(address, check, timeout)
            .await
            .map_err(|e| e.to_string())
    }

    /// A TCP listener on the IPv6 loopback.
    async fn listener6() -> (tokio::net::TcpListener, SocketAddr) {
        let listener = tokio::net::TcpListener::bind("[::1]:0")
            .await
            .expect("bind [::1]:0 (IPv6 on lo)");
        let addr = listener.local_addr().expect("local_addr");
        (listener, addr)
    }

    #[tokio::test]
    async fn tcp_and_http_probes_speak_ipv6() {
        let (listener, addr) = listener6().await;
        let (_task, mut requests) = serve(listener, OK_WEB1);
        probe_text(addr, &CheckKind::Tcp, T)
            .await
            .expect("tcp over IPv6");
        probe_text(addr, &http("/", 200, Some("web1")), T)
            .await
            .expect("http over IPv6");
        // The Host header carries the IPv6 literal in brackets (RFC 3986).
        let request = requests.recv().await.expect("a request");
        assert!(request.contains("Host: [::1]\r\n"), "{request}");
        let why = probe_text(addr, &http("/", 204, None), T)
            .await
            .expect_err("wrong status");
        assert_eq!(why, format!("{addr}/: status 200, expected 204"));

        let (closed, addr) = listener6().await;
        drop(closed);
        let why = probe_text(addr, &CheckKind::Tcp, T)
            .await
            .expect_err("closed port");
        assert_eq!(why, format!("connect {addr}: connection refused"));
        assert!(why.starts_with("connect [::1]:"), "{why}");
    }

    #[test]
    fn running_short_is_the_agents_error_not_the_backends() {
        for errno in [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM] {
            let e = std::io::Error::from_raw_os_error(errno);
            let got = failure("connect 198.19.0.11:80".to_owned(), &e);
            assert!(matches!(got, ProbeError::Agent(_)), "{errno}: {got:?}");
            assert!(
                got.to_string()
                    .starts_with("agent error, not the backend's: connect")
            );
        }
        assert_eq!(
            failure(
                "connect 198.19.0.11:80".to_owned(),
                &std::io::Error::from_raw_os_error(libc::EMFILE)
            )
            .to_string(),
            "agent error, not the backend's: connect 198.19.0.11:80: too many open files"
        );
        for errno in [
            libc::ECONNREFUSED,
            libc::EHOSTUNREACH,
            libc::ECONNRESET,
            libc::ETIMEDOUT,
        ] {
            let e = std::io::Error::from_raw_os_error(errno);
            let got = failure("connect 198.19.0.11:80".to_owned(), &e);
            assert!(matches!(got, ProbeError::Backend(_)), "{errno}: {got:?}");
        }
    }

    #[tokio::test]
    async fn tcp_check_passes_on_a_listening_port() {
        let (_listener, addr) = listener().await;
        assert_eq!(probe_text(addr, &CheckKind::Tcp, T).await, Ok(()));
    }

    #[tokio::test]
    async fn tcp_check_fails_on_a_closed_port() {
        let addr = closed_port().await;
        let why = probe_text(addr, &CheckKind::Tcp, T).await.err();
        assert_eq!(why, Some(format!("connect {addr}: connection refused")));
    }

    #[tokio::test]
    async fn http_check_passes_on_expected_status_and_body() {
        let (l, addr) = listener().await;
        let (_server, mut requests) = serve(l, OK_WEB1);
        assert_eq!(
            probe_text(addr, &http("/healthz", 200, Some("web1")), T).await,
            Ok(())
        );
        assert_eq!(
            requests.recv().await,
            Some(format!(
                "GET /healthz HTTP/1.0\r\nHost: {}\r\nUser-Agent: lb-health\r\nConnection: close\r\n\r\n",
                addr.ip()
            ))
        );
        assert_eq!(probe_text(addr, &http("/", 200, None), T).await, Ok(()));
    }

    #[tokio::test]
    async fn http_check_fails_when_body_lacks_the_expected_text() {
        let (l, addr) = listener().await;
        let (_server, _) = serve(l, OK_WEB1);
        let why = probe_text(addr, &http("/", 200, Some("nope")), T)
            .await
            .err();
        assert_eq!(
            why,
            Some(format!("{addr}/: body does not contain \"nope\""))
        );
    }

    #[tokio::test]
    async fn http_check_fails_on_wrong_status() {
        let (l, addr) = listener().await;
        let (_server, _) = serve(l, "HTTP/1.1 503 Service Unavailable\r\n\r\nweb1");
        let why = probe_text(addr, &http("/", 200, None), T).await.err();
        assert_eq!(why, Some(format!("{addr}/: status 503, expected 200")));
        // An expected non-200 status passes.
        assert_eq!(probe_text(addr, &http("/", 503, None), T).await, Ok(()));
    }

    #[tokio::test]
    async fn http_check_fails_on_garbage_and_on_closed_ports() {
        let (l, addr) = listener().await;
        let (_server, _) = serve(l, "SSH-2.0-OpenSSH\r\n");
        let why = probe_text(addr, &http("/", 200, None), T)
            .await
            .err()
            .unwrap_or_default();
        assert!(
            why.contains("not an HTTP status line: \"SSH-2.0-OpenSSH\""),
            "{why}"
        );

        let addr = closed_port().await;
        let why = probe_text(addr, &http("/", 200, None), T).await.err();
        assert_eq!(why, Some(format!("connect {addr}: connection refused")));
    }

    #[tokio::test]
    async fn http_check_times_out_on_a_silent_server() {
        let (l, addr) = listener().await;
        // Accepts and holds connections, never answers.
        let _server = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = l.accept().await {
                held.push(stream);
            }
        });
        let start = StdInstant::now();
        let why = probe_text(addr, &http("/", 200, None), Duration::from_millis(200))
            .await
            .err();
        let took = start.elapsed();
        assert_eq!(
            why,
            Some(format!("read response from {addr}: timed out after 200ms"))
        );
        assert!(
            took >= Duration::from_millis(200) && took < Duration::from_secs(1),
            "{took:?}"
        );
    }

    #[test]
    fn responses_are_parsed() {
        assert_eq!(
            check_response(b"HTTP/1.1 200 OK\n\nbody", 200, Some("body")),
            Ok(())
        );
        assert_eq!(
            check_response(b"HTTP/1.1 200 OK\r\n\r\n", 200, Some("x")),
            Err("body does not contain \"x\"".to_owned())
        );
        // The expected text in a header does not count.
        assert!(check_response(b"HTTP/1.1 200 OK\r\nX: web1\r\n\r\n", 200, Some("web1")).is_err());
        assert_eq!(
            check_response(b"", 200, None),
            Err("empty response".to_owned())
        );
        assert!(check_response(b"HTTP/1.1 2000 OK\r\n\r\n", 200, None).is_err());
    }

    #[test]
    fn io_reasons_are_short() {
        let e = std::io::Error::from_raw_os_error(libc::ECONNREFUSED);
        assert_eq!(io_reason(&e), "connection refused");
        assert_eq!(show(Duration::from_millis(1500)), "1500ms");
        assert_eq!(show(Duration::from_secs(2)), "2s");
    }
}
