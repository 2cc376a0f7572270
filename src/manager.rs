//! [`TokenManager`]: many grants (one per user) of one provider and client, driven by the
//! same [grant engine](crate::engine) as a [`RefreshingTokenSource`].
//!
//! A manager shares one token endpoint (one HTTP client and connection pool) and one
//! store between all its grants. [`TokenManager::source`] hands out a cheap
//! [`RefreshingTokenSource`] for a key; the grant's engine is created on first use (it
//! reads the store lazily, at its first token request), kept in a bounded cache (a
//! capacity and an idle time, by `moka`), and created again after eviction. An evicted
//! engine that something still holds (a handle, a flight, a save being retried) is found
//! again rather than duplicated, so one process has one engine per key; replicas
//! coordinate through the store's lease as ever.
//!
//! [`TokenManager::spawn_sweeper`] keeps every stored grant alive, loaded or not: it asks
//! the store for the grants whose refresh token nears its expiry
//! ([`TokenStore::due`]) and rotates each once (the protocol adopts what another replica
//! already rotated), with bounded concurrency and a fleet-wide pause on `429`.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration as StdDuration;

use crate::clock::{Clock, SystemClock};
use crate::engine::{EXHAUSTED_RETRY, Engine, EngineConfig, Following, Reason, Registry};
use crate::error::{Error, TransientKind};
use crate::events::{Event, EventCounts, EventSink};
use crate::http::TokenEndpoint;
use crate::provider::ProviderProfile;
use crate::refresh::{RefreshingTokenSource, TimingOptions};
use crate::secret::ClientCredentials;
use crate::store::{MemoryStore, RefuseSealed, TokenStore};
use crate::token::DEFAULT_LEEWAY;

/// Many grants (one per user) of one provider and client, driven by the same grant
/// engine as a [`RefreshingTokenSource`].
///
/// One token endpoint (one HTTP client and connection pool) and one store serve every
/// grant. [`source`](Self::source) hands out a cheap [`RefreshingTokenSource`] for a
/// key; the grant is created on first use (it reads the store at its first token
/// request), kept in a bounded cache (a capacity and an idle time), and created again
/// after eviction. An evicted grant that something still holds (a handle, a refresh in
/// flight, a save being retried) is found again rather than duplicated: one process has
/// one engine per key, and replicas coordinate through the store's lease as ever.
///
/// [`spawn_sweeper`](Self::spawn_sweeper) keeps every stored grant alive, loaded or not:
/// it asks the store for the grants whose refresh token nears its expiry
/// ([`TokenStore::due`]) and rotates each once (a replica that finds it already rotated
/// adopts it), with bounded concurrency and a fleet-wide pause after a `429`.
/// [`subscribe`](Self::subscribe) streams what happens to each grant.
///
/// ```no_run
/// # async fn run() -> Result<(), tokenkeeper::Error> {
/// use tokenkeeper::{ClientCredentials, FileStore, ProviderProfile, TokenManager};
///
/// let manager = TokenManager::builder(ProviderProfile::lucid(), ClientCredentials::new("id", "secret"))
///     .store(FileStore::new("grants"))
///     .build()?;
/// let _sweeper = manager.spawn_sweeper(Default::default());
/// let token = manager.source("user-42")?.access_token().await?;
/// # let _ = token;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct TokenManager {
    shared: Arc<Shared>,
}

struct Shared {
    /// What every engine shares (endpoint, store, clock, timing, events).
    config: Arc<EngineConfig>,
    /// The engines kept in memory (strong references), bounded by capacity and idle
    /// time. Finding and creating engines is the registry's job.
    engines: moka::sync::Cache<String, Arc<Engine>>,
    /// Every live engine by key (a handle, a flight or the cache holds it): the one place
    /// engines are found or created.
    registry: Arc<Registry>,
    events: Arc<EventSink>,
    counters: Counters,
    /// A fleet-wide pause after a `429` (the monotonic instant it ends).
    paused_until: Mutex<Option<tokio::time::Instant>>,
    /// Grants a sweep failed to keep alive: failures so far, and when to try again.
    failing: Mutex<std::collections::HashMap<String, (u32, tokio::time::Instant)>>,
}

impl fmt::Debug for TokenManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenManager")
            .field("provider", &self.shared.config.endpoint.profile().name)
            .field("store", &self.shared.config.store)
            .field("loaded", &self.shared.engines.entry_count())
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Counters {
    engines_created: AtomicU64,
    sweeps: AtomicU64,
    swept: AtomicU64,
    sweep_failures: AtomicU64,
}

/// Configures a [`TokenManager`].
#[derive(Debug)]
pub struct ManagerBuilder {
    profile: ProviderProfile,
    credentials: ClientCredentials,
    store: Option<Arc<dyn TokenStore>>,
    leeway: time::Duration,
    clock: Arc<dyn Clock>,
    capacity: u64,
    idle: StdDuration,
    timing: TimingOptions,
    http_client: Option<reqwest::Client>,
}

/// A grant a sweep failed to keep alive is tried again after this, doubling.
const SWEEP_RETRY_FIRST: StdDuration = StdDuration::from_secs(30);
/// ... up to this: well within any keep-alive window (a fifth of the refresh token's
/// lifetime), so that a grant failing through an outage is tried again before it dies.
const SWEEP_RETRY_MAX: StdDuration = StdDuration::from_secs(600);
/// A failing grant's record is dropped this long after its retry (the grant was deleted,
/// no longer due, or refreshed by a caller).
const SWEEP_FORGET_AFTER: StdDuration = StdDuration::from_secs(3600);
/// The shortest interval between sweeps.
const SWEEP_INTERVAL_MIN: StdDuration = StdDuration::from_secs(1);

/// The default number of grants kept in memory.
pub(crate) const DEFAULT_CAPACITY: u64 = 10_000;
/// The default idle time after which a grant leaves memory.
pub(crate) const DEFAULT_IDLE: StdDuration = StdDuration::from_secs(3600);

impl ManagerBuilder {
    /// Where the grants live (default: a new [`MemoryStore`]).
    pub fn store(mut self, store: impl TokenStore) -> Self {
        self.store = Some(Arc::new(store));
        self
    }

    /// A store shared with other users of it.
    pub fn shared_store(mut self, store: Arc<dyn TokenStore>) -> Self {
        self.store = Some(store);
        self
    }

    /// How long before expiry a token counts as stale (see [`crate::Builder::leeway`]).
    pub fn leeway(mut self, leeway: StdDuration) -> Self {
        self.leeway = time::Duration::try_from(leeway).unwrap_or(time::Duration::MAX);
        self
    }

    /// The clock (tests: [`crate::ManualClock`]).
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// How many grants are kept in memory at most (default 10,000). Others are read from
    /// the store again when used.
    pub fn capacity(mut self, capacity: u64) -> Self {
        self.capacity = capacity;
        self
    }

    /// How long an unused grant stays in memory (default an hour).
    pub fn idle_eviction(mut self, idle: StdDuration) -> Self {
        self.idle = idle;
        self
    }

    /// The store lease's ttl (see [`crate::Builder::lease_ttl`]).
    pub fn lease_ttl(mut self, ttl: StdDuration) -> Self {
        self.timing.lease_ttl = Some(ttl);
        self
    }

    /// The bound on one store call (see [`crate::Builder::store_timeout`]).
    pub fn store_timeout(mut self, timeout: StdDuration) -> Self {
        self.timing.store_timeout = timeout;
        self
    }

    /// After how long of continuous provider failures a grant counts as exhausted (see
    /// [`crate::Builder::exhausted_after`]; default a day): its attempts are then an hour
    /// apart, sweeps included, so that a grant the provider keeps failing costs next to
    /// nothing. The failure time lives in the grant's memory: a grant evicted and loaded
    /// again starts counting anew (a sweep still spaces it: 30 s doubling to 10 minutes,
    /// or an hour once exhausted).
    pub fn exhausted_after(mut self, after: StdDuration) -> Self {
        self.timing.exhausted_after = after;
        self
    }

    /// The HTTP client every grant's token requests are sent with (see
    /// [`crate::Builder::http_client`]). Default: one client of the manager's own, shared
    /// by all its grants, keeping its connections for the next request.
    pub fn http_client(mut self, client: reqwest::Client) -> Self {
        self.http_client = Some(client);
        self
    }

    /// Builds the manager. The same checks as [`crate::Builder::build`].
    pub fn build(self) -> Result<TokenManager, Error> {
        let timing = self.timing.check(&self.profile)?;
        if self.capacity == 0 {
            return Err(Error::Config(
                "the manager's capacity must be at least 1".into(),
            ));
        }
        let engines = moka::sync::Cache::builder()
            .max_capacity(self.capacity)
            .time_to_idle(self.idle)
            .build();
        let events = Arc::new(EventSink::new(1024));
        let registry = Arc::default();
        // A manager sweeps many grants: a client of its own, keeping its connections.
        let http_client = match self.http_client {
            Some(client) => client,
            None => crate::http::client_for(&self.profile, true)?,
        };
        Ok(TokenManager {
            shared: Arc::new(Shared {
                config: Arc::new(EngineConfig {
                    endpoint: Arc::new(TokenEndpoint::new(
                        self.profile,
                        self.credentials,
                        Some(http_client),
                    )?),
                    store: Arc::new(RefuseSealed(
                        self.store.unwrap_or_else(|| Arc::new(MemoryStore::new())),
                    )),
                    initial_refresh_token: None,
                    leeway: self.leeway,
                    clock: self.clock,
                    timing,
                    events: Some(Arc::clone(&events)),
                    registry: Some(Arc::downgrade(&registry)),
                    following: Following::new(crate::follow::start),
                }),
                engines,
                registry,
                events,
                counters: Counters::default(),
                paused_until: Mutex::new(None),
                failing: Mutex::default(),
            }),
        })
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl TokenManager {
    /// Starts configuring a manager for `profile`'s provider, as `credentials`' client.
    pub fn builder(profile: ProviderProfile, credentials: ClientCredentials) -> ManagerBuilder {
        ManagerBuilder {
            profile,
            credentials,
            store: None,
            leeway: DEFAULT_LEEWAY,
            clock: Arc::new(SystemClock),
            capacity: DEFAULT_CAPACITY,
            idle: DEFAULT_IDLE,
            timing: TimingOptions::default(),
            http_client: None,
        }
    }

    /// The grant stored under `key`, as a source: cheap (a reference count), and every
    /// handle for one key shares one engine while any is in use. Nothing is read until
    /// the first token request. Fails only for a key the store cannot hold.
    pub fn source(&self, key: &str) -> Result<RefreshingTokenSource, Error> {
        Ok(RefreshingTokenSource {
            inner: self.engine(key)?,
        })
    }

    fn engine(&self, key: &str) -> Result<Arc<Engine>, Error> {
        let shared = &self.shared;
        if let Some(engine) = shared.engines.get(key) {
            return Ok(engine);
        }
        shared
            .config
            .store
            .check_key(key)
            .map_err(|e| Error::Config(format!("the store cannot hold this key: {e}")))?;
        let engine = {
            let mut registry = lock(&shared.registry);
            match registry.get(key).and_then(Weak::upgrade) {
                Some(live) => live,
                None => {
                    shared
                        .counters
                        .engines_created
                        .fetch_add(1, Ordering::Relaxed);
                    let engine = Arc::new(Engine::new(Arc::clone(&shared.config), key.to_owned()));
                    registry.insert(key.to_owned(), Arc::downgrade(&engine));
                    engine
                }
            }
        };
        // Outside the registry's lock: the cache may drop an evicted engine here, whose
        // `Drop` takes that lock.
        shared.engines.insert(key.to_owned(), Arc::clone(&engine));
        Ok(engine)
    }

    /// Every event of every grant from now on. A receiver that falls more than 1,024
    /// events behind loses the oldest (`RecvError::Lagged`).
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Event> {
        self.shared.events.subscribe()
    }

    /// A health snapshot of the manager.
    pub fn status(&self) -> ManagerStatus {
        let shared = &self.shared;
        shared.engines.run_pending_tasks();
        let counters = &shared.counters;
        ManagerStatus {
            loaded: shared.engines.entry_count(),
            engines_created: counters.engines_created.load(Ordering::Relaxed),
            sweeps: counters.sweeps.load(Ordering::Relaxed),
            swept: counters.swept.load(Ordering::Relaxed),
            sweep_failures: counters.sweep_failures.load(Ordering::Relaxed),
            events: shared.events.counts(),
        }
    }

    /// One sweep: rotates, once, every stored grant whose refresh token is due for
    /// keep-alive now (at most `options.batch` of them), with at most
    /// `options.concurrency` refreshes at a time. Returns how many were kept alive;
    /// [`spawn_sweeper`](Self::spawn_sweeper) calls it on schedule. A `429` pauses the
    /// whole sweep (this and the next ones) for its `Retry-After`. A grant that failed is
    /// left out of the next sweeps for a while (1 minute, doubling to 10 minutes, or an
    /// hour for an exhausted grant), so that a few stuck grants never crowd out the
    /// others.
    pub async fn sweep(&self, options: &SweepOptions) -> Result<usize, Error> {
        let shared = &self.shared;
        shared.counters.sweeps.fetch_add(1, Ordering::Relaxed);
        let now = shared.config.clock.monotonic();
        let skipped: std::collections::HashSet<String> = {
            let mut failing = lock(&shared.failing);
            // Kept past its retry (the next failure doubles the wait), forgotten long after.
            failing.retain(|_, (_, retry_at)| {
                now.saturating_duration_since(*retry_at) < SWEEP_FORGET_AFTER
            });
            failing
                .iter()
                .filter(|(_, (_, retry_at))| *retry_at > now)
                .map(|(key, _)| key.clone())
                .collect()
        };
        let keys = shared
            .config
            .store
            .due(
                shared.config.clock.now(),
                options.batch.saturating_add(skipped.len()),
            )
            .await
            .map_err(Error::Storage)?;
        let permits = Arc::new(tokio::sync::Semaphore::new(options.concurrency.max(1)));
        let mut tasks = tokio::task::JoinSet::new();
        for key in keys
            .into_iter()
            .filter(|k| !skipped.contains(k))
            .take(options.batch)
        {
            let permit = Arc::clone(&permits)
                .acquire_owned()
                .await
                .map_err(|_| Error::transient(TransientKind::Interrupted, None))?;
            // After the permit: a 429 answered meanwhile pauses this one too.
            self.wait_out_pause().await;
            let manager = self.clone();
            tasks.spawn(async move {
                let _permit = permit;
                let outcome = match manager.engine(&key) {
                    Ok(engine) => engine.refresh_now(Reason::KeepAlive).await.map(drop),
                    Err(e) => Err(e),
                };
                manager.after_sweep(&key, &outcome);
                outcome.is_ok()
            });
        }
        let mut kept = 0;
        while let Some(done) = tasks.join_next().await {
            kept += usize::from(done.unwrap_or(false));
        }
        Ok(kept)
    }

    fn after_sweep(&self, key: &str, outcome: &Result<(), Error>) {
        let shared = &self.shared;
        let counters = &shared.counters;
        match outcome {
            Ok(()) => {
                counters.swept.fetch_add(1, Ordering::Relaxed);
                lock(&shared.failing).remove(key);
            }
            Err(e) => {
                counters.sweep_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(key = %key, error = %e, "keeping a grant alive failed");
                let now = shared.config.clock.monotonic();
                {
                    let mut failing = lock(&shared.failing);
                    let failures = failing.get(key).map_or(0, |(n, _)| *n).saturating_add(1);
                    // Doubling, and never before the grant's own next attempt (an
                    // exhausted grant's is an hour away).
                    let wait = SWEEP_RETRY_FIRST
                        .saturating_mul(1 << failures.min(12))
                        .min(SWEEP_RETRY_MAX)
                        .max(e.retry_after().unwrap_or_default().min(EXHAUSTED_RETRY));
                    let retry_at = now.checked_add(wait).unwrap_or(now);
                    failing.insert(key.to_owned(), (failures, retry_at));
                }
                if let Error::Transient {
                    kind: TransientKind::RateLimited,
                    retry_after,
                    ..
                } = e
                {
                    let wait = retry_after.unwrap_or(StdDuration::from_secs(60));
                    let now = tokio::time::Instant::now();
                    let until = now.checked_add(wait).unwrap_or(now);
                    let mut paused = lock(&shared.paused_until);
                    *paused = Some(paused.map_or(until, |p| p.max(until)));
                }
            }
        }
    }

    /// Waits until no fleet-wide pause is in force (a pause extended meanwhile is
    /// waited out too).
    async fn wait_out_pause(&self) {
        loop {
            let until = *lock(&self.shared.paused_until);
            match until {
                Some(until) if until > tokio::time::Instant::now() => {
                    tokio::time::sleep_until(until).await;
                }
                _ => return,
            }
        }
    }

    /// Sweeps every `options.interval` until the manager (every clone) is dropped or the
    /// task is stopped.
    pub fn spawn_sweeper(&self, options: SweepOptions) -> crate::BackgroundTask {
        let weak = Arc::downgrade(&self.shared);
        let task = tokio::spawn(async move {
            loop {
                let Some(shared) = weak.upgrade() else { return };
                let manager = TokenManager { shared };
                match manager.sweep(&options).await {
                    Ok(kept) if kept > 0 => tracing::info!(kept, "kept grants alive"),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "a sweep failed"),
                }
                drop(manager);
                tokio::time::sleep(options.interval.max(SWEEP_INTERVAL_MIN)).await;
            }
        });
        crate::BackgroundTask::new(task)
    }
}

/// How [`TokenManager::sweep`] works.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct SweepOptions {
    /// Between sweeps (default 5 minutes; at least a second).
    pub interval: StdDuration,
    /// The most grants one sweep handles (default 10,000).
    pub batch: usize,
    /// The most refreshes at a time (default 16).
    pub concurrency: usize,
}

impl SweepOptions {
    /// Sets [`interval`](Self::interval).
    pub fn interval(mut self, interval: StdDuration) -> Self {
        self.interval = interval;
        self
    }

    /// Sets [`batch`](Self::batch).
    pub fn batch(mut self, batch: usize) -> Self {
        self.batch = batch;
        self
    }

    /// Sets [`concurrency`](Self::concurrency).
    pub fn concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = concurrency;
        self
    }
}

impl Default for SweepOptions {
    fn default() -> Self {
        Self {
            interval: StdDuration::from_secs(300),
            batch: 10_000,
            concurrency: 16,
        }
    }
}

/// A manager's health snapshot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ManagerStatus {
    /// Grants in memory now.
    pub loaded: u64,
    /// Engines created (first uses, and uses after eviction).
    pub engines_created: u64,
    /// Sweeps run.
    pub sweeps: u64,
    /// Grants kept alive by sweeps.
    pub swept: u64,
    /// Grants a sweep failed to keep alive (retried at the next sweep).
    pub sweep_failures: u64,
    /// Events sent by the manager's grants so far, by kind.
    pub events: EventCounts,
}
