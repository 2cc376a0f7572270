//! [`RefreshingTokenSource`]: the cache, the hot path, and the single flight that drives
//! the refresh protocol of [`crate::protocol`].
//!
//! The hot path ([`RefreshingTokenSource::access_token`]) is one lock-free `ArcSwap` load,
//! one clock read and one reference-count increment. Everything else runs in one spawned
//! task per key at a time (the *flight*), never in a caller's future, so that a cancelled
//! caller cannot lose a rotated refresh token; every waiter shares its outcome.
//!
//! Before a flight starts, [`Inner::gate`] decides what it may do: refresh, only look at
//! the store (during a provider backoff, or for a grant known to be dead), or nothing
//! (answer the backoff or the dead grant's error at once).

use std::fmt;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration as StdDuration;

use arc_swap::ArcSwapOption;
use async_trait::async_trait;
use futures_util::future::{BoxFuture, FutureExt, Shared};
use time::{Duration, OffsetDateTime};
use tokio::time::Instant;

use crate::clock::{Clock, SystemClock};
use crate::error::{Error, TransientKind};
use crate::http::TokenEndpoint;
use crate::lease::{HeldLease, bounded};
use crate::provider::ProviderProfile;
use crate::retry::{Backoff, StoreSpacing};
use crate::secret::{AccessToken, ClientCredentials, RefreshToken};
use crate::source::TokenSource;
use crate::status::{Metrics, Status};
use crate::store::{MemoryStore, TokenStore};
use crate::token::{DEFAULT_LEEWAY, Freshness, RotationInFlight, TokenSet};

/// A [`TokenSource`] that refreshes through a provider's token endpoint, exactly once per
/// expiry across every task, process and machine that shares its [`TokenStore`].
///
/// Needs a tokio runtime: refreshes run in spawned tasks. Cloning is cheap and clones
/// share one cache.
///
/// ```no_run
/// use tokenkeeper::{ClientCredentials, FileStore, ProviderProfile, RefreshingTokenSource, TokenSource};
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let source = RefreshingTokenSource::builder(
///     ProviderProfile::lucid(),
///     ClientCredentials::new("client-id", "client-secret"),
/// )
/// .store(FileStore::new("tokens"))
/// .key("lucid:user-42")
/// .initial_refresh_token("oauth2-...")
/// .build()?;
/// let token = source.access_token().await?;
/// println!("Authorization: Bearer {}", token.secret().len());
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RefreshingTokenSource {
    pub(crate) inner: Arc<Inner>,
}

impl fmt::Debug for RefreshingTokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RefreshingTokenSource")
            .field("provider", &self.inner.endpoint.profile().name)
            .field("key", &self.inner.key)
            .field("store", &self.inner.store)
            .finish_non_exhaustive()
    }
}

/// Configures a [`RefreshingTokenSource`].
#[derive(Debug)]
pub struct Builder {
    profile: ProviderProfile,
    credentials: ClientCredentials,
    store: Option<Arc<dyn TokenStore>>,
    key: String,
    initial_refresh_token: Option<RefreshToken>,
    leeway: Duration,
    clock: Arc<dyn Clock>,
    lease_ttl: Option<StdDuration>,
    store_timeout: StdDuration,
    takeover_after: StdDuration,
    forced_refresh_interval: StdDuration,
}

/// The longest lease ttl accepted.
const MAX_LEASE_TTL: StdDuration = StdDuration::from_secs(24 * 3600);
/// The default bound on one store call.
const DEFAULT_STORE_TIMEOUT: StdDuration = StdDuration::from_secs(10);
/// The default wait before taking over a rotation another holder left in flight.
const DEFAULT_TAKEOVER_AFTER: StdDuration = StdDuration::from_secs(300);
/// The default shortest spacing of refreshes forced by [`TokenSource::invalidate`].
const DEFAULT_FORCED_REFRESH_INTERVAL: StdDuration = StdDuration::from_secs(30);

impl Builder {
    /// Where token sets live. Default: a new [`MemoryStore`].
    pub fn store(mut self, store: impl TokenStore) -> Self {
        self.store = Some(Arc::new(store));
        self
    }

    /// A store already shared behind an `Arc`.
    pub fn shared_store(mut self, store: Arc<dyn TokenStore>) -> Self {
        self.store = Some(store);
        self
    }

    /// The key of this grant in the store. Default: `"default"`.
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.key = key.into();
        self
    }

    /// The refresh token from the one-time consent. Used only when the store holds
    /// nothing for the key and this source has never seen anything there; it is then
    /// saved before it is presented.
    pub fn initial_refresh_token(mut self, token: impl Into<String>) -> Self {
        self.initial_refresh_token = Some(RefreshToken::new(token));
        self
    }

    /// How long before expiry a token turns stale and is refreshed in the background.
    /// Default 60 s, clamped to half of each token's lifetime.
    pub fn leeway(mut self, leeway: StdDuration) -> Self {
        self.leeway = Duration::try_from(leeway).unwrap_or(Duration::MAX);
        self
    }

    /// The clock expiries are compared with. Default: [`SystemClock`].
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// How long the store's lease lasts between renewals. The lease is renewed every
    /// third of it while a refresh runs, so it only matters when a holder dies or is cut
    /// off from the store: then the others wait this long. Must exceed the profile's
    /// request timeout (a store that cannot renew relies on it alone). Default: the
    /// profile's request and connect timeouts plus 30 s.
    pub fn lease_ttl(mut self, ttl: StdDuration) -> Self {
        self.lease_ttl = Some(ttl);
        self
    }

    /// How long one store call may take before it counts as failed (with an unknown
    /// outcome, like a cut connection). A lease wait may take up to the lease ttl on top.
    /// Default 10 s.
    pub fn store_timeout(mut self, timeout: StdDuration) -> Self {
        self.store_timeout = timeout;
        self
    }

    /// How long to wait for another holder that started a refresh (its write-ahead
    /// record is in the store) and then lost its lease, before presenting the refresh
    /// token anyway. That holder may be alive, cut off from the store, with the rotated
    /// token in memory: presenting the token it used would make a provider with reuse
    /// detection revoke the grant. It may also have died, and then waiting longer only
    /// delays recovery. Applies to stores whose leases expire (Memory, Redis,
    /// PostgreSQL); a released file lock means its holder died. Default 5 minutes.
    pub fn abandoned_rotation_after(mut self, wait: StdDuration) -> Self {
        self.takeover_after = wait;
        self
    }

    /// The shortest spacing of refreshes forced by [`TokenSource::invalidate`] (an API
    /// answering 401, or HighQ's 403, which also means "permission denied"). Within it, a
    /// rejected token that is still the newest in the store is served again rather than
    /// refreshed again. Default 30 s.
    pub fn forced_refresh_interval(mut self, interval: StdDuration) -> Self {
        self.forced_refresh_interval = interval;
        self
    }

    /// Builds the source. Fails with [`Error::Config`] on an invalid profile (such as an
    /// `http` URL to a non-loopback host, or a header that is not valid HTTP), a key the
    /// store cannot hold, or a lease ttl that does not outlast the request timeout.
    pub fn build(self) -> Result<RefreshingTokenSource, Error> {
        let store = self.store.unwrap_or_else(|| Arc::new(MemoryStore::new()));
        if self.key.is_empty() {
            return Err(Error::Config("the store key must not be empty".into()));
        }
        store
            .check_key(&self.key)
            .map_err(|e| Error::Config(format!("the store cannot hold this key: {e}")))?;
        let profile = &self.profile;
        let lease_ttl = self.lease_ttl.unwrap_or(
            profile
                .request_timeout
                .saturating_add(profile.connect_timeout)
                .saturating_add(StdDuration::from_secs(30)),
        );
        if lease_ttl <= profile.request_timeout {
            return Err(Error::Config(format!(
                "the lease ttl ({lease_ttl:?}) must exceed the request timeout ({:?}): \
                 a refresh is never started on a lease that could expire before its answer",
                profile.request_timeout
            )));
        }
        if lease_ttl > MAX_LEASE_TTL {
            return Err(Error::Config(format!(
                "the lease ttl ({lease_ttl:?}) is longer than a day: a dead holder would block every other one that long"
            )));
        }
        if self.store_timeout.is_zero() || self.store_timeout > MAX_LEASE_TTL {
            return Err(Error::Config(format!(
                "the store timeout ({:?}) must be between zero and a day",
                self.store_timeout
            )));
        }
        let endpoint = TokenEndpoint::new(self.profile, self.credentials)?;
        Ok(RefreshingTokenSource {
            inner: Arc::new(Inner {
                endpoint,
                store,
                key: self.key,
                id: format!("{:032x}", fastrand::u128(..)),
                initial_refresh_token: self.initial_refresh_token,
                leeway: self.leeway,
                clock: self.clock,
                timing: Timing {
                    lease_ttl,
                    store_timeout: self.store_timeout,
                    takeover_after: self.takeover_after,
                    forced_refresh_interval: self.forced_refresh_interval,
                },
                cache: ArcSwapOption::empty(),
                flight: Mutex::new(FlightSlot::default()),
                state: Mutex::new(State::default()),
            }),
        })
    }
}

impl RefreshingTokenSource {
    /// Starts configuring a source for `profile`'s provider, authenticating as `credentials`.
    pub fn builder(profile: ProviderProfile, credentials: ClientCredentials) -> Builder {
        Builder {
            profile,
            credentials,
            store: None,
            key: "default".into(),
            initial_refresh_token: None,
            leeway: DEFAULT_LEEWAY,
            clock: Arc::new(SystemClock),
            lease_ttl: None,
            store_timeout: DEFAULT_STORE_TIMEOUT,
            takeover_after: DEFAULT_TAKEOVER_AFTER,
            forced_refresh_interval: DEFAULT_FORCED_REFRESH_INTERVAL,
        }
    }

    /// Replaces the stored grant with `refresh_token` (after a person consented again):
    /// saved under the lease, whatever the store held, and used at the next refresh. A
    /// rotated set this source still failed to save is superseded by it.
    pub async fn import_refresh_token(
        &self,
        refresh_token: impl Into<String>,
    ) -> Result<(), Error> {
        let seed =
            TokenSet::from_refresh_token(RefreshToken::new(refresh_token), self.inner.clock.now());
        self.import(seed).await
    }

    /// Replaces the stored grant with `seed` under the lease, whatever the store held (a
    /// dead grant, another grant): what [`import_refresh_token`](Self::import_refresh_token)
    /// and [`crate::consent::Grant::save`] do. Its access token, if any, is served at once.
    pub(crate) async fn import(&self, seed: TokenSet) -> Result<(), Error> {
        let inner = &self.inner;
        if let Some(token) = &seed.refresh_token
            && inner.state().consumed.contains(token)
        {
            return Err(Error::Config(
                "this refresh token was already used (rotated) by this source: import the one from a new consent".into(),
            ));
        }
        let held = inner.acquire().await?;
        let result = async {
            let version = held
                .op(inner.store.load(&inner.key))
                .await?
                .map(|v| v.version);
            held.op(inner.store.save(&inner.key, &seed, version, held.lease()))
                .await
        }
        .await;
        if result.is_ok() {
            // Still under the lease: no flight of this source can have rotated anything
            // since the seed was saved, so whatever is unsaved predates it.
            let mut state = inner.state();
            // Flights started before this point publish nothing any more.
            state.epoch = state.epoch.wrapping_add(1);
            drop(state);
            inner.cache.store(None);
            inner.publish(&seed);
            let mut state = inner.state();
            state.last_error = None;
            state.unsaved = None;
            state.backoff.succeeded();
            state.store_spacing.succeeded();
            state.dead = None;
            state.rejected_access = None;
            state.last_known = Some(seed);
        }
        held.release().await;
        result?;
        Ok(())
    }

    /// Revokes the grant: at the provider's revocation endpoint when the profile has one
    /// (RFC 7009; revoking the refresh token ends the whole grant), then in the store,
    /// under the lease and with the compare-and-swap, so that every process sharing the
    /// store answers [`ReauthorizationReason::Revoked`](crate::ReauthorizationReason::Revoked)
    /// without presenting anything. The stored set keeps no token. If the provider cannot
    /// be reached, nothing changes and the error says so; a provider without a
    /// revocation endpoint (HighQ) only loses the grant from the store (its tokens stay
    /// valid there until they expire; a warning says so).
    pub async fn revoke(&self) -> Result<(), Error> {
        self.inner.revoke(true).await
    }

    /// Forgets the grant without telling the provider: marks it revoked in the store, as
    /// [`revoke`](Self::revoke) does, so that every source sharing the store stops using
    /// it. Its tokens stay valid at the provider until they expire.
    pub async fn forget(&self) -> Result<(), Error> {
        self.inner.revoke(false).await
    }

    /// The store this source uses.
    pub fn store(&self) -> &Arc<dyn TokenStore> {
        &self.inner.store
    }

    /// The store key of this grant.
    pub fn key(&self) -> &str {
        &self.inner.key
    }
}

impl RefreshingTokenSource {
    /// A token valid now, refreshing first if needed: [`TokenSource::access_token`]
    /// without the trait's boxed future. Fresh tokens cost one lock-free load, one clock
    /// read and one reference-count increment.
    pub async fn access_token(&self) -> Result<AccessToken, Error> {
        if let Some(cached) = &*self.inner.cache.load() {
            let now = self.inner.clock.now();
            // One comparison on the hot path.
            if now < cached.fresh_until {
                return Ok(cached.token.clone());
            }
            match cached.freshness(now) {
                Freshness::Fresh => return Ok(cached.token.clone()),
                Freshness::Stale => {
                    // Served at once; one detached refresh runs meanwhile.
                    self.inner.start_refresh();
                    return Ok(cached.token.clone());
                }
                Freshness::Expired => {}
            }
        }
        self.inner.wait_for_token().await
    }

    /// A token that is not within the leeway of its expiry: when the cached one is stale,
    /// waits for the refresh instead of serving it (what [`access_token`](Self::access_token)
    /// does). For short-lived processes (a command, a cron job), which must not exit with
    /// a background refresh in flight: build the source with the validity needed as its
    /// [`leeway`](Builder::leeway), call this, then [`flush`](Self::flush).
    pub async fn fresh_access_token(&self) -> Result<AccessToken, Error> {
        if let Some(cached) = &*self.inner.cache.load()
            && cached.freshness(self.inner.clock.now()) == Freshness::Fresh
        {
            return Ok(cached.token.clone());
        }
        self.inner.refresh_now(Reason::AccessToken).await
    }

    /// Waits until this source has no rotated token set left unsaved (a save that failed
    /// is retried in the background, under the lease) and no lease left to give back (a
    /// lease granted after the source had adopted another process's tokens). Call it
    /// before a short-lived process exits: a rotated set lost with the process costs the
    /// grant, and a lease left behind makes the next process wait for its expiry.
    pub async fn flush(&self) {
        loop {
            {
                let state = self.inner.state();
                if state.unsaved.is_none() && !state.persisting && state.lease_tasks == 0 {
                    return;
                }
            }
            tokio::time::sleep(StdDuration::from_millis(20)).await;
        }
    }

    /// Forgets `rejected` if it is still the current token: see [`TokenSource::invalidate`].
    /// The next call reloads the store first (another replica may have refreshed), and
    /// refreshes only if the store holds nothing newer and no forced refresh ran within
    /// [`Builder::forced_refresh_interval`].
    pub fn invalidate(&self, rejected: &AccessToken) {
        let inner = &self.inner;
        let current = inner.cache.load_full();
        if current.as_ref().is_some_and(|c| &c.token == rejected) {
            inner.state().rejected_access = Some(rejected.clone());
            inner.cache.compare_and_swap(&current, None);
        }
    }
}

impl RefreshingTokenSource {
    /// A health snapshot: expiries, time left before re-authorization, last refresh,
    /// last error, counters.
    pub fn status(&self) -> Status {
        let inner = &self.inner;
        let cached = inner.cache.load_full();
        let state = inner.state();
        let refresh_token_expires_at = cached.as_ref().and_then(|c| c.refresh_expires_at);
        let reauthorization_in = if state.dead.is_some() {
            Some(Duration::ZERO)
        } else {
            refresh_token_expires_at.map(|at| (at - inner.clock.now()).max(Duration::ZERO))
        };
        Status {
            access_token_expires_at: cached.as_ref().and_then(|c| c.expires_at),
            refresh_token_expires_at,
            reauthorization_in,
            last_refresh: state.last_refresh,
            last_error: state.last_error.clone(),
            rotation_unsaved: state.unsaved.is_some(),
            metrics: state.metrics,
        }
    }
}

#[async_trait]
impl TokenSource for RefreshingTokenSource {
    async fn access_token(&self) -> Result<AccessToken, Error> {
        RefreshingTokenSource::access_token(self).await
    }

    async fn invalidate(&self, rejected: &AccessToken) {
        RefreshingTokenSource::invalidate(self, rejected);
    }
}

/// The published access token, with its expiry precomputed for the hot path.
pub(crate) struct Cached {
    pub(crate) token: AccessToken,
    /// `stale_at`, or the end of time when the expiry is unknown: the hot path's one
    /// comparison.
    fresh_until: OffsetDateTime,
    pub(crate) stale_at: Option<OffsetDateTime>,
    pub(crate) expires_at: Option<OffsetDateTime>,
    /// When the refresh token should be rotated even if nobody asks for a token.
    pub(crate) keep_alive_at: Option<OffsetDateTime>,
    pub(crate) refresh_expires_at: Option<OffsetDateTime>,
}

impl Cached {
    #[inline]
    pub(crate) fn freshness(&self, now: OffsetDateTime) -> Freshness {
        match (self.stale_at, self.expires_at) {
            (_, Some(expires_at)) if now >= expires_at => Freshness::Expired,
            (Some(stale_at), _) if now >= stale_at => Freshness::Stale,
            _ => Freshness::Fresh,
        }
    }
}

pub(crate) type Outcome = Result<AccessToken, Error>;

/// Why a refresh runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Reason {
    /// The access token is stale, expired, missing or rejected.
    AccessToken,
    /// The refresh token nears its own expiry: rotate it even if the access token is fresh.
    KeepAlive,
}

/// What a flight does.
#[derive(Debug)]
pub(crate) enum Job {
    /// Adopt a fresh stored set, or refresh under the lease.
    Refresh(Reason),
    /// Only read the store (no lease, no request): adopt a fresh set another process
    /// saved, or pick up a re-imported grant; otherwise answer `fallback`.
    Look {
        /// The backoff's or the dead grant's error.
        fallback: Error,
    },
}

/// The refresh token is rotated once this share of its lifetime is left.
const KEEP_ALIVE_SHARE: i32 = 5;

/// When `set`'s refresh token should be rotated by keep-alive: when a fifth of its
/// lifetime is left.
pub(crate) fn keep_alive_at(set: &TokenSet) -> Option<OffsetDateTime> {
    let expires = set.refresh_expires_at?;
    let lifetime = (expires - set.obtained_at).max(Duration::ZERO);
    expires.checked_sub(lifetime / KEEP_ALIVE_SHARE)
}

type Flight = Shared<BoxFuture<'static, Outcome>>;

/// The one flight in progress, numbered so that only its own task clears it.
#[derive(Default)]
struct FlightSlot {
    current: Option<(u64, Flight)>,
    serial: u64,
}

/// Timeouts and intervals, fixed at build.
#[derive(Debug)]
pub(crate) struct Timing {
    pub(crate) lease_ttl: StdDuration,
    pub(crate) store_timeout: StdDuration,
    pub(crate) takeover_after: StdDuration,
    pub(crate) forced_refresh_interval: StdDuration,
}

pub(crate) struct Inner {
    pub(crate) endpoint: TokenEndpoint,
    pub(crate) store: Arc<dyn TokenStore>,
    pub(crate) key: String,
    /// Marks this source's write-ahead records in the store.
    pub(crate) id: String,
    pub(crate) initial_refresh_token: Option<RefreshToken>,
    pub(crate) leeway: Duration,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) timing: Timing,
    /// The published access token: the hot path reads only this.
    pub(crate) cache: ArcSwapOption<Cached>,
    flight: Mutex<FlightSlot>,
    state: Mutex<State>,
}

/// A rotated token set whose save has not (knowingly) succeeded: the newest refresh token
/// may exist only here.
#[derive(Clone, Debug)]
pub(crate) struct Unsaved {
    pub(crate) set: TokenSet,
    /// The stored version its save expected: it may only be written over that version.
    pub(crate) expected: Option<u64>,
}

/// A grant found dead: answered at once, and the store re-checked now and then.
#[derive(Clone, Debug)]
pub(crate) struct Dead {
    pub(crate) error: Error,
    /// The refresh token found dead, if any: the same token stored again is no re-import.
    pub(crate) refresh_token: Option<RefreshToken>,
    pub(crate) checked_at: Instant,
}

#[derive(Default)]
pub(crate) struct State {
    /// What happened so far, for [`RefreshingTokenSource::status`].
    pub(crate) metrics: Metrics,
    pub(crate) last_refresh: Option<OffsetDateTime>,
    pub(crate) last_error: Option<Error>,
    /// Spacing of attempts after provider failures.
    pub(crate) backoff: Backoff,
    /// Spacing of attempts after store failures.
    pub(crate) store_spacing: StoreSpacing,
    /// A rotated set not yet saved.
    pub(crate) unsaved: Option<Unsaved>,
    /// True while a task retries saving `unsaved` (it holds, or re-takes, the lease).
    pub(crate) persisting: bool,
    /// Tasks still giving back a lease this source no longer needs (see
    /// [`RefreshingTokenSource::flush`]).
    pub(crate) lease_tasks: usize,
    /// Bumped, under the lease, when a revoke or an import replaces the grant: a flight
    /// started under an older epoch (its store reads or its answer arriving late)
    /// publishes nothing and keeps no rotated set.
    pub(crate) epoch: u64,
    /// An access token the API rejected (see [`RefreshingTokenSource::invalidate`]).
    pub(crate) rejected_access: Option<AccessToken>,
    /// When a refresh forced by a rejection was last sent.
    pub(crate) last_forced_refresh: Option<Instant>,
    /// The grant is dead until the store shows a new one.
    pub(crate) dead: Option<Dead>,
    /// The newest set this source has seen stored or saved: evidence that the key existed,
    /// and what to restore if the store loses it.
    pub(crate) last_known: Option<TokenSet>,
    /// When the store was last read without the lease.
    pub(crate) last_look: Option<Instant>,
    /// Another holder's write-ahead record (the whole record: each presentation writes a
    /// new one), and when this source first saw it.
    pub(crate) foreign_rotation: Option<(RotationInFlight, Instant)>,
    /// The refresh tokens this source presented and saw rotated (the newest few): a store
    /// that hands one back has lost acknowledged writes, and it is never presented again.
    pub(crate) consumed: std::collections::VecDeque<RefreshToken>,
}

/// How often a grant known to be dead is looked up again (a re-import by another process).
pub(crate) const DEAD_RECHECK: StdDuration = StdDuration::from_secs(10);
/// How often a caller with an expired token may make the source read the store while it
/// backs off from the provider.
pub(crate) const LOOK_INTERVAL: StdDuration = StdDuration::from_secs(1);

/// What a new flight may do.
enum Gate {
    Go,
    Look(Error),
    Refuse(Error),
}

impl Inner {
    pub(crate) fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn flight(&self) -> MutexGuard<'_, FlightSlot> {
        self.flight.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn now(&self) -> Instant {
        self.clock.monotonic()
    }

    /// Takes the store lease for this key, bounded by the timeouts.
    pub(crate) async fn acquire(&self) -> Result<HeldLease, Error> {
        HeldLease::acquire(
            &self.store,
            &self.key,
            self.timing.lease_ttl,
            self.timing.store_timeout,
        )
        .await
        .map_err(crate::lease::lease_error)
    }

    /// One store call without the lease, bounded by the store timeout.
    pub(crate) async fn unleased<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, crate::store::StoreError>>,
    ) -> Result<T, Error> {
        bounded(self.timing.store_timeout, call)
            .await
            .map_err(Error::Storage)
    }

    /// What a flight started now may do.
    fn gate(&self, reason: Reason) -> Gate {
        let now = self.now();
        let state = self.state();
        if let Some(dead) = &state.dead {
            return if now.saturating_duration_since(dead.checked_at) < DEAD_RECHECK {
                Gate::Refuse(dead.error.clone())
            } else {
                Gate::Look(dead.error.clone())
            };
        }
        if state.persisting {
            return Gate::Refuse(state.store_spacing.too_early(now).unwrap_or_else(|| {
                Error::transient(TransientKind::LeaseBusy, Some(StdDuration::from_secs(1)))
            }));
        }
        if let Some(e) = state.store_spacing.too_early(now) {
            return Gate::Refuse(e);
        }
        if let Some(e) = state.backoff.too_early(now) {
            let looked_recently = state
                .last_look
                .is_some_and(|at| now.saturating_duration_since(at) < LOOK_INTERVAL);
            return if reason == Reason::AccessToken && !looked_recently {
                Gate::Look(e)
            } else {
                Gate::Refuse(e)
            };
        }
        Gate::Go
    }

    /// Stale token: start one detached refresh unless one runs or attempts are spaced.
    fn start_refresh(self: &Arc<Self>) {
        let mut slot = self.flight();
        if slot.current.is_none()
            && let Gate::Go = self.gate(Reason::AccessToken)
        {
            let _started = self.spawn_job(&mut slot, Job::Refresh(Reason::AccessToken));
        }
    }

    /// Expired or missing token: join the flight, or start one.
    async fn wait_for_token(self: &Arc<Self>) -> Outcome {
        let flight = {
            let mut slot = self.flight();
            // Re-check under the gate: a flight may have just published.
            if let Some(cached) = &*self.cache.load()
                && cached.freshness(self.clock.now()) != Freshness::Expired
            {
                return Ok(cached.token.clone());
            }
            match &slot.current {
                Some((_, running)) => running.clone(),
                None => match self.gate(Reason::AccessToken) {
                    Gate::Go => self.spawn_job(&mut slot, Job::Refresh(Reason::AccessToken)),
                    Gate::Look(fallback) => self.spawn_job(&mut slot, Job::Look { fallback }),
                    Gate::Refuse(e) => return self.or_valid_token(e),
                },
            }
        };
        flight.await.or_else(|e| self.or_valid_token(e))
    }

    /// A token that is still valid serves callers while attempts fail for a while.
    fn or_valid_token(&self, e: Error) -> Outcome {
        if e.needs_reauthorization() {
            return Err(e);
        }
        match &*self.cache.load() {
            Some(cached) if cached.freshness(self.clock.now()) != Freshness::Expired => {
                Ok(cached.token.clone())
            }
            _ => Err(e),
        }
    }

    /// Joins the flight or starts one, whatever the cache holds (background refresher,
    /// keep-alive). Respects the gate.
    pub(crate) async fn refresh_now(self: &Arc<Self>, reason: Reason) -> Outcome {
        let flight = {
            let mut slot = self.flight();
            match &slot.current {
                Some((_, running)) => running.clone(),
                None => match self.gate(reason) {
                    Gate::Go => self.spawn_job(&mut slot, Job::Refresh(reason)),
                    Gate::Look(fallback) => self.spawn_job(&mut slot, Job::Look { fallback }),
                    Gate::Refuse(e) => return Err(e),
                },
            }
        };
        flight.await
    }

    /// Spawns a flight. The caller holds the flight slot.
    fn spawn_job(self: &Arc<Self>, slot: &mut FlightSlot, job: Job) -> Flight {
        slot.serial = slot.serial.wrapping_add(1);
        let serial = slot.serial;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let inner = Arc::clone(self);
        let epoch = self.state().epoch;
        tokio::spawn(FLIGHT_EPOCH.scope(epoch, async move {
            // Clears the slot whatever happens to this task (a panic, an abort).
            let _clear = ClearFlight {
                inner: Arc::clone(&inner),
                serial,
            };
            inner.fly(job, serial, tx).await;
        }));
        let flight = async move {
            rx.await
                .unwrap_or_else(|_| Err(Error::transient(TransientKind::Interrupted, None)))
        }
        .boxed()
        .shared();
        slot.current = Some((serial, flight.clone()));
        flight
    }

    /// The flight's task: runs the job (a panic anywhere in it becomes an error), settles
    /// the state, clears the slot, answers the waiters, and then, if a rotated set is
    /// still unsaved, keeps the key locked and retries the save.
    async fn fly(
        self: &Arc<Self>,
        job: Job,
        serial: u64,
        tx: tokio::sync::oneshot::Sender<Outcome>,
    ) {
        let (outcome, held) = match AssertUnwindSafe(self.run(job)).catch_unwind().await {
            Ok(done) => done,
            Err(panic) => (Err(panicked(panic.as_ref())), None),
        };
        let outcome = self.settle(outcome);
        let persist = {
            let mut state = self.state();
            let persist = state.unsaved.is_some() && !state.persisting;
            state.persisting |= persist;
            persist
        };
        // Cleared before waiters see the outcome: a caller that finds no flight also
        // finds the published token, the backoff, or the persisting save.
        self.clear_flight(serial);
        let _ = tx.send(outcome);
        if persist {
            // Resets `persisting` however this task ends (a runtime shutting down drops it).
            let _persisting = Persisting(Arc::clone(self));
            if AssertUnwindSafe(self.persist(held))
                .catch_unwind()
                .await
                .is_err()
            {
                tracing::error!(key = %self.key, "the task saving a rotated token set panicked; the next refresh retries the save");
            }
        } else if let Some(held) = held {
            held.release().await;
        }
    }

    fn clear_flight(&self, serial: u64) {
        let mut slot = self.flight();
        if slot.current.as_ref().is_some_and(|(s, _)| *s == serial) {
            slot.current = None;
        }
    }

    /// Records a flight's outcome: counters, the last error, the spacing of the next
    /// attempt (the provider's backoff was already set where the provider failed), a dead
    /// grant. Fills in `retry_after` for waiters.
    fn settle(&self, mut outcome: Outcome) -> Outcome {
        let now = self.now();
        let mut state = self.state();
        match &mut outcome {
            Ok(_) => {
                state.store_spacing.succeeded();
            }
            Err(e) => {
                state.metrics.count_failure(e);
                state.last_error = Some(e.clone());
                if e.needs_reauthorization() {
                    let refresh_token = state
                        .last_known
                        .as_ref()
                        .and_then(|s| s.refresh_token.clone());
                    state.dead = Some(Dead {
                        error: e.clone(),
                        refresh_token,
                        checked_at: now,
                    });
                } else if crate::retry::is_store_side(e) {
                    state.metrics.store_failures += 1;
                    let wait = state.store_spacing.failed(now, e);
                    if let Error::Transient { retry_after, .. } = e {
                        *retry_after = Some(retry_after.map_or(wait, |r| r.max(wait)));
                    }
                } else if let Error::Transient { retry_after, .. } = e {
                    *retry_after = state.backoff.wait(now).or(*retry_after);
                }
            }
        }
        outcome
    }

    /// Publishes a token set's access token to the hot path.
    pub(crate) fn publish(&self, set: &TokenSet) -> Option<AccessToken> {
        if flight_is_stale(&self.state()) {
            return None;
        }
        let token = set.access_token.clone()?;
        let stale_at = set.stale_at(self.leeway);
        self.cache.store(Some(Arc::new(Cached {
            token: token.clone(),
            fresh_until: stale_at.unwrap_or(time::PrimitiveDateTime::MAX.assume_utc()),
            stale_at,
            expires_at: set.expires_at,
            keep_alive_at: keep_alive_at(set),
            refresh_expires_at: set.refresh_expires_at,
        })));
        Some(token)
    }

    /// Whether a refresh forced by a rejected token may be sent now.
    pub(crate) fn forced_refresh_allowed(&self, state: &State) -> bool {
        state.last_forced_refresh.is_none_or(|at| {
            self.now().saturating_duration_since(at) >= self.timing.forced_refresh_interval
        })
    }
}

tokio::task_local! {
    /// The grant epoch ([`State::epoch`]) a flight's task started under.
    static FLIGHT_EPOCH: u64;
}

/// True inside a flight's task started before the latest revoke or import.
pub(crate) fn flight_is_stale(state: &State) -> bool {
    FLIGHT_EPOCH
        .try_with(|epoch| *epoch != state.epoch)
        .unwrap_or(false)
}

/// Counts down [`State::lease_tasks`] when a lease-returning task ends, however it ends.
pub(crate) struct LeaseTaskDone(pub(crate) Arc<Inner>);

impl Drop for LeaseTaskDone {
    fn drop(&mut self) {
        let mut state = self.0.state();
        state.lease_tasks = state.lease_tasks.saturating_sub(1);
    }
}

/// Marks the end of a persisting task, however it ends.
struct Persisting(Arc<Inner>);

impl Drop for Persisting {
    fn drop(&mut self) {
        self.0.state().persisting = false;
    }
}

/// Clears a flight's slot when its task ends, however it ends.
struct ClearFlight {
    inner: Arc<Inner>,
    serial: u64,
}

impl Drop for ClearFlight {
    fn drop(&mut self) {
        self.inner.clear_flight(self.serial);
    }
}

/// The error waiters get when the flight's task panicked. The message is not included:
/// a panic message is not ours to vouch for.
fn panicked(_payload: &(dyn std::any::Any + Send)) -> Error {
    tracing::error!("a refresh task panicked; the flight is cleared and the next call starts anew");
    Error::panicked()
}
