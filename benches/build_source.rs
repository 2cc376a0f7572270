//! What building a source costs: `RefreshingTokenSource::builder(..).build()` (which
//! shares the process's HTTP client), beside what every build cost before sources
//! shared one, measured in the same run:
//!
//! - `reqwest client`: building a `reqwest::Client` as the library did for each source
//!   (no redirects, timeouts), which loads the TLS roots.
//!
//! Quote the source's figure as a ratio to it. `cargo bench --bench build_source`

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use tokenkeeper::{ClientCredentials, MemoryStore, ProviderProfile, RefreshingTokenSource};

fn build_source(c: &mut Criterion) {
    let profile =
        ProviderProfile::generic(url::Url::parse("https://provider.invalid/token").unwrap());
    let mut group = c.benchmark_group("build_source");
    group
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    group.bench_function("reqwest client (the old per-source cost)", |b| {
        b.iter(|| {
            black_box(
                reqwest::Client::builder()
                    .redirect(reqwest::redirect::Policy::none())
                    .connect_timeout(profile.connect_timeout)
                    .timeout(profile.request_timeout)
                    .build()
                    .unwrap(),
            )
        })
    });
    let store = MemoryStore::new();
    group.bench_function("source", |b| {
        b.iter(|| {
            black_box(
                RefreshingTokenSource::builder(
                    profile.clone(),
                    ClientCredentials::new("id", "secret"),
                )
                .store(store.clone())
                .key("user")
                .initial_refresh_token("rt")
                .build()
                .unwrap(),
            )
        })
    });
    group.finish();
}

criterion_group!(benches, build_source);
criterion_main!(benches);
