//! `lb run`: the agent. Validates the config, loads and attaches the data
//! plane, fills the maps, keeps backend neighbour entries fresh, reloads on
//! SIGHUP, and detaches cleanly on SIGINT/SIGTERM.

use std::{
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, bail};
use log::{error, info, warn};
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    config::{self, Config},
    dataplane::{AppliedService, Dataplane},
};

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// The TOML config (see config/foobar.toml)
    #[arg(long, short)]
    pub config: PathBuf,
}

/// How often neighbour entries of backends are refreshed.
const NEIGHBOUR_REFRESH: Duration = Duration::from_secs(10);

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    let cfg = config::load(&args.config)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve(args.config, cfg))
}

async fn serve(path: PathBuf, mut cfg: Config) -> anyhow::Result<()> {
    check_forwarding(&cfg)?;
    let mut dp = Dataplane::load(cfg.dataplane.conntrack_size).context("loading the data plane")?;
    let applied = dp.apply(&cfg).context("filling the maps")?;
    report(&cfg, &applied);
    for iface in &cfg.dataplane.interfaces {
        dp.attach(iface, cfg.dataplane.xdp_mode)
            .with_context(|| format!("attaching XDP ({:?} mode) to {iface}", cfg.dataplane.xdp_mode))?;
        info!("attached lb to {iface} ({:?} mode)", cfg.dataplane.xdp_mode);
    }
    prime_neighbours(&cfg);
    // The line scripts and the lab wait for.
    println!("lb: ready");

    let mut sigint = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
    let mut refresh = tokio::time::interval(NEIGHBOUR_REFRESH);
    loop {
        tokio::select! {
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = sighup.recv() => {
                if let Some(new) = reload(&path, &cfg, &mut dp) {
                    cfg = new;
                }
            }
            _ = refresh.tick() => prime_neighbours(&cfg),
        }
    }
    info!("detaching from {}", dp.attached().collect::<Vec<_>>().join(", "));
    drop(dp);
    Ok(())
}

/// Validates the new config whole before touching a map; on any error the
/// running config stays in force.
fn reload(path: &Path, current: &Config, dp: &mut Dataplane) -> Option<Config> {
    let new = match config::load(path) {
        Ok(new) => new,
        Err(e) => {
            error!("reload rejected, running config unchanged: {e}");
            return None;
        }
    };
    if new.dataplane != current.dataplane {
        error!("reload rejected: [dataplane] changes need a restart (interfaces, modes, sizes)");
        return None;
    }
    match dp.apply(&new) {
        Ok(applied) => {
            info!("reloaded {}", path.display());
            report(&new, &applied);
            Some(new)
        }
        Err(e) => {
            error!("reload failed while applying: {e}");
            None
        }
    }
}

fn report(cfg: &Config, applied: &[AppliedService]) {
    for (svc, a) in cfg.services.iter().zip(applied) {
        let names: Vec<&str> = a
            .ring
            .iter()
            .filter_map(|id| a.backends.iter().find(|(_, b)| b == id).map(|(n, _)| n.as_str()))
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
        let value = std::fs::read_to_string(&path)
            .with_context(|| format!("interface {iface}: cannot read {path} (does it exist in this network namespace?)"))?;
        if value.trim() != "1" {
            bail!(
                "interface {iface}: IPv4 forwarding is off; the load balancer forwards packets: \
                 run `sysctl -w net.ipv4.ip_forward=1` (or net.ipv4.conf.{iface}.forwarding=1)"
            );
        }
    }
    Ok(())
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
