//! TLS to PostgreSQL with rustls, configured as libpq is: `sslmode` and `sslrootcert` in the
//! database URL.
//!
//! | `sslmode` | TLS | the server's certificate |
//! |---|---|---|
//! | `disable` | never | - |
//! | `prefer` (default) | if the server offers it, else plain | not checked (with `sslrootcert`: its chain) |
//! | `require` | always | not checked (with `sslrootcert`: its chain), as libpq |
//! | `verify-ca` | always | signed by `sslrootcert` (else the system's CAs) |
//! | `verify-full` | always | that, and issued for the host connected to |
//!
//! tokio-postgres knows `disable`, `prefer` and `require` only, and no `sslrootcert`, so both
//! are taken out of the URL here and the rest is left to it.

use super::DbError;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::sync::Arc;

/// What the URL asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(s: &str) -> Result<SslMode, DbError> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            // libpq's `allow` tries plain first; spiced does not offer a mode that prefers it.
            other => {
                return Err(DbError::Setup(format!(
                    "database.url: sslmode={other:?}: use disable, prefer, require, verify-ca or verify-full"
                )))
            }
        })
    }
}

/// The TLS settings of a database URL, and the URL without them.
#[derive(Debug)]
pub struct PgTls {
    pub mode: SslMode,
    pub root_cert: Option<String>,
    /// The URL for tokio-postgres: `sslmode` set to what it knows, `sslrootcert` removed.
    pub url: String,
}

impl PgTls {
    pub fn from_url(url: &str) -> Result<PgTls, DbError> {
        let mut parsed = url::Url::parse(url).map_err(|e| DbError::Setup(format!("database.url: {e}")))?;
        let (mut mode, mut root_cert) = (SslMode::Prefer, None);
        let mut rest = Vec::new();
        for (k, v) in parsed.query_pairs() {
            match k.as_ref() {
                "sslmode" => mode = SslMode::parse(&v)?,
                "sslrootcert" => root_cert = Some(v.into_owned()),
                _ => rest.push((k.into_owned(), v.into_owned())),
            }
        }
        let wire = match mode {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            _ => "require",
        };
        rest.push(("sslmode".into(), wire.into()));
        parsed.query_pairs_mut().clear().extend_pairs(rest);
        Ok(PgTls { mode, root_cert, url: parsed.to_string() })
    }

    /// The rustls client configuration; `None` for `disable`.
    pub fn client_config(&self) -> Result<Option<rustls::ClientConfig>, DbError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| DbError::Setup(format!("TLS: {e}")))?;
        let verify = |check_name: bool| -> Result<rustls::ClientConfig, DbError> {
            let roots = Arc::new(self.roots()?);
            let inner = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                .build()
                .map_err(|e| DbError::Setup(format!("database.url sslrootcert: {e}")))?;
            let verifier = Arc::new(ChainVerifier { inner, check_name });
            Ok(builder.clone().dangerous().with_custom_certificate_verifier(verifier).with_no_client_auth())
        };
        let config = match (self.mode, &self.root_cert) {
            (SslMode::Disable, _) => return Ok(None),
            (SslMode::Prefer | SslMode::Require, None) => {
                let verifier = Arc::new(EncryptOnly(provider.clone()));
                builder.dangerous().with_custom_certificate_verifier(verifier).with_no_client_auth()
            }
            (SslMode::Prefer | SslMode::Require | SslMode::VerifyCa, _) => verify(false)?,
            (SslMode::VerifyFull, _) => verify(true)?,
        };
        Ok(Some(config))
    }

    /// `sslrootcert`'s certificates, else the system's.
    fn roots(&self) -> Result<RootCertStore, DbError> {
        let mut roots = RootCertStore::empty();
        match &self.root_cert {
            Some(path) => {
                let certs = CertificateDer::pem_file_iter(path)
                    .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| DbError::Setup(format!("database.url sslrootcert={path}: {e}")))?;
                let (added, _) = roots.add_parsable_certificates(certs);
                if added == 0 {
                    return Err(DbError::Setup(format!("database.url sslrootcert={path}: no certificate in it")));
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                roots.add_parsable_certificates(found.certs);
            }
        }
        Ok(roots)
    }
}

/// `verify-ca` and `verify-full`: the chain must lead to a trusted root; the host name must
/// match only for `verify-full`.
#[derive(Debug)]
struct ChainVerifier {
    inner: Arc<WebPkiServerVerifier>,
    check_name: bool,
}

impl ServerCertVerifier for ChainVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.inner.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.check_name => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(&self, m: &[u8], c: &CertificateDer<'_>, d: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(m, c, d)
    }

    fn verify_tls13_signature(&self, m: &[u8], c: &CertificateDer<'_>, d: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(m, c, d)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// `prefer` and `require` without `sslrootcert`: encrypted, the certificate not checked (what
/// libpq does; it protects against eavesdropping, not against an impostor).
#[derive(Debug)]
struct EncryptOnly(Arc<CryptoProvider>);

impl ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    // The handshake's signatures are still checked: the peer holds the certificate's key.
    fn verify_tls12_signature(&self, m: &[u8], c: &CertificateDer<'_>, d: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(&self, m: &[u8], c: &CertificateDer<'_>, d: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sslmode_and_sslrootcert_are_taken_out_for_tokio_postgres() {
        let t = PgTls::from_url("postgres://u:p@db:5432/x?sslmode=verify-full&sslrootcert=/ca.pem&application_name=a").unwrap();
        assert_eq!((t.mode, t.root_cert.as_deref()), (SslMode::VerifyFull, Some("/ca.pem")));
        assert_eq!(t.url, "postgres://u:p@db:5432/x?application_name=a&sslmode=require");
        let t = PgTls::from_url("postgres://u@db/x").unwrap();
        assert_eq!((t.mode, t.url.as_str()), (SslMode::Prefer, "postgres://u@db/x?sslmode=prefer"), "libpq's default");
        assert!(PgTls::from_url("postgres://u@db/x?sslmode=disable").unwrap().client_config().unwrap().is_none());
        let err = PgTls::from_url("postgres://u@db/x?sslmode=allow").unwrap_err().to_string();
        assert!(err.contains("verify-full"), "{err}");
        let err = PgTls::from_url("postgres://u@db/x?sslmode=verify-ca&sslrootcert=/nonexistent.pem")
            .unwrap()
            .client_config()
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent.pem"), "{err}");
    }
}
