//! The simulator's consent endpoints, driven over HTTP: the auto-consenting authorization
//! endpoint and the code exchange (PKCE S256, single-use codes, exact redirect URIs), the
//! device authorization grant (RFC 8628) and token revocation (RFC 7009), in each mode's
//! wire format.

use std::collections::HashMap;
use std::time::Duration;

use reqwest::redirect::Policy;
use serde_json::Value;
use tokenkeeper::ManualClock;
use tokenkeeper::testing::{Mode, Simulator};
use url::Url;

const REDIRECT_URI: &str = "http://127.0.0.1:53682/callback";
/// A verifier and its S256 challenge, computed independently (Python's hashlib).
const VERIFIER: &str = "tokenkeeper-simulator-test-verifier-0123456789abcdef";
const CHALLENGE: &str = "FMxdQP2i1LJPShb3fK7ObInaQCywkfMQyCOdxPN7DjI";
const OTHER_VERIFIER: &str = "another-verifier-for-autodesk-0123456789ABCDEFGH";
const DEVICE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(Policy::none())
        .build()
        .unwrap()
}

fn query_of(url: &str) -> HashMap<String, String> {
    Url::parse(url)
        .unwrap()
        .query_pairs()
        .into_owned()
        .collect()
}

/// Sends an authorization request; returns the status and the `Location` header.
async fn authorize_raw(sim: &Simulator, pairs: &[(&str, &str)]) -> (u16, Option<String>) {
    let mut url = sim.authorization_url();
    url.query_pairs_mut().extend_pairs(pairs);
    let response = client().get(url).send().await.unwrap();
    let location = response
        .headers()
        .get("location")
        .map(|v| v.to_str().unwrap().to_owned());
    (response.status().as_u16(), location)
}

/// A valid authorization request plus `extra`; asserts a redirect and returns its query.
async fn authorize(sim: &Simulator, extra: &[(&str, &str)]) -> HashMap<String, String> {
    let mut pairs = vec![
        ("response_type", "code"),
        ("client_id", "sim-client"),
        ("redirect_uri", REDIRECT_URI),
    ];
    pairs.extend_from_slice(extra);
    let (status, location) = authorize_raw(sim, &pairs).await;
    assert_eq!(status, 302, "the authorization endpoint redirects");
    let location = location.expect("a Location header");
    assert!(
        location.starts_with(&format!("{REDIRECT_URI}?")),
        "redirects to the redirect URI: {location}"
    );
    query_of(&location)
}

/// Authorizes with the PKCE challenge and returns the code.
async fn code_with_pkce(sim: &Simulator) -> String {
    let query = authorize(
        sim,
        &[
            ("code_challenge", CHALLENGE),
            ("code_challenge_method", "S256"),
        ],
    )
    .await;
    query["code"].clone()
}

/// POSTs a form (client credentials in the body, as generic mode wants) to `url`.
async fn post_form(url: Url, pairs: &[(&str, &str)]) -> (u16, Value) {
    let mut form = vec![("client_id", "sim-client"), ("client_secret", "sim-secret")];
    form.extend_from_slice(pairs);
    let response = client().post(url).form(&form).send().await.unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

async fn exchange(
    sim: &Simulator,
    code: &str,
    redirect_uri: &str,
    verifier: Option<&str>,
) -> (u16, Value) {
    let mut pairs = vec![
        ("grant_type", "authorization_code"),
        ("code", code),
        ("redirect_uri", redirect_uri),
    ];
    if let Some(verifier) = verifier {
        pairs.push(("code_verifier", verifier));
    }
    post_form(sim.token_url(), &pairs).await
}

async fn refresh(sim: &Simulator, refresh_token: &str) -> (u16, Value) {
    post_form(
        sim.token_url(),
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh_token),
        ],
    )
    .await
}

async fn api_status(sim: &Simulator, access_token: &str) -> u16 {
    client()
        .get(sim.api_url())
        .bearer_auth(access_token)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

fn error_of(body: &Value) -> &str {
    body["error"].as_str().unwrap_or("<none>")
}

fn token(body: &Value, field: &str) -> String {
    body[field]
        .as_str()
        .unwrap_or_else(|| panic!("{field} in {body}"))
        .to_owned()
}

#[tokio::test]
async fn authorization_code_with_pkce_issues_working_tokens() {
    let sim = Simulator::builder(Mode::Generic).start().await.unwrap();
    let query = authorize(
        &sim,
        &[
            ("state", "st-123"),
            ("scope", "data:read"),
            ("code_challenge", CHALLENGE),
            ("code_challenge_method", "S256"),
        ],
    )
    .await;
    assert_eq!(query.get("state").map(String::as_str), Some("st-123"));
    let code = &query["code"];
    assert_eq!(sim.counters().authorizations, 1);
    assert_eq!(sim.grants(), 0, "no grant before the exchange");

    let (status, body) = exchange(&sim, code, REDIRECT_URI, Some(VERIFIER)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["scope"], "data:read", "the code's scopes");
    let counters = sim.counters();
    assert_eq!(counters.code_exchanges, 1);
    assert_eq!(counters.pkce_verified, 1);
    assert_eq!(counters.refreshes, 0, "an exchange is not a refresh");
    assert_eq!(sim.grants(), 1);
    assert_eq!(api_status(&sim, &token(&body, "access_token")).await, 200);
    let (status, _) = refresh(&sim, &token(&body, "refresh_token")).await;
    assert_eq!(status, 200, "the issued refresh token rotates");
}

#[tokio::test]
async fn code_without_pkce_exchanges_with_default_scopes() {
    let sim = Simulator::builder(Mode::Generic).start().await.unwrap();
    let query = authorize(&sim, &[]).await;
    assert!(!query.contains_key("state"), "no state asked, none echoed");
    let (status, body) = exchange(&sim, &query["code"], REDIRECT_URI, None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["scope"], "data:read data:write");
    assert_eq!(sim.counters().pkce_verified, 0);

    // A verifier for a code issued without a challenge is refused (downgrade).
    let query = authorize(&sim, &[]).await;
    let (status, body) = exchange(&sim, &query["code"], REDIRECT_URI, Some(VERIFIER)).await;
    assert_eq!((status, error_of(&body)), (400, "invalid_grant"));
}

#[tokio::test]
async fn wrong_verifier_or_redirect_uri_is_invalid_grant() {
    let sim = Simulator::builder(Mode::Generic).start().await.unwrap();
    let code = code_with_pkce(&sim).await;

    let (status, body) = exchange(&sim, &code, REDIRECT_URI, Some(OTHER_VERIFIER)).await;
    assert_eq!(
        (status, error_of(&body)),
        (400, "invalid_grant"),
        "wrong verifier"
    );
    let (status, body) = exchange(&sim, &code, REDIRECT_URI, None).await;
    assert_eq!(
        (status, error_of(&body)),
        (400, "invalid_grant"),
        "missing verifier"
    );
    let (status, body) = exchange(&sim, &code, REDIRECT_URI, Some(CHALLENGE)).await;
    assert_eq!(
        (status, error_of(&body)),
        (400, "invalid_grant"),
        "the challenge is not a verifier"
    );
    let (status, body) =
        exchange(&sim, &code, "http://127.0.0.1:53682/other", Some(VERIFIER)).await;
    assert_eq!(
        (status, error_of(&body)),
        (400, "invalid_grant"),
        "wrong redirect_uri"
    );
    let (status, body) = exchange(&sim, "no-such-code", REDIRECT_URI, Some(VERIFIER)).await;
    assert_eq!(
        (status, error_of(&body)),
        (400, "invalid_grant"),
        "unknown code"
    );
    let counters = sim.counters();
    assert_eq!(counters.invalid_grant, 5);
    assert_eq!(counters.pkce_verified, 0);
    assert_eq!(sim.grants(), 0);

    // Failed attempts do not burn the code.
    let (status, body) = exchange(&sim, &code, REDIRECT_URI, Some(VERIFIER)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(sim.counters().pkce_verified, 1);
}

#[tokio::test]
async fn a_code_used_twice_revokes_its_grant() {
    let sim = Simulator::builder(Mode::Generic).start().await.unwrap();
    let code = code_with_pkce(&sim).await;
    let (status, first) = exchange(&sim, &code, REDIRECT_URI, Some(VERIFIER)).await;
    assert_eq!(status, 200, "{first}");
    assert!(!sim.grant_revoked(0));

    let (status, body) = exchange(&sim, &code, REDIRECT_URI, Some(VERIFIER)).await;
    assert_eq!((status, error_of(&body)), (400, "invalid_grant"));
    assert_eq!(sim.counters().code_reuse, 1);
    assert!(
        sim.grant_revoked(0),
        "the grant issued from the code is revoked"
    );
    assert_eq!(sim.grants(), 1, "no second grant");
    assert_eq!(api_status(&sim, &token(&first, "access_token")).await, 401);
    let (status, body) = refresh(&sim, &token(&first, "refresh_token")).await;
    assert_eq!((status, error_of(&body)), (400, "invalid_grant"));
}

#[tokio::test]
async fn codes_expire_by_the_simulator_clock() {
    let clock = ManualClock::starting_now();
    let sim = Simulator::builder(Mode::Generic)
        .clock(clock.clone())
        .code_lifetime(Duration::from_secs(30))
        .start()
        .await
        .unwrap();
    let code = code_with_pkce(&sim).await;
    clock.advance(time::Duration::seconds(31));
    let (status, body) = exchange(&sim, &code, REDIRECT_URI, Some(VERIFIER)).await;
    assert_eq!((status, error_of(&body)), (400, "invalid_grant"));

    let code = code_with_pkce(&sim).await;
    clock.advance(time::Duration::seconds(29));
    let (status, body) = exchange(&sim, &code, REDIRECT_URI, Some(VERIFIER)).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn bad_clients_and_redirect_uris_get_a_page_not_a_redirect() {
    let registered = "http://127.0.0.1:8400/cb";
    let sim = Simulator::builder(Mode::Generic)
        .redirect_uris([registered])
        .start()
        .await
        .unwrap();
    let request = |client_id: &'static str, redirect_uri: &'static str| {
        [
            ("response_type", "code"),
            ("client_id", client_id),
            ("redirect_uri", redirect_uri),
        ]
    };
    for (client_id, redirect_uri) in [
        ("sim-client", "http://127.0.0.1:8400/other"),
        ("sim-client", "http://127.0.0.1:8401/cb"),
        ("sim-client", ""),
        ("other-client", registered),
    ] {
        let (status, location) = authorize_raw(&sim, &request(client_id, redirect_uri)).await;
        assert_eq!(
            (status, location),
            (400, None),
            "{client_id} {redirect_uri}"
        );
    }
    let (status, location) = authorize_raw(&sim, &request("sim-client", registered)).await;
    assert_eq!(status, 302);
    assert!(
        location
            .unwrap()
            .starts_with("http://127.0.0.1:8400/cb?code=")
    );
    assert_eq!(sim.counters().rejected_requests, 4);

    // Nothing registered: loopback http and any https are accepted, other http is not.
    let open = Simulator::builder(Mode::Generic).start().await.unwrap();
    for (redirect_uri, accepted) in [
        ("http://localhost:9000/cb", true),
        ("http://127.0.0.1:9000/", true),
        ("https://app.example.com/oauth/cb", true),
        ("http://app.example.com/cb", false),
        ("http://127.0.0.1:9000/cb#fragment", false),
        ("urn:ietf:wg:oauth:2.0:oob", false),
    ] {
        let (status, _) = authorize_raw(&open, &request("sim-client", redirect_uri)).await;
        assert_eq!(status == 302, accepted, "{redirect_uri}: {status}");
    }
}

#[tokio::test]
async fn protocol_errors_redirect_with_error_and_state() {
    let sim = Simulator::builder(Mode::Generic).start().await.unwrap();
    let query = authorize(
        &sim,
        &[
            ("state", "s1"),
            ("code_challenge", CHALLENGE),
            ("code_challenge_method", "plain"),
        ],
    )
    .await;
    assert_eq!(query["error"], "invalid_request", "plain PKCE is refused");
    assert_eq!(query["state"], "s1");
    assert!(!query.contains_key("code"));

    let query = authorize(&sim, &[("state", "s2"), ("code_challenge", CHALLENGE)]).await;
    assert_eq!(query["error"], "invalid_request", "no method means plain");

    let (status, location) = authorize_raw(
        &sim,
        &[
            ("response_type", "token"),
            ("client_id", "sim-client"),
            ("redirect_uri", REDIRECT_URI),
        ],
    )
    .await;
    assert_eq!(status, 302);
    assert_eq!(
        query_of(&location.unwrap())["error"],
        "unsupported_response_type"
    );
    assert_eq!(sim.counters().authorizations, 0);
}

#[tokio::test]
async fn state_is_omitted_when_the_server_does_not_echo_it() {
    let sim = Simulator::builder(Mode::HighQ)
        .echo_state(false)
        .start()
        .await
        .unwrap();
    let query = authorize(&sim, &[("state", "st-123")]).await;
    assert!(query.contains_key("code"));
    assert!(!query.contains_key("state"), "{query:?}");
}

#[tokio::test]
async fn denied_consent_redirects_with_access_denied() {
    let sim = Simulator::builder(Mode::Generic)
        .deny_consent(true)
        .start()
        .await
        .unwrap();
    let query = authorize(&sim, &[("state", "st-9")]).await;
    assert_eq!(query["error"], "access_denied");
    assert_eq!(query["state"], "st-9");
    assert!(!query.contains_key("code"));
}

#[tokio::test]
async fn the_code_is_appended_to_a_redirect_uri_with_a_query() {
    let sim = Simulator::builder(Mode::Generic).start().await.unwrap();
    let redirect_uri = "http://127.0.0.1:53682/callback?tenant=a";
    let (status, location) = authorize_raw(
        &sim,
        &[
            ("response_type", "code"),
            ("client_id", "sim-client"),
            ("redirect_uri", redirect_uri),
            ("state", "x y"),
        ],
    )
    .await;
    assert_eq!(status, 302);
    let location = location.unwrap();
    assert!(
        location.starts_with("http://127.0.0.1:53682/callback?tenant=a&code="),
        "{location}"
    );
    let query = query_of(&location);
    assert_eq!(query["state"], "x y");
    let (status, body) = exchange(&sim, &query["code"], redirect_uri, None).await;
    assert_eq!(status, 200, "{body}");
}

async fn device_authorize(sim: &Simulator) -> Value {
    let (status, body) = post_form(sim.device_authorization_url(), &[("scope", "data:read")]).await;
    assert_eq!(status, 200, "{body}");
    body
}

async fn poll(sim: &Simulator, device_code: &str) -> (u16, Value) {
    post_form(
        sim.token_url(),
        &[("grant_type", DEVICE_GRANT), ("device_code", device_code)],
    )
    .await
}

#[tokio::test]
async fn device_flow_pending_then_approved() {
    let sim = Simulator::builder(Mode::Generic)
        .device_interval(Duration::from_secs(1))
        .device_code_lifetime(Duration::from_secs(300))
        .start()
        .await
        .unwrap();
    let device = device_authorize(&sim).await;
    assert_eq!(device["interval"], 1);
    assert_eq!(device["expires_in"], 300);
    let user_code = token(&device, "user_code");
    let device_code = token(&device, "device_code");
    let verification_uri = token(&device, "verification_uri");
    assert!(verification_uri.starts_with("http://127.0.0.1:"));
    assert_eq!(
        token(&device, "verification_uri_complete"),
        format!("{verification_uri}?user_code={user_code}")
    );

    let (status, body) = poll(&sim, &device_code).await;
    assert_eq!((status, error_of(&body)), (400, "authorization_pending"));
    assert!(
        sim.approve_device(&user_code.to_lowercase()),
        "case is ignored"
    );
    assert!(!sim.approve_device("ZZZZ-ZZZZ"));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (status, body) = poll(&sim, &device_code).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["scope"], "data:read");
    assert_eq!(api_status(&sim, &token(&body, "access_token")).await, 200);
    let (status, body) = poll(&sim, &device_code).await;
    assert_eq!(
        (status, error_of(&body)),
        (400, "invalid_grant"),
        "one success only"
    );

    let counters = sim.counters();
    assert_eq!(counters.device_authorizations, 1);
    assert_eq!(counters.device_polls, 3);
    assert_eq!(counters.slow_downs, 0);
    assert_eq!(sim.grants(), 1);
}

#[tokio::test]
async fn device_polls_too_early_are_slowed_down() {
    let sim = Simulator::builder(Mode::Generic)
        .device_interval(Duration::from_secs(1))
        .start()
        .await
        .unwrap();
    let device_code = token(&device_authorize(&sim).await, "device_code");
    let (status, body) = poll(&sim, &device_code).await;
    assert_eq!((status, error_of(&body)), (400, "authorization_pending"));
    let (status, body) = poll(&sim, &device_code).await;
    assert_eq!(
        (status, error_of(&body)),
        (400, "slow_down"),
        "polled at once"
    );
    // The interval is now 6 s: a poll 1.1 s later is still too early.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (status, body) = poll(&sim, &device_code).await;
    assert_eq!(
        (status, error_of(&body)),
        (400, "slow_down"),
        "the interval grew"
    );
    assert_eq!(sim.counters().slow_downs, 2);
}

#[tokio::test]
async fn slow_down_next_and_auto_approval() {
    let clock = ManualClock::starting_now();
    let sim = Simulator::builder(Mode::Generic)
        .clock(clock.clone())
        .device_auto_approve_after(2)
        .start()
        .await
        .unwrap();
    let device = device_authorize(&sim).await;
    assert_eq!(device["interval"], 5, "the default interval");
    let device_code = token(&device, "device_code");
    sim.slow_down_next();
    let (status, body) = poll(&sim, &device_code).await;
    assert_eq!((status, error_of(&body)), (400, "slow_down"), "forced");
    clock.advance(time::Duration::seconds(10));
    let (status, body) = poll(&sim, &device_code).await;
    assert_eq!(
        (status, error_of(&body)),
        (400, "authorization_pending"),
        "poll 1 of 2"
    );
    clock.advance(time::Duration::seconds(9));
    let (status, body) = poll(&sim, &device_code).await;
    assert_eq!(
        (status, error_of(&body)),
        (400, "slow_down"),
        "the interval is 10 s since the slow_down"
    );
    clock.advance(time::Duration::seconds(15));
    let (status, body) = poll(&sim, &device_code).await;
    assert_eq!(status, 200, "approved on the second timely poll: {body}");
    assert_eq!(sim.counters().slow_downs, 2);
}

#[tokio::test]
async fn device_codes_expire_and_can_be_denied() {
    let clock = ManualClock::starting_now();
    let sim = Simulator::builder(Mode::Generic)
        .clock(clock.clone())
        .start()
        .await
        .unwrap();
    let device = device_authorize(&sim).await;
    assert_eq!(device["expires_in"], 600, "the default lifetime");
    let device_code = token(&device, "device_code");
    let (status, body) = poll(&sim, &device_code).await;
    assert_eq!((status, error_of(&body)), (400, "authorization_pending"));
    clock.advance(time::Duration::seconds(601));
    let (status, body) = poll(&sim, &device_code).await;
    assert_eq!((status, error_of(&body)), (400, "expired_token"));
    assert!(
        !sim.approve_device(&token(&device, "user_code")),
        "an expired code cannot be approved"
    );

    let device = device_authorize(&sim).await;
    assert!(sim.deny_device(&token(&device, "user_code")));
    let (status, body) = poll(&sim, &token(&device, "device_code")).await;
    assert_eq!((status, error_of(&body)), (400, "access_denied"));
    assert_eq!(sim.grants(), 0);
}

#[tokio::test]
async fn the_device_endpoint_authenticates_the_client() {
    let sim = Simulator::builder(Mode::Generic).start().await.unwrap();
    let response = client()
        .post(sim.device_authorization_url())
        .form(&[("client_id", "sim-client"), ("client_secret", "wrong")])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 401);
    assert_eq!(sim.counters().device_authorizations, 0);

    let public = Simulator::builder(Mode::Generic)
        .client_secret(None)
        .start()
        .await
        .unwrap();
    let response = client()
        .post(public.device_authorization_url())
        .form(&[("client_id", "sim-client")])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
}

#[tokio::test]
async fn revoking_a_refresh_token_kills_the_grant() {
    let sim = Simulator::builder(Mode::Generic).start().await.unwrap();
    let (status, tokens) = refresh(&sim, &sim.issue_grant()).await;
    assert_eq!(status, 200);
    let access_token = token(&tokens, "access_token");
    let refresh_token = token(&tokens, "refresh_token");
    assert_eq!(api_status(&sim, &access_token).await, 200);

    let revocation_url = sim.revocation_url().unwrap();
    assert_eq!(revocation_url.path(), "/oauth2/revoke");
    let (status, _) = post_form(
        revocation_url.clone(),
        &[
            ("token", &refresh_token),
            ("token_type_hint", "refresh_token"),
        ],
    )
    .await;
    assert_eq!(status, 200);
    assert!(sim.grant_revoked(0));
    let (status, body) = refresh(&sim, &refresh_token).await;
    assert_eq!((status, error_of(&body)), (400, "invalid_grant"));
    assert_eq!(api_status(&sim, &access_token).await, 401);

    // Unknown tokens: 200 anyway. Bad client authentication: 401.
    let (status, _) = post_form(revocation_url.clone(), &[("token", "unknown")]).await;
    assert_eq!(status, 200);
    let response = client()
        .post(revocation_url)
        .form(&[
            ("client_id", "sim-client"),
            ("client_secret", "wrong"),
            ("token", &access_token),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 401);
    let body: Value = response.json().await.unwrap();
    assert_eq!(error_of(&body), "invalid_client");
    assert_eq!(sim.counters().revocations, 2);
}

#[tokio::test]
async fn revoking_an_access_token_kills_the_grant() {
    let sim = Simulator::builder(Mode::Generic).start().await.unwrap();
    let first = sim.issue_grant();
    let other = sim.issue_grant();
    let (_, tokens) = refresh(&sim, &first).await;
    let (status, _) = post_form(
        sim.revocation_url().unwrap(),
        &[("token", &token(&tokens, "access_token"))],
    )
    .await;
    assert_eq!(status, 200);
    assert!(sim.grant_revoked(0));
    assert!(!sim.grant_revoked(1), "only that grant");
    assert!(!sim.grant_revoked(7), "no such grant");
    let (status, _) = refresh(&sim, &token(&tokens, "refresh_token")).await;
    assert_eq!(status, 400);
    let (status, _) = refresh(&sim, &other).await;
    assert_eq!(status, 200);
}

async fn lucid_exchange(url: Url, code: &str) -> (u16, Value) {
    let response = client()
        .post(url)
        .json(&serde_json::json!({
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT_URI,
            "client_id": "sim-client",
            "client_secret": "sim-secret",
        }))
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

#[tokio::test]
async fn lucid_exchanges_codes_with_a_json_body() {
    let sim = Simulator::builder(Mode::Lucid).start().await.unwrap();
    assert_eq!(sim.authorization_url().path(), "/oauth2/authorize");
    let query = authorize(
        &sim,
        &[("scope", "lucidchart.document.content offline_access")],
    )
    .await;
    let (status, body) = lucid_exchange(sim.token_url(), &query["code"]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["token_type"], "bearer");
    assert_eq!(
        body["scopes"],
        serde_json::json!(["lucidchart.document.content", "offline_access"])
    );
    assert!(body["expires"].is_i64());
    assert!(token(&body, "access_token").starts_with("oauth2-"));

    // The legacy refresh path takes codes too.
    let legacy = sim.token_url().join("/oauth2/refreshToken").unwrap();
    let query = authorize(&sim, &[]).await;
    let (status, body) = lucid_exchange(legacy, &query["code"]).await;
    assert_eq!(status, 200, "{body}");

    // A form body is refused, as for refresh.
    let query = authorize(&sim, &[]).await;
    let (status, _) = exchange(&sim, &query["code"], REDIRECT_URI, None).await;
    assert_eq!(status, 400);
    assert_eq!(sim.counters().code_exchanges, 2);

    // Revocation: a form body with the client credentials.
    let revocation_url = sim.revocation_url().unwrap();
    assert_eq!(revocation_url.path(), "/oauth2/token/revoke");
    let (status, _) = post_form(revocation_url, &[("token", &token(&body, "refresh_token"))]).await;
    assert_eq!(status, 200);
    assert!(sim.grant_revoked(1));
}

#[tokio::test]
async fn autodesk_exchanges_codes_with_basic_auth() {
    let sim = Simulator::builder(Mode::Autodesk).start().await.unwrap();
    assert_eq!(
        sim.authorization_url().path(),
        "/authentication/v2/authorize"
    );
    let exchange_with = |code: String, basic: bool| {
        let url = sim.token_url();
        async move {
            let mut form = vec![
                ("grant_type", "authorization_code".to_owned()),
                ("code", code),
                ("redirect_uri", REDIRECT_URI.to_owned()),
                ("code_verifier", VERIFIER.to_owned()),
            ];
            let mut request = client().post(url);
            if basic {
                request = request.basic_auth("sim-client", Some("sim-secret"));
            } else {
                form.push(("client_id", "sim-client".into()));
                form.push(("client_secret", "sim-secret".into()));
            }
            let response = request.form(&form).send().await.unwrap();
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.unwrap())
        }
    };
    let code = code_with_pkce(&sim).await;
    let (status, _) = exchange_with(code.clone(), false).await;
    assert_eq!(status, 400, "a confidential client must use Basic");
    let (status, body) = exchange_with(code, true).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 3599);
    assert_eq!(sim.counters().pkce_verified, 1);

    let revocation_url = sim.revocation_url().unwrap();
    assert_eq!(revocation_url.path(), "/authentication/v2/revoke");
    let response = client()
        .post(revocation_url)
        .basic_auth("sim-client", Some("sim-secret"))
        .form(&[
            ("token", token(&body, "access_token").as_str()),
            ("token_type_hint", "access_token"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    assert!(sim.grant_revoked(0));
    assert_eq!(api_status(&sim, &token(&body, "access_token")).await, 401);
}

#[tokio::test]
async fn highq_consents_at_authorize_action_and_cannot_revoke() {
    let sim = Simulator::builder(Mode::HighQ).start().await.unwrap();
    assert_eq!(
        sim.authorization_url().path(),
        "/collaborate/authorize.action"
    );
    assert_eq!(sim.revocation_url(), None);
    let query = authorize(&sim, &[("state", "hq")]).await;
    assert_eq!(query["state"], "hq", "echoed by default");
    let response = client()
        .post(sim.token_url())
        .form(&[
            ("grant_type", "authorization_code"),
            ("code", query["code"].as_str()),
            ("redirect_uri", REDIRECT_URI),
            ("client_id", "sim-client"),
            ("client_secret", "sim-secret"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let body = response.text().await.unwrap();
    assert!(body.contains("<TokenResponse>"), "HighQ's XML: {body}");
    let response = client()
        .post(sim.token_url().join("/oauth2/revoke").unwrap())
        .form(&[("token", "x")])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 404);
}

#[tokio::test]
async fn profiles_point_at_the_simulator() {
    for mode in [Mode::Generic, Mode::Lucid, Mode::HighQ, Mode::Autodesk] {
        let sim = Simulator::builder(mode).start().await.unwrap();
        let profile = sim.profile();
        assert_eq!(
            profile.authorization_url,
            Some(sim.authorization_url()),
            "{mode:?}"
        );
        assert_eq!(
            profile.device_authorization_url,
            Some(sim.device_authorization_url()),
            "{mode:?}"
        );
        assert_eq!(profile.revocation_url, sim.revocation_url(), "{mode:?}");
        assert_eq!(profile.token_url, sim.token_url(), "{mode:?}");
        profile.validate().unwrap();
    }
}

#[tokio::test]
async fn debug_shows_no_codes_or_tokens() {
    let sim = Simulator::builder(Mode::Generic).start().await.unwrap();
    let query = authorize(&sim, &[]).await;
    let device = device_authorize(&sim).await;
    let debug = format!("{sim:?}");
    assert!(!debug.contains(&query["code"]), "{debug}");
    assert!(!debug.contains(&token(&device, "device_code")), "{debug}");
    assert!(!debug.contains(&token(&device, "user_code")), "{debug}");
}
