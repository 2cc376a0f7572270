//! Autodesk Platform Services v2's refresh wire: a form body; confidential clients use
//! `Authorization: Basic` and put no credentials in the body; public clients send
//! `client_id` alone; never both; an optional `scope`; the returned refresh token is kept.

use std::collections::BTreeMap;

use base64::Engine;
use serde_json::json;
use time::macros::datetime;
use time::{Duration, OffsetDateTime};
use tokenkeeper::{
    ClientCredentials, Error, ManualClock, MemoryStore, ProviderProfile, RefreshingTokenSource,
    TokenSet,
};
use url::Url;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, Request, ResponseTemplate};

const T0: OffsetDateTime = datetime!(2026-03-01 12:00 UTC);
const CLIENT_ID: &str = "aps-client-id";
const CLIENT_SECRET: &str = "aps-client-secret-5e71";
const REFRESH_TOKEN: &str = "aps-initial-refresh-91aa";
const TOKEN_PATH: &str = "/authentication/v2/token";

fn documented_response() -> serde_json::Value {
    json!({
        "access_token": "eyJhbGciOi.aps-access.sig",
        "token_type": "Bearer",
        "expires_in": 3599,
        "refresh_token": "aps-refresh-2",
    })
}

async fn server_answering(response: ResponseTemplate) -> MockServer {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(TOKEN_PATH))
        .respond_with(response)
        .expect(1)
        .mount(&server)
        .await;
    server
}

async fn refresh_once(
    server: &MockServer,
    profile: ProviderProfile,
    credentials: ClientCredentials,
) -> (Result<String, Error>, Option<TokenSet>) {
    let store = MemoryStore::new();
    let url = Url::parse(&format!("{}{TOKEN_PATH}", server.uri())).unwrap();
    let source = RefreshingTokenSource::builder(profile.with_token_url(url), credentials)
        .store(store.clone())
        .clock(ManualClock::new(T0))
        .initial_refresh_token(REFRESH_TOKEN)
        .build()
        .unwrap();
    let outcome = source.access_token().await.map(|t| t.secret().to_owned());
    (outcome, store.get("default").map(|v| v.value))
}

/// The one request the server received, checked for what every Autodesk refresh shares.
async fn the_request(server: &MockServer) -> (Request, BTreeMap<String, String>) {
    let requests = server.received_requests().await.unwrap();
    assert_eq!(requests.len(), 1);
    let request = requests.into_iter().next().unwrap();
    assert_eq!(request.method.as_str(), "POST");
    assert_eq!(request.url.path(), TOKEN_PATH);
    assert_eq!(
        request.headers.get("content-type").unwrap(),
        "application/x-www-form-urlencoded"
    );
    let fields = url::form_urlencoded::parse(&request.body)
        .into_owned()
        .collect();
    (request, fields)
}

fn fields(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

#[tokio::test]
async fn confidential_client_uses_basic_and_puts_no_credentials_in_the_body() {
    let server =
        server_answering(ResponseTemplate::new(200).set_body_json(documented_response())).await;
    let (outcome, _) = refresh_once(
        &server,
        ProviderProfile::autodesk(),
        ClientCredentials::new(CLIENT_ID, CLIENT_SECRET),
    )
    .await;
    assert_eq!(outcome.unwrap(), "eyJhbGciOi.aps-access.sig");

    let (request, body) = the_request(&server).await;
    assert_eq!(
        body,
        fields(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", REFRESH_TOKEN)
        ]),
        "no client_id, no client_secret, no scope: exactly these fields"
    );
    let authorization = request
        .headers
        .get("authorization")
        .unwrap()
        .to_str()
        .unwrap();
    let encoded = authorization.strip_prefix("Basic ").unwrap();
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .unwrap();
    assert_eq!(
        String::from_utf8(decoded).unwrap(),
        format!("{CLIENT_ID}:{CLIENT_SECRET}")
    );
}

#[tokio::test]
async fn public_client_sends_its_id_in_the_body_and_no_secret_anywhere() {
    let server =
        server_answering(ResponseTemplate::new(200).set_body_json(documented_response())).await;
    let (outcome, _) = refresh_once(
        &server,
        ProviderProfile::autodesk(),
        ClientCredentials::public(CLIENT_ID),
    )
    .await;
    outcome.unwrap();
    let (request, body) = the_request(&server).await;
    assert!(request.headers.get("authorization").is_none());
    assert_eq!(
        body,
        fields(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", REFRESH_TOKEN),
            ("client_id", CLIENT_ID),
        ])
    );
}

#[tokio::test]
async fn refresh_scope_is_sent_space_separated_and_the_returned_refresh_token_is_kept() {
    let mut response = documented_response();
    response["refresh_token"] = json!("aps-refresh-narrowed");
    let server = server_answering(ResponseTemplate::new(200).set_body_json(response)).await;
    let profile = ProviderProfile::autodesk().with_refresh_scope(["viewables:read", "data:read"]);
    let (_, stored) = refresh_once(
        &server,
        profile,
        ClientCredentials::new(CLIENT_ID, CLIENT_SECRET),
    )
    .await;
    let (request, body) = the_request(&server).await;
    assert!(request.headers.get("authorization").is_some());
    assert_eq!(
        body,
        fields(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", REFRESH_TOKEN),
            ("scope", "viewables:read data:read"),
        ])
    );
    assert_eq!(
        stored.unwrap().refresh_token.unwrap().secret(),
        "aps-refresh-narrowed",
        "narrowing consumes the refresh token: the new one must be kept"
    );
}

#[tokio::test]
async fn documented_response_is_stored_with_its_expiries() {
    let server =
        server_answering(ResponseTemplate::new(200).set_body_json(documented_response())).await;
    let (_, stored) = refresh_once(
        &server,
        ProviderProfile::autodesk(),
        ClientCredentials::new(CLIENT_ID, CLIENT_SECRET),
    )
    .await;
    let stored = stored.unwrap();
    assert_eq!(stored.refresh_token.unwrap().secret(), "aps-refresh-2");
    assert_eq!(stored.token_type.as_deref(), Some("Bearer"));
    assert_eq!(stored.expires_at, Some(T0 + Duration::seconds(3599)));
    assert_eq!(stored.refresh_expires_at, Some(T0 + Duration::days(15)));
}

#[tokio::test]
async fn id_token_is_never_kept_and_unknown_fields_are() {
    let mut response = documented_response();
    let map = response.as_object_mut().unwrap();
    map.insert("id_token".into(), json!("eyJ.id-token.sig"));
    map.insert("expires_at".into(), json!("not a number"));
    map.insert("new_field".into(), json!(true));
    map.remove("token_type");
    let server = server_answering(ResponseTemplate::new(200).set_body_json(response)).await;
    let (outcome, stored) = refresh_once(
        &server,
        ProviderProfile::autodesk(),
        ClientCredentials::new(CLIENT_ID, CLIENT_SECRET),
    )
    .await;
    outcome.unwrap();
    let stored = stored.unwrap();
    assert!(!stored.extra.contains_key("id_token"));
    assert_eq!(stored.extra.get("new_field"), Some(&json!(true)));
    assert_eq!(stored.token_type, None);
    assert_eq!(
        stored.refresh_token.unwrap().secret(),
        "aps-refresh-2",
        "a malformed expiry field must not cost the rotated refresh token"
    );
}

#[tokio::test]
async fn a_missing_refresh_token_keeps_the_old_one() {
    let mut response = documented_response();
    response.as_object_mut().unwrap().remove("refresh_token");
    let server = server_answering(ResponseTemplate::new(200).set_body_json(response)).await;
    let (_, stored) = refresh_once(
        &server,
        ProviderProfile::autodesk(),
        ClientCredentials::new(CLIENT_ID, CLIENT_SECRET),
    )
    .await;
    assert_eq!(
        stored.unwrap().refresh_token.unwrap().secret(),
        REFRESH_TOKEN
    );
}

#[test]
fn autodesk_profile_facts() {
    let profile = ProviderProfile::autodesk();
    assert_eq!(
        profile.token_url.as_str(),
        "https://developer.api.autodesk.com/authentication/v2/token"
    );
    assert_eq!(profile.expired_token_statuses, vec![401]);
    assert!(!profile.refresh_invalidates_access_token);
    assert!(ProviderProfile::lucid().refresh_invalidates_access_token);
}
