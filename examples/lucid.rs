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

use std::process::ExitCode;

use tokenkeeper::{ClientCredentials, FileStore, ProviderProfile, RefreshingTokenSource};

fn env(name: &str) -> Result<String, String> {
    match std::env::var(name) {
        Ok(value) if !value.trim().is_empty() => Ok(value.trim().to_owned()),
        _ => Err(format!("the environment variable {name} is not set")),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let client_id = env("LUCID_CLIENT_ID")?;
    let client_secret = env("LUCID_CLIENT_SECRET")?;
    let refresh_token = env("LUCID_REFRESH_TOKEN")?;
    let store_dir = std::env::var("TOKENKEEPER_STORE_DIR").unwrap_or_else(|_| "tokens".into());

    let source = RefreshingTokenSource::builder(
        ProviderProfile::lucid(),
        ClientCredentials::new(client_id, client_secret),
    )
    .store(FileStore::new(&store_dir))
    .key("lucid")
    .initial_refresh_token(refresh_token)
    .build()?;

    let token = source.access_token().await.map_err(|e| {
        if e.needs_reauthorization() {
            format!("{e}\nauthorize the application again and set a new LUCID_REFRESH_TOKEN")
        } else {
            e.to_string()
        }
    })?;
    // Printing the token is what this tool is for: pipe it into an API call.
    println!("{}", token.secret());
    Ok(())
}
