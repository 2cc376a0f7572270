//! An application's own `reqwest::Client`: used for every token request of the sources
//! and managers given it, with the token endpoint's rules kept where they can be (the
//! profile's timeout applies; an answer reached through a redirect the client followed is
//! kept, never dropped with its rotated refresh token).

use std::time::Duration;

use tokenkeeper::testing::{Mode, Simulator};
use tokenkeeper::{
    ClientCredentials, Error, ManualClock, MemoryStore, ProviderProfile, RefreshToken,
    RefreshingTokenSource, TokenManager, TokenSet, TransientKind,
};
use wiremock::matchers::{header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

fn token_response() -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_json(serde_json::json!({
        "access_token": "at-new",
        "refresh_token": "rt-new",
        "token_type": "Bearer",
        "expires_in": 3600,
    }))
}

fn profile(server: &MockServer) -> ProviderProfile {
    ProviderProfile::generic(url::Url::parse(&format!("{}/token", server.uri())).unwrap())
}

fn credentials() -> ClientCredentials {
    ClientCredentials::new("client", "secret-of-the-client")
}

#[tokio::test]
async fn sources_and_managers_send_with_the_client_they_are_given() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/token"))
        .and(header("user-agent", "acme-billing/2.1"))
        .respond_with(token_response())
        .expect(2)
        .mount(&server)
        .await;
    let client = reqwest::Client::builder()
        .user_agent("acme-billing/2.1")
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();

    let source = RefreshingTokenSource::builder(profile(&server), credentials())
        .initial_refresh_token("rt-0")
        .http_client(client.clone())
        .build()
        .unwrap();
    assert_eq!(source.access_token().await.unwrap().secret(), "at-new");

    let store = MemoryStore::new();
    let now = time::OffsetDateTime::now_utc();
    store.put(
        "user-1",
        TokenSet::from_refresh_token(RefreshToken::new("rt-1"), now),
    );
    let manager = TokenManager::builder(profile(&server), credentials())
        .store(store)
        .http_client(client)
        .build()
        .unwrap();
    let token = manager.source("user-1").unwrap().access_token().await;
    assert_eq!(token.unwrap().secret(), "at-new");
    // `expect(2)` is verified when the server drops: both went through the client.
}

/// A client that follows redirects (reqwest's default) sends the token request on to the
/// redirect's target, which may rotate the refresh token: its answer is kept, so the used
/// token is never presented again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_reached_through_a_followed_redirect_is_kept() {
    let clock = ManualClock::starting_now();
    let sim = Simulator::builder(Mode::Generic)
        .clock(clock.clone())
        .start()
        .await
        .unwrap();
    let front = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/token"))
        .respond_with(
            ResponseTemplate::new(308).insert_header("location", sim.token_url().as_str()),
        )
        .mount(&front)
        .await;
    let mut redirected = sim.profile();
    redirected.token_url = url::Url::parse(&format!("{}/token", front.uri())).unwrap();
    let store = MemoryStore::new();
    let source = RefreshingTokenSource::builder(redirected, sim.credentials())
        .store(store.clone())
        .initial_refresh_token(sim.issue_grant())
        .clock(clock.clone())
        .http_client(reqwest::Client::new())
        .build()
        .unwrap();
    source.access_token().await.expect("the redirected answer");
    assert_eq!(
        sim.counters().refreshes,
        1,
        "the provider rotated the token"
    );

    // The operator fixes the client: the same store and key, past the token's expiry.
    clock.advance(time::Duration::hours(2));
    let fixed = RefreshingTokenSource::builder(sim.profile(), sim.credentials())
        .store(store)
        .clock(clock.clone())
        .build()
        .unwrap();
    fixed.access_token().await.unwrap();
    assert_eq!(sim.counters().refreshes, 2);
    assert_eq!(sim.counters().reuse_attempts, 0);
    assert_eq!(sim.counters().revoked_grants, 0);
}

#[tokio::test]
async fn the_profiles_timeout_applies_to_a_given_client() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/token"))
        .respond_with(token_response().set_delay(Duration::from_secs(30)))
        .mount(&server)
        .await;
    let mut profile = profile(&server);
    profile.request_timeout = Duration::from_millis(300);
    // A client without a timeout of its own.
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let source = RefreshingTokenSource::builder(profile, credentials())
        .initial_refresh_token("rt-0")
        .lease_ttl(Duration::from_secs(5))
        .http_client(client)
        .build()
        .unwrap();
    let outcome = source.access_token().await;
    assert!(
        matches!(
            outcome,
            Err(Error::Transient {
                kind: TransientKind::Timeout,
                ..
            })
        ),
        "the request is cut by the profile's timeout: {outcome:?}"
    );
}
