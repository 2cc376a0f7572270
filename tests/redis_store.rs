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
use tokenkeeper::store::conformance::{self, Leases, sample, unique_key};
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

/// The due index is what the module documentation's layout says: the sorted set `p` `due`,
/// member the store key, score the keep-alive instant in milliseconds since the epoch,
/// written by the save script along with the hash (removed when the set has no refresh
/// token). A hash written before the index existed is not due until its next save.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_due_index_is_the_documented_sorted_set() {
    use std::time::Duration;
    let server = RedisServer::start();
    let store = connect(&server).await.with_prefix("layout:");
    let mut raw = redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let mut set = sample("layout");
    set.obtained_at = time::macros::datetime!(1971-03-01 0:00 UTC);
    set.refresh_expires_at = Some(set.obtained_at + time::Duration::milliseconds(1_000_005));
    let due_at = set.keep_alive_at().unwrap();
    let due_ms = i64::try_from(due_at.unix_timestamp_nanos() / 1_000_000).unwrap();
    let zscore = async |raw: &mut redis::aio::MultiplexedConnection, key: &str| {
        redis::cmd("ZSCORE")
            .arg("layout:due")
            .arg(key)
            .query_async::<Option<f64>>(raw)
            .await
            .unwrap()
    };

    let key = unique_key("layout");
    let lease = store.lease(&key, Duration::from_secs(10)).await.unwrap();
    let v1 = store.save(&key, &set, None, &lease).await.unwrap();
    assert_eq!(zscore(&mut raw, &key).await, Some(due_ms as f64));
    assert_eq!(store.due(due_at, 10).await.unwrap(), [key.as_str()]);
    let mut revoked = set.clone();
    revoked.refresh_token = None;
    store.save(&key, &revoked, Some(v1), &lease).await.unwrap();
    lease.release().await.unwrap();
    assert_eq!(zscore(&mut raw, &key).await, None, "removed from the index");
    assert!(store.due(due_at, 10).await.unwrap().is_empty());

    let old = unique_key("layout-before-the-index");
    let _: () = redis::cmd("HSET")
        .arg(format!("layout:token:{old}"))
        .arg("version")
        .arg("1")
        .arg("body")
        .arg(tokenkeeper::store::encode(&set, 1))
        .query_async(&mut raw)
        .await
        .unwrap();
    assert!(
        store.due(due_at, 10).await.unwrap().is_empty(),
        "not due until its next save"
    );
    let lease = store.lease(&old, Duration::from_secs(10)).await.unwrap();
    store.save(&old, &set, Some(1), &lease).await.unwrap();
    lease.release().await.unwrap();
    assert_eq!(store.due(due_at, 10).await.unwrap(), [old]);
}
