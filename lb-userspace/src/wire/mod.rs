//! The control protocol's messages: what `lb status`, `lb backend …`,
//! `lb reload` and the other verbs send to a running agent, and what it
//! answers (one JSON line each way over the control socket). A leaf: it
//! imports nothing of the agent, the database pools or the announcement;
//! they, the client (`control`) and the server (`server`) import it. The
//! status a response carries lives in [`status`] ([`pool`] and
//! [`announce`] for the pools' and BGP's parts).

use serde::{Deserialize, Serialize};

pub mod announce;
pub mod pool;
pub mod status;
pub mod sync;

pub use announce::{AnnounceStatus, BirdProtocol, BirdView, VipPlan};
pub use pool::{CoordStatus, MemberStatus, PoolStatus, Replication, Role};
pub use status::{
    AdminState, AgentStatus, BackendStatus, ConntrackStatus, FullNatSource, FullNatStatus,
    HealthStatus, PoolRole, ReloadStatus, RuntimeStatus, ServiceStatus, Status, ring_violations,
};

/// Where `lb run` listens unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/lb/lb.sock";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    Status,
    Reload,
    Backend(BackendChange),
    /// `lb firewall …`: change the firewall rules live, or show them.
    Firewall(FirewallChange),
    /// `lb db …`: database pools (promotion).
    Db(DbCommand),
    /// `lb explain`: which service and backend a flow gets, and why. The
    /// answer is the response's message.
    Explain {
        /// The client's address and source port, e.g. 198.18.0.2:40000.
        client: String,
        /// VIP:PORT/PROTO, e.g. 198.18.0.10:80/tcp.
        service: String,
    },
    /// `lb vip withdraw|announce [VIP]`: take VIPs out of this LB's BGP
    /// announcement (maintenance), or give them back.
    Vip(VipChange),
}

/// `lb vip …`: the operator's side of `[announce]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, clap::Subcommand)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum VipChange {
    /// Stop announcing VIP (or, without one, every VIP: drain this LB).
    /// Routers move new flows to the other LBs; established flows of a
    /// consistent-hash service follow to the same backends.
    Withdraw { vip: Option<std::net::IpAddr> },
    /// Announce VIP (or every VIP) again, as far as its backends allow.
    Announce { vip: Option<std::net::IpAddr> },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, clap::Subcommand)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum BackendChange {
    /// Add a backend to a service (validated with the whole service first)
    Add {
        service: String,
        backend: String,
        /// IPv4 address and port, e.g. 198.19.0.14:80
        #[arg(long)]
        address: String,
        #[arg(long, default_value_t = 1)]
        weight: u32,
        /// Only takes traffic while every non-backup backend is down
        #[arg(long)]
        backup: bool,
    },
    /// Remove a backend; flows still pinned to it are dropped
    Remove { service: String, backend: String },
    /// Put a disabled or drained backend back into rotation
    Enable { service: String, backend: String },
    /// Take a backend out of rotation and drop its flows at once
    Disable { service: String, backend: String },
    /// No new flows; established flows continue until they end
    Drain {
        service: String,
        backend: String,
        /// Then wait until the backend holds no active flow (prints the
        /// count as it falls); fails after --timeout seconds
        #[arg(long)]
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        wait: bool,
        /// Seconds --wait waits at most
        #[arg(long, default_value_t = 300, requires = "wait")]
        #[serde(default, skip)]
        timeout: u64,
    },
    /// Change a backend's weight (weighted-round-robin services; 0 drains)
    Weight {
        service: String,
        backend: String,
        weight: u32,
    },
    /// Drop the runtime changes of a service (or one of its backends): it
    /// runs as the config file says again
    Reset {
        service: String,
        backend: Option<String>,
    },
}

/// `lb firewall …`. Changes are validated with the rules of the config
/// file and applied whole; they are kept in the state file (restarts and
/// reloads keep them) until `lb firewall reset`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, clap::Subcommand)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum FirewallChange {
    /// Deny new flows from a source prefix (to every VIP, or one service's)
    Deny {
        #[command(subcommand)]
        edit: RuleEdit,
    },
    /// Allow lists: with one, every other source is denied
    Allow {
        #[command(subcommand)]
        edit: RuleEdit,
    },
    /// Every rule, its scope and how many new flows it decided
    Show,
    /// Drop every runtime change of the rules: the config file's apply again
    Reset,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, clap::Subcommand)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum RuleEdit {
    /// Add a prefix (e.g. 203.0.113.0/24, or IPv6 2001:db8:66::/48) to the list
    Add {
        prefix: String,
        /// The service's list (allow-from/deny-from) instead of [firewall]'s
        #[arg(long)]
        service: Option<String>,
    },
    /// Remove a prefix from the list
    Remove {
        prefix: String,
        #[arg(long)]
        service: Option<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
}

impl Response {
    pub fn ok(message: impl Into<String>) -> Self {
        Response {
            ok: true,
            message: message.into(),
            status: None,
        }
    }

    pub fn error(message: impl Into<String>) -> Self {
        Response {
            ok: false,
            message: message.into(),
            status: None,
        }
    }

    /// The agent refused the client before reading its request: every
    /// client slot is taken. The request was not seen; sending it again
    /// is safe whatever it was.
    pub fn busy(why: impl std::fmt::Display) -> Self {
        Response::error(format!("{BUSY_PREFIX}{why}; retry"))
    }

    pub fn is_busy(&self) -> bool {
        !self.ok && self.message.starts_with(BUSY_PREFIX)
    }
}

/// How a [`Response::busy`] message starts.
const BUSY_PREFIX: &str = "busy: ";

/// `lb db …`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, clap::Subcommand)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum DbCommand {
    /// Make MEMBER the primary of POOL: stop its replication, make it
    /// writable, point the other members at it by GTID; writes switch to it
    /// and flows to the old primary are dropped. Refuses a lagging,
    /// stopped or unreachable candidate, and one that lacks transactions
    /// another reachable replica holds, unless --force (which then says
    /// what is lost).
    Promote {
        pool: String,
        member: String,
        #[arg(long)]
        force: bool,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_as_one_json_line() {
        let reqs = [
            Request::Status,
            Request::Reload,
            Request::Backend(BackendChange::Drain {
                service: "www".into(),
                backend: "web1".into(),
                wait: false,
                timeout: 0,
            }),
            Request::Backend(BackendChange::Add {
                service: "www".into(),
                backend: "web4".into(),
                address: "198.19.0.14:80".into(),
                weight: 2,
                backup: true,
            }),
            Request::Explain {
                client: "198.18.0.2:40000".into(),
                service: "198.18.0.10:80/tcp".into(),
            },
        ];
        for r in reqs {
            let line = serde_json::to_string(&r).expect("encode");
            assert!(!line.contains('\n'));
            assert_eq!(serde_json::from_str::<Request>(&line).expect("decode"), r);
        }
        let drain = serde_json::to_string(&Request::Backend(BackendChange::Drain {
            service: "www".into(),
            backend: "web1".into(),
            wait: false,
            timeout: 0,
        }))
        .expect("encode");
        assert_eq!(
            drain,
            r#"{"op":"backend","action":"drain","service":"www","backend":"web1"}"#
        );
    }
}
