//! TLS for the client-facing listeners, HTTPS and the native protocol's (rustls, ring
//! provider).
//!
//! A listener's certificate is reloaded from its files when they change (a renewal by
//! cert-manager or certbot needs no restart): the server config resolves the certificate
//! through a [`Certificate`] that holds the current one, and [`reload_changed`] (run
//! periodically by the app) loads the files again whenever their modification time or size
//! changed. A pair that does not load (half-written, a key that does not match) is logged
//! and the certificate in use stays; new handshakes get the new one, open connections keep
//! theirs.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read certificates from {path}: {reason}")]
    Certs { path: String, reason: String },
    #[error("no certificate found in {0}")]
    NoCerts(String),
    #[error("cannot read a private key from {path}: {reason}")]
    Key { path: String, reason: String },
    #[error("certificate and key do not make a usable TLS config: {0}")]
    Config(#[from] rustls::Error),
}

/// Builds the server config from PEM files: a certificate chain and its private key, and
/// the ALPN protocols offered (none for the native protocol, which has no ALPN name). The
/// certificate is reloaded when the files change (see [`reload_changed`]).
pub fn server_config(
    cert_file: &Path,
    key_file: &Path,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certificate = Arc::new(Certificate::load(cert_file, key_file, &provider)?);
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(certificate.clone());
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let mut live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
    live.retain(|w| w.strong_count() > 0);
    live.push(Arc::downgrade(&certificate));
    Ok(Arc::new(config))
}

/// Every certificate in use by a server config that still exists.
static LIVE: Mutex<Vec<Weak<Certificate>>> = Mutex::new(Vec::new());

/// Loads again every certificate whose files changed; returns how many were replaced.
pub fn reload_changed() -> usize {
    let live: Vec<Arc<Certificate>> = {
        let mut live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
        live.retain(|w| w.strong_count() > 0);
        live.iter().filter_map(Weak::upgrade).collect()
    };
    live.iter().filter(|c| c.reload_if_changed()).count()
}

/// A listener's certificate, replaced when its files change.
pub struct Certificate {
    cert_file: PathBuf,
    key_file: PathBuf,
    provider: Arc<CryptoProvider>,
    current: ArcSwap<CertifiedKey>,
    /// The files' (modified, length) when last loaded or tried.
    seen: Mutex<[Option<(SystemTime, u64)>; 2]>,
}

impl fmt::Debug for Certificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Certificate")
            .field("cert_file", &self.cert_file)
            .finish()
    }
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

impl Certificate {
    fn load(
        cert_file: &Path,
        key_file: &Path,
        provider: &Arc<CryptoProvider>,
    ) -> Result<Self, TlsError> {
        let seen = [stamp(cert_file), stamp(key_file)];
        let key = certified_key(cert_file, key_file, provider)?;
        Ok(Self {
            cert_file: cert_file.to_path_buf(),
            key_file: key_file.to_path_buf(),
            provider: provider.clone(),
            current: ArcSwap::from_pointee(key),
            seen: Mutex::new(seen),
        })
    }

    /// Loads the files again if they changed since last time; true if the certificate in
    /// use was replaced.
    pub fn reload_if_changed(&self) -> bool {
        let now = [stamp(&self.cert_file), stamp(&self.key_file)];
        {
            let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            if *seen == now {
                return false;
            }
            *seen = now;
        }
        match certified_key(&self.cert_file, &self.key_file, &self.provider) {
            Ok(key) => {
                self.current.store(Arc::new(key));
                tracing::info!(cert_file = %self.cert_file.display(), "TLS certificate reloaded");
                true
            }
            Err(e) => {
                tracing::error!(cert_file = %self.cert_file.display(), error = %e, "TLS certificate files changed but do not load; the certificate in use stays");
                false
            }
        }
    }
}

impl ResolvesServerCert for Certificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// Reads a certificate chain and its key, and checks that they belong together.
fn certified_key(
    cert_file: &Path,
    key_file: &Path,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let cert_path = cert_file.display().to_string();
    let certs = CertificateDer::pem_file_iter(cert_file)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Certs {
            path: cert_path.clone(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCerts(cert_path));
    }
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| TlsError::Key {
        path: key_file.display().to_string(),
        reason: e.to_string(),
    })?;
    let key = CertifiedKey::from_der(certs, key, provider)?;
    Ok(key)
}
