//! Prints a fresh HighQ Collaborate access token, refreshing it when needed: a file
//! holding the tokens (as in Lucid's seed script), with locking, atomic writes and typed
//! errors. HighQ answers XML or JSON; both are read.
//!
//! ```text
//! HIGHQ_BASE_URL=https://example.highq.com/acme/ HIGHQ_CLIENT_ID=1234 \
//! HIGHQ_CLIENT_SECRET=... HIGHQ_REFRESH_TOKEN=... cargo run --example highq
//! ```
//!
//! `HIGHQ_BASE_URL` is the instance URL (`https://{host}/{instance}/`); the token endpoint
//! is `{base}/api/oauth2/token`. `HIGHQ_REFRESH_TOKEN` is imported only when the store
//! holds nothing yet; the rotated tokens live in `TOKENKEEPER_STORE_DIR` (default
//! `./tokens`). On API calls, HighQ answers 403 (not 401) for an expired access token.

mod common;

use std::process::ExitCode;

use tokenkeeper::{ClientCredentials, ProviderProfile, RefreshingTokenSource};
use url::Url;

#[tokio::main]
async fn main() -> ExitCode {
    common::print_fresh_token(source(), "HIGHQ_REFRESH_TOKEN").await
}

fn source() -> Result<RefreshingTokenSource, Box<dyn std::error::Error>> {
    let base_url = Url::parse(&common::env("HIGHQ_BASE_URL")?)
        .map_err(|e| format!("HIGHQ_BASE_URL is not a URL: {e}"))?;
    let credentials = ClientCredentials::new(
        common::env("HIGHQ_CLIENT_ID")?,
        common::env("HIGHQ_CLIENT_SECRET")?,
    );
    // One file per instance; the store encodes any character of the key.
    let key = format!("highq:{}", base_url.as_str());
    Ok(
        RefreshingTokenSource::builder(ProviderProfile::highq(base_url), credentials)
            .store(common::file_store())
            .key(key)
            .initial_refresh_token(common::env("HIGHQ_REFRESH_TOKEN")?)
            .build()?,
    )
}
