//! Recovery without hammering: adopting during a backoff, reactive refreshes within
//! limits, dead grants remembered, the return after a long outage, and inputs that could
//! overflow the arithmetic. Time is a `ManualClock`; nothing sleeps through a lifetime.

use std::time::Duration;

use serde_json::json;
use tokenkeeper::testing::{Fault, FaultyStore, Mode, Simulator, StoreOp};
use tokenkeeper::{
    Builder, ClientCredentials, Clock, Error, ManualClock, MemoryStore, ProviderProfile,
    RefreshingTokenSource, TransientKind,
};
use url::Url;
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

struct Fixture {
    sim: Simulator,
    clock: ManualClock,
    store: FaultyStore<MemoryStore>,
}

impl Fixture {
    async fn new() -> Self {
        let clock = ManualClock::starting_now();
        let sim = Simulator::builder(Mode::Lucid)
            .clock(clock.clone())
            .start()
            .await
            .unwrap();
        Self {
            sim,
            clock,
            store: FaultyStore::new(MemoryStore::new()),
        }
    }

    fn replica(
        &self,
        grant: Option<&str>,
        tune: impl FnOnce(Builder) -> Builder,
    ) -> RefreshingTokenSource {
        let mut builder =
            RefreshingTokenSource::builder(self.sim.profile(), self.sim.credentials())
                .store(self.store.clone())
                .key("user-1")
                .clock(self.clock.clone());
        if let Some(grant) = grant {
            builder = builder.initial_refresh_token(grant);
        }
        tune(builder).build().unwrap()
    }

    fn advance(&self, by: Duration) {
        self.clock.advance(time::Duration::try_from(by).unwrap());
    }
}

// Scenario 7: the backoff.

/// A's refresh was rate limited for two minutes; B (another replica, same store, whose
/// own requests go through) refreshes and saves. A's callers, whose token expired, get B's token within a second (A reads the
/// store once a second while backing off), without A sending anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_a_provider_backoff_a_set_another_replica_saved_is_adopted() {
    let fx = Fixture::new().await;
    let grant = fx.sim.issue_grant();
    let a = fx.replica(Some(&grant), |b| b);
    let b = fx.replica(None, |b| b);
    fx.sim.fail_next([Fault::RateLimited(120)]);
    let err = a.access_token().await.unwrap_err();
    let backoff = err.retry_after().expect("a backoff");
    assert!(backoff >= Duration::from_secs(120), "{backoff:?}");

    let b_token = b.access_token().await.expect("B refreshes");
    assert_eq!(fx.sim.counters().requests, 2);

    fx.advance(Duration::from_secs(1));
    let a_token = a
        .access_token()
        .await
        .expect("A adopts B's set while backing off");
    assert_eq!(a_token, b_token);
    assert_eq!(fx.sim.counters().requests, 2, "A sent nothing");
}

/// A step of the wall clock (NTP, a resumed laptop) neither stretches nor shortens the
/// backoff: it runs on the clock's monotonic reading.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wall_clock_step_does_not_stretch_the_backoff() {
    let fx = Fixture::new().await;
    let a = fx.replica(Some(&fx.sim.issue_grant()), |b| b);
    fx.sim.fail_next([Fault::ServerError(503)]);
    let backoff = a.access_token().await.unwrap_err().retry_after().unwrap();

    // The wall clock steps back an hour; only the backoff's time passes monotonically.
    fx.clock.set(fx.clock.now() - time::Duration::hours(1));
    fx.advance(backoff + Duration::from_millis(10));
    a.access_token().await.expect("the backoff is over");
    assert_eq!(fx.sim.counters().requests, 2);
}

/// A wall clock corrected forward past a token's expiry (or a machine that slept: its
/// monotonic clock stood still) is noticed within seconds of monotonic time: the hot
/// path reads the wall clock at least every 10 s, and never serves the expired token
/// past that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wall_clock_step_forward_is_noticed_within_seconds() {
    let fx = Fixture::new().await;
    let a = fx.replica(Some(&fx.sim.issue_grant()), |b| b);
    let first = a.access_token().await.unwrap();
    fx.clock.set(fx.clock.now() + time::Duration::hours(3));
    fx.advance(Duration::from_secs(11));
    let next = a.access_token().await.unwrap();
    assert_ne!(next, first, "the expired token is not served");
    assert_eq!(fx.sim.counters().refreshes, 2);
}

// Scenario 8: reactive refreshes, tokens expired on receipt, dead grants.

/// Every 401 (or HighQ 403, which may be a plain permission denial) invalidates the
/// token; only the first forces a refresh within the interval, and the rejected token,
/// still the newest in the store, is served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_refreshes_are_limited_to_one_per_interval() {
    let fx = Fixture::new().await;
    let a = fx.replica(Some(&fx.sim.issue_grant()), |b| {
        b.forced_refresh_interval(Duration::from_secs(30))
    });
    let first = a.access_token().await.unwrap();
    a.invalidate(&first);
    let second = a.access_token().await.unwrap();
    assert_ne!(first, second, "the first rejection forces a refresh");
    assert_eq!(fx.sim.counters().refreshes, 2);

    for _ in 0..20 {
        let token = a.access_token().await.unwrap();
        a.invalidate(&token);
    }
    assert_eq!(
        fx.sim.counters().refreshes,
        2,
        "no more within the interval"
    );
    assert_eq!(a.access_token().await.unwrap(), second, "served again");

    fx.advance(Duration::from_secs(31));
    a.invalidate(&second);
    assert_ne!(a.access_token().await.unwrap(), second);
    assert_eq!(
        fx.sim.counters().refreshes,
        3,
        "one more once the interval passed"
    );
}

/// With Lucid, one replica's refresh kills the other's access token: the rejected
/// replica reads the store first and adopts the newer token, without a refresh of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_token_is_replaced_from_the_store_before_any_refresh() {
    let fx = Fixture::new().await;
    let grant = fx.sim.issue_grant();
    let a = fx.replica(Some(&grant), |b| b);
    let b = fx.replica(None, |b| b);
    let old = a.access_token().await.unwrap();
    b.invalidate(&b.access_token().await.unwrap());
    let newer = b.access_token().await.unwrap();
    assert_eq!(fx.sim.counters().refreshes, 2);

    a.invalidate(&old);
    assert_eq!(
        a.access_token().await.unwrap(),
        newer,
        "adopted from the store"
    );
    assert_eq!(fx.sim.counters().refreshes, 2, "A refreshed nothing");
}

/// Advances the clock by `by` while the request is in flight, then answers.
struct SlowClockResponder {
    clock: ManualClock,
    by: time::Duration,
    expires_in: u64,
}

impl Respond for SlowClockResponder {
    fn respond(&self, _: &Request) -> ResponseTemplate {
        self.clock.advance(self.by);
        ResponseTemplate::new(200).set_body_json(json!({
            "access_token": format!("at-{}", self.clock.now().unix_timestamp_nanos()),
            "refresh_token": format!("rt-{}", self.clock.now().unix_timestamp_nanos()),
            "expires_in": self.expires_in,
        }))
    }
}

async fn generic_source(server: &MockServer, clock: &ManualClock) -> RefreshingTokenSource {
    let mut profile =
        ProviderProfile::generic(Url::parse(&format!("{}/token", server.uri())).unwrap());
    profile.request_timeout = Duration::from_secs(2);
    RefreshingTokenSource::builder(profile, ClientCredentials::new("c", "s"))
        .initial_refresh_token("rt-0")
        .clock(clock.clone())
        .build()
        .unwrap()
}

/// A token whose lifetime ran out while its answer travelled (here: the clock jumps 5 s
/// during a request for a 2 s token) counts its lifetime from the receipt: one refresh,
/// not one per call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_expired_on_receipt_is_not_refreshed_on_every_call() {
    let server = MockServer::start().await;
    let clock = ManualClock::starting_now();
    Mock::given(method("POST"))
        .respond_with(SlowClockResponder {
            clock: clock.clone(),
            by: time::Duration::seconds(5),
            expires_in: 2,
        })
        .mount(&server)
        .await;
    let source = generic_source(&server, &clock).await;
    for _ in 0..10 {
        source.access_token().await.unwrap();
    }
    assert_eq!(server.received_requests().await.unwrap().len(), 1);
}

/// A dead grant is answered at once, without touching the store, until a re-check finds
/// a new grant imported by another process (every 10 s of calls).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_grant_is_remembered_and_a_reimport_is_picked_up() {
    let fx = Fixture::new().await;
    let a = fx.replica(Some(&fx.sim.issue_grant()), |b| b);
    let importer = fx.replica(None, |b| b);
    fx.sim.revoke_all();
    let err = a.access_token().await.unwrap_err();
    assert!(err.needs_reauthorization(), "{err:?}");
    let calls = fx.store.counts().calls;
    for _ in 0..50 {
        assert!(a.access_token().await.unwrap_err().needs_reauthorization());
    }
    assert_eq!(fx.store.counts().calls, calls, "the store was not touched");
    assert_eq!(fx.sim.counters().requests, 1);

    importer
        .import_refresh_token(fx.sim.issue_grant())
        .await
        .unwrap();
    assert!(
        a.access_token().await.unwrap_err().needs_reauthorization(),
        "not re-checked yet"
    );
    fx.advance(Duration::from_secs(10));
    a.access_token()
        .await
        .expect("the re-imported grant is picked up");
    assert_eq!(fx.sim.counters().reuse_attempts, 0);
    assert!(fx.store.counts().calls_of(StoreOp::Load) > calls[0]);
}

// Scenario 9: a long outage.

/// The provider is down for two hours while callers hold an expired token. Attempts are
/// spaced (never a request before the backoff allows it, at most a minute apart), and
/// callers are served within a minute of the provider's return.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_two_hour_outage_callers_are_served_within_a_minute_of_the_return() {
    let clock = ManualClock::starting_now();
    let sim = Simulator::builder(Mode::Lucid)
        .clock(clock.clone())
        .access_lifetime(Duration::from_secs(3600))
        .faults(1.0, vec![Fault::ServerError(503)], 9)
        .start()
        .await
        .unwrap();
    let store = MemoryStore::new();
    let source = RefreshingTokenSource::builder(sim.profile(), sim.credentials())
        .store(store)
        .key("user-1")
        .initial_refresh_token(sim.issue_grant())
        .clock(clock.clone())
        .build()
        .unwrap();
    const STEP: Duration = Duration::from_secs(5);
    let outage = Duration::from_secs(2 * 3600);
    let mut elapsed = Duration::ZERO;
    // The monotonic instant before which no request may be sent.
    let mut allowed_at = clock.monotonic();
    let mut requests = 0;
    let mut longest_gap = Duration::ZERO;
    let mut last_request = clock.monotonic();
    while elapsed < outage {
        let before = sim.counters().requests;
        let err = source
            .access_token()
            .await
            .expect_err("the provider is down");
        let after = sim.counters().requests;
        if after > before {
            assert_eq!(after - before, 1, "one request per attempt");
            assert!(
                clock.monotonic() >= allowed_at,
                "a request before the backoff allowed it"
            );
            longest_gap = longest_gap.max(clock.monotonic() - last_request);
            last_request = clock.monotonic();
            requests += 1;
        }
        if let Some(wait) = err.retry_after() {
            allowed_at = allowed_at.max(clock.monotonic() + wait);
        }
        clock.advance(time::Duration::try_from(STEP).unwrap());
        elapsed += STEP;
    }
    assert!(
        requests >= 2 * 60,
        "attempts went on at least every minute: {requests}"
    );
    assert!(
        longest_gap <= Duration::from_secs(60) + STEP,
        "{longest_gap:?}"
    );

    sim.set_fault_rate(0.0);
    let mut waited = Duration::ZERO;
    loop {
        match source.access_token().await {
            Ok(_) => break,
            Err(e) => assert!(e.is_transient(), "{e:?}"),
        }
        clock.advance(time::Duration::try_from(STEP).unwrap());
        waited += STEP;
        assert!(
            waited <= Duration::from_secs(60),
            "not served within a minute of the return"
        );
    }
    println!(
        "two-hour outage: {requests} requests, longest gap {longest_gap:?}, served {waited:?} after the return"
    );
    assert_eq!(sim.counters().reuse_attempts, 0);
}

// Scenario 3, reachable from input: numbers that overflow date arithmetic.

fn absurd_responses() -> Vec<(&'static str, ResponseTemplate)> {
    let tokens = |extra: serde_json::Value| {
        let mut body =
            json!({"access_token": "at-x", "refresh_token": "rt-x", "token_type": "Bearer"});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        ResponseTemplate::new(200).set_body_json(body)
    };
    vec![
        (
            "expires_in i64::MAX",
            tokens(json!({"expires_in": i64::MAX})),
        ),
        (
            "expires_in u64::MAX",
            tokens(json!({"expires_in": u64::MAX})),
        ),
        ("expires_in 1e300", tokens(json!({"expires_in": 1e300}))),
        ("expires_in -1", tokens(json!({"expires_in": -1}))),
        (
            "expires_in huge string",
            tokens(json!({"expires_in": "9".repeat(400)})),
        ),
        (
            "refresh_token_expires_in i64::MAX",
            tokens(json!({"expires_in": 3600, "refresh_token_expires_in": i64::MAX})),
        ),
        ("expires i64::MAX", tokens(json!({"expires": i64::MAX}))),
        ("expires i64::MIN", tokens(json!({"expires": i64::MIN}))),
        (
            "Retry-After 1e12",
            ResponseTemplate::new(429).insert_header("Retry-After", "1000000000000"),
        ),
        (
            "Retry-After u64::MAX",
            ResponseTemplate::new(503).insert_header("Retry-After", u64::MAX.to_string()),
        ),
    ]
}

/// Each absurd answer is served or refused with a typed error, and the next call still
/// works (no panic, no stuck flight, a backoff of at most an hour).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_numbers_from_the_provider_never_panic_or_wedge_the_source() {
    for (what, response) in absurd_responses() {
        let server = MockServer::start().await;
        let clock = ManualClock::starting_now();
        Mock::given(method("POST"))
            .respond_with(response)
            .up_to_n_times(1)
            .mount(&server)
            .await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(200).set_body_json(
                json!({"access_token": "at-ok", "refresh_token": "rt-ok", "expires_in": 3600}),
            ))
            .mount(&server)
            .await;
        let source = generic_source(&server, &clock).await;
        let issued_tokens = !what.starts_with("Retry-After");
        match source.access_token().await {
            Ok(_) => {
                // A lifetime far away: the next call is served from the cache.
                source.access_token().await.unwrap();
            }
            Err(e) => {
                assert!(
                    !issued_tokens,
                    "{what}: the tokens issued are served, got {e:?}"
                );
                assert!(
                    matches!(
                        e,
                        Error::Transient {
                            kind: TransientKind::RateLimited | TransientKind::ServerError(503),
                            ..
                        }
                    ),
                    "{what}: {e:?}"
                );
                let wait = e.retry_after().unwrap_or_default();
                assert!(wait <= Duration::from_secs(3600), "{what}: {wait:?}");
                clock.advance(time::Duration::try_from(wait).unwrap() + time::Duration::SECOND);
                let token = source.access_token().await;
                assert_eq!(token.unwrap().secret(), "at-ok", "{what}");
            }
        }
        let status = source.status();
        assert!(status.last_error.is_none_or(|e| e.is_transient()), "{what}");
    }
}
