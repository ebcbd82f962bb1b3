//! The multi-LB lab as the end-to-end tests drive it (tests/tests/ha.rs,
//! tests/tests/sync_e2e.rs): two or more LBs with an agent each behind the
//! lab's BGP/ECMP router ([`Ha`]), keep-alive connections that each ask
//! `GET /` every 20 ms and note what they saw ([`Held`], [`ConnLog`]; from
//! client ports the router sends through a chosen LB: [`Held::open_via`]), a
//! stream of new connections, and an LB cut off as a dead host would be
//! ([`fail_lb1`]).

use std::{
    net::{IpAddr, SocketAddr, SocketAddrV4},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use lb_userspace::{
    config::Forwarding,
    control::{self, Request, Status, VipChange},
    harness::{
        lab::{
            AgentProcess, HA_CLIENT, HttpConn, Lab, VIP, http_get, lb_front_addr, lb_front_of,
            vip_http,
        },
        netns::in_netns,
    },
};

use crate::{lb_bin, unique_prefix};

/// How long BGP may take to bring a route up (sessions connect, BFD, the
/// first health verdicts).
pub const ROUTE_UP: Duration = Duration::from_secs(20);
/// BFD detects a dead LB after 5 × 100 ms; the route follows at once.
pub const ROUTE_FAILOVER: Duration = Duration::from_secs(5);
/// Keep-alive connections held across a failover.
pub const HELD: usize = 12;

/// A failed step's error with the agents' logs added after its cause: CI
/// shows the head of a long failure, and a cause printed below hundreds of
/// log lines (as `.context(ha.logs())` did) was cut from it.
pub trait WithAgentLogs<T> {
    fn with_agent_logs(self, ha: &Ha) -> Result<T>;
}

impl<T> WithAgentLogs<T> for Result<T> {
    fn with_agent_logs(self, ha: &Ha) -> Result<T> {
        self.map_err(|e| anyhow!("{e:#}\n\nthe agents' logs:\n{}", ha.logs()))
    }
}

/// A multi-LB lab with an agent on each LB. Agents stop before the lab
/// goes (field order).
pub struct Ha {
    pub agents: Vec<Option<AgentProcess>>,
    pub lab: Lab,
    /// The VIPs every agent announces (what BIRD must export), IPv4 and
    /// IPv6.
    pub vips: Vec<IpAddr>,
}

impl Ha {
    /// Two LBs in `mode`, both with `scheduler`, LB n with MED `meds[n-1]`;
    /// returns once the router's route is what the MEDs make it.
    pub fn up(mode: Forwarding, scheduler: &str, meds: [u32; 2]) -> Result<Ha> {
        Self::up_with(2, mode, scheduler, meds)
    }

    /// [`Ha::up`] in a lab of `lbs` LBs, agents on lb1 and lb2 only.
    pub fn up_with(lbs: usize, mode: Forwarding, scheduler: &str, meds: [u32; 2]) -> Result<Ha> {
        Self::up_configured(lbs, mode, meds, &[VIP], |lab, n, med| {
            lab.ha_config(n, mode, scheduler, med)
        })
    }

    /// A lab of `lbs` LBs in `mode`, agents on lb1 and lb2 with
    /// `config(lab, n, med)`, announcing `vips`; returns once the router's
    /// route to each is what the MEDs make it and both BGP sessions
    /// export them.
    pub fn up_configured<A: Into<IpAddr> + Copy>(
        lbs: usize,
        mode: Forwarding,
        meds: [u32; 2],
        vips: &[A],
        config: impl Fn(&Lab, usize, u32) -> String,
    ) -> Result<Ha> {
        let lab = Lab::up_ha(&unique_prefix("ha"), &lb_bin(), lbs)?;
        lab.set_mode(mode)?;
        let mut ha = Ha {
            agents: Vec::new(),
            lab,
            vips: vips.iter().map(|v| (*v).into()).collect(),
        };
        for n in 1..=2 {
            let config = config(&ha.lab, n, meds[n - 1]);
            ha.agents.push(Some(ha.lab.start_agent_on(n, &config)?));
        }
        let best = *meds.iter().min().context("meds")?;
        for vip in ha.vips.clone() {
            let want: Vec<IpAddr> = (1..=2)
                .filter(|n| meds[n - 1] == best)
                .map(|n| lb_front_of(n, vip))
                .collect();
            let took = ha
                .lab
                .wait_for_route_to(vip, &want, ROUTE_UP)
                .with_agent_logs(&ha)?;
            println!("route to {vip} via {want:?} after {took:?}");
        }
        // A standby's route is not in the kernel: its session must be up
        // too before a test fails the primary.
        for n in 1..=2 {
            ha.wait_for_session(n).with_agent_logs(&ha)?;
        }
        Ok(ha)
    }

    /// Waits until LB `n`'s agent sees its BIRD's BGP session established
    /// and exporting the VIPs (the agent looks every second).
    pub fn wait_for_session(&self, n: usize) -> Result<()> {
        let deadline = Instant::now() + ROUTE_UP;
        let mut vips: Vec<String> = self
            .vips
            .iter()
            .map(|v| match v {
                IpAddr::V4(v) => format!("{v}/32"),
                IpAddr::V6(v) => format!("{v}/128"),
            })
            .collect();
        vips.sort();
        loop {
            let a = self.status(n)?.announce.context("no announce status")?;
            let established = a.bird.as_ref().is_some_and(|b| {
                b.protocols.iter().any(|p| {
                    p.proto == "BGP"
                        && p.info.starts_with("Established")
                        && b.exported.get(&p.name).is_some_and(|e| {
                            let mut e = e.clone();
                            e.sort();
                            e == vips
                        })
                })
            });
            if established {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("lb{n}: BIRD's session not seen established and exporting {vips:?}: {a:?}");
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn status(&self, n: usize) -> Result<Status> {
        control::request(&self.lab.agent_socket_of(n), &Request::Status)?
            .status
            .context("no status")
    }

    /// Packets LB `n` has forwarded for its services.
    pub fn packets(&self, n: usize) -> Result<u64> {
        let s = self.status(n)?;
        Ok(s.services.iter().map(|s| s.packets).sum())
    }

    pub fn vip(&self, n: usize, change: VipChange) -> Result<String> {
        let r = control::request(&self.lab.agent_socket_of(n), &Request::Vip(change))?;
        if !r.ok {
            bail!("lb vip on lb{n}: {}", r.message);
        }
        Ok(r.message)
    }

    pub fn logs(&self) -> String {
        self.agents
            .iter()
            .enumerate()
            .filter_map(|(i, a)| {
                a.as_ref()
                    .map(|a| format!("lb{} agent:\n{}", i + 1, a.log_text()))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// `n` new connections from the client; the names of the webs that
    /// answered.
    pub fn new_connections(&self, n: usize) -> Result<Vec<String>> {
        in_netns(&self.lab.client_ns(), || {
            (0..n)
                .map(|_| http_get(vip_http(), "/").map(|r| r.text()))
                .collect::<Result<Vec<_>>>()
        })?
    }
}

/// Keep-alive connections, each asking `GET /` every 20 ms on its own
/// thread until stopped; what each saw.
pub struct Held {
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<ConnLog>>,
    /// Each connection's service and its own (client) address.
    pub conns: Vec<(SocketAddrV4, SocketAddrV4)>,
}

/// The client ports [`Held::open_via`] chooses from: below the client's
/// ephemeral range (32768–60999), so no connection the kernel numbers
/// (wrk's, curl's) can hold one.
pub const CHOSEN_PORTS: std::ops::Range<u16> = 20_000..24_000;

#[derive(Debug, Default)]
pub struct ConnLog {
    /// The service address the connection went to.
    pub service: Option<SocketAddr>,
    /// The connection's own address (the client's address and port).
    pub local: Option<SocketAddr>,
    /// The web that answered the first request.
    pub backend: String,
    pub answers: usize,
    /// A request that failed (the connection is broken), or an answer
    /// from another web than the first (the flow moved backends).
    pub error: Option<String>,
    /// The longest time between two answers.
    pub longest_gap: Duration,
}

impl Held {
    /// `n` connections to the VIP's HTTP service.
    pub fn open(lab: &Lab, n: usize) -> Result<Held> {
        Self::open_to(lab, n, &[vip_http()])
    }

    /// `n` connections to each of `services`.
    pub fn open_to(lab: &Lab, n: usize, services: &[SocketAddr]) -> Result<Held> {
        let mut conns = Vec::new();
        for service in services {
            for _ in 0..n {
                let conn = in_netns(&lab.client_ns(), || HttpConn::connect(*service))??;
                conns.push((*service, conn));
            }
        }
        Self::hold(conns)
    }

    /// `n` connections to each of `services` from client ports that the
    /// router's ECMP route sends through LB `lb` while every LB is in it
    /// ([`Lab::ecmp_next_hop`], the router's own lookup): a test that moves
    /// flows between LBs knows which ones it moves. Call it with every LB
    /// in the route.
    pub fn open_via(lab: &Lab, n: usize, services: &[SocketAddrV4], lb: usize) -> Result<Held> {
        let via = lb_front_addr(lb);
        let mut ports = CHOSEN_PORTS;
        let mut conns = Vec::new();
        for service in services {
            let mut chosen = 0;
            while chosen < n {
                let port = ports.next().with_context(|| {
                    format!(
                        "only {chosen} of the client ports {CHOSEN_PORTS:?} left go via lb{lb} to \
                         {service}, {n} wanted"
                    )
                })?;
                let client = SocketAddrV4::new(HA_CLIENT, port);
                if lab.ecmp_next_hop(client, *service)? != via {
                    continue;
                }
                let conn = in_netns(&lab.client_ns(), || {
                    HttpConn::connect_from_port(client, *service)
                })??;
                conns.push((SocketAddr::V4(*service), conn));
                chosen += 1;
            }
        }
        Self::hold(conns)
    }

    /// A thread per connection, asking until [`Held::close`].
    fn hold(conns: Vec<(SocketAddr, HttpConn)>) -> Result<Held> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let mut addrs = Vec::new();
        for (service, conn) in conns {
            let local = conn.local_addr()?;
            if let (SocketAddr::V4(s), SocketAddr::V4(l)) = (service, local) {
                addrs.push((s, l));
            }
            let stop = stop.clone();
            threads.push(thread::spawn(move || {
                let mut log = ask_until(conn, &stop);
                log.service = Some(service);
                log.local = Some(local);
                log
            }));
        }
        Ok(Held {
            stop,
            threads,
            conns: addrs,
        })
    }

    pub fn close(self) -> Vec<ConnLog> {
        self.stop.store(true, Ordering::Relaxed);
        self.threads
            .into_iter()
            .map(|t| t.join().expect("connection thread"))
            .collect()
    }
}

fn ask_until(mut conn: HttpConn, stop: &AtomicBool) -> ConnLog {
    let mut log = ConnLog::default();
    let mut last = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        match conn.get("/") {
            Ok(r) => {
                let now = Instant::now();
                log.longest_gap = log.longest_gap.max(now - last);
                last = now;
                log.answers += 1;
                let name = r.text();
                if log.backend.is_empty() {
                    log.backend = name;
                } else if name != log.backend {
                    log.error = Some(format!("moved from {} to {name}", log.backend));
                    break;
                }
            }
            Err(e) => {
                log.error = Some(format!("{e:#}"));
                break;
            }
        }
        thread::sleep(Duration::from_millis(20));
    }
    log
}

/// New connections to `service` every 20 ms until stopped: (answered,
/// failed).
pub fn new_connection_stream_to(
    lab: &Lab,
    service: SocketAddr,
    stop: Arc<AtomicBool>,
) -> thread::JoinHandle<(usize, Vec<String>)> {
    let ns = lab.client_ns();
    thread::spawn(move || {
        in_netns(&ns, move || {
            let (mut ok, mut failed) = (0, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                match http_get(service, "/") {
                    Ok(_) => ok += 1,
                    Err(e) => failed.push(format!("{e:#}")),
                }
                thread::sleep(Duration::from_millis(20));
            }
            (ok, failed)
        })
        .expect("client thread")
    })
}

/// [`new_connection_stream_to`] the VIP's HTTP service.
pub fn new_connection_stream(
    lab: &Lab,
    stop: Arc<AtomicBool>,
) -> thread::JoinHandle<(usize, Vec<String>)> {
    new_connection_stream_to(lab, vip_http(), stop)
}

/// What a failover did to the held connections and the new ones.
#[derive(Debug)]
pub struct Failover {
    /// From the link going down to the router's route without lb1.
    pub convergence: Duration,
    /// Held connections whose flow crossed lb1 before (their packets
    /// moved to lb2), as counted by lb1's packet counter moving: > 0.
    pub lb1_packets_before: u64,
    pub held: Vec<ConnLog>,
    pub new_ok: usize,
    pub new_failed: Vec<String>,
}

/// A gap longer than any of TCP's on a live path: the connection's flow
/// crossed the LB that went away.
pub const MOVED_GAP: Duration = Duration::from_millis(200);

impl Failover {
    pub fn broken(&self) -> usize {
        self.held.iter().filter(|c| c.error.is_some()).count()
    }

    /// Held connections that felt the failover (a gap longer than any
    /// of TCP's on a live path, or broken): those whose flow crossed lb1.
    pub fn moved(&self) -> usize {
        self.held
            .iter()
            .filter(|c| c.error.is_some() || c.longest_gap > MOVED_GAP)
            .count()
    }

    pub fn longest_gap(&self) -> Duration {
        self.held
            .iter()
            .filter(|c| c.error.is_none())
            .map(|c| c.longest_gap)
            .max()
            .unwrap_or_default()
    }

    pub fn report(&self, what: &str) {
        println!(
            "{what}: route converged in {:?}; held connections: {} of {} crossed lb1, {} broken, longest gap {:?}; \
             new connections: {} answered, {} failed",
            self.convergence,
            self.moved(),
            self.held.len(),
            self.broken(),
            self.longest_gap(),
            self.new_ok,
            self.new_failed.len()
        );
        for c in self.held.iter().filter(|c| c.error.is_some()) {
            println!(
                "  broken after {} answers from {}: {:?}",
                c.answers, c.backend, c.error
            );
        }
    }
}

/// Holds connections and a stream of new ones while lb1 is cut off (a dead host: its switch port stops forwarding);
/// `survivors` are the LBs the route must end on.
pub fn fail_lb1(ha: &Ha, survivors: &[usize]) -> Result<Failover> {
    fail_lb1_to(ha, survivors, vip_http())
}

/// [`fail_lb1`] with the connections to `service` (IPv4 or IPv6), and
/// the route to its VIP waited for.
pub fn fail_lb1_to(ha: &Ha, survivors: &[usize], service: SocketAddr) -> Result<Failover> {
    fail_lb1_to_then(ha, survivors, service, |_| Ok(()))
}

/// [`fail_lb1_to`], with `after_cut` run once lb1's switch port stopped
/// forwarding (e.g. the rest of the host going: its back leg, the webs'
/// gateway moved).
pub fn fail_lb1_to_then(
    ha: &Ha,
    survivors: &[usize],
    service: SocketAddr,
    after_cut: impl FnOnce(&Ha) -> Result<()>,
) -> Result<Failover> {
    let held = Held::open_to(&ha.lab, HELD, &[service])?;
    let stop = Arc::new(AtomicBool::new(false));
    let stream = new_connection_stream_to(&ha.lab, service, stop.clone());
    thread::sleep(Duration::from_millis(1000));
    let lb1_packets_before = ha.packets(1)?;
    let down_at = Instant::now();
    ha.lab.set_lb_reachable(1, false)?;
    after_cut(ha)?;
    let want: Vec<IpAddr> = survivors
        .iter()
        .map(|n| lb_front_of(*n, service.ip()))
        .collect();
    let converged = ha
        .lab
        .wait_for_route_to(service.ip(), &want, ROUTE_FAILOVER);
    let convergence = down_at.elapsed();
    // Long enough for TCP's retransmissions to find the new path.
    thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::Relaxed);
    let held = held.close();
    let (new_ok, new_failed) = stream.join().expect("stream thread");
    converged?;
    Ok(Failover {
        convergence,
        lb1_packets_before,
        held,
        new_ok,
        new_failed,
    })
}
