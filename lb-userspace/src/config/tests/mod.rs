//! Tests of the config: accepted configs ([`accepted`]) and every rejection
//! with its key path and reason ([`rejected`]), through [`parse`] and
//! [`check`]; the helpers that build config text live here.

mod accepted;
mod bounds;
mod fullnat;
mod pool;
mod proxy;
mod rejected;
mod sync;
mod through_vip;

use std::net::{SocketAddr, SocketAddrV4};

use lb_common::MAX_RING;

use super::*;

const FILE: &str = "test.toml";
const DP: &str = "[dataplane]\ninterfaces = [\"lb-front\", \"lb-back\"]\n";
const B1: &str = r#"{ address = "198.19.0.11:80" }"#;

#[track_caller]
fn parse_ok(text: &str) -> Config {
    match parse(text, Path::new(FILE)) {
        Ok(config) => config,
        Err(e) => panic!("expected a valid config, got: {e}\n{text}"),
    }
}

#[track_caller]
fn parse_err(text: &str) -> (String, String) {
    match parse(text, Path::new(FILE)) {
        Err(ConfigError::Invalid { file, key, reason }) => {
            assert_eq!(file, Path::new(FILE));
            (key, reason)
        }
        other => panic!("expected ConfigError::Invalid, got {other:?}\n{text}"),
    }
}

#[track_caller]
fn assert_rejected(text: &str, key: &str, fragment: &str) {
    let (got_key, reason) = parse_err(text);
    assert_eq!(got_key, key, "wrong key (reason: {reason:?}) for:\n{text}");
    assert!(
        reason.contains(fragment),
        "reason {reason:?} lacks {fragment:?} for:\n{text}"
    );
}

/// The dataplane plus one service "www" on 198.18.0.10:80 with `extra`
/// lines and the given backend entries.
fn one_service(extra: &str, backends: &str) -> String {
    format!(
        "{DP}\n[[service]]\nname = \"www\"\nvip = \"198.18.0.10:80\"\n{extra}\nbackends = [\n{backends}\n]\n"
    )
}

/// `one_service("", B1)` with `line` added to [dataplane].
fn with_dataplane_line(line: &str) -> String {
    one_service("", B1).replace(DP, &format!("{DP}{line}\n"))
}

/// `one_service("", B1)` with a `[coordination]` table of `lines`.
fn with_coordination(lines: &str) -> String {
    format!("{}\n[coordination]\n{lines}\n", one_service("", B1))
}

/// `one_service("", B1)` with a `[monitoring]` table of `lines`.
fn with_announce(lines: &str) -> String {
    format!("{}\n[announce]\n{lines}\n", one_service("", B1))
}

/// `one_service("", B1)` with a `[monitoring]` table of `lines`.
fn with_monitoring(lines: &str) -> String {
    format!("{}\n[monitoring]\n{lines}\n", one_service("", B1))
}

/// `one_service(service_lines, B1)` with a `[firewall]` table of `lines`.
fn with_firewall(lines: &str, service_lines: &str) -> String {
    one_service(service_lines, B1).replace(DP, &format!("{DP}\n[firewall]\n{lines}\n"))
}

fn with_health(health: &str) -> String {
    one_service(&format!("health = {{ {health} }}"), B1)
}

fn addr(s: &str) -> SocketAddr {
    match s.parse() {
        Ok(a) => a,
        Err(e) => panic!("{s}: {e}"),
    }
}

fn addr4(s: &str) -> SocketAddrV4 {
    match s.parse() {
        Ok(a) => a,
        Err(e) => panic!("{s}: {e}"),
    }
}

/// `n` distinct backend entries on 10.1.x.y:80.
fn many_backends(n: usize, extra: &str) -> String {
    (0..n)
        .map(|i| {
            format!(
                "{{ address = \"10.1.{}.{}:80\"{extra} }},\n",
                i / 256,
                i % 256
            )
        })
        .collect()
}

/// `one_service("", B1)` with its [dataplane] table holding only `lines`.
fn dataplane(lines: &str) -> String {
    format!(
        "[dataplane]\n{lines}\n{}",
        one_service("", B1).replace(DP, "")
    )
}

/// `one_service("", B1)` with its VIP replaced by `v`.
fn vip(v: &str) -> String {
    one_service("", B1).replace("\"198.18.0.10:80\"", &format!("\"{v}\""))
}

/// `one_service("", B1)` followed by a second [[service]] of `lines`.
fn and_service(lines: &str) -> String {
    format!("{}\n[[service]]\n{lines}", one_service("", B1))
}

/// A second service "dns" with `health = { health }`, so the key names its
/// index.
fn second_with_health(health: &str) -> String {
    and_service(&format!(
        "name = \"dns\"\nvip = \"198.18.0.10:5353\"\nprotocol = \"udp\"\n\
         health = {{ {health} }}\nbackends = [{{ address = \"198.19.0.11:5353\" }}]\n"
    ))
}

/// The service checked over TCP, its second backend with `health = { health }`.
fn with_backend_health(health: &str) -> String {
    one_service(
        "health = { check = \"tcp\" }",
        &format!(
            r#"{{ address = "198.19.0.11:80" }}, {{ address = "198.19.0.12:80", health = {{ {health} }} }}"#
        ),
    )
}

/// A service whose backends have the given weights, under `extra`.
fn weighted(extra: &str, ws: &[u32]) -> String {
    let backends: String = ws
        .iter()
        .enumerate()
        .map(|(i, w)| format!("{{ address = \"198.19.0.{}:80\", weight = {w} }},", i + 1))
        .collect();
    one_service(extra, &backends)
}

/// Two backends, the second with weight 2.
const WEIGHT_2: &str =
    r#"{ address = "198.19.0.11:80" }, { address = "198.19.0.12:80", weight = 2 }"#;

/// Two backends, the second on another port than the VIP's.
const DSR_BACKENDS: &str = r#"{ address = "198.19.0.11:80" }, { address = "198.19.0.12:8080" }"#;

/// `DSR_BACKENDS` under `forwarding = "dsr"` inherited from [dataplane].
fn dsr_inherited() -> String {
    one_service("", DSR_BACKENDS).replace(DP, &format!("{DP}forwarding = \"dsr\"\n"))
}
