//! Kernel tier (issue 23): the flow tables' clock and layout. The real
//! `lb` object under BPF_PROG_TEST_RUN in the kernel tier's namespace
//! (tests/src/kernel_net.rs).
//!
//! - The data plane reads its clock from the kernel's jiffies (no helper
//!   call per packet) and stamps entries on the agent's clock
//!   (CLOCK_MONOTONIC_COARSE, in ticks), which the sweep and the status
//!   compare them with.
//! - A `FLOW_CONF` pinned before the clock joined it is refused clearly.
//!
//! Needs root and BPF; without them the tests fail loudly.

use lb_common::{FlowKey, Verdict};
use lb_tests::kernel_net::{
    Bpffs, CLIENT, CLIENT_MAC, FRONT_MAC, Harness, TestNet, VIP, expect_old_version_refused,
    lab_config, pin_old_layout, udp,
};
use lb_userspace::{
    dataplane::{Dataplane, sweep::now_ticks},
    harness::xdp::XDP_REDIRECT,
};

fn key(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> FlowKey {
    FlowKey {
        saddr: u32::from_ne_bytes(src),
        daddr: u32::from_ne_bytes(dst),
        sport: sport.to_be(),
        dport: dport.to_be(),
        protocol: 17,
        ..FlowKey::default()
    }
}

/// A flow's `seen` is the agent's "now": the program's jiffies clock and
/// the agent's coarse clock agree to within the tick the program may run
/// ahead, at the first packet (half-open) and after promotion
/// (established), seconds apart.
#[test]
fn flows_are_stamped_on_the_agents_clock() {
    let net = TestNet::new();
    net.run(|| {
        let mut h = Harness::new(&lab_config());
        let flow = key(CLIENT, 40_000, VIP, 5353);
        let datagram = udp(CLIENT_MAC, FRONT_MAC, CLIENT, VIP, 64, 40_000, 5353, b"q");
        let stamp = |h: &mut Harness, want_established: bool| {
            let before = now_ticks();
            h.expect(h.front, &datagram, XDP_REDIRECT, Verdict::Forwarded);
            let after = now_ticks();
            let (established, entry) =
                h.dp.flow_table()
                    .expect("flow table")
                    .lookup(&flow)
                    .expect("lookup")
                    .expect("the flow has an entry");
            assert_eq!(established, want_established);
            assert!(
                (before..=after + 1).contains(&entry.seen),
                "stamped {} on the data plane's clock, the agent's read {before}..={after}",
                entry.seen
            );
            entry.seen
        };
        let first = stamp(&mut h, false);
        std::thread::sleep(std::time::Duration::from_millis(2300));
        // UDP: the second packet promotes; its stamp is two ticks on.
        let second = stamp(&mut h, true);
        assert!(
            (2..=3).contains(&second.wrapping_sub(first)),
            "2.3 s is 2 or 3 ticks of 1.07 s: {first} → {second}"
        );
    });
}

/// `FLOW_CONF` grew the clock's settings (jiffy length, epoch): one pinned
/// by an earlier version cannot be adopted (the verifier would reject the
/// program reading past its end). The loader refuses clearly, saying what
/// to do, and leaves the pins as they were.
#[test]
fn a_flow_conf_pinned_before_the_jiffies_clock_is_refused_clearly() {
    let net = TestNet::new();
    let fs = Bpffs::new();
    let pins = fs.dir.join("lb");
    net.run(|| {
        let cfg = lab_config();
        let (first, adopted) = Dataplane::load_pinned(&cfg.dataplane, &pins).expect("load pinned");
        assert!(!adopted);
        drop(first);
        // As the version before: timeouts, budget, half-open size and seed.
        pin_old_layout(
            &pins,
            "FLOW_CONF",
            aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_ARRAY,
            4,
            28,
        );
        expect_old_version_refused(
            &cfg.dataplane,
            &pins,
            "FLOW_CONF",
            &["of 28-byte entries", "of 48-byte entries"],
        );
    });
}
