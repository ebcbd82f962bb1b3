//! `lb capture`: the frames the data plane forwards (and, with `--drops`,
//! those it does not), as they leave the XDP program, written as pcap. The
//! data plane copies the first `--snaplen` bytes of each frame its filter
//! takes into the `CAPTURE` ring buffer while the `CAPTURE_ON` switch is
//! set; this opens both pinned maps (like `lb trace`), sets the switch and
//! filter, writes the records with `pcap-file` and clears the switch when
//! it stops. Records the ring buffer had no room for are counted by the
//! data plane and reported at the end.
//!
//! `--vip` and `--service` become the VIP's address and port plus every
//! backend's (a NAT request leaves with the backend as destination), read
//! from the agent's status; `--backend` and `--port` add an address/port
//! pair; a frame matches any pair, and `--client` narrows to a prefix on
//! either side. One capture at a time: captures share the switch.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::AsFd,
    path::{Path, PathBuf},
    sync::atomic::Ordering,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, bail};
use aya::maps::{Array, Map, MapData, RingBuf};
use lb_common::capture::{
    CAPTURE_FORWARDED, CAPTURE_MAX_ENDPOINTS, CAPTURE_MAX_SNAPLEN, CAPTURE_NOT_FORWARDED,
    CaptureConf, CaptureEndpoint, CaptureRecord,
};
use lb_common::map_names::MapName;
use pcap_file::{
    DataLink,
    pcap::{PcapHeader, PcapPacket, PcapWriter},
};

use crate::{
    config::Prefix,
    control::{self, Request, ServiceStatus},
    trace::{deadline_and_stop, next_wait, open_pinned, wait_readable},
};

#[derive(clap::Args, Debug)]
pub struct CaptureArgs {
    /// Write pcap to FILE; `-` for stdout (`lb capture -w - | tcpdump -r -`)
    #[arg(short = 'w', long = "write", value_name = "FILE")]
    pub write: PathBuf,
    /// Frames to or from this VIP (IPV4 or IPV4:PORT), and its services'
    /// backends (asks the agent)
    #[arg(long)]
    pub vip: Option<String>,
    /// Frames of this service: its VIP and port and its backends (asks the
    /// agent)
    #[arg(long)]
    pub service: Option<String>,
    /// Frames to or from this backend (IPV4 or IPV4:PORT); NAT replies
    /// leave rewritten from the VIP, so they match --vip or --service
    #[arg(long)]
    pub backend: Option<String>,
    /// Frames whose source or destination is in this prefix (CIDR or one
    /// address)
    #[arg(long)]
    pub client: Option<String>,
    /// Frames with this port on either side
    #[arg(long)]
    pub port: Option<u16>,
    /// Also the frames the data plane does not forward (dropped or passed
    /// to the kernel)
    #[arg(long)]
    pub drops: bool,
    /// Bytes of each frame kept (1 to 1536)
    #[arg(long, default_value_t = 256)]
    pub snaplen: u32,
    /// Stop after this many frames
    #[arg(long)]
    pub count: Option<u64>,
    /// Stop after this many seconds
    #[arg(long, value_name = "S")]
    pub duration: Option<f64>,
    /// The bpffs directory of the data plane (`lb run --pin-dir`)
    #[arg(long, default_value = crate::host::DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// The agent's control socket (for --vip and --service)
    #[arg(long, default_value = control::DEFAULT_SOCKET)]
    pub socket: PathBuf,
}

/// `IPV4` or `IPV4:PORT` as an endpoint (port 0: any).
fn endpoint(text: &str, what: &str) -> anyhow::Result<(Ipv4Addr, u16)> {
    if let Ok(sa) = text.parse::<SocketAddrV4>() {
        return Ok((*sa.ip(), sa.port()));
    }
    let ip = text
        .parse::<Ipv4Addr>()
        .with_context(|| format!("--{what} {text:?}: expected IPV4 or IPV4:PORT"))?;
    Ok((ip, 0))
}

fn wire(ip: Ipv4Addr, port: u16) -> CaptureEndpoint {
    CaptureEndpoint {
        addr: u32::from_ne_bytes(ip.octets()),
        port: port.to_be(),
        _pad: 0,
    }
}

/// The VIP and port of each service `pick` selects, and its backends.
fn service_endpoints(
    services: &[ServiceStatus],
    pick: impl Fn(&ServiceStatus, SocketAddrV4) -> bool,
) -> anyhow::Result<Vec<(Ipv4Addr, u16)>> {
    let mut out = Vec::new();
    for s in services {
        let vip: SocketAddrV4 = s
            .vip
            .parse()
            .with_context(|| format!("service {}: VIP {:?}", s.name, s.vip))?;
        if !pick(s, vip) {
            continue;
        }
        out.push((*vip.ip(), vip.port()));
        for b in &s.backends {
            let addr: SocketAddrV4 = b
                .address
                .parse()
                .with_context(|| format!("backend {}: {:?}", b.name, b.address))?;
            out.push((*addr.ip(), addr.port()));
        }
    }
    Ok(out)
}

/// The switch's value for `args`: what to capture and the filter.
pub fn filter(args: &CaptureArgs) -> anyhow::Result<CaptureConf> {
    if !(1..=CAPTURE_MAX_SNAPLEN).contains(&args.snaplen) {
        bail!("--snaplen must be 1 to {CAPTURE_MAX_SNAPLEN}");
    }
    let mut pairs: Vec<(Ipv4Addr, u16)> = Vec::new();
    if args.vip.is_some() || args.service.is_some() {
        let status = control::request(&args.socket, &Request::Status)
            .with_context(|| {
                format!(
                    "--vip/--service need the agent's services (--socket {})",
                    args.socket.display()
                )
            })?
            .status
            .context("the agent sent no status")?;
        if let Some(vip) = &args.vip {
            let (ip, port) = endpoint(vip, "vip")?;
            let found = service_endpoints(&status.services, |_, v| {
                *v.ip() == ip && (port == 0 || v.port() == port)
            })?;
            if found.is_empty() {
                bail!("--vip {vip}: no service of the agent has it");
            }
            pairs.extend(found);
        }
        if let Some(name) = &args.service {
            let found = service_endpoints(&status.services, |s, _| &s.name == name)?;
            if found.is_empty() {
                bail!("--service {name}: the agent has no such service");
            }
            pairs.extend(found);
        }
    }
    if let Some(b) = &args.backend {
        pairs.push(endpoint(b, "backend")?);
    }
    if let Some(port) = args.port {
        pairs.push((Ipv4Addr::UNSPECIFIED, port));
    }
    pairs.sort();
    pairs.dedup();
    if pairs.len() > CAPTURE_MAX_ENDPOINTS {
        bail!(
            "the filter names {} address/port pairs; the data plane matches at most \
             {CAPTURE_MAX_ENDPOINTS}: narrow it (--service, --backend)",
            pairs.len()
        );
    }
    let mut conf = CaptureConf {
        what: CAPTURE_FORWARDED | if args.drops { CAPTURE_NOT_FORWARDED } else { 0 },
        snaplen: args.snaplen,
        endpoints: pairs.len() as u32,
        ..CaptureConf::default()
    };
    for (slot, (ip, port)) in conf.endpoint.iter_mut().zip(&pairs) {
        *slot = wire(*ip, *port);
    }
    if let Some(client) = &args.client {
        let prefix = Prefix::parse(client).map_err(|e| anyhow::anyhow!("--client: {e}"))?;
        conf.client = u32::from_ne_bytes(prefix.addr.octets());
        conf.client_mask = Prefix::mask(prefix.len).to_be();
    }
    Ok(conf)
}

/// The switch and the ring buffer of a data plane's capture.
pub struct Capturer {
    records: RingBuf<MapData>,
    switch: Array<MapData, CaptureConf>,
    on: bool,
}

impl Capturer {
    pub fn open(pin_dir: &Path) -> anyhow::Result<Self> {
        let pin = |name| open_pinned(pin_dir, name, "capture");
        Self::from_maps(pin(MapName::CAPTURE)?, pin(MapName::CAPTURE_ON)?)
    }

    /// Opens the maps of a loaded data plane (tests, the benchmark).
    pub fn of(dp: &crate::dataplane::Dataplane) -> anyhow::Result<Self> {
        Self::from_maps(
            dp.map_data(MapName::CAPTURE)?,
            dp.map_data(MapName::CAPTURE_ON)?,
        )
    }

    fn from_maps(records: MapData, switch: MapData) -> anyhow::Result<Self> {
        Ok(Capturer {
            records: RingBuf::try_from(Map::RingBuf(records)).context("CAPTURE ring buffer")?,
            switch: Array::try_from(Map::Array(switch)).context("CAPTURE_ON")?,
            on: false,
        })
    }

    fn set(&mut self, conf: CaptureConf) -> anyhow::Result<()> {
        self.switch.set(0, conf, 0).context("writing CAPTURE_ON")
    }

    /// Switches capture on with `conf` (its lost count zeroed).
    pub fn start(&mut self, conf: CaptureConf) -> anyhow::Result<()> {
        self.on = true;
        self.set(CaptureConf { lost: 0, ..conf })
    }

    /// Switches capture off; returns the records lost meanwhile.
    pub fn stop(&mut self) -> anyhow::Result<u64> {
        let lost = self.switch.get(&0, 0).context("reading CAPTURE_ON")?.lost;
        self.set(CaptureConf::default())?;
        self.on = false;
        Ok(lost)
    }

    /// Every record waiting now, handed to `f`.
    pub fn drain(
        &mut self,
        mut f: impl FnMut(&CaptureRecord) -> anyhow::Result<()>,
    ) -> anyhow::Result<u64> {
        let mut n = 0;
        while let Some(item) = self.records.next() {
            if item.len() >= size_of::<CaptureRecord>() {
                // SAFETY: at least size_of::<CaptureRecord>() bytes of plain
                // old data; any bit pattern is valid.
                let rec = unsafe { item.as_ptr().cast::<CaptureRecord>().read_unaligned() };
                f(&rec)?;
                n += 1;
            }
        }
        Ok(n)
    }
}

impl Drop for Capturer {
    /// However the capture ends, it does not leave the data plane copying.
    fn drop(&mut self) {
        if self.on {
            let _ = self.set(CaptureConf::default());
        }
    }
}

/// CLOCK_REALTIME − CLOCK_MONOTONIC now: turns the records' ktime into
/// wall-clock timestamps.
fn monotonic_offset() -> Duration {
    let mono = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    let mono = Duration::new(
        u64::try_from(mono.tv_sec).unwrap_or(0),
        u32::try_from(mono.tv_nsec).unwrap_or(0),
    );
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .saturating_sub(mono)
}

/// `lb capture`.
pub fn run(args: CaptureArgs) -> anyhow::Result<()> {
    let conf = filter(&args)?;
    let (deadline, stop) = deadline_and_stop(args.duration)?;
    // Unbuffered: each packet reaches a reader on a pipe as it is written.
    let out = if args.write.as_os_str() == "-" {
        std::fs::File::from(
            std::io::stdout()
                .as_fd()
                .try_clone_to_owned()
                .context("stdout")?,
        )
    } else {
        std::fs::File::create(&args.write)
            .with_context(|| format!("creating {}", args.write.display()))?
    };
    let header = PcapHeader {
        snaplen: args.snaplen,
        datalink: DataLink::ETHERNET,
        ..PcapHeader::default()
    };
    let mut pcap = PcapWriter::with_header(out, header).context("writing the pcap header")?;
    let mut capturer = Capturer::open(&args.pin_dir)?;
    // Records left by an earlier capture are not this one's.
    let stale = capturer.drain(|_| Ok(()))?;
    capturer.start(conf)?;
    eprintln!(
        "lb: capturing {} under {} to {} (Ctrl-C to stop){}",
        if args.drops {
            "forwarded and not forwarded frames"
        } else {
            "forwarded frames"
        },
        args.pin_dir.display(),
        args.write.display(),
        if stale > 0 {
            format!("; skipped {stale} old record(s)")
        } else {
            String::new()
        }
    );
    let offset = monotonic_offset();
    let mut written = 0u64;
    let outcome = (|| -> anyhow::Result<()> {
        while !stop.load(Ordering::Relaxed) && args.count.is_none_or(|n| written < n) {
            let Some(wait) = next_wait(deadline) else {
                break;
            };
            wait_readable(capturer.records.as_fd(), wait)
                .context("polling the CAPTURE ring buffer")?;
            capturer.drain(|rec| {
                if args.count.is_some_and(|n| written >= n) {
                    return Ok(());
                }
                let caplen = (rec.caplen as usize).min(rec.data.len());
                pcap.write_packet(&PcapPacket::new(
                    offset + Duration::from_nanos(rec.ktime_ns),
                    rec.len,
                    &rec.data[..caplen],
                ))
                .context("writing a packet")?;
                written += 1;
                Ok(())
            })?;
        }
        Ok(())
    })();
    let lost = capturer.stop()?;
    outcome?;
    eprintln!(
        "lb: {written} frame(s) captured{}",
        if lost > 0 {
            format!(", {lost} lost (the ring buffer was full: the reader was too slow)")
        } else {
            String::new()
        }
    );
    Ok(())
}
