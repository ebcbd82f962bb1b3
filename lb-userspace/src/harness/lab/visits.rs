//! The web servers' application endpoint, using the database the way
//! www.foobar.com's application does: `POST /visits` inserts a row through
//! the **write VIP**, `GET /visits` counts the rows through the **read
//! VIP**; both say which web and which database server answered. A real
//! MySQL client (`mysql_async`) on a small runtime per request: plenty for
//! a lab.

use std::{net::SocketAddr, path::PathBuf, sync::OnceLock, time::Duration};

use mysql_async::{Conn, OptsBuilder, prelude::Queryable};

use super::db::{APP_USER, VISITS_TABLE};

/// How long one request may wait for the database.
const DB_TIMEOUT: Duration = Duration::from_secs(2);

/// Where the application's database is (set once by `lb lab-serve`).
#[derive(Debug, Clone)]
pub struct VisitsDb {
    pub write: SocketAddr,
    pub read: SocketAddr,
    /// The application account's password file (written by the lab when
    /// it starts its databases; read at each request).
    pub password_file: PathBuf,
}

static DB: OnceLock<VisitsDb> = OnceLock::new();

pub fn configure(db: VisitsDb) {
    let _ = DB.set(db);
}

/// `(status, reason, body)` of a `/visits` request, or `None` if this
/// server has no database configured.
pub fn handle(method: &str, web: &str) -> Option<(u16, &'static str, String)> {
    let db = DB.get()?;
    let answer = match method {
        "POST" => run(write(db, web)),
        "GET" | "HEAD" => run(read(db, web)),
        _ => {
            return Some((
                405,
                "Method Not Allowed",
                "GET or POST /visits\n".to_owned(),
            ));
        }
    };
    Some(match answer {
        Ok(text) => (200, "OK", text),
        Err(why) => (
            503,
            "Service Unavailable",
            format!("{web}: database: {why}\n"),
        ),
    })
}

fn run(f: impl Future<Output = Result<String, String>>) -> Result<String, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    rt.block_on(async { tokio::time::timeout(DB_TIMEOUT, f).await })
        .unwrap_or_else(|_| Err(format!("no answer within {DB_TIMEOUT:?}")))
}

async fn connect(db: &VisitsDb, vip: SocketAddr) -> Result<Conn, String> {
    let password = std::fs::read_to_string(&db.password_file).map_err(|e| {
        format!(
            "{}: {e} (does this lab have databases?)",
            db.password_file.display()
        )
    })?;
    let opts = OptsBuilder::default()
        .ip_or_hostname(vip.ip().to_string())
        .tcp_port(vip.port())
        .prefer_socket(false)
        .user(Some(APP_USER))
        .pass(Some(password.trim_end().to_owned()))
        .db_name(Some("app"));
    Conn::new(opts)
        .await
        .map_err(|e| format!("connecting to {vip}: {e}"))
}

async fn write(db: &VisitsDb, web: &str) -> Result<String, String> {
    let mut c = connect(db, db.write).await?;
    c.exec_drop(
        format!("INSERT INTO {VISITS_TABLE} (seq, writer, server_id) VALUES (0, ?, @@server_id)"),
        (web,),
    )
    .await
    .map_err(|e| format!("insert via {}: {e}", db.write))?;
    let id: Option<u64> = c
        .query_first("SELECT @@server_id")
        .await
        .map_err(|e| e.to_string())?;
    let _ = c.disconnect().await;
    Ok(format!(
        "{web}: visit recorded by db{} (write VIP {})\n",
        id.unwrap_or(0),
        db.write
    ))
}

async fn read(db: &VisitsDb, web: &str) -> Result<String, String> {
    let mut c = connect(db, db.read).await?;
    let row: Option<(u64, u64)> = c
        .query_first(format!("SELECT @@server_id, COUNT(*) FROM {VISITS_TABLE}"))
        .await
        .map_err(|e| format!("count via {}: {e}", db.read))?;
    let _ = c.disconnect().await;
    let (id, count) = row.unwrap_or_default();
    Ok(format!(
        "{web}: {count} visits, read from db{id} (read VIP {})\n",
        db.read
    ))
}
