//! `check = "tls"`: a TLS handshake with the backend (rustls), optionally
//! with SNI and verified against a CA; the probe also reads the server
//! certificate's expiry (`notAfter`), which the metrics export so an
//! expiring certificate shows before clients see it.
//!
//! rustls is synchronous: the connection is made on the runtime (its socket
//! bound first to the probe's source address, if it has one: full NAT's,
//! `health::probe_source`), then the handshake runs on a blocking thread
//! over the std socket, whose read and write timeouts end at the probe's
//! deadline.

use std::{
    io::ErrorKind,
    net::{IpAddr, SocketAddr, TcpStream},
    sync::Arc,
    time::{Duration, Instant},
};

use rustls::{
    ClientConfig, ClientConnection, DigitallySignedStruct, RootCertStore, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{WebPkiSupportedAlgorithms, ring},
    pki_types::{CertificateDer, ServerName, UnixTime},
};

use super::probe::{ProbeError, connect_from, from, io_reason, is_local};
use crate::config::{TlsCheck, duration::show};

/// A passed handshake: when the server's certificate expires (seconds
/// since the Unix epoch), if it could be read.
pub type Expiry = Option<i64>;

/// One TLS probe of `address`, from `source` if given (its socket bound
/// to that address before it connects), all within `timeout`.
pub async fn probe(
    address: SocketAddr,
    source: Option<IpAddr>,
    check: &TlsCheck,
    timeout: Duration,
) -> Result<Expiry, ProbeError> {
    let deadline = Instant::now() + timeout;
    let sock = connect(address, source, timeout).await?;
    let check = check.clone();
    tokio::task::spawn_blocking(move || handshake(sock, address, &check, deadline, timeout))
        .await
        .map_err(|e| ProbeError::Backend(format!("tls probe of {address}: {e}")))?
}

/// The probe's TCP connection, as a blocking std socket for rustls.
async fn connect(
    address: SocketAddr,
    source: Option<IpAddr>,
    timeout: Duration,
) -> Result<TcpStream, ProbeError> {
    let timed_out = || format!("timed out after {}", show(timeout));
    let stream = tokio::time::timeout(timeout, connect_from(address, source))
        .await
        .map_err(|_| ProbeError::Backend(format!("connect {address}: {}", timed_out())))?
        .map_err(|e| {
            let why = format!("connect {address}{}: {}", from(source), io_reason(&e));
            if e.kind() == ErrorKind::TimedOut {
                ProbeError::Backend(format!("connect {address}: {}", timed_out()))
            } else if is_local(&e) {
                ProbeError::Agent(why)
            } else {
                ProbeError::Backend(why)
            }
        })?;
    let local = |e: std::io::Error| ProbeError::Agent(format!("connect {address}: {e}"));
    let sock = stream.into_std().map_err(local)?;
    sock.set_nonblocking(false).map_err(local)?;
    Ok(sock)
}

fn handshake(
    mut sock: TcpStream,
    address: SocketAddr,
    check: &TlsCheck,
    deadline: Instant,
    timeout: Duration,
) -> Result<Expiry, ProbeError> {
    let timed_out = || format!("timed out after {}", show(timeout));
    let config = client_config(check).map_err(|e| format!("tls config: {e}"))?;
    let name = match &check.sni {
        Some(sni) => ServerName::try_from(sni.clone()).map_err(|e| format!("sni {sni:?}: {e}"))?,
        None => ServerName::IpAddress(address.ip().into()),
    };
    let mut conn = ClientConnection::new(config, name)
        .map_err(|e| format!("tls handshake with {address}: {e}"))?;
    while conn.is_handshaking() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("tls handshake with {address}: {}", timed_out()).into());
        }
        // Both can only fail for a zero duration, excluded above.
        let _ = sock.set_read_timeout(Some(left));
        let _ = sock.set_write_timeout(Some(left));
        conn.complete_io(&mut sock).map_err(|e| match e.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => {
                format!("tls handshake with {address}: {}", timed_out())
            }
            _ => format!("tls handshake with {address}: {}", io_reason(&e)),
        })?;
    }
    conn.send_close_notify();
    let _ = conn.complete_io(&mut sock);
    Ok(conn
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(|leaf| not_after(leaf)))
}

/// The certificate's `notAfter`, in seconds since the Unix epoch.
pub fn not_after(der: &[u8]) -> Option<i64> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(cert.validity().not_after.timestamp())
}

fn client_config(check: &TlsCheck) -> Result<Arc<ClientConfig>, rustls::Error> {
    let provider = Arc::new(ring::default_provider());
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()?;
    let config = match &check.ca {
        Some((_, certs)) => {
            let mut roots = RootCertStore::empty();
            for der in certs {
                roots.add(CertificateDer::from(der.clone()))?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(HandshakeOnly(
                provider.signature_verification_algorithms,
            )))
            .with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// Without a CA: any certificate is accepted (the check is that the
/// server completes a handshake), but the handshake's signatures are still
/// verified with the certificate's key.
#[derive(Debug)]
struct HandshakeOnly(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for HandshakeOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::Write as _,
        net::{SocketAddrV4, TcpListener},
        path::PathBuf,
    };

    use rcgen::{CertificateParams, KeyPair};
    use rustls::{ServerConfig, ServerConnection, pki_types::PrivateKeyDer};

    use super::*;

    const T: Duration = Duration::from_secs(2);

    /// The probe with a backend's failure as its text.
    async fn probe(
        address: SocketAddrV4,
        check: &TlsCheck,
        timeout: Duration,
    ) -> Result<Expiry, String> {
        super::probe(address.into(), None, check, timeout)
            .await
            .map_err(ProbeError::expect_backend)
    }

    /// A self-signed certificate for `name`, expiring at `not_after`
    /// (seconds since the epoch), and its key.
    fn certificate(
        name: &str,
        not_after: i64,
    ) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
        let mut params = CertificateParams::new(vec![name.to_owned()]).expect("params");
        params.not_after = time::OffsetDateTime::from_unix_timestamp(not_after).expect("time");
        let key = KeyPair::generate().expect("key");
        let cert = params.self_signed(&key).expect("sign");
        (
            cert.der().clone(),
            PrivateKeyDer::try_from(key.serialize_der()).expect("key der"),
        )
    }

    /// A TLS server on loopback completing one handshake per connection.
    fn server(cert: CertificateDer<'static>, key: PrivateKeyDer<'static>) -> SocketAddrV4 {
        server_seeing(cert, key).0
    }

    /// [`server`], and the address each connection came from.
    fn server_seeing(
        cert: CertificateDer<'static>,
        key: PrivateKeyDer<'static>,
    ) -> (SocketAddrV4, std::sync::mpsc::Receiver<SocketAddr>) {
        let (peers, seen) = std::sync::mpsc::channel();
        let config = Arc::new(
            ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
                .with_safe_default_protocol_versions()
                .expect("versions")
                .with_no_client_auth()
                .with_single_cert(vec![cert], key)
                .expect("server config"),
        );
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = match listener.local_addr().expect("addr") {
            SocketAddr::V4(a) => a,
            other => panic!("{other}"),
        };
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                if let Ok(peer) = stream.peer_addr() {
                    let _ = peers.send(peer);
                }
                let Ok(mut conn) = ServerConnection::new(Arc::clone(&config)) else {
                    return;
                };
                let _ = stream.set_read_timeout(Some(T));
                while conn.is_handshaking() {
                    if conn.complete_io(&mut stream).is_err() {
                        break;
                    }
                }
                let _ = conn.complete_io(&mut stream);
                let _ = stream.flush();
            }
        });
        (addr, seen)
    }

    fn tls(sni: Option<&str>, ca: Option<&CertificateDer<'_>>) -> TlsCheck {
        TlsCheck {
            sni: sni.map(str::to_owned),
            ca: ca.map(|c| (PathBuf::from("/ca.pem"), vec![c.to_vec()])),
        }
    }

    #[tokio::test]
    async fn a_handshake_passes_and_reads_the_expiry() {
        let expires = 1_900_000_000;
        let (cert, key) = certificate("www.foobar.com", expires);
        let addr = server(cert.clone(), key);
        // No CA: the handshake alone; the expiry is read either way.
        assert_eq!(probe(addr, &tls(None, None), T).await, Ok(Some(expires)));
        // Verified against its CA (self-signed) with the name it holds.
        assert_eq!(
            probe(addr, &tls(Some("www.foobar.com"), Some(&cert)), T).await,
            Ok(Some(expires))
        );
        // Another name, or another CA: rejected, with the reason.
        let why = probe(addr, &tls(Some("other.example"), Some(&cert)), T)
            .await
            .expect_err("wrong name");
        assert!(
            why.starts_with(&format!("tls handshake with {addr}:")),
            "{why}"
        );
        assert!(why.contains("certificate"), "{why}");
        let (stranger, _) = certificate("www.foobar.com", expires);
        assert!(
            probe(addr, &tls(Some("www.foobar.com"), Some(&stranger)), T)
                .await
                .is_err()
        );
    }

    /// A full-NAT service's TLS probes come from its source address
    /// (`health::probe_source`), as its TCP and HTTP probes do.
    #[tokio::test]
    async fn a_probe_from_a_source_address_comes_from_it() {
        let (cert, key) = certificate("www.foobar.com", 1_900_000_000);
        let (addr, seen) = server_seeing(cert, key);
        for source in [[127, 0, 0, 7], [127, 0, 0, 9]] {
            let source = IpAddr::from(source);
            let passed = super::probe(addr.into(), Some(source), &tls(None, None), T).await;
            assert!(passed.is_ok(), "{passed:?}");
            let peer = seen.recv_timeout(T).expect("the server saw the probe");
            assert_eq!(peer.ip(), source);
        }
        // A source this host does not have: the agent's error, not the
        // backend's.
        let why = super::probe(
            addr.into(),
            Some([192, 0, 2, 1].into()),
            &tls(None, None),
            T,
        )
        .await
        .expect_err("no such source");
        assert!(matches!(why, ProbeError::Agent(_)), "{why:?}");
        assert!(
            why.to_string()
                .contains(&format!("connect {addr} from 192.0.2.1:")),
            "{why}"
        );
    }

    #[tokio::test]
    async fn a_closed_port_or_a_silent_server_fails() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = match listener.local_addr().expect("addr") {
            SocketAddr::V4(a) => a,
            other => panic!("{other}"),
        };
        // Accepted by the kernel, never answered: the deadline ends it.
        let start = Instant::now();
        let why = probe(addr, &tls(None, None), Duration::from_millis(300)).await;
        assert_eq!(
            why,
            Err(format!("tls handshake with {addr}: timed out after 300ms"))
        );
        assert!(start.elapsed() < Duration::from_secs(2));
        drop(listener);
        let why = probe(addr, &tls(None, None), T).await;
        assert_eq!(why, Err(format!("connect {addr}: connection refused")));
    }

    #[test]
    fn tls_checks_are_read_and_checked_like_the_rest_of_the_file() {
        use crate::config::{self, CheckKind};
        let dir = std::env::temp_dir().join(format!("lb-tls-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let (cert, _) = certificate("www.foobar.com", 1_900_000_000);
        let pem = dir.join("ca.pem");
        std::fs::write(
            &pem,
            format!(
                "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
                data_encoding::BASE64.encode(&cert)
            ),
        )
        .expect("pem");
        let site = |health: &str| {
            format!(
                "[dataplane]\ninterfaces = [\"lb-front\"]\n\n[[service]]\nname = \"www-tls\"\n\
                 vip = \"198.18.0.10:443\"\nhealth = {{ check = \"tls\", {health} }}\n\
                 backends = [ {{ address = \"198.19.0.11:443\" }} ]\n"
            )
        };
        let parse = |h: &str| config::parse(&site(h), std::path::Path::new("c.toml"));
        let cfg = parse(&format!(
            r#"sni = "www.foobar.com", ca-file = "{}""#,
            pem.display()
        ))
        .expect("valid");
        let Some(CheckKind::Tls(t)) = cfg.services[0].health.as_ref().map(|h| &h.check) else {
            panic!("not a tls check");
        };
        assert_eq!(
            t.ca.as_ref().map(|(_, c)| c.clone()),
            Some(vec![cert.to_vec()])
        );
        assert_eq!(
            config::check(&cfg, std::path::Path::new("x")).expect("check"),
            cfg
        );
        for (health, want) in [
            (
                r#"sni = "not a name""#.to_owned(),
                "health.sni: not a DNS name",
            ),
            (
                r#"ca-file = "ca.pem""#.to_owned(),
                "health.ca-file: must be an absolute path",
            ),
            (
                format!(r#"ca-file = "{}""#, dir.join("none.pem").display()),
                "health.ca-file:",
            ),
            (
                r#"send = "x""#.to_owned(),
                "health.send: only valid with check = \"udp\"",
            ),
        ] {
            let err = parse(&health).expect_err(&health).to_string();
            assert!(err.contains(want), "{health}: {err}");
        }
        let tcp = site(r#"sni = "a.b""#).replace(r#"check = "tls""#, r#"check = "tcp""#);
        let err = config::parse(&tcp, std::path::Path::new("c.toml"))
            .expect_err("sni on tcp")
            .to_string();
        assert!(
            err.contains("health.sni: only valid with check = \"tls\""),
            "{err}"
        );
        std::fs::remove_dir_all(dir).expect("cleanup");
    }
}
