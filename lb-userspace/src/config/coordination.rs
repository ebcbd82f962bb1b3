//! `[coordination]`: the etcd cluster through which several LBs running
//! the same pools agree on who promotes and on the primary (coord/).

use std::{path::PathBuf, time::Duration};

use std::sync::Arc;

use rustls::{
    ClientConfig, RootCertStore,
    crypto::ring,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _},
};
use serde::Deserialize;

use super::{Secret, duration, validate::Validator};

/// `[coordination]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Coordination {
    /// etcd's client URLs, `http://IP:port` or `https://IP:port` (one
    /// scheme for all; tried in turn).
    pub etcd: Vec<String>,
    /// This LB's name in the election; unique among the LBs.
    pub name: String,
    /// The lease's TTL: a dead leader's pools are taken over within about
    /// this long (whole seconds).
    pub lease_ttl: Duration,
    /// With `https://` endpoints: the CA and client certificate.
    pub tls: Option<EtcdTls>,
    /// etcd's authentication (`user`, `password-file`), if enabled there.
    pub login: Option<EtcdLogin>,
}

/// `ca-file` (the CA etcd's server certificates are verified against,
/// required with https) and `cert-file` + `key-file` (a client
/// certificate, for etcd's `--client-cert-auth`), read at load and reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdTls {
    pub ca_file: PathBuf,
    /// The CA file's certificates (DER).
    pub ca: Vec<Vec<u8>>,
    pub client: Option<ClientCert>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCert {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// The certificate chain (DER).
    pub chain: Vec<Vec<u8>>,
    /// The private key (DER).
    pub key: KeyDer,
}

/// A private key's DER bytes: never shown by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyDer(pub Vec<u8>);

impl std::fmt::Debug for KeyDer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyDer(***)")
    }
}

/// etcd's user and password (`POST /v3/auth/authenticate` → a token sent
/// with every call).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdLogin {
    pub user: String,
    pub password: Secret,
    pub password_file: PathBuf,
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
    ca_file: Option<String>,
    cert_file: Option<String>,
    key_file: Option<String>,
    user: Option<String>,
    password_file: Option<String>,
}

impl From<&Coordination> for RawCoordination {
    fn from(c: &Coordination) -> RawCoordination {
        let path = |p: &PathBuf| Some(p.display().to_string());
        let client = c.tls.as_ref().and_then(|t| t.client.as_ref());
        RawCoordination {
            etcd: Some(c.etcd.clone()),
            name: Some(c.name.clone()),
            lease_ttl: Some(duration::show(c.lease_ttl)),
            ca_file: c.tls.as_ref().and_then(|t| path(&t.ca_file)),
            cert_file: client.and_then(|k| path(&k.cert_file)),
            key_file: client.and_then(|k| path(&k.key_file)),
            user: c.login.as_ref().map(|l| l.user.clone()),
            password_file: c.login.as_ref().and_then(|l| path(&l.password_file)),
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
        let https = etcd[0].starts_with("https://");
        let scheme = if https { "https://" } else { "http://" };
        for (i, e) in etcd.iter().enumerate() {
            let key = format!("coordination.etcd[{i}]");
            let Some(authority) = e.strip_prefix(scheme) else {
                return Err(self.err(
                    key,
                    format!(
                        "{e:?}: an etcd client URL {scheme}IP:port (every endpoint with the scheme of the first)"
                    ),
                ));
            };
            let authority = authority.trim_end_matches('/');
            if authority.parse::<std::net::SocketAddr>().is_err() {
                return Err(self.err(
                    key,
                    format!("{e:?}: expected {scheme}IP:port, e.g. \"{scheme}198.18.0.1:2379\""),
                ));
            }
            if etcd[..i].contains(e) {
                return Err(self.err(key, format!("{e} is listed twice")));
            }
        }
        let tls = self.etcd_tls(https, raw.ca_file, raw.cert_file, raw.key_file)?;
        let login = match (raw.user, raw.password_file) {
            (None, None) => None,
            (None, Some(_)) => {
                return Err(self.err("coordination.user", "password-file is given without a user"));
            }
            (Some(_), None) => {
                return Err(self.err(
                    "coordination.password-file",
                    "required with user (the password is read from a file, never inline)",
                ));
            }
            (Some(user), Some(file)) => {
                if user.is_empty() || user.chars().any(char::is_control) {
                    return Err(self.err(
                        "coordination.user",
                        format!("not a usable user name: {user:?}"),
                    ));
                }
                let path = absolute(self, "coordination.password-file", &file)?;
                let password = super::pool::read_password(&path).map_err(|why| {
                    self.err("coordination.password-file", format!("{file}: {why}"))
                })?;
                Some(EtcdLogin {
                    user,
                    password: Secret::new(password),
                    password_file: path,
                })
            }
        };
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
            tls,
            login,
        })
    }

    /// `ca-file`, `cert-file` and `key-file`: only with https endpoints,
    /// the CA required there, the client certificate and key together.
    fn etcd_tls(
        &self,
        https: bool,
        ca_file: Option<String>,
        cert_file: Option<String>,
        key_file: Option<String>,
    ) -> Result<Option<EtcdTls>, super::ConfigError> {
        if !https {
            for (key, given) in [
                ("ca-file", &ca_file),
                ("cert-file", &cert_file),
                ("key-file", &key_file),
            ] {
                if given.is_some() {
                    return Err(self.err(
                        format!("coordination.{key}"),
                        "only with https:// etcd endpoints",
                    ));
                }
            }
            return Ok(None);
        }
        let Some(ca_text) = ca_file else {
            return Err(self.err(
                "coordination.ca-file",
                "required with https:// endpoints: the PEM CA that signed etcd's server certificates",
            ));
        };
        let ca_path = absolute(self, "coordination.ca-file", &ca_text)?;
        let ca = pem_certs(self, "coordination.ca-file", &ca_path)?;
        let client = match (cert_file, key_file) {
            (None, None) => None,
            (Some(_), None) => {
                return Err(self.err("coordination.key-file", "required with cert-file"));
            }
            (None, Some(_)) => {
                return Err(self.err("coordination.cert-file", "required with key-file"));
            }
            (Some(cert), Some(key)) => {
                let cert_file = absolute(self, "coordination.cert-file", &cert)?;
                let key_file = absolute(self, "coordination.key-file", &key)?;
                let chain = pem_certs(self, "coordination.cert-file", &cert_file)?;
                let der = PrivateKeyDer::from_pem_file(&key_file).map_err(|e| {
                    self.err(
                        "coordination.key-file",
                        format!("{}: no usable PEM private key: {e}", key_file.display()),
                    )
                })?;
                Some(ClientCert {
                    cert_file,
                    key_file,
                    chain,
                    key: KeyDer(der.secret_der().to_vec()),
                })
            }
        };
        let tls = EtcdTls {
            ca_file: ca_path,
            ca,
            client,
        };
        // What the client will build from them (e.g. a key that is not the
        // certificate's), refused now rather than at every call.
        tls.client_config().map_err(|why| {
            let key = if tls.client.is_some() {
                "coordination.key-file"
            } else {
                "coordination.ca-file"
            };
            self.err(key, why)
        })?;
        Ok(Some(tls))
    }
}

fn absolute(v: &Validator<'_>, key: &str, text: &str) -> Result<PathBuf, super::ConfigError> {
    let path = PathBuf::from(text);
    if !path.is_absolute() {
        return Err(v.err(key, format!("must be an absolute path, got {text:?}")));
    }
    Ok(path)
}

/// Every PEM certificate in `path` (DER); at least one.
fn pem_certs(
    v: &Validator<'_>,
    key: &str,
    path: &std::path::Path,
) -> Result<Vec<Vec<u8>>, super::ConfigError> {
    let certs: Vec<Vec<u8>> = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.map(|c| c.map(|c| c.to_vec())).collect())
        .map_err(|e| v.err(key, format!("{}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(v.err(key, format!("{}: no PEM certificate in it", path.display())));
    }
    Ok(certs)
}

impl EtcdTls {
    /// The TLS client of `https://` endpoints: etcd's certificates verified
    /// against the configured CA (by IP address: the endpoints are
    /// addresses), the client certificate presented if given.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, String> {
        let mut roots = RootCertStore::empty();
        for der in &self.ca {
            roots
                .add(CertificateDer::from(der.clone()))
                .map_err(|e| format!("{}: {e}", self.ca_file.display()))?;
        }
        let builder = ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots);
        let config = match &self.client {
            None => builder.with_no_client_auth(),
            Some(c) => {
                let chain = c
                    .chain
                    .iter()
                    .map(|d| CertificateDer::from(d.clone()))
                    .collect();
                let key = PrivateKeyDer::try_from(c.key.0.clone())
                    .map_err(|e| format!("{}: {e}", c.key_file.display()))?;
                builder.with_client_auth_cert(chain, key).map_err(|e| {
                    format!(
                        "{} with {}: {e}",
                        c.cert_file.display(),
                        c.key_file.display()
                    )
                })?
            }
        };
        Ok(Arc::new(config))
    }
}
