//! `check = "dns"`: one DNS query to the backend, built and parsed by
//! hickory-proto, over UDP (asked again over TCP when the reply comes back
//! truncated) or over TCP only. The probe passes when the reply answers
//! this query (same id, same question) with the expected rcode and, if the
//! check names one, an answer record reading the expected data.
//!
//! The UDP leg is `udp.rs`'s connected socket: an ICMP port unreachable (no
//! server on the port) fails the probe at once.

use std::{net::SocketAddr, str::FromStr, time::Duration};

use hickory_proto::{
    op::{Message, MessageType, Query},
    rr::{Name, RecordType},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    time::{Instant, timeout_at},
};

use super::probe::{ProbeError, deadline_after, io_reason};
use crate::config::{DnsCheck, DnsTransport, duration::show};

pub async fn probe(
    address: SocketAddr,
    source: Option<std::net::IpAddr>,
    check: &DnsCheck,
    timeout: Duration,
) -> Result<(), ProbeError> {
    let deadline = deadline_after(timeout);
    let (id, query) = query_message(check)?;
    let reply = match check.transport {
        DnsTransport::Tcp => over_tcp(address, source, &query, deadline, timeout).await?,
        DnsTransport::Udp => {
            // A stray datagram (another id) is not the answer: wait on for it.
            let reply = super::udp::exchange(address, source, &query, deadline, timeout, |r| {
                r.get(..2) == query.get(..2)
            })
            .await?;
            if is_truncated(&reply) {
                over_tcp(address, source, &query, deadline, timeout)
                    .await
                    .map_err(|why| format!("truncated over UDP, then over TCP: {why}"))?
            } else {
                reply
            }
        }
    };
    judge(check, id, &reply).map_err(|why| ProbeError::Backend(format!("{address}: {why}")))
}

/// The query for `check`, in wire form, and its random message id: one
/// question, recursion not desired (the server must answer from what it
/// serves, not ask others).
pub fn query_message(check: &DnsCheck) -> Result<(u16, Vec<u8>), String> {
    let (name, record_type) = question(check)?;
    let mut message = Message::query();
    message.add_query(Query::query(name, record_type));
    let wire = message
        .to_vec()
        .map_err(|e| format!("dns query for {}: {e}", check.name))?;
    Ok((message.metadata.id, wire))
}

fn question(check: &DnsCheck) -> Result<(Name, RecordType), String> {
    // Both were checked when the config was loaded.
    let name = Name::from_ascii(&check.name).map_err(|e| format!("{}: {e}", check.name))?;
    let record_type = RecordType::from_str(&check.record_type)
        .map_err(|e| format!("{}: {e}", check.record_type))?;
    Ok((name, record_type))
}

/// Does the reply say TC? (Read before the full parse: a truncated reply may
/// not parse, and it is asked again over TCP anyway.)
fn is_truncated(reply: &[u8]) -> bool {
    reply.get(2).is_some_and(|flags| flags & 0x02 != 0)
}

/// Checks `reply` against `check` for the query with id `id`: a response
/// to this question, the expected rcode, and the expected answer if any.
pub fn judge(check: &DnsCheck, id: u16, reply: &[u8]) -> Result<(), String> {
    let message = Message::from_vec(reply).map_err(|e| format!("not a DNS message ({e})"))?;
    let meta = &message.metadata;
    if meta.message_type != MessageType::Response || meta.id != id {
        return Err(format!(
            "not the response to query id {id} (got {:?} id {})",
            meta.message_type, meta.id
        ));
    }
    let (name, record_type) = question(check)?;
    if !message
        .queries
        .iter()
        .any(|q| q.name() == &name && q.query_type() == record_type)
    {
        return Err(format!(
            "the response is not for {} {}",
            check.name, check.record_type
        ));
    }
    let rcode = u16::from(meta.response_code);
    if rcode != check.expect_rcode.code() {
        return Err(format!(
            "{} {}: rcode {}, expected {}",
            check.name,
            check.record_type,
            rcode_name(rcode),
            check.expect_rcode.name()
        ));
    }
    let Some(expected) = &check.expect_answer else {
        return Ok(());
    };
    let answers: Vec<String> = message
        .answers
        .iter()
        .filter(|r| r.record_type() == record_type)
        .map(|r| r.data.to_string())
        .collect();
    if answers.iter().any(|a| same_data(a, expected, record_type)) {
        return Ok(());
    }
    let shown = if answers.is_empty() {
        "no answer".to_owned()
    } else {
        answers.join(", ")
    };
    Err(format!(
        "{} {}: {shown}, expected {expected}",
        check.name, check.record_type
    ))
}

/// An answer's data against the expected text: addresses as addresses,
/// the rest as text without case or a final dot on names.
fn same_data(answer: &str, expected: &str, record_type: RecordType) -> bool {
    match record_type {
        RecordType::A | RecordType::AAAA => {
            answer.parse::<std::net::IpAddr>().ok() == expected.parse::<std::net::IpAddr>().ok()
        }
        _ => {
            let plain = |s: &str| s.trim().trim_end_matches('.').to_ascii_lowercase();
            plain(answer) == plain(expected)
        }
    }
}

fn rcode_name(code: u16) -> String {
    crate::config::DnsRcode::ALL
        .iter()
        .find(|(.., c)| *c == code)
        .map_or_else(|| format!("{code}"), |(_, name, _)| (*name).to_owned())
}

async fn over_tcp(
    address: SocketAddr,
    source: Option<std::net::IpAddr>,
    query: &[u8],
    deadline: Instant,
    timeout: Duration,
) -> Result<Vec<u8>, String> {
    let timed_out = || format!("timed out after {}", show(timeout));
    let step = |what: &str| format!("{what} {address} (tcp)");
    let mut stream = timeout_at(deadline, super::probe::connect_from(address, source))
        .await
        .map_err(|_| format!("{}: {}", step("connect"), timed_out()))?
        .map_err(|e| format!("{}: {}", step("connect"), io_reason(&e)))?;
    // RFC 1035 4.2.2: each message is preceded by its length, two bytes.
    let len = u16::try_from(query.len()).map_err(|_| "query too long".to_owned())?;
    let mut framed = len.to_be_bytes().to_vec();
    framed.extend_from_slice(query);
    let exchange = async {
        stream.write_all(&framed).await?;
        let len = stream.read_u16().await?;
        let mut reply = vec![0u8; usize::from(len)];
        stream.read_exact(&mut reply).await?;
        Ok::<_, std::io::Error>(reply)
    };
    timeout_at(deadline, exchange)
        .await
        .map_err(|_| format!("{}: {}", step("reply from"), timed_out()))?
        .map_err(|e| format!("{}: {}", step("reply from"), io_reason(&e)))
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddrV4;

    use super::*;
    use crate::config::DnsRcode;
    use hickory_proto::{
        op::{OpCode, ResponseCode},
        rr::{RData, Record, rdata},
    };
    use tokio::net::{TcpListener, UdpSocket};

    /// The probe with a backend's failure as its text.
    async fn probe(
        address: impl Into<SocketAddr>,
        check: &DnsCheck,
        timeout: Duration,
    ) -> Result<(), String> {
        super::probe(address.into(), None, check, timeout)
            .await
            .map_err(ProbeError::expect_backend)
    }

    const T: Duration = Duration::from_millis(500);

    fn check(expect_rcode: DnsRcode, expect_answer: Option<&str>) -> DnsCheck {
        DnsCheck {
            name: "www.foobar.com.".into(),
            record_type: "A".into(),
            transport: DnsTransport::Udp,
            expect_rcode,
            expect_answer: expect_answer.map(str::to_owned),
        }
    }

    /// The reply a server gives to `query` (wire form): `rcode`, answers
    /// of the query's name reading `addresses`, TC set if `truncated`.
    fn reply(query: &[u8], rcode: ResponseCode, addresses: &[&str], truncated: bool) -> Vec<u8> {
        let query = Message::from_vec(query).expect("query parses");
        let mut m = Message::response(query.metadata.id, OpCode::Query);
        m.metadata.response_code = rcode;
        m.metadata.authoritative = true;
        m.metadata.truncation = truncated;
        m.add_queries(query.queries.clone());
        for a in addresses {
            let name = query.queries[0].name().clone();
            m.add_answer(Record::from_rdata(
                name,
                60,
                RData::A(rdata::A(a.parse().expect("ip"))),
            ));
        }
        m.to_vec().expect("encodes")
    }

    #[test]
    fn the_query_asks_one_question_without_recursion() {
        let c = check(DnsRcode::NoError, None);
        let (id, wire) = query_message(&c).expect("builds");
        let m = Message::from_vec(&wire).expect("parses");
        assert_eq!(m.metadata.id, id);
        assert_eq!(m.metadata.message_type, MessageType::Query);
        assert_eq!(m.metadata.op_code, OpCode::Query);
        assert!(!m.metadata.recursion_desired);
        assert_eq!(m.queries.len(), 1);
        assert_eq!(m.queries[0].name().to_ascii(), "www.foobar.com.");
        assert_eq!(m.queries[0].query_type(), RecordType::A);
        assert!(m.answers.is_empty() && m.additionals.is_empty());
        // Ids are random: two queries rarely share one.
        let ids: std::collections::BTreeSet<u16> = (0..8)
            .filter_map(|_| query_message(&c).ok())
            .map(|(id, _)| id)
            .collect();
        assert!(ids.len() > 1, "{ids:?}");
    }

    #[test]
    fn the_answer_matcher_checks_id_question_rcode_and_data() {
        let ok = check(DnsRcode::NoError, Some("198.19.0.11"));
        let (id, q) = query_message(&ok).expect("builds");
        let two = reply(
            &q,
            ResponseCode::NoError,
            &["198.19.0.12", "198.19.0.11"],
            false,
        );
        assert_eq!(judge(&ok, id, &two), Ok(()));
        assert_eq!(judge(&check(DnsRcode::NoError, None), id, &two), Ok(()));
        assert_eq!(
            judge(
                &ok,
                id,
                &reply(&q, ResponseCode::NoError, &["198.19.0.13"], false)
            ),
            Err("www.foobar.com. A: 198.19.0.13, expected 198.19.0.11".into())
        );
        assert_eq!(
            judge(&ok, id, &reply(&q, ResponseCode::NoError, &[], false)),
            Err("www.foobar.com. A: no answer, expected 198.19.0.11".into())
        );
        let servfail = reply(&q, ResponseCode::ServFail, &[], false);
        assert_eq!(
            judge(&ok, id, &servfail),
            Err("www.foobar.com. A: rcode SERVFAIL, expected NOERROR".into())
        );
        // A check that expects NXDOMAIN passes on it, and fails on NOERROR.
        let nx = check(DnsRcode::NxDomain, None);
        assert_eq!(
            judge(&nx, id, &reply(&q, ResponseCode::NXDomain, &[], false)),
            Ok(())
        );
        assert!(judge(&nx, id, &two).is_err());
        // Another id, the query itself, another question, garbage.
        assert!(
            judge(&ok, id.wrapping_add(1), &two)
                .is_err_and(|e| e.starts_with("not the response to query id"))
        );
        assert!(judge(&ok, id, &q).is_err_and(|e| e.starts_with("not the response")));
        let mut aaaa = ok.clone();
        aaaa.record_type = "AAAA".into();
        assert_eq!(
            judge(&aaaa, id, &two),
            Err("the response is not for www.foobar.com. AAAA".into())
        );
        assert!(judge(&ok, id, b"\x12").is_err_and(|e| e.starts_with("not a DNS message")));
        // Names compare without case or the final dot.
        assert!(same_data(
            "ns1.foobar.com.",
            "NS1.foobar.com",
            RecordType::NS
        ));
        assert!(same_data("::1", "0:0::1", RecordType::AAAA));
    }

    /// A DNS server on loopback (UDP and TCP on one port) answering with
    /// `answer`; over UDP it says TC when `truncate_udp`.
    async fn server(answer: &'static str, truncate_udp: bool) -> SocketAddrV4 {
        let udp = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let std::net::SocketAddr::V4(addr) = udp.local_addr().expect("addr") else {
            panic!("v4");
        };
        let tcp = TcpListener::bind(addr).await.expect("bind tcp");
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            while let Ok((n, peer)) = udp.recv_from(&mut buf).await {
                let r = if truncate_udp {
                    reply(&buf[..n], ResponseCode::NoError, &[], true)
                } else {
                    reply(&buf[..n], ResponseCode::NoError, &[answer], false)
                };
                let _ = udp.send_to(&r, peer).await;
            }
        });
        tokio::spawn(async move {
            while let Ok((mut s, _)) = tcp.accept().await {
                let Ok(len) = s.read_u16().await else {
                    continue;
                };
                let mut q = vec![0u8; usize::from(len)];
                if s.read_exact(&mut q).await.is_err() {
                    continue;
                }
                let r = reply(&q, ResponseCode::NoError, &[answer, answer], false);
                let mut framed = u16::try_from(r.len()).expect("len").to_be_bytes().to_vec();
                framed.extend_from_slice(&r);
                let _ = s.write_all(&framed).await;
            }
        });
        addr
    }

    #[tokio::test]
    async fn udp_tcp_and_the_tcp_fallback_on_truncation() {
        let c = check(DnsRcode::NoError, Some("198.19.0.11"));
        let addr = server("198.19.0.11", false).await;
        assert_eq!(probe(addr, &c, T).await, Ok(()));
        let tcp = DnsCheck {
            transport: DnsTransport::Tcp,
            ..c.clone()
        };
        assert_eq!(probe(addr, &tcp, T).await, Ok(()));
        // Truncated over UDP: the TCP answer decides.
        let addr = server("198.19.0.11", true).await;
        assert_eq!(probe(addr, &c, T).await, Ok(()));
        let addr = server("198.19.0.99", true).await;
        assert_eq!(
            probe(addr, &c, T).await,
            Err(format!(
                "{addr}: www.foobar.com. A: 198.19.0.99, 198.19.0.99, expected 198.19.0.11"
            ))
        );
    }

    #[tokio::test]
    async fn a_closed_port_fails_at_once_and_a_silent_one_times_out() {
        let c = check(DnsRcode::NoError, None);
        let silent = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let std::net::SocketAddr::V4(addr) = silent.local_addr().expect("addr") else {
            panic!("v4");
        };
        assert_eq!(
            probe(addr, &c, Duration::from_millis(200)).await,
            Err(format!("no reply from {addr} within 200ms"))
        );
        drop(silent);
        let start = std::time::Instant::now();
        assert_eq!(
            probe(addr, &c, Duration::from_secs(5)).await,
            Err(format!(
                "reply from {addr}: ICMP port unreachable (nothing listens)"
            ))
        );
        assert!(start.elapsed() < Duration::from_secs(1));
        let tcp = DnsCheck {
            transport: DnsTransport::Tcp,
            ..c
        };
        assert_eq!(
            probe(addr, &tcp, T).await,
            Err(format!("connect {addr} (tcp): connection refused"))
        );
    }

    #[test]
    fn dns_checks_are_read_and_checked_like_the_rest_of_the_file() {
        use crate::config::{self, CheckKind};
        let site = |health: &str| {
            format!(
                "[dataplane]\ninterfaces = [\"lb-front\"]\n\n[[service]]\nname = \"dns\"\n\
                 vip = \"198.18.0.10:53\"\nprotocol = \"udp\"\nhealth = {{ check = \"dns\", {health} }}\n\
                 backends = [ {{ address = \"198.19.0.11:53\" }} ]\n"
            )
        };
        let parse = |h: &str| config::parse(&site(h), std::path::Path::new("c.toml"));
        let cfg = parse(r#"query-name = "www.foobar.com", expect-answer = "198.19.0.11""#)
            .expect("valid");
        let Some(CheckKind::Dns(d)) = cfg.services[0].health.as_ref().map(|h| &h.check) else {
            panic!("not a dns check");
        };
        assert_eq!(d, &check(DnsRcode::NoError, Some("198.19.0.11")));
        assert_eq!(
            config::check(&cfg, std::path::Path::new("x")).expect("check"),
            cfg
        );
        let soa = parse(
            r#"query-name = "foobar.com.", query-type = "soa", transport = "tcp", expect-rcode = "nxdomain""#,
        )
        .expect("valid");
        let Some(CheckKind::Dns(d)) = soa.services[0].health.as_ref().map(|h| &h.check) else {
            panic!("not a dns check");
        };
        assert_eq!(
            (d.record_type.as_str(), d.transport, d.expect_rcode),
            ("SOA", DnsTransport::Tcp, DnsRcode::NxDomain)
        );
        assert_eq!(
            config::check(&soa, std::path::Path::new("x")).expect("check"),
            soa
        );
        for (health, want) in [
            (
                "interval = \"1s\"",
                "health.query-name: required key is missing",
            ),
            (
                r#"query-name = "a..b""#,
                "health.query-name: not a DNS name",
            ),
            (
                r#"query-name = ".""#,
                "health.query-name: give a name below the root",
            ),
            (
                r#"query-name = "a.b", query-type = "AXFR""#,
                "health.query-type: not a record type to query",
            ),
            (
                r#"query-name = "a.b", query-type = "BOGUS""#,
                "health.query-type: not a record type to query",
            ),
            (
                r#"query-name = "a.b", transport = "quic""#,
                "health.transport: must be \"udp\"",
            ),
            (
                r#"query-name = "a.b", expect-rcode = "OK""#,
                "health.expect-rcode: must be one of NOERROR, FORMERR, SERVFAIL",
            ),
            (
                r#"query-name = "a.b", expect-answer = "web1""#,
                "health.expect-answer: not A record data",
            ),
            (
                r#"query-name = "a.b", expect-rcode = "NXDOMAIN", expect-answer = "1.2.3.4""#,
                "health.expect-answer: an answer comes with NOERROR",
            ),
            (
                r#"query-name = "a.b", send = "x""#,
                "health.send: only valid with check = \"udp\"",
            ),
        ] {
            let err = parse(health).expect_err(health).to_string();
            assert!(err.contains(want), "{health}: {err}");
        }
        let tcp = site("interval = \"1s\"").replace(
            r#"check = "dns", interval"#,
            r#"check = "tcp", query-name = "a.b", interval"#,
        );
        let err = config::parse(&tcp, std::path::Path::new("c.toml"))
            .expect_err("query-name on tcp")
            .to_string();
        assert!(
            err.contains("health.query-name: only valid with check = \"dns\""),
            "{err}"
        );
    }
}
