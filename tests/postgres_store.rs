//! `PostgresStore` against a real PostgreSQL cluster (feature `postgres`; the server comes
//! from Debian's `postgresql` package, see scripts/install-test-deps.sh).
#![cfg(feature = "postgres")]

#[path = "support/logs.rs"]
mod logs;
#[path = "support/proxy.rs"]
mod proxy;
#[path = "support/scenarios.rs"]
mod scenarios;
#[path = "support/servers.rs"]
mod servers;

use std::sync::Arc;
use std::time::{Duration, Instant};

use logs::Captured;
use proxy::{FaultProxy, NextFault};
use servers::PostgresServer;
use tokenkeeper::store::StoreError;
use tokenkeeper::store::conformance::{self, Leases, sample, unique_key};
use tokenkeeper::store::postgres::PostgresStore;
use tokenkeeper::testing::{Mode, Simulator};
use tokenkeeper::{Error, RefreshingTokenSource, TokenStore};

async fn connect(server: &PostgresServer) -> PostgresStore {
    let store = PostgresStore::connect(&server.url())
        .await
        .expect("connect to the test PostgreSQL server");
    store.create_schema().await.expect("create the schema");
    store
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store_conforms() {
    let server = PostgresServer::start();
    conformance::run(&connect(&server).await, Leases::Expiring).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store_conforms_with_another_table() {
    let server = PostgresServer::start();
    let store = PostgresStore::connect(&server.url())
        .await
        .unwrap()
        .with_table("public.other_tokens");
    store.create_schema().await.unwrap();
    // Idempotent, and concurrent calls are fine.
    let (a, b) = tokio::join!(store.create_schema(), store.create_schema());
    a.unwrap();
    b.unwrap();
    conformance::run(&store, Leases::Expiring).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store_persists_across_instances() {
    let server = PostgresServer::start();
    conformance::persists_across_instances(&connect(&server).await, &connect(&server).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_paused_holder_is_fenced_off() {
    let server = PostgresServer::start();
    scenarios::paused_holder_is_fenced_off(&connect(&server).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_source_takes_over_an_abandoned_lease() {
    let server = PostgresServer::start();
    scenarios::a_source_takes_over_an_abandoned_lease(Arc::new(connect(&server).await)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart_gives_storage_errors_then_recovers() {
    let mut server = PostgresServer::start();
    let store: Arc<dyn TokenStore> = Arc::new(connect(&server).await);
    scenarios::outage_then_recovery(store, &mut server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_dying_during_a_refresh_loses_nothing() {
    let mut server = PostgresServer::start();
    let store: Arc<dyn TokenStore> = Arc::new(connect(&server).await);
    scenarios::store_dies_during_a_refresh(store, &mut server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store_debug_hides_the_password() {
    let server = PostgresServer::start();
    let url = format!(
        "postgresql://postgres:s3cr3t-pw@127.0.0.1:{}/postgres",
        server.port()
    );
    // Trust authentication ignores the password.
    let store = PostgresStore::connect(&url).await.unwrap();
    let shown = format!("{store:?}");
    assert!(!shown.contains("s3cr3t-pw"), "{shown}");
    assert!(shown.contains("127.0.0.1"), "{shown}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_unreachable_server_is_unavailable() {
    let port = servers::free_port();
    let result = PostgresStore::connect(&format!(
        "postgresql://postgres:s3cr3t-pw@127.0.0.1:{port}/postgres"
    ))
    .await;
    match result {
        Err(e @ tokenkeeper::store::StoreError::Unavailable(_)) => {
            assert!(!format!("{e:?}").contains("s3cr3t-pw"));
        }
        other => panic!("got {other:?}"),
    }
}

/// Twelve takers wait for a lease on a pool of eight connections: none of them holds a
/// connection while it waits, so the holder's save gets one at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_lease_waiters_never_starve_the_holders_save() {
    let server = PostgresServer::start();
    let store = connect(&server).await;
    let key = unique_key("starve");
    let holder = store.lease(&key, Duration::from_secs(20)).await.unwrap();
    let waiters: Vec<_> = (0..12)
        .map(|_| {
            let (store, key) = (store.clone(), key.clone());
            tokio::spawn(async move {
                let lease = store.lease(&key, Duration::from_secs(20)).await?;
                lease.release().await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    store
        .save(&key, &sample("held"), None, &holder)
        .await
        .expect("the holder saves while twelve takers wait");
    holder.release().await.unwrap();
    for waiter in waiters {
        waiter
            .await
            .unwrap()
            .expect("each waiter gets the lease in turn");
    }
}

/// A connection the network silently stops carrying (a proxy holding every byte) fails
/// the operation within the operation timeout, and is closed: the next operation, on a
/// new connection, works at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_silently_dropped_connection_stalls_nothing_for_long() {
    let server = PostgresServer::start();
    connect(&server).await;
    let proxy = FaultProxy::in_front_of(server.port()).await;
    let store = PostgresStore::connect(&proxy.url_via(&server.url()))
        .await
        .unwrap()
        .with_operation_timeout(Duration::from_secs(1));
    let key = unique_key("dropped");
    assert!(store.load(&key).await.unwrap().is_none());

    proxy.fault_next(NextFault::Delay(Duration::from_secs(30)));
    let started = Instant::now();
    let stalled = store.load(&key).await;
    assert!(
        matches!(stalled, Err(StoreError::Timeout(_))),
        "{stalled:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );

    let started = Instant::now();
    assert!(
        store.load(&key).await.unwrap().is_none(),
        "the next operation works"
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "on a new connection, not behind the stalled one: {:?}",
        started.elapsed()
    );
}

/// A pooled connection the network closed (after a cut, the pool can hold several) costs
/// an idempotent operation nothing: a read and a release run again on another
/// connection. Without it, the first call after an outage fails on each dead connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_idempotent_operations_survive_a_closed_pooled_connection() {
    let server = PostgresServer::start();
    connect(&server).await;
    let proxy = FaultProxy::in_front_of(server.port()).await;
    let store = PostgresStore::connect(&proxy.url_via(&server.url()))
        .await
        .unwrap();
    let key = unique_key("closed");
    assert!(store.load(&key).await.unwrap().is_none());

    proxy.fault_next(NextFault::CutBefore);
    let read = store.load(&key).await;
    assert!(read.as_ref().is_ok_and(Option::is_none), "{read:?}");
    assert_eq!(
        proxy.counters().cut_before,
        1,
        "the read's connection was cut"
    );

    let lease = store.lease(&key, Duration::from_secs(30)).await.unwrap();
    proxy.fault_next(NextFault::CutBefore);
    lease
        .release()
        .await
        .expect("released on another connection");
    assert_eq!(
        proxy.counters().cut_before,
        2,
        "the release's connection was cut"
    );
    let again = tokio::time::timeout(
        Duration::from_secs(5),
        store.lease(&key, Duration::from_secs(5)),
    )
    .await;
    assert!(
        matches!(again, Ok(Ok(_))),
        "the lease is free at once, not after its 30 s: {again:?}"
    );
}

/// A lease grant whose answer was lost is recovered at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_lease_grant_whose_answer_was_lost_is_not_lost() {
    let server = PostgresServer::start();
    connect(&server).await;
    let proxy = FaultProxy::in_front_of(server.port()).await;
    let store = PostgresStore::connect(&proxy.url_via(&server.url()))
        .await
        .unwrap();
    scenarios::a_lease_grant_whose_answer_was_lost_is_not_lost(&store, &proxy).await;
}

/// A newcomer who forgot `create_schema()` gets an error naming the table and the call,
/// which says to fix the configuration rather than to retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_missing_table_is_named_with_the_call_that_creates_it() {
    let server = PostgresServer::start();
    let store = PostgresStore::connect(&server.url()).await.unwrap();
    let err = store.load("k").await.unwrap_err();
    let shown = err.to_string();
    assert!(matches!(err, StoreError::Misconfigured(_)), "{err:?}");
    assert!(shown.contains("tokenkeeper_tokens"), "{shown}");
    assert!(shown.contains("create_schema"), "{shown}");

    let sim = Simulator::builder(Mode::Lucid).start().await.unwrap();
    let source = RefreshingTokenSource::builder(sim.profile(), sim.credentials())
        .store(store)
        .initial_refresh_token(sim.issue_grant())
        .build()
        .unwrap();
    let err = source.access_token().await.unwrap_err();
    assert!(
        matches!(err, Error::Storage(StoreError::Misconfigured(_))),
        "{err:?}"
    );
    assert!(!err.is_transient(), "not a retry-later error: {err:?}");
    assert_eq!(sim.counters().requests, 0);
}

/// The table as versions before `due_at` created it.
const TABLE_BEFORE_DUE_AT: &str = "CREATE TABLE tokenkeeper_tokens (
    key              text PRIMARY KEY,
    version          bigint,
    body             text,
    lease_owner      text,
    lease_fencing    bigint NOT NULL DEFAULT 0,
    lease_expires_at timestamptz,
    CHECK ((version IS NULL) = (body IS NULL))
)";

/// A raw connection, for what the store does not do (old schemas, catalogs, roles).
async fn raw(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(connection);
    client
}

/// A set due (its keep-alive instant) in 1971, and that instant.
fn due_in_1971(tag: &str) -> (tokenkeeper::TokenSet, time::OffsetDateTime) {
    let mut set = sample(tag);
    set.obtained_at = time::macros::datetime!(1971-03-01 0:00 UTC);
    set.refresh_expires_at = Some(set.obtained_at + time::Duration::seconds(1000));
    let at = set.keep_alive_at().expect("a keep-alive instant");
    (set, at)
}

/// Saves through `store` under a lease of its own.
async fn save_leased(
    store: &PostgresStore,
    key: &str,
    set: &tokenkeeper::TokenSet,
    expected: Option<u64>,
) -> Result<u64, StoreError> {
    let lease = store.lease(key, Duration::from_secs(10)).await.unwrap();
    let saved = store.save(key, set, expected, &lease).await;
    lease.release().await.unwrap();
    saved
}

/// What `due_at` holds for `key`, as text (`None`: NULL).
async fn due_at_of(client: &tokio_postgres::Client, key: &str) -> Option<String> {
    client
        .query_one(
            "SELECT due_at::text FROM tokenkeeper_tokens WHERE key = $1",
            &[&key],
        )
        .await
        .unwrap()
        .get(0)
}

/// A table made before `due_at` existed: reads and saves keep working (a save warns,
/// once, that `create_schema` should run), `due` names `create_schema`, and
/// `create_schema` upgrades it in place: the rows are kept and are due at once (it fills
/// `due_at`), through an index.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_create_schema_upgrades_a_table_made_by_an_earlier_version() {
    let captured = Captured::default();
    let _logs = tracing::subscriber::set_default(
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_writer(captured.clone())
            .finish(),
    );
    let server = PostgresServer::start();
    let client = raw(&server.url()).await;
    client.batch_execute(TABLE_BEFORE_DUE_AT).await.unwrap();
    let key = unique_key("upgrade");
    let (set, due_at) = due_in_1971("from-before");
    let body = String::from_utf8(tokenkeeper::store::encode(&set, 1)).unwrap();
    client
        .execute(
            "INSERT INTO tokenkeeper_tokens (key, version, body) VALUES ($1, 1, $2)",
            &[&key, &body],
        )
        .await
        .unwrap();

    let store = PostgresStore::connect(&server.url()).await.unwrap();
    let loaded = store.load(&key).await.unwrap().expect("the old row");
    assert_eq!(loaded.value, set, "reads work before the upgrade");
    let (mut newer, _) = due_in_1971("saved-before-the-upgrade");
    newer.obtained_at = set.obtained_at;
    newer.refresh_expires_at = set.refresh_expires_at;
    assert_eq!(
        save_leased(&store, &key, &newer, Some(1)).await.unwrap(),
        2,
        "saves work before the upgrade"
    );
    let other = unique_key("upgrade-new-key");
    assert_eq!(save_leased(&store, &other, &newer, None).await.unwrap(), 1);
    let loaded = store.load(&key).await.unwrap().unwrap();
    assert_eq!((loaded.value, loaded.version), (newer.clone(), 2));
    let warnings: Vec<String> = captured
        .text()
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("create_schema()"))
        .map(str::to_owned)
        .collect();
    assert_eq!(warnings.len(), 1, "warned once: {warnings:?}");
    match store.due(due_at, 10).await {
        Err(StoreError::Misconfigured(why)) => assert!(why.contains("create_schema"), "{why}"),
        other => panic!("due before the upgrade names create_schema, got {other:?}"),
    }

    assert_eq!(store.table_version().await.unwrap(), Some(1));
    let (a, b) = tokio::join!(store.create_schema(), store.create_schema());
    a.expect("upgrade");
    b.expect("upgrade, concurrently");
    store.create_schema().await.expect("and again: idempotent");
    assert_eq!(
        store.table_version().await.unwrap(),
        Some(tokenkeeper::store::postgres::TABLE_VERSION)
    );
    let loaded = store.load(&key).await.unwrap().expect("the row is kept");
    assert_eq!((loaded.value, loaded.version), (newer.clone(), 2));
    let mut due = store.due(due_at, 10).await.unwrap();
    due.sort();
    let mut expected = [key.clone(), other.clone()];
    expected.sort();
    assert_eq!(
        due, expected,
        "rows saved before the upgrade are due at once: create_schema filled due_at"
    );
    let indexes: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_indexes \
             WHERE tablename = 'tokenkeeper_tokens' AND indexdef LIKE '%(due_at)%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(indexes, 1, "due_at is indexed");
}

/// `create_schema` fills `due_at` of every row that lacks it, page after page: each
/// row's keep-alive instant, `'infinity'` for a set without one (so that the next call
/// reads nothing), nothing for a row whose set cannot be read or a row only leased; a
/// row that has `due_at` is not touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_create_schema_fills_due_at_of_rows_saved_before_it() {
    let server = PostgresServer::start();
    let client = raw(&server.url()).await;
    client.batch_execute(TABLE_BEFORE_DUE_AT).await.unwrap();
    let mut keys = Vec::new();
    let mut bodies = Vec::new();
    for i in 0..2_345 {
        let key = unique_key("fill");
        let (mut set, _) = due_in_1971(&key);
        set.obtained_at += time::Duration::seconds(i);
        set.refresh_expires_at = Some(set.obtained_at + time::Duration::seconds(1000));
        bodies.push(String::from_utf8(tokenkeeper::store::encode(&set, 1)).unwrap());
        keys.push(key);
    }
    client
        .execute(
            "INSERT INTO tokenkeeper_tokens (key, version, body) \
             SELECT * FROM unnest($1::text[], array_fill(1::bigint, ARRAY[cardinality($1)]), $2::text[])",
            &[&keys, &bodies],
        )
        .await
        .unwrap();
    let (mut revoked, _) = due_in_1971("fill-revoked");
    revoked.refresh_token = None;
    let revoked_body = String::from_utf8(tokenkeeper::store::encode(&revoked, 1)).unwrap();
    let (revoked_key, unreadable, leased) = (
        unique_key("fill-revoked"),
        unique_key("fill-unreadable"),
        unique_key("fill-leased"),
    );
    client
        .execute(
            "INSERT INTO tokenkeeper_tokens (key, version, body) VALUES ($1, 1, $2), ($3, 1, 'not a token record')",
            &[&revoked_key, &revoked_body, &unreadable],
        )
        .await
        .unwrap();

    let store = connect(&server).await;
    drop(store.lease(&leased, Duration::from_secs(10)).await.unwrap());
    let everything = time::macros::datetime!(1972-01-01 0:00 UTC);
    let due = store.due(everything, usize::MAX).await.unwrap();
    assert_eq!(due.len(), keys.len(), "every due row, once");
    assert_eq!(due, keys, "earliest first: the order they were made in");
    assert_eq!(
        due_at_of(&client, &revoked_key).await.as_deref(),
        Some("infinity")
    );
    assert_eq!(due_at_of(&client, &unreadable).await, None);
    assert_eq!(due_at_of(&client, &leased).await, None);

    // A row whose due_at is known is not read again, let alone rewritten.
    client
        .execute(
            "UPDATE tokenkeeper_tokens SET due_at = 'epoch' WHERE key = $1",
            &[&keys[7]],
        )
        .await
        .unwrap();
    store.create_schema().await.expect("again");
    assert_eq!(
        store.due(everything, 1).await.unwrap(),
        [keys[7].as_str()],
        "not rewritten"
    );
    assert_eq!(due_at_of(&client, &unreadable).await, None);
}

/// A save between the fill's read and its write wins: the fill writes a row's `due_at`
/// only if the row still holds the version it read. Here an earlier version's replica
/// (its save does not write `due_at`) revokes a row while the fill waits for the row's
/// lock: the row ends up never due, as its set says, not due at the instant read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_create_schema_fill_never_overwrites_a_save_in_between() {
    let server = PostgresServer::start();
    let store = connect(&server).await;
    let client = raw(&server.url()).await;
    let key = unique_key("fill-race");
    let (set, at) = due_in_1971("fill-race");
    let (mut revoked, _) = due_in_1971("fill-race-revoked");
    revoked.refresh_token = None;
    let body = |set, version| String::from_utf8(tokenkeeper::store::encode(set, version)).unwrap();
    // Saved by an earlier version's replica: no due_at.
    client
        .execute(
            "INSERT INTO tokenkeeper_tokens (key, version, body) VALUES ($1, 1, $2)",
            &[&key, &body(&set, 1)],
        )
        .await
        .unwrap();

    // That replica's next save, not committed yet: it holds the row's lock.
    let mut replica = raw(&server.url()).await;
    let saving = replica.transaction().await.unwrap();
    saving
        .execute(
            "UPDATE tokenkeeper_tokens SET version = 2, body = $2 WHERE key = $1",
            &[&key, &body(&revoked, 2)],
        )
        .await
        .unwrap();
    let filling = tokio::spawn({
        let store = store.clone();
        async move { store.create_schema().await }
    });
    // The fill read version 1 and waits for the lock to write it.
    let waited_since = Instant::now();
    loop {
        let waiting: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE wait_event_type = 'Lock' AND query LIKE '%unnest%'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if waiting > 0 {
            break;
        }
        assert!(
            waited_since.elapsed() < Duration::from_secs(4),
            "the fill never waited for the row: {:?}",
            filling.is_finished()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    saving.commit().await.unwrap();
    filling.await.unwrap().expect("create_schema");

    assert!(
        store.due(at, usize::MAX).await.unwrap().is_empty(),
        "the revoked set is not due"
    );
    assert_eq!(due_at_of(&client, &key).await.as_deref(), Some("infinity"));
}

/// PostgreSQL cuts names at 63 bytes: two tables whose names share a long prefix each get
/// their own due index (and a short name keeps the name earlier versions gave it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_tables_sharing_a_long_prefix_each_get_a_due_index() {
    let server = PostgresServer::start();
    let client = raw(&server.url()).await;
    let prefix = "tenant_tokens_".repeat(4);
    let names = [format!("{prefix}_alpha"), format!("{prefix}_beta")];
    assert!(
        names.iter().all(|n| n.len() <= 63 && n.len() > 52),
        "test premise"
    );
    for name in &names {
        let store = PostgresStore::connect(&server.url())
            .await
            .unwrap()
            .with_table(name);
        store.create_schema().await.unwrap();
        conformance::run(&store, Leases::Expiring).await;
    }
    for name in &names {
        let indexes: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_indexes \
                 WHERE tablename = $1 AND indexdef LIKE '%(due_at)%'",
                &[name],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(indexes, 1, "{name} has its due index");
    }
    connect(&server).await;
    let default: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_indexes WHERE indexname = 'tokenkeeper_tokens_due_at_idx'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(default, 1, "the default table's index keeps its name");
}

/// Once the table has `due_at` and its index, `create_schema` changes nothing, so a role
/// that serves tokens without owning the table (the CLI runs `create_schema` at every
/// start) can still run it, and fill `due_at`, even where the index that speeds that up
/// is missing (a table upgraded by a build without it): that index only it cannot make.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_create_schema_on_an_upgraded_table_needs_no_ownership() {
    let server = PostgresServer::start();
    connect(&server).await;
    let client = raw(&server.url()).await;
    let old = unique_key("not-owner-old");
    let (old_set, _) = due_in_1971("not-owner-old");
    client
        .execute(
            "INSERT INTO tokenkeeper_tokens (key, version, body) VALUES ($1, 1, $2)",
            &[
                &old,
                &String::from_utf8(tokenkeeper::store::encode(&old_set, 1)).unwrap(),
            ],
        )
        .await
        .unwrap();
    client
        .batch_execute(
            "DROP INDEX tokenkeeper_tokens_due_at_unknown_idx; \
             CREATE ROLE server LOGIN; \
             GRANT CREATE, USAGE ON SCHEMA public TO server; \
             GRANT SELECT, INSERT, UPDATE ON tokenkeeper_tokens TO server;",
        )
        .await
        .unwrap();
    let url = format!("postgresql://server@127.0.0.1:{}/postgres", server.port());
    let store = PostgresStore::connect(&url).await.unwrap();
    store
        .create_schema()
        .await
        .expect("create_schema by a role that does not own the upgraded table");
    let unknown_index: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_indexes \
             WHERE indexname = 'tokenkeeper_tokens_due_at_unknown_idx'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(unknown_index, 0, "not the owner: not created");
    let key = unique_key("not-owner");
    let (set, due_at) = due_in_1971("not-owner");
    assert_eq!(set.keep_alive_at(), old_set.keep_alive_at(), "test premise");
    let lease = store.lease(&key, Duration::from_secs(10)).await.unwrap();
    store.save(&key, &set, None, &lease).await.unwrap();
    lease.release().await.unwrap();
    let mut due = store.due(due_at, 10).await.unwrap();
    due.sort();
    assert_eq!(due, [old, key], "the old row was filled, the new one saved");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_create_schema_refuses_a_table_of_a_newer_version_and_leaves_it_alone() {
    let server = PostgresServer::start();
    let store = PostgresStore::connect(&server.url()).await.unwrap();
    assert_eq!(store.table_version().await.unwrap(), None, "no table yet");
    store.create_schema().await.unwrap();
    assert_eq!(store.table_version().await.unwrap(), Some(2));
    let client = raw(&server.url()).await;
    let comment: Option<String> = client
        .query_one(
            "SELECT obj_description('tokenkeeper_tokens'::regclass, 'pg_class')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        comment.as_deref(),
        Some("tokenkeeper schema 2"),
        "a new table records its version"
    );
    let key = unique_key("newer");
    let set = sample("newer");
    save_leased(&store, &key, &set, None).await.unwrap();

    // A later tokenkeeper upgraded the table to a version this one does not know.
    client
        .batch_execute(
            "COMMENT ON TABLE tokenkeeper_tokens IS 'tokenkeeper schema 7'; \
             ALTER TABLE tokenkeeper_tokens ADD COLUMN from_the_future int",
        )
        .await
        .unwrap();
    assert_eq!(store.table_version().await.unwrap(), Some(7));
    match store.create_schema().await {
        Err(StoreError::Misconfigured(why)) => {
            assert!(
                why.contains("version 7") && why.contains("upgrade tokenkeeper"),
                "{why}"
            )
        }
        other => panic!("a newer table is a configuration error, got {other:?}"),
    }
    assert_eq!(
        store.table_version().await.unwrap(),
        Some(7),
        "its version is kept"
    );
    let loaded = store.load(&key).await.unwrap().expect("the row is kept");
    assert_eq!(loaded.value, set);
}

#[path = "support/tls.rs"]
mod tls;

/// TLS with certificates made at test time: `verify-full` with the private CA passes the
/// conformance suite over TLS connections; another host's certificate is refused by
/// `verify-full` and accepted by `verify-ca`; the system's roots do not know the CA; and
/// `require` against a server without TLS fails clearly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_over_tls_conforms_and_refuses_what_it_should() {
    let tls = tls::TlsPostgres::start(&["localhost", "127.0.0.1"]);
    let store = PostgresStore::connect(&tls.url("verify-full"))
        .await
        .expect("connect with verify-full and the private CA");
    store.create_schema().await.unwrap();
    conformance::run(&store, Leases::Expiring).await;
    let client = raw(&tls.server.url()).await;
    let encrypted: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE s.ssl AND a.backend_type = 'client backend'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(encrypted >= 1, "the store's connections are encrypted");

    let wrong_name = tls::TlsPostgres::start(&["other.example"]);
    match PostgresStore::connect(&wrong_name.url("verify-full")).await {
        Err(StoreError::Misconfigured(why)) => assert!(why.contains("certificate"), "{why}"),
        other => panic!("verify-full refuses another host's certificate, got {other:?}"),
    }
    PostgresStore::connect(&wrong_name.url("verify-ca"))
        .await
        .expect("verify-ca checks the chain only");
    let system_roots = format!(
        "postgresql://postgres@localhost:{}/postgres?sslmode=verify-full",
        tls.server.port()
    );
    assert!(matches!(
        PostgresStore::connect(&system_roots).await,
        Err(StoreError::Misconfigured(_))
    ));

    let plaintext = PostgresServer::start();
    match PostgresStore::connect(&format!("{}?sslmode=require", plaintext.url())).await {
        Err(StoreError::Misconfigured(why)) => assert!(why.contains("TLS"), "{why}"),
        other => panic!("require against a server without TLS fails clearly, got {other:?}"),
    }
}
