//! HTTP clients: an application's own `reqwest::Client` is used for every token request
//! of the sources and managers given it, with the token endpoint's rules kept (the
//! profile's timeout applies; a token request is never resent to a redirect's target);
//! without one, sources share the process's client.

use std::time::Duration;

use tokenkeeper::testing::{Mode, Simulator};
use tokenkeeper::{
    ClientCredentials, Error, MemoryStore, ProviderProfile, RefreshToken, RefreshingTokenSource,
    TokenManager, TokenSet, TransientKind,
};
use wiremock::matchers::{body_string_contains, header, header_exists, method, path};
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
        // The body that cannot be replayed still goes with its length, not chunked.
        .and(header_exists("content-length"))
        .and(header("content-type", "application/x-www-form-urlencoded"))
        .and(body_string_contains("grant_type=refresh_token"))
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

/// A client that follows redirects (reqwest's default) is tamed: a token request's body
/// cannot be replayed, so a 307 or 308 is not followed at all, and a 301, 302 or 303 is
/// followed only as a GET without the body (no refresh token reaches the target), whose
/// answer is refused as a configuration error. The grant is intact for a fixed client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_follows_redirects_never_resends_a_token_request() {
    for status in [307u16, 308, 301, 302, 303] {
        let sim = Simulator::builder(Mode::Generic).start().await.unwrap();
        let front = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path("/token"))
            .respond_with(
                ResponseTemplate::new(status).insert_header("location", sim.token_url().as_str()),
            )
            .mount(&front)
            .await;
        let mut redirected = sim.profile();
        redirected.token_url = url::Url::parse(&format!("{}/token", front.uri())).unwrap();
        let store = MemoryStore::new();
        let source = RefreshingTokenSource::builder(redirected, sim.credentials())
            .store(store.clone())
            .initial_refresh_token(sim.issue_grant())
            .http_client(reqwest::Client::new())
            .build()
            .unwrap();
        let refused = source.access_token().await;
        assert!(refused.is_err(), "{status}: {refused:?}");
        assert_eq!(
            sim.counters().refreshes,
            0,
            "{status}: no refresh token reached the redirect's target"
        );
        if matches!(status, 301..=303) {
            assert!(
                matches!(refused, Err(Error::Config(_))),
                "{status}: {refused:?}"
            );
        }
        // The operator fixes the profile: the same store and grant refresh once.
        let fixed = RefreshingTokenSource::builder(sim.profile(), sim.credentials())
            .store(store)
            .build()
            .unwrap();
        fixed.access_token().await.unwrap();
        assert_eq!(sim.counters().refreshes, 1);
        assert_eq!(sim.counters().reuse_attempts, 0);
    }
}

/// Sources share the process's client: building a thousand builds at most one client
/// (none if an earlier test built it), and after each has refreshed, the process holds
/// no idle connection for them (the shared client keeps none).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_sources_share_one_client_and_keep_no_sockets() {
    const SOURCES: usize = 1_000;
    let sim = Simulator::builder(Mode::Generic).start().await.unwrap();
    let before = tokenkeeper::testing::http_clients_built();
    let sockets_before = open_sockets();
    let sources: Vec<RefreshingTokenSource> = (0..SOURCES)
        .map(|_| {
            RefreshingTokenSource::builder(sim.profile(), sim.credentials())
                .initial_refresh_token(sim.issue_grant())
                .build()
                .unwrap()
        })
        .collect();
    let built = tokenkeeper::testing::http_clients_built() - before;
    assert!(built <= 1, "{built} clients built for {SOURCES} sources");
    let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(32));
    let mut refreshes = tokio::task::JoinSet::new();
    for source in &sources {
        let (source, permits) = (source.clone(), std::sync::Arc::clone(&permits));
        refreshes.spawn(async move {
            let _permit = permits.acquire().await.unwrap();
            source.access_token().await.unwrap();
        });
    }
    while let Some(done) = refreshes.join_next().await {
        done.unwrap();
    }
    assert_eq!(sim.counters().refreshes, SOURCES as u64);
    // Closed connections leave the process's descriptor table at once; the server side
    // (the simulator, in this process) closes its end as it reads the client's.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let held = loop {
        let held = open_sockets().saturating_sub(sockets_before);
        if held <= 8 || std::time::Instant::now() > deadline {
            break held;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        held <= 8,
        "{held} sockets still open after {SOURCES} sources refreshed"
    );
    drop(sources);
}

/// The sockets among this process's open file descriptors (Linux).
fn open_sockets() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|e| {
                    std::fs::read_link(e.path())
                        .is_ok_and(|target| target.to_string_lossy().starts_with("socket:"))
                })
                .count()
        })
        .unwrap_or(0)
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
