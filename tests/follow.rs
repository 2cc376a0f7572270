//! Replicas follow each other's rotations through the store's watch
//! (`TokenStore::watch`): against a provider whose refresh kills the previous access
//! token (the simulator's Lucid mode), a replica serves the new token within
//! milliseconds of another replica's save, without a request of its own.

use std::time::Duration;

use tokenkeeper::testing::{Mode, Simulator};
use tokenkeeper::{AccessToken, MemoryStore, RefreshingTokenSource, TokenManager};

async fn lucid() -> Simulator {
    Simulator::builder(Mode::Lucid)
        .access_lifetime(Duration::from_secs(3600))
        .start()
        .await
        .unwrap()
}

/// Calls `get` until it returns `wanted`, for at most two seconds; how many calls it took.
async fn until_served<F, Fut>(wanted: &AccessToken, mut get: F) -> usize
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = AccessToken>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    let mut calls = 0;
    loop {
        calls += 1;
        if &get().await == wanted {
            return calls;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the other replica's token was not served within 2 s"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_follows_another_sources_rotation_without_a_request() {
    let sim = lucid().await;
    let store = MemoryStore::new();
    let source = |initial: Option<String>| {
        let mut builder = RefreshingTokenSource::builder(sim.profile(), sim.credentials())
            .store(store.clone())
            .key("shared");
        if let Some(initial) = initial {
            builder = builder.initial_refresh_token(initial);
        }
        builder.build().unwrap()
    };
    let a = source(Some(sim.issue_grant()));
    let b = source(None);
    let first = a.access_token().await.unwrap();
    assert_eq!(b.access_token().await.unwrap(), first, "B adopts A's set");
    assert_eq!(sim.counters().refreshes, 1);

    // The API rejects A's token: A refreshes, which kills the token B holds.
    a.invalidate(&first);
    let second = a.access_token().await.unwrap();
    assert_ne!(second, first);
    until_served(&second, || async { b.access_token().await.unwrap() }).await;
    assert_eq!(sim.counters().refreshes, 2, "B made no request of its own");
    assert_eq!(sim.counters().reuse_attempts, 0);
    let status = b.status();
    assert!(
        status.metrics.adoptions_by_watch >= 1,
        "{:?}",
        status.metrics
    );
    assert!(status.store_version_heard.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_managers_grants_follow_another_replicas_rotations() {
    let sim = lucid().await;
    let store = MemoryStore::new();
    let manager = || {
        TokenManager::builder(sim.profile(), sim.credentials())
            .store(store.clone())
            .build()
            .unwrap()
    };
    let (a, b) = (manager(), manager());
    let keys: Vec<String> = (0..20).map(|i| format!("user-{i}")).collect();
    for key in &keys {
        a.source(key)
            .unwrap()
            .import_refresh_token(sim.issue_grant())
            .await
            .unwrap();
        let token = a.source(key).unwrap().access_token().await.unwrap();
        assert_eq!(b.source(key).unwrap().access_token().await.unwrap(), token);
    }
    let before = sim.counters().refreshes;
    for key in &keys {
        let a = a.source(key).unwrap();
        let old = a.access_token().await.unwrap();
        a.invalidate(&old);
        let new = a.access_token().await.unwrap();
        let b = b.source(key).unwrap();
        until_served(&new, || async { b.access_token().await.unwrap() }).await;
    }
    assert_eq!(
        sim.counters().refreshes - before,
        20,
        "one refresh per grant, by A only"
    );
    assert_eq!(sim.counters().reuse_attempts, 0);
}
