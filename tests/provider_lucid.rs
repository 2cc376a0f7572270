//! Lucid's refresh wire, exactly as providers.md documents it: a JSON body with the client
//! credentials, `expires_in` seconds plus `expires` epoch milliseconds, a `scopes` array,
//! lowercase `bearer`, `user_id` / `account_id`, 401 or 403 for rejected client credentials.

use std::collections::BTreeMap;

use serde_json::{Value, json};
use time::macros::datetime;
use time::{Duration, OffsetDateTime};
use tokenkeeper::{
    ClientCredentials, Error, ManualClock, MemoryStore, ProviderProfile, RefreshingTokenSource,
    TokenSet,
};
use url::Url;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

const T0: OffsetDateTime = datetime!(2026-03-01 12:00 UTC);
const CLIENT_ID: &str = "lucid-client-id";
const CLIENT_SECRET: &str = "lucid-client-secret-3f9a";
const REFRESH_TOKEN: &str = "oauth2-initial-refresh-7c1e";

fn epoch_ms(at: OffsetDateTime) -> i64 {
    i64::try_from(at.unix_timestamp_nanos() / 1_000_000).unwrap()
}

/// The response documented by Lucid, with `expires` one hour after `T0`.
fn documented_response() -> Value {
    json!({
        "access_token": "oauth2-new-access",
        "refresh_token": "oauth2-new-refresh",
        "expires_in": 3600,
        "expires": epoch_ms(T0 + Duration::hours(1)),
        "scopes": ["lucidchart.document.content", "offline_access"],
        "token_type": "bearer",
        "client_id": CLIENT_ID,
        "user_id": 341,
    })
}

async fn server_answering(response: ResponseTemplate) -> MockServer {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/oauth2/token"))
        .respond_with(response)
        .expect(1)
        .mount(&server)
        .await;
    server
}

/// One `access_token()` call through the public API against `server`; returns the
/// outcome and what the store holds afterwards.
async fn refresh_once(server: &MockServer) -> (Result<String, Error>, Option<TokenSet>) {
    let store = MemoryStore::new();
    let url = Url::parse(&format!("{}/oauth2/token", server.uri())).unwrap();
    let source = RefreshingTokenSource::builder(
        ProviderProfile::lucid().with_token_url(url),
        ClientCredentials::new(CLIENT_ID, CLIENT_SECRET),
    )
    .store(store.clone())
    .clock(ManualClock::new(T0))
    .initial_refresh_token(REFRESH_TOKEN)
    .build()
    .unwrap();
    let outcome = source.access_token().await.map(|t| t.secret().to_owned());
    (outcome, store.get("default").map(|v| v.value))
}

#[tokio::test]
async fn refresh_request_is_exactly_the_documented_json_body() {
    let server =
        server_answering(ResponseTemplate::new(200).set_body_json(documented_response())).await;
    let (outcome, _) = refresh_once(&server).await;
    assert_eq!(outcome.unwrap(), "oauth2-new-access");

    let requests = server.received_requests().await.unwrap();
    assert_eq!(requests.len(), 1);
    let request = &requests[0];
    assert_eq!(request.method.as_str(), "POST");
    assert_eq!(request.url.path(), "/oauth2/token");
    let content_type = request
        .headers
        .get("content-type")
        .unwrap()
        .to_str()
        .unwrap();
    assert!(
        content_type.starts_with("application/json"),
        "{content_type}"
    );
    assert!(
        request.headers.get("authorization").is_none(),
        "Lucid takes the client credentials in the body only"
    );
    let body: BTreeMap<String, Value> = serde_json::from_slice(&request.body).unwrap();
    let expected: BTreeMap<String, Value> = [
        ("grant_type", "refresh_token"),
        ("refresh_token", REFRESH_TOKEN),
        ("client_id", CLIENT_ID),
        ("client_secret", CLIENT_SECRET),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), Value::from(v)))
    .collect();
    assert_eq!(
        body, expected,
        "exactly these fields: no scope, nothing extra"
    );
}

#[tokio::test]
async fn documented_response_is_stored_with_absolute_expiries_scopes_and_ids() {
    let server =
        server_answering(ResponseTemplate::new(200).set_body_json(documented_response())).await;
    let (outcome, stored) = refresh_once(&server).await;
    assert_eq!(outcome.unwrap(), "oauth2-new-access");
    let stored = stored.unwrap();
    assert_eq!(
        stored.refresh_token.as_ref().unwrap().secret(),
        "oauth2-new-refresh"
    );
    assert_eq!(
        stored.token_type.as_deref(),
        Some("bearer"),
        "kept lowercase"
    );
    assert_eq!(stored.expires_at, Some(T0 + Duration::hours(1)));
    assert_eq!(
        stored.refresh_expires_at,
        Some(T0 + Duration::days(180)),
        "a rotated Lucid refresh token lives 180 days"
    );
    assert_eq!(
        stored.scopes,
        vec!["lucidchart.document.content", "offline_access"]
    );
    assert_eq!(stored.extra.get("user_id"), Some(&json!(341)));
    assert_eq!(stored.extra.get("client_id"), Some(&json!(CLIENT_ID)));
}

#[tokio::test]
async fn account_tokens_keep_account_id() {
    let mut body = documented_response();
    let map = body.as_object_mut().unwrap();
    map.remove("user_id");
    map.insert("account_id".into(), json!(9001));
    let server = server_answering(ResponseTemplate::new(200).set_body_json(body)).await;
    let (_, stored) = refresh_once(&server).await;
    let stored = stored.unwrap();
    assert_eq!(stored.extra.get("account_id"), Some(&json!(9001)));
}

#[tokio::test]
async fn the_earlier_of_expires_and_expires_in_wins() {
    let mut body = documented_response();
    body["expires"] = json!(epoch_ms(T0 + Duration::minutes(20)));
    let server = server_answering(ResponseTemplate::new(200).set_body_json(body)).await;
    let (_, stored) = refresh_once(&server).await;
    assert_eq!(stored.unwrap().expires_at, Some(T0 + Duration::minutes(20)));

    let mut body = documented_response();
    body["expires_in"] = json!(600);
    let server = server_answering(ResponseTemplate::new(200).set_body_json(body)).await;
    let (_, stored) = refresh_once(&server).await;
    assert_eq!(stored.unwrap().expires_at, Some(T0 + Duration::minutes(10)));
}

#[tokio::test]
async fn expires_alone_in_epoch_milliseconds_is_enough() {
    let mut body = documented_response();
    body.as_object_mut().unwrap().remove("expires_in");
    body["expires"] = json!(epoch_ms(T0 + Duration::minutes(45)).to_string());
    let server = server_answering(ResponseTemplate::new(200).set_body_json(body)).await;
    let (_, stored) = refresh_once(&server).await;
    assert_eq!(stored.unwrap().expires_at, Some(T0 + Duration::minutes(45)));
}

#[tokio::test]
async fn numbers_as_strings_parse() {
    let mut body = documented_response();
    body["expires_in"] = json!("1800");
    body["expires"] = json!(epoch_ms(T0 + Duration::hours(1)).to_string());
    let server = server_answering(ResponseTemplate::new(200).set_body_json(body)).await;
    let (_, stored) = refresh_once(&server).await;
    assert_eq!(stored.unwrap().expires_at, Some(T0 + Duration::minutes(30)));
}

#[tokio::test]
async fn a_response_without_refresh_token_keeps_the_old_one() {
    let mut body = documented_response();
    body.as_object_mut().unwrap().remove("refresh_token");
    let server = server_answering(ResponseTemplate::new(200).set_body_json(body)).await;
    let (outcome, stored) = refresh_once(&server).await;
    assert_eq!(outcome.unwrap(), "oauth2-new-access");
    assert_eq!(
        stored.unwrap().refresh_token.unwrap().secret(),
        REFRESH_TOKEN,
        "the store must still hold the refresh token that was presented"
    );
}

#[tokio::test]
async fn missing_token_type_and_unknown_fields_are_accepted() {
    let mut body = documented_response();
    let map = body.as_object_mut().unwrap();
    map.remove("token_type");
    map.insert("new_field".into(), json!({"nested": [1, 2]}));
    let server = server_answering(ResponseTemplate::new(200).set_body_json(body)).await;
    let (outcome, stored) = refresh_once(&server).await;
    assert_eq!(outcome.unwrap(), "oauth2-new-access");
    let stored = stored.unwrap();
    assert_eq!(stored.token_type, None);
    assert_eq!(
        stored.extra.get("new_field"),
        Some(&json!({"nested": [1, 2]}))
    );
}

#[tokio::test]
async fn a_json_body_sent_with_a_wrong_content_type_is_still_read() {
    let server = server_answering(
        ResponseTemplate::new(200)
            .set_body_string(documented_response().to_string())
            .insert_header("content-type", "text/plain"),
    )
    .await;
    let (outcome, _) = refresh_once(&server).await;
    assert_eq!(outcome.unwrap(), "oauth2-new-access");
}

/// The legacy documentation refreshes at `users.lucidchart.com/oauth2/refreshToken` and
/// exchanges codes at `/oauth2/token`: the refresh goes to the former, with the same JSON
/// body, and nothing goes to the latter.
#[tokio::test]
async fn the_legacy_profile_refreshes_at_refresh_token_with_the_same_body() {
    let legacy = ProviderProfile::lucid_legacy();
    assert_eq!(
        legacy.token_url.as_str(),
        "https://users.lucidchart.com/oauth2/refreshToken"
    );
    assert_eq!(
        legacy.code_exchange_url.as_ref().map(Url::as_str),
        Some("https://users.lucidchart.com/oauth2/token")
    );
    assert_eq!(
        ProviderProfile::lucid().token_url.as_str(),
        "https://api.lucid.co/oauth2/token"
    );
    assert_eq!(legacy.body_encoding, ProviderProfile::lucid().body_encoding);

    // The same profile, moved to the mock server with its paths kept.
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/oauth2/refreshToken"))
        .respond_with(ResponseTemplate::new(200).set_body_json(documented_response()))
        .expect(1)
        .mount(&server)
        .await;
    let moved = |url: &Url| {
        let mut moved = Url::parse(&server.uri()).unwrap();
        moved.set_path(url.path());
        moved
    };
    let mut profile = legacy.clone();
    profile.token_url = moved(&legacy.token_url);
    profile.code_exchange_url = legacy.code_exchange_url.as_ref().map(moved);
    let source =
        RefreshingTokenSource::builder(profile, ClientCredentials::new(CLIENT_ID, CLIENT_SECRET))
            .clock(ManualClock::new(T0))
            .initial_refresh_token(REFRESH_TOKEN)
            .build()
            .unwrap();
    assert_eq!(
        source.access_token().await.unwrap().secret(),
        "oauth2-new-access"
    );
    let requests = server.received_requests().await.unwrap();
    assert_eq!(
        requests.len(),
        1,
        "one refresh, at /oauth2/refreshToken only"
    );
    let body: Value = serde_json::from_slice(&requests[0].body).unwrap();
    assert_eq!(
        body,
        json!({
            "grant_type": "refresh_token",
            "refresh_token": REFRESH_TOKEN,
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
        })
    );
}
