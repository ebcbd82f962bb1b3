//! The lab's TLS: a lab CA, a certificate and key per web server (made with
//! rcgen when the lab is built), and the HTTPS side of `lb lab-serve`
//! (rustls over plain std threads).
//!
//! TLS is passthrough: the web servers hold the certificates and keys and
//! terminate TLS; the load balancer only rewrites addresses, ports and MACs
//! of the TCP segments that carry it. Nothing key-related is given to the
//! LB's namespace or the agent. The CA's private key never touches the
//! disk: it signs the web servers' certificates in memory and is dropped,
//! so only `ca.pem` (public) is there for clients to verify against.

use std::{
    fs,
    io::Write as _,
    net::{IpAddr, Ipv4Addr, TcpStream},
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::{
    ServerConfig, ServerConnection, StreamOwned,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _},
};

/// The site's name: every web server's certificate is valid for it.
pub const SITE_NAME: &str = "www.foobar.com";
/// Port of the HTTPS service (on the VIP and on every web server).
pub const HTTPS_PORT: u16 = 443;
/// A TLS client that connects and then says nothing is dropped after this,
/// so it cannot hold a server thread forever.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The web servers' certificates expire this many days after the lab is
/// made (the TLS health check's expiry metric shows it).
pub const LAB_CERT_DAYS: i64 = 30;

/// Where a lab's CA certificate is written: `{run_dir}/ca.pem`.
pub fn ca_path(run_dir: &Path) -> PathBuf {
    run_dir.join("ca.pem")
}

/// Certificate (the CA is not sent: clients hold it) and key of web
/// server `name`.
pub fn web_cert_paths(run_dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let dir = run_dir.join("tls");
    (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    )
}

/// Makes the lab CA and, for each `(name, address)`, a server certificate
/// for [`SITE_NAME`], `{name}.foobar.com`, the server's own address and
/// `vip`, signed by the CA. Writes `ca.pem` and `tls/{name}.{pem,key}` under
/// `run_dir` (`tls/` mode 0700, keys 0600).
pub fn write_lab_pki(
    run_dir: &Path,
    webs: &[(&str, Ipv4Addr)],
    vip: Ipv4Addr,
) -> anyhow::Result<()> {
    let ca_key = KeyPair::generate().context("generating the lab CA key")?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "lb lab CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params
        .self_signed(&ca_key)
        .context("self-signing the lab CA")?;
    let ca = Issuer::new(ca_params, ca_key);

    let tls_dir = run_dir.join("tls");
    fs::create_dir_all(&tls_dir).with_context(|| format!("creating {}", tls_dir.display()))?;
    fs::set_permissions(&tls_dir, fs::Permissions::from_mode(0o700))
        .with_context(|| format!("restricting {} to root", tls_dir.display()))?;
    for (name, addr) in webs {
        let mut params =
            CertificateParams::new(vec![SITE_NAME.to_owned(), format!("{name}.foobar.com")])?;
        params
            .subject_alt_names
            .push(SanType::IpAddress(IpAddr::V4(*addr)));
        params
            .subject_alt_names
            .push(SanType::IpAddress(IpAddr::V4(vip)));
        params
            .distinguished_name
            .push(DnType::CommonName, SITE_NAME);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + time::Duration::days(LAB_CERT_DAYS);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().with_context(|| format!("generating {name}'s key"))?;
        let cert = params
            .signed_by(&key, &ca)
            .with_context(|| format!("signing {name}'s certificate"))?;
        let (cert_path, key_path) = web_cert_paths(run_dir, name);
        fs::write(&cert_path, cert.pem())
            .with_context(|| format!("writing {}", cert_path.display()))?;
        write_private(&key_path, key.serialize_pem().as_bytes())?;
    }
    let ca_file = ca_path(run_dir);
    fs::write(&ca_file, ca_cert.pem()).with_context(|| format!("writing {}", ca_file.display()))
}

fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let _ = fs::remove_file(path);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(bytes)
        .with_context(|| format!("writing {}", path.display()))
}

/// The rustls server config of `lab-serve --https`: the chain in `cert`
/// (PEM, leaf first) and the key in `key`; HTTP/1.1 over ALPN.
pub fn server_config(cert: &Path, key: &Path) -> anyhow::Result<Arc<ServerConfig>> {
    let chain = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading {}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing {}", cert.display()))?;
    anyhow::ensure!(!chain.is_empty(), "no certificate in {}", cert.display());
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("reading the key in {}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("loading the certificate and key")?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// One HTTPS connection: the TLS handshake, then the same HTTP/1.1 as on
/// port 80 (see `serve::http_session`).
pub fn https_connection(
    stream: TcpStream,
    config: &Arc<ServerConfig>,
    name: &str,
) -> anyhow::Result<()> {
    let _ = stream.set_nodelay(true);
    stream
        .set_read_timeout(Some(HANDSHAKE_TIMEOUT))
        .context("setting the handshake timeout")?;
    let conn = ServerConnection::new(Arc::clone(config)).context("starting a TLS session")?;
    let mut tls = StreamOwned::new(conn, stream);
    while tls.conn.is_handshaking() {
        tls.conn
            .complete_io(&mut tls.sock)
            .context("TLS handshake")?;
    }
    tls.sock
        .set_read_timeout(None)
        .context("clearing the handshake timeout")?;
    super::serve::http_session(tls, name, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lab_pki_loads_into_a_server_config() {
        let dir = std::env::temp_dir().join(format!("lb-lab-tls-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let webs = [("web1", Ipv4Addr::new(198, 19, 0, 11))];
        assert!(write_lab_pki(&dir, &webs, Ipv4Addr::new(198, 18, 0, 10)).is_ok());
        let (cert, key) = web_cert_paths(&dir, "web1");
        assert!(server_config(&cert, &key).is_ok());
        let mode = fs::metadata(&key).map(|m| m.permissions().mode());
        assert_eq!(mode.ok().map(|m| m & 0o777), Some(0o600));
        assert!(
            fs::read_to_string(ca_path(&dir)).is_ok_and(|pem| pem.contains("BEGIN CERTIFICATE"))
        );
        let _ = fs::remove_dir_all(&dir);
    }
}
