//! Consent once, run forever: outages, idle months, the background refresher, status().

use std::sync::Arc;
use std::time::Duration;

use time::Duration as Span;
use tokenkeeper::testing::{Fault, Mode, Simulator};
use tokenkeeper::{Error, ManualClock, MemoryStore, RefreshingTokenSource, TokenSource};

fn source(
    sim: &Simulator,
    clock: &ManualClock,
    store: &MemoryStore,
    grant: String,
) -> RefreshingTokenSource {
    RefreshingTokenSource::builder(sim.profile(), sim.credentials())
        .store(store.clone())
        .key("forever")
        .initial_refresh_token(grant)
        .clock(clock.clone())
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_hour_maintenance_window_keeps_the_grant_and_spaces_attempts() {
    let clock = ManualClock::starting_now();
    let sim = Simulator::builder(Mode::Generic)
        .clock(clock.clone())
        .faults(0.0, vec![Fault::ServerError(503)], 7)
        .start()
        .await
        .unwrap();
    let store = MemoryStore::new();
    let source = source(&sim, &clock, &store, sim.issue_grant());
    let before = source.access_token().await.unwrap();
    let refresh_before = store.get("forever").unwrap().value.refresh_token.unwrap();

    // The provider goes down 50 minutes in, for two hours; the token expires at 60.
    clock.advance(Span::minutes(50));
    sim.set_fault_rate(1.0);
    let mut transient = 0;
    for minute in 0..120 {
        clock.advance(Span::minutes(1));
        match source.access_token().await {
            Ok(token) => {
                assert!(
                    minute < 10,
                    "only the old token can be served, at minute {minute}"
                );
                assert_eq!(token, before);
            }
            Err(Error::Transient { retry_after, .. }) => {
                assert!(retry_after.is_some(), "callers are told when to retry");
                transient += 1;
            }
            Err(other) => panic!("a maintenance window is transient, got {other:?}"),
        }
        tokio::task::yield_now().await;
    }
    assert!(transient >= 100, "{transient} transient errors");
    // Once the token has expired, waiting callers are worth an attempt a minute at most
    // (tests/recovery.rs checks the spacing request by request).
    let attempts = sim.counters().faults;
    assert!(
        (60..=120).contains(&attempts),
        "attempts continue about once a minute, never more: {attempts} in two hours"
    );
    assert_eq!(
        store.get("forever").unwrap().value.refresh_token.unwrap(),
        refresh_before,
        "the refresh token is kept through the outage"
    );

    // The provider is back: the first attempt the backoff allows succeeds.
    sim.set_fault_rate(0.0);
    let mut recovered_after = None;
    for minute in 1..=15 {
        clock.advance(Span::minutes(1));
        if let Ok(token) = source.access_token().await {
            assert_ne!(token, before);
            recovered_after = Some(minute);
            break;
        }
    }
    assert!(
        recovered_after.is_some(),
        "recovered once the provider was back"
    );
    let counters = sim.counters();
    assert_eq!(
        counters.faults, attempts,
        "no failed attempt after the window"
    );
    assert_eq!(
        (
            counters.reuse_attempts,
            counters.revoked_grants,
            counters.invalid_grant
        ),
        (0, 0, 0)
    );
}

async fn idle_for(mode: Mode, refresh_lifetime_days: i64, idle_days: i64) {
    let clock = ManualClock::starting_now();
    let sim = Simulator::builder(mode)
        .clock(clock.clone())
        .refresh_lifetime(Duration::from_secs(refresh_lifetime_days as u64 * 86_400))
        .start()
        .await
        .unwrap();
    let kept = MemoryStore::new();
    let kept_alive = source(&sim, &clock, &kept, sim.issue_grant());
    let neglected_store = MemoryStore::new();
    let neglected = source(&sim, &clock, &neglected_store, sim.issue_grant());
    kept_alive.access_token().await.unwrap();
    neglected.access_token().await.unwrap();

    // Nobody asks for a token; the keep-alive task looks once a day.
    for _ in 0..idle_days {
        clock.advance(Span::days(1));
        kept_alive.keep_alive().await.unwrap();
    }
    let rotations = sim.counters().refreshes - 2;
    assert!(
        rotations >= 1 && rotations <= (idle_days / (refresh_lifetime_days * 4 / 5) + 1) as u64,
        "{rotations} keep-alive rotations in {idle_days} days"
    );
    kept_alive
        .access_token()
        .await
        .expect("the kept-alive grant survives");
    let err = neglected.access_token().await.unwrap_err();
    assert!(
        err.needs_reauthorization(),
        "without keep-alive the grant dies: {err:?}"
    );
    assert_eq!(sim.counters().reuse_attempts, 0);
    assert_eq!(sim.counters().revoked_grants, 0);
    let status = kept_alive.status();
    assert!(
        status.reauthorization_in.unwrap()
            > Duration::from_secs(refresh_lifetime_days as u64 / 2 * 86_400)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_for_two_hundred_days_a_180_day_refresh_token_is_kept_alive() {
    idle_for(Mode::Lucid, 180, 200).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_for_sixty_days_a_15_day_refresh_token_is_kept_alive() {
    idle_for(Mode::Autodesk, 15, 60).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_background_refresher_refreshes_without_callers_and_stops_with_the_source() {
    let sim = Simulator::builder(Mode::Generic)
        .access_lifetime(Duration::from_secs(1))
        .start()
        .await
        .unwrap();
    let source = Arc::new(
        RefreshingTokenSource::builder(sim.profile(), sim.credentials())
            .initial_refresh_token(sim.issue_grant())
            .build()
            .unwrap(),
    );
    let task = source.spawn_refresher();
    for _ in 0..400 {
        if sim.counters().refreshes >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        sim.counters().refreshes >= 3,
        "the refresher keeps refreshing with no caller"
    );
    // A caller finds a valid token without waiting for a refresh.
    source.access_token().await.unwrap();

    drop(source);
    for _ in 0..400 {
        if task.is_finished() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        task.is_finished(),
        "the refresher stops when the source is dropped"
    );
    assert_eq!(sim.counters().reuse_attempts, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_expiries_refreshes_and_the_last_error() {
    let clock = ManualClock::starting_now();
    let sim = Simulator::builder(Mode::Lucid)
        .clock(clock.clone())
        .start()
        .await
        .unwrap();
    let store = MemoryStore::new();
    let source = source(&sim, &clock, &store, sim.issue_grant());
    source.access_token().await.unwrap();
    let status = source.status();
    assert_eq!(status.metrics.refreshes, 1);
    assert!(status.last_refresh.is_some() && status.last_error.is_none());
    assert!(status.access_token_expires_at.is_some());
    assert!(status.reauthorization_in.unwrap() > Duration::from_secs(179 * 86_400));

    sim.revoke_all();
    clock.advance(Span::hours(2));
    assert!(
        source
            .access_token()
            .await
            .unwrap_err()
            .needs_reauthorization()
    );
    let status = source.status();
    assert_eq!(status.reauthorization_in, Some(Duration::ZERO));
    assert!(status.last_error.unwrap().needs_reauthorization());
    assert_eq!(status.metrics.reauthorizations_required, 1);
}
