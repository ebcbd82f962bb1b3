//! Kernel tier (issue 22): the packet path's stages hand what they found
//! back to the path, so every packet of a flow passes the same admission
//! (`path::admit`): a client's ICMP error about a flow pinned to a disabled
//! backend is dropped like the flow's own packets, and one about a flow of
//! a serving backend is still translated and delivered. Also reports the
//! verifier's instruction count of the `lb` program.
//!
//! The real `lb` object under BPF_PROG_TEST_RUN in the kernel tier's
//! namespace (tests/src/kernel_net.rs). Needs root and BPF; without them
//! the tests fail loudly.

use etherparse::{Icmpv4Type, icmpv4::DestUnreachableHeader};
use lb_common::Verdict;
use lb_tests::kernel_net::{
    BACK_MAC, CLIENT, CLIENT_MAC, FRONT_MAC, Harness, TestNet, VIP, WEB_MACS, WEB_UDP_PORT, WEBS,
    icmp_error, lab_config, udp,
};
use lb_userspace::{
    config::{Backend, Service},
    dataplane::Admission,
    harness::xdp::{XDP_DROP, XDP_REDIRECT},
};

/// The lab's UDP NAT service: VIP:5353 → webs:5300.
const UDP_PORT: u16 = 5353;

/// A UDP request client:`sport` → VIP:5353 with a 4-byte payload.
fn request(sport: u16) -> Vec<u8> {
    udp(
        CLIENT_MAC,
        FRONT_MAC,
        CLIENT,
        VIP,
        64,
        sport,
        UDP_PORT,
        &[1, 2, 3, 4],
    )
}

/// The client's "port unreachable" about the VIP's answer to its `sport`
/// (what the client saw: VIP:5353 → client:`sport`).
fn unreachable(sport: u16) -> Vec<u8> {
    let answer = udp(
        FRONT_MAC, CLIENT_MAC, VIP, CLIENT, 63, UDP_PORT, sport, &[9; 10],
    );
    icmp_error(
        (CLIENT_MAC, FRONT_MAC),
        CLIENT,
        VIP,
        64,
        Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port),
        &answer[14..],
    )
}

/// Which web a frame the program sent out of the back interface goes to.
fn web_of(frame: &[u8]) -> usize {
    WEB_MACS
        .iter()
        .position(|m| frame[..6] == m[..])
        .unwrap_or_else(|| panic!("not to a web: {:02x?}", &frame[..6]))
}

/// Issue 22: the ICMP translator skipped the drop-flows check, so a
/// client's error still reached a backend that was disabled with its flows
/// dropped. Now it passes the same admission as the flow's packets:
/// dropped (`DropBackendGone`) and its flow removed, while an error about a
/// flow of a serving backend is still translated and sent to it.
#[test]
fn an_icmp_error_about_a_disabled_backends_flow_is_dropped() {
    let net = TestNet::new();
    net.run(|| {
        let cfg = lab_config();
        let mut h = Harness::new(&cfg);
        // Two UDP NAT flows, on two different webs (round robin).
        let out = h.expect(h.front, &request(5000), XDP_REDIRECT, Verdict::Forwarded);
        let gone = web_of(&out);
        let out = h.expect(h.front, &request(5001), XDP_REDIRECT, Verdict::Forwarded);
        let serving = web_of(&out);
        assert_ne!(gone, serving, "round robin spreads the two flows");

        // The first flow's web is disabled with "drop flows".
        let disabled = format!("web{}", gone + 1);
        let admit = |_: &Service, b: &Backend| {
            if b.name == disabled {
                Admission {
                    in_rotation: false,
                    drop_flows: true,
                }
            } else {
                Admission::SERVING
            }
        };
        h.dp.apply_with(&cfg, &admit).expect("apply");

        // An error about the serving web's flow reaches that web,
        // translated: the outer destination and the quoted source are the
        // web's (`kernel_frag.rs` checks every byte of this translation).
        let out = h.expect(
            h.front,
            &unreachable(5001),
            XDP_REDIRECT,
            Verdict::ForwardedIcmp,
        );
        assert_eq!(web_of(&out), serving);
        assert_eq!(&out[6..12], &BACK_MAC[..]);
        assert_eq!(&out[30..34], &WEBS[serving][..], "outer destination");
        assert_eq!(&out[54..58], &WEBS[serving][..], "quoted source");
        assert_eq!(
            &out[62..64],
            &WEB_UDP_PORT.to_be_bytes()[..],
            "quoted source port"
        );

        // The disabled web's: dropped, and its flow removed, as the flow's
        // own packets are; the client's next datagram is a new flow, on a
        // serving web.
        h.expect(
            h.front,
            &unreachable(5000),
            XDP_DROP,
            Verdict::DropBackendGone,
        );
        let out = h.expect(h.front, &request(5000), XDP_REDIRECT, Verdict::Forwarded);
        assert_ne!(web_of(&out), gone, "rescheduled away from the disabled web");
    });
}

/// The verifier accepts the `lb` program; prints how many instructions it
/// verified (issue 22 reports it before and after the path's split; run
/// with `--nocapture` to see it).
#[test]
fn the_verifier_reports_the_programs_instruction_count() {
    let net = TestNet::new();
    net.run(|| {
        let mut h = Harness::new(&lab_config());
        let info = h.dp.program().expect("program").info().expect("info");
        let count = info
            .verified_instruction_count()
            .expect("the kernel reports a verified instruction count");
        assert!(count > 0, "verified instruction count {count}");
        println!("lb: verified_instruction_count = {count}");
    });
}
