//! Several replicas, one refresh token: real child processes share one `RedisStore` or
//! `PostgresStore` (on a real server) and one provider simulator with single-use refresh
//! tokens and reuse detection.
//!
//! The test binary re-executes itself: `replica_child` is the child's entry point; it
//! does nothing unless `TK_CHILD` holds its configuration (JSON). The parent hosts the
//! simulator and the servers; children connect to both by URL and report on stdout.
#![cfg(any(feature = "redis", feature = "postgres"))]

#[path = "support/children.rs"]
mod children;
#[path = "support/servers.rs"]
mod servers;
#[path = "support/tls.rs"]
mod tls;

use std::process::Child;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use children::Backend;
use serde::{Deserialize, Serialize};
use tokenkeeper::store::conformance::unique_key;
use tokenkeeper::testing::{Fault, Mode, Simulator};
use tokenkeeper::{
    ClientCredentials, Error, ProviderProfile, ReauthorizationReason, RefreshingTokenSource,
    TokenStore,
};

const CHILD_ENV: &str = "TK_CHILD";

#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
enum Role {
    /// `callers` tasks call `access_token` in a loop for `run_ms`.
    Load { callers: usize, run_ms: u64 },
    /// One caller gets one token (retrying while the error is transient) and reports.
    RefreshOnce,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct ChildConfig {
    backend: Backend,
    store_url: String,
    token_url: String,
    key: String,
    initial_refresh_token: String,
    role: Role,
    lease_ttl_ms: u64,
    request_timeout_ms: u64,
    leeway_ms: u64,
    /// How long a child waits on a write-ahead record another (killed) holder left.
    takeover_ms: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct ChildReport {
    ok: u64,
    errors: u64,
    /// `ok`, `reauthorization_required`, or the first error's Debug.
    outcome: String,
}

async fn connect(backend: Backend, url: &str) -> Arc<dyn TokenStore> {
    children::prepare(backend, url).await;
    children::connect(backend, url, None).await
}

/// The child process's entry point (a no-op when run as an ordinary test).
#[test]
fn replica_child() {
    children::run_if_child(CHILD_ENV, run_child);
}

async fn run_child(config: ChildConfig) -> ChildReport {
    let store = connect(config.backend, &config.store_url).await;
    let mut profile = ProviderProfile::lucid().with_token_url(config.token_url.parse().unwrap());
    profile.request_timeout = Duration::from_millis(config.request_timeout_ms);
    let source =
        RefreshingTokenSource::builder(profile, ClientCredentials::new("sim-client", "sim-secret"))
            .shared_store(store)
            .key(config.key.clone())
            .initial_refresh_token(config.initial_refresh_token.clone())
            .lease_ttl(Duration::from_millis(config.lease_ttl_ms))
            .leeway(Duration::from_millis(config.leeway_ms))
            .abandoned_rotation_after(Duration::from_millis(config.takeover_ms))
            .build()
            .unwrap();
    match config.role {
        Role::Load { callers, run_ms } => {
            let deadline = tokio::time::Instant::now() + Duration::from_millis(run_ms);
            let ok = Arc::new(AtomicU64::new(0));
            let errors = Arc::new(AtomicU64::new(0));
            let first_error = Arc::new(std::sync::Mutex::new(None::<String>));
            let mut tasks = Vec::new();
            for i in 0..callers {
                let (source, ok, errors, first_error) = (
                    source.clone(),
                    Arc::clone(&ok),
                    Arc::clone(&errors),
                    Arc::clone(&first_error),
                );
                tasks.push(tokio::spawn(async move {
                    while tokio::time::Instant::now() < deadline {
                        match source.access_token().await {
                            Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                            Err(e) => {
                                first_error
                                    .lock()
                                    .unwrap()
                                    .get_or_insert_with(|| format!("{e:?}"));
                                errors.fetch_add(1, Ordering::Relaxed)
                            }
                        };
                        tokio::time::sleep(Duration::from_millis(5 + (i as u64 % 7))).await;
                    }
                }));
            }
            for task in tasks {
                task.await.unwrap();
            }
            let first_error = first_error.lock().unwrap().take();
            ChildReport {
                ok: ok.load(Ordering::Relaxed),
                errors: errors.load(Ordering::Relaxed),
                outcome: first_error.unwrap_or_else(|| "ok".into()),
            }
        }
        Role::RefreshOnce => {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            let mut report = ChildReport::default();
            loop {
                match source.access_token().await {
                    Ok(_) => {
                        report.ok += 1;
                        report.outcome = "ok".into();
                        return report;
                    }
                    Err(Error::ReauthorizationRequired {
                        reason: ReauthorizationReason::RefreshTokenRejected,
                        ..
                    }) => {
                        report.errors += 1;
                        report.outcome = "reauthorization_required".into();
                        return report;
                    }
                    Err(e) if e.is_transient() && tokio::time::Instant::now() < deadline => {
                        report.errors += 1;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(e) => {
                        report.errors += 1;
                        report.outcome = format!("{e:?}");
                        return report;
                    }
                }
            }
        }
    }
}

fn spawn_child(config: &ChildConfig) -> Child {
    children::spawn("replica_child", CHILD_ENV, config)
}

fn report_of(child: Child) -> ChildReport {
    children::report_of(child)
}

/// Four processes with 16 callers each, over more than 30 token lifetimes: exactly one
/// refresh per expiry and never a reused refresh token.
async fn four_replicas_refresh_once_per_expiry(backend: Backend, store_url: String) {
    // Lifetime 1 s, leeway 200 ms: a token is refreshed 800 ms after it was requested at
    // the earliest, so in `elapsed` at most elapsed / 800 ms + 1 refreshes can happen.
    const LIFETIME: Duration = Duration::from_secs(1);
    const LEEWAY: Duration = Duration::from_millis(200);
    const RUN: Duration = Duration::from_secs(30);
    let sim = Simulator::builder(Mode::Lucid)
        .access_lifetime(LIFETIME)
        .start()
        .await
        .unwrap();
    // The schema exists before the children race to use it.
    let _store = connect(backend, &store_url).await;
    let config = ChildConfig {
        backend,
        store_url,
        token_url: sim.token_url().to_string(),
        key: unique_key("replicas"),
        initial_refresh_token: sim.issue_grant(),
        role: Role::Load {
            callers: 16,
            run_ms: RUN.as_millis() as u64,
        },
        lease_ttl_ms: 10_000,
        request_timeout_ms: 5_000,
        leeway_ms: LEEWAY.as_millis() as u64,
        takeover_ms: 300_000,
    };
    let started = std::time::Instant::now();
    let children: Vec<Child> = (0..4).map(|_| spawn_child(&config)).collect();
    let reports = tokio::task::spawn_blocking(move || {
        children.into_iter().map(report_of).collect::<Vec<_>>()
    })
    .await
    .unwrap();
    let elapsed = started.elapsed();
    for report in &reports {
        assert_eq!(report.errors, 0, "no caller saw an error: {report:?}");
        assert!(report.ok > 0, "every replica served tokens: {report:?}");
    }
    let counters = sim.counters();
    let max_refreshes =
        (elapsed.as_secs_f64() / (LIFETIME - LEEWAY).as_secs_f64()).floor() as u64 + 1;
    assert_eq!(counters.reuse_attempts, 0, "{counters:?}");
    assert_eq!(counters.revoked_grants, 0, "{counters:?}");
    assert!(
        counters.refreshes <= max_refreshes,
        "at most one refresh per expiry: {} refreshes in {elapsed:?} (max {max_refreshes})",
        counters.refreshes
    );
    assert!(
        counters.refreshes >= 30,
        "the run spans 30 expiries: {counters:?} in {elapsed:?}"
    );
}

/// The config of a single-refresh child with a short lease (3 s) and request timeout
/// (2 s, so the lease outlasts the request, as the refresh protocol requires).
fn single_refresh_config(
    backend: Backend,
    store_url: &str,
    sim: &Simulator,
    key: &str,
    grant: &str,
) -> ChildConfig {
    ChildConfig {
        backend,
        store_url: store_url.to_owned(),
        token_url: sim.token_url().to_string(),
        key: key.to_owned(),
        initial_refresh_token: grant.to_owned(),
        role: Role::RefreshOnce,
        lease_ttl_ms: 3_000,
        request_timeout_ms: 2_000,
        leeway_ms: 60_000,
        // The killed holder's write-ahead record stays; the survivor waits this long
        // before presenting the token that holder may have consumed.
        takeover_ms: 2_000,
    }
}

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The lease holder is SIGKILLed while its refresh request is in flight and the provider
/// has not rotated yet (the request hangs at a gateway): the survivor takes the lease over
/// once it expires, finds the holder's write-ahead record, waits for it the configured
/// time (the holder might have been alive with a rotated token), then refreshes with the
/// stored token, and nothing is lost.
async fn killed_holder_before_rotation_loses_nothing(backend: Backend, store_url: String) {
    let sim = Simulator::builder(Mode::Lucid).start().await.unwrap();
    sim.fail_next([Fault::Hang(Duration::from_secs(20))]);
    let store = connect(backend, &store_url).await;
    let key = unique_key("killed-before-rotation");
    let grant = sim.issue_grant();
    let config = single_refresh_config(backend, &store_url, &sim, &key, &grant);

    let mut holder = spawn_child(&config);
    wait_for("the holder's request reaches the provider", || {
        sim.counters().requests >= 1
    })
    .await;
    holder.kill().expect("SIGKILL the lease holder");
    let _ = holder.wait();
    assert_eq!(sim.counters().refreshes, 0, "killed before any rotation");
    let stored = store
        .load(&key)
        .await
        .unwrap()
        .expect("the seed was stored");
    assert_eq!(
        stored.value.refresh_token.as_ref().map(|t| t.secret()),
        Some(grant.as_str()),
        "the store is intact and holds the unused refresh token"
    );

    let survivor = spawn_child(&config);
    let report = tokio::task::spawn_blocking(move || report_of(survivor))
        .await
        .unwrap();
    assert_eq!(report.outcome, "ok", "the survivor refreshes: {report:?}");
    let counters = sim.counters();
    assert_eq!(counters.refreshes, 1, "{counters:?}");
    assert_eq!(counters.reuse_attempts, 0, "{counters:?}");
    assert_eq!(counters.revoked_grants, 0, "{counters:?}");
    let stored = store.load(&key).await.unwrap().expect("stored");
    assert_eq!(
        stored
            .value
            .refresh_token
            .as_ref()
            .map(|t| t.secret().to_owned()),
        sim.current_refresh_token(0),
        "the survivor saved the rotated refresh token"
    );
}

/// The lease holder is SIGKILLed after the provider rotated the refresh token but before
/// the response reached it (the response is delayed): the new refresh token existed only
/// in that response, so the grant is lost. That is the one loss no store can prevent.
/// (The survivor waits on the holder's write-ahead record first, as above.)
/// What must hold: the store is intact (a complete token set, never half-written), the
/// survivor takes over the lease after it expires, finds the provider rejecting the old
/// token, and reports a typed `ReauthorizationRequired` (no panic, no hang), leaving the
/// dead set marked in the store for diagnosis.
async fn killed_holder_after_rotation_gets_typed_error(backend: Backend, store_url: String) {
    let sim = Simulator::builder(Mode::Lucid)
        .response_delay(Duration::from_millis(1500))
        .start()
        .await
        .unwrap();
    let store = connect(backend, &store_url).await;
    let key = unique_key("killed-after-rotation");
    let grant = sim.issue_grant();
    let config = single_refresh_config(backend, &store_url, &sim, &key, &grant);

    let mut holder = spawn_child(&config);
    wait_for("the provider rotates the grant", || {
        sim.counters().refreshes >= 1
    })
    .await;
    holder.kill().expect("SIGKILL the lease holder");
    let _ = holder.wait();
    let stored = store
        .load(&key)
        .await
        .unwrap()
        .expect("the seed was stored");
    assert_eq!(
        stored.value.refresh_token.as_ref().map(|t| t.secret()),
        Some(grant.as_str()),
        "the store still holds the last saved (now used) refresh token, intact"
    );

    let survivor = spawn_child(&config);
    let report = tokio::task::spawn_blocking(move || report_of(survivor))
        .await
        .unwrap();
    assert_eq!(
        report.outcome, "reauthorization_required",
        "the survivor gets a typed error: {report:?}"
    );
    let counters = sim.counters();
    assert_eq!(
        counters.refreshes, 1,
        "only the killed holder's: {counters:?}"
    );
    assert_eq!(
        counters.reuse_attempts, 1,
        "the survivor presented the token the killed holder had used: {counters:?}"
    );
    let stored = store.load(&key).await.unwrap().expect("stored");
    assert_eq!(
        stored.value.refresh_token.as_ref().map(|t| t.secret()),
        Some(grant.as_str())
    );
    assert!(
        stored.value.rejected_at.is_some(),
        "the dead set is kept, marked, for diagnosis"
    );
}

#[cfg(feature = "redis")]
mod redis {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_four_replicas_refresh_once_per_expiry() {
        let server = servers::RedisServer::start();
        four_replicas_refresh_once_per_expiry(Backend::Redis, server.url()).await;
    }

    /// The same over TLS (`rediss://`, a private CA made at test time).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_four_replicas_refresh_once_per_expiry_over_tls() {
        let tls = tls::TlsRedis::start(&["localhost", "127.0.0.1"]);
        let url = format!("{}#ca={}", tls.url(), tls.ca_path().display());
        four_replicas_refresh_once_per_expiry(Backend::Redis, url).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_killed_holder_before_rotation_loses_nothing() {
        let server = servers::RedisServer::start();
        killed_holder_before_rotation_loses_nothing(Backend::Redis, server.url()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_killed_holder_after_rotation_gets_typed_error() {
        let server = servers::RedisServer::start();
        killed_holder_after_rotation_gets_typed_error(Backend::Redis, server.url()).await;
    }
}

#[cfg(feature = "postgres")]
mod postgres {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_four_replicas_refresh_once_per_expiry() {
        let server = servers::PostgresServer::start();
        four_replicas_refresh_once_per_expiry(Backend::Postgres, server.url()).await;
    }

    /// The same over TLS (`sslmode=verify-full`, a private CA made at test time).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_four_replicas_refresh_once_per_expiry_over_tls() {
        let tls = tls::TlsPostgres::start(&["localhost", "127.0.0.1"]);
        four_replicas_refresh_once_per_expiry(Backend::Postgres, tls.url("verify-full")).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_killed_holder_before_rotation_loses_nothing() {
        let server = servers::PostgresServer::start();
        killed_holder_before_rotation_loses_nothing(Backend::Postgres, server.url()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_killed_holder_after_rotation_gets_typed_error() {
        let server = servers::PostgresServer::start();
        killed_holder_after_rotation_gets_typed_error(Backend::Postgres, server.url()).await;
    }
}
