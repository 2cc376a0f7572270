//! Consent against the simulator, with an HTTP client acting as the browser: the loopback
//! flow (PKCE, state, one exchange, the listener's refusals), the paste flow, the device
//! grant, and revocation seen by a second source sharing the store.
#![cfg(feature = "consent")]

use std::sync::Arc;
use std::time::Duration;

use tokenkeeper::consent::{Consent, Grant, LoopbackConsent};
use tokenkeeper::testing::{Mode, Simulator};
use tokenkeeper::{
    ConsentFailure, Error, MemoryStore, ReauthorizationReason, RefreshingTokenSource, TokenStore,
};
use url::Url;

/// A browser that follows redirects (to the loopback listener).
fn browser() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// A browser that stops at the authorization server's redirect.
fn stopping_browser() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// Where the authorization server redirects the person after consenting.
async fn redirect_of(url: &Url) -> Url {
    let answer = stopping_browser().get(url.clone()).send().await.unwrap();
    assert_eq!(answer.status(), 302, "the simulator consents at once");
    let location = answer.headers()["location"].to_str().unwrap();
    Url::parse(location).unwrap()
}

fn param(url: &Url, name: &str) -> Option<String> {
    url.query_pairs()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

fn with_param(url: &Url, name: &str, value: &str) -> Url {
    let mut changed = url.clone();
    let pairs: Vec<(String, String)> = url
        .query_pairs()
        .map(|(k, v)| {
            let v = if k == name {
                value.to_owned()
            } else {
                v.into_owned()
            };
            (k.into_owned(), v)
        })
        .collect();
    changed.query_pairs_mut().clear().extend_pairs(pairs);
    changed
}

/// The consent failure an outcome ended with, if any.
fn failure<T>(outcome: &Result<T, Error>) -> Option<&ConsentFailure> {
    match outcome {
        Err(Error::Consent { reason, .. }) => Some(reason),
        _ => None,
    }
}

/// The redirect's `state` with its last character changed: same length, one byte off.
fn forged_state(redirect: &Url) -> String {
    let mut state = param(redirect, "state").expect("a state");
    let last = state.pop().unwrap();
    state.push(if last == 'A' { 'B' } else { 'A' });
    state
}

/// A loopback consent that gives up after `timeout`.
async fn listening_for(sim: &Simulator, timeout: Duration) -> LoopbackConsent {
    Consent::authorization_code(sim.profile(), sim.credentials())
        .unwrap()
        .timeout(timeout)
        .listen()
        .await
        .unwrap()
}

async fn listening(sim: &Simulator) -> LoopbackConsent {
    Consent::authorization_code(sim.profile(), sim.credentials())
        .unwrap()
        .listen()
        .await
        .unwrap()
}

/// Runs `finish` in a task, so that the test can play the browser meanwhile.
fn finishing(consent: LoopbackConsent) -> tokio::task::JoinHandle<Result<Grant, Error>> {
    tokio::spawn(consent.finish())
}

/// The whole loopback flow, per provider: the grant lands in the store, the first
/// `access_token()` needs no refresh, and PKCE was verified where the profile sends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_consent_lands_the_grant_in_the_store_for_every_provider() {
    for mode in [Mode::Autodesk, Mode::Generic, Mode::Lucid, Mode::HighQ] {
        let sim = Simulator::builder(mode).start().await.unwrap();
        let consent = listening(&sim).await;
        let url = consent.url().clone();
        assert!(
            url.as_str()
                .starts_with(sim.profile().authorization_url.unwrap().as_str()),
            "{mode:?}: the URL is the provider's authorization endpoint"
        );
        assert_eq!(
            param(&url, "code_challenge_method").is_some(),
            sim.profile().pkce,
            "{mode:?}: PKCE is sent exactly where the profile says"
        );
        let finish = finishing(consent);
        let page = browser().get(url).send().await.unwrap();
        assert_eq!(page.status(), 200, "{mode:?}: the success page");
        let grant = finish.await.unwrap().unwrap();
        assert!(
            !format!("{grant:?}").contains("sim-rt-"),
            "no token in Debug"
        );

        let store = MemoryStore::new();
        let source = grant
            .into_source(
                RefreshingTokenSource::builder(sim.profile(), sim.credentials())
                    .store(store.clone())
                    .key("consented"),
            )
            .await
            .unwrap();
        let stored = store.get("consented").expect("the grant is stored");
        assert!(stored.value.refresh_token.is_some());
        source.access_token().await.unwrap();
        let counters = sim.counters();
        assert_eq!(counters.refreshes, 0, "{mode:?}: no refresh was needed");
        assert_eq!(counters.code_exchanges, 1, "{mode:?}: one code exchange");
        assert_eq!(
            counters.pkce_verified,
            u64::from(sim.profile().pkce),
            "{mode:?}: the simulator checked the PKCE verifier"
        );
        // And the grant lives on: a refresh works with the stored refresh token.
        let later = RefreshingTokenSource::builder(sim.profile(), sim.credentials())
            .store(store.clone())
            .key("consented")
            .build()
            .unwrap();
        let token = later.access_token().await.unwrap();
        later.invalidate(&token);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(sim.counters().reuse_attempts, 0);
    }
}

/// A redirect whose `state` differs: refused with a failure page, its code not
/// exchanged; the wait goes on (a forged redirect cannot abort the consent), and the
/// real redirect still completes it. Without one, the refusal is the error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_mismatch_is_refused_without_exchanging_the_code() {
    let sim = Simulator::builder(Mode::Generic).start().await.unwrap();
    let consent = listening(&sim).await;
    let redirect = redirect_of(consent.url()).await;
    let finish = finishing(consent);
    let forged = with_param(&redirect, "state", &forged_state(&redirect));
    let page = browser().get(forged).send().await.unwrap();
    assert_eq!(page.status(), 400, "a failure page");
    assert_eq!(sim.counters().code_exchanges, 0, "no code exchanged");
    assert!(!finish.is_finished(), "still waiting for the real redirect");
    let page = browser().get(redirect).send().await.unwrap();
    assert_eq!(page.status(), 200);
    finish
        .await
        .unwrap()
        .expect("the real redirect completes the consent");
    assert_eq!(sim.counters().code_exchanges, 1);

    let consent = listening_for(&sim, Duration::from_millis(800)).await;
    let redirect = redirect_of(consent.url()).await;
    let finish = finishing(consent);
    let forged = with_param(&redirect, "state", &forged_state(&redirect));
    assert_eq!(browser().get(forged).send().await.unwrap().status(), 400);
    let outcome = finish.await.unwrap();
    assert_eq!(
        failure(&outcome),
        Some(&ConsentFailure::StateMismatch),
        "{outcome:?}"
    );
    assert_eq!(
        sim.counters().code_exchanges,
        1,
        "the forged code was never exchanged"
    );
}

/// A redirect without `state` from a server that echoes it: refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_state_is_refused_where_the_server_echoes_it() {
    let sim = Simulator::builder(Mode::Generic).start().await.unwrap();
    let consent = listening_for(&sim, Duration::from_millis(800)).await;
    let redirect = redirect_of(consent.url()).await;
    let finish = finishing(consent);
    let mut stripped = redirect.clone();
    let pairs: Vec<(String, String)> = redirect
        .query_pairs()
        .filter(|(k, _)| k != "state")
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    stripped.query_pairs_mut().clear().extend_pairs(pairs);
    assert_eq!(browser().get(stripped).send().await.unwrap().status(), 400);
    let outcome = finish.await.unwrap();
    assert_eq!(
        failure(&outcome),
        Some(&ConsentFailure::StateMissing),
        "{outcome:?}"
    );
    assert_eq!(sim.counters().code_exchanges, 0);
}

/// A connection that sends nothing (a browser's preconnect) does not hold up the real
/// redirect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_does_not_hold_up_the_callback() {
    let sim = Simulator::builder(Mode::Generic).start().await.unwrap();
    let consent = listening(&sim).await;
    let port = consent.redirect_uri().port().unwrap();
    let redirect = redirect_of(consent.url()).await;
    let finish = finishing(consent);
    let _idle = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = tokio::time::Instant::now();
    let page = browser().get(redirect).send().await.unwrap();
    assert_eq!(page.status(), 200);
    finish.await.unwrap().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "answered at once, not after the idle connection's read timeout: {:?}",
        started.elapsed()
    );
}

/// Settings that would send the code off this machine, or never match, are refused.
#[tokio::test]
async fn listener_settings_that_cannot_work_are_refused() {
    let sim = Simulator::builder(Mode::Generic).start().await.unwrap();
    let flow = || Consent::authorization_code(sim.profile(), sim.credentials()).unwrap();
    for outcome in [
        flow().redirect_host("attacker.example").listen().await,
        flow().callback_path("/cb?x=1").listen().await,
        flow().extra_param("state", "fixed").listen().await,
    ] {
        assert!(matches!(outcome, Err(Error::Config(_))), "{outcome:?}");
    }
    flow()
        .redirect_host("localhost")
        .callback_path("oauth/callback")
        .extra_param("prompt", "consent")
        .listen()
        .await
        .expect("a valid configuration");
}

/// HighQ's server may not echo `state`: the profile says so, and the redirect without it
/// is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_does_not_echo_state_is_accepted_where_the_profile_says_so() {
    let sim = Simulator::builder(Mode::HighQ)
        .echo_state(false)
        .start()
        .await
        .unwrap();
    assert!(!sim.profile().state_echoed);
    let consent = listening(&sim).await;
    let redirect = redirect_of(consent.url()).await;
    assert_eq!(param(&redirect, "state"), None, "the simulator dropped it");
    let finish = finishing(consent);
    browser().get(redirect).send().await.unwrap();
    finish.await.unwrap().expect("accepted without state");
    assert_eq!(sim.counters().code_exchanges, 1);
}

/// Only the callback path answers; a second callback after the first finds no listener;
/// the code is exchanged once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_one_callback_on_the_callback_path_is_answered() {
    let sim = Simulator::builder(Mode::Generic).start().await.unwrap();
    let consent = listening(&sim).await;
    let redirect = redirect_of(consent.url()).await;
    let finish = finishing(consent);

    let mut elsewhere = redirect.clone();
    elsewhere.set_path("/not-the-callback");
    let answer = browser().get(elsewhere).send().await.unwrap();
    assert_eq!(answer.status(), 404, "another path gets 404");
    let favicon = redirect.join("/favicon.ico").unwrap();
    assert_eq!(browser().get(favicon).send().await.unwrap().status(), 404);
    assert_eq!(
        sim.counters().code_exchanges,
        0,
        "no code exchanged for them"
    );

    assert_eq!(
        browser()
            .get(redirect.clone())
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    finish.await.unwrap().unwrap();
    let again = browser().get(redirect).send().await;
    assert!(again.is_err(), "the listener is closed: {again:?}");
    assert_eq!(
        sim.counters().code_exchanges,
        1,
        "the code was exchanged once"
    );
}

/// Nobody consents: the flow times out, nothing exchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_consent_times_out() {
    let sim = Simulator::builder(Mode::Generic).start().await.unwrap();
    let consent = listening_for(&sim, Duration::from_millis(300)).await;
    let outcome = consent.finish().await;
    assert_eq!(
        failure(&outcome),
        Some(&ConsentFailure::TimedOut),
        "{outcome:?}"
    );
    assert_eq!(sim.counters().code_exchanges, 0);
}

/// The person declines: a typed error, nothing exchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declined_consent_is_denied() {
    let sim = Simulator::builder(Mode::Autodesk)
        .deny_consent(true)
        .start()
        .await
        .unwrap();
    let consent = listening(&sim).await;
    let url = consent.url().clone();
    let finish = finishing(consent);
    let page = browser().get(url).send().await.unwrap();
    assert_eq!(page.status(), 400);
    let outcome = finish.await.unwrap();
    assert_eq!(
        failure(&outcome),
        Some(&ConsentFailure::Denied),
        "{outcome:?}"
    );
    assert_eq!(sim.counters().code_exchanges, 0);
}

/// A fixed port in the redirect URI, for providers that register it exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fixed_port_range_names_the_port_bound() {
    let sim = Simulator::builder(Mode::Generic).start().await.unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let consent = Consent::authorization_code(sim.profile(), sim.credentials())
        .unwrap()
        .port_range(port..=port.saturating_add(20))
        .listen()
        .await
        .unwrap();
    let bound = consent.redirect_uri().port().unwrap();
    assert!(
        bound > port && bound <= port + 20,
        "the first free port: {bound}"
    );
    let only_taken = Consent::authorization_code(sim.profile(), sim.credentials())
        .unwrap()
        .port(port)
        .listen()
        .await;
    assert!(
        matches!(failure(&only_taken), Some(ConsentFailure::Listener(_))),
        "{only_taken:?}"
    );
}

/// Paste: the whole redirect URL (state checked) or the bare code, as Lucid's copy-code
/// page shows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paste_accepts_the_redirect_url_or_the_bare_code() {
    let sim = Simulator::builder(Mode::Lucid).start().await.unwrap();

    // The whole URL.
    let paste = Consent::authorization_code(sim.profile(), sim.credentials())
        .unwrap()
        .paste()
        .unwrap();
    assert_eq!(
        paste.redirect_uri().as_str(),
        "https://lucid.app/oauth2/clients/sim-client/redirect",
        "Lucid's copy-code page"
    );
    let redirect = redirect_of(paste.url()).await;
    paste.finish(redirect.as_str()).await.unwrap();
    assert_eq!(sim.counters().code_exchanges, 1);

    // The bare code.
    let paste = Consent::authorization_code(sim.profile(), sim.credentials())
        .unwrap()
        .paste()
        .unwrap();
    let code = param(&redirect_of(paste.url()).await, "code").unwrap();
    paste.finish(&format!("  {code}\n")).await.unwrap();
    assert_eq!(sim.counters().code_exchanges, 2);

    // A forged state in a pasted URL, a URL for another redirect, garbage: refused.
    let paste = Consent::authorization_code(sim.profile(), sim.credentials())
        .unwrap()
        .paste()
        .unwrap();
    let redirect = redirect_of(paste.url()).await;
    let forged = with_param(&redirect, "state", &forged_state(&redirect));
    let outcome = paste.finish(forged.as_str()).await;
    assert_eq!(
        failure(&outcome),
        Some(&ConsentFailure::StateMismatch),
        "{outcome:?}"
    );
    let paste = Consent::authorization_code(sim.profile(), sim.credentials())
        .unwrap()
        .paste()
        .unwrap();
    let outcome = paste
        .finish("https://evil.example/redirect?code=x&state=y")
        .await;
    assert!(
        matches!(failure(&outcome), Some(ConsentFailure::UnusableInput(_))),
        "{outcome:?}"
    );
    assert_eq!(
        sim.counters().code_exchanges,
        2,
        "none of those was exchanged"
    );
}

/// A used code pasted again: the token endpoint refuses it, typed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_used_code_is_rejected() {
    let sim = Simulator::builder(Mode::Generic).start().await.unwrap();
    let paste = Consent::authorization_code(sim.profile(), sim.credentials())
        .unwrap()
        .redirect_uri(Url::parse("https://app.example/callback").unwrap())
        .paste()
        .unwrap();
    let redirect = redirect_of(paste.url()).await;
    let code = param(&redirect, "code").unwrap();
    paste.finish(redirect.as_str()).await.unwrap();
    let again = Consent::authorization_code(sim.profile(), sim.credentials())
        .unwrap()
        .redirect_uri(Url::parse("https://app.example/callback").unwrap())
        .paste()
        .unwrap();
    let outcome = again.finish(&code).await;
    assert_eq!(
        failure(&outcome),
        Some(&ConsentFailure::CodeRejected),
        "{outcome:?}"
    );
    let text = outcome.unwrap_err().to_string();
    assert!(
        !text.contains(&code),
        "the code is not in the message: {text}"
    );
}

/// The device grant: pending until approved, `slow_down` obeyed (the interval grows by
/// 5 s for good, so the simulator never sees a second early poll).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_grant_waits_for_approval_and_slows_down_when_told() {
    let sim = Simulator::builder(Mode::Generic)
        .device_interval(Duration::from_secs(1))
        .device_code_lifetime(Duration::from_secs(15))
        .device_auto_approve_after(1)
        .start()
        .await
        .unwrap();
    let device = Consent::device(sim.profile(), sim.credentials())
        .unwrap()
        .start()
        .await
        .unwrap();
    assert!(!device.user_code().is_empty());
    sim.slow_down_next();
    let started = tokio::time::Instant::now();
    let grant = device.finish().await.unwrap();
    assert!(grant.token_set().refresh_token.is_some());
    let counters = sim.counters();
    assert_eq!(counters.slow_downs, 1, "told once, obeyed: {counters:?}");
    assert_eq!(
        counters.device_polls, 2,
        "one answered slow_down, then the approved one"
    );
    assert!(
        started.elapsed() >= Duration::from_secs(6),
        "the interval grew by 5 s after slow_down"
    );
}

/// A device code nobody approves expires; a declined one is denied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_grant_expires_or_is_denied() {
    let sim = Simulator::builder(Mode::Generic)
        .device_interval(Duration::from_secs(1))
        .device_code_lifetime(Duration::from_secs(3))
        .start()
        .await
        .unwrap();
    let device = Consent::device(sim.profile(), sim.credentials())
        .unwrap()
        .start()
        .await
        .unwrap();
    let outcome = device.finish().await;
    assert_eq!(
        failure(&outcome),
        Some(&ConsentFailure::DeviceCodeExpired),
        "{outcome:?}"
    );

    let device = Consent::device(sim.profile(), sim.credentials())
        .unwrap()
        .start()
        .await
        .unwrap();
    assert!(sim.deny_device(device.user_code()));
    let outcome = device.finish().await;
    assert_eq!(
        failure(&outcome),
        Some(&ConsentFailure::Denied),
        "{outcome:?}"
    );
}

/// `revoke()`: the provider is called once; another source sharing the store (another
/// process) gets `ReauthorizationRequired` without presenting the refresh token; the
/// store keeps no token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_ends_the_grant_for_every_source_sharing_the_store() {
    let sim = Simulator::builder(Mode::Lucid).start().await.unwrap();
    let store: Arc<dyn TokenStore> = Arc::new(MemoryStore::new());
    let source = |store: &Arc<dyn TokenStore>| {
        RefreshingTokenSource::builder(sim.profile(), sim.credentials())
            .shared_store(Arc::clone(store))
            .key("to-revoke")
            .initial_refresh_token(sim.issue_grant())
            .build()
            .unwrap()
    };
    let (one, other) = (source(&store), source(&store));
    one.access_token().await.unwrap();
    let requests = sim.counters().requests;

    one.revoke().await.unwrap();
    let counters = sim.counters();
    assert_eq!(counters.revocations, 1, "the provider was called once");
    assert!(sim.grant_revoked(0), "the provider revoked the grant");
    let stored = store.load("to-revoke").await.unwrap().unwrap().value;
    assert!(stored.revoked_at.is_some());
    assert!(stored.refresh_token.is_none() && stored.access_token.is_none());

    for source in [&one, &other] {
        let outcome = source.access_token().await;
        assert!(
            matches!(
                outcome,
                Err(Error::ReauthorizationRequired {
                    reason: ReauthorizationReason::Revoked,
                    ..
                })
            ),
            "{outcome:?}"
        );
    }
    let after = sim.counters();
    assert_eq!(after.requests, requests, "no refresh token was presented");
    assert_eq!(after.reuse_attempts, 0);

    // A new consent replaces the revoked grant.
    other.import_refresh_token(sim.issue_grant()).await.unwrap();
    other.access_token().await.unwrap();
}

/// A provider without a revocation endpoint (HighQ): the grant leaves the store, and the
/// provider is not called; `forget()` never calls the provider.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_without_an_endpoint_and_forget_only_mark_the_store() {
    for (mode, forget) in [(Mode::HighQ, false), (Mode::Lucid, true)] {
        let sim = Simulator::builder(mode).start().await.unwrap();
        let store = MemoryStore::new();
        let source = RefreshingTokenSource::builder(sim.profile(), sim.credentials())
            .store(store.clone())
            .initial_refresh_token(sim.issue_grant())
            .build()
            .unwrap();
        source.access_token().await.unwrap();
        if forget {
            source.forget().await.unwrap();
        } else {
            source.revoke().await.unwrap();
        }
        assert_eq!(sim.counters().revocations, 0, "{mode:?}");
        assert!(!sim.grant_revoked(0), "{mode:?}: the provider was not told");
        let stored = store.get("default").unwrap().value;
        assert!(stored.revoked_at.is_some() && stored.refresh_token.is_none());
        assert!(
            source
                .access_token()
                .await
                .unwrap_err()
                .needs_reauthorization()
        );
    }
}

/// A revocation the provider did not receive changes nothing: the grant stays usable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_revocation_leaves_the_grant_in_place() {
    let sim = Simulator::builder(Mode::Lucid).start().await.unwrap();
    let mut profile = sim.profile();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    profile.revocation_url = Some(
        Url::parse(&format!(
            "http://{}/oauth2/token/revoke",
            closed.local_addr().unwrap()
        ))
        .unwrap(),
    );
    drop(closed);
    let store = MemoryStore::new();
    let source = RefreshingTokenSource::builder(profile, sim.credentials())
        .store(store.clone())
        .initial_refresh_token(sim.issue_grant())
        .build()
        .unwrap();
    source.access_token().await.unwrap();
    let before = store.get("default").unwrap();
    let outcome = source.revoke().await;
    assert!(
        outcome.as_ref().is_err_and(Error::is_transient),
        "{outcome:?}"
    );
    let after = store.get("default").unwrap();
    assert_eq!(after.version, before.version, "the store is untouched");
    source.access_token().await.unwrap();
}

/// A read of this source's that was in flight when `forget` (or `revoke`, or an import)
/// replaced the grant answers late with the old set: it is not served, and the source
/// answers `Revoked` from then on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_answered_after_forget_does_not_bring_the_old_token_back() {
    use tokenkeeper::testing::{FaultyStore, StoreFault, StoreOp};
    let sim = Simulator::builder(Mode::Lucid).start().await.unwrap();
    let store = FaultyStore::new(MemoryStore::new());
    let build = || {
        RefreshingTokenSource::builder(sim.profile(), sim.credentials())
            .store(store.clone())
            .initial_refresh_token(sim.issue_grant())
            .build()
            .unwrap()
    };
    let old = build().access_token().await.unwrap();

    let source = build();
    // The new source's first read of the store answers 500 ms late, with the old set.
    store.fail_next(
        StoreOp::Load,
        StoreFault::HangAfter(Duration::from_millis(500)),
    );
    let reading = tokio::spawn({
        let source = source.clone();
        async move { source.access_token().await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    source.forget().await.unwrap();
    let late = reading.await.unwrap();
    assert!(
        late.as_ref().map_or(true, |t| t.secret() != old.secret()),
        "the old token was served after forget"
    );
    let after = source.access_token().await;
    assert!(
        matches!(
            after,
            Err(Error::ReauthorizationRequired {
                reason: ReauthorizationReason::Revoked,
                ..
            })
        ),
        "{after:?}"
    );
    assert_eq!(sim.counters().reuse_attempts, 0);
}

/// Another holder's refresh in flight (its write-ahead record in the store): it may hold
/// the successor of the stored token, which revoking the stored one would not revoke.
/// `revoke` waits for it like a refresh does, and meanwhile calls nobody.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_does_not_revoke_under_another_holders_rotation() {
    let sim = Simulator::builder(Mode::Lucid).start().await.unwrap();
    let store = MemoryStore::new();
    let source = RefreshingTokenSource::builder(sim.profile(), sim.credentials())
        .store(store.clone())
        .initial_refresh_token(sim.issue_grant())
        .build()
        .unwrap();
    source.access_token().await.unwrap();
    let stored = store.get("default").unwrap();
    let mut marked = stored.value.clone();
    marked.rotation = Some(tokenkeeper::RotationInFlight::new(
        "another-holder",
        time::OffsetDateTime::now_utc(),
    ));
    let lease = store
        .lease("default", Duration::from_secs(5))
        .await
        .unwrap();
    let version = store
        .save("default", &marked, Some(stored.version), &lease)
        .await
        .unwrap();
    lease.release().await.unwrap();

    let outcome = source.revoke().await;
    assert!(
        outcome.as_ref().is_err_and(Error::is_transient),
        "{outcome:?}"
    );
    assert_eq!(sim.counters().revocations, 0, "nothing was revoked");
    assert_eq!(
        store.get("default").unwrap().version,
        version,
        "store untouched"
    );
}
