//! `lb run`: the agent. Validates the config, loads (or adopts) the pinned
//! data plane, attaches it, runs health checks, serves the control socket,
//! reloads on SIGHUP, and on SIGINT/SIGTERM exits leaving the pinned data
//! plane forwarding (a restart adopts it; `lb teardown` removes it).
//!
//! Every change — reload, `lb backend …`, a health transition — goes through
//! [`Agent::commit`]: the whole new state is checked first, then written to
//! the maps with the double-buffered ring switch, or rejected with nothing
//! changed.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, bail};
use log::{error, info, warn};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};

use crate::{
    config::{self, Config, Forwarding, OnBackendDown, Protocol, Scheduler},
    control::{self, BackendChange, BackendStatus, Request, Response, ServiceStatus, Status},
    dataplane::{Admission, AppliedService, Dataplane},
    health::{HealthChecker, Transition},
};

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// The TOML config (see config/foobar.toml)
    #[arg(long, short)]
    pub config: PathBuf,
    /// Control socket for `lb status`, `lb backend`, `lb reload`
    #[arg(long, default_value = control::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// bpffs directory where maps and XDP links are pinned, so the data plane
    /// keeps forwarding when the agent stops and a new agent adopts it
    #[arg(long, default_value = DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
}

pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/lb";

/// How often neighbour entries of backends are refreshed.
const NEIGHBOUR_REFRESH: Duration = Duration::from_secs(10);
/// A control client must send its request within this time.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(5);

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    let cfg = config::load(&args.config)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve(args, cfg))
}

/// What an operator set with `lb backend` (kept until a reload or restart).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Admin {
    Enabled,
    Drain,
    Disabled,
}

type Key = (String, String);

struct Agent {
    path: PathBuf,
    cfg: Config,
    dp: Dataplane,
    adopted: bool,
    admin: BTreeMap<Key, Admin>,
    /// Health as last reported; absent means up (checks start optimistic).
    down: BTreeMap<Key, bool>,
    checker: Option<HealthChecker>,
    health_tx: mpsc::UnboundedSender<Transition>,
    applied: Vec<AppliedService>,
}

async fn serve(args: RunArgs, cfg: Config) -> anyhow::Result<()> {
    check_forwarding(&cfg)?;
    ensure_bpffs(&args.pin_dir)?;
    let (dp, adopted) = Dataplane::load_pinned(cfg.dataplane.conntrack_size, &args.pin_dir)
        .with_context(|| {
            format!(
                "loading the data plane (pinned under {})",
                args.pin_dir.display()
            )
        })?;
    if adopted {
        info!(
            "adopting the data plane pinned under {} (flows, rings, counters)",
            args.pin_dir.display()
        );
    }
    let (health_tx, mut health_rx) = mpsc::unbounded_channel();
    let mut agent = Agent {
        path: args.config.clone(),
        cfg: cfg.clone(),
        dp,
        adopted,
        admin: BTreeMap::new(),
        down: BTreeMap::new(),
        checker: None,
        health_tx,
        applied: Vec::new(),
    };
    agent.commit(cfg).context("filling the maps")?;
    agent.restart_health_checks();
    for iface in agent.cfg.dataplane.interfaces.clone() {
        let mode = agent.cfg.dataplane.xdp_mode;
        agent
            .dp
            .attach(&iface, mode)
            .with_context(|| format!("attaching XDP ({mode:?} mode) to {iface}"))?;
        info!(
            "attached lb to {iface} ({mode:?} mode{})",
            if adopted {
                ", replacing the previous program in place"
            } else {
                ""
            }
        );
    }
    prime_neighbours(&agent.cfg);
    let listener = bind_control(&args.socket)?;
    info!("control socket {}", args.socket.display());
    // Handlers before the ready line: a SIGTERM right after it must stop the
    // agent cleanly, not kill it with the default action.
    let mut sigint = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
    // The line scripts and the lab wait for.
    println!("lb: ready");
    let mut refresh = tokio::time::interval(NEIGHBOUR_REFRESH);
    loop {
        tokio::select! {
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = sighup.recv() => {
                if let Err(e) = agent.reload() {
                    error!("reload rejected, running config unchanged: {e:#}");
                }
            }
            Some(t) = health_rx.recv() => agent.health_transition(t),
            conn = listener.accept() => match conn {
                Ok((stream, _)) => agent.handle_client(stream).await,
                Err(e) => warn!("control socket: {e}"),
            },
            _ = refresh.tick() => prime_neighbours(&agent.cfg),
        }
    }
    let _ = std::fs::remove_file(&args.socket);
    info!(
        "agent stopping; the data plane stays attached to {} and pinned under {} \
         (a new `lb run` adopts it; `lb teardown` removes it)",
        agent.cfg.dataplane.interfaces.join(", "),
        args.pin_dir.display()
    );
    Ok(())
}

impl Agent {
    fn key(service: &str, backend: &str) -> Key {
        (service.to_string(), backend.to_string())
    }

    /// Checks `next` whole, then writes it to the data plane atomically.
    fn commit(&mut self, next: Config) -> anyhow::Result<()> {
        let admit = Agent::admission_fn(&self.admin, &self.down);
        let applied = self.dp.apply_with(&next, &admit)?;
        report(&next, &applied);
        self.cfg = next;
        self.applied = applied;
        Ok(())
    }

    /// Whether a backend takes new flows: admin state first, then health.
    fn admission_fn<'a>(
        admin: &'a BTreeMap<Key, Admin>,
        down: &'a BTreeMap<Key, bool>,
    ) -> impl Fn(&config::Service, &config::Backend) -> Admission + 'a {
        move |svc, b| {
            let key = Agent::key(&svc.name, &b.name);
            match admin.get(&key).copied().unwrap_or(Admin::Enabled) {
                Admin::Disabled => Admission {
                    in_rotation: false,
                    drop_flows: true,
                },
                Admin::Drain => Admission {
                    in_rotation: false,
                    drop_flows: false,
                },
                Admin::Enabled if down.get(&key).copied().unwrap_or(false) => Admission {
                    in_rotation: false,
                    drop_flows: svc.on_backend_down == OnBackendDown::DropFlows,
                },
                Admin::Enabled => Admission::SERVING,
            }
        }
    }

    /// Health checks restart with every config change: every backend starts
    /// up again (as HAProxy does on reload) and is re-judged within
    /// `fall` × `interval`.
    fn restart_health_checks(&mut self) {
        self.checker = None;
        self.down.clear();
        if self
            .cfg
            .services
            .iter()
            .any(|s| s.health.is_some() || s.backends.iter().any(|b| b.health.is_some()))
        {
            self.checker = Some(HealthChecker::spawn(&self.cfg, self.health_tx.clone()));
        }
    }

    fn reload(&mut self) -> anyhow::Result<()> {
        let new = config::load(&self.path)?;
        if new.dataplane != self.cfg.dataplane {
            bail!(
                "[dataplane] changed (interfaces, modes, sizes): that needs a restart of `lb run`"
            );
        }
        self.admin.clear();
        self.commit(new)?;
        self.restart_health_checks();
        info!("reloaded {}", self.path.display());
        Ok(())
    }

    fn health_transition(&mut self, t: Transition) {
        let key = Self::key(&t.target.service, &t.target.backend);
        let was_down = self.down.get(&key).copied().unwrap_or(false);
        if was_down != t.up {
            // Already in that state (e.g. a transition queued before a reload).
            return;
        }
        let state = if t.up { "UP" } else { "DOWN" };
        warn!(
            "backend {}/{} is {state}: {}",
            t.target.service, t.target.backend, t.reason
        );
        self.down.insert(key, !t.up);
        let cfg = self.cfg.clone();
        if let Err(e) = self.commit(cfg) {
            error!("applying the health change failed: {e:#}");
        }
    }

    async fn handle_client(&mut self, stream: UnixStream) {
        let (read, mut write) = stream.into_split();
        let mut line = String::new();
        let read =
            tokio::time::timeout(CONTROL_TIMEOUT, BufReader::new(read).read_line(&mut line)).await;
        let response = match read {
            Ok(Ok(_)) => match serde_json::from_str::<Request>(&line) {
                Ok(req) => self.handle(req),
                Err(e) => Response::error(format!("bad request: {e}")),
            },
            Ok(Err(e)) => Response::error(format!("reading request: {e}")),
            Err(_) => Response::error("no request within 5 s"),
        };
        let mut out = serde_json::to_string(&response)
            .unwrap_or_else(|e| format!("{{\"ok\":false,\"message\":\"{e}\"}}"));
        out.push('\n');
        if let Err(e) = write.write_all(out.as_bytes()).await {
            warn!("control client: {e}");
        }
    }

    fn handle(&mut self, req: Request) -> Response {
        match req {
            Request::Status => match self.status() {
                Ok(status) => Response {
                    ok: true,
                    message: String::new(),
                    status: Some(status),
                },
                Err(e) => Response::error(format!("{e:#}")),
            },
            Request::Reload => match self.reload() {
                Ok(()) => Response::ok(format!("reloaded {}", self.path.display())),
                Err(e) => {
                    error!("reload rejected, running config unchanged: {e:#}");
                    Response::error(format!("reload rejected, running config unchanged: {e:#}"))
                }
            },
            Request::Backend(change) => {
                let what = format!("{change:?}");
                match self.change_backend(change) {
                    Ok(msg) => {
                        info!("{msg}");
                        Response::ok(msg)
                    }
                    Err(e) => {
                        warn!("rejected {what}: {e:#}");
                        Response::error(format!("rejected, nothing changed: {e:#}"))
                    }
                }
            }
        }
    }

    fn change_backend(&mut self, change: BackendChange) -> anyhow::Result<String> {
        let mut next = self.cfg.clone();
        let (service, backend) = match &change {
            BackendChange::Add {
                service, backend, ..
            }
            | BackendChange::Remove { service, backend }
            | BackendChange::Enable { service, backend }
            | BackendChange::Disable { service, backend }
            | BackendChange::Drain { service, backend }
            | BackendChange::Weight {
                service, backend, ..
            } => (service.clone(), backend.clone()),
        };
        let si = next
            .services
            .iter()
            .position(|s| s.name == service)
            .with_context(|| format!("service: no service named {service:?}"))?;
        let svc = &mut next.services[si];
        let position = svc.backends.iter().position(|b| b.name == backend);
        let key = Self::key(&service, &backend);
        let mut admin = self.admin.clone();
        let msg = match change {
            BackendChange::Add {
                address,
                weight,
                backup,
                ..
            } => {
                let address: SocketAddrV4 = address
                    .parse()
                    .with_context(|| format!("address: expected IPv4 address and port like \"198.19.0.14:80\", got {address:?}"))?;
                svc.backends.push(config::Backend {
                    name: backend.clone(),
                    address,
                    weight,
                    backup,
                    health: None,
                });
                format!("added {service}/{backend} {address}")
            }
            BackendChange::Remove { .. } => {
                let i = position
                    .with_context(|| format!("backend: no backend {backend:?} in {service}"))?;
                svc.backends.remove(i);
                admin.remove(&key);
                format!("removed {service}/{backend}; its flows are dropped")
            }
            BackendChange::Enable { .. }
            | BackendChange::Disable { .. }
            | BackendChange::Drain { .. } => {
                position
                    .with_context(|| format!("backend: no backend {backend:?} in {service}"))?;
                let (state, msg) = match change {
                    BackendChange::Enable { .. } => (Admin::Enabled, "enabled"),
                    BackendChange::Disable { .. } => {
                        (Admin::Disabled, "disabled (its flows are dropped)")
                    }
                    _ => (
                        Admin::Drain,
                        "draining (no new flows; established flows continue)",
                    ),
                };
                admin.insert(key.clone(), state);
                format!("{service}/{backend} {msg}")
            }
            BackendChange::Weight { weight, .. } => {
                let i = position
                    .with_context(|| format!("backend: no backend {backend:?} in {service}"))?;
                svc.backends[i].weight = weight;
                format!("{service}/{backend} weight {weight}")
            }
        };
        // The rules a config file goes through, so a live change can never
        // get in what a file could not (duplicates, weights, DSR ports, limits).
        let next = config::check(&next, Path::new("lb backend"))?;
        let added_or_removed =
            next.services[si].backends.len() != self.cfg.services[si].backends.len();
        let previous = std::mem::replace(&mut self.admin, admin);
        if let Err(e) = self.commit(next) {
            self.admin = previous;
            return Err(e);
        }
        if added_or_removed {
            self.restart_health_checks();
        }
        Ok(msg)
    }

    fn status(&self) -> anyhow::Result<Status> {
        let flows = self.dp.flows_per_backend()?;
        let health = self
            .checker
            .as_ref()
            .map(HealthChecker::states)
            .unwrap_or_default();
        let mut services = Vec::new();
        for (svc, applied) in self.cfg.services.iter().zip(&self.applied) {
            let traffic = self.dp.counters("SERVICE_STATS", applied.id)?;
            let mut backends = Vec::new();
            for (b, (_, id)) in svc.backends.iter().zip(&applied.backends) {
                let key = Self::key(&svc.name, &b.name);
                let counters = self.dp.counters("BACKEND_STATS", *id)?;
                let target = crate::health::Target {
                    service: svc.name.clone(),
                    backend: b.name.clone(),
                };
                let checked = svc.health_for(b).is_some();
                backends.push(BackendStatus {
                    name: b.name.clone(),
                    address: b.address.to_string(),
                    weight: b.weight,
                    backup: b.backup,
                    admin: match self.admin.get(&key).copied().unwrap_or(Admin::Enabled) {
                        Admin::Enabled => "enabled",
                        Admin::Drain => "drain",
                        Admin::Disabled => "disabled",
                    }
                    .into(),
                    health: if !checked {
                        "unchecked".into()
                    } else if self.down.get(&key).copied().unwrap_or(false) {
                        "down".into()
                    } else {
                        "up".into()
                    },
                    last_check: health.get(&target).and_then(|s| s.last_check.clone()),
                    in_ring: applied.ring.contains(id),
                    flows: flows.get(id).copied().unwrap_or(0),
                    packets: counters.packets,
                    bytes: counters.bytes,
                });
            }
            services.push(ServiceStatus {
                name: svc.name.clone(),
                vip: svc.vip.to_string(),
                protocol: match svc.protocol {
                    Protocol::Tcp => "tcp",
                    Protocol::Udp => "udp",
                }
                .into(),
                forwarding: match svc.forwarding {
                    Forwarding::Nat => "nat",
                    Forwarding::Dsr => "dsr",
                }
                .into(),
                scheduler: match svc.scheduler {
                    Scheduler::RoundRobin => "round-robin",
                    Scheduler::WeightedRoundRobin => "weighted-round-robin",
                    Scheduler::SourceHash => "source-hash",
                }
                .into(),
                packets: traffic.packets,
                bytes: traffic.bytes,
                backends,
            });
        }
        let verdicts = self
            .dp
            .verdicts()?
            .into_iter()
            .map(|(v, n)| (v.name().to_string(), n))
            .collect();
        Ok(Status {
            config: self.path.display().to_string(),
            pin_dir: self.dp.pin_dir().map(|p| p.display().to_string()),
            adopted: self.adopted,
            interfaces: self.cfg.dataplane.interfaces.clone(),
            services,
            verdicts,
        })
    }
}

fn report(cfg: &Config, applied: &[AppliedService]) {
    for (svc, a) in cfg.services.iter().zip(applied) {
        let names: Vec<&str> = a
            .ring
            .iter()
            .filter_map(|id| {
                a.backends
                    .iter()
                    .find(|(_, b)| b == id)
                    .map(|(n, _)| n.as_str())
            })
            .collect();
        info!(
            "service {} {} {:?} {:?}: {} backend(s), ring [{}]",
            svc.name,
            svc.vip,
            svc.protocol,
            svc.forwarding,
            svc.backends.len(),
            names.join(" ")
        );
    }
}

/// bpf_fib_lookup only forwards when the interface has forwarding enabled;
/// without it every packet would fall back to the kernel.
fn check_forwarding(cfg: &Config) -> anyhow::Result<()> {
    for iface in &cfg.dataplane.interfaces {
        let path = format!("/proc/sys/net/ipv4/conf/{iface}/forwarding");
        let value = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "interface {iface}: cannot read {path} (does it exist in this network namespace?)"
            )
        })?;
        if value.trim() != "1" {
            bail!(
                "interface {iface}: IPv4 forwarding is off; the load balancer forwards packets: \
                 run `sysctl -w net.ipv4.ip_forward=1` (or net.ipv4.conf.{iface}.forwarding=1)"
            );
        }
    }
    Ok(())
}

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs with a valid C string and a zeroed out-struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC }
}

/// The pin directory must live on a bpffs. /sys/fs/bpf is normally mounted;
/// under `ip netns exec` /sys is remounted without it, so mount one there.
fn ensure_bpffs(pin_dir: &Path) -> anyhow::Result<()> {
    let parent = pin_dir.parent().unwrap_or(pin_dir);
    if is_bpffs(parent) {
        return Ok(());
    }
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let target =
        std::ffi::CString::new(parent.as_os_str().as_encoded_bytes()).context("pin dir path")?;
    // SAFETY: mount(2) with valid C strings.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        bail!(
            "{} is not on a bpffs and mounting one failed ({}): run `mount -t bpf bpf {}` or pass --pin-dir",
            parent.display(),
            std::io::Error::last_os_error(),
            parent.display()
        );
    }
    warn!(
        "mounted a bpffs at {}; if this mount namespace is private (ip netns exec), the pins end with the agent",
        parent.display()
    );
    Ok(())
}

fn bind_control(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // A socket left by an agent that was killed: nobody listens on it.
    if path.exists() && std::os::unix::net::UnixStream::connect(path).is_err() {
        std::fs::remove_file(path).with_context(|| format!("removing stale {}", path.display()))?;
    }
    let listener = UnixListener::bind(path).with_context(|| {
        format!(
            "binding the control socket {} (another agent running?)",
            path.display()
        )
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {} to root", path.display()))?;
    Ok(listener)
}

/// Sends one datagram to each backend's discard port so the kernel resolves
/// (and keeps fresh) its neighbour entry: DSR needs the backend's MAC in the
/// neighbour table before the first packet, and NAT saves a kernel detour.
fn prime_neighbours(cfg: &Config) {
    let socket = match UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)) {
        Ok(s) => s,
        Err(e) => {
            warn!("neighbour priming: {e}");
            return;
        }
    };
    let mut seen = std::collections::BTreeSet::new();
    for b in cfg.services.iter().flat_map(|s| &s.backends) {
        if seen.insert(*b.address.ip()) {
            // Errors (e.g. ICMP unreachable from a previous probe) are expected.
            let _ = socket.send_to(&[], SocketAddrV4::new(*b.address.ip(), 9));
        }
    }
}
