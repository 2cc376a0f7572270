//! Prints a fresh Autodesk Platform Services (APS) access token, refreshing it when
//! needed: a file holding the tokens (as in Lucid's seed script), with locking, atomic
//! writes and typed errors. APS refresh tokens are single use and live 15 days: the
//! rotated one is saved before the access token is printed.
//!
//! ```text
//! APS_CLIENT_ID=... APS_CLIENT_SECRET=... APS_REFRESH_TOKEN=... cargo run --example autodesk
//! ```
//!
//! Leave `APS_CLIENT_SECRET` unset for a public (PKCE) client: the id then goes in the
//! body and no secret is sent. Set `APS_SCOPE` (space separated, e.g. `viewables:read`) to
//! narrow the scope on refresh. `APS_REFRESH_TOKEN` is imported only when the store holds
//! nothing yet; the rotated tokens live in `TOKENKEEPER_STORE_DIR` (default `./tokens`).

mod common;

use std::process::ExitCode;

use tokenkeeper::{ClientCredentials, ProviderProfile, RefreshingTokenSource};

#[tokio::main]
async fn main() -> ExitCode {
    common::print_fresh_token(source(), "APS_REFRESH_TOKEN").await
}

fn source() -> Result<RefreshingTokenSource, Box<dyn std::error::Error>> {
    let client_id = common::env("APS_CLIENT_ID")?;
    // Without a secret this is a public (PKCE) client: client_id in the body only.
    let credentials = match common::optional_env("APS_CLIENT_SECRET") {
        Some(secret) => ClientCredentials::new(client_id, secret),
        None => ClientCredentials::public(client_id),
    };
    let mut profile = ProviderProfile::autodesk();
    if let Some(scope) = common::optional_env("APS_SCOPE") {
        profile = profile.with_refresh_scope(scope.split_whitespace());
    }
    Ok(RefreshingTokenSource::builder(profile, credentials)
        .store(common::file_store())
        .key("autodesk")
        .initial_refresh_token(common::env("APS_REFRESH_TOKEN")?)
        .build()?)
}
