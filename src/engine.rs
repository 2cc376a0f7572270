//! The grant engine: one grant's state, its published token, and the single flight that
//! drives the refresh protocol of [`crate::protocol`]. [`crate::RefreshingTokenSource`]
//! (one grant) and [`crate::TokenManager`] (many) are two ways of driving it.
//!
//! Everything but the hot path runs in one spawned task per grant at a time (the
//! *flight*), never in a caller's future, so that a cancelled caller cannot lose a
//! rotated refresh token; every waiter shares its outcome. Before a flight starts,
//! [`Engine::gate`] decides what it may do: refresh, only look at the store (during a
//! provider backoff, or for a grant known to be dead), or nothing (answer the backoff or
//! the dead grant's error at once).

use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration as StdDuration;

use arc_swap::ArcSwapOption;
use futures_util::future::{BoxFuture, FutureExt, Shared};
use time::{Duration, OffsetDateTime};
use tokio::time::Instant;

use crate::clock::Clock;
use crate::error::{Error, TransientKind};
use crate::events::{EventKind, EventSink};
use crate::http::TokenEndpoint;
use crate::lease::{HeldLease, bounded};
use crate::retry::{Backoff, StoreSpacing};
use crate::secret::{AccessToken, RefreshToken};
use crate::status::{Health, Metrics};
use crate::store::TokenStore;
use crate::token::{Freshness, RotationInFlight, TokenSet};

/// The published access token, with its expiry precomputed for the hot path.
pub(crate) struct Cached {
    pub(crate) token: AccessToken,
    /// Until when the token is fresh, on the clock's monotonic reading (its stale point,
    /// counted from publication, but at most [`MONOTONIC_WINDOW`] ahead): the hot path's
    /// one comparison, without a wall-clock read.
    fresh_until: Instant,
    pub(crate) stale_at: Option<OffsetDateTime>,
    pub(crate) expires_at: Option<OffsetDateTime>,
    /// When the refresh token should be rotated even if nobody asks for a token.
    pub(crate) keep_alive_at: Option<OffsetDateTime>,
    pub(crate) refresh_expires_at: Option<OffsetDateTime>,
    /// A refresh that kills this token at the provider is in flight (this source's, or
    /// another holder's whose write-ahead record it read), and the profile says a refresh
    /// kills the previous access token
    /// ([`refresh_invalidates_access_token`](crate::ProviderProfile::refresh_invalidates_access_token)):
    /// callers wait for the flight that follows it instead of taking a token about to
    /// be rejected (see [`Engine::doom`]).
    pub(crate) doomed: bool,
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
    /// Refresh under the lease asking for these scopes (a downscoped token), keeping the
    /// full-scope token stored.
    Scoped(Vec<String>),
    /// The store's watch reported a save: read the store (no lease) and publish the set
    /// if it is fresh and holds another token; nothing else (never a refresh). Callers
    /// wait for it to end and then look again, never taking its outcome as theirs.
    Follow {
        /// How many follows of this save failed before this one (see
        /// [`Engine::follow_again_later`]).
        failed: u8,
    },
    /// Only read the store (no lease, no request): adopt a fresh set another process
    /// saved, or pick up a re-imported grant; otherwise answer `fallback`.
    Look {
        /// The backoff's or the dead grant's error.
        fallback: Error,
    },
}

type Flight = Shared<BoxFuture<'static, Outcome>>;

/// The longest the hot path trusts the monotonic clock without a wall-clock reading.
const MONOTONIC_WINDOW: StdDuration = StdDuration::from_secs(10);

/// The pauses before following a save again after a follow's read failed (see
/// [`Engine::follow_again_later`]).
const FOLLOW_RETRIES: [StdDuration; 3] = [
    StdDuration::from_millis(250),
    StdDuration::from_millis(500),
    StdDuration::from_secs(1),
];

/// How many scope sets keep a downscoped token per grant.
pub(crate) const SCOPED_KEPT: usize = 8;

/// A downscoped token and its flight, for one scope set.
struct ScopedEntry {
    /// Sorted, without duplicates.
    scope: Vec<String>,
    cached: Option<Arc<Cached>>,
    flight: Option<(u32, Flight)>,
}

/// The one flight in progress, numbered so that only its own task clears it.
#[derive(Default)]
struct FlightSlot {
    /// The flight's number (wrapping: no flight outlives four billion others), the
    /// flight, and whether it only follows a save (see
    /// [`Job::Follow`]): callers wait for such a flight to end, but never take its
    /// outcome as theirs.
    current: Option<(u32, Flight, bool)>,
    serial: u32,
    /// What only some flights need (boxed: most never do): see [`FlightExtra`].
    extra: Option<Box<FlightExtra>>,
}

/// What a flight that waits on the store, or dooms the published token, keeps in its
/// slot; dropped with the flight.
#[derive(Default)]
struct FlightExtra {
    /// Wakes the flight while it waits on the store (for the lease, or for another
    /// holder's rotation) when the watch reports a save (see
    /// [`Engine::store_changed_or`]).
    wake: Arc<tokio::sync::Notify>,
    /// Until when callers wait for the flight rather than take the doomed token (see
    /// [`Engine::doom`]), on the clock's monotonic reading.
    doomed_until: Option<Instant>,
}

/// The longest callers wait for a flight instead of taking the token it doomed: a
/// refresh takes well under a second, and a provider that hangs must not stall callers
/// for its whole request timeout (the token may well still be alive then).
pub(crate) const DOOM_AT_MOST: StdDuration = StdDuration::from_secs(3);

/// Timeouts and intervals, fixed at build.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Timing {
    pub(crate) lease_ttl: StdDuration,
    pub(crate) store_timeout: StdDuration,
    pub(crate) takeover_after: StdDuration,
    pub(crate) forced_refresh_interval: StdDuration,
    /// After how long of continuous provider failures a grant is *exhausted*: its
    /// attempts are then [`EXHAUSTED_RETRY`] apart, and once its refresh token's own
    /// lifetime has passed it needs consent.
    pub(crate) exhausted_after: StdDuration,
}

/// What the engines of one source, or of one manager's grants, share: built once, so
/// that a loaded grant costs only its own state.
pub(crate) struct EngineConfig {
    /// The provider's token endpoint (one HTTP client).
    pub(crate) endpoint: Arc<TokenEndpoint>,
    pub(crate) store: Arc<dyn TokenStore>,
    /// A single source's refresh token from the consent (a manager's grants have none).
    pub(crate) initial_refresh_token: Option<RefreshToken>,
    pub(crate) leeway: Duration,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) timing: Timing,
    /// Where events go (a manager's channel), if anywhere.
    pub(crate) events: Option<Arc<EventSink>>,
    /// The manager's registry its engines are listed in, if any: each leaves it when
    /// dropped.
    pub(crate) registry: Option<Weak<Registry>>,
    /// Following the store's watch.
    pub(crate) following: Following,
}

/// How the engines of a source or a manager follow the store's watch (see
/// [`crate::follow`]).
pub(crate) struct Following {
    /// Starts the task following the watch for these engines (the builders give
    /// [`crate::follow::start`]); `None` when the store cannot watch.
    start: fn(&Arc<Engine>) -> Option<Follower>,
    /// That task, started by a flight (again, if the runtime it ran on has gone);
    /// `Some(None)` when the store cannot watch.
    task: Mutex<Option<Option<Follower>>>,
    /// Bounds the store reads of follow flights: a `Resync` (a subscription lost and
    /// restored) makes every loaded engine with a published token follow at once, and a
    /// manager's thousands of grants must not read the store all at the same moment.
    pub(crate) reads: tokio::sync::Semaphore,
}

/// How many follow flights of one source or manager read the store at once.
pub(crate) const FOLLOW_READS: usize = 16;

impl Following {
    pub(crate) fn new(start: fn(&Arc<Engine>) -> Option<Follower>) -> Self {
        Self {
            start,
            task: Mutex::new(None),
            reads: tokio::sync::Semaphore::new(FOLLOW_READS),
        }
    }

    /// Whether a task follows the store's watch now (and so, presumably, do the other
    /// replicas' sources).
    pub(crate) fn watching(&self) -> bool {
        lock(&self.task)
            .as_ref()
            .is_some_and(|task| task.as_ref().is_some_and(|t| !t.0.is_finished()))
    }
}

/// The task following the store (see [`crate::follow`]); stopped when dropped, with the
/// engines of its source or manager.
#[derive(Debug)]
pub(crate) struct Follower(pub(crate) tokio::task::JoinHandle<()>);

impl Drop for Follower {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One grant: its store key, its published token, its state and its flight.
pub(crate) struct Engine {
    pub(crate) config: Arc<EngineConfig>,
    pub(crate) key: String,
    /// Marks this source's write-ahead records in the store (see [`Engine::holder`]).
    id: u128,
    /// The published access token: the hot path reads only this.
    pub(crate) cache: ArcSwapOption<Cached>,
    flight: Mutex<FlightSlot>,
    /// Downscoped tokens by scope set, each with its own flight (see
    /// [`Engine::access_token_for`]); at most [`SCOPED_KEPT`].
    scoped: Mutex<Vec<ScopedEntry>>,
    state: Mutex<State>,
}

/// A manager's live engines by key: the one place engines are found or created, so that
/// a process has one engine per key while anything holds it.
pub(crate) type Registry = Mutex<std::collections::HashMap<String, Weak<Engine>>>;

impl Drop for Engine {
    fn drop(&mut self) {
        if let Some(registry) = self.config.registry.as_ref().and_then(Weak::upgrade) {
            let mut engines = lock(&registry);
            // Only this engine's own entry (a successor may already be listed).
            if engines
                .get(&self.key)
                .is_some_and(|listed| listed.strong_count() == 0)
            {
                engines.remove(&self.key);
            }
        }
    }
}

impl Engine {
    pub(crate) fn new(config: Arc<EngineConfig>, key: String) -> Self {
        Self {
            config,
            key,
            id: fastrand::u128(..),
            cache: ArcSwapOption::empty(),
            flight: Mutex::new(FlightSlot::default()),
            scoped: Mutex::new(Vec::new()),
            state: Mutex::new(State::default()),
        }
    }

    /// This engine's name in its write-ahead records.
    pub(crate) fn holder(&self) -> String {
        format!("{:032x}", self.id)
    }
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
    pub(crate) last_error: Option<Box<Error>>,
    /// Spacing and duration of failures (boxed: most grants never fail).
    pub(crate) trouble: Option<Box<Trouble>>,
    /// A rotated set not yet saved.
    pub(crate) unsaved: Option<Box<Unsaved>>,
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
    pub(crate) dead: Option<Box<Dead>>,
    /// The newest set this source has seen stored or saved: evidence that the key existed,
    /// and what to restore if the store loses it.
    pub(crate) last_known: Option<TokenSet>,
    /// The store version `last_known` was read or saved at (0: unknown; versions start
    /// at 1).
    pub(crate) known_version: u64,
    /// When the store was last read without the lease.
    pub(crate) last_look: Option<Instant>,
    /// Another holder's write-ahead record (the whole record: each presentation writes a
    /// new one), and when this source first saw it.
    pub(crate) foreign_rotation: Option<Box<(RotationInFlight, Instant)>>,
    /// The refresh tokens this source presented and saw rotated (the newest few): a store
    /// that hands one back has lost acknowledged writes, and it is never presented again.
    pub(crate) consumed: std::collections::VecDeque<RefreshToken>,
    /// The newest save the store's watch reported, and when.
    pub(crate) heard: Option<(u64, OffsetDateTime)>,
    /// A save was reported while a flight ran: follow it once that flight ends (the
    /// flight may have read the store before it).
    pub(crate) follow_pending: bool,
}

/// What only a grant in trouble needs: the spacing of its next attempt, and how long it
/// has failed.
#[derive(Debug, Default)]
pub(crate) struct Trouble {
    /// Spacing of attempts after provider failures.
    pub(crate) backoff: Backoff,
    /// Spacing of attempts after store failures.
    pub(crate) store_spacing: StoreSpacing,
    /// True after a failure other than a dead grant, until the next success (which is
    /// then a [`EventKind::Recovered`]).
    pub(crate) failing: bool,
    /// The provider's failures for this grant since its last success.
    pub(crate) streak: Option<Streak>,
    /// The provider has failed for longer than [`Timing::exhausted_after`]: attempts are
    /// [`EXHAUSTED_RETRY`] apart.
    pub(crate) exhausted: bool,
}

/// Consecutive provider failures of one grant.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Streak {
    /// When the first failed (wall clock: shown in [`Health`]).
    pub(crate) since: OffsetDateTime,
    /// When the first failed, on the monotonic clock: what is measured (a suspended
    /// machine or a wall-clock step lengthens no streak).
    pub(crate) began: Instant,
    pub(crate) failures: u32,
}

impl Streak {
    /// Whether the streak makes the grant exhausted: at least
    /// [`EXHAUSTED_MIN_FAILURES`] failures over at least `after` (a grant asked for
    /// once a day is not exhausted by its second failure).
    pub(crate) fn exhausts(&self, now: Instant, after: StdDuration) -> bool {
        self.failures >= EXHAUSTED_MIN_FAILURES
            && now.saturating_duration_since(self.began) >= after
    }
}

/// The fewest consecutive failures that make a grant exhausted.
pub(crate) const EXHAUSTED_MIN_FAILURES: u32 = 5;

impl State {
    /// The grant's trouble record, created on its first failure.
    pub(crate) fn trouble(&mut self) -> &mut Trouble {
        self.trouble.get_or_insert_with(Box::default)
    }

    /// The provider answered a refresh: its backoff and failure time start over.
    pub(crate) fn provider_succeeded(&mut self) {
        if let Some(trouble) = &mut self.trouble {
            trouble.backoff.succeeded();
            trouble.streak = None;
            trouble.exhausted = false;
        }
    }

    /// A flight succeeded: the store's spacing and the failure time start over. Returns
    /// whether the grant was failing (then it has recovered).
    fn succeeded(&mut self) -> bool {
        let Some(trouble) = &mut self.trouble else {
            return false;
        };
        trouble.store_spacing.succeeded();
        trouble.streak = None;
        trouble.exhausted = false;
        let recovered = std::mem::take(&mut trouble.failing);
        if trouble.backoff.is_idle() {
            self.trouble = None;
        }
        recovered
    }
}

/// How far apart attempts are for an exhausted grant (see [`Timing::exhausted_after`]).
pub(crate) const EXHAUSTED_RETRY: StdDuration = StdDuration::from_secs(3600);

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

impl Engine {
    pub(crate) fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn flight(&self) -> MutexGuard<'_, FlightSlot> {
        self.flight.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn now(&self) -> Instant {
        self.config.clock.monotonic()
    }

    /// Takes the store lease for this key, bounded by the timeouts.
    pub(crate) async fn acquire(&self) -> Result<HeldLease, Error> {
        HeldLease::acquire(
            &self.config.store,
            &self.key,
            self.config.timing.lease_ttl,
            self.config.timing.store_timeout,
        )
        .await
        .map_err(crate::lease::lease_error)
    }

    /// One store call without the lease, bounded by the store timeout.
    pub(crate) async fn unleased<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, crate::store::StoreError>>,
    ) -> Result<T, Error> {
        bounded(self.config.timing.store_timeout, call)
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
        let trouble = state.trouble.as_deref();
        let store_too_early = trouble.and_then(|t| t.store_spacing.too_early(now));
        if state.persisting {
            return Gate::Refuse(store_too_early.unwrap_or_else(|| {
                Error::transient(TransientKind::LeaseBusy, Some(StdDuration::from_secs(1)))
            }));
        }
        if let Some(e) = store_too_early {
            return Gate::Refuse(e);
        }
        if let Some((e, trouble)) = trouble.and_then(|t| Some((t.backoff.too_early(now)?, t))) {
            // An exhausted grant reads the store as seldom as a dead one.
            let look_interval = if trouble.exhausted {
                DEAD_RECHECK
            } else {
                LOOK_INTERVAL
            };
            let looked_recently = state
                .last_look
                .is_some_and(|at| now.saturating_duration_since(at) < look_interval);
            return if reason == Reason::AccessToken && !looked_recently {
                Gate::Look(e)
            } else {
                Gate::Refuse(e)
            };
        }
        Gate::Go
    }

    /// Stale token: start one detached refresh unless one runs or attempts are spaced.
    /// A token valid now, refreshing first if needed. The hot path: one lock-free load,
    /// one monotonic clock read, one comparison and one reference-count increment; a
    /// stale token is served while one detached refresh runs.
    #[inline]
    pub(crate) async fn access_token(self: &Arc<Self>) -> Outcome {
        if let Some(cached) = &*self.cache.load() {
            if self.config.clock.monotonic() < cached.fresh_until {
                return Ok(cached.token.clone());
            }
            if cached.doomed {
                return self.wait_for_token().await;
            }
            match cached.freshness(self.config.clock.now()) {
                Freshness::Fresh => {
                    self.rearm(cached);
                    return Ok(cached.token.clone());
                }
                Freshness::Stale => {
                    self.start_refresh();
                    return Ok(cached.token.clone());
                }
                Freshness::Expired => {}
            }
        }
        self.wait_for_token().await
    }

    /// The monotonic instant until which the hot path may trust the monotonic clock
    /// alone: the wall-clock instant `at` by the clock's readings now (now for an
    /// instant already past), but at most [`MONOTONIC_WINDOW`] away, so that the wall
    /// clock is read again at least that often (the monotonic clock stops while the
    /// machine sleeps, and the wall clock may be corrected forward).
    fn monotonic_deadline(&self, at: Option<OffsetDateTime>) -> Instant {
        let now = self.config.clock.monotonic();
        let left = match at {
            None => MONOTONIC_WINDOW,
            Some(at) => {
                StdDuration::try_from(at - self.config.clock.now()).unwrap_or(StdDuration::ZERO)
            }
        };
        now.checked_add(left.min(MONOTONIC_WINDOW)).unwrap_or(now)
    }

    /// The published token, still fresh by the wall clock once its monotonic window has
    /// passed: published again with a new window (unless something newer was).
    fn rearm(&self, cached: &Cached) {
        let current = self.cache.load_full();
        if current
            .as_ref()
            .is_some_and(|c| std::ptr::eq(Arc::as_ptr(c), cached))
        {
            let rearmed = Arc::new(Cached {
                token: cached.token.clone(),
                fresh_until: self.monotonic_deadline(cached.stale_at),
                stale_at: cached.stale_at,
                expires_at: cached.expires_at,
                keep_alive_at: cached.keep_alive_at,
                refresh_expires_at: cached.refresh_expires_at,
                doomed: false,
            });
            self.cache.compare_and_swap(&current, Some(rearmed));
        }
    }

    /// Marks the published token doomed when the provider kills the previous access
    /// token on refresh: a refresh of this grant is in flight (this flight's, about to
    /// present the refresh token, or another holder's, whose write-ahead record a flight
    /// read), so the token dies within a round trip. Until the main flight now running
    /// ends (publishing the successor, or lifting the doom in [`Engine::clear_flight`]),
    /// and for at most [`DOOM_AT_MOST`] (once per flight), callers wait for it instead of
    /// taking the token;
    /// the hot path's window is closed at once (`fresh_until` now). Without a main flight
    /// running, nothing would lift the doom: nothing is doomed; nor is an expired token
    /// (nobody is served it anyway). Returns whether a token was doomed.
    pub(crate) fn doom(&self) -> bool {
        if !self
            .config
            .endpoint
            .profile()
            .refresh_invalidates_access_token
            || self.valid_cached().is_none()
        {
            return false;
        }
        // Under the slot's lock, as `clear_flight` lifts it: a doom never outlives the
        // flight it waits for. Once per flight: callers that waited out a doom are not
        // made to wait again by the same flight reading the same record again.
        let mut slot = self.flight();
        if slot.current.is_none()
            || slot
                .extra
                .as_ref()
                .is_some_and(|extra| extra.doomed_until.is_some())
        {
            return false;
        }
        let doomed = self.swap_doom(true);
        if doomed {
            slot.extra.get_or_insert_with(Box::default).doomed_until =
                self.config.clock.monotonic().checked_add(DOOM_AT_MOST);
        }
        doomed
    }

    /// Lifts a doom: the flight that set it has ended, or callers waited long enough.
    fn lift_doom(&self) {
        self.swap_doom(false);
    }

    /// Publishes the published token again with `doomed` set as given, unless it already
    /// is, or nothing is published; retried while something else republishes the same
    /// token meanwhile (a re-arm), never over another token. Returns whether it swapped.
    fn swap_doom(&self, doomed: bool) -> bool {
        loop {
            let current = self.cache.load_full();
            let Some(cached) = current.as_ref().filter(|c| c.doomed != doomed) else {
                return false;
            };
            let fresh_until = if doomed {
                self.config.clock.monotonic()
            } else {
                self.monotonic_deadline(cached.stale_at)
            };
            let swapped = Arc::new(Cached {
                token: cached.token.clone(),
                fresh_until,
                stale_at: cached.stale_at,
                expires_at: cached.expires_at,
                keep_alive_at: cached.keep_alive_at,
                refresh_expires_at: cached.refresh_expires_at,
                doomed,
            });
            let seen = self.cache.compare_and_swap(&current, Some(swapped));
            let same_pointer = seen
                .as_ref()
                .zip(current.as_ref())
                .is_some_and(|(seen, expected)| Arc::ptr_eq(seen, expected));
            if same_pointer {
                return true;
            }
            // Published again meanwhile: only the same token, in the other state, is
            // worth another try.
            if !seen.as_ref().is_some_and(|seen| seen.token == cached.token) {
                return false;
            }
        }
    }

    /// Waits until the store's watch reports a save of this key or `timeout` passes,
    /// whichever comes first: a flight waiting on the store (for the lease, for another
    /// holder's rotation) reads it again at once when told, and otherwise polls.
    pub(crate) async fn store_changed_or(&self, timeout: StdDuration) {
        let wake = Arc::clone(&self.flight().extra.get_or_insert_with(Box::default).wake);
        let _ = tokio::time::timeout(timeout, wake.notified()).await;
    }

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
        loop {
            // How long a caller waits for a flight that doomed the published token.
            let mut bound = None;
            let flight = {
                let mut slot = self.flight();
                // Re-check under the gate: a flight may have just published. A doomed
                // token waits for the flight that doomed it (which ends by publishing
                // its successor, or by lifting the doom), for at most `DOOM_AT_MOST`.
                if let Some(cached) = &*self.cache.load()
                    && cached.freshness(self.config.clock.now()) != Freshness::Expired
                {
                    if !cached.doomed {
                        return Ok(cached.token.clone());
                    }
                    let left = slot
                        .extra
                        .as_ref()
                        .and_then(|extra| extra.doomed_until)
                        .map(|until| until.saturating_duration_since(self.now()))
                        .filter(|left| !left.is_zero() && slot.current.is_some());
                    match left {
                        Some(left) => bound = Some(left),
                        None => {
                            // Waited long enough: serve it, and let the hot path do so.
                            self.lift_doom();
                            return Ok(cached.token.clone());
                        }
                    }
                }
                match &slot.current {
                    Some((_, following, true)) => Err(following.clone()),
                    Some((_, running, false)) => Ok(running.clone()),
                    None => match self.gate(Reason::AccessToken) {
                        Gate::Go => {
                            Ok(self.spawn_job(&mut slot, Job::Refresh(Reason::AccessToken)))
                        }
                        Gate::Look(fallback) => {
                            Ok(self.spawn_job(&mut slot, Job::Look { fallback }))
                        }
                        Gate::Refuse(e) => return self.or_valid_token(e),
                    },
                }
            };
            match (flight, bound) {
                (Ok(flight), None) => return flight.await.or_else(|e| self.or_valid_token(e)),
                (Ok(flight), Some(bound)) => {
                    if let Ok(outcome) = tokio::time::timeout(bound, flight).await {
                        return outcome.or_else(|e| self.or_valid_token(e));
                    }
                }
                // A follow flight: wait for it (it may publish what is needed), then look
                // again.
                (Err(following), None) => drop(following.await),
                (Err(following), Some(bound)) => {
                    drop(tokio::time::timeout(bound, following).await);
                }
            }
        }
    }

    /// A token that is still valid serves callers while attempts fail for a while.
    fn or_valid_token(&self, e: Error) -> Outcome {
        if e.needs_reauthorization() {
            return Err(e);
        }
        match &*self.cache.load() {
            Some(cached) if cached.freshness(self.config.clock.now()) != Freshness::Expired => {
                Ok(cached.token.clone())
            }
            _ => Err(e),
        }
    }

    /// Joins the flight or starts one, whatever the cache holds (background refresher,
    /// keep-alive). Respects the gate.
    pub(crate) async fn refresh_now(self: &Arc<Self>, reason: Reason) -> Outcome {
        loop {
            let flight = {
                let mut slot = self.flight();
                match &slot.current {
                    Some((_, following, true)) => Err(following.clone()),
                    Some((_, running, false)) => Ok(running.clone()),
                    None => match self.gate(reason) {
                        Gate::Go => Ok(self.spawn_job(&mut slot, Job::Refresh(reason))),
                        Gate::Look(fallback) => {
                            Ok(self.spawn_job(&mut slot, Job::Look { fallback }))
                        }
                        Gate::Refuse(e) => return Err(e),
                    },
                }
            };
            match flight {
                Ok(flight) => return flight.await,
                Err(following) => drop(following.await),
            }
        }
    }

    /// Spawns a flight. The caller holds the flight slot.
    fn spawn_job(self: &Arc<Self>, slot: &mut FlightSlot, job: Job) -> Flight {
        slot.serial = slot.serial.wrapping_add(1);
        let serial = slot.serial;
        let follow = matches!(job, Job::Follow { .. });
        let flight = self.spawn_flight(serial, job);
        slot.current = Some((serial, flight.clone(), follow));
        flight
    }

    /// Spawns the task of flight number `serial` (unique per engine); its slot is the
    /// caller's to keep.
    fn spawn_flight(self: &Arc<Self>, serial: u32, job: Job) -> Flight {
        // A flight (inside a runtime) starts following the store, or starts it again if
        // the runtime the follower ran on has shut down.
        {
            let following = &self.config.following;
            let mut follower = lock(&following.task);
            if follower
                .as_ref()
                .is_none_or(|f| f.as_ref().is_some_and(|f| f.0.is_finished()))
            {
                *follower = Some((following.start)(self));
            }
        }
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
        async move {
            rx.await
                .unwrap_or_else(|_| Err(Error::transient(TransientKind::Interrupted, None)))
        }
        .boxed()
        .shared()
    }

    /// The flight's task: runs the job (a panic anywhere in it becomes an error), settles
    /// the state, clears the slot, answers the waiters, and then, if a rotated set is
    /// still unsaved, keeps the key locked and retries the save.
    async fn fly(
        self: &Arc<Self>,
        job: Job,
        serial: u32,
        tx: tokio::sync::oneshot::Sender<Outcome>,
    ) {
        let (outcome, held) = if let Job::Follow { failed } = job {
            // Nobody takes a follow flight's outcome as theirs (callers wait for it to
            // end, then look again): it never refreshes, and when it adopts nothing (or
            // its read fails) no attempt was made, so the failure state stays as it is.
            match AssertUnwindSafe(self.follow()).catch_unwind().await {
                Ok(Ok(Some(token))) => (self.settle(Ok(token)), None),
                Ok(Ok(None)) => (
                    Err(Error::transient(TransientKind::Interrupted, None)),
                    None,
                ),
                Ok(Err(e)) => {
                    tracing::debug!(key = %self.key, error = %e, "following a save failed; serving what is published");
                    self.follow_again_later(serial, failed);
                    (Err(e), None)
                }
                Err(panic) => (Err(panicked(panic.as_ref())), None),
            }
        } else {
            self.run_settled(job).await
        };
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
        if std::mem::take(&mut self.state().follow_pending) {
            self.heard(None);
        }
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

    /// Runs `job` (a panic becomes an error) and settles its outcome.
    async fn run_settled(self: &Arc<Self>, job: Job) -> (Outcome, Option<HeldLease>) {
        let (outcome, held) = match AssertUnwindSafe(self.run(job)).catch_unwind().await {
            Ok(done) => done,
            Err(panic) => (Err(panicked(panic.as_ref())), None),
        };
        (self.settle(outcome), held)
    }

    /// The published token, if it has not expired.
    fn valid_cached(&self) -> Option<AccessToken> {
        let cached = self.cache.load();
        cached
            .as_ref()
            .filter(|c| c.freshness(self.config.clock.now()) != Freshness::Expired)
            .map(|c| c.token.clone())
    }

    /// The store's watch reported a save of this key at `version` (`None`: saves may
    /// have been missed): follows it with a follow flight, or after the running flight,
    /// when a valid token is published (otherwise the next caller reads the store
    /// anyway). A version already heard of is not followed twice.
    pub(crate) fn heard(self: &Arc<Self>, version: Option<u64>) {
        let now = self.config.clock.now();
        if self.valid_cached().is_none() {
            // Nothing published to keep up to date: the next caller reads the store
            // anyway (an import or a revoke of this very source lands here too).
            if let Some(version) = version {
                self.state().heard = Some((version, now));
            }
            return;
        }
        let mut slot = self.flight();
        {
            let mut state = self.state();
            if let Some(version) = version {
                if state.heard.is_some_and(|(heard, _)| heard == version) {
                    return;
                }
                state.heard = Some((version, now));
            }
            // After any running flight, downscoped ones included: it may have read the
            // store before that save, or may clear what a follow would publish.
            let scoped_running = lock(&self.scoped).iter().any(|e| e.flight.is_some());
            if slot.current.is_some() || scoped_running {
                state.follow_pending = true;
                // A flight waiting on the store reads it again now.
                if let Some(extra) = &slot.extra {
                    extra.wake.notify_one();
                }
                return;
            }
        }
        let _following = self.spawn_job(&mut slot, Job::Follow { failed: 0 });
    }

    /// Follow flight number `serial` could not read the store (`failed` follows of this
    /// save failed before it): a store connection cut along with the watch's typically
    /// fails the read that the resubscription's resync makes, and no other save may come
    /// to be heard of. Follows again about 250 ms later, then 500 ms and 1 s after further
    /// failures (each spread by half either way), unless another flight has started
    /// meanwhile (it read the store, or failed to as this one did); then gives up (the
    /// token is read again when it turns stale, or when the API rejects it).
    fn follow_again_later(self: &Arc<Self>, serial: u32, failed: u8) {
        let Some(pause) = FOLLOW_RETRIES.get(usize::from(failed)).copied() else {
            return;
        };
        // Spread: after a resync, every loaded grant of a manager may have failed at once.
        let pause = pause.mul_f64(0.5 + fastrand::f64());
        let engine = Arc::downgrade(self);
        tokio::spawn(async move {
            tokio::time::sleep(pause).await;
            let Some(engine) = engine.upgrade() else {
                return;
            };
            let mut slot = engine.flight();
            if slot.serial != serial || slot.current.is_some() || engine.valid_cached().is_none() {
                return;
            }
            let _following = engine.spawn_job(&mut slot, Job::Follow { failed: failed + 1 });
        });
    }

    /// Whether a flight runs (the main one, or a downscoped one).
    pub(crate) fn flying(&self) -> bool {
        self.flight().current.is_some() || lock(&self.scoped).iter().any(|e| e.flight.is_some())
    }

    fn clear_flight(&self, serial: u32) {
        let mut slot = self.flight();
        if slot.current.as_ref().is_some_and(|(s, _, _)| *s == serial) {
            slot.current = None;
            slot.extra = None;
            // A doom this flight left (its refresh failed, the other holder's rotation
            // never showed) is lifted: the token may well be alive, and it is the only
            // one.
            self.lift_doom();
        }
        drop(slot);
        for entry in lock(&self.scoped).iter_mut() {
            if entry.flight.as_ref().is_some_and(|(s, _)| *s == serial) {
                entry.flight = None;
            }
        }
    }

    /// A token for `scope` only (a subset of the grant's scopes: Autodesk's viewer
    /// tokens): cached per scope set; otherwise one refresh under the lease asking for
    /// that scope, whose new refresh token is saved with the full-scope access token
    /// (see ARCHITECTURE.md).
    pub(crate) async fn access_token_for(self: &Arc<Self>, scope: &[&str]) -> Outcome {
        let profile = self.config.endpoint.profile();
        if profile.refresh_token_narrows_with_scope {
            return Err(Error::Config(format!(
                "the {} profile's refresh tokens narrow with the scope: a downscoped refresh would consume the grant's full refresh token; keep the narrow grant under its own key (its own consent)",
                profile.name
            )));
        }
        let mut scope: Vec<String> = scope.iter().map(|s| (*s).to_owned()).collect();
        scope.sort();
        scope.dedup();
        if scope.is_empty() {
            return Err(Error::Config(
                "a downscoped token needs at least one scope".into(),
            ));
        }
        let flight = loop {
            let next = {
                let mut slot = self.flight();
                if let Some((_, following, true)) = &slot.current {
                    // A follow flight running: a downscoped refresh beside it could clear
                    // the full-scope token that the follow then publishes again. After it.
                    Err(following.clone())
                } else {
                    let mut scoped = lock(&self.scoped);
                    let now = self.config.clock.now();
                    let position = scoped.iter().position(|e| e.scope == scope);
                    if let Some(entry) = position.map(|i| &scoped[i]) {
                        if let Some(cached) = &entry.cached
                            && cached.freshness(now) == Freshness::Fresh
                        {
                            return Ok(cached.token.clone());
                        }
                        if let Some((_, running)) = &entry.flight {
                            Ok(running.clone())
                        } else {
                            drop(scoped);
                            Ok(self.start_scoped(&mut slot, scope.clone())?)
                        }
                    } else {
                        if scoped.len() >= SCOPED_KEPT
                            && let Some(idle) = scoped.iter().position(|e| e.flight.is_none())
                        {
                            scoped.remove(idle);
                        }
                        scoped.push(ScopedEntry {
                            scope: scope.clone(),
                            cached: None,
                            flight: None,
                        });
                        drop(scoped);
                        Ok(self.start_scoped(&mut slot, scope.clone())?)
                    }
                }
            };
            match next {
                Ok(flight) => break flight,
                Err(following) => drop(following.await),
            }
        };
        flight.await
    }

    /// Starts the downscoped flight for `scope`, if the gate lets a refresh start.
    fn start_scoped(
        self: &Arc<Self>,
        slot: &mut FlightSlot,
        scope: Vec<String>,
    ) -> Result<Flight, Error> {
        match self.gate(Reason::AccessToken) {
            Gate::Go => {}
            Gate::Look(e) | Gate::Refuse(e) => return Err(e),
        }
        slot.serial = slot.serial.wrapping_add(1);
        let serial = slot.serial;
        let flight = self.spawn_flight(serial, Job::Scoped(scope.clone()));
        if let Some(entry) = lock(&self.scoped).iter_mut().find(|e| e.scope == scope) {
            entry.flight = Some((serial, flight.clone()));
        }
        Ok(flight)
    }

    /// Caches a downscoped token for `scope`.
    pub(crate) fn publish_scoped(&self, scope: &[String], set: &TokenSet) -> Option<AccessToken> {
        if flight_is_stale(&self.state()) {
            return None;
        }
        let cached = Arc::new(self.cached_of(set)?);
        let token = cached.token.clone();
        let mut scoped = lock(&self.scoped);
        match scoped.iter_mut().find(|e| e.scope == scope) {
            Some(entry) => entry.cached = Some(cached),
            None => {
                if scoped.len() >= SCOPED_KEPT {
                    scoped.remove(0);
                }
                scoped.push(ScopedEntry {
                    scope: scope.to_vec(),
                    cached: Some(cached),
                    flight: None,
                });
            }
        }
        Some(token)
    }

    /// Records a flight's outcome: counters, the last error, the spacing of the next
    /// attempt (the provider's backoff was already set where the provider failed), a dead
    /// grant. Fills in `retry_after` for waiters.
    fn settle(&self, mut outcome: Outcome) -> Outcome {
        let now = self.now();
        let mut state = self.state();
        match &mut outcome {
            Ok(_) => {
                if state.succeeded() {
                    drop(state);
                    self.emit(EventKind::Recovered);
                    return outcome;
                }
            }
            Err(e) => {
                state.metrics.count_failure(e);
                state.last_error = Some(Box::new(e.clone()));
                if e.needs_reauthorization() {
                    if let Some(trouble) = &mut state.trouble {
                        trouble.failing = false;
                    }
                    if state.dead.is_none() {
                        self.emit(EventKind::NeedsConsent);
                    }
                    let refresh_token = state
                        .last_known
                        .as_ref()
                        .and_then(|s| s.refresh_token.clone());
                    state.dead = Some(Box::new(Dead {
                        error: e.clone(),
                        refresh_token,
                        checked_at: now,
                    }));
                } else if crate::retry::is_store_side(e) {
                    state.metrics.store_failures += 1;
                    let trouble = state.trouble();
                    trouble.failing = true;
                    let wait = trouble.store_spacing.failed(now, e);
                    if let Error::Transient { retry_after, .. } = e {
                        *retry_after = Some(retry_after.map_or(wait, |r| r.max(wait)));
                    }
                } else {
                    let trouble = state.trouble();
                    trouble.failing = true;
                    if let Error::Transient { retry_after, .. } = e {
                        *retry_after = trouble.backoff.wait(now).or(*retry_after);
                    }
                }
            }
        }
        outcome
    }

    /// Sends an event about this grant, if anyone listens.
    pub(crate) fn emit(&self, kind: EventKind) {
        if let Some(events) = &self.config.events {
            events.send(&self.key, kind);
        }
    }

    /// Publishes a token set's access token to the hot path.
    pub(crate) fn publish(&self, set: &TokenSet) -> Option<AccessToken> {
        self.publish_locked(&self.state(), set)
    }

    /// [`Engine::publish`] with the state already locked: what was checked under the lock
    /// (an `invalidate`'s rejection) still holds when the token is published.
    pub(crate) fn publish_locked(&self, state: &State, set: &TokenSet) -> Option<AccessToken> {
        if flight_is_stale(state) {
            return None;
        }
        let cached = self.cached_of(set)?;
        let token = cached.token.clone();
        self.cache.store(Some(Arc::new(cached)));
        Some(token)
    }

    /// What the hot path needs of `set`, if it holds an access token.
    fn cached_of(&self, set: &TokenSet) -> Option<Cached> {
        let token = set.access_token.clone()?;
        let stale_at = set.stale_at(self.config.leeway);
        Some(Cached {
            token,
            fresh_until: self.monotonic_deadline(stale_at),
            stale_at,
            expires_at: set.expires_at,
            keep_alive_at: set.keep_alive_at(),
            refresh_expires_at: set.refresh_expires_at,
            doomed: false,
        })
    }

    /// Where the grant stands (for [`Status::health`](crate::Status::health)).
    pub(crate) fn health(&self, state: &State) -> Health {
        if state.dead.is_some() {
            return Health::NeedsConsent;
        }
        let Some(trouble) = state.trouble.as_deref() else {
            return Health::Healthy;
        };
        let now = self.now();
        let retry_in = trouble
            .backoff
            .wait(now)
            .max(trouble.store_spacing.wait(now));
        match trouble.streak.map(|streak| streak.since) {
            Some(failing_since) if trouble.exhausted => Health::Exhausted {
                failing_since,
                retry_in,
            },
            failing_since if trouble.failing || retry_in.is_some() => Health::CoolingDown {
                failing_since,
                retry_in,
            },
            _ => Health::Healthy,
        }
    }

    /// Whether a refresh forced by a rejected token may be sent now.
    pub(crate) fn forced_refresh_allowed(&self, state: &State) -> bool {
        state.last_forced_refresh.is_none_or(|at| {
            self.now().saturating_duration_since(at) >= self.config.timing.forced_refresh_interval
        })
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
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
pub(crate) struct LeaseTaskDone(pub(crate) Arc<Engine>);

impl Drop for LeaseTaskDone {
    fn drop(&mut self) {
        let mut state = self.0.state();
        state.lease_tasks = state.lease_tasks.saturating_sub(1);
    }
}

/// Marks the end of a persisting task, however it ends.
struct Persisting(Arc<Engine>);

impl Drop for Persisting {
    fn drop(&mut self) {
        self.0.state().persisting = false;
    }
}

/// Clears a flight's slot when its task ends, however it ends.
struct ClearFlight {
    inner: Arc<Engine>,
    serial: u32,
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
