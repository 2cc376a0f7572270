//! Replicas never serve an access token the provider already killed: four real processes
//! share a store (files, Redis, PostgreSQL) and a Lucid-mode simulator, whose refresh kills
//! the previous access token and whose API rejects dead tokens. Each process runs 16
//! tasks that present every token they are served to the API: 8 present what
//! `access_token()` returns (the rejected fraction is counted), 8 go through
//! `TokenMiddleware` (every call must succeed). Each half has its own source (same key,
//! same store), so that the middleware's reaction to a rejection (it reloads the store)
//! does not fix the raw half's view behind the watch's back. The processes refresh ahead by different
//! leeways (as replicas configured apart, or one whose sweeper keeps the grant alive, do),
//! so one refreshes while the others' tokens still look fresh to them: only the watch
//! tells them. The same run over a store that cannot watch shows what the watch is
//! worth.
//!
//! The test binary re-executes itself: `watch_child` is the child's entry point; it does
//! nothing unless `TK_WATCH_CHILD` holds its configuration (JSON).
#![cfg(feature = "middleware")]

#[path = "support/children.rs"]
mod children;
#[cfg(any(feature = "redis", feature = "postgres"))]
#[path = "support/servers.rs"]
mod servers;

use std::process::Child;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use children::Backend;
use serde::{Deserialize, Serialize};
use tokenkeeper::middleware::TokenMiddleware;
use tokenkeeper::store::conformance::unique_key;
use tokenkeeper::testing::{FaultyStore, Mode, Simulator};
use tokenkeeper::{ClientCredentials, ProviderProfile, RefreshingTokenSource};

const CHILD_ENV: &str = "TK_WATCH_CHILD";
const PROCESSES: usize = 4;
/// Tasks per process presenting `access_token()`'s tokens, and as many through the
/// middleware.
const RAW_TASKS: usize = 8;
const MIDDLEWARE_TASKS: usize = 8;
/// Short tokens, refreshed ahead by process `i` at `LEEWAY + i * LEEWAY_STEP` before
/// expiry: the last process refreshes every 2.8 s, 1.2 s before the first would.
const LIFETIME: Duration = Duration::from_secs(5);
const LEEWAY: Duration = Duration::from_secs(1);
const LEEWAY_STEP: Duration = Duration::from_millis(400);
const RUN: Duration = Duration::from_secs(17);
/// The bound with the watch: at most one served token in ten thousand is already dead
/// (the issue asks for one in a thousand; without the refresher's pause between its
/// write-ahead record and the refresh, `ANNOUNCE_GRACE`, runs measured 0.02-0.08%).
const MAX_REJECTED_WITH_WATCH: f64 = 0.0001;

#[derive(Clone, Debug, Serialize, Deserialize)]
struct ChildConfig {
    backend: Backend,
    store_url: String,
    token_url: String,
    api_url: String,
    key: String,
    initial_refresh_token: String,
    watch: bool,
    leeway_ms: u64,
    run_ms: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct ChildReport {
    /// API calls made with `access_token()`'s token, and how many were rejected (401).
    raw_calls: u64,
    raw_rejected: u64,
    /// API calls made through the middleware, and how many did not succeed.
    middleware_calls: u64,
    middleware_failed: u64,
    /// The first failure of any kind other than a rejection, for the message.
    first_failure: Option<String>,
    adoptions: u64,
    adoptions_by_watch: u64,
}

/// The child process's entry point (a no-op when run as an ordinary test).
#[test]
fn watch_child() {
    children::run_if_child(CHILD_ENV, run_child);
}

async fn run_child(config: ChildConfig) -> ChildReport {
    let store = children::connect(config.backend, &config.store_url, None).await;
    let store: Arc<dyn tokenkeeper::TokenStore> = if config.watch {
        store
    } else {
        Arc::new(FaultyStore::new(store).without_watch())
    };
    let profile = ProviderProfile::lucid().with_token_url(config.token_url.parse().unwrap());
    let new_source = || {
        RefreshingTokenSource::builder(
            profile.clone(),
            ClientCredentials::new("sim-client", "sim-secret"),
        )
        .shared_store(Arc::clone(&store))
        .key(config.key.clone())
        .initial_refresh_token(config.initial_refresh_token.clone())
        .leeway(Duration::from_millis(config.leeway_ms))
        .build()
        .unwrap()
    };
    let (source, middleware_source) = (new_source(), new_source());
    let http = reqwest::Client::new();
    let with_middleware = reqwest_middleware::ClientBuilder::new(http.clone())
        .with(TokenMiddleware::new(middleware_source))
        .build();
    let counters: Arc<[AtomicU64; 4]> = Arc::new(Default::default());
    let first_failure = Arc::new(std::sync::Mutex::new(None::<String>));
    let deadline = tokio::time::Instant::now() + Duration::from_millis(config.run_ms);
    let mut tasks = Vec::new();
    for task in 0..RAW_TASKS + MIDDLEWARE_TASKS {
        let (source, http, with_middleware, counters, first_failure, api) = (
            source.clone(),
            http.clone(),
            with_middleware.clone(),
            Arc::clone(&counters),
            Arc::clone(&first_failure),
            config.api_url.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let fail = |what: String| {
                first_failure.lock().unwrap().get_or_insert(what);
            };
            while tokio::time::Instant::now() < deadline {
                if task < RAW_TASKS {
                    counters[0].fetch_add(1, Ordering::Relaxed);
                    match source.access_token().await {
                        Ok(token) => {
                            match http.get(&api).bearer_auth(token.secret()).send().await {
                                Ok(r) if r.status() == 200 => {}
                                Ok(r) if r.status() == 401 => {
                                    counters[1].fetch_add(1, Ordering::Relaxed);
                                }
                                other => fail(format!("API call: {other:?}")),
                            }
                        }
                        Err(e) => fail(format!("access_token: {e:?}")),
                    }
                } else {
                    counters[2].fetch_add(1, Ordering::Relaxed);
                    match with_middleware.get(&api).send().await {
                        Ok(r) if r.status() == 200 => {}
                        other => {
                            counters[3].fetch_add(1, Ordering::Relaxed);
                            fail(format!("middleware call: {other:?}"));
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(8 + (task as u64 % 5))).await;
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let metrics = source.status().metrics;
    let first_failure = first_failure.lock().unwrap().take();
    ChildReport {
        raw_calls: counters[0].load(Ordering::Relaxed),
        raw_rejected: counters[1].load(Ordering::Relaxed),
        middleware_calls: counters[2].load(Ordering::Relaxed),
        middleware_failed: counters[3].load(Ordering::Relaxed),
        first_failure,
        adoptions: metrics.adoptions,
        adoptions_by_watch: metrics.adoptions_by_watch,
    }
}

/// One run: four processes for [`RUN`]; the fraction of `access_token()`'s tokens the API
/// rejected. Asserts what holds with or without the watch: no failure other than
/// rejections of raw calls, no refresh token presented twice, one refresh per lifetime.
async fn run(backend: Backend, store_url: &str, watch: bool) -> f64 {
    // The children run one at a time per binary: four processes per run on two cores.
    static ONE_RUN_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _turn = ONE_RUN_AT_A_TIME.lock().await;
    let sim = Simulator::builder(Mode::Lucid)
        .access_lifetime(LIFETIME)
        .start()
        .await
        .unwrap();
    children::prepare(backend, store_url).await;
    let config = ChildConfig {
        backend,
        store_url: store_url.to_owned(),
        token_url: sim.token_url().to_string(),
        api_url: sim.api_url().to_string(),
        key: unique_key("watched"),
        initial_refresh_token: sim.issue_grant(),
        watch,
        leeway_ms: 0,
        run_ms: RUN.as_millis() as u64,
    };
    let leeway = |i: usize| LEEWAY + LEEWAY_STEP * i as u32;
    let started = std::time::Instant::now();
    let children: Vec<Child> = (0..PROCESSES)
        .map(|i| {
            let config = ChildConfig {
                leeway_ms: leeway(i).as_millis() as u64,
                ..config.clone()
            };
            children::spawn("watch_child", CHILD_ENV, &config)
        })
        .collect();
    let reports: Vec<ChildReport> = tokio::task::spawn_blocking(move || {
        children.into_iter().map(children::report_of).collect()
    })
    .await
    .unwrap();
    let elapsed = started.elapsed();
    let counters = sim.counters();
    let raw_calls: u64 = reports.iter().map(|r| r.raw_calls).sum();
    let rejected: u64 = reports.iter().map(|r| r.raw_rejected).sum();
    let middleware_calls: u64 = reports.iter().map(|r| r.middleware_calls).sum();
    let fraction = rejected as f64 / raw_calls.max(1) as f64;
    eprintln!(
        "{backend:?}, watch {watch}: {rejected} of {raw_calls} served tokens rejected ({:.3}%); {middleware_calls} middleware calls; {} refreshes in {elapsed:?}; adoptions (by watch) per process: {:?}",
        fraction * 100.0,
        counters.refreshes,
        reports
            .iter()
            .map(|r| (r.adoptions, r.adoptions_by_watch))
            .collect::<Vec<_>>()
    );
    for report in &reports {
        assert_eq!(report.middleware_failed, 0, "{report:?}");
        assert!(
            report.first_failure.is_none(),
            "only rejections of raw calls: {report:?}"
        );
        assert!(
            report.raw_calls > 100 && report.middleware_calls > 100,
            "{report:?}"
        );
    }
    assert_eq!(counters.reuse_attempts, 0, "{counters:?}");
    assert_eq!(counters.revoked_grants, 0, "{counters:?}");
    let lifetimes = elapsed.as_secs_f64() / (LIFETIME - leeway(PROCESSES - 1)).as_secs_f64();
    assert!(
        counters.refreshes >= 3 && counters.refreshes as f64 <= lifetimes.floor() + 1.0,
        "one refresh per lifetime: {counters:?} in {elapsed:?}"
    );
    fraction
}

/// With the watch, at most 0.1% of served tokens are dead and no middleware call fails;
/// without it, the replicas that did not refresh serve the killed token until they
/// read the store, and the figure is higher.
async fn replicas_follow_each_others_refreshes(backend: Backend, store_url: &str) {
    let watched = run(backend, store_url, true).await;
    assert!(
        watched <= MAX_REJECTED_WITH_WATCH,
        "{:.3}% of served tokens were already dead",
        watched * 100.0
    );
    let unwatched = run(backend, store_url, false).await;
    assert!(
        unwatched > MAX_REJECTED_WITH_WATCH && unwatched > watched,
        "without the watch more tokens are dead ({:.3}% vs {:.3}%): the test measures the watch",
        unwatched * 100.0,
        watched * 100.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_store_replicas_never_serve_a_killed_token() {
    let dir = tempfile::tempdir().unwrap();
    replicas_follow_each_others_refreshes(Backend::File, dir.path().to_str().unwrap()).await;
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_replicas_never_serve_a_killed_token() {
    let server = servers::RedisServer::start();
    replicas_follow_each_others_refreshes(Backend::Redis, &server.url()).await;
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_replicas_never_serve_a_killed_token() {
    let server = servers::PostgresServer::start();
    replicas_follow_each_others_refreshes(Backend::Postgres, &server.url()).await;
}
