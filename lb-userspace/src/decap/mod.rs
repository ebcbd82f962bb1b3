//! `lb decap`: the decapsulator we ship for the backends of tunnel
//! services (`forwarding = "ipip"` / `"gue"`). An XDP program (lb-ebpf's
//! `lb-decap` object) strips the IPIP or GUE headers of packets from the
//! allowed LB addresses and passes the inner packet to the kernel, which
//! delivers it to the VIP on the backend's loopback: nothing else is
//! needed on the backend (no ipip or fou module, no tunnel interface).
//!
//! `attach` pins the link and the maps under `PIN_DIR/IFACE` (on a bpffs
//! that outlives the command); `detach` removes them; `status` reads them.
//! - `maps`: the settings (allowed sources, GUE port: replaced atomically)
//!   and the per-verdict counters;
//! - `load`: loading the object, attaching and detaching it pinned.

pub mod load;
pub mod maps;

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use lb_common::decap::GUE_DEFAULT_PORT;

pub use load::Decapsulator;

use crate::host;

/// Where `lb decap` pins each interface's decapsulator unless told
/// otherwise: `PIN_DIR/IFACE`.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/lb-decap";

#[derive(Subcommand, Debug)]
pub enum DecapCommand {
    /// Attach the decapsulator to an interface (or replace its settings):
    /// IPIP and GUE from the --from addresses are decapsulated, everything
    /// else passes untouched. Stays attached after the command (pinned)
    Attach(AttachArgs),
    /// Detach the decapsulator from an interface and remove its pins
    Detach {
        /// The interface it is attached to
        iface: String,
        #[command(flatten)]
        place: Place,
    },
    /// Allowed sources, GUE port and packets per verdict of each attached
    /// decapsulator (or of one interface's)
    Status {
        /// Only this interface's
        iface: Option<String>,
        /// Machine-readable output
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        place: Place,
    },
}

#[derive(Args, Debug)]
pub struct AttachArgs {
    /// The interface the tunnels arrive on
    pub iface: String,
    /// The LB addresses allowed to send tunnels here (their outer source:
    /// IPv4 for IPIP and GUE, IPv6 for IP6IP6 and GUE over IPv6),
    /// comma-separated; a re-attach replaces the set
    #[arg(
        long,
        value_delimiter = ',',
        required = true,
        value_name = "ADDR[,ADDR...]"
    )]
    pub from: Vec<IpAddr>,
    /// The UDP port GUE arrives on
    #[arg(long, default_value_t = GUE_DEFAULT_PORT, value_name = "GUE_PORT")]
    pub port: u16,
    #[command(flatten)]
    pub place: Place,
}

/// Where the pins live and which network namespace the interface is in.
#[derive(Args, Debug)]
pub struct Place {
    /// The bpffs directory of the pins: each interface's under PIN_DIR/IFACE
    /// (with --netns, PIN_DIR/netns/NAME/IFACE)
    #[arg(long, default_value = DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// The interface's network namespace (as `ip netns` names it): entered
    /// alone, so the pins stay on the host's bpffs (under `ip netns exec`, a
    /// bpffs would be private to the command and vanish with it)
    #[arg(long, value_name = "NAME")]
    pub netns: Option<String>,
}

impl Place {
    /// Enters the namespace, if any; the directory holding the interfaces'
    /// directories.
    fn enter(&self) -> anyhow::Result<PathBuf> {
        match &self.netns {
            Some(name) => {
                host::enter_netns(name)?;
                Ok(self.pin_dir.join("netns").join(name))
            }
            None => Ok(self.pin_dir.clone()),
        }
    }
}

pub fn run(command: DecapCommand) -> anyhow::Result<()> {
    match command {
        DecapCommand::Attach(args) => attach(&args),
        DecapCommand::Detach { iface, place } => detach(&iface, &place),
        DecapCommand::Status { iface, json, place } => status(iface.as_deref(), json, &place),
    }
}

/// An interface name as the kernel allows it (and so a safe directory name
/// under the pin dir: no `/`, not `.` or `..`).
fn check_iface(iface: &str) -> anyhow::Result<()> {
    let ok = !iface.is_empty()
        && iface.len() < libc::IFNAMSIZ
        && iface != "."
        && iface != ".."
        && !iface.contains(['/', ':'])
        && !iface.chars().any(char::is_whitespace);
    if !ok {
        bail!("{iface:?} is not an interface name");
    }
    Ok(())
}

fn need_root(verb: &str) -> anyhow::Result<()> {
    if !rustix::process::geteuid().is_root() {
        bail!(
            "lb decap {verb} needs root: it loads or reads an XDP program and its pins on the \
             bpffs (run it with sudo)"
        );
    }
    Ok(())
}

fn attach(args: &AttachArgs) -> anyhow::Result<()> {
    check_iface(&args.iface)?;
    need_root("attach")?;
    // Checked before anything is touched.
    maps::check_sources(&args.from)?;
    let base = args.place.enter()?;
    crate::xdp::ifindex(&args.iface).with_context(|| format!("lb decap attach {}", args.iface))?;
    let dir = load::entry_dir(&base, &args.iface);
    host::ensure_lasting_bpffs(&dir)?;
    host::secure_pin_dir(&base)?;
    host::secure_pin_dir(&dir)?;
    let _lock = host::PinLock::acquire(
        &dir,
        "another lb decap is changing this interface: try again when it is done",
    )?;
    let again = load::attach_pinned(&dir, &args.iface, &args.from, args.port)?;
    let from: Vec<String> = maps::check_sources(&args.from)?
        .iter()
        .map(IpAddr::to_string)
        .collect();
    println!(
        "lb decap {} {}: IPIP, IP6IP6 and GUE (port {}) from {} (pinned in {})",
        if again { "updated on" } else { "attached to" },
        args.iface,
        args.port,
        from.join(", "),
        dir.display()
    );
    Ok(())
}

fn detach(iface: &str, place: &Place) -> anyhow::Result<()> {
    check_iface(iface)?;
    need_root("detach")?;
    let base = place.enter()?;
    let dir = load::entry_dir(&base, iface);
    if !dir.exists() {
        bail!(
            "lb decap is not attached to {iface}: nothing pinned in {}",
            dir.display()
        );
    }
    host::check_pin_dir(
        &dir,
        "lb decap will not act on pins others could have replaced: remove it by hand",
    )?;
    let lock = host::PinLock::acquire(
        &dir,
        "another lb decap is changing this interface: try again when it is done",
    )?;
    let removed = load::detach_pinned(&dir)?;
    drop(lock);
    let _ = std::fs::remove_dir(&dir);
    println!(
        "lb decap detached from {iface} (removed {} from {})",
        removed.join(", "),
        dir.display()
    );
    Ok(())
}

fn status(iface: Option<&str>, json: bool, place: &Place) -> anyhow::Result<()> {
    if let Some(i) = iface {
        check_iface(i)?;
    }
    need_root("status")?;
    let base = place.enter()?;
    let dirs = match iface {
        Some(i) => {
            let dir = load::entry_dir(&base, i);
            if !dir.join(maps::CONF).exists() {
                bail!(
                    "lb decap is not attached to {i}: nothing pinned in {}",
                    dir.display()
                );
            }
            vec![(i.to_owned(), dir)]
        }
        None => attached_under(&base)?,
    };
    let mut reports = Vec::new();
    for (name, dir) in &dirs {
        reports.push(report(name, dir)?);
    }
    if json {
        println!(
            "{}",
            serde_json::Value::Array(reports.iter().map(Report::json).collect())
        );
    } else if reports.is_empty() {
        println!("lb decap is attached nowhere under {}", base.display());
    } else {
        for r in &reports {
            print!("{}", r.text());
        }
    }
    Ok(())
}

/// Every interface's directory under `base` that holds a decapsulator.
fn attached_under(base: &Path) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let entries = match std::fs::read_dir(base) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", base.display())),
    };
    let mut found: Vec<(String, PathBuf)> = entries
        .filter_map(Result::ok)
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
        .filter(|(_, p)| p.join(maps::CONF).exists())
        .collect();
    found.sort();
    Ok(found)
}

/// One decapsulator as `lb decap status` shows it.
struct Report {
    iface: String,
    dir: PathBuf,
    attached: bool,
    settings: maps::Settings,
    verdicts: Vec<(lb_common::decap::DecapVerdict, u64)>,
}

fn report(iface: &str, dir: &Path) -> anyhow::Result<Report> {
    let m = maps::DecapMaps::open(dir)?;
    Ok(Report {
        iface: iface.to_owned(),
        dir: dir.to_owned(),
        attached: load::link_pinned(dir),
        settings: m.settings()?,
        verdicts: m.verdicts()?,
    })
}

impl Report {
    fn text(&self) -> String {
        let sources: Vec<String> = self
            .settings
            .sources
            .iter()
            .map(|a| a.to_string())
            .collect();
        let mut s = format!(
            "{}: {} (pins in {})\n  GUE port: {}\n  allowed sources: {}\n  packets per verdict:\n",
            self.iface,
            if self.attached {
                "attached"
            } else {
                "NOT attached (maps pinned, no link: run `lb decap attach` again)"
            },
            self.dir.display(),
            self.settings.gue_port,
            sources.join(", ")
        );
        for (v, n) in &self.verdicts {
            s.push_str(&format!("    {:<20} {n}\n", v.name()));
        }
        s
    }

    fn json(&self) -> serde_json::Value {
        let verdicts: serde_json::Map<String, serde_json::Value> = self
            .verdicts
            .iter()
            .map(|(v, n)| (v.name().to_owned(), (*n).into()))
            .collect();
        serde_json::json!({
            "iface": self.iface,
            "pin_dir": self.dir,
            "attached": self.attached,
            "gue_port": self.settings.gue_port,
            "sources": self.settings.sources.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            "verdicts": verdicts,
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_interface_names_become_directories() {
        for good in ["eth0", "veth-a1", "enp0s31f6", "a.b"] {
            assert!(super::check_iface(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            ".",
            "..",
            "../etc",
            "a/b",
            "eth0:1",
            "a b",
            "sixteen-chars-xx",
        ] {
            assert!(super::check_iface(bad).is_err(), "{bad}");
        }
    }
}
