//! Downscoped tokens (Autodesk's viewer case): `access_token_for(&["data:read"])` next
//! to the full-scope token of the same grant, against the simulator's Autodesk rules
//! (a subset only; the new refresh token keeps the whole grant; the old access token
//! stays valid) and its reuse detection.

use std::time::Duration;

use tokenkeeper::testing::{Mode, Simulator};
use tokenkeeper::{AccessToken, Error, MemoryStore, RefreshingTokenSource};

async fn api_accepts(sim: &Simulator, token: &AccessToken) -> bool {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(sim.api_url())
        .bearer_auth(token.secret())
        .send()
        .await
        .unwrap()
        .status()
        .is_success()
}

fn source(sim: &Simulator, store: &MemoryStore, grant: &str) -> RefreshingTokenSource {
    RefreshingTokenSource::builder(sim.profile(), sim.credentials())
        .store(store.clone())
        .initial_refresh_token(grant)
        .build()
        .unwrap()
}

/// The full-scope token and the viewer token are both valid; one rotation per
/// downscoped refresh, whose new refresh token is the one stored; both stay cached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_full_and_the_downscoped_token_are_both_valid_and_cached() {
    let sim = Simulator::builder(Mode::Autodesk).start().await.unwrap();
    let store = MemoryStore::new();
    let source = source(&sim, &store, &sim.issue_grant());
    let full = source.access_token().await.unwrap();
    let viewer = source.access_token_for(&["data:read"]).await.unwrap();
    assert_ne!(full, viewer);
    assert_eq!(
        sim.counters().refreshes,
        2,
        "one rotation for the downscoped token"
    );
    assert!(
        api_accepts(&sim, &full).await,
        "the full-scope token stays valid"
    );
    assert!(
        api_accepts(&sim, &viewer).await,
        "the viewer token is valid"
    );

    let stored = store.get("default").unwrap().value;
    assert_eq!(
        stored.access_token.as_ref(),
        Some(&full),
        "the store keeps the full token"
    );
    assert_eq!(
        stored.refresh_token.as_ref().map(|t| t.secret().to_owned()),
        sim.current_refresh_token(0),
        "and the refresh token the downscoped refresh returned"
    );
    assert_eq!(source.access_token().await.unwrap(), full, "cached");
    assert_eq!(
        source
            .access_token_for(&["data:read", "data:read"])
            .await
            .unwrap(),
        viewer,
        "cached per scope set"
    );
    assert_eq!(sim.counters().refreshes, 2);

    // Another replica sharing the store keeps going from the rotated refresh token.
    let replica = RefreshingTokenSource::builder(sim.profile(), sim.credentials())
        .store(store.clone())
        .build()
        .unwrap();
    replica.invalidate(&replica.access_token().await.unwrap());
    replica.access_token().await.unwrap();
    assert_eq!(sim.counters().reuse_attempts, 0);
}

/// Concurrent full-scope and downscoped requests on one grant, from two sources
/// sharing the store: nothing presented twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_full_and_downscoped_requests_never_reuse_a_refresh_token() {
    let sim = Simulator::builder(Mode::Autodesk)
        .response_delay(Duration::from_millis(20))
        .start()
        .await
        .unwrap();
    let store = MemoryStore::new();
    let grant = sim.issue_grant();
    let (a, b) = (source(&sim, &store, &grant), source(&sim, &store, &grant));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..60 {
        let source = if i % 2 == 0 { a.clone() } else { b.clone() };
        tasks.spawn(async move {
            match i % 3 {
                0 => source.access_token().await,
                1 => source.access_token_for(&["data:read"]).await,
                _ => source.access_token_for(&["data:write"]).await,
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap().expect("every caller is served");
    }
    let counters = sim.counters();
    assert_eq!(counters.reuse_attempts, 0);
    assert_eq!(counters.revoked_grants, 0);
    assert!(
        counters.refreshes <= 6,
        "one refresh per scope set per source at most: {counters:?}"
    );
}

/// A scope outside the grant is the provider's refusal; a profile whose refresh tokens
/// narrow with the scope is refused before anything is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scopes_outside_the_grant_and_narrowing_servers_are_refused() {
    let sim = Simulator::builder(Mode::Autodesk).start().await.unwrap();
    let store = MemoryStore::new();
    let source = source(&sim, &store, &sim.issue_grant());
    source.access_token().await.unwrap();
    let outcome = source.access_token_for(&["account:write"]).await;
    assert!(
        matches!(&outcome, Err(Error::RequestRejected { provider, .. }) if provider.code == "invalid_scope"),
        "{outcome:?}"
    );
    // The grant is intact.
    source.access_token_for(&["data:read"]).await.unwrap();

    let mut narrowing = sim.profile();
    narrowing.refresh_token_narrows_with_scope = true;
    let requests = sim.counters().requests;
    let source = RefreshingTokenSource::builder(narrowing, sim.credentials())
        .store(store.clone())
        .build()
        .unwrap();
    let outcome = source.access_token_for(&["data:read"]).await;
    assert!(matches!(outcome, Err(Error::Config(_))), "{outcome:?}");
    assert_eq!(sim.counters().requests, requests, "nothing was sent");
    assert_eq!(sim.counters().reuse_attempts, 0);
}

/// Where a refresh kills the previous access token (Lucid), the full-scope token is not
/// kept after a downscoped refresh: the next full request refreshes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn where_a_refresh_kills_the_old_token_the_full_token_is_refreshed_again() {
    let sim = Simulator::builder(Mode::Lucid).start().await.unwrap();
    let store = MemoryStore::new();
    let source = source(&sim, &store, &sim.issue_grant());
    let full = source.access_token().await.unwrap();
    source.access_token_for(&["data:read"]).await.unwrap();
    assert!(!api_accepts(&sim, &full).await, "Lucid killed it");
    let again = source.access_token().await.unwrap();
    assert_ne!(again, full, "a dead token is not served");
    assert!(api_accepts(&sim, &again).await);
    assert_eq!(sim.counters().reuse_attempts, 0);
}
