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

use std::process::ExitCode;

use tokenkeeper::{ClientCredentials, FileStore, ProviderProfile, RefreshingTokenSource};
use url::Url;

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
    let base_url = env("HIGHQ_BASE_URL")?;
    let base_url =
        Url::parse(&base_url).map_err(|e| format!("HIGHQ_BASE_URL is not a URL: {e}"))?;
    let client_id = env("HIGHQ_CLIENT_ID")?;
    let client_secret = env("HIGHQ_CLIENT_SECRET")?;
    let refresh_token = env("HIGHQ_REFRESH_TOKEN")?;
    let store_dir = std::env::var("TOKENKEEPER_STORE_DIR").unwrap_or_else(|_| "tokens".into());

    let key = format!("highq:{}", base_url.as_str());
    let source = RefreshingTokenSource::builder(
        ProviderProfile::highq(base_url),
        ClientCredentials::new(client_id, client_secret),
    )
    .store(FileStore::new(&store_dir))
    .key(key) // one file per instance; the store encodes any character
    .initial_refresh_token(refresh_token)
    .build()?;

    let token = source.access_token().await.map_err(|e| {
        if e.needs_reauthorization() {
            format!("{e}\nauthorize the application again and set a new HIGHQ_REFRESH_TOKEN")
        } else {
            e.to_string()
        }
    })?;
    // Printing the token is what this tool is for: pipe it into an API call.
    println!("{}", token.secret());
    Ok(())
}
