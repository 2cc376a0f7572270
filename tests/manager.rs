//! `TokenManager`: many grants through one engine each, bounded memory, the fleet sweep,
//! events. The simulator's reuse detection judges every scenario.
#![cfg(feature = "manager")]

use std::sync::Arc;
use std::time::Duration;

use tokenkeeper::testing::{Mode, Simulator};
use tokenkeeper::{
    AccessToken, EventKind, ManualClock, MemoryStore, RefreshToken, SweepOptions, TokenManager,
    TokenSet, TokenStore,
};

fn key(i: usize) -> String {
    format!("user-{i:05}")
}

/// Stores `grants` grants of `sim` (their refresh tokens alone, as an import would).
async fn import(manager: &TokenManager, sim: &Simulator, grants: usize) {
    for i in 0..grants {
        manager
            .source(&key(i))
            .unwrap()
            .import_refresh_token(sim.issue_grant())
            .await
            .unwrap();
    }
}

/// 1,000 grants, 10,000 concurrent callers spread over them, every token expired: one
/// refresh per grant, no reuse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_grants_ten_thousand_callers_refresh_once_each() {
    let sim = Simulator::builder(Mode::Lucid).start().await.unwrap();
    let manager = TokenManager::builder(sim.profile(), sim.credentials())
        .store(MemoryStore::new())
        .build()
        .unwrap();
    import(&manager, &sim, 1_000).await;
    let mut callers = tokio::task::JoinSet::new();
    for caller in 0..10_000 {
        let manager = manager.clone();
        callers.spawn(async move {
            let source = manager.source(&key(caller % 1_000)).unwrap();
            (caller % 1_000, source.access_token().await)
        });
    }
    let mut tokens = vec![None; 1_000];
    while let Some(done) = callers.join_next().await {
        let (grant, token) = done.unwrap();
        let token = token.expect("every caller is served");
        let first = tokens[grant].get_or_insert_with(|| token.clone());
        assert_eq!(
            *first, token,
            "every caller of one grant gets its one token"
        );
    }
    let counters = sim.counters();
    assert_eq!(counters.refreshes, 1_000, "exactly one refresh per grant");
    assert_eq!(counters.reuse_attempts, 0);
    assert_eq!(manager.status().engines_created, 1_000);
}

/// 10,000 grants through a manager that keeps 100 in memory: every token right, every
/// rotation kept (a second round needs no refresh: each grant's token comes back from the
/// store), nothing reused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_under_a_capacity_of_100_loses_nothing() {
    let sim = Simulator::builder(Mode::Generic).start().await.unwrap();
    let store = MemoryStore::new();
    let manager = TokenManager::builder(sim.profile(), sim.credentials())
        .store(store.clone())
        .capacity(100)
        .build()
        .unwrap();
    import(&manager, &sim, 10_000).await;
    for round in 0..2 {
        for i in 0..10_000 {
            let token = manager
                .source(&key(i))
                .unwrap()
                .access_token()
                .await
                .unwrap();
            let stored = store.get(&key(i)).unwrap().value;
            assert_eq!(
                stored.access_token.as_ref(),
                Some(&token),
                "round {round}, grant {i}: the token served is the one stored"
            );
        }
    }
    let counters = sim.counters();
    assert_eq!(
        counters.refreshes, 10_000,
        "one refresh per grant; the second round read them back"
    );
    assert_eq!(counters.reuse_attempts, 0);
    let status = manager.status();
    assert!(status.loaded <= 110, "memory stays bounded: {status:?}");
    assert!(
        status.engines_created > 10_000,
        "evicted grants were loaded again: {status:?}"
    );
}

/// The idle fleet: 1,000 grants consented on day 0 (180-day refresh tokens), never loaded
/// by any process; two replicas sweep once a simulated day for 200 days. Every grant
/// stays alive, each rotated once in the window (day 144), across both replicas.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweep_keeps_an_idle_fleet_alive_once_per_window_across_replicas() {
    let clock = ManualClock::starting_now();
    let sim = Simulator::builder(Mode::Lucid)
        .clock(clock.clone())
        .start()
        .await
        .unwrap();
    let store = Arc::new(MemoryStore::new());
    let replica = || {
        TokenManager::builder(sim.profile(), sim.credentials())
            .shared_store(Arc::clone(&store) as Arc<dyn TokenStore>)
            .clock(clock.clone())
            .capacity(100)
            .build()
            .unwrap()
    };
    let (a, b) = (replica(), replica());
    // Grants as consent leaves them: an access token and a known refresh expiry.
    let now = tokenkeeper::Clock::now(&clock);
    for i in 0..1_000 {
        let mut set = TokenSet::new(AccessToken::new(format!("day-0-{i}")), now);
        set.expires_at = Some(now + time::Duration::hours(1));
        set.refresh_token = Some(RefreshToken::new(sim.issue_grant()));
        set.refresh_expires_at = Some(now + time::Duration::days(180));
        let lease = store.lease(&key(i), Duration::from_secs(5)).await.unwrap();
        store.save(&key(i), &set, None, &lease).await.unwrap();
        lease.release().await.unwrap();
    }
    let options = SweepOptions::default();
    let mut kept = 0;
    for _day in 0..200 {
        clock.advance(time::Duration::days(1));
        let (one, other) = tokio::join!(a.sweep(&options), b.sweep(&options));
        kept += one.unwrap() + other.unwrap();
    }
    let counters = sim.counters();
    assert_eq!(
        counters.refreshes, 1_000,
        "one rotation per grant in 200 days"
    );
    assert_eq!(counters.reuse_attempts, 0);
    assert_eq!(counters.invalid_grant, 0, "no grant died");
    assert!(kept >= 1_000, "the sweeps kept them alive: {kept}");
    for i in 0..1_000 {
        let stored = store.get(&key(i)).unwrap().value;
        assert_eq!(
            stored.refresh_token.as_ref().map(|t| t.secret().to_owned()),
            sim.current_refresh_token(i),
            "grant {i}: the store holds its live refresh token"
        );
        assert!(stored.refresh_expires_at.unwrap() > tokenkeeper::Clock::now(&clock));
    }
}

/// Events tell what happened to which grant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_name_the_grant_and_what_happened() {
    let sim = Simulator::builder(Mode::Lucid).start().await.unwrap();
    let store = MemoryStore::new();
    let manager = TokenManager::builder(sim.profile(), sim.credentials())
        .store(store.clone())
        .build()
        .unwrap();
    let mut events = manager.subscribe();
    import(&manager, &sim, 1).await;
    manager
        .source(&key(0))
        .unwrap()
        .access_token()
        .await
        .unwrap();
    let mut seen = Vec::new();
    while let Ok(event) = events.try_recv() {
        assert_eq!(event.key, key(0));
        seen.push(event.kind);
    }
    assert_eq!(seen, [EventKind::Refreshed, EventKind::Rotated]);

    // Another manager (a replica) adopts what this one saved.
    let replica = TokenManager::builder(sim.profile(), sim.credentials())
        .store(store.clone())
        .build()
        .unwrap();
    let mut replica_events = replica.subscribe();
    replica
        .source(&key(0))
        .unwrap()
        .access_token()
        .await
        .unwrap();
    assert_eq!(replica_events.try_recv().unwrap().kind, EventKind::Adopted);

    // A dead grant: needs consent, once.
    sim.revoke_all();
    let source = manager.source(&key(1)).unwrap();
    source
        .import_refresh_token("not-a-live-refresh-token")
        .await
        .unwrap();
    let _ = source.access_token().await;
    let _ = source.access_token().await;
    let kinds: Vec<EventKind> = std::iter::from_fn(|| events.try_recv().ok())
        .filter(|e| e.key == key(1))
        .map(|e| e.kind)
        .collect();
    assert_eq!(kinds, [EventKind::NeedsConsent]);

    // A revoked grant needs consent too.
    manager.source(&key(0)).unwrap().forget().await.unwrap();
    let kinds: Vec<EventKind> = std::iter::from_fn(|| events.try_recv().ok())
        .filter(|e| e.key == key(0))
        .map(|e| e.kind)
        .collect();
    assert_eq!(kinds, [EventKind::NeedsConsent]);
}

/// One engine per key while anything holds it: a handle kept across its grant's
/// eviction shares its cache with the handles made after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handles_for_one_key_share_one_engine_even_after_eviction() {
    let sim = Simulator::builder(Mode::Generic).start().await.unwrap();
    let manager = TokenManager::builder(sim.profile(), sim.credentials())
        .idle_eviction(Duration::from_millis(50))
        .build()
        .unwrap();
    import(&manager, &sim, 1).await;
    let held = manager.source(&key(0)).unwrap();
    let token = held.access_token().await.unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(manager.status().loaded, 0, "the idle grant left the cache");
    let again = manager.source(&key(0)).unwrap();
    assert_eq!(
        manager.status().engines_created,
        1,
        "the held engine was found again"
    );
    assert_eq!(again.access_token().await.unwrap(), token);
    // The same engine: invalidating through one handle is seen through the other.
    again.invalidate(&token);
    assert_ne!(held.access_token().await.unwrap(), token);
    assert_eq!(sim.counters().reuse_attempts, 0);
}

/// Many held handles whose grants expire from the cache while other tasks ask for the
/// same keys: every key keeps one engine (the registry, not the cache, finds them).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_lookups_around_evictions_never_duplicate_an_engine() {
    let sim = Simulator::builder(Mode::Generic).start().await.unwrap();
    let manager = TokenManager::builder(sim.profile(), sim.credentials())
        .idle_eviction(Duration::from_millis(20))
        .capacity(1_000)
        .build()
        .unwrap();
    const KEYS: usize = 20_000;
    let held: Vec<_> = (0..KEYS)
        .map(|i| manager.source(&key(i)).unwrap())
        .collect();
    tokio::time::sleep(Duration::from_millis(60)).await;
    let mut lookups = tokio::task::JoinSet::new();
    for task in 0..4 {
        let manager = manager.clone();
        lookups.spawn(async move {
            for i in 0..KEYS {
                let _ = manager.source(&key((i + task * 5_000) % KEYS)).unwrap();
            }
        });
    }
    while let Some(done) = lookups.join_next().await {
        done.unwrap();
    }
    assert_eq!(
        manager.status().engines_created,
        KEYS as u64,
        "one engine per key while the handles live"
    );
    drop(held);
}

/// A grant the sweep failed to keep alive is left out of the next sweeps for a while: a
/// few stuck grants (earliest due, so first listed) never crowd out the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_grant_does_not_hold_up_the_next_sweeps() {
    let sim = Simulator::builder(Mode::Generic).start().await.unwrap();
    let store = MemoryStore::new();
    let manager = TokenManager::builder(sim.profile(), sim.credentials())
        .store(store.clone())
        .build()
        .unwrap();
    import(&manager, &sim, 3).await;
    let imported = |i: usize| store.get(&key(i)).unwrap().value.refresh_token;
    let before = [imported(0), imported(1)];
    let options = SweepOptions::default().batch(1);
    sim.fail_next([tokenkeeper::testing::Fault::ServerError(503)]);
    assert_eq!(
        manager.sweep(&options).await.unwrap(),
        0,
        "the first grant failed"
    );
    assert_eq!(
        manager.sweep(&options).await.unwrap(),
        1,
        "the next one is kept alive"
    );
    assert_eq!(imported(0), before[0], "the failing grant waits its turn");
    assert_ne!(imported(1), before[1], "the second grant was rotated");
    assert_eq!(manager.status().sweep_failures, 1);
}

/// The manager refuses what a source refuses: a lease that cannot outlast a request.
#[tokio::test]
async fn a_manager_checks_its_timeouts_like_a_source() {
    let sim = Simulator::builder(Mode::Generic).start().await.unwrap();
    let outcome = TokenManager::builder(sim.profile(), sim.credentials())
        .lease_ttl(Duration::from_millis(1))
        .build();
    assert!(
        matches!(outcome, Err(tokenkeeper::Error::Config(_))),
        "{outcome:?}"
    );
}
