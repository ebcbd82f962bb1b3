//! `[[pool]]`: a database pool. Its members are MySQL/MariaDB servers
//! checked with `check = "mysql"`; the pool becomes two services, a write
//! service on `write-vip` (routing to the one current primary) and a read
//! service on `read-vip` (spreading over replicas that replicate within
//! `max-lag`). The services are ordinary services from the data plane's
//! point of view: the agent (`crate::db`) decides which members are in
//! their rings. Their firewall keys are a `[[service]]`'s: `allow-from`,
//! `deny-from` and `rate-limit` on the pool apply to both services, the
//! same keys in `write = { … }` or `read = { … }` to one of them.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use serde::Deserialize;

use super::{
    Backend, CheckKind, Firewall, HealthCheck, MysqlLogin, OnBackendDown, Protocol, Scheduler,
    Secret, Service, duration,
    raw::{RawHealth, RawRateLimit},
    validate::{Validator, name_problem},
};

const DEFAULT_MAX_LAG: Duration = Duration::from_secs(5);
/// Longest `max-lag` and `auto-failover`: a day (a replica a day behind is
/// not a read replica; a primary down a day is not waiting for failover).
const POOL_DURATION_MAX: Duration = Duration::from_secs(24 * 3600);
const MEMBER_EXAMPLE: &str = "198.19.1.21:3306";
const DB_VIP_EXAMPLE: &str = "198.18.0.20:3306";
/// The longest password file read (a password is a line).
const PASSWORD_FILE_MAX: u64 = 4096;

/// A validated `[[pool]]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Pool {
    pub name: String,
    /// The write service's VIP: routes to the current primary only.
    pub write_vip: SocketAddr,
    /// The read service's VIP: spreads over qualifying replicas.
    pub read_vip: SocketAddr,
    pub members: Vec<PoolMember>,
    /// The members' check: always `check = "mysql"`.
    pub health: HealthCheck,
    /// The login of `health`, for probes, promotion and fencing.
    pub login: MysqlLogin,
    /// A replica lagging more than this leaves the read service.
    pub max_lag: Duration,
    /// With no replica qualifying, reads go to the primary.
    pub primary_fallback: bool,
    /// Promote the most caught-up replica once the primary has been down
    /// this long; `None`: promotion only by `lb db promote`.
    pub auto_failover: Option<Duration>,
    /// A member that is back but replicates from nobody (or from another
    /// member than the primary) is pointed at the primary by GTID, if its
    /// history is a subset of the primary's (`auto-rejoin`).
    pub auto_rejoin: bool,
    /// The write service's firewall rules (the pool's own and `write`'s).
    pub write_firewall: Firewall,
    /// The read service's firewall rules (the pool's own and `read`'s).
    pub read_firewall: Firewall,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolMember {
    pub name: String,
    pub address: SocketAddr,
}

impl Pool {
    /// Name of the pool's write service: `{pool}-write`.
    pub fn write_service(&self) -> String {
        format!("{}-write", self.name)
    }

    /// Name of the pool's read service: `{pool}-read`.
    pub fn read_service(&self) -> String {
        format!("{}-read", self.name)
    }

    pub fn owns_service(&self, service: &str) -> bool {
        service == self.write_service() || service == self.read_service()
    }

    /// The firewall rules of the pool's service named `service`.
    pub fn firewall_of_mut(&mut self, service: &str) -> Option<&mut Firewall> {
        if service == self.write_service() {
            Some(&mut self.write_firewall)
        } else if service == self.read_service() {
            Some(&mut self.read_firewall)
        } else {
            None
        }
    }

    pub fn member(&self, name: &str) -> Option<&PoolMember> {
        self.members.iter().find(|m| m.name == name)
    }

    /// The two services the pool feeds: write, then read. Every member is a
    /// backend of both; the agent admits them by role. Flows on the write
    /// service are dropped when their member stops being the primary
    /// (fencing); reads on a replica that leaves the read set finish.
    /// Always NAT: database servers do not hold the VIPs (DSR would need
    /// them on every member's loopback, and a promotion moves roles). Of
    /// either family, VIPs and members alike (NAT66 for IPv6), which the
    /// data plane balances in both.
    fn services(&self) -> [Service; 2] {
        let forwarding = super::Forwarding::Nat;
        let backends: Vec<Backend> = self
            .members
            .iter()
            .map(|m| Backend {
                name: m.name.clone(),
                address: m.address,
                weight: 1,
                backup: false,
                health: None,
                max_connections: None,
            })
            .collect();
        let service =
            |name: String, vip: SocketAddr, on_backend_down, firewall: &Firewall| Service {
                name,
                vip,
                protocol: Protocol::Tcp,
                forwarding,
                scheduler: Scheduler::RoundRobin,
                // Round robin: the Maglev table size is not used.
                maglev_table_size: lb_common::maglev::MAGLEV_DEFAULT_SIZE,
                source_ip_prefix: lb_common::maps6::SOURCE_PREFIX_WHOLE,
                health: None,
                on_backend_down,
                backends: backends.clone(),
                firewall: firewall.clone(),
                limits: Default::default(),
                proxy_protocol: None,
            };
        [
            service(
                self.write_service(),
                self.write_vip,
                OnBackendDown::DropFlows,
                &self.write_firewall,
            ),
            service(
                self.read_service(),
                self.read_vip,
                OnBackendDown::KeepFlows,
                &self.read_firewall,
            ),
        ]
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", rename = "pool")]
pub(super) struct RawPool {
    name: Option<String>,
    write_vip: Option<String>,
    read_vip: Option<String>,
    members: Option<Vec<RawMember>>,
    health: Option<RawHealth>,
    max_lag: Option<String>,
    primary_fallback: Option<bool>,
    auto_failover: Option<String>,
    auto_rejoin: Option<bool>,
    allow_from: Option<Vec<String>>,
    deny_from: Option<Vec<String>>,
    rate_limit: Option<RawRateLimit>,
    write: Option<RawPoolService>,
    read: Option<RawPoolService>,
}

/// `write = { … }` / `read = { … }`: firewall keys of one of the pool's
/// services, on top of the pool's own.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", rename = "write")]
struct RawPoolService {
    allow_from: Option<Vec<String>>,
    deny_from: Option<Vec<String>>,
    rate_limit: Option<RawRateLimit>,
}

impl From<&Firewall> for RawPoolService {
    fn from(f: &Firewall) -> Self {
        RawPoolService {
            allow_from: Some(f.allow_texts()),
            deny_from: Some(f.deny_texts()),
            rate_limit: f.rate_limit.as_ref().map(RawRateLimit::from),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", rename = "member")]
struct RawMember {
    name: Option<String>,
    address: Option<String>,
}

impl From<&Pool> for RawPool {
    fn from(p: &Pool) -> Self {
        RawPool {
            name: Some(p.name.clone()),
            write_vip: Some(p.write_vip.to_string()),
            read_vip: Some(p.read_vip.to_string()),
            members: Some(
                p.members
                    .iter()
                    .map(|m| RawMember {
                        name: Some(m.name.clone()),
                        address: Some(m.address.to_string()),
                    })
                    .collect(),
            ),
            health: Some(RawHealth::from(&p.health)),
            max_lag: Some(duration::show(p.max_lag)),
            primary_fallback: Some(p.primary_fallback),
            auto_failover: p.auto_failover.map(duration::show),
            auto_rejoin: Some(p.auto_rejoin),
            // Each service's rules whole (the pool's shared ones included).
            allow_from: None,
            deny_from: None,
            rate_limit: None,
            write: (!p.write_firewall.is_empty()).then(|| RawPoolService::from(&p.write_firewall)),
            read: (!p.read_firewall.is_empty()).then(|| RawPoolService::from(&p.read_firewall)),
        }
    }
}

impl Validator<'_> {
    /// Every `[[pool]]`, its two services appended to `services` (after
    /// the `[[service]]` ones, checked against them for names and VIPs).
    pub(super) fn pools(
        &self,
        raw: Vec<RawPool>,
        services: &mut Vec<Service>,
    ) -> Result<Vec<Pool>, super::ConfigError> {
        let mut pools: Vec<Pool> = Vec::with_capacity(raw.len());
        for (i, raw_pool) in raw.into_iter().enumerate() {
            let pool = self.pool(i, raw_pool, &pools)?;
            for service in pool.services() {
                let field = if service.vip == pool.write_vip {
                    "write-vip"
                } else {
                    "read-vip"
                };
                if let Some(other) = services.iter().find(|s| s.name == service.name) {
                    return Err(self.err(
                        format!("pool[{i}].name"),
                        format!(
                            "the pool's service {:?} is already a service's name",
                            other.name
                        ),
                    ));
                }
                if let Some(other) = services
                    .iter()
                    .find(|s| s.vip == service.vip && s.protocol == Protocol::Tcp)
                {
                    return Err(self.err(
                        format!("pool[{i}].{field}"),
                        format!("{}/tcp is already used by {:?}", service.vip, other.name),
                    ));
                }
                services.push(service);
            }
            pools.push(pool);
        }
        if services.len() > lb_common::MAX_SERVICES as usize {
            return Err(self.err(
                "pool",
                format!(
                    "{} services with the pools' (two each), but the data plane holds at most {}",
                    services.len(),
                    lb_common::MAX_SERVICES
                ),
            ));
        }
        Ok(pools)
    }

    fn pool(&self, i: usize, raw: RawPool, earlier: &[Pool]) -> Result<Pool, super::ConfigError> {
        let key = |field: &str| format!("pool[{i}].{field}");
        let name = self.unique_name(
            raw.name,
            &key("name"),
            "pool",
            earlier.iter().map(|p| p.name.as_str()),
        )?;
        let write_text = self.required(raw.write_vip, &key("write-vip"))?;
        let write_vip = self.vip(&write_text, &key("write-vip"), DB_VIP_EXAMPLE)?;
        let read_text = self.required(raw.read_vip, &key("read-vip"))?;
        let read_vip = self.vip(&read_text, &key("read-vip"), DB_VIP_EXAMPLE)?;
        // Both VIPs and every member of one family, as a service's.
        self.same_family(read_vip, write_vip, &key("read-vip"))?;
        if read_vip == write_vip {
            return Err(self.err(
                key("read-vip"),
                format!("{read_vip} is also the write-vip: reads and writes need their own VIPs"),
            ));
        }

        let raw_members = self.required(raw.members, &key("members"))?;
        if raw_members.is_empty() {
            return Err(self.err(key("members"), "at least one member is required"));
        }
        let mut members: Vec<PoolMember> = Vec::with_capacity(raw_members.len());
        for (j, m) in raw_members.into_iter().enumerate() {
            let mkey = |field: &str| format!("pool[{i}].members[{j}].{field}");
            let name = self.required(m.name, &mkey("name"))?;
            if let Some(reason) = name_problem(&name) {
                return Err(self.err(mkey("name"), reason));
            }
            let text = self.required(m.address, &mkey("address"))?;
            let address = self.socket_addr(&text, &mkey("address"), MEMBER_EXAMPLE)?;
            self.same_family(address, write_vip, &mkey("address"))?;
            if let Some(k) = members.iter().position(|o| o.name == name) {
                return Err(self.err(
                    mkey("name"),
                    format!("duplicate member name, already used by members[{k}]"),
                ));
            }
            if address == write_vip || address == read_vip {
                return Err(self.err(
                    mkey("address"),
                    format!(
                        "{address} is one of the pool's own VIPs: forwarding to it would \
                         send every packet back to the load balancer (a loop)"
                    ),
                ));
            }
            if let Some(k) = members.iter().position(|o| o.address == address) {
                return Err(self.err(
                    mkey("address"),
                    format!("{address} is already members[{k}]"),
                ));
            }
            members.push(PoolMember { name, address });
        }

        let raw_health = self.required(raw.health, &key("health"))?;
        let health = self.health(&key("health"), raw_health)?;
        let CheckKind::Mysql(login) = &health.check else {
            return Err(self.err(
                key("health.check"),
                "a pool's members are checked with check = \"mysql\" (the role comes from it)",
            ));
        };
        let login = login.clone();

        let duration = |value: Option<String>, field: &str| match value {
            None => Ok(None),
            Some(text) => duration::parse_at_most(&text, POOL_DURATION_MAX, "a day")
                .map(Some)
                .map_err(|reason| self.err(key(field), reason)),
        };
        let max_lag = duration(raw.max_lag, "max-lag")?.unwrap_or(DEFAULT_MAX_LAG);
        let auto_failover = duration(raw.auto_failover, "auto-failover")?;

        let shared = self.service_firewall(
            &format!("pool[{i}]"),
            raw.deny_from,
            raw.allow_from,
            raw.rate_limit,
        )?;
        let write_firewall = self.pool_service_firewall(i, "write", &shared, raw.write)?;
        let read_firewall = self.pool_service_firewall(i, "read", &shared, raw.read)?;
        Ok(Pool {
            name,
            write_vip,
            read_vip,
            members,
            health,
            login,
            max_lag,
            primary_fallback: raw.primary_fallback.unwrap_or(true),
            auto_failover,
            auto_rejoin: raw.auto_rejoin.unwrap_or(false),
            write_firewall,
            read_firewall,
        })
    }

    /// The rules of the pool's `which` service ("write" or "read"): the
    /// pool's `shared` ones, then its own table's, checked as one scope
    /// (no prefix twice, none in both lists, one rate limit).
    fn pool_service_firewall(
        &self,
        i: usize,
        which: &str,
        shared: &Firewall,
        own: Option<RawPoolService>,
    ) -> Result<Firewall, super::ConfigError> {
        let Some(own) = own else {
            return Ok(shared.clone());
        };
        let key = |field: &str| format!("pool[{i}].{which}.{field}");
        let own = self.service_firewall(
            &format!("pool[{i}].{which}"),
            own.deny_from,
            own.allow_from,
            own.rate_limit,
        )?;
        let mut merged = shared.clone();
        let (deny, allow) = (("deny-from", "allow-from"), ("allow-from", "deny-from"));
        self.merge_list(i, which, deny, &own.deny, &mut merged.deny, &shared.allow)?;
        self.merge_list(i, which, allow, &own.allow, &mut merged.allow, &shared.deny)?;
        self.merge_list(
            i,
            which,
            deny,
            &own.deny6,
            &mut merged.deny6,
            &shared.allow6,
        )?;
        self.merge_list(
            i,
            which,
            allow,
            &own.allow6,
            &mut merged.allow6,
            &shared.deny6,
        )?;
        if let Some(r) = own.rate_limit {
            if shared.rate_limit.is_some() {
                return Err(self.err(
                    key("rate-limit"),
                    format!(
                        "pool[{i}].rate-limit already limits both services: give the \
                         {which} service's limit in one place"
                    ),
                ));
            }
            merged.rate_limit = Some(r);
        }
        Ok(merged)
    }

    /// The pool's `which` service's own `field` list (of one family) into
    /// the shared one, `into`: no prefix twice, none also in the shared
    /// `other_field` list, `other`.
    fn merge_list<P: PartialEq + Copy + std::fmt::Display>(
        &self,
        i: usize,
        which: &str,
        (field, other_field): (&str, &str),
        own: &[P],
        into: &mut Vec<P>,
        other: &[P],
    ) -> Result<(), super::ConfigError> {
        let key = format!("pool[{i}].{which}.{field}");
        for (j, p) in own.iter().enumerate() {
            if let Some(k) = into.iter().position(|q| q == p) {
                return Err(self.err(
                    format!("{key}[{j}]"),
                    format!("{p} is already pool[{i}].{field}[{k}] (for both services)"),
                ));
            }
            if let Some(k) = other.iter().position(|q| q == p) {
                return Err(self.err(
                    format!("{key}[{j}]"),
                    format!(
                        "{p} is also pool[{i}].{other_field}[{k}]: a prefix is either \
                         allowed or denied"
                    ),
                ));
            }
            into.push(*p);
        }
        Ok(())
    }

    /// A `check = "mysql"` login: `user`, and exactly one of `password` and
    /// `password-file` (read now, so a missing file is a config error).
    pub(super) fn mysql_login(
        &self,
        prefix: &str,
        user: Option<String>,
        password: Option<String>,
        password_file: Option<String>,
    ) -> Result<MysqlLogin, super::ConfigError> {
        let key = |field: &str| format!("{prefix}.{field}");
        let user = self.required(user, &key("user"))?;
        if user.is_empty() || user.chars().any(char::is_control) {
            return Err(self.err(key("user"), format!("not a usable user name: {user:?}")));
        }
        match (password, password_file) {
            (Some(_), Some(_)) => Err(self.err(
                key("password-file"),
                "give either password or password-file, not both",
            )),
            (None, None) => Err(self.err(
                key("password-file"),
                "required key is missing (or an inline password)",
            )),
            (Some(password), None) => Ok(MysqlLogin {
                user,
                password: Secret::new(password),
                password_file: None,
            }),
            (None, Some(file)) => {
                let path = PathBuf::from(&file);
                let text = read_password(&path)
                    .map_err(|why| self.err(key("password-file"), format!("{file}: {why}")))?;
                Ok(MysqlLogin {
                    user,
                    password: Secret::new(text),
                    password_file: Some(path),
                })
            }
        }
    }
}

/// The first line of a password file, without its line end.
pub(super) fn read_password(path: &std::path::Path) -> Result<String, String> {
    use std::io::Read as _;
    let file = std::fs::File::open(path).map_err(|e| format!("cannot read: {e}"))?;
    let mut text = String::new();
    file.take(PASSWORD_FILE_MAX)
        .read_to_string(&mut text)
        .map_err(|e| format!("cannot read: {e}"))?;
    let line = text.lines().next().unwrap_or_default();
    if line.is_empty() {
        return Err("the file is empty (expected the password on its first line)".to_owned());
    }
    Ok(line.to_owned())
}
