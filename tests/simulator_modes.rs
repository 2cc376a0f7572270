//! Each provider mode of the simulator, driven through the public API: it speaks the
//! provider's wire, enforces its rotation rules, and tokenkeeper rotates through it many
//! times with concurrent callers without ever presenting a refresh token twice.

use std::sync::Arc;
use std::time::Duration;

use tokenkeeper::testing::{Mode, Simulator};
use tokenkeeper::{ManualClock, MemoryStore, RefreshingTokenSource};

const ROTATIONS: u64 = 50;
const CALLERS: usize = 8;
const LIFETIME: Duration = Duration::from_secs(3600);

async fn api_status(sim: &Simulator, token: &str) -> u16 {
    reqwest::Client::new()
        .get(sim.api_url())
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// `ROTATIONS` expiries, each met by `CALLERS` concurrent callers; the clock jumps past
/// each expiry (no real sleeping).
async fn rotate_many_times(sim: Simulator, clock: ManualClock) {
    let store = MemoryStore::new();
    let source = Arc::new(
        RefreshingTokenSource::builder(sim.profile(), sim.credentials())
            .store(store.clone())
            .clock(clock.clone())
            .initial_refresh_token(sim.issue_grant())
            .build()
            .unwrap(),
    );
    for round in 0..ROTATIONS {
        let mut callers = Vec::new();
        for _ in 0..CALLERS {
            let source = Arc::clone(&source);
            callers.push(tokio::spawn(async move {
                source.access_token().await.map(|t| t.secret().to_owned())
            }));
        }
        let mut tokens = Vec::new();
        for caller in callers {
            tokens.push(caller.await.unwrap().unwrap());
        }
        tokens.dedup();
        assert_eq!(
            tokens.len(),
            1,
            "round {round}: all callers share one token"
        );
        assert_eq!(api_status(&sim, &tokens[0]).await, 200, "round {round}");
        assert_eq!(
            sim.counters().refreshes,
            round + 1,
            "one refresh per expiry"
        );
        clock.advance(time::Duration::try_from(LIFETIME).unwrap() + time::Duration::seconds(1));
    }
    let counters = sim.counters();
    assert_eq!(counters.refreshes, ROTATIONS);
    assert_eq!(counters.reuse_attempts, 0);
    assert_eq!(counters.revoked_grants, 0);
    assert_eq!(counters.invalid_grant, 0);
    assert_eq!(counters.rejected_requests, 0);
    let stored = store.get("default").unwrap().value;
    assert_eq!(
        stored.refresh_token.unwrap().secret(),
        sim.current_refresh_token(0).unwrap(),
        "the store holds the one live refresh token"
    );
}

async fn start(mode: Mode, clock: &ManualClock) -> Simulator {
    Simulator::builder(mode)
        .clock(clock.clone())
        .access_lifetime(LIFETIME)
        .start()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lucid_mode_rotates_fifty_times_without_reuse() {
    let clock = ManualClock::starting_now();
    rotate_many_times(start(Mode::Lucid, &clock).await, clock).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn highq_xml_mode_rotates_fifty_times_without_reuse() {
    let clock = ManualClock::starting_now();
    rotate_many_times(start(Mode::HighQ, &clock).await, clock).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn highq_json_mode_rotates_fifty_times_without_reuse() {
    let clock = ManualClock::starting_now();
    let sim = Simulator::builder(Mode::HighQ)
        .highq_json(true)
        .clock(clock.clone())
        .access_lifetime(LIFETIME)
        .start()
        .await
        .unwrap();
    rotate_many_times(sim, clock).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn autodesk_mode_rotates_fifty_times_without_reuse() {
    let clock = ManualClock::starting_now();
    rotate_many_times(start(Mode::Autodesk, &clock).await, clock).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn autodesk_public_client_rotates_fifty_times_without_reuse() {
    let clock = ManualClock::starting_now();
    let sim = Simulator::builder(Mode::Autodesk)
        .client_secret(None)
        .clock(clock.clone())
        .access_lifetime(LIFETIME)
        .start()
        .await
        .unwrap();
    rotate_many_times(sim, clock).await;
}

/// Forces a second refresh while the first access token is still within its lifetime.
async fn refresh_while_first_token_lives(mode: Mode) -> (Simulator, String, String) {
    let clock = ManualClock::starting_now();
    let sim = start(mode, &clock).await;
    let source = RefreshingTokenSource::builder(sim.profile(), sim.credentials())
        .clock(clock.clone())
        .initial_refresh_token(sim.issue_grant())
        .build()
        .unwrap();
    let first = source.access_token().await.unwrap();
    assert_eq!(api_status(&sim, first.secret()).await, 200);
    source.invalidate(&first);
    let second = source.access_token().await.unwrap();
    assert_ne!(first, second);
    assert_eq!(sim.counters().refreshes, 2);
    (sim, first.secret().to_owned(), second.secret().to_owned())
}

#[tokio::test]
async fn lucid_refresh_kills_the_previous_access_token() {
    let (sim, first, second) = refresh_while_first_token_lives(Mode::Lucid).await;
    assert!(first.starts_with("oauth2-") && second.starts_with("oauth2-"));
    assert_eq!(api_status(&sim, &first).await, 401);
    assert_eq!(api_status(&sim, &second).await, 200);
}

#[tokio::test]
async fn autodesk_refresh_leaves_the_previous_access_token_valid() {
    let (sim, first, second) = refresh_while_first_token_lives(Mode::Autodesk).await;
    assert_eq!(api_status(&sim, &first).await, 200);
    assert_eq!(api_status(&sim, &second).await, 200);
}

#[tokio::test]
async fn highq_api_answers_403_for_an_expired_token() {
    let clock = ManualClock::starting_now();
    let sim = start(Mode::HighQ, &clock).await;
    assert_eq!(
        sim.profile().token_url,
        sim.base_url().join("api/oauth2/token").unwrap(),
        "the HighQ profile derives the token URL from the instance base URL"
    );
    let source = RefreshingTokenSource::builder(sim.profile(), sim.credentials())
        .clock(clock.clone())
        .initial_refresh_token(sim.issue_grant())
        .build()
        .unwrap();
    let token = source.access_token().await.unwrap();
    assert_eq!(api_status(&sim, token.secret()).await, 200);
    clock.advance(time::Duration::hours(2));
    assert_eq!(api_status(&sim, token.secret()).await, 403);
    assert!(sim.profile().expired_token_statuses.contains(&403));
}

/// Raw requests to the simulator's token endpoint, as a misbehaving client would send.
async fn raw(sim: &Simulator, request: reqwest::RequestBuilder) -> (u16, String) {
    let _ = sim;
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

#[tokio::test]
async fn autodesk_mode_refuses_credentials_in_both_places_and_non_form_bodies() {
    let sim = Simulator::builder(Mode::Autodesk).start().await.unwrap();
    let refresh = sim.issue_grant();
    let client = reqwest::Client::new();
    let both = client
        .post(sim.token_url())
        .basic_auth("sim-client", Some("sim-secret"))
        .form(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh.as_str()),
            ("client_id", "sim-client"),
            ("client_secret", "sim-secret"),
        ]);
    assert_eq!(raw(&sim, both).await.0, 400);
    let json = client
        .post(sim.token_url())
        .basic_auth("sim-client", Some("sim-secret"))
        .json(&serde_json::json!({"grant_type": "refresh_token", "refresh_token": refresh}));
    assert_eq!(raw(&sim, json).await.0, 415);
    let secret_in_body = client.post(sim.token_url()).form(&[
        ("grant_type", "refresh_token"),
        ("refresh_token", refresh.as_str()),
        ("client_id", "sim-client"),
        ("client_secret", "sim-secret"),
    ]);
    assert_eq!(raw(&sim, secret_in_body).await.0, 400);
    assert_eq!(
        sim.counters().refreshes,
        0,
        "none of these touched the grant"
    );

    // Single use: the second presentation of one refresh token revokes the grant.
    let proper = || {
        client
            .post(sim.token_url())
            .basic_auth("sim-client", Some("sim-secret"))
            .form(&[
                ("grant_type", "refresh_token"),
                ("refresh_token", refresh.as_str()),
            ])
    };
    assert_eq!(raw(&sim, proper()).await.0, 200);
    let (status, body) = raw(&sim, proper()).await;
    assert_eq!(status, 400);
    assert!(body.contains("invalid_grant"), "{body}");
    assert_eq!(sim.counters().reuse_attempts, 1);
    assert_eq!(sim.counters().revoked_grants, 1);
}

#[tokio::test]
async fn lucid_mode_wants_json_with_credentials_in_the_body() {
    let sim = Simulator::builder(Mode::Lucid).start().await.unwrap();
    let refresh = sim.issue_grant();
    assert!(refresh.starts_with("oauth2-"));
    let client = reqwest::Client::new();
    let form = client.post(sim.token_url()).form(&[
        ("grant_type", "refresh_token"),
        ("refresh_token", refresh.as_str()),
        ("client_id", "sim-client"),
        ("client_secret", "sim-secret"),
    ]);
    assert_eq!(raw(&sim, form).await.0, 400);
    let basic = client
        .post(sim.token_url())
        .basic_auth("sim-client", Some("sim-secret"))
        .json(&serde_json::json!({"grant_type": "refresh_token", "refresh_token": refresh}));
    assert_eq!(raw(&sim, basic).await.0, 401);
    let proper = client.post(sim.token_url()).json(&serde_json::json!({
        "grant_type": "refresh_token",
        "refresh_token": refresh,
        "client_id": "sim-client",
        "client_secret": "sim-secret",
    }));
    let (status, body) = raw(&sim, proper).await;
    assert_eq!(status, 200, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["token_type"], "bearer");
    assert!(
        body["expires"].as_i64().unwrap() > 1_000_000_000_000,
        "epoch ms"
    );
    assert!(body["scopes"].is_array());
    assert!(body["user_id"].is_number());
}

#[tokio::test]
async fn highq_mode_answers_xml_with_string_numbers_by_default() {
    let sim = Simulator::builder(Mode::HighQ).start().await.unwrap();
    let refresh = sim.issue_grant();
    let request = reqwest::Client::new().post(sim.token_url()).form(&[
        ("grant_type", "refresh_token"),
        ("refresh_token", refresh.as_str()),
        ("client_id", "sim-client"),
        ("client_secret", "sim-secret"),
    ]);
    let response = request.send().await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .contains("xml")
    );
    let body = response.text().await.unwrap();
    assert!(body.contains("<TokenResponse>"), "{body}");
    assert!(body.contains("<refresh_token_expires_in>31536000</refresh_token_expires_in>"));
}
