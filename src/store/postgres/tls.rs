//! TLS for [`PostgresStore`](super::PostgresStore), with rustls: libpq's `sslmode` and
//! `sslrootcert` connection parameters, which tokio-postgres does not take (it knows
//! three of the five modes and no root file).
//!
//! | `sslmode` | TLS | the server's certificate |
//! |---|---|---|
//! | `disable` | never | |
//! | `prefer` (default) | if the server offers it | not checked (as libpq) |
//! | `require` | always | not checked; checked like `verify-ca` when `sslrootcert` is given (as libpq) |
//! | `verify-ca` | always | signed by a trusted root |
//! | `verify-full` | always | signed by a trusted root, and names the host |
//!
//! The trusted roots are the PEM certificates in the file `sslrootcert` names, or the
//! system's (`sslrootcert=system`, or none given).

use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::store::StoreError;

/// libpq's `sslmode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Result<Self, StoreError> {
        Ok(match value {
            "disable" => Self::Disable,
            "allow" | "prefer" => Self::Prefer,
            "require" => Self::Require,
            "verify-ca" => Self::VerifyCa,
            "verify-full" => Self::VerifyFull,
            _ => {
                return Err(StoreError::Misconfigured(
                    "sslmode must be disable, prefer, require, verify-ca or verify-full".into(),
                ));
            }
        })
    }

    /// The mode tokio-postgres negotiates with.
    pub(super) fn negotiation(self) -> tokio_postgres::config::SslMode {
        match self {
            Self::Disable => tokio_postgres::config::SslMode::Disable,
            Self::Prefer => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        }
    }
}

/// The TLS parameters of a connection string.
#[derive(Debug)]
pub(super) struct TlsSettings {
    pub(super) mode: SslMode,
    /// `sslrootcert`: a PEM file, or `system`.
    root_cert: Option<String>,
}

/// Takes `sslmode` and `sslrootcert` out of `config` (a URL or a `key=value` string);
/// returns the rest for tokio-postgres, and the TLS settings.
pub(super) fn split(config: &str) -> Result<(String, TlsSettings), StoreError> {
    let (rest, params) = if config.starts_with("postgres://") || config.starts_with("postgresql://")
    {
        split_url(config)
    } else {
        split_key_values(config)
    };
    let mut settings = TlsSettings {
        mode: SslMode::Prefer,
        root_cert: None,
    };
    for (key, value) in params {
        match key.as_str() {
            "sslmode" => settings.mode = SslMode::parse(&value)?,
            _ => settings.root_cert = Some(value),
        }
    }
    Ok((rest, settings))
}

fn is_tls_param(key: &str) -> bool {
    key == "sslmode" || key == "sslrootcert"
}

fn split_url(config: &str) -> (String, Vec<(String, String)>) {
    let Ok(mut url) = url::Url::parse(config) else {
        // tokio-postgres says what is wrong with it.
        return (config.to_owned(), Vec::new());
    };
    let (tls, kept): (Vec<_>, Vec<_>) = url
        .query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .partition(|(k, _)| is_tls_param(k));
    if kept.is_empty() {
        url.set_query(None);
    } else {
        url.query_pairs_mut().clear().extend_pairs(kept);
    }
    (url.to_string(), tls)
}

/// Splits a libpq `key=value` string: values unquoted up to whitespace, or single-quoted
/// with backslash escapes.
fn split_key_values(config: &str) -> (String, Vec<(String, String)>) {
    let mut kept = String::new();
    let mut tls = Vec::new();
    let mut chars = config.char_indices().peekable();
    while let Some(&(start, c)) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
            continue;
        }
        let mut key = String::new();
        while let Some(&(_, c)) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        while chars.peek().is_some_and(|&(_, c)| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_some_and(|&(_, c)| c == '=') {
            chars.next();
        }
        while chars.peek().is_some_and(|&(_, c)| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek().is_some_and(|&(_, c)| c == '\'') {
            chars.next();
            while let Some((_, c)) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next().map(|(_, c)| c)),
                    '\'' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some(&(_, c)) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                value.push(c);
                chars.next();
            }
        }
        let end = chars.peek().map_or(config.len(), |&(i, _)| i);
        if is_tls_param(&key) {
            tls.push((key, value));
        } else {
            if !kept.is_empty() {
                kept.push(' ');
            }
            kept.push_str(&config[start..end]);
        }
    }
    (kept, tls)
}

/// The connector for `settings` (`None`: plaintext only).
pub(super) fn connector(settings: &TlsSettings) -> Result<Option<MakeRustlsConnect>, StoreError> {
    let verify = match (settings.mode, settings.root_cert.is_some()) {
        (SslMode::Disable, _) => return Ok(None),
        (SslMode::Prefer, _) | (SslMode::Require, false) => Verify::Nothing,
        (SslMode::Require, true) | (SslMode::VerifyCa, _) => Verify::Chain,
        (SslMode::VerifyFull, _) => Verify::ChainAndName,
    };
    let provider = CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()));
    let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| StoreError::Misconfigured(format!("TLS: {e}")))?;
    let verifier: Arc<dyn ServerCertVerifier> = match verify {
        Verify::Nothing => Arc::new(AnyCertificate(provider)),
        Verify::Chain | Verify::ChainAndName => {
            let roots = Arc::new(roots(settings.root_cert.as_deref())?);
            let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider)
                .build()
                .map_err(|e| StoreError::Misconfigured(format!("TLS roots: {e}")))?;
            if verify == Verify::Chain {
                Arc::new(ChainOnly(webpki))
            } else {
                webpki
            }
        }
    };
    let config = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(Some(MakeRustlsConnect::new(config)))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Verify {
    Nothing,
    Chain,
    ChainAndName,
}

/// The roots in the PEM file `path`, or the system's (`None` or `system`).
fn roots(path: Option<&str>) -> Result<RootCertStore, StoreError> {
    let mut store = RootCertStore::empty();
    match path {
        Some(path) if path != "system" => {
            let certs: Vec<CertificateDer<'static>> =
                CertificateDer::pem_file_iter(PathBuf::from(path))
                    .and_then(Iterator::collect)
                    .map_err(|e| {
                        StoreError::Misconfigured(format!(
                            "sslrootcert {path:?} cannot be read as PEM certificates: {e}"
                        ))
                    })?;
            let (added, _) = store.add_parsable_certificates(certs);
            if added == 0 {
                return Err(StoreError::Misconfigured(format!(
                    "sslrootcert {path:?} holds no usable certificate"
                )));
            }
        }
        _ => {
            let found = rustls_native_certs::load_native_certs();
            store.add_parsable_certificates(found.certs);
            if store.is_empty() {
                return Err(StoreError::Misconfigured(
                    "no system root certificates found: give sslrootcert".into(),
                ));
            }
        }
    }
    Ok(store)
}

/// `prefer` and `require` without roots: encryption only, any certificate (libpq's
/// meaning of those modes); the handshake's signatures are still checked.
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

/// `verify-ca`: the chain to a trusted root, whatever host the certificate names.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_parameters_are_taken_out_of_urls_and_key_value_strings() {
        let (rest, tls) = split(
            "postgresql://app@db.internal:5433/app?sslmode=verify-full&application_name=x&sslrootcert=/etc/ca.pem",
        )
        .unwrap();
        assert_eq!(
            rest,
            "postgresql://app@db.internal:5433/app?application_name=x"
        );
        assert_eq!(tls.mode, SslMode::VerifyFull);
        assert_eq!(tls.root_cert.as_deref(), Some("/etc/ca.pem"));

        let (rest, tls) =
            split("host=db user=app sslmode = 'verify-ca' sslrootcert='/a b/ca.pem' dbname=x")
                .unwrap();
        assert_eq!(rest, "host=db user=app dbname=x");
        assert_eq!(tls.mode, SslMode::VerifyCa);
        assert_eq!(tls.root_cert.as_deref(), Some("/a b/ca.pem"));

        let (rest, tls) = split("postgresql://app@db/app").unwrap();
        assert_eq!(rest, "postgresql://app@db/app");
        assert_eq!(tls.mode, SslMode::Prefer, "libpq's default");
        assert!(matches!(
            split("host=db sslmode=sometimes"),
            Err(StoreError::Misconfigured(_))
        ));
    }
}
