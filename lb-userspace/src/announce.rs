//! Announcing the VIPs to the routers over BGP, through this host's BIRD 2
//! (`[announce]`). Two LBs or more announce the same VIPs; the routers
//! spread flows over them by ECMP, and a consistent-hash service sends a
//! flow to the same backend whichever LB it crosses.
//!
//! The decision is pure ([`plan`]): a VIP is announced only while this LB
//! can serve it — its data plane attached, at least one backend of a
//! service on it admitted (in a ring), and not withdrawn by the operator
//! (`lb vip withdraw`). The I/O is thin: [`render`] the include file BIRD's
//! config reads (a `protocol static lb_vips` of /32 routes), write it when
//! it changes, and ask BIRD to `configure` over its control socket
//! ([`Bird`]). The include file is also where the operator's withdrawals
//! are kept, so a restarted agent finds them, and an agent that stops
//! leaves the file — and so the announcement — as it was (hitless
//! restart); `lb teardown` withdraws everything. So that teardown finds
//! the include file without the agent's config, the agent leaves a
//! [`Record`] of it under [`RECORDS_DIR`], named after its pin dir.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    io::{BufReader, Write as _},
    net::Ipv4Addr,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

pub use crate::wire::{BirdProtocol, BirdView, VipPlan};
use crate::{
    config::Announce,
    wire::{AnnounceStatus, VipChange},
};

/// The name of the static protocol the include file defines; BIRD's config
/// exports it to the routers (`export where proto = "lb_vips"`).
pub const STATIC_PROTOCOL: &str = "lb_vips";

/// How long one exchange with BIRD may take: it answers a local socket in
/// well under a millisecond, and the agent's loop waits for it.
const BIRD_TIMEOUT: Duration = Duration::from_millis(500);

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
    UnknownVip { vip: Ipv4Addr },
}

/// VIPs the operator took out of the announcement (`lb vip withdraw`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Withdrawn {
    /// The whole LB is drained (`lb vip withdraw` without a VIP).
    pub all: bool,
    pub vips: BTreeSet<Ipv4Addr>,
}

impl Withdrawn {
    pub fn holds(&self, vip: Ipv4Addr) -> bool {
        self.all || self.vips.contains(&vip)
    }

    /// `lb vip withdraw [VIP]`.
    pub fn withdraw(&mut self, vip: Option<Ipv4Addr>) {
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
    pub fn announce(&mut self, vip: Option<Ipv4Addr>, all_vips: &BTreeSet<Ipv4Addr>) {
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
    pub vip: Ipv4Addr,
    pub has_backend: bool,
}

/// Which VIPs this LB may announce, in address order. A VIP shared by
/// several services (ports) is announced while any of them has a backend:
/// the route carries all its ports.
pub fn plan(attached: bool, services: &[ServiceReach], withdrawn: &Withdrawn) -> Vec<VipPlan> {
    let mut reach: BTreeMap<Ipv4Addr, bool> = BTreeMap::new();
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
/// per announced VIP, each carrying the configured MED. The routes never
/// reach this host's kernel (BIRD on an LB has no kernel protocol
/// exporting them); they only exist to be exported over BGP.
pub fn render(announced: &[Ipv4Addr], withdrawn: &Withdrawn, med: u32) -> String {
    let mut out = String::from(HEADER);
    // Writing to a String cannot fail.
    if withdrawn.all {
        let _ = writeln!(out, "{WITHDRAWN_ALL}");
    }
    for vip in &withdrawn.vips {
        let _ = writeln!(out, "{WITHDRAWN_VIP}{vip}");
    }
    let _ = writeln!(out, "protocol static {STATIC_PROTOCOL} {{\n  ipv4;");
    for vip in announced {
        let _ = writeln!(out, "  route {vip}/32 blackhole {{ bgp_med = {med}; }};");
    }
    out.push_str("}\n");
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
pub fn parse_announced(text: &str) -> Vec<Ipv4Addr> {
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

/// Where agents record what they announce through, one file per pin dir:
/// root's, like the pins (the directory is made mode 0700). Not under
/// /run/lb: the unit's `RuntimeDirectory=lb` goes when the service stops,
/// and teardown comes after the stop.
pub const RECORDS_DIR: &str = "/run/lb-announce";

/// What `lb teardown --pin-dir D` needs to withdraw the VIPs of the agent
/// that ran with pin dir D: its `[announce]`. Written by the agent at
/// start, kept when it stops (the VIPs stay announced), removed by
/// teardown once they are withdrawn.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub bird_socket: PathBuf,
    pub include: PathBuf,
    pub med: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Untrusted { path: PathBuf, reason: String },
}

impl Record {
    pub fn of(cfg: &Announce) -> Record {
        Record {
            bird_socket: cfg.bird_socket.clone(),
            include: cfg.include.clone(),
            med: cfg.med,
        }
    }

    pub fn announce(&self) -> Announce {
        Announce {
            bird_socket: self.bird_socket.clone(),
            include: self.include.clone(),
            med: self.med,
        }
    }

    /// The record file of the agent pinned at `pin_dir`, under `dir`: the
    /// pin dir's path with `%` and `/` escaped, so two pin dirs never share
    /// one.
    pub fn path_in(dir: &Path, pin_dir: &Path) -> PathBuf {
        let normal: PathBuf = pin_dir.components().collect();
        let name = normal
            .to_string_lossy()
            .replace('%', "%25")
            .replace('/', "%2F");
        dir.join(format!("{name}.json"))
    }

    /// Writes the record of `pin_dir` (replacing any), making `dir` mode
    /// 0700 if it is new.
    pub fn write(&self, dir: &Path, pin_dir: &Path) -> Result<PathBuf, RecordError> {
        use std::os::unix::fs::DirBuilderExt as _;
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| RecordError::Io { path, source }
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io(dir))?;
        trusted(dir)?;
        let path = Record::path_in(dir, pin_dir);
        let text = serde_json::to_string(self).map_err(|e| RecordError::Io {
            path: path.clone(),
            source: e.into(),
        })?;
        let tmp = path.with_extension("lb-tmp");
        std::fs::write(&tmp, text).map_err(io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        Ok(path)
    }

    /// The record of `pin_dir`, if there is one. Teardown writes where it
    /// says, as root: a record (or its directory) that another user owns
    /// or may write is refused.
    pub fn read(dir: &Path, pin_dir: &Path) -> Result<Option<(PathBuf, Record)>, RecordError> {
        let path = Record::path_in(dir, pin_dir);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(RecordError::Io { path, source }),
        };
        trusted(dir)?;
        trusted(&path)?;
        let record = serde_json::from_str(&text).map_err(|e| RecordError::Untrusted {
            path: path.clone(),
            reason: format!("not a record written by lb: {e}"),
        })?;
        Ok(Some((path, record)))
    }

    /// Removes the records of `pin_dir` and of every pin dir under it
    /// (a lab's LBs), none being fine.
    pub fn remove_under(dir: &Path, pin_dir: &Path) -> Result<(), RecordError> {
        let own = Record::path_in(dir, pin_dir);
        let stem = own
            .file_name()
            .map(|n| n.to_string_lossy().trim_end_matches(".json").to_owned())
            .unwrap_or_default();
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(source) => {
                return Err(RecordError::Io {
                    path: dir.to_path_buf(),
                    source,
                });
            }
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name == format!("{stem}.json") || name.starts_with(&format!("{stem}%2F")) {
                let path = entry.path();
                std::fs::remove_file(&path).map_err(|source| RecordError::Io { path, source })?;
            }
        }
        Ok(())
    }

    /// Removes the record of `pin_dir` (none is fine).
    pub fn remove(dir: &Path, pin_dir: &Path) -> Result<(), RecordError> {
        let path = Record::path_in(dir, pin_dir);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(RecordError::Io { path, source: e })
            }
            _ => Ok(()),
        }
    }
}

/// `path` is owned by this process's user and writable by no one else.
fn trusted(path: &Path) -> Result<(), RecordError> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::symlink_metadata(path).map_err(|source| RecordError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let me = rustix::process::geteuid().as_raw();
    let reason = if meta.uid() != me {
        Some(format!("owned by uid {}, not by uid {me}", meta.uid()))
    } else if meta.mode() & 0o022 != 0 {
        Some(format!(
            "writable by others (mode {:o})",
            meta.mode() & 0o7777
        ))
    } else {
        None
    };
    match reason {
        Some(reason) => Err(RecordError::Untrusted {
            path: path.to_path_buf(),
            reason,
        }),
        None => Ok(()),
    }
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
        let all: BTreeSet<Ipv4Addr> = services.iter().map(|s| s.vip).collect();
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

    pub fn announced(&self) -> Vec<Ipv4Addr> {
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

/// A client of BIRD's control socket (the protocol `birdc` speaks: one
/// command line; reply lines `NNNN-text` continued, `NNNN text` last, or
/// ` text` continuing the previous code; codes 8xxx and 9xxx are errors).
pub struct Bird {
    socket: PathBuf,
}

/// One reply line: its code (the previous line's for ` text` lines) and text.
type ReplyLine = (u16, String);

impl Bird {
    pub fn new(socket: &Path) -> Bird {
        Bird {
            socket: socket.to_path_buf(),
        }
    }

    /// `configure`: BIRD re-reads its config (and so the include file); a
    /// static protocol whose routes changed updates them without touching
    /// the BGP sessions.
    pub fn configure(&self) -> Result<(), AnnounceError> {
        self.command("configure").map(drop)
    }

    /// `show protocols` and, for each BGP protocol, `show route export`.
    pub fn view(&self) -> Result<BirdView, AnnounceError> {
        let protocols = parse_protocols(&self.command("show protocols")?);
        let mut exported = BTreeMap::new();
        // A session that is not up has no table to show ("No valid
        // tables"): it exports nothing.
        for p in protocols
            .iter()
            .filter(|p| p.proto == "BGP" && p.state == "up")
        {
            let prefixes = match self.command(&format!("show route export {}", p.name)) {
                Ok(lines) => parse_route_prefixes(&lines),
                Err(AnnounceError::Refused { .. }) => Vec::new(),
                Err(e) => return Err(e),
            };
            exported.insert(p.name.clone(), prefixes);
        }
        Ok(BirdView {
            protocols,
            exported,
        })
    }

    fn command(&self, command: &str) -> Result<Vec<ReplyLine>, AnnounceError> {
        let io = |source| AnnounceError::Socket {
            socket: self.socket.clone(),
            source,
        };
        let stream = UnixStream::connect(&self.socket).map_err(io)?;
        stream.set_read_timeout(Some(BIRD_TIMEOUT)).map_err(io)?;
        stream.set_write_timeout(Some(BIRD_TIMEOUT)).map_err(io)?;
        let mut reader = BufReader::new(stream.try_clone().map_err(io)?);
        // The greeting: "0001 BIRD 2.0.12 ready."
        read_reply(&mut reader).map_err(io)?;
        (&stream)
            .write_all(format!("{command}\n").as_bytes())
            .map_err(io)?;
        let lines = read_reply(&mut reader).map_err(io)?;
        if let Some((_, text)) = lines.iter().find(|(code, _)| *code >= 8000) {
            return Err(AnnounceError::Refused {
                socket: self.socket.clone(),
                command: command.to_owned(),
                reply: text.clone(),
            });
        }
        Ok(lines)
    }
}

/// Reads reply lines up to the last one (`NNNN text`).
fn read_reply(reader: &mut impl std::io::BufRead) -> std::io::Result<Vec<ReplyLine>> {
    let mut lines = Vec::new();
    let mut code = 0;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "BIRD closed the connection mid-reply",
            ));
        }
        let line = line.trim_end_matches('\n');
        match parse_reply_line(line) {
            ReplyPart::Continued(c, text) => {
                code = c;
                lines.push((c, text.to_owned()));
            }
            ReplyPart::Last(c, text) => {
                lines.push((c, text.to_owned()));
                return Ok(lines);
            }
            ReplyPart::More(text) => lines.push((code, text.to_owned())),
        }
    }
}

enum ReplyPart<'a> {
    Continued(u16, &'a str),
    Last(u16, &'a str),
    More(&'a str),
}

fn parse_reply_line(line: &str) -> ReplyPart<'_> {
    let code = line.get(..4).and_then(|c| c.parse::<u16>().ok());
    match (code, line.as_bytes().get(4)) {
        (Some(c), Some(b'-')) => ReplyPart::Continued(c, &line[5..]),
        (Some(c), Some(b' ')) => ReplyPart::Last(c, &line[5..]),
        (Some(c), None) => ReplyPart::Last(c, ""),
        _ => ReplyPart::More(line.strip_prefix(' ').unwrap_or(line)),
    }
}

/// `show protocols` rows (code 1002): name, protocol, table, state, since
/// (one or two words), info.
fn parse_protocols(lines: &[ReplyLine]) -> Vec<BirdProtocol> {
    lines
        .iter()
        .filter(|(code, _)| *code == 1002)
        .filter_map(|(_, text)| {
            let mut words = text.split_whitespace();
            let name = words.next()?.to_owned();
            let proto = words.next()?.to_owned();
            let _table = words.next()?;
            let state = words.next()?.to_owned();
            let rest: Vec<&str> = words.collect();
            // "Since" is a time (hh:mm:ss[.fff]) or a date and a time; the
            // info is what follows.
            let skip = rest
                .iter()
                .take_while(|w| w.chars().all(|c| c.is_ascii_digit() || ".:-".contains(c)))
                .count();
            Some(BirdProtocol {
                name,
                proto,
                state,
                info: rest[skip..].join(" "),
            })
        })
        .collect()
}

/// The prefixes of `show route` rows (code 1007; a row starting with a
/// space is another path of the same prefix).
fn parse_route_prefixes(lines: &[ReplyLine]) -> Vec<String> {
    lines
        .iter()
        .filter(|(code, text)| *code == 1007 && !text.starts_with(' '))
        .filter_map(|(_, text)| text.split_whitespace().next())
        .filter(|w| w.contains('/'))
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);
    const VIP2: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 20);

    fn reach(vip: Ipv4Addr, has_backend: bool) -> ServiceReach {
        ServiceReach { vip, has_backend }
    }

    fn announced(p: &[VipPlan]) -> Vec<Ipv4Addr> {
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
    fn a_record_per_pin_dir_is_written_read_and_refused_if_others_may_write_it() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("lb-record-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let record = Record {
            bird_socket: "/run/bird/bird.ctl".into(),
            include: "/etc/bird/lb-vips.conf".into(),
            med: 7,
        };
        let pins = Path::new("/sys/fs/bpf/lb");
        assert!(Record::read(&dir, pins).expect("no record yet").is_none());
        let path = record.write(&dir, pins).expect("write");
        assert_eq!(path, dir.join("%2Fsys%2Ffs%2Fbpf%2Flb.json"));
        // The same pin dir spelled with a trailing slash; another one.
        let (_, back) = Record::read(&dir, Path::new("/sys/fs/bpf/lb/"))
            .expect("read")
            .expect("found");
        assert_eq!(back, record);
        assert!(
            Record::read(&dir, Path::new("/sys/fs/bpf/lb2"))
                .expect("read")
                .is_none()
        );
        // A lab's records go with its pin dir, not a neighbour's.
        let lab = Path::new("/sys/fs/bpf/lb-lab-x");
        record.write(&dir, &lab.join("lb1")).expect("write lb1");
        record
            .write(&dir, Path::new("/sys/fs/bpf/lb-lab-xy"))
            .expect("write xy");
        Record::remove_under(&dir, lab).expect("remove");
        assert!(
            Record::read(&dir, &lab.join("lb1"))
                .expect("read")
                .is_none()
        );
        assert!(
            Record::read(&dir, Path::new("/sys/fs/bpf/lb-lab-xy"))
                .expect("read")
                .is_some()
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).expect("chmod");
        let e = Record::read(&dir, pins).expect_err("writable by others");
        assert!(e.to_string().contains("writable by others"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn reply_lines_of_birds_socket_protocol() {
        let text = "0001 BIRD 2.0.12 ready.\n";
        let mut r = std::io::Cursor::new(text);
        assert_eq!(
            read_reply(&mut r).unwrap(),
            [(1, "BIRD 2.0.12 ready.".to_owned())]
        );
        let text = "2002-Name       Proto      Table      State  Since         Info\n\
                    1002-device1    Device     ---        up     21:20:10.123  \n \
                    lb1        BGP        ---        up     21:20:12.456  Established   \n \
                    bfd1       BFD        ---        up     2026-11-23 21:20:10  \n\
                    0000 \n";
        let lines = read_reply(&mut std::io::Cursor::new(text)).unwrap();
        let p = parse_protocols(&lines);
        assert_eq!(p.len(), 3);
        assert_eq!(
            p[1],
            BirdProtocol {
                name: "lb1".into(),
                proto: "BGP".into(),
                state: "up".into(),
                info: "Established".into()
            }
        );
        assert_eq!(p[2].info, "");
        // As BIRD 2.0.12 sends it: the route continues code 1007 with a
        // space; a second path of the same prefix is indented further.
        let routes = "1007-Table master4:\n 198.18.0.10/32       blackhole [lb_vips 21:20:10.123] * (200)\n \
                      \x20                    blackhole [other 21:20:11] (100)\n0000 \n";
        let lines = read_reply(&mut std::io::Cursor::new(routes)).unwrap();
        assert_eq!(parse_route_prefixes(&lines), ["198.18.0.10/32"]);
    }

    #[test]
    fn an_error_code_ends_the_reply() {
        let text = "8002 /etc/bird/bird.conf:3:1 syntax error\n";
        let lines = read_reply(&mut std::io::Cursor::new(text)).unwrap();
        assert_eq!(lines[0].0, 8002);
    }
}
