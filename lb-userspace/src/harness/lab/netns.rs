//! Namespaces, commands run inside them, and teardown.

use std::{
    fs, io,
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Output},
    sync::{
        RwLock,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use super::{WEB_NAMES, run_dir};

/// Set once a signal handler started tearing the lab down: from then on no
/// command that creates something may start.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);
/// Held (shared) while a creating command runs; the signal handler takes it
/// exclusively so it never tears down while a creation is half-done.
static GATE: RwLock<()> = RwLock::new(());

/// How long teardown waits for processes to exit after SIGTERM (and again
/// after SIGKILL).
const KILL_GRACE: Duration = Duration::from_secs(2);
const MAX_PREFIX_LEN: usize = 32;

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

/// Prefixes become namespace and directory names: keep them short and tame.
pub(crate) fn validate_prefix(prefix: &str) -> anyhow::Result<()> {
    let tame = prefix
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if prefix.is_empty() || prefix.len() > MAX_PREFIX_LEN || !tame || prefix.starts_with('-') {
        bail!(
            "invalid lab prefix {prefix:?}: use 1-{MAX_PREFIX_LEN} of [A-Za-z0-9_-], not starting with '-'"
        );
    }
    Ok(())
}

/// Fails with `hint` unless `tool` is on PATH.
pub(crate) fn require_tool(tool: &str, hint: &str) -> anyhow::Result<()> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    if std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()) {
        return Ok(());
    }
    bail!("`{tool}` is not installed: {hint}")
}

/// The namespaces of lab `prefix`.
pub(crate) fn namespace_names(prefix: &str) -> Vec<String> {
    let mut names = vec![
        format!("{prefix}-client"),
        format!("{prefix}-lb"),
        format!("{prefix}-sw"),
    ];
    names.extend(WEB_NAMES.iter().map(|web| format!("{prefix}-{web}")));
    names
}

fn netns_path(ns: &str) -> PathBuf {
    Path::new("/run/netns").join(ns)
}

fn command_line(cmd: &Command) -> String {
    let mut parts = vec![cmd.get_program().to_string_lossy().into_owned()];
    parts.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
    parts.join(" ")
}

/// `ip netns exec ns args...`, not yet started.
pub(crate) fn ns_command(ns: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]).args(args);
    cmd
}

/// Runs `args` in `ns` and returns its output whatever its exit status.
pub(crate) fn ns_output(ns: &str, args: &[&str]) -> anyhow::Result<Output> {
    let mut cmd = ns_command(ns, args);
    let line = command_line(&cmd);
    gated(|| format!("running `{line}`"), || cmd.output())
}

/// Runs `args` in `ns`; fails with the command line and stderr unless it
/// succeeds. Returns stdout.
pub(crate) fn ns_run(ns: &str, args: &[&str]) -> anyhow::Result<String> {
    let mut cmd = ns_command(ns, args);
    run_checked(&mut cmd, true)
}

/// Runs a command in the current namespace, through the teardown gate.
pub(crate) fn run_gated(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let mut cmd = Command::new(program);
    cmd.args(args);
    run_checked(&mut cmd, true)
}

/// Runs a teardown command: never gated, since teardown is what the gate
/// protects.
fn run_teardown(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let mut cmd = Command::new(program);
    cmd.args(args);
    run_checked(&mut cmd, false)
}

fn run_checked(cmd: &mut Command, through_gate: bool) -> anyhow::Result<String> {
    let line = command_line(cmd);
    let output = if through_gate {
        gated(|| format!("running `{line}`"), || cmd.output())?
    } else {
        cmd.output().with_context(|| format!("running `{line}`"))?
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

/// Creates a veth pair whose ends are born in their namespaces (no name
/// clash in the caller's namespace, so labs with other prefixes can be built
/// in parallel), and brings both ends up.
pub(crate) fn add_veth(ns_a: &str, dev_a: &str, ns_b: &str, dev_b: &str) -> anyhow::Result<()> {
    run_gated(
        "ip",
        &[
            "link", "add", dev_a, "netns", ns_a, "type", "veth", "peer", "name", dev_b, "netns",
            ns_b,
        ],
    )
    .with_context(|| format!("creating veth {ns_a}:{dev_a} <-> {ns_b}:{dev_b}"))?;
    ns_run(ns_a, &["ip", "link", "set", dev_a, "up"])?;
    ns_run(ns_b, &["ip", "link", "set", dev_b, "up"])?;
    Ok(())
}

pub(crate) fn add_addr(ns: &str, dev: &str, cidr: &str) -> anyhow::Result<()> {
    ns_run(ns, &["ip", "addr", "add", cidr, "dev", dev])
        .with_context(|| format!("adding {cidr} to {dev} in {ns}"))?;
    Ok(())
}

/// Writes `/proc/sys/{key}` from a thread inside `ns` (net sysctls are per
/// namespace, resolved from the writing thread).
pub(crate) fn sysctl(ns: &str, key: &str, value: &str) -> anyhow::Result<()> {
    let path = Path::new("/proc/sys").join(key);
    in_netns(ns, || fs::write(&path, value))?
        .with_context(|| format!("setting {} = {value} in {ns}", path.display()))
}

/// Offloads that veth and XDP need set differently from their defaults.
pub(crate) fn tune_veth(ns: &str, dev: &str) -> anyhow::Result<()> {
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
pub(crate) fn signal(pid: u32, sig: libc::c_int) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// Runs `f` on a new thread that first joins namespace `ns` (only that
/// thread switches), so sockets it creates live in `ns`. A panic in `f`
/// propagates to the caller.
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
    let path = netns_path(ns);
    let file = fs::File::open(&path)
        .with_context(|| format!("opening {} (does namespace {ns} exist?)", path.display()))?;
    thread::scope(|scope| {
        let worker = scope.spawn(move || -> anyhow::Result<T> {
            // SAFETY: setns(2) on a valid fd we own; it only changes this
            // thread's network namespace, which ends with the thread.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                return Err(io::Error::last_os_error()).with_context(|| format!("setns into {ns}"));
            }
            Ok(f())
        });
        match worker.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Pids of `lb lab-serve --lab prefix` processes (wherever they are),
/// found by their command line.
pub fn lab_serve_pids(prefix: &str) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let Ok(raw) = fs::read(format!("/proc/{pid}/cmdline")) else {
                return false;
            };
            let args: Vec<&[u8]> = raw.split(|b| *b == 0).collect();
            args.contains(&b"lab-serve".as_slice())
                && args
                    .windows(2)
                    .any(|w| w[0] == b"--lab" && w[1] == prefix.as_bytes())
        })
        .collect()
}

/// Pids of the processes inside namespace `ns`.
fn pids_in(ns: &str) -> anyhow::Result<Vec<u32>> {
    let out = run_teardown("ip", &["netns", "pids", ns])?;
    Ok(out.lines().filter_map(|l| l.trim().parse().ok()).collect())
}

/// Every process belonging to lab `prefix` except ourselves.
fn lab_pids(prefix: &str, namespaces: &[String]) -> anyhow::Result<Vec<u32>> {
    let mut pids = lab_serve_pids(prefix);
    for ns in namespaces {
        pids.extend(pids_in(ns)?);
    }
    let me = std::process::id();
    pids.retain(|pid| *pid != me);
    pids.sort_unstable();
    pids.dedup();
    Ok(pids)
}

/// SIGTERM, then SIGKILL, every process of the lab; waits for them to go.
fn kill_lab_processes(prefix: &str, namespaces: &[String]) -> anyhow::Result<()> {
    for sig in [libc::SIGTERM, libc::SIGKILL] {
        let pids = lab_pids(prefix, namespaces)?;
        if pids.is_empty() {
            return Ok(());
        }
        for pid in &pids {
            signal(*pid, sig);
        }
        let deadline = Instant::now() + KILL_GRACE;
        while Instant::now() < deadline && !lab_pids(prefix, namespaces)?.is_empty() {
            thread::sleep(Duration::from_millis(20));
        }
    }
    let left = lab_pids(prefix, namespaces)?;
    if !left.is_empty() {
        bail!("processes {left:?} of lab {prefix} survived SIGKILL");
    }
    Ok(())
}

/// Removes lab `prefix`: its processes, namespaces (and with them every
/// veth and the bridge) and run dir. Succeeds when nothing is left,
/// including when nothing existed.
pub fn down(prefix: &str) -> anyhow::Result<()> {
    validate_prefix(prefix)?;
    let existing: Vec<String> = namespace_names(prefix)
        .into_iter()
        .filter(|ns| netns_path(ns).exists())
        .collect();
    kill_lab_processes(prefix, &existing)?;
    for ns in &existing {
        run_teardown("ip", &["netns", "del", ns])
            .with_context(|| format!("deleting namespace {ns}"))?;
    }
    let dir = run_dir(prefix);
    // The lab agents' pins (on the host's bpffs): unpinning frees the maps;
    // the XDP links went with the namespaces' interfaces.
    let pins = pin_dir(prefix);
    if pins.exists() {
        fs::remove_dir_all(&pins).with_context(|| format!("removing {}", pins.display()))?;
    }
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    // /run/lb-lab itself stays: removing it when empty would race with a
    // lab of another prefix being created at the same moment.
    Ok(())
}

/// Where lab `prefix`'s agents pin their data plane (host bpffs).
pub fn pin_dir(prefix: &str) -> PathBuf {
    Path::new("/sys/fs/bpf").join(format!("lb-lab-{prefix}"))
}
