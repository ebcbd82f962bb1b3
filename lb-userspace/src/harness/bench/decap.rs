//! `lb decap`'s cost per packet (issue 26), next to `xdp_pass` measured the
//! same way: the benchmark's 64-byte UDP frame wrapped in IPIP and in GUE
//! from an allowed LB (decapsulated), and the frame itself (not a tunnel:
//! what the decapsulator costs the backend's ordinary traffic).

use std::net::Ipv4Addr;

use lb_common::{
    checksum,
    decap::{GUE_DEFAULT_PORT, IPPROTO_IPIP},
    headers::{EthHdr, IPPROTO_UDP},
};

use super::{
    measure::{DecapPacket, NsMethod, NsProgram, NsRow, Stat, ns_per_packet},
    net::{CLIENT, frame_from},
};
use crate::{decap::Decapsulator, harness::xdp::XDP_PASS};

/// The tunnels' outer source (the one allowed LB) and destination.
const LB: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const BACKEND: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 11);

/// `frame` (Ethernet + IPv4) with its IP packet wrapped as the LB sends it:
/// an outer IPv4 header (DF, checksum), for GUE also UDP (checksum 0) and
/// the GUE header.
fn tunnelled(frame: &[u8], gue: bool) -> Vec<u8> {
    let (eth, ip) = frame.split_at(EthHdr::LEN);
    let inner = &ip[..usize::from(u16::from_be_bytes([ip[2], ip[3]]))];
    let mut payload = Vec::new();
    if gue {
        let udp_len = (8 + 4 + inner.len()) as u16;
        payload.extend_from_slice(&50000u16.to_be_bytes());
        payload.extend_from_slice(&GUE_DEFAULT_PORT.to_be_bytes());
        payload.extend_from_slice(&udp_len.to_be_bytes());
        payload.extend_from_slice(&[0, 0, 0, IPPROTO_IPIP, 0, 0]);
    }
    payload.extend_from_slice(inner);
    let tot_len = (20 + payload.len()) as u16;
    let protocol = if gue { IPPROTO_UDP } else { IPPROTO_IPIP };
    let mut outer = vec![0x45, 0];
    outer.extend_from_slice(&tot_len.to_be_bytes());
    outer.extend_from_slice(&[0, 0, 0x40, 0, 64, protocol, 0, 0]);
    outer.extend_from_slice(&LB.octets());
    outer.extend_from_slice(&BACKEND.octets());
    let check = checksum::compute(&outer, 0);
    outer[10..12].copy_from_slice(&check.to_ne_bytes());
    let mut out = eth.to_vec();
    out.extend_from_slice(&outer);
    out.extend_from_slice(&payload);
    out
}

/// ns/packet of the `lb_decap` program, `calls` calls of one frame each
/// (repeat=1: a repeated run would see the frame it already decapsulated).
pub(super) fn decap_rows(lbin: u32, calls: usize, reps: usize) -> anyhow::Result<Vec<NsRow>> {
    let mut decap = Decapsulator::load()?;
    decap.maps.replace(&[LB], GUE_DEFAULT_PORT)?;
    let plain = frame_from(std::net::SocketAddrV4::new(CLIENT, 1024))?;
    let mut rows = Vec::new();
    for (packet, frame) in [
        (DecapPacket::Ipip, tunnelled(&plain, false)),
        (DecapPacket::Gue, tunnelled(&plain, true)),
        (DecapPacket::NotTunnel, plain.clone()),
    ] {
        let frames: Vec<Vec<u8>> = std::iter::repeat_n(frame, calls).collect();
        let prog = decap.program()?;
        let mut ns = Vec::new();
        for _ in 0..reps {
            ns.push(ns_per_packet(prog, &frames, lbin, 1, Some(XDP_PASS))?);
        }
        rows.push(NsRow {
            program: NsProgram::Decap(packet),
            method: NsMethod::Calls(calls),
            ns: Stat::of(&ns),
        });
    }
    // Each frame was counted as what it is: the rows measured decapsulation.
    let counts = decap.maps.verdicts()?;
    for (verdict, want) in [("decap_ipip", 1), ("decap_gue", 1), ("not_tunnel", 1)] {
        let n = counts
            .iter()
            .find(|(v, _)| v.name() == verdict)
            .map_or(0, |(_, n)| *n);
        anyhow::ensure!(
            n >= want as u64 * (calls * reps) as u64,
            "lb decap counted {n} {verdict}, fewer than the frames measured"
        );
    }
    Ok(rows)
}
