//! A small client of etcd's v3 API through its JSON gateway (`POST
//! /v3/lease/grant`, `/v3/lease/keepalive`, `/v3/kv/txn` over HTTP/1.1,
//! keys and values base64): the few calls a lease-based election and a
//! guarded record need. Over TLS (rustls, the server verified against the
//! configured CA, a client certificate if given) for `https://`
//! endpoints; with etcd's authentication, a token from
//! `/v3/auth/authenticate` in every call's `Authorization` header, taken
//! again when etcd says it is no longer valid. Why not gRPC
//! (`etcd-client`): see docs/architecture.md ("Coordination").

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use base64::{Engine, engine::general_purpose::STANDARD as B64};
use http_body_util::{BodyExt, Full};
use hyper::{Request, body::Bytes};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use serde_json::{Value, json};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};
use tokio_rustls::TlsConnector;

use crate::config::Coordination;

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("{endpoint}: {why}")]
    Call { endpoint: String, why: String },
    #[error("no etcd endpoint answered ({0})")]
    Unreachable(String),
    #[error("etcd answered something unexpected: {0}")]
    Shape(String),
    #[error("etcd's TLS settings: {0}")]
    Tls(String),
}

/// The etcd cluster's endpoints, tried in turn.
#[derive(Clone)]
pub struct Etcd {
    /// Each endpoint's URL (for messages) and address.
    endpoints: Vec<(String, SocketAddr)>,
    timeout: Duration,
    /// The endpoint that answered last, tried first: a silent member costs
    /// one timeout once, not at every call.
    preferred: Arc<AtomicUsize>,
    /// `https://` endpoints: the TLS client.
    tls: Option<TlsConnector>,
    /// etcd's user and password, and the token they gave.
    login: Option<(String, crate::config::Secret)>,
    token: Arc<Mutex<Option<String>>>,
}

/// One key as etcd holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kv {
    pub value: String,
    pub create_revision: i64,
    pub mod_revision: i64,
    pub lease: i64,
}

/// What a campaign found: the key's holder (perhaps us) and the record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Campaign {
    pub leader: Kv,
    pub record: Option<Kv>,
}

impl Etcd {
    /// `endpoints` as `http://IP:port` (validated by the config), without
    /// TLS or authentication.
    pub fn new(endpoints: &[String], timeout: Duration) -> Etcd {
        Etcd {
            endpoints: endpoints
                .iter()
                .filter_map(|e| Some((e.clone(), address(e)?)))
                .collect(),
            timeout,
            preferred: Arc::new(AtomicUsize::new(0)),
            tls: None,
            login: None,
            token: Arc::new(Mutex::new(None)),
        }
    }

    /// The client `[coordination]` describes: its endpoints, TLS and login.
    pub fn from_config(cfg: &Coordination, timeout: Duration) -> Result<Etcd, EtcdError> {
        let mut etcd = Etcd::new(&cfg.etcd, timeout);
        if let Some(tls) = &cfg.tls {
            let config = tls.client_config().map_err(EtcdError::Tls)?;
            etcd.tls = Some(TlsConnector::from(config));
        }
        etcd.login = cfg
            .login
            .as_ref()
            .map(|l| (l.user.clone(), l.password.clone()));
        Ok(etcd)
    }

    /// POSTs `body` to `path` on the first endpoint that answers.
    async fn call(&self, path: &str, body: &Value) -> Result<Value, EtcdError> {
        let mut errors = Vec::new();
        let n = self.endpoints.len();
        let first = self.preferred.load(Ordering::Relaxed);
        for i in (0..n).map(|k| (first + k) % n) {
            let (endpoint, addr) = &self.endpoints[i];
            match tokio::time::timeout(self.timeout, self.call_at(*addr, path, body)).await {
                Ok(Ok(v)) => {
                    self.preferred.store(i, Ordering::Relaxed);
                    return Ok(v);
                }
                Ok(Err(why)) => errors.push(format!("{endpoint}: {why}")),
                Err(_) => errors.push(format!("{endpoint}: no answer in {:?}", self.timeout)),
            }
        }
        Err(EtcdError::Unreachable(errors.join("; ")))
    }

    /// One call to one endpoint, with a token if etcd wants one (taken
    /// again once if etcd no longer accepts the one held).
    async fn call_at(&self, addr: SocketAddr, path: &str, body: &Value) -> Result<Value, String> {
        if self.login.is_none() {
            return self.post(addr, path, body, None).await;
        }
        let held = self.token.lock().ok().and_then(|t| t.clone());
        let token = match held {
            Some(t) => t,
            None => self.authenticate(addr).await?,
        };
        match self.post(addr, path, body, Some(&token)).await {
            Err(why) if why.contains("invalid auth token") => {
                let token = self.authenticate(addr).await?;
                self.post(addr, path, body, Some(&token)).await
            }
            other => other,
        }
    }

    /// `POST /v3/auth/authenticate` with the login: the token, kept.
    async fn authenticate(&self, addr: SocketAddr) -> Result<String, String> {
        let Some((user, password)) = &self.login else {
            return Err("no etcd login configured".to_owned());
        };
        let v = self
            .post(
                addr,
                "/v3/auth/authenticate",
                &json!({ "name": user, "password": password.expose() }),
                None,
            )
            .await
            .map_err(|why| format!("authenticating as {user}: {why}"))?;
        let token = v["token"]
            .as_str()
            .filter(|t| !t.is_empty())
            .ok_or_else(|| format!("authenticating as {user}: no token in {v}"))?
            .to_owned();
        if let Ok(mut held) = self.token.lock() {
            *held = Some(token.clone());
        }
        Ok(token)
    }

    /// One request on a new connection (TLS if configured).
    async fn post(
        &self,
        addr: SocketAddr,
        path: &str,
        body: &Value,
        token: Option<&str>,
    ) -> Result<Value, String> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let authority = addr.to_string();
        match &self.tls {
            None => exchange(stream, &authority, path, body, token).await,
            Some(tls) => {
                let name = ServerName::IpAddress(addr.ip().into());
                let stream = tls
                    .connect(name, stream)
                    .await
                    .map_err(|e| format!("TLS: {e}"))?;
                exchange(stream, &authority, path, body, token).await
            }
        }
    }

    /// Any v3 gateway call (`path` and its JSON body), with this client's
    /// TLS and login: etcd's answer.
    pub async fn request(&self, path: &str, body: &Value) -> Result<Value, EtcdError> {
        self.call(path, body).await
    }

    /// The cluster answers (a member's status).
    pub async fn status(&self) -> Result<(), EtcdError> {
        self.call("/v3/maintenance/status", &json!({}))
            .await
            .map(|_| ())
    }

    /// A new lease of `ttl` seconds: its id.
    pub async fn grant(&self, ttl: u64) -> Result<i64, EtcdError> {
        let v = self.call("/v3/lease/grant", &json!({ "TTL": ttl })).await?;
        int(&v["ID"]).ok_or_else(|| EtcdError::Shape(format!("lease grant: {v}")))
    }

    /// Renews lease `id`: its remaining TTL, 0 if it expired.
    pub async fn keepalive(&self, id: i64) -> Result<i64, EtcdError> {
        let v = self
            .call("/v3/lease/keepalive", &json!({ "ID": id.to_string() }))
            .await?;
        // The gateway streams `{"result": …}`; an expired lease has no TTL.
        Ok(int(&v["result"]["TTL"]).unwrap_or(0))
    }

    /// Takes `leader_key` for `me` under `lease` if nobody holds it, and
    /// reads who holds it and `record_key`, in one transaction.
    pub async fn campaign(
        &self,
        leader_key: &str,
        me: &str,
        lease: i64,
        record_key: &str,
    ) -> Result<Campaign, EtcdError> {
        let txn = json!({
            "compare": [{ "key": B64.encode(leader_key), "target": "CREATE", "result": "EQUAL", "create_revision": "0" }],
            "success": [
                { "request_put": { "key": B64.encode(leader_key), "value": B64.encode(me), "lease": lease.to_string() } },
                { "request_range": { "key": B64.encode(leader_key) } },
                { "request_range": { "key": B64.encode(record_key) } },
            ],
            "failure": [
                { "request_range": { "key": B64.encode(leader_key) } },
                { "request_range": { "key": B64.encode(record_key) } },
            ],
        });
        let v = self.call("/v3/kv/txn", &txn).await?;
        let responses = v["responses"].as_array().cloned().unwrap_or_default();
        let ranges: Vec<Option<Kv>> = responses
            .iter()
            .filter_map(|r| r.get("response_range"))
            .map(|r| r["kvs"].get(0).and_then(kv))
            .collect();
        let [leader, record] = ranges.as_slice() else {
            return Err(EtcdError::Shape(format!("campaign: {v}")));
        };
        let leader = leader
            .clone()
            .ok_or_else(|| EtcdError::Shape(format!("campaign: no leader key after it: {v}")))?;
        Ok(Campaign {
            leader,
            record: record.clone(),
        })
    }

    /// Writes `value` at `key` only while `leader_key` is still the one
    /// created at `leader_revision` and held by `me` (our tenure): the new
    /// mod revision, or
    /// `None` if we no longer lead.
    pub async fn put_if_leader(
        &self,
        leader_key: &str,
        (me, leader_revision): (&str, i64),
        key: &str,
        value: &str,
    ) -> Result<Option<i64>, EtcdError> {
        let txn = json!({
            "compare": [
                { "key": B64.encode(leader_key), "target": "CREATE", "result": "EQUAL", "create_revision": leader_revision.to_string() },
                { "key": B64.encode(leader_key), "target": "VALUE", "result": "EQUAL", "value": B64.encode(me) },
            ],
            "success": [{ "request_put": { "key": B64.encode(key), "value": B64.encode(value) } }],
        });
        let v = self.call("/v3/kv/txn", &txn).await?;
        if v["succeeded"].as_bool() != Some(true) {
            return Ok(None);
        }
        int(&v["header"]["revision"])
            .map(Some)
            .ok_or_else(|| EtcdError::Shape(format!("put: {v}")))
    }

    /// Deletes `key` if it was created at `revision` (a leader key of ours
    /// left by a previous run of this LB, under a lease it no longer renews).
    pub async fn delete_if_created(&self, key: &str, revision: i64) -> Result<(), EtcdError> {
        let txn = json!({
            "compare": [{ "key": B64.encode(key), "target": "CREATE", "result": "EQUAL", "create_revision": revision.to_string() }],
            "success": [{ "request_delete_range": { "key": B64.encode(key) } }],
        });
        self.call("/v3/kv/txn", &txn).await.map(|_| ())
    }
}

/// `e` and what caused it (hyper's "connection error" alone hides e.g.
/// the TLS alert that closed the connection).
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(&format!(": {c}"));
        cause = c.source();
    }
    text
}

/// The address of an `http(s)://IP:port` URL.
fn address(url: &str) -> Option<SocketAddr> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))?;
    rest.trim_end_matches('/').parse().ok()
}

async fn exchange<S>(
    stream: S,
    authority: &str,
    path: &str,
    body: &Value,
    token: Option<&str>,
) -> Result<Value, String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP: {}", with_causes(&e)))?;
    let driver = tokio::spawn(conn);
    let mut request = Request::post(path)
        .header("host", authority)
        .header("content-type", "application/json");
    if let Some(token) = token {
        request = request.header("authorization", token);
    }
    let request = request
        .body(Full::new(Bytes::from(body.to_string())))
        .map_err(|e| format!("request: {e}"))?;
    let result = async {
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("HTTP: {}", with_causes(&e)))?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("reading the answer: {e}"))?
            .to_bytes();
        let text = String::from_utf8_lossy(&bytes);
        if !status.is_success() {
            return Err(format!("HTTP {status}: {}", text.trim()));
        }
        // A streamed answer (keepalive) is one JSON object per line.
        let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
        serde_json::from_str(first).map_err(|e| format!("not JSON ({e}): {first}"))
    }
    .await;
    driver.abort();
    result
}

/// proto3's JSON writes 64-bit integers as strings (and omits zeros).
fn int(v: &Value) -> Option<i64> {
    match v {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_i64(),
        _ => None,
    }
}

fn kv(v: &Value) -> Option<Kv> {
    let text = |field: &str| {
        v[field]
            .as_str()
            .and_then(|s| B64.decode(s).ok())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
    };
    Some(Kv {
        value: text("value").unwrap_or_default(),
        create_revision: int(&v["create_revision"])?,
        mod_revision: int(&v["mod_revision"]).unwrap_or(0),
        lease: int(&v["lease"]).unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_the_gateway_are_decoded() {
        let v = json!({"key": B64.encode("/k"), "value": B64.encode("db2"), "create_revision": "7", "mod_revision": "9", "lease": "42"});
        assert_eq!(
            kv(&v),
            Some(Kv {
                value: "db2".into(),
                create_revision: 7,
                mod_revision: 9,
                lease: 42
            })
        );
        assert_eq!(int(&json!("12")), Some(12));
        assert_eq!(int(&json!(null)), None);
    }
}
