//! The slow-start ramp: who ramps, and the share it gets over the period.

use std::path::Path;

use lb_common::maglev::{self, Member};

use super::*;
use crate::config;

const SITE: &str = r#"
[dataplane]
interfaces = ["lb-front", "lb-back"]

[[service]]
name = "www"
vip = "198.18.0.10:80"
scheduler = "weighted-round-robin"
slow-start = "10s"
backends = [
  { name = "web1", address = "198.19.0.11:80" },
  { name = "web2", address = "198.19.0.12:80" },
  { name = "web3", address = "198.19.0.13:80" },
]
"#;

fn site(scheduler: &str) -> Config {
    let text = SITE.replace("weighted-round-robin", scheduler);
    config::parse(&text, Path::new("site.toml")).expect("valid site")
}

/// A slow start where web1..web3 served from the first commit at `t0`,
/// then web3 left rotation and came back at `t0 + 1s`.
fn web3_came_back(cfg: &Config, t0: Instant) -> SlowStart {
    let mut s = SlowStart::default();
    s.observe(cfg, &|_, _| true, t0, true);
    assert!(
        !s.ramping(),
        "what serves at the first commit does not ramp"
    );
    s.observe(cfg, &|_, b| b.name != "web3", t0, false);
    s.observe(cfg, &|_, _| true, t0 + Duration::from_secs(1), false);
    assert!(s.ramping());
    s
}

/// web3's share of a weighted ring over the effective weights.
fn wrr_share(cfg: &Config) -> f64 {
    let members: Vec<(u32, u32)> = cfg.services[0]
        .backends
        .iter()
        .enumerate()
        .map(|(i, b)| (i as u32, b.weight))
        .collect();
    let ring = lb_common::ring::weighted(&members);
    ring.iter().filter(|&&id| id == 2).count() as f64 / ring.len() as f64
}

#[test]
fn the_ramp_is_linear_from_a_small_share_and_at_least_one() {
    assert_eq!(ramped(20, 0.0), 1);
    assert_eq!(ramped(20, 0.01), 1);
    assert_eq!(ramped(20, 0.5), 10);
    assert_eq!(ramped(20, 0.96), 20);
    assert_eq!(ramped(20, 3.0), 20);
    assert_eq!(ramped(1, 0.0), 1);
}

#[test]
fn a_backend_that_comes_back_ramps_its_share_of_a_weighted_ring() {
    let cfg = site("weighted-round-robin");
    let t0 = Instant::now();
    let s = web3_came_back(&cfg, t0);
    let mut shares = Vec::new();
    for secs in [1, 2, 4, 6, 8, 10] {
        let (eff, ramps) = s.effective(&cfg, t0 + Duration::from_secs(secs));
        let share = wrr_share(&eff);
        if let Some(r) = ramps.get(&key("www", "web3")) {
            assert_eq!(eff.services[0].backends[2].weight, r.weight);
        }
        shares.push((
            secs,
            share,
            ramps.get(&key("www", "web3")).map(|r| r.percent),
        ));
    }
    // 1 s: the first step (1 of 20); 6 s: half way; 11 s: full.
    assert_eq!(shares[0].2, Some(5));
    assert!((shares[0].1 - 1.0 / 41.0).abs() < 1e-9, "{shares:?}");
    assert_eq!(shares[3].2, Some(50));
    assert_eq!(shares[5].2, Some(90));
    for w in shares.windows(2) {
        assert!(w[0].1 < w[1].1, "the share grows: {shares:?}");
    }
    let (eff, ramps) = s.effective(&cfg, t0 + Duration::from_secs(11));
    assert!(ramps.is_empty());
    assert!((wrr_share(&eff) - 1.0 / 3.0).abs() < 1e-9);
    // The others never ramp, and the file's weights are not touched.
    assert_eq!(cfg.services[0].backends[2].weight, 1);
}

#[test]
fn maglev_tables_follow_the_ramp() {
    let cfg = site("maglev");
    let t0 = Instant::now();
    let s = web3_came_back(&cfg, t0);
    let slots = |at: u64| {
        let (eff, _) = s.effective(&cfg, t0 + Duration::from_secs(at));
        let members: Vec<Member> = eff.services[0]
            .backends
            .iter()
            .enumerate()
            .map(|(i, b)| Member {
                addr: match b.address {
                    std::net::SocketAddr::V4(a) => u32::from(*a.ip()),
                    std::net::SocketAddr::V6(a) => panic!("{a}: an IPv4 test"),
                },
                port: b.address.port(),
                id: i as u32,
                weight: b.weight,
            })
            .collect();
        let table = maglev::table(&members, 4093);
        table.iter().filter(|&&id| id == 2).count()
    };
    let (early, middle, full) = (slots(1), slots(6), slots(12));
    assert!(early < middle && middle < full, "{early} {middle} {full}");
    assert!(early < 4093 / 20, "{early}");
    assert!((1300..1430).contains(&full), "{full}");
}

#[test]
fn added_and_enabled_backends_ramp_and_the_rest_do_not() {
    let cfg = site("weighted-round-robin");
    let t0 = Instant::now();
    let mut s = SlowStart::default();
    // web3 drained (not serving) at the first commit; then enabled.
    s.observe(&cfg, &|_, b| b.name != "web3", t0, true);
    assert!(!s.ramping());
    s.observe(&cfg, &|_, _| true, t0, false);
    let (_, ramps) = s.effective(&cfg, t0);
    assert_eq!(ramps.keys().collect::<Vec<_>>(), [&key("www", "web3")]);
    // A backend added live ramps too (it never served).
    let mut more = cfg.clone();
    let mut web4 = more.services[0].backends[0].clone();
    web4.name = "web4".into();
    web4.address = "198.19.0.14:80".parse().expect("addr");
    more.services[0].backends.push(web4);
    s.observe(&more, &|_, _| true, t0 + Duration::from_secs(2), false);
    let (_, ramps) = s.effective(&more, t0 + Duration::from_secs(2));
    assert_eq!(ramps.len(), 2);
    // Past the period: forgotten, full weights, no scale.
    s.observe(&more, &|_, _| true, t0 + Duration::from_secs(13), false);
    assert!(!s.ramping());
    assert_eq!(s.effective(&more, t0 + Duration::from_secs(13)).0, more);
    // A service without slow-start never ramps.
    let mut plain = cfg.clone();
    plain.services[0].limits.slow_start = None;
    let mut s = SlowStart::default();
    s.observe(&plain, &|_, b| b.name != "web3", t0, true);
    s.observe(&plain, &|_, _| true, t0, false);
    assert!(!s.ramping());
}

#[test]
fn a_big_weighted_ring_is_scaled_less_so_it_fits() {
    let mut cfg = site("weighted-round-robin");
    for b in &mut cfg.services[0].backends {
        b.weight = 1000;
    }
    let t0 = Instant::now();
    let s = web3_came_back(&cfg, t0);
    let (eff, _) = s.effective(&cfg, t0 + Duration::from_secs(2));
    let weights: Vec<u32> = eff.services[0].backends.iter().map(|b| b.weight).collect();
    assert!(
        lb_common::ring::weighted_len(&weights) <= MAX_RING as u64,
        "{weights:?}"
    );
}

#[test]
fn slow_start_is_checked_like_the_rest_of_the_file() {
    let err = |text: &str| {
        config::parse(text, Path::new("site.toml"))
            .expect_err("rejected")
            .to_string()
    };
    let rr = err(&SITE.replace("weighted-round-robin", "round-robin"));
    assert!(
        rr.contains("service[0].slow-start: slow start ramps a backend's weight"),
        "{rr}"
    );
    let short = err(&SITE.replace("\"10s\"", "\"500ms\""));
    assert!(short.contains("must be between 1s and 1h"), "{short}");
    let cfg = site("least-connections");
    assert_eq!(config::check(&cfg, Path::new("x")).expect("check"), cfg);
}
