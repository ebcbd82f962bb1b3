//! Minimal HTTP/1.1 and UDP clients for the demo and the tests. They use the
//! calling thread's namespace: call them inside [`crate::harness::netns::in_netns`].

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket},
    time::Duration,
};

use anyhow::{Context, bail};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const IO_TIMEOUT: Duration = Duration::from_secs(5);
const UDP_TIMEOUT: Duration = Duration::from_secs(1);
const UDP_TRIES: usize = 3;
const MAX_BODY: u64 = 1 << 30;

/// A response: status and body (`Content-Length` bytes of it).
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The body as text without the trailing newline: for `GET /` the name
    /// of the server that answered.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).trim_end().to_owned()
    }
}

/// One keep-alive HTTP connection: several requests, one TCP flow.
pub struct HttpConn {
    addr: SocketAddr,
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl HttpConn {
    pub fn connect(addr: SocketAddr) -> anyhow::Result<HttpConn> {
        let stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)
            .with_context(|| format!("connecting to {addr}"))?;
        Self::over(stream, addr)
    }

    /// [`HttpConn::connect`] from the local address `from` (one of the
    /// client's addresses), so one host can be several clients.
    pub fn connect_from(from: Ipv4Addr, addr: SocketAddrV4) -> anyhow::Result<HttpConn> {
        Self::connect_bound(SocketAddrV4::new(from, 0), addr, false)
    }

    /// [`HttpConn::connect`] from the local address and port `from`, with
    /// `SO_REUSEADDR`: several connections from one client port to
    /// different services at once (each its own 4-tuple).
    pub fn connect_from_port(from: SocketAddrV4, addr: SocketAddrV4) -> anyhow::Result<HttpConn> {
        Self::connect_bound(from, addr, true)
    }

    fn connect_bound(
        from: SocketAddrV4,
        addr: SocketAddrV4,
        reuse: bool,
    ) -> anyhow::Result<HttpConn> {
        use rustix::net::{AddressFamily, SocketType, bind, connect, socket, sockopt};
        let fd = socket(AddressFamily::INET, SocketType::STREAM, None).context("socket")?;
        if reuse {
            sockopt::set_socket_reuseaddr(&fd, true).context("SO_REUSEADDR")?;
        }
        bind(&fd, &from).with_context(|| format!("binding {from}"))?;
        // A blocking connect gives up after the send timeout.
        sockopt::set_socket_timeout(&fd, sockopt::Timeout::Send, Some(CONNECT_TIMEOUT))
            .context("setting the connect timeout")?;
        connect(&fd, &addr).with_context(|| format!("connecting from {from} to {addr}"))?;
        Self::over(TcpStream::from(fd), SocketAddr::V4(addr))
    }

    fn over(stream: TcpStream, addr: SocketAddr) -> anyhow::Result<HttpConn> {
        stream
            .set_read_timeout(Some(IO_TIMEOUT))
            .context("setting read timeout")?;
        stream
            .set_write_timeout(Some(IO_TIMEOUT))
            .context("setting write timeout")?;
        let _ = stream.set_nodelay(true);
        let reader = BufReader::new(stream.try_clone().context("cloning stream")?);
        Ok(HttpConn {
            addr,
            reader,
            writer: stream,
        })
    }

    /// The connection's local address: the client's address and port, the
    /// flow's source as the LB sees it.
    pub fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        self.writer
            .local_addr()
            .context("reading the local address")
    }

    /// `GET path`, keeping the connection open.
    pub fn get(&mut self, path: &str) -> anyhow::Result<HttpResponse> {
        self.request(path, "keep-alive")
    }

    fn request(&mut self, path: &str, connection: &str) -> anyhow::Result<HttpResponse> {
        let addr = self.addr;
        write!(
            self.writer,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: {connection}\r\n\r\n"
        )
        .with_context(|| format!("sending GET {path} to {addr}"))?;
        read_response(&mut self.reader)
            .with_context(|| format!("reading the response to GET {path} from {addr}"))
    }
}

/// `GET path` on a new connection (a new flow), closed afterwards.
pub fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<HttpResponse> {
    HttpConn::connect(addr)?.request(path, "close")
}

/// [`http_get`] from the client's local address `from`.
pub fn http_get_from(
    from: Ipv4Addr,
    addr: SocketAddrV4,
    path: &str,
) -> anyhow::Result<HttpResponse> {
    HttpConn::connect_from(from, addr)?.request(path, "close")
}

fn read_response(reader: &mut impl BufRead) -> anyhow::Result<HttpResponse> {
    let mut status_line = String::new();
    if reader
        .read_line(&mut status_line)
        .context("reading status line")?
        == 0
    {
        bail!("connection closed before a response");
    }
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("malformed status line {status_line:?}"))?;
    let mut content_length = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).context("reading headers")? == 0 {
            bail!("connection closed inside the response head");
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((key, value)) = line.split_once(':')
            && key.eq_ignore_ascii_case("content-length")
        {
            content_length = Some(
                value
                    .trim()
                    .parse::<u64>()
                    .with_context(|| format!("bad Content-Length {line:?}"))?,
            );
        }
    }
    let len = content_length.context("response without Content-Length")?;
    if len > MAX_BODY {
        bail!("response body of {len} bytes is too large");
    }
    let mut body = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    reader
        .take(len)
        .read_to_end(&mut body)
        .context("reading body")?;
    if body.len() as u64 != len {
        bail!("body truncated: {} of {len} bytes", body.len());
    }
    Ok(HttpResponse { status, body })
}

/// A UDP socket on a fresh source port, connected to `remote`: it only
/// accepts datagrams coming from exactly `remote`.
pub fn udp_connect(remote: SocketAddr) -> anyhow::Result<UdpSocket> {
    // The wildcard of the remote's family (IPv4 or IPv6).
    let any: std::net::IpAddr = if remote.is_ipv4() {
        std::net::Ipv4Addr::UNSPECIFIED.into()
    } else {
        std::net::Ipv6Addr::UNSPECIFIED.into()
    };
    let socket = UdpSocket::bind((any, 0)).context("binding a UDP socket")?;
    socket
        .connect(remote)
        .with_context(|| format!("connecting UDP socket to {remote}"))?;
    socket
        .set_read_timeout(Some(UDP_TIMEOUT))
        .context("setting UDP read timeout")?;
    Ok(socket)
}

/// Sends `payload` and returns the reply that echoes it (`webN payload`),
/// retrying a few times since UDP may drop. Replies to earlier datagrams
/// are skipped.
pub fn udp_request(socket: &UdpSocket, payload: &str) -> anyhow::Result<String> {
    let mut buf = [0u8; 2048];
    for _ in 0..UDP_TRIES {
        socket
            .send(payload.as_bytes())
            .with_context(|| format!("sending {payload:?}"))?;
        while let Ok(len) = socket.recv(&mut buf) {
            let reply = String::from_utf8_lossy(&buf[..len]).into_owned();
            if reply
                .strip_suffix(payload)
                .is_some_and(|head| head.ends_with(' '))
            {
                return Ok(reply);
            }
        }
    }
    let peer = socket
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    bail!("no reply to {payload:?} from {peer} after {UDP_TRIES} tries")
}
