//! The cached hot path of `access_token()`, single task and contended, beside two
//! baselines measured in the same run:
//!
//! - `mutex`: a `Mutex<TokenSet>` cache, the common approach;
//! - `floor`: an arc-swap load, an `Arc` clone and one clock read, the least any correct
//!   cache can do.
//!
//! Quote results as ratios to `floor` (the machines are shared and noisy).

use std::hint::black_box;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use criterion::{Criterion, criterion_group, criterion_main};
use futures_util::FutureExt;
use time::OffsetDateTime;
use tokenkeeper::{
    AccessToken, ClientCredentials, MemoryStore, ProviderProfile, RefreshToken,
    RefreshingTokenSource, TokenSet,
};

const THREADS: usize = 2;

fn fresh_set() -> TokenSet {
    let now = OffsetDateTime::now_utc();
    let mut set = TokenSet::new(AccessToken::new("at-bench"), now);
    set.refresh_token = Some(RefreshToken::new("rt-bench"));
    set.expires_at = Some(now + time::Duration::hours(10));
    set
}

fn tokenkeeper_source(runtime: &tokio::runtime::Runtime) -> Arc<RefreshingTokenSource> {
    let store = MemoryStore::new();
    store.put("bench", fresh_set());
    let source = RefreshingTokenSource::builder(
        ProviderProfile::generic(url::Url::parse("https://provider.invalid/token").unwrap()),
        ClientCredentials::new("id", "secret"),
    )
    .store(store)
    .key("bench")
    .build()
    .unwrap();
    // The first call loads the stored set into the cache.
    runtime.block_on(source.access_token()).unwrap();
    Arc::new(source)
}

/// The common approach: a mutex around the token set.
struct MutexSource(Mutex<TokenSet>);

impl MutexSource {
    async fn access_token(&self) -> Option<AccessToken> {
        let set = self.0.lock().unwrap();
        let now = OffsetDateTime::now_utc();
        (set.expires_at? > now).then(|| set.access_token.clone())?
    }
}

/// The floor: one arc-swap load, one Arc clone, one clock read.
struct Floor(ArcSwapOption<(AccessToken, OffsetDateTime)>);

impl Floor {
    fn access_token(&self) -> Option<AccessToken> {
        let guard = self.0.load();
        let (token, expires_at) = guard.as_deref()?;
        (OffsetDateTime::now_utc() < *expires_at).then(|| token.clone())
    }
}

/// Per-call time when `THREADS` threads call `op` at once.
fn contended(iters: u64, op: Arc<dyn Fn() + Send + Sync>) -> Duration {
    let barrier = Arc::new(std::sync::Barrier::new(THREADS));
    let handles: Vec<_> = (0..THREADS)
        .map(|_| {
            let (op, barrier) = (Arc::clone(&op), Arc::clone(&barrier));
            thread::spawn(move || {
                barrier.wait();
                let start = Instant::now();
                for _ in 0..iters {
                    op();
                }
                start.elapsed()
            })
        })
        .collect();
    let total: Duration = handles.into_iter().map(|h| h.join().unwrap()).sum();
    total / THREADS as u32
}

fn bench(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let source = tokenkeeper_source(&runtime);
    let set = fresh_set();
    let mutex = Arc::new(MutexSource(Mutex::new(set.clone())));
    let floor = Arc::new(Floor(ArcSwapOption::from_pointee((
        set.access_token.clone().unwrap(),
        set.expires_at.unwrap(),
    ))));

    let mut single = c.benchmark_group("access_token/single");
    single.bench_function("floor", |b| b.iter(|| black_box(floor.access_token())));
    single.bench_function("tokenkeeper", |b| {
        b.iter(|| black_box(source.access_token().now_or_never().unwrap().unwrap()))
    });
    single.bench_function("mutex", |b| {
        b.iter(|| black_box(mutex.access_token().now_or_never().unwrap()))
    });
    single.finish();

    let mut group = c.benchmark_group(format!("access_token/contended_{THREADS}_threads"));
    let f = Arc::clone(&floor);
    group.bench_function("floor", |b| {
        let f = Arc::clone(&f);
        b.iter_custom(|iters| {
            let f = Arc::clone(&f);
            contended(iters, Arc::new(move || drop(black_box(f.access_token()))))
        })
    });
    group.bench_function("tokenkeeper", |b| {
        b.iter_custom(|iters| {
            let s = Arc::clone(&source);
            contended(
                iters,
                Arc::new(move || drop(black_box(s.access_token().now_or_never().unwrap()))),
            )
        })
    });
    group.bench_function("mutex", |b| {
        b.iter_custom(|iters| {
            let m = Arc::clone(&mutex);
            contended(
                iters,
                Arc::new(move || drop(black_box(m.access_token().now_or_never().unwrap()))),
            )
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
