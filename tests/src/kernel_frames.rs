//! The frames the kernel tier's test files share: a client's TCP segments
//! to a VIP and its web server's answers (with the sequence numbers and
//! flags the flow rules check), the SYN-ACK that lets a NAT flow be
//! promoted, an ICMP echo, and where a forwarded frame went.

use crate::kernel_net::{
    BACK_MAC, CLIENT, CLIENT_MAC, FRONT_MAC, Harness, VIP, WEB_MACS, WEB_PORT, WEBS,
};
use etherparse::{PacketBuilder, TcpOptionElement};
use lb_userspace::harness::xdp::XDP_DROP;

pub struct Tcp<'a> {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub ttl: u8,
    pub sport: u16,
    pub dport: u16,
    /// Sequence number: `CLIENT_SEQ` from a client, `WEB_SEQ` from a web.
    pub seq: u32,
    pub syn: bool,
    pub options: &'a [TcpOptionElement],
    pub payload: &'a [u8],
}

impl Tcp<'_> {
    pub fn request(sport: u16, dst: [u8; 4]) -> Tcp<'static> {
        Tcp {
            src_mac: CLIENT_MAC,
            dst_mac: FRONT_MAC,
            src: CLIENT,
            dst,
            ttl: 64,
            sport,
            dport: 80,
            seq: CLIENT_SEQ,
            syn: true,
            options: &[],
            payload: b"",
        }
    }

    pub fn build(&self) -> Vec<u8> {
        let mut b = PacketBuilder::ethernet2(self.src_mac, self.dst_mac)
            .ipv4(self.src, self.dst, self.ttl)
            .tcp(self.sport, self.dport, self.seq, 64240);
        if self.syn {
            b = b.syn();
        } else {
            // A client's acknowledges the web's SYN-ACK.
            b = b.ack(WEB_SEQ.wrapping_add(1));
        }
        let b = b.options(self.options).expect("tcp options");
        let mut out = Vec::new();
        b.write(&mut out, self.payload).expect("build tcp frame");
        out
    }
}

/// The sequence number of every client segment the tests build.
pub const CLIENT_SEQ: u32 = 0x1234_5678;

/// The sequence number of every web server's segment (its SYN-ACK's).
pub const WEB_SEQ: u32 = 0x8765_4320;

/// The web's SYN-ACK to a SYN the program forwarded (`syn_out`, as it left
/// towards the web), translated back to the client: a NAT flow is promoted
/// only by an ACK of a handshake its backend answered.
pub fn answer(h: &mut Harness, syn_out: &[u8]) {
    let back = h.back;
    let (action, _) = h.run(back, &syn_ack_to(syn_out));
    assert_ne!(action, XDP_DROP, "the SYN-ACK was dropped");
}

/// Web server `web`'s segment with `flags` to the client's port `dport`
/// (NAT service www), sequence number `WEB_SEQ`.
pub fn from_web(web: usize, dport: u16, flags: u8) -> Vec<u8> {
    let frame = Tcp {
        src_mac: WEB_MACS[web],
        dst_mac: BACK_MAC,
        src: WEBS[web],
        dst: CLIENT,
        sport: WEB_PORT,
        dport,
        seq: WEB_SEQ,
        syn: false,
        ..Tcp::request(0, VIP)
    }
    .build();
    with_flags(frame, flags)
}

/// The web's SYN-ACK (sequence number `WEB_SEQ`) to the forwarded SYN
/// `syn_out`.
pub fn syn_ack_to(syn_out: &[u8]) -> Vec<u8> {
    let ip = |at: usize| -> [u8; 4] { syn_out[at..at + 4].try_into().expect("address") };
    let port = |at: usize| u16::from_be_bytes([syn_out[at], syn_out[at + 1]]);
    let frame = Tcp {
        src_mac: WEB_MACS[web_of(syn_out)],
        dst_mac: BACK_MAC,
        src: ip(30),
        dst: ip(26),
        sport: port(36),
        dport: port(34),
        seq: WEB_SEQ,
        syn: false,
        ..Tcp::request(0, VIP)
    }
    .build();
    with_flags(frame, SYN_ACK)
}

/// Which web server (index) a forwarded frame was sent to, by destination MAC.
pub fn web_of(frame: &[u8]) -> usize {
    WEB_MACS
        .iter()
        .position(|m| frame[..6] == m[..])
        .unwrap_or_else(|| panic!("not sent to a web server: {:02x?}", &frame[..6]))
}

pub fn icmp_echo(dst: [u8; 4]) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, FRONT_MAC)
        .ipv4(CLIENT, dst, 64)
        .icmpv4_echo_request(1, 1)
        .write(&mut out, b"ping")
        .expect("icmp");
    out
}

/// A SYN (or, `syn: false`, an ACK) from `src` to the VIP:80 `dst`.
pub fn from(src: [u8; 4], sport: u16, dst: [u8; 4], syn: bool) -> Vec<u8> {
    Tcp {
        src,
        syn,
        ..Tcp::request(sport, dst)
    }
    .build()
}

/// `frame` (TCP, no IP options) with its TCP flags replaced. The checksum is
/// left stale: the data plane only ever updates it incrementally.
pub fn with_flags(mut frame: Vec<u8>, flags: u8) -> Vec<u8> {
    frame[14 + 20 + 13] = flags;
    frame
}

pub const FIN_ACK: u8 = 0x11;

pub const SYN_ACK: u8 = 0x12;

pub const RST: u8 = 0x04;

pub const ACK: u8 = 0x10;

/// The "fragmentation needed" the program sends back for `frame` (as it
/// arrived): from the address it was sent to, quoting its first 84 IP bytes.
pub fn frag_needed_for(frame: &[u8], mtu: u16) -> Vec<u8> {
    let field = |at: usize, len: usize| frame[at..at + len].to_vec();
    let mac = |at| <[u8; 6]>::try_from(field(at, 6)).expect("a MAC");
    let addr = |at| <[u8; 4]>::try_from(field(at, 4)).expect("an address");
    // Back where it came from: MACs and addresses swapped.
    let (dst_mac, src_mac, src, dst) = (mac(6), mac(0), addr(30), addr(26));
    let kind = etherparse::Icmpv4Type::DestinationUnreachable(
        etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: mtu },
    );
    // The program's ICMP leaves with DF clear, as Linux's do.
    crate::kernel_net::without_df(crate::kernel_net::icmp_error(
        (src_mac, dst_mac),
        src,
        dst,
        64,
        kind,
        &frame[14..14 + 84],
    ))
}
