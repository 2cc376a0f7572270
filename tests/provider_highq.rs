//! HighQ Collaborate's refresh wire: a form body with the client credentials at
//! `{base}/api/oauth2/token`, `Accept: application/json`, and an XML `<TokenResponse>` or
//! JSON answer read by Content-Type (or by sniffing when the header lies), numbers as
//! strings, `refresh_token_expires_in`.

use std::collections::BTreeMap;

use serde_json::json;
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
const CLIENT_ID: &str = "1234";
const CLIENT_SECRET: &str = "highq-client-secret-88d2";
const REFRESH_TOKEN: &str = "highq-initial-refresh-0b5f";
const TOKEN_PATH: &str = "/collaborate/api/oauth2/token";

/// The documented XML response (with the observed `refresh_token_expires_in`).
const DOCUMENTED_XML: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<TokenResponse>
  <access_token>hq-access-1</access_token>
  <expires_in>18000</expires_in>
  <refresh_token>hq-refresh-2</refresh_token>
  <refresh_token_expires_in>31536000</refresh_token_expires_in>
  <token_type>bearer</token_type>
  <useremail>ada@example.com</useremail>
</TokenResponse>"#;

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

fn xml(body: &str) -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_raw(body.as_bytes().to_vec(), "application/xml")
}

/// One `access_token()` call through the public API, the profile built from the
/// instance base URL as a user would; returns the outcome and what the store holds.
async fn refresh_once(server: &MockServer) -> (Result<String, Error>, Option<TokenSet>) {
    let store = MemoryStore::new();
    // No trailing slash: the profile must add it before joining.
    let base = Url::parse(&format!("{}/collaborate", server.uri())).unwrap();
    let profile = ProviderProfile::highq(base);
    assert_eq!(
        profile.token_url.as_str(),
        format!("{}{TOKEN_PATH}", server.uri())
    );
    let source =
        RefreshingTokenSource::builder(profile, ClientCredentials::new(CLIENT_ID, CLIENT_SECRET))
            .store(store.clone())
            .clock(ManualClock::new(T0))
            .initial_refresh_token(REFRESH_TOKEN)
            .build()
            .unwrap();
    let outcome = source.access_token().await.map(|t| t.secret().to_owned());
    (outcome, store.get("default").map(|v| v.value))
}

#[tokio::test]
async fn refresh_request_is_exactly_the_form_body_with_accept_json() {
    let server = server_answering(xml(DOCUMENTED_XML)).await;
    let (outcome, _) = refresh_once(&server).await;
    assert_eq!(outcome.unwrap(), "hq-access-1");

    let requests = server.received_requests().await.unwrap();
    assert_eq!(requests.len(), 1);
    let request = &requests[0];
    assert_eq!(request.method.as_str(), "POST");
    assert_eq!(request.url.path(), TOKEN_PATH);
    assert_eq!(
        request.headers.get("content-type").unwrap(),
        "application/x-www-form-urlencoded"
    );
    assert_eq!(request.headers.get("accept").unwrap(), "application/json");
    assert!(request.headers.get("authorization").is_none());
    let body: BTreeMap<String, String> = url::form_urlencoded::parse(&request.body)
        .into_owned()
        .collect();
    let expected: BTreeMap<String, String> = [
        ("grant_type", "refresh_token"),
        ("refresh_token", REFRESH_TOKEN),
        ("client_id", CLIENT_ID),
        ("client_secret", CLIENT_SECRET),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    assert_eq!(body, expected, "exactly these fields, nothing extra");
}

#[tokio::test]
async fn documented_xml_response_is_stored_with_string_numbers_read() {
    let server = server_answering(xml(DOCUMENTED_XML)).await;
    let (outcome, stored) = refresh_once(&server).await;
    assert_eq!(outcome.unwrap(), "hq-access-1");
    let stored = stored.unwrap();
    assert_eq!(stored.refresh_token.unwrap().secret(), "hq-refresh-2");
    assert_eq!(stored.expires_at, Some(T0 + Duration::hours(5)));
    assert_eq!(stored.refresh_expires_at, Some(T0 + Duration::days(365)));
    assert_eq!(stored.token_type.as_deref(), Some("bearer"));
    assert_eq!(
        stored.extra.get("useremail"),
        Some(&json!("ada@example.com"))
    );
}

#[tokio::test]
async fn json_response_with_string_numbers_parses() {
    let body = json!({
        "access_token": "hq-access-1",
        "expires_in": "1800",
        "refresh_token": "hq-refresh-2",
        "refresh_token_expires_in": "31536000",
        "token_type": "bearer",
        "useremail": "ada@example.com",
    });
    let server = server_answering(ResponseTemplate::new(200).set_body_json(body)).await;
    let (outcome, stored) = refresh_once(&server).await;
    assert_eq!(outcome.unwrap(), "hq-access-1");
    let stored = stored.unwrap();
    assert_eq!(stored.expires_at, Some(T0 + Duration::minutes(30)));
    assert_eq!(stored.refresh_expires_at, Some(T0 + Duration::days(365)));
}

#[tokio::test]
async fn xml_labelled_as_json_is_sniffed() {
    let server = server_answering(
        ResponseTemplate::new(200)
            .set_body_raw(DOCUMENTED_XML.as_bytes().to_vec(), "application/json"),
    )
    .await;
    let (outcome, _) = refresh_once(&server).await;
    assert_eq!(outcome.unwrap(), "hq-access-1");
}

#[tokio::test]
async fn xml_entities_in_values_are_decoded() {
    let body = "<TokenResponse><access_token>a&amp;b&#x3D;&#61;</access_token>\
                <expires_in>3600</expires_in><refresh_token>r&lt;1&gt;</refresh_token>\
                <useremail>Ada &amp; Bob &apos;x&apos;</useremail></TokenResponse>";
    let server = server_answering(xml(body)).await;
    let (outcome, stored) = refresh_once(&server).await;
    assert_eq!(outcome.unwrap(), "a&b==");
    let stored = stored.unwrap();
    assert_eq!(stored.refresh_token.unwrap().secret(), "r<1>");
    assert_eq!(stored.extra.get("useremail"), Some(&json!("Ada & Bob 'x'")));
}

#[tokio::test]
async fn missing_refresh_token_token_type_and_expiry_use_the_old_token_and_defaults() {
    let body = "<TokenResponse><access_token>hq-access-1</access_token>\
                <refresh_token/><unknown_field>x</unknown_field></TokenResponse>";
    let server = server_answering(xml(body)).await;
    let (outcome, stored) = refresh_once(&server).await;
    assert_eq!(outcome.unwrap(), "hq-access-1");
    let stored = stored.unwrap();
    assert_eq!(stored.refresh_token.unwrap().secret(), REFRESH_TOKEN);
    assert_eq!(stored.token_type, None);
    assert_eq!(
        stored.expires_at,
        Some(T0 + Duration::hours(5)),
        "HighQ's default access-token lifetime is 5 hours"
    );
    assert_eq!(stored.extra.get("unknown_field"), Some(&json!("x")));
}

#[test]
fn highq_profile_facts() {
    let profile = ProviderProfile::highq(Url::parse("https://example.highq.com/acme/").unwrap());
    assert_eq!(
        profile.token_url.as_str(),
        "https://example.highq.com/acme/api/oauth2/token"
    );
    assert_eq!(profile.expired_token_statuses, vec![403]);
    assert_eq!(
        profile.rate_limit_reset_header.as_deref(),
        Some("X-Ratelimit-Reset")
    );
    assert_eq!(
        profile.refresh_token_lifetime,
        Some(std::time::Duration::from_secs(365 * 24 * 3600))
    );
}
