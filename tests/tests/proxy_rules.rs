//! The PROXY v2 rules (`lb_common::proxy`) between two real Linux TCP
//! stacks, before the data plane applies them (issue 25): a client
//! namespace and a backend namespace each reach the other only through a
//! TUN device whose other end is this test, which forwards every IPv4
//! packet applying the rules exactly as the data plane is to: the SYN loses
//! SACK-permitted, the SYN-ACK's MSS is lowered by the header, the first
//! data segment (and its retransmission) gets the header, later client
//! segments are shifted, the backend's acks shifted back, every checksum
//! updated incrementally. The first data segment is dropped once, so the
//! client's retransmission must carry the header again.
//!
//! The backend is `lb lab-serve --proxy-http`; the client checks that it
//! is named by the header (its own address and port), then sends a 300 kB
//! request body and reads a 1 MB answer byte for byte over the same
//! connection (both directions shifted across many segments).
//!
//! Needs root and `LB_BIN` (`cargo xtask test` sets both).

use std::{
    fs::{File, OpenOptions},
    io::{self, Read, Write},
    net::{SocketAddr, TcpStream},
    os::fd::AsRawFd,
    process::{Child, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use lb_common::proxy::{
    ClientSegment, TCPOPT_SACK_PERMITTED, V4_LEN, check_after_field, check_after_insert, clamp_mss,
    client_ack, client_segment, find_option, header_v4, ipv4_check_after_length, shifted_seq,
    strip_sack_permitted,
};
use lb_tests::{lb_bin, unique_prefix};
use lb_userspace::harness::{
    lab::bulk_byte,
    netns::{Netns, ip, ns_command},
};

const CLIENT: &str = "198.18.0.77";
const BACKEND: &str = "198.19.0.21";
const PORT: u16 = 8081;
const MTU: usize = 1500;
const BODY: usize = 300_000;
const ANSWER: usize = 1_000_000;

/// Opens a TUN device (IPv4 packets, no packet-info prefix) in the calling
/// thread's namespace.
fn open_tun(name: &str) -> io::Result<File> {
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    // `struct ifreq`: the name (16 bytes), then the flags (a short), the
    // rest padding to 40 bytes.
    let mut req = [0u8; 40];
    req[..name.len()].copy_from_slice(name.as_bytes());
    let flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
    req[16..18].copy_from_slice(&flags.to_ne_bytes());
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq`: `req` is one.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, req.as_mut_ptr()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}

/// A namespace with a TUN device `dev` holding `addr`, routing `peer_net`
/// through it; returns the device's file (this test's end).
fn tun_leg(ns: &Netns, dev: &str, addr: &str, peer_net: &str) -> Result<File> {
    let dev_name = dev.to_owned();
    let file = ns.run(move || open_tun(&dev_name))??;
    ip(
        ns.name(),
        &["link", "set", dev, "mtu", &MTU.to_string(), "up"],
    )?;
    ip(
        ns.name(),
        &["addr", "add", &format!("{addr}/32"), "dev", dev],
    )?;
    ip(ns.name(), &["route", "add", peer_net, "dev", dev])?;
    Ok(file)
}

/// What the middle saw, for the assertions.
#[derive(Default)]
struct Seen {
    /// The client's ISN + 1, from its SYN.
    first: Option<u32>,
    /// SYNs that carried SACK-permitted (stripped) and SYN-ACKs that did.
    sack_stripped: u32,
    synack_with_sack: u32,
    mss_clamped: u32,
    /// First data segments: dropped once, then given the header.
    dropped_first: bool,
    inserted: u32,
    shifted: u32,
    /// Longest IP packet sent toward the backend.
    longest: usize,
}

fn be16(p: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([p[at], p[at + 1]])
}

fn be32(p: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([p[at], p[at + 1], p[at + 2], p[at + 3]])
}

/// Rewrites a 32-bit TCP field (4: seq, 8: ack) with the checksum update.
fn set32(p: &mut [u8], tcp: usize, off: usize, new: u32) {
    let old = be32(p, tcp + off);
    p[tcp + off..tcp + off + 4].copy_from_slice(&new.to_be_bytes());
    let check = u16::from_ne_bytes([p[tcp + 16], p[tcp + 17]]);
    let check = check_after_field(check, old, new);
    p[tcp + 16..tcp + 18].copy_from_slice(&check.to_ne_bytes());
}

/// The client → backend rules on one IPv4 packet. `None`: dropped.
fn toward_backend(mut p: Vec<u8>, seen: &mut Seen) -> Option<Vec<u8>> {
    if p.len() < 40 || p[0] >> 4 != 4 || p[9] != 6 {
        return Some(p);
    }
    let tcp = usize::from(p[0] & 0xf) * 4;
    let hl = usize::from(p[tcp + 12] >> 4) * 4;
    let flags = p[tcp + 13];
    let syn = flags & 0x02 != 0;
    let seq = be32(&p, tcp + 4);
    if syn {
        seen.first = Some(seq.wrapping_add(1));
        if strip_sack_permitted(&mut p[tcp..tcp + hl]) {
            seen.sack_stripped += 1;
        }
        return Some(p);
    }
    let first = seen.first?;
    let payload = (usize::from(be16(&p, 2)) - tcp - hl) as u32;
    let out = match client_segment(seq, payload, syn, first) {
        ClientSegment::Keep => p,
        ClientSegment::Shift => {
            set32(&mut p, tcp, 4, shifted_seq(seq, V4_LEN as u32));
            seen.shifted += 1;
            p
        }
        ClientSegment::Insert if !seen.dropped_first => {
            seen.dropped_first = true;
            return None;
        }
        ClientSegment::Insert => {
            let header = header_v4(
                u32::from_ne_bytes([p[12], p[13], p[14], p[15]]),
                u16::from_ne_bytes([p[tcp], p[tcp + 1]]),
                u32::from_ne_bytes([p[16], p[17], p[18], p[19]]),
                u16::from_ne_bytes([p[tcp + 2], p[tcp + 3]]),
            );
            let data = tcp + hl;
            let mut q = Vec::with_capacity(p.len() + header.len());
            q.extend_from_slice(&p[..data]);
            q.extend_from_slice(&header);
            q.extend_from_slice(&p[data..]);
            let old_total = be16(&p, 2);
            let new_total = old_total + header.len() as u16;
            q[2..4].copy_from_slice(&new_total.to_be_bytes());
            let ip_check =
                ipv4_check_after_length(u16::from_ne_bytes([q[10], q[11]]), old_total, new_total);
            q[10..12].copy_from_slice(&ip_check.to_ne_bytes());
            let old_len = old_total - tcp as u16;
            let check = check_after_insert(
                u16::from_ne_bytes([q[tcp + 16], q[tcp + 17]]),
                &header,
                old_len,
                old_len + header.len() as u16,
            );
            q[tcp + 16..tcp + 18].copy_from_slice(&check.to_ne_bytes());
            seen.inserted += 1;
            q
        }
    };
    seen.longest = seen.longest.max(out.len());
    Some(out)
}

/// The backend → client rules on one IPv4 packet.
fn toward_client(mut p: Vec<u8>, seen: &mut Seen) -> Vec<u8> {
    if p.len() < 40 || p[0] >> 4 != 4 || p[9] != 6 {
        return p;
    }
    let tcp = usize::from(p[0] & 0xf) * 4;
    let hl = usize::from(p[tcp + 12] >> 4) * 4;
    let flags = p[tcp + 13];
    if flags & 0x02 != 0 {
        if find_option(&p[tcp..tcp + hl], TCPOPT_SACK_PERMITTED).is_some() {
            seen.synack_with_sack += 1;
        }
        if clamp_mss(&mut p[tcp..tcp + hl], V4_LEN as u16) {
            seen.mss_clamped += 1;
        }
    }
    if let Some(first) = seen.first
        && flags & 0x10 != 0
    {
        let ack = be32(&p, tcp + 8);
        set32(&mut p, tcp, 8, client_ack(ack, first, V4_LEN as u32));
    }
    p
}

/// Waits up to 100 ms for `file` to be readable.
fn readable(file: &File) -> bool {
    let mut fd = libc::pollfd {
        fd: file.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut fd, 1, 100) > 0 }
}

/// Forwards packets from `from` to `to` through `rule` until `stop`.
fn pump(
    mut from: File,
    mut to: File,
    seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
    rule: fn(Vec<u8>, &mut Seen) -> Option<Vec<u8>>,
) -> io::Result<()> {
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::Relaxed) {
        if !readable(&from) {
            continue;
        }
        let n = from.read(&mut buf)?;
        let out = {
            let mut seen = seen.lock().map_err(|_| io::Error::other("poisoned"))?;
            rule(buf[..n].to_vec(), &mut seen)
        };
        if let Some(out) = out {
            to.write_all(&out)?;
        }
    }
    Ok(())
}

/// `lb lab-serve --proxy-http` in `ns`, killed on drop.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn two_real_tcp_stacks_carry_the_header_and_the_shifted_stream_both_ways() -> Result<()> {
    let lb = lb_bin().display().to_string();
    let prefix = unique_prefix("k25pr");
    let client_ns = Netns::create(&format!("{prefix}-c"))?;
    let backend_ns = Netns::create(&format!("{prefix}-b"))?;
    let c_tun = tun_leg(&client_ns, "pxc", CLIENT, "198.19.0.0/24")?;
    let b_tun = tun_leg(&backend_ns, "pxb", BACKEND, "198.18.0.0/24")?;

    let seen = Arc::new(Mutex::new(Seen::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let forward = {
        let (from, to) = (c_tun.try_clone()?, b_tun.try_clone()?);
        let (seen, stop) = (Arc::clone(&seen), Arc::clone(&stop));
        thread::spawn(move || pump(from, to, seen, stop, toward_backend))
    };
    let back = {
        let (from, to) = (b_tun, c_tun);
        let (seen, stop) = (Arc::clone(&seen), Arc::clone(&stop));
        thread::spawn(move || pump(from, to, seen, stop, |p, s| Some(toward_client(p, s))))
    };

    let listen = format!("{BACKEND}:{PORT}");
    let mut cmd = ns_command(
        backend_ns.name(),
        &[&lb, "lab-serve", "--name", "webpx", "--proxy-http", &listen],
    );
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let _server = Server(cmd.spawn().context("starting lab-serve")?);

    let target: SocketAddr = listen.parse()?;
    let result = client_ns.run(move || exchange(target))?;
    stop.store(true, Ordering::Relaxed);
    let _ = forward.join();
    let _ = back.join();
    let (me, named, answer_ok) = result?;

    let seen = seen.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
    ensure!(
        named == format!("webpx {me}"),
        "lab-serve named {named:?}, the client is {me}"
    );
    ensure!(answer_ok, "the 1 MB answer was not byte-exact");
    ensure!(
        seen.sack_stripped >= 1,
        "no SACK-permitted stripped from the client's SYN"
    );
    ensure!(
        seen.synack_with_sack == 0,
        "the backend offered SACK anyway"
    );
    ensure!(seen.mss_clamped >= 1, "no MSS clamped in the SYN-ACK");
    ensure!(seen.dropped_first, "the first data segment was never seen");
    ensure!(
        seen.inserted >= 1,
        "the retransmitted first segment did not get the header"
    );
    ensure!(seen.shifted > 100, "only {} segments shifted", seen.shifted);
    ensure!(
        seen.longest <= MTU,
        "a segment of {} bytes left for a {MTU}-byte link: the MSS clamp did not leave room",
        seen.longest
    );
    Ok(())
}

/// The client's side: connects (retrying until the server listens), asks
/// `/client` with a 300 kB body, then reads `/bytes/1000000`. Returns its
/// own address, the name line and whether the answer was byte-exact.
fn exchange(target: SocketAddr) -> Result<(SocketAddr, String, bool)> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut s = loop {
        match TcpStream::connect_timeout(&target, Duration::from_millis(500)) {
            Ok(s) => break s,
            Err(e) if Instant::now() > deadline => bail!("connecting to {target}: {e}"),
            Err(_) => thread::sleep(Duration::from_millis(50)),
        }
    };
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    let me = s.local_addr()?;
    let mut request =
        format!("GET /client HTTP/1.1\r\nContent-Length: {BODY}\r\n\r\n").into_bytes();
    request.extend((0..BODY).map(|i| (i % 253) as u8));
    s.write_all(&request)?;
    let head = read_head(&mut s)?;
    let len = content_length(&head)?;
    let mut body = vec![0u8; len];
    s.read_exact(&mut body)?;
    let named = String::from_utf8_lossy(&body).trim_end().to_owned();
    s.write_all(format!("GET /bytes/{ANSWER} HTTP/1.1\r\nConnection: close\r\n\r\n").as_bytes())?;
    let head = read_head(&mut s)?;
    ensure!(content_length(&head)? == ANSWER, "answer head {head:?}");
    let mut answer = vec![0u8; ANSWER];
    s.read_exact(&mut answer)?;
    let exact = answer
        .iter()
        .enumerate()
        .all(|(i, b)| *b == bulk_byte(i as u64));
    Ok((me, named, exact))
}

fn read_head(s: &mut TcpStream) -> Result<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).context("reading a response head")?;
        head.push(byte[0]);
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

fn content_length(head: &str) -> Result<usize> {
    head.lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .context("no Content-Length")?
        .trim()
        .parse()
        .context("bad Content-Length")
}
