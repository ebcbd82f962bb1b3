//! The lab's names and its teardown: prefixes, namespace names, the
//! processes a lab started, and `lb lab down`.

use std::{
    fs,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use rustix::process::Signal;

use super::{DB_NAMES, WEB_NAMES, ha::MAX_LBS, run_dir};
use crate::harness::netns::{self, run_teardown};

/// How long teardown waits for processes to exit after SIGTERM (and again
/// after SIGKILL).
const KILL_GRACE: Duration = Duration::from_secs(2);
const MAX_PREFIX_LEN: usize = 32;

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

/// The namespaces of lab `prefix`.
pub(crate) fn namespace_names(prefix: &str) -> Vec<String> {
    let mut names = vec![
        format!("{prefix}-client"),
        format!("{prefix}-lb"),
        format!("{prefix}-sw"),
    ];
    names.extend(WEB_NAMES.iter().map(|web| format!("{prefix}-{web}")));
    // The database hosts exist only in labs that started them.
    names.extend(DB_NAMES.iter().map(|db| format!("{prefix}-{db}")));
    names
}

/// The namespaces of the routed lab: the single lab's and the router.
pub(crate) fn routed_namespace_names(prefix: &str) -> Vec<String> {
    let mut names = namespace_names(prefix);
    names.push(format!("{prefix}-router"));
    names
}

/// The namespaces of a multi-LB lab with `lbs` LBs: the client, the
/// router, lb1..lbN, the switch, the webs and (if started) the databases.
pub(crate) fn ha_namespace_names(prefix: &str, lbs: usize) -> Vec<String> {
    let mut names = vec![format!("{prefix}-client"), format!("{prefix}-router")];
    names.extend((1..=lbs).map(|n| format!("{prefix}-lb{n}")));
    names.push(format!("{prefix}-sw"));
    names.extend(WEB_NAMES.iter().map(|web| format!("{prefix}-{web}")));
    names.extend(DB_NAMES.iter().map(|db| format!("{prefix}-{db}")));
    names
}

/// Every namespace a lab of either kind may have.
fn any_namespace_names(prefix: &str) -> Vec<String> {
    let mut names = namespace_names(prefix);
    for ns in ha_namespace_names(prefix, MAX_LBS) {
        if !names.contains(&ns) {
            names.push(ns);
        }
    }
    // The clients of a pool's second LBs (`Lab::add_pool_lb`).
    names.extend((2..=MAX_LBS).map(|n| format!("{prefix}-client{n}")));
    names
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
    for sig in [Signal::TERM, Signal::KILL] {
        let pids = lab_pids(prefix, namespaces)?;
        if pids.is_empty() {
            return Ok(());
        }
        for pid in &pids {
            netns::signal(*pid, sig);
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
    let existing: Vec<String> = any_namespace_names(prefix)
        .into_iter()
        .filter(|ns| netns::exists(ns))
        .collect();
    kill_lab_processes(prefix, &existing)?;
    for ns in &existing {
        netns::delete_namespace(ns)?;
    }
    let dir = run_dir(prefix);
    // The lab agents' pins (on the host's bpffs): unpinning frees the maps;
    // the XDP links went with the namespaces' interfaces.
    let pins = pin_dir(prefix);
    // The webs' decapsulators' pins (their links went with the webs'
    // interfaces).
    for dir in [&pins, &decap_pin_dir(prefix)] {
        if dir.exists() {
            fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
        }
    }
    // A killed agent's probe namespace (checks through the VIP).
    crate::health::through_vip::remove(&crate::health::through_vip::Names::for_pin_dir(&pins));
    // What its agents recorded for `lb teardown` (their BIRDs are gone).
    crate::announce::Record::remove_under(Path::new(crate::announce::RECORDS_DIR), &pins)
        .context("removing the lab agents' announcement records")?;
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

/// Where lab `prefix`'s webs pin their decapsulators (`lb decap
/// --pin-dir`, host bpffs): beside the agents' pin dir, not in it (an
/// agent's teardown owns everything in its own).
pub fn decap_pin_dir(prefix: &str) -> PathBuf {
    Path::new("/sys/fs/bpf").join(format!("lb-lab-{prefix}-decap"))
}
