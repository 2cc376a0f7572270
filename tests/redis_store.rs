//! `RedisStore` against a real `redis-server` (feature `redis`; the server comes from
//! Debian's `redis-server` package, see scripts/install-test-deps.sh).
#![cfg(feature = "redis")]

#[path = "support/proxy.rs"]
mod proxy;
#[path = "support/scenarios.rs"]
mod scenarios;
#[path = "support/servers.rs"]
mod servers;

use std::sync::Arc;

use proxy::FaultProxy;
use servers::RedisServer;
use tokenkeeper::TokenStore;
use tokenkeeper::store::conformance::{self, Leases};
use tokenkeeper::store::redis::RedisStore;

async fn connect(server: &RedisServer) -> RedisStore {
    RedisStore::connect(&server.url())
        .await
        .expect("connect to the test redis-server")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_store_conforms() {
    let server = RedisServer::start();
    conformance::run(&connect(&server).await, Leases::Expiring).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_store_conforms_with_a_prefix() {
    let server = RedisServer::start();
    let store = connect(&server).await.with_prefix("{app}:tk:");
    conformance::run(&store, Leases::Expiring).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_store_persists_across_instances() {
    let server = RedisServer::start();
    conformance::persists_across_instances(&connect(&server).await, &connect(&server).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_paused_holder_is_fenced_off() {
    let server = RedisServer::start();
    scenarios::paused_holder_is_fenced_off(&connect(&server).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_source_takes_over_an_abandoned_lease() {
    let server = RedisServer::start();
    scenarios::a_source_takes_over_an_abandoned_lease(Arc::new(connect(&server).await)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_gives_storage_errors_then_recovers() {
    let mut server = RedisServer::start_persistent();
    let store: Arc<dyn TokenStore> = Arc::new(connect(&server).await);
    scenarios::outage_then_recovery(store, &mut server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_dying_during_a_refresh_loses_nothing() {
    let mut server = RedisServer::start_persistent();
    let store: Arc<dyn TokenStore> = Arc::new(connect(&server).await);
    scenarios::store_dies_during_a_refresh(store, &mut server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_store_debug_hides_the_password() {
    let server = RedisServer::start();
    // The server has no password; Redis ignores the user-less AUTH only if none is set,
    // so connect without one and check the redaction on a URL that carries one.
    let store = connect(&server).await;
    assert!(format!("{store:?}").contains("127.0.0.1"));
    let with_password = format!("redis://:s3cr3t-pw@127.0.0.1:{}/0", server.port());
    match RedisStore::connect(&with_password).await {
        Ok(store) => assert!(!format!("{store:?}").contains("s3cr3t-pw")),
        Err(e) => {
            assert!(!format!("{e:?}").contains("s3cr3t-pw"));
            assert!(!e.to_string().contains("s3cr3t-pw"));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_unreachable_server_is_unavailable() {
    let port = servers::free_port();
    let result = RedisStore::connect(&format!("redis://127.0.0.1:{port}/0")).await;
    assert!(
        matches!(result, Err(tokenkeeper::store::StoreError::Unavailable(_))),
        "got {result:?}"
    );
}

/// A lease grant whose answer was lost is recovered at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_lease_grant_whose_answer_was_lost_is_not_lost() {
    let server = RedisServer::start();

    let proxy = FaultProxy::in_front_of(server.port()).await;
    let store = RedisStore::connect(&proxy.url_via(&server.url()))
        .await
        .unwrap();
    scenarios::a_lease_grant_whose_answer_was_lost_is_not_lost(&store, &proxy).await;
}

/// A server that keeps nothing on disk can lose every grant on restart: `connect` says
/// so (and logs it). A server with an append-only file gets no such warning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_connect_warns_when_the_server_can_lose_keys() {
    let volatile = RedisServer::start();
    let store = connect(&volatile).await;
    let warnings = store.durability_warnings();
    assert!(
        warnings.iter().any(|w| w.contains("keeps nothing on disk")),
        "{warnings:?}"
    );
    let durable = RedisServer::start_persistent();
    let store = connect(&durable).await;
    assert!(
        store.durability_warnings().is_empty(),
        "{:?}",
        store.durability_warnings()
    );
}
