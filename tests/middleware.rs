//! Reactive refresh: the API rejects a token, the source reloads (or refreshes) and the
//! request is retried exactly once.
#![cfg(feature = "middleware")]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use tokenkeeper::middleware::{SendError, TokenErrorExt, TokenMiddleware, send_with_token};
use tokenkeeper::testing::{FaultyStore, Mode, Simulator};
use tokenkeeper::{AccessToken, Error, MemoryStore, RefreshingTokenSource, TokenSource};
use wiremock::matchers::{header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

const KEY: &str = "lucid:user-1";

/// Two replicas (two sources sharing one store and key) of an application talking to Lucid.
struct Replicas {
    sim: Simulator,
    a: RefreshingTokenSource,
    b: RefreshingTokenSource,
}

impl Replicas {
    async fn new() -> Self {
        let sim = Simulator::builder(Mode::Lucid).start().await.unwrap();
        // A store that cannot watch: B learns of A's refresh only from the API.
        let store = FaultyStore::new(MemoryStore::new()).without_watch();
        let replica = || {
            RefreshingTokenSource::builder(sim.profile(), sim.credentials())
                .store(store.clone())
                .key(KEY)
                .build()
                .unwrap()
        };
        let (a, b) = (replica(), replica());
        a.import_refresh_token(sim.issue_grant()).await.unwrap();
        Self { sim, a, b }
    }

    /// A and B hold the same access token; then A refreshes, which (Lucid) kills it.
    /// Returns the killed token.
    async fn a_refreshes_behind_bs_back(&self) -> AccessToken {
        let first = self.a.access_token().await.unwrap();
        let adopted = self.b.access_token().await.unwrap();
        assert_eq!(first, adopted, "B adopted A's token from the store");
        assert_eq!(self.sim.counters().refreshes, 1);

        self.a.invalidate(&first);
        let second = self.a.access_token().await.unwrap();
        assert_ne!(first, second);
        assert_eq!(self.sim.counters().refreshes, 2);
        let status = reqwest::Client::new()
            .get(self.sim.api_url())
            .bearer_auth(first.secret())
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(
            status, 401,
            "Lucid's refresh killed the token B still holds"
        );
        first
    }
}

#[tokio::test]
async fn a_token_killed_by_another_replicas_refresh_is_replaced_from_the_store_without_refreshing()
{
    let replicas = Replicas::new().await;
    replicas.a_refreshes_behind_bs_back().await;

    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(TokenMiddleware::new(replicas.b.clone()))
        .build();
    let response = client.get(replicas.sim.api_url()).send().await.unwrap();

    assert_eq!(response.status(), 200, "the one retry succeeded");
    assert_eq!(
        replicas.sim.counters().refreshes,
        2,
        "B adopted A's refreshed token from the store: no second refresh"
    );
    assert_eq!(replicas.sim.counters().reuse_attempts, 0);
    assert_eq!(
        replicas.b.access_token().await.unwrap(),
        replicas.a.access_token().await.unwrap()
    );
}

#[tokio::test]
async fn send_with_token_replaces_a_killed_token_and_retries_once() {
    let replicas = Replicas::new().await;
    replicas.a_refreshes_behind_bs_back().await;
    let client = reqwest::Client::new();
    let mut built = 0;

    let response = send_with_token(&replicas.b, || {
        built += 1;
        client.get(replicas.sim.api_url())
    })
    .await
    .unwrap();

    assert_eq!(response.status(), 200);
    assert_eq!(built, 2, "the request was rebuilt once for the retry");
    assert_eq!(replicas.sim.counters().refreshes, 2);
}

/// Hands out `token-1`, `token-2`, ... : a new token after each invalidation. Its
/// expired-token statuses: 401, or 403 as HighQ's (`highq`).
#[derive(Default)]
struct CountingSource {
    invalidations: AtomicUsize,
    highq: bool,
}

#[async_trait]
impl TokenSource for CountingSource {
    async fn access_token(&self) -> Result<AccessToken, Error> {
        let n = self.invalidations.load(Ordering::SeqCst) + 1;
        Ok(AccessToken::new(format!("token-{n}")))
    }

    async fn invalidate(&self, _rejected: &AccessToken) {
        self.invalidations.fetch_add(1, Ordering::SeqCst);
    }

    fn expired_token_statuses(&self) -> &[u16] {
        if self.highq { &[403] } else { &[401] }
    }
}

async fn api_that_always_answers(status: u16, expected_requests: u64) -> MockServer {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/api"))
        .respond_with(ResponseTemplate::new(status))
        .expect(expected_requests)
        .mount(&server)
        .await;
    server
}

#[tokio::test]
async fn a_persistent_401_is_retried_exactly_once() {
    let server = api_that_always_answers(401, 2).await;
    let source = Arc::new(CountingSource::default());
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(TokenMiddleware::with_statuses(Arc::clone(&source), [401]))
        .build();

    let response = client
        .get(format!("{}/api", server.uri()))
        .send()
        .await
        .unwrap();

    assert_eq!(
        response.status(),
        401,
        "the second answer is returned as is"
    );
    assert_eq!(source.invalidations.load(Ordering::SeqCst), 1);
    let requests = server.received_requests().await.unwrap();
    let bearers: Vec<_> = requests
        .iter()
        .map(|r| r.headers.get("authorization").unwrap().to_str().unwrap())
        .collect();
    assert_eq!(bearers, ["Bearer token-1", "Bearer token-2"]);
}

#[tokio::test]
async fn send_with_token_retries_a_persistent_403_exactly_once_for_highq() {
    let server = api_that_always_answers(403, 2).await;
    let source = CountingSource {
        highq: true,
        ..CountingSource::default()
    };
    let client = reqwest::Client::new();

    let response = send_with_token(&source, || client.get(format!("{}/api", server.uri())))
        .await
        .unwrap();

    assert_eq!(response.status(), 403);
    assert_eq!(source.invalidations.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn other_statuses_are_returned_without_a_retry() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/api"))
        .and(header("authorization", "Bearer token-1"))
        .respond_with(ResponseTemplate::new(403))
        .expect(1)
        .mount(&server)
        .await;
    let source = Arc::new(CountingSource::default());
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(TokenMiddleware::with_statuses(Arc::clone(&source), [401]))
        .build();

    let response = client
        .get(format!("{}/api", server.uri()))
        .send()
        .await
        .unwrap();

    assert_eq!(response.status(), 403);
    assert_eq!(source.invalidations.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_failure_to_get_a_token_is_a_typed_error() {
    // No refresh token anywhere: a person must authorize first.
    let sim = Simulator::builder(Mode::Lucid).start().await.unwrap();
    let source = RefreshingTokenSource::builder(sim.profile(), sim.credentials())
        .build()
        .unwrap();
    let client = reqwest::Client::new();

    let error = send_with_token(&source, || client.get(sim.api_url()))
        .await
        .unwrap_err();

    assert!(matches!(
        error,
        SendError::Token(Error::ReauthorizationRequired { .. })
    ));

    // Through the middleware: the error users hold gives the token error directly.
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(TokenMiddleware::new(source))
        .build();
    let error = client.get(sim.api_url()).send().await.unwrap_err();
    assert!(
        matches!(
            error.token_error(),
            Some(Error::ReauthorizationRequired { .. })
        ),
        "{error:?}"
    );
    assert_eq!(sim.counters().requests, 0);
}
