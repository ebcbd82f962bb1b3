//! `lb doctor`: the host against the config. What the data plane needs from
//! the host and cannot check for itself — XDP support of each interface,
//! forwarding and rp_filter, the VIPs on `lo`, offloads of veth peers (the
//! silent checksum trap, GRO for redirected frames), MTUs, the bpffs, the
//! backends' neighbour entries — each reported with its fix.
//!
//! Two halves: [`gather`] reads the host into [`Facts`] (netlink, ethtool,
//! /proc); [`findings`] turns facts and config into [`Finding`]s and touches
//! nothing, so every rule is tested on the host without a kernel.
//! `lb run` calls [`check_at_start`]: it refuses to start on an error and
//! logs the warnings.
//!
//! This file is the verb and its report; the facts' model is `facts`, the
//! rules `rules`.

mod facts;
pub mod gather;
mod rules;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};

use anyhow::bail;
use serde::Serialize;

use crate::config::Config;

pub use facts::{Bpffs, Facts, Interface, Link, Neighbour, Peer, Route, XdpFeatures};
pub use gather::gather;
pub use rules::{Check, Finding, Severity, XDP_SINGLE_BUFFER_MTU, findings};

/// The findings as a report: one line per finding, its fix below it, and a
/// count at the end.
pub fn render(findings: &[Finding]) -> String {
    let mut s = String::new();
    for f in findings {
        let level = match f.severity {
            Severity::Ok => "ok",
            Severity::Warning => "WARNING",
            Severity::Error => "ERROR",
        };
        s.push_str(&format!(
            "{level:<8} {:<17} {}: {}\n",
            f.check.to_string(),
            f.subject,
            f.message
        ));
        if let Some(fix) = &f.fix {
            s.push_str(&format!("{:<27}fix: {fix}\n", ""));
        }
    }
    let count = |sev| findings.iter().filter(|f| f.severity == sev).count();
    s.push_str(&format!(
        "{} error(s), {} warning(s), {} ok\n",
        count(Severity::Error),
        count(Severity::Warning),
        count(Severity::Ok)
    ));
    s
}

/// `lb run`'s host check, before it touches the data plane: errors refuse
/// the start (each with its fix), warnings are logged. Neighbour entries
/// are left out: the agent resolves them itself right after.
pub fn check_at_start(cfg: &Config, pin_dir: &Path) -> anyhow::Result<()> {
    let facts = gather(cfg, pin_dir, false)?;
    let found = findings(cfg, &facts);
    for f in found.iter().filter(|f| f.severity == Severity::Warning) {
        tracing::warn!(
            check = %f.check,
            subject = %f.subject,
            fix = f.fix.as_deref().unwrap_or(""),
            "host check: {}: {} (fix: {})",
            f.subject,
            f.message,
            f.fix.as_deref().unwrap_or("-")
        );
    }
    let errors: Vec<String> = found
        .iter()
        .filter(|f| f.severity == Severity::Error)
        .map(|f| {
            format!(
                "{} {}: {} (fix: {})",
                f.check,
                f.subject,
                f.message,
                f.fix.as_deref().unwrap_or("-")
            )
        })
        .collect();
    if !errors.is_empty() {
        bail!(
            "the host is not ready (`lb doctor --config FILE` shows every check):\n  {}",
            errors.join("\n  ")
        );
    }
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct DoctorArgs {
    /// The TOML config the host is checked against
    #[arg(long, short)]
    pub config: PathBuf,
    /// Check network namespace NAME (/run/netns/NAME), as `lb run --netns`
    #[arg(long, value_name = "NAME")]
    pub netns: Option<String>,
    /// The pin directory `lb run` will use (its parent must be a bpffs)
    #[arg(long, default_value = crate::host::DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// One JSON object with the facts gathered and the findings
    #[arg(long)]
    pub json: bool,
}

/// `lb doctor`: prints every finding; fails (exit 1) when one is an error,
/// i.e. when `lb run` would refuse to start.
pub fn run(args: DoctorArgs) -> anyhow::Result<()> {
    let cfg = crate::config::load(&args.config)?;
    if let Some(name) = &args.netns {
        crate::host::enter_netns(name)?;
    }
    let facts = gather(&cfg, &args.pin_dir, true)?;
    let found = findings(&cfg, &facts);
    if args.json {
        #[derive(Serialize)]
        struct Report<'a> {
            facts: &'a Facts,
            findings: &'a [Finding],
        }
        println!(
            "{}",
            serde_json::to_string_pretty(&Report {
                facts: &facts,
                findings: &found,
            })?
        );
    } else {
        print!("{}", render(&found));
    }
    let errors = found
        .iter()
        .filter(|f| f.severity == Severity::Error)
        .count();
    if errors > 0 {
        bail!("{errors} error(s): `lb run` would refuse to start");
    }
    Ok(())
}
