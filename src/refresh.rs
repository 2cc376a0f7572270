//! [`RefreshingTokenSource`]: the cache, the single flight, and the refresh protocol of
//! design.md.
//!
//! The hot path ([`TokenSource::access_token`]) is one lock-free `ArcSwap` load, one clock
//! read and one reference-count increment. Everything else happens in [`Inner::refresh`],
//! which runs in a spawned task (never in a caller's future, so a cancelled caller cannot
//! lose a rotated refresh token) and follows the protocol step by step:
//!
//! 1. take the store's lease for the key;
//! 2. reload the token set; adopt it if it is fresh (another process refreshed);
//! 3. present the refresh token read under the lease, if the lease outlasts the request;
//! 4. merge, compute absolute expiries, save with compare-and-swap, publish;
//! 5. if that save fails, publish anyway and keep retrying the save in the background;
//! 6. on `invalid_grant`, reload and adopt a rotated token before declaring
//!    re-authorization required (and mark the dead set in the store);
//! 7. on transient failures keep every token, serve stale tokens until they expire, and
//!    space attempts with jittered exponential backoff honouring `Retry-After`.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration as StdDuration;

use arc_swap::ArcSwapOption;
use async_trait::async_trait;
use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use futures_util::future::{BoxFuture, FutureExt, Shared};
use time::{Duration, OffsetDateTime};

use crate::background::Metrics;
use crate::clock::{Clock, SystemClock};
use crate::error::{Error, ReauthorizationReason, TransientKind};
use crate::http::{RefreshFailure, TokenEndpoint};
use crate::provider::{ProviderProfile, TokenResponse};
use crate::secret::{AccessToken, ClientCredentials, RefreshToken};
use crate::source::TokenSource;
use crate::store::{Lease, MemoryStore, StoreError, TokenStore, Versioned};
use crate::token::{DEFAULT_LEEWAY, Freshness, TokenSet, absolute_expiry};

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
}

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

    /// The refresh token from the one-time consent. Used only when the store holds nothing
    /// for the key; it is then saved before it is presented.
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

    /// How long a refresh may hold the store's lease. Default: the profile's request and
    /// connect timeouts plus 30 s.
    pub fn lease_ttl(mut self, ttl: StdDuration) -> Self {
        self.lease_ttl = Some(ttl);
        self
    }

    /// Builds the source. Fails on an invalid profile (such as an `http` URL to a
    /// non-loopback host).
    pub fn build(self) -> Result<RefreshingTokenSource, Error> {
        if self.key.is_empty() {
            return Err(Error::Config("the store key must not be empty".into()));
        }
        let lease_ttl = self.lease_ttl.unwrap_or(
            self.profile.request_timeout
                + self.profile.connect_timeout
                + StdDuration::from_secs(30),
        );
        let endpoint = TokenEndpoint::new(self.profile, self.credentials)?;
        Ok(RefreshingTokenSource {
            inner: Arc::new(Inner {
                endpoint,
                store: self.store.unwrap_or_else(|| Arc::new(MemoryStore::new())),
                key: self.key,
                initial_refresh_token: self.initial_refresh_token,
                leeway: self.leeway,
                clock: self.clock,
                lease_ttl,
                cache: ArcSwapOption::empty(),
                flight: Mutex::new(None),
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
        }
    }

    /// Replaces the stored grant with `refresh_token` (after a person consented again):
    /// saved under the lease, whatever the store held, and used at the next refresh.
    pub async fn import_refresh_token(
        &self,
        refresh_token: impl Into<String>,
    ) -> Result<(), Error> {
        let inner = &self.inner;
        let seed =
            TokenSet::from_refresh_token(RefreshToken::new(refresh_token), inner.clock.now());
        let lease = inner.store.lease(&inner.key, inner.lease_ttl).await?;
        let result = async {
            let version = inner.store.load(&inner.key).await?.map(|v| v.version);
            inner.store.save(&inner.key, &seed, version, &lease).await
        }
        .await;
        release(lease).await;
        result?;
        inner.cache.store(None);
        let mut state = inner.state();
        state.unsaved = None;
        state.retry = Retry::default();
        Ok(())
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
                    self.inner.start_refresh(now);
                    return Ok(cached.token.clone());
                }
                Freshness::Expired => {}
            }
        }
        self.inner.wait_for_refresh().await
    }

    /// Forgets `rejected` if it is still the current token: see [`TokenSource::invalidate`].
    pub fn invalidate(&self, rejected: &AccessToken) {
        let inner = &self.inner;
        let current = inner.cache.load_full();
        if current.as_ref().is_some_and(|c| &c.token == rejected) {
            inner.state().rejected_access = Some(rejected.clone());
            inner.cache.compare_and_swap(&current, None);
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
    fn freshness(&self, now: OffsetDateTime) -> Freshness {
        match (self.stale_at, self.expires_at) {
            (_, Some(expires_at)) if now >= expires_at => Freshness::Expired,
            (Some(stale_at), _) if now >= stale_at => Freshness::Stale,
            _ => Freshness::Fresh,
        }
    }
}

type Outcome = Result<AccessToken, Error>;

/// Why a refresh runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Reason {
    /// The access token is stale, expired, missing or rejected.
    AccessToken,
    /// The refresh token nears its own expiry: rotate it even if the access token is fresh.
    KeepAlive,
}

/// The refresh token is rotated once this share of its lifetime is left.
const KEEP_ALIVE_SHARE: i32 = 5;

/// When `set`'s refresh token should be rotated by keep-alive: when a fifth of its
/// lifetime is left.
pub(crate) fn keep_alive_at(set: &TokenSet) -> Option<OffsetDateTime> {
    let expires = set.refresh_expires_at?;
    let lifetime = (expires - set.obtained_at).max(Duration::ZERO);
    Some(expires - lifetime / KEEP_ALIVE_SHARE)
}

pub(crate) type Flight = Shared<BoxFuture<'static, Outcome>>;

pub(crate) struct Inner {
    pub(crate) endpoint: TokenEndpoint,
    pub(crate) store: Arc<dyn TokenStore>,
    pub(crate) key: String,
    initial_refresh_token: Option<RefreshToken>,
    pub(crate) leeway: Duration,
    pub(crate) clock: Arc<dyn Clock>,
    lease_ttl: StdDuration,
    /// The published access token: the hot path reads only this.
    pub(crate) cache: ArcSwapOption<Cached>,
    /// The one refresh in flight, shared by every waiter.
    flight: Mutex<Option<Flight>>,
    state: Mutex<State>,
}

#[derive(Default)]
pub(crate) struct State {
    /// What happened so far, for [`RefreshingTokenSource::status`].
    pub(crate) metrics: Metrics,
    pub(crate) last_refresh: Option<OffsetDateTime>,
    pub(crate) last_error: Option<Error>,
    /// Spacing of attempts after failures (step 7).
    retry: Retry,
    /// A token set the provider issued whose save failed (step 5): the newest refresh
    /// token exists only here until a save succeeds.
    unsaved: Option<TokenSet>,
    /// An access token the API rejected: never adopted again from the store.
    rejected_access: Option<AccessToken>,
}

#[derive(Default)]
struct Retry {
    backoff: Option<ExponentialBackoff>,
    not_before: Option<OffsetDateTime>,
    last_kind: Option<TransientKind>,
}

impl Retry {
    /// Records a failure. The next attempt waits a full-jitter step (anywhere between
    /// [`MIN_RETRY`] and the exponential cap), no later than `valid_until` (a still-valid
    /// token gets one more try before it dies), and never less than the provider's
    /// `retry_after`.
    fn failed(&mut self, now: OffsetDateTime, error: &Error, valid_until: Option<OffsetDateTime>) {
        let cap = self
            .backoff
            .get_or_insert_with(backoff)
            .next()
            .unwrap_or(MAX_RETRY);
        let mut step = MIN_RETRY + cap.saturating_sub(MIN_RETRY).mul_f64(fastrand::f64());
        if let Some(left) = valid_until
            .map(|until| until - now)
            .and_then(|left| StdDuration::try_from(left).ok())
        {
            step = step.min(left.max(MIN_RETRY));
        }
        let wait = error.retry_after().map_or(step, |r| r.max(step));
        self.not_before = Some(now + wait);
        self.last_kind = Some(match error {
            Error::Transient { kind, .. } => *kind,
            _ => TransientKind::BackingOff,
        });
    }

    /// How long until the next attempt is allowed.
    fn wait(&self, now: OffsetDateTime) -> Option<StdDuration> {
        self.not_before
            .map(|at| (at - now).try_into().unwrap_or_default())
    }

    fn succeeded(&mut self) {
        *self = Retry::default();
    }

    /// The error to answer while backing off, if an attempt now would be too early.
    fn too_early(&self, now: OffsetDateTime) -> Option<Error> {
        let wait = self.wait(now).filter(|w| !w.is_zero())?;
        Some(Error::transient(
            self.last_kind.unwrap_or(TransientKind::BackingOff),
            Some(wait),
        ))
    }
}

/// The shortest spacing of attempts: at most one request per second, whatever callers do.
const MIN_RETRY: StdDuration = StdDuration::from_secs(1);
/// The longest backoff step.
const MAX_RETRY: StdDuration = StdDuration::from_secs(600);

/// The exponential caps: 1 s doubling to 10 minutes (jitter is applied by the user).
fn backoff() -> ExponentialBackoff {
    ExponentialBuilder::default()
        .with_min_delay(MIN_RETRY)
        .with_max_delay(MAX_RETRY)
        .with_factor(2.0)
        .without_max_times()
        .build()
}

async fn release(lease: Lease) {
    if let Err(e) = lease.release().await {
        tracing::warn!(error = %e, "could not release the store lease; it will expire");
    }
}

impl Inner {
    pub(crate) fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn flight(&self) -> MutexGuard<'_, Option<Flight>> {
        self.flight.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stale token: start one detached refresh unless one runs or we are backing off.
    fn start_refresh(self: &Arc<Self>, now: OffsetDateTime) {
        let mut flight = self.flight();
        if flight.is_none() && self.state().retry.too_early(now).is_none() {
            *flight = Some(self.spawn_refresh(Reason::AccessToken));
        }
    }

    /// Expired or missing token: join the refresh in flight, or start one.
    async fn wait_for_refresh(self: &Arc<Self>) -> Outcome {
        let flight = {
            let mut flight = self.flight();
            // Re-check under the gate: a refresh may have just published.
            if let Some(cached) = &*self.cache.load()
                && cached.freshness(self.clock.now()) != Freshness::Expired
            {
                return Ok(cached.token.clone());
            }
            match &*flight {
                Some(running) => running.clone(),
                None => {
                    if let Some(e) = self.state().retry.too_early(self.clock.now()) {
                        return Err(e);
                    }
                    let running = self.spawn_refresh(Reason::AccessToken);
                    *flight = Some(running.clone());
                    running
                }
            }
        };
        match flight.await {
            // A token that is still valid serves callers while a refresh fails transiently.
            Err(e) if e.is_transient() => match &*self.cache.load() {
                Some(cached) if cached.freshness(self.clock.now()) != Freshness::Expired => {
                    Ok(cached.token.clone())
                }
                _ => Err(e),
            },
            outcome => outcome,
        }
    }

    /// Joins the refresh in flight or starts one, whatever the cache holds (background
    /// refresher, keep-alive). Respects the backoff.
    pub(crate) async fn refresh_now(self: &Arc<Self>, reason: Reason) -> Outcome {
        let flight = {
            let mut flight = self.flight();
            match &*flight {
                Some(running) => running.clone(),
                None => {
                    if let Some(e) = self.state().retry.too_early(self.clock.now()) {
                        return Err(e);
                    }
                    let running = self.spawn_refresh(reason);
                    *flight = Some(running.clone());
                    running
                }
            }
        };
        flight.await
    }

    /// Spawns the refresh task. The caller holds the flight gate.
    pub(crate) fn spawn_refresh(self: &Arc<Self>, reason: Reason) -> Flight {
        let inner = Arc::clone(self);
        let task = tokio::spawn(async move {
            let mut outcome = inner.refresh(reason).await;
            let now = inner.clock.now();
            {
                let mut state = inner.state();
                if let Err(e) = &outcome {
                    state.metrics.count_failure(e);
                    state.last_error = Some(e.clone());
                }
                match &mut outcome {
                    Ok(_) => state.retry.succeeded(),
                    Err(e) if e.needs_reauthorization() => {}
                    Err(e) => {
                        let valid_until = inner.cache.load().as_ref().and_then(|c| c.expires_at);
                        state.retry.failed(now, e, valid_until);
                        // Tell waiters when the next attempt will be allowed.
                        if let Error::Transient { retry_after, .. } = e {
                            *retry_after = state.retry.wait(now);
                        }
                    }
                }
            }
            // Cleared before waiters see the outcome: a caller that finds no flight also
            // finds the published token or the backoff.
            *inner.flight() = None;
            outcome
        });
        async move {
            task.await.unwrap_or_else(|e| {
                Err(Error::Transient {
                    kind: TransientKind::Interrupted,
                    retry_after: None,
                    source: Some(Arc::new(e)),
                })
            })
        }
        .boxed()
        .shared()
    }

    /// Publishes a token set's access token to the hot path.
    fn publish(&self, set: &TokenSet) -> Option<AccessToken> {
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

    /// The refresh protocol, steps 1 to 7.
    async fn refresh(self: &Arc<Self>, reason: Reason) -> Outcome {
        // Step 1: the lease.
        let lease = self
            .store
            .lease(&self.key, self.lease_ttl)
            .await
            .map_err(|e| match e {
                StoreError::LeaseTimeout { .. } => Error::Transient {
                    kind: TransientKind::LeaseBusy,
                    retry_after: None,
                    source: Some(Arc::new(e)),
                },
                e => Error::Storage(e),
            })?;
        let outcome = self.refresh_under_lease(&lease, reason).await;
        release(lease).await;
        outcome
    }

    async fn refresh_under_lease(self: &Arc<Self>, lease: &Lease, reason: Reason) -> Outcome {
        // Step 2: reload, and adopt what another process refreshed.
        let (mut current, mut version) = self.load_current(lease).await?;
        if let Some(token) = self.adoptable(&current, reason) {
            return Ok(token);
        }
        let mut retried_rotated = false;
        loop {
            if current.rejected_at.is_some() {
                return Err(Error::ReauthorizationRequired {
                    reason: ReauthorizationReason::PreviouslyRejected,
                    provider: None,
                });
            }
            let Some(refresh_token) = current.refresh_token.clone() else {
                return Err(Error::ReauthorizationRequired {
                    reason: ReauthorizationReason::NoRefreshToken,
                    provider: None,
                });
            };

            // Step 3: present the refresh token read under the lease, if the lease
            // outlasts the request.
            let timeout = self.endpoint.profile().request_timeout;
            if lease.remaining().is_some_and(|left| left < timeout) {
                return Err(Error::transient(TransientKind::LeaseBusy, None));
            }
            let sent_at = self.clock.now();
            tracing::debug!(key = %self.key, provider = %self.endpoint.profile().name, "refreshing");
            match self.endpoint.refresh(&refresh_token, sent_at).await {
                // Steps 4 and 5.
                Ok(response) => {
                    let next = merge(self.endpoint.profile(), &current, response, sent_at);
                    {
                        let mut state = self.state();
                        state.metrics.refreshes += 1;
                        state.last_refresh = Some(sent_at);
                    }
                    return Ok(self.save_and_publish(next, version, lease).await);
                }
                // Step 6.
                Err(RefreshFailure::InvalidGrant(provider)) => {
                    let reloaded = self.store.load(&self.key).await?;
                    if let Some(stored) = reloaded {
                        let rotated = stored.value.refresh_token.is_some()
                            && stored.value.refresh_token.as_ref() != Some(&refresh_token);
                        if rotated {
                            tracing::info!(key = %self.key, "refresh token was rotated by another writer; adopting it");
                            self.state().metrics.rotations_adopted += 1;
                            if let Some(token) = self.adoptable(&stored.value, reason) {
                                return Ok(token);
                            }
                            if !retried_rotated {
                                retried_rotated = true;
                                current = stored.value;
                                version = Some(stored.version);
                                continue;
                            }
                        }
                    }
                    tracing::error!(key = %self.key, "the provider rejected the refresh token: re-authorization required");
                    let mut dead = current;
                    dead.rejected_at = Some(self.clock.now());
                    if let Err(e) = self.store.save(&self.key, &dead, version, lease).await {
                        tracing::warn!(error = %e, "could not mark the rejected token set in the store");
                    }
                    return Err(Error::ReauthorizationRequired {
                        reason: ReauthorizationReason::RefreshTokenRejected,
                        provider,
                    });
                }
                // Step 7: nothing is discarded; the caller decides from the error.
                Err(RefreshFailure::Other(e)) => {
                    tracing::warn!(key = %self.key, error = %e, "refresh failed; tokens kept");
                    return Err(e);
                }
            }
        }
    }

    /// What the store holds now (saving first any set whose earlier save failed), or the
    /// initial refresh token, saved before it is presented.
    async fn load_current(&self, lease: &Lease) -> Result<(TokenSet, Option<u64>), Error> {
        let stored = self.store.load(&self.key).await?;
        let unsaved = self.state().unsaved.clone();
        if let Some(unsaved) = unsaved {
            let version = self
                .persist(&unsaved, stored.as_ref().map(|v| v.version), lease)
                .await?;
            return Ok((unsaved, Some(version)));
        }
        match stored {
            Some(Versioned { value, version }) => Ok((value, Some(version))),
            None => match &self.initial_refresh_token {
                Some(initial) => {
                    let seed = TokenSet::from_refresh_token(initial.clone(), self.clock.now());
                    let version = self.store.save(&self.key, &seed, None, lease).await?;
                    tracing::info!(key = %self.key, "imported the initial refresh token into the store");
                    Ok((seed, Some(version)))
                }
                None => Err(Error::ReauthorizationRequired {
                    reason: ReauthorizationReason::NoRefreshToken,
                    provider: None,
                }),
            },
        }
    }

    /// Adopts `set` if its access token is fresh and not one the API rejected.
    fn adoptable(&self, set: &TokenSet, reason: Reason) -> Option<AccessToken> {
        let token = set.access_token.as_ref()?;
        let now = self.clock.now();
        let keep_alive_due = keep_alive_at(set).is_some_and(|at| now >= at);
        if set.freshness(now, self.leeway) != Freshness::Fresh
            || (reason == Reason::KeepAlive && keep_alive_due)
            || self.state().rejected_access.as_ref() == Some(token)
        {
            return None;
        }
        self.state().metrics.adoptions += 1;
        self.publish(set)
    }

    /// Steps 4 and 5: save with compare-and-swap, publish; on a failed save publish anyway
    /// and keep retrying the save in the background.
    async fn save_and_publish(
        self: &Arc<Self>,
        next: TokenSet,
        version: Option<u64>,
        lease: &Lease,
    ) -> AccessToken {
        match self.store.save(&self.key, &next, version, lease).await {
            Ok(_) => {}
            Err(e) => {
                tracing::error!(key = %self.key, error = %e, "the refreshed token set could not be saved; keeping it in memory and retrying");
                let mut state = self.state();
                state.unsaved = Some(next.clone());
                state.metrics.failed_saves += 1;
                drop(state);
                self.spawn_save_retry();
            }
        }
        self.state().rejected_access = None;
        self.publish(&next)
            .expect("a refreshed token set always has an access token")
    }

    /// Saves a set the provider issued over whatever the store holds now: it holds the
    /// newest refresh token there is.
    async fn persist(
        &self,
        set: &TokenSet,
        version: Option<u64>,
        lease: &Lease,
    ) -> Result<u64, Error> {
        let version = self.store.save(&self.key, set, version, lease).await?;
        let mut state = self.state();
        if state.unsaved.as_ref() == Some(set) {
            state.unsaved = None;
        }
        tracing::info!(key = %self.key, "saved the refreshed token set that an earlier save had failed to write");
        Ok(version)
    }

    fn spawn_save_retry(self: &Arc<Self>) {
        let inner = Arc::clone(self);
        tokio::spawn(async move {
            let mut delays = backoff();
            loop {
                // The new refresh token exists only in memory: retry at least every minute.
                let delay = delays.next().unwrap_or(MAX_RETRY);
                tokio::time::sleep(delay.min(StdDuration::from_secs(60))).await;
                let Some(unsaved) = inner.state().unsaved.clone() else {
                    return;
                };
                let attempt = async {
                    let lease = inner.store.lease(&inner.key, inner.lease_ttl).await?;
                    let result = async {
                        let version = inner.store.load(&inner.key).await?.map(|v| v.version);
                        inner.persist(&unsaved, version, &lease).await
                    }
                    .await;
                    release(lease).await;
                    result
                };
                match attempt.await {
                    Ok(_) => return,
                    Err(e) => {
                        tracing::error!(key = %inner.key, error = %e, "saving the refreshed token set failed again")
                    }
                }
            }
        });
    }
}

/// Step 4's merge: the response over the current set. The old refresh token is kept only
/// when the response carries none; expiries become absolute instants.
fn merge(
    profile: &ProviderProfile,
    current: &TokenSet,
    response: TokenResponse,
    sent_at: OffsetDateTime,
) -> TokenSet {
    let default_lifetime = profile
        .default_access_token_lifetime
        .and_then(|d| Duration::try_from(d).ok());
    let expires_at = absolute_expiry(response.expiry, sent_at, default_lifetime);
    let rotated = response.refresh_token.is_some();
    let refresh_expires_at = match response.refresh_expires_in.filter(|s| *s > 0) {
        Some(seconds) => Some(sent_at + Duration::seconds(seconds)),
        None if rotated => profile
            .refresh_token_lifetime
            .and_then(|d| Duration::try_from(d).ok())
            .map(|l| sent_at + l),
        None => current.refresh_expires_at,
    };
    let mut next = TokenSet::new(response.access_token, sent_at);
    next.refresh_token = response
        .refresh_token
        .or_else(|| current.refresh_token.clone());
    next.token_type = response.token_type;
    next.expires_at = expires_at;
    next.refresh_expires_at = refresh_expires_at;
    next.scopes = response.scopes.unwrap_or_else(|| current.scopes.clone());
    next.extra = response.extra;
    next
}
