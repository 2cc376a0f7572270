//! `EncryptedStore` (feature `encryption`): the conformance suite around every backend,
//! key rotation, ciphertexts bound to their key, a wrong key typed and harmless, and no
//! token in what the backends hold (the raw file, the raw Redis values, the raw rows).
#![cfg(feature = "encryption")]

#[path = "support/servers.rs"]
mod servers;

use std::time::Duration;

use tokenkeeper::store::StoreError;
use tokenkeeper::store::conformance::{self, Leases, sample, unique_key};
use tokenkeeper::store::encrypted::{EncryptedStore, EncryptionKey};
use tokenkeeper::testing::{Mode, Simulator};
use tokenkeeper::{Error, FileStore, MemoryStore, RefreshingTokenSource, TokenSet, TokenStore};

fn key(id: &str, byte: u8) -> EncryptionKey {
    EncryptionKey::new(id, [byte; 32]).unwrap()
}

/// Saves `set` under `key` (under a lease), over whatever is there.
async fn put(store: &dyn TokenStore, key: &str, set: &TokenSet) {
    let lease = store.lease(key, Duration::from_secs(5)).await.unwrap();
    let expected = store.load(key).await.ok().flatten().map(|s| s.version);
    store.save(key, set, expected, &lease).await.unwrap();
    lease.release().await.unwrap();
}

/// Refreshes a grant of `sim` through a source over `store`; returns the tokens it now
/// holds (the access token served, the refresh token the simulator holds as current).
async fn refresh_through(store: impl TokenStore, sim: &Simulator) -> Vec<String> {
    let grant = sim.issue_grant();
    let first = grant.clone();
    let source = RefreshingTokenSource::builder(sim.profile(), sim.credentials())
        .store(store)
        .key("sealed-user")
        .initial_refresh_token(grant)
        .build()
        .unwrap();
    let access = source.access_token().await.unwrap();
    let current = sim
        .current_refresh_token(sim.grants() - 1)
        .expect("the rotated refresh token");
    assert_ne!(current, first);
    vec![access.secret().to_owned(), current, first]
}

fn assert_holds_no_token(raw: &[u8], tokens: &[String], what: &str) {
    let raw = String::from_utf8_lossy(raw);
    assert!(!raw.is_empty(), "{what}: nothing read");
    for token in tokens {
        assert!(
            !raw.contains(token.as_str()),
            "{what} holds a token in clear"
        );
    }
    assert!(raw.contains("tk1."), "{what} holds the sealed envelopes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conforms_around_the_memory_and_file_stores() {
    conformance::run(
        &EncryptedStore::new(MemoryStore::new(), key("k1", 1)),
        Leases::Expiring,
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    conformance::run(
        &EncryptedStore::new(FileStore::new(dir.path()), key("k1", 1)),
        Leases::ProcessBound,
    )
    .await;
    conformance::persists_across_instances(
        &EncryptedStore::new(FileStore::new(dir.path()), key("k1", 1)),
        &EncryptedStore::new(FileStore::new(dir.path()), key("k1", 1)),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_file_holds_no_token() {
    let sim = Simulator::builder(Mode::Lucid).start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = EncryptedStore::new(FileStore::new(dir.path()), key("k1", 1));
    let tokens = refresh_through(store, &sim).await;
    let mut raw = Vec::new();
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        raw.extend(std::fs::read(entry.unwrap().path()).unwrap_or_default());
    }
    assert_holds_no_token(&raw, &tokens, "the store's directory");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_keys_open_and_saves_move_to_the_current_key() {
    let inner = MemoryStore::new();
    let old = EncryptedStore::new(inner.clone(), key("2026-10", 1));
    let k = unique_key("rotation");
    let set = sample("rotation");
    put(&old, &k, &set).await;

    // Without the old key the set cannot be read, and is left as it was.
    let raw_before = inner.get(&k).unwrap();
    let new_only = EncryptedStore::new(inner.clone(), key("2026-11", 2));
    match new_only.load(&k).await {
        Err(StoreError::Undecryptable { key: named }) => assert_eq!(named, k),
        other => panic!("a set sealed by a missing key is Undecryptable: {other:?}"),
    }
    assert_eq!(inner.get(&k).unwrap(), raw_before);

    // With it, the set opens; the next save seals it under the current key.
    let rotated = EncryptedStore::new(inner.clone(), key("2026-11", 2))
        .with_old_key(key("2026-10", 1))
        .unwrap();
    let loaded = rotated.load(&k).await.unwrap().unwrap();
    assert_eq!(loaded.value, set);
    let envelope = |store: &MemoryStore| {
        store
            .get(&k)
            .unwrap()
            .value
            .refresh_token
            .unwrap()
            .secret()
            .to_owned()
    };
    assert!(envelope(&inner).starts_with("tk1.2026-10."));
    put(&rotated, &k, &loaded.value).await;
    assert!(envelope(&inner).starts_with("tk1.2026-11."));
    assert_eq!(new_only.load(&k).await.unwrap().unwrap().value, set);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ciphertext_copied_to_another_users_key_does_not_open() {
    let inner = MemoryStore::new();
    let store = EncryptedStore::new(inner.clone(), key("k1", 1));
    let (alice, mallory) = (unique_key("alice"), unique_key("mallory"));
    put(&store, &alice, &sample("alice")).await;
    put(&store, &mallory, &sample("mallory")).await;
    // Mallory, able to write the backend, copies Alice's sealed set under her own key.
    inner.put(&mallory, inner.get(&alice).unwrap().value);
    assert!(matches!(
        store.load(&mallory).await,
        Err(StoreError::Undecryptable { .. })
    ));
    // ... or swaps the sealed access and refresh tokens within one set.
    let mut swapped = inner.get(&alice).unwrap().value;
    let access = swapped.access_token.take().unwrap();
    let refresh = swapped.refresh_token.take().unwrap();
    swapped.access_token = Some(tokenkeeper::AccessToken::new(refresh.secret()));
    swapped.refresh_token = Some(tokenkeeper::RefreshToken::new(access.secret()));
    inner.put(&alice, swapped);
    assert!(matches!(
        store.load(&alice).await,
        Err(StoreError::Undecryptable { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_key_is_a_typed_error_and_the_grant_stays_untouched() {
    let sim = Simulator::builder(Mode::Lucid).start().await.unwrap();
    let inner = MemoryStore::new();
    refresh_through(EncryptedStore::new(inner.clone(), key("k1", 1)), &sim).await;
    let before = inner.get("sealed-user").unwrap();
    let requests = sim.counters().requests;

    // The same key id with other bytes (a wrong secret configured), then a missing key.
    for wrong in [key("k1", 9), key("k2", 2)] {
        let source = RefreshingTokenSource::builder(sim.profile(), sim.credentials())
            .store(EncryptedStore::new(inner.clone(), wrong))
            .key("sealed-user")
            .build()
            .unwrap();
        match source.access_token().await {
            Err(Error::Storage(StoreError::Undecryptable { .. })) => {}
            other => panic!("a wrong key is Undecryptable: {other:?}"),
        }
        let message = source.access_token().await.unwrap_err().to_string();
        assert!(!message.contains("tk1."), "{message}");
    }
    assert_eq!(
        inner.get("sealed-user").unwrap(),
        before,
        "nothing was written"
    );
    assert_eq!(sim.counters().requests, requests, "nothing was presented");
}

#[tokio::test]
async fn plaintext_is_refused_unless_asked_for_and_then_sealed_at_the_next_save() {
    let inner = MemoryStore::new();
    let k = unique_key("plain");
    inner.put(&k, sample("plain"));
    let store = EncryptedStore::new(inner.clone(), key("k1", 1));
    assert!(matches!(
        store.load(&k).await,
        Err(StoreError::Undecryptable { .. })
    ));
    let migrating = EncryptedStore::new(inner.clone(), key("k1", 1)).with_plaintext_reads();
    let loaded = migrating.load(&k).await.unwrap().unwrap();
    assert_eq!(loaded.value, sample("plain"));
    put(&migrating, &k, &loaded.value).await;
    assert_eq!(
        store.load(&k).await.unwrap().unwrap().value,
        sample("plain")
    );
}

/// A replica (or the CLI) reading the store without the wrapper: a rolling deployment
/// that turns encryption on, a rollback. It must not take an envelope for a token: that
/// would present it, get `invalid_grant`, and mark the grant rejected for everyone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_without_the_wrapper_refuses_sealed_sets_and_presents_nothing() {
    let sim = Simulator::builder(Mode::Lucid).start().await.unwrap();
    let inner = MemoryStore::new();
    refresh_through(EncryptedStore::new(inner.clone(), key("k1", 1)), &sim).await;
    let before = inner.get("sealed-user").unwrap();
    let requests = sim.counters().requests;
    let unwrapped = RefreshingTokenSource::builder(sim.profile(), sim.credentials())
        .store(inner.clone())
        .key("sealed-user")
        .build()
        .unwrap();
    for _ in 0..3 {
        match unwrapped.fresh_access_token().await {
            Err(Error::Storage(StoreError::Undecryptable { .. })) => {}
            other => panic!("a sealed set read without the wrapper is refused: {other:?}"),
        }
    }
    assert_eq!(sim.counters().requests, requests, "nothing was presented");
    assert_eq!(
        inner.get("sealed-user").unwrap(),
        before,
        "nothing was written"
    );
    // The encrypted replicas go on.
    let sealed = RefreshingTokenSource::builder(sim.profile(), sim.credentials())
        .store(EncryptedStore::new(inner, key("k1", 1)))
        .key("sealed-user")
        .build()
        .unwrap();
    sealed.access_token().await.unwrap();
}

/// With plaintext reads on (migrating), a set is plain whole or sealed whole: a plain
/// token planted beside sealed fields is refused.
#[tokio::test]
async fn a_half_sealed_set_is_refused_even_with_plaintext_reads() {
    let inner = MemoryStore::new();
    let store = EncryptedStore::new(inner.clone(), key("k1", 1)).with_plaintext_reads();
    let k = unique_key("half");
    put(&store, &k, &sample("half")).await;
    let mut planted = inner.get(&k).unwrap().value;
    planted.access_token = Some(tokenkeeper::AccessToken::new("planted-in-clear"));
    inner.put(&k, planted);
    assert!(matches!(
        store.load(&k).await,
        Err(StoreError::Undecryptable { .. })
    ));
    // A sealed token in a set without the marker, too.
    let mut unmarked = sample("half");
    unmarked.refresh_token = inner.get(&k).unwrap().value.refresh_token;
    inner.put(&k, unmarked);
    assert!(matches!(
        store.load(&k).await,
        Err(StoreError::Undecryptable { .. })
    ));
}

#[test]
fn keys_are_checked_and_never_shown() {
    // 32 bytes of 7, padded standard base64 (URL-safe unpadded works too).
    let k =
        EncryptionKey::from_base64("k1", "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=").unwrap();
    EncryptionKey::from_base64("k1", "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc").unwrap();
    let shown = format!("{k:?}");
    assert!(shown.contains("k1") && !shown.contains('7'), "{shown}");
    assert!(EncryptionKey::from_base64("k1", "c2hvcnQ=").is_err());
    let bad = EncryptionKey::from_base64("k1", "not base64 at all!").unwrap_err();
    assert!(!bad.to_string().contains("not base64 at all"), "{bad}");
    assert!(EncryptionKey::new("", [0; 32]).is_err());
    assert!(EncryptionKey::new("has.dot", [0; 32]).is_err());
    assert!(
        EncryptedStore::new(MemoryStore::new(), key("k1", 1))
            .with_old_key(key("k1", 2))
            .is_err()
    );
    let store = EncryptedStore::new(MemoryStore::new(), key("k1", 7));
    assert!(!format!("{store:?}").contains("7, 7"));
}

#[cfg(feature = "redis")]
mod redis {
    use super::*;
    use servers::RedisServer;
    use tokenkeeper::store::redis::RedisStore;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn conforms_around_redis_and_holds_no_token_there() {
        let server = RedisServer::start();
        let inner = RedisStore::connect(&server.url()).await.unwrap();
        conformance::run(
            &EncryptedStore::new(inner.clone(), key("k1", 1)),
            Leases::Expiring,
        )
        .await;

        let sim = Simulator::builder(Mode::Lucid).start().await.unwrap();
        let tokens = refresh_through(EncryptedStore::new(inner, key("k1", 1)), &sim).await;
        let mut raw_client = ::redis::Client::open(server.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let keys: Vec<String> = ::redis::cmd("KEYS")
            .arg("*")
            .query_async(&mut raw_client)
            .await
            .unwrap();
        let mut raw = Vec::new();
        for k in keys {
            let kind: String = ::redis::cmd("TYPE")
                .arg(&k)
                .query_async(&mut raw_client)
                .await
                .unwrap();
            let values: Vec<Vec<u8>> = match kind.as_str() {
                "string" => vec![
                    ::redis::cmd("GET")
                        .arg(&k)
                        .query_async(&mut raw_client)
                        .await
                        .unwrap(),
                ],
                "hash" => ::redis::cmd("HGETALL")
                    .arg(&k)
                    .query_async(&mut raw_client)
                    .await
                    .unwrap(),
                "zset" => ::redis::cmd("ZRANGE")
                    .arg(&k)
                    .arg(0)
                    .arg(-1)
                    .query_async(&mut raw_client)
                    .await
                    .unwrap(),
                _ => Vec::new(),
            };
            raw.extend(k.into_bytes());
            values.into_iter().for_each(|v| raw.extend(v));
        }
        assert_holds_no_token(&raw, &tokens, "Redis");
    }
}

#[cfg(feature = "postgres")]
mod postgres {
    use super::*;
    use servers::PostgresServer;
    use tokenkeeper::store::postgres::PostgresStore;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn conforms_around_postgres_and_holds_no_token_there() {
        let server = PostgresServer::start();
        let inner = PostgresStore::connect(&server.url()).await.unwrap();
        inner.create_schema().await.unwrap();
        conformance::run(
            &EncryptedStore::new(inner.clone(), key("k1", 1)),
            Leases::Expiring,
        )
        .await;

        let sim = Simulator::builder(Mode::Lucid).start().await.unwrap();
        let table = inner.table().to_owned();
        let tokens = refresh_through(EncryptedStore::new(inner, key("k1", 1)), &sim).await;
        let (client, connection) = tokio_postgres::connect(&server.url(), tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        let rows = client
            .query(&format!("SELECT t::text FROM {table} t"), &[])
            .await
            .unwrap();
        let raw: Vec<u8> = rows
            .iter()
            .flat_map(|row| row.get::<_, String>(0).into_bytes())
            .collect();
        assert_holds_no_token(&raw, &tokens, "the PostgreSQL table");
    }
}
