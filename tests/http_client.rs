//! An application's own `reqwest::Client`: used for every token request of the sources
//! and managers given it, with the token endpoint's rules kept (a redirect is never
//! followed into an answer, the profile's timeout applies).

use std::time::Duration;

use tokenkeeper::{
    ClientCredentials, Error, MemoryStore, ProviderProfile, RefreshToken, RefreshingTokenSource,
    TokenManager, TokenSet, TransientKind,
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

#[tokio::test]
async fn a_redirect_followed_by_the_given_client_is_refused() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/token"))
        .respond_with(ResponseTemplate::new(307).insert_header("location", "/elsewhere"))
        .mount(&server)
        .await;
    Mock::given(path("/elsewhere"))
        .respond_with(token_response())
        .mount(&server)
        .await;
    // reqwest's default policy follows redirects.
    let following = reqwest::Client::new();
    let source = RefreshingTokenSource::builder(profile(&server), credentials())
        .initial_refresh_token("rt-0")
        .http_client(following)
        .build()
        .unwrap();
    match source.access_token().await {
        Err(Error::Config(message)) => {
            assert!(message.contains("redirect"), "{message}");
            assert!(!message.contains("rt-0") && !message.contains("secret-of-the-client"));
        }
        other => panic!("a followed redirect is a configuration error, got {other:?}"),
    }
    // The source's own client never follows one: the 307 is the provider's answer.
    let source = RefreshingTokenSource::builder(profile(&server), credentials())
        .initial_refresh_token("rt-0")
        .build()
        .unwrap();
    let outcome = source.access_token().await;
    assert!(
        !matches!(outcome, Ok(_) | Err(Error::Config(_))),
        "{outcome:?}"
    );
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
