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

/// The TLS parameters of a connection string, checked.
#[derive(Debug)]
pub(super) struct TlsSettings {
    pub(super) mode: SslMode,
    /// `sslrootcert`: a PEM file, or `system`.
    root_cert: Option<String>,
}

/// `sslmode` and `sslrootcert` as the connection string gave them.
#[derive(Debug, Default)]
pub(super) struct TlsParams {
    mode: Option<SslMode>,
    root_cert: Option<String>,
}

/// Takes `sslmode` and `sslrootcert` out of `config` (a URL or a `key=value` string);
/// returns the rest for tokio-postgres, and the parameters.
pub(super) fn split(config: &str) -> Result<(String, TlsParams), StoreError> {
    let (rest, found) = if config.starts_with("postgres://") || config.starts_with("postgresql://")
    {
        split_url(config)
    } else {
        split_key_values(config)
    };
    let mut params = TlsParams::default();
    for (key, value) in found {
        match key.as_str() {
            "sslmode" => params.mode = Some(SslMode::parse(&value)?),
            _ => params.root_cert = Some(value),
        }
    }
    Ok((rest, params))
}

impl TlsParams {
    /// The settings, as libpq reads them, refusing what would check less than it seems
    /// to. `parsed`: the mode tokio-postgres read from the rest (a parameter in a form
    /// only it reads, such as a multi-host URL): used when this splitter found none.
    pub(super) fn settle(
        self,
        parsed: tokio_postgres::config::SslMode,
    ) -> Result<TlsSettings, StoreError> {
        let explicit = self.mode.or(match parsed {
            tokio_postgres::config::SslMode::Disable => Some(SslMode::Disable),
            tokio_postgres::config::SslMode::Require => Some(SslMode::Require),
            // Prefer is also tokio-postgres's default: not telling.
            _ => None,
        });
        let refuse = |why: &str| Err(StoreError::Misconfigured(why.to_owned()));
        let mode = match (explicit, self.root_cert.as_deref()) {
            // Roots given: verifying is what they are for (libpq: `sslrootcert=system`
            // makes verify-full the default and weaker modes errors).
            (None, Some(_)) => SslMode::VerifyFull,
            (Some(SslMode::VerifyFull), _) => SslMode::VerifyFull,
            (Some(weaker), Some("system")) => {
                let _ = weaker;
                return refuse(
                    "sslrootcert=system needs sslmode=verify-full: the system's public roots \
                     vouch for any site's certificate, so only the host name check makes them \
                     mean something",
                );
            }
            (Some(SslMode::Disable | SslMode::Prefer), Some(_)) => {
                return refuse(
                    "sslrootcert is for verifying the server: use sslmode=verify-full, \
                     verify-ca or require with it",
                );
            }
            (Some(SslMode::Require | SslMode::VerifyCa), Some(_)) => SslMode::VerifyCa,
            (Some(SslMode::VerifyCa), None) => {
                return refuse(
                    "sslmode=verify-ca needs sslrootcert (your CA's certificates): without a \
                     host name check, the system's public roots would accept any site's \
                     certificate; or use sslmode=verify-full",
                );
            }
            (Some(mode), None) => mode,
            (None, None) => SslMode::Prefer,
        };
        Ok(TlsSettings {
            mode,
            root_cert: self.root_cert,
        })
    }
}

fn is_tls_param(key: &str) -> bool {
    key == "sslmode" || key == "sslrootcert"
}

/// Splits the URL's query by hand, keeping the other parameters exactly as written (a
/// URL parser would re-encode them, and multi-host URLs are not URLs to it).
fn split_url(config: &str) -> (String, Vec<(String, String)>) {
    let Some((base, query)) = config.split_once('?') else {
        return (config.to_owned(), Vec::new());
    };
    let mut kept = Vec::new();
    let mut tls = Vec::new();
    for part in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = part.split_once('=').unwrap_or((part, ""));
        let key = percent_decoded(key);
        if is_tls_param(&key) {
            tls.push((key, percent_decoded(value)));
        } else {
            kept.push(part);
        }
    }
    let rest = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    (rest, tls)
}

/// `%XX` decoded (as tokio-postgres decodes URL parameters: `+` stays `+`).
fn percent_decoded(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'%', Some(&h), Some(&l)) if hex(h).is_some() && hex(l).is_some() => {
                let value = hex(h).unwrap_or(0) * 16 + hex(l).unwrap_or(0);
                out.push(u8::try_from(value).unwrap_or(b'?'));
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
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
                chars.next();
                if c == '\\' {
                    value.extend(chars.next().map(|(_, c)| c));
                } else {
                    value.push(c);
                }
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
    let verify = match settings.mode {
        SslMode::Disable => return Ok(None),
        SslMode::Prefer | SslMode::Require => Verify::Nothing,
        SslMode::VerifyCa => Verify::Chain,
        SslMode::VerifyFull => Verify::ChainAndName,
    };
    let provider = crate::tls::provider();
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
    use tokio_postgres::config::SslMode as Parsed;

    fn settled(config: &str) -> Result<(String, SslMode, Option<String>), StoreError> {
        let (rest, params) = split(config)?;
        let parsed: tokio_postgres::Config = rest.parse().expect("tokio-postgres parses the rest");
        let settings = params.settle(parsed.get_ssl_mode())?;
        Ok((rest, settings.mode, settings.root_cert))
    }

    #[test]
    fn tls_parameters_are_taken_out_of_urls_and_key_value_strings() {
        let (rest, mode, root) = settled(
            "postgresql://app@db.internal:5433/app?sslmode=verify-full&options=-c%20statement_timeout%3D5s&sslrootcert=/etc/ca.pem",
        )
        .unwrap();
        assert_eq!(
            rest, "postgresql://app@db.internal:5433/app?options=-c%20statement_timeout%3D5s",
            "the other parameters are kept exactly as written"
        );
        assert_eq!(mode, SslMode::VerifyFull);
        assert_eq!(root.as_deref(), Some("/etc/ca.pem"));

        let (rest, mode, root) =
            settled("host=db user=app sslmode = 'verify-ca' sslrootcert='/a b/ca.pem' dbname=x")
                .unwrap();
        assert_eq!(rest, "host=db user=app dbname=x");
        assert_eq!(mode, SslMode::VerifyCa);
        assert_eq!(root.as_deref(), Some("/a b/ca.pem"));

        let (rest, mode, _) = settled("postgresql://app@db/app").unwrap();
        assert_eq!(rest, "postgresql://app@db/app");
        assert_eq!(mode, SslMode::Prefer, "libpq's default");
        assert!(matches!(
            split("host=db sslmode=sometimes"),
            Err(StoreError::Misconfigured(_))
        ));
    }

    #[test]
    fn require_is_never_lost_to_a_form_the_splitter_does_not_read() {
        // A multi-host URL, and a backslash-escaped space in a value.
        for config in [
            "postgresql://app@db1:5432,db2:5432/app?sslmode=require",
            r"host=db password=p\ w sslmode=require",
        ] {
            let (_, mode, _) = settled(config).unwrap();
            assert_eq!(mode, SslMode::Require, "{config}");
        }
        let (rest, params) = split(r"host=db password=p\ w sslmode=require").unwrap();
        assert_eq!(params.mode, Some(SslMode::Require));
        assert!(!rest.contains("sslmode"));
        let parsed: tokio_postgres::Config = rest.parse().unwrap();
        assert_eq!(parsed.get_ssl_mode(), Parsed::Prefer);
    }

    #[test]
    fn modes_that_would_check_less_than_they_seem_are_refused() {
        // Roots given without a mode: verify-full, as libpq does for `system`.
        let (_, mode, _) = settled("postgresql://db/app?sslrootcert=/etc/ca.pem").unwrap();
        assert_eq!(mode, SslMode::VerifyFull);
        let (_, mode, _) = settled("postgresql://db/app?sslrootcert=system").unwrap();
        assert_eq!(mode, SslMode::VerifyFull);
        // require with a root file: the chain is checked (libpq).
        let (_, mode, _) =
            settled("postgresql://db/app?sslmode=require&sslrootcert=/etc/ca.pem").unwrap();
        assert_eq!(mode, SslMode::VerifyCa);
        for config in [
            "postgresql://db/app?sslmode=verify-ca",
            "postgresql://db/app?sslmode=verify-ca&sslrootcert=system",
            "postgresql://db/app?sslmode=require&sslrootcert=system",
            "postgresql://db/app?sslmode=prefer&sslrootcert=/etc/ca.pem",
            "postgresql://db/app?sslmode=disable&sslrootcert=/etc/ca.pem",
        ] {
            assert!(
                matches!(settled(config), Err(StoreError::Misconfigured(_))),
                "{config}"
            );
        }
    }
}
