//! Configuration mistakes are `Error::Config` at `build()`, never transient errors that
//! would be retried forever.

use std::time::Duration;

use tokenkeeper::testing::{Mode, Simulator};
use tokenkeeper::{Error, FileStore, RefreshingTokenSource};

#[tokio::test]
async fn an_invalid_profile_header_is_a_configuration_error_at_build() {
    let sim = Simulator::builder(Mode::Lucid).start().await.unwrap();
    for header in [("Bad Header", "v"), ("X-Ok", "line\nbreak")] {
        let mut profile = sim.profile();
        profile
            .request_headers
            .push((header.0.to_owned(), header.1.to_owned()));
        let built = RefreshingTokenSource::builder(profile, sim.credentials()).build();
        match built {
            Err(Error::Config(message)) => {
                assert!(
                    !message.contains("line\nbreak"),
                    "values are never quoted: {message}"
                )
            }
            other => panic!("{header:?}: {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_key_the_store_cannot_hold_is_a_configuration_error_at_build() {
    let sim = Simulator::builder(Mode::Lucid).start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let built = RefreshingTokenSource::builder(sim.profile(), sim.credentials())
        .store(FileStore::new(dir.path()))
        .key("k".repeat(300))
        .build();
    assert!(matches!(built, Err(Error::Config(_))), "{built:?}");
    let built = RefreshingTokenSource::builder(sim.profile(), sim.credentials())
        .key("")
        .build();
    assert!(matches!(built, Err(Error::Config(_))), "{built:?}");
}

/// A loopback token URL is reached directly, even with a proxy configured in the
/// environment (which could not reach this machine's loopback).
#[tokio::test]
async fn a_loopback_token_url_never_goes_through_http_proxy() {
    // The proxy is a port nobody listens on: a request through it would fail to connect.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    // SAFETY: this test binary's only test that reads or writes the environment.
    unsafe {
        std::env::set_var("HTTP_PROXY", &proxy);
        std::env::set_var("http_proxy", &proxy);
        std::env::set_var("ALL_PROXY", &proxy);
    }
    let sim = Simulator::builder(Mode::Lucid).start().await.unwrap();
    let mut profile = sim.profile();
    profile.request_timeout = Duration::from_secs(5);
    let source = RefreshingTokenSource::builder(profile, sim.credentials())
        .initial_refresh_token(sim.issue_grant())
        .build()
        .unwrap();
    source
        .access_token()
        .await
        .expect("the simulator on loopback is reached directly");
    assert_eq!(sim.counters().refreshes, 1);
}

/// A store URL the store cannot use (an unsupported scheme, text that is no URL) is a
/// configuration mistake, `StoreError::Misconfigured` naming the cause, not the
/// retry-later `Unavailable`. (`rediss://` is always supported: TLS is built in.)
#[cfg(feature = "redis")]
#[tokio::test]
async fn an_unusable_redis_url_is_a_configuration_error() {
    use tokenkeeper::store::StoreError;
    use tokenkeeper::store::redis::RedisStore;
    for url in ["http://127.0.0.1:6379", "not a url", "redis://[::1"] {
        match RedisStore::connect(url).await {
            Err(StoreError::Misconfigured(why)) => {
                assert!(why.to_lowercase().contains("url"), "{url}: {why}")
            }
            other => panic!("{url}: {other:?}"),
        }
    }
}

/// The same for PostgreSQL connection strings.
#[cfg(feature = "postgres")]
#[tokio::test]
async fn an_unusable_postgres_connection_string_is_a_configuration_error() {
    use tokenkeeper::store::StoreError;
    use tokenkeeper::store::postgres::PostgresStore;
    for config in [
        "mysql://localhost/db",
        "postgres://localhost:notaport/db",
        "host=localhost sslmode=sometimes",
    ] {
        match PostgresStore::connect(config).await {
            Err(StoreError::Misconfigured(why)) => assert!(!why.is_empty(), "{config}"),
            other => panic!("{config}: {other:?}"),
        }
    }
}
