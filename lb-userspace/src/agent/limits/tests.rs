//! The limit's ring rule: at `max-connections` out of the ring for new
//! flows, flows kept; backups when every primary is full; an empty ring
//! (drop_no_backend) when everything is.

use std::path::Path;

use lb_common::{BACKEND_F_DROP_FLOWS, BACKEND_F_IN_RING};

use super::*;
use crate::{
    config,
    dataplane::plan::{Ids, plan},
};

const SITE: &str = r#"
[dataplane]
interfaces = ["lb-front", "lb-back"]

[[service]]
name = "www"
vip = "198.18.0.10:80"
max-connections = 10
backends = [
  { name = "web1", address = "198.19.0.11:80", max-connections = 5 },
  { name = "web2", address = "198.19.0.12:80" },
  { name = "web3", address = "198.19.0.13:80", backup = true },
]
"#;

fn site() -> Config {
    config::parse(SITE, Path::new("site.toml")).expect("valid site")
}

fn applied(cfg: &Config) -> Vec<AppliedService> {
    let p = plan(&Ids::default(), cfg, &|_, _| Admission::SERVING, &[]).expect("plan");
    p.services.iter().map(AppliedService::from).collect()
}

/// The ring and each backend's flags with `active` flows per backend id.
fn rings(cfg: &Config, active: [u64; 3]) -> (Vec<String>, Vec<u16>) {
    let full = at_limit(cfg, &applied(cfg), |id| Ok::<_, ()>(active[id as usize])).expect("counts");
    let admit = |svc: &config::Service, b: &config::Backend| {
        limited(
            Admission::SERVING,
            full.contains_key(&state::key(&svc.name, &b.name)),
        )
    };
    let p = plan(&Ids::default(), cfg, &admit, &[]).expect("plan");
    let name = |id: &u32| {
        p.services[0]
            .backends
            .iter()
            .find(|(_, b)| b == id)
            .map(|(n, _)| n.clone())
            .expect("named")
    };
    (
        p.services[0].ring.iter().map(name).collect(),
        p.backends.iter().map(|b| b.flags).collect(),
    )
}

#[test]
fn a_backend_at_its_limit_takes_no_new_flows_and_keeps_its_own() {
    let cfg = site();
    // web1's own limit is 5, web2 has the service's 10, web3 too.
    let www = &cfg.services[0];
    let limits: Vec<Option<u32>> = www
        .backends
        .iter()
        .map(|b| www.max_connections_of(b))
        .collect();
    assert_eq!(limits, [Some(5), Some(10), Some(10)]);

    assert_eq!(rings(&cfg, [4, 9, 0]).0, ["web1", "web2"]);
    let (ring, flags) = rings(&cfg, [5, 9, 0]);
    assert_eq!(ring, ["web2"]);
    // Out of the ring, its flows untouched (no DROP_FLOWS).
    assert_eq!(flags[0] & (BACKEND_F_IN_RING | BACKEND_F_DROP_FLOWS), 0);
    // Every primary full: the backup takes new flows (HAProxy's backup).
    assert_eq!(rings(&cfg, [5, 10, 0]).0, ["web3"]);
    // Everything full: an empty ring, new flows get drop_no_backend.
    assert!(rings(&cfg, [7, 12, 10]).0.is_empty());
    // Below again: back in.
    assert_eq!(rings(&cfg, [4, 10, 0]).0, ["web1"]);
}

#[test]
fn limits_are_read_for_limited_backends_only_and_errors_pass_through() {
    let mut cfg = site();
    cfg.services[0].limits.max_connections = None;
    let applied = applied(&cfg);
    let mut asked = Vec::new();
    let full = at_limit(&cfg, &applied, |id| {
        asked.push(id);
        Ok::<_, ()>(100)
    })
    .expect("counts");
    assert_eq!(asked, [0], "only web1 has a limit now");
    assert_eq!(full, AtLimit::from([(state::key("www", "web1"), (100, 5))]));
    assert_eq!(at_limit(&cfg, &applied, |_| Err("no map")), Err("no map"));
}

#[test]
fn max_connections_is_checked_like_the_rest_of_the_file() {
    let err = |text: &str| {
        config::parse(text, Path::new("site.toml"))
            .expect_err("rejected")
            .to_string()
    };
    assert!(
        err(&SITE.replace("max-connections = 5", "max-connections = 0"))
            .contains("service[0].backends[0].max-connections: must be at least 1"),
    );
    assert!(
        err(&SITE.replace("max-connections = 10", "max-connections = -3"))
            .contains("service[0].max-connections: must be between 1 and 4294967295"),
    );
    // It round-trips through the live-change check.
    let cfg = site();
    assert_eq!(config::check(&cfg, Path::new("x")).expect("check"), cfg);
}
