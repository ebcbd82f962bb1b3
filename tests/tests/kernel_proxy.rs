//! Kernel tier, PROXY protocol v2 (issue 25): the real `lb` object (with
//! its stages `lb_setup` and `lb_proxy`) run with BPF_PROG_TEST_RUN on a
//! NAT and a full-NAT service with `proxy-protocol = "v2"`, byte for byte:
//! the SYN loses SACK-permitted, the SYN-ACK's MSS drops by 28, the first
//! data segment gets the v2 header in front of its payload (and so does its
//! retransmission), later segments are shifted by 28, the backend's acks
//! are shifted back (inside the header: the client's first byte), FIN both
//! ways; a first segment too big once grown is answered with "fragmentation
//! needed" announcing the MTU less 28; a plain NAT flow is left alone.
//! Where `first` lives: in the flow's established slot (no `PROXY_FLOWS`
//! entry), in `PROXY_FLOWS` only for a flow in the overflow (which shifts
//! all the same), and across a restart with the adopted, pinned table.
//! Every expected frame is built by etherparse (its checksums computed
//! independently) and the inserted header is parsed back with `ppp`.
//!
//! Not testable here: "no headroom" (`DropProxyNoRoom`): BPF_PROG_TEST_RUN
//! always gives the frame XDP's 256 bytes of headroom.
//!
//! Needs root and BPF; without them the tests fail loudly.

use etherparse::{PacketBuilder, TcpOptionElement};
use lb_common::{
    FlowKey, ProxyFlow, Verdict, flow::STATE_ESTABLISHED, ipv6::addr_of, maps6::FlowKey6,
};
use lb_tests::{
    kernel_net::{
        BACK_MAC, Bpffs, CLIENT, CLIENT_MAC, FRONT_MAC, Harness, TestNet, VIP, WEB_MACS, WEB_PORT,
        WEBS, lab_config, service, webs,
    },
    kernel_net6::{CLIENT_V6, dual_stack_net, service6, web6},
};
use lb_userspace::{
    config::{Config, Forwarding, Protocol, ProxyProtocol},
    dataplane::{Dataplane, sweep::now_ticks},
    harness::xdp::{self, XDP_DROP, XDP_REDIRECT, XDP_TX},
};
use ppp::v2::{Addresses, Command, Header};
use std::net::{IpAddr, SocketAddr};

/// The PROXY services' VIPs: NAT and full NAT, TCP 80.
const VIP_NAT: [u8; 4] = [198, 18, 0, 61];
const VIP_FNAT: [u8; 4] = [198, 18, 0, 62];
/// b0's address: the source full-NAT flows leave with by default.
const SOURCE: [u8; 4] = [198, 19, 0, 1];
const CLIENT_SEQ: u32 = 0x1000_0000;
const WEB_SEQ: u32 = 0x2000_0000;
/// The v2 header's length for TCP over IPv4.
const LEN: u32 = 28;
/// The v2 header's length for TCP over IPv6.
const LEN6: u32 = 52;
/// The IPv6 PROXY service's VIP (NAT66, TCP 80), on the dual-stack front.
const VIP_NAT6: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0, 0x18, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x61,
];
const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: vip\r\n\r\n";
const MORE: &[u8] = b"more request bytes";

/// The SYN's options as Linux sends them (MSS, SACK-permitted, timestamps,
/// window scale): 20 bytes.
fn syn_options() -> Vec<TcpOptionElement> {
    vec![
        TcpOptionElement::MaximumSegmentSize(1460),
        TcpOptionElement::SelectiveAcknowledgementPermitted,
        TcpOptionElement::Timestamp(1, 0),
        TcpOptionElement::Noop,
        TcpOptionElement::WindowScale(7),
    ]
}

/// The same with SACK-permitted overwritten by two NOPs.
fn stripped_options() -> Vec<TcpOptionElement> {
    vec![
        TcpOptionElement::MaximumSegmentSize(1460),
        TcpOptionElement::Noop,
        TcpOptionElement::Noop,
        TcpOptionElement::Timestamp(1, 0),
        TcpOptionElement::Noop,
        TcpOptionElement::WindowScale(7),
    ]
}

fn syn_ack_options(mss: u16) -> Vec<TcpOptionElement> {
    vec![
        TcpOptionElement::MaximumSegmentSize(mss),
        TcpOptionElement::Noop,
        TcpOptionElement::Noop,
        TcpOptionElement::Timestamp(2, 1),
        TcpOptionElement::Noop,
        TcpOptionElement::WindowScale(7),
    ]
}

/// The kernel tier's config (its NAT "www" at VIP:80 has no PROXY) plus a
/// NAT and a full-NAT PROXY v2 service over web1..3.
fn config() -> Config {
    let mut cfg = lab_config();
    for (name, vip, forwarding) in [
        ("pp-nat", VIP_NAT, Forwarding::Nat),
        ("pp-fnat", VIP_FNAT, Forwarding::FullNat),
    ] {
        let mut svc = service(name, vip, 80, Protocol::Tcp, forwarding, webs(WEB_PORT));
        svc.proxy_protocol = Some(ProxyProtocol::V2);
        cfg.services.push(svc);
    }
    cfg
}

/// The kernel tier's config plus a NAT66 PROXY v2 service over web1..3's
/// IPv6 addresses (built here, as the agent gets it from a config file).
fn config6() -> Config {
    let mut cfg = lab_config();
    let mut svc = service6(
        "pp-nat6",
        VIP_NAT6,
        80,
        Protocol::Tcp,
        Forwarding::Nat,
        WEB_PORT,
    );
    svc.proxy_protocol = Some(ProxyProtocol::V2);
    cfg.services.push(svc);
    cfg
}

/// A TCP segment over IPv4 or IPv6 (by its addresses), every checksum
/// computed by etherparse.
#[derive(Clone)]
struct Seg {
    macs: ([u8; 6], [u8; 6]),
    src: (IpAddr, u16),
    dst: (IpAddr, u16),
    ttl: u8,
    seq: u32,
    ack: Option<u32>,
    syn: bool,
    fin: bool,
    dont_fragment: bool,
    options: Vec<TcpOptionElement>,
    payload: Vec<u8>,
}

impl Seg {
    fn build(&self) -> Vec<u8> {
        let ip = match (self.src.0, self.dst.0) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                let mut ip = etherparse::Ipv4Header::new(
                    0,
                    self.ttl,
                    etherparse::IpNumber::TCP,
                    src.octets(),
                    dst.octets(),
                )
                .expect("ipv4 header");
                ip.dont_fragment = self.dont_fragment;
                etherparse::IpHeaders::Ipv4(ip, Default::default())
            }
            (IpAddr::V6(src), IpAddr::V6(dst)) => etherparse::IpHeaders::Ipv6(
                etherparse::Ipv6Header {
                    payload_length: 0,
                    next_header: etherparse::IpNumber::TCP,
                    hop_limit: self.ttl,
                    source: src.octets(),
                    destination: dst.octets(),
                    ..Default::default()
                },
                Default::default(),
            ),
            _ => panic!("one family per segment"),
        };
        let mut b = PacketBuilder::ethernet2(self.macs.0, self.macs.1)
            .ip(ip)
            .tcp(self.src.1, self.dst.1, self.seq, 64240);
        if self.syn {
            b = b.syn();
        }
        if let Some(ack) = self.ack {
            b = b.ack(ack);
        }
        if self.fin {
            b = b.fin();
        }
        let b = b.options(&self.options).expect("options fit");
        let mut out = Vec::new();
        b.write(&mut out, &self.payload).expect("tcp frame");
        out
    }
}

/// One PROXY flow under test: its VIP (its family the flow's), client
/// port, and where the LB sends it (web, source address and port as the
/// web sees them).
struct Flow {
    vip: IpAddr,
    port: u16,
    web: usize,
    from: (IpAddr, u16),
}

impl Flow {
    fn v6(&self) -> bool {
        self.vip.is_ipv6()
    }

    /// The client's address in the flow's family.
    fn client_addr(&self) -> IpAddr {
        if self.v6() {
            CLIENT_V6.into()
        } else {
            CLIENT.into()
        }
    }

    /// Web `i`'s address in the flow's family.
    fn web_addr(&self, i: usize) -> IpAddr {
        if self.v6() {
            web6(i).into()
        } else {
            WEBS[i].into()
        }
    }

    /// The header's length: 28 over IPv4, 52 over IPv6.
    fn len(&self) -> u32 {
        if self.v6() { LEN6 } else { LEN }
    }

    /// Where the TCP payload starts in a frame without options.
    fn payload_at(&self) -> usize {
        if self.v6() {
            14 + 40 + 20
        } else {
            14 + 20 + 20
        }
    }

    /// A client segment to the VIP.
    fn client(&self, seq: u32, ack: Option<u32>, payload: &[u8]) -> Seg {
        Seg {
            macs: (CLIENT_MAC, FRONT_MAC),
            src: (self.client_addr(), self.port),
            dst: (self.vip, 80),
            ttl: 64,
            seq,
            ack,
            syn: false,
            fin: false,
            dont_fragment: true,
            options: Vec::new(),
            payload: payload.to_vec(),
        }
    }

    /// `seg` as the web must receive it (NAT or full NAT applied).
    fn to_web(&self, seg: &Seg) -> Vec<u8> {
        Seg {
            macs: (BACK_MAC, WEB_MACS[self.web]),
            src: self.from,
            dst: (self.web_addr(self.web), WEB_PORT),
            ttl: 63,
            ..seg.clone()
        }
        .build()
    }

    /// A web segment to the flow's source.
    fn web(&self, seq: u32, ack: u32, payload: &[u8]) -> Seg {
        Seg {
            macs: (WEB_MACS[self.web], BACK_MAC),
            src: (self.web_addr(self.web), WEB_PORT),
            dst: self.from,
            ttl: 64,
            seq,
            ack: Some(ack),
            syn: false,
            fin: false,
            dont_fragment: true,
            options: Vec::new(),
            payload: payload.to_vec(),
        }
    }

    /// `seg` as the client must receive it (from the VIP).
    fn to_client(&self, seg: &Seg) -> Vec<u8> {
        Seg {
            macs: (FRONT_MAC, CLIENT_MAC),
            src: (self.vip, 80),
            dst: (self.client_addr(), self.port),
            ttl: 63,
            ..seg.clone()
        }
        .build()
    }

    /// The header the web must read first: the client and the VIP (TCP
    /// over IPv4 or over IPv6), as `lb_common::proxy` builds it and as
    /// `ppp` (an independent implementation) reads it back.
    fn header(&self) -> Vec<u8> {
        let h = match (self.client_addr(), self.vip) {
            (IpAddr::V4(c), IpAddr::V4(v)) => lb_common::proxy::header_v4(
                u32::from_ne_bytes(c.octets()),
                self.port.to_be(),
                u32::from_ne_bytes(v.octets()),
                80u16.to_be(),
            )
            .to_vec(),
            (IpAddr::V6(c), IpAddr::V6(v)) => lb_common::proxy::header_v6(
                &c.octets(),
                self.port.to_be(),
                &v.octets(),
                80u16.to_be(),
            )
            .to_vec(),
            _ => panic!("one family per flow"),
        };
        assert_eq!(h.len(), self.len() as usize);
        let parsed = Header::try_from(&h[..]).expect("ppp parses the header");
        assert_eq!(parsed.command, Command::Proxy);
        assert_eq!(parsed.protocol, ppp::v2::Protocol::Stream, "TCP");
        let (source, destination): (SocketAddr, SocketAddr) = match parsed.addresses {
            Addresses::IPv4(a) => (
                (a.source_address, a.source_port).into(),
                (a.destination_address, a.destination_port).into(),
            ),
            Addresses::IPv6(a) => (
                (a.source_address, a.source_port).into(),
                (a.destination_address, a.destination_port).into(),
            ),
            other => panic!("not TCP over IP: {other:?}"),
        };
        assert_eq!(
            (source, destination),
            (
                SocketAddr::new(self.client_addr(), self.port),
                SocketAddr::new(self.vip, 80)
            ),
            "the header's family and addresses are the flow's"
        );
        h
    }
}

/// Where a frame sent to a web went: (web index, source address, port).
fn sent(frame: &[u8]) -> (usize, IpAddr, u16) {
    let web = WEB_MACS
        .iter()
        .position(|m| frame[..6] == m[..])
        .unwrap_or_else(|| panic!("not sent to a web: {:02x?}", &frame[..6]));
    if frame[12..14] == [0x86, 0xdd] {
        let source: [u8; 16] = frame[22..38].try_into().expect("address");
        return (
            web,
            source.into(),
            u16::from_be_bytes([frame[54], frame[55]]),
        );
    }
    let source: [u8; 4] = frame[26..30].try_into().expect("address");
    (
        web,
        source.into(),
        u16::from_be_bytes([frame[34], frame[35]]),
    )
}

/// The handshake through the LB, byte for byte: the SYN arrives at the web
/// without SACK-permitted, the web's SYN-ACK reaches the client with its
/// MSS less the header's length (28, IPv6: 52), the client's ACK passes
/// unchanged (no data: no header).
fn handshake(h: &mut Harness, vip: impl Into<IpAddr>, port: u16, full_nat: bool) -> Flow {
    let mut flow = Flow {
        vip: vip.into(),
        port,
        web: 0,
        from: (CLIENT.into(), port),
    };
    flow.from.0 = flow.client_addr();
    let syn = Seg {
        syn: true,
        options: syn_options(),
        ..flow.client(CLIENT_SEQ, None, b"")
    };
    let out = h.expect_case(
        "SYN",
        h.front,
        &syn.build(),
        XDP_REDIRECT,
        Verdict::Forwarded,
    );
    let (web, source, sport) = sent(&out);
    flow.web = web;
    if full_nat {
        assert_eq!(
            source,
            IpAddr::from(SOURCE),
            "full NAT: the LB's source address"
        );
        flow.from = (source, sport);
    }
    let want = Seg {
        options: stripped_options(),
        ..syn.clone()
    };
    assert_eq!(out, flow.to_web(&want), "the SYN without SACK-permitted");

    let syn_ack = Seg {
        syn: true,
        options: syn_ack_options(1460),
        ..flow.web(WEB_SEQ, CLIENT_SEQ + 1, b"")
    };
    let back = h.expect_case(
        "SYN-ACK",
        h.back,
        &syn_ack.build(),
        XDP_REDIRECT,
        Verdict::ForwardedReply,
    );
    let want = Seg {
        options: syn_ack_options(1460 - flow.len() as u16),
        ..syn_ack
    };
    assert_eq!(
        back,
        flow.to_client(&want),
        "the SYN-ACK, its MSS less the header"
    );

    let ack = flow.client(CLIENT_SEQ + 1, Some(WEB_SEQ + 1), b"");
    let out = h.expect_case(
        "ACK",
        h.front,
        &ack.build(),
        XDP_REDIRECT,
        Verdict::Forwarded,
    );
    assert_eq!(out, flow.to_web(&ack), "the handshake's ACK, unchanged");
    flow
}

/// The whole flow after the handshake: header on the first segment and its
/// retransmission, later segments and every ack shifted, FIN both ways.
fn data_both_ways(h: &mut Harness, flow: &Flow) {
    let len = flow.len();
    let header = flow.header();
    let first = flow.client(CLIENT_SEQ + 1, Some(WEB_SEQ + 1), REQUEST);
    let with_header = Seg {
        payload: [header.as_slice(), REQUEST].concat(),
        ..first.clone()
    };
    let out = h.expect_case(
        "first data",
        h.front,
        &first.build(),
        XDP_REDIRECT,
        Verdict::Forwarded,
    );
    assert_eq!(
        out,
        flow.to_web(&with_header),
        "the first data segment: the header, then the client's bytes"
    );
    let at = flow.payload_at();
    assert_eq!(&out[at..at + len as usize], header.as_slice());
    // The web acknowledges part of the header only: the client is shown
    // its own first byte, nothing of its data acknowledged.
    let partial = flow.web(WEB_SEQ + 1, CLIENT_SEQ + 1 + 10, b"");
    let back = h.expect_case(
        "ack inside the header",
        h.back,
        &partial.build(),
        XDP_REDIRECT,
        Verdict::ForwardedReply,
    );
    let shown = Seg {
        ack: Some(CLIENT_SEQ + 1),
        ..partial
    };
    assert_eq!(back, flow.to_client(&shown), "an ack inside the header");
    // The retransmission of the first segment carries the header again.
    let out = h.expect_case(
        "retransmission",
        h.front,
        &first.build(),
        XDP_REDIRECT,
        Verdict::Forwarded,
    );
    assert_eq!(out, flow.to_web(&with_header), "the retransmission");

    // The web acknowledges header and request and answers.
    let req_end = CLIENT_SEQ + 1 + REQUEST.len() as u32;
    let answer = flow.web(WEB_SEQ + 1, req_end + len, b"HTTP/1.1 200 OK\r\n\r\nhello");
    let back = h.expect_case(
        "web data",
        h.back,
        &answer.build(),
        XDP_REDIRECT,
        Verdict::ForwardedReply,
    );
    let shown = Seg {
        ack: Some(req_end),
        ..answer.clone()
    };
    assert_eq!(
        back,
        flow.to_client(&shown),
        "the web's data, its ack less the header"
    );

    // A later client segment: seq + 28.
    let answered = WEB_SEQ + 1 + answer.payload.len() as u32;
    let more = flow.client(req_end, Some(answered), MORE);
    let out = h.expect_case(
        "later data",
        h.front,
        &more.build(),
        XDP_REDIRECT,
        Verdict::Forwarded,
    );
    let shifted = Seg {
        seq: req_end + len,
        ..more.clone()
    };
    assert_eq!(
        out,
        flow.to_web(&shifted),
        "a later segment, seq + the header"
    );

    // FIN both ways.
    let more_end = req_end + MORE.len() as u32;
    let fin = Seg {
        fin: true,
        ..flow.client(more_end, Some(answered), b"")
    };
    let out = h.expect_case(
        "client FIN",
        h.front,
        &fin.build(),
        XDP_REDIRECT,
        Verdict::Forwarded,
    );
    let shifted = Seg {
        seq: more_end + len,
        ..fin.clone()
    };
    assert_eq!(
        out,
        flow.to_web(&shifted),
        "the client's FIN, seq + the header"
    );
    let web_fin = Seg {
        fin: true,
        ..flow.web(answered, more_end + 1 + len, b"")
    };
    let back = h.expect_case(
        "web FIN",
        h.back,
        &web_fin.build(),
        XDP_REDIRECT,
        Verdict::ForwardedReply,
    );
    let shown = Seg {
        ack: Some(more_end + 1),
        ..web_fin
    };
    assert_eq!(
        back,
        flow.to_client(&shown),
        "the web's FIN, ack less the header"
    );
}

#[test]
fn a_nat_proxy_flow_gets_the_header_and_its_numbers_shifted_both_ways() {
    let net = TestNet::new();
    net.run(|| {
        let mut h = Harness::new(&config());
        let flow = handshake(&mut h, VIP_NAT, 41000, false);
        data_both_ways(&mut h, &flow);
    });
}

#[test]
fn a_full_nat_proxy_flow_gets_the_header_and_its_numbers_shifted_both_ways() {
    let net = TestNet::new();
    net.run(|| {
        let mut h = Harness::new(&config());
        let flow = handshake(&mut h, VIP_FNAT, 41001, true);
        data_both_ways(&mut h, &flow);
    });
}

#[test]
fn a_first_segment_too_big_for_the_header_is_answered_with_the_mtu_less_28() {
    let net = TestNet::new();
    net.run(|| {
        let mut h = Harness::new(&config());
        let flow = handshake(&mut h, VIP_NAT, 41002, false);
        let out = too_big_first_segment(&mut h, &flow);
        // ICMP destination unreachable, fragmentation needed, back to the
        // client, announcing 1500 - 28.
        assert_eq!(&out[30..34], &CLIENT, "to the client");
        assert_eq!((out[34], out[35]), (3, 4), "fragmentation needed");
        assert_eq!(u16::from_be_bytes([out[40], out[41]]), 1500 - 28);
        a_segment_that_fits_gets_the_header(&mut h, &flow);
    });
}

/// A first segment of 1500 bytes of IP (fits the link, not with the
/// header): the LB's answer to it (XDP_TX, `frag_needed`).
fn too_big_first_segment(h: &mut Harness, flow: &Flow) -> Vec<u8> {
    let big = vec![b'x'; 1500 - (flow.payload_at() - 14)];
    let first = flow.client(CLIENT_SEQ + 1, Some(WEB_SEQ + 1), &big);
    h.expect_case(
        "too big",
        h.front,
        &first.build(),
        XDP_TX,
        Verdict::FragNeeded,
    )
}

/// After a too-big answer (or a dropped segment): the first segment that
/// fits gets the header.
fn a_segment_that_fits_gets_the_header(h: &mut Harness, flow: &Flow) {
    let fits = flow.client(CLIENT_SEQ + 1, Some(WEB_SEQ + 1), REQUEST);
    let out = h.expect_case(
        "fits",
        h.front,
        &fits.build(),
        XDP_REDIRECT,
        Verdict::Forwarded,
    );
    let with_header = Seg {
        payload: [flow.header().as_slice(), REQUEST].concat(),
        ..fits
    };
    assert_eq!(out, flow.to_web(&with_header));
}

#[test]
fn a_flow_without_proxy_protocol_is_left_alone() {
    let net = TestNet::new();
    net.run(|| {
        let mut h = Harness::new(&config());
        let mut flow = Flow {
            vip: VIP.into(),
            port: 41003,
            web: 0,
            from: (CLIENT.into(), 41003),
        };
        let syn = Seg {
            syn: true,
            options: syn_options(),
            ..flow.client(CLIENT_SEQ, None, b"")
        };
        let out = h.expect(h.front, &syn.build(), XDP_REDIRECT, Verdict::Forwarded);
        flow.web = sent(&out).0;
        assert_eq!(out, flow.to_web(&syn), "SACK-permitted kept");
        let syn_ack = Seg {
            syn: true,
            options: syn_ack_options(1460),
            ..flow.web(WEB_SEQ, CLIENT_SEQ + 1, b"")
        };
        let back = h.expect(
            h.back,
            &syn_ack.build(),
            XDP_REDIRECT,
            Verdict::ForwardedReply,
        );
        assert_eq!(back, flow.to_client(&syn_ack), "MSS kept");
        let ack = flow.client(CLIENT_SEQ + 1, Some(WEB_SEQ + 1), b"");
        h.expect(h.front, &ack.build(), XDP_REDIRECT, Verdict::Forwarded);
        let first = flow.client(CLIENT_SEQ + 1, Some(WEB_SEQ + 1), REQUEST);
        let out = h.expect(h.front, &first.build(), XDP_REDIRECT, Verdict::Forwarded);
        assert_eq!(out, flow.to_web(&first), "no header");
        let answer = flow.web(WEB_SEQ + 1, CLIENT_SEQ + 1 + REQUEST.len() as u32, b"ok");
        let back = h.expect(
            h.back,
            &answer.build(),
            XDP_REDIRECT,
            Verdict::ForwardedReply,
        );
        assert_eq!(back, flow.to_client(&answer), "ack unchanged");
    });
}

/// The flow's forward key (client → VIP:80, TCP).
fn forward_key(vip: [u8; 4], port: u16) -> FlowKey {
    FlowKey {
        saddr: u32::from_ne_bytes(CLIENT),
        daddr: u32::from_ne_bytes(vip),
        sport: port.to_be(),
        dport: 80u16.to_be(),
        protocol: 6,
        ..FlowKey::default()
    }
}

/// `PROXY_FLOWS`' entry for the flow whose forward key is `key`.
fn proxy_flows_entry(h: &mut Harness, key: &FlowKey) -> Option<ProxyFlow> {
    let map = h.dp.ebpf().map("PROXY_FLOWS").expect("PROXY_FLOWS");
    let flows: aya::maps::HashMap<_, FlowKey, ProxyFlow> =
        aya::maps::HashMap::try_from(map).expect("a hash map");
    flows.get(key, 0).ok()
}

/// A PROXY flow's `first` lives in its established slot: the handshake's
/// promotion writes it there (the client's ISN + 1) and `PROXY_FLOWS` gets
/// nothing. A PROXY flow whose bucket's two ways hold live flows goes to
/// the overflow (`CONNTRACK`, no slot): its `first` is kept in
/// `PROXY_FLOWS` instead, and it gets the header and its shifts both ways
/// as one in a slot does.
#[test]
fn a_proxy_flows_first_is_in_its_slot_and_in_proxy_flows_only_in_the_overflow() {
    let net = TestNet::new();
    net.run(|| {
        let mut h = Harness::new(&config());
        let flow = handshake(&mut h, VIP_NAT, 41004, false);
        let key = forward_key(VIP_NAT, 41004);
        let table = h.dp.established_table().expect("ESTABLISHED");
        let conf = h.dp.flow_conf().expect("FLOW_CONF");
        let slot = table
            .occupied()
            .into_iter()
            .find(|s| s.key == key)
            .expect("the flow has a slot");
        assert_eq!(slot.proxy_first, CLIENT_SEQ + 1, "first, in the slot");
        assert_eq!(
            proxy_flows_entry(&mut h, &key),
            None,
            "nothing in PROXY_FLOWS"
        );
        data_both_ways(&mut h, &flow);

        // Fill the bucket of the client's next port with two live flows
        // (same client address and port, other VIPs: the same bucket).
        let next = 41005;
        let now = now_ticks();
        for vip in [[198, 18, 0, 98], [198, 18, 0, 99]] {
            let live = lb_common::Flow {
                backend_id: 1,
                state: STATE_ESTABLISHED,
                seen: now,
                ..lb_common::Flow::default()
            };
            let filler = forward_key(vip, next);
            assert!(
                table
                    .insert_established(&filler, &live, None, &conf, now)
                    .is_ok(),
                "{filler:?}"
            );
        }
        let flow = handshake(&mut h, VIP_NAT, next, false);
        let key = forward_key(VIP_NAT, next);
        assert!(table.get(&key, &conf).is_none(), "no way was free");
        let overflow = h.dp.ebpf().map("CONNTRACK").expect("CONNTRACK");
        let overflow: aya::maps::HashMap<_, FlowKey, lb_common::Flow> =
            aya::maps::HashMap::try_from(overflow).expect("a hash map");
        assert!(overflow.get(&key, 0).is_ok(), "the flow is in the overflow");
        assert_eq!(
            proxy_flows_entry(&mut h, &key),
            Some(ProxyFlow {
                first: CLIENT_SEQ + 1,
                _pad: 0
            }),
            "first, in PROXY_FLOWS"
        );
        data_both_ways(&mut h, &flow);
    });
}

/// A PROXY flow established before an agent restart goes on after it: its
/// `first` is in its established slot, pinned with the table, which the
/// restarted data plane adopts; the header and every shift come out as
/// before the restart.
#[test]
fn a_proxy_flow_keeps_its_header_and_shifts_across_a_restart() {
    let net = TestNet::new();
    let fs = Bpffs::new();
    let pins = fs.dir.join("lb");
    net.run(|| {
        let cfg = config();
        let harness = |dp: Dataplane| Harness {
            dp,
            front: xdp::ifindex("f0").expect("f0"),
            back: xdp::ifindex("b0").expect("b0"),
        };
        let (mut dp, adopted) = Dataplane::load_pinned(65536, &pins).expect("load pinned");
        assert!(!adopted);
        dp.apply(&cfg).expect("apply");
        let mut before = harness(dp);
        let flow = handshake(&mut before, VIP_NAT, 41006, false);
        drop(before);

        let (mut dp, adopted) = Dataplane::load_pinned(65536, &pins).expect("adopt");
        assert!(adopted, "the pinned data plane is adopted");
        dp.apply(&cfg).expect("re-apply");
        let mut after = harness(dp);
        data_both_ways(&mut after, &flow);
        drop(after);
        Dataplane::teardown(&pins).expect("teardown");
    });
}

/// Prints the verifier's instruction counts of the programs a PROXY flow
/// takes (run with `--nocapture`): `lb`, `lb_setup`, `lb_proxy`, `lb_v6`,
/// `lb_v6_setup`, `lb_proxy6`.
#[test]
fn the_verifier_reports_each_programs_instruction_count() {
    let net = TestNet::new();
    net.run(|| {
        Harness::new(&config()).print_verified_counts(&[
            "lb",
            "lb_setup",
            "lb_proxy",
            "lb_v6",
            "lb_v6_setup",
            "lb_proxy6",
        ]);
    });
}

// ---- IPv6 (NAT66): the same rules with the 52-byte TCP-over-IPv6 header ----

/// NAT66 PROXY, byte for byte: SYN without SACK-permitted, SYN-ACK's MSS
/// less 52, the first data segment (and its retransmission) with the IPv6
/// header in front of its payload (the payload length and the checksum
/// over the IPv6 pseudo-header grown: etherparse's), later segments + 52,
/// the web's acks - 52 (inside the header: the client's first byte), FIN
/// both ways.
#[test]
fn a_nat66_proxy_flow_gets_the_ipv6_header_and_its_numbers_shifted_both_ways() {
    let net = dual_stack_net();
    net.run(|| {
        let mut h = Harness::new(&config6());
        let flow = handshake(&mut h, VIP_NAT6, 42000, false);
        data_both_ways(&mut h, &flow);
    });
}

/// `PROXY_FLOWS6`' entry for the IPv6 flow client:`port` → VIP_NAT6:80.
fn proxy_flows6_entry(h: &mut Harness, port: u16) -> Option<ProxyFlow> {
    let key = FlowKey6 {
        saddr: addr_of(CLIENT_V6),
        daddr: addr_of(VIP_NAT6),
        sport: port.to_be(),
        dport: 80u16.to_be(),
        protocol: 6,
        ..FlowKey6::default()
    };
    let map = h.dp.ebpf().map("PROXY_FLOWS6").expect("PROXY_FLOWS6");
    let flows: aya::maps::HashMap<_, FlowKey6, ProxyFlow> =
        aya::maps::HashMap::try_from(map).expect("a hash map");
    flows.get(&key, 0).ok()
}

/// An IPv6 PROXY flow's `first` (the client's ISN + 1) is in
/// `PROXY_FLOWS6` from its SYN on, and goes with the flow: once both
/// FINs closed it and it expired, its next packet removes it.
#[test]
fn an_ipv6_proxy_flows_first_is_in_proxy_flows6_while_the_flow_lives() {
    let net = dual_stack_net();
    net.run(|| {
        let mut h = Harness::new(&config6());
        let flow = handshake(&mut h, VIP_NAT6, 42001, false);
        assert_eq!(
            proxy_flows6_entry(&mut h, 42001),
            Some(ProxyFlow {
                first: CLIENT_SEQ + 1,
                _pad: 0
            }),
            "first, in PROXY_FLOWS6"
        );
        data_both_ways(&mut h, &flow);
        assert!(
            proxy_flows6_entry(&mut h, 42001).is_some(),
            "kept while the flow is in the table"
        );
    });
}

/// An established IPv6 PROXY flow's segment with an extension header (a
/// destination-options header before TCP) cannot be rewritten at the
/// fixed offset: dropped and counted (`drop_proxy_ext_headers`), never
/// forwarded unshifted; the same segment without it gets the header.
#[test]
fn an_ipv6_proxy_flows_segment_with_extension_headers_is_dropped() {
    let net = dual_stack_net();
    net.run(|| {
        let mut h = Harness::new(&config6());
        let flow = handshake(&mut h, VIP_NAT6, 42002, false);
        let plain = flow
            .client(CLIENT_SEQ + 1, Some(WEB_SEQ + 1), REQUEST)
            .build();
        // The same segment behind an 8-byte destination-options header
        // (PadN): next header 60, then TCP.
        let mut with_ext = plain[..54].to_vec();
        with_ext[20] = 60;
        let payload_len = u16::from_be_bytes([plain[18], plain[19]]) + 8;
        with_ext[18..20].copy_from_slice(&payload_len.to_be_bytes());
        with_ext.extend([6, 0, 1, 4, 0, 0, 0, 0]);
        with_ext.extend_from_slice(&plain[54..]);
        h.expect_case(
            "with a destination-options header",
            h.front,
            &with_ext,
            XDP_DROP,
            Verdict::DropProxyExtHeaders,
        );
        a_segment_that_fits_gets_the_header(&mut h, &flow);
    });
}

/// IPv6: a first segment that fits the link (1500) but not with the 52-byte
/// header is answered with ICMPv6 "packet too big" announcing 1500 - 52
/// (from `lb_proxy6`, by `lb_v6_portless`), back to the client; a segment
/// that fits then gets the header.
#[test]
fn a_first_ipv6_segment_too_big_for_the_header_is_answered_with_the_mtu_less_52() {
    let net = dual_stack_net();
    net.run(|| {
        let mut h = Harness::new(&config6());
        let flow = handshake(&mut h, VIP_NAT6, 42003, false);
        let out = too_big_first_segment(&mut h, &flow);
        assert_eq!(&out[14 + 24..14 + 40], &CLIENT_V6, "to the client");
        assert_eq!((out[54], out[55]), (2, 0), "packet too big");
        assert_eq!(
            u32::from_be_bytes([out[58], out[59], out[60], out[61]]),
            1500 - LEN6
        );
        a_segment_that_fits_gets_the_header(&mut h, &flow);
    });
}
