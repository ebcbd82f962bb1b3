//! `check = "mysql"`: a real MySQL protocol handshake and login with
//! `mysql_async`, then what the server says about its role: `@@read_only`,
//! its GTID positions and, on a replica, `SHOW SLAVE STATUS` (replication
//! threads, lag, its source). A plain service only needs the login to pass;
//! a pool (`crate::db`) routes by the [`Observation`].
//!
//! A probe from a source address (a full-NAT service's, `health::probe_source`)
//! connects its own socket, bound to that address, and hands it to the
//! driver through a private Unix socket ([`Relay`]): mysql_async opens its
//! own TCP connection and takes neither a local address nor a connected
//! stream.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use mysql_async::{Conn, OptsBuilder, Row, prelude::Queryable};
use serde::{Deserialize, Serialize};

use super::probe::ProbeError;
use crate::config::{MysqlLogin, duration::show};
pub use crate::wire::Replication;

/// What one probe of a member found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Observation {
    /// `@@read_only`: replicas run read-only; a writable member is a primary.
    pub read_only: bool,
    pub server_id: u64,
    /// `@@gtid_binlog_pos`: the last transaction written to its binlog.
    pub gtid_binlog_pos: String,
    /// `@@gtid_slave_pos`: the last transaction it applied as a replica.
    pub gtid_slave_pos: String,
    /// `SHOW SLAVE STATUS`; `None`: replication is not configured.
    pub replication: Option<Replication>,
}

impl Replication {
    /// Both threads running and within `max_lag`.
    pub fn healthy_within(&self, max_lag: Duration) -> bool {
        self.io_running == "Yes"
            && self.sql_running
            && self.lag_seconds.is_some_and(|l| l <= max_lag.as_secs())
    }

    /// The IO thread runs but has lost its primary ("Connecting": it keeps
    /// retrying), and the SQL thread has applied everything the IO thread
    /// received (`applied`, the replica's `gtid_slave_pos`, covers
    /// `Gtid_IO_Pos`). `Seconds_Behind_Master` is NULL then, so lag cannot
    /// be read; the GTIDs say the replica holds all it will ever get from
    /// that primary. An unknown IO position (replication without GTIDs)
    /// proves nothing.
    pub fn orphaned_but_caught_up(&self, applied: &str) -> bool {
        self.io_running == "Connecting"
            && self.sql_running
            && !self.gtid_io_pos.trim().is_empty()
            && gtid_covers(applied, &self.gtid_io_pos)
    }
}

/// Whether GTID position `applied` has every transaction of `received`:
/// for each replication domain of `received`, `applied` has that domain at
/// the same or a later sequence number (`0-1-120` covers `0-1-118`).
pub fn gtid_covers(applied: &str, received: &str) -> bool {
    use super::gtid::Position;
    match (
        Position::furthest([applied]),
        Position::furthest([received]),
    ) {
        (Ok(applied), Ok(received)) => applied.covers(&received),
        _ => false,
    }
}

/// Why a login did not happen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoginFailure {
    /// The server answered and refused it (wrong password, unknown user,
    /// host not allowed): the server's reason.
    Refused(String),
    /// No MySQL server answered in time (or the connection broke).
    Unreachable(String),
    /// The agent could not try: this host ran short (descriptors, socket
    /// buffers, memory, local ports; [`is_local`]). Says nothing about the
    /// server.
    Local(String),
}

impl LoginFailure {
    pub fn reason(&self) -> &str {
        match self {
            LoginFailure::Refused(r) | LoginFailure::Unreachable(r) | LoginFailure::Local(r) => r,
        }
    }
}

impl From<LoginFailure> for ProbeError {
    fn from(failure: LoginFailure) -> Self {
        match failure {
            LoginFailure::Local(why) => ProbeError::Agent(why),
            LoginFailure::Refused(why) | LoginFailure::Unreachable(why) => ProbeError::Backend(why),
        }
    }
}

/// Whether a driver error is this host running short rather than the
/// server failing: `mysql_async` wraps the socket's `io::Error` (in
/// `Error::Io`, or deeper in another error's sources), so the whole
/// source chain is searched for an OS error [`super::probe::is_local`]
/// calls local (EMFILE, ENFILE, ENOBUFS, ENOMEM, EADDRNOTAVAIL).
pub fn is_local(e: &mysql_async::Error) -> bool {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = next {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            // An io::Error's source() skips the error it wraps: look at
            // that one too (an io::Error made of an io::Error).
            let inner = io
                .get_ref()
                .and_then(|i| i.downcast_ref::<std::io::Error>());
            if super::probe::is_local(io) || inner.is_some_and(super::probe::is_local) {
                return true;
            }
        }
        next = err.source();
    }
    false
}

/// Connects to `address` and logs in as `login`; the error is a short
/// reason naming the address.
pub async fn connect(
    address: impl Into<SocketAddr>,
    login: &MysqlLogin,
    timeout: Duration,
) -> Result<Conn, String> {
    log_in(address, login, timeout)
        .await
        .map_err(|e| e.reason().to_owned())
}

/// [`connect`], telling a server that refused the login from one that
/// could not be reached.
pub async fn log_in(
    address: impl Into<SocketAddr>,
    login: &MysqlLogin,
    timeout: Duration,
) -> Result<Conn, LoginFailure> {
    log_in_from(address, None, login, timeout).await
}

/// [`log_in`] from `source` (the connection's socket bound to it), if given.
pub async fn log_in_from(
    address: impl Into<SocketAddr>,
    source: Option<IpAddr>,
    login: &MysqlLogin,
    timeout: Duration,
) -> Result<Conn, LoginFailure> {
    let address = address.into();
    use LoginFailure::{Local, Refused, Unreachable};
    // TCP first, so that an unreachable or closed port and a server that
    // never sends a MySQL handshake get different reasons.
    let deadline = super::probe::deadline_after(timeout);
    let tcp = tokio::time::timeout_at(deadline, super::probe::connect_from(address, source))
        .await
        .map_err(|_| {
            Unreachable(format!(
                "mysql {address}: connect timed out after {}",
                show(timeout)
            ))
        })?
        .map_err(|e| {
            let why = format!(
                "mysql {address}: connect{}: {}",
                super::probe::from(source),
                super::probe::io_reason(&e)
            );
            if super::probe::is_local(&e) {
                Local(why)
            } else {
                Unreachable(why)
            }
        })?;
    let opts = OptsBuilder::default()
        .ip_or_hostname(address.ip().to_string())
        .tcp_port(address.port())
        .prefer_socket(false)
        .user(Some(login.user.clone()))
        .pass(Some(login.password.expose().to_owned()));
    // Without a source the driver connects again on its own; with one, it
    // is handed this connection.
    let (opts, _relay) = match source {
        None => {
            drop(tcp);
            (opts, None)
        }
        Some(_) => {
            let relay = Relay::start(tcp, deadline)
                .map_err(|e| Local(format!("mysql {address}: relay socket: {e}")))?;
            let path = relay.socket.to_string_lossy().into_owned();
            (opts.socket(Some(path)), Some(relay))
        }
    };
    match tokio::time::timeout_at(deadline, Conn::new(opts)).await {
        Err(_) => Err(Unreachable(format!(
            "mysql {address}: no MySQL handshake and login within {} (not a MySQL server?)",
            show(timeout)
        ))),
        Ok(Err(e @ mysql_async::Error::Server(_))) => {
            Err(Refused(format!("mysql {address}: {}", reason(&e))))
        }
        Ok(Err(e)) if is_local(&e) => Err(Local(format!("mysql {address}: {}", reason(&e)))),
        Ok(Err(e)) => Err(Unreachable(format!("mysql {address}: {}", reason(&e)))),
        Ok(Ok(conn)) => Ok(conn),
    }
}

/// A probe's TCP connection handed to mysql_async: a Unix socket in a
/// directory made for it (mode 0700, a fresh name: only this agent's user
/// can reach it), whose one connection — from this process, checked by
/// its credentials — is spliced to the TCP connection until either ends or
/// the probe's deadline passes. The directory goes with the `Relay`; the
/// splice outlives it, for the driver's connection.
struct Relay {
    dir: PathBuf,
    socket: PathBuf,
}

impl Relay {
    fn start(tcp: tokio::net::TcpStream, deadline: tokio::time::Instant) -> std::io::Result<Relay> {
        use std::os::unix::fs::DirBuilderExt;
        static NEXT: AtomicU64 = AtomicU64::new(0);
        // A name nobody could have made first: a directory that exists is
        // never used (another user's, in a shared temporary directory).
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir = std::env::temp_dir().join(format!(
            "lb-mysql-probe-{}-{}-{nanos}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
        let relay = Relay {
            socket: dir.join("s"),
            dir,
        };
        let listener = tokio::net::UnixListener::bind(&relay.socket)?;
        tokio::spawn(async move {
            let _ = tokio::time::timeout_at(deadline, splice(listener, tcp)).await;
        });
        Ok(relay)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Splices the listener's first connection from this process to `tcp`.
async fn splice(
    listener: tokio::net::UnixListener,
    mut tcp: tokio::net::TcpStream,
) -> std::io::Result<()> {
    let (mut unix, _) = listener.accept().await?;
    let ours = unix
        .peer_cred()?
        .pid()
        .is_some_and(|pid| u32::try_from(pid).is_ok_and(|p| p == std::process::id()));
    if !ours {
        return Err(std::io::Error::other("not this process's connection"));
    }
    tokio::io::copy_bidirectional(&mut unix, &mut tcp).await?;
    Ok(())
}

/// The login check of a plain service: handshake, login, `SELECT 1`.
pub async fn probe(
    address: SocketAddr,
    login: &MysqlLogin,
    timeout: Duration,
) -> Result<(), ProbeError> {
    probe_from(address, None, login, timeout).await
}

/// [`probe`] from `source`, if given (a full-NAT service's source address).
pub async fn probe_from(
    address: SocketAddr,
    source: Option<IpAddr>,
    login: &MysqlLogin,
    timeout: Duration,
) -> Result<(), ProbeError> {
    observe_from(address, source, login, timeout)
        .await
        .map(drop)
}

/// One probe: login, then the role and replication state, all within
/// `timeout`. A failure for a local reason ([`is_local`]) is the agent's
/// ([`ProbeError::Agent`]), never the member's.
pub async fn observe(
    address: impl Into<SocketAddr>,
    login: &MysqlLogin,
    timeout: Duration,
) -> Result<Observation, ProbeError> {
    observe_from(address, None, login, timeout).await
}

/// [`observe`] from `source`, if given.
pub async fn observe_from(
    address: impl Into<SocketAddr>,
    source: Option<IpAddr>,
    login: &MysqlLogin,
    timeout: Duration,
) -> Result<Observation, ProbeError> {
    let address = address.into();
    let work = async {
        let mut conn = log_in_from(address, source, login, timeout).await?;
        let result = read_state(&mut conn).await.map_err(|e| {
            let why = format!("mysql {address}: {}", reason(&e));
            if is_local(&e) {
                ProbeError::Agent(why)
            } else {
                ProbeError::Backend(why)
            }
        });
        // A failed goodbye changes nothing about what was read.
        let _ = conn.disconnect().await;
        result
    };
    match tokio::time::timeout(timeout, work).await {
        Err(_) => Err(ProbeError::Backend(format!(
            "mysql {address}: timed out after {}",
            show(timeout)
        ))),
        Ok(result) => result,
    }
}

async fn read_state(conn: &mut Conn) -> Result<Observation, mysql_async::Error> {
    let row: Option<(i64, u64, String, String)> = conn
        .query_first(
            "SELECT @@global.read_only, @@global.server_id, @@global.gtid_binlog_pos, \
             @@global.gtid_slave_pos",
        )
        .await?;
    let (read_only, server_id, gtid_binlog_pos, gtid_slave_pos) =
        row.unwrap_or((0, 0, String::new(), String::new()));
    let rows: Vec<Row> = conn.query("SHOW SLAVE STATUS").await?;
    let replication = rows.first().map(|row| {
        let text = |column: &str| -> String {
            row.get_opt::<Option<String>, _>(column)
                .and_then(Result::ok)
                .flatten()
                .unwrap_or_default()
        };
        let error = [text("Last_IO_Error"), text("Last_SQL_Error")]
            .into_iter()
            .find(|e| !e.is_empty());
        Replication {
            source: source_text(&text("Master_Host"), &text("Master_Port")),
            io_running: text("Slave_IO_Running"),
            sql_running: text("Slave_SQL_Running") == "Yes",
            lag_seconds: text("Seconds_Behind_Master").parse().ok(),
            gtid_io_pos: text("Gtid_IO_Pos"),
            error,
        }
    });
    Ok(Observation {
        read_only: read_only != 0,
        server_id,
        gtid_binlog_pos,
        gtid_slave_pos,
        replication,
    })
}

/// A replica's source as `SHOW SLAVE STATUS` names it (`Master_Host`,
/// `Master_Port`), written as the agent writes a member's address
/// (`SocketAddr`'s text): an IPv6 host in brackets and in its canonical
/// form, whatever spelling `CHANGE MASTER TO` was given, so that it
/// compares equal to the member it names (`PoolState::rejoin_due`); a
/// host name stays as it is.
pub fn source_text(host: &str, port: &str) -> String {
    match (host.parse::<IpAddr>(), port.parse::<u16>()) {
        (Ok(ip), Ok(port)) => SocketAddr::new(ip, port).to_string(),
        _ => format!("{host}:{port}"),
    }
}

/// A driver error as a short reason: the server's own message for a server
/// error ("Access denied for user ..."), else the driver's.
pub fn reason(e: &mysql_async::Error) -> String {
    match e {
        mysql_async::Error::Server(s) => format!("server error {}: {}", s.code, s.message),
        mysql_async::Error::Io(io) => format!("connection failed: {io}"),
        mysql_async::Error::Driver(d) => format!("not a MySQL server? {d}"),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replicas_source_is_written_as_a_members_address() {
        assert_eq!(source_text("198.19.1.21", "3306"), "198.19.1.21:3306");
        // IPv6: bracketed, and canonical whatever the spelling.
        for host in ["2001:db8:19:1::21", "2001:0db8:19:1:0:0:0:21"] {
            assert_eq!(source_text(host, "3306"), "[2001:db8:19:1::21]:3306");
        }
        let member: SocketAddr = "[2001:db8:19:1::21]:3306".parse().expect("address");
        assert_eq!(source_text("2001:db8:19:1::21", "3306"), member.to_string());
        assert_eq!(source_text("db1.example", "3306"), "db1.example:3306");
    }

    #[test]
    fn replication_qualifies_only_with_both_threads_and_little_lag() {
        let mut r = Replication {
            source: "198.19.1.21:3306".into(),
            io_running: "Yes".into(),
            sql_running: true,
            lag_seconds: Some(0),
            gtid_io_pos: String::new(),
            error: None,
        };
        let max = Duration::from_secs(5);
        assert!(r.healthy_within(max));
        r.lag_seconds = Some(6);
        assert!(!r.healthy_within(max));
        r.lag_seconds = None;
        assert!(!r.healthy_within(max));
        r.lag_seconds = Some(1);
        r.io_running = "Connecting".into();
        assert!(!r.healthy_within(max));
        r.io_running = "Yes".into();
        r.sql_running = false;
        assert!(!r.healthy_within(max));
    }

    #[test]
    fn gtid_covers_compares_each_domain() {
        assert!(gtid_covers("0-1-120", "0-1-120"));
        assert!(gtid_covers("0-1-121", "0-1-120"));
        assert!(!gtid_covers("0-1-119", "0-1-120"));
        assert!(gtid_covers("0-1-120,1-2-7", "1-2-7,0-1-100"));
        assert!(!gtid_covers("0-1-120", "0-1-100,1-2-1"));
        assert!(gtid_covers("0-1-5", ""));
        assert!(!gtid_covers("garbage", "0-1-1"));
        assert!(!gtid_covers("0-1-5", "0-1-x"));
    }

    #[test]
    fn an_orphaned_replica_counts_only_once_it_applied_all_it_received() {
        let mut r = Replication {
            source: "198.19.1.21:3306".into(),
            io_running: "Connecting".into(),
            sql_running: true,
            lag_seconds: None,
            gtid_io_pos: "0-1-50".into(),
            error: Some("error reconnecting to master".into()),
        };
        assert!(r.orphaned_but_caught_up("0-1-50"));
        assert!(!r.orphaned_but_caught_up("0-1-49"));
        // Stopped by an operator or an error: not "lost its primary".
        r.io_running = "No".into();
        assert!(!r.orphaned_but_caught_up("0-1-50"));
        r.io_running = "Connecting".into();
        r.sql_running = false;
        assert!(!r.orphaned_but_caught_up("0-1-50"));
        r.sql_running = true;
        r.gtid_io_pos = String::new();
        assert!(!r.orphaned_but_caught_up("0-1-50"));
    }

    #[tokio::test]
    async fn a_server_that_is_not_mysql_is_named() {
        let (l, addr) = super::super::probe::test_support::listener().await;
        let (_server, _) =
            super::super::probe::test_support::serve(l, "HTTP/1.0 400 Bad Request\r\n\r\n");
        let login = MysqlLogin {
            user: "lb".into(),
            password: crate::config::Secret::new("x".into()),
            password_file: None,
        };
        let why = probe(addr.into(), &login, Duration::from_millis(500))
            .await
            .expect_err("not MySQL")
            .to_string();
        assert!(why.contains("not a MySQL server?"), "{why}");
    }

    /// A full-NAT service's MySQL probes come from its source address: the
    /// server sees the connection from it (here a server that is not
    /// MySQL: the probe fails, as the backend's fault, after the server saw
    /// it), and no relay directory is left behind.
    #[tokio::test]
    async fn a_probe_from_a_source_address_comes_from_it() {
        let (l, addr) = super::super::probe::test_support::listener().await;
        let (peers, mut seen) = tokio::sync::mpsc::unbounded_channel();
        let _server = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            while let Ok((mut stream, peer)) = l.accept().await {
                let _ = peers.send(peer);
                let _ = stream.write_all(b"HTTP/1.0 400 Bad Request\r\n\r\n").await;
            }
        });
        let login = MysqlLogin {
            user: "lb".into(),
            password: crate::config::Secret::new("x".into()),
            password_file: None,
        };
        let relays = || {
            std::fs::read_dir(std::env::temp_dir())
                .map(|d| {
                    d.filter_map(Result::ok)
                        .filter(|e| {
                            e.file_name()
                                .to_string_lossy()
                                .starts_with(&format!("lb-mysql-probe-{}-", std::process::id()))
                        })
                        .count()
                })
                .unwrap_or(0)
        };
        let source = IpAddr::from([127, 0, 0, 7]);
        let why = probe_from(
            addr.into(),
            Some(source),
            &login,
            Duration::from_millis(800),
        )
        .await
        .expect_err("not MySQL");
        assert!(matches!(why, ProbeError::Backend(_)), "{why:?}");
        // One connection (the driver speaks over the probe's own, through
        // the relay), from the source address.
        let peer = seen.recv().await.expect("a connection");
        assert_eq!(peer.ip(), source);
        assert!(seen.try_recv().is_err(), "a second connection");
        assert_eq!(relays(), 0, "relay directories left behind");
        // A source this host does not have: the agent's error.
        let why = probe_from(
            addr.into(),
            Some([192, 0, 2, 1].into()),
            &login,
            Duration::from_millis(800),
        )
        .await
        .expect_err("no such source");
        assert!(matches!(why, ProbeError::Agent(_)), "{why:?}");
    }

    #[test]
    fn driver_errors_from_running_short_are_the_agents() {
        use std::io;
        let io_error = |errno| {
            mysql_async::Error::Io(mysql_async::IoError::Io(io::Error::from_raw_os_error(
                errno,
            )))
        };
        for errno in [
            libc::EMFILE,
            libc::ENFILE,
            libc::ENOBUFS,
            libc::ENOMEM,
            libc::EADDRNOTAVAIL,
        ] {
            assert!(is_local(&io_error(errno)), "errno {errno}");
            // Deeper in the chain: an io::Error wrapping one, or another
            // error holding it.
            let wrapped = mysql_async::Error::Io(mysql_async::IoError::Io(io::Error::other(
                io::Error::from_raw_os_error(errno),
            )));
            assert!(is_local(&wrapped), "wrapped errno {errno}");
            let other = mysql_async::Error::Other(Box::new(io::Error::from_raw_os_error(errno)));
            assert!(is_local(&other), "other errno {errno}");
        }
        // The server's or the network's: the member's failure.
        for errno in [
            libc::ECONNREFUSED,
            libc::ECONNRESET,
            libc::EHOSTUNREACH,
            libc::ETIMEDOUT,
        ] {
            assert!(!is_local(&io_error(errno)), "errno {errno}");
        }
        let access_denied = mysql_async::Error::Server(mysql_async::ServerError {
            code: 1045,
            message: "Access denied for user 'lb'".into(),
            state: "28000".into(),
        });
        assert!(!is_local(&access_denied));
        let driver = mysql_async::Error::Driver(mysql_async::DriverError::ConnectionClosed);
        assert!(!is_local(&driver));

        // A login that could not be tried is the agent's error, the
        // others the member's.
        assert_eq!(
            ProbeError::from(LoginFailure::Local("x".into())),
            ProbeError::Agent("x".into())
        );
        assert_eq!(
            ProbeError::from(LoginFailure::Refused("x".into())),
            ProbeError::Backend("x".into())
        );
        assert_eq!(
            ProbeError::from(LoginFailure::Unreachable("x".into())),
            ProbeError::Backend("x".into())
        );
    }
}
