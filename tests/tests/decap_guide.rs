//! The README's backend guide for tunnel services ("Backends of a tunnel
//! service"), tried as written: its shell block runs in a fresh network
//! namespace (the backend), then a second namespace playing the LB sends
//! real encapsulated traffic to it — GUE from a plain UDP socket (GUE
//! header + an inner IPv4/UDP packet to the VIP as payload), IPIP from a
//! raw IPPROTO_IPIP socket (the kernel puts its outer header on our inner
//! packet). A UDP server on the backend's VIP must receive each and answer
//! the client directly; the same from an address not in `--from` must not
//! be delivered, and `lb decap status` must count it.
//!
//! The block runs under `nsenter --net` (the network namespace alone, as
//! `lb decap --netns` enters it), so its pins land on the host's bpffs as
//! on a real backend. Needs root; fails loudly without it.

use std::{
    io,
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use etherparse::PacketBuilder;
use lb_tests::{lb_bin, unique_prefix};
use lb_userspace::harness::netns::{self, Netns, VethEnd};

/// The LB's tunnel source (in `--from`), and an address that is not.
const LB: Ipv4Addr = Ipv4Addr::new(198, 19, 200, 1);
const STRANGER: Ipv4Addr = Ipv4Addr::new(198, 19, 200, 66);
const BACKEND: Ipv4Addr = Ipv4Addr::new(198, 19, 200, 11);
const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 200, 10);
/// The client whose packets the LB tunnels (an address of the LB's
/// namespace, so the backend's direct answers reach a socket there).
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 201, 2);
const VIP_PORT: u16 = 5300;
const GUE_PORT: u16 = 6080;

/// The guide's shell block: the first ```sh block after its heading.
fn guide_block() -> String {
    let readme = Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    let text = std::fs::read_to_string(&readme).expect("README.md");
    let section = text
        .split("\n## Backends of a tunnel service\n")
        .nth(1)
        .expect("README.md has the section \"Backends of a tunnel service\"");
    let block = section
        .split("```sh\n")
        .nth(1)
        .and_then(|b| b.split("\n```").next())
        .expect("the section has a ```sh block");
    assert!(
        block.contains("lb decap attach"),
        "the guide's block attaches lb decap:\n{block}"
    );
    block.to_owned()
}

/// `lb decap detach IFACE` in the backend's namespace when the test ends,
/// however it ends: the pins are on the host's bpffs.
struct Detach<'a> {
    ns: &'a str,
    iface: &'a str,
}

impl Drop for Detach<'_> {
    fn drop(&mut self) {
        let _ = nsenter(self.ns)
            .arg(lb_bin())
            .args(["decap", "detach", self.iface])
            .output();
    }
}

fn nsenter(ns: &str) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net=/run/netns/{ns}"));
    c
}

/// The client's UDP datagram to the VIP, as the LB tunnels it.
fn inner(payload: &[u8], client_port: u16) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ipv4(CLIENT.octets(), VIP.octets(), 63)
        .udp(client_port, VIP_PORT)
        .write(&mut out, payload)
        .expect("inner packet");
    out
}

/// GUE variant 0 carrying IPv4: the payload of the outer UDP datagram.
fn gue_payload(inner: &[u8]) -> Vec<u8> {
    let mut p = vec![0x00, 4, 0, 0];
    p.extend_from_slice(inner);
    p
}

fn sockaddr(addr: Ipv4Addr) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(addr.octets()),
        },
        sin_zero: [0; 8],
    }
}

/// A raw IPPROTO_IPIP socket bound to `src`: what it sends gets an outer
/// IPv4 header (protocol 4) from the kernel, source `src`.
fn ipip_socket(src: Ipv4Addr) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd is owned at once.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_IPIP) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let sa = sockaddr(src);
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: `sa` is a valid sockaddr_in of `len` bytes.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sa as *const libc::sockaddr_in).cast(),
            len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

fn send_ipip(fd: &OwnedFd, dst: Ipv4Addr, inner: &[u8]) -> io::Result<()> {
    let sa = sockaddr(dst);
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: `inner` and `sa` are valid for the lengths given.
    let n = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            inner.as_ptr().cast(),
            inner.len(),
            0,
            (&sa as *const libc::sockaddr_in).cast(),
            len,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The LB's side: a GUE sender and an IPIP sender from one source.
struct Tunnels {
    gue: UdpSocket,
    ipip: OwnedFd,
}

impl Tunnels {
    fn from(ns: &Netns, src: Ipv4Addr) -> Result<Self> {
        ns.run(|| -> Result<Tunnels> {
            Ok(Tunnels {
                gue: UdpSocket::bind(SocketAddrV4::new(src, 0)).context("GUE socket")?,
                ipip: ipip_socket(src).context("raw IPIP socket")?,
            })
        })?
    }

    fn send_gue(&self, inner: &[u8]) -> Result<()> {
        self.gue
            .send_to(&gue_payload(inner), SocketAddrV4::new(BACKEND, GUE_PORT))
            .context("sending GUE")?;
        Ok(())
    }

    fn send_ipip(&self, inner: &[u8]) -> Result<()> {
        send_ipip(&self.ipip, BACKEND, inner).context("sending IPIP")
    }
}

/// The server on the VIP receives `want` from the client and answers it
/// directly; the client's socket gets the answer.
fn delivered(server: &UdpSocket, client: &UdpSocket, want: &[u8]) -> Result<()> {
    let mut buf = [0u8; 2048];
    let (n, from) = server.recv_from(&mut buf).with_context(|| {
        format!(
            "the VIP's server never got {:?}",
            String::from_utf8_lossy(want)
        )
    })?;
    ensure!(&buf[..n] == want, "the server got {:?}", &buf[..n]);
    ensure!(
        from == client.local_addr()?,
        "from {from}, not the client: the inner packet was not delivered as sent"
    );
    let mut answer = b"answer:".to_vec();
    answer.extend_from_slice(want);
    server.send_to(&answer, from).context("answering")?;
    let (n, _) = client
        .recv_from(&mut buf)
        .context("the client never got the backend's direct answer")?;
    ensure!(buf[..n] == answer[..], "the client got {:?}", &buf[..n]);
    Ok(())
}

fn status(ns: &str, iface: &str) -> Result<serde_json::Value> {
    let out = nsenter(ns)
        .arg(lb_bin())
        .args(["decap", "status", iface, "--json"])
        .output()
        .context("lb decap status")?;
    ensure!(
        out.status.success(),
        "lb decap status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let all: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    Ok(all[0]["verdicts"].clone())
}

#[test]
fn the_readmes_guide_makes_a_fresh_namespace_a_tunnel_backend() -> Result<()> {
    let lb = lb_bin();
    let prefix = unique_prefix("dg");
    let lb_ns = Netns::create(&format!("{prefix}-lb"))?;
    let backend = Netns::create(&format!("{prefix}-be"))?;
    let (lb_if, iface) = (format!("{prefix}l"), format!("{prefix}b"));
    netns::add_veth(
        &VethEnd::new(lb_ns.name(), &lb_if),
        &VethEnd::new(backend.name(), &iface),
    )?;
    netns::add_addr(lb_ns.name(), &lb_if, &format!("{LB}/24"))?;
    netns::add_addr(lb_ns.name(), &lb_if, &format!("{STRANGER}/24"))?;
    netns::add_addr(lb_ns.name(), "lo", &format!("{CLIENT}/32"))?;
    netns::add_addr(backend.name(), &iface, &format!("{BACKEND}/24"))?;
    // The backend answers clients by its own route (here: via the LB's
    // namespace, which holds the client's address).
    netns::add_default_route(backend.name(), LB)?;
    // The answers come from the VIP, which the LB's namespace does not route.
    for conf in ["all", lb_if.as_str()] {
        netns::sysctl(
            lb_ns.name(),
            &format!("net/ipv4/conf/{conf}/rp_filter"),
            "0",
        )?;
    }

    // The guide, as written, with this site's values.
    let _detach = Detach {
        ns: backend.name(),
        iface: &iface,
    };
    let path = format!(
        "{}:{}",
        lb.parent().context("lb's directory")?.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = nsenter(backend.name())
        .args(["sh", "-e", "-x", "-c", &guide_block()])
        .env("IFACE", &iface)
        .env("VIP", VIP.to_string())
        .env("LBS", LB.to_string())
        .env("PATH", path)
        .output()
        .context("running the guide's block")?;
    if !out.status.success() {
        bail!(
            "the guide's block failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let timeout = Some(Duration::from_secs(5));
    let server = backend.run(|| UdpSocket::bind(SocketAddrV4::new(VIP, VIP_PORT)))??;
    server.set_read_timeout(timeout)?;
    let client = lb_ns.run(|| UdpSocket::bind(SocketAddrV4::new(CLIENT, 0)))??;
    client.set_read_timeout(timeout)?;
    let client_port = client.local_addr()?.port();
    let lb_side = Tunnels::from(&lb_ns, LB)?;

    lb_side.send_gue(&inner(b"through GUE", client_port))?;
    delivered(&server, &client, b"through GUE").context("GUE from the LB")?;
    lb_side.send_ipip(&inner(b"through IPIP", client_port))?;
    delivered(&server, &client, b"through IPIP").context("IPIP from the LB")?;

    // From an address not in --from: not decapsulated, so not delivered.
    let stranger = Tunnels::from(&lb_ns, STRANGER)?;
    stranger.send_gue(&inner(b"spoofed GUE", client_port))?;
    stranger.send_ipip(&inner(b"spoofed IPIP", client_port))?;
    server.set_read_timeout(Some(Duration::from_millis(1500)))?;
    let mut buf = [0u8; 2048];
    if let Ok((n, from)) = server.recv_from(&mut buf) {
        bail!(
            "a tunnel from {STRANGER} was delivered to the VIP: {:?} from {from}",
            String::from_utf8_lossy(&buf[..n])
        );
    }

    let verdicts = status(backend.name(), &iface)?;
    for (verdict, want) in [
        ("decap_gue", 1),
        ("decap_ipip", 1),
        ("source_not_allowed", 2),
    ] {
        assert_eq!(
            verdicts[verdict].as_u64(),
            Some(want),
            "{verdict} in lb decap status: {verdicts}"
        );
    }
    Ok(())
}
