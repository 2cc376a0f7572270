//! One `FileStore` save (under a lease held across saves, compare-and-swap on the
//! version) in a directory holding 10 keys and in one holding 100,000 keys, measured in
//! the same run. A save's cost must not depend on how many keys share the directory:
//! the ratio printed at the end should be close to 1.
//!
//! The 100,000 token files are plain copies of a record a real save wrote (written with
//! `std::fs::write`, not saved one by one, to keep the setup to seconds), in a temporary
//! directory removed afterwards.
//!
//! `cargo bench --bench file_store_save -- --warm-up-time 1 --measurement-time 5`

use std::hint::black_box;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group};
use time::OffsetDateTime;
use tokenkeeper::store::Lease;
use tokenkeeper::{AccessToken, FileStore, RefreshToken, TokenSet, TokenStore};

const KEY: &str = "bench:save";
const TTL: Duration = Duration::from_secs(30);

fn token_set(serial: u64) -> TokenSet {
    let now = OffsetDateTime::now_utc();
    let mut set = TokenSet::new(AccessToken::new(format!("at-bench-{serial}")), now);
    set.refresh_token = Some(RefreshToken::new(format!("rt-bench-{serial}")));
    set.expires_at = Some(now + time::Duration::hours(1));
    set.refresh_expires_at = Some(now + time::Duration::days(180));
    set.scopes = vec!["read".into(), "write".into()];
    set
}

/// A store in a new temporary directory holding `keys` token files (`KEY`'s included),
/// and a lease on `KEY` held for the whole benchmark.
struct Setup {
    _dir: tempfile::TempDir,
    store: FileStore,
    lease: Lease,
    version: u64,
}

fn setup(runtime: &tokio::runtime::Runtime, keys: usize) -> Setup {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let store = FileStore::new(dir.path());
    let lease = runtime
        .block_on(store.lease(KEY, TTL))
        .expect("the lease on the benchmarked key");
    let version = runtime
        .block_on(store.save(KEY, &token_set(0), None, &lease))
        .expect("the first save");
    // A real record, copied under the other keys' file names.
    let record = std::fs::read(store.path_for(KEY).expect("a valid key")).expect("the record");
    for i in 1..keys {
        let path = store
            .path_for(&format!("bench:other-{i}"))
            .expect("a valid key");
        std::fs::write(path, &record).expect("write a token file");
    }
    Setup {
        _dir: dir,
        store,
        lease,
        version,
    }
}

/// Mean time of one save, per case, as measured by the benchmark (for the ratio).
static MEANS: Mutex<Vec<(String, Duration)>> = Mutex::new(Vec::new());

fn bench_saves(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let mut group = c.benchmark_group("file_store_save");
    group.sample_size(10);
    for keys in [10usize, 100_000] {
        let started = Instant::now();
        let mut setup = setup(&runtime, keys);
        eprintln!(
            "file_store_save: {keys} keys set up in {:.1?}",
            started.elapsed()
        );
        let next = token_set(1);
        let (mut total, mut count) = (Duration::ZERO, 0u64);
        let name = format!("{keys} keys");
        group.bench_function(&name, |b| {
            b.iter_custom(|iters| {
                let started = Instant::now();
                for _ in 0..iters {
                    setup.version = black_box(
                        runtime
                            .block_on(setup.store.save(
                                KEY,
                                &next,
                                Some(setup.version),
                                &setup.lease,
                            ))
                            .expect("save"),
                    );
                }
                let took = started.elapsed();
                total += took;
                count += iters;
                took
            })
        });
        if let Some(mean) = total.checked_div(u32::try_from(count).unwrap_or(u32::MAX)) {
            MEANS
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((name, mean));
        }
        runtime
            .block_on(setup.lease.release())
            .expect("release the lease");
    }
    group.finish();
}

criterion_group!(benches, bench_saves);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    let means = MEANS.lock().unwrap_or_else(|e| e.into_inner());
    for (name, mean) in means.iter() {
        eprintln!("file_store_save/{name}: {mean:.3?} per save (all iterations)");
    }
    if let [(_, few), (_, many)] = means.as_slice()
        && !few.is_zero()
    {
        eprintln!(
            "file_store_save: 100,000 keys / 10 keys = {:.2}",
            many.as_secs_f64() / few.as_secs_f64()
        );
    }
}
