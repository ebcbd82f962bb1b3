//! A real etcd cluster for tests and the lab (`[coordination]`): one
//! `etcd` (Debian's `etcd-server`) per member, each in the namespace given,
//! listening on its address (client port 2379, peer port 2380), data in a
//! directory of its own; stopped and removed on drop. Optionally with TLS
//! on the client URLs and client certificates required ([`EtcdPki`]), and
//! with etcd's authentication enabled ([`EtcdCluster::enable_auth`]).

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use base64::{Engine as _, engine::general_purpose::STANDARD as B64};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use serde_json::json;

use super::netns::{SpawnGated as _, in_netns, require_tool};
use crate::{
    config::{ClientCert, Coordination, EtcdLogin, EtcdTls, KeyDer, Secret},
    coord::etcd::Etcd,
};

pub const CLIENT_PORT: u16 = 2379;
const PEER_PORT: u16 = 2380;

/// One member: its namespace and address.
#[derive(Debug, Clone)]
pub struct Member {
    pub ns: String,
    pub ip: Ipv4Addr,
}

pub struct EtcdCluster {
    members: Vec<Member>,
    children: Vec<Option<Child>>,
    dir: PathBuf,
    pki: Option<EtcdPki>,
    /// The root login once [`EtcdCluster::enable_auth`] ran.
    root: Option<(String, String)>,
}

/// PEM files for an etcd with TLS: a CA, one server certificate for every
/// member's address (also a client certificate: etcd's gateway dials its
/// own member with it), and a client certificate for the LBs, each key
/// mode 0600.
#[derive(Debug, Clone)]
pub struct EtcdPki {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl EtcdPki {
    /// Writes a fresh PKI for `members` into `dir` (created).
    pub fn write(dir: &Path, members: &[Member]) -> anyhow::Result<EtcdPki> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "etcd test CA");
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let ca = Issuer::new(ca_params, ca_key);
        let leaf =
            |name: &str, ips: &[Ipv4Addr], server: bool| -> anyhow::Result<(String, String)> {
                let mut params = CertificateParams::new(Vec::<String>::new())?;
                // No CommonName on the client certificate: with etcd's auth
                // on, its gateway refuses a client certificate that has one
                // (a CN would name the user over gRPC, not the gateway).
                params.distinguished_name = rcgen::DistinguishedName::new();
                let field = if server {
                    DnType::CommonName
                } else {
                    DnType::OrganizationName
                };
                params.distinguished_name.push(field, name);
                for ip in ips {
                    params
                        .subject_alt_names
                        .push(SanType::IpAddress(std::net::IpAddr::V4(*ip)));
                }
                params.key_usages = vec![
                    KeyUsagePurpose::DigitalSignature,
                    KeyUsagePurpose::KeyEncipherment,
                ];
                params.extended_key_usages = if server {
                    vec![
                        ExtendedKeyUsagePurpose::ServerAuth,
                        ExtendedKeyUsagePurpose::ClientAuth,
                    ]
                } else {
                    vec![ExtendedKeyUsagePurpose::ClientAuth]
                };
                let key = KeyPair::generate()?;
                let cert = params.signed_by(&key, &ca)?;
                Ok((cert.pem(), key.serialize_pem()))
            };
        let ips: Vec<Ipv4Addr> = members.iter().map(|m| m.ip).collect();
        let (server_pem, server_key_pem) = leaf("etcd", &ips, true)?;
        let (client_pem, client_key_pem) = leaf("lb", &[], false)?;
        let pki = EtcdPki {
            ca: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client.key"),
        };
        for (path, text, private) in [
            (&pki.ca, ca_cert.pem(), false),
            (&pki.server_cert, server_pem, false),
            (&pki.server_key, server_key_pem, true),
            (&pki.client_cert, client_pem, false),
            (&pki.client_key, client_key_pem, true),
        ] {
            write_file(path, &text, private)?;
        }
        Ok(pki)
    }

    /// `[coordination]`'s TLS settings for these files (with the client
    /// certificate or without it).
    pub fn tls(&self, with_client_cert: bool) -> anyhow::Result<EtcdTls> {
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
        let certs = |p: &Path| -> anyhow::Result<Vec<Vec<u8>>> {
            CertificateDer::pem_file_iter(p)?
                .map(|c| Ok(c?.to_vec()))
                .collect()
        };
        let client = if with_client_cert {
            let key = PrivateKeyDer::from_pem_file(&self.client_key)?;
            Some(ClientCert {
                cert_file: self.client_cert.clone(),
                key_file: self.client_key.clone(),
                chain: certs(&self.client_cert)?,
                key: KeyDer(key.secret_der().to_vec()),
            })
        } else {
            None
        };
        Ok(EtcdTls {
            ca_file: self.ca.clone(),
            ca: certs(&self.ca)?,
            client,
        })
    }
}

fn write_file(path: &Path, text: &str, private: bool) -> anyhow::Result<()> {
    use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
    let _ = std::fs::remove_file(path);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

impl EtcdCluster {
    /// Starts every member in `dir` (created, removed on drop) and waits
    /// until each answers.
    pub fn start(token: &str, members: Vec<Member>, dir: &Path) -> anyhow::Result<EtcdCluster> {
        EtcdCluster::start_with(token, members, dir, None)
    }

    /// [`EtcdCluster::start`], with `pki`: `https://` client URLs with its
    /// server certificate, and client certificates signed by its CA
    /// required (`--client-cert-auth`).
    pub fn start_with(
        token: &str,
        members: Vec<Member>,
        dir: &Path,
        pki: Option<EtcdPki>,
    ) -> anyhow::Result<EtcdCluster> {
        require_tool("etcd", "run `cargo xtask setup` (installs etcd-server)")?;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let initial: Vec<String> = members
            .iter()
            .enumerate()
            .map(|(i, m)| format!("etcd{}=http://{}:{PEER_PORT}", i + 1, m.ip))
            .collect();
        let mut cluster = EtcdCluster {
            members,
            children: Vec::new(),
            dir: dir.to_path_buf(),
            pki,
            root: None,
        };
        let scheme = cluster.scheme();
        let tls_args: Vec<String> = cluster
            .pki
            .as_ref()
            .map(|p| {
                vec![
                    format!("--cert-file={}", p.server_cert.display()),
                    format!("--key-file={}", p.server_key.display()),
                    format!("--trusted-ca-file={}", p.ca.display()),
                    "--client-cert-auth".to_owned(),
                ]
            })
            .unwrap_or_default();
        for i in 0..cluster.members.len() {
            let m = cluster.members[i].clone();
            let log = std::fs::File::create(dir.join(format!("etcd{}.log", i + 1)))?;
            let child = Command::new("ip")
                .args(["netns", "exec", &m.ns, "etcd"])
                .arg(format!("--name=etcd{}", i + 1))
                .arg(format!(
                    "--data-dir={}",
                    dir.join(format!("etcd{}", i + 1)).display()
                ))
                .arg(format!(
                    "--listen-client-urls={scheme}://{}:{CLIENT_PORT}",
                    m.ip
                ))
                .arg(format!(
                    "--advertise-client-urls={scheme}://{}:{CLIENT_PORT}",
                    m.ip
                ))
                .args(&tls_args)
                .arg(format!("--listen-peer-urls=http://{}:{PEER_PORT}", m.ip))
                .arg(format!(
                    "--initial-advertise-peer-urls=http://{}:{PEER_PORT}",
                    m.ip
                ))
                .arg(format!("--initial-cluster={}", initial.join(",")))
                .arg(format!("--initial-cluster-token={token}"))
                .arg("--initial-cluster-state=new")
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn_gated()?;
            cluster.children.push(Some(child));
        }
        for m in cluster.members.clone() {
            cluster.wait_ready(&m, Duration::from_secs(20))?;
        }
        Ok(cluster)
    }

    fn scheme(&self) -> &'static str {
        if self.pki.is_some() { "https" } else { "http" }
    }

    /// `http://ip:2379` (or `https://`) of every member.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("{}://{}:{CLIENT_PORT}", self.scheme(), m.ip))
            .collect()
    }

    /// A `[coordination]` for `endpoints` with this cluster's TLS (the
    /// client certificate included) and the root login once auth is on.
    fn admin_config(&self, endpoints: Vec<String>) -> anyhow::Result<Coordination> {
        Ok(Coordination {
            etcd: endpoints,
            name: "admin".into(),
            lease_ttl: Duration::from_secs(5),
            tls: self.pki.as_ref().map(|p| p.tls(true)).transpose()?,
            login: self.root.as_ref().map(|(user, password)| EtcdLogin {
                user: user.clone(),
                password: Secret::new(password.clone()),
                password_file: PathBuf::new(),
            }),
        })
    }

    /// Turns etcd's authentication on, as `etcdctl` would: a `root` user
    /// (password `root_password`) with the root role, and `user` (password
    /// `password`) with a role allowed to read and write the keys under
    /// `prefix` only. Call from a namespace that reaches the first member.
    pub fn enable_auth(
        &mut self,
        root_password: &str,
        user: &str,
        password: &str,
        prefix: &str,
    ) -> anyhow::Result<()> {
        let mut end = prefix.as_bytes().to_vec();
        if let Some(last) = end.last_mut() {
            *last += 1;
        }
        let steps = [
            ("/v3/auth/role/add", json!({ "name": "root" })),
            (
                "/v3/auth/user/add",
                json!({ "name": "root", "password": root_password }),
            ),
            (
                "/v3/auth/user/grant",
                json!({ "user": "root", "role": "root" }),
            ),
            ("/v3/auth/role/add", json!({ "name": user })),
            (
                "/v3/auth/role/grant",
                json!({ "name": user, "perm": { "permType": "READWRITE", "key": B64.encode(prefix), "range_end": B64.encode(&end) } }),
            ),
            (
                "/v3/auth/user/add",
                json!({ "name": user, "password": password }),
            ),
            ("/v3/auth/user/grant", json!({ "user": user, "role": user })),
            ("/v3/auth/enable", json!({})),
        ];
        let cfg = self.admin_config(self.endpoints())?;
        let ns = self.members[0].ns.clone();
        in_netns(&ns, move || -> anyhow::Result<()> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let etcd = Etcd::from_config(&cfg, Duration::from_secs(5))?;
            for (path, body) in steps {
                let answer = rt.block_on(etcd.request(path, &body));
                answer.with_context(|| format!("etcd {path} {body}"))?;
            }
            Ok(())
        })??;
        self.root = Some(("root".into(), root_password.into()));
        Ok(())
    }

    /// Leaves the members running and their data in place (`lb lab up`:
    /// `lb lab down` kills them with the lab's namespaces and removes the
    /// run dir holding their data).
    pub fn detach(mut self) {
        // A dropped `Child` is neither killed nor waited for.
        self.children.clear();
        std::mem::forget(self);
    }

    fn wait_ready(&mut self, m: &Member, limit: Duration) -> anyhow::Result<()> {
        let endpoint = format!("{}://{}:{CLIENT_PORT}", self.scheme(), m.ip);
        let cfg = self.admin_config(vec![endpoint.clone()])?;
        let start = Instant::now();
        loop {
            let cfg = cfg.clone();
            let answer = in_netns(&m.ns, move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                let etcd = Etcd::from_config(&cfg, Duration::from_secs(1))?;
                rt.block_on(etcd.status()).map_err(anyhow::Error::from)
            })?;
            match answer {
                Ok(()) => return Ok(()),
                Err(e) if start.elapsed() > limit => {
                    bail!(
                        "etcd at {endpoint} (namespace {}) not ready after {limit:?}: {e:#} (log in {})",
                        m.ns,
                        self.dir.display()
                    )
                }
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for child in self.children.iter_mut().flatten() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
