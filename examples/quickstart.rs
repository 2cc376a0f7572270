//! Runs tokenkeeper against the built-in provider simulator: no credentials needed.
//!
//! A simulated provider issues single-use refresh tokens that rotate on every refresh and
//! revokes the whole grant if a used one comes back. We import the consent's refresh token
//! into a FileStore, then let 64 concurrent callers ask for tokens across several short
//! token lifetimes, and print what happened.
//!
//! ```text
//! cargo run --example quickstart
//! ```

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokenkeeper::testing::{Mode, Simulator};
use tokenkeeper::{FileStore, RefreshingTokenSource, TokenSource, TokenStore};

const CALLERS: usize = 64;
const LIFETIME: Duration = Duration::from_secs(2);
const RUN_FOR: Duration = Duration::from_millis(7_500);

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let started = Instant::now();
    let at = move || format!("{:>5.2}s", started.elapsed().as_secs_f64());

    let simulator = Simulator::builder(Mode::Lucid)
        .access_lifetime(LIFETIME)
        .start()
        .await?;
    let dir = tempfile::tempdir()?;
    let store = FileStore::new(dir.path());
    println!(
        "{} simulator (Lucid mode) at {}",
        at(),
        simulator.token_url()
    );
    println!(
        "{} access tokens live {}s; refresh tokens are single use",
        at(),
        LIFETIME.as_secs()
    );
    println!("{} token store: {}", at(), dir.path().display());

    let source = Arc::new(
        RefreshingTokenSource::builder(simulator.profile(), simulator.credentials())
            .store(store.clone())
            .key("quickstart")
            .initial_refresh_token(simulator.issue_grant())
            .build()?,
    );

    let mut callers = Vec::new();
    for _ in 0..CALLERS {
        let source = Arc::clone(&source);
        callers.push(tokio::spawn(async move {
            let mut calls = 0u64;
            while started.elapsed() < RUN_FOR {
                source.access_token().await.expect("a token");
                calls += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            calls
        }));
    }

    // Watch the store: print each rotation as it lands.
    let mut last_version = 0;
    while started.elapsed() < RUN_FOR {
        if let Some(stored) = store.load("quickstart").await?
            && stored.version != last_version
        {
            last_version = stored.version;
            let set = &stored.value;
            println!(
                "{} store v{}: access {} expires in {:.1}s, refresh {}",
                at(),
                stored.version,
                fingerprint(set.access_token.as_ref().map(|t| t.secret())),
                set.expires_at
                    .map(|e| (e - time::OffsetDateTime::now_utc()).as_seconds_f64())
                    .unwrap_or(0.0),
                fingerprint(set.refresh_token.as_ref().map(|t| t.secret())),
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let mut calls = 0;
    for caller in callers {
        calls += caller.await?;
    }
    let counters = simulator.counters();
    println!();
    println!("{CALLERS} callers made {calls} access_token() calls");
    println!(
        "simulator: {} refreshes, {} refresh-token reuse attempts, {} revoked grants",
        counters.refreshes, counters.reuse_attempts, counters.revoked_grants
    );
    println!("(tokens are shown as fingerprints: secrets are never printed)");
    if counters.reuse_attempts != 0 || counters.revoked_grants != 0 {
        return Err("a refresh token was presented twice".into());
    }
    Ok(())
}

/// A short, non-reversible name for a token.
fn fingerprint(secret: Option<&str>) -> String {
    match secret {
        Some(s) => {
            let mut hasher = DefaultHasher::new();
            s.hash(&mut hasher);
            format!("#{:08x}", hasher.finish() as u32)
        }
        None => "(none)".into(),
    }
}
