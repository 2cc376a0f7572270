//! `RedisStore` against a real `redis-server` (feature `redis`; the server comes from
//! Debian's `redis-server` package, see scripts/install-test-deps.sh).
#![cfg(feature = "redis")]

#[path = "support/logs.rs"]
mod logs;
#[path = "support/proxy.rs"]
mod proxy;
#[path = "support/scenarios.rs"]
mod scenarios;
#[path = "support/servers.rs"]
mod servers;

use std::sync::Arc;

use logs::Captured;
use proxy::FaultProxy;
use servers::RedisServer;
use tokenkeeper::TokenStore;
use tokenkeeper::store::StoreError;
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
/// token). A hash written before the index existed is not due until its next save (or
/// `backfill_due`, tested below).
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

/// A raw connection, for what the store does not do (old layouts, server settings).
async fn raw(server: &RedisServer) -> redis::aio::MultiplexedConnection {
    redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// Writes `set` the way versions before the due index did: the hash alone.
async fn hset_before_the_index(
    raw: &mut redis::aio::MultiplexedConnection,
    prefix: &str,
    key: &str,
    body: &[u8],
) {
    let _: () = redis::cmd("HSET")
        .arg(format!("{prefix}token:{key}"))
        .arg("version")
        .arg("1")
        .arg("body")
        .arg(body)
        .query_async(raw)
        .await
        .unwrap();
}

async fn zscore(
    raw: &mut redis::aio::MultiplexedConnection,
    prefix: &str,
    key: &str,
) -> Option<f64> {
    redis::cmd("ZSCORE")
        .arg(format!("{prefix}due"))
        .arg(key)
        .query_async(raw)
        .await
        .unwrap()
}

/// A set due (its keep-alive instant) in 1971, and that instant in ms.
fn due_in_1971(tag: &str, offset_s: i64) -> (tokenkeeper::TokenSet, time::OffsetDateTime, f64) {
    let mut set = sample(tag);
    set.obtained_at =
        time::macros::datetime!(1971-03-01 0:00 UTC) + time::Duration::seconds(offset_s);
    set.refresh_expires_at = Some(set.obtained_at + time::Duration::seconds(1000));
    let at = set.keep_alive_at().expect("a keep-alive instant");
    let ms = (at.unix_timestamp_nanos() / 1_000_000) as f64;
    (set, at, ms)
}

/// Sets saved before the due index existed are never due, so a sweep would let idle
/// grants die: `backfill_due` indexes them (over several `SCAN` pages), each at its
/// keep-alive instant, and nothing else (not a set without a keep-alive instant, not an
/// unreadable one, not a key already indexed); it is idempotent. The first `due` of a
/// store warns, naming `backfill_due`, while such sets exist, and only then.
#[tokio::test(flavor = "current_thread")]
async fn redis_backfill_due_indexes_sets_saved_before_the_index() {
    use std::time::Duration;
    let captured = Captured::default();
    let _logs = tracing::subscriber::set_default(
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_writer(captured.clone())
            .finish(),
    );
    let server = RedisServer::start();
    let prefix = "backfill:";
    let store = connect(&server).await.with_prefix(prefix);
    let mut raw = raw(&server).await;

    // Saved by this version: indexed already, at an instant backfill must not move.
    let indexed = unique_key("backfill-indexed");
    let (indexed_set, _, indexed_ms) = due_in_1971("indexed", 0);
    let lease = store
        .lease(&indexed, Duration::from_secs(10))
        .await
        .unwrap();
    store
        .save(&indexed, &indexed_set, None, &lease)
        .await
        .unwrap();
    lease.release().await.unwrap();

    // Saved before the index: 2,500 due sets (more than one SCAN page), one without a
    // refresh token, one unreadable.
    let mut old = Vec::new();
    let mut pipe = redis::pipe();
    for i in 0..2_500 {
        let key = unique_key("backfill-old");
        let (set, _, ms) = due_in_1971(&key, i);
        pipe.cmd("HSET")
            .arg(format!("{prefix}token:{key}"))
            .arg("version")
            .arg("1")
            .arg("body")
            .arg(tokenkeeper::store::encode(&set, 1))
            .ignore();
        old.push((key, ms));
    }
    let _: () = pipe.query_async(&mut raw).await.unwrap();
    let revoked = unique_key("backfill-no-refresh-token");
    let (mut revoked_set, _, _) = due_in_1971("revoked", 0);
    revoked_set.refresh_token = None;
    hset_before_the_index(
        &mut raw,
        prefix,
        &revoked,
        &tokenkeeper::store::encode(&revoked_set, 1),
    )
    .await;
    let unreadable = unique_key("backfill-unreadable");
    hset_before_the_index(&mut raw, prefix, &unreadable, b"not a token record").await;

    let after_everything = time::macros::datetime!(1972-01-01 0:00 UTC);
    assert_eq!(
        store.due(after_everything, usize::MAX).await.unwrap(),
        [indexed.as_str()],
        "sets saved before the index are not due"
    );
    let warned = |logged: String| {
        logged
            .lines()
            .any(|l| l.contains("WARN") && l.contains("RedisStore::backfill_due()"))
    };
    assert!(
        warned(captured.text()),
        "the first due warns: {:?}",
        captured.text()
    );

    assert_eq!(store.backfill_due().await.unwrap(), 2_500);
    for (key, ms) in &old {
        assert_eq!(zscore(&mut raw, prefix, key).await, Some(*ms), "{key}");
    }
    assert_eq!(zscore(&mut raw, prefix, &indexed).await, Some(indexed_ms));
    assert_eq!(zscore(&mut raw, prefix, &revoked).await, None);
    assert_eq!(zscore(&mut raw, prefix, &unreadable).await, None);
    assert_eq!(
        store.due(after_everything, usize::MAX).await.unwrap().len(),
        2_501
    );
    assert_eq!(store.backfill_due().await.unwrap(), 0, "idempotent");

    // Once backfilled, a new store's first due has nothing to warn about.
    let store = connect(&server).await.with_prefix(prefix);
    captured.clear();
    store.due(after_everything, 1).await.unwrap();
    assert!(!warned(captured.text()), "{:?}", captured.text());
}

/// `backfill_due` runs while the store is in use: a set a save replaced after the
/// backfill read it is never indexed at the instant it read. Here every old set is
/// revoked (saved without a refresh token) during the backfill: none may end up due.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_backfill_due_never_indexes_a_set_a_save_replaced() {
    use std::time::Duration;
    let server = RedisServer::start();
    let prefix = "race:";
    let store = connect(&server).await.with_prefix(prefix);
    let mut raw = raw(&server).await;
    let (set, at, _) = due_in_1971("race", 0);
    let body = tokenkeeper::store::encode(&set, 1);
    let keys: Vec<String> = (0..600).map(|_| unique_key("race")).collect();
    let mut pipe = redis::pipe();
    for key in &keys {
        pipe.cmd("HSET")
            .arg(format!("{prefix}token:{key}"))
            .arg("version")
            .arg("1")
            .arg("body")
            .arg(&body)
            .ignore();
    }
    let _: () = pipe.query_async(&mut raw).await.unwrap();

    let mut revoked = set.clone();
    revoked.refresh_token = None;
    let revoking: Vec<_> = keys
        .chunks(75)
        .map(|chunk| {
            let (store, chunk, revoked) = (store.clone(), chunk.to_vec(), revoked.clone());
            tokio::spawn(async move {
                for key in chunk.iter().rev() {
                    let lease = store.lease(key, Duration::from_secs(10)).await.unwrap();
                    store.save(key, &revoked, Some(1), &lease).await.unwrap();
                    lease.release().await.unwrap();
                }
            })
        })
        .collect();
    let backfilled = store.backfill_due().await.unwrap();
    for task in revoking {
        task.await.unwrap();
    }
    let due = store.due(at, usize::MAX).await.unwrap();
    assert!(
        due.is_empty(),
        "{} revoked sets listed as due ({backfilled} backfilled)",
        due.len()
    );
}

/// At `maxmemory` with `noeviction`, a save is refused whole (its first write, the hash,
/// is refused), and the index still agrees with the stored set: a set that needs
/// keep-alive never leaves the index, whether the refused save would have added or
/// removed its key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_save_refused_at_maxmemory_leaves_the_index_agreeing_with_the_set() {
    use std::time::Duration;
    let server = RedisServer::start();
    let prefix = "oom:";
    let store = connect(&server).await.with_prefix(prefix);
    let mut raw = raw(&server).await;
    let key = unique_key("oom");
    let (set, at, ms) = due_in_1971("oom", 0);
    let lease = store.lease(&key, Duration::from_secs(30)).await.unwrap();
    let v1 = store.save(&key, &set, None, &lease).await.unwrap();

    let used: String = redis::cmd("INFO")
        .arg("memory")
        .query_async(&mut raw)
        .await
        .unwrap();
    let used: u64 = used
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let config_set =
        async |raw: &mut redis::aio::MultiplexedConnection, name: &str, value: String| {
            let _: () = redis::cmd("CONFIG")
                .arg("SET")
                .arg(name)
                .arg(value)
                .query_async(raw)
                .await
                .unwrap();
        };
    config_set(&mut raw, "maxmemory-policy", "noeviction".into()).await;
    config_set(&mut raw, "maxmemory", (used / 2).to_string()).await;

    let mut revoked = set.clone();
    revoked.refresh_token = None;
    let (later, _, _) = due_in_1971("oom-later", 500);
    for (what, next) in [("removed", &revoked), ("moved", &later)] {
        let refused = store.save(&key, next, Some(v1), &lease).await;
        assert!(
            matches!(refused, Err(StoreError::Unavailable(_))),
            "a save at maxmemory is refused (its key would be {what}): {refused:?}"
        );
        let stored = store.load(&key).await.unwrap().unwrap();
        assert_eq!(
            (stored.value, stored.version),
            (set.clone(), v1),
            "nothing written"
        );
        assert_eq!(
            zscore(&mut raw, prefix, &key).await,
            Some(ms),
            "the key stays indexed at its stored set's instant"
        );
        assert_eq!(store.due(at, usize::MAX).await.unwrap(), [key.as_str()]);
    }

    config_set(&mut raw, "maxmemory", "0".into()).await;
    store.save(&key, &revoked, Some(v1), &lease).await.unwrap();
    lease.release().await.unwrap();
    assert_eq!(zscore(&mut raw, prefix, &key).await, None);
}

/// A Redis Cluster node is refused at connect, with the reason: see `refuse_cluster` in
/// src/store/redis.rs (the save's atomic step spans the key and the due index; a failover
/// can lose an acknowledged rotation).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cluster_node_is_refused_with_the_reason() {
    let server = RedisServer::start_with_args(&[
        "--cluster-enabled",
        "yes",
        "--cluster-config-file",
        "nodes.conf",
    ]);
    match RedisStore::connect(&server.url()).await {
        Err(StoreError::Misconfigured(why)) => {
            assert!(
                why.contains("Redis Cluster") && why.contains("failover"),
                "{why}"
            )
        }
        other => panic!("a cluster node is refused, got {other:?}"),
    }
    // A standalone server is not.
    let standalone = RedisServer::start();
    RedisStore::connect(&standalone.url()).await.unwrap();
}

#[path = "support/tls.rs"]
mod tls;

/// `rediss://` with a private CA made at test time: the conformance suite passes; the
/// system's roots, a certificate for another host name and a root without TLS are
/// refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_with_a_private_ca_conforms_and_refuses_what_it_should() {
    let tls = tls::TlsRedis::start(&["localhost", "127.0.0.1"]);
    let store = RedisStore::connect_with_root_certificates(&tls.url(), tls.ca.pem.as_bytes())
        .await
        .expect("connect over TLS with the private CA");
    conformance::run(&store, Leases::Expiring).await;

    // The system's roots do not know the private CA: a configuration error, not a
    // retry-later one.
    match RedisStore::connect(&tls.url()).await {
        Err(StoreError::Misconfigured(why)) => assert!(why.contains("certificate"), "{why}"),
        other => panic!("an unknown issuer is refused, got {other:?}"),
    }
    // Roots are for TLS only.
    let plain = tls.server.url();
    assert!(matches!(
        RedisStore::connect_with_root_certificates(&plain, tls.ca.pem.as_bytes()).await,
        Err(StoreError::Misconfigured(_))
    ));

    // A certificate for another host name.
    let other = tls::TlsRedis::start(&["other.example"]);
    match RedisStore::connect_with_root_certificates(&other.url(), other.ca.pem.as_bytes()).await {
        Err(StoreError::Misconfigured(why)) => assert!(why.contains("certificate"), "{why}"),
        other => panic!("a certificate for another host is refused, got {other:?}"),
    }
}
