//! Which cryptography TLS uses: rustls with the provider the build selects (the
//! `aws-lc-rs` feature, the default, or `ring`), or the one the application installed.

use std::sync::Arc;

use rustls::crypto::CryptoProvider;

#[cfg(not(any(feature = "aws-lc-rs", feature = "ring")))]
compile_error!(
    "tokenkeeper needs a TLS crypto provider: enable the `aws-lc-rs` feature (the default) or `ring`"
);

/// The crypto provider for every TLS connection the library makes (token endpoints,
/// Redis, PostgreSQL): the process's default if the application installed one;
/// otherwise the build's (aws-lc-rs when both are compiled in), installed as the
/// process's default, as rustls does itself when exactly one provider is compiled in.
/// Installing it matters where a library builds its TLS configuration from the default
/// alone (reqwest without a built-in provider, redis), and where both providers are
/// compiled in (rustls then picks none by itself).
pub(crate) fn provider() -> Arc<CryptoProvider> {
    if let Some(installed) = CryptoProvider::get_default() {
        return Arc::clone(installed);
    }
    let built = built_in();
    // Another thread may install first: its choice stands.
    let _ = built.clone().install_default();
    CryptoProvider::get_default().map_or_else(|| Arc::new(built), Arc::clone)
}

/// The provider this build selects.
fn built_in() -> CryptoProvider {
    #[cfg(feature = "aws-lc-rs")]
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    #[cfg(all(feature = "ring", not(feature = "aws-lc-rs")))]
    let provider = rustls::crypto::ring::default_provider();
    provider
}
