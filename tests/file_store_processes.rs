//! Four real processes share one FileStore and one simulator with single-use refresh tokens.

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokenkeeper::testing::{Mode, Simulator};
use tokenkeeper::{
    ClientCredentials, FileStore, ProviderProfile, RefreshingTokenSource, TokenSource, TokenStore,
};
use url::Url;

const CHILD: &str = "TOKENKEEPER_FILE_CHILD";
const PROCESSES: usize = 4;
const CALLERS: usize = 8;
const LIFETIME: Duration = Duration::from_secs(1);
/// Tokens turn stale at half their lifetime, so each lifetime window sees one refresh.
const RUN_FOR: Duration = Duration::from_secs(12);

/// The child's side: when started by the test below, hammer the shared source until told
/// to stop, failing (non-zero exit) on any error.
#[test]
fn child_process() {
    let Ok(config) = std::env::var(CHILD) else {
        return;
    };
    let config: serde_json::Value = serde_json::from_str(&config).unwrap();
    let text = |k: &str| config[k].as_str().unwrap().to_owned();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let profile = ProviderProfile::lucid().with_token_url(Url::parse(&text("url")).unwrap());
        let source = Arc::new(
            RefreshingTokenSource::builder(
                profile,
                ClientCredentials::new("sim-client", "sim-secret"),
            )
            .store(FileStore::new(text("dir")))
            .key("shared")
            .initial_refresh_token(text("refresh_token"))
            .build()
            .unwrap(),
        );
        let deadline = Instant::now() + Duration::from_millis(config["run_ms"].as_u64().unwrap());
        let callers: Vec<_> = (0..CALLERS)
            .map(|_| {
                let source = Arc::clone(&source);
                tokio::spawn(async move {
                    let mut calls = 0u64;
                    while Instant::now() < deadline {
                        source
                            .access_token()
                            .await
                            .expect("every call gets a token");
                        calls += 1;
                        tokio::time::sleep(Duration::from_millis(3)).await;
                    }
                    calls
                })
            })
            .collect();
        let mut calls = 0;
        for caller in callers {
            calls += caller.await.unwrap();
        }
        println!("child {} made {calls} calls", std::process::id());
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_processes_sharing_a_file_store_refresh_once_per_expiry_with_no_reuse() {
    let simulator = Simulator::builder(Mode::Lucid)
        .access_lifetime(LIFETIME)
        .start()
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = serde_json::json!({
        "url": simulator.token_url().as_str(),
        "dir": dir.path().to_str().unwrap(),
        "refresh_token": simulator.issue_grant(),
        "run_ms": RUN_FOR.as_millis() as u64,
    })
    .to_string();

    let started = Instant::now();
    let children: Vec<_> = (0..PROCESSES)
        .map(|_| {
            Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "child_process",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(CHILD, &config)
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    let statuses = tokio::task::spawn_blocking(move || {
        children
            .into_iter()
            .map(|mut c| c.wait().unwrap())
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    let elapsed = started.elapsed();
    for status in statuses {
        assert!(status.success(), "a child failed: {status}");
    }

    let counters = simulator.counters();
    assert_eq!(
        counters.reuse_attempts, 0,
        "no refresh token was presented twice"
    );
    assert_eq!(counters.revoked_grants, 0);
    // One refresh per token lifetime window (a token is stale after half its lifetime).
    let windows = (elapsed.as_millis() / (LIFETIME.as_millis() / 2)) as u64;
    assert!(
        counters.refreshes >= 20 && counters.refreshes <= windows + 1,
        "{} refreshes over {windows} half-lifetimes",
        counters.refreshes
    );
    // Every refresh was saved exactly once: the seed is version 1, and each rotation
    // writes two versions (its write-ahead record, then the rotated set).
    let stored = FileStore::new(dir.path())
        .load("shared")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.version, 2 * counters.refreshes + 1);
    assert!(
        stored.value.rotation.is_none(),
        "no refresh is left in flight"
    );
    assert_eq!(
        stored.value.refresh_token.unwrap().secret(),
        simulator.current_refresh_token(0).unwrap(),
        "the store holds the one live refresh token"
    );
}
