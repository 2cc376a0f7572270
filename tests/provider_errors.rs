//! Error mapping per provider: every answer of the token endpoint becomes the right typed
//! error, and no error, formatted either way, shows the refresh token or the client secret
//! (even when the provider echoes them back).

use std::time::Duration;

use time::OffsetDateTime;
use time::macros::datetime;
use tokenkeeper::{
    ClientCredentials, Error, ManualClock, ProviderProfile, RefreshingTokenSource, TransientKind,
};
use url::Url;
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

const T0: OffsetDateTime = datetime!(2026-03-01 12:00 UTC);
const CLIENT_SECRET: &str = "the-client-secret-4d2c";
const REFRESH_TOKEN: &str = "oauth2-the-refresh-token-e5b0";

#[derive(Clone, Copy, Debug)]
enum Provider {
    Lucid,
    HighQ,
    Autodesk,
}

const ALL: [Provider; 3] = [Provider::Lucid, Provider::HighQ, Provider::Autodesk];

impl Provider {
    fn profile(self, server: &MockServer) -> ProviderProfile {
        let base = Url::parse(&format!("{}/inst/", server.uri())).unwrap();
        let token = base.join("api/oauth2/token").unwrap();
        match self {
            Provider::Lucid => ProviderProfile::lucid().with_token_url(token),
            Provider::HighQ => ProviderProfile::highq(base),
            Provider::Autodesk => ProviderProfile::autodesk().with_token_url(token),
        }
    }
}

/// An error description that echoes both secrets, as a careless provider might.
fn echoing(code: &str) -> String {
    format!(
        r#"{{"error":"{code}","error_description":"token {REFRESH_TOKEN} for secret {CLIENT_SECRET} refused"}}"#
    )
}

fn json(status: u16, body: String) -> ResponseTemplate {
    ResponseTemplate::new(status).set_body_raw(body.into_bytes(), "application/json")
}

/// Serves `response` once to one refresh through the public API, and returns the error.
async fn error_for(provider: Provider, response: ResponseTemplate) -> Error {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(response)
        .expect(1)
        .mount(&server)
        .await;
    let source = RefreshingTokenSource::builder(
        provider.profile(&server),
        ClientCredentials::new("client-id", CLIENT_SECRET),
    )
    .clock(ManualClock::new(T0))
    .initial_refresh_token(REFRESH_TOKEN)
    .build()
    .unwrap();
    let error = source
        .access_token()
        .await
        .expect_err("the token endpoint refused");
    assert_no_secret(&error);
    error
}

fn assert_no_secret(error: &Error) {
    for text in [format!("{error}"), format!("{error:?}")] {
        assert!(
            !text.contains(REFRESH_TOKEN),
            "refresh token leaked: {text}"
        );
        assert!(
            !text.contains(CLIENT_SECRET),
            "client secret leaked: {text}"
        );
    }
}

fn client_rejected_status(error: &Error) -> Option<u16> {
    match error {
        Error::ClientRejected { status, .. } => Some(*status),
        _ => None,
    }
}

fn transient_kind(error: &Error) -> Option<TransientKind> {
    match error {
        Error::Transient { kind, .. } => Some(*kind),
        _ => None,
    }
}

#[tokio::test]
async fn invalid_grant_means_reauthorization_for_every_provider() {
    for provider in ALL {
        let error = error_for(provider, json(400, echoing("invalid_grant"))).await;
        assert!(error.needs_reauthorization(), "{provider:?}: {error:?}");
        assert!(format!("{error}").contains("invalid_grant"), "{error}");
    }
}

#[tokio::test]
async fn invalid_grant_in_a_highq_xml_body_means_reauthorization() {
    let body = "<?xml version=\"1.0\"?><ErrorResponse><error>invalid_grant</error>\
                <error_description>expired &amp; gone</error_description></ErrorResponse>";
    let error = error_for(
        Provider::HighQ,
        ResponseTemplate::new(400).set_body_raw(body.as_bytes().to_vec(), "application/xml"),
    )
    .await;
    assert!(error.needs_reauthorization(), "{error:?}");
    assert!(format!("{error}").contains("expired & gone"), "{error}");
}

#[tokio::test]
async fn invalid_client_with_401_and_403_means_client_rejected_for_every_provider() {
    for provider in ALL {
        for status in [401, 403] {
            let error = error_for(provider, json(status, echoing("invalid_client"))).await;
            assert_eq!(
                client_rejected_status(&error),
                Some(status),
                "{provider:?}: {error:?}"
            );
        }
    }
}

#[tokio::test]
async fn lucid_401_and_403_without_a_body_mean_client_rejected_not_reauthorization() {
    for status in [401, 403] {
        let error = error_for(Provider::Lucid, ResponseTemplate::new(status)).await;
        assert_eq!(client_rejected_status(&error), Some(status), "{error:?}");
        assert!(!error.needs_reauthorization());
    }
}

#[tokio::test]
async fn autodesk_error_shape_is_read() {
    // AUTH-003: the client secret does not match; AUTH-001 comes with 403.
    for (status, code) in [(401, "AUTH-003"), (403, "AUTH-001")] {
        let body = format!(
            r#"{{"developerMessage":"The client_secret {CLIENT_SECRET} does not match","userMessage":" ","errorCode":"{code}","more info":"https://aps.autodesk.com/"}}"#
        );
        let error = error_for(Provider::Autodesk, json(status, body)).await;
        assert_eq!(client_rejected_status(&error), Some(status), "{error:?}");
        assert!(format!("{error}").contains(code), "{error}");
    }
    // An Autodesk-shaped error that is not about the client: the request was refused.
    let body = r#"{"developerMessage":"One or more requested scopes are invalid.","userMessage":"","errorCode":"AUTH-004"}"#;
    let error = error_for(Provider::Autodesk, json(400, body.to_owned())).await;
    assert!(
        matches!(&error, Error::RequestRejected { status: 400, provider } if provider.code == "AUTH-004"),
        "{error:?}"
    );
}

#[tokio::test]
async fn rate_limits_are_transient_with_the_provider_s_delay() {
    for provider in [Provider::Lucid, Provider::Autodesk, Provider::HighQ] {
        let error = error_for(
            provider,
            json(429, echoing("rate_limited")).insert_header("Retry-After", "120"),
        )
        .await;
        assert_eq!(
            transient_kind(&error),
            Some(TransientKind::RateLimited),
            "{error:?}"
        );
        assert_eq!(error.retry_after(), Some(Duration::from_secs(120)));
    }
}

#[tokio::test]
async fn highq_rate_limit_reset_is_epoch_seconds() {
    let reset = (T0 + time::Duration::minutes(5)).unix_timestamp();
    let body = "<?xml version=\"1.0\"?><error><code>429</code>\
                <message>Rate limit exceeded</message></error>";
    let error = error_for(
        Provider::HighQ,
        ResponseTemplate::new(429)
            .set_body_raw(body.as_bytes().to_vec(), "application/xml")
            .insert_header("X-Ratelimit-Reset", reset.to_string().as_str()),
    )
    .await;
    assert_eq!(transient_kind(&error), Some(TransientKind::RateLimited));
    assert_eq!(error.retry_after(), Some(Duration::from_secs(300)));
}

#[tokio::test]
async fn server_errors_and_html_error_pages_are_transient() {
    for provider in ALL {
        for status in [500, 502, 503] {
            let html = "<!DOCTYPE html><html><head><title>Bad Gateway</title></head>\
                        <body><h1>Service unavailable</h1><br></body></html>";
            let error = error_for(
                provider,
                ResponseTemplate::new(status).set_body_raw(html.as_bytes().to_vec(), "text/html"),
            )
            .await;
            assert_eq!(
                transient_kind(&error),
                Some(TransientKind::ServerError(status)),
                "{provider:?}: {error:?}"
            );
            assert!(error.is_transient());
        }
    }
}

#[tokio::test]
async fn unreadable_success_bodies_are_invalid_responses() {
    let html = "<html><body>Welcome! Please sign in.</body></html>";
    for provider in ALL {
        for response in [
            ResponseTemplate::new(200),
            ResponseTemplate::new(200).set_body_raw(html.as_bytes().to_vec(), "text/html"),
            json(200, format!(r#"{{"refresh_token":"{REFRESH_TOKEN}"}}"#)),
            json(200, r#"{"access_token":"cut in hal"#.to_owned()),
        ] {
            let error = error_for(provider, response).await;
            assert!(
                matches!(error, Error::InvalidResponse { .. }),
                "{provider:?}: {error:?}"
            );
        }
    }
}

#[tokio::test]
async fn a_200_carrying_an_oauth_error_is_classified_as_that_error() {
    for provider in ALL {
        let error = error_for(provider, json(200, echoing("invalid_grant"))).await;
        assert!(error.needs_reauthorization(), "{provider:?}: {error:?}");
    }
}

#[tokio::test]
async fn empty_and_html_4xx_bodies_are_classified_by_status() {
    for provider in ALL {
        let error = error_for(provider, ResponseTemplate::new(400)).await;
        assert!(
            matches!(error, Error::InvalidResponse { .. }),
            "{provider:?}: {error:?}"
        );
        let error = error_for(
            provider,
            ResponseTemplate::new(401).set_body_raw(b"<html>denied</html>".to_vec(), "text/html"),
        )
        .await;
        assert_eq!(client_rejected_status(&error), Some(401), "{provider:?}");
    }
}

#[tokio::test]
async fn other_rfc_errors_are_request_rejections() {
    for provider in ALL {
        let error = error_for(provider, json(400, echoing("invalid_request"))).await;
        assert!(
            matches!(&error, Error::RequestRejected { status: 400, provider } if provider.code == "invalid_request"),
            "{provider:?}: {error:?}"
        );
    }
}

/// An echoed secret is scrubbed before the text is cut to length: a secret straddling the
/// cut, or echoed percent-encoded, leaves no part of itself behind.
#[tokio::test]
async fn echoed_secrets_are_scrubbed_before_the_text_is_cut() {
    for offset in [185, 190, 195, 199] {
        let description = format!("{}{REFRESH_TOKEN} trailing", "x".repeat(offset));
        let body =
            serde_json::json!({"error": "invalid_request", "error_description": description});
        let error = error_for(Provider::Lucid, json(400, body.to_string())).await;
        let shown = format!("{error} {error:?}");
        // Any 12-character piece of the token would be a leak.
        for piece in REFRESH_TOKEN.as_bytes().windows(12) {
            let piece = std::str::from_utf8(piece).unwrap();
            assert!(
                !shown.contains(piece),
                "offset {offset}: {piece} leaked in {shown}"
            );
        }
    }
    let encoded: String = url::form_urlencoded::byte_serialize(CLIENT_SECRET.as_bytes()).collect();
    let percent: String = CLIENT_SECRET
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    for echoed in [encoded, percent] {
        let body = serde_json::json!({"error": "invalid_client", "error_description": format!("client secret {echoed} refused")});
        let error = error_for(Provider::Lucid, json(401, body.to_string())).await;
        let shown = format!("{error} {error:?}");
        assert!(!shown.contains(&echoed), "{shown}");
    }
}
