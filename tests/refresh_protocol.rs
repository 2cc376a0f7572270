//! The refresh protocol, observed from outside: requests counted at the mock server, what
//! the store holds, what callers get.

use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use serde_json::json;
use time::OffsetDateTime;
use tokenkeeper::{
    AccessToken, ClientCredentials, Error, ManualClock, MemoryStore, ProviderProfile,
    ReauthorizationReason, RefreshToken, RefreshingTokenSource, TokenSet, TokenSource,
    TransientKind,
};
use url::Url;
use wiremock::matchers::{body_string_contains, method, path};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

const KEY: &str = "user-1";

fn tokens(access: &str, refresh: &str, expires_in: u64) -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_json(json!({
        "access_token": access,
        "refresh_token": refresh,
        "expires_in": expires_in,
        "token_type": "Bearer",
    }))
}

fn invalid_grant() -> ResponseTemplate {
    ResponseTemplate::new(400).set_body_json(
        json!({"error": "invalid_grant", "error_description": "refresh token is dead"}),
    )
}

fn refreshing_with(token: &str) -> wiremock::MockBuilder {
    Mock::given(method("POST"))
        .and(path("/token"))
        .and(body_string_contains(format!("refresh_token={token}&")))
}

struct Fixture {
    server: MockServer,
    store: MemoryStore,
    clock: ManualClock,
}

impl Fixture {
    async fn new() -> Self {
        Self {
            server: MockServer::start().await,
            store: MemoryStore::new(),
            clock: ManualClock::starting_now(),
        }
    }

    fn profile(&self) -> ProviderProfile {
        let mut profile =
            ProviderProfile::generic(Url::parse(&format!("{}/token", self.server.uri())).unwrap());
        profile.request_timeout = Duration::from_millis(500);
        profile
    }

    fn source(&self) -> RefreshingTokenSource {
        self.source_with(self.profile())
    }

    fn source_with(&self, profile: ProviderProfile) -> RefreshingTokenSource {
        RefreshingTokenSource::builder(profile, ClientCredentials::new("client", "s3cret-client"))
            .store(self.store.clone())
            .key(KEY)
            .initial_refresh_token("rt-1")
            .clock(self.clock.clone())
            .build()
            .unwrap()
    }

    fn stored_refresh_token(&self) -> Option<String> {
        self.store
            .get(KEY)
            .and_then(|v| v.value.refresh_token)
            .map(|t| t.secret().to_owned())
    }

    /// A token set in the store, obtained now, as another process would have saved it.
    fn put(&self, access: &str, refresh: &str, lifetime: time::Duration) {
        let now = self.clock.now_dt();
        let mut set = TokenSet::new(AccessToken::new(access), now);
        set.refresh_token = Some(RefreshToken::new(refresh));
        set.expires_at = Some(now + lifetime);
        self.store.put(KEY, set);
    }
}

trait NowDt {
    fn now_dt(&self) -> OffsetDateTime;
}

impl NowDt for ManualClock {
    fn now_dt(&self) -> OffsetDateTime {
        tokenkeeper::Clock::now(self)
    }
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..500 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("never happened: {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_callers_on_an_expired_token_cause_one_request() {
    let fx = Fixture::new().await;
    refreshing_with("rt-1")
        .respond_with(tokens("at-2", "rt-2", 3600).set_delay(Duration::from_millis(200)))
        .expect(1)
        .mount(&fx.server)
        .await;
    let source = Arc::new(fx.source());

    let callers: Vec<_> = (0..1000)
        .map(|_| {
            let source = Arc::clone(&source);
            tokio::spawn(async move { source.access_token().await })
        })
        .collect();
    for caller in callers {
        assert_eq!(caller.await.unwrap().unwrap().secret(), "at-2");
    }
    assert_eq!(fx.stored_refresh_token().as_deref(), Some("rt-2"));
    fx.server.verify().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_cancelled_after_the_request_is_sent_do_not_lose_the_rotated_token() {
    let fx = Fixture::new().await;
    refreshing_with("rt-1")
        .respond_with(tokens("at-2", "rt-2", 3600).set_delay(Duration::from_millis(300)))
        .expect(1)
        .mount(&fx.server)
        .await;
    refreshing_with("rt-2")
        .respond_with(tokens("at-3", "rt-3", 3600))
        .expect(1)
        .mount(&fx.server)
        .await;
    let source = Arc::new(fx.source());

    let callers: Vec<_> = (0..10)
        .map(|_| {
            let source = Arc::clone(&source);
            tokio::spawn(async move { source.access_token().await })
        })
        .collect();
    let server = &fx.server;
    for _ in 0..500 {
        if !server.received_requests().await.unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        server.received_requests().await.unwrap().len(),
        1,
        "the refresh request was sent"
    );
    for caller in &callers {
        caller.abort();
    }
    for caller in callers {
        assert!(
            caller.await.unwrap_err().is_cancelled(),
            "every caller was cancelled"
        );
    }

    eventually("the rotated refresh token is saved", || {
        fx.stored_refresh_token().as_deref() == Some("rt-2")
    })
    .await;
    fx.clock.advance(time::Duration::hours(2));
    assert_eq!(source.access_token().await.unwrap().secret(), "at-3");
    assert_eq!(fx.stored_refresh_token().as_deref(), Some("rt-3"));
    fx.server.verify().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_tokens_are_served_at_once_while_one_refresh_runs() {
    let fx = Fixture::new().await;
    fx.put("at-1", "rt-1", time::Duration::hours(1));
    refreshing_with("rt-1")
        .respond_with(tokens("at-2", "rt-2", 3600).set_delay(Duration::from_millis(300)))
        .expect(1)
        .mount(&fx.server)
        .await;
    let source = fx.source();
    assert_eq!(source.access_token().await.unwrap().secret(), "at-1");

    fx.clock.advance(time::Duration::seconds(3570)); // inside the 60 s leeway
    for _ in 0..100 {
        // Ready on the first poll: no caller waits for the refresh.
        let token = source
            .access_token()
            .now_or_never()
            .expect("a stale token is returned without waiting")
            .unwrap();
        assert_eq!(token.secret(), "at-1");
    }
    eventually("the background refresh lands", || {
        fx.stored_refresh_token().as_deref() == Some("rt-2")
    })
    .await;
    assert_eq!(source.access_token().await.unwrap().secret(), "at-2");
    fx.server.verify().await;
}

/// Answers `invalid_grant` after another writer rotated the stored token during the request.
struct RotatedMeanwhile {
    store: MemoryStore,
    set: TokenSet,
}

impl Respond for RotatedMeanwhile {
    fn respond(&self, _: &Request) -> ResponseTemplate {
        self.store.put(KEY, self.set.clone());
        invalid_grant()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_grant_after_another_writer_rotated_adopts_the_fresh_stored_token() {
    let fx = Fixture::new().await;
    let now = fx.clock.now_dt();
    let mut rotated = TokenSet::new(AccessToken::new("at-other"), now);
    rotated.refresh_token = Some(RefreshToken::new("rt-other"));
    rotated.expires_at = Some(now + time::Duration::hours(1));
    refreshing_with("rt-1")
        .respond_with(RotatedMeanwhile {
            store: fx.store.clone(),
            set: rotated,
        })
        .expect(1)
        .mount(&fx.server)
        .await;

    let token = fx.source().access_token().await.expect("no error: adopted");
    assert_eq!(token.secret(), "at-other");
    assert_eq!(fx.stored_refresh_token().as_deref(), Some("rt-other"));
    fx.server.verify().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_grant_after_another_writer_rotated_retries_once_with_the_rotated_token() {
    let fx = Fixture::new().await;
    let rotated = TokenSet::from_refresh_token(RefreshToken::new("rt-other"), fx.clock.now_dt());
    refreshing_with("rt-1")
        .respond_with(RotatedMeanwhile {
            store: fx.store.clone(),
            set: rotated,
        })
        .expect(1)
        .mount(&fx.server)
        .await;
    refreshing_with("rt-other")
        .respond_with(tokens("at-2", "rt-2", 3600))
        .expect(1)
        .mount(&fx.server)
        .await;

    assert_eq!(fx.source().access_token().await.unwrap().secret(), "at-2");
    assert_eq!(fx.stored_refresh_token().as_deref(), Some("rt-2"));
    fx.server.verify().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_grant_with_nothing_newer_requires_reauthorization_and_keeps_the_store() {
    let fx = Fixture::new().await;
    refreshing_with("rt-1")
        .respond_with(invalid_grant())
        .expect(1)
        .mount(&fx.server)
        .await;
    let source = fx.source();

    let err = source.access_token().await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::ReauthorizationRequired {
                reason: ReauthorizationReason::RefreshTokenRejected,
                provider: Some(ref p)
            } if p.code == "invalid_grant"
        ),
        "{err:?}"
    );
    let stored = fx.store.get(KEY).expect("the store is not wiped").value;
    assert_eq!(
        stored.refresh_token.unwrap().secret(),
        "rt-1",
        "kept for diagnosis"
    );
    assert!(stored.rejected_at.is_some(), "and marked as rejected");

    // The dead token is never presented again (the mock expects exactly one request).
    let again = source.access_token().await.unwrap_err();
    assert!(again.needs_reauthorization(), "{again:?}");
    fx.server.verify().await;
}

async fn transient_failure_case(
    failure: ResponseTemplate,
    expected: TransientKind,
    expected_requests: usize,
) {
    let fx = Fixture::new().await;
    fx.put("at-1", "rt-1", time::Duration::hours(1));
    refreshing_with("rt-1")
        .respond_with(failure)
        .mount(&fx.server)
        .await;
    let source = fx.source();
    assert_eq!(source.access_token().await.unwrap().secret(), "at-1");

    // Stale: the current token is served while the refresh fails in the background.
    fx.clock.advance(time::Duration::seconds(3570));
    assert_eq!(source.access_token().await.unwrap().secret(), "at-1");
    eventually("the failed attempt is over", || {
        fx.server
            .received_requests()
            .now_or_never()
            .flatten()
            .is_some_and(|r| r.len() == 1)
    })
    .await;
    // Let the attempt end (the timeout case needs the 500 ms request timeout to pass).
    tokio::time::sleep(Duration::from_millis(700)).await;
    // Still stale, and backing off: served again, no second request.
    for _ in 0..20 {
        assert_eq!(source.access_token().await.unwrap().secret(), "at-1");
    }

    // Expired: at most one more attempt (when the backoff allows it), which fails the same
    // way; the caller gets a typed Transient error saying when to retry, and callers
    // hammering meanwhile send nothing.
    fx.clock.advance(time::Duration::seconds(31));
    let err = source.access_token().await.unwrap_err();
    match &err {
        Error::Transient {
            kind, retry_after, ..
        } => {
            assert_eq!(*kind, expected, "{err:?}");
            assert!(retry_after.is_some_and(|r| r > Duration::ZERO), "{err:?}");
        }
        other => panic!("expected Transient, got {other:?}"),
    }
    for _ in 0..20 {
        assert!(source.access_token().await.unwrap_err().is_transient());
    }
    assert_eq!(
        fx.stored_refresh_token().as_deref(),
        Some("rt-1"),
        "the refresh token is kept"
    );
    eventually("every attempt is recorded", || {
        fx.server
            .received_requests()
            .now_or_never()
            .flatten()
            .is_some_and(|r| r.len() >= expected_requests)
    })
    .await;
    assert_eq!(
        fx.server.received_requests().await.unwrap().len(),
        expected_requests,
        "attempts are spaced"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_error_while_stale_serves_the_current_token_then_is_transient() {
    transient_failure_case(
        ResponseTemplate::new(503),
        TransientKind::ServerError(503),
        2,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limiting_while_stale_serves_the_current_token_then_is_transient() {
    transient_failure_case(
        ResponseTemplate::new(429).insert_header("Retry-After", "120"),
        TransientKind::RateLimited,
        1, // Retry-After: 120 outlasts the token
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_while_stale_serves_the_current_token_then_is_transient() {
    transient_failure_case(
        tokens("at-late", "rt-late", 3600).set_delay(Duration::from_secs(2)),
        TransientKind::Timeout,
        2,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_honoured_and_attempts_resume_after_it() {
    let fx = Fixture::new().await;
    refreshing_with("rt-1")
        .respond_with(ResponseTemplate::new(429).insert_header("Retry-After", "120"))
        .up_to_n_times(1)
        .expect(1)
        .mount(&fx.server)
        .await;
    let source = fx.source();
    let err = source.access_token().await.unwrap_err();
    let wait = err.retry_after().expect("retry_after");
    assert!(wait >= Duration::from_secs(120), "{wait:?}");

    // Callers hammering during the wait send nothing.
    for _ in 0..50 {
        assert!(source.access_token().await.unwrap_err().is_transient());
    }
    assert_eq!(fx.server.received_requests().await.unwrap().len(), 1);

    refreshing_with("rt-1")
        .respond_with(tokens("at-2", "rt-2", 3600))
        .expect(1)
        .mount(&fx.server)
        .await;
    fx.clock.advance(time::Duration::seconds(125));
    assert_eq!(source.access_token().await.unwrap().secret(), "at-2");
    fx.server.verify().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ten_second_token_with_sixty_seconds_leeway_is_not_refreshed_on_every_call() {
    let fx = Fixture::new().await;
    refreshing_with("rt-1")
        .respond_with(tokens("at-2", "rt-2", 10))
        .expect(1)
        .mount(&fx.server)
        .await;
    let source = fx.source();
    for _ in 0..5 {
        assert_eq!(source.access_token().await.unwrap().secret(), "at-2");
        fx.clock.advance(time::Duration::seconds(1));
    }
    fx.server.verify().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_token_saved_by_another_process_is_adopted_without_a_request() {
    let fx = Fixture::new().await;
    fx.put("at-1", "rt-1", time::Duration::minutes(5));
    let source = fx.source();
    assert_eq!(source.access_token().await.unwrap().secret(), "at-1");
    fx.clock.advance(time::Duration::minutes(6));
    fx.put("at-other", "rt-other", time::Duration::hours(1));
    assert_eq!(source.access_token().await.unwrap().secret(), "at-other");
    assert!(fx.server.received_requests().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidated_token_is_not_adopted_again_from_the_store() {
    let fx = Fixture::new().await;
    fx.put("at-1", "rt-1", time::Duration::hours(1));
    refreshing_with("rt-1")
        .respond_with(tokens("at-2", "rt-2", 3600))
        .expect(1)
        .mount(&fx.server)
        .await;
    let source = fx.source();
    let rejected = source.access_token().await.unwrap();
    source.invalidate(&rejected);
    assert_eq!(source.access_token().await.unwrap().secret(), "at-2");
    fx.server.verify().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_any_refresh_token_reauthorization_is_required_without_a_request() {
    let fx = Fixture::new().await;
    let source = RefreshingTokenSource::builder(fx.profile(), ClientCredentials::new("c", "s"))
        .store(fx.store.clone())
        .clock(fx.clock.clone())
        .build()
        .unwrap();
    let err = source.access_token().await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::ReauthorizationRequired {
                reason: ReauthorizationReason::NoRefreshToken,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(fx.server.received_requests().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_initial_refresh_token_is_saved_before_it_is_presented() {
    let fx = Fixture::new().await;
    let store = fx.store.clone();
    refreshing_with("rt-1")
        .respond_with(move |_: &Request| {
            let stored = store
                .get(KEY)
                .expect("the seed is in the store before the request");
            assert_eq!(stored.value.refresh_token.unwrap().secret(), "rt-1");
            tokens("at-2", "rt-2", 3600)
        })
        .expect(1)
        .mount(&fx.server)
        .await;
    assert_eq!(fx.source().access_token().await.unwrap().secret(), "at-2");
    fx.server.verify().await;
}
