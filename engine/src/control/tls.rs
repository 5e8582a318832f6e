//! TLS 1.3 on the control connection and on every TCP lane (rustls with the ring provider).
//!
//! Guest memory holds the most sensitive data of a host, and a relay in the path of a
//! cleartext migration can read every page, change pages and rewrite their checksums. So every
//! connection of a session is a TLS 1.3 session, authenticated in one of two ways:
//!
//! - **x509** ([`Encryption::X509`]): mutual authentication with certificates from a directory
//!   laid out as QEMU's `tls-creds-x509` (`ca-cert.pem`, `server-cert.pem`, `server-key.pem`,
//!   `client-cert.pem`, `client-key.pem`); the destination is the server, the source the
//!   client, and the source checks the destination's name (the host of its address, or the
//!   name the operator gives).
//! - **pre-shared key** ([`Encryption::Psk`]): rustls has no external PSK, so the destination
//!   makes a throwaway self-signed certificate and the source accepts any certificate, while
//!   the existing HMAC challenge-response is bound to the TLS session: every proof (the
//!   control connection's, each lane's) covers an exporter value of *that* connection
//!   (RFC 5705 / RFC 9266 channel binding, [`binding`]). A relay that terminates TLS on both
//!   sides has two different sessions, so the proofs it passes along do not hold on either.
//!
//! In x509 mode the proofs are bound too: the pre-shared key then ties the lanes to the
//! session exactly as in PSK mode. There the key is optional ([`Key::per_session`](super::auth::Key::per_session)): the
//! session's key is then derived from the control connection's binding (see
//! [`auth`](super::auth)).
//!
//! Every async connection runs over [`NoSigPipe`], so that a write to a peer that has gone
//! is an error and not a SIGPIPE that ends a C embedder.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{ring, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio::net::TcpStream;

use super::nosigpipe::NoSigPipe;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, ServerConfig, SignatureScheme,
};

/// The exporter label of rmig's channel binding (RFC 5705 labels start with `EXPORTER`).
const BINDING_LABEL: &[u8] = b"EXPORTER-rmig-v1-channel-binding";

/// The name a PSK-mode destination's throwaway certificate carries.
const PSK_NAME: &str = "rmig";

/// Whether and how a session's connections are encrypted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Encryption {
    /// Cleartext: anyone on the path can read and change guest memory.
    Off,
    /// TLS 1.3 with throwaway certificates; the pre-shared key's proofs are bound to each
    /// TLS session.
    #[default]
    Psk,
    /// TLS 1.3 with mutual x509 authentication.
    X509(X509Creds),
}

impl Encryption {
    /// The name reports use: `off`, `tls-psk` or `tls-x509`.
    pub fn name(&self) -> &'static str {
        match self {
            Encryption::Off => "off",
            Encryption::Psk => "tls-psk",
            Encryption::X509(_) => "tls-x509",
        }
    }

    /// Whether the session is encrypted.
    pub fn is_on(&self) -> bool {
        *self != Encryption::Off
    }
}

/// Where x509 credentials are, and what name the destination's certificate must carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct X509Creds {
    /// A directory laid out as QEMU's `tls-creds-x509`.
    pub dir: PathBuf,
    /// The name the source expects in the destination's certificate; `None`: the host of the
    /// destination address.
    pub hostname: Option<String>,
}

/// Why TLS could not be set up or a TLS handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A credentials file could not be read.
    #[error("TLS credentials: cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A private key file that group or others may read.
    #[error(
        "TLS key file {path} has mode {mode:03o}, so others may read it; run `chmod 600 {path}`"
    )]
    KeyReadable {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A credentials file without what it should hold.
    #[error("TLS credentials: {path} holds no {what} in PEM form")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What was expected.
        what: &'static str,
    },
    /// rustls refused the credentials (a key that does not match its certificate, ...).
    #[error("TLS credentials: {0}")]
    Credentials(#[source] rustls::Error),
    /// The name to check the destination's certificate against is not a valid DNS name or
    /// address.
    #[error("`{0}` is not a valid TLS server name; give one with --tls-hostname")]
    Name(String),
    /// The TLS handshake failed; the message says why and what to check.
    #[error("TLS handshake failed: {0}")]
    Handshake(String),
}

/// What a source needs to open TLS connections to its destination.
#[derive(Debug)]
pub struct ClientTls {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
}

/// What a destination needs to accept TLS connections.
#[derive(Debug)]
pub struct ServerTls {
    config: Arc<ServerConfig>,
}

/// ring's provider with AES-128-GCM first: TLS 1.3's mandatory suite, and about a third
/// cheaper per byte than AES-256-GCM (10 AES rounds instead of 14), which on a host whose
/// cores seal and open every page is the migration's speed. The server picks from the
/// client's order (rustls's default), so both ends agree on it.
fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite;
    Arc::new(CryptoProvider {
        cipher_suites: vec![
            cipher_suite::TLS13_AES_128_GCM_SHA256,
            cipher_suite::TLS13_AES_256_GCM_SHA384,
            cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        ],
        ..ring::default_provider()
    })
}

impl ClientTls {
    /// The source's TLS setup for `enc` and destination address `dest` (`host:port`); `None`
    /// when encryption is off.
    pub fn new(enc: &Encryption, dest: &str) -> Result<Option<Arc<ClientTls>>, TlsError> {
        let builder = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(TlsError::Credentials)?;
        let (config, name) = match enc {
            Encryption::Off => return Ok(None),
            Encryption::Psk => {
                let c = builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider())))
                    .with_no_client_auth();
                (c, PSK_NAME.to_string())
            }
            Encryption::X509(x) => {
                let roots = roots(&x.dir.join("ca-cert.pem"))?;
                let chain = certs(&x.dir.join("client-cert.pem"))?;
                let key = private_key(&x.dir.join("client-key.pem"))?;
                let c = builder
                    .with_root_certificates(roots)
                    .with_client_auth_cert(chain, key)
                    .map_err(TlsError::Credentials)?;
                let name = x.hostname.clone().unwrap_or_else(|| host_of(dest));
                (c, name)
            }
        };
        let name = ServerName::try_from(name.clone()).map_err(|_| TlsError::Name(name))?;
        Ok(Some(Arc::new(ClientTls {
            config: Arc::new(config),
            name,
        })))
    }

    /// A tokio connector and the name to check.
    pub fn connector(&self) -> (Connector, ServerName<'static>) {
        (Connector(self.config.clone().into()), self.name.clone())
    }

    /// A blocking client session (for a lane).
    pub fn session(&self) -> Result<rustls::ClientConnection, TlsError> {
        rustls::ClientConnection::new(self.config.clone(), self.name.clone())
            .map_err(TlsError::Credentials)
    }
}

impl ServerTls {
    /// The destination's TLS setup for `enc`; `None` when encryption is off. In PSK mode it
    /// makes a throwaway self-signed certificate.
    pub fn new(enc: &Encryption) -> Result<Option<Arc<ServerTls>>, TlsError> {
        let builder = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(TlsError::Credentials)?;
        let config = match enc {
            Encryption::Off => return Ok(None),
            Encryption::Psk => {
                let ck = rcgen::generate_simple_self_signed(vec![PSK_NAME.to_string()])
                    .map_err(|e| TlsError::Handshake(format!("no throwaway certificate: {e}")))?;
                let key = PrivateKeyDer::Pkcs8(ck.key_pair.serialize_der().into());
                builder
                    .with_no_client_auth()
                    .with_single_cert(vec![ck.cert.der().clone()], key)
                    .map_err(TlsError::Credentials)?
            }
            Encryption::X509(x) => {
                let roots = Arc::new(roots(&x.dir.join("ca-cert.pem"))?);
                let verifier =
                    rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider())
                        .build()
                        .map_err(|e| TlsError::Handshake(format!("client verifier: {e}")))?;
                let chain = certs(&x.dir.join("server-cert.pem"))?;
                let key = private_key(&x.dir.join("server-key.pem"))?;
                builder
                    .with_client_cert_verifier(verifier)
                    .with_single_cert(chain, key)
                    .map_err(TlsError::Credentials)?
            }
        };
        Ok(Some(Arc::new(ServerTls {
            config: Arc::new(config),
        })))
    }

    /// A tokio acceptor.
    pub fn acceptor(&self) -> Acceptor {
        Acceptor(self.config.clone().into())
    }
}

/// A source's encrypted control connection (or a lane's, while it joins).
pub type ClientStream = tokio_rustls::client::TlsStream<NoSigPipe>;

/// A destination's encrypted connection, while it is async (control, or a lane joining).
pub type ServerStream = tokio_rustls::server::TlsStream<NoSigPipe>;

/// Opens TLS sessions over TCP connections that write without SIGPIPE ([`NoSigPipe`]).
pub struct Connector(tokio_rustls::TlsConnector);

impl Connector {
    /// The TLS handshake as the client on `s`, checking the server's certificate for `name`.
    pub fn connect(
        &self,
        name: ServerName<'static>,
        s: TcpStream,
    ) -> tokio_rustls::Connect<NoSigPipe> {
        self.0.connect(name, NoSigPipe::new(s))
    }
}

/// Accepts TLS sessions over TCP connections that write without SIGPIPE ([`NoSigPipe`]).
pub struct Acceptor(tokio_rustls::TlsAcceptor);

impl Acceptor {
    /// The TLS handshake as the server on `s`.
    pub fn accept(&self, s: TcpStream) -> tokio_rustls::Accept<NoSigPipe> {
        self.0.accept(NoSigPipe::new(s))
    }
}

/// The host part of `host:port`, `[v6]:port` or `tcp:host:port`.
fn host_of(addr: &str) -> String {
    let a = addr.strip_prefix("tcp:").unwrap_or(addr);
    let host = match a.rsplit_once(':') {
        Some((h, p)) if p.parse::<u16>().is_ok() => h,
        _ => a,
    };
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .to_string()
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(path)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&bytes)
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_path_buf(),
            what: "certificate",
        });
    }
    Ok(certs)
}

fn roots(path: &Path) -> Result<rustls::RootCertStore, TlsError> {
    let mut store = rustls::RootCertStore::empty();
    for c in certs(path)? {
        store.add(c).map_err(TlsError::Credentials)?;
    }
    Ok(store)
}

/// Reads a private key; like ssh, refuses a file that group or others may read.
fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(TlsError::KeyReadable {
            path: path.to_path_buf(),
            mode,
        });
    }
    PrivateKeyDer::from_pem_slice(&read(path)?).map_err(|_| TlsError::Pem {
        path: path.to_path_buf(),
        what: "private key",
    })
}

/// The channel binding of a TLS session: 32 bytes exported from its secrets, the same at both
/// ends of this connection and different on every other.
pub fn binding<D>(conn: &rustls::ConnectionCommon<D>) -> Result<[u8; 32], TlsError> {
    conn.export_keying_material([0u8; 32], BINDING_LABEL, None)
        .map_err(|e| TlsError::Handshake(format!("no channel binding: {e}")))
}

/// A handshake failure as an operator can act on it: what failed, and what to check.
pub fn explain(e: &std::io::Error) -> TlsError {
    use rustls::AlertDescription as A;
    let Some(r) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
        return TlsError::Handshake(e.to_string());
    };
    let why = match r {
        rustls::Error::InvalidCertificate(c) => match c {
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                format!("the peer's certificate has expired ({r})")
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                format!("the peer's certificate is not valid yet ({r})")
            }
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                format!("the peer's certificate is not valid for the name we expect; give the name with --tls-hostname ({r})")
            }
            CertificateError::UnknownIssuer => {
                format!("the peer's certificate is not signed by our CA (ca-cert.pem) ({r})")
            }
            _ => format!("the peer's certificate was refused ({r})"),
        },
        rustls::Error::AlertReceived(a) => match a {
            A::CertificateExpired => "the peer refused our certificate: it has expired".into(),
            A::UnknownCA => "the peer refused our certificate: not signed by its CA".into(),
            A::BadCertificate | A::UnsupportedCertificate | A::CertificateUnknown => {
                format!("the peer refused our certificate ({a:?}: for example a name it did not expect)")
            }
            A::CertificateRequired => {
                "the peer requires a client certificate (x509 mode at both ends?)".into()
            }
            _ => format!("the peer ended the handshake ({a:?})"),
        },
        rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => {
            format!("the peer does not speak TLS; is its encryption off? ({r})")
        }
        rustls::Error::NoCertificatesPresented => {
            "the peer presented no certificate (x509 mode at both ends?)".into()
        }
        _ => r.to_string(),
    };
    TlsError::Handshake(why)
}

/// `e` explained when its cause is TLS (an alert from the peer, a record that failed to
/// open), as it is when the peer refuses our certificate after our side of the handshake
/// completed (TLS 1.3 clients learn it on their first read); other errors unchanged.
pub fn surface(e: crate::EngineError) -> crate::EngineError {
    match &e {
        crate::EngineError::Io(io) if io.get_ref().is_some_and(|i| i.is::<rustls::Error>()) => {
            explain(io).into()
        }
        _ => e,
    }
}

/// PSK mode's certificate check: any certificate, since the proof of the pre-shared key,
/// bound to this TLS session, authenticates the peer. Handshake signatures are still checked,
/// so the peer holds the key of the certificate it sent.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
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
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_of_addresses() {
        assert_eq!(host_of("dest.example:4444"), "dest.example");
        assert_eq!(host_of("tcp:10.0.0.1:4444"), "10.0.0.1");
        assert_eq!(host_of("[fd00::1]:4444"), "fd00::1");
    }
}
