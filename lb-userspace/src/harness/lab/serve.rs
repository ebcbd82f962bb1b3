//! `lb lab-serve`: the lab's web servers (HTTP, HTTPS + UDP) and the LB
//! host's echo listener. Plain std threads: a thread per listener and per
//! connection is plenty for a lab.

use std::{
    io::{self, BufRead, BufReader, BufWriter, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::PathBuf,
    sync::Arc,
    thread::{self, JoinHandle},
};

use anyhow::{Context, bail};

use super::tls;

/// Largest body `GET /bytes/N` serves.
const MAX_BULK: u64 = 1 << 30;
/// Longest request line or header line accepted.
const MAX_LINE: u64 = 8192;
const MAX_HEADERS: usize = 100;
const BULK_CHUNK: usize = 64 * 1024;

/// Arguments of the hidden `lb lab-serve` command.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Name this server answers with (`GET /` body, UDP reply prefix)
    #[arg(long)]
    pub name: String,
    /// Address of the HTTP/1.1 server (repeatable: one listener per
    /// address, e.g. an IPv4 wildcard and IPv6 addresses)
    #[arg(long)]
    pub http: Vec<SocketAddr>,
    /// Address of the HTTPS server (the same HTTP/1.1 over TLS; needs
    /// --cert and --key; repeatable)
    #[arg(long, requires_all = ["cert", "key"])]
    pub https: Vec<SocketAddr>,
    /// Certificate chain of the HTTPS server (PEM, leaf first)
    #[arg(long)]
    pub cert: Option<PathBuf>,
    /// Private key of the HTTPS server (PEM)
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// Address of a UDP responder (repeatable: one socket per address, so
    /// each reply leaves from the address its request was sent to)
    #[arg(long)]
    pub udp: Vec<SocketAddr>,
    /// Address of a TCP echo listener (repeatable)
    #[arg(long)]
    pub echo: Vec<SocketAddr>,
    /// Prefix of the lab this server belongs to; only a tag, so teardown
    /// can find the server by its command line
    #[arg(long)]
    pub lab: Option<String>,
    /// The write VIP of the application's database (`POST /visits`)
    #[arg(long, requires_all = ["db_read", "db_password_file"])]
    pub db_write: Option<SocketAddr>,
    /// The read VIP of the application's database (`GET /visits`)
    #[arg(long)]
    pub db_read: Option<SocketAddr>,
    /// File holding the application account's password (read per request)
    #[arg(long)]
    pub db_password_file: Option<PathBuf>,
}

/// Byte `i` of a `GET /bytes/N` body: a pattern with period 251 (prime, so
/// it never lines up with buffer or segment sizes), for checking bulk
/// transfers byte by byte.
pub fn bulk_byte(i: u64) -> u8 {
    // The result is < 251, so the narrowing is lossless.
    ((i.wrapping_mul(31).wrapping_add(7)) % 251) as u8
}

/// Binds every listener, then serves until one fails.
pub fn serve(args: ServeArgs) -> anyhow::Result<()> {
    if args.http.is_empty() && args.https.is_empty() && args.udp.is_empty() && args.echo.is_empty()
    {
        bail!("nothing to serve: give --http, --https, --udp or --echo");
    }
    let name: Arc<str> = Arc::from(args.name.as_str());
    if let (Some(write), Some(read), Some(password_file)) =
        (args.db_write, args.db_read, args.db_password_file.clone())
    {
        super::visits::configure(super::visits::VisitsDb {
            write,
            read,
            password_file,
        });
    }
    // Bind everything before serving anything: once the HTTP port accepts,
    // every UDP and echo socket exists too (the lab waits on that).
    let http = bind_all(&args.http, |a| {
        TcpListener::bind(a).with_context(|| format!("binding HTTP on {a}"))
    })?;
    let https = match (args.https.is_empty(), &args.cert, &args.key) {
        (false, Some(cert), Some(key)) => {
            let config = tls::server_config(cert, key)?;
            let listeners = bind_all(&args.https, |a| {
                TcpListener::bind(a).with_context(|| format!("binding HTTPS on {a}"))
            })?;
            listeners
                .into_iter()
                .map(|l| (l, Arc::clone(&config)))
                .collect()
        }
        (false, _, _) => bail!("--https needs --cert and --key"),
        (true, _, _) => Vec::new(),
    };
    let udp = bind_all(&args.udp, |a| {
        UdpSocket::bind(a).with_context(|| format!("binding UDP on {a}"))
    })?;
    let echo = bind_all(&args.echo, |a| {
        TcpListener::bind(a).with_context(|| format!("binding echo on {a}"))
    })?;

    let mut workers: Vec<JoinHandle<anyhow::Result<()>>> = Vec::new();
    for socket in udp {
        let name = Arc::clone(&name);
        workers.push(thread::spawn(move || serve_udp(&socket, &name)));
    }
    for listener in echo {
        workers.push(thread::spawn(move || {
            accept_loop(&listener, echo_connection)
        }));
    }
    for (listener, config) in https {
        let name = Arc::clone(&name);
        workers.push(thread::spawn(move || {
            accept_loop(&listener, move |s| tls::https_connection(s, &config, &name))
        }));
    }
    for listener in http {
        let name = Arc::clone(&name);
        workers.push(thread::spawn(move || {
            accept_loop(&listener, move |s| {
                let _ = s.set_nodelay(true);
                http_session(s, &name, false)
            })
        }));
    }
    println!(
        "lab-serve {}: http {:?}, https {:?}, udp {:?}, echo {:?}",
        args.name,
        args.http
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        args.https
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        args.udp.iter().map(ToString::to_string).collect::<Vec<_>>(),
        args.echo
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
    );
    for worker in workers {
        match worker.join() {
            Ok(result) => result?,
            Err(_) => bail!("a lab-serve thread panicked"),
        }
    }
    Ok(())
}

fn bind_all<T>(
    addrs: &[SocketAddr],
    bind: impl Fn(SocketAddr) -> anyhow::Result<T>,
) -> anyhow::Result<Vec<T>> {
    addrs.iter().map(|a| bind(*a)).collect()
}

/// Accepts forever, one thread per connection; a connection's error is
/// logged and ends only that connection (load generators reset freely).
fn accept_loop<F>(listener: &TcpListener, handle: F) -> anyhow::Result<()>
where
    F: Fn(TcpStream) -> anyhow::Result<()> + Send + Sync + Clone + 'static,
{
    let local = listener.local_addr().context("listener address")?;
    for stream in listener.incoming() {
        let stream = stream.with_context(|| format!("accepting on {local}"))?;
        let handle = handle.clone();
        thread::spawn(move || {
            let peer = stream
                .peer_addr()
                .map(|a| a.to_string())
                .unwrap_or_default();
            if let Err(e) = handle(stream) {
                eprintln!("lab-serve: connection {peer} -> {local}: {e:#}");
            }
        });
    }
    Ok(())
}

/// Answers each datagram with `{name} {payload}` from the same socket; a
/// payload `size N …` asks for that answer padded with dots to N bytes (a
/// reply bigger than the MTU, as a DNSSEC answer, arrives in fragments).
fn serve_udp(socket: &UdpSocket, name: &str) -> anyhow::Result<()> {
    let local = socket.local_addr().context("UDP socket address")?;
    let mut buf = vec![0u8; 65536];
    loop {
        let (len, peer) = socket
            .recv_from(&mut buf)
            .with_context(|| format!("receiving on {local}"))?;
        let mut reply = Vec::with_capacity(name.len() + 1 + len);
        reply.extend_from_slice(name.as_bytes());
        reply.push(b' ');
        reply.extend_from_slice(&buf[..len]);
        if let Some(size) = asked_size(&buf[..len]) {
            reply.resize(size.max(reply.len()), b'.');
        }
        if let Err(e) = socket.send_to(&reply, peer) {
            eprintln!("lab-serve: UDP reply {local} -> {peer}: {e}");
        }
    }
}

/// Largest UDP answer `size N` gets (an IPv4 datagram's payload limit).
const MAX_UDP_REPLY: usize = 65_507;

/// The N of a datagram `size N …`, capped at [`MAX_UDP_REPLY`].
fn asked_size(payload: &[u8]) -> Option<usize> {
    let text = std::str::from_utf8(payload).ok()?;
    let n: usize = text
        .strip_prefix("size ")?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(n.min(MAX_UDP_REPLY))
}

fn echo_connection(stream: TcpStream) -> anyhow::Result<()> {
    let mut reader = stream.try_clone().context("cloning echo stream")?;
    let mut writer = stream;
    io::copy(&mut reader, &mut writer).context("echoing")?;
    Ok(())
}

/// One parsed request head.
struct Request {
    method: String,
    path: String,
    /// The Host header, if any.
    host: Option<String>,
    keep_alive: bool,
    content_length: u64,
}

/// Serves requests one after another on a keep-alive connection: over TCP
/// (port 80) or over TLS on TCP (port 443, `secure`).
pub(super) fn http_session(
    stream: impl Read + Write,
    name: &str,
    secure: bool,
) -> anyhow::Result<()> {
    let mut reader = BufReader::new(stream);
    while let Some(request) = read_request(&mut reader)? {
        // Discard any request body so the next request parses.
        io::copy(
            &mut (&mut reader).take(request.content_length),
            &mut io::sink(),
        )
        .context("reading request body")?;
        let mut writer = BufWriter::new(reader.get_mut());
        respond(&mut writer, &request, name, secure)?;
        writer.flush().context("sending response")?;
        drop(writer);
        if !request.keep_alive {
            break;
        }
    }
    Ok(())
}

/// Reads one line of at most MAX_LINE bytes, without the line ending.
/// `None` at a clean end of stream.
fn read_line(reader: &mut impl BufRead) -> anyhow::Result<Option<String>> {
    let mut line = String::new();
    let n = reader
        .take(MAX_LINE)
        .read_line(&mut line)
        .context("reading request")?;
    if n == 0 {
        return Ok(None);
    }
    if !line.ends_with('\n') {
        bail!("request line too long or truncated");
    }
    Ok(Some(line.trim_end_matches(['\r', '\n']).to_owned()))
}

fn read_request(reader: &mut impl BufRead) -> anyhow::Result<Option<Request>> {
    let Some(request_line) = read_line(reader)? else {
        return Ok(None);
    };
    let mut parts = request_line.split_whitespace();
    let (Some(method), Some(path), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        bail!("malformed request line {request_line:?}");
    };
    // HTTP/1.1 keeps the connection open unless told otherwise; 1.0 closes
    // it unless asked to keep it.
    let mut keep_alive = version == "HTTP/1.1";
    let mut content_length = 0;
    let mut host = None;
    for _ in 0..MAX_HEADERS {
        let Some(line) = read_line(reader)? else {
            bail!("connection closed inside the request head")
        };
        if line.is_empty() {
            return Ok(Some(Request {
                method: method.to_owned(),
                path: path.to_owned(),
                host,
                keep_alive,
                content_length,
            }));
        }
        let Some((key, value)) = line.split_once(':') else {
            bail!("malformed header {line:?}")
        };
        let value = value.trim();
        if key.eq_ignore_ascii_case("connection") {
            keep_alive = match value.to_ascii_lowercase().as_str() {
                "close" => false,
                "keep-alive" => true,
                _ => keep_alive,
            };
        } else if key.eq_ignore_ascii_case("host") {
            host = Some(value.to_owned());
        } else if key.eq_ignore_ascii_case("content-length") {
            content_length = value
                .parse()
                .with_context(|| format!("bad Content-Length {value:?}"))?;
        }
    }
    bail!("more than {MAX_HEADERS} headers")
}

/// What a request is answered with.
enum Body {
    Text(String),
    Bulk(u64),
    /// An empty body with `Location:` set to this URL.
    Redirect(String),
}

impl Body {
    fn len(&self) -> u64 {
        match self {
            Body::Text(text) => text.len() as u64,
            Body::Bulk(n) => *n,
            Body::Redirect(_) => 0,
        }
    }
}

/// The answer to `request`. `/redirect` shows how a site sends plain HTTP
/// to HTTPS: over HTTP it answers 301 to `https://{Host}/` (the web server
/// does it; the load balancer just forwards both ports); over HTTPS it
/// answers like `/`.
fn route(request: &Request, name: &str, secure: bool) -> (u16, &'static str, Body) {
    if request.path == "/visits"
        && let Some((status, reason, text)) = super::visits::handle(&request.method, name)
    {
        return (status, reason, Body::Text(text));
    }
    if request.method != "GET" && request.method != "HEAD" {
        return (
            405,
            "Method Not Allowed",
            Body::Text("method not allowed\n".to_owned()),
        );
    }
    if request.path == "/redirect" && !secure {
        let host = request
            .host
            .as_deref()
            .map_or(tls::SITE_NAME, |h| h.split(':').next().unwrap_or(h));
        return (
            301,
            "Moved Permanently",
            Body::Redirect(format!("https://{host}/")),
        );
    }
    if request.path == "/" || request.path == "/redirect" {
        return (200, "OK", Body::Text(format!("{name}\n")));
    }
    if let Some(n) = request.path.strip_prefix("/bytes/") {
        return match n.parse::<u64>() {
            Ok(n) if n <= MAX_BULK => (200, "OK", Body::Bulk(n)),
            _ => (
                400,
                "Bad Request",
                Body::Text(format!("/bytes/N takes 0..={MAX_BULK}\n")),
            ),
        };
    }
    (404, "Not Found", Body::Text("not found\n".to_owned()))
}

fn respond(
    writer: &mut impl Write,
    request: &Request,
    name: &str,
    secure: bool,
) -> anyhow::Result<()> {
    let (status, reason, body) = route(request, name, secure);
    let connection = if request.keep_alive {
        "keep-alive"
    } else {
        "close"
    };
    let location = match &body {
        Body::Redirect(url) => format!("Location: {url}\r\n"),
        _ => String::new(),
    };
    write!(
        writer,
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{location}Connection: {connection}\r\n\r\n",
        body.len()
    )
    .context("sending response head")?;
    if request.method == "HEAD" {
        return Ok(());
    }
    match body {
        Body::Text(text) => writer
            .write_all(text.as_bytes())
            .context("sending response body"),
        Body::Bulk(n) => write_bulk(writer, n),
        Body::Redirect(_) => Ok(()),
    }
}

fn write_bulk(writer: &mut impl Write, n: u64) -> anyhow::Result<()> {
    let mut chunk = Vec::with_capacity(BULK_CHUNK);
    let mut offset = 0u64;
    while offset < n {
        let len = (n - offset).min(BULK_CHUNK as u64);
        chunk.clear();
        chunk.extend((offset..offset + len).map(bulk_byte));
        writer.write_all(&chunk).context("sending bulk body")?;
        offset += len;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &str) -> Option<Request> {
        read_request(&mut raw.as_bytes()).ok().flatten()
    }

    #[test]
    fn keep_alive_defaults_follow_the_version() {
        assert!(parse("GET / HTTP/1.1\r\nHost: x\r\n\r\n").is_some_and(|r| r.keep_alive));
        assert!(
            parse("GET / HTTP/1.1\r\nConnection: close\r\n\r\n").is_some_and(|r| !r.keep_alive)
        );
        assert!(parse("GET / HTTP/1.0\r\n\r\n").is_some_and(|r| !r.keep_alive));
        assert!(
            parse("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").is_some_and(|r| r.keep_alive)
        );
    }

    #[test]
    fn routes() {
        let get = |path: &str| Request {
            method: "GET".into(),
            path: path.into(),
            host: Some("www.foobar.com:80".into()),
            keep_alive: true,
            content_length: 0,
        };
        for secure in [false, true] {
            let route = |r: &Request, name: &str| route(r, name, secure);
            assert!(matches!(route(&get("/"), "web2"), (200, _, Body::Text(t)) if t == "web2\n"));
            assert!(matches!(
                route(&get("/bytes/10"), "web2"),
                (200, _, Body::Bulk(10))
            ));
            assert!(matches!(route(&get("/bytes/x"), "web2"), (400, _, _)));
            assert!(matches!(route(&get("/nope"), "web2"), (404, _, _)));
        }
        assert!(matches!(
            route(&get("/redirect"), "web2", false),
            (301, _, Body::Redirect(url)) if url == "https://www.foobar.com/"
        ));
        assert!(matches!(
            route(&get("/redirect"), "web2", true),
            (200, _, Body::Text(_))
        ));
    }

    #[test]
    fn bulk_body_follows_the_formula() {
        let request = Request {
            method: "GET".into(),
            path: "/bytes/200000".into(),
            host: None,
            keep_alive: false,
            content_length: 0,
        };
        let mut out = Vec::new();
        assert!(respond(&mut out, &request, "web1", false).is_ok());
        let head_end = out
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map_or(0, |p| p + 4);
        let body = &out[head_end..];
        assert_eq!(body.len(), 200_000);
        assert!(
            body.iter()
                .enumerate()
                .all(|(i, b)| *b == bulk_byte(i as u64))
        );
        assert_eq!(bulk_byte(0), 7);
        assert_eq!(bulk_byte(8), (8 * 31 + 7) % 251);
    }

    #[test]
    fn a_datagram_can_ask_for_a_big_answer() {
        assert_eq!(asked_size(b"size 4000 q1"), Some(4000));
        assert_eq!(asked_size(b"size 999999"), Some(MAX_UDP_REPLY));
        assert_eq!(asked_size(b"sized 4000"), None);
        assert_eq!(asked_size(b"ping"), None);
    }
}
