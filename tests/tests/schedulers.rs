//! Kernel tier of the schedulers: the real `lb` object run with
//! BPF_PROG_TEST_RUN on crafted TCP frames. For every scheduler, the backend
//! each new flow is sent to must be the one the userspace model
//! (`explain::choose`, over the tables read back from the maps) predicts;
//! under `maglev` and `source-ip` a flow whose conntrack entry was lost
//! comes back to its backend, and taking a backend out of rotation moves
//! no flow between the others.
//!
//! Needs root and BPF; without them the tests fail loudly.

use std::net::SocketAddrV4;

use etherparse::PacketBuilder;
use lb_common::{FlowKey, Verdict, maglev::MAGLEV_DEFAULT_SIZE};
use lb_tests::kernel_net::{CLIENT_MAC, FRONT_MAC, TestNet, VIP, WEB_MACS, lab_config};
use lb_userspace::{
    config::{Backend, Config, Scheduler, Service},
    dataplane::{Admission, AppliedService, Dataplane},
    explain::{self, FlowQuery},
    harness::xdp::{self, XDP_REDIRECT, XDP_TX},
};

const SCHEDULERS: [Scheduler; 6] = [
    Scheduler::RoundRobin,
    Scheduler::WeightedRoundRobin,
    Scheduler::Maglev,
    Scheduler::SourceIp,
    Scheduler::LeastConnections,
    Scheduler::FlowHash,
];

/// The kernel tier's www service alone (VIP:80, TCP, NAT, web1..3 on
/// :8080) under `scheduler`.
fn config(scheduler: Scheduler, table_size: u32) -> Config {
    let mut cfg = lab_config();
    cfg.services.truncate(1);
    let www = &mut cfg.services[0];
    assert_eq!(www.name, "www");
    www.scheduler = scheduler;
    www.maglev_table_size = table_size;
    for (i, b) in www.backends.iter_mut().enumerate() {
        // Uneven weights where they count, so the tables are too.
        b.weight = if scheduler.uses_weights() {
            i as u32 + 1
        } else {
            1
        };
    }
    cfg
}

/// A client's TCP segment to the VIP: a SYN, or an ACK of an open flow.
fn segment(client: [u8; 4], sport: u16, syn: bool) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(CLIENT_MAC, FRONT_MAC)
        .ipv4(client, VIP, 64)
        .tcp(sport, 80, 0x1234_5678, 64240);
    let b = if syn { b.syn() } else { b.ack(0x8765_4321) };
    let mut out = Vec::new();
    b.write(&mut out, b"").expect("build tcp frame");
    out
}

/// The i-th crafted client: 40 addresses, several ports each.
fn client(i: u32) -> ([u8; 4], u16) {
    (
        [198, 18, 0, 100 + (i % 40) as u8],
        40_000 + (i / 40) as u16 * 7 + i as u16 % 5,
    )
}

struct Harness {
    dp: Dataplane,
    front: u32,
    applied: Vec<AppliedService>,
}

impl Harness {
    fn new(cfg: &Config) -> Harness {
        let mut dp = Dataplane::load(cfg.dataplane.conntrack_size)
            .expect("load the lb object (built by cargo xtask build)");
        let applied = dp.apply(cfg).expect("apply config");
        let front = xdp::ifindex("f0").expect("f0 in the test namespace");
        Harness { dp, front, applied }
    }

    /// Applies `cfg` live, with `out` out of rotation (drained).
    fn apply(&mut self, cfg: &Config, out: &[&str]) {
        let admit = |_: &Service, b: &Backend| {
            if out.contains(&b.name.as_str()) {
                Admission {
                    in_rotation: false,
                    drop_flows: false,
                }
            } else {
                Admission::SERVING
            }
        };
        self.applied = self.dp.apply_with(cfg, &admit).expect("apply");
    }

    /// The web server (index) the model predicts for this flow now.
    fn predicted(&self, client: [u8; 4], sport: u16) -> Option<usize> {
        let query = FlowQuery {
            client: SocketAddrV4::new(client.into(), sport).into(),
            vip: SocketAddrV4::new(VIP.into(), 80).into(),
            protocol: lb_common::headers::IPPROTO_TCP,
        };
        let key = query.key().expect("an IPv4 flow");
        let facts = self.dp.flow_facts(&key).expect("read the maps");
        let service = facts.service.expect("the service is in the maps");
        let choice = explain::choose(&key, &service)?;
        let name = self.applied[0]
            .backends
            .iter()
            .find(|(_, id)| *id == choice.backend_id)
            .map(|(name, _)| name.clone())
            .expect("a configured backend");
        Some(web_index(&name))
    }

    /// Sends one segment; the web server (index) it was forwarded to.
    fn send(&mut self, client: [u8; 4], sport: u16, syn: bool) -> usize {
        let frame = segment(client, sport, syn);
        let prog = self.dp.program().expect("program");
        let result = xdp::test_run(prog, self.front, &frame, 0, true).expect("BPF_PROG_TEST_RUN");
        assert!(
            matches!(result.action, XDP_REDIRECT | XDP_TX),
            "{client:?}:{sport}: action {} (verdicts {:?})",
            result.action,
            self.dp.verdicts().map(|v| v
                .into_iter()
                .filter(|(_, n)| *n > 0)
                .collect::<Vec<(Verdict, u64)>>())
        );
        let out = result.frame.unwrap_or_default();
        WEB_MACS
            .iter()
            .position(|m| out[..6] == m[..])
            .unwrap_or_else(|| panic!("not sent to a web server: {:02x?}", &out[..6]))
    }

    /// Deletes the flow's entries, forward and reply (as an eviction, an
    /// expiry, or a packet arriving at another load balancer would leave it).
    fn forget(&mut self, client: [u8; 4], sport: u16) {
        let key = FlowKey {
            saddr: u32::from_ne_bytes(client),
            daddr: u32::from_ne_bytes(VIP),
            sport: sport.to_be(),
            dport: 80u16.to_be(),
            protocol: lb_common::headers::IPPROTO_TCP,
            _pad0: 0,
            _pad1: 0,
        };
        let table = self.dp.flow_table().expect("flow table");
        assert!(
            table.lookup(&key).expect("lookup").is_some(),
            "the flow had an entry"
        );
        self.dp.forget_flow(&key).expect("forget the flow");
        assert_eq!(table.lookup(&key).expect("lookup"), None);
    }
}

fn web_index(name: &str) -> usize {
    name.trim_start_matches("web")
        .parse::<usize>()
        .expect("webN")
        - 1
}

/// Every scheduler, switched live on one data plane: each of 120 new flows
/// goes where the model says, and the table is the one for the scheduler.
#[test]
fn every_scheduler_sends_new_flows_where_the_model_predicts() {
    TestNet::new().run(|| {
        let mut h = Harness::new(&config(Scheduler::RoundRobin, MAGLEV_DEFAULT_SIZE));
        for (round, scheduler) in SCHEDULERS.iter().enumerate() {
            h.apply(&config(*scheduler, MAGLEV_DEFAULT_SIZE), &[]);
            let mut spread = [0u32; 3];
            for i in 0..120 {
                // Fresh tuples each round: none has an entry yet.
                let (c, port) = client(i + 1000 * round as u32);
                let want = h.predicted(c, port).expect("a backend");
                let got = h.send(c, port, true);
                assert_eq!(got, want, "{scheduler}: flow {c:?}:{port}");
                spread[got] += 1;
            }
            println!("{scheduler}: 120 new flows over web1..3: {spread:?}");
            assert!(spread.iter().all(|&n| n > 0), "{scheduler}: {spread:?}");
        }
    });
}

/// `source-ip`: every port of one client lands on one backend; `maglev`
/// and `source-ip`: a flow whose entry is gone comes back to its backend
/// (its next packet, an ACK, is routed by the same table).
#[test]
fn a_lost_flow_entry_comes_back_to_the_same_backend() {
    TestNet::new().run(|| {
        for scheduler in [Scheduler::Maglev, Scheduler::SourceIp] {
            let mut h = Harness::new(&config(scheduler, 4093));
            for i in 0..60 {
                let (c, port) = client(i);
                let first = h.send(c, port, true);
                h.forget(c, port);
                let again = h.send(c, port, false);
                assert_eq!(
                    again, first,
                    "{scheduler}: {c:?}:{port} after its entry was lost"
                );
            }
            if scheduler == Scheduler::SourceIp {
                for host in 0..10u8 {
                    let c = [198, 18, 0, 150 + host];
                    let ports: Vec<usize> = (0..20).map(|p| h.send(c, 50_000 + p, true)).collect();
                    assert!(
                        ports.iter().all(|&w| w == ports[0]),
                        "client {c:?}: {ports:?}"
                    );
                }
            }
        }
    });
}

/// Maglev: a backend leaving rotation (drained here; down and disabled
/// are the same admission) hands over its own slots only: every flow the
/// model put on another backend stays there, and the drained one's flows
/// spread over both others. Back in rotation, the table is as before.
#[test]
fn maglev_out_of_rotation_moves_only_that_backends_flows() {
    TestNet::new().run(|| {
        let cfg = config(Scheduler::Maglev, MAGLEV_DEFAULT_SIZE);
        let mut h = Harness::new(&cfg);
        let flows: Vec<([u8; 4], u16)> = (0..400).map(client).collect();
        let before: Vec<usize> = flows
            .iter()
            .map(|&(c, p)| h.predicted(c, p).expect("a backend"))
            .collect();
        h.apply(&cfg, &["web2"]);
        let mut moved_to = [0u32; 3];
        for (&(c, p), &was) in flows.iter().zip(&before) {
            let now = h.send(c, p, true);
            if was == 1 {
                assert_ne!(now, 1, "drained web2 gets no new flow");
                moved_to[now] += 1;
            } else {
                assert_eq!(now, was, "{c:?}:{p} moved between survivors");
            }
        }
        println!("web2's flows went to web1/web3: {moved_to:?}");
        assert!(moved_to[0] > 0 && moved_to[2] > 0, "{moved_to:?}");
        h.apply(&cfg, &[]);
        let after: Vec<usize> = flows
            .iter()
            .map(|&(c, p)| h.predicted(c, p).expect("a backend"))
            .collect();
        assert_eq!(after, before, "back in rotation: the same table");
    });
}
