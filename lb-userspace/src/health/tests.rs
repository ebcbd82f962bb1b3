//! The check engine end to end on loopback: transitions, per-backend
//! checks, and `sync` keeping state across config changes.

use std::{collections::BTreeSet, net::SocketAddrV4, time::Duration};

use super::{probe::test_support::*, *};
use crate::config::{
    Backend, CheckKind, Dataplane, Forwarding, OnBackendDown, Protocol, Scheduler, Service, XdpMode,
};
use std::time::Instant as StdInstant;
use tokio::{net::TcpListener, sync::mpsc};

fn config(services: Vec<Service>) -> Config {
    Config {
        firewall: Default::default(),
        dataplane: Dataplane {
            interfaces: vec!["lo".to_owned()],
            forwarding: Forwarding::Nat,
            xdp_mode: XdpMode::Generic,
            conntrack_size: 65536,
            half_open_size: lb_common::DEFAULT_HALF_OPEN_SIZE,
            new_flow_budget: 125_000,
            timeouts: Default::default(),
            tunnel_source: None,
            tunnel_source6: None,
            gue_port: lb_common::tunnel::GUE_DEFAULT_PORT,
            full_nat: Default::default(),
        },
        monitoring: None,
        announce: None,
        coordination: None,
        sync: None,
        services,
        pools: Vec::new(),
    }
}

fn service(name: &str, health: Option<HealthCheck>, backends: Vec<Backend>) -> Service {
    Service {
        firewall: Default::default(),
        name: name.to_owned(),
        vip: SocketAddrV4::new([198, 18, 0, 10].into(), 80).into(),
        protocol: Protocol::Tcp,
        forwarding: Forwarding::Nat,
        scheduler: Scheduler::RoundRobin,
        health,
        on_backend_down: OnBackendDown::KeepFlows,
        maglev_table_size: lb_common::maglev::MAGLEV_DEFAULT_SIZE,
        source_ip_prefix: lb_common::maps6::SOURCE_PREFIX_WHOLE,
        backends,
        limits: Default::default(),
        proxy_protocol: None,
    }
}

fn backend(name: &str, address: SocketAddrV4, health: Option<HealthCheck>) -> Backend {
    Backend {
        name: name.to_owned(),
        address: address.into(),
        weight: 1,
        backup: false,
        health,
        max_connections: None,
    }
}

fn fast(check: CheckKind) -> HealthCheck {
    HealthCheck {
        check,
        port: None,
        interval: Duration::from_millis(100),
        timeout: Duration::from_millis(100),
        rise: 2,
        fall: 2,
        through_vip: false,
    }
}

fn target(service: &str, address: SocketAddrV4) -> Target {
    Target {
        service: service.to_owned(),
        address: address.into(),
    }
}

async fn next(rx: &mut mpsc::UnboundedReceiver<Transition>, within: Duration) -> Transition {
    match tokio::time::timeout(within, rx.recv()).await {
        Ok(Some(t)) => t,
        Ok(None) => panic!("transition channel closed"),
        Err(_) => panic!("no transition within {within:?}"),
    }
}

/// Waits until `check` holds for the target's state.
async fn wait_state(
    checker: &HealthChecker,
    t: &Target,
    what: &str,
    check: impl Fn(&TargetState) -> bool,
) {
    let start = StdInstant::now();
    loop {
        let state = checker.states().get(t).cloned();
        if state.as_ref().is_some_and(&check) {
            return;
        }
        if start.elapsed() > Duration::from_secs(1) {
            panic!("{what}: state still {state:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn checker_reports_down_and_up_transitions() {
    let (l, addr) = listener().await;
    let (server, _) = serve(l, OK_WEB1);
    let cfg = config(vec![service(
        "www",
        Some(fast(http("/", 200, Some("web1")))),
        vec![backend("web1", addr, None)],
    )]);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let checker = HealthChecker::spawn(&cfg, tx);
    let web1 = target("www", addr);

    // Starts up, before any probe.
    let initial = checker.states();
    assert_eq!(initial.keys().collect::<Vec<_>>(), [&web1]);
    assert_eq!(initial[&web1].health, Health::Up);
    wait_state(&checker, &web1, "first probe passes", |s| {
        s.health == Health::Up && s.last_check.as_deref() == Some("ok")
    })
    .await;

    // Stop the server: the port is closed, probes are refused.
    server.abort();
    let _ = server.await;
    let down = next(&mut rx, Duration::from_secs(1)).await;
    assert_eq!(
        (&down.target, down.health),
        (&web1, Health::Down),
        "{down:?}"
    );
    assert_eq!(
        down.reason,
        format!("2 consecutive failures: connect {addr}: connection refused")
    );
    let state = &checker.states()[&web1];
    assert_eq!(state.health, Health::Down);
    assert!(state.consecutive >= 2, "{state:?}");

    // A server on the same port again: back up after two passes.
    let l = match TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => panic!("rebind {addr}: {e}"),
    };
    let (_server, _) = serve(l, OK_WEB1);
    let up = next(&mut rx, Duration::from_secs(1)).await;
    assert_eq!(
        (&up.target, up.health, up.reason.as_str()),
        (&web1, Health::Up, "2 consecutive successes")
    );
    assert!(checker.is_current(&up));
    wait_state(&checker, &web1, "up after rise", |s| {
        s.health == Health::Up && s.consecutive >= 2
    })
    .await;

    // Dropping the checker stops the probes (and with them the senders).
    drop(checker);
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(1), rx.recv()).await,
        Ok(None)
    );
}

#[tokio::test]
async fn only_backends_with_a_check_are_checked_with_their_own_check() {
    let (_up_listener, up_addr) = listener().await;
    let down_addr = closed_port().await;
    let tcp = HealthCheck {
        fall: 1,
        ..fast(CheckKind::Tcp)
    };
    let cfg = config(vec![
        // The service's check applies to a; b overrides it.
        service(
            "checked",
            Some(tcp.clone()),
            vec![
                backend("a", up_addr, None),
                backend("b", down_addr, Some(tcp.clone())),
            ],
        ),
        // Only c has a check (its own); d has none.
        service(
            "partial",
            None,
            vec![
                backend("c", down_addr, Some(tcp)),
                backend("d", down_addr, None),
            ],
        ),
        service("unchecked", None, vec![backend("e", down_addr, None)]),
    ]);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let checker = HealthChecker::spawn(&cfg, tx);
    // Targets are ordered by address, and the ports are the kernel's pick.
    assert_eq!(
        checker.states().into_keys().collect::<BTreeSet<_>>(),
        BTreeSet::from([
            target("checked", up_addr),
            target("checked", down_addr),
            target("partial", down_addr)
        ])
    );
    let mut down = [
        next(&mut rx, Duration::from_secs(1)).await,
        next(&mut rx, Duration::from_secs(1)).await,
    ];
    down.sort_by(|x, y| x.target.cmp(&y.target));
    assert_eq!(
        down.iter()
            .map(|t| (&t.target, t.health, t.reason.as_str()))
            .collect::<Vec<_>>(),
        [
            (
                &target("checked", down_addr),
                Health::Down,
                format!("1 consecutive failure: connect {down_addr}: connection refused").as_str()
            ),
            (
                &target("partial", down_addr),
                Health::Down,
                format!("1 consecutive failure: connect {down_addr}: connection refused").as_str()
            ),
        ]
    );
    wait_state(&checker, &target("checked", up_addr), "a passes", |s| {
        s.health == Health::Up && s.last_check.as_deref() == Some("ok")
    })
    .await;
}

#[tokio::test]
async fn sync_keeps_unchanged_checks_and_seeds_new_ones_from_the_agent() {
    let (_l, up_addr) = listener().await;
    let down_addr = closed_port().await;
    let tcp = HealthCheck {
        fall: 1,
        rise: 1,
        ..fast(CheckKind::Tcp)
    };
    let one = config(vec![service(
        "www",
        Some(tcp.clone()),
        vec![backend("down", down_addr, None)],
    )]);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut checker = HealthChecker::new(tx);
    checker.sync(&one, &|_| Health::Up);
    let down = next(&mut rx, Duration::from_secs(1)).await;
    assert_eq!(down.health, Health::Down);
    assert!(checker.is_current(&down));

    // The same backend plus a new one: the first check keeps running
    // (no new transition, its state stays down), the new one starts
    // in the state the agent gives it and rises on its own.
    let two = config(vec![service(
        "www",
        Some(tcp.clone()),
        vec![
            backend("down", down_addr, None),
            backend("new", up_addr, None),
        ],
    )]);
    checker.sync(&two, &|t| {
        assert_eq!(t.address, up_addr.into(), "only the new target is seeded");
        Health::Pending
    });
    assert!(checker.is_current(&down), "unchanged check kept");
    let up = next(&mut rx, Duration::from_secs(1)).await;
    assert_eq!((up.target.address, up.health), (up_addr.into(), Health::Up));
    assert_eq!(
        checker.states()[&target("www", down_addr)].health,
        Health::Down
    );

    // A changed check restarts from the agent's state; the old one's
    // transitions become stale.
    let slower = HealthCheck {
        interval: Duration::from_millis(150),
        ..tcp
    };
    let three = config(vec![service(
        "www",
        Some(slower),
        vec![backend("down", down_addr, None)],
    )]);
    checker.sync(&three, &|_| Health::Down);
    assert!(!checker.is_current(&down), "replaced check is stale");
    assert_eq!(
        checker.states().into_keys().collect::<Vec<_>>(),
        [target("www", down_addr)],
        "the removed backend's check stopped"
    );
    assert_eq!(
        checker.states()[&target("www", down_addr)].health,
        Health::Down
    );
}

/// Issue 21: probes the agent could not run (out of descriptors…) never
/// take a backend down, however many; its own failures still do.
#[test]
fn agent_errors_never_take_a_backend_down() {
    let agent = Err(ProbeError::Agent(
        "connect 198.19.0.11:80: too many open files".into(),
    ));
    let backend = Err(ProbeError::Backend(
        "connect 198.19.0.11:80: connection refused".into(),
    ));
    let mut counter = Counter::starting(Health::Up);
    for _ in 0..1000 {
        assert_eq!(record(&mut counter, &agent, 2, 3), None);
    }
    assert_eq!(counter.health(), Health::Up);
    assert_eq!(counter.consecutive(), 0);
    // A run of backend failures is not broken by agent errors in between.
    assert_eq!(record(&mut counter, &backend, 2, 3), None);
    assert_eq!(record(&mut counter, &agent, 2, 3), None);
    assert_eq!(record(&mut counter, &backend, 2, 3), None);
    assert_eq!(record(&mut counter, &backend, 2, 3), Some(Health::Down));
    // Pending stays pending too.
    let mut pending = Counter::starting(Health::Pending);
    assert_eq!(record(&mut pending, &agent, 2, 3), None);
    assert_eq!(pending.health(), Health::Pending);
}

/// Answers HTTP 200 only to connections from `admitted`, and closes any
/// other at once (a backend whose firewall admits only the LB's address).
async fn serve_only(listener: TcpListener, admitted: std::net::IpAddr) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loop {
        let Ok((mut stream, peer)) = listener.accept().await else {
            return;
        };
        if peer.ip() != admitted {
            continue;
        }
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let _ = stream.read(&mut buf).await;
            let _ = stream.write_all(OK_WEB1.as_bytes()).await;
        });
    }
}

#[tokio::test]
async fn a_full_nat_services_probes_come_from_its_source_address() {
    let (l, addr) = listener().await;
    let source: std::net::IpAddr = [127, 0, 0, 7].into();
    let server = tokio::spawn(serve_only(l, source));
    let check = || Some(fast(http("/", 200, Some("web1"))));
    let mut fnat = service("fnat", check(), vec![backend("web1", addr, None)]);
    fnat.forwarding = Forwarding::FullNat;
    // The same backend under a NAT service: probed from the kernel's
    // choice (127.0.0.1 here), which the backend refuses.
    let nat = service("nat", check(), vec![backend("web1", addr, None)]);
    let mut cfg = config(vec![fnat, nat]);
    cfg.dataplane.full_nat.addresses = vec![[127, 0, 0, 7].into()];
    assert_eq!(probe_source(&cfg, &cfg.services[0]), Some(source));
    assert_eq!(probe_source(&cfg, &cfg.services[1]), None);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let checker = HealthChecker::spawn(&cfg, tx);
    let t = next(&mut rx, Duration::from_secs(2)).await;
    assert_eq!(
        (t.target.service.as_str(), t.health),
        ("nat", Health::Down),
        "{t:?}"
    );
    wait_state(&checker, &target("fnat", addr), "fnat passes", |s| {
        s.health == Health::Up && s.consecutive >= 3 && s.last_check.as_deref() == Some("ok")
    })
    .await;
    // Without source addresses, the full-NAT service's probes come from
    // the kernel's choice too, and fail the same way.
    cfg.dataplane.full_nat.addresses.clear();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let _checker = HealthChecker::spawn(&cfg, tx);
    let mut down = BTreeSet::new();
    for _ in 0..2 {
        let t = next(&mut rx, Duration::from_secs(2)).await;
        assert_eq!(t.health, Health::Down, "{t:?}");
        down.insert(t.target.service);
    }
    assert_eq!(down, BTreeSet::from(["fnat".to_owned(), "nat".to_owned()]));
    server.abort();
}
