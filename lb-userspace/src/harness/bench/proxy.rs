//! PROXY protocol v2's cost (issue 25): a TCP flow through a full-NAT
//! service, established by a handshake, its client's data segments one call
//! each — plain full NAT against the same service with `proxy-protocol =
//! "v2"` (every segment after the first shifted in `lb` itself: a flag
//! test, the flow's `first` read from its established slot, the payload's
//! length, the seq and its checksum). The two data planes take turns in
//! every repetition.

use std::net::{Ipv4Addr, SocketAddrV4};

use anyhow::ensure;
use lb_common::{DEFAULT_CONNTRACK_SIZE, DEFAULT_HALF_OPEN_SIZE, checksum};

use super::{
    measure::{NsMethod, NsProgram, NsRow, Stat, ns_per_packet},
    net::{CLIENT, GEN_MAC, LBIN_MAC, PORT, VIP, bench_netns, lb_config_for},
};
use crate::{
    config::{Forwarding, ProxyProtocol},
    dataplane::{Dataplane, TableSizes},
    harness::{
        netns,
        xdp::{self, XDP_REDIRECT},
    },
};

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
const PSH: u8 = 0x08;
const CLIENT_SEQ: u32 = 0x1000_0000;
const BACKEND_SEQ: u32 = 0x2000_0000;
/// The full-NAT source address (the bench's LB side of the backends).
const SOURCE: &str = "198.19.0.1";
/// The data segment's payload: a short request.
const PAYLOAD: &[u8] = b"GET / HTTP/1.1\r\n\r\n";

/// An Ethernet/IPv4/TCP frame (no options), checksums computed.
fn tcp_frame(
    src: SocketAddrV4,
    dst: SocketAddrV4,
    seq: u32,
    ack: u32,
    flags: u8,
    payload: &[u8],
) -> Vec<u8> {
    let tcp_len = 20 + payload.len();
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&((20 + tcp_len) as u16).to_be_bytes());
    ip.extend_from_slice(&[0, 0, 0x40, 0, 64, 6, 0, 0]);
    ip.extend_from_slice(&src.ip().octets());
    ip.extend_from_slice(&dst.ip().octets());
    let check = checksum::compute(&ip, 0);
    ip[10..12].copy_from_slice(&check.to_ne_bytes());
    let mut tcp = Vec::with_capacity(tcp_len);
    tcp.extend_from_slice(&src.port().to_be_bytes());
    tcp.extend_from_slice(&dst.port().to_be_bytes());
    tcp.extend_from_slice(&seq.to_be_bytes());
    tcp.extend_from_slice(&ack.to_be_bytes());
    tcp.extend_from_slice(&[5 << 4, flags, 0xfa, 0xf0, 0, 0, 0, 0]);
    tcp.extend_from_slice(payload);
    let mut pseudo = Vec::with_capacity(12 + tcp_len);
    pseudo.extend_from_slice(&src.ip().octets());
    pseudo.extend_from_slice(&dst.ip().octets());
    pseudo.extend_from_slice(&[0, 6]);
    pseudo.extend_from_slice(&(tcp_len as u16).to_be_bytes());
    pseudo.extend_from_slice(&tcp);
    let check = checksum::compute(&pseudo, 0);
    tcp[16..18].copy_from_slice(&check.to_ne_bytes());
    let mut out = LBIN_MAC.to_vec();
    out.extend_from_slice(&GEN_MAC);
    out.extend_from_slice(&[0x08, 0x00]);
    out.extend_from_slice(&ip);
    out.extend_from_slice(&tcp);
    out
}

/// A full-NAT TCP data plane (100 backends), `proxy` or not, with one flow
/// established (handshake, then the first data segment, which a PROXY flow
/// gives the header); returns it and the client's next data segment.
fn established(proxy: bool, lbin: u32) -> anyhow::Result<(Dataplane, Vec<u8>)> {
    let sizes = TableSizes {
        conntrack: DEFAULT_CONNTRACK_SIZE,
        half_open: DEFAULT_HALF_OPEN_SIZE,
    };
    let mut cfg = lb_config_for(
        Forwarding::FullNat,
        100,
        "tcp",
        sizes,
        &format!("source-addresses = [\"{SOURCE}\"]"),
    )?;
    if proxy {
        cfg.services[0].proxy_protocol = Some(ProxyProtocol::V2);
    }
    let mut dp = Dataplane::load(sizes)?;
    dp.apply(&cfg)?;
    let client = SocketAddrV4::new(CLIENT, 1024);
    let vip = SocketAddrV4::new(VIP, PORT);
    let prog = dp.program()?;
    let syn = xdp::test_run(
        prog,
        lbin,
        &tcp_frame(client, vip, CLIENT_SEQ, 0, SYN, b""),
        0,
        true,
    )?;
    ensure!(syn.action == XDP_REDIRECT, "the SYN: action {}", syn.action);
    let out = syn.frame.unwrap_or_default();
    ensure!(out.len() >= 54, "the SYN came out {} bytes long", out.len());
    // Where the SYN went: backend address and port, source port given.
    let backend = SocketAddrV4::new(
        Ipv4Addr::new(out[30], out[31], out[32], out[33]),
        u16::from_be_bytes([out[36], out[37]]),
    );
    let source = SocketAddrV4::new(SOURCE.parse()?, u16::from_be_bytes([out[34], out[35]]));
    let steps = [
        tcp_frame(backend, source, BACKEND_SEQ, CLIENT_SEQ + 1, SYN | ACK, b""),
        tcp_frame(client, vip, CLIENT_SEQ + 1, BACKEND_SEQ + 1, ACK, b""),
        tcp_frame(
            client,
            vip,
            CLIENT_SEQ + 1,
            BACKEND_SEQ + 1,
            ACK | PSH,
            PAYLOAD,
        ),
    ];
    // The backend's SYN-ACK comes in on the backends' side.
    let lbout = xdp::ifindex("lbout")?;
    for (i, frame) in steps.iter().enumerate() {
        let ingress = if i == 0 { lbout } else { lbin };
        let r = xdp::test_run(prog, ingress, frame, 0, false)?;
        ensure!(
            r.action == XDP_REDIRECT,
            "handshake step {i} (proxy {proxy}): action {}",
            r.action
        );
    }
    let next = tcp_frame(
        client,
        vip,
        CLIENT_SEQ + 1 + PAYLOAD.len() as u32,
        BACKEND_SEQ + 1,
        ACK | PSH,
        PAYLOAD,
    );
    Ok((dp, next))
}

/// The two rows: plain full NAT's TCP established flow and the PROXY
/// flow's, `calls` calls of one segment each, `reps` repetitions taking
/// turns.
pub(super) fn proxy_rows(lbin: u32, calls: usize, reps: usize) -> anyhow::Result<Vec<NsRow>> {
    eprintln!("bench: full NAT + PROXY v2, TCP established (BPF_PROG_TEST_RUN)");
    // The SYN-ACK goes back to the client: its neighbour (the generator).
    netns::add_neighbours(&bench_netns(), "lbin", &[(CLIENT, GEN_MAC)])?;
    let mut planes = Vec::new();
    for proxy in [false, true] {
        let (dp, next) = established(proxy, lbin)?;
        planes.push((
            proxy,
            dp,
            std::iter::repeat_n(next, calls).collect::<Vec<_>>(),
        ));
    }
    let mut samples = [Vec::new(), Vec::new()];
    for _ in 0..reps {
        for (p, (_, dp, frames)) in planes.iter_mut().enumerate() {
            samples[p].push(ns_per_packet(
                dp.program()?,
                frames,
                lbin,
                1,
                Some(XDP_REDIRECT),
            )?);
        }
    }
    Ok(planes
        .iter()
        .zip(samples)
        .map(|((proxy, _, _), ns)| NsRow {
            program: NsProgram::LbTcpFullNat { proxy: *proxy },
            method: NsMethod::Calls(calls),
            ns: Stat::of(&ns),
        })
        .collect())
}
