//! Chaos: 10,000 refresh cycles against the simulator with 20% injected faults. No time
//! passes for token lifetimes or backoffs (a `ManualClock` jumps past them); only faults
//! that hang cost real time (the request timeout).

use std::collections::BTreeMap;
use std::error::Error as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokenkeeper::testing::{Fault, Mode, Simulator};
use tokenkeeper::{Error, ManualClock, MemoryStore, RefreshingTokenSource, TransientKind};

const CYCLES: usize = 10_000;
/// Independent grants refreshed concurrently, so that the hangs' timeouts overlap.
const WORKERS: usize = 4;
const FAULT_RATE: f64 = 0.2;
const REQUEST_TIMEOUT: Duration = Duration::from_millis(100);
const HANG: Duration = Duration::from_millis(400);
const ACCESS_LIFETIME: Duration = Duration::from_secs(3600);

/// What a failed `access_token` call was.
fn kind_of(error: &Error) -> String {
    match error {
        Error::Transient { kind, .. } => match kind {
            TransientKind::ServerError(status) => format!("Transient(ServerError({status}))"),
            kind => format!("Transient({kind:?})"),
        },
        Error::InvalidResponse { .. } => "InvalidResponse".into(),
        other => format!("UNEXPECTED {other:?}"),
    }
}

/// True when the refresh task panicked: the library reports it as `Interrupted` with the
/// task's `JoinError` as the source.
fn panicked(error: &Error) -> bool {
    let mut source = error.source();
    while let Some(e) = source {
        if e.downcast_ref::<tokio::task::JoinError>()
            .is_some_and(|j| j.is_panic())
        {
            return true;
        }
        source = e.source();
    }
    false
}

#[derive(Default)]
struct Tally {
    successes: u64,
    failures: BTreeMap<String, u64>,
    lost_refresh_tokens: u64,
    panics: u64,
}

async fn run_worker(
    worker: usize,
    seed: String,
    cycles: usize,
    sim: Arc<Simulator>,
    clock: ManualClock,
    store: MemoryStore,
) -> (Tally, RefreshingTokenSource) {
    let key = format!("chaos-{worker}");
    let mut profile = sim.profile();
    profile.request_timeout = REQUEST_TIMEOUT;
    let source = RefreshingTokenSource::builder(profile, sim.credentials())
        .store(store.clone())
        .key(&key)
        .clock(clock.clone())
        .build()
        .unwrap();
    source.import_refresh_token(seed).await.unwrap();
    let mut tally = Tally::default();
    for _ in 0..cycles {
        cycle(worker, &sim, &clock, &store, &key, &source, &mut tally).await;
        // Past the token's expiry: the next call must refresh.
        clock.advance(time::Duration::try_from(ACCESS_LIFETIME).unwrap() + time::Duration::SECOND);
    }
    (tally, source)
}

/// One refresh cycle: call until a token comes back, jumping the clock past each backoff.
async fn cycle(
    grant: usize,
    sim: &Simulator,
    clock: &ManualClock,
    store: &MemoryStore,
    key: &str,
    source: &RefreshingTokenSource,
    tally: &mut Tally,
) {
    loop {
        match source.access_token().await {
            Ok(_) => {
                tally.successes += 1;
                let stored = store
                    .get(key)
                    .and_then(|set| set.value.refresh_token)
                    .map(|t| t.secret().to_owned());
                if stored != sim.current_refresh_token(grant) {
                    tally.lost_refresh_tokens += 1;
                }
                return;
            }
            Err(e) => {
                if panicked(&e) {
                    tally.panics += 1;
                }
                *tally.failures.entry(kind_of(&e)).or_default() += 1;
                // Past the backoff (and the provider's Retry-After): a step is at most the
                // 600 s cap.
                let wait = e.retry_after().unwrap_or(Duration::from_secs(600));
                clock.advance(time::Duration::try_from(wait).unwrap() + time::Duration::SECOND);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_refresh_cycles_with_twenty_percent_faults_lose_nothing() {
    let clock = ManualClock::starting_now();
    let sim = Arc::new(
        Simulator::builder(Mode::Lucid)
            .access_lifetime(ACCESS_LIFETIME)
            .clock(clock.clone())
            .faults(
                FAULT_RATE,
                vec![
                    Fault::ServerError(500),
                    Fault::RateLimited(1),
                    Fault::Hang(HANG),
                    Fault::Garbage,
                    Fault::Truncated,
                    Fault::HtmlError,
                    Fault::Empty,
                ],
                0x5eed,
            )
            .start()
            .await
            .unwrap(),
    );
    let store = MemoryStore::new();
    // Grant number `worker` is worker `worker`'s.
    let seeds: Vec<String> = (0..WORKERS).map(|_| sim.issue_grant()).collect();

    let started = Instant::now();
    let workers: Vec<_> = seeds
        .into_iter()
        .enumerate()
        .map(|(worker, seed)| {
            tokio::spawn(run_worker(
                worker,
                seed,
                CYCLES / WORKERS,
                Arc::clone(&sim),
                clock.clone(),
                store.clone(),
            ))
        })
        .collect();
    let mut total = Tally::default();
    let mut sources = Vec::new();
    for worker in workers {
        let (tally, source) = worker.await.expect("no worker panicked");
        total.successes += tally.successes;
        total.lost_refresh_tokens += tally.lost_refresh_tokens;
        total.panics += tally.panics;
        for (kind, n) in tally.failures {
            *total.failures.entry(kind).or_default() += n;
        }
        sources.push(source);
    }
    let elapsed = started.elapsed();
    let counters = sim.counters();
    let failures: u64 = total.failures.values().sum();
    println!(
        "chaos: {CYCLES} cycles in {elapsed:.1?}: {} requests, {} faults injected, {} successes, {failures} failures {:?}, {} refreshes, {} lost refresh tokens",
        counters.requests,
        counters.faults,
        total.successes,
        total.failures,
        counters.refreshes,
        total.lost_refresh_tokens,
    );

    assert_eq!(
        counters.reuse_attempts, 0,
        "no refresh token presented twice"
    );
    assert_eq!(counters.revoked_grants, 0);
    assert_eq!(counters.invalid_grant, 0);
    assert_eq!(total.panics, 0, "no refresh task panicked");
    assert_eq!(
        total.lost_refresh_tokens, 0,
        "the store always holds the live refresh token"
    );
    assert_eq!(total.successes, CYCLES as u64);
    assert_eq!(
        counters.refreshes, total.successes,
        "every rotation the provider made reached the store"
    );
    assert!(counters.faults > 0);
    let unexpected: Vec<_> = total
        .failures
        .keys()
        .filter(|k| k.starts_with("UNEXPECTED"))
        .collect();
    assert!(unexpected.is_empty(), "untyped failures: {unexpected:?}");

    // Faults stop: the very next cycle succeeds.
    sim.set_fault_rate(0.0);
    clock.advance(time::Duration::hours(2));
    for (grant, source) in sources.iter().enumerate() {
        source
            .access_token()
            .await
            .expect("recovered once faults stopped");
        let stored = store
            .get(&format!("chaos-{grant}"))
            .and_then(|set| set.value.refresh_token)
            .map(|t| t.secret().to_owned());
        assert_eq!(stored, sim.current_refresh_token(grant));
    }
}
