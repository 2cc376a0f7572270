//! The store's share of one refresh, per backend: take the lease, load the token set,
//! save the next one with compare-and-swap, release the lease (no provider HTTP call).
//! MemoryStore is the floor; FileStore, RedisStore and PostgresStore (real servers
//! started here, on loopback, with the test helpers) are measured in the same run.
//!
//! Quote results as ratios to `file` (the machines are shared and noisy). Without the
//! `redis` / `postgres` features those backends are skipped.

#[path = "../tests/support/servers.rs"]
mod servers;

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use time::OffsetDateTime;
use tokenkeeper::{AccessToken, FileStore, MemoryStore, RefreshToken, TokenSet, TokenStore};

const KEY: &str = "bench:refresh";
const TTL: Duration = Duration::from_secs(30);

fn token_set(serial: u64) -> TokenSet {
    let now = OffsetDateTime::now_utc();
    let mut set = TokenSet::new(AccessToken::new(format!("at-bench-{serial}")), now);
    set.refresh_token = Some(RefreshToken::new(format!("rt-bench-{serial}")));
    set.expires_at = Some(now + time::Duration::hours(1));
    set.scopes = vec!["read".into(), "write".into()];
    set
}

/// One refresh's store work; returns the new version.
async fn cycle(store: &dyn TokenStore, next: &TokenSet) -> u64 {
    let lease = store.lease(KEY, TTL).await.expect("lease");
    let current = store.load(KEY).await.expect("load").map(|v| v.version);
    let version = store.save(KEY, next, current, &lease).await.expect("save");
    lease.release().await.expect("release");
    version
}

fn bench_store(
    c: &mut Criterion,
    runtime: &tokio::runtime::Runtime,
    name: &str,
    store: Arc<dyn TokenStore>,
) {
    let next = token_set(1);
    runtime.block_on(cycle(&*store, &next));
    c.bench_function(&format!("store_refresh/{name}"), |b| {
        b.iter(|| black_box(runtime.block_on(cycle(&*store, &next))))
    });
}

fn store_refresh(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    bench_store(c, &runtime, "memory", Arc::new(MemoryStore::new()));

    let dir = tempfile::tempdir().unwrap();
    bench_store(c, &runtime, "file", Arc::new(FileStore::new(dir.path())));

    #[cfg(feature = "redis")]
    {
        let server = servers::RedisServer::start();
        let store = runtime
            .block_on(tokenkeeper::store::redis::RedisStore::connect(
                &server.url(),
            ))
            .expect("connect to redis");
        bench_store(c, &runtime, "redis", Arc::new(store));
    }

    #[cfg(feature = "postgres")]
    {
        let server = servers::PostgresServer::start();
        let store = runtime.block_on(async {
            let store = tokenkeeper::store::postgres::PostgresStore::connect(&server.url())
                .await
                .expect("connect to postgres");
            store.create_schema().await.expect("schema");
            store
        });
        bench_store(c, &runtime, "postgres", Arc::new(store));
    }
}

criterion_group!(benches, store_refresh);
criterion_main!(benches);
