//! `lb trace`: live drop tracing. The data plane sends one event per packet
//! it does not forward (verdict, 5-tuple, service id) into the `TRACE` ring
//! buffer while the `TRACE_ON` switch asks for that verdict: IPv4's
//! programs a `TraceEvent`, IPv6's a `TraceEvent6` (16-byte addresses),
//! told apart by the record's length ([`Event`]). This opens both
//! pinned maps directly (no agent needed), sets the switch, prints the
//! events and clears the switch when it stops (count, duration, Ctrl-C,
//! SIGTERM, or an error).
//!
//! Concurrent tracers share one switch and one ring buffer: the events are
//! split between them and the first to stop switches tracing off for all.
//! Run one at a time.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, bail};
use aya::maps::{Array, Map, MapData, RingBuf};
use lb_common::{
    TRACE_DEFAULT_VERDICTS, TRACE_NO_SERVICE, TraceConf, TraceEvent, Verdict,
    headers::{ETH_P_IPV4_RAW, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP},
    ipv6::{
        ETH_P_IPV6_RAW, IPPROTO_ICMPV6, NEXTHDR_DEST, NEXTHDR_FRAGMENT, NEXTHDR_HOP, NEXTHDR_NONE,
        NEXTHDR_ROUTING, octets_of,
    },
    maps6::TraceEvent6,
};

use crate::dataplane::{Dataplane, DataplaneError, MapName};

#[derive(clap::Args, Debug)]
pub struct TraceArgs {
    /// The bpffs directory of the data plane (`lb run --pin-dir`)
    #[arg(long, default_value = crate::host::DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// Stop after this many events
    #[arg(long)]
    pub count: Option<u64>,
    /// Stop after this many seconds
    #[arg(long, value_name = "S")]
    pub duration: Option<f64>,
    /// One JSON object per line
    #[arg(long)]
    pub json: bool,
    /// Trace only these verdicts (repeatable), e.g. drop_fragment; default:
    /// every verdict that is not forwarded except pass_not_ours (the host's
    /// own traffic), which can be asked for by name
    #[arg(long = "verdict", value_name = "NAME")]
    pub verdicts: Vec<String>,
    /// Print only the events of these service ids (repeatable; the id
    /// events print, `lb explain` names it); filtered here, not in the
    /// data plane
    #[arg(long = "service", value_name = "ID")]
    pub services: Vec<u32>,
}

/// One traced packet: IPv4's programs' event or IPv6's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    V4(TraceEvent),
    V6(TraceEvent6),
}

impl From<TraceEvent> for Event {
    fn from(ev: TraceEvent) -> Self {
        Event::V4(ev)
    }
}

impl From<TraceEvent6> for Event {
    fn from(ev: TraceEvent6) -> Self {
        Event::V6(ev)
    }
}

impl Event {
    /// The event of a ring-buffer record, by its length (each family's
    /// event has its own); `None` for a record of neither length.
    pub fn from_record(record: &[u8]) -> Option<Event> {
        // SAFETY (both reads): exactly the type's size; both are plain old
        // data, any bit pattern is valid.
        match record.len() {
            n if n == size_of::<TraceEvent>() => Some(Event::V4(unsafe {
                record.as_ptr().cast::<TraceEvent>().read_unaligned()
            })),
            n if n == size_of::<TraceEvent6>() => Some(Event::V6(unsafe {
                record.as_ptr().cast::<TraceEvent6>().read_unaligned()
            })),
            _ => None,
        }
    }

    /// The event's fields with its addresses as `IpAddr`s: what both
    /// families print from.
    pub fn view(&self) -> View {
        match *self {
            Event::V4(e) => View {
                verdict: e.verdict,
                service_id: e.service_id,
                ip: e.ether_type == ETH_P_IPV4_RAW,
                saddr: IpAddr::V4(Ipv4Addr::from(e.saddr.to_ne_bytes())),
                daddr: IpAddr::V4(Ipv4Addr::from(e.daddr.to_ne_bytes())),
                sport: u16::from_be(e.sport),
                dport: u16::from_be(e.dport),
                protocol: e.protocol,
                ether_type: u16::from_be(e.ether_type),
                ifindex: e.ifindex,
                len: e.len,
            },
            Event::V6(e) => View {
                verdict: e.verdict,
                service_id: e.service_id,
                ip: e.ether_type == ETH_P_IPV6_RAW,
                saddr: IpAddr::V6(Ipv6Addr::from(octets_of(&e.saddr))),
                daddr: IpAddr::V6(Ipv6Addr::from(octets_of(&e.daddr))),
                sport: u16::from_be(e.sport),
                dport: u16::from_be(e.dport),
                protocol: e.protocol,
                ether_type: u16::from_be(e.ether_type),
                ifindex: e.ifindex,
                len: e.len,
            },
        }
    }
}

/// An event as printed: host-order ports and EtherType, typed addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct View {
    pub verdict: u32,
    pub service_id: u32,
    /// The frame is of the event's family (else only `ether_type` says
    /// anything).
    pub ip: bool,
    pub saddr: IpAddr,
    pub daddr: IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub protocol: u8,
    pub ether_type: u16,
    pub ifindex: u32,
    pub len: u32,
}

impl View {
    /// The service id, `None` for [`TRACE_NO_SERVICE`].
    pub fn service(&self) -> Option<u32> {
        (self.service_id != TRACE_NO_SERVICE).then_some(self.service_id)
    }
}

/// The switch and the ring buffer of a data plane's drop tracing.
pub struct Tracer {
    events: RingBuf<MapData>,
    switch: Array<MapData, TraceConf>,
    on: bool,
}

impl Tracer {
    /// Opens the pinned maps under `pin_dir`.
    pub fn open(pin_dir: &Path) -> anyhow::Result<Self> {
        let pin = |name| open_pinned(pin_dir, name, "drop tracing");
        Self::from_maps(pin(MapName::TRACE)?, pin(MapName::TRACE_ON)?)
    }

    /// Opens the maps of a loaded data plane (tests, tools).
    pub fn of(dp: &Dataplane) -> anyhow::Result<Self> {
        Self::from_maps(
            dp.map_data(MapName::TRACE)?,
            dp.map_data(MapName::TRACE_ON)?,
        )
    }

    fn from_maps(events: MapData, switch: MapData) -> anyhow::Result<Self> {
        Ok(Tracer {
            events: RingBuf::try_from(Map::RingBuf(events)).context("TRACE ring buffer")?,
            switch: Array::try_from(Map::Array(switch)).context("TRACE_ON")?,
            on: false,
        })
    }

    /// Switches tracing on for the verdicts in `mask` (`Verdict::trace_bit`)
    /// and zeroes the lost-event count.
    pub fn start(&mut self, mask: u64) -> Result<(), DataplaneError> {
        self.on = true;
        self.set(TraceConf {
            verdicts: mask,
            ..TraceConf::default()
        })
    }

    /// Switches tracing off; returns how many events the full ring buffer
    /// lost meanwhile.
    pub fn stop(&mut self) -> Result<u64, DataplaneError> {
        let lost = self.conf()?.lost;
        self.set(TraceConf::default())?;
        self.on = false;
        Ok(lost)
    }

    /// The switch as the data plane sees it.
    pub fn conf(&self) -> Result<TraceConf, DataplaneError> {
        self.switch
            .get(&0, 0)
            .map_err(|source| DataplaneError::Map {
                name: MapName::TRACE_ON.name(),
                source,
            })
    }

    fn set(&mut self, conf: TraceConf) -> Result<(), DataplaneError> {
        self.switch
            .set(0, conf, 0)
            .map_err(|source| DataplaneError::Map {
                name: MapName::TRACE_ON.name(),
                source,
            })
    }

    /// The next event, waiting at most `timeout` for one.
    pub fn next(&mut self, timeout: Duration) -> anyhow::Result<Option<Event>> {
        if let Some(ev) = self.take() {
            return Ok(Some(ev));
        }
        wait_readable(self.events.as_fd(), timeout).context("polling the TRACE ring buffer")?;
        Ok(self.take())
    }

    /// Every event waiting now.
    pub fn drain(&mut self) -> Vec<Event> {
        std::iter::from_fn(|| self.take()).collect()
    }

    fn take(&mut self) -> Option<Event> {
        loop {
            let item = self.events.next()?;
            if let Some(ev) = Event::from_record(&item) {
                return Some(ev);
            }
        }
    }
}

impl Drop for Tracer {
    /// However the tracer ends, it does not leave the data plane tracing.
    fn drop(&mut self) {
        if self.on {
            let _ = self.set(TraceConf::default());
        }
    }
}

/// A pinned map of the data plane under `pin_dir`; `feature` names what
/// needs it when it is missing (an agent of an older version).
pub(crate) fn open_pinned(pin_dir: &Path, map: MapName, feature: &str) -> anyhow::Result<MapData> {
    let (name, path) = (map.name(), pin_dir.join(map.name()));
    if !path.exists() {
        bail!(
            "no {name} map pinned under {}: is `lb run --pin-dir {}` running (a version with \
             {feature})?",
            pin_dir.display(),
            pin_dir.display()
        );
    }
    MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))
}

/// When a reader of the data plane's ring buffer stops: `--duration`
/// seconds from now (if given), and a flag SIGINT and SIGTERM raise.
pub(crate) fn deadline_and_stop(
    duration: Option<f64>,
) -> anyhow::Result<(Option<Instant>, Arc<AtomicBool>)> {
    let deadline = match duration {
        Some(s) if !(s.is_finite() && s > 0.0) => bail!("--duration must be a positive number"),
        Some(s) => Some(
            Duration::try_from_secs_f64(s)
                .ok()
                .and_then(|d| Instant::now().checked_add(d))
                .context("--duration is too long")?,
        ),
        None => None,
    };
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, Arc::clone(&stop)).context("signal handler")?;
    }
    Ok((deadline, stop))
}

/// How long to wait for the next records: 100 ms, less near the deadline;
/// `None` once it has passed.
pub(crate) fn next_wait(deadline: Option<Instant>) -> Option<Duration> {
    let step = Duration::from_millis(100);
    match deadline {
        Some(d) => {
            let left = d.saturating_duration_since(Instant::now());
            (!left.is_zero()).then(|| left.min(step))
        }
        None => Some(step),
    }
}

/// Waits at most `timeout` for `fd` (a ring buffer) to have data; a signal
/// ends the wait early without an error.
pub(crate) fn wait_readable(
    fd: std::os::fd::BorrowedFd<'_>,
    timeout: Duration,
) -> std::io::Result<()> {
    let mut fds = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd for the duration of the call.
    let rc = unsafe { libc::poll(&mut fds, 1, ms) };
    if rc < 0 {
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
    Ok(())
}

/// The verdict mask for `--verdict` names (empty: the default set).
pub fn verdict_mask(names: &[String]) -> anyhow::Result<u64> {
    if names.is_empty() {
        return Ok(TRACE_DEFAULT_VERDICTS);
    }
    let mut mask = 0;
    for name in names {
        let Some(v) = Verdict::ALL.iter().find(|v| v.name() == name) else {
            let known: Vec<&str> = Verdict::ALL
                .iter()
                .filter(|v| !v.is_forwarded())
                .map(|v| v.name())
                .collect();
            bail!("unknown verdict {name:?}: one of {}", known.join(", "));
        };
        if v.is_forwarded() {
            bail!("{name}: forwarded packets are never traced (only the other verdicts)");
        }
        mask |= v.trace_bit();
    }
    Ok(mask)
}

/// A protocol by its IANA keyword (IPv6's extension headers too: an IPv6
/// event's protocol is its fixed header's next header).
fn protocol_name(p: u8) -> String {
    match p {
        IPPROTO_TCP => "tcp".into(),
        IPPROTO_UDP => "udp".into(),
        IPPROTO_ICMP => "icmp".into(),
        IPPROTO_ICMPV6 => "icmpv6".into(),
        NEXTHDR_HOP => "hopopt".into(),
        NEXTHDR_ROUTING => "ipv6-route".into(),
        NEXTHDR_FRAGMENT => "ipv6-frag".into(),
        NEXTHDR_NONE => "ipv6-nonxt".into(),
        NEXTHDR_DEST => "ipv6-opts".into(),
        other => format!("proto-{other}"),
    }
}

fn verdict_name(verdict: u32) -> String {
    Verdict::from_index(verdict)
        .map(|v| v.name().to_string())
        .unwrap_or_else(|| format!("verdict-{verdict}"))
}

/// One event as a line: `pass_no_service 198.18.0.2:40000 → 198.18.0.10:9/udp
/// service none if 3 len 60`; IPv6 as `[2001:db8::2]:40000 →
/// [2001:db8::10]:9/udp`.
pub fn render<E: Into<Event> + Copy>(ev: &E) -> String {
    let v = (*ev).into().view();
    let service = v
        .service()
        .map_or_else(|| "none".to_string(), |id| id.to_string());
    let flow = if !v.ip {
        format!("ethertype 0x{:04x}", v.ether_type)
    } else if v.saddr.is_unspecified() && v.daddr.is_unspecified() && v.protocol == 0 {
        let family = if v.saddr.is_ipv4() { "ipv4" } else { "ipv6" };
        format!("{family} header cut short")
    } else if v.protocol == IPPROTO_TCP || v.protocol == IPPROTO_UDP {
        format!(
            "{} → {}/{}",
            SocketAddr::new(v.saddr, v.sport),
            SocketAddr::new(v.daddr, v.dport),
            protocol_name(v.protocol)
        )
    } else {
        format!("{} → {}/{}", v.saddr, v.daddr, protocol_name(v.protocol))
    };
    format!(
        "{} {flow} service {service} if {} len {}",
        verdict_name(v.verdict),
        v.ifindex,
        v.len
    )
}

/// One event as a JSON object.
pub fn json<E: Into<Event> + Copy>(ev: &E) -> serde_json::Value {
    let v = (*ev).into().view();
    serde_json::json!({
        "verdict": verdict_name(v.verdict),
        "family": if v.saddr.is_ipv4() { "ipv4" } else { "ipv6" },
        "saddr": v.saddr.to_string(),
        "sport": v.sport,
        "daddr": v.daddr.to_string(),
        "dport": v.dport,
        "protocol": protocol_name(v.protocol),
        "ether_type": v.ether_type,
        "service_id": v.service(),
        "ifindex": v.ifindex,
        "len": v.len,
    })
}

/// `HH:MM:SS.mmm` (UTC) of now.
fn clock() -> String {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let s = ms / 1000;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        (s / 3600) % 24,
        (s / 60) % 60,
        s % 60,
        ms % 1000
    )
}

/// `lb trace`.
pub fn run(args: TraceArgs) -> anyhow::Result<()> {
    let mask = verdict_mask(&args.verdicts)?;
    let (deadline, stop) = deadline_and_stop(args.duration)?;
    let mut tracer = Tracer::open(&args.pin_dir)?;
    // Events left from an earlier tracer are not this one's.
    let stale = tracer.drain().len();
    tracer.start(mask)?;
    let names: Vec<&str> = Verdict::ALL
        .iter()
        .filter(|v| mask & v.trace_bit() != 0)
        .map(|v| v.name())
        .collect();
    eprintln!(
        "lb: tracing {} under {} (Ctrl-C to stop){}",
        names.join(" "),
        args.pin_dir.display(),
        if stale > 0 {
            format!("; skipped {stale} old event(s)")
        } else {
            String::new()
        }
    );
    let mut seen = 0u64;
    let outcome = (|| -> anyhow::Result<()> {
        while !stop.load(Ordering::Relaxed) && args.count.is_none_or(|n| seen < n) {
            let Some(wait) = next_wait(deadline) else {
                break;
            };
            let Some(ev) = tracer.next(wait)? else {
                continue;
            };
            if !args.services.is_empty()
                && !ev
                    .view()
                    .service()
                    .is_some_and(|id| args.services.contains(&id))
            {
                continue;
            }
            seen += 1;
            if args.json {
                println!("{}", json(&ev));
            } else {
                println!("{} {}", clock(), render(&ev));
            }
        }
        Ok(())
    })();
    let lost = tracer.stop()?;
    eprintln!(
        "lb: {seen} event(s){}; tracing off",
        if lost > 0 {
            format!(", {lost} lost (the ring buffer was full)")
        } else {
            String::new()
        }
    );
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(verdict: Verdict, protocol: u8) -> TraceEvent {
        TraceEvent {
            verdict: verdict as u32,
            service_id: TRACE_NO_SERVICE,
            saddr: u32::from_ne_bytes([198, 18, 0, 2]),
            daddr: u32::from_ne_bytes([198, 18, 0, 10]),
            sport: 40000u16.to_be(),
            dport: 9u16.to_be(),
            protocol,
            _pad0: 0,
            ether_type: ETH_P_IPV4_RAW,
            ifindex: 3,
            len: 60,
        }
    }

    #[test]
    fn events_render_as_one_line_and_as_json() {
        assert_eq!(
            render(&ev(Verdict::PassNoService, IPPROTO_UDP)),
            "pass_no_service 198.18.0.2:40000 → 198.18.0.10:9/udp service none if 3 len 60"
        );
        let icmp = TraceEvent {
            sport: 0,
            dport: 0,
            ..ev(Verdict::PassOtherProtocol, IPPROTO_ICMP)
        };
        assert_eq!(
            render(&icmp),
            "pass_other_protocol 198.18.0.2 → 198.18.0.10/icmp service none if 3 len 60"
        );
        let with_service = TraceEvent {
            service_id: 4,
            ..ev(Verdict::DropFragment, IPPROTO_TCP)
        };
        let j = json(&with_service);
        assert_eq!(j["verdict"], "drop_fragment");
        assert_eq!(j["saddr"], "198.18.0.2");
        assert_eq!(j["dport"], 9);
        assert_eq!(j["service_id"], 4);
        assert!(render(&with_service).contains("service 4"));
        let arp = TraceEvent {
            ether_type: 0x0806u16.to_be(),
            ..TraceEvent::default()
        };
        assert_eq!(
            render(&arp),
            "pass_not_ours ethertype 0x0806 service 0 if 0 len 0"
        );
    }

    #[test]
    fn verdict_names_pick_bits_and_forwarded_ones_are_refused() {
        assert_eq!(verdict_mask(&[]).expect("default"), TRACE_DEFAULT_VERDICTS);
        assert_eq!(
            verdict_mask(&["drop_fragment".into(), "pass_not_ours".into()]).expect("two"),
            Verdict::DropFragment.trace_bit() | Verdict::PassNotOurs.trace_bit()
        );
        let e = verdict_mask(&["forwarded".into()]).expect_err("forwarded");
        assert!(e.to_string().contains("never traced"), "{e}");
        let e = verdict_mask(&["nope".into()]).expect_err("unknown");
        assert!(e.to_string().contains("drop_fragment"), "{e}");
        // The trace mask has 64 bits: every verdict has one, those past 31
        // (PROXY v2's, full NAT's, ...) included.
        for v in Verdict::ALL {
            let on = TRACE_DEFAULT_VERDICTS & v.trace_bit() != 0;
            assert_eq!(on, !v.is_forwarded() && v != Verdict::PassNotOurs, "{v:?}");
        }
        assert_eq!(
            verdict_mask(&["drop_proxy_lost".into()]).expect("past 31"),
            1u64 << Verdict::DropProxyLost as u32
        );
    }

    fn ev6(verdict: Verdict, protocol: u8) -> TraceEvent6 {
        let a = |s: &str| lb_common::ipv6::addr_of(s.parse::<Ipv6Addr>().expect("ip").octets());
        TraceEvent6 {
            verdict: verdict as u32,
            service_id: 7,
            saddr: a("2001:db8::2"),
            daddr: a("2001:db8:18::10"),
            sport: 41234u16.to_be(),
            dport: 80u16.to_be(),
            protocol,
            _pad0: 0,
            ether_type: ETH_P_IPV6_RAW,
            ifindex: 3,
            len: 74,
        }
    }

    #[test]
    fn ipv6_events_render_with_brackets_and_their_next_header() {
        assert_eq!(
            render(&ev6(Verdict::DropFirewallDeny, IPPROTO_TCP)),
            "drop_firewall_deny [2001:db8::2]:41234 → [2001:db8:18::10]:80/tcp service 7 if 3 \
             len 74"
        );
        let frag = TraceEvent6 {
            sport: 0,
            dport: 0,
            service_id: TRACE_NO_SERVICE,
            ..ev6(Verdict::DropFragment, NEXTHDR_FRAGMENT)
        };
        assert_eq!(
            render(&frag),
            "drop_fragment 2001:db8::2 → 2001:db8:18::10/ipv6-frag service none if 3 len 74"
        );
        let cut = TraceEvent6 {
            ether_type: ETH_P_IPV6_RAW,
            ..TraceEvent6::default()
        };
        assert!(
            render(&cut).contains("ipv6 header cut short"),
            "{}",
            render(&cut)
        );
        // A hop-by-hop header is next header 0: not "cut short".
        assert!(render(&ev6(Verdict::DropIpv6TooManyExtensions, NEXTHDR_HOP)).contains("/hopopt"));
        let j = json(&ev6(Verdict::DropNoBackend, IPPROTO_UDP));
        assert_eq!(j["family"], "ipv6");
        assert_eq!(j["saddr"], "2001:db8::2");
        assert_eq!(j["daddr"], "2001:db8:18::10");
        assert_eq!(j["sport"], 41234);
        assert_eq!(j["protocol"], "udp");
        assert_eq!(j["service_id"], 7);
        assert_eq!(
            json(&ev(Verdict::PassNoService, IPPROTO_UDP))["family"],
            "ipv4"
        );
    }

    #[test]
    fn a_record_is_read_as_the_event_its_length_says() {
        let v4 = ev(Verdict::PassNoService, IPPROTO_UDP);
        let v6 = ev6(Verdict::DropNoBackend, IPPROTO_TCP);
        // SAFETY: plain old data viewed as its bytes.
        let bytes = |p: *const u8, n| unsafe { std::slice::from_raw_parts(p, n) }.to_vec();
        let r4 = bytes((&raw const v4).cast(), size_of::<TraceEvent>());
        let r6 = bytes((&raw const v6).cast(), size_of::<TraceEvent6>());
        assert_eq!(Event::from_record(&r4), Some(Event::V4(v4)));
        assert_eq!(Event::from_record(&r6), Some(Event::V6(v6)));
        assert_eq!(Event::from_record(&r6[..40]), None);
        assert_eq!(Event::V6(v6).view().service(), Some(7));
        assert_eq!(Event::V4(v4).view().service(), None);
    }
}
