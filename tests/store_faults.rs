//! Store faults never cost a grant: each scenario of issue 8 against the simulator's
//! reuse detection, with a `FaultyStore` around a `MemoryStore` shared by two sources (two
//! replicas). What must hold at the end of each: no refresh token presented twice, no
//! grant revoked, the newest refresh token in the store.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokenkeeper::store::{Lease, LeaseRelease, StoreError, Versioned};
use tokenkeeper::testing::{Fault, FaultyStore, Mode, Simulator, StoreFault, StoreOp};
use tokenkeeper::{
    Builder, Error, FileStore, ManualClock, MemoryStore, RefreshingTokenSource, TokenSet,
    TokenStore, TransientKind,
};

/// Two sources (replicas) on one faulty store and one simulator.
struct Fixture {
    sim: Simulator,
    store: FaultyStore<MemoryStore>,
    key: String,
    grant: String,
    /// The clock of the simulator and of every replica, when the test moves time.
    clock: Option<ManualClock>,
}

impl Fixture {
    async fn new(sim: Simulator) -> Self {
        let grant = sim.issue_grant();
        Self {
            sim,
            store: FaultyStore::new(MemoryStore::new()),
            key: "user-1".into(),
            grant,
            clock: None,
        }
    }

    /// A fixture whose simulator delays every answer by `delay` (after rotating).
    async fn answering_after(delay: Duration) -> Self {
        let sim = Simulator::builder(Mode::Lucid)
            .response_delay(delay)
            .start()
            .await
            .unwrap();
        Self::new(sim).await
    }

    /// A fixture whose simulator and replicas share a `ManualClock`.
    async fn clocked() -> (Self, ManualClock) {
        let clock = ManualClock::starting_now();
        let sim = Simulator::builder(Mode::Lucid)
            .clock(clock.clone())
            .start()
            .await
            .unwrap();
        let mut fx = Self::new(sim).await;
        fx.clock = Some(clock.clone());
        (fx, clock)
    }

    /// A replica: request timeout 1 s, lease ttl 1.5 s, store calls bounded at 5 s.
    fn replica(&self, tune: impl FnOnce(Builder) -> Builder) -> RefreshingTokenSource {
        let mut profile = self.sim.profile();
        profile.request_timeout = Duration::from_secs(1);
        let builder = RefreshingTokenSource::builder(profile, self.sim.credentials())
            .store(self.store.clone())
            .key(&self.key)
            .initial_refresh_token(&self.grant)
            .lease_ttl(Duration::from_millis(1500))
            .store_timeout(Duration::from_secs(5));
        let builder = match &self.clock {
            Some(clock) => builder.clock(clock.clone()),
            None => builder,
        };
        tune(builder).build().unwrap()
    }

    fn stored_refresh_token(&self) -> Option<String> {
        self.store
            .get_ref()
            .get(&self.key)
            .and_then(|v| v.value.refresh_token)
            .map(|t| t.secret().to_owned())
    }

    /// What must hold after every scenario.
    fn assert_nothing_lost(&self) {
        let counters = self.sim.counters();
        assert_eq!(
            counters.reuse_attempts, 0,
            "no refresh token presented twice: {counters:?}"
        );
        assert_eq!(counters.revoked_grants, 0, "{counters:?}");
        assert_eq!(
            self.stored_refresh_token(),
            self.sim.current_refresh_token(0),
            "the store holds the newest refresh token"
        );
        let stored = self.store.get_ref().get(&self.key).expect("stored");
        assert!(
            stored.value.rotation.is_none(),
            "no write-ahead record is left behind"
        );
    }
}

/// One `access_token` call in a task of its own, to overlap with others.
fn call(
    source: &RefreshingTokenSource,
) -> tokio::task::JoinHandle<Result<tokenkeeper::AccessToken, Error>> {
    let source = source.clone();
    tokio::spawn(async move { source.access_token().await })
}

async fn lucid(access_lifetime: Duration) -> Simulator {
    Simulator::builder(Mode::Lucid)
        .access_lifetime(access_lifetime)
        .start()
        .await
        .unwrap()
}

async fn eventually<T>(what: &str, mut attempt: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(done) = attempt().await {
            return done;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// Scenario 1: a save fails after a successful refresh.

/// The holder's save of the rotated set fails three times. The holder serves the new
/// token at once, and keeps the key locked while it retries: the other replica, already
/// waiting for the lease, gets it only once the set is saved (it never even sees the
/// write-ahead record), and adopts the saved set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_whose_save_fails_keeps_the_key_locked_until_it_is_saved() {
    let fx = Fixture::answering_after(Duration::from_millis(400)).await;
    let (a, b) = (fx.replica(|b| b), fx.replica(|b| b));
    // A's saves: the seed, the write-ahead record, then the rotated set: fail that one
    // and its next two retries.
    for n in 3..=5 {
        fx.store.fail_nth(StoreOp::Save, n, StoreFault::FailBefore);
    }
    // Lease calls: A's, then B's (waiting). A third one would be A taking the lease
    // again after letting it go: slowed down, so that B would get in first.
    fx.store.fail_nth(
        StoreOp::Lease,
        3,
        StoreFault::HangBefore(Duration::from_millis(300)),
    );
    let a_call = call(&a);
    // B asks while A's request is in flight: it queues for the lease.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let b_call = call(&b);
    let token = a_call
        .await
        .unwrap()
        .expect("served despite the failed save");
    let adopted = b_call
        .await
        .unwrap()
        .expect("B waits for the lease, then adopts");
    assert_eq!(adopted, token, "B adopts A's rotated set");
    assert!(!a.status().rotation_unsaved);
    assert_eq!(a.status().metrics.failed_saves, 1);
    assert_eq!(fx.sim.counters().refreshes, 1, "one refresh in all");
    assert_eq!(
        b.status().metrics.store_failures,
        0,
        "B never had to wait on a write-ahead record"
    );
    fx.assert_nothing_lost();
}

/// The holder's lease runs out while it is paused (its renewals fail and its save hangs)
/// after the provider rotated. The other replica takes the expired lease and finds the
/// holder's write-ahead record: it waits rather than present the consumed refresh token.
/// The holder comes back, retakes the lease and saves; the other replica adopts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_never_presents_a_refresh_token_another_holder_is_presenting() {
    let fx = Fixture::new(lucid(Duration::from_secs(3600)).await).await;
    let (a, b) = (fx.replica(|b| b), fx.replica(|b| b));
    fx.store
        .random_faults(1.0, &[StoreOp::Renew], vec![StoreFault::FailBefore], 1);
    fx.store.fail_nth(
        StoreOp::Save,
        3,
        StoreFault::HangBefore(Duration::from_millis(2500)),
    );
    let holder = tokio::spawn(async move { a.access_token().await.map(|t| (t, a)) });

    eventually("the provider rotated for A", async || {
        (fx.sim.counters().refreshes == 1).then_some(())
    })
    .await;
    // A's lease (1.5 s) expires while its save hangs; then B tries.
    tokio::time::sleep(Duration::from_millis(1700)).await;
    // B waits on A's write-ahead record: a while inside its flight (adopting A's set if
    // it lands meanwhile), then with a transient error.
    let waited = b.access_token().await;
    assert!(
        matches!(
            waited,
            Ok(_)
                | Err(Error::Transient {
                    kind: TransientKind::RotationInFlight,
                    ..
                })
        ),
        "{waited:?}"
    );
    assert_eq!(fx.sim.counters().requests, 1, "B sent nothing");

    let (token, a) = holder.await.unwrap().expect("A served its rotated token");
    eventually("A saved its rotated set", async || {
        (!a.status().rotation_unsaved).then_some(())
    })
    .await;
    let adopted = eventually("B adopts A's set", async || b.access_token().await.ok()).await;
    assert_eq!(adopted, token);
    assert_eq!(fx.sim.counters().refreshes, 1);
    fx.assert_nothing_lost();
}

/// The save landed but its answer was lost: the retry finds the set already stored and
/// writes nothing more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_save_whose_answer_was_lost_is_found_stored_not_written_twice() {
    let fx = Fixture::new(lucid(Duration::from_secs(3600)).await).await;
    let a = fx.replica(|b| b);
    fx.store.fail_nth(StoreOp::Save, 3, StoreFault::FailAfter);
    a.access_token().await.unwrap();
    eventually("the retry settled", async || {
        (!a.status().rotation_unsaved).then_some(())
    })
    .await;
    let stored = fx.store.get_ref().get(&fx.key).unwrap();
    assert_eq!(
        stored.version, 3,
        "seed, write-ahead record, rotated set: no fourth write"
    );
    assert_eq!(fx.store.counts().calls_of(StoreOp::Save), 3);
    fx.assert_nothing_lost();
}

// Scenario 2: a stale retry must never overwrite a newer set.

/// A's save landed with its answer lost; before A's retry reads the store (it hangs),
/// A's lease runs out, B adopts A's set and rotates further. A's retry then finds a set
/// that is neither its own nor at the version its save expected: it drops its copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_never_writes_an_older_set_over_a_newer_one() {
    let (fx, clock) = Fixture::clocked().await;
    let a = fx.replica(|b| b);
    let b = fx.replica(|b| b);
    fx.store
        .random_faults(1.0, &[StoreOp::Renew], vec![StoreFault::FailBefore], 2);
    // A's loads: step 0, under the lease, then the retry's: hang that one.
    fx.store.fail_nth(StoreOp::Save, 3, StoreFault::FailAfter);
    fx.store.fail_nth(
        StoreOp::Load,
        3,
        StoreFault::HangBefore(Duration::from_millis(3000)),
    );
    let a_token = a.access_token().await.unwrap();
    assert!(a.status().rotation_unsaved);

    // A's lease expires; B finds A's set expired (an hour later) and rotates it.
    tokio::time::sleep(Duration::from_millis(1700)).await;
    clock.advance(time::Duration::hours(2));
    let b_token = eventually("B refreshes", async || b.access_token().await.ok()).await;
    assert_ne!(a_token, b_token);
    assert_eq!(fx.sim.counters().refreshes, 2);

    eventually("A's retry settled", async || {
        (!a.status().rotation_unsaved).then_some(())
    })
    .await;
    fx.assert_nothing_lost();
}

/// A person re-consents while a rotated set fails to save: the import wins, and the retry
/// drops its older set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_racing_a_retry_wins() {
    let fx = Fixture::new(lucid(Duration::from_secs(3600)).await).await;
    let a = fx.replica(|b| b);
    let importer = fx.replica(|b| b);
    fx.store
        .random_faults(1.0, &[StoreOp::Renew], vec![StoreFault::FailBefore], 3);
    // Every save of A's rotated set fails for a while (the seed and the record pass).
    for n in 3..=12 {
        fx.store.fail_nth(StoreOp::Save, n, StoreFault::FailBefore);
    }
    a.access_token().await.unwrap();
    assert!(a.status().rotation_unsaved);
    let new_grant = fx.sim.issue_grant();
    // A's lease expires (no renewals) while it keeps failing; the import takes over.
    eventually("the import lands", async || {
        importer.import_refresh_token(new_grant.as_str()).await.ok()
    })
    .await;
    fx.store.clear_queued();
    eventually("A's retry settled", async || {
        (!a.status().rotation_unsaved).then_some(())
    })
    .await;
    let stored = fx.stored_refresh_token();
    assert_eq!(
        stored.as_deref(),
        Some(new_grant.as_str()),
        "the import stays"
    );
    assert_eq!(fx.sim.counters().reuse_attempts, 0);
}

// Scenario 3: a panic never leaves the flight stuck.

/// A panic injected into each kind of store call: the callers of that flight get a
/// transient error, the next call works, and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_any_store_call_never_leaves_the_flight_stuck() {
    // (operation, which call of it in a fresh source's first refresh)
    let cases = [
        (StoreOp::Load, 1),  // the lease-free read
        (StoreOp::Lease, 1), // taking the lease
        (StoreOp::Load, 2),  // the read under the lease
        (StoreOp::Save, 1),  // the seed
        (StoreOp::Save, 2),  // the write-ahead record
        (StoreOp::Save, 3),  // the rotated set
    ];
    for (op, n) in cases {
        let fx = Fixture::new(lucid(Duration::from_secs(3600)).await).await;
        let a = fx.replica(|b| b);
        fx.store.fail_nth(op, n, StoreFault::Panic);
        let first = a.access_token().await;
        if let Err(e) = &first {
            assert!(e.is_transient(), "{op:?} #{n}: {e:?}");
        }
        let token = eventually("the next calls work", async || a.access_token().await.ok()).await;
        assert_eq!(fx.store.counts().panics, 1, "{op:?} #{n}");
        assert!(!a.status().rotation_unsaved, "{op:?} #{n}");
        assert_eq!(fx.sim.counters().refreshes, 1, "{op:?} #{n}: one refresh");
        assert_eq!(a.access_token().await.unwrap(), token);
        fx.assert_nothing_lost();
    }
}

// Scenario 4: a store that loses a key.

/// The store loses the key after a rotation (Redis restarted without persistence): the
/// source restores the newest set it knew and never presents the long-consumed initial
/// refresh token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_loses_the_key_never_makes_the_source_present_the_initial_token() {
    let (fx, clock) = Fixture::clocked().await;
    let a = fx.replica(|b| b);
    a.access_token().await.unwrap();
    clock.advance(time::Duration::hours(2));
    a.access_token().await.unwrap();
    assert_eq!(fx.sim.counters().refreshes, 2);

    fx.store
        .get_ref()
        .remove(&fx.key)
        .expect("the key was there");
    clock.advance(time::Duration::hours(2));
    a.access_token()
        .await
        .expect("refreshed with the newest known refresh token");
    assert_eq!(fx.sim.counters().refreshes, 3);
    fx.assert_nothing_lost();
}

// Scenario 5: the lease ttl and the request timeout.

/// A lease that cannot outlast the request is a configuration error at build, not a
/// transient error forever; absurd values are refused, never overflowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_ttl_that_cannot_outlast_the_request_is_refused_at_build() {
    let sim = lucid(Duration::from_secs(3600)).await;
    let mut profile = sim.profile();
    profile.request_timeout = Duration::from_secs(5);
    for ttl in [
        Duration::from_secs(1),
        Duration::from_secs(5),
        Duration::MAX,
    ] {
        let built = RefreshingTokenSource::builder(profile.clone(), sim.credentials())
            .lease_ttl(ttl)
            .build();
        assert!(matches!(built, Err(Error::Config(_))), "{ttl:?}: {built:?}");
    }
    let built = RefreshingTokenSource::builder(profile.clone(), sim.credentials())
        .store_timeout(Duration::MAX)
        .build();
    assert!(matches!(built, Err(Error::Config(_))), "{built:?}");
    RefreshingTokenSource::builder(profile, sim.credentials())
        .lease_ttl(Duration::from_secs(6))
        .leeway(Duration::MAX)
        .build()
        .expect("a lease outlasting the request");
}

/// The answer arrives as the lease's first ttl runs out, and the save is slow: renewed
/// while the request ran, the lease still holds, and the first save succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_arriving_as_the_first_ttl_runs_out_is_saved_under_the_renewed_lease() {
    let fx = Fixture::answering_after(Duration::from_millis(950)).await;
    // Lease 1.2 s, request timeout 1 s. The write-ahead record takes 150 ms, so the
    // request leaves with 1.05 s of lease; the answer comes 950 ms later, and the save
    // takes 200 ms more: past the first ttl.
    let a = fx.replica(|b| b.lease_ttl(Duration::from_millis(1200)));
    fx.store.fail_nth(
        StoreOp::Save,
        2,
        StoreFault::HangBefore(Duration::from_millis(150)),
    );
    fx.store.fail_nth(
        StoreOp::Save,
        3,
        StoreFault::HangBefore(Duration::from_millis(200)),
    );
    a.access_token().await.unwrap();
    let status = a.status();
    assert_eq!(
        status.metrics.failed_saves, 0,
        "saved at once under the renewed lease"
    );
    assert!(
        fx.store.counts().calls_of(StoreOp::Renew) >= 1,
        "the lease was renewed"
    );
    fx.assert_nothing_lost();
}

// Store errors and the provider's backoff.

/// A store that fails for a moment: callers get storage errors, never the provider's
/// backoff, and are served again within a second of the store's recovery (on the
/// clock's monotonic reading).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_errors_never_start_the_provider_backoff() {
    let (fx, clock) = Fixture::clocked().await;
    let a = fx.replica(|b| b);
    fx.store.random_faults(
        1.0,
        &[StoreOp::Load, StoreOp::Lease],
        vec![StoreFault::FailBefore],
        4,
    );
    for _ in 0..5 {
        let err = a.access_token().await.unwrap_err();
        assert!(
            matches!(err, Error::Storage(_)),
            "a store failure, not a provider backoff: {err:?}"
        );
        clock.advance(time::Duration::milliseconds(300));
    }
    fx.store.set_rate(0.0);
    clock.advance(time::Duration::seconds(1));
    a.access_token()
        .await
        .expect("served within a second of the store's recovery");
    assert_eq!(
        fx.sim.counters().requests,
        1,
        "the provider saw one request"
    );
    fx.assert_nothing_lost();
}

/// A lease grant whose answer was lost blocks the key until the lease expires (the
/// holder never learned it had it); then the next attempt succeeds. Nothing is presented
/// in between.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_lease_grant_costs_one_ttl_and_nothing_else() {
    let fx = Fixture::new(lucid(Duration::from_secs(3600)).await).await;
    let a = fx.replica(|b| b);
    fx.store.fail_next(StoreOp::Lease, StoreFault::FailAfter);
    let err = a.access_token().await.unwrap_err();
    assert!(err.is_transient(), "{err:?}");
    eventually("served after the orphaned lease expired", async || {
        a.access_token().await.ok()
    })
    .await;
    assert_eq!(fx.sim.counters().requests, 1);
    fx.assert_nothing_lost();
}

/// Random store faults of every kind (but panics) at 20% of all calls, two replicas
/// refreshing a short-lived token for many cycles: never a reuse, and the store ends
/// with the newest refresh token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_store_faults_never_cost_the_grant() {
    let (fx, clock) = Fixture::clocked().await;
    let replicas = [fx.replica(|b| b), fx.replica(|b| b)];
    fx.store.random_faults(
        0.2,
        &[StoreOp::Load, StoreOp::Save, StoreOp::Lease, StoreOp::Renew],
        vec![
            StoreFault::FailBefore,
            StoreFault::FailAfter,
            StoreFault::HangBefore(Duration::from_millis(30)),
            StoreFault::HangAfter(Duration::from_millis(30)),
            StoreFault::LoseLease,
        ],
        5,
    );
    let mut served = 0;
    for cycle in 0..150 {
        let source = &replicas[cycle % 2];
        for _ in 0..200 {
            match source.access_token().await {
                Ok(_) => {
                    served += 1;
                    break;
                }
                Err(e) => {
                    assert!(e.is_transient(), "cycle {cycle}: {e:?}");
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    clock.advance(time::Duration::seconds(1));
                }
            }
        }
        clock.advance(time::Duration::hours(2));
    }
    assert_eq!(served, 150, "every cycle was served");
    fx.store.set_rate(0.0);
    for source in &replicas {
        eventually("every retry settled", async || {
            (!source.status().rotation_unsaved).then_some(())
        })
        .await;
    }
    let counts = fx.store.counts();
    println!("random store faults: {counts:?}, {:?}", fx.sim.counters());
    assert!(counts.faults() > 100, "{counts:?}");
    clock.advance(time::Duration::hours(2));
    replicas[0].access_token().await.unwrap();
    fx.assert_nothing_lost();
}

// Found in review: interleavings that presented a refresh token twice.

/// B once saw A's write-ahead record and waited; A rotated and B adopted. Much later A
/// presents again and loses its lease before saving. B must time A's new record anew,
/// not take over at once because it saw A's old record long ago.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_write_ahead_record_is_timed_anew() {
    let fx = Fixture::answering_after(Duration::from_millis(400)).await;
    let replica = || {
        fx.replica(|b| {
            b.forced_refresh_interval(Duration::ZERO)
                .abandoned_rotation_after(Duration::from_secs(2))
        })
    };
    let (a, b) = (replica(), replica());
    let t1 = a.access_token().await.unwrap();
    assert_eq!(b.access_token().await.unwrap(), t1);

    // A leaves its record behind (a 503, then removing the record fails); B sees it.
    a.invalidate(&t1);
    fx.sim.fail_next([Fault::ServerError(503)]);
    fx.store.fail_nth(StoreOp::Save, 2, StoreFault::FailBefore);
    assert!(a.access_token().await.is_err());
    b.invalidate(&t1);
    let seen = b.access_token().await;
    assert!(
        matches!(
            seen,
            Ok(_)
                | Err(Error::Transient {
                    kind: TransientKind::RotationInFlight,
                    ..
                })
        ),
        "{seen:?}"
    );
    // A retries and rotates; B adopts.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let t2 = a.access_token().await.unwrap();
    let adopted = eventually("B adopts", async || b.access_token().await.ok()).await;
    assert_eq!(adopted, t2);

    // Later than abandoned_rotation_after: A presents again; its save finds the lease
    // lost and it takes the lease again slowly; B, waiting, gets the lease first.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    a.invalidate(&t2);
    b.invalidate(&t2);
    let a_call = call(&a);
    tokio::time::sleep(Duration::from_millis(150)).await;
    let b_call = call(&b);
    tokio::time::sleep(Duration::from_millis(100)).await;
    fx.store.fail_next(StoreOp::Save, StoreFault::LoseLease);
    fx.store.fail_next(
        StoreOp::Lease,
        StoreFault::HangBefore(Duration::from_millis(300)),
    );
    a_call
        .await
        .unwrap()
        .expect("A is served its rotated token");
    let _ = b_call.await.unwrap();
    eventually("A saved", async || {
        (!a.status().rotation_unsaved).then_some(())
    })
    .await;
    assert_eq!(
        b.status().metrics.takeovers,
        0,
        "B never took over a live rotation"
    );
    eventually("B adopts A's set", async || b.access_token().await.ok()).await;
    fx.assert_nothing_lost();
}

/// A store whose lease releases take effect at once but answer late.
#[derive(Debug, Clone)]
struct SlowReleases {
    inner: FaultyStore<MemoryStore>,
    delay: Arc<Mutex<Duration>>,
}

#[derive(Debug)]
struct SlowRelease {
    lease: Mutex<Option<Lease>>,
    delay: Duration,
}

#[async_trait]
impl LeaseRelease for SlowRelease {
    async fn release(self: Box<Self>) -> Result<(), StoreError> {
        let lease = self.lease.lock().unwrap().take();
        if let Some(lease) = lease {
            lease.release().await?;
        }
        tokio::time::sleep(self.delay).await;
        Ok(())
    }
}

#[async_trait]
impl TokenStore for SlowReleases {
    async fn load(&self, key: &str) -> Result<Option<Versioned<TokenSet>>, StoreError> {
        self.inner.load(key).await
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
        let lease = self.inner.lease(key, ttl).await?;
        let delay = *self.delay.lock().unwrap();
        Ok(Lease::new(
            lease.fencing(),
            lease.expires_at(),
            SlowRelease {
                lease: Mutex::new(Some(lease)),
                delay,
            },
        ))
    }
    async fn renew(&self, key: &str, lease: &Lease, ttl: Duration) -> Result<(), StoreError> {
        self.inner.renew(key, lease, ttl).await
    }
}

/// An import whose lease release answers late, while a flight of the same source
/// rotates the imported token and fails to save it: the import must not forget that
/// rotated set (it updates the source's state before it lets the lease go).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_never_forgets_a_rotation_made_after_it() {
    let sim = Simulator::builder(Mode::Lucid).start().await.unwrap();
    let grant = sim.issue_grant();
    let faulty = FaultyStore::new(MemoryStore::new());
    let store = SlowReleases {
        inner: faulty.clone(),
        delay: Arc::new(Mutex::new(Duration::ZERO)),
    };
    let mut profile = sim.profile();
    profile.request_timeout = Duration::from_secs(1);
    let a = RefreshingTokenSource::builder(profile, sim.credentials())
        .store(store.clone())
        .key("k")
        .initial_refresh_token(&grant)
        .lease_ttl(Duration::from_millis(1500))
        .store_timeout(Duration::from_secs(5))
        .forced_refresh_interval(Duration::ZERO)
        .build()
        .unwrap();
    let t1 = a.access_token().await.unwrap();
    *store.delay.lock().unwrap() = Duration::from_secs(3);
    let regrant = sim.issue_grant();
    let import = tokio::spawn({
        let a = a.clone();
        async move { a.import_refresh_token(regrant).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    *store.delay.lock().unwrap() = Duration::ZERO;
    // The same source rotates the imported token; its save and the retries' reads fail
    // while the import's release is still unanswered.
    faulty.fail_nth(StoreOp::Save, 2, StoreFault::FailBefore);
    for n in 1..=40 {
        faulty.fail_nth(StoreOp::Load, n + 2, StoreFault::FailBefore);
    }
    a.invalidate(&t1);
    let t2 = a.access_token().await;
    import.await.unwrap().expect("the import landed");
    faulty.clear_queued();
    eventually("the rotated set is saved", async || {
        (!a.status().rotation_unsaved).then_some(())
    })
    .await;
    if let Ok(t2) = &t2 {
        a.invalidate(t2);
    }
    // The next refresh presents the newest refresh token, not the imported one again.
    eventually("the next refresh", async || match a.access_token().await {
        Ok(token) => Some(token),
        Err(e) if e.is_transient() => None,
        Err(e) => panic!("{e:?}: {:?}", sim.counters()),
    })
    .await;
    let counters = sim.counters();
    assert_eq!(counters.reuse_attempts, 0, "{counters:?}");
    assert_eq!(counters.revoked_grants, 0, "{counters:?}");
}

/// A panic while retrying the save of a rotated set keeps the lease (here a file lock,
/// whose release would tell other holders that the presenting holder died).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_while_retrying_a_save_keeps_the_key_locked() {
    let sim = Simulator::builder(Mode::Lucid)
        .response_delay(Duration::from_millis(400))
        .start()
        .await
        .unwrap();
    let grant = sim.issue_grant();
    let dir = tempfile::tempdir().unwrap();
    let store = FaultyStore::new(FileStore::new(dir.path()));
    let replica = || {
        let mut profile = sim.profile();
        profile.request_timeout = Duration::from_secs(1);
        RefreshingTokenSource::builder(profile, sim.credentials())
            .store(store.clone())
            .key("k")
            .initial_refresh_token(&grant)
            .forced_refresh_interval(Duration::ZERO)
            .build()
            .unwrap()
    };
    let (a, b) = (replica(), replica());
    let t1 = a.access_token().await.unwrap();
    assert_eq!(b.access_token().await.unwrap(), t1);
    a.invalidate(&t1);
    b.invalidate(&t1);
    store.fail_nth(StoreOp::Save, 2, StoreFault::FailBefore); // A's rotated set
    store.fail_nth(StoreOp::Save, 3, StoreFault::Panic); // the first retry
    let a_call = call(&a);
    tokio::time::sleep(Duration::from_millis(150)).await;
    let b_call = call(&b);
    let t2 = a_call.await.unwrap().expect("A is served");
    let adopted = b_call
        .await
        .unwrap()
        .expect("B waits for the lock, then adopts");
    assert_eq!(adopted, t2);
    assert_eq!(store.counts().panics, 1);
    let counters = sim.counters();
    assert_eq!(counters.reuse_attempts, 0, "{counters:?}");
    assert_eq!(counters.refreshes, 2, "{counters:?}");
}

// A store that goes back in time (it lost acknowledged writes).

/// The store hands back a set whose refresh token this source already used: the source
/// never presents it again (a typed, non-transient error instead), and a rotated set it
/// still holds unsaved is written over that stale set rather than dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_goes_back_in_time_never_gets_a_used_token_presented() {
    let (fx, clock) = Fixture::clocked().await;
    let a = fx.replica(|b| b);
    a.access_token().await.unwrap();
    let first = fx.store.get_ref().get(&fx.key).unwrap().value;

    // Rotated again; the save fails a few times while the store "rolls back" to the first
    // rotated set (an older write resurfacing, as after a failover to a lagging replica).
    clock.advance(time::Duration::hours(2));
    for n in 2..=4 {
        fx.store.fail_nth(StoreOp::Save, n, StoreFault::FailBefore);
    }
    a.access_token().await.unwrap();
    assert!(a.status().rotation_unsaved);
    fx.store.get_ref().put(&fx.key, first.clone());
    eventually("the retry settles", async || {
        (!a.status().rotation_unsaved).then_some(())
    })
    .await;
    fx.assert_nothing_lost();

    // Rolled back again, with nothing unsaved: the used token is not presented; the
    // newest set the source knows is written back and refreshed from.
    fx.store.get_ref().put(&fx.key, first);
    clock.advance(time::Duration::hours(2));
    a.access_token()
        .await
        .expect("refreshed from the newest known set");
    fx.assert_nothing_lost();

    // A person "re-importing" a token this source already used is told so at once.
    let used = fx.grant.clone();
    let err = a.import_refresh_token(used).await.unwrap_err();
    assert!(matches!(err, Error::Config(_)), "{err:?}");
}

/// A caller whose source waits on another holder's write-ahead record gets an answer
/// within seconds (a transient error to retry), not after a whole lease ttl, even when
/// that holder never comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_on_another_holders_record_answers_callers_within_seconds() {
    let fx = Fixture::new(lucid(Duration::from_secs(3600)).await).await;
    // Default lease ttl: request and connect timeouts plus 30 s.
    let a = fx.replica(|b| b.lease_ttl(Duration::from_secs(70)));
    let b = fx.replica(|b| b.lease_ttl(Duration::from_secs(70)));
    // A leaves its record behind: a 503, then taking the record back fails.
    fx.sim.fail_next([Fault::ServerError(503)]);
    fx.store.fail_nth(StoreOp::Save, 3, StoreFault::FailBefore);
    assert!(a.access_token().await.is_err());
    let answered = tokio::time::timeout(Duration::from_secs(10), b.access_token())
        .await
        .expect("B answers within seconds");
    assert!(
        matches!(
            answered,
            Err(Error::Transient {
                kind: TransientKind::RotationInFlight,
                ..
            })
        ),
        "{answered:?}"
    );
    assert_eq!(fx.sim.counters().requests, 1, "B presented nothing");
}
