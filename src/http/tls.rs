//! TLS on `serve.listen` (rustls): `serve.tls.cert_file` (the chain, PEM, leaf first) and
//! `serve.tls.key_file` (PKCS#8, PKCS#1 or SEC1 PEM).
//!
//! Both files are read at start (a bad pair stops the start with the reason) and again on
//! SIGHUP, so a renewed certificate is picked up without dropping a connection. A reload that
//! fails keeps the certificate in use and says why in the log and in
//! `spiced_tls_reload_failures_total`; new handshakes get the new pair, open connections keep
//! theirs.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use tokio_rustls::TlsAcceptor;

/// The TLS side of the API listener: the acceptor, and the pair it serves.
#[derive(Clone)]
pub struct ServerTls {
    acceptor: TlsAcceptor,
    pair: Arc<ReloadablePair>,
}

impl ServerTls {
    /// Loads the pair; the error names the file and what is wrong with it.
    pub fn load(cert_file: &Path, key_file: &Path) -> anyhow::Result<ServerTls> {
        let pair = Arc::new(ReloadablePair::load(cert_file, key_file)?);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(pair.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(ServerTls { acceptor: TlsAcceptor::from(Arc::new(config)), pair })
    }

    pub fn acceptor(&self) -> &TlsAcceptor {
        &self.acceptor
    }

    /// Reads both files again; on failure the pair in use stays.
    pub fn reload(&self) -> anyhow::Result<()> {
        self.pair.reload()
    }
}

/// Handles SIGHUP until `stop`: reloads `tls` if there is one, else says there is nothing to
/// reload. Either way the signal never ends the process (its default action would), so
/// `systemctl reload` is safe whether TLS is on or not.
pub fn reload_on_sighup(tls: Option<ServerTls>, stop: tokio_util::sync::CancellationToken) -> std::io::Result<()> {
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = hup.recv() => {}
                _ = stop.cancelled() => return,
            }
            let Some(tls) = &tls else {
                tracing::info!("SIGHUP: nothing to reload (serve.tls is off)");
                continue;
            };
            match tls.reload() {
                Ok(()) => tracing::info!(cert_file = %tls.pair.cert_file.display(), "SIGHUP: reloaded serve.tls"),
                Err(e) => {
                    metrics::counter!("spiced_tls_reload_failures_total").increment(1);
                    tracing::error!(error = %e, "SIGHUP: serve.tls not reloaded; the certificate in use stays");
                }
            }
        }
    });
    Ok(())
}

/// The certificate and key in use, swapped whole on reload.
#[derive(Debug)]
struct ReloadablePair {
    cert_file: PathBuf,
    key_file: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
}

impl ReloadablePair {
    fn load(cert_file: &Path, key_file: &Path) -> anyhow::Result<ReloadablePair> {
        let current = RwLock::new(Arc::new(read_pair(cert_file, key_file)?));
        Ok(ReloadablePair { cert_file: cert_file.into(), key_file: key_file.into(), current })
    }

    fn reload(&self) -> anyhow::Result<()> {
        let pair = read_pair(&self.cert_file, &self.key_file)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(pair);
        Ok(())
    }
}

impl ResolvesServerCert for ReloadablePair {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().unwrap_or_else(|p| p.into_inner()).clone())
    }
}

/// Reads and checks a pair: a chain, a key rustls can sign with, and the two belonging together.
fn read_pair(cert_file: &Path, key_file: &Path) -> anyhow::Result<CertifiedKey> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_file)
        .and_then(|certs| certs.collect::<Result<_, _>>())
        .map_err(|e| anyhow::anyhow!("serve.tls.cert_file {}: {e}", cert_file.display()))?;
    if certs.is_empty() {
        anyhow::bail!("serve.tls.cert_file {}: no PEM certificate in it", cert_file.display());
    }
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => {
            anyhow::anyhow!("serve.tls.key_file {}: no PEM private key in it", key_file.display())
        }
        e => anyhow::anyhow!("serve.tls.key_file {}: {e}", key_file.display()),
    })?;
    CertifiedKey::from_der(certs, key, &rustls::crypto::ring::default_provider()).map_err(|e| {
        anyhow::anyhow!("serve.tls: {} and {} are not a usable pair: {e}", cert_file.display(), key_file.display())
    })
}
