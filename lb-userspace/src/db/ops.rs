//! What the agent does to the database servers themselves: promote a
//! replica (`lb db promote`, automatic failover) and fence a second writer
//! (`SET GLOBAL read_only = 1`). Each runs in its own task and reports to
//! the agent's loop, which alone changes routing.

use std::{net::SocketAddr, time::Duration};

use mysql_async::{Conn, prelude::Queryable};

use super::gtid;
use crate::{
    config::{MysqlLogin, PoolMember},
    health::mysql::{self, Observation},
};

/// How long a candidate may take to apply what it already received (or
/// what a still-reachable primary wrote) before it counts as lagging.
pub const CATCH_UP: Duration = Duration::from_secs(3);

/// One promotion, as the agent planned it.
#[derive(Debug, Clone)]
pub struct PromotePlan {
    pub pool: String,
    pub candidate: PoolMember,
    /// The pool's primary before the promotion, if it has one.
    pub old_primary: Option<PoolMember>,
    /// Every member but the candidate: pointed at it by GTID.
    pub others: Vec<PoolMember>,
    pub login: MysqlLogin,
    pub timeout: Duration,
    /// Promote even a lagging candidate, or one whose replication is broken.
    pub force: bool,
}

/// Runs a promotion; the message says what was done (or why not).
pub async fn promote(plan: &PromotePlan) -> Result<String, String> {
    let c = &plan.candidate;
    let mut conn = mysql::connect(c.address, &plan.login, plan.timeout)
        .await
        .map_err(|why| format!("{} is unreachable: {why}", c.name))?;
    let state = mysql::observe(c.address, &plan.login, plan.timeout)
        .await
        .map_err(|why| format!("{}: {why}", c.name))?;
    check_candidate(&c.name, &state, plan.force)?;

    // A reachable old primary is made read-only first, and the candidate
    // must reach its last write: a planned switchover loses nothing.
    let mut fenced_old = None;
    if let Some(old) = plan.old_primary.as_ref().filter(|o| o.name != c.name) {
        match mysql::connect(old.address, &plan.login, plan.timeout).await {
            Ok(mut old_conn) => {
                exec(&mut old_conn, "SET GLOBAL read_only = 1")
                    .await
                    .map_err(|e| format!("making {} read-only: {e}", old.name))?;
                let pos: Option<String> = old_conn
                    .query_first("SELECT @@global.gtid_binlog_pos")
                    .await
                    .map_err(|e| format!("{}: {}", old.name, mysql::reason(&e)))?;
                let caught_up = wait_for(&mut conn, &pos.unwrap_or_default()).await;
                if !caught_up && !plan.force {
                    // Undo: the old primary stays the primary.
                    let _ = exec(&mut old_conn, "SET GLOBAL read_only = 0").await;
                    return Err(format!(
                        "{} did not catch up with {} within {}s: lagging (use --force to promote it anyway)",
                        c.name,
                        old.name,
                        CATCH_UP.as_secs()
                    ));
                }
                fenced_old = Some(old.name.clone());
                let _ = old_conn.disconnect().await;
            }
            Err(_) => {
                // The primary is gone: apply everything already received.
                let received = state
                    .replication
                    .as_ref()
                    .map(|r| r.gtid_io_pos.clone())
                    .unwrap_or_default();
                if !wait_for(&mut conn, &received).await && !plan.force {
                    return Err(format!(
                        "{} has not applied what it received ({received}) within {}s: \
                         lagging (use --force to promote it anyway)",
                        c.name,
                        CATCH_UP.as_secs()
                    ));
                }
            }
        }
    }

    // Without a reachable old primary to catch up with, the candidate must
    // hold what every reachable replica holds: a replica that received
    // more could not follow it (error 1236) and its extra transactions
    // would be lost.
    let mut forced_loss = None;
    if fenced_old.is_none() {
        let short = shortfall(plan, &state).await?;
        if !short.is_empty() {
            let what = short.join("; ");
            if !plan.force {
                return Err(format!(
                    "{} lacks transactions that reachable replicas hold ({what}): promoting it \
                     would lose them and leave those replicas unable to replicate from it; \
                     promote the most complete replica, or use --force to lose them",
                    c.name
                ));
            }
            forced_loss = Some(what);
        }
    }

    for sql in ["STOP SLAVE", "RESET SLAVE ALL", "SET GLOBAL read_only = 0"] {
        exec(&mut conn, sql)
            .await
            .map_err(|e| format!("promoting {}: {sql}: {e}", c.name))?;
    }
    let _ = conn.disconnect().await;

    let mut repointed = Vec::new();
    let mut unreachable = Vec::new();
    let mut kept_out = Vec::new();
    for other in &plan.others {
        match rejoin(other.address, c.address, &plan.login, plan.timeout).await {
            Ok(errant) if errant.is_empty() => repointed.push(other.name.clone()),
            Ok(errant) => kept_out.push(format!("{} ({})", other.name, gtid::show(&errant))),
            Err(why) => unreachable.push(format!("{} ({why})", other.name)),
        }
    }
    let mut msg = format!("{} is the primary of pool {}", c.name, plan.pool);
    if let Some(old) = &plan.old_primary
        && old.name != c.name
    {
        msg.push_str(&format!(" (was {})", old.name));
    }
    if let Some(old) = fenced_old {
        msg.push_str(&format!("; {old} made read-only first"));
    }
    if !repointed.is_empty() {
        msg.push_str(&format!(
            "; replicating from it by GTID: {}",
            repointed.join(", ")
        ));
    }
    if !unreachable.is_empty() {
        msg.push_str(&format!("; not re-pointed: {}", unreachable.join(", ")));
    }
    if !kept_out.is_empty() {
        msg.push_str(&format!(
            "; kept out, holding transactions {} lacks (errant): {}",
            c.name,
            kept_out.join(", ")
        ));
    }
    if let Some(lost) = forced_loss {
        msg.push_str(&format!(
            "; forced: lost what it lacked ({lost}): those replicas cannot follow it until rebuilt"
        ));
    }
    Ok(msg)
}

/// What the candidate (observed as `candidate`) lacks of each reachable
/// replica among the plan's other members, observed now, all at once.
async fn shortfall(plan: &PromotePlan, candidate: &Observation) -> Result<Vec<String>, String> {
    let have = gtid::history(candidate).map_err(|e| format!("{}: {e}", plan.candidate.name))?;
    let mut looks = tokio::task::JoinSet::new();
    for other in plan.others.iter().cloned() {
        let (login, timeout) = (plan.login.clone(), plan.timeout);
        looks.spawn(async move {
            let seen = mysql::observe(other.address, &login, timeout).await;
            (other.name, seen)
        });
    }
    let mut peers = Vec::new();
    while let Some(done) = looks.join_next().await {
        // An unreachable member holds nothing it could hand on.
        if let Ok((name, Ok(o))) = done
            && o.replication.is_some()
        {
            let h = gtid::history(&o).map_err(|e| format!("{name}: {e}"))?;
            peers.push((name, h));
        }
    }
    peers.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(gtid::shortfall(&plan.candidate.name, &have, &peers))
}

/// Refuses a candidate that is not a replica applying its relay log,
/// unless forced.
fn check_candidate(name: &str, state: &Observation, force: bool) -> Result<(), String> {
    if !state.read_only && state.replication.is_none() {
        // Already writable (an earlier, half-finished promotion): finish it.
        return Ok(());
    }
    let Some(r) = &state.replication else {
        if force {
            return Ok(());
        }
        return Err(format!(
            "{name} is not a replica (no replication configured): use --force to promote it anyway"
        ));
    };
    if !r.sql_running && !force {
        return Err(format!(
            "{name}'s replication is stopped (SQL thread not running{}): its data may be stale; \
             use --force to promote it anyway",
            r.error
                .as_ref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        ));
    }
    Ok(())
}

/// Waits up to [`CATCH_UP`] for the server behind `conn` to have applied
/// `pos` (`MASTER_GTID_WAIT`); true if it has.
async fn wait_for(conn: &mut Conn, pos: &str) -> bool {
    if pos.trim().is_empty() {
        return true;
    }
    let result: Result<Option<i64>, _> = conn
        .exec_first(
            "SELECT MASTER_GTID_WAIT(?, ?)",
            (pos, CATCH_UP.as_secs_f64()),
        )
        .await;
    matches!(result, Ok(Some(0)))
}

/// Points `member` at `primary` by GTID if its history allows it: every
/// transaction in its binlog must be in the primary's (`@@gtid_binlog_state`
/// compared per domain and server). `Ok` with the errant GTIDs (the ones
/// the primary lacks) if not: it is left as it is, for the operator.
/// Empty: re-pointed (read-only, replicating). Idempotent: re-pointing a
/// member that already replicates from `primary` only restarts it there.
pub async fn rejoin(
    member: SocketAddr,
    primary: SocketAddr,
    login: &MysqlLogin,
    timeout: Duration,
) -> Result<Vec<gtid::Gtid>, String> {
    let state = |address: SocketAddr| async move {
        let mut conn = mysql::connect(address, login, timeout).await?;
        let state: Option<String> = conn
            .query_first("SELECT @@global.gtid_binlog_state")
            .await
            .map_err(|e| format!("mysql {address}: {}", mysql::reason(&e)))?;
        let _ = conn.disconnect().await;
        Ok::<_, String>(state.unwrap_or_default())
    };
    let (mine, theirs) = (state(member).await?, state(primary).await?);
    let errant = gtid::errant(&mine, &theirs)?;
    if errant.is_empty() {
        repoint(member, primary, login, timeout).await?;
    }
    Ok(errant)
}

/// Points the server at `member` to replicate from `primary` by GTID.
async fn repoint(
    member: SocketAddr,
    primary: SocketAddr,
    login: &MysqlLogin,
    timeout: Duration,
) -> Result<(), String> {
    let mut conn = mysql::connect(member, login, timeout).await?;
    // CHANGE MASTER takes no placeholders: quote by hand.
    let change = format!(
        "CHANGE MASTER TO MASTER_HOST = {}, MASTER_PORT = {}, MASTER_USER = {}, \
         MASTER_PASSWORD = {}, MASTER_USE_GTID = current_pos, MASTER_CONNECT_RETRY = 1",
        quote(&primary.ip().to_string()),
        primary.port(),
        quote(&login.user),
        quote(login.password.expose())
    );
    for sql in [
        "SET GLOBAL read_only = 1",
        "STOP SLAVE",
        change.as_str(),
        "START SLAVE",
    ] {
        // The statement may hold the password: name it by its verb only.
        let verb: String = sql.split_whitespace().take(2).collect::<Vec<_>>().join(" ");
        exec(&mut conn, sql)
            .await
            .map_err(|e| format!("{verb}: {e}"))?;
    }
    let _ = conn.disconnect().await;
    Ok(())
}

/// Makes `member` read-only (fencing a second writer).
pub async fn fence(
    member: SocketAddr,
    login: &MysqlLogin,
    timeout: Duration,
) -> Result<(), String> {
    let mut conn = mysql::connect(member, login, timeout).await?;
    let result = exec(&mut conn, "SET GLOBAL read_only = 1").await;
    let _ = conn.disconnect().await;
    result
}

async fn exec(conn: &mut Conn, sql: &str) -> Result<(), String> {
    conn.query_drop(sql).await.map_err(|e| mysql::reason(&e))
}

/// A SQL string literal.
fn quote(text: &str) -> String {
    format!("'{}'", text.replace('\\', "\\\\").replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_are_quoted() {
        assert_eq!(quote("lb"), "'lb'");
        assert_eq!(quote("o'brien\\"), "'o''brien\\\\'");
    }
}
