//! Network namespaces and the commands run in them, for every topology of
//! the harness (the lab, the benchmark's, the kernel tests'): create and
//! delete namespaces, veth pairs, addresses, neighbours and sysctls; run
//! `ip` and other commands in a namespace, failing with the command line and
//! its stderr; join a namespace from one thread ([`in_netns`]).
//!
//! Creating commands pass a gate: once a signal handler has begun tearing
//! down ([`block_new_work`]), none starts, so teardown never races with a
//! half-built topology. Teardown commands bypass it.

use std::{
    fmt::Write as _,
    fs,
    io::{self, Write as _},
    os::{fd::AsFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        RwLock,
        atomic::{AtomicBool, Ordering},
    },
    thread,
};

use anyhow::{Context, bail};
use rustix::{
    process::{Pid, Signal, kill_process},
    thread::{LinkNameSpaceType, move_into_link_name_space},
};

use super::xdp::mac_text;

/// Set once a signal handler started tearing down: from then on no command
/// that creates something may start.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);
/// Held (shared) while a creating command runs; the signal handler takes it
/// exclusively so it never tears down while a creation is half-done.
static GATE: RwLock<()> = RwLock::new(());

/// Stops every later creating command (they fail with "interrupted") and
/// waits for the ones in flight; call before tearing down from a signal.
pub(crate) fn block_new_work() {
    let _exclusive = GATE
        .write()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Whether a signal handler has taken over teardown.
pub(crate) fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Runs `f` (which creates something) unless teardown has begun.
fn gated<T>(what: impl FnOnce() -> String, f: impl FnOnce() -> io::Result<T>) -> anyhow::Result<T> {
    let _shared = GATE.read().unwrap_or_else(|poisoned| poisoned.into_inner());
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted: not running {}", what());
    }
    f().with_context(what)
}

/// Spawning that respects the teardown gate.
pub(crate) trait SpawnGated {
    fn spawn_gated(&mut self) -> anyhow::Result<Child>;
}

impl SpawnGated for Command {
    fn spawn_gated(&mut self) -> anyhow::Result<Child> {
        let line = command_line(self);
        gated(|| format!("spawning `{line}`"), || self.spawn())
    }
}

/// Fails with `hint` unless `tool` is on PATH.
pub fn require_tool(tool: &str, hint: &str) -> anyhow::Result<()> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    if std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()) {
        return Ok(());
    }
    bail!("`{tool}` is not installed: {hint}")
}

/// `/run/netns/{ns}`, the handle `ip netns add` creates.
pub fn netns_path(ns: &str) -> PathBuf {
    Path::new("/run/netns").join(ns)
}

/// Whether namespace `ns` exists.
pub fn exists(ns: &str) -> bool {
    netns_path(ns).exists()
}

fn command_line(cmd: &Command) -> String {
    let mut parts = vec![cmd.get_program().to_string_lossy().into_owned()];
    parts.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
    parts.join(" ")
}

/// `ip netns exec ns args...`, not yet started.
pub fn ns_command(ns: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]).args(args);
    cmd
}

/// Runs `args` in `ns` and returns its output whatever its exit status.
pub fn ns_output(ns: &str, args: &[&str]) -> anyhow::Result<Output> {
    let mut cmd = ns_command(ns, args);
    let line = command_line(&cmd);
    gated(|| format!("running `{line}`"), || cmd.output())
}

/// Runs `args` in `ns`; fails with the command line and stderr unless it
/// succeeds. Returns stdout.
pub fn ns_run(ns: &str, args: &[&str]) -> anyhow::Result<String> {
    run_checked(&mut ns_command(ns, args), Gate::Pass)
}

/// `ip -n ns args...`: fails with the command line and stderr unless it
/// succeeds. Returns stdout.
pub fn ip(ns: &str, args: &[&str]) -> anyhow::Result<String> {
    let mut cmd = Command::new("ip");
    cmd.args(["-n", ns]).args(args);
    run_checked(&mut cmd, Gate::Pass)
}

/// Runs a command in the current namespace, through the teardown gate;
/// fails with the command line and stderr unless it succeeds.
pub fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let mut cmd = Command::new(program);
    cmd.args(args);
    run_checked(&mut cmd, Gate::Pass)
}

/// Runs a teardown command: never gated, since teardown is what the gate
/// protects.
pub(crate) fn run_teardown(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let mut cmd = Command::new(program);
    cmd.args(args);
    run_checked(&mut cmd, Gate::Bypass)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Gate {
    Pass,
    Bypass,
}

fn run_checked(cmd: &mut Command, gate: Gate) -> anyhow::Result<String> {
    let line = command_line(cmd);
    let output = match gate {
        Gate::Pass => gated(|| format!("running `{line}`"), || cmd.output())?,
        Gate::Bypass => cmd.output().with_context(|| format!("running `{line}`"))?,
    };
    if !output.status.success() {
        bail!(
            "`{line}` failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Creates namespace `ns` with its loopback up.
pub fn add_namespace(ns: &str) -> anyhow::Result<()> {
    run("ip", &["netns", "add", ns]).with_context(|| format!("creating namespace {ns}"))?;
    ip(ns, &["link", "set", "lo", "up"])?;
    Ok(())
}

/// Deletes namespace `ns` (and with it its interfaces); ungated.
pub fn delete_namespace(ns: &str) -> anyhow::Result<()> {
    run_teardown("ip", &["netns", "del", ns])
        .with_context(|| format!("deleting namespace {ns}"))?;
    Ok(())
}

/// A namespace of its own, deleted on drop (also on error and panic).
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `name` with its loopback up, first deleting a namespace of
    /// that name a crashed earlier run left.
    pub fn create(name: &str) -> anyhow::Result<Netns> {
        if exists(name) {
            delete_namespace(name)?;
        }
        add_namespace(name)?;
        Ok(Netns {
            name: name.to_owned(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `f` on a thread that has joined this namespace.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
        in_netns(&self.name, f)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = delete_namespace(&self.name) {
            tracing::warn!("{e:#}");
        }
    }
}

/// One end of a veth pair: its namespace and name, and optionally its MAC
/// and queue count (one of each, the kernel's default, otherwise).
#[derive(Clone, Copy, Debug)]
pub struct VethEnd<'a> {
    pub ns: &'a str,
    pub dev: &'a str,
    pub mac: Option<[u8; 6]>,
    pub queues: Option<usize>,
}

impl<'a> VethEnd<'a> {
    pub fn new(ns: &'a str, dev: &'a str) -> Self {
        VethEnd {
            ns,
            dev,
            mac: None,
            queues: None,
        }
    }

    pub fn mac(self, mac: [u8; 6]) -> Self {
        VethEnd {
            mac: Some(mac),
            ..self
        }
    }

    pub fn queues(self, queues: usize) -> Self {
        VethEnd {
            queues: Some(queues),
            ..self
        }
    }

    /// `dev netns ns [address mac] [numtxqueues q numrxqueues q]`.
    fn words(&self) -> Vec<String> {
        let mut words = vec![self.dev.to_owned(), "netns".into(), self.ns.to_owned()];
        if let Some(mac) = self.mac {
            words.extend(["address".into(), mac_text(mac)]);
        }
        if let Some(q) = self.queues {
            let q = q.to_string();
            words.extend(["numtxqueues".into(), q.clone(), "numrxqueues".into(), q]);
        }
        words
    }
}

/// Creates a veth pair whose ends are born in their namespaces (no name
/// clash in the caller's namespace, so topologies with other prefixes can be
/// built in parallel), and brings both ends up.
pub fn add_veth(a: &VethEnd, b: &VethEnd) -> anyhow::Result<()> {
    let mut args = vec!["link".to_owned(), "add".to_owned()];
    args.extend(a.words());
    args.extend(["type", "veth", "peer", "name"].map(String::from));
    args.extend(b.words());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run("ip", &args)
        .with_context(|| format!("creating veth {}:{} <-> {}:{}", a.ns, a.dev, b.ns, b.dev))?;
    ip(a.ns, &["link", "set", a.dev, "up"])?;
    ip(b.ns, &["link", "set", b.dev, "up"])?;
    Ok(())
}

pub fn add_addr(ns: &str, dev: &str, cidr: &str) -> anyhow::Result<()> {
    ip(ns, &["addr", "add", cidr, "dev", dev])
        .with_context(|| format!("adding {cidr} to {dev} in {ns}"))?;
    Ok(())
}

/// Permanent neighbour entries `(address, MAC)` on `dev` in `ns`, in one
/// `ip -batch` (a benchmark adds a thousand).
pub fn add_neighbours<A: std::fmt::Display>(
    ns: &str,
    dev: &str,
    entries: &[(A, [u8; 6])],
) -> anyhow::Result<()> {
    let mut batch = String::new();
    for (addr, mac) in entries {
        let _ = writeln!(
            batch,
            "neigh replace {addr} lladdr {} dev {dev} nud permanent",
            mac_text(*mac)
        );
    }
    let mut cmd = Command::new("ip");
    cmd.args(["-n", ns, "-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let line = command_line(&cmd);
    let mut child = cmd.spawn_gated()?;
    child
        .stdin
        .take()
        .context("ip -batch stdin")?
        .write_all(batch.as_bytes())
        .with_context(|| format!("writing neighbour entries to `{line}`"))?;
    let out = child
        .wait_with_output()
        .with_context(|| format!("running `{line}`"))?;
    if !out.status.success() {
        bail!(
            "`{line}` (neighbours on {dev}) failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// `ip route add default via GW` in namespace `ns`.
pub fn add_default_route(ns: &str, gw: std::net::Ipv4Addr) -> anyhow::Result<()> {
    ns_run(
        ns,
        &["ip", "route", "add", "default", "via", &gw.to_string()],
    )
    .map(drop)
}
/// Writes `/proc/sys/{key}` (`net/ipv4/ip_forward`) from a thread inside
/// `ns` (net sysctls are per namespace, resolved from the writing thread).
pub fn sysctl(ns: &str, key: &str, value: &str) -> anyhow::Result<()> {
    let path = Path::new("/proc/sys").join(key);
    in_netns(ns, || fs::write(&path, value))?
        .with_context(|| format!("setting {} = {value} in {ns}", path.display()))
}

/// Offloads that veth and XDP need set differently from their defaults.
pub fn tune_veth(ns: &str, dev: &str) -> anyhow::Result<()> {
    // GRO on: a frame that XDP sends into a veth (XDP_TX back out of the
    // same veth, or XDP_REDIRECT into another) is only delivered if the
    // receiving PEER runs NAPI, i.e. has an XDP program or GRO enabled;
    // otherwise the kernel drops it silently.
    // TX checksum offload off: with it, locally sent TCP/UDP packets carry
    // only a partial checksum (CHECKSUM_PARTIAL) that the stack expects some
    // device to finish. An XDP program rewriting such a packet and
    // redirecting it turns it into a raw frame, the "finish later" note is
    // lost, and the receiver drops the packet for a bad checksum. Off, the
    // sender computes the full checksum, which XDP updates incrementally.
    ns_run(ns, &["ethtool", "-K", dev, "gro", "on", "tx", "off"])
        .with_context(|| format!("setting offloads of {dev} in {ns}"))?;
    Ok(())
}

/// Puts the child in its own process group, so the terminal's Ctrl-C (sent
/// to the foreground group) does not reach servers meant to outlive us.
pub(crate) fn new_session(cmd: &mut Command) {
    cmd.process_group(0);
}

/// Sends `sig` to `pid`, ignoring "no such process".
pub(crate) fn signal(pid: u32, sig: Signal) {
    let Some(pid) = i32::try_from(pid).ok().and_then(Pid::from_raw) else {
        return;
    };
    let _ = kill_process(pid, sig);
}

/// Runs `f` on a new thread that first joins namespace `ns` (only that
/// thread switches), so sockets it creates live in `ns`. A panic in `f`
/// propagates to the caller.
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
    let path = netns_path(ns);
    let file = fs::File::open(&path)
        .with_context(|| format!("opening {} (does namespace {ns} exist?)", path.display()))?;
    thread::scope(|scope| {
        // The main thread's 8 MiB, not a spawned thread's 2 MiB: a debug
        // build reads a 256 KiB map value (a Maglev table) by value, copy
        // after copy, as the agent does on its main thread.
        let worker = thread::Builder::new()
            .stack_size(8 << 20)
            .spawn_scoped(scope, move || -> anyhow::Result<T> {
                // Only this thread's network namespace changes; it ends with
                // the thread.
                move_into_link_name_space(file.as_fd(), Some(LinkNameSpaceType::Network))
                    .map_err(io::Error::from)
                    .with_context(|| format!("setns into {ns}"))?;
                Ok(f())
            })
            .context("spawning the namespace thread")?;
        match worker.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}
