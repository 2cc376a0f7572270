//! [`RefreshingTokenSource`]: one grant, driven by the [grant engine](crate::engine), and
//! its builder.
//!
//! The hot path ([`RefreshingTokenSource::access_token`]) is one lock-free `ArcSwap` load,
//! one monotonic clock read and one reference-count increment; everything else runs in
//! the engine's flight.

use std::fmt;
use std::sync::Arc;
use std::time::Duration as StdDuration;

use async_trait::async_trait;
use time::Duration;

use crate::clock::{Clock, SystemClock};
use crate::engine::{Engine, EngineConfig, Following, Reason, Timing};
use crate::error::Error;
use crate::http::TokenEndpoint;
use crate::provider::ProviderProfile;
use crate::secret::{AccessToken, ClientCredentials, RefreshToken};
use crate::source::TokenSource;
use crate::status::Status;
use crate::store::{MemoryStore, RefuseSealed, TokenStore};
use crate::token::{DEFAULT_LEEWAY, Freshness, TokenSet};

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
    pub(crate) inner: Arc<Engine>,
}

impl fmt::Debug for RefreshingTokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RefreshingTokenSource")
            .field("provider", &self.inner.config.endpoint.profile().name)
            .field("key", &self.inner.key)
            .field("store", &self.inner.config.store)
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
    timing: TimingOptions,
    http_client: Option<reqwest::Client>,
}

/// The longest lease ttl accepted.
const MAX_LEASE_TTL: StdDuration = StdDuration::from_secs(24 * 3600);
/// The default bound on one store call.
pub(crate) const DEFAULT_STORE_TIMEOUT: StdDuration = StdDuration::from_secs(10);
/// The default wait before taking over a rotation another holder left in flight.
pub(crate) const DEFAULT_TAKEOVER_AFTER: StdDuration = StdDuration::from_secs(300);
/// The default shortest spacing of refreshes forced by [`TokenSource::invalidate`].
pub(crate) const DEFAULT_FORCED_REFRESH_INTERVAL: StdDuration = StdDuration::from_secs(30);
/// The shortest `exhausted_after` accepted.
const MIN_EXHAUSTED_AFTER: StdDuration = StdDuration::from_secs(60);
/// The default time of continuous provider failures after which a grant is exhausted.
pub(crate) const DEFAULT_EXHAUSTED_AFTER: StdDuration = StdDuration::from_secs(24 * 3600);

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
        self.timing.lease_ttl = Some(ttl);
        self
    }

    /// How long one store call may take before it counts as failed (with an unknown
    /// outcome, like a cut connection). A lease wait may take up to the lease ttl on top.
    /// Default 10 s.
    pub fn store_timeout(mut self, timeout: StdDuration) -> Self {
        self.timing.store_timeout = timeout;
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
        self.timing.takeover_after = wait;
        self
    }

    /// The shortest spacing of refreshes forced by [`TokenSource::invalidate`] (an API
    /// answering 401, or HighQ's 403, which also means "permission denied"). Within it, a
    /// rejected token that is still the newest in the store is served again rather than
    /// refreshed again. Default 30 s.
    pub fn forced_refresh_interval(mut self, interval: StdDuration) -> Self {
        self.timing.forced_refresh_interval = interval;
        self
    }

    /// After how long of continuous provider failures (5xx, timeouts, unreadable or
    /// rejected answers; not store failures; at least 5 of them in a row, measured on the
    /// monotonic clock) the grant counts as *exhausted*: its attempts are then an hour
    /// apart instead of a minute, an [`EventKind::Exhausted`](crate::EventKind::Exhausted)
    /// is sent, and [`Status::health`] says so. Once its refresh token's own lifetime has
    /// passed as well (by `exhausted_after` again: a margin for an estimated lifetime),
    /// its next failure answers [`ReauthorizationReason::RefreshTokenExpired`](crate::ReauthorizationReason::RefreshTokenExpired),
    /// and nothing more is sent until a new grant is stored. Any success ends it. At
    /// least a minute; default a day.
    pub fn exhausted_after(mut self, after: StdDuration) -> Self {
        self.timing.exhausted_after = after;
        self
    }

    /// The HTTP client token requests are sent with (a proxy, extra root certificates,
    /// a user agent, connection limits), shared with whatever else uses it. Default: the
    /// process's shared client for the profile (built once for every source; it keeps no
    /// idle connection, since sources may run on different runtimes). The profile's
    /// request timeout applies to every request whatever the client's own settings, and
    /// the body is capped as ever. Build it with
    /// `redirect(reqwest::redirect::Policy::none())`: a token request is never resent to
    /// a redirect's target (its body cannot be replayed, so a `307` or `308` is not
    /// followed), but a client that follows a `301`, `302` or `303` turns it into a GET,
    /// whose answer is refused as [`Error::Config`](crate::Error::Config). Its proxy
    /// settings apply even to a loopback token endpoint (the default client never
    /// proxies those). With the `ring` feature alone, reqwest has no TLS provider of its
    /// own: install one (`rustls::crypto::ring::default_provider().install_default()`)
    /// before building this client.
    pub fn http_client(mut self, client: reqwest::Client) -> Self {
        self.http_client = Some(client);
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
        let timing = self.timing.check(&self.profile)?;
        let endpoint = Arc::new(TokenEndpoint::new(
            self.profile,
            self.credentials,
            self.http_client,
        )?);
        Ok(RefreshingTokenSource {
            inner: Arc::new(Engine::new(
                Arc::new(EngineConfig {
                    endpoint,
                    store: Arc::new(RefuseSealed(store)),
                    initial_refresh_token: self.initial_refresh_token,
                    leeway: self.leeway,
                    clock: self.clock,
                    timing,
                    events: None,
                    registry: None,
                    following: Following::new(crate::follow::start),
                }),
                self.key,
            )),
        })
    }
}

/// The timeouts and intervals of a grant's engine (a source's, or each of a manager's),
/// as a builder takes them.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TimingOptions {
    pub(crate) lease_ttl: Option<StdDuration>,
    pub(crate) store_timeout: StdDuration,
    pub(crate) takeover_after: StdDuration,
    pub(crate) forced_refresh_interval: StdDuration,
    pub(crate) exhausted_after: StdDuration,
}

impl Default for TimingOptions {
    fn default() -> Self {
        Self {
            lease_ttl: None,
            store_timeout: DEFAULT_STORE_TIMEOUT,
            takeover_after: DEFAULT_TAKEOVER_AFTER,
            forced_refresh_interval: DEFAULT_FORCED_REFRESH_INTERVAL,
            exhausted_after: DEFAULT_EXHAUSTED_AFTER,
        }
    }
}

impl TimingOptions {
    /// The checked timing. The lease ttl defaults to the request's whole timeout plus
    /// 30 s.
    pub(crate) fn check(self, profile: &ProviderProfile) -> Result<Timing, Error> {
        let lease_ttl = self.lease_ttl.unwrap_or_else(|| {
            profile
                .request_timeout
                .saturating_add(profile.connect_timeout)
                .saturating_add(StdDuration::from_secs(30))
        });
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
        if self.exhausted_after < MIN_EXHAUSTED_AFTER {
            return Err(Error::Config(format!(
                "exhausted_after ({:?}) must be at least a minute: a grant is exhausted only after failing for a while",
                self.exhausted_after
            )));
        }
        let store_timeout = self.store_timeout;
        if store_timeout.is_zero() || store_timeout > MAX_LEASE_TTL {
            return Err(Error::Config(format!(
                "the store timeout ({store_timeout:?}) must be between zero and a day"
            )));
        }
        Ok(Timing {
            lease_ttl,
            store_timeout,
            takeover_after: self.takeover_after,
            forced_refresh_interval: self.forced_refresh_interval,
            exhausted_after: self.exhausted_after,
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
            timing: TimingOptions::default(),
            http_client: None,
        }
    }

    /// Replaces the stored grant with `refresh_token` (after a person consented again):
    /// saved under the lease, whatever the store held, and used at the next refresh. A
    /// rotated set this source still failed to save is superseded by it.
    pub async fn import_refresh_token(
        &self,
        refresh_token: impl Into<String>,
    ) -> Result<(), Error> {
        let seed = TokenSet::from_refresh_token(
            RefreshToken::new(refresh_token),
            self.inner.config.clock.now(),
        );
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
                .op(inner.config.store.load(&inner.key))
                .await?
                .map(|v| v.version);
            held.op(inner
                .config
                .store
                .save(&inner.key, &seed, version, held.lease()))
                .await
        }
        .await;
        if let Ok(saved) = result {
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
            state.trouble = None;
            state.dead = None;
            state.rejected_access = None;
            state.last_known = Some(seed);
            state.known_version = saved;
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
        &self.inner.config.store
    }

    /// The store key of this grant.
    pub fn key(&self) -> &str {
        &self.inner.key
    }
}

impl RefreshingTokenSource {
    /// A token valid now, refreshing first if needed: [`TokenSource::access_token`]
    /// without the trait's boxed future. Fresh tokens cost one lock-free load, one
    /// monotonic clock read and one reference-count increment; a stale token is served
    /// while one refresh runs in the background.
    pub async fn access_token(&self) -> Result<AccessToken, Error> {
        self.inner.access_token().await
    }

    /// A token that is not within the leeway of its expiry: when the cached one is stale,
    /// waits for the refresh instead of serving it (what [`access_token`](Self::access_token)
    /// does). For short-lived processes (a command, a cron job), which must not exit with
    /// a background refresh in flight: build the source with the validity needed as its
    /// [`leeway`](Builder::leeway), call this, then [`flush`](Self::flush).
    pub async fn fresh_access_token(&self) -> Result<AccessToken, Error> {
        if let Some(cached) = &*self.inner.cache.load()
            && cached.freshness(self.inner.config.clock.now()) == Freshness::Fresh
        {
            return Ok(cached.token.clone());
        }
        self.inner.refresh_now(Reason::AccessToken).await
    }

    /// Waits until this source has no refresh in flight (one that wrote its write-ahead
    /// record and is presenting the refresh token), no rotated token set left unsaved (a
    /// save that failed is retried in the background, under the lease) and no lease left
    /// to give back (a lease granted after the source had adopted another process's
    /// tokens). Call it before a short-lived process exits: a rotated set lost with the
    /// process costs the grant, and a record or a lease left behind makes the other
    /// processes wait for it (`abandoned_rotation_after`, the lease's expiry).
    pub async fn flush(&self) {
        loop {
            // The flight slot's lock is taken before the state's everywhere: not under it.
            let flying = self.inner.flying();
            let settled = {
                let state = self.inner.state();
                state.unsaved.is_none() && !state.persisting && state.lease_tasks == 0
            };
            if settled && !flying {
                return;
            }
            tokio::time::sleep(StdDuration::from_millis(20)).await;
        }
    }

    /// An access token for `scope` only, a subset of the grant's scopes (Autodesk's
    /// viewer case: a `viewables:read` token handed to a browser while the full-scope
    /// token stays with the server). Cached per scope set (a few sets per grant); when
    /// none is fresh, one refresh under the grant's lease asks for `scope`: its access
    /// token is returned, and its new refresh token is saved with the compare-and-swap
    /// beside the full-scope access token, which stays valid and cached (unless the
    /// profile says a refresh kills it). Each downscoped refresh rotates the refresh
    /// token once. A scope outside the grant is the provider's `invalid_scope`
    /// ([`Error::RequestRejected`]); a profile whose refresh tokens narrow with the scope
    /// ([`ProviderProfile::refresh_token_narrows_with_scope`]) is refused with
    /// [`Error::Config`].
    pub async fn access_token_for(&self, scope: &[&str]) -> Result<AccessToken, Error> {
        self.inner.access_token_for(scope).await
    }

    /// Forgets `rejected` if it is still the current token: see [`TokenSource::invalidate`].
    /// The next call reloads the store first (another replica may have refreshed), and
    /// refreshes only if the store holds nothing newer and no forced refresh ran within
    /// [`Builder::forced_refresh_interval`].
    pub fn invalidate(&self, rejected: &AccessToken) {
        let inner = &self.inner;
        loop {
            let current = inner.cache.load_full();
            if !current.as_ref().is_some_and(|c| &c.token == rejected) {
                return;
            }
            inner.state().rejected_access = Some(rejected.clone());
            let swapped = inner.cache.compare_and_swap(&current, None);
            // Published again meanwhile (re-armed, or followed): as long as it is still
            // the rejected token, try again.
            if swapped
                .as_ref()
                .zip(current.as_ref())
                .is_none_or(|(seen, expected)| Arc::ptr_eq(seen, expected))
            {
                return;
            }
        }
    }
}

impl RefreshingTokenSource {
    /// The provider profile this source was built with.
    pub fn profile(&self) -> &crate::ProviderProfile {
        self.inner.config.endpoint.profile()
    }

    /// A health snapshot: expiries, time left before re-authorization, last refresh,
    /// last error, counters.
    pub fn status(&self) -> Status {
        let inner = &self.inner;
        let cached = inner.cache.load_full();
        let state = inner.state();
        let refresh_token_expires_at = cached.as_ref().and_then(|c| c.refresh_expires_at);
        let reauthorization_in = if state.dead.is_some() {
            Some(StdDuration::ZERO)
        } else {
            // A past expiry is zero left.
            refresh_token_expires_at.map(|at| {
                StdDuration::try_from(at - inner.config.clock.now()).unwrap_or(StdDuration::ZERO)
            })
        };
        Status {
            access_token_expires_at: cached.as_ref().and_then(|c| c.expires_at),
            refresh_token_expires_at,
            reauthorization_in,
            last_refresh: state.last_refresh,
            last_error: state.last_error.as_deref().cloned(),
            rotation_unsaved: state.unsaved.is_some(),
            store_version_heard: state.heard,
            store_version_served: cached
                .as_ref()
                .zip(state.last_known.as_ref())
                .filter(|(cached, known)| known.access_token.as_ref() == Some(&cached.token))
                .and_then(|_| (state.known_version > 0).then_some(state.known_version)),
            health: inner.health(&state),
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

    fn expired_token_statuses(&self) -> &[u16] {
        &self.profile().expired_token_statuses
    }
}
