//! The database tier's clients and checks, shared by `db.rs` (IPv4) and
//! `db_v6.rs` (IPv6): MySQL clients (`mysql_async`) that write and read
//! through a pool's VIP on new connections from a client's namespace, what
//! the lab's databases hold, the pool's routing as `lb status` shows it,
//! and `lb db promote`. Every client takes the VIP, so one helper serves
//! both families.

use std::{collections::BTreeSet, net::SocketAddr, time::Duration};

use anyhow::{Context, Result, ensure};
use lb_userspace::{
    control::{Request, Response, Status},
    db::{DbCommand, PoolStatus},
    harness::{
        lab::{APP_PASSWORD, APP_USER, Lab, VISITS_TABLE},
        netns::in_netns,
    },
};
use mysql_async::{Conn, OptsBuilder, prelude::Queryable};

use crate::ask;

/// How long one client write or read may take, connection included.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(1);

/// The pool `db` as `status` shows it.
pub fn pool(status: &Status) -> Result<PoolStatus> {
    status
        .pools
        .iter()
        .find(|p| p.name == "db")
        .cloned()
        .context("no pool db in status")
}

/// The pool routes writes to `writer` and reads to `readers`.
pub fn routed(status: &Status, writer: Option<&str>, readers: &[&str]) -> bool {
    pool(status).is_ok_and(|p| p.writer.as_deref() == writer && p.readers == readers)
}

/// The application's login to its database through `vip`.
pub fn app_opts(vip: SocketAddr) -> OptsBuilder {
    OptsBuilder::default()
        .ip_or_hostname(vip.ip().to_string())
        .tcp_port(vip.port())
        .prefer_socket(false)
        .user(Some(APP_USER))
        .pass(Some(APP_PASSWORD))
        .db_name(Some("app"))
}

/// One write through `vip` (a write VIP) on a new connection: inserts
/// `seq` tagged `writer`, returns the server id that committed it.
pub async fn write_to(vip: SocketAddr, seq: u64, writer: &str) -> Result<u64, String> {
    let work = async {
        let mut c = Conn::new(app_opts(vip)).await?;
        c.exec_drop(
            format!(
                "INSERT INTO {VISITS_TABLE} (seq, writer, server_id) VALUES (?, ?, @@server_id)"
            ),
            (seq, writer),
        )
        .await?;
        let id: Option<u64> = c.query_first("SELECT @@server_id").await?;
        let _ = c.disconnect().await;
        Ok::<_, mysql_async::Error>(id.unwrap_or(0))
    };
    match tokio::time::timeout(CLIENT_TIMEOUT, work).await {
        Err(_) => Err("timed out".to_owned()),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(id)) => Ok(id),
    }
}

/// One read through `vip` (a read VIP) on a new connection: (server id,
/// rows).
pub async fn read_from(vip: SocketAddr) -> Result<(u64, u64), String> {
    let work = async {
        let mut c = Conn::new(app_opts(vip)).await?;
        let row: Option<(u64, u64)> = c
            .query_first(format!("SELECT @@server_id, COUNT(*) FROM {VISITS_TABLE}"))
            .await?;
        let _ = c.disconnect().await;
        Ok::<_, mysql_async::Error>(row.unwrap_or_default())
    };
    match tokio::time::timeout(CLIENT_TIMEOUT, work).await {
        Err(_) => Err("timed out".to_owned()),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(r)) => Ok(r),
    }
}

pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")
}

/// Runs `f` from the client's namespace (its sockets are made there).
pub fn from_client<T: Send>(lab: &Lab, f: impl Future<Output = T> + Send) -> Result<T> {
    from_ns(&lab.client_ns(), f)
}

/// Runs `f` from namespace `ns` (a client's).
pub fn from_ns<T: Send>(ns: &str, f: impl Future<Output = T> + Send) -> Result<T> {
    let rt = runtime()?;
    in_netns(ns, || rt.block_on(f))
}

/// The server ids that answer `n` reads through `vip`, each on a new
/// connection from the client.
pub fn reads_from(lab: &Lab, vip: SocketAddr, n: usize) -> Result<Vec<u64>> {
    from_client(lab, async {
        let mut ids = Vec::new();
        for _ in 0..n {
            ids.push(read_from(vip).await.map_err(anyhow::Error::msg)?.0);
        }
        Ok::<_, anyhow::Error>(ids)
    })?
}

/// Writes `seqs` (tag "basic") through `vip`, each on a new connection
/// from the client, and checks that server `server_id` committed every one.
pub fn writes_land_at(
    lab: &Lab,
    vip: SocketAddr,
    seqs: std::ops::RangeInclusive<u64>,
    server_id: u64,
) -> Result<()> {
    let ids = from_client(lab, async {
        let mut ids = Vec::new();
        for seq in seqs {
            ids.push(write_to(vip, seq, "basic").await);
        }
        ids
    })?;
    ensure!(
        ids.iter().all(|r| r == &Ok(server_id)),
        "writes answered by {ids:?}"
    );
    Ok(())
}

/// The rows `writer` wrote, as seen on database `n`.
pub fn seqs_on(lab: &Lab, n: usize, writer: &str) -> Result<BTreeSet<u64>> {
    Ok(lab
        .db_admin(
            n,
            &format!("SELECT seq FROM {VISITS_TABLE} WHERE writer = '{writer}'"),
        )?
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect())
}

/// `lb db promote db MEMBER`'s answer, whatever it is.
pub fn ask_promote(lab: &Lab, member: &str, force: bool) -> Result<Response> {
    ask(
        lab,
        &Request::Db(DbCommand::Promote {
            pool: "db".into(),
            member: member.into(),
            force,
        }),
    )
}

/// `lb db promote db MEMBER`, which must succeed; its answer.
pub fn promote(lab: &Lab, member: &str, force: bool) -> Result<String> {
    let r = ask_promote(lab, member, force)?;
    ensure!(r.ok, "promote {member}: {}", r.message);
    Ok(r.message)
}
