//! The HTTP comparison: wrk from the lab's client through the XDP LB,
//! through HAProxy and directly to web1, and parsing wrk's output.

use std::{
    fmt,
    net::SocketAddrV4,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context, bail, ensure};

use super::measure::Stat;
use crate::{
    config::Forwarding,
    harness::{lab, netns},
};

/// The path HTTP requests took from the lab's client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum HttpPath {
    /// Straight to web1, no load balancer.
    Direct,
    /// Through `lb run` (NAT) to `backends` webs.
    XdpLb { backends: usize },
    /// Through HAProxy (mode tcp, roundrobin) to `backends` webs.
    HaProxy { backends: usize },
}

impl fmt::Display for HttpPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HttpPath::Direct => f.write_str("direct (client → web1)"),
            HttpPath::XdpLb { backends } => write!(f, "XDP LB (lb, NAT, {backends} backends)"),
            HttpPath::HaProxy { backends } => {
                write!(f, "HAProxy (mode tcp, roundrobin, {backends} backends)")
            }
        }
    }
}

/// One path under one wrk load.
#[derive(Debug)]
pub(super) struct HttpRow {
    pub(super) path: HttpPath,
    /// The wrk load's name ([`WRK_LOADS`]).
    pub(super) load: String,
    pub(super) rps: Stat,
    pub(super) p50: Stat,
    pub(super) p99: Stat,
}

impl HttpRow {
    /// `path, load`, as the report's table shows it.
    pub(super) fn target(&self) -> String {
        format!("{}, {}", self.path, self.load)
    }
}

/// A duration as wrk prints it (`812.00us`, `1.23ms`, `2.01s`), in ms.
pub fn wrk_ms(text: &str) -> Option<f64> {
    let text = text.trim();
    let (num, scale) = if let Some(n) = text.strip_suffix("us") {
        (n, 1e-3)
    } else if let Some(n) = text.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1e3)
    } else {
        return None;
    };
    num.trim().parse::<f64>().ok().map(|v| v * scale)
}

/// (req/s, p50 ms, p99 ms) from `wrk --latency` output.
pub fn parse_wrk(out: &str) -> anyhow::Result<(f64, f64, f64)> {
    let mut rps = None;
    let mut p50 = None;
    let mut p99 = None;
    for line in out.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Requests/sec:", v] => rps = v.parse::<f64>().ok(),
            ["50%", v] => p50 = wrk_ms(v),
            ["99%", v] => p99 = wrk_ms(v),
            _ => {}
        }
    }
    ensure!(
        !out.contains("Non-2xx"),
        "wrk saw non-2xx responses:\n{out}"
    );
    match (rps, p50, p99) {
        (Some(r), Some(a), Some(b)) => Ok((r, a, b)),
        _ => bail!("unexpected wrk output:\n{out}"),
    }
}

/// wrk loads: saturating (2 threads, 32 connections), where throughput is
/// compared, and light (1 thread, 2 connections), where latency is not
/// dominated by CPU queueing on a 2-core machine shared by client, LB and
/// servers.
pub(super) const WRK_LOADS: [(&str, &str, &str); 2] =
    [("32 conns", "-t2", "-c32"), ("2 conns", "-t1", "-c2")];

fn wrk(
    lab: &lab::Lab,
    url: &str,
    secs: u32,
    reps: usize,
    (threads, conns): (&str, &str),
) -> anyhow::Result<(Stat, Stat, Stat)> {
    let (mut rps, mut p50, mut p99) = (Vec::new(), Vec::new(), Vec::new());
    let duration = format!("-d{secs}s");
    for _ in 0..reps {
        let out = lab.exec_ok(
            &lab.client_ns(),
            &["wrk", threads, conns, &duration, "--latency", url],
        )?;
        let (r, a, b) = parse_wrk(&out)?;
        rps.push(r);
        p50.push(a);
        p99.push(b);
    }
    Ok((Stat::of(&rps), Stat::of(&p50), Stat::of(&p99)))
}

/// A child process killed (and reaped) on drop.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const HAPROXY_PORT: u16 = 8080;

/// Waits until `addr` accepts TCP connections from the client namespace.
fn wait_listening(lab: &lab::Lab, addr: SocketAddrV4) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let ok = netns::in_netns(&lab.client_ns(), || {
            std::net::TcpStream::connect_timeout(&addr.into(), Duration::from_millis(200)).is_ok()
        })?;
        if ok {
            return Ok(());
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "{addr} does not accept connections"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub(super) fn http_bench(reps: usize, secs: u32) -> anyhow::Result<Vec<HttpRow>> {
    for tool in ["wrk", "haproxy"] {
        ensure!(
            Command::new(tool)
                .arg("-v")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok(),
            "{tool} is not installed (cargo xtask setup installs it)"
        );
    }
    let lb_bin = std::env::current_exe().context("path of the lb binary")?;
    let prefix = format!("lbp{}h", std::process::id());
    let lab = lab::Lab::up(&prefix, &lb_bin)?;
    lab.set_mode(Forwarding::Nat)?;
    let mut rows = Vec::new();
    let backends = lab::WEB_NAMES.len();
    let mut push = |path: HttpPath, load: &str, (rps, p50, p99): (Stat, Stat, Stat)| {
        rows.push(HttpRow {
            path,
            load: load.into(),
            rps,
            p50,
            p99,
        });
    };

    let web1 = SocketAddrV4::new(lab::web_addr(1), lab::HTTP_PORT);
    wait_listening(&lab, web1)?;
    for (load, t, c) in WRK_LOADS {
        push(
            HttpPath::Direct,
            load,
            wrk(&lab, &format!("http://{web1}/"), secs, reps, (t, c))?,
        );
    }

    let agent = lab.start_agent(&lab::lab_config(Forwarding::Nat))?;
    let vip = SocketAddrV4::new(lab::VIP, lab::HTTP_PORT);
    wait_listening(&lab, vip)?;
    for (load, t, c) in WRK_LOADS {
        push(
            HttpPath::XdpLb { backends },
            load,
            wrk(&lab, &format!("http://{vip}/"), secs, reps, (t, c))?,
        );
    }
    agent.stop()?;

    let servers: String = (1..=lab::WEB_NAMES.len())
        .map(|n| {
            format!(
                "    server web{n} {}:{}\n",
                lab::web_addr(n),
                lab::HTTP_PORT
            )
        })
        .collect();
    let cfg = format!(
        "global\n    maxconn 4096\ndefaults\n    mode tcp\n    timeout connect 5s\n    timeout client 60s\n    timeout server 60s\n\
         frontend fe\n    bind {}:{HAPROXY_PORT}\n    default_backend be\nbackend be\n    balance roundrobin\n{servers}",
        lab::LB_FRONT
    );
    let cfg_path = lab.run_dir().join("haproxy.cfg");
    std::fs::write(&cfg_path, cfg).with_context(|| format!("writing {}", cfg_path.display()))?;
    let cfg_arg = cfg_path.display().to_string();
    let log_path = lab.run_dir().join("haproxy.log");
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    let lb_ns = lab.lb_ns();
    let child = netns::ns_command(&lb_ns, &["haproxy", "-db", "-f", &cfg_arg])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .spawn()
        .context("starting haproxy")?;
    let _haproxy = KillOnDrop(child);
    let front = SocketAddrV4::new(lab::LB_FRONT, HAPROXY_PORT);
    wait_listening(&lab, front).with_context(|| {
        format!(
            "haproxy: {}",
            std::fs::read_to_string(&log_path)
                .unwrap_or_default()
                .trim()
        )
    })?;
    for (load, t, c) in WRK_LOADS {
        push(
            HttpPath::HaProxy { backends },
            load,
            wrk(&lab, &format!("http://{front}/"), secs, reps, (t, c))?,
        );
    }
    Ok(rows)
}
