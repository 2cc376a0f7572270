//! No public type that can hold a token or a secret ever shows it when formatted.

use std::time::Duration;

use serde_json::json;
use time::OffsetDateTime;
use tokenkeeper::store::StoreError;
use tokenkeeper::{
    AccessToken, ClientCredentials, ClientSecret, Error, FileStore, MemoryStore, ProviderProfile,
    RefreshToken, RefreshingTokenSource, TokenSet, TokenStore,
};
use url::Url;
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

const ACCESS: &str = "AT-super-secret-access-value";
const REFRESH: &str = "RT-super-secret-refresh-value";
const CLIENT_SECRET: &str = "CS-super-secret-client-value";

fn assert_hidden(what: &str, text: &str) {
    for secret in [ACCESS, REFRESH, CLIENT_SECRET] {
        assert!(!text.contains(secret), "{what} shows a secret: {text}");
    }
}

fn full_set() -> TokenSet {
    let mut set = TokenSet::new(AccessToken::new(ACCESS), OffsetDateTime::now_utc());
    set.refresh_token = Some(RefreshToken::new(REFRESH));
    set.extra.insert("id_token".into(), json!(ACCESS));
    set
}

#[test]
fn secret_types_debug_redacted_and_expose_only_through_secret() {
    let access = AccessToken::new(ACCESS);
    assert_eq!(format!("{access:?}"), "AccessToken([redacted])");
    assert_eq!(access.secret(), ACCESS);
    assert_hidden("RefreshToken", &format!("{:?}", RefreshToken::new(REFRESH)));
    assert_hidden(
        "ClientSecret",
        &format!("{:?}", ClientSecret::new(CLIENT_SECRET)),
    );
    assert_hidden(
        "ClientCredentials",
        &format!("{:?}", ClientCredentials::new("id", CLIENT_SECRET)),
    );
    assert_hidden("TokenSet", &format!("{:?} {:#?}", full_set(), full_set()));
    assert_hidden(
        "Versioned",
        &format!(
            "{:?}",
            tokenkeeper::Versioned {
                value: full_set(),
                version: 1
            }
        ),
    );
}

#[tokio::test]
async fn stores_and_sources_debug_without_secrets() {
    let store = MemoryStore::new();
    store.put("k", full_set());
    assert_hidden("MemoryStore", &format!("{store:?}"));
    let source = RefreshingTokenSource::builder(
        ProviderProfile::lucid(),
        ClientCredentials::new("id", CLIENT_SECRET),
    )
    .store(store)
    .key("k")
    .initial_refresh_token(REFRESH)
    .build()
    .unwrap();
    assert_hidden("RefreshingTokenSource", &format!("{source:?} {source:#?}"));
}

async fn error_from(response: ResponseTemplate) -> Error {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(response)
        .mount(&server)
        .await;
    let mut profile =
        ProviderProfile::generic(Url::parse(&format!("{}/token", server.uri())).unwrap());
    profile.request_timeout = Duration::from_millis(300);
    let source =
        RefreshingTokenSource::builder(profile, ClientCredentials::new("id", CLIENT_SECRET))
            .initial_refresh_token(REFRESH)
            .build()
            .unwrap();
    source.access_token().await.unwrap_err()
}

#[tokio::test]
async fn errors_never_show_a_secret_even_when_the_provider_echoes_it() {
    let echoing = |status: u16, code: &str| {
        ResponseTemplate::new(status).set_body_json(json!({
            "error": code,
            "error_description": format!("bad token {REFRESH} for client secret {CLIENT_SECRET}"),
        }))
    };
    let cases = [
        echoing(400, "invalid_grant"),
        echoing(401, "invalid_client"),
        echoing(400, "invalid_request"),
        ResponseTemplate::new(200).set_body_string(format!(
            "{{\"access_token\": 42, \"refresh_token\": \"{REFRESH}\""
        )),
        ResponseTemplate::new(200)
            .set_body_json(json!({"token_type": "bearer", "refresh_token": REFRESH})),
        ResponseTemplate::new(500).set_body_string(format!("upstream said {REFRESH}")),
        ResponseTemplate::new(400).set_body_string(format!("<html>{REFRESH}</html>")),
        ResponseTemplate::new(200)
            .set_body_json(json!({"access_token": ACCESS}))
            .set_delay(Duration::from_secs(1)),
    ];
    for response in cases {
        let err = error_from(response).await;
        let mut text = format!("{err} | {err:?}");
        let mut source = std::error::Error::source(&err);
        while let Some(cause) = source {
            text.push_str(&format!(" | {cause} | {cause:?}"));
            source = cause.source();
        }
        assert_hidden("Error", &text);
    }
}

#[tokio::test]
async fn a_corrupt_store_file_is_a_typed_error_and_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::new(dir.path());
    let path = store.path_for("k").unwrap();
    let lease = store.lease("k", Duration::from_secs(5)).await.unwrap();
    store.save("k", &full_set(), None, &lease).await.unwrap();
    lease.release().await.unwrap();
    let good = std::fs::read(&path).unwrap();

    for damaged in [
        good[..good.len() / 2].to_vec(),
        b"not json at all".to_vec(),
        Vec::new(),
    ] {
        std::fs::write(&path, &damaged).unwrap();
        let source = RefreshingTokenSource::builder(
            ProviderProfile::generic(Url::parse("https://provider.invalid/token").unwrap()),
            ClientCredentials::new("id", CLIENT_SECRET),
        )
        .store(store.clone())
        .key("k")
        .initial_refresh_token("never-used")
        .build()
        .unwrap();
        let err = source.access_token().await.unwrap_err();
        assert!(
            matches!(err, Error::Storage(StoreError::Corrupt { .. })),
            "{err:?}"
        );
        assert_hidden("corrupt-file error", &format!("{err} {err:?}"));
        assert_eq!(
            std::fs::read(&path).unwrap(),
            damaged,
            "the file is never overwritten"
        );
    }
}

#[cfg(unix)]
#[tokio::test]
async fn store_files_are_private_to_their_owner() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::new(dir.path().join("tokens"));
    let lease = store.lease("k", Duration::from_secs(5)).await.unwrap();
    store.save("k", &full_set(), None, &lease).await.unwrap();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&store.path_for("k").unwrap()), 0o600);
    assert_eq!(mode(store.dir()), 0o700);
}

/// The types this crate added for store faults: a faulty store holding tokens, a token
/// set carrying a write-ahead record, the status of a source with an unsaved rotation,
/// the new store errors.
#[tokio::test]
async fn store_fault_types_debug_without_secrets() {
    use tokenkeeper::RotationInFlight;
    use tokenkeeper::testing::{FaultyStore, StoreFault, StoreOp};
    let store = FaultyStore::new(MemoryStore::new());
    store.get_ref().put("k", full_set());
    store.fail_next(StoreOp::Save, StoreFault::FailAfter);
    assert_hidden("FaultyStore", &format!("{store:?} {store:#?}"));
    let mut marked = full_set();
    marked.rotation = Some(RotationInFlight::new("holder", OffsetDateTime::now_utc()));
    assert_hidden("TokenSet with a record", &format!("{marked:?} {marked:#?}"));
    let source = RefreshingTokenSource::builder(
        ProviderProfile::lucid(),
        ClientCredentials::new("id", CLIENT_SECRET),
    )
    .store(store)
    .key("k")
    .build()
    .unwrap();
    assert_hidden("Status", &format!("{:?}", source.status()));
    for e in [
        StoreError::Timeout(Duration::from_secs(1)),
        StoreError::Misconfigured("table missing".into()),
        StoreError::Unsupported("lease renewal"),
    ] {
        assert_hidden("StoreError", &format!("{e} {e:?}"));
    }
}

/// The simulator's builder holds the client secret it accepts: its Debug hides it.
#[test]
fn the_simulators_builder_debugs_without_its_client_secret() {
    let builder = tokenkeeper::testing::Simulator::builder(tokenkeeper::testing::Mode::Generic)
        .client_secret(Some(CLIENT_SECRET));
    assert_hidden("SimulatorBuilder", &format!("{builder:?} {builder:#?}"));
}
