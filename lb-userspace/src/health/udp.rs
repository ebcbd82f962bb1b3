//! `check = "udp"`: one datagram to the backend, one reply expected within
//! the timeout, matched against the check's `expect`. The socket is
//! connected, so an ICMP port unreachable from the backend's host comes back
//! as "connection refused" on the receive: the probe fails at once instead
//! of waiting for the timeout (a server process that died, its port closed).

#[cfg(test)]
use std::net::SocketAddrV4;
use std::{net::SocketAddr, time::Duration};

use tokio::{
    net::UdpSocket,
    time::{Instant, timeout_at},
};

use super::probe::{ProbeError, deadline_after, io_reason, is_local};
use crate::config::{UdpCheck, duration::show};

/// The largest reply read (a datagram's limit; the rest is cut).
const REPLY_CAP: usize = 65_536;

pub async fn probe(
    address: SocketAddr,
    source: Option<std::net::IpAddr>,
    check: &UdpCheck,
    timeout: Duration,
) -> Result<(), ProbeError> {
    let deadline = deadline_after(timeout);
    let reply = exchange(address, source, &check.send, deadline, timeout, |_| true).await?;
    check
        .expect
        .check(&reply)
        .map_err(|why| ProbeError::Backend(format!("{address}: {why}")))
}

/// Sends `payload` from a connected socket and returns the first reply
/// that `accept` takes (others are skipped) before `deadline`; an ICMP
/// port unreachable fails at once. Also the DNS check's UDP leg. The
/// socket is bound to `source` if given (full NAT's source address), else
/// to the wildcard.
pub(super) async fn exchange(
    address: SocketAddr,
    source: Option<std::net::IpAddr>,
    payload: &[u8],
    deadline: Instant,
    timeout: Duration,
    accept: impl Fn(&[u8]) -> bool,
) -> Result<Vec<u8>, ProbeError> {
    let fail = |step: &str, e: &std::io::Error| failure(step, address, e);
    let bind = source.map_or_else(|| unspecified_of(address), |s| SocketAddr::new(s, 0));
    let socket = UdpSocket::bind(bind)
        .await
        .map_err(|e| fail("bind for", &e))?;
    socket
        .connect(address)
        .await
        .map_err(|e| fail("connect", &e))?;
    exchange_on(&socket, address, payload, deadline, timeout, accept).await
}

/// The wildcard address (port 0) of `address`'s family: what a probe's
/// socket binds before it connects.
pub(super) fn unspecified_of(address: SocketAddr) -> SocketAddr {
    let ip: std::net::IpAddr = match address {
        SocketAddr::V4(_) => std::net::Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => std::net::Ipv6Addr::UNSPECIFIED.into(),
    };
    SocketAddr::new(ip, 0)
}

/// [`exchange`] on a socket already connected to `address` (a check
/// through the VIP makes its own: `through_vip.rs`).
pub(super) async fn exchange_on(
    socket: &UdpSocket,
    address: impl Into<SocketAddr>,
    payload: &[u8],
    deadline: Instant,
    timeout: Duration,
    accept: impl Fn(&[u8]) -> bool,
) -> Result<Vec<u8>, ProbeError> {
    let address = address.into();
    let fail = |step: &str, e: &std::io::Error| failure(step, address, e);
    socket
        .send(payload)
        .await
        .map_err(|e| fail("send to", &e))?;
    let mut reply = vec![0u8; REPLY_CAP];
    loop {
        let n = timeout_at(deadline, socket.recv(&mut reply))
            .await
            .map_err(|_| format!("no reply from {address} within {}", show(timeout)))?
            .map_err(|e| fail("reply from", &e))?;
        if accept(&reply[..n]) {
            reply.truncate(n);
            return Ok(reply);
        }
    }
}

/// A socket error of step `step`: a port unreachable is the backend's
/// (nothing listens), a shortage of the LB host's the agent's.
fn failure(step: &str, address: SocketAddr, e: &std::io::Error) -> ProbeError {
    if e.kind() == std::io::ErrorKind::ConnectionRefused {
        ProbeError::Backend(format!(
            "{step} {address}: ICMP port unreachable (nothing listens)"
        ))
    } else if is_local(e) {
        ProbeError::Agent(format!("{step} {address}: {}", io_reason(e)))
    } else {
        ProbeError::Backend(format!("{step} {address}: {}", io_reason(e)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::UdpExpect;

    /// The probe with a backend's failure as its text.
    async fn probe(
        address: impl Into<SocketAddr>,
        check: &UdpCheck,
        timeout: Duration,
    ) -> Result<(), String> {
        super::probe(address.into(), None, check, timeout)
            .await
            .map_err(ProbeError::expect_backend)
    }

    const T: Duration = Duration::from_millis(300);

    /// A UDP socket on loopback that never answers.
    async fn silent() -> (UdpSocket, SocketAddrV4) {
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        match socket.local_addr().expect("addr") {
            std::net::SocketAddr::V4(a) => (socket, a),
            other => panic!("{other}"),
        }
    }

    /// A UDP server on loopback answering `prefix` + the datagram.
    async fn answering(prefix: &'static str) -> SocketAddrV4 {
        let (socket, addr) = silent().await;
        tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            while let Ok((n, peer)) = socket.recv_from(&mut buf).await {
                let mut reply = prefix.as_bytes().to_vec();
                reply.extend_from_slice(&buf[..n]);
                let _ = socket.send_to(&reply, peer).await;
            }
        });
        addr
    }

    fn check(send: &str, expect: UdpExpect) -> UdpCheck {
        UdpCheck {
            send: send.as_bytes().to_vec(),
            expect,
        }
    }

    impl UdpCheck {
        fn with_send(mut self, send: &[u8]) -> UdpCheck {
            self.send = send.to_vec();
            self
        }
    }

    #[tokio::test]
    async fn a_matching_reply_passes_and_others_fail() {
        let addr = answering("web1 ").await;
        let ok = |e| check("health", e);
        assert_eq!(probe(addr, &ok(UdpExpect::Any), T).await, Ok(()));
        assert_eq!(
            probe(addr, &ok(UdpExpect::Prefix(b"web1 health".to_vec())), T).await,
            Ok(())
        );
        assert_eq!(
            probe(addr, &ok(UdpExpect::Regex(r"^web\d health$".into())), T).await,
            Ok(())
        );
        assert_eq!(
            probe(addr, &ok(UdpExpect::Prefix(b"web2".to_vec())), T).await,
            Err(format!(
                "{addr}: reply \"web1 health\" does not start with \"web2\""
            ))
        );
        assert_eq!(
            probe(addr, &ok(UdpExpect::Regex("^pong".into())), T).await,
            Err(format!(
                "{addr}: reply \"web1 health\" does not match /^pong/"
            ))
        );
    }

    #[tokio::test]
    async fn the_probe_speaks_ipv6() {
        let socket = UdpSocket::bind("[::1]:0").await.expect("bind [::1]:0");
        let addr = socket.local_addr().expect("addr");
        tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            while let Ok((n, peer)) = socket.recv_from(&mut buf).await {
                let mut reply = b"web1 ".to_vec();
                reply.extend_from_slice(&buf[..n]);
                let _ = socket.send_to(&reply, peer).await;
            }
        });
        let ok = check("health", UdpExpect::Prefix(b"web1 health".to_vec()));
        assert_eq!(probe(addr, &ok, T).await, Ok(()));
        let wrong = check("health", UdpExpect::Prefix(b"web2".to_vec()));
        assert_eq!(
            probe(addr, &wrong, T).await,
            Err(format!(
                "{addr}: reply \"web1 health\" does not start with \"web2\""
            ))
        );
    }

    #[tokio::test]
    async fn a_silent_port_times_out_and_a_closed_one_fails_at_once() {
        let (socket, addr) = silent().await;
        let start = std::time::Instant::now();
        assert_eq!(
            probe(addr, &check("x", UdpExpect::Any), T).await,
            Err(format!("no reply from {addr} within 300ms"))
        );
        assert!(start.elapsed() >= T);
        drop(socket);
        // Nothing bound: the kernel answers ICMP port unreachable.
        let start = std::time::Instant::now();
        let why = probe(addr, &check("x", UdpExpect::Any), Duration::from_secs(5)).await;
        assert_eq!(
            why,
            Err(format!(
                "reply from {addr}: ICMP port unreachable (nothing listens)"
            ))
        );
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "{:?}",
            start.elapsed()
        );
    }

    #[test]
    fn udp_checks_are_read_and_checked_like_the_rest_of_the_file() {
        use crate::config::{self, CheckKind};
        let site = |health: &str| {
            format!(
                "[dataplane]\ninterfaces = [\"lb-front\"]\n\n[[service]]\nname = \"dns\"\n\
                 vip = \"198.18.0.10:53\"\nprotocol = \"udp\"\nhealth = {{ check = \"udp\", {health} }}\n\
                 backends = [ {{ address = \"198.19.0.11:53\" }} ]\n"
            )
        };
        let parse = |h: &str| config::parse(&site(h), std::path::Path::new("c.toml"));
        let cfg = parse(r#"send-hex = "00 01 ff", expect = "ok""#).expect("valid");
        let Some(CheckKind::Udp(u)) = cfg.services[0].health.as_ref().map(|h| &h.check) else {
            panic!("not a udp check");
        };
        assert_eq!(
            u,
            &check("\0\u{1}", UdpExpect::Prefix(b"ok".to_vec())).with_send(&[0, 1, 0xff])
        );
        // Round trip through the live-change check (as hex).
        assert_eq!(
            config::check(&cfg, std::path::Path::new("x")).expect("check"),
            cfg
        );
        let regex = parse(r#"send = "ping", expect-regex = "^pong [0-9]+$""#).expect("valid");
        assert_eq!(
            config::check(&regex, std::path::Path::new("x")).expect("check"),
            regex
        );
        for (health, want) in [
            (
                r#"send = "a", send-hex = "61""#,
                "health.send-hex: give send or send-hex, not both",
            ),
            (r#"send-hex = "zz""#, "health.send-hex: not hex bytes"),
            (
                r#"expect = "a", expect-regex = "b""#,
                "health.expect: give one of",
            ),
            (
                r#"expect-regex = "(""#,
                "health.expect-regex: regex parse error",
            ),
            (
                r#"path = "/""#,
                "health.path: only valid with check = \"http\"",
            ),
        ] {
            let err = parse(health).expect_err(health).to_string();
            assert!(err.contains(want), "{health}: {err}");
        }
        let tcp = site("interval = \"1s\"").replace(
            r#"check = "udp", interval"#,
            r#"check = "tcp", expect = "x", interval"#,
        );
        let err = config::parse(&tcp, std::path::Path::new("c.toml"))
            .expect_err("expect on tcp")
            .to_string();
        assert!(
            err.contains("health.expect: only valid with check = \"udp\""),
            "{err}"
        );
    }
}
