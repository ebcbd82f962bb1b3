//! Checks through the VIP (`through-vip = true`; docs/architecture.md,
//! "Checks through the VIP"): a probe reaches the backend as a client's
//! flow does, to the VIP and port, carried by the data plane in the
//! service's mode, so a backend passes only if it answers for the VIP.
//!
//! The VIP is local to the LB, so a probe made in the LB's namespace would
//! be answered by the LB itself. Probes are made in a network namespace of
//! the agent's own (`lbprobe-…`), joined to the LB's by a veth pair: a
//! socket made there (by a thread that entered it: the fd then works from
//! anywhere) binds the LB's own address towards the backend and a probe
//! port (lb-common/src/probe.rs), which the prober records in `PROBES`
//! (`PROBES6` for an IPv6 service) before it connects. `lb_probe` on the veth's host end sends the probe
//! on to its backend; the `lb` program hands the answer back into the
//! veth. Setting up the namespace uses `ip` (iproute2).
//!
//! One prober per agent: a restarted agent replaces the namespace a killed
//! one left (same name, derived from the pin dir), a stopping agent
//! (drop) and `lb teardown` remove it.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    hash::{Hash, Hasher},
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsFd, AsRawFd as _},
    path::{Path, PathBuf},
    process::Command,
    sync::{Arc, Mutex, PoisonError, mpsc},
    time::Duration,
};

use anyhow::{Context, bail};
use aya::maps::{Array, HashMap, Map, MapData};
use lb_common::{
    ipv6::addr_of,
    probe::{PROBE_PORT_FIRST, PROBE_PORTS, ProbeConf, ProbeEntry, ProbeEntry6},
};
use rustix::thread::{LinkNameSpaceType, move_into_link_name_space};
use tokio::net::{TcpSocket, TcpStream, UdpSocket};

use super::probe::ProbeError;
use crate::{
    config::{CheckKind, HealthCheck},
    dataplane::{Dataplane, MapName, ServiceRoute},
    xdp::{if_mac, ifindex},
};

/// The probe namespace's end of the veth (inside it; the name is its own).
const PROBE_IF: &str = "probe0";
/// The probe namespace's gateway: a link-local address whose MAC is the
/// host end's (a permanent neighbour entry: no ARP crosses the veth).
const GATEWAY: &str = "169.254.0.1";
/// IPv6's gateway: link-local too, the host end's MAC as permanent.
const GATEWAY6: &str = "fe80::1";

/// The names a pin dir's prober uses: its namespace and its host veth.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Names {
    pub netns: String,
    pub host_if: String,
}

impl Names {
    /// Derived from the agent's pin dir, so a restarted agent and
    /// `lb teardown` find what a previous agent made.
    pub fn for_pin_dir(pin_dir: &Path) -> Names {
        let mut h = std::hash::DefaultHasher::new();
        pin_dir.hash(&mut h);
        let tag = format!("{:08x}", h.finish() as u32);
        Names {
            netns: format!("lbprobe-{tag}"),
            host_if: format!("lbp{tag}"),
        }
    }

    fn netns_path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.netns)
    }
}

/// Removes a prober's namespace and veth (if there are any): agent stop,
/// `lb teardown`, and before a restarted agent makes its own. Whether
/// there was one.
pub fn remove(names: &Names) -> bool {
    let had = names.netns_path().exists();
    if had {
        // Deleting the namespace deletes its veth end, and so the pair.
        let _ = ip(&["netns", "del", &names.netns]);
    }
    if ifindex(&names.host_if).is_ok() {
        let _ = ip(&["link", "del", &names.host_if]);
    }
    had
}

/// Runs `ip ARGS`, failing with its stderr.
fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Brings the prober in line with `cfg` before the checks are synced: made
/// when a check first asks for it (a failure is logged, and those checks
/// report agent errors until a later sync makes it), and told the
/// services' data plane ids after every commit.
pub fn follow(checker: &mut super::HealthChecker, dp: &mut Dataplane, cfg: &crate::config::Config) {
    if checker.wants_through_vip(cfg) {
        match dp.pin_dir().map(Path::to_path_buf) {
            Some(dir) => match ThroughVip::start(dp, &dir) {
                Ok(prober) => checker.set_through_vip(prober),
                Err(e) => tracing::error!(
                    "checks through the VIP cannot run: setting up their probe namespace: {e:#}"
                ),
            },
            None => tracing::error!(
                "checks through the VIP need a pinned data plane (the agent's pin dir)"
            ),
        }
    }
    if let Some(prober) = checker.through_vip() {
        prober.set_services(dp.service_routes(cfg));
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// A thread that lives in the probe namespace: sockets made by its jobs
/// belong there.
struct NetnsThread {
    jobs: Mutex<mpsc::Sender<Job>>,
}

impl NetnsThread {
    fn spawn(path: &Path) -> anyhow::Result<NetnsThread> {
        let file = fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let (tx, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("lb-probe-netns".into())
            .spawn(move || {
                let entered =
                    move_into_link_name_space(file.as_fd(), Some(LinkNameSpaceType::Network));
                let ok = entered.is_ok();
                let _ = ready_tx.send(entered);
                if ok {
                    for job in rx {
                        job();
                    }
                }
            })
            .context("starting the probe namespace's thread")?;
        ready_rx
            .recv()
            .context("the probe namespace's thread")?
            .context("entering the probe namespace")?;
        Ok(NetnsThread {
            jobs: Mutex::new(tx),
        })
    }

    /// Runs `f` in the namespace and returns what it returned.
    fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> io::Result<T> {
        let (tx, rx) = mpsc::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(f());
        });
        self.jobs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .send(job)
            .map_err(|_| io::Error::other("the probe namespace's thread is gone"))?;
        rx.recv()
            .map_err(|_| io::Error::other("the probe namespace's thread is gone"))
    }
}

/// The agent's prober through the VIP. Cheap to clone (one per check).
#[derive(Clone)]
pub struct ThroughVip {
    inner: Arc<Inner>,
}

struct Inner {
    names: Names,
    thread: NetnsThread,
    probes: Mutex<HashMap<MapData, u16, ProbeEntry>>,
    probes6: Mutex<HashMap<MapData, u16, ProbeEntry6>>,
    /// The host end's MAC, the IPv6 gateway's (set up at the first IPv6
    /// probe).
    host_mac: [u8; 6],
    conf: Mutex<Array<MapData, ProbeConf>>,
    ports: Mutex<Ports>,
    /// The LB addresses already on the probe namespace's end.
    sources: Mutex<BTreeSet<IpAddr>>,
    services: Mutex<BTreeMap<String, ServiceRoute>>,
}

/// The probe ports, handed out in turn; those in flight are skipped.
struct Ports {
    next: u32,
    in_flight: BTreeSet<u16>,
}

impl Ports {
    fn take(&mut self) -> Option<u16> {
        for _ in 0..PROBE_PORTS {
            let port = PROBE_PORT_FIRST + (self.next % PROBE_PORTS) as u16;
            self.next = self.next.wrapping_add(1);
            if self.in_flight.insert(port) {
                return Some(port);
            }
        }
        None
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl ThroughVip {
    /// Makes the probe namespace and its veth (replacing any a previous
    /// agent of this pin dir left), attaches `lb_probe` to the host end
    /// and tells the `lb` program where answers go.
    pub fn start(dp: &mut Dataplane, pin_dir: &Path) -> anyhow::Result<ThroughVip> {
        let names = Names::for_pin_dir(pin_dir);
        if remove(&names) {
            tracing::info!(
                "replaced the probe namespace {} a previous agent left",
                names.netns
            );
        }
        let made = Self::make(dp, &names);
        if made.is_err() {
            remove(&names);
        }
        made
    }

    fn make(dp: &mut Dataplane, names: &Names) -> anyhow::Result<ThroughVip> {
        let (ns, host) = (names.netns.as_str(), names.host_if.as_str());
        ip(&["netns", "add", ns])?;
        ip(&[
            "link", "add", host, "type", "veth", "peer", "name", PROBE_IF, "netns", ns,
        ])?;
        ip(&["link", "set", host, "up"])?;
        // bpf_fib_lookup answers only for an interface that forwards.
        fs::write(format!("/proc/sys/net/ipv4/conf/{host}/forwarding"), "1")
            .with_context(|| format!("enabling forwarding on {host}"))?;
        let host_mac = if_mac(host)?;
        let host_index = ifindex(host)?;
        let mac_text = crate::xdp::mac_text(host_mac);
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        ip(&["-n", ns, "link", "set", PROBE_IF, "up"])?;
        ip(&[
            "-n",
            ns,
            "neigh",
            "replace",
            GATEWAY,
            "lladdr",
            &mac_text,
            "dev",
            PROBE_IF,
            "nud",
            "permanent",
        ])?;
        ip(&[
            "-n", ns, "route", "replace", "default", "via", GATEWAY, "dev", PROBE_IF, "onlink",
        ])?;
        let thread = NetnsThread::spawn(&names.netns_path())?;
        // Frames redirected into a veth are delivered only if its peer
        // runs XDP or GRO. The probes leave with their checksums whole:
        // `lb_probe` redirects them as they are, and a veth would hand
        // them over with the checksum left to an offload that never
        // comes. And the probe end's MAC, for the answers.
        let probe_mac = thread
            .run(|| {
                ethtool_set(PROBE_IF, ETHTOOL_SGRO, 1)?;
                ethtool_set(PROBE_IF, ETHTOOL_STXCSUM, 0)?;
                if_mac(PROBE_IF)
            })?
            .context("the probe namespace's veth")?;
        dp.attach_probe(host)
            .with_context(|| format!("attaching lb_probe to {host}"))?;
        let probes =
            HashMap::try_from(Map::HashMap(dp.map_data(MapName::PROBES)?)).context("map PROBES")?;
        let probes6 = HashMap::try_from(Map::HashMap(dp.map_data(MapName::PROBES6)?))
            .context("map PROBES6")?;
        let mut conf: Array<MapData, ProbeConf> =
            Array::try_from(Map::Array(dp.map_data(MapName::PROBE_CONF)?))
                .context("map PROBE_CONF")?;
        conf.set(
            0,
            ProbeConf {
                ifindex: host_index,
                probe_mac,
                host_mac,
            },
            0,
        )
        .context("writing PROBE_CONF")?;
        tracing::info!("checks through the VIP probe from the namespace {ns} (veth {host})");
        Ok(ThroughVip {
            inner: Arc::new(Inner {
                names: names.clone(),
                thread,
                probes: Mutex::new(probes),
                probes6: Mutex::new(probes6),
                host_mac,
                conf: Mutex::new(conf),
                ports: Mutex::new(Ports {
                    next: 0,
                    in_flight: BTreeSet::new(),
                }),
                sources: Mutex::default(),
                services: Mutex::default(),
            }),
        })
    }

    pub fn names(&self) -> &Names {
        &self.inner.names
    }

    /// The services' VIPs and data plane ids, after every commit.
    pub fn set_services(&self, services: BTreeMap<String, ServiceRoute>) {
        *lock(&self.inner.services) = services;
    }

    /// Gets a probe of `service` to `backend` over `protocol` ready: its
    /// source address on the namespace's end, a port taken and its entry
    /// written (`PROBES`, or `PROBES6` for IPv6; the other family's entry of
    /// the port removed: a port is one probe). The port is free again when
    /// the guard drops.
    fn prepare(
        &self,
        service: &str,
        backend: SocketAddr,
        protocol: i32,
    ) -> Result<Prepared, ProbeError> {
        let agent = |why: String| ProbeError::Agent(why);
        let (vip, service_id, backend_id) = lock(&self.inner.services)
            .get(service)
            .and_then(|r| Some((r.vip, r.id, *r.backends.get(&backend)?)))
            .ok_or_else(|| agent(format!("{service}/{backend} is not in the data plane yet")))?;
        let source = source_towards(backend)
            .map_err(|e| agent(format!("no LB address towards {backend}: {e}")))?;
        self.ensure_source(source)
            .map_err(|e| agent(format!("probe address {source}: {e:#}")))?;
        let port = lock(&self.inner.ports)
            .take()
            .ok_or_else(|| agent("every probe port is in flight".into()))?;
        let guard = PortGuard {
            inner: Arc::clone(&self.inner),
            port,
        };
        let key = port.to_be();
        let ids = (service_id, backend_id);
        let protocol = protocol as u8;
        let written = match (vip, backend) {
            (SocketAddr::V4(vip), SocketAddr::V4(backend)) => {
                let raw =
                    |a: std::net::SocketAddrV4| (u32::from_ne_bytes(a.ip().octets()), a.port());
                let entry = ProbeEntry::new(raw(vip), protocol, raw(backend), ids);
                let _ = lock(&self.inner.probes6).remove(&key);
                lock(&self.inner.probes).insert(key, entry, 0)
            }
            (SocketAddr::V6(vip), SocketAddr::V6(backend)) => {
                let raw = |a: std::net::SocketAddrV6| (addr_of(a.ip().octets()), a.port());
                let entry = ProbeEntry6::new(raw(vip), protocol, raw(backend), ids);
                let _ = lock(&self.inner.probes).remove(&key);
                lock(&self.inner.probes6).insert(key, entry, 0)
            }
            _ => {
                return Err(agent(format!(
                    "{service}: VIP {vip} and backend {backend} are of two families"
                )));
            }
        };
        written.map_err(|e| agent(format!("writing the probe's entry: {e}")))?;
        Ok(Prepared {
            vip,
            from: SocketAddr::new(source, port),
            _port: guard,
        })
    }

    /// A TCP connection to `service`'s VIP, carried to `backend` by the
    /// data plane, within `timeout`.
    async fn connect(
        &self,
        service: &str,
        backend: SocketAddr,
        timeout: Duration,
    ) -> Result<(TcpStream, Prepared), ProbeError> {
        let probe = self.prepare(service, backend, libc::IPPROTO_TCP)?;
        let (vip, from) = (probe.vip, probe.from);
        let new = match from {
            SocketAddr::V4(_) => TcpSocket::new_v4,
            SocketAddr::V6(_) => TcpSocket::new_v6,
        };
        let socket = self
            .inner
            .thread
            .run(new)
            .and_then(|made| made)
            .map_err(|e| ProbeError::Agent(format!("probe socket: {e}")))?;
        socket
            .set_reuseaddr(true)
            .and_then(|()| socket.bind(from))
            .map_err(|e| ProbeError::Agent(format!("binding {from}: {e}")))?;
        let stream = tokio::time::timeout(timeout, socket.connect(vip))
            .await
            .map_err(|_| {
                ProbeError::Backend(format!(
                    "connect {vip} through the VIP: timed out after {}",
                    crate::config::duration::show(timeout)
                ))
            })?
            .map_err(|e| {
                ProbeError::Backend(format!(
                    "connect {vip} through the VIP: {}",
                    super::probe::io_reason(&e)
                ))
            })?;
        Ok((stream, probe))
    }

    /// A UDP socket connected to `service`'s VIP, whose datagrams the data
    /// plane carries to `backend`.
    fn udp(&self, service: &str, backend: SocketAddr) -> Result<(UdpSocket, Prepared), ProbeError> {
        let probe = self.prepare(service, backend, libc::IPPROTO_UDP)?;
        let (vip, from) = (probe.vip, probe.from);
        let socket = self
            .inner
            .thread
            .run(move || {
                let socket = std::net::UdpSocket::bind(from)?;
                socket.connect(vip)?;
                socket.set_nonblocking(true)?;
                Ok::<_, io::Error>(socket)
            })
            .and_then(|made| made)
            .and_then(UdpSocket::from_std)
            .map_err(|e| ProbeError::Agent(format!("probe socket {from}: {e}")))?;
        Ok((socket, probe))
    }

    /// One probe of `check` (tcp, http or udp) of `backend` of `service`
    /// through the VIP, all of it within the check's timeout.
    pub async fn probe(
        &self,
        service: &str,
        backend: SocketAddr,
        check: &HealthCheck,
    ) -> Result<(), ProbeError> {
        let timeout = check.timeout;
        let deadline = super::probe::deadline_after(timeout);
        let outcome = match &check.check {
            CheckKind::Udp(udp) => {
                let (socket, probe) = self.udp(service, backend)?;
                super::udp::exchange_on(&socket, probe.vip, &udp.send, deadline, timeout, |_| true)
                    .await
                    .and_then(|reply| {
                        udp.expect
                            .check(&reply)
                            .map_err(|why| ProbeError::Backend(format!("{}: {why}", probe.vip)))
                    })
            }
            _ => {
                let (stream, probe) = self.connect(service, backend, timeout).await?;
                super::probe::converse(stream, probe.vip, &check.check, deadline, timeout).await
            }
        };
        outcome.map_err(|e| match e {
            ProbeError::Backend(why) => ProbeError::Backend(format!("through the VIP: {why}")),
            agent => agent,
        })
    }

    /// Puts `source` on the probe namespace's end (once): a /32, or a /128
    /// without duplicate address detection (a tentative address cannot be
    /// bound; the LB owns it on its own side, no one else answers for it
    /// on the veth). The first IPv6 source brings IPv6's way out too.
    fn ensure_source(&self, source: IpAddr) -> anyhow::Result<()> {
        let mut sources = lock(&self.inner.sources);
        if sources.contains(&source) {
            return Ok(());
        }
        let ns = self.inner.names.netns.as_str();
        match source {
            IpAddr::V4(v4) => ip(&[
                "-n",
                ns,
                "addr",
                "replace",
                &format!("{v4}/32"),
                "dev",
                PROBE_IF,
            ])?,
            IpAddr::V6(v6) => {
                if !sources.iter().any(IpAddr::is_ipv6) {
                    self.route_ipv6()?;
                }
                ip(&[
                    "-n",
                    ns,
                    "addr",
                    "replace",
                    &format!("{v6}/128"),
                    "dev",
                    PROBE_IF,
                    "nodad",
                ])?;
            }
        }
        sources.insert(source);
        Ok(())
    }

    /// IPv6's way out of the probe namespace, as IPv4's: a default route
    /// via a link-local gateway whose MAC is the host end's (a permanent
    /// neighbour entry: no neighbour discovery crosses for the probes), and
    /// forwarding on the host end, without which `bpf_fib_lookup` answers
    /// nothing for IPv6 there. Made at the first IPv6 probe, so a host
    /// without IPv6 still probes IPv4 through the VIP.
    fn route_ipv6(&self) -> anyhow::Result<()> {
        let (ns, host) = (
            self.inner.names.netns.as_str(),
            self.inner.names.host_if.as_str(),
        );
        fs::write(format!("/proc/sys/net/ipv6/conf/{host}/forwarding"), "1")
            .with_context(|| format!("enabling IPv6 forwarding on {host}"))?;
        let mac_text = crate::xdp::mac_text(self.inner.host_mac);
        ip(&[
            "-n",
            ns,
            "-6",
            "neigh",
            "replace",
            GATEWAY6,
            "lladdr",
            &mac_text,
            "dev",
            PROBE_IF,
            "nud",
            "permanent",
        ])?;
        ip(&[
            "-n", ns, "-6", "route", "replace", "default", "via", GATEWAY6, "dev", PROBE_IF,
        ])
    }
}

/// A probe ready to go: where to, from where, and its port.
struct Prepared {
    vip: SocketAddr,
    from: SocketAddr,
    /// Held for its `Drop`: the port is in flight until then.
    _port: PortGuard,
}

/// A probe port in flight; free again when dropped. Its `PROBES` entry
/// stays until the port's next probe: the connection's last segments
/// (FIN, ACK) still go to the backend.
pub struct PortGuard {
    inner: Arc<Inner>,
    port: u16,
}

impl Drop for PortGuard {
    fn drop(&mut self) {
        lock(&self.inner.ports).in_flight.remove(&self.port);
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Nothing more is handed into a veth that is going away.
        let _ = lock(&self.conf).set(0, ProbeConf::default(), 0);
        remove(&self.names);
    }
}

/// The LB's own address the kernel sends from towards `backend` (its
/// route's source): what a backend answers to directly.
fn source_towards(backend: SocketAddr) -> io::Result<IpAddr> {
    let any = match backend {
        SocketAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        SocketAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    let socket = std::net::UdpSocket::bind(SocketAddr::new(any, 0))?;
    socket.connect(backend)?;
    Ok(socket.local_addr()?.ip())
}

/// `SIOCETHTOOL` (linux/sockios.h); `ETHTOOL_SGRO` and `ETHTOOL_STXCSUM`
/// (linux/ethtool.h).
const SIOCETHTOOL: libc::c_ulong = 0x8946;
const ETHTOOL_SGRO: u32 = 0x2c;
const ETHTOOL_STXCSUM: u32 = 0x17;

/// One `ethtool -K DEV …` switch (`cmd`, on or off), in the calling
/// thread's namespace.
fn ethtool_set(dev: &str, cmd: u32, on: u32) -> anyhow::Result<()> {
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").context("socket")?;
    let mut value = EthtoolValue { cmd, data: on };
    // SAFETY: ifreq is plain data; all-zero is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(dev.bytes()) {
        *d = s as libc::c_char;
    }
    req.ifr_ifru.ifru_data = (&raw mut value).cast();
    // SAFETY: a valid ifreq pointing at a live ethtool_value.
    let rc = unsafe { libc::ioctl(socket.as_raw_fd(), SIOCETHTOOL, &mut req) };
    if rc != 0 {
        bail!(
            "ethtool command {cmd:#x} on {dev}: {}",
            io::Error::last_os_error()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_pin_dir_and_fit_an_interface_name() {
        let a = Names::for_pin_dir(Path::new("/sys/fs/bpf/lb"));
        assert_eq!(a, Names::for_pin_dir(Path::new("/sys/fs/bpf/lb")));
        assert_ne!(a, Names::for_pin_dir(Path::new("/sys/fs/bpf/lb2")));
        assert!(a.host_if.len() < libc::IFNAMSIZ, "{}", a.host_if);
        assert!(a.netns.starts_with("lbprobe-"));
    }

    #[test]
    fn ports_are_handed_out_in_turn_skipping_those_in_flight() {
        let mut ports = Ports {
            next: 0,
            in_flight: BTreeSet::new(),
        };
        assert_eq!(ports.take(), Some(PROBE_PORT_FIRST));
        assert_eq!(ports.take(), Some(PROBE_PORT_FIRST + 1));
        ports.in_flight.remove(&PROBE_PORT_FIRST);
        ports.next = 0;
        assert_eq!(ports.take(), Some(PROBE_PORT_FIRST), "free again");
        assert_eq!(
            ports.take(),
            Some(PROBE_PORT_FIRST + 2),
            "one in flight is skipped"
        );
        for _ in 3..PROBE_PORTS {
            assert!(ports.take().is_some());
        }
        assert_eq!(ports.take(), None, "all in flight");
    }
}
