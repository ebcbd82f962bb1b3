//! `[coordination]`: the etcd cluster through which several LBs running
//! the same pools agree on who promotes and on the primary (coord/).

use std::time::Duration;

use serde::Deserialize;

use super::{duration, validate::Validator};

/// `[coordination]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Coordination {
    /// etcd's client URLs, `http://host:port` (tried in turn).
    pub etcd: Vec<String>,
    /// This LB's name in the election; unique among the LBs.
    pub name: String,
    /// The lease's TTL: a dead leader's pools are taken over within about
    /// this long (whole seconds).
    pub lease_ttl: Duration,
}

pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(5);

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "kebab-case",
    rename = "coordination"
)]
pub(super) struct RawCoordination {
    etcd: Option<Vec<String>>,
    name: Option<String>,
    lease_ttl: Option<String>,
}

impl From<&Coordination> for RawCoordination {
    fn from(c: &Coordination) -> RawCoordination {
        RawCoordination {
            etcd: Some(c.etcd.clone()),
            name: Some(c.name.clone()),
            lease_ttl: Some(duration::show(c.lease_ttl)),
        }
    }
}

impl Validator<'_> {
    pub(super) fn coordination(
        &self,
        raw: RawCoordination,
    ) -> Result<Coordination, super::ConfigError> {
        let etcd = self.required(raw.etcd, "coordination.etcd")?;
        if etcd.is_empty() {
            return Err(self.err(
                "coordination.etcd",
                "list at least one etcd endpoint, e.g. \"http://198.18.0.1:2379\"",
            ));
        }
        for (i, e) in etcd.iter().enumerate() {
            let key = format!("coordination.etcd[{i}]");
            let Some(authority) = e.strip_prefix("http://") else {
                return Err(self.err(
                    key,
                    format!("{e:?}: an etcd client URL http://host:port (https is not supported)"),
                ));
            };
            let authority = authority.trim_end_matches('/');
            if authority.parse::<std::net::SocketAddr>().is_err() {
                return Err(self.err(
                    key,
                    format!("{e:?}: expected http://IP:port, e.g. \"http://198.18.0.1:2379\""),
                ));
            }
            if etcd[..i].contains(e) {
                return Err(self.err(key, format!("{e} is listed twice")));
            }
        }
        let name = self.required(raw.name, "coordination.name")?;
        if name.is_empty()
            || name.len() > 64
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        {
            return Err(self.err(
                "coordination.name",
                format!("{name:?}: 1 to 64 letters, digits, '-', '_' or '.' (this LB's name, unique among the LBs)"),
            ));
        }
        let lease_ttl = match raw.lease_ttl {
            None => DEFAULT_LEASE_TTL,
            Some(text) => {
                let d =
                    duration::parse(&text).map_err(|r| self.err("coordination.lease-ttl", r))?;
                if d.subsec_nanos() != 0 || !(2..=60).contains(&d.as_secs()) {
                    return Err(self.err(
                        "coordination.lease-ttl",
                        format!(
                            "{text:?}: whole seconds from 2s to 60s (etcd leases count in seconds)"
                        ),
                    ));
                }
                d
            }
        };
        Ok(Coordination {
            etcd,
            name,
            lease_ttl,
        })
    }
}
