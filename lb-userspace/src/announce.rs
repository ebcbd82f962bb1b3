//! Announcing the VIPs to the routers over BGP, through this host's BIRD 2
//! (`[announce]`). Two LBs or more announce the same VIPs; the routers
//! spread flows over them by ECMP, and a consistent-hash service sends a
//! flow to the same backend whichever LB it crosses.
//!
//! The decision is pure ([`plan`]): a VIP is announced only while this LB
//! can serve it — its data plane attached, at least one backend of a
//! service on it admitted (in a ring), and not withdrawn by the operator
//! (`lb vip withdraw`). The I/O is thin: [`render`] the include file BIRD's
//! config reads (a `protocol static lb_vips` of IPv4 /32 routes, and
//! `lb_vips6` of IPv6 /128 routes when an IPv6 VIP is announced), write it when
//! it changes, and ask BIRD to `configure` over its control socket
//! ([`Bird`]). The include file is also where the operator's withdrawals
//! are kept, so a restarted agent finds them, and an agent that stops
//! leaves the file — and so the announcement — as it was (hitless
//! restart); `lb teardown` withdraws everything. So that teardown finds
//! the include file without the agent's config, the agent leaves a
//! [`Record`] of it under [`RECORDS_DIR`], named after its pin dir.
//!
//! This file holds the plan, the include file and the agent's
//! [`Announcer`]; BIRD's control socket is `bird`, the teardown record
//! `record`.

mod bird;
mod record;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::IpAddr,
    path::{Path, PathBuf},
};

pub use crate::wire::{BirdProtocol, BirdView, VipPlan};
pub use bird::Bird;
pub use record::{RECORDS_DIR, Record, RecordError};

use crate::{
    config::Announce,
    wire::{AnnounceStatus, VipChange},
};

/// The name of the static protocol the include file defines; BIRD's config
/// exports it to the routers (`export where proto = "lb_vips"`).
pub const STATIC_PROTOCOL: &str = "lb_vips";
/// The static protocol of the IPv6 VIPs (BIRD's ipv6 channel; a BGP
/// session's `ipv6 { export where proto = "lb_vips6"; }`). Only written
/// while an IPv6 VIP is announced, so an IPv4-only include file is as
/// before.
pub const STATIC_PROTOCOL6: &str = "lb_vips6";

/// The include file's marker lines (comments to BIRD).
const HEADER: &str = "# Written by lb (the agent's [announce]): the VIPs this load balancer announces.\n\
                      # Do not edit: `lb vip withdraw|announce` changes it.\n";
const WITHDRAWN_ALL: &str = "# withdrawn-by-operator: all";
const WITHDRAWN_VIP: &str = "# withdrawn-by-operator: ";

#[derive(Debug, thiserror::Error)]
pub enum AnnounceError {
    #[error("{path}: {source}")]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("BIRD control socket {socket}: {source}")]
    Socket {
        socket: PathBuf,
        source: std::io::Error,
    },
    #[error("BIRD ({socket}) refused `{command}`: {reply}")]
    Refused {
        socket: PathBuf,
        command: String,
        reply: String,
    },
    #[error("{vip} is not the VIP of any service")]
    UnknownVip { vip: IpAddr },
}

/// VIPs the operator took out of the announcement (`lb vip withdraw`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Withdrawn {
    /// The whole LB is drained (`lb vip withdraw` without a VIP).
    pub all: bool,
    pub vips: BTreeSet<IpAddr>,
}

impl Withdrawn {
    pub fn holds(&self, vip: IpAddr) -> bool {
        self.all || self.vips.contains(&vip)
    }

    /// `lb vip withdraw [VIP]`.
    pub fn withdraw(&mut self, vip: Option<IpAddr>) {
        match vip {
            None => {
                self.all = true;
                self.vips.clear();
            }
            Some(v) => {
                self.vips.insert(v);
            }
        }
    }

    /// `lb vip announce [VIP]`: the VIP (or every VIP) goes back to what
    /// the data plane allows. Announcing one VIP of a drained LB keeps the
    /// others withdrawn.
    pub fn announce(&mut self, vip: Option<IpAddr>, all_vips: &BTreeSet<IpAddr>) {
        match vip {
            None => *self = Withdrawn::default(),
            Some(v) => {
                if self.all {
                    self.all = false;
                    self.vips = all_vips.clone();
                }
                self.vips.remove(&v);
            }
        }
    }
}

/// One service as the planner sees it: its VIP and whether its ring has a
/// backend (an admitted one).
#[derive(Debug, Clone, Copy)]
pub struct ServiceReach {
    pub vip: IpAddr,
    pub has_backend: bool,
}

/// Which VIPs this LB may announce, in address order. A VIP shared by
/// several services (ports) is announced while any of them has a backend:
/// the route carries all its ports.
pub fn plan(attached: bool, services: &[ServiceReach], withdrawn: &Withdrawn) -> Vec<VipPlan> {
    let mut reach: BTreeMap<IpAddr, bool> = BTreeMap::new();
    for s in services {
        *reach.entry(s.vip).or_insert(false) |= s.has_backend;
    }
    reach
        .into_iter()
        .map(|(vip, has_backend)| {
            let (announced, reason) = if !attached {
                (false, "data plane not attached")
            } else if withdrawn.holds(vip) {
                (false, "withdrawn by the operator (lb vip withdraw)")
            } else if !has_backend {
                (false, "no backend admitted")
            } else {
                (true, "serving")
            };
            VipPlan {
                vip,
                announced,
                reason: reason.to_owned(),
            }
        })
        .collect()
}

/// The include file for BIRD: the operator's withdrawals (as comments,
/// for the next agent) and a static protocol with one /32 blackhole route
/// per announced IPv4 VIP, each carrying the configured MED; the IPv6
/// VIPs' /128 routes in a second one ([`STATIC_PROTOCOL6`], an ipv6
/// channel), written only when there is one. The routes never reach this
/// host's kernel (BIRD on an LB has no kernel protocol exporting them);
/// they only exist to be exported over BGP.
pub fn render(announced: &[IpAddr], withdrawn: &Withdrawn, med: u32) -> String {
    let mut out = String::from(HEADER);
    // Writing to a String cannot fail.
    if withdrawn.all {
        let _ = writeln!(out, "{WITHDRAWN_ALL}");
    }
    for vip in &withdrawn.vips {
        let _ = writeln!(out, "{WITHDRAWN_VIP}{vip}");
    }
    let (v4, v6): (Vec<&IpAddr>, Vec<&IpAddr>) = announced.iter().partition(|v| v.is_ipv4());
    let _ = writeln!(out, "protocol static {STATIC_PROTOCOL} {{\n  ipv4;");
    for vip in v4 {
        let _ = writeln!(out, "  route {vip}/32 blackhole {{ bgp_med = {med}; }};");
    }
    out.push_str("}\n");
    if !v6.is_empty() {
        let _ = writeln!(out, "protocol static {STATIC_PROTOCOL6} {{\n  ipv6;");
        for vip in v6 {
            let _ = writeln!(out, "  route {vip}/128 blackhole {{ bgp_med = {med}; }};");
        }
        out.push_str("}\n");
    }
    out
}

/// The operator's withdrawals recorded in an include file written by
/// [`render`] (none if the file is not one).
pub fn parse_withdrawn(text: &str) -> Withdrawn {
    let mut w = Withdrawn::default();
    for line in text.lines().map(str::trim) {
        if line == WITHDRAWN_ALL {
            w.all = true;
        } else if let Some(vip) = line
            .strip_prefix(WITHDRAWN_VIP)
            .and_then(|v| v.parse().ok())
        {
            w.vips.insert(vip);
        }
    }
    w
}

/// The VIPs an include file announces.
pub fn parse_announced(text: &str) -> Vec<IpAddr> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("route "))
        .filter_map(|r| r.split('/').next()?.parse().ok())
        .collect()
}

/// Reads the include file; a missing one reads as empty.
pub fn read_include(path: &Path) -> Result<String, AnnounceError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        Err(source) => Err(AnnounceError::File {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Replaces the include file whole (a temporary file renamed over it), so
/// BIRD never reads half of one.
pub fn write_include(path: &Path, text: &str) -> Result<(), AnnounceError> {
    let err = |source| AnnounceError::File {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("lb-tmp");
    std::fs::write(&tmp, text).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

/// Writes `text` to the include file unless it already holds it, then asks
/// BIRD to reconfigure. Returns whether the file changed.
pub fn apply(cfg: &Announce, text: &str) -> Result<bool, AnnounceError> {
    let changed = read_include(&cfg.include)? != text;
    if changed {
        write_include(&cfg.include, text)?;
    }
    Bird::new(&cfg.bird_socket).configure()?;
    Ok(changed)
}

/// `lb teardown`: withdraws every VIP (the operator's withdrawals are
/// forgotten with the data plane) and tells BIRD.
pub fn withdraw_all(cfg: &Announce) -> Result<(), AnnounceError> {
    apply(cfg, &render(&[], &Withdrawn::default(), cfg.med)).map(drop)
}

/// The agent's side of `[announce]`: the operator's withdrawals, whether
/// the data plane is attached, the last plan, what BIRD confirmed and what
/// it reports. Every change of the plan goes to BIRD at once; a failure is
/// retried by [`Announcer::tick`].
pub struct Announcer {
    cfg: Announce,
    withdrawn: Withdrawn,
    attached: bool,
    plan: Vec<VipPlan>,
    /// The include file text BIRD last reconfigured with.
    synced: Option<String>,
    error: Option<String>,
    bird: Option<BirdView>,
}

impl Announcer {
    /// Starts from the include file's recorded withdrawals, so an operator's
    /// `lb vip withdraw` survives a restart of the agent.
    pub fn new(cfg: Announce) -> Result<Announcer, AnnounceError> {
        let withdrawn = parse_withdrawn(&read_include(&cfg.include)?);
        Ok(Announcer {
            cfg,
            withdrawn,
            attached: false,
            plan: Vec::new(),
            synced: None,
            error: None,
            bird: None,
        })
    }

    pub fn config(&self) -> &Announce {
        &self.cfg
    }

    /// The data plane is attached: from now on the plan goes to BIRD.
    /// Until then the announcement is left as the previous agent left it.
    pub fn set_attached(&mut self, services: &[ServiceReach]) {
        self.attached = true;
        self.update(services);
    }

    /// Re-plans after a change of the rings (health, reload, `lb backend`)
    /// and tells BIRD if the announcement changed.
    pub fn update(&mut self, services: &[ServiceReach]) {
        self.plan = plan(self.attached, services, &self.withdrawn);
        if self.attached {
            self.sync();
        }
    }

    /// `lb vip withdraw|announce [VIP]`.
    pub fn change(
        &mut self,
        change: &VipChange,
        services: &[ServiceReach],
    ) -> Result<String, AnnounceError> {
        let all: BTreeSet<IpAddr> = services.iter().map(|s| s.vip).collect();
        let (vip, withdraw) = match change {
            VipChange::Withdraw { vip } => (*vip, true),
            VipChange::Announce { vip } => (*vip, false),
        };
        if let Some(v) = vip
            && !all.contains(&v)
        {
            return Err(AnnounceError::UnknownVip { vip: v });
        }
        let previous = self.withdrawn.clone();
        if withdraw {
            self.withdrawn.withdraw(vip);
        } else {
            self.withdrawn.announce(vip, &all);
        }
        self.update(services);
        if let Some(e) = &self.error {
            self.withdrawn = previous;
            let e = e.clone();
            self.update(services);
            return Err(AnnounceError::Refused {
                socket: self.cfg.bird_socket.clone(),
                command: "configure".into(),
                reply: e,
            });
        }
        let which = vip.map_or("every VIP".to_owned(), |v| v.to_string());
        Ok(format!(
            "{} {which}; announced now: [{}]",
            if withdraw { "withdrew" } else { "announcing" },
            self.announced()
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(" ")
        ))
    }

    /// Every second: retries an announcement BIRD has not confirmed, and
    /// refreshes what BIRD reports.
    pub fn tick(&mut self) {
        if self.attached && self.error.is_some() {
            self.synced = None;
            self.sync();
        }
        match Bird::new(&self.cfg.bird_socket).view() {
            Ok(view) => {
                if self.bird.as_ref() != Some(&view) {
                    log_sessions(self.bird.as_ref(), &view);
                }
                self.bird = Some(view);
            }
            Err(e) => {
                if self.bird.take().is_some() {
                    tracing::warn!("BIRD stopped answering: {e}");
                }
            }
        }
    }

    pub fn announced(&self) -> Vec<IpAddr> {
        self.plan
            .iter()
            .filter(|p| p.announced)
            .map(|p| p.vip)
            .collect()
    }

    pub fn status(&self) -> AnnounceStatus {
        AnnounceStatus {
            bird_socket: self.cfg.bird_socket.display().to_string(),
            include: self.cfg.include.display().to_string(),
            med: self.cfg.med,
            vips: self.plan.clone(),
            bird: self.bird.clone(),
            error: self.error.clone(),
        }
    }

    fn sync(&mut self) {
        let text = render(&self.announced(), &self.withdrawn, self.cfg.med);
        if self.synced.as_ref() == Some(&text) {
            return;
        }
        match apply(&self.cfg, &text) {
            Ok(_) => {
                let not: Vec<String> = self
                    .plan
                    .iter()
                    .filter(|p| !p.announced)
                    .map(|p| format!("{} ({})", p.vip, p.reason))
                    .collect();
                tracing::info!(
                    "announcing [{}] over BGP (BIRD reconfigured from {}); not announced: [{}]",
                    self.announced()
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(" "),
                    self.cfg.include.display(),
                    not.join(", ")
                );
                self.synced = Some(text);
                self.error = None;
            }
            Err(e) => {
                tracing::error!("announcing the VIPs failed (retried every second): {e}");
                self.error = Some(e.to_string());
            }
        }
    }
}

/// Logs BGP sessions that changed state (a router lost or found).
fn log_sessions(before: Option<&BirdView>, now: &BirdView) {
    for p in now.protocols.iter().filter(|p| p.proto == "BGP") {
        let old = before.and_then(|b| b.protocols.iter().find(|o| o.name == p.name));
        if old.map(|o| (&o.state, &o.info)) != Some((&p.state, &p.info)) {
            tracing::info!(
                "BIRD: BGP session {} is {} {}; exports [{}]",
                p.name,
                p.state,
                p.info,
                now.exported
                    .get(&p.name)
                    .map(|e| e.join(" "))
                    .unwrap_or_default()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    const VIP: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 10));
    const VIP2: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 20));
    const VIP6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0x18, 0, 0, 0, 0, 0x10));

    fn reach(vip: IpAddr, has_backend: bool) -> ServiceReach {
        ServiceReach { vip, has_backend }
    }

    fn announced(p: &[VipPlan]) -> Vec<IpAddr> {
        p.iter().filter(|v| v.announced).map(|v| v.vip).collect()
    }

    #[test]
    fn a_vip_is_announced_while_one_of_its_services_has_a_backend() {
        let services = [reach(VIP, false), reach(VIP, true), reach(VIP2, false)];
        let p = plan(true, &services, &Withdrawn::default());
        assert_eq!(announced(&p), [VIP]);
        assert_eq!(p[1].reason, "no backend admitted");
    }

    #[test]
    fn nothing_is_announced_before_the_data_plane_is_attached() {
        let p = plan(false, &[reach(VIP, true)], &Withdrawn::default());
        assert!(announced(&p).is_empty());
        assert_eq!(p[0].reason, "data plane not attached");
    }

    #[test]
    fn the_operator_withdraws_one_vip_or_the_whole_lb() {
        let services = [reach(VIP, true), reach(VIP2, true)];
        let mut w = Withdrawn::default();
        w.withdraw(Some(VIP));
        assert_eq!(announced(&plan(true, &services, &w)), [VIP2]);
        w.withdraw(None);
        assert!(announced(&plan(true, &services, &w)).is_empty());
        let all: BTreeSet<_> = [VIP, VIP2].into();
        w.announce(Some(VIP2), &all);
        assert_eq!(announced(&plan(true, &services, &w)), [VIP2]);
        w.announce(None, &all);
        assert_eq!(announced(&plan(true, &services, &w)), [VIP, VIP2]);
    }

    #[test]
    fn the_include_file_keeps_the_withdrawals_for_the_next_agent() {
        let mut w = Withdrawn::default();
        w.withdraw(Some(VIP2));
        let text = render(&[VIP], &w, 100);
        assert!(text.contains("protocol static lb_vips {\n  ipv4;\n"));
        assert!(text.contains("  route 198.18.0.10/32 blackhole { bgp_med = 100; };\n"));
        assert_eq!(parse_withdrawn(&text), w);
        assert_eq!(parse_announced(&text), [VIP]);
        w.withdraw(None);
        assert_eq!(parse_withdrawn(&render(&[], &w, 0)), w);
        assert!(parse_announced(&render(&[], &w, 0)).is_empty());
    }

    #[test]
    fn ipv6_vips_are_announced_as_128s_through_their_own_ipv6_protocol() {
        let services = [reach(VIP, true), reach(VIP6, true)];
        let mut w = Withdrawn::default();
        assert_eq!(announced(&plan(true, &services, &w)), [VIP, VIP6]);
        let text = render(&[VIP, VIP6], &w, 50);
        assert!(text.contains(
            "protocol static lb_vips {\n  ipv4;\n  route 198.18.0.10/32 blackhole { bgp_med = 50; };\n}\n"
        ));
        assert!(text.contains(
            "protocol static lb_vips6 {\n  ipv6;\n  route 2001:db8:18::10/128 blackhole { bgp_med = 50; };\n}\n"
        ));
        assert_eq!(parse_announced(&text), [VIP, VIP6]);
        // Withdrawing the IPv6 VIP: recorded, and the ipv6 protocol goes
        // (an IPv4-only include file is exactly as before).
        w.withdraw(Some(VIP6));
        assert_eq!(announced(&plan(true, &services, &w)), [VIP]);
        let text = render(&[VIP], &w, 50);
        assert!(!text.contains("lb_vips6"), "{text}");
        assert_eq!(parse_withdrawn(&text), w);
    }
}
