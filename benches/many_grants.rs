//! The hot path with many grants, beside the true floor, in one run:
//!
//! - `floor`: an arc-swap load, one `Instant::now()` and an `Arc` clone;
//! - `floor/N`: the same over N distinct tokens called round robin: what the processor's
//!   caches make of N grants' worth of memory before any library code runs;
//! - `source`: one `RefreshingTokenSource`, its cached token;
//! - `handles/N`: N grants of one `TokenManager`, their handles held, called round robin;
//! - `lookup/N`: `manager.source(key).access_token()` round robin over N keys (the
//!   manager's cache lookup included).
//!
//! Quote ratios to `floor` and to `source` (the machines are shared and noisy).

use std::hint::black_box;
use std::time::Instant;

use arc_swap::ArcSwapOption;
use criterion::{Criterion, criterion_group, criterion_main};
use futures_util::FutureExt;
use time::OffsetDateTime;
use tokenkeeper::{
    AccessToken, ClientCredentials, MemoryStore, ProviderProfile, RefreshToken,
    RefreshingTokenSource, TokenManager, TokenSet,
};

fn fresh_set(i: usize) -> TokenSet {
    let now = OffsetDateTime::now_utc();
    let mut set = TokenSet::new(AccessToken::new(format!("at-bench-{i}")), now);
    set.refresh_token = Some(RefreshToken::new(format!("rt-bench-{i}")));
    set.expires_at = Some(now + time::Duration::hours(10));
    set
}

fn profile() -> ProviderProfile {
    ProviderProfile::generic(url::Url::parse("https://provider.invalid/token").unwrap())
}

/// A manager holding `n` loaded grants, and their keys.
fn manager(runtime: &tokio::runtime::Runtime, n: usize) -> (TokenManager, Vec<String>) {
    let store = MemoryStore::new();
    let keys: Vec<String> = (0..n).map(|i| format!("user-{i}")).collect();
    for (i, key) in keys.iter().enumerate() {
        store.put(key, fresh_set(i));
    }
    let manager = TokenManager::builder(profile(), ClientCredentials::new("id", "secret"))
        .store(store)
        .capacity(u64::try_from(n).unwrap() * 2)
        .build()
        .unwrap();
    runtime.block_on(async {
        for key in &keys {
            manager.source(key).unwrap().access_token().await.unwrap();
        }
    });
    (manager, keys)
}

/// The floor: one arc-swap load, one monotonic clock read, one Arc clone.
struct Floor(ArcSwapOption<(AccessToken, Instant)>);

impl Floor {
    fn access_token(&self) -> Option<AccessToken> {
        let guard = self.0.load();
        let (token, fresh_until) = guard.as_deref()?;
        (Instant::now() < *fresh_until).then(|| token.clone())
    }
}

fn bench(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let floor = Floor(ArcSwapOption::from_pointee((
        AccessToken::new("at-bench"),
        Instant::now() + std::time::Duration::from_secs(36_000),
    )));
    let store = MemoryStore::new();
    store.put("bench", fresh_set(0));
    let source = RefreshingTokenSource::builder(profile(), ClientCredentials::new("id", "secret"))
        .store(store)
        .key("bench")
        .build()
        .unwrap();
    runtime.block_on(source.access_token()).unwrap();

    let mut group = c.benchmark_group("many_grants");
    group.bench_function("floor", |b| b.iter(|| black_box(floor.access_token())));
    group.bench_function("source", |b| {
        b.iter(|| black_box(source.access_token().now_or_never().unwrap().unwrap()))
    });
    for n in [1, 1_000, 100_000] {
        let floors: Vec<Floor> = (0..n)
            .map(|i| {
                Floor(ArcSwapOption::from_pointee((
                    AccessToken::new(format!("at-bench-{i}")),
                    Instant::now() + std::time::Duration::from_secs(36_000),
                )))
            })
            .collect();
        let mut next = 0;
        group.bench_function(format!("floor/{n}"), |b| {
            b.iter(|| {
                next = (next + 1) % n;
                black_box(floors[next].access_token())
            })
        });
        drop(floors);
        let (manager, keys) = manager(&runtime, n);
        let handles: Vec<RefreshingTokenSource> =
            keys.iter().map(|k| manager.source(k).unwrap()).collect();
        let mut next = 0;
        group.bench_function(format!("handles/{n}"), |b| {
            b.iter(|| {
                next = (next + 1) % n;
                black_box(
                    handles[next]
                        .access_token()
                        .now_or_never()
                        .unwrap()
                        .unwrap(),
                )
            })
        });
        let mut next = 0;
        group.bench_function(format!("lookup/{n}"), |b| {
            b.iter(|| {
                next = (next + 1) % n;
                let source = manager.source(&keys[next]).unwrap();
                black_box(source.access_token().now_or_never().unwrap().unwrap())
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
