//! Scenarios every networked store runs against a real server (included by
//! tests/redis_store.rs and tests/postgres_store.rs next to `servers`).
#![allow(dead_code)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokenkeeper::store::conformance::{sample, unique_key};
use tokenkeeper::store::{StoreError, TokenStore};
use tokenkeeper::testing::{Mode, Simulator};
use tokenkeeper::{Error, RefreshingTokenSource};

use super::proxy::{FaultProxy, NextFault};
use super::servers::Restartable;

/// A holder whose lease expired while it waited on a slow token endpoint tries to save
/// what it got: fencing refuses the write, and the newer holder's token stays.
pub async fn paused_holder_is_fenced_off(store: &dyn TokenStore) {
    let key = unique_key("paused");
    let setup = store.lease(&key, Duration::from_secs(10)).await.unwrap();
    let v1 = store.save(&key, &sample("v1"), None, &setup).await.unwrap();
    let newest = sample("newer");
    setup.release().await.unwrap();

    // The paused holder: takes the lease, reads v1, then "waits on the endpoint" past its
    // lease's expiry.
    let paused = store.lease(&key, Duration::from_millis(300)).await.unwrap();
    let read = store.load(&key).await.unwrap().unwrap();
    assert_eq!(read.version, v1);
    tokio::time::sleep(Duration::from_millis(600)).await;

    // Meanwhile another replica takes over the expired lease and refreshes.
    let newer = store.lease(&key, Duration::from_secs(10)).await.unwrap();
    assert!(newer.fencing() > paused.fencing(), "fencing numbers grow");
    let current = store.load(&key).await.unwrap().unwrap();
    let v2 = store
        .save(&key, &newest, Some(current.version), &newer)
        .await
        .unwrap();

    // The paused holder wakes up and saves at the version it read: refused by fencing.
    let late = store
        .save(&key, &sample("paused"), Some(read.version), &paused)
        .await;
    assert!(
        matches!(late, Err(StoreError::LeaseLost)),
        "the paused holder is fenced off, got {late:?}"
    );
    // Even at the newest version (a CAS alone would let this through): refused.
    let late = store.save(&key, &sample("paused"), Some(v2), &paused).await;
    assert!(
        matches!(late, Err(StoreError::LeaseLost)),
        "fencing, not the version, refuses the paused holder, got {late:?}"
    );
    newer.release().await.unwrap();
    let _ = paused.release().await;
    let stored = store.load(&key).await.unwrap().unwrap();
    assert_eq!(
        (stored.value, stored.version),
        (newest, v2),
        "the newer token stays"
    );
}

/// The same through two `RefreshingTokenSource`s with a short lease: a source whose lease
/// is about to expire does not start a refresh at all; the other takes over after the ttl.
pub async fn a_source_takes_over_an_abandoned_lease(store: Arc<dyn TokenStore>) {
    let sim = Simulator::builder(Mode::Lucid).start().await.unwrap();
    let key = unique_key("abandoned");
    let mut profile = sim.profile();
    profile.request_timeout = Duration::from_secs(2);
    // A lease another replica took and never released (it hung, or died).
    let abandoned = store.lease(&key, Duration::from_secs(2)).await.unwrap();
    let source = RefreshingTokenSource::builder(profile, sim.credentials())
        .shared_store(Arc::clone(&store))
        .key(key.clone())
        .initial_refresh_token(sim.issue_grant())
        .lease_ttl(Duration::from_secs(3))
        .build()
        .unwrap();
    // The source waits for the abandoned lease to expire, then refreshes.
    let token = source
        .access_token()
        .await
        .expect("the lease is taken over");
    assert!(!token.secret().is_empty());
    let late = store
        .save(&key, &sample("abandoned"), None, &abandoned)
        .await;
    assert!(
        matches!(late, Err(StoreError::LeaseLost)),
        "the abandoned holder can no longer write, got {late:?}"
    );
    let counters = sim.counters();
    assert_eq!((counters.refreshes, counters.reuse_attempts), (1, 0));
    let stored = store.load(&key).await.unwrap().unwrap();
    assert_eq!(
        stored
            .value
            .refresh_token
            .as_ref()
            .map(|t| t.secret().to_owned()),
        sim.current_refresh_token(0),
        "the store holds the newest refresh token"
    );
}

/// The store goes down: a cached valid token keeps being served, then (once it expired)
/// callers get a typed `Error::Storage`; after the server restarts on the same port, the
/// next refresh succeeds with the stored refresh token (nothing lost, no reuse).
pub async fn outage_then_recovery(store: Arc<dyn TokenStore>, server: &mut dyn Restartable) {
    let sim = Simulator::builder(Mode::Lucid)
        .access_lifetime(Duration::from_secs(2))
        .start()
        .await
        .unwrap();
    let key = unique_key("outage");
    let mut profile = sim.profile();
    profile.request_timeout = Duration::from_secs(2);
    let source = RefreshingTokenSource::builder(profile, sim.credentials())
        .shared_store(Arc::clone(&store))
        .key(key.clone())
        .initial_refresh_token(sim.issue_grant())
        .lease_ttl(Duration::from_secs(4))
        .leeway(Duration::from_millis(200))
        .build()
        .unwrap();
    let first = source.access_token().await.expect("first refresh");
    let before = store.load(&key).await.unwrap().unwrap();

    server.stop_server();
    let during = source
        .access_token()
        .await
        .expect("a valid cached token is served");
    assert_eq!(during, first, "the cached token, untouched by the outage");
    let load = store.load(&key).await;
    assert!(
        matches!(load, Err(StoreError::Unavailable(_))),
        "load during the outage is Unavailable, got {load:?}"
    );
    let lease = store.lease(&key, Duration::from_secs(1)).await;
    assert!(
        matches!(lease, Err(StoreError::Unavailable(_))),
        "lease during the outage is Unavailable, got {lease:?}"
    );

    // Once the token expired, callers see the store's failure, typed.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut saw_storage = false;
    while tokio::time::Instant::now() < deadline {
        match source.access_token().await {
            Ok(token) => assert_eq!(token, first, "only the cached token can be served"),
            Err(Error::Storage(StoreError::Unavailable(_))) => {
                saw_storage = true;
                break;
            }
            Err(e) => assert!(
                e.is_transient(),
                "during a store outage errors are Storage or Transient (backoff), got {e:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        saw_storage,
        "an expired token and a down store give Error::Storage"
    );
    assert_eq!(sim.counters().refreshes, 1, "no refresh without the store");

    server.restart_server();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    let recovered = loop {
        match source.access_token().await {
            Ok(token) if token != first => break token,
            Ok(_) => {}
            Err(e) => assert!(e.is_transient(), "recovering: {e:?}"),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the source recovers after the store restarts"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(!recovered.secret().is_empty());
    let counters = sim.counters();
    assert_eq!(counters.refreshes, 2, "one refresh after recovery");
    assert_eq!(counters.reuse_attempts, 0);
    let after = store.load(&key).await.unwrap().unwrap();
    assert!(after.version > before.version, "the refresh was saved");
    assert_eq!(
        after
            .value
            .refresh_token
            .as_ref()
            .map(|t| t.secret().to_owned()),
        sim.current_refresh_token(0),
        "the store holds the newest refresh token"
    );
}

/// The store dies while a refresh's response is on its way (the provider already rotated
/// the refresh token): the caller still gets the new token, and once the store is back
/// the rotated token set is saved. Nothing is lost, nothing is half-written.
pub async fn store_dies_during_a_refresh(store: Arc<dyn TokenStore>, server: &mut dyn Restartable) {
    let sim = Simulator::builder(Mode::Lucid)
        .response_delay(Duration::from_millis(1500))
        .start()
        .await
        .unwrap();
    let key = unique_key("dies-during-refresh");
    let mut profile = sim.profile();
    profile.request_timeout = Duration::from_secs(3);
    let source = RefreshingTokenSource::builder(profile, sim.credentials())
        .shared_store(Arc::clone(&store))
        .key(key.clone())
        .initial_refresh_token(sim.issue_grant())
        .lease_ttl(Duration::from_secs(4))
        .build()
        .unwrap();
    let caller = tokio::spawn({
        let source = source.clone();
        async move { source.access_token().await }
    });
    // Wait until the simulator rotated: the new tokens now exist only in the response.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while sim.counters().refreshes == 0 {
        assert!(tokio::time::Instant::now() < deadline, "the refresh starts");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.stop_server();
    let token = caller
        .await
        .unwrap()
        .expect("the refreshed token is served");
    assert!(!token.secret().is_empty());

    server.restart_server();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    loop {
        if let Ok(Some(stored)) = store.load(&key).await {
            assert!(
                stored.value.refresh_token.is_some(),
                "whatever is stored is a complete token set"
            );
            if stored
                .value
                .refresh_token
                .as_ref()
                .map(|t| t.secret().to_owned())
                == sim.current_refresh_token(0)
            {
                assert_eq!(stored.value.access_token.as_ref(), Some(&token));
                break;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the rotated token set is saved once the store is back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(sim.counters().reuse_attempts, 0);
}

/// A lease granted whose answer was lost (the proxy cuts the connection after the request
/// reached the server): the taker asks again as the same owner and gets it at once,
/// instead of waiting for it to expire. `store` connects through `proxy`.
pub async fn a_lease_grant_whose_answer_was_lost_is_not_lost(
    store: &dyn TokenStore,
    proxy: &FaultProxy,
) {
    // Warm up: scripts loaded, statements prepared.
    let warm = store
        .lease(&unique_key("warm"), Duration::from_secs(5))
        .await
        .unwrap();
    warm.release().await.unwrap();

    let key = unique_key("lost-grant");
    proxy.fault_next(NextFault::CutAfter);
    let started = Instant::now();
    let lease = store
        .lease(&key, Duration::from_secs(20))
        .await
        .expect("the grant is recovered");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(proxy.counters().cut_after, 1, "the answer was lost once");
    let other = store.lease(&key, Duration::from_millis(200)).await;
    assert!(
        matches!(other, Err(StoreError::LeaseTimeout { .. })),
        "{other:?}"
    );
    store.save(&key, &sample("x"), None, &lease).await.unwrap();
    lease.release().await.unwrap();
}
