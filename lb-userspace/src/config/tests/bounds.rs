//! Issue 21, item 1: a config `lb validate` accepts never panics the agent.
//! Every duration and number a config carries is drawn from anywhere in
//! its type (and from around each limit); whatever the validator accepts
//! goes through the agent's computations over a config: the first-verdict
//! bound and the ready deadline, the flow settings, the data plane's plan,
//! the round trip of a live change. Whatever it rejects names a key.

use proptest::prelude::*;

use super::*;
use crate::dataplane::{Admission, plan};

/// A duration's text: small, around a limit, or anything at all.
fn duration_text() -> impl Strategy<Value = String> {
    prop_oneof![
        (1u64..5_000).prop_map(|n| format!("{n}ms")),
        (1u64..100).prop_map(|n| format!("{n}s")),
        prop::sample::select(vec![
            "0s",
            "1ms",
            "3600s",
            "3601s",
            "3600000ms",
            "86400s",
            "86401s",
            "604800s",
            "604801s",
            "18446744073709551615s",
            "18446744073709551615ms",
            "18446744073709551616s",
        ])
        .prop_map(str::to_owned),
        any::<u64>().prop_map(|n| format!("{n}s")),
        any::<u64>().prop_map(|n| format!("{n}ms")),
    ]
}

/// An integer: small, around the usual limits, or anything at all.
fn number() -> impl Strategy<Value = i64> {
    prop_oneof![
        -2i64..300,
        prop::sample::select(vec![
            1023,
            1024,
            65_536,
            16_777_216,
            16_777_217,
            100_000_000,
            100_000_001,
            i64::from(u32::MAX),
            i64::from(u32::MAX) + 1,
            i64::MAX,
            i64::MIN,
        ]),
        any::<i64>(),
    ]
}

#[derive(Debug, Clone)]
struct Values {
    durations: Vec<String>,
    numbers: Vec<i64>,
}

fn values() -> impl Strategy<Value = Values> {
    (
        prop::collection::vec(duration_text(), 12),
        prop::collection::vec(number(), 14),
    )
        .prop_map(|(durations, numbers)| Values { durations, numbers })
}

/// A config with every duration and number key filled from `v`: flow
/// timeouts, table sizes, budget, a service's check and a backend's own,
/// weights, Maglev size, rate limits, BGP MED, a pool's check and timers.
fn config_text(v: &Values) -> String {
    let d = &v.durations;
    let n = &v.numbers;
    format!(
        r#"[dataplane]
interfaces = ["lb-front", "lb-back"]
conntrack-size = {n0}
half-open-size = {n1}
new-flow-budget = {n2}
timeouts = {{ tcp = "{d0}", tcp-closing = "{d1}", tcp-half-open = "{d2}", udp = "{d3}" }}

[firewall]
rate-limit = {{ new-flows-per-second = {n3}, burst = {n4} }}

[announce]
bird-socket = "/run/bird/bird.ctl"
include = "/etc/bird/lb.conf"
med = {n5}

[[service]]
name = "www"
vip = "198.18.0.10:80"
scheduler = "maglev"
maglev-table-size = {n6}
health = {{ check = "http", port = {n7}, expect-status = {n8}, interval = "{d4}", timeout = "{d5}", rise = {n9}, fall = {n10} }}
backends = [
  {{ address = "198.19.0.11:80", weight = {n11} }},
  {{ address = "198.19.0.12:80", health = {{ check = "tcp", interval = "{d6}", timeout = "{d7}", rise = {n12}, fall = {n13} }} }},
]

[[pool]]
name = "db"
write-vip = "198.18.0.20:3306"
read-vip = "198.18.0.21:3306"
health = {{ check = "mysql", user = "lb", password = "pw", interval = "{d8}", timeout = "{d9}" }}
max-lag = "{d10}"
auto-failover = "{d11}"
members = [ {{ name = "db1", address = "198.19.1.21:3306" }} ]
"#,
        n0 = n[0],
        n1 = n[1],
        n2 = n[2],
        n3 = n[3],
        n4 = n[4],
        n5 = n[5],
        n6 = n[6],
        n7 = n[7],
        n8 = n[8],
        n9 = n[9],
        n10 = n[10],
        n11 = n[11],
        n12 = n[12],
        n13 = n[13],
        d0 = d[0],
        d1 = d[1],
        d2 = d[2],
        d3 = d[3],
        d4 = d[4],
        d5 = d[5],
        d6 = d[6],
        d7 = d[7],
        d8 = d[8],
        d9 = d[9],
        d10 = d[10],
        d11 = d[11],
    )
}

/// The values that make `config_text` valid: so the property also runs
/// through accepted configs, not only rejections.
fn valid_values() -> impl Strategy<Value = Values> {
    let seconds = |max: u64| (1u64..=max).prop_map(|s| format!("{s}s"));
    (
        prop::collection::vec(seconds(604_800), 4),
        seconds(3600),
        seconds(86_400),
        seconds(86_400),
        (1i64..=100, 1i64..=100, 1i64..=100, 1i64..=100, 0i64..=1000),
        any::<u32>(),
    )
        .prop_map(
            |(flow, interval, lag, failover, (r1, f1, r2, f2, w), med)| Values {
                durations: vec![
                    flow[0].clone(),
                    flow[1].clone(),
                    flow[2].clone(),
                    flow[3].clone(),
                    interval.clone(),
                    interval.clone(),
                    interval.clone(),
                    interval.clone(),
                    interval.clone(),
                    interval,
                    lag,
                    failover,
                ],
                numbers: vec![
                    1024,
                    16_777_216,
                    100_000_000,
                    10_000_000,
                    100_000_000,
                    i64::from(med),
                    65_537,
                    65_535,
                    599,
                    r1,
                    f1,
                    w,
                    r2,
                    f2,
                ],
            },
        )
}

/// Everything the agent computes from a config before and while it runs
/// it, apart from I/O. Panics are what the property looks for.
fn run_the_agents_computations(cfg: &Config) {
    let bound = cfg.first_verdict_bound();
    let now = tokio::time::Instant::now();
    let ready = crate::agent::ready_by(cfg, now);
    assert!(ready >= now && ready - now >= bound.min(Duration::from_secs(24 * 3600)));
    for s in &cfg.services {
        for b in &s.backends {
            if let Some(h) = s.health_for(b) {
                assert!(h.interval > Duration::ZERO && h.timeout <= h.interval);
                let _ = h.first_verdict_time();
                let _ = h.target(b.address);
            }
        }
    }
    let _ = cfg.dataplane.flow_conf();
    let planned = plan::plan(&plan::Ids::default(), cfg, &|_, _| Admission::SERVING, &[]);
    assert!(planned.is_ok(), "{planned:?}");
    // A live change re-validates the config as it is: it must pass again.
    match check(cfg, Path::new("live")) {
        Ok(again) => assert_eq!(&again, cfg),
        Err(e) => panic!("an accepted config failed `check`: {e}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn any_accepted_config_runs_without_a_panic(v in values()) {
        let text = config_text(&v);
        match parse(&text, Path::new(FILE)) {
            Ok(cfg) => run_the_agents_computations(&cfg),
            Err(ConfigError::Invalid { key, reason, .. }) => {
                prop_assert!(!key.is_empty() && !reason.is_empty(), "{key}: {reason}");
            }
            Err(other) => prop_assert!(false, "{other}"),
        }
    }

    #[test]
    fn the_longest_accepted_values_run_without_a_panic(v in valid_values()) {
        let cfg = parse_ok(&config_text(&v));
        run_the_agents_computations(&cfg);
    }
}

#[test]
fn the_longest_first_verdict_is_about_a_hundred_hours() {
    let v = Values {
        durations: [
            "604800s", "604800s", "604800s", "604800s", "3600s", "3600s", "3600s", "3600s",
            "3600s", "3600s", "86400s", "86400s",
        ]
        .map(str::to_owned)
        .to_vec(),
        numbers: vec![
            16_777_216,
            16_777_216,
            100_000_000,
            10_000_000,
            100_000_000,
            i64::from(u32::MAX),
            65_537,
            65_535,
            599,
            100,
            100,
            1000,
            100,
            100,
        ],
    };
    let cfg = parse_ok(&config_text(&v));
    assert_eq!(
        cfg.first_verdict_bound(),
        Duration::from_secs(99 * 3600 + 3600)
    );
    run_the_agents_computations(&cfg);
}
