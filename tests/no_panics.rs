//! Property tests: no value a provider sends (any integer, float or huge string in any
//! field or rate-limit header, with any status) panics anything or wedges the source, and
//! a fault of any kind (a panic included) injected into any store call never leaves the
//! flight stuck or costs the grant.

use std::sync::OnceLock;
use std::time::Duration;

use proptest::prelude::*;
use serde_json::{Value, json};
use tokenkeeper::provider::EpochUnit;
use tokenkeeper::testing::{FaultyStore, Mode, Simulator, StoreFault, StoreOp};
use tokenkeeper::{
    ClientCredentials, Error, ManualClock, MemoryStore, ProviderProfile, RefreshingTokenSource,
};
use url::Url;
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    })
}

/// Any JSON number or numeric-looking string, including the extremes.
fn number() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        Just(Value::from(i64::MAX)),
        Just(Value::from(i64::MIN)),
        Just(Value::from(u64::MAX)),
        Just(json!(1e300)),
        Just(json!(-1e300)),
        "[0-9]{1,400}".prop_map(Value::from),
        "-?[0-9]{1,30}(\\.[0-9]{1,10})?".prop_map(Value::from),
        ".{0,40}".prop_map(Value::from),
        Just(Value::Null),
    ]
}

/// Any header value: numbers at the extremes, dates, garbage.
fn header() -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        Just(None),
        any::<u64>().prop_map(|n| Some(n.to_string())),
        any::<i64>().prop_map(|n| Some(n.to_string())),
        "[0-9]{1,40}".prop_map(Some),
        Just(Some("1000000000000".to_owned())),
        Just(Some("Wed, 21 Oct 2015 07:28:00 GMT".to_owned())),
        Just(Some("Fri, 31 Dec 9999 23:59:59 GMT".to_owned())),
        "[ -~]{0,60}".prop_map(Some),
    ]
}

#[derive(Debug, Clone)]
struct Answer {
    status: u16,
    expires_in: Value,
    expires: Value,
    refresh_expires_in: Value,
    scope: Value,
    retry_after: Option<String>,
    reset: Option<String>,
}

fn answer() -> impl Strategy<Value = Answer> {
    (
        prop_oneof![
            Just(200u16),
            Just(400),
            Just(401),
            Just(429),
            Just(500),
            Just(503)
        ],
        number(),
        number(),
        number(),
        prop_oneof![number(), ".{0,100}".prop_map(Value::from)],
        header(),
        header(),
    )
        .prop_map(
            |(status, expires_in, expires, refresh_expires_in, scope, retry_after, reset)| Answer {
                status,
                expires_in,
                expires,
                refresh_expires_in,
                scope,
                retry_after,
                reset,
            },
        )
}

fn response(answer: &Answer) -> ResponseTemplate {
    let body = if answer.status == 200 {
        json!({
            "access_token": "at-x",
            "refresh_token": "rt-x",
            "token_type": "Bearer",
            "expires_in": answer.expires_in,
            "expires": answer.expires,
            "refresh_token_expires_in": answer.refresh_expires_in,
            "scope": answer.scope,
        })
    } else {
        json!({"error": "temporarily_unavailable", "error_description": answer.scope})
    };
    let mut template = ResponseTemplate::new(answer.status).set_body_json(body);
    if let Some(value) = &answer.retry_after {
        template = template.insert_header("Retry-After", value.as_str());
    }
    if let Some(value) = &answer.reset {
        template = template.insert_header("X-Ratelimit-Reset", value.as_str());
    }
    template
}

/// True when the error says a refresh task panicked.
fn panicked(e: &Error) -> bool {
    format!("{e:?}").contains("Panicked")
}

async fn answered_with(answer: Answer) -> Result<(), TestCaseError> {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(response(&answer))
        .up_to_n_times(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(
            json!({"access_token": "at-ok", "refresh_token": "rt-ok", "expires_in": 3600}),
        ))
        .mount(&server)
        .await;
    let clock = ManualClock::starting_now();
    let mut profile =
        ProviderProfile::generic(Url::parse(&format!("{}/token", server.uri())).unwrap());
    profile.request_timeout = Duration::from_secs(2);
    profile.expires_at_field = Some(("expires".into(), EpochUnit::Auto));
    profile.rate_limit_reset_header = Some("X-Ratelimit-Reset".into());
    let source = RefreshingTokenSource::builder(profile, ClientCredentials::new("c", "s"))
        .initial_refresh_token("rt-0")
        .clock(clock.clone())
        .build()
        .unwrap();
    match source.access_token().await {
        Ok(token) => {
            prop_assert_eq!(token.secret(), "at-x");
            // Served again from the cache or refreshed: never a panic.
            if let Err(e) = source.access_token().await {
                prop_assert!(!panicked(&e), "{:?}", e);
            }
        }
        Err(e) => {
            prop_assert!(!panicked(&e), "{:?}", e);
            prop_assert!(e.is_transient(), "{:?}", e);
            let wait = e.retry_after().unwrap_or_default();
            prop_assert!(wait <= Duration::from_secs(3600), "{:?}", wait);
            clock.advance(time::Duration::try_from(wait).unwrap() + time::Duration::SECOND);
            let token = source.access_token().await.map(|t| t.secret().to_owned());
            prop_assert_eq!(token.ok(), Some("at-ok".to_owned()));
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn no_provider_answer_panics_or_wedges_the_source(answer in answer()) {
        runtime().block_on(answered_with(answer))?;
    }
}

fn store_fault() -> impl Strategy<Value = StoreFault> {
    prop_oneof![
        Just(StoreFault::Panic),
        Just(StoreFault::FailBefore),
        Just(StoreFault::FailAfter),
        Just(StoreFault::LoseLease),
        (1u64..40).prop_map(|ms| StoreFault::HangBefore(Duration::from_millis(ms))),
        (1u64..40).prop_map(|ms| StoreFault::HangAfter(Duration::from_millis(ms))),
    ]
}

fn store_op() -> impl Strategy<Value = StoreOp> {
    prop_oneof![
        Just(StoreOp::Load),
        Just(StoreOp::Save),
        Just(StoreOp::Lease),
        Just(StoreOp::Renew),
    ]
}

async fn faulted(faults: Vec<(StoreOp, u64, StoreFault)>) -> Result<(), TestCaseError> {
    let sim = Simulator::builder(Mode::Lucid).start().await.unwrap();
    let store = FaultyStore::new(MemoryStore::new());
    let mut profile = sim.profile();
    profile.request_timeout = Duration::from_secs(1);
    let source = RefreshingTokenSource::builder(profile, sim.credentials())
        .store(store.clone())
        .key("k")
        .initial_refresh_token(sim.issue_grant())
        .lease_ttl(Duration::from_millis(1500))
        .store_timeout(Duration::from_secs(2))
        .forced_refresh_interval(Duration::ZERO)
        .build()
        .unwrap();
    for (op, n, fault) in faults {
        store.fail_nth(op, n, fault);
    }
    // Three refreshes in a row (each forced), whatever the store does.
    for _ in 0..3 {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        let token = loop {
            match source.access_token().await {
                Ok(token) => break token,
                Err(e) => {
                    prop_assert!(e.is_transient(), "{:?}", e);
                    prop_assert!(tokio::time::Instant::now() < deadline, "stuck: {:?}", e);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        source.invalidate(&token);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while source.status().rotation_unsaved {
        prop_assert!(
            tokio::time::Instant::now() < deadline,
            "a rotated set never saved"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let counters = sim.counters();
    prop_assert_eq!(counters.reuse_attempts, 0, "{:?}", counters);
    let stored = store.get_ref().get("k").and_then(|v| v.value.refresh_token);
    prop_assert_eq!(
        stored.map(|t| t.secret().to_owned()),
        sim.current_refresh_token(0),
        "the store holds the newest refresh token"
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn no_store_fault_leaves_the_flight_stuck_or_costs_the_grant(
        faults in prop::collection::vec((store_op(), 1u64..8, store_fault()), 1..4)
    ) {
        runtime().block_on(faulted(faults))?;
    }
}
