//! Doomed tokens: where a refresh kills the previous access token (the simulator's Lucid
//! mode), a source that reads another holder's write-ahead record (through the store's
//! watch) stops serving the token that holder is about to kill. Callers wait for the
//! successor; if the rotation ends without one (its record taken back), or takes longer
//! than the doom's bound, they get the old token, which may well be alive. A profile
//! whose refresh kills nothing serves the token throughout.
//!
//! The "other holder" is this test writing to the store directly, as another process
//! would.

use std::time::{Duration, Instant};

use time::OffsetDateTime;
use tokenkeeper::testing::{Mode, Simulator};
use tokenkeeper::{
    AccessToken, MemoryStore, RefreshToken, RefreshingTokenSource, RotationInFlight, TokenSet,
    TokenStore,
};

const KEY: &str = "doomed";

struct Setup {
    _sim: Simulator,
    store: MemoryStore,
    source: RefreshingTokenSource,
    token: AccessToken,
}

/// A source holding a token obtained from the simulator (refresh kills the previous
/// access token in Lucid mode; `kills` false gives the profile the generic default).
async fn setup(kills: bool) -> Setup {
    let sim = Simulator::builder(Mode::Lucid)
        .access_lifetime(Duration::from_secs(3600))
        .start()
        .await
        .unwrap();
    let store = MemoryStore::new();
    let profile = sim.profile().with_refresh_invalidates_access_token(kills);
    let source = RefreshingTokenSource::builder(profile, sim.credentials())
        .store(store.clone())
        .key(KEY)
        .build()
        .unwrap();
    source
        .import_refresh_token(sim.issue_grant())
        .await
        .unwrap();
    let token = source.access_token().await.unwrap();
    Setup {
        _sim: sim,
        store,
        source,
        token,
    }
}

/// Writes `edit` of the stored set, as another holder would under its lease.
async fn other_holder_saves(store: &MemoryStore, edit: impl FnOnce(&mut TokenSet)) {
    let lease = store.lease(KEY, Duration::from_secs(10)).await.unwrap();
    let stored = store.load(KEY).await.unwrap().unwrap();
    let mut set = stored.value;
    edit(&mut set);
    store
        .save(KEY, &set, Some(stored.version), &lease)
        .await
        .unwrap();
    lease.release().await.unwrap();
}

/// Another holder's write-ahead record: it is presenting the refresh token now.
async fn record_written(store: &MemoryStore) {
    other_holder_saves(store, |set| {
        set.rotation = Some(RotationInFlight::new(
            "another-process",
            OffsetDateTime::now_utc(),
        ));
    })
    .await;
}

/// A caller started now: its token and how long it waited.
fn caller(source: &RefreshingTokenSource) -> tokio::task::JoinHandle<(AccessToken, Duration)> {
    let source = source.clone();
    tokio::spawn(async move {
        let started = Instant::now();
        let token = source.access_token().await.unwrap();
        (token, started.elapsed())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_wait_for_the_successor_of_a_token_another_holder_is_killing() {
    let Setup {
        store,
        source,
        token: old,
        ..
    } = setup(true).await;
    record_written(&store).await;
    // The watch reports the record; the follow reads it and dooms the token.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let waiting = caller(&source);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !waiting.is_finished(),
        "a caller does not get the token another holder is killing"
    );
    let new = AccessToken::new("the-successor");
    other_holder_saves(&store, |set| {
        set.rotation = None;
        set.access_token = Some(new.clone());
        set.refresh_token = Some(RefreshToken::new("the-successor-refresh"));
        set.obtained_at = OffsetDateTime::now_utc();
        set.expires_at = Some(OffsetDateTime::now_utc() + time::Duration::hours(1));
    })
    .await;
    let (served, waited) = waiting.await.unwrap();
    assert_eq!(served, new, "the caller gets the successor");
    assert_ne!(served, old);
    assert!(waited < Duration::from_secs(2), "{waited:?}");
    assert_eq!(source.access_token().await.unwrap(), new);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_taken_back_lifts_the_doom_at_once() {
    let Setup {
        store,
        source,
        token: old,
        ..
    } = setup(true).await;
    record_written(&store).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let waiting = caller(&source);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiting.is_finished(), "doomed while the record stands");
    // The other holder's refresh failed: it takes its record back, the token lives on.
    other_holder_saves(&store, |set| set.rotation = None).await;
    let (served, waited) = waiting.await.unwrap();
    assert_eq!(served, old);
    assert!(
        waited < Duration::from_secs(1),
        "served once the record is gone, not after the doom's bound: {waited:?}"
    );
    let started = Instant::now();
    assert_eq!(source.access_token().await.unwrap(), old);
    assert!(started.elapsed() < Duration::from_millis(50));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_that_never_ends_stalls_callers_for_the_dooms_bound_only() {
    let Setup {
        store,
        source,
        token: old,
        ..
    } = setup(true).await;
    record_written(&store).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (served, waited) = caller(&source).await.unwrap();
    assert_eq!(served, old, "the only token there is");
    assert!(
        waited >= Duration::from_millis(2500) && waited < Duration::from_millis(4500),
        "about three seconds: {waited:?}"
    );
    // The flight still waits for that rotation (up to 5 s), reading the record again
    // every 200 ms: it does not doom the token a second time.
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let started = Instant::now();
        assert_eq!(source.access_token().await.unwrap(), old);
        assert!(
            started.elapsed() < Duration::from_millis(50),
            "once waited for, it is served at once: {:?}",
            started.elapsed()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_profile_whose_refresh_kills_nothing_serves_the_token_throughout() {
    let Setup {
        store,
        source,
        token: old,
        ..
    } = setup(false).await;
    record_written(&store).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (served, waited) = caller(&source).await.unwrap();
    assert_eq!(served, old);
    assert!(waited < Duration::from_millis(50), "{waited:?}");
}
