//! What tokenkeeper logs through `tracing`, at every level, never holds a token or secret.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use tokenkeeper::testing::{Mode, Simulator};
use tokenkeeper::{ClientCredentials, MemoryStore, ProviderProfile, RefreshingTokenSource};
use tracing_subscriber::fmt::MakeWriter;
use url::Url;
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

const REFRESH: &str = "RT-logged-secret-refresh";
const CLIENT_SECRET: &str = "CS-logged-secret-client";

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// Everything logged, at every level, while `work` runs on a current-thread runtime.
fn logged_while(work: impl std::future::Future<Output = ()>) -> String {
    let captured = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(captured.clone())
        .with_ansi(false)
        .finish();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    tracing::subscriber::with_default(subscriber, || runtime.block_on(work));
    String::from_utf8(captured.0.lock().unwrap().clone()).unwrap()
}

async fn refresh_against(response: ResponseTemplate) {
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
    let _ = source.access_token().await;
}

#[test]
fn nothing_logged_at_any_level_shows_a_token_or_secret() {
    let mut issued = Vec::new();
    let log = logged_while(async {
        // Successful refreshes with rotation, through the simulator.
        let sim = Simulator::builder(Mode::Lucid).start().await.unwrap();
        let store = MemoryStore::new();
        let source = RefreshingTokenSource::builder(sim.profile(), sim.credentials())
            .store(store.clone())
            .initial_refresh_token(sim.issue_grant())
            .build()
            .unwrap();
        for _ in 0..3 {
            let token = source.access_token().await.unwrap();
            issued.push(token.secret().to_owned());
            source.invalidate(&token);
        }
        let set = store.get("default").unwrap().value;
        issued.push(set.refresh_token.unwrap().secret().to_owned());
        issued.push("sim-secret".to_owned());

        // Failures, with a provider that echoes the secrets back.
        let echo = format!("token {REFRESH} client {CLIENT_SECRET}");
        refresh_against(
            ResponseTemplate::new(400)
                .set_body_json(json!({"error": "invalid_grant", "error_description": echo})),
        )
        .await;
        refresh_against(ResponseTemplate::new(503).set_body_string(echo.clone())).await;
        refresh_against(ResponseTemplate::new(200).set_body_string(format!(
            "{{\"access_token\": 7, \"refresh_token\": \"{REFRESH}\", \"expires_in\": \"{REFRESH}\"}}"
        )))
        .await;
    });
    assert!(
        log.contains("refresh") && log.contains("WARN"),
        "the flows above log what they do:\n{log}"
    );
    for secret in issued
        .iter()
        .map(String::as_str)
        .chain([REFRESH, CLIENT_SECRET])
    {
        assert!(!log.contains(secret), "a secret was logged:\n{log}");
    }
}

/// The store-fault paths log too: failed saves, retries under the lease, another
/// holder's write-ahead record, a panic in a store call. None of it shows a token.
#[test]
fn store_fault_paths_log_no_token_or_secret() {
    use tokenkeeper::testing::{FaultyStore, StoreFault, StoreOp};
    let mut issued = Vec::new();
    let log = logged_while(async {
        let sim = Simulator::builder(Mode::Lucid).start().await.unwrap();
        let store = FaultyStore::new(MemoryStore::new());
        let grant = sim.issue_grant();
        issued.push(grant.clone());
        let replica = || {
            RefreshingTokenSource::builder(sim.profile(), sim.credentials())
                .store(store.clone())
                .initial_refresh_token(grant.clone())
                .forced_refresh_interval(Duration::ZERO)
                .build()
                .unwrap()
        };
        let (a, b) = (replica(), replica());
        // A rotated set whose save fails twice, then lands on retry.
        store.fail_nth(StoreOp::Save, 3, StoreFault::FailBefore);
        store.fail_nth(StoreOp::Save, 4, StoreFault::FailAfter);
        let token = a.access_token().await.unwrap();
        issued.push(token.secret().to_owned());
        while a.status().rotation_unsaved {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // A record left behind (a 503, then taking the record back fails): B waits.
        a.invalidate(&token);
        sim.fail_next([tokenkeeper::testing::Fault::ServerError(503)]);
        store.fail_nth(StoreOp::Save, 2, StoreFault::FailBefore);
        let _ = a.access_token().await;
        b.invalidate(&b.access_token().await.unwrap_or(token.clone()));
        let _ = b.access_token().await;
        // A panic inside a store call.
        store.fail_next(StoreOp::Load, StoreFault::Panic);
        let _ = b.access_token().await;
        let set = store.get_ref().get("default").unwrap().value;
        issued.push(set.refresh_token.unwrap().secret().to_owned());
        if let Some(access) = set.access_token {
            issued.push(access.secret().to_owned());
        }
    });
    assert!(
        log.contains("could not be saved") && log.contains("write-ahead"),
        "the fault paths above log what they do:\n{log}"
    );
    for secret in issued.iter().map(String::as_str).chain(["sim-secret"]) {
        assert!(!log.contains(secret), "a secret was logged:\n{log}");
    }
}

/// Consent logs what it does (a refused redirect, a state-less one accepted, a revoked
/// grant) but never a code, a `state`, a token or the client secret.
#[cfg(feature = "consent")]
#[test]
fn consent_paths_log_no_code_state_or_token() {
    use tokenkeeper::consent::Consent;
    let mut secrets = vec!["sim-secret".to_owned()];
    let log = logged_while(async {
        let browser = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        for mode in [Mode::Autodesk, Mode::HighQ] {
            let sim = Simulator::builder(mode)
                .echo_state(mode != Mode::HighQ)
                .start()
                .await
                .unwrap();
            let consent = Consent::authorization_code(sim.profile(), sim.credentials())
                .unwrap()
                .listen()
                .await
                .unwrap();
            let url = consent.url().clone();
            let state = url
                .query_pairs()
                .find(|(k, _)| k == "state")
                .map(|(_, v)| v.into_owned())
                .unwrap();
            secrets.push(state.clone());
            let finish = tokio::spawn(consent.finish());
            let answer = browser.get(url).send().await.unwrap();
            let redirect = Url::parse(answer.headers()["location"].to_str().unwrap()).unwrap();
            let code = redirect
                .query_pairs()
                .find(|(k, _)| k == "code")
                .map(|(_, v)| v.into_owned())
                .unwrap();
            secrets.push(code);
            // A forged redirect first (refused, logged), then the real one.
            let mut forged = redirect.clone();
            let pairs: Vec<(String, String)> = redirect
                .query_pairs()
                .filter(|(k, _)| k != "state")
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect();
            forged
                .query_pairs_mut()
                .clear()
                .extend_pairs(pairs)
                .append_pair("state", "forged-state-value");
            let _ = browser.get(forged).send().await;
            let _ = browser.get(redirect).send().await;
            let grant = finish.await.unwrap().unwrap();
            let set = grant.token_set();
            secrets.push(set.access_token.as_ref().unwrap().secret().to_owned());
            secrets.push(set.refresh_token.as_ref().unwrap().secret().to_owned());
            let source = grant
                .into_source(RefreshingTokenSource::builder(
                    sim.profile(),
                    sim.credentials(),
                ))
                .await
                .unwrap();
            source.revoke().await.unwrap();
        }
    });
    assert!(
        log.contains("refused a redirect") && log.contains("carries no state"),
        "the flows above log what they do:\n{log}"
    );
    for secret in &secrets {
        assert!(
            !log.contains(secret.as_str()),
            "a secret was logged:\n{log}"
        );
    }
}
