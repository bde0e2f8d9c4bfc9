//! TLS to PostgreSQL, with the choices libpq's `sslmode` names, for both of chgate's
//! connections: the replication one ([`super::wire`], which sends the `SSLRequest` itself)
//! and tokio-postgres's catalog and snapshot ones (through [`MakeTlsConnect`], which
//! tokio-postgres calls once the server has said yes).
//!
//! - `disable`: plain TCP.
//! - `prefer` (libpq's default): TLS if the server offers it, plain otherwise; the
//!   certificate is not checked (encryption without authentication, as libpq does).
//! - `require`: TLS or nothing; the certificate is not checked, unless `sslrootcert` is
//!   given, which makes it `verify-ca` (as in libpq).
//! - `verify-ca`: the server's chain must lead to a certificate of `sslrootcert`.
//! - `verify-full`: that, and the certificate must name the host chgate connects to.
//!
//! rustls on the ring provider (as chgate's listeners), TLS 1.2 and 1.3. The handshake's
//! signatures are always checked; only the certificate's trust is what the mode decides.

use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};

/// libpq's `sslmode` values chgate takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    Disable,
    #[default]
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// How chgate connects to PostgreSQL: the mode, and the client config it implies.
#[derive(Clone)]
pub struct PgTls {
    mode: SslMode,
    config: Option<Arc<rustls::ClientConfig>>,
}

impl std::fmt::Debug for PgTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PgTls({})", self.mode.as_str())
    }
}

impl PgTls {
    /// The TLS of `mode`, trusting the certificates of the PEM file `rootcert` if given.
    /// A `verify-*` mode without `rootcert`, or a file that holds no certificate, is an
    /// error saying so.
    pub fn new(mode: SslMode, rootcert: Option<&Path>) -> Result<Self, String> {
        let mode = match (mode, rootcert) {
            (SslMode::Require, Some(_)) => SslMode::VerifyCa,
            (SslMode::VerifyCa | SslMode::VerifyFull, None) => {
                return Err(format!(
                    "sslmode = \"{}\" needs sslrootcert: the CA certificates (PEM) the server's must lead to",
                    mode.as_str()
                ))
            }
            (m, _) => m,
        };
        if mode == SslMode::Disable {
            return Ok(Self { mode, config: None });
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier: Arc<dyn ServerCertVerifier> = match rootcert {
            Some(path) if mode != SslMode::Prefer => {
                let roots = Arc::new(roots(path)?);
                let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                    .build()
                    .map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
                if mode == SslMode::VerifyFull {
                    webpki
                } else {
                    Arc::new(AnyName(webpki))
                }
            }
            _ => Arc::new(Unchecked(provider.clone())),
        };
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        Ok(Self {
            mode,
            config: Some(Arc::new(config)),
        })
    }

    /// The mode in effect (`require` with a root certificate is `verify-ca`).
    pub fn mode(&self) -> SslMode {
        self.mode
    }

    /// Whether to ask the server for TLS.
    pub fn wanted(&self) -> bool {
        self.config.is_some()
    }

    /// Whether a server that does not offer TLS is refused.
    pub fn required(&self) -> bool {
        !matches!(self.mode, SslMode::Disable | SslMode::Prefer)
    }

    /// tokio-postgres's own name for the mode.
    pub fn postgres_mode(&self) -> tokio_postgres::config::SslMode {
        use tokio_postgres::config::SslMode as M;
        match self.mode {
            SslMode::Disable => M::Disable,
            SslMode::Prefer => M::Prefer,
            _ => M::Require,
        }
    }

    /// The TLS handshake over `stream`, to `host` (the name a `verify-full` certificate
    /// must carry, and the SNI).
    pub async fn handshake<S>(
        &self,
        host: &str,
        stream: S,
    ) -> io::Result<tokio_rustls::client::TlsStream<S>>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let config = self
            .config
            .clone()
            .ok_or_else(|| io::Error::other("TLS is disabled (sslmode = \"disable\")"))?;
        let name = server_name(host)?;
        tokio_rustls::TlsConnector::from(config)
            .connect(name, stream)
            .await
    }
}

fn server_name(host: &str) -> io::Result<ServerName<'static>> {
    ServerName::try_from(host.to_string()).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{host:?} is not a host name TLS can check: {e}"),
        )
    })
}

/// The certificates of a PEM file.
fn roots(path: &Path) -> Result<rustls::RootCertStore, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
    let mut store = rustls::RootCertStore::empty();
    let (added, _) = store.add_parsable_certificates(certs);
    if added == 0 {
        return Err(format!(
            "sslrootcert {}: no certificate in it",
            path.display()
        ));
    }
    Ok(store)
}

/// `prefer` and `require`: any certificate (the handshake's signatures still checked).
#[derive(Debug)]
struct Unchecked(Arc<CryptoProvider>);

impl ServerCertVerifier for Unchecked {
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

/// `verify-ca`: the chain must lead to a root, whatever name the certificate carries.
#[derive(Debug)]
struct AnyName(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// tokio-postgres's side: it sends the `SSLRequest` and calls this once the server
/// agreed.
impl MakeTlsConnect<tokio_postgres::Socket> for PgTls {
    type Stream = PgTlsStream;
    type TlsConnect = Connect;
    type Error = io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> io::Result<Connect> {
        Ok(Connect {
            tls: self.clone(),
            host: domain.to_string(),
        })
    }
}

/// One connection's TLS handshake, for tokio-postgres.
pub struct Connect {
    tls: PgTls,
    host: String,
}

impl TlsConnect<tokio_postgres::Socket> for Connect {
    type Stream = PgTlsStream;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<PgTlsStream>> + Send>>;

    fn connect(self, stream: tokio_postgres::Socket) -> Self::Future {
        Box::pin(async move {
            let s = self.tls.handshake(&self.host, stream).await?;
            Ok(PgTlsStream(Box::new(s)))
        })
    }
}

/// A TLS stream as tokio-postgres holds it. No channel binding: SCRAM-SHA-256 works,
/// SCRAM-SHA-256-PLUS is not offered.
pub struct PgTlsStream(Box<tokio_rustls::client::TlsStream<tokio_postgres::Socket>>);

impl tokio_postgres::tls::TlsStream for PgTlsStream {
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

impl AsyncRead for PgTlsStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for PgTlsStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_and_root_certificates() {
        assert!(!PgTls::new(SslMode::Disable, None).unwrap().wanted());
        let prefer = PgTls::new(SslMode::Prefer, None).unwrap();
        assert!(prefer.wanted() && !prefer.required());
        let require = PgTls::new(SslMode::Require, None).unwrap();
        assert!(require.wanted() && require.required());
        for mode in [SslMode::VerifyCa, SslMode::VerifyFull] {
            let e = PgTls::new(mode, None).unwrap_err();
            assert!(e.contains("needs sslrootcert"), "{e}");
        }
        let dir = std::env::temp_dir().join(format!("chgate-pg-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let e = PgTls::new(SslMode::VerifyFull, Some(&empty)).unwrap_err();
        assert!(e.contains("no certificate"), "{e}");
        let e = PgTls::new(SslMode::VerifyFull, Some(&dir.join("absent.pem"))).unwrap_err();
        assert!(e.contains("absent.pem"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
