//! What the provider examples share: reading the environment, the token file store, and
//! printing a fresh access token (the job of Lucid's seed script).

use std::process::ExitCode;

use tokenkeeper::{FileStore, RefreshingTokenSource};

/// A required environment variable, trimmed; a message naming it when it is missing.
pub fn env(name: &str) -> Result<String, String> {
    optional_env(name).ok_or_else(|| format!("the environment variable {name} is not set"))
}

/// An optional environment variable, trimmed; empty counts as unset.
#[allow(dead_code)] // not every example has optional settings
pub fn optional_env(name: &str) -> Option<String> {
    std::env::var(name)
        .ok()
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

/// The token files: `TOKENKEEPER_STORE_DIR`, default `./tokens`.
pub fn file_store() -> FileStore {
    FileStore::new(optional_env("TOKENKEEPER_STORE_DIR").unwrap_or_else(|| "tokens".into()))
}

/// Prints a fresh access token from `source`; on failure, says why (and, when a person
/// must consent again, which variable takes the new refresh token) and exits non-zero.
pub async fn print_fresh_token(
    source: Result<RefreshingTokenSource, Box<dyn std::error::Error>>,
    refresh_token_var: &str,
) -> ExitCode {
    let token = match source {
        Ok(source) => source.access_token().await.map_err(|e| {
            if e.needs_reauthorization() {
                format!("{e}\nauthorize the application again and set a new {refresh_token_var}")
            } else {
                e.to_string()
            }
        }),
        Err(e) => Err(e.to_string()),
    };
    match token {
        Ok(token) => {
            // Printing the token is what this tool is for: pipe it into an API call.
            println!("{}", token.secret());
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}
