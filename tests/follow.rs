//! Replicas follow each other's rotations through the store's watch
//! (`TokenStore::watch`): against a provider whose refresh kills the previous access
//! token (the simulator's Lucid mode), a replica serves the new token within
//! milliseconds of another replica's save, without a request of its own.

#[cfg(any(feature = "redis", feature = "postgres"))]
#[path = "support/proxy.rs"]
mod proxy;
#[cfg(any(feature = "redis", feature = "postgres"))]
#[path = "support/servers.rs"]
mod servers;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use tokenkeeper::store::{Change, Lease, StoreError, Watch};
use tokenkeeper::testing::{Mode, Simulator};
use tokenkeeper::{
    AccessToken, MemoryStore, RefreshingTokenSource, TokenManager, TokenSet, TokenStore, Versioned,
};

async fn lucid() -> Simulator {
    Simulator::builder(Mode::Lucid)
        .access_lifetime(Duration::from_secs(3600))
        .start()
        .await
        .unwrap()
}

/// Calls `get` until it returns `wanted`, for at most ten seconds (a cut connection is
/// re-established, 100 ms doubling, and a failed follow retried, 250 ms to 1 s; a
/// doomed token may make a call wait up to 3 s); how many calls it took.
async fn until_served<F, Fut>(wanted: &AccessToken, mut get: F) -> usize
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = AccessToken>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut calls = 0;
    loop {
        calls += 1;
        if &get().await == wanted {
            return calls;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the other replica's token was not served within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_follows_another_sources_rotation_without_a_request() {
    let sim = lucid().await;
    let store = MemoryStore::new();
    let source = |initial: Option<String>| {
        let mut builder = RefreshingTokenSource::builder(sim.profile(), sim.credentials())
            .store(store.clone())
            .key("shared");
        if let Some(initial) = initial {
            builder = builder.initial_refresh_token(initial);
        }
        builder.build().unwrap()
    };
    let a = source(Some(sim.issue_grant()));
    let b = source(None);
    let first = a.access_token().await.unwrap();
    assert_eq!(b.access_token().await.unwrap(), first, "B adopts A's set");
    assert_eq!(sim.counters().refreshes, 1);

    // The API rejects A's token: A refreshes, which kills the token B holds.
    a.invalidate(&first);
    let second = a.access_token().await.unwrap();
    assert_ne!(second, first);
    until_served(&second, || async { b.access_token().await.unwrap() }).await;
    assert_eq!(sim.counters().refreshes, 2, "B made no request of its own");
    assert_eq!(sim.counters().reuse_attempts, 0);
    let status = b.status();
    assert!(
        status.metrics.adoptions_by_watch >= 1,
        "{:?}",
        status.metrics
    );
    assert_eq!(
        status.metrics.adoptions_by_read(),
        status.metrics.adoptions - status.metrics.adoptions_by_watch
    );
    // What B serves is the store's newest version, the one it heard of.
    let stored = store.load("shared").await.unwrap().unwrap().version;
    assert_eq!(status.store_version_served, Some(stored), "{status:?}");
    assert_eq!(status.store_version_heard.map(|(v, _)| v), Some(stored));
    assert_eq!(a.status().store_version_served, Some(stored));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_managers_grants_follow_another_replicas_rotations() {
    let sim = lucid().await;
    let store = MemoryStore::new();
    let manager = || {
        TokenManager::builder(sim.profile(), sim.credentials())
            .store(store.clone())
            .build()
            .unwrap()
    };
    let (a, b) = (manager(), manager());
    let keys: Vec<String> = (0..20).map(|i| format!("user-{i}")).collect();
    for key in &keys {
        a.source(key)
            .unwrap()
            .import_refresh_token(sim.issue_grant())
            .await
            .unwrap();
        let token = a.source(key).unwrap().access_token().await.unwrap();
        assert_eq!(b.source(key).unwrap().access_token().await.unwrap(), token);
    }
    let before = sim.counters().refreshes;
    for key in &keys {
        let a = a.source(key).unwrap();
        let old = a.access_token().await.unwrap();
        a.invalidate(&old);
        let new = a.access_token().await.unwrap();
        let b = b.source(key).unwrap();
        until_served(&new, || async { b.access_token().await.unwrap() }).await;
    }
    assert_eq!(
        sim.counters().refreshes - before,
        20,
        "one refresh per grant, by A only"
    );
    assert_eq!(sim.counters().reuse_attempts, 0);
}

/// The connection carrying the watch is cut as another replica rotates: the watch
/// resubscribes (with a resync) and the replica catches up (a follow whose read fails on
/// the cut store connection is tried again); a token older than one it served is never
/// served again.
#[cfg(any(feature = "redis", feature = "postgres"))]
async fn a_cut_watch_catches_up(
    direct: impl tokenkeeper::TokenStore,
    through_proxy: impl tokenkeeper::TokenStore,
    proxy: &proxy::FaultProxy,
) {
    let sim = lucid().await;
    // A may refresh after every rejection (the default spaces forced refreshes 30 s).
    let a = RefreshingTokenSource::builder(sim.profile(), sim.credentials())
        .store(direct)
        .key("cut")
        .initial_refresh_token(sim.issue_grant())
        .forced_refresh_interval(Duration::ZERO)
        .build()
        .unwrap();
    let b = RefreshingTokenSource::builder(sim.profile(), sim.credentials())
        .store(through_proxy)
        .key("cut")
        .build()
        .unwrap();
    let first = a.access_token().await.unwrap();
    assert_eq!(b.access_token().await.unwrap(), first);
    // A rotation followed through the live watch.
    a.invalidate(&first);
    let second = a.access_token().await.unwrap();
    until_served(&second, || async { b.access_token().await.unwrap() }).await;

    // B's connections (the watch's and the store's) are cut as A rotates again: B must
    // subscribe again (and resync) to hear of it.
    proxy.cut_all();
    a.invalidate(&second);
    let third = a.access_token().await.unwrap();
    assert_ne!(third, second);
    until_served(&third, || async { b.access_token().await.unwrap() }).await;
    for _ in 0..100 {
        assert_eq!(
            b.access_token().await.unwrap(),
            third,
            "never an older token again"
        );
    }
    assert_eq!(sim.counters().refreshes, 3, "B made no request of its own");
    assert_eq!(sim.counters().reuse_attempts, 0);
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_redis_subscription_catches_up() {
    use tokenkeeper::store::redis::RedisStore;
    let server = servers::RedisServer::start();
    let proxy = proxy::FaultProxy::in_front_of(server.port()).await;
    let direct = RedisStore::connect(&server.url()).await.unwrap();
    let through = RedisStore::connect(&proxy.url_via(&server.url()))
        .await
        .unwrap();
    a_cut_watch_catches_up(direct, through, &proxy).await;
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_postgres_listener_catches_up() {
    use tokenkeeper::store::postgres::PostgresStore;
    let server = servers::PostgresServer::start();
    let proxy = proxy::FaultProxy::in_front_of(server.port()).await;
    let direct = PostgresStore::connect(&server.url()).await.unwrap();
    direct.create_schema().await.unwrap();
    let through = PostgresStore::connect(&proxy.url_via(&server.url()))
        .await
        .unwrap();
    a_cut_watch_catches_up(direct, through, &proxy).await;
}

/// A store whose watch the test drives, and whose loads take 5 ms each, counted along
/// with the most that ran at once.
#[derive(Debug, Clone)]
struct Driven {
    inner: MemoryStore,
    changes: tokio::sync::broadcast::Sender<Change>,
    loading: Arc<AtomicUsize>,
    most_at_once: Arc<AtomicUsize>,
    loads: Arc<AtomicUsize>,
}

#[async_trait]
impl TokenStore for Driven {
    async fn load(&self, key: &str) -> Result<Option<Versioned<TokenSet>>, StoreError> {
        let now = self.loading.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_at_once.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(5)).await;
        let loaded = self.inner.load(key).await;
        self.loading.fetch_sub(1, Ordering::SeqCst);
        self.loads.fetch_add(1, Ordering::SeqCst);
        loaded
    }
    async fn save(
        &self,
        key: &str,
        token: &TokenSet,
        expected: Option<u64>,
        lease: &Lease,
    ) -> Result<u64, StoreError> {
        self.inner.save(key, token, expected, lease).await
    }
    async fn lease(&self, key: &str, ttl: Duration) -> Result<Lease, StoreError> {
        self.inner.lease(key, ttl).await
    }
    fn watch(&self) -> Result<Watch, StoreError> {
        let receiver = self.changes.subscribe();
        Ok(Box::pin(futures_util::stream::unfold(
            receiver,
            |mut receiver| async move { Some((receiver.recv().await.ok()?, receiver)) },
        )))
    }
}

/// A resync (a subscription lost and restored) makes each of a manager's 200 loaded
/// grants read the store once, but never more than 16 at a time: a reconnect does not
/// hit the store with every grant at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resync_reads_a_managers_grants_a_few_at_a_time() {
    const GRANTS: usize = 200;
    let sim = lucid().await;
    let store = Driven {
        inner: MemoryStore::new(),
        changes: tokio::sync::broadcast::channel(16).0,
        loading: Arc::default(),
        most_at_once: Arc::default(),
        loads: Arc::default(),
    };
    let manager = TokenManager::builder(sim.profile(), sim.credentials())
        .store(store.clone())
        .build()
        .unwrap();
    let mut handles = Vec::new();
    for i in 0..GRANTS {
        let source = manager.source(&format!("user-{i}")).unwrap();
        source
            .import_refresh_token(sim.issue_grant())
            .await
            .unwrap();
        source.access_token().await.unwrap();
        handles.push(source);
    }
    let refreshes = sim.counters().refreshes;
    store.loads.store(0, Ordering::SeqCst);
    store.most_at_once.store(0, Ordering::SeqCst);
    store.changes.send(Change::Resync).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while store.loads.load(Ordering::SeqCst) < GRANTS {
        assert!(
            tokio::time::Instant::now() < deadline,
            "every loaded grant reads the store after a resync: {} of {GRANTS}",
            store.loads.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let most = store.most_at_once.load(Ordering::SeqCst);
    assert!(
        (2..=16).contains(&most),
        "follow reads run concurrently, at most 16 at a time: {most}"
    );
    assert_eq!(
        sim.counters().refreshes,
        refreshes,
        "a follow never refreshes"
    );
    drop(handles);
}

/// A follow whose read fails (the store's connection was cut along with the watch's, and
/// the resync's read is the first to find out) is tried again, 250 ms, 500 ms and 1 s
/// later: the replica catches up without another save to hear of. It gives up after
/// three retries: a store that stays down is not read in a loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follow_whose_read_fails_is_tried_again_a_few_times() {
    use tokenkeeper::testing::{FaultyStore, StoreFault, StoreOp};
    let sim = lucid().await;
    let store = MemoryStore::new();
    let faulty = FaultyStore::new(store.clone());
    let a = RefreshingTokenSource::builder(sim.profile(), sim.credentials())
        .store(store.clone())
        .key("k")
        .initial_refresh_token(sim.issue_grant())
        .forced_refresh_interval(Duration::ZERO)
        .build()
        .unwrap();
    let b = RefreshingTokenSource::builder(sim.profile(), sim.credentials())
        .store(faulty.clone())
        .key("k")
        .build()
        .unwrap();
    let first = a.access_token().await.unwrap();
    assert_eq!(b.access_token().await.unwrap(), first);

    // Every read B's follows make for A's refresh (its write-ahead record and its set)
    // fails, and one more: only a retry catches up.
    for _ in 0..3 {
        faulty.fail_next(StoreOp::Load, StoreFault::FailBefore);
    }
    a.invalidate(&first);
    let second = a.access_token().await.unwrap();
    until_served(&second, || async { b.access_token().await.unwrap() }).await;
    assert_eq!(sim.counters().refreshes, 2, "B made no request of its own");

    // A store that stays down: each failed follow is retried three times, then dropped.
    faulty.clear_queued();
    for _ in 0..1000 {
        faulty.fail_next(StoreOp::Load, StoreFault::FailBefore);
    }
    let loads = faulty.counts().calls_of(StoreOp::Load);
    a.invalidate(&second);
    let third = a.access_token().await.unwrap();
    assert_ne!(third, second);
    // Two saves heard (A's write-ahead record and its new set), each followed once; the
    // last follow retried three times (about 250 + 500 + 1000 ms, at most 2.6 s); a
    // retry never overlaps a newer follow's.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let tried = faulty.counts().calls_of(StoreOp::Load) - loads;
    assert!((4..=5).contains(&tried), "{tried} reads");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        faulty.counts().calls_of(StoreOp::Load) - loads,
        tried,
        "no more reads once the retries are spent"
    );
    assert_eq!(b.access_token().await.unwrap(), second, "nothing read yet");
    assert_eq!(sim.counters().reuse_attempts, 0);
}
