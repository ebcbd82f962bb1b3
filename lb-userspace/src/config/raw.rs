//! The raw config: exactly the TOML shape, and a validated config turned
//! back into it (for [`check`](super::check)).

use serde::{Deserialize, Deserializer, de::IntoDeserializer};

use super::{
    Backend, CheckKind, Config, DnsTransport, Forwarding, HealthCheck, OnBackendDown, Protocol,
    RateLimit, SOURCE_IP_WHOLE, Scheduler, Service, UdpExpect, XdpMode, duration,
};

// ---------------------------------------------------------------------------
// Raw layer: exactly the TOML shape. Every field is optional so that a missing
// key is reported by the validator with its full path (serde's "missing field"
// would only name the field, not which service or backend lacks it). Integers
// are i64 (TOML's integer type) so that out-of-range values get our range
// message instead of a serde type error. The container renames keep serde's
// "expected struct ..." messages in the config's vocabulary.
// ---------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", rename = "config")]
pub(super) struct RawConfig {
    pub(super) dataplane: Option<RawDataplane>,
    pub(super) monitoring: Option<RawMonitoring>,
    pub(super) firewall: Option<RawFirewall>,
    pub(super) announce: Option<RawAnnounce>,
    pub(super) coordination: Option<super::coordination::RawCoordination>,
    pub(super) sync: Option<super::sync::RawSync>,
    pub(super) service: Option<Vec<RawService>>,
    /// `[[pool]]`: database pools (config/pool.rs).
    pub(super) pool: Option<Vec<super::pool::RawPool>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", rename = "announce")]
pub(super) struct RawAnnounce {
    pub(super) bird_socket: Option<String>,
    pub(super) include: Option<String>,
    pub(super) med: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", rename = "firewall")]
pub(super) struct RawFirewall {
    pub(super) deny: Option<Vec<String>>,
    pub(super) allow: Option<Vec<String>>,
    pub(super) rate_limit: Option<RawRateLimit>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", rename = "rate-limit")]
pub(super) struct RawRateLimit {
    pub(super) new_flows_per_second: Option<i64>,
    pub(super) burst: Option<i64>,
    pub(super) per: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", rename = "monitoring")]
pub(super) struct RawMonitoring {
    pub(super) listen: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", rename = "dataplane")]
pub(super) struct RawDataplane {
    pub(super) interfaces: Option<Vec<String>>,
    pub(super) forwarding: Option<Forwarding>,
    pub(super) xdp_mode: Option<XdpMode>,
    pub(super) conntrack_size: Option<i64>,
    pub(super) half_open_size: Option<i64>,
    pub(super) new_flow_budget: Option<i64>,
    pub(super) timeouts: Option<RawTimeouts>,
    pub(super) tunnel_source: Option<String>,
    pub(super) tunnel_source6: Option<String>,
    pub(super) gue_port: Option<i64>,
    pub(super) source_addresses: Option<Vec<String>>,
    pub(super) source_ports: Option<String>,
    pub(super) source_port_quarantine: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", rename = "timeouts")]
pub(super) struct RawTimeouts {
    pub(super) tcp: Option<String>,
    pub(super) tcp_closing: Option<String>,
    pub(super) tcp_half_open: Option<String>,
    pub(super) udp: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", rename = "service")]
pub(super) struct RawService {
    pub(super) name: Option<String>,
    pub(super) vip: Option<String>,
    pub(super) protocol: Option<Protocol>,
    pub(super) forwarding: Option<Forwarding>,
    pub(super) scheduler: Option<RawScheduler>,
    pub(super) maglev_table_size: Option<i64>,
    pub(super) source_ip_prefix: Option<i64>,
    pub(super) health: Option<RawHealth>,
    pub(super) on_backend_down: Option<OnBackendDown>,
    pub(super) backends: Option<Vec<RawBackend>>,
    pub(super) allow_from: Option<Vec<String>>,
    pub(super) deny_from: Option<Vec<String>>,
    pub(super) rate_limit: Option<RawRateLimit>,
    pub(super) max_connections: Option<i64>,
    pub(super) slow_start: Option<String>,
    pub(super) proxy_protocol: Option<super::ProxyProtocol>,
}

/// `scheduler`: a [`Scheduler`], except that the retired `source-hash` gets
/// an error saying what replaced it instead of serde's list of names.
pub(super) struct RawScheduler(pub(super) Scheduler);

/// Why `source-hash` is rejected, and what to write instead.
pub(super) const SOURCE_HASH_RENAMED: &str = "\"source-hash\" is no longer a scheduler: \
     it hashed the whole 5-tuple, so one client's connections went to every backend. \
     Use \"flow-hash\" for that same behaviour, or \"source-ip\" for client affinity \
     (every connection from one client address to one backend)";

impl<'de> Deserialize<'de> for RawScheduler {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let name = String::deserialize(d)?;
        if name == "source-hash" {
            return Err(D::Error::custom(SOURCE_HASH_RENAMED));
        }
        let known: Result<Scheduler, serde::de::value::Error> =
            Scheduler::deserialize(name.as_str().into_deserializer());
        known.map(RawScheduler).map_err(D::Error::custom)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", rename = "health")]
pub(super) struct RawHealth {
    pub(super) check: Option<RawCheck>,
    pub(super) port: Option<i64>,
    pub(super) path: Option<String>,
    pub(super) expect_status: Option<i64>,
    pub(super) expect_body: Option<String>,
    pub(super) interval: Option<String>,
    pub(super) timeout: Option<String>,
    pub(super) rise: Option<i64>,
    pub(super) fall: Option<i64>,
    /// `check = "mysql"`: the login, and its password (inline or in a file).
    pub(super) user: Option<String>,
    pub(super) password: Option<String>,
    pub(super) password_file: Option<String>,
    /// `check = "udp"`: the payload (text or hex) and the expected reply.
    pub(super) send: Option<String>,
    pub(super) send_hex: Option<String>,
    pub(super) expect: Option<String>,
    pub(super) expect_hex: Option<String>,
    pub(super) expect_regex: Option<String>,
    /// `check = "tls"`: the server name and the CA to verify against.
    pub(super) sni: Option<String>,
    pub(super) ca_file: Option<String>,
    /// `check = "dns"`: the query and what its reply must say.
    pub(super) query_name: Option<String>,
    pub(super) query_type: Option<String>,
    pub(super) transport: Option<String>,
    pub(super) expect_rcode: Option<String>,
    pub(super) expect_answer: Option<String>,
    /// Probe through the VIP, as a client's flow arrives (config/health.rs).
    pub(super) through_vip: Option<bool>,
}

#[derive(Clone, Copy, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(super) enum RawCheck {
    Tcp,
    Http,
    Mysql,
    Udp,
    Tls,
    Dns,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", rename = "backend")]
pub(super) struct RawBackend {
    pub(super) address: Option<String>,
    pub(super) name: Option<String>,
    pub(super) weight: Option<i64>,
    pub(super) backup: Option<bool>,
    pub(super) health: Option<RawHealth>,
    pub(super) max_connections: Option<i64>,
}

// A validated config back in the raw shape, for `check`.

impl From<&Config> for RawConfig {
    fn from(cfg: &Config) -> Self {
        let d = &cfg.dataplane;
        RawConfig {
            dataplane: Some(RawDataplane {
                interfaces: Some(d.interfaces.clone()),
                forwarding: Some(d.forwarding),
                xdp_mode: Some(d.xdp_mode),
                conntrack_size: Some(i64::from(d.conntrack_size)),
                half_open_size: Some(i64::from(d.half_open_size)),
                new_flow_budget: Some(i64::from(d.new_flow_budget)),
                timeouts: Some(RawTimeouts {
                    tcp: Some(duration::show(d.timeouts.tcp)),
                    tcp_closing: Some(duration::show(d.timeouts.tcp_closing)),
                    tcp_half_open: Some(duration::show(d.timeouts.tcp_half_open)),
                    udp: Some(duration::show(d.timeouts.udp)),
                }),
                tunnel_source: d.tunnel_source.map(|a| a.to_string()),
                tunnel_source6: d.tunnel_source6.map(|a| a.to_string()),
                gue_port: Some(i64::from(d.gue_port)),
                source_addresses: Some(
                    d.full_nat.addresses.iter().map(|a| a.to_string()).collect(),
                ),
                source_ports: Some(d.full_nat.ports_text()),
                source_port_quarantine: Some(crate::config::duration::show(d.full_nat.quarantine)),
            }),
            monitoring: cfg.monitoring.as_ref().map(|m| RawMonitoring {
                listen: Some(m.listen.to_string()),
            }),
            firewall: (!cfg.firewall.is_empty()).then(|| RawFirewall {
                deny: Some(cfg.firewall.deny_texts()),
                allow: Some(cfg.firewall.allow_texts()),
                rate_limit: cfg.firewall.rate_limit.as_ref().map(RawRateLimit::from),
            }),
            announce: cfg.announce.as_ref().map(|a| RawAnnounce {
                bird_socket: Some(a.bird_socket.display().to_string()),
                include: Some(a.include.display().to_string()),
                med: Some(i64::from(a.med)),
            }),
            coordination: cfg.coordination.as_ref().map(Into::into),
            sync: cfg.sync.as_ref().map(Into::into),
            // A pool's services come back from the pool, not as services.
            service: Some(
                cfg.services
                    .iter()
                    .filter(|s| !cfg.pools.iter().any(|p| p.owns_service(&s.name)))
                    .map(RawService::from)
                    .collect(),
            ),
            pool: (!cfg.pools.is_empty())
                .then(|| cfg.pools.iter().map(super::pool::RawPool::from).collect()),
        }
    }
}

impl From<&Service> for RawService {
    fn from(s: &Service) -> Self {
        RawService {
            name: Some(s.name.clone()),
            vip: Some(s.vip.to_string()),
            protocol: Some(s.protocol),
            forwarding: Some(s.forwarding),
            scheduler: Some(RawScheduler(s.scheduler)),
            maglev_table_size: s
                .scheduler
                .uses_maglev()
                .then_some(i64::from(s.maglev_table_size)),
            source_ip_prefix: (s.source_ip_prefix != SOURCE_IP_WHOLE)
                .then_some(i64::from(s.source_ip_prefix)),
            health: s.health.as_ref().map(RawHealth::from),
            on_backend_down: Some(s.on_backend_down),
            backends: Some(s.backends.iter().map(RawBackend::from).collect()),
            allow_from: Some(s.firewall.allow_texts()),
            deny_from: Some(s.firewall.deny_texts()),
            rate_limit: s.firewall.rate_limit.as_ref().map(RawRateLimit::from),
            max_connections: s.limits.max_connections.map(i64::from),
            slow_start: s.limits.slow_start.map(duration::show),
            proxy_protocol: s.proxy_protocol,
        }
    }
}

impl From<&RateLimit> for RawRateLimit {
    fn from(r: &RateLimit) -> Self {
        RawRateLimit {
            new_flows_per_second: Some(i64::from(r.new_flows_per_second)),
            burst: Some(i64::from(r.burst)),
            per: Some(r.per_text()),
        }
    }
}

impl From<&Backend> for RawBackend {
    fn from(b: &Backend) -> Self {
        RawBackend {
            address: Some(b.address.to_string()),
            // An unnamed backend is named after its address, which is not a
            // valid explicit name (it has a ':'); leave it unnamed again.
            name: (b.name != b.address.to_string()).then(|| b.name.clone()),
            weight: Some(i64::from(b.weight)),
            backup: Some(b.backup),
            health: b.health.as_ref().map(RawHealth::from),
            max_connections: b.max_connections.map(i64::from),
        }
    }
}

impl From<&HealthCheck> for RawHealth {
    fn from(h: &HealthCheck) -> Self {
        let mut login = (None, None, None);
        let mut udp = (None, None, None);
        let mut tls = (None, None);
        let mut dns = (None, None, None, None, None);
        let (check, path, expect_status, expect_body) = match &h.check {
            CheckKind::Tcp => (RawCheck::Tcp, None, None, None),
            CheckKind::Udp(u) => {
                let hex = |b: &[u8]| data_encoding::HEXLOWER.encode(b);
                udp = (
                    Some(hex(&u.send)),
                    match &u.expect {
                        UdpExpect::Prefix(p) => Some(hex(p)),
                        _ => None,
                    },
                    match &u.expect {
                        UdpExpect::Regex(r) => Some(r.clone()),
                        _ => None,
                    },
                );
                (RawCheck::Udp, None, None, None)
            }
            CheckKind::Tls(t) => {
                tls = (
                    t.sni.clone(),
                    t.ca.as_ref().map(|(path, _)| path.display().to_string()),
                );
                (RawCheck::Tls, None, None, None)
            }
            CheckKind::Dns(d) => {
                dns = (
                    Some(d.name.clone()),
                    Some(d.record_type.clone()),
                    Some(
                        match d.transport {
                            DnsTransport::Udp => "udp",
                            DnsTransport::Tcp => "tcp",
                        }
                        .to_owned(),
                    ),
                    Some(d.expect_rcode.name().to_owned()),
                    d.expect_answer.clone(),
                );
                (RawCheck::Dns, None, None, None)
            }
            CheckKind::Mysql(l) => {
                login = (
                    Some(l.user.clone()),
                    l.password_file
                        .is_none()
                        .then(|| l.password.expose().to_owned()),
                    l.password_file.as_ref().map(|f| f.display().to_string()),
                );
                (RawCheck::Mysql, None, None, None)
            }
            CheckKind::Http {
                path,
                expect_status,
                expect_body,
            } => (
                RawCheck::Http,
                Some(path.clone()),
                Some(i64::from(*expect_status)),
                expect_body.clone(),
            ),
        };
        RawHealth {
            check: Some(check),
            port: h.port.map(i64::from),
            path,
            expect_status,
            expect_body,
            interval: Some(duration::show(h.interval)),
            timeout: Some(duration::show(h.timeout)),
            rise: Some(i64::from(h.rise)),
            fall: Some(i64::from(h.fall)),
            user: login.0,
            password: login.1,
            password_file: login.2,
            send: None,
            send_hex: udp.0,
            expect: None,
            expect_hex: udp.1,
            expect_regex: udp.2,
            sni: tls.0,
            ca_file: tls.1,
            query_name: dns.0,
            query_type: dns.1,
            transport: dns.2,
            expect_rcode: dns.3,
            expect_answer: dns.4,
            through_vip: h.through_vip.then_some(true),
        }
    }
}
