//! A health check (`health = { … }` on a service, a backend or a pool):
//! the validated model ([`HealthCheck`], [`CheckKind`] and each check's
//! settings, [`MysqlLogin`], [`Secret`]) and its validation, where a key
//! of another kind of check is refused rather than ignored.

use std::{fmt, net::SocketAddr, path::PathBuf, time::Duration};

use super::{
    ConfigError, duration,
    raw::{RawCheck, RawHealth},
    validate::Validator,
};

const RISE_FALL_MAX: i64 = 100;
/// Longest health-check `interval` (and so `timeout`): an hour. With
/// `rise`/`fall` at most 100, a first verdict takes at most ~100 hours.
const HEALTH_DURATION_MAX: Duration = Duration::from_secs(3600);
const DEFAULT_INTERVAL: Duration = Duration::from_secs(2);
/// The largest UDP health probe payload (an IPv4 datagram's limit).
const MAX_UDP_PAYLOAD: usize = 65_507;
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
const DEFAULT_RISE: u32 = 2;
const DEFAULT_FALL: u32 = 3;
const DEFAULT_HTTP_PATH: &str = "/";
const DEFAULT_EXPECT_STATUS: u16 = 200;

#[derive(Debug, Clone, PartialEq)]
pub struct HealthCheck {
    pub check: CheckKind,
    /// The port probes go to, on the backend's IP; `None`: the backend's own
    /// port. Lets a UDP service be checked over TCP or HTTP on a sibling
    /// port, or a service on :443 over HTTP on :80.
    pub port: Option<u16>,
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
    /// `through-vip = true`: probes go to the VIP and port, sent to the
    /// backend by the data plane as a client's flow of a DSR service is
    /// (health/through_vip.rs), so a backend passes only if it answers for
    /// the VIP. Not with NAT (a NAT flow reaches the backend's own address,
    /// which a plain check probes) nor with checks other than tcp, http
    /// and udp.
    pub through_vip: bool,
}

impl HealthCheck {
    /// Where probes for a backend at `backend` go: its IP, on
    /// [`port`](Self::port) if set, else on its own port.
    pub fn target(&self, backend: impl Into<SocketAddr>) -> SocketAddr {
        let backend = backend.into();
        SocketAddr::new(backend.ip(), self.port.unwrap_or(backend.port()))
    }

    /// The longest a backend's first verdict can take under this check:
    /// `rise` (or `fall`) probes, `interval` apart, the last one's
    /// `timeout`. Saturating: a config built by hand (not validated) must
    /// not panic the agent either.
    pub fn first_verdict_time(&self) -> Duration {
        self.interval
            .saturating_mul(self.rise.max(self.fall).saturating_sub(1))
            .saturating_add(self.timeout)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum CheckKind {
    Tcp,
    Http {
        path: String,
        expect_status: u16,
        expect_body: Option<String>,
    },
    /// A MySQL handshake and login (and, in a pool, the member's role).
    Mysql(MysqlLogin),
    /// A datagram sent, a reply expected (issue 28).
    Udp(UdpCheck),
    /// A TLS handshake; the certificate's expiry is exported.
    Tls(TlsCheck),
    /// A DNS query, its rcode (and optionally an answer) checked.
    Dns(DnsCheck),
}

/// `check = "dns"`: one DNS query (built and parsed by hickory-proto) for
/// `name`/`record_type`; the reply must carry `expect_rcode` and, if set,
/// an answer record whose data reads `expect_answer`.
#[derive(Debug, Clone, PartialEq)]
pub struct DnsCheck {
    /// The name queried, fully qualified (ends in `.`; checked at load).
    pub name: String,
    /// The record type, upper case (`"A"`, `"AAAA"`, `"SOA"`…; checked).
    pub record_type: String,
    pub transport: DnsTransport,
    /// The rcode the reply must carry (`expect-rcode`, default NOERROR).
    pub expect_rcode: DnsRcode,
    /// An answer record of `record_type` must read this (an address for A
    /// and AAAA, else the record's presentation form).
    pub expect_answer: Option<String>,
}

/// How a DNS probe travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DnsTransport {
    /// UDP, and the same query again over TCP when the reply is truncated.
    Udp,
    /// TCP only.
    Tcp,
}

/// The rcodes a check can expect (RFC 1035's, by their usual names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DnsRcode {
    NoError,
    FormErr,
    ServFail,
    NxDomain,
    NotImp,
    Refused,
}

impl DnsRcode {
    pub const ALL: [(DnsRcode, &'static str, u16); 6] = [
        (DnsRcode::NoError, "NOERROR", 0),
        (DnsRcode::FormErr, "FORMERR", 1),
        (DnsRcode::ServFail, "SERVFAIL", 2),
        (DnsRcode::NxDomain, "NXDOMAIN", 3),
        (DnsRcode::NotImp, "NOTIMP", 4),
        (DnsRcode::Refused, "REFUSED", 5),
    ];

    /// `"NOERROR"`, `"SERVFAIL"`…
    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(r, ..)| *r == self)
            .map_or("?", |(_, name, _)| name)
    }

    /// The wire value.
    pub fn code(self) -> u16 {
        Self::ALL
            .iter()
            .find(|(r, ..)| *r == self)
            .map_or(u16::MAX, |(.., code)| *code)
    }

    /// By name, any case.
    pub fn parse(text: &str) -> Option<DnsRcode> {
        Self::ALL
            .iter()
            .find(|(_, name, _)| name.eq_ignore_ascii_case(text))
            .map(|(r, ..)| *r)
    }
}

/// `check = "tls"`: a TLS handshake (rustls) within the timeout.
#[derive(Debug, Clone, PartialEq)]
pub struct TlsCheck {
    /// The server name sent (SNI) and, with a CA, verified; `None`: no SNI,
    /// and the backend's IP is what a CA-verified certificate must name.
    pub sni: Option<String>,
    /// `ca-file`: verify the chain against these certificates (DER, read
    /// when the config is loaded); `None`: the handshake alone is checked.
    pub ca: Option<(PathBuf, Vec<Vec<u8>>)>,
}

/// `check = "udp"`: send `send`, expect a reply within the timeout that
/// matches `expect`; an ICMP port unreachable fails the probe at once.
#[derive(Debug, Clone, PartialEq)]
pub struct UdpCheck {
    /// The probe's payload (`send` as text or `send-hex`).
    pub send: Vec<u8>,
    pub expect: UdpExpect,
}

/// What a UDP reply must look like.
#[derive(Debug, Clone, PartialEq)]
pub enum UdpExpect {
    /// Any reply.
    Any,
    /// The reply starts with these bytes (`expect` as text or `expect-hex`).
    Prefix(Vec<u8>),
    /// The reply, as UTF-8 text (invalid bytes replaced), matches this
    /// regular expression (`expect-regex`; checked when the config loads).
    Regex(String),
}

impl UdpExpect {
    /// Does `reply` match? The reason when it does not.
    pub fn check(&self, reply: &[u8]) -> Result<(), String> {
        let shown = || {
            let text = String::from_utf8_lossy(reply);
            let cut: String = text.chars().take(40).collect();
            format!(
                "{cut:?}{}",
                if text.chars().count() > 40 { "…" } else { "" }
            )
        };
        match self {
            UdpExpect::Any => Ok(()),
            UdpExpect::Prefix(p) if reply.starts_with(p) => Ok(()),
            UdpExpect::Prefix(p) => Err(format!(
                "reply {} does not start with {:?}",
                shown(),
                String::from_utf8_lossy(p)
            )),
            UdpExpect::Regex(pattern) => match regex::Regex::new(pattern) {
                Ok(re) if re.is_match(&String::from_utf8_lossy(reply)) => Ok(()),
                Ok(_) => Err(format!("reply {} does not match /{pattern}/", shown())),
                Err(e) => Err(format!("expect-regex: {e}")),
            },
        }
    }
}

/// The account health checks (and pool operations) log in with.
#[derive(Debug, Clone, PartialEq)]
pub struct MysqlLogin {
    pub user: String,
    pub password: Secret,
    /// Where the password was read from (`password-file`); `None`: inline.
    pub password_file: Option<PathBuf>,
}

/// A password: never shown by `Debug` (logs, errors, `lb status`).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(text: String) -> Secret {
        Secret(text)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl Validator<'_> {
    pub(super) fn health(
        &self,
        prefix: &str,
        mut raw: RawHealth,
    ) -> Result<HealthCheck, ConfigError> {
        let key = |field: &str| format!("{prefix}.{field}");

        let kind = self.required(raw.check, &key("check"))?;
        // An HTTP-only key on another check would be silently ignored,
        // which hides the mistake of forgetting check = "http".
        if !matches!(kind, RawCheck::Http) {
            self.only_with(
                prefix,
                "http",
                &[
                    ("path", raw.path.is_some()),
                    ("expect-status", raw.expect_status.is_some()),
                    ("expect-body", raw.expect_body.is_some()),
                ],
            )?;
        }
        let check = match kind {
            RawCheck::Tcp => CheckKind::Tcp,
            RawCheck::Http => {
                let path = raw.path.unwrap_or_else(|| DEFAULT_HTTP_PATH.to_owned());
                // The path goes verbatim into the request line; whitespace or
                // control characters would corrupt (or inject into) it.
                if !path.starts_with('/')
                    || path.chars().any(|c| c.is_whitespace() || c.is_control())
                {
                    return Err(self.err(
                        key("path"),
                        format!("must start with '/' and contain no whitespace or control characters, got {path:?}"),
                    ));
                }
                let expect_status = match raw.expect_status {
                    None => DEFAULT_EXPECT_STATUS,
                    Some(s) => self.in_range(s, 100..600, &key("expect-status"))?,
                };
                CheckKind::Http {
                    path,
                    expect_status,
                    expect_body: raw.expect_body,
                }
            }
            RawCheck::Mysql => CheckKind::Mysql(self.mysql_login(
                prefix,
                raw.user.take(),
                raw.password.take(),
                raw.password_file.take(),
            )?),
            RawCheck::Udp => CheckKind::Udp(self.udp_check(prefix, &mut raw)?),
            RawCheck::Tls => CheckKind::Tls(self.tls_check(prefix, &mut raw)?),
            RawCheck::Dns => CheckKind::Dns(self.dns_check(prefix, &mut raw)?),
        };
        // Keys of the DNS, TLS and UDP checks on another check would be
        // silently ignored; so would login keys on a check that never logs in.
        self.only_with(
            prefix,
            "dns",
            &[
                ("query-name", raw.query_name.is_some()),
                ("query-type", raw.query_type.is_some()),
                ("transport", raw.transport.is_some()),
                ("expect-rcode", raw.expect_rcode.is_some()),
                ("expect-answer", raw.expect_answer.is_some()),
            ],
        )?;
        self.only_with(
            prefix,
            "tls",
            &[
                ("sni", raw.sni.is_some()),
                ("ca-file", raw.ca_file.is_some()),
            ],
        )?;
        self.only_with(
            prefix,
            "udp",
            &[
                ("send", raw.send.is_some()),
                ("send-hex", raw.send_hex.is_some()),
                ("expect", raw.expect.is_some()),
                ("expect-hex", raw.expect_hex.is_some()),
                ("expect-regex", raw.expect_regex.is_some()),
            ],
        )?;
        self.only_with(
            prefix,
            "mysql",
            &[
                ("user", raw.user.is_some()),
                ("password", raw.password.is_some()),
                ("password-file", raw.password_file.is_some()),
            ],
        )?;

        let port = match raw.port {
            None => None,
            Some(p) => Some(self.in_range(p, 1..65536, &key("port"))?),
        };

        let duration = |value: Option<String>, field: &str, default: Duration| match value {
            None => Ok(default),
            Some(text) => duration::parse_at_most(
                &text,
                HEALTH_DURATION_MAX,
                "a backend probed less often than hourly is not health-checked",
            )
            .map_err(|reason| self.err(key(field), reason)),
        };
        let interval = duration(raw.interval, "interval", DEFAULT_INTERVAL)?;
        let timeout = duration(raw.timeout, "timeout", DEFAULT_TIMEOUT)?;
        // A probe still pending when the next one is due would overlap it.
        if timeout > interval {
            return Err(self.err(
                key("timeout"),
                format!(
                    "timeout {} must not exceed interval {}",
                    duration::show(timeout),
                    duration::show(interval)
                ),
            ));
        }

        let count = |value: Option<i64>, field: &str, default: u32| -> Result<u32, ConfigError> {
            match value {
                None => Ok(default),
                Some(n) => self.in_range(n, 1..RISE_FALL_MAX + 1, &key(field)),
            }
        };
        let rise = count(raw.rise, "rise", DEFAULT_RISE)?;
        let fall = count(raw.fall, "fall", DEFAULT_FALL)?;

        let through_vip = raw.through_vip.unwrap_or(false);
        if through_vip
            && !matches!(
                check,
                CheckKind::Tcp | CheckKind::Http { .. } | CheckKind::Udp(_)
            )
        {
            return Err(self.err(
                key("through-vip"),
                "only valid with check = \"tcp\", \"http\" or \"udp\" (the probes through \
                 the VIP make their own sockets; the other checks' clients do not)",
            ));
        }
        if through_vip && port.is_some() {
            return Err(self.err(
                key("port"),
                "a check through the VIP probes the service's own port (the VIP's); \
                 remove port or through-vip",
            ));
        }

        Ok(HealthCheck {
            check,
            port,
            interval,
            timeout,
            rise,
            fall,
            through_vip,
        })
    }

    /// `through-vip = true` on a NAT service (or a backend of one) is
    /// refused: its flows reach the backend's own address and port, which
    /// a plain check already probes, and its answers come back from that
    /// address, not the VIP.
    pub(super) fn through_vip_fits(
        &self,
        health_key: &str,
        health: Option<&HealthCheck>,
        forwarding: super::Forwarding,
    ) -> Result<(), ConfigError> {
        if health.is_some_and(|h| h.through_vip) && forwarding == super::Forwarding::Nat {
            return Err(self.err(
                format!("{health_key}.through-vip"),
                "only valid with forwarding = \"dsr\": a NAT service's flows reach the \
                 backend's own address, which a plain check already probes",
            ));
        }
        Ok(())
    }

    /// Refuses the first of `keys` (its name, whether it is set) that is
    /// set: a key of check `check` on another check would be silently
    /// ignored, which hides the mistake of a wrong or missing `check`.
    fn only_with(
        &self,
        prefix: &str,
        check: &str,
        keys: &[(&str, bool)],
    ) -> Result<(), ConfigError> {
        match keys.iter().find(|(_, set)| *set) {
            Some((field, _)) => Err(self.err(
                format!("{prefix}.{field}"),
                format!("only valid with check = \"{check}\""),
            )),
            None => Ok(()),
        }
    }

    /// `check = "udp"`: at most one of `send`/`send-hex` (default: an empty
    /// datagram) and of `expect`/`expect-hex`/`expect-regex` (default: any
    /// reply). Takes the keys it uses out of `raw`.
    fn udp_check(&self, prefix: &str, raw: &mut RawHealth) -> Result<UdpCheck, ConfigError> {
        let key = |field: &str| format!("{prefix}.{field}");
        let hex = |text: String, field: &str| {
            data_encoding::HEXLOWER_PERMISSIVE
                .decode(text.replace([' ', ':'], "").as_bytes())
                .map_err(|e| self.err(key(field), format!("not hex bytes: {e}")))
        };
        let send = match (raw.send.take(), raw.send_hex.take()) {
            (Some(_), Some(_)) => {
                return Err(self.err(key("send-hex"), "give send or send-hex, not both"));
            }
            (Some(text), None) => text.into_bytes(),
            (None, Some(h)) => hex(h, "send-hex")?,
            (None, None) => Vec::new(),
        };
        if send.len() > MAX_UDP_PAYLOAD {
            return Err(self.err(
                key("send"),
                format!("at most {MAX_UDP_PAYLOAD} bytes, got {}", send.len()),
            ));
        }
        let expect = match (
            raw.expect.take(),
            raw.expect_hex.take(),
            raw.expect_regex.take(),
        ) {
            (None, None, None) => UdpExpect::Any,
            (Some(text), None, None) => UdpExpect::Prefix(text.into_bytes()),
            (None, Some(h), None) => UdpExpect::Prefix(hex(h, "expect-hex")?),
            (None, None, Some(pattern)) => {
                regex::Regex::new(&pattern)
                    .map_err(|e| self.err(key("expect-regex"), e.to_string()))?;
                UdpExpect::Regex(pattern)
            }
            _ => {
                return Err(self.err(
                    key("expect"),
                    "give one of expect, expect-hex and expect-regex",
                ));
            }
        };
        Ok(UdpCheck { send, expect })
    }

    /// `check = "tls"`: `sni` a DNS name; `ca-file` an absolute path to PEM
    /// certificates, read now (and at every reload). Takes its keys.
    fn tls_check(&self, prefix: &str, raw: &mut RawHealth) -> Result<TlsCheck, ConfigError> {
        use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject as _};
        let key = |field: &str| format!("{prefix}.{field}");
        let sni = raw.sni.take();
        if let Some(name) = &sni
            && !matches!(
                ServerName::try_from(name.as_str()),
                Ok(ServerName::DnsName(_))
            )
        {
            return Err(self.err(key("sni"), format!("not a DNS name: {name:?}")));
        }
        let ca = match raw.ca_file.take() {
            None => None,
            Some(text) => {
                let path = PathBuf::from(&text);
                if !path.is_absolute() {
                    return Err(self.err(
                        key("ca-file"),
                        format!("must be an absolute path, got {text:?}"),
                    ));
                }
                let certs: Vec<Vec<u8>> = CertificateDer::pem_file_iter(&path)
                    .and_then(|certs| certs.map(|c| c.map(|c| c.to_vec())).collect())
                    .map_err(|e| self.err(key("ca-file"), format!("{}: {e}", path.display())))?;
                if certs.is_empty() {
                    return Err(self.err(
                        key("ca-file"),
                        format!("{}: no PEM certificate in it", path.display()),
                    ));
                }
                Some((path, certs))
            }
        };
        Ok(TlsCheck { sni, ca })
    }

    /// `check = "dns"`: `query-name` (required, a DNS name), `query-type`
    /// (default A), `transport` (udp, the default, or tcp), `expect-rcode`
    /// (default NOERROR) and an optional `expect-answer` (an address for A
    /// and AAAA). Takes the keys it uses out of `raw`.
    fn dns_check(&self, prefix: &str, raw: &mut RawHealth) -> Result<DnsCheck, ConfigError> {
        use hickory_proto::rr::{Name, RecordType};
        let key = |field: &str| format!("{prefix}.{field}");
        let text = self.required(raw.query_name.take(), &key("query-name"))?;
        let mut name = Name::from_ascii(&text)
            .map_err(|e| self.err(key("query-name"), format!("not a DNS name {text:?}: {e}")))?;
        if name.is_root() {
            return Err(self.err(key("query-name"), "give a name below the root"));
        }
        name.set_fqdn(true);
        let record_type = raw.query_type.take().unwrap_or_else(|| "A".to_owned());
        let parsed = record_type
            .to_ascii_uppercase()
            .parse::<RecordType>()
            .ok()
            // Types that are not questions about data (OPT, ANY, AXFR…).
            .filter(|t| {
                !matches!(
                    t,
                    RecordType::ANY | RecordType::AXFR | RecordType::IXFR | RecordType::OPT
                )
            });
        let Some(parsed) = parsed else {
            return Err(self.err(
                key("query-type"),
                format!("not a record type to query: {record_type:?} (e.g. \"A\", \"AAAA\", \"SOA\", \"TXT\")"),
            ));
        };
        let transport = match raw.transport.take().as_deref() {
            None | Some("udp") => DnsTransport::Udp,
            Some("tcp") => DnsTransport::Tcp,
            Some(other) => {
                return Err(self.err(
                    key("transport"),
                    format!("must be \"udp\" (with TCP when truncated) or \"tcp\", got {other:?}"),
                ));
            }
        };
        let expect_rcode = match raw.expect_rcode.take() {
            None => DnsRcode::NoError,
            Some(text) => DnsRcode::parse(&text).ok_or_else(|| {
                let names: Vec<&str> = DnsRcode::ALL.iter().map(|(_, n, _)| *n).collect();
                self.err(
                    key("expect-rcode"),
                    format!("must be one of {}, got {text:?}", names.join(", ")),
                )
            })?,
        };
        let expect_answer = raw.expect_answer.take();
        if let Some(answer) = &expect_answer {
            let valid = match parsed {
                RecordType::A => answer.parse::<std::net::Ipv4Addr>().is_ok(),
                RecordType::AAAA => answer.parse::<std::net::Ipv6Addr>().is_ok(),
                _ => !answer.trim().is_empty(),
            };
            if !valid {
                return Err(self.err(
                    key("expect-answer"),
                    format!("not {parsed} record data: {answer:?}"),
                ));
            }
            if expect_rcode != DnsRcode::NoError {
                return Err(self.err(
                    key("expect-answer"),
                    format!("an answer comes with NOERROR, not {}", expect_rcode.name()),
                ));
            }
        }
        Ok(DnsCheck {
            name: name.to_ascii(),
            record_type: parsed.to_string(),
            transport,
            expect_rcode,
            expect_answer,
        })
    }
}
