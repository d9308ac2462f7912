//! TLS on the client edge, with BuildKit's settings: the client side of
//! `buildctl --tlscacert/--tlscert/--tlskey/--tlsservername/--tlsdir` and the
//! server side of `buildkitd --tlscert/--tlskey/--tlscacert`.
//!
//! Service-to-service connections are plain unless kilnd's `[farm.tls]` gives
//! them an identity too (`dial::set_internal_tls`). Both sides use rustls with
//! ring, passed explicitly, so no process needs a global crypto provider.

use crate::Error;
use crate::replay::Replay;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// How long a client waits for the daemon's first bytes after the handshake, to
/// learn whether the daemon accepted its certificate.
const ACCEPT_WAIT: Duration = Duration::from_secs(10);

/// A client's TLS settings (buildctl's flags).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientTls {
    /// CA that signed the daemon's certificate; the system's CAs without one
    pub ca: Option<PathBuf>,
    /// client certificate (PEM), with `key`
    pub cert: Option<PathBuf>,
    /// client private key (PEM), with `cert`
    pub key: Option<PathBuf>,
    /// name to verify the daemon's certificate for; the address's host without one
    pub server_name: Option<String>,
}

impl ClientTls {
    /// The files of a `--tlsdir`: `ca.pem`, `cert.pem` and `key.pem` (or
    /// `ca.crt`, `tls.crt` and `tls.key`).
    pub fn from_dir(dir: &Path) -> Result<ClientTls, Error> {
        let pick = |names: [&str; 2]| {
            names
                .iter()
                .map(|n| dir.join(n))
                .find(|p| p.exists())
                .ok_or_else(|| Error::TlsDir {
                    dir: dir.to_path_buf(),
                    names: names.join(" or "),
                })
        };
        Ok(ClientTls {
            ca: Some(pick(["ca.pem", "ca.crt"])?),
            cert: Some(pick(["cert.pem", "tls.crt"])?),
            key: Some(pick(["key.pem", "tls.key"])?),
            server_name: None,
        })
    }

    fn config(&self) -> Result<Arc<rustls::ClientConfig>, Error> {
        let roots = match &self.ca {
            Some(ca) => ca_roots(ca)?,
            None => {
                let mut roots = rustls::RootCertStore::empty();
                let native = rustls_native_certs::load_native_certs();
                roots.add_parsable_certificates(native.certs);
                if roots.is_empty() {
                    return Err(Error::TlsNoRoots);
                }
                roots
            }
        };
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::TlsSetup(Box::new(e)))?
            .with_root_certificates(roots);
        let mut config = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                let chain = certificates(cert, "certificate")?;
                builder
                    .with_client_auth_cert(chain, private_key(key)?)
                    .map_err(|source| Error::TlsKeyPair {
                        cert: cert.clone(),
                        key: key.clone(),
                        source: Box::new(source),
                    })?
            }
            (None, None) => builder.with_no_client_auth(),
            (Some(_), None) => return Err(Error::TlsIncomplete("--tlscert needs --tlskey")),
            (None, Some(_)) => return Err(Error::TlsIncomplete("--tlskey needs --tlscert")),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }
}

/// The daemon's TLS settings (buildkitd's `--tlscert/--tlskey/--tlscacert`,
/// `[grpc.tls] cert/key/ca`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// with a CA, clients must present a certificate it signed (mutual TLS)
    pub ca: Option<PathBuf>,
}

impl ServerTls {
    /// The settings from optional cert, key and CA paths: `None` without cert
    /// and key, an error with only one of them.
    pub fn from_parts(
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
        ca: Option<PathBuf>,
    ) -> Result<Option<ServerTls>, Error> {
        match (cert, key) {
            (Some(cert), Some(key)) => Ok(Some(ServerTls { cert, key, ca })),
            (None, None) if ca.is_none() => Ok(None),
            (None, None) => Err(Error::TlsIncomplete(
                "a tls ca (--tlscacert, [grpc.tls] ca) needs a certificate and key",
            )),
            (Some(_), None) => Err(Error::TlsIncomplete(
                "a tls certificate (--tlscert, [grpc.tls] cert) needs a key (--tlskey, key)",
            )),
            (None, Some(_)) => Err(Error::TlsIncomplete(
                "a tls key (--tlskey, [grpc.tls] key) needs a certificate (--tlscert, cert)",
            )),
        }
    }

    /// Reads the files into an acceptor's config (advertising `h2`, as gRPC
    /// clients require).
    pub fn config(&self) -> Result<Arc<rustls::ServerConfig>, Error> {
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::TlsSetup(Box::new(e)))?;
        let builder = match &self.ca {
            Some(ca) => {
                let roots = ca_roots(ca)?;
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider(),
                )
                .build()
                .map_err(|e| Error::TlsFile {
                    what: "ca certificate",
                    path: ca.clone(),
                    reason: e.to_string(),
                })?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let chain = certificates(&self.cert, "certificate")?;
        let mut config = builder
            .with_single_cert(chain, private_key(&self.key)?)
            .map_err(|source| Error::TlsKeyPair {
                cert: self.cert.clone(),
                key: self.key.clone(),
                source: Box::new(source),
            })?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certificates(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>, Error> {
    let file_error = |reason: String| Error::TlsFile {
        what,
        path: path.to_path_buf(),
        reason,
    };
    let pem = std::fs::read(path).map_err(|e| file_error(e.to_string()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(e.to_string()))?;
    if certs.is_empty() {
        return Err(file_error("no PEM certificate in it".into()));
    }
    Ok(certs)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, Error> {
    let file_error = |reason: String| Error::TlsFile {
        what: "private key",
        path: path.to_path_buf(),
        reason,
    };
    let pem = std::fs::read(path).map_err(|e| file_error(e.to_string()))?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| file_error(e.to_string()))
}

/// A client's TLS connector for one daemon address.
#[derive(Clone)]
pub(crate) struct Connector {
    config: Arc<rustls::ClientConfig>,
    server_name: ServerName<'static>,
    /// the client certificate's file, to name in errors
    cert: Option<PathBuf>,
    ca: Option<PathBuf>,
}

impl Connector {
    /// Reads the files of `tls` for a daemon at `hostport`.
    pub(crate) fn new(tls: &ClientTls, hostport: &str) -> Result<Connector, Error> {
        let host = tls
            .server_name
            .clone()
            .unwrap_or_else(|| host_of(hostport).to_string());
        let server_name = ServerName::try_from(host.clone()).map_err(|_| Error::Address {
            addr: hostport.into(),
            reason: format!("{host:?} is not a tls server name (--tlsservername)"),
        })?;
        Ok(Connector {
            config: tls.config()?,
            server_name,
            cert: tls.cert.clone(),
            ca: tls.ca.clone(),
        })
    }

    /// Connects, completes the handshake and waits for the daemon's first bytes,
    /// so that a refused certificate is reported here and not as a broken
    /// HTTP/2 connection later.
    pub(crate) async fn connect(
        &self,
        hostport: &str,
    ) -> Result<Replay<tokio_rustls::client::TlsStream<TcpStream>>, Error> {
        let handshake = |reason: String| Error::TlsHandshake {
            addr: hostport.to_string(),
            reason,
        };
        let tcp = TcpStream::connect(hostport)
            .await
            .map_err(|source| Error::Dial {
                addr: hostport.to_string(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        let mut tls = tokio_rustls::TlsConnector::from(self.config.clone())
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| handshake(self.explain(&e)))?;
        let mut first = vec![0u8; 4096];
        let n = match tokio::time::timeout(ACCEPT_WAIT, tls.read(&mut first)).await {
            Ok(Ok(0)) => return Err(handshake("the daemon closed the connection".into())),
            Ok(Ok(n)) => n,
            Ok(Err(e)) => return Err(handshake(self.explain(&e))),
            // a slow daemon: let HTTP/2 find out
            Err(_) => 0,
        };
        first.truncate(n);
        Ok(Replay::new(first, tls))
    }

    /// What went wrong in a handshake, in terms of the client's settings.
    fn explain(&self, e: &std::io::Error) -> String {
        use rustls::{AlertDescription as Alert, CertificateError, Error as Tls};
        let Some(tls) = e.get_ref().and_then(|e| e.downcast_ref::<Tls>()) else {
            return e.to_string();
        };
        let ca = match &self.ca {
            Some(p) => p.display().to_string(),
            None => "a system ca (give --tlscacert)".into(),
        };
        match (tls, &self.cert) {
            (Tls::InvalidCertificate(CertificateError::UnknownIssuer), _) => {
                format!("the daemon's certificate is not signed by {ca}")
            }
            (
                Tls::InvalidCertificate(
                    CertificateError::NotValidForName
                    | CertificateError::NotValidForNameContext { .. },
                ),
                _,
            ) => format!(
                "the daemon's certificate is not valid for {:?} (--tlsservername names the \
                 host to verify)",
                self.server_name.to_str()
            ),
            (Tls::InvalidCertificate(c), _) => format!("the daemon's certificate: {c:?}"),
            (Tls::AlertReceived(Alert::CertificateRequired | Alert::HandshakeFailure), None) => {
                "the daemon requires a client certificate (give --tlscert and --tlskey, or \
                 --tlsdir)"
                    .into()
            }
            (Tls::AlertReceived(alert), Some(cert)) => format!(
                "the daemon refused the client certificate {} ({alert:?}): is it signed by \
                 the daemon's --tlscacert?",
                cert.display()
            ),
            (Tls::InvalidMessage(_), _) => "the daemon does not speak tls on this address".into(),
            (other, _) => other.to_string(),
        }
    }
}

/// The certificates in the PEM file `ca`, as trust roots.
fn ca_roots(ca: &Path) -> Result<rustls::RootCertStore, Error> {
    let mut roots = rustls::RootCertStore::empty();
    for c in certificates(ca, "ca certificate")? {
        roots.add(c).map_err(|e| Error::TlsFile {
            what: "ca certificate",
            path: ca.to_path_buf(),
            reason: e.to_string(),
        })?;
    }
    Ok(roots)
}

fn host_of(hostport: &str) -> &str {
    let host = match hostport.rsplit_once(':') {
        Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) => h,
        _ => hostport,
    };
    host.trim_start_matches('[').trim_end_matches(']')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_name_defaults_to_the_address_host() {
        assert_eq!(host_of("127.0.0.1:1234"), "127.0.0.1");
        assert_eq!(host_of("kilnd.example:443"), "kilnd.example");
        assert_eq!(host_of("[::1]:1234"), "::1");
        assert_eq!(host_of("kilnd.example"), "kilnd.example");
    }

    #[test]
    fn server_settings_need_cert_and_key_together() {
        let p = |s: &str| Some(PathBuf::from(s));
        assert_eq!(ServerTls::from_parts(None, None, None).ok(), Some(None));
        assert!(ServerTls::from_parts(p("c"), None, None).is_err());
        assert!(ServerTls::from_parts(None, p("k"), None).is_err());
        assert!(ServerTls::from_parts(None, None, p("ca")).is_err());
        let s = ServerTls::from_parts(p("c"), p("k"), p("ca"))
            .expect("valid")
            .expect("some");
        let e = s.config().expect_err("no such files");
        assert!(e.to_string().contains("ca certificate ca"), "{e}");
    }

    #[test]
    fn tls_dir_names_the_missing_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("ca.pem"), "").expect("write");
        std::fs::write(dir.path().join("tls.crt"), "").expect("write");
        let e = ClientTls::from_dir(dir.path()).expect_err("no key");
        assert!(e.to_string().contains("key.pem or tls.key"), "{e}");
        std::fs::write(dir.path().join("key.pem"), "").expect("write");
        let t = ClientTls::from_dir(dir.path()).expect("complete");
        assert_eq!(t.cert, Some(dir.path().join("tls.crt")));
    }
}
