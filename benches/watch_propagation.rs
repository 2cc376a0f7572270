//! Propagation through the store's watch: how long after one store client starts a save
//! another client's source serves the saved token from its hot path. Per store: memory
//! (in process), files (inotify), Redis (pub/sub) and PostgreSQL (NOTIFY), real servers
//! started with the test helpers. The writer and the follower use separate store
//! clients (separate connections and subscriptions; for files, separate watches), as two
//! processes would; they share this process only so that one clock times both ends.
//!
//! Each iteration saves a new set (its own lease, compare-and-swap) and calls the
//! follower's `access_token()` until it returns the new token. The baseline, measured in
//! the same run, is the writer's save alone: propagation is quoted as a ratio to it,
//! and its p50 and p99 over every iteration are printed at the end of each store's group.
//!
//! `cargo bench --features redis,postgres --bench watch_propagation`

#[path = "../tests/support/servers.rs"]
mod servers;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode, criterion_group, criterion_main};
use time::OffsetDateTime;
use tokenkeeper::{
    AccessToken, ClientCredentials, FileStore, MemoryStore, ProviderProfile, RefreshingTokenSource,
    TokenSet, TokenStore,
};

const KEY: &str = "propagation";

/// The writer's side: saves a new set under its own lease, returning the token it holds.
struct Writer {
    store: Arc<dyn TokenStore>,
    version: Option<u64>,
    round: u64,
}

impl Writer {
    async fn save_next(&mut self) -> AccessToken {
        self.round += 1;
        let token = AccessToken::new(format!("access-{}", self.round));
        let mut set = TokenSet::new(token.clone(), OffsetDateTime::now_utc());
        set.expires_at = Some(OffsetDateTime::now_utc() + time::Duration::hours(1));
        let lease = self
            .store
            .lease(KEY, Duration::from_secs(10))
            .await
            .expect("lease");
        let version = self
            .store
            .save(KEY, &set, self.version, &lease)
            .await
            .expect("save");
        lease.release().await.expect("release");
        self.version = Some(version);
        token
    }
}

/// Calls `source` until it serves `token`.
async fn until_served(source: &RefreshingTokenSource, token: &AccessToken) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while &source.access_token().await.expect("a token") != token {
        assert!(Instant::now() < deadline, "not propagated within 5 s");
        tokio::task::yield_now().await;
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let at = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(at).copied().unwrap_or_default()
}

fn bench_store(
    c: &mut Criterion,
    runtime: &tokio::runtime::Runtime,
    name: &str,
    writer: Arc<dyn TokenStore>,
    follower: Arc<dyn TokenStore>,
) {
    // The token endpoint is never asked: every set is fresh for an hour.
    let profile = ProviderProfile::generic("http://127.0.0.1:9/token".parse().unwrap());
    let source = RefreshingTokenSource::builder(profile, ClientCredentials::new("id", "secret"))
        .shared_store(follower)
        .key(KEY)
        .build()
        .expect("the follower's source");
    let writer = Arc::new(tokio::sync::Mutex::new(Writer {
        store: writer,
        version: None,
        round: 0,
    }));
    // The first set, adopted by a read (which starts the follower's watch), and time
    // for the subscription to be established.
    runtime.block_on(async {
        let mut writer = writer.lock().await;
        let first = writer.save_next().await;
        assert_eq!(source.access_token().await.expect("adopted"), first);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let second = writer.save_next().await;
        until_served(&source, &second).await;
    });

    let mut group = c.benchmark_group(format!("watch_propagation/{name}"));
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(4));
    let saves = Arc::new(Mutex::new(Vec::new()));
    let propagations = Arc::new(Mutex::new(Vec::new()));
    group.bench_function("save (baseline)", |b| {
        b.iter_custom(|iters| {
            let (writer, saves) = (Arc::clone(&writer), Arc::clone(&saves));
            runtime.block_on(async move {
                let mut writer = writer.lock().await;
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let started = Instant::now();
                    writer.save_next().await;
                    let took = started.elapsed();
                    total += took;
                    saves.lock().unwrap().push(took);
                }
                total
            })
        })
    });
    group.bench_function("save to served", |b| {
        b.iter_custom(|iters| {
            let (writer, propagations, source) = (
                Arc::clone(&writer),
                Arc::clone(&propagations),
                source.clone(),
            );
            runtime.block_on(async move {
                let mut writer = writer.lock().await;
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let started = Instant::now();
                    let token = writer.save_next().await;
                    until_served(&source, &token).await;
                    let took = started.elapsed();
                    total += took;
                    propagations.lock().unwrap().push(took);
                }
                total
            })
        })
    });
    group.finish();
    let report = |what: &str, samples: &Mutex<Vec<Duration>>| {
        let mut samples = samples.lock().unwrap().clone();
        samples.sort();
        let (p50, p99) = (percentile(&samples, 0.5), percentile(&samples, 0.99));
        println!(
            "watch_propagation/{name}: {what}: p50 {p50:?}, p99 {p99:?} over {} iterations",
            samples.len()
        );
        (p50, p99)
    };
    let (save50, save99) = report("save", &saves);
    let (prop50, prop99) = report("save to served", &propagations);
    println!(
        "watch_propagation/{name}: save to served / save: p50 {:.2}x, p99 {:.2}x",
        prop50.as_secs_f64() / save50.as_secs_f64(),
        prop99.as_secs_f64() / save99.as_secs_f64()
    );
}

fn watch_propagation(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    let memory = Arc::new(MemoryStore::new());
    bench_store(c, &runtime, "memory", memory.clone(), memory);

    let dir = tempfile::tempdir().unwrap();
    bench_store(
        c,
        &runtime,
        "file",
        Arc::new(FileStore::new(dir.path())),
        Arc::new(FileStore::new(dir.path())),
    );

    #[cfg(feature = "redis")]
    {
        let redis = servers::RedisServer::start();
        let connect = || {
            runtime
                .block_on(tokenkeeper::store::redis::RedisStore::connect(&redis.url()))
                .expect("connect to redis")
        };
        bench_store(
            c,
            &runtime,
            "redis",
            Arc::new(connect()),
            Arc::new(connect()),
        );
    }

    #[cfg(feature = "postgres")]
    {
        let postgres = servers::PostgresServer::start();
        let connect = || {
            runtime.block_on(async {
                let store = tokenkeeper::store::postgres::PostgresStore::connect(&postgres.url())
                    .await
                    .expect("connect to postgres");
                store.create_schema().await.expect("schema");
                store
            })
        };
        bench_store(
            c,
            &runtime,
            "postgres",
            Arc::new(connect()),
            Arc::new(connect()),
        );
    }
}

criterion_group!(benches, watch_propagation);
criterion_main!(benches);
