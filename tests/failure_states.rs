//! The failure states of a grant: cooling down, exhausted after `exhausted_after` of
//! continuous provider failures (attempts an hour apart), needing consent once its
//! refresh token's own lifetime has passed too; and a manager's sweep spacing an
//! exhausted grant as its engine does. Counted at the simulator.

use std::time::Duration;

use time::Duration as Span;
use tokenkeeper::testing::{Fault, Mode, Simulator};
use tokenkeeper::{
    Clock, Error, EventKind, Health, ManualClock, MemoryStore, ReauthorizationReason, RefreshToken,
    RefreshingTokenSource, SweepOptions, TokenManager, TokenSet,
};

async fn failing_simulator(clock: &ManualClock) -> Simulator {
    Simulator::builder(Mode::Generic)
        .clock(clock.clone())
        .access_lifetime(Duration::from_secs(3600))
        .refresh_lifetime(Duration::from_secs(30 * 86_400))
        .faults(0.0, vec![Fault::ServerError(503)], 11)
        .start()
        .await
        .unwrap()
}

/// Calls `access_token` every `step` for `span`; returns the provider requests made.
async fn call_for(
    source: &RefreshingTokenSource,
    sim: &Simulator,
    clock: &ManualClock,
    span: Span,
    step: Span,
) -> u64 {
    let before = sim.counters().requests;
    let mut elapsed = Span::ZERO;
    while elapsed < span {
        clock.advance(step);
        elapsed += step;
        let outcome = source.access_token().await;
        assert!(outcome.is_err(), "the provider fails every request");
        tokio::task::yield_now().await;
    }
    sim.counters().requests - before
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_the_provider_keeps_failing_is_exhausted_then_needs_consent() {
    let clock = ManualClock::starting_now();
    let sim = failing_simulator(&clock).await;
    let store = MemoryStore::new();
    // The refresh token's lifetime is known (here from the profile).
    let mut profile = sim.profile();
    profile.refresh_token_lifetime = Some(Duration::from_secs(30 * 86_400));
    let source = RefreshingTokenSource::builder(profile, sim.credentials())
        .store(store.clone())
        .initial_refresh_token(sim.issue_grant())
        .clock(clock.clone())
        .exhausted_after(Duration::from_secs(6 * 3600))
        .build()
        .unwrap();
    source.access_token().await.unwrap();
    assert_eq!(source.status().health, Health::Healthy);
    sim.set_fault_rate(1.0);
    clock.advance(Span::hours(1));

    // Cooling down: attempts up to a minute apart while callers wait with no token.
    let cooling = call_for(&source, &sim, &clock, Span::minutes(370), Span::minutes(1)).await;
    assert!(
        cooling >= 150,
        "{cooling} attempts in 6 hours of cooling down"
    );
    match source.status().health {
        Health::Exhausted { failing_since, .. } => {
            assert!(clock.now() - failing_since >= Span::hours(6));
        }
        other => panic!("6 hours of failures exhaust the grant, found {other:?}"),
    }

    // Exhausted: an attempt an hour, whatever the callers do; they are told to wait.
    let exhausted = call_for(&source, &sim, &clock, Span::hours(24), Span::minutes(1)).await;
    assert!(
        (20..=25).contains(&exhausted),
        "{exhausted} attempts in 24 exhausted hours (one an hour)"
    );
    match source.access_token().await {
        Err(Error::Transient { retry_after, .. }) => {
            let wait = retry_after.expect("callers are told when to retry");
            assert!(wait <= Duration::from_secs(3600), "{wait:?}");
        }
        other => panic!("an exhausted grant is still transient: {other:?}"),
    }
    let stored = store.get("default").unwrap().value;
    assert!(stored.refresh_token.is_some() && stored.rejected_at.is_none());

    // Past the refresh token's own lifetime (by `exhausted_after` too: a margin for an
    // estimated lifetime): consent is needed, and nothing more is sent.
    clock.advance(Span::days(30));
    let mut reauthorization = None;
    for _ in 0..8 {
        clock.advance(Span::hours(1));
        if let Err(e @ Error::ReauthorizationRequired { .. }) = source.access_token().await {
            reauthorization = Some(e);
            break;
        }
    }
    match reauthorization {
        Some(Error::ReauthorizationRequired { reason, .. }) => {
            assert_eq!(reason, ReauthorizationReason::RefreshTokenExpired)
        }
        other => panic!("an expired exhausted grant needs consent, got {other:?}"),
    }
    assert_eq!(source.status().health, Health::NeedsConsent);
    let after = sim.counters().requests;
    for _ in 0..48 {
        clock.advance(Span::hours(1));
        assert!(
            source
                .access_token()
                .await
                .unwrap_err()
                .needs_reauthorization()
        );
    }
    assert_eq!(
        sim.counters().requests,
        after,
        "a grant that needs consent costs no request"
    );
    assert_eq!(sim.counters().reuse_attempts, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exhausted_grant_recovers_at_its_next_attempt() {
    let clock = ManualClock::starting_now();
    let sim = failing_simulator(&clock).await;
    let source = RefreshingTokenSource::builder(sim.profile(), sim.credentials())
        .initial_refresh_token(sim.issue_grant())
        .clock(clock.clone())
        .exhausted_after(Duration::from_secs(3600))
        .build()
        .unwrap();
    source.access_token().await.unwrap();
    sim.set_fault_rate(1.0);
    clock.advance(Span::hours(1));
    call_for(&source, &sim, &clock, Span::hours(2), Span::minutes(1)).await;
    assert!(matches!(source.status().health, Health::Exhausted { .. }));

    sim.set_fault_rate(0.0);
    clock.advance(Span::hours(1));
    source.access_token().await.unwrap();
    assert_eq!(source.status().health, Health::Healthy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweeps_space_an_exhausted_grant_an_hour_apart_and_count_its_event() {
    let clock = ManualClock::starting_now();
    let sim = failing_simulator(&clock).await;
    let store = MemoryStore::new();
    // Imported alone: due for keep-alive at once.
    let seed = TokenSet::from_refresh_token(RefreshToken::new(sim.issue_grant()), clock.now());
    store.put("user-1", seed);
    let manager = TokenManager::builder(sim.profile(), sim.credentials())
        .store(store.clone())
        .clock(clock.clone())
        .exhausted_after(Duration::from_secs(3600))
        .build()
        .unwrap();
    let mut events = manager.subscribe();
    sim.set_fault_rate(1.0);
    let options = SweepOptions::default();
    let mut requests_per_hour = Vec::new();
    for _hour in 0..6 {
        let before = sim.counters().requests;
        for _ in 0..60 {
            clock.advance(Span::minutes(1));
            manager.sweep(&options).await.unwrap();
        }
        requests_per_hour.push(sim.counters().requests - before);
    }
    // Cooling down, the sweep's own spacing (30 s doubling) allows a few attempts an
    // hour; exhausted, at most one (the sweep's spacing keeps doubling past it).
    assert!(requests_per_hour[0] >= 3, "{requests_per_hour:?}");
    assert!(
        requests_per_hour[2..].iter().all(|&n| n <= 1),
        "requests per hour: {requests_per_hour:?}"
    );
    assert!(
        requests_per_hour[2..].iter().sum::<u64>() >= 1,
        "the exhausted grant is still tried: {requests_per_hour:?}"
    );
    let mut exhausted_events = 0;
    while let Ok(event) = events.try_recv() {
        assert_eq!(event.key, "user-1");
        exhausted_events += usize::from(event.kind == EventKind::Exhausted);
    }
    assert_eq!(exhausted_events, 1);
    assert_eq!(manager.status().events.exhausted, 1);
}

/// A suspended machine (the wall clock moves, the monotonic one does not) or a grant asked
/// for once a day: two failures are no exhaustion.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_failures_a_wall_clock_day_apart_do_not_exhaust_a_grant() {
    let clock = ManualClock::starting_now();
    let sim = failing_simulator(&clock).await;
    let source = RefreshingTokenSource::builder(sim.profile(), sim.credentials())
        .initial_refresh_token(sim.issue_grant())
        .clock(clock.clone())
        .exhausted_after(Duration::from_secs(3600))
        .build()
        .unwrap();
    source.access_token().await.unwrap();
    sim.set_fault_rate(1.0);
    clock.advance(Span::hours(2));
    assert!(source.access_token().await.is_err());
    // Suspended for two days: the wall clock moves, the monotonic reading does not.
    clock.set(clock.now() + Span::days(2));
    clock.advance(Span::minutes(2));
    assert!(source.access_token().await.is_err());
    assert!(
        matches!(source.status().health, Health::CoolingDown { .. }),
        "{:?}",
        source.status().health
    );
    sim.set_fault_rate(0.0);
    clock.advance(Span::minutes(2));
    source
        .access_token()
        .await
        .expect("the provider is back and the grant was only cooling down");
}

/// A grant that needs consent, consented again through another process: the new grant
/// starts with none of the old one's failures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_consented_again_elsewhere_does_not_inherit_the_old_failures() {
    let clock = ManualClock::starting_now();
    let sim = failing_simulator(&clock).await;
    let mut profile = sim.profile();
    profile.refresh_token_lifetime = Some(Duration::from_secs(4 * 3600));
    let store = MemoryStore::new();
    let source = RefreshingTokenSource::builder(profile.clone(), sim.credentials())
        .store(store.clone())
        .initial_refresh_token(sim.issue_grant())
        .clock(clock.clone())
        .exhausted_after(Duration::from_secs(3600))
        .build()
        .unwrap();
    source.access_token().await.unwrap();
    sim.set_fault_rate(1.0);
    for _ in 0..(6 * 60) {
        clock.advance(Span::minutes(1));
        let _ = source.access_token().await;
    }
    assert_eq!(source.status().health, Health::NeedsConsent);

    // Another process stores a new grant (a person consented again).
    sim.set_fault_rate(0.0);
    let other = RefreshingTokenSource::builder(profile, sim.credentials())
        .store(store.clone())
        .clock(clock.clone())
        .build()
        .unwrap();
    other.import_refresh_token(sim.issue_grant()).await.unwrap();
    // The source finds it (within 10 s) and refreshes it: one 503.
    sim.fail_next([Fault::ServerError(503)]);
    clock.advance(Span::seconds(11));
    assert!(source.access_token().await.is_err());
    clock.advance(Span::minutes(2));
    source
        .access_token()
        .await
        .expect("one failure of the new grant is a short backoff, not the old exhaustion");
}

/// An idle grant kept alive only by sweeps, with a short refresh lifetime (10 h: keep-alive
/// due 2 h before expiry), through a 95-minute outage starting at the keep-alive instant:
/// the sweep's spacing never outgrows the window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweeps_keep_a_grant_alive_through_an_outage_shorter_than_its_window() {
    let clock = ManualClock::starting_now();
    let sim = Simulator::builder(Mode::Generic)
        .clock(clock.clone())
        .access_lifetime(Duration::from_secs(3600))
        .refresh_lifetime(Duration::from_secs(10 * 3600))
        .faults(0.0, vec![Fault::ServerError(503)], 7)
        .start()
        .await
        .unwrap();
    let mut profile = sim.profile();
    profile.refresh_token_lifetime = Some(Duration::from_secs(10 * 3600));
    let store = MemoryStore::new();
    store.put(
        "user-1",
        TokenSet::from_refresh_token(RefreshToken::new(sim.issue_grant()), clock.now()),
    );
    let manager = TokenManager::builder(profile, sim.credentials())
        .store(store.clone())
        .clock(clock.clone())
        .build()
        .unwrap();
    let options = SweepOptions::default();
    assert_eq!(manager.sweep(&options).await.unwrap(), 1);
    let keep_alive_at = store.get("user-1").unwrap().value.keep_alive_at().unwrap();
    clock.set(keep_alive_at);
    sim.set_fault_rate(1.0);
    let mut kept_at = None;
    for minute in 0..130 {
        if minute == 95 {
            sim.set_fault_rate(0.0);
        }
        if manager.sweep(&options).await.unwrap() > 0 {
            kept_at = Some(minute);
            break;
        }
        clock.advance(Span::minutes(1));
    }
    assert!(
        kept_at.is_some_and(|m| (95..120).contains(&m)),
        "kept alive at minute {kept_at:?}; the refresh token expires at minute 120"
    );
    assert_eq!(sim.counters().invalid_grant, 0);
}
