//! Prints a fresh Lucid access token, refreshing it when needed: the Lucid seed script
//! (a file holding the tokens, refreshed before they expire), with locking, atomic writes,
//! rotation that never loses a refresh token, and typed errors.
//!
//! ```text
//! LUCID_CLIENT_ID=... LUCID_CLIENT_SECRET=... LUCID_REFRESH_TOKEN=oauth2-... \
//!     cargo run --example lucid
//! ```
//!
//! `LUCID_REFRESH_TOKEN` (from a consent with the `offline_access` scope) is imported only
//! when the store holds nothing yet; afterwards the rotated tokens live in
//! `TOKENKEEPER_STORE_DIR` (default `./tokens`).

mod common;

use std::process::ExitCode;

use tokenkeeper::{ClientCredentials, ProviderProfile, RefreshingTokenSource};

#[tokio::main]
async fn main() -> ExitCode {
    common::print_fresh_token(source(), "LUCID_REFRESH_TOKEN").await
}

fn source() -> Result<RefreshingTokenSource, Box<dyn std::error::Error>> {
    let credentials = ClientCredentials::new(
        common::env("LUCID_CLIENT_ID")?,
        common::env("LUCID_CLIENT_SECRET")?,
    );
    Ok(
        RefreshingTokenSource::builder(ProviderProfile::lucid(), credentials)
            .store(common::file_store())
            .key("lucid")
            .initial_refresh_token(common::env("LUCID_REFRESH_TOKEN")?)
            .build()?,
    )
}
