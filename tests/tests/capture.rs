//! `lb capture` on the lab, compared with what the backend itself saw: a
//! curl through the VIP in NAT and in DSR mode, captured by `lb capture
//! --service www` as pcap while tcpdump runs on web1's interface. Every
//! frame web1 received from the client is, byte for byte, a frame of the
//! capture (the frame as XDP left it); in NAT, every reply web1 sent is in
//! the capture as the LB rewrote it (same TCP segment, from the VIP, valid
//! checksums); in DSR no reply crosses the LB. Both pcaps are read with
//! `pcap-file` and parsed with etherparse, independently of lb's code. A
//! second test fills the ring buffer without reading it: the records lost
//! are counted; and `--drops` adds packets the data plane does not forward.

use std::{
    io::{BufRead, BufReader},
    net::UdpSocket,
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use etherparse::{LaxSlicedPacket, NetSlice, SlicedPacket, TransportSlice};
use lb_common::capture::{CAPTURE_FORWARDED, CAPTURE_NOT_FORWARDED, CaptureConf};
use lb_tests::{in_each_mode, lb_bin, tcpdump_command, unique_prefix};
use lb_userspace::{
    capture::Capturer,
    config::Forwarding,
    harness::{
        lab::{CLIENT_FRONT, Lab, VIP, http_get, vip_http, web_addr},
        netns::in_netns,
    },
};

/// web1 alone behind the VIP (so the curl's backend is known), TCP :80 and
/// UDP :5353, no health checks.
fn config(mode: Forwarding) -> String {
    format!(
        "[dataplane]\ninterfaces = [\"lb-front\", \"lb-back\"]\nforwarding = \"{}\"\n\n\
         [[service]]\nname = \"www\"\nvip = \"{VIP}:80\"\n\
         backends = [{{ name = \"web1\", address = \"{}:80\" }}]\n\n\
         [[service]]\nname = \"udp\"\nvip = \"{VIP}:5353\"\nprotocol = \"udp\"\n\
         backends = [{{ name = \"web1\", address = \"{}:5353\" }}]\n",
        mode.name(),
        web_addr(1),
        web_addr(1)
    )
}

/// Starts `program` and waits until a line of its stderr contains `ready`.
fn start_and_wait(mut cmd: Command, ready: &'static str) -> Result<Child> {
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    let stderr = child.stderr.take().context("stderr")?;
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("  {line}");
            if line.contains(ready) {
                let _ = tx.send(());
            }
        }
    });
    if rx.recv_timeout(Duration::from_secs(10)).is_err() {
        let _ = child.kill();
        let _ = child.wait();
        bail!("{cmd:?} did not say {ready:?} within 10 s");
    }
    Ok(child)
}

/// SIGTERM, then wait (both lb capture and tcpdump finish their file).
fn stop(mut child: Child) -> Result<()> {
    let pid = rustix::process::Pid::from_raw(i32::try_from(child.id())?).context("pid")?;
    let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("did not stop within 10 s of SIGTERM");
        }
        thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// The frames of a pcap file (Ethernet), read with pcap-file.
fn frames(path: &Path) -> Result<Vec<Vec<u8>>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut reader = pcap_file::pcap::PcapReader::new(file)
        .with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    while let Some(pkt) = reader.next_packet() {
        let pkt = pkt.with_context(|| format!("a packet of {}", path.display()))?;
        ensure!(
            pkt.orig_len as usize == pkt.data.len(),
            "snapped frame in {}",
            path.display()
        );
        out.push(pkt.data.into_owned());
    }
    Ok(out)
}

/// A TCP frame's (source, destination, seq, ack, flags, payload), its IPv4
/// and TCP checksums checked.
#[derive(Debug, PartialEq, Eq)]
struct Segment {
    src: std::net::Ipv4Addr,
    dst: std::net::Ipv4Addr,
    seq: u32,
    ack: u32,
    flags: (bool, bool, bool, bool),
    payload: Vec<u8>,
}

fn segment(frame: &[u8]) -> Result<Segment> {
    let p = SlicedPacket::from_ethernet(frame).context("parsing a frame")?;
    let Some(NetSlice::Ipv4(ip)) = p.net else {
        bail!("not IPv4");
    };
    let Some(TransportSlice::Tcp(tcp)) = p.transport else {
        bail!("not TCP");
    };
    let header = ip.header().to_header();
    ensure!(
        header.header_checksum == header.calc_header_checksum(),
        "bad IPv4 checksum"
    );
    let expected = tcp
        .to_header()
        .calc_checksum_ipv4(&header, tcp.payload())
        .context("TCP checksum")?;
    ensure!(tcp.checksum() == expected, "bad TCP checksum");
    Ok(Segment {
        src: header.source.into(),
        dst: header.destination.into(),
        seq: tcp.sequence_number(),
        ack: tcp.acknowledgment_number(),
        flags: (tcp.syn(), tcp.ack(), tcp.fin(), tcp.psh()),
        payload: tcp.payload().to_vec(),
    })
}

#[test]
fn capture_shows_what_the_backend_received_in_nat_and_dsr() -> Result<()> {
    let mut lab = Lab::up(&unique_prefix("lbcap"), &lb_bin())?;
    let dir = lab.run_dir();
    in_each_mode(&mut lab, config, |lab, mode| {
        // One exchange, compared frame by frame. tcpdump on web1 may lose
        // a frame on a loaded machine ("packets dropped by kernel"), which
        // fails the comparison through no fault of the capture: a mismatch
        // is tried again with a new connection, twice at most. A capture
        // that really differs from what web1 got differs every time.
        let once = |attempt: u32| -> Result<()> {
            let name = mode.name();
            let backend_pcap = dir.join(format!("web1-{name}-{attempt}.pcap"));
            let lb_pcap = dir.join(format!("lb-{name}-{attempt}.pcap"));
            let tcpdump = start_and_wait(
                tcpdump_command(&lab.web_ns(1), "eth0", &backend_pcap, "tcp port 80"),
                "listening on",
            )?;
            let mut cmd = Command::new(lb_bin());
            cmd.args(["capture", "--service", "www", "--snaplen", "1536"])
                .arg("--pin-dir")
                .arg(lab.pin_dir())
                .arg("--socket")
                .arg(lab.agent_socket())
                .arg("-w")
                .arg(&lb_pcap);
            let capture = start_and_wait(cmd, "lb: capturing")?;
            let answer = in_netns(&lab.client_ns(), || http_get(vip_http(), "/"))??;
            ensure!(answer.text() == "web1", "{}", answer.text());
            // The last ACK reaches web1 after curl returns.
            thread::sleep(Duration::from_millis(300));
            stop(capture)?;
            let captured = frames(&lb_pcap)?;
            let from_client = |f: &&Vec<u8>| segment(f).is_ok_and(|s| s.src == CLIENT_FRONT);
            // tcpdump writes each packet as it handles it (-U), but on a busy
            // machine it may not have handled the last ones yet: it is stopped
            // once its file holds as many of the client's frames (or after 5 s).
            let want = captured.iter().filter(from_client).count();
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline
                && frames(&backend_pcap).map_or(0, |r| r.iter().filter(from_client).count()) < want
            {
                thread::sleep(Duration::from_millis(100));
            }
            stop(tcpdump)?;
            let received = frames(&backend_pcap)?;
            let to_web: Vec<&Vec<u8>> = received.iter().filter(from_client).collect();
            ensure!(
                to_web.len() >= 5,
                "web1 saw {} frames of the client's connection",
                to_web.len()
            );
            // Byte for byte: the frames web1 received are the ones XDP sent.
            let requests: Vec<&Vec<u8>> = captured.iter().filter(from_client).collect();
            if requests != to_web {
                let only = |a: &[&Vec<u8>], b: &[&Vec<u8>]| -> Vec<String> {
                    a.iter()
                        .filter(|f| !b.contains(f))
                        .map(|f| format!("{:?} ({} bytes)", segment(f).ok(), f.len()))
                        .collect()
                };
                bail!(
                    "{name}: the capture's client frames ({}) differ from web1's ({}); only in the \
                     capture: {:#?}; only at web1: {:#?}",
                    requests.len(),
                    to_web.len(),
                    only(&requests, &to_web),
                    only(&to_web, &requests)
                );
            }
            let replies: Vec<Segment> = captured
                .iter()
                .filter(|f| !from_client(f))
                .map(|f| segment(f))
                .collect::<Result<_>>()?;
            match mode {
                Forwarding::Nat => {
                    // web1's replies, as the LB rewrote them: from the VIP.
                    let sent: Vec<Segment> = received
                        .iter()
                        .filter_map(|f| segment(f).ok())
                        .filter(|s| s.src == web_addr(1))
                        .map(|s| Segment { src: VIP, ..s })
                        .collect();
                    ensure!(!sent.is_empty(), "web1 sent no reply");
                    ensure!(
                        replies == sent,
                        "NAT replies in the capture {replies:#?}\nweb1 sent {sent:#?}"
                    );
                }
                Forwarding::FullNat => {
                    return Err(anyhow::anyhow!("this test runs NAT and DSR only"));
                }
                Forwarding::Dsr | Forwarding::Ipip | Forwarding::Gue => ensure!(
                    replies.is_empty(),
                    "DSR replies bypass the LB, yet the capture has {replies:#?}"
                ),
            }
            Ok(())
        };
        let mut failures = Vec::new();
        for attempt in 1..=3 {
            match once(attempt) {
                Ok(()) => return Ok(()),
                Err(e) => {
                    println!("attempt {attempt}: {e:#}");
                    failures.push(format!("{e:#}"));
                }
            }
        }
        bail!("three exchanges in a row differed: {failures:#?}")
    })
}

/// A capture nobody reads fills the ring buffer: the records that did not
/// fit are counted, not silently gone. `--drops` (CAPTURE_NOT_FORWARDED)
/// adds what the data plane passes or drops.
#[test]
fn capture_counts_lost_records_and_shows_drops_on_request() -> Result<()> {
    let lab = Lab::up(&unique_prefix("lbcal"), &lb_bin())?;
    let agent = lab.start_agent(&config(Forwarding::Nat))?;
    lab.set_mode(Forwarding::Nat)?;
    let mut capturer = Capturer::open(&lab.pin_dir())?;
    let send = |port: u16, n: usize| -> Result<()> {
        in_netns(&lab.client_ns(), || -> Result<()> {
            let socket = UdpSocket::bind("0.0.0.0:0")?;
            for _ in 0..n {
                socket.send_to(&[0u8; 1200], (VIP, port))?;
            }
            Ok(())
        })?
    };
    // Drops only on request: UDP to a port without a service is passed to
    // the kernel (pass_no_service).
    for (what, expect) in [
        (CAPTURE_FORWARDED, false),
        (CAPTURE_FORWARDED | CAPTURE_NOT_FORWARDED, true),
    ] {
        capturer.start(CaptureConf {
            what,
            snaplen: 128,
            ..CaptureConf::default()
        })?;
        send(9, 3)?;
        thread::sleep(Duration::from_millis(200));
        let mut seen = 0;
        capturer.drain(|rec| {
            // Snapped at 128 bytes: the lax parser takes a cut packet.
            let p = LaxSlicedPacket::from_ethernet(&rec.data[..rec.caplen as usize])?;
            if let Some(TransportSlice::Udp(udp)) = p.transport
                && udp.destination_port() == 9
            {
                seen += 1;
            }
            Ok(())
        })?;
        capturer.stop()?;
        ensure!(
            (seen == 3) == expect,
            "what = {what}: {seen} of 3 datagrams to a port without a service captured"
        );
    }
    // 4000 datagrams of 1200 bytes to the UDP service, none read: more
    // than the 4 MiB ring buffer holds.
    capturer.start(CaptureConf {
        what: CAPTURE_FORWARDED,
        snaplen: 1536,
        ..CaptureConf::default()
    })?;
    send(5353, 4000)?;
    thread::sleep(Duration::from_millis(300));
    let lost = capturer.stop()?;
    let kept = capturer.drain(|_| Ok(()))?;
    // Not every datagram need reach XDP (the client's veth queue may
    // overflow), but more than the ring holds do.
    ensure!(
        lost > 0 && kept > 0,
        "kept {kept}, lost {lost} of 4000 datagrams (and their replies)"
    );
    drop(capturer);
    agent.stop()?;
    lab.remove_dataplane()?;
    Ok(())
}
