//! `fresh_access_token` and `flush`, for short-lived processes (a command, a cron job)
//! that exit right after getting a token.

use std::time::Duration;

use tokenkeeper::testing::{FaultyStore, Mode, Simulator};
use tokenkeeper::{ManualClock, MemoryStore, RefreshingTokenSource, TokenSet, TokenStore};

/// A source that adopted another holder's fresh set while waiting for the lease gives
/// the lease back when it comes: `flush` waits for that, so an exiting process leaves no
/// lease behind for the next one to wait out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_waits_until_a_lease_granted_after_adopting_is_given_back() {
    let sim = Simulator::builder(Mode::Lucid).start().await.unwrap();
    let store = MemoryStore::new();
    let source = RefreshingTokenSource::builder(sim.profile(), sim.credentials())
        .store(store.clone())
        .key("k")
        .lease_ttl(Duration::from_secs(60))
        .build()
        .unwrap();

    // Another holder has the lease, and saves a fresh set while holding it.
    let other = store.lease("k", Duration::from_secs(60)).await.unwrap();
    let waiting = tokio::spawn({
        let source = source.clone();
        async move { source.access_token().await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut fresh = TokenSet::new(
        tokenkeeper::AccessToken::new("fresh-from-another-holder"),
        time::OffsetDateTime::now_utc(),
    );
    fresh.expires_at = Some(time::OffsetDateTime::now_utc() + time::Duration::hours(1));
    store.save("k", &fresh, None, &other).await.unwrap();
    let token = waiting.await.unwrap().unwrap();
    assert_eq!(token.secret(), "fresh-from-another-holder", "adopted");

    // The source's lease request is still queued behind the other holder.
    let early = tokio::time::timeout(Duration::from_millis(300), source.flush()).await;
    assert!(early.is_err(), "flush waits for the lease to be given back");
    other.release().await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), source.flush())
        .await
        .expect("flush returns once the lease is given back");
    let next = tokio::time::timeout(
        Duration::from_millis(100),
        store.lease("k", Duration::from_secs(1)),
    )
    .await;
    assert!(matches!(next, Ok(Ok(_))), "the lease is free: {next:?}");
    assert_eq!(sim.counters().requests, 0);
}

/// `fresh_access_token` waits for the refresh of a stale token instead of serving it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_access_token_refreshes_a_stale_token_before_answering() {
    let clock = ManualClock::new(time::OffsetDateTime::now_utc());
    let sim = Simulator::builder(Mode::Generic)
        .clock(clock.clone())
        .start()
        .await
        .unwrap();
    let store = MemoryStore::new();
    let grant = sim.issue_grant();
    // The serving source does not watch the store: it would follow the demanding
    // source's refresh at once (tests/follow.rs), and this test is about `access_token`
    // itself serving a stale token.
    let build = |watch: bool| {
        let builder = RefreshingTokenSource::builder(sim.profile(), sim.credentials());
        let builder = if watch {
            builder.store(store.clone())
        } else {
            builder.store(FaultyStore::new(store.clone()).without_watch())
        };
        builder
            .key("k")
            .initial_refresh_token(grant.clone())
            .leeway(Duration::from_secs(600))
            .clock(clock.clone())
            .build()
            .unwrap()
    };
    let (serving, demanding) = (build(false), build(true));
    let first = serving.access_token().await.unwrap();
    demanding.access_token().await.unwrap();
    // 55 minutes later the hour-long token is within the 10-minute leeway: stale.
    clock.advance(time::Duration::minutes(55));
    let fresh = demanding.fresh_access_token().await.unwrap();
    assert_ne!(
        fresh.secret(),
        first.secret(),
        "fresh_access_token waited for a new token"
    );
    assert_eq!(sim.counters().refreshes, 2, "one refresh for it");
    demanding.flush().await;
    // What `access_token` does instead: serve the stale token at once.
    let stale = serving.access_token().await.unwrap();
    assert_eq!(
        stale.secret(),
        first.secret(),
        "access_token serves the stale one"
    );
    assert_eq!(sim.counters().reuse_attempts, 0);
}
