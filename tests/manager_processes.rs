//! `TokenManager` across processes: 1,000 grants, four real processes sharing one Redis
//! (then one PostgreSQL), each running 2,500 concurrent callers spread over the 1,000
//! keys, all starting at the same wall-clock instant with every access token expired
//! (10,000 callers in all, ten per grant, every grant wanted by every process at once).
//! What must hold: every caller served, every caller of one grant (whatever its process)
//! given the same token, exactly one refresh per grant, no refresh token presented twice,
//! and the store holding each grant's live refresh token afterwards.
//!
//! The test binary re-executes itself: `manager_processes_child` is the child's entry
//! point, a no-op unless `TK_MANAGER_PROCESSES_CHILD` holds its configuration.
#![cfg(all(feature = "manager", any(feature = "redis", feature = "postgres")))]

#[path = "support/children.rs"]
mod children;
#[path = "support/servers.rs"]
mod servers;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Child;
use std::sync::Arc;
use std::time::{Duration, Instant};

use children::Backend;
use serde::{Deserialize, Serialize};
use tokenkeeper::testing::{Mode, Simulator};
use tokenkeeper::{ClientCredentials, ProviderProfile, TokenManager, TokenStore};

const CHILD_ENV: &str = "TK_MANAGER_PROCESSES_CHILD";
const PROCESSES: usize = 4;
const GRANTS: usize = 1_000;
const CALLERS_PER_PROCESS: usize = 2_500;
/// How long after the parent spawns the children they all start calling: time to start,
/// connect and get ready.
const START_LEAD: Duration = Duration::from_secs(3);

fn key(i: usize) -> String {
    format!("user-{i:05}")
}

/// The grant caller `caller` of process `process` asks for: callers numbered across
/// processes, round robin over the grants, so that every process wants every grant.
fn grant_of(process: usize, caller: usize) -> usize {
    (process * CALLERS_PER_PROCESS + caller) % GRANTS
}

fn now_ms() -> i64 {
    i64::try_from(time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000).unwrap()
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct ChildConfig {
    backend: Backend,
    store_url: String,
    token_url: String,
    process: usize,
    /// The wall-clock instant (ms since 1970) at which every child's callers start.
    start_ms: i64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct ChildReport {
    /// Callers served.
    served: usize,
    /// Failed callers: how many, and the first few errors.
    failed: usize,
    errors: Vec<String>,
    /// Per grant, the distinct tokens its callers in this process got.
    tokens: BTreeMap<usize, BTreeSet<String>>,
    /// How late after the common start instant this child was ready (negative: early).
    late_ms: i64,
    /// From the start instant to the last caller served.
    burst_ms: u64,
    /// Summed over this process's grants.
    refreshes: u64,
    adoptions: u64,
    store_failures: u64,
    engines_created: u64,
    unsaved_at_end: usize,
}

/// The child process's entry point (a no-op when run as an ordinary test).
#[test]
fn manager_processes_child() {
    children::run_if_child(CHILD_ENV, run_child);
}

async fn run_child(config: ChildConfig) -> ChildReport {
    let store = children::connect(config.backend, &config.store_url, None).await;
    let profile = ProviderProfile::lucid().with_token_url(config.token_url.parse().unwrap());
    let manager =
        TokenManager::builder(profile, ClientCredentials::new("sim-client", "sim-secret"))
            .shared_store(store)
            .build()
            .unwrap();
    // The start instant on this process's monotonic clock.
    let late_ms = now_ms() - config.start_ms;
    let start =
        tokio::time::Instant::now() + Duration::from_millis(u64::try_from(-late_ms).unwrap_or(0));
    let mut callers = tokio::task::JoinSet::new();
    for caller in 0..CALLERS_PER_PROCESS {
        let grant = grant_of(config.process, caller);
        let manager = manager.clone();
        callers.spawn(async move {
            tokio::time::sleep_until(start).await;
            let token = async { manager.source(&key(grant))?.access_token().await }.await;
            (grant, token, start.elapsed())
        });
    }
    let mut report = ChildReport {
        late_ms,
        ..ChildReport::default()
    };
    while let Some(done) = callers.join_next().await {
        let (grant, token, elapsed) = done.expect("a caller panicked");
        report.burst_ms = report
            .burst_ms
            .max(u64::try_from(elapsed.as_millis()).unwrap());
        match token {
            Ok(token) => {
                report.served += 1;
                report
                    .tokens
                    .entry(grant)
                    .or_default()
                    .insert(token.secret().to_owned());
            }
            Err(e) => {
                report.failed += 1;
                if report.errors.len() < 10 {
                    report.errors.push(format!("grant {grant}: {e:?}"));
                }
            }
        }
    }
    // Let any save being retried land before exiting.
    let sources: Vec<_> = (0..GRANTS)
        .map(|i| manager.source(&key(i)).unwrap())
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    while sources.iter().any(|s| s.status().rotation_unsaved) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for source in &sources {
        let status = source.status();
        report.refreshes += status.metrics.refreshes;
        report.adoptions += status.metrics.adoptions;
        report.store_failures += status.metrics.store_failures;
        report.unsaved_at_end += usize::from(status.rotation_unsaved);
    }
    report.engines_created = manager.status().engines_created;
    report
}

/// One backend at a time: eight child processes on two cores would measure the machine.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Stores `GRANTS` grants of `sim` in `store` (their refresh tokens alone, as an import
/// would: every access token expired), through one manager, 32 at a time.
async fn import(sim: &Simulator, store: Arc<dyn TokenStore>) {
    let manager = TokenManager::builder(sim.profile(), sim.credentials())
        .shared_store(store)
        .build()
        .unwrap();
    let permits = Arc::new(tokio::sync::Semaphore::new(32));
    let mut imports = tokio::task::JoinSet::new();
    for i in 0..GRANTS {
        // Grant number i of the simulator is stored under key(i).
        let refresh_token = sim.issue_grant();
        let source = manager.source(&key(i)).unwrap();
        let permit = Arc::clone(&permits).acquire_owned().await.unwrap();
        imports.spawn(async move {
            let _permit = permit;
            source.import_refresh_token(refresh_token).await
        });
    }
    while let Some(done) = imports.join_next().await {
        done.unwrap().expect("import a grant");
    }
}

async fn thousand_grants_four_processes(backend: Backend, server_url: String) {
    let _alone = ONE_AT_A_TIME.lock().await;
    let began = Instant::now();
    let sim = Simulator::builder(Mode::Lucid).start().await.unwrap();
    children::prepare(backend, &server_url).await;
    let direct = children::connect(backend, &server_url, None).await;
    import(&sim, Arc::clone(&direct)).await;
    let imported = began.elapsed();

    let start_ms = now_ms() + i64::try_from(START_LEAD.as_millis()).unwrap();
    let children: Vec<Child> = (0..PROCESSES)
        .map(|process| {
            let config = ChildConfig {
                backend,
                store_url: server_url.clone(),
                token_url: sim.token_url().to_string(),
                process,
                start_ms,
            };
            children::spawn("manager_processes_child", CHILD_ENV, &config)
        })
        .collect();
    // Waiting for the children blocks: off the runtime, which serves the simulator.
    let reports: Vec<ChildReport> = tokio::task::spawn_blocking(move || {
        children
            .into_iter()
            .map(children::report_of::<ChildReport>)
            .collect()
    })
    .await
    .unwrap();

    let counters = sim.counters();
    let served: usize = reports.iter().map(|r| r.served).sum();
    let failed: usize = reports.iter().map(|r| r.failed).sum();
    let sum = |f: fn(&ChildReport) -> u64| reports.iter().map(f).sum::<u64>();
    println!(
        "{backend:?}: {PROCESSES} processes x {CALLERS_PER_PROCESS} callers over {GRANTS} grants: \
         {served} served, {failed} failed; {} refreshes, {} reuse, {} invalid_grant; \
         per process: refreshes {:?}, adoptions {:?}, store failures {:?}, ready {:?} ms \
         after the start instant, last caller served {:?} ms after it; import {imported:?}, \
         whole test {:?}",
        counters.refreshes,
        counters.reuse_attempts,
        counters.invalid_grant,
        reports.iter().map(|r| r.refreshes).collect::<Vec<_>>(),
        reports.iter().map(|r| r.adoptions).collect::<Vec<_>>(),
        reports.iter().map(|r| r.store_failures).collect::<Vec<_>>(),
        reports.iter().map(|r| r.late_ms).collect::<Vec<_>>(),
        reports.iter().map(|r| r.burst_ms).collect::<Vec<_>>(),
        began.elapsed(),
    );
    for (process, report) in reports.iter().enumerate() {
        assert!(
            report.errors.is_empty(),
            "process {process}: {} callers failed: {:?}",
            report.failed,
            report.errors
        );
        assert_eq!(report.served, CALLERS_PER_PROCESS, "process {process}");
        assert_eq!(
            report.tokens.len(),
            GRANTS,
            "process {process} wanted every grant"
        );
        assert_eq!(
            report.engines_created, GRANTS as u64,
            "process {process}: one engine per grant"
        );
        assert_eq!(
            report.unsaved_at_end, 0,
            "process {process}: every rotation saved"
        );
    }
    assert_eq!(
        served,
        PROCESSES * CALLERS_PER_PROCESS,
        "every caller served"
    );
    // Every caller of one grant, in whichever process, got the one token of its refresh.
    for grant in 0..GRANTS {
        let tokens: BTreeSet<&String> = reports
            .iter()
            .flat_map(|r| r.tokens.get(&grant).into_iter().flatten())
            .collect();
        assert_eq!(
            tokens.len(),
            1,
            "grant {grant}: every caller across the processes gets the same token"
        );
    }
    assert_eq!(
        counters.reuse_attempts, 0,
        "no refresh token presented twice"
    );
    assert_eq!(counters.revoked_grants, 0);
    assert_eq!(counters.invalid_grant, 0);
    assert_eq!(
        counters.refreshes, GRANTS as u64,
        "exactly one refresh request per grant across the processes"
    );
    assert_eq!(sum(|r| r.refreshes), GRANTS as u64);
    for grant in 0..GRANTS {
        let stored = direct
            .load(&key(grant))
            .await
            .unwrap()
            .expect("the grant is stored")
            .value;
        assert_eq!(
            stored.refresh_token.as_ref().map(|t| t.secret().to_owned()),
            sim.current_refresh_token(grant),
            "grant {grant}: the store holds its live refresh token"
        );
        assert!(
            stored.rotation.is_none(),
            "grant {grant}: nothing left in flight"
        );
    }
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_thousand_grants_ten_thousand_callers_in_four_processes_refresh_once_each() {
    let server = servers::RedisServer::start_persistent();
    thousand_grants_four_processes(Backend::Redis, server.url()).await;
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_thousand_grants_ten_thousand_callers_in_four_processes_refresh_once_each() {
    let server = servers::PostgresServer::start();
    thousand_grants_four_processes(Backend::Postgres, server.url()).await;
}
