//! `lb trace`: live drop tracing. The data plane sends one event per packet
//! it does not forward (verdict, 5-tuple, service id) into the `TRACE` ring
//! buffer while the `TRACE_ON` switch asks for that verdict. This opens both
//! pinned maps directly (no agent needed), sets the switch, prints the
//! events and clears the switch when it stops (count, duration, Ctrl-C,
//! SIGTERM, or an error).
//!
//! Concurrent tracers share one switch and one ring buffer: the events are
//! split between them and the first to stop switches tracing off for all.
//! Run one at a time.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
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
    pub fn start(&mut self, mask: u32) -> Result<(), DataplaneError> {
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
    pub fn next(&mut self, timeout: Duration) -> anyhow::Result<Option<TraceEvent>> {
        if let Some(ev) = self.take() {
            return Ok(Some(ev));
        }
        wait_readable(self.events.as_fd(), timeout).context("polling the TRACE ring buffer")?;
        Ok(self.take())
    }

    /// Every event waiting now.
    pub fn drain(&mut self) -> Vec<TraceEvent> {
        std::iter::from_fn(|| self.take()).collect()
    }

    fn take(&mut self) -> Option<TraceEvent> {
        loop {
            let item = self.events.next()?;
            if item.len() >= size_of::<TraceEvent>() {
                // SAFETY: at least size_of::<TraceEvent>() bytes; TraceEvent is
                // plain old data, any bit pattern is valid.
                return Some(unsafe { item.as_ptr().cast::<TraceEvent>().read_unaligned() });
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
pub fn verdict_mask(names: &[String]) -> anyhow::Result<u32> {
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

fn protocol_name(p: u8) -> String {
    match p {
        IPPROTO_TCP => "tcp".into(),
        IPPROTO_UDP => "udp".into(),
        IPPROTO_ICMP => "icmp".into(),
        other => format!("proto-{other}"),
    }
}

fn addr(raw: u32, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from(raw.to_ne_bytes()), u16::from_be(port))
}

fn verdict_name(ev: &TraceEvent) -> String {
    Verdict::from_index(ev.verdict)
        .map(|v| v.name().to_string())
        .unwrap_or_else(|| format!("verdict-{}", ev.verdict))
}

/// One event as a line: `pass_no_service 198.18.0.2:40000 → 198.18.0.10:9/udp
/// service none if 3 len 60`.
pub fn render(ev: &TraceEvent) -> String {
    let service = if ev.service_id == TRACE_NO_SERVICE {
        "none".to_string()
    } else {
        ev.service_id.to_string()
    };
    let flow = if ev.ether_type != ETH_P_IPV4_RAW {
        format!("ethertype 0x{:04x}", u16::from_be(ev.ether_type))
    } else if ev.protocol == 0 && ev.saddr == 0 && ev.daddr == 0 {
        "ipv4 header cut short".to_string()
    } else if ev.protocol == IPPROTO_TCP || ev.protocol == IPPROTO_UDP {
        format!(
            "{} → {}/{}",
            addr(ev.saddr, ev.sport),
            addr(ev.daddr, ev.dport),
            protocol_name(ev.protocol)
        )
    } else {
        format!(
            "{} → {}/{}",
            Ipv4Addr::from(ev.saddr.to_ne_bytes()),
            Ipv4Addr::from(ev.daddr.to_ne_bytes()),
            protocol_name(ev.protocol)
        )
    };
    format!(
        "{} {flow} service {service} if {} len {}",
        verdict_name(ev),
        ev.ifindex,
        ev.len
    )
}

/// One event as a JSON object.
pub fn json(ev: &TraceEvent) -> serde_json::Value {
    serde_json::json!({
        "verdict": verdict_name(ev),
        "saddr": Ipv4Addr::from(ev.saddr.to_ne_bytes()).to_string(),
        "sport": u16::from_be(ev.sport),
        "daddr": Ipv4Addr::from(ev.daddr.to_ne_bytes()).to_string(),
        "dport": u16::from_be(ev.dport),
        "protocol": protocol_name(ev.protocol),
        "ether_type": u16::from_be(ev.ether_type),
        "service_id": (ev.service_id != TRACE_NO_SERVICE).then_some(ev.service_id),
        "ifindex": ev.ifindex,
        "len": ev.len,
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
        // The trace mask has 32 bits: verdicts past 31 (PROXY v2's) are
        // counted and named, never traced (docs: "PROXY protocol v2").
        for v in Verdict::ALL {
            let on = TRACE_DEFAULT_VERDICTS & v.trace_bit() != 0;
            let traceable = (v as u32) < 32;
            assert_eq!(
                on,
                traceable && !v.is_forwarded() && v != Verdict::PassNotOurs,
                "{v:?}"
            );
        }
    }
}
