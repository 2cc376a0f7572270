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

use std::process::ExitCode;

use tokenkeeper::{ClientCredentials, FileStore, ProviderProfile, RefreshingTokenSource};

fn env(name: &str) -> Result<String, String> {
    optional_env(name).ok_or_else(|| format!("the environment variable {name} is not set"))
}

fn optional_env(name: &str) -> Option<String> {
    std::env::var(name)
        .ok()
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
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
    let client_id = env("APS_CLIENT_ID")?;
    let credentials = match optional_env("APS_CLIENT_SECRET") {
        Some(secret) => ClientCredentials::new(client_id, secret),
        None => ClientCredentials::public(client_id),
    };
    let refresh_token = env("APS_REFRESH_TOKEN")?;
    let store_dir = std::env::var("TOKENKEEPER_STORE_DIR").unwrap_or_else(|_| "tokens".into());

    let mut profile = ProviderProfile::autodesk();
    if let Some(scope) = optional_env("APS_SCOPE") {
        profile = profile.with_refresh_scope(scope.split_whitespace());
    }
    let source = RefreshingTokenSource::builder(profile, credentials)
        .store(FileStore::new(&store_dir))
        .key("autodesk")
        .initial_refresh_token(refresh_token)
        .build()?;

    let token = source.access_token().await.map_err(|e| {
        if e.needs_reauthorization() {
            format!("{e}\nsign in again and set a new APS_REFRESH_TOKEN")
        } else {
            e.to_string()
        }
    })?;
    // Printing the token is what this tool is for: pipe it into an API call.
    println!("{}", token.secret());
    Ok(())
}
